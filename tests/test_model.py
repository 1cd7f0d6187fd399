"""The FCMAE model: family, API, masking, loss, initialisation, errors."""
import math

import pytest
import timm
import torch

import fcmae
from fcmae.models import MODEL_SPECS, ConvNeXtV2Encoder, num_visible_patches, random_patch_mask
from conftest import BACKEND_NAMES, rel_err

# The official table (ConvNeXt V2 paper / official README).
OFFICIAL = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), 3.7),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), 5.2),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), 9.1),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), 15.6),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 28.6),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), 89.0),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), 198.0),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816), 660.0),
}


def test_family_has_the_official_shapes():
    assert fcmae.list_models() == [f"convnextv2_{s}" for s in OFFICIAL]
    for size, (depths, dims, _) in OFFICIAL.items():
        spec = MODEL_SPECS[f"convnextv2_{size}"]
        assert (spec.depths, spec.dims) == (depths, dims)


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_encoder_parameters_match_timm(size):
    """Same tensors as timm's convnextv2_<size> without its classifier head (head.norm, head.fc)."""
    name = f"convnextv2_{size}"
    with torch.device("meta"):  # shapes only: no memory, no init cost even for huge
        encoder = ConvNeXtV2Encoder(name)
        reference = timm.create_model(name, num_classes=0)
    ours = {k: v.shape for k, v in encoder.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("head.")}
    assert ours == theirs
    n_params = sum(p.numel() for p in encoder.parameters())
    assert n_params == sum(p.numel() for k, p in reference.named_parameters() if not k.startswith("head."))
    # the official table's count includes the 1000-class head and its norm
    head = 2 * MODEL_SPECS[name].dims[-1] + 1001 * MODEL_SPECS[name].dims[-1]
    assert (n_params + head) / 1e6 == pytest.approx(OFFICIAL[size][2], rel=0.005, abs=0.05)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("name,size", [
    ("convnextv2_atto", (224, 224)),   # 1x1-conv MLP in timm
    ("convnextv2_nano", (96, 160)),
    ("convnextv2_tiny", (128, 128)),   # Linear MLP in timm
])
def test_nothing_masked_equals_timm_forward_features(make_model, backend, name, size):
    model = make_model(name, backend=backend, mask_ratio=0.0)
    reference = timm.create_model(name, num_classes=0).eval()
    missing, unexpected = reference.load_state_dict(model.encoder.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"head.norm.weight", "head.norm.bias"}
    imgs = torch.randn(2, 3, *size)
    mask = model.random_mask(imgs)
    assert mask.sum() == 0
    with torch.no_grad():
        ours = model.forward_encoder(imgs, mask)
        theirs = reference.forward_features(imgs)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 2e-5


def test_forward_returns_loss_pred_mask():
    model = fcmae.create_model("convnextv2_atto")
    imgs = torch.randn(2, 3, 224, 224)
    loss, pred, mask = model(imgs)
    assert loss.shape == () and torch.isfinite(loss)
    assert pred.shape == (2, 32 * 32 * 3, 7, 7)
    assert mask.shape == (2, 49) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert model.forward_encoder(imgs, mask).shape == (2, 320, 7, 7)


@pytest.mark.parametrize("patches,ratio,keep", [
    (49, 0.6, 19), (49, 0.0, 49), (10, 0.9, 1), (48, 0.75, 12), (4, 0.6, 1),
])
def test_visible_patch_count(patches, ratio, keep):
    assert num_visible_patches(patches, ratio) == keep


def test_random_mask_keeps_the_official_count_and_is_seeded():
    torch.manual_seed(0)
    a = random_patch_mask(16, 49, 0.6)
    torch.manual_seed(0)
    b = random_patch_mask(16, 49, 0.6)
    assert torch.equal(a, b)
    assert ((1 - a).sum(1) == 19).all()
    assert len({tuple(row.tolist()) for row in a}) == 16  # a different draw per sample
    # roughly uniform over positions
    many = random_patch_mask(4000, 49, 0.6)
    assert (many.mean(0) - 30 / 49).abs().max() < 0.05


@pytest.mark.parametrize("size,in_chans,ratio", [
    ((256, 192), 3, 0.6), ((64, 320), 1, 0.75), ((96, 96), 4, 0.3),
])
def test_model_mask_any_grid_and_channels(size, in_chans, ratio):
    model = fcmae.create_model("convnextv2_atto", in_chans=in_chans, mask_ratio=ratio, decoder_embed_dim=32)
    imgs = torch.randn(3, in_chans, *size)
    h, w = size[0] // 32, size[1] // 32
    mask = model.random_mask(imgs)
    assert mask.shape == (3, h * w)
    assert ((1 - mask).sum(1) == int(h * w * (1 - ratio) + 1e-9)).all()
    loss, pred, _ = model(imgs, mask)
    assert pred.shape == (3, 32 * 32 * in_chans, h, w) and torch.isfinite(loss)


