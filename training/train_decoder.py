#!/usr/bin/env python
"""Train the decoder of InstructAny2Pix: the part that renders an image from an ImageBind embedding.

Four modes (shared/DESIGN.md §3):

- ``--mode ip_adapter``: an IP-Adapter reading ImageBind embeddings for a frozen SD 1.x / SDXL UNet. Only the
  adapter trains (image projection + the extra key/value projections); it is saved in diffusers' standard IP-Adapter
  layout as the pipeline's ``ip_adapter`` component. The text prompt is the pipeline's
  ``"best quality, high quality, {caption}"`` and is encoded by the pipeline's own prompt code.
- ``--mode text_unet``: the official decoder's layout — a text-to-image (SD 1.x-style) UNet conditioned on the caption
  through a CLIP text encoder, plus an IP-Adapter reading ImageBind embeddings — with all three trained together:
  from scratch (``--unet_config``, ``--text_encoder_config`` and a tokenizer, ``--pretrained_tokenizer``) or
  fine-tuned from ``--pretrained_model_name_or_path``. Saves ``unet``, ``text_encoder``, ``tokenizer``,
  ``ip_adapter`` and (from scratch) ``scheduler``: together the pipeline's SD-family decoder. Words are separate
  tokens of the caption, so the decoder can compose attributes it never saw together.
- ``--mode imagebind_unet``: an ImageBind-native UNet (``encoder_hid_dim_type="image_proj"``,
  ``addition_embed_type="image"``, conditioned on the embedding alone), from scratch (``--unet_config``) or fine-tuned.
- ``--mode vae``: the autoencoder (reconstruction + KL), from scratch (``--vae_config``) or fine-tuned; train it
  before an ImageBind-native UNet from scratch.

Conditioning embeddings are the images' ImageBind vectors at ``--embedding_norm`` (20, the norm the pipeline
conditions on); a dropped condition is the zero vector, as in the pipeline's unconditional branch. Standard noise
prediction objective of the scheduler's ``prediction_type`` with optional min-SNR weighting (``--snr_gamma``), EMA
(``--use_ema``), and validation edits through the pipeline (``--validation_pipeline``).

Example::

    accelerate launch training/train_decoder.py --mode ip_adapter \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --data_dir data/shapes --output_dir out/ip_adapter --resolution 1024 --max_train_steps 20000 --use_ema
"""

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import BaseOutput
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_any2pix.data import FeatureStore, ImageEmbeddingDataset, image_entries
from diffusers_any2pix.models.ip_adapter import ImageBindIPAdapter
from diffusers_any2pix.pipeline_instruct_any2pix import (
    DECODER_IMAGEBIND,
    DECODER_SD,
    DECODER_SDXL,
    DEFAULT_PROMPT_TEMPLATE,
    decoder_prompt_ids,
    detect_decoder_family,
    encode_decoder_prompt,
)
from diffusers_any2pix import training_utils

