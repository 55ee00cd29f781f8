"""training/train_imagebind.py: the ShapesWorld tokenizer, ImageBind's contrastive loss, the data sources, a few
training steps with saving, reloading, retrieval and exact resumption (tiny ImageBind, CPU)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads
from diffusers_any2pix.processing_imagebind import ImageBindProcessor
from diffusers_any2pix.shapes import (
    ATTRIBUTE_CLASS_NAMES,
    ATTRIBUTE_CLASSES,
    SLOTS,
    Scene,
    attribute_labels,
    background_levels,
    caption,
    generate_dataset,
    parse_caption,
    render_scene,
    shape_caption,
    synthesize_sound,
    write_sound,
)
from diffusers_any2pix.shapes.generate import HELDOUT_COMBINATIONS
from diffusers_any2pix.shapes.probe import random_scenes
from diffusers_any2pix.testing_utils import tiny_llm_tokenizer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("train_imagebind", os.path.join(REPO, "training", "train_imagebind.py"))
train_imagebind = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_imagebind)

TINY_CONFIG = {
    "out_embed_dim": 16,
    "vision_embed_dim": 16,
    "vision_num_blocks": 1,
    "vision_num_heads": 2,
    "vision_image_size": 32,
    "vision_patch_size": 8,
    "text_embed_dim": 16,
    "text_num_blocks": 1,
    "text_num_heads": 2,
    "audio_embed_dim": 16,
    "audio_num_blocks": 1,
    "audio_num_heads": 2,
    "audio_kernel_size": 16,
    "audio_stride": 16,
    "audio_drop_path": 0.0,
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_imagebind.shapes_world_tokenizer()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def _argv(output_dir, config_file, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--image_encoder_config", config_file, "--report_to", "none", "--seed", "0",
        "--train_batch_size", "6", "--num_train_pairs", "48", "--image_size", "32", "--sound_variants", "2",
        "--num_eval_pairs", "8", "--eval_sound_variants", "1", "--checkpointing_steps", "2", *extra,
    ]  # fmt: skip


def _weights(folder) -> dict[str, torch.Tensor]:
    return ImageBindModel.from_pretrained(folder).state_dict()


# ------------------------------------------------------------------------------------------------ tokenizer


def test_shapes_world_tokenizer_has_one_token_per_word_and_eot_last(tokenizer, tmp_path):
    for word in train_imagebind.SHAPES_WORLD_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.bos_token_id == len(tokenizer) - 2
    train_imagebind.check_tokenizer(tokenizer, len(tokenizer))
    text = "a red circle on the left and an orange star in the middle, on a striped background"
    ids = ImageBindProcessor(tokenizer=tokenizer).tokenize(text)[0]
    # <|startoftext|>, 17 words, one comma, <|endoftext|>; ImageBind pools at the argmax: the end-of-text token.
    assert int(ids.argmax()) == 19 and int(ids[19]) == tokenizer.eos_token_id and ids[20:].eq(0).all()
    # Anything else still tokenizes (into byte-level pieces), nothing is unknown.
    assert len(tokenizer("zebra", add_special_tokens=False)["input_ids"]) > 1
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert torch.equal(ImageBindProcessor(tokenizer=reloaded).tokenize(text)[0], ids)


def test_tokenizer_checks(tokenizer):
    with pytest.raises(ValueError, match="text_vocab_size` is 100"):
        train_imagebind.check_tokenizer(tokenizer, 100)
    with pytest.raises(ValueError, match="must be its largest id"):
        train_imagebind.check_tokenizer(tiny_llm_tokenizer(), 10_000)
    with pytest.raises(ValueError, match="lower-case alphabetic"):
        train_imagebind.shapes_world_tokenizer(["Red"])


# ------------------------------------------------------------------------------------------------ loss


def test_contrastive_loss_is_imagebinds_symmetric_infonce():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    others = 10.0 * torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)  # scale = 1 / temperature
    keys = ["a", "b", "c", "d"]
    logits = images @ others.T
    labels = torch.arange(4)
    expected = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    loss = train_imagebind.contrastive_loss(images, others, keys, keys)
    assert torch.allclose(loss, expected)
    # Symmetric in the two modalities; aligned pairs with a high scale cost almost nothing.
    assert torch.allclose(loss, train_imagebind.contrastive_loss(others / 10.0, 10.0 * images, keys, keys))
    assert train_imagebind.contrastive_loss(images, 100.0 * images, keys, keys) < 1e-3


def test_contrastive_loss_counts_equal_inputs_as_positives():
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    others = 20.0 * images
    # Pairs 0 and 1 are two recordings of one kind: each may match either.
    loss = train_imagebind.contrastive_loss(images, others, ["red star", "red star", "blue cross"], ["s", "s", "c"])
    logits = images @ others.T
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(loss, expected)
    assert loss < math.log(2) + 1e-3  # only the (unavoidable) split between the two equal candidates remains
    with pytest.raises(ValueError, match="same N pairs"):
        train_imagebind.contrastive_loss(images, others[:2], ["a"] * 3, ["a"] * 3)


# ------------------------------------------------------------------------------------------------ data


def test_shapes_world_pairs_are_seeded_and_exclude_heldout(tokenizer):
    processor = ImageBindProcessor(tokenizer=tokenizer, image_size=32)
    dataset = train_imagebind.ShapesWorldPairs(processor, 10, seed=3, image_size=32, sound_variants=range(1))
    a, b = dataset[(1, 4)], dataset[(1, 4)]
    # Without hard negatives a sample holds one text pair.
    assert len(a["text"]) == 1 and a["text"][0]["other_key"] == b["text"][0]["other_key"]
    assert torch.equal(a["audio"]["other"], b["audio"]["other"])

    def keys(epoch: int) -> list:
        return [(dataset[(epoch, i)]["text"][0]["other_key"], dataset[(epoch, i)]["audio"]["other_key"]) for i in range(5)]

    assert keys(1) != keys(2)
    assert a["text"][0]["pixel_values"].shape == (3, 32, 32) and a["text"][0]["other"].shape == (77,)
    # 2-second recordings fill one clip: the three identical clips are kept once.
    assert a["audio"]["other"].shape == (1, 1, 128, 204)
    assert all((s, c) not in HELDOUT_COMBINATIONS for s, c in dataset.kinds) and len(dataset.kinds) == 26
    for index in range(12):
        text = dataset[(0, index)]["text"][0]["other_key"]
        if not text.startswith("an image of"):
            assert not parse_caption(text).combinations() & HELDOUT_COMBINATIONS
    batch = train_imagebind.collate_pairs([a, {"audio": b["audio"]}])
    assert batch["audio"]["other"].shape == (2, 1, 1, 128, 204) and batch["text"]["other"].shape == (1, 77)
    assert batch["audio"]["image_keys"] == [a["audio"]["image_key"]] * 2


def test_hard_negatives_differ_in_exactly_one_attribute_and_share_the_batch(tokenizer):
    processor = ImageBindProcessor(tokenizer=tokenizer, image_size=32)
    dataset = train_imagebind.ShapesWorldPairs(
        processor, 10, seed=0, image_size=32, sound_variants=range(1), object_text_fraction=0.0,
        hard_negative_fraction=1.0,
    )  # fmt: skip
    samples = [dataset[(0, i)] for i in range(40)]
    for sample in samples:
        assert len(sample["text"]) == 2
        first, twin = (parse_caption(pair["other_key"]) for pair in sample["text"])
        assert not twin.combinations() & HELDOUT_COMBINATIONS
        changes = int(first.background != twin.background)
        assert [o.slot for o in first.objects] == [o.slot for o in twin.objects]
        changes += sum((a.shape != b.shape) + (a.colour != b.colour) for a, b in zip(first.objects, twin.objects))
        assert changes == 1
        # The twin's image is its own render, not a copy of the first one.
        assert not torch.equal(sample["text"][0]["pixel_values"], sample["text"][1]["pixel_values"])
    batch = train_imagebind.collate_pairs(samples[:3])
    assert batch["text"]["other"].shape == (6, 77)
    assert batch["text"]["other_keys"][:2] == [pair["other_key"] for pair in samples[0]["text"]]
    # Every single change of a lone green circle on plain, less those making a held-out pair (circle on checkered,
    # purple circle, green triangle): 2 backgrounds + 3 shapes + 4 colours.
    lone = Scene.from_dict({"background": "plain", "objects": [{"shape": "circle", "colour": "green", "slot": "left"}]})
    edits = {caption(dataset.minimal_edit(lone, np.random.default_rng(i))) for i in range(200)}
    assert "a purple circle on the left, on a plain background" not in edits  # held out
    assert "a green circle on the left, on a checkered background" not in edits  # held out
    assert "a green square on the left, on a plain background" in edits and len(edits) == 2 + 3 + 4
    # Evaluation pairs never carry twins, whatever the training fraction.
    eval_samples = train_imagebind.shapes_eval_pairs(dataset, 4, [1], seed=0)
    assert all(not isinstance(s.get("text", {}), list) for s in eval_samples)


def test_grayscale_pairs_show_no_colour_and_name_none(tokenizer):
    processor = ImageBindProcessor(tokenizer=tokenizer, image_size=32)
    settings = dict(image_size=32, sound_variants=range(1), object_text_fraction=0.0, hard_negative_fraction=1.0)
    grey = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, grayscale_fraction=1.0, **settings)
    colour = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, **settings)
    words = {"red", "orange", "yellow", "green", "blue", "purple"}
    for index in range(20):
        pairs = grey[(0, index)]["text"]
        assert len(pairs) == 1  # no twin: a colour change would give the same grayscale pair
        text = pairs[0]["other_key"]
        assert not set(text.replace(",", "").split()) & words
        # Undo CLIP normalisation: the three channels of the grayscale render are equal.
        mean = torch.tensor(processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_std).view(3, 1, 1)
        pixels = pairs[0]["pixel_values"] * std + mean
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
        assert torch.equal(pairs[0]["other"], processor.tokenize(text)[0])
    # The grayscale scene is the scene the colour dataset draws with the same random stream, without colours.
    first_colour = parse_caption(colour[(0, 0)]["text"][0]["other_key"])
    assert grey[(0, 0)]["text"][0]["other_key"] == shape_caption(first_colour)
    # Without grayscale pairs the random stream is unchanged (builds stay reproducible).
    off = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, grayscale_fraction=0.0, **settings)
    assert [p["other_key"] for p in off[(0, 3)]["text"]] == [p["other_key"] for p in colour[(0, 3)]["text"]]


def test_random_gray_levels_paint_objects_away_from_their_background(tokenizer):
    processor = ImageBindProcessor(tokenizer=tokenizer, image_size=64)
    settings = dict(sound_variants=range(1), object_text_fraction=0.0, grayscale_fraction=1.0)
    plain = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, **settings)
    random = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, random_gray_levels=True, **settings)
    colour = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, sound_variants=range(1), object_text_fraction=0.0)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    levels_seen = set()
    for index in range(30):
        pair, reference = random[(0, index)]["text"][0], plain[(0, index)]["text"][0]
        # Same scene and caption (the levels are drawn after the scene), other pixels.
        assert pair["other_key"] == reference["other_key"]
        assert torch.equal(pair["labels"], reference["labels"])
        scene = parse_caption(colour[(0, index)]["text"][0]["other_key"])  # the same stream draws the same scene
        pixels = ((pair["pixel_values"] * std + mean) * 255).round()
        assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
        background = background_levels(scene.background)
        for obj in scene.objects:
            # The object's centre pixel holds its gray level: far from the background's.
            centre = int(pixels[0, 32, int((SLOTS.index(obj.slot) + 0.5) * 64 / 3)])
            assert min(abs(centre - b) for b in background) >= train_imagebind.GRAY_LEVEL_MARGIN - 1
            levels_seen.add(centre)
    assert len(levels_seen) > 10  # drawn, not one level per colour
    # The same stream twice: the same levels.
    again = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, random_gray_levels=True, **settings)
    assert torch.equal(again[(0, 5)]["text"][0]["pixel_values"], random[(0, 5)]["text"][0]["pixel_values"])


def test_pairs_carry_the_attribute_labels_of_their_images(tokenizer):
    processor = ImageBindProcessor(tokenizer=tokenizer, image_size=32)
    settings = dict(image_size=32, sound_variants=range(1), hard_negative_fraction=1.0)
    ignored = torch.full((len(ATTRIBUTE_CLASSES),), -100)
    kinds = set()
    for grayscale in (0.0, 1.0):
        dataset = train_imagebind.ShapesWorldPairs(processor, 10, seed=0, grayscale_fraction=grayscale, **settings)
        samples = [dataset[(0, index)] for index in range(12)]
        for sample in samples:
            assert torch.equal(sample["audio"]["labels"], ignored)
            for pair in sample["text"]:
                if pair["other_key"].startswith("an image of"):
                    kinds.add("object")
                    assert torch.equal(pair["labels"], ignored)
                elif grayscale:
                    kinds.add("grayscale")
                    # The caption has no colours; its shapes and background are the labels' (colours ignored).
                    labels = pair["labels"].tolist()
                    assert labels[2::2] == [-100 if shape else 0 for shape in labels[1::2]]
                else:
                    kinds.add("scene")
                    scene = parse_caption(pair["other_key"])
                    assert pair["labels"].tolist() == attribute_labels(scene)
        batch = train_imagebind.collate_pairs(samples)
        for name in ("text", "audio"):
            assert batch[name]["labels"].shape == (len(batch[name]["image_keys"]), len(ATTRIBUTE_CLASSES))
    assert kinds == {"object", "grayscale", "scene"}


def test_attribute_loss_averages_over_the_labels_read():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, n, generator=generator) for n in (4, 6)]
    labels = torch.tensor([[1, 5], [-100, 0], [3, -100]])
    expected = (
        torch.nn.functional.cross_entropy(logits[0][[0, 2]], torch.tensor([1, 3]), reduction="sum")
        + torch.nn.functional.cross_entropy(logits[1][[0, 1]], torch.tensor([5, 0]), reduction="sum")
    ) / 4
    assert torch.allclose(train_imagebind.attribute_loss(logits, labels), expected)
    # Nothing to read (object images only): zero, not NaN.
    assert train_imagebind.attribute_loss(logits, torch.full((3, 2), -100)).item() == 0.0
    with pytest.raises(ValueError, match=r"must have shape \(N, 2\) for 3 images"):
        train_imagebind.attribute_loss(logits, labels[:, :1])


def test_attribute_heads_read_the_scaled_embedding():
    encoder = ImageBindModel.from_config(TINY_CONFIG).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unit = train_imagebind.ImageBindWithAttributeHeads(encoder)
    scaled = train_imagebind.ImageBindWithAttributeHeads(encoder, embed_scale=20)
    scaled.attribute_heads.load_state_dict(unit.attribute_heads.state_dict())
    pixels = torch.randn(2, 3, TINY_CONFIG["vision_image_size"], TINY_CONFIG["vision_image_size"])
    with torch.no_grad():
        output, unit_logits = unit(pixels)
        _, scaled_logits = scaled(pixels)
    assert [t.shape for t in scaled_logits] == [(2, n) for n in ATTRIBUTE_CLASSES]
    heads = unit.attribute_heads
    expected = (20 * output.image_embeds @ heads.weight.T + heads.bias).split(ATTRIBUTE_CLASSES, dim=-1)
    for got, want, base in zip(scaled_logits, expected, unit_logits):
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base)
    for bad in (0, -1.0, True, "20"):
        with pytest.raises(ValueError, match="`embed_scale` must be a positive number"):
            train_imagebind.ImageBindWithAttributeHeads(encoder, embed_scale=bad)


def test_attribute_loss_trains_the_embedding_and_saves_a_plain_encoder(tmp_path, config_file):
    plain = train_imagebind.main(_argv(tmp_path / "plain", config_file, "--max_train_steps", "2"))
    argv = _argv(tmp_path / "heads", config_file, "--attribute_loss_weight", "1.0")
    full = train_imagebind.main(argv + ["--max_train_steps", "4"])
    assert full["global_step"] == 4 and plain["global_step"] == 2
    # The heads are dropped: the saved encoder has exactly the plain run's parameters (names and shapes) ...
    heads = _weights(tmp_path / "heads" / "image_encoder")
    plain_weights = _weights(tmp_path / "plain" / "image_encoder")
    assert {k: v.shape for k, v in heads.items()} == {k: v.shape for k, v in plain_weights.items()}
    # ... and the loss changed the vision tower's training (same seed and data: two steps each).
    train_imagebind.main(argv + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "heads2")])
    two = _weights(tmp_path / "heads2" / "image_encoder")
    assert any(not torch.equal(two[k], plain_weights[k]) for k in two if k.startswith("vision_"))
    # Resumed with its heads from step 2 to 4: the same weights as four steps in one go.
    resumed = train_imagebind.main(
        argv[:1] + [str(tmp_path / "heads2")] + argv[2:]
        + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    )  # fmt: skip
    assert resumed["global_step"] == 4
    for name, value in _weights(tmp_path / "heads2" / "image_encoder").items():
        assert torch.equal(value, heads[name]), name
    # The trained heads are saved beside the encoder (for train_llm.py --attribute_reader); resumed, the same ones.
    assert not (tmp_path / "plain" / ATTRIBUTE_HEADS_FILE).exists()
    saved = AttributeHeads.load(str(tmp_path / "heads" / ATTRIBUTE_HEADS_FILE))
    again = AttributeHeads.load(str(tmp_path / "heads2" / ATTRIBUTE_HEADS_FILE))
    assert (saved.num_classes, saved.embed_scale, saved.weight.shape) == (ATTRIBUTE_CLASSES, 1.0, (43, 16))
    assert torch.equal(saved.weight, again.weight) and torch.equal(saved.bias, again.bias)
    assert saved.class_names == ATTRIBUTE_CLASS_NAMES  # so train_llm.py --relabel_words can find a word's classes
    assert saved.class_names[1] == ("", "circle", "square", "triangle", "star", "cross")
    # Heads reading the embedding at norm 20 train the tower differently.
    train_imagebind.main(
        argv[:1] + [str(tmp_path / "scaled")] + argv[2:] + ["--max_train_steps", "2", "--attribute_embed_scale", "20"]
    )  # fmt: skip
    scaled = _weights(tmp_path / "scaled" / "image_encoder")
    assert any(not torch.equal(scaled[k], two[k]) for k in scaled if k.startswith("vision_"))
    assert AttributeHeads.load(str(tmp_path / "scaled" / ATTRIBUTE_HEADS_FILE)).embed_scale == 20.0


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    """A few real-format pairs: scene images with captions, object sounds with object images."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    (root / "wav").mkdir()
    lines = []
    for i, scene in enumerate(random_scenes(np.random.default_rng(0), 4)):
        render_scene(scene, 32).save(root / "img" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", "text": caption(scene)})
    for i, (shape, colour) in enumerate([("star", "red"), ("circle", "blue"), ("cross", "green"), ("square", "red")]):
        render_scene(Scene.from_dict({"background": "plain", "objects": [
            {"shape": shape, "colour": colour, "slot": "middle"}]}), 32).save(root / "img" / f"o{i}.png")  # fmt: skip
        write_sound(str(root / "wav" / f"{i}.wav"), synthesize_sound(shape, colour, duration=0.5, rng=i))
        lines.append({"image": f"img/o{i}.png", "audio": f"wav/{i}.wav"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"pairs\.jsonl:1: not valid JSON"),
        ('{"text": "a"}', "an \"image\" path"),
        ('{"image": "img/0.png", "text": "a", "audio": "wav/0.wav"}', "exactly one of"),
        ('{"image": "img/none.png", "text": "a"}', "none.png' does not exist"),
        ('{"image": "img/0.png", "audio": "wav/none.wav"}', "audio file .*none.wav' does not exist"),
    ],
)
def test_read_pairs_file_names_the_bad_line(pairs_file, tmp_path, line, match):
    bad = os.path.join(os.path.dirname(pairs_file), "bad_pairs.jsonl")
    with open(bad, "w") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=match):
        train_imagebind.read_pairs_file(bad)


