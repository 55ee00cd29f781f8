"""Parsing of multimodal instructions such as ``"add [audio1] to [image1]"``.

Placeholders ``[imageN]`` / ``[audioN]`` (1-based, the official demo's syntax) index into the ``images=`` and
``audio=`` arguments of the pipeline. Every placeholder must resolve to an input, every input must be referenced,
and each placeholder may appear once — anything else is a `ValueError` raised before any model runs.
"""

import re
from dataclasses import dataclass


PLACEHOLDER_PATTERN = re.compile(r"\[(image|audio)(\d+)\]")
# Things that look like an attempt at a placeholder but are not one (``[img1]``, ``[Image 1]``, ``[audio]``).
_NEAR_MISS_PATTERN = re.compile(r"\[\s*(img|image|pic|picture|photo|audio|sound|wav)\s*\d*\s*\]", re.IGNORECASE)
MEDIA_TOKEN = "<video>"


@dataclass(frozen=True)
class MediaReference:
    """One placeholder of an instruction: ``kind`` is ``"image"`` or ``"audio"``, ``index`` is 0-based."""

    kind: str
    index: int

    @property
    def placeholder(self) -> str:
        return f"[{self.kind}{self.index + 1}]"


@dataclass(frozen=True)
class ParsedInstruction:
    """An instruction with its placeholders resolved.

    Attributes:
        text (`str`): the instruction as the user wrote it.
        llm_text (`str`): the instruction with every placeholder replaced by the LLM's media token ``<video>``.
        references (`tuple[MediaReference, ...]`): the placeholders in order of appearance; the i-th ``<video>`` of
            ``llm_text`` carries the embedding of ``references[i]``.
    """

    text: str
    llm_text: str
    references: tuple[MediaReference, ...]

    @property
    def words(self) -> str:
        """The instruction's words alone: every placeholder removed, whitespace collapsed."""
        return " ".join(PLACEHOLDER_PATTERN.sub(" ", self.text).split())

    @property
    def image_references(self) -> tuple[MediaReference, ...]:
        return tuple(ref for ref in self.references if ref.kind == "image")

    @property
    def image_positions(self) -> tuple[int, ...]:
        """Positions (order of appearance) of the image placeholders, aligned with `image_references`."""
        return tuple(pos for pos, ref in enumerate(self.references) if ref.kind == "image")

    def position_of(self, kind: str, index: int) -> int:
        """Position (order of appearance) of the placeholder of input ``index`` of ``kind``."""
        return self.references.index(MediaReference(kind, index))


def parse_instruction(
    instruction: str, num_images: int, num_audio: int, argument_name: str = "instruction"
) -> ParsedInstruction:
    """Resolve the placeholders of ``instruction`` against the number of given images and audio clips.

    Args:
        instruction (`str`): e.g. ``"add [audio1] to [image1]"``.
        num_images (`int`): how many images were passed (``images=``).
        num_audio (`int`): how many audio clips were passed (``audio=``).
        argument_name (`str`): name used in error messages (``"instruction[2]"`` for batches).

    Returns:
        [`ParsedInstruction`].

    Raises:
        `TypeError`: ``instruction`` is not a string.
        `ValueError`: an empty instruction, a 0 index (``[image0]``), a placeholder without its input, a duplicate
            placeholder, an input never referenced, a malformed placeholder, or the raw media token in the text.
    """
    if not isinstance(instruction, str):
        raise TypeError(f"`{argument_name}` must be a string, got {type(instruction).__name__}.")
    if not instruction.strip():
        raise ValueError(f"`{argument_name}` is empty.")
    if MEDIA_TOKEN in instruction:
        raise ValueError(
            f"`{argument_name}` contains the raw media token {MEDIA_TOKEN!r}; reference inputs with placeholders "
            "such as [image1] or [audio1] instead."
        )

    references: list[MediaReference] = []
    counts = {"image": num_images, "audio": num_audio}
    arguments = {"image": "images", "audio": "audio"}
    for match in PLACEHOLDER_PATTERN.finditer(instruction):
        kind, number = match.group(1), int(match.group(2))
        if number == 0:
            raise ValueError(
                f"`{argument_name}` uses [{kind}0]; placeholders are 1-based: the first input is [{kind}1]."
            )
        ref = MediaReference(kind, number - 1)
        if ref in references:
            raise ValueError(
                f"`{argument_name}` references {ref.placeholder} more than once; each input may appear once."
            )
        if ref.index >= counts[kind]:
            raise ValueError(
                f"`{argument_name}` references {ref.placeholder} but only {counts[kind]} "
                f"{kind}{'s' if counts[kind] != 1 else ''} {'were' if counts[kind] != 1 else 'was'} passed in "
                f"`{arguments[kind]}=`."
            )
        references.append(ref)

    remainder = PLACEHOLDER_PATTERN.sub("", instruction)
    near_miss = _NEAR_MISS_PATTERN.search(remainder)
    if near_miss is not None:
        raise ValueError(
            f"`{argument_name}` contains {near_miss.group(0)!r}, which is not a placeholder; write [image1], [image2], "
            "… or [audio1], [audio2], … (lower case, 1-based, no spaces)."
        )

    for kind, count in counts.items():
        used = {ref.index for ref in references if ref.kind == kind}
        unused = [i for i in range(count) if i not in used]
        if unused:
            names = ", ".join(f"{arguments[kind]}[{i}] ([{kind}{i + 1}])" for i in unused)
            raise ValueError(
                f"`{argument_name}` never references {names}; every input must appear in the instruction."
            )

    llm_text = PLACEHOLDER_PATTERN.sub(MEDIA_TOKEN, instruction)
    return ParsedInstruction(text=instruction, llm_text=llm_text, references=tuple(references))