def official_patchify(imgs, p=32):
    """The official layout, written out: (n, c, h, p, w, q) -> (n, h*w, p*q*c)."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    out = torch.empty(n, h * w, p * p * c)
    for i in range(h):
        for j in range(w):
            patch = imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (n, c, p, q)
            out[:, i * w + j] = patch.permute(0, 2, 3, 1).reshape(n, -1)
    return out


@pytest.mark.parametrize("size,in_chans", [((64, 96), 3), ((64, 64), 1)])
def test_patchify_layout_and_round_trip(size, in_chans):
    model = fcmae.create_model("convnextv2_atto", in_chans=in_chans, decoder_embed_dim=32)
    imgs = torch.randn(2, in_chans, *size)
    patches = model.patchify(imgs)
    assert torch.equal(patches, official_patchify(imgs))
    grid = (size[0] // 32, size[1] // 32)
    assert torch.equal(model.unpatchify(patches, grid=grid), imgs)
    if grid[0] != grid[1]:
        with pytest.raises(ValueError, match="grid"):
            model.unpatchify(patches)


def reference_loss(model, imgs, pred, mask, norm_pix):
    target = official_patchify(imgs)
    total, count = 0.0, 0
    for n in range(imgs.shape[0]):
        for i in range(mask.shape[1]):
            if mask[n, i] == 1:
                t = target[n, i].double()
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var(unbiased=True).item() + 1e-6)
                y = pred[n, :, i // pred.shape[3], i % pred.shape[3]].double()
                total += ((y - t) ** 2).mean().item()
                count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_mean_over_masked_patches(norm_pix):
    model = fcmae.create_model("convnextv2_atto", norm_pix_loss=norm_pix, decoder_embed_dim=32)
    imgs = torch.rand(2, 3, 96, 64) * 3
    loss, pred, mask = model(imgs)
    assert loss.item() == pytest.approx(reference_loss(model, imgs, pred, mask, norm_pix), rel=1e-5)


def test_loss_with_nothing_masked_is_zero_not_nan():
    model = fcmae.create_model("convnextv2_atto", mask_ratio=0.0, decoder_embed_dim=32)
    loss, _, mask = model(torch.randn(1, 3, 64, 64))
    assert mask.sum() == 0 and loss.item() == 0.0


def test_decoder_puts_the_mask_token_at_masked_positions():
    model = fcmae.create_model("convnextv2_atto", decoder_depth=0, decoder_embed_dim=16)
    latent = torch.randn(1, 320, 2, 2)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        model.mask_token.fill_(0.5)
        model.pred.weight.copy_(torch.eye(16).repeat(64 * 3, 1).view(32 * 32 * 3, 16, 1, 1)[: 32 * 32 * 3])
        model.pred.bias.zero_()
        pred = model.forward_decoder(latent, mask)
    assert torch.allclose(pred[0, :, 0, 0], torch.full((3072,), 0.5))
    assert torch.allclose(pred[0, :, 1, 1], torch.full((3072,), 0.5))
    assert not torch.allclose(pred[0, :, 0, 1], torch.full((3072,), 0.5))


def test_decoder_depth_and_width():
    model = fcmae.create_model("convnextv2_atto", decoder_depth=3, decoder_embed_dim=64)
    assert len(model.decoder) == 3
    assert model.proj.out_channels == 64 and model.mask_token.shape == (1, 64, 1, 1)
    assert model.pred.out_channels == 32 * 32 * 3
    assert model.decoder[0].mlp.fc1.in_features == 64  # a Linear-MLP ConvNeXt V2 block


def test_initialisation_follows_the_paper_not_the_std_1_slip():
    torch.manual_seed(0)
    model = fcmae.create_model("convnextv2_tiny")
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            where = f"{module_name}.{name}"
            if isinstance(module, torch.nn.LayerNorm):
                assert (p == (1 if name == "weight" else 0)).all(), where
            elif name == "bias" or module_name.endswith("grn"):
                assert (p == 0).all(), where  # biases and GRN gamma/beta
            else:
                assert 0.015 < p.std().item() < 0.025, where  # truncated normal / normal, std 0.02


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="convnextv2_small"), "unknown model 'convnextv2_small'; choose one of: convnextv2_atto"),
    (dict(backend="minkowsky"), "unknown backend 'minkowsky'; choose one of: auto, dense, sparse, minkowski"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    (dict(mask_ratio=-0.1), r"mask_ratio must be in \[0, 1\)"),
    (dict(decoder_depth=-1), "decoder_depth must be a whole number >= 0"),
    (dict(decoder_embed_dim=0), "decoder_embed_dim must be a positive whole number"),
    (dict(in_chans=0), "in_chans must be a positive whole number"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    kwargs = {"name": "convnextv2_atto", **kwargs}
    with pytest.raises(ValueError, match=message):
        fcmae.create_model(**kwargs)


def test_bad_inputs_raise_clear_errors():
    model = fcmae.create_model("convnextv2_atto", decoder_embed_dim=32)
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        model(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"expected images shaped \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"mask must be shaped \(N, L\) = \(1, 4\)"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="mask values must be 0"):
        model(torch.randn(1, 3, 64, 64), torch.full((1, 4), 0.5))


def test_decoder_blocks_compute_timms_convnextv2_block(make_model):
    """The decoder runs its timm blocks through the project's fast block code: same result."""
    from fcmae.models.backends.dense import dense_block

    model = make_model(decoder_depth=2, decoder_embed_dim=64)
    x = torch.randn(2, 64, 7, 5)
    with torch.no_grad():
        for block in model.decoder:
            assert rel_err(dense_block(block, x), block(x)) < 2e-6
            x = block(x)
