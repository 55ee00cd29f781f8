"""ShapesWorld scenes: a background and one to three coloured shapes in fixed position slots.

A scene is fully described by words (:func:`caption`), rendered deterministically to pixels (:func:`render_scene`)
and round-trips through a canonical dict (:meth:`Scene.to_dict` / :meth:`Scene.from_dict`) and through its caption
(:func:`parse_caption`). Objects sit in three slots side by side (left / middle / right), so they never overlap.

Vocabulary names are all distinct across shapes, colours, backgrounds and slots, which lets the held-out
combinations of the data generator be written as plain ``(shape, colour)`` / ``(shape, background)`` pairs.
"""

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Ordered from long to short wavelength; the sound pitch of a colour rises in the same order (see `sounds.py`).
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SLOTS: tuple[str, ...] = ("left", "middle", "right")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "purple": (140, 40, 190),
}
SLOT_PHRASES: dict[str, str] = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Object images ("an image of a red star") show the object alone on this background, which is not one of the scene
# backgrounds, so such an image never looks like a scene.
NEUTRAL_RGB: tuple[int, int, int] = (255, 255, 255)

MAX_OBJECTS = len(SLOTS)
# Rendering is done at this multiple of the output size and box-filtered down: deterministic anti-aliasing.
_SUPERSAMPLE = 4
# Object radius as a fraction of the image width: in a scene (slot width is 1/3) and alone in an object image.
_SCENE_RADIUS = 0.13
_OBJECT_IMAGE_RADIUS = 0.32
# Gray levels of the backgrounds: plain, and the two of every texture.
_PLAIN_LEVEL = 160
_TEXTURE_LEVELS = (120, 200)


