"""Weights in and out: load any ConvNeXt V2 / FCMAE checkpoint strictly, export encoders.

    sd = fcmae.weights.load("convnextv2_base_1k_224_fcmae.pt")    # -> this project's layout
    fcmae.weights.load_into(model, "checkpoint-1599.pth")          # strict; reports what it left out
    model, report = fcmae.weights.load_timm("model_best.safetensors")  # timm's convnextv2, its head too
    fcmae.weights.export(model, "timm", "encoder.safetensors")     # or "official", "hf"

Read: this project's checkpoints and encoders, timm state dicts, the official dense layout (the
released *_fcmae.pt files and fine-tuned models), the official MinkowskiEngine FCMAE training
checkpoints, and Hugging Face ConvNextV2 folders. Nothing is loaded partially without saying so:
a missing, unexpected or mis-shaped tensor raises WeightsError with the list; the only tensors
ever left out are a classifier head (and its norm), and the decoder when only an encoder is
wanted, and those are reported.

files.py reads and writes files, formats.py holds one object per format (FORMATS), reading.py
converts and loads, writing.py exports, card.py writes the Hugging Face export's model card, and
onnx.py exports a checkpoint as an ONNX graph (`export_onnx`).
"""
from fcmae.weights.files import WeightsError, read_state_dict, read_statistics, save_weights
from fcmae.weights.formats import EXPORT_FORMATS, FORMATS, Architecture, WeightFormat, detect_format, weight_format
from fcmae.weights.reading import (
    convert, describe, encoder_state, load, load_backbone, load_classifier, load_fcmae, load_into, load_timm,
)
from fcmae.weights.onnx import export_onnx
from fcmae.weights.writing import export

__all__ = ["WeightsError", "Architecture", "load", "load_into", "load_fcmae", "load_classifier", "load_timm",
           "load_backbone", "describe", "encoder_state", "export", "export_onnx", "save_weights", "read_statistics",
           "convert", "read_state_dict", "WeightFormat", "FORMATS", "EXPORT_FORMATS", "weight_format", "detect_format"]
