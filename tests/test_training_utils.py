"""The shared training machinery (`diffusers_any2pix.training_utils`): arguments, checkpoint rotation and resumption,
the non-finite-loss guard, data order, exact resumption of the shared loop, component sources, weight digests."""

import argparse
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from diffusers_any2pix import training_utils
from diffusers_any2pix.training_utils import (
    EpochShuffleSampler,
    NonFiniteLossError,
    add_common_training_args,
    check_common_args,
    check_finite_loss,
    component_source,
    list_checkpoints,
    make_accelerator,
    parameters_digest,
    prepare_training,
    resolve_resume_checkpoint,
    run_training_loop,
    save_checkpoint,
    seed_step,
)


def _args(output_dir, *extra: str) -> argparse.Namespace:
    parser = add_common_training_args(argparse.ArgumentParser())
    return check_common_args(parser.parse_args(["--output_dir", str(output_dir), "--report_to", "none", *extra]))


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--checkpoints_total_limit", "0"], "`--checkpoints_total_limit` must be a positive integer"),
        (["--max_train_steps", "0"], "`--max_train_steps` must be a positive integer"),
        (["--learning_rate", "0"], "`--learning_rate` must be positive"),
        (["--lr_warmup_steps", "-1"], "`--lr_warmup_steps` must be >= 0"),
        (["--validation_instruction", "add [image1]"], "needs `--validation_pipeline`"),
        (["--pipeline", "/nonexistent"], "is not a saved pipeline folder"),
    ],
)
def test_common_args_are_validated(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, *extra)


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    parser = add_common_training_args(argparse.ArgumentParser())
    args = parser.parse_args(["--output_dir", str(tmp_path)])
    assert args.report_to == "tensorboard"  # diffusers' default
    with pytest.raises(ValueError, match="needs the `tensorboard` package: pip install tensorboard"):
        check_common_args(args)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resolve_resume_checkpoint(tmp_path):
    assert resolve_resume_checkpoint(str(tmp_path), None) == (None, 0)
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == (None, 0)  # nothing yet: a fresh start
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == (str(tmp_path / "checkpoint-10"), 10)
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-9") == (str(tmp_path / "checkpoint-9"), 9)
    assert resolve_resume_checkpoint("/elsewhere", str(tmp_path / "checkpoint-2")) == (
        str(tmp_path / "checkpoint-2"),
        2,
    )
    with pytest.raises(ValueError, match="'checkpoint-3' is not a checkpoint-<step> folder"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-3")
    with pytest.raises(ValueError, match="is not a checkpoint-<step> folder"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-final")


def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    args = _args(tmp_path, "--cpu")
    accelerator = make_accelerator(args)
    model, optimizer = accelerator.prepare(
        torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1)
    )
    for step in (2, 4, 6, 8):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [6, 8]
    assert os.path.isfile(tmp_path / "checkpoint-8" / "optimizer.bin")
    save_checkpoint(accelerator, str(tmp_path), 10, total_limit=None)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [6, 8, 10]


# ------------------------------------------------------------------------------------------------ guard, order, seeds


def test_non_finite_loss_raises_with_the_step(tmp_path):
    accelerator = make_accelerator(_args(tmp_path, "--cpu"))
    check_finite_loss(accelerator, torch.tensor(1.5), 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLossError, match="not finite at step 7"):
            check_finite_loss(accelerator, torch.tensor(bad), 7)
    assert issubclass(NonFiniteLossError, RuntimeError)


def test_epoch_shuffle_sampler():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert [e for e, _ in first] == [0] * 10 and sorted(i for _, i in first) == list(range(10))
    assert first == list(EpochShuffleSampler(10, seed=3)) and first != list(EpochShuffleSampler(10, seed=4))
    sampler.set_epoch(1)
    second = list(sampler)
    assert [e for e, _ in second] == [1] * 10 and [i for _, i in second] != [i for _, i in first]
    assert [i for _, i in EpochShuffleSampler(4, seed=0, shuffle=False)] == [0, 1, 2, 3]


def test_seed_step_depends_on_every_coordinate():
    def draw(*coords):
        seed_step(*coords)
        return torch.rand(3)

    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    reference = draw(0, 5, 1, 0)
    for other in [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)]:
        assert not torch.equal(reference, draw(*other))


# ------------------------------------------------------------------------------------------------ the loop


class _NoisyRegression(Dataset):
    """(x, y) pairs whose noise is drawn from (epoch, index), as the package's datasets do."""

    def __len__(self):
        return 5

    def __getitem__(self, item):
        epoch, index = item
        rng = np.random.default_rng([epoch, index])
        x = torch.tensor(rng.standard_normal(4), dtype=torch.float32)
        return {"x": x, "y": x.sum(0, keepdim=True) + float(rng.standard_normal())}


def _train(output_dir, *extra: str) -> tuple[dict, torch.nn.Module]:
    args = _args(output_dir, "--cpu", "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *extra)
    accelerator = make_accelerator(args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    setup = prepare_training(accelerator, args, model, list(model.parameters()), _NoisyRegression())

    def compute_loss(batch):
        return torch.nn.functional.mse_loss(setup.model(batch["x"]), batch["y"]), {}

    result = run_training_loop(accelerator, args, setup, compute_loss)
    assert setup.num_update_steps_per_epoch == 2  # 3 batches, accumulation 2: the last window has one batch
    return {"steps": result.global_step}, accelerator.unwrap_model(setup.model)


def test_resuming_reproduces_an_uninterrupted_run_across_epochs(tmp_path):
    common = ("--max_train_steps", "5", "--checkpointing_steps", "3", "--learning_rate", "0.1")
    result, uninterrupted = _train(tmp_path / "a", *common)
    assert result["steps"] == 5
    # Interrupted after step 3 (mid-epoch 1, inside an accumulation window's data order): resume from it.
    os.makedirs(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    result, resumed = _train(tmp_path / "b", *common, "--resume_from_checkpoint", "latest")
    assert result["steps"] == 5
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # Without resuming, the second run restarts from step 0 and ends elsewhere (the comparison above can fail).
    _, fresh = _train(tmp_path / "c", "--max_train_steps", "2", "--checkpointing_steps", "3", "--learning_rate", "0.1")
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), fresh.parameters()))


# ------------------------------------------------------------------------------------------------ components


def test_component_source_priority(tmp_path):
    (tmp_path / "pipe" / "prior").mkdir(parents=True)
    args = argparse.Namespace(
        pipeline=str(tmp_path / "pipe"), pretrained_model_name_or_path=None, pretrained_prior=None
    )
    assert component_source(args, "prior") == (str(tmp_path / "pipe"), "prior")
    assert component_source(args, "unet") is None  # a local folder without that subfolder
    args.pretrained_prior = "my/prior"
    assert component_source(args, "prior") == ("my/prior", None)
    args = argparse.Namespace(pipeline=None, pretrained_model_name_or_path="org/sdxl")
    assert component_source(args, "unet") == ("org/sdxl", "unet")  # a Hub id: the subfolder is not checked locally
    with pytest.raises(ValueError, match="No `unet`: pass --pretrained_unet"):
        training_utils.load_component(argparse.Namespace(pipeline=None), "unet", lambda *a, **k: None)


def test_parameters_digest_tracks_trainable_weights_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    reference = parameters_digest({"m": model})
    assert parameters_digest({"m": model}) == reference
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert parameters_digest({"m": model}) == reference
    with torch.no_grad():
        model[0].bias[0] += 1e-6
    assert parameters_digest({"m": model}) != reference
