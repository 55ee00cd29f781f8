"""The training scripts of ``training/`` run end to end on tiny ShapesWorld data with tiny models: features,
the LLM (full, LoRA, two data-parallel processes), the prior (exact resumption), the decoder (IP-Adapter for SD/SDXL,
ImageBind-native UNet, VAE); the saved components load into `InstructAny2PixPipeline` and edit an image; bad data and
a non-finite loss stop the run with errors that name what went wrong."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from diffusers_any2pix.data import MMInstDataError
from diffusers_any2pix.models.imagebind import ImageBindModel
from diffusers_any2pix.models.mm_adapter import MultimodalAdapter
from diffusers_any2pix.models.prior import Any2PixPrior
from diffusers_any2pix.multimodal_llm import find_embedding_positions, get_multimodal_token_ids, parse_answer
from diffusers_any2pix.pipeline_instruct_any2pix import InstructAny2PixPipeline
from diffusers_any2pix.processing_imagebind import ImageBindProcessor
from diffusers_any2pix.shapes import generate_dataset
from diffusers_any2pix.testing_utils import TINY_EMBED_DIM, tiny_clip_tokenizer, tiny_pipeline_components
from diffusers_any2pix.training_utils import NonFiniteLossError, parameters_digest
from test_training_data import _edit_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENE = "media/scenes"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"training_{name}", os.path.join(REPO, "training", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load_script("prepare_data")
train_llm = _load_script("train_llm")
train_prior = _load_script("train_prior")
train_decoder = _load_script("train_decoder")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Tiny ShapesWorld data with ImageBind features (made by prepare_data.py) and tiny saved pipelines."""
    root = tmp_path_factory.mktemp("training")
    data = str(root / "data")
    generate_dataset(data, 20, seed=0, image_size=32, sound_duration=1.0, progress=False)
    pipelines = {}
    for family in ("imagebind", "sd"):
        pipelines[family] = str(root / f"pipeline_{family}")
        InstructAny2PixPipeline(**tiny_pipeline_components(family, answer=None)).save_pretrained(pipelines[family])
    tokenizer = str(root / "imagebind_tokenizer")
    tiny_clip_tokenizer().save_pretrained(tokenizer)
    status = prepare_data.main(
        [
            "--pipeline", pipelines["imagebind"], "--data_dir", data, "--no_progress", "--batch_size", "7",
            "--media_map", f"{data}/train/media.json", f"{data}/val/media.json",
            "--text_media_map", f"{data}/train/text_media.json", "--imagebind_tokenizer", tokenizer,
        ]
    )  # fmt: skip
    assert status == 0
    scene = sorted(os.listdir(os.path.join(data, SCENE)))[0]
    return {
        "root": root,
        "data": data,
        "pipelines": pipelines,
        "tokenizer": tokenizer,
        "scene": f"{data}/{SCENE}/{scene}",
    }


def _common(output_dir, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), "--report_to", "none", "--seed", "0", *extra]


def _edit(pipeline: InstructAny2PixPipeline, scene: str):
    return pipeline(
        "add a red circle to [image1]",
        images=[scene],
        num_inference_steps=2,
        llm_max_new_tokens=4,
        on_invalid_answer="use_base",
        generator=torch.Generator().manual_seed(0),
    )


