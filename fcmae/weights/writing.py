"""Writing weights: atomic safetensors files, and encoders exported for timm, the official code
and Hugging Face."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fcmae.layouts import to_theirs
from fcmae.models.convnextv2 import MODEL_SPECS
from fcmae.models.fcmae import FCMAE
from fcmae.weights.reading import Architecture, WeightsError, convert, encoder_state, layout_rows, read_state_dict

EXPORT_FORMATS = ("timm", "official", "hf")


def save_weights(state, path, metadata=None):
    """Write a state dict as safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


# ----- exporting -----------------------------------------------------------------------------------

def _our_state(model_or_source):
    if isinstance(model_or_source, FCMAE):
        state = {k: v.detach().cpu() for k, v in model_or_source.state_dict().items()}
        return state, Architecture(model_or_source.encoder.name, model_or_source.in_chans)
    state, arch, _ = convert(read_state_dict(model_or_source)[0])
    return state, Architecture(arch.name, arch.in_chans)


def export(model_or_source, format, path, pth=False):
    """Write the encoder of an FCMAE model (or of any checkpoint `load` reads) as `format`:

    - "timm": a state dict for timm.create_model("convnextv2_<size>") (all but its head);
      safetensors, or a torch .pth file when `pth` or the path ends in .pth/.pt;
    - "official": {"model": dense official layout}, like the released *_fcmae.pt files;
    - "hf": a folder for transformers.ConvNextV2Model.from_pretrained (config + safetensors).
    Returns (written path, report); the report lists what was left out (the decoder)."""
    if format not in EXPORT_FORMATS:
        raise WeightsError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    state, arch = _our_state(model_or_source)
    dropped = sorted(k for k in state if not k.startswith("encoder."))
    encoder = {k: v.contiguous() for k, v in state.items() if k.startswith("encoder.")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "timm":
        out = encoder_state(encoder)
        if pth or path.suffix in (".pth", ".pt"):
            _atomic(path, lambda tmp: torch.save(out, tmp))
        else:
            _atomic(path, lambda tmp: save_file(out, str(tmp), metadata={"model": arch.name, "layout": "timm",
                                                                      "in_chans": str(arch.in_chans)}))
        return path, {"dropped": dropped}
    rows = layout_rows(Architecture(arch.name, arch.in_chans), "official" if format == "official" else "hf")
    out = {theirs: to_theirs(encoder[ours], kind).contiguous() for ours, theirs, kind in rows}
    if format == "official":
        _atomic(path, lambda tmp: torch.save({"model": out}, tmp))
        return path, {"dropped": dropped}
    # Hugging Face: its model has a final LayerNorm (for pooling) that FCMAE never trains;
    # it is written as the identity (ones, zeros) and reported.
    width = MODEL_SPECS[arch.name].dims[-1]
    out["layernorm.weight"], out["layernorm.bias"] = torch.ones(width), torch.zeros(width)
    path.mkdir(parents=True, exist_ok=True)
    spec = MODEL_SPECS[arch.name]
    config = {
        "model_type": "convnextv2", "architectures": ["ConvNextV2Model"], "num_channels": arch.in_chans,
        "patch_size": 4, "num_stages": 4, "hidden_sizes": list(spec.dims), "depths": list(spec.depths),
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": 224,
        "initializer_range": 0.02,
    }
    _atomic(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    _atomic(path / "model.safetensors", lambda tmp: save_file(out, str(tmp), metadata={"format": "pt"}))
    return path, {"dropped": dropped, "added": ["layernorm.weight (ones)", "layernorm.bias (zeros)"]}


def _atomic(path, write):
    """Write through a temporary file and rename, so `path` is never half written."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)
