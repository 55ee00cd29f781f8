"""ShapesWorld editing instructions with known answers.

Every example is an instruction in the pipeline's placeholder syntax (``"add [audio1] to [image1] on the left"``),
its ordered inputs (images first — ``[image1]``, ``[image2]``, … — then audio clips), which image is the base,
and the target scene the edit must produce. Instruction types (`INSTRUCTION_TYPES`):

- ``add_text`` / ``add_image`` / ``add_audio``: add an object named in words, shown alone in an image, or heard as
  its sound (`sounds.py`), at a named free position;
- ``remove``, ``recolour``, ``replace`` (by an object named in words, shown or heard);
- ``background``: take the background of another scene image;
- ``multi_edit``: two of the edits above in one instruction;
- ``pick_base``: two or three scene images, of which the instruction describes the one to edit.

Placeholder numbers are shuffled independently of the phrasing, so the base is not always ``[image1]``.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .sounds import sound_caption
from .world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SLOT_PHRASES,
    SLOTS,
    Scene,
    SceneObject,
    _check_name,
    article,
    caption,
    object_image_caption,
)


INSTRUCTION_TYPES: tuple[str, ...] = (
    "add_text",
    "add_image",
    "add_audio",
    "remove",
    "recolour",
    "replace",
    "background",
    "multi_edit",
    "pick_base",
)
MEDIA_KINDS: tuple[str, ...] = ("image", "audio")
# The assistant's answer in the official MM-Inst format: base caption after <base>, result caption after <im_gen>.
ANSWER_TEMPLATE = "Sure. <base>[{base}]<im_gen>[{result}]"


@dataclass(frozen=True)
class MediaItem:
    """One input of an instruction.

    Exactly one of three forms:
    - a scene image: ``kind="image"``, ``scene`` set;
    - an object image (the object alone on the neutral background): ``kind="image"``, ``shape`` and ``colour`` set;
    - a sound: ``kind="audio"``, ``shape``, ``colour`` and ``variant`` (which jittered recording) set.

    Args:
        kind (`str`): ``"image"`` or ``"audio"``.
        scene ([`Scene`], *optional*): the scene shown.
        shape (`str`, *optional*): the object's shape.
        colour (`str`, *optional*): the object's colour.
        variant (`int`, *optional*): the recording of a sound.
    """

    kind: str
    scene: Optional[Scene] = None
    shape: Optional[str] = None
    colour: Optional[str] = None
    variant: Optional[int] = None

    def __post_init__(self) -> None:
        _check_name(self.kind, MEDIA_KINDS, "kind")
        has_object = self.shape is not None or self.colour is not None
        if self.scene is not None:
            if self.kind != "image" or has_object or self.variant is not None:
                raise ValueError("A scene media item is an image with only `scene` set.")
            if not isinstance(self.scene, Scene):
                raise TypeError(f"`scene` must be a Scene, got {type(self.scene).__name__}.")
            return
        _check_name(self.shape, SHAPES, "shape")
        _check_name(self.colour, COLOURS, "colour")
        if self.kind == "audio":
            if isinstance(self.variant, bool) or not isinstance(self.variant, int) or self.variant < 0:
                raise ValueError(f"A sound needs a non-negative int `variant`, got {self.variant!r}.")
        elif self.variant is not None:
            raise ValueError("`variant` only applies to sounds (kind='audio').")

    @property
    def caption(self) -> str:
        """The media caption (its MM-Inst key): a scene caption, ``"an image of a red star"`` or a sound caption."""
        if self.scene is not None:
            return caption(self.scene)
        if self.kind == "image":
            return object_image_caption(self.shape, self.colour)
        return sound_caption(self.shape, self.colour, self.variant)

    @property
    def file_name(self) -> str:
        """Canonical file name relative to the media folder; equal items share one file."""
        if self.scene is not None:
            return f"scenes/{self.scene.slug()}.png"
        if self.kind == "image":
            return f"objects/{self.colour}-{self.shape}.png"
        return f"sounds/{self.colour}-{self.shape}-v{self.variant}.wav"

    def combinations(self) -> frozenset[tuple[str, str]]:
        """``(shape, colour)`` / ``(shape, background)`` pairs this input shows or sounds like."""
        if self.scene is not None:
            return self.scene.combinations()
        return frozenset({(self.shape, self.colour)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (without the file path, which the writer decides)."""
        data: dict[str, Any] = {"kind": self.kind, "caption": self.caption}
        if self.scene is not None:
            data["scene"] = self.scene.to_dict()
        else:
            data["object"] = {"shape": self.shape, "colour": self.colour}
            if self.variant is not None:
                data["variant"] = self.variant
        return data


