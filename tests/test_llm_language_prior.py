"""benchmarks/llm_language_prior.py: the LLM's shape choice after the object's true or a swapped colour word."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.models.mm_adapter import MultimodalAdapter
from diffusers_any2pix.multimodal_llm import MULTIMODAL_SPECIAL_TOKENS, add_multimodal_tokens
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.shapes.evaluate import load_examples
from diffusers_any2pix.shapes.generate import HELDOUT_SHAPE_COLOUR
from diffusers_any2pix.shapes.world import SHAPES, article, caption
from diffusers_any2pix.testing_utils import TINY_EMBED_DIM, save_tiny_pipeline, tiny_pipeline_components
from diffusers_any2pix.word_tokenizer import build_word_level_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("llm_language_prior", os.path.join(REPO, "benchmarks", "llm_language_prior.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny ShapesWorld data and a tiny pipeline whose (untrained) LLM has a word-level tokenizer of that data."""
    root = tmp_path_factory.mktemp("language_prior")
    data = str(root / "data")
    generate_dataset(data, 60, seed=0, image_size=32, sound_duration=1.0, progress=False)
    texts = []
    for split in ("train", "test"):
        path = os.path.join(data, split, "instruction.json")
        with open(path) as f:
            records = json.load(f)
        texts += [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"] for r in records]
    tokenizer = build_word_level_tokenizer(texts + ["USER: ASSISTANT: Sure. A chat"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + len(MULTIMODAL_SPECIAL_TOKENS), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    llm = LlamaForCausalLM(config).eval()
    add_multimodal_tokens(tokenizer, llm)
    components = tiny_pipeline_components("imagebind")
    components.update(
        llm=llm, llm_tokenizer=tokenizer, mm_adapter=MultimodalAdapter(embed_dim=TINY_EMBED_DIM, llm_hidden_size=32)
    )
    InstructAny2PixPipeline(**components).save_pretrained(str(root / "pipeline"))
    save_tiny_pipeline(str(root / "tiny"))  # its tokenizer knows no "cross" or "purple"
    return root


def test_answer_prefix_is_the_trained_answer_up_to_the_caption():
    assert bench.ANSWER_PREFIX == "Sure. <base><video><im_gen_start><im_gen>["


def test_reports_true_and_swapped_colours_and_matches_a_direct_reading(setup, tmp_path, capsys):
    argv = ["--model", str(setup / "pipeline"), "--data", str(setup / "data"), "--output", str(tmp_path / "r.json")]
    report = bench.main(argv)
    true, other = report["results"]["true_colour"], report["results"]["other_colour"]
    held_out = [
        (example, obj)
        for example in load_examples(str(setup / "data"), "test")
        for obj in example.target_scene.objects
        if (obj.shape, obj.colour) in HELDOUT_SHAPE_COLOUR
    ]
    assert held_out and true["objects"] == len(held_out) and other["objects"] == 5 * len(held_out)
    for result in (true, other):
        assert 0.0 <= result["shape_right"] <= 1.0 and 0.0 < result["mean_p_true_shape"] < 1.0
    # The true-colour figures, recomputed object by object through the same helper.
    pipe = InstructAny2PixPipeline.from_pretrained(str(setup / "pipeline"))
    shape_ids = bench.word_ids(pipe.llm_tokenizer, SHAPES)
    p_true = []
    for example, obj in held_out:
        target = caption(example.target_scene)
        prefix = bench.ANSWER_PREFIX + target[: target.index(obj.phrase())] + f"{article(obj.colour)} {obj.colour}"
        probs = bench.shape_probabilities(pipe, example, [prefix], shape_ids)[0]
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
        p_true.append(float(probs[SHAPES.index(obj.shape)]))
    assert true["mean_p_true_shape"] == pytest.approx(sum(p_true) / len(p_true), rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert "true shape most probable" in capsys.readouterr().out


def test_a_tokenizer_without_the_words_is_named(setup):
    with pytest.raises(ValueError, match=r"does not read 'cross' as one known token"):
        bench.main(["--model", str(setup / "tiny"), "--data", str(setup / "data")])
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "m", "--data", "d", "--max_examples", "0"])
