#!/usr/bin/env python
"""Bind text and audio to images with ImageBind's contrastive recipe, for an `ImageBindModel` of any size.

ImageBind (Girdhar et al., 2023) learns one embedding space by aligning every modality with images: for a batch of
(image, x) pairs, InfoNCE in both directions — symmetric cross-entropy over the similarities of the L2-normalised
embeddings divided by a temperature — with images as the anchor modality. Here the temperatures are the model's own
logit scales, exactly as in ImageBind: text embeddings come out of `ImageBindModel.encode_text` multiplied by the
learned text logit scale (initially 1/0.07), audio embeddings by the fixed audio scale (20, i.e. temperature 0.05),
and image embeddings are unit vectors, so ``image_embeds @ other_embeds.T`` are the logits. Pairs that share an
image or a text/sound (several renders of "a red star", two equal captions) all count as positives (soft targets),
so small vocabularies do not punish the model for matching equal things.

Data, one of:

- ShapesWorld rendered on the fly (default): a scene image ↔ its caption (and, for ``--object_text_fraction`` of the
  samples, an object image ↔ "an image of a red star"), and an object image ↔ a recording of its sound. Held-out
  combinations of the data generator are excluded (``--include_heldout`` to keep them). Retrieval is measured on
  fresh scenes and on recordings never used in training.
- a generated ShapesWorld folder (``--train_data data/shapes``): its ``--split`` scenes/captions and sounds; retrieval
  on its ``val`` split.
- any paired data (``--train_data pairs.jsonl``, one JSON object a line, paths relative to the file):
  ``{"image": "img/dog.jpg", "text": "a dog"}`` or ``{"image": "img/dog.jpg", "audio": "wav/bark.wav"}``.
  Retrieval on ``--eval_data`` (same format) or on the last ``--num_eval_pairs`` pairs, held out of training.

``--attribute_loss_weight W`` (on-the-fly ShapesWorld only; not part of ImageBind's recipe) adds W times a
cross-entropy of linear read-outs of the scene's attributes (background, each slot's shape and colour:
`diffusers_any2pix.shapes.ATTRIBUTE_FIELDS`) from the image embedding. Contrastive pairs alone never ask the
embedding of a scene to be a sum of its parts; one linear head per attribute does, which is what an embedding needs to
place combinations it never saw (measured in ``benchmarks/imagebind_compositionality.py``). The saved encoder is a
plain `ImageBindModel`; the heads are saved beside it as ``attribute_heads.safetensors`` (`AttributeHeads`), which
``train_llm.py --attribute_reader`` gives the LLM as one token per attribute. ``--attribute_embed_scale S`` has the
heads read S times the unit-norm embedding (a linear head on a unit vector stays soft under weight decay).

Binding a new modality on real data: start from a trained encoder (``--pretrained_image_encoder``, e.g. Meta's
checkpoint converted with `ImageBindModel.from_meta_checkpoint` and saved, or ``--pipeline``), give (image, x) pairs
in a ``.jsonl`` file, and train only the new tower with ``--trainable_modalities audio`` (ImageBind's recipe: the
image and text towers stay frozen). The loss and the data code are modality-agnostic: a modality the model does not
have yet needs its encoder in `ImageBindModel` and one `BoundModality` entry in `BOUND_MODALITIES` below (which input
the model's forward takes and which output it returns); nothing else changes.

Text needs a CLIP-BPE tokenizer whose end-of-text token is the largest id (ImageBind pools the text at the argmax of
the ids). ``--imagebind_tokenizer`` takes Meta's ``bpe_simple_vocab_16e6.txt.gz`` or a saved tokenizer folder;
without it (training from scratch) the script builds `shapes_world_tokenizer`: CLIP's byte-level BPE layout (the 256
byte symbols, the same with ``</w>``, the merges, then ``<|startoftext|>`` and ``<|endoftext|>``) with merges learnt so
that every ShapesWorld word is one token — 619 tokens, and ``text_vocab_size`` is set to that. The tokenizer is saved
to ``--output_dir/imagebind_tokenizer`` (loadable with ``CLIPTokenizer.from_pretrained``, e.g. by ``prepare_data.py
--imagebind_tokenizer``); the encoder to ``--output_dir/image_encoder`` (or, with ``--pipeline``, the whole pipeline).

Example (ShapesWorld from scratch)::

    accelerate launch training/train_imagebind.py --output_dir out/imagebind --max_train_steps 3000 \\
        --train_batch_size 64 --learning_rate 5e-4 --checkpointing_steps 500 --resume_from_checkpoint latest
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch.utils.data import Dataset

from diffusers_any2pix import training_utils
from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads
from diffusers_any2pix.processing_imagebind import ImageBindProcessor, clip_tokenizer_from_bpe, load_clip_tokenizer
from diffusers_any2pix.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    background_levels,
    caption,
    object_image_caption,
    render_object,
    render_scene,
    shape_caption,
    synthesize_sound,
)
from diffusers_any2pix.shapes.generate import HELDOUT_COMBINATIONS
from diffusers_any2pix.shapes.probe import random_scenes
from diffusers_any2pix.shapes.world import (
    ATTRIBUTE_CLASS_NAMES,
    ATTRIBUTE_CLASSES,
    IGNORE_LABEL,
    SLOT_PHRASES,
    Scene,
    attribute_labels,
)


logger = get_logger(__name__)

TOKENIZER_FOLDER = "imagebind_tokenizer"
RETRIEVAL_FILE = "retrieval.json"
# With `random_gray_levels`, objects keep at least this distance in gray level from their background's levels, so
# that no object vanishes into its background.
GRAY_LEVEL_MARGIN = 32
# A small ImageBind for 64x64 ShapesWorld scenes (1.83 M parameters, 7.3 MB in float32). The audio front end
# keeps ImageBind's preprocessing (128 mel bins x 204 frames, as the pipeline feeds it) with non-overlapping
# 16x16 patches; text keeps the 77-token context every ImageBindProcessor produces.
SHAPES_WORLD_IMAGEBIND_CONFIG: dict[str, Any] = {
    "out_embed_dim": 128,
    "vision_embed_dim": 128,
    "vision_num_blocks": 4,
    "vision_num_heads": 4,
    "vision_image_size": 64,
    "vision_patch_size": 8,
    "vision_drop_path": 0.0,
    "text_embed_dim": 128,
    "text_num_blocks": 2,
    "text_num_heads": 4,
    "audio_embed_dim": 128,
    "audio_num_blocks": 2,
    "audio_num_heads": 4,
    "audio_kernel_size": 16,
    "audio_stride": 16,
    "audio_drop_path": 0.0,
}
# Words of ShapesWorld captions ("a red circle on the left and ..., on a striped background", "an image of a red
# star", "the sound of a red star, variant 3"): each becomes one token of `shapes_world_tokenizer`.
SHAPES_WORLD_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(
            " ".join(
                SHAPES + COLOURS + BACKGROUNDS + tuple(SLOT_PHRASES.values())
                + ("a", "an", "and", "on", "background", "image", "of", "the", "sound", "variant")
            ).split()
        )
    )
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ tokenizer


def _bpe_segments(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The symbols left after applying merges by rank (CLIP's BPE)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, position = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[position : position + 2] = [symbols[position] + symbols[position + 1]]
    return symbols


def shapes_world_tokenizer(words: Sequence[str] = SHAPES_WORLD_WORDS):
    """
    A CLIP BPE tokenizer (transformers `CLIPTokenizer`) over a small vocabulary in which each of ``words`` is one
    token; any other text still tokenizes (into byte-level pieces), so nothing is ever unknown.

    The layout is CLIP's — byte symbols, byte symbols with ``</w>``, one token per merge, ``<|startoftext|>``,
    ``<|endoftext|>`` — so the end-of-text token has the largest id, as ImageBind's text pooling requires. Merges are
    added word by word: whatever earlier merges leave of a word is joined left to right by new merges, which rank
    after all earlier ones and so never change the words already made single tokens.

    Args:
        words (`Sequence[str]`, defaults to `SHAPES_WORLD_WORDS`): lower-case words of letters.

    Returns:
        `transformers.CLIPTokenizer` (built with `clip_tokenizer_from_bpe` from the learnt merges).
    """
    if not words or any(not isinstance(w, str) or not w.isalpha() or w != w.lower() for w in words):
        raise ValueError(f"`words` must be a non-empty list of lower-case alphabetic words, got {list(words)!r:.200}.")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        segments = _bpe_segments(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(segments) > 1:
            ranks[(segments[0], segments[1])] = len(merges)
            merges.append((segments[0], segments[1]))
            segments = [segments[0] + segments[1]] + segments[2:]
    # The library builds CLIP tokenizers from a merges file (header line, then "a b" per merge).
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "merges.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("#version: shapes-world\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return clip_tokenizer_from_bpe(path, num_merges=len(merges))


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """ImageBind finds the end of a text at the largest id: the end-of-text id must be the largest, and every id must
    fit the model's `text_vocab_size`."""
    eot = tokenizer.eos_token_id
    if eot is None or tokenizer.bos_token_id is None:
        raise ValueError("The ImageBind tokenizer needs `<|startoftext|>` / `<|endoftext|>` (bos/eos) tokens.")
    if eot != len(tokenizer) - 1:
        raise ValueError(
            f"The ImageBind tokenizer's end-of-text id ({eot}) must be its largest id ({len(tokenizer) - 1}): "
            "ImageBind pools the text at the argmax of the ids."
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The ImageBind tokenizer has {len(tokenizer)} tokens but the model's `text_vocab_size` is {vocab_size}."
        )


