"""benchmarks/imagebind_compositionality.py: zero-shot retrieval and a trained reader of ImageBind scene embeddings."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.shapes import ATTRIBUTE_CLASSES, ATTRIBUTE_FIELDS, Scene, generate_dataset
from diffusers_any2pix.testing_utils import TINY_IMAGEBIND_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("imagebind_compositionality", "benchmarks/imagebind_compositionality.py")
train_imagebind = _load("train_imagebind", "training/train_imagebind.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compositionality")
    generate_dataset(str(root / "data"), 40, seed=0, image_size=32, sound_duration=1.0, progress=False)
    tokenizer = train_imagebind.shapes_world_tokenizer()
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = {**TINY_IMAGEBIND_CONFIG, "vision_image_size": 32, "vision_patch_size": 8, "text_vocab_size": len(tokenizer)}
    ImageBindModel(**config).save_pretrained(str(root / "image_encoder"))
    return root


def test_retrieval_accuracy_counts_the_own_caption_as_nearest():
    captions = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.0, 0.0, 1.0]])
    # Nearest captions: 0, 2, 2 — the second image's own caption is 1.
    assert bench.retrieval_accuracy(images, torch.tensor([0, 1, 2]), captions) == pytest.approx(2 / 3)


def test_reader_learns_a_linear_code_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randint(0, n, (200,), generator=generator) for n in ATTRIBUTE_CLASSES], dim=-1)
    # One-hot codes of every field side by side: a readable embedding.
    embeds = torch.cat([torch.nn.functional.one_hot(labels[:, k], n) for k, n in enumerate(ATTRIBUTE_CLASSES)], -1)
    reader = bench.train_reader(embeds.float(), labels, steps=300, batch_size=64, seed=0)
    accuracy = bench.reader_accuracy(reader, embeds.float(), labels)
    assert accuracy["exact"] == 1.0 and set(accuracy) == {"exact", *ATTRIBUTE_FIELDS}
    again = bench.train_reader(embeds.float(), labels, steps=300, batch_size=64, seed=0)
    for a, b in zip(reader.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_heldout_objects_score_only_the_masked_slots_shape_and_colour():
    class Fixed(torch.nn.Module):  # "reads" the given predictions
        def forward(self, predictions):
            one_hot = torch.nn.functional.one_hot
            return tuple(one_hot(predictions[:, k], n).float() for k, n in enumerate(ATTRIBUTE_CLASSES))

    labels = torch.tensor([[0, 1, 1, 2, 2, 3, 3], [1, 1, 1, 2, 2, 3, 3]])
    predicted = labels.clone()
    predicted[0, 1] = 4  # scene 0: left shape wrong
    predicted[1, 4] = 5  # scene 1: middle colour wrong
    predicted[1, 0] = 0  # scene 1: background wrong (not an object: does not count)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    result = bench.reader_accuracy(Fixed(), predicted, labels, mask)
    # Masked slots: (0, left) wrong, (0, middle) right, (1, middle) wrong, (1, right) right.
    assert result["heldout_objects"] == 0.5 and result["exact"] == 0.0
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert bench.reader_accuracy(Fixed(), predicted, labels, none)["heldout_objects"] is None
    assert "heldout_objects" not in bench.reader_accuracy(Fixed(), predicted, labels)
    scene = Scene.from_dict(
        {"background": "plain", "objects": [{"shape": "circle", "colour": "purple", "slot": "right"},
                                            {"shape": "circle", "colour": "red", "slot": "left"}]}
    )  # fmt: skip
    assert bench.heldout_slots(scene) == [False, False, True]


def test_patch_reader_reads_a_code_spread_over_patches_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randint(0, n, (200,), generator=generator) for n in ATTRIBUTE_CLASSES], dim=-1)
    # Field k's one-hot code sits in patch k, next to the patch's position code (as a ViT's tokens carry theirs): the
    # reader must attend to the right patch.
    fields = len(ATTRIBUTE_CLASSES)
    codes = torch.stack([torch.nn.functional.one_hot(labels[:, k], 9) for k in range(fields)], dim=1)
    positions = torch.eye(fields).expand(len(labels), -1, -1)
    patches = torch.cat([codes.float(), positions], dim=-1) * 4.0  # width 16: divisible by the reader's 4 heads
    reader = bench.train_reader(patches, labels, steps=400, batch_size=64, seed=0, reader_class=bench.PatchReader)
    assert bench.reader_accuracy(reader, patches, labels)["exact"] == 1.0
    again = bench.train_reader(patches, labels, steps=400, batch_size=64, seed=0, reader_class=bench.PatchReader)
    for a, b in zip(reader.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_main_reports_every_split_and_writes_json(setup, tmp_path, capsys):
    argv = [
        "--image_encoder", str(setup / "image_encoder"), "--tokenizer", str(setup / "tokenizer"),
        "--data", str(setup / "data"), "--reader_steps", "5", "--batch_size", "16", "--output", str(tmp_path / "r.json"),
    ]  # fmt: skip
    report = bench.main(argv)
    assert set(report["splits"]) == {"train", "val", "test"}
    for split, result in report["splits"].items():
        scenes = json.load(open(setup / "data" / split / "scenes.json"))
        assert result["num_scenes"] == len(scenes)
        assert 0.0 <= result["retrieval"] <= 1.0 and 0.0 <= result["reader"]["exact"] <= 1.0
        held = sum(bench.heldout_slots(Scene.from_dict(s["scene"])).count(True) for s in scenes)
        assert result["num_heldout_objects"] == held and (held > 0) == (split == "test")
        assert (result["reader"]["heldout_objects"] is None) == (held == 0)
    assert report["num_captions"] == len({s["caption"] for sp in ("train", "val", "test")
                                          for s in json.load(open(setup / "data" / sp / "scenes.json"))})  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert "retrieval among" in capsys.readouterr().out
    # The same inputs give the same figures.
    assert bench.main(argv[:-2]) == {**report}
    # --patch_reader adds the patch-token reader's figures to every split, the rest unchanged.
    with_patches = bench.main(argv[:-2] + ["--patch_reader"])
    for split, result in with_patches["splits"].items():
        assert set(result["patch_reader"]) == {"exact", "heldout_objects", *ATTRIBUTE_FIELDS}
        assert {k: v for k, v in result.items() if k != "patch_reader"} == report["splits"][split]
    assert "(patch tokens)" in capsys.readouterr().out


def test_attribute_heads_read_the_scaled_embedding_from_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(sum(ATTRIBUTE_CLASSES), 8, generator=generator), torch.randn(sum(ATTRIBUTE_CLASSES))
    save_file({"attribute_heads.weight": weight, "attribute_heads.bias": bias}, str(tmp_path / "model.safetensors"))
    heads = bench.load_attribute_heads(str(tmp_path / "model.safetensors"), embed_scale=20.0)
    embeds = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    expected = (20.0 * embeds @ weight.T + bias).split(ATTRIBUTE_CLASSES, dim=-1)
    for got, want in zip(heads.logits(embeds), expected):
        assert torch.allclose(got, want, atol=1e-5)
    # The heads file train_imagebind saves beside the encoder carries its scale: the same read-out.
    heads.save(str(tmp_path / "attribute_heads.safetensors"))
    from_file = bench.load_attribute_heads(str(tmp_path / "attribute_heads.safetensors"), embed_scale=1.0)
    assert from_file.embed_scale == 20.0 and torch.equal(from_file.weight, weight)
    for got, want in zip(from_file.logits(embeds), expected):
        assert torch.allclose(got, want, atol=1e-5)
    save_file({"encoder.w": weight}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="holds no attribute heads"):
        bench.load_attribute_heads(str(tmp_path / "plain.safetensors"))
    save_file({"attribute_heads.weight": weight[:5], "attribute_heads.bias": bias[:5]}, str(tmp_path / "few.safetensors"))
    with pytest.raises(ValueError, match=r"must have a \(43, embed_dim\) weight"):
        bench.load_attribute_heads(str(tmp_path / "few.safetensors"))


def test_main_scores_the_attribute_heads_of_a_training_checkpoint(setup, tmp_path, capsys):
    # The layout of a train_imagebind checkpoint: the wrapped model's state, heads under `attribute_heads.`.
    encoder = ImageBindModel.from_pretrained(str(setup / "image_encoder"))
    wrapped = train_imagebind.ImageBindWithAttributeHeads(encoder, embed_scale=20.0)
    save_file({k: v.contiguous() for k, v in wrapped.state_dict().items()}, str(tmp_path / "model.safetensors"))
    argv = [
        "--image_encoder", str(setup / "image_encoder"), "--tokenizer", str(setup / "tokenizer"),
        "--data", str(setup / "data"), "--reader_steps", "5", "--batch_size", "16",
    ]  # fmt: skip
    plain = bench.main(argv)
    heads = ["--attribute_heads", str(tmp_path / "model.safetensors"), "--attribute_embed_scale", "20"]
    scored = bench.main(argv + heads)
    assert "(attribute heads)" in capsys.readouterr().out
    processor = bench.ImageBindProcessor.for_model(encoder.eval(), tokenizer=bench.CLIPTokenizer.from_pretrained(
        str(setup / "tokenizer")))  # fmt: skip
    for split, result in scored["splits"].items():
        assert {k: v for k, v in result.items() if k != "attribute_heads"} == plain["splits"][split]
        scenes = json.loads((setup / "data" / split / "scenes.json").read_text())
        embeds, _ = bench.encode_scene_images(encoder, processor, [str(setup / "data" / s["path"]) for s in scenes], 16)
        logits = wrapped.attribute_heads(20.0 * embeds).split(ATTRIBUTE_CLASSES, dim=-1)
        labels = torch.tensor([bench.attribute_labels(Scene.from_dict(s["scene"])) for s in scenes])
        predicted = torch.stack([field.argmax(-1) for field in logits], -1)
        assert result["attribute_heads"]["exact"] == pytest.approx(predicted.eq(labels).all(-1).float().mean().item())


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--splits", "val", "test"], "must include train"),
        (["--reader_steps", "0"], "must be positive"),
        (["--splits", "train", "nosuch"], "no nosuch/scenes.json"),
        (["--attribute_heads", "nowhere.safetensors"], "is not a file"),
        (["--attribute_embed_scale", "0"], "must be positive"),
    ],
)
def test_bad_arguments(setup, extra, match, capsys):
    argv = ["--image_encoder", "x", "--tokenizer", "y", "--data", str(setup / "data"), *extra]
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert match in capsys.readouterr().err
