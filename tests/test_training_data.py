"""MM-Inst data for training (`diffusers_any2pix.data`): reading with line numbers, validation errors that name file,
line, entry and field, the official sampling rules, tokenisation and read-out positions, prior pairs, image data."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from diffusers_any2pix.data import (
    IGNORE_INDEX,
    ROLE_ADDITION,
    ROLE_BASE,
    ROLE_GENERATION,
    FeatureStore,
    ImageEmbeddingDataset,
    MMInstDataError,
    MMInstLLMDataset,
    MissingFeatureError,
    PriorPairsDataset,
    build_llm_sample,
    build_reproduce_sample,
    collate_llm_batch,
    default_prior_pairs,
    image_entries,
    load_instructions,
    load_media_map,
    read_json_entries,
    read_prior_pairs,
    repeat_examples,
)
from diffusers_any2pix.models.mm_adapter import rescale_to_norm
from diffusers_any2pix.models.prior import Modality
from diffusers_any2pix.multimodal_llm import (
    VIDEO_TOKEN,
    build_vicuna_prompt,
    expand_media_tokens,
    find_embedding_positions,
    parse_answer,
)
from diffusers_any2pix.shapes import ATTRIBUTE_CLASS_NAMES, ATTRIBUTE_CLASSES, generate_dataset
from diffusers_any2pix.testing_utils import tiny_llm_tokenizer
from diffusers_any2pix.multimodal_llm import add_multimodal_tokens

DIM = 8


def _write_features(root: str, split: str, dim: int = DIM, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(os.path.join(root, split, "media.json")) as f:
        for entry in json.load(f).values():
            path = os.path.join(root, entry["fpath"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path, clip=rng.standard_normal((1, dim)).astype(np.float32))


@pytest.fixture(scope="module")
def source_data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_dataset(root, 20, seed=0, image_size=32, sound_duration=1.0, progress=False)
    _write_features(root, "train")
    return root


@pytest.fixture
def data(source_data, tmp_path) -> str:
    """A private copy the test may break."""
    root = str(tmp_path / "data")
    shutil.copytree(source_data, root)
    return root


def _features(root: str, dim: int | None = DIM) -> FeatureStore:
    return FeatureStore.from_file(os.path.join(root, "train", "media.json"), root, dim)


def _edit_record(root: str, index: int, edit) -> str:
    path = os.path.join(root, "train", "instruction.json")
    with open(path) as f:
        records = json.load(f)
    edit(records[index])
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def _line_of(path: str, index: int) -> int:
    return read_json_entries(path)[index].line


# ------------------------------------------------------------------------------------------------ JSON reading


def test_read_json_entries_gives_start_lines_of_list_and_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n {"a": 1},\n\n {"b": [1,\n 2]}, 3\n]\n')
    entries = read_json_entries(path)
    assert [(e.line, e.key, e.value) for e in entries] == [(2, 0, {"a": 1}), (4, 1, {"b": [1, 2]}), (5, 2, 3)]
    path = tmp_path / "map.json"
    path.write_text('{\n "x": {"fpath": "a.npz"},\n "y":\n  2\n}')
    assert [(e.line, e.key) for e in read_json_entries(path)] == [(2, "x"), (3, "y")]
    path = tmp_path / "lines.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(e.line, e.key) for e in read_json_entries(path)] == [(1, 0), (3, 1)]


def test_read_json_entries_reports_syntax_errors_with_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(MMInstDataError, match=r"bad\.json:3:\d+: invalid JSON"):
        read_json_entries(path)
    with pytest.raises(MMInstDataError, match="Cannot read"):
        read_json_entries(tmp_path / "missing.json")


def test_media_map_entries_must_have_fpath_and_key(tmp_path):
    path = tmp_path / "media.json"
    path.write_text('{\n "a cat": {"fpath": "cat.jpg.npz", "key": "clip"},\n "a dog": {"fpath": "dog.npz"}\n}')
    with pytest.raises(MMInstDataError, match=r"media\.json:3 \(entry 'a dog', field `key`\)"):
        load_media_map(path)
    path.write_text('{"a cat": {"fpath": "x/cat.jpg.npz", "key": "clip"}}')
    entry = load_media_map(path)["a cat"]
    assert entry.media_file == "x/cat.jpg" and entry.kind == "image"  # the official <medium>.npz convention


# ------------------------------------------------------------------------------------------------ features


def test_feature_store_loads_and_caches_copies(source_data):
    features = _features(source_data)
    key = next(iter(features.media_map))
    first = features.load(key, "test")
    assert first.shape == (DIM,) and first.dtype == torch.float32
    first.zero_()  # a copy: the cache is not affected
    assert features.load(f"[{key.upper()}.]", "test").abs().sum() > 0  # looked up like the official `clean`


def test_feature_store_missing_caption_names_the_caption_and_map(source_data):
    with pytest.raises(
        MMInstDataError, match=r"ctx: caption '\[no such thing\]' is missing from the media map .*media\.json"
    ):
        _features(source_data).load("[no such thing]", "ctx")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a zip file", "Cannot read feature file .*npz \\(media map .*media.json:\\d+ \\(entry '"),
        ("wrong_key", "has no array 'clip'"),
        ("nan", "non-finite"),
        ("matrix", "must be a float vector of shape"),
    ],
)
def test_feature_store_corrupt_files_are_named(data, content, match):
    features = _features(data)
    key, entry = next(iter(features.media_map.items()))
    path = features.path(entry)
    if isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    elif content == "wrong_key":
        np.savez(path, other=np.zeros((1, DIM), np.float32))
    elif content == "nan":
        np.savez(path, clip=np.full((1, DIM), np.nan, np.float32))
    else:
        np.savez(path, clip=np.zeros((2, DIM), np.float32))
    with pytest.raises(MMInstDataError, match=match) as error:
        features.load(key, "ctx")
    assert path in str(error.value)


def test_feature_store_checks_the_model_size(source_data):
    key = next(iter(_features(source_data).media_map))
    with pytest.raises(MMInstDataError, match=f"has {DIM} values but the model expects 5"):
        _features(source_data, dim=5).load(key, "ctx")


# ------------------------------------------------------------------------------------------------ instructions


def test_shapesworld_instructions_validate(source_data):
    examples = load_instructions(os.path.join(source_data, "train", "instruction.json"), _features(source_data))
    assert len(examples) == 16
    added = [e for e in examples if e.added]
    assert added and all(caption in e.instruction for e in added for caption in e.added)
    assert all(e.base in e.instruction and e.result in e.answer for e in examples)


def test_missing_caption_error_names_file_line_entry_and_field(data):
    path = _edit_record(
        data, 3, lambda r: r["conversations"][0].update(value=r["conversations"][0]["value"] + " and [a unicorn]")
    )
    line = _line_of(path, 3)
    with pytest.raises(MMInstDataError) as error:
        load_instructions(path, _features(data))
    message = str(error.value)
    assert f"instruction.json:{line} (entry 3, id 'train-000003', field `conversations[0].value`)" in message
    assert "'[a unicorn]' is missing from the media map" in message


def test_missing_feature_file_is_reported(data):
    features = _features(data)
    os.remove(features.path(next(iter(features.media_map.values()))))
    path = os.path.join(data, "train", "instruction.json")
    with pytest.raises(MissingFeatureError, match="does not exist; run training/prepare_data.py first"):
        load_instructions(path, features)
    kept = load_instructions(path, features, skip_missing_features=True)
    assert 0 < len(kept) < 16


def test_placeholders_that_do_not_match_media_are_named(data):
    def swap(record):
        record["instruction"] = record["instruction"].replace("[image1]", "[image3]")

    path = _edit_record(data, 0, swap)
    with pytest.raises(
        MMInstDataError, match=r"instruction\.json:\d+ \(entry 0, id 'train-000000', field `instruction`\).*\[image3\]"
    ):
        load_instructions(path, _features(data))


def test_instruction_placeholders_in_the_wrong_order_are_named(data):
    records = json.load(open(os.path.join(data, "train", "instruction.json")))
    index = next(i for i, r in enumerate(records) if sum(m["kind"] == "image" for m in r["media"]) == 2)

    def swap_images(record):
        record["instruction"] = (
            record["instruction"].replace("[image1]", "[x]").replace("[image2]", "[image1]").replace("[x]", "[image2]")
        )

    path = _edit_record(data, index, swap_images)
    with pytest.raises(
        MMInstDataError, match=r"placeholders \['\[image\d\]', '\[image\d\]'\] refer to media .* but the human turn"
    ):
        load_instructions(path, _features(data))


@pytest.mark.parametrize(
    "edit, field, match",
    [
        (lambda r: r.update(base="[a dragon]"), "base", "does not appear in the human turn"),
        (lambda r: r.update(base="no brackets"), "base", "one bracketed caption"),
        (
            lambda r: r["conversations"][1].update(value="Sure. <base>" + r["base"]),
            "conversations[1].value",
            "no <im_gen>",
        ),
        (lambda r: r.update(task="generation"), "task", "only 'any2any'"),
        (
            lambda r: r.update(conversations=[r["conversations"][0]]),
            "conversations",
            "one human turn followed by one gpt",
        ),
        (lambda r: r.update(added=[["cat", "[a cat]"]]), "added[0]", "does not appear in the human turn"),
    ],
)
def test_malformed_records_name_the_field(data, edit, field, match):
    path = _edit_record(data, 2, edit)
    with pytest.raises(MMInstDataError, match=match) as error:
        load_instructions(path, _features(data))
    assert f"instruction.json:{_line_of(path, 2)} (entry 2, id 'train-000002', field `{field}`)" in str(error.value)


# ------------------------------------------------------------------------------------------------ sampling rules


@pytest.fixture(scope="module")
def examples(source_data):
    return load_instructions(os.path.join(source_data, "train", "instruction.json"), _features(source_data))


def test_repeat_examples_lists_matching_records_that_many_times_in_place(examples):
    types = [e.source.value["type"] for e in examples]
    repeated = repeat_examples(examples, ["type=pick_base:3", "type=remove:2"])
    expected = [e for e in examples for _ in range({"pick_base": 3, "remove": 2}.get(e.source.value["type"], 1))]
    assert [id(e) for e in repeated] == [id(e) for e in expected]
    assert len(repeated) == len(examples) + 2 * types.count("pick_base") + types.count("remove") > len(examples)
    assert repeat_examples(examples, []) == list(examples) and repeated is not examples
    assert repeat_examples(examples, ["type=pick_base:1"]) == list(examples)


@pytest.mark.parametrize(
    "specs, match",
    [
        (["type=pick_base"], r"FIELD=VALUE:TIMES with TIMES >= 1 \(e.g. type=pick_base:3\), got 'type=pick_base'"),
        (["type=pick_base:0"], r"TIMES >= 1.*got 'type=pick_base:0'"),
        (["type=pick_base:x"], r"got 'type=pick_base:x'"),
        (["pick_base:2"], r"got 'pick_base:2'"),
        (["=pick_base:2"], r"got '=pick_base:2'"),
        (["type=:2"], r"got 'type=:2'"),
        (["type=remove:2", "type=remove:3"], r"name the same FIELD=VALUE twice"),
        (["type=remove:2", "task=any2any:2"], r"entry \d+.*matched by more than one record repeat"),
        (["type=pick_bas:2"], r"\['type=pick_bas:2'\] match no record \(check the field name and value\)"),
        (["kind=remove:2"], r"\['kind=remove:2'\] match no record"),
    ],
)
def test_repeat_examples_errors(examples, specs, match):
    with pytest.raises(ValueError, match=match):
        repeat_examples(examples, specs)


def test_sample_with_everything_as_video(examples):
    example = next(e for e in examples if e.added)
    sample = build_llm_sample(example, np.random.default_rng(0), base_drop_prob=0.0, caption_text_prob=0.0)
    assert "[" not in sample.instruction and sample.instruction.count("<video>") == len(sample.input_captions)
    assert sample.answer == (
        f"Sure. <base><video><im_gen_start><im_gen>{example.result}<video>"
        + "additions:"
        + "".join(f"{name}:<video>." for name in example.added.values())
    )
    roles = [role for role, _ in sample.targets]
    assert roles == [ROLE_BASE, ROLE_GENERATION] + [ROLE_ADDITION] * len(example.added)
    assert sample.targets[0][1] == example.base and sample.targets[1][1] == example.result


def test_sample_with_base_dropped_and_captions_as_text(examples):
    example = next(e for e in examples if e.added)
    sample = build_llm_sample(example, np.random.default_rng(0), base_drop_prob=1.0, caption_text_prob=1.0)
    assert "<video>" not in sample.instruction and example.base[1:-1] in sample.instruction
    assert sample.answer == f"Sure. <base_null><im_gen_start><im_gen>{example.result}<video>"  # no additions
    assert sample.input_captions == [] and sample.targets == [(ROLE_GENERATION, example.result)]


def test_sample_describing_the_base_writes_its_caption_before_the_result(examples):
    example = next(e for e in examples if e.added)
    plain = build_llm_sample(example, np.random.default_rng(0), base_drop_prob=0.0, caption_text_prob=0.0)
    sample = build_llm_sample(
        example, np.random.default_rng(0), base_drop_prob=0.0, caption_text_prob=0.0, describe_base=True
    )
    assert sample.answer == plain.answer.replace("<base><video>", f"<base><video>{example.base}", 1)
    assert sample.answer.startswith(f"Sure. <base><video>{example.base}<im_gen_start><im_gen>{example.result}<video>")
    assert (sample.instruction, sample.input_captions, sample.targets) == (
        plain.instruction, plain.input_captions, plain.targets
    )  # fmt: skip
    # A dropped base is text in the instruction already: nothing to describe.
    dropped = build_llm_sample(example, np.random.default_rng(0), base_drop_prob=1.0, describe_base=True)
    assert dropped == build_llm_sample(example, np.random.default_rng(0), base_drop_prob=1.0)
    # The same draws: the option changes the answer text only.
    for seed in range(20):
        a = build_llm_sample(example, np.random.default_rng(seed))
        b = build_llm_sample(example, np.random.default_rng(seed), describe_base=True)
        assert b.answer == a.answer.replace("<base><video>", f"<base><video>{example.base}", 1)
        assert (b.instruction, b.targets) == (a.instruction, a.targets)
    reproduce = build_reproduce_sample(example, describe_base=True)
    assert reproduce.answer == f"Sure. <base><video>{example.base}<im_gen_start><im_gen>{example.base}<video>"
    assert reproduce.targets == build_reproduce_sample(example).targets


def test_sampling_rates_follow_the_official_80_20_rules(examples):
    example = next(e for e in examples if len(e.added) == 1)
    rng = np.random.default_rng(123)
    samples = [build_llm_sample(example, rng) for _ in range(4000)]
    dropped = np.mean(["<base_null>" in s.answer for s in samples])
    kept = [s for s in samples if "<base_null>" not in s.answer]
    other_as_video = np.mean([len(s.input_captions) == 2 for s in kept])
    assert abs(dropped - 0.2) < 0.03 and abs(other_as_video - 0.8) < 0.03


# ------------------------------------------------------------------------------------------------ LLM dataset


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tiny_llm_tokenizer()
    return tokenizer, add_multimodal_tokens(tokenizer)


def test_llm_dataset_tokenises_with_the_inference_prompt_and_read_out_rule(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    dataset = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0)
    for index in range(len(dataset)):
        item = dataset[(1, index)]
        ids = item["input_ids"].tolist()
        prompt_length = item["prompt_length"]
        assert ids[0] == token_ids.bos and ids[-1] == token_ids.eos
        assert item["labels"][:prompt_length].eq(IGNORE_INDEX).all()
        assert item["labels"][prompt_length:].tolist() == ids[prompt_length:]
        assert tokenizer.decode(ids[1:prompt_length]).endswith("ASSISTANT:")
        positions = find_embedding_positions(ids, token_ids, start=prompt_length)
        answer_videos = [p for p in range(prompt_length, len(ids)) if ids[p] == token_ids.video]
        assert item["target_positions"].tolist() == [p - 1 for p in answer_videos]
        assert positions.generation in item["target_positions"].tolist()
        assert (positions.base is None) == (ids[prompt_length:].count(token_ids.base_null) == 1)
        assert item["media_embeds"].shape == (ids[:prompt_length].count(token_ids.video), DIM)
        torch.testing.assert_close(item["target_embeds"].norm(dim=-1), torch.full((len(answer_videos),), 20.0))
    # Deterministic in (seed, epoch, index), different across epochs.
    again = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0)
    assert all(torch.equal(dataset[(1, i)]["input_ids"], again[(1, i)]["input_ids"]) for i in range(len(dataset)))
    assert any(
        not torch.equal(dataset[(1, i)]["input_ids"], dataset[(2, i)]["input_ids"]) for i in range(len(dataset))
    )


def _only_answer_inputs_differ(clean: dict, noisy: dict) -> tuple[list[int], list[int], int]:
    """Labels, media, targets and the prompt of a noisy item are the clean item's: only answer words of the input
    may move. Returns both ``input_ids`` lists and the prompt length."""
    for key in ("labels", "media_embeds", "target_positions", "target_embeds"):
        assert torch.equal(clean[key], noisy[key]), key
    ids, noisy_ids, n = clean["input_ids"].tolist(), noisy["input_ids"].tolist(), clean["prompt_length"]
    assert noisy_ids[:n] == ids[:n]
    return ids, noisy_ids, n


def test_llm_dataset_answer_noise_changes_answer_words_of_the_input_only(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    clean = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0)
    noisy = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, answer_noise_prob=0.5)
    protected = set(token_ids.special_token_ids) | {token_ids.eos, token_ids.bos, token_ids.pad}
    changed = 0
    for index in range(len(clean)):
        a, b = clean[(3, index)], noisy[(3, index)]
        ids, noisy_ids, n = _only_answer_inputs_differ(a, b)
        answer_words = {t for t in ids[n:] if t not in protected}
        for position, (old, new) in enumerate(zip(ids, noisy_ids)):
            if old != new:
                changed += 1
                assert position >= n and old not in protected and new in answer_words
                assert position not in a["target_positions"].tolist()
        # Same (seed, epoch, index), same noise.
        assert torch.equal(b["input_ids"], noisy[(3, index)]["input_ids"])
    assert changed > 0
    # Every answer word replaced by a word of the answer: the noise is real at probability 1.
    full = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, answer_noise_prob=1.0)
    assert any(not torch.equal(full[(0, i)]["input_ids"], clean[(0, i)]["input_ids"]) for i in range(len(clean)))
    with pytest.raises(ValueError, match=r"`answer_noise_prob` must lie in \[0, 1\], got 1.5"):
        MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, answer_noise_prob=1.5)


def test_llm_dataset_context_noise_swaps_words_for_words_that_fit_their_place(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    clean = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0)
    noisy = MMInstLLMDataset(
        examples, _features(source_data), tokenizer, token_ids, seed=0, answer_noise_prob=0.5,
        answer_noise_source="context",
    )  # fmt: skip
    # The followers of a word, from the records' answers as the LLM reads them.
    followers = {}
    for example in examples:
        ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        for before, word in zip(ids, ids[1:]):
            followers.setdefault(before, set()).add(word)
    changed = 0
    for index in range(len(clean)):
        a, b = clean[(3, index)], noisy[(3, index)]
        ids, noisy_ids, n = _only_answer_inputs_differ(a, b)
        for position, (old, new) in enumerate(zip(ids, noisy_ids)):
            if old != new:
                # A word after a context the answers never show (e.g. <im_gen_start>) falls back to the answer's words.
                changed += 1
                assert position >= n and new in followers.get(ids[position - 1], ids[n:])
        assert torch.equal(b["input_ids"], noisy[(3, index)]["input_ids"])  # deterministic
    assert changed > 0
    with pytest.raises(ValueError, match=r"`answer_noise_source` must be one of \('answer', 'context'\), got 'x'"):
        MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, answer_noise_source="x")


SWAP_GROUPS = (("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "star"))


def test_llm_dataset_answer_swap_replaces_group_words_within_their_group(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    features = _features(source_data)
    clean = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0)
    swapped = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, answer_swap_words=SWAP_GROUPS)
    group_of = {}
    for group in SWAP_GROUPS:
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in group]
        group_of.update({i: set(ids) for i in ids})
    changed = group_words = 0
    for index in range(len(clean)):
        a, b = clean[(2, index)], swapped[(2, index)]
        ids, swapped_ids, n = _only_answer_inputs_differ(a, b)
        for position, (old, new) in enumerate(zip(ids, swapped_ids)):
            if position >= n and old in group_of:
                group_words += 1
                assert new in group_of[old]  # a word of the same group (itself included)
                changed += old != new
            else:
                assert old == new, position  # nothing outside the groups moves
        assert torch.equal(b["input_ids"], swapped[(2, index)]["input_ids"])  # deterministic
    # Uniform over four words: about three in four group words change.
    assert group_words > 20 and 0.5 < changed / group_words < 0.95
    # At probability 0 nothing changes; the swap draws from its own generator, so answer noise is unaffected by it.
    off = MMInstLLMDataset(
        examples, features, tokenizer, token_ids, seed=0, answer_swap_words=SWAP_GROUPS, answer_swap_prob=0.0
    )
    noisy = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, answer_noise_prob=0.5)
    both = MMInstLLMDataset(
        examples, features, tokenizer, token_ids, seed=0, answer_noise_prob=0.5, answer_swap_words=SWAP_GROUPS
    )
    for index in range(len(clean)):
        assert torch.equal(off[(2, index)]["input_ids"], clean[(2, index)]["input_ids"])
        ids, noisy_ids, both_ids = (
            clean[(2, index)]["input_ids"].tolist(), noisy[(2, index)]["input_ids"], both[(2, index)]["input_ids"]
        )
        keep = [p for p, t in enumerate(ids) if t not in group_of]
        assert torch.equal(noisy_ids[keep], both_ids[keep])


@pytest.mark.parametrize(
    "groups, prob, message",
    [
        ("red,green", 1.0, "`answer_swap_words` must be a sequence of word groups"),
        (["red", "green"], 1.0, "`answer_swap_words` must be a sequence of word groups"),
        ([["red"]], 1.0, r"`answer_swap_words`: each group needs at least two words, got \['red'\]"),
        ([["red", "zebra"]], 1.0, r"`answer_swap_words`: 'zebra' must be one plain token of the LLM's tokenizer"),
        ([["red", "<video>"]], 1.0, r"`answer_swap_words`: '<video>' must be one plain token"),
        ([["red", "blue"], ["blue", "star"]], 1.0, r"`answer_swap_words`: 'blue' is listed twice"),
        ([["red", "blue"]], -0.1, r"`answer_swap_prob` must lie in \[0, 1\], got -0.1"),
    ],
)
def test_llm_dataset_answer_swap_errors(source_data, examples, tokenizer, groups, prob, message):
    tokenizer, token_ids = tokenizer
    with pytest.raises(ValueError, match=message):
        MMInstLLMDataset(
            examples, _features(source_data), tokenizer, token_ids, seed=0, answer_swap_words=groups,
            answer_swap_prob=prob,
        )  # fmt: skip


RELABEL_GROUPS = SWAP_GROUPS  # every word one token of the tiny tokenizer; a group may leave classes out
RELABEL = dict(attribute_tokens=len(ATTRIBUTE_CLASSES), attribute_class_names=ATTRIBUTE_CLASS_NAMES)


def test_llm_dataset_relabel_renames_words_and_attribute_classes_alike(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    features = _features(source_data)
    clean = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, **RELABEL)
    off = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, relabel_words=RELABEL_GROUPS, **RELABEL)
    always = MMInstLLMDataset(
        examples, features, tokenizer, token_ids, seed=0, relabel_words=RELABEL_GROUPS, relabel_prob=1.0, **RELABEL
    )
    half = MMInstLLMDataset(
        examples, features, tokenizer, token_ids, seed=0, relabel_words=RELABEL_GROUPS, relabel_prob=0.5, **RELABEL
    )
    group_of = {}
    for group in RELABEL_GROUPS:
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in group]
        group_of.update({i: (group, ids) for i in ids})
    starts = np.cumsum([0, *ATTRIBUTE_CLASSES])
    identity = torch.arange(sum(ATTRIBUTE_CLASSES))
    renamed_words = relabelled = 0
    for index in range(len(clean)):
        a, o, r = clean[(1, index)], off[(1, index)], always[(1, index)]
        num_media = a["media_embeds"].shape[0]
        # Probability 0 leaves the sample as it was: identity classes, full embedding weights, pooled vectors kept.
        for key in ("input_ids", "labels", "media_embeds", "target_embeds"):
            assert torch.equal(a[key], o[key]) and torch.equal(a[key], r[key] if key.endswith("embeds") else a[key])
        assert a["class_permutation"] is None and not o["relabelled"]
        assert torch.equal(o["class_permutation"], identity.expand(num_media, -1))
        assert torch.equal(o["target_weights"], torch.ones(len(a["target_embeds"])))
        # Probability 1: one renaming of each group applied at every position of the conversation, labels alike.
        assert r["relabelled"] and torch.equal(r["target_weights"], torch.zeros(len(a["target_embeds"])))
        mapping = {}
        for before, after in [*zip(a["input_ids"].tolist(), r["input_ids"].tolist()), *zip(
            a["labels"].tolist(), r["labels"].tolist()
        )]:
            if before in group_of:
                assert after in group_of[before][1] and mapping.setdefault(before, after) == after
            else:
                assert before == after
        assert len(set(mapping.values())) == len(mapping)  # a renaming, never two words to one
        renamed_words += sum(before != after for before, after in mapping.items())
        # The media read the new names: the class of a word's new name holds what the word's class held.
        permutation = r["class_permutation"]
        assert permutation.shape == (num_media, sum(ATTRIBUTE_CLASSES)) and permutation.dtype == torch.long
        for before, after in mapping.items():
            group, ids = group_of[before]
            old, new = group[ids.index(before)], group[ids.index(after)]
            for field, names in enumerate(ATTRIBUTE_CLASS_NAMES):
                if old in names:
                    assert (permutation[:, starts[field] + names.index(new)] == starts[field] + names.index(old)).all()
        assert torch.equal(r["input_ids"], always[(1, index)]["input_ids"])  # deterministic
        relabelled += half[(1, index)]["relabelled"] + half[(2, index)]["relabelled"]
    assert renamed_words > 10
    assert 0.25 < relabelled / (2 * len(clean)) < 0.75
    assert collate_llm_batch([clean[(1, 0)], clean[(1, 1)]], token_ids.pad)["class_permutation"] is None
    mixed = collate_llm_batch([clean[(1, 0)], always[(1, 1)]], pad_token_id=token_ids.pad)["class_permutation"]
    assert torch.equal(mixed[: clean[(1, 0)]["media_embeds"].shape[0]], identity.expand(len(mixed) - len(
        always[(1, 1)]["class_permutation"]), -1))
    batch = collate_llm_batch([always[(1, 0)], off[(1, 1)]], pad_token_id=token_ids.pad)
    counts = [always[(1, 0)]["media_embeds"].shape[0], off[(1, 1)]["media_embeds"].shape[0]]
    assert batch["relabelled_media"].tolist() == [True] * counts[0] + [False] * counts[1]
    assert torch.equal(batch["class_permutation"], torch.cat([always[(1, 0)]["class_permutation"], off[(1, 1)][
        "class_permutation"]]))
    assert batch["target_weights"].tolist() == [0.0] * len(always[(1, 0)]["target_embeds"]) + [1.0] * len(
        off[(1, 1)]["target_embeds"]
    )


@pytest.mark.parametrize(
    "groups, kwargs, message",
    [
        (RELABEL_GROUPS, dict(attribute_class_names=ATTRIBUTE_CLASS_NAMES), r"it needs `attribute_tokens` > 0"),
        (RELABEL_GROUPS, dict(attribute_tokens=7), r"`relabel_words` needs `attribute_class_names`"),
        (RELABEL_GROUPS, dict(RELABEL, attribute_tokens=6), r"`attribute_class_names` names 7 fields but the media"),
        ([["red", "left"]], RELABEL, r"`relabel_words`: 'left' must name a class in the same attribute fields as"),
        ([["red", "circle"]], RELABEL, r"'circle' must name a class in the same attribute fields as 'red'"),
        ([["red", "zebra"]], RELABEL, r"`relabel_words`: 'zebra' must be one plain token"),
        ([["red", "blue"], ["blue", "star"]], RELABEL, r"`relabel_words`: 'blue' is listed twice"),
        ([["red", "blue"]], dict(RELABEL, relabel_prob=1.5), r"`relabel_prob` must lie in \[0, 1\], got 1.5"),
    ],
)
def test_llm_dataset_relabel_errors(source_data, examples, tokenizer, groups, kwargs, message):
    tokenizer, token_ids = tokenizer
    with pytest.raises(ValueError, match=message):
        MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, relabel_words=groups, **kwargs)


def test_llm_dataset_reproduce_samples_ask_for_the_unchanged_base(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    features = _features(source_data)
    clean = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0)
    always = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, reproduce_prob=1.0)
    for index, example in enumerate(examples):
        item = always[(2, index)]
        ids, n = item["input_ids"].tolist(), item["prompt_length"]
        # The instruction is the base image alone; the answer the edit that keeps it, read out as BASE and GEN.
        assert ids[:n].count(token_ids.video) == 1
        answer = f"Sure. <base><video><im_gen_start><im_gen>{example.base}<video>"
        conversation = build_vicuna_prompt(VIDEO_TOKEN, answer, eos_token=tokenizer.eos_token)
        assert ids == [token_ids.bos] + tokenizer(conversation, add_special_tokens=False)["input_ids"]
        base = rescale_to_norm(features.load(example.base, "test"), 20.0)
        torch.testing.assert_close(item["media_embeds"], features.load(example.base, "test")[None])
        torch.testing.assert_close(item["target_embeds"], torch.stack([base, base]))
        positions = find_embedding_positions(ids, token_ids, start=n)
        assert item["target_positions"].tolist() == [positions.base, positions.generation]
    # A share: some samples change, the others are exactly those of a run without it.
    some = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, reproduce_prob=0.5)
    changed = [not torch.equal(some[(2, i)]["input_ids"], clean[(2, i)]["input_ids"]) for i in range(len(examples))]
    assert any(changed) and not all(changed)
    for i, was_changed in enumerate(changed):
        expected = always[(2, i)] if was_changed else clean[(2, i)]
        assert torch.equal(some[(2, i)]["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match=r"`reproduce_prob` must lie in \[0, 1\], got -0.1"):
        MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, reproduce_prob=-0.1)


def test_llm_dataset_describing_the_base_keeps_the_read_outs_and_parses_back(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    features = _features(source_data)
    for reproduce_prob in (0.0, 1.0):
        plain = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, reproduce_prob=reproduce_prob)
        described = MMInstLLMDataset(
            examples, features, tokenizer, token_ids, seed=0, reproduce_prob=reproduce_prob, describe_base=True
        )
        longer = 0
        for index, example in enumerate(examples):
            a, b = plain[(1, index)], described[(1, index)]
            n = b["prompt_length"]
            assert n == a["prompt_length"] and torch.equal(b["input_ids"][:n], a["input_ids"][:n])
            assert torch.equal(b["media_embeds"], a["media_embeds"])
            assert torch.equal(b["target_embeds"], a["target_embeds"])
            ids = b["input_ids"].tolist()
            # Training reads the embeddings where inference will: the rule, not a shifted copy of the plain item.
            positions = find_embedding_positions(ids, token_ids, start=n)
            expected = [p for p in (positions.base, positions.generation) if p is not None]
            assert b["target_positions"].tolist()[: len(expected)] == expected
            assert len(b["target_positions"]) == len(a["target_positions"])
            answer = parse_answer(tokenizer.decode(ids[n:], skip_special_tokens=False))

            def as_decoded(caption: str) -> str:  # the tiny tokenizer has no word for some caption words
                return parse_answer(tokenizer.decode(tokenizer(caption, add_special_tokens=False).input_ids)).caption

            assert answer.caption == as_decoded(example.base if reproduce_prob else example.result)
            if answer.base_null:
                assert answer.base_caption is None and torch.equal(b["input_ids"], a["input_ids"])
            else:
                assert answer.base_caption == as_decoded(example.base)
                longer += 1
        assert longer > 0


PATCH_DIM = 6
NUM_PATCHES = 4
PATCH_DIM = 6
NUM_PATCHES = 4


def _add_patches(root: str, seed: int = 1, width: int = PATCH_DIM) -> None:
    """Adds ``clip_patches`` (random float16 tokens, as prepare_data.py writes them) to the train images' files."""
    rng = np.random.default_rng(seed)
    for entry in load_media_map(os.path.join(root, "train", "media.json")).values():
        if entry.kind == "image":
            path = os.path.join(root, entry.fpath)
            with np.load(path) as arrays:
                clip = arrays["clip"]
            np.savez(path, clip=clip, clip_patches=rng.standard_normal((NUM_PATCHES, width)).astype(np.float16))


