"""Shared pieces of the training scripts in ``training/`` (diffusers example style, on accelerate).

One implementation of everything the scripts have in common:

- the common command-line arguments (`add_common_training_args`, `check_common_args`);
- the `Accelerator` with a `ProjectConfiguration`, trackers and seeding (`make_accelerator`);
- checkpoints: rotation under ``--checkpoints_total_limit``, ``--resume_from_checkpoint latest``
  (`save_checkpoint`, `resolve_resume_checkpoint`);
- the training loop (`run_training_loop`): gradient accumulation, clipping, a loss that is not finite stops the run
  naming the step (`check_finite_loss`), checkpointing, logging, exact resumption;
- where components come from (``--pipeline`` / ``--pretrained_model_name_or_path`` / ``--pretrained_<name>``),
  saving an updated pipeline, validation through the pipeline, and a per-process weight digest proving that
  data-parallel replicas ended identical (`write_training_summary`).

Reproducibility: every random draw of a step comes from the global torch RNG re-seeded from ``(seed, optimizer step,
micro-batch, process)`` at the start of each micro-batch, and every random choice of the data from ``(seed, epoch,
index)`` (`EpochShuffleSampler` + the datasets of `diffusers_any2pix.data`). The state of a run is therefore a
function of its step counter, which is what makes ``--resume_from_checkpoint`` reproduce an uninterrupted run
exactly (a dataloader or a tracker drawing from the global RNG cannot shift it).
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import set_seed
from diffusers.utils import BaseOutput
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_SUMMARY_FILE = "training_summary.json"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the optimizer step."""


# ------------------------------------------------------------------------------------------------ arguments


def add_common_training_args(
    parser: argparse.ArgumentParser, learning_rate: float = 1e-4, train_batch_size: int = 4
) -> argparse.ArgumentParser:
    """Adds the arguments every training script shares (names as in diffusers' example scripts).

    Args:
        parser (`argparse.ArgumentParser`): modified in place and returned.
        learning_rate (`float`, defaults to 1e-4): the script's default learning rate.
        train_batch_size (`int`, defaults to 4): the script's default per-process batch size.
    """
    group = parser.add_argument_group("training (common to all scripts)")
    group.add_argument(
        "--output_dir", type=str, required=True, help="Where checkpoints and the trained components go."
    )
    group.add_argument(
        "--pipeline",
        type=str,
        default=None,
        help="A saved InstructAny2PixPipeline folder: source of every component not given explicitly; the output "
        "folder then also becomes a complete, loadable pipeline with the trained components.",
    )
    group.add_argument("--seed", type=int, default=0, help="Seed of all randomness (data sampling, noise, dropout).")
    group.add_argument("--train_batch_size", type=int, default=train_batch_size, help="Batch size per process.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer steps in total; overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by the total batch size.")
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables it).")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the `accelerate config` value.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--cpu", action="store_true", help="Train on the CPU even when an accelerator is present.")
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers: "tensorboard", "wandb", "comet_ml", "all" or "none".',
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=None)
    group.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (oldest go first).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder (path or name in --output_dir), or "latest" for the newest one in --output_dir.',
    )
    group.add_argument(
        "--validation_pipeline",
        type=str,
        default=None,
        help="A saved InstructAny2PixPipeline folder; the trained components are swapped in to render validation "
        "edits (defaults to --pipeline when --validation_instruction is given).",
    )
    group.add_argument("--validation_instruction", type=str, default=None, help='e.g. "add a red circle to [image1]"')
    group.add_argument("--validation_images", type=str, nargs="*", default=[], help="Image files of the instruction.")
    group.add_argument("--validation_audio", type=str, nargs="*", default=[], help="Audio files of the instruction.")
    group.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps (and at the end).")
    group.add_argument("--validation_inference_steps", type=int, default=25)
    return parser


