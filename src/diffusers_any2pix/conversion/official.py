"""Conversion of the official InstructAny2Pix release (shared/REFERENCE.md §1) into an InstructAny2PixPipeline folder.

The official release is a folder (``ckpts/``) of four differently packaged parts:

- ``llm-retrained/``: a LLaVA-style Llama (``model_type="instructany2pix"``) in ``pytorch_model*.bin`` shards with a
  ``tokenizer/`` subfolder; its state dict also holds the media projector/predictor and dead LLaVA modules;
- ``prior/model.bin``: the refinement prior, with a frozen CLIP ViT-H-14 text encoder inside;
- ``imagebind_huge.pth``: Meta's ImageBind-huge;
- ``sdxl/ip_adapter_global_local_2_view.bin``: a two-view IP-Adapter for SDXL on ImageBind embeddings.

[`convert_official_release`] loads and validates every part first — pickles only through
``torch.load(weights_only=True)``; missing files, unknown keys and wrong shapes are reported by name — and only
then writes the pipeline folder, into a staging folder next to the output that is renamed at the end, so a failed
conversion never leaves a half-written folder behind.

Decisions, each explained where it is made:

- the prior's CLIP text encoder is reduced to its empty-prompt hidden states (exact: the official prompt is always
  empty), or kept as ``prior_text_encoder`` on request ([`convert_official_prior`]);
- the IP-Adapter's two-view projection becomes diffusers' standard 4-token layout with the global view folded into
  the bias, losslessly ([`two_view_image_proj_to_standard`]);
- the decoder's scheduler becomes a DDIM scheduler on the decoder's own noise schedule ([`load_decoder`]);
- the official demo's edit settings are recorded as the pipeline's ``edit_defaults`` in ``model_index.json``
  ([`OFFICIAL_EDIT_DEFAULTS`]), so ``pipe(...)`` uses them unless an argument says otherwise.
"""

import importlib.util
import inspect
import json
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import logging

from ..models.imagebind import ImageBindModel, convert_meta_imagebind_state_dict
from ..models.ip_adapter import STANDARD_NUM_TOKENS, ImageBindIPAdapter
from ..models.mm_adapter import MultimodalAdapter
from ..models.prior import Any2PixPrior, PriorConversionReport, text_encoder_from_official_state_dict
from ..multimodal_llm import MULTIMODAL_SPECIAL_TOKENS, MultimodalTokenIds, add_multimodal_tokens
from ..pipeline_instruct_any2pix import BUILTIN_EDIT_DEFAULTS, InstructAny2PixPipeline
from ..processing_imagebind import load_clip_tokenizer
from .model_card import OFFICIAL_RELEASE_REPO, make_model_card


logger = logging.get_logger(__name__)

# Layout of the official release (REFERENCE.md §1), relative to the checkpoint folder.
OFFICIAL_LLM_FOLDER = "llm-retrained"
OFFICIAL_PRIOR_FILE = "prior/model.bin"
OFFICIAL_IMAGEBIND_FILE = "imagebind_huge.pth"
OFFICIAL_IP_ADAPTER_FILE = "sdxl/ip_adapter_global_local_2_view.bin"
DEFAULT_DECODER = "stabilityai/stable-diffusion-xl-base-1.0"

# The official demo app's settings (REFERENCE.md §4 "Defaults", demo column), under the names of
# `InstructAny2PixPipeline.__call__`: the demo differs from the official `__call__` defaults only in alpha
# (→ structure_preservation) and h (→ embedding_weights); refinement (0.3) has no counterpart in the pipeline.
OFFICIAL_EDIT_DEFAULTS: dict[str, Any] = {
    **BUILTIN_EDIT_DEFAULTS,
    "embedding_weights": [0.4, 0.6, 0.4],
    "structure_preservation": 1.0,
}

# The prior's frozen text encoder: the text tower of laion/CLIP-ViT-H-14-laion2B-s32B-b79K in transformers'
# CLIPTextModel layout (only the sizes differ from CLIPTextConfig's defaults).
OFFICIAL_PRIOR_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
OFFICIAL_PRIOR_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# The empty prompt tokenises to <|startoftext|><|endoftext|>, ids 49406 and 49407 in CLIP's BPE vocabulary (shared by
# OpenAI's and open_clip's tokenizers, ViT-H-14's included): the only input the official prior's text encoder sees.
OFFICIAL_CLIP_EMPTY_PROMPT_IDS = (49406, 49407)

# Official LLM modules that are used, and where they go in `MultimodalAdapter`.
_LLM_ADAPTER_PREFIXES = {
    "model.vae_projector_image.": "input_projector.",
    "model.vae_predictor_image.": "output_head.",
}
# Official LLM modules that inference never runs (REFERENCE.md §2), with why.
_LLM_DEAD_PREFIXES = {
    "model.mm_projector.": "LLaVA's image-patch projector; media enter through vae_projector_image",
    "model.vision_tower.": "LLaVA's CLIP vision tower; media are encoded by ImageBind",
    "model.vae_projector_audio.": "audio projector; audio also goes through the image projector",
    "model.vae_predictor_audio.": "audio predictor; audio outputs are read through the image predictor",
}
_OFFICIAL_LLM_MODEL_TYPES = ("instructany2pix", "llama")

_LLM_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_LLM_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_LLM_SHARD_PATTERN = re.compile(
    r"^(?P<stem>model|pytorch_model)-(?P<index>\d+)-of-(?P<total>\d+)\.(?P<ext>safetensors|bin)$"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_TWO_VIEW_IMAGE_PROJ_KEYS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias", "raw_embed")
_IP_ADAPTER_KEY = re.compile(r"^(?P<index>\d+)\.to_(?P<kv>[kv])_ip\.weight$")

_DECODER_REQUIRED = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_DECODER_OPTIONAL = ("text_encoder_2", "tokenizer_2")

CONFIG_OVERRIDE_SECTIONS = ("image_encoder", "prior", "prior_text_encoder")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_WEIGHTS_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
_MAX_NAMES = 20


# ------------------------------------------------------------------------------------------------ small helpers


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f", … and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Could not read the JSON file {path}: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}.")
    return content


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}.")


def load_weights_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without ever executing code from it.

    ``.safetensors`` files are read with safetensors; everything else goes through
    ``torch.load(..., weights_only=True)`` (memory-mapped for zip-format files, so multi-GB shards stay on disk until
    their tensors are used). A pickle that holds anything but tensors and plain containers is refused.

    Args:
        path (`str` or `os.PathLike`): the file.

    Returns:
        What the file holds (a state dict, or for the IP-Adapter a dict of state dicts).

    Raises:
        ValueError: naming the file, when it is missing, unreadable, or not a weights-only pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt files
            raise ValueError(f"Could not read the safetensors file {path}: {error}") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        detail = _WEIGHTS_UNPICKLER_DETAIL.search(str(error))
        if found:
            what = f"it holds the Python object `{found.group(1)}`, and unpickling it could execute code from the file"
        else:
            what = f"it is not a weights-only pickle ({detail.group(1) if detail else 'unreadable'})"
        raise ValueError(
            f"Refusing to load {path}: {what}. Only weights-only pickles (tensors in dicts/lists, readable with "
            "`torch.load(..., weights_only=True)`) and safetensors files are accepted; re-save the state dict from a "
            "trusted environment with `torch.save(state_dict, path)`, or convert it to safetensors."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"Could not read {path} as a PyTorch checkpoint: {error}") from error


