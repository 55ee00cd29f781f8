"""Toolkit that turns any transformers causal LM into the InstructAny2Pix multimodal LLM.

The LLM itself stays a plain transformers model (quantisation, device maps, any architecture); this module adds
what InstructAny2Pix needs around it:

- the nine special tokens of the official release (`add_multimodal_tokens`, `get_multimodal_token_ids`);
- the vicuna_v1 prompt (`build_vicuna_prompt`);
- media injection: every `<video>` placeholder of the prompt gets `embed(<video>) + adapter.project(e_i)`
  (`inject_media_embeds`, `prepare_multimodal_inputs`); optionally every medium also gives one token per attribute
  field read from its vector by the adapter's attribute reader, and an image `K` vectors read from its patch tokens
  by the adapter's resampler, at further `<video>` tokens (`expand_media_tokens`);
- generation with the KV cache, media injected once at prefill, randomness through the caller's
  `torch.Generator` (`generate_with_media`);
- the read-out rule: the final-layer hidden state *preceding* a `<video>` token, through `adapter.predict`, gives
  that token's embedding; the generation embedding is the first `<video>` after the last `<im_gen>`, the base
  embedding the `<video>` right after `<base>` (`find_embedding_positions`, shared by inference and training);
- parsing of the answer (`parse_answer`).
"""

import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from diffusers.utils import BaseOutput
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from .models.mm_adapter import MultimodalAdapter


IM_GEN_START_TOKEN = "<im_gen_start>"
IM_GEN_TOKEN = "<im_gen>"
MASK_GEN_TOKEN = "<mask_gen>"
AUDIO_GEN_TOKEN = "<audio_gen>"
AUDIO_GEN_START_TOKEN = "<audio_gen_start>"
AUDIO_TOKEN = "<audio>"
VIDEO_TOKEN = "<video>"
BASE_TOKEN = "<base>"
BASE_NULL_TOKEN = "<base_null>"

# The order matters: the official release added them in one call in this order (ids 32000-32008 on Vicuna), and
# its embedding rows are stored in that order.
MULTIMODAL_SPECIAL_TOKENS: tuple[str, ...] = (
    IM_GEN_START_TOKEN,
    IM_GEN_TOKEN,
    MASK_GEN_TOKEN,
    AUDIO_GEN_TOKEN,
    AUDIO_GEN_START_TOKEN,
    AUDIO_TOKEN,
    VIDEO_TOKEN,
    BASE_TOKEN,
    BASE_NULL_TOKEN,
)

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_CAPTION_PATTERN = re.compile(r"\[([^\]]+)\]")
# A base description is only a bracket between `<base><video>` and the generation tokens: without them the bracket is
# the result caption, as an official model (or a truncated answer) writes it.
_BASE_DESCRIPTION_PATTERN = re.compile(
    re.escape(BASE_TOKEN) + r"\s*" + re.escape(VIDEO_TOKEN) + r"\s*\[([^\]]+)\]\s*(?="
    + re.escape(IM_GEN_START_TOKEN) + "|" + re.escape(IM_GEN_TOKEN) + ")"
)
# The official answer's list of media added to the result: `additions:{name}:<video>.{name}:<video>.` after the caption.
_ADDITIONS_PATTERN = re.compile(r"additions\s*:(.*)$", re.DOTALL)
_ADDITION_PATTERN = re.compile(r"\s*([^:\[\]<>]+?)\s*:\s*" + re.escape(VIDEO_TOKEN) + r"\s*\.?")


@dataclass(frozen=True)
class MultimodalTokenIds:
    """Token ids of the multimodal special tokens and the control tokens the toolkit needs.

    Args:
        im_gen_start, im_gen, mask_gen, audio_gen, audio_gen_start, audio, video, base, base_null (`int`):
            Ids of the nine special tokens of `MULTIMODAL_SPECIAL_TOKENS`.
        eos (`int`):
            End-of-sequence id; generation stops there (`</s>` for Vicuna).
        pad (`int`):
            Padding id (the official setup pads with `<unk>`).
        bos (`int`, *optional*):
            Beginning-of-sequence id prepended to every prompt, `None` for tokenizers without one.
    """

    im_gen_start: int
    im_gen: int
    mask_gen: int
    audio_gen: int
    audio_gen_start: int
    audio: int
    video: int
    base: int
    base_null: int
    eos: int
    pad: int
    bos: int | None = None

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """The ids of the nine special tokens, in `MULTIMODAL_SPECIAL_TOKENS` order."""
        return tuple(getattr(self, name) for name in _SPECIAL_TOKEN_FIELDS)


# Field name of each special token, parallel to MULTIMODAL_SPECIAL_TOKENS.
_SPECIAL_TOKEN_FIELDS = tuple(f.name for f in fields(MultimodalTokenIds))[: len(MULTIMODAL_SPECIAL_TOKENS)]


@dataclass(frozen=True)
class EmbeddingPositions:
    """Where to read the predicted embeddings: indices into a hidden-state sequence aligned with a token sequence.

    Args:
        base (`int`, *optional*):
            Index of the hidden state preceding the `<video>` right after `<base>` (i.e. the `<base>` token itself),
            `None` when the answer has no `<base><video>` (e.g. `<base_null>`).
        generation (`int`, *optional*):
            Index of the hidden state preceding the first `<video>` after the last `<im_gen>`, `None` when there is
            none.
    """

    base: int | None
    generation: int | None