_PLACEHOLDER_RE = re.compile(r"\[(image|audio)(\d+)\]")


@dataclass(frozen=True)
class InstructionExample:
    """An editing instruction with its inputs and known answer.

    Args:
        type (`str`): one of `INSTRUCTION_TYPES`.
        instruction (`str`): the text with placeholders ``[image1]``, ``[audio1]``, … each used exactly once.
        media (`tuple[MediaItem, ...]`): the inputs, images first then audio, each group in placeholder order:
            ``media[i]`` is ``[image{i+1}]`` for the images and ``[audio{i+1-num_images}]`` after them.
        base_index (`int`): index into ``media`` of the image to edit (always a scene image).
        target_scene ([`Scene`]): the scene the edit must produce.
        added (`tuple[tuple[str, int], ...]`): objects brought in by an input, as (object name, media index),
            e.g. ``(("red star", 1),)`` for "add [image2] to [image1]"; the official format's ``added`` field.
    """

    type: str
    instruction: str
    media: tuple[MediaItem, ...]
    base_index: int
    target_scene: Scene
    added: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_name(self.type, INSTRUCTION_TYPES, "type")
        object.__setattr__(self, "media", tuple(self.media))
        object.__setattr__(self, "added", tuple(tuple(pair) for pair in self.added))
        if not 0 <= self.base_index < len(self.media) or self.media[self.base_index].scene is None:
            raise ValueError(f"`base_index` {self.base_index} must point at a scene image of `media`.")
        kinds = [item.kind for item in self.media]
        if kinds != sorted(kinds, key=MEDIA_KINDS.index):
            raise ValueError(f"`media` must list images before audio clips, got kinds {kinds}.")
        if self.placeholders() != self.expected_placeholders():
            raise ValueError(
                f"Placeholders of the instruction {self.placeholders()} must be exactly "
                f"{self.expected_placeholders()} (one per input), in any order: {self.instruction!r}."
            )
        captions = [item.caption for item in self.media]
        if len(set(captions)) != len(captions):
            raise ValueError(f"Inputs of one instruction must have distinct captions, got {captions}.")
        if self.target_scene == self.base_scene:
            raise ValueError("The target scene equals the base scene: the instruction changes nothing.")
        for name, index in self.added:
            if not 0 <= index < len(self.media) or self.media[index].scene is not None:
                raise ValueError(f"`added` entry ({name!r}, {index}) must point at an object image or a sound.")

    @property
    def base_scene(self) -> Scene:
        return self.media[self.base_index].scene

    @property
    def target_caption(self) -> str:
        return caption(self.target_scene)

    @property
    def num_images(self) -> int:
        return sum(item.kind == "image" for item in self.media)

    def placeholders(self) -> list[str]:
        """The placeholders of the instruction, sorted in `media` order."""
        found = [f"[{m[1]}{m[2]}]" for m in _PLACEHOLDER_RE.finditer(self.instruction)]
        expected = self.expected_placeholders()
        return sorted(found, key=lambda p: (expected.index(p) if p in expected else len(expected), p))

    def expected_placeholders(self) -> list[str]:
        """``[image1]``, …, ``[audio1]``, … — one per input, in `media` order."""
        return [f"[image{i + 1}]" for i in range(self.num_images)] + [
            f"[audio{i + 1}]" for i in range(len(self.media) - self.num_images)
        ]

    def media_for_placeholder(self, placeholder: str) -> MediaItem:
        return self.media[self.expected_placeholders().index(placeholder)]

    def official_instruction(self) -> str:
        """The instruction with every placeholder replaced by its input's caption in brackets (MM-Inst format)."""
        return _PLACEHOLDER_RE.sub(
            lambda m: f"[{self.media_for_placeholder(m.group(0)).caption}]", self.instruction
        )

    def combinations(self) -> frozenset[tuple[str, str]]:
        """Every ``(shape, colour)`` / ``(shape, background)`` pair in the inputs and the target."""
        pairs = set(self.target_scene.combinations())
        for item in self.media:
            pairs |= item.combinations()
        return frozenset(pairs)

    def official_fields(self) -> dict[str, Any]:
        """The example in the official MM-Inst ``instruction.json`` format (REFERENCE.md §5)."""
        base = self.base_scene
        record: dict[str, Any] = {
            "task": "any2any",
            "base": f"[{caption(base)}]",
            "result": self.target_caption,
            "conversations": [
                {"from": "human", "value": self.official_instruction()},
                {"from": "gpt", "value": ANSWER_TEMPLATE.format(base=caption(base), result=self.target_caption)},
            ],
        }
        if self.added:
            record["added"] = [[name, f"[{self.media[index].caption}]"] for name, index in self.added]
        return record