def test_shapes_folder_pairs(tmp_path):
    generate_dataset(str(tmp_path), 12, seed=0, image_size=32, sound_duration=0.5, progress=False)
    pairs = train_imagebind.shapes_folder_pairs(str(tmp_path), "train")
    scenes = json.load(open(tmp_path / "train" / "scenes.json"))
    texts = [p for p in pairs if p.modality == "text"]
    assert [(p.image_key, p.other) for p in texts] == [(s["path"], s["caption"]) for s in scenes]
    audio = [p for p in pairs if p.modality == "audio"]
    assert audio and all(os.path.isfile(p.other) and p.image_key == p.other_key for p in audio)
    with pytest.raises(ValueError, match="not a ShapesWorld dataset split"):
        train_imagebind.shapes_folder_pairs(str(tmp_path), "dev")


# ------------------------------------------------------------------------------------------------ the script


def test_train_saves_reloads_reports_retrieval_and_resumes_exactly(tmp_path, config_file, capsys):
    # Measuring retrieval along the way (step 2) does not change the run: it must still equal the resumed one below.
    full = train_imagebind.main(
        _argv(tmp_path / "full", config_file, "--max_train_steps", "4", "--retrieval_steps", "2")
    )
    assert full["global_step"] == 4
    out = capsys.readouterr().out
    assert "Step 2. Top-1 retrieval on held-out pairs (8 text, 26 audio pairs)" in out
    assert "Step 4. Top-1 retrieval" in out
    retrieval = json.load(open(tmp_path / "full" / train_imagebind.RETRIEVAL_FILE))
    assert set(retrieval) == {"image_to_text", "text_to_image", "image_to_audio", "audio_to_image",
                              "num_text_pairs", "num_audio_pairs"}  # fmt: skip
    assert retrieval == full["retrieval"] and all(0.0 <= v <= 1.0 for k, v in retrieval.items() if "_to_" in k)

    # The saved encoder and tokenizer load back and fit together.
    model = ImageBindModel.from_pretrained(tmp_path / "full" / "image_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "full" / train_imagebind.TOKENIZER_FOLDER)
    assert model.config.text_vocab_size == len(tokenizer) and model.config.out_embed_dim == 16
    ids = ImageBindProcessor(tokenizer=tokenizer).tokenize(["an image of a red star"])
    with torch.no_grad():
        assert model.encode_text(ids).shape == (1, 16)
    initial = ImageBindModel.from_config({**TINY_CONFIG, "text_vocab_size": len(tokenizer)})
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), model.state_dict().values()))

    # Two steps, then resumed to four: the same weights as four steps in one go.
    train_imagebind.main(_argv(tmp_path / "split", config_file, "--max_train_steps", "2"))
    resumed = train_imagebind.main(
        _argv(tmp_path / "split", config_file, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    )
    assert resumed["global_step"] == 4
    for (name, a), b in zip(_weights(tmp_path / "full" / "image_encoder").items(),
                            _weights(tmp_path / "split" / "image_encoder").values()):  # fmt: skip
        assert torch.equal(a, b), name


def test_bind_audio_only_on_jsonl_pairs_keeps_the_other_towers(tmp_path, pairs_file, config_file, tokenizer):
    base = tmp_path / "base"
    ImageBindModel.from_config({**TINY_CONFIG, "text_vocab_size": len(tokenizer)}).save_pretrained(base)
    argv = _argv(tmp_path / "out", config_file, "--max_train_steps", "2", "--train_data", pairs_file)
    argv = [a for a in argv if a not in ("--image_encoder_config", config_file)]
    argv += ["--pretrained_image_encoder", str(base), "--trainable_modalities", "audio", "--num_eval_pairs", "2",
             "--train_batch_size", "3", "--learning_rate", "1e-2"]  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "tok")
    summary = train_imagebind.main(argv + ["--imagebind_tokenizer", str(tmp_path / "tok")])
    assert summary["retrieval"]["num_audio_pairs"] == 2  # the last two pairs of the file are held out
    before, after = _weights(base), _weights(tmp_path / "out" / "image_encoder")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("audio_") for name in changed)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--train_batch_size", "1"], "at least 2"),
        (["--pretrained_image_encoder", "x"], "either `--image_encoder_config`"),
        (["--object_text_fraction", "2"], "object_text_fraction"),
        (["--hard_negative_fraction", "-0.1"], "hard_negative_fraction"),
        (["--grayscale_fraction", "1.5"], "grayscale_fraction"),
        (["--random_gray_levels"], "needs `--grayscale_fraction` > 0"),
        (["--train_data", "nowhere.jsonl"], "does not exist"),
        (["--num_eval_pairs", "0"], "num_eval_pairs"),
        (["--attribute_loss_weight", "-1"], "attribute_loss_weight` must be >= 0"),
        (["--attribute_loss_weight", "1", "--train_data", "."], "needs ShapesWorld rendered on the fly"),
        (["--attribute_loss_weight", "1", "--trainable_modalities", "audio"], "add `vision`"),
        (["--attribute_loss_weight", "1", "--attribute_embed_scale", "0"], "attribute_embed_scale` must be > 0"),
        (["--attribute_embed_scale", "20"], "needs `--attribute_loss_weight` > 0"),
    ],
)
def test_bad_arguments(tmp_path, config_file, extra, match):
    with pytest.raises(ValueError, match=match):
        train_imagebind.parse_args(_argv(tmp_path, config_file, *extra))


def test_fine_tuning_text_needs_the_tokenizer(tmp_path, tokenizer):
    ImageBindModel.from_config({**TINY_CONFIG, "text_vocab_size": len(tokenizer)}).save_pretrained(tmp_path / "m")
    args = train_imagebind.parse_args(
        ["--output_dir", str(tmp_path / "o"), "--pretrained_image_encoder", str(tmp_path / "m"), "--report_to", "none"]
    )
    with pytest.raises(ValueError, match="needs the tokenizer it was trained with"):
        train_imagebind.main(args)
