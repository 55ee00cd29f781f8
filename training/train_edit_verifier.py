#!/usr/bin/env python
"""Train the edit verifier (`EditVerifier`) on a ShapesWorld dataset.

The verifier learns two things with one network: the attribute fields of an instruction's result from its words and
the attribute reads of its inputs, and the fields of a caption from its words alone (a caption is a text without
inputs). The pipeline ranks the LLM's candidate answers by how well the two agree (``edit_verifier_weight``). Every
example's classes are renamed at random (`EditVerifier.rename_classes`: the same permutation of the colours, of the
shapes and of the backgrounds in its words, its inputs' reads and its labels), so the verifier learns to copy
classes from where the instruction says, never which shape goes with which colour.

Labels come from the dataset's scenes (``target_scene`` of each instruction, ``scene`` of each scene medium);
the inputs' ImageBind vectors from its feature files (``prepare_data.py``), read by the attribute reader of
``--attribute_reader`` (heads from ``train_imagebind.py --attribute_loss_weight`` or ``fit_attribute_reader.py``),
else of the ``--pipeline``'s / ``--pretrained_mm_adapter``'s adapter (the reads the pipeline will give it). At the
end, the instructions of ``--eval_splits`` are predicted and ``verifier_report.json`` records how many results are
read exactly, per instruction type, and how many of their target captions are parsed exactly.

Example (ShapesWorld)::

    accelerate launch training/train_edit_verifier.py --pipeline path/to/pipeline --data_dir data/shapes \\
        --output_dir out/verifier --max_train_steps 2500 --train_batch_size 128 --learning_rate 1e-3
"""

import argparse
import json
import logging
import os
import sys
from collections import Counter

import numpy as np
import torch

from diffusers_any2pix import training_utils
from diffusers_any2pix.data import FeatureStore
from diffusers_any2pix.models.edit_verifier import EditVerifier, EditVerifierInputs, collect_words
from diffusers_any2pix.models.mm_adapter import AttributeHeads, MultimodalAdapter
from diffusers_any2pix.shapes.world import ATTRIBUTE_CLASS_NAMES, Scene, attribute_labels


logger = logging.getLogger(__name__)

REPORT_FILE = "verifier_report.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_edit_verifier", type=str, default=None, help="An EditVerifier folder to fine-tune."
    )
    model.add_argument("--hidden_size", type=int, default=128)
    model.add_argument("--num_layers", type=int, default=2)
    model.add_argument("--num_heads", type=int, default=4)
    reads = parser.add_argument_group("attribute reads")
    reads.add_argument(
        "--attribute_reader",
        type=str,
        default=None,
        help="Attribute heads (file or folder) that read the inputs; default: the reader of the --pipeline's (or\n"
        "--pretrained_mm_adapter's) adapter.",
    )
    reads.add_argument("--pretrained_mm_adapter", type=str, default=None, help="An adapter folder with a reader.")
    training_utils.add_data_args(parser, instructions=True)
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--caption_fraction",
        type=float,
        default=0.25,
        help="Share of the training examples that are captions to parse (the dataset's target and scene captions).",
    )
    objective.add_argument(
        "--rename_prob", type=float, default=1.0, help="Share of the batches whose classes are renamed at random."
    )
    objective.add_argument("--eval_splits", nargs="*", default=["val"], help="Splits predicted at the end.")
    training_utils.add_common_training_args(parser, learning_rate=1e-3, train_batch_size=128)
    args = training_utils.check_common_args(parser.parse_args(argv))
    training_utils.resolve_data_paths(args)
    for name in ("caption_fraction", "rename_prob"):
        value = getattr(args, name)
        if not 0.0 <= value <= (0.95 if name == "caption_fraction" else 1.0):
            raise ValueError(f"`--{name}` must lie in [0, {0.95 if name == 'caption_fraction' else 1}], got {value}.")
    if args.attribute_reader is None and args.pipeline is None and args.pretrained_mm_adapter is None:
        raise ValueError(
            "The inputs need an attribute reader: pass --attribute_reader (heads), --pretrained_mm_adapter or "
            "--pipeline."
        )
    return args