def _weights(folder: str) -> dict[str, torch.Tensor]:
    name = next(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return load_file(os.path.join(folder, name))


def _train_llm_on(workspace, pipeline_dir, output_dir, steps: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """train_llm.py continued from a trained pipeline with nothing but the data, steps and ``extra`` given."""
    argv = _common(
        output_dir, "--pipeline", str(pipeline_dir), "--data_dir", workspace["data"],
        "--max_train_steps", str(steps), "--train_batch_size", "2", *extra,
    )  # fmt: skip
    return train_llm.main(argv)


def _summary(output_dir) -> dict:
    with open(os.path.join(output_dir, "training_summary.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize(
    "script, flags",
    [
        (prepare_data, ["--media_map", "--inputs", "--text_media_map"]),
        (train_llm, ["--lora", "--base_drop_prob", "--checkpoints_total_limit", "--resume_from_checkpoint"]),
        (train_prior, ["--corrupted_image_pairs", "--condition_dropout_prob", "--report_to"]),
        (train_decoder, ["--mode", "--snr_gamma", "--use_ema", "--validation_pipeline"]),
    ],
)
def test_help(script, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)


# ------------------------------------------------------------------------------------------------ prepare_data


def test_prepare_data_fills_the_media_map_and_resumes(workspace, capsys):
    data = workspace["data"]
    with open(f"{data}/train/media.json") as f:
        media = json.load(f)
    model = ImageBindModel.from_pretrained(workspace["pipelines"]["imagebind"], subfolder="image_encoder").eval()
    digest = parameters_digest({"image_encoder": model})
    for entry in media.values():
        with np.load(os.path.join(data, entry["fpath"])) as npz:
            assert npz.files == ["clip", "encoder_digest"]
            assert npz["clip"].shape == (1, 16) and npz["clip"].dtype == np.float32
            assert str(npz["encoder_digest"]) == digest  # which encoder wrote it
    # The stored vector is ImageBind's embedding of the medium.
    key, entry = next((k, e) for k, e in media.items() if e["media_path"].endswith(".png"))
    pixels = ImageBindProcessor(image_size=model.config.vision_image_size).preprocess_image(
        f"{data}/{entry['media_path']}"
    )
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
    np.testing.assert_allclose(np.load(os.path.join(data, entry["fpath"]))["clip"], expected, rtol=1e-5, atol=1e-6)
    with open(f"{data}/train/text_media.json") as f:
        text_map = json.load(f)
    assert key in text_map and os.path.isfile(os.path.join(data, text_map[key]["fpath"]))
    # Resumable: a second run skips everything.
    capsys.readouterr()
    argv = ["--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", data, "--no_progress"]
    assert prepare_data.main(argv + ["--media_map", f"{data}/train/media.json"]) == 0
    assert f"Encoded 0 feature(s), skipped {len(media)} existing." in capsys.readouterr().out


@pytest.fixture(scope="module")
def patch_data(workspace, tmp_path_factory) -> str:
    """A copy of the workspace data whose image features also hold the patch tokens (prepare_data.py)."""
    data = str(tmp_path_factory.mktemp("patches") / "data")
    shutil.copytree(workspace["data"], data)
    argv = [
        "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", data, "--no_progress",
        "--media_map", f"{data}/train/media.json", f"{data}/val/media.json", "--image_patches",
    ]  # fmt: skip
    assert prepare_data.main(argv) == 0
    return data


def test_prepare_data_adds_patch_tokens_to_images_only(workspace, patch_data, capsys):
    with open(f"{patch_data}/train/media.json") as f:
        media = json.load(f)
    model = ImageBindModel.from_pretrained(workspace["pipelines"]["imagebind"], subfolder="image_encoder").eval()
    processor = ImageBindProcessor(image_size=model.config.vision_image_size)
    images = 0
    for entry in media.values():
        with np.load(os.path.join(workspace["data"], entry["fpath"])) as before:
            pooled = before["clip"]
        with np.load(os.path.join(patch_data, entry["fpath"])) as npz:
            assert np.array_equal(npz["clip"], pooled)  # the pooled vector is unchanged
            if not entry["media_path"].endswith(".png"):
                assert npz.files == ["clip", "encoder_digest"]
                continue
            images += 1
            assert npz.files == ["clip", "encoder_digest", "clip_patches"]
            assert npz["clip_patches"].shape == (4, 16) and npz["clip_patches"].dtype == np.float16
            with torch.no_grad():
                _, patches = model.encode_image_patches(processor.preprocess_image(f"{patch_data}/{entry['media_path']}"))
            # float16 storage: equal up to its rounding (batched and single encodings differ in the last float32 bits).
            np.testing.assert_allclose(npz["clip_patches"].astype(np.float32), patches[0].numpy(), rtol=1e-3, atol=1e-3)
    assert 0 < images < len(media)
    # Resumable: files with patches are skipped.
    capsys.readouterr()
    argv = ["--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", patch_data, "--no_progress"]
    assert prepare_data.main(argv + ["--media_map", f"{patch_data}/train/media.json", "--image_patches"]) == 0
    assert f"Encoded 0 feature(s), skipped {len(media)} existing." in capsys.readouterr().out


def test_prepare_data_encodes_again_what_another_encoder_wrote(workspace, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(workspace["data"], data)
    with open(f"{data}/train/media.json") as f:
        media = json.load(f)
    # Another encoder: the workspace's with one weight changed (a retrained ImageBind, as far as the files can tell).
    pipeline = str(tmp_path / "retrained")
    shutil.copytree(workspace["pipelines"]["imagebind"], pipeline)
    retrained = ImageBindModel.from_pretrained(pipeline, subfolder="image_encoder")
    with torch.no_grad():
        retrained.vision_head.projection.weight.mul_(-1.0)
    retrained.save_pretrained(os.path.join(pipeline, "image_encoder"))
    # A hand-made file without the record (as the official release's are) must be kept as it is.
    kept_key, kept = next((k, e) for k, e in media.items() if e["media_path"].endswith(".png"))
    hand_made = np.full((1, 16), 7.0, dtype=np.float32)
    np.savez(os.path.join(data, kept["fpath"]), clip=hand_made)
    capsys.readouterr()
    argv = ["--pipeline", pipeline, "--data_dir", data, "--no_progress", "--media_map", f"{data}/train/media.json"]
    assert prepare_data.main(argv) == 0
    out = capsys.readouterr().out
    assert f"Encoded {len(media) - 1} feature(s), skipped 1 existing." in out
    assert f"{len(media) - 1} of them replaced features written by another image encoder." in out
    retrained.eval()
    digest = parameters_digest({"image_encoder": retrained})
    processor = ImageBindProcessor(image_size=retrained.config.vision_image_size)
    for key, entry in media.items():
        with np.load(os.path.join(data, entry["fpath"])) as npz:
            if key == kept_key:
                assert npz.files == ["clip"] and np.array_equal(npz["clip"], hand_made)
                continue
            assert str(npz["encoder_digest"]) == digest
            if entry["media_path"].endswith(".png"):
                with torch.no_grad():
                    expected = retrained.encode_image(processor.preprocess_image(f"{data}/{entry['media_path']}"))
                np.testing.assert_allclose(npz["clip"], expected.numpy(), rtol=1e-5, atol=1e-6)
    # The same encoder again: nothing to do.
    assert prepare_data.main(argv) == 0
    assert f"Encoded 0 feature(s), skipped {len(media)} existing." in capsys.readouterr().out


def test_prepare_data_folder_reports_unreadable_files_and_continues(workspace, tmp_path, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    scenes = sorted(os.listdir(os.path.join(workspace["data"], SCENE)))[:3]
    for name in scenes:
        shutil.copy(os.path.join(workspace["data"], SCENE, name), folder / name)
    sound = sorted(os.listdir(os.path.join(workspace["data"], "media", "sounds")))[0]
    shutil.copy(os.path.join(workspace["data"], "media", "sounds", sound), folder / sound)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "silence.flac").write_bytes(b"")
    argv = ["--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", str(tmp_path), "--inputs", str(folder)]
    assert prepare_data.main(argv + ["--no_progress"]) == 1
    out = capsys.readouterr().out
    assert "2 medium/media could not be read" in out and "broken.png" in out and "silence.flac" in out
    assert "Encoded 4 feature(s)" in out
    with open(tmp_path / "media.json") as f:
        media = json.load(f)
    assert len(media) == 6  # every medium is in the map; the two unreadable ones have no feature yet
    assert (
        media[scenes[0][: -len(".png")].replace("_", " ").replace("-", " ")]["fpath"]
        == f"features/media/{scenes[0]}.npz"
    )
    assert all(
        os.path.isfile(tmp_path / e["fpath"])
        for e in media.values()
        if "broken" not in e["fpath"] and "silence" not in e["fpath"]
    )
    # A rerun retries only the failures; a file list (paths relative to --data_dir) names the same media.
    assert prepare_data.main(argv + ["--no_progress"]) == 1
    assert "Encoded 0 feature(s), skipped 4 existing." in capsys.readouterr().out
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"media/{name}" for name in sorted(os.listdir(folder))) + "\n")
    argv = ["--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", str(tmp_path), "--no_progress"]
    argv += ["--file_list", str(listing), "--output_media_map", str(tmp_path / "listed.json")]
    assert prepare_data.main(argv) == 1
    assert "Encoded 0 feature(s), skipped 4 existing." in capsys.readouterr().out
    with open(tmp_path / "listed.json") as f:
        assert json.load(f) == media


def test_prepare_data_rejects_media_outside_the_data_folder(workspace, tmp_path):
    args = prepare_data.parse_args(
        [
            "--pipeline",
            workspace["pipelines"]["imagebind"],
            "--data_dir",
            str(tmp_path),
            "--inputs",
            workspace["scene"],
        ]
    )
    with pytest.raises(ValueError, match="is not under `--data_dir`"):
        prepare_data.prepare_features(args)


# ------------------------------------------------------------------------------------------------ train_prior


def test_train_prior_resumes_exactly_and_the_pipeline_edits(workspace, tmp_path):
    out = tmp_path / "prior"
    source = workspace["pipelines"]["imagebind"]
    argv = _common(
        out,
        "--pretrained_prior", os.path.join(source, "prior"), "--data_dir", workspace["data"],
        "--text_media_map", f"{workspace['data']}/train/text_media.json", "--text_to_image_pairs",
        "--corrupted_image_pairs", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--train_batch_size", "4",
    )  # fmt: skip
    train_prior.main(argv)
    assert _summary(out)["global_step"] == 4
    final = _weights(out / "prior")
    optimizer_at_4 = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=False)
    initial = _weights(os.path.join(source, "prior"))
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    # Interrupt after step 2: drop what came later and resume from the latest checkpoint.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "prior")
    train_prior.main(argv + ["--resume_from_checkpoint", "latest"])
    resumed = _weights(out / "prior")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    resumed_optimizer = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=False)
    for index, state in optimizer_at_4["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed_optimizer["state"][index][name]), (index, name)

    pipeline = InstructAny2PixPipeline.from_pretrained(source, prior=Any2PixPrior.from_pretrained(out / "prior"))
    assert all(torch.equal(p, resumed[n]) for n, p in pipeline.prior.state_dict().items())
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)


