import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from diffusers_any2pix import InstructAny2PixPipeline, InstructAny2PixPipelineOutput
from diffusers_any2pix import pipeline_instruct_any2pix as pipeline_module
from diffusers_any2pix.instruction import parse_instruction
from diffusers_any2pix.models.mm_adapter import MultimodalAdapter
from diffusers_any2pix.multimodal_llm import build_vicuna_prompt
from diffusers_any2pix.models.ip_adapter import ImageBindIPAdapter, is_ip_adapter_attached
from diffusers_any2pix.pipeline_instruct_any2pix import mix_latents_with_noise
from diffusers_any2pix.testing_utils import (
    TINY_EMBED_DIM,
    extend_adapter,
    tiny_clip_tokenizer,
    tiny_decoder,
    tiny_llm,
    tiny_pipeline_components,
    with_attribute_reader,
)


REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["imagebind", "sd", "sdxl"]


def make_pipe(family: str, **overrides) -> InstructAny2PixPipeline:
    components = tiny_pipeline_components(family)
    components.update(overrides)
    pipe = InstructAny2PixPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return make_pipe(request.param)


@pytest.fixture(scope="module")
def native_pipe():
    return make_pipe("imagebind")


def image(seed: int, size=(40, 48)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def clip(freq: float = 440.0, seconds: float = 1.0, rate: int = 16000):
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq * t).astype("float32"), rate)


def run(pipe, instruction="add [audio1] to [image1]", images=None, audio=None, seed=0, **kwargs):
    images = [image(0)] if images is None else images
    audio = [clip()] if audio is None and "[audio1]" in instruction else audio
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(instruction, images=images, audio=audio, generator=torch.Generator().manual_seed(seed), **kwargs)


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_output(pipe):
    out = run(pipe)
    assert isinstance(out, InstructAny2PixPipelineOutput)
    assert len(out.images) == 1 and isinstance(out.images[0], PIL.Image.Image)
    assert out.images[0].size == (32, 32)
    assert out.captions == ["a red circle on a blue background"]
    assert out.base_image_indices == [0]
    assert out.generation_embeds.shape == out.refined_embeds.shape == out.conditioning_embeds.shape == (1, TINY_EMBED_DIM)
    # The conditioning is rescaled to embedding_norm; the prior output to 20.
    assert torch.allclose(out.conditioning_embeds.norm(dim=-1), torch.tensor([20.0]), atol=1e-4)
    assert torch.allclose(out.refined_embeds.norm(dim=-1), torch.tensor([20.0]), atol=1e-4)


def test_seed_determinism_and_output_types(pipe):
    a = run(pipe, output_type="np", seed=1).images
    b = run(pipe, output_type="np", seed=1).images
    c = run(pipe, output_type="np", seed=2).images
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    pt = run(pipe, output_type="pt", seed=1).images
    assert pt.shape == (1, 3, 32, 32)
    assert torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(a), atol=1e-6)