class AttributeReads:
    """Class probabilities of every attribute field of ImageBind vectors, from heads or an adapter's reader."""

    def __init__(self, args: argparse.Namespace):
        self.heads = self.adapter = None
        if args.attribute_reader is not None:
            self.heads = AttributeHeads.load(args.attribute_reader)
            num_classes = tuple(self.heads.num_classes)
        else:
            self.adapter = training_utils.load_component(args, "mm_adapter", MultimodalAdapter.from_pretrained)
            if self.adapter.attribute_reader is None:
                raise ValueError("The adapter has no attribute reader (`attribute_classes`); pass --attribute_reader.")
            self.adapter = self.adapter.float().eval()
            num_classes = tuple(self.adapter.config.attribute_classes)
        expected = tuple(len(field) for field in ATTRIBUTE_CLASS_NAMES)
        if num_classes != expected:
            raise ValueError(f"The reader reads fields of {num_classes} classes; ShapesWorld's are {expected}.")

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """`(n, sum(num_classes))`: each vector's fields' probabilities, concatenated."""
        if self.heads is not None:
            return torch.cat([logits.softmax(-1) for logits in self.heads.logits(vectors)], -1)
        return torch.cat(self.adapter.read_attributes(vectors.float()), -1).float().cpu()


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        records = json.load(f)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty list of instruction records.")
    for i, record in enumerate(records):
        missing = [k for k in ("instruction", "media", "result", "target_scene") if k not in record]
        media = record.get("media", [])
        missing += [f"media[{j}].{k}" for j, m in enumerate(media) for k in ("kind", "caption") if k not in m]
        if missing:
            raise ValueError(f"{path}, record {i}: missing {missing} (a ShapesWorld instruction record).")
    return records


def instruction_examples(
    records: list[dict], features: FeatureStore, reader: AttributeReads
) -> tuple[list[str], list[dict], list[list[int]]]:
    """Per record: its instruction, its inputs' reads keyed by ``(kind, index)`` and its result's labels."""
    captions = sorted({m["caption"] for r in records for m in r["media"]})
    vectors = torch.stack([features.load(c, "train_edit_verifier.py") for c in captions])
    reads = dict(zip(captions, reader(vectors)))
    texts, media_reads, labels = [], [], []
    for record in records:
        counts, row = Counter(), {}
        for medium in record["media"]:  # images then audio clips, each in their placeholder order
            counts[medium["kind"]] += 1
            row[(medium["kind"], counts[medium["kind"]])] = reads[medium["caption"]]
        texts.append(record["instruction"])
        media_reads.append(row)
        labels.append(attribute_labels(Scene.from_dict(record["target_scene"])))
    return texts, media_reads, labels


def caption_examples(records: list[dict]) -> dict[str, list[int]]:
    """Every caption of a scene the records hold (results and scene inputs) with its labels."""
    captions = {}
    for record in records:
        captions[record["result"]] = attribute_labels(Scene.from_dict(record["target_scene"]))
        for medium in record["media"]:
            if "scene" in medium:
                captions[medium["caption"]] = attribute_labels(Scene.from_dict(medium["scene"]))
    return captions


class VerifierDataset(torch.utils.data.Dataset):
    """Encoded instructions and captions with their labels, indexed by ``(epoch, index)``; its `collate` takes a
    batch's rows out of the encoded tensors at once."""

    def __init__(self, inputs: EditVerifierInputs, labels: torch.LongTensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int] | int) -> int:
        return item[1] if isinstance(item, tuple) else item

    def collate(self, indices: list[int]) -> tuple[EditVerifierInputs, torch.LongTensor]:
        rows = torch.tensor(indices)
        return self.inputs.select(rows), self.labels[rows]


def build_examples(
    args: argparse.Namespace, verifier_words: list[str] | None, reader: AttributeReads, features: FeatureStore
) -> tuple[list[str], list[str], list[dict], list[list[int]]]:
    """The vocabulary and the training texts (instructions, then the sampled captions), reads and labels."""
    records = load_records(args.instruction_file)
    texts, media_reads, labels = instruction_examples(records, features, reader)
    captions = caption_examples(records)
    wanted = round(args.caption_fraction / (1 - args.caption_fraction) * len(texts))
    order = np.random.default_rng(args.seed).permutation(len(captions))[:wanted]
    names = sorted(captions)
    chosen = [names[i] for i in sorted(order)]
    texts += chosen
    media_reads += [{} for _ in chosen]
    labels += [captions[c] for c in chosen]
    if verifier_words is None:
        verifier_words = collect_words([r["instruction"] for r in records] + names, ATTRIBUTE_CLASS_NAMES)
    return verifier_words, texts, media_reads, labels


