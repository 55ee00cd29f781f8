"""The ShapesWorld attribute probe and the evaluator (tiny probe budgets and a tiny pipeline; CPU)."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import INSTRUCTION_TYPES, Scene, SceneObject, generate_dataset, render_scene
from diffusers_any2pix.shapes import evaluate
from diffusers_any2pix.multimodal_llm import parse_answer
from diffusers_any2pix.shapes.evaluate import (
    ABLATIONS,
    BASELINES,
    DESCRIPTIONS,
    METRICS,
    MODEL,
    NO_PRIOR,
    PRIOR_WITHOUT_LLM,
    REFINED_ONLY,
    UNCHANGED_BASE,
    EvaluationExample,
    EvaluationResult,
    ExampleScore,
    ProbeAccuracyError,
    aggregate,
    build_report,
    check_probe_accuracy,
    evaluate_criteria,
    example_generator,
    format_report,
    load_examples,
    prior_without_llm,
    run_evaluation,
    score_example,
)
from diffusers_any2pix.shapes.probe import (
    ProbeAccuracy,
    SceneReading,
    ShapesProbe,
    degrade,
    probe_accuracy,
    random_scenes,
    render_batch,
    train_probe,
)
from diffusers_any2pix.testing_utils import tiny_pipeline_components


SCENE = Scene("striped", (SceneObject("circle", "red", "left"), SceneObject("star", "blue", "right")))


@pytest.fixture(scope="module")
def probe() -> ShapesProbe:
    """A probe at 32x32 (a quarter of the compute) with a tiny budget: far from exact, well above chance."""
    return train_probe(num_steps=40, batch_size=16, image_size=32, learning_rate=5e-3, seed=0, progress=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, probe) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    data = str(root / "data")
    generate_dataset(data, 40, seed=0, sound_duration=1.0, progress=False)
    model = str(root / "pipeline")
    InstructAny2PixPipeline(**tiny_pipeline_components("imagebind")).save_pretrained(model)
    probe_dir = str(root / "probe")
    probe.save_pretrained(probe_dir)
    return {"root": root, "data": data, "model": model, "probe": probe_dir}


def _accuracy(exact: float) -> ProbeAccuracy:
    return ProbeAccuracy(exact=exact, background=1.0, slots=exact, num_scenes=1000)


# --------------------------------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------------------------------
def test_scene_reading_round_trips():
    reading = SceneReading.from_scene(SCENE)
    assert reading == SceneReading("striped", (("circle", "red"), None, ("star", "blue")))
    assert reading.to_scene() == SCENE
    assert SceneReading("plain", (None, None, None)).to_scene() is None
    with pytest.raises(TypeError, match="must be a Scene"):
        SceneReading.from_scene("a red circle")


def test_render_batch_targets():
    pixels, background, shape, colour = render_batch([SCENE], image_size=32)
    assert pixels.shape == (1, 3, 32, 32) and 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert torch.equal(pixels[0], torch.from_numpy(np.array(render_scene(SCENE, 32))).permute(2, 0, 1) / 255.0)
    assert background.tolist() == [1]  # "striped"
    assert shape.tolist() == [[1, 0, 4]]  # circle = 1 + 0, empty, star = 1 + 3
    assert colour.tolist() == [[0, -100, 4]]  # red, ignored, blue


def test_degrade_is_seeded_and_mild():
    pixels = render_batch(random_scenes(np.random.default_rng(0), 8), 32)[0]
    original = pixels.clone()
    a = degrade(pixels, torch.Generator().manual_seed(1))
    b = degrade(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(pixels, original)  # the input is not modified
    assert torch.equal(a, b) and a.shape == pixels.shape
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert 0.0 < (a - pixels).abs().mean() < 0.15


def test_probe_reads_above_chance_and_resizes(probe):
    accuracy = probe_accuracy(probe, num_scenes=100)
    # Chance is 1/4 for the background; slots need a larger budget (`train_probe`'s default reads them exactly).
    assert accuracy.background > 0.6
    # Inputs of any size and type are resized to the probe's 32x32.
    scene = render_scene(SCENE, 64)
    readings = probe.read([scene, np.array(scene), torch.from_numpy(np.array(scene)).permute(2, 0, 1)])
    assert readings[0] == readings[1] == readings[2]
    assert probe.preprocess(scene).shape == (1, 3, 32, 32)
    assert probe.read_scene([scene])[0] == readings[0].to_scene()


def test_train_probe_is_deterministic():
    a = train_probe(num_steps=2, batch_size=4, image_size=16, seed=3, progress=False)
    b = train_probe(num_steps=2, batch_size=4, image_size=16, seed=3, progress=False)
    c = train_probe(num_steps=2, batch_size=4, image_size=16, seed=4, progress=False)
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_probe_save_load_is_exact(probe, tmp_path):
    probe.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = ShapesProbe.from_pretrained(tmp_path).eval()
    loaded.check_vocabulary()
    pixels = render_batch(random_scenes(np.random.default_rng(1), 4), 32)[0]
    with torch.no_grad():
        assert torch.equal(probe(pixels).shape_logits, loaded(pixels).shape_logits)
    assert loaded.config.shapes == list(probe.shapes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 8}, "image_size"),
        ({"channels": (8, 8)}, "channels"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"shapes": ("circle", "circle")}, "shapes"),
    ],
)
def test_probe_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesProbe(**kwargs)


def test_probe_rejects_bad_input(probe):
    with pytest.raises(ValueError, match=r"shape \(batch, 3, 32, 32\)"):
        probe(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="float tensor"):
        probe(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="empty list"):
        probe.read([])
    with pytest.raises(TypeError, match="images"):
        probe.read([42])
    with pytest.raises(ValueError, match="num_steps"):
        train_probe(num_steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        train_probe(learning_rate=-1.0)
    with pytest.raises(ValueError, match="different vocabulary|retrain"):
        ShapesProbe(colours=("red", "green")).check_vocabulary()


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------
def _example(base: Scene, target: Scene, num_images: int = 1, base_index: int = 0) -> EvaluationExample:
    return EvaluationExample(0, "x", "recolour", "make it blue", ("a.png",) * num_images, (), base_index, base, target)


def test_score_example_counts_success_attributes_and_preservation():
    target = SCENE.with_object_at("left", "circle", "blue")  # recolour the left circle; the star is untouched
    example = _example(SCENE, target, num_images=2, base_index=1)
    base_reading = SceneReading.from_scene(SCENE)
    right = score_example(example, SceneReading.from_scene(target), base_reading, chosen_base=1, llm_caption="a cat")
    assert right.success and right.background_correct and right.slots_correct == 3
    assert (right.untouched, right.preserved) == (1, 1)
    assert right.base_correct is True and right.caption_correct is False
    # The star lost, wrong base: preservation and base selection both fail; the unchanged base is no success.
    lost = SceneReading("striped", (("circle", "blue"), None, None))
    wrong = score_example(example, lost, base_reading, chosen_base=0, llm_caption=" " + evaluate.caption(target))
    assert not wrong.success and wrong.slots_correct == 2 and wrong.preserved == 0
    assert wrong.base_correct is False and wrong.caption_correct is True
    unchanged = score_example(example, base_reading, base_reading)
    assert not unchanged.success and unchanged.preserved == 1
    assert unchanged.base_correct is None and unchanged.caption_correct is None
    # A pipeline output without an LLM (``conditioning_embeds``): its base is scored, no caption.
    no_llm = score_example(example, base_reading, base_reading, chosen_base=0)
    assert no_llm.base_correct is False and no_llm.caption_correct is None

    summary = aggregate([right, wrong, unchanged])
    assert summary["num_examples"] == 3
    assert summary["edit_success"] == pytest.approx(1 / 3)
    assert summary["attribute_accuracy"] == pytest.approx((4 + 3 + 3) / 12)
    assert summary["preservation"] == pytest.approx(2 / 3)
    assert summary["base_selection_accuracy"] == 0.5 and summary["caption_accuracy"] == 0.5
    # A single image has no base to choose; with nothing untouched there is no preservation figure.
    single = Scene("plain", (SceneObject("circle", "red", "left"),))
    alone = _example(single, single.with_object_at("left", "circle", "blue"))
    score = score_example(alone, SceneReading.from_scene(single), SceneReading.from_scene(single), chosen_base=0)
    assert score.base_correct is None and score.untouched == 0
    assert aggregate([score])["base_selection_accuracy"] is None and aggregate([score])["preservation"] is None


def test_score_example_counts_objects_named_and_edits_given_a_right_caption():
    # The target keeps SCENE's blue star (a held-out combination) and recolours the left circle blue (seen).
    target = SCENE.with_object_at("left", "circle", "blue")
    example = _example(SCENE, target)
    base_reading = SceneReading.from_scene(SCENE)
    exact = evaluate.caption(target)
    star_wrong = exact.replace("a blue star", "a red star")
    assert star_wrong != exact
    cases = {
        # caption: (success, heldout_named, seen_named)
        exact: (True, 1, 1),
        star_wrong: (True, 0, 1),  # the decoder drew the right scene anyway
        "a cat": (False, 0, 0),  # outside the caption grammar: names nothing
    }
    scores = []
    for text, (success, heldout, seen) in cases.items():
        reading = SceneReading.from_scene(target) if success else base_reading
        score = score_example(example, reading, base_reading, chosen_base=0, llm_caption=text)
        assert (score.heldout_objects, score.seen_objects) == (1, 1)
        assert (score.heldout_named, score.seen_named) == (heldout, seen)
        scores.append(score)
    wrong_render = score_example(example, base_reading, base_reading, chosen_base=0, llm_caption=exact)
    summary = aggregate(scores + [wrong_render])
    assert summary["heldout_naming"] == pytest.approx(2 / 4) and summary["seen_naming"] == pytest.approx(3 / 4)
    # Two exact captions, one of them drawn right.
    assert summary["success_given_caption"] == pytest.approx(1 / 2)
    # Without an LLM nothing is counted, and the figures are absent rather than 0.
    no_llm = score_example(example, base_reading, base_reading, chosen_base=0)
    assert (no_llm.heldout_objects, no_llm.seen_objects) == (0, 0)
    assert all(aggregate([no_llm])[k] is None for k in ("success_given_caption", "heldout_naming", "seen_naming"))


def test_probe_accuracy_gate():
    check_probe_accuracy(_accuracy(0.98))
    with pytest.raises(ProbeAccuracyError, match=r"97\.9% .* at least 98%"):
        check_probe_accuracy(_accuracy(0.979))


def test_example_generator_depends_on_seed_and_index_only():
    draw = lambda g: torch.randn(3, generator=g)  # noqa: E731
    assert torch.equal(draw(example_generator(0, 5)), draw(example_generator(0, 5)))
    assert not torch.equal(draw(example_generator(0, 5)), draw(example_generator(0, 6)))
    assert not torch.equal(draw(example_generator(1, 5)), draw(example_generator(0, 5)))


# --------------------------------------------------------------------------------------------------------------------
# Criteria and report
# --------------------------------------------------------------------------------------------------------------------
TYPES = ("recolour", "recolour", "remove", "remove", "background")


def _scored(instruction_type: str, success: bool, base_correct=None) -> ExampleScore:
    reading = SceneReading.from_scene(SCENE)
    return ExampleScore(instruction_type, success, success, 3 * success, 1, 1, base_correct, None, reading)


def _scores(model, unchanged, prior, ablation, model_bases=(True, True, None, None, False)) -> dict:
    def run(successes, bases=(None,) * 5):
        return [_scored(t, bool(x), b) for t, x, b in zip(TYPES, successes, bases)]

    return {
        MODEL: run(model, model_bases),
        UNCHANGED_BASE: run(unchanged),
        PRIOR_WITHOUT_LLM: run(prior),
        NO_PRIOR: run(ablation),  # an ablation that beats the model must not count as a baseline
    }


def test_evaluate_criteria_compares_with_the_best_baseline_only():
    scores = _scores(model=(1, 1, 1, 0, 0), unchanged=(0, 0, 0, 0, 0), prior=(1, 0, 0, 0, 0), ablation=(1,) * 5)
    criteria = evaluate_criteria(scores)
    assert criteria["per_type"] == {
        # Exactly twice the best baseline passes.
        "recolour": {
            "model": 1.0, "best_baseline": 0.5, "best_baseline_name": PRIOR_WITHOUT_LLM, "ratio": 2.0, "passed": True
        },
        # Best baseline 0: passes iff the model ever succeeds (the first of equal baselines is named).
        "remove": {
            "model": 0.5, "best_baseline": 0.0, "best_baseline_name": UNCHANGED_BASE, "ratio": None, "passed": True
        },
        "background": {
            "model": 0.0, "best_baseline": 0.0, "best_baseline_name": UNCHANGED_BASE, "ratio": None, "passed": False
        },
    }  # fmt: skip
    assert criteria["every_type_at_least_2x_best_baseline"] is False
    assert criteria["overall_edit_success"] == pytest.approx(0.6) and criteria["overall_passed"] is False
    assert criteria["min_overall"] == 0.70 and criteria["min_base_selection"] == 0.90
    assert criteria["base_selection_accuracy"] == pytest.approx(2 / 3) and criteria["base_selection_passed"] is False
    assert criteria["passed"] is False
    # The default baselines are those of BASELINES: passing `scores`' baselines explicitly changes nothing.
    assert evaluate_criteria(scores, [UNCHANGED_BASE, PRIOR_WITHOUT_LLM]) == criteria

    passing = _scores((1, 1, 1, 0, 1), (0,) * 5, (1, 0, 0, 0, 0), (1,) * 5, model_bases=(True,) * 5)
    criteria = evaluate_criteria(passing)
    assert criteria["overall_edit_success"] == pytest.approx(0.8) and criteria["overall_passed"] is True
    assert criteria["every_type_at_least_2x_best_baseline"] is True
    assert criteria["base_selection_accuracy"] == 1.0 and criteria["passed"] is True
    # Less than twice the best baseline fails the type, and so the whole.
    close = _scores((1, 1, 1, 0, 1), (0,) * 5, (1, 0, 1, 0, 0), (1,) * 5, model_bases=(True,) * 5)
    criteria = evaluate_criteria(close)
    assert criteria["per_type"]["remove"]["ratio"] == 1.0 and criteria["per_type"]["remove"]["passed"] is False
    assert criteria["every_type_at_least_2x_best_baseline"] is False and criteria["passed"] is False
    # Without baselines (or multi-image examples) a criterion cannot be shown: None, and not passed.
    alone = evaluate_criteria({MODEL: passing[MODEL]}, [])
    assert alone["per_type"]["recolour"]["best_baseline_name"] is None
    assert alone["per_type"]["recolour"]["ratio"] is None and alone["per_type"]["recolour"]["passed"] is None
    assert alone["every_type_at_least_2x_best_baseline"] is None and alone["passed"] is False
    single = evaluate_criteria({**passing, MODEL: [_scored(t, True) for t in TYPES]})
    assert single["base_selection_accuracy"] is None and single["base_selection_passed"] is None
    assert single["passed"] is False


def test_evaluate_criteria_rejects_bad_arguments():
    scores = _scores((1,) * 5, (0,) * 5, (0,) * 5, (0,) * 5)
    with pytest.raises(ValueError, match="no 'model' configuration"):
        evaluate_criteria({UNCHANGED_BASE: scores[UNCHANGED_BASE]})
    with pytest.raises(ValueError, match=r"`baselines` \['nope', 'model'\]"):
        evaluate_criteria(scores, ["nope", MODEL])


def test_build_report_separates_baselines_from_ablations():
    scores = _scores(model=(1, 1, 1, 0, 0), unchanged=(0, 0, 0, 0, 0), prior=(1, 0, 0, 0, 0), ablation=(1,) * 5)
    examples = [
        EvaluationExample(i, f"x{i}", t, "edit [image1]", ("a.png",), (), 0, SCENE, SCENE) for i, t in enumerate(TYPES)
    ]
    report = build_report(EvaluationResult(scores, examples, 1.0, {}), _accuracy(0.99), {"split": "test"})
    assert list(report["baselines"]) == [UNCHANGED_BASE, PRIOR_WITHOUT_LLM]
    assert list(report["ablations"]) == [NO_PRIOR]
    assert report["ablations"][NO_PRIOR]["description"] == DESCRIPTIONS[NO_PRIOR]
    assert report["ablations"][NO_PRIOR]["overall"]["edit_success"] == 1.0
    assert report["baselines"][PRIOR_WITHOUT_LLM]["per_type"]["recolour"]["edit_success"] == 0.5
    assert report["overall"]["edit_success"] == pytest.approx(0.6)
    assert report["criteria"] == evaluate_criteria(scores)
    assert json.loads(json.dumps(report)) == report  # plain JSON (no infinite ratio)

    printed = format_report(report)
    assert "baselines" in printed and "ablations" in printed
    header = printed.splitlines()[4]
    assert header.split() == ["Edit", "success", MODEL, UNCHANGED_BASE, PRIOR_WITHOUT_LLM, NO_PRIOR]
    # The group headers sit above their columns.
    groups = printed.splitlines()[3]
    assert groups.index("baselines") < header.index(PRIOR_WITHOUT_LLM) < groups.index("ablations")
    assert groups.index("ablations") > header.index(PRIOR_WITHOUT_LLM) + len(PRIOR_WITHOUT_LLM)
    assert "overall edit success 60.0% >= 70.0%: FAIL" in printed
    assert "recolour: 100.0% vs 50.0% (prior_without_llm), 2.00x: PASS" in printed
    assert "remove: 50.0% vs 0.0% (unchanged_base), best baseline 0: PASS" in printed
    assert "background: 0.0% vs 0.0% (unchanged_base), best baseline 0: FAIL" in printed
    assert "base selection 66.7% >= 90.0%: FAIL" in printed and printed.endswith("all criteria: FAIL")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def test_load_examples_reads_the_generator_format(workspace):
    examples = load_examples(workspace["data"], "test", max_examples=3)
    assert [e.index for e in examples] == [0, 1, 2]
    records = json.load(open(os.path.join(workspace["data"], "test", "instruction.json")))
    for example, record in zip(examples, records):
        assert example.id == record["id"] and example.instruction == record["instruction"]
        assert example.target_scene == Scene.from_dict(record["target_scene"])
        assert len(example.image_paths) + len(example.audio_paths) == len(record["media"])
        assert all(os.path.isfile(p) for p in example.image_paths + example.audio_paths)
        assert example.base_scene == Scene.from_dict(record["base_scene"])


def _write_split(tmp_path, workspace, edit) -> str:
    records = json.load(open(os.path.join(workspace["data"], "test", "instruction.json")))
    edit(records[1])
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    os.symlink(os.path.join(workspace["data"], "media"), data / "media")
    (data / "test" / "instruction.json").write_text(json.dumps(records))
    return str(data)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("target_scene"), r"entry 1, id 'test-000001'\): missing fields \['target_scene'\]"),
        (lambda r: r.update(type="paint"), "unknown type 'paint'"),
        (lambda r: r.update(base_index=7), "base_index` 7"),
        (lambda r: r["media"][0].update(path="media/scenes/nope.png"), "nope.png' does not exist"),
        (lambda r: r["media"][0].update(kind="video"), "kind"),
        (lambda r: r.update(target_scene={"background": "plain", "objects": []}), "bad target or base scene"),
    ],
)
def test_load_examples_names_bad_records(tmp_path, workspace, edit, match):
    data = _write_split(tmp_path, workspace, edit)
    with pytest.raises(ValueError, match=match):
        load_examples(data, "test")


def test_load_examples_rejects_missing_split_and_bad_count(workspace):
    with pytest.raises(ValueError, match="No split 'dev'"):
        load_examples(workspace["data"], "dev")
    with pytest.raises(ValueError, match="max_examples"):
        load_examples(workspace["data"], "test", max_examples=0)


# --------------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------------
def test_run_evaluation_baseline_unchanged_base_preserves_everything(workspace, probe, tmp_path):
    pipeline = InstructAny2PixPipeline.from_pretrained(workspace["model"])
    examples = load_examples(workspace["data"], "test", max_examples=3)
    result = run_evaluation(
        pipeline, probe, examples, {MODEL: {}, UNCHANGED_BASE: None}, {"num_inference_steps": 1}, batch_size=2,
        save_images=str(tmp_path / "outputs"), progress=False,
    )  # fmt: skip
    unchanged = aggregate(result.scores[UNCHANGED_BASE])
    assert unchanged["num_untouched_objects"] > 0 and unchanged["preservation"] == 1.0
    model = result.scores[MODEL]
    assert all(s.chosen_base is not None for s in model)
    # The tiny pipeline writes 32x32 images; the saved outputs are what the probe read.
    saved = PIL.Image.open(tmp_path / "outputs" / MODEL / f"{examples[0].id}.png")
    assert saved.size == (32, 32)
    assert probe.read([saved])[0] == model[0].reading
    assert result.pipeline_kwargs["llm_do_sample"] is False


def _hand_prior_without_llm(pipeline, example, guidance_scale, score, norm) -> torch.Tensor:
    """Mean of the unit-normalised ImageBind embeddings → media norm → prior → ``norm``, one example at a time."""
    processor, encoder = pipeline.imagebind_processor, pipeline.image_encoder
    embeds = [encoder.encode_image(processor.preprocess_image([processor.load_image(p) for p in example.image_paths]))]
    if example.audio_paths:
        clips = [processor.load_audio(p) for p in example.audio_paths]
        embeds.append(encoder.encode_audio(processor.preprocess_audio(clips)))
    embeds = torch.cat(embeds)
    mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(dim=0)
    query = mean / mean.norm() * pipeline.mm_adapter.config.media_embed_norm
    refined = pipeline.prior.refine(query[None], guidance_scale=guidance_scale, score=score)[0]
    return refined / refined.norm() * norm


def _record_pipeline_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every pipeline call from now on (the calls still run)."""
    calls = []
    original = InstructAny2PixPipeline.__call__

    def recording_call(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InstructAny2PixPipeline, "__call__", recording_call)
    return calls


