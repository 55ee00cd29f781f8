#!/usr/bin/env python
"""Fit the attribute reader (linear heads) to a trained image encoder's embeddings of ShapesWorld scenes.

`train_imagebind.py --attribute_loss_weight` trains linear read-outs of the scene attributes (background, each slot's
shape and colour) *with* the encoder; their weights are those of its last step, fitted to embeddings that kept moving
under them (and to grayscale renders). This script fits fresh heads to the *final* encoder: it embeds every scene
image a split uses (``<data_dir>/<split>/scenes.json``), fits one softmax regression per field on the embeddings
rescaled to ``--embed_scale`` (cross-entropy, AdamW, seeded mini-batches) and reports how many scenes each split's
heads read exactly.

The reader also reads media that have no scene labels: object images (one shape on white) and sounds. An LLM trained
with the old reader learned what those read as, so by default the fit keeps them: ``--keep_reads_weight`` (1.0)
times the KL divergence from the old reader's class probabilities (the reader of ``--pretrained_mm_adapter``, else
of ``--pipeline``'s adapter, or ``--reference_heads``) to the new ones, over every object image and sound the split's
instructions use. Without it, on ShapesWorld's validation split the root's LLM lost 9 of 67 `add_image` captions
(the scenes themselves were read as well as before). The outputs: an ``attribute_heads.safetensors``
(`AttributeHeads`, class names included) that ``train_llm.py --attribute_reader`` reads, a ``reader_report.json``
and, with ``--save_adapter``, a copy of that adapter whose reader is the new heads
(`MultimodalAdapter.load_attribute_reader`); the build's ``reader`` stage runs it on the LLM stage's adapter.

The fit is a convex problem on some ten thousand embeddings held in memory, seconds on a CPU; it runs in one
process without accelerate. Only the split given by ``--split`` (default ``train``) is fitted; ``--eval_splits`` are
only read.

Example (ShapesWorld)::

    python training/fit_attribute_reader.py --pipeline . --data_dir build/shapesworld/data \\
        --output_dir build/shapesworld/reader --save_adapter build/shapesworld/reader/mm_adapter
"""

import argparse
import json
import logging
import os
import sys
from typing import Sequence

import torch
from PIL import Image

from diffusers_any2pix.data import media_kind
from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads, MultimodalAdapter
from diffusers_any2pix.processing_imagebind import ImageBindProcessor
from diffusers_any2pix.shapes.world import ATTRIBUTE_CLASS_NAMES, Scene, attribute_labels
from diffusers_any2pix.training_utils import load_component


logger = logging.getLogger(__name__)

REPORT_FILE = "reader_report.json"


def load_scenes(data_dir: str, split: str) -> tuple[list[str], torch.LongTensor]:
    """The scene images a split uses and their attribute labels.

    Args:
        data_dir (`str`): a ShapesWorld dataset root (`shapes.generate`'s ``--out``).
        split (`str`): a split folder under it with a ``scenes.json``.

    Returns:
        `tuple`: absolute image paths and a `(num_scenes, num_fields)` tensor of `attribute_labels`.
    """
    path = os.path.join(data_dir, split, "scenes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No `{split}/scenes.json` under `--data_dir` {data_dir!r} (a ShapesWorld root).")
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold a non-empty list of scenes.")
    paths, labels = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry or "scene" not in entry:
            raise ValueError(f"{path}, entry {i}: expected an object with `path` and `scene`, got {entry!r}.")
        paths.append(os.path.join(data_dir, entry["path"]))
        labels.append(attribute_labels(Scene.from_dict(entry["scene"])))
    return paths, torch.tensor(labels, dtype=torch.long)


