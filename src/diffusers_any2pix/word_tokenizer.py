"""A word-level tokenizer for small LLMs trained from scratch on a closed vocabulary (ShapesWorld, tests).

Built with the `tokenizers` library: words and punctuation marks are separate tokens, and a word keeps the space that
preceded it (``"▁red"`` vs ``"red"``, as SentencePiece does), so decoding gives back the exact text — the pipeline
reads captions out of the decoded answer. Words outside the vocabulary become ``<unk>``.
"""

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Metaspace first marks each word's leading space with "▁"; Punctuation then splits marks off ("▁left," → "▁left", ",").
    return pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Punctuation()])


def build_word_level_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str] = (),
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Trains a word-level tokenizer on ``texts``.

    The vocabulary is ``<unk>``, ``<s>``, ``</s>``, then ``special_tokens`` (kept whole, never split), then every word and
    punctuation mark seen at least ``min_frequency`` times, most frequent first (ties alphabetically), so the same texts
    always give the same ids.

    Args:
        texts (iterable of `str`): the training corpus.
        special_tokens (sequence of `str`, *optional*): extra tokens such as ``"<video>"``.
        min_frequency (`int`, *optional*, defaults to 1): rarer words map to ``<unk>``.
        model_max_length (`int`, *optional*, defaults to 512): recorded in the tokenizer.

    Returns:
        `PreTrainedTokenizerFast` with ``unk``, ``bos`` and ``eos`` set; ``decode`` inverts ``encode`` for in-vocabulary
        text.
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be an iterable of strings, not a single string.")
    if min_frequency < 1:
        raise ValueError(f"`min_frequency` must be at least 1, got {min_frequency}.")
    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN] + [t for t in special_tokens if t not in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)]
    backend = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency, show_progress=False)
    backend.train_from_iterator((str(text) for text in texts), trainer=trainer)
    if backend.get_vocab_size() == len(specials):
        raise ValueError("`texts` gave no words; cannot build a vocabulary.")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    if special_tokens:
        # Registered as special so they are never split and `skip_special_tokens` drops them.
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer
