#!/usr/bin/env python
"""Instruction-tune the InstructAny2Pix LLM (any causal LM + the multimodal adapter) on MM-Inst-format data.

The objective of the official release (shared/REFERENCE.md §2, §5): next-token cross-entropy on the answer (system
and user turns masked) plus the L1 distance between the embeddings read out at the answer's BASE and GEN ``<video>``
tokens (the hidden state preceding each token, through ``mm_adapter.output_head``; the read-out rule inference uses)
and the norm-20 ImageBind targets, weight 1 each. Samples follow the official rules: the base image is an input
``<video>`` except in 20% of samples (``<base_null>``), other media are ``<video>`` inputs 80% of the time and their
caption text otherwise — drawn per (seed, epoch, sample), so runs are reproducible. Two auxiliary samplings, off by
default, help an LLM trained from scratch read its media: ``--answer_noise_prob`` (answer words of the teacher-forced
input swapped for other words of the answer) and ``--reproduce_prob`` (the base image alone, answered unchanged);
``--image_patch_tokens K`` lets the adapter read K more vectors per image from ImageBind's patch tokens;
``--attribute_reader`` gives every medium one more token per attribute field, read by linear heads (e.g. those
``train_imagebind.py --attribute_loss_weight`` saves), with ``--attribute_words`` each also holding the LLM's own
embedding of its class's word; ``--max_media_positions M`` adds a learned vector per
medium's place in the prompt to all of its tokens; ``--describe_base`` makes the answer write out the base's caption
before the result's.

Full fine-tuning (default), LoRA (``--lora``, via peft; merged into the saved LLM) or adapter-only
(``--freeze_llm``). The LLM comes from ``--pretrained_llm`` (any transformers causal LM folder; the multimodal tokens
are added when missing) or from a converted ``--pipeline``. Saves ``llm``, ``llm_tokenizer`` and ``mm_adapter`` as
pipeline components in ``--output_dir`` (with ``--pipeline``: the complete updated pipeline).

Example::

    accelerate launch training/train_llm.py --pipeline path/to/pipeline --data_dir data/shapes \\
        --output_dir out/llm --max_train_steps 3000 --train_batch_size 8 --gradient_checkpointing
"""

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.utils import BaseOutput
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from diffusers_any2pix.data import (
    ANSWER_NOISE_SOURCES,
    FeatureStore,
    MMInstExample,
    MMInstLLMDataset,
    collate_llm_batch,
    conversation_texts,
    load_instructions,
    parse_repeat_spec,
    repeat_examples,
)
from diffusers_any2pix.models.mm_adapter import AttributeHeads, MultimodalAdapter
from diffusers_any2pix.multimodal_llm import (
    MULTIMODAL_SPECIAL_TOKENS,
    MultimodalTokenIds,
    add_multimodal_tokens,
    inject_media_embeds,
)
from diffusers_any2pix.word_tokenizer import build_word_level_tokenizer
from diffusers_any2pix import training_utils


logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_llm", type=str, default=None, help="Any transformers causal LM folder (or Hub id)."
    )
    model.add_argument(
        "--pretrained_llm_tokenizer",
        type=str,
        default=None,
        help="Its tokenizer (default: the LLM folder, or its `tokenizer` subfolder as in the official release).",
    )
    model.add_argument(
        "--llm_config",
        type=str,
        default=None,
        help="A transformers config.json (with `model_type`, e.g. a small Llama): train a new LLM from scratch, with a\n"
        "word-level tokenizer built from the training conversations unless --pretrained_llm_tokenizer is given.",
    )
    model.add_argument("--pretrained_mm_adapter", type=str, default=None, help="A MultimodalAdapter folder.")
    model.add_argument("--embed_dim", type=int, default=1024, help="ImageBind size, for a new adapter.")
    model.add_argument("--freeze_llm", action="store_true", help="Train the adapter only.")
    model.add_argument("--lora", action="store_true", help="Train LoRA adapters (merged into the saved LLM).")
    model.add_argument("--lora_rank", type=int, default=64)
    model.add_argument("--lora_alpha", type=int, default=16)
    model.add_argument("--lora_dropout", type=float, default=0.05)
    model.add_argument(
        "--lora_target_modules", type=str, nargs="+", default=["all-linear"], help="peft target modules."
    )
    training_utils.add_data_args(parser, instructions=True)
    data = parser.add_argument_group("sampling (official rules)")
    data.add_argument("--base_drop_prob", type=float, default=0.2, help="Samples whose base becomes <base_null>.")
    data.add_argument("--caption_text_prob", type=float, default=0.2, help="Non-base media given as caption text.")
    data.add_argument("--target_norm", type=float, default=20.0, help="Norm of the BASE/GEN embedding targets.")
    data.add_argument("--max_length", type=int, default=512, help="Longest conversation in tokens.")
    data.add_argument(
        "--skip_missing_features",
        action="store_true",
        help="Drop records whose media have no feature file (MM-Inst-Train lists media it cannot distribute).",
    )
    extra = parser.add_argument_group("auxiliary sampling (not in the official recipe)")
    extra.add_argument(
        "--answer_noise_prob",
        type=float,
        default=0.0,
        help="Share of answer words replaced in the teacher-forced input by other words of the answer (labels keep\n"
        "the true answer), so the LLM reads each word from the instruction and media, not from the words before.",
    )
    extra.add_argument(
        "--answer_noise_source",
        choices=ANSWER_NOISE_SOURCES,
        default="answer",
        help="Replacement words of --answer_noise_prob: words of the same answer, or ('context') words that follow the\n"
        "same word elsewhere in the answers (after 'a', every colour), so no word can rule out the one after it.",
    )
    extra.add_argument(
        "--answer_swap_words",
        nargs="+",
        default=[],
        metavar="WORD,WORD,...",
        help="Groups of interchangeable answer words, one comma-separated group per value (e.g. the colours, the\n"
        "shapes): in the teacher-forced input a word of a group is replaced, with --answer_swap_prob, by a uniform draw\n"
        "from its group (labels keep the true answer), so the word just written cannot steer the next one.",
    )
    extra.add_argument(
        "--answer_swap_prob", type=float, default=1.0, help="Chance of each --answer_swap_words replacement."
    )
    extra.add_argument(
        "--repeat_records",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE:TIMES",
        help="Records whose FIELD equals VALUE appear TIMES times per epoch (e.g. type=pick_base:3 for ShapesWorld's\n"
        "instruction types), so the hard kinds get more of the steps; each copy draws its own sampling.",
    )
    extra.add_argument(
        "--reproduce_prob",
        type=float,
        default=0.0,
        help="Share of samples replaced by their base image alone, answered by the edit that keeps it unchanged\n"
        "(its caption and embedding): practice in reading an image into words.",
    )
    extra.add_argument(
        "--describe_base",
        action="store_true",
        help="The answer writes out the base it edits: <base><video>[base caption]<im_gen_start><im_gen>[result]\n"
        "(not the official format), so the result is a rewrite of words the LLM has just written. The pipeline\n"
        "reads the result caption after the last <im_gen> either way.",
    )
    places = parser.add_argument_group("media position embeddings (not in the official recipe)")
    places.add_argument(
        "--max_media_positions",
        type=int,
        default=None,
        help="M > 0: the adapter adds a learned vector per medium's place in the prompt (first, second, ... up to M)\n"
        "to all of that medium's tokens, so the LLM can tell several images apart (zero at the start). Default: a\n"
        "loaded adapter's setting, 0 (none, official) for a new one.",
    )
    patches = parser.add_argument_group("image patch tokens (not in the official recipe)")
    patches.add_argument(
        "--image_patch_tokens",
        type=int,
        default=None,
        help="K > 0: each image is also read by the adapter's perceiver resampler from its ImageBind patch tokens\n"
        "into K more <video> tokens (the feature files need the patches: prepare_data.py --image_patches). Default:\n"
        "a loaded adapter's setting, 0 (one token per image, official) for a new one.",
    )
    patches.add_argument(
        "--patch_embed_dim", type=int, default=None, help="Patch token width (ImageBind's vision_embed_dim)."
    )
    patches.add_argument("--resampler_hidden_size", type=int, default=768, help="Width inside the resampler.")
    patches.add_argument("--resampler_depth", type=int, default=2, help="Perceiver blocks of the resampler.")
    patches.add_argument("--resampler_heads", type=int, default=4, help="Attention heads of the resampler.")
    attributes = parser.add_argument_group("attribute tokens (not in the official recipe)")
    attributes.add_argument(
        "--attribute_reader",
        type=str,
        default=None,
        help="Linear attribute heads (an attribute_heads.safetensors file, or the train_imagebind.py output folder\n"
        "holding one): every medium also becomes one <video> token per attribute field, that field's class\n"
        "distribution read by the (frozen) heads and embedded by the adapter. Needs a new adapter or one that reads\n"
        "the same fields.",
    )
    attributes.add_argument(
        "--attribute_words",
        action="store_true",
        help="Each attribute token also holds the LLM's own input embedding of its class's word (the heads' class\n"
        "names, each one token of the LLM's tokenizer), so naming what a field reads is copying a word. Needs\n"
        "--attribute_reader heads that name their classes; a loaded adapter keeps its setting.",
    )
    attributes.add_argument(
        "--attribute_token_groups",
        nargs="+",
        default=None,
        metavar="FIELD,FIELD,...",
        help="Fields that share one attribute token, one comma-separated group of field indices per value, covering\n"
        "every field of the --attribute_reader heads once (ShapesWorld: 0 1,2 3,4 5,6 = the background, then one\n"
        "token per slot holding its shape and colour). A group's token is the sum of its fields' tokens. Default:\n"
        "one token per field; a loaded adapter keeps its setting.",
    )
    attributes.add_argument(
        "--pooled_drop_prob",
        type=float,
        default=0.0,
        help="Share of input media whose pooled vector is left out of a training sample (their attribute tokens\n"
        "stay), so the LLM learns to name what it is shown from the per-field read-outs. Needs attribute tokens.",
    )
    attributes.add_argument(
        "--relabel_words",
        nargs="+",
        default=[],
        metavar="WORD,WORD,...",
        help="Groups of words naming attribute classes, one comma-separated group per value (e.g. the colours, the\n"
        "shapes, the backgrounds): a relabelled sample (--relabel_prob) renames each group's words by a random\n"
        "permutation in its whole conversation and its media's attribute classes alike, so words get paired as the\n"
        "records never pair them. Words are renamed as tokens (an article before them is not adjusted). Needs\n"
        "--attribute_reader heads that name their classes.",
    )
    attributes.add_argument(
        "--relabel_prob", type=float, default=0.0, help="Share of samples relabelled by --relabel_words."
    )
    training_utils.add_common_training_args(parser, learning_rate=2e-5, train_batch_size=4)
    args = training_utils.check_common_args(parser.parse_args(argv))
    training_utils.resolve_data_paths(args)
    if args.pretrained_llm is None and args.pipeline is None and args.llm_config is None:
        raise ValueError(
            "Pass `--pretrained_llm` (a causal LM), `--pipeline` (a converted pipeline) or `--llm_config` (a new LLM)."
        )
    if args.llm_config is not None and args.pretrained_llm is not None:
        raise ValueError("`--llm_config` (a new LLM) and `--pretrained_llm` exclude each other.")
    if args.llm_config is not None and (args.lora or args.freeze_llm):
        raise ValueError("A new LLM from `--llm_config` trains fully; drop `--lora` / `--freeze_llm`.")
    if args.lora and args.freeze_llm:
        raise ValueError("`--lora` and `--freeze_llm` exclude each other.")
    for spec in args.repeat_records:  # malformed specs fail before any loading
        parse_repeat_spec(spec)
    if not 0.0 <= args.pooled_drop_prob < 1.0:
        raise ValueError(f"`--pooled_drop_prob` must be in [0, 1), got {args.pooled_drop_prob}.")
    if not 0.0 <= args.relabel_prob <= 1.0:
        raise ValueError(f"`--relabel_prob` must be in [0, 1], got {args.relabel_prob}.")
    if args.relabel_words and args.attribute_reader is None:
        raise ValueError("`--relabel_words` renames attribute classes: it needs `--attribute_reader`.")
    if args.attribute_words and args.attribute_reader is None:
        raise ValueError("`--attribute_words` ties attribute tokens to class words: it needs `--attribute_reader`.")
    if args.attribute_token_groups is not None:
        args.attribute_token_groups = parse_token_groups(args.attribute_token_groups)
        if args.attribute_reader is None:
            raise ValueError("`--attribute_token_groups` groups attribute fields: it needs `--attribute_reader`.")
        if args.relabel_words:
            raise ValueError(
                "`--relabel_words` renames classes field by field and needs one attribute token per field: drop "
                "`--attribute_token_groups`."
            )
    if args.max_media_positions is not None and args.max_media_positions < 0:
        raise ValueError(f"`--max_media_positions` must be >= 0, got {args.max_media_positions}.")
    if args.image_patch_tokens is not None and args.image_patch_tokens < 0:
        raise ValueError(f"`--image_patch_tokens` must be >= 0, got {args.image_patch_tokens}.")
    return args


