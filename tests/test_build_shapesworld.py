"""`training/build_shapesworld.py` rebuilds a complete pipeline from nothing with the repository's scripts: here with
tiny configurations and two steps per stage (the full build is what made the root pipeline; see README)."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from diffusers_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads, MultimodalAdapter
from diffusers_any2pix.shapes.world import ATTRIBUTE_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("build_shapesworld", os.path.join(REPO, "training", "build_shapesworld.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

EMBED = 16
TINY = {
    "imagebind.json": {
        "out_embed_dim": EMBED, "vision_embed_dim": 16, "vision_num_blocks": 1, "vision_num_heads": 2,
        "vision_image_size": 32, "vision_patch_size": 8, "text_embed_dim": 16, "text_num_blocks": 1,
        "text_num_heads": 2, "audio_embed_dim": 16, "audio_num_blocks": 1, "audio_num_heads": 2,
        "audio_kernel_size": 16, "audio_stride": 16, "audio_drop_path": 0.0,
    },
    "vae.json": {
        "_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "sample_size": 32,
    },
    "unet.json": {
        "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 16, "encoder_hid_dim": EMBED, "encoder_hid_dim_type": "image_proj",
        "addition_embed_type": "image",
    },
    "llm.json": {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
    },
    "prior.json": {
        "_class_name": "Any2PixPrior", "embed_dim": EMBED, "text_hidden_dim": 8, "score_embed_dim": 8,
        "hidden_size": EMBED, "num_layers": 1, "num_attention_heads": 2, "max_positions": 32, "vocab_size": 8,
    },
    "edit_defaults.json": {"num_inference_steps": 2, "guidance_scale": 2.0, "llm_max_new_tokens": 8},
}  # fmt: skip


# The text-to-image decoder variant: an SD 1.x-style UNet and a CLIP text encoder over the ImageBind tokenizer.
TINY_TEXT_DECODER = {
    "unet.json": {
        **{k: v for k, v in TINY["unet.json"].items() if k not in ("encoder_hid_dim", "encoder_hid_dim_type",
                                                                   "addition_embed_type")},
    },
    "text_encoder.json": {
        "vocab_size": 619, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 77,
    },
    "edit_defaults.json": {**TINY["edit_defaults.json"], "negative_prompt": ""},
}  # fmt: skip


def _config_dir(root, text_decoder: bool = False) -> str:
    folder = root / "configs"
    folder.mkdir()
    for name, config in {**TINY, **(TINY_TEXT_DECODER if text_decoder else {})}.items():
        (folder / name).write_text(json.dumps(config))
    steps = {"max_train_steps": 2, "train_batch_size": 2, "resume_from_checkpoint": "latest"}
    settings = {
        "data": {"num_examples": 20, "image_size": 32, "sound_duration": 1.0},
        "imagebind": {
            **steps, "image_encoder_config": str(folder / "imagebind.json"), "num_train_pairs": 16,
            "image_size": 32, "sound_variants": 2, "num_eval_pairs": 4, "eval_sound_variants": 1,
            # the real build's data and loss options
            "hard_negative_fraction": 0.5, "grayscale_fraction": 0.5, "attribute_loss_weight": 1.0,
        },
        "vae": {**steps, "resolution": 32, "channel_shuffle_prob": 0.5},
        "unet": {**steps, "use_ema": True},
        "llm": {**steps, "embed_dim": EMBED, "attribute_reader": True},
        "reader": {"max_train_steps": 20, "train_batch_size": 8},
        "prior": {**steps, "corrupted_image_pairs": True},
        "pipeline": {"save_dtype": "float16"},
        "evaluate": {"max_examples": 2, "probe_steps": 1},
    }  # fmt: skip
    if text_decoder:  # the real build's layout, with its LLM options: patch tokens, answer noise, reproduce samples
        settings["features"] = {"image_patches": True}
        settings["llm_2"] = {}  # and a second LLM
        settings["verifier"] = {**steps, "hidden_size": 16, "num_layers": 1}  # and an edit verifier
        settings["llm"].update(
            image_patch_tokens=2, patch_embed_dim=16, resampler_hidden_size=16, resampler_depth=1, resampler_heads=2,
            answer_noise_prob=0.3, answer_noise_source="context", reproduce_prob=0.2,
        )  # fmt: skip
    (folder / "build.json").write_text(json.dumps(settings))
    return str(folder)


def _assert_edits_a_scene(pipeline: InstructAny2PixPipeline, work) -> None:
    scene = next(p for p in sorted((work / "data" / "media" / "scenes").iterdir()))
    result = pipeline(
        "add a red circle to [image1]", images=[str(scene)], on_invalid_answer="use_base",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.images[0].size == (32, 32)


def test_build_makes_a_loadable_pipeline_and_logs_every_stage(tmp_path):
    config_dir = _config_dir(tmp_path)
    work, out = tmp_path / "work", tmp_path / "pipeline"
    # A 1-step probe is (rightly) refused by the evaluator; this build.json has no llm_2 and no verifier section.
    stages = [s for s in build.STAGES if s not in ("evaluate", "llm_2", "verifier")]
    argv = ["--output_dir", str(out), "--work_dir", str(work), "--config_dir", config_dir, "--stages", *stages]
    assert build.main(argv) == 0
    log = json.loads((work / "build_log.json").read_text())
    assert set(stages) <= set(log) and log["total_seconds"] == pytest.approx(sum(log[s]["seconds"] for s in stages), abs=0.2)
    # The lanes ran side by side on one thread each; the other stages alone.
    assert log["vae"]["threads"] == log["llm"]["threads"] == log["reader"]["threads"] == 1
    assert log["data"]["threads"] is None

    pipeline = InstructAny2PixPipeline.from_pretrained(str(out))
    assert pipeline.config.edit_defaults == TINY["edit_defaults.json"] and pipeline.llm_2 is None
    assert pipeline.edit_verifier is None
    # The pipeline reads text with the ImageBind tokenizer the imagebind stage trained its text tower with.
    stage_tokenizer = AutoTokenizer.from_pretrained(str(work / "imagebind" / "imagebind_tokenizer"))
    assert pipeline.imagebind_tokenizer.get_vocab() == stage_tokenizer.get_vocab()
    # `"attribute_reader": true`: the LLM reads every medium's fields through the heads the imagebind stage saved,
    # which the reader stage then fitted again to the final encoder (its report: the scenes of train and val).
    heads = AttributeHeads.load(str(work / "imagebind" / ATTRIBUTE_HEADS_FILE))
    llm_adapter = MultimodalAdapter.from_pretrained(str(work / "llm" / "mm_adapter"))
    assert torch.equal(llm_adapter.attribute_reader.weight, heads.weight * (heads.embed_scale / 20.0))
    refit = AttributeHeads.load(str(work / "reader" / ATTRIBUTE_HEADS_FILE))
    assert pipeline.mm_adapter.config.attribute_classes == list(refit.num_classes) == list(ATTRIBUTE_CLASSES)
    expected = (refit.weight * (refit.embed_scale / 20.0)).half().float()  # the pipeline is stored in float16
    assert torch.equal(pipeline.mm_adapter.attribute_reader.weight, expected)
    assert not torch.equal(refit.weight, heads.weight)
    report = json.loads((work / "reader" / "reader_report.json").read_text())
    assert set(report["splits"]) == {"train", "val"} and report["kept_media"]["images"] > 0
    # Everything else of the adapter is the LLM stage's.
    for name, tensor in llm_adapter.state_dict().items():
        if not name.startswith("attribute_reader."):
            assert torch.equal(pipeline.mm_adapter.state_dict()[name], tensor.half().float()), name
    assert pipeline.scheduler.config.clip_sample is False
    # Stored in float16 (half the size), computed in float32.
    assert pipeline.unet.dtype == torch.float32
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")).values()} == {torch.float16}
    assert all(f.endswith((".json", ".safetensors", ".txt")) for _, _, fs in os.walk(out) for f in fs)
    _assert_edits_a_scene(pipeline, work)

    # A second run finds every stage done and runs nothing; --force redoes a stage and what depends on it.
    before = {s: log[s]["seconds"] for s in stages}
    assert build.main(argv) == 0
    assert {s: json.loads((work / "build_log.json").read_text())[s]["seconds"] for s in stages} == before
    assert build.main(argv + ["--force", "prior", "--dry_run"]) == 0


def test_build_with_a_text_to_image_decoder(tmp_path, capsys):
    config_dir = _config_dir(tmp_path, text_decoder=True)
    work, out = tmp_path / "work", tmp_path / "pipeline"
    stages = [s for s in build.STAGES if s != "evaluate"]
    argv = ["--output_dir", str(out), "--work_dir", str(work), "--config_dir", config_dir, "--stages", *stages]
    assert build.main(argv + ["--dry_run"]) == 0
    commands = capsys.readouterr().out
    assert "--mode text_unet" in commands and "--image_patches" in commands and "--image_patch_tokens 2" in commands
    assert "llm_2: " in commands and "train_edit_verifier.py --attribute_reader" in commands
    assert build.main(argv) == 0
    pipeline = InstructAny2PixPipeline.from_pretrained(str(out))
    assert pipeline.decoder_family == "sd" and pipeline.ip_adapter is not None
    # An image is its pooled vector, its 7 attribute fields and 2 resampled patch vectors.
    assert (pipeline.mm_adapter.tokens_per_medium, pipeline.mm_adapter.tokens_per_image) == (8, 10)
    # The decoder reads captions with the ImageBind tokenizer (one token per ShapesWorld word).
    assert pipeline.tokenizer.tokenize("a green triangle on the left") == ["a</w>", "green</w>", "triangle</w>", "on</w>",
                                                                          "the</w>", "left</w>"]  # fmt: skip
    assert pipeline.resolve_edit_settings()["negative_prompt"] == ""
    _assert_edits_a_scene(pipeline, work)
    # The second LLM: trained on the first's tokenizer with another seed, reading media as the first does.
    assert pipeline.llm_2 is not None and pipeline.mm_adapter_2.config.attribute_classes == list(ATTRIBUTE_CLASSES)
    assert (pipeline.mm_adapter_2.tokens_per_medium, pipeline.mm_adapter_2.tokens_per_image) == (8, 10)
    assert not torch.equal(pipeline.llm_2.lm_head.weight, pipeline.llm.lm_head.weight)
    log = json.loads((work / "build_log.json").read_text())
    assert log["llm_2"]["command"][log["llm_2"]["command"].index("--seed") + 1] == "1"
    scene = next(p for p in sorted((work / "data" / "media" / "scenes").iterdir()))
    result = pipeline(
        "add a red circle to [image1]", images=[str(scene)], on_invalid_answer="use_base", llm_do_sample=False,
        llm_num_beams=2, llm_ensemble_weight=0.5, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.images[0].size == (32, 32)
    # The edit verifier: trained in the decoder lane on the imagebind stage's heads, for ShapesWorld's fields.
    assert pipeline.edit_verifier.num_classes == pipeline.mm_adapter.config.attribute_classes
    assert log["verifier"]["threads"] == 1 and "--attribute_reader" in log["verifier"]["command"]
    result = pipeline(
        "add a red circle to [image1]", images=[str(scene)], on_invalid_answer="use_base", llm_do_sample=False,
        llm_num_beams=2, edit_verifier_weight=1.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.images[0].size == (32, 32)


def test_force_selects_the_dependent_stages():
    assert build._dependents(["prior"]) == {"prior", "pipeline", "evaluate"}
    assert build._dependents(["features"]) == {
        "features", "vae", "unet", "verifier", "llm", "reader", "llm_2", "prior", "pipeline", "evaluate"
    }  # fmt: skip
    assert build._dependents(["llm"]) == {"llm", "reader", "llm_2", "pipeline", "evaluate"}
    assert build._dependents(["llm_2"]) == {"llm_2", "pipeline", "evaluate"}


def test_dry_run_prints_the_commands(tmp_path, capsys):
    config_dir = _config_dir(tmp_path)
    argv = ["--output_dir", str(tmp_path / "o"), "--work_dir", str(tmp_path / "w"), "--config_dir", config_dir]
    assert build.main(argv + ["--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{stage}: " in printed for stage in build.STAGES if stage not in ("llm_2", "verifier"))
    assert "llm_2: " not in printed and "--llm_2" not in printed  # no llm_2 section in build.json
    assert "verifier: " not in printed and "--edit_verifier" not in printed  # nor a verifier section
    assert "--channel_shuffle_prob 0.5" in printed and "--corrupted_image_pairs" in printed
    assert "fit_attribute_reader.py" in printed and "--max_train_steps 20 --train_batch_size 8" in printed
    assert "--mm_adapter " + os.path.join(str(tmp_path / "w"), "reader", "mm_adapter") in printed
    assert not (tmp_path / "w" / "build_log.json").exists()
    # An llm_2 section: the llm stage's options with another seed, the first LLM's tokenizer, the fitted reader.
    settings = json.loads(open(os.path.join(config_dir, "build.json")).read())
    settings["llm_2"] = {"seed_offset": 3, "learning_rate": 0.001}
    with open(os.path.join(config_dir, "build.json"), "w") as f:
        json.dump(settings, f)
    assert build.main(argv + ["--dry_run"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("llm_2: "))
    work = str(tmp_path / "w")
    assert "--seed 3 " in line and "--learning_rate 0.001" in line and "--embed_dim 16" in line
    assert "--pretrained_llm_tokenizer " + os.path.join(work, "llm", "llm_tokenizer") in line
    assert "--attribute_reader " + os.path.join(work, "reader", ATTRIBUTE_HEADS_FILE) in line
    del settings["llm_2"]
    with open(os.path.join(config_dir, "build.json"), "w") as f:
        json.dump(settings, f)
    # An LLM without attribute tokens has no reader to fit: no reader stage, the LLM's adapter is the pipeline's.
    settings = json.loads(open(os.path.join(config_dir, "build.json")).read())
    del settings["llm"]["attribute_reader"]
    with open(os.path.join(config_dir, "build.json"), "w") as f:
        json.dump(settings, f)
    assert build.main(argv + ["--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "reader: " not in printed and "llm: " in printed and "pipeline: " in printed
    assert "--mm_adapter " + os.path.join(str(tmp_path / "w"), "llm", "mm_adapter") in printed


def test_missing_config_is_named(tmp_path, capsys):
    config_dir = _config_dir(tmp_path)
    os.remove(os.path.join(config_dir, "unet.json"))
    with pytest.raises(SystemExit):
        build.parse_args(["--output_dir", "o", "--config_dir", config_dir])
    assert "has no unet.json" in capsys.readouterr().err
    (tmp_path / "text").mkdir()
    text_config_dir = _config_dir(tmp_path / "text", text_decoder=True)
    os.remove(os.path.join(text_config_dir, "text_encoder.json"))
    with pytest.raises(SystemExit):
        build.parse_args(["--output_dir", "o", "--config_dir", text_config_dir])
    assert "there is no text_encoder.json" in capsys.readouterr().err


def test_second_llm_must_share_the_first_llms_tokenizer(tmp_path):
    from diffusers_any2pix.testing_utils import tiny_llm_tokenizer
    from diffusers_any2pix.word_tokenizer import build_word_level_tokenizer

    tiny_llm_tokenizer().save_pretrained(str(tmp_path / "first"))
    build_word_level_tokenizer(["another vocabulary"]).save_pretrained(str(tmp_path / "second" / "llm_tokenizer"))
    with pytest.raises(ValueError, match=r"--llm_2 '.*second': its llm_tokenizer differs from '.*first'"):
        build._second_llm(str(tmp_path / "second"), str(tmp_path / "first"))
    assert build._second_llm(None, str(tmp_path / "first")) == {}
