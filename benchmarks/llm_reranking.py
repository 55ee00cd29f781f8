#!/usr/bin/env python
"""How often a ShapesWorld pipeline's LLM writes the target caption, with its beams reranked at several weights.

    python benchmarks/llm_reranking.py --model . --data build/shapesworld/data --split val --num_beams 8 \\
        --weights 0 0.25 0.5 0.75 1 1.5 --base_weights 0 0.005

One pipeline call per batch (one decoder step, latents out: only the caption matters) keeps every final beam of the
LLM through `generate_with_media`'s ``candidate_scorer`` hook; each pair of weights is then scored on those same beams
by the pipeline's own scorer (beam score + ``llm_rerank_weight`` · cos(ImageBind(caption), the answer's generation
embedding) + ``llm_base_agreement_weight`` · agreement of the caption with the answer's base image), so the
comparison is paired. Printed per pair: the exact target captions, overall and per instruction type; ``oracle``:
examples where any of the beams is the target caption. Then the LLM stage's time per instruction (mean over
``--timing_examples``) with plain beam search and with reranking. Pick the weights on ``--split val``.
"""

import argparse
import json
import time
from collections import Counter

import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix import pipeline_instruct_any2pix as pipeline_module
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.multimodal_llm import parse_answer
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.world import caption


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved pipeline folder with imagebind_tokenizer")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max_examples", type=int, default=None)
    parser.add_argument("--num_beams", type=int, default=8)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    parser.add_argument("--base_weights", type=float, nargs="+", default=[0.0], help="llm_base_agreement_weight values")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--timing_examples", type=int, default=32, help="instructions timed per decoding (0: skip)")
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.num_beams < 2:
        parser.error(f"--num_beams must be at least 2 (reranking chooses among beams), got {args.num_beams}.")
    for name in ("weights", "base_weights"):
        if any(not w >= 0 for w in getattr(args, name)):
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    return args


def _call(pipe, batch, **kwargs):
    return pipe(
        [e.instruction for e in batch],
        images=[[Image.open(p).convert("RGB") for p in e.image_paths] for e in batch],
        audio=[list(e.audio_paths) for e in batch],
        num_inference_steps=1,
        output_type="latent",
        llm_do_sample=False,
        on_invalid_answer="use_base",
        **kwargs,
    )


def collect_beams(pipe, examples, num_beams: int, batch_size: int) -> list[dict]:
    """Every final beam of every example: ``texts``, ``beam_scores``, ``generation_embeds``, ``base_embeds`` (the
    scorer's inputs) and the example's ImageBind vectors ``media_embeds``."""
    original = pipeline_module.generate_with_media
    batch_beams = []

    def keep_all(*args, candidate_scorer=None, **kwargs):
        def record(row, texts, beam_scores, generation_embeds, base_embeds):
            batch_beams.append({"texts": texts, "beam_scores": beam_scores, "generation_embeds": generation_embeds,
                                "base_embeds": base_embeds, "media_embeds": kwargs["media_embeds"][row]})  # fmt: skip
            return 0

        return original(*args, candidate_scorer=record, **kwargs)

    pipeline_module.generate_with_media = keep_all
    beams = []
    try:
        for start in range(0, len(examples), batch_size):
            batch_beams.clear()
            _call(pipe, examples[start : start + batch_size], llm_num_beams=num_beams, llm_rerank_weight=0.0,
                  llm_base_agreement_weight=0.0, llm_base_focus_weight=0.0, base_instruction_weight=0.0,
                  llm_ensemble_weight=0.0)  # fmt: skip
            beams.extend(batch_beams)
    finally:
        pipeline_module.generate_with_media = original
    return beams


