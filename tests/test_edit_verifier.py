"""`EditVerifier`: tokenization, encoding, the pointer mixture (exact on inputs with a single source), batch
invariance, the class-renaming augmentation, save/load, its place in the pipeline's ranking of answers, the training
script end to end on tiny ShapesWorld data, and every error path."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from diffusers_any2pix import pipeline_instruct_any2pix as pipeline_module
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.models.edit_verifier import (
    AGREEMENT_FLOOR,
    CLASS_WORD,
    MEDIUM,
    PAD,
    UNKNOWN_WORD_ID,
    WORD,
    EditVerifier,
    collect_words,
)
from diffusers_any2pix.models.mm_adapter import AttributeHeads
from diffusers_any2pix.pipeline_instruct_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import ATTRIBUTE_CLASS_NAMES, generate_dataset
from diffusers_any2pix.testing_utils import (
    TINY_EMBED_DIM,
    tiny_clip_tokenizer,
    tiny_pipeline_components,
    with_attribute_reader,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_WORDS = [list(field) for field in ATTRIBUTE_CLASS_NAMES]  # background, then shape and colour of 3 slots
NUM_CLASSES = [len(field) for field in CLASS_WORDS]
WORDS = [",", ":", "add", "background", "in", "left", "middle", "on", "right", "the", "a"]


def _verifier(seed: int = 0, **config) -> EditVerifier:
    torch.manual_seed(seed)
    return EditVerifier(**{"class_words": CLASS_WORDS, "words": WORDS, "num_layers": 1, "hidden_size": 32, **config})


def _reads(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, generator=g).mul(3).softmax(-1) for n in NUM_CLASSES])


def test_collect_words_and_tokenize():
    words = collect_words(["[image1]: add a red star on the left", "a blue circle, on a plain background"], CLASS_WORDS)
    assert words == [",", ":", "a", "add", "background", "left", "on", "the"]  # no class word, no placeholder
    verifier = _verifier()
    tokens = verifier.tokenize("In [image2]: add a RED star [audio1] zzz")
    red = (verifier.field_types[2], CLASS_WORDS[2].index("red"))
    star = (verifier.field_types[1], CLASS_WORDS[1].index("star"))
    assert tokens == [
        (WORD, verifier.word_index["in"], 0, 0),
        (MEDIUM, verifier.slot_index[("image", 2)], 0, 0),
        (WORD, verifier.word_index[":"], 0, 0),
        (WORD, verifier.word_index["add"], 0, 0),
        (WORD, verifier.word_index["a"], 0, 0),
        (CLASS_WORD, 0) + red,
        (CLASS_WORD, 0) + star,
        (MEDIUM, verifier.slot_index[("audio", 1)], 0, 0),
        (WORD, UNKNOWN_WORD_ID, 0, 0),
    ]
    # The three slots' shape fields share one class type, the colour fields another, the background its own.
    assert verifier.field_types == [0, 1, 2, 1, 2, 1, 2] and verifier.type_sizes == [4, 6, 7]
    with pytest.raises(ValueError, match=r"at most 4 images and 2 audio clips; '\[image5\]'"):
        verifier.tokenize("put [image5] in [image1]")
    with pytest.raises(ValueError, match=r"at most max_words=48 tokens; .* has 50"):
        verifier.tokenize("a " * 50)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(class_words=[]), "`class_words` must be a non-empty list"),
        (dict(class_words=[["", "red"], ["only one"]]), "at least 2 class words"),
        (dict(class_words=[["", "red"], ["red", "blue"]]), "the word 'red' names classes of two different class types"),
        (dict(words=["red", "add"]), r"`words` must not hold class words .*\['red'\]"),
        (dict(class_words=[["", "Red"], ["", "blue"]]), r"one lower-case word .* got \['', 'Red'\]"),
        (dict(class_words=[["", "dark blue"], ["", "x"]]), "every class word must be one lower-case word"),
        (dict(class_words=[["", "red", "red"], ["", "x"]]), "and appear once in its field"),
        (dict(max_images=0), "`max_images` must be an int >= 1"),
        (dict(max_audio=-1), "`max_audio` must be an int >= 0"),
        (dict(max_words=True), "`max_words` must be an int >= 1"),
    ],
)
def test_bad_config_is_named(config, match):
    with pytest.raises(ValueError, match=match):
        _verifier(**config)


def test_encode_and_its_errors():
    verifier = _verifier()
    batch = verifier.encode(["[image1]: add a red star", "a star"], [{("image", 1): _reads(0)}, {}])
    assert batch.token_kinds.shape == (2, 48) and batch.reads.shape == (2, 6, sum(NUM_CLASSES))
    assert batch.token_kinds[0, :6].tolist() == [MEDIUM, WORD, WORD, WORD, CLASS_WORD, CLASS_WORD]
    assert (batch.token_kinds[0, 6:] == PAD).all() and batch.media_mask.tolist() == [[True] + [False] * 5, [False] * 6]
    assert torch.equal(batch.reads[0, 0], _reads(0)) and not batch.reads[1].any()
    with pytest.raises(ValueError, match="one entry per text: 1 for 2"):
        verifier.encode(["a", "b"], [{}])
    with pytest.raises(ValueError, match=r"key \('video', 1\) is not one of"):
        verifier.encode(["a"], [{("video", 1): _reads(0)}])
    with pytest.raises(ValueError, match=r"must have shape \(43,\) .* got \(5,\)"):
        verifier.encode(["a"], [{("image", 1): torch.ones(5)}])


def test_a_field_with_one_source_copies_it_and_words_only_offer_their_classes():
    verifier = _verifier(seed=3)
    reads = _reads(1)
    predicted = verifier.predict(["[image1]"], [{("image", 1): reads}])
    # The background field's only source is the image's background read: the mixture is that read, exactly.
    torch.testing.assert_close(predicted[0][0], reads[:4])
    # Each shape field mixes the image's three shape reads and the empty class: its mass is theirs.
    for field, probs in enumerate(predicted):
        assert probs.shape == (1, NUM_CLASSES[field]) and torch.allclose(probs.sum(-1), torch.ones(1), atol=1e-5)
    # A caption offers its class words (and the empty class) and nothing else to its colour fields.
    caption = verifier.predict(["a red star on the left, on a plain background"])
    red, plain = CLASS_WORDS[2].index("red"), CLASS_WORDS[0].index("plain")
    for field in (2, 4, 6):
        others = [c for c in range(NUM_CLASSES[field]) if c not in (0, red)]
        assert (caption[field][0, others] <= AGREEMENT_FLOOR * 1.001).all()
    assert caption[0][0, plain] > 0.999  # the background's only source is "plain"


def test_predictions_do_not_depend_on_the_rest_of_the_batch():
    verifier = _verifier(seed=1)
    texts = ["[image1]: add a red star", "in [image2], use the background of [image1] and add [audio1] on the left"]
    media = [{("image", 1): _reads(0)}, {("image", 1): _reads(1), ("image", 2): _reads(2), ("audio", 1): _reads(3)}]
    together = verifier.predict(texts, media)
    for b in range(2):
        alone = verifier.predict(texts[b : b + 1], media[b : b + 1])
        for field_together, field_alone in zip(together, alone):
            torch.testing.assert_close(field_together[b : b + 1], field_alone, atol=1e-5, rtol=1e-4)
    verifier.train()
    verifier.predict(texts[:1], media[:1])
    assert verifier.training  # predict restores the mode it found


def test_rename_classes_renames_words_reads_and_labels_alike():
    verifier = _verifier()
    red, star = CLASS_WORDS[2].index("red"), CLASS_WORDS[1].index("star")
    classes = [1, star, red, 0, 0, 0, 0]
    one_hot = torch.cat([torch.nn.functional.one_hot(torch.tensor(c), n).float() for c, n in zip(classes, NUM_CLASSES)])
    batch = verifier.encode(["[image1]: add a red star"] * 64, [{("image", 1): one_hot}] * 64)
    labels = torch.tensor([classes] * 64)
    before = {k: v.clone() for k, v in vars(batch).items()}
    renamed, new_labels = verifier.rename_classes(batch, labels, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, before[k]) for k, v in vars(batch).items())  # the inputs are kept
    words = renamed.class_ids[:, 4:6]  # "red", "star"
    assert torch.equal(words[:, 0], new_labels[:, 2]) and torch.equal(words[:, 1], new_labels[:, 1])
    fields = renamed.reads[:, 0].split(NUM_CLASSES, dim=-1)
    assert torch.equal(torch.stack([f.argmax(-1) for f in fields], 1), new_labels)  # reads moved with the labels
    assert (new_labels[:, 3:] == 0).all()  # the empty slot is never renamed
    assert len(set(new_labels[:, 2].tolist())) > 3 and (new_labels[:, 2] > 0).all()  # colours are, at random
    again, again_labels = verifier.rename_classes(batch, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.reads, renamed.reads) and torch.equal(again_labels, new_labels)


def test_agreement_is_the_sum_of_logs_of_shared_mass():
    p = [torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 0.0]])]
    q = [torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]])]
    expected = torch.tensor([np.log(0.5) + np.log(0.5), np.log(AGREEMENT_FLOOR) + 0.0], dtype=torch.float32)
    torch.testing.assert_close(EditVerifier.agreement(p, q), expected)
    with pytest.raises(ValueError, match="`predicted` has 2 fields but `read` has 1"):
        EditVerifier.agreement(p, q[:1])


def test_save_and_load_give_identical_predictions(tmp_path):
    verifier = _verifier(seed=2)
    verifier.save_pretrained(str(tmp_path / "v"))
    loaded = EditVerifier.from_pretrained(str(tmp_path / "v"))
    assert loaded.config.words == WORDS and loaded.config.class_words == CLASS_WORDS
    texts, media = ["[image1]: add a red star"], [{("image", 1): _reads(5)}]
    for a, b in zip(verifier.predict(texts, media), loaded.predict(texts, media)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ in the pipeline
TINY_CLASSES = [3, 2, 4, 3, 5, 2, 4]  # the tiny pipeline's attribute reader (as in test_pipeline.py)
# One class type per field: class c of field f is the word "<letter f><letter c>" ("cq": field 2, class 1).
TINY_CLASS_WORDS = [[""] + ["abcdefg"[f] + "pqrst"[c - 1] for c in range(1, n)] for f, n in enumerate(TINY_CLASSES)]


def _verifying_pipe(**overrides) -> InstructAny2PixPipeline:
    components = tiny_pipeline_components("imagebind")
    adapter = with_attribute_reader(components["mm_adapter"], TINY_CLASSES)
    torch.manual_seed(0)
    verifier = EditVerifier(class_words=TINY_CLASS_WORDS, words=["add", "to"], num_layers=1, hidden_size=16)
    pipe = InstructAny2PixPipeline(
        **{**components, "mm_adapter": adapter, "imagebind_tokenizer": tiny_clip_tokenizer(), "edit_verifier": verifier,
           **overrides}
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def verifying_pipe():
    return _verifying_pipe()


def _run(pipe, **kwargs):
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    return pipe(
        "add [audio1] to [image1]", images=[image], audio=[(np.zeros(1600, dtype=np.float32), 16000)],
        num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs,
    )  # fmt: skip


def test_verifier_predictions_read_each_input_in_its_placeholder_slot(verifying_pipe):
    pipe = verifying_pipe
    parsed = [parse_instruction("add [audio1] to [image1]", num_images=1, num_audio=1)]
    media = [torch.randn(2, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(0))]
    (ours,) = pipe.edit_verifier_predictions(parsed, media)
    reads = torch.cat(pipe.mm_adapter.read_attributes(media[0]), -1)
    expected = pipe.edit_verifier.predict(
        ["add [audio1] to [image1]"], [{("audio", 1): reads[0], ("image", 1): reads[1]}]
    )
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b[0])


def test_scorer_adds_the_weighted_verifier_agreement(verifying_pipe):
    pipe = verifying_pipe
    captions = ["cp bp", "cq bp", "cr dq"]
    texts = [f"<base><video><im_gen_start><im_gen>[{c}]<video>" for c in captions]
    beam_scores = torch.tensor([-0.1, -0.2, -0.3])
    gens = list(torch.randn(3, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(1)))
    read = pipe.edit_verifier.predict(captions)
    picks = set()
    for target in range(3):  # a prediction of the classes one caption names
        prediction = [torch.nn.functional.one_hot(field[target].argmax(), field.shape[-1]).float() for field in read]
        agreement = EditVerifier.agreement(prediction, read)
        for weight in (0.0, 0.01, 100.0):
            choose = pipe.caption_agreement_scorer(
                0.0, torch.device("cpu"), verifier_weight=weight, verifier_predictions=[prediction]
            )
            pick = choose(0, texts, beam_scores, gens, [None] * 3)
            assert pick == int((beam_scores + weight * agreement).argmax())
            picks.add(pick)
    assert picks == {0, 1, 2}
    with pytest.raises(ValueError, match="`verifier_weight` > 0 needs the `edit_verifier` component"):
        pipe.caption_agreement_scorer(0.0, torch.device("cpu"), verifier_weight=1.0)


def test_verified_edit_and_its_errors(verifying_pipe, tmp_path):
    edit = dict(output_type="np", llm_do_sample=False, llm_num_beams=3)
    out = _run(verifying_pipe, edit_verifier_weight=1.0, **edit)
    assert out.images.shape == (1, 32, 32, 3)
    stored = _verifying_pipe(edit_defaults={"edit_verifier_weight": 1.0})
    assert np.array_equal(_run(stored, **edit).images, out.images)
    stored.save_pretrained(str(tmp_path / "pipe"))
    loaded = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert isinstance(loaded.edit_verifier, EditVerifier)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(loaded, **edit).images, out.images) and _run(loaded, **edit).answers == out.answers
    plain = _verifying_pipe(edit_verifier=None)
    with pytest.raises(ValueError, match=r"`edit_verifier_weight=0.5` ranks answers with an edit verifier, but"):
        _run(plain, edit_verifier_weight=0.5, **edit)
    with pytest.raises(ValueError, match=r"it needs `llm_num_beams` > 1"):
        _run(verifying_pipe, edit_verifier_weight=0.5, llm_do_sample=False, llm_num_beams=1)
    with pytest.raises(ValueError, match="`edit_verifier_weight` must be a finite number >= 0, got -1"):
        _run(verifying_pipe, edit_verifier_weight=-1, **edit)
    images = [np.zeros((32, 32, 3), np.float32)] * 5
    with pytest.raises(ValueError, match=r"at most 4 images .*'\[image5\]'"):
        verifying_pipe(
            "[image1] [image2] [image3] [image4]: add [image5]", images=images, edit_verifier_weight=1.0, **edit
        )


def test_verifier_must_read_the_adapters_fields():
    components = tiny_pipeline_components("imagebind")
    verifier = EditVerifier(class_words=TINY_CLASS_WORDS, words=[], num_layers=1, hidden_size=16)
    with pytest.raises(ValueError, match=r"`edit_verifier` reads the inputs through the attribute reader"):
        InstructAny2PixPipeline(**components, edit_verifier=verifier)
    adapter = with_attribute_reader(components["mm_adapter"], [3, 2])
    with pytest.raises(ValueError, match=r"Component size mismatch: mm_adapter.config.attribute_classes is \[3, 2\]"):
        InstructAny2PixPipeline(**{**components, "mm_adapter": adapter}, edit_verifier=verifier)


def test_verifier_reranks_the_focused_and_first_beams_alike(verifying_pipe, monkeypatch):
    """With the base focus on, the verifier's term also ranks the pooled beams of `_judge`."""
    seen = []
    original = pipeline_module.InstructAny2PixPipeline._judge

    def spy(self, *args, **kwargs):
        seen.append(args[-2:])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_module.InstructAny2PixPipeline, "_judge", spy)
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    verifying_pipe(
        "add [image2] to [image1]", images=[image, image[::-1].copy()], num_inference_steps=2, output_type="np",
        llm_do_sample=False, llm_num_beams=2, llm_base_focus_weight=0.5, edit_verifier_weight=1.0,
    )  # fmt: skip
    for weight, prediction in seen:
        assert weight == 1.0 and len(prediction) == len(TINY_CLASSES)


