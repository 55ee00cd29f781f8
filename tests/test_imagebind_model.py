"""Tests of our ImageBind port: parity with Meta's reference, checkpoint conversion, save/load, input checks."""

import copy
import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from imagebind_reference import load_reference_model_module

from diffusers_any2pix.models.imagebind import (
    ImageBindModel,
    ImageBindOutput,
    convert_meta_imagebind_state_dict,
)

# Meta's constructor hard-codes 224-pixel images, a 77-token context and a 49408-id vocabulary; everything else
# is chosen away from the defaults so that the config plumbing is exercised.
SHARED_KWARGS = dict(
    out_embed_dim=16,
    vision_embed_dim=32,
    vision_num_blocks=2,
    vision_num_heads=2,
    text_embed_dim=24,
    text_num_blocks=2,
    text_num_heads=3,
    audio_embed_dim=32,
    audio_num_blocks=2,
    audio_num_heads=4,
    audio_kernel_size=8,
    audio_stride=6,
    audio_num_mel_bins=32,
    audio_drop_path=0.3,
)
# The two constructors name two settings differently; Meta's also builds the modalities we do not port.
REFERENCE_KWARGS = dict(
    SHARED_KWARGS,
    kernel_size=(2, 16, 16),
    audio_target_len=48,
    depth_embed_dim=16,
    depth_num_blocks=1,
    depth_num_heads=2,
    thermal_embed_dim=16,
    thermal_num_blocks=1,
    thermal_num_heads=2,
    imu_embed_dim=16,
    imu_num_blocks=1,
    imu_num_heads=2,
)
OUR_KWARGS = dict(SHARED_KWARGS, vision_patch_size=16, audio_target_length=48)
TINY_CONFIG = dict(
    out_embed_dim=16,
    vision_embed_dim=32,
    vision_num_blocks=2,
    vision_num_heads=2,
    vision_image_size=28,
    vision_patch_size=14,
    text_embed_dim=32,
    text_num_blocks=2,
    text_num_heads=2,
    text_context_length=8,
    text_vocab_size=64,
    audio_embed_dim=32,
    audio_num_blocks=2,
    audio_num_heads=2,
    audio_num_mel_bins=16,
    audio_target_length=24,
    audio_kernel_size=8,
    audio_stride=8,
)
UNPORTED = {"depth", "thermal", "imu"}


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def reference_model():
    module = load_reference_model_module()
    torch.manual_seed(0)
    model = module.ImageBindModel(**REFERENCE_KWARGS).eval()
    # Meta's init leaves LayerNorms at 1/0, biases at 0 and the logit scale at 1/0.07: randomise them so that
    # a port that ignored any of these weights could not match by chance.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("log_logit_scale"):
                param.fill_(math.log(150.0))  # above the clamp at 100
            elif name.endswith("bias") or name.endswith(("bias_k", "bias_v")):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:  # LayerNorm weights
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("cls_token", "pos_embed")):
                param.copy_(0.5 * noise)
    return model


@pytest.fixture(scope="module")
def ported_model(reference_model):
    return ImageBindModel.from_meta_checkpoint(reference_model.state_dict(), **OUR_KWARGS)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ImageBindModel(**TINY_CONFIG).eval()


def tiny_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 60, (2, 8), generator=generator)
    input_ids[0, 3] = 63  # end-of-text (the largest id) at different positions
    input_ids[1, 7] = 63
    return dict(
        pixel_values=torch.randn(2, 3, 28, 28, generator=generator),
        input_ids=input_ids,
        audio_features=torch.randn(2, 3, 1, 16, 24, generator=generator),
        video_frames=torch.randn(2, 2, 3, 2, 28, 28, generator=generator),
    )


# ---------------------------------------------------------------------- parity with Meta's reference


def test_conversion_drops_exactly_the_unported_modalities(reference_model, ported_model):
    converted, dropped = convert_meta_imagebind_state_dict(reference_model.state_dict())
    assert dropped
    assert {key.split(".")[1] for key in dropped} == UNPORTED
    assert not any(modality in key for key in converted for modality in UNPORTED)
    assert set(converted) == set(ported_model.state_dict())
    # Nothing else is lost: every reference key is converted, dropped, or the rebuilt text mask.
    assert len(converted) + len(dropped) + 1 == len(reference_model.state_dict())


def test_image_and_video_parity(reference_model, ported_model):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    video = torch.randn(2, 3, 3, 2, 224, 224, generator=generator)
    with torch.no_grad():
        assert_parity(ported_model.encode_image(images), reference_model({"vision": images})["vision"])
        assert_parity(ported_model.encode_video(video), reference_model({"vision": video})["vision"])
        # One clip as 5-D input equals Meta's 6-D input with a single clip.
        assert_parity(ported_model.encode_video(video[:, 0]), reference_model({"vision": video[:, :1]})["vision"])


