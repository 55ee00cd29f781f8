"""``training/fit_attribute_reader.py``: linear heads fitted to a frozen encoder's embeddings of ShapesWorld scenes —
the fit itself on a problem with a known answer, its determinism, the script end to end on tiny generated data (heads
file, report, an adapter whose reader is the heads and whose other weights are untouched) and every error path."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads, MultimodalAdapter
from diffusers_any2pix.pipeline_instruct_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.shapes import ATTRIBUTE_CLASS_NAMES, generate_dataset
from diffusers_any2pix.testing_utils import TINY_EMBED_DIM, tiny_pipeline_components, with_attribute_reader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fit_attribute_reader", f"{REPO}/training/fit_attribute_reader.py")
fit_attribute_reader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fit_attribute_reader)

SHAPES_CLASSES = [len(names) for names in ATTRIBUTE_CLASS_NAMES]


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose labels are the argmax of a fixed linear map of the unit vector (fields of 3 and 2)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(5, 8, generator=torch.Generator().manual_seed(123)) * 4
    embeds = torch.randn(n, 8, generator=g) * 3.0  # any norm: the fit rescales
    logits = (embeds / embeds.norm(dim=-1, keepdim=True)) @ truth.T
    return embeds, torch.stack([logits[:, :3].argmax(-1), logits[:, 3:].argmax(-1)], dim=-1)


def test_fit_heads_learns_a_linear_read_out_and_is_deterministic():
    embeds, labels = _separable(600, seed=0)
    heads = fit_attribute_reader.fit_heads(embeds, labels, [3, 2], embed_scale=20.0, max_train_steps=400, seed=0)
    assert isinstance(heads, AttributeHeads) and heads.num_classes == (3, 2) and heads.embed_scale == 20.0
    assert heads.weight.shape == (5, 8) and heads.bias.shape == (5,)
    train = fit_attribute_reader.reader_accuracy(heads, embeds, labels)
    held_out = fit_attribute_reader.reader_accuracy(heads, *_separable(400, seed=1))
    assert train["exact"] >= 0.97 and held_out["exact"] >= 0.93 and len(held_out["fields"]) == 2
    # The report is the share of rows whose every field's argmax is the label.
    read = torch.stack([field.argmax(-1) for field in heads.logits(embeds)], -1)
    assert train["exact"] == read.eq(labels).all(-1).float().mean().item()
    assert train["fields"] == read.eq(labels).float().mean(0).tolist()
    again = fit_attribute_reader.fit_heads(embeds, labels, [3, 2], embed_scale=20.0, max_train_steps=400, seed=0)
    other = fit_attribute_reader.fit_heads(embeds, labels, [3, 2], embed_scale=20.0, max_train_steps=400, seed=1)
    assert torch.equal(again.weight, heads.weight) and torch.equal(again.bias, heads.bias)
    assert not torch.equal(other.weight, heads.weight)
    # Ignored labels count as read right and do not enter the loss.
    ignored = labels.clone()
    ignored[:, 1] = -100
    assert fit_attribute_reader.reader_accuracy(heads, embeds, ignored)["fields"][1] == 1.0
    fit_attribute_reader.fit_heads(embeds, ignored, [3, 2], max_train_steps=2)


def test_fit_heads_keeps_the_reference_reads_of_unlabelled_embeddings():
    # The labels depend on the first 8 dimensions only; the unlabelled embeddings live in the other 8, so a linear
    # read-out can fit both and the keep term alone decides what they read.
    embeds, labels = _separable(600, seed=0)
    embeds = torch.cat([embeds / embeds.norm(dim=-1, keepdim=True), torch.zeros(600, 8)], -1)
    keep_embeds = torch.cat([torch.zeros(6, 8), torch.randn(6, 8, generator=torch.Generator().manual_seed(5))], -1)
    keep_probs = [torch.randn(6, n, generator=torch.Generator().manual_seed(n)).mul(2).softmax(-1) for n in (3, 2)]

    def distance(heads):  # mean total variation between the new reads and the reference's
        new = [field.softmax(-1) for field in heads.logits(keep_embeds)]
        return sum((a - b).abs().sum(-1).mean().item() / 2 for a, b in zip(new, keep_probs)) / 2

    free = fit_attribute_reader.fit_heads(embeds, labels, [3, 2], max_train_steps=600)
    kept = fit_attribute_reader.fit_heads(
        embeds, labels, [3, 2], max_train_steps=600, keep_embeds=keep_embeds, keep_probs=keep_probs, keep_weight=1.0
    )
    off = fit_attribute_reader.fit_heads(
        embeds, labels, [3, 2], max_train_steps=600, keep_embeds=keep_embeds, keep_probs=keep_probs, keep_weight=0.0
    )
    assert distance(kept) < 0.1 < 0.3 < distance(free)
    assert torch.equal(off.weight, free.weight)  # weight 0 is no term at all
    assert fit_attribute_reader.reader_accuracy(kept, embeds, labels)["exact"] >= 0.95  # the labels are still fitted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_embeds": torch.randn(4, 8)}, "`keep_embeds` and `keep_probs` go together"),
        (
            {"keep_embeds": torch.randn(4, 8), "keep_probs": [torch.rand(4, 3), torch.rand(4, 3)]},
            r"`keep_probs` must hold one tensor per field of shapes \[\(4, 3\), \(4, 2\)\]",
        ),
        (
            {"keep_embeds": torch.randn(4, 7), "keep_probs": [torch.rand(4, 3), torch.rand(4, 2)]},
            r"`keep_embeds` must be of shape \(M, 8\)",
        ),
        (
            {"keep_embeds": torch.randn(4, 8), "keep_probs": [torch.rand(4, 3), torch.rand(4, 2)], "keep_weight": -1},
            "`keep_weight` must be >= 0",
        ),
        ({"labels": torch.zeros(10, 3, dtype=torch.long)}, r"`labels` must be of shape \(10, 2\)"),
        ({"max_train_steps": 0}, "`max_train_steps` must be a positive integer"),
        ({"train_batch_size": True}, "`train_batch_size` must be a positive integer"),
        ({"embed_scale": 0.0}, "`embed_scale` and `learning_rate` must be > 0"),
        ({"learning_rate": float("nan")}, "`embed_scale` and `learning_rate` must be > 0"),
        ({"weight_decay": -1.0}, "`weight_decay` >= 0"),
    ],
)
def test_fit_heads_bad_arguments(kwargs, match):
    arguments = {"embeds": torch.randn(10, 8), "labels": torch.zeros(10, 2, dtype=torch.long), "num_classes": [3, 2]}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_attribute_reader.fit_heads(**arguments)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Tiny ShapesWorld data and a tiny pipeline whose adapter reads ShapesWorld's attribute fields."""
    root = tmp_path_factory.mktemp("fit_reader")
    data = str(root / "data")
    generate_dataset(data, 24, seed=0, image_size=32, sound_duration=1.0, val_fraction=0.25, progress=False)
    components = tiny_pipeline_components("imagebind", answer=None)
    components["mm_adapter"] = with_attribute_reader(components["mm_adapter"], SHAPES_CLASSES)
    pipeline = str(root / "pipeline")
    InstructAny2PixPipeline(**components).save_pretrained(pipeline)
    plain = str(root / "plain")
    InstructAny2PixPipeline(**tiny_pipeline_components("imagebind", answer=None)).save_pretrained(plain)
    return {"data": data, "pipeline": pipeline, "plain": plain}


