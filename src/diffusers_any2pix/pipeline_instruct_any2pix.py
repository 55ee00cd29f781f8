"""InstructAny2PixPipeline: image editing from instructions that mix text, several images and audio."""

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch

from diffusers import AutoencoderKL, DDIMInverseScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Every component module must be imported here: diffusers resolves our classes through ``sys.modules``.
from .instruction import ParsedInstruction, parse_instruction
from .models.edit_verifier import EditVerifier
from .models.imagebind import ImageBindModel
from .models.ip_adapter import ImageBindIPAdapter, temporary_ip_adapter_scale
from .models.mm_adapter import MultimodalAdapter, rescale_to_norm
from .models.prior import Any2PixPrior
from .multimodal_llm import (
    build_vicuna_prompt,
    expand_media_tokens,
    generate_with_media,
    get_multimodal_token_ids,
    parse_answer,
    score_answers,
)
from .processing_imagebind import ImageBindProcessor, is_single_audio


logger = logging.get_logger(__name__)

DECODER_SD = "sd"
DECODER_SDXL = "sdxl"
DECODER_IMAGEBIND = "imagebind"

# An edit legitimately changes some attribute fields of the base (an added or replaced object: its shape and colour),
# so `llm_base_agreement_weight` scores a caption's agreement with the base on all fields but this many least-agreeing.
BASE_AGREEMENT_IGNORED_FIELDS = 2
# Floor of a field's agreement probability before its log (a field the caption and the base read fully apart).
BASE_AGREEMENT_FLOOR = 1e-6

DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
DEFAULT_PROMPT_TEMPLATE = "best quality, high quality, {caption}"

# The official `__call__` defaults (REFERENCE.md §4). A pipeline's `edit_defaults` config overrides them (a converted
# official pipeline records the demo app's settings there); an argument passed to `__call__` overrides both.
BUILTIN_EDIT_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 25,
    "guidance_scale": 10.0,
    "structure_preservation": 0.7,
    "embedding_weights": (0.0, 0.4, 1.0),
    "embedding_norm": 20.0,
    "ip_adapter_scale": 1.0,
    "prior_guidance_scale": 10.0,
    "prior_score": 6.5,
    "llm_do_sample": True,
    "llm_temperature": 0.3,
    "llm_max_new_tokens": 100,
    "llm_num_beams": 1,
    "llm_rerank_weight": 0.0,
    "llm_base_agreement_weight": 0.0,
    "llm_base_focus_weight": 0.0,
    "base_instruction_weight": 0.0,
    "caption_embedding_weight": 0.0,
    "num_candidate_images": 1,
    "llm_ensemble_weight": 0.0,
    "edit_verifier_weight": 0.0,
    "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    "prompt_template": DEFAULT_PROMPT_TEMPLATE,
}

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | Path
AudioInput = str | Path | tuple


@dataclass
class InstructAny2PixPipelineOutput(BaseOutput):
    """
    Output of [`InstructAny2PixPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The edited images, ``num_images_per_prompt`` per instruction (latents for ``output_type="latent"``).
        answers (`list[str]`):
            The LLM's answer for each instruction (special tokens kept).
        captions (`list[str | None]`):
            The output caption parsed from each answer (``None`` when the answer has none).
        base_image_indices (`list[int]`):
            Per instruction, the index into that instruction's ``images`` of the image that was edited.
        generation_embeds (`torch.Tensor`):
            ``(batch, embed_dim)`` the LLM's generation embedding (read at ``<im_gen>…<video>``; blended with
            ImageBind's embedding of the caption when `caption_embedding_weight` > 0; with several caption weights,
            at the weight kept for that instruction, as are the base index and the refined and conditioning
            embeddings).
        base_embeds (`list[torch.Tensor | None]`):
            The LLM's base embedding per instruction (``None`` with one image or a ``<base_null>`` answer).
        refined_embeds (`torch.Tensor`):
            ``(batch, embed_dim)`` the refinement prior's output (norm 20).
        conditioning_embeds (`torch.Tensor`):
            ``(batch, embed_dim)`` the mixed embedding the decoder was conditioned on; pass it back as
            ``conditioning_embeds=`` to skip the LLM and prior.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    answers: list[str]
    captions: list[str | None]
    base_image_indices: list[int]
    generation_embeds: torch.Tensor
    base_embeds: list[torch.Tensor | None]
    refined_embeds: torch.Tensor
    conditioning_embeds: torch.Tensor


def detect_decoder_family(unet: UNet2DConditionModel) -> str:
    """Which decoder family ``unet`` belongs to (see DESIGN.md §3), from its config alone."""
    config = unet.config
    if config.encoder_hid_dim_type == "image_proj" and config.addition_embed_type == "image":
        return DECODER_IMAGEBIND
    if config.addition_embed_type == "text_time":
        return DECODER_SDXL
    if config.addition_embed_type is None and config.encoder_hid_dim_type in (None, "ip_image_proj"):
        return DECODER_SD
    raise ValueError(
        "Unsupported `unet`: expected an SD 1.x-style UNet (cross-attention on text), an SDXL-style UNet "
        "(`addition_embed_type='text_time'`) or an ImageBind-native UNet (`encoder_hid_dim_type='image_proj'`, "
        f"`addition_embed_type='image'`); got addition_embed_type={config.addition_embed_type!r}, "
        f"encoder_hid_dim_type={config.encoder_hid_dim_type!r}."
    )


def decoder_prompt_ids(prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token ids of decoder prompts, padded to the tokenizer's ``model_max_length`` (CLIP's fixed 77-token layout)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_decoder_prompt(
    prompts: list[str],
    device: torch.device,
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModel,
    tokenizer_2: PreTrainedTokenizerBase | None = None,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning of a text-to-image decoder: ``(prompt_embeds, pooled_prompt_embeds or None)``.

    SD 1.x (one encoder): the last hidden states. SDXL (``text_encoder_2`` given): the penultimate hidden states of
    both encoders concatenated, and the pooled projection of the second. Shared by the pipeline and
    `training/train_decoder.py`, so captions are encoded identically in training and inference.
    """
    sdxl = text_encoder_2 is not None
    hidden, pooled = [], None
    for tok, encoder in [(tokenizer, text_encoder)] + ([(tokenizer_2, text_encoder_2)] if sdxl else []):
        out = encoder(decoder_prompt_ids(prompts, tok).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
        if encoder is text_encoder_2:
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def mix_latents_with_noise(latents: torch.Tensor, noise: torch.Tensor, preservation: float) -> torch.Tensor:
    """The official "polar interpolation" of an inverted latent with fresh noise, per sample.

    ``x = a·latents + (1−a)·noise``, rescaled to the norm ``a‖latents‖ + (1−a)‖noise‖`` so the result keeps the
    magnitude the scheduler expects at its first timestep.
    """
    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, *([1] * (x.ndim - 1)))

    mixed = preservation * latents + (1.0 - preservation) * noise
    target_norm = preservation * norm(latents) + (1.0 - preservation) * norm(noise)
    return mixed / norm(mixed).clamp_min(1e-12) * target_norm


