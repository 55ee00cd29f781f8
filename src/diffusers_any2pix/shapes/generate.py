"""Generate a ShapesWorld instruction dataset in the MM-Inst format.

    python -m diffusers_any2pix.shapes.generate --out data/shapes --num_examples 2000 --seed 0

Layout of ``--out``::

    dataset_info.json           vocabulary, held-out combinations, split sizes, settings
    media/scenes/<slug>.png     scene images (inputs and targets; one file per distinct scene)
    media/objects/<c>-<s>.png   object images: one object, centred, on the neutral white background
    media/sounds/<c>-<s>-vN.wav object sounds (16-bit PCM), recording N
    {train,val,test}/instruction.json   the examples (see below)
    {train,val,test}/media.json         caption → feature map (official format)
    {train,val,test}/scenes.json        every scene image the split uses: path, caption, scene

``instruction.json`` holds, per example, the official MM-Inst fields — ``task`` ("any2any"), ``base``
("[base caption]"), ``result`` (the target caption), ``conversations`` (human instruction with every input written
as "[its caption]", gpt answer ``"Sure. <base>[base caption]<im_gen>[result]"``) and ``added`` (``[[object name,
"[caption]"], ...]`` for objects brought in by an image or sound) — plus our own: ``id``, ``type``,
``instruction`` (placeholder form: ``[image1]``, ``[audio1]``, …), ``media`` (inputs in placeholder order — images,
then audio — each ``{kind, path, caption, scene | object (+ variant)}``), ``base_index`` (into ``media``),
``base_scene``, ``target_scene`` and ``target_image`` (the rendered target PNG). Paths are relative to ``--out``.

``media.json`` maps each media key — the caption lower-cased, stripped, dots removed — to
``{"fpath": "features/<media path>.npz", "key": "clip", "media_path": "<media path>"}``, for every input and target
image of the split. The features do not exist yet: the feature-extraction script writes the ImageBind vector of
``<out>/<media path>`` as array ``clip`` (shape (1, 1024)) into ``<out>/features/<media path>.npz`` (see
`feature_path`), which is where the official data loader looks (``os.path.join(image_folder, fpath)`` with
``image_folder = <out>``).

Splits: ``train`` and ``val`` share one distribution from which the held-out combinations
(`HELDOUT_SHAPE_COLOUR`, `HELDOUT_SHAPE_BACKGROUND`) are excluded everywhere — in every input scene, object image,
sound and target. Every ``test`` example's target scene contains at least one held-out combination (a shape in a
held-out colour or on a held-out background), so test measures generalisation to unseen combinations. Sounds use
distinct recordings per split (variants ``[k*V, (k+1)*V)`` for split k and ``V = --sound_variants``).

The output is a pure function of the arguments: the same seed gives byte-identical files.
"""

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .instructions import INSTRUCTION_TYPES, InstructionExample, MediaItem, sample_instruction
from .sounds import _check_sound_settings, synthesize_sound, write_sound
from .world import BACKGROUNDS, COLOURS, SHAPES, SLOTS, render_object, render_scene


SPLITS: tuple[str, ...] = ("train", "val", "test")
# Each held-out pair leaves its shape and its colour / background seen in other combinations during training.
HELDOUT_SHAPE_COLOUR: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "green"),
    ("star", "blue"),
)
HELDOUT_SHAPE_BACKGROUND: tuple[tuple[str, str], ...] = (
    ("cross", "dotted"),
    ("circle", "checkered"),
    ("triangle", "striped"),
)
HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(HELDOUT_SHAPE_COLOUR + HELDOUT_SHAPE_BACKGROUND)
FEATURE_KEY = "clip"
FEATURE_DIR = "features"
MEDIA_DIR = "media"
# Everything the generator (and the feature extractor, under FEATURE_DIR) writes; --overwrite removes only these.
_OUTPUTS = ("dataset_info.json", MEDIA_DIR, FEATURE_DIR) + SPLITS