# --------------------------------------------------------------------------------------------------------------------
# Phrasing templates. Clauses describe one edit without naming the base; wrappers attach the base.
# Fields: {obj} an object of the base ("red circle", or "red circle on the left" when ambiguous), {colour},
# {where} a position phrase, {src} the object to bring in (words or a placeholder), {base}, {e}/{e1}/{e2} clauses.
# --------------------------------------------------------------------------------------------------------------------
_CLAUSES: dict[str, tuple[str, ...]] = {
    "add": ("add {src} {where}", "put {src} {where}", "place {src} {where}", "insert {src} {where}"),
    "remove": ("remove the {obj}", "take out the {obj}", "delete the {obj}", "get rid of the {obj}"),
    "recolour": (
        "make the {obj} {colour}",
        "paint the {obj} {colour}",
        "recolour the {obj} {colour}",
        "change the colour of the {obj} to {colour}",
        "turn the {obj} {colour}",
    ),
    "replace": (
        "replace the {obj} with {src}",
        "swap the {obj} for {src}",
        "turn the {obj} into {src}",
        "change the {obj} into {src}",
    ),
    "background": (
        "use the background of {src}",
        "change the background to the one in {src}",
        "switch to the background of {src}",
    ),
}
_FULL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add {src} to {base} {where}", "put {src} into {base} {where}"),
    "remove": ("remove the {obj} from {base}", "take the {obj} out of {base}", "delete the {obj} from {base}"),
    "recolour": ("make the {obj} in {base} {colour}", "change the colour of the {obj} in {base} to {colour}"),
    "replace": ("replace the {obj} in {base} with {src}", "turn the {obj} in {base} into {src}"),
    "background": (
        "change the background of {base} to the background of {src}",
        "give {base} the background of {src}",
        "put the objects of {base} on the background of {src}",
    ),
}
_SINGLE_WRAPPERS = ("in {base}, {e}", "{base}: {e}", "{e} in {base}")
_MULTI_WRAPPERS = (
    "in {base}, {e1} and {e2}",
    "{base}: {e1}, then {e2}",
    "{e1} and {e2} in {base}",
    "edit {base}: {e1} and {e2}",
)
# Clauses of these kinds end in a position or an input ("... on the left", "... of [image2]"); a trailing
# "in [image1]" after them reads badly, so wrappers that put the base last are not used after them.
_NO_TRAILING_BASE = ("add", "background")
_PICK_WRAPPERS = (
    "of {images}, edit the one with {prop}: {e}",
    "look at {images}, pick the one with {prop} and {e}",
    "{images}: {e} in the picture with {prop}",
    "take whichever of {images} has {prop} and {e}",
)
# How an input that brings in an object is referred to ({m} is its placeholder).
_SOURCE_PHRASES: dict[str, tuple[str, ...]] = {
    "image": ("{m}", "the object in {m}", "the object shown in {m}"),
    "audio": ("{m}", "the object that makes the sound {m}", "what you hear in {m}"),
}
_MARKER_RE = re.compile(r"<m(\d+)>")
_IMAGES_MARKER = "<images>"


