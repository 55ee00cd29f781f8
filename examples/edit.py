#!/usr/bin/env python
"""Edit an image with a multimodal instruction from the command line.

Example:
    python examples/edit.py --model . --instruction "add [audio1] to [image1] on the right" \\
        --image examples/assets/scene.png --audio examples/assets/yellow_star.wav --output edited.png --seed 0
"""

import argparse
import sys
import time

import torch

from diffusers_any2pix import InstructAny2PixPipeline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub id (e.g. '.' for the embedded model).")
    parser.add_argument("--instruction", required=True, help='e.g. "add [audio1] to [image1]".')
    parser.add_argument("--image", action="append", default=[], help="Image for [image1], [image2], … (repeat).")
    parser.add_argument("--audio", action="append", default=[], help="Audio file for [audio1], … (repeat).")
    parser.add_argument("--output", required=True, help="Where to write the edited PNG.")
    parser.add_argument("--seed", type=int, default=0)
    # Edit knobs left unset use the model's `edit_defaults`, else the official defaults (pipeline docstring).
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Official `steps` (25).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Official `cfg` (10).")
    parser.add_argument("--structure_preservation", type=float, default=None, help="Official `alpha` (0.7).")
    parser.add_argument(
        "--embedding_weights", type=float, nargs=3, default=None, metavar=("BASE", "GEN", "REFINED"),
        help="Official `h` (0 0.4 1): weights of the base-image, LLM and refined embeddings.",
    )  # fmt: skip
    parser.add_argument("--embedding_norm", type=float, default=None, help="Official `norm` (20).")
    parser.add_argument("--ip_adapter_scale", type=float, default=None, help="Official `scale` (1.0).")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"Loading {args.model} …", file=sys.stderr)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    pipe.to(args.device)
    print(f"Loaded in {time.perf_counter() - start:.1f}s; editing …", file=sys.stderr)

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        out = pipe(
            args.instruction,
            images=args.image or None,
            audio=args.audio or None,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            structure_preservation=args.structure_preservation,
            embedding_weights=args.embedding_weights,
            embedding_norm=args.embedding_norm,
            ip_adapter_scale=args.ip_adapter_scale,
            height=args.height,
            width=args.width,
            generator=generator,
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out.images[0].save(args.output)
    print(f"LLM answer: {out.answers[0]}")
    print(f"caption: {out.captions[0]}")
    print(f"base image: [image{out.base_image_indices[0] + 1}]")
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