def _patch_features(root: str, width: int = PATCH_DIM) -> FeatureStore:
    return FeatureStore.from_file(os.path.join(root, "train", "media.json"), root, DIM, patch_embed_dim=width)


def test_feature_store_loads_patches_of_images_only(data):
    _add_patches(data)
    plain, store = _features(data), _patch_features(data)
    kinds = set()
    for key, entry in store.media_map.items():
        kinds.add(entry.kind)
        assert plain.load_patches(key, "test") is None  # a store without patch_embed_dim reads none
        patches = store.load_patches(key, "test")
        if entry.kind == "image":
            with np.load(store.path(entry)) as arrays:
                expected = torch.from_numpy(arrays["clip_patches"].astype(np.float32))
            assert patches.dtype == torch.float32 and torch.equal(patches, expected)
        else:
            assert patches is None
    assert kinds == {"image", "audio"}
    # Copies: changing a result leaves the cache alone.
    key = next(k for k, e in store.media_map.items() if e.kind == "image")
    store.load_patches(key, "test").zero_()
    assert store.load_patches(key, "test").abs().sum() > 0


def test_feature_store_patch_errors_name_the_file_and_the_fix(data):
    key, entry = next((k, e) for k, e in _features(data).media_map.items() if e.kind == "image")
    with pytest.raises(MMInstDataError, match=r"has no array 'clip_patches'.*prepare_data\.py with --image_patches") as error:
        _patch_features(data).load_patches(key, "ctx")
    assert entry.fpath in str(error.value)
    _add_patches(data)
    with pytest.raises(MMInstDataError, match=r"'clip_patches' must have shape \(num_patches, 7\) \(patch_embed_dim\), got \(4, 6\)"):
        _patch_features(data, width=7).load_patches(key, "ctx")