@dataclass
class LLMTrainingOutput(BaseOutput):
    """Output of `MultimodalLLMForTraining.forward`.

    The parts default to `None` only so accelerate's mixed-precision output conversion can rebuild the object.

    Args:
        loss (`torch.Tensor`): ``lm_loss + embedding_loss``.
        lm_loss (`torch.Tensor`): next-token cross-entropy on the answer.
        embedding_loss (`torch.Tensor`): mean L1 between read-out and target embeddings.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor | None = None
    embedding_loss: torch.Tensor | None = None


class MultimodalLLMForTraining(torch.nn.Module):
    """The LLM and its adapter as one module, whose forward is the training objective (so data-parallel wrappers see
    every trained parameter used in their forward).

    Args:
        llm (`PreTrainedModel`): the causal LM (possibly a peft model).
        mm_adapter (`MultimodalAdapter`): projector, output head (and patch resampler).
        token_ids (`MultimodalTokenIds`): special token ids.
        pooled_drop_prob (`float`, defaults to 0.0): in training mode, the chance of each input medium's pooled vector
            being left out (`inject_media_embeds`' `drop_pooled`); needs an adapter with attribute tokens.

    A batch of a dataset with `relabel_words` also brings each medium's ``class_permutation`` and ``relabelled``
    flag (the pooled vectors of relabelled media are always left out: they show the scene under its old names) and
    per-target ``target_weights`` of the embedding loss.
    """

    def __init__(
        self, llm, mm_adapter: MultimodalAdapter, token_ids: MultimodalTokenIds, pooled_drop_prob: float = 0.0
    ):
        super().__init__()
        if pooled_drop_prob > 0 and not mm_adapter.attribute_tokens:
            raise ValueError(
                "`pooled_drop_prob` leaves pooled vectors out so the attribute tokens are read; the adapter has no "
                "attribute tokens (train with `--attribute_reader`)."
            )
        self.llm = llm
        self.mm_adapter = mm_adapter
        self.token_ids = token_ids
        self.pooled_drop_prob = pooled_drop_prob

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        labels: torch.LongTensor,
        prompt_lengths: list[int],
        media_embeds: list[torch.Tensor],
        target_rows: torch.LongTensor,
        target_positions: torch.LongTensor,
        target_embeds: torch.Tensor,
        image_patches: list[list[torch.Tensor | None]] | None = None,
        target_weights: torch.Tensor | None = None,
        relabelled_media: torch.BoolTensor | None = None,
        class_permutation: torch.LongTensor | None = None,
    ) -> LLMTrainingOutput:
        """Teacher-forced forward of a `collate_llm_batch` batch: prompt media injected additively (answer
        ``<video>`` tokens keep their plain embedding, as at inference), CE on the answer, L1 on the read-outs."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        drop_pooled = None
        num_media = sum(e.shape[0] for e in media_embeds)
        if self.training and self.pooled_drop_prob > 0:
            drop_pooled = torch.rand(num_media) < self.pooled_drop_prob
        if class_permutation is not None and relabelled_media is not None and bool(relabelled_media.any()):
            relabelled_media = relabelled_media.cpu()
            drop_pooled = relabelled_media if drop_pooled is None else drop_pooled | relabelled_media
        embeds = inject_media_embeds(
            embeds,
            input_ids,
            media_embeds,
            self.mm_adapter,
            self.token_ids.video,
            prompt_lengths=prompt_lengths,
            image_patches=image_patches,
            drop_pooled=drop_pooled,
            class_permutation=class_permutation,
            word_embeddings=self.llm.get_input_embeddings().weight,
        )
        output = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
            use_cache=False,
        )
        # The last entry of `hidden_states` is the final layer after the final norm, as read at inference.
        hidden = output.hidden_states[-1][target_rows, target_positions]
        predicted = self.mm_adapter.predict(hidden)
        per_target = F.l1_loss(predicted.float(), target_embeds.to(predicted.device).float(), reduction="none")
        if target_weights is None:
            embedding_loss = per_target.mean()
        else:
            # Mean over the weighted targets (0 when none has weight), the plain mean when all weigh 1.
            weights = target_weights.to(per_target.device).float()
            embedding_loss = (per_target.mean(dim=-1) * weights).sum() / weights.sum().clamp(min=1.0)
        return LLMTrainingOutput(loss=output.loss + embedding_loss, lm_loss=output.loss, embedding_loss=embedding_loss)


