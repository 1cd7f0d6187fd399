"""The `dense` backend: masked dense convolution, any device.

The whole feature map is computed, and masked positions are zeroed before every operation
that mixes positions (depthwise conv, downsampling conv, GRN's norm), so they never reach a
visible position. Visible outputs equal those of the submanifold-sparse network.
"""
import torch

from fcmae.models.backends.common import (
    ENCODER_STRIDE, block_pointwise, channel_norms, grn, layer_norm, patch_visibility, stage_factors,
    upsample_visibility,
)
from fcmae.models.backends.record import Backend


def dense_block(block, x, mask=None):
    """One ConvNeXt V2 block on an (N, C, H, W) map.

    mask: (N, H, W, 1) float, 1 where visible, or None for a fully visible map (the decoder).
    `x` must already be zero at masked positions; the output is too.
    """
    y = block.conv_dw(x).permute(0, 2, 3, 1)

    def apply_grn(h, module):
        return grn(h, channel_norms(h if mask is None else h * mask, dim=(1, 2)), module)

    y = block_pointwise(block, y, apply_grn)
    if mask is not None:
        y = y * mask
    return x + y.permute(0, 3, 1, 2)


def dense_forward(encoder, imgs, mask, num_visible=None):
    # num_visible is not needed: the masks' shapes never depend on the mask
    n, _, height, width = imgs.shape
    visible = patch_visibility(mask, height // ENCODER_STRIDE, width // ENCODER_STRIDE)
    # channels-last (N, H, W, 1) float masks, one per stage
    masks = [upsample_visibility(visible, f).unsqueeze(-1).to(imgs.dtype) for f in stage_factors()]

    # channels-last memory keeps the depthwise convs fast and the permutes below free
    x = encoder.stem(imgs).contiguous(memory_format=torch.channels_last) * masks[0].permute(0, 3, 1, 2)
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            x = layer_norm(x.permute(0, 2, 3, 1), ds_norm) * masks[i - 1]
            x = ds_conv(x.permute(0, 3, 1, 2)) * masks[i].permute(0, 3, 1, 2)
        for block in stage.blocks:
            x = dense_block(block, x, masks[i])
    return x


# exact, and the reference the others are tested against; it computes the masked patches too
BACKEND = Backend("dense", dense_forward, auto_rank=1)