# ------------------------------------------------------------------------------------------------ modalities


@dataclass(frozen=True)
class BoundModality:
    """A modality bound to images.

    Args:
        name (`str`): ``"text"``, ``"audio"``.
        input_name (`str`): keyword of `ImageBindModel.forward` its preprocessed batch goes to.
        output_name (`str`): field of `ImageBindOutput` holding its embeddings.
        parameter_prefix (`str`): prefix of the names of its tower's parameters (for ``--trainable_modalities``).
        preprocess (`Callable`): ``(processor, list of raw items) -> batch tensor`` (texts, audio paths/waveforms).
    """

    name: str
    input_name: str
    output_name: str
    parameter_prefix: str
    preprocess: Callable[[ImageBindProcessor, list], torch.Tensor]


BOUND_MODALITIES: dict[str, BoundModality] = {
    "text": BoundModality("text", "input_ids", "text_embeds", "text_", lambda p, items: p.tokenize(list(items))),
    "audio": BoundModality(
        "audio", "audio_features", "audio_embeds", "audio_", lambda p, items: p.preprocess_audio(list(items))
    ),
}
TOWERS: tuple[str, ...] = ("vision",) + tuple(BOUND_MODALITIES)


@dataclass(frozen=True)
class BindingPair:
    """One (image, x) training pair.

    Args:
        modality (`str`): a key of `BOUND_MODALITIES`.
        image (`str` or `PIL.Image.Image`): an image file or an image.
        other: the paired input as the processor takes it (a text; an audio path or ``(waveform, sample_rate)``).
        image_key (`str`), other_key (`str`): identities; pairs sharing either are positives of each other.
    """

    modality: str
    image: Any
    other: Any
    image_key: str
    other_key: str