def test_text_parity(reference_model, ported_model):
    input_ids = torch.randint(1, 49000, (3, 77), generator=torch.Generator().manual_seed(3))
    for row, eot_position in enumerate((1, 30, 76)):
        input_ids[row, eot_position] = 49407
        input_ids[row, eot_position + 1 :] = 0
    with torch.no_grad():
        ours = ported_model.encode_text(input_ids)
        assert_parity(ours, reference_model({"text": input_ids})["text"])
    # The learned scale (150, set above) is applied after normalisation and clamped at 100.
    torch.testing.assert_close(ours.norm(dim=-1), torch.full((3,), 100.0))


def test_audio_parity(reference_model, ported_model):
    generator = torch.Generator().manual_seed(4)
    audio = torch.randn(2, 3, 1, 32, 48, generator=generator)
    with torch.no_grad():
        assert_parity(ported_model.encode_audio(audio), reference_model({"audio": audio})["audio"])
        single = reference_model({"audio": audio[:, 0]})["audio"]
        assert_parity(ported_model.encode_audio(audio[:, 0]), single)
    torch.testing.assert_close(single.norm(dim=-1), torch.full((2,), 20.0))


def test_forward_matches_encoders(ported_model):
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(1, 3, 224, 224, generator=generator)
    audio = torch.randn(1, 2, 1, 32, 48, generator=generator)
    with torch.no_grad():
        output = ported_model(pixel_values=images, audio_features=audio)
        assert isinstance(output, ImageBindOutput)
        assert output.text_embeds is None and output.video_embeds is None
        assert torch.equal(output.image_embeds, ported_model.encode_image(images))
        assert torch.equal(output.audio_embeds, ported_model.encode_audio(audio))
        as_tuple = ported_model(pixel_values=images, audio_features=audio, return_dict=False)
    assert len(as_tuple) == 4 and as_tuple[1] is None and as_tuple[3] is None
    assert torch.equal(as_tuple[0], output.image_embeds)


def test_loads_from_a_pth_file(reference_model, ported_model, tmp_path):
    path = tmp_path / "imagebind_tiny.pth"
    torch.save(reference_model.state_dict(), path)
    loaded = ImageBindModel.from_meta_checkpoint(path, **OUR_KWARGS)
    assert not loaded.training
    for name, tensor in ported_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_default_config_is_imagebind_huge():
    module = load_reference_model_module()
    real_linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        # Meta's trunk calls .item() on linspace values, impossible on the meta device.
        return real_linspace(*args, **{**kwargs, "device": "cpu"})

    with mock.patch.object(torch, "linspace", cpu_linspace), torch.device("meta"):
        reference = module.imagebind_huge()
    meta_state_dict = dict(reference.state_dict())
    # Shapes only (meta tensors); the mask's values are checked by the converter, so give it real ones.
    meta_state_dict["modality_preprocessors.text.mask"] = torch.full((77, 77), float("-inf")).triu(1)
    converted, _ = convert_meta_imagebind_state_dict(meta_state_dict)
    with torch.device("meta"):
        ours = ImageBindModel()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


# ---------------------------------------------------------------------- checkpoint errors


def test_missing_key_is_named(reference_model):
    state_dict = dict(reference_model.state_dict())
    del state_dict["modality_trunks.vision.blocks.1.norm_1.weight"]
    with pytest.raises(ValueError, match=r"missing keys: modality_trunks\.vision\.blocks\.1\.norm_1\.weight"):
        ImageBindModel.from_meta_checkpoint(state_dict, **OUR_KWARGS)


def test_unexpected_key_is_named(reference_model):
    state_dict = dict(reference_model.state_dict())
    state_dict["modality_trunks.audio.blocks.2.norm_1.weight"] = torch.ones(32)  # a third block
    with pytest.raises(ValueError, match=r"unexpected keys: modality_trunks\.audio\.blocks\.2\.norm_1\.weight"):
        ImageBindModel.from_meta_checkpoint(state_dict, **OUR_KWARGS)
    state_dict = dict(reference_model.state_dict(), **{"modality_heads.vision.3.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"unexpected keys .*modality_heads\.vision\.3\.weight"):
        ImageBindModel.from_meta_checkpoint(state_dict, **OUR_KWARGS)


def test_shape_mismatch_names_key_and_shapes(reference_model):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "modality_heads.vision.2.weight (vision_head.projection.weight): checkpoint (16, 32), model (8, 32)"
        ),
    ):
        ImageBindModel.from_meta_checkpoint(reference_model.state_dict(), **{**OUR_KWARGS, "out_embed_dim": 8})


