"""ShapesWorld: scenes, sounds, instructions and the dataset generator (numpy / PIL / soundfile only)."""

import json
import os
import re

import numpy as np
import pytest
import soundfile
from PIL import Image

from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.shapes import (
    ATTRIBUTE_CLASSES,
    ATTRIBUTE_FIELDS,
    BACKGROUNDS,
    COLOUR_PITCH_HZ,
    COLOURS,
    INSTRUCTION_TYPES,
    SHAPES,
    SLOTS,
    InstructionExample,
    MediaItem,
    Scene,
    SceneObject,
    attribute_labels,
    background_levels,
    caption,
    parse_caption,
    render_object,
    render_scene,
    sample_instruction,
    shape_caption,
    synthesize_sound,
    write_sound,
)
from diffusers_any2pix.shapes.generate import (
    HELDOUT_COMBINATIONS,
    SPLITS,
    feature_path,
    generate_dataset,
    main,
    media_key,
)
from diffusers_any2pix.shapes.world import COLOUR_RGB, SLOT_PHRASES, _background_array


_STAR_LEFT = Scene("plain", [SceneObject("star", "red", "left")])


def _random_scenes(count, seed=0):
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        slots = rng.choice(len(SLOTS), size=int(rng.integers(1, 4)), replace=False)
        objects = [SceneObject(SHAPES[rng.integers(5)], COLOURS[rng.integers(6)], SLOTS[s]) for s in slots]
        scenes.append(Scene(BACKGROUNDS[rng.integers(4)], objects))
    return scenes


# ---------------------------------------------------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------------------------------------------------
def test_scene_is_canonical_and_round_trips():
    a = Scene("striped", [SceneObject("star", "blue", "right"), SceneObject("circle", "red", "left")])
    b = Scene("striped", (SceneObject("circle", "red", "left"), SceneObject("star", "blue", "right")))
    assert a == b and hash(a) == hash(b)
    assert [o.slot for o in a.objects] == ["left", "right"]
    assert caption(a) == "a red circle on the left and a blue star on the right, on a striped background"
    three = Scene("plain", [SceneObject("cross", "orange", s) for s in SLOTS])
    assert caption(three) == (
        "an orange cross on the left, an orange cross in the middle and an orange cross on the right, "
        "on a plain background"
    )
    for scene in _random_scenes(200):
        assert parse_caption(caption(scene)) == scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert a != a.with_background("dotted")
    assert shape_caption(a) == "a circle on the left and a star on the right, on a striped background"
    assert shape_caption(three).startswith("a cross on the left, a cross in the middle and a cross on the right")


def test_attribute_labels_follow_fields():
    scene = Scene("dotted", [SceneObject("star", "blue", "right")])
    labels = attribute_labels(scene)
    assert len(labels) == len(ATTRIBUTE_FIELDS) == len(ATTRIBUTE_CLASSES) == 7
    # dotted = 2; left and middle empty (0, 0); star = 1 + 3, blue = 1 + 4.
    assert labels == [2, 0, 0, 0, 0, 4, 5]
    assert all(0 <= label < n for label, n in zip(labels, ATTRIBUTE_CLASSES))
    # A grayscale render hides the object's colour, not the emptiness of a slot.
    assert attribute_labels(scene, colours=False) == [2, 0, 0, 0, 0, 4, -100]


