"""Models of diffusers-any2pix (all `ModelMixin`, saved as safetensors)."""

from .edit_verifier import EditVerifier, EditVerifierInputs
from .imagebind import ImageBindModel, ImageBindOutput, convert_meta_imagebind_state_dict
from .ip_adapter import ImageBindIPAdapter, unet_cross_attention_hidden_sizes
from .mm_adapter import MultimodalAdapter, rescale_to_norm
from .prior import Any2PixPrior, Modality, PriorOutput, PriorTrainingOutput


__all__ = [
    "Any2PixPrior",
    "EditVerifier",
    "EditVerifierInputs",
    "ImageBindIPAdapter",
    "ImageBindModel",
    "ImageBindOutput",
    "Modality",
    "MultimodalAdapter",
    "PriorOutput",
    "PriorTrainingOutput",
    "convert_meta_imagebind_state_dict",
    "rescale_to_norm",
    "unet_cross_attention_hidden_sizes",
]