MODES = ("ip_adapter", "text_unet", "imagebind_unet", "vae")

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mode", type=str, required=True, choices=MODES)
    model = parser.add_argument_group("models")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A diffusers SD 1.x / SDXL model (or any folder with unet/, vae/, scheduler/, text_encoder/ ... subfolders).",
    )
    model.add_argument("--pretrained_unet", type=str, default=None)
    model.add_argument("--pretrained_vae", type=str, default=None)
    model.add_argument("--pretrained_ip_adapter", type=str, default=None, help="An adapter folder to fine-tune.")
    model.add_argument(
        "--unet_config", type=str, default=None, help="UNet config.json: train a UNet anew (imagebind_unet, text_unet)."
    )
    model.add_argument(
        "--text_encoder_config", type=str, default=None, help="CLIPTextConfig JSON: a new text encoder (text_unet)."
    )
    model.add_argument("--pretrained_text_encoder", type=str, default=None, help="A CLIPTextModel folder (text_unet).")
    model.add_argument(
        "--pretrained_tokenizer", type=str, default=None, help="The decoder's CLIP tokenizer folder (text_unet)."
    )
    model.add_argument(
        "--max_prompt_length",
        type=int,
        default=None,
        help="text_unet: pad decoder prompts to this many tokens instead of the tokenizer's model_max_length (saved\n"
        "with the tokenizer, so the pipeline pads the same way); every training prompt must fit.",
    )
    model.add_argument("--vae_config", type=str, default=None, help="AutoencoderKL config.json: train a VAE anew.")
    training_utils.add_data_args(parser)
    objective = parser.add_argument_group("objective")
    objective.add_argument("--resolution", type=int, default=None, help="Default: the UNet's native image size.")
    objective.add_argument("--embedding_norm", type=float, default=20.0, help="Norm of the conditioning embedding.")
    objective.add_argument(
        "--prompt_template", type=str, default=DEFAULT_PROMPT_TEMPLATE, help="ip_adapter and text_unet modes."
    )
    objective.add_argument("--image_drop_prob", type=float, default=0.05, help="Zero-embedding samples (for CFG).")
    objective.add_argument(
        "--text_drop_prob", type=float, default=0.05, help="Empty-prompt samples (ip_adapter, text_unet)."
    )
    objective.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
    objective.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"])
    objective.add_argument("--kl_weight", type=float, default=1e-6, help="vae mode: weight of the KL term.")
    objective.add_argument(
        "--channel_shuffle_prob",
        type=float,
        default=0.0,
        help="vae mode: share of images whose RGB channels are randomly permuted (colour augmentation: the autoencoder\n"
        "learns shapes apart from their colours, so it also reconstructs shape/colour pairs it never saw).",
    )
    objective.add_argument(
        "--scaling_latents_images",
        type=int,
        default=512,
        help="vae mode: set the VAE's `scaling_factor` to 1/std of the latents of this many training images\n"
        "(unit-variance latents for the diffusion model, the Stable Diffusion recipe); 0 keeps the config's value.",
    )
    objective.add_argument("--use_ema", action="store_true", help="Keep (and save) an EMA of the trained weights.")
    objective.add_argument("--ema_decay", type=float, default=0.9999)
    training_utils.add_common_training_args(parser, learning_rate=1e-4, train_batch_size=8)
    args = training_utils.check_common_args(parser.parse_args(argv))
    for name in ("image_drop_prob", "text_drop_prob", "channel_shuffle_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"`--{name}` must lie in [0, 1], got {getattr(args, name)}.")
    training_utils.resolve_data_paths(args)
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"`--snr_gamma` must be positive, got {args.snr_gamma}.")
    if args.unet_config is not None and args.mode not in ("imagebind_unet", "text_unet"):
        raise ValueError("`--unet_config` (a UNet from scratch) is only for --mode imagebind_unet or text_unet.")
    if args.text_encoder_config is not None and args.mode != "text_unet":
        raise ValueError("`--text_encoder_config` (a text encoder from scratch) is only for --mode text_unet.")
    if args.max_prompt_length is not None and (args.mode != "text_unet" or args.max_prompt_length < 2):
        raise ValueError("`--max_prompt_length` is for --mode text_unet and must be at least 2 (start and end tokens).")
    if args.mode == "text_unet" and (args.unet_config is None) != (args.text_encoder_config is None):
        raise ValueError(
            "--mode text_unet trains the UNet and the text encoder together: give both `--unet_config` and "
            "`--text_encoder_config` (from scratch) or neither (fine-tuning --pretrained_model_name_or_path)."
        )
    if args.mode == "vae" and args.resolution is None:
        raise ValueError("`--mode vae` needs `--resolution` (there is no UNet to take the image size from).")
    if args.vae_config is not None and args.mode != "vae":
        raise ValueError("`--vae_config` (a VAE from scratch) is only for --mode vae.")
    return args


# ------------------------------------------------------------------------------------------------ models