def test_script_fits_reports_and_writes_an_adapter_that_reads_with_the_heads(workspace, tmp_path):
    out, adapter_dir = tmp_path / "reader", tmp_path / "mm_adapter"
    argv = [
        "--pipeline", workspace["pipeline"], "--data_dir", workspace["data"], "--output_dir", str(out),
        "--save_adapter", str(adapter_dir), "--max_train_steps", "300", "--train_batch_size", "64",
    ]  # fmt: skip
    report = fit_attribute_reader.main(argv)
    heads = AttributeHeads.load(str(out / ATTRIBUTE_HEADS_FILE))
    assert heads.num_classes == tuple(SHAPES_CLASSES) and heads.class_names == ATTRIBUTE_CLASS_NAMES
    assert heads.weight.shape == (sum(SHAPES_CLASSES), TINY_EMBED_DIM)
    assert heads.embed_scale == 20.0  # the adapter's media_embed_norm
    assert json.loads((out / "reader_report.json").read_text()) == report
    assert set(report["splits"]) == {"train", "val"} and report["split"] == "train"
    # The report is what the saved heads read from the encoder's embeddings of each split's scenes.
    pipe = InstructAny2PixPipeline.from_pretrained(workspace["pipeline"])
    processor = fit_attribute_reader.ImageBindProcessor.for_model(pipe.image_encoder)
    paths_train = fit_attribute_reader.load_scenes(workspace["data"], "train")[0]
    for split in ("train", "val"):
        paths, labels = fit_attribute_reader.load_scenes(workspace["data"], split)
        scenes = json.load(open(os.path.join(workspace["data"], split, "scenes.json")))
        assert report["splits"][split]["num_scenes"] == len(paths) == len(scenes) > 0
        embeds = fit_attribute_reader.embed_images(pipe.image_encoder, processor, paths, batch_size=5)
        accuracy = fit_attribute_reader.reader_accuracy(heads, embeds, labels)
        assert report["splits"][split] == {"num_scenes": len(paths), **accuracy}
        if split == "train":
            train_embeds, train_labels = embeds, labels
    # The heads are `fit_heads` on those embeddings, keeping the pipeline reader's reads of the object images and
    # sounds the instructions use.
    images, audio = fit_attribute_reader.load_unlabelled_media(workspace["data"], "train", paths_train)
    assert report["kept_media"]["images"] == len(images) > 0 and report["kept_media"]["audio"] == len(audio) > 0
    assert all("/objects/" in p for p in images) and all(p.endswith(".wav") for p in audio)
    assert fit_attribute_reader.embed_images(pipe.image_encoder, processor, []).shape == (0, TINY_EMBED_DIM)
    assert fit_attribute_reader.embed_audio(pipe.image_encoder, processor, []).shape == (0, TINY_EMBED_DIM)
    keep_embeds = torch.cat(
        [
            fit_attribute_reader.embed_images(pipe.image_encoder, processor, images),
            fit_attribute_reader.embed_audio(pipe.image_encoder, processor, audio),
        ]
    )
    old_reads = pipe.mm_adapter.read_attributes(keep_embeds)
    expected = fit_attribute_reader.fit_heads(
        train_embeds, train_labels, SHAPES_CLASSES, embed_scale=20.0, max_train_steps=300, train_batch_size=64,
        class_names=ATTRIBUTE_CLASS_NAMES, keep_embeds=keep_embeds, keep_probs=old_reads,
    )  # fmt: skip
    assert torch.equal(expected.weight, heads.weight) and torch.equal(expected.bias, heads.bias)
    new = [field.softmax(-1) for field in heads.logits(keep_embeds)]
    same = torch.stack([a.argmax(-1).eq(b.argmax(-1)) for a, b in zip(new, old_reads)], -1)
    assert report["kept_media"]["same_argmax"] == same.all(-1).float().mean().item()
    # The written adapter reads exactly the heads' probabilities; every other weight is the pipeline's.
    adapter = MultimodalAdapter.from_pretrained(str(adapter_dir))
    torch.testing.assert_close(
        torch.cat(adapter.read_attributes(embeds), -1),
        torch.cat([field.softmax(-1) for field in heads.logits(embeds)], -1),
        rtol=1e-5,
        atol=1e-6,
    )
    before = load_file(os.path.join(workspace["pipeline"], "mm_adapter", "diffusion_pytorch_model.safetensors"))
    after = load_file(str(adapter_dir / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("attribute_reader."))
    assert not torch.equal(before["attribute_reader.weight"], after["attribute_reader.weight"])
    # The same command again gives the same heads.
    again_argv = [
        "--pipeline", workspace["pipeline"], "--data_dir", workspace["data"], "--output_dir", str(tmp_path / "again"),
        "--max_train_steps", "300", "--train_batch_size", "64",
    ]  # fmt: skip
    fit_attribute_reader.main(again_argv)
    again = AttributeHeads.load(str(tmp_path / "again" / ATTRIBUTE_HEADS_FILE))
    assert torch.equal(again.weight, heads.weight) and torch.equal(again.bias, heads.bias)


def _argv(workspace, tmp_path, *extra: str) -> list[str]:
    return ["--data_dir", workspace["data"], "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", *extra]


@pytest.mark.parametrize(
    "extra, match",
    [
        ((), "pass --pipeline or --pretrained_image_encoder"),
        (
            ("--pretrained_image_encoder", "x", "--save_adapter", "y"),
            "--save_adapter writes an mm_adapter: pass --pretrained_mm_adapter or --pipeline",
        ),
        (("--pipeline", "x", "--eval_splits", "val", "train"), "--eval_splits must not hold the fitted split 'train'"),
        (("--pipeline", "x", "--keep_reads_weight", "-1"), "--keep_reads_weight must be >= 0, got -1.0"),
        (("--pipeline", "x", "--max_train_steps", "0"), "--max_train_steps must be >= 1, got 0"),
        (("--pipeline", "x", "--batch_size", "-2"), "--batch_size must be >= 1, got -2"),
        (("--pipeline", "x", "--learning_rate", "nan"), "--learning_rate must be > 0, got nan"),
        (("--pipeline", "x", "--embed_scale", "0"), "--embed_scale must be > 0, got 0.0"),
        (("--pipeline", "x", "--weight_decay", "-0.1"), "--weight_decay must be >= 0, got -0.1"),
        (
            ("--pretrained_image_encoder", "x"),
            "--keep_reads_weight > 0 keeps an old reader's reads: pass --pretrained_mm_adapter",
        ),
    ],
)
def test_script_bad_command_lines_are_named(workspace, tmp_path, extra, match, capsys):
    with pytest.raises(SystemExit):
        fit_attribute_reader.parse_args(_argv(workspace, tmp_path, *extra))
    assert match in capsys.readouterr().err


def test_script_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_attribute_reader.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--save_adapter", "--eval_splits", "--keep_reads_weight", "--reference_heads"))


def test_script_errors_name_the_input(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No `nosuch/scenes.json` under `--data_dir`"):
        fit_attribute_reader.main(_argv(workspace, tmp_path, "--pipeline", workspace["pipeline"], "--split", "nosuch"))
    with pytest.raises(ValueError, match="--save_adapter: the mm_adapter reads no attributes"):
        fit_attribute_reader.main(
            _argv(workspace, tmp_path, "--pipeline", workspace["plain"], "--save_adapter", str(tmp_path / "a"))
        )
    with pytest.raises(ValueError, match="reads no attributes, so it has no reads to keep: pass --reference_heads"):
        fit_attribute_reader.main(_argv(workspace, tmp_path, "--pipeline", workspace["plain"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()  # refused before anything was written
    # A scene list that is not one, and a scene image that cannot be read.
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "scenes.json").write_text(json.dumps([{"path": "media/x.png"}]))
    with pytest.raises(ValueError, match=r"entry 0: expected an object with `path` and `scene`"):
        fit_attribute_reader.load_scenes(str(data), "train")
    (data / "train" / "scenes.json").write_text("{}")
    with pytest.raises(ValueError, match="must hold a non-empty list of scenes"):
        fit_attribute_reader.load_scenes(str(data), "train")
    scene = {"background": "plain", "objects": [{"shape": "circle", "colour": "red", "slot": "left"}]}
    (data / "train" / "scenes.json").write_text(json.dumps([{"path": "media/broken.png", "scene": scene}]))
    (data / "media").mkdir()
    (data / "media" / "broken.png").write_bytes(b"not a png")
    argv = ["--pipeline", workspace["pipeline"], "--data_dir", str(data), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"Cannot read the image .*broken.png"):
        fit_attribute_reader.main(argv + ["--eval_splits"])


def test_script_keeps_the_reads_of_reference_heads_without_a_pipeline(workspace, tmp_path):
    g = torch.Generator().manual_seed(3)
    reference = AttributeHeads(
        torch.randn(sum(SHAPES_CLASSES), TINY_EMBED_DIM, generator=g) * 5, torch.zeros(sum(SHAPES_CLASSES)),
        tuple(SHAPES_CLASSES), 20.0,
    )  # fmt: skip
    reference.save(str(tmp_path / "reference.safetensors"))
    encoder = os.path.join(workspace["plain"], "image_encoder")
    argv = [
        "--pretrained_image_encoder", encoder, "--data_dir", workspace["data"], "--output_dir", str(tmp_path / "out"),
        "--reference_heads", str(tmp_path / "reference.safetensors"), "--max_train_steps", "200", "--eval_splits",
        "--keep_reads_weight", "10",
    ]  # fmt: skip
    report = fit_attribute_reader.main(argv)
    heads = AttributeHeads.load(str(tmp_path / "out"))
    assert report["split"] == "train" and set(report["splits"]) == {"train"}
    pipe = InstructAny2PixPipeline.from_pretrained(workspace["plain"])
    processor = fit_attribute_reader.ImageBindProcessor.for_model(pipe.image_encoder)
    scenes = fit_attribute_reader.load_scenes(workspace["data"], "train")[0]
    images, audio = fit_attribute_reader.load_unlabelled_media(workspace["data"], "train", scenes)
    keep = torch.cat(
        [
            fit_attribute_reader.embed_images(pipe.image_encoder, processor, images),
            fit_attribute_reader.embed_audio(pipe.image_encoder, processor, audio),
        ]
    )
    old = [field.argmax(-1) for field in reference.logits(keep)]
    new = [field.argmax(-1) for field in heads.logits(keep)]
    same = torch.stack([a.eq(b) for a, b in zip(new, old)], -1).all(-1).float().mean().item()
    # The reference's reads were kept, far more of them than without the term.
    assert report["kept_media"]["same_argmax"] == same >= 0.8
    argv[argv.index("--keep_reads_weight") + 1] = "0"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "free")
    assert "kept_media" not in fit_attribute_reader.main(argv)
    free = [field.argmax(-1) for field in AttributeHeads.load(str(tmp_path / "free")).logits(keep)]
    assert torch.stack([a.eq(b) for a, b in zip(free, old)], -1).all(-1).float().mean().item() < 0.5
