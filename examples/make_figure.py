#!/usr/bin/env python
"""Render the README figure of a ShapesWorld model: inputs → output for several instruction types.

Example:
    python examples/make_figure.py --model . --data data/shapes --split test \\
        --types add_audio remove recolour --per_type 1 --seed 0 --output docs/shapesworld_examples.png

For each requested instruction type (default: every type present in the split, in `INSTRUCTION_TYPES` order) the
first ``--per_type`` examples of that type are run through the pipeline exactly as the evaluator runs them
(deterministic LLM decoding, ``on_invalid_answer="use_base"``, the generator `example_generator(seed, index)`, the
pipeline's own defaults otherwise). One row per example shows, under the column headers "inputs", "instruction",
"output" and "target":

- the input images (``[image1]``, … resized to ``--cell`` with nearest-neighbour so small renders stay crisp; the
  one the pipeline edited is marked "edited") and a speaker box per audio clip naming the clip's file;
- the instruction type, the instruction text and the target caption, wrapped;
- the output image, with the LLM's caption under it (and under the target);
- the target scene rendered with ``render_scene(target_scene, 64)``.

A markdown table next to the PNG (same stem, ``.md``) lists every row: type, instruction, LLM caption, target caption.
The same arguments give a byte-identical PNG (on the same device and software versions).

Layout, in pixels (C = ``--cell``, N = the most inputs of any row): columns N·C + (N-1)·GAP (inputs),
INSTRUCTION_CELLS·C (instruction), C (output), C (target), separated by GAP inside a MARGIN; a HEADER_HEIGHT header,
then rows of C + LABEL_LINES·LINE_HEIGHT separated by GAP (see `figure_size`).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.multimodal_llm import parse_answer
from diffusers_any2pix.shapes import INSTRUCTION_TYPES, caption, render_scene
from diffusers_any2pix.shapes.evaluate import EvaluationExample, example_generator, load_examples, open_image


MARGIN = 8
GAP = 8
HEADER_HEIGHT = 18
LINE_HEIGHT = 12  # the default PIL font is 11-12 px tall
LABEL_LINES = 3  # text lines under each image cell
INSTRUCTION_CELLS = 2  # the instruction column is this many cells wide
MIN_CELL = 32  # room for the speaker glyph and a line of text
TARGET_RENDER_SIZE = 64
COLUMNS = ("inputs", "instruction", "output", "target")
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MUTED = (110, 110, 110)
AUDIO_BOX = (232, 236, 244)


@dataclass
class FigureRow:
    """One row of the figure.

    Args:
        example ([`EvaluationExample`]): the example.
        output (`PIL.Image.Image`): the pipeline's output.
        llm_caption (`str`, *optional*): the caption in the LLM's answer (``None`` when it has none).
        valid_answer (`bool`): whether the answer has a generation embedding; without one the pipeline re-rendered
            the base (``on_invalid_answer="use_base"``).
        edited_index (`int`): index into ``example.image_paths`` of the image the pipeline edited.
    """

    example: EvaluationExample
    output: PIL.Image.Image
    llm_caption: Optional[str]
    valid_answer: bool
    edited_index: int


def select_examples(
    examples: Sequence[EvaluationExample], types: Optional[Sequence[str]] = None, per_type: int = 1
) -> list[EvaluationExample]:
    """
    The first ``per_type`` examples of each type, grouped by type in the order of ``types``.

    Args:
        examples (`Sequence[EvaluationExample]`): a split, from `load_examples`.
        types (`Sequence[str]`, *optional*): instruction types; defaults to every type present, in
            `INSTRUCTION_TYPES` order.
        per_type (`int`, defaults to 1): examples per type (fewer when the split has fewer).

    Returns:
        `list[EvaluationExample]`.

    Raises:
        `ValueError`: an unknown, repeated or absent type, or ``per_type`` below 1.
    """
    if isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"`per_type` must be a positive int, got {per_type!r}.")
    present = {example.type for example in examples}
    if types is None:
        types = [name for name in INSTRUCTION_TYPES if name in present]
    for i, name in enumerate(types):
        if name not in INSTRUCTION_TYPES:
            raise ValueError(f"Unknown instruction type {name!r}; expected one of {list(INSTRUCTION_TYPES)}.")
        if name in types[:i]:
            raise ValueError(f"Instruction type {name!r} is requested twice.")
        if name not in present:
            raise ValueError(f"The split has no example of type {name!r}; it has {sorted(present)}.")
    return [example for name in types for example in [e for e in examples if e.type == name][:per_type]]


@torch.no_grad()
def run_examples(
    pipeline: InstructAny2PixPipeline, examples: Sequence[EvaluationExample], seed: int = 0
) -> list[FigureRow]:
    """
    Run each example through the pipeline as the evaluator does (`shapes.evaluate.run_evaluation`).

    Args:
        pipeline ([`InstructAny2PixPipeline`]): the pipeline, on its device.
        examples (`Sequence[EvaluationExample]`): the examples.
        seed (`int`, defaults to 0): seeds each example's generator, ``example_generator(seed, example.index)``.

    Returns:
        `list[FigureRow]`, in example order.
    """
    rows = []
    for example in examples:
        out = pipeline(
            example.instruction,
            images=[open_image(path) for path in example.image_paths],
            audio=list(example.audio_paths),
            generator=example_generator(seed, example.index),
            llm_do_sample=False,
            on_invalid_answer="use_base",
        )
        # The answer's own caption: `out.captions` falls back to the instruction text for an invalid answer.
        answer = parse_answer(out.answers[0])
        output, edited_index = out.images[0].convert("RGB"), out.base_image_indices[0]
        rows.append(FigureRow(example, output, answer.caption, answer.has_im_gen, edited_index))
    return rows


def _num_inputs(example: EvaluationExample) -> int:
    return len(example.image_paths) + len(example.audio_paths)


def figure_size(num_inputs: Sequence[int], cell: int) -> tuple[int, int]:
    """
    ``(width, height)`` of the figure.

    Args:
        num_inputs (`Sequence[int]`): per row, its number of inputs (images and audio clips).
        cell (`int`): the image cell size.

    Returns:
        `tuple[int, int]`.
    """
    widest = max(num_inputs)
    width = 2 * MARGIN + (widest + INSTRUCTION_CELLS + 2) * cell + (widest + 2) * GAP
    row_height = cell + LABEL_LINES * LINE_HEIGHT
    height = 2 * MARGIN + HEADER_HEIGHT + len(num_inputs) * row_height + (len(num_inputs) - 1) * GAP
    return width, height


def _wrap(draw: PIL.ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words wider than a line are split; overflow ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def _draw_lines(draw, lines: Sequence[str], x: int, y: int, font, fill=INK) -> None:
    for i, line in enumerate(lines):
        draw.text((x, y + i * LINE_HEIGHT), line, font=font, fill=fill)


def _draw_audio_box(draw, x: int, y: int, cell: int, name: str, font) -> None:
    """A speaker glyph (body, cone, two sound waves) over the clip's file name."""
    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=AUDIO_BOX, outline=MUTED)
    u = cell / 10
    cx, cy = x + cell / 2, y + 0.4 * cell
    draw.rectangle((cx - 2.5 * u, cy - u, cx - 1.5 * u, cy + u), fill=INK)
    draw.polygon([(cx - 1.5 * u, cy - u), (cx, cy - 2.5 * u), (cx, cy + 2.5 * u), (cx - 1.5 * u, cy + u)], fill=INK)
    for radius in (1.5 * u, 2.5 * u):
        draw.arc((cx - radius, cy - radius, cx + radius, cy + radius), -45, 45, fill=INK, width=max(1, round(u / 3)))
    lines = _wrap(draw, name, font, cell - 4, 2)
    _draw_lines(draw, lines, x + 2, y + cell - 2 - len(lines) * LINE_HEIGHT, font)


