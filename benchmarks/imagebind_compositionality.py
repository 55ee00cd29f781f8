#!/usr/bin/env python
"""How well a ShapesWorld ImageBind carries scenes it never saw: held-out combinations against in-distribution ones.

    python benchmarks/imagebind_compositionality.py --image_encoder build/shapesworld/imagebind/image_encoder \\
        --tokenizer build/shapesworld/imagebind/imagebind_tokenizer --data build/shapesworld/data

Every scene image of the dataset's splits is encoded by the image tower. Two measurements per split:

- **retrieval** (zero-shot, no training): the share of scenes whose nearest caption, among the captions of every
  scene of the dataset, is their own. The text tower embeds each caption from its words, so this says whether the
  joint space places an unseen combination where its description lands.
- **reader**: a small MLP trained on the ``train`` scenes' embeddings to read the background and each slot's shape and
  colour (what the LLM and the decoder must do with an embedding), then applied to the other splits; the share of
  scenes read exactly, the accuracy per field, and (``heldout_objects``) the share of objects in a held-out
  shape/colour pair whose shape and colour are both read right.
- with ``--patch_reader``, **patch reader**: the same, read from the vision trunk's patch tokens
  (`ImageBindModel.encode_image_patches`) by one learned query per field attending over them — what an LLM reading
  patch tokens (``MultimodalAdapter`` with ``image_patch_tokens``) could get out of them.

- with ``--attribute_heads``, **attribute heads**: the linear read-outs `train_imagebind.py --attribute_loss_weight`
  trained with the encoder (on scenes drawn on the fly, held-out combinations excluded), from the
  ``attribute_heads.safetensors`` it saves beside the encoder or from a training checkpoint's ``model.safetensors``
  (applied to ``--attribute_embed_scale`` times the embedding, as in training).

On ``test`` every scene holds a combination held out of training (see `diffusers_any2pix.shapes.generate`), so the
gap between ``val`` and ``test`` is the cost of unseen combinations. Prints a table; ``--output`` writes JSON.
"""

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import CLIPTokenizer

from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.models.mm_adapter import AttributeHeads
from diffusers_any2pix.processing_imagebind import ImageBindProcessor
from diffusers_any2pix.shapes.evaluate import open_image
from diffusers_any2pix.shapes.generate import HELDOUT_SHAPE_COLOUR
from diffusers_any2pix.shapes.world import ATTRIBUTE_CLASSES, ATTRIBUTE_FIELDS, SLOTS, Scene, attribute_labels

