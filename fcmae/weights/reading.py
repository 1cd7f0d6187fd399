"""Reading weights: any ConvNeXt V2 / FCMAE checkpoint, recognised by its keys, converted
strictly into this project's layout and loaded into FCMAE or timm's classifier."""
import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fcmae.layouts import LAYOUTS, decoder_rows, encoder_rows, their_shape, to_ours
from fcmae.models.convnextv2 import MODEL_SPECS, model_name
from fcmae.models.fcmae import create_model


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message lists what is wrong."""


@dataclass
class Architecture:
    name: str
    in_chans: int
    decoder_depth: int | None = None      # None: the weights hold no decoder
    decoder_embed_dim: int | None = None

    @property
    def has_decoder(self):
        return self.decoder_depth is not None

    def create_model(self, **kwargs):
        extra = {}
        if self.has_decoder:
            extra = dict(decoder_depth=self.decoder_depth, decoder_embed_dim=self.decoder_embed_dim)
        return create_model(self.name, in_chans=self.in_chans, **extra, **kwargs)


# ----- reading files ----------------------------------------------------------------------------

# the first bytes of files that are often given where weights are expected
SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"PK\x03\x04", "a zip archive"),
              (b"\x1f\x8b", "a gzip file"), (b"\x80", "a pickle that holds no torch tensors"))
UNCLEAR = ("a zip archive", "a pickle that holds no torch tensors", "a file of unknown kind")


def file_kind(path):
    """What a file that is not weights is, in words, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head[257:262] == b"ustar":
        return "a tar archive"
    kind = next((kind for magic, kind in SIGNATURES if head.startswith(magic)), None)
    if kind:
        return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a file of unknown kind"
    return "a text file"


def read_state_dict(source):
    """(state dict, extras) from a path or a dict; extras holds e.g. the epoch of a training
    checkpoint. Handles folders (accelerate checkpoints, Hugging Face), .safetensors, and torch
    files (plain or wrapped in {"model": ...} / {"state_dict": ...}, DDP "module." prefixes)."""
    extras = {}
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if path.is_dir():
            files = [path / "model.safetensors", path / "pytorch_model.bin"]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                raise WeightsError(f"{path} holds no model.safetensors or pytorch_model.bin")
            path = found
        if not path.is_file():
            raise WeightsError(f"{path} does not exist")
        if path.suffix == ".safetensors":
            data = load_file(str(path))
        else:
            try:
                # official training checkpoints carry their argparse.Namespace
                with torch.serialization.safe_globals([argparse.Namespace]):
                    data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same sentence
                kind = file_kind(path)
                # an image or text file needs no detail; a damaged torch file does
                detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if kind in UNCLEAR else ""
                raise WeightsError(f"{path} is not a readable weights file: it is {kind}{detail}") from None
    if not isinstance(data, dict):
        raise WeightsError("the weights file does not hold a state dict")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(data.get(wrapper), dict):
            extras = {k: v for k, v in data.items() if k != wrapper and isinstance(v, (int, float, str))}
            data = data[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError("the weights file holds no tensors")
    return state, extras


# ----- recognising a layout ------------------------------------------------------------------------

# per layout: (stem conv key, regex of a block's depthwise-conv key with stage and block groups)
_SIGNATURES = {
    "fcmae": ("encoder.stem.0.weight", r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight"),
    "minkowski": ("encoder.downsample_layers.0.0.weight", r"encoder\.stages\.(\d+)\.(\d+)\.dwconv\.kernel"),
    "timm": ("stem.0.weight", r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight"),
    "official": ("downsample_layers.0.0.weight", r"stages\.(\d+)\.(\d+)\.dwconv\.weight"),
    "hf": ("embeddings.patch_embeddings.weight", r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight"),
}
# tensors a layout may carry that an encoder never has: classifier heads and their norms
_CLASSIFIER = {
    "timm": r"head\..*", "official": r"(head|norm)\..*", "hf": r"(layernorm|pooler|classifier)\..*",
    "fcmae": r"$^", "minkowski": r"$^",
}


def detect_layout(state):
    for layout in ("fcmae", "minkowski", "hf", "timm", "official"):
        stem_key, block_re = _SIGNATURES[layout]
        if stem_key in state and any(re.fullmatch(block_re, k) for k in state):
            return layout
    sample = ", ".join(sorted(state)[:5])
    raise WeightsError(f"these weights are in no ConvNeXt V2 layout this project knows (first keys: {sample}); "
                       f"known layouts: {', '.join(LAYOUTS)}")


def infer_architecture(state, layout):
    stem_key, block_re = _SIGNATURES[layout]
    dim0, in_chans = state[stem_key].shape[:2]
    depths = [0, 0, 0, 0]
    for key in state:
        if m := re.fullmatch(block_re, key):
            stage, block = int(m.group(1)), int(m.group(2))
            if stage < 4:
                depths[stage] = max(depths[stage], block + 1)
    name = next((n for n, s in MODEL_SPECS.items() if s.depths == tuple(depths) and s.dims[0] == dim0), None)
    if name is None:
        raise WeightsError(f"the weights have depths {depths} and stem width {dim0}, which match no "
                           f"ConvNeXt V2 size ({', '.join(MODEL_SPECS)})")
    arch = Architecture(name, int(in_chans))
    if layout in ("fcmae", "minkowski") and "proj.weight" in state:
        block_key = r"decoder\.(\d+)\.conv_dw\.weight" if layout == "fcmae" else r"decoder\.(\d+)\.dwconv\.weight"
        blocks = [int(m.group(1)) for k in state if (m := re.fullmatch(block_key, k))]
        arch.decoder_depth = max(blocks) + 1 if blocks else 0
        arch.decoder_embed_dim = int(state["proj.weight"].shape[0])
    return arch


def reference_shapes(arch):
    """Our state dict's shapes for `arch`, without allocating it."""
    with torch.device("meta"):
        model = arch.create_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes if arch.has_decoder else {k: s for k, s in shapes.items() if k.startswith("encoder.")}


def layout_rows(arch, layout, shapes=None):
    """(our key, their key, kind) for the whole layout; our keys with the 'encoder.' prefix.
    `shapes` (from reference_shapes, computed when not given) lists our keys for our own layout
    and timm's."""
    if layout in ("fcmae", "timm"):  # our layout, or our encoder keys without the prefix
        shapes = shapes if shapes is not None else reference_shapes(arch)
        return [(k, k.removeprefix("encoder.") if layout == "timm" else k, "same") for k in shapes
                if layout == "fcmae" or k.startswith("encoder.")]
    prefix = "encoder." if layout == "minkowski" else ""
    rows = [(f"encoder.{ours}", f"{prefix}{theirs}", kind)
            for ours, theirs, kind in encoder_rows(MODEL_SPECS[arch.name].depths, layout)]
    if arch.has_decoder:
        rows += decoder_rows(arch.decoder_depth)
    return rows


# ----- loading -------------------------------------------------------------------------------------

def _fail_if_any(what, missing, unexpected, mismatched):
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:12])}"
                        f"{' ...' if len(unexpected) > 12 else ''}")
    if mismatched:
        problems.append("wrong shape: " + ", ".join(f"{k} {got} (expected {want})" for k, got, want in mismatched[:12]))
    if problems:
        raise WeightsError(f"{what} do not match; " + "; ".join(problems))


