"""benchmarks/candidate_images.py: edits right when each output is the best of several candidates."""

import importlib.util
import json
import os
import zlib

import numpy as np

import pytest
import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import example_generator, load_examples
from diffusers_any2pix.shapes.probe import train_probe
from diffusers_any2pix.testing_utils import tiny_clip_tokenizer, tiny_pipeline_components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "candidate_images", os.path.join(REPO, "benchmarks", "candidate_images.py")
)
candidate_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(candidate_images)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidate_images")
    generate_dataset(str(root / "data"), 12, seed=0, image_size=32, sound_duration=1.0, progress=False)
    components = tiny_pipeline_components()
    edit = {"num_inference_steps": 2, "llm_do_sample": False}
    pipe = InstructAny2PixPipeline(**components, imagebind_tokenizer=tiny_clip_tokenizer(), edit_defaults=edit)
    pipe.save_pretrained(root / "pipe")
    InstructAny2PixPipeline(**components).save_pretrained(root / "plain")
    train_probe(num_steps=2, batch_size=4, image_size=32, seed=0, progress=False).save_pretrained(root / "probe")
    return root


def test_tally_picks_the_best_scored_candidate_of_each_subset():
    # 2 examples × 2 weights × 2 candidates.
    right = torch.tensor([[[False, True], [True, False]], [[False, False], [False, True]]])
    scores = torch.tensor([[[0.1, 0.2], [0.9, 0.3]], [[0.5, 0.1], [0.2, 0.4]]])
    rows = {(tuple(r["weights"]), r["candidates"]): (r["right"], r["any_right"]) for r in
            candidate_images.tally(right, scores)}  # fmt: skip
    assert rows == {
        ((0,), 1): (0, 0), ((0,), 2): (1, 1),  # weight 0: first candidates wrong; the second right in example 0
        ((1,), 1): (1, 1), ((1,), 2): (2, 2),
        ((0, 1), 1): (1, 1),  # example 0 picks (1, 0) right; example 1 picks (0, 0) wrong
        ((0, 1), 2): (1, 2),  # example 1 picks (0, 0) at 0.5 over the right (1, 1) at 0.4
    }  # fmt: skip


class CoinProbe:
    """A stand-in for the attribute probe whose verdicts vary with the pixels (a checksum's parity), so that counts
    of right edits are not all 0 as an untrained probe's would be."""

    def read(self, images):
        return ["target" if zlib.crc32(np.asarray(image).tobytes()) % 2 else "other" for image in images]


class TargetReading:
    @staticmethod
    def from_scene(scene):
        return "target"


def test_the_benchmark_reports_the_pipelines_own_pick(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(candidate_images, "load_or_train_probe", lambda path: (CoinProbe(), False))
    monkeypatch.setattr(candidate_images, "SceneReading", TargetReading)
    output = tmp_path / "candidates.json"
    argv = ["--model", str(setup / "pipe"), "--data", str(setup / "data"), "--split", "train", "--probe",
            str(setup / "probe"), "--max_examples", "5", "--weights", "0", "1", "--candidates", "2", "--batch_size",
            "3", "--output", str(output)]  # fmt: skip
    report = candidate_images.main(argv)
    assert json.loads(output.read_text()) == report
    assert report["num_examples"] == 5 and report["seconds_per_edit"] > 0
    assert [(r["weights"], r["candidates"]) for r in report["rows"]] == [
        ([0.0], 1), ([0.0], 2), ([1.0], 1), ([1.0], 2), ([0.0, 1.0], 1), ([0.0, 1.0], 2)
    ]
    assert all(r["right"] <= r["any_right"] <= 5 for r in report["rows"])
    assert 0 < report["rows"][-1]["any_right"] and any(r["right"] != report["rows"][0]["right"] for r in report["rows"])
    # The last row is the pipeline's own output, read by the probe.
    examples = load_examples(str(setup / "data"), "train", 5)
    pipe = InstructAny2PixPipeline.from_pretrained(setup / "pipe")
    pipe.set_progress_bar_config(disable=True)
    probe = CoinProbe()
    right = 0
    for first in (0, 3):
        batch = examples[first : first + 3]
        out = pipe([e.instruction for e in batch],
                   images=[[Image.open(p).convert("RGB") for p in e.image_paths] for e in batch],
                   audio=[list(e.audio_paths) for e in batch], caption_embedding_weight=[0.0, 1.0],
                   num_candidate_images=2, generator=[example_generator(0, e.index) for e in batch],
                   on_invalid_answer="use_base")  # fmt: skip
        readings = probe.read(out.images)
        right += sum(r == "target" for r in readings)
    assert report["rows"][-1]["right"] == right
    assert "edits right" in capsys.readouterr().out


def test_refusals(setup):
    argv = ["--model", str(setup / "plain"), "--data", str(setup / "data"), "--split", "train", "--probe",
            str(setup / "probe"), "--max_examples", "2"]  # fmt: skip
    with pytest.raises(SystemExit, match="has no imagebind_tokenizer"):
        candidate_images.main(argv)
    argv = ["--model", str(setup / "pipe"), "--data", str(setup / "data"), "--split", "train", "--probe",
            str(setup / "no_probe"), "--max_examples", "2"]  # fmt: skip
    with pytest.raises(SystemExit, match="no_probe: no saved probe"):
        candidate_images.main(argv)


@pytest.mark.parametrize(
    "extra", [["--weights", "1.5"], ["--weights", "0.3", "nan"], ["--candidates", "0"], ["--batch_size", "0"]]
)
def test_bad_arguments(extra):
    with pytest.raises(SystemExit):
        candidate_images.parse_args(["--model", "m", "--data", "d", "--probe", "p", *extra])
