"""examples/make_figure.py: the README figure of a ShapesWorld model (tiny dataset and tiny pipeline; CPU)."""

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import INSTRUCTION_TYPES, caption, generate_dataset, render_scene
from diffusers_any2pix.shapes.evaluate import example_generator, load_examples
from diffusers_any2pix.testing_utils import save_tiny_pipeline


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import make_figure  # noqa: E402
from make_figure import GAP, HEADER_HEIGHT, INSTRUCTION_CELLS, LABEL_LINES, LINE_HEIGHT, MARGIN  # noqa: E402


CELL = 40
TYPES = ("add_audio", "pick_base")  # an audio input, and several images of which one is edited


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("figure")
    data, model = str(root / "data"), str(root / "pipeline")
    generate_dataset(data, 30, seed=0, image_size=32, sound_duration=1.0, progress=False)
    save_tiny_pipeline(model)
    return {"root": root, "data": data, "model": model}


def _args(workspace, output, *extra) -> list[str]:
    return ["--model", workspace["model"], "--data", workspace["data"], "--split", "train",
            "--output", str(output), *extra]  # fmt: skip


def _crop(image: PIL.Image.Image, x: int, y: int, size: int) -> np.ndarray:
    return np.asarray(image.crop((x, y, x + size, y + size)))


def test_figure_layout_table_and_determinism(workspace, tmp_path):
    examples = load_examples(workspace["data"], "train")
    rows = [next(e for e in examples if e.type == name) for name in TYPES]
    assert len(rows[0].audio_paths) == 1 and len(rows[1].image_paths) >= 2  # what the test relies on

    outputs = [tmp_path / "a" / "figure.png", tmp_path / "b" / "figure.png"]
    for output in outputs:
        assert make_figure.main(_args(workspace, output, "--types", *TYPES, "--cell", str(CELL))) == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()

    # Layout: inputs (the widest row's count), instruction (INSTRUCTION_CELLS cells), output and target columns.
    widest = max(len(e.image_paths) + len(e.audio_paths) for e in rows)
    row_height = CELL + LABEL_LINES * LINE_HEIGHT
    column_x = [MARGIN]
    for width in (widest * CELL + (widest - 1) * GAP, INSTRUCTION_CELLS * CELL, CELL):
        column_x.append(column_x[-1] + width + GAP)
    expected_size = (column_x[3] + CELL + MARGIN, MARGIN + HEADER_HEIGHT + 2 * row_height + GAP + MARGIN)
    assert make_figure.figure_size([2, widest], CELL) == expected_size

    pipeline = InstructAny2PixPipeline.from_pretrained(workspace["model"])
    with PIL.Image.open(outputs[0]) as figure:
        assert figure.mode == "RGB" and figure.size == expected_size
        for r, example in enumerate(rows):
            y = MARGIN + HEADER_HEIGHT + r * (row_height + GAP)
            with PIL.Image.open(example.image_paths[0]) as first:
                expected_input = first.convert("RGB").resize((CELL, CELL), PIL.Image.NEAREST)
            np.testing.assert_array_equal(_crop(figure, column_x[0], y, CELL), np.asarray(expected_input))
            target = render_scene(example.target_scene, 64).resize((CELL, CELL), PIL.Image.NEAREST)
            np.testing.assert_array_equal(_crop(figure, column_x[3], y, CELL), np.asarray(target))
            # The output cell is the evaluator's call on this example.
            edited = pipeline(
                example.instruction,
                images=[PIL.Image.open(path).convert("RGB") for path in example.image_paths],
                audio=list(example.audio_paths),
                generator=example_generator(0, example.index),
                llm_do_sample=False,
                on_invalid_answer="use_base",
            ).images[0]
            expected_output = edited.convert("RGB").resize((CELL, CELL), PIL.Image.NEAREST)
            np.testing.assert_array_equal(_crop(figure, column_x[2], y, CELL), np.asarray(expected_output))

    table = outputs[0].with_suffix(".md").read_text(encoding="utf-8").splitlines()
    assert table[:2] == ["| # | type | instruction | LLM caption | target caption |", "|---|---|---|---|---|"]
    assert len(table) == 2 + len(rows)
    for i, (line, example) in enumerate(zip(table[2:], rows), start=1):
        assert line.startswith(f"| {i} | {example.type} | `{example.instruction}` | ")
        assert line.endswith(f"| {caption(example.target_scene)} |")

    # Another seed gives other noise, hence another figure.
    other = tmp_path / "seed1.png"
    assert make_figure.main(_args(workspace, other, "--types", *TYPES, "--cell", str(CELL), "--seed", "1")) == 0
    assert other.read_bytes() != outputs[0].read_bytes()