class _Reject(Exception):
    """The random draw cannot produce a valid example; draw again."""


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    # Indexing (rather than rng.choice) keeps plain Python types (str, not numpy.str_).
    return options[int(rng.integers(len(options)))]


def _random_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3) -> Scene:
    count = int(rng.integers(min_objects, max_objects + 1))
    slots = [SLOTS[i] for i in sorted(rng.choice(len(SLOTS), size=count, replace=False))]
    objects = tuple(SceneObject(_pick(rng, SHAPES), _pick(rng, COLOURS), slot) for slot in slots)
    return Scene(_pick(rng, BACKGROUNDS), objects)


def _refer(scene: Scene, slot: str) -> str:
    """Name the object in ``slot`` unambiguously: its kind, plus its position when the kind repeats."""
    obj = scene.object_at(slot)
    same_kind = [o for o in scene.objects if o.name == obj.name]
    return obj.name if len(same_kind) == 1 else f"{obj.name} {SLOT_PHRASES[slot]}"


class _Draft:
    """An instruction under construction: inputs in logical order (0 = base) and text with ``<mK>`` markers."""

    def __init__(self, rng: np.random.Generator, sound_variants: Sequence[int]) -> None:
        self.rng = rng
        self.sound_variants = sound_variants
        self.media: list[MediaItem] = []
        self.added: list[tuple[str, int]] = []

    def ref(self, item: MediaItem) -> str:
        if any(existing.caption == item.caption for existing in self.media):
            raise _Reject  # the same input twice would need two identical placeholders
        self.media.append(item)
        return f"<m{len(self.media) - 1}>"

    def source(self, shape: str, colour: str, modality: str) -> str:
        """Refer to an object to bring in, in words (``modality="text"``) or through a new image / sound input."""
        if modality == "text":
            return f"{article(colour)} {colour} {shape}"
        variant = _pick(self.rng, self.sound_variants) if modality == "audio" else None
        marker = self.ref(MediaItem(modality, shape=shape, colour=colour, variant=variant))
        self.added.append((f"{colour} {shape}", len(self.media) - 1))
        return _pick(self.rng, _SOURCE_PHRASES[modality]).format(m=marker)

    def finish(self, instruction_type: str, text: str, target: Scene) -> InstructionExample:
        """Number the inputs (images, then audio, each in a random order) and resolve the markers."""
        if any(item.scene == target for item in self.media):
            raise _Reject  # an input would already be the answer
        images = [i for i, item in enumerate(self.media) if item.kind == "image"]
        audio = [i for i, item in enumerate(self.media) if item.kind == "audio"]
        order = [images[i] for i in self.rng.permutation(len(images))]
        order += [audio[i] for i in self.rng.permutation(len(audio))]
        placeholder = {}
        for position, logical in enumerate(order):
            kind = self.media[logical].kind
            number = position + 1 if kind == "image" else position - len(images) + 1
            placeholder[logical] = f"[{kind}{number}]"
        text = text.replace(_IMAGES_MARKER, _join([f"[image{i + 1}]" for i in range(len(images))]))
        text = _MARKER_RE.sub(lambda m: placeholder[int(m.group(1))], text)
        return InstructionExample(
            type=instruction_type,
            instruction=text,
            media=tuple(self.media[i] for i in order),
            base_index=order.index(0),
            target_scene=target,
            added=tuple((name, order.index(index)) for name, index in self.added),
        )


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _apply_at(scene: Scene, edited: Scene, slot: str) -> Scene:
    """``scene`` with its ``slot`` made as in ``edited`` (used to combine edits drawn on the same base)."""
    objects = [obj for obj in scene.objects if obj.slot != slot]
    new = edited.object_at(slot)
    if new is not None:
        objects.append(new)
    if not objects:
        raise _Reject  # the edits removed every object
    return Scene(scene.background, tuple(objects))