def _tensor_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Check that a loaded object is a flat state dict (names → tensors); returns a shallow copy."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} must hold a state dict (names → tensors), got {type(obj).__name__}.")
    bad = [str(key) for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{source} must map names to tensors; these entries are not tensors: {_names(bad)}.")
    return dict(obj)


def _check_state_dict(
    expected: Mapping[str, torch.Size],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    official_name: Callable[[str], str] = lambda key: key,
    unexpected_hint: str = "",
) -> None:
    """Raise one ValueError listing every missing, unknown and wrongly shaped key (in the checkpoint's names)."""
    missing = sorted(official_name(key) for key in set(expected) - set(state_dict))
    unexpected = sorted(official_name(key) for key in set(state_dict) - set(expected))
    mismatched = [
        f"{official_name(key)}: checkpoint {tuple(state_dict[key].shape)}, expected {tuple(shape)}"
        for key, shape in sorted(expected.items())
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unknown keys{unexpected_hint}: {_names(unexpected)}")
    if mismatched:
        problems.append(f"unexpected shapes: {_names(mismatched)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")


def _load_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    official_name: Callable[[str], str] = lambda key: key,
) -> None:
    """Strict `load_state_dict` whose errors name the checkpoint's keys (checked before anything is copied)."""
    expected = {key: value.shape for key, value in module.state_dict().items()}
    _check_state_dict(expected, state_dict, source, official_name)
    module.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------------------------ release layout


@dataclass
class OfficialReleaseFiles:
    """Where the parts of an official release are (see [`locate_official_release`]).

    Args:
        checkpoint_dir (`Path`): the release folder (`ckpts/`).
        llm_dir (`Path`): the LLM folder (`config.json` and weights).
        llm_weights (`list[Path]`): the LLM weight files, every shard of a sharded checkpoint.
        llm_tokenizer_dir (`Path`): the folder of the LLM's tokenizer (`tokenizer/`, or `llm_dir` itself).
        prior (`Path`): the prior's state dict.
        imagebind (`Path`): Meta's ImageBind checkpoint.
        ip_adapter (`Path`): the two-view IP-Adapter.
    """

    checkpoint_dir: Path
    llm_dir: Path
    llm_weights: list[Path]
    llm_tokenizer_dir: Path
    prior: Path
    imagebind: Path
    ip_adapter: Path


def _find_llm_weights(llm_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The LLM's weight files (and the index's key → shard map when there is an index); every shard must exist."""
    for index_name in _LLM_INDEX_FILES:
        index_path = llm_dir / index_name
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no `weight_map` (key → shard file).")
            shards = sorted(set(weight_map.values()))
            missing = [name for name in shards if not (llm_dir / name).is_file()]
            if missing:
                raise ValueError(f"LLM shards listed in {index_path} are missing: {_names(missing)}")
            return [llm_dir / name for name in shards], weight_map
    for name in _LLM_SINGLE_FILES:
        if (llm_dir / name).is_file():
            return [llm_dir / name], None
    # Shards without an index: the whole `-of-N` series must be there.
    series: dict[tuple[str, str, str], set[int]] = {}
    for path in llm_dir.iterdir():
        match = _LLM_SHARD_PATTERN.match(path.name)
        if match:
            series.setdefault((match["stem"], match["total"], match["ext"]), set()).add(int(match["index"]))
    if len(series) == 1:
        (stem, total, ext), _ = series.popitem()
        names = [f"{stem}-{i:0{len(total)}d}-of-{total}.{ext}" for i in range(1, int(total) + 1)]
        missing = [name for name in names if not (llm_dir / name).is_file()]
        if missing:
            raise ValueError(f"LLM shards are missing from {llm_dir}: {_names(missing)}")
        return [llm_dir / name for name in names], None
    raise ValueError(
        f"No LLM weights found in {llm_dir}: expected one of {', '.join(_LLM_INDEX_FILES + _LLM_SINGLE_FILES)}, or "
        "one complete `pytorch_model-XXXXX-of-XXXXX.bin` series."
    )


def _find_tokenizer_dir(llm_dir: Path) -> Path | None:
    # The official release keeps the tokenizer in a `tokenizer/` subfolder; a plain HF folder keeps it alongside.
    for candidate in (llm_dir / "tokenizer", llm_dir):
        if candidate.is_dir() and any((candidate / name).is_file() for name in _TOKENIZER_FILES):
            return candidate
    return None


def locate_official_release(
    checkpoint_dir: str | os.PathLike,
    llm_folder: str = OFFICIAL_LLM_FOLDER,
    prior_file: str = OFFICIAL_PRIOR_FILE,
    imagebind_file: str = OFFICIAL_IMAGEBIND_FILE,
    ip_adapter_file: str = OFFICIAL_IP_ADAPTER_FILE,
) -> OfficialReleaseFiles:
    """Find every file of an official release, reporting everything that is missing in one error.

    Args:
        checkpoint_dir (`str` or `os.PathLike`): the release folder (the official code's `ckpts/`).
        llm_folder (`str`, defaults to `"llm-retrained"`): the LLM folder inside it (the demo used `llm-instance`).
        prior_file (`str`, defaults to `"prior/model.bin"`): the prior's state dict.
        imagebind_file (`str`, defaults to `"imagebind_huge.pth"`): Meta's ImageBind checkpoint.
        ip_adapter_file (`str`, defaults to `"sdxl/ip_adapter_global_local_2_view.bin"`): the IP-Adapter.

    Returns:
        [`OfficialReleaseFiles`]

    Raises:
        ValueError: listing every missing folder, file and LLM shard.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(
            f"`checkpoint_dir` {root} is not a folder: expected the official release folder (`ckpts/`) holding "
            f"{llm_folder}/, {prior_file}, {imagebind_file} and {ip_adapter_file}."
        )
    problems = []
    llm_dir = root / llm_folder
    llm_weights: list[Path] = []
    tokenizer_dir = None
    if not llm_dir.is_dir():
        problems.append(f"the LLM folder {llm_folder}/ is missing")
    else:
        if not (llm_dir / "config.json").is_file():
            problems.append(f"{llm_folder}/config.json is missing")
        try:
            llm_weights, _ = _find_llm_weights(llm_dir)
        except ValueError as error:
            problems.append(str(error))
        tokenizer_dir = _find_tokenizer_dir(llm_dir)
        if tokenizer_dir is None:
            problems.append(f"the LLM tokenizer is missing (expected {llm_folder}/tokenizer/ with tokenizer files)")
    for what, relative in (("prior", prior_file), ("ImageBind", imagebind_file), ("IP-Adapter", ip_adapter_file)):
        if not (root / relative).is_file():
            problems.append(f"the {what} checkpoint {relative} is missing")
    if problems:
        raise ValueError(
            f"{root} is not a complete official InstructAny2Pix release ({OFFICIAL_RELEASE_REPO}): "
            + "; ".join(problems)
            + ". Point `checkpoint_dir` at the official `ckpts/` folder, or name the parts with "
            "--llm_folder/--prior_file/--imagebind_file/--ip_adapter_file."
        )
    return OfficialReleaseFiles(
        checkpoint_dir=root,
        llm_dir=llm_dir,
        llm_weights=llm_weights,
        llm_tokenizer_dir=tokenizer_dir,
        prior=root / prior_file,
        imagebind=root / imagebind_file,
        ip_adapter=root / ip_adapter_file,
    )


# ------------------------------------------------------------------------------------------------ LLM


@dataclass
class ConvertedLLM:
    """Result of [`convert_official_llm`].

    Args:
        llm (`LlamaForCausalLM`): the language model, special-token embedding rows included.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, the nine special tokens at the official ids.
        mm_adapter (`MultimodalAdapter`): `model.vae_projector_image.*` / `model.vae_predictor_image.*`.
        token_ids (`MultimodalTokenIds`): the special-token ids.
        dropped_keys (`dict[str, list[str]]`): per dead module prefix, the keys dropped.
        ignored_buffers (`list[str]`): rotary `inv_freq` buffers of older transformers (recomputed).
        dropped_config_keys (`list[str]`): `config.json` entries that are not Llama settings (LLaVA's `mm_*` …).
    """

    llm: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    mm_adapter: MultimodalAdapter
    token_ids: MultimodalTokenIds
    dropped_keys: dict[str, list[str]] = field(default_factory=dict)
    ignored_buffers: list[str] = field(default_factory=list)
    dropped_config_keys: list[str] = field(default_factory=list)


def _llama_config_fields() -> set[str]:
    fields = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self", "args", "kwargs"}
    # Vicuna's config.json still uses the legacy RoPE names, which LlamaConfig converts. Provenance entries
    # (architectures, versions, the stored dtype) are written anew when the model is saved.
    return (fields | {"rope_theta", "rope_scaling"}) - {"architectures", "transformers_version", "dtype"}


def official_llm_config(config: Mapping[str, Any], source: str = "config.json") -> tuple[LlamaConfig, list[str]]:
    """Turn the official LLM's `config.json` (`model_type="instructany2pix"`, a LLaVA Llama) into a `LlamaConfig`.

    Args:
        config (`Mapping[str, Any]`): the parsed `config.json` (not modified).
        source (`str`): the file, for error messages.

    Returns:
        `tuple[LlamaConfig, list[str]]`: the config and the entries dropped because they are not Llama settings
        (LLaVA's `mm_*` settings, `torch_dtype`, …).
    """
    model_type = config.get("model_type")
    if model_type not in _OFFICIAL_LLM_MODEL_TYPES:
        raise ValueError(
            f"{source}: `model_type` is {model_type!r}, expected one of {_OFFICIAL_LLM_MODEL_TYPES} (the official "
            "InstructAny2Pix LLM is a LLaVA-style Llama)."
        )
    accepted = _llama_config_fields()
    kept = {key: value for key, value in config.items() if key in accepted}
    dropped = sorted(key for key in config if key not in accepted and key != "model_type")
    # The official code generates without the KV cache (REFERENCE.md §6); the converted LLM always uses it.
    kept["use_cache"] = True
    try:
        return LlamaConfig(**kept), dropped
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: not a valid Llama configuration: {error}") from error


def _load_sharded_state_dict(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in files:
        shard = _tensor_dict(load_weights_file(path), str(path))
        repeated = sorted(set(shard) & set(merged))
        if repeated:
            raise ValueError(f"{path} repeats keys of another shard: {_names(repeated)}.")
        merged.update(shard)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(merged))
        unlisted = sorted(set(merged) - set(weight_map))
        if absent or unlisted:
            raise ValueError(
                f"The LLM shards in {files[0].parent} disagree with their index: keys listed but absent "
                f"{_names(absent) or 'none'}; keys present but not listed {_names(unlisted) or 'none'}."
            )
    return merged


def split_official_llm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Sort the official LLM's keys into Llama weights, adapter weights, dead modules and stale buffers.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the merged official state dict (not modified).

    Returns:
        `(llm_state, adapter_state, dropped, ignored)`: Llama keys as stored; `MultimodalAdapter` keys
        (`input_projector.*` ← `model.vae_projector_image.*`, `output_head.*` ← `model.vae_predictor_image.*`);
        per dead prefix, its keys; rotary `inv_freq` buffers of older transformers.
    """
    llm_state: dict[str, torch.Tensor] = {}
    adapter_state: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        adapter_prefix = next((p for p in _LLM_ADAPTER_PREFIXES if key.startswith(p)), None)
        dead_prefix = next((p for p in _LLM_DEAD_PREFIXES if key.startswith(p)), None)
        if adapter_prefix is not None:
            adapter_state[_LLM_ADAPTER_PREFIXES[adapter_prefix] + key[len(adapter_prefix) :]] = value
        elif dead_prefix is not None:
            dropped.setdefault(dead_prefix, []).append(key)
        elif key.endswith(".rotary_emb.inv_freq"):
            ignored.append(key)
        else:
            llm_state[key] = value
    return llm_state, adapter_state, {prefix: sorted(keys) for prefix, keys in dropped.items()}, sorted(ignored)


def _adapter_key_to_official(key: str) -> str:
    for official, ours in _LLM_ADAPTER_PREFIXES.items():
        if key.startswith(ours):
            return official + key[len(ours) :]
    return key


def load_official_llm_tokenizer(
    tokenizer_dir: str | os.PathLike, num_embeddings: int
) -> tuple[PreTrainedTokenizerBase, MultimodalTokenIds]:
    """Load the official LLM tokenizer and check the nine special tokens sit at the official ids.

    The official code added the tokens in one call, in `MULTIMODAL_SPECIAL_TOKENS` order, so they must have consecutive
    ids in that order, equal to those of `added_tokens.json` when the folder has one, and below `num_embeddings`
    (their embedding rows are trained). The pad token becomes `<unk>` when unset, as in the official setup.

    Args:
        tokenizer_dir (`str` or `os.PathLike`): the tokenizer folder.
        num_embeddings (`int`): rows of the LLM's token embedding.

    Returns:
        `tuple[PreTrainedTokenizerBase, MultimodalTokenIds]`
    """
    tokenizer_dir = Path(tokenizer_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as error:  # transformers raises many types for unreadable tokenizer folders
        hint = ""
        if (
            (tokenizer_dir / "tokenizer.model").is_file()
            and not (tokenizer_dir / "tokenizer.json").is_file()
            and importlib.util.find_spec("sentencepiece") is None
        ):
            hint = (
                " The folder only has a SentencePiece `tokenizer.model`: install `sentencepiece` and `protobuf` so "
                "transformers can read it."
            )
        reason = str(error).rstrip(". ")
        raise ValueError(f"Could not load the LLM tokenizer from {tokenizer_dir}: {reason}.{hint}") from error

    vocab = tokenizer.get_vocab()
    absent = [token for token in MULTIMODAL_SPECIAL_TOKENS if token not in vocab]
    if absent:
        raise ValueError(f"The LLM tokenizer in {tokenizer_dir} lacks the official special tokens {absent}.")
    ids = dict(
        zip(MULTIMODAL_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(MULTIMODAL_SPECIAL_TOKENS)), strict=True)
    )
    added_path = tokenizer_dir / "added_tokens.json"
    if added_path.is_file():
        official = _read_json(added_path)
        differing = [
            f"{token}: tokenizer {token_id}, added_tokens.json {official.get(token)}"
            for token, token_id in ids.items()
            if official.get(token) != token_id
        ]
        if differing:
            raise ValueError(
                f"The special-token ids of the LLM tokenizer in {tokenizer_dir} differ from {added_path.name}: "
                f"{'; '.join(differing)}. The trained embedding rows belong to the official ids."
            )
    first = ids[MULTIMODAL_SPECIAL_TOKENS[0]]
    if list(ids.values()) != list(range(first, first + len(ids))):
        raise ValueError(
            f"The special tokens of the LLM tokenizer in {tokenizer_dir} are not at consecutive ids in the official "
            f"order {list(MULTIMODAL_SPECIAL_TOKENS)}: got {ids}."
        )
    if max(ids.values()) >= num_embeddings:
        raise ValueError(
            f"The special-token ids {ids} of the LLM tokenizer in {tokenizer_dir} exceed the LLM's {num_embeddings} "
            "embedding rows."
        )
    # All tokens are present, so this only sets the official pad token (<unk>) when none is set.
    token_ids = add_multimodal_tokens(tokenizer)
    return tokenizer, token_ids


def convert_official_llm(
    llm_dir: str | os.PathLike,
    dtype: str | torch.dtype = torch.float32,
    tokenizer_dir: str | os.PathLike | None = None,
) -> ConvertedLLM:
    """Convert the official LLM folder: a plain `LlamaForCausalLM`, its tokenizer and the `MultimodalAdapter`.

    Keeps every Llama weight (the special-token embedding rows included), moves `model.vae_projector_image.*` /
    `model.vae_predictor_image.*` into the adapter, drops the dead LLaVA modules (REFERENCE.md §2; listed in the log)
    and rejects any other key.

    Args:
        llm_dir (`str` or `os.PathLike`): the LLM folder (`config.json`, `pytorch_model*.bin` shards or safetensors).
        dtype (`str` or `torch.dtype`, defaults to float32): dtype of the returned LLM and adapter.
        tokenizer_dir (`str` or `os.PathLike`, *optional*): the tokenizer folder (default: `llm_dir/tokenizer`, or
            `llm_dir`).

    Returns:
        [`ConvertedLLM`]

    Raises:
        ValueError: naming the file and keys for missing shards, unknown keys and wrong shapes.
    """
    dtype = _resolve_dtype(dtype)
    llm_dir = Path(llm_dir)
    config_path = llm_dir / "config.json"
    config, dropped_config = official_llm_config(_read_json(config_path), source=str(config_path))
    weight_files, weight_map = _find_llm_weights(llm_dir)
    llm_state, adapter_state, dropped, ignored = split_official_llm_state_dict(
        _load_sharded_state_dict(weight_files, weight_map)
    )

    embeddings = llm_state.get("model.embed_tokens.weight")
    if embeddings is not None and embeddings.ndim == 2 and embeddings.shape[0] != config.vocab_size:
        # The embedding matrix (grown for the special tokens) is authoritative over a stale `vocab_size`.
        logger.warning(
            f"{config_path}: vocab_size {config.vocab_size} differs from the {embeddings.shape[0]} rows of "
            "model.embed_tokens.weight; using the checkpoint's row count."
        )
        config.vocab_size = embeddings.shape[0]
    with torch.device("meta"):
        expected = {key: value.shape for key, value in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" not in llm_state:
        expected.pop("lm_head.weight", None)
    _check_state_dict(
        expected,
        llm_state,
        f"LLM weights in {llm_dir}",
        unexpected_hint=" (neither Llama weights nor a known InstructAny2Pix/LLaVA module)",
    )

    first_projector = adapter_state.get("input_projector.0.weight")
    if first_projector is None or first_projector.ndim != 2:
        raise ValueError(
            f"LLM weights in {llm_dir}: the media projector `model.vae_projector_image.0.weight` is missing or not a "
            "matrix; it is part of every InstructAny2Pix LLM."
        )
    mm_adapter = MultimodalAdapter(embed_dim=first_projector.shape[1], llm_hidden_size=config.hidden_size)
    _load_checked(mm_adapter, adapter_state, f"LLM weights in {llm_dir}", official_name=_adapter_key_to_official)

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else _find_tokenizer_dir(llm_dir)
    if tokenizer_dir is None:
        raise ValueError(f"No tokenizer found for the LLM in {llm_dir} (expected a `tokenizer/` subfolder).")
    tokenizer, token_ids = load_official_llm_tokenizer(tokenizer_dir, num_embeddings=config.vocab_size)

    llm = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=llm_state, dtype=dtype).eval()
    for prefix, keys in dropped.items():
        logger.info(f"LLM: dropped {len(keys)} keys of {prefix}* ({_LLM_DEAD_PREFIXES[prefix]}): {_names(keys)}")
    if ignored:
        logger.info(f"LLM: ignored {len(ignored)} rotary inv_freq buffers of an older transformers (recomputed).")
    if dropped_config:
        logger.info(f"LLM: config.json entries that are not Llama settings, dropped: {', '.join(dropped_config)}")
    logger.info(
        f"LLM: special tokens at ids {dict(zip(MULTIMODAL_SPECIAL_TOKENS, token_ids.special_token_ids, strict=True))}"
    )
    return ConvertedLLM(
        llm=llm,
        tokenizer=tokenizer,
        mm_adapter=mm_adapter.to(dtype).eval(),
        token_ids=token_ids,
        dropped_keys=dropped,
        ignored_buffers=ignored,
        dropped_config_keys=dropped_config,
    )


# ------------------------------------------------------------------------------------------------ prior


@dataclass
class ConvertedPrior:
    """Result of [`convert_official_prior`].

    Args:
        prior (`Any2PixPrior`): the prior, `empty_text_hidden_states` set from the checkpoint's text encoder.
        text_encoder (`CLIPTextModel`, *optional*): the checkpoint's CLIP text encoder, when it was kept.
        report (`PriorConversionReport`): what happened to each key.
    """

    prior: Any2PixPrior
    text_encoder: CLIPTextModel | None
    report: PriorConversionReport


@torch.no_grad()
def _empty_prompt_hidden_states(text_encoder: CLIPTextModel, token_ids: tuple[int, int]) -> torch.Tensor:
    vocab_size = text_encoder.config.vocab_size
    if len(token_ids) != 2 or any(not 0 <= int(i) < vocab_size for i in token_ids):
        raise ValueError(
            f"`empty_prompt_ids` must be the 2 ids (BOS, EOS) of the empty prompt, below the text encoder's vocab "
            f"size {vocab_size}; got {token_ids}."
        )
    input_ids = torch.tensor([[int(i) for i in token_ids]])
    return text_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state[0]


def convert_official_prior(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    prior_config: Mapping[str, Any] | None = None,
    text_encoder_config: Mapping[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep_text_encoder: bool = False,
    empty_prompt_ids: tuple[int, int] = OFFICIAL_CLIP_EMPTY_PROMPT_IDS,
) -> ConvertedPrior:
    r"""Convert the official `prior/model.bin` into an [`Any2PixPrior`], resolving its CLIP text encoder.

    The checkpoint holds a frozen CLIP ViT-H-14 text encoder (`cond_stage_models.0.model.*`, transformers'
    `CLIPTextModel` layout, ≈350M parameters). The official pipeline only ever encodes the empty prompt, so the
    encoder's contribution is a constant: its last hidden states for `<|startoftext|><|endoftext|>`. By default the
    encoder is rebuilt from the checkpoint's own weights, run once on the empty prompt, and reduced to the prior's
    `empty_text_hidden_states` buffer — exactly the official computation, without shipping the encoder. With
    `keep_text_encoder=True` it is also returned, to be saved as `prior_text_encoder` for prompts other than `""`.

    Args:
        path_or_state_dict (`str`, `os.PathLike` or mapping): the official file or its state dict (not modified).
        prior_config (`Mapping[str, Any]`, *optional*): [`Any2PixPrior`] config overrides (default: official sizes).
        text_encoder_config (`Mapping[str, Any]`, *optional*): `CLIPTextConfig` overrides of
            `OFFICIAL_PRIOR_TEXT_ENCODER_CONFIG` (CLIP ViT-H-14's text tower).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): a CLIP tokenizer. When given it tokenises the empty prompt
            (and is the `prior_tokenizer` to save with a kept encoder); otherwise `empty_prompt_ids` are used.
        keep_text_encoder (`bool`, defaults to `False`): also return the text encoder (needs `tokenizer`).
        empty_prompt_ids (`tuple[int, int]`, defaults to `(49406, 49407)`): the empty prompt's BOS and EOS ids in
            CLIP's vocabulary, used without `tokenizer`.

    Returns:
        [`ConvertedPrior`] (float32, eval mode).

    Raises:
        ValueError: naming the file and the keys when the prior or its text encoder does not match the config.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        state_dict = _tensor_dict(load_weights_file(path_or_state_dict), source)
    else:
        source = "the prior state dict"
        state_dict = _tensor_dict(path_or_state_dict, source)
    if keep_text_encoder and tokenizer is None:
        raise ValueError("`keep_text_encoder=True` needs the CLIP `tokenizer`, saved with it as `prior_tokenizer`.")
    text_keys = sorted(key for key in state_dict if key.startswith("cond_stage_models."))
    if not text_keys:
        raise ValueError(
            f"{source} holds no CLIP text encoder (`cond_stage_models.0.model.*`); the prior's empty-prompt hidden "
            "states are computed from it."
        )
    try:
        clip_config = CLIPTextConfig(**{**OFFICIAL_PRIOR_TEXT_ENCODER_CONFIG, **dict(text_encoder_config or {})})
        text_encoder = text_encoder_from_official_state_dict(state_dict, text_keys, clip_config)
        if tokenizer is not None:
            prior, report = Any2PixPrior.from_official_state_dict(
                state_dict, text_encoder=text_encoder, tokenizer=tokenizer, **dict(prior_config or {})
            )
        else:
            prior, report = Any2PixPrior.from_official_state_dict(
                state_dict,
                empty_text_hidden_states=_empty_prompt_hidden_states(text_encoder, empty_prompt_ids),
                **dict(prior_config or {}),
            )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
    report.empty_text_hidden_states_source = "checkpoint_text_encoder"
    logger.info(
        f"Prior: {len(report.loaded_keys)} keys loaded; the CLIP text encoder ({len(text_keys)} keys) "
        + ("kept as prior_text_encoder and " if keep_text_encoder else "")
        + "reduced to the empty prompt's hidden states."
    )
    return ConvertedPrior(prior=prior, text_encoder=text_encoder if keep_text_encoder else None, report=report)


# ------------------------------------------------------------------------------------------------ ImageBind


@dataclass
class ConvertedImageBind:
    """Result of [`convert_official_imagebind`].

    Args:
        model (`ImageBindModel`): the encoder (float32, eval mode).
        dropped_keys (`list[str]`): Meta keys of the unported modalities (depth, thermal, IMU).
    """

    model: ImageBindModel
    dropped_keys: list[str]


def convert_official_imagebind(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> ConvertedImageBind:
    """Convert Meta's `imagebind_huge.pth` into our [`ImageBindModel`] (strict; depth/thermal/IMU dropped).

    Args:
        path_or_state_dict (`str`, `os.PathLike` or mapping): Meta's checkpoint or its state dict (not modified).
        config (`Mapping[str, Any]`, *optional*): [`ImageBindModel`] config overrides (default: imagebind_huge).

    Returns:
        [`ConvertedImageBind`]
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        state_dict = _tensor_dict(load_weights_file(path_or_state_dict), source)
    else:
        source = "the ImageBind state dict"
        state_dict = _tensor_dict(path_or_state_dict, source)
    try:
        _, dropped = convert_meta_imagebind_state_dict(state_dict)
        model = ImageBindModel.from_meta_checkpoint(state_dict, **dict(config or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
    logger.info(f"ImageBind: dropped {len(dropped)} keys of the unported depth/thermal/IMU modalities.")
    return ConvertedImageBind(model=model, dropped_keys=dropped)


# ------------------------------------------------------------------------------------------------ IP-Adapter


@dataclass
class ConvertedIPAdapter:
    """Result of [`convert_official_ip_adapter`].

    Args:
        adapter (`ImageBindIPAdapter`): the adapter in diffusers' standard layout (float32).
        dropped (`list[str]`): official entries that the standard layout does not keep (the unused view).
    """

    adapter: ImageBindIPAdapter
    dropped: list[str]


def two_view_image_proj_to_standard(image_proj: Mapping[str, torch.Tensor], view: int = 0) -> dict[str, torch.Tensor]:
    r"""Convert the official two-view `image_proj` into a standard 4-token IP-Adapter projection, losslessly.

    The official projection maps each view's vector `e` to `LayerNorm(reshape(proj(e), 4×C) + raw_embed[view])`.
    The official pipeline uses only the global view (`view=0`). Adding `raw_embed[view]` to each of the 4 token
    slices of `proj.bias` gives a standard projection `LayerNorm(reshape(proj'(e), 4×C))` with the same weight
    and LayerNorm, i.e. diffusers' `ImageProjection` — equal for every input, the zero (unconditional) input included.

    Args:
        image_proj (`Mapping[str, torch.Tensor]`): `proj.weight` (4·C, E), `proj.bias` (4·C), `norm.weight`,
            `norm.bias` (C) and `raw_embed` (views, C). Not modified.
        view (`int`, defaults to 0): the view to fold in (0 = global, what the official pipeline uses).

    Returns:
        `dict[str, torch.Tensor]`: `proj.weight`, `proj.bias` (float32: the fold is computed in float32),
        `norm.weight`, `norm.bias`.
    """
    image_proj = _tensor_dict(image_proj, "`image_proj`")
    missing = [key for key in _TWO_VIEW_IMAGE_PROJ_KEYS if key not in image_proj]
    unexpected = sorted(set(image_proj) - set(_TWO_VIEW_IMAGE_PROJ_KEYS))
    if missing or unexpected:
        raise ValueError(
            f"`image_proj` must hold exactly {list(_TWO_VIEW_IMAGE_PROJ_KEYS)} (the official two-view projection): "
            f"missing {missing}, unknown {unexpected}."
        )
    weight, bias = image_proj["proj.weight"], image_proj["proj.bias"]
    norm_weight, norm_bias, raw_embed = image_proj["norm.weight"], image_proj["norm.bias"], image_proj["raw_embed"]
    if norm_weight.ndim != 1 or norm_bias.shape != norm_weight.shape:
        raise ValueError(
            f"`image_proj.norm.weight`/`norm.bias` must be vectors of the token width, got {tuple(norm_weight.shape)} "
            f"and {tuple(norm_bias.shape)}."
        )
    width = norm_weight.shape[0]
    if weight.ndim != 2 or weight.shape[0] != STANDARD_NUM_TOKENS * width:
        raise ValueError(
            f"`image_proj.proj.weight` must have shape ({STANDARD_NUM_TOKENS}·{width}, image_embed_dim) — "
            f"{STANDARD_NUM_TOKENS} tokens of the LayerNorm's width {width} — got {tuple(weight.shape)}."
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"`image_proj.proj.bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    if raw_embed.ndim != 2 or raw_embed.shape[1] != width:
        raise ValueError(f"`image_proj.raw_embed` must have shape (views, {width}), got {tuple(raw_embed.shape)}.")
    if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < raw_embed.shape[0]:
        raise ValueError(f"`view` must be an int in [0, {raw_embed.shape[0]}), got {view!r}.")
    folded_bias = bias.float() + raw_embed[view].float().repeat(STANDARD_NUM_TOKENS)
    return {"proj.weight": weight, "proj.bias": folded_bias, "norm.weight": norm_weight, "norm.bias": norm_bias}


def convert_official_ip_adapter(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    unet=None,
    image_embed_dim: int | None = None,
    view: int = 0,
) -> ConvertedIPAdapter:
    """Convert the official `ip_adapter_global_local_2_view.bin` into an [`ImageBindIPAdapter`].

    The adapter's sizes are read from the file itself (token width, image embedding width, one hidden size per
    cross-attention processor); with `unet` it is then checked against that UNet, so an adapter for another UNet
    fails here, naming both sizes.

    Args:
        path_or_state_dict (`str`, `os.PathLike` or mapping): the file, or `{"image_proj": …, "ip_adapter": …}`.
        unet (`UNet2DConditionModel`, *optional*): the decoder UNet to check against.
        image_embed_dim (`int`, *optional*): the image encoder's embedding width to check against.
        view (`int`, defaults to 0): the view folded into the projection (see [`two_view_image_proj_to_standard`]).

    Returns:
        [`ConvertedIPAdapter`]
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        content = load_weights_file(path_or_state_dict)
    else:
        source, content = "the IP-Adapter state dict", path_or_state_dict
    if not isinstance(content, Mapping) or set(content) != {"image_proj", "ip_adapter"}:
        found = sorted(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(
            f"{source} must be a dict with exactly the entries 'image_proj' and 'ip_adapter' (the IP-Adapter "
            f"layout), got {found}."
        )
    try:
        image_proj = two_view_image_proj_to_standard(content["image_proj"], view=view)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    ip_state = _tensor_dict(content["ip_adapter"], f"{source} ['ip_adapter']")
    bad = sorted(key for key in ip_state if not _IP_ADAPTER_KEY.match(key))
    if bad:
        raise ValueError(
            f"{source}: unknown 'ip_adapter' keys {_names(bad)} (expected '{{i}}.to_k_ip.weight' and "
            "'{i}.to_v_ip.weight')."
        )
    indices = sorted({int(_IP_ADAPTER_KEY.match(key)["index"]) for key in ip_state})
    if indices != [2 * i + 1 for i in range(len(indices))]:
        raise ValueError(
            f"{source}: the 'ip_adapter' processors must be numbered 1, 3, 5, … (cross-attention processors in "
            f"`unet.attn_processors` order), got {indices}."
        )
    hidden_sizes = []
    for index in indices:
        key = f"{index}.to_k_ip.weight"
        if key not in ip_state or ip_state[key].ndim != 2:
            raise ValueError(f"{source}: 'ip_adapter' lacks the matrix '{key}'.")
        hidden_sizes.append(ip_state[key].shape[0])

    adapter = ImageBindIPAdapter(
        image_embed_dim=image_proj["proj.weight"].shape[1],
        cross_attention_dim=image_proj["norm.weight"].shape[0],
        hidden_sizes=hidden_sizes,
    )
    state = {f"image_proj.{k}": v for k, v in image_proj.items()} | {f"ip_adapter.{k}": v for k, v in ip_state.items()}
    _load_checked(adapter, state, source)
    if unet is not None:
        try:
            adapter.check_compatible(unet, image_embed_dim=image_embed_dim)
        except ValueError as error:
            raise ValueError(f"The IP-Adapter {source} does not fit the decoder: {error}") from error
    dropped = [f"image_proj.raw_embed[{v}]" for v in range(content["image_proj"]["raw_embed"].shape[0]) if v != view]
    logger.info(
        f"IP-Adapter: view {view} folded into image_proj.proj.bias; {len(hidden_sizes)} cross-attention projections; "
        f"dropped (unused view): {', '.join(dropped) or 'nothing'}."
    )
    return ConvertedIPAdapter(adapter=adapter.eval(), dropped=dropped)


# ------------------------------------------------------------------------------------------------ decoder


def _check_decoder_source(decoder: str) -> None:
    """Fail early (before any conversion) on a decoder that is neither a pipeline folder nor a Hub repo id."""
    path = Path(decoder)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"`decoder` {decoder} is a folder without model_index.json: expected a diffusers SD/SDXL pipeline "
                f"folder (e.g. a local copy of {DEFAULT_DECODER})."
            )
        return
    try:
        validate_repo_id(decoder)
    except HFValidationError as error:
        raise ValueError(
            f"`decoder` {decoder!r} is neither an existing folder nor a Hub repo id ('org/name'): {error}"
        ) from error


def load_decoder(
    decoder: str = DEFAULT_DECODER,
    dtype: str | torch.dtype = torch.float32,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load the decoder components (UNet, VAE, text encoders, tokenizers, scheduler) of an SD/SDXL pipeline.

    `decoder` is a Hub repo id (downloaded, or read from the local cache with `HF_HUB_OFFLINE=1`) or a local
    diffusers pipeline folder; loading goes through `DiffusionPipeline.from_pretrained`.

    The scheduler becomes a `DDIMScheduler` on the decoder's own noise schedule (`from_config`), with
    `clip_sample=False` and `set_alpha_to_one=False` as for every latent-diffusion model: the edit starts from a DDIM
    inversion of the base image, and denoising must walk the same deterministic DDIM path back (SDXL's default Euler
    scheduler would rescale the inverted latent by its `init_noise_sigma`).

    Args:
        decoder (`str`, defaults to `"stabilityai/stable-diffusion-xl-base-1.0"`): Hub repo id or local folder.
        dtype (`str` or `torch.dtype`, defaults to float32): dtype of the models.
        variant (`str`, *optional*): weight variant to download, e.g. `"fp16"` (half the download for SDXL).
        cache_dir (`str` or `os.PathLike`, *optional*): Hugging Face cache folder.

    Returns:
        `dict[str, Any]`: `unet`, `vae`, `scheduler`, `text_encoder`, `tokenizer` and, where the decoder has them,
        `text_encoder_2`, `tokenizer_2`.
    """
    _check_decoder_source(decoder)
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            decoder, dtype=_resolve_dtype(dtype), variant=variant, cache_dir=cache_dir
        )
    except Exception as error:  # Hub, cache and loading errors come in many types
        raise ValueError(f"Could not load the decoder {decoder!r}: {error}") from error
    components = pipeline.components
    missing = [name for name in _DECODER_REQUIRED if components.get(name) is None]
    if missing:
        raise ValueError(
            f"The decoder {decoder!r} ({type(pipeline).__name__}) lacks {', '.join(missing)}: expected a "
            "text-to-image SD/SDXL pipeline."
        )
    loaded = {name: components[name] for name in _DECODER_REQUIRED}
    loaded.update({name: components[name] for name in _DECODER_OPTIONAL if components.get(name) is not None})
    loaded["scheduler"] = DDIMScheduler.from_config(
        components["scheduler"].config, clip_sample=False, set_alpha_to_one=False
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in loaded:
            loaded[name].eval()
    return loaded


# ------------------------------------------------------------------------------------------------ whole release


@dataclass
class OfficialConversionReport:
    """What [`convert_official_release`] did.

    Args:
        output_dir (`Path`): the written pipeline folder.
        files (`OfficialReleaseFiles`): the official files read.
        decoder (`str`): the decoder's repo id or folder.
        dtype (`str`): dtype of the saved weights.
        special_token_ids (`dict[str, int]`): the LLM's special-token ids.
        dropped_llm_keys (`dict[str, list[str]]`): dead LLM modules (prefix → keys).
        ignored_llm_buffers (`list[str]`): stale rotary buffers of the LLM checkpoint.
        dropped_llm_config_keys (`list[str]`): non-Llama `config.json` entries.
        dropped_imagebind_keys (`list[str]`): ImageBind keys of the unported modalities.
        dropped_ip_adapter_entries (`list[str]`): IP-Adapter entries of the unused view.
        prior (`PriorConversionReport`): the prior's key report.
        prior_text_encoder_kept (`bool`): whether `prior_text_encoder` was saved.
        imagebind_tokenizer_saved (`bool`): whether ImageBind's text tokenizer was saved (`imagebind_tokenizer`).
        edit_defaults (`dict[str, Any]`): the settings written to `edit_defaults.json`.
        pushed_to (`str`, *optional*): the Hub repo the folder was uploaded to.
    """

    output_dir: Path
    files: OfficialReleaseFiles
    decoder: str
    dtype: str
    special_token_ids: dict[str, int]
    dropped_llm_keys: dict[str, list[str]]
    ignored_llm_buffers: list[str]
    dropped_llm_config_keys: list[str]
    dropped_imagebind_keys: list[str]
    dropped_ip_adapter_entries: list[str]
    prior: PriorConversionReport
    prior_text_encoder_kept: bool
    edit_defaults: dict[str, Any]
    pushed_to: str | None = None
    imagebind_tokenizer_saved: bool = False


def _check_config_overrides(config_overrides: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    if config_overrides is None:
        return {}
    if not isinstance(config_overrides, Mapping):
        raise TypeError(f"`config_overrides` must be a dict of sections, got {type(config_overrides).__name__}.")
    unknown = sorted(set(config_overrides) - set(CONFIG_OVERRIDE_SECTIONS))
    if unknown:
        raise ValueError(
            f"`config_overrides` has unknown sections {unknown}; allowed: {list(CONFIG_OVERRIDE_SECTIONS)}."
        )
    for section, values in config_overrides.items():
        if not isinstance(values, Mapping):
            raise TypeError(
                f"`config_overrides[{section!r}]` must be a dict of config values, got {type(values).__name__}."
            )
    return {section: dict(values) for section, values in config_overrides.items()}


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"`output_dir` {output_dir} exists and is not a folder.")
        if any(output_dir.iterdir()) and not overwrite:
            raise ValueError(
                f"`output_dir` {output_dir} already exists and is not empty; pass `overwrite=True` (--overwrite) to "
                "replace it."
            )


@contextmanager
def _staged_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a fresh staging folder next to `output_dir`; on success it replaces `output_dir`, on failure it goes.

    A rename within one folder is atomic, so `output_dir` is either untouched or complete — never half-written.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if output_dir.exists():
            previous = output_dir.parent / f".{output_dir.name}.previous-{uuid.uuid4().hex[:8]}"
            output_dir.rename(previous)
            staging.rename(output_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_official_release(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    decoder: str = DEFAULT_DECODER,
    *,
    llm_folder: str = OFFICIAL_LLM_FOLDER,
    prior_file: str = OFFICIAL_PRIOR_FILE,
    imagebind_file: str = OFFICIAL_IMAGEBIND_FILE,
    ip_adapter_file: str = OFFICIAL_IP_ADAPTER_FILE,
    dtype: str | torch.dtype = torch.float16,
    decoder_variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    keep_prior_text_encoder: bool = False,
    prior_tokenizer: str | PreTrainedTokenizerBase | None = None,
    imagebind_tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    hub_private: bool = False,
    hub_token: str | None = None,
) -> OfficialConversionReport:
    r"""Convert the official InstructAny2Pix release into an `InstructAny2PixPipeline` folder (safetensors only).

    Every part is loaded, converted and validated — the IP-Adapter against the decoder's UNet, all components
    together by the pipeline's own checks — before anything is written. The folder is then written into a staging
    folder next to `output_dir` and renamed into place, with `edit_defaults.json` (the official demo's settings, as
    `InstructAny2PixPipeline.__call__` arguments) and a model card (`README.md`).

    Args:
        checkpoint_dir (`str` or `os.PathLike`): the official `ckpts/` folder.
        output_dir (`str` or `os.PathLike`): the pipeline folder to write.
        decoder (`str`, defaults to `"stabilityai/stable-diffusion-xl-base-1.0"`): SDXL pipeline, Hub id or folder.
        llm_folder, prior_file, imagebind_file, ip_adapter_file (`str`): the parts inside `checkpoint_dir`.
        dtype (`str` or `torch.dtype`, defaults to float16): dtype of the saved weights.
        decoder_variant (`str`, *optional*): the decoder's weight variant to load (e.g. `"fp16"`).
        cache_dir (`str` or `os.PathLike`, *optional*): Hugging Face cache folder for Hub downloads.
        keep_prior_text_encoder (`bool`, defaults to `False`): also save the prior's CLIP text encoder as
            `prior_text_encoder` (+ `prior_tokenizer`); by default it is reduced to the exact empty-prompt states.
        prior_tokenizer (`str` or `PreTrainedTokenizerBase`, *optional*): the CLIP tokenizer for the prior's text
            encoder (Hub id or folder). Needed with `keep_prior_text_encoder` (default
            `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`); without it the empty prompt is the CLIP ids (49406, 49407).
        imagebind_tokenizer (`str`, `os.PathLike` or `PreTrainedTokenizerBase`, *optional*): ImageBind's text
            tokenizer — Meta's `bpe_simple_vocab_16e6.txt.gz` (from the ImageBind repository; the release does not
            ship it) or a CLIP tokenizer folder — saved as `imagebind_tokenizer`, so the pipeline can read captions
            with ImageBind's text tower (`llm_rerank_weight`). Default: not saved.
        config_overrides (`dict`, *optional*): config overrides per part, sections `"image_encoder"`
            ([`ImageBindModel`]), `"prior"` ([`Any2PixPrior`]) and `"prior_text_encoder"` (`CLIPTextConfig`);
            defaults are the official sizes.
        overwrite (`bool`, defaults to `False`): replace a non-empty `output_dir` (only once everything succeeded).
        push_to_hub (`str`, *optional*): Hub repo id to upload the folder to.
        hub_private (`bool`, defaults to `False`): create the Hub repo private.
        hub_token (`str`, *optional*): Hub token (default: the logged-in user's).

    Returns:
        [`OfficialConversionReport`]

    Raises:
        ValueError: on any problem with the inputs — naming the file, key or size — with nothing written.
    """
    torch_dtype = _resolve_dtype(dtype)
    overrides = _check_config_overrides(config_overrides)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    files = locate_official_release(checkpoint_dir, llm_folder, prior_file, imagebind_file, ip_adapter_file)
    _check_decoder_source(decoder)
    if push_to_hub is not None:
        try:
            validate_repo_id(push_to_hub)
        except HFValidationError as error:
            raise ValueError(
                f"`push_to_hub` must be a Hub repo id ('org/name'), got {push_to_hub!r}: {error}"
            ) from error

    if keep_prior_text_encoder and prior_tokenizer is None:
        prior_tokenizer = OFFICIAL_PRIOR_TOKENIZER
    if isinstance(prior_tokenizer, (str, os.PathLike)):
        try:
            prior_tokenizer = AutoTokenizer.from_pretrained(prior_tokenizer, cache_dir=cache_dir)
        except Exception as error:  # Hub, cache and parsing errors come in many types
            raise ValueError(f"Could not load the prior's CLIP tokenizer {str(prior_tokenizer)!r}: {error}") from error

    if isinstance(imagebind_tokenizer, (str, os.PathLike)):
        try:
            imagebind_tokenizer = load_clip_tokenizer(imagebind_tokenizer)
        except Exception as error:  # missing files, bad gzip, unreadable folders come in many types
            raise ValueError(f"Could not load the ImageBind tokenizer {str(imagebind_tokenizer)!r}: {error}") from error
    elif imagebind_tokenizer is not None and not isinstance(imagebind_tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            "`imagebind_tokenizer` must be a path or a transformers tokenizer, got "
            f"{type(imagebind_tokenizer).__name__}."
        )

    # Cheapest checks first: the adapter's structure, then the prior, ImageBind, the LLM and the decoder.
    ip_adapter = convert_official_ip_adapter(files.ip_adapter)
    prior = convert_official_prior(
        files.prior,
        prior_config=overrides.get("prior"),
        text_encoder_config=overrides.get("prior_text_encoder"),
        tokenizer=prior_tokenizer,
        keep_text_encoder=keep_prior_text_encoder,
    )
    imagebind = convert_official_imagebind(files.imagebind, overrides.get("image_encoder"))
    if imagebind_tokenizer is not None and len(imagebind_tokenizer) > imagebind.model.config.text_vocab_size:
        raise ValueError(
            f"The ImageBind tokenizer has {len(imagebind_tokenizer)} tokens but ImageBind's text embedding has "
            f"{imagebind.model.config.text_vocab_size} rows (`text_vocab_size`)."
        )
    llm = convert_official_llm(files.llm_dir, dtype=torch_dtype, tokenizer_dir=files.llm_tokenizer_dir)
    decoder_components = load_decoder(decoder, dtype=torch_dtype, variant=decoder_variant, cache_dir=cache_dir)
    try:
        ip_adapter.adapter.check_compatible(
            decoder_components["unet"], image_embed_dim=imagebind.model.config.out_embed_dim
        )
    except ValueError as error:
        raise ValueError(f"The IP-Adapter {files.ip_adapter} does not fit the decoder {decoder!r}: {error}") from error

    try:
        pipeline = InstructAny2PixPipeline(
            image_encoder=imagebind.model.to(torch_dtype),
            llm=llm.llm,
            llm_tokenizer=llm.tokenizer,
            mm_adapter=llm.mm_adapter,
            prior=prior.prior.to(torch_dtype),
            ip_adapter=ip_adapter.adapter.to(torch_dtype),
            prior_text_encoder=prior.text_encoder.to(torch_dtype) if prior.text_encoder is not None else None,
            prior_tokenizer=prior_tokenizer if keep_prior_text_encoder else None,
            imagebind_tokenizer=imagebind_tokenizer,
            edit_defaults=dict(OFFICIAL_EDIT_DEFAULTS),
            **decoder_components,
        )
    except ValueError as error:
        raise ValueError(f"The converted components do not fit together: {error}") from error

    report = OfficialConversionReport(
        output_dir=output_dir,
        files=files,
        decoder=decoder,
        dtype=str(torch_dtype).removeprefix("torch."),
        special_token_ids=dict(zip(MULTIMODAL_SPECIAL_TOKENS, llm.token_ids.special_token_ids, strict=True)),
        dropped_llm_keys=llm.dropped_keys,
        ignored_llm_buffers=llm.ignored_buffers,
        dropped_llm_config_keys=llm.dropped_config_keys,
        dropped_imagebind_keys=imagebind.dropped_keys,
        dropped_ip_adapter_entries=ip_adapter.dropped,
        prior=prior.report,
        prior_text_encoder_kept=keep_prior_text_encoder,
        edit_defaults=dict(OFFICIAL_EDIT_DEFAULTS),
        pushed_to=push_to_hub,
        imagebind_tokenizer_saved=imagebind_tokenizer is not None,
    )
    with _staged_output_dir(output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").write_text(make_model_card(report, repo_id=push_to_hub), encoding="utf-8")
    logger.info(f"Wrote the converted pipeline to {output_dir}.")

    if push_to_hub is not None:
        api = HfApi(token=hub_token)
        api.create_repo(push_to_hub, private=hub_private, exist_ok=True)
        api.upload_folder(
            repo_id=push_to_hub,
            folder_path=str(output_dir),
            commit_message="Add InstructAny2Pix converted from the official release",
        )
        logger.info(f"Uploaded {output_dir} to https://huggingface.co/{push_to_hub}.")
    return report
