"""Writing weights: the encoder of an FCMAE model or of any checkpoint, exported in one of the
formats that other code loads (fcmae.weights.formats)."""
from pathlib import Path

from fcmae.layouts import to_theirs
from fcmae.models.fcmae import FCMAE
from fcmae.weights.card import licence_id, write_card
from fcmae.weights.files import WeightsError, read_state_dict, read_statistics
from fcmae.weights.formats import Architecture, detect_format, export_format
from fcmae.weights.reading import convert


def _our_state(model_or_source):
    """(our state dict, the encoder's architecture, the source's format name or None for a model)."""
    if isinstance(model_or_source, FCMAE):
        state = {k: v.detach().cpu() for k, v in model_or_source.state_dict().items()}
        return state, Architecture(model_or_source.encoder.name, model_or_source.in_chans), None
    state = read_state_dict(model_or_source)[0]
    fmt = detect_format(state)
    state, arch, _ = convert(state, fmt)
    return state, arch.encoder_only(), fmt.name


def export(model_or_source, format, path, pth=False, statistics=None, license=None):
    """Write the encoder of an FCMAE model (or of any checkpoint `load` reads) as `format`:

    - "timm": a state dict for timm.create_model("convnextv2_<size>") (all but its head);
      safetensors, or a torch .pth file when `pth` or the path ends in .pth/.pt;
    - "official": {"model": dense official layout}, like the released *_fcmae.pt files;
    - "hf": a folder for transformers.ConvNextV2Model.from_pretrained (config + safetensors), with
      a model card for the Hub (README.md, see card.py) under the licence `license` (an SPDX-like
      id; None: "other", stated as not given).
    `statistics` ({"mean", "std"}: those the encoder was trained with; by default those a source
    keeps, see files.read_statistics) go into the timm file's metadata and the Hugging Face
    config.json. Returns (written path, report); the report lists what was left out (the decoder)
    and what the format needed added, and for "hf" the card's path and its CC-BY-NC warning (or
    None). The ONNX graph of a checkpoint is onnx.export_onnx's."""
    fmt = export_format(format)
    if license is not None and fmt.name != "hf":
        raise WeightsError("a licence goes into the model card of the hf export only; leave --license out of "
                           f"--format {fmt.name}")
    licence = licence_id(license) if license is not None else None  # checked before anything is read
    if statistics is None and not isinstance(model_or_source, FCMAE):
        statistics = read_statistics(model_or_source)
    state, arch, source_format = _our_state(model_or_source)
    dropped = sorted(k for k in state if not k.startswith("encoder."))
    tensors = {theirs: to_theirs(state[ours], kind).contiguous() for ours, theirs, kind in fmt.rows(arch)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"dropped": dropped, **fmt.write(tensors, arch, path, pth=pth, statistics=statistics)}
    if fmt.name == "hf":
        source = None if isinstance(model_or_source, FCMAE) else model_or_source
        parameters = sum(t.numel() for t in tensors.values())
        report.update(write_card(path, arch, parameters, source, source_format, statistics, licence))
    return path, report
