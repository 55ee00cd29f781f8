"""Tests of the multimodal adapter and the LLM toolkit around it (tiny Llama and word-level tokenizer, CPU)."""

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads, MultimodalAdapter, rescale_to_norm
from diffusers_any2pix.multimodal_llm import (
    MULTIMODAL_SPECIAL_TOKENS,
    EmbeddingPositions,
    MultimodalTokenIds,
    ParsedAnswer,
    add_multimodal_tokens,
    build_vicuna_prompt,
    expand_media_tokens,
    find_embedding_positions,
    generate_with_media,
    get_multimodal_token_ids,
    inject_media_embeds,
    parse_answer,
    prepare_multimodal_inputs,
    score_answers,
)
from diffusers_any2pix.testing_utils import TINY_EMBED_DIM, tiny_llm


EMBED_DIM = 8
HIDDEN = 32
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EXTRA_WORDS = "USER: ASSISTANT: add to make look like the style of remove a cat dog red blue [ ] . : ,"


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(re.findall(r"\w+|[^\w\s]", f"{SYSTEM} {EXTRA_WORDS}")))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_llm(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    llm = make_llm(len(tokenizer))
    token_ids = add_multimodal_tokens(tokenizer, llm)
    torch.manual_seed(1)
    adapter = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN).eval()
    return tokenizer, llm, adapter, token_ids


def media(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, EMBED_DIM, generator=torch.Generator().manual_seed(seed)) * 3.0


class ForceTokens(LogitsProcessor):
    """Teacher forcing through generate(): step k of row r can only produce targets[r][k] (then its last token)."""

    def __init__(self, targets: list[list[int]]):
        self.targets = targets
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        for row, target in enumerate(self.targets):
            forced[row, target[min(self.step, len(target) - 1)]] = 0.0
        self.step += 1
        return forced


def answer_ids(tokenizer, tokens: list[str]) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokens)


FULL_ANSWER = ["<base>", "<video>", "<im_gen_start>", "<im_gen>", "[", "red", "cat", "]", "<video>", "</s>"]


# ----------------------------------------------------------------------------------------------- adapter


def test_rescale_to_norm_matches_official_formula():
    x = torch.randn(3, 5, EMBED_DIM, dtype=torch.float64)
    expected = x / (x.norm(dim=-1, keepdim=True) + 1e-9) * 20
    out = rescale_to_norm(x, 20.0)
    assert out.dtype == torch.float64 and torch.equal(out, expected)
    assert torch.allclose(out.norm(dim=-1), torch.full((3, 5), 20.0, dtype=torch.float64))
    half = rescale_to_norm(x.half(), 100.0)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float().norm(dim=-1), torch.full((3, 5), 100.0), rtol=1e-3)
    assert torch.equal(rescale_to_norm(torch.zeros(2, 4), 20.0), torch.zeros(2, 4))


def test_rescale_to_norm_errors():
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        rescale_to_norm([1.0, 2.0], 20.0)
    with pytest.raises(ValueError, match="floating-point tensor"):
        rescale_to_norm(torch.ones(4, dtype=torch.long), 20.0)
    with pytest.raises(ValueError, match="floating-point tensor with at least one dimension"):
        rescale_to_norm(torch.tensor(1.0), 20.0)
    with pytest.raises(ValueError, match="`norm` must be a positive finite number"):
        rescale_to_norm(torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="`eps` must be a non-negative number"):
        rescale_to_norm(torch.ones(4), 20.0, eps=-1.0)


def test_adapter_layout_project_predict():
    torch.manual_seed(0)
    adapter = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, media_embed_norm=20.0)
    assert sorted(adapter.state_dict()) == sorted(
        f"{module}.{index}.{kind}"
        for module in ("input_projector", "output_head")
        for index in (0, 2)
        for kind in ("weight", "bias")
    )
    assert isinstance(adapter.input_projector[1], torch.nn.GELU)
    e = media(4, seed=3)
    rescaled = e / (e.norm(dim=-1, keepdim=True) + 1e-9) * 20
    expected = adapter.input_projector[2](torch.nn.functional.gelu(adapter.input_projector[0](rescaled)))
    assert torch.allclose(adapter.project(e), expected, atol=1e-6)
    # Only the direction of the media embedding matters.
    assert torch.allclose(adapter.project(e * 7.5), adapter.project(e), atol=1e-5)
    h = torch.randn(2, 3, HIDDEN)
    assert adapter.predict(h).shape == (2, 3, EMBED_DIM)
    assert torch.equal(adapter.predict(h), adapter.output_head(h))


def test_adapter_errors():
    adapter = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=r"`media_embeds` must have embed_dim 8 as its last dimension, got"):
        adapter.project(torch.randn(2, 5))
    with pytest.raises(TypeError, match="`media_embeds` must be a torch.Tensor"):
        adapter.project([[0.0] * EMBED_DIM])
    with pytest.raises(ValueError, match="`media_embeds` must be a floating-point tensor"):
        adapter.project(torch.ones(2, EMBED_DIM, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`hidden_states` must have llm_hidden_size 32 as its last dimension"):
        adapter.predict(torch.randn(2, EMBED_DIM))
    with pytest.raises(ValueError, match="`embed_dim` must be a positive integer"):
        MultimodalAdapter(embed_dim=0)
    with pytest.raises(ValueError, match="`llm_hidden_size` must be a positive integer"):
        MultimodalAdapter(llm_hidden_size=3.5)
    with pytest.raises(ValueError, match="`media_embed_norm` must be a positive number"):
        MultimodalAdapter(media_embed_norm=-1.0)
    for tokens in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"`image_patch_tokens` must be a non-negative integer \(0: one"):
            MultimodalAdapter(image_patch_tokens=tokens)
    with pytest.raises(ValueError, match="`image_patch_tokens` 4 needs `patch_embed_dim`"):
        MultimodalAdapter(image_patch_tokens=4)
    with pytest.raises(ValueError, match=r"`resampler_heads` \(3\) must divide `resampler_hidden_size` \(32\)"):
        MultimodalAdapter(image_patch_tokens=4, patch_embed_dim=6, resampler_hidden_size=32, resampler_heads=3)
    with pytest.raises(ValueError, match="`resampler_depth` must be a positive integer"):
        MultimodalAdapter(resampler_depth=0)


def patch_adapter(tokens: int = 3, seed: int = 0) -> MultimodalAdapter:
    torch.manual_seed(seed)
    return MultimodalAdapter(
        embed_dim=EMBED_DIM,
        llm_hidden_size=HIDDEN,
        image_patch_tokens=tokens,
        patch_embed_dim=6,
        resampler_hidden_size=16,
        resampler_depth=1,
        resampler_heads=2,
    ).eval()


def test_patch_resampler_reads_k_vectors_per_image_and_round_trips(tmp_path):
    plain = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN)
    assert plain.tokens_per_image == 1 and plain.patch_resampler is None
    with pytest.raises(ValueError, match="This adapter reads no patch tokens"):
        plain.resample_patches(torch.randn(1, 4, 6))
    adapter = patch_adapter()
    assert adapter.tokens_per_image == 4
    patches = torch.randn(2, 5, 6)
    out = adapter.resample_patches(patches)
    assert out.shape == (2, 3, HIDDEN)
    # Each image is read on its own: the batch gives the single-image results.
    torch.testing.assert_close(out[1:], adapter.resample_patches(patches[1:]))
    adapter.save_pretrained(tmp_path)
    loaded = MultimodalAdapter.from_pretrained(tmp_path)
    assert loaded.tokens_per_image == 4 and torch.equal(loaded.resample_patches(patches), out)
    with pytest.raises(ValueError, match=r"`patch_tokens` must have patch_embed_dim 6 as its last dimension"):
        adapter.resample_patches(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"`patch_tokens` must have shape \(num_images, num_patches, 6\)"):
        adapter.resample_patches(torch.randn(5, 6))