def test_scene_edits_return_new_scenes():
    scene = Scene("dotted", [SceneObject("circle", "red", "left")])
    added = scene.with_object(SceneObject("star", "blue", "middle"))
    assert len(scene.objects) == 1 and len(added.objects) == 2  # the original is untouched
    assert added.without_slot("left") == Scene("dotted", [SceneObject("star", "blue", "middle")])
    assert added.with_object_at("left", "square", "green").object_at("left") == SceneObject("square", "green", "left")
    assert added.free_slots == ("right",)
    with pytest.raises(ValueError, match="already occupied"):
        scene.with_object(SceneObject("star", "blue", "left"))
    with pytest.raises(ValueError, match="is empty"):
        scene.with_object_at("right", "star", "red")


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Scene("plain", []), ValueError, "1 to 3 objects"),
        (lambda: Scene("plain", [SceneObject("star", "red", "left")] * 2), ValueError, "distinct slots"),
        (lambda: Scene("marble", [SceneObject("star", "red", "left")]), ValueError, "`background` must be one of"),
        (lambda: SceneObject("hexagon", "red", "left"), ValueError, "`shape` must be one of"),
        (lambda: SceneObject("star", "pink", "left"), ValueError, "`colour` must be one of"),
        (lambda: SceneObject("star", "red", "top"), ValueError, "`slot` must be one of"),
        (lambda: SceneObject("star", 3, "left"), TypeError, "`colour` must be a string"),
        (lambda: Scene("plain", ["a red star"]), TypeError, "SceneObject instances"),
        (lambda: Scene.from_dict({"background": "plain"}), ValueError, "exactly the keys"),
        (lambda: SceneObject.from_dict({"shape": "star", "colour": "red"}), ValueError, "exactly the keys"),
        (lambda: parse_caption("a red star on the left"), ValueError, "Not a ShapesWorld caption"),
        (lambda: parse_caption("a red blob on the left, on a plain background"), ValueError, "object phrase"),
        (lambda: render_scene(_random_scenes(1)[0], size=8), ValueError, "at least 16"),
        (lambda: render_scene("a red star"), TypeError, "`scene` must be a Scene"),
        (lambda: shape_caption("a red star"), TypeError, "`scene` must be a Scene"),
        (lambda: attribute_labels("a red star"), TypeError, "`scene` must be a Scene"),
        (lambda: render_scene(_random_scenes(1)[0], fills=[(1, 2, 3)]), TypeError, "`fills` must be a mapping"),
        (lambda: render_scene(_STAR_LEFT, fills={"right": (1, 2, 3)}), ValueError, "holds no object"),
        (lambda: render_scene(_STAR_LEFT, fills={"left": (1, 2)}), ValueError, r"`fills\['left'\]` must be three"),
        (lambda: render_scene(_STAR_LEFT, fills={"left": (0, 0, 256)}), ValueError, "integers in \\[0, 255\\]"),
        (lambda: background_levels("marble"), ValueError, "`background` must be one of"),
    ],
)
def test_world_rejects_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_rendering_is_deterministic_and_shows_the_scene():
    scene = Scene("striped", [SceneObject(s, c, slot) for s, c, slot in zip(SHAPES, COLOURS, SLOTS)])
    first, second = render_scene(scene), render_scene(scene)
    assert first.mode == "RGB" and first.size == (64, 64)
    assert first.tobytes() == second.tobytes()
    assert render_scene(scene, size=96).size == (96, 96)
    assert render_scene(scene.with_background("dotted")).tobytes() != first.tobytes()
    # Every shape covers its slot centre with exactly its colour; an empty slot shows the background there.
    for shape in SHAPES:
        for colour in COLOURS:
            for slot in SLOTS:
                pixels = np.asarray(render_scene(Scene("plain", [SceneObject(shape, colour, slot)])))
                x = int((SLOTS.index(slot) + 0.5) * 64 / 3)
                assert tuple(pixels[32, x]) == COLOUR_RGB[colour], (shape, colour, slot)
    empty_middle = np.asarray(render_scene(Scene("plain", [SceneObject("star", "red", "left")])))
    assert tuple(empty_middle[32, 32]) == (160, 160, 160)
    obj = np.asarray(render_object("star", "green"))
    assert tuple(obj[0, 0]) == (255, 255, 255) and tuple(obj[32, 32]) == COLOUR_RGB["green"]
    # The background texture is rendered once per (background, size) and reused.
    before = _background_array.cache_info().hits
    render_scene(scene)
    assert _background_array.cache_info().hits == before + 1