def _check_name(value: Any, vocabulary: tuple[str, ...], argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{argument}` must be a string, one of {list(vocabulary)}, got {type(value).__name__}.")
    if value not in vocabulary:
        raise ValueError(f"`{argument}` must be one of {list(vocabulary)}, got {value!r}.")
    return value


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an" before a vowel: "an orange star")."""
    return "an" if word[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Args:
        shape (`str`): one of `SHAPES`.
        colour (`str`): one of `COLOURS`.
        slot (`str`): one of `SLOTS` (``"left"``, ``"middle"``, ``"right"``).
    """

    shape: str
    colour: str
    slot: str

    def __post_init__(self) -> None:
        _check_name(self.shape, SHAPES, "shape")
        _check_name(self.colour, COLOURS, "colour")
        _check_name(self.slot, SLOTS, "slot")

    @property
    def name(self) -> str:
        """The object's kind in words, without article or position: ``"red star"``."""
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        """The object with its position, as in captions: ``"a red star on the left"``."""
        return f"{article(self.colour)} {self.name} {SLOT_PHRASES[self.slot]}"

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "slot": self.slot}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SceneObject":
        """Inverse of `to_dict`; raises `ValueError` on missing or unknown keys."""
        if not isinstance(data, Mapping):
            raise TypeError(f"A scene object must be a mapping, got {type(data).__name__}.")
        if set(data) != {"shape", "colour", "slot"}:
            raise ValueError(f"A scene object needs exactly the keys shape, colour, slot; got {sorted(data)}.")
        return cls(shape=data["shape"], colour=data["colour"], slot=data["slot"])


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene: a background and 1–3 objects in distinct slots.

    Objects are stored sorted by slot (left to right), so two scenes with the same content compare and hash equal
    whatever order their objects were given in.

    Args:
        background (`str`): one of `BACKGROUNDS`.
        objects (iterable of [`SceneObject`]): 1 to 3 objects, each in a different slot.
    """

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        _check_name(self.background, BACKGROUNDS, "background")
        if isinstance(self.objects, (str, bytes)) or not isinstance(self.objects, Iterable):
            raise TypeError(f"`objects` must be an iterable of SceneObject, got {type(self.objects).__name__}.")
        objects = tuple(self.objects)
        for obj in objects:
            if not isinstance(obj, SceneObject):
                raise TypeError(f"`objects` must contain SceneObject instances, got {type(obj).__name__}.")
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"A scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}.")
        slots = [obj.slot for obj in objects]
        if len(set(slots)) != len(slots):
            raise ValueError(f"Objects of a scene must occupy distinct slots, got slots {slots}.")
        # Frozen dataclass: the canonical (sorted) tuple is installed through object.__setattr__.
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: SLOTS.index(o.slot))))

    # --- queries -------------------------------------------------------------------------------------------------
    def object_at(self, slot: str) -> Optional[SceneObject]:
        """The object in ``slot``, or ``None`` when the slot is empty."""
        _check_name(slot, SLOTS, "slot")
        return next((obj for obj in self.objects if obj.slot == slot), None)

    @property
    def free_slots(self) -> tuple[str, ...]:
        """Empty slots, left to right."""
        taken = {obj.slot for obj in self.objects}
        return tuple(slot for slot in SLOTS if slot not in taken)

    def combinations(self) -> frozenset[tuple[str, str]]:
        """The ``(shape, colour)`` and ``(shape, background)`` pairs present in the scene."""
        pairs = set()
        for obj in self.objects:
            pairs.add((obj.shape, obj.colour))
            pairs.add((obj.shape, self.background))
        return frozenset(pairs)

    def slug(self) -> str:
        """A canonical file-name-safe identifier, e.g. ``"striped_left-red-circle_right-blue-star"``."""
        parts = [self.background] + [f"{obj.slot}-{obj.colour}-{obj.shape}" for obj in self.objects]
        return "_".join(parts)

    # --- edits (each returns a new scene; the scene itself is immutable) ------------------------------------------
    def with_object(self, obj: SceneObject) -> "Scene":
        """A copy with ``obj`` added; its slot must be free."""
        if self.object_at(obj.slot) is not None:
            raise ValueError(f"Slot {obj.slot!r} is already occupied in scene {self.slug()!r}.")
        return Scene(self.background, self.objects + (obj,))

    def without_slot(self, slot: str) -> "Scene":
        """A copy with the object in ``slot`` removed."""
        if self.object_at(slot) is None:
            raise ValueError(f"Slot {slot!r} is empty in scene {self.slug()!r}.")
        return Scene(self.background, tuple(obj for obj in self.objects if obj.slot != slot))

    def with_object_at(self, slot: str, shape: str, colour: str) -> "Scene":
        """A copy where the object in ``slot`` (which must exist) becomes a ``colour`` ``shape``."""
        if self.object_at(slot) is None:
            raise ValueError(f"Slot {slot!r} is empty in scene {self.slug()!r}.")
        kept = tuple(obj for obj in self.objects if obj.slot != slot)
        return Scene(self.background, kept + (SceneObject(shape, colour, slot),))

    def with_background(self, background: str) -> "Scene":
        """A copy with another background."""
        return Scene(background, self.objects)

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able form: ``{"background": ..., "objects": [{"shape", "colour", "slot"}, ...]}``."""
        return {"background": self.background, "objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scene":
        """Inverse of `to_dict`."""
        if not isinstance(data, Mapping):
            raise TypeError(f"A scene must be a mapping, got {type(data).__name__}.")
        if set(data) != {"background", "objects"}:
            raise ValueError(f"A scene needs exactly the keys background, objects; got {sorted(data)}.")
        if not isinstance(data["objects"], (list, tuple)):
            raise TypeError(f"`objects` must be a list, got {type(data['objects']).__name__}.")
        return cls(data["background"], tuple(SceneObject.from_dict(obj) for obj in data["objects"]))


# --------------------------------------------------------------------------------------------------------------------
# Attribute labels
# --------------------------------------------------------------------------------------------------------------------
# A scene as classification targets: its background, then each slot's shape and colour (class 0: the slot is empty).
ATTRIBUTE_FIELDS: tuple[str, ...] = ("background",) + tuple(
    f"{slot}_{what}" for slot in SLOTS for what in ("shape", "colour")
)
ATTRIBUTE_CLASSES: tuple[int, ...] = (len(BACKGROUNDS),) + (len(SHAPES) + 1, len(COLOURS) + 1) * len(SLOTS)
# The word each class stands for ("" for an empty slot), so a reader's classes can be matched to caption words.
ATTRIBUTE_CLASS_NAMES: tuple[tuple[str, ...], ...] = (BACKGROUNDS,) + (("",) + SHAPES, ("",) + COLOURS) * len(SLOTS)
IGNORE_LABEL = -100  # torch.nn.functional.cross_entropy's default ignore_index


def attribute_labels(scene: Scene, colours: bool = True) -> list[int]:
    """One class index per entry of `ATTRIBUTE_FIELDS`.

    Args:
        scene ([`Scene`]): the scene.
        colours (`bool`, *optional*, defaults to `True`): `False` for a grayscale render, whose colours cannot be
            read: the colour fields of its objects are `IGNORE_LABEL` (an empty slot stays 0).

    Returns:
        `list[int]`: ``len(ATTRIBUTE_FIELDS)`` labels.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"`scene` must be a Scene, got {type(scene).__name__}.")
    labels = [BACKGROUNDS.index(scene.background)]
    for slot in SLOTS:
        obj = scene.object_at(slot)
        if obj is None:
            labels += [0, 0]
        else:
            labels += [1 + SHAPES.index(obj.shape), 1 + COLOURS.index(obj.colour) if colours else IGNORE_LABEL]
    return labels


# --------------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------------
def caption(scene: Scene) -> str:
    """Describe ``scene`` in words, objects left to right.

    Example: ``"a red circle on the left and a blue star on the right, on a striped background"``. Captions are
    lower case and contain no dots or brackets, so they are their own MM-Inst media keys.

    Args:
        scene ([`Scene`]): the scene.

    Returns:
        `str`: the caption; :func:`parse_caption` inverts it.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"`scene` must be a Scene, got {type(scene).__name__}.")
    return _describe([obj.phrase() for obj in scene.objects], scene.background)


def shape_caption(scene: Scene) -> str:
    """Describe ``scene`` without its colours, as a grayscale image shows it: ``"a circle on the left and a star on
    the right, on a striped background"``.

    Args:
        scene ([`Scene`]): the scene.

    Returns:
        `str`: the caption without colour words.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"`scene` must be a Scene, got {type(scene).__name__}.")
    phrases = [f"{article(obj.shape)} {obj.shape} {SLOT_PHRASES[obj.slot]}" for obj in scene.objects]
    return _describe(phrases, scene.background)


def _describe(phrases: list[str], background: str) -> str:
    """``"<a>, <b> and <c>, on a <background> background"``."""
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objects}, {background_phrase(background)}"


def background_phrase(background: str) -> str:
    """``"on a striped background"``."""
    _check_name(background, BACKGROUNDS, "background")
    return f"on {article(background)} {background} background"


_OBJECT_RE = re.compile(
    r"^an? (?P<colour>{}) (?P<shape>{}) (?P<slot>{})$".format(
        "|".join(COLOURS), "|".join(SHAPES), "|".join(re.escape(p) for p in SLOT_PHRASES.values())
    )
)
_CAPTION_RE = re.compile(r"^(?P<objects>.+), on an? (?P<background>{}) background$".format("|".join(BACKGROUNDS)))
_PHRASE_TO_SLOT = {phrase: slot for slot, phrase in SLOT_PHRASES.items()}


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption`.

    Args:
        text (`str`): a caption produced by :func:`caption`.

    Returns:
        [`Scene`].

    Raises:
        `ValueError`: the text does not follow the caption grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    match = _CAPTION_RE.match(text.strip())
    if match is None:
        raise ValueError(f"Not a ShapesWorld caption (expected '..., on a <background> background'): {text!r}.")
    head, _, last = match["objects"].rpartition(" and ")
    phrases = (head.split(", ") if head else []) + [last]
    objects = []
    for phrase in phrases:
        obj = _OBJECT_RE.match(phrase)
        if obj is None:
            raise ValueError(
                f"Not a ShapesWorld object phrase (expected 'a <colour> <shape> <position>'): {phrase!r}."
            )
        objects.append(SceneObject(obj["shape"], obj["colour"], _PHRASE_TO_SLOT[obj["slot"]]))
    return Scene(match["background"], tuple(objects))


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------
def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"`size` must be an int, got {type(size).__name__}.")
    if size < 16:
        raise ValueError(f"`size` must be at least 16 pixels, got {size}.")
    return size