def load_llm_tokenizer(args: argparse.Namespace):
    """``--pretrained_llm_tokenizer``, else the pipeline's ``llm_tokenizer``, else the LLM folder (or its ``tokenizer``
    subfolder, the official layout)."""
    source = training_utils.component_source(args, "llm_tokenizer")
    if source is None and args.pretrained_llm is not None:
        nested = os.path.join(args.pretrained_llm, "tokenizer")
        source = (nested, None) if os.path.isdir(nested) else (args.pretrained_llm, None)
    path, subfolder = source
    return AutoTokenizer.from_pretrained(path, **({"subfolder": subfolder} if subfolder else {}))


def new_llm(args: argparse.Namespace, examples: list[MMInstExample]):
    """A randomly initialised LLM of ``--llm_config`` and its tokenizer: ``--pretrained_llm_tokenizer``, else a
    word-level tokenizer of the training conversations (the multimodal tokens are added afterwards)."""
    with open(args.llm_config) as f:
        config_dict = json.load(f)
    if "model_type" not in config_dict:
        raise ValueError(f"`--llm_config` {args.llm_config} has no `model_type` (e.g. \"llama\").")
    if args.pretrained_llm_tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.pretrained_llm_tokenizer)
    else:
        tokenizer = build_word_level_tokenizer(
            conversation_texts(examples), special_tokens=MULTIMODAL_SPECIAL_TOKENS, model_max_length=args.max_length
        )
    config_dict.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(args.seed)  # the initial weights follow --seed
    return AutoModelForCausalLM.from_config(config), tokenizer