@dataclass(frozen=True)
class ParsedAnswer:
    """What the pipeline needs from the LLM's decoded answer.

    Args:
        caption (`str`, *optional*):
            The result caption: the first `[...]` after the last `<im_gen>` (the first `[...]` that is not the base
            description when there is no `<im_gen>`), brackets removed and whitespace stripped; `None` when there is
            none.
        has_im_gen (`bool`):
            Whether the answer contains `<im_gen>` (without it there is no generation embedding).
        has_base (`bool`):
            Whether the answer names a base input with `<base>`.
        base_null (`bool`):
            Whether the answer says "no base" with `<base_null>`.
        base_caption (`str`, *optional*):
            The base description `[...]` between `<base><video>` and `<im_gen_start>`/`<im_gen>` (an LLM trained with
            `describe_base` writes the image it edits there), `None` when there is none (the official answer).
        additions (`tuple[str, ...]`):
            The names in the official answer's `additions:{name}:<video>.` list after the caption (the inputs it adds
            to the result, each with its own embedding); empty when it lists none.
    """

    caption: str | None
    has_im_gen: bool
    has_base: bool
    base_null: bool
    base_caption: str | None = None
    additions: tuple[str, ...] = ()


@dataclass
class MultimodalGenerationOutput(BaseOutput):
    """Output of `generate_with_media`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, num_new_tokens)`):
            The generated tokens only (no prompt); rows that stopped early are filled with the pad id after `</s>`.
        texts (`list[str]`):
            Each row's answer decoded up to (excluding) the first end-of-sequence token, special tokens kept.
        generation_embeds (`list[torch.Tensor | None]`):
            Per row, the predicted generation embedding of shape `(embed_dim,)`, or `None` when the answer has no
            `<video>` after its last `<im_gen>`.
        base_embeds (`list[torch.Tensor | None]`):
            Per row, the predicted base embedding of shape `(embed_dim,)`, or `None` (`<base_null>`, or no
            `<base><video>` in the answer).
        parsed_answers (`list[ParsedAnswer]`):
            `parse_answer` of each text.
        hidden_states (`torch.Tensor` of shape `(batch_size, num_new_tokens, hidden_size)`, *optional*):
            With `output_hidden_states=True`: the final-layer (post-norm) hidden state preceding each generated
            token, i.e. the state from which that token was predicted.
    """

    sequences: torch.LongTensor
    texts: list[str]
    generation_embeds: list[torch.Tensor | None]
    base_embeds: list[torch.Tensor | None]
    parsed_answers: list[ParsedAnswer]
    hidden_states: torch.Tensor | None = None


def _check_tokenizer(tokenizer) -> None:
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")


def _check_llm(llm) -> None:
    if not callable(getattr(llm, "get_input_embeddings", None)) or not callable(getattr(llm, "generate", None)):
        raise TypeError(
            f"`llm` must be a transformers causal LM (with `get_input_embeddings` and `generate`), got "
            f"{type(llm).__name__}."
        )


def _default_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    # The official setup pads with <unk>; tokenizers without one (Qwen, SmolLM ...) fall back to their EOS.
    pad = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if pad is None:
        raise ValueError("`tokenizer` has no pad, unk or eos token; set `tokenizer.pad_token` first.")
    return pad


