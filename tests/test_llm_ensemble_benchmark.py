"""benchmarks/llm_ensemble.py: exact captions of a pipeline with a second LLM at several ensemble weights, or with
an edit verifier at several `edit_verifier_weight` values."""

import importlib.util
import json
import os

import pytest
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.world import caption
from diffusers_any2pix.models.edit_verifier import EditVerifier
from diffusers_any2pix.shapes.world import ATTRIBUTE_CLASS_NAMES
from diffusers_any2pix.testing_utils import (
    tiny_clip_tokenizer,
    tiny_llm,
    tiny_pipeline_components,
    with_attribute_reader,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("llm_ensemble", os.path.join(REPO, "benchmarks", "llm_ensemble.py"))
llm_ensemble = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llm_ensemble)

OTHER_ANSWER = "<base><video><im_gen_start><im_gen>[a blue circle on a red background]<video>"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_ensemble")
    generate_dataset(str(root / "data"), 30, seed=0, image_size=32, sound_duration=1.0, progress=False)
    components = tiny_pipeline_components()
    llm_2, _, mm_adapter_2 = tiny_llm(answer=OTHER_ANSWER, seed=1)
    edit = {"llm_do_sample": False, "llm_num_beams": 2, "llm_rerank_weight": 0.5}
    InstructAny2PixPipeline(
        **components, imagebind_tokenizer=tiny_clip_tokenizer(), llm_2=llm_2, mm_adapter_2=mm_adapter_2,
        edit_defaults=edit,
    ).save_pretrained(root / "pipe")  # fmt: skip
    InstructAny2PixPipeline(**components).save_pretrained(root / "plain")
    class_words = [list(field) for field in ATTRIBUTE_CLASS_NAMES]
    verifier = EditVerifier(class_words=class_words, words=["add"], num_layers=1, hidden_size=16)
    adapter = with_attribute_reader(components["mm_adapter"], [len(f) for f in ATTRIBUTE_CLASS_NAMES])
    InstructAny2PixPipeline(
        **{**components, "mm_adapter": adapter}, imagebind_tokenizer=tiny_clip_tokenizer(), edit_verifier=verifier,
        edit_defaults=edit,
    ).save_pretrained(root / "verifying")  # fmt: skip
    return root


def test_the_benchmark_reports_the_pipelines_captions_per_weight(setup, tmp_path, capsys):
    output = tmp_path / "llm_ensemble.json"
    argv = ["--model", str(setup / "pipe"), "--data", str(setup / "data"), "--split", "train", "--max_examples", "6",
            "--weights", "0", "1", "--batch_size", "4", "--output", str(output)]  # fmt: skip
    report = llm_ensemble.main(argv)
    assert json.loads(output.read_text()) == report
    examples = load_examples(str(setup / "data"), "train", 6)
    assert report["num_examples"] == len(examples) == 6 and sum(report["per_type"].values()) == 6
    pipe = InstructAny2PixPipeline.from_pretrained(setup / "pipe")
    pipe.set_progress_bar_config(disable=True)
    targets = [caption(e.target_scene) for e in examples]
    for weight in (0.0, 1.0):
        out = pipe([e.instruction for e in examples], images=[[Image.open(p).convert("RGB") for p in e.image_paths]
                   for e in examples], audio=[list(e.audio_paths) for e in examples], num_inference_steps=1,
                   num_candidate_images=1, output_type="latent", on_invalid_answer="use_base",
                   llm_ensemble_weight=weight)  # fmt: skip
        figures = report[f"weight={weight:g}"]
        assert figures["captions"] == out.captions
        assert figures["exact"] == sum(c == t for c, t in zip(out.captions, targets))
        assert figures["exact"] == sum(figures["per_type_exact"].values()) and figures["seconds_per_instruction"] > 0
    # The tiny LLMs answer one caption each whatever the input: weight 1 takes the second LLM's.
    assert set(report["weight=0"]["captions"]) == {"a red circle on a blue background"}
    assert set(report["weight=1"]["captions"]) == {"a blue circle on a red background"}
    assert report["weight=0"]["gained"] == report["weight=0"]["lost"] == 0
    assert "exact captions gained and lost against weight 0" in capsys.readouterr().out


def test_a_pipeline_without_a_second_llm_is_refused(setup):
    argv = ["--model", str(setup / "plain"), "--data", str(setup / "data"), "--split", "train", "--max_examples", "2"]
    with pytest.raises(SystemExit, match="has no llm_2 for llm_ensemble_weight"):
        llm_ensemble.main(argv)
    with pytest.raises(SystemExit, match="has no edit_verifier for edit_verifier_weight"):
        llm_ensemble.main(argv + ["--knob", "edit_verifier_weight"])


def test_the_verifier_knob_reports_the_pipelines_captions(setup):
    argv = ["--model", str(setup / "verifying"), "--data", str(setup / "data"), "--split", "train",
            "--max_examples", "4", "--knob", "edit_verifier_weight", "--weights", "0", "5"]  # fmt: skip
    report = llm_ensemble.main(argv)
    assert report["knob"] == "edit_verifier_weight"
    examples = load_examples(str(setup / "data"), "train", 4)
    pipe = InstructAny2PixPipeline.from_pretrained(setup / "verifying")
    pipe.set_progress_bar_config(disable=True)
    out = pipe([e.instruction for e in examples], images=[[Image.open(p).convert("RGB") for p in e.image_paths]
               for e in examples], audio=[list(e.audio_paths) for e in examples], num_inference_steps=1,
               num_candidate_images=1, output_type="latent", on_invalid_answer="use_base",
               edit_verifier_weight=5.0)  # fmt: skip
    assert report["weight=5"]["captions"] == out.captions


@pytest.mark.parametrize(
    "extra, match",
    [(["--weights", "1.5"], "--weights of llm_ensemble_weight must be numbers in [0, 1]"),
     (["--weights", "-0.1"], "--weights of llm_ensemble_weight must be numbers in"),
     (["--knob", "edit_verifier_weight", "--weights", "-1"], "of edit_verifier_weight must be numbers in [0, inf]"),
     (["--knob", "temperature"], "invalid choice: 'temperature'"),
     (["--batch_size", "0"], "--batch_size must be a positive")],
)  # fmt: skip
def test_bad_arguments(extra, match, capsys):
    with pytest.raises(SystemExit):
        llm_ensemble.parse_args(["--model", "m", "--data", "d", *extra])
    assert match in capsys.readouterr().err
