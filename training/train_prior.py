#!/usr/bin/env python
"""Train the InstructAny2Pix refinement prior on (condition → image embedding) pairs.

The prior turns the LLM's generation embedding into one that looks like the ImageBind embedding of a real image
(shared/REFERENCE.md §3). The official release ships only its forward pass; this script trains it with the
objective of `Any2PixPrior.forward_train` (L1 to the clean target from the exact 11-token sequence inference runs,
with condition dropout so classifier-free guidance works) on three kinds of pairs built from ImageBind features:

- text → image (``--text_to_image_pairs``): the ImageBind text vector of a caption → the image it describes;
- audio → image (and any explicit pair) from ``--pairs_file``;
- noise-corrupted image → clean image (``--corrupted_image_pairs``): the official DDPM noising
  ``10·add_noise(target/10, ε, t)`` on SDXL's schedule, with the VIDEO source modality the pipeline uses.

Example (ShapesWorld; features from prepare_data.py)::

    accelerate launch training/train_prior.py --pipeline path/to/pipeline \\
        --data_dir data/shapes --text_media_map data/shapes/train/text_media.json \\
        --text_to_image_pairs --corrupted_image_pairs --output_dir out/prior --max_train_steps 2000
"""

import argparse
import sys

from diffusers import DDPMScheduler

from diffusers_any2pix.data import (
    MODALITY_NAMES,
    FeatureStore,
    PriorPairsDataset,
    default_prior_pairs,
    read_prior_pairs,
)
from diffusers_any2pix.models.prior import DEFAULT_INPUT_NORM, DEFAULT_SCORE, Any2PixPrior
from diffusers_any2pix import training_utils


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_prior", type=str, default=None, help="A prior folder to fine-tune.")
    model.add_argument(
        "--prior_config",
        type=str,
        default=None,
        help="An Any2PixPrior config.json (file or folder) to train from scratch; the default is to fine-tune the "
        "--pipeline's prior.",
    )
    training_utils.add_data_args(parser)
    pairs = parser.add_argument_group("pairs")
    pairs.add_argument("--text_media_map", type=str, default=None, help="Media map of caption text vectors.")
    pairs.add_argument("--text_to_image_pairs", action="store_true", help="Caption text vector → its image.")
    pairs.add_argument("--corrupted_image_pairs", action="store_true", help="Noise-corrupted image → clean image.")
    pairs.add_argument(
        "--pairs_file",
        type=str,
        default=None,
        help='JSON list of {"source": caption, "source_modality": "audio"|"text"|"image"|"video", "target": caption}.',
    )
    pairs.add_argument("--corruption_source_modality", type=str, default="video", choices=sorted(MODALITY_NAMES))
    pairs.add_argument(
        "--max_corruption_timestep", type=int, default=1000, help="Corruption timesteps are drawn from [0, this)."
    )
    objective = parser.add_argument_group("objective")
    objective.add_argument("--condition_dropout_prob", type=float, default=0.1, help="Unconditional samples, for CFG.")
    objective.add_argument("--score", type=float, default=DEFAULT_SCORE, help="Quality score of the training pairs.")
    objective.add_argument(
        "--input_norm", type=float, default=DEFAULT_INPUT_NORM, help="Condition norm (as inference)."
    )
    objective.add_argument("--target_norm", type=float, default=20.0, help="Norm of the clean targets.")
    training_utils.add_common_training_args(parser, learning_rate=1e-4, train_batch_size=32)
    args = training_utils.check_common_args(parser.parse_args(argv))
    training_utils.resolve_data_paths(args)
    if not (args.text_to_image_pairs or args.corrupted_image_pairs or args.pairs_file):
        raise ValueError("No training pairs: pass --text_to_image_pairs, --corrupted_image_pairs and/or --pairs_file.")
    if args.text_to_image_pairs and args.text_media_map is None:
        raise ValueError(
            "`--text_to_image_pairs` needs `--text_media_map` (caption text features, see prepare_data.py)."
        )
    if args.prior_config is not None and (args.pretrained_prior is not None):
        raise ValueError("Pass either `--prior_config` (from scratch) or `--pretrained_prior` (fine-tune), not both.")
    if not 0.0 <= args.condition_dropout_prob <= 1.0:
        raise ValueError(f"`--condition_dropout_prob` must lie in [0, 1], got {args.condition_dropout_prob}.")
    return args


def load_prior(args: argparse.Namespace) -> Any2PixPrior:
    """A new prior from ``--prior_config``, or the ``--pretrained_prior`` / ``--pipeline`` one."""
    if args.prior_config is not None:
        return Any2PixPrior.from_config(Any2PixPrior.load_config(args.prior_config))
    return training_utils.load_component(args, "prior", Any2PixPrior.from_pretrained)


def build_dataset(args: argparse.Namespace, embed_dim: int) -> PriorPairsDataset:
    features = FeatureStore.from_file(args.media_map, args.data_dir, embed_dim)
    text_features = None
    if args.text_media_map is not None:
        text_features = FeatureStore.from_file(args.text_media_map, args.data_dir, embed_dim)
    pairs = default_prior_pairs(
        features,
        text_features,
        text_to_image=args.text_to_image_pairs,
        corrupted_images=args.corrupted_image_pairs,
        corruption_modality=MODALITY_NAMES[args.corruption_source_modality],
    )
    if args.pairs_file is not None:
        pairs += read_prior_pairs(args.pairs_file)
    # SDXL's DDPM schedule, as the official prior's training (REFERENCE.md §3).
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return PriorPairsDataset(
        pairs,
        features,
        text_features,
        seed=args.seed,
        alphas_cumprod=schedule.alphas_cumprod,
        max_corruption_timestep=args.max_corruption_timestep,
        target_norm=args.target_norm,
    )


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Runs the training; returns the training summary (see `write_training_summary`)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    accelerator = training_utils.make_accelerator(args)
    prior = load_prior(args)
    prior.train()
    if args.gradient_checkpointing:
        prior.enable_gradient_checkpointing()
    dataset = build_dataset(args, prior.config.embed_dim)
    params = [p for p in prior.parameters() if p.requires_grad]
    setup = training_utils.prepare_training(accelerator, args, prior, params, dataset, tracker_name="train_prior")

    def compute_loss(batch):
        # Rescaling and dropout hold no parameters: done on the unwrapped prior; the forward goes through the
        # prepared one so data-parallel gradients synchronise.
        inputs = accelerator.unwrap_model(setup.model).prepare_training_inputs(
            batch["condition"],
            score=args.score,
            input_norm=args.input_norm,
            condition_dropout_prob=args.condition_dropout_prob,
        )
        output = setup.model(
            inputs.condition_embeds,
            source_modality=batch["modality"],
            score_block=inputs.score_block,
            target_embeds=batch["target"],
        )
        return output.loss, {"dropped": inputs.condition_dropped.float().mean().item()}

    def components() -> dict:
        return {"prior": accelerator.unwrap_model(setup.model)}

    result = training_utils.run_training_loop(
        accelerator, args, setup, compute_loss, training_utils.validate_every(accelerator, args, components)
    )
    training_utils.save_trained_components(args, accelerator, **components())
    return training_utils.finish_training(accelerator, args, result, {"prior": setup.model}, components)


if __name__ == "__main__":
    main()
    sys.exit(0)
