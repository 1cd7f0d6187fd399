from fcmae.models.backends import BACKEND_CHOICES, BACKENDS, resolve_backend, runnable
from fcmae.models.convnextv2 import ENCODER_STRIDE, MODEL_SPECS, ConvNeXtV2Encoder, create_convnextv2, list_models
from fcmae.models.fcmae import FCMAE, create_model, num_visible_patches, random_patch_mask

__all__ = [
    "BACKEND_CHOICES", "BACKENDS", "resolve_backend", "runnable", "ENCODER_STRIDE", "MODEL_SPECS", "ConvNeXtV2Encoder",
    "create_convnextv2", "list_models", "FCMAE", "create_model", "num_visible_patches",
    "random_patch_mask",
]