def _key_ids(keys: Sequence[str]) -> torch.Tensor:
    """Equal keys get equal ids."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys])


def contrastive_loss(
    image_embeds: torch.Tensor, other_embeds: torch.Tensor, image_keys: Sequence[str], other_keys: Sequence[str]
) -> torch.Tensor:
    """
    ImageBind's symmetric InfoNCE between images and another modality.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`): L2-normalised image embeddings (the anchor).
        other_embeds (`torch.Tensor` of shape `(N, D)`): the paired embeddings, normalised and multiplied by their
            logit scale (1 / temperature), as `ImageBindModel` returns them.
        image_keys, other_keys (`Sequence[str]`): identities of the N images and paired inputs; ``(i, j)`` is a positive
            when image ``i`` equals image ``j`` or input ``i`` equals input ``j`` (the diagonal always is).

    Returns:
        `torch.Tensor`: the mean of the image→other and other→image cross-entropies (soft targets spread evenly over
        the positives).
    """
    n = image_embeds.shape[0]
    if other_embeds.shape != image_embeds.shape or len(image_keys) != n or len(other_keys) != n:
        raise ValueError(
            f"`image_embeds` {tuple(image_embeds.shape)}, `other_embeds` {tuple(other_embeds.shape)}, "
            f"{len(image_keys)} image keys and {len(other_keys)} other keys must describe the same N pairs."
        )
    image_ids, other_ids = _key_ids(image_keys), _key_ids(other_keys)
    positives = (image_ids[:, None] == image_ids[None, :]) | (other_ids[:, None] == other_ids[None, :])
    targets = positives.float().to(image_embeds.device)
    targets = targets / targets.sum(dim=1, keepdim=True)
    logits = image_embeds.float() @ other_embeds.float().T
    # `positives` is symmetric, so the same targets serve both directions.
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class ImageBindWithAttributeHeads(torch.nn.Module):
    """An `ImageBindModel` and linear read-outs of the scene attributes from its image embedding (training only).

    Args:
        encoder ([`ImageBindModel`]): the model being trained.
        num_classes (`Sequence[int]`, defaults to `ATTRIBUTE_CLASSES`): classes of each attribute.
        embed_scale (`float`, defaults to 1.0): the heads read ``embed_scale`` times the (unit-norm) image embedding.
            On a unit vector a linear head is only confident with large weights, which weight decay holds back, so
            the read-out stays soft; at the norm the pipeline feeds the LLM (20) it can be exact.
    """

    def __init__(
        self, encoder: ImageBindModel, num_classes: Sequence[int] = ATTRIBUTE_CLASSES, embed_scale: float = 1.0
    ):
        super().__init__()
        if isinstance(embed_scale, bool) or not isinstance(embed_scale, (int, float)) or not embed_scale > 0:
            raise ValueError(f"`embed_scale` must be a positive number, got {embed_scale!r}.")
        self.encoder = encoder
        self.num_classes = tuple(num_classes)
        self.embed_scale = float(embed_scale)
        self.attribute_heads = torch.nn.Linear(encoder.config.out_embed_dim, sum(self.num_classes))

    def attribute_heads_file(self) -> AttributeHeads:
        """The read-outs as an [`AttributeHeads`] (saved as ``attribute_heads.safetensors`` after training)."""
        return AttributeHeads(
            weight=self.attribute_heads.weight.detach().cpu(),
            bias=self.attribute_heads.bias.detach().cpu(),
            num_classes=self.num_classes,
            embed_scale=self.embed_scale,
            class_names=ATTRIBUTE_CLASS_NAMES if self.num_classes == ATTRIBUTE_CLASSES else None,
        )

    def forward(self, pixel_values: torch.Tensor, **inputs) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """The encoder's output and one ``(N, num_classes[k])`` logits tensor per attribute of the N images."""
        output = self.encoder(pixel_values=pixel_values, **inputs)
        logits = self.attribute_heads(output.image_embeds.float() * self.embed_scale)
        return output, logits.split(self.num_classes, dim=-1)


def attribute_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every attribute read-out, averaged over the labels that are not `IGNORE_LABEL` (zero when
    all are: a batch of object images only).

    Args:
        logits (`Sequence[torch.Tensor]`): one ``(N, classes)`` tensor per attribute.
        labels (`torch.Tensor` of shape `(N, len(logits))`): class indices or `IGNORE_LABEL`.
    """
    if labels.ndim != 2 or labels.shape != (logits[0].shape[0], len(logits)):
        raise ValueError(
            f"`labels` must have shape (N, {len(logits)}) for {logits[0].shape[0]} images, got {tuple(labels.shape)}."
        )
    labels = labels.to(logits[0].device)
    total = sum(
        F.cross_entropy(field, labels[:, k], ignore_index=IGNORE_LABEL, reduction="sum")
        for k, field in enumerate(logits)
    )
    return total / (labels != IGNORE_LABEL).sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ data


# The labels of an image that is not a scene (an object image): nothing to read.
NO_ATTRIBUTE_LABELS = torch.full((len(ATTRIBUTE_CLASSES),), IGNORE_LABEL, dtype=torch.long)


def _item(processor: ImageBindProcessor, pair: BindingPair) -> dict[str, Any]:
    modality = BOUND_MODALITIES[pair.modality]
    return {
        "pixel_values": processor.preprocess_image(pair.image)[0],
        "other": modality.preprocess(processor, [pair.other])[0],
        "image_key": pair.image_key,
        "other_key": pair.other_key,
    }


def collate_pairs(samples: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Stacks each modality's pairs of a batch: ``{modality: {pixel_values, other, image_keys, other_keys}}``, plus
    ``labels`` (`ATTRIBUTE_FIELDS` classes of each image) when every pair has them. A sample holds one pair per
    modality, or a list of pairs (kept next to each other)."""
    batch = {}
    for name in BOUND_MODALITIES:
        items = [item for s in samples if name in s for item in (s[name] if isinstance(s[name], list) else [s[name]])]
        if items:
            batch[name] = {
                "pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "other": torch.stack([item["other"] for item in items]),
                "image_keys": [item["image_key"] for item in items],
                "other_keys": [item["other_key"] for item in items],
            }
            if all("labels" in item for item in items):
                batch[name]["labels"] = torch.stack([item["labels"] for item in items])
    return batch


