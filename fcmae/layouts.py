"""How one tensor changes shape between this project's layout and another ConvNeXt V2 layout.

A weight format (fcmae.weights.formats) maps each of our keys to one of its keys with a kind:

    same    identical tensor
    vector  (C,) here, (1, 1, 1, C) in the dense official and Hugging Face GRN
    row     (C,) here, (1, C) for MinkowskiEngine GRN parameters and biases
    linear  (out, in) or (out, in, 1, 1) here (timm uses 1x1 convs for atto..nano), (out, in) there
    me_dw   depthwise conv (C, 1, k, k) here, MinkowskiEngine kernel (k*k, C) there
    me_conv conv (C_out, C_in, k, k) here, MinkowskiEngine kernel (k*k, C_in, C_out) there

MinkowskiEngine enumerates kernel offsets with the two spatial axes in the other order from
PyTorch's weight layout; the official conversion transposes them, and so do we. The `minkowski`
backend uses the same maps to hand our dense weights to MinkowskiEngine's convolutions.
"""
import torch


def to_theirs(tensor, kind):
    """Our `tensor` as the other layout holds it."""
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
