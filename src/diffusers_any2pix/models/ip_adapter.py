"""IP-Adapter on ImageBind embeddings, stored in diffusers' standard IP-Adapter layout.

The component holds exactly the tensors of a standard (4-token) IP-Adapter checkpoint:

- ``image_proj.proj.{weight,bias}``, ``image_proj.norm.{weight,bias}`` — the image projection
  (ImageBind vector → ``num_tokens`` cross-attention tokens), and
- ``ip_adapter.{i}.to_k_ip.weight``, ``ip_adapter.{i}.to_v_ip.weight`` — the extra key/value projections of
  every cross-attention processor, ``i`` = 1, 3, 5, … in ``unet.attn_processors`` order (diffusers' numbering).

So ``adapter.state_dict()`` *is* a diffusers IP-Adapter checkpoint: it loads into a plain diffusers SD/SDXL
pipeline with ``pipe.load_ip_adapter(...)``, and we attach it to a UNet with diffusers' own
``UNet2DConditionModel._load_ip_adapter_weights`` instead of re-implementing the attention processors.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


# Only the 4-token ``proj``/``norm`` projection maps onto diffusers' ``ImageProjection`` loader path.
STANDARD_NUM_TOKENS = 4


def unet_cross_attention_hidden_sizes(unet) -> list[int]:
    """Hidden size of every cross-attention processor of ``unet``, in ``unet.attn_processors`` order.

    This mirrors how diffusers sizes IP-Adapter processors (``attn2`` processors; the hidden size is the block's
    channel count), so an adapter built from this list fits ``unet`` exactly.
    """
    block_out_channels = list(unet.config.block_out_channels)
    sizes = []
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            sizes.append(block_out_channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(block_out_channels))[int(name[len("up_blocks.")])])
        elif name.startswith("down_blocks"):
            sizes.append(block_out_channels[int(name[len("down_blocks.")])])
        else:  # pragma: no cover - diffusers UNets have no other attention blocks
            raise ValueError(f"Unknown attention processor location {name!r}.")
    return sizes


class _ImageProjection(nn.Module):
    """The standard IP-Adapter image projection (key names of the original IP-Adapter checkpoints)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(*image_embeds.shape[:-1], self.num_tokens, -1)
        return self.norm(tokens)


class _KeyValueProjection(nn.Module):
    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