# ------------------------------------------------------------------------------------------------ training script
spec = importlib.util.spec_from_file_location("train_edit_verifier", f"{REPO}/training/train_edit_verifier.py")
train_edit_verifier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_edit_verifier)
prepare_spec = importlib.util.spec_from_file_location("prepare_data_v", f"{REPO}/training/prepare_data.py")
prepare_data = importlib.util.module_from_spec(prepare_spec)
prepare_spec.loader.exec_module(prepare_data)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Tiny ShapesWorld data with features, and a tiny pipeline whose adapter reads ShapesWorld's fields."""
    root = tmp_path_factory.mktemp("edit_verifier")
    data = str(root / "data")
    generate_dataset(data, 24, seed=0, image_size=32, sound_duration=1.0, val_fraction=0.25, progress=False)
    components = tiny_pipeline_components("imagebind", answer=None)
    components["mm_adapter"] = with_attribute_reader(components["mm_adapter"], NUM_CLASSES)
    pipeline = str(root / "pipeline")
    InstructAny2PixPipeline(**components).save_pretrained(pipeline)
    maps = [f"{data}/train/media.json", f"{data}/val/media.json"]
    assert prepare_data.main(["--pipeline", pipeline, "--data_dir", data, "--no_progress", "--media_map", *maps]) == 0
    return {"data": data, "pipeline": pipeline}