def test_prior_without_llm_conditions_on_refined_imagebind_arithmetic(workspace, probe, monkeypatch):
    pipeline = InstructAny2PixPipeline.from_pretrained(workspace["model"])
    assert pipeline.prior_text_encoder is None  # the prior's stored empty prompt, as in the pipeline
    examples = load_examples(workspace["data"], "test", max_examples=3)
    # Example 0 has an audio clip, example 1 two images whose second is the base.
    assert examples[0].audio_paths and len(examples[1].image_paths) == 2 and examples[1].base_index == 1
    calls = _record_pipeline_calls(monkeypatch)
    knobs = {"num_inference_steps": 1, "embedding_norm": 7.0, "prior_guidance_scale": 3.0, "prior_score": 5.0}
    result = run_evaluation(
        pipeline, probe, examples, {PRIOR_WITHOUT_LLM: BASELINES[PRIOR_WITHOUT_LLM]}, knobs, batch_size=2,
        progress=False,
    )  # fmt: skip
    assert len(calls) == 2 and all(call["embedding_norm"] == 7.0 for call in calls)
    embeds = torch.cat([call["conditioning_embeds"] for call in calls])
    assert embeds.shape == (3, pipeline.image_encoder.config.out_embed_dim)
    with torch.no_grad():
        expected = torch.stack([_hand_prior_without_llm(pipeline, e, 3.0, 5.0, 7.0) for e in examples])
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)
    # The pipeline edited each instruction's first image (scored: example 1's base is its second) without an LLM.
    scores = result.scores[PRIOR_WITHOUT_LLM]
    assert [s.chosen_base for s in scores] == [0, 0, 0]
    assert [s.base_correct for s in scores] == [None, False, None]
    assert all(s.caption is None and s.caption_correct is None and s.valid_answer is None for s in scores)
    assert aggregate(scores)["caption_accuracy"] is None


