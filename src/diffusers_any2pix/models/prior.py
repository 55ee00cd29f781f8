"""The InstructAny2Pix refinement prior, architecture- and weight-compatible with the official release.

The prior maps the LLM's generation embedding (an ImageBind vector) to an embedding that looks like the
ImageBind embedding of a real image. It is a GPT-2 (``transformers.GPT2Model``, trained from scratch) that reads
a short sequence of input embeddings and whose last hidden state at the last position is the prediction.

The sequence, exactly as the official inference builds it (shared/REFERENCE.md §3 — a missing comma in the
official config drops the noise-level and target-type blocks, and inference passes no noisy input)::

    position  0      1     2          3     4     5  6       7     8     9          10
    token     M(src) SOS₁  Lin₁(e)    EOS₁  SOS₂  Lin₂(text) EOS₂  SOS₃  Lin₃(s)    EOS₃

- ``M(src)``: ``modality_embedding`` row of the source modality — one token, not wrapped in SOS/EOS;
- block ``k`` (k = 1: ImageBind vector ``e``, 2: CLIP text last hidden states, 3: score block ``s``) is
  ``start_of_sequence_tokens[k]``, ``input_sequence_embed_linear[k](x)``, ``end_of_sequence_tokens[k]``.
  The official code wraps each block with the SOS/EOS row equal to the block's index in its
  ``sequence_input_key`` list (``["src_type", "imagebind", "crossattn_clip", "score", ...]``); the modality
  key is index 0 but modality tokens are never wrapped, so rows 1, 2, 3 are used and row 0 never is;
- the text block holds the CLIP ViT-H-14 text encoder's last hidden states of the *empty* prompt (always
  empty in the official pipeline): 2 tokens (BOS, EOS), so the sequence has 11 tokens;
- the score block is the 512-d sinusoidal timestep embedding of the quality score (official conditional
  score 6.5), or — for the unconditional branch — a 512-d vector filled with the constant 2.0 (the official
  code builds it as ``score_embedding * 0 + 2.0``; it is *not* an embedding of 2.0).

Because the official prompt is always empty, the text encoder's output is a constant: this module stores those
two vectors in the persistent buffer ``empty_text_hidden_states`` and so replaces the 350M-parameter text
encoder exactly. Callers who want real prompts can still pass ``text_hidden_states`` from a
``prior_text_encoder``.
"""

from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, GPT2Config, GPT2Model

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook

from .mm_adapter import rescale_to_norm


logger = logging.get_logger(__name__)

# Official inference settings (REFERENCE.md §3).
DEFAULT_SCORE = 6.5
DEFAULT_GUIDANCE_SCALE = 10.0
DEFAULT_INPUT_NORM = 100.0
DEFAULT_OUTPUT_NORM = 20.0

# Indices of the conditioning blocks in ``input_sequence_embed_linear`` and rows of the SOS/EOS tables.
IMAGEBIND_BLOCK = 1
TEXT_BLOCK = 2
SCORE_BLOCK = 3

# Key prefix of the official checkpoint's frozen CLIP text encoder (``cond_stage_models.0`` wraps
# ``CLIPTextModel`` as ``.model``).
OFFICIAL_TEXT_ENCODER_PREFIX = "cond_stage_models.0.model."


class Modality(IntEnum):
    """Modality ids of the official prior's ``modality_embedding``."""

    IMAGE = 0
    AUDIO = 1
    TEXT = 2
    VIDEO = 3


@dataclass
class PriorOutput(BaseOutput):
    """Output of [`Any2PixPrior.forward`].

    Args:
        predicted_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
            GPT-2's last hidden state at the last position of the sequence.
        loss (`torch.Tensor`, *optional*):
            Mean L1 loss against `target_embeds`, when they were given.
    """

    predicted_embeds: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class PriorTrainingInputs(BaseOutput):
    """Conditioning prepared for one training step by [`Any2PixPrior.prepare_training_inputs`].

    Args:
        condition_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
            Rescaled condition vectors, zero where the condition was dropped.
        score_block (`torch.Tensor` of shape `(batch_size, score_embed_dim)`):
            Score embedding, or the unconditional constant where the condition was dropped.
        condition_dropped (`torch.BoolTensor` of shape `(batch_size,)`):
            Which samples were turned into unconditional samples.
    """

    condition_embeds: torch.Tensor
    score_block: torch.Tensor
    condition_dropped: torch.Tensor


@dataclass
class PriorTrainingOutput(BaseOutput):
    """Output of [`Any2PixPrior.forward_train`].

    Args:
        loss (`torch.Tensor`): mean L1 loss between the prediction and the clean target.
        predicted_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): the predicted clean target.
        condition_dropped (`torch.BoolTensor` of shape `(batch_size,)`): samples trained unconditionally.
    """

    loss: torch.Tensor
    predicted_embeds: torch.Tensor
    condition_dropped: torch.Tensor