def test_non_finite_loss_stops_with_the_step(workspace, tmp_path):
    argv = _common(
        tmp_path / "nan",
        "--pretrained_prior", os.path.join(workspace["pipelines"]["imagebind"], "prior"),
        "--data_dir", workspace["data"], "--corrupted_image_pairs", "--max_train_steps", "4",
        "--learning_rate", "1e30", "--max_grad_norm", "0",
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 2 \(\[nan\]"):
        train_prior.main(argv)
    assert not os.path.exists(tmp_path / "nan" / "prior")


def test_corrupt_feature_file_stops_training_naming_it(workspace, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(workspace["data"], data)
    for root, _, files in os.walk(os.path.join(data, "features")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    argv = _common(
        tmp_path / "out",
        "--pretrained_prior", os.path.join(workspace["pipelines"]["imagebind"], "prior"),
        "--data_dir", data, "--corrupted_image_pairs", "--max_train_steps", "1",
    )  # fmt: skip
    with pytest.raises(
        MMInstDataError,
        match=r"Cannot read feature file .*features/media/.*\.npz \(media map .*media\.json:\d+ \(entry '",
    ):
        train_prior.main(argv)


# ------------------------------------------------------------------------------------------------ train_llm


def test_train_llm_saves_a_pipeline_that_edits_and_resumes_at_the_step(workspace, tmp_path):
    out = tmp_path / "llm"
    argv = _common(
        out,
        "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--checkpointing_steps", "2", "--gradient_checkpointing",
    )  # fmt: skip
    train_llm.main(argv)
    summary = _summary(out)
    assert summary["global_step"] == 4 and summary["final_logs"]["embedding_loss"] > 0
    before = _weights(os.path.join(workspace["pipelines"]["imagebind"], "mm_adapter"))
    after = _weights(out / "mm_adapter")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # projector and head both trained

    shutil.rmtree(out / "checkpoint-4")
    train_llm.main(argv + ["--resume_from_checkpoint", "latest"])
    assert _summary(out)["global_step"] == 4 and os.path.isdir(out / "checkpoint-4")
    pipeline = InstructAny2PixPipeline.from_pretrained(str(out))
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)


def test_train_llm_lora_from_a_plain_causal_lm(workspace, tmp_path):
    source = workspace["pipelines"]["imagebind"]
    out = tmp_path / "lora"
    argv = _common(
        out,
        "--pretrained_llm", f"{source}/llm", "--pretrained_llm_tokenizer", f"{source}/llm_tokenizer",
        "--embed_dim", "16", "--lora", "--lora_rank", "4", "--data_dir", workspace["data"],
        "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-2",
    )  # fmt: skip
    train_llm.main(argv)
    merged = _weights(out / "llm")
    assert not any("lora" in key for key in merged)
    base = _weights(f"{source}/llm")
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    components = tiny_pipeline_components("imagebind", answer=None)
    components.update(
        llm=AutoModelForCausalLM.from_pretrained(out / "llm"),
        llm_tokenizer=train_llm.AutoTokenizer.from_pretrained(out / "llm_tokenizer"),
        mm_adapter=train_llm.MultimodalAdapter.from_pretrained(out / "mm_adapter"),
    )
    assert _edit(InstructAny2PixPipeline(**components), workspace["scene"]).images[0].size == (32, 32)


def test_train_llm_on_two_processes_ends_with_identical_weights(workspace, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free rendezvous port, so parallel test runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
        os.path.join(REPO, "training", "train_llm.py"), "--cpu",
        *_common(out, "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
                 "--max_train_steps", "3", "--train_batch_size", "2"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = _summary(out)
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    assert summary["global_step"] == 3
    assert len(summary["parameter_digests"]) == 2 and len(set(summary["parameter_digests"])) == 1
    assert "4 in total (x2 processes" in result.stderr


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda r: r["conversations"][0].update(value=r["conversations"][0]["value"] + " near [a unicorn]"),
            r"instruction\.json:\d+ \(entry 1, id 'train-000001', field `conversations\[0\]\.value`\): caption "
            r"'\[a unicorn\]' is missing from the media map",
        ),
        (
            lambda r: r.update(instruction=r["instruction"].replace("[image1]", "[image2]")),
            r"instruction\.json:\d+ \(entry 1, id 'train-000001', field `instruction`\): .*\[image2\]",
        ),
    ],
)
def test_train_llm_bad_instructions_are_named(workspace, tmp_path, edit, match):
    data = str(tmp_path / "data")
    shutil.copytree(workspace["data"], data)
    _edit_record(data, 1, edit)
    argv = _common(tmp_path / "out", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", data)
    with pytest.raises(MMInstDataError, match=match):
        train_llm.main(argv + ["--max_train_steps", "1"])


# ------------------------------------------------------------------------------------------------ train_decoder


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_train_decoder_ip_adapter(workspace, tmp_path, family):
    source = workspace["pipelines"].get(family)
    if source is None:  # the SDXL pipeline is built only here, to keep the module fixture small
        source = str(tmp_path / "pipeline_sdxl")
        InstructAny2PixPipeline(**tiny_pipeline_components("sdxl", answer=None)).save_pretrained(source)
    out = tmp_path / "ip"
    argv = _common(
        out,
        "--mode", "ip_adapter", "--pipeline", source, "--data_dir", workspace["data"], "--max_train_steps", "2",
        "--train_batch_size", "2", "--use_ema", "--snr_gamma", "5",
    )  # fmt: skip
    if family == "sd":  # validation renders through the pipeline with the (EMA) adapter swapped in
        argv += ["--validation_instruction", "add a red circle to [image1]", "--validation_images", workspace["scene"]]
        argv += ["--validation_inference_steps", "2", "--validation_steps", "2"]
    train_decoder.main(argv)
    trained, initial = _weights(out / "ip_adapter"), _weights(os.path.join(source, "ip_adapter"))
    assert sorted({k.split(".")[0] for k in trained}) == ["image_proj", "ip_adapter"]  # the standard layout
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)
    unet, frozen = _weights(out / "unet"), _weights(os.path.join(source, "unet"))
    assert all(torch.equal(unet[k], frozen[k]) for k in frozen)
    assert os.path.isfile(out / "validation" / "step-000002-0.png") == (family == "sd")
    pipeline = InstructAny2PixPipeline.from_pretrained(str(out))
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)


def test_train_decoder_imagebind_unet_from_scratch_and_vae(workspace, tmp_path):
    source = workspace["pipelines"]["imagebind"]
    out = tmp_path / "unet"
    argv = _common(
        out,
        "--mode", "imagebind_unet", "--unet_config", os.path.join(source, "unet", "config.json"),
        "--pretrained_vae", os.path.join(source, "vae"), "--data_dir", workspace["data"], "--max_train_steps", "2",
        "--train_batch_size", "2", "--use_ema",
    )  # fmt: skip
    train_decoder.main(argv)
    assert _summary(out)["global_step"] == 2
    # ... with the inference scheduler of its training noise schedule.
    scheduler = train_decoder.DDIMScheduler.from_pretrained(out / "scheduler")
    assert (scheduler.config.beta_schedule, scheduler.config.clip_sample) == ("scaled_linear", False)
    vae_out = tmp_path / "vae"
    argv = _common(
        vae_out,
        "--mode", "vae", "--vae_config", os.path.join(source, "vae", "config.json"), "--resolution", "32",
        "--data_dir", workspace["data"], "--max_train_steps", "2", "--train_batch_size", "2",
    )  # fmt: skip
    train_decoder.main(argv)
    assert _summary(vae_out)["final_logs"]["kl_loss"] > 0
    # A VAE trained anew gets the scaling factor that makes its latents unit-variance (the config's value is replaced).
    trained_vae = train_decoder.AutoencoderKL.from_pretrained(vae_out / "vae")
    with open(os.path.join(source, "vae", "config.json")) as f:
        assert trained_vae.config.scaling_factor != json.load(f)["scaling_factor"]
    assert 0 < trained_vae.config.scaling_factor < 100
    pipeline = InstructAny2PixPipeline.from_pretrained(
        source,
        unet=train_decoder.UNet2DConditionModel.from_pretrained(out / "unet"),
        vae=train_decoder.AutoencoderKL.from_pretrained(vae_out / "vae"),
    )
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)


