#!/usr/bin/env python
"""Encode images and audio with ImageBind into MM-Inst feature files and media maps.

Two ways to say what to encode:

- ``--media_map``: fill the features of an existing MM-Inst ``media.json`` (shared/REFERENCE.md §5): each entry's
  medium (its ``media_path``, else its ``fpath`` without ``.npz`` — the official ``<medium>.npz`` convention) is
  encoded into its ``fpath``, both relative to ``--data_dir``;
- ``--inputs`` (files and folders) / ``--file_list`` (one path a line): every jpg/jpeg/png/webp/bmp image and
  wav/flac/mp3/ogg clip under ``--data_dir`` is encoded into ``<data_dir>/<features_subdir>/<medium>.npz`` and a media
  map is written (captions from ``--captions``, else the file name).

Each feature file holds the ImageBind vector under ``clip``, shape ``(1, D)`` (the official convention). With
``--image_patches``, image files also hold ``clip_patches``, the vision trunk's patch tokens of shape
``(num_patches, vision_embed_dim)`` in float16 (``ImageBindModel.encode_image_patches``), which an LLM trained with
``train_llm.py --image_patch_tokens`` reads; image files without them are encoded again.
``--text_media_map`` also encodes every caption of the map(s) with ImageBind's text tower (the text → image pairs of
train_prior.py). Work is batched, shows a progress bar and is resumable: existing outputs are skipped (unless
``--overwrite``) and each file is written atomically. Every file also records, under ``encoder_digest``, a SHA-256 of
the encoder's weights; a file written by another encoder (e.g. after retraining ImageBind) is stale and encoded
again, while files without that record (the official release's, or hand-made ones) are kept as they are. Unreadable
media are reported by name, the rest is still encoded, and the script exits with status 1 listing them.

Example (ShapesWorld)::

    python training/prepare_data.py --pipeline path/to/pipeline --data_dir data/shapes \\
        --media_map data/shapes/train/media.json data/shapes/val/media.json \\
        --text_media_map data/shapes/train/text_media.json --imagebind_tokenizer bpe_simple_vocab_16e6.txt.gz
"""

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_any2pix.data import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MMInstDataError,
    load_media_map,
    media_kind,
    patch_array_name,
)
from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.processing_imagebind import ImageBindProcessor, load_clip_tokenizer
from diffusers_any2pix.shapes.generate import FEATURE_KEY, media_key
from diffusers_any2pix.training_utils import load_component, parameters_digest

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The array of a feature file naming the encoder that wrote it (`parameters_digest` of the loaded ImageBindModel).
ENCODER_DIGEST_KEY = "encoder_digest"


@dataclass(frozen=True)
class EncodingJob:
    """One vector to compute.

    Args:
        kind (`str`): ``"image"``, ``"audio"`` or ``"text"``.
        source (`str`): the medium's absolute path, or the caption for text.
        output (`str`): the ``.npz`` to write.
    """

    kind: str
    source: str
    output: str


