#!/usr/bin/env python
"""Upper bound of a ShapesWorld pipeline's decoder: edits conditioned on the ImageBind embedding of the TRUE target.

    python benchmarks/decoder_oracle.py --model . --data build/shapesworld/data --split test --max_examples 128

For each example the target scene is rendered, encoded by the pipeline's own ImageBind, rescaled to the conditioning
norm and passed as ``conditioning_embeds``, with the target's caption as ``captions`` (read by text-to-image decoders).
The LLM and the prior do not run; the instruction's first image is the one inverted; the pipeline's edit settings
apply. The attribute probe then reads the output. What this measures is the decoder alone: if it cannot render a
target from the target's own embedding (and caption), no LLM can make the edit succeed.
Prints the probe-exact share per ``--structure_preservation`` value and writes JSON with ``--output``.
"""

import argparse
import json
import sys

import numpy as np
import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.models.mm_adapter import rescale_to_norm
from diffusers_any2pix.shapes.evaluate import example_generator, load_examples, load_or_train_probe, open_image
from diffusers_any2pix.shapes.world import caption, render_scene


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved InstructAny2PixPipeline folder")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--probe", default=None, help="probe folder (trained and saved there when empty)")
    parser.add_argument("--max_examples", type=int, default=128)
    parser.add_argument("--structure_preservation", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.max_examples < 1 or args.batch_size < 1:
        parser.error("--max_examples and --batch_size must be positive.")
    if any(not 0.0 <= value <= 1.0 for value in args.structure_preservation):
        parser.error("--structure_preservation values must lie in [0, 1].")
    return args


@torch.no_grad()
def target_embeddings(pipeline: InstructAny2PixPipeline, scenes, norm: float) -> torch.Tensor:
    """ImageBind embeddings of the rendered ``scenes``, at the conditioning norm."""
    pixels = pipeline.imagebind_processor.preprocess_image([render_scene(scene) for scene in scenes])
    embeds = pipeline.image_encoder.encode_image(pixels.to(pipeline.device, pipeline.image_encoder.dtype))
    return rescale_to_norm(embeds.float(), norm)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pipeline = InstructAny2PixPipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    probe, _ = load_or_train_probe(args.probe, progress=False)
    examples = load_examples(args.data, args.split, args.max_examples)
    norm = pipeline.resolve_edit_settings()["embedding_norm"]
    results = {}
    for preservation in args.structure_preservation:
        exact = []
        for start in range(0, len(examples), args.batch_size):
            batch = examples[start : start + args.batch_size]
            out = pipeline(
                [example.instruction for example in batch],
                images=[[open_image(path) for path in example.image_paths] for example in batch],
                audio=[list(example.audio_paths) for example in batch],
                conditioning_embeds=target_embeddings(pipeline, [e.target_scene for e in batch], norm),
                captions=[caption(e.target_scene) for e in batch],
                structure_preservation=preservation,
                generator=[example_generator(args.seed, example.index) for example in batch],
            )
            exact += [scene == example.target_scene for scene, example in zip(probe.read_scene(out.images), batch)]
        results[str(preservation)] = float(np.mean(exact))
        print(
            f"{args.split}: structure_preservation {preservation}: {np.mean(exact):.1%} of {len(exact)} targets "
            "rendered exactly from their own embedding"
        )
    report = {"model": args.model, "split": args.split, "num_examples": len(examples), "exact": results}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