def parse_token_groups(values: list[str]) -> list[list[int]]:
    """``--attribute_token_groups`` values (``"1,2"``: fields 1 and 2 share a token) as lists of field indices; the
    partition itself is checked against the heads' fields when the adapter is built."""
    groups = []
    for value in values:
        try:
            groups.append([int(field) for field in value.split(",")])
        except ValueError:
            raise ValueError(
                f"`--attribute_token_groups`: {value!r} is not a comma-separated list of field indices (e.g. 1,2)."
            ) from None
    return groups


def build_model(
    args: argparse.Namespace, accelerator, examples: list[MMInstExample]
) -> tuple[MultimodalLLMForTraining, object, MultimodalTokenIds]:
    """The training module, the tokenizer (multimodal tokens added when missing) and the token ids."""
    # Frozen base weights may be half precision; trained weights stay float32 (mixed precision autocasts).
    frozen = args.lora or args.freeze_llm
    dtype = training_utils.weight_dtype_for(accelerator) if frozen else torch.float32
    if args.llm_config is not None:
        llm, tokenizer = new_llm(args, examples)
    else:
        llm = training_utils.load_component(args, "llm", AutoModelForCausalLM.from_pretrained, dtype=dtype)
        tokenizer = load_llm_tokenizer(args)
    token_ids = add_multimodal_tokens(tokenizer, llm)
    if args.llm_config is not None:  # the pad token is only settled once the multimodal tokens are in
        llm.config.pad_token_id = tokenizer.pad_token_id
    heads = AttributeHeads.load(args.attribute_reader) if args.attribute_reader is not None else None
    attribute_classes = None if heads is None else list(heads.num_classes)
    word_ids = attribute_word_ids(heads, tokenizer) if args.attribute_words else None
    adapter = None
    if args.llm_config is None:  # a new LLM gets a new adapter
        adapter = training_utils.load_component(args, "mm_adapter", MultimodalAdapter.from_pretrained, required=False)
    if adapter is not None and heads is not None and adapter.config.attribute_classes is None:
        adapter = _extended_adapter(adapter, attribute_classes=attribute_classes)
    groups = args.attribute_token_groups
    if adapter is not None:
        adapter = _set_once(
            adapter, "attribute_word_ids", word_ids,
            "`--attribute_words` gives token ids {new} but the loaded mm_adapter was trained with {old} (other class "
            "words, or another tokenizer).",
        )  # fmt: skip
        adapter = _set_once(
            adapter, "attribute_token_groups", groups,
            "`--attribute_token_groups` {new} differs from the loaded mm_adapter's {old}; its LLM was trained on "
            "those tokens.",
        )  # fmt: skip
    if adapter is None:
        embed_dim, patch_embed_dim = args.embed_dim, args.patch_embed_dim
        if args.pipeline is not None:
            encoder = training_utils.load_component(args, "image_encoder", _image_encoder_config)
            embed_dim, patch_embed_dim = encoder["out_embed_dim"], patch_embed_dim or encoder["vision_embed_dim"]
        adapter = MultimodalAdapter(
            embed_dim=embed_dim,
            llm_hidden_size=llm.config.get_text_config().hidden_size,
            **_resampler_config(args, patch_embed_dim, args.image_patch_tokens or 0),
            attribute_classes=attribute_classes,
            max_media_positions=args.max_media_positions or 0,
            attribute_word_ids=word_ids,
            attribute_token_groups=groups,
        )
    elif args.image_patch_tokens not in (None, adapter.config.image_patch_tokens):
        adapter = _with_patch_resampler(args, adapter)
    # A loaded adapter: extended with the table, or refused when its table has another size.
    if args.max_media_positions is not None and args.max_media_positions != adapter.config.max_media_positions:
        if adapter.config.max_media_positions:
            raise ValueError(
                f"`--max_media_positions` {args.max_media_positions} differs from the loaded mm_adapter's "
                f"{adapter.config.max_media_positions}; its media position embeddings were trained for that number."
            )
        adapter = _extended_adapter(adapter, max_media_positions=args.max_media_positions)
    adapter = adapter.to(torch.float32)
    if heads is not None:
        adapter.load_attribute_reader(heads)
    elif adapter.attribute_reader is not None:  # a loaded reader was fitted to labels: it stays as it is
        adapter.attribute_reader.requires_grad_(False)
    if args.gradient_checkpointing:
        # transformers 5 renamed gradient checkpointing to activation checkpointing.
        (getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable)()
    if args.freeze_llm:
        llm.requires_grad_(False)
    elif args.lora:
        llm = _wrap_lora(args, llm, token_ids)
    return MultimodalLLMForTraining(llm, adapter, token_ids, args.pooled_drop_prob), tokenizer, token_ids


