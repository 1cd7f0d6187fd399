"""Writing weights: the encoder of an FCMAE model or of any checkpoint, exported in one of the
formats that other code loads (fcmae.weights.formats)."""
from pathlib import Path

from fcmae.layouts import to_theirs
from fcmae.models.fcmae import FCMAE
from fcmae.weights.files import read_state_dict, read_statistics
from fcmae.weights.formats import Architecture, export_format
from fcmae.weights.reading import convert


def _our_state(model_or_source):
    if isinstance(model_or_source, FCMAE):
        state = {k: v.detach().cpu() for k, v in model_or_source.state_dict().items()}
        return state, Architecture(model_or_source.encoder.name, model_or_source.in_chans)
    state, arch, _ = convert(read_state_dict(model_or_source)[0])
    return state, arch.encoder_only()


def export(model_or_source, format, path, pth=False, statistics=None):
    """Write the encoder of an FCMAE model (or of any checkpoint `load` reads) as `format`:

    - "timm": a state dict for timm.create_model("convnextv2_<size>") (all but its head);
      safetensors, or a torch .pth file when `pth` or the path ends in .pth/.pt;
    - "official": {"model": dense official layout}, like the released *_fcmae.pt files;
    - "hf": a folder for transformers.ConvNextV2Model.from_pretrained (config + safetensors).
    `statistics` ({"mean", "std"}: those the encoder was trained with; by default those a source
    keeps, see files.read_statistics) go into the timm file's metadata and the Hugging Face
    config.json. Returns (written path, report); the report lists what was left out (the decoder)
    and what the format needed added."""
    fmt = export_format(format)
    if statistics is None and not isinstance(model_or_source, FCMAE):
        statistics = read_statistics(model_or_source)
    state, arch = _our_state(model_or_source)
    dropped = sorted(k for k in state if not k.startswith("encoder."))
    tensors = {theirs: to_theirs(state[ours], kind).contiguous() for ours, theirs, kind in fmt.rows(arch)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, {"dropped": dropped, **fmt.write(tensors, arch, path, pth=pth, statistics=statistics)}