def test_injection_with_patches_fills_the_image_tokens_in_order(setup):
    tokenizer, llm, _, token_ids = setup
    adapter = patch_adapter(tokens=2)
    # An audio (1 token), an image with patches (1 + 2 tokens), an image without (1 token).
    ids = tokenizer("a <video> b <video><video><video> c <video>", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    embeds = llm.get_input_embeddings()(input_ids)
    vectors = [media(3, seed=1)]
    patches = torch.randn(5, 6)
    out = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, image_patches=[[None, patches, None]])
    positions = (input_ids[0] == token_ids.video).nonzero().flatten().tolist()
    projected, resampled = adapter.project(vectors[0]), adapter.resample_patches(patches[None])[0]
    expected = [projected[0], projected[1], resampled[0], resampled[1], projected[2]]
    assert len(positions) == len(expected)
    for position, vector in zip(positions, expected):
        torch.testing.assert_close(out[0, position], embeds[0, position] + vector)
    others = [p for p in range(len(ids)) if p not in positions]
    assert torch.equal(out[0, others], embeds[0, others])
    # Without patches the same media take one token each: the count is checked and named.
    with pytest.raises(ValueError, match=r"Prompt 0 contains 5 <video> tokens but `media_embeds\[0\]` has 3 embeddings"):
        inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video)
    short = torch.tensor([tokenizer("a <video> b <video> c <video>", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match=r"contains 3 <video> tokens but its media need 5 .* takes 3\)"):
        inject_media_embeds(
            llm.get_input_embeddings()(short), short, vectors, adapter, token_ids.video,
            image_patches=[[None, patches, None]],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"`image_patches` must be a list with one entry .* per prompt \(1\)"):
        inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, image_patches=[])
    with pytest.raises(ValueError, match=r"`image_patches\[0\]` must be a list with one entry .* per medium"):
        inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, image_patches=[[patches]])
    with pytest.raises(ValueError, match=r"`image_patches\[0\]\[1\]` must be a \(num_patches, 6\) tensor"):
        inject_media_embeds(
            embeds, input_ids, vectors, adapter, token_ids.video, image_patches=[[None, torch.randn(5, 7), None]]
        )
    plain = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=r"`image_patches\[0\]\[1\]` is given but the adapter reads no patch"):
        inject_media_embeds(embeds, input_ids, vectors, plain, token_ids.video, image_patches=[[None, patches, None]])


def test_expand_media_tokens():
    text = "put <video> next to <video>, please"
    assert expand_media_tokens(text, [1, 1]) == text
    assert expand_media_tokens(text, [3, 1]) == "put <video><video><video> next to <video>, please"
    assert expand_media_tokens("<video>", [2]) == "<video><video>"
    assert expand_media_tokens("no media", []) == "no media"
    with pytest.raises(ValueError, match=r"The text has 2 <video> tokens but 1 token counts were given"):
        expand_media_tokens(text, [1])
    with pytest.raises(ValueError, match=r"Every token count must be a positive integer, got \[0, 1\]"):
        expand_media_tokens(text, [0, 1])


def test_adapter_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    adapter = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, media_embed_norm=12.5)
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MultimodalAdapter.from_pretrained(tmp_path)
    assert loaded.config.embed_dim == EMBED_DIM and loaded.config.llm_hidden_size == HIDDEN
    assert loaded.config.media_embed_norm == 12.5
    original, restored = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].device.type == "cpu"
        assert torch.equal(original[key], restored[key]), key
    e = media(2, seed=5)
    assert torch.equal(adapter.project(e), loaded.project(e))


ATTRIBUTE_CLASSES = [3, 2, 4]


def attribute_adapter(seed: int = 0, **config) -> MultimodalAdapter:
    torch.manual_seed(seed)
    return MultimodalAdapter(
        embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, attribute_classes=ATTRIBUTE_CLASSES, **config
    ).eval()


def random_heads(seed: int = 0, embed_scale: float = 5.0, num_classes=ATTRIBUTE_CLASSES) -> AttributeHeads:
    g = torch.Generator().manual_seed(seed)
    rows = sum(num_classes)
    weight, bias = torch.randn(rows, EMBED_DIM, generator=g), torch.randn(rows, generator=g)
    return AttributeHeads(weight, bias, tuple(num_classes), embed_scale)


def test_attribute_tokens_are_each_fields_distribution_times_its_rows():
    adapter = attribute_adapter()
    assert (adapter.attribute_tokens, adapter.tokens_per_medium, adapter.tokens_per_image) == (3, 4, 4)
    plain = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN)
    assert (plain.attribute_tokens, plain.tokens_per_medium, plain.attribute_reader) == (0, 1, None)
    e = media(5, seed=2)
    assert torch.equal(plain.project_tokens(e), plain.project(e).unsqueeze(1))
    probs = adapter.read_attributes(e)
    assert [p.shape for p in probs] == [(5, 3), (5, 2), (5, 4)]
    for p in probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(5))
    # By hand: logits of the norm-20 vector, a softmax per field, each field's own rows of the embedding table.
    logits = adapter.attribute_reader(rescale_to_norm(e, 20.0))
    tokens = adapter.project_tokens(e)
    assert tokens.shape == (5, 4, HIDDEN)
    torch.testing.assert_close(tokens[:, 0], adapter.project(e))
    table = adapter.attribute_embedding.weight
    torch.testing.assert_close(tokens[:, 1], logits[:, :3].softmax(-1) @ table[:3])
    torch.testing.assert_close(tokens[:, 2], logits[:, 3:5].softmax(-1) @ table[3:5])
    torch.testing.assert_close(tokens[:, 3], logits[:, 5:].softmax(-1) @ table[5:])
    # The norm of the input does not matter (it is rescaled), and each medium is read on its own.
    torch.testing.assert_close(adapter.project_tokens(e * 7.0), tokens)
    torch.testing.assert_close(adapter.project_tokens(e[2:3]), tokens[2:3])
    with pytest.raises(ValueError, match="This adapter reads no attributes"):
        plain.read_attributes(e)
    with pytest.raises(ValueError, match="`media_embeds` must have embed_dim 8 as its last dimension"):
        adapter.read_attributes(torch.randn(2, 9))
    # With patch tokens too, an image takes the pooled token, the fields, then the patches.
    both = attribute_adapter(image_patch_tokens=2, patch_embed_dim=6, resampler_hidden_size=16, resampler_heads=2)
    assert (both.tokens_per_medium, both.tokens_per_image) == (4, 6)


def test_attribute_token_groups_sum_their_fields_tokens_and_round_trip(tmp_path):
    fields = attribute_adapter()
    grouped = attribute_adapter(attribute_token_groups=[[0, 2], [1]])
    grouped.load_state_dict(fields.state_dict())  # the same modules: grouping adds no weights
    assert (grouped.attribute_tokens, grouped.tokens_per_medium, grouped.tokens_per_image) == (2, 3, 3)
    e = media(4, seed=3)
    tokens, separate = grouped.project_tokens(e), fields.project_tokens(e)
    assert tokens.shape == (4, 3, HIDDEN)
    # The pooled token first, then the groups in their order, each the sum of its fields' tokens.
    assert torch.equal(tokens[:, 0], separate[:, 0])
    torch.testing.assert_close(tokens[:, 1], separate[:, 1] + separate[:, 3])
    torch.testing.assert_close(tokens[:, 2], separate[:, 2])
    grouped.save_pretrained(tmp_path / "adapter")
    loaded = MultimodalAdapter.from_pretrained(tmp_path / "adapter").eval()
    assert loaded.config.attribute_token_groups == [[0, 2], [1]]
    assert torch.equal(loaded.project_tokens(e), tokens)


@pytest.mark.parametrize(
    "groups, match",
    [
        ([[0], [1]], r"each field in exactly one group; got \[\[0\], \[1\]\]"),
        ([[0, 1], [1, 2]], "each field in exactly one group"),
        ([[0], [1, 2, 3]], "each field in exactly one group"),
        ([[0], [], [1, 2]], r"into non-empty lists, e.g. \[\[0\], \[1, 2\]\]"),
        ([], "into non-empty lists, e.g."),
        ([[0], [1, 2.0]], "into non-empty lists, e.g."),
        ([[True], [1, 2]], "into non-empty lists, e.g."),
        ("0,1,2", "into non-empty lists, e.g."),
    ],
)
def test_attribute_token_groups_errors(groups, match):
    with pytest.raises(ValueError, match=r"`attribute_token_groups` must be a partition of the 3 attribute fields"):
        attribute_adapter(attribute_token_groups=groups)
    with pytest.raises(ValueError, match=match):
        attribute_adapter(attribute_token_groups=groups)


def test_attribute_token_groups_need_attribute_classes():
    with pytest.raises(ValueError, match="`attribute_token_groups` groups attribute fields: it needs `attribute_clas"):
        MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, attribute_token_groups=[[0]])


@pytest.mark.parametrize("classes", [[], [3, 1], [3, 2.0], [True, 3], (), "3,2"])
def test_attribute_classes_errors(classes):
    with pytest.raises(ValueError, match=r"`attribute_classes` must be a non-empty list of class counts \(integers"):
        MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, attribute_classes=classes)



