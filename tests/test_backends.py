"""The encoder backends compute the exact submanifold-sparse ConvNeXt V2 and agree with each other."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fcmae
from fcmae.models.backends import BACKENDS, minkowski, resolve_backend
from fcmae.models.backends.sparse import VisiblePatches, z_order
from conftest import BACKEND_NAMES, MINKOWSKI, fixed_probe, rel_err, require_backend
FP32_OUT_TOL = 2e-5   # observed ~1e-6: rounding only
FP32_GRAD_TOL = 1e-4  # observed ~2e-6


def run_backend(model, backend, imgs, mask):
    """latent, pred, loss and every parameter's gradient under one backend."""
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    loss, pred, _ = model(imgs, mask)
    # the probe term sends a gradient everywhere, also when nothing is masked (loss == 0)
    (loss + (pred * fixed_probe(pred.shape).to(pred)).mean()).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    latent = model.forward_encoder(imgs, mask).detach()
    return latent, pred.detach(), loss.detach(), grads


AGREEMENT_CASES = [
    # model, (H, W), mask ratio, batch, in_chans
    ("convnextv2_atto", (224, 224), 0.6, 4, 3),
    ("convnextv2_atto", (64, 64), 0.0, 1, 3),
    ("convnextv2_femto", (256, 192), 0.6, 1, 3),
    ("convnextv2_pico", (224, 160), 0.9, 4, 3),
    ("convnextv2_nano", (96, 64), 0.6, 4, 1),
    ("convnextv2_tiny", (128, 96), 0.6, 1, 3),
    ("convnextv2_tiny", (224, 224), 0.9, 1, 1),
    pytest.param("convnextv2_base", (96, 96), 0.6, 4, 3, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,ratio,batch,in_chans", AGREEMENT_CASES)
def test_backends_agree_fp32(make_model, device, name, size, ratio, batch, in_chans):
    model = make_model(name, mask_ratio=ratio, in_chans=in_chans, decoder_embed_dim=128).to(device)
    torch.manual_seed(1)
    imgs = torch.randn(batch, in_chans, *size, device=device)
    mask = model.random_mask(imgs)
    ref = run_backend(model, "dense", imgs, mask)
    assert ref[0].shape == (batch, model.encoder.num_features, size[0] // 32, size[1] // 32)
    assert ref[0].abs().max() > 0 or ratio > 0.85  # a real latent, not zeros
    for backend in BACKEND_NAMES[1:]:
        if not BACKENDS[backend].available(device):
            continue  # a CPU-only MinkowskiEngine beside a GPU: the other backends are still compared
        out = run_backend(model, backend, imgs, mask)
        assert out[0].shape == ref[0].shape, backend
        assert rel_err(out[0], ref[0]) < FP32_OUT_TOL, backend
        assert rel_err(out[1], ref[1]) < FP32_OUT_TOL, backend
        assert abs(out[2].item() - ref[2].item()) <= FP32_OUT_TOL * max(1.0, abs(ref[2].item())), backend
        assert ref[3].keys() == out[3].keys()
        for key in ref[3]:
            assert torch.isfinite(out[3][key]).all(), (backend, key)
            assert rel_err(out[3][key], ref[3][key]) < FP32_GRAD_TOL, (backend, key)


def test_backends_agree_to_float64_precision(make_model):
    """In float64 the backends differ by ~1e-15: the fp32 differences above are rounding."""
    model = make_model("convnextv2_atto", decoder_embed_dim=64).double()
    imgs = torch.randn(2, 3, 224, 192, dtype=torch.float64)
    mask = model.random_mask(imgs)
    ref = run_backend(model, "dense", imgs, mask)
    for backend in BACKEND_NAMES[1:]:
        out = run_backend(model, backend, imgs, mask)
        assert rel_err(out[0], ref[0]) < 1e-12, backend
        assert rel_err(out[1], ref[1]) < 1e-12, backend
        for key in ref[3]:
            assert rel_err(out[3][key], ref[3][key]) < 1e-10, (backend, key)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_masked_pixels_never_reach_visible_positions(make_model, device, backend):
    require_backend(backend, device)
    model = make_model(backend=backend).to(device)
    imgs = torch.randn(3, 3, 224, 224, device=device)
    mask = model.random_mask(imgs)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 32 * 32 * 3)).bool()
    other = torch.where(removed, 100 * torch.randn_like(imgs), imgs)  # wild masked pixels
    with torch.no_grad():
        a, b = model.forward_encoder(imgs, mask), model.forward_encoder(other, mask)
    latent_removed = mask.view(3, 1, 7, 7).bool().expand_as(a)
    assert (a[latent_removed] == 0).all() and (b[latent_removed] == 0).all()
    assert rel_err(b, a) < FP32_OUT_TOL

    # and in the backward pass: no gradient flows from the visible latent to masked pixels
    x = imgs.clone().requires_grad_()
    model.forward_encoder(x, mask).pow(2).sum().backward()
    assert (x.grad[removed] == 0).all()
    assert x.grad[~removed].abs().max() > 0


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_sample_does_not_depend_on_its_batch_mates(make_model, device, backend):
    """GRN is per sample (the official MinkowskiEngine GRN pools over the whole batch)."""
    require_backend(backend, device)
    model = make_model(backend=backend).to(device)
    imgs = torch.randn(4, 3, 224, 224, device=device)
    mask = model.random_mask(imgs)
    with torch.no_grad():
        together = model.forward_encoder(imgs, mask)
        for i in range(4):
            alone = model.forward_encoder(imgs[i:i + 1], mask[i:i + 1])
            assert rel_err(alone, together[i:i + 1]) < FP32_OUT_TOL
        # a different batch mate changes nothing either
        swapped = torch.cat([imgs[:1], torch.randn_like(imgs[1:])])
        assert rel_err(model.forward_encoder(swapped, mask)[0], together[0]) < FP32_OUT_TOL


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("edge", ["last_row", "last_column", "first_row_and_column"])
def test_latent_is_never_shrunk(make_model, backend, edge):
    """The official code's x.dense() returns 6x7 when the last patch row is masked in the whole
    batch, and its decoder crashes; ours always returns the full grid."""
    model = make_model(backend=backend)
    imgs = torch.randn(2, 3, 224, 224)
    mask = torch.zeros(2, 7, 7)
    if edge == "last_row":
        mask[:, -1, :] = 1
    elif edge == "last_column":
        mask[:, :, -1] = 1
    else:
        mask[:, 0, :] = 1
        mask[:, :, 0] = 1
    mask = mask.flatten(1)
    latent = model.forward_encoder(imgs, mask)
    assert latent.shape == (2, 320, 7, 7)
    loss, pred, _ = model(imgs, mask)
    assert pred.shape == (2, 32 * 32 * 3, 7, 7)
    assert torch.isfinite(loss)


def test_uneven_masks_agree_and_keep_gradients_finite(make_model):
    """A user mask may keep a different number of patches per sample, even none or all."""
    model = make_model(decoder_embed_dim=64)
    imgs = torch.randn(4, 3, 128, 96)
    mask = (torch.rand(4, 12, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    mask[0] = 0  # everything visible
    mask[1] = 1  # nothing visible
    assert len(set((1 - mask).sum(1).tolist())) > 2
    ref = run_backend(model, "dense", imgs, mask)
    for backend in BACKEND_NAMES[1:]:
        out = run_backend(model, backend, imgs, mask)
        assert (ref[0][1] == 0).all() and (out[0][1] == 0).all()
        assert rel_err(out[0], ref[0]) < FP32_OUT_TOL, backend
        assert rel_err(out[1], ref[1]) < FP32_OUT_TOL, backend
        for key in ref[3]:
            assert torch.isfinite(out[3][key]).all() and torch.isfinite(ref[3][key]).all(), key
            assert rel_err(out[3][key], ref[3][key]) < FP32_GRAD_TOL, (backend, key)


@pytest.mark.parametrize("uneven", [False, True])
def test_each_stage_keeps_exactly_the_visible_set(uneven):
    """At every stage the rows are exactly the visible locations (each once), grouped by sample,
    and the four rows of each downsampling cell are consecutive in (dy, dx) order."""
    gen = torch.Generator().manual_seed(0)
    # 160x128 image: 5x4 patches; 12 visible of 20 in every sample, or a different count each
    mask = (torch.rand(3, 20, generator=gen).argsort(1).argsort(1) >= 12).float()
    if uneven:
        mask[1, :3] = 1 - mask[1, :3]
        assert len(set((mask == 0).sum(1).tolist())) > 1
    patches = VisiblePatches(mask, 5, 4, None if uneven else 12)
    assert patches.per_sample == (None if uneven else 12)
    visible = (mask == 0).view(3, 5, 4)
    previous = None
    for stage in range(4):
        factor = 2 ** (3 - stage)
        rows = patches.stages[stage]
        expected = visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        assert rows.shape == tuple(expected.shape)
        assert torch.equal(rows.index.sort().values, expected.flatten().nonzero().squeeze(1))
        _, h, w = rows.shape
        sample = rows.index // (h * w)
        assert torch.equal(sample, sample.sort().values)  # grouped by sample, in order
        if previous is not None:
            _, fh, fw = previous.shape
            fine = previous.index.view(-1, 4)  # consecutive rows of the finer stage, by cell
            fy, fx = (fine % (fh * fw)) // fw, fine % fw
            y, x = (rows.index % (h * w)) // w, rows.index % w
            assert torch.equal(fy // 2, y.unsqueeze(1).expand_as(fy))
            assert torch.equal(fx // 2, x.unsqueeze(1).expand_as(fx))
            assert torch.equal(fy % 2 * 2 + fx % 2, torch.arange(4).expand_as(fy))
        previous = rows


def test_z_order_visits_each_location_once_cell_by_cell():
    for factor in (1, 2, 4, 8):
        dy, dx = z_order(factor)
        assert sorted((dy * factor + dx).tolist()) == list(range(factor * factor))
        assert torch.equal(dy % 2 * 2 + dx % 2, torch.arange(factor * factor) % 4)
        if factor > 1:
            coarse_y, coarse_x = z_order(factor // 2)
            z = torch.arange(factor * factor)
            assert torch.equal(dy // 2, coarse_y[z // 4]) and torch.equal(dx // 2, coarse_x[z // 4])
        # a smaller square's Z order is the start of a larger one's (the stages share one)
        largest_y, largest_x = z_order(8)
        assert torch.equal(largest_y[:factor * factor], dy) and torch.equal(largest_x[:factor * factor], dx)


def pointwise_flops(model, imgs, mask):
    """Matmul FLOPs (forward and backward) of the encoder: its per-location layers.

    Convolutions are left out: torch's FlopCounterMode counts a grouped conv's backward as if
    it were dense, which would swamp the figure."""
    with FlopCounterMode(display=False) as counter:
        model.forward_encoder(imgs, mask).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm"))


def test_sparse_cost_falls_with_the_mask_ratio(make_model):
    model = make_model()
    imgs = torch.randn(2, 3, 224, 224)
    flops = {}
    for ratio in (0.0, 0.6, 0.9):
        model.mask_ratio = ratio
        torch.manual_seed(0)
        mask = model.random_mask(imgs)
        for backend in ("dense", "sparse"):
            model.set_backend(backend)
            flops[backend, ratio] = pointwise_flops(model, imgs, mask)
    assert flops["dense", 0.6] == flops["dense", 0.0] == flops["dense", 0.9]
    assert flops["sparse", 0.9] < flops["sparse", 0.6] < flops["sparse", 0.0]
    # the sparse backend's per-location work is proportional to the visible fraction (19/49 at
    # 0.6, 4/49 at 0.9); with nothing masked it equals the dense backend's, plus the stem and
    # downsampling convs, which it runs as matmuls
    assert flops["sparse", 0.0] < 1.1 * flops["dense", 0.0]
    assert flops["sparse", 0.6] == pytest.approx(19 / 49 * flops["sparse", 0.0], rel=1e-6)
    assert flops["sparse", 0.9] == pytest.approx(4 / 49 * flops["sparse", 0.0], rel=1e-6)


def test_backend_choice_and_switching(make_model):
    assert resolve_backend("auto") == "sparse"
    assert fcmae.create_model("convnextv2_atto").backend == "sparse"
    model = make_model(backend="dense")
    assert model.backend == "dense"
    assert model.set_backend("sparse").backend == "sparse"
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, dense, sparse, minkowski"):
        model.set_backend("cuda")


def test_minkowski_backend_says_how_to_install_it_or_is_there():
    if os.environ.get("CI") and not MINKOWSKI:
        pytest.fail("CI installs MinkowskiEngine (scripts/install_minkowski.sh), but it is not importable")
    if MINKOWSKI:
        assert fcmae.create_model("convnextv2_atto", backend="minkowski").backend == "minkowski"
    else:
        with pytest.raises(ValueError, match="scripts/install_minkowski.sh"):
            fcmae.create_model("convnextv2_atto", backend="minkowski")


def test_a_cpu_only_minkowskiengine_meeting_cuda_tensors_says_what_to_do():
    cpu_only = SimpleNamespace(is_cuda_available=lambda: False)
    cuda_build = SimpleNamespace(is_cuda_available=lambda: True)
    with pytest.raises(ValueError, match="CPU-only build.*install_minkowski.sh --cuda.*backend 'sparse'"):
        minkowski.check_device(cpu_only, torch.device("cuda"))
    minkowski.check_device(cpu_only, torch.device("cpu"))
    minkowski.check_device(cuda_build, torch.device("cuda"))


def test_the_forks_fused_depthwise_kernel_is_used_on_cuda_only():
    fork = SimpleNamespace(MinkowskiDepthwiseConvolution="fused", MinkowskiChannelwiseConvolution="channelwise")
    upstream = SimpleNamespace(MinkowskiChannelwiseConvolution="channelwise")
    assert minkowski.depthwise_class(fork, torch.device("cuda")) == "fused"
    assert minkowski.depthwise_class(fork, torch.device("cpu")) == "channelwise"  # the fork has no CPU kernel
    assert minkowski.depthwise_class(upstream, torch.device("cuda")) == "channelwise"


@pytest.mark.skipif(not MINKOWSKI, reason="MinkowskiEngine is not installed")
def test_the_minkowski_backend_says_it_cannot_be_compiled(make_model):
    model = make_model(backend="minkowski")
    with pytest.raises(ValueError, match="minkowski backend cannot be compiled.*use backend 'sparse'"):
        model.compile(fullgraph=True)


def test_only_the_minkowski_backend_imports_minkowskiengine():
    for path in Path(fcmae.__file__).parent.rglob("*.py"):
        if path.name != "minkowski.py":
            assert "import MinkowskiEngine" not in path.read_text(), path


def test_backends_share_one_state_dict():
    a = fcmae.create_model("convnextv2_atto", backend="dense")
    b = fcmae.create_model("convnextv2_atto", backend="sparse")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict(), strict=True)
    imgs = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        assert rel_err(b.forward_encoder(imgs, mask), a.forward_encoder(imgs, mask)) < FP32_OUT_TOL


# bf16 autocast, convnextv2_atto at 128 px, 8 seeds measured. Against float32, each backend:
# latent <= 9.2e-3, predictions <= 6.7e-3 (largest difference relative to the largest value),
# loss <= 3.1e-6 (relative). Sparse against dense, both under bf16: bit-identical in 7 of 8 seeds
# (the same precision path: bf16 convs and matmuls, float32 norms and LayerNorms); where one
# rounding flips, the mean absolute difference relative to the mean magnitude is 1.8e-3 (latent)
# and 4.9e-4 (predictions). One backend run without autocast gives 6.3e-3 and 1.1e-3.
BF16_LATENT_TOL = 1.5e-2
BF16_PRED_TOL = 1e-2
BF16_LOSS_TOL = 1e-5
BF16_BACKEND_LATENT_TOL = 3e-3  # mean relative difference, sparse against dense
BF16_BACKEND_PRED_TOL = 8e-4


def mean_rel_err(a, b):
    """Mean absolute difference relative to the mean magnitude of the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-30)).item()


def run_autocast(model, backend, imgs, mask, dtype):
    """latent, pred, loss of one backend under autocast to `dtype` (None: float32), as float32."""
    model.set_backend(backend)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, pred, _ = model(imgs, mask)
        latent = model.forward_encoder(imgs, mask)
    return latent.float(), pred.float(), loss.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_runs_and_stays_close(make_model, seed):
    """Under bf16 autocast every backend stays close to float32, and the pure-PyTorch ones agree
    with each other: the same precision path."""
    model = make_model(seed=seed, decoder_embed_dim=64)
    torch.manual_seed(seed)
    imgs = torch.randn(2, 3, 128, 128)
    mask = model.random_mask(imgs)
    reference = run_autocast(model, "dense", imgs, mask, None)
    dense = run_autocast(model, "dense", imgs, mask, torch.bfloat16)
    for backend in BACKEND_NAMES:
        latent, pred, loss = run_autocast(model, backend, imgs, mask, torch.bfloat16)
        assert torch.isfinite(loss)
        assert rel_err(latent, reference[0]) < BF16_LATENT_TOL, backend
        assert rel_err(pred, reference[1]) < BF16_PRED_TOL, backend
        assert abs(loss.item() - reference[2].item()) < BF16_LOSS_TOL * reference[2].item(), backend
        if BACKENDS[backend].compiles:  # MinkowskiEngine runs its convs in float32: a path of its own
            assert mean_rel_err(latent, dense[0]) < BF16_BACKEND_LATENT_TOL, backend
            assert mean_rel_err(pred, dense[1]) < BF16_BACKEND_PRED_TOL, backend


class DeviceWaits(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value back (item, bool,
    int, tolist go through _local_scalar_dense) and ops whose output size depends on the data."""
    WAITING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
               "aten::_unique2", "aten::unique_consecutive", "aten::bincount")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.WAITING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_a_training_step_with_random_masks_never_waits_for_the_device(make_model, backend):
    model = make_model(backend=backend, decoder_embed_dim=64)
    imgs = torch.randn(2, 3, 96, 64)
    mask = model.random_mask(imgs)
    with DeviceWaits() as waits:
        loss, _, _ = model(imgs)  # a random mask drawn by the model
        loss.backward()
        loss, _, _ = model(imgs, mask, num_visible=model.num_visible(imgs))  # a mask vouched for
        loss.backward()
    assert waits.seen == []
    # a mask given without its count is checked and counted, which waits (on a GPU)
    with DeviceWaits() as waits:
        model(imgs, mask)
    assert "aten::_local_scalar_dense" in waits.seen


def test_uneven_masks_take_the_path_that_counts(make_model):
    model = make_model(decoder_embed_dim=64)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert model.prepare_mask(imgs, mask)[1] is None
    assert model.prepare_mask(imgs, torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))[1] == 1
    with pytest.raises(ValueError, match="num_visible must be between 0 and 4"):
        model(imgs, mask, num_visible=5)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_the_step_after_the_mask_checks_is_one_graph(make_model, backend):
    """torch.compile(fullgraph=True) traces encoder, decoder and loss without a break (traced
    with the eager backend here: the trace is what is checked, not the code generator)."""
    model = make_model(backend=backend, decoder_embed_dim=64)
    imgs = torch.randn(2, 3, 96, 64)
    mask, num_visible = model.prepare_mask(imgs, model.random_mask(imgs))
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_masked, backend="eager", fullgraph=True)
    loss, pred, _ = compiled(imgs, mask, num_visible)
    ref_loss, ref_pred, _ = model.forward_masked(imgs, mask, num_visible)
    assert torch.equal(loss, ref_loss) and torch.equal(pred, ref_pred)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(imgs, mask, num_visible)  # autocast queries trace too


def test_response_norm_backward_is_the_derivative_of_its_forward():
    """The GRN's written-out backward, checked against finite differences in float64, with a
    channel that is zero in one sample (its norm's gradient must stay finite)."""
    from fcmae.models.backends.common import ResponseNorm
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    x[1, :, 2] = 0
    gamma, beta = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2))
    given = torch.rand(2, 1, 6, generator=gen, dtype=torch.float64) + 0.5
    for t in (x, gamma, beta, given):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ResponseNorm.apply(a[0], None, a[1], a[2], 1e-6, 1), (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda *a: ResponseNorm.apply(a[0], a[1], a[2], a[3], 1e-6, None),
                                    (x, given, gamma, beta))
    out = ResponseNorm.apply(x, None, gamma, beta, 1e-6, 1)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