def load_unlabelled_media(data_dir: str, split: str, scene_paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The images and sounds a split's instructions use that are not among its scenes (object images, sounds).

    Args:
        data_dir (`str`): a ShapesWorld dataset root.
        split (`str`): a split folder under it with an ``instruction.json``.
        scene_paths (`Sequence[str]`): the split's scene images (`load_scenes`), left out.

    Returns:
        `tuple`: sorted absolute paths of the images and of the audio files.
    """
    path = os.path.join(data_dir, split, "instruction.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No `{split}/instruction.json` under `--data_dir` {data_dir!r} (a ShapesWorld root).")
    with open(path) as f:
        records = json.load(f)
    scenes = set(scene_paths)
    images, audio = set(), set()
    for record in records:
        for medium in record.get("media", []):
            full = os.path.join(data_dir, medium["path"])
            kind = media_kind(full)
            if kind == "image" and full not in scenes:
                images.add(full)
            elif kind == "audio":
                audio.add(full)
    return sorted(images), sorted(audio)


def _embed_in_batches(model: ImageBindModel, paths: Sequence[str], batch_size: int, encode) -> torch.Tensor:
    """``encode(paths_of_one_batch)`` over ``paths`` in batches, concatenated as float32 on the CPU; an empty
    ``(0, out_embed_dim)`` tensor for no paths (e.g. a split without sounds)."""
    embeds = [encode(list(paths[i : i + batch_size])).float().cpu() for i in range(0, len(paths), batch_size)]
    return torch.cat(embeds) if embeds else torch.zeros(0, model.config.out_embed_dim)


@torch.no_grad()
def embed_images(
    model: ImageBindModel, processor: ImageBindProcessor, paths: Sequence[str], batch_size: int = 128
) -> torch.Tensor:
    """ImageBind embeddings (float32, on the CPU) of image files, in order.

    Args:
        model ([`ImageBindModel`]): the encoder.
        processor ([`ImageBindProcessor`]): its preprocessing.
        paths (`Sequence[str]`): image files.
        batch_size (`int`, *optional*, defaults to 128): images per forward pass.
    """

    def encode(batch: list[str]) -> torch.Tensor:
        images = []
        for path in batch:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as error:
                raise ValueError(f"Cannot read the image {path!r}: {error}") from error
        return model.encode_image(processor.preprocess_image(images).to(model.device, model.dtype))

    return _embed_in_batches(model, paths, batch_size, encode)


@torch.no_grad()
def embed_audio(
    model: ImageBindModel, processor: ImageBindProcessor, paths: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """ImageBind embeddings (float32, on the CPU) of audio files, in order (`embed_images`' twin for sound)."""

    def encode(batch: list[str]) -> torch.Tensor:
        return model.encode_audio(processor.preprocess_audio(batch).to(model.device, model.dtype))

    return _embed_in_batches(model, paths, batch_size, encode)


def fit_heads(
    embeds: torch.Tensor,
    labels: torch.LongTensor,
    num_classes: Sequence[int],
    embed_scale: float = 20.0,
    max_train_steps: int = 3000,
    train_batch_size: int = 512,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    class_names: Sequence[Sequence[str]] | None = None,
    keep_embeds: torch.Tensor | None = None,
    keep_probs: Sequence[torch.Tensor] | None = None,
    keep_weight: float = 1.0,
) -> AttributeHeads:
    """Fits one linear softmax read-out per field to embeddings rescaled to `embed_scale`.

    Args:
        embeds (`torch.Tensor`): `(N, embed_dim)` embeddings, at any norm.
        labels (`torch.LongTensor`): `(N, len(num_classes))` class indices (`IGNORE_LABEL` entries are skipped).
        num_classes (`Sequence[int]`): classes of each field.
        embed_scale (`float`, *optional*, defaults to 20.0): the norm the heads read (the adapter's
            `media_embed_norm`, so its reader gets the same logits).
        max_train_steps (`int`, *optional*, defaults to 3000): AdamW steps.
        train_batch_size (`int`, *optional*, defaults to 512): embeddings per step, drawn with replacement.
        learning_rate (`float`, *optional*, defaults to 3e-3), weight_decay (`float`, *optional*, defaults to 0.0):
            AdamW's.
        seed (`int`, *optional*, defaults to 0): seeds the initialisation and the draws (same seed, same heads).
        class_names (`Sequence[Sequence[str]]`, *optional*): stored in the heads (`AttributeHeads.class_names`).
        keep_embeds (`torch.Tensor`, *optional*), keep_probs (`Sequence[torch.Tensor]`, *optional*): unlabelled
            `(M, embed_dim)` embeddings and, per field, the `(M, num_classes[k])` probabilities they should keep
            (e.g. an old reader's): every step adds `keep_weight` times the KL divergence from them to the new
            read-outs, over all M.
        keep_weight (`float`, *optional*, defaults to 1.0): weight of that term.

    Returns:
        [`AttributeHeads`]: the fitted heads.
    """
    num_classes = [int(n) for n in num_classes]
    if embeds.ndim != 2 or labels.shape != (embeds.shape[0], len(num_classes)):
        raise ValueError(
            f"`labels` must be of shape ({embeds.shape[0]}, {len(num_classes)}) for `embeds` of shape "
            f"{tuple(embeds.shape)}, got {tuple(labels.shape)}."
        )
    for name, value in (("max_train_steps", max_train_steps), ("train_batch_size", train_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not embed_scale > 0 or not learning_rate > 0 or not weight_decay >= 0:
        raise ValueError(
            "`embed_scale` and `learning_rate` must be > 0 and `weight_decay` >= 0, got "
            f"{embed_scale!r}, {learning_rate!r}, {weight_decay!r}."
        )
    if (keep_embeds is None) != (keep_probs is None):
        raise ValueError("`keep_embeds` and `keep_probs` go together: pass both or neither.")
    if keep_embeds is not None:
        expected = [(keep_embeds.shape[0], n) for n in num_classes]
        if len(keep_probs) != len(num_classes) or [tuple(p.shape) for p in keep_probs] != expected:
            raise ValueError(
                f"`keep_probs` must hold one tensor per field of shapes {expected}, got "
                f"{[tuple(p.shape) for p in keep_probs]}."
            )
        if keep_embeds.ndim != 2 or keep_embeds.shape[1] != embeds.shape[1]:
            raise ValueError(f"`keep_embeds` must be of shape (M, {embeds.shape[1]}), got {tuple(keep_embeds.shape)}.")
        if not keep_weight >= 0:
            raise ValueError(f"`keep_weight` must be >= 0, got {keep_weight!r}.")
        keep_embeds = keep_embeds.detach().float()
        keep_inputs = keep_embeds / keep_embeds.norm(dim=-1, keepdim=True) * embed_scale
        keep_probs = [field.detach().float() for field in keep_probs]
    generator = torch.Generator().manual_seed(seed)
    embeds = embeds.detach().float()
    inputs = embeds / embeds.norm(dim=-1, keepdim=True) * embed_scale
    heads = torch.nn.Linear(inputs.shape[1], sum(num_classes))
    with torch.no_grad():  # nn.Linear's initialisation, from our generator
        bound = inputs.shape[1] ** -0.5
        heads.weight.uniform_(-bound, bound, generator=generator)
        heads.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=learning_rate, weight_decay=weight_decay)
    for _ in range(max_train_steps):
        batch = torch.randint(0, inputs.shape[0], (train_batch_size,), generator=generator)
        logits = heads(inputs[batch]).split(num_classes, dim=-1)
        loss = sum(
            torch.nn.functional.cross_entropy(field_logits, labels[batch, k]) for k, field_logits in enumerate(logits)
        )
        if keep_embeds is not None and keep_weight > 0 and len(keep_inputs):
            kept = heads(keep_inputs).split(num_classes, dim=-1)
            loss = loss + keep_weight * sum(
                torch.nn.functional.kl_div(field.log_softmax(-1), target, reduction="batchmean")
                for field, target in zip(kept, keep_probs)
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return AttributeHeads(
        weight=heads.weight.detach().clone(),
        bias=heads.bias.detach().clone(),
        num_classes=tuple(num_classes),
        embed_scale=float(embed_scale),
        class_names=None if class_names is None else tuple(tuple(field) for field in class_names),
    )


def reader_accuracy(heads: AttributeHeads, embeds: torch.Tensor, labels: torch.LongTensor) -> dict:
    """How the heads read labelled embeddings: ``exact`` (share of rows with every field right) and ``fields``
    (per-field accuracy), ignored labels counted as right."""
    with torch.no_grad():
        read = torch.stack([field.argmax(-1) for field in heads.logits(embeds)], dim=-1)
    right = read.eq(labels) | labels.lt(0)
    return {"exact": right.all(-1).float().mean().item(), "fields": right.float().mean(0).tolist()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=str, default=None, help="A pipeline folder (its image_encoder is used).")
    parser.add_argument("--pretrained_image_encoder", type=str, default=None, help="An ImageBindModel folder.")
    parser.add_argument(
        "--pretrained_mm_adapter",
        type=str,
        default=None,
        help="A MultimodalAdapter folder (default: --pipeline's mm_adapter): its reader's reads are kept and\n"
        "--save_adapter writes it with the new heads.",
    )
    parser.add_argument("--data_dir", type=str, required=True, help="A ShapesWorld dataset root.")
    parser.add_argument(
        "--output_dir", type=str, required=True, help=f"Where {ATTRIBUTE_HEADS_FILE} and the report go."
    )
    parser.add_argument("--split", type=str, default="train", help="The split whose scenes the heads are fitted to.")
    parser.add_argument("--eval_splits", type=str, nargs="*", default=["val"], help="Splits only read, for the report.")
    parser.add_argument(
        "--save_adapter",
        type=str,
        default=None,
        help="Also write the mm_adapter (--pretrained_mm_adapter, else --pipeline's) with these heads as its\n"
        "attribute reader to this folder.",
    )
    parser.add_argument(
        "--reference_heads",
        type=str,
        default=None,
        help="The old reader whose reads of object images and sounds are kept (an attribute_heads.safetensors, or a\n"
        "folder with one). Default: --pipeline's mm_adapter reader.",
    )
    parser.add_argument(
        "--keep_reads_weight",
        type=float,
        default=1.0,
        help="Weight of the KL term keeping the old reader's reads of media without scene labels (0: off).",
    )
    parser.add_argument(
        "--embed_scale", type=float, default=None, help="Default: the adapter's media_embed_norm, else 20."
    )
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=128, help="Images per encoder pass.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pipeline is None and args.pretrained_image_encoder is None:
        parser.error("pass --pipeline or --pretrained_image_encoder (the encoder whose embeddings are read).")
    no_adapter = args.pipeline is None and args.pretrained_mm_adapter is None
    if args.save_adapter is not None and no_adapter:
        parser.error("--save_adapter writes an mm_adapter: pass --pretrained_mm_adapter or --pipeline.")
    # Checked here, not after minutes of embedding.
    for name in ("max_train_steps", "train_batch_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("learning_rate", "embed_scale"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be > 0, got {value}.")
    if not args.weight_decay >= 0:
        parser.error(f"--weight_decay must be >= 0, got {args.weight_decay}.")
    if args.split in args.eval_splits:
        parser.error(f"--eval_splits must not hold the fitted split {args.split!r}.")
    if not args.keep_reads_weight >= 0:
        parser.error(f"--keep_reads_weight must be >= 0, got {args.keep_reads_weight}.")
    if args.keep_reads_weight > 0 and args.reference_heads is None and no_adapter:
        parser.error(
            "--keep_reads_weight > 0 keeps an old reader's reads: pass --pretrained_mm_adapter, --pipeline or "
            "--reference_heads."
        )
    return args


def _reference_reader(args: argparse.Namespace, adapter: MultimodalAdapter | None):
    """``embeds -> per-field probabilities`` of the reader whose reads are kept, or ``None`` when none is asked."""
    if args.keep_reads_weight == 0:
        return None
    if args.reference_heads is not None:
        heads = AttributeHeads.load(args.reference_heads)
        return lambda embeds: [field.softmax(-1) for field in heads.logits(embeds)]
    if adapter is None or adapter.attribute_reader is None:
        raise ValueError(
            "The mm_adapter reads no attributes, so it has no reads to keep: pass --reference_heads, or "
            "--keep_reads_weight 0."
        )
    adapter.eval()
    return lambda embeds: [field.float() for field in adapter.read_attributes(embeds)]


def main(argv: list[str] | None = None) -> dict:
    """Runs the fit described by the command line and returns the report."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    adapter = load_component(args, "mm_adapter", MultimodalAdapter.from_pretrained, required=False)
    if args.save_adapter is not None and (adapter is None or adapter.attribute_reader is None):
        raise ValueError("--save_adapter: the mm_adapter reads no attributes (`attribute_classes` is None).")
    reference = _reference_reader(args, adapter)
    embed_scale = args.embed_scale
    if embed_scale is None:
        embed_scale = float(adapter.config.media_embed_norm) if adapter is not None else 20.0
    model = load_component(args, "image_encoder", ImageBindModel.from_pretrained).eval()
    processor = ImageBindProcessor.for_model(model)
    report = {"split": args.split, "embed_scale": embed_scale, "splits": {}}
    data, fitted_paths = {}, None
    for split in [args.split] + list(args.eval_splits):
        paths, labels = load_scenes(args.data_dir, split)
        fitted_paths = paths if split == args.split else fitted_paths
        data[split] = (embed_images(model, processor, paths, args.batch_size), labels)
        logger.info(f"Embedded {len(paths)} {split} scenes.")
    keep = {}
    if reference is not None:
        images, audio = load_unlabelled_media(args.data_dir, args.split, fitted_paths)
        keep_embeds = torch.cat(
            [embed_images(model, processor, images, args.batch_size), embed_audio(model, processor, audio)]
        )
        with torch.no_grad():
            keep_probs = reference(keep_embeds)
        keep = {"keep_embeds": keep_embeds, "keep_probs": keep_probs, "keep_weight": args.keep_reads_weight}
        report["kept_media"] = {"images": len(images), "audio": len(audio)}
        logger.info(f"Keeping the old reads of {len(images)} object images and {len(audio)} sounds.")
    num_classes = [len(names) for names in ATTRIBUTE_CLASS_NAMES]
    heads = fit_heads(
        *data[args.split],
        num_classes,
        embed_scale=embed_scale,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        seed=args.seed,
        class_names=ATTRIBUTE_CLASS_NAMES,
        **keep,
    )
    for split, (embeds, labels) in data.items():
        report["splits"][split] = {"num_scenes": len(labels), **reader_accuracy(heads, embeds, labels)}
        logger.info(f"{split}: the heads read {report['splits'][split]['exact']:.2%} of the scenes exactly.")
    if keep:
        with torch.no_grad():
            new = [field.softmax(-1) for field in heads.logits(keep["keep_embeds"])]
        report["kept_media"]["same_argmax"] = (
            torch.stack([a.argmax(-1).eq(b.argmax(-1)) for a, b in zip(new, keep["keep_probs"])], -1)
            .all(-1)
            .float()
            .mean()
            .item()
        )
    os.makedirs(args.output_dir, exist_ok=True)
    heads.save(os.path.join(args.output_dir, ATTRIBUTE_HEADS_FILE))
    if args.save_adapter is not None:
        adapter.load_attribute_reader(heads)
        adapter.save_pretrained(args.save_adapter)
        logger.info(f"Saved the mm_adapter with the new reader to {args.save_adapter}.")
    with open(os.path.join(args.output_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