def test_llm_dataset_gives_every_medium_its_attribute_tokens(data, tokenizer):
    tokenizer, token_ids = tokenizer
    examples = load_instructions(os.path.join(data, "train", "instruction.json"), _features(data))
    plain = MMInstLLMDataset(examples, _features(data), tokenizer, token_ids, seed=0)
    fields = MMInstLLMDataset(examples, _features(data), tokenizer, token_ids, seed=0, attribute_tokens=2)
    extra_tokens = 0
    for index, example in enumerate(examples):
        a, b = plain[(1, index)], fields[(1, index)]
        # The same draw of the official rules; each input medium's <video> becomes 1 + 2 of them.
        sample = build_llm_sample(example, np.random.default_rng([0, 1, index]))
        instruction = expand_media_tokens(sample.instruction, [3] * len(sample.input_captions))
        conversation = build_vicuna_prompt(instruction, sample.answer, eos_token=tokenizer.eos_token)
        assert b["input_ids"].tolist() == [token_ids.bos] + tokenizer(conversation, add_special_tokens=False)["input_ids"]
        assert torch.equal(b["media_embeds"], a["media_embeds"])
        shift = b["prompt_length"] - a["prompt_length"]
        assert shift == 2 * len(sample.input_captions)
        assert b["labels"][b["prompt_length"] :].tolist() == a["labels"][a["prompt_length"] :].tolist()
        assert b["target_positions"].tolist() == (a["target_positions"] + shift).tolist()
        extra_tokens += shift
    assert extra_tokens > 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`attribute_tokens` must be a non-negative integer"):
            MMInstLLMDataset(examples, _features(data), tokenizer, token_ids, seed=0, attribute_tokens=bad)


