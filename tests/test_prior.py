"""Tests of the refinement prior: official key layout, the official 11-token sequence, guidance, training."""

import math

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, GPT2Config, GPT2Model

from diffusers_any2pix.models.mm_adapter import rescale_to_norm
from diffusers_any2pix.models.prior import Any2PixPrior, Modality


EMBED, TEXT, SCORE, LAYERS, HEADS, POSITIONS, VOCAB = 32, 16, 8, 2, 2, 64, 11
TINY = dict(
    embed_dim=EMBED,
    hidden_size=EMBED,
    text_hidden_dim=TEXT,
    score_embed_dim=SCORE,
    num_layers=LAYERS,
    num_attention_heads=HEADS,
    max_positions=POSITIONS,
    vocab_size=VOCAB,
    dropout=0.0,
)
CLIP_VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "c</w>": 4}


def tiny_clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(CLIP_VOCAB),
        hidden_size=TEXT,
        intermediate_size=2 * TEXT,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=dict(CLIP_VOCAB), merges=[], model_max_length=77)


def tiny_clip_encoder(seed: int = 7) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_config()).eval()


def official_state_dict(seed: int = 0) -> dict:
    """A state dict in the official `ckpts/prior/model.bin` layout, built by hand (GPT-2 Conv1D weights (in, out)),
    with the official frozen CLIP text encoder and the attention buffers older transformers saved."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def ln():
        return 1.0 + w(EMBED, scale=0.1), w(EMBED)

    H = EMBED
    sd = {
        "start_of_sequence_tokens.weight": w(32, H, scale=0.5),
        "end_of_sequence_tokens.weight": w(32, H, scale=0.5),
        "modality_embedding.weight": w(10, H, scale=0.5),
        "input_sequence_embed_linear.1.weight": w(H, EMBED),
        "input_sequence_embed_linear.1.bias": w(H),
        "input_sequence_embed_linear.2.weight": w(H, TEXT),
        "input_sequence_embed_linear.2.bias": w(H),
        "input_sequence_embed_linear.3.weight": w(H, SCORE),
        "input_sequence_embed_linear.3.bias": w(H),
        "model.wte.weight": w(VOCAB, H),
        "model.wpe.weight": w(POSITIONS, H, scale=0.3),
    }
    for i in range(LAYERS):
        p = f"model.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = ln()
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = w(H, 3 * H, scale=0.3), w(3 * H)
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = w(H, H, scale=0.3), w(H)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = ln()
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = w(H, 4 * H, scale=0.3), w(4 * H)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = w(4 * H, H, scale=0.3), w(H)
        causal = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.bool))
        sd[p + "attn.bias"] = causal.view(1, 1, POSITIONS, POSITIONS)
        sd[p + "attn.masked_bias"] = torch.tensor(-1e4)
    sd["model.ln_f.weight"], sd["model.ln_f.bias"] = ln()
    # The official text encoder, saved by an older transformers (with the `text_model.` level and position ids).
    for key, value in tiny_clip_encoder().state_dict().items():
        sd["cond_stage_models.0.model.text_model." + key] = value.clone()
    sd["cond_stage_models.0.model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")


def prior_keys(sd: dict) -> list:
    """The official keys that belong to the prior (not the text encoder, not legacy GPT-2 buffers)."""
    return [k for k in sd if not k.startswith("cond_stage_models.") and not k.endswith(LEGACY_BUFFERS)]


@pytest.fixture(scope="module")
def converted():
    sd = official_state_dict()
    model, report = Any2PixPrior.from_official_state_dict(
        sd, text_encoder_config=tiny_clip_config(), tokenizer=tiny_clip_tokenizer(), **TINY
    )
    return sd, model, report


def reference_gpt2(sd: dict) -> GPT2Model:
    """A plain transformers GPT-2 holding the official `model.*` weights."""
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBED, n_layer=LAYERS, n_head=HEADS,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    gpt2 = GPT2Model(config).eval()
    weights = {k[len("model.") :]: sd[k] for k in prior_keys(sd) if k.startswith("model.")}
    gpt2.load_state_dict(weights, strict=True)
    return gpt2


def sinusoid(score: float, dim: int) -> torch.Tensor:
    """The official score embedding written out: cos first (flip_sin_to_cos), frequencies 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = score * freqs
    return torch.cat([torch.cos(args), torch.sin(args)])


