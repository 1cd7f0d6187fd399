"""Key and tensor-layout maps between this project's state dict and the other ConvNeXt V2 layouts.

Every map is built from the architecture (depths, decoder depth), as a list of
(our key, their key, kind) rows, so one table serves both directions. The kind says how a
tensor changes shape on the way:

    same    identical tensor
    vector  (C,) here, (1, 1, 1, C) in the dense official and Hugging Face GRN
    row     (C,) here, (1, C) for MinkowskiEngine GRN parameters and biases
    linear  (out, in) or (out, in, 1, 1) here (timm uses 1x1 convs for atto..nano), (out, in) there
    me_dw   depthwise conv (C, 1, k, k) here, MinkowskiEngine kernel (k*k, C) there
    me_conv conv (C_out, C_in, k, k) here, MinkowskiEngine kernel (k*k, C_in, C_out) there

MinkowskiEngine enumerates kernel offsets with the two spatial axes in the other order from
PyTorch's weight layout; the official conversion transposes them, and so do we.
"""
import torch

LAYOUTS = ("fcmae", "timm", "official", "minkowski", "hf")


def _block_rows(ours, theirs, style):
    """Rows for one ConvNeXt V2 block: `ours` and `theirs` are key prefixes ending in '.'."""
    if style == "hf":
        names = [("conv_dw", "dwconv", "same"), ("norm", "layernorm", "same"), ("mlp.fc1", "pwconv1", "linear"),
                 ("mlp.fc2", "pwconv2", "linear")]
        grn = [("mlp.grn.weight", "grn.weight", "vector"), ("mlp.grn.bias", "grn.bias", "vector")]
    elif style == "minkowski":
        names = [("norm", "norm.ln", "same"), ("mlp.fc1", "pwconv1.linear", "linear"),
                 ("mlp.fc2", "pwconv2.linear", "linear")]
        grn = [("mlp.grn.weight", "grn.gamma", "row"), ("mlp.grn.bias", "grn.beta", "row"),
               ("conv_dw.weight", "dwconv.kernel", "me_dw"), ("conv_dw.bias", "dwconv.bias", "row")]
    else:  # official dense
        names = [("conv_dw", "dwconv", "same"), ("norm", "norm", "same"), ("mlp.fc1", "pwconv1", "linear"),
                 ("mlp.fc2", "pwconv2", "linear")]
        grn = [("mlp.grn.weight", "grn.gamma", "vector"), ("mlp.grn.bias", "grn.beta", "vector")]
    rows = []
    for our_name, their_name, kind in names:
        rows.append((f"{ours}{our_name}.weight", f"{theirs}{their_name}.weight", kind))
        rows.append((f"{ours}{our_name}.bias", f"{theirs}{their_name}.bias", "same"))
    rows += [(f"{ours}{a}", f"{theirs}{b}", kind) for a, b, kind in grn]
    return rows


def encoder_rows(depths, layout):
    """(our key, their key, kind) for the encoder in the official, MinkowskiEngine or Hugging Face
    layout; our keys without the 'encoder.' prefix (timm's keys are ours)."""
    rows = []
    if layout == "hf":
        stem = [("stem.0", "embeddings.patch_embeddings"), ("stem.1", "embeddings.layernorm")]
    else:
        stem = [("stem.0", "downsample_layers.0.0"), ("stem.1", "downsample_layers.0.1")]
    for ours, theirs in stem:
        rows += [(f"{ours}.weight", f"{theirs}.weight", "same"), (f"{ours}.bias", f"{theirs}.bias", "same")]
    for i, depth in enumerate(depths):
        if i > 0:
            if layout == "hf":
                norm, conv = f"encoder.stages.{i}.downsampling_layer.0", f"encoder.stages.{i}.downsampling_layer.1"
                rows += [(f"stages.{i}.downsample.1.weight", f"{conv}.weight", "same"),
                         (f"stages.{i}.downsample.1.bias", f"{conv}.bias", "same")]
            elif layout == "minkowski":
                norm, conv = f"downsample_layers.{i}.0.ln", f"downsample_layers.{i}.1"
                rows += [(f"stages.{i}.downsample.1.weight", f"{conv}.kernel", "me_conv"),
                         (f"stages.{i}.downsample.1.bias", f"{conv}.bias", "row")]
            else:
                norm, conv = f"downsample_layers.{i}.0", f"downsample_layers.{i}.1"
                rows += [(f"stages.{i}.downsample.1.weight", f"{conv}.weight", "same"),
                         (f"stages.{i}.downsample.1.bias", f"{conv}.bias", "same")]
            rows += [(f"stages.{i}.downsample.0.weight", f"{norm}.weight", "same"),
                     (f"stages.{i}.downsample.0.bias", f"{norm}.bias", "same")]
        for j in range(depth):
            theirs = f"encoder.stages.{i}.layers.{j}." if layout == "hf" else f"stages.{i}.{j}."
            rows += _block_rows(f"stages.{i}.blocks.{j}.", theirs, layout)
    return rows


def decoder_rows(decoder_depth):
    """Decoder rows, the same in the official dense and MinkowskiEngine checkpoints."""
    rows = [(k, k, "same") for k in ("proj.weight", "proj.bias", "mask_token", "pred.weight", "pred.bias")]
    for j in range(decoder_depth):
        rows += _block_rows(f"decoder.{j}.", f"decoder.{j}.", "official")
    return rows


def to_theirs(tensor, kind):
    if kind == "same":
        return tensor
    if kind == "vector":
        return tensor.reshape(1, 1, 1, -1)
    if kind == "row":
        return tensor.reshape(1, -1)
    if kind == "linear":
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    k = tensor.shape[-1]
    if kind == "me_dw":  # (C, 1, k, k) -> (k*k, C)
        return tensor.transpose(3, 2).reshape(tensor.shape[0], k * k).permute(1, 0)
    if kind == "me_conv":  # (C_out, C_in, k, k) -> (k*k, C_in, C_out)
        return tensor.transpose(3, 2).reshape(tensor.shape[0], tensor.shape[1], k * k).permute(2, 1, 0)
    raise ValueError(kind)


def to_ours(tensor, kind, shape):
    """`tensor` from another layout, as the tensor of our `shape`."""
    if kind == "me_dw":  # (k*k, C) -> (C, 1, k, k)
        c, _, k, _ = shape
        tensor = tensor.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2)
    elif kind == "me_conv":  # (k*k, C_in, C_out) -> (C_out, C_in, k, k)
        c_out, c_in, k, _ = shape
        tensor = tensor.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(3, 2)
    elif kind != "same" or tensor.shape != shape:
        tensor = tensor.reshape(shape)
    return tensor.contiguous()


def their_shape(kind, our_shape):
    """The shape a tensor of `our_shape` has in the other layout."""
    return tuple(to_theirs(torch.empty(our_shape, device="meta"), kind).shape)