def test_llm_dataset_gives_each_image_its_patches_and_tokens(data, tokenizer):
    tokenizer, token_ids = tokenizer
    _add_patches(data)
    examples = load_instructions(os.path.join(data, "train", "instruction.json"), _features(data))
    features = _patch_features(data)
    plain = MMInstLLMDataset(examples, _features(data), tokenizer, token_ids, seed=0)
    patched = MMInstLLMDataset(examples, features, tokenizer, token_ids, seed=0, image_patch_tokens=3)
    extra_tokens = 0
    for index, example in enumerate(examples):
        a, b = plain[(1, index)], patched[(1, index)]
        # The same draw of the official rules; each input image's <video> becomes 1 + 3 of them.
        sample = build_llm_sample(example, np.random.default_rng([0, 1, index]))
        patches = [features.load_patches(c, "test") for c in sample.input_captions]
        assert a["image_patches"] == [None] * len(patches)
        assert len(b["image_patches"]) == len(patches)
        for got, expected in zip(b["image_patches"], patches):
            assert (got is None and expected is None) or torch.equal(got, expected)
        instruction = expand_media_tokens(sample.instruction, [1 if p is None else 4 for p in patches])
        conversation = build_vicuna_prompt(instruction, sample.answer, eos_token=tokenizer.eos_token)
        assert b["input_ids"].tolist() == [token_ids.bos] + tokenizer(conversation, add_special_tokens=False)["input_ids"]
        assert torch.equal(b["media_embeds"], a["media_embeds"])
        shift = b["prompt_length"] - a["prompt_length"]
        assert shift == 3 * sum(p is not None for p in patches)
        assert b["labels"][b["prompt_length"] :].tolist() == a["labels"][a["prompt_length"] :].tolist()
        assert b["target_positions"].tolist() == (a["target_positions"] + shift).tolist()
        assert torch.equal(b["target_embeds"], a["target_embeds"])
        extra_tokens += shift
    assert extra_tokens > 0
    items = [patched[(1, 0)], patched[(1, 1)]]
    batch = collate_llm_batch(items, token_ids.pad)
    for row, item in zip(batch["image_patches"], items):  # per row and medium, as inject_media_embeds takes them
        assert [p is None for p in row] == [p is None for p in item["image_patches"]]
        assert all(p is None or torch.equal(p, q) for p, q in zip(row, item["image_patches"]))
    with pytest.raises(ValueError, match="`image_patch_tokens` 3 needs a FeatureStore that reads patch tokens"):
        MMInstLLMDataset(examples, _features(data), tokenizer, token_ids, seed=0, image_patch_tokens=3)