def test_identical_configurations_run_once_and_are_reported(workspace, probe, monkeypatch):
    pipeline = InstructAny2PixPipeline.from_pretrained(workspace["model"])
    examples = load_examples(workspace["data"], "test", max_examples=3)
    calls = _record_pipeline_calls(monkeypatch)
    defaults = pipeline.resolve_edit_settings()
    configurations = {
        MODEL: {},
        # The stored defaults spelled out (as a list): the same call as the model's.
        NO_PRIOR: {"embedding_weights": list(defaults["embedding_weights"])},
        # A different call: must run.
        REFINED_ONLY: {"embedding_weights": (0.5, 0.25, 0.25)},
    }
    knobs = {"num_inference_steps": 1}
    assert defaults["embedding_weights"] != (0.5, 0.25, 0.25)
    result = run_evaluation(pipeline, probe, examples, configurations, knobs, batch_size=2, progress=False)
    assert len(calls) == 2 * 2  # two batches, two distinct calls each
    assert result.same_as == {NO_PRIOR: MODEL}
    assert result.scores[NO_PRIOR] == result.scores[MODEL]
    # Reuse is exact: running the ablation on its own gives the same scores.
    alone = run_evaluation(pipeline, probe, examples, {NO_PRIOR: configurations[NO_PRIOR]}, knobs, progress=False)
    assert alone.scores[NO_PRIOR] == result.scores[MODEL] and alone.same_as == {}
    report = build_report(result, _accuracy(1.0))
    assert report["ablations"][NO_PRIOR]["same_as"] == MODEL and "same_as" not in report["ablations"][REFINED_ONLY]
    assert f"({NO_PRIOR}: the same pipeline call as {MODEL}, outputs reused)" in format_report(report)
    # Tensors are never compared by repr: two conditioning_embeds configurations both run.
    calls.clear()
    embeds = torch.zeros(1, pipeline.image_encoder.config.out_embed_dim)
    twins = {"a": {"conditioning_embeds": embeds}, "b": {"conditioning_embeds": embeds + 1}}
    result = run_evaluation(pipeline, probe, examples[:1], twins, knobs, progress=False)
    assert len(calls) == 2 and result.same_as == {}