def share_adapter_parameters(unet: UNet2DConditionModel, adapter: ImageBindIPAdapter) -> None:
    """Makes the IP-Adapter modules diffusers attached to ``unet`` (`ImageBindIPAdapter.attach_to`) *be* the
    adapter's modules, so training the adapter trains what the UNet runs and the adapter stays the one source of the
    weights (EMA, saving). Processors are matched to adapter keys 1, 3, 5, … in ``unet.attn_processors`` order, as
    diffusers numbers them."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    projection.image_embeds = adapter.image_proj.proj
    projection.norm = adapter.image_proj.norm
    processors = [
        p for p in unet.attn_processors.values() if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))
    ]
    if len(processors) != len(adapter.ip_adapter):
        raise ValueError(
            f"The unet has {len(processors)} IP-Adapter processors, the adapter {len(adapter.ip_adapter)}."
        )
    for index, processor in enumerate(processors):
        projections = adapter.ip_adapter[str(2 * index + 1)]
        processor.to_k_ip[0] = projections.to_k_ip
        processor.to_v_ip[0] = projections.to_v_ip


class IPAdapterTrainingModel(torch.nn.Module):
    """A frozen text-to-image UNet with a trainable IP-Adapter attached (weights shared with ``adapter``).

    Args:
        unet (`UNet2DConditionModel`): frozen; the adapter is attached to it.
        adapter (`ImageBindIPAdapter`): the trained adapter.
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: ImageBindIPAdapter):
        super().__init__()
        unet.requires_grad_(False)
        self.restore = adapter.attach_to(unet)
        share_adapter_parameters(unet, adapter)
        adapter.requires_grad_(True)
        self.unet = unet
        self.adapter = adapter

    def forward(self, sample, timestep, image_embeds, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
        # One embedding per sample: shape (B, 1, E) keeps them per sample (see DIFFUSERS_NOTES.md).
        added = {**added_cond_kwargs, "image_embeds": [image_embeds[:, None, :]]}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample

    def clean_unet(self) -> UNet2DConditionModel:
        """A copy of the UNet without the adapter (the pipeline attaches its ``ip_adapter`` itself)."""
        unet = copy.deepcopy(self.unet)
        ImageBindIPAdapter.detach_from(unet, self.restore)
        return unet


class TextUNetTrainingModel(IPAdapterTrainingModel):
    """An SD 1.x-style decoder trained whole: UNet, CLIP text encoder (captions in, gradients through it) and the
    IP-Adapter, called as the pipeline calls it (``encode_decoder_prompt``'s last hidden states, embeddings as
    ``(B, 1, E)``)."""

    def __init__(self, unet: UNet2DConditionModel, adapter: ImageBindIPAdapter, text_encoder: CLIPTextModel):
        super().__init__(unet, adapter)
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
        self.text_encoder = text_encoder

    def forward(self, sample, timestep, image_embeds, input_ids) -> torch.Tensor:
        hidden = self.text_encoder(input_ids).last_hidden_state
        return super().forward(sample, timestep, image_embeds, hidden, {})


class ImageBindUNetTrainingModel(torch.nn.Module):
    """An ImageBind-native UNet, called as the pipeline calls it (embedding in ``added_cond_kwargs``, no text)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, image_embeds) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds}
        ).sample


@dataclass
class VAETrainingOutput(BaseOutput):
    """Output of `VAETrainingModel.forward`: ``loss = reconstruction + kl_weight · kl``."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None


class VAETrainingModel(torch.nn.Module):
    """An `AutoencoderKL` whose forward is its training objective (sampled posterior, MSE reconstruction, KL)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, pixel_values: torch.Tensor) -> VAETrainingOutput:
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        reconstruction_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
        kl_loss = posterior.kl().mean() / pixel_values[0].numel()
        return VAETrainingOutput(reconstruction_loss + self.kl_weight * kl_loss, reconstruction_loss, kl_loss)


class PromptEncoder:
    """Frozen decoder text encoders, encoding captions with the pipeline's own `encode_decoder_prompt`."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None):
        self.encoders = (tokenizer, text_encoder, tokenizer_2, text_encoder_2)

    def encode_prompt(self, captions: list[str], device: torch.device):
        return encode_decoder_prompt(captions, device, *self.encoders)


def _load_config_model(cls, config_path: str):
    return cls.from_config(cls.load_config(config_path))


def build_models(args: argparse.Namespace, accelerator, embed_dim: int) -> dict:
    """Loads (or creates) every model of the mode: ``trained`` (the module to train), ``trainable`` (the saved
    component), ``component`` (its pipeline name), ``vae``, ``noise_scheduler`` and, for ip_adapter, ``prompt_encoder``.
    ``embed_dim`` (the features' size) sizes a new IP-Adapter."""
    weight_dtype = training_utils.weight_dtype_for(accelerator)
    if args.mode == "vae":
        vae = (
            _load_config_model(AutoencoderKL, args.vae_config)
            if args.vae_config
            else training_utils.load_component(args, "vae", AutoencoderKL.from_pretrained)
        )
        return {"trained": VAETrainingModel(vae, args.kl_weight), "trainable": vae, "component": "vae", "vae": vae}

    vae = training_utils.load_component(args, "vae", AutoencoderKL.from_pretrained)
    # A VAE whose config asks for float32 (`force_upcast`, set for SDXL's, which overflows in float16) encodes in it.
    vae_dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else weight_dtype
    vae = vae.to(accelerator.device, dtype=vae_dtype)
    vae.requires_grad_(False)
    scheduler_source = training_utils.load_component(args, "scheduler", DDPMScheduler.load_config, required=False)
    noise_scheduler = (
        DDPMScheduler.from_config(scheduler_source)
        if scheduler_source
        else DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    )
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    models = {"vae": vae, "noise_scheduler": noise_scheduler}

    if args.mode == "imagebind_unet":
        unet = (
            _load_config_model(UNet2DConditionModel, args.unet_config)
            if args.unet_config
            else training_utils.load_component(args, "unet", UNet2DConditionModel.from_pretrained)
        )
        if detect_decoder_family(unet) != DECODER_IMAGEBIND:
            raise ValueError(
                "--mode imagebind_unet needs a UNet with encoder_hid_dim_type='image_proj' and "
                f"addition_embed_type='image', got {unet.config.encoder_hid_dim_type!r} / {unet.config.addition_embed_type!r}."
            )
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return {**models, "trained": ImageBindUNetTrainingModel(unet), "trainable": unet, "component": "unet"}

    if args.mode == "text_unet":
        return {**models, **build_text_unet(args, accelerator, embed_dim)}

    unet = training_utils.load_component(args, "unet", UNet2DConditionModel.from_pretrained).to(
        accelerator.device, dtype=weight_dtype
    )
    family = detect_decoder_family(unet)
    if family == DECODER_IMAGEBIND:
        raise ValueError("--mode ip_adapter needs a text-to-image (SD 1.x / SDXL) UNet; this one is ImageBind-native.")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    adapter = training_utils.load_component(args, "ip_adapter", ImageBindIPAdapter.from_pretrained, required=False)
    if adapter is None:
        adapter = ImageBindIPAdapter.from_unet(unet, image_embed_dim=embed_dim)
    adapter = adapter.to(accelerator.device, dtype=torch.float32)
    text = {}
    for suffix, encoder_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        if suffix and family != DECODER_SDXL:
            continue
        encoder = training_utils.load_component(
            args, f"text_encoder{suffix}", encoder_cls.from_pretrained, dtype=weight_dtype
        )
        text[f"text_encoder{suffix}"] = encoder.to(accelerator.device).requires_grad_(False)
        text[f"tokenizer{suffix}"] = training_utils.load_component(
            args, f"tokenizer{suffix}", AutoTokenizer.from_pretrained
        )
    return {
        **models,
        "trained": IPAdapterTrainingModel(unet, adapter),
        "trainable": adapter,
        "component": "ip_adapter",
        "prompt_encoder": PromptEncoder(**text),
    }


def build_text_unet(args: argparse.Namespace, accelerator, embed_dim: int) -> dict:
    """The ``text_unet`` models: UNet, text encoder and a new IP-Adapter (or the source's), trained in float32."""
    if args.unet_config is not None:
        unet = _load_config_model(UNet2DConditionModel, args.unet_config)
        text_encoder = CLIPTextModel(CLIPTextModel.config_class.from_json_file(args.text_encoder_config))
    else:
        unet = training_utils.load_component(args, "unet", UNet2DConditionModel.from_pretrained)
        text_encoder = training_utils.load_component(args, "text_encoder", CLIPTextModel.from_pretrained)
    if detect_decoder_family(unet) != DECODER_SD:
        raise ValueError(
            "--mode text_unet needs an SD 1.x-style UNet (cross-attention on text, no addition embedding), got "
            f"addition_embed_type={unet.config.addition_embed_type!r}, "
            f"encoder_hid_dim_type={unet.config.encoder_hid_dim_type!r}."
        )
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"text_encoder.config.hidden_size ({text_encoder.config.hidden_size}) must equal "
            f"unet.config.cross_attention_dim ({unet.config.cross_attention_dim})."
        )
    tokenizer = training_utils.load_component(args, "tokenizer", AutoTokenizer.from_pretrained)
    if args.max_prompt_length is not None:
        tokenizer.model_max_length = args.max_prompt_length
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but text_encoder.config.vocab_size is "
            f"{text_encoder.config.vocab_size}."
        )
    if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
        raise ValueError(
            f"The tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder has "
            f"{text_encoder.config.max_position_embeddings} positions."
        )
    adapter = training_utils.load_component(args, "ip_adapter", ImageBindIPAdapter.from_pretrained, required=False)
    if adapter is None:
        adapter = ImageBindIPAdapter.from_unet(unet, image_embed_dim=embed_dim)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = TextUNetTrainingModel(unet.to(accelerator.device), adapter.to(accelerator.device), text_encoder)
    return {"trained": trained.to(accelerator.device), "trainable": unet, "component": "unet", "tokenizer": tokenizer}


