"""Reading weights: any ConvNeXt V2 / FCMAE checkpoint, its format recognised by its keys
(fcmae.weights.formats), converted strictly into this project's layout and loaded into FCMAE or
timm's classifier."""
import re

import torch

from fcmae.layouts import their_shape, to_ours
from fcmae.models.convnextv2 import create_convnextv2, model_name
from fcmae.models.downstream import Backbone
from fcmae.weights.files import WeightsError, read_state_dict, read_statistics
from fcmae.weights.formats import detect_format, reference_shapes


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


def convert(state, fmt=None):
    """(our state dict, architecture, dropped keys) from a state dict in any known format
    (`fmt`: its WeightFormat, else recognised)."""
    fmt = fmt or detect_format(state)
    arch = fmt.architecture(state)
    shapes = reference_shapes(arch)
    classifier = re.compile(fmt.classifier_pattern)
    dropped = sorted(k for k in state if classifier.fullmatch(k))
    state = {k: v for k, v in state.items() if k not in dropped}
    rows = fmt.rows(arch, shapes)
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
    _fail_if_any(f"the {fmt.name} weights of {arch.name}", missing, unexpected, mismatched)
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


def load_into(model, source, encoder_only=False, adapt_stem=False):
    """Load `source` into an FCMAE `model` strictly. Weights without a decoder (or encoder_only=True)
    load into the encoder only; `adapt_stem`: weights with other input channels than the model's
    load with their stem adapted (see adapted_stem). Returns a report: "loaded" (which part),
    "dropped" (tensors of the source left out: a classifier head, or the decoder with
    encoder_only), "not_loaded" (model tensors left at their initial values), "stem" (how it was
    adapted, or None), "architecture" and "extras" (e.g. the epoch)."""
    state, extras = read_state_dict(source)
    return _load_converted(model, *convert(state), extras, encoder_only, adapt_stem)


def load_fcmae(source, **kwargs):
    """(an FCMAE model of the file's size, decoder and input channels, with its weights; the report
    of `load_into`). Keyword arguments go to `create_model` (mask_ratio, backend, ...). Weights
    without a decoder load into the encoder only: report["architecture"].has_decoder says so."""
    state, extras = read_state_dict(source)
    ours, arch, dropped = convert(state)
    model = arch.create_model(**kwargs)
    return model, _load_converted(model, ours, arch, dropped, extras)


STEM_KEY = "encoder.stem.0.weight"


def adapted_stem(ours, arch, in_chans, allowed):
    """(`ours` with its stem conv adapted to `in_chans` input channels, a phrase saying how), as
    timm's adapt_input_conv adapts pretrained stems: to one channel the sum over the weights'
    channels; to more, their channels repeated and scaled by (theirs / in_chans). Unchanged (and
    None) when the channels agree; WeightsError when they differ and `allowed` is false."""
    if arch.in_chans == in_chans:
        return ours, None
    if not allowed:
        raise WeightsError(f"the weights take {arch.in_chans} input channels and the model {in_chans}; leave "
                           f"--adapt_stem on to adapt the stem, or pass --in_chans {arch.in_chans}")
    from timm.models import adapt_input_conv

    stem = adapt_input_conv(in_chans, ours[STEM_KEY], base_chans=arch.in_chans)
    how = "summed over" if in_chans == 1 else f"repeated and scaled by {arch.in_chans}/{in_chans}"
    return {**ours, STEM_KEY: stem}, f"the stem adapted from {arch.in_chans} to {in_chans} input channels ({how})"


