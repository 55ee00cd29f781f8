#!/usr/bin/env python
"""Does the colour word an LLM has just written rule out a shape it never saw with that colour?

    python benchmarks/llm_language_prior.py --model . --data build/shapesworld/data --split test

For every object of a test target whose shape/colour pair was held out of training (e.g. a purple circle), the LLM's
answer is teacher-forced up to that object's colour word — ``Sure. <base><video><im_gen_start><im_gen>[`` and the
target caption up to ``a purple`` — with the instruction and its media injected exactly as the pipeline does, and the
LLM's next-token probabilities over the shape words are read. Then the same with the colour word swapped for each
other colour (pairs seen in training), image and everything else unchanged. If the shape is read from the image, the
colour word before it should not matter; if the LLM has learnt from the captions that purple things are never
circles, the true colour word suppresses the true shape. Prints, for the true and for the swapped colour words, the
share of objects whose most probable shape is the true one and the mean probability of the true shape among the
shapes; ``--output`` writes JSON.
"""

import argparse
import json
import sys

import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.multimodal_llm import prepare_multimodal_inputs
from diffusers_any2pix.shapes.evaluate import load_examples, open_image
from diffusers_any2pix.shapes.generate import HELDOUT_SHAPE_COLOUR
from diffusers_any2pix.shapes.instructions import ANSWER_TEMPLATE
from diffusers_any2pix.shapes.world import COLOURS, SHAPES, article, caption


# The answer as the LLM was trained to write it (data.build_llm_sample), up to the opening bracket of the caption.
ANSWER_PREFIX = ANSWER_TEMPLATE.split("[")[0].replace("<base>", "<base><video><im_gen_start>") + "<im_gen>["


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved InstructAny2PixPipeline folder")
    parser.add_argument("--data", required=True, help="a ShapesWorld dataset root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_examples", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        parser.error("--max_examples must be positive.")
    return args


def word_ids(tokenizer, words) -> list[int]:
    """The single token of each word as it follows a space in a caption; an error naming the first word that is not
    one token (the probe compares whole words)."""
    ids = []
    for word in words:
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1 or tokens[0] == tokenizer.unk_token_id:
            raise ValueError(f"The LLM tokenizer does not read {word!r} as one known token (got {tokens}).")
        ids.extend(tokens)
    return ids


@torch.no_grad()
def shape_probabilities(pipe: InstructAny2PixPipeline, example, prefixes: list[str], shape_ids: list[int]) -> torch.Tensor:
    """``(len(prefixes), len(SHAPES))``: the LLM's next-token probabilities of the shape words, renormalised over
    them, after each answer prefix, with ``example``'s instruction and media as the pipeline gives them."""
    parsed = parse_instruction(example.instruction, len(example.image_paths), len(example.audio_paths))
    images = [pipe.imagebind_processor.load_image(open_image(path)) for path in example.image_paths]
    audio = [pipe.imagebind_processor.load_audio(path) for path in example.audio_paths]
    device = pipe._execution_device
    media, patches = pipe.encode_media([parsed], [images], [audio], device)
    prompt = pipe.llm_prompt(parsed)
    embeds, _, _ = prepare_multimodal_inputs(
        pipe.llm, pipe.llm_tokenizer, pipe.mm_adapter, [prompt], media, pipe.token_ids, image_patches=patches
    )
    embedding = pipe.llm.get_input_embeddings()
    rows = []
    for prefix in prefixes:
        answer = pipe.llm_tokenizer(prefix, add_special_tokens=False)["input_ids"]
        sequence = torch.cat([embeds, embedding(torch.tensor([answer], device=embeds.device))], dim=1)
        logits = pipe.llm(inputs_embeds=sequence).logits[0, -1].float()
        rows.append(logits[shape_ids].softmax(dim=-1))
    return torch.stack(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = InstructAny2PixPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    shape_ids = word_ids(pipe.llm_tokenizer, SHAPES)
    word_ids(pipe.llm_tokenizer, COLOURS)
    totals = {key: {"objects": 0, "shape_right": 0, "p_true_shape": 0.0} for key in ("true_colour", "other_colour")}
    for example in load_examples(args.data, args.split, args.max_examples):
        target = caption(example.target_scene)
        for obj in example.target_scene.objects:
            if (obj.shape, obj.colour) not in HELDOUT_SHAPE_COLOUR:
                continue
            start = target.index(obj.phrase())
            prefixes = [ANSWER_PREFIX + target[:start] + f"{article(c)} {c}" for c in COLOURS]
            probs = shape_probabilities(pipe, example, prefixes, shape_ids)
            true_shape = SHAPES.index(obj.shape)
            for colour, row in zip(COLOURS, probs):
                entry = totals["true_colour" if colour == obj.colour else "other_colour"]
                entry["objects"] += 1
                entry["shape_right"] += int(row.argmax()) == true_shape
                entry["p_true_shape"] += float(row[true_shape])
    report = {"model": args.model, "data": args.data, "split": args.split, "prefix": ANSWER_PREFIX, "results": {}}
    print(f"LLM language prior of {args.model} on {args.split}: shape after the object's colour word")
    for key, entry in totals.items():
        n = max(entry["objects"], 1)
        result = {
            "objects": entry["objects"],
            "shape_right": entry["shape_right"] / n,
            "mean_p_true_shape": entry["p_true_shape"] / n,
        }
        report["results"][key] = result
        print(
            f"  {key:13s} n={result['objects']:5d}  true shape most probable {100 * result['shape_right']:5.1f}%  "
            f"mean p(true shape) {result['mean_p_true_shape']:.3f}"
        )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