class ShapesWorldPairs(Dataset):
    """
    ShapesWorld pairs rendered on the fly: each sample holds a text pair (a scene and its caption, or with
    ``object_text_fraction`` an object image and "an image of a red star") and an audio pair (an object image and one
    of ``sound_variants`` recordings of its sound). Indexed by ``(epoch, index)``; every random choice comes from
    ``(seed, epoch, index)``. Every pair carries the `ATTRIBUTE_FIELDS` labels of its image (``labels``: a scene's
    attributes, its colours ignored in grayscale; all ignored for an object image).

    Args:
        processor ([`ImageBindProcessor`]): with a tokenizer.
        num_examples (`int`): samples per epoch.
        seed (`int`): data seed.
        image_size (`int`, defaults to 64): render size (the processor then resizes to the model's).
        sound_variants (`Sequence[int]`, defaults to `range(8)`): recording numbers drawn from; recording ``v`` of a
            kind is the same clip everywhere (seeded by ``(sound_seed, shape, colour, v)``).
        sound_seed (`int`, defaults to 0): seed of the recordings.
        object_text_fraction (`float`, defaults to 0.25): share of text pairs showing a single object.
        hard_negative_fraction (`float`, defaults to 0.0): share of scene pairs that come with a second scene pair
            differing from the first in exactly one attribute (one object's shape or colour, or the background). The
            two land in the same batch, so the contrastive loss has to tell them apart: every attribute must be
            encoded, not just the ones that are enough to tell random scenes apart.
        grayscale_fraction (`float`, defaults to 0.0): share of scene pairs shown in grayscale and captioned without
            colours ("a circle on the left, on a striped background"). Shape must then be read from form alone, which
            pushes the image features for shape not to depend on colour, so that they carry over to shape/colour
            combinations never seen in training (measured on ShapesWorld: a small gain, see the README).
            Grayscale pairs come without twins.
        random_gray_levels (`bool`, defaults to `False`): in grayscale pairs, paint each object in a gray level drawn
            at random (at least `GRAY_LEVEL_MARGIN` from the background's levels) instead of its colour's luminance.
            A plain grayscale render still tells colours apart by brightness (an orange object is the only one at
            its level), so a shape/colour pair never seen in training is also a shape/brightness pair never seen;
            random levels cut that link while showing no colour at all.
        exclude_heldout (`bool`, defaults to `True`): never draw the generator's held-out combinations.
        sample_rate (`int`, defaults to 16000), sound_duration (`float`, defaults to 2.0): the recordings.
    """

    def __init__(
        self,
        processor: ImageBindProcessor,
        num_examples: int,
        seed: int,
        image_size: int = 64,
        sound_variants: Sequence[int] = range(8),
        sound_seed: int = 0,
        object_text_fraction: float = 0.25,
        hard_negative_fraction: float = 0.0,
        grayscale_fraction: float = 0.0,
        random_gray_levels: bool = False,
        exclude_heldout: bool = True,
        sample_rate: int = 16000,
        sound_duration: float = 2.0,
    ):
        if processor.tokenizer is None:
            raise ValueError("ShapesWorldPairs needs an ImageBindProcessor with a tokenizer (for the captions).")
        self.processor = processor
        self.num_examples = num_examples
        self.seed = seed
        self.image_size = image_size
        self.sound_variants = tuple(sound_variants)
        self.sound_seed = sound_seed
        self.object_text_fraction = object_text_fraction
        self.hard_negative_fraction = hard_negative_fraction
        self.grayscale_fraction = grayscale_fraction
        self.random_gray_levels = random_gray_levels
        self.sample_rate = sample_rate
        self.sound_duration = sound_duration
        excluded = HELDOUT_COMBINATIONS if exclude_heldout else frozenset()
        self.excluded = excluded
        self.kinds = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in excluded]
        self._sounds: dict[tuple[str, str, int], torch.Tensor] = {}
        self._objects: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_examples

    def object_pixels(self, shape: str, colour: str) -> torch.Tensor:
        if (shape, colour) not in self._objects:
            image = render_object(shape, colour, self.image_size)
            self._objects[(shape, colour)] = self.processor.preprocess_image(image)[0]
        return self._objects[(shape, colour)]

    def sound_features(self, shape: str, colour: str, variant: int) -> torch.Tensor:
        """Filter banks of recording ``variant`` (cached: a finite pool of clips)."""
        key = (shape, colour, variant)
        if key not in self._sounds:
            rng = np.random.default_rng([self.sound_seed, SHAPES.index(shape), COLOURS.index(colour), variant])
            waveform = synthesize_sound(shape, colour, self.sample_rate, self.sound_duration, rng)
            features = self.processor.preprocess_audio((waveform, self.sample_rate))[0]
            # A recording no longer than one clip yields the same clip several times (equal up to float rounding),
            # whose mean embedding is that of one clip: keep one, a third of the audio compute. Every recording has
            # the same length, so batches still stack.
            if len(set(self.processor.clip_boundaries(len(waveform)))) == 1:
                features = features[:1]
            self._sounds[key] = features
        return self._sounds[key]

    def gray_fills(self, scene: Scene, rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
        """A random gray level per object of ``scene``, each at least `GRAY_LEVEL_MARGIN` from its background's."""
        levels = np.arange(256)
        distance = np.abs(levels[:, None] - np.array(background_levels(scene.background))).min(axis=1)
        levels = levels[distance >= GRAY_LEVEL_MARGIN]
        return {obj.slot: (int(v),) * 3 for obj, v in zip(scene.objects, rng.choice(levels, len(scene.objects)))}

    def scene_pair(
        self, scene: Scene, grayscale: bool = False, fills: Optional[dict[str, tuple[int, int, int]]] = None
    ) -> dict[str, Any]:
        """The scene's render and caption; ``grayscale``: a grayscale render and a caption without colours;
        ``fills``: objects painted in these RGB values (see `render_scene`)."""
        image = render_scene(scene, self.image_size, fills=fills)
        text = shape_caption(scene) if grayscale else caption(scene)
        pixels = self.processor.preprocess_image(image.convert("L").convert("RGB") if grayscale else image)[0]
        return {
            "pixel_values": pixels,
            "other": self.processor.tokenize(text)[0],
            "image_key": text,
            "other_key": text,
            "labels": torch.tensor(attribute_labels(scene, colours=not grayscale)),
        }

    def minimal_edit(self, scene: Scene, rng: np.random.Generator) -> Scene | None:
        """``scene`` with one attribute changed (an object's shape or colour, or the background), drawn among the
        changes that stay out of the excluded combinations; `None` when there is none."""
        edits = [replace(scene, background=b) for b in BACKGROUNDS if b != scene.background]
        for obj in scene.objects:
            others = [o for o in scene.objects if o is not obj]
            edits += [replace(scene, objects=others + [replace(obj, shape=s)]) for s in SHAPES if s != obj.shape]
            edits += [replace(scene, objects=others + [replace(obj, colour=c)]) for c in COLOURS if c != obj.colour]
        edits = [edit for edit in edits if not edit.combinations() & self.excluded]
        return edits[int(rng.integers(len(edits)))] if edits else None

    def text_pairs(self, rng: np.random.Generator, twins: bool = True) -> list[dict[str, Any]]:
        """One text pair, or (``twins`` on, with ``hard_negative_fraction``) a scene pair and its minimally edited twin."""
        if rng.random() < self.object_text_fraction:
            shape, colour = self.kinds[int(rng.integers(len(self.kinds)))]
            text = object_image_caption(shape, colour)
            pixels = self.object_pixels(shape, colour)
            return [
                {
                    "pixel_values": pixels,
                    "other": self.processor.tokenize(text)[0],
                    "image_key": text,
                    "other_key": text,
                    "labels": NO_ATTRIBUTE_LABELS,
                }
            ]
        while True:  # rejection keeps the distribution of the generator's train split
            scene = random_scenes(rng, 1)[0]
            if not scene.combinations() & self.excluded:
                break
        # Drawn only when enabled, so that builds without grayscale pairs keep their random stream.
        if self.grayscale_fraction and rng.random() < self.grayscale_fraction:
            fills = self.gray_fills(scene, rng) if self.random_gray_levels else None
            return [self.scene_pair(scene, grayscale=True, fills=fills)]
        pairs = [self.scene_pair(scene)]
        if twins and self.hard_negative_fraction and rng.random() < self.hard_negative_fraction:
            twin = self.minimal_edit(scene, rng)
            if twin is not None:
                pairs.append(self.scene_pair(twin))
        return pairs

    def audio_pair(self, shape: str, colour: str, variant: int) -> dict[str, Any]:
        kind = f"{colour} {shape}"
        return {
            "pixel_values": self.object_pixels(shape, colour),
            "other": self.sound_features(shape, colour, variant),
            "image_key": kind,
            "other_key": kind,  # recordings of one kind are interchangeable
            "labels": NO_ATTRIBUTE_LABELS,
        }

    def __getitem__(self, item: tuple[int, int]) -> dict[str, dict[str, Any]]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        rng = np.random.default_rng([self.seed, epoch, index])
        shape, colour = self.kinds[int(rng.integers(len(self.kinds)))]
        variant = self.sound_variants[int(rng.integers(len(self.sound_variants)))]
        return {"text": self.text_pairs(rng), "audio": self.audio_pair(shape, colour, variant)}


class PairsDataset(Dataset):
    """Explicit (image, x) pairs, one per sample, preprocessed when read. Indexed by ``(epoch, index)`` or ``index``.

    Args:
        pairs (`list[BindingPair]`): the pairs.
        processor ([`ImageBindProcessor`]): with a tokenizer when there are text pairs.
    """

    def __init__(self, pairs: list[BindingPair], processor: ImageBindProcessor):
        if not pairs:
            raise ValueError("No training pairs.")
        self.pairs = pairs
        self.processor = processor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item) -> dict[str, dict[str, Any]]:
        index = item[1] if isinstance(item, tuple) else item
        pair = self.pairs[index]
        return {pair.modality: _item(self.processor, pair)}