def official_sequence(sd: dict, empty_text: torch.Tensor, e: torch.Tensor, score_block: torch.Tensor, modality: int):
    """The official inference sequence for one sample, built token by token from the raw checkpoint tensors."""
    sos, eos = sd["start_of_sequence_tokens.weight"], sd["end_of_sequence_tokens.weight"]

    def lin(k, x):
        return x @ sd[f"input_sequence_embed_linear.{k}.weight"].T + sd[f"input_sequence_embed_linear.{k}.bias"]

    tokens = [sd["modality_embedding.weight"][modality]]
    tokens += [sos[1], lin(1, e), eos[1]]
    tokens += [sos[2], *lin(2, empty_text), eos[2]]
    tokens += [sos[3], lin(3, score_block), eos[3]]
    return torch.stack(tokens)


# --------------------------------------------------------------------------------------------- conversion


def test_official_state_dict_loads_strictly_and_weights_land(converted):
    sd, model, report = converted
    assert sorted(report.loaded_keys) == sorted(prior_keys(sd))
    assert report.dropped_text_encoder_keys == [k for k in sd if k.startswith("cond_stage_models.")]
    assert sorted(report.ignored_buffer_keys) == sorted(
        f"model.h.{i}.attn.{b}" for i in range(LAYERS) for b in ("bias", "masked_bias")
    )
    assert report.empty_text_hidden_states_source == "checkpoint_text_encoder"
    state = model.state_dict()
    assert set(state) == set(prior_keys(sd)) | {"empty_text_hidden_states"}
    for key in prior_keys(sd):
        assert torch.equal(state[key], sd[key]), key
    assert not model.training

    # Conv1D orientation: the query/key/value projection of block 0 is x @ W + b with W stored (in, out).
    x = torch.randn(3, EMBED)
    expected = x @ sd["model.h.0.attn.c_attn.weight"] + sd["model.h.0.attn.c_attn.bias"]
    torch.testing.assert_close(model.model.h[0].attn.c_attn(x), expected, rtol=0, atol=1e-6)


def test_empty_text_states_equal_the_text_encoder_on_the_empty_prompt(converted):
    sd, model, _ = converted
    encoder = tiny_clip_encoder()
    with torch.no_grad():
        empty_prompt_ids = torch.tensor([[CLIP_VOCAB["<|startoftext|>"], CLIP_VOCAB["<|endoftext|>"]]])
        expected = encoder(input_ids=empty_prompt_ids).last_hidden_state[0]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(model.empty_text_hidden_states, expected, rtol=0, atol=0)

    # The other two sources give the same buffer.
    from_encoder, report = Any2PixPrior.from_official_state_dict(
        sd, text_encoder=encoder, tokenizer=tiny_clip_tokenizer(), **TINY
    )
    assert report.empty_text_hidden_states_source == "text_encoder"
    torch.testing.assert_close(from_encoder.empty_text_hidden_states, expected, rtol=0, atol=0)
    given, report = Any2PixPrior.from_official_state_dict(sd, empty_text_hidden_states=expected, **TINY)
    assert report.empty_text_hidden_states_source == "empty_text_hidden_states"
    torch.testing.assert_close(given.empty_text_hidden_states, expected, rtol=0, atol=0)


def test_conversion_without_text_source_leaves_zeros_and_does_not_touch_input():
    sd = official_state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    model, report = Any2PixPrior.from_official_state_dict(sd, **TINY)
    assert report.empty_text_hidden_states_source == "unset"
    assert torch.count_nonzero(model.empty_text_hidden_states) == 0
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)