@pytest.fixture(scope="module")
def word_tokenizer(workspace) -> tuple[str, str]:
    """The ShapesWorld tokenizer (one token per word, as the build uses) and a tiny text encoder config for it."""
    tokenizer = _load_script("train_imagebind").shapes_world_tokenizer()
    folder = workspace["root"] / "word_tokenizer"
    tokenizer.save_pretrained(str(folder))
    with open(os.path.join(workspace["pipelines"]["sd"], "text_encoder", "config.json")) as f:
        config = {**json.load(f), "vocab_size": len(tokenizer), "bos_token_id": 617, "eos_token_id": 618}
    path = workspace["root"] / "word_text_encoder.json"
    path.write_text(json.dumps(config))
    return str(folder), str(path)


def test_train_decoder_text_unet_from_scratch_matches_the_pipeline(workspace, word_tokenizer, tmp_path):
    source = workspace["pipelines"]["sd"]
    out = tmp_path / "text_unet"
    argv = _common(
        out,
        "--mode", "text_unet", "--unet_config", os.path.join(source, "unet", "config.json"),
        "--text_encoder_config", word_tokenizer[1],
        "--pretrained_tokenizer", word_tokenizer[0], "--pretrained_vae", os.path.join(source, "vae"),
        "--data_dir", workspace["data"], "--max_train_steps", "2", "--train_batch_size", "2", "--use_ema",
        "--learning_rate", "1e-3", "--max_prompt_length", "60",
    )  # fmt: skip
    train_decoder.main(argv)
    assert _summary(out)["global_step"] == 2
    # The shorter padding is saved with the tokenizer, so the pipeline pads prompts the same way.
    assert train_decoder.AutoTokenizer.from_pretrained(out / "tokenizer").model_max_length == 60
    for folder in ("unet", "text_encoder", "tokenizer", "ip_adapter", "scheduler"):
        assert os.path.isdir(out / folder), folder
    # The UNet is saved clean (the pipeline attaches its ip_adapter) and the adapter in the standard layout.
    unet = train_decoder.UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.encoder_hid_dim_type is None and train_decoder.detect_decoder_family(unet) == "sd"
    assert sorted({k.split(".")[0] for k in _weights(out / "ip_adapter")}) == ["image_proj", "ip_adapter"]
    # The text encoder was built from the config (sized for the word-level tokenizer).
    assert _weights(out / "text_encoder")["embeddings.token_embedding.weight"].shape == (619, 16)

    pipeline = InstructAny2PixPipeline.from_pretrained(
        source,
        unet=unet,
        text_encoder=train_decoder.CLIPTextModel.from_pretrained(out / "text_encoder"),
        tokenizer=train_decoder.AutoTokenizer.from_pretrained(out / "tokenizer"),
        ip_adapter=train_decoder.ImageBindIPAdapter.from_pretrained(out / "ip_adapter"),
        scheduler=train_decoder.DDIMScheduler.from_pretrained(out / "scheduler"),
    )
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)

    # Parity: the training forward is the pipeline's own UNet call (same prompt ids, hidden states, adapter tokens).
    trained = train_decoder.TextUNetTrainingModel(
        train_decoder.UNet2DConditionModel.from_pretrained(out / "unet"),
        train_decoder.ImageBindIPAdapter.from_pretrained(out / "ip_adapter"),
        train_decoder.CLIPTextModel.from_pretrained(out / "text_encoder"),
    ).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    embeds = torch.randn(2, trained.adapter.config.image_embed_dim, generator=generator)
    captions = ["a red circle on the left, on a plain background", "a blue star in the middle, on a dotted background"]
    prompts = [train_decoder.DEFAULT_PROMPT_TEMPLATE.format(caption=c) for c in captions]
    with torch.no_grad():
        ids = train_decoder.decoder_prompt_ids(prompts, pipeline.tokenizer)
        ours = trained(sample, torch.tensor([10, 500]), embeds, ids)
        kwargs = pipeline._decoder_conditioning(
            captions, embeds, "", train_decoder.DEFAULT_PROMPT_TEMPLATE, 32, 32, torch.device("cpu"), do_cfg=False
        )
        theirs = pipeline.unet(sample, torch.tensor([10, 500]), **kwargs).sample
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--unet_config", "u.json"], "give both `--unet_config` and `--text_encoder_config`"),
        (["--text_encoder_config", "t.json"], "give both"),
    ],
)
def test_train_decoder_text_unet_bad_arguments(workspace, tmp_path, extra, match):
    argv = _common(tmp_path, "--mode", "text_unet", "--data_dir", workspace["data"], *extra)
    with pytest.raises(ValueError, match=match):
        train_decoder.parse_args(argv)
    with pytest.raises(ValueError, match="only for --mode text_unet"):
        train_decoder.parse_args(_common(tmp_path, "--mode", "imagebind_unet", "--data_dir", workspace["data"],
                                         "--text_encoder_config", "t.json"))  # fmt: skip


def test_train_decoder_text_unet_refuses_prompts_that_would_be_cut(workspace, word_tokenizer, tmp_path):
    source = workspace["pipelines"]["sd"]
    argv = _common(
        tmp_path / "o", "--mode", "text_unet", "--unet_config", os.path.join(source, "unet", "config.json"),
        "--text_encoder_config", word_tokenizer[1],
        "--pretrained_tokenizer", word_tokenizer[0], "--pretrained_vae", os.path.join(source, "vae"),
        "--data_dir", workspace["data"], "--max_train_steps", "1", "--max_prompt_length", "8",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"tokens, more than the 8 the tokenizer pads to: raise --max_prompt_length"):
        train_decoder.main(argv)


def test_train_decoder_text_unet_checks_sizes(workspace, word_tokenizer, tmp_path):
    source = workspace["pipelines"]["sd"]
    with open(word_tokenizer[1]) as f:
        config = json.load(f)
    wrong = tmp_path / "text_encoder.json"
    wrong.write_text(json.dumps({**config, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}))
    argv = _common(
        tmp_path / "o", "--mode", "text_unet", "--unet_config", os.path.join(source, "unet", "config.json"),
        "--text_encoder_config", str(wrong), "--pretrained_tokenizer", word_tokenizer[0],
        "--pretrained_vae", os.path.join(source, "vae"), "--data_dir", workspace["data"], "--max_train_steps", "1",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"hidden_size \(8\) must equal unet.config.cross_attention_dim \(16\)"):
        train_decoder.main(argv)