def test_llm_dataset_rejects_too_long_conversations(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    dataset = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0, max_length=20)
    with pytest.raises(MMInstDataError, match=r"instruction\.json:\d+ \(entry 0.*tokens exceed --max_length 20"):
        dataset[0]


def test_collate_pads_right_and_flattens_targets(source_data, examples, tokenizer):
    tokenizer, token_ids = tokenizer
    dataset = MMInstLLMDataset(examples, _features(source_data), tokenizer, token_ids, seed=0)
    items = [dataset[(0, 0)], dataset[(0, 5)]]
    batch = collate_llm_batch(items, token_ids.pad)
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"]) and batch["attention_mask"][row].sum() == n
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all() and batch["input_ids"][row, n:].eq(token_ids.pad).all()
    assert batch["target_rows"].tolist() == [r for r, item in enumerate(items) for _ in item["target_positions"]]
    assert batch["target_embeds"].shape == (len(batch["target_rows"]), DIM)


# ------------------------------------------------------------------------------------------------ prior pairs


def test_prior_pairs_file_and_corruption(source_data, tmp_path):
    features = _features(source_data)
    images = image_entries(features)
    sound = next(k for k, e in features.media_map.items() if e.kind == "audio")
    pairs_path = tmp_path / "pairs.json"
    pairs_path.write_text(json.dumps([{"source": sound, "source_modality": "audio", "target": images[0].caption_key}]))
    pairs = read_prior_pairs(str(pairs_path)) + default_prior_pairs(features, corrupted_images=True)
    assert pairs[0].modality == Modality.AUDIO and len(pairs) == 1 + len(images)
    schedule = torch.linspace(0.999, 0.001, 1000)
    dataset = PriorPairsDataset(pairs, features, None, seed=0, alphas_cumprod=schedule)
    item = dataset[(0, 0)]
    torch.testing.assert_close(item["condition"], features.load(sound, "t"))
    torch.testing.assert_close(item["target"].norm(), torch.tensor(20.0))
    corrupted = dataset[(0, 1)]
    assert corrupted["modality"] == Modality.VIDEO and not torch.equal(corrupted["condition"], corrupted["target"])
    assert torch.equal(corrupted["condition"], dataset[(0, 1)]["condition"])  # seeded by (seed, epoch, index)
    assert not torch.equal(corrupted["condition"], dataset[(1, 1)]["condition"])