def test_conversion_rejects_bad_state_dicts(reference_model):
    state_dict = dict(reference_model.state_dict())
    state_dict["modality_preprocessors.text.mask"] = torch.zeros(77, 77)
    with pytest.raises(ValueError, match="is not a causal mask"):
        convert_meta_imagebind_state_dict(state_dict)
    state_dict["modality_preprocessors.text.mask"] = torch.zeros(77, 76)
    with pytest.raises(ValueError, match=r"square causal attention mask, got shape \(77, 76\)"):
        convert_meta_imagebind_state_dict(state_dict)
    with pytest.raises(TypeError, match="mapping of names to tensors"):
        convert_meta_imagebind_state_dict([("a", torch.ones(1))])
    with pytest.raises(TypeError, match=r"state_dict\['modality_heads.vision.2.weight'\]` must be a torch.Tensor"):
        convert_meta_imagebind_state_dict({"modality_heads.vision.2.weight": [1.0]})


def test_conversion_does_not_modify_its_input(reference_model):
    state_dict = dict(reference_model.state_dict())
    keys = list(state_dict)
    convert_meta_imagebind_state_dict(state_dict)
    assert list(state_dict) == keys


# ---------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ImageBindModel.from_pretrained(tmp_path)
    public_config = lambda model: {k: v for k, v in model.config.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        defaults = public_config(ImageBindModel())
    assert public_config(loaded) == public_config(tiny_model) == {**defaults, **TINY_CONFIG}
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert tensors and not any(t.is_meta for t in tensors.values())
    inputs = tiny_inputs()
    with torch.no_grad():
        expected, actual = tiny_model(**inputs), loaded(**inputs)
    for field in ("image_embeds", "text_embeds", "audio_embeds", "video_embeds"):
        assert torch.equal(actual[field], expected[field]), field


# ---------------------------------------------------------------------- inputs


def test_inputs_are_not_modified_and_images_equal_repeated_frames(tiny_model):
    inputs = tiny_inputs()
    originals = {name: value.clone() for name, value in inputs.items()}
    with torch.no_grad():
        image_embeds = tiny_model.encode_image(inputs["pixel_values"])
        repeated = inputs["pixel_values"].unsqueeze(2).repeat(1, 1, 2, 1, 1)
        torch.testing.assert_close(tiny_model.encode_video(repeated), image_embeds, rtol=0, atol=1e-6)
        tiny_model(**inputs)
    for name, value in inputs.items():
        assert torch.equal(value, originals[name]), name
    assert image_embeds.shape == (2, 16)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize(
    "method, value, error, match",
    [
        (
            "encode_image",
            torch.zeros(3, 28, 28),
            ValueError,
            r"`pixel_values` must have shape \(batch_size, 3, 28, 28\)",
        ),
        (
            "encode_image",
            torch.zeros(1, 4, 28, 28),
            ValueError,
            r"`pixel_values` .* 3 \(RGB\) channels, got \(1, 4, 28, 28\)",
        ),
        ("encode_image", torch.zeros(1, 3, 32, 32), ValueError, r"`pixel_values` .* H = W = 28"),
        (
            "encode_image",
            torch.zeros(1, 3, 28, 28, dtype=torch.uint8),
            ValueError,
            "`pixel_values` must be a floating-point",
        ),
        ("encode_image", torch.zeros(0, 3, 28, 28), ValueError, "`pixel_values` must not be empty"),
        ("encode_image", [[0.0]], TypeError, "`pixel_values` must be a torch.Tensor"),
        (
            "encode_video",
            torch.zeros(1, 3, 28, 28),
            ValueError,
            r"`frames` must have shape \(batch_size, 3, T, H, W\)",
        ),
        ("encode_video", torch.zeros(1, 2, 3, 3, 28, 28), ValueError, "`frames` .* T = 2 frames"),
        ("encode_video", torch.zeros(1, 3, 1, 2, 28, 28), ValueError, r"`frames` .* 3 \(RGB\) channels"),
        ("encode_video", torch.zeros(1, 3, 2, 28, 30), ValueError, "`frames` .* H = W = 28"),
        ("encode_text", torch.zeros(2, 8), ValueError, "`input_ids` must be an integer tensor"),
        ("encode_text", torch.zeros(2, 8, dtype=torch.bool), ValueError, "`input_ids` must be an integer tensor"),
        (
            "encode_text",
            torch.zeros(2, 9, dtype=torch.long),
            ValueError,
            r"`input_ids` must have shape \(batch_size, 8\)",
        ),
        (
            "encode_text",
            torch.zeros(8, dtype=torch.long),
            ValueError,
            r"`input_ids` must have shape \(batch_size, 8\)",
        ),
        ("encode_text", torch.full((1, 8), 64), ValueError, r"`input_ids` must lie in \[0, 64\)"),
        ("encode_text", torch.full((1, 8), -1), ValueError, r"`input_ids` must lie in \[0, 64\)"),
        ("encode_text", "a photo", TypeError, "`input_ids` must be a torch.Tensor"),
        (
            "encode_audio",
            torch.zeros(1, 3, 1, 128, 24),
            ValueError,
            r"`audio_features` must have shape \(batch_size, num_clips, 1, 16, 24\)",
        ),
        (
            "encode_audio",
            torch.zeros(1, 3, 1, 16, 204),
            ValueError,
            r"`audio_features` must have shape \(batch_size, num_clips, 1, 16, 24\)",
        ),
        ("encode_audio", torch.zeros(1, 3, 2, 16, 24), ValueError, r"1 channel"),
        ("encode_audio", torch.zeros(16, 24), ValueError, "`audio_features` must have shape"),
        (
            "encode_audio",
            torch.zeros(1, 3, 1, 16, 24, dtype=torch.long),
            ValueError,
            "`audio_features` must be a floating-point",
        ),
    ],
)
def test_bad_inputs_raise(tiny_model, method, value, error, match):
    with pytest.raises(error, match=match):
        getattr(tiny_model, method)(value)


def test_image_patches_come_with_the_image_embedding_from_one_pass(tiny_model):
    pixels = torch.randn(2, 3, 28, 28)
    original = pixels.clone()
    with torch.no_grad():
        embeds, patches = tiny_model.encode_image_patches(pixels)
        frames = pixels.unsqueeze(2).expand(-1, -1, tiny_model.config.vision_num_frames, -1, -1)
        trunk = tiny_model.vision_encoder(tiny_model.vision_embeddings(frames))
        assert torch.equal(embeds, tiny_model.encode_image(pixels))
    assert torch.equal(pixels, original)
    assert patches.shape == (2, 4, 32)  # (28 / 14)^2 patches of vision_embed_dim
    assert torch.equal(patches, trunk[:, 1:])
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch_size, 3, 28, 28\)"):
        tiny_model.encode_image_patches(torch.zeros(1, 3, 14, 14))
    with pytest.raises(ValueError, match="`pixel_values` must be a floating-point"):
        tiny_model.encode_image_patches(torch.zeros(1, 3, 28, 28, dtype=torch.long))