def background_levels(background: str) -> tuple[int, ...]:
    """The gray levels a background is painted in (every background is gray)."""
    _check_name(background, BACKGROUNDS, "background")
    return (_PLAIN_LEVEL,) if background == "plain" else _TEXTURE_LEVELS


@lru_cache(maxsize=32)
def _background_array(background: str, size: int) -> np.ndarray:
    """The background texture at supersampled resolution, (S, S, 3) uint8, read-only (cached; callers copy it)."""
    full = size * _SUPERSAMPLE
    if background == "plain":
        array = np.full((full, full, 3), _PLAIN_LEVEL, dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:full, 0:full].astype(np.float64) / full  # coordinates in [0, 1)
        if background == "striped":  # diagonal stripes, 8 periods across the image
            mask = np.floor((xx + yy) * 8) % 2 == 1
        elif background == "dotted":  # an 8 x 8 grid of dots
            cx, cy = (np.floor(xx * 8) + 0.5) / 8, (np.floor(yy * 8) + 0.5) / 8
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.22 / 8) ** 2
        elif background == "checkered":  # 6 x 6 squares
            mask = (np.floor(xx * 6) + np.floor(yy * 6)) % 2 == 1
        else:
            raise ValueError(f"Unknown background {background!r}.")
        dark, light = _TEXTURE_LEVELS
        array = np.where(mask[..., None], np.uint8(dark), np.uint8(light)).astype(np.uint8)
        array = np.repeat(array, 3, axis=2)
    array.setflags(write=False)
    return array


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> Optional[list[tuple[float, float]]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ~r; ``None`` for the circle (drawn as ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, moved down a little so it looks centred in its slot like the other shapes.
        return [
            (cx + r * math.cos(math.radians(a)), cy + 0.15 * r - r * math.sin(math.radians(a)))
            for a in (90, 210, 330)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r * 0.9, r * 0.32  # arm half-length, arm half-width
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
            (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
            (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    raise ValueError(f"Unknown shape {shape!r}.")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], cx: float, cy: float, r: float
) -> None:
    polygon = _shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _finish(canvas: Image.Image, size: int) -> Image.Image:
    return canvas.resize((size, size), resample=Image.Resampling.BOX)


def _check_fills(fills: Mapping[str, Any], scene: "Scene") -> dict[str, tuple[int, int, int]]:
    if not isinstance(fills, Mapping):
        raise TypeError(f"`fills` must be a mapping from slot to an RGB triple, got {type(fills).__name__}.")
    occupied = [obj.slot for obj in scene.objects]
    checked = {}
    for slot, rgb in fills.items():
        if slot not in occupied:
            raise ValueError(f"`fills` names slot {slot!r}, which holds no object of the scene (occupied: {occupied}).")
        if (
            not isinstance(rgb, (tuple, list))
            or len(rgb) != 3
            or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in rgb)
        ):
            raise ValueError(f"`fills[{slot!r}]` must be three integers in [0, 255], got {rgb!r}.")
        checked[slot] = tuple(int(v) for v in rgb)
    return checked


def render_scene(
    scene: Scene, size: int = 64, fills: Optional[Mapping[str, tuple[int, int, int]]] = None
) -> Image.Image:
    """Render ``scene`` as an RGB image (deterministic; anti-aliased by supersampling and box filtering).

    Args:
        scene ([`Scene`]): the scene.
        size (`int`, defaults to 64): width and height in pixels (at least 16).
        fills (`Mapping[str, tuple[int, int, int]]`, *optional*): an RGB fill per slot that replaces the colour of
            the object there (e.g. gray levels for colour-free training renders); other objects keep their colours.

    Returns:
        `PIL.Image.Image`: an RGB ``size``×``size`` image.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"`scene` must be a Scene, got {type(scene).__name__}.")
    size = _check_size(size)
    fills = {} if fills is None else _check_fills(fills, scene)
    full = size * _SUPERSAMPLE
    canvas = Image.fromarray(np.array(_background_array(scene.background, size)), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx = (SLOTS.index(obj.slot) + 0.5) * full / len(SLOTS)
        fill = fills.get(obj.slot, COLOUR_RGB[obj.colour])
        _draw_shape(draw, obj.shape, fill, cx, full / 2, _SCENE_RADIUS * full)
    return _finish(canvas, size)


def render_object(shape: str, colour: str, size: int = 64) -> Image.Image:
    """Render one object, centred and large, on the neutral (white) background: the image of "a red star".

    Args:
        shape (`str`): one of `SHAPES`.
        colour (`str`): one of `COLOURS`.
        size (`int`, defaults to 64): width and height in pixels (at least 16).

    Returns:
        `PIL.Image.Image`: an RGB ``size``×``size`` image.
    """
    _check_name(shape, SHAPES, "shape")
    _check_name(colour, COLOURS, "colour")
    size = _check_size(size)
    full = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (full, full), NEUTRAL_RGB)
    _draw_shape(ImageDraw.Draw(canvas), shape, COLOUR_RGB[colour], full / 2, full / 2, _OBJECT_IMAGE_RADIUS * full)
    return _finish(canvas, size)


def object_image_caption(shape: str, colour: str) -> str:
    """Caption of the object image from :func:`render_object`: ``"an image of a red star"``."""
    _check_name(shape, SHAPES, "shape")
    _check_name(colour, COLOURS, "colour")
    return f"an image of {article(colour)} {colour} {shape}"