def test_prior_without_llm_and_configurations_reject_bad_input(workspace, probe):
    pipeline = InstructAny2PixPipeline.from_pretrained(workspace["model"])
    image = PIL.Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="one list per instruction"):
        prior_without_llm(pipeline, ["edit [image1]"], [[image], [image]], [[]])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        prior_without_llm(pipeline, "edit [image1]", [[image]], [[]])
    with pytest.raises(ValueError, match=r"instructions\[0\]"):
        prior_without_llm(pipeline, ["edit [image2]"], [[image]], [[]])
    examples = load_examples(workspace["data"], "test", max_examples=1)
    with pytest.raises(TypeError, match="Configuration 'odd' must be None, a dict"):
        run_evaluation(pipeline, probe, examples, {"odd": [1]}, progress=False)
    with pytest.raises(TypeError, match="Configuration 'odd' must return a dict"):
        run_evaluation(pipeline, probe, examples, {"odd": lambda *args: None}, progress=False)


def test_cli_refuses_to_report_with_an_inaccurate_probe(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "probe_accuracy", lambda probe: _accuracy(0.9))
    output = tmp_path / "report.json"
    argv = ["--model", workspace["model"], "--data", workspace["data"], "--probe", workspace["probe"]]
    status = evaluate.main(argv + ["--max_examples", "2", "--output", str(output), "--no_progress"])
    assert status == 1
    assert "Not reporting" in capsys.readouterr().err
    assert not output.exists()