@torch.no_grad()
def evaluate_split(verifier: EditVerifier, args: argparse.Namespace, split: str, reader: AttributeReads) -> dict:
    """Results read exactly (all fields) per instruction type, and target captions parsed exactly."""
    path = os.path.join(args.data_dir, split, "instruction.json")
    media_map = os.path.join(args.data_dir, split, "media.json")
    with open(path) as f:
        if not json.load(f):  # e.g. a tiny dataset's empty validation split
            return {"examples": 0}
    records = load_records(path)
    features = FeatureStore.from_file(media_map, args.data_dir)
    texts, media_reads, labels = instruction_examples(records, features, reader)
    labels = torch.tensor(labels)
    exact, parsed = [], []
    for i in range(0, len(texts), 256):
        probs = verifier.predict(texts[i : i + 256], media_reads[i : i + 256])
        exact.append((torch.stack([p.argmax(-1) for p in probs], 1) == labels[i : i + 256]).all(1))
        captions = [r["result"] for r in records[i : i + 256]]
        probs = verifier.predict(captions)
        parsed.append((torch.stack([p.argmax(-1) for p in probs], 1) == labels[i : i + 256]).all(1))
    exact, parsed = torch.cat(exact), torch.cat(parsed)
    per_type, counts = Counter(), Counter()
    for record, ok in zip(records, exact.tolist()):
        per_type[record.get("type", "?")] += ok
        counts[record.get("type", "?")] += 1
    return {
        "examples": len(records),
        "results_exact": int(exact.sum()),
        "captions_parsed_exact": int(parsed.sum()),
        "results_exact_per_type": {t: f"{per_type[t]}/{counts[t]}" for t in sorted(counts)},
    }


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Runs the training; returns the training summary (see `write_training_summary`) with the report."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    accelerator = training_utils.make_accelerator(args)
    reader = AttributeReads(args)
    features = FeatureStore.from_file(args.media_map, args.data_dir)
    pretrained = None
    if args.pretrained_edit_verifier is not None:
        pretrained = EditVerifier.from_pretrained(args.pretrained_edit_verifier)
        if [list(f) for f in pretrained.config.class_words] != [list(f) for f in ATTRIBUTE_CLASS_NAMES]:
            raise ValueError(
                f"--pretrained_edit_verifier {args.pretrained_edit_verifier!r} reads other classes than ShapesWorld's "
                f"({pretrained.config.class_words})."
            )
    words, texts, media_reads, labels = build_examples(
        args, None if pretrained is None else list(pretrained.config.words), reader, features
    )
    verifier = pretrained or EditVerifier(
        class_words=[list(field) for field in ATTRIBUTE_CLASS_NAMES],
        words=words,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
    )
    verifier.train()
    dataset = VerifierDataset(verifier.encode(texts, media_reads), torch.tensor(labels))
    logger.info(f"{len(texts)} examples ({sum(1 for r in media_reads if r)} instructions), {len(words)} words.")
    params = [p for p in verifier.parameters() if p.requires_grad]
    setup = training_utils.prepare_training(
        accelerator, args, verifier, params, dataset, collate_fn=dataset.collate, tracker_name="train_edit_verifier"
    )
    unwrapped = accelerator.unwrap_model(setup.model)

    def compute_loss(batch):
        inputs, targets = batch
        if torch.rand(()) < args.rename_prob:  # the global RNG is re-seeded every step (`seed_step`)
            inputs, targets = unwrapped.rename_classes(inputs, targets)
        log_probs = setup.model(inputs)
        losses = [
            torch.nn.functional.nll_loss(field, targets[:, f].to(field.device)) for f, field in enumerate(log_probs)
        ]
        return torch.stack(losses).mean(), {}

    result = training_utils.run_training_loop(accelerator, args, setup, compute_loss)
    verifier = accelerator.unwrap_model(setup.model)
    report = {}
    if accelerator.is_main_process:
        for split in args.eval_splits:
            report[split] = evaluate_split(verifier, args, split, reader)
            logger.info(f"{split}: {report[split]}")
        with open(os.path.join(args.output_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
    training_utils.save_trained_components(args, accelerator, edit_verifier=verifier)
    summary = training_utils.finish_training(accelerator, args, result, {"edit_verifier": setup.model})
    return {**summary, "report": report}


if __name__ == "__main__":
    main()
    sys.exit(0)