# How each row of the table is marked: the reader it scores.
SOURCE_NOTES = {"reader": "", "patch_reader": "  (patch tokens)", "attribute_heads": "  (attribute heads)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_encoder", required=True, help="an ImageBindModel folder")
    parser.add_argument("--tokenizer", required=True, help="the CLIP tokenizer folder it was trained with")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--reader_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--patch_reader", action="store_true", help="also train a reader of the patch tokens")
    parser.add_argument(
        "--attribute_heads",
        default=None,
        help="train_imagebind's attribute_heads.safetensors, or a checkpoint's model.safetensors (trained with "
        "--attribute_loss_weight): score its heads",
    )
    parser.add_argument(
        "--attribute_embed_scale",
        type=float,
        default=1.0,
        help="the --attribute_embed_scale the heads of a checkpoint were trained with (a heads file has its own)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if "train" not in args.splits:
        parser.error("--splits must include train (the reader is trained on it).")
    if args.reader_steps < 1 or args.batch_size < 1:
        parser.error("--reader_steps and --batch_size must be positive.")
    if not args.attribute_embed_scale > 0:
        parser.error(f"--attribute_embed_scale must be positive, got {args.attribute_embed_scale}.")
    if args.attribute_heads is not None and not os.path.isfile(args.attribute_heads):
        parser.error(
            f"--attribute_heads {args.attribute_heads!r} is not a file (attribute_heads.safetensors or a checkpoint's "
            "model.safetensors)."
        )
    for split in args.splits:
        if not os.path.isfile(os.path.join(args.data, split, "scenes.json")):
            parser.error(f"--data {args.data!r} has no {split}/scenes.json (generate it with shapes.generate).")
    return args


@torch.no_grad()
def encode_scene_images(
    model: ImageBindModel, processor: ImageBindProcessor, paths: Sequence[str], batch_size: int, patches: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised image embeddings of the image files ``paths``, and their patch tokens when ``patches``."""
    embeds, tokens = [], []
    for start in range(0, len(paths), batch_size):
        pixels = processor.preprocess_image([open_image(path) for path in paths[start : start + batch_size]])
        if patches:
            image_embeds, patch_tokens = model.encode_image_patches(pixels)
            tokens.append(patch_tokens.float())
        else:
            image_embeds = model.encode_image(pixels)
        embeds.append(image_embeds)
    return F.normalize(torch.cat(embeds).float(), dim=-1), (torch.cat(tokens) if patches else None)


@torch.no_grad()
def encode_captions(
    model: ImageBindModel, processor: ImageBindProcessor, captions: Sequence[str], batch_size: int
) -> torch.Tensor:
    """L2-normalised text embeddings (the logit scale removed)."""
    embeds = [
        model.encode_text(processor.tokenize(list(captions[i : i + batch_size])))
        for i in range(0, len(captions), batch_size)
    ]
    return F.normalize(torch.cat(embeds).float(), dim=-1)


def retrieval_accuracy(image_embeds: torch.Tensor, own: torch.Tensor, caption_embeds: torch.Tensor) -> float:
    """Share of images whose most similar caption is the one at index ``own``."""
    return (image_embeds @ caption_embeds.T).argmax(dim=-1).eq(own).float().mean().item()


class SceneReader(torch.nn.Module):
    """An MLP from an embedding to one set of logits per entry of `ATTRIBUTE_FIELDS`."""

    def __init__(self, embed_dim: int, hidden_dim: int = 512):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, hidden_dim), torch.nn.GELU(), torch.nn.Linear(hidden_dim, sum(ATTRIBUTE_CLASSES))
        )

    def forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.net(embeds), ATTRIBUTE_CLASSES, dim=-1)


def load_attribute_heads(path: str, embed_scale: float = 1.0) -> AttributeHeads:
    """``--attribute_heads``: ``attribute_heads.safetensors`` (saved by `train_imagebind.py` beside the encoder, its
    scale inside), or a training checkpoint's ``model.safetensors`` (keys ``attribute_heads.*``; read at
    ``embed_scale``)."""
    with safe_open(path, framework="pt") as f:
        if "num_classes" in (f.metadata() or {}):
            return AttributeHeads.load(path)
        if "attribute_heads.weight" not in f.keys():
            raise ValueError(f"{path!r} holds no attribute heads (train with `--attribute_loss_weight`).")
        weight, bias = f.get_tensor("attribute_heads.weight"), f.get_tensor("attribute_heads.bias")
    if weight.ndim != 2 or weight.shape[0] != sum(ATTRIBUTE_CLASSES) or bias.shape != weight.shape[:1]:
        raise ValueError(
            f"attribute heads must have a ({sum(ATTRIBUTE_CLASSES)}, embed_dim) weight and a matching bias, got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}."
        )
    return AttributeHeads(weight, bias, ATTRIBUTE_CLASSES, embed_scale)


class PatchReader(torch.nn.Module):
    """One learned query per entry of `ATTRIBUTE_FIELDS` attends over a scene's patch tokens; an MLP per field reads
    its query."""

    def __init__(self, embed_dim: int, num_heads: int = 4, hidden_dim: int = 256):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(ATTRIBUTE_FIELDS), embed_dim) * 0.02)
        self.attention = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(embed_dim, hidden_dim), torch.nn.GELU(), torch.nn.Linear(hidden_dim, n))
            for n in ATTRIBUTE_CLASSES
        )

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        read, _ = self.attention(self.queries.expand(len(patches), -1, -1), patches, patches)
        return tuple(head(read[:, k]) for k, head in enumerate(self.heads))


def train_reader(
    embeds: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, seed: int, reader_class=SceneReader
) -> torch.nn.Module:
    """Fits a ``reader_class`` (`SceneReader` on embeddings, `PatchReader` on patch tokens) on ``(embeds, labels)``;
    deterministic for a seed (the global RNG is left untouched)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reader = reader_class(embeds.shape[-1])
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        index = torch.randint(0, len(embeds), (batch_size,), generator=generator)
        logits = reader(embeds[index])
        loss = sum(F.cross_entropy(field, labels[index, k]) for k, field in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return reader.eval()


def heldout_slots(scene: Scene) -> list[bool]:
    """Per slot: whether it holds an object whose shape/colour pair is held out of training."""
    held = {obj.slot for obj in scene.objects if (obj.shape, obj.colour) in HELDOUT_SHAPE_COLOUR}
    return [slot in held for slot in SLOTS]


@torch.no_grad()
def reader_accuracy(
    reader: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    embeds: torch.Tensor,
    labels: torch.Tensor,
    heldout: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> dict:
    """Scene-exact share and per-field accuracy; with ``heldout`` (a (scenes, slots) mask of the slots to score, from
    `heldout_slots`), ``heldout_objects``: the share of those slots whose shape and colour are both read right (`None`
    when the mask is empty)."""
    predicted = []
    for start in range(0, len(embeds), batch_size):
        fields = reader(embeds[start : start + batch_size])
        predicted.append(torch.stack([field.argmax(dim=-1) for field in fields], -1))
    correct = torch.cat(predicted).eq(labels)
    per_field = dict(zip(ATTRIBUTE_FIELDS, correct.float().mean(0).tolist()))
    result = {"exact": correct.all(dim=-1).float().mean().item(), **per_field}
    if heldout is not None:
        # Fields after the background: shape and colour of each slot in turn.
        objects = correct[:, 1:].view(len(correct), len(SLOTS), 2).all(dim=-1)
        result["heldout_objects"] = objects[heldout].float().mean().item() if heldout.any() else None
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = ImageBindModel.from_pretrained(args.image_encoder).eval()
    processor = ImageBindProcessor.for_model(model, tokenizer=CLIPTokenizer.from_pretrained(args.tokenizer))
    splits = {}
    for split in args.splits:
        with open(os.path.join(args.data, split, "scenes.json"), encoding="utf-8") as f:
            entries = json.load(f)
        paths = [os.path.join(args.data, entry["path"]) for entry in entries]
        scenes = [Scene.from_dict(entry["scene"]) for entry in entries]
        labels = torch.tensor([attribute_labels(scene) for scene in scenes])
        heldout = torch.tensor([heldout_slots(scene) for scene in scenes], dtype=torch.bool).view(len(scenes), -1)
        embeds, patches = encode_scene_images(model, processor, paths, args.batch_size, args.patch_reader)
        splits[split] = (embeds, labels, [e["caption"] for e in entries], patches, heldout)
    captions = sorted({c for _, _, split_captions, _, _ in splits.values() for c in split_captions})
    caption_embeds = encode_captions(model, processor, captions, args.batch_size)
    position = {c: i for i, c in enumerate(captions)}
    # The reader sees unit vectors scaled up, as the pipeline conditions on norm-20 embeddings.
    reader = train_reader(splits["train"][0] * 20.0, splits["train"][1], args.reader_steps, args.batch_size, args.seed)
    patch_reader = None
    if args.patch_reader:
        train_patches, train_labels = splits["train"][3], splits["train"][1]
        patch_reader = train_reader(
            train_patches, train_labels, args.reader_steps, args.batch_size, args.seed, reader_class=PatchReader
        )
    heads = None
    if args.attribute_heads is not None:
        heads = load_attribute_heads(args.attribute_heads, args.attribute_embed_scale).logits
    report = {"image_encoder": args.image_encoder, "data": args.data, "num_captions": len(captions), "splits": {}}
    for split, (embeds, labels, split_captions, patches, heldout) in splits.items():
        own = torch.tensor([position[c] for c in split_captions])
        report["splits"][split] = {
            "num_scenes": len(embeds),
            "num_heldout_objects": int(heldout.sum()),
            "retrieval": retrieval_accuracy(embeds, own, caption_embeds),
            "reader": reader_accuracy(reader, embeds * 20.0, labels, heldout),
        }
        if patch_reader is not None:
            report["splits"][split]["patch_reader"] = reader_accuracy(patch_reader, patches, labels, heldout)
        if heads is not None:
            report["splits"][split]["attribute_heads"] = reader_accuracy(heads, embeds, labels, heldout)
    print(f"ImageBind compositionality ({args.image_encoder}); retrieval among {len(captions)} captions")
    header = " ".join(f"{f:>13s}" for f in ATTRIBUTE_FIELDS)
    print(f"{'split':6s} {'scenes':>6s} {'retrieval':>9s} {'reader':>7s}  {header}  held-out objects")
    for split, r in report["splits"].items():
        for name in ("reader", "patch_reader", "attribute_heads"):
            if name not in r:
                continue
            fields = " ".join(f"{100 * r[name][f]:13.1f}" for f in ATTRIBUTE_FIELDS)
            first = f"{split:6s} {r['num_scenes']:6d} {100 * r['retrieval']:9.1f}" if name == "reader" else " " * 23
            held = r[name]["heldout_objects"]
            held = f"{100 * held:5.1f} % of {r['num_heldout_objects']}" if held is not None else "    —"
            line = f"{first} {100 * r[name]['exact']:7.1f}  {fields}  {held}"
            print(line + SOURCE_NOTES[name])
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