def check_prompt_lengths(tokenizer, template: str, captions: list[str]) -> None:
    """Raises a `ValueError` naming the longest prompt when it does not fit ``tokenizer.model_max_length`` tokens
    (it would be cut silently, and the decoder would learn from a partial caption)."""
    longest = max(captions, key=lambda c: len(tokenizer(template.format(caption=c)).input_ids))
    length = len(tokenizer(template.format(caption=longest)).input_ids)
    if length > tokenizer.model_max_length:
        raise ValueError(
            f"The decoder prompt {template.format(caption=longest)!r} is {length} tokens, more than the "
            f"{tokenizer.model_max_length} the tokenizer pads to: raise --max_prompt_length."
        )


# ------------------------------------------------------------------------------------------------ objective


def shuffle_channels(pixel_values: torch.Tensor, probability: float) -> torch.Tensor:
    """A copy of ``pixel_values`` (``(B, C, H, W)``) where each image, with ``probability``, has its channels in a
    random order (drawn from the global torch RNG, which the training loop seeds per step)."""
    shuffled = pixel_values.clone()
    chosen = torch.rand(pixel_values.shape[0]) < probability
    for i in torch.nonzero(chosen).flatten().tolist():
        shuffled[i] = pixel_values[i, torch.randperm(pixel_values.shape[1])]
    return shuffled