def media_key(caption: str) -> str:
    """The media-map key of a caption, as the official loader computes it: lower case, stripped, no dots."""
    return caption.lower().strip().replace(".", "")


def feature_path(media_path: str) -> str:
    """Where the ImageBind feature of ``media_path`` (relative to the dataset root) lives: ``features/<path>.npz``."""
    return f"{FEATURE_DIR}/{media_path}.npz"


@dataclass
class GenerationSummary:
    """What `generate_dataset` wrote.

    Attributes:
        out_dir (`str`): the dataset root.
        split_sizes (`dict[str, int]`): number of examples per split.
        type_counts (`dict[str, dict[str, int]]`): examples per split and instruction type.
        num_images (`int`): image files written (scenes and object images).
        num_sounds (`int`): sound files written.
    """

    out_dir: str
    split_sizes: dict[str, int]
    type_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    num_images: int = 0
    num_sounds: int = 0

    def format(self) -> str:
        lines = [f"ShapesWorld dataset written to {self.out_dir}"]
        for split in SPLITS:
            counts = ", ".join(f"{t} {n}" for t, n in self.type_counts.get(split, {}).items())
            lines.append(f"  {split:5s}: {self.split_sizes[split]:6d} examples ({counts})")
        lines.append(f"  media: {self.num_images} images, {self.num_sounds} sounds")
        held = ", ".join(f"{a} {b}" for a, b in HELDOUT_SHAPE_COLOUR + HELDOUT_SHAPE_BACKGROUND)
        lines.append(f"  held out of train/val (test targets contain them): {held}")
        return "\n".join(lines)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    return float(value)


