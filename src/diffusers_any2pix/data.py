"""Training data in the MM-Inst format (shared/REFERENCE.md §5): reading, validation and datasets.

The format, as the official release uses it:

- ``instruction.json``: a list of ``{"task": "any2any", "base": "[base caption]", "result": "...",
  "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}], "added"?: [[name,
  "[caption]"], ...]}``. Every medium appears in the texts as its ``[caption]``. JSON Lines files (one record a line)
  are read too.
- ``media.json``: ``{caption key: {"fpath": "rel/path.npz", "key": "clip"}}`` with keys lower-cased, stripped and
  without dots (`media_key`); ``fpath`` is relative to the data root (the official ``image_folder``). ShapesWorld maps
  also carry ``"media_path"``, the medium the feature was computed from.
- each ``.npz`` holds one ImageBind vector, shape ``(1, D)``, under the entry's key.

Everything here fails early and by name: a malformed record, a caption missing from the media map, a feature file
that cannot be read or an instruction whose placeholders do not match its media raises `MMInstDataError` naming the
file, the line, the entry and the field (the official loader prints and silently substitutes zeros).

Datasets are indexed by ``(epoch, index)`` pairs (see `EpochShuffleSampler` in `training_utils`): every random
choice of a sample is drawn from a generator seeded with ``(seed, epoch, index)``, so data are reproducible across
runs, processes, dataloader workers and resumption from a checkpoint.
"""

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from .instruction import parse_instruction
from .models.mm_adapter import rescale_to_norm
from .models.prior import Modality
from .multimodal_llm import (
    BASE_NULL_TOKEN,
    BASE_TOKEN,
    IM_GEN_START_TOKEN,
    IM_GEN_TOKEN,
    VIDEO_TOKEN,
    MultimodalTokenIds,
    build_vicuna_prompt,
    expand_media_tokens,
    find_embedding_positions,
)
from .shapes.generate import media_key

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100
ANSWER_NOISE_SOURCES = ("answer", "context")
CAPTION_PATTERN = re.compile(r"\[[^\]]+\]")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
MODALITY_NAMES = {"image": Modality.IMAGE, "audio": Modality.AUDIO, "text": Modality.TEXT, "video": Modality.VIDEO}

# Roles of the `<video>` tokens of an answer, in the order the official loader lists its targets.
ROLE_BASE = "base"
ROLE_GENERATION = "generation"
ROLE_ADDITION = "addition"


class MMInstDataError(ValueError):
    """Malformed training data; the message names the file, line, entry and field."""


class MissingFeatureError(MMInstDataError):
    """A media-map entry whose feature file does not exist (yet)."""


# ------------------------------------------------------------------------------------------------ JSON with lines


@dataclass(frozen=True)
class JsonEntry:
    """One top-level element of a JSON file, with where it stands.

    Args:
        path (`str`): the file.
        line (`int`): 1-based line where the element starts.
        key (`int` or `str`): list index, or key of a top-level object.
        value (`Any`): the decoded element.
    """

    path: str
    line: int
    key: int | str
    value: Any

    def where(self, field_name: str | None = None) -> str:
        """``"file:line (entry K, field `F`)"`` for error messages."""
        entry = f"entry {self.key}" if isinstance(self.key, int) else f"entry {self.key!r}"
        record_id = self.value.get("id") if isinstance(self.value, dict) else None
        if isinstance(record_id, str):
            entry += f", id {record_id!r}"
        suffix = f", field `{field_name}`" if field_name else ""
        return f"{self.path}:{self.line} ({entry}{suffix})"


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_json_entries(path: str | os.PathLike) -> list[JsonEntry]:
    """Reads the top-level elements of a JSON list or object, or of a JSON Lines file, with their line numbers.

    Args:
        path (`str` or `os.PathLike`): a ``.json`` file holding a list or an object, or a ``.jsonl`` file.

    Returns:
        `list[JsonEntry]`: in file order.

    Raises:
        `MMInstDataError`: the file is missing or is not valid JSON (the message gives line and column).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise MMInstDataError(f"Cannot read {path}: {error.strerror or error}.") from error
    decoder = json.JSONDecoder()

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise MMInstDataError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}.") from error

    if path.endswith(".jsonl"):
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise MMInstDataError(f"{path}:{number}:{error.colno}: invalid JSON: {error.msg}.") from error
                entries.append(JsonEntry(path, number, len(entries), value))
        return entries

    pos = _skip_whitespace(text, 0)
    if pos == len(text) or text[pos] not in "[{":
        raise MMInstDataError(f"{path}: expected a JSON list or object at the top level.")
    is_list, closing = text[pos] == "[", "]" if text[pos] == "[" else "}"
    pos += 1
    entries, line, counted = [], 1, 0
    while True:
        pos = _skip_whitespace(text, pos)
        if pos < len(text) and text[pos] == closing:
            break
        if entries:
            if pos >= len(text) or text[pos] != ",":
                decode(pos)  # raises with the position of the syntax error
                raise MMInstDataError(f"{path}: expected ',' or '{closing}' at offset {pos}.")
            pos = _skip_whitespace(text, pos + 1)
        line += text.count("\n", counted, pos)
        counted = pos
        if is_list:
            key = len(entries)
        else:
            key, pos = decode(pos)
            if not isinstance(key, str):
                raise MMInstDataError(f"{path}:{line}: expected a string key.")
            pos = _skip_whitespace(text, pos)
            if pos >= len(text) or text[pos] != ":":
                raise MMInstDataError(f"{path}:{line}: expected ':' after key {key!r}.")
            pos = _skip_whitespace(text, pos + 1)
        value, pos = decode(pos)
        entries.append(JsonEntry(path, line, key, value))
    if text[pos + 1 :].strip():
        raise MMInstDataError(f"{path}: unexpected content after the top-level JSON value.")
    return entries


# ------------------------------------------------------------------------------------------------ media map


@dataclass(frozen=True)
class MediaEntry:
    """One entry of a media map.

    Args:
        caption_key (`str`): the map key (a cleaned caption, see `media_key`).
        fpath (`str`): the feature file, relative to the data root.
        npz_key (`str`): the array name inside the ``.npz`` (official: ``"clip"``).
        media_path (`str`, *optional*): the medium the feature was computed from, relative to the data root.
        source (`JsonEntry`): where the entry stands in the map file.
    """

    caption_key: str
    fpath: str
    npz_key: str
    media_path: str | None
    source: JsonEntry

    @property
    def media_file(self) -> str:
        """The medium's relative path: ``media_path``, else ``fpath`` without ``.npz`` (the official convention,
        features stored as ``<medium>.npz``)."""
        if self.media_path is not None:
            return self.media_path
        return self.fpath[: -len(".npz")] if self.fpath.endswith(".npz") else self.fpath

    @property
    def kind(self) -> str | None:
        """``"image"`` or ``"audio"`` from the medium's extension, ``None`` when unknown."""
        return media_kind(self.media_file)


