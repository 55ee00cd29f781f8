#!/usr/bin/env python
"""How many ShapesWorld edits come out right when each output is the best of several candidates.

    python benchmarks/candidate_images.py --model . --data dev --split test --probe build/shapesworld/probe \
        --weights 0.3 1.0 --candidates 4

One pipeline call per batch draws every candidate: ``caption_embedding_weight=WEIGHTS`` and
``num_candidate_images=CANDIDATES`` (the pipeline's other knobs as stored), a generator per example seeded as the
evaluator seeds it. The callback keeps the final latents of every candidate; each is decoded, read by the
evaluator's attribute probe (right = the target scene) and scored by `pipe.score_candidate_images` (ImageBind's
cosine with the caption). Printed, for every non-empty subset of the weights and every number k of candidates per
weight (the first k drawn): the edits the score's pick gets right, and how many examples have a right candidate
at all. The row with all weights and all candidates is the pipeline's own output (checked against it). Pick the
setting on a development split with held-out combinations (`shapes.generate` with another seed, its ``test`` split),
not on the test split.
"""

import argparse
import itertools
import json
import os
import time

import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.multimodal_llm import parse_answer
from diffusers_any2pix.shapes.evaluate import example_generator, load_examples, load_or_train_probe
from diffusers_any2pix.shapes.probe import SceneReading


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved pipeline folder with imagebind_tokenizer")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--probe", required=True, help="the evaluator's saved attribute probe")
    parser.add_argument("--max_examples", type=int, default=None, help="read the first N examples of the split")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.3, 1.0], help="caption embedding weights")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per weight")
    parser.add_argument("--seed", type=int, default=0, help="seeds each example's generator, as the evaluator does")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if any(not 0 <= w <= 1 for w in args.weights):
        parser.error(f"--weights must be in [0, 1], got {args.weights}.")
    for name in ("candidates", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    return args


def tally(right: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """Per subset of weights and number of candidates: edits right by the score's pick, and by any candidate.

    Args:
        right (`torch.Tensor`): `(examples, weights, candidates)` bool, the probe's verdict per candidate.
        scores (`torch.Tensor`): the same shape, `score_candidate_images` per candidate.
    """
    rows = []
    num_weights, num_candidates = right.shape[1:]
    for size in range(1, num_weights + 1):
        for subset in itertools.combinations(range(num_weights), size):
            for k in range(1, num_candidates + 1):
                r, s = right[:, list(subset), :k].flatten(1), scores[:, list(subset), :k].flatten(1)
                picked = r.gather(1, s.argmax(dim=1, keepdim=True)).squeeze(1)
                rows.append({"weights": list(subset), "candidates": k, "right": int(picked.sum()),
                             "any_right": int(r.any(dim=1).sum())})  # fmt: skip
    return rows


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.imagebind_tokenizer is None:
        raise SystemExit(f"--model {args.model}: the pipeline has no imagebind_tokenizer; the score reads captions.")
    if not os.path.isfile(os.path.join(args.probe, "config.json")):
        raise SystemExit(f"--probe {args.probe}: no saved probe (`python -m diffusers_any2pix.shapes.evaluate --train "
                         "--probe DIR` trains one).")  # fmt: skip
    probe, _ = load_or_train_probe(args.probe)
    examples = load_examples(args.data, args.split, args.max_examples)
    num_weights, k = len(args.weights), args.candidates
    right, scores, start = [], [], time.perf_counter()
    for first in range(0, len(examples), args.batch_size):
        batch = examples[first : first + args.batch_size]
        final = {}

        def keep_final(pipeline, step, timestep, tensors):
            final.update(tensors)
            return {}

        out = pipe(
            [e.instruction for e in batch],
            images=[[Image.open(p).convert("RGB") for p in e.image_paths] for e in batch],
            audio=[list(e.audio_paths) for e in batch],
            caption_embedding_weight=list(args.weights),
            num_candidate_images=k,
            generator=[example_generator(args.seed, e.index) for e in batch],
            on_invalid_answer="use_base",
            output_type="pt",
            callback_on_step_end=keep_final,
            callback_on_step_end_tensor_inputs=["latents", "conditioning_embeds"],
        )
        # Rows (example, weight, candidate); every candidate decoded as the pipeline decodes its pick, read by the
        # probe from the 8-bit image the evaluator reads, scored against the caption the pipeline judged with.
        decoded = pipe.vae_decode(final["latents"])
        candidates = pipe.image_processor.postprocess(decoded, output_type="pt")
        judged = [parse_answer(answer).caption or None for answer in out.answers]
        per_example = num_weights * k
        score = pipe.score_candidate_images(
            candidates, [c for c in judged for _ in range(per_example)], final["conditioning_embeds"],
            pipe._execution_device,
        ).cpu()  # fmt: skip
        readings = probe.read(pipe.image_processor.postprocess(decoded, output_type="pil"))
        targets = [SceneReading.from_scene(e.target_scene) for e in batch for _ in range(per_example)]
        verdict = torch.tensor([r == t for r, t in zip(readings, targets)])
        for i, example in enumerate(batch):
            chosen = i * per_example + int(score[i * per_example : (i + 1) * per_example].argmax())
            if not torch.equal(candidates[chosen], out.images[i]):
                raise RuntimeError(f"{example.id}: the pipeline's output is not the best-scored candidate.")
        right.append(verdict.view(len(batch), num_weights, k))
        scores.append(score.view(len(batch), num_weights, k))
    seconds = (time.perf_counter() - start) / len(examples)
    rows = tally(torch.cat(right), torch.cat(scores))
    for row in rows:
        row["weights"] = [args.weights[w] for w in row["weights"]]
    n = len(examples)
    print(f"{args.model} on {args.split}: {n} examples, {seconds:.2f} s per edit with {num_weights} × {k} candidates")
    print(f"{'caption weights':>20}  {'candidates':>10}  {'edits right':>12}  {'any right':>10}")
    for row in rows:
        weights = " ".join(f"{w:g}" for w in row["weights"])
        print(f"{weights:>20}  {row['candidates']:>10}  {row['right']:>5} {row['right'] / n:>6.1%}  "
              f"{row['any_right']:>10}")  # fmt: skip
    results = {"split": args.split, "num_examples": n, "seconds_per_edit": seconds, "rows": rows}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
