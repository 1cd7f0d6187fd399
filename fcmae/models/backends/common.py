"""Pieces shared by the encoder backends.

Each backend walks the same timm modules and reads their parameters; only the spatial
operations (depthwise 7x7 conv, 2x2 downsampling) and the GRN's sum over positions differ.
The per-location layers below take channels-last tensors, (..., C), whatever the leading
shape: (N, H, W, C) in the dense backend, (visible rows, C) in the sparse one.
"""
import torch
import torch.nn.functional as F

# The encoder's total stride (stem 4, then three 2x downsamplings): the side of a mask patch.
ENCODER_STRIDE = 32


def patch_visibility(mask, grid_h, grid_w):
    """(N, L) mask with 1 = removed -> (N, h, w) bool, True where the patch is visible."""
    return mask.reshape(mask.shape[0], grid_h, grid_w) == 0


def upsample_visibility(visible, factor):
    """Nearest-neighbour upsampling of an (N, h, w) visibility map by an integer factor."""
    return visible.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def stage_factors(num_stages=4):
    """Upsampling factor from the patch grid to the resolution of each stage: 8, 4, 2, 1."""
    return [2 ** (num_stages - 1 - i) for i in range(num_stages)]


def layer_norm(x, norm):
    """LayerNorm over the last (channel) dim with the parameters of timm's LayerNorm or LayerNorm2d."""
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def linear(x, layer):
    """A Linear layer or a 1x1 Conv2d applied to channels-last rows."""
    return F.linear(x, layer.weight.flatten(1), layer.bias)


def compute_dtype(x):
    """The dtype autocast will run a convolution of `x` in (x's own when autocast is off, or on a
    device autocast does not know, such as the meta device)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def stats_dtype(x):
    """Norms are summed in at least float32, also under bf16/fp16 autocast (a plain dtype test:
    torch.promote_types would be one more dispatched operation per call)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channel_norms(x, dim):
    """L2 norm of each channel of channels-last `x` over `dim`, accumulated in at least float32.

    On a GPU (and the meta device that stands in for it) one fused reduction, without a float32
    copy of `x`; on the CPU a sum of squares, whose kernels are several times faster there than
    torch.linalg.vector_norm's over a non-innermost dim (a whole step measured 14% faster)."""
    if x.device.type == "cpu":
        return x.to(stats_dtype(x)).square().sum(dim=dim, keepdim=True).sqrt()
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=stats_dtype(x))


def grn(x, module, dim):
    """GlobalResponseNorm of channels-last `x`, each sample's norms taken over `dim` of `x`, the
    sample's positions: its visible ones only (the paper's masked formulation) when the others
    are zero or absent."""
    return ResponseNorm.apply(x, None, module.weight, module.bias, module.eps, dim)


def grn_given_norms(x, norms, module):
    """GlobalResponseNorm of channels-last `x` given per-sample, per-channel L2 norms that
    broadcast against `x`: for each row's sample, the norm of that channel over the sample's
    visible positions."""
    return ResponseNorm.apply(x, norms, module.weight, module.bias, module.eps, None)


class ResponseNorm(torch.autograd.Function):
    """GRN: gamma * (x * s) + beta + x with s = G / (mean over channels of G + eps), G the norms
    (given, or those of `x` over `dim`).

    Computed as x * (1 + gamma * s) + beta: the factor is one value per sample and channel, so
    the full-size tensor is touched once, not three times. The backward pass is written out: it
    dispatches half the operations autograd derives from the forward (which adds several per
    broadcast product and division), with the same result.
    """

    @staticmethod
    def forward(ctx, x, norms, gamma, beta, eps, dim):
        own = norms is None
        if own:
            norms = channel_norms(x, dim)
        denom = norms.mean(dim=-1, keepdim=True) + eps
        scale = norms / denom
        factor = 1.0 + gamma * scale
        # x / G stays finite (|x| <= G) and is 0 where G is (the channel is zero), as autograd's norm gradient
        safe_norms = norms.clamp_min(torch.finfo(norms.dtype).tiny) if own else None
        ctx.save_for_backward(x, gamma, scale, factor, denom, safe_norms)
        ctx.own, ctx.beta_shape = own, beta.shape
        return torch.addcmul(beta, x, factor)

    @staticmethod
    def backward(ctx, grad):
        x, gamma, scale, factor, denom, safe_norms = ctx.saved_tensors
        grad_factor = sum_to(grad * x, factor.shape)
        grad_scale = grad_factor * gamma
        # s_c = G_c / D with D = mean_k G_k + eps, so dL/dG_j = (dL/ds_j - mean_c(dL/ds_c * s_c)) / D
        grad_norms = (grad_scale - (grad_scale * scale).mean(dim=-1, keepdim=True)) / denom
        grad_gamma = sum_to(grad_factor * scale, gamma.shape)
        grad_beta = sum_to(grad, ctx.beta_shape)
        if ctx.own:  # dG/dx = x / G
            return torch.addcmul(grad * factor, x / safe_norms, grad_norms), None, grad_gamma, grad_beta, None, None
        return grad * factor, grad_norms, grad_gamma, grad_beta, None, None


def sum_to(x, shape):
    """`x` summed over its broadcast dims to `shape`, in one reduction where it can be
    (Tensor.sum_to_size adds a view when it drops leading dims)."""
    lead = x.dim() - len(shape)
    kept = [lead + i for i, size in enumerate(shape) if size == 1 and x.shape[lead + i] != 1]
    if lead and kept:
        return x.sum_to_size(shape)
    if lead:
        return x.sum(dim=tuple(range(lead)))
    return x.sum(dim=kept, keepdim=True) if kept else x


def grn_by_sample(rows, sample, num_samples, module):
    """GRN on (rows, C) features whose sample index is `sample` (any number of rows per sample)."""
    sum_sq = rows.new_zeros(num_samples, rows.shape[1], dtype=stats_dtype(rows))
    sum_sq = sum_sq.index_add_(0, sample, rows.to(sum_sq.dtype).square())
    # sqrt with a finite gradient at 0 (a sample with nothing visible)
    norms = sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt()
    return grn_given_norms(rows, norms.index_select(0, sample), module)


def block_pointwise(block, y, apply_grn):
    """The per-location half of a ConvNeXt V2 block: LayerNorm, fc1, GELU, GRN, fc2.

    `apply_grn(h, module)` runs the GRN `module` on the hidden activations `h`, taking each
    sample's norms over its visible positions only.
    """
    mlp = block.mlp
    h = mlp.act(linear(layer_norm(y, block.norm), mlp.fc1))
    return linear(apply_grn(h, mlp.grn), mlp.fc2)