def test_fills_repaint_only_the_named_objects():
    scene = Scene("checkered", [SceneObject("star", "red", "left"), SceneObject("circle", "blue", "right")])
    pixels = np.asarray(render_scene(scene, fills={"left": (90, 90, 90)}))
    assert tuple(pixels[32, 10]) == (90, 90, 90) and tuple(pixels[32, 53]) == COLOUR_RGB["blue"]
    # Outside the repainted object nothing changes.
    plain = np.asarray(render_scene(scene))
    assert np.array_equal(pixels[:, 22:], plain[:, 22:])
    assert background_levels("plain") == (160,) and background_levels("dotted") == (120, 200)
    assert tuple(plain[32, 32]) in {(v, v, v) for v in background_levels("checkered")}


# ---------------------------------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------------------------------
def _classify_sound(waveform, sample_rate=16000):
    """Read (shape, colour) back from a clip: pitch from the spectral peak, timbre from simple spectral features."""
    frame, hop = 1024, 256
    count = (len(waveform) - frame) // hop
    frames = np.stack([waveform[i * hop : i * hop + frame] for i in range(count)]) * np.hanning(frame)
    magnitude = np.abs(np.fft.rfft(frames, axis=1))
    freqs = np.fft.rfftfreq(frame, 1 / sample_rate)
    spectrum = magnitude.mean(0)
    peak = freqs[spectrum.argmax()]
    colour = min(COLOURS, key=lambda c: abs(np.log2(peak / COLOUR_PITCH_HZ[c])))
    energy = (magnitude**2).sum(1)
    loud = energy > 0.5 * energy.max()
    peak_track_semitones = 12 * np.log2(freqs[magnitude.argmax(1)][loud])

    def level(f):
        return spectrum[np.abs(freqs - f) < 0.04 * f].max()

    if energy.std() / energy.mean() > 0.5:  # gated bursts
        shape = "cross"
    elif peak_track_semitones.std() > 0.3:  # the pitch moves
        shape = "star"
    elif level(2 * peak) / level(peak) > 0.2:  # even harmonics: sawtooth
        shape = "triangle"
    elif level(3 * peak) / level(peak) > 0.15:  # odd harmonics only: square wave
        shape = "square"
    else:
        shape = "circle"
    return shape, colour


def test_sounds_determine_their_class():
    for shape in SHAPES:
        for colour in COLOURS:
            clips = [synthesize_sound(shape, colour, rng=seed) for seed in (None, 1, 2)]
            for clip in clips:
                assert clip.dtype == np.float32 and clip.shape == (32000,)
                assert 0.5 < np.abs(clip).max() <= 0.9
                assert _classify_sound(clip) == (shape, colour)
            assert not np.array_equal(clips[1], clips[2])  # jitter makes recordings differ, not classes


def test_sound_is_reproducible_and_writable(tmp_path):
    a = synthesize_sound("star", "blue", sample_rate=8000, duration=0.5, rng=np.random.default_rng(7))
    b = synthesize_sound("star", "blue", sample_rate=8000, duration=0.5, rng=np.random.default_rng(7))
    assert a.shape == (4000,) and np.array_equal(a, b)
    assert np.array_equal(synthesize_sound("cross", "red"), synthesize_sound("cross", "red"))
    for name in ("clip.wav", "clip.flac"):
        write_sound(str(tmp_path / name), a, 8000)
        data, rate = soundfile.read(str(tmp_path / name), dtype="float32")
        assert rate == 8000 and np.abs(data - a).max() < 1e-4
    with pytest.raises(ValueError, match="1-D"):
        write_sound(str(tmp_path / "x.wav"), np.zeros((2, 10)), 8000)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"shape": "blob"}, ValueError, "`shape` must be one of"),
        ({"sample_rate": 1000}, ValueError, "at least 4000"),
        ({"sample_rate": 16000.0}, TypeError, "`sample_rate` must be an int"),
        ({"duration": 0.0}, ValueError, r"`duration` must be a number of seconds in \[0.25, 60\]"),
        ({"rng": "seed"}, TypeError, "`rng` must be a numpy Generator"),
    ],
)
def test_sound_rejects_bad_input(kwargs, error, match):
    arguments = {"shape": "circle", "colour": "red", **kwargs}
    with pytest.raises(error, match=match):
        synthesize_sound(**arguments)