def attribute_word_ids(heads: AttributeHeads, tokenizer) -> list[int]:
    """The LLM token id of every attribute class's word (`heads.class_names`, all fields concatenated), -1 for a
    class named ``""`` (none); raises `ValueError` for heads without names or a word that is not one known token."""
    if heads.class_names is None:
        raise ValueError(
            "`--attribute_words` needs attribute heads that name their classes (`class_names` in the heads file's "
            "metadata, as train_imagebind.py writes for ShapesWorld)."
        )
    ids = []
    for name in (name for field in heads.class_names for name in field):
        token_ids = tokenizer(name, add_special_tokens=False)["input_ids"] if name else [-1]
        if len(token_ids) != 1 or token_ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"`--attribute_words`: the class word {name!r} is not one token of the LLM's tokenizer (it gives "
                f"{token_ids})."
            )
        ids.append(token_ids[0])
    return ids


def _resampler_config(args: argparse.Namespace, patch_embed_dim: int | None, image_patch_tokens: int) -> dict:
    return {
        "image_patch_tokens": image_patch_tokens,
        "patch_embed_dim": patch_embed_dim,
        "resampler_hidden_size": args.resampler_hidden_size,
        "resampler_depth": args.resampler_depth,
        "resampler_heads": args.resampler_heads,
    }