def test_prior_pairs_errors_are_named(source_data, tmp_path):
    pairs_path = tmp_path / "pairs.json"
    pairs_path.write_text('[\n {"source": "x", "source_modality": "smell", "target": "y"}\n]')
    with pytest.raises(MMInstDataError, match=r"pairs\.json:2 \(entry 0, field `source_modality`\)"):
        read_prior_pairs(str(pairs_path))
    pairs_path.write_text('[{"source": "a unicorn", "source_modality": "audio", "target": "a unicorn"}]')
    with pytest.raises(MMInstDataError, match=r"pairs\.json:1 \(entry 0\): caption 'a unicorn' is missing"):
        PriorPairsDataset(read_prior_pairs(str(pairs_path)), _features(source_data), None, seed=0)
    with pytest.raises(ValueError, match="need `text_features`"):
        default_prior_pairs(_features(source_data), text_to_image=True)


# ------------------------------------------------------------------------------------------------ decoder images


def test_image_embedding_dataset(source_data):
    features = _features(source_data)
    dataset = ImageEmbeddingDataset(image_entries(features), features, resolution=16, embedding_norm=20.0)
    item = dataset[(3, 0)]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    torch.testing.assert_close(item["image_embeds"].norm(), torch.tensor(20.0))
    assert item["caption"] == dataset.entries[0].caption_key