def _drop(values: torch.Tensor, probability: float) -> torch.Tensor:
    """Boolean mask of the samples whose condition is dropped."""
    return torch.rand(values.shape[0], device=values.device) < probability


def diffusion_loss(
    args, models: dict, trained: torch.nn.Module, batch: dict, accelerator
) -> tuple[torch.Tensor, dict]:
    """The noise-prediction loss of one batch (min-SNR weighted with ``--snr_gamma``)."""
    vae, noise_scheduler = models["vae"], models["noise_scheduler"]
    weight_dtype = vae.dtype
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).float()
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)

    image_embeds = batch["image_embeds"]
    image_embeds = torch.where(_drop(image_embeds, args.image_drop_prob)[:, None], 0.0, image_embeds)
    conditioning = {}
    if "prompt_encoder" in models or "tokenizer" in models:
        captions = [args.prompt_template.format(caption=c) for c in batch["caption"]]
        dropped = _drop(image_embeds, args.text_drop_prob).tolist()
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
    if "tokenizer" in models:  # text_unet: the text encoder trains, so it runs inside the trained module
        conditioning["input_ids"] = decoder_prompt_ids(captions, models["tokenizer"]).to(latents.device)
    elif "prompt_encoder" in models:
        with torch.no_grad():
            encoder_hidden_states, pooled = models["prompt_encoder"].encode_prompt(captions, accelerator.device)
        added = {}
        if pooled is not None:  # SDXL: pooled text and the size/crop ids the pipeline passes
            size = batch["pixel_values"].shape[-1]
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=latents.device).repeat(len(captions), 1)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        conditioning = {"encoder_hidden_states": encoder_hidden_states, "added_cond_kwargs": added}
    prediction = trained(noisy_latents, timesteps, image_embeds, **conditioning)

    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, args.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        loss = loss * (weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1))
    return loss.mean(), {}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, dataset, num_images: int, batch_size: int = 64) -> float:
    """``1 / std`` of the posterior means of the first ``num_images`` images of ``dataset`` (deterministic)."""
    latents = []
    for start in range(0, min(num_images, len(dataset)), batch_size):
        indices = range(start, min(start + batch_size, num_images, len(dataset)))
        pixels = torch.stack([dataset[i]["pixel_values"] for i in indices]).to(vae.device, vae.dtype)
        latents.append(vae.encode(pixels).latent_dist.mean.float())
    std = torch.cat(latents).std().item()
    if not std > 0:
        raise ValueError(f"The VAE's latents have standard deviation {std}; cannot set `scaling_factor`.")
    return 1.0 / std


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Runs the training; returns the training summary (see `write_training_summary`)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    accelerator = training_utils.make_accelerator(args)
    features = FeatureStore.from_file(args.media_map, args.data_dir)
    entries = image_entries(features)
    if not entries:
        raise ValueError(f"The media map {args.media_map} has no image entries.")
    models = build_models(args, accelerator, features.load(entries[0].caption_key, args.media_map).numel())
    trainable, name = models["trainable"], models["component"]
    params = [p for p in models["trained"].parameters() if p.requires_grad]
    resolution = args.resolution
    if resolution is None:  # the UNet's native image size
        unet, vae = models["trained"].unet, models["vae"]
        resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    # Every feature file is checked against the size the trained model reads.
    if args.mode == "text_unet":
        features.embed_dim = models["trained"].adapter.config.image_embed_dim
    else:
        expected_dim = {"ip_adapter": "image_embed_dim", "unet": "encoder_hid_dim"}.get(name)
        features.embed_dim = None if expected_dim is None else getattr(trainable.config, expected_dim)
    dataset = ImageEmbeddingDataset(entries, features, resolution, args.embedding_norm)
    if "tokenizer" in models:
        check_prompt_lengths(models["tokenizer"], args.prompt_template, [entry.caption_key for entry in entries])

    ema = None
    if args.use_ema:
        ema = EMAModel(params, decay=args.ema_decay, model_cls=type(trainable), model_config=trainable.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    setup = training_utils.prepare_training(
        accelerator, args, models["trained"], params, dataset, tracker_name="train_decoder"
    )

    def compute_loss(batch):
        if name == "vae":
            pixel_values = batch["pixel_values"]
            if args.channel_shuffle_prob > 0:
                pixel_values = shuffle_channels(pixel_values, args.channel_shuffle_prob)
            output = setup.model(pixel_values)
            return output.loss, {
                "reconstruction_loss": output.reconstruction_loss.item(),
                "kl_loss": output.kl_loss.item(),
            }
        return diffusion_loss(args, models, setup.model, batch, accelerator)

    def components() -> dict:
        saved = {name: trainable}
        if args.mode == "text_unet":
            trained = accelerator.unwrap_model(setup.model)
            saved = {
                "unet": trained.clean_unet(),
                "text_encoder": trained.text_encoder,
                "tokenizer": models["tokenizer"],
                "ip_adapter": trained.adapter,
            }
        if name == "unet" and args.unet_config is not None:
            # A UNet trained anew ships with an inference scheduler of its training noise schedule (DDIM, no
            # clipping: latents are not bounded to [-1, 1]).
            saved["scheduler"] = DDIMScheduler.from_config(
                models["noise_scheduler"].config, clip_sample=False, set_alpha_to_one=False
            )
        return saved

    validate = training_utils.validate_every(accelerator, args, components)

    def on_step_end(step: int) -> None:
        if ema is not None:
            ema.step(params)
            # Validation renders with the EMA weights, then training continues with the raw ones.
            if args.validation_steps and step % args.validation_steps == 0:
                ema.store(params)
                ema.copy_to(params)
                validate(step)
                ema.restore(params)
            return
        validate(step)

    result = training_utils.run_training_loop(accelerator, args, setup, compute_loss, on_step_end)
    if ema is not None:
        ema.copy_to(params)
    if name == "vae" and args.scaling_latents_images > 0:
        trainable.eval()
        trainable.register_to_config(
            scaling_factor=latent_scaling_factor(trainable, dataset, args.scaling_latents_images)
        )
        logger.info(f"VAE scaling_factor set to {trainable.config.scaling_factor:.5f} (1 / latent std).")
    training_utils.save_trained_components(args, accelerator, **components())
    return training_utils.finish_training(accelerator, args, result, {name: setup.model}, components)


if __name__ == "__main__":
    main()
    sys.exit(0)
