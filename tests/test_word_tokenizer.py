"""The word-level tokenizer of LLMs trained from scratch: exact round trip, determinism, special tokens, unknown words,
and the corpus `conversation_texts` builds from MM-Inst records."""

import json

import numpy as np
import pytest

from diffusers_any2pix.data import conversation_texts
from diffusers_any2pix.multimodal_llm import MULTIMODAL_SPECIAL_TOKENS, add_multimodal_tokens
from diffusers_any2pix.word_tokenizer import build_word_level_tokenizer


CORPUS = [
    "USER: add [a red star] to <video> ASSISTANT: Sure. <base><video><im_gen>[a red star on the left, on a plain background]",
    "remove the blue circle, then make it green",
]


def test_decode_inverts_encode_exactly():
    tokenizer = build_word_level_tokenizer(CORPUS, special_tokens=["<video>"])
    for text in CORPUS + ["Sure. <video>[a red star]", "the  star"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        # Repeated spaces collapse to one piece each; everything else comes back verbatim.
        assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a red star,", add_special_tokens=False).input_ids)
    assert pieces == ["▁a", "▁red", "▁star", ","]


def test_same_corpus_same_ids_and_frequency_order():
    first = build_word_level_tokenizer(CORPUS)
    second = build_word_level_tokenizer(list(CORPUS))
    assert first.get_vocab() == second.get_vocab()
    vocab = first.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert vocab["▁the"] < vocab["▁plain"]  # "the" is more frequent
    assert (first.unk_token, first.bos_token, first.eos_token) == ("<unk>", "<s>", "</s>")


def test_unknown_words_and_min_frequency():
    tokenizer = build_word_level_tokenizer(CORPUS, min_frequency=2)
    ids = tokenizer("a purple unicorn", add_special_tokens=False).input_ids
    assert ids[1:] == [tokenizer.unk_token_id] * 2
    assert "▁plain" not in tokenizer.get_vocab()  # seen once


def test_special_tokens_are_never_split_and_multimodal_tokens_can_be_added():
    tokenizer = build_word_level_tokenizer(CORPUS, special_tokens=["<video>"])
    ids = tokenizer("x<video>y", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[1] == "<video>"
    size = len(tokenizer)
    token_ids = add_multimodal_tokens(tokenizer)
    assert len(tokenizer) == size + len(MULTIMODAL_SPECIAL_TOKENS) - 1  # <video> was already there
    assert tokenizer.convert_tokens_to_ids("<im_gen>") == token_ids.im_gen
    assert tokenizer.decode(tokenizer("<base>[a red star]").input_ids, skip_special_tokens=True) == "[a red star]"


@pytest.mark.parametrize(
    "texts, min_frequency, error, match",
    [
        ("a single string", 1, TypeError, "iterable of strings"),
        ([""], 1, ValueError, "no words"),
        (CORPUS, 0, ValueError, "min_frequency"),
    ],
)
def test_bad_arguments(texts, min_frequency, error, match):
    with pytest.raises(error, match=match):
        build_word_level_tokenizer(texts, min_frequency=min_frequency)


def test_conversation_texts_cover_every_sampled_form(tmp_path):
    from diffusers_any2pix.data import FeatureStore, build_llm_sample, load_instructions
    from diffusers_any2pix.multimodal_llm import build_vicuna_prompt
    from diffusers_any2pix.shapes import generate_dataset

    data = tmp_path / "data"
    generate_dataset(str(data), 30, seed=1, image_size=32, sound_duration=0.5, progress=False)
    with open(data / "train" / "media.json") as f:
        for entry in json.load(f).values():  # placeholder vectors: only the texts matter here
            (data / entry["fpath"]).parent.mkdir(parents=True, exist_ok=True)
            np.savez(data / entry["fpath"], clip=np.ones((1, 8), dtype=np.float32))
    features = FeatureStore.from_file(str(data / "train" / "media.json"), str(data))
    examples = load_instructions(str(data / "train" / "instruction.json"), features)
    tokenizer = build_word_level_tokenizer(conversation_texts(examples))
    add_multimodal_tokens(tokenizer)
    # Whatever the sampling rules draw (base dropped, media as text or as <video>), no word is unknown.
    for index, example in enumerate(examples):
        for draw in range(4):
            sample = build_llm_sample(example, np.random.default_rng([draw, index]), 0.5, 0.5)
            text = build_vicuna_prompt(sample.instruction, sample.answer)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert tokenizer.unk_token_id not in ids, text
            assert tokenizer.decode(ids) == text