# ---------------------------------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------------------------------
def test_sample_instruction_is_deterministic_and_checked():
    for instruction_type in INSTRUCTION_TYPES:
        a = sample_instruction(instruction_type, np.random.default_rng([5, 1]), (0, 1))
        b = sample_instruction(instruction_type, np.random.default_rng([5, 1]), (0, 1))
        assert a == b and a.type == instruction_type
    with pytest.raises(ValueError, match="`instruction_type` must be one of"):
        sample_instruction("rotate", np.random.default_rng(0))
    with pytest.raises(ValueError, match="`sound_variants` must be a non-empty"):
        sample_instruction("add_audio", np.random.default_rng(0), ())
    with pytest.raises(TypeError, match="`rng` must be a numpy Generator"):
        sample_instruction("remove", 0)
    with pytest.raises(ValueError, match="too strict"):
        sample_instruction("remove", np.random.default_rng(0), accept=lambda example: False, max_tries=5)


def test_instruction_example_validates_placeholders():
    base = Scene("plain", [SceneObject("star", "red", "left")])
    target = base.with_object(SceneObject("circle", "blue", "right"))
    sound = MediaItem("audio", shape="circle", colour="blue", variant=0)
    inputs = (MediaItem("image", scene=base), sound)
    added = (("blue circle", 1),)
    example = InstructionExample("add_audio", "add [audio1] to [image1] on the right", inputs, 0, target, added)
    assert example.official_instruction() == (
        f"add [the sound of a blue circle, variant 0] to [{caption(base)}] on the right"
    )
    assert example.official_fields()["added"] == [["blue circle", "[the sound of a blue circle, variant 0]"]]
    with pytest.raises(ValueError, match="Placeholders of the instruction"):
        InstructionExample("add_audio", "add [audio2] to [image1]", inputs, 0, target)
    with pytest.raises(ValueError, match="images before audio"):
        InstructionExample("add_audio", "add [audio1] to [image1]", (sound, MediaItem("image", scene=base)), 1, target)
    with pytest.raises(ValueError, match="changes nothing"):
        InstructionExample("remove", "edit [image1]", (MediaItem("image", scene=base),), 0, base)
    with pytest.raises(ValueError, match="`base_index` 1 must point at a scene image"):
        InstructionExample("add_audio", "add [audio1] to [image1]", inputs, 1, target)
    with pytest.raises(ValueError, match="non-negative int `variant`"):
        MediaItem("audio", shape="circle", colour="blue")


# ---------------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------------
NUM_EXAMPLES = 60


def _generate(out, seed):
    assert main(["--out", str(out), "--num_examples", str(NUM_EXAMPLES), "--seed", str(seed), "--no_progress"]) == 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    _generate(root, seed=0)
    records = {split: json.loads((root / split / "instruction.json").read_text()) for split in SPLITS}
    return root, records