def _edit(draft: _Draft, scene: Scene, kind: str, slot: str, modality: str = "text") -> tuple[Scene, dict[str, str]]:
    """Draw one edit of ``kind`` at ``slot`` of ``scene``; returns the edited scene and the template fields."""
    rng = draft.rng
    if kind == "add":
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        fields = {"src": draft.source(shape, colour, modality), "where": SLOT_PHRASES[slot]}
        return scene.with_object(SceneObject(shape, colour, slot)), fields
    fields = {"obj": _refer(scene, slot)}
    old = scene.object_at(slot)
    if kind == "remove":
        if len(scene.objects) < 2:
            raise _Reject
        return scene.without_slot(slot), fields
    if kind == "recolour":
        colour = _pick(rng, [c for c in COLOURS if c != old.colour])
        return scene.with_object_at(slot, old.shape, colour), {**fields, "colour": colour}
    if kind == "replace":
        shape, colour = _pick(rng, [s for s in SHAPES if s != old.shape]), _pick(rng, COLOURS)
        fields["src"] = draft.source(shape, colour, modality)
        return scene.with_object_at(slot, shape, colour), fields
    raise ValueError(f"Unknown edit kind {kind!r}.")


def _background_edit(draft: _Draft, scene: Scene) -> tuple[Scene, dict[str, str]]:
    background = _pick(draft.rng, [b for b in BACKGROUNDS if b != scene.background])
    reference = _random_scene(draft.rng).with_background(background)
    # A reference equal to the target is rejected by `_Draft.finish`, like any input that already is the answer.
    return scene.with_background(background), {"src": draft.ref(MediaItem("image", scene=reference))}


def _draw_single_edit(draft: _Draft, scene: Scene, kind: str, modality: str) -> tuple[Scene, dict[str, str]]:
    """One edit of ``kind`` at a random valid position."""
    if kind == "background":
        return _background_edit(draft, scene)
    slots = scene.free_slots if kind == "add" else tuple(obj.slot for obj in scene.objects)
    if not slots:
        raise _Reject
    return _edit(draft, scene, kind, _pick(draft.rng, slots), modality)


def _phrase_single(rng: np.random.Generator, kind: str, base: str, fields: dict[str, str]) -> str:
    if rng.random() < 0.5:
        return _pick(rng, _FULL_TEMPLATES[kind]).format(base=base, **fields)
    clause = _pick(rng, _CLAUSES[kind]).format(**fields)
    return _pick(rng, _wrappers(_SINGLE_WRAPPERS, kind)).format(base=base, e=clause)


def _wrappers(wrappers: tuple[str, ...], last_kind: str) -> tuple[str, ...]:
    if last_kind in _NO_TRAILING_BASE:
        return tuple(w for w in wrappers if not w.endswith("{base}"))
    return wrappers


_SINGLE_TYPES: dict[str, tuple[str, Optional[str], tuple[int, int]]] = {
    # type: (edit kind, modality of the brought-in object — None: any —, (min, max) objects of the base)
    "add_text": ("add", "text", (1, 2)),
    "add_image": ("add", "image", (1, 2)),
    "add_audio": ("add", "audio", (1, 2)),
    "remove": ("remove", "text", (2, 3)),
    "recolour": ("recolour", "text", (1, 3)),
    "replace": ("replace", None, (1, 3)),
    "background": ("background", "text", (1, 3)),
}
_MODALITIES = ("text", "image", "audio")
_MULTI_KINDS = ("add", "remove", "recolour", "replace", "background")
_PICK_KINDS = ("add", "remove", "recolour", "replace")


