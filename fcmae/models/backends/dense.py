"""The `dense` backend: masked dense convolution, any device.

The whole feature map is computed, and masked positions are zeroed before every operation
that mixes positions (depthwise conv, downsampling conv, GRN's norm), so they never reach a
visible position. Visible outputs equal those of the submanifold-sparse network.
"""
import torch

from fcmae.models.backends.common import (
    ENCODER_STRIDE, block_pointwise, compute_dtype, grn, layer_norm, patch_visibility, stage_factors,
    upsample_visibility,
)
from fcmae.models.backends.record import Backend


def dense_block(block, x, mask=None):
    """One ConvNeXt V2 block on an (N, C, H, W) map.

    mask: (N, H, W, 1), 1 where visible, in the compute dtype, or None for a fully visible map
    (the decoder). `x` must already be zero at masked positions; the output is too.
    """
    y = block.conv_dw(x).permute(0, 2, 3, 1)

    def apply_grn(h, module):
        # masked positions zeroed first, so that the norms cover the visible ones only; what the
        # GRN makes of them is zeroed below
        return grn(h if mask is None else h * mask, module, dim=(1, 2))

    y = block_pointwise(block, y, apply_grn)
    if mask is not None:
        y = y * mask
    return x + y.permute(0, 3, 1, 2)


def dense_forward(encoder, imgs, mask, num_visible=None):
    # num_visible is not needed: the masks' shapes never depend on the mask
    n, _, height, width = imgs.shape
    visible = patch_visibility(mask, height // ENCODER_STRIDE, width // ENCODER_STRIDE)
    # channels-last (N, H, W, 1) masks, one per stage, in the dtype the convs run in (bf16 under
    # autocast), so that a mask never promotes the activations it multiplies: the sparse
    # backend's precision path
    masks = [upsample_visibility(visible, f).unsqueeze(-1).to(compute_dtype(imgs)) for f in stage_factors()]
    maps = [m.permute(0, 3, 1, 2) for m in masks]  # the same masks as (N, 1, H, W) views

    # channels-last memory keeps the depthwise convs fast and the permutes below free
    x = encoder.stem(imgs).contiguous(memory_format=torch.channels_last) * maps[0]
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            x = layer_norm(x.permute(0, 2, 3, 1), ds_norm) * masks[i - 1]
            x = ds_conv(x.permute(0, 3, 1, 2)) * maps[i]
        for block in stage.blocks:
            x = dense_block(block, x, masks[i])
    return x


# exact, and the reference the others are tested against; it computes the masked patches too
BACKEND = Backend("dense", dense_forward, auto_rank=1)
