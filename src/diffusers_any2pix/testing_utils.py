"""Tiny, randomly initialised components for tests and benchmarks (no downloads).

Every builder is seeded so the same call returns bit-identical weights. The tiny LLM is briefly fitted to always
answer with a fixed, well-formed InstructAny2Pix answer, so end-to-end tests exercise the whole data flow (a purely
random LLM almost never emits ``<im_gen>…<video>``).
"""

import copy
import functools

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .models.imagebind import ImageBindModel
from .models.ip_adapter import ImageBindIPAdapter
from .models.mm_adapter import MultimodalAdapter
from .models.prior import Any2PixPrior
from .multimodal_llm import (
    MULTIMODAL_SPECIAL_TOKENS,
    VICUNA_SYSTEM_PROMPT,
    add_multimodal_tokens,
    build_vicuna_prompt,
    inject_media_embeds,
)
from .word_tokenizer import build_word_level_tokenizer


TINY_EMBED_DIM = 16
TINY_ANSWER = "<base><video><im_gen_start><im_gen>[a red circle on a blue background]<video>"
_TINY_WORDS = (
    VICUNA_SYSTEM_PROMPT
    + " USER: ASSISTANT: [ ] add to remove the from change make replace with in style of and look like a an red green"
    " blue yellow circle square triangle star background sound image picture on left right centre striped put into edit or"
)


# Sizes of the tiny ImageBind (1-block trunks); Meta's preprocessing sizes for audio and text are kept.
TINY_IMAGEBIND_CONFIG = dict(
    out_embed_dim=TINY_EMBED_DIM,
    vision_embed_dim=16,
    vision_num_blocks=1,
    vision_num_heads=2,
    text_embed_dim=16,
    text_num_blocks=1,
    text_num_heads=2,
    audio_embed_dim=16,
    audio_num_blocks=1,
    audio_num_heads=2,
    audio_drop_path=0.0,
)


def tiny_imagebind(embed_dim: int = TINY_EMBED_DIM, seed: int = 0, image_size: int = 28) -> ImageBindModel:
    """An ImageBind with 1-block trunks and ``image_size``² images."""
    torch.manual_seed(seed)
    config = {**TINY_IMAGEBIND_CONFIG, "out_embed_dim": embed_dim, "vision_image_size": image_size}
    return ImageBindModel(**config).eval()


def tiny_llm_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer covering the vicuna prompt and a small editing vocabulary, with Llama's control tokens."""
    return build_word_level_tokenizer([_TINY_WORDS, TINY_ANSWER])


def tiny_llm(
    embed_dim: int = TINY_EMBED_DIM,
    answer: str | None = TINY_ANSWER,
    fit_steps: int = 150,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, MultimodalAdapter]:
    """A 2-layer Llama, its tokenizer (multimodal tokens added) and a `MultimodalAdapter`.

    With ``answer`` the LLM is fitted for ``fit_steps`` Adam steps to reply ``answer</s>`` to any instruction, so
    greedy and low-temperature sampling produce a well-formed answer. The fit is cached per argument set (every
    call returns fresh copies), so a test session pays for it once.
    """
    return copy.deepcopy(_cached_tiny_llm(embed_dim, answer, fit_steps, seed))


@functools.lru_cache(maxsize=4)
def _cached_tiny_llm(embed_dim, answer, fit_steps, seed):
    torch.manual_seed(seed)
    tokenizer = tiny_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer) + len(MULTIMODAL_SPECIAL_TOKENS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.unk_token_id,
    )
    llm = LlamaForCausalLM(config)
    token_ids = add_multimodal_tokens(tokenizer, llm)
    adapter = MultimodalAdapter(embed_dim=embed_dim, llm_hidden_size=config.hidden_size)
    if answer is not None:
        _fit_constant_answer(llm, tokenizer, adapter, answer, token_ids, fit_steps, seed)
    return llm.eval(), tokenizer, adapter.eval()


def _fit_constant_answer(llm, tokenizer, adapter, answer, token_ids, steps, seed) -> None:
    """Teacher-force ``answer</s>`` after a few different instructions (media injected like at inference)."""
    generator = torch.Generator().manual_seed(seed)
    instructions = [
        "add <video> to <video>",
        "remove the circle from <video>",
        "make <video> look like <video>",
        "add <video> and <video> to <video>",
        "put <video> into <video> with the style of <video>",
    ]
    embedding = llm.get_input_embeddings()
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [token_ids.eos]
    optimizer = torch.optim.Adam(list(llm.parameters()) + list(adapter.parameters()), lr=2e-2)
    llm.train()
    for step in range(steps):
        instruction = instructions[step % len(instructions)]
        prompt_ids = [token_ids.bos] + tokenizer(build_vicuna_prompt(instruction), add_special_tokens=False)["input_ids"]
        prompt_ids = torch.tensor([prompt_ids])
        media = [torch.randn(instruction.count("<video>"), adapter.config.embed_dim, generator=generator)]
        # Prompt media injected; generated tokens (answer) keep plain embeddings, as with the KV cache at inference.
        prompt_embeds = inject_media_embeds(
            embedding(prompt_ids), prompt_ids, media, adapter, token_ids.video, word_embeddings=embedding.weight
        )
        inputs = torch.cat([prompt_embeds, embedding(torch.tensor([answer_ids[:-1]]))], dim=1)
        labels = torch.full(inputs.shape[:2], -100)
        labels[0, prompt_ids.shape[1] - 1 :] = torch.tensor(answer_ids)
        logits = llm(inputs_embeds=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    llm.eval()


def tiny_prior(embed_dim: int = TINY_EMBED_DIM, seed: int = 0) -> Any2PixPrior:
    torch.manual_seed(seed)
    prior = Any2PixPrior(
        embed_dim=embed_dim,
        text_hidden_dim=16,
        score_embed_dim=8,
        hidden_size=embed_dim,
        num_layers=2,
        num_attention_heads=2,
        max_positions=32,
        vocab_size=8,
    )
    prior.set_empty_text_hidden_states(torch.randn(2, 16))
    return prior.eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def tiny_clip_text_encoder(hidden_size: int, projection: bool = False, seed: int = 0):
    """A 1-layer CLIP text encoder and a CLIP tokenizer over a small BPE vocabulary."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2 * 94 + 2,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=2 * 94,  # <|startoftext|> of the tiny tokenizer below
        eos_token_id=2 * 94 + 1,
        pad_token_id=2 * 94 + 1,
    )
    encoder = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return encoder, tiny_clip_tokenizer()


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over printable ASCII characters (and their end-of-word forms), no merges (a tiny
    ImageBind reads text with it too)."""
    symbols = [chr(c) for c in range(33, 127)]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=77, pad_token="<|endoftext|>"
    )