def read_pairs_file(path: str) -> list[BindingPair]:
    """
    Pairs from a JSON Lines file: ``{"image": path, "text": str}`` or ``{"image": path, "audio": path}`` per line,
    paths relative to the file's folder. Errors name the file and line.
    """
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{where}: expected an object with an \"image\" path and a \"text\" or \"audio\".")
            others = [name for name in BOUND_MODALITIES if name in record]
            if len(others) != 1 or not isinstance(record[others[0]], str):
                raise ValueError(
                    f"{where}: needs exactly one of {sorted(BOUND_MODALITIES)} (a string) next to \"image\", got "
                    f"keys {sorted(record)}."
                )
            modality = others[0]
            image = os.path.join(root, record["image"])
            if not os.path.isfile(image):
                raise ValueError(f"{where}: image file {image!r} does not exist.")
            other = record[modality]
            if modality != "text":
                other = os.path.join(root, other)
                if not os.path.isfile(other):
                    raise ValueError(f"{where}: {modality} file {other!r} does not exist.")
            pairs.append(BindingPair(modality, image, other, record["image"], f"{modality}:{record[modality]}"))
    if not pairs:
        raise ValueError(f"{path}: no pairs.")
    return pairs


def shapes_folder_pairs(data_dir: str, split: str) -> list[BindingPair]:
    """Pairs of a generated ShapesWorld dataset split: every scene image with its caption (``scenes.json``) and
    every sound input with an image of its object (``instruction.json``; object images are rendered at the dataset's
    image size when the dataset has no file for them)."""
    split_dir = os.path.join(data_dir, split)
    for name in ("scenes.json", "instruction.json"):
        if not os.path.isfile(os.path.join(split_dir, name)):
            raise ValueError(f"{os.path.join(split_dir, name)!r} does not exist: not a ShapesWorld dataset split.")
    with open(os.path.join(data_dir, "dataset_info.json"), encoding="utf-8") as f:
        image_size = int(json.load(f)["image_size"])
    with open(os.path.join(split_dir, "scenes.json"), encoding="utf-8") as f:
        scenes = json.load(f)
    with open(os.path.join(split_dir, "instruction.json"), encoding="utf-8") as f:
        records = json.load(f)
    pairs = [
        BindingPair("text", os.path.join(data_dir, s["path"]), s["caption"], s["path"], s["caption"]) for s in scenes
    ]
    sounds = {}
    for record in records:
        for item in record["media"]:
            if item["kind"] == "audio":
                sounds[item["path"]] = (item["object"]["shape"], item["object"]["colour"])
    for path, (shape, colour) in sorted(sounds.items()):
        object_file = os.path.join(data_dir, "media", "objects", f"{colour}-{shape}.png")
        image = object_file if os.path.isfile(object_file) else render_object(shape, colour, image_size)
        kind = f"{colour} {shape}"
        pairs.append(BindingPair("audio", image, os.path.join(data_dir, path), kind, kind))
    return pairs


