"""Checkpoint conversion: the official InstructAny2Pix release → an `InstructAny2PixPipeline` folder.

The command-line entry point is ``python -m diffusers_any2pix.convert_official``; the functions live in
[`diffusers_any2pix.conversion.official`].
"""

from .official import (
    OFFICIAL_EDIT_DEFAULTS,
    OfficialConversionReport,
    OfficialReleaseFiles,
    convert_official_imagebind,
    convert_official_ip_adapter,
    convert_official_llm,
    convert_official_prior,
    convert_official_release,
    load_decoder,
    load_weights_file,
    locate_official_release,
    two_view_image_proj_to_standard,
)


__all__ = [
    "OFFICIAL_EDIT_DEFAULTS",
    "OfficialConversionReport",
    "OfficialReleaseFiles",
    "convert_official_imagebind",
    "convert_official_ip_adapter",
    "convert_official_llm",
    "convert_official_prior",
    "convert_official_release",
    "load_decoder",
    "load_weights_file",
    "locate_official_release",
    "two_view_image_proj_to_standard",
]