def test_default_config_has_the_official_shapes():
    with torch.device("meta"):
        model = Any2PixPrior()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["start_of_sequence_tokens.weight"] == shapes["end_of_sequence_tokens.weight"] == (32, 1024)
    assert shapes["modality_embedding.weight"] == (10, 1024)
    assert shapes["input_sequence_embed_linear.1.weight"] == (1024, 1024)
    assert shapes["input_sequence_embed_linear.2.weight"] == (1024, 1024)
    assert shapes["input_sequence_embed_linear.3.weight"] == (1024, 512)
    assert shapes["model.wte.weight"] == (50257, 1024) and shapes["model.wpe.weight"] == (1024, 1024)
    assert shapes["model.h.23.attn.c_attn.weight"] == (1024, 3072) and "model.h.24.ln_1.weight" not in shapes
    assert shapes["model.h.0.mlp.c_proj.weight"] == (4096, 1024)
    assert shapes["empty_text_hidden_states"] == (2, 1024)
    assert model.model.config.activation_function == "gelu_new" and model.model.config.n_head == 16
    assert not any(k.startswith("input_sequence_embed_linear.0") for k in shapes)


# --------------------------------------------------------------------------------------------- the sequence


def test_forward_equals_the_official_eleven_token_sequence(converted):
    sd, model, _ = converted
    e = torch.randn(2, EMBED) * 3
    gpt2 = reference_gpt2(sd)
    empty = model.empty_text_hidden_states
    cond_block = sinusoid(6.5, SCORE)
    uncond_block = torch.full((SCORE,), 2.0)
    with torch.no_grad():
        cases = (
            (cond_block, {"score": 6.5}),
            (cond_block, {}),  # 6.5 is the default
            (uncond_block, {"score_block": model.unconditional_score_block(2)}),
        )
        for score_block, kwargs in cases:
            seq = torch.stack([official_sequence(sd, empty, e[i], score_block, Modality.VIDEO) for i in range(2)])
            assert seq.shape == (2, 11, EMBED)
            expected = gpt2(inputs_embeds=seq).last_hidden_state[:, -1]
            got = model(e, source_modality=Modality.VIDEO, **kwargs).predicted_embeds
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_score_embedding_matches_the_written_out_sinusoid(converted):
    _, model, _ = converted
    got = model.score_embedding(torch.tensor([6.5, 2.0]), 2)
    torch.testing.assert_close(got, torch.stack([sinusoid(6.5, SCORE), sinusoid(2.0, SCORE)]), rtol=0, atol=1e-6)
    # The unconditional block is the constant 2.0, not an embedding of 2.0.
    assert torch.equal(model.unconditional_score_block(3), torch.full((3, SCORE), 2.0))
    e = torch.randn(1, EMBED)
    with torch.no_grad():
        a = model(torch.zeros_like(e), score_block=model.unconditional_score_block(1)).predicted_embeds
        b = model(torch.zeros_like(e), score=2.0).predicted_embeds
    assert not torch.allclose(a, b, atol=1e-3)