def _with_patch_resampler(args: argparse.Namespace, adapter: MultimodalAdapter) -> MultimodalAdapter:
    """A loaded adapter that reads no patches (e.g. the official one), with a new patch resampler; its projector and
    head keep their weights."""
    if adapter.config.image_patch_tokens:
        raise ValueError(
            f"`--image_patch_tokens` {args.image_patch_tokens} differs from the loaded mm_adapter's "
            f"{adapter.config.image_patch_tokens}; its resampler was trained for that number."
        )
    patch_embed_dim = args.patch_embed_dim
    if patch_embed_dim is None and args.pipeline is not None:
        patch_embed_dim = training_utils.load_component(args, "image_encoder", _image_encoder_config)["vision_embed_dim"]
    logger.warning(f"Adding a patch resampler ({args.image_patch_tokens} tokens per image) to the loaded mm_adapter.")
    return _extended_adapter(adapter, **_resampler_config(args, patch_embed_dim, args.image_patch_tokens))


def _extended_adapter(adapter: MultimodalAdapter, **config) -> MultimodalAdapter:
    """The adapter with ``config`` changed (new modules), its existing weights kept."""
    extended = MultimodalAdapter.from_config(adapter.config, **config)
    weights = adapter.state_dict()
    missing, unexpected = extended.load_state_dict(weights, strict=False)
    assert not unexpected and not any(key in weights for key in missing)
    return extended



def _set_once(adapter: MultimodalAdapter, name: str, value, message: str) -> MultimodalAdapter:
    """The adapter with config ``name`` set to ``value`` (`None`: left as it is); a loaded adapter that already has
    another value was trained with it, so that is refused with ``message`` (formatted with ``new`` and ``old``)."""
    old = getattr(adapter.config, name)
    if value is None or old == value:
        return adapter
    if old is not None:
        raise ValueError(message.format(new=value, old=old))
    return _extended_adapter(adapter, **{name: value})


def _image_encoder_config(path: str, subfolder: str | None = None) -> dict:
    from diffusers_any2pix.models.imagebind import ImageBindModel

    return ImageBindModel.load_config(path, subfolder=subfolder)


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target).split(".")[-1]