def split_sizes(num_examples: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Examples per split: val and test get their rounded fractions, train the rest (at least one)."""
    num_val, num_test = int(round(num_examples * val_fraction)), int(round(num_examples * test_fraction))
    num_train = num_examples - num_val - num_test
    if num_train < 1:
        raise ValueError(
            f"`val_fraction` ({val_fraction}) + `test_fraction` ({test_fraction}) leave no training example out of "
            f"{num_examples}."
        )
    return {"train": num_train, "val": num_val, "test": num_test}


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"`out_dir` {out_dir!r} exists and is not a directory.")
    existing = [name for name in _OUTPUTS if os.path.lexists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        raise ValueError(
            f"`out_dir` {out_dir!r} already holds a generated dataset ({', '.join(existing)}); pass "
            "overwrite=True (--overwrite) to replace it."
        )
    try:
        for name in existing:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        for sub in ("scenes", "objects", "sounds"):
            os.makedirs(os.path.join(out_dir, MEDIA_DIR, sub), exist_ok=True)
        for split in SPLITS:
            os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    except OSError as error:
        raise OSError(f"Cannot write the dataset to `out_dir` {out_dir!r}: {error.strerror or error}.") from error


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


class _MediaWriter:
    """Writes each distinct media file once and remembers what it wrote."""

    def __init__(self, out_dir: str, seed: int, image_size: int, sample_rate: int, sound_duration: float) -> None:
        self.out_dir = out_dir
        self.seed = seed
        self.image_size = image_size
        self.sample_rate = sample_rate
        self.sound_duration = sound_duration
        self.written: dict[str, str] = {}  # relative path -> kind

    def write(self, item: MediaItem) -> str:
        path = f"{MEDIA_DIR}/{item.file_name}"
        if path in self.written:
            return path
        full = os.path.join(self.out_dir, path)
        if item.scene is not None:
            render_scene(item.scene, self.image_size).save(full, format="PNG")
        elif item.kind == "image":
            render_object(item.shape, item.colour, self.image_size).save(full, format="PNG")
        else:
            # The recording depends only on (seed, kind, variant), never on which example asked for it first.
            kind = (SHAPES.index(item.shape), COLOURS.index(item.colour))
            rng = np.random.default_rng([self.seed, *kind, item.variant])
            waveform = synthesize_sound(item.shape, item.colour, self.sample_rate, self.sound_duration, rng)
            write_sound(full, waveform, self.sample_rate)
        self.written[path] = item.kind
        return path


def _record(example: InstructionExample, example_id: str, writer: _MediaWriter) -> dict[str, Any]:
    media = []
    for item in example.media:
        description = item.to_dict()
        media.append({"kind": description.pop("kind"), "path": writer.write(item), **description})
    target_path = writer.write(MediaItem("image", scene=example.target_scene))
    return {
        "id": example_id,
        **example.official_fields(),
        "type": example.type,
        "instruction": example.instruction,
        "media": media,
        "base_index": example.base_index,
        "base_scene": example.base_scene.to_dict(),
        "target_scene": example.target_scene.to_dict(),
        "target_image": target_path,
    }


def _media_map(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    entries: dict[str, dict[str, str]] = {}
    for record in records:
        pairs = [(item["caption"], item["path"]) for item in record["media"]]
        pairs.append((record["result"], record["target_image"]))
        for caption, path in pairs:
            key = media_key(caption)
            entry = {"fpath": feature_path(path), "key": FEATURE_KEY, "media_path": path}
            if entries.setdefault(key, entry) != entry:  # a caption must name one file; guards the naming scheme
                raise RuntimeError(f"Media key {key!r} maps to two files: {entries[key]['media_path']} and {path}.")
    return dict(sorted(entries.items()))


def _scene_list(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    scenes: dict[str, dict[str, Any]] = {}
    for record in records:
        for item in record["media"]:
            if "scene" in item:
                scenes[item["path"]] = {"path": item["path"], "caption": item["caption"], "scene": item["scene"]}
        scenes[record["target_image"]] = {
            "path": record["target_image"],
            "caption": record["result"],
            "scene": record["target_scene"],
        }
    return [scenes[path] for path in sorted(scenes)]


def _accept_for(split: str):
    if split == "test":
        return lambda example: bool(example.target_scene.combinations() & HELDOUT_COMBINATIONS)
    return lambda example: not (example.combinations() & HELDOUT_COMBINATIONS)


def generate_dataset(
    out_dir: str,
    num_examples: int,
    seed: int = 0,
    image_size: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    sound_variants: int = 4,
    sample_rate: int = 16000,
    sound_duration: float = 2.0,
    overwrite: bool = False,
    progress: bool = True,
) -> GenerationSummary:
    """Generate a ShapesWorld instruction dataset (layout and formats: this module's docstring).

    Args:
        out_dir (`str`): dataset root, created if needed.
        num_examples (`int`): total number of examples over all splits (>= 1).
        seed (`int`, defaults to 0): the only source of randomness (>= 0).
        image_size (`int`, defaults to 64): side of the rendered images (>= 16).
        val_fraction (`float`, defaults to 0.1): share of examples in ``val``.
        test_fraction (`float`, defaults to 0.1): share of examples in ``test`` (held-out combinations).
        sound_variants (`int`, defaults to 4): distinct recordings per object kind and split.
        sample_rate (`int`, defaults to 16000): sound sample rate.
        sound_duration (`float`, defaults to 2.0): sound length in seconds.
        overwrite (`bool`, defaults to False): replace a dataset already in ``out_dir`` (only the generator's own
            outputs and ``features/`` are removed).
        progress (`bool`, defaults to True): show a progress bar.

    Returns:
        [`GenerationSummary`].

    Raises:
        `ValueError`: an invalid argument, or ``out_dir`` already holds a dataset and ``overwrite`` is False.
        `OSError`: ``out_dir`` cannot be created or written.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`out_dir` must be a path, got {type(out_dir).__name__}.")
    out_dir = os.fspath(out_dir)
    num_examples = _check_int(num_examples, "num_examples", 1)
    seed = _check_int(seed, "seed", 0)
    image_size = _check_int(image_size, "image_size", 16)
    sound_variants = _check_int(sound_variants, "sound_variants", 1)
    sample_rate = _check_int(sample_rate, "sample_rate", 4000)
    sizes = split_sizes(
        num_examples, _check_fraction(val_fraction, "val_fraction"), _check_fraction(test_fraction, "test_fraction")
    )
    _check_sound_settings(sample_rate, sound_duration)
    _prepare_out_dir(out_dir, overwrite)

    writer = _MediaWriter(out_dir, seed, image_size, sample_rate, sound_duration)
    summary = GenerationSummary(out_dir=out_dir, split_sizes=sizes)
    with tqdm(total=num_examples, desc="ShapesWorld", disable=not progress) as bar:
        for split_index, split in enumerate(SPLITS):
            size = sizes[split]
            # Balanced types, in a seeded random order.
            types = [INSTRUCTION_TYPES[i % len(INSTRUCTION_TYPES)] for i in range(size)]
            types = [types[i] for i in np.random.default_rng([seed, split_index]).permutation(size)]
            variants = range(split_index * sound_variants, (split_index + 1) * sound_variants)
            accept = _accept_for(split)
            records = []
            for i, instruction_type in enumerate(types):
                # One generator per example: an example does not depend on how many draws the others needed.
                rng = np.random.default_rng([seed, split_index, i])
                example = sample_instruction(instruction_type, rng, variants, accept=accept)
                records.append(_record(example, f"{split}-{i:06d}", writer))
                bar.update(1)
            split_dir = os.path.join(out_dir, split)
            _write_json(os.path.join(split_dir, "instruction.json"), records)
            _write_json(os.path.join(split_dir, "media.json"), _media_map(records))
            _write_json(os.path.join(split_dir, "scenes.json"), _scene_list(records))
            counts = Counter(types)
            summary.type_counts[split] = {t: counts[t] for t in INSTRUCTION_TYPES if counts[t]}

    summary.num_sounds = sum(kind == "audio" for kind in writer.written.values())
    summary.num_images = len(writer.written) - summary.num_sounds
    _write_json(
        os.path.join(out_dir, "dataset_info.json"),
        {
            "format": "shapesworld-mm-inst",
            "format_version": 1,
            "seed": seed,
            "num_examples": num_examples,
            "split_sizes": sizes,
            "type_counts": summary.type_counts,
            "image_size": image_size,
            "sample_rate": sample_rate,
            "sound_duration": sound_duration,
            "sound_variants_per_split": sound_variants,
            "vocabulary": {"shapes": SHAPES, "colours": COLOURS, "backgrounds": BACKGROUNDS, "slots": SLOTS},
            "heldout_shape_colour": HELDOUT_SHAPE_COLOUR,
            "heldout_shape_background": HELDOUT_SHAPE_BACKGROUND,
            "instruction_types": INSTRUCTION_TYPES,
            "features": {"dir": FEATURE_DIR, "path": "features/<media path>.npz", "key": FEATURE_KEY},
        },
    )
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_any2pix.shapes.generate",
        description="Generate a ShapesWorld multimodal instruction dataset (MM-Inst format).",
    )
    parser.add_argument("--out", required=True, help="dataset root directory")
    parser.add_argument("--num_examples", type=int, required=True, help="total examples over train/val/test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.1, help="share of held-out-combination examples")
    parser.add_argument("--sound_variants", type=int, default=4, help="recordings per object kind and split")
    parser.add_argument("--sample_rate", type=int, default=16000)
    parser.add_argument("--sound_duration", type=float, default=2.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0 on success and exits with status 2 and a message on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        summary = generate_dataset(
            args.out,
            args.num_examples,
            seed=args.seed,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            sound_variants=args.sound_variants,
            sample_rate=args.sample_rate,
            sound_duration=args.sound_duration,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