def check_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validates the common arguments (a clear `ValueError` naming the argument) and fills derived defaults."""
    positive = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps"]
    positive += ["max_train_steps", "checkpoints_total_limit", "validation_steps", "validation_inference_steps"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if not args.learning_rate > 0:
        raise ValueError(f"`--learning_rate` must be positive, got {args.learning_rate}.")
    if args.max_grad_norm < 0:
        raise ValueError(f"`--max_grad_norm` must be >= 0, got {args.max_grad_norm}.")
    if args.pipeline is not None and not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise ValueError(f"`--pipeline` {args.pipeline!r} is not a saved pipeline folder (no model_index.json).")
    if args.validation_pipeline is None and args.validation_instruction is not None:
        args.validation_pipeline = args.pipeline
    if args.validation_instruction is not None and args.validation_pipeline is None:
        raise ValueError("`--validation_instruction` needs `--validation_pipeline` (or `--pipeline`).")
    if args.validation_pipeline is not None and args.validation_instruction is None:
        raise ValueError("`--validation_pipeline` needs `--validation_instruction` (and its --validation_images).")
    if args.report_to != "none":
        _check_tracker_installed(args.report_to)
    return args


def _check_tracker_installed(report_to: str) -> None:
    import importlib.util

    packages = {"tensorboard": ["tensorboard", "tensorboardX"], "wandb": ["wandb"], "comet_ml": ["comet_ml"]}
    for tracker in report_to.split(","):
        candidates = packages.get(tracker.strip())
        if candidates and not any(importlib.util.find_spec(name) for name in candidates):
            raise ValueError(
                f"`--report_to {report_to}` needs the `{candidates[0]}` package: pip install {candidates[0]} (or pass "
                "--report_to none)."
            )


def add_data_args(parser: argparse.ArgumentParser, instructions: bool = False) -> argparse.ArgumentParser:
    """Adds the MM-Inst data arguments (REFERENCE.md §5 layout; ShapesWorld writes ``<data_dir>/<split>/...``).

    Args:
        parser (`argparse.ArgumentParser`): modified in place and returned.
        instructions (`bool`, defaults to `False`): also add ``--instruction_file``.
    """
    group = parser.add_argument_group("data (MM-Inst format)")
    group.add_argument(
        "--data_dir",
        type=str,
        required=True,
        help="Dataset root: the media map's `fpath`s (and media paths) are relative to it (the official image_folder).",
    )
    group.add_argument("--split", type=str, default="train", help="Subfolder of the default media map/instructions.")
    group.add_argument("--media_map", type=str, default=None, help="Default: <data_dir>/<split>/media.json.")
    if instructions:
        group.add_argument(
            "--instruction_file", type=str, default=None, help="Default: <data_dir>/<split>/instruction.json."
        )
    return parser


def resolve_data_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the default data paths of `add_data_args` and checks that the files exist."""
    if not os.path.isdir(args.data_dir):
        raise ValueError(f"`--data_dir` {args.data_dir!r} is not a folder.")
    defaults = {"media_map": "media.json", "instruction_file": "instruction.json"}
    for name, file_name in defaults.items():
        if not hasattr(args, name):
            continue
        if getattr(args, name) is None:
            setattr(args, name, os.path.join(args.data_dir, args.split, file_name))
        if not os.path.isfile(getattr(args, name)):
            raise ValueError(f"`--{name}` {getattr(args, name)!r} does not exist.")
    return args


# ------------------------------------------------------------------------------------------------ accelerator


def make_accelerator(args: argparse.Namespace, find_unused_parameters: bool = False) -> Accelerator:
    """The run's `Accelerator` (mixed precision, gradient accumulation, trackers, project folder) plus logging setup
    and global seeding. Multi-process, multi-node, DeepSpeed and FSDP come from ``accelerate launch`` / ``accelerate
    config`` (or ``torchrun``).

    Args:
        args (`argparse.Namespace`): the common arguments.
        find_unused_parameters (`bool`, defaults to `False`): tell DDP that some trained parameters may get no
            gradient in a step (e.g. a projector when a batch has no media).
    """
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        cpu=args.cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    import diffusers
    import transformers

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights under the run's mixed precision (trainable ones stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args: argparse.Namespace, params: list, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the common arguments (``--scale_lr`` multiplies by the total batch size)."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    return torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(args: argparse.Namespace, optimizer, accelerator: Accelerator, max_train_steps: int):
    """diffusers' `get_scheduler`; steps are multiplied by the process count because the prepared scheduler steps
    once per process."""
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )


def total_train_steps(args: argparse.Namespace, num_batches_per_epoch: int) -> tuple[int, int]:
    """``(max_train_steps, num_update_steps_per_epoch)`` from the arguments and the per-process dataloader length."""
    if num_batches_per_epoch < 1:
        raise ValueError(
            f"The dataloader is empty: fewer examples than --train_batch_size ({args.train_batch_size}) per process."
        )
    per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * per_epoch, per_epoch


# ------------------------------------------------------------------------------------------------ data order


class EpochShuffleSampler(Sampler):
    """Yields ``(epoch, index)`` pairs in an order shuffled by ``(seed, epoch)``.

    The epoch travels with each index so datasets can seed their per-sample randomness with it; the order depends on
    nothing else, so every process and every resumed run sees the same permutation (accelerate shards it).

    Args:
        num_examples (`int`): dataset length.
        seed (`int`): shuffling seed.
        shuffle (`bool`, defaults to `True`): shuffle, or keep the dataset order.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        return iter([(self.epoch, int(i)) for i in order])


def seed_step(seed: int, step: int, micro_step: int, process_index: int) -> None:
    """Re-seeds the global torch RNG (all devices) from ``(seed, step, micro_step, process)``."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, micro_step, process_index]).generate_state(1)[0]))


# ------------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        suffix = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(suffix), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """Saves the training state as ``output_dir/checkpoint-<step>``, first removing the oldest checkpoints so that at
    most ``total_limit`` remain afterwards. Call on every process (DeepSpeed saves shards from each)."""
    path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and total_limit is not None:
        existing = [c for c in list_checkpoints(output_dir) if c[1] != path]
        for _, old in existing[: max(0, len(existing) - total_limit + 1)]:
            logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {total_limit}).")
            shutil.rmtree(old)
    if accelerator.is_main_process or accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(path)
        logger.info(f"Saved the training state to {path}.")
    accelerator.wait_for_everyone()
    return path


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> tuple[str | None, int]:
    """The checkpoint folder to resume from and its step; ``(None, 0)`` for a fresh start.

    ``"latest"`` picks the newest ``checkpoint-<step>`` in ``output_dir`` (a fresh start when there is none, so a
    re-launched job just continues); any other value must name an existing checkpoint folder (a path, or a name in
    ``output_dir``).
    """
    if resume_from_checkpoint is None:
        return None, 0
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            return None, 0
        step, path = checkpoints[-1]
        return path, step
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    name = os.path.basename(os.path.normpath(path))
    if (
        not os.path.isdir(path)
        or not name.startswith(CHECKPOINT_PREFIX)
        or not name[len(CHECKPOINT_PREFIX) :].isdigit()
    ):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a checkpoint-<step> folder (nor one in "
            f"{output_dir}); pass 'latest' to continue from the newest one."
        )
    return path, int(name[len(CHECKPOINT_PREFIX) :])


# ------------------------------------------------------------------------------------------------ the loop


def check_finite_loss(accelerator: Accelerator, loss: torch.Tensor, step: int) -> None:
    """Raises `NonFiniteLossError` naming ``step`` when the loss of any process is NaN or infinite.

    The losses of all processes are gathered first, so every process stops together instead of one waiting forever
    in the next gradient all-reduce. The loss is never zeroed or skipped (the official trainer silently zeroed it).
    """
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if not torch.isfinite(losses).all():
        bad = [i for i, value in enumerate(losses.tolist()) if not math.isfinite(value)]
        raise NonFiniteLossError(
            f"The training loss is not finite at step {step} ({losses.tolist()} on processes {bad}); stopping. Lower "
            "--learning_rate, check the data, or resume from an earlier checkpoint."
        )


@dataclass
class TrainingLoopOutput(BaseOutput):
    """Result of `run_training_loop`.

    Args:
        global_step (`int`): optimizer steps done (including those before a resumption).
        max_train_steps (`int`): the planned total.
        logs (`dict`): the last logged values.
    """

    global_step: int
    max_train_steps: int
    logs: dict


@dataclass
class TrainingSetup:
    """Everything `run_training_loop` drives, as returned (prepared) by `prepare_training`.

    Args:
        model (`torch.nn.Module`): the prepared trainable module (its forward must run the trained parameters, so
            data-parallel gradient synchronisation goes through it).
        optimizer, lr_scheduler, dataloader: prepared by accelerate.
        sampler (`EpochShuffleSampler`): the dataloader's sampler.
        params (`list`): the trained parameters (clipped).
        max_train_steps (`int`), num_update_steps_per_epoch (`int`): the schedule.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    dataloader: Any
    sampler: EpochShuffleSampler
    params: list
    max_train_steps: int
    num_update_steps_per_epoch: int


