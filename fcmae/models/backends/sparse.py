"""The `sparse` backend: pure PyTorch, per-location layers run on visible locations only.

Features live as a (rows, C) matrix holding only the visible locations of a stage, in
row-major (sample, y, x) order. LayerNorm, both MLP layers, GELU and GRN act on those rows,
so their cost falls with the mask ratio. The depthwise 7x7 conv scatters the rows into a
zero-filled channels-last map, runs the library's dense depthwise conv kernel over it and
gathers the visible outputs back: with masked inputs at zero this is
exactly the submanifold sparse convolution. Patches align with the encoder's total stride,
so each 2x2 downsampling cell is either wholly visible or wholly masked; the downsampling
conv is a Linear layer over the four gathered rows of each visible cell.
"""
import torch
import torch.nn.functional as F

from fcmae.models.backends.common import (
    block_pointwise, channel_norms, grn, grn_by_sample, layer_norm, patch_visibility, stage_factors,
    upsample_visibility,
)


class VisibleGrid:
    """The visible locations of one stage's (N, H, W) map."""

    def __init__(self, visible, uniform):
        self.shape = tuple(visible.shape)
        n, h, w = self.shape
        self.index = visible.reshape(-1).nonzero().squeeze(1)  # flat (n, y, x) positions
        self.sample = torch.div(self.index, h * w, rounding_mode="floor")
        # every sample has the same number of visible rows (always so for random masks)
        self.uniform = uniform

    @property
    def num_rows(self):
        return self.index.numel()

    def scatter(self, rows):
        """(rows, C) -> (N, C, H, W) map, zero at masked positions, channels-last in memory."""
        n, h, w = self.shape
        flat = rows.new_zeros(n * h * w, rows.shape[1]).index_copy(0, self.index, rows)
        return flat.view(n, h, w, -1).permute(0, 3, 1, 2)

    def gather(self, dense):
        """(N, C, H, W) map -> (rows, C) at the visible positions."""
        return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, self.index)

    def cell_rows(self, finer):
        """For each visible location here, the rows of `finer` (twice the resolution) in its
        2x2 cell, ordered (dy, dx): shape (rows, 4)."""
        n, h, w = self.shape
        _, fine_h, fine_w = finer.shape
        y = torch.div(self.index % (h * w), w, rounding_mode="floor")
        x = self.index % w
        base = self.sample * (fine_h * fine_w) + 2 * y * fine_w + 2 * x
        offsets = torch.tensor([0, 1, fine_w, fine_w + 1], device=base.device)
        row_of = torch.full((n * fine_h * fine_w,), -1, dtype=torch.long, device=base.device)
        row_of[finer.index] = torch.arange(finer.num_rows, device=base.device)
        return row_of[base.unsqueeze(1) + offsets]

    def grn(self, rows, module):
        """GRN on (rows, C) with each sample's norms taken over its own visible rows."""
        n, channels = self.shape[0], rows.shape[1]
        if self.uniform:
            per_sample = rows.reshape(n, -1, channels)
            norms = channel_norms(per_sample, dim=1)
            return grn(per_sample, norms, module).reshape(rows.shape)
        return grn_by_sample(rows, self.sample, n, module)


def build_grids(mask, height, width):
    visible = patch_visibility(mask, height // 32, width // 32)
    counts = visible.flatten(1).sum(1)
    uniform = bool((counts == counts[0]).all()) if counts.numel() else True
    return [VisibleGrid(upsample_visibility(visible, f), uniform) for f in stage_factors()]


def sparse_forward(encoder, imgs, mask):
    grids = build_grids(mask, imgs.shape[2], imgs.shape[3])
    stem_conv, stem_norm = encoder.stem
    # The stem's 4x4 stride-4 conv is a Linear layer over 4x4 pixel cells: run it on visible cells.
    cells = grids[0].gather(F.pixel_unshuffle(imgs, stem_conv.stride[0]))
    rows = layer_norm(F.linear(cells, stem_conv.weight.flatten(1), stem_conv.bias), stem_norm)
    for i, stage in enumerate(encoder.stages):
        grid = grids[i]
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            cells = layer_norm(rows, ds_norm)[grid.cell_rows(grids[i - 1])].flatten(1)
            # conv weight (C_out, C_in, 2, 2) -> (C_out, 2*2*C_in) in the cells' (dy, dx, c) order
            rows = F.linear(cells, ds_conv.weight.permute(0, 2, 3, 1).flatten(1), ds_conv.bias)
        for block in stage.blocks:
            y = grid.gather(block.conv_dw(grid.scatter(rows)))
            rows = rows + block_pointwise(block, y, grid.grn)
    return grids[-1].scatter(rows)
