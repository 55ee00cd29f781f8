"""The multimodal adapter between ImageBind's joint embedding space and a causal LLM's hidden space.

InstructAny2Pix feeds each referenced medium to the LLM as a `<video>` token whose input embedding is
`embed(<video>) + input_projector(e)`, with `e` the medium's ImageBind vector rescaled to norm 20, and reads
embeddings back out of the LLM's final hidden states through `output_head`. The official checkpoint stores these
two MLPs inside the LLM as `model.vae_projector_image.*` and `model.vae_predictor_image.*`; here they are a
standalone diffusers component so that the LLM stays a plain transformers model.
"""

import json
import os
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


# Linear attribute heads saved by `train_imagebind.py --attribute_loss_weight` next to the trained encoder.
ATTRIBUTE_HEADS_FILE = "attribute_heads.safetensors"


@dataclass
class AttributeHeads:
    """Linear read-outs of attribute fields from an embedding: ``weight @ (embed_scale * unit_embedding) + bias``,
    split into ``num_classes`` logits per field.

    Args:
        weight (`torch.Tensor`): shape `(sum(num_classes), embed_dim)`.
        bias (`torch.Tensor`): shape `(sum(num_classes),)`.
        num_classes (`tuple[int, ...]`): classes of each field.
        embed_scale (`float`): the norm of the embeddings the heads read.
        class_names (`tuple[tuple[str, ...], ...]`, *optional*): per field, the word each class stands for (``""``
            for none), e.g. ShapesWorld's `ATTRIBUTE_CLASS_NAMES`; lets `train_llm.py --relabel_words` find the
            classes of a caption word.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    num_classes: tuple[int, ...]
    embed_scale: float
    class_names: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        if self.class_names is not None:
            names = tuple(tuple(field) for field in self.class_names)
            if len(names) != len(self.num_classes) or any(
                len(field) != n or not all(isinstance(name, str) for name in field)
                for field, n in zip(names, self.num_classes)
            ):
                raise ValueError(
                    f"`class_names` must give one string per class of each field ({tuple(self.num_classes)} "
                    f"classes), got {self.class_names!r}."
                )
            self.class_names = names

    def save(self, path: str) -> None:
        """Writes the heads as one safetensors file (``num_classes`` and ``embed_scale`` in its metadata)."""
        metadata = {
            "num_classes": ",".join(str(n) for n in self.num_classes),
            "embed_scale": repr(float(self.embed_scale)),
        }
        if self.class_names is not None:
            metadata["class_names"] = json.dumps(self.class_names)
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()}
        save_file(tensors, path, metadata=metadata)

    def logits(self, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-field logits of embeddings given at any norm (rescaled to `embed_scale` first).

        Args:
            embeds (`torch.Tensor`): shape `(..., embed_dim)`.

        Returns:
            `tuple[torch.Tensor, ...]`: one `(..., num_classes[k])` tensor per field.
        """
        scaled = rescale_to_norm(embeds.float(), self.embed_scale)
        return torch.split(scaled @ self.weight.float().T + self.bias.float(), list(self.num_classes), dim=-1)

    @classmethod
    def load(cls, path: str) -> "AttributeHeads":
        """Reads a file written by `save` (or the ``attribute_heads.safetensors`` of a folder, e.g. the output of
        `train_imagebind.py`); raises `ValueError` naming what is missing or inconsistent."""
        if os.path.isdir(path):
            path = os.path.join(path, ATTRIBUTE_HEADS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"No attribute heads file at {path!r} (train_imagebind.py writes {ATTRIBUTE_HEADS_FILE}).")
        with safe_open(path, framework="pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
            if keys != {"weight", "bias"} or not {"num_classes", "embed_scale"} <= set(metadata):
                raise ValueError(
                    f"{path} is not an attribute heads file: it needs tensors `weight` and `bias` and metadata "
                    f"`num_classes` and `embed_scale`, got tensors {sorted(keys)} and metadata {sorted(metadata)}."
                )
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        try:
            num_classes = tuple(int(n) for n in metadata["num_classes"].split(","))
            embed_scale = float(metadata["embed_scale"])
            class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
        except ValueError as error:
            raise ValueError(f"{path}: unreadable metadata {metadata}: {error}") from None
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] != sum(num_classes):
            raise ValueError(
                f"{path}: `weight` {tuple(weight.shape)} and `bias` {tuple(bias.shape)} do not match num_classes "
                f"{num_classes} (sum {sum(num_classes)} rows)."
            )
        try:
            return cls(weight, bias, num_classes, embed_scale, class_names=class_names)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def check_token_groups(groups: Any, num_fields: int) -> list[list[int]]:
    """Checks that ``groups`` partitions the field indices ``0 .. num_fields - 1`` into non-empty lists of ints and
    returns it as lists; raises `ValueError` naming what is wrong (see `MultimodalAdapter`'s
    `attribute_token_groups`)."""
    expected = f"a partition of the {num_fields} attribute fields' indices 0..{num_fields - 1} into non-empty lists"
    if not isinstance(groups, (list, tuple)) or not groups or any(
        not isinstance(group, (list, tuple))
        or not group
        or any(isinstance(i, bool) or not isinstance(i, int) for i in group)
        for group in groups
    ):
        raise ValueError(f"`attribute_token_groups` must be {expected}, e.g. [[0], [1, 2]]; got {groups!r}.")
    fields = sorted(i for group in groups for i in group)
    if fields != list(range(num_fields)):
        raise ValueError(
            f"`attribute_token_groups` must be {expected}, each field in exactly one group; got {groups!r}."
        )
    return [list(group) for group in groups]


