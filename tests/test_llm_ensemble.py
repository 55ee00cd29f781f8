"""The second LLM (`llm_2`, `mm_adapter_2`, `llm_ensemble_weight`): its beams pooled with the first LLM's and every
answer scored by both."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix import pipeline_instruct_any2pix as pipeline_module
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.models.mm_adapter import MultimodalAdapter
from diffusers_any2pix.multimodal_llm import parse_answer, score_answers
from diffusers_any2pix.testing_utils import (
    TINY_ANSWER,
    extend_adapter,
    tiny_clip_tokenizer,
    tiny_llm,
    tiny_pipeline_components,
    with_attribute_reader,
)

# The second LLM is fitted to another answer, so pooling and mixing have something to choose between.
OTHER_ANSWER = "<base><video><im_gen_start><im_gen>[a blue circle on a red background]<video>"
ATTRIBUTE_CLASSES = [3, 4, 4, 5, 5, 6, 6]
CPU = torch.device("cpu")


def second_llm():
    llm_2, _, mm_adapter_2 = tiny_llm(answer=OTHER_ANSWER, seed=1)
    return llm_2, mm_adapter_2


def make_pipe(with_second: bool = True, attribute_reader: bool = False, **overrides) -> InstructAny2PixPipeline:
    components = tiny_pipeline_components("imagebind")
    components["imagebind_tokenizer"] = tiny_clip_tokenizer()
    if attribute_reader:
        components["mm_adapter"] = with_attribute_reader(components["mm_adapter"], ATTRIBUTE_CLASSES)
    if with_second:
        components["llm_2"], components["mm_adapter_2"] = second_llm()
    components.update(overrides)
    pipe = InstructAny2PixPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ensemble_pipe():
    return make_pipe()


def image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(40, 48, 3) * 255).astype("uint8"))


def sound():
    t = np.arange(16000) / 16000
    return (np.sin(2 * np.pi * 440.0 * t).astype("float32"), 16000)


BEAMS = dict(output_type="np", llm_do_sample=False, llm_num_beams=3, num_inference_steps=2)


def run(pipe, instruction="add [audio1] to [image1]", images=None, **kwargs):
    images = [image(0)] if images is None else images
    audio = [sound()] if "[audio1]" in instruction else None
    return pipe(instruction, images=images, audio=audio, generator=torch.Generator().manual_seed(0), **kwargs)


def _record_llm_calls(monkeypatch) -> list[dict]:
    """Every `generate_with_media` call: which LLM answered, and per row all its final beams."""
    calls = []
    original = pipeline_module.generate_with_media

    def spy(llm, *args, candidate_scorer=None, **kwargs):
        call = {"llm": llm, "beams": {}}
        calls.append(call)

        def scorer(row, texts, *rest):
            call["beams"][row] = list(texts)
            return candidate_scorer(row, texts, *rest)

        return original(llm, *args, candidate_scorer=scorer if candidate_scorer else None, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate_with_media", spy)
    return calls


def _media(pipe, parsed, images, audio):
    media, _ = pipe.encode_media([parsed], [images], [audio], CPU)
    return media[0]


def test_score_candidates_mixes_the_two_llms_log_probabilities(ensemble_pipe):
    pipe = ensemble_pipe
    parsed = parse_instruction("add [audio1] to [image1]", num_images=1, num_audio=1)
    loaded = [pipe.imagebind_processor.load_image(image(0))], [pipe.imagebind_processor.load_audio(sound())]
    media = _media(pipe, parsed, *loaded)
    candidates = [TINY_ANSWER, OTHER_ANSWER, "<im_gen_start><im_gen>[a red star]<video>"]
    first, generations, bases = score_answers(
        pipe.llm, pipe.llm_tokenizer, pipe.mm_adapter, pipe.llm_prompt(parsed), media, candidates
    )
    # Each LLM reads the prompt its own adapter expands (here the same: neither reads attributes).
    assert pipe.llm_prompt(parsed, pipe.mm_adapter_2) == pipe.llm_prompt(parsed)
    second, _, _ = score_answers(
        pipe.llm_2, pipe.llm_tokenizer, pipe.mm_adapter_2, pipe.llm_prompt(parsed), media, candidates
    )
    assert int(first.argmax()) == 0 and int(second.argmax()) == 1  # each LLM prefers its own answer
    for weight in (0.0, 0.3, 1.0):
        scores, gens, base_embeds = pipe.score_candidates(parsed, media, None, candidates, weight)
        torch.testing.assert_close(scores, (1 - weight) * first + weight * second)
        # The embeddings are the first LLM's, whatever the weight.
        for ours, expected in zip(gens + base_embeds, generations + bases):
            assert (ours is None and expected is None) or torch.equal(ours, expected)
    no_second = make_pipe(with_second=False)
    with pytest.raises(ValueError, match=r"`ensemble_weight=0.5` mixes in `llm_2`'s scores: load `llm_2`"):
        no_second.score_candidates(parsed, media, None, candidates, 0.5)


def test_ensemble_pools_both_llms_beams_and_picks_by_the_mixed_score(ensemble_pipe, monkeypatch):
    pipe = ensemble_pipe
    calls = _record_llm_calls(monkeypatch)
    parsed = parse_instruction("add [audio1] to [image1]", num_images=1, num_audio=1)
    picked = set()
    for weight in (0.1, 0.5, 0.9):
        calls.clear()
        out = run(pipe, llm_ensemble_weight=weight, llm_rerank_weight=0.5, **BEAMS)
        first, second = calls
        assert first["llm"] is pipe.llm and second["llm"] is pipe.llm_2
        assert len(first["beams"][0]) == len(second["beams"][0]) == 3  # llm_num_beams each
        candidates = list(dict.fromkeys(first["beams"][0] + second["beams"][0]))
        assert OTHER_ANSWER in candidates and TINY_ANSWER in candidates
        loaded = [pipe.imagebind_processor.load_image(image(0))], [pipe.imagebind_processor.load_audio(sound())]
        media = _media(pipe, parsed, *loaded)
        scores, gens, bases = pipe.score_candidates(parsed, media, None, candidates, weight)
        choose = pipe.caption_agreement_scorer(0.5, CPU, 0.0, parsed=[parsed], media_embeds=[media])
        pick = choose(0, candidates, scores, gens, bases)
        assert out.answers == [candidates[pick]]
        # The output's embedding is the first LLM's reading of the chosen answer.
        torch.testing.assert_close(out.generation_embeds[0], gens[pick].float())
        picked.add(parse_answer(candidates[pick]).caption)
    # A small weight keeps the first LLM's answer; a large one takes the second's.
    assert picked == {"a red circle on a blue background", "a blue circle on a red background"}


def test_ensemble_weight_zero_is_the_first_llm_alone(ensemble_pipe, monkeypatch):
    expected = run(make_pipe(with_second=False), llm_rerank_weight=0.5, **BEAMS)
    calls = _record_llm_calls(monkeypatch)
    out = run(ensemble_pipe, llm_rerank_weight=0.5, **BEAMS)  # the built-in default: 0
    assert [call["llm"] for call in calls] == [ensemble_pipe.llm]
    assert out.answers == expected.answers
    np.testing.assert_array_equal(out.images, expected.images)
    # Without any reranking weight the ensemble still pools (the judge is then the mixed score alone).
    calls.clear()
    pooled = run(ensemble_pipe, llm_ensemble_weight=1.0, **BEAMS)
    assert len(calls) == 2 and pooled.captions == ["a blue circle on a red background"]


def test_ensemble_beams_join_the_base_focus(monkeypatch):
    pipe = make_pipe(attribute_reader=True)
    calls = _record_llm_calls(monkeypatch)
    instruction = "put [audio1] on [image1] or [image2]"
    edit = dict(images=[image(0), image(1)], llm_base_focus_weight=100.0, llm_rerank_weight=0.5, **BEAMS)
    scored = []
    original = pipe.score_candidates

    def spy(parsed, media, patches, candidates, weight=0.0):
        scored.append((list(candidates), weight))
        return original(parsed, media, patches, candidates, weight)

    monkeypatch.setattr(pipe, "score_candidates", spy)
    run(pipe, instruction, llm_ensemble_weight=0.5, **edit)
    first, second, focused = calls
    assert [c["llm"] for c in calls] == [pipe.llm, pipe.llm_2, pipe.llm]
    assert len(focused["beams"][0]) == 3  # llm_num_beams, not the pooled candidates' number
    (pooled, w1), (with_focus, w2) = scored
    assert w1 == w2 == 0.5
    assert pooled == list(dict.fromkeys(first["beams"][0] + second["beams"][0]))
    assert with_focus[: len(pooled)] == pooled  # the focused look ranks the pooled beams beside its own


def test_ensemble_is_saved_and_loaded(ensemble_pipe, tmp_path):
    ensemble_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["llm_2"][1] == "LlamaForCausalLM" and index["mm_adapter_2"][1] == "MultimodalAdapter"
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    edit = dict(llm_ensemble_weight=0.5, llm_rerank_weight=0.5, **BEAMS)
    expected = run(ensemble_pipe, **edit)
    out = run(loaded, **edit)
    assert out.answers == expected.answers
    np.testing.assert_array_equal(out.images, expected.images)
    # A pipeline saved without a second LLM loads without one, also from a folder saved before `llm_2` existed.
    make_pipe(with_second=False).save_pretrained(tmp_path / "one")
    assert InstructAny2PixPipeline.from_pretrained(tmp_path / "one").llm_2 is None
    index = json.loads((tmp_path / "one" / "model_index.json").read_text())
    assert index.pop("llm_2") == index.pop("mm_adapter_2") == [None, None]
    (tmp_path / "one" / "model_index.json").write_text(json.dumps(index))
    older = InstructAny2PixPipeline.from_pretrained(tmp_path / "one")
    assert older.llm_2 is None and older.mm_adapter_2 is None


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.5", float("nan")])
def test_bad_ensemble_weight_is_refused_by_name(ensemble_pipe, bad):
    with pytest.raises(ValueError, match=r"`llm_ensemble_weight` must be a number in \[0, 1\]"):
        run(ensemble_pipe, llm_ensemble_weight=bad, **BEAMS)


def test_ensemble_needs_a_second_llm_and_beams(ensemble_pipe):
    with pytest.raises(ValueError, match=r"`llm_ensemble_weight=0.5` mixes in a second LLM, but this pipeline has no"):
        run(make_pipe(with_second=False), llm_ensemble_weight=0.5, **BEAMS)
    with pytest.raises(ValueError, match=r"`llm_ensemble_weight=0.5` pools both LLMs' beams: it needs `llm_num_beams`"):
        run(ensemble_pipe, llm_ensemble_weight=0.5, **{**BEAMS, "llm_num_beams": 1})
    with pytest.raises(ValueError, match=r"`llm_ensemble_weight=0.5` needs a second LLM: load `llm_2`"):
        make_pipe(with_second=False).ensemble_answers([], [], None, {}, 0.5, 0.0, 0.0, 10, CPU)
    parsed = [parse_instruction("add [audio1] to [image1]", num_images=1, num_audio=1)]
    with pytest.raises(ValueError, match=r"`first_beams` must hold every row's beams; rows \[0\] have none"):
        ensemble_pipe.ensemble_answers(parsed, [torch.zeros(2, 8)], None, {}, 0.5, 0.0, 0.0, 10, CPU)
    assert ensemble_pipe.ensemble_answers([], [], None, {}, 0.5, 0.0, 0.0, 10, CPU) == ([], [], [], {})


def test_second_llm_components_are_checked_at_construction():
    llm_2, mm_adapter_2 = second_llm()
    with pytest.raises(ValueError, match=r"`llm_2` and `mm_adapter_2` must be given together"):
        make_pipe(with_second=False, llm_2=llm_2)
    with pytest.raises(ValueError, match=r"`llm_2` and `mm_adapter_2` must be given together"):
        make_pipe(with_second=False, mm_adapter_2=mm_adapter_2)
    wide = MultimodalAdapter.from_config(mm_adapter_2.config, llm_hidden_size=48)
    with pytest.raises(ValueError, match=r"llm_2.config.hidden_size is 32 but mm_adapter_2.config.llm_hidden_size"):
        make_pipe(with_second=False, llm_2=llm_2, mm_adapter_2=wide)
    other_space = MultimodalAdapter.from_config(mm_adapter_2.config, embed_dim=24)
    with pytest.raises(ValueError, match=r"image_encoder.config.out_embed_dim is \d+ but mm_adapter_2.config.embed"):
        make_pipe(with_second=False, llm_2=llm_2, mm_adapter_2=other_space)
    vision_width = tiny_pipeline_components("imagebind")["image_encoder"].config.vision_embed_dim
    patches = extend_adapter(
        mm_adapter_2, image_patch_tokens=3, resampler_hidden_size=16, resampler_depth=1, resampler_heads=2,
        patch_embed_dim=vision_width,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mm_adapter.config.image_patch_tokens is 0 but mm_adapter_2.config"):
        make_pipe(with_second=False, llm_2=llm_2, mm_adapter_2=patches)
    small = tiny_llm(answer=None, seed=2)[0]
    small.resize_token_embeddings(10)
    with pytest.raises(ValueError, match=r"llm_tokenizer has \d+ tokens but the llm_2's input embeddings only have 10"):
        make_pipe(with_second=False, llm_2=small, mm_adapter_2=mm_adapter_2)