def convert(state, layout=None):
    """(our state dict, architecture, dropped keys) from a state dict in any known layout."""
    layout = layout or detect_layout(state)
    arch = infer_architecture(state, layout)
    shapes = reference_shapes(arch)
    classifier = re.compile(_CLASSIFIER[layout])
    dropped = sorted(k for k in state if classifier.fullmatch(k))
    state = {k: v for k, v in state.items() if k not in dropped}
    rows = layout_rows(arch, layout, shapes)
    ours, missing, mismatched = {}, [], []
    for our_key, their_key, kind in rows:
        if their_key not in state:
            missing.append(their_key)
            continue
        tensor, want = state[their_key], their_shape(kind, shapes[our_key])
        if kind in ("vector", "row") and tensor.dim() in (1, 2, 4) and tensor.shape[-1] == tensor.numel():
            want = tuple(tensor.shape)  # GRN vectors come as (C,), (1, C) or (1, 1, 1, C): all fine
        if tuple(tensor.shape) != want:
            mismatched.append((their_key, tuple(tensor.shape), want))
            continue
        ours[our_key] = to_ours(tensor, kind, shapes[our_key])
    used = {their for _, their, _ in rows}
    unexpected = sorted(k for k in state if k not in used)
    _fail_if_any(f"the {layout} weights of {arch.name}", missing, unexpected, mismatched)
    return ours, arch, dropped


def load(source):
    """A state dict in this project's layout from a checkpoint in any known layout.

    It loads strictly into `fcmae.create_model(name)` (with the checkpoint's decoder depth and
    width) when the source has the decoder; otherwise it holds the `encoder.*` tensors only:
    use `load_into(model, source)`, or `model.encoder.load_state_dict(encoder_state(sd))`.
    """
    state, _ = read_state_dict(source)
    return convert(state)[0]


def encoder_state(state):
    """The encoder part of one of our state dicts, with the 'encoder.' prefix removed."""
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def load_into(model, source, encoder_only=False):
    """Load `source` into an FCMAE `model` strictly. Weights without a decoder (or encoder_only=True)
    load into the encoder only. Returns a report: "loaded" (which part), "dropped" (tensors of the
    source left out: a classifier head, or the decoder with encoder_only), "not_loaded" (model
    tensors left at their initial values), "architecture" and "extras" (e.g. the epoch)."""
    state, extras = read_state_dict(source)
    return _load_converted(model, *convert(state), extras, encoder_only)


def load_fcmae(source, **kwargs):
    """(an FCMAE model of the file's size, decoder and input channels, with its weights; the report
    of `load_into`). Keyword arguments go to `create_model` (mask_ratio, backend, ...). Weights
    without a decoder load into the encoder only: report["architecture"].has_decoder says so."""
    state, extras = read_state_dict(source)
    ours, arch, dropped = convert(state)
    model = arch.create_model(**kwargs)
    return model, _load_converted(model, ours, arch, dropped, extras)