def test_latent_output_skips_the_vae(native_pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("vae.decode must not run for output_type='latent'")

    monkeypatch.setattr(native_pipe.vae, "decode", fail)
    latents = run(native_pipe, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)


def test_num_images_per_prompt_and_batched_instructions(native_pipe, monkeypatch):
    inverted = []
    invert = native_pipe.invert
    monkeypatch.setattr(native_pipe, "invert", lambda latents, *a: inverted.append(len(latents)) or invert(latents, *a))
    out = run(native_pipe, output_type="np", num_images_per_prompt=2)
    assert inverted == [1]  # each base image is inverted once, then repeated
    assert out.images.shape == (2, 32, 32, 3)
    assert not np.allclose(out.images[0], out.images[1])  # one LLM answer, different noise

    batch = native_pipe(
        ["add [audio1] to [image1]", "make [image2] look like [image1]"],
        images=[[image(0)], [image(1), image(2)]],
        audio=[[clip()], None],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert batch.images.shape == (2, 32, 32, 3)
    assert len(batch.answers) == len(batch.captions) == len(batch.base_image_indices) == 2
    assert batch.base_image_indices[0] == 0 and batch.base_image_indices[1] in (0, 1)


def test_reusing_conditioning_embeds_reproduces_the_edit(native_pipe):
    first = run(native_pipe, output_type="np", seed=5)
    again = run(native_pipe, output_type="np", seed=5, conditioning_embeds=first.conditioning_embeds)
    assert np.array_equal(first.images, again.images)


def test_given_captions_drive_a_text_decoder_with_conditioning_embeds():
    pipe = make_pipe("sd")
    first = run(pipe, output_type="np", seed=5)
    # The LLM's own caption, given back: the same edit.
    again = run(pipe, output_type="np", seed=5, conditioning_embeds=first.conditioning_embeds, captions=first.captions)
    assert np.array_equal(first.images, again.images) and again.captions == first.captions
    other = run(pipe, output_type="np", seed=5, conditioning_embeds=first.conditioning_embeds,
                captions="a blue star in the middle")  # fmt: skip
    assert other.captions == ["a blue star in the middle"] and not np.array_equal(first.images, other.images)
    with pytest.raises(ValueError, match="go with `conditioning_embeds`"):
        run(pipe, captions=["x"])
    with pytest.raises(ValueError, match="must be 1 string"):
        run(pipe, conditioning_embeds=first.conditioning_embeds, captions=["x", "y"])


def test_callback_on_step_end(native_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, kwargs["latents"].shape, kwargs["conditioning_embeds"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = run(
        native_pipe,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "conditioning_embeds"],
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 4, 16, 16) and seen[0][2] == (1, TINY_EMBED_DIM)
    assert torch.count_nonzero(out.images) == 0  # the callback's latents were used


def test_return_dict_false(native_pipe):
    images, answers, captions, bases = run(native_pipe, return_dict=False)
    assert len(images) == 1 and captions == ["a red circle on a blue background"] and bases == [0]


# ------------------------------------------------------------------------------------------------ base selection
def test_single_image_is_the_base_even_with_audio(native_pipe):
    out = run(native_pipe, "add [audio1] and [audio2] to [image1]", audio=[clip(300), clip(600)])
    assert out.base_image_indices == [0]


def test_base_chosen_by_base_embedding_among_images(native_pipe):
    images = [image(3), image(4), image(5)]
    out = run(native_pipe, "put [image2] into [image3] with the style of [image1]", images=images)
    assert out.base_embeds[0] is not None
    with torch.no_grad():
        vectors = native_pipe.image_encoder.encode_image(native_pipe.imagebind_processor.preprocess_image(images))
    assert out.base_image_indices[0] == int((vectors @ out.base_embeds[0]).argmax())


def test_audio_is_never_the_base():
    parsed = parse_instruction("add [audio1] to [image1] or [image2]", num_images=2, num_audio=1)
    media = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # the audio row matches the base embedding best
    index = InstructAny2PixPipeline.select_base_image(parsed, media, torch.tensor([1.0, 0.0]), None)
    assert index == 1  # [image2] (row 2), not the audio (row 0)
    # <base_null> with several images: falls back to the generation embedding.
    assert InstructAny2PixPipeline.select_base_image(parsed, media, None, torch.tensor([0.0, 1.0])) == 0


def test_placeholder_order_maps_to_inputs(native_pipe):
    images = [image(6), image(7)]
    parsed = [parse_instruction("put [image2] into [audio1] and [image1]", num_images=2, num_audio=1)]
    audio = [native_pipe.imagebind_processor.load_audio(clip(500))]
    pil = [native_pipe.imagebind_processor.load_image(i) for i in images]
    (media,), patches = native_pipe.encode_media(parsed, [pil], [audio], torch.device("cpu"))
    assert patches is None  # the official adapter reads one vector per medium
    with torch.no_grad():
        vectors = native_pipe.image_encoder.encode_image(native_pipe.imagebind_processor.preprocess_image(images))
        sound = native_pipe.image_encoder.encode_audio(native_pipe.imagebind_processor.preprocess_audio([clip(500)]))
    assert torch.allclose(media[0], vectors[1]) and torch.allclose(media[1], sound[0]) and torch.allclose(media[2], vectors[0])


def patch_pipe(**overrides) -> InstructAny2PixPipeline:
    """The tiny pipeline whose adapter also reads 3 tokens per image from ImageBind's patch tokens."""
    components = tiny_pipeline_components("imagebind")
    config = dict(image_patch_tokens=3, resampler_hidden_size=16, resampler_depth=1, resampler_heads=2)
    config["patch_embed_dim"] = components["image_encoder"].config.vision_embed_dim
    adapter = extend_adapter(components["mm_adapter"], **{**config, **overrides})
    pipe = InstructAny2PixPipeline(**{**components, "mm_adapter": adapter})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_patch_tokens_reach_the_llm(monkeypatch):
    pipe = patch_pipe()
    calls = []
    real = pipeline_module.generate_with_media
    monkeypatch.setattr(pipeline_module, "generate_with_media", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = run(pipe, "add [audio1] to [image1]")
    # The image takes its pooled <video> and 3 resampled ones, the sound one.
    assert calls[0]["prompts"] == [build_vicuna_prompt("add <video> to " + "<video>" * 4)]
    processor = pipe.imagebind_processor
    with torch.no_grad():
        vector, patches = pipe.image_encoder.encode_image_patches(processor.preprocess_image([image(0)]))
        sound = pipe.image_encoder.encode_audio(processor.preprocess_audio([clip()]))[0]
    torch.testing.assert_close(calls[0]["media_embeds"][0], torch.stack([sound, vector[0]]))
    (audio_patches, image_patches), = calls[0]["image_patches"]
    assert audio_patches is None
    torch.testing.assert_close(image_patches, patches[0])
    assert out.captions == ["a red circle on a blue background"] and out.base_image_indices == [0]
    # Deterministic with a generator, like every edit.
    assert np.array_equal(run(pipe, output_type="np", seed=3).images, run(pipe, output_type="np", seed=3).images)
    parsed = parse_instruction("put [image2] on [image1]", num_images=2, num_audio=0)
    pil = [processor.load_image(i) for i in (image(3), image(4))]
    (media,), ((first, second),) = pipe.encode_media([parsed], [pil], [[]], torch.device("cpu"))
    assert media.shape == (2, TINY_EMBED_DIM) and first.shape == second.shape == (4, 16)  # 2 x 2 patches, width 16
    assert pipe.llm_prompt(parsed) == build_vicuna_prompt("put " + "<video>" * 4 + " on " + "<video>" * 4)


def test_attribute_tokens_reach_the_llm(monkeypatch, tmp_path):
    """An adapter with attribute fields gives every medium, audio included, 1 + fields <video> tokens; the pipeline
    saves and reloads it."""
    components = tiny_pipeline_components("imagebind")
    adapter = extend_adapter(components["mm_adapter"], attribute_classes=[3, 2])
    pipe = InstructAny2PixPipeline(**{**components, "mm_adapter": adapter})
    pipe.set_progress_bar_config(disable=True)
    calls = []
    real = pipeline_module.generate_with_media
    monkeypatch.setattr(pipeline_module, "generate_with_media", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = run(pipe, "add [audio1] to [image1]", output_type="np")
    assert calls[0]["prompts"] == [build_vicuna_prompt("add " + "<video>" * 3 + " to " + "<video>" * 3)]
    assert calls[0]["image_patches"] is None and calls[0]["media_embeds"][0].shape == (2, TINY_EMBED_DIM)
    # The field tokens are injected: another embedding table gives other hidden states, hence other embeddings.
    with torch.no_grad():
        pipe.mm_adapter.attribute_embedding.weight.mul_(-3.0)
    changed = run(pipe, "add [audio1] to [image1]", output_type="np")
    assert not torch.allclose(out.generation_embeds, changed.generation_embeds)
    pipe.save_pretrained(tmp_path)
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.mm_adapter.attribute_tokens == 2
    again = run(loaded, "add [audio1] to [image1]", output_type="np")
    assert np.array_equal(again.images, changed.images) and again.captions == changed.captions


def test_attribute_word_tokens_read_the_llms_own_word_embeddings(tmp_path):
    """An adapter whose attribute tokens hold class words reads them from the pipeline's LLM (a change to the LLM's
    embedding of a class word the prompt does not contain changes the answer's embeddings); a tokenizer that does not
    reach the adapter's word ids is refused at construction."""
    components = tiny_pipeline_components("imagebind")
    tokenizer = components["llm_tokenizer"]
    words = ["red", "blue", "green", "", "circle"]
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] if w else -1 for w in words]
    adapter = extend_adapter(components["mm_adapter"], attribute_classes=[3, 2], attribute_word_ids=ids)
    pipe = InstructAny2PixPipeline(**{**components, "mm_adapter": adapter})
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, "add [audio1] to [image1]", output_type="np")
    with torch.no_grad():
        pipe.llm.get_input_embeddings().weight[ids[-1]] += 1.0  # "circle": not a word of the prompt
    changed = run(pipe, "add [audio1] to [image1]", output_type="np")
    assert not torch.allclose(out.generation_embeds, changed.generation_embeds)
    pipe.save_pretrained(tmp_path)
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.mm_adapter.config.attribute_word_ids == ids
    again = run(loaded, "add [audio1] to [image1]", output_type="np")
    assert np.array_equal(again.images, changed.images) and again.captions == changed.captions
    beyond = MultimodalAdapter.from_config(adapter.config, attribute_word_ids=ids[:-1] + [len(tokenizer)])
    with pytest.raises(ValueError, match=r"attribute_word_ids reach token id \d+ but llm_tokenizer has only \d+ tok"):
        InstructAny2PixPipeline(**{**components, "mm_adapter": beyond})


def test_media_position_embeddings_reach_the_llm_and_bound_the_media(tmp_path):
    """An adapter with media position embeddings marks each medium's tokens by its place; the pipeline saves and
    reloads it, and refuses an instruction with more media than places before any model runs."""
    components = tiny_pipeline_components("imagebind")
    adapter = MultimodalAdapter.from_config(components["mm_adapter"].config, max_media_positions=2)
    adapter.load_state_dict(components["mm_adapter"].state_dict(), strict=False)
    pipe = InstructAny2PixPipeline(**{**components, "mm_adapter": adapter.eval()})
    pipe.set_progress_bar_config(disable=True)
    # Zero places: the pipeline of the plain adapter, exactly.
    plain = InstructAny2PixPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(run(pipe).generation_embeds, run(plain).generation_embeds)
    with torch.no_grad():
        torch.nn.init.normal_(pipe.mm_adapter.media_position_embedding.weight, std=1.0)
    marked = run(pipe, output_type="np")
    assert not torch.allclose(marked.generation_embeds, run(plain).generation_embeds)
    pipe.save_pretrained(tmp_path)
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.mm_adapter.config.max_media_positions == 2
    again = run(loaded, output_type="np")
    assert np.array_equal(again.images, marked.images) and again.captions == marked.captions
    with pytest.raises(ValueError, match=r"`instruction` refers to 3 media but this pipeline's LLM reads at most 2"):
        run(pipe, "put [image2] and [audio1] on [image1]", images=[image(0), image(1)])


def test_patch_tokens_change_what_the_llm_sees():
    """The resampler's vectors are injected: another resampler gives other hidden states, hence other embeddings."""
    a = run(patch_pipe(), seed=0)
    pipe = patch_pipe()
    torch.nn.init.normal_(pipe.mm_adapter.patch_resampler.latents, std=1.0)
    b = run(pipe, seed=0)
    assert not torch.allclose(a.generation_embeds, b.generation_embeds)


def test_patch_width_must_match_the_image_encoder():
    with pytest.raises(
        ValueError,
        match=r"image_encoder.config.vision_embed_dim is 16 but mm_adapter.config.patch_embed_dim is 24",
    ):
        patch_pipe(patch_embed_dim=24)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "instruction, images, audio, match",
    [
        ("add [audio1] to [image1]", [0], None, r"references \[audio1\] but only 0"),
        ("edit [image1]", [0, 1], None, r"never references images\[1\]"),
        ("edit [image1] and [image1]", [0], None, r"more than once"),
        ("edit [image0]", [0], None, r"1-based"),
        ("make a red circle", None, None, r"references no image"),
        ("add [audio1]", None, "clip", r"references no image"),
    ],
)
def test_bad_instructions_fail_before_any_model_runs(native_pipe, monkeypatch, instruction, images, audio, match):
    monkeypatch.setattr(native_pipe.image_encoder, "encode_image", None)  # any model call would crash differently
    imgs = [image(i) for i in images] if images else None
    with pytest.raises(ValueError, match=match):
        native_pipe(instruction, images=imgs, audio=[clip()] if audio else None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(images=[np.zeros((0, 4, 3), np.uint8)]), ValueError, "no pixels"),
        (dict(images=[np.zeros((8, 8, 2), np.uint8)]), ValueError, "images"),
        (dict(images=["/nonexistent/picture.png"]), FileNotFoundError, "picture.png"),
        (dict(images=[3.5]), TypeError, "images"),
        (dict(images=[image(0)], height=33), ValueError, "multiples of 2"),
        (dict(images=[image(0)], output_type="jpeg"), ValueError, "output_type"),
        (dict(images=[image(0)], structure_preservation=1.5), ValueError, "structure_preservation"),
        (dict(images=[image(0)], embedding_weights=(1.0, 2.0)), ValueError, "embedding_weights"),
        (dict(images=[image(0)], num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(images=[image(0)], conditioning_embeds=torch.zeros(1, 3)), ValueError, "conditioning_embeds"),
        (dict(images=[image(0)], callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback"),
        (dict(images=[image(0)], llm_num_beams=0), ValueError, "`llm_num_beams` must be a positive int"),
        (dict(images=[image(0)], llm_num_beams=2, llm_do_sample=True), ValueError, "needs `llm_do_sample=False`"),
        *[
            (dict(images=[image(0)], llm_rerank_weight=w), ValueError, "`llm_rerank_weight` must be a finite number")
            for w in (-0.5, float("nan"), float("inf"), True, "1")
        ],
        *[
            (dict(images=[image(0)], llm_base_agreement_weight=w), ValueError,
             "`llm_base_agreement_weight` must be a finite number")  # fmt: skip
            for w in (-0.5, float("nan"), float("inf"), True, "1")
        ],
        *[
            (dict(images=[image(0)], llm_do_sample=False, **{name: 0.5}), ValueError,
             rf"`{name}=0.5` reranks beams: it needs `llm_num_beams` > 1.*pass `{name}=0`")  # fmt: skip
            for name in ("llm_rerank_weight", "llm_base_agreement_weight", "llm_base_focus_weight")
        ],
        *[
            (dict(images=[image(0)], llm_do_sample=False, llm_num_beams=2, **{name: 0.5}), ValueError,
             rf"`{name}=0.5` reads captions with .* this pipeline has no `imagebind_tokenizer`")  # fmt: skip
            for name in ("llm_rerank_weight", "llm_base_agreement_weight", "llm_base_focus_weight")
        ],
        *[
            (dict(images=[image(0)], llm_base_focus_weight=w), ValueError,
             "`llm_base_focus_weight` must be a finite number")  # fmt: skip
            for w in (-0.5, float("nan"), float("inf"), True, "1")
        ],
        *[
            (dict(images=[image(0)], caption_embedding_weight=w), ValueError,
             r"`caption_embedding_weight` must be a number in \[0, 1\]")  # fmt: skip
            for w in (-0.1, 1.5, float("nan"), True, "1")
        ],
        *[
            (dict(images=[image(0)], caption_embedding_weight=w), ValueError,
             r"`caption_embedding_weight` must be a number in \[0, 1\] or a non-empty list of them")  # fmt: skip
            for w in ([], (0.3, 1.5), [0.3, True], [0.3, "1"])
        ],
        (dict(images=[image(0)], caption_embedding_weight=0.5), ValueError,
         r"`caption_embedding_weight=0.5` embeds the LLM's caption .* no `imagebind_tokenizer`"),  # fmt: skip
        *[
            (dict(images=[image(0)], base_instruction_weight=w), ValueError,
             "`base_instruction_weight` must be a finite number >= 0")  # fmt: skip
            for w in (-0.5, float("nan"), float("inf"), True, "1")
        ],
        (dict(images=[image(0)], base_instruction_weight=2.0), ValueError,
         r"`base_instruction_weight=2.0` embeds the instruction's words .* no `imagebind_tokenizer`"),  # fmt: skip
        *[
            (dict(images=[image(0)], num_candidate_images=n), ValueError,
             "`num_candidate_images` must be a positive int")  # fmt: skip
            for n in (0, -1, True, 1.5, "2")
        ],
        (dict(images=[image(0)], num_candidate_images=2), ValueError,
         r"`num_candidate_images=2` compares each candidate image .* no `imagebind_tokenizer`"),  # fmt: skip
    ],
)
def test_bad_arguments(native_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        native_pipe("edit [image1]", **kwargs)


def test_bad_audio(native_pipe, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="broken.wav"):
        native_pipe("add [audio1] to [image1]", images=[image(0)], audio=[str(broken)])
    with pytest.raises(ValueError, match="(?i)empty|0 samples"):
        native_pipe("add [audio1] to [image1]", images=[image(0)], audio=[(np.zeros(0, np.float32), 16000)])


def test_batched_inputs_must_match(native_pipe):
    with pytest.raises(ValueError, match="must be a list of 2 lists"):
        native_pipe(["edit [image1]", "edit [image1]"], images=[image(0)])
    with pytest.raises(ValueError, match=r"`instruction\[1\]` references \[image2\]"):
        native_pipe(["edit [image1]", "edit [image2]"], images=[[image(0)], [image(1)]])


def test_answer_without_generation_embedding():
    llm, tokenizer, adapter = tiny_llm(answer="<base><video>[a red circle]", fit_steps=150)
    pipe = make_pipe("imagebind", llm=llm, llm_tokenizer=tokenizer, mm_adapter=adapter)
    with pytest.raises(ValueError, match=r"has no generation embedding.*<base><video>"):
        run(pipe, "edit [image1]", llm_do_sample=False)
    out = run(pipe, "edit [image1]", llm_do_sample=False, on_invalid_answer="use_base")
    assert out.captions == ["a red circle"]
    assert len(out.images) == 1


# ------------------------------------------------------------------------------------------------ swaps
def test_swapping_a_matching_unet_works_and_mismatches_fail_naming_sizes():
    components = tiny_pipeline_components("imagebind")
    other = tiny_decoder("imagebind", seed=3)["unet"]
    pipe = InstructAny2PixPipeline(**{**components, "unet": other})
    assert pipe.unet is other

    torch.manual_seed(0)
    wrong = UNet2DConditionModel.from_config({**other.config, "encoder_hid_dim": 24})
    with pytest.raises(ValueError, match=r"out_embed_dim is 16 but unet.config.encoder_hid_dim is 24"):
        InstructAny2PixPipeline(**{**components, "unet": wrong})
    sd = tiny_pipeline_components("sd")
    unet_24 = UNet2DConditionModel.from_config({**sd["unet"].config, "cross_attention_dim": 24})
    adapter_24 = ImageBindIPAdapter.from_unet(unet_24, image_embed_dim=TINY_EMBED_DIM)
    with pytest.raises(ValueError, match=r"text_encoder.config.hidden_size is 16 but unet.config.cross_attention_dim is 24"):
        InstructAny2PixPipeline(**{**sd, "unet": unet_24, "ip_adapter": adapter_24})
    with pytest.raises(ValueError, match=r"ip_adapter was built for cross_attention_dim=32 but the unet has cross_attention_dim=16"):
        InstructAny2PixPipeline(**{**sd, "ip_adapter": tiny_decoder("sdxl")["ip_adapter"]})
    with pytest.raises(ValueError, match=r"needs an `ip_adapter`"):
        InstructAny2PixPipeline(**{**sd, "ip_adapter": None})
    with pytest.raises(ValueError, match=r"remove text_encoder"):
        InstructAny2PixPipeline(**{**components, "text_encoder": sd["text_encoder"], "tokenizer": sd["tokenizer"]})
    with pytest.raises(ValueError, match=r"missing required components: prior"):
        InstructAny2PixPipeline(**{**components, "prior": None})


def test_mismatched_llm_and_adapter_sizes():
    components = tiny_pipeline_components("imagebind")
    from diffusers_any2pix import MultimodalAdapter

    with pytest.raises(ValueError, match=r"llm.config.hidden_size is 32 but mm_adapter.config.llm_hidden_size is 64"):
        InstructAny2PixPipeline(**{**components, "mm_adapter": MultimodalAdapter(embed_dim=16, llm_hidden_size=64)})
    with pytest.raises(ValueError, match=r"out_embed_dim is 16 but mm_adapter.config.embed_dim is 8"):
        InstructAny2PixPipeline(**{**components, "mm_adapter": MultimodalAdapter(embed_dim=8, llm_hidden_size=32)})


# ------------------------------------------------------------------------------------------------ state
def test_ip_adapter_scale_does_not_leak():
    pipe = make_pipe("sd")
    default = run(pipe, output_type="np").images
    weak = run(pipe, output_type="np", ip_adapter_scale=0.0).images
    again = run(pipe, output_type="np").images
    assert not np.allclose(default, weak)
    assert np.array_equal(default, again)
    scales = {s for p in pipe.unet.attn_processors.values() if hasattr(p, "scale") for s in p.scale}
    assert scales == {1.0}


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("family", ["imagebind", "sdxl"])
def test_save_load_round_trip_is_exact(family, tmp_path):
    pipe = make_pipe(family)
    expected = run(pipe, output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"] == ["diffusers_any2pix.models.imagebind", "ImageBindModel"]
    assert index["ip_adapter"][1] == ("ImageBindIPAdapter" if family == "sdxl" else None)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))

    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name, component in loaded.components.items():
        if isinstance(component, torch.nn.Module):
            assert not [n for n, p in component.named_parameters() if p.device.type == "meta"], name
    assert is_ip_adapter_attached(loaded.unet) == (family == "sdxl")
    assert np.array_equal(run(loaded, output_type="np").images, expected)
    # Saving did not detach the adapter from the live pipeline.
    assert np.array_equal(run(pipe, output_type="np").images, expected)


def test_weights_stored_in_float16_load_and_run_in_float32(tmp_path):
    pipe = make_pipe("imagebind")
    expected = run(pipe, output_type="np").images
    pipe.to(torch.float16).save_pretrained(tmp_path)
    pipe.to(torch.float32)
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    dtypes = {n: c.dtype for n, c in loaded.components.items() if isinstance(c, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    # Only the float16 rounding of the weights differs.
    assert np.abs(run(loaded, output_type="np").images - expected).max() < 0.05
    assert InstructAny2PixPipeline.from_pretrained(tmp_path, dtype=torch.float16).llm.dtype == torch.float16


def test_custom_pipeline_and_hub_cache_loading(tmp_path, monkeypatch):
    pipe = make_pipe("imagebind")
    expected = run(pipe, output_type="np").images
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)

    generic = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(REPO / "pipelines" / "instruct_any2pix"), trust_remote_code=True
    )
    assert type(generic).__name__ == "InstructAny2PixPipeline"
    generic.set_progress_bar_config(disable=True)
    assert np.array_equal(run(generic, output_type="np").images, expected)

    # A Hub id resolved from a local cache, offline (the layout huggingface_hub writes).
    cache = tmp_path / "hub"
    snapshot = cache / "models--any2pix--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snapshot)
    (cache / "models--any2pix--tiny" / "refs").mkdir()
    (cache / "models--any2pix--tiny" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = InstructAny2PixPipeline.from_pretrained("any2pix/tiny", cache_dir=str(cache))
    from_hub.set_progress_bar_config(disable=True)
    assert np.array_equal(run(from_hub, output_type="np").images, expected)


# ------------------------------------------------------------------------------------------------ pieces
def test_noise_mixing_formula():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    mixed = mix_latents_with_noise(latents, noise, 0.7)
    for i in range(2):
        target = 0.7 * latents[i].norm() + 0.3 * noise[i].norm()
        direction = 0.7 * latents[i] + 0.3 * noise[i]
        assert torch.allclose(mixed[i], direction / direction.norm() * target, atol=1e-6)
    assert torch.equal(mix_latents_with_noise(latents, noise, 1.0), latents / latents.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * latents.flatten(1).norm(dim=1).view(-1, 1, 1, 1))


def test_inputs_are_not_modified(native_pipe):
    array = (np.random.RandomState(0).rand(20, 24, 3)).astype(np.float32)
    tensor = torch.rand(3, 20, 24)
    wave = clip()
    copies = (array.copy(), tensor.clone(), wave[0].copy())
    native_pipe("add [audio1] to [image1] and [image2]", images=[array, tensor], audio=[wave], num_inference_steps=2)
    assert np.array_equal(array, copies[0]) and torch.equal(tensor, copies[1]) and np.array_equal(wave[0], copies[2])


def test_model_cpu_offload_gives_the_same_edit():
    expected = run(make_pipe("sdxl"), output_type="np").images
    pipe = make_pipe("sdxl")
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks run the same way as with an accelerator
    assert np.array_equal(run(pipe, output_type="np").images, expected)
    assert np.array_equal(run(pipe, output_type="np").images, expected)  # hooks survive a second call
    # Reranking calls ImageBind again after the LLM: its hook must bring it back.
    rerank = dict(output_type="np", llm_do_sample=False, llm_num_beams=2, llm_rerank_weight=0.5)
    expected = run(make_pipe("sdxl", imagebind_tokenizer=tiny_clip_tokenizer()), **rerank).images
    pipe = make_pipe("sdxl", imagebind_tokenizer=tiny_clip_tokenizer())
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(run(pipe, **rerank).images, expected)
    # So does the base-agreement term, which reads the base image's vector with the adapter.
    expected = run(_attribute_reading_pipe(), **rerank, llm_base_agreement_weight=1.0).images
    pipe = _attribute_reading_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(run(pipe, **rerank, llm_base_agreement_weight=1.0).images, expected)


def test_bfloat16_pipeline_is_close_to_float32():
    pipe = make_pipe("imagebind")
    expected = run(pipe, output_type="np").images
    pipe.to(dtype=torch.bfloat16)
    out = run(pipe, output_type="np")
    assert out.images.dtype == np.float32 and np.isfinite(out.images).all()
    assert np.abs(out.images - expected).mean() < 0.05
    assert out.captions == ["a red circle on a blue background"]


def test_float16_vae_with_force_upcast_runs_in_float32(native_pipe, monkeypatch):
    seen = []
    original = native_pipe.vae.decode

    def spy(latents, **kwargs):
        seen.append((latents.dtype, native_pipe.vae.dtype))
        return original(latents, **kwargs)

    monkeypatch.setattr(native_pipe.vae, "decode", spy)
    native_pipe.vae.to(dtype=torch.float16)
    try:
        out = run(native_pipe, output_type="np")
    finally:
        native_pipe.vae.to(dtype=torch.float32)
    assert seen == [(torch.float32, torch.float32)]
    assert np.isfinite(out.images).all()


def test_llm_beam_search_gives_the_greedy_edit_of_a_one_answer_llm(native_pipe):
    # The tiny LLM is fitted to one answer, so beam search must find that answer and read the same embeddings.
    greedy = run(native_pipe, output_type="np", llm_do_sample=False)
    beams = run(native_pipe, output_type="np", llm_do_sample=False, llm_num_beams=3)
    assert beams.answers == greedy.answers and beams.captions == greedy.captions
    torch.testing.assert_close(beams.generation_embeds, greedy.generation_embeds, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(beams.images, greedy.images, atol=1e-4)


@pytest.fixture(scope="module")
def reranking_pipe():
    return make_pipe("imagebind", imagebind_tokenizer=tiny_clip_tokenizer())


def _caption_agreement(pipe, captions: list[str], intended: list[torch.Tensor]) -> torch.Tensor:
    """cos(ImageBind text embedding of caption i, intended[i]), computed here from ImageBind's own methods."""
    text = pipe.image_encoder.encode_text(pipe.imagebind_processor.tokenize(captions))
    return torch.stack([torch.nn.functional.cosine_similarity(t, e, dim=0) for t, e in zip(text, intended)])


def test_rerank_scorer_adds_the_weighted_caption_agreement_to_the_beam_scores(reranking_pipe):
    texts = [
        "<im_gen_start><im_gen>[a red circle]<video>",
        "<im_gen_start><im_gen>",  # no caption: never chosen
        "<im_gen_start><im_gen>[a blue square]<video>",
        "<im_gen_start><im_gen>[a green star]<video>",
        "<im_gen_start><im_gen>[a red star]",  # no generation embedding: never chosen
    ]
    beam_scores = torch.tensor([-0.1, 0.0, -0.2, -0.3, 0.0])
    intended = list(torch.randn(5, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(0)) * 20)
    valid = [0, 2, 3]
    agreement = _caption_agreement(
        reranking_pipe, ["a red circle", "a blue square", "a green star"], [intended[j] for j in valid]
    )
    generation_embeds = intended[:4] + [None]
    picks = set()
    for weight in (0.0, 0.05, 0.5, 100.0):
        choose = reranking_pipe.caption_agreement_scorer(weight, torch.device("cpu"))
        expected = valid[int((beam_scores[valid] + weight * agreement).argmax())]
        assert choose(0, texts, beam_scores, generation_embeds, [None] * 5) == expected
        picks.add(expected)
    assert valid[int(agreement.argmax())] in picks and 0 in picks  # weight 0: the best complete beam
    # Each beam is compared with its own answer's embedding: the beam whose embedding is its caption's own text
    # embedding (cosine 1) wins at a large weight, whichever it is.
    choose = reranking_pipe.caption_agreement_scorer(100.0, torch.device("cpu"))
    captions = {0: "a red circle", 2: "a blue square", 3: "a green star"}
    for j in valid:
        own = reranking_pipe.image_encoder.encode_text(reranking_pipe.imagebind_processor.tokenize(captions[j]))[0]
        embeds = list(generation_embeds)
        embeds[j] = own * 3.0
        assert choose(0, texts, beam_scores, embeds, [None] * 5) == j
    # No complete beam: the best beam.
    assert choose(0, texts, beam_scores, [None] * 5, [None] * 5) == 0
    assert choose(0, ["<im_gen_start><im_gen>", "no answer"], beam_scores[:2], intended[:2], [None] * 2) == 0


def _record_scorer_calls(monkeypatch) -> list[tuple]:
    """Every call of the pipeline's beam scorer: (texts, beam_scores, generation_embeds, base_embeds, the row's media
    embeddings, the pick)."""
    calls = []
    original = pipeline_module.generate_with_media

    def spy(*args, candidate_scorer=None, **kwargs):
        def scorer(row, texts, beam_scores, generation_embeds, base_embeds):
            pick = candidate_scorer(row, texts, beam_scores, generation_embeds, base_embeds)
            calls.append((texts, beam_scores, generation_embeds, base_embeds, kwargs["media_embeds"][row], pick))
            return pick

        return original(*args, candidate_scorer=scorer if candidate_scorer else None, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate_with_media", spy)
    return calls


def test_reranked_edit_answers_with_the_beam_the_score_picks(reranking_pipe, monkeypatch):
    calls = _record_scorer_calls(monkeypatch)
    out = run(reranking_pipe, output_type="np", llm_do_sample=False, llm_num_beams=3, llm_rerank_weight=100.0)
    (texts, beam_scores, generation_embeds, _, _, pick), = calls
    assert len(texts) == 3 and out.answers == [texts[pick]]
    captions = [pipeline_module.parse_answer(t).caption for t in texts]
    valid = [j for j, c in enumerate(captions) if c and generation_embeds[j] is not None]
    assert valid  # the tiny LLM was fitted to a complete answer
    agreement = _caption_agreement(reranking_pipe, [captions[j] for j in valid], [generation_embeds[j] for j in valid])
    expected = valid[int((beam_scores[valid] + 100.0 * agreement).argmax())]
    assert pick == expected
    # Without a weight the pipeline keeps transformers' best beam and never builds a scorer.
    calls.clear()
    plain = run(reranking_pipe, output_type="np", llm_do_sample=False, llm_num_beams=3)
    assert calls == [] and plain.answers == [texts[0]]


# ------------------------------------------------------------------------------------------------ caption embedding
def test_blend_caption_embeddings_keeps_the_norm_and_blends_the_directions():
    unit = torch.nn.functional.normalize
    gen = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 20
    cap = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    blend = InstructAny2PixPipeline.blend_caption_embeddings
    assert torch.allclose(blend(gen, cap, 0.0), gen, atol=1e-5)
    assert torch.allclose(blend(gen, cap, 1.0), unit(cap, dim=-1) * gen.norm(dim=-1, keepdim=True), atol=1e-5)
    half = blend(gen, cap, 0.5)
    assert torch.allclose(half.norm(dim=-1), gen.norm(dim=-1), atol=1e-4)
    assert torch.allclose(unit(half, dim=-1), unit(unit(gen, dim=-1) + unit(cap, dim=-1), dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="must have the same shape"):
        blend(gen, cap[:2], 0.5)


def test_caption_embedding_weight_blends_the_captions_imagebind_embedding_into_the_llms(reranking_pipe):
    unit = torch.nn.functional.normalize
    edit = dict(output_type="np", llm_do_sample=False, llm_num_beams=2)
    plain = run(reranking_pipe, **edit)
    assert plain.captions[0]  # the tiny LLM was fitted to a complete answer
    assert np.array_equal(run(reranking_pipe, **edit, caption_embedding_weight=0.0).images, plain.images)
    caption_embeds = reranking_pipe.encode_captions(plain.captions, torch.device("cpu"))
    text = reranking_pipe.image_encoder.encode_text(reranking_pipe.imagebind_processor.tokenize(plain.captions))
    assert torch.equal(caption_embeds, text.float())
    for weight in (0.5, 1.0):
        out = run(reranking_pipe, **edit, caption_embedding_weight=weight)
        assert out.answers == plain.answers  # the same answer; only its embedding moves
        expected = (1 - weight) * unit(plain.generation_embeds, dim=-1) + weight * unit(text.float(), dim=-1)
        expected = unit(expected, dim=-1) * plain.generation_embeds.norm(dim=-1, keepdim=True)
        assert torch.allclose(out.generation_embeds, expected, atol=1e-5)
        assert not np.array_equal(out.images, plain.images)
    # A stored default applies like the argument.
    stored = make_pipe(
        "imagebind", imagebind_tokenizer=tiny_clip_tokenizer(), edit_defaults={"caption_embedding_weight": 1.0}
    )
    assert np.array_equal(run(stored, **edit).images, out.images)
    # With `conditioning_embeds` no LLM runs: the weight is not used, and needs no tokenizer.
    native = make_pipe("imagebind")
    given = dict(output_type="np", conditioning_embeds=out.conditioning_embeds)
    assert np.array_equal(run(native, **given, caption_embedding_weight=1.0).images, run(native, **given).images)


# ------------------------------------------------------------------------------------------------ candidate images
def _caption_cosines(pipe, images: torch.Tensor, caption: str) -> torch.Tensor:
    """cos(ImageBind(image_i), ImageBind(caption)), from ImageBind's own methods; images in [0, 1]."""
    pixels = pipe.imagebind_processor.preprocess_image(images)
    image_embeds = pipe.image_encoder.encode_image(pixels)
    text = pipe.image_encoder.encode_text(pipe.imagebind_processor.tokenize([caption]))[0]
    return torch.nn.functional.cosine_similarity(image_embeds, text[None], dim=-1)


def test_candidate_images_keep_the_one_imagebind_finds_closest_to_the_caption(reranking_pipe):
    """With a single generator the k candidates are exactly the k images of ``num_images_per_prompt=k`` (same noise
    draw); the output is the one with the largest ImageBind cosine to the caption."""
    picks = []
    for seed in range(4):
        every = run(reranking_pipe, output_type="pt", seed=seed, num_images_per_prompt=3)
        cosines = _caption_cosines(reranking_pipe, every.images, every.captions[0])
        assert cosines.unique().numel() == 3  # a real choice
        best = run(reranking_pipe, output_type="pt", seed=seed, num_candidate_images=3)
        assert best.images.shape == (1, 3, 32, 32) and best.captions == every.captions
        pick = int(cosines.argmax())
        assert torch.equal(best.images[0], every.images[pick])
        latents = run(reranking_pipe, output_type="latent", seed=seed, num_images_per_prompt=3).images
        assert torch.equal(run(reranking_pipe, output_type="latent", seed=seed, num_candidate_images=3).images[0],
                           latents[pick])  # fmt: skip
        picks.append(pick)
    assert any(pick != 0 for pick in picks)  # not always the first draw
    # One candidate is the plain edit; a stored default applies like the argument.
    plain = run(reranking_pipe, output_type="np", seed=1)
    assert np.array_equal(run(reranking_pipe, output_type="np", seed=1, num_candidate_images=1).images, plain.images)
    stored = make_pipe(
        "imagebind", imagebind_tokenizer=tiny_clip_tokenizer(), edit_defaults={"num_candidate_images": 3}
    )
    assert torch.equal(run(stored, output_type="pt", seed=3).images, best.images)


def _two_instructions(**kwargs) -> dict:
    """A batch of two edits (one with audio, one with two images), two denoising steps."""
    return dict(
        instruction=["add [audio1] to [image1]", "make [image2] look like [image1]"],
        images=[[image(0)], [image(1), image(2)]],
        audio=[[clip()], None],
        num_inference_steps=2,
        **kwargs,
    )


def _final_latents() -> tuple[dict, Callable]:
    """A `callback_on_step_end` that keeps the last step's latents (every candidate's) in the returned dict."""
    final = {}

    def keep_last(pipe, step, timestep, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return {}

    return final, keep_last


def test_candidate_images_per_output_image_with_a_generator_per_output(reranking_pipe):
    """Two instructions × two images per prompt × three candidates: the callback sees all 12 rows, and each output is
    its own group's best (scored here on the final latents the callback saw)."""
    final, keep_last = _final_latents()
    edit = _two_instructions(num_images_per_prompt=2, num_candidate_images=3, output_type="latent")
    out = reranking_pipe(
        **edit, generator=[torch.Generator().manual_seed(s) for s in range(4)], callback_on_step_end=keep_last
    )
    assert out.images.shape == (4, 4, 16, 16) and final["latents"].shape == (12, 4, 16, 16)
    decoded = (reranking_pipe.vae_decode(final["latents"]).float() / 2 + 0.5).clamp(0, 1)
    for i in range(4):
        caption = out.captions[i // 2]
        group = range(3 * i, 3 * i + 3)
        cosines = _caption_cosines(reranking_pipe, decoded[list(group)], caption)
        assert torch.equal(out.images[i], final["latents"][group[int(cosines.argmax())]])
    # Each output image's candidates come from its own generator: the same seeds give the same edit.
    again = reranking_pipe(**edit, generator=[torch.Generator().manual_seed(s) for s in range(4)])
    assert torch.equal(again.images, out.images)
    needs = r"list of 3 generators; a list needs one per output image: 1 instruction\(s\) × num_images_per_prompt=2"
    with pytest.raises(ValueError, match=needs):
        reranking_pipe("edit [image1]", images=[image(0)], num_images_per_prompt=2,
                       generator=[torch.Generator() for _ in range(3)])  # fmt: skip


def test_several_caption_weights_keep_per_instruction_the_weight_with_the_closest_candidate(reranking_pipe):
    """Two instructions × two images × weights (0, 1) × two candidates, a generator per output image: each
    instruction keeps the weight of its best candidate (its embeddings are that weight's own edit's), and each output
    image its best candidate at that weight — checked on the final latents the callback saw."""
    final, keep_last = _final_latents()
    edit = _two_instructions(llm_do_sample=False, llm_num_beams=2)
    out = reranking_pipe(
        **edit, num_images_per_prompt=2, num_candidate_images=2, caption_embedding_weight=[0.0, 1.0],
        generator=[torch.Generator().manual_seed(s) for s in range(4)], output_type="latent",
        callback_on_step_end=keep_last,
    )  # fmt: skip
    assert out.images.shape == (4, 4, 16, 16) and final["latents"].shape == (16, 4, 16, 16)  # rows (b, w, image, c)
    decoded = (reranking_pipe.vae_decode(final["latents"]).float() / 2 + 0.5).clamp(0, 1)
    cosines = torch.cat([_caption_cosines(reranking_pipe, decoded[8 * b : 8 * b + 8], out.captions[b]) for b in (0, 1)])
    cosines = cosines.view(2, 2, 2, 2)
    for b in range(2):
        weight = int(cosines[b].flatten(1).amax(dim=-1).argmax())
        single = reranking_pipe(**edit, caption_embedding_weight=(0.0, 1.0)[weight], output_type="latent",
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        for name in ("generation_embeds", "refined_embeds", "conditioning_embeds"):
            assert torch.equal(getattr(out, name)[b], getattr(single, name)[b]), name
        assert out.base_image_indices[b] == single.base_image_indices[b]
        for i in range(2):
            candidate = int(cosines[b, weight, i].argmax())
            row = ((b * 2 + weight) * 2 + i) * 2 + candidate
            assert torch.equal(out.images[2 * b + i], final["latents"][row])
    assert cosines[:, 0].ne(cosines[:, 1]).all()  # the weights give different images
    # One weight in a list is that weight; a stored list applies like the argument.
    listed = reranking_pipe(**edit, caption_embedding_weight=[1.0], generator=torch.Generator().manual_seed(3))
    number = reranking_pipe(**edit, caption_embedding_weight=1.0, generator=torch.Generator().manual_seed(3))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(listed.images, number.images))
    stored = make_pipe(
        "imagebind", imagebind_tokenizer=tiny_clip_tokenizer(), edit_defaults={"caption_embedding_weight": [0.0, 1.0]}
    )
    from_defaults = stored(**edit, output_type="np", generator=torch.Generator().manual_seed(5)).images
    passed = reranking_pipe(**edit, output_type="np", generator=torch.Generator().manual_seed(5),
                            caption_embedding_weight=(0.0, 1.0)).images  # fmt: skip
    assert from_defaults.shape == (2, 32, 32, 3) and np.array_equal(from_defaults, passed)


def test_score_candidate_images_compares_with_the_conditioning_where_there_is_no_caption(reranking_pipe):
    images = torch.rand(3, 3, 32, 32)
    conditioning = torch.randn(3, TINY_EMBED_DIM)
    pipe, cpu = reranking_pipe, torch.device("cpu")
    scores = pipe.score_candidate_images(images, ["a red circle", None, ""], conditioning, cpu)
    assert torch.allclose(scores[0], _caption_cosines(pipe, images[:1], "a red circle")[0], atol=1e-6)
    image_embeds = pipe.image_encoder.encode_image(pipe.imagebind_processor.preprocess_image(images))
    expected = torch.nn.functional.cosine_similarity(image_embeds[1:], conditioning[1:], dim=-1)
    assert torch.allclose(scores[1:], expected, atol=1e-6)
    with pytest.raises(ValueError, match="One caption and one conditioning embedding per image: got 3 images, 2"):
        reranking_pipe.score_candidate_images(images, ["a", "b"], conditioning, torch.device("cpu"))


def test_candidate_images_with_conditioning_embeds_need_no_tokenizer():
    """Without `captions` the candidates are judged against the conditioning embedding itself."""
    native = make_pipe("imagebind")
    first = run(native, output_type="pt", seed=2)
    given = dict(output_type="pt", seed=2, conditioning_embeds=first.conditioning_embeds)
    every = run(native, **given, num_images_per_prompt=3)
    pixels = native.imagebind_processor.preprocess_image(every.images)
    cosines = torch.nn.functional.cosine_similarity(
        native.image_encoder.encode_image(pixels), first.conditioning_embeds, dim=-1
    )
    best = run(native, **given, num_candidate_images=3)
    assert torch.equal(best.images[0], every.images[int(cosines.argmax())])
    with pytest.raises(ValueError, match=r"`num_candidate_images=3` compares each candidate image with its caption"):
        run(native, **given, num_candidate_images=3, captions="a red circle")


ATTRIBUTE_CLASSES = [3, 2, 4, 3, 5, 2, 4]


def _attribute_reading_pipe(**overrides) -> InstructAny2PixPipeline:
    components = tiny_pipeline_components("imagebind")
    adapter = with_attribute_reader(components["mm_adapter"], ATTRIBUTE_CLASSES)
    pipe = InstructAny2PixPipeline(
        **{**components, "mm_adapter": adapter, "imagebind_tokenizer": tiny_clip_tokenizer(), **overrides}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_agreement_pipe():
    return _attribute_reading_pipe()


def test_base_agreement_sums_the_logs_of_all_but_the_least_agreeing_fields(base_agreement_pipe):
    pipe = base_agreement_pipe
    generator = torch.Generator().manual_seed(0)
    captions, bases = torch.randn(2, 5, TINY_EMBED_DIM, generator=generator)
    ours = pipe.base_agreement(captions, bases)
    # Recomputed from the reader's logits: per field P(same class) (floored), sorted, the smallest dropped.
    logits = pipe.mm_adapter.attribute_reader(pipeline_module.rescale_to_norm(captions, 20.0))
    image_logits = pipe.mm_adapter.attribute_reader(pipeline_module.rescale_to_norm(bases, 20.0))
    fields = []
    for c, i in zip(logits.split(ATTRIBUTE_CLASSES, dim=-1), image_logits.split(ATTRIBUTE_CLASSES, dim=-1)):
        fields.append((c.softmax(-1) * i.softmax(-1)).sum(-1).clamp_min(pipeline_module.BASE_AGREEMENT_FLOOR).log())
    expected = torch.stack(fields, -1).sort(-1).values[:, pipeline_module.BASE_AGREEMENT_IGNORED_FIELDS :].sum(-1)
    torch.testing.assert_close(ours, expected)
    assert (ours <= 0).all() and ours.shape == (5,)
    # A zeroed reader reads every field uniformly: P(same class) is 1 / classes, and the 2 smallest are ignored.
    saved = {k: v.clone() for k, v in pipe.mm_adapter.attribute_reader.state_dict().items()}
    with torch.no_grad():
        for parameter in pipe.mm_adapter.attribute_reader.parameters():
            parameter.zero_()
    try:
        uniform = sum(np.log(1 / n) for n in sorted(ATTRIBUTE_CLASSES)[:-2])
        assert pipe.base_agreement(captions[:1], bases[:1]).item() == pytest.approx(uniform, rel=1e-5)
    finally:
        pipe.mm_adapter.attribute_reader.load_state_dict(saved)
    with pytest.raises(ValueError, match="must have the same shape, one base per caption"):
        pipe.base_agreement(captions, bases[:2])
    with pytest.raises(ValueError, match="`base_agreement` reads attributes: the pipeline's `mm_adapter` has no"):
        make_pipe("imagebind").base_agreement(captions, bases)


def test_base_agreement_scorer_reads_the_base_each_answer_selects(base_agreement_pipe):
    pipe = base_agreement_pipe
    parsed = [parse_instruction("put [audio1] on [image1] or [image2]", num_images=2, num_audio=1)]
    generator = torch.Generator().manual_seed(1)
    captions = ["a red circle", "a blue square", "a star"]
    texts = [f"<base><video><im_gen_start><im_gen>[{c}]<video>" for c in captions]
    beam_scores = torch.tensor([-0.1, -0.2, -0.3])
    gens = list(torch.randn(3, TINY_EMBED_DIM, generator=generator))
    cpu = torch.device("cpu")
    text_embeds = torch.nn.functional.normalize(
        pipe.image_encoder.encode_text(pipe.imagebind_processor.tokenize(captions)), dim=-1
    )
    # audio1, image1, image2 in reference order; image1 reads as the second caption, image2 as the third.
    media = [torch.stack([torch.randn(TINY_EMBED_DIM, generator=generator), text_embeds[1], text_embeds[2]]) * 20]
    cosine = (text_embeds * torch.nn.functional.normalize(torch.stack(gens), dim=-1)).sum(-1)
    image_of = {0: media[0][parsed[0].position_of("image", 0)], 1: media[0][parsed[0].position_of("image", 1)]}
    picks = set()
    for selected in ([0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1]):
        base_embeds = [image_of[k] for k in selected]  # each answer's base embedding points at its image
        assert [pipe.select_base_image(parsed[0], media[0], b, g) for b, g in zip(base_embeds, gens)] == selected
        expected_agreement = pipe.base_agreement(text_embeds, torch.stack([image_of[k] for k in selected]))
        for weight, base_weight in ((0.5, 0.0), (0.5, 10.0), (0.0, 100.0)):
            choose = pipe.caption_agreement_scorer(weight, cpu, base_weight, parsed=parsed, media_embeds=media)
            expected = int((beam_scores + weight * cosine + base_weight * expected_agreement).argmax())
            assert choose(0, texts, beam_scores, gens, base_embeds) == expected
            picks.add(expected)
    assert picks == {0, 1, 2}  # the base term, read against each answer's own base, changes the choice
    with pytest.raises(ValueError, match="`base_agreement_weight` > 0 selects each answer's base: pass `parsed`"):
        pipe.caption_agreement_scorer(0.5, cpu, 1.0)


def test_base_agreement_reranked_edit(base_agreement_pipe, monkeypatch):
    calls = _record_scorer_calls(monkeypatch)
    edit = dict(output_type="np", llm_do_sample=False, llm_num_beams=3, num_inference_steps=2)
    out = run(base_agreement_pipe, llm_base_agreement_weight=100.0, **edit)
    (texts, beam_scores, gens, bases, media, pick), = calls
    assert out.answers == [texts[pick]]
    captions = [pipeline_module.parse_answer(t).caption for t in texts]
    valid = [j for j, c in enumerate(captions) if c and gens[j] is not None]
    assert valid
    text_embeds = base_agreement_pipe.image_encoder.encode_text(
        base_agreement_pipe.imagebind_processor.tokenize([captions[j] for j in valid])
    )
    image = media[1]  # "add [audio1] to [image1]": the one image is every answer's base
    agreement = base_agreement_pipe.base_agreement(text_embeds, image.expand(len(valid), -1))
    assert pick == valid[int((beam_scores[valid] + 100.0 * agreement).argmax())]
    # Stored in edit_defaults it is used; a pipeline without an attribute reader refuses it by name.
    stored = _attribute_reading_pipe(edit_defaults={"llm_base_agreement_weight": 100.0})
    calls.clear()
    assert np.array_equal(run(stored, **edit).images, out.images) and len(calls) == 1
    with pytest.raises(ValueError, match=r"`llm_base_agreement_weight=0.5` reads attributes, but this pipeline's"):
        run(make_pipe("imagebind", imagebind_tokenizer=tiny_clip_tokenizer()), llm_base_agreement_weight=0.5, **edit)


# ------------------------------------------------------------------------------------------------ base focus
PROPOSAL = "<base><video><im_gen_start><im_gen>[a blue circle on a red background]<video>"


def _record_llm_calls(monkeypatch) -> list[dict]:
    """Every `generate_with_media` call of the pipeline: its media and, per row, all final beams and the pick. The
    second call of a pipeline call (the focused look) has its last beam replaced by `PROPOSAL`, so that it proposes
    an answer the first look did not write."""
    calls = []
    original = pipeline_module.generate_with_media

    def spy(*args, candidate_scorer=None, **kwargs):
        call = {"media_embeds": [m.clone() for m in kwargs["media_embeds"]], "beams": {}}
        calls.append(call)
        focused = len(calls) % 2 == 0

        def scorer(row, texts, beam_scores, generation_embeds, base_embeds):
            if focused:
                texts = list(texts[:-1]) + [PROPOSAL]
            pick = candidate_scorer(row, texts, beam_scores, generation_embeds, base_embeds)
            call["beams"][row] = (list(texts), generation_embeds, base_embeds, pick)
            return pick

        return original(*args, candidate_scorer=scorer if candidate_scorer else None, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate_with_media", spy)
    return calls


def test_base_focus_ranks_the_beams_of_the_llm_shown_only_the_base_beside_its_own(base_agreement_pipe, monkeypatch):
    pipe = base_agreement_pipe
    calls = _record_llm_calls(monkeypatch)
    instruction = "put [audio1] on [image1] or [image2]"
    edit = dict(images=[image(0), image(1)], audio=[clip()], output_type="np", llm_do_sample=False, llm_num_beams=3,
                num_inference_steps=2)  # fmt: skip
    out = run(pipe, instruction, llm_base_focus_weight=100.0, llm_rerank_weight=0.5, **edit)
    first, focused = calls
    parsed = parse_instruction(instruction, num_images=2, num_audio=1)
    media = first["media_embeds"][0]
    texts, gens, bases, pick = first["beams"][0]
    assert pipeline_module.parse_answer(texts[pick]).additions == ()  # the tiny LLM lists none
    # The second look: every image replaced by the base the first answer selected; the audio kept.
    base = pipe.select_base_image(parsed, media, bases[pick], gens[pick])
    shown = focused["media_embeds"][0]
    for position, ref in enumerate(parsed.references):
        expected = media[parsed.position_of("image", base)] if ref.kind == "image" else media[position]
        assert torch.equal(shown[position], expected)
    # The answer: the best of both beam sets, scored under the real media with base agreement at the focus weight.
    candidates = texts + [t for t in focused["beams"][0][0] if t not in texts]
    assert len(candidates) == 4 and candidates[-1] == PROPOSAL  # the tiny LLM's own beams do not depend on media
    scores, generations, base_embeds = pipeline_module.score_answers(
        pipe.llm, pipe.llm_tokenizer, pipe.mm_adapter, pipe.llm_prompt(parsed), media, candidates, pipe.token_ids
    )
    choose = pipe.caption_agreement_scorer(0.5, torch.device("cpu"), 100.0, parsed=[parsed], media_embeds=[media])
    best = choose(0, candidates, scores, generations, base_embeds)
    assert out.answers == [candidates[best]]
    assert scores[-1] < scores[0] - 1  # the proposal is scored as written under the real inputs
    # Off (0), or with one image, the LLM runs once; a stored default acts like the argument.
    calls.clear()
    plain = run(pipe, instruction, llm_rerank_weight=0.5, **edit)
    assert len(calls) == 1
    calls.clear()
    run(pipe, "put [audio1] on [image1]", llm_base_focus_weight=100.0, **{**edit, "images": [image(0)]})
    assert len(calls) == 1
    calls.clear()
    stored = _attribute_reading_pipe(edit_defaults={"llm_base_focus_weight": 100.0, "llm_rerank_weight": 0.5})
    assert np.array_equal(run(stored, instruction, **edit).images, out.images) and len(calls) == 2
    assert plain.answers[0] in candidates


def test_base_focus_shows_the_base_patches_in_place_of_every_image(monkeypatch):
    components = tiny_pipeline_components("imagebind")
    config = dict(image_patch_tokens=3, resampler_hidden_size=16, resampler_depth=1, resampler_heads=2)
    config["patch_embed_dim"] = components["image_encoder"].config.vision_embed_dim
    adapter = extend_adapter(components["mm_adapter"], attribute_classes=ATTRIBUTE_CLASSES, **config)
    tokenizer = tiny_clip_tokenizer()
    pipe = InstructAny2PixPipeline(**{**components, "mm_adapter": adapter, "imagebind_tokenizer": tokenizer})
    pipe.set_progress_bar_config(disable=True)
    calls = []
    real = pipeline_module.generate_with_media
    monkeypatch.setattr(pipeline_module, "generate_with_media", lambda *a, **k: calls.append(k) or real(*a, **k))
    run(pipe, "put [audio1] on [image1] or [image2]", images=[image(0), image(1)], audio=[clip()], llm_do_sample=False,
        llm_num_beams=2, llm_base_focus_weight=1.0, num_inference_steps=2)  # fmt: skip
    first, focused = calls
    (sound, one, two), = first["image_patches"]
    (no_patches, shown, shown_again), = focused["image_patches"]
    assert sound is None and no_patches is None and not torch.equal(one, two)
    base = 0 if torch.equal(shown, one) else 1
    assert torch.equal(shown, (one, two)[base]) and torch.equal(shown_again, shown)
    media, focused_media = first["media_embeds"][0], focused["media_embeds"][0]
    assert torch.equal(focused_media[0], media[0])  # the sound
    assert torch.equal(focused_media[1], media[1 + base]) and torch.equal(focused_media[2], media[1 + base])


def test_focus_on_base_leaves_answers_that_add_other_inputs(base_agreement_pipe, monkeypatch):
    pipe = base_agreement_pipe
    calls = _record_llm_calls(monkeypatch)
    parsed = [parse_instruction("add [image2] to [image1]", num_images=2, num_audio=0)]
    media = [torch.randn(2, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(0))]
    gens, bases = [torch.ones(TINY_EMBED_DIM)], [media[0][0]]
    adds = "<base><video><im_gen_start><im_gen>[a red circle]<video>additions:red circle:<video>."
    args = (parsed, media, None, [adds], gens, bases, {0: [adds]}, 0.5, 1.0, 20, torch.device("cpu"))
    assert pipe.focus_on_base(*args) == ([adds], gens, bases)
    # Nor does it look again at a row without recorded beams (the first pass was not reranked).
    plain = adds.split("additions")[0]
    assert pipe.focus_on_base(parsed, media, None, [plain], gens, bases, {}, 0.5, 1.0, 20, torch.device("cpu")) == (
        [plain], gens, bases
    )
    assert calls == []
    with pytest.raises(ValueError, match=r"`llm_base_focus_weight=0.5` reads attributes, but this pipeline's"):
        run(make_pipe("imagebind", imagebind_tokenizer=tiny_clip_tokenizer()), "edit [image1] or [image2]",
            images=[image(0), image(1)], llm_do_sample=False, llm_num_beams=2, llm_base_focus_weight=0.5)  # fmt: skip


# ------------------------------------------------------------------------------------------------ base instruction
def _words_cosines(pipe, parsed, media) -> torch.Tensor:
    """cos(ImageBind text embedding of the instruction's words, each image), from ImageBind's own methods."""
    words = pipe.image_encoder.encode_text(pipe.imagebind_processor.tokenize([parsed.words]))[0]
    images = torch.stack([media[parsed.position_of("image", ref.index)] for ref in parsed.image_references])
    return torch.nn.functional.cosine_similarity(images, words[None], dim=-1)


def test_instruction_base_priors_weigh_the_words_cosine_with_each_image(reranking_pipe):
    pipe, cpu = reranking_pipe, torch.device("cpu")
    parsed = [
        parse_instruction("put [audio1] on [image2] or [image1], the red one", num_images=2, num_audio=1),
        parse_instruction("add [audio1] to [image1]", num_images=1, num_audio=1),
        parse_instruction("[image1] [image2]", num_images=2, num_audio=0),  # no words to read
    ]
    generator = torch.Generator().manual_seed(0)
    media = [torch.randn(len(p.references), TINY_EMBED_DIM, generator=generator) * 20 for p in parsed]
    priors = pipe.instruction_base_priors(parsed, media, 3.0, cpu)
    # One score per image placeholder in order of appearance: [image2] first.
    torch.testing.assert_close(priors[0], 3.0 * _words_cosines(pipe, parsed[0], media[0]))
    assert priors[1] is None and priors[2] is None
    assert pipe.instruction_base_priors(parsed, media, 0.0, cpu) == [None, None, None]
    # The prior is added to the LLM's dot products; without a base or generation embedding it decides alone.
    instruction, row = parsed[0], media[0]
    second = row[instruction.position_of("image", 1)]  # the first image placeholder, [image2]
    select = pipe.select_base_image
    assert select(instruction, row, row[instruction.position_of("image", 0)], None) == 0
    dots = torch.stack([row[1] @ row[1], row[2] @ row[1]])
    push = torch.tensor([dots[0] - dots[1] + 1.0, 0.0])
    assert select(instruction, row, row[1], None, prior=push) == 1  # [image2] overtakes [image1]
    assert select(instruction, row, row[1], None, prior=-push) == 0
    assert select(instruction, row, None, None, prior=torch.tensor([0.0, 1.0])) == 0  # [image1] is the second
    assert select(instruction, row, None, None, prior=torch.tensor([1.0, 0.0])) == 1
    assert select(instruction, row, None, None) == 1  # no query, no prior: the first image placeholder
    assert select(instruction, row, None, second) == 1


def test_base_instruction_weight_picks_the_base_the_words_describe(base_agreement_pipe):
    pipe, cpu = base_agreement_pipe, torch.device("cpu")
    instruction = "edit [image1] or [image2], the one with a red circle"
    parsed = parse_instruction(instruction, num_images=2, num_audio=0)
    edit = dict(output_type="np", llm_do_sample=False, llm_num_beams=2, num_inference_steps=2)
    disagreements = 0
    for seeds in ((0, 1), (1, 0), (2, 3), (3, 2)):
        images = [image(s) for s in seeds]
        media = pipe.encode_media([parsed], [[pipe.imagebind_processor.load_image(i) for i in images]], [[]], cpu)[0][0]
        plain = run(pipe, instruction, images=images, **edit)
        by_words = int(_words_cosines(pipe, parsed, media).argmax())
        moved = run(pipe, instruction, images=images, base_instruction_weight=1e6, **edit)
        assert moved.base_image_indices == [by_words]
        assert run(pipe, instruction, images=images, base_instruction_weight=0.0, **edit).base_image_indices == (
            plain.base_image_indices
        )
        disagreements += plain.base_image_indices != [by_words]
    assert disagreements  # some pair where the words overrule the LLM's own choice
    # No beam search needed: the weight applies to a greedy answer's base as well.
    greedy = run(pipe, instruction, images=images, base_instruction_weight=1e6, **{**edit, "llm_num_beams": 1})
    assert greedy.base_image_indices == [by_words]
    # A stored default acts like the argument; with `conditioning_embeds` no base is chosen and no tokenizer needed.
    stored = _attribute_reading_pipe(edit_defaults={"base_instruction_weight": 1e6})
    assert run(stored, instruction, images=images, **edit).base_image_indices == moved.base_image_indices
    native = make_pipe("imagebind")
    given = dict(images=images, output_type="np", conditioning_embeds=moved.conditioning_embeds, num_inference_steps=2)
    assert np.array_equal(run(native, instruction, base_instruction_weight=5.0, **given).images,
                          run(native, instruction, **given).images)  # fmt: skip


def test_focus_on_base_drops_the_first_beams_when_the_words_moved_the_base(base_agreement_pipe, monkeypatch):
    pipe, cpu = base_agreement_pipe, torch.device("cpu")
    parsed = [parse_instruction("edit [image1] or [image2]", num_images=2, num_audio=0)]
    media = [torch.randn(2, TINY_EMBED_DIM, generator=torch.Generator().manual_seed(0)) * 20]
    gens, bases = [torch.ones(TINY_EMBED_DIM)], [media[0][0]]  # the LLM's own choice: [image1]
    first = "<base><video><im_gen_start><im_gen>[a first beam]<video>"
    shown, scored = [], []
    real_generate, real_score = pipeline_module.generate_with_media, pipeline_module.score_answers
    monkeypatch.setattr(pipeline_module, "generate_with_media",
                        lambda *a, **k: shown.append(k["media_embeds"][0]) or real_generate(*a, **k))  # fmt: skip
    monkeypatch.setattr(pipeline_module, "score_answers",
                        lambda *a, **k: scored.append(list(a[5])) or real_score(*a, **k))  # fmt: skip
    for prior, base in ((torch.tensor([0.0, 1e6]), 1), (torch.tensor([1e6, 0.0]), 0), (None, 0)):
        shown.clear(), scored.clear()
        answers, _, _ = pipe.focus_on_base(parsed, media, None, [first], gens, bases, {0: [first, first + " "]},
                                           0.5, 1.0, 20, cpu, base_priors=[prior])  # fmt: skip
        assert torch.equal(shown[0], media[0][[base, base]])  # the LLM looks at the chosen base only
        (candidates,) = scored
        if base == 1:  # moved by the words: the first beams describe [image1] and do not compete
            assert first not in candidates and candidates == list(dict.fromkeys(candidates))
        else:
            assert candidates[:2] == [first, first + " "]
        assert answers[0] in candidates


def test_stored_reranking_is_turned_off_by_name_to_sample():
    pipe = make_pipe("imagebind", edit_defaults={"llm_do_sample": False, "llm_num_beams": 4, "llm_rerank_weight": 0.5})
    with pytest.raises(ValueError, match=r"needs `llm_num_beams` > 1.*pass `llm_rerank_weight=0`.*`edit_defaults`"):
        run(pipe, llm_do_sample=True, llm_num_beams=1)
    sampled = run(pipe, output_type="np", llm_do_sample=True, llm_num_beams=1, llm_rerank_weight=0,
                  num_inference_steps=2)  # fmt: skip
    assert np.isfinite(sampled.images).all()


def test_imagebind_tokenizer_is_saved_and_loaded(reranking_pipe, tmp_path):
    reranking_pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["imagebind_tokenizer"][1] == "CLIPTokenizer"
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    captions = ["a red circle on the left", "a blue star"]
    tokenize = reranking_pipe.imagebind_processor.tokenize
    assert torch.equal(loaded.imagebind_processor.tokenize(captions), tokenize(captions))
    edit = dict(output_type="np", llm_do_sample=False, llm_num_beams=2, llm_rerank_weight=1.0, num_inference_steps=2)
    np.testing.assert_array_equal(run(loaded, **edit).images, run(reranking_pipe, **edit).images)


def test_edit_defaults_are_saved_and_used_unless_overridden(tmp_path):
    pipe = make_pipe("imagebind", edit_defaults={"structure_preservation": 1.0, "embedding_weights": [0.4, 0.6, 0.4]})
    settings = pipe.resolve_edit_settings(embedding_norm=30.0)
    assert settings["structure_preservation"] == 1.0 and settings["embedding_weights"] == (0.4, 0.6, 0.4)
    assert settings["embedding_norm"] == 30.0 and settings["num_inference_steps"] == 25  # passed; built-in
    stored = run(pipe, output_type="np", num_inference_steps=2)
    explicit = run(make_pipe("imagebind"), output_type="np", num_inference_steps=2, structure_preservation=1.0,
                   embedding_weights=(0.4, 0.6, 0.4))  # fmt: skip
    assert np.array_equal(stored.images, explicit.images)

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["edit_defaults"]["structure_preservation"] == 1.0
    loaded = InstructAny2PixPipeline.from_pretrained(tmp_path)
    assert loaded.resolve_edit_settings() == pipe.resolve_edit_settings()


def test_decoder_prompts_are_edit_settings():
    """A decoder trained with empty unconditional prompts stores ``negative_prompt=""``; the stored prompts give the
    same edit as passing them, and differ from the official defaults."""
    prompts = {"negative_prompt": "", "prompt_template": "{caption}, high quality"}
    stored = run(make_pipe("sd", edit_defaults=prompts), output_type="np", num_inference_steps=2)
    explicit = run(make_pipe("sd"), output_type="np", num_inference_steps=2, **prompts)
    official = run(make_pipe("sd"), output_type="np", num_inference_steps=2)
    assert np.array_equal(stored.images, explicit.images)
    assert not np.array_equal(stored.images, official.images)
    with pytest.raises(ValueError, match="must be a string containing '{caption}'"):
        run(make_pipe("sd"), prompt_template="best quality")
    with pytest.raises(TypeError, match="`negative_prompt` must be a string"):
        run(make_pipe("sd"), negative_prompt=["x"])


def test_unknown_edit_defaults_are_rejected():
    with pytest.raises(ValueError, match=r"unknown settings \['alpha'\]"):
        make_pipe("imagebind", edit_defaults={"alpha": 1.0})