def get_multimodal_token_ids(tokenizer: PreTrainedTokenizerBase) -> MultimodalTokenIds:
    """Looks up the ids of the multimodal special tokens in an already prepared tokenizer.

    Ids are looked up with `convert_tokens_to_ids`, never by tokenising the strings.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            A tokenizer that already holds the nine tokens of `MULTIMODAL_SPECIAL_TOKENS` (see
            `add_multimodal_tokens`). It is not modified.

    Returns:
        `MultimodalTokenIds`
    """
    _check_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in MULTIMODAL_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(
            f"`tokenizer` lacks the multimodal special tokens {missing}; prepare it with "
            "`add_multimodal_tokens(tokenizer, llm)` first."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("`tokenizer` has no eos token; generation needs one to stop.")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids(_default_pad_token(tokenizer))
    special_ids = tokenizer.convert_tokens_to_ids(list(MULTIMODAL_SPECIAL_TOKENS))
    return MultimodalTokenIds(
        **dict(zip(_SPECIAL_TOKEN_FIELDS, special_ids)),
        eos=tokenizer.eos_token_id,
        pad=pad_id,
        bos=tokenizer.bos_token_id,
    )


def add_multimodal_tokens(
    tokenizer: PreTrainedTokenizerBase, llm=None, mean_resizing: bool = True
) -> MultimodalTokenIds:
    """Adds the nine multimodal special tokens to a tokenizer (and resizes the LLM's embeddings).

    The tokens are added in one call, in the official order, so on a fresh tokenizer they get consecutive ids right
    after the base vocabulary (32000-32008 on Vicuna). Tokens already present keep their ids, so calling this again
    is a no-op. Without a pad token, the tokenizer's `<unk>` becomes the pad token (as in the official setup; EOS
    when there is no `<unk>`).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The LLM's tokenizer; modified in place.
        llm (`PreTrainedModel`, *optional*):
            The causal LM; when given, its input and output embeddings are grown (never shrunk) to cover every
            token id, in place.
        mean_resizing (`bool`, *optional*, defaults to `True`):
            Passed to `resize_token_embeddings`: new rows are drawn around the mean of the old ones (this draws from
            the global torch RNG).

    Returns:
        `MultimodalTokenIds`
    """
    _check_tokenizer(tokenizer)
    if llm is not None:
        _check_llm(llm)
    tokenizer.add_tokens(list(MULTIMODAL_SPECIAL_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _default_pad_token(tokenizer)
    token_ids = get_multimodal_token_ids(tokenizer)
    if llm is not None:
        needed = max(len(tokenizer), max(token_ids.special_token_ids) + 1)
        if llm.get_input_embeddings().num_embeddings < needed:
            llm.resize_token_embeddings(needed, mean_resizing=mean_resizing)
    return token_ids


def build_vicuna_prompt(instruction: str, answer: str | None = None, eos_token: str = "</s>") -> str:
    """Builds the vicuna_v1 chat prompt the official LLM was trained with.

    Without `answer` this is the inference prompt, which ends with `" ASSISTANT:"`; the model continues from
    there. With `answer` it is the full training conversation `... ASSISTANT: {answer}{eos_token}`, whose prefix up
    to `" ASSISTANT:"` is exactly the inference prompt. BOS is not part of the string (`prepare_multimodal_inputs`
    prepends the id).

    Args:
        instruction (`str`):
            The user's turn, with one `<video>` per referenced medium.
        answer (`str`, *optional*):
            The assistant's turn (training target).
        eos_token (`str`, *optional*, defaults to `"</s>"`):
            Appended after `answer` (vicuna's second separator); pass `tokenizer.eos_token` for LLMs whose end token
            is not `</s>`.

    Returns:
        `str`
    """
    if not isinstance(instruction, str):
        raise TypeError(f"`instruction` must be a str, got {type(instruction).__name__}.")
    if answer is not None and not isinstance(answer, str):
        raise TypeError(f"`answer` must be a str or None, got {type(answer).__name__}.")
    if not isinstance(eos_token, str):
        raise TypeError(f"`eos_token` must be a str, got {type(eos_token).__name__}.")
    prompt = f"{VICUNA_SYSTEM_PROMPT} USER: {instruction} ASSISTANT:"
    if answer is not None:
        prompt += f" {answer}{eos_token}"
    return prompt


def expand_media_tokens(text: str, tokens_per_medium: list[int]) -> str:
    """Repeats the `k`-th `<video>` of ``text`` ``tokens_per_medium[k]`` times (a medium given as several vectors).

    Args:
        text (`str`):
            An instruction with one `<video>` per medium.
        tokens_per_medium (`list[int]`):
            Positive counts, one per `<video>` of ``text``, in order (see `MultimodalAdapter.tokens_per_medium` and
            `MultimodalAdapter.tokens_per_image`).

    Returns:
        `str`: ``text`` unchanged when every count is 1.
    """
    parts = text.split(VIDEO_TOKEN)
    if len(parts) - 1 != len(tokens_per_medium):
        raise ValueError(
            f"The text has {len(parts) - 1} {VIDEO_TOKEN} tokens but {len(tokens_per_medium)} token counts were given."
        )
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tokens_per_medium):
        raise ValueError(f"Every token count must be a positive integer, got {list(tokens_per_medium)}.")
    expanded = [parts[0]]
    for count, part in zip(tokens_per_medium, parts[1:]):
        expanded.append(VIDEO_TOKEN * count + part)
    return "".join(expanded)


def _check_media_embeds(media_embeds, batch_size: int, embed_dim: int) -> None:
    if not isinstance(media_embeds, (list, tuple)):
        raise TypeError(
            f"`media_embeds` must be a list with one (n_i, embed_dim) tensor per prompt, got "
            f"{type(media_embeds).__name__}."
        )
    if len(media_embeds) != batch_size:
        raise ValueError(f"`media_embeds` has {len(media_embeds)} entries but there are {batch_size} prompts.")
    for i, embeds in enumerate(media_embeds):
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"`media_embeds[{i}]` must be a torch.Tensor, got {type(embeds).__name__}.")
        if embeds.ndim != 2 or embeds.shape[1] != embed_dim:
            raise ValueError(
                f"`media_embeds[{i}]` must have shape (n_{i}, {embed_dim}) (the adapter's embed_dim), got "
                f"{tuple(embeds.shape)}."
            )


def _check_image_patches(image_patches, media_embeds: list[torch.Tensor], adapter: MultimodalAdapter) -> None:
    if not isinstance(image_patches, (list, tuple)) or len(image_patches) != len(media_embeds):
        raise ValueError(
            f"`image_patches` must be a list with one entry (a list over that prompt's media) per prompt "
            f"({len(media_embeds)}), got {image_patches!r:.80}."
        )
    for i, (row, embeds) in enumerate(zip(image_patches, media_embeds)):
        if not isinstance(row, (list, tuple)) or len(row) != embeds.shape[0]:
            raise ValueError(
                f"`image_patches[{i}]` must be a list with one entry (patch tokens or None) per medium of "
                f"`media_embeds[{i}]` ({embeds.shape[0]})."
            )
        for k, patches in enumerate(row):
            if patches is None:
                continue
            if adapter.patch_resampler is None:
                raise ValueError(
                    f"`image_patches[{i}][{k}]` is given but the adapter reads no patch tokens "
                    "(`image_patch_tokens` is 0)."
                )
            width = adapter.config.patch_embed_dim
            if not isinstance(patches, torch.Tensor) or patches.ndim != 2 or patches.shape[1] != width:
                raise ValueError(
                    f"`image_patches[{i}][{k}]` must be a (num_patches, {width}) tensor (the adapter's "
                    f"patch_embed_dim), got "
                    f"{tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__}."
                )


def _check_drop_pooled(drop_pooled, num_media: int, adapter: MultimodalAdapter) -> None:
    is_flags = isinstance(drop_pooled, torch.Tensor) and drop_pooled.dtype == torch.bool
    if not is_flags or drop_pooled.shape != (num_media,):
        raise ValueError(
            f"`drop_pooled` must be a boolean tensor of shape ({num_media},), one flag per medium of `media_embeds`."
        )
    if not adapter.attribute_tokens:
        # Without attribute tokens the pooled vector is all the LLM reads of an audio clip (or of any medium).
        raise ValueError(
            "`drop_pooled` needs an adapter with attribute tokens (`attribute_classes`); this one has none."
        )


def _media_token_counts(
    image_patches: list | None, media_embeds: list[torch.Tensor], adapter: MultimodalAdapter
) -> list[list[int]]:
    """``<video>`` tokens each medium takes, per prompt: ``adapter.tokens_per_medium`` (1 without attribute tokens),
    or ``adapter.tokens_per_image`` for an image given with its patch tokens."""
    if image_patches is None:
        return [[adapter.tokens_per_medium] * embeds.shape[0] for embeds in media_embeds]
    return [
        [adapter.tokens_per_medium if patches is None else adapter.tokens_per_image for patches in row]
        for row in image_patches
    ]


def check_media_positions(media_counts: list[int], adapter: MultimodalAdapter) -> None:
    """Raises `ValueError` when a prompt has more media than an adapter with `max_media_positions` has places for.

    Args:
        media_counts (`list[int]`): the number of media of each prompt.
        adapter (`MultimodalAdapter`): the adapter.
    """
    limit = adapter.config.max_media_positions
    for i, count in enumerate(media_counts):
        if limit and count > limit:
            raise ValueError(
                f"Prompt {i} has {count} media (images and audio) but the adapter's media position embeddings "
                f"(`max_media_positions`) have places for {limit}; give at most {limit}."
            )


def inject_media_embeds(
    inputs_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    media_embeds: list[torch.Tensor],
    adapter: MultimodalAdapter,
    video_token_id: int,
    prompt_lengths: list[int] | None = None,
    image_patches: list[list[torch.Tensor | None]] | None = None,
    drop_pooled: torch.BoolTensor | None = None,
    class_permutation: torch.LongTensor | None = None,
    word_embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adds `adapter.project(e)` to the token embeddings at the `<video>` positions, in order.

    Row `i`'s `k`-th medium `media_embeds[i][k]` (rescaled to the adapter's norm and projected) goes to its `<video>`;
    the official weights were trained with this additive injection. With `attribute_classes` (A fields) every medium
    takes `1 + A` consecutive `<video>` tokens: its projected pooled vector, then its attribute tokens (see
    `MultimodalAdapter.project_tokens`). An image given with patch tokens (`image_patches[i][k]`, for an adapter with
    `image_patch_tokens = K`) takes `K` more: the vectors of `adapter.resample_patches`. With `max_media_positions`, the
    `k`-th medium of a row has `adapter.media_position_embedding`'s row `k` added to each of its tokens.
    Differentiable, so training uses it too.

    Args:
        inputs_embeds (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`):
            Token embeddings; not modified.
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            The matching token ids.
        media_embeds (`list[torch.Tensor]`):
            One `(n_i, embed_dim)` tensor per row (`n_i` may be 0).
        adapter (`MultimodalAdapter`):
            Provides the projector (and the patch resampler).
        video_token_id (`int`):
            Id of `<video>`.
        prompt_lengths (`list[int]`, *optional*):
            Per row, the index where the prompt ends: `<video>` tokens from there on belong to the answer (the BASE
            and GEN outputs of a teacher-forced training sequence) and get no media. By default every `<video>` is
            an input.
        image_patches (`list[list[torch.Tensor | None]]`, *optional*):
            Per row, per medium: the image's `(num_patches, patch_embed_dim)` patch tokens, or `None` (audio, or an
            image given by its pooled vector alone). Default: no patches.
        drop_pooled (`torch.BoolTensor`, *optional*):
            One flag per medium (all rows' media in order): a flagged medium's pooled token gets no vector, only
            its attribute tokens carry it (training's `pooled_drop_prob`). Needs an adapter with attribute tokens.
        class_permutation (`torch.LongTensor`, *optional*):
            Shape `(num_media, sum(attribute_classes))`, media in the same order: renames each medium's attribute
            classes before they become tokens (see `MultimodalAdapter.project_tokens`; training's
            `--relabel_words`). Needs an adapter with attribute tokens.
        word_embeddings (`torch.Tensor`, *optional*):
            The LLM's input embedding matrix (`llm.get_input_embeddings().weight`): required by an adapter whose
            attribute tokens hold the LLM's words (`attribute_word_ids`), not read by any other.

    Returns:
        `torch.Tensor`: a new tensor like `inputs_embeds`.
    """
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3:
        raise ValueError("`inputs_embeds` must be a (batch_size, seq_len, hidden_size) tensor.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"`input_ids` must be a tensor of shape {tuple(inputs_embeds.shape[:2])} matching `inputs_embeds`."
        )
    if inputs_embeds.shape[-1] != adapter.config.llm_hidden_size:
        raise ValueError(
            f"The LLM's hidden size is {inputs_embeds.shape[-1]} but the adapter's `llm_hidden_size` is "
            f"{adapter.config.llm_hidden_size}."
        )
    batch_size = input_ids.shape[0]
    _check_media_embeds(media_embeds, batch_size, adapter.config.embed_dim)
    if image_patches is not None:
        _check_image_patches(image_patches, media_embeds, adapter)
    if prompt_lengths is not None and len(prompt_lengths) != batch_size:
        raise ValueError(f"`prompt_lengths` has {len(prompt_lengths)} entries but the batch has {batch_size} rows.")
    if drop_pooled is not None:
        _check_drop_pooled(drop_pooled, sum(embeds.shape[0] for embeds in media_embeds), adapter)
    if adapter.ties_attribute_words and word_embeddings is None:
        raise ValueError(
            "The adapter's attribute tokens hold the LLM's words (`attribute_word_ids`): pass `word_embeddings`, the "
            "LLM's input embedding matrix (`llm.get_input_embeddings().weight`)."
        )

    counts = _media_token_counts(image_patches, media_embeds, adapter)
    check_media_positions([len(row) for row in counts], adapter)
    rows, cols = [], []
    for i in range(batch_size):
        positions = (input_ids[i] == video_token_id).nonzero().flatten()
        if prompt_lengths is not None:
            positions = positions[positions < prompt_lengths[i]]
        if positions.numel() != sum(counts[i]):
            found = f"Prompt {i} contains {positions.numel()} {VIDEO_TOKEN} tokens but"
            if image_patches is None and adapter.tokens_per_medium == 1:
                raise ValueError(
                    f"{found} `media_embeds[{i}]` has {media_embeds[i].shape[0]} embeddings; each {VIDEO_TOKEN} needs "
                    "exactly one medium."
                )
            if image_patches is None:
                raise ValueError(
                    f"{found} `media_embeds[{i}]` has {media_embeds[i].shape[0]} embeddings and each takes "
                    f"{adapter.tokens_per_medium} (the pooled vector and {adapter.attribute_tokens} attribute tokens)."
                )
            raise ValueError(
                f"{found} its media need {sum(counts[i])} (`media_embeds[{i}]` has {media_embeds[i].shape[0]}; an image "
                f"given with patch tokens takes {adapter.tokens_per_image})."
            )
        rows.append(torch.full_like(positions, i))
        cols.append(positions)
    rows, cols = torch.cat(rows), torch.cat(cols)
    if rows.numel() == 0:
        return inputs_embeds.clone()
    # One projector call (and one resampler call) for the whole batch, then each medium's vectors in prompt order.
    projected = adapter.project_tokens(
        torch.cat([embeds.to(adapter.device) for embeds in media_embeds]),
        class_permutation=class_permutation,
        word_embeddings=word_embeddings,
    )
    if drop_pooled is not None:
        keep = (~drop_pooled).to(device=projected.device, dtype=projected.dtype)[:, None, None]
        projected = torch.cat([projected[:, :1] * keep, projected[:, 1:]], dim=1)
    flat_patches = [p for row in image_patches or [] for p in row if p is not None]
    resampled = adapter.resample_patches(torch.stack(flat_patches)) if flat_patches else None
    places = adapter.media_position_embedding
    pieces, medium, image = [], 0, 0
    for row in counts:
        for place, count in enumerate(row):
            vectors = projected[medium]
            if count > adapter.tokens_per_medium:
                vectors = torch.cat([vectors, resampled[image]])
                image += 1
            pieces.append(vectors if places is None else vectors + places.weight[place])
            medium += 1
    values = torch.cat(pieces).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    delta = torch.zeros_like(inputs_embeds).index_put(
        (rows.to(inputs_embeds.device), cols.to(inputs_embeds.device)), values
    )
    return inputs_embeds + delta


def _check_prompts(prompts) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must be a non-empty list of strings.")


def prepare_multimodal_inputs(
    llm,
    tokenizer: PreTrainedTokenizerBase,
    adapter: MultimodalAdapter,
    prompts: list[str],
    media_embeds: list[torch.Tensor],
    token_ids: MultimodalTokenIds | None = None,
    image_patches: list[list[torch.Tensor | None]] | None = None,
) -> tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]:
    """Tokenises prompts and embeds them with the media injected at the `<video>` tokens.

    BOS is prepended (when the tokenizer has one); batches are LEFT padded, as decoder-only generation requires.
    The tokenizer's own padding side is not touched.

    Args:
        llm (`PreTrainedModel`):
            The causal LM, whose `get_input_embeddings()` embeds the tokens.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, prepared with `add_multimodal_tokens`.
        adapter (`MultimodalAdapter`):
            Projects the media embeddings.
        prompts (`list[str]`):
            Full prompts (see `build_vicuna_prompt`), one `<video>` per medium.
        media_embeds (`list[torch.Tensor]`):
            One `(n_i, embed_dim)` tensor per prompt, the media in the order of the prompt's `<video>` tokens.
        token_ids (`MultimodalTokenIds`, *optional*):
            Looked up from `tokenizer` when not given.
        image_patches (`list[list[torch.Tensor | None]]`, *optional*):
            Patch tokens of the images, see `inject_media_embeds` (each such image has `adapter.tokens_per_image`
            `<video>` tokens in its prompt, see `expand_media_tokens`).

    Returns:
        `tuple`: `inputs_embeds` `(batch_size, seq_len, hidden_size)`, `attention_mask` `(batch_size, seq_len)`
        (0 on padding) and `input_ids` `(batch_size, seq_len)`, on the LLM's embedding device.
    """
    _check_llm(llm)
    _check_tokenizer(tokenizer)
    _check_prompts(prompts)
    if not isinstance(adapter, MultimodalAdapter):
        raise TypeError(f"`adapter` must be a MultimodalAdapter, got {type(adapter).__name__}.")
    token_ids = get_multimodal_token_ids(tokenizer) if token_ids is None else token_ids
    if not isinstance(token_ids, MultimodalTokenIds):
        raise TypeError(f"`token_ids` must be a MultimodalTokenIds, got {type(token_ids).__name__}.")
    _check_media_embeds(media_embeds, len(prompts), adapter.config.embed_dim)

    embedding = llm.get_input_embeddings()
    prefix = [] if token_ids.bos is None else [token_ids.bos]
    # add_special_tokens=False + explicit BOS gives the same ids on every tokenizer, whatever its post-processor.
    rows = [prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    largest = max(max(row, default=-1) for row in rows)
    if largest >= embedding.num_embeddings:
        raise ValueError(
            f"Token id {largest} is out of range for the LLM's {embedding.num_embeddings} input embeddings; prepare "
            "the LLM with `add_multimodal_tokens(tokenizer, llm)`."
        )
    seq_len = max(len(row) for row in rows)
    device = embedding.weight.device
    input_ids = torch.full((len(rows), seq_len), token_ids.pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, seq_len - len(row) :] = torch.tensor(row, dtype=torch.long, device=device)
            attention_mask[i, seq_len - len(row) :] = 1
    if (attention_mask.sum(dim=1) == 0).any():
        raise ValueError("Every prompt must produce at least one token.")

    inputs_embeds = inject_media_embeds(
        embedding(input_ids),
        input_ids,
        media_embeds,
        adapter,
        token_ids.video,
        image_patches=image_patches,
        word_embeddings=embedding.weight,
    )
    return inputs_embeds, attention_mask, input_ids


def find_embedding_positions(
    token_ids_sequence: torch.Tensor | list[int], token_ids: MultimodalTokenIds, start: int = 0
) -> EmbeddingPositions:
    """Finds where the base and generation embeddings are read in a token sequence.

    This is THE read-out rule, shared by inference and training: a `<video>` token's embedding is predicted from
    the final-layer hidden state *preceding* it, i.e. at index `p - 1` for a `<video>` at index `p` of a hidden-state
    sequence aligned with `token_ids_sequence`. The generation `<video>` is the first one after the last `<im_gen>`;
    the base `<video>` is the one right after the first `<base>` (so the state read is the `<base>` token's). Only
    the answer, from `start` up to the first end-of-sequence token, is searched.

    For generation, pass `[last prompt token] + new tokens` with `start=1`: generation step `j`'s last-position
    state is then index `j`. For a teacher-forced training row, pass the row and `start` = where the answer begins.

    Args:
        token_ids_sequence (`torch.Tensor` or `list[int]`):
            A 1-D token sequence.
        token_ids (`MultimodalTokenIds`):
            The special token ids.
        start (`int`, *optional*, defaults to 0):
            Index where the answer begins; earlier tokens (the prompt's input `<video>`s) are ignored.

    Returns:
        `EmbeddingPositions`: indices into the aligned hidden-state sequence, `None` where absent.
    """
    if isinstance(token_ids_sequence, torch.Tensor):
        if token_ids_sequence.ndim != 1:
            raise ValueError(
                f"`token_ids_sequence` must be 1-D, got shape {tuple(token_ids_sequence.shape)}; call once per row."
            )
        sequence = token_ids_sequence.tolist()
    elif isinstance(token_ids_sequence, (list, tuple)):
        sequence = list(token_ids_sequence)
    else:
        raise TypeError(
            "`token_ids_sequence` must be a 1-D tensor or list of ints, got "
            f"{type(token_ids_sequence).__name__}."
        )
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"`start` must be a non-negative int, got {start!r}.")

    # A target <video> always follows a <base> or <im_gen> at or after `start`, so p - 1 >= 0.
    end = sequence.index(token_ids.eos, start) if token_ids.eos in sequence[start:] else len(sequence)
    answer = range(start, end)

    generation = None
    im_gen_positions = [p for p in answer if sequence[p] == token_ids.im_gen]
    if im_gen_positions:
        videos = [p for p in range(im_gen_positions[-1] + 1, end) if sequence[p] == token_ids.video]
        if videos:
            generation = videos[0] - 1

    base = None
    base_positions = [p for p in answer if sequence[p] == token_ids.base]
    if base_positions and base_positions[0] + 1 < end and sequence[base_positions[0] + 1] == token_ids.video:
        base = base_positions[0]
    return EmbeddingPositions(base=base, generation=generation)


def parse_answer(text: str) -> ParsedAnswer:
    """Parses the LLM's decoded answer (the answer only, never the prompt).

    Args:
        text (`str`):
            The decoded answer with special tokens kept, e.g.
            `"<base><video><im_gen_start><im_gen>[a red cube]<video>"`.

    Returns:
        `ParsedAnswer`
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    base = _BASE_DESCRIPTION_PATTERN.search(text)
    # With <im_gen> the result is the caption after its last occurrence, so a base description is never taken for it.
    rest = text[text.rindex(IM_GEN_TOKEN) :] if IM_GEN_TOKEN in text else text
    match = _CAPTION_PATTERN.search(rest)
    listed = _ADDITIONS_PATTERN.search(rest[match.end() :] if match else rest)
    return ParsedAnswer(
        caption=match.group(1).strip() if match else None,
        has_im_gen=IM_GEN_TOKEN in text,
        has_base=BASE_TOKEN in text,
        base_null=BASE_NULL_TOKEN in text,
        base_caption=base.group(1).strip() if base else None,
        additions=tuple(_ADDITION_PATTERN.findall(listed.group(1))) if listed else (),
    )


def _fork_rng_for(device: torch.device):
    """Context that restores the global RNG state(s) of `device`'s kind on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(device.type)
    return torch.random.fork_rng(devices=range(module.device_count()), device_type=device.type)


def _seed_global_rng(seed: int, device: torch.device) -> None:
    if device.type == "cpu":
        # Only the CPU generator, so that an (unforked) accelerator RNG of the caller stays untouched.
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@torch.no_grad()
def generate_with_media(
    llm,
    tokenizer: PreTrainedTokenizerBase,
    adapter: MultimodalAdapter,
    prompts: list[str],
    media_embeds: list[torch.Tensor],
    token_ids: MultimodalTokenIds | None = None,
    generator: torch.Generator | None = None,
    do_sample: bool = True,
    temperature: float = 0.3,
    top_p: float | None = None,
    max_new_tokens: int = 100,
    use_cache: bool = True,
    output_hidden_states: bool = False,
    logits_processor: LogitsProcessorList | None = None,
    num_beams: int = 1,
    image_patches: list[list[torch.Tensor | None]] | None = None,
    candidate_scorer: Callable[..., int] | None = None,
) -> MultimodalGenerationOutput:
    """Generates the LLM's answers with the media injected, and reads out the base and generation embeddings.

    With `use_cache=True` the media are injected once, at prefill, and decoding reuses the KV cache. With
    `use_cache=False` every step re-runs the whole sequence (prompt embeddings with media + generated tokens), as
    the official code does; it exists for benchmarks and gives the same greedy results. With `num_beams > 1`
    transformers' beam search picks each answer, and one teacher-forced pass over prompt + answer gives the hidden
    states the embeddings are read from (the states greedy decoding of that answer would have).

    Sampling uses transformers' sampling, which draws from the global torch RNG: a seed is drawn from `generator`
    and generation runs inside `torch.random.fork_rng` seeded with it, so results are reproducible from the
    generator and the caller's global RNG state is left untouched. Without `generator` the global RNG is used as is.

    Args:
        llm (`PreTrainedModel`):
            The causal LM (prepared with `add_multimodal_tokens`).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        adapter (`MultimodalAdapter`):
            Projects the media in and predicts the embeddings out.
        prompts (`list[str]`):
            Full prompts (see `build_vicuna_prompt`).
        media_embeds (`list[torch.Tensor]`):
            One `(n_i, embed_dim)` tensor per prompt, in the order of its `<video>` tokens.
        token_ids (`MultimodalTokenIds`, *optional*):
            Looked up from `tokenizer` when not given.
        generator (`torch.Generator`, *optional*):
            Source of randomness for sampling.
        do_sample (`bool`, *optional*, defaults to `True`):
            Sample (official) or decode greedily.
        temperature (`float`, *optional*, defaults to 0.3):
            Sampling temperature (official value 0.3).
        top_p (`float`, *optional*):
            Nucleus sampling threshold; `None` keeps the LLM's `generation_config` value (the official behaviour).
        max_new_tokens (`int`, *optional*, defaults to 100):
            Maximum answer length (official value 100).
        use_cache (`bool`, *optional*, defaults to `True`):
            Decode with the KV cache (`False`: recompute everything every step).
        output_hidden_states (`bool`, *optional*, defaults to `False`):
            Also return the final-layer hidden state preceding each generated token.
        logits_processor (`LogitsProcessorList`, *optional*):
            Extra transformers logits processors (e.g. to constrain the answer format), applied at every step.
        num_beams (`int`, *optional*, defaults to 1):
            Beam search width (1: greedy or sampling, the official decoding). Beams need `do_sample=False` and
            `use_cache=True`.
        image_patches (`list[list[torch.Tensor | None]]`, *optional*):
            Patch tokens of the images for an adapter with `image_patch_tokens`, see `inject_media_embeds`.
        candidate_scorer (`Callable`, *optional*):
            With `num_beams > 1`: all `num_beams` final beams of each prompt are kept (best first) and
            ``candidate_scorer(row, texts, beam_scores, generation_embeds, base_embeds)`` returns the index of the
            one to answer with; ``beam_scores`` are transformers' length-normalised log-probabilities (shape
            `(num_beams,)`), ``generation_embeds`` and ``base_embeds`` the generation and base embeddings each beam's
            answer predicts (`None` where it has none). Default: the best beam.

    Returns:
        `MultimodalGenerationOutput`
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a single torch.Generator or None, got {type(generator).__name__}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a positive number when sampling, got {temperature!r}.")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be in (0, 1] or None, got {top_p!r}.")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int, got {num_beams!r}.")
    if num_beams > 1 and (do_sample or not use_cache):
        raise ValueError(
            f"`num_beams={num_beams}` is beam search: it needs `do_sample=False` and `use_cache=True`, got "
            f"do_sample={do_sample}, use_cache={use_cache}."
        )
    if candidate_scorer is not None and (num_beams < 2 or not callable(candidate_scorer)):
        raise ValueError(
            f"`candidate_scorer` picks among beams: it must be callable and needs `num_beams > 1`, got "
            f"{type(candidate_scorer).__name__} with num_beams={num_beams}."
        )
    if logits_processor is not None and not isinstance(logits_processor, (list, LogitsProcessorList)):
        raise TypeError(f"`logits_processor` must be a LogitsProcessorList, got {type(logits_processor).__name__}.")
    token_ids = get_multimodal_token_ids(tokenizer) if token_ids is None else token_ids
    inputs_embeds, attention_mask, input_ids = prepare_multimodal_inputs(
        llm, tokenizer, adapter, prompts, media_embeds, token_ids, image_patches=image_patches
    )

    # Every final beam comes back when a scorer chooses among them (best first, `num_candidates` rows per prompt).
    num_candidates = num_beams if candidate_scorer is not None else 1
    generate_kwargs = {
        "do_sample": do_sample,
        "eos_token_id": token_ids.eos,
        "pad_token_id": token_ids.pad,
        "output_hidden_states": True,
        "return_dict_in_generate": True,
    }
    if logits_processor is not None:
        generate_kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
    if do_sample:
        generate_kwargs["temperature"] = temperature
        if top_p is not None:
            generate_kwargs["top_p"] = top_p

    device = inputs_embeds.device
    rng_context = nullcontext()
    if generator is not None:
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
        rng_context = _fork_rng_for(device)
    with rng_context:
        if generator is not None:
            _seed_global_rng(seed, device)
        if use_cache:
            output = llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                num_beams=num_beams,
                num_return_sequences=num_candidates,
                output_scores=num_candidates > 1,
                # Beam search's per-step states belong to beams that may be dropped later: re-read them instead.
                **{**generate_kwargs, "output_hidden_states": num_beams == 1},
            )
            sequences = output.sequences
            if num_beams > 1:
                rows = torch.arange(len(prompts), device=device).repeat_interleave(num_candidates)
                states, _ = _teacher_forced(llm, inputs_embeds[rows], attention_mask[rows], sequences)
            else:
                # hidden_states: one tuple per step, last entry = final layer after the final norm; step j's
                # last-position state is the one that predicted new token j.
                states = torch.stack([step[-1][:, -1] for step in output.hidden_states], dim=1)
        else:
            sequences, states = _generate_without_cache(
                llm, inputs_embeds, attention_mask, max_new_tokens, token_ids, generate_kwargs
            )

    texts, generation_embeds, base_embeds = [], [], []
    for i in range(sequences.shape[0]):
        new_tokens = sequences[i].tolist()
        answer_end = new_tokens.index(token_ids.eos) if token_ids.eos in new_tokens else len(new_tokens)
        texts.append(tokenizer.decode(new_tokens[:answer_end], skip_special_tokens=False))
        generation, base = _read_answer_embeddings(
            adapter, token_ids, int(input_ids[i // num_candidates, -1]), new_tokens, states[i]
        )
        generation_embeds.append(generation)
        base_embeds.append(base)

    if num_candidates > 1:
        chosen = []
        for row in range(len(prompts)):
            group = slice(row * num_candidates, (row + 1) * num_candidates)
            pick = candidate_scorer(
                row, texts[group], output.sequences_scores[group], generation_embeds[group], base_embeds[group]
            )
            if isinstance(pick, bool) or not isinstance(pick, int) or not 0 <= pick < num_candidates:
                raise ValueError(f"`candidate_scorer` must return a beam index in [0, {num_candidates}), got {pick!r}.")
            chosen.append(row * num_candidates + pick)
        sequences, states = sequences[chosen], states[chosen]
        texts = [texts[i] for i in chosen]
        generation_embeds = [generation_embeds[i] for i in chosen]
        base_embeds = [base_embeds[i] for i in chosen]

    return MultimodalGenerationOutput(
        sequences=sequences,
        texts=texts,
        generation_embeds=generation_embeds,
        base_embeds=base_embeds,
        parsed_answers=[parse_answer(text) for text in texts],
        hidden_states=states if output_hidden_states else None,
    )


def _read_answer_embeddings(
    adapter: MultimodalAdapter,
    token_ids: MultimodalTokenIds,
    last_prompt_token: int,
    answer_tokens: list[int],
    states: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The generation and base embeddings one answer predicts (`None` where it has none), from ``states[j]``, the
    state that predicted ``answer_tokens[j]``."""
    # Index j of [last prompt token] + answer tokens is aligned with state j.
    positions = find_embedding_positions([last_prompt_token] + answer_tokens, token_ids, start=1)
    return tuple(None if p is None else adapter.predict(states[p]) for p in (positions.generation, positions.base))


def _teacher_forced(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.LongTensor,
    sequences: torch.LongTensor,
    with_log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher-forced pass over prompt + answer: the final-layer hidden state that predicts each token of
    ``sequences`` (aligned as in the cached loop: entry j predicted new token j) and, with ``with_log_probs``, that
    token's log-probability (else `None`: a full-vocabulary softmax per position is not free on a large LLM)."""
    embedding = llm.get_input_embeddings()
    embeds = torch.cat([inputs_embeds, embedding(sequences).to(inputs_embeds.dtype)], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(sequences)], dim=1)
    # Positions as generate() gives them to a left-padded batch; tokens after EOS only follow the answer.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    output = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    answer = slice(inputs_embeds.shape[1] - 1, inputs_embeds.shape[1] - 1 + sequences.shape[1])
    log_probs = None
    if with_log_probs:
        log_probs = output.logits[:, answer].float().log_softmax(dim=-1).gather(-1, sequences[..., None])[..., 0]
    return output.hidden_states[-1][:, answer], log_probs


def score_answers(
    llm,
    tokenizer: PreTrainedTokenizerBase,
    adapter: MultimodalAdapter,
    prompt: str,
    media_embeds: torch.Tensor,
    answers: list[str],
    token_ids: MultimodalTokenIds | None = None,
    image_patches: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Scores given answers to one prompt as beam search scores its own: teacher-forced, with the media injected.

    Candidates proposed elsewhere (e.g. by the LLM given other media) can so be ranked beside the prompt's own beams:
    the score is the mean log-probability of the answer's tokens and the closing EOS, which is transformers'
    length-normalised beam score (``length_penalty=1``) for an answer that ended with EOS. The answers are tokenized
    again (``add_special_tokens=False``), so with a tokenizer whose decode/encode does not round-trip the score is
    that of the re-tokenized text.

    Args:
        llm (`PreTrainedModel`): the causal LM (prepared with `add_multimodal_tokens`).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        adapter (`MultimodalAdapter`): projects the media in and predicts the embeddings out.
        prompt (`str`): the full prompt (see `build_vicuna_prompt`).
        media_embeds (`torch.Tensor`): `(n, embed_dim)`, the prompt's media in the order of its `<video>` tokens.
        answers (`list[str]`): decoded answers (special tokens kept, no EOS), at least one.
        token_ids (`MultimodalTokenIds`, *optional*): looked up from `tokenizer` when not given.
        image_patches (`list[torch.Tensor | None]`, *optional*): the media's patch tokens, see `inject_media_embeds`.

    Returns:
        `tuple`: ``scores`` `(len(answers),)` float32, and per answer its generation and base embeddings (`None`
        where it has none).
    """
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"`answers` must be a non-empty list of strings, got {answers!r}.")
    token_ids = get_multimodal_token_ids(tokenizer) if token_ids is None else token_ids
    inputs_embeds, attention_mask, input_ids = prepare_multimodal_inputs(
        llm, tokenizer, adapter, [prompt], [media_embeds], token_ids,
        image_patches=None if image_patches is None else [image_patches],
    )  # fmt: skip
    rows = [tokenizer(answer, add_special_tokens=False)["input_ids"] + [token_ids.eos] for answer in answers]
    device = inputs_embeds.device
    sequences = torch.full((len(rows), max(map(len, rows))), token_ids.pad, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        sequences[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    count = len(rows)
    states, log_probs = _teacher_forced(
        llm, inputs_embeds.expand(count, -1, -1), attention_mask.expand(count, -1), sequences, with_log_probs=True
    )
    lengths = torch.tensor([len(row) for row in rows], device=device)
    within = torch.arange(sequences.shape[1], device=device)[None] < lengths[:, None]
    scores = (log_probs * within).sum(-1) / lengths
    last_prompt_token = int(input_ids[0, -1])
    embeds = [
        _read_answer_embeddings(adapter, token_ids, last_prompt_token, row, states[i]) for i, row in enumerate(rows)
    ]
    return scores, [g for g, _ in embeds], [b for _, b in embeds]


def _generate_without_cache(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.LongTensor,
    max_new_tokens: int,
    token_ids: MultimodalTokenIds,
    generate_kwargs: dict,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Decodes one token per full forward pass over the whole sequence (no KV cache reuse).

    Each step is a one-token `llm.generate` on the full embedding sequence, so token selection (logits processors,
    sampling) is transformers' own and draws from the RNG as the cached loop does. Processors that look at the
    previously generated ids (repetition penalties) see none here, since the sequence is passed as embeddings.
    """
    embedding = llm.get_input_embeddings()
    batch_size = inputs_embeds.shape[0]
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=inputs_embeds.device)
    tokens, states = [], []
    for _ in range(max_new_tokens):
        step = llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=1, **generate_kwargs
        )
        next_tokens = step.sequences[:, -1]
        # Rows that already ended keep emitting padding, as generate() does.
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, token_ids.pad))
        tokens.append(next_tokens)
        states.append(step.hidden_states[0][-1][:, -1])
        unfinished &= next_tokens != token_ids.eos
        if not unfinished.any():
            break
        inputs_embeds = torch.cat([inputs_embeds, embedding(next_tokens[:, None]).to(inputs_embeds.dtype)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(states, dim=1)