class InstructAny2PixPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""
    Image editing from multimodal instructions (InstructAny2Pix, arXiv 2312.06738).

    An instruction such as ``"add [audio1] to [image1]"`` references ``images=`` and ``audio=`` by placeholder.
    ImageBind encodes the inputs, an instruction-tuned LLM answers with a caption and an output embedding, a
    refinement prior turns it into a realistic image embedding, and a diffusion decoder edits the base image (DDIM
    inversion + noise mixing) conditioned on the mixed embedding.

    This model inherits from [`DiffusionPipeline`]; see the superclass for generic methods (downloading, saving,
    device placement, offloading).

    Args:
        image_encoder ([`ImageBindModel`]): ImageBind, encoding images and audio into the joint space.
        llm ([`~transformers.PreTrainedModel`]): a causal language model (Vicuna-7B for the official weights).
        llm_tokenizer ([`~transformers.PreTrainedTokenizerBase`]): its tokenizer, with the multimodal special tokens.
        mm_adapter ([`MultimodalAdapter`]): projector (ImageBind → LLM) and output head (LLM → ImageBind).
        prior ([`Any2PixPrior`]): the refinement prior.
        vae ([`AutoencoderKL`]): the decoder's autoencoder.
        unet ([`UNet2DConditionModel`]): an SD 1.x / SDXL UNet (with ``ip_adapter``) or an ImageBind-native UNet.
        scheduler ([`SchedulerMixin`]): the denoising scheduler (its config also drives DDIM inversion).
        text_encoder, tokenizer, text_encoder_2, tokenizer_2 (optional): the decoder's text encoders (SD 1.x uses
            the first pair, SDXL both, an ImageBind-native decoder none).
        ip_adapter ([`ImageBindIPAdapter`], optional): IP-Adapter weights (standard layout) for a text-to-image
            UNet; attached to ``unet`` when the pipeline is built.
        prior_text_encoder, prior_tokenizer (optional): a CLIP text model for the prior; without them the prior uses
            its stored empty-prompt hidden states (identical output for the official, always-empty prompt).
        imagebind_tokenizer ([`~transformers.PreTrainedTokenizerBase`], optional): ImageBind's text tokenizer (CLIP
            BPE); only the beam reranking (`llm_rerank_weight`, `llm_base_agreement_weight`,
            `llm_base_focus_weight`), `base_instruction_weight` and `caption_embedding_weight` read text with
            ImageBind.
        llm_2 ([`~transformers.PreTrainedModel`], optional), mm_adapter_2 ([`MultimodalAdapter`], optional): a
            second multimodal LLM, trained apart on the same tokenizer (``llm_tokenizer``) and media, whose beams and
            scores join the first LLM's (`llm_ensemble_weight`); given together or not at all.
        edit_verifier ([`EditVerifier`], optional): predicts the attribute fields of an edit's result from the
            instruction and the attribute reads of its inputs, and reads them from a caption; their agreement joins
            the ranking of the LLM's answers (`edit_verifier_weight`). Needs an `mm_adapter` with an attribute reader
            whose fields are the verifier's.
        edit_defaults (`dict`, *optional*): defaults for the edit knobs of `__call__` (same names), saved in
            `model_index.json`; e.g. a converted official pipeline records the official demo's settings here.
    """

    model_cpu_offload_seq = (
        "image_encoder->llm->llm_2->prior_text_encoder->prior->text_encoder->text_encoder_2->unet->vae"
    )
    # The adapter is tiny and used between the other models' calls; keep it on the execution device.
    _exclude_from_cpu_offload = ["mm_adapter", "mm_adapter_2", "edit_verifier"]
    _optional_components = [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "ip_adapter",
        "prior_text_encoder",
        "prior_tokenizer",
        "imagebind_tokenizer",
        "llm_2",
        "mm_adapter_2",
        "edit_verifier",
    ]
    _callback_tensor_inputs = ["latents", "conditioning_embeds"]

    def __init__(
        self,
        image_encoder: ImageBindModel,
        llm: PreTrainedModel,
        llm_tokenizer: PreTrainedTokenizerBase,
        mm_adapter: MultimodalAdapter,
        prior: Any2PixPrior,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        ip_adapter: ImageBindIPAdapter | None = None,
        prior_text_encoder: CLIPTextModel | None = None,
        prior_tokenizer: PreTrainedTokenizerBase | None = None,
        imagebind_tokenizer: PreTrainedTokenizerBase | None = None,
        llm_2: PreTrainedModel | None = None,
        mm_adapter_2: MultimodalAdapter | None = None,
        edit_verifier: EditVerifier | None = None,
        edit_defaults: dict[str, Any] | None = None,
    ):
        super().__init__()
        components = {
            "image_encoder": image_encoder,
            "llm": llm,
            "llm_tokenizer": llm_tokenizer,
            "mm_adapter": mm_adapter,
            "prior": prior,
            "vae": vae,
            "unet": unet,
            "scheduler": scheduler,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2,
            "ip_adapter": ip_adapter,
            "prior_text_encoder": prior_text_encoder,
            "prior_tokenizer": prior_tokenizer,
            "imagebind_tokenizer": imagebind_tokenizer,
            "llm_2": llm_2,
            "mm_adapter_2": mm_adapter_2,
            "edit_verifier": edit_verifier,
        }
        # diffusers accepts None for any component at load time; fail here, by name, instead of mid-call.
        missing = [n for n, c in components.items() if c is None and n not in self._optional_components]
        if missing:
            raise ValueError(f"InstructAny2PixPipeline is missing required components: {', '.join(missing)}.")

        decoder_family = detect_decoder_family(unet)
        self._check_component_sizes(decoder_family, **components)
        self.register_modules(**components)
        unknown = sorted(set(edit_defaults or {}) - set(BUILTIN_EDIT_DEFAULTS))
        if unknown:
            raise ValueError(f"`edit_defaults` has unknown settings {unknown}; known: {sorted(BUILTIN_EDIT_DEFAULTS)}.")
        self.register_to_config(edit_defaults=dict(edit_defaults or {}))
        for component in components.values():
            if isinstance(component, torch.nn.Module):
                _realign_tensors(component)
        self.decoder_family = decoder_family
        self.token_ids = get_multimodal_token_ids(llm_tokenizer)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.imagebind_processor = ImageBindProcessor.for_model(image_encoder, tokenizer=imagebind_tokenizer)
        # The adapter lives inside the UNet (diffusers' IP-Adapter processors); `_detached_ip_adapter` takes it out
        # for saving so the UNet folder stays a plain UNet and the adapter keeps its standard layout.
        self._ip_adapter_restore = ip_adapter.attach_to(unet) if ip_adapter is not None else None

    # ------------------------------------------------------------------------------------------------ validation
    @staticmethod
    def _check_component_sizes(decoder_family: str, **c) -> None:
        """Fail at construction, naming both sizes, when swapped components do not fit together."""
        embed_dim = c["image_encoder"].config.out_embed_dim

        def same(what_a: str, a: int, what_b: str, b: int) -> None:
            if a != b:
                raise ValueError(f"Component size mismatch: {what_a} is {a} but {what_b} is {b}.")

        same("image_encoder.config.out_embed_dim", embed_dim, "prior.config.embed_dim", c["prior"].config.embed_dim)
        same("vae.config.latent_channels", c["vae"].config.latent_channels, "unet.config.in_channels", c["unet"].config.in_channels)
        if (c.get("llm_2") is None) != (c.get("mm_adapter_2") is None):
            raise ValueError("`llm_2` and `mm_adapter_2` must be given together (or both omitted).")
        pairs = [("llm", "mm_adapter")] + ([("llm_2", "mm_adapter_2")] if c.get("llm_2") is not None else [])
        for llm_name, adapter_name in pairs:
            llm, adapter = c[llm_name], c[adapter_name]
            same(
                "image_encoder.config.out_embed_dim", embed_dim, f"{adapter_name}.config.embed_dim",
                adapter.config.embed_dim,
            )  # fmt: skip
            same(
                f"{llm_name}.config.hidden_size",
                llm.config.get_text_config().hidden_size,
                f"{adapter_name}.config.llm_hidden_size",
                adapter.config.llm_hidden_size,
            )
            if adapter.config.image_patch_tokens:
                same(
                    "image_encoder.config.vision_embed_dim",
                    c["image_encoder"].config.vision_embed_dim,
                    f"{adapter_name}.config.patch_embed_dim",
                    adapter.config.patch_embed_dim,
                )
            if len(c["llm_tokenizer"]) > llm.get_input_embeddings().num_embeddings:
                raise ValueError(
                    f"llm_tokenizer has {len(c['llm_tokenizer'])} tokens but the {llm_name}'s input embeddings only "
                    f"have {llm.get_input_embeddings().num_embeddings} rows; resize them after adding the special "
                    "tokens (see `add_multimodal_tokens`)."
                )
            word_ids = adapter.config.attribute_word_ids
            if word_ids is not None and max(word_ids) >= len(c["llm_tokenizer"]):
                raise ValueError(
                    f"{adapter_name}.config.attribute_word_ids reach token id {max(word_ids)} but llm_tokenizer has "
                    f"only {len(c['llm_tokenizer'])} tokens: the adapter's attribute tokens were trained on another "
                    "tokenizer's words."
                )
        verifier = c.get("edit_verifier")
        if verifier is not None:
            reader_classes = c["mm_adapter"].config.attribute_classes
            if reader_classes is None:
                raise ValueError(
                    "`edit_verifier` reads the inputs through the attribute reader of `mm_adapter`, which has none "
                    "(`attribute_classes`)."
                )
            if list(reader_classes) != list(verifier.num_classes):
                raise ValueError(
                    f"Component size mismatch: mm_adapter.config.attribute_classes is {list(reader_classes)} but "
                    f"edit_verifier.config.class_words has fields of {list(verifier.num_classes)} classes."
                )
        if c.get("mm_adapter_2") is not None:
            # Both LLMs read the media `encode_media` prepares for the first adapter.
            same(
                "mm_adapter.config.image_patch_tokens",
                c["mm_adapter"].config.image_patch_tokens,
                "mm_adapter_2.config.image_patch_tokens",
                c["mm_adapter_2"].config.image_patch_tokens,
            )
        if (c["prior_text_encoder"] is None) != (c["prior_tokenizer"] is None):
            raise ValueError("`prior_text_encoder` and `prior_tokenizer` must be given together (or both omitted).")
        if c["prior_text_encoder"] is not None:
            same(
                "prior_text_encoder.config.hidden_size",
                c["prior_text_encoder"].config.hidden_size,
                "prior.config.text_hidden_dim",
                c["prior"].config.text_hidden_dim,
            )

        unet = c["unet"]
        if decoder_family == DECODER_IMAGEBIND:
            same("image_encoder.config.out_embed_dim", embed_dim, "unet.config.encoder_hid_dim", unet.config.encoder_hid_dim)
            extra = [name for name in ("text_encoder", "text_encoder_2", "ip_adapter") if c[name] is not None]
            if extra:
                raise ValueError(
                    f"An ImageBind-native unet is conditioned on the embedding alone; remove {', '.join(extra)}."
                )
            return

        if c["ip_adapter"] is None:
            raise ValueError(
                "A text-to-image unet (SD 1.x / SDXL) needs an `ip_adapter` that reads ImageBind embeddings."
            )
        c["ip_adapter"].check_compatible(unet, image_embed_dim=embed_dim)
        if c["text_encoder"] is None or c["tokenizer"] is None:
            raise ValueError(f"A {decoder_family.upper()} unet needs `text_encoder` and `tokenizer`.")
        if decoder_family == DECODER_SD:
            same(
                "text_encoder.config.hidden_size",
                c["text_encoder"].config.hidden_size,
                "unet.config.cross_attention_dim",
                unet.config.cross_attention_dim,
            )
            return
        if c["text_encoder_2"] is None or c["tokenizer_2"] is None:
            raise ValueError("An SDXL unet needs `text_encoder_2` and `tokenizer_2`.")
        same(
            "text_encoder.config.hidden_size + text_encoder_2.config.hidden_size",
            c["text_encoder"].config.hidden_size + c["text_encoder_2"].config.hidden_size,
            "unet.config.cross_attention_dim",
            unet.config.cross_attention_dim,
        )
        same(
            "text_encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim",
            c["text_encoder_2"].config.projection_dim + 6 * unet.config.addition_time_embed_dim,
            "unet.config.projection_class_embeddings_input_dim",
            unet.config.projection_class_embeddings_input_dim,
        )

    # ------------------------------------------------------------------------------------------------ saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "InstructAny2PixPipeline":
        """Load like [`DiffusionPipeline.from_pretrained`] (a local folder, or a Hub id downloaded first).

        diffusers' download step refuses components from libraries it does not know (ours), so a Hub id is fetched
        with `huggingface_hub.snapshot_download` (honouring `HF_HUB_OFFLINE`, `cache_dir`, `revision`, `token`)
        and the local snapshot is loaded.

        Without ``dtype`` / ``torch_dtype`` every component loads in float32, whatever precision its weights are
        stored in (diffusers' convention; transformers would otherwise keep the LLM in its stored dtype), so a
        pipeline saved in float16 to halve its size computes in float32.
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        path = Path(str(pretrained_model_name_or_path))
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "force_download") if k in kwargs}
            path = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    local_files_only=kwargs.pop("local_files_only", False),
                    **hub_kwargs,
                )
            )
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        """Save like [`DiffusionPipeline.save_pretrained`], with the UNet saved without the attached adapter."""
        if self._ip_adapter_restore is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        ImageBindIPAdapter.detach_from(self.unet, self._ip_adapter_restore)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._ip_adapter_restore = self.ip_adapter.attach_to(self.unet)

    # ------------------------------------------------------------------------------------------------ inputs
    def _normalize_inputs(
        self, instruction: str | list[str], images: Any, audio: Any
    ) -> tuple[list[str], list[list[ImageInput]], list[list[AudioInput]]]:
        """Bring instruction/images/audio to per-instruction lists (single instruction → batch of one)."""
        if isinstance(instruction, str):
            instructions = [instruction]
            per_images = [self._as_list(images, "images")]
            per_audio = [self._as_list(audio, "audio")]
        elif isinstance(instruction, (list, tuple)) and len(instruction) > 0:
            instructions = list(instruction)
            per_images = self._per_instruction(images, len(instructions), "images")
            per_audio = self._per_instruction(audio, len(instructions), "audio")
        else:
            raise TypeError(
                f"`instruction` must be a string or a non-empty list of strings, got {type(instruction).__name__}."
            )
        return instructions, per_images, per_audio

    @staticmethod
    def _as_list(value: Any, name: str) -> list:
        if value is None:
            return []
        if isinstance(value, (list, tuple)) and not (name == "audio" and is_single_audio(value)):
            return list(value)
        return [value]

    @classmethod
    def _per_instruction(cls, value: Any, batch_size: int, name: str) -> list[list]:
        if value is None:
            return [[] for _ in range(batch_size)]
        if not isinstance(value, (list, tuple)) or len(value) != batch_size:
            raise ValueError(
                f"With {batch_size} instructions, `{name}` must be a list of {batch_size} lists (one per instruction), "
                f"got {type(value).__name__}{' of length ' + str(len(value)) if isinstance(value, (list, tuple)) else ''}."
            )
        return [cls._as_list(item, name) for item in value]

    def check_inputs(
        self,
        instructions: list[str],
        per_images: list[list],
        per_audio: list[list],
        height: int,
        width: int,
        num_inference_steps: int,
        structure_preservation: float,
        embedding_weights: tuple[float, float, float],
        embedding_norm: float,
        num_images_per_prompt: int,
        output_type: str,
        on_invalid_answer: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
        conditioning_embeds: torch.Tensor | None,
        captions: list[str] | None = None,
    ) -> list[ParsedInstruction]:
        """Validate every argument before any model runs; returns the parsed instructions."""
        if height % self.vae_scale_factor or width % self.vae_scale_factor or height <= 0 or width <= 0:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {self.vae_scale_factor}, got {height}x{width}."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not 0.0 <= structure_preservation <= 1.0:
            raise ValueError(f"`structure_preservation` must be in [0, 1], got {structure_preservation}.")
        if len(embedding_weights) != 3:
            raise ValueError(
                f"`embedding_weights` must be 3 numbers (base, generation, refined), got {len(embedding_weights)}."
            )
        if embedding_norm <= 0:
            raise ValueError(f"`embedding_norm` must be positive, got {embedding_norm}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}.")
        if on_invalid_answer not in ("error", "use_base"):
            raise ValueError(f"`on_invalid_answer` must be 'error' or 'use_base', got {on_invalid_answer!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
                )

        parsed = []
        for i, (text, images, audio) in enumerate(zip(instructions, per_images, per_audio)):
            name = "instruction" if len(instructions) == 1 else f"instruction[{i}]"
            instruction = parse_instruction(text, num_images=len(images), num_audio=len(audio), argument_name=name)
            if not instruction.image_references:
                raise ValueError(
                    f"`{name}` references no image. InstructAny2Pix edits a base image: pass it in `images=` and "
                    "reference it as [image1]."
                )
            places = self.mm_adapter.config.max_media_positions
            if conditioning_embeds is None and places and len(instruction.references) > places:
                raise ValueError(
                    f"`{name}` refers to {len(instruction.references)} media but this pipeline's LLM reads at most "
                    f"{places} per instruction (`mm_adapter.config.max_media_positions`)."
                )
            parsed.append(instruction)

        if conditioning_embeds is not None:
            expected = (len(instructions), self.image_encoder.config.out_embed_dim)
            if not isinstance(conditioning_embeds, torch.Tensor) or tuple(conditioning_embeds.shape) != expected:
                got = tuple(conditioning_embeds.shape) if isinstance(conditioning_embeds, torch.Tensor) else type(conditioning_embeds).__name__
                raise ValueError(f"`conditioning_embeds` must be a tensor of shape {expected}, got {got}.")
        if captions is not None:
            if conditioning_embeds is None:
                raise ValueError("`captions` replace the LLM's captions, so they go with `conditioning_embeds`.")
            if len(captions) != len(instructions) or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"`captions` must be {len(instructions)} string(s), one per instruction, got {captions!r}.")
        return parsed

    # ------------------------------------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_media(
        self, parsed: list[ParsedInstruction], per_images: list[list[PIL.Image.Image]], per_audio: list[list], device
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]] | None]:
        """ImageBind vectors of every referenced input, in placeholder order.

        All images of the batch go through ImageBind in one call, all audio clips in another.

        Returns:
            `tuple`: ``media_embeds``, one ``(n_i, embed_dim)`` tensor per instruction (a vector per reference), and
            ``image_patches``: ``None``, or, when the adapter reads patch tokens (``mm_adapter.config
            .image_patch_tokens``), per instruction and reference the image's patch tokens (``None`` for audio).
        """
        flat_images = [image for images in per_images for image in images]
        flat_audio = [clip for clips in per_audio for clip in clips]
        dtype = self.image_encoder.dtype
        read_patches = self.mm_adapter.patch_resampler is not None
        image_embeds = audio_embeds = patch_tokens = None
        if flat_images:
            pixels = self.imagebind_processor.preprocess_image(flat_images).to(device=device, dtype=dtype)
            if read_patches:
                image_embeds, patch_tokens = self.image_encoder.encode_image_patches(pixels)
            else:
                image_embeds = self.image_encoder.encode_image(pixels)
            image_embeds = image_embeds.float()
        if flat_audio:
            features = self.imagebind_processor.preprocess_audio(flat_audio).to(device=device, dtype=dtype)
            audio_embeds = self.image_encoder.encode_audio(features).float()

        media_embeds, image_patches = [], []
        image_offset = audio_offset = 0
        for instruction, images, audio in zip(parsed, per_images, per_audio):
            rows, patches = [], []
            for ref in instruction.references:
                if ref.kind == "image":
                    rows.append(image_embeds[image_offset + ref.index])
                    patches.append(patch_tokens[image_offset + ref.index] if read_patches else None)
                else:
                    rows.append(audio_embeds[audio_offset + ref.index])
                    patches.append(None)
            media_embeds.append(torch.stack(rows))
            image_patches.append(patches)
            image_offset += len(images)
            audio_offset += len(audio)
        return media_embeds, (image_patches if read_patches else None)

    def llm_prompt(self, parsed: ParsedInstruction, adapter: MultimodalAdapter | None = None) -> str:
        """The vicuna prompt of an instruction, each image with as many ``<video>`` tokens as ``adapter`` (default:
        `mm_adapter`) reads."""
        adapter = self.mm_adapter if adapter is None else adapter
        read_patches = adapter.patch_resampler is not None
        counts = [
            adapter.tokens_per_image if read_patches and ref.kind == "image" else adapter.tokens_per_medium
            for ref in parsed.references
        ]
        return build_vicuna_prompt(expand_media_tokens(parsed.llm_text, counts))

    @staticmethod
    def select_base_image(
        instruction: ParsedInstruction,
        media_embeds: torch.Tensor,
        base_embed: torch.Tensor | None,
        generation_embed: torch.Tensor | None,
        prior: torch.Tensor | None = None,
    ) -> int:
        """Index (into the instruction's ``images``) of the image to edit.

        One image input is the base. With several, the image whose ImageBind vector has the largest dot product with
        the LLM's base embedding (plus ``prior``); audio inputs are never candidates. A ``<base_null>`` answer (no
        base embedding) with several images falls back to the generation embedding (the official code raises here).

        Args:
            instruction (`ParsedInstruction`): the instruction.
            media_embeds (`torch.Tensor`): its inputs' ImageBind vectors, in order of appearance (`encode_media`).
            base_embed (`torch.Tensor`, *optional*): the LLM's base embedding.
            generation_embed (`torch.Tensor`, *optional*): the LLM's generation embedding (used without a base one).
            prior (`torch.Tensor`, *optional*): one score per image placeholder, in order of appearance, added to the
                dot products (`instruction_base_priors`).
        """
        candidates = list(zip(instruction.image_positions, instruction.image_references))
        if len(candidates) == 1:
            return candidates[0][1].index
        query = base_embed if base_embed is not None else generation_embed
        if query is None and prior is None:
            return candidates[0][1].index
        if query is None:
            scores = torch.zeros(len(candidates))
        else:
            scores = torch.stack([media_embeds[pos].float() @ query.float() for pos, _ in candidates])
        if prior is not None:
            scores = scores + prior.float().to(scores.device)
        return candidates[int(scores.argmax())][1].index

    def instruction_base_priors(
        self,
        parsed: list[ParsedInstruction],
        media_embeds: list[torch.Tensor],
        weight: float,
        device: torch.device,
    ) -> list[torch.Tensor | None]:
        """The `base_instruction_weight` term of `select_base_image`: ``weight`` · cosine between ImageBind's
        embedding of the instruction's words (`ParsedInstruction.words`) and each of its images.

        An instruction that picks its base among several images describes that image in words ("edit the one with a
        red circle"); ImageBind's text tower, bound to its image tower, finds the image those words fit best.

        Args:
            parsed (`list[ParsedInstruction]`): the batch's instructions.
            media_embeds (`list[torch.Tensor]`): their ImageBind vectors (`encode_media`).
            weight (`float`): the cosine's weight.
            device (`torch.device`): where ImageBind reads the words.

        Returns:
            `list`: per instruction, a `(num_image_placeholders,)` float32 tensor on the CPU, or `None` for an
            instruction with one image or without words.
        """
        rows = [b for b, p in enumerate(parsed) if len(p.image_references) > 1 and p.words]
        priors: list[torch.Tensor | None] = [None] * len(parsed)
        if weight == 0 or not rows:
            return priors
        words = torch.nn.functional.normalize(self.encode_captions([parsed[b].words for b in rows], device), dim=-1)
        for b, text in zip(rows, words.cpu()):
            images = list(parsed[b].image_positions)
            vectors = torch.nn.functional.normalize(media_embeds[b][images].float().cpu(), dim=-1)
            priors[b] = weight * (vectors @ text)
        return priors

    def edit_verifier_predictions(
        self, parsed: list[ParsedInstruction], media_embeds: list[torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """The `edit_verifier`'s prediction of every instruction's result: per instruction, one class distribution
        per attribute field (float32, CPU), from its words and its inputs' attribute reads
        (`MultimodalAdapter.read_attributes` of their ImageBind vectors).

        Args:
            parsed (`list[ParsedInstruction]`): the batch's instructions.
            media_embeds (`list[torch.Tensor]`): their ImageBind vectors (`encode_media`).
        """
        if self.edit_verifier is None:
            raise ValueError("`edit_verifier_predictions` needs the `edit_verifier` component.")
        rows = []
        for instruction, embeds in zip(parsed, media_embeds):
            reads = torch.cat(self.mm_adapter.read_attributes(embeds), dim=-1).float().cpu()
            rows.append({(ref.kind, ref.index + 1): reads[pos] for pos, ref in enumerate(instruction.references)})
        predicted = self.edit_verifier.predict([p.text for p in parsed], rows)
        return [[field[b].cpu() for field in predicted] for b in range(len(parsed))]

    def caption_agreement_scorer(
        self,
        weight: float,
        device: torch.device,
        base_agreement_weight: float = 0.0,
        parsed: list[ParsedInstruction] | None = None,
        media_embeds: list[torch.Tensor] | None = None,
        base_priors: list[torch.Tensor | None] | None = None,
        verifier_weight: float = 0.0,
        verifier_predictions: list[list[torch.Tensor]] | None = None,
    ) -> Callable:
        """The ``candidate_scorer`` (of `generate_with_media`) that `llm_rerank_weight`,
        `llm_base_agreement_weight` and `edit_verifier_weight` use: beam score + ``weight`` · cosine between
        ImageBind's embedding of each beam's caption and the generation embedding of the same answer +
        ``base_agreement_weight`` · `base_agreement` of the caption with the base image that answer selects +
        ``verifier_weight`` · `EditVerifier.agreement` of the verifier's prediction for the instruction with its
        reading of the caption.

        Args:
            weight (`float`): the weight of the cosine (0 with ``base_agreement_weight`` 0 picks the best beam that
                has a caption and an embedding).
            device (`torch.device`): where ImageBind reads the captions.
            base_agreement_weight (`float`, *optional*, defaults to 0.0): the weight of the base agreement; above 0
                it needs ``parsed`` and ``media_embeds`` and an adapter with an attribute reader.
            parsed (`list[ParsedInstruction]`, *optional*): the batch's instructions (row ``row`` of the scorer's
                calls is ``parsed[row]``), to select each answer's base image.
            media_embeds (`list[torch.Tensor]`, *optional*): the batch's ImageBind vectors (`encode_media`).
            base_priors (`list`, *optional*): per instruction, the `select_base_image` prior
                (`instruction_base_priors`).
            verifier_weight (`float`, *optional*, defaults to 0.0): the weight of the edit verifier's agreement;
                above 0 it needs ``verifier_predictions`` and the `edit_verifier` component.
            verifier_predictions (`list`, *optional*): per instruction, the verifier's per-field prediction of the
                result (`edit_verifier_predictions`).

        Returns:
            `Callable`: ``choose(row, texts, beam_scores, generation_embeds, base_embeds) -> int``, the index of the
            beam to keep.
        """
        if base_agreement_weight > 0 and (parsed is None or media_embeds is None):
            raise ValueError(
                "`base_agreement_weight` > 0 selects each answer's base: pass `parsed` and `media_embeds`."
            )
        if verifier_weight > 0 and (verifier_predictions is None or self.edit_verifier is None):
            raise ValueError(
                "`verifier_weight` > 0 needs the `edit_verifier` component and `verifier_predictions` "
                "(`edit_verifier_predictions`)."
            )
        priors = base_priors if base_priors is not None else [None] * len(parsed or [])

        def choose(
            row: int, texts: list[str], beam_scores: torch.Tensor, generation_embeds: list, base_embeds: list
        ) -> int:
            captions = [parse_answer(text).caption for text in texts]
            valid = [j for j, caption in enumerate(captions) if caption and generation_embeds[j] is not None]
            if not valid:
                return 0
            if weight == 0 and base_agreement_weight == 0 and verifier_weight == 0:  # the best scored valid answer
                return valid[int(beam_scores[valid].float().argmax())]
            totals = beam_scores[valid].float().to(device)
            if weight > 0 or base_agreement_weight > 0:  # read with ImageBind's text tower
                text_embeds = self.encode_captions([captions[j] for j in valid], device)
                text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
                intended = torch.stack([generation_embeds[j].float().to(device) for j in valid])
                agreement = (text_embeds * torch.nn.functional.normalize(intended, dim=-1)).sum(dim=-1)
                totals = totals + weight * agreement
            if base_agreement_weight > 0:
                bases = []
                for j in valid:
                    index = self.select_base_image(
                        parsed[row], media_embeds[row], base_embeds[j], generation_embeds[j], priors[row]
                    )
                    bases.append(media_embeds[row][parsed[row].position_of("image", index)])
                bases = torch.stack(bases).to(device)
                totals = totals + base_agreement_weight * self.base_agreement(text_embeds, bases)
            if verifier_weight > 0:
                read = self.edit_verifier.predict([captions[j] for j in valid])
                totals = totals + verifier_weight * EditVerifier.agreement(verifier_predictions[row], read).to(device)
            return valid[int(totals.argmax())]

        return choose

    def focus_on_base(
        self,
        parsed: list[ParsedInstruction],
        media_embeds: list[torch.Tensor],
        image_patches: list[list[torch.Tensor | None]] | None,
        answers: list[str],
        generation_embeds: list[torch.Tensor | None],
        base_embeds: list[torch.Tensor | None],
        first_beams: dict[int, list[str]],
        rerank_weight: float,
        base_agreement_weight: float,
        max_new_tokens: int,
        device: torch.device,
        base_priors: list[torch.Tensor | None] | None = None,
        num_beams: int | None = None,
        ensemble_weight: float = 0.0,
        verifier_weight: float = 0.0,
        verifier_predictions: list[list[torch.Tensor]] | None = None,
    ) -> tuple[list[str], list[torch.Tensor | None], list[torch.Tensor | None]]:
        """A second look at instructions with several images, with only the chosen base in view
        (`llm_base_focus_weight`).

        Given several scenes, the LLM often copies an object or a background of another input into the edited base.
        For each instruction with several images whose answer lists no ``additions`` (so no other input is meant
        to bring content that the LLM would name), every image is replaced by the base the answer selected and the
        LLM answers again with ``num_beams`` beams. The union of both beam sets is scored under the real instruction
        and media (`score_candidates`) and ranked by `caption_agreement_scorer` with
        ``base_agreement_weight``; the proposals only widen the choice, the judge still sees the true inputs (an
        instruction that takes another image's background keeps its first answer unless the focused one scores
        higher there). Where ``base_priors`` moved the base away from the image the answer's own base embedding
        points to, the first beams were written about another image: only the focused beams compete.

        Args:
            parsed (`list[ParsedInstruction]`): the batch's instructions.
            media_embeds (`list[torch.Tensor]`): their ImageBind vectors (`encode_media`).
            image_patches (`list[list[torch.Tensor | None]]`, *optional*): their patch tokens (`encode_media`).
            answers (`list[str]`): the chosen answers of the first pass, one per instruction.
            generation_embeds (`list`), base_embeds (`list`): the embeddings those answers predict.
            first_beams (`dict[int, list[str]]`): per row, every final beam of the first pass (best first).
            rerank_weight (`float`): the cosine term's weight (`llm_rerank_weight`).
            base_agreement_weight (`float`): the base agreement's weight in this ranking.
            max_new_tokens (`int`): the answer length limit.
            device (`torch.device`): where ImageBind reads the captions.
            base_priors (`list`, *optional*): per instruction, the `select_base_image` prior
                (`instruction_base_priors`).
            num_beams (`int`, *optional*): beams of the focused look; default as many as ``first_beams`` holds for
                the first row looked at again.
            ensemble_weight (`float`, *optional*, defaults to 0.0): `llm_2`'s share of every candidate's score
                (`score_candidates`).
            verifier_weight (`float`, *optional*, defaults to 0.0), verifier_predictions (`list`, *optional*): the
                edit verifier's term of the ranking (`caption_agreement_scorer`).

        Returns:
            `tuple`: new ``answers``, ``generation_embeds`` and ``base_embeds`` (rows that were not looked at again
            keep theirs; the inputs are not modified).
        """
        answers, generation_embeds, base_embeds = list(answers), list(generation_embeds), list(base_embeds)
        priors = base_priors if base_priors is not None else [None] * len(parsed)
        rows, focused_media, focused_patches, moved = [], [], [], set()
        for b, instruction in enumerate(parsed):
            images = list(instruction.image_positions)
            if len(images) < 2 or b not in first_beams or parse_answer(answers[b]).additions:
                continue
            index = self.select_base_image(
                instruction, media_embeds[b], base_embeds[b], generation_embeds[b], priors[b]
            )
            base_position = instruction.position_of("image", index)
            if priors[b] is not None and index != self.select_base_image(
                instruction, media_embeds[b], base_embeds[b], generation_embeds[b]
            ):
                moved.add(b)
            media = media_embeds[b].clone()
            media[images] = media_embeds[b][base_position]
            rows.append(b)
            focused_media.append(media)
            if image_patches is not None:
                row = image_patches[b]
                focused_patches.append([row[base_position] if p in images else x for p, x in enumerate(row)])
        if not rows:
            return answers, generation_embeds, base_embeds

        focused_beams = {}

        def keep_all(row: int, texts: list[str], *unused) -> int:
            focused_beams[row] = list(texts)
            return 0

        generate_with_media(
            self.llm,
            self.llm_tokenizer,
            self.mm_adapter,
            prompts=[self.llm_prompt(parsed[b]) for b in rows],
            media_embeds=focused_media,
            image_patches=focused_patches if image_patches is not None else None,
            token_ids=self.token_ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams or len(first_beams[rows[0]]),
            candidate_scorer=keep_all,
        )
        for i, b in enumerate(rows):
            # The first beams are scored again as well, so every candidate gets the same scoring (re-tokenized text).
            if b in moved:  # the first beams were written about another image
                candidates = list(dict.fromkeys(focused_beams[i]))
            else:
                candidates = first_beams[b] + [text for text in focused_beams[i] if text not in first_beams[b]]
            answers[b], generation_embeds[b], base_embeds[b] = self._judge(
                parsed[b], media_embeds[b], None if image_patches is None else image_patches[b], candidates,
                ensemble_weight, rerank_weight, base_agreement_weight, device, priors[b],
                verifier_weight, None if verifier_predictions is None else verifier_predictions[b],
            )  # fmt: skip
        return answers, generation_embeds, base_embeds

    def _judge(
        self,
        parsed: ParsedInstruction,
        media_embeds: torch.Tensor,
        image_patches: list[torch.Tensor | None] | None,
        candidates: list[str],
        ensemble_weight: float,
        rerank_weight: float,
        base_agreement_weight: float,
        device: torch.device,
        base_prior: torch.Tensor | None,
        verifier_weight: float = 0.0,
        verifier_prediction: list[torch.Tensor] | None = None,
    ) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
        """The best of one instruction's candidate answers (`score_candidates`, then `caption_agreement_scorer`),
        with the generation and base embeddings the first LLM reads from it."""
        scores, generations, bases = self.score_candidates(
            parsed, media_embeds, image_patches, candidates, ensemble_weight
        )
        choose = self.caption_agreement_scorer(
            rerank_weight, device, base_agreement_weight, parsed=[parsed], media_embeds=[media_embeds],
            base_priors=[base_prior], verifier_weight=verifier_weight,
            verifier_predictions=None if verifier_prediction is None else [verifier_prediction],
        )  # fmt: skip
        pick = choose(0, candidates, scores, generations, bases)
        return candidates[pick], generations[pick], bases[pick]

    def score_candidates(
        self,
        parsed: ParsedInstruction,
        media_embeds: torch.Tensor,
        image_patches: list[torch.Tensor | None] | None,
        candidates: list[str],
        ensemble_weight: float = 0.0,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Scores candidate answers to one instruction under its real media (`score_answers`): the first LLM's
        length-normalised log-probability, mixed with `llm_2`'s as ``(1 − ensemble_weight) · s + ensemble_weight ·
        s_2`` when ``ensemble_weight`` > 0. The embeddings are always the first LLM's (its adapter was trained to
        read them), so the ensemble only changes which answer is chosen.

        Args:
            parsed (`ParsedInstruction`): the instruction.
            media_embeds (`torch.Tensor`): its ImageBind vectors (`encode_media`).
            image_patches (`list[torch.Tensor | None]`, *optional*): its patch tokens (`encode_media`).
            candidates (`list[str]`): decoded answers (special tokens kept, no EOS).
            ensemble_weight (`float`, *optional*, defaults to 0.0): `llm_2`'s share of the score (needs `llm_2`).

        Returns:
            `tuple`: ``scores`` `(len(candidates),)`, and per candidate the generation and base embeddings the first
            LLM predicts (`None` where the answer has none).
        """
        scores, generations, bases = score_answers(
            self.llm, self.llm_tokenizer, self.mm_adapter, self.llm_prompt(parsed), media_embeds, candidates,
            token_ids=self.token_ids, image_patches=image_patches,
        )  # fmt: skip
        if ensemble_weight > 0:
            if self.llm_2 is None:
                raise ValueError(f"`ensemble_weight={ensemble_weight}` mixes in `llm_2`'s scores: load `llm_2`.")
            scores_2, _, _ = score_answers(
                self.llm_2, self.llm_tokenizer, self.mm_adapter_2, self.llm_prompt(parsed, self.mm_adapter_2),
                media_embeds, candidates,
                token_ids=self.token_ids, image_patches=image_patches,
            )  # fmt: skip
            scores = (1 - ensemble_weight) * scores + ensemble_weight * scores_2.to(scores.device)
        return scores, generations, bases

    def ensemble_answers(
        self,
        parsed: list[ParsedInstruction],
        media_embeds: list[torch.Tensor],
        image_patches: list[list[torch.Tensor | None]] | None,
        first_beams: dict[int, list[str]],
        ensemble_weight: float,
        rerank_weight: float,
        base_agreement_weight: float,
        max_new_tokens: int,
        device: torch.device,
        base_priors: list[torch.Tensor | None] | None = None,
        verifier_weight: float = 0.0,
        verifier_predictions: list[list[torch.Tensor]] | None = None,
    ) -> tuple[list[str], list[torch.Tensor | None], list[torch.Tensor | None], dict[int, list[str]]]:
        """The second LLM's answers beside the first's (`llm_ensemble_weight`).

        Two LLMs trained apart (another seed of the same recipe) err on different instructions; where one writes a
        colour the words just said instead of the one it sees, the other often does not. `llm_2` answers every
        instruction with as many beams as the first look had; its beams join the first ones, every candidate is
        scored under both LLMs (`score_candidates`) and ranked by `caption_agreement_scorer`.

        Args:
            parsed (`list[ParsedInstruction]`): the batch's instructions.
            media_embeds (`list[torch.Tensor]`): their ImageBind vectors (`encode_media`).
            image_patches (`list[list[torch.Tensor | None]]`, *optional*): their patch tokens (`encode_media`).
            first_beams (`dict[int, list[str]]`): for every row, every final beam of the first LLM (best first).
            ensemble_weight (`float`): `llm_2`'s share of each candidate's score, in (0, 1].
            rerank_weight (`float`), base_agreement_weight (`float`): the judge's weights (`llm_rerank_weight`,
                `llm_base_agreement_weight`).
            max_new_tokens (`int`): the answer length limit.
            device (`torch.device`): where ImageBind reads the captions.
            base_priors (`list`, *optional*): per instruction, the `select_base_image` prior
                (`instruction_base_priors`).
            verifier_weight (`float`, *optional*, defaults to 0.0), verifier_predictions (`list`, *optional*): the
                edit verifier's term of the ranking (`caption_agreement_scorer`).

        Returns:
            `tuple`: per instruction the chosen answer, its generation and base embeddings (the first LLM's), and the
            candidates of every row (the first beams, then `llm_2`'s new ones), for `focus_on_base`.
        """
        if self.llm_2 is None:
            raise ValueError(
                f"`llm_ensemble_weight={ensemble_weight}` needs a second LLM: load `llm_2` and `mm_adapter_2`."
            )
        rows = list(range(len(parsed)))
        missing = [b for b in rows if b not in first_beams]
        if missing:
            raise ValueError(f"`first_beams` must hold every row's beams; rows {missing} have none.")
        if not rows:
            return [], [], [], {}
        second_beams = {}

        def keep_all(row: int, texts: list[str], *unused) -> int:
            second_beams[row] = list(texts)
            return 0

        generate_with_media(
            self.llm_2,
            self.llm_tokenizer,
            self.mm_adapter_2,
            prompts=[self.llm_prompt(p, self.mm_adapter_2) for p in parsed],
            media_embeds=media_embeds,
            image_patches=image_patches,
            token_ids=self.token_ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            num_beams=len(first_beams[0]),
            candidate_scorer=keep_all,
        )
        priors = base_priors if base_priors is not None else [None] * len(parsed)
        answers, generation_embeds, base_embeds, candidates_per_row = [], [], [], {}
        for b in rows:
            candidates_per_row[b] = list(dict.fromkeys(first_beams[b] + second_beams[b]))
            answer, generation, base = self._judge(
                parsed[b], media_embeds[b], None if image_patches is None else image_patches[b],
                candidates_per_row[b], ensemble_weight, rerank_weight, base_agreement_weight, device, priors[b],
                verifier_weight, None if verifier_predictions is None else verifier_predictions[b],
            )  # fmt: skip
            answers.append(answer)
            generation_embeds.append(generation)
            base_embeds.append(base)
        return answers, generation_embeds, base_embeds, candidates_per_row

    def encode_captions(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """ImageBind's text embeddings of captions, `(len(captions), embed_dim)` in float32 (read with
        ``imagebind_tokenizer``)."""
        input_ids = self.imagebind_processor.tokenize(captions).to(device)
        return self.image_encoder.encode_text(input_ids).float()

    @staticmethod
    def blend_caption_embeddings(
        generation_embeds: torch.Tensor, caption_embeds: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """Directions blended, norms kept: ``(1 - weight) · ĝ + weight · ĉ`` rescaled to ``|g|`` per row.

        The LLM regresses its generation embedding towards the training images' embeddings, so for a combination
        of attributes no training image shows it drifts to a seen one; ImageBind's text tower, bound to its image
        tower contrastively, embeds the caption's words as written. A blend gives the decoder's IP-Adapter both.

        Args:
            generation_embeds (`torch.Tensor`): `(n, embed_dim)` the LLM's generation embeddings.
            caption_embeds (`torch.Tensor`): `(n, embed_dim)` ImageBind's embeddings of the same answers' captions.
            weight (`float`): the caption's share, in [0, 1] (0: the generation embedding, 1: the caption's
                direction at the generation embedding's norm).

        Returns:
            `torch.Tensor`: `(n, embed_dim)` float32.
        """
        if generation_embeds.shape != caption_embeds.shape:
            raise ValueError(
                f"`generation_embeds` {tuple(generation_embeds.shape)} and `caption_embeds` "
                f"{tuple(caption_embeds.shape)} must have the same shape, one caption per embedding."
            )
        norms = generation_embeds.float().norm(dim=-1, keepdim=True)
        unit = torch.nn.functional.normalize
        blend = (1 - weight) * unit(generation_embeds.float(), dim=-1) + weight * unit(caption_embeds.float(), dim=-1)
        return unit(blend, dim=-1) * norms

    def base_agreement(self, caption_embeds: torch.Tensor, base_image_embeds: torch.Tensor) -> torch.Tensor:
        """How well captions agree with base images, read by the adapter's attribute reader (`read_attributes`).

        Per attribute field, the probability that the caption's and the image's read-outs name the same class
        (``sum_c p_caption(c) · p_image(c)``); the score is the sum of its logs over all fields but the
        `BASE_AGREEMENT_IGNORED_FIELDS` that agree least (an edit changes those on purpose). A caption that keeps the
        base's unedited objects scores near 0; one that writes another image's colour, or drops an object, lower.

        Args:
            caption_embeds (`torch.Tensor`): ImageBind text embeddings of the captions, `(n, embed_dim)`, any norm.
            base_image_embeds (`torch.Tensor`): ImageBind embeddings of each caption's base image, `(n, embed_dim)`.

        Returns:
            `torch.Tensor`: shape `(n,)`, at most 0.
        """
        if self.mm_adapter.attribute_reader is None:
            raise ValueError("`base_agreement` reads attributes: the pipeline's `mm_adapter` has no attribute reader.")
        if caption_embeds.shape != base_image_embeds.shape:
            raise ValueError(
                f"`caption_embeds` {tuple(caption_embeds.shape)} and `base_image_embeds` "
                f"{tuple(base_image_embeds.shape)} must have the same shape, one base per caption."
            )
        caption_reads = self.mm_adapter.read_attributes(caption_embeds)
        image_reads = self.mm_adapter.read_attributes(base_image_embeds)
        same = torch.stack([(c.float() * i.float()).sum(-1) for c, i in zip(caption_reads, image_reads)], dim=-1)
        kept = max(same.shape[-1] - BASE_AGREEMENT_IGNORED_FIELDS, 1)
        # On the captions' device: the adapter may sit elsewhere (model offload).
        return same.clamp_min(BASE_AGREEMENT_FLOOR).log().topk(kept, dim=-1).values.sum(-1).to(caption_embeds.device)

    def score_candidate_images(
        self,
        images: torch.Tensor,
        captions: list[str | None],
        conditioning_embeds: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """How well decoded images show what they were made for (`num_candidate_images`): the cosine between
        ImageBind's embedding of each image and ImageBind's text embedding of its caption, or, for a row without a
        caption, its conditioning embedding (which lives in ImageBind's space).

        Args:
            images (`torch.Tensor`): `(n, 3, H, W)` in [0, 1]; read as ImageBind reads an 8-bit image file.
            captions (`list[str | None]`): one per image; ``None`` compares with the conditioning embedding instead.
            conditioning_embeds (`torch.Tensor`): `(n, embed_dim)` the embeddings the images were conditioned on.
            device (`torch.device`): where ImageBind runs.

        Returns:
            `torch.Tensor`: `(n,)` float32 cosines, on ``device``.
        """
        if not len(captions) == images.shape[0] == conditioning_embeds.shape[0]:
            raise ValueError(
                f"One caption and one conditioning embedding per image: got {images.shape[0]} images, "
                f"{len(captions)} captions and {conditioning_embeds.shape[0]} embeddings."
            )
        pixels = self.imagebind_processor.preprocess_image(images.cpu())
        image_embeds = self.image_encoder.encode_image(pixels.to(device=device, dtype=self.image_encoder.dtype))
        targets = conditioning_embeds.float().to(device).clone()
        rows = [i for i, caption in enumerate(captions) if caption]
        if rows:
            # Candidates share their caption: read each distinct one once.
            distinct = list(dict.fromkeys(captions[i] for i in rows))
            read = self.encode_captions(distinct, device)
            targets[rows] = read[[distinct.index(captions[i]) for i in rows]]
        unit = torch.nn.functional.normalize
        return (unit(image_embeds.float(), dim=-1) * unit(targets, dim=-1)).sum(dim=-1)

    def _caption_blended(
        self,
        generation_embeds: list[torch.Tensor | None],
        caption_embeds: dict[int, torch.Tensor],
        weight: float,
        device: torch.device,
    ) -> list[torch.Tensor | None]:
        """The generation embeddings with `blend_caption_embeddings` at ``weight`` for the rows in
        ``caption_embeds`` (row → ImageBind's embedding of that answer's caption); other rows, and weight 0, keep
        theirs."""
        rows = list(caption_embeds)
        if weight == 0 or not rows:
            return list(generation_embeds)
        blended = self.blend_caption_embeddings(
            torch.stack([generation_embeds[b].float().to(device) for b in rows]),
            torch.stack([caption_embeds[b] for b in rows]),
            weight,
        )
        out = list(generation_embeds)
        for b, row in zip(rows, blended):
            out[b] = row
        return out

    @staticmethod
    def _candidate_noise(
        shape: torch.Size,
        generator: torch.Generator | list[torch.Generator] | None,
        layout: tuple[int, int, int, int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Generator | list[torch.Generator] | None]:
        """Fresh noise for latent rows laid out as ``layout = (instructions, caption weights, images per prompt,
        candidates)``, and the generator(s) for the scheduler's steps, one per row when ``generator`` is a list.

        A list holds one generator per output image (instruction, image): each draws the rows of all its caption
        weights and candidates, as `randn_tensor` draws one row per generator."""
        if not isinstance(generator, list):
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype), generator
        batch, weights, images, candidates = layout
        draws = [
            randn_tensor((weights, candidates, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator
        ]
        # (batch · images) draws of (weights, candidates) rows → rows ordered (batch, weight, image, candidate).
        noise = torch.stack(draws).view(batch, images, weights, candidates, *shape[1:]).transpose(1, 2)
        rows = [generator[b * images + i] for b in range(batch) for _ in range(weights) for i in range(images)]
        return noise.reshape(shape), [g for g in rows for _ in range(candidates)]

    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning of an SD 1.x / SDXL decoder: ``(prompt_embeds, pooled_prompt_embeds or None)``."""
        return encode_decoder_prompt(
            prompts, device, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2
        )

    def encode_prior_prompt(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The prior's text hidden states for its (always empty) prompt: from ``prior_text_encoder`` when the pipeline
        keeps one, else ``None`` (the prior then uses the states stored in its weights)."""
        if self.prior_text_encoder is None:
            return None
        ids = self.prior_tokenizer([""] * batch_size, return_tensors="pt").input_ids.to(device)
        return self.prior_text_encoder(ids).last_hidden_state

    def _decoder_conditioning(
        self,
        captions: list[str],
        embeds: torch.Tensor,
        negative_prompt: str,
        prompt_template: str,
        height: int,
        width: int,
        device: torch.device,
        do_cfg: bool,
    ) -> dict[str, Any]:
        """UNet keyword arguments for the batch (negative branch first when ``do_cfg``)."""
        dtype = self.unet.dtype
        zero = torch.zeros_like(embeds)
        if self.decoder_family == DECODER_IMAGEBIND:
            image_embeds = torch.cat([zero, embeds]) if do_cfg else embeds
            return {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": image_embeds.to(dtype)}}

        prompts = [prompt_template.format(caption=caption) for caption in captions]
        prompt_embeds, pooled = self.encode_prompt(prompts, device)
        if do_cfg:
            negative_embeds, negative_pooled = self.encode_prompt([negative_prompt] * len(prompts), device)
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled]) if pooled is not None else None
        # One adapter; per-sample embeddings must be (B, 1, E) so diffusers keeps them per sample.
        ip_embeds = (torch.cat([zero, embeds]) if do_cfg else embeds)[:, None, :].to(dtype)
        added = {"image_embeds": [ip_embeds]}
        if self.decoder_family == DECODER_SDXL:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
            added.update(text_embeds=pooled.to(dtype), time_ids=time_ids.repeat(prompt_embeds.shape[0], 1))
        return {"encoder_hidden_states": prompt_embeds.to(dtype), "added_cond_kwargs": added}

    @staticmethod
    def _map_unet_kwargs(unet_kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Apply ``fn`` to every tensor of (nested) UNet keyword arguments."""

        def apply(x):
            if isinstance(x, torch.Tensor):
                return fn(x)
            if isinstance(x, list):
                return [apply(v) for v in x]
            if isinstance(x, dict):
                return {k: apply(v) for k, v in x.items()}
            return x

        return apply(unet_kwargs)

    @classmethod
    def _conditional_branch(cls, unet_kwargs: dict[str, Any], do_cfg: bool) -> dict[str, Any]:
        """The conditional half of CFG-batched UNet kwargs (inversion runs with guidance 1)."""
        return cls._map_unet_kwargs(unet_kwargs, lambda x: x.chunk(2)[1]) if do_cfg else unet_kwargs

    @classmethod
    def _repeat_per_item(cls, unet_kwargs: dict[str, Any], repeats: int, do_cfg: bool) -> dict[str, Any]:
        """Repeat each item's conditioning ``repeats`` times (inside each CFG half)."""
        if repeats == 1:
            return unet_kwargs

        def repeat(x: torch.Tensor) -> torch.Tensor:
            halves = x.chunk(2) if do_cfg else (x,)
            return torch.cat([h.repeat_interleave(repeats, dim=0) for h in halves])

        return cls._map_unet_kwargs(unet_kwargs, repeat)

    @contextmanager
    def _vae_precision(self) -> Iterator[None]:
        """Run the VAE in float32 when it is float16 and its config asks for it (SDXL's VAE overflows in fp16)."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent *mean* of ``images`` in [-1, 1] (deterministic; the official code samples)."""
        with self._vae_precision():
            latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (the inverse of `vae_encode`)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with self._vae_precision():
            return self.vae.decode((latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def invert(
        self, latents: torch.Tensor, num_inference_steps: int, unet_kwargs: dict[str, Any], device: torch.device
    ) -> torch.Tensor:
        """DDIM-invert clean ``latents`` to the first timestep of the decoding schedule (guidance 1)."""
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config, clip_sample=False)
        inverse.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(inverse.timesteps):
            noise_pred = self.unet(latents, t, return_dict=False, **unet_kwargs)[0]
            latents = inverse.step(noise_pred, t, latents).prev_sample
        return latents

    def _check_imagebind_tokenizer(self, name: str, value: float, use: str) -> None:
        """Fail, naming the knob, when a knob that reads text with ImageBind is on but there is no tokenizer."""
        if self.imagebind_tokenizer is None:
            raise ValueError(
                f"`{name}={value}` {use} with ImageBind's text encoder, but this pipeline has no "
                "`imagebind_tokenizer` (load one, e.g. `CLIPTokenizer`, and pass `imagebind_tokenizer=`), or pass "
                f"`{name}=0` (the weight may come from the pipeline's `edit_defaults`)."
            )

    @staticmethod
    def _check_beams(name: str, value: float, llm_num_beams: int, use: str) -> None:
        """Knobs that choose among the LLM's final beams need beam search."""
        if llm_num_beams < 2:
            raise ValueError(
                f"`{name}={value}` {use}: it needs `llm_num_beams` > 1 (and `llm_do_sample=False`), got "
                f"llm_num_beams={llm_num_beams}."
            )

    @staticmethod
    def _caption_weights(value: Any) -> tuple[float, ...]:
        """`caption_embedding_weight` as a tuple: one weight, or the weights every output image is drawn at."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        ok = bool(values) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values
        )
        if not ok:
            raise ValueError(
                "`caption_embedding_weight` must be a number in [0, 1] or a non-empty list of them, got "
                f"{value!r}."
            )
        return tuple(float(v) for v in values)

    def resolve_edit_settings(self, **passed: Any) -> dict[str, Any]:
        """The edit knobs for one call: passed value, else the pipeline's ``edit_defaults``, else the official
        ``__call__`` default."""
        stored = self.config.get("edit_defaults") or {}
        settings = {}
        for name, builtin in BUILTIN_EDIT_DEFAULTS.items():
            value = passed.get(name)
            settings[name] = value if value is not None else stored.get(name, builtin)
        settings["embedding_weights"] = tuple(settings["embedding_weights"])
        return settings

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        instruction: str | list[str],
        images: ImageInput | list | None = None,
        audio: AudioInput | list | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        structure_preservation: float | None = None,
        embedding_weights: tuple[float, float, float] | None = None,
        embedding_norm: float | None = None,
        ip_adapter_scale: float | None = None,
        prior_guidance_scale: float | None = None,
        prior_score: float | None = None,
        llm_do_sample: bool | None = None,
        llm_temperature: float | None = None,
        llm_top_p: float | None = None,
        llm_max_new_tokens: int | None = None,
        llm_num_beams: int | None = None,
        llm_rerank_weight: float | None = None,
        llm_base_agreement_weight: float | None = None,
        llm_base_focus_weight: float | None = None,
        base_instruction_weight: float | None = None,
        caption_embedding_weight: float | list[float] | None = None,
        num_candidate_images: int | None = None,
        llm_ensemble_weight: float | None = None,
        edit_verifier_weight: float | None = None,
        negative_prompt: str | None = None,
        prompt_template: str | None = None,
        on_invalid_answer: str = "error",
        conditioning_embeds: torch.Tensor | None = None,
        captions: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> InstructAny2PixPipelineOutput | tuple:
        r"""
        Edit images following multimodal instructions.

        Edit knobs — our names, the paper's and the official code's, with the official defaults
        (``__call__`` / demo app):

        | argument | paper | official | official default | effect |
        |---|---|---|---|---|
        | `structure_preservation` | β (latent side) | `alpha` | 0.7 / 1.0 | share of the inverted latent kept vs fresh noise; higher keeps more layout |
        | `embedding_weights` | α (embedding side) | `h=[h0,h1,h2]` | [0.0,0.4,1.0] / [0.4,0.6,0.4] | weights of base-image, LLM and refined embeddings in the conditioning |
        | `embedding_norm` | — | `norm` | 20 | norm of the mixed conditioning embedding |
        | `guidance_scale` | — | `cfg` | 10 | decoder classifier-free guidance |
        | `ip_adapter_scale` | — | `scale` | 1.0 | IP-Adapter strength (text-to-image decoders) |
        | `prior_guidance_scale` | — | hard-coded | 10 | refinement-prior guidance |
        | `prior_score` | — | hard-coded | 6.5 | quality score the prior is conditioned on |
        | `num_inference_steps` | — | `steps` | 25 | inversion and denoising steps |
        | `llm_temperature`, `llm_max_new_tokens` | — | hard-coded | 0.3, 100 | LLM sampling |
        | `llm_num_beams` | — | — | 1 | beam search over the LLM's answer (needs `llm_do_sample=False`) |
        | `llm_rerank_weight` | — | — | 0 | rerank the beams by each caption's agreement with its generation embedding |
        | `llm_base_agreement_weight` | — | — | 0 | rerank the beams by each caption's agreement with the base image |
        | `llm_base_focus_weight` | — | — | 0 | several images: add beams of the LLM shown only the chosen base, rerank all |
        | `base_instruction_weight` | — | — | 0 | several images: the base choice also weighs how well the instruction's words fit each image |
        | `caption_embedding_weight` | — | — | 0 | blend ImageBind's embedding of the caption into the LLM's embedding |
        | `num_candidate_images` | — | — | 1 | draw several edits per output, keep the one closest to its caption |
        | `llm_ensemble_weight` | — | — | 0 | a second LLM (`llm_2`) adds its beams and shares every answer's score |
        | `edit_verifier_weight` | — | — | 0 | rerank the answers by the edit verifier's agreement with their captions |
        | — | — | `refinement` | 0.5 / 0.3 | SDXL-refiner img2img strength: not part of this pipeline (chain `StableDiffusionXLImg2ImgPipeline`) |

        Official advice, in our names: too little change → lower `structure_preservation`, raise `embedding_norm`,
        lower the base weight ``embedding_weights[0]``; too much change → the opposite; low quality → raise the
        refined weight ``embedding_weights[2]`` and `num_inference_steps`; wrong content → another seed, or raise the
        generation weight ``embedding_weights[1]``.

        Args:
            instruction (`str` or `list[str]`):
                The edit, with placeholders ``[image1]``, ``[audio1]``, … (1-based) for the inputs. A list edits a
                batch; then ``images``/``audio`` are lists of per-instruction lists.
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, path, or a list of them):
                Images referenced as ``[image1]``, ``[image2]``, …. Arrays/tensors are ``(H, W, 3)`` or ``(3, H, W)``
                with values in [0, 1] (or uint8).
            audio (path, `(waveform, sample_rate)`, or a list of them):
                Audio clips referenced as ``[audio1]``, …; any sample rate and channel count.
            height (`int`, *optional*), width (`int`, *optional*):
                Output size; defaults to the UNet's native size. The base image is resized and centre-cropped to it.
            Every knob below left as `None` takes the pipeline's `edit_defaults` (see `__init__`), else the official
            `__call__` default quoted here.

            num_inference_steps (`int`, defaults to 25): DDIM inversion and denoising steps.
            guidance_scale (`float`, defaults to 10.0): decoder classifier-free guidance (≤ 1 disables it).
            structure_preservation (`float`, defaults to 0.7): see the table (official ``alpha``).
            embedding_weights (`tuple[float, float, float]`, defaults to (0.0, 0.4, 1.0)): see the table (``h``).
            embedding_norm (`float`, defaults to 20.0): see the table (``norm``).
            ip_adapter_scale (`float`, defaults to 1.0): see the table (``scale``); restored after the call.
            prior_guidance_scale (`float`, defaults to 10.0), prior_score (`float`, defaults to 6.5): the prior.
            llm_do_sample (`bool`, defaults to True), llm_temperature (`float`, defaults to 0.3),
            llm_top_p (`float`, *optional*), llm_max_new_tokens (`int`, defaults to 100):
                LLM decoding; sampling draws from ``generator`` so results are reproducible.
            llm_num_beams (`int`, defaults to 1): beam search over the LLM's answer when above 1 (transformers' beam
                search, with ``llm_do_sample=False``); the embeddings are read from the chosen answer.
            llm_rerank_weight (`float`, defaults to 0.0): above 0, the answer is chosen among all ``llm_num_beams``
                final beams by ``beam score + llm_rerank_weight · cos(ImageBind(caption), e_gen)``, where ``e_gen``
                is the generation embedding the same answer predicts (read after its caption) and ImageBind reads the
                caption with ``imagebind_tokenizer`` (needed); answers without a caption or a generation embedding are
                not chosen unless all lack one (then the best beam). Both vectors live in ImageBind's space, so the
                score asks whether the words the LLM wrote describe the image its state says it means to make.
            llm_base_agreement_weight (`float`, defaults to 0.0): above 0, adds ``llm_base_agreement_weight ·
                base_agreement(ImageBind(caption), base image)`` to that score (see `base_agreement`; the base is the
                one the same answer selects): beams that keep the base's unedited objects win over beams that copy
                another input's colour or drop an object. Needs what `llm_rerank_weight` needs and an `mm_adapter`
                with an attribute reader (`attribute_classes`).
            llm_base_focus_weight (`float`, defaults to 0.0): above 0, for each instruction with several images whose
                chosen answer lists no ``additions`` (no other input is added to the result), the LLM answers again
                with every image replaced by the base that answer selected, so it cannot copy another input's
                objects (see `focus_on_base`); those beams join the first ones, all are scored under the real
                instruction and media (`score_answers`: the same length-normalised log-probability as the beam
                score), and the best by ``score + llm_rerank_weight · cosine + llm_base_focus_weight ·
                base_agreement`` is kept. Needs what `llm_base_agreement_weight` needs.
            base_instruction_weight (`float`, defaults to 0.0): above 0, for an instruction with several images the
                base is the image with the largest ``e_base · e_image + base_instruction_weight · cos(ImageBind(words),
                e_image)``, where ``words`` is the instruction without its placeholders
                (`instruction_base_priors`): "edit the one with a red circle" favours the image with a red circle.
                Every base choice uses it (the reranking's base agreement, the base focus, the edit). Needs
                ``imagebind_tokenizer``.
            caption_embedding_weight (`float` or `list[float]`, defaults to 0.0): in [0, 1]; above 0, the generation
                embedding is replaced by `blend_caption_embeddings` of it and ImageBind's text embedding of the
                answer's caption (this share of the direction, the norm kept) before the prior, the mix and base
                selection. Needs ``imagebind_tokenizer``; answers without a caption keep their embedding. A list of
                weights draws every output image at each of them (one conditioning, base choice and inversion per
                weight) and keeps, per instruction, the weight whose best candidate `score_candidate_images` scores
                highest: the output's embeddings and base are that weight's.
            num_candidate_images (`int`, defaults to 1): above 1, every output image (at each caption weight) is
                the best of this many denoisings from different noise, judged by `score_candidate_images`: the
                cosine between ImageBind's embedding of the decoded candidate and ImageBind's text embedding of its
                caption (the conditioning embedding where there is no caption to read: an answer without one, or
                `conditioning_embeds` without `captions`). A decoder that draws a rare combination of attributes
                wrongly from some noise or conditioning draws it right from another; ImageBind, bound to text, tells
                them apart. Costs that many times the denoising and a VAE decode of every candidate; the callback
                sees every candidate's latents (rows ordered by instruction, caption weight, output image,
                candidate). Needs ``imagebind_tokenizer`` to read captions.
            llm_ensemble_weight (`float`, defaults to 0.0): in [0, 1]; above 0, the second LLM (`llm_2`, with
                `mm_adapter_2`) answers every instruction with ``llm_num_beams`` beams too; its beams join the first
                LLM's, and every answer's score — in the reranking and in the base focus — becomes ``(1 − w) · s +
                w · s_2``, the two LLMs' length-normalised log-probabilities of it (`ensemble_answers`,
                `score_candidates`). The embeddings are still read from the first LLM. Needs `llm_2` and beam
                search (``llm_num_beams`` > 1).
            edit_verifier_weight (`float`, defaults to 0.0): above 0, every ranking of the LLM's answers (the
                reranking, the base focus, the ensemble) adds ``edit_verifier_weight · Σ_f log Σ_c p_f(c) q_f(c)``:
                ``p`` the `edit_verifier`'s prediction of the result's attribute fields from the instruction's words
                and its inputs' attribute reads (`edit_verifier_predictions`), ``q`` its reading of the answer's
                caption. The verifier copies classes from where the instruction points, so it catches the LLM
                writing a colour the words name onto an object the edit leaves alone. Needs `edit_verifier` and beam
                search (``llm_num_beams`` > 1).
            negative_prompt (`str`, defaults to the official one): the decoder's negative prompt (text-to-image
                decoders). A decoder trained with empty prompts as its unconditional input (e.g. ShapesWorld's) stores
                ``""`` in its `edit_defaults`.
            prompt_template (`str`, defaults to ``"best quality, high quality, {caption}"``): the decoder prompt;
                ``{caption}`` is the LLM's caption.
            on_invalid_answer (`str`, defaults to ``"error"``):
                What to do when the LLM's answer has no ``<im_gen>…<video>`` generation embedding: ``"error"`` raises
                a `ValueError` quoting the answer; ``"use_base"`` uses the base image's embedding instead (a mild
                re-rendering of the base) and the caption falls back to the instruction text.
            conditioning_embeds (`torch.Tensor`, *optional*):
                ``(batch, embed_dim)`` conditioning from an earlier output; skips the LLM and the prior (the base is
                then the first referenced image).
            captions (`str` or `list[str]`, *optional*):
                With ``conditioning_embeds``: the decoder captions (one per instruction) in place of the LLM's; by
                default the instruction text. Only text-to-image decoders read them.
            num_images_per_prompt (`int`, defaults to 1): edits per instruction (one LLM answer, different noise).
            generator (`torch.Generator` or list, *optional*): makes LLM sampling and all noise deterministic. A list
                holds one generator per output image (``batch × num_images_per_prompt``); the LLM samples from a copy
                of the first.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (skips the VAE).
            return_dict (`bool`, defaults to True): return an [`InstructAny2PixPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as ``callback_on_step_end(self, step, timestep, callback_kwargs)`` after each denoising step;
                may return replacements for the tensors in ``callback_on_step_end_tensor_inputs``.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed to the callback.

        Returns:
            [`InstructAny2PixPipelineOutput`] or `tuple` ``(images, answers, captions, base_image_indices)``.
        """
        settings = self.resolve_edit_settings(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            structure_preservation=structure_preservation,
            embedding_weights=embedding_weights,
            embedding_norm=embedding_norm,
            ip_adapter_scale=ip_adapter_scale,
            prior_guidance_scale=prior_guidance_scale,
            prior_score=prior_score,
            llm_do_sample=llm_do_sample,
            llm_temperature=llm_temperature,
            llm_max_new_tokens=llm_max_new_tokens,
            llm_num_beams=llm_num_beams,
            llm_rerank_weight=llm_rerank_weight,
            llm_base_agreement_weight=llm_base_agreement_weight,
            llm_base_focus_weight=llm_base_focus_weight,
            base_instruction_weight=base_instruction_weight,
            caption_embedding_weight=caption_embedding_weight,
            num_candidate_images=num_candidate_images,
            llm_ensemble_weight=llm_ensemble_weight,
            edit_verifier_weight=edit_verifier_weight,
            negative_prompt=negative_prompt,
            prompt_template=prompt_template,
        )
        negative_prompt, prompt_template = settings["negative_prompt"], settings["prompt_template"]
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(prompt_template, str) or "{caption}" not in prompt_template:
            raise ValueError(f"`prompt_template` must be a string containing '{{caption}}', got {prompt_template!r}.")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a string, got {type(negative_prompt).__name__}.")
        num_inference_steps, guidance_scale = settings["num_inference_steps"], settings["guidance_scale"]
        structure_preservation, embedding_weights = settings["structure_preservation"], settings["embedding_weights"]
        embedding_norm, ip_adapter_scale = settings["embedding_norm"], settings["ip_adapter_scale"]
        prior_guidance_scale, prior_score = settings["prior_guidance_scale"], settings["prior_score"]
        llm_do_sample, llm_temperature = settings["llm_do_sample"], settings["llm_temperature"]
        llm_max_new_tokens, llm_num_beams = settings["llm_max_new_tokens"], settings["llm_num_beams"]
        if isinstance(llm_num_beams, bool) or not isinstance(llm_num_beams, int) or llm_num_beams < 1:
            raise ValueError(f"`llm_num_beams` must be a positive int, got {llm_num_beams!r}.")
        if llm_num_beams > 1 and llm_do_sample and conditioning_embeds is None:
            raise ValueError(
                f"`llm_num_beams={llm_num_beams}` is beam search, which needs `llm_do_sample=False`; pass "
                "`llm_num_beams=1` to sample."
            )
        llm_rerank_weight = settings["llm_rerank_weight"]
        llm_base_agreement_weight = settings["llm_base_agreement_weight"]
        llm_base_focus_weight = settings["llm_base_focus_weight"]
        base_instruction_weight = settings["base_instruction_weight"]
        # What each weight reads with ImageBind's text tower; the three `llm_*` weights also rank beams.
        text_uses = {
            "llm_rerank_weight": "reads captions",
            "llm_base_agreement_weight": "reads captions",
            "llm_base_focus_weight": "reads captions",
            "base_instruction_weight": "embeds the instruction's words",
        }
        for name, use in text_uses.items():
            value = settings[name]
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (is_number and value >= 0 and np.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
            if value == 0 or conditioning_embeds is not None:
                continue
            if name.startswith("llm_") and llm_num_beams < 2:
                raise ValueError(
                    f"`{name}={value}` reranks beams: it needs `llm_num_beams` > 1 (and `llm_do_sample=False`), got "
                    f"llm_num_beams={llm_num_beams}; pass `{name}=0` to decode without reranking (the weight may come "
                    "from the pipeline's `edit_defaults`)."
                )
            self._check_imagebind_tokenizer(name, value, use)
        caption_embedding_weight = settings["caption_embedding_weight"]
        caption_weights = self._caption_weights(caption_embedding_weight)
        if any(caption_weights) and conditioning_embeds is None:
            self._check_imagebind_tokenizer(
                "caption_embedding_weight", caption_embedding_weight, "embeds the LLM's caption"
            )
        if conditioning_embeds is not None:  # no LLM, no caption to blend: one conditioning per instruction
            caption_weights = (0.0,)
        num_candidate_images = settings["num_candidate_images"]
        candidates_ok = isinstance(num_candidate_images, int) and not isinstance(num_candidate_images, bool)
        if not candidates_ok or num_candidate_images < 1:
            raise ValueError(f"`num_candidate_images` must be a positive int, got {num_candidate_images!r}.")
        if num_candidate_images > 1 and (conditioning_embeds is None or captions is not None):
            self._check_imagebind_tokenizer(
                "num_candidate_images", num_candidate_images, "compares each candidate image with its caption"
            )
        llm_ensemble_weight = settings["llm_ensemble_weight"]
        ensemble_ok = isinstance(llm_ensemble_weight, (int, float)) and not isinstance(llm_ensemble_weight, bool)
        if not (ensemble_ok and 0 <= llm_ensemble_weight <= 1):
            raise ValueError(f"`llm_ensemble_weight` must be a number in [0, 1], got {llm_ensemble_weight!r}.")
        if llm_ensemble_weight > 0 and conditioning_embeds is None:
            if self.llm_2 is None:
                raise ValueError(
                    f"`llm_ensemble_weight={llm_ensemble_weight}` mixes in a second LLM, but this pipeline has no "
                    "`llm_2` (pass `llm_2=` and `mm_adapter_2=`, e.g. another seed's `train_llm.py` output), or pass "
                    "`llm_ensemble_weight=0` (the weight may come from the pipeline's `edit_defaults`)."
                )
            self._check_beams("llm_ensemble_weight", llm_ensemble_weight, llm_num_beams, "pools both LLMs' beams")
        edit_verifier_weight = settings["edit_verifier_weight"]
        verifier_ok = isinstance(edit_verifier_weight, (int, float)) and not isinstance(edit_verifier_weight, bool)
        if not (verifier_ok and edit_verifier_weight >= 0 and np.isfinite(edit_verifier_weight)):
            raise ValueError(f"`edit_verifier_weight` must be a finite number >= 0, got {edit_verifier_weight!r}.")
        if edit_verifier_weight > 0 and conditioning_embeds is None:
            if self.edit_verifier is None:
                raise ValueError(
                    f"`edit_verifier_weight={edit_verifier_weight}` ranks answers with an edit verifier, but this "
                    "pipeline has no `edit_verifier` (pass `edit_verifier=`, e.g. `training/train_edit_verifier.py`'s "
                    "output), or pass `edit_verifier_weight=0` (the weight may come from the pipeline's "
                    "`edit_defaults`)."
                )
            self._check_beams("edit_verifier_weight", edit_verifier_weight, llm_num_beams, "reranks beams")
        for name in ("llm_base_agreement_weight", "llm_base_focus_weight"):
            if settings[name] > 0 and conditioning_embeds is None and self.mm_adapter.attribute_reader is None:
                raise ValueError(
                    f"`{name}={settings[name]}` reads attributes, but this pipeline's `mm_adapter` has no attribute "
                    f"reader (`attribute_classes`); pass `{name}=0`."
                )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = height or default_size
        width = width or default_size

        # 1. Parse and validate everything before any model runs.
        instructions, per_images, per_audio = self._normalize_inputs(instruction, images, audio)
        parsed = self.check_inputs(
            instructions,
            per_images,
            per_audio,
            height,
            width,
            num_inference_steps,
            structure_preservation,
            tuple(embedding_weights),
            embedding_norm,
            num_images_per_prompt,
            output_type,
            on_invalid_answer,
            callback_on_step_end_tensor_inputs,
            conditioning_embeds,
            captions,
        )
        if edit_verifier_weight > 0 and conditioning_embeds is None:
            for p in parsed:  # the verifier's limits (placeholders, length), before any model runs
                self.edit_verifier.tokenize(p.text)
        # Decode every input once, up front: bad files fail here, before any model runs.
        per_images = [[self.imagebind_processor.load_image(img) for img in imgs] for imgs in per_images]
        per_audio = [[self.imagebind_processor.load_audio(clip) for clip in clips] for clips in per_audio]
        device = self._execution_device
        batch_size = len(instructions)
        if isinstance(generator, list) and len(generator) != batch_size * num_images_per_prompt:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; a list needs one per output image: "
                f"{batch_size} instruction(s) × num_images_per_prompt={num_images_per_prompt} = "
                f"{batch_size * num_images_per_prompt}."
            )
        embed_dim = self.image_encoder.config.out_embed_dim
        media_norm = self.mm_adapter.config.media_embed_norm

        # 2. Encode every referenced input once with ImageBind.
        media_embeds, image_patches = self.encode_media(parsed, per_images, per_audio, device)

        if conditioning_embeds is None:
            # 3. LLM: caption, generation embedding and base embedding (KV cache; media injected at prefill).
            scorer, first_beams = None, {}
            base_priors = self.instruction_base_priors(parsed, media_embeds, base_instruction_weight, device)
            keep_beams = llm_base_focus_weight > 0 or llm_ensemble_weight > 0
            verifier_predictions = None
            if edit_verifier_weight > 0:
                verifier_predictions = self.edit_verifier_predictions(parsed, media_embeds)
            if llm_rerank_weight > 0 or llm_base_agreement_weight > 0 or edit_verifier_weight > 0 or keep_beams:
                scorer = choose = self.caption_agreement_scorer(
                    llm_rerank_weight,
                    device,
                    llm_base_agreement_weight,
                    parsed=parsed,
                    media_embeds=media_embeds,
                    base_priors=base_priors,
                    verifier_weight=edit_verifier_weight,
                    verifier_predictions=verifier_predictions,
                )
            if keep_beams:

                def scorer(row, texts, *scores_and_embeds):
                    first_beams[row] = list(texts)  # ranked again beside `llm_2`'s and the focused ones
                    if llm_ensemble_weight > 0:  # `ensemble_answers` judges the pooled beams: no pick needed here
                        return 0
                    return choose(row, texts, *scores_and_embeds)

            llm_out = generate_with_media(
                self.llm,
                self.llm_tokenizer,
                self.mm_adapter,
                prompts=[self.llm_prompt(p) for p in parsed],
                media_embeds=media_embeds,
                image_patches=image_patches,
                token_ids=self.token_ids,
                generator=_independent_copy(generator[0] if isinstance(generator, list) else generator),
                do_sample=llm_do_sample,
                temperature=llm_temperature,
                top_p=llm_top_p,
                max_new_tokens=llm_max_new_tokens,
                num_beams=llm_num_beams,
                candidate_scorer=scorer,
            )
            answers = list(llm_out.texts)
            llm_generation_embeds = list(llm_out.generation_embeds)
            llm_base_embeds = list(llm_out.base_embeds)
            if llm_ensemble_weight > 0:
                answers, llm_generation_embeds, llm_base_embeds, first_beams = self.ensemble_answers(
                    parsed, media_embeds, image_patches, first_beams, llm_ensemble_weight, llm_rerank_weight,
                    llm_base_agreement_weight, llm_max_new_tokens, device, base_priors,
                    edit_verifier_weight, verifier_predictions,
                )  # fmt: skip
            if llm_base_focus_weight > 0:
                answers, llm_generation_embeds, llm_base_embeds = self.focus_on_base(
                    parsed, media_embeds, image_patches, answers, llm_generation_embeds, llm_base_embeds,
                    first_beams, llm_rerank_weight, llm_base_focus_weight, llm_max_new_tokens, device, base_priors,
                    num_beams=llm_num_beams, ensemble_weight=llm_ensemble_weight,
                    verifier_weight=edit_verifier_weight, verifier_predictions=verifier_predictions,
                )  # fmt: skip
            parsed_answers = [parse_answer(answer) for answer in answers]
            captions, base_rows = [], []
            for b in range(batch_size):
                if llm_generation_embeds[b] is None and on_invalid_answer == "error":
                    raise ValueError(
                        f"The LLM's answer to {instructions[b]!r} has no generation embedding (<im_gen>…<video>): "
                        f"{answers[b]!r}. Try another seed, or pass on_invalid_answer='use_base'."
                    )
                caption = parsed_answers[b].caption
                if caption is None and on_invalid_answer == "use_base":
                    caption = instructions[b]
                captions.append(caption)
                base_rows.append(llm_base_embeds[b])
            judged_captions = [answer.caption or None for answer in parsed_answers]
            # One variant per instruction and caption weight (v = b · W + w); each gets its own conditioning. The
            # captions are read once, for every weight.
            caption_embeds = {}
            rows = [b for b, g in enumerate(llm_generation_embeds) if g is not None and parsed_answers[b].caption]
            if rows and any(caption_weights):
                read = self.encode_captions([parsed_answers[b].caption for b in rows], device)
                caption_embeds = dict(zip(rows, read))
            variant_generations = [
                self._caption_blended(llm_generation_embeds, caption_embeds, weight, device)
                for weight in caption_weights
            ]
            generation_rows, base_indices = [], []
            for b in range(batch_size):
                for blended in variant_generations:
                    gen = blended[b]
                    # 4. Pick the base image (images only; audio is never a base).
                    base_index = self.select_base_image(
                        parsed[b], media_embeds[b], llm_base_embeds[b], gen, base_priors[b]
                    )
                    if gen is None:  # on_invalid_answer="use_base"
                        gen = rescale_to_norm(media_embeds[b][parsed[b].position_of("image", base_index)], media_norm)
                    generation_rows.append(gen.float().to(device))
                    base_indices.append(base_index)
            generation_embeds = torch.stack(generation_rows)

            # 5. Refine with the prior (once for every variant, both guidance branches in one pass).
            refined_embeds = self.prior.refine(
                generation_embeds.to(self.prior.dtype),
                guidance_scale=prior_guidance_scale,
                score=prior_score,
                text_hidden_states=self.encode_prior_prompt(len(generation_rows), device),
            ).float()

            # 6. Mix: z = h0·e_base + h1·e_gen + h2·e_refined, rescaled to `embedding_norm`.
            variant_of = [b for b in range(batch_size) for _ in caption_weights]
            base_media = torch.stack(
                [media_embeds[b][parsed[b].position_of("image", i)] for b, i in zip(variant_of, base_indices)]
            ).to(device)
            h0, h1, h2 = embedding_weights
            mixed = h0 * rescale_to_norm(base_media, media_norm) + h1 * generation_embeds + h2 * refined_embeds
            conditioning_embeds = rescale_to_norm(mixed, embedding_norm)
        else:
            answers, base_rows = [""] * batch_size, [None] * batch_size
            judged_captions = list(captions) if captions is not None else [None] * batch_size
            captions = list(captions) if captions is not None else [p.text for p in parsed]
            base_indices = [p.image_references[0].index for p in parsed]
            variant_of = list(range(batch_size))
            generation_embeds = refined_embeds = torch.zeros(batch_size, embed_dim, device=device)
            conditioning_embeds = conditioning_embeds.to(device=device, dtype=torch.float32)
        num_variants = len(caption_weights)

        # 7. Decoder conditioning, computed once per variant.
        do_cfg = guidance_scale > 1.0
        prompts = [captions[b] if captions[b] is not None else instructions[b] for b in variant_of]
        unet_kwargs = self._decoder_conditioning(
            prompts, conditioning_embeds, negative_prompt, prompt_template, height, width, device, do_cfg
        )

        with temporary_ip_adapter_scale(self.unet, ip_adapter_scale):
            # 8. Invert each variant's base image once (VAE mean; DDIM inversion with the decoding conditioning,
            # guidance 1), then repeat it for every output image and candidate: rows (b, w, image, candidate).
            base_images = [per_images[b][i] for b, i in zip(variant_of, base_indices)]
            pixels = self.image_processor.preprocess(base_images, height=height, width=width, resize_mode="crop")
            latents = self.vae_encode(pixels.to(device)).to(self.unet.dtype)
            latents = self.invert(latents, num_inference_steps, self._conditional_branch(unet_kwargs, do_cfg), device)
            repeats = num_images_per_prompt * num_candidate_images
            latents = latents.repeat_interleave(repeats, dim=0)
            unet_kwargs = self._repeat_per_item(unet_kwargs, repeats, do_cfg)
            repeated_embeds = conditioning_embeds.repeat_interleave(repeats, dim=0)

            # 9. Mix in fresh noise (the main edit-strength knob), then denoise with guidance.
            noise, step_generator = self._candidate_noise(
                latents.shape, generator, (batch_size, num_variants, num_images_per_prompt, num_candidate_images),
                device, latents.dtype,
            )  # fmt: skip
            latents = mix_latents_with_noise(latents, noise, structure_preservation)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * self.scheduler.init_noise_sigma
            timesteps = self.scheduler.timesteps
            extra_step_kwargs = {}
            if "generator" in inspect.signature(self.scheduler.step).parameters:
                extra_step_kwargs["generator"] = step_generator
            self._num_timesteps = len(timesteps)
            for i, t in enumerate(self.progress_bar(timesteps)):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, return_dict=False, **unet_kwargs)[0]
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents, "conditioning_embeds": repeated_embeds}
                    callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

        # 10. Decode; with several candidates, keep per instruction the caption weight whose best candidate is
        # closest to the caption, and per output image its closest candidate at that weight.
        decoded = None
        chosen = torch.zeros(batch_size, dtype=torch.long)
        if num_variants * num_candidate_images > 1:
            decoded = self.vae_decode(latents)
            scores = self.score_candidate_images(
                (decoded.float() / 2 + 0.5).clamp(0, 1),
                [judged_captions[b] for b in variant_of for _ in range(repeats)],
                repeated_embeds,
                device,
            ).cpu()
            scores = scores.view(batch_size, num_variants, num_images_per_prompt, num_candidate_images)
            chosen = scores.flatten(2).amax(dim=-1).argmax(dim=-1)
            best = scores[torch.arange(batch_size), chosen].argmax(dim=-1)  # (batch, images)
            images = (torch.arange(batch_size) * num_variants + chosen)[:, None] * num_images_per_prompt
            keep = ((images + torch.arange(num_images_per_prompt)) * num_candidate_images + best).flatten()
            latents, decoded = latents[keep.to(latents.device)], decoded[keep.to(decoded.device)]
        variants = (torch.arange(batch_size) * num_variants + chosen).tolist()
        generation_embeds, refined_embeds = generation_embeds[variants], refined_embeds[variants]
        conditioning_embeds = conditioning_embeds[variants]
        base_indices = [base_indices[v] for v in variants]
        if output_type == "latent":
            image = latents
        else:
            decoded = self.vae_decode(latents) if decoded is None else decoded
            image = self.image_processor.postprocess(decoded, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return image, answers, captions, base_indices
        return InstructAny2PixPipelineOutput(
            images=image,
            answers=answers,
            captions=captions,
            base_image_indices=base_indices,
            generation_embeds=generation_embeds.cpu(),
            base_embeds=[None if e is None else e.cpu() for e in base_rows],
            refined_embeds=refined_embeds.cpu(),
            conditioning_embeds=conditioning_embeds.cpu(),
        )


def _realign_tensors(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copy CPU tensors that loading left at unaligned addresses (views into a memory-mapped safetensors file).

    CPU kernels take different vectorised paths for unaligned data and round differently (~1e-8), which would
    make a reloaded pipeline differ from the saved one; an aligned copy restores bit-identical outputs.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def _independent_copy(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator in the same state, so LLM sampling does not shift the noise drawn later from ``generator``.

    This keeps the decoder noise of a call identical whether or not the LLM ran (``conditioning_embeds=``).
    """
    if generator is None:
        return None
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
