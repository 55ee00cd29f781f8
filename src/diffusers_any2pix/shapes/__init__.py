"""ShapesWorld: a small synthetic multimodal world (scenes, object sounds, editing instructions with known answers).

It is the data source of the embedded default model: `generate.py` writes an MM-Inst-format instruction dataset
whose every example has a known target scene, so edits can be scored exactly.
"""

from .instructions import INSTRUCTION_TYPES, InstructionExample, MediaItem, sample_instruction
from .sounds import COLOUR_PITCH_HZ, SHAPE_TIMBRE, sound_caption, synthesize_sound, write_sound
from .world import (
    ATTRIBUTE_CLASS_NAMES,
    ATTRIBUTE_CLASSES,
    ATTRIBUTE_FIELDS,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SLOTS,
    Scene,
    SceneObject,
    attribute_labels,
    background_levels,
    caption,
    object_image_caption,
    parse_caption,
    render_object,
    render_scene,
    shape_caption,
)


# `generate` is loaded lazily so that `python -m diffusers_any2pix.shapes.generate` does not import it twice.
_GENERATE_NAMES = (
    "FEATURE_KEY",
    "HELDOUT_COMBINATIONS",
    "HELDOUT_SHAPE_BACKGROUND",
    "HELDOUT_SHAPE_COLOUR",
    "SPLITS",
    "GenerationSummary",
    "feature_path",
    "generate_dataset",
    "media_key",
)


def __getattr__(name: str):
    if name in _GENERATE_NAMES:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTRIBUTE_CLASS_NAMES",
    "ATTRIBUTE_CLASSES",
    "ATTRIBUTE_FIELDS",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_PITCH_HZ",
    "FEATURE_KEY",
    "HELDOUT_COMBINATIONS",
    "HELDOUT_SHAPE_BACKGROUND",
    "HELDOUT_SHAPE_COLOUR",
    "INSTRUCTION_TYPES",
    "SHAPES",
    "SHAPE_TIMBRE",
    "SLOTS",
    "SPLITS",
    "GenerationSummary",
    "InstructionExample",
    "MediaItem",
    "Scene",
    "SceneObject",
    "attribute_labels",
    "background_levels",
    "caption",
    "feature_path",
    "generate_dataset",
    "media_key",
    "object_image_caption",
    "parse_caption",
    "render_object",
    "render_scene",
    "sample_instruction",
    "shape_caption",
    "sound_caption",
    "synthesize_sound",
    "write_sound",
]
