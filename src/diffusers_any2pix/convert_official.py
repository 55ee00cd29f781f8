"""Convert the official InstructAny2Pix release into an `InstructAny2PixPipeline` folder.

    python -m diffusers_any2pix.convert_official --checkpoint_dir ckpts \\
        --decoder stabilityai/stable-diffusion-xl-base-1.0 --output_dir instructany2pix-diffusers --dtype float16

`ckpts/` is the official release folder (REFERENCE.md §1: `llm-retrained/`, `prior/model.bin`, `imagebind_huge.pth`,
`sdxl/ip_adapter_global_local_2_view.bin`). The result loads with `InstructAny2PixPipeline.from_pretrained(OUT)`;
`OUT/edit_defaults.json` holds the official demo's settings and `OUT/README.md` is the model card. See
[`diffusers_any2pix.conversion.official.convert_official_release`] for the Python API and the conversion choices.
"""

import argparse
import json
import logging as std_logging
import sys
from pathlib import Path

from .conversion.official import (
    DEFAULT_DECODER,
    OFFICIAL_IMAGEBIND_FILE,
    OFFICIAL_IP_ADAPTER_FILE,
    OFFICIAL_LLM_FOLDER,
    OFFICIAL_PRIOR_FILE,
    OfficialConversionReport,
    convert_official_release,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv (`list[str]`, *optional*): the arguments (default: `sys.argv[1:]`).
    """
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_any2pix.convert_official",
        description="Convert the official InstructAny2Pix release into an InstructAny2PixPipeline folder.",
    )
    parser.add_argument("--checkpoint_dir", required=True, help="The official release folder (`ckpts/`).")
    parser.add_argument("--output_dir", required=True, help="The pipeline folder to write.")
    parser.add_argument(
        "--decoder",
        default=DEFAULT_DECODER,
        help="SDXL pipeline to decode with: a Hub repo id or a local diffusers folder (default: %(default)s).",
    )
    parser.add_argument(
        "--llm_folder", default=OFFICIAL_LLM_FOLDER, help="LLM folder in CKPTS (default: %(default)s)."
    )
    parser.add_argument(
        "--prior_file", default=OFFICIAL_PRIOR_FILE, help="Prior file in CKPTS (default: %(default)s)."
    )
    parser.add_argument(
        "--imagebind_file", default=OFFICIAL_IMAGEBIND_FILE, help="ImageBind file in CKPTS (default: %(default)s)."
    )
    parser.add_argument(
        "--ip_adapter_file", default=OFFICIAL_IP_ADAPTER_FILE, help="IP-Adapter file in CKPTS (default: %(default)s)."
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the saved weights (default: %(default)s).",
    )
    parser.add_argument("--decoder_variant", default=None, help="Decoder weight variant to load, e.g. `fp16`.")
    parser.add_argument("--cache_dir", default=None, help="Hugging Face cache folder for Hub downloads.")
    parser.add_argument(
        "--keep_prior_text_encoder",
        action="store_true",
        help="Save the prior's CLIP text encoder as `prior_text_encoder` (default: reduce it to the exact "
        "empty-prompt hidden states the official pipeline uses).",
    )
    parser.add_argument(
        "--prior_tokenizer",
        default=None,
        help="CLIP tokenizer of the prior's text encoder, Hub id or folder (needed with --keep_prior_text_encoder; "
        "default then laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    )
    parser.add_argument(
        "--imagebind_tokenizer",
        default=None,
        help="ImageBind's text tokenizer: Meta's bpe_simple_vocab_16e6.txt.gz (ImageBind repository) or a CLIP "
        "tokenizer folder; saved as `imagebind_tokenizer` for `llm_rerank_weight` (default: not saved).",
    )
    parser.add_argument(
        "--config_overrides",
        default=None,
        help='JSON file of config overrides per part: {"image_encoder": {...}, "prior": {...}, '
        '"prior_text_encoder": {...}} (default: the official sizes).',
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUTPUT_DIR.")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="Upload the folder to this Hub repo.")
    parser.add_argument("--hub_private", action="store_true", help="Create the Hub repo private.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> OfficialConversionReport:
    """Run the conversion from the command line; exits with status 1 and the reason on bad input.

    Args:
        argv (`list[str]`, *optional*): the arguments (default: `sys.argv[1:]`).

    Returns:
        [`OfficialConversionReport`]
    """
    args = parse_args(argv)
    # Our loggers are not under diffusers' root logger: show their progress and the list of dropped keys.
    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = std_logging.getLogger("diffusers_any2pix")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(std_logging.INFO)
    try:
        config_overrides = None
        if args.config_overrides is not None:
            try:
                config_overrides = json.loads(Path(args.config_overrides).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"Could not read --config_overrides {args.config_overrides}: {error}") from error
        report = convert_official_release(
            args.checkpoint_dir,
            args.output_dir,
            args.decoder,
            llm_folder=args.llm_folder,
            prior_file=args.prior_file,
            imagebind_file=args.imagebind_file,
            ip_adapter_file=args.ip_adapter_file,
            dtype=args.dtype,
            decoder_variant=args.decoder_variant,
            cache_dir=args.cache_dir,
            keep_prior_text_encoder=args.keep_prior_text_encoder,
            prior_tokenizer=args.prior_tokenizer,
            imagebind_tokenizer=args.imagebind_tokenizer,
            config_overrides=config_overrides,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            hub_private=args.hub_private,
        )
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
    return report


if __name__ == "__main__":
    main()