@dataclass
class PriorConversionReport:
    """What [`Any2PixPrior.from_official_state_dict`] did with the official checkpoint's keys.

    Args:
        loaded_keys (`list[str]`): keys loaded into the prior.
        dropped_text_encoder_keys (`list[str]`): keys of the official frozen CLIP text encoder
            (`cond_stage_models.*`), not part of the prior.
        ignored_buffer_keys (`list[str]`): GPT-2 attention-mask buffers of older transformers versions
            (`attn.bias`, `attn.masked_bias`), which current GPT-2 recomputes.
        empty_text_hidden_states_source (`str`): where `empty_text_hidden_states` came from:
            `"empty_text_hidden_states"` (given), `"text_encoder"` (a given encoder), `"checkpoint_text_encoder"`
            (the checkpoint's own text encoder weights) or `"unset"` (left at zeros — outputs will not match
            the official model).
    """

    loaded_keys: list[str] = field(default_factory=list)
    dropped_text_encoder_keys: list[str] = field(default_factory=list)
    ignored_buffer_keys: list[str] = field(default_factory=list)
    empty_text_hidden_states_source: str = "unset"


def _is_legacy_gpt2_attention_buffer(key: str) -> bool:
    # Older transformers saved the causal mask (`attn.bias`) and `attn.masked_bias` in GPT-2 state dicts.
    parts = key.split(".")
    return (
        len(parts) == 5
        and parts[0] == "model"
        and parts[1] == "h"
        and parts[2].isdigit()
        and parts[3] == "attn"
        and parts[4] in ("bias", "masked_bias")
    )


