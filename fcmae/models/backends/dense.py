"""The `dense` backend: masked dense convolution, any device.

The whole feature map is computed, and masked positions are zeroed before every operation
that mixes positions (depthwise conv, downsampling conv, GRN's norm), so they never reach a
visible position. Visible outputs equal those of the submanifold-sparse network.
"""
import torch

from fcmae.models.backends.common import (
    block_pointwise, grn, layer_norm, stats_dtype, patch_visibility, stage_factors, upsample_visibility,
)


def masked_norms(h, m):
    """Per-sample channel L2 norms of channels-last `h` over the positions where `m` is 1."""
    return torch.linalg.vector_norm(h * m, dim=(1, 2), keepdim=True, dtype=stats_dtype(h))


def dense_forward(encoder, imgs, mask):
    n, _, height, width = imgs.shape
    visible = patch_visibility(mask, height // 32, width // 32)
    # channels-last (N, H, W, 1) float masks, one per stage
    masks = [upsample_visibility(visible, f).unsqueeze(-1).to(imgs.dtype) for f in stage_factors()]

    # channels-last memory keeps the depthwise convs fast and the permutes below free
    x = encoder.stem(imgs).contiguous(memory_format=torch.channels_last) * masks[0].permute(0, 3, 1, 2)
    for i, stage in enumerate(encoder.stages):
        m = masks[i]
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            x = layer_norm(x.permute(0, 2, 3, 1), ds_norm) * masks[i - 1]
            x = ds_conv(x.permute(0, 3, 1, 2)) * m.permute(0, 3, 1, 2)
        for block in stage.blocks:
            y = block.conv_dw(x).permute(0, 2, 3, 1)
            y = block_pointwise(block, y, lambda h, module, m=m: grn(h, masked_norms(h, m), module))
            x = x + (y * m).permute(0, 3, 1, 2)
    return x
