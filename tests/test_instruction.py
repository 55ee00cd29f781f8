import pytest

from diffusers_any2pix.instruction import MediaReference, parse_instruction


def test_placeholders_resolve_in_order_of_appearance():
    parsed = parse_instruction("add [audio1] to [image2] in the style of [image1]", num_images=2, num_audio=1)
    assert parsed.references == (
        MediaReference("audio", 0),
        MediaReference("image", 1),
        MediaReference("image", 0),
    )
    assert parsed.llm_text == "add <video> to <video> in the style of <video>"
    assert parsed.image_references == (MediaReference("image", 1), MediaReference("image", 0))
    assert parsed.position_of("image", 0) == 2
    assert parsed.image_positions == (1, 2)
    assert parsed.words == "add to in the style of"


def test_words_drop_placeholders_and_collapse_whitespace():
    parsed = parse_instruction("  of [image1], [image2]\tand [image3], edit the one with a red circle ", 3, 0)
    assert parsed.words == "of , and , edit the one with a red circle"
    assert parse_instruction("[image1]", 1, 0).words == ""
    assert parse_instruction("[image1]", 1, 0).text == "[image1]"  # the instruction itself is kept


@pytest.mark.parametrize(
    "text, images, audio, match",
    [
        ("add [audio1] to [image1]", 1, 0, r"\[audio1\] but only 0 audios were passed in `audio=`"),
        ("edit [image2]", 1, 0, r"\[image2\] but only 1 image was passed"),
        ("edit [image0]", 1, 0, r"1-based"),
        ("mix [image1] and [image1]", 1, 0, r"\[image1\] more than once"),
        ("edit [image1]", 2, 0, r"never references images\[1\] \(\[image2\]\)"),
        ("edit [image1]", 1, 1, r"never references audio\[0\] \(\[audio1\]\)"),
        ("edit [Image 1]", 1, 0, r"'\[Image 1\]', which is not a placeholder"),
        ("edit [img1]", 0, 0, r"not a placeholder"),
        ("   ", 0, 0, r"is empty"),
        ("edit <video>", 0, 0, r"raw media token"),
    ],
)
def test_bad_instructions(text, images, audio, match):
    with pytest.raises(ValueError, match=match):
        parse_instruction(text, num_images=images, num_audio=audio)


def test_non_string_instruction():
    with pytest.raises(TypeError, match="`instruction` must be a string"):
        parse_instruction(3, 0, 0)


def test_argument_name_in_errors():
    with pytest.raises(ValueError, match=r"`instruction\[1\]` references \[image1\]"):
        parse_instruction("edit [image1]", 0, 0, argument_name="instruction[1]")