def media_kind(path: str) -> str | None:
    """``"image"``/``"audio"`` from a file extension (case-insensitive), ``None`` for anything else."""
    extension = os.path.splitext(path)[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in AUDIO_EXTENSIONS:
        return "audio"
    return None


def load_media_map(path: str | os.PathLike) -> dict[str, MediaEntry]:
    """Reads and validates a media map (``{caption key: {"fpath", "key"[, "media_path"]}}``).

    Args:
        path (`str` or `os.PathLike`): the ``media.json``.

    Returns:
        `dict[str, MediaEntry]` keyed by caption key.

    Raises:
        `MMInstDataError`: not an object, or an entry without a string ``fpath``/``key``.
    """
    entries = read_json_entries(path)
    if entries and isinstance(entries[0].key, int):
        raise MMInstDataError(f"{os.fspath(path)}: a media map must be a JSON object (caption -> entry), got a list.")
    media = {}
    for entry in entries:
        value = entry.value
        if not isinstance(value, dict):
            raise MMInstDataError(f"{entry.where()}: expected an object with `fpath` and `key`, got {value!r}.")
        for name in ("fpath", "key"):
            if not isinstance(value.get(name), str) or not value[name]:
                raise MMInstDataError(f"{entry.where(name)}: missing or not a non-empty string.")
        media_path = value.get("media_path")
        if media_path is not None and not isinstance(media_path, str):
            raise MMInstDataError(f"{entry.where('media_path')}: must be a string.")
        media[entry.key] = MediaEntry(entry.key, value["fpath"], value["key"], media_path, entry)
    return media


def patch_array_name(npz_key: str) -> str:
    """Name of an image's patch tokens next to the array ``npz_key`` in a feature file (``clip`` → ``clip_patches``)."""
    return f"{npz_key}_patches"


class FeatureStore:
    """Loads ImageBind vectors by caption through a media map, with a cache and named errors.

    Args:
        media_map (`dict[str, MediaEntry]`): from `load_media_map`.
        data_root (`str`): the folder ``fpath`` is relative to (the official ``image_folder``).
        map_path (`str`): the media map file, for messages.
        embed_dim (`int`, *optional*): expected vector size; every file is checked against it.
        cache_size (`int`, defaults to 65536): vectors kept in memory (the first ones loaded).
        patch_embed_dim (`int`, *optional*):
            When given, `load_patches` reads an image's patch tokens, of this width, from the array ``<key>_patches`` of
            its feature file (written by ``prepare_data.py --image_patches``).
    """

    def __init__(
        self,
        media_map: dict[str, MediaEntry],
        data_root: str,
        map_path: str,
        embed_dim: int | None = None,
        cache_size: int = 65536,
        patch_embed_dim: int | None = None,
    ):
        self.media_map = media_map
        self.data_root = os.fspath(data_root)
        self.map_path = os.fspath(map_path)
        self.embed_dim = embed_dim
        self.cache_size = cache_size
        self.patch_embed_dim = patch_embed_dim
        # Plain dicts (not functools.lru_cache) so the store pickles into dataloader worker processes.
        self._cache: dict[str, torch.Tensor] = {}
        self._patch_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_file(
        cls, map_path: str, data_root: str, embed_dim: int | None = None, patch_embed_dim: int | None = None
    ) -> "FeatureStore":
        """A store over the media map at ``map_path``."""
        return cls(load_media_map(map_path), data_root, map_path, embed_dim, patch_embed_dim=patch_embed_dim)

    def __contains__(self, caption: str) -> bool:
        return media_key(caption) in self.media_map

    def entry(self, caption: str, context: str) -> MediaEntry:
        """The map entry of ``caption`` (brackets allowed); ``context`` says who asked, for the error message."""
        key = media_key(caption.strip("[]"))
        if key not in self.media_map:
            raise MMInstDataError(
                f"{context}: caption {caption!r} is missing from the media map {self.map_path} (looked up as {key!r})."
            )
        return self.media_map[key]

    def path(self, entry: MediaEntry) -> str:
        """Absolute path of an entry's feature file."""
        return os.path.join(self.data_root, entry.fpath)

    def check_exists(self, caption: str, context: str) -> None:
        """Raises when ``caption`` is not in the map or its feature file does not exist."""
        entry = self.entry(caption, context)
        if not os.path.isfile(self.path(entry)):
            raise MissingFeatureError(
                f"{context}: the feature file {self.path(entry)} of caption {caption!r} ({entry.source.where()}) does "
                "not exist; run training/prepare_data.py first."
            )

    def _cached(self, cache: dict[str, torch.Tensor], entry: MediaEntry, read) -> torch.Tensor:
        value = cache.get(entry.caption_key)
        if value is None:
            value = read(entry)
            if len(cache) < self.cache_size:
                cache[entry.caption_key] = value
        return value

    def load(self, caption: str, context: str) -> torch.Tensor:
        """The vector of ``caption`` as a float32 tensor of shape ``(D,)`` (a new tensor on every call)."""
        entry = self.entry(caption, context)
        vector = self._cached(self._cache, entry, self._read)
        if self.embed_dim is not None and vector.numel() != self.embed_dim:
            raise MMInstDataError(
                f"feature file {self.path(entry)} (media map {entry.source.where()}): the vector has {vector.numel()} "
                f"values but the model expects {self.embed_dim} (embed_dim)."
            )
        return vector.clone()

    def load_patches(self, caption: str, context: str) -> torch.Tensor | None:
        """The patch tokens of ``caption``'s image as float32 ``(num_patches, patch_embed_dim)`` (a new tensor), or
        ``None`` for other media and for a store without ``patch_embed_dim``."""
        entry = self.entry(caption, context)
        if self.patch_embed_dim is None or entry.kind != "image":
            return None
        return self._cached(self._patch_cache, entry, self._read_patches).to(torch.float32, copy=True)

    def _open_array(self, entry: MediaEntry, name: str, missing_hint: str = "") -> np.ndarray:
        path = self.path(entry)
        where = f"feature file {path} (media map {entry.source.where()})"
        try:
            with np.load(path, allow_pickle=False) as data:
                if name not in data.files:
                    raise MMInstDataError(f"{where} has no array {name!r} (it holds {data.files}){missing_hint}.")
                array = np.asarray(data[name])
        except MMInstDataError:
            raise
        except Exception as error:  # zip/npy parsing raises many types; all mean the file is unusable
            raise MMInstDataError(f"Cannot read {where}: {type(error).__name__}: {error}") from error
        if not np.issubdtype(array.dtype, np.floating):
            raise MMInstDataError(f"{where}: array {name!r} must hold floats, got {array.dtype} {array.shape}.")
        if not np.isfinite(array).all():
            raise MMInstDataError(f"{where}: array {name!r} holds non-finite values (NaN or inf).")
        return array

    def _read(self, entry: MediaEntry) -> torch.Tensor:
        array = self._open_array(entry, entry.npz_key)
        if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[0] != 1):
            raise MMInstDataError(
                f"feature file {self.path(entry)} (media map {entry.source.where()}): array {entry.npz_key!r} must be "
                f"a float vector of shape (1, D) or (D,), got {array.shape}."
            )
        return torch.from_numpy(array.reshape(-1).astype(np.float32))

    def _read_patches(self, entry: MediaEntry) -> torch.Tensor:
        name = patch_array_name(entry.npz_key)
        hint = "; run training/prepare_data.py with --image_patches"
        array = self._open_array(entry, name, hint)
        if array.ndim != 2 or array.shape[1] != self.patch_embed_dim:
            raise MMInstDataError(
                f"feature file {self.path(entry)} (media map {entry.source.where()}): array {name!r} must have shape "
                f"(num_patches, {self.patch_embed_dim}) (patch_embed_dim), got {array.shape}{hint}."
            )
        # Kept in the file's precision (prepare_data.py writes float16): half the memory of float32 in the cache.
        return torch.from_numpy(array.copy())


# ------------------------------------------------------------------------------------------------ instructions


