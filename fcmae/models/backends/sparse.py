"""The `sparse` backend: pure PyTorch, per-location layers run on visible locations only.

Features live as a (rows, C) matrix holding only the visible locations of a stage. Rows come
patch by patch (samples in order, each sample's visible patches in order) and, inside a patch,
in Z order: the quadtree order in which the four locations of every 2x2 cell are consecutive
(top-left, top-right, bottom-left, bottom-right). Patches align with the encoder's total stride,
so each 2x2 downsampling cell is wholly visible or wholly masked, and the cell of a visible
location is four consecutive rows of the finer stage: the downsampling conv is a reshape and a
Linear layer. LayerNorm, both MLP layers, GELU and GRN act on the rows, so their cost falls with
the mask ratio. The depthwise 7x7 conv scatters the rows into a zero-filled channels-last map,
runs the library's dense depthwise conv kernel over it and gathers the visible outputs back:
with masked inputs at zero this is exactly the submanifold sparse convolution.

With the number of visible patches per sample known (always so for random masks) every index
has a static size and is computed without waiting for the device, so a step has no host
synchronisation and torch.compile captures the encoder as one graph. Other masks (a different
count per sample) find their visible patches with nonzero(), which waits for the device.
"""
import torch
import torch.nn.functional as F

from fcmae.models.backends.common import (
    ENCODER_STRIDE, block_pointwise, compute_dtype, grn, grn_by_sample, layer_norm, stage_factors,
)
from fcmae.models.backends.record import Backend


def z_order(factor, device=None):
    """(dy, dx) of the factor x factor locations of a square in Z order (factor a power of 2).

    Location z has the bits of dy and dx interleaved, dy's above dx's: z = ...y1 x1 y0 x0, so
    z // 4 is its cell's Z index at half the resolution and z % 4 = 2 * (dy % 2) + dx % 2."""
    z = torch.arange(factor * factor, device=device)
    dy, dx = torch.zeros_like(z), torch.zeros_like(z)
    for bit in range(factor.bit_length() - 1):
        dy |= ((z >> (2 * bit + 1)) & 1) << bit
        dx |= ((z >> (2 * bit)) & 1) << bit
    return dy, dx


class VisiblePatches:
    """The visible patches of a batch, and where each stage's rows lie in that stage's map.

    mask: (N, h * w) with 1 = removed. num_visible: the number of visible patches of every
    sample when the caller knows it (no host synchronisation), else None. The rows of every
    stage are found here, once per forward, from the mask alone.
    """

    def __init__(self, mask, grid_h, grid_w, num_visible=None):
        n, num_patches = mask.shape
        self.num_samples, self.grid = n, (grid_h, grid_w)
        if num_visible is None:
            visible = mask == 0
            counts = visible.sum(1)
            uniform = counts.numel() == 0 or bool((counts == counts[0]).all())  # waits for the device
            num_visible = int(counts[0]) if uniform and counts.numel() else None
            flat = visible.reshape(-1).nonzero().squeeze(1)
        else:
            # a stable sort puts each sample's visible patches (0) first, in index order
            order = mask.argsort(dim=1, stable=True)[:, :num_visible]
            flat = (order + torch.arange(n, device=mask.device).unsqueeze(1) * num_patches).reshape(-1)
        self.per_sample = num_visible  # visible patches of each sample; None when counts differ
        self.sample = torch.div(flat, num_patches, rounding_mode="floor")
        patch = flat - self.sample * num_patches
        self.patch_y = torch.div(patch, grid_w, rounding_mode="floor")
        self.patch_x = patch - self.patch_y * grid_w
        factors = stage_factors()
        # the Z order of the largest square; that of a smaller one is its first factor ** 2 entries
        dy, dx = z_order(max(factors), flat.device)
        self.stages = [StageRows(self, f, dy[:f * f], dx[:f * f]) for f in factors]


class StageRows:
    """The rows of one stage, `factor` x `factor` locations per visible patch; (dy, dx): the
    locations of a patch in Z order."""

    def __init__(self, patches, factor, dy, dx):
        self.patches, self.factor = patches, factor
        h, w = patches.grid
        self.shape = (patches.num_samples, h * factor, w * factor)
        _, height, width = self.shape
        self.y = ((patches.patch_y * factor).unsqueeze(1) + dy).reshape(-1)  # each row's place in the map
        self.x = ((patches.patch_x * factor).unsqueeze(1) + dx).reshape(-1)
        self.sample = patches.sample.repeat_interleave(factor * factor)
        self.index = (self.sample * height + self.y) * width + self.x  # flat (n, y, x) of each row

    def scatter(self, rows):
        """(rows, C) -> (N, C, H, W) map, zero at masked positions, channels-last in memory."""
        n, h, w = self.shape
        flat = rows.new_zeros(n * h * w, rows.shape[1]).index_copy_(0, self.index, rows)
        return flat.view(n, h, w, -1).permute(0, 3, 1, 2)

    def gather(self, dense):
        """(N, C, H, W) map -> (rows, C) at the visible positions."""
        return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, self.index)

    def grn(self, rows, module):
        """GRN on (rows, C) with each sample's norms taken over its own visible rows."""
        patches, channels = self.patches, rows.shape[1]
        if patches.per_sample is not None:
            per_sample = rows.reshape(patches.num_samples, -1, channels)
            return grn(per_sample, module, dim=1).reshape(rows.shape)
        return grn_by_sample(rows, self.sample, patches.num_samples, module)


def stem_cells(imgs, rows, cell):
    """The cell x cell pixel cells of the stem's visible rows, (rows, C_in * cell * cell) in the
    stem conv's (c, dy, dx) weight order, read from the image in place (only visible cells are
    copied)."""
    n, c, height, width = imgs.shape
    cells = imgs.view(n, c, height // cell, cell, width // cell, cell).permute(0, 2, 4, 1, 3, 5)
    return cells[rows.sample, rows.y, rows.x].view(-1, c * cell * cell)


def sparse_forward(encoder, imgs, mask, num_visible=None):
    stages = VisiblePatches(mask, imgs.shape[2] // ENCODER_STRIDE, imgs.shape[3] // ENCODER_STRIDE,
                            num_visible).stages
    stem_conv, stem_norm = encoder.stem
    # The stem's 4x4 stride-4 conv is a Linear layer over 4x4 pixel cells: run it on visible cells.
    cells = stem_cells(imgs, stages[0], stem_conv.stride[0])
    rows = layer_norm(F.linear(cells, stem_conv.weight.flatten(1), stem_conv.bias), stem_norm)
    for i, stage in enumerate(encoder.stages):
        rows_at = stages[i]
        if i > 0:
            ds_norm, ds_conv = stage.downsample
            # each cell's four finer rows are consecutive, in (dy, dx) order
            cells = layer_norm(rows, ds_norm).reshape(-1, 4 * rows.shape[1])
            # conv weight (C_out, C_in, 2, 2) -> (C_out, 2*2*C_in) in the cells' (dy, dx, c) order
            rows = F.linear(cells, ds_conv.weight.permute(0, 2, 3, 1).flatten(1), ds_conv.bias)
        dtype = compute_dtype(rows)
        for block in stage.blocks:
            # scattered in the conv's dtype (bf16 under autocast): half the bytes, same conv input
            y = rows_at.gather(block.conv_dw(rows_at.scatter(rows.to(dtype))))
            rows = rows + block_pointwise(block, y, rows_at.grn)
    return stages[-1].scatter(rows)


# the fastest exact backend on every device measured so far, MinkowskiEngine included (docs/performance.md)
BACKEND = Backend("sparse", sparse_forward, auto_rank=0)