@dataclass
class PrepareDataSummary:
    """What `prepare_features` did.

    Args:
        encoded (`int`): vectors written.
        skipped (`int`): outputs that already existed (written by the same encoder, or by an unrecorded one).
        stale (`int`): outputs written by another encoder, encoded again (counted in ``encoded`` too).
        failed (`list[tuple[str, str]]`): ``(medium, reason)`` of each unreadable medium.
        media_maps (`list[str]`): media maps written.
    """

    encoded: int = 0
    skipped: int = 0
    stale: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    media_maps: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"Encoded {self.encoded} feature(s), skipped {self.skipped} existing."]
        if self.stale:
            lines.append(f"{self.stale} of them replaced features written by another image encoder.")
        lines += [f"Wrote {path}" for path in self.media_maps]
        if self.failed:
            lines.append(f"{len(self.failed)} medium/media could not be read:")
            lines += [f"  {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pipeline", type=str, default=None, help="A pipeline folder (its image_encoder is used).")
    parser.add_argument("--pretrained_image_encoder", type=str, default=None, help="An ImageBindModel folder.")
    parser.add_argument(
        "--data_dir", type=str, required=True, help="Root that media and feature paths are relative to."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--media_map", type=str, nargs="+", help="MM-Inst media.json file(s) whose features to fill.")
    source.add_argument("--inputs", type=str, nargs="+", help="Media files and/or folders (searched recursively).")
    source.add_argument("--file_list", type=str, help="A text file with one media path per line.")
    parser.add_argument(
        "--features_subdir",
        type=str,
        default="features",
        help='With --inputs/--file_list: features go to <data_dir>/<this>/<medium>.npz ("" = next to the medium, '
        "as the official scripts do).",
    )
    parser.add_argument(
        "--output_media_map", type=str, default=None, help="With --inputs/--file_list: default <data_dir>/media.json."
    )
    parser.add_argument(
        "--captions", type=str, default=None, help="JSON {medium path relative to --data_dir: caption} for the map."
    )
    parser.add_argument("--text_media_map", type=str, default=None, help="Also encode every caption; write this map.")
    parser.add_argument(
        "--imagebind_tokenizer",
        type=str,
        default=None,
        help="ImageBind's CLIP BPE: bpe_simple_vocab_16e6.txt.gz, or a saved CLIPTokenizer folder (for text).",
    )
    parser.add_argument(
        "--image_patches",
        action="store_true",
        help="Also store each image's ImageBind patch tokens (for train_llm.py --image_patch_tokens).",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=str, default="float32", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="Re-encode files whose features already exist.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    args = parser.parse_args(argv)
    if args.pipeline is None and args.pretrained_image_encoder is None:
        raise ValueError("Pass `--pipeline` or `--pretrained_image_encoder` (the ImageBind model).")
    if not os.path.isdir(args.data_dir):
        raise ValueError(f"`--data_dir` {args.data_dir!r} is not a folder.")
    if args.batch_size < 1:
        raise ValueError(f"`--batch_size` must be positive, got {args.batch_size}.")
    if args.text_media_map is not None and args.imagebind_tokenizer is None:
        raise ValueError("`--text_media_map` needs `--imagebind_tokenizer` (ImageBind's CLIP BPE vocabulary).")
    return args


def _relative(path: str, data_dir: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(data_dir))
    if relative.startswith(os.pardir):
        raise ValueError(f"{path!r} is not under `--data_dir` {data_dir!r}.")
    return relative.replace(os.sep, "/")


def collect_inputs(paths: list[str], data_dir: str) -> list[str]:
    """Supported media under ``paths`` (files, and folders searched recursively), relative to ``data_dir``, sorted."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                found += [os.path.join(root, name) for name in files if media_kind(name) is not None]
        elif media_kind(path) is None:
            raise ValueError(f"{path!r} is not a supported medium ({', '.join(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS)}).")
        else:
            found.append(path)
    return sorted({_relative(path, data_dir) for path in found})


def _caption_of(relative_path: str, captions: dict[str, str]) -> str:
    if relative_path in captions:
        return captions[relative_path]
    stem = os.path.splitext(os.path.basename(relative_path))[0]
    return stem.replace("_", " ").replace("-", " ")


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


def plan_jobs(args: argparse.Namespace) -> tuple[list[EncodingJob], dict[str, list[str]], list[tuple[str, str]]]:
    """The media to encode, the media maps to write (path → caption keys, for the text map) and media already known
    to be missing.

    Returns:
        `tuple`: ``(jobs, captions by map, failures)``.
    """
    jobs, captions_by_map, failures = [], {}, []
    if args.media_map is not None:
        for map_path in args.media_map:
            entries = load_media_map(map_path)
            captions_by_map[map_path] = list(entries)
            for entry in entries.values():
                source = os.path.join(args.data_dir, entry.media_file)
                if entry.kind is None:
                    failures.append((source, f"unsupported medium type ({entry.source.where()})"))
                elif not os.path.isfile(source):
                    failures.append((source, f"file not found ({entry.source.where()})"))
                else:
                    jobs.append(EncodingJob(entry.kind, source, os.path.join(args.data_dir, entry.fpath)))
        return jobs, captions_by_map, failures

    if args.file_list is not None:
        with open(args.file_list, encoding="utf-8") as f:
            paths = [line.strip() for line in f if line.strip()]
        # Relative paths in the list are relative to the data folder.
        paths = [p if os.path.isabs(p) else os.path.join(args.data_dir, p) for p in paths]
    else:
        paths = args.inputs
    captions = {}
    if args.captions is not None:
        with open(args.captions, encoding="utf-8") as f:
            captions = json.load(f)
    media_map = {}
    for relative in collect_inputs(paths, args.data_dir):
        fpath = f"{args.features_subdir}/{relative}.npz" if args.features_subdir else f"{relative}.npz"
        key = media_key(_caption_of(relative, captions))
        if key in media_map:
            raise ValueError(
                f"Two media have the caption key {key!r}: {media_map[key]['media_path']} and {relative}; give them "
                "distinct captions with --captions."
            )
        media_map[key] = {"fpath": fpath, "key": FEATURE_KEY, "media_path": relative}
        jobs.append(
            EncodingJob(
                media_kind(relative), os.path.join(args.data_dir, relative), os.path.join(args.data_dir, fpath)
            )
        )
    output_map = args.output_media_map or os.path.join(args.data_dir, "media.json")
    _write_json(output_map, dict(sorted(media_map.items())))
    captions_by_map[output_map] = sorted(media_map)
    return jobs, captions_by_map, failures


def plan_text_jobs(args: argparse.Namespace, captions_by_map: dict[str, list[str]]) -> list[EncodingJob]:
    """One text job per caption key of the media map(s); writes the text media map."""
    keys = sorted({key for keys in captions_by_map.values() for key in keys})
    subdir = args.features_subdir or "features"
    text_map, jobs = {}, []
    for key in keys:
        fpath = f"{subdir}/text/{hashlib.sha1(key.encode('utf-8')).hexdigest()}.npz"
        text_map[key] = {"fpath": fpath, "key": FEATURE_KEY, "text": key}
        jobs.append(EncodingJob("text", key, os.path.join(args.data_dir, fpath)))
    _write_json(args.text_media_map, text_map)
    return jobs


def _save_feature(path: str, vector: np.ndarray, encoder_digest: str, patches: np.ndarray | None = None) -> None:
    # Written under a temporary name and renamed, so an interrupted run never leaves a truncated file behind.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {FEATURE_KEY: vector[None].astype(np.float32), ENCODER_DIGEST_KEY: np.array(encoder_digest)}
    if patches is not None:
        # float16 halves the files (a 64-patch image: 16 KB at width 128); FeatureStore loads them as float32.
        arrays[patch_array_name(FEATURE_KEY)] = patches.astype(np.float16)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(temporary, path)


def _existing_output(job: EncodingJob, image_patches: bool, encoder_digest: str) -> str | None:
    """What ``job``'s output file is: ``None`` (missing, unreadable, or without the patch tokens asked for),
    ``"stale"`` (written by another encoder) or ``"done"``."""
    if not os.path.isfile(job.output):
        return None
    try:
        with np.load(job.output, allow_pickle=False) as data:
            if ENCODER_DIGEST_KEY in data.files and str(data[ENCODER_DIGEST_KEY]) != encoder_digest:
                return "stale"
            if job.kind == "image" and image_patches and patch_array_name(FEATURE_KEY) not in data.files:
                return None
            return "done"
    except Exception:  # unreadable: encode it again
        return None


def _preprocess(job: EncodingJob, processor: ImageBindProcessor) -> torch.Tensor:
    if job.kind == "image":
        return processor.preprocess_image(job.source)[0]
    if job.kind == "audio":
        return processor.preprocess_audio(job.source)[0]
    return processor.tokenize(job.source)[0]


@torch.no_grad()
def encode_jobs(
    jobs: list[EncodingJob],
    model: ImageBindModel,
    processor: ImageBindProcessor,
    batch_size: int,
    summary: PrepareDataSummary,
    encoder_digest: str,
    progress: bool = True,
    image_patches: bool = False,
) -> None:
    """Encodes ``jobs`` in batches of one kind, writing each vector (and, with ``image_patches``, each image's patch
    tokens) with ``encoder_digest``, the record of which encoder wrote it; unreadable media go to ``summary.failed``."""
    encoders = {"image": model.encode_image, "audio": model.encode_audio, "text": model.encode_text}
    bar = tqdm(total=len(jobs), desc="ImageBind", disable=not progress)
    for kind in ("image", "audio", "text"):
        todo = [job for job in jobs if job.kind == kind]
        for start in range(0, len(todo), batch_size):
            batch, inputs = [], []
            for job in todo[start : start + batch_size]:
                try:
                    inputs.append(_preprocess(job, processor))
                    batch.append(job)
                except (OSError, ValueError, TypeError, RuntimeError) as error:
                    summary.failed.append((job.source, str(error)))
            if batch:
                stacked = torch.stack(inputs)
                if stacked.is_floating_point():
                    stacked = stacked.to(dtype=model.dtype)
                patches = [None] * len(batch)
                if kind == "image" and image_patches:
                    vectors, patches = model.encode_image_patches(stacked.to(model.device))
                    patches = patches.float().cpu().numpy()
                else:
                    vectors = encoders[kind](stacked.to(model.device))
                for job, vector, tokens in zip(batch, vectors.float().cpu().numpy(), patches):
                    _save_feature(job.output, vector, encoder_digest, tokens)
                summary.encoded += len(batch)
            bar.update(len(todo[start : start + batch_size]))
    bar.close()


def prepare_features(args: argparse.Namespace) -> PrepareDataSummary:
    """Plans and runs the encoding described by ``args`` (see `parse_args`)."""
    summary = PrepareDataSummary()
    jobs, captions_by_map, failures = plan_jobs(args)
    summary.failed += failures
    if args.media_map is None:
        summary.media_maps += list(captions_by_map)
    tokenizer = None
    if args.text_media_map is not None:
        tokenizer = load_clip_tokenizer(args.imagebind_tokenizer)
        jobs += plan_text_jobs(args, captions_by_map)
        summary.media_maps.append(args.text_media_map)
    if not jobs:
        return summary
    model = load_component(args, "image_encoder", ImageBindModel.from_pretrained, dtype=DTYPES[args.dtype])
    model = model.to(args.device).eval()
    encoder_digest = parameters_digest({"image_encoder": model})
    if not args.overwrite:
        states = [_existing_output(job, args.image_patches, encoder_digest) for job in jobs]
        summary.skipped = states.count("done")
        summary.stale = states.count("stale")
        jobs = [job for job, state in zip(jobs, states) if state != "done"]
    if jobs:
        processor = ImageBindProcessor.for_model(model, tokenizer=tokenizer)
        encode_jobs(
            jobs,
            model,
            processor,
            args.batch_size,
            summary,
            progress=not args.no_progress,
            image_patches=args.image_patches,
            encoder_digest=encoder_digest,
        )
    return summary


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Runs the encoding and prints a summary; returns 0, or 1 when some media could not be read."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    try:
        summary = prepare_features(args)
    except MMInstDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