@dataclass(frozen=True)
class MMInstExample:
    """A validated ``any2any`` instruction record.

    Args:
        source (`JsonEntry`): where the record stands.
        instruction (`str`): the human turn, media as ``[caption]``.
        answer (`str`): the gpt turn, e.g. ``"Sure. <base>[base]<im_gen>[result]"``.
        base (`str`): the base caption, with brackets.
        added (`dict[str, str]`): bracketed caption of each added medium → the name the answer lists it under.
    """

    source: JsonEntry
    instruction: str
    answer: str
    base: str
    added: dict[str, str] = field(default_factory=dict)

    @property
    def result(self) -> str:
        """The bracketed caption of the result (the answer's bracket after ``<im_gen>``)."""
        return CAPTION_PATTERN.findall(self.answer[self.answer.rindex(IM_GEN_TOKEN) :])[0]


def _string_field(entry: JsonEntry, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise MMInstDataError(f"{entry.where(name)}: missing or not a non-empty string.")
    return value


def _turns(entry: JsonEntry, record: dict) -> tuple[str, str]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise MMInstDataError(f"{entry.where('conversations')}: must be a list of {{from, value}} turns.")
    if turns and turns[0].get("from") != "human":  # the official loader skips a leading non-human turn
        turns = turns[1:]
    if len(turns) != 2 or [t.get("from") for t in turns] != ["human", "gpt"]:
        raise MMInstDataError(
            f"{entry.where('conversations')}: expected one human turn followed by one gpt turn, got "
            f"{[t.get('from') for t in record['conversations']]}."
        )
    for i, turn in enumerate(turns):
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise MMInstDataError(f"{entry.where(f'conversations[{i}].value')}: missing or empty.")
    return turns[0]["value"], turns[1]["value"]


def _check_placeholders(entry: JsonEntry, record: dict, human_captions: list[str]) -> None:
    """ShapesWorld-style records also hold ``instruction`` (``[image1]`` placeholders) and ``media`` (inputs in
    placeholder order): the media they reference must be, in order, the captions of the human turn."""
    media = record.get("media")
    if not isinstance(media, list) or not all(isinstance(m, dict) for m in media):
        raise MMInstDataError(f"{entry.where('media')}: must be a list of {{kind, caption, ...}} objects.")
    kinds = [m.get("kind") for m in media]
    if any(kind not in ("image", "audio") for kind in kinds):
        raise MMInstDataError(f"{entry.where('media')}: every item needs kind 'image' or 'audio', got {kinds}.")
    images = [m for m in media if m["kind"] == "image"]
    audio = [m for m in media if m["kind"] == "audio"]
    try:
        parsed = parse_instruction(record["instruction"], len(images), len(audio), argument_name="instruction")
    except (TypeError, ValueError) as error:
        raise MMInstDataError(f"{entry.where('instruction')}: {error}") from error
    referenced = [
        f"[{(images if ref.kind == 'image' else audio)[ref.index].get('caption')}]" for ref in parsed.references
    ]
    if referenced != human_captions:
        placeholders = [ref.placeholder for ref in parsed.references]
        raise MMInstDataError(
            f"{entry.where('instruction')}: placeholders {placeholders} refer to media {referenced}, but the human "
            f"turn (conversations[0].value) has {human_captions}."
        )


def parse_instruction_record(entry: JsonEntry, features: FeatureStore) -> MMInstExample:
    """Validates one ``instruction.json`` record against the media map.

    Args:
        entry (`JsonEntry`): the record and where it stands.
        features (`FeatureStore`): the media map (only presence of captions and files is checked here).

    Returns:
        `MMInstExample`

    Raises:
        `MMInstDataError`: naming file, line, entry and field.
    """
    record = entry.value
    if not isinstance(record, dict):
        raise MMInstDataError(f"{entry.where()}: expected an object, got {type(record).__name__}.")
    task = record.get("task", "any2any")
    if task != "any2any":
        raise MMInstDataError(f"{entry.where('task')}: only 'any2any' records are supported, got {task!r}.")
    human, answer = _turns(entry, record)
    base = _string_field(entry, record, "base")
    if not CAPTION_PATTERN.fullmatch(base):
        raise MMInstDataError(f"{entry.where('base')}: must be one bracketed caption like '[a dog]', got {base!r}.")

    human_captions = CAPTION_PATTERN.findall(human)
    for caption in human_captions:
        features.check_exists(caption, entry.where("conversations[0].value"))
    if base not in human_captions:
        raise MMInstDataError(f"{entry.where('base')}: {base} does not appear in the human turn {human!r}.")
    if "instruction" in record or "media" in record:
        _check_placeholders(entry, record, human_captions)

    if IM_GEN_TOKEN not in answer:
        raise MMInstDataError(
            f"{entry.where('conversations[1].value')}: the answer has no {IM_GEN_TOKEN}: {answer!r}."
        )
    answer_captions = CAPTION_PATTERN.findall(answer)
    results = [c for c in answer_captions if c != base]
    after_im_gen = CAPTION_PATTERN.findall(answer[answer.rindex(IM_GEN_TOKEN) :])
    if len(results) != 1 or not after_im_gen or after_im_gen[0] != results[0]:
        raise MMInstDataError(
            f"{entry.where('conversations[1].value')}: the answer must hold the base caption (optional) and exactly "
            f"one result caption after {IM_GEN_TOKEN}, got {answer_captions}."
        )
    for caption in answer_captions:
        features.check_exists(caption, entry.where("conversations[1].value"))

    added = {}
    raw_added = record.get("added") or []
    if not isinstance(raw_added, list):
        raise MMInstDataError(f"{entry.where('added')}: must be a list of [name, '[caption]'] pairs.")
    for i, pair in enumerate(raw_added):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise MMInstDataError(f"{entry.where(f'added[{i}]')}: must be a [name, '[caption]'] pair, got {pair!r}.")
        if pair[1] not in human_captions:
            raise MMInstDataError(f"{entry.where(f'added[{i}]')}: {pair[1]} does not appear in the human turn.")
        added[pair[1]] = pair[0]
    return MMInstExample(source=entry, instruction=human, answer=answer, base=base, added=added)


def load_instructions(
    instruction_file: str, features: FeatureStore, skip_missing_features: bool = False
) -> list[MMInstExample]:
    """Reads and validates every record of an ``instruction.json`` (or ``.jsonl``).

    Args:
        instruction_file (`str`): the file.
        features (`FeatureStore`): the media map the records are checked against.
        skip_missing_features (`bool`, defaults to `False`): drop (with a logged count and first example) records
            whose media have no feature file instead of raising — the released MM-Inst-Train map names media that
            are no longer distributed.

    Raises:
        `MMInstDataError`: for the first malformed record (file, line, entry and field named), or an empty file.
    """
    entries = read_json_entries(instruction_file)
    if not entries or not isinstance(entries[0].key, int):
        raise MMInstDataError(f"{instruction_file}: expected a non-empty JSON list of instruction records.")
    examples, skipped = [], []
    for entry in entries:
        try:
            examples.append(parse_instruction_record(entry, features))
        except MissingFeatureError as error:
            if not skip_missing_features:
                raise
            skipped.append(str(error))
    if skipped:
        logger.warning(f"Skipped {len(skipped)} of {len(entries)} records without features, e.g. {skipped[0]}")
    if not examples:
        raise MMInstDataError(f"{instruction_file}: no usable record (all {len(entries)} lack features).")
    return examples


def parse_repeat_spec(spec: str) -> tuple[str, str, int]:
    """``"FIELD=VALUE:TIMES"`` (e.g. ``"type=pick_base:3"``) → ``(field, value, times)``; `ValueError` naming the
    expected form otherwise."""
    field_value, sep, times = spec.rpartition(":")
    name, eq, value = field_value.partition("=")
    if not (sep and eq and name and value) or not times.isdigit() or int(times) < 1:
        raise ValueError(
            f"A record repeat must read FIELD=VALUE:TIMES with TIMES >= 1 (e.g. type=pick_base:3), got {spec!r}."
        )
    return name, value, int(times)


def repeat_examples(examples: Sequence[MMInstExample], specs: Sequence[str]) -> list[MMInstExample]:
    """The examples with those whose record matches a spec listed that many times (each right after itself), so an
    epoch holds more of them; the others once.

    Args:
        examples (`Sequence[MMInstExample]`): validated records (`load_instructions`).
        specs (`Sequence[str]`): ``"FIELD=VALUE:TIMES"`` each: a record whose top-level ``FIELD`` equals ``VALUE``
            (compared as text) appears ``TIMES`` times.

    Raises:
        `ValueError`: a malformed spec, two specs for the same field and value, a record matched by two specs, or a
            spec that matches no record (a misspelt field or value would otherwise change nothing).
    """
    parsed = [parse_repeat_spec(spec) for spec in specs]
    keys = [(name, value) for name, value, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Record repeats name the same FIELD=VALUE twice: {list(specs)}.")
    counts = [0] * len(parsed)
    repeated = []
    for example in examples:
        record = example.source.value
        matches = [i for i, (name, value, _) in enumerate(parsed) if name in record and str(record[name]) == value]
        if len(matches) > 1:
            raise ValueError(
                f"{example.source.where()}: matched by more than one record repeat ({[specs[i] for i in matches]})."
            )
        for i in matches:
            counts[i] += 1
        repeated.extend([example] * (parsed[matches[0]][2] if matches else 1))
    unmatched = [spec for spec, count in zip(specs, counts) if count == 0]
    if unmatched:
        raise ValueError(f"Record repeats {unmatched} match no record (check the field name and value).")
    return repeated


# ------------------------------------------------------------------------------------------------ LLM samples


@dataclass(frozen=True)
class LLMSampleText:
    """One training conversation after the official sampling rules.

    Args:
        instruction (`str`): the human turn with ``<video>`` for each medium given as an embedding.
        answer (`str`): the target answer, e.g. ``"Sure. <base><video><im_gen_start><im_gen>[result]<video>"``.
        input_captions (`list[str]`): bracketed caption of each input ``<video>``, in order.
        targets (`list[tuple[str, str]]`): ``(role, bracketed caption)`` of each answer ``<video>``, in order; role is
            ``"base"``, ``"generation"`` or ``"addition"``.
    """

    instruction: str
    answer: str
    input_captions: list[str]
    targets: list[tuple[str, str]]


def build_llm_sample(
    example: MMInstExample,
    rng: np.random.Generator,
    base_drop_prob: float = 0.2,
    caption_text_prob: float = 0.2,
    describe_base: bool = False,
) -> LLMSampleText:
    """Applies the official sampling rules (REFERENCE.md §5) to one record.

    - With probability ``base_drop_prob`` the base is dropped: it stays caption text in the instruction, the answer
      loses it and says ``<base_null>``.
    - Otherwise the base caption becomes an input ``<video>``; every other bracketed medium becomes a ``<video>`` with
      probability ``1 - caption_text_prob``, else its caption text.
    - The answer gets the BASE ``<video>`` (after ``<base>``) and the GEN ``<video>`` after the result caption (kept as
      text, so the pipeline can read it), ``<im_gen>`` becomes ``<im_gen_start><im_gen>``, and each ``added`` medium
      given as a ``<video>`` is listed as ``additions:{name}:<video>.``, a further GEN target.

    Args:
        example (`MMInstExample`): the record.
        rng (`numpy.random.Generator`): the sample's generator (one draw for the base, one per other medium).
        base_drop_prob (`float`, defaults to 0.2): probability of dropping the base.
        caption_text_prob (`float`, defaults to 0.2): probability of giving a non-base medium as text.
        describe_base (`bool`, defaults to `False`):
            Not in the official recipe: the BASE ``<video>`` is followed by the base's bracketed caption
            (``<base><video>[base caption]<im_gen_start>...``), so the LLM first writes out the image it edits and
            then derives the result from those words — the edit becomes a rewrite of text it has just written
            instead of a read-out of the medium's tokens. No effect when the base is dropped (it is then text in
            the instruction already).

    Returns:
        `LLMSampleText`
    """
    drop_base = bool(rng.random() < base_drop_prob)
    inputs, additions = [], []

    def human_medium(match: re.Match) -> str:
        caption = match.group(0)
        if caption == example.base:
            as_text = drop_base
        else:
            as_text = bool(rng.random() < caption_text_prob)
        if as_text:
            return caption[1:-1]
        inputs.append(caption)
        if caption in example.added:
            additions.append((example.added[caption], caption))
        return VIDEO_TOKEN

    instruction = CAPTION_PATTERN.sub(human_medium, example.instruction)

    targets = []

    def answer_medium(match: re.Match) -> str:
        caption = match.group(0)
        if caption == example.base:
            if drop_base:
                return ""
            targets.append((ROLE_BASE, caption))
            return VIDEO_TOKEN + caption if describe_base else VIDEO_TOKEN
        targets.append((ROLE_GENERATION, caption))
        return caption + VIDEO_TOKEN

    answer = CAPTION_PATTERN.sub(answer_medium, example.answer)
    if drop_base:
        answer = answer.replace(BASE_TOKEN, BASE_NULL_TOKEN)
    # `<im_gen>` → `<im_gen_start><im_gen>` unless the data already has the start token.
    answer = re.sub(
        f"(?<!{re.escape(IM_GEN_START_TOKEN)}){re.escape(IM_GEN_TOKEN)}", IM_GEN_START_TOKEN + IM_GEN_TOKEN, answer
    )
    if additions:
        answer += "additions:" + "".join(f"{name}:{VIDEO_TOKEN}." for name, _ in additions)
        targets.extend((ROLE_ADDITION, caption) for _, caption in additions)
    return LLMSampleText(instruction=instruction, answer=answer, input_captions=inputs, targets=targets)


def build_reproduce_sample(example: MMInstExample, describe_base: bool = False) -> LLMSampleText:
    """An auxiliary sample built from ``example``: its base image alone as the instruction, and as the answer the edit
    that leaves it unchanged — ``<base><video><im_gen_start><im_gen>[base caption]<video>`` after the answer's own
    opening words (e.g. ``"Sure. "``), with the base embedding as both the BASE and the GEN target.

    Nothing in the instruction text tells what the image holds, so the LLM must read the whole caption — every
    object, colour and position — from the medium; the edit samples let it guess much of the caption from the
    instruction words (e.g. the slots left free by "put a star in the middle").

    Args:
        example (`MMInstExample`): the record.
        describe_base (`bool`, defaults to `False`):
            As in `build_llm_sample`: the base caption also follows the BASE ``<video>``.
    """
    start = example.answer.find(BASE_TOKEN)
    opening = example.answer[:start] if start >= 0 else ""
    described = example.base if describe_base else ""
    answer = (
        f"{opening}{BASE_TOKEN}{VIDEO_TOKEN}{described}{IM_GEN_START_TOKEN}{IM_GEN_TOKEN}{example.base}{VIDEO_TOKEN}"
    )
    return LLMSampleText(
        instruction=VIDEO_TOKEN,
        answer=answer,
        input_captions=[example.base],
        targets=[(ROLE_BASE, example.base), (ROLE_GENERATION, example.base)],
    )


def conversation_texts(examples: list[MMInstExample]) -> list[str]:
    """Every text `MMInstLLMDataset` can tokenise for ``examples`` — the vicuna conversation with media as bracketed
    captions and as plain caption text, and the ``additions:`` lists — the corpus of a word-level tokenizer for an
    LLM trained from scratch (see `word_tokenizer.build_word_level_tokenizer`)."""
    texts = []
    for example in examples:
        additions = "".join(f"{name}:{VIDEO_TOKEN}." for name in example.added.values())
        conversation = build_vicuna_prompt(
            example.instruction, example.answer + VIDEO_TOKEN + ("additions:" + additions if additions else "")
        )
        texts.append(conversation)
        texts.append(CAPTION_PATTERN.sub(lambda match: match.group(0)[1:-1], conversation))
    return texts


def _epoch_and_index(item: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(item, tuple):
        return int(item[0]), int(item[1])
    return 0, int(item)


class MMInstLLMDataset(Dataset):
    """Tokenised MM-Inst conversations for instruction tuning, with their input media and embedding targets.

    Item ``(epoch, index)`` applies `build_llm_sample` with a generator seeded by ``(seed, epoch, index)``, builds the
    vicuna_v1 conversation, tokenises it (BOS + prompt + answer + EOS, exactly the inference prompt as prefix), masks
    the prompt out of the labels and locates each answer ``<video>``'s read-out position with
    `find_embedding_positions`, the rule inference uses.

    Args:
        examples (`list[MMInstExample]`): validated records.
        features (`FeatureStore`): media vectors.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer with the multimodal tokens.
        token_ids (`MultimodalTokenIds`): their ids.
        seed (`int`): sampling seed.
        target_norm (`float`, defaults to 20.0): norm of the embedding targets (the official scale).
        max_length (`int`, defaults to 512): longest allowed sequence; longer samples raise.
        base_drop_prob (`float`, defaults to 0.2), caption_text_prob (`float`, defaults to 0.2): see `build_llm_sample`.
        answer_noise_prob (`float`, defaults to 0.0):
            Share of the answer's word tokens replaced, in ``input_ids`` only, by a word drawn from the same answer;
            ``labels`` keep the true answer. Teacher forcing then cannot lean on the previous words alone (e.g. a
            colour word always followed by the shapes it was seen with), so each word has to be read from the
            instruction and its media. Special tokens and the tokens at embedding read-out positions are never
            replaced. Drawn from a generator of its own, seeded by ``(seed, epoch, index)``, so 0 reproduces the
            samples of a run without it.
        reproduce_prob (`float`, defaults to 0.0):
            Share of samples replaced by `build_reproduce_sample` of their record (the base image alone, answered by
            its unchanged caption): practice in reading an image into words. Drawn from a generator of its own, so 0
            reproduces the samples of a run without it.
        image_patch_tokens (`int`, defaults to 0):
            The adapter's `image_patch_tokens`: when positive, each input image also brings its patch tokens
            (``features.load_patches``, item key ``image_patches``) and takes ``1 + image_patch_tokens`` ``<video>``
            tokens in the prompt. 0: one ``<video>`` per medium, ``image_patches`` all ``None`` (the official recipe).
        answer_noise_source (`str`, defaults to ``"answer"``):
            Where `answer_noise_prob`'s replacement words come from: ``"answer"``, the words of the same answer;
            ``"context"``, the words that follow the same word anywhere in the records' answers (after "a", every
            colour), so a caption word is swapped for one that fits its place. A shape then follows colour words it
            was never seen with, and the LLM cannot learn to rule a shape out from the colour word before it.
        answer_swap_words (`Sequence[Sequence[str]]`, defaults to ``()``):
            Groups of interchangeable words (e.g. the colours; the shapes), each word one token of ``tokenizer``
            and in one group only. In the teacher-forced input, an answer word of a group is replaced, with
            probability `answer_swap_prob`, by a word drawn uniformly from its group (itself included); ``labels``
            keep the true answer. At 1.0 the word the LLM has just written tells it nothing about the true one, so
            no word of the group can steer the next one (a colour word cannot rule out the shapes it was never seen
            with): what follows has to be read from the instruction and its media. Applied after
            `answer_noise_prob`, to the positions whose true word is in a group, with a generator of its own.
        answer_swap_prob (`float`, defaults to 1.0): see `answer_swap_words`; no effect without groups.
        attribute_tokens (`int`, defaults to 0):
            The adapter's `attribute_tokens`: every medium takes that many more ``<video>`` tokens in the prompt.
        relabel_words (`Sequence[Sequence[str]]`, defaults to ``()``):
            Groups of words that name attribute classes (e.g. the colours), each word one token of ``tokenizer``,
            in one group only, and a class of the same fields of `attribute_class_names` as the rest of its group.
            A relabelled sample (share `relabel_prob`) renames the words of each group by a random permutation
            everywhere in its conversation (``input_ids`` and ``labels``) and its media's attribute classes alike
            (item key ``class_permutation``, for `MultimodalAdapter.project_tokens`): a consistent sample of a world
            where, say, red and green swapped names, which can pair words never paired in the records (e.g. a
            held-out colour and shape). Its media carry only what the renamed attribute tokens say (item key
            ``relabelled``: the pooled vectors must be left out) and its embedding targets, of the unrenamed
            scene, get weight 0 (item key ``target_weights``). Words are renamed as tokens: grammar that depends on
            them (an article: "an orange") is not adjusted. Drawn from a generator of its own, so 0 reproduces the
            samples of a run without it.
        relabel_prob (`float`, defaults to 0.0): see `relabel_words`.
        attribute_class_names (`Sequence[Sequence[str]]`, *optional*):
            Per attribute field, the word each class stands for (`AttributeHeads.class_names`); required by
            `relabel_words`.
        describe_base (`bool`, defaults to `False`):
            See `build_llm_sample` (also applied to the `reproduce_prob` samples).
    """

    def __init__(
        self,
        examples: list[MMInstExample],
        features: FeatureStore,
        tokenizer,
        token_ids: MultimodalTokenIds,
        seed: int,
        target_norm: float = 20.0,
        max_length: int = 512,
        base_drop_prob: float = 0.2,
        caption_text_prob: float = 0.2,
        answer_noise_prob: float = 0.0,
        reproduce_prob: float = 0.0,
        image_patch_tokens: int = 0,
        answer_noise_source: str = "answer",
        answer_swap_words: Sequence[Sequence[str]] = (),
        answer_swap_prob: float = 1.0,
        attribute_tokens: int = 0,
        relabel_words: Sequence[Sequence[str]] = (),
        relabel_prob: float = 0.0,
        attribute_class_names: Sequence[Sequence[str]] | None = None,
        describe_base: bool = False,
    ):
        if isinstance(attribute_tokens, bool) or not isinstance(attribute_tokens, int) or attribute_tokens < 0:
            raise ValueError(f"`attribute_tokens` must be a non-negative integer, got {attribute_tokens!r}.")
        for name, value in (
            ("base_drop_prob", base_drop_prob),
            ("caption_text_prob", caption_text_prob),
            ("answer_noise_prob", answer_noise_prob),
            ("reproduce_prob", reproduce_prob),
            ("answer_swap_prob", answer_swap_prob),
            ("relabel_prob", relabel_prob),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {value}.")
        self.examples = examples
        self.features = features
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.seed = seed
        self.target_norm = target_norm
        self.max_length = max_length
        self.base_drop_prob = base_drop_prob
        self.caption_text_prob = caption_text_prob
        self.answer_noise_prob = answer_noise_prob
        self.reproduce_prob = reproduce_prob
        self.describe_base = bool(describe_base)
        if image_patch_tokens and features.patch_embed_dim is None:
            raise ValueError(
                f"`image_patch_tokens` {image_patch_tokens} needs a FeatureStore that reads patch tokens (its "
                "`patch_embed_dim` is None)."
            )
        self.image_patch_tokens = image_patch_tokens
        self.attribute_tokens = attribute_tokens
        self._protected_ids = set(token_ids.special_token_ids) | {token_ids.eos, token_ids.pad, token_ids.bos}
        if answer_noise_source not in ANSWER_NOISE_SOURCES:
            raise ValueError(f"`answer_noise_source` must be one of {ANSWER_NOISE_SOURCES}, got {answer_noise_source!r}.")
        self.answer_noise_source = answer_noise_source
        self._followers = self._answer_followers() if answer_noise_prob > 0 and answer_noise_source == "context" else {}
        self.answer_swap_prob = answer_swap_prob
        self._swap_groups = self._word_group_ids(answer_swap_words, "answer_swap_words")
        self.relabel_prob = relabel_prob
        self._relabel = self._relabel_tables(relabel_words, attribute_class_names)

    def _word_group_ids(self, groups: Sequence[Sequence[str]], argument: str) -> dict[int, list[int]]:
        """Maps each token id of the word groups given as `argument` to the ids of its group, checking every word is
        one plain token of the tokenizer and in one group only."""
        if isinstance(groups, str) or any(isinstance(group, str) for group in groups):
            raise ValueError(f"`{argument}` must be a sequence of word groups (lists of words), got {groups!r}.")
        swap: dict[int, list[int]] = {}
        for group in groups:
            if len(group) < 2:
                raise ValueError(f"`{argument}`: each group needs at least two words, got {list(group)!r}.")
            ids = []
            for word in group:
                encoded = self._encode(word)
                plain = len(encoded) == 1 and encoded[0] not in self._protected_ids
                if not plain or encoded[0] == self.tokenizer.unk_token_id:
                    raise ValueError(
                        f"`{argument}`: {word!r} must be one plain token of the LLM's tokenizer, it encodes "
                        f"to {encoded}."
                    )
                if encoded[0] in swap or encoded[0] in ids:
                    raise ValueError(f"`{argument}`: {word!r} is listed twice.")
                ids.append(encoded[0])
            swap.update({i: ids for i in ids})
        return swap

    def _relabel_tables(
        self, groups: Sequence[Sequence[str]], class_names: Sequence[Sequence[str]] | None
    ) -> list[tuple[list[int], np.ndarray]] | None:
        """Per `relabel_words` group: its token ids and a ``(num_words, num_fields)`` array of each word's class
        index (all fields concatenated) in every field that names it; `None` without groups."""
        ids_of = self._word_group_ids(groups, "relabel_words")
        if not groups:
            return None
        if not self.attribute_tokens:
            raise ValueError("`relabel_words` renames attribute classes: it needs `attribute_tokens` > 0.")
        if class_names is None:
            raise ValueError(
                "`relabel_words` needs `attribute_class_names`, the word of each attribute class (heads trained by "
                "train_imagebind.py on ShapesWorld carry them)."
            )
        if len(class_names) != self.attribute_tokens:
            raise ValueError(
                f"`attribute_class_names` names {len(class_names)} fields but the media take {self.attribute_tokens} "
                "attribute tokens, one per field."
            )
        starts = np.cumsum([0] + [len(field) for field in class_names])
        self._num_classes = int(starts[-1])
        tables = []
        for group in groups:
            # Per word: (field, class index in all fields concatenated) of every class it names.
            named = [
                [(f, int(starts[f]) + list(field).index(word)) for f, field in enumerate(class_names) if word in field]
                for word in group
            ]
            for word, classes in zip(group, named):
                if not classes or [f for f, _ in classes] != [f for f, _ in named[0]]:
                    raise ValueError(
                        f"`relabel_words`: {word!r} must name a class in the same attribute fields as {group[0]!r}; "
                        f"the class names are {[list(field) for field in class_names]}."
                    )
            ids = ids_of[self._encode(group[0])[0]]
            tables.append((ids, np.array([[c for _, c in classes] for classes in named])))
        return tables

    def _relabelling(self, rng: np.random.Generator) -> tuple[dict[int, int], torch.LongTensor]:
        """A random renaming of each `relabel_words` group: the token id map and the matching class permutation."""
        token_map: dict[int, int] = {}
        permutation = torch.arange(self._num_classes)
        for ids, classes in self._relabel:
            order = rng.permutation(len(ids))
            for word, renamed in enumerate(order):
                token_map[ids[word]] = ids[renamed]
                # The word's classes now read as the classes of its new name.
                permutation[classes[renamed]] = torch.from_numpy(classes[word])
        return token_map, permutation

    def _swap_answer_words(
        self, noisy: list[int], true_ids: list[int], prompt_length: int, keep: list[int], rng: np.random.Generator
    ) -> list[int]:
        """``noisy`` with the answer positions whose true word is in an `answer_swap_words` group replaced, each with
        probability ``answer_swap_prob``, by a uniform draw from that group."""
        keep = set(keep)
        positions = [
            p for p in range(prompt_length, len(true_ids)) if true_ids[p] in self._swap_groups and p not in keep
        ]
        if not positions:
            return noisy
        chosen = rng.random(len(positions)) < self.answer_swap_prob
        draws = rng.random(len(positions))
        swapped = list(noisy)
        for position, swap, draw in zip(positions, chosen, draws):
            if swap:
                group = self._swap_groups[true_ids[position]]
                swapped[position] = group[int(draw * len(group))]
        return swapped

    def __len__(self) -> int:
        return len(self.examples)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _answer_followers(self) -> dict[int, list[int]]:
        """For every word token of the records' answers, the distinct word tokens that follow it somewhere in them: the
        words that can stand in a given context (after "a": the colours, ...)."""
        followers: dict[int, set[int]] = {}
        for example in self.examples:
            ids = self._encode(example.answer)
            for before, word in zip(ids, ids[1:]):
                if word not in self._protected_ids:
                    followers.setdefault(before, set()).add(word)
        return {before: sorted(words) for before, words in followers.items()}

    def _corrupt_answer(
        self, ids: list[int], prompt_length: int, keep: list[int], rng: np.random.Generator
    ) -> list[int]:
        """``ids`` with a share ``answer_noise_prob`` of the answer's word tokens replaced by words of the answer, or
        (``answer_noise_source="context"``) by words that follow the same word elsewhere in the answers."""
        keep = set(keep)
        eligible = [
            p for p in range(prompt_length, len(ids)) if ids[p] not in self._protected_ids and p not in keep
        ]
        if not eligible:
            return ids
        words = [ids[p] for p in eligible]
        replace = rng.random(len(eligible)) < self.answer_noise_prob
        noisy = list(ids)
        if self.answer_noise_source == "answer":
            picks = rng.integers(len(words), size=len(eligible))
            for position, chosen, pick in zip(eligible, replace, picks):
                if chosen:
                    noisy[position] = words[pick]
            return noisy
        draws = rng.random(len(eligible))
        for position, chosen, draw in zip(eligible, replace, draws):
            if chosen:
                # The context is the true word before (``ids``), not a replaced one.
                pool = self._followers.get(ids[position - 1]) or words
                noisy[position] = pool[int(draw * len(pool))]
        return noisy

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = _epoch_and_index(item)
        example = self.examples[index]
        where = example.source.where()
        reproduce = self.reproduce_prob > 0 and (
            np.random.default_rng([self.seed, epoch, index, 2]).random() < self.reproduce_prob
        )
        if reproduce:
            sample = build_reproduce_sample(example, self.describe_base)
        else:
            sample = build_llm_sample(
                example,
                np.random.default_rng([self.seed, epoch, index]),
                self.base_drop_prob,
                self.caption_text_prob,
                self.describe_base,
            )
        # A medium takes 1 + attribute_tokens <video> tokens, an image with patches image_patch_tokens more (see
        # `inject_media_embeds`).
        patches = [
            self.features.load_patches(c, where) if self.image_patch_tokens else None for c in sample.input_captions
        ]
        counts = [self.attribute_tokens + (1 if p is None else 1 + self.image_patch_tokens) for p in patches]
        instruction = expand_media_tokens(sample.instruction, counts)
        bos = [] if self.token_ids.bos is None else [self.token_ids.bos]
        prompt_ids = bos + self._encode(build_vicuna_prompt(instruction))
        full_ids = bos + self._encode(
            build_vicuna_prompt(instruction, sample.answer, eos_token=self.tokenizer.eos_token)
        )
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise MMInstDataError(
                f"{where}: the tokenizer splits the conversation differently at the prompt/answer boundary, so the "
                "training prompt would differ from the inference prompt."
            )
        relabelled = self._relabel is not None and (
            np.random.default_rng([self.seed, epoch, index, 4]).random() < self.relabel_prob
        )
        class_permutation = None
        if self._relabel is not None:
            token_map, class_permutation = (
                self._relabelling(np.random.default_rng([self.seed, epoch, index, 5]))
                if relabelled
                else ({}, torch.arange(self._num_classes))
            )
            prompt_ids = [token_map.get(i, i) for i in prompt_ids]
            full_ids = [token_map.get(i, i) for i in full_ids]
        if len(full_ids) > self.max_length:
            raise MMInstDataError(f"{where}: {len(full_ids)} tokens exceed --max_length {self.max_length}.")
        prompt_length = len(prompt_ids)
        input_videos = prompt_ids.count(self.token_ids.video)
        answer_videos = [p for p in range(prompt_length, len(full_ids)) if full_ids[p] == self.token_ids.video]
        if input_videos != sum(counts) or len(answer_videos) != len(sample.targets):
            raise MMInstDataError(
                f"{where}: expected {sum(counts)} input and {len(sample.targets)} answer "
                f"{VIDEO_TOKEN} tokens, found {input_videos} and {len(answer_videos)} (a caption containing {VIDEO_TOKEN}?)."
            )

        # Read-out positions: base and generation by the inference rule, additions at the state before their token.
        positions = find_embedding_positions(full_ids, self.token_ids, start=prompt_length)
        readout = {ROLE_BASE: positions.base, ROLE_GENERATION: positions.generation}
        target_positions = []
        for (role, _), video_position in zip(sample.targets, answer_videos):
            position = readout.pop(role, None) if role in readout else video_position - 1
            if position != video_position - 1:
                raise MMInstDataError(f"{where}: the {role} {VIDEO_TOKEN} is not where the read-out rule looks.")
            target_positions.append(position)

        labels = [IGNORE_INDEX] * prompt_length + full_ids[prompt_length:]
        true_ids = full_ids
        if self.answer_noise_prob > 0:
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            full_ids = self._corrupt_answer(full_ids, prompt_length, target_positions, rng)
        if self._swap_groups and self.answer_swap_prob > 0:
            rng = np.random.default_rng([self.seed, epoch, index, 3])
            full_ids = self._swap_answer_words(full_ids, true_ids, prompt_length, target_positions, rng)
        inputs = [self.features.load(c, where) for c in sample.input_captions]
        targets = [self.features.load(c, where) for _, c in sample.targets]
        embed_dim = self.features.embed_dim or targets[0].numel()
        return {
            "input_ids": torch.tensor(full_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "prompt_length": prompt_length,
            "media_embeds": torch.stack(inputs) if inputs else torch.zeros(0, embed_dim),
            "image_patches": patches,
            "target_positions": torch.tensor(target_positions, dtype=torch.long),
            "target_embeds": rescale_to_norm(torch.stack(targets), self.target_norm),
            "target_weights": torch.full((len(targets),), 0.0 if relabelled else 1.0),
            "relabelled": relabelled,
            "class_permutation": None
            if class_permutation is None
            else class_permutation.expand(len(inputs), -1).clone(),
        }


def collate_llm_batch(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pads a list of `MMInstLLMDataset` items into a batch (media stay per-row lists)."""
    length = max(s["input_ids"].numel() for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "prompt_lengths": [s["prompt_length"] for s in samples],
        "media_embeds": [s["media_embeds"] for s in samples],
        "image_patches": [s["image_patches"] for s in samples],
        "target_rows": torch.cat([torch.full_like(s["target_positions"], row) for row, s in enumerate(samples)]),
        "target_positions": torch.cat([s["target_positions"] for s in samples]),
        "target_embeds": torch.cat([s["target_embeds"] for s in samples]),
        "target_weights": torch.cat([s["target_weights"] for s in samples]),
        "relabelled_media": torch.cat(
            [torch.full((s["media_embeds"].shape[0],), s["relabelled"], dtype=torch.bool) for s in samples]
        ),
        "class_permutation": _collate_class_permutations(samples),
    }


def _collate_class_permutations(samples: list[dict[str, Any]]) -> torch.LongTensor | None:
    """The media's class permutations in batch order (identity rows for samples without one); `None` when no
    sample has one."""
    given = [s["class_permutation"] for s in samples if s["class_permutation"] is not None]
    if not given:
        return None
    identity = torch.arange(given[0].shape[1])
    return torch.cat(
        [
            identity.expand(len(s["media_embeds"]), -1) if s["class_permutation"] is None else s["class_permutation"]
            for s in samples
        ]
    )


# ------------------------------------------------------------------------------------------------ prior pairs


@dataclass(frozen=True)
class PriorPair:
    """One (condition → image) training pair of the refinement prior.

    Args:
        source (`str`): caption of the condition (looked up in the text map for text sources).
        modality (`int`): `Modality` id of the source.
        target (`str`): caption of the target image.
        corrupt (`bool`): whether the condition is the target itself, corrupted with noise at every use.
        where (`str`): where the pair was defined, for messages.
    """

    source: str
    modality: int
    target: str
    corrupt: bool
    where: str


def read_prior_pairs(path: str) -> list[PriorPair]:
    """Reads a pairs file: a JSON list of ``{"source": caption, "source_modality": "text"|"audio"|"image"|"video",
    "target": image caption}``.

    Raises:
        `MMInstDataError`: naming file, line, entry and field.
    """
    entries = read_json_entries(path)
    if not entries or not isinstance(entries[0].key, int):
        raise MMInstDataError(f"{path}: expected a non-empty JSON list of pairs.")
    pairs = []
    for entry in entries:
        if not isinstance(entry.value, dict):
            raise MMInstDataError(f"{entry.where()}: expected an object with source, source_modality and target.")
        source = _string_field(entry, entry.value, "source")
        target = _string_field(entry, entry.value, "target")
        modality = entry.value.get("source_modality")
        if modality not in MODALITY_NAMES:
            raise MMInstDataError(
                f"{entry.where('source_modality')}: must be one of {sorted(MODALITY_NAMES)}, got {modality!r}."
            )
        pairs.append(PriorPair(source, int(MODALITY_NAMES[modality]), target, False, entry.where()))
    return pairs


def image_entries(features: FeatureStore) -> list[MediaEntry]:
    """Entries of a media map whose medium is an image, in map order."""
    return [entry for entry in features.media_map.values() if entry.kind == "image"]


def default_prior_pairs(
    features: FeatureStore,
    text_features: FeatureStore | None = None,
    text_to_image: bool = False,
    corrupted_images: bool = False,
    corruption_modality: int = Modality.VIDEO,
) -> list[PriorPair]:
    """Pairs derived from the image entries of a media map.

    Args:
        features (`FeatureStore`): the media map.
        text_features (`FeatureStore`, *optional*): text vectors of captions (for ``text_to_image``).
        text_to_image (`bool`): a caption's text vector → its image, for every image whose caption has a text vector.
        corrupted_images (`bool`): a noise-corrupted image vector → the clean one, for every image.
        corruption_modality (`int`, defaults to `Modality.VIDEO`): source modality of corrupted pairs. VIDEO is what
            the pipeline passes with the LLM's generation embedding — the imperfect embedding corruption stands in for.

    Returns:
        `list[PriorPair]`
    """
    if text_to_image and text_features is None:
        raise ValueError("`text_to_image` pairs need `text_features` (--text_media_map).")
    pairs = []
    for entry in image_entries(features):
        if text_to_image and entry.caption_key in text_features:
            pairs.append(
                PriorPair(entry.caption_key, int(Modality.TEXT), entry.caption_key, False, entry.source.where())
            )
        if corrupted_images:
            pairs.append(
                PriorPair(entry.caption_key, int(corruption_modality), entry.caption_key, True, entry.source.where())
            )
    return pairs


class PriorPairsDataset(Dataset):
    """(condition, clean target) vectors for the refinement prior.

    Item ``(epoch, index)`` returns the condition vector (for corruption pairs: the target embedding corrupted with
    the official DDPM noising ``10·add_noise(target/10, ε, t)`` at a timestep ``t`` drawn, like ε, from a generator
    seeded with ``(seed, epoch, index)``), the target at ``target_norm`` and the source modality id.

    Args:
        pairs (`list[PriorPair]`): the pairs.
        features (`FeatureStore`): image and audio vectors.
        text_features (`FeatureStore`, *optional*): text vectors, needed for text sources.
        seed (`int`): corruption seed.
        alphas_cumprod (`torch.Tensor`, *optional*): the noise schedule of corruption pairs (SDXL's DDPM schedule).
        max_corruption_timestep (`int`, defaults to 1000): corruption timesteps are drawn from ``[0, this)``.
        target_norm (`float`, defaults to 20.0): norm of targets (and of the embedding that is corrupted).
    """

    def __init__(
        self,
        pairs: list[PriorPair],
        features: FeatureStore,
        text_features: FeatureStore | None,
        seed: int,
        alphas_cumprod: torch.Tensor | None = None,
        max_corruption_timestep: int = 1000,
        target_norm: float = 20.0,
    ):
        if not pairs:
            raise ValueError("No training pairs: pass --pairs_file, --text_media_map or --corrupted_image_pairs.")
        if any(p.corrupt for p in pairs) and alphas_cumprod is None:
            raise ValueError("Corruption pairs need `alphas_cumprod`.")
        if alphas_cumprod is not None and not 1 <= max_corruption_timestep <= len(alphas_cumprod):
            raise ValueError(
                f"`max_corruption_timestep` must lie in [1, {len(alphas_cumprod)}], got {max_corruption_timestep}."
            )
        self.pairs = pairs
        self.features = features
        self.text_features = text_features
        self.seed = seed
        self.alphas_cumprod = alphas_cumprod
        self.max_corruption_timestep = max_corruption_timestep
        self.target_norm = target_norm
        for pair in pairs:
            self._source_store(pair).check_exists(pair.source, pair.where)
            features.check_exists(pair.target, pair.where)

    def _source_store(self, pair: PriorPair) -> FeatureStore:
        if pair.modality == Modality.TEXT and not pair.corrupt:
            if self.text_features is None:
                raise MMInstDataError(f"{pair.where}: a text source needs --text_media_map (text features).")
            return self.text_features
        return self.features

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = _epoch_and_index(item)
        pair = self.pairs[index]
        target = rescale_to_norm(self.features.load(pair.target, pair.where), self.target_norm)
        if pair.corrupt:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            )
            timestep = int(torch.randint(0, self.max_corruption_timestep, (1,), generator=generator))
            noise = torch.randn(target.shape, generator=generator)
            alpha = self.alphas_cumprod[timestep].float()
            condition = 10.0 * (alpha.sqrt() * target / 10.0 + (1 - alpha).sqrt() * noise)
        else:
            condition = self._source_store(pair).load(pair.source, pair.where)
        return {"condition": condition, "target": target, "modality": torch.tensor(pair.modality, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ decoder images


class ImageEmbeddingDataset(Dataset):
    """(image, ImageBind embedding, caption) triples for decoder training, from the image entries of media maps.

    Images are resized (shorter side, bicubic) and centre-cropped to ``resolution`` — the pipeline's
    ``resize_mode="crop"`` — and scaled to ``[-1, 1]``; there is no flipping (left/right matters in instructions).
    Embeddings are rescaled to ``embedding_norm``, the norm the pipeline conditions the decoder with.

    Args:
        entries (`list[MediaEntry]`): image entries (see `image_entries`).
        features (`FeatureStore`): their vectors.
        resolution (`int`): output image side.
        embedding_norm (`float`, defaults to 20.0): norm of the conditioning embedding.
    """

    def __init__(
        self, entries: list[MediaEntry], features: FeatureStore, resolution: int, embedding_norm: float = 20.0
    ):
        if not entries:
            raise ValueError("No image entries in the media map(s).")
        self.entries = entries
        self.features = features
        self.resolution = resolution
        self.embedding_norm = embedding_norm
        for entry in entries:
            image_path = os.path.join(features.data_root, entry.media_file)
            if not os.path.isfile(image_path):
                raise MMInstDataError(f"{entry.source.where('media_path')}: the image {image_path} does not exist.")
            features.check_exists(entry.caption_key, entry.source.where())

    def __len__(self) -> int:
        return len(self.entries)

    def load_image(self, entry: MediaEntry) -> torch.Tensor:
        path = os.path.join(self.features.data_root, entry.media_file)
        try:
            with PIL.Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise MMInstDataError(f"Cannot read image {path} ({entry.source.where()}): {error}") from error
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.BICUBIC)
        left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        _, index = _epoch_and_index(item)
        entry = self.entries[index]
        embed = self.features.load(entry.caption_key, entry.source.where())
        return {
            "pixel_values": self.load_image(entry),
            "image_embeds": rescale_to_norm(embed, self.embedding_norm),
            "caption": entry.caption_key,
        }