def test_media_position_embeddings_mark_every_token_of_each_medium_by_its_place(setup, tmp_path):
    tokenizer, llm, _, token_ids = setup
    torch.manual_seed(3)
    adapter = attribute_adapter(max_media_positions=3)
    assert adapter.media_position_embedding.weight.shape == (3, HIDDEN)
    # A new table is zero, so the adapter starts as one without it.
    assert torch.equal(adapter.media_position_embedding.weight, torch.zeros(3, HIDDEN))
    with torch.no_grad():
        adapter.media_position_embedding.weight.normal_()
    # Two rows: three media (1 pooled + 3 attribute tokens each), then one.
    rows = ["a " + " b ".join(["<video>" * 4] * 3), "a " + "<video>" * 4 + " b"]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    embeds = llm.get_input_embeddings()(input_ids)
    vectors = [media(3, seed=8), media(1, seed=9)]
    out = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video)
    places = adapter.media_position_embedding.weight
    for i, row_vectors in enumerate(vectors):
        positions = (input_ids[i] == token_ids.video).nonzero().flatten().tolist()
        tokens = adapter.project_tokens(row_vectors)
        for k in range(row_vectors.shape[0]):
            for j in range(4):
                p = positions[4 * k + j]
                torch.testing.assert_close(out[i, p], embeds[i, p] + tokens[k, j] + places[k])
        others = [p for p in range(width) if p not in positions]
        assert torch.equal(out[i, others], embeds[i, others])
    # Gradients reach every row of the table the batch uses (all three here); a zero table can therefore learn.
    out.sum().backward()
    grad = adapter.media_position_embedding.weight.grad
    assert (grad.abs().sum(dim=-1) > 0).all()
    # Saved and loaded exactly, config included.
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = MultimodalAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.max_media_positions == 3
    assert torch.equal(loaded.media_position_embedding.weight, adapter.media_position_embedding.weight)
    # More media than places: refused before anything is projected.
    four = "a " + " b ".join(["<video>" * 4] * 4)
    four_ids = torch.tensor([tokenizer(four, add_special_tokens=False)["input_ids"]])
    four_embeds = llm.get_input_embeddings()(four_ids)
    with pytest.raises(ValueError, match=r"Prompt 0 has 4 media .*\(`max_media_positions`\) have places for 3"):
        inject_media_embeds(four_embeds, four_ids, [media(4, seed=1)], adapter, token_ids.video)
    # Without the table nothing is added.
    plain = attribute_adapter()
    assert plain.media_position_embedding is None and plain.config.max_media_positions == 0


@pytest.mark.parametrize("places", [-1, 1.5, True, "2"])
def test_max_media_positions_errors(places):
    with pytest.raises(ValueError, match=r"`max_media_positions` must be a non-negative integer"):
        MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, max_media_positions=places)


def word_ids_for(tokenizer, words: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(w) if w else -1 for w in words]


# One word per class of ATTRIBUTE_CLASSES [3, 2, 4]; "" is a class no word names (an empty slot).
CLASS_WORDS = ["red", "blue", "cat", "", "dog", "", "a", "cat", "red"]


def test_attribute_word_tokens_add_the_llms_own_word_embeddings(setup, tmp_path):
    tokenizer, llm, _, token_ids = setup
    ids = word_ids_for(tokenizer, CLASS_WORDS)
    assert all(i > 2 for i, w in zip(ids, CLASS_WORDS) if w)  # every word is a known token
    adapter = attribute_adapter(attribute_word_ids=ids)
    assert adapter.ties_attribute_words and not attribute_adapter().ties_attribute_words
    # The learned rows start at a new LLM's word scale (std 0.02), not nn.Embedding's 1, so the words are not drowned.
    assert adapter.attribute_embedding.weight.std() < 0.03 < attribute_adapter().attribute_embedding.weight.std()
    words = llm.get_input_embeddings().weight.detach().clone().requires_grad_(True)
    word_rows = adapter.attribute_word_rows(words)
    assert word_rows.shape == (9, HIDDEN)
    for k, (i, w) in enumerate(zip(ids, CLASS_WORDS)):
        assert torch.equal(word_rows[k], words[i] if w else torch.zeros(HIDDEN))
    # By hand: each field's distribution times (its rows + its words' embeddings).
    e = media(4, seed=6)
    tokens = adapter.project_tokens(e, word_embeddings=words)
    probs = adapter.read_attributes(e)
    table = adapter.attribute_embedding.weight + word_rows
    torch.testing.assert_close(tokens[:, 0], adapter.project(e))
    for field, (start, stop) in enumerate([(0, 3), (3, 5), (5, 9)]):
        torch.testing.assert_close(tokens[:, 1 + field], probs[field] @ table[start:stop])
    # The LLM's words train through the attribute tokens: only the rows of class words get a gradient.
    tokens.sum().backward()
    named = sorted({i for i in ids if i >= 0})
    assert (words.grad[named].abs().sum(-1) > 0).all()
    others = [i for i in range(words.shape[0]) if i not in named]
    assert torch.equal(words.grad[others], torch.zeros(len(others), HIDDEN))
    # inject_media_embeds and prepare_multimodal_inputs put exactly those tokens at the <video> positions.
    prompt = build_vicuna_prompt("add " + "<video>" * 4 + " to the cat")
    embeds, _, input_ids = prepare_multimodal_inputs(llm, tokenizer, adapter, [prompt], [e[:1]], token_ids)
    positions = (input_ids[0] == token_ids.video).nonzero().flatten()
    plain = llm.get_input_embeddings()(input_ids)
    with torch.no_grad():
        expected = adapter.project_tokens(e[:1], word_embeddings=llm.get_input_embeddings().weight)[0]
    torch.testing.assert_close(embeds[0, positions] - plain[0, positions], expected)
    # Saved and loaded exactly, word ids included.
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = MultimodalAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.attribute_word_ids == ids
    reloaded = loaded.project_tokens(e, word_embeddings=words)
    assert torch.equal(reloaded, adapter.project_tokens(e, word_embeddings=words))