def time_llm(pipe, examples, **kwargs) -> float:
    """Seconds per instruction spent in `generate_with_media` (the LLM stage, scoring included)."""
    original = pipeline_module.generate_with_media
    spent = [0.0]

    def timed(*args, **kw):
        start = time.perf_counter()
        try:
            return original(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - start

    pipeline_module.generate_with_media = timed
    try:
        for start in range(0, len(examples), 8):
            _call(pipe, examples[start : start + 8], **kwargs)
    finally:
        pipeline_module.generate_with_media = original
    return spent[0] / len(examples)


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.imagebind_tokenizer is None:
        raise SystemExit(f"--model {args.model}: the pipeline has no imagebind_tokenizer; reranking needs one.")
    examples = load_examples(args.data, args.split, args.max_examples)
    targets = [caption(e.target_scene) for e in examples]
    beams = collect_beams(pipe, examples, args.num_beams, args.batch_size)
    device = pipe._execution_device

    captions_of = [[parse_answer(t).caption for t in b["texts"]] for b in beams]
    oracle = sum(target in caps for target, caps in zip(targets, captions_of))
    print(f"{args.model} on {args.split}: {len(examples)} examples, {args.num_beams} beams; "
          f"a beam writes the target caption in {oracle} ({oracle / len(examples):.1%})")  # fmt: skip
    results = {"split": args.split, "num_examples": len(examples), "num_beams": args.num_beams, "oracle": oracle}
    types = sorted({e.type for e in examples})
    counts = Counter(e.type for e in examples)
    parsed = [parse_instruction(e.instruction, len(e.image_paths), len(e.audio_paths)) for e in examples]
    print(f"{'weight':>8} {'base':>6}  {'exact':>12}  " + "  ".join(f"{t:>10}" for t in types))
    for base_weight in args.base_weights:
        for weight in args.weights:
            exact, per_type, chosen = 0, Counter(), []
            for example, target, b, caps, p in zip(examples, targets, beams, captions_of, parsed):
                pick = 0
                if weight > 0 or base_weight > 0:
                    # One example at a time: its instruction and media are row 0 of the scorer's batch.
                    scorer = pipe.caption_agreement_scorer(weight, device, base_weight, [p], [b["media_embeds"]])
                    pick = scorer(0, b["texts"], b["beam_scores"], b["generation_embeds"], b["base_embeds"])
                chosen.append(caps[pick])
                hit = caps[pick] == target
                exact += hit
                per_type[example.type] += hit
            key = f"weight={weight:g}" + (f",base_weight={base_weight:g}" if base_weight > 0 else "")
            results[key] = {"exact": exact, "per_type": dict(per_type), "captions": chosen}
            print(f"{weight:>8g} {base_weight:>6g}  {exact:>5} {exact / len(examples):>6.1%}  "
                  + "  ".join(f"{per_type[t]:>4}/{counts[t]:<5}" for t in types))  # fmt: skip

    if args.timing_examples > 0:
        subset = examples[: args.timing_examples]
        # The scoring costs the same at any weight above 0; weights are passed so stored defaults do not apply.
        plain = dict(
            llm_rerank_weight=0.0, llm_base_agreement_weight=0.0, llm_base_focus_weight=0.0, base_instruction_weight=0.0,
            llm_ensemble_weight=0.0,
        )
        timings = {
            "4 beams": time_llm(pipe, subset, llm_num_beams=4, **plain),
            f"{args.num_beams} beams": time_llm(pipe, subset, llm_num_beams=args.num_beams, **plain),
            f"{args.num_beams} beams reranked": time_llm(
                pipe, subset, llm_num_beams=args.num_beams, llm_rerank_weight=0.5, llm_base_agreement_weight=0.0,
                llm_base_focus_weight=0.0, base_instruction_weight=0.0, llm_ensemble_weight=0.0,
            ),
        }
        if max(args.base_weights) > 0:
            timings[f"{args.num_beams} beams reranked + base agreement"] = time_llm(
                pipe, subset, llm_num_beams=args.num_beams, llm_rerank_weight=0.5,
                llm_base_agreement_weight=max(args.base_weights), llm_base_focus_weight=0.0,
                base_instruction_weight=0.0, llm_ensemble_weight=0.0,
            )  # fmt: skip
        results["llm_seconds_per_instruction"] = timings
        print("LLM stage, seconds per instruction: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
