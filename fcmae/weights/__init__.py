"""Weights in and out: load any ConvNeXt V2 / FCMAE checkpoint strictly, export encoders.

    sd = fcmae.weights.load("convnextv2_base_1k_224_fcmae.pt")    # -> this project's layout
    fcmae.weights.load_into(model, "checkpoint-1599.pth")          # strict; reports what it left out
    fcmae.weights.export(model, "timm", "encoder.safetensors")     # or "official", "hf"

Read: this project's checkpoints and encoders, timm state dicts, the official dense layout (the
released *_fcmae.pt files and fine-tuned models), the official MinkowskiEngine FCMAE training
checkpoints, and Hugging Face ConvNextV2 folders. Nothing is loaded partially without saying so:
a missing, unexpected or mis-shaped tensor raises WeightsError with the list; the only tensors
ever left out are a classifier head (and its norm), and the decoder when only an encoder is
wanted, and those are reported.
"""
from fcmae.weights.reading import (
    Architecture, WeightsError, convert, describe, detect_layout, encoder_state, layout_rows, load, load_classifier,
    load_fcmae, load_into, read_state_dict,
)
from fcmae.weights.writing import EXPORT_FORMATS, export, save_weights

__all__ = ["WeightsError", "Architecture", "load", "load_into", "load_fcmae", "load_classifier", "describe",
           "encoder_state", "export", "save_weights", "convert", "read_state_dict", "detect_layout", "layout_rows",
           "EXPORT_FORMATS"]