def _files(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_generate_writes_the_documented_layout(dataset):
    root, records = dataset
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["split_sizes"] == {"train": 48, "val": 6, "test": 6}
    assert {split: len(r) for split, r in records.items()} == info["split_sizes"]
    official = {"task", "base", "result", "conversations"}
    ours = {"id", "type", "instruction", "media", "base_index", "base_scene", "target_scene", "target_image"}
    for split in SPLITS:
        media_map = json.loads((root / split / "media.json").read_text())
        scene_list = json.loads((root / split / "scenes.json").read_text())
        scene_paths = {entry["path"] for entry in scene_list}
        for record in records[split]:
            assert official | ours <= set(record)
            assert record["task"] == "any2any"
            assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
            base = record["media"][record["base_index"]]
            assert base["kind"] == "image" and base["scene"] == record["base_scene"]
            assert record["base"] == f"[{base['caption']}]"
            assert record["result"] == caption(Scene.from_dict(record["target_scene"]))
            answer = f"Sure. <base>[{base['caption']}]<im_gen>[{record['result']}]"
            assert record["conversations"][1]["value"] == answer
            # Every bracketed caption of the official instruction, and the result, resolves through media.json.
            human = record["conversations"][0]["value"]
            bracketed = re.findall(r"\[([^\]]+)\]", human)
            assert bracketed == [record["media"][_media_index(record, p)]["caption"] for p in _placeholders(record)]
            for text, path in [(m["caption"], m["path"]) for m in record["media"]] + [
                (record["result"], record["target_image"])
            ]:
                entry = media_map[media_key(text)]
                assert entry == {"fpath": feature_path(path), "key": "clip", "media_path": path}
                assert entry["fpath"] == f"features/{path}.npz"
                assert (root / path).is_file()
            for name, item in record.get("added", []):
                assert item[1:-1] in bracketed and name in item
            assert record["target_image"] in scene_paths
            target = Image.open(root / record["target_image"])
            assert target.size == (64, 64)
            assert target.tobytes() == render_scene(Scene.from_dict(record["target_scene"])).tobytes()
        for key in media_map:
            assert key == key.lower().strip() and "." not in key
    sound_paths = {m["path"] for r in sum(records.values(), []) for m in r["media"] if m["kind"] == "audio"}
    assert sound_paths
    for path in sound_paths:
        data, rate = soundfile.read(str(root / path))
        assert rate == 16000 and data.shape == (32000,)


def _placeholders(record):
    return re.findall(r"\[(?:image|audio)\d+\]", record["instruction"])


def _media_index(record, placeholder):
    kind, number = re.fullmatch(r"\[(image|audio)(\d+)\]", placeholder).groups()
    num_images = sum(m["kind"] == "image" for m in record["media"])
    return int(number) - 1 + (num_images if kind == "audio" else 0)


def test_placeholders_match_media(dataset):
    _, records = dataset
    for record in sum(records.values(), []):
        media = record["media"]
        kinds = [m["kind"] for m in media]
        assert kinds == sorted(kinds, key=["image", "audio"].index)  # images first, then audio
        num_images = kinds.count("image")
        placeholders = _placeholders(record)
        expected = [f"[image{i + 1}]" for i in range(num_images)]
        expected += [f"[audio{i + 1}]" for i in range(len(media) - num_images)]
        assert sorted(placeholders) == sorted(expected)  # each input exactly once
        parsed = parse_instruction(record["instruction"], num_images, len(media) - num_images)  # the pipeline's parser
        assert len(parsed.references) == len(media)
        for placeholder in placeholders:
            assert media[_media_index(record, placeholder)]["kind"] == placeholder[1:6]


def test_every_type_appears_and_targets_follow_the_instruction(dataset):
    _, records = dataset
    all_records = sum(records.values(), [])
    assert {r["type"] for r in records["train"]} == set(INSTRUCTION_TYPES)
    assert {r["base_index"] for r in all_records} >= {0, 1}  # the base is not always [image1]
    for record in all_records:
        base, target = Scene.from_dict(record["base_scene"]), Scene.from_dict(record["target_scene"])
        before = {o.slot: o for o in base.objects}
        after = {o.slot: o for o in target.objects}
        changed = {s for s in SLOTS if before.get(s) != after.get(s)}
        brought = [(m["object"]["shape"], m["object"]["colour"]) for m in record["media"] if "object" in m]
        kind = record["type"]
        text = record["instruction"]
        if kind.startswith("add"):
            assert target.background == base.background and len(target.objects) == len(base.objects) + 1
            (slot,) = changed
            new = after[slot]
            assert slot not in before and SLOT_PHRASES[slot] in text
            if kind == "add_text":
                assert f"{new.colour} {new.shape}" in text and not brought
            else:
                assert brought == [(new.shape, new.colour)]
                assert {m["kind"] for m in record["media"] if "object" in m} == {kind[4:]}
        elif kind == "remove":
            assert len(changed) == 1 and len(target.objects) == len(base.objects) - 1
            (slot,) = changed
            assert slot not in after and before[slot].name in text
        elif kind == "recolour":
            (slot,) = changed
            assert after[slot].shape == before[slot].shape and after[slot].colour != before[slot].colour
            assert before[slot].name in text and after[slot].colour in text
        elif kind == "replace":
            (slot,) = changed
            assert after[slot].shape != before[slot].shape
            assert brought in ([], [(after[slot].shape, after[slot].colour)])
        elif kind == "background":
            assert base.objects == target.objects and base.background != target.background
            (reference,) = [m for i, m in enumerate(record["media"]) if i != record["base_index"]]
            assert reference["scene"]["background"] == target.background
        elif kind == "multi_edit":
            extra = int(base.background != target.background)
            assert 1 <= len(changed) + extra <= 2 and base != target
        elif kind == "pick_base":
            scenes = [m for m in record["media"] if "scene" in m]
            assert len(scenes) == len(record["media"]) >= 2
            assert len(changed) == 1 and base.background == target.background


def test_heldout_combinations_only_in_test(dataset):
    root, records = dataset
    for split in ("train", "val"):
        for record in records[split]:
            pairs = set(Scene.from_dict(record["target_scene"]).combinations())
            for item in record["media"]:
                if "scene" in item:
                    pairs |= Scene.from_dict(item["scene"]).combinations()
                else:
                    pairs.add((item["object"]["shape"], item["object"]["colour"]))
            assert not pairs & HELDOUT_COMBINATIONS, record["id"]
        for entry in json.loads((root / split / "scenes.json").read_text()):
            assert not Scene.from_dict(entry["scene"]).combinations() & HELDOUT_COMBINATIONS
        for key in json.loads((root / split / "media.json").read_text()):
            assert not any(f"{colour} {shape}" in key for shape, colour in HELDOUT_COMBINATIONS if colour in COLOURS)
    assert records["test"]
    for record in records["test"]:
        assert Scene.from_dict(record["target_scene"]).combinations() & HELDOUT_COMBINATIONS


def test_generation_is_byte_deterministic(dataset, tmp_path, capsys):
    root, _ = dataset
    _generate(tmp_path / "same", seed=0)
    assert "ShapesWorld dataset written to" in capsys.readouterr().out
    assert _files(tmp_path / "same") == _files(root)
    _generate(tmp_path / "other", seed=1)
    for split in SPLITS:
        other = (tmp_path / "other" / split / "instruction.json").read_bytes()
        assert other != (root / split / "instruction.json").read_bytes()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_cli_rejects_bad_num_examples(tmp_path, capsys, count):
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path / "data"), "--num_examples", count])
    assert error.value.code == 2
    assert f"`num_examples` must be an integer >= 1, got {count}" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing written before the arguments are checked