def test_explicit_text_hidden_states_with_padding_mask(converted):
    sd, model, _ = converted
    e = torch.randn(2, EMBED)
    text = torch.randn(2, 3, TEXT)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gpt2 = reference_gpt2(sd)
    seq = torch.stack(
        [official_sequence(sd, text[i], e[i], sinusoid(6.5, SCORE), Modality.AUDIO) for i in range(2)]
    )
    full_mask = torch.cat([torch.ones(2, 5, dtype=torch.long), mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = gpt2(inputs_embeds=seq, attention_mask=full_mask).last_hidden_state[:, -1]
        got = model(
            e, source_modality=Modality.AUDIO, text_hidden_states=text, text_attention_mask=mask
        ).predicted_embeds
        # The stored empty prompt is the default text block.
        default = model(e).predicted_embeds
        explicit_empty = model(e, text_hidden_states=model.empty_text_hidden_states[None]).predicted_embeds
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(default, explicit_empty, rtol=0, atol=0)


def test_batch_of_two_equals_two_batches_of_one(converted):
    _, model, _ = converted
    e = torch.randn(2, EMBED)
    modality = torch.tensor([Modality.IMAGE, Modality.VIDEO])
    score = torch.tensor([6.5, 4.0])
    with torch.no_grad():
        batched = model(e, source_modality=modality, score=score).predicted_embeds
        single = torch.cat(
            [
                model(e[i : i + 1], source_modality=int(modality[i]), score=float(score[i])).predicted_embeds
                for i in range(2)
            ]
        )
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    separate = torch.cat([model.refine(e[:1]), model.refine(e[1:])])
    torch.testing.assert_close(model.refine(e), separate, rtol=1e-5, atol=5e-5)


# --------------------------------------------------------------------------------------------- guidance


def test_refine_is_guided_difference_of_the_two_branches(converted):
    _, model, _ = converted
    x = torch.randn(2, EMBED) * 0.7
    x_before = x.clone()
    scaled = x / x.norm(dim=-1, keepdim=True) * 100.0
    with torch.no_grad():
        cond = model(scaled, score=6.5).predicted_embeds
        uncond = model(torch.zeros_like(x), score_block=torch.full((2, SCORE), 2.0)).predicted_embeds
    for s in (10.0, 3.0):
        y = uncond + s * (cond - uncond)
        # Batched vs separate passes differ by float rounding, which guidance multiplies by `s`.
        torch.testing.assert_close(model.refine(x, guidance_scale=s, output_norm=None), y, rtol=1e-5, atol=5e-5)
        refined = model.refine(x, guidance_scale=s)
        torch.testing.assert_close(refined, 20.0 * y / y.norm(dim=-1, keepdim=True), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(refined.norm(dim=-1), torch.full((2,), 20.0), rtol=0, atol=1e-4)
    assert torch.equal(x, x_before)
    # Input scale does not matter: the prior always sees norm 100.
    torch.testing.assert_close(model.refine(5 * x), model.refine(x), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(model.refine(x, output_norm=7.0).norm(dim=-1), torch.full((2,), 7.0), rtol=0, atol=1e-4)


def test_rescale_to_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(rescale_to_norm(x, 10.0), torch.tensor([[6.0, 8.0], [0.0, 0.0]]))


# --------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(converted, tmp_path):
    _, model, _ = converted
    model.save_pretrained(tmp_path)
    loaded = Any2PixPrior.from_pretrained(tmp_path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert all(t.device.type != "meta" for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.count_nonzero(loaded.empty_text_hidden_states) > 0
    assert not loaded.model.wte.weight.requires_grad
    e = torch.randn(2, EMBED)
    assert torch.equal(model.refine(e), loaded.refine(e))


# --------------------------------------------------------------------------------------------- training


def tiny_prior(seed: int = 0) -> Any2PixPrior:
    torch.manual_seed(seed)
    return Any2PixPrior(**TINY)


def test_forward_train_shapes_loss_and_gradients():
    model = tiny_prior().train()
    # A fresh prior's empty-prompt states are zeros, which would zero the text projection's weight gradient.
    model.empty_text_hidden_states.normal_()
    cond, target = torch.randn(4, EMBED), torch.randn(4, EMBED)
    cond_before = cond.clone()
    out = model.forward_train(cond, target, condition_dropout_prob=0.5, generator=torch.Generator().manual_seed(1))
    assert out.predicted_embeds.shape == (4, EMBED) and out.condition_dropped.shape == (4,)
    assert out.condition_dropped.dtype == torch.bool
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, (out.predicted_embeds - target).abs().mean())
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"model.wte.weight"}
    for name, param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert torch.equal(cond, cond_before)


def test_condition_dropout_is_reproducible_and_equals_the_unconditional_branch():
    model = tiny_prior().eval()
    cond = torch.randn(64, EMBED)
    a = model.prepare_training_inputs(cond, condition_dropout_prob=0.5, generator=torch.Generator().manual_seed(3))
    b = model.prepare_training_inputs(cond, condition_dropout_prob=0.5, generator=torch.Generator().manual_seed(3))
    c = model.prepare_training_inputs(cond, condition_dropout_prob=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.condition_dropped, b.condition_dropped) and torch.equal(a.score_block, b.score_block)
    assert not torch.equal(a.condition_dropped, c.condition_dropped)
    dropped = a.condition_dropped
    assert 0 < dropped.sum() < 64
    assert torch.count_nonzero(a.condition_embeds[dropped]) == 0
    assert torch.equal(a.score_block[dropped], torch.full((int(dropped.sum()), SCORE), 2.0))
    torch.testing.assert_close(a.condition_embeds[~dropped], rescale_to_norm(cond[~dropped], 100.0))
    torch.testing.assert_close(a.score_block[~dropped], model.score_embedding(6.5, int((~dropped).sum())))
    assert not model.prepare_training_inputs(cond, condition_dropout_prob=0.0).condition_dropped.any()

    # All dropped: the training forward runs the inference's unconditional branch.
    target = torch.randn(2, EMBED)
    with torch.no_grad():
        out = model.forward_train(cond[:2], target, condition_dropout_prob=1.0)
        uncond = model(torch.zeros(2, EMBED), score_block=model.unconditional_score_block(2)).predicted_embeds
        # The DDP path (prepare on the unwrapped model, then forward with the target) gives the same loss.
        inputs = model.prepare_training_inputs(cond[:2], condition_dropout_prob=0.0)
        ddp_style = model(inputs.condition_embeds, score_block=inputs.score_block, target_embeds=target)
        kept = model.forward_train(cond[:2], target, condition_dropout_prob=0.0)
    torch.testing.assert_close(out.predicted_embeds, uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ddp_style.loss, kept.loss, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    cond, target = torch.randn(3, EMBED), torch.randn(3, EMBED)
    grads = []
    for checkpointing in (False, True):
        model = tiny_prior().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert all(block.gradient_checkpointing for block in model.model.h)
        model.forward_train(cond, target, condition_dropout_prob=0.0).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_few_optimizer_steps_decrease_the_loss():
    model = tiny_prior().train()
    g = torch.Generator().manual_seed(0)
    cond, target = torch.randn(4, EMBED, generator=g), torch.randn(4, EMBED, generator=g) * 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.forward_train(cond, target, condition_dropout_prob=0.0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# --------------------------------------------------------------------------------------------- errors


def test_missing_unexpected_and_misshapen_keys_are_listed():
    sd = official_state_dict()
    missing = {k: v for k, v in sd.items() if k not in ("modality_embedding.weight", "model.ln_f.bias")}
    listed = r"missing keys \['modality_embedding.weight', 'model.ln_f.bias'\], unexpected keys \[\]"
    with pytest.raises(ValueError, match=listed):
        Any2PixPrior.from_official_state_dict(missing, **TINY)
    extra = dict(sd)
    extra["input_sequence_embed_linear.4.weight"] = torch.zeros(EMBED, EMBED)
    extra["output_proj.weight"] = torch.zeros(1)
    listed = r"missing keys \[\], unexpected keys \['input_sequence_embed_linear.4.weight', 'output_proj.weight'\]"
    with pytest.raises(ValueError, match=listed):
        Any2PixPrior.from_official_state_dict(extra, **TINY)
    transposed = dict(sd, **{"model.h.1.mlp.c_fc.weight": sd["model.h.1.mlp.c_fc.weight"].T})
    with pytest.raises(ValueError, match=r"'model.h.1.mlp.c_fc.weight': checkpoint \(128, 32\), model \(32, 128\)"):
        Any2PixPrior.from_official_state_dict(transposed, **TINY)
    # A prior config that does not fit the checkpoint (one layer too many) lists the missing block.
    with pytest.raises(ValueError, match=r"missing keys \['model.h.2.attn.c_attn.bias'"):
        Any2PixPrior.from_official_state_dict(sd, **dict(TINY, num_layers=3))


def test_conversion_text_source_errors():
    sd = official_state_dict()
    with pytest.raises(ValueError, match="at most one source"):
        Any2PixPrior.from_official_state_dict(
            sd,
            text_encoder=tiny_clip_encoder(),
            empty_text_hidden_states=torch.zeros(2, TEXT),
            tokenizer=tiny_clip_tokenizer(),
            **TINY,
        )
    with pytest.raises(ValueError, match="`tokenizer` is required with `text_encoder_config`"):
        Any2PixPrior.from_official_state_dict(sd, text_encoder_config=tiny_clip_config(), **TINY)
    wrong = tiny_clip_config()
    wrong.num_hidden_layers = 2
    with pytest.raises(ValueError, match=r"text encoder does not match.*missing keys \['encoder.layers.1"):
        Any2PixPrior.from_official_state_dict(sd, text_encoder_config=wrong, tokenizer=tiny_clip_tokenizer(), **TINY)
    with pytest.raises(ValueError, match=r"`hidden_states` must have shape \(2, 16\).*got \(3, 16\)"):
        Any2PixPrior.from_official_state_dict(sd, empty_text_hidden_states=torch.zeros(3, TEXT), **TINY)
    with pytest.raises(TypeError, match="must be a dict"):
        Any2PixPrior.from_official_state_dict(list(sd.items()), **TINY)


def test_config_validation():
    with pytest.raises(ValueError, match=r"`hidden_size` \(48\) must equal `embed_dim` \(32\)"):
        Any2PixPrior(**dict(TINY, hidden_size=48))
    with pytest.raises(ValueError, match="divisible by `num_attention_heads`"):
        Any2PixPrior(**dict(TINY, num_attention_heads=5))
    with pytest.raises(ValueError, match="`num_sequence_tokens` must be > 3"):
        Any2PixPrior(**dict(TINY, num_sequence_tokens=3))
    with pytest.raises(ValueError, match="`num_modalities` must be >= 4"):
        Any2PixPrior(**dict(TINY, num_modalities=3))


def test_input_errors(converted):
    _, model, _ = converted
    e = torch.randn(2, EMBED)
    with pytest.raises(ValueError, match=r"`condition_embeds` must have shape \(batch_size, 32\).*got \(2, 31\)"):
        model(torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"`condition_embeds` must have shape.*got \(32,\)"):
        model(torch.randn(EMBED))
    with pytest.raises(TypeError, match="`condition_embeds` must be a torch.Tensor"):
        model([[0.0] * EMBED])
    with pytest.raises(ValueError, match=r"`generation_embeds` must have shape.*got \(1, 31\)"):
        model.refine(torch.randn(1, 31))
    with pytest.raises(ValueError, match="either `score` or `score_block`"):
        model(e, score=6.5, score_block=model.unconditional_score_block(2))
    with pytest.raises(ValueError, match=r"`score_block` must be a tensor of shape \(2, 8\)"):
        model(e, score_block=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"`score` must be a float or a tensor of shape \(2,\)"):
        model(e, score=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="`score` must be a float or a tensor"):
        model(e, score="high")
    with pytest.raises(ValueError, match=r"`source_modality` ids must lie in \[0, 10\)"):
        model(e, source_modality=10)
    with pytest.raises(ValueError, match="`source_modality` must be a Modality/int or an integer tensor"):
        model(e, source_modality=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"`text_hidden_states` must have shape \(2 or 1, seq_len, 16\)"):
        model(e, text_hidden_states=torch.zeros(2, 2, 15))
    with pytest.raises(ValueError, match=r"`text_attention_mask` must have shape \(2 or 1, 2\)"):
        model(e, text_hidden_states=torch.zeros(2, 2, TEXT), text_attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="only valid together with `text_hidden_states`"):
        model.refine(e, text_attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"exceeds `max_positions` \(64\)"):
        model(e, text_hidden_states=torch.zeros(1, 56, TEXT))
    with pytest.raises(ValueError, match="`target_embeds` has batch size 3"):
        model(e, target_embeds=torch.zeros(3, EMBED))
    with pytest.raises(ValueError, match="`output_norm` must be positive or None"):
        model.refine(e, output_norm=0.0)
    with pytest.raises(ValueError, match=r"`condition_dropout_prob` must lie in \[0, 1\], got 1.5"):
        model.forward_train(e, e, condition_dropout_prob=1.5)
    with pytest.raises(TypeError, match="`text_encoder` must be a transformers CLIPTextModel"):
        model.set_empty_text_hidden_states_from_encoder(object(), tiny_clip_tokenizer())
