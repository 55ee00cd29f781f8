#!/usr/bin/env python
"""How a ShapesWorld pipeline picks the base among several images, at several `base_instruction_weight` values.

    python benchmarks/base_choice.py --model . --data dev --split test --weights 0 5 10 20

Only the split's instructions with several images are used (with one image the base is fixed). For each weight the
pipeline is called on all of them with its stored knobs otherwise (one decoder step, latents out: only the base and
the caption matter); printed per weight: the right bases and the exact target captions, overall and per instruction
type, and the seconds per instruction of the whole call. First, the words alone: the image whose ImageBind vector has
the largest cosine with ImageBind's embedding of the instruction's words (`instruction_base_priors`), the base the
weight pulls towards. Pick the weight on a development split with held-out combinations (`shapes.generate` with
another seed, its ``test`` split), not on the test split.
"""

import argparse
import json
import time
from collections import Counter

import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.world import caption


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved pipeline folder with imagebind_tokenizer")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max_examples", type=int, default=None, help="read the first N examples of the split")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 5.0, 10.0, 20.0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if any(not w >= 0 for w in args.weights):
        parser.error(f"--weights must be >= 0, got {args.weights}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be a positive integer, got {args.batch_size}.")
    return args


def _inputs(batch) -> tuple[list[list[Image.Image]], list[list[str]]]:
    return [[Image.open(p).convert("RGB") for p in e.image_paths] for e in batch], [list(e.audio_paths) for e in batch]


def bases_by_words(pipe: InstructAny2PixPipeline, examples, batch_size: int) -> list[int]:
    """Per example, the index of the image that ImageBind's embedding of the instruction's words fits best."""
    device = pipe._execution_device
    chosen = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        images, audio = _inputs(batch)
        parsed = [parse_instruction(e.instruction, len(i), len(a)) for e, i, a in zip(batch, images, audio)]
        media, _ = pipe.encode_media(
            parsed,
            [[pipe.imagebind_processor.load_image(image) for image in row] for row in images],
            [[pipe.imagebind_processor.load_audio(clip) for clip in row] for row in audio],
            device,
        )
        for p, prior in zip(parsed, pipe.instruction_base_priors(parsed, media, 1.0, device)):
            # An instruction without words has no prior: its first image placeholder, as `select_base_image` does.
            chosen.append(p.image_references[0 if prior is None else int(prior.argmax())].index)
    return chosen


def _tally(examples, bases, captions, targets) -> dict:
    right, exact = Counter(), Counter()
    for example, base, text, target in zip(examples, bases, captions, targets):
        right[example.type] += base == example.base_index
        exact[example.type] += text == target
    return {"base_right": sum(right.values()), "exact": sum(exact.values()),
            "per_type_base_right": dict(right), "per_type_exact": dict(exact)}  # fmt: skip


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.imagebind_tokenizer is None:
        raise SystemExit(f"--model {args.model}: the pipeline has no imagebind_tokenizer; the weight needs one.")
    examples = [e for e in load_examples(args.data, args.split, args.max_examples) if len(e.image_paths) > 1]
    if not examples:
        raise SystemExit(f"--split {args.split}: no instruction with several images among the examples read.")
    targets = [caption(e.target_scene) for e in examples]
    types = sorted({e.type for e in examples})
    counts = Counter(e.type for e in examples)
    results = {"split": args.split, "num_examples": len(examples), "per_type": dict(counts)}

    words = bases_by_words(pipe, examples, args.batch_size)
    right = sum(b == e.base_index for b, e in zip(words, examples))
    results["words_alone"] = {"base_right": right, "bases": words}
    print(f"{args.model} on {args.split}: {len(examples)} instructions with several images; the instruction's words "
          f"alone pick the right base in {right} ({right / len(examples):.1%})")  # fmt: skip
    print(f"{'weight':>8}  {'base right':>12}  {'exact':>12}  {'s/instr':>7}  "
          + "  ".join(f"{t:>12}" for t in types))  # fmt: skip
    for weight in args.weights:
        bases, captions, start = [], [], time.perf_counter()
        for first in range(0, len(examples), args.batch_size):
            batch = examples[first : first + args.batch_size]
            images, audio = _inputs(batch)
            out = pipe([e.instruction for e in batch], images=images, audio=audio, num_inference_steps=1,
                       output_type="latent", on_invalid_answer="use_base", base_instruction_weight=weight)  # fmt: skip
            bases += out.base_image_indices
            captions += out.captions
        seconds = (time.perf_counter() - start) / len(examples)
        tally = _tally(examples, bases, captions, targets)
        results[f"weight={weight:g}"] = {**tally, "seconds_per_instruction": seconds, "bases": bases,
                                         "captions": captions}  # fmt: skip
        print(f"{weight:>8g}  {tally['base_right']:>5} {tally['base_right'] / len(examples):>6.1%}  "
              f"{tally['exact']:>5} {tally['exact'] / len(examples):>6.1%}  {seconds:>7.3f}  "
              + "  ".join(f"{tally['per_type_base_right'].get(t, 0):>3}/{tally['per_type_exact'].get(t, 0):>3}/"
                          f"{counts[t]:<4}" for t in types))  # fmt: skip
    print("(per type: right bases / exact captions / instructions)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