def _draw(instruction_type: str, rng: np.random.Generator, sound_variants: Sequence[int]) -> InstructionExample:
    draft = _Draft(rng, sound_variants)
    if instruction_type in _SINGLE_TYPES:
        kind, modality, (low, high) = _SINGLE_TYPES[instruction_type]
        modality = modality or _pick(rng, _MODALITIES)
        base = _random_scene(rng, low, high)
        base_marker = draft.ref(MediaItem("image", scene=base))
        target, fields = _draw_single_edit(draft, base, kind, modality)
        return draft.finish(instruction_type, _phrase_single(rng, kind, base_marker, fields), target)

    if instruction_type == "multi_edit":
        base = _random_scene(rng)
        base_marker = draft.ref(MediaItem("image", scene=base))
        kinds = [_pick(rng, _MULTI_KINDS), _pick(rng, _MULTI_KINDS)]
        if kinds.count("background") > 1:
            raise _Reject
        # Positions are drawn on the base and must differ, so each clause names an object of the base as the user
        # sees it and the two edits commute.
        target, clauses, used = base, [], set()
        for kind in kinds:
            if kind == "background":
                target, fields = _background_edit(draft, target)
            else:
                slots = base.free_slots if kind == "add" else tuple(o.slot for o in base.objects)
                slots = [s for s in slots if s not in used]
                if not slots:
                    raise _Reject
                slot = _pick(rng, slots)
                used.add(slot)
                edited, fields = _edit(draft, base, kind, slot, _pick(rng, _MODALITIES))
                target = _apply_at(target, edited, slot)
            clauses.append(_pick(rng, _CLAUSES[kind]).format(**fields))
        if target == base:
            raise _Reject
        text = _pick(rng, _wrappers(_MULTI_WRAPPERS, kinds[-1])).format(base=base_marker, e1=clauses[0], e2=clauses[1])
        return draft.finish(instruction_type, text, target)

    if instruction_type == "pick_base":
        scenes = [_random_scene(rng) for _ in range(int(rng.integers(2, 4)))]
        base, others = scenes[0], scenes[1:]
        properties = []
        if all(other.background != base.background for other in others):
            properties.append(f"{article(base.background)} {base.background} background")
        for obj in base.objects:
            if all(all(o.name != obj.name for o in other.objects) for other in others):
                properties.append(f"{article(obj.colour)} {obj.name}")
        if not properties:
            raise _Reject
        draft.ref(MediaItem("image", scene=base))
        for other in others:
            draft.ref(MediaItem("image", scene=other))
        kind = _pick(rng, _PICK_KINDS)
        target, fields = _draw_single_edit(draft, base, kind, "text")
        clause = _pick(rng, _CLAUSES[kind]).format(**fields)
        text = _pick(rng, _PICK_WRAPPERS).format(images=_IMAGES_MARKER, prop=_pick(rng, properties), e=clause)
        return draft.finish(instruction_type, text, target)
    raise ValueError(f"`instruction_type` must be one of {list(INSTRUCTION_TYPES)}, got {instruction_type!r}.")


def sample_instruction(
    instruction_type: str,
    rng: np.random.Generator,
    sound_variants: Sequence[int] = (0,),
    accept: Optional[Callable[[InstructionExample], bool]] = None,
    max_tries: int = 10000,
) -> InstructionExample:
    """Draw a random instruction of one type, with its inputs and target scene.

    Args:
        instruction_type (`str`): one of `INSTRUCTION_TYPES`.
        rng (`np.random.Generator`): the only source of randomness (same state → same example).
        sound_variants (`Sequence[int]`, defaults to ``(0,)``): recordings a sound input may use.
        accept (`Callable[[InstructionExample], bool]`, *optional*): a filter (e.g. held-out combinations); draws
            are repeated until it returns True.
        max_tries (`int`, defaults to 10000): give up after this many draws.

    Returns:
        [`InstructionExample`].

    Raises:
        `ValueError`: unknown type, empty ``sound_variants``, or no acceptable example within ``max_tries``.
    """
    _check_name(instruction_type, INSTRUCTION_TYPES, "instruction_type")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"`rng` must be a numpy Generator, got {type(rng).__name__}.")
    sound_variants = tuple(sound_variants)
    if not sound_variants or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sound_variants):
        raise ValueError(f"`sound_variants` must be a non-empty sequence of non-negative ints, got {sound_variants}.")
    for _ in range(max_tries):
        try:
            example = _draw(instruction_type, rng, sound_variants)
        except _Reject:
            continue
        if accept is None or accept(example):
            return example
    raise ValueError(
        f"No acceptable {instruction_type!r} example in {max_tries} draws; the `accept` filter is too strict."
    )