def shapes_eval_pairs(dataset: ShapesWorldPairs, num_scenes: int, variants: Sequence[int], seed: int) -> list[dict]:
    """Held-out ShapesWorld samples: ``num_scenes`` fresh scene/caption pairs (a random stream training never uses)
    and every object kind with each of ``variants`` (recordings never used in training)."""
    rng = np.random.default_rng([seed, 0x5EED, 1, 0])  # 4 words: disjoint from the (seed, epoch, index) streams
    samples = []
    for _ in range(num_scenes):
        samples.append({"text": dataset.text_pairs(rng, twins=False)[0]})
    for shape, colour in dataset.kinds:
        for variant in variants:
            samples.append({"audio": dataset.audio_pair(shape, colour, variant)})
    return samples


# ------------------------------------------------------------------------------------------------ retrieval


@torch.no_grad()
def retrieval_accuracy(model: ImageBindModel, batch: dict[str, dict[str, Any]], chunk: int = 64) -> dict[str, float]:
    """
    Top-1 retrieval on held-out pairs, per bound modality: ``image_to_<m>`` (each image picks the most similar of
    all the batch's inputs of modality m; right when it picks one equal to its own) and ``<m>_to_image``.

    Args:
        model ([`ImageBindModel`]): the model (put in eval mode for the measurement).
        batch (`dict`): collated pairs (`collate_pairs`).
        chunk (`int`, defaults to 64): encoding batch size.

    Returns:
        `dict[str, float]`, plus ``num_<m>_pairs``.
    """
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        for name, pairs in batch.items():
            modality = BOUND_MODALITIES[name]
            images = _encode_in_chunks(model, "pixel_values", "image_embeds", pairs["pixel_values"], chunk)
            others = _encode_in_chunks(model, modality.input_name, modality.output_name, pairs["other"], chunk)
            # Audio embeddings average normalised clips (norms differ): compare directions only.
            others = F.normalize(others, dim=-1)
            similarity = images @ others.T
            image_keys, other_keys = pairs["image_keys"], pairs["other_keys"]
            picked_other = similarity.argmax(dim=1).tolist()
            picked_image = similarity.argmax(dim=0).tolist()
            n = len(image_keys)
            results[f"image_to_{name}"] = sum(other_keys[j] == other_keys[i] for i, j in enumerate(picked_other)) / n
            results[f"{name}_to_image"] = sum(image_keys[j] == image_keys[i] for i, j in enumerate(picked_image)) / n
            results[f"num_{name}_pairs"] = n
    finally:
        model.train(was_training)
    return results


def _encode_in_chunks(model, input_name: str, output_name: str, values: torch.Tensor, chunk: int) -> torch.Tensor:
    rows = [getattr(model(**{input_name: values[i : i + chunk]}), output_name) for i in range(0, len(values), chunk)]
    return torch.cat(rows).float()


def format_retrieval(results: dict[str, float]) -> str:
    parts = [f"{k} {v:.1%}" for k, v in results.items() if not k.startswith("num_")]
    counts = ", ".join(f"{v} {k[4:-6]}" for k, v in results.items() if k.startswith("num_"))
    return f"Top-1 retrieval on held-out pairs ({counts} pairs): " + ", ".join(parts)


