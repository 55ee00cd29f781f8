#!/usr/bin/env python
"""Exact captions of a ShapesWorld pipeline with a second LLM, at several `llm_ensemble_weight` values (or at
several values of another knob that ranks the LLM's answers: ``--knob edit_verifier_weight``).

    python benchmarks/llm_ensemble.py --model PIPELINE --data dev --split test --weights 0 0.25 0.5
    python benchmarks/llm_ensemble.py --knob edit_verifier_weight --model . --data dev --split test --weights 0 0.02

PIPELINE holds `llm_2` and `mm_adapter_2` (e.g. the root with a second seed's `train_llm.py` output added: the
build's ``assemble --llm_2``), or, for ``edit_verifier_weight``, an `edit_verifier`. For each weight the pipeline
answers every example of the split with its stored knobs otherwise, one decoder step, one candidate image and latents
out (only the answers matter); printed per weight: the exact target captions, overall and per instruction type, how
many the weight gains and loses against the first weight, and the seconds per instruction of the call. Choose the
weight on a development split with held-out combinations (`shapes.generate` with another seed, its ``test`` split),
not on the test split.
"""

import argparse
import json
import time
from collections import Counter

import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.world import caption


# knob → the optional component it needs
KNOB_COMPONENTS = {"llm_ensemble_weight": "llm_2", "edit_verifier_weight": "edit_verifier"}

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved pipeline folder with the knob's components")
    parser.add_argument("--knob", default="llm_ensemble_weight", choices=sorted(KNOB_COMPONENTS))
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max_examples", type=int, default=None, help="read the first N examples of the split")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    highest = 1 if args.knob == "llm_ensemble_weight" else float("inf")
    if any(not 0 <= w <= highest for w in args.weights):
        parser.error(f"--weights of {args.knob} must be numbers in [0, {highest:g}], got {args.weights}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be a positive integer, got {args.batch_size}.")
    return args


def answer_all(
    pipe: InstructAny2PixPipeline, examples, weight: float, batch_size: int, knob: str = "llm_ensemble_weight"
) -> tuple[list, float]:
    """The pipeline's captions of every example with ``knob`` at ``weight`` and the seconds per instruction."""
    captions, start = [], time.perf_counter()
    for first in range(0, len(examples), batch_size):
        batch = examples[first : first + batch_size]
        out = pipe(
            [e.instruction for e in batch],
            images=[[Image.open(p).convert("RGB") for p in e.image_paths] for e in batch],
            audio=[list(e.audio_paths) for e in batch],
            num_inference_steps=1,
            num_candidate_images=1,
            output_type="latent",
            on_invalid_answer="use_base",
            **{knob: weight},
        )
        captions += out.captions
    return captions, (time.perf_counter() - start) / len(examples)


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, KNOB_COMPONENTS[args.knob]) is None:
        raise SystemExit(f"--model {args.model}: the pipeline has no {KNOB_COMPONENTS[args.knob]} for {args.knob}.")
    examples = load_examples(args.data, args.split, args.max_examples)
    targets = [caption(e.target_scene) for e in examples]
    types = sorted({e.type for e in examples})
    counts = Counter(e.type for e in examples)
    results = {"knob": args.knob, "split": args.split, "num_examples": len(examples), "per_type": dict(counts)}
    print(f"{'weight':>8}  {'exact':>12}  {'+':>4} {'-':>4}  {'s/instr':>7}  " + "  ".join(f"{t:>12}" for t in types))
    first_right = None
    for weight in args.weights:
        captions, seconds = answer_all(pipe, examples, weight, args.batch_size, args.knob)
        right = [text == target for text, target in zip(captions, targets)]
        first_right = right if first_right is None else first_right
        per_type = Counter(e.type for e, ok in zip(examples, right) if ok)
        figures = {
            "exact": sum(right),
            "per_type_exact": dict(per_type),
            "gained": sum(r and not f for r, f in zip(right, first_right)),
            "lost": sum(f and not r for r, f in zip(right, first_right)),
            "seconds_per_instruction": seconds,
            "captions": captions,
        }
        results[f"weight={weight:g}"] = figures
        print(f"{weight:>8g}  {figures['exact']:>5} {figures['exact'] / len(examples):>6.1%}  {figures['gained']:>4} "
              f"{figures['lost']:>4}  {seconds:>7.3f}  "
              + "  ".join(f"{per_type.get(t, 0):>4}/{counts[t]:<7}" for t in types))  # fmt: skip
    print(f"(+ / -: exact captions gained and lost against weight {args.weights[0]:g}; per type: exact / examples)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