def test_forward_validates_and_names_its_arguments(tiny_model):
    with pytest.raises(ValueError, match="Pass at least one of `pixel_values`"):
        tiny_model()
    with pytest.raises(ValueError, match=r"`video_frames` must have shape .* H = W = 28"):
        tiny_model(video_frames=torch.zeros(1, 3, 2, 14, 14))
    with pytest.raises(ValueError, match="`input_ids` must be an integer tensor"):
        tiny_model(input_ids=torch.zeros(1, 8))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(vision_num_heads=3), r"`vision_embed_dim` \(32\) must be divisible by `vision_num_heads` \(3\)"),
        (dict(vision_image_size=30), r"`vision_image_size` \(30\) must be divisible by `vision_patch_size` \(14\)"),
        (dict(vision_num_frames=3), r"`vision_num_frames` \(3\) must be divisible"),
        (dict(audio_num_mel_bins=4), r"must be at least `audio_kernel_size` \(8\)"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        ImageBindModel(**{**TINY_CONFIG, **overrides})


# ---------------------------------------------------------------------- dtypes and training


def test_bfloat16_is_close_to_float32(tiny_model):
    inputs = tiny_inputs(seed=6)
    bf16_model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with torch.no_grad():
        expected, actual = tiny_model(**inputs), bf16_model(**inputs)  # float32 inputs are cast by the model
    for field in ("image_embeds", "text_embeds", "audio_embeds", "video_embeds"):
        assert actual[field].dtype == torch.bfloat16, field
        cosine = F.cosine_similarity(actual[field].float(), expected[field], dim=-1)
        assert cosine.min() > 0.99, (field, cosine)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = ImageBindModel(**{**TINY_CONFIG, "audio_drop_path": 0.5})
    audio = tiny_inputs()["audio_features"]
    with torch.no_grad():
        model.train()
        first, second = model.encode_audio(audio), model.encode_audio(audio)
        model.eval()
        eval_first, eval_second = model.encode_audio(audio), model.encode_audio(audio)
    assert not torch.equal(first, second)
    assert torch.equal(eval_first, eval_second)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ImageBindModel(**{**TINY_CONFIG, "audio_drop_path": 0.0}).train()
    inputs = tiny_inputs()

    def gradients():
        model.zero_grad()
        output = model(**inputs)
        sum(output[field].pow(2).sum() for field in ("image_embeds", "text_embeds", "audio_embeds")).backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "text_log_logit_scale" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
