"""ONNX export: timm's dense convnextv2 with the weights of any checkpoint fcmae.weights reads, as
one graph a server runs without this project.

    python -m fcmae.export CHECKPOINT --format onnx --output model.onnx

The graph takes `images` (batch, in_chans, size, size), float32, normalised with the statistics
in its metadata, and gives `features` (batch, width): the encoder's features averaged over the
positions (timm's forward_features and a mean; no head norm, not normalised), or `logits`
(batch, classes): the fine-tuned classifier's. The batch axis is dynamic; the size is the traced
one. The model's metadata_props say how to prepare inputs (METADATA_KEYS).

The fp16 check: GRN's L2 norm over the positions squares the activations and sums them, which
overflows float16 (largest 65504) at high resolution or with large activations, and then every
feature is inf or NaN; a float16 engine such as TensorRT computes it that way (its ONNX parser
imports ReduceL2 as ReduceSumSquare, then Sqrt, the sum a float16 tensor). The check evaluates
the model in torch float16 on the CPU, every operation's result rounded to float16 as such an
engine stores it, with GRN's sum of squares spelled out so that it is a float16 tensor, on the
bundled sample photographs. It does not run the float16 ONNX graph in onnxruntime for this:
onnxruntime's CPU provider runs most float16 operations in float32 behind casts it inserts (and
its float16 ReduceL2 accumulates in float32), so an overflow never shows there. When the outputs
stay finite, the graph converted to float16 (onnxruntime's convert_float_to_float16, inputs and
outputs kept float32) is written beside the float32 one (model.fp16.onnx), after onnxruntime has
run it once against the float32 graph; when not, only the float32 graph is written and the
report names the first module whose output is not finite.

onnx, onnxscript (torch's exporter) and onnxruntime are imported here only, when a graph is made.
"""
import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from fcmae.models.convnextv2 import MODEL_SPECS, average_pooled, model_name
from fcmae.weights.files import WeightsError, atomic_write
from fcmae.weights.reading import load_timm

MISSING = '--format onnx needs onnx and onnxruntime: pip install "fcmae[onnx]"'
INPUT = "images"
OUTPUTS = ("features", "logits")
OPSET = 20                 # onnxruntime runs it from 1.17 on
TRACE_BATCH = 2            # traced at 2 so that the batch axis stays symbolic (1 would specialise)
CHECK_IMAGES = 8           # sample photographs the fp16 check runs on
FP16_MAX = 65504.0
EXTERNAL_DATA_BYTES = 1.8e9  # beyond this a graph keeps its weights in a .data file (protobuf's 2 GB limit)
# the model's metadata_props: what a server needs to prepare its inputs
METADATA_KEYS = ("model", "in_chans", "input_size", "input", "output", "mean", "std", "channel_names",
                 "statistics", "num_classes", "fp16")


def require():
    """onnx, onnxscript and onnxruntime, or WeightsError with the command that installs them."""
    import importlib

    try:
        for module in ("onnx", "onnxruntime", "onnxscript"):
            importlib.import_module(module)
    except ImportError:
        raise WeightsError(MISSING) from None


