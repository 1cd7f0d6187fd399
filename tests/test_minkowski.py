"""MinkowskiEngine itself confirms the kernel layout the weights import and the backend use.

These run wherever MinkowskiEngine is installed (CI installs it; a local run without it skips
them, and test_backends.py fails in CI if it is missing), on CUDA too with its CUDA build."""
import pytest
import torch
import torch.nn.functional as F

from fcmae.layouts import to_ours
from conftest import MINKOWSKI, rel_err, require_backend

pytestmark = [
    pytest.mark.skipif(not MINKOWSKI, reason="MinkowskiEngine is not installed"),
    # its modules instantiate autograd Functions, which torch deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def sparse_input(me, channels, device, grid=12, cell=1, seed=0):
    """A random sparse map: visible cells of `cell` x `cell` locations on a grid x grid map."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.rand(2, grid // cell, grid // cell, generator=gen) < 0.5
    visible = cells.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    coords = visible.nonzero().int().contiguous()
    feats = torch.randn(len(coords), channels, generator=gen)
    return me.SparseTensor(feats.to(device), coordinates=coords.to(device)), visible.to(device)


def to_dense(x, visible):
    dense = x.F.new_zeros(visible.shape[0], x.F.shape[1], *visible.shape[1:])
    c = x.C.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2]] = x.F
    return dense


@pytest.mark.parametrize("kind", ["MinkowskiChannelwiseConvolution", "MinkowskiDepthwiseConvolution"])
def test_imported_depthwise_kernel_matches_minkowskiengine(device, kind):
    """Upstream's channelwise convolution and, where the official code's fork is installed, its
    fused depthwise kernel (CUDA only) read the kernel layout the weights import writes."""
    from fcmae.models.backends.minkowski import import_minkowski

    require_backend("minkowski", device)
    me = import_minkowski()
    if kind == "MinkowskiDepthwiseConvolution" and not (hasattr(me, kind) and device.type == "cuda"):
        pytest.skip("the fork's fused depthwise kernel is not installed, or this is not CUDA (it has no CPU kernel)")
    x, visible = sparse_input(me, channels=6, device=device)
    conv = getattr(me, kind)(6, kernel_size=7, bias=False, dimension=2).to(device)
    torch.nn.init.normal_(conv.kernel)
    with torch.no_grad():
        y = conv(x)
        weight = to_ours(conv.kernel, "me_dw", (6, 1, 7, 7))
        dense = F.conv2d(to_dense(x, visible), weight, padding=3, groups=6)
    c = y.C.long()
    assert rel_err(dense[c[:, 0], :, c[:, 1], c[:, 2]], y.F) < 1e-5
    assert not torch.equal(weight, weight.transpose(2, 3))  # the check could tell the axes apart


def test_imported_downsampling_kernel_matches_minkowskiengine(device):
    from fcmae.models.backends.minkowski import import_minkowski

    require_backend("minkowski", device)
    me = import_minkowski()
    x, visible = sparse_input(me, channels=4, device=device, cell=2)  # 2x2-aligned, as patches are
    conv = me.MinkowskiConvolution(4, 5, kernel_size=2, stride=2, bias=False, dimension=2).to(device)
    torch.nn.init.normal_(conv.kernel)
    with torch.no_grad():
        y = conv(x)
        weight = to_ours(conv.kernel, "me_conv", (5, 4, 2, 2))
        dense = F.conv2d(to_dense(x, visible), weight, stride=2)
    c = y.C.long()
    assert rel_err(dense[c[:, 0], :, c[:, 1] // 2, c[:, 2] // 2], y.F) < 1e-5