def prepare_training(
    accelerator: Accelerator,
    args: argparse.Namespace,
    model: torch.nn.Module,
    params: list,
    dataset: Dataset,
    collate_fn: Callable | None = None,
    tracker_name: str = "any2pix",
) -> TrainingSetup:
    """Builds the dataloader (with an `EpochShuffleSampler`), the AdamW optimizer over ``params`` and the learning-rate
    schedule, prepares them with ``model`` and starts the trackers.

    Args:
        accelerator (`Accelerator`), args (`argparse.Namespace`): the run.
        model (`torch.nn.Module`): the module whose forward computes with the trained parameters.
        params (`list`): the parameters to train (all must require grad).
        dataset (`Dataset`): indexed by ``(epoch, index)`` pairs.
        collate_fn (`Callable`, *optional*): batch collation.
        tracker_name (`str`): default tracker project name (``--tracker_project_name`` wins).

    Returns:
        `TrainingSetup`
    """
    if not params:
        raise ValueError("Nothing to train: no parameter requires a gradient.")
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
    max_train_steps, per_epoch = total_train_steps(args, batches_per_process)
    optimizer = make_optimizer(args, params, accelerator)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator, max_train_steps)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name or tracker_name, config=config)
    return TrainingSetup(model, optimizer, lr_scheduler, dataloader, sampler, params, max_train_steps, per_epoch)