def _argv(workspace, output_dir, *extra: str) -> list[str]:
    return [
        "--data_dir", workspace["data"], "--output_dir", str(output_dir), "--report_to", "none", "--seed", "0",
        "--max_train_steps", "3", "--train_batch_size", "8", "--hidden_size", "16", "--num_layers", "1", *extra,
    ]  # fmt: skip


def test_script_trains_reports_and_writes_a_pipeline_that_verifies(workspace, tmp_path):
    result = train_edit_verifier.main(_argv(workspace, tmp_path / "out", "--pipeline", workspace["pipeline"]))
    assert result["global_step"] == 3
    report = result["report"]["val"]
    assert report["examples"] == 6 and 0 <= report["results_exact"] <= 6 and 0 <= report["captions_parsed_exact"] <= 6
    assert sum(int(v.split("/")[1]) for v in report["results_exact_per_type"].values()) == 6
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "out"))
    verifier = pipeline.edit_verifier
    assert isinstance(verifier, EditVerifier) and verifier.config.class_words == CLASS_WORDS
    assert "add" in verifier.config.words and "red" not in verifier.config.words
    # The same seed gives the same weights; heads instead of the adapter's reader give another run.
    again = train_edit_verifier.main(_argv(workspace, tmp_path / "again", "--pipeline", workspace["pipeline"]))
    assert again["parameter_digests"] == result["parameter_digests"]
    g = torch.Generator().manual_seed(0)
    heads = AttributeHeads(torch.randn(43, TINY_EMBED_DIM, generator=g), torch.zeros(43), tuple(NUM_CLASSES), 20.0)
    heads.save(str(tmp_path / "heads.safetensors"))
    argv = _argv(workspace, tmp_path / "heads", "--attribute_reader", str(tmp_path / "heads.safetensors"),
                 "--pretrained_mm_adapter", os.path.join(workspace["pipeline"], "mm_adapter"))  # fmt: skip
    with_heads = train_edit_verifier.main(argv)
    assert with_heads["parameter_digests"] != result["parameter_digests"]
    assert os.path.isfile(tmp_path / "heads" / "edit_verifier" / "config.json")  # no --pipeline: the component


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--caption_fraction", "1.0"), r"`--caption_fraction` must lie in \[0, 0.95\]"),
        (("--rename_prob", "-0.1"), r"`--rename_prob` must lie in \[0, 1\]"),
        ((), "The inputs need an attribute reader"),
    ],
)
def test_script_bad_arguments_are_named(workspace, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train_edit_verifier.parse_args(_argv(workspace, tmp_path, *extra))


def test_script_names_a_record_it_cannot_read_and_a_verifier_of_other_classes(workspace, tmp_path):
    records = json.loads(open(os.path.join(workspace["data"], "train", "instruction.json")).read())
    del records[1]["target_scene"], records[1]["media"][0]["caption"]
    (tmp_path / "instruction.json").write_text(json.dumps(records))
    argv = _argv(workspace, tmp_path / "o", "--pipeline", workspace["pipeline"])
    with pytest.raises(ValueError, match=r"record 1: missing \['target_scene', 'media\[0\].caption'\]"):
        train_edit_verifier.main(argv + ["--instruction_file", str(tmp_path / "instruction.json")])
    other = EditVerifier(class_words=[["", "red"], ["", "star"]], words=[], num_layers=1, hidden_size=16)
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="reads other classes than ShapesWorld's"):
        train_edit_verifier.main(argv + ["--pretrained_edit_verifier", str(tmp_path / "other")])


def test_script_refuses_a_reader_of_other_fields(workspace, tmp_path):
    heads = AttributeHeads(torch.randn(5, TINY_EMBED_DIM), torch.zeros(5), (3, 2), 20.0)
    heads.save(str(tmp_path / "heads.safetensors"))
    with pytest.raises(ValueError, match=r"The reader reads fields of \(3, 2\) classes; ShapesWorld's are"):
        train_edit_verifier.main(
            _argv(workspace, tmp_path / "o", "--attribute_reader", str(tmp_path / "heads.safetensors"))
        )
