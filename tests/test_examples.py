import sys
from pathlib import Path

import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import edit  # noqa: E402


def test_edit_cli_on_the_embedded_model(tmp_path, capsys):
    output = tmp_path / "edited.png"
    code = edit.main([
        "--model", str(REPO), "--instruction", "add [audio1] to [image1]",
        "--image", str(REPO / "examples" / "assets" / "scene.png"),
        "--audio", str(REPO / "examples" / "assets" / "yellow_star.wav"),
        "--output", str(output), "--seed", "0", "--num_inference_steps", "3",
    ])  # fmt: skip
    assert code == 0
    with PIL.Image.open(output) as image:
        assert image.size == (32, 32)
    printed = capsys.readouterr().out
    assert "caption:" in printed and "base image: [image1]" in printed


def test_edit_cli_reports_bad_input(tmp_path, capsys):
    code = edit.main([
        "--model", str(REPO), "--instruction", "add [audio1] to [image1]",
        "--image", str(REPO / "examples" / "assets" / "scene.png"), "--output", str(tmp_path / "x.png"),
    ])  # fmt: skip
    assert code == 2
    assert "[audio1] but only 0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_edit_cli_requires_arguments():
    with pytest.raises(SystemExit):
        edit.parse_args(["--model", "."])