def test_cli_rejects_unwritable_or_occupied_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit):
        main(["--out", str(blocker), "--num_examples", "3"])
    assert "exists and is not a directory" in capsys.readouterr().err
    # A path below a regular file cannot be created (even as root, unlike a chmod-protected folder).
    with pytest.raises(SystemExit):
        main(["--out", str(blocker / "data"), "--num_examples", "3"])
    assert "Cannot write the dataset to `out_dir`" in capsys.readouterr().err
    with pytest.raises(OSError, match="Cannot write the dataset"):
        generate_dataset(blocker / "data", 3, progress=False)

    out = tmp_path / "data"
    generate_dataset(out, 3, progress=False)
    with pytest.raises(ValueError, match="already holds a generated dataset"):
        generate_dataset(out, 3, progress=False)
    (out / "features").mkdir()  # stale features go with the dataset they were computed from
    (out / "notes.txt").write_text("kept")
    generate_dataset(out, 2, seed=4, overwrite=True, progress=False)
    assert not (out / "features").exists() and (out / "notes.txt").read_text() == "kept"
    assert len(json.loads((out / "train" / "instruction.json").read_text())) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"image_size": 8}, "`image_size` must be an integer >= 16"),
        ({"val_fraction": 1.5}, r"`val_fraction` must be a number in \[0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave no training example"),
        ({"sound_variants": 0}, "`sound_variants` must be an integer >= 1"),
        ({"sound_duration": -1.0}, "`duration` must be a number of seconds"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path / "data", 10, progress=False, **kwargs)
    assert not (tmp_path / "data").exists()