def _load_converted(model, ours, arch, dropped, extras, encoder_only=False, adapt=False):
    if arch.name != model.encoder.name or arch.in_chans != model.in_chans and not adapt:
        raise WeightsError(f"the weights are {arch.name} with {arch.in_chans} input channels, but the model is "
                           f"{model.encoder.name} with {model.in_chans}")
    ours, stem = adapted_stem(ours, arch, model.in_chans, adapt)
    if arch.has_decoder and not encoder_only:
        missing, unexpected = model.load_state_dict(ours, strict=False)
        _fail_if_any("the weights and the model", list(missing), list(unexpected), [])
        part, not_loaded = "encoder and decoder", []
    else:
        model.encoder.load_state_dict(encoder_state(ours), strict=True)
        dropped = dropped + sorted(k for k in ours if not k.startswith("encoder."))
        part = "encoder"
        not_loaded = sorted(k for k in model.state_dict() if not k.startswith("encoder."))
    return {"loaded": part, "architecture": arch, "dropped": dropped, "not_loaded": not_loaded, "stem": stem,
            "extras": extras}


def load_classifier(model, source, head_std=2e-5, adapt_stem=False):
    """Load `source` (any layout `load` reads) into timm's convnextv2 `model` for fine-tuning.

    The trunk loads strictly. The head's LayerNorm loads when the file has one. The classifier
    loads when the file has one of the model's shape; otherwise it is re-initialised (truncated
    normal with std `head_std`, zero bias, as the official fine-tuning); a model whose `head.fc`
    is not a Linear layer (a linear probe) loads it from a file with the same probe, else keeps
    its own. `adapt_stem`: weights with other input channels load with their stem adapted (see
    adapted_stem). Returns a report like `load_into`'s, with "head" saying what happened to the
    classifier and "head_loaded" whether it came from the file."""
    state, extras = read_state_dict(source)
    fmt = detect_format(state)
    ours, arch, _ = convert(state, fmt)
    name, in_chans = model_name(model), model.stem[0].in_channels
    if arch.name != name:
        raise WeightsError(f"the weights are {arch.name} with {arch.in_chans} input channels, but the model is "
                           f"{name} with {in_chans}; pass --model {arch.name}")
    ours, stem = adapted_stem(ours, arch, in_chans, adapt_stem)
    target = model.state_dict()
    head = fmt.head(state)
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
            "head": head_report, "head_loaded": head_loaded, "stem": stem, "extras": extras}


def load_timm(source, num_classes=None, **kwargs):
    """(timm's convnextv2 of the weights' size and input channels, loaded by `load_classifier`; its
    report). `num_classes` None: as many classes as the weights' classifier has, or none (0: the
    model ends in its pooled features) when they have none. Keyword arguments go to
    timm.create_model (drop_path_rate, ...)."""
    state, _ = read_state_dict(source)
    fmt = detect_format(state)
    arch = fmt.architecture(state)
    head = fmt.head(state)
    if num_classes is None:
        num_classes = int(head["head.fc.weight"].shape[0]) if "head.fc.weight" in head else 0
    model = create_convnextv2(arch.name, in_chans=arch.in_chans, num_classes=num_classes, **kwargs)
    report = load_classifier(model, state)
    if num_classes == 0:
        report["head"], report["head_loaded"] = "no classifier", False
    return model, report


def load_backbone(source, out_indices=(0, 1, 2, 3), **kwargs):
    """(fcmae.models.downstream.Backbone of `source`'s trunk, loaded strictly by `load_timm`, with
    the input statistics the weights keep (ImageNet's where they keep none); the load report).
    Keyword arguments go to timm.create_model (drop_path_rate, ...)."""
    trunk, report = load_timm(source, num_classes=0, **kwargs)
    statistics = read_statistics(source)
    kept = {"mean": statistics["mean"], "std": statistics["std"]} if statistics else {}
    return Backbone(trunk, out_indices, **kept), report


def describe(report, source):
    """One line saying what `load_into` / `load_classifier` loaded from `source` and what not."""
    text = f"loaded the {report['loaded']} from {source}"
    if report.get("stem"):
        text += f", {report['stem']}"
    if "head" in report:
        text += f"; {report['head']}"
    elif report["not_loaded"]:
        text += "; the decoder starts from its initialisation"
    dropped = report["dropped"]
    if dropped:
        text += f"; left out of it: {', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}"
    return text