class Any2PixPrior(ModelMixin, ConfigMixin):
    r"""The InstructAny2Pix refinement prior (GPT-2 backbone), weight-compatible with the official `model.bin`.

    State-dict keys match the official prior's: `start_of_sequence_tokens.weight`, `end_of_sequence_tokens.weight`,
    `modality_embedding.weight`, `input_sequence_embed_linear.{1,2,3}.{weight,bias}` and `model.*` (a
    `transformers.GPT2Model`, Conv1D weights stored (in, out)), plus the buffer `empty_text_hidden_states`.
    Index 0 of `input_sequence_embed_linear` is an identity, as in the official module list, so indices line up.
    The official list also has identities at 4–6 for blocks that inference never builds; they hold no weights and
    are not kept. GPT-2's token embedding `model.wte` is never used (the prior feeds `inputs_embeds`) and is
    kept, frozen, only so official checkpoints load strictly; pass a small `vocab_size` for a prior trained here.

    Args:
        embed_dim (`int`, defaults to 1024): size of the ImageBind vectors read and predicted.
        text_hidden_dim (`int`, defaults to 1024): hidden size of the text encoder (CLIP ViT-H-14: 1024).
        score_embed_dim (`int`, defaults to 512): size of the sinusoidal score embedding.
        num_sequence_tokens (`int`, defaults to 32): rows of the SOS/EOS tables (rows 1–3 are used).
        num_modalities (`int`, defaults to 10): rows of the modality table (ids of [`Modality`] are used).
        hidden_size (`int`, defaults to 1024): GPT-2 width; must equal `embed_dim` (the output is the hidden state).
        num_layers (`int`, defaults to 24): GPT-2 blocks.
        num_attention_heads (`int`, defaults to 16): GPT-2 attention heads.
        max_positions (`int`, defaults to 1024): GPT-2 position table size.
        vocab_size (`int`, defaults to 50257): rows of GPT-2's (unused) token table; 50257 for official weights.
        activation (`str`, defaults to `"gelu_new"`): GPT-2 activation function.
        layer_norm_eps (`float`, defaults to 1e-5): GPT-2 LayerNorm epsilon.
        dropout (`float`, defaults to 0.1): GPT-2 residual, embedding and attention dropout (training only).
        unconditional_score_value (`float`, defaults to 2.0): constant filling the unconditional score block.
    """

    # diffusers' `enable_gradient_checkpointing` switches transformers' GPT-2 blocks (GradientCheckpointingLayer).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 1024,
        text_hidden_dim: int = 1024,
        score_embed_dim: int = 512,
        num_sequence_tokens: int = 32,
        num_modalities: int = 10,
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_attention_heads: int = 16,
        max_positions: int = 1024,
        vocab_size: int = 50257,
        activation: str = "gelu_new",
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.1,
        unconditional_score_value: float = 2.0,
    ):
        super().__init__()
        if hidden_size != embed_dim:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must equal `embed_dim` ({embed_dim}): the prior's output is GPT-2's "
                "last hidden state, read directly as an embedding."
            )
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        if num_sequence_tokens <= SCORE_BLOCK:
            raise ValueError(
                f"`num_sequence_tokens` must be > {SCORE_BLOCK} (SOS/EOS rows 1–3 are used), "
                f"got {num_sequence_tokens}."
            )
        if num_modalities < len(Modality):
            raise ValueError(f"`num_modalities` must be >= {len(Modality)}, got {num_modalities}.")
        for name, value in (
            ("embed_dim", embed_dim),
            ("text_hidden_dim", text_hidden_dim),
            ("score_embed_dim", score_embed_dim),
            ("num_layers", num_layers),
            ("vocab_size", vocab_size),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if max_positions < 11:
            raise ValueError(f"`max_positions` must be >= 11 (the inference sequence length), got {max_positions}.")

        self.start_of_sequence_tokens = nn.Embedding(num_sequence_tokens, hidden_size)
        self.end_of_sequence_tokens = nn.Embedding(num_sequence_tokens, hidden_size)
        self.modality_embedding = nn.Embedding(num_modalities, hidden_size)
        self.input_sequence_embed_linear = nn.ModuleList(
            [
                nn.Identity(),  # index 0: the modality key, embedded by `modality_embedding` instead
                nn.Linear(embed_dim, hidden_size),
                nn.Linear(text_hidden_dim, hidden_size),
                nn.Linear(score_embed_dim, hidden_size),
            ]
        )
        self.model = GPT2Model(
            GPT2Config(
                vocab_size=vocab_size,
                n_positions=max_positions,
                n_embd=hidden_size,
                n_layer=num_layers,
                n_head=num_attention_heads,
                activation_function=activation,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
                layer_norm_epsilon=layer_norm_eps,
                use_cache=False,
                bos_token_id=None,
                eos_token_id=None,
            )
        )
        # Never used (the prior feeds `inputs_embeds`); frozen so optimizers and DDP skip it.
        self.model.wte.weight.requires_grad_(False)
        self.register_buffer("empty_text_hidden_states", torch.zeros(2, text_hidden_dim), persistent=True)

    # ------------------------------------------------------------------------------------------------ helpers

    def score_embedding(self, score: float | torch.Tensor, batch_size: int) -> torch.Tensor:
        """Sinusoidal embedding of the quality score, as the official `get_timestep_embedding(score, 512,
        flip_sin_to_cos=True, downscale_freq_shift=0)` (identical to diffusers' `Timesteps(512, True, 0)`).

        Args:
            score (`float` or `torch.Tensor` of shape `(batch_size,)`): the score(s).
            batch_size (`int`): batch size; a scalar score is repeated.

        Returns:
            `torch.Tensor` of shape `(batch_size, score_embed_dim)` in float32 on the prior's device.
        """
        device = self.modality_embedding.weight.device
        if isinstance(score, torch.Tensor):
            if score.ndim == 0:
                score = score.reshape(1).expand(batch_size)
            if score.shape != (batch_size,):
                raise ValueError(
                    f"`score` must be a float or a tensor of shape ({batch_size},), got {tuple(score.shape)}."
                )
            scores = score.to(device=device, dtype=torch.float32)
        elif isinstance(score, (int, float)) and not isinstance(score, bool):
            scores = torch.full((batch_size,), float(score), device=device)
        else:
            raise TypeError(f"`score` must be a float or a tensor, got {type(score).__name__}.")
        return get_timestep_embedding(
            scores, self.config.score_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )

    def unconditional_score_block(self, batch_size: int) -> torch.Tensor:
        """The unconditional branch's raw score block: `score_embed_dim` values all equal to
        `unconditional_score_value` (2.0), fed to `Lin₃` as is.

        Args:
            batch_size (`int`): batch size.

        Returns:
            `torch.Tensor` of shape `(batch_size, score_embed_dim)` in float32 on the prior's device.
        """
        return torch.full(
            (batch_size, self.config.score_embed_dim),
            float(self.config.unconditional_score_value),
            device=self.modality_embedding.weight.device,
        )

    def _check_condition(self, condition_embeds: torch.Tensor, name: str) -> None:
        if not isinstance(condition_embeds, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(condition_embeds).__name__}.")
        if condition_embeds.ndim != 2 or condition_embeds.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"`{name}` must have shape (batch_size, {self.config.embed_dim}) (embed_dim), "
                f"got {tuple(condition_embeds.shape)}."
            )
        if condition_embeds.shape[0] == 0:
            raise ValueError(f"`{name}` must hold at least one vector.")

    def _prepare_condition(self, embeds: torch.Tensor, name: str, input_norm: float | None) -> torch.Tensor:
        """Validated condition vectors in float32 on the model's device, rescaled to ``input_norm`` when given."""
        self._check_condition(embeds, name)
        if input_norm is not None and not input_norm > 0:
            raise ValueError(f"`input_norm` must be positive or None, got {input_norm}.")
        condition = embeds.to(device=self.modality_embedding.weight.device, dtype=torch.float32)
        return rescale_to_norm(condition, input_norm) if input_norm is not None else condition

    def _modality_ids(self, source_modality: int | torch.Tensor, batch_size: int) -> torch.Tensor:
        device = self.modality_embedding.weight.device
        if isinstance(source_modality, torch.Tensor):
            if source_modality.ndim == 0:
                source_modality = source_modality.reshape(1).expand(batch_size)
            if source_modality.shape != (batch_size,) or source_modality.is_floating_point():
                raise ValueError(
                    f"`source_modality` must be a Modality/int or an integer tensor of shape ({batch_size},), "
                    f"got {source_modality.dtype} tensor of shape {tuple(source_modality.shape)}."
                )
            ids = source_modality.to(device=device, dtype=torch.long)
        elif isinstance(source_modality, int) and not isinstance(source_modality, bool):
            ids = torch.full((batch_size,), int(source_modality), dtype=torch.long, device=device)
        else:
            raise TypeError(
                f"`source_modality` must be a Modality, an int or a tensor, got {type(source_modality).__name__}."
            )
        if ids.min() < 0 or ids.max() >= self.config.num_modalities:
            raise ValueError(
                f"`source_modality` ids must lie in [0, {self.config.num_modalities}), got {ids.tolist()}."
            )
        return ids

    def _check_text(
        self, text_hidden_states: torch.Tensor | None, text_attention_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Returns the text block input (batch_size, L, text_hidden_dim) and its mask (batch_size, L) or None.
        if text_hidden_states is None:
            if text_attention_mask is not None:
                raise ValueError("`text_attention_mask` is only valid together with `text_hidden_states`.")
            return self.empty_text_hidden_states.unsqueeze(0).expand(batch_size, -1, -1), None
        if (
            not isinstance(text_hidden_states, torch.Tensor)
            or text_hidden_states.ndim != 3
            or text_hidden_states.shape[0] not in (1, batch_size)
            or text_hidden_states.shape[2] != self.config.text_hidden_dim
        ):
            raise ValueError(
                f"`text_hidden_states` must have shape ({batch_size} or 1, seq_len, {self.config.text_hidden_dim}), "
                f"got {tuple(getattr(text_hidden_states, 'shape', ()))}."
            )
        text_len = text_hidden_states.shape[1]
        if text_attention_mask is not None and (
            not isinstance(text_attention_mask, torch.Tensor)
            or tuple(text_attention_mask.shape) not in ((1, text_len), (batch_size, text_len))
        ):
            raise ValueError(
                f"`text_attention_mask` must have shape ({batch_size} or 1, {text_len}), "
                f"got {tuple(getattr(text_attention_mask, 'shape', ()))}."
            )
        text_hidden_states = text_hidden_states.expand(batch_size, -1, -1)
        if text_attention_mask is not None:
            text_attention_mask = text_attention_mask.expand(batch_size, -1)
        return text_hidden_states, text_attention_mask

    def _wrap_block(self, block: int, embeds: torch.Tensor) -> torch.Tensor:
        # SOS_k / EOS_k of block k, as the official `add_sos_eos_tokens(k, ...)`.
        batch_size = embeds.shape[0]
        sos = self.start_of_sequence_tokens.weight[block].expand(batch_size, 1, -1)
        eos = self.end_of_sequence_tokens.weight[block].expand(batch_size, 1, -1)
        return torch.cat([sos, embeds, eos], dim=1)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        condition_embeds: torch.Tensor,
        source_modality: int | torch.Tensor = Modality.VIDEO,
        score: float | torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        score_block: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorOutput | tuple:
        r"""Run the prior on the official 11-token sequence (see the module docstring) and read the last position.

        Args:
            condition_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
                The ImageBind vector(s) to refine, used as given (the official pipeline passes norm 100; see
                [`~Any2PixPrior.refine`]). The unconditional branch passes zeros.
            source_modality (`Modality`, `int` or `torch.LongTensor` of shape `(batch_size,)`, defaults to `VIDEO`):
                Source modality id(s); the official pipeline uses `Modality.VIDEO`.
            score (`float` or `torch.Tensor` of shape `(batch_size,)`, *optional*):
                Quality score, embedded sinusoidally into the score block. Defaults to 6.5 (the official
                conditional score) when `score_block` is not given either. Mutually exclusive with `score_block`.
            text_hidden_states (`torch.Tensor` of shape `(batch_size or 1, seq_len, text_hidden_dim)`, *optional*):
                Last hidden states of a `prior_text_encoder` for a prompt. Defaults to the stored empty-prompt states
                `empty_text_hidden_states` (what the official pipeline always uses).
            text_attention_mask (`torch.Tensor` of shape `(batch_size or 1, seq_len)`, *optional*):
                1 for real text tokens, 0 for padding; only with `text_hidden_states`.
            score_block (`torch.Tensor` of shape `(batch_size, score_embed_dim)`, *optional*):
                Raw score block fed to `Lin₃` instead of the score embedding, e.g.
                [`~Any2PixPrior.unconditional_score_block`] (constant 2.0) for the unconditional branch.
            target_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`, *optional*):
                Clean targets; when given, the mean L1 loss is returned in `loss` (the training objective).
            return_dict (`bool`, defaults to `True`): return a [`PriorOutput`] instead of a tuple.

        Returns:
            [`PriorOutput`] or `tuple`: `(predicted_embeds,)`, or `(predicted_embeds, loss)` with `target_embeds`.
        """
        self._check_condition(condition_embeds, "condition_embeds")
        batch_size = condition_embeds.shape[0]
        device, dtype = self.modality_embedding.weight.device, self.modality_embedding.weight.dtype

        if score is not None and score_block is not None:
            raise ValueError("Pass either `score` or `score_block`, not both.")
        if score_block is None:
            score_block = self.score_embedding(DEFAULT_SCORE if score is None else score, batch_size)
        elif not isinstance(score_block, torch.Tensor) or tuple(score_block.shape) != (
            batch_size,
            self.config.score_embed_dim,
        ):
            raise ValueError(
                f"`score_block` must be a tensor of shape ({batch_size}, {self.config.score_embed_dim}), got "
                f"{tuple(score_block.shape) if isinstance(score_block, torch.Tensor) else type(score_block).__name__}."
            )

        text_hidden_states, text_attention_mask = self._check_text(text_hidden_states, text_attention_mask, batch_size)
        text_len = text_hidden_states.shape[1]
        attention_mask = None
        if text_attention_mask is not None:
            # Every non-text token is attended; positions stay consecutive, as in the official code.
            attention_mask = torch.cat(
                [
                    torch.ones(batch_size, 5, device=device, dtype=torch.long),
                    text_attention_mask.to(device=device, dtype=torch.long),
                    torch.ones(batch_size, 4, device=device, dtype=torch.long),
                ],
                dim=1,
            )

        seq_len = 9 + text_len
        if seq_len > self.config.max_positions:
            raise ValueError(
                f"The prior's sequence ({seq_len} tokens with {text_len} text tokens) exceeds `max_positions` "
                f"({self.config.max_positions})."
            )

        linears = self.input_sequence_embed_linear
        modality = self.modality_embedding(self._modality_ids(source_modality, batch_size)).unsqueeze(1)
        image_block = linears[IMAGEBIND_BLOCK](condition_embeds.to(device=device, dtype=dtype)).unsqueeze(1)
        text_block = linears[TEXT_BLOCK](text_hidden_states.to(device=device, dtype=dtype))
        score_tokens = linears[SCORE_BLOCK](score_block.to(device=device, dtype=dtype)).unsqueeze(1)
        inputs_embeds = torch.cat(
            [
                modality,
                self._wrap_block(IMAGEBIND_BLOCK, image_block),
                self._wrap_block(TEXT_BLOCK, text_block),
                self._wrap_block(SCORE_BLOCK, score_tokens),
            ],
            dim=1,
        )
        hidden_states = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        predicted_embeds = hidden_states[:, -1]

        loss = None
        if target_embeds is not None:
            self._check_condition(target_embeds, "target_embeds")
            if target_embeds.shape[0] != batch_size:
                raise ValueError(
                    f"`target_embeds` has batch size {target_embeds.shape[0]}, `condition_embeds` has {batch_size}."
                )
            loss = F.l1_loss(predicted_embeds.float(), target_embeds.to(predicted_embeds.device).float())

        if not return_dict:
            return (predicted_embeds,) if loss is None else (predicted_embeds, loss)
        return PriorOutput(predicted_embeds=predicted_embeds, loss=loss)

    # ------------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    @apply_forward_hook  # model CPU offload must onload the prior for `refine`, not only `forward`
    def refine(
        self,
        generation_embeds: torch.Tensor,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        score: float | torch.Tensor = DEFAULT_SCORE,
        input_norm: float | None = DEFAULT_INPUT_NORM,
        output_norm: float | None = DEFAULT_OUTPUT_NORM,
        source_modality: int | torch.Tensor = Modality.VIDEO,
        text_hidden_states: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Refine generation embeddings with classifier-free guidance, exactly as the official pipeline.

        The input is rescaled to norm `input_norm`; a conditional branch (the input, score embedding of `score`)
        and an unconditional branch (a zero vector, the constant score block of `unconditional_score_value`)
        run batched through one GPT-2 pass; the result `y = uncond + guidance_scale · (cond − uncond)` is
        rescaled to norm `output_norm`.

        The official code wraps this in one "diffusion" step (`DDPMScheduler`, 1 inference step, `t = 1`): it
        converts each branch's x₀ prediction to ε against a random sample, guides ε, and steps back to x₀. With a
        single step `ᾱ_prev = 1`, so the step returns the guided x₀ itself, the random sample cancels and only a
        variance term of ~1e-10 remains — i.e. `y` above, with no randomness.

        Args:
            generation_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): the LLM's generation embeddings.
            guidance_scale (`float`, defaults to 10.0): classifier-free guidance scale (official: 10).
            score (`float` or `torch.Tensor` of shape `(batch_size,)`, defaults to 6.5): conditional quality score.
            input_norm (`float`, *optional*, defaults to 100.0): norm of each input vector before the prior
                (official: 100); `None` feeds the input as given.
            output_norm (`float`, *optional*, defaults to 20.0): norm of each returned vector (official: 20);
                `None` returns the guided `y` itself.
            source_modality (`Modality`, `int` or `torch.LongTensor`, defaults to `Modality.VIDEO`): source modality
                of both branches (official: VIDEO).
            text_hidden_states (`torch.Tensor` of shape `(batch_size or 1, seq_len, text_hidden_dim)`, *optional*):
                Prompt hidden states from a `prior_text_encoder`, shared by both branches (guidance contrasts the
                ImageBind condition and the score only). Defaults to the stored empty prompt, which is exactly the
                official behaviour.
            text_attention_mask (`torch.Tensor` of shape `(batch_size or 1, seq_len)`, *optional*): padding mask of
                `text_hidden_states`.

        Returns:
            `torch.Tensor` of shape `(batch_size, embed_dim)`: refined embeddings.
        """
        if output_norm is not None and not output_norm > 0:
            raise ValueError(f"`output_norm` must be positive or None, got {output_norm}.")
        condition = self._prepare_condition(generation_embeds, "generation_embeds", input_norm)
        batch_size = generation_embeds.shape[0]
        score_block = torch.cat([self.score_embedding(score, batch_size), self.unconditional_score_block(batch_size)])
        modality = self._modality_ids(source_modality, batch_size).repeat(2)
        if text_hidden_states is not None:
            text_hidden_states, text_attention_mask = self._check_text(
                text_hidden_states, text_attention_mask, batch_size
            )
            text_hidden_states = text_hidden_states.repeat(2, 1, 1)
            if text_attention_mask is not None:
                text_attention_mask = text_attention_mask.repeat(2, 1)
        elif text_attention_mask is not None:
            raise ValueError("`text_attention_mask` is only valid together with `text_hidden_states`.")

        predicted = self(
            torch.cat([condition, torch.zeros_like(condition)]),
            source_modality=modality,
            text_hidden_states=text_hidden_states,
            text_attention_mask=text_attention_mask,
            score_block=score_block,
        ).predicted_embeds.float()
        cond, uncond = predicted.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        return guided if output_norm is None else rescale_to_norm(guided, output_norm)

    # ------------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def prepare_training_inputs(
        self,
        condition_embeds: torch.Tensor,
        score: float | torch.Tensor = DEFAULT_SCORE,
        input_norm: float | None = DEFAULT_INPUT_NORM,
        condition_dropout_prob: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> PriorTrainingInputs:
        r"""Condition rescaling and condition dropout for one training step (no parameters involved).

        Rescales the conditions to `input_norm` (as [`~Any2PixPrior.refine`] does at inference) and turns each
        sample, with probability `condition_dropout_prob`, into an unconditional sample exactly like the
        inference's unconditional branch: zero condition and the constant score block. Use this on the unwrapped
        model and call the (possibly DDP-wrapped) model's `forward` with `score_block=` and `target_embeds=`, so
        gradient synchronisation goes through `forward`; [`~Any2PixPrior.forward_train`] does both in one call.

        Args:
            condition_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): the source ImageBind vectors.
            score (`float` or `torch.Tensor` of shape `(batch_size,)`, defaults to 6.5): quality score(s) of the
                samples.
            input_norm (`float`, *optional*, defaults to 100.0): norm of the conditions; `None` keeps them as given.
            condition_dropout_prob (`float`, defaults to 0.1): probability of dropping a sample's condition.
            generator (`torch.Generator`, *optional*): makes the dropout reproducible.

        Returns:
            [`PriorTrainingInputs`]
        """
        if not 0.0 <= condition_dropout_prob <= 1.0:
            raise ValueError(f"`condition_dropout_prob` must lie in [0, 1], got {condition_dropout_prob}.")
        condition = self._prepare_condition(condition_embeds, "condition_embeds", input_norm)
        batch_size = condition_embeds.shape[0]
        device = condition.device
        draw_device = generator.device if generator is not None else device
        dropped = (torch.rand(batch_size, generator=generator, device=draw_device) < condition_dropout_prob).to(device)
        condition = torch.where(dropped[:, None], torch.zeros_like(condition), condition)
        score_block = torch.where(
            dropped[:, None], self.unconditional_score_block(batch_size), self.score_embedding(score, batch_size)
        )
        return PriorTrainingInputs(condition_embeds=condition, score_block=score_block, condition_dropped=dropped)

    def forward_train(
        self,
        condition_embeds: torch.Tensor,
        target_embeds: torch.Tensor,
        source_modality: int | torch.Tensor = Modality.VIDEO,
        score: float | torch.Tensor = DEFAULT_SCORE,
        text_hidden_states: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        input_norm: float | None = DEFAULT_INPUT_NORM,
        condition_dropout_prob: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> PriorTrainingOutput:
        r"""One training forward: predict the clean target from the *same* 11-token sequence inference runs.

        The official prior was trained as a one-token diffusion model (REFERENCE.md §3: SDXL's DDPM schedule,
        noisy = 10·add_noise(target/10), x₀ prediction, L1 loss) with a noisy-input block in its sequence — but the
        official *inference* sequence has no noisy-input (or noise-level) block (a missing comma in its config, and
        inference feeds no noisy input). A prior trained with that block would be run on a sequence it never saw.
        So this objective trains exactly the sequence that runs: with no noisy input in the sequence the noise
        cannot reach the model, and the DDPM objective reduces to direct x₀ regression — the L1 loss between the
        prediction and the clean target. Guidance is learned by condition dropout: a dropped sample gets the
        unconditional branch's inputs (zero condition, constant 2.0 score block). The text block is not dropped
        (in the official pipeline it is the empty prompt in both branches).

        Single-process convenience: under DDP/FSDP call [`~Any2PixPrior.prepare_training_inputs`] and then the
        wrapped model's `forward(..., score_block=..., target_embeds=...)`, so gradients synchronise.

        Args:
            condition_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): source ImageBind vectors.
            target_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): clean target ImageBind vectors. The
                refined output is renormalised at inference, so their norm only sets the loss scale.
            source_modality (`Modality`, `int` or `torch.LongTensor` of shape `(batch_size,)`, defaults to `VIDEO`):
                source modality id(s).
            score (`float` or `torch.Tensor` of shape `(batch_size,)`, defaults to 6.5): quality score(s).
            text_hidden_states (`torch.Tensor`, *optional*): prompt hidden states (default: the empty prompt).
            text_attention_mask (`torch.Tensor`, *optional*): padding mask of `text_hidden_states`.
            input_norm (`float`, *optional*, defaults to 100.0): condition norm, the same as inference uses.
            condition_dropout_prob (`float`, defaults to 0.1): probability of training a sample unconditionally.
            generator (`torch.Generator`, *optional*): makes the condition dropout reproducible.

        Returns:
            [`PriorTrainingOutput`]
        """
        if target_embeds is None:
            raise ValueError("`target_embeds` is required for training.")
        inputs = self.prepare_training_inputs(
            condition_embeds,
            score=score,
            input_norm=input_norm,
            condition_dropout_prob=condition_dropout_prob,
            generator=generator,
        )
        output = self(
            inputs.condition_embeds,
            source_modality=source_modality,
            text_hidden_states=text_hidden_states,
            text_attention_mask=text_attention_mask,
            score_block=inputs.score_block,
            target_embeds=target_embeds,
        )
        return PriorTrainingOutput(
            loss=output.loss, predicted_embeds=output.predicted_embeds, condition_dropped=inputs.condition_dropped
        )

    # ------------------------------------------------------------------------------------------------ text states

    @torch.no_grad()
    def set_empty_text_hidden_states(self, hidden_states: torch.Tensor) -> None:
        """Store the text encoder's last hidden states of the empty prompt.

        Args:
            hidden_states (`torch.Tensor` of shape `(2, text_hidden_dim)` or `(1, 2, text_hidden_dim)`):
                the hidden states of the BOS and EOS tokens of `""`.
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"`hidden_states` must be a torch.Tensor, got {type(hidden_states).__name__}.")
        expected = tuple(self.empty_text_hidden_states.shape)
        if hidden_states.ndim == 3 and hidden_states.shape[0] == 1:
            hidden_states = hidden_states[0]
        if tuple(hidden_states.shape) != expected:
            raise ValueError(
                f"`hidden_states` must have shape {expected} (BOS and EOS of the empty prompt, text_hidden_dim), "
                f"got {tuple(hidden_states.shape)}."
            )
        self.empty_text_hidden_states.copy_(hidden_states)

    @torch.no_grad()
    def set_empty_text_hidden_states_from_encoder(self, text_encoder: CLIPTextModel, tokenizer) -> None:
        """Compute and store the empty-prompt hidden states of a CLIP text encoder.

        The official prior always encodes the empty prompt with its frozen CLIP ViT-H-14 text encoder
        (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`), so its 2 output vectors are constants: storing them replaces the
        350M-parameter encoder exactly. Run this once with that encoder (or the official checkpoint's copy, see
        [`~Any2PixPrior.from_official_state_dict`]).

        Args:
            text_encoder (`transformers.CLIPTextModel`): the text encoder.
            tokenizer (`transformers.CLIPTokenizer`): its tokenizer.
        """
        if not isinstance(text_encoder, CLIPTextModel):
            raise TypeError(f"`text_encoder` must be a transformers CLIPTextModel, got {type(text_encoder).__name__}.")
        if not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        # Same tokenizer call as the official encoder (`padding=True` pads nothing for a single prompt).
        tokens = tokenizer([""], max_length=77, padding=True, truncation=True, return_tensors="pt")
        hidden_states = text_encoder(
            input_ids=tokens.input_ids.to(text_encoder.device),
            attention_mask=tokens.attention_mask.to(text_encoder.device),
        ).last_hidden_state
        if tuple(hidden_states.shape[1:]) != tuple(self.empty_text_hidden_states.shape):
            raise ValueError(
                "The text encoder's empty-prompt hidden states have shape "
                f"{tuple(hidden_states.shape[1:])}, expected {tuple(self.empty_text_hidden_states.shape)} "
                "(2 tokens — BOS, EOS — of width text_hidden_dim)."
            )
        self.set_empty_text_hidden_states(hidden_states.float())

    # ------------------------------------------------------------------------------------------------ conversion

    @classmethod
    def from_official_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        text_encoder: CLIPTextModel | None = None,
        tokenizer=None,
        text_encoder_config: CLIPTextConfig | None = None,
        empty_text_hidden_states: torch.Tensor | None = None,
        **config,
    ) -> tuple["Any2PixPrior", PriorConversionReport]:
        r"""Build a prior from the official `ckpts/prior/model.bin` state dict, strictly.

        `cond_stage_models.*` (the official frozen CLIP text encoder) is dropped and GPT-2 attention-mask buffers
        of older transformers (`model.h.N.attn.bias`, `model.h.N.attn.masked_bias`) are ignored; every other key
        must match the prior exactly. The empty-prompt hidden states come from at most one of:
        `empty_text_hidden_states` (precomputed), `text_encoder` + `tokenizer` (e.g. the laion CLIP-ViT-H-14 text
        model), or `text_encoder_config` + `tokenizer` (a `CLIPTextModel` built from the config and loaded with
        the checkpoint's own `cond_stage_models.0.model.*` weights). With none of them the buffer stays at zeros
        and a warning is logged.

        Args:
            state_dict (`dict[str, torch.Tensor]`): the official prior's state dict (not modified).
            text_encoder (`transformers.CLIPTextModel`, *optional*): a CLIP text encoder to encode `""`.
            tokenizer (`transformers.CLIPTokenizer`, *optional*): its tokenizer; required with `text_encoder` or
                `text_encoder_config`.
            text_encoder_config (`transformers.CLIPTextConfig`, *optional*): config of the checkpoint's own text
                encoder (CLIP ViT-H-14: hidden 1024, 24 layers, 16 heads, intermediate 4096).
            empty_text_hidden_states (`torch.Tensor` of shape `(2, text_hidden_dim)`, *optional*): precomputed.
            **config: [`Any2PixPrior`] config values (defaults are the official sizes).

        Returns:
            `tuple[Any2PixPrior, PriorConversionReport]`: the prior (fp32, eval mode) and what happened to each key.

        Raises:
            ValueError: on missing or unexpected keys (all listed), a shape mismatch (key and both shapes) or an
                inconsistent choice of text-state source.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"`state_dict` must be a dict of tensors, got {type(state_dict).__name__}.")
        sources = [
            name
            for name, given in (
                ("empty_text_hidden_states", empty_text_hidden_states is not None),
                ("text_encoder", text_encoder is not None),
                ("text_encoder_config", text_encoder_config is not None),
            )
            if given
        ]
        if len(sources) > 1:
            raise ValueError(f"Pass at most one source of empty-prompt hidden states, got {sources}.")
        if sources and sources[0] != "empty_text_hidden_states" and tokenizer is None:
            raise ValueError(f"`tokenizer` is required with `{sources[0]}`.")

        report = PriorConversionReport()
        prior_state = {}
        for key, value in state_dict.items():
            if key.startswith("cond_stage_models."):
                report.dropped_text_encoder_keys.append(key)
            elif _is_legacy_gpt2_attention_buffer(key):
                report.ignored_buffer_keys.append(key)
            else:
                prior_state[key] = value

        model = cls(**config)
        own_state = model.state_dict()
        expected = set(own_state) - {"empty_text_hidden_states"}
        missing = sorted(expected - set(prior_state))
        unexpected = sorted(set(prior_state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"The state dict does not match Any2PixPrior({dict(config)}): missing keys {missing}, "
                f"unexpected keys {unexpected}."
            )
        for key, value in prior_state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"State dict value of '{key}' must be a tensor, got {type(value).__name__}.")
            if value.shape != own_state[key].shape:
                raise ValueError(
                    f"Shape mismatch for '{key}': checkpoint {tuple(value.shape)}, model {tuple(own_state[key].shape)}."
                )
        prior_state["empty_text_hidden_states"] = own_state["empty_text_hidden_states"]
        model.load_state_dict(prior_state, strict=True)
        report.loaded_keys = sorted(expected)

        if empty_text_hidden_states is not None:
            model.set_empty_text_hidden_states(empty_text_hidden_states)
        elif text_encoder is not None:
            model.set_empty_text_hidden_states_from_encoder(text_encoder, tokenizer)
        elif text_encoder_config is not None:
            encoder = text_encoder_from_official_state_dict(state_dict, report.dropped_text_encoder_keys, text_encoder_config)
            model.set_empty_text_hidden_states_from_encoder(encoder, tokenizer)
        else:
            logger.warning(
                "No text encoder or empty-prompt hidden states given: `empty_text_hidden_states` stays at zeros, so "
                "the prior will not reproduce the official outputs. Pass `text_encoder_config` + `tokenizer` to use "
                "the checkpoint's own text encoder."
            )
        if sources:
            report.empty_text_hidden_states_source = (
                "checkpoint_text_encoder" if sources[0] == "text_encoder_config" else sources[0]
            )
        return model.eval(), report


def text_encoder_from_official_state_dict(
    state_dict: dict[str, torch.Tensor], text_keys: list[str], config: CLIPTextConfig
) -> CLIPTextModel:
    """Build a `CLIPTextModel` from `config` and load the official checkpoint's `cond_stage_models.0.model.*`
    weights into it, strictly (its position-id buffer excepted)."""
    encoder = CLIPTextModel(config)
    own_state = encoder.state_dict()
    own_keys = set(own_state)
    weights = {}
    for key in text_keys:
        if not key.startswith(OFFICIAL_TEXT_ENCODER_PREFIX):
            raise ValueError(f"Unexpected text-encoder key '{key}' (expected prefix '{OFFICIAL_TEXT_ENCODER_PREFIX}').")
        name = key[len(OFFICIAL_TEXT_ENCODER_PREFIX) :]
        # transformers 5's CLIPTextModel has no `text_model.` level; older ones (and the checkpoint) do.
        if name not in own_keys and name.startswith("text_model."):
            name = name[len("text_model.") :]
        if name.endswith("embeddings.position_ids"):
            continue  # a constant arange buffer, recomputed by the model
        weights[name] = state_dict[key]
    own_weights = {k for k in own_keys if not k.endswith("embeddings.position_ids")}
    missing, unexpected = sorted(own_weights - set(weights)), sorted(set(weights) - own_weights)
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint's text encoder does not match `text_encoder_config`: missing keys {missing}, "
            f"unexpected keys {unexpected}."
        )
    for name, value in weights.items():
        expected_shape = own_state[name].shape
        if value.shape != expected_shape:
            raise ValueError(
                f"Shape mismatch for text-encoder key '{name}': checkpoint {tuple(value.shape)}, "
                f"model {tuple(expected_shape)}."
            )
    encoder.load_state_dict(weights, strict=False)
    return encoder.eval()
