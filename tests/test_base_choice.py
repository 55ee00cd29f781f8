"""benchmarks/base_choice.py: the base the pipeline picks among several images at several instruction weights."""

import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.testing_utils import tiny_clip_tokenizer, tiny_pipeline_components, with_attribute_reader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("base_choice", os.path.join(REPO, "benchmarks", "base_choice.py"))
base_choice = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base_choice)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_choice")
    generate_dataset(str(root / "data"), 30, seed=0, image_size=32, sound_duration=1.0, progress=False)
    components = tiny_pipeline_components()
    reader = with_attribute_reader(components["mm_adapter"], [3, 2, 4, 3, 5, 2, 4])
    edit = {"llm_do_sample": False, "llm_num_beams": 2, "llm_rerank_weight": 0.5, "llm_base_focus_weight": 0.02}
    InstructAny2PixPipeline(
        **{**components, "mm_adapter": reader}, imagebind_tokenizer=tiny_clip_tokenizer(), edit_defaults=edit
    ).save_pretrained(root / "pipe")
    InstructAny2PixPipeline(**components).save_pretrained(root / "plain")
    return root


def test_the_benchmark_reports_what_the_pipeline_picks(setup, tmp_path, capsys):
    output = tmp_path / "base_choice.json"
    argv = ["--model", str(setup / "pipe"), "--data", str(setup / "data"), "--split", "train", "--max_examples", "24",
            "--weights", "0", "1000", "--batch_size", "3", "--output", str(output)]  # fmt: skip
    report = base_choice.main(argv)
    assert json.loads(output.read_text()) == report
    examples = [e for e in load_examples(str(setup / "data"), "train", 24) if len(e.image_paths) > 1]
    assert report["num_examples"] == len(examples) >= 3 and sum(report["per_type"].values()) == len(examples)
    pipe = InstructAny2PixPipeline.from_pretrained(setup / "pipe")
    pipe.set_progress_bar_config(disable=True)
    images = [[Image.open(p).convert("RGB") for p in e.image_paths] for e in examples]
    audio = [list(e.audio_paths) for e in examples]
    # The words alone: the argmax of the words' cosine with each image, recomputed from ImageBind's own methods.
    expected = []
    for example, row in zip(examples, images):
        parsed = parse_instruction(example.instruction, len(row), len(example.audio_paths))
        pixels = pipe.imagebind_processor.preprocess_image([pipe.imagebind_processor.load_image(i) for i in row])
        vectors = torch.nn.functional.normalize(pipe.image_encoder.encode_image(pixels), dim=-1)
        words = pipe.image_encoder.encode_text(pipe.imagebind_processor.tokenize([parsed.words]))
        cosines = vectors @ torch.nn.functional.normalize(words, dim=-1)[0]
        order = [ref.index for ref in parsed.image_references]
        expected.append(order[int(cosines[order].argmax())])
    assert report["words_alone"]["bases"] == expected
    assert report["words_alone"]["base_right"] == sum(b == e.base_index for b, e in zip(expected, examples))
    # Each weight's bases and captions are the pipeline's own answers at that weight.
    for weight in (0.0, 1000.0):
        out = pipe([e.instruction for e in examples], images=images, audio=audio, num_inference_steps=1,
                   output_type="latent", on_invalid_answer="use_base", base_instruction_weight=weight)  # fmt: skip
        figures = report[f"weight={weight:g}"]
        assert figures["bases"] == out.base_image_indices and figures["captions"] == out.captions
        assert figures["base_right"] == sum(b == e.base_index for b, e in zip(out.base_image_indices, examples))
        assert figures["base_right"] == sum(figures["per_type_base_right"].values())
        assert figures["exact"] == sum(figures["per_type_exact"].values()) and figures["seconds_per_instruction"] > 0
    assert report["weight=1000"]["bases"] == expected  # a large weight follows the words
    assert "the instruction's words alone pick the right base in" in capsys.readouterr().out


def test_refusals(setup, monkeypatch):
    argv = ["--model", str(setup / "plain"), "--data", str(setup / "data"), "--split", "train", "--max_examples", "4"]
    with pytest.raises(SystemExit, match="has no imagebind_tokenizer"):
        base_choice.main(argv)
    # A split whose examples all have one image has nothing to measure.
    single = [e for e in load_examples(str(setup / "data"), "train", None) if len(e.image_paths) == 1]
    monkeypatch.setattr(base_choice, "load_examples", lambda *args: single)
    with pytest.raises(SystemExit, match="no instruction with several images"):
        base_choice.main(["--model", str(setup / "pipe"), "--data", str(setup / "data"), "--split", "train"])


@pytest.mark.parametrize("extra", [["--weights", "-1"], ["--weights", "0", "nan"], ["--batch_size", "0"]])
def test_bad_arguments(extra):
    with pytest.raises(SystemExit):
        base_choice.parse_args(["--model", "m", "--data", "d", *extra])