class PooledFeatures(nn.Module):
    """A timm convnextv2 that ends in its features averaged over the positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return average_pooled(self.model, images)


def graph_module(model, output):
    """(the module to trace, the output's kind) for `output` "auto", "features" or "logits"."""
    has_classifier = model.num_classes > 0
    if output == "auto":
        output = "logits" if has_classifier else "features"
    if output == "logits" and not has_classifier:
        raise WeightsError("the weights have no classifier head, so there are no logits to export; use "
                           "--onnx_output features")
    if output not in OUTPUTS:
        raise WeightsError(f"unknown ONNX output {output!r}; choose one of: auto, {', '.join(OUTPUTS)}")
    return (model if output == "logits" else PooledFeatures(model)).eval(), output


def sample_batch(in_chans, size, statistics, count=CHECK_IMAGES):
    """The bundled sample photographs as the graph's input (count, in_chans, size, size) float32:
    resized and centre-cropped to `size` (bicubic), greyscale for one channel, RGB repeated over
    the channels for other counts, normalised with `statistics`."""
    from PIL import Image

    from fcmae.data import sample_photographs
    from fcmae.data.transforms import view_transform

    base = 1 if in_chans == 1 else 3
    view = view_transform(size, base, mean=(0.0,) * base, std=(1.0,) * base)  # pixels in [0, 1]
    images = []
    for path in sample_photographs()[:count]:
        with Image.open(path) as img:
            pixels = view(img.convert("L" if base == 1 else "RGB"))
        images.append(pixels[torch.arange(in_chans) % base])
    mean = torch.tensor(statistics["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(statistics["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((torch.stack(images) - mean) / std).numpy()


# ----- the graph ---------------------------------------------------------------------------------------

def trace(module, in_chans, size, output):
    """The ONNX ModelProto of `module` at `size`, batch axis dynamic (torch's dynamo exporter)."""
    example = torch.zeros(TRACE_BATCH, in_chans, size, size)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT], output_names=[output],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False)
    return program.model_proto


def set_metadata(proto, entries):
    """`entries` ({key: str}) as the model's metadata_props, replacing any of the same keys."""
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def metadata(arch_name, in_chans, size, output, statistics, num_classes):
    entries = {"model": arch_name, "in_chans": str(in_chans), "input_size": str(size), "output": output,
               "input": f"{INPUT}: float32 (batch, {in_chans}, {size}, {size}), (pixels in [0, 1] - mean) / std",
               "mean": json.dumps(list(statistics["mean"])), "std": json.dumps(list(statistics["std"])),
               "statistics": str(statistics["source"])}
    if statistics.get("channel_names") is not None:
        entries["channel_names"] = json.dumps(list(statistics["channel_names"]))
    if output == "logits":
        entries["num_classes"] = str(num_classes)
    return entries


def fp16_graph(proto):
    """The float16 graph (onnxruntime's converter): weights and computation in float16, inputs and
    outputs kept float32, so it takes what the float32 graph takes."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True)


def run(proto, batch):
    """The graph's first output on `batch`, with onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the float16 graph's casts are expected: no warnings about them
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: batch})[0]


# ----- the fp16 check -------------------------------------------------------------------------------

def grn_as_float16_engines_compute_it(grn, x):
    """timm's GlobalResponseNorm with its L2 norm spelled out as the square root of a sum of
    squares that is a float16 tensor, as TensorRT's ONNX parser imports ReduceL2 (ReduceSumSquare,
    then Sqrt): above 65504 it is inf. torch's own half norm accumulates in float32 and would hide
    that. Notes on the module whether the sum overflowed."""
    squares = (x * x).sum(dim=grn.spatial_dim, keepdim=True)
    grn.sum_of_squares_overflowed = not bool(torch.isfinite(squares).all())
    x_g = squares.sqrt()
    x_n = x_g / (x_g.mean(dim=grn.channel_dim, keepdim=True) + grn.eps)
    return x + torch.addcmul(grn.bias.view(grn.wb_shape), grn.weight.view(grn.wb_shape), x * x_n)


def half_copy(module):
    """A float16 copy of `module` (on the CPU) whose GRNs compute as float16 engines do."""
    from timm.layers.grn import GlobalResponseNorm

    half = copy.deepcopy(module).half().eval()
    for layer in half.modules():
        if isinstance(layer, GlobalResponseNorm):
            layer.forward = functools.partial(grn_as_float16_engines_compute_it, layer)
    return half


