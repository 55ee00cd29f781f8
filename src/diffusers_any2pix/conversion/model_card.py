"""The model card (`README.md`) written next to a pipeline converted from the official InstructAny2Pix release."""

from typing import TYPE_CHECKING

from huggingface_hub import ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


if TYPE_CHECKING:
    from .official import OfficialConversionReport


# The official release on the Hub (REFERENCE.md §1).
OFFICIAL_RELEASE_REPO = "jacklishufan/instructany2pix_retrained"

# What each setting of `edit_defaults` is called in the official code (REFERENCE.md §4).
_OFFICIAL_NAMES = {
    "structure_preservation": "`alpha`",
    "embedding_weights": "`h`",
    "embedding_norm": "`norm`",
    "num_inference_steps": "`steps`",
    "guidance_scale": "`cfg`",
    "ip_adapter_scale": "`scale`",
    "prior_guidance_scale": "hard-coded",
    "prior_score": "hard-coded",
    "llm_do_sample": "hard-coded",
    "llm_temperature": "hard-coded",
    "llm_max_new_tokens": "hard-coded",
}


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name


def make_model_card(report: "OfficialConversionReport", repo_id: str | None = None) -> str:
    """Model card for a converted pipeline: usage, official settings, sources and licences, conversion notes.

    Args:
        report (`OfficialConversionReport`): what the conversion did.
        repo_id (`str`, *optional*): the Hub repo the folder is pushed to (used in the usage snippet).

    Returns:
        `str`: the card, YAML metadata included.
    """
    decoder_is_hub = _is_hub_id(report.decoder)
    base_models = [OFFICIAL_RELEASE_REPO, "lmsys/vicuna-7b-v1.5"] + ([report.decoder] if decoder_is_hub else [])
    metadata = ModelCardData(
        license="other",
        license_name="instructany2pix-mixed",
        library_name="diffusers",
        pipeline_tag="image-to-image",
        tags=["instructany2pix", "image-editing", "multimodal", "imagebind", "ip-adapter", "audio"],
        base_model=base_models,
    ).to_yaml()
    location = repo_id or str(report.output_dir)
    load_line = (
        f'path = snapshot_download("{repo_id}")  # InstructAny2PixPipeline loads from a local folder'
        if repo_id
        else f'path = "{location}"'
    )
    decoder_source = (
        f"[{report.decoder}](https://huggingface.co/{report.decoder})" if decoder_is_hub else f"`{report.decoder}`"
    )

    components = [
        ("`image_encoder`", "Meta's ImageBind-huge (`imagebind_huge.pth`)", "CC-BY-NC-SA 4.0"),
        (
            "`llm`, `llm_tokenizer`, `mm_adapter`",
            f"the InstructAny2Pix LLM (`{report.files.llm_dir.name}/`), fine-tuned from lmsys/vicuna-7b-v1.5 "
            "(Llama 2)",
            "Llama 2 Community License (Vicuna v1.5 terms)",
        ),
        (
            "`prior`",
            "the InstructAny2Pix refinement prior (`prior/model.bin`); its text states come from the CLIP ViT-H-14 "
            "text encoder stored in it (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, MIT)",
            "the InstructAny2Pix release's terms",
        ),
        (
            "`ip_adapter`",
            f"the InstructAny2Pix IP-Adapter (`{report.files.ip_adapter.name}`)",
            "the InstructAny2Pix release's terms",
        ),
        (
            "`unet`, `vae`, `text_encoder(_2)`, `tokenizer(_2)`, `scheduler`",
            decoder_source,
            "CreativeML Open RAIL++-M (SDXL)",
        ),
    ]
    component_rows = "\n".join(f"| {name} | {source} | {licence} |" for name, source, licence in components)
    defaults_rows = "\n".join(
        f"| `{name}` | {_OFFICIAL_NAMES.get(name, '—')} | `{value}` |" for name, value in report.edit_defaults.items()
    )
    dropped_llm = "\n".join(
        f"  - `{prefix}*`: {len(keys)} key{'' if len(keys) == 1 else 's'}"
        for prefix, keys in report.dropped_llm_keys.items()
    )
    token_ids = ", ".join(f"`{token}` = {token_id}" for token, token_id in report.special_token_ids.items())
    prior_text = (
        "kept as `prior_text_encoder` / `prior_tokenizer`; the prior also stores the empty-prompt hidden states, so "
        "the default (empty) prompt gives the official output either way."
        if report.prior_text_encoder_kept
        else "reduced to the prior's `empty_text_hidden_states` buffer: the official pipeline always encodes the "
        "empty prompt, so the encoder's output is a constant — its last hidden states for "
        "`<|startoftext|><|endoftext|>`, computed at conversion from the checkpoint's own encoder weights. This is "
        "exact and saves ≈350M parameters."
    )
    imagebind_text = (
        "Its text tokenizer (Meta's CLIP BPE) is saved as `imagebind_tokenizer`, so `llm_rerank_weight` can rerank "
        "the LLM's beams (not measured on these weights)."
        if report.imagebind_tokenizer_saved
        else "No `imagebind_tokenizer` was saved (the release does not ship Meta's BPE file), so "
        "`llm_rerank_weight` is unavailable."
    )
    snapshot_import = "from huggingface_hub import snapshot_download\n" if repo_id else ""

    return f"""---
{metadata}
---

# InstructAny2Pix (diffusers format)

The official weights of **InstructAny2Pix** (Li, Singh, Grover — *InstructAny2Pix: Flexible Visual Editing via
Multimodal Instruction Following*, [arXiv 2312.06738](https://arxiv.org/abs/2312.06738)), converted from
[{OFFICIAL_RELEASE_REPO}](https://huggingface.co/{OFFICIAL_RELEASE_REPO}) into an `InstructAny2PixPipeline` of
`diffusers-any2pix` by `python -m diffusers_any2pix.convert_official`. It edits an image following an instruction
that mixes text, several images and audio clips, e.g. `"add [audio1] to [image1]"`.

## Usage

```python
import torch
{snapshot_import}from diffusers_any2pix import InstructAny2PixPipeline

{load_line}
pipe = InstructAny2PixPipeline.from_pretrained(path, dtype=torch.float16).to("cuda")
# The official demo's settings are the pipeline's defaults (`edit_defaults` in model_index.json).
result = pipe("add [audio1] to [image1]", images=["photo.jpg"], audio=["clock.wav"])
result.images[0].save("edited.png")
```

## Official settings (`edit_defaults` in `model_index.json`)

The settings of the official demo, used by default; any `InstructAny2PixPipeline.__call__` argument overrides them:

| argument | official name | value |
|---|---|---|
{defaults_rows}

The official demo also ran the SDXL refiner (img2img, strength 0.3) on the result; chain
`StableDiffusionXLImg2ImgPipeline` with `stabilityai/stable-diffusion-xl-refiner-1.0` for that.

## Components, sources and licences

| component | source | licence |
|---|---|---|
{component_rows}

Because ImageBind is licensed CC-BY-NC-SA 4.0, this combined model may only be used **non-commercially**, and each
part stays under its own licence (use restrictions of the Llama 2 licence and of OpenRAIL++-M included).

## Conversion notes

- Weights: safetensors only, dtype `{report.dtype}`.
- LLM: a plain transformers `LlamaForCausalLM` (the special-token embedding rows kept); the special tokens sit at
  the official ids ({token_ids}). `model.vae_projector_image.*` / `model.vae_predictor_image.*` became
  `mm_adapter.input_projector` / `mm_adapter.output_head`. Dropped modules that inference never uses:
{dropped_llm or "  - none"}
- Prior: the official key layout is kept. Its CLIP text encoder is {prior_text}
- ImageBind: Meta's checkpoint mapped to `ImageBindModel`; the depth, thermal and IMU modalities
  ({len(report.dropped_imagebind_keys)} keys) are not ported. {imagebind_text}
- IP-Adapter: the official two-view projection in its "global" mode, `LayerNorm(reshape(proj(e), 4×C) +
  raw_embed[0])`, is stored as diffusers' standard 4-token projection with `raw_embed[0]` folded into `proj.bias`
  (lossless); the cross-attention weights are unchanged. It also loads into a plain SDXL pipeline:
  `pipe.load_ip_adapter(path, subfolder="ip_adapter", weight_name="diffusion_pytorch_model.safetensors",
  image_encoder_folder=None)`, with ImageBind embeddings passed as `ip_adapter_image_embeds`.
- Scheduler: DDIM on the decoder's noise schedule (the edit starts from a DDIM inversion of the base image).

## Citation

```bibtex
@article{{li2023instructany2pix,
  title   = {{InstructAny2Pix: Flexible Visual Editing via Multimodal Instruction Following}},
  author  = {{Li, Shufan and Singh, Harkanwar and Grover, Aditya}},
  journal = {{arXiv preprint arXiv:2312.06738}},
  year    = {{2023}}
}}
```
"""