class ImageBindIPAdapter(ModelMixin, ConfigMixin):
    r"""
    IP-Adapter weights that condition a text-to-image UNet (SD 1.x / SDXL) on ImageBind embeddings.

    Args:
        image_embed_dim (`int`, defaults to 1024):
            Width of the ImageBind embedding the adapter reads.
        cross_attention_dim (`int`, defaults to 2048):
            The UNet's ``cross_attention_dim`` (2048 for SDXL, 768 for SD 1.x).
        hidden_sizes (`list[int]`):
            Hidden size of each cross-attention processor in ``unet.attn_processors`` order (see
            [`unet_cross_attention_hidden_sizes`]).
        num_tokens (`int`, defaults to 4):
            Image tokens produced per embedding. diffusers' standard loader supports 4.
    """

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 1024,
        cross_attention_dim: int = 2048,
        hidden_sizes: list[int] | tuple[int, ...] = (),
        num_tokens: int = STANDARD_NUM_TOKENS,
    ):
        super().__init__()
        if num_tokens != STANDARD_NUM_TOKENS:
            raise ValueError(
                f"`num_tokens` must be {STANDARD_NUM_TOKENS} (diffusers' standard IP-Adapter layout), got {num_tokens}."
            )
        if len(hidden_sizes) == 0:
            raise ValueError("`hidden_sizes` must list the hidden size of every cross-attention processor of the UNet.")
        self.image_proj = _ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)
        # diffusers numbers the cross-attention processors 1, 3, 5, … (self-attention ones take the even ids).
        self.ip_adapter = nn.ModuleDict(
            {str(2 * i + 1): _KeyValueProjection(cross_attention_dim, size) for i, size in enumerate(hidden_sizes)}
        )

    @classmethod
    def from_unet(cls, unet, image_embed_dim: int = 1024, num_tokens: int = STANDARD_NUM_TOKENS) -> "ImageBindIPAdapter":
        """Build a freshly initialised adapter sized for ``unet`` (e.g. to train one)."""
        return cls(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=unet.config.cross_attention_dim,
            hidden_sizes=unet_cross_attention_hidden_sizes(unet),
            num_tokens=num_tokens,
        )

    def check_compatible(self, unet, image_embed_dim: int | None = None) -> None:
        """Raise a `ValueError` naming the sizes involved when this adapter does not fit ``unet``."""
        if unet.config.cross_attention_dim != self.config.cross_attention_dim:
            raise ValueError(
                f"The ip_adapter was built for cross_attention_dim={self.config.cross_attention_dim} but the unet has "
                f"cross_attention_dim={unet.config.cross_attention_dim}."
            )
        unet_sizes = unet_cross_attention_hidden_sizes(unet)
        if list(unet_sizes) != list(self.config.hidden_sizes):
            raise ValueError(
                f"The ip_adapter has {len(self.config.hidden_sizes)} cross-attention projections with hidden sizes "
                f"{list(self.config.hidden_sizes)}, but the unet's cross-attention processors have {unet_sizes}."
            )
        if image_embed_dim is not None and image_embed_dim != self.config.image_embed_dim:
            raise ValueError(
                f"The ip_adapter reads {self.config.image_embed_dim}-d image embeddings but the image_encoder produces "
                f"{image_embed_dim}-d embeddings."
            )

    def diffusers_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The weights as ``{"image_proj": {...}, "ip_adapter": {...}}``, the dict ``load_ip_adapter`` accepts."""
        out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in self.state_dict().items():
            group, name = key.split(".", 1)
            out[group][name] = value
        return out

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Project ImageBind embeddings ``(..., image_embed_dim)`` to adapter tokens ``(..., num_tokens, dim)``."""
        return self.image_proj(image_embeds)

    def attach_to(self, unet) -> dict:
        """Attach the adapter to ``unet`` with diffusers' IP-Adapter loader; returns what `detach_from` restores.

        The UNet then needs ``added_cond_kwargs={"image_embeds": [embeds of shape (B, 1, image_embed_dim)]}``.
        """
        self.check_compatible(unet)
        if is_ip_adapter_attached(unet):
            # The UNet already carries an adapter (e.g. taken from another pipeline's `components`): undoing this
            # attachment must give the plain UNet, or a save would write that other adapter into the UNet folder.
            previous = {
                "attn_processors": {
                    name: AttnProcessor2_0() if isinstance(proc, IP_ADAPTER_PROCESSORS) else proc
                    for name, proc in unet.attn_processors.items()
                },
                "encoder_hid_proj": None,
                "encoder_hid_dim_type": None,
            }
        else:
            previous = {
                "attn_processors": dict(unet.attn_processors),
                "encoder_hid_proj": unet.encoder_hid_proj,
                "encoder_hid_dim_type": unet.config.encoder_hid_dim_type,
            }
        # low_cpu_mem_usage=False: build the processors with real tensors, then copy ours in.
        unet._load_ip_adapter_weights([self.diffusers_state_dict()], low_cpu_mem_usage=False)
        return previous

    @staticmethod
    def detach_from(unet, previous: dict) -> None:
        """Undo `attach_to`: restore the UNet's own attention processors and input projection."""
        unet.set_attn_processor(previous["attn_processors"])
        unet.encoder_hid_proj = previous["encoder_hid_proj"]
        unet.config.encoder_hid_dim_type = previous["encoder_hid_dim_type"]


def is_ip_adapter_attached(unet) -> bool:
    return any(isinstance(proc, IP_ADAPTER_PROCESSORS) for proc in unet.attn_processors.values())


@contextmanager
def temporary_ip_adapter_scale(unet, scale: float) -> Iterator[None]:
    """Set the scale of every attached IP-Adapter processor for the duration of the block, then restore it.

    Restoring in ``finally`` is what keeps one call's scale from leaking into the next (an official-code bug).
    """
    processors = [proc for proc in unet.attn_processors.values() if isinstance(proc, IP_ADAPTER_PROCESSORS)]
    saved = [list(proc.scale) for proc in processors]
    try:
        for proc in processors:
            proc.scale = [float(scale)] * len(proc.scale)
        yield
    finally:
        for proc, old in zip(processors, saved):
            proc.scale = old