def first_non_finite(half, images):
    """(the first module, in the order they finish, whose output is not finite; its GRN sum of
    squares overflowed), or None."""
    found = []

    def note(name):
        def hook(layer, _, output):
            if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append((name.removeprefix("model."), getattr(layer, "sum_of_squares_overflowed", False)))
        return hook

    handles = [layer.register_forward_hook(note(name)) for name, layer in half.named_modules() if name]
    try:
        with torch.no_grad():
            half(images)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def fp16_check(module, batch, output):
    """None when `module` in float16 keeps its `output` finite on `batch`; else the sentence
    saying where it overflows. Run in torch float16 on the CPU (see the module's notes: the CPU
    provider of onnxruntime computes float16 graphs in float32)."""
    half = half_copy(module)
    images = torch.from_numpy(batch).half()
    with torch.no_grad():
        got = half(images)
    if torch.isfinite(got).all():
        return None
    where = first_non_finite(half, images)
    at = "" if where is None else (f" at {where[0]} (its sum of squares exceeds {FP16_MAX:g})" if where[1]
                                   else f" from {where[0]} on")
    return (f"fp16 overflows: the {output} are not finite in float16{at} on the sample photographs at "
            f"{batch.shape[-1]} px, so only the fp32 graph is written")


def fp16_difference(proto, half, batch):
    """The float16 graph's largest difference from the float32 graph's on `batch`, relative to the
    largest float32 value, both run by onnxruntime: whether the written float16 graph loads and
    agrees (not an overflow check: onnxruntime's CPU provider computes it in float32)."""
    import numpy as np

    reference, got = run(proto, batch), run(half, batch)
    return float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def fp16_path(path):
    return path.with_name(f"{path.stem}.fp16{path.suffix}")


def save(proto, path, parameters):
    """Write `proto` atomically; a graph too large for one protobuf keeps its weights in PATH.data."""
    import onnx

    external = parameters * 4 > EXTERNAL_DATA_BYTES
    options = dict(save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data") \
        if external else {}
    atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp), **options))


def export_onnx(source, path, output="auto", input_size=224, mean=None, std=None):
    """Export the weights at `source` (any checkpoint fcmae.weights reads) as an ONNX graph at
    `path`: timm's convnextv2 of their size and input channels, loaded strictly, traced at
    `input_size` with a dynamic batch, ending in `output` ("features", "logits" when the weights
    have a classifier, or "auto": logits when they have one, else features). The normalisation in
    its metadata is `mean`/`std` when given, else the statistics the weights keep, else the
    defaults (fcmae.data.statistics.statistics_for; ConfigError when none applies). Runs the fp16
    check (see the module's notes) and writes the float16 graph beside it when that passes. Returns
    (path, report): "output", "model", "in_chans", "statistics", "fp16" (the float16 graph's path
    or None), "fp16_problem" (the sentence, or None), "fp16_difference" (relative, or None)."""
    from fcmae.data.statistics import statistics_for

    require()
    model, _ = load_timm(source)
    name, in_chans = model_name(model), model.stem[0].in_channels
    module, output = graph_module(model, output)
    statistics = statistics_for(source, in_chans, mean, std)
    batch = sample_batch(in_chans, input_size, statistics)  # before the trace: a problem with them is cheap
    problem = fp16_check(module, batch, output)
    proto = trace(module, in_chans, input_size, output)
    entries = metadata(name, in_chans, input_size, output, statistics, model.num_classes)
    half = fp16_graph(proto) if problem is None else None
    difference = fp16_difference(proto, half, batch) if half is not None else None
    path, parameters = Path(path), sum(p.numel() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    checked = f"{len(batch)} sample photographs at {input_size} px"
    set_metadata(proto, {**entries, "fp16": f"finite on {checked}: {fp16_path(path).name}" if half else problem})
    save(proto, path, parameters)
    if half is not None:
        set_metadata(half, {**entries, "fp16": f"this float16 graph, finite on {checked}"})
        save(half, fp16_path(path), parameters // 2)
    elif fp16_path(path).exists():  # an earlier export's float16 graph would pass for this one's
        fp16_path(path).unlink()
    return path, {"output": output, "model": name, "in_chans": in_chans, "input_size": input_size,
                  "width": MODEL_SPECS[name].dims[-1], "num_classes": model.num_classes, "statistics": statistics,
                  "fp16": fp16_path(path) if half is not None else None, "fp16_problem": problem,
                  "fp16_difference": difference, "checked": checked}