def rescale_to_norm(x: torch.Tensor, norm: float, eps: float = 1e-9) -> torch.Tensor:
    """Rescales vectors (along the last dimension) to a given L2 norm, as `x / (||x|| + eps) * norm`.

    This is the exact formula of the official code (norm 20 for LLM inputs and targets, 100 for the prior's input).
    The arithmetic runs in at least float32, so half-precision inputs do not lose the tiny `eps` or overflow the
    squared norm; the result has the input's dtype. A zero vector stays zero.

    Args:
        x (`torch.Tensor`):
            Floating-point tensor of shape `(..., dim)`; every vector along the last dimension is rescaled.
        norm (`float`):
            The target L2 norm, a positive number.
        eps (`float`, *optional*, defaults to 1e-9):
            Added to the norm before dividing, as in the official code.

    Returns:
        `torch.Tensor`: a new tensor of the same shape and dtype as `x`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(
            f"`x` must be a floating-point tensor with at least one dimension, got dtype {x.dtype} and shape "
            f"{tuple(x.shape)}."
        )
    if isinstance(norm, bool) or not isinstance(norm, Real) or not norm > 0 or norm == float("inf"):
        raise ValueError(f"`norm` must be a positive finite number, got {norm!r}.")
    if isinstance(eps, bool) or not isinstance(eps, Real) or eps < 0:
        raise ValueError(f"`eps` must be a non-negative number, got {eps!r}.")
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x_compute = x.to(compute_dtype)
    scaled = x_compute / (torch.linalg.vector_norm(x_compute, dim=-1, keepdim=True) + eps) * norm
    return scaled.to(x.dtype)


class MultimodalAdapter(ModelMixin, ConfigMixin):
    r"""
    Maps ImageBind embeddings into an LLM's input space and LLM hidden states back into ImageBind's space.

    `input_projector` and `output_head` are `Sequential(Linear, GELU, Linear)` MLPs whose state-dict keys
    (`input_projector.{0,2}.*`, `output_head.{0,2}.*`) map one to one onto the official
    `model.vae_projector_image.{0,2}.*` and `model.vae_predictor_image.{0,2}.*`.

    Args:
        embed_dim (`int`, *optional*, defaults to 1024):
            Size of the media embeddings (ImageBind-huge's joint space is 1024).
        llm_hidden_size (`int`, *optional*, defaults to 4096):
            Hidden size of the LLM (4096 for Vicuna-7B).
        media_embed_norm (`float`, *optional*, defaults to 20.0):
            L2 norm every media embedding is rescaled to before the projector (the scale the official LLM was
            trained on; its read-out targets have the same norm).
        image_patch_tokens (`int`, *optional*, defaults to 0):
            0 (the official recipe): an image is one `<video>` token, its pooled ImageBind vector. `K > 0`: an image
            is `1 + K` consecutive `<video>` tokens, the pooled vector's followed by `K` read from the image's patch
            tokens ([`~ImageBindModel.encode_image_patches`]) by `patch_resampler`, a perceiver resampler (diffusers'
            `IPAdapterPlusImageProjection`, the module IP-Adapter Plus reads CLIP's patch tokens with). The pooled
            vector mixes what is where; the patches keep it, so the LLM can read a picture object by object. Audio is
            always one token. An extension: an LLM trained without it cannot use it.
        patch_embed_dim (`int`, *optional*):
            Width of the patch tokens (ImageBind's `vision_embed_dim`); required when `image_patch_tokens > 0`.
        resampler_hidden_size (`int`, *optional*, defaults to 768):
            Width inside the resampler.
        resampler_depth (`int`, *optional*, defaults to 2):
            Perceiver blocks of the resampler.
        resampler_heads (`int`, *optional*, defaults to 4):
            Attention heads of the resampler (they must divide `resampler_hidden_size`).
        attribute_classes (`list[int]`, *optional*):
            `None` (the official recipe): a medium's pooled vector is its only input. A list of class counts, one per
            attribute field (e.g. ShapesWorld's `ATTRIBUTE_CLASSES`): every medium also takes one `<video>` token per
            field, after its pooled one, holding `attribute_embedding` of that field's class distribution as read by
            `attribute_reader`, a linear classifier on the rescaled vector (typically the attribute heads
            `train_imagebind.py` trains with the encoder, loaded by `load_attribute_reader`). A field is then one
            token the LLM can copy from, whatever the other fields hold, which an MLP projection of the whole vector
            into one token does not give for combinations never seen in training. An extension: an LLM trained
            without it cannot use it.
        max_media_positions (`int`, *optional*, defaults to 0):
            0 (the official recipe): a medium's tokens say nothing of where it stands among the prompt's media. `M >
            0`: `media_position_embedding` holds one learned vector per place (first medium, second, ... up to `M`,
            images and audio alike, in prompt order), added to every token of the medium in that place, so each
            token carries which medium it belongs to and the LLM can take all of one medium's fields once an
            instruction has pointed at it ("the one with a green star"). Zero at initialisation: a new table leaves
            the LLM's inputs as they were. A prompt with more than `M` media is refused. An extension: an LLM
            trained without it cannot use it.
        attribute_word_ids (`list[int]`, *optional*):
            Needs `attribute_classes`: one LLM token id per class of every field, all fields concatenated (`-1` for
            a class no word names, e.g. an empty slot), from the LLM's tokenizer and the words the classes stand for
            (`AttributeHeads.class_names`). A field's token is then its class distribution times its own rows *plus*
            the LLM's own input embeddings of the class words (`word_embeddings` of `project_tokens`), so the token
            of a slot read as a circle holds the embedding of "circle" itself: copying it into the answer is the
            same for every colour it comes with, which is what a combination never seen in training needs. The
            rows then start at the scale of a new LLM's word embeddings (std 0.02) instead of 1, so the words are
            not drowned. An extension: an LLM trained without it cannot use it.
        attribute_token_groups (`list[list[int]]`, *optional*):
            Needs `attribute_classes`: which fields share one `<video>` token, as a partition of the field indices in
            token order (e.g. ShapesWorld's ``[[0], [1, 2], [3, 4], [5, 6]]``: the background, then one token per
            slot holding its shape and colour). A group's token is the sum of its fields' tokens, so an object named
            by two attributes ("the green star") is one token to match and copy instead of a conjunction across two.
            `None`: one token per field. An extension: an LLM trained without it cannot use it.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 1024,
        llm_hidden_size: int = 4096,
        media_embed_norm: float = 20.0,
        image_patch_tokens: int = 0,
        patch_embed_dim: int | None = None,
        resampler_hidden_size: int = 768,
        resampler_depth: int = 2,
        resampler_heads: int = 4,
        attribute_classes: list[int] | None = None,
        max_media_positions: int = 0,
        attribute_word_ids: list[int] | None = None,
        attribute_token_groups: list[list[int]] | None = None,
    ):
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("llm_hidden_size", llm_hidden_size),
            ("resampler_hidden_size", resampler_hidden_size),
            ("resampler_depth", resampler_depth),
            ("resampler_heads", resampler_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(media_embed_norm, bool) or not isinstance(media_embed_norm, Real) or not media_embed_norm > 0:
            raise ValueError(f"`media_embed_norm` must be a positive number, got {media_embed_norm!r}.")
        if isinstance(image_patch_tokens, bool) or not isinstance(image_patch_tokens, int) or image_patch_tokens < 0:
            raise ValueError(
                f"`image_patch_tokens` must be a non-negative integer (0: one token per image), got "
                f"{image_patch_tokens!r}."
            )
        if image_patch_tokens and (
            isinstance(patch_embed_dim, bool) or not isinstance(patch_embed_dim, int) or patch_embed_dim <= 0
        ):
            raise ValueError(
                f"`image_patch_tokens` {image_patch_tokens} needs `patch_embed_dim`, the width of the image encoder's "
                f"patch tokens (ImageBind's vision_embed_dim), as a positive integer; got {patch_embed_dim!r}."
            )
        if isinstance(max_media_positions, bool) or not isinstance(max_media_positions, int) or max_media_positions < 0:
            raise ValueError(
                f"`max_media_positions` must be a non-negative integer (0: no media position embeddings), got "
                f"{max_media_positions!r}."
            )
        if resampler_hidden_size % resampler_heads:
            raise ValueError(
                f"`resampler_heads` ({resampler_heads}) must divide `resampler_hidden_size` ({resampler_hidden_size})."
            )
        if attribute_classes is not None:
            if (
                not isinstance(attribute_classes, (list, tuple))
                or not attribute_classes
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in attribute_classes)
            ):
                raise ValueError(
                    f"`attribute_classes` must be a non-empty list of class counts (integers >= 2), one per attribute "
                    f"field, got {attribute_classes!r}."
                )
        if attribute_word_ids is not None:
            if attribute_classes is None:
                raise ValueError(
                    "`attribute_word_ids` names the words of attribute classes: it needs `attribute_classes`."
                )
            if (
                not isinstance(attribute_word_ids, (list, tuple))
                or len(attribute_word_ids) != sum(attribute_classes)
                or any(isinstance(i, bool) or not isinstance(i, int) or i < -1 for i in attribute_word_ids)
            ):
                raise ValueError(
                    f"`attribute_word_ids` must be a list of {sum(attribute_classes)} token ids (integers >= 0, or -1 "
                    f"for a class with no word), one per class of `attribute_classes` {list(attribute_classes)}; got "
                    f"{attribute_word_ids!r}."
                )
        if attribute_token_groups is not None:
            if attribute_classes is None:
                raise ValueError("`attribute_token_groups` groups attribute fields: it needs `attribute_classes`.")
            check_token_groups(attribute_token_groups, len(attribute_classes))
        self.input_projector = nn.Sequential(
            nn.Linear(embed_dim, llm_hidden_size), nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)
        )
        self.output_head = nn.Sequential(
            nn.Linear(llm_hidden_size, llm_hidden_size), nn.GELU(), nn.Linear(llm_hidden_size, embed_dim)
        )
        self.patch_resampler = None
        if image_patch_tokens:
            self.patch_resampler = IPAdapterPlusImageProjection(
                embed_dims=patch_embed_dim,
                output_dims=llm_hidden_size,
                hidden_dims=resampler_hidden_size,
                depth=resampler_depth,
                dim_head=resampler_hidden_size // resampler_heads,
                heads=resampler_heads,
                num_queries=image_patch_tokens,
            )
        self.attribute_reader = self.attribute_embedding = None
        if attribute_classes is not None:
            self.attribute_reader = nn.Linear(embed_dim, sum(attribute_classes))
            # One row per class of every field: a field's token is its class distribution times its own rows.
            self.attribute_embedding = nn.Embedding(sum(attribute_classes), llm_hidden_size)
            if attribute_word_ids is not None:
                nn.init.normal_(self.attribute_embedding.weight, std=0.02)
        self.media_position_embedding = None
        if max_media_positions:
            self.media_position_embedding = nn.Embedding(max_media_positions, llm_hidden_size)
            nn.init.zeros_(self.media_position_embedding.weight)

    @staticmethod
    def _check_last_dim(tensor: torch.Tensor, expected: int, argument: str, meaning: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.ndim == 0 or tensor.shape[-1] != expected:
            raise ValueError(
                f"`{argument}` must have {meaning} {expected} as its last dimension, got shape {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise ValueError(f"`{argument}` must be a floating-point tensor, got dtype {tensor.dtype}.")

    @property
    def attribute_tokens(self) -> int:
        """`<video>` tokens of attribute fields each medium takes after its pooled one (0 without
        `attribute_classes`; one per group of `attribute_token_groups` with them)."""
        if self.config.attribute_token_groups is not None:
            return len(self.config.attribute_token_groups)
        return len(self.config.attribute_classes or ())

    @property
    def ties_attribute_words(self) -> bool:
        """Whether attribute tokens include the LLM's word embeddings of their classes (`attribute_word_ids`), so
        `project_tokens` needs the LLM's `word_embeddings`."""
        return self.config.attribute_word_ids is not None

    def attribute_word_rows(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        """The LLM's input embedding of every attribute class's word (zero for a class with no word).

        Args:
            word_embeddings (`torch.Tensor`):
                The LLM's input embedding matrix, `(vocab_size, llm_hidden_size)` (`llm.get_input_embeddings().weight`);
                the result is differentiable in it, so the LLM's words train through the attribute tokens too.

        Returns:
            `torch.Tensor`: shape `(sum(attribute_classes), llm_hidden_size)`, on the adapter's device and in its dtype.
        """
        if not self.ties_attribute_words:
            raise ValueError("This adapter's attribute tokens hold no words (`attribute_word_ids` is None).")
        if not isinstance(word_embeddings, torch.Tensor):
            raise TypeError(
                "This adapter's attribute tokens hold the LLM's words (`attribute_word_ids`): pass `word_embeddings`, "
                f"the LLM's input embedding matrix, as a torch.Tensor; got {type(word_embeddings).__name__}."
            )
        ids = torch.tensor(self.config.attribute_word_ids)
        hidden = self.config.llm_hidden_size
        if word_embeddings.ndim != 2 or word_embeddings.shape[1] != hidden or not word_embeddings.is_floating_point():
            raise ValueError(
                f"`word_embeddings` must be the LLM's (vocab_size, {hidden}) floating-point input embedding matrix, "
                f"got shape {tuple(word_embeddings.shape)} and dtype {word_embeddings.dtype}."
            )
        if int(ids.max()) >= word_embeddings.shape[0]:
            raise ValueError(
                f"`attribute_word_ids` reach token id {int(ids.max())} but `word_embeddings` has only "
                f"{word_embeddings.shape[0]} rows: the adapter was trained with another tokenizer."
            )
        rows = word_embeddings.to(device=self.device, dtype=self.dtype)[ids.clamp(min=0).to(self.device)]
        return rows * (ids >= 0).to(device=self.device, dtype=self.dtype)[:, None]

    @property
    def tokens_per_medium(self) -> int:
        """How many `<video>` tokens a medium given by its pooled vector alone (audio, or an image without patch
        tokens) takes in the LLM's prompt: 1 + `attribute_tokens`."""
        return 1 + self.attribute_tokens

    @property
    def tokens_per_image(self) -> int:
        """How many `<video>` tokens an image given with its patch tokens takes: `tokens_per_medium` +
        `image_patch_tokens`."""
        return self.tokens_per_medium + self.config.image_patch_tokens

    def resample_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Reads `image_patch_tokens` LLM input vectors from each image's patch tokens (added, like `project`'s
        output, to the `<video>` token embeddings that follow the image's pooled one).

        Args:
            patch_tokens (`torch.Tensor`):
                Shape `(num_images, num_patches, patch_embed_dim)`, from `ImageBindModel.encode_image_patches`.

        Returns:
            `torch.Tensor`: shape `(num_images, image_patch_tokens, llm_hidden_size)`, on the adapter's device and in
            its dtype.
        """
        if self.patch_resampler is None:
            raise ValueError(
                "This adapter reads no patch tokens (`image_patch_tokens` is 0): pass one pooled vector per image."
            )
        self._check_last_dim(patch_tokens, self.config.patch_embed_dim, "patch_tokens", "patch_embed_dim")
        if patch_tokens.ndim != 3:
            raise ValueError(
                f"`patch_tokens` must have shape (num_images, num_patches, {self.config.patch_embed_dim}), got "
                f"{tuple(patch_tokens.shape)}."
            )
        return self.patch_resampler(patch_tokens.to(device=self.device, dtype=self.dtype))

    def project(self, media_embeds: torch.Tensor) -> torch.Tensor:
        """Rescales media embeddings to `media_embed_norm` and projects them into the LLM's embedding space.

        The result is *added* to the `<video>` token embedding (the official weights were trained that way).

        Args:
            media_embeds (`torch.Tensor`):
                ImageBind embeddings of shape `(..., embed_dim)`, at any norm.

        Returns:
            `torch.Tensor`: shape `(..., llm_hidden_size)`, on the adapter's device and in its dtype.
        """
        self._check_last_dim(media_embeds, self.config.embed_dim, "media_embeds", "embed_dim")
        rescaled = rescale_to_norm(media_embeds.to(self.device), self.config.media_embed_norm)
        return self.input_projector(rescaled.to(self.dtype))

    def read_attributes(self, media_embeds: torch.Tensor) -> list[torch.Tensor]:
        """The attribute reader's class probabilities of media embeddings, one tensor per field.

        Args:
            media_embeds (`torch.Tensor`):
                ImageBind embeddings of shape `(..., embed_dim)`, at any norm (rescaled like `project`'s input).

        Returns:
            `list[torch.Tensor]`: one `(..., attribute_classes[k])` tensor per field, rows summing to 1.
        """
        if self.attribute_reader is None:
            raise ValueError("This adapter reads no attributes (`attribute_classes` is None).")
        self._check_last_dim(media_embeds, self.config.embed_dim, "media_embeds", "embed_dim")
        rescaled = rescale_to_norm(media_embeds.to(self.device), self.config.media_embed_norm)
        logits = self.attribute_reader(rescaled.to(self.dtype))
        return [field.softmax(dim=-1) for field in logits.split(list(self.config.attribute_classes), dim=-1)]

    def project_tokens(
        self,
        media_embeds: torch.Tensor,
        class_permutation: torch.LongTensor | None = None,
        word_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All input vectors of media given by their pooled embedding: `project`'s, then one per attribute field.

        Args:
            media_embeds (`torch.Tensor`):
                ImageBind embeddings of shape `(num_media, embed_dim)`, at any norm.
            class_permutation (`torch.LongTensor`, *optional*):
                Shape `(num_media, sum(attribute_classes))`: the read class probabilities of each medium, all fields
                concatenated, are replaced by ``probs[class_permutation]`` (a permutation within each field), so a
                medium reads as if its classes had been renamed (training's `--relabel_words`). Default: as read.
            word_embeddings (`torch.Tensor`, *optional*):
                The LLM's input embedding matrix `(vocab_size, llm_hidden_size)`; required by an adapter with
                `attribute_word_ids` (see `attribute_word_rows`), not read by any other.

        Returns:
            `torch.Tensor`: shape `(num_media, tokens_per_medium, llm_hidden_size)`.
        """
        pooled = self.project(media_embeds).unsqueeze(-2)
        if self.attribute_reader is None:
            if class_permutation is not None:
                raise ValueError("`class_permutation` needs an adapter with attribute tokens (`attribute_classes`).")
            return pooled
        fields = list(self.config.attribute_classes)
        probs = self.read_attributes(media_embeds)
        if class_permutation is not None:
            if (
                not isinstance(class_permutation, torch.Tensor)
                or class_permutation.dtype != torch.long
                or class_permutation.shape != (media_embeds.shape[0], sum(fields))
            ):
                raise ValueError(
                    f"`class_permutation` must be a long tensor of shape ({media_embeds.shape[0]}, {sum(fields)}), "
                    "one row of class indices per medium."
                )
            for start, n in zip(torch.tensor([0] + fields[:-1]).cumsum(0).tolist(), fields):
                block = class_permutation[:, start : start + n].cpu() - start
                if not torch.equal(block.sort(dim=-1).values, torch.arange(n).expand_as(block)):
                    raise ValueError(
                        "Each row of `class_permutation` must permute the classes within each attribute field."
                    )
            permutation = class_permutation.to(media_embeds.device)
            probs = torch.cat(probs, dim=-1).gather(-1, permutation).split(fields, dim=-1)
        rows = self.attribute_embedding.weight
        if self.ties_attribute_words:
            rows = rows + self.attribute_word_rows(word_embeddings)
        rows = rows.split(fields)
        tokens = [field_probs @ field_rows for field_probs, field_rows in zip(probs, rows)]
        if self.config.attribute_token_groups is not None:
            tokens = [sum(tokens[field] for field in group) for group in self.config.attribute_token_groups]
        return torch.cat([pooled, torch.stack(tokens, dim=-2)], dim=-2)

    def load_attribute_reader(self, heads: AttributeHeads) -> None:
        """Sets `attribute_reader` from linear heads (e.g. those `train_imagebind.py --attribute_loss_weight` trains
        with the encoder, see `AttributeHeads.load`), rescaled to read the `media_embed_norm` vector this adapter
        gives them; the reader's parameters stop training (they were fitted to labels, the LLM's loss has none).

        Args:
            heads ([`AttributeHeads`]): heads of the adapter's `attribute_classes` on its `embed_dim`.
        """
        if self.attribute_reader is None:
            raise ValueError("This adapter reads no attributes (`attribute_classes` is None).")
        if not isinstance(heads, AttributeHeads):
            raise TypeError(f"`heads` must be an AttributeHeads, got {type(heads).__name__}.")
        if tuple(heads.num_classes) != tuple(self.config.attribute_classes):
            raise ValueError(
                f"The heads read fields of {tuple(heads.num_classes)} classes but the adapter's `attribute_classes` "
                f"are {tuple(self.config.attribute_classes)}."
            )
        if heads.weight.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"The heads read {heads.weight.shape[1]}-d embeddings but the adapter's `embed_dim` is "
                f"{self.config.embed_dim}."
            )
        if isinstance(heads.embed_scale, bool) or not isinstance(heads.embed_scale, Real) or not heads.embed_scale > 0:
            raise ValueError(f"`heads.embed_scale` must be a positive number, got {heads.embed_scale!r}.")
        with torch.no_grad():
            # W·(s·u) = (W·s/n)·(n·u): the same logits from the vector at norm n.
            scale = heads.embed_scale / self.config.media_embed_norm
            self.attribute_reader.weight.copy_(heads.weight.float() * scale)
            self.attribute_reader.bias.copy_(heads.bias.float())
        self.attribute_reader.requires_grad_(False)

    def predict(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Maps final-layer LLM hidden states to ImageBind embeddings (trained against norm-20 targets).

        Args:
            hidden_states (`torch.Tensor`):
                Final-layer (post-norm) LLM hidden states of shape `(..., llm_hidden_size)`.

        Returns:
            `torch.Tensor`: shape `(..., embed_dim)`, on the adapter's device and in its dtype.
        """
        self._check_last_dim(hidden_states, self.config.llm_hidden_size, "hidden_states", "llm_hidden_size")
        return self.output_head(hidden_states.to(device=self.device, dtype=self.dtype))
