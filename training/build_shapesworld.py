#!/usr/bin/env python
"""Rebuild the embedded ShapesWorld InstructAny2Pix from scratch with the repository's own scripts.

One command runs the whole chain (shared/DESIGN.md §6) and writes a complete `InstructAny2PixPipeline` to
``--output_dir`` (the repository root for the embedded default)::

    python training/build_shapesworld.py --output_dir . --work_dir build/shapesworld

Stages, each a plain command of this repository (logged with its wall time to ``<work_dir>/build_log.json``):

1. ``data``: ``python -m diffusers_any2pix.shapes.generate`` — scenes, sounds and instructions (train/val/test).
2. ``imagebind``: ``training/train_imagebind.py`` — a small ImageBind bound by InfoNCE (text and audio to images).
3. ``features``: ``training/prepare_data.py`` — ImageBind vectors of every medium and caption.
4. ``vae`` then ``unet``: ``training/train_decoder.py --mode vae``, then the UNet: ``--mode text_unet`` (the official
   decoder layout: a UNet reading the caption through a CLIP text encoder, with the ImageBind tokenizer's one token
   per word, plus an IP-Adapter for the ImageBind embedding) when ``unet.json`` is a text-to-image UNet and
   ``text_encoder.json`` is present, or ``--mode imagebind_unet`` for an ImageBind-native ``unet.json``; then,
   when ``build.json`` has a ``verifier`` section, ``verifier``: ``training/train_edit_verifier.py`` — the edit
   verifier the pipeline's ``edit_verifier_weight`` ranks answers with, reading the inputs through the attribute
   heads the imagebind stage saved (as the llm stage does).
5. ``llm``, ``reader``, ``llm_2`` then ``prior``: ``training/train_llm.py --llm_config`` (a small Llama and a
   word-level tokenizer, from scratch); with attribute tokens (``"attribute_reader": true``),
   ``training/fit_attribute_reader.py`` fits the adapter's reader again to the final ImageBind's embeddings of the
   training scenes, keeping its reads of object images and sounds; when ``build.json`` has an ``llm_2`` section, a
   second LLM of the same recipe with another seed (``seed_offset``, default 1), on the first LLM's tokenizer and
   reading media through the fitted reader, for the pipeline's ``llm_ensemble_weight``;
   ``training/train_prior.py --prior_config``.
6. ``pipeline``: the components assembled into one pipeline with the ShapesWorld edit settings, saved as safetensors.
7. ``evaluate``: ``python -m diffusers_any2pix.shapes.evaluate`` on the held-out test split (with baselines).

The decoder lane (4) and the language lane (5) are independent and run side by side, one CPU thread each (unless
``--no_parallel``): on a 2-core machine that is faster than two threads each one after the other, because these
small models do not scale across threads. A finished stage is skipped when the command is run again (its output
exists) and training stages resume from their last checkpoint, so an interrupted build continues; ``--force STAGE ...``
redoes stages and everything that depends on them. Stage 6 is this script's ``assemble`` sub-command.

Model sizes and step counts live in ``training/configs/shapesworld/`` (one JSON per component, and ``build.json``
with the steps, batch sizes and learning rates); pass ``--config_dir`` to build a variant.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG_DIR = os.path.join(REPO, "training", "configs", "shapesworld")

# stage → the stages whose outputs it reads
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "data": (),
    "imagebind": (),
    "features": ("data", "imagebind"),
    "vae": ("features",),
    "unet": ("vae",),
    "verifier": ("features",),
    "llm": ("features",),
    "reader": ("llm",),
    "llm_2": ("llm", "reader"),
    "prior": ("features",),
    "pipeline": ("imagebind", "unet", "verifier", "llm", "reader", "llm_2", "prior"),
    "evaluate": ("pipeline",),
}
STAGES = tuple(DEPENDENCIES)
DECODER_LANE = ("vae", "unet", "verifier")
LANGUAGE_LANE = ("llm", "reader", "llm_2", "prior")


@dataclass
class Stage:
    """One step of the build: a command and the path whose existence says it is done."""

    name: str
    command: list[str]
    done_marker: str
    threads: Optional[int] = None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where the finished pipeline is saved (e.g. '.')")
    parser.add_argument("--work_dir", default="build/shapesworld", help="data, stage outputs and logs")
    parser.add_argument("--config_dir", default=DEFAULT_CONFIG_DIR, help="component configs and build.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="run only these")
    parser.add_argument("--force", nargs="*", default=[], choices=STAGES, help="redo these and their dependents")
    parser.add_argument("--no_parallel", dest="parallel", action="store_false", help="one stage at a time")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of a stage running alone")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for name in ("build.json", "vae.json", "unet.json", "llm.json", "prior.json", "edit_defaults.json"):
        if not os.path.isfile(os.path.join(args.config_dir, name)):
            parser.error(f"--config_dir {args.config_dir} has no {name}.")
    if text_decoder(args.config_dir) and not os.path.isfile(os.path.join(args.config_dir, "text_encoder.json")):
        parser.error(f"--config_dir {args.config_dir}: unet.json is a text-to-image UNet but there is no text_encoder.json.")
    return args


def text_decoder(config_dir: str) -> bool:
    """Whether ``unet.json`` is a text-to-image UNet (trained with a text encoder) rather than an ImageBind-native one."""
    return _load_json(os.path.join(config_dir, "unet.json")).get("encoder_hid_dim_type") != "image_proj"


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _script(name: str) -> str:
    return os.path.join(REPO, "training", name)


def _options(settings: dict) -> list[str]:
    """``{"max_train_steps": 10, "use_ema": true}`` → ``["--max_train_steps", "10", "--use_ema"]``."""
    argv = []
    for key, value in settings.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def build_stages(args: argparse.Namespace) -> dict[str, Stage]:
    """The command of every stage, from ``--config_dir``."""
    settings = _load_json(os.path.join(args.config_dir, "build.json"))
    # Absolute paths: the stages run with the repository as their working directory.
    work, cfg, py = os.path.abspath(args.work_dir), os.path.abspath(args.config_dir), sys.executable
    output_dir = os.path.abspath(args.output_dir)
    data, imagebind = os.path.join(work, "data"), os.path.join(work, "imagebind")
    common = ["--seed", str(args.seed), "--report_to", "none"]
    maps = [os.path.join(data, split, "media.json") for split in ("train", "val", "test")]
    text_map = os.path.join(data, "train", "text_media.json")
    out = {name: os.path.join(work, name) for name in STAGES}

    # `"attribute_reader": true` in llm: the attribute heads the imagebind stage saved beside its encoder.
    reads_attributes = settings["llm"].get("attribute_reader") is True
    if reads_attributes:
        settings["llm"] = {**settings["llm"], "attribute_reader": imagebind}

    def training_stage(name: str, script: str, component: str, model_args: list[str], seed: int = args.seed) -> Stage:
        """A training script on the generated data, saving ``component`` in ``<work_dir>/<name>``."""
        command = [py, _script(script), *model_args, "--data_dir", data, "--output_dir", out[name]]
        command += ["--seed", str(seed), "--report_to", "none"]
        return Stage(name, command + _options(settings[name]), os.path.join(out[name], component, "config.json"))

    verifies = "verifier" in settings
    second_llm = "llm_2" in settings
    if second_llm:  # the llm stage's recipe, another seed, the first LLM's tokenizer and the fitted reader
        seed_offset = settings["llm_2"].get("seed_offset", 1)
        overrides = {k: v for k, v in settings["llm_2"].items() if k != "seed_offset"}
        settings["llm_2"] = {**settings["llm"], **overrides}
        if reads_attributes:
            settings["llm_2"]["attribute_reader"] = os.path.join(out["reader"], "attribute_heads.safetensors")

    stages = [
        Stage(
            "data",
            [py, "-m", "diffusers_any2pix.shapes.generate", "--out", data, "--seed", str(args.seed), "--no_progress"]
            + _options(settings["data"]),
            os.path.join(data, "dataset_info.json"),
        ),
        Stage(
            "imagebind",
            [py, _script("train_imagebind.py"), "--output_dir", imagebind, *common] + _options(settings["imagebind"]),
            os.path.join(imagebind, "image_encoder", "config.json"),
        ),
        Stage(
            "features",
            [
                py, _script("prepare_data.py"), "--pretrained_image_encoder", os.path.join(imagebind, "image_encoder"),
                "--data_dir", data, "--media_map", *maps, "--text_media_map", text_map,
                "--imagebind_tokenizer", os.path.join(imagebind, "imagebind_tokenizer"), "--no_progress",
            ]  # fmt: skip
            + _options(settings.get("features", {})),
            text_map,
        ),
        training_stage("vae", "train_decoder.py", "vae", ["--mode", "vae", "--vae_config", os.path.join(cfg, "vae.json")]),
        training_stage(
            "unet",
            "train_decoder.py",
            "unet",
            (
                ["--mode", "text_unet", "--text_encoder_config", os.path.join(cfg, "text_encoder.json"),
                 "--pretrained_tokenizer", os.path.join(imagebind, "imagebind_tokenizer")]
                if text_decoder(cfg)
                else ["--mode", "imagebind_unet"]
            )
            + ["--unet_config", os.path.join(cfg, "unet.json"), "--pretrained_vae", os.path.join(out["vae"], "vae")],
        ),  # fmt: skip
        *(
            [training_stage("verifier", "train_edit_verifier.py", "edit_verifier", ["--attribute_reader", imagebind])]
            if verifies
            else []
        ),
        training_stage("llm", "train_llm.py", "llm", ["--llm_config", os.path.join(cfg, "llm.json")]),
        *(
            [training_stage(
                "llm_2", "train_llm.py", "llm",
                ["--llm_config", os.path.join(cfg, "llm.json"),
                 "--pretrained_llm_tokenizer", os.path.join(out["llm"], "llm_tokenizer")],
                seed=args.seed + seed_offset,
            )]
            if second_llm
            else []
        ),  # fmt: skip
        Stage(
            "reader",
            [
                py, _script("fit_attribute_reader.py"),
                "--pretrained_image_encoder", os.path.join(imagebind, "image_encoder"),
                "--pretrained_mm_adapter", os.path.join(out["llm"], "mm_adapter"),
                "--data_dir", data, "--output_dir", out["reader"],
                "--save_adapter", os.path.join(out["reader"], "mm_adapter"), "--seed", str(args.seed),
            ]  # fmt: skip
            + _options(settings.get("reader", {})),
            os.path.join(out["reader"], "mm_adapter", "config.json"),
        ),
        training_stage(
            "prior", "train_prior.py", "prior", ["--prior_config", os.path.join(cfg, "prior.json"), "--text_media_map", text_map]
        ),
        Stage(
            "pipeline",
            [
                py, os.path.abspath(__file__), "assemble", "--work_dir", work, "--output_dir", output_dir,
                "--edit_defaults", os.path.join(cfg, "edit_defaults.json"),
                # the reader stage's adapter (its attribute reader fitted again) when the build has that stage
                "--mm_adapter", os.path.join(out["reader" if reads_attributes else "llm"], "mm_adapter"),
                *(["--llm_2", out["llm_2"]] if second_llm else []),
                *(["--edit_verifier", os.path.join(out["verifier"], "edit_verifier")] if verifies else []),
            ]  # fmt: skip
            + _options(settings.get("pipeline", {})),
            os.path.join(work, "pipeline.done"),
        ),
        Stage(
            "evaluate",
            [
                py, "-m", "diffusers_any2pix.shapes.evaluate", "--model", output_dir, "--data", data,
                "--split", "test", "--probe", os.path.join(work, "probe"), "--seed", str(args.seed), "--no_progress",
                "--output", os.path.join(work, "evaluation_test.json"),
            ]  # fmt: skip
            + _options(settings.get("evaluate", {})),
            os.path.join(work, "evaluation_test.json"),
        ),
    ]
    # Without attribute tokens there is no reader to fit: the pipeline takes the llm stage's adapter. (The llm_2
    # and verifier stages exist only with their sections in build.json.)
    return {stage.name: stage for stage in stages if stage.name != "reader" or reads_attributes}


def assemble(
    work_dir: str,
    edit_defaults_file: str,
    output_dir: str,
    save_dtype: str = "float32",
    mm_adapter: Optional[str] = None,
    llm_2: Optional[str] = None,
    edit_verifier: Optional[str] = None,
) -> None:
    """Loads the trained components of ``work_dir`` into one pipeline and saves it to ``output_dir``, its weights in
    ``save_dtype`` (``float16`` halves the size; `InstructAny2PixPipeline.from_pretrained` loads in float32).
    ``mm_adapter``: the adapter folder to use (default: the llm stage's). ``llm_2``: a second `train_llm.py` output
    folder (its ``llm`` and ``mm_adapter``, trained on the llm stage's tokenizer) for `llm_ensemble_weight`.
    ``edit_verifier``: a `train_edit_verifier.py` component folder for `edit_verifier_weight`."""
    import torch

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPTextModel

    from diffusers_any2pix import InstructAny2PixPipeline
    from diffusers_any2pix.models.edit_verifier import EditVerifier
    from diffusers_any2pix.models.imagebind import ImageBindModel
    from diffusers_any2pix.models.ip_adapter import ImageBindIPAdapter
    from diffusers_any2pix.models.mm_adapter import MultimodalAdapter
    from diffusers_any2pix.models.prior import Any2PixPrior

    def path(stage: str, component: str) -> str:
        return os.path.join(work_dir, stage, component)

    adapter = mm_adapter if mm_adapter is not None else path("llm", "mm_adapter")
    decoder = {}
    if os.path.isdir(path("unet", "text_encoder")):  # a text-to-image decoder (train_decoder.py --mode text_unet)
        decoder = {
            "text_encoder": CLIPTextModel.from_pretrained(path("unet", "text_encoder")),
            "tokenizer": AutoTokenizer.from_pretrained(path("unet", "tokenizer")),
            "ip_adapter": ImageBindIPAdapter.from_pretrained(path("unet", "ip_adapter")),
        }
    pipeline = InstructAny2PixPipeline(
        image_encoder=ImageBindModel.from_pretrained(path("imagebind", "image_encoder")),
        llm=AutoModelForCausalLM.from_pretrained(path("llm", "llm")),
        llm_tokenizer=AutoTokenizer.from_pretrained(path("llm", "llm_tokenizer")),
        mm_adapter=MultimodalAdapter.from_pretrained(adapter),
        prior=Any2PixPrior.from_pretrained(path("prior", "prior")),
        vae=AutoencoderKL.from_pretrained(path("vae", "vae")),
        unet=UNet2DConditionModel.from_pretrained(path("unet", "unet")),
        scheduler=DDIMScheduler.from_pretrained(path("unet", "scheduler")),
        # ImageBind's text tokenizer, so the pipeline can read captions with ImageBind (`llm_rerank_weight`).
        imagebind_tokenizer=AutoTokenizer.from_pretrained(path("imagebind", "imagebind_tokenizer")),
        edit_defaults=_load_json(edit_defaults_file),
        **decoder,
        **_second_llm(llm_2, path("llm", "llm_tokenizer")),
        edit_verifier=EditVerifier.from_pretrained(edit_verifier) if edit_verifier is not None else None,
    )
    # Only the pipeline's own folders are replaced; the rest of --output_dir (e.g. the repository) is left alone.
    for name in list(pipeline.components) + ["model_index.json"]:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
    pipeline.to(getattr(torch, save_dtype)).save_pretrained(output_dir, safe_serialization=True)
    size = sum(
        os.path.getsize(os.path.join(root, f))
        for name in pipeline.components
        for root, _, files in os.walk(os.path.join(output_dir, name))
        for f in files
    )
    print(f"Saved the ShapesWorld pipeline to {output_dir} ({size / 2**20:.1f} MiB).")
    with open(os.path.join(work_dir, "pipeline.done"), "w") as f:
        f.write(f"{size}\n")


def _second_llm(folder: Optional[str], llm_tokenizer: str) -> dict:
    """``llm_2`` and ``mm_adapter_2`` from a `train_llm.py` output folder (none without one); refuses, by name, a
    second LLM whose tokenizer is not the first's (the pipeline scores both LLMs' answers with one tokenizer)."""
    if folder is None:
        return {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffusers_any2pix.models.mm_adapter import MultimodalAdapter

    ours = AutoTokenizer.from_pretrained(os.path.join(folder, "llm_tokenizer")).get_vocab()
    if ours != AutoTokenizer.from_pretrained(llm_tokenizer).get_vocab():
        raise ValueError(
            f"--llm_2 {folder!r}: its llm_tokenizer differs from {llm_tokenizer!r}; train it with "
            "`train_llm.py --pretrained_llm_tokenizer` set to the first LLM's tokenizer."
        )
    return {
        "llm_2": AutoModelForCausalLM.from_pretrained(os.path.join(folder, "llm")),
        "mm_adapter_2": MultimodalAdapter.from_pretrained(os.path.join(folder, "mm_adapter")),
    }


class BuildLog:
    """``<work_dir>/build_log.json``: command, wall time and threads of every stage run."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, "build_log.json")
        self.lock = threading.Lock()

    def record(self, stage: Stage, seconds: float) -> None:
        with self.lock:
            # Re-read: another build process (e.g. one re-running a single stage) may have written meanwhile.
            entries = _load_json(self.path) if os.path.isfile(self.path) else {}
            entries[stage.name] = {"seconds": round(seconds, 1), "threads": stage.threads, "command": stage.command}
            entries["total_seconds"] = round(sum(v["seconds"] for k, v in entries.items() if k in DEPENDENCIES), 1)
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(entries, f, indent=1)


def run_stage(stage: Stage, log: BuildLog, logs_dir: str) -> None:
    env = dict(os.environ)
    if stage.threads is not None:
        env.update(OMP_NUM_THREADS=str(stage.threads), MKL_NUM_THREADS=str(stage.threads))
    log_file = os.path.join(logs_dir, f"{stage.name}.log")
    print(f"[build] {stage.name}: started ({' '.join(stage.command)}) → {log_file}", flush=True)
    start = time.perf_counter()
    with open(log_file, "w") as f:
        status = subprocess.run(stage.command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    seconds = time.perf_counter() - start
    if status != 0 or not os.path.exists(stage.done_marker):
        raise RuntimeError(f"Stage {stage.name!r} failed (exit status {status}); see {log_file}.")
    log.record(stage, seconds)
    print(f"[build] {stage.name}: done in {seconds / 60:.1f} min", flush=True)


def _dependents(names: list[str]) -> set[str]:
    redo = set(names)
    for stage in STAGES:  # STAGES is in dependency order
        if any(dep in redo for dep in DEPENDENCIES[stage]):
            redo.add(stage)
    return redo


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["assemble"]:  # the `pipeline` stage
        parser = argparse.ArgumentParser(prog="build_shapesworld.py assemble", description=assemble.__doc__)
        parser.add_argument("--work_dir", required=True)
        parser.add_argument("--edit_defaults", required=True, help="JSON of the pipeline's edit_defaults")
        parser.add_argument("--output_dir", required=True)
        parser.add_argument("--save_dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        parser.add_argument("--mm_adapter", default=None, help="adapter folder (default: <work_dir>/llm/mm_adapter)")
        parser.add_argument("--llm_2", default=None, help="a second train_llm.py output folder (llm_ensemble_weight)")
        parser.add_argument("--edit_verifier", default=None, help="an EditVerifier folder (edit_verifier_weight)")
        options = parser.parse_args(argv[1:])
        assemble(
            options.work_dir, options.edit_defaults, options.output_dir, options.save_dtype, options.mm_adapter,
            options.llm_2, options.edit_verifier,
        )
        return 0
    args = parse_args(argv)
    stages = build_stages(args)
    os.makedirs(args.work_dir, exist_ok=True)
    logs_dir = os.path.join(args.work_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    for name in _dependents(args.force) & set(stages):
        if os.path.exists(stages[name].done_marker) and not args.dry_run:
            os.remove(stages[name].done_marker)
    todo = [n for n in STAGES if n in args.stages and n in stages and not os.path.exists(stages[n].done_marker)]
    if args.dry_run:
        for name in todo:
            print(f"{name}: {' '.join(stages[name].command)}")
        return 0
    log = BuildLog(args.work_dir)
    first_lane, last_lane = STAGES.index(DECODER_LANE[0]), STAGES.index(LANGUAGE_LANE[-1])
    before = [n for n in todo if STAGES.index(n) < first_lane]
    after = [n for n in todo if STAGES.index(n) > last_lane]
    lanes = [[n for n in lane if n in todo] for lane in (DECODER_LANE, LANGUAGE_LANE)]
    parallel = args.parallel and all(lanes)
    for name in todo:
        stages[name].threads = 1 if parallel and name not in before + after else args.threads
    start = time.perf_counter()
    for name in before:
        run_stage(stages[name], log, logs_dir)
    if parallel:
        errors = []

        def run_lane(lane: list[str]) -> None:
            try:
                for stage_name in lane:
                    run_stage(stages[stage_name], log, logs_dir)
            except Exception as error:  # re-raised once both lanes have stopped
                errors.append(error)

        threads = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    else:
        for name in lanes[0] + lanes[1]:
            run_stage(stages[name], log, logs_dir)
    for name in after:
        run_stage(stages[name], log, logs_dir)
    print(f"[build] finished in {(time.perf_counter() - start) / 60:.1f} min; stage times in {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