def run_training_loop(
    accelerator: Accelerator,
    args: argparse.Namespace,
    setup: TrainingSetup,
    compute_loss: Callable[[Any], tuple[torch.Tensor, dict]],
    on_step_end: Callable[[int], None] | None = None,
) -> TrainingLoopOutput:
    """The training loop shared by every script.

    Resumes from ``--resume_from_checkpoint`` (model, optimizer, scheduler and anything registered with
    ``accelerator.register_for_checkpointing`` are restored, and the batches already consumed in the current epoch are
    skipped), then for each micro-batch: re-seeds the RNG (`seed_step`), computes the loss, stops on a non-finite loss
    (`check_finite_loss`), back-propagates, clips and steps under ``accelerator.accumulate``. After each optimizer
    step it logs, calls ``on_step_end(step)`` (EMA, validation) and checkpoints every ``--checkpointing_steps``.

    Args:
        accelerator (`Accelerator`), args (`argparse.Namespace`): the run.
        setup (`TrainingSetup`): from `prepare_training`.
        compute_loss (`Callable`): ``batch -> (loss, logs)``; must run ``setup.model``'s forward.
        on_step_end (`Callable[[int], None]`, *optional*): called with the step after each optimizer step.

    Returns:
        `TrainingLoopOutput`
    """
    resume_path, global_step = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path} (step {global_step}).")
        accelerator.load_state(resume_path)
    elif args.resume_from_checkpoint is not None:
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run.")
    per_epoch, max_train_steps = setup.num_update_steps_per_epoch, setup.max_train_steps
    first_epoch = global_step // per_epoch
    skip_batches = (global_step % per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(max_train_steps / per_epoch)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(setup.sampler)} examples, {num_epochs} epochs, batch {args.train_batch_size} per "
        f"process, {total_batch_size} in total (x{accelerator.num_processes} processes, "
        f"x{args.gradient_accumulation_steps} accumulation), {max_train_steps} optimizer steps *****"
    )
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    logs: dict = {}
    micro_step = 0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        setup.model.train()
        loader = setup.dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(setup.dataloader, skip_batches)
        # accelerate's dataloaders re-set their sampler's epoch from their own pass counter when iterated, which a
        # resumed run (or a fresh skipping loader) starts at 0: set both to the true epoch.
        setup.sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            seed_step(args.seed, global_step, micro_step, accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(setup.model):
                loss, step_logs = compute_loss(batch)
                check_finite_loss(accelerator, loss, global_step + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(setup.params, args.max_grad_norm)
                setup.optimizer.step()
                setup.lr_scheduler.step()
                setup.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            micro_step = 0
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": setup.lr_scheduler.get_last_lr()[0], **step_logs}
            progress.set_postfix(loss=f"{logs['loss']:.4g}")
            accelerator.log(logs, step=global_step)
            if on_step_end is not None:
                on_step_end(global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= max_train_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    return TrainingLoopOutput(global_step=global_step, max_train_steps=max_train_steps, logs=logs)


def validate_every(
    accelerator: Accelerator, args: argparse.Namespace, components: Callable[[], dict]
) -> Callable[[int], None]:
    """An ``on_step_end`` callback running `log_validation` every ``--validation_steps`` with ``components()``."""

    def callback(step: int) -> None:
        if args.validation_steps and step % args.validation_steps == 0:
            log_validation(accelerator, args, step, components)

    return callback


# ------------------------------------------------------------------------------------------------ components


def component_source(args: argparse.Namespace, name: str) -> tuple[str, str | None] | None:
    """Where component ``name`` loads from: ``(path, subfolder)`` or ``None``.

    ``--pretrained_<name>`` (a component folder) wins; else the ``name`` subfolder of ``--pipeline`` or
    ``--pretrained_model_name_or_path`` (an InstructAny2Pix pipeline or a diffusers SD/SDXL model: same layout).
    A local base folder without that subfolder gives ``None``.
    """
    explicit = getattr(args, f"pretrained_{name}", None)
    if explicit:
        return explicit, None
    for base in (getattr(args, "pipeline", None), getattr(args, "pretrained_model_name_or_path", None)):
        if base:
            if os.path.isdir(base) and not os.path.isdir(os.path.join(base, name)):
                continue
            return base, name
    return None


def load_component(args: argparse.Namespace, name: str, loader: Callable[..., Any], required: bool = True, **kwargs):
    """``loader(path, subfolder=..., **kwargs)`` from `component_source`; ``None`` (or a `ValueError` when
    ``required``) when no source holds the component."""
    source = component_source(args, name)
    if source is None:
        if required:
            raise ValueError(
                f"No `{name}`: pass --pretrained_{name}, or a --pipeline / --pretrained_model_name_or_path folder with "
                f"a `{name}` subfolder."
            )
        return None
    path, subfolder = source
    if subfolder is None:
        return loader(path, **kwargs)
    return loader(path, subfolder=subfolder, **kwargs)


def save_trained_components(args: argparse.Namespace, accelerator: Accelerator, **components: Any) -> None:
    """Saves the trained components under ``--output_dir/<name>`` — or, with ``--pipeline``, writes the complete
    pipeline with them swapped in to ``--output_dir`` (loadable with ``InstructAny2PixPipeline.from_pretrained``).
    Main process only."""
    if not accelerator.is_main_process:
        return
    if args.pipeline is not None:
        from .pipeline_instruct_any2pix import InstructAny2PixPipeline

        pipeline = InstructAny2PixPipeline.from_pretrained(args.pipeline, **components)
        pipeline.save_pretrained(args.output_dir)
        logger.info(f"Saved the updated pipeline to {args.output_dir}.")
        return
    for name, component in components.items():
        component.save_pretrained(os.path.join(args.output_dir, name))
        logger.info(f"Saved `{name}` to {os.path.join(args.output_dir, name)}.")


@torch.no_grad()
def log_validation(
    accelerator: Accelerator, args: argparse.Namespace, step: int, components: Callable[[], dict]
) -> list:
    """Renders ``--validation_instruction`` with ``--validation_pipeline`` and the trained components swapped in;
    saves the images to ``--output_dir/validation/step-<step>-<i>.png`` and logs them to the trackers.

    Args:
        accelerator (`Accelerator`), args (`argparse.Namespace`): the run.
        step (`int`): the optimizer step, for file names and trackers.
        components (`Callable[[], dict]`): returns the pipeline components to swap in (called on the main process
            only, so e.g. merging LoRA weights happens once).

    Returns:
        `list[PIL.Image.Image]` (empty on processes other than the main one).
    """
    if not accelerator.is_main_process or args.validation_instruction is None:
        return []
    from .pipeline_instruct_any2pix import InstructAny2PixPipeline

    logger.info(f"Validation at step {step}: {args.validation_instruction!r}")
    components = components()
    modes = {name: module.training for name, module in components.items() if isinstance(module, torch.nn.Module)}
    for name in modes:
        components[name].eval()
    try:
        pipeline = InstructAny2PixPipeline.from_pretrained(args.validation_pipeline, **components)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(accelerator.device)
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        images = pipeline(
            args.validation_instruction,
            images=list(args.validation_images),
            audio=list(args.validation_audio),
            num_inference_steps=args.validation_inference_steps,
            generator=generator,
            on_invalid_answer="use_base",
        ).images
    finally:
        for name, mode in modes.items():
            components[name].train(mode)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"step-{step:06d}-{i}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=args.validation_instruction) for image in images]})
    return images


# ------------------------------------------------------------------------------------------------ summary


def parameters_digest(modules: dict[str, torch.nn.Module]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every trainable parameter of ``modules``."""
    digest = hashlib.sha256()
    for module_name in sorted(modules):
        for name, param in modules[module_name].named_parameters():
            if not param.requires_grad:
                continue
            tensor = param.detach().to("cpu").contiguous()
            digest.update(f"{module_name}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-d too
    return digest.hexdigest()


def write_training_summary(
    accelerator: Accelerator, args: argparse.Namespace, result: TrainingLoopOutput, modules: dict[str, torch.nn.Module]
) -> dict:
    """Gathers every process's `parameters_digest` and writes ``--output_dir/training_summary.json`` (steps,
    processes, digests); raises `RuntimeError` when data-parallel replicas ended with different weights.

    Args:
        accelerator (`Accelerator`), args (`argparse.Namespace`), result (`TrainingLoopOutput`): the run.
        modules (`dict[str, torch.nn.Module]`): the trained modules (unwrapped or wrapped).

    Returns:
        `dict`: the summary written.
    """
    digest = parameters_digest({name: accelerator.unwrap_model(m) for name, m in modules.items()})
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=accelerator.device)
    gathered = accelerator.gather(local).reshape(accelerator.num_processes, -1).cpu()
    digests = [bytes(row.tolist()).hex() for row in gathered]
    summary = {
        "global_step": result.global_step,
        "max_train_steps": result.max_train_steps,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "parameter_digests": digests,
        "final_logs": result.logs,
    }
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, TRAINING_SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    if len(set(digests)) != 1:
        raise RuntimeError(f"The processes ended with different weights (digests {digests}); data parallelism broke.")
    return summary


def finish_training(
    accelerator: Accelerator,
    args: argparse.Namespace,
    result: TrainingLoopOutput,
    modules: dict[str, torch.nn.Module],
    components: Callable[[], dict] | None = None,
) -> dict:
    """Final validation with ``components()`` (when ``--validation_instruction`` is set and the last step was not
    just validated), `write_training_summary` over ``modules`` and ``accelerator.end_training()``."""
    already_validated = args.validation_steps and result.global_step % args.validation_steps == 0
    if args.validation_instruction is not None and components is not None and not already_validated:
        log_validation(accelerator, args, result.global_step, components)
    summary = write_training_summary(accelerator, args, result, modules)
    accelerator.end_training()
    return summary