def _cli_argv(workspace) -> list[str]:
    return [
        "--model", workspace["model"], "--data", workspace["data"], "--split", "test", "--probe", workspace["probe"],
        "--num_inference_steps", "1", "--batch_size", "2", "--seed", "1", "--no_progress",
    ]  # fmt: skip


def test_cli_reports_model_baselines_and_ablations_deterministically(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "probe_accuracy", lambda probe: _accuracy(0.99))
    argv = _cli_argv(workspace) + ["--max_examples", "3"]
    assert evaluate.main(argv + ["--output", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "Edit success" in printed and "99.0% of 1000 clean renders" in printed
    assert all(name in printed for name in [*BASELINES, *ABLATIONS]) and "all criteria:" in printed
    report = json.load(open(tmp_path / "a.json"))
    assert 0.0 <= report["overall"]["edit_success"] <= 1.0
    assert set(METRICS) <= set(report["overall"])
    assert set(report["per_type"]) <= set(INSTRUCTION_TYPES) and report["num_examples"] == 3
    assert list(report["baselines"]) == [UNCHANGED_BASE, PRIOR_WITHOUT_LLM]
    assert list(report["ablations"]) == [NO_PRIOR, REFINED_ONLY]
    for configuration in [*report["baselines"].values(), *report["ablations"].values()]:
        assert set(configuration) >= {"description", "overall", "per_type"}
    assert report["baselines"][UNCHANGED_BASE]["overall"]["preservation"] == 1.0
    assert report["baselines"][PRIOR_WITHOUT_LLM]["overall"]["caption_accuracy"] is None
    assert report["ablations"][NO_PRIOR]["overall"]["num_examples"] == 3
    criteria = report["criteria"]
    assert criteria["overall_edit_success"] == report["overall"]["edit_success"]
    assert set(criteria["per_type"]) == set(report["per_type"])
    assert {e["best_baseline_name"] for e in criteria["per_type"].values()} <= set(BASELINES)
    assert report["probe"]["clean_accuracy"]["exact"] == 0.99
    assert len(report["examples"]) == 3 and set(report["examples"][0]) >= {"id", "target", MODEL, UNCHANGED_BASE}
    for entry in report["examples"]:  # the LLM's whole answer is kept; its caption is the one parsed from it
        assert entry[MODEL]["llm_caption"] == parse_answer(entry[MODEL]["llm_answer"]).caption
        assert entry[UNCHANGED_BASE]["llm_answer"] is None and entry[PRIOR_WITHOUT_LLM]["llm_answer"] is None

    # Same seed: the same report (but for the timing).
    assert evaluate.main(argv + ["--output", str(tmp_path / "b.json")]) == 0
    again = json.load(open(tmp_path / "b.json"))
    report.pop("seconds"), again.pop("seconds")
    assert again == report


@pytest.mark.parametrize(
    "selection, baselines, ablations",
    [
        (["--baselines", "--ablations", NO_PRIOR], [], [NO_PRIOR]),
        (["--baselines", PRIOR_WITHOUT_LLM, "--ablations"], [PRIOR_WITHOUT_LLM], []),
    ],
)
def test_cli_selects_baselines_and_ablations(workspace, tmp_path, monkeypatch, capsys, selection, baselines, ablations):
    monkeypatch.setattr(evaluate, "probe_accuracy", lambda probe: _accuracy(0.99))
    output = tmp_path / "report.json"
    argv = _cli_argv(workspace) + ["--max_examples", "2", "--output", str(output), "--llm_num_beams", "2",
                                   "--llm_rerank_weight", "0", "--llm_base_agreement_weight", "0",
                                   "--llm_base_focus_weight", "0", "--base_instruction_weight", "0",
                                   "--num_candidate_images", "1"]  # fmt: skip
    assert evaluate.main(argv + selection) == 0
    report = json.load(open(output))
    assert list(report["baselines"]) == baselines and list(report["ablations"]) == ablations
    assert report["pipeline_kwargs"]["llm_num_beams"] == 2  # pipeline knobs, passed through
    assert report["pipeline_kwargs"]["llm_rerank_weight"] == report["pipeline_kwargs"]["llm_base_agreement_weight"] == 0
    assert report["pipeline_kwargs"]["llm_base_focus_weight"] == 0
    assert report["pipeline_kwargs"]["base_instruction_weight"] == 0
    assert report["pipeline_kwargs"]["num_candidate_images"] == 1
    assert set(report["examples"][0]) >= {MODEL, *baselines, *ablations}
    printed = capsys.readouterr().out
    assert ("- baselines -" in printed) == bool(baselines) and ("- ablations -" in printed) == bool(ablations)
    if not baselines:  # nothing to compare with: the criterion is not shown
        assert report["criteria"]["every_type_at_least_2x_best_baseline"] is None
        assert report["criteria"]["passed"] is False and "no baseline run: n/a (FAIL)" in printed


@pytest.mark.parametrize("given, passed", [(["0.3"], 0.3), (["0.3", "1"], [0.3, 1.0])])
def test_cli_passes_one_caption_weight_as_a_number_and_several_as_a_list(workspace, monkeypatch, given, passed):
    seen = {}

    def stop(pipeline, probe, examples, configurations, pipeline_kwargs, **kwargs):
        seen.update(pipeline_kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(evaluate, "probe_accuracy", lambda probe: _accuracy(0.99))
    monkeypatch.setattr(evaluate, "run_evaluation", stop)
    with pytest.raises(SystemExit):
        evaluate.main(_cli_argv(workspace) + ["--max_examples", "1", "--caption_embedding_weight", *given,
                                              "--num_candidate_images", "3", "--llm_ensemble_weight", "0.25"])  # fmt: skip
    assert seen["caption_embedding_weight"] == passed and seen["num_candidate_images"] == 3
    assert seen["llm_ensemble_weight"] == 0.25


def test_cli_train_only_saves_a_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "probe_accuracy", lambda probe: _accuracy(0.985))
    calls = []

    def tiny_train(**kwargs):
        calls.append(kwargs)
        return train_probe(num_steps=1, batch_size=2, image_size=16, progress=False)

    monkeypatch.setattr(evaluate, "train_probe", tiny_train)
    assert evaluate.main(["--train", "--probe", str(tmp_path / "probe"), "--probe_steps", "7", "--no_progress"]) == 0
    assert calls[0]["num_steps"] == 7
    assert "trained, saved to" in capsys.readouterr().out
    assert ShapesProbe.from_pretrained(tmp_path / "probe").config.image_size == 16


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "--model is required"),
        (["--model", "MODEL"], "--data is required"),
        (["--model", "MODEL", "--data", "DATA", "--max_examples", "0"], "--max_examples must be a positive"),
        (["--model", "MODEL", "--data", "DATA", "--llm_num_beams", "0"], "--llm_num_beams must be a positive"),
        (["--model", "MODEL", "--data", "DATA", "--num_candidate_images", "0"],
         "--num_candidate_images must be a positive"),  # fmt: skip
        (["--model", "MODEL", "--data", "DATA", "--llm_rerank_weight", "-1"], "--llm_rerank_weight must be a finite"),
        (["--model", "MODEL", "--data", "DATA", "--llm_rerank_weight", "nan"], "--llm_rerank_weight must be a finite"),
        *[
            (["--model", "MODEL", "--data", "DATA", f"--{name}", value], f"--{name} must be a finite")
            for name in ("llm_base_agreement_weight", "llm_base_focus_weight", "base_instruction_weight")
            for value in ("-1", "inf")
        ],
        (["--model", "MODEL", "--data", "DATA", "--caption_embedding_weight", "1.5"],
         "--caption_embedding_weight must be a number in [0, 1]"),  # fmt: skip
        (["--model", "MODEL", "--data", "DATA", "--caption_embedding_weight", "nan"],
         "--caption_embedding_weight must be a number in [0, 1]"),  # fmt: skip
        (["--model", "MODEL", "--data", "DATA", "--caption_embedding_weight", "0.3", "2"],
         "--caption_embedding_weight must be a number in [0, 1], got 2.0"),  # fmt: skip
        *[
            (["--model", "MODEL", "--data", "DATA", "--llm_ensemble_weight", value],
             "--llm_ensemble_weight must be a number in [0, 1]")  # fmt: skip
            for value in ("-0.5", "1.5", "nan")
        ],
        (["--model", "DATA", "--data", "DATA"], "not a saved pipeline folder"),
        (["--model", "MODEL", "--data", "DATA", "--split", "dev"], "No split 'dev'"),
        (["--model", "MODEL", "--data", "DATA", "--baselines", "prior_only"], "invalid choice: 'prior_only'"),
        (["--model", "MODEL", "--data", "DATA", "--ablations", UNCHANGED_BASE], "invalid choice: 'unchanged_base'"),
    ],
)
def test_cli_rejects_bad_arguments(workspace, argv, match, capsys):
    argv = [workspace["model"] if a == "MODEL" else workspace["data"] if a == "DATA" else a for a in argv]
    with pytest.raises(SystemExit) as error:
        evaluate.main(argv)
    assert error.value.code == 2
    assert match in capsys.readouterr().err