def tiny_decoder(family: str, embed_dim: int = TINY_EMBED_DIM, seed: int = 0) -> dict:
    """UNet, VAE, scheduler (and text encoders + IP-Adapter) of one decoder family: ``"sd"``, ``"sdxl"`` or
    ``"imagebind"``. Images are 32×32 (latents 16×16)."""
    unet_kwargs = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=4,
    )
    components: dict = {
        "vae": tiny_vae(seed),
        "scheduler": DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
        ),
    }
    torch.manual_seed(seed)
    if family == "imagebind":
        unet = UNet2DConditionModel(
            **unet_kwargs,
            cross_attention_dim=16,
            encoder_hid_dim=embed_dim,
            encoder_hid_dim_type="image_proj",
            addition_embed_type="image",
        )
        components["unet"] = unet.eval()
        return components
    if family == "sd":
        components["unet"] = UNet2DConditionModel(**unet_kwargs, cross_attention_dim=16).eval()
        components["text_encoder"], components["tokenizer"] = tiny_clip_text_encoder(16, seed=seed)
    elif family == "sdxl":
        components["unet"] = UNet2DConditionModel(
            **unet_kwargs,
            cross_attention_dim=32,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4,
            transformer_layers_per_block=1,
        ).eval()
        components["text_encoder"], components["tokenizer"] = tiny_clip_text_encoder(16, seed=seed)
        components["text_encoder_2"], components["tokenizer_2"] = tiny_clip_text_encoder(
            16, projection=True, seed=seed + 1
        )
    else:
        raise ValueError(f"`family` must be 'sd', 'sdxl' or 'imagebind', got {family!r}.")
    torch.manual_seed(seed + 2)
    adapter = ImageBindIPAdapter.from_unet(components["unet"], image_embed_dim=embed_dim)
    for param in adapter.parameters():  # a random, non-trivial adapter so tests see its effect
        torch.nn.init.normal_(param, std=0.2)
    components["ip_adapter"] = adapter.eval()
    return components


def tiny_pipeline_components(family: str = "imagebind", seed: int = 0, answer: str | None = TINY_ANSWER) -> dict:
    """All components of a tiny `InstructAny2PixPipeline` for ``family``."""
    llm, llm_tokenizer, mm_adapter = tiny_llm(answer=answer, seed=seed)
    return {
        "image_encoder": tiny_imagebind(seed=seed),
        "llm": llm,
        "llm_tokenizer": llm_tokenizer,
        "mm_adapter": mm_adapter,
        "prior": tiny_prior(seed=seed),
        **tiny_decoder(family, seed=seed),
    }


def extend_adapter(mm_adapter: MultimodalAdapter, **config) -> MultimodalAdapter:
    """A copy of ``mm_adapter`` with ``config`` changed (e.g. ``attribute_classes``, ``image_patch_tokens``): the
    parts it shares with ``mm_adapter`` keep their weights, the new parts are drawn from seed 0."""
    torch.manual_seed(0)
    adapter = MultimodalAdapter.from_config(mm_adapter.config, **config)
    adapter.load_state_dict(mm_adapter.state_dict(), strict=False)
    return adapter.eval()


def with_attribute_reader(mm_adapter: MultimodalAdapter, attribute_classes: list[int], sharpness: float = 20.0):
    """`extend_adapter` with attribute fields of ``attribute_classes``, its random reader's weights scaled by
    ``sharpness`` so the reads are near one-hot, as a trained reader's are."""
    adapter = extend_adapter(mm_adapter, attribute_classes=list(attribute_classes))
    with torch.no_grad():
        adapter.attribute_reader.weight.mul_(sharpness)
    return adapter


def save_tiny_pipeline(output_dir: str, family: str = "imagebind", seed: int = 0) -> None:
    """Save the tiny (untrained) pipeline of ``family`` as a pipeline folder."""
    from .pipeline_instruct_any2pix import InstructAny2PixPipeline

    InstructAny2PixPipeline(**tiny_pipeline_components(family, seed=seed)).save_pretrained(output_dir)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a tiny, untrained InstructAny2Pix pipeline (plumbing only).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--family", choices=["imagebind", "sd", "sdxl"], default="imagebind")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    save_tiny_pipeline(cli.output_dir, cli.family, cli.seed)
    print(f"saved a tiny untrained {cli.family} pipeline to {cli.output_dir}")
