"""Tests of the official-release converter (`python -m diffusers_any2pix.convert_official`).

A tiny release in the official format (LLaVA-style Llama shards with extra modules and added tokens, a pickled prior
with its CLIP text encoder inside, Meta's ImageBind layout, a two-view IP-Adapter for a tiny SDXL UNet) is converted,
loaded and run; every converted part is compared with the official computation on the same random weights; bad inputs
fail with a message naming the file or key, and nothing is written.
"""

import argparse
import inspect
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import PIL.Image
import pytest
import safetensors
import torch
import torch.nn.functional as F
from imagebind_reference import import_reference_data_module, load_reference_model_module
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, GPT2Config, GPT2Model

from diffusers import StableDiffusionXLPipeline
from diffusers_any2pix.conversion import official as official_module
from diffusers_any2pix.conversion.official import (
    OFFICIAL_EDIT_DEFAULTS,
    convert_official_ip_adapter,
    convert_official_prior,
    convert_official_release,
    load_official_llm_tokenizer,
    load_weights_file,
    official_llm_config,
    two_view_image_proj_to_standard,
)
from diffusers_any2pix.convert_official import main
from diffusers_any2pix.models.ip_adapter import unet_cross_attention_hidden_sizes
from diffusers_any2pix.multimodal_llm import MULTIMODAL_SPECIAL_TOKENS, build_vicuna_prompt, inject_media_embeds
from diffusers_any2pix.pipeline_instruct_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.testing_utils import TINY_EMBED_DIM, TINY_IMAGEBIND_CONFIG, tiny_decoder, tiny_llm, tiny_prior


EMBED = TINY_EMBED_DIM
# Meta's constructor hard-codes 224-pixel images, a 77-token context and a 49408-id vocabulary; the rest is tiny.
META_IMAGEBIND_KWARGS = dict(
    **TINY_IMAGEBIND_CONFIG,
    depth_embed_dim=8,
    depth_num_blocks=1,
    depth_num_heads=2,
    thermal_embed_dim=8,
    thermal_num_blocks=1,
    thermal_num_heads=2,
    imu_embed_dim=8,
    imu_num_blocks=1,
    imu_num_heads=2,
)
IMAGEBIND_CONFIG = {
    k: v for k, v in META_IMAGEBIND_KWARGS.items() if k.split("_")[0] not in ("depth", "thermal", "imu")
}
PRIOR_CONFIG = dict(
    embed_dim=EMBED,
    text_hidden_dim=16,
    score_embed_dim=8,
    hidden_size=EMBED,
    num_layers=2,
    num_attention_heads=2,
    max_positions=32,
    vocab_size=8,
)
# The official prior's CLIP text encoder at tiny width (CLIP's full 49408-token vocabulary, so the empty prompt is
# the real ids 49406, 49407).
PRIOR_TEXT_CONFIG = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16
)
CONFIG_OVERRIDES = {"image_encoder": IMAGEBIND_CONFIG, "prior": PRIOR_CONFIG, "prior_text_encoder": PRIOR_TEXT_CONFIG}
LLM_SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
DEAD_LLM_PREFIXES = (
    "model.mm_projector.",
    "model.vision_tower.",
    "model.vae_projector_audio.",
    "model.vae_predictor_audio.",
)
HUB_DECODER = "tiny-org/tiny-sdxl"
PUSH_REPO = "tiny-org/instructany2pix-converted"


@dataclass
class TinyRelease:
    """A tiny official release on disk and the official objects its weights came from."""

    root: Path
    decoder_dir: Path
    hub_cache: Path
    overrides_file: Path
    llm: nn.Module
    llm_tokenizer: object
    llm_state: dict
    prior_state: dict
    clip_text_encoder: CLIPTextModel
    imagebind_reference: nn.Module
    ip_adapter: dict
    unet: nn.Module


def _perturb(state: dict, generator: torch.Generator, scale: float = 0.1) -> dict:
    # Random init leaves LayerNorms at 1/0 and biases at 0: perturb so that a converter ignoring them would fail.
    return {
        k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }


def _write_llm(llm_dir: Path, llm, tokenizer, adapter, generator) -> dict:
    """The LLaVA-style folder: two shards + index, config.json with LLaVA settings, tokenizer/ with added tokens."""
    state = dict(llm.state_dict())
    state.update({f"model.vae_projector_image.{k}": v for k, v in adapter.input_projector.state_dict().items()})
    state.update({f"model.vae_predictor_image.{k}": v for k, v in adapter.output_head.state_dict().items()})
    hidden = llm.config.hidden_size
    state.update(
        {
            "model.mm_projector.0.weight": torch.randn(hidden, 24, generator=generator),
            "model.mm_projector.0.bias": torch.randn(hidden, generator=generator),
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(
                24, 3, 4, 4, generator=generator
            ),
            "model.vae_projector_audio.0.weight": torch.randn(hidden, EMBED, generator=generator),
            "model.vae_predictor_audio.2.bias": torch.randn(EMBED, generator=generator),
            # Older transformers saved the rotary buffer; it is recomputed.
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8, generator=generator),
        }
    )
    llm_dir.mkdir(parents=True)
    keys = sorted(state)
    halves = {LLM_SHARDS[0]: keys[: len(keys) // 2], LLM_SHARDS[1]: keys[len(keys) // 2 :]}
    for shard, shard_keys in halves.items():
        torch.save({k: state[k] for k in shard_keys}, llm_dir / shard)
    weight_map = {k: shard for shard, shard_keys in halves.items() for k in shard_keys}
    (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config = llm.config.to_dict()
    for key in ("dtype", "rope_parameters", "transformers_version"):
        config.pop(key, None)
    config.update(
        model_type="instructany2pix",
        architectures=["InstructAny2PixLlamaForCausalLM"],
        torch_dtype="float32",
        rope_scaling=None,
        rope_theta=10000.0,
        transformers_version="4.31.0",
        mm_vision_tower="openai/clip-vit-large-patch14",
        mm_hidden_size=1024,
        mm_vision_select_layer=-2,
        mm_use_im_start_end=False,
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    (llm_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(llm_dir / "tokenizer")
    ids = tokenizer.convert_tokens_to_ids(list(MULTIMODAL_SPECIAL_TOKENS))
    (llm_dir / "tokenizer" / "added_tokens.json").write_text(
        json.dumps(dict(zip(MULTIMODAL_SPECIAL_TOKENS, ids, strict=True)))
    )
    return state


def _official_prior_state(generator) -> tuple[dict, CLIPTextModel]:
    """`prior/model.bin`: the prior's keys, the CLIP text encoder under `cond_stage_models.0.model.text_model.*` (the
    transformers 4 naming) and GPT-2's attention buffers of older transformers."""
    prior_state = _perturb(
        {k: v for k, v in tiny_prior().state_dict().items() if k != "empty_text_hidden_states"}, generator
    )
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(**{**official_module.OFFICIAL_PRIOR_TEXT_ENCODER_CONFIG, **PRIOR_TEXT_CONFIG}))
    clip = clip.eval()
    with torch.no_grad():
        clip.load_state_dict(_perturb(clip.state_dict(), generator))
    state = dict(prior_state)
    state.update({f"cond_stage_models.0.model.text_model.{k}": v for k, v in clip.state_dict().items()})
    state["cond_stage_models.0.model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for layer in range(PRIOR_CONFIG["num_layers"]):
        state[f"model.h.{layer}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.bool))[None, None]
        state[f"model.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return state, clip


def _official_ip_adapter(unet, generator, width: int | None = None, hidden_sizes: list[int] | None = None) -> dict:
    """The two-view layout: proj (4·C, E), norm (C), raw_embed (2, C) and one K/V pair per cross-attention."""
    width = width or unet.config.cross_attention_dim
    hidden_sizes = hidden_sizes or unet_cross_attention_hidden_sizes(unet)

    def randn(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=generator)

    image_proj = {
        "proj.weight": randn(4 * width, EMBED),
        "proj.bias": randn(4 * width),
        "norm.weight": 1.0 + randn(width, scale=0.1),
        "norm.bias": randn(width, scale=0.1),
        "raw_embed": randn(2, width, scale=1.0),
    }
    ip_adapter = {}
    for i, size in enumerate(hidden_sizes):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = randn(size, width)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = randn(size, width)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> TinyRelease:
    generator = torch.Generator().manual_seed(0)
    base = tmp_path_factory.mktemp("official")
    root = base / "ckpts"
    llm, llm_tokenizer, adapter = tiny_llm()
    llm_state = _write_llm(root / "llm-retrained", llm, llm_tokenizer, adapter, generator)

    prior_state, clip = _official_prior_state(generator)
    (root / "prior").mkdir()
    torch.save(prior_state, root / "prior" / "model.bin")

    torch.manual_seed(1)
    imagebind = load_reference_model_module().ImageBindModel(**META_IMAGEBIND_KWARGS).eval()
    with torch.no_grad():
        imagebind.load_state_dict(
            {
                k: v if k.endswith("text.mask") else v + 0.05 * torch.randn(v.shape, generator=generator)
                for k, v in imagebind.state_dict().items()
            }
        )
    torch.save(imagebind.state_dict(), root / "imagebind_huge.pth")

    decoder = tiny_decoder("sdxl")
    decoder.pop("ip_adapter")
    ip_adapter = _official_ip_adapter(decoder["unet"], generator)
    (root / "sdxl").mkdir()
    torch.save(ip_adapter, root / "sdxl" / "ip_adapter_global_local_2_view.bin")

    decoder_dir = base / "sdxl-decoder"
    StableDiffusionXLPipeline(**decoder).save_pretrained(decoder_dir)
    # A Hugging Face cache holding the same decoder under a repo id, read with HF_HUB_OFFLINE=1.
    hub_cache = base / "hub-cache"
    repo_folder = hub_cache / ("models--" + HUB_DECODER.replace("/", "--"))
    shutil.copytree(decoder_dir, repo_folder / "snapshots" / ("0" * 40))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text("0" * 40)

    overrides_file = base / "config_overrides.json"
    overrides_file.write_text(json.dumps(CONFIG_OVERRIDES))
    return TinyRelease(
        root=root,
        decoder_dir=decoder_dir,
        hub_cache=hub_cache,
        overrides_file=overrides_file,
        llm=llm,
        llm_tokenizer=llm_tokenizer,
        llm_state=llm_state,
        prior_state=prior_state,
        clip_text_encoder=clip,
        imagebind_reference=imagebind,
        ip_adapter=ip_adapter,
        unet=decoder["unet"],
    )


class _RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


class _RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Converted:
    out: Path
    report: object
    pipe: InstructAny2PixPipeline
    log: str
    hub_calls: list


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Converted:
    """The release converted through the command line, the decoder read from the offline Hub cache."""
    out = tmp_path_factory.mktemp("converted") / "instructany2pix"
    logs = _RecordingHandler()
    official_module.logger.addHandler(logs)
    _RecordingHfApi.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(official_module, "HfApi", _RecordingHfApi)
        try:
            report = main(
                [
                    "--checkpoint_dir", str(release.root),
                    "--decoder", HUB_DECODER,
                    "--cache_dir", str(release.hub_cache),
                    "--output_dir", str(out),
                    "--dtype", "float32",
                    "--config_overrides", str(release.overrides_file),
                    "--push_to_hub", PUSH_REPO,
                ]
            )  # fmt: skip
        finally:
            official_module.logger.removeHandler(logs)
    pipe = InstructAny2PixPipeline.from_pretrained(out)
    log = "\n".join(record.getMessage() for record in logs.records)
    return Converted(out=out, report=report, pipe=pipe, log=log, hub_calls=list(_RecordingHfApi.calls))


# ------------------------------------------------------------------------------------------------ the whole release


def test_converted_folder_is_complete_and_safetensors_only(converted):
    files = {p.relative_to(converted.out).as_posix() for p in converted.out.rglob("*") if p.is_file()}
    assert {"model_index.json", "README.md"} <= files
    index = json.loads((converted.out / "model_index.json").read_text())
    assert index["_class_name"] == "InstructAny2PixPipeline"
    for name in ("image_encoder", "llm", "llm_tokenizer", "mm_adapter", "prior", "vae", "unet", "scheduler",
                 "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "ip_adapter"):  # fmt: skip
        assert index[name][0] is not None, name
    assert index["prior_text_encoder"] == [None, None]
    weights = [f for f in files if f.endswith((".bin", ".pth", ".pt", ".ckpt", ".pkl"))]
    assert weights == [], weights
    assert any(f.startswith("llm/") and f.endswith(".safetensors") for f in files)
    # Nothing left behind next to the output (staging folders are renamed or removed).
    assert [p.name for p in converted.out.parent.iterdir()] == [converted.out.name]
    # Every weight came from the checkpoints: nothing is on the meta device.
    for name, component in converted.pipe.components.items():
        if isinstance(component, nn.Module):
            assert all(p.device.type == "cpu" for p in component.parameters()), name


def test_edit_defaults_are_the_official_demo_settings(converted):
    defaults = json.loads((converted.out / "model_index.json").read_text())["edit_defaults"]
    assert defaults == OFFICIAL_EDIT_DEFAULTS
    assert defaults["structure_preservation"] == 1.0 and defaults["embedding_weights"] == [0.4, 0.6, 0.4]
    assert (defaults["embedding_norm"], defaults["num_inference_steps"], defaults["guidance_scale"]) == (
        20.0,
        25,
        10.0,
    )
    assert defaults["ip_adapter_scale"] == 1.0
    assert set(defaults) <= set(inspect.signature(InstructAny2PixPipeline.__call__).parameters)


def test_converted_pipeline_runs_a_full_edit(converted):
    pipe = converted.pipe
    assert pipe.resolve_edit_settings()["structure_preservation"] == OFFICIAL_EDIT_DEFAULTS["structure_preservation"]
    assert pipe.decoder_family == "sdxl"
    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    output = pipe(
        "make [image1] red",
        images=[image],
        num_inference_steps=2,
        llm_do_sample=False,
        generator=torch.Generator().manual_seed(0),
    )
    # The fitted tiny LLM still gives its well-formed answer: tokens, embedding rows and adapter survived.
    assert "<im_gen>" in output.answers[0]
    assert output.captions == ["a red circle on a blue background"]
    assert output.images[0].size == (32, 32)
    assert torch.isfinite(output.conditioning_embeds).all()


def test_dropped_llm_modules_are_logged_and_reported(converted, release):
    report = converted.report
    expected = {prefix: sorted(k for k in release.llm_state if k.startswith(prefix)) for prefix in DEAD_LLM_PREFIXES}
    assert report.dropped_llm_keys == expected
    assert report.ignored_llm_buffers == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert {"mm_vision_tower", "mm_hidden_size", "torch_dtype", "use_mm_proj"} <= set(report.dropped_llm_config_keys)
    for prefix, keys in expected.items():
        assert f"dropped {len(keys)} keys of {prefix}*" in converted.log
        assert keys[0] in converted.log
    assert len(report.dropped_imagebind_keys) > 0
    assert all(k.split(".")[1] in ("depth", "thermal", "imu") for k in report.dropped_imagebind_keys)
    assert report.dropped_ip_adapter_entries == ["image_proj.raw_embed[1]"]


def test_special_tokens_keep_the_official_ids_and_rows(converted, release):
    official_ids = json.loads((release.root / "llm-retrained" / "tokenizer" / "added_tokens.json").read_text())
    assert converted.report.special_token_ids == official_ids
    tokenizer = converted.pipe.llm_tokenizer
    assert tokenizer.convert_tokens_to_ids(list(MULTIMODAL_SPECIAL_TOKENS)) == list(official_ids.values())
    assert tokenizer.pad_token == "<unk>"
    rows = torch.tensor(list(official_ids.values()))
    llm = converted.pipe.llm
    assert torch.equal(llm.get_input_embeddings().weight[rows], release.llm_state["model.embed_tokens.weight"][rows])
    assert torch.equal(llm.get_output_embeddings().weight[rows], release.llm_state["lm_head.weight"][rows])


def test_model_card_names_usage_sources_and_licences(converted):
    card = (converted.out / "README.md").read_text()
    assert card.startswith("---\n") and "license: other" in card
    assert f'snapshot_download("{PUSH_REPO}")' in card and "InstructAny2PixPipeline.from_pretrained" in card
    for licence in ("CC-BY-NC-SA 4.0", "Llama 2 Community License", "OpenRAIL++-M"):
        assert licence in card
    assert "non-commercially" in card
    assert "| `structure_preservation` | `alpha` | `1.0` |" in card
    assert "`model.vision_tower.*`: 1 key\n" in card and "`model.mm_projector.*`: 2 keys" in card


def test_push_to_hub_uploads_the_finished_folder(converted):
    assert converted.hub_calls == [
        ("create_repo", PUSH_REPO, {"private": False, "exist_ok": True}),
        ("upload_folder", {
            "repo_id": PUSH_REPO,
            "folder_path": str(converted.out),
            "commit_message": "Add InstructAny2Pix converted from the official release",
        }),
    ]  # fmt: skip
    assert converted.report.pushed_to == PUSH_REPO


# ----------------------------------------------------------------------------------------- numerical equivalence


def _official_mlp(state: dict, prefix: str) -> nn.Sequential:
    """The official `Sequential(Linear, GELU, Linear)` built by hand from the official keys."""
    first, last = state[f"{prefix}.0.weight"], state[f"{prefix}.2.weight"]
    mlp = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.GELU(), nn.Linear(last.shape[1], last.shape[0]))
    mlp.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return mlp.eval()


@torch.no_grad()
def test_projector_and_predictor_equal_the_official_mlps(converted, release):
    projector = _official_mlp(release.llm_state, "model.vae_projector_image")
    predictor = _official_mlp(release.llm_state, "model.vae_predictor_image")
    embeds = 7.0 * torch.randn(3, EMBED, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(3, release.llm.config.hidden_size, generator=torch.Generator().manual_seed(2))
    adapter = converted.pipe.mm_adapter
    official_input = embeds / (embeds.norm(dim=-1, keepdim=True) + 1e-9) * 20
    torch.testing.assert_close(adapter.project(embeds), projector(official_input), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapter.predict(hidden), predictor(hidden), rtol=0, atol=0)


@torch.no_grad()
def test_llm_equals_the_official_injection_and_read_out(converted, release):
    """Official: `embed(<video>) + projector(20·e/‖e‖)` at each `<video>`, last hidden state → predictor."""
    tokenizer, llm = release.llm_tokenizer, release.llm
    prompt = build_vicuna_prompt("make <video> look like <video>")
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    media = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(3))
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    projector = _official_mlp(release.llm_state, "model.vae_projector_image")
    predictor = _official_mlp(release.llm_state, "model.vae_predictor_image")
    official_embeds = release.llm_state["model.embed_tokens.weight"][ids]
    positions = (ids[0] == video_id).nonzero().flatten()
    official_embeds[0, positions] += projector(media / (media.norm(dim=-1, keepdim=True) + 1e-9) * 20)
    official = llm(inputs_embeds=official_embeds, output_hidden_states=True)

    pipe = converted.pipe
    converted_ids = torch.tensor(
        [[pipe.llm_tokenizer.bos_token_id] + pipe.llm_tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    )
    assert torch.equal(converted_ids, ids)
    embeds = inject_media_embeds(
        pipe.llm.get_input_embeddings()(ids), ids, [media], pipe.mm_adapter, pipe.token_ids.video
    )
    ours = pipe.llm(inputs_embeds=embeds, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, official.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        pipe.mm_adapter.predict(ours.hidden_states[-1][0, -1]), predictor(official.hidden_states[-1][0, -1]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def _sinusoidal(score: float, dim: int) -> torch.Tensor:
    # get_timestep_embedding(score, dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin].
    half = dim // 2
    angles = score * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.cos(angles), torch.sin(angles)])


@torch.no_grad()
def test_prior_equals_the_official_sequence_and_guidance(converted, release):
    """The official 11-token sequence through GPT-2, both branches, guidance 10, norms 100 in / 20 out."""
    state = release.prior_state
    gpt2 = GPT2Model(
        GPT2Config(vocab_size=8, n_positions=32, n_embd=EMBED, n_layer=2, n_head=2, activation_function="gelu_new",
                   layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ).eval()  # fmt: skip
    legacy_buffers = {f"model.h.{i}.attn.{name}" for i in range(2) for name in ("bias", "masked_bias")}
    gpt2.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.") and k not in legacy_buffers}
    )
    empty_prompt = release.clip_text_encoder(input_ids=torch.tensor([[49406, 49407]])).last_hidden_state[0]

    def linear(index, x):
        return (
            x @ state[f"input_sequence_embed_linear.{index}.weight"].T
            + state[f"input_sequence_embed_linear.{index}.bias"]
        )

    def branch(embed, score_block):
        sos, eos = state["start_of_sequence_tokens.weight"], state["end_of_sequence_tokens.weight"]
        tokens = [state["modality_embedding.weight"][3], sos[1], linear(1, embed), eos[1], sos[2]]
        tokens += [*linear(2, empty_prompt), eos[2], sos[3], linear(3, score_block), eos[3]]
        assert len(tokens) == 11
        return gpt2(inputs_embeds=torch.stack(tokens)[None]).last_hidden_state[0, -1]

    generation = 3.0 * torch.randn(EMBED, generator=torch.Generator().manual_seed(4))
    conditional = branch(generation / (generation.norm() + 1e-9) * 100, _sinusoidal(6.5, 8))
    unconditional = branch(torch.zeros(EMBED), torch.full((8,), 2.0))
    guided = unconditional + 10.0 * (conditional - unconditional)
    official = guided / (guided.norm() + 1e-9) * 20

    ours = converted.pipe.prior.refine(generation[None])[0]
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)
    assert converted.report.prior.empty_text_hidden_states_source == "checkpoint_text_encoder"
    torch.testing.assert_close(converted.pipe.prior.empty_text_hidden_states, empty_prompt, rtol=0, atol=0)


def _official_global_tokens(image_proj: dict, embeds: torch.Tensor) -> torch.Tensor:
    width = image_proj["norm.weight"].shape[0]
    tokens = (embeds @ image_proj["proj.weight"].T + image_proj["proj.bias"]).reshape(-1, 4, width)
    return F.layer_norm(
        tokens + image_proj["raw_embed"][0], (width,), image_proj["norm.weight"], image_proj["norm.bias"]
    )


@torch.no_grad()
def test_ip_adapter_equals_the_official_global_mode(converted, release):
    image_proj = release.ip_adapter["image_proj"]
    embeds = torch.cat(
        [5.0 * torch.randn(3, EMBED, generator=torch.Generator().manual_seed(5)), torch.zeros(1, EMBED)]
    )
    official = _official_global_tokens(image_proj, embeds)
    pipe = converted.pipe
    torch.testing.assert_close(pipe.ip_adapter.image_tokens(embeds), official, rtol=1e-5, atol=1e-5)
    # The adapter as attached by diffusers' IP-Adapter loader gives the same tokens and K/V weights.
    attached = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    torch.testing.assert_close(attached(embeds), official, rtol=1e-5, atol=1e-5)
    processors = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(processors) == len(release.ip_adapter["ip_adapter"]) // 2
    for i, processor in enumerate(processors):
        assert torch.equal(
            processor.to_k_ip[0].weight, release.ip_adapter["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"]
        )
        assert torch.equal(
            processor.to_v_ip[0].weight, release.ip_adapter["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"]
        )


@torch.no_grad()
def test_saved_ip_adapter_loads_into_a_plain_sdxl_pipeline(converted, release):
    """The `ip_adapter` folder is a standard diffusers IP-Adapter checkpoint."""
    sdxl = StableDiffusionXLPipeline.from_pretrained(release.decoder_dir)
    sdxl.load_ip_adapter(
        str(converted.out),
        subfolder="ip_adapter",
        weight_name="diffusion_pytorch_model.safetensors",
        image_encoder_folder=None,
    )
    embeds = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(9))
    tokens = sdxl.unet.encoder_hid_proj.image_projection_layers[0](embeds)
    official = _official_global_tokens(release.ip_adapter["image_proj"], embeds)
    torch.testing.assert_close(tokens, official, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_imagebind_equals_meta_reference(converted, release):
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    audio = torch.randn(2, 3, 1, 128, 204, generator=generator)
    text = torch.randint(1, 49000, (2, 77), generator=generator)
    text[0, 5], text[1, 76] = 49407, 49407  # end of text (the largest id) at different positions
    reference, ours = release.imagebind_reference, converted.pipe.image_encoder
    torch.testing.assert_close(ours.encode_image(images), reference({"vision": images})["vision"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.encode_audio(audio), reference({"audio": audio})["audio"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.encode_text(text), reference({"text": text})["text"], rtol=0, atol=1e-5)


def test_two_view_conversion_is_lossless_for_each_view_and_leaves_input_alone(release):
    image_proj = release.ip_adapter["image_proj"]
    before = {k: v.clone() for k, v in image_proj.items()}
    embeds = torch.randn(4, EMBED, generator=torch.Generator().manual_seed(7))
    for view in (0, 1):
        standard = two_view_image_proj_to_standard(image_proj, view=view)
        width = standard["norm.weight"].shape[0]
        tokens = F.layer_norm(
            (embeds @ standard["proj.weight"].T + standard["proj.bias"]).reshape(-1, 4, width),
            (width,), standard["norm.weight"], standard["norm.bias"],
        )  # fmt: skip
        official_tokens = (embeds @ image_proj["proj.weight"].T + image_proj["proj.bias"]).reshape(-1, 4, width)
        official = F.layer_norm(
            official_tokens + image_proj["raw_embed"][view],
            (width,),
            image_proj["norm.weight"],
            image_proj["norm.bias"],
        )
        torch.testing.assert_close(tokens, official, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], image_proj[k]) for k in before)


def _clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose empty prompt is ids (0, 1)."""
    return CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}, merges=[], model_max_length=77)


def test_prior_text_encoder_can_be_kept(release):
    result = convert_official_prior(
        release.root / "prior" / "model.bin",
        prior_config=PRIOR_CONFIG,
        text_encoder_config=PRIOR_TEXT_CONFIG,
        tokenizer=_clip_tokenizer(),
        keep_text_encoder=True,
    )
    official = release.clip_text_encoder.state_dict()
    kept = result.text_encoder.state_dict()
    assert set(kept) == set(official) and all(torch.equal(kept[k], official[k]) for k in kept)
    with torch.no_grad():
        expected = release.clip_text_encoder(input_ids=torch.tensor([[0, 1]])).last_hidden_state[0]
    torch.testing.assert_close(result.prior.empty_text_hidden_states, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the CLIP `tokenizer`"):
        convert_official_prior(release.root / "prior" / "model.bin", prior_config=PRIOR_CONFIG, keep_text_encoder=True)


def test_float16_conversion_can_keep_the_prior_text_encoder(release, tmp_path):
    out = tmp_path / "fp16"
    report = _convert(
        release, release.root, out, dtype="float16", keep_prior_text_encoder=True, prior_tokenizer=_clip_tokenizer()
    )
    assert report.prior_text_encoder_kept and report.dtype == "float16"
    for weights in (
        "unet/diffusion_pytorch_model.safetensors",
        "prior/diffusion_pytorch_model.safetensors",
        "prior_text_encoder/model.safetensors",
        "ip_adapter/diffusion_pytorch_model.safetensors",
    ):
        with safetensors.safe_open(out / weights, framework="pt") as file:
            assert {file.get_slice(key).get_dtype() for key in file.keys()} <= {"F16", "I64"}, weights
    pipe = InstructAny2PixPipeline.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ids = pipe.prior_tokenizer([""], return_tensors="pt").input_ids
        states = pipe.prior_text_encoder(ids).last_hidden_state[0]
        official = release.clip_text_encoder(input_ids=torch.tensor([[0, 1]])).last_hidden_state[0]
    torch.testing.assert_close(states, official, rtol=1e-2, atol=1e-2)
    # Stored from the float32 computation, then cast: equal to the float16 encoder up to its rounding.
    torch.testing.assert_close(pipe.prior.empty_text_hidden_states, states, rtol=0, atol=3e-3)


def test_imagebind_tokenizer_from_metas_bpe_file(release, tmp_path):
    reference = import_reference_data_module()
    bpe = reference.return_bpe_path()
    out = tmp_path / "with_tokenizer"
    report = _convert(release, release.root, out, imagebind_tokenizer=bpe)
    assert report.imagebind_tokenizer_saved
    assert "saved as `imagebind_tokenizer`" in (out / "README.md").read_text()
    pipe = InstructAny2PixPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    # Meta's own tokenisation of a caption, through the saved tokenizer.
    texts = ["a red circle on the left", "A Dog!"]
    expected = reference.SimpleTokenizer(bpe_path=bpe)(texts)
    assert torch.equal(pipe.imagebind_processor.tokenize(texts), expected)
    # The converted pipeline can rerank its LLM's beams with ImageBind's text tower.
    image = PIL.Image.fromarray(np.full((48, 48, 3), 128, np.uint8))
    result = pipe("add a red circle to [image1]", images=[image], num_inference_steps=2, llm_do_sample=False,
                  llm_num_beams=2, llm_rerank_weight=0.5, output_type="np", on_invalid_answer="use_base")  # fmt: skip
    assert result.images.shape[0] == 1 and np.isfinite(result.images).all()


def test_imagebind_tokenizer_errors_are_named(release, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Could not load the ImageBind tokenizer '.*nope\.txt\.gz'"):
        _convert(release, release.root, out, imagebind_tokenizer=tmp_path / "nope.txt.gz")
    with pytest.raises(TypeError, match="`imagebind_tokenizer` must be a path or a transformers tokenizer, got int"):
        _convert(release, release.root, out, imagebind_tokenizer=3)
    vocab = {f"t{i}</w>": i for i in range(49410)} | {"<|startoftext|>": 49410, "<|endoftext|>": 49411}
    too_big = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match="tokenizer has 49412 tokens but ImageBind's text embedding has 49408"):
        _convert(release, release.root, out, imagebind_tokenizer=too_big)
    _assert_nothing_written(out)


def test_official_sentencepiece_tokenizer_folder(tmp_path):
    """The official tokenizer folder as LLaVA saved it: SentencePiece `tokenizer.model` + `added_tokens.json`."""
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        (build_vicuna_prompt("add the dog to the picture") + " a red circle on a blue background\n") * 20
    )
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=100, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    base = 100
    (folder / "added_tokens.json").write_text(
        json.dumps({t: base + i for i, t in enumerate(MULTIMODAL_SPECIAL_TOKENS)})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "model_max_length": 2048, "pad_token": None})
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    tokenizer, token_ids = load_official_llm_tokenizer(folder, num_embeddings=base + len(MULTIMODAL_SPECIAL_TOKENS))
    assert token_ids.special_token_ids == tuple(range(base, base + len(MULTIMODAL_SPECIAL_TOKENS)))
    assert (token_ids.bos, token_ids.eos, tokenizer.pad_token) == (1, 2, "<unk>")
    assert token_ids.video in tokenizer("add <video> to the picture")["input_ids"]


# ------------------------------------------------------------------------------------------------ bad input


def _copy_release(release: TinyRelease, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release.root, tmp_path / "ckpts"))


def _convert(release: TinyRelease, checkpoint_dir: Path, out: Path, **kwargs):
    kwargs = {"decoder": str(release.decoder_dir), "dtype": "float32", "config_overrides": CONFIG_OVERRIDES, **kwargs}
    return convert_official_release(checkpoint_dir, out, **kwargs)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def test_wrong_folder_names_every_missing_part(release, tmp_path):
    empty = tmp_path / "not-ckpts"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not a complete official InstructAny2Pix release") as error:
        _convert(release, empty, out)
    for part in ("llm-retrained/", "prior/model.bin", "imagebind_huge.pth", "sdxl/ip_adapter_global_local_2_view.bin"):
        assert part in str(error.value)
    with pytest.raises(ValueError, match="is not a folder"):
        _convert(release, tmp_path / "missing", out)
    _assert_nothing_written(out)


@pytest.mark.parametrize("with_index", [True, False])
def test_missing_llm_shard_is_named(release, tmp_path, with_index):
    ckpts = _copy_release(release, tmp_path)
    (ckpts / "llm-retrained" / LLM_SHARDS[1]).unlink()
    if not with_index:
        (ckpts / "llm-retrained" / "pytorch_model.bin.index.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"LLM shards .*missing.*{LLM_SHARDS[1]}"):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


def test_prior_with_a_missing_key_is_named(release, tmp_path):
    ckpts = _copy_release(release, tmp_path)
    state = dict(release.prior_state)
    del state["input_sequence_embed_linear.3.bias"]
    torch.save(state, ckpts / "prior" / "model.bin")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"prior/model\.bin.*missing keys.*input_sequence_embed_linear\.3\.bias"):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "width, hidden_sizes, match",
    [
        (64, None, "cross_attention_dim=64.*cross_attention_dim=32"),
        (None, [16, 16, 16], r"hidden sizes \[16, 16, 16\].*have \[8, 8, 8, 16\]"),
    ],
)
def test_ip_adapter_for_another_unet_is_rejected(release, tmp_path, width, hidden_sizes, match):
    assert unet_cross_attention_hidden_sizes(release.unet) == [8, 8, 8, 16]
    ckpts = _copy_release(release, tmp_path)
    generator = torch.Generator().manual_seed(8)
    sizes = hidden_sizes or unet_cross_attention_hidden_sizes(release.unet)
    torch.save(
        _official_ip_adapter(release.unet, generator, width=width, hidden_sizes=sizes),
        ckpts / "sdxl" / "ip_adapter_global_local_2_view.bin",
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"ip_adapter_global_local_2_view\.bin does not fit the decoder.*{match}"):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


def test_non_weights_only_pickle_is_refused(release, tmp_path):
    ckpts = _copy_release(release, tmp_path)
    torch.save({"state_dict": release.prior_state, "args": argparse.Namespace(lr=1e-4)}, ckpts / "prior" / "model.bin")
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"Refusing to load .*prior/model\.bin: it holds the Python object `argparse\.Namespace`"
    ):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


def test_unknown_llm_key_is_named(release, tmp_path):
    ckpts = _copy_release(release, tmp_path)
    llm_dir = ckpts / "llm-retrained"
    shard = torch.load(llm_dir / LLM_SHARDS[1], weights_only=True)
    shard["model.audio_tower.proj.weight"] = torch.zeros(2, 2)
    torch.save(shard, llm_dir / LLM_SHARDS[1])
    index = json.loads((llm_dir / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.audio_tower.proj.weight"] = LLM_SHARDS[1]
    (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"unknown keys .*InstructAny2Pix/LLaVA module.*model\.audio_tower\.proj\.weight"
    ):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "key, match",
    [
        ("model.norm.weight", r"unexpected shapes: model\.norm\.weight: checkpoint \(3,\), expected \(32,\)"),
        # Adapter keys are reported under their official names.
        ("model.vae_predictor_image.2.bias", r"unexpected shapes: model\.vae_predictor_image\.2\.bias: checkpoint"),
    ],
)
def test_wrongly_shaped_llm_weight_is_named(release, tmp_path, key, match):
    ckpts = _copy_release(release, tmp_path)
    llm_dir = ckpts / "llm-retrained"
    shard_name = json.loads((llm_dir / "pytorch_model.bin.index.json").read_text())["weight_map"][key]
    shard = torch.load(llm_dir / shard_name, weights_only=True)
    shard[key] = torch.zeros(3)
    torch.save(shard, llm_dir / shard_name)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


def test_special_token_ids_that_differ_from_added_tokens_json_are_rejected(release, tmp_path):
    ckpts = _copy_release(release, tmp_path)
    added = ckpts / "llm-retrained" / "tokenizer" / "added_tokens.json"
    ids = json.loads(added.read_text())
    ids["<video>"], ids["<base>"] = ids["<base>"], ids["<video>"]
    added.write_text(json.dumps(ids))
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"differ from added_tokens\.json: <video>: tokenizer \d+, added_tokens\.json \d+"
    ):
        _convert(release, ckpts, out)
    _assert_nothing_written(out)


def test_existing_output_is_kept_on_failure(release, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        _convert(release, release.root, out)
    ckpts = _copy_release(release, tmp_path)
    (ckpts / "imagebind_huge.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"Refusing to load .*imagebind_huge\.pth: it is not a weights-only pickle"):
        _convert(release, ckpts, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "out"]


def test_bad_decoder_and_settings_fail_before_any_conversion(release, tmp_path):
    out = tmp_path / "out"
    not_a_pipeline = tmp_path / "decoder"
    not_a_pipeline.mkdir()
    with pytest.raises(ValueError, match="without model_index.json"):
        _convert(release, release.root, out, decoder=str(not_a_pipeline))
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        _convert(release, release.root, out, decoder=str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ValueError, match=r"unknown sections \['unet'\]"):
        _convert(release, release.root, out, config_overrides={"unet": {}})
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        _convert(release, release.root, out, dtype="float8")
    _assert_nothing_written(out)


def test_command_line_reports_errors_with_exit_status_1(release, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint_dir", str(tmp_path), "--output_dir", str(out), "--decoder", str(release.decoder_dir)])
    assert exit_info.value.code == 1
    assert "error:" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_part_level_errors_name_the_problem(release, tmp_path):
    with pytest.raises(ValueError, match="Checkpoint file not found"):
        load_weights_file(tmp_path / "nothing.bin")
    with pytest.raises(ValueError, match="`model_type` is 'gpt2'"):
        official_llm_config({"model_type": "gpt2"})
    wrong_tokens = dict(release.ip_adapter["image_proj"], **{"proj.weight": torch.zeros(3 * 32, EMBED)})
    with pytest.raises(ValueError, match=r"proj\.weight` must have shape \(4·32, image_embed_dim\)"):
        two_view_image_proj_to_standard(wrong_tokens)
    with pytest.raises(ValueError, match=r"`view` must be an int in \[0, 2\)"):
        two_view_image_proj_to_standard(release.ip_adapter["image_proj"], view=2)
    renumbered = {
        "image_proj": release.ip_adapter["image_proj"],
        "ip_adapter": {"2.to_k_ip.weight": torch.zeros(8, 32)},
    }
    with pytest.raises(ValueError, match=r"numbered 1, 3, 5, … .*got \[2\]"):
        convert_official_ip_adapter(renumbered)
    with pytest.raises(ValueError, match="exactly the entries 'image_proj' and 'ip_adapter'"):
        convert_official_ip_adapter({"image_proj": release.ip_adapter["image_proj"]})