def test_train_decoder_checks_the_unet_family(workspace, tmp_path):
    argv = _common(
        tmp_path / "x", "--mode", "ip_adapter", "--pipeline", workspace["pipelines"]["imagebind"],
        "--data_dir", workspace["data"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs a text-to-image"):
        train_decoder.main(argv)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process; a run with another mixed precision needs it reset (before and
    after, so the other tests see a clean state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_bf16_mixed_precision_runs(workspace, tmp_path, fresh_accelerate_state):
    source = workspace["pipelines"]["imagebind"]
    common = ("--data_dir", workspace["data"], "--max_train_steps", "1", "--mixed_precision", "bf16")
    summary = train_llm.main(_common(tmp_path / "llm", "--pipeline", source, "--lora", "--lora_rank", "4", *common))
    assert summary["global_step"] == 1 and summary["final_logs"]["embedding_loss"] > 0
    argv = _common(tmp_path / "vae", "--mode", "vae", "--pipeline", source, "--resolution", "32", *common)
    assert train_decoder.main(argv)["final_logs"]["kl_loss"] > 0


def test_latent_scaling_factor_is_one_over_the_latent_std():
    from diffusers_any2pix.testing_utils import tiny_vae

    vae = tiny_vae().eval()
    generator = torch.Generator().manual_seed(0)
    dataset = [{"pixel_values": torch.rand(3, 32, 32, generator=generator) * 2 - 1} for _ in range(5)]
    with torch.no_grad():
        means = vae.encode(torch.stack([item["pixel_values"] for item in dataset[:4]])).latent_dist.mean
    factor = train_decoder.latent_scaling_factor(vae, dataset, num_images=4, batch_size=3)
    assert factor == pytest.approx(1.0 / means.std().item(), rel=1e-5)


def test_train_llm_from_scratch_with_a_word_level_tokenizer(workspace, tmp_path):
    config = tmp_path / "llm_config.json"
    config.write_text(
        json.dumps(
            {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}
        )
    )  # fmt: skip
    out = tmp_path / "llm"
    argv = _common(
        out, "--llm_config", str(config), "--embed_dim", "16", "--data_dir", workspace["data"],
        "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--answer_noise_prob", "0.2", "--reproduce_prob", "0.5",  # the ShapesWorld build's auxiliary sampling
        "--answer_swap_words", "red,orange,yellow,green,blue,purple", "circle, square,triangle,star,cross",
    )  # fmt: skip
    summary = train_llm.main(argv)
    assert summary["global_step"] == 2 and summary["final_logs"]["embedding_loss"] > 0
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    tokenizer = train_llm.AutoTokenizer.from_pretrained(out / "llm_tokenizer")
    assert llm.config.hidden_size == 32 and llm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert llm.config.pad_token_id == tokenizer.pad_token_id is not None
    with open(os.path.join(workspace["data"], "train", "instruction.json")) as f:
        answer = json.load(f)[0]["conversations"][1]["value"]
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == answer
    # The new components swap into a pipeline of the same embedding size and edit.
    pipeline = InstructAny2PixPipeline.from_pretrained(
        workspace["pipelines"]["imagebind"],
        llm=llm,
        llm_tokenizer=tokenizer,
        mm_adapter=train_llm.MultimodalAdapter.from_pretrained(out / "mm_adapter"),
    )
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)


def test_train_llm_adds_a_patch_resampler_to_a_pipeline_and_it_edits(workspace, patch_data, tmp_path):
    argv = _common(
        tmp_path / "llm", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", patch_data,
        "--max_train_steps", "2", "--train_batch_size", "2", "--image_patch_tokens", "3",
        "--resampler_hidden_size", "16", "--resampler_depth", "1", "--resampler_heads", "2",
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 2
    before = _weights(os.path.join(workspace["pipelines"]["imagebind"], "mm_adapter"))
    after = _weights(tmp_path / "llm" / "mm_adapter")
    assert set(before) < set(after) and {k for k in after if k not in before} == {
        k for k in after if k.startswith("patch_resampler.")
    }
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the loaded projector and head trained on
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    config = pipeline.mm_adapter.config
    assert (config.image_patch_tokens, config.patch_embed_dim, pipeline.mm_adapter.tokens_per_image) == (3, 16, 4)
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)
    # Resuming with another number of tokens would not fit the trained resampler.
    argv = _common(
        tmp_path / "again", "--pipeline", str(tmp_path / "llm"), "--data_dir", patch_data,
        "--max_train_steps", "1", "--image_patch_tokens", "5",
    )  # fmt: skip
    with pytest.raises(ValueError, match="`--image_patch_tokens` 5 differs from the loaded mm_adapter's 3"):
        train_llm.main(argv)
    # Feature files without patch tokens stop training, naming the file and the fix.
    argv = _common(
        tmp_path / "plain", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "1", "--train_batch_size", "2", "--image_patch_tokens", "3",
        "--resampler_hidden_size", "16", "--resampler_heads", "2",
    )  # fmt: skip
    with pytest.raises(MMInstDataError, match=r"features/media/.*\.npz .*has no array 'clip_patches'.*--image_patches"):
        train_llm.main(argv)


def test_train_llm_gives_a_pipeline_attribute_tokens_from_heads_and_keeps_them_frozen(workspace, tmp_path):
    from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads

    g = torch.Generator().manual_seed(0)
    heads = AttributeHeads(torch.randn(5, TINY_EMBED_DIM, generator=g), torch.randn(5, generator=g), (3, 2), 4.0)
    (tmp_path / "imagebind").mkdir()
    heads.save(str(tmp_path / "imagebind" / ATTRIBUTE_HEADS_FILE))
    argv = _common(
        tmp_path / "llm", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "2", "--train_batch_size", "2", "--attribute_reader", str(tmp_path / "imagebind"),
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 2
    before = _weights(os.path.join(workspace["pipelines"]["imagebind"], "mm_adapter"))
    after = _weights(tmp_path / "llm" / "mm_adapter")
    assert {k for k in after if k not in before} == {
        "attribute_reader.weight", "attribute_reader.bias", "attribute_embedding.weight"
    }
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the loaded projector and head trained on
    # The reader holds the heads, rescaled from their norm (4) to the adapter's (20), and did not train.
    assert torch.equal(after["attribute_reader.weight"], heads.weight * (4.0 / 20.0))
    assert torch.equal(after["attribute_reader.bias"], heads.bias)
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    assert pipeline.mm_adapter.config.attribute_classes == [3, 2] and pipeline.mm_adapter.tokens_per_medium == 3
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)
    # Trained on without heads, a loaded reader stays as it is (it was fitted to labels; the LLM's loss has none).
    assert _train_llm_on(workspace, tmp_path / "llm", tmp_path / "more")["global_step"] == 1
    more = _weights(tmp_path / "more" / "mm_adapter")
    assert torch.equal(more["attribute_reader.weight"], after["attribute_reader.weight"])
    assert not torch.equal(more["attribute_embedding.weight"], after["attribute_embedding.weight"])
    # Heads of other fields do not fit the adapter trained with these.
    other = AttributeHeads(torch.randn(6, TINY_EMBED_DIM), torch.randn(6), (4, 2), 4.0)
    other.save(str(tmp_path / "other.safetensors"))
    argv = _common(
        tmp_path / "again", "--pipeline", str(tmp_path / "llm"), "--data_dir", workspace["data"],
        "--max_train_steps", "1", "--attribute_reader", str(tmp_path / "other.safetensors"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"The heads read fields of \(4, 2\) classes but the adapter's"):
        train_llm.main(argv)
    argv[argv.index("--attribute_reader") + 1] = str(tmp_path)  # a folder without a heads file
    with pytest.raises(ValueError, match="No attribute heads file at .*attribute_heads.safetensors"):
        train_llm.main(argv)


def test_train_llm_attribute_words_tie_attribute_tokens_to_the_llms_class_words(workspace, tmp_path):
    from diffusers_any2pix.models.mm_adapter import AttributeHeads

    pipeline_dir = workspace["pipelines"]["imagebind"]
    tokenizer = train_llm.AutoTokenizer.from_pretrained(os.path.join(pipeline_dir, "llm_tokenizer"))
    names = (("red", "blue", "green"), ("", "circle"))
    expected_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] if w else -1 for f in names for w in f]
    assert [tokenizer.decode([i]) if i >= 0 else "" for i in expected_ids] == ["red", "blue", "green", "", "circle"]
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, TINY_EMBED_DIM, generator=g), torch.randn(5, generator=g)
    AttributeHeads(weight, bias, (3, 2), 4.0, class_names=names).save(str(tmp_path / "named.safetensors"))
    argv = _common(
        tmp_path / "llm", "--pipeline", pipeline_dir, "--data_dir", workspace["data"], "--max_train_steps", "2",
        "--train_batch_size", "2", "--attribute_reader", str(tmp_path / "named.safetensors"), "--attribute_words",
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 2
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    assert pipeline.mm_adapter.config.attribute_word_ids == expected_ids
    assert pipeline.mm_adapter.ties_attribute_words
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)
    # Trained on, the adapter keeps its words; heads without class names, or words the tokenizer does not know, are
    # refused before training.
    assert _train_llm_on(workspace, tmp_path / "llm", tmp_path / "more")["global_step"] == 1
    assert InstructAny2PixPipeline.from_pretrained(str(tmp_path / "more")).mm_adapter.config.attribute_word_ids == (
        expected_ids
    )
    AttributeHeads(weight, bias, (3, 2), 4.0).save(str(tmp_path / "unnamed.safetensors"))
    argv = _common(
        tmp_path / "x", "--pipeline", pipeline_dir, "--data_dir", workspace["data"], "--max_train_steps", "1",
        "--attribute_reader", str(tmp_path / "unnamed.safetensors"), "--attribute_words",
    )  # fmt: skip
    with pytest.raises(ValueError, match="`--attribute_words` needs attribute heads that name their classes"):
        train_llm.main(argv)
    # Heads naming the classes in another order give other ids than the loaded adapter was trained with.
    AttributeHeads(weight, bias, (3, 2), 4.0, class_names=(("blue", "red", "green"), ("", "circle"))).save(
        str(tmp_path / "reordered.safetensors")
    )
    argv_loaded = _common(
        tmp_path / "y", "--pipeline", str(tmp_path / "llm"), "--data_dir", workspace["data"], "--max_train_steps", "1",
        "--attribute_reader", str(tmp_path / "reordered.safetensors"), "--attribute_words",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`--attribute_words` gives token ids .* but the loaded mm_adapter was"):
        train_llm.main(argv_loaded)
    unknown = (("red", "blue", "zyzzyva"), ("", "circle"))
    AttributeHeads(weight, bias, (3, 2), 4.0, class_names=unknown).save(str(tmp_path / "unknown.safetensors"))
    argv[argv.index("--attribute_reader") + 1] = str(tmp_path / "unknown.safetensors")
    with pytest.raises(ValueError, match=r"the class word 'zyzzyva' is not one token of the LLM's tokenizer"):
        train_llm.main(argv)


def test_train_llm_attribute_token_groups_sum_fields_into_shared_tokens(workspace, tmp_path):
    from diffusers_any2pix.models.mm_adapter import AttributeHeads

    g = torch.Generator().manual_seed(0)
    heads = AttributeHeads(torch.randn(7, TINY_EMBED_DIM, generator=g), torch.randn(7, generator=g), (3, 2, 2), 4.0)
    heads.save(str(tmp_path / "heads.safetensors"))
    common = ("--data_dir", workspace["data"], "--max_train_steps", "2", "--train_batch_size", "2")
    grouped = ("--attribute_reader", str(tmp_path / "heads.safetensors"), "--attribute_token_groups", "0", "1,2")
    pipeline_dir = workspace["pipelines"]["imagebind"]
    assert train_llm.main(_common(tmp_path / "llm", "--pipeline", pipeline_dir, *common, *grouped))["global_step"] == 2
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    adapter = pipeline.mm_adapter
    # Three fields in two tokens: the background's, then one holding both other fields.
    assert adapter.config.attribute_token_groups == [[0], [1, 2]]
    assert adapter.attribute_tokens == 2 and adapter.tokens_per_medium == 3
    media = torch.randn(4, TINY_EMBED_DIM, generator=g)
    ungrouped = MultimodalAdapter.from_config(adapter.config, attribute_token_groups=None)
    ungrouped.load_state_dict(adapter.state_dict())
    with torch.no_grad():
        tokens, fields = adapter.project_tokens(media), ungrouped.project_tokens(media)
    assert tokens.shape == (4, 3, adapter.config.llm_hidden_size) and fields.shape[1] == 4
    assert torch.equal(tokens[:, :2], fields[:, :2])
    torch.testing.assert_close(tokens[:, 2], fields[:, 2] + fields[:, 3])
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)
    # Trained on, the adapter keeps its groups; other groups for it are refused.
    assert _train_llm_on(workspace, tmp_path / "llm", tmp_path / "more")["global_step"] == 1
    more = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "more")).mm_adapter
    assert more.config.attribute_token_groups == [[0], [1, 2]]
    argv = _common(
        tmp_path / "again", "--pipeline", str(tmp_path / "llm"), *common, "--attribute_reader",
        str(tmp_path / "heads.safetensors"), "--attribute_token_groups", "0,1", "2",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`--attribute_token_groups` \[\[0, 1\], \[2\]\] differs from the loaded"):
        train_llm.main(argv)
    # Groups that do not cover the heads' fields exactly once are refused before training.
    argv = _common(
        tmp_path / "bad", "--pipeline", pipeline_dir, *common, "--attribute_reader",
        str(tmp_path / "heads.safetensors"), "--attribute_token_groups", "0", "1",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"partition of the 3 attribute fields' indices 0..2"):
        train_llm.main(argv)


def test_train_llm_adds_media_position_embeddings_that_train(workspace, tmp_path):
    argv = _common(
        tmp_path / "llm", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "2", "--train_batch_size", "2", "--max_media_positions", "4",
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 2
    before = _weights(os.path.join(workspace["pipelines"]["imagebind"], "mm_adapter"))
    after = _weights(tmp_path / "llm" / "mm_adapter")
    assert {k for k in after if k not in before} == {"media_position_embedding.weight"}
    table = after["media_position_embedding.weight"]
    # Zero at the start, trained since: the first place (every example has a base image) moved.
    assert table.shape == (4, pipeline_hidden_size(workspace)) and table[0].abs().sum() > 0
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    assert pipeline.mm_adapter.config.max_media_positions == 4
    assert _edit(pipeline, workspace["scene"]).images[0].size == (32, 32)
    # Going on with another number of places would not fit the trained table.
    argv = _common(
        tmp_path / "again", "--pipeline", str(tmp_path / "llm"), "--data_dir", workspace["data"],
        "--max_train_steps", "1", "--max_media_positions", "2",
    )  # fmt: skip
    with pytest.raises(ValueError, match="`--max_media_positions` 2 differs from the loaded mm_adapter's 4"):
        train_llm.main(argv)
    argv[argv.index("--max_media_positions") + 1] = "-1"
    with pytest.raises(ValueError, match="`--max_media_positions` must be >= 0, got -1"):
        train_llm.main(argv)


def pipeline_hidden_size(workspace) -> int:
    config = json.load(open(os.path.join(workspace["pipelines"]["imagebind"], "mm_adapter", "config.json")))
    return config["llm_hidden_size"]


def test_train_llm_pooled_drop_leaves_out_pooled_vectors_in_training_only(workspace, tmp_path, monkeypatch):
    from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads

    heads = AttributeHeads(torch.randn(5, TINY_EMBED_DIM), torch.randn(5), (3, 2), 4.0)
    heads.save(str(tmp_path / ATTRIBUTE_HEADS_FILE))
    calls = []
    inject = train_llm.inject_media_embeds

    def recording_inject(inputs_embeds, input_ids, media_embeds, *args, **kwargs):
        calls.append((sum(e.shape[0] for e in media_embeds), kwargs.get("drop_pooled")))
        return inject(inputs_embeds, input_ids, media_embeds, *args, **kwargs)

    monkeypatch.setattr(train_llm, "inject_media_embeds", recording_inject)
    argv = _common(
        tmp_path / "llm", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "4", "--train_batch_size", "2", "--attribute_reader", str(tmp_path),
        "--pooled_drop_prob", "0.5",
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 4
    assert len(calls) == 4
    flags = []
    for num_media, drop in calls:  # one flag per medium of the batch, drawn afresh each step
        assert drop.dtype == torch.bool and drop.shape == (num_media,)
        flags += drop.tolist()
    assert 0 < sum(flags) < len(flags)
    # Out of training mode (evaluation) every pooled vector is read.
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    token_ids = get_multimodal_token_ids(pipeline.llm_tokenizer)
    model = train_llm.MultimodalLLMForTraining(pipeline.llm, pipeline.mm_adapter, token_ids, pooled_drop_prob=0.5)
    ids = [token_ids.bos] + [token_ids.video] * 2 * pipeline.mm_adapter.tokens_per_medium + [token_ids.video]
    input_ids = torch.tensor([ids])
    batch = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
        prompt_lengths=[len(ids) - 1],
        media_embeds=[torch.randn(2, TINY_EMBED_DIM)], target_rows=torch.tensor([0]),
        target_positions=torch.tensor([len(ids) - 2]), target_embeds=torch.randn(1, TINY_EMBED_DIM),
    )  # fmt: skip
    calls.clear()
    losses = [model.eval()(**batch).loss, model.eval()(**batch).loss]
    assert [drop for _, drop in calls] == [None, None] and torch.equal(losses[0], losses[1])
    model.train()(**batch)
    assert calls[-1][1].shape == (2,)
    # Without attribute tokens a dropped pooled vector would leave a sound unread.
    argv = _common(
        tmp_path / "plain", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "1", "--pooled_drop_prob", "0.5",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`pooled_drop_prob` .* the adapter has no attribute tokens"):
        train_llm.main(argv)


def test_train_llm_relabel_renames_classes_and_leaves_out_what_still_shows_the_old_names(
    workspace, tmp_path, monkeypatch
):
    from diffusers_any2pix.models.mm_adapter import ATTRIBUTE_HEADS_FILE, AttributeHeads
    from diffusers_any2pix.shapes import ATTRIBUTE_CLASS_NAMES, ATTRIBUTE_CLASSES

    rows = sum(ATTRIBUTE_CLASSES)
    heads = AttributeHeads(
        torch.randn(rows, TINY_EMBED_DIM), torch.randn(rows), ATTRIBUTE_CLASSES, 4.0, class_names=ATTRIBUTE_CLASS_NAMES
    )
    heads.save(str(tmp_path / ATTRIBUTE_HEADS_FILE))
    calls = []
    inject = train_llm.inject_media_embeds

    def recording_inject(inputs_embeds, input_ids, media_embeds, *args, **kwargs):
        calls.append((sum(e.shape[0] for e in media_embeds), kwargs.get("drop_pooled"), kwargs["class_permutation"]))
        return inject(inputs_embeds, input_ids, media_embeds, *args, **kwargs)

    monkeypatch.setattr(train_llm, "inject_media_embeds", recording_inject)
    argv = _common(
        tmp_path / "llm", "--pipeline", workspace["pipelines"]["imagebind"], "--data_dir", workspace["data"],
        "--max_train_steps", "3", "--train_batch_size", "2", "--attribute_reader", str(tmp_path),
        "--relabel_words", "red,green,blue,yellow", "circle,square,triangle,star", "--relabel_prob", "1.0",
    )  # fmt: skip
    assert train_llm.main(argv)["global_step"] == 3
    assert len(calls) == 3
    renamed = 0
    for num_media, drop, permutation in calls:  # every medium relabelled: none keeps its pooled vector
        assert torch.equal(drop, torch.ones(num_media, dtype=torch.bool))
        assert permutation.shape == (num_media, rows)
        renamed += int((permutation != torch.arange(rows)).any(dim=-1).sum())
    assert renamed > 0
    # The embedding loss weighs each target: all 1 is the plain mean, all 0 leaves only the LM loss.
    pipeline = InstructAny2PixPipeline.from_pretrained(str(tmp_path / "llm"))
    token_ids = get_multimodal_token_ids(pipeline.llm_tokenizer)
    model = train_llm.MultimodalLLMForTraining(pipeline.llm, pipeline.mm_adapter, token_ids).eval()
    ids = [token_ids.bos] + [token_ids.video] * pipeline.mm_adapter.tokens_per_medium + [token_ids.video] * 2
    input_ids = torch.tensor([ids])
    batch = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
        prompt_lengths=[len(ids) - 2],
        media_embeds=[torch.randn(1, TINY_EMBED_DIM)], target_rows=torch.tensor([0, 0]),
        target_positions=torch.tensor([len(ids) - 3, len(ids) - 2]), target_embeds=torch.randn(2, TINY_EMBED_DIM),
    )  # fmt: skip
    plain = model(**batch)
    torch.testing.assert_close(model(**batch, target_weights=torch.ones(2)).embedding_loss, plain.embedding_loss)
    zero = model(**batch, target_weights=torch.zeros(2))
    assert zero.embedding_loss.item() == 0.0 and torch.equal(zero.loss, zero.lm_loss)
    half = model(**batch, target_weights=torch.tensor([1.0, 0.0]))
    first = dict(
        batch, target_rows=torch.tensor([0]), target_positions=torch.tensor([len(ids) - 3]),
        target_embeds=batch["target_embeds"][:1],
    )  # fmt: skip
    torch.testing.assert_close(half.embedding_loss, model(**first).embedding_loss)  # the weighted target alone
    # Heads that do not name their classes cannot say which class a word is.
    AttributeHeads(heads.weight, heads.bias, ATTRIBUTE_CLASSES, 4.0).save(str(tmp_path / "unnamed.safetensors"))
    argv[argv.index("--attribute_reader") + 1] = str(tmp_path / "unnamed.safetensors")
    with pytest.raises(ValueError, match=r"`relabel_words` needs `attribute_class_names`"):
        train_llm.main(argv)


def test_train_llm_repeat_records_gives_the_chosen_records_more_samples_per_epoch(workspace, tmp_path, monkeypatch):
    seen = []

    class RecordingDataset(train_llm.MMInstLLMDataset):
        def __init__(self, examples, *args, **kwargs):
            seen.append([e.source.value["type"] for e in examples])
            super().__init__(examples, *args, **kwargs)

    monkeypatch.setattr(train_llm, "MMInstLLMDataset", RecordingDataset)
    with open(os.path.join(workspace["data"], "train", "instruction.json")) as f:
        types = [record["type"] for record in json.load(f)]
    for name, extra in (("plain", []), ("repeated", ["--repeat_records", "type=pick_base:3", "type=add_text:2"])):
        summary = _train_llm_on(workspace, workspace["pipelines"]["imagebind"], tmp_path / name, steps=2, extra=extra)
        assert summary["global_step"] == 2
    plain, repeated = seen
    assert plain == types
    assert repeated == [t for t in types for _ in range({"pick_base": 3, "add_text": 2}.get(t, 1))]
    assert len(repeated) == len(types) + 2 * types.count("pick_base") + types.count("add_text") > len(types)
    # A value no record has is refused before any step (a typo would otherwise change nothing).
    with pytest.raises(ValueError, match=r"\['type=pickbase:3'\] match no record"):
        typo = ["--repeat_records", "type=pickbase:3"]
        _train_llm_on(workspace, workspace["pipelines"]["imagebind"], tmp_path / "typo", extra=typo)


def test_train_llm_describe_base_trains_on_answers_that_write_out_the_base(workspace, tmp_path, monkeypatch):
    datasets = []

    class RecordingDataset(train_llm.MMInstLLMDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            datasets.append(self)

    monkeypatch.setattr(train_llm, "MMInstLLMDataset", RecordingDataset)
    summaries = [
        _train_llm_on(workspace, workspace["pipelines"]["imagebind"], tmp_path / name, steps=2, extra=extra)
        for name, extra in (("plain", []), ("described", ["--describe_base"]))
    ]
    plain, described = datasets
    assert (plain.describe_base, described.describe_base) == (False, True)
    token_ids = described.token_ids
    descriptions = 0
    for index, example in enumerate(described.examples):
        a, b = plain[(0, index)], described[(0, index)]
        answer = parse_answer(described.tokenizer.decode(b["input_ids"][b["prompt_length"] :]))
        assert answer.caption == parse_answer(plain.tokenizer.decode(a["input_ids"][a["prompt_length"] :])).caption
        if not answer.base_null:
            # Compared as the tiny tokenizer spells it (<unk> for some words).
            base = described.tokenizer(example.base, add_special_tokens=False).input_ids
            assert answer.base_caption == parse_answer(described.tokenizer.decode(base)).caption
            descriptions += 1
        positions = find_embedding_positions(b["input_ids"].tolist(), token_ids, start=b["prompt_length"])
        assert b["target_positions"].tolist()[0] == (positions.generation if answer.base_null else positions.base)
    assert descriptions > 0
    # Other answers, other losses; the trained components still edit in a pipeline.
    assert summaries[0]["final_logs"]["lm_loss"] != summaries[1]["final_logs"]["lm_loss"]
    assert _edit(InstructAny2PixPipeline.from_pretrained(str(tmp_path / "described")), workspace["scene"]).images


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--image_patch_tokens", "-2"], r"`--image_patch_tokens` must be >= 0, got -2"),
        (["--pooled_drop_prob", "1.0"], r"`--pooled_drop_prob` must be in \[0, 1\), got 1.0"),
        (["--pooled_drop_prob", "-0.1"], r"`--pooled_drop_prob` must be in \[0, 1\), got -0.1"),
        (["--relabel_prob", "1.5"], r"`--relabel_prob` must be in \[0, 1\], got 1.5"),
        (["--relabel_words", "red,green"], r"`--relabel_words` renames attribute classes: it needs `--attribute_"),
        (["--attribute_words"], r"`--attribute_words` ties attribute tokens to class words: it needs `--attribute_"),
        (["--attribute_token_groups", "0", "1,2"], r"`--attribute_token_groups` groups attribute fields: it needs"),
        (
            ["--attribute_reader", "h", "--attribute_token_groups", "0", "1;2"],
            r"`--attribute_token_groups`: '1;2' is not a comma-separated list of field indices",
        ),
        (
            ["--attribute_reader", "h", "--attribute_token_groups", "0", "1,2", "--relabel_words", "red,green"],
            r"`--relabel_words` renames classes field by field .* drop `--attribute_token_groups`",
        ),
        (["--pretrained_llm", "x"], "exclude each other"),
        (["--lora"], "trains fully"),
        (["--repeat_records", "type=pick_base"], r"FIELD=VALUE:TIMES with TIMES >= 1 .*got 'type=pick_base'"),
    ],
)
def test_train_llm_from_scratch_bad_arguments(workspace, tmp_path, extra, match):
    argv = _common(tmp_path / "x", "--llm_config", "cfg.json", "--data_dir", workspace["data"], *extra)
    with pytest.raises(ValueError, match=match):
        train_llm.parse_args(argv)


def test_train_llm_config_without_model_type_is_named(workspace, tmp_path):
    config = tmp_path / "llm_config.json"
    config.write_text(json.dumps({"hidden_size": 32}))
    argv = _common(tmp_path / "x", "--llm_config", str(config), "--data_dir", workspace["data"], "--max_train_steps", "1")
    with pytest.raises(ValueError, match="no `model_type`"):
        train_llm.main(argv)


def test_shuffle_channels_permutes_whole_images_and_leaves_the_input_alone(tmp_path):
    pixels = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    original = pixels.clone()
    torch.manual_seed(0)
    shuffled = train_decoder.shuffle_channels(pixels, 1.0)
    assert torch.equal(pixels, original)
    changed = 0
    for i in range(4):
        # Each output channel is one whole input channel, each used once.
        sources = [next(c for c in range(3) if torch.equal(shuffled[i, k], pixels[i, c])) for k in range(3)]
        assert sorted(sources) == [0, 1, 2]
        changed += sources != [0, 1, 2]
    assert changed > 0
    assert torch.equal(train_decoder.shuffle_channels(pixels, 0.0), pixels)
    with pytest.raises(ValueError, match="channel_shuffle_prob"):
        train_decoder.parse_args(["--mode", "vae", "--output_dir", "x", "--resolution", "8", "--data_dir", str(tmp_path),
                                  "--channel_shuffle_prob", "1.5"])  # fmt: skip