# ------------------------------------------------------------------------------------------------ script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_image_encoder", type=str, default=None, help="An ImageBindModel folder to train.")
    model.add_argument(
        "--image_encoder_config",
        type=str,
        default=None,
        help="An ImageBindModel config.json (file or folder) to train from scratch. Default without a pretrained "
        "encoder: the small ShapesWorld configuration (SHAPES_WORLD_IMAGEBIND_CONFIG).",
    )
    model.add_argument(
        "--imagebind_tokenizer",
        type=str,
        default=None,
        help="CLIP BPE merges file (bpe_simple_vocab_16e6.txt.gz) or tokenizer folder; default from scratch: the "
        "ShapesWorld tokenizer (see above). Required to fine-tune a pretrained encoder on text.",
    )
    model.add_argument(
        "--trainable_modalities",
        nargs="+",
        default=list(TOWERS),
        choices=TOWERS,
        help="Towers to train; the others stay frozen (ImageBind: only the new modality's).",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data",
        type=str,
        default=None,
        help="A pairs .jsonl file or a generated ShapesWorld folder; default: ShapesWorld rendered on the fly.",
    )
    data.add_argument("--split", type=str, default="train", help="Split of a ShapesWorld --train_data folder.")
    data.add_argument(
        "--eval_data",
        type=str,
        default=None,
        help="Held-out pairs (.jsonl or ShapesWorld folder, whose 'val' split is used); default: see the data notes.",
    )
    data.add_argument("--num_eval_pairs", type=int, default=256, help="Held-out scene/caption (or .jsonl) pairs.")
    data.add_argument("--num_train_pairs", type=int, default=20000, help="On-the-fly ShapesWorld samples per epoch.")
    data.add_argument("--sound_variants", type=int, default=8, help="Training recordings per object kind (on the fly).")
    data.add_argument("--eval_sound_variants", type=int, default=2, help="Held-out recordings per object kind.")
    data.add_argument("--object_text_fraction", type=float, default=0.25, help="Object image ↔ text share.")
    data.add_argument(
        "--hard_negative_fraction",
        type=float,
        default=0.0,
        help="Share of on-the-fly scene pairs joined by a twin that differs in one attribute (a hard negative).",
    )
    data.add_argument(
        "--grayscale_fraction",
        type=float,
        default=0.0,
        help="Share of on-the-fly scene pairs shown in grayscale with a caption without colours.",
    )
    data.add_argument(
        "--random_gray_levels",
        action="store_true",
        help="Paint each object of a grayscale pair in a random gray level, not its colour's brightness.",
    )
    data.add_argument(
        "--attribute_loss_weight",
        type=float,
        default=0.0,
        help="Weight of the attribute read-out loss on the image embedding (on-the-fly ShapesWorld; see above).",
    )
    data.add_argument(
        "--attribute_embed_scale",
        type=float,
        default=1.0,
        help="The attribute read-outs read this multiple of the unit-norm image embedding (20: the LLM's input norm).",
    )
    data.add_argument("--include_heldout", action="store_true", help="Also draw the generator's held-out combinations.")
    data.add_argument("--image_size", type=int, default=64, help="Render size of on-the-fly ShapesWorld images.")
    data.add_argument(
        "--retrieval_steps", type=int, default=None, help="Also measure (print and log) retrieval every N steps."
    )
    training_utils.add_common_training_args(parser, learning_rate=5e-4, train_batch_size=64)
    args = training_utils.check_common_args(parser.parse_args(argv))

    if args.image_encoder_config is not None and args.pretrained_image_encoder is not None:
        raise ValueError(
            "Pass either `--image_encoder_config` (from scratch) or `--pretrained_image_encoder`, not both."
        )
    for name in ("num_eval_pairs", "num_train_pairs", "sound_variants", "eval_sound_variants", "retrieval_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    for name in ("object_text_fraction", "hard_negative_fraction", "grayscale_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"`--{name}` must lie in [0, 1], got {getattr(args, name)}.")
    if args.random_gray_levels and not args.grayscale_fraction:
        raise ValueError("`--random_gray_levels` paints grayscale pairs: it needs `--grayscale_fraction` > 0.")
    if args.train_batch_size < 2:
        raise ValueError("`--train_batch_size` must be at least 2: contrastive learning needs negatives.")
    if not args.attribute_loss_weight >= 0.0:
        raise ValueError(f"`--attribute_loss_weight` must be >= 0, got {args.attribute_loss_weight}.")
    if not args.attribute_embed_scale > 0.0:
        raise ValueError(f"`--attribute_embed_scale` must be > 0, got {args.attribute_embed_scale}.")
    if args.attribute_embed_scale != 1.0 and not args.attribute_loss_weight:
        raise ValueError(
            "`--attribute_embed_scale` scales the attribute read-outs: it needs `--attribute_loss_weight` > 0."
        )
    if args.attribute_loss_weight and args.train_data is not None:
        raise ValueError(
            "`--attribute_loss_weight` needs ShapesWorld rendered on the fly (no `--train_data`): only those pairs "
            "carry scene labels."
        )
    if args.attribute_loss_weight and "vision" not in args.trainable_modalities:
        raise ValueError(
            "`--attribute_loss_weight` trains the image embedding: add `vision` to `--trainable_modalities`."
        )
    for name in ("train_data", "eval_data"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            raise ValueError(f"`--{name}` {path!r} does not exist.")
    return args


def _is_shapes_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def _pairs_from(path: str, split: str) -> list[BindingPair]:
    return shapes_folder_pairs(path, split) if _is_shapes_folder(path) else read_pairs_file(path)


def load_pairs(args: argparse.Namespace) -> tuple[list[BindingPair] | None, list[BindingPair] | None]:
    """``(training pairs, held-out pairs)`` from ``--train_data`` / ``--eval_data``; ``None`` where ShapesWorld is
    drawn on the fly instead (see the module docstring)."""
    eval_pairs = None if args.eval_data is None else _pairs_from(args.eval_data, "val")
    if args.train_data is None:
        return None, eval_pairs
    pairs = _pairs_from(args.train_data, args.split)
    if eval_pairs is None and _is_shapes_folder(args.train_data):
        eval_pairs = _pairs_from(args.train_data, "val")
    elif eval_pairs is None:
        if len(pairs) <= args.num_eval_pairs:
            raise ValueError(
                f"`--train_data` has {len(pairs)} pairs: not enough to hold out `--num_eval_pairs` "
                f"{args.num_eval_pairs} for retrieval; lower it or pass `--eval_data`."
            )
        pairs, eval_pairs = pairs[: -args.num_eval_pairs], pairs[-args.num_eval_pairs :]
    return pairs, eval_pairs


def build_datasets(
    args: argparse.Namespace,
    processor: ImageBindProcessor,
    pairs: list[BindingPair] | None,
    eval_pairs: list[BindingPair] | None,
) -> tuple[Dataset, list[dict]]:
    """The training dataset and the held-out samples."""
    if pairs is not None:
        dataset = PairsDataset(pairs, processor)
        return dataset, [{pair.modality: _item(processor, pair)} for pair in eval_pairs]
    dataset = ShapesWorldPairs(
        processor,
        args.num_train_pairs,
        args.seed,
        image_size=args.image_size,
        sound_variants=range(args.sound_variants),
        sound_seed=args.seed,
        object_text_fraction=args.object_text_fraction,
        hard_negative_fraction=args.hard_negative_fraction,
        grayscale_fraction=args.grayscale_fraction,
        random_gray_levels=args.random_gray_levels,
        exclude_heldout=not args.include_heldout,
    )
    if eval_pairs is not None:
        return dataset, [{pair.modality: _item(processor, pair)} for pair in eval_pairs]
    held_out = range(args.sound_variants, args.sound_variants + args.eval_sound_variants)
    return dataset, shapes_eval_pairs(dataset, args.num_eval_pairs, held_out, args.seed)


def _from_scratch(args: argparse.Namespace) -> bool:
    if args.pretrained_image_encoder is not None:
        return False
    return args.image_encoder_config is not None or training_utils.component_source(args, "image_encoder") is None


def load_image_encoder(args: argparse.Namespace, tokenizer) -> ImageBindModel:
    """A pretrained encoder (``--pretrained_image_encoder`` / ``--pipeline``), or a new one from
    ``--image_encoder_config`` (default `SHAPES_WORLD_IMAGEBIND_CONFIG`) whose `text_vocab_size` is the tokenizer's
    size."""
    if not _from_scratch(args):
        return training_utils.load_component(args, "image_encoder", ImageBindModel.from_pretrained)
    if args.image_encoder_config is not None:
        config = dict(ImageBindModel.load_config(args.image_encoder_config))
    else:
        config = dict(SHAPES_WORLD_IMAGEBIND_CONFIG)
    if tokenizer is not None:
        config["text_vocab_size"] = len(tokenizer)
    return ImageBindModel.from_config(config)


def build_tokenizer(args: argparse.Namespace, needs_text: bool):
    """``--imagebind_tokenizer``, or `shapes_world_tokenizer` for a new encoder; ``None`` without text."""
    if args.imagebind_tokenizer is not None:
        return load_clip_tokenizer(args.imagebind_tokenizer)
    if not needs_text:
        return None
    if not _from_scratch(args):
        raise ValueError(
            "Fine-tuning a pretrained encoder on text needs the tokenizer it was trained with: pass "
            "`--imagebind_tokenizer`."
        )
    return shapes_world_tokenizer()


def freeze_towers(model: ImageBindModel, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """Sets ``requires_grad`` by tower (parameter-name prefix) and returns the trainable parameters."""
    prefixes = {"vision": "vision_", **{name: m.parameter_prefix for name, m in BOUND_MODALITIES.items()}}
    params = []
    for name, param in model.named_parameters():
        tower = next((t for t, prefix in prefixes.items() if name.startswith(prefix)), None)
        param.requires_grad_(tower in trainable)
        if param.requires_grad:
            params.append(param)
    return params


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Runs the training; returns the training summary (see `write_training_summary`) with the retrieval results."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    pairs, eval_pairs = load_pairs(args)
    needs_text = any(p.modality == "text" for p in (pairs or []) + (eval_pairs or [])) or pairs is None
    tokenizer = build_tokenizer(args, needs_text)
    accelerator = training_utils.make_accelerator(args, find_unused_parameters=pairs is not None)
    model = load_image_encoder(args, tokenizer)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.text_vocab_size)
    params = freeze_towers(model, args.trainable_modalities)
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    processor = ImageBindProcessor.for_model(model, tokenizer=tokenizer)
    dataset, eval_samples = build_datasets(args, processor, pairs, eval_pairs)
    trained = model
    if args.attribute_loss_weight:
        trained = ImageBindWithAttributeHeads(model, embed_scale=args.attribute_embed_scale)
        params = params + list(trained.attribute_heads.parameters())
    setup = training_utils.prepare_training(
        accelerator, args, trained, params, dataset, collate_fn=collate_pairs, tracker_name="train_imagebind"
    )

    # A pair is only worth encoding when a tower it goes through is trained.
    active = [n for n in BOUND_MODALITIES if "vision" in args.trainable_modalities or n in args.trainable_modalities]

    def compute_loss(batch: dict[str, dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        names = [n for n in batch if n in active]
        # Zero times the trained parameters keeps a graph when no modality has two pairs in this (small) batch.
        loss = sum(p.sum() for p in params) * 0.0
        if not names:
            return loss, {}
        # Each distinct image is encoded once (object images recur within a batch), and everything goes through one
        # forward, so data-parallel gradient synchronisation sees one call.
        keys = [f"{n}:{key}" for n in names for key in batch[n]["image_keys"]]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        unique = list(first.values())
        pixel_values = torch.cat([batch[n]["pixel_values"] for n in names])[unique]
        inputs = {BOUND_MODALITIES[n].input_name: batch[n]["other"] for n in names}
        output = setup.model(pixel_values=pixel_values, **inputs)
        logs = {}
        if args.attribute_loss_weight:
            output, logits = output
            labels = torch.cat([batch[n]["labels"] for n in names])[unique]
            read_loss = attribute_loss(logits, labels)
            loss = loss + args.attribute_loss_weight * read_loss
            logs["loss_attributes"] = read_loss.item()
        position = {key: i for i, key in enumerate(first)}
        gather = torch.tensor([position[key] for key in keys], device=output.image_embeds.device)
        image_embeds = output.image_embeds[gather].split([len(batch[n]["image_keys"]) for n in names])
        for name, images in zip(names, image_embeds):
            if len(images) < 2:
                continue
            pair_loss = contrastive_loss(
                images, getattr(output, BOUND_MODALITIES[name].output_name), batch[name]["image_keys"],
                batch[name]["other_keys"],
            )  # fmt: skip
            loss = loss + pair_loss
            logs[f"loss_{name}"] = pair_loss.item()
        logs["text_logit_scale"] = components()["image_encoder"].text_log_logit_scale.exp().item()
        return loss, logs

    def components() -> dict:
        unwrapped = accelerator.unwrap_model(setup.model)
        return {"image_encoder": unwrapped.encoder if args.attribute_loss_weight else unwrapped}

    eval_batch = collate_pairs(eval_samples)

    def measure(step: int) -> dict:
        results = retrieval_accuracy(components()["image_encoder"], eval_batch)
        print(f"Step {step}. {format_retrieval(results)}")
        accelerator.log({f"retrieval/{k}": v for k, v in results.items() if "_to_" in k}, step=step)
        return results

    def on_step_end(step: int) -> None:
        if args.retrieval_steps and step % args.retrieval_steps == 0 and accelerator.is_main_process:
            measure(step)

    result = training_utils.run_training_loop(accelerator, args, setup, compute_loss, on_step_end)
    training_utils.save_trained_components(args, accelerator, **components())
    retrieval = {}
    if accelerator.is_main_process:
        if args.attribute_loss_weight:  # the read-outs, for `train_llm.py --attribute_reader`
            accelerator.unwrap_model(setup.model).attribute_heads_file().save(
                os.path.join(args.output_dir, ATTRIBUTE_HEADS_FILE)
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(args.output_dir, TOKENIZER_FOLDER))
        retrieval = measure(result.global_step)
        with open(os.path.join(args.output_dir, RETRIEVAL_FILE), "w", encoding="utf-8") as f:
            json.dump(retrieval, f, indent=1)
    summary = training_utils.finish_training(accelerator, args, result, components(), components)
    return {**summary, "retrieval": retrieval}


if __name__ == "__main__":
    main()
    sys.exit(0)