def test_attribute_word_tokens_errors(setup):
    tokenizer, llm, _, token_ids = setup
    ids = word_ids_for(tokenizer, CLASS_WORDS)
    adapter = attribute_adapter(attribute_word_ids=ids)
    words = llm.get_input_embeddings().weight
    e = media(2, seed=1)
    with pytest.raises(TypeError, match="pass `word_embeddings`, the LLM's input embedding matrix"):
        adapter.project_tokens(e)
    with pytest.raises(ValueError, match=r"`word_embeddings` must be the LLM's \(vocab_size, 32\) floating-point"):
        adapter.project_tokens(e, word_embeddings=words[:, :5])
    with pytest.raises(ValueError, match=r"reach token id \d+ but `word_embeddings` has only 3 rows"):
        adapter.project_tokens(e, word_embeddings=words[:3])
    with pytest.raises(ValueError, match="attribute tokens hold no words"):
        attribute_adapter().attribute_word_rows(words)
    # inject_media_embeds refuses before projecting anything.
    input_ids = torch.tensor([tokenizer("a " + "<video>" * 4, add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match=r"pass `word_embeddings`, the LLM's input embedding matrix \(`llm.get_input"):
        inject_media_embeds(llm.get_input_embeddings()(input_ids), input_ids, [e[:1]], adapter, token_ids.video)
    with pytest.raises(ValueError, match="`attribute_word_ids` names the words of attribute classes: it needs"):
        MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN, attribute_word_ids=ids)


@pytest.mark.parametrize("ids", [[1] * 8, [1] * 10, [1] * 8 + [-2], [1] * 8 + [True], [1] * 8 + [1.0], "1,2"])
def test_attribute_word_ids_must_name_one_token_per_class(ids):
    with pytest.raises(ValueError, match=r"`attribute_word_ids` must be a list of 9 token ids \(integers >= 0, or -1"):
        attribute_adapter(attribute_word_ids=ids)


def test_attribute_reader_loads_heads_at_their_scale_and_freezes(tmp_path):
    heads = random_heads(embed_scale=5.0)
    adapter = attribute_adapter()
    adapter.load_attribute_reader(heads)
    assert not any(p.requires_grad for p in adapter.attribute_reader.parameters())
    assert adapter.attribute_embedding.weight.requires_grad and adapter.input_projector[0].weight.requires_grad
    e = media(4, seed=3)
    # The adapter reads the norm-20 vector; the heads were trained on norm 5: the same logits, the same softmax.
    expected = [field.softmax(-1) for field in heads.logits(e)]
    for got, want in zip(adapter.read_attributes(e), expected):
        torch.testing.assert_close(got, want)
    by_hand = rescale_to_norm(e, 5.0) @ heads.weight.T + heads.bias
    torch.testing.assert_close(torch.cat(heads.logits(e), -1), by_hand)
    # Saved and loaded with the pipeline component: bit-exact.
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = MultimodalAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.attribute_classes == ATTRIBUTE_CLASSES
    assert torch.equal(loaded.project_tokens(e), adapter.project_tokens(e))
    # The heads file round-trips exactly.
    heads.save(str(tmp_path / ATTRIBUTE_HEADS_FILE))
    again = AttributeHeads.load(str(tmp_path / ATTRIBUTE_HEADS_FILE))
    assert torch.equal(again.weight, heads.weight) and torch.equal(again.bias, heads.bias)
    assert (again.num_classes, again.embed_scale) == ((3, 2, 4), 5.0)


def test_attribute_reader_errors(tmp_path):
    adapter = attribute_adapter()
    before = adapter.attribute_reader.weight.clone()
    with pytest.raises(ValueError, match="This adapter reads no attributes"):
        MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN).load_attribute_reader(random_heads())
    with pytest.raises(TypeError, match="`heads` must be an AttributeHeads, got dict"):
        adapter.load_attribute_reader({})
    with pytest.raises(ValueError, match=r"The heads read fields of \(3, 4, 2\) classes but the adapter's"):
        adapter.load_attribute_reader(random_heads(num_classes=[3, 4, 2]))
    wide = AttributeHeads(torch.randn(9, EMBED_DIM + 1), torch.randn(9), (3, 2, 4), 5.0)
    with pytest.raises(ValueError, match="The heads read 9-d embeddings but the adapter's `embed_dim` is 8"):
        adapter.load_attribute_reader(wide)
    for scale in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="`heads.embed_scale` must be a positive number"):
            adapter.load_attribute_reader(random_heads(embed_scale=scale))
    assert torch.equal(adapter.attribute_reader.weight, before)  # nothing loaded by the failed calls
    assert adapter.attribute_reader.weight.requires_grad
    with pytest.raises(ValueError, match="No attribute heads file at"):
        AttributeHeads.load(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(9, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="is not an attribute heads file: it needs tensors `weight` and `bias`"):
        AttributeHeads.load(str(tmp_path / "bad.safetensors"))
    save_file(
        {"weight": torch.zeros(8, 8), "bias": torch.zeros(8)}, str(tmp_path / "rows.safetensors"),
        metadata={"num_classes": "3,2,4", "embed_scale": "5.0"},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"do not match num_classes \(3, 2, 4\) \(sum 9 rows\)"):
        AttributeHeads.load(str(tmp_path / "rows.safetensors"))
    save_file(
        {"weight": torch.zeros(9, 8), "bias": torch.zeros(9)}, str(tmp_path / "meta.safetensors"),
        metadata={"num_classes": "3,two,4", "embed_scale": "5.0"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="unreadable metadata"):
        AttributeHeads.load(str(tmp_path / "meta.safetensors"))


def test_class_permutation_renames_each_mediums_classes_before_they_become_tokens():
    adapter = attribute_adapter()
    e = media(3, seed=7)
    identity = torch.arange(9).expand(3, 9).clone()
    assert torch.equal(adapter.project_tokens(e, class_permutation=identity), adapter.project_tokens(e))
    # Medium 0 swaps classes 0 and 2 of field 0, medium 2 reverses field 2 (classes 5..8); medium 1 stays.
    permutation = identity.clone()
    permutation[0, [0, 2]] = torch.tensor([2, 0])
    permutation[2, 5:] = torch.tensor([8, 7, 6, 5])
    tokens = adapter.project_tokens(e, class_permutation=permutation)
    probs = torch.cat(adapter.read_attributes(e), dim=-1)
    table = adapter.attribute_embedding.weight
    renamed = torch.stack([probs[i, permutation[i]] for i in range(3)])
    torch.testing.assert_close(tokens[:, 0], adapter.project(e))  # the pooled token is untouched
    torch.testing.assert_close(tokens[:, 1], renamed[:, :3] @ table[:3])
    torch.testing.assert_close(tokens[:, 3], renamed[:, 5:] @ table[5:])
    torch.testing.assert_close(tokens[0, 1], probs[0, [2, 1, 0]] @ table[:3])
    assert torch.equal(tokens[1], adapter.project_tokens(e)[1])
    plain = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=r"`class_permutation` needs an adapter with attribute tokens"):
        plain.project_tokens(e, class_permutation=identity)
    for bad in (identity[:2], identity.float(), identity[:, :8], [list(range(9))] * 3):
        with pytest.raises(ValueError, match=r"`class_permutation` must be a long tensor of shape \(3, 9\)"):
            adapter.project_tokens(e, class_permutation=bad)
    across = identity.clone()
    across[1, [2, 3]] = torch.tensor([3, 2])  # class 2 of field 0 and class 0 of field 1 trade places
    repeated = identity.clone()
    repeated[0, 1] = 0
    for bad in (across, repeated):
        with pytest.raises(ValueError, match="must permute the classes within each attribute field"):
            adapter.project_tokens(e, class_permutation=bad)


def test_injection_passes_each_mediums_class_permutation(setup):
    tokenizer, llm, _, token_ids = setup
    adapter = attribute_adapter()
    ids = tokenizer("a " + "<video>" * 4 + " b " + "<video>" * 4, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    embeds = llm.get_input_embeddings()(input_ids)
    vectors = [media(2, seed=8)]
    permutation = torch.arange(9).expand(2, 9).clone()
    permutation[1, 3:5] = torch.tensor([4, 3])
    out = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, class_permutation=permutation)
    tokens = adapter.project_tokens(vectors[0], class_permutation=permutation)
    positions = (input_ids[0] == token_ids.video).nonzero().flatten().tolist()
    for position, vector in zip(positions, [*tokens[0], *tokens[1]]):
        torch.testing.assert_close(out[0, position], embeds[0, position] + vector)
    plain = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video)
    assert torch.equal(out[0, positions[:6]], plain[0, positions[:6]])  # medium 0 and medium 1's first field
    assert not torch.equal(out[0, positions[6]], plain[0, positions[6]])


def test_attribute_heads_class_names_round_trip_and_errors(tmp_path):
    names = (("plain", "striped", "dotted"), ("", "circle"), ("", "red", "green", "blue"))
    heads = random_heads()
    named = AttributeHeads(heads.weight, heads.bias, heads.num_classes, heads.embed_scale, class_names=names)
    named.save(str(tmp_path / "named.safetensors"))
    heads.save(str(tmp_path / "plain.safetensors"))
    assert AttributeHeads.load(str(tmp_path / "named.safetensors")).class_names == names
    assert AttributeHeads.load(str(tmp_path / "plain.safetensors")).class_names is None
    for bad in (names[:2], (names[0], ("", "circle", "star"), names[2]), (names[0], ("", 3), names[2])):
        with pytest.raises(ValueError, match=r"`class_names` must give one string per class of each field"):
            AttributeHeads(heads.weight, heads.bias, heads.num_classes, heads.embed_scale, class_names=bad)
    from safetensors.torch import save_file

    save_file(
        {"weight": heads.weight, "bias": heads.bias}, str(tmp_path / "short.safetensors"),
        metadata={"num_classes": "3,2,4", "embed_scale": "5.0", "class_names": '[["a", "b", "c"]]'},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"short.safetensors: `class_names` must give one string per class"):
        AttributeHeads.load(str(tmp_path / "short.safetensors"))


def test_injection_with_attribute_tokens_fills_every_medium_in_order(setup):
    tokenizer, llm, _, token_ids = setup
    adapter = attribute_adapter(image_patch_tokens=1, patch_embed_dim=6, resampler_hidden_size=16, resampler_heads=2)
    # Two media of 1 + 3 tokens, the second an image with patches: 1 + 3 + 1.
    ids = tokenizer("a " + "<video>" * 4 + " b " + "<video>" * 5 + " c", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    embeds = llm.get_input_embeddings()(input_ids)
    vectors, patches = [media(2, seed=4)], torch.randn(5, 6)
    out = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, image_patches=[[None, patches]])
    tokens, resampled = adapter.project_tokens(vectors[0]), adapter.resample_patches(patches[None])[0]
    expected = [*tokens[0], *tokens[1], resampled[0]]
    positions = (input_ids[0] == token_ids.video).nonzero().flatten().tolist()
    assert len(positions) == len(expected) == 9
    for position, vector in zip(positions, expected):
        torch.testing.assert_close(out[0, position], embeds[0, position] + vector)
    others = [p for p in range(len(ids)) if p not in positions]
    assert torch.equal(out[0, others], embeds[0, others])
    expected_error = r"contains 9 <video> tokens but `media_embeds\[0\]` has 2 embeddings and each takes 4 \(the pooled"
    with pytest.raises(ValueError, match=expected_error + r" vector and 3 attribute tokens\)"):
        inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video)