def _wrap_lora(args: argparse.Namespace, llm, token_ids: MultimodalTokenIds):
    """LoRA on the linear layers; the multimodal tokens' input rows train too (peft trainable tokens), and so does an
    untied output layer (the LM must learn to emit the new tokens)."""
    from peft import LoraConfig, get_peft_model

    input_name = _module_name(llm, llm.get_input_embeddings())
    tied = (
        llm.get_output_embeddings() is None or llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    )
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=(
            args.lora_target_modules[0] if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
        ),
        trainable_token_indices={input_name: list(token_ids.special_token_ids)},
        modules_to_save=None if tied else [_module_name(llm, llm.get_output_embeddings())],
    )
    llm = get_peft_model(llm, config)
    for param in llm.parameters():  # LoRA weights train in float32 under mixed precision
        if param.requires_grad:
            param.data = param.data.float()
    return llm


def trained_llm(model: MultimodalLLMForTraining, in_place: bool = False):
    """The plain transformers LLM: with LoRA, merged into the base weights (into a copy unless ``in_place``, which
    ends training: the model no longer holds LoRA layers)."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = (llm if in_place else copy.deepcopy(llm)).merge_and_unload()
    return llm


def _word_groups(values: list[str]) -> list[list[str]]:
    """Comma-separated word groups, one per command-line value."""
    return [[w.strip() for w in group.split(",") if w.strip()] for group in values]


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Runs the training; returns the training summary (see `write_training_summary`)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    # Batches whose media are all given as text leave the projector unused.
    accelerator = training_utils.make_accelerator(args, find_unused_parameters=True)
    features = FeatureStore.from_file(args.media_map, args.data_dir)
    examples = load_instructions(args.instruction_file, features, args.skip_missing_features)
    model, tokenizer, token_ids = build_model(args, accelerator, examples)
    if args.repeat_records:  # after build_model: a new word-level tokenizer sees each record once
        num_records = len(examples)
        examples = repeat_examples(examples, args.repeat_records)
        logger.info(f"--repeat_records: {num_records} records, {len(examples)} samples per epoch.")
    features.embed_dim = model.mm_adapter.config.embed_dim  # every feature file is checked against it
    if model.mm_adapter.config.image_patch_tokens:
        features.patch_embed_dim = model.mm_adapter.config.patch_embed_dim
    dataset = MMInstLLMDataset(
        examples,
        features,
        tokenizer,
        token_ids,
        seed=args.seed,
        target_norm=args.target_norm,
        max_length=args.max_length,
        base_drop_prob=args.base_drop_prob,
        caption_text_prob=args.caption_text_prob,
        answer_noise_prob=args.answer_noise_prob,
        answer_noise_source=args.answer_noise_source,
        answer_swap_words=_word_groups(args.answer_swap_words),
        answer_swap_prob=args.answer_swap_prob,
        reproduce_prob=args.reproduce_prob,
        describe_base=args.describe_base,
        image_patch_tokens=model.mm_adapter.config.image_patch_tokens,
        attribute_tokens=model.mm_adapter.attribute_tokens,
        relabel_words=_word_groups(args.relabel_words),
        relabel_prob=args.relabel_prob,
        attribute_class_names=AttributeHeads.load(args.attribute_reader).class_names if args.relabel_words else None,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    collate = partial(collate_llm_batch, pad_token_id=token_ids.pad)
    setup = training_utils.prepare_training(
        accelerator, args, model, params, dataset, collate, tracker_name="train_llm"
    )

    def compute_loss(batch):
        output = setup.model(**batch)
        return output.loss, {"lm_loss": output.lm_loss.item(), "embedding_loss": output.embedding_loss.item()}

    def components(in_place: bool = False) -> dict:
        unwrapped = accelerator.unwrap_model(setup.model)
        llm = trained_llm(unwrapped, in_place=in_place)
        return {"llm": llm, "llm_tokenizer": tokenizer, "mm_adapter": unwrapped.mm_adapter}

    result = training_utils.run_training_loop(
        accelerator, args, setup, compute_loss, training_utils.validate_every(accelerator, args, components)
    )
    summary = training_utils.finish_training(accelerator, args, result, {"model": setup.model}, components)
    if accelerator.is_main_process:
        training_utils.save_trained_components(args, accelerator, **components(in_place=True))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
