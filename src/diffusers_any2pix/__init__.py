"""diffusers-any2pix: InstructAny2Pix (text + images + audio instructions → image edits) for diffusers."""

__version__ = "0.1.0.dev0"

# Eager imports on purpose: diffusers resolves our component classes through `sys.modules` when loading a pipeline.
from .instruction import ParsedInstruction, parse_instruction
from .models import (
    Any2PixPrior,
    ImageBindIPAdapter,
    ImageBindModel,
    Modality,
    MultimodalAdapter,
    convert_meta_imagebind_state_dict,
    rescale_to_norm,
)
from .multimodal_llm import (
    MULTIMODAL_SPECIAL_TOKENS,
    add_multimodal_tokens,
    build_vicuna_prompt,
    generate_with_media,
    get_multimodal_token_ids,
    score_answers,
)
from .pipeline_instruct_any2pix import InstructAny2PixPipeline, InstructAny2PixPipelineOutput
from .processing_imagebind import ImageBindProcessor, clip_tokenizer_from_bpe


__all__ = [
    "MULTIMODAL_SPECIAL_TOKENS",
    "Any2PixPrior",
    "ImageBindIPAdapter",
    "ImageBindModel",
    "ImageBindProcessor",
    "InstructAny2PixPipeline",
    "InstructAny2PixPipelineOutput",
    "Modality",
    "MultimodalAdapter",
    "ParsedInstruction",
    "add_multimodal_tokens",
    "build_vicuna_prompt",
    "clip_tokenizer_from_bpe",
    "convert_meta_imagebind_state_dict",
    "generate_with_media",
    "get_multimodal_token_ids",
    "parse_instruction",
    "rescale_to_norm",
    "score_answers",
]