def test_injection_leaves_out_the_pooled_vectors_flagged_and_keeps_the_rest(setup):
    tokenizer, llm, _, token_ids = setup
    adapter = attribute_adapter()
    # Two rows: one medium, then two media, each 1 pooled + 3 attribute tokens.
    rows = ["a " + "<video>" * 4 + " b", "a " + "<video>" * 4 + " b " + "<video>" * 4]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    embeds = llm.get_input_embeddings()(input_ids)
    original = embeds.clone()
    vectors = [media(1, seed=5), media(2, seed=6)]
    drop = torch.tensor([True, False, True])
    out = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, drop_pooled=drop)
    full = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video)
    assert torch.equal(embeds, original)
    positions = [(input_ids[i] == token_ids.video).nonzero().flatten().tolist() for i in range(2)]
    dropped_at = {(0, positions[0][0]), (1, positions[1][4])}  # the first token of media 0 and 2
    for i in range(2):
        for position in range(input_ids.shape[1]):
            if (i, position) in dropped_at:
                assert torch.equal(out[i, position], embeds[i, position])
                assert not torch.equal(full[i, position], embeds[i, position])
            else:
                assert torch.equal(out[i, position], full[i, position])
    nothing = inject_media_embeds(embeds, input_ids, vectors, adapter, token_ids.video, drop_pooled=torch.zeros(3) > 0)
    assert torch.equal(nothing, full)


def test_drop_pooled_errors(setup):
    tokenizer, llm, adapter, token_ids = setup
    input_ids = torch.tensor([tokenizer("a <video> b", add_special_tokens=False)["input_ids"]])
    embeds = llm.get_input_embeddings()(input_ids)
    with pytest.raises(ValueError, match=r"`drop_pooled` needs an adapter with attribute tokens"):
        inject_media_embeds(
            embeds, input_ids, [media(1, seed=0)], adapter, token_ids.video, drop_pooled=torch.tensor([True])
        )
    ids = torch.tensor([tokenizer("a " + "<video>" * 4, add_special_tokens=False)["input_ids"]])
    embeds = llm.get_input_embeddings()(ids)
    for bad in (torch.tensor([1]), torch.tensor([True, False]), [True]):
        with pytest.raises(ValueError, match=r"`drop_pooled` must be a boolean tensor of shape \(1,\)"):
            inject_media_embeds(embeds, ids, [media(1, seed=0)], attribute_adapter(), token_ids.video, drop_pooled=bad)


# ----------------------------------------------------------------------------------------------- tokens


def test_special_tokens_official_order_idempotent_and_resized():
    tokenizer = make_tokenizer()
    base_vocab = len(tokenizer)
    llm = make_llm(base_vocab)
    assert tokenizer.pad_token is None
    with pytest.raises(ValueError, match=re.escape(str(list(MULTIMODAL_SPECIAL_TOKENS)))):
        get_multimodal_token_ids(tokenizer)

    ids = add_multimodal_tokens(tokenizer, llm)
    assert MULTIMODAL_SPECIAL_TOKENS == (
        "<im_gen_start>", "<im_gen>", "<mask_gen>", "<audio_gen>", "<audio_gen_start>",
        "<audio>", "<video>", "<base>", "<base_null>",
    )
    assert ids.special_token_ids == tuple(range(base_vocab, base_vocab + 9))
    assert (ids.im_gen_start, ids.video, ids.base_null) == (base_vocab, base_vocab + 6, base_vocab + 8)
    assert (ids.eos, ids.bos, ids.pad) == (2, 1, 0)
    assert tokenizer.pad_token == "<unk>"
    assert llm.get_input_embeddings().weight.shape == (base_vocab + 9, HIDDEN)
    assert llm.get_output_embeddings().weight.shape == (base_vocab + 9, HIDDEN)
    # The tokens are atomic for the tokenizer.
    assert tokenizer("cat<video>dog", add_special_tokens=False)["input_ids"][1] == ids.video

    embeddings = llm.get_input_embeddings().weight.detach().clone()
    again = add_multimodal_tokens(tokenizer, llm)
    assert again == ids == get_multimodal_token_ids(tokenizer)
    assert len(tokenizer) == base_vocab + 9
    assert torch.equal(llm.get_input_embeddings().weight, embeddings)


def test_special_tokens_partially_present_and_existing_pad():
    tokenizer = make_tokenizer()
    base_vocab = len(tokenizer)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    tokenizer.pad_token = "</s>"
    ids = add_multimodal_tokens(tokenizer)
    assert ids.video == base_vocab
    others = [i for i in ids.special_token_ids if i != ids.video]
    assert others == list(range(base_vocab + 1, base_vocab + 9))
    assert ids.pad == 2 and tokenizer.pad_token == "</s>"


def test_token_errors(setup):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<video>", "<base>"], special_tokens=True)
    with pytest.raises(ValueError, match=r"lacks the multimodal special tokens \['<im_gen_start>', '<im_gen>'"):
        get_multimodal_token_ids(tokenizer)
    with pytest.raises(TypeError, match="`tokenizer` must be a transformers tokenizer"):
        get_multimodal_token_ids("not a tokenizer")
    with pytest.raises(TypeError, match="`llm` must be a transformers causal LM"):
        add_multimodal_tokens(make_tokenizer(), llm=torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------- prompt


def test_vicuna_prompt_exact():
    assert build_vicuna_prompt("add <video> to <video>") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: add <video> to <video> ASSISTANT:"
    )
    answer = "<base><video><im_gen_start><im_gen>[a red cat]<video>"
    full = build_vicuna_prompt("add <video> to <video>", answer)
    assert full == build_vicuna_prompt("add <video> to <video>") + " " + answer + "</s>"
    assert build_vicuna_prompt("x", "y", eos_token="<|endoftext|>").endswith(" ASSISTANT: y<|endoftext|>")
    with pytest.raises(TypeError, match="`instruction` must be a str"):
        build_vicuna_prompt(None)
    with pytest.raises(TypeError, match="`answer` must be a str or None"):
        build_vicuna_prompt("x", answer=3)
    with pytest.raises(TypeError, match="`eos_token` must be a str"):
        build_vicuna_prompt("x", "y", eos_token=None)


# ----------------------------------------------------------------------------------------------- injection


