"""The `minkowski` backend: the encoder on MinkowskiEngine sparse tensors (optional).

This is the only module of the project that imports MinkowskiEngine, and only when the backend
is used. It reads the same parameters as the other backends and reshapes the conv weights into
MinkowskiEngine's kernel layout on the fly (differentiably, through torch.func.functional_call),
so any checkpoint runs with any backend. Unlike the official code it takes the coordinates from
the mask, never from feature values, applies GRN per sample, and always returns the full grid.
"""
import collections
import collections.abc
import warnings

import torch

from fcmae.layouts import to_theirs
from fcmae.models.backends.common import (
    ENCODER_STRIDE, block_pointwise, grn_by_sample, layer_norm, patch_visibility, upsample_visibility,
)
from fcmae.models.backends.record import Backend

INSTALL_HINT = ("the minkowski backend needs MinkowskiEngine, which is not installed; build and install it "
                "with `bash scripts/install_minkowski.sh` (about 10 minutes), or use backend 'sparse'")


def import_minkowski():
    """MinkowskiEngine, imported on first use (it needs collections.Sequence, gone since Python 3.10)."""
    if not hasattr(collections, "Sequence"):
        collections.Sequence = collections.abc.Sequence
    try:
        with warnings.catch_warnings():
            if not torch.cuda.is_available():  # a CPU-only build on a CPU-only machine is no news
                warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
            import MinkowskiEngine
    except ImportError as err:
        raise ValueError(INSTALL_HINT) from err
    return MinkowskiEngine


def check(device=None):
    """ValueError (one sentence) when MinkowskiEngine is missing or, for CUDA, is a CPU-only build."""
    me = import_minkowski()
    if device is not None:
        check_device(me, torch.device(device))


def check_device(me, device):
    """One clear sentence instead of MinkowskiEngine's error when a CPU-only build meets CUDA tensors."""
    if device.type == "cuda" and not me.is_cuda_available():
        raise ValueError("this MinkowskiEngine is a CPU-only build and cannot run on CUDA tensors; build the CUDA "
                         "one with `bash scripts/install_minkowski.sh --cuda`, or use backend 'sparse'")


def _conv_module(encoder, kind, device, *shape):
    """A parameter-less stand-in MinkowskiEngine conv module, cached on the encoder (it holds no
    weights: ours are passed in at every call)."""
    me = import_minkowski()
    cache = encoder.__dict__.setdefault("_minkowski_modules", {})
    key = (kind, device, *shape)
    if key not in cache:
        with warnings.catch_warnings():  # its modules instantiate autograd Functions: deprecated, harmless
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            cache[key] = _new_conv_module(me, kind, device, *shape).to(device)
    return cache[key]


def _new_conv_module(me, kind, device, *shape):
    if kind == "depthwise":
        return depthwise_class(me, device)(shape[0], kernel_size=7, bias=False, dimension=2)
    return me.MinkowskiConvolution(shape[0], shape[1], kernel_size=2, stride=2, bias=False, dimension=2)


def depthwise_class(me, device):
    """The fused CUDA kernel of the official code's fork (scripts/install_minkowski.sh --fork) on
    CUDA where installed, else upstream's channelwise convolution; both keep the kernel as
    (offsets, channels) in the same offset order."""
    fused = getattr(me, "MinkowskiDepthwiseConvolution", None)
    return fused if fused is not None and device.type == "cuda" else me.MinkowskiChannelwiseConvolution


def _conv(encoder, module_kind, conv, x, me_kind):
    """Apply our dense conv `conv` to the sparse tensor `x` with MinkowskiEngine; half-precision
    features go in as float32, since its kernels have none (under autocast the rest of the block
    still runs in half precision)."""
    me = import_minkowski()
    if x.F.dtype in (torch.float16, torch.bfloat16):
        x = me.SparseTensor(x.F.float(), coordinate_map_key=x.coordinate_map_key,
                            coordinate_manager=x.coordinate_manager)
    dtype = x.F.dtype
    shape = (conv.in_channels,) if module_kind == "depthwise" else (conv.in_channels, conv.out_channels)
    module = _conv_module(encoder, module_kind, x.F.device, *shape)
    kernel = to_theirs(conv.weight.to(dtype), me_kind).contiguous()
    out = torch.func.functional_call(module, {"kernel": kernel}, (x,))
    return out, out.F + conv.bias.to(dtype)


def minkowski_forward(encoder, imgs, mask, num_visible=None):
    # num_visible is not used: MinkowskiEngine builds its coordinate maps on the host anyway
    me = import_minkowski()
    check_device(me, imgs.device)
    n, _, height, width = imgs.shape
    visible = upsample_visibility(patch_visibility(mask, height // ENCODER_STRIDE, width // ENCODER_STRIDE), 8)
    stem = encoder.stem(imgs)  # dense, as the official code
    coords = visible.nonzero().int().contiguous()  # (rows, 3): sample, y, x - from the mask alone
    feats = stem.permute(0, 2, 3, 1)[visible]
    x = me.SparseTensor(features=feats, coordinates=coords)
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            normed = me.SparseTensor(layer_norm(x.F, ds_norm), coordinate_map_key=x.coordinate_map_key,
                                     coordinate_manager=x.coordinate_manager)
            out, feats = _conv(encoder, "downsample", ds_conv, normed, "me_conv")
            x = me.SparseTensor(feats, coordinate_map_key=out.coordinate_map_key,
                                coordinate_manager=out.coordinate_manager)
        sample = x.C[:, 0].long()
        for block in stage.blocks:
            _, y = _conv(encoder, "depthwise", block.conv_dw, x, "me_dw")
            y = block_pointwise(block, y, lambda h, module, s=sample: grn_by_sample(h, s, n, module))
            x = me.SparseTensor(x.F + y, coordinate_map_key=x.coordinate_map_key,
                                coordinate_manager=x.coordinate_manager)
    # scatter into the full grid (never x.dense(), which shrinks it to the largest coordinate)
    stride = 8
    coords = x.C.long()
    latent = x.F.new_zeros(n, height // ENCODER_STRIDE, width // ENCODER_STRIDE, x.F.shape[1])
    latent = latent.index_put((coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride), x.F)
    return latent.permute(0, 3, 1, 2)


# optional: needs MinkowskiEngine (scripts/install_minkowski.sh); never chosen by "auto", which the
# pure-PyTorch sparse backend outruns on every device measured (docs/performance.md)
BACKEND = Backend("minkowski", minkowski_forward, not_compilable="torch.compile cannot trace MinkowskiEngine",
                  check=check)
