"""benchmarks/decoder_oracle.py: the decoder conditioned on the ImageBind embedding of the true target."""

import importlib.util
import json
import os

import pytest
import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.models.mm_adapter import rescale_to_norm
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.probe import ShapesProbe
from diffusers_any2pix.shapes.world import render_scene
from diffusers_any2pix.testing_utils import save_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("decoder_oracle", os.path.join(REPO, "benchmarks", "decoder_oracle.py"))
decoder_oracle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decoder_oracle)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    generate_dataset(str(root / "data"), 30, seed=0, image_size=32, sound_duration=1.0, progress=False)
    save_tiny_pipeline(str(root / "pipeline"))
    torch.manual_seed(0)
    ShapesProbe(image_size=32).save_pretrained(str(root / "probe"))  # untrained: only the plumbing is tested here
    return root


def test_target_embeddings_are_imagebind_of_the_render_at_the_norm(setup):
    pipeline = InstructAny2PixPipeline.from_pretrained(str(setup / "pipeline"))
    scenes = [example.target_scene for example in load_examples(str(setup / "data"), "train", 3)]
    embeds = decoder_oracle.target_embeddings(pipeline, scenes, 20.0)
    pixels = pipeline.imagebind_processor.preprocess_image([render_scene(scene) for scene in scenes])
    with torch.no_grad():
        expected = rescale_to_norm(pipeline.image_encoder.encode_image(pixels).float(), 20.0)
    torch.testing.assert_close(embeds, expected)
    assert torch.allclose(embeds.norm(dim=-1), torch.full((3,), 20.0))


def test_main_reports_a_fraction_per_preservation(setup, tmp_path, capsys):
    output = tmp_path / "oracle.json"
    argv = [
        "--model", str(setup / "pipeline"), "--data", str(setup / "data"), "--split", "train", "--probe",
        str(setup / "probe"), "--max_examples", "3", "--batch_size", "2", "--structure_preservation", "0", "0.7",
        "--output", str(output),
    ]  # fmt: skip
    report = decoder_oracle.main(argv)
    assert report["num_examples"] == 3 and set(report["exact"]) == {"0.0", "0.7"}
    assert all(0.0 <= value <= 1.0 for value in report["exact"].values())
    assert json.loads(output.read_text()) == report
    assert "rendered exactly from their own embedding" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--max_examples", "0"], ["--structure_preservation", "1.5"]])
def test_bad_arguments(extra):
    with pytest.raises(SystemExit):
        decoder_oracle.parse_args(["--model", "m", "--data", "d", *extra])