def test_injection_only_at_video_positions_in_order(setup):
    tokenizer, llm, adapter, ids = setup
    prompt = build_vicuna_prompt("add <video> to <video> .")
    e = media(2, seed=0)
    e_before = e.clone()
    inputs_embeds, attention_mask, input_ids = prepare_multimodal_inputs(llm, tokenizer, adapter, [prompt], [e], ids)

    expected_ids = [ids.bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert input_ids[0].tolist() == expected_ids
    assert attention_mask.tolist() == [[1] * len(expected_ids)]
    plain = llm.get_input_embeddings()(input_ids)
    video = (input_ids[0] == ids.video).nonzero().flatten().tolist()
    assert len(video) == 2
    others = [p for p in range(input_ids.shape[1]) if p not in video]
    assert torch.equal(inputs_embeds[0, others], plain[0, others])
    rescaled = e / (e.norm(dim=-1, keepdim=True) + 1e-9) * 20
    projected = adapter.input_projector(rescaled)
    for k, position in enumerate(video):
        assert torch.allclose(inputs_embeds[0, position], plain[0, position] + projected[k], atol=1e-6)
    assert not torch.allclose(projected[0], projected[1])
    assert torch.equal(e, e_before)


def test_inject_media_embeds_prompt_lengths_skips_answer_videos(setup):
    tokenizer, llm, adapter, ids = setup
    text = build_vicuna_prompt("add <video> .", "<base><video><im_gen>[ cat ]<video>")
    input_ids = torch.tensor([[ids.bos] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    prompt_length = 1 + len(tokenizer(build_vicuna_prompt("add <video> ."), add_special_tokens=False)["input_ids"])
    plain = llm.get_input_embeddings()(input_ids)
    e = media(1, seed=1)
    out = inject_media_embeds(plain, input_ids, [e], adapter, ids.video, prompt_lengths=[prompt_length])
    video = (input_ids[0] == ids.video).nonzero().flatten().tolist()
    assert len(video) == 3 and video[0] < prompt_length <= video[1]
    changed = (out != plain).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [video[0]]
    with pytest.raises(ValueError, match=r"Prompt 0 contains 3 <video> tokens but `media_embeds\[0\]` has 1"):
        inject_media_embeds(plain, input_ids, [e], adapter, ids.video)
    with pytest.raises(ValueError, match="`prompt_lengths` has 2 entries but the batch has 1 rows"):
        inject_media_embeds(plain, input_ids, [e], adapter, ids.video, prompt_lengths=[3, 4])
    with pytest.raises(ValueError, match="`input_ids` must be a tensor of shape"):
        inject_media_embeds(plain, input_ids[:, 1:], [e], adapter, ids.video)
    with pytest.raises(ValueError, match="`inputs_embeds` must be a"):
        inject_media_embeds(plain[0], input_ids, [e], adapter, ids.video)


def test_prepare_multimodal_inputs_errors(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video> to <video>"), build_vicuna_prompt("remove the cat")]
    with pytest.raises(ValueError, match=r"Prompt 0 contains 2 <video> tokens but `media_embeds\[0\]` has 1 embed"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [media(1, 0), media(0, 0)], ids)
    with pytest.raises(ValueError, match=r"Prompt 1 contains 0 <video> tokens but `media_embeds\[1\]` has 1 embed"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [media(2, 0), media(1, 0)], ids)
    with pytest.raises(ValueError, match=r"`media_embeds\[0\]` must have shape \(n_0, 8\) \(the adapter"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [torch.randn(2, 5), media(0, 0)], ids)
    with pytest.raises(ValueError, match=r"`media_embeds\[0\]` must have shape"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [torch.randn(EMBED_DIM), media(0, 0)], ids)
    with pytest.raises(ValueError, match="`media_embeds` has 1 entries but there are 2 prompts"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [media(2, 0)], ids)
    with pytest.raises(TypeError, match="`media_embeds` must be a list"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, media(2, 0), ids)
    with pytest.raises(TypeError, match=r"`media_embeds\[1\]` must be a torch.Tensor"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [media(2, 0), None], ids)
    with pytest.raises(TypeError, match="`prompts` must be a non-empty list of strings"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, [], [], ids)
    with pytest.raises(TypeError, match="`prompts` must be a non-empty list of strings"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, "add <video>", [media(1, 0)], ids)
    with pytest.raises(TypeError, match="`adapter` must be a MultimodalAdapter"):
        prepare_multimodal_inputs(llm, tokenizer, torch.nn.Linear(2, 2), prompts, [media(2, 0), media(0, 0)], ids)
    with pytest.raises(TypeError, match="`token_ids` must be a MultimodalTokenIds"):
        prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, [media(2, 0), media(0, 0)], {"video": 1})
    wide = MultimodalAdapter(embed_dim=EMBED_DIM, llm_hidden_size=HIDDEN * 2)
    with pytest.raises(ValueError, match="LLM's hidden size is 32 but the adapter's `llm_hidden_size` is 64"):
        prepare_multimodal_inputs(llm, tokenizer, wide, prompts, [media(2, 0), media(0, 0)], ids)
    # A tokenizer prepared without resizing its LLM.
    fresh_tokenizer = make_tokenizer()
    small_llm = make_llm(len(fresh_tokenizer))
    fresh_ids = add_multimodal_tokens(fresh_tokenizer)
    with pytest.raises(ValueError, match="Token id 49 is out of range for the LLM.s 43 input embeddings"):
        prepare_multimodal_inputs(small_llm, fresh_tokenizer, adapter, prompts[:1], [media(2, 0)], fresh_ids)


# ----------------------------------------------------------------------------------------------- read-out


def test_find_embedding_positions_rule():
    ids = MultimodalTokenIds(*range(100, 109), eos=2, pad=0, bos=1)
    v, base, im_gen, base_null = ids.video, ids.base, ids.im_gen, ids.base_null
    # prompt: [1, v, 5] | answer: base v 7 im_gen 8 9 v v </s> 0
    sequence = [1, v, 5, base, v, 7, im_gen, 8, 9, v, v, 2, 0]
    assert find_embedding_positions(sequence, ids, start=3) == EmbeddingPositions(base=3, generation=8)
    assert find_embedding_positions(torch.tensor(sequence), ids, start=3) == EmbeddingPositions(base=3, generation=8)
    # The generation <video> follows the LAST <im_gen>.
    assert find_embedding_positions([5, im_gen, v, im_gen, 8, v], ids, start=1).generation == 4
    # No <im_gen>, or nothing after it, or only after </s>: no generation embedding.
    assert find_embedding_positions([5, base, v, 8, v], ids).generation is None
    assert find_embedding_positions([5, base, v, im_gen, 8, 2, v], ids) == EmbeddingPositions(base=1, generation=None)
    # <base_null>, or <base> not followed by <video>: no base embedding.
    assert find_embedding_positions([5, base_null, im_gen, 8, v], ids) == EmbeddingPositions(base=None, generation=3)
    assert find_embedding_positions([5, base, 8, v], ids).base is None
    # Index 0 can hold the <im_gen> (generation: [last prompt token] + new tokens); a lone <video> is no target.
    assert find_embedding_positions([im_gen, v], ids).generation == 0
    assert find_embedding_positions([v], ids).generation is None
    with pytest.raises(ValueError, match="`token_ids_sequence` must be 1-D"):
        find_embedding_positions(torch.tensor([sequence]), ids)
    with pytest.raises(TypeError, match="`token_ids_sequence` must be a 1-D tensor or list of ints"):
        find_embedding_positions("abc", ids)
    with pytest.raises(ValueError, match="`start` must be a non-negative int"):
        find_embedding_positions(sequence, ids, start=-1)


def test_readout_matches_teacher_forced_forward(setup):
    tokenizer, llm, adapter, ids = setup
    prompt = build_vicuna_prompt("add <video> to <video>")
    e = media(2, seed=4)
    forced = answer_ids(tokenizer, FULL_ANSWER)
    out = generate_with_media(
        llm, tokenizer, adapter, [prompt], [e], ids, do_sample=False, max_new_tokens=20,
        logits_processor=LogitsProcessorList([ForceTokens([forced])]), output_hidden_states=True,
    )
    assert out.sequences[0].tolist() == forced
    assert out.texts == ["<base> <video> <im_gen_start> <im_gen> [ red cat ] <video>"]
    assert out.parsed_answers == [ParsedAnswer(caption="red cat", has_im_gen=True, has_base=True, base_null=False)]

    # Manual forward over prompt (with media) + the answer (plain token embeddings), no cache.
    prompt_embeds, _, prompt_ids = prepare_multimodal_inputs(llm, tokenizer, adapter, [prompt], [e], ids)
    answer = torch.tensor([forced[:-1]])
    embeds = torch.cat([prompt_embeds, llm.get_input_embeddings()(answer)], dim=1)
    with torch.no_grad():
        states = llm.model(inputs_embeds=embeds).last_hidden_state[0]
    n = prompt_ids.shape[1]
    # The state preceding generated token j is the one at sequence index n - 1 + j.
    assert torch.allclose(out.hidden_states[0], states[n - 1 :], atol=1e-5)
    with torch.no_grad():
        # base: <video> is answer token 1 -> state of answer token 0 (<base>); gen: <video> is answer token 8.
        assert torch.allclose(out.base_embeds[0], adapter.predict(states[n + 0]), atol=1e-5)
        assert torch.allclose(out.generation_embeds[0], adapter.predict(states[n + 7]), atol=1e-5)
    assert out.generation_embeds[0].shape == (EMBED_DIM,)


def test_base_null_and_missing_im_gen_give_none(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video>"), build_vicuna_prompt("make <video> red")]
    base_null = answer_ids(tokenizer, ["<base_null>"] + FULL_ANSWER[2:4] + ["[", "cat", "]", "<video>", "</s>"])
    no_gen = answer_ids(tokenizer, ["<base>", "<video>", "[", "dog", "]", "<video>", "</s>"])
    out = generate_with_media(
        llm, tokenizer, adapter, prompts, [media(1, 0), media(1, 1)], ids, do_sample=False, max_new_tokens=12,
        logits_processor=[ForceTokens([base_null, no_gen])],
    )
    assert out.base_embeds[0] is None and out.generation_embeds[0] is not None
    assert out.base_embeds[1] is not None and out.generation_embeds[1] is None
    assert out.parsed_answers[0] == ParsedAnswer(caption="cat", has_im_gen=True, has_base=False, base_null=True)
    assert out.parsed_answers[1] == ParsedAnswer(caption="dog", has_im_gen=False, has_base=True, base_null=False)
    # The shorter row is padded after its </s>; its text stops before </s>.
    assert out.sequences[1].tolist() == no_gen + [ids.pad]
    assert out.texts[1] == "<base> <video> [ dog ] <video>"
    assert out.hidden_states is None


def test_parse_answer():
    assert parse_answer("<base><video><im_gen_start><im_gen>[a red cube]<video> [other]") == ParsedAnswer(
        caption="a red cube", has_im_gen=True, has_base=True, base_null=False
    )
    # An answer that describes its base (train_llm.py --describe_base): the result is the caption after <im_gen>,
    # in the decoded spacing of a word-level tokenizer as well.
    for text in (
        "Sure. <base><video>[a blue cube]<im_gen_start><im_gen>[a red cube]<video>",
        "Sure. <base> <video> [ a blue cube ] <im_gen_start> <im_gen> [ a red cube ] <video>",
    ):
        assert parse_answer(text) == ParsedAnswer(
            caption="a red cube", has_im_gen=True, has_base=True, base_null=False, base_caption="a blue cube"
        )
    # A bracket is a base description only before the generation tokens: otherwise it is the result, as officially.
    assert parse_answer("<base><video>[a blue cube]") == ParsedAnswer(
        caption="a blue cube", has_im_gen=False, has_base=True, base_null=False, base_caption=None
    )
    assert parse_answer("<base><video>[a blue cube] then [a red cube]").caption == "a blue cube"
    assert parse_answer("<base><video>[a blue cube]<im_gen_start>").base_caption == "a blue cube"
    assert parse_answer("<base>[a blue cube]<im_gen>[a red cube]").base_caption is None
    # <im_gen_start> alone is not <im_gen>, <base_null> is not <base>.
    assert parse_answer("<base_null><im_gen_start> no caption") == ParsedAnswer(
        caption=None, has_im_gen=False, has_base=False, base_null=True
    )
    with pytest.raises(TypeError, match="`text` must be a str"):
        parse_answer(None)


def test_parse_answer_reads_the_additions_list():
    # The official format: `additions:{name}:<video>.` after the result, in either decoded spacing.
    for text in (
        "<base><video><im_gen_start><im_gen>[a cat and a dog]<video>additions:red dog:<video>.blue cat:<video>.",
        "<base> <video> <im_gen_start> <im_gen> [ a cat and a dog ] <video> additions : red dog : <video> . blue cat"
        " : <video> .",
    ):
        parsed = parse_answer(text)
        assert parsed.additions == ("red dog", "blue cat") and parsed.caption == "a cat and a dog"
    assert parse_answer("<base><video><im_gen_start><im_gen>[a cat]<video>").additions == ()
    # Only after the result caption: the word in the caption or in a truncated list names nothing.
    assert parse_answer("<im_gen>[additions: dog:<video>.]<video>").additions == ()
    assert parse_answer("<im_gen>[a cat]<video>additions:").additions == ()


# ----------------------------------------------------------------------------------------------- generation


def test_kv_cache_equals_no_cache_greedy(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video> to <video>"), build_vicuna_prompt("remove the cat from <video>")]
    embeds = [media(2, 7), media(1, 8)]
    kwargs = dict(do_sample=False, max_new_tokens=8, output_hidden_states=True)
    cached = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, use_cache=True, **kwargs)
    uncached = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (2, 8)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.texts == uncached.texts
    assert torch.allclose(cached.hidden_states, uncached.hidden_states, atol=1e-5)

    # Same with a forced answer, so that the read-out embeddings exist in both paths.
    forced = answer_ids(tokenizer, FULL_ANSWER)
    results = [
        generate_with_media(
            llm, tokenizer, adapter, prompts[:1], embeds[:1], ids, do_sample=False, max_new_tokens=12,
            use_cache=use_cache, logits_processor=[ForceTokens([forced])],
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert torch.allclose(results[0].generation_embeds[0], results[1].generation_embeds[0], atol=1e-5)
    assert torch.allclose(results[0].base_embeds[0], results[1].base_embeds[0], atol=1e-5)


def test_batch_left_padding_matches_single(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video> to <video> ."), build_vicuna_prompt("make <video> blue")]
    embeds = [media(2, 11), media(1, 12)]
    inputs_embeds, attention_mask, input_ids = prepare_multimodal_inputs(llm, tokenizer, adapter, prompts, embeds, ids)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in prompts]
    assert lengths[0] > lengths[1]
    # Left padding with the pad id, and the BOS right after it.
    pad = lengths[0] - lengths[1]
    assert input_ids[1, :pad].tolist() == [ids.pad] * pad and input_ids[1, pad] == ids.bos
    assert attention_mask[1].tolist() == [0] * pad + [1] * lengths[1]

    short_answer = FULL_ANSWER[:4] + ["[", "dog", "]", "<video>", "</s>"]
    forced = [answer_ids(tokenizer, FULL_ANSWER), answer_ids(tokenizer, short_answer)]
    for logits_processor in (None, "forced"):
        def run(rows):
            processors = None if logits_processor is None else [ForceTokens([forced[r] for r in rows])]
            return generate_with_media(
                llm, tokenizer, adapter, [prompts[r] for r in rows], [embeds[r] for r in rows], ids,
                do_sample=False, max_new_tokens=12, logits_processor=processors, output_hidden_states=True,
            )

        batch = run([0, 1])
        for row in (0, 1):
            single = run([row])
            length = single.sequences.shape[1]
            assert batch.sequences[row, :length].tolist() == single.sequences[0].tolist()
            assert batch.texts[row] == single.texts[0]
            assert torch.allclose(batch.hidden_states[row, :length], single.hidden_states[0], atol=1e-5)
            for name in ("generation_embeds", "base_embeds"):
                expected, got = getattr(single, name)[0], getattr(batch, name)[row]
                assert (expected is None) == (got is None)
                if logits_processor is not None:
                    assert torch.allclose(got, expected, atol=1e-5)


def test_sampling_reproducible_with_generator_and_global_rng_untouched(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video>")]
    embeds = [media(1, 3)]
    kwargs = dict(do_sample=True, temperature=5.0, max_new_tokens=16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    args = (llm, tokenizer, adapter, prompts, embeds, ids)
    first = generate_with_media(*args, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state must not matter
    second = generate_with_media(*args, generator=torch.Generator().manual_seed(0), **kwargs)
    other = generate_with_media(*args, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(first.sequences, second.sequences)
    assert first.texts == second.texts
    assert not torch.equal(first.sequences, other.sequences)
    # The generator itself advances: two draws from one generator differ.
    generator = torch.Generator().manual_seed(0)
    a = generate_with_media(*args, generator=generator, **kwargs)
    b = generate_with_media(*args, generator=generator, **kwargs)
    assert torch.equal(a.sequences, first.sequences) and not torch.equal(a.sequences, b.sequences)


def test_beam_search_matches_transformers_and_reads_out_like_greedy(setup):
    tokenizer, llm, adapter, ids = setup
    # A prompt without media: our embeddings path must give transformers' own beam search on the token ids.
    prompt = build_vicuna_prompt("paint it red")
    ours = generate_with_media(llm, tokenizer, adapter, [prompt], [media(0, 0)], ids, do_sample=False, num_beams=3,
                               max_new_tokens=10, output_hidden_states=True)
    prompt_ids = torch.tensor([[ids.bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    reference = llm.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), num_beams=3, do_sample=False,
                             max_new_tokens=10, eos_token_id=ids.eos, pad_token_id=ids.pad)
    assert ours.sequences[0].tolist() == reference[0, prompt_ids.shape[1]:].tolist()
    # The returned states are those that predicted each answer token: a plain forward over prompt + answer.
    answer = ours.sequences[:, :-1]
    with torch.no_grad():
        states = llm.model(torch.cat([prompt_ids, answer], dim=1)).last_hidden_state
    assert torch.allclose(ours.hidden_states, states[:, prompt_ids.shape[1] - 1 :], atol=1e-5)

    # With media and a forced answer (every beam forced alike), the read-out embeddings are greedy decoding's.
    prompts, embeds = [build_vicuna_prompt("add <video> to <video>")], [media(2, 5)]
    forced = answer_ids(tokenizer, FULL_ANSWER)
    greedy = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, do_sample=False, max_new_tokens=12,
                                 logits_processor=[ForceTokens([forced])])
    beams = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, do_sample=False, max_new_tokens=12,
                                num_beams=2, logits_processor=[ForceTokens([forced, forced])])
    assert beams.sequences[0].tolist() == greedy.sequences[0].tolist() == forced
    assert beams.texts == greedy.texts
    for name in ("generation_embeds", "base_embeds"):
        assert torch.allclose(getattr(beams, name)[0], getattr(greedy, name)[0], atol=1e-5)


def _answer_text(tokenizer, ids, tokens: list[int]) -> str:
    return tokenizer.decode(tokens[: tokens.index(ids.eos)] if ids.eos in tokens else tokens, skip_special_tokens=False)


def test_candidate_scorer_chooses_among_every_final_beam(setup):
    tokenizer, llm, adapter, ids = setup
    prompt = build_vicuna_prompt("paint it red")
    calls = []

    def last(row, texts, beam_scores, generation_embeds, base_embeds):
        calls.append((row, list(texts), beam_scores.clone(), list(generation_embeds) + list(base_embeds)))
        return len(texts) - 1

    kwargs = dict(do_sample=False, num_beams=3, max_new_tokens=10, output_hidden_states=True)
    ours = generate_with_media(llm, tokenizer, adapter, [prompt], [media(0, 0)], ids, candidate_scorer=last, **kwargs)
    # The scorer sees transformers' own final beams (best first) and their length-normalised scores.
    prompt_ids = torch.tensor([[ids.bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    reference = llm.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), num_beams=3, do_sample=False,
                             num_return_sequences=3, output_scores=True, return_dict_in_generate=True,
                             max_new_tokens=10, eos_token_id=ids.eos, pad_token_id=ids.pad)  # fmt: skip
    beams = reference.sequences[:, prompt_ids.shape[1] :]
    texts = [_answer_text(tokenizer, ids, row.tolist()) for row in beams]
    assert len(calls) == 1 and calls[0][0] == 0 and calls[0][1] == texts and len(set(texts)) == 3
    torch.testing.assert_close(calls[0][2], reference.sequences_scores)
    assert calls[0][3] == [None] * 6  # the untrained LLM's answers hold no <im_gen>…<video> nor <base><video>
    # The answer is the scorer's pick, its states those of a plain forward over prompt + that answer.
    assert ours.texts == [texts[2]]
    with torch.no_grad():
        states = llm.model(torch.cat([prompt_ids, beams[2:, :-1]], dim=1)).last_hidden_state
    torch.testing.assert_close(ours.hidden_states, states[:, prompt_ids.shape[1] - 1 :], atol=1e-5, rtol=1e-5)

    # Picking the best beam is plain beam search.
    plain = generate_with_media(llm, tokenizer, adapter, [prompt], [media(0, 0)], ids, **kwargs)
    first = generate_with_media(llm, tokenizer, adapter, [prompt], [media(0, 0)], ids,
                                candidate_scorer=lambda *args: 0, **kwargs)  # fmt: skip
    assert plain.texts == first.texts == [texts[0]]
    n = min(first.hidden_states.shape[1], plain.hidden_states.shape[1])  # rows are padded to their longest beam
    torch.testing.assert_close(first.hidden_states[:, :n], plain.hidden_states[:, :n])


def test_candidate_scorer_gets_each_beams_embeddings_and_one_call_per_prompt(setup):
    tokenizer, llm, adapter, ids = setup
    prompts = [build_vicuna_prompt("add <video> to <video>"), build_vicuna_prompt("put <video> in <video>")]
    embeds = [media(2, 5), media(2, 6)]
    forced = answer_ids(tokenizer, FULL_ANSWER)
    greedy = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, do_sample=False, max_new_tokens=12,
                                 logits_processor=[ForceTokens([forced, forced])])  # fmt: skip
    calls = []

    def record(row, texts, beam_scores, generation_embeds, base_embeds):
        calls.append((row, texts, generation_embeds, base_embeds))
        return 0

    beams = generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, do_sample=False, max_new_tokens=12,
                                num_beams=2, logits_processor=[ForceTokens([forced] * 4)],
                                candidate_scorer=record)  # fmt: skip
    assert [row for row, *_ in calls] == [0, 1]
    for row, texts, generation_embeds, base_embeds in calls:
        assert texts[0] == greedy.texts[row]
        torch.testing.assert_close(generation_embeds[0], greedy.generation_embeds[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base_embeds[0], greedy.base_embeds[row], atol=1e-5, rtol=1e-5)
    assert beams.texts == greedy.texts
    for name in ("generation_embeds", "base_embeds"):
        for ours, theirs in zip(getattr(beams, name), getattr(greedy, name)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_score_answers_gives_the_beam_scores_and_embeddings_of_beam_search():
    # The fitted tiny LLM ends its beams with EOS, as a trained one does; its media are random vectors.
    llm, tokenizer, adapter = tiny_llm()
    ids = get_multimodal_token_ids(tokenizer)
    prompts = [build_vicuna_prompt("add <video> to <video>")]
    embeds = [torch.randn(2, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(5)) * 3.0]
    calls = []

    def record(row, texts, beam_scores, generation_embeds, base_embeds):
        calls.append((list(texts), beam_scores.clone(), generation_embeds, base_embeds))
        return 0

    with torch.no_grad():
        generate_with_media(llm, tokenizer, adapter, prompts, embeds, ids, do_sample=False, num_beams=3,
                            max_new_tokens=40, candidate_scorer=record)  # fmt: skip
        (texts, beam_scores, generation_embeds, base_embeds), = calls
        ended = [j for j, text in enumerate(texts) if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 40]
        assert ended and generation_embeds[0] is not None and base_embeds[0] is not None
        scores, generations, bases = score_answers(llm, tokenizer, adapter, prompts[0], embeds[0], texts, ids)
    # Transformers' length-normalised beam score, for every answer that ended with EOS.
    torch.testing.assert_close(scores[ended], beam_scores[ended].float(), atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(generations + bases, list(generation_embeds) + list(base_embeds)):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_score_answers_is_the_mean_log_probability_of_the_answer_and_eos(setup):
    tokenizer, llm, adapter, ids = setup
    prompt = build_vicuna_prompt("paint it red")  # no media: a plain forward over the token ids is the reference
    answers = ["<base><video><im_gen_start><im_gen>[red cat]<video>", "a dog", "red"]
    with torch.no_grad():
        scores, generations, bases = score_answers(llm, tokenizer, adapter, prompt, media(0, 0), answers, ids)
        prompt_ids = [ids.bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for answer, score in zip(answers, scores):
            answer_ids_ = tokenizer(answer, add_special_tokens=False)["input_ids"] + [ids.eos]
            logits = llm(torch.tensor([prompt_ids + answer_ids_])).logits[0, len(prompt_ids) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(answer_ids_)[:, None]).mean()
            torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)
    assert generations[0] is not None and bases[0] is not None and generations[1] is None and bases[2] is None
    # The media count: the same answer scores otherwise under other media.
    media_prompt = build_vicuna_prompt("add <video> to <video>")
    with torch.no_grad():
        a, _, _ = score_answers(llm, tokenizer, adapter, media_prompt, media(2, 5), answers[:1], ids)
        b, _, _ = score_answers(llm, tokenizer, adapter, media_prompt, media(2, 9), answers[:1], ids)
    assert not torch.allclose(a, b)
    for bad in ([], "answer", [None]):
        with pytest.raises(ValueError, match="`answers` must be a non-empty list of strings"):
            score_answers(llm, tokenizer, adapter, prompt, media(0, 0), bad, ids)


def test_generate_errors(setup):
    tokenizer, llm, adapter, ids = setup
    args = (llm, tokenizer, adapter, [build_vicuna_prompt("add <video>")], [media(1, 0)], ids)
    with pytest.raises(TypeError, match="`generator` must be a single torch.Generator or None"):
        generate_with_media(*args, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
        generate_with_media(*args, max_new_tokens=0)
    with pytest.raises(ValueError, match="`temperature` must be a positive number when sampling"):
        generate_with_media(*args, temperature=0.0)
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\] or None"):
        generate_with_media(*args, top_p=1.5)
    with pytest.raises(ValueError, match="`num_beams` must be a positive int"):
        generate_with_media(*args, num_beams=0)
    for kwargs in ({"do_sample": True}, {"do_sample": False, "use_cache": False}):
        with pytest.raises(ValueError, match="`num_beams=2` is beam search: it needs `do_sample=False` and"):
            generate_with_media(*args, num_beams=2, **kwargs)
    for kwargs in ({"num_beams": 1, "candidate_scorer": lambda *a: 0}, {"num_beams": 2, "candidate_scorer": 0}):
        with pytest.raises(ValueError, match="`candidate_scorer` picks among beams: it must be callable and needs"):
            generate_with_media(*args, do_sample=False, **kwargs)
    for pick in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"`candidate_scorer` must return a beam index in \[0, 2\)"):
            generate_with_media(*args, do_sample=False, num_beams=2, max_new_tokens=3,
                                candidate_scorer=lambda *a, pick=pick: pick)  # fmt: skip
    with pytest.raises(TypeError, match="`logits_processor` must be a LogitsProcessorList"):
        generate_with_media(*args, logits_processor=lambda ids, scores: scores)
    with pytest.raises(ValueError, match=r"Prompt 0 contains 1 <video> tokens but `media_embeds\[0\]` has 2"):
        generate_with_media(*args[:4], [media(2, 0)], ids)
    with pytest.raises(TypeError, match="`llm` must be a transformers causal LM"):
        generate_with_media(adapter, *args[1:])