def test_select_examples(workspace):
    examples = load_examples(workspace["data"], "train")
    default = make_figure.select_examples(examples)
    present = [name for name in INSTRUCTION_TYPES if any(e.type == name for e in examples)]
    assert [e.type for e in default] == present
    assert all(e is next(x for x in examples if x.type == e.type) for e in default)  # the first of each type
    two = make_figure.select_examples(examples, ["remove", "add_text"], per_type=2)
    assert [e.type for e in two] == ["remove", "remove", "add_text", "add_text"]
    assert [e.index for e in two[:2]] == [e.index for e in examples if e.type == "remove"][:2]
    with pytest.raises(ValueError, match="`per_type` must be a positive int"):
        make_figure.select_examples(examples, per_type=0)
    with pytest.raises(ValueError, match="Unknown instruction type 'rotate'"):
        make_figure.select_examples(examples, ["rotate"])
    with pytest.raises(ValueError, match="'remove' is requested twice"):
        make_figure.select_examples(examples, ["remove", "remove"])


def test_compose_figure_and_table_without_a_pipeline(workspace):
    example = next(e for e in load_examples(workspace["data"], "train") if e.type == "add_text")
    output = PIL.Image.new("RGB", (32, 32), (255, 0, 0))
    row = make_figure.FigureRow(example, output, "a | b", valid_answer=False, edited_index=0)
    figure = make_figure.compose_figure([row], cell=32)
    assert figure.size == make_figure.figure_size([1], 32)
    y = MARGIN + HEADER_HEIGHT
    x_output = MARGIN + 32 + GAP + INSTRUCTION_CELLS * 32 + GAP
    assert (_crop(figure, x_output, y, 32) == (255, 0, 0)).all()
    line = make_figure.markdown_table([row]).splitlines()[2]
    assert "| (invalid answer: base re-rendered) a \\| b |" in line  # the pipe is escaped
    with pytest.raises(ValueError, match="`rows` is empty"):
        make_figure.compose_figure([])
    with pytest.raises(ValueError, match="`cell` must be an int of at least 32, got 16"):
        make_figure.compose_figure([row], cell=16)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--per_type", "0"], "--per_type must be a positive integer, got 0"),
        (["--cell", "8"], "--cell must be at least 32, got 8"),
        (["--types", "rotate"], "invalid choice: 'rotate'"),
        (["--types", "remove", "remove"], "'remove' is requested twice"),
        (["--split", "nosuch"], "No split 'nosuch'"),
        (["--split", "val", "--types", "pick_base"], "no example of type 'pick_base'"),
    ],
)
def test_cli_errors(workspace, tmp_path, capsys, extra, message):
    output = tmp_path / "figure.png"
    args = _args(workspace, output)  # `extra` comes last, so its --split overrides "train"
    with pytest.raises(SystemExit) as exit_info:
        make_figure.main(args + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_cli_rejects_a_missing_model(workspace, tmp_path, capsys):
    output = tmp_path / "figure.png"
    args = _args(workspace, output)
    args[1] = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        make_figure.main(args)
    assert exit_info.value.code == 2
    assert "is not a saved pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert not output.exists()
