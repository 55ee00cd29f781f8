"""benchmarks/llm_reranking.py: the LLM's beams rescored offline by the pipeline's own reranking scorer."""

import importlib.util
import json
import os

import pytest
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.testing_utils import (
    tiny_clip_tokenizer,
    tiny_pipeline_components,
    with_attribute_reader,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("llm_reranking", os.path.join(REPO, "benchmarks", "llm_reranking.py"))
llm_reranking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llm_reranking)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reranking")
    generate_dataset(str(root / "data"), 30, seed=0, image_size=32, sound_duration=1.0, progress=False)
    components = tiny_pipeline_components()
    InstructAny2PixPipeline(**components, imagebind_tokenizer=tiny_clip_tokenizer()).save_pretrained(root / "pipe")
    InstructAny2PixPipeline(**components).save_pretrained(root / "plain")
    reader = with_attribute_reader(components["mm_adapter"], [3, 2, 4, 3, 5, 2, 4])
    reading = InstructAny2PixPipeline(**{**components, "mm_adapter": reader}, imagebind_tokenizer=tiny_clip_tokenizer())
    reading.save_pretrained(root / "reader")
    return root


@pytest.mark.parametrize(
    "model, weights, base_weights",
    [("pipe", ["0", "100"], ["0"]), ("reader", ["0.5"], ["0", "100"])],
)
def test_rescored_beams_are_what_the_pipeline_answers(setup, tmp_path, capsys, model, weights, base_weights):
    output = tmp_path / "reranking.json"
    argv = ["--model", str(setup / model), "--data", str(setup / "data"), "--split", "train", "--max_examples", "4",
            "--num_beams", "2", "--weights", *weights, "--base_weights", *base_weights, "--batch_size", "3",
            "--timing_examples", "2", "--output", str(output)]  # fmt: skip
    report = llm_reranking.main(argv)
    assert json.loads(output.read_text()) == report
    assert report["num_examples"] == 4 and 0 <= report["oracle"] <= 4
    timed = {"4 beams", "2 beams", "2 beams reranked"}
    if model == "reader":  # a base weight above 0 is timed too
        timed.add("2 beams reranked + base agreement")
    assert set(report["llm_seconds_per_instruction"]) == timed
    # Each pair of weights' offline pick is the caption the pipeline itself answers with at those weights.
    pipe = InstructAny2PixPipeline.from_pretrained(setup / model)
    pipe.set_progress_bar_config(disable=True)
    examples = load_examples(str(setup / "data"), "train", 4)
    for base_weight in map(float, base_weights):
        for weight in map(float, weights):
            out = pipe([e.instruction for e in examples],
                       images=[[Image.open(p).convert("RGB") for p in e.image_paths] for e in examples],
                       audio=[list(e.audio_paths) for e in examples], num_inference_steps=1, output_type="latent",
                       llm_do_sample=False, llm_num_beams=2, llm_rerank_weight=weight,
                       llm_base_agreement_weight=base_weight, on_invalid_answer="use_base")  # fmt: skip
            key = f"weight={weight:g}" + (f",base_weight={base_weight:g}" if base_weight > 0 else "")
            assert report[key]["captions"] == out.captions
            assert report[key]["exact"] == sum(report[key]["per_type"].values())
    assert "a beam writes the target caption in" in capsys.readouterr().out


def test_a_pipeline_without_imagebind_tokenizer_is_refused(setup):
    argv = ["--model", str(setup / "plain"), "--data", str(setup / "data"), "--split", "train", "--max_examples", "1",
            "--timing_examples", "0"]  # fmt: skip
    with pytest.raises(SystemExit, match="has no imagebind_tokenizer"):
        llm_reranking.main(argv)


@pytest.mark.parametrize("extra", [["--num_beams", "1"], ["--weights", "-1"], ["--base_weights", "0", "-1"]])
def test_bad_arguments(extra):
    with pytest.raises(SystemExit):
        llm_reranking.parse_args(["--model", "m", "--data", "d", *extra])