def _load_converted(model, ours, arch, dropped, extras, encoder_only=False):
    if arch.name != model.encoder.name or arch.in_chans != model.in_chans:
        raise WeightsError(f"the weights are {arch.name} with {arch.in_chans} input channels, but the model is "
                           f"{model.encoder.name} with {model.in_chans}")
    if arch.has_decoder and not encoder_only:
        missing, unexpected = model.load_state_dict(ours, strict=False)
        _fail_if_any("the weights and the model", list(missing), list(unexpected), [])
        part, not_loaded = "encoder and decoder", []
    else:
        model.encoder.load_state_dict(encoder_state(ours), strict=True)
        dropped = dropped + sorted(k for k in ours if not k.startswith("encoder."))
        part = "encoder"
        not_loaded = sorted(k for k in model.state_dict() if not k.startswith("encoder."))
    return {"loaded": part, "architecture": arch, "dropped": dropped, "not_loaded": not_loaded, "extras": extras}


# classifier tensors of each layout, by their name in timm's convnextv2 model
_HEAD_NAMES = {
    "timm": {"head.norm.weight": "head.norm.weight", "head.norm.bias": "head.norm.bias",
             "head.fc.weight": "head.fc.weight", "head.fc.bias": "head.fc.bias"},
    "official": {"norm.weight": "head.norm.weight", "norm.bias": "head.norm.bias",
                 "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"},
    "hf": {"layernorm.weight": "head.norm.weight", "layernorm.bias": "head.norm.bias",
           "classifier.weight": "head.fc.weight", "classifier.bias": "head.fc.bias"},
    "fcmae": {}, "minkowski": {},
}


def load_classifier(model, source, head_std=2e-5):
    """Load `source` (any layout `load` reads) into timm's convnextv2 `model` for fine-tuning.

    The trunk loads strictly. The head's LayerNorm loads when the file has one. The classifier
    loads when the file has one of the model's shape; otherwise it is re-initialised (truncated
    normal with std `head_std`, zero bias, as the official fine-tuning); a model whose `head.fc`
    is not a Linear layer (a linear probe) loads it from a file with the same probe, else keeps
    its own. Returns a report like `load_into`'s, with "head" saying what happened to the
    classifier and "head_loaded" whether it came from the file."""
    state, extras = read_state_dict(source)
    layout = detect_layout(state)
    ours, arch, _ = convert(state, layout)
    name, in_chans = model_name(model), model.stem[0].in_channels
    if (arch.name, arch.in_chans) != (name, in_chans):
        raise WeightsError(f"the weights are {arch.name} with {arch.in_chans} input channels, but the model is "
                           f"{name} with {in_chans}; pass --model {arch.name}" if arch.name != name else
                           f"the weights take {arch.in_chans} input channels, the model {in_chans}")
    target = model.state_dict()
    if layout == "timm":  # any head of timm's model, a linear probe's included
        head = {k: v for k, v in state.items() if k.startswith("head.")}
    else:
        head = {timm_key: state[key] for key, timm_key in _HEAD_NAMES[layout].items() if key in state}
    usable = {k: v for k, v in head.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    fc_keys = [k for k in target if k.startswith("head.fc.")]
    head_loaded = all(k in usable for k in fc_keys)
    if not head_loaded:  # all of the classifier or none of it
        usable = {k: v for k, v in usable.items() if not k.startswith("head.fc.")}
    missing, unexpected = model.load_state_dict({**encoder_state(ours), **usable}, strict=False)
    _fail_if_any("the weights and the model", [k for k in missing if not k.startswith("head.")], list(unexpected), [])
    dropped = sorted(k for k in ours if not k.startswith("encoder.")) + sorted(set(head) - set(usable))
    fc = model.head.fc
    if head_loaded:
        head_report = "classifier loaded"
    else:
        if "head.fc.weight" in head and isinstance(fc, torch.nn.Linear):
            why = f"the file's has {head['head.fc.weight'].shape[0]} classes, the model {fc.out_features}"
        else:
            why = "the file has none" if not any(k.startswith("head.fc.") for k in head) else "the file's differs"
        if isinstance(fc, torch.nn.Linear):
            torch.nn.init.trunc_normal_(fc.weight, std=head_std)
            torch.nn.init.zeros_(fc.bias)
            head_report = f"classifier re-initialised ({why})"
        else:
            head_report = f"probe head starts from its initialisation ({why})"
    not_loaded = sorted(k for k in target if k not in usable and k.startswith("head."))
    return {"loaded": "encoder", "architecture": arch, "dropped": dropped, "not_loaded": not_loaded,
            "head": head_report, "head_loaded": head_loaded, "extras": extras}


def describe(report, source):
    """One line saying what `load_into` / `load_classifier` loaded from `source` and what not."""
    text = f"loaded the {report['loaded']} from {source}"
    if "head" in report:
        text += f"; {report['head']}"
    elif report["not_loaded"]:
        text += "; the decoder starts from its initialisation"
    dropped = report["dropped"]
    if dropped:
        text += f"; left out of it: {', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}"
    return text