def compose_figure(rows: Sequence[FigureRow], cell: int = 96) -> PIL.Image.Image:
    """
    Draw the figure (layout: `figure_size`).

    Args:
        rows (`Sequence[FigureRow]`): the rows, top to bottom.
        cell (`int`, defaults to 96): the image cell size in pixels.

    Returns:
        `PIL.Image.Image`: an RGB image of size ``figure_size([inputs per row], cell)``.
    """
    if not rows:
        raise ValueError("`rows` is empty: nothing to draw.")
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < MIN_CELL:
        raise ValueError(f"`cell` must be an int of at least {MIN_CELL}, got {cell!r}.")
    widest = max(_num_inputs(row.example) for row in rows)
    figure = PIL.Image.new("RGB", figure_size([_num_inputs(row.example) for row in rows], cell), BACKGROUND)
    draw = PIL.ImageDraw.Draw(figure)
    font = PIL.ImageFont.load_default()
    inputs_width = widest * cell + (widest - 1) * GAP
    column_x = [MARGIN]
    for width in (inputs_width, INSTRUCTION_CELLS * cell, cell):
        column_x.append(column_x[-1] + width + GAP)
    for x, title in zip(column_x, COLUMNS):
        draw.text((x, MARGIN), title, font=font, fill=INK)

    row_height = cell + LABEL_LINES * LINE_HEIGHT
    for r, row in enumerate(rows):
        example = row.example
        y = MARGIN + HEADER_HEIGHT + r * (row_height + GAP)
        label_y = y + cell + 1
        x = column_x[0]
        for k, path in enumerate(example.image_paths):
            figure.paste(open_image(path).resize((cell, cell), PIL.Image.NEAREST), (x, y))
            label = f"[image{k + 1}]" + (" edited" if k == row.edited_index else "")
            _draw_lines(draw, _wrap(draw, label, font, cell, 1), x, label_y, font)
            x += cell + GAP
        for k, path in enumerate(example.audio_paths):
            _draw_audio_box(draw, x, y, cell, os.path.splitext(os.path.basename(path))[0], font)
            _draw_lines(draw, [f"[audio{k + 1}]"], x, label_y, font)
            x += cell + GAP

        # Instruction column: type, instruction, and the target caption, which is too long for a cell's width.
        text_width, text_lines = INSTRUCTION_CELLS * cell, row_height // LINE_HEIGHT
        target = _wrap(draw, "target: " + caption(example.target_scene), font, text_width, max(1, text_lines // 3))
        instruction = _wrap(draw, example.instruction, font, text_width, max(1, text_lines - 2 - len(target)))
        _draw_lines(draw, [example.type], column_x[1], y, font, fill=MUTED)
        _draw_lines(draw, instruction, column_x[1], y + LINE_HEIGHT, font)
        _draw_lines(draw, target, column_x[1], y + (len(instruction) + 2) * LINE_HEIGHT, font, fill=MUTED)

        figure.paste(row.output.resize((cell, cell), PIL.Image.NEAREST), (column_x[2], y))
        target_image = render_scene(example.target_scene, TARGET_RENDER_SIZE)
        figure.paste(target_image.resize((cell, cell), PIL.Image.NEAREST), (column_x[3], y))
        # The LLM's caption runs under the output and the target, so it reads against the target image.
        llm = _wrap(draw, "LLM: " + _llm_text(row), font, 2 * cell + GAP, LABEL_LINES)
        _draw_lines(draw, llm, column_x[2], label_y, font, fill=MUTED)
    return figure


def _llm_text(row: FigureRow) -> str:
    if row.valid_answer:
        return row.llm_caption or "(no caption)"
    return "(invalid answer: base re-rendered)" + (f" {row.llm_caption}" if row.llm_caption else "")


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[FigureRow]) -> str:
    """A markdown table of the rows: type, instruction (as code, so ``[image1]`` stays literal), LLM caption, target
    caption."""
    lines = ["| # | type | instruction | LLM caption | target caption |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, start=1):
        llm = _cell_text(_llm_text(row))
        lines.append(
            f"| {i} | {row.example.type} | `{_cell_text(row.example.instruction)}` | {llm} "
            f"| {_cell_text(caption(row.example.target_scene))} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved InstructAny2PixPipeline folder (e.g. '.').")
    parser.add_argument("--data", required=True, help="A ShapesWorld dataset root (python -m ...shapes.generate).")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--types", nargs="+", default=None, choices=list(INSTRUCTION_TYPES),
        help="Instruction types, one group of rows each (default: every type in the split).",
    )  # fmt: skip
    parser.add_argument("--per_type", type=int, default=1, help="Examples per type: the first ones of the split.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds each example's generator, as the evaluator does.")
    parser.add_argument("--cell", type=int, default=96, help=f"Image cell size in pixels (at least {MIN_CELL}).")
    parser.add_argument("--output", required=True, help="The PNG to write; the markdown table goes next to it (.md).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return parser


def main(argv=None) -> int:
    """Command-line entry point; bad arguments exit through `argparse` (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every argument is checked before the model loads.
    if args.per_type < 1:
        parser.error(f"--per_type must be a positive integer, got {args.per_type}.")
    if args.cell < MIN_CELL:
        parser.error(f"--cell must be at least {MIN_CELL}, got {args.cell}.")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"--model {args.model!r} is not a saved pipeline folder (no model_index.json).")
    try:
        examples = select_examples(load_examples(args.data, args.split), args.types, args.per_type)
    except ValueError as error:
        parser.error(str(error))
    for name in args.types or sorted({e.type for e in examples}):
        found = sum(e.type == name for e in examples)
        if found < args.per_type:
            print(f"note: the split has only {found} example(s) of type {name!r}.", file=sys.stderr)

    start = time.perf_counter()
    pipeline = InstructAny2PixPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    rows = run_examples(pipeline, examples, seed=args.seed)
    figure = compose_figure(rows, args.cell)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.save(args.output)
    table_path = os.path.splitext(args.output)[0] + ".md"
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(markdown_table(rows))
    for row in rows:
        print(f"{row.example.type}: {row.example.instruction} -> LLM: {_llm_text(row)}")
    seconds = time.perf_counter() - start
    print(f"wrote {args.output} ({figure.width}x{figure.height}) and {table_path} in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
