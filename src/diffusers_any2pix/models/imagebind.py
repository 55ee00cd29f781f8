"""ImageBind (vision incl. video, text, audio) as a diffusers model.

An independent, config-driven implementation of Meta's ImageBind encoders that is weight-compatible with
Meta's released ``imagebind_huge.pth`` (see :meth:`ImageBindModel.from_meta_checkpoint`) and numerically
equal to Meta's reference code (checked by ``tests/test_imagebind_model.py``). Only the vision, text and audio
modalities are ported; the depth, thermal and IMU weights of Meta's checkpoint are dropped when converting.

Inference helpers do not disable autograd themselves: callers wrap them in ``torch.no_grad()`` (the pipeline
does), so that the same methods can also be used for training.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook

logger = logging.get_logger(__name__)

# Meta's trunk, head and pre-trunk LayerNorms use eps=1e-6; its audio patch-embedding LayerNorm is built with
# torch's default eps. The checkpoint was trained with these values, so they are constants, not settings.
_LAYER_NORM_EPS = 1e-6
_AUDIO_PATCH_NORM_EPS = 1e-5

_MAX_KEYS_IN_ERROR = 20


@dataclass
class ImageBindOutput(BaseOutput):
    """
    Output of [`ImageBindModel.forward`]. Each field is `None` unless the matching input was given.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch_size, out_embed_dim)`, *optional*):
            L2-normalised image embeddings.
        text_embeds (`torch.Tensor` of shape `(batch_size, out_embed_dim)`, *optional*):
            L2-normalised text embeddings multiplied by the learned logit scale.
        audio_embeds (`torch.Tensor` of shape `(batch_size, out_embed_dim)`, *optional*):
            Mean over clips of the L2-normalised audio embeddings multiplied by the fixed audio logit scale.
        video_embeds (`torch.Tensor` of shape `(batch_size, out_embed_dim)`, *optional*):
            Mean over clips of the L2-normalised video embeddings.
    """

    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None


def _drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability `drop_prob`, rescale the kept ones.

    The mask is drawn per sample. (Meta's trunk runs sequence-first, so its timm `DropPath` drew the mask per
    token position instead; only training is affected, inference is identical.)
    """
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    mask = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
    return hidden_states * mask / keep_prob


class ImageBindMLP(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Linear.

    Args:
        embed_dim (`int`): Width of the residual stream.
        hidden_dim (`int`): Width of the hidden layer.
    """

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class ImageBindEncoderLayer(nn.Module):
    """Pre-norm transformer block (LayerNorm -> self-attention, LayerNorm -> MLP, both residual).

    Args:
        embed_dim (`int`): Width of the residual stream.
        num_heads (`int`): Number of attention heads.
        mlp_ratio (`int`): Hidden width of the MLP as a multiple of `embed_dim`.
        add_bias_kv (`bool`): Append a learned key/value token to the attention (Meta's audio trunk does).
        drop_path (`float`): Stochastic-depth probability of this block (training only).
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: int, add_bias_kv: bool, drop_path: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True
        )
        self.layer_norm2 = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.mlp = ImageBindMLP(embed_dim, embed_dim * mlp_ratio)
        self.drop_path = drop_path

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.layer_norm1(hidden_states)
        attn_output = self.self_attn(normed, normed, normed, attn_mask=attention_mask, need_weights=False)[0]
        hidden_states = hidden_states + _drop_path(attn_output, self.drop_path, self.training)
        mlp_output = self.mlp(self.layer_norm2(hidden_states))
        return hidden_states + _drop_path(mlp_output, self.drop_path, self.training)


class ImageBindEncoder(nn.Module):
    """A modality trunk: optional LayerNorm, then a stack of [`ImageBindEncoderLayer`].

    Args:
        embed_dim (`int`): Width of the residual stream.
        num_layers (`int`): Number of blocks.
        num_heads (`int`): Number of attention heads.
        mlp_ratio (`int`): Hidden width of the MLPs as a multiple of `embed_dim`.
        drop_path (`float`): Stochastic-depth probability of the last block; it grows linearly from 0 at the
            first block.
        add_bias_kv (`bool`): Whether the attention layers have a learned extra key/value.
        pre_layernorm (`bool`): Whether a LayerNorm is applied before the first block.
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: int,
        drop_path: float,
        add_bias_kv: bool,
        pre_layernorm: bool,
    ):
        super().__init__()
        self.pre_layernorm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS) if pre_layernorm else None
        # Plain Python instead of torch.linspace so the model can be built on the meta device.
        rates = [drop_path * i / (num_layers - 1) if num_layers > 1 else 0.0 for i in range(num_layers)]
        self.layers = nn.ModuleList(
            [ImageBindEncoderLayer(embed_dim, num_heads, mlp_ratio, add_bias_kv, rate) for rate in rates]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states, attention_mask)
            else:
                hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class ImageBindPatchEmbeddings(nn.Module):
    """Patchify with a bias-free convolution, optionally LayerNorm, prepend a CLS token, add positions.

    Args:
        patch_embedding (`nn.Conv2d` or `nn.Conv3d`): The patchifying convolution (kernel = stride = patch).
        embed_dim (`int`): Token width (the convolution's output channels).
        num_patches (`int`): Number of patches the convolution produces for the configured input size.
        patch_norm_eps (`float`, *optional*): If given, a LayerNorm with this eps is applied to the patches.
    """

    def __init__(self, patch_embedding: nn.Module, embed_dim: int, num_patches: int, patch_norm_eps: float | None):
        super().__init__()
        self.patch_embedding = patch_embedding
        self.patch_norm = nn.LayerNorm(embed_dim, eps=patch_norm_eps) if patch_norm_eps is not None else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(inputs).flatten(2).transpose(1, 2)
        if self.patch_norm is not None:
            patches = self.patch_norm(patches)
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls_tokens, patches], dim=1) + self.position_embedding


class ImageBindTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute positions (no CLS token).

    Args:
        vocab_size (`int`): Number of token ids.
        context_length (`int`): Sequence length every input must have.
        embed_dim (`int`): Token width.
    """

    def __init__(self, vocab_size: int, context_length: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, context_length, embed_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding


class ImageBindHead(nn.Module):
    """LayerNorm and bias-free projection into the joint embedding space, applied to the pooled token.

    Args:
        embed_dim (`int`): Width of the trunk.
        out_embed_dim (`int`): Width of the joint embedding space.
    """

    def __init__(self, embed_dim: int, out_embed_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.projection = nn.Linear(embed_dim, out_embed_dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(pooled))


def _conv_output_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class ImageBindModel(ModelMixin, ConfigMixin):
    r"""
    ImageBind's vision (images and video), text and audio encoders, mapping each modality into one joint
    embedding space. Defaults are Meta's `imagebind_huge`; every size is configurable (tiny configs for tests).

    Load Meta's weights with [`~ImageBindModel.from_meta_checkpoint`]; save and load our own format with
    `save_pretrained` / `from_pretrained`. Callers run inference under `torch.no_grad()`.

    Args:
        out_embed_dim (`int`, defaults to 1024): Width of the joint embedding space.
        vision_embed_dim (`int`, defaults to 1280): Width of the vision trunk.
        vision_num_blocks (`int`, defaults to 32): Number of vision transformer blocks.
        vision_num_heads (`int`, defaults to 16): Attention heads in the vision trunk.
        vision_image_size (`int`, defaults to 224): Height and width of the (square) input images and frames.
        vision_patch_size (`int`, defaults to 14): Spatial patch size of the vision stem.
        vision_num_frames (`int`, defaults to 2): Frames per video clip; images are repeated to this many frames.
        vision_temporal_patch_size (`int`, defaults to 2): Temporal kernel of the Conv3d vision stem.
        vision_drop_path (`float`, defaults to 0.0): Stochastic-depth rate of the last vision block.
        text_embed_dim (`int`, defaults to 1024): Width of the text trunk.
        text_num_blocks (`int`, defaults to 24): Number of text transformer blocks.
        text_num_heads (`int`, defaults to 16): Attention heads in the text trunk.
        text_context_length (`int`, defaults to 77): Length of every tokenised text input.
        text_vocab_size (`int`, defaults to 49408): Vocabulary size of the token embedding.
        text_drop_path (`float`, defaults to 0.0): Stochastic-depth rate of the last text block.
        text_logit_scale_init (`float`, defaults to `1 / 0.07`): Initial value of the learnable text logit scale.
        audio_embed_dim (`int`, defaults to 768): Width of the audio trunk.
        audio_num_blocks (`int`, defaults to 12): Number of audio transformer blocks.
        audio_num_heads (`int`, defaults to 12): Attention heads in the audio trunk.
        audio_num_mel_bins (`int`, defaults to 128): Mel bins of the input filter banks.
        audio_target_length (`int`, defaults to 204): Time frames of the input filter banks.
        audio_kernel_size (`int`, defaults to 16): Kernel of the Conv2d audio stem.
        audio_stride (`int`, defaults to 10): Stride of the Conv2d audio stem (patches overlap).
        audio_drop_path (`float`, defaults to 0.1): Stochastic-depth rate of the last audio block.
        audio_logit_scale (`float`, defaults to 20.0): Fixed scale applied to the normalised audio embeddings.
        logit_scale_max (`float`, defaults to 100.0): Upper clamp of the text and audio logit scales.
        mlp_ratio (`int`, defaults to 4): MLP hidden width as a multiple of the trunk width (all modalities).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ImageBindEncoderLayer"]

    @register_to_config
    def __init__(
        self,
        out_embed_dim: int = 1024,
        vision_embed_dim: int = 1280,
        vision_num_blocks: int = 32,
        vision_num_heads: int = 16,
        vision_image_size: int = 224,
        vision_patch_size: int = 14,
        vision_num_frames: int = 2,
        vision_temporal_patch_size: int = 2,
        vision_drop_path: float = 0.0,
        text_embed_dim: int = 1024,
        text_num_blocks: int = 24,
        text_num_heads: int = 16,
        text_context_length: int = 77,
        text_vocab_size: int = 49408,
        text_drop_path: float = 0.0,
        text_logit_scale_init: float = 1 / 0.07,
        audio_embed_dim: int = 768,
        audio_num_blocks: int = 12,
        audio_num_heads: int = 12,
        audio_num_mel_bins: int = 128,
        audio_target_length: int = 204,
        audio_kernel_size: int = 16,
        audio_stride: int = 10,
        audio_drop_path: float = 0.1,
        audio_logit_scale: float = 20.0,
        logit_scale_max: float = 100.0,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        for modality, embed_dim, num_heads in (
            ("vision", vision_embed_dim, vision_num_heads),
            ("text", text_embed_dim, text_num_heads),
            ("audio", audio_embed_dim, audio_num_heads),
        ):
            if embed_dim % num_heads != 0:
                raise ValueError(
                    f"`{modality}_embed_dim` ({embed_dim}) must be divisible by `{modality}_num_heads` ({num_heads})."
                )
        if vision_image_size % vision_patch_size != 0:
            raise ValueError(
                f"`vision_image_size` ({vision_image_size}) must be divisible by `vision_patch_size` "
                f"({vision_patch_size})."
            )
        if vision_num_frames % vision_temporal_patch_size != 0:
            raise ValueError(
                f"`vision_num_frames` ({vision_num_frames}) must be divisible by `vision_temporal_patch_size` "
                f"({vision_temporal_patch_size})."
            )
        if min(audio_num_mel_bins, audio_target_length) < audio_kernel_size:
            raise ValueError(
                f"`audio_num_mel_bins` ({audio_num_mel_bins}) and `audio_target_length` ({audio_target_length}) "
                f"must be at least `audio_kernel_size` ({audio_kernel_size})."
            )

        vision_grid = vision_image_size // vision_patch_size
        vision_num_patches = (vision_num_frames // vision_temporal_patch_size) * vision_grid**2
        vision_kernel = (vision_temporal_patch_size, vision_patch_size, vision_patch_size)
        self.vision_embeddings = ImageBindPatchEmbeddings(
            nn.Conv3d(3, vision_embed_dim, kernel_size=vision_kernel, stride=vision_kernel, bias=False),
            vision_embed_dim,
            vision_num_patches,
            patch_norm_eps=None,
        )
        self.vision_encoder = ImageBindEncoder(
            vision_embed_dim,
            vision_num_blocks,
            vision_num_heads,
            mlp_ratio,
            vision_drop_path,
            add_bias_kv=False,
            pre_layernorm=True,
        )
        self.vision_head = ImageBindHead(vision_embed_dim, out_embed_dim)

        self.text_embeddings = ImageBindTextEmbeddings(text_vocab_size, text_context_length, text_embed_dim)
        self.text_encoder = ImageBindEncoder(
            text_embed_dim,
            text_num_blocks,
            text_num_heads,
            mlp_ratio,
            text_drop_path,
            add_bias_kv=False,
            pre_layernorm=False,
        )
        self.text_head = ImageBindHead(text_embed_dim, out_embed_dim)
        self.text_log_logit_scale = nn.Parameter(torch.tensor(math.log(text_logit_scale_init)))

        audio_num_patches = _conv_output_size(audio_num_mel_bins, audio_kernel_size, audio_stride) * (
            _conv_output_size(audio_target_length, audio_kernel_size, audio_stride)
        )
        self.audio_embeddings = ImageBindPatchEmbeddings(
            nn.Conv2d(1, audio_embed_dim, kernel_size=audio_kernel_size, stride=audio_stride, bias=False),
            audio_embed_dim,
            audio_num_patches,
            patch_norm_eps=_AUDIO_PATCH_NORM_EPS,
        )
        self.audio_encoder = ImageBindEncoder(
            audio_embed_dim,
            audio_num_blocks,
            audio_num_heads,
            mlp_ratio,
            audio_drop_path,
            add_bias_kv=True,
            pre_layernorm=False,
        )
        self.audio_head = ImageBindHead(audio_embed_dim, out_embed_dim)
        # A (persistent) buffer like Meta's, so a checkpoint carries the fixed scale it was trained with.
        self.register_buffer("audio_log_logit_scale", torch.tensor(math.log(audio_logit_scale)))

        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """CLIP-style initialisation (as in Meta's code) for training from scratch; loading overwrites it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ImageBindPatchEmbeddings):
                scale = module.cls_token.shape[-1] ** -0.5
                nn.init.normal_(module.cls_token, std=scale)
                nn.init.normal_(module.position_embedding, std=scale)
            elif isinstance(module, ImageBindTextEmbeddings):
                nn.init.normal_(module.token_embedding.weight, std=0.02)
                nn.init.normal_(module.position_embedding, std=0.01)

    # ------------------------------------------------------------------ input checks

    def _check_float_input(self, name: str, value: torch.Tensor, ndims: tuple[int, ...], layout: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(value).__name__}.")
        if value.ndim not in ndims:
            raise ValueError(f"`{name}` must have shape {layout}, got a {value.ndim}-D tensor {tuple(value.shape)}.")
        if not value.is_floating_point():
            raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}.")
        if value.numel() == 0:
            raise ValueError(f"`{name}` must not be empty, got shape {tuple(value.shape)}.")

    def _check_vision_frames(self, name: str, value: torch.Tensor, layout: str) -> None:
        """Checks the trailing (3, H, W) dimensions of images or (3, T, H, W) of video clips."""
        size = self.config.vision_image_size
        channels = value.shape[-4] if value.ndim >= 5 else value.shape[-3]
        if channels != 3:
            raise ValueError(f"`{name}` must have shape {layout} with 3 (RGB) channels, got {tuple(value.shape)}.")
        if value.ndim >= 5 and value.shape[-3] not in (1, self.config.vision_num_frames):
            raise ValueError(
                f"`{name}` must have shape {layout} with T = {self.config.vision_num_frames} frames per clip "
                f"(or 1, repeated), got {tuple(value.shape)}."
            )
        if tuple(value.shape[-2:]) != (size, size):
            raise ValueError(
                f"`{name}` must have shape {layout} with H = W = {size} (the configured `vision_image_size`), "
                f"got {tuple(value.shape)}."
            )

    # ------------------------------------------------------------------ modality encoders

    def _postprocess(self, embeds: torch.Tensor, log_logit_scale: torch.Tensor | None) -> torch.Tensor:
        embeds = F.normalize(embeds, dim=-1)
        if log_logit_scale is not None:
            embeds = log_logit_scale.exp().clamp(max=self.config.logit_scale_max) * embeds
        return embeds

    def _vision_hidden_states(self, frames: torch.Tensor) -> torch.Tensor:
        """The vision trunk's output (CLS first) for validated clips of shape (N, 3, T, H, W), T == 1 or
        `vision_num_frames`."""
        frames = frames.to(device=self.device, dtype=self.dtype)
        if frames.shape[2] == 1:
            # Meta repeats a single frame in time to feed the Conv3d stem.
            frames = frames.expand(-1, -1, self.config.vision_num_frames, -1, -1)
        return self.vision_encoder(self.vision_embeddings(frames))

    def _encode_clips(self, frames: torch.Tensor) -> torch.Tensor:
        """Encodes validated clips of shape (N, 3, T, H, W), T == 1 or `vision_num_frames`."""
        return self._postprocess(self.vision_head(self._vision_hidden_states(frames)[:, 0]), None)

    # apply_forward_hook: model CPU offload moves the model on these entry points too, not only on forward.
    @apply_forward_hook
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Embeds images (already preprocessed: resized, centre-cropped, CLIP-normalised).

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, vision_image_size, vision_image_size)`):
                Float images.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_embed_dim)`: L2-normalised image embeddings.
        """
        size = self.config.vision_image_size
        layout = f"(batch_size, 3, {size}, {size})"
        self._check_float_input("pixel_values", pixel_values, (4,), layout)
        self._check_vision_frames("pixel_values", pixel_values, layout)
        return self._encode_clips(pixel_values.unsqueeze(2))

    @apply_forward_hook
    def encode_image_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Embeds images and returns the vision trunk's final patch tokens too, from one pass.

        The patch tokens keep where things are in the picture, which the pooled embedding mixes; a multimodal LLM can
        read a scene object by object from them (through `MultimodalAdapter`'s patch resampler, as IP-Adapter Plus
        reads CLIP's patch tokens). Not part of Meta's or InstructAny2Pix's recipe.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, vision_image_size, vision_image_size)`):
                Float images, preprocessed as for `encode_image`.

        Returns:
            `tuple`: `image_embeds` of shape `(batch_size, out_embed_dim)`, exactly
            [`~ImageBindModel.encode_image`]'s, and `patch_tokens` of shape `(batch_size, num_patches,
            vision_embed_dim)`: the trunk's output without the CLS token, patches in row-major order.
        """
        size = self.config.vision_image_size
        layout = f"(batch_size, 3, {size}, {size})"
        self._check_float_input("pixel_values", pixel_values, (4,), layout)
        self._check_vision_frames("pixel_values", pixel_values, layout)
        hidden_states = self._vision_hidden_states(pixel_values.unsqueeze(2))
        return self._postprocess(self.vision_head(hidden_states[:, 0]), None), hidden_states[:, 1:]

    @apply_forward_hook
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """
        Embeds videos given as clips of frames. With several clips per video, the per-clip normalised
        embeddings are averaged (as Meta does), so the result is not unit-norm.

        Args:
            frames (`torch.Tensor` of shape `(batch_size, 3, T, H, W)` or `(batch_size, num_clips, 3, T, H, W)`):
                Float frames with `T = vision_num_frames` (a single frame, `T = 1`, is repeated) and
                `H = W = vision_image_size`.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_embed_dim)`: video embeddings.
        """
        return self._encode_video(frames, "frames")

    def _encode_video(self, frames: torch.Tensor, name: str) -> torch.Tensor:
        layout = "(batch_size, 3, T, H, W) or (batch_size, num_clips, 3, T, H, W)"
        self._check_float_input(name, frames, (5, 6), layout)
        self._check_vision_frames(name, frames, layout)
        if frames.ndim == 5:
            return self._encode_clips(frames)
        batch_size, num_clips = frames.shape[:2]
        embeds = self._encode_clips(frames.flatten(0, 1))
        return embeds.reshape(batch_size, num_clips, -1).mean(dim=1)

    @apply_forward_hook
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """
        Embeds tokenised text (CLIP BPE ids padded with 0 to `text_context_length`; the end-of-text token must
        be the largest id of each row, as with CLIP's tokenizer, because its position is found with `argmax`).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_context_length)`): Token ids.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_embed_dim)`: L2-normalised text embeddings times the
            learned logit scale.
        """
        length = self.config.text_context_length
        layout = f"(batch_size, {length})"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"`input_ids` must be a torch.Tensor of shape {layout}, got {type(input_ids).__name__}.")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"`input_ids` must be an integer tensor, got dtype {input_ids.dtype}.")
        if input_ids.ndim != 2 or input_ids.shape[1] != length or input_ids.shape[0] == 0:
            raise ValueError(f"`input_ids` must have shape {layout}, got {tuple(input_ids.shape)}.")
        vocab_size = self.config.text_vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab_size:
            raise ValueError(
                f"`input_ids` must lie in [0, {vocab_size}) (`text_vocab_size`), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]."
            )
        input_ids = input_ids.to(self.device)
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)
        hidden_states = self.text_encoder(self.text_embeddings(input_ids), causal_mask)
        eot_positions = input_ids.argmax(dim=-1)
        pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), eot_positions]
        return self._postprocess(self.text_head(pooled), self.text_log_logit_scale)

    @apply_forward_hook
    def encode_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """
        Embeds audio given as normalised log-mel filter banks of one or several clips; the per-clip embeddings
        are averaged (as Meta does).

        Args:
            audio_features (`torch.Tensor` of shape `(batch_size, num_clips, 1, mel_bins, target_length)`):
                Float filter banks with `mel_bins = audio_num_mel_bins` and `target_length = audio_target_length`.
                A 4-D `(batch_size, 1, mel_bins, target_length)` tensor is a single clip.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_embed_dim)`: audio embeddings (normalised per clip, times
            the fixed audio logit scale, averaged over clips).
        """
        mel, frames = self.config.audio_num_mel_bins, self.config.audio_target_length
        layout = f"(batch_size, num_clips, 1, {mel}, {frames})"
        self._check_float_input("audio_features", audio_features, (4, 5), layout)
        if tuple(audio_features.shape[-3:]) != (1, mel, frames):
            raise ValueError(
                f"`audio_features` must have shape {layout} (1 channel, `audio_num_mel_bins` x "
                f"`audio_target_length`), got {tuple(audio_features.shape)}."
            )
        clips = audio_features.flatten(0, 1) if audio_features.ndim == 5 else audio_features
        clips = clips.to(device=self.device, dtype=self.dtype)
        hidden_states = self.audio_encoder(self.audio_embeddings(clips))
        embeds = self._postprocess(self.audio_head(hidden_states[:, 0]), self.audio_log_logit_scale)
        if audio_features.ndim == 4:
            return embeds
        return embeds.reshape(audio_features.shape[0], audio_features.shape[1], -1).mean(dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ImageBindOutput | tuple:
        """
        Embeds any combination of images, text, audio and video (at least one).

        Args:
            pixel_values (`torch.Tensor`, *optional*): Images, see [`~ImageBindModel.encode_image`].
            input_ids (`torch.LongTensor`, *optional*): Token ids, see [`~ImageBindModel.encode_text`].
            audio_features (`torch.Tensor`, *optional*): Filter banks, see [`~ImageBindModel.encode_audio`].
            video_frames (`torch.Tensor`, *optional*): Video clips (`frames` of [`~ImageBindModel.encode_video`]).
            return_dict (`bool`, defaults to `True`): Return an [`ImageBindOutput`] instead of a tuple.

        Returns:
            [`ImageBindOutput`] or `tuple`: with `return_dict=False`, the tuple
            `(image_embeds, text_embeds, audio_embeds, video_embeds)` with `None` for missing inputs.
        """
        if pixel_values is None and input_ids is None and audio_features is None and video_frames is None:
            raise ValueError("Pass at least one of `pixel_values`, `input_ids`, `audio_features` or `video_frames`.")
        output = ImageBindOutput(
            image_embeds=None if pixel_values is None else self.encode_image(pixel_values),
            text_embeds=None if input_ids is None else self.encode_text(input_ids),
            audio_embeds=None if audio_features is None else self.encode_audio(audio_features),
            video_embeds=None if video_frames is None else self._encode_video(video_frames, "video_frames"),
        )
        if not return_dict:
            return (output.image_embeds, output.text_embeds, output.audio_embeds, output.video_embeds)
        return output

    # ------------------------------------------------------------------ Meta checkpoint

    @classmethod
    def from_meta_checkpoint(
        cls, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], **config_overrides
    ) -> ImageBindModel:
        """
        Builds a model from Meta's ImageBind checkpoint (e.g. `imagebind_huge.pth`) or its state dict.

        The config is this class's defaults (= `imagebind_huge`) updated with `config_overrides`; nothing is
        inferred from the checkpoint. Loading is strict: missing, unexpected or wrongly shaped weights raise.

        Args:
            path_or_state_dict (`str`, `os.PathLike` or mapping of names to tensors):
                Path to Meta's `.pth` file (loaded on CPU with `weights_only=True`) or its state dict (not
                modified; tensors are copied).
            **config_overrides: Config values that differ from the defaults (see [`ImageBindModel`]).

        Returns:
            [`ImageBindModel`]: in eval mode, float32 (cast with `.to(dtype)` if needed).

        Raises:
            `ValueError`: if keys are missing or unexpected, or shapes disagree with the config.
        """
        if isinstance(path_or_state_dict, (str, os.PathLike)):
            meta_state_dict = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        else:
            meta_state_dict = path_or_state_dict
        state_dict, _ = convert_meta_imagebind_state_dict(meta_state_dict)

        # Building on the meta device skips the random initialisation of (for imagebind_huge) 1.07B parameters;
        # every tensor is then filled from the checkpoint, which the checks below guarantee.
        with torch.device("meta"):
            model = cls(**config_overrides)
        expected = {name: tensor.shape for name, tensor in model.state_dict().items()}

        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = [
            f"{_meta_key(name)} ({name}): checkpoint {tuple(state_dict[name].shape)}, model {tuple(shape)}"
            for name, shape in expected.items()
            if name in state_dict and state_dict[name].shape != shape
        ]
        problems = []
        if missing:
            problems.append("missing keys: " + _format_keys([f"{_meta_key(k)} ({k})" for k in missing]))
        if unexpected:
            problems.append("unexpected keys: " + _format_keys([f"{_meta_key(k)} ({k})" for k in unexpected]))
        if mismatched:
            problems.append("shape mismatches: " + _format_keys(mismatched))
        if problems:
            raise ValueError(
                "Meta ImageBind checkpoint does not match the model config (pass the checkpoint's sizes as "
                "config overrides); " + "; ".join(problems)
            )

        model.to_empty(device="cpu")
        model.load_state_dict(state_dict, strict=True)
        return model.eval()


# ---------------------------------------------------------------------- Meta key mapping

# Meta's checkpoint holds six modalities; these three are not ported.
_UNPORTED_MODALITIES = ("depth", "thermal", "imu")
_UNPORTED_PATTERN = re.compile(
    r"^modality_(?:preprocessors|trunks|heads|postprocessors)\.(?:" + "|".join(_UNPORTED_MODALITIES) + r")\."
)
_META_TEXT_MASK_KEY = "modality_preprocessors.text.mask"

_PLACEHOLDERS = {
    "m": "vision|text|audio",
    "hm": "vision|audio",
    "i": r"\d+",
    "p": "weight|bias",
    "a": r"in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias|bias_k|bias_v",
    "fc": "fc1|fc2",
}

# (Meta key template, our key template); placeholders are filled from `_PLACEHOLDERS`.
_KEY_TEMPLATES = [
    ("modality_preprocessors.vision.rgbt_stem.proj.1.weight", "vision_embeddings.patch_embedding.weight"),
    ("modality_preprocessors.audio.rgbt_stem.proj.weight", "audio_embeddings.patch_embedding.weight"),
    ("modality_preprocessors.audio.rgbt_stem.norm_layer.{p}", "audio_embeddings.patch_norm.{p}"),
    ("modality_preprocessors.{hm}.cls_token", "{hm}_embeddings.cls_token"),
    ("modality_preprocessors.{hm}.pos_embedding_helper.pos_embed", "{hm}_embeddings.position_embedding"),
    ("modality_preprocessors.text.token_embedding.weight", "text_embeddings.token_embedding.weight"),
    ("modality_preprocessors.text.pos_embed", "text_embeddings.position_embedding"),
    ("modality_trunks.vision.pre_transformer_layer.0.{p}", "vision_encoder.pre_layernorm.{p}"),
    ("modality_trunks.{m}.blocks.{i}.attn.{a}", "{m}_encoder.layers.{i}.self_attn.{a}"),
    ("modality_trunks.{m}.blocks.{i}.norm_1.{p}", "{m}_encoder.layers.{i}.layer_norm1.{p}"),
    ("modality_trunks.{m}.blocks.{i}.norm_2.{p}", "{m}_encoder.layers.{i}.layer_norm2.{p}"),
    ("modality_trunks.{m}.blocks.{i}.mlp.{fc}.{p}", "{m}_encoder.layers.{i}.mlp.{fc}.{p}"),
    ("modality_heads.{hm}.0.{p}", "{hm}_head.layer_norm.{p}"),
    ("modality_heads.{hm}.2.weight", "{hm}_head.projection.weight"),
    ("modality_heads.text.proj.0.{p}", "text_head.layer_norm.{p}"),
    ("modality_heads.text.proj.1.weight", "text_head.projection.weight"),
    ("modality_postprocessors.text.1.log_logit_scale", "text_log_logit_scale"),
    ("modality_postprocessors.audio.1.log_logit_scale", "audio_log_logit_scale"),
]


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    # Even indices are literal text, odd ones placeholder names.
    pattern = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for index, part in enumerate(parts)
    )
    return re.compile(f"^{pattern}$")


_META_TO_OURS = [(_template_regex(meta), ours) for meta, ours in _KEY_TEMPLATES]
_OURS_TO_META = [(_template_regex(ours), meta) for meta, ours in _KEY_TEMPLATES]


def _translate(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def _meta_key(our_key: str) -> str:
    """Meta's name for one of our keys (for error messages)."""
    return _translate(our_key, _OURS_TO_META) or "?"


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    return shown + (f" ... and {len(keys) - _MAX_KEYS_IN_ERROR} more" if len(keys) > _MAX_KEYS_IN_ERROR else "")


def _check_causal_mask(mask: torch.Tensor) -> None:
    """Meta stores the text trunk's causal mask; we rebuild it, so verify it is the mask we rebuild."""
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(
            f"`{_META_TEXT_MASK_KEY}` must be a square causal attention mask, got shape {tuple(mask.shape)}."
        )
    expected = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu(1)
    if not torch.equal(mask, expected):
        raise ValueError(
            f"`{_META_TEXT_MASK_KEY}` is not a causal mask (-inf above the diagonal, 0 elsewhere); this port "
            "only supports causal text attention."
        )


def convert_meta_imagebind_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """
    Converts a state dict of Meta's `imagebind_model.ImageBindModel` to [`ImageBindModel`]'s key layout.

    Weights of the unported modalities (depth, thermal, IMU) are dropped; the text causal mask, which our
    model rebuilds, is checked and not copied. The input mapping is not modified and tensors are not copied.

    Args:
        state_dict (mapping of `str` to `torch.Tensor`): Meta's state dict (e.g. `torch.load("imagebind_huge.pth")`).

    Returns:
        `tuple[dict[str, torch.Tensor], list[str]]`: the converted state dict and the sorted list of dropped
        (unported-modality) Meta keys.

    Raises:
        `TypeError`: if `state_dict` is not a mapping of names to tensors.
        `ValueError`: if a key is not part of Meta's layout or the stored text mask is not causal.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}.")
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`state_dict[{key!r}]` must be a torch.Tensor, got {type(tensor).__name__}.")
        if _UNPORTED_PATTERN.match(key):
            dropped.append(key)
        elif key == _META_TEXT_MASK_KEY:
            _check_causal_mask(tensor)
        else:
            new_key = _translate(key, _META_TO_OURS)
            if new_key is None:
                unknown.append(key)
            else:
                converted[new_key] = tensor
    if unknown:
        raise ValueError(
            "unexpected keys in the Meta ImageBind state dict (not part of its layout): "
            + _format_keys(sorted(unknown))
        )
    if dropped:
        logger.info(
            f"Dropped {len(dropped)} weights of the unported ImageBind modalities {', '.join(_UNPORTED_MODALITIES)}."
        )
    return converted, sorted(dropped)
