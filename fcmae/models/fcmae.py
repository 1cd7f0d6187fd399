"""FCMAE: the fully convolutional masked autoencoder of ConvNeXt V2 (arXiv:2301.00808)."""
import math

import torch
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from fcmae.models.backends import BACKEND_CHOICES, BACKENDS, resolve_backend
from fcmae.models.backends.common import linear
from fcmae.models.backends.dense import dense_block
from fcmae.models.convnextv2 import ENCODER_STRIDE, ConvNeXtV2Encoder, check_model_name


def num_visible_patches(num_patches, mask_ratio):
    """Patches kept per sample: int(L * (1 - mask_ratio)) as in the official code (19 of 49 at
    0.6), with the product rounded to 9 decimals first so that float error (10 * (1 - 0.9) =
    0.99999...) cannot drop a patch."""
    return int(math.floor(round(num_patches * (1.0 - mask_ratio), 9)))


def random_patch_mask(batch_size, num_patches, mask_ratio, device=None, generator=None):
    """(N, L) float mask, 1 = removed, keeping exactly num_visible_patches per sample.

    Uses the torch RNG of `device` (or `generator`), so a seed reproduces it.
    """
    keep = num_visible_patches(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # each patch's rank in its sample's order
    return (ranks >= keep).float()


class FCMAE(nn.Module):
    """ConvNeXt V2 encoder on the visible patches, a light ConvNeXt V2 decoder on the full grid,
    and a pixel MSE on the masked patches.

    `loss, pred, mask = model(imgs, mask=None)`; see `forward`.
    """

    def __init__(
        self, model_name, backend="auto", mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=512,
        norm_pix_loss=True, in_chans=3,
    ):
        super().__init__()
        # fully convolutional: any image whose sides are multiples of the patch, which must equal
        # the encoder's total stride (one latent position predicts one patch)
        self.patch_size = ENCODER_STRIDE
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.encoder = ConvNeXtV2Encoder(model_name, in_chans=in_chans, backend=resolve_backend(backend))
        # Names as in the official code: proj, mask_token, decoder, pred.
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_embed_dim, use_grn=True, ls_init_value=None, conv_mlp=False)
            for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_embed_dim, self.patch_size ** 2 * in_chans, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self):
        # The encoder keeps timm's init (the same scheme). Unlike the official code, nothing is
        # re-initialised with std 1.0.
        for module in [self.proj, self.decoder, self.pred]:
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # ----- configuration -------------------------------------------------------------------
    @property
    def backend(self):
        return self.encoder.backend

    def set_backend(self, name):
        """Switch the encoder implementation; all backends share the parameters."""
        self.encoder.backend = resolve_backend(name)
        return self

    # ----- shapes ----------------------------------------------------------------------------
    def grid_size(self, imgs):
        """(h, w) patch grid of an image batch, with a clear error for a wrong shape."""
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images shaped (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}; "
                f"the model was built with in_chans={self.in_chans}"
            )
        height, width = imgs.shape[2:]
        if height % self.patch_size or width % self.patch_size or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize or crop the images to a multiple of it"
            )
        return height // self.patch_size, width // self.patch_size

    def patchify(self, imgs):
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (row, column, channel)."""
        n, c = imgs.shape[:2]
        h, w = self.grid_size(imgs)
        p = self.patch_size
        x = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x, grid=None):
        """(N, L, p*p*C) -> (N, C, h*p, w*p); `grid` = (h, w), square by default."""
        n, num_patches = x.shape[:2]
        if grid is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"{num_patches} patches do not form a square; pass grid=(h, w)")
            grid = (side, side)
        h, w = grid
        p, c = self.patch_size, self.in_chans
        x = x.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, h * p, w * p)

    def random_mask(self, imgs, generator=None):
        h, w = self.grid_size(imgs)
        return random_patch_mask(imgs.shape[0], h * w, self.mask_ratio, imgs.device, generator)

    def num_visible(self, imgs):
        """Visible patches per sample of a random mask for `imgs`."""
        h, w = self.grid_size(imgs)
        return num_visible_patches(h * w, self.mask_ratio)

    def prepare_mask(self, imgs, mask=None, num_visible=None):
        """(mask on the images' device, visible patches per sample, or None when counts differ).

        None draws a random mask on the device. A given mask is checked (shape, values 0 or 1)
        and counted where it lies: on the host that costs the device nothing, on the GPU the
        host waits for it. Giving `num_visible` (as pretrain.py does for its random masks)
        vouches for the mask: only its shape is checked, and nothing waits for the device.
        """
        if mask is None:
            return self.random_mask(imgs), self.num_visible(imgs)
        h, w = self.grid_size(imgs)
        if mask.shape != (imgs.shape[0], h * w):
            raise ValueError(
                f"mask must be shaped (N, L) = ({imgs.shape[0]}, {h * w}) for images of "
                f"{imgs.shape[2]}x{imgs.shape[3]}, got {tuple(mask.shape)}"
            )
        if num_visible is None:
            visible = mask == 0
            if not (visible | (mask == 1)).all():
                raise ValueError("mask values must be 0 (visible) or 1 (removed)")
            counts = visible.sum(1)
            if counts.numel() == 0 or bool((counts == counts[0]).all()):
                num_visible = int(counts[0]) if counts.numel() else 0
        elif not 0 <= num_visible <= h * w:
            raise ValueError(f"num_visible must be between 0 and {h * w} patches, got {num_visible}")
        return mask.to(device=imgs.device, dtype=imgs.dtype, non_blocking=True), num_visible

    # ----- the network -----------------------------------------------------------------------
    def forward_encoder(self, imgs, mask):
        """Dense latent (N, C_last, H/32, W/32), zero at masked positions, always full size."""
        return self.encoder(imgs, *self.prepare_mask(imgs, mask))

    def forward_decoder(self, latent, mask):
        """Pixel predictions (N, p*p*C, h, w) from the latent, mask token at masked positions."""
        # Channels-last throughout: the 1x1 convs become plain matmuls and no permute copies.
        x = linear(latent.permute(0, 2, 3, 1), self.proj)
        removed = mask.reshape(*x.shape[:3], 1).to(x.dtype)
        x = x * (1.0 - removed) + self.mask_token.reshape(-1).to(x.dtype) * removed
        x = x.permute(0, 3, 1, 2)
        for block in self.decoder:
            x = dense_block(block, x)
        x = x.permute(0, 2, 3, 1)
        return linear(x, self.pred).permute(0, 3, 1, 2)

    def _patch_stats(self, target):
        """Per-patch mean and (unbiased variance + 1e-6)^0.5 of (N, L, D) patches, as the official
        norm_pix_loss. Written out: Tensor.var is several times slower on CPU."""
        mean = target.mean(dim=-1, keepdim=True)
        var = (target - mean).square().sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
        return mean, (var + 1.0e-6).sqrt()

    def forward_loss(self, imgs, pred, mask):
        """Mean over masked patches of the per-patch mean squared error (0 if nothing is masked)."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, std = self._patch_stats(target)
            target = (target - mean) / std
        pred = pred.float().permute(0, 2, 3, 1).reshape(target.shape)
        per_patch = (pred - target).square().mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def reconstruct(self, imgs, pred, mask):
        """Images with the predicted pixels in the masked patches and the original ones elsewhere
        (predictions un-normalised with each patch's own statistics when norm_pix_loss)."""
        target = self.patchify(imgs).float()
        pred = pred.float().permute(0, 2, 3, 1).reshape(target.shape)
        if self.norm_pix_loss:
            mean, std = self._patch_stats(target)
            pred = pred * std + mean
        removed = mask.float().unsqueeze(-1)
        patches = target * (1.0 - removed) + pred * removed
        return self.unpatchify(patches, grid=self.grid_size(imgs))

    def forward(self, imgs, mask=None, num_visible=None):
        """`loss, pred, mask` for an image batch (N, C, H, W), H and W multiples of 32.

        mask: (N, L) with 1 = removed, L = `(H/32)*(W/32)`; drawn at random when None.
        num_visible: the visible patches of every sample of `mask`, when the caller knows it
        (see `prepare_mask`); it makes the step free of host synchronisation.
        pred: `(N, 32*32*C, H/32, W/32)`, the official layout.
        """
        mask, num_visible = self.prepare_mask(imgs, mask, num_visible)
        return self.forward_masked(imgs, mask, num_visible)

    def forward_masked(self, imgs, mask, num_visible=None):
        """`forward` after the mask is checked: no host synchronisation when `num_visible` (the
        visible patches of every sample) is given, and one graph for torch.compile."""
        latent = self.encoder(imgs, mask, num_visible)
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def compile(self, **kwargs):
        """torch.compile the part of `forward` after the mask checks (encoder, decoder, loss);
        keyword arguments go to torch.compile. The checks stay eager: they read the mask's values."""
        backend = BACKENDS[self.backend]
        if not backend.compiles:
            raise ValueError(backend.compile_refusal(f"the {backend.name} backend", f"use backend "
                                                     f"'{resolve_backend('auto')}' to compile, or run it eagerly"))
        self.forward_masked = torch.compile(self.forward_masked, **kwargs)
        return self


def create_model(
    name, backend="auto", mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=512, norm_pix_loss=True, in_chans=3,
):
    """An FCMAE model around the ConvNeXt V2 encoder `name` (see `fcmae.list_models()`). It takes
    images of any height and width that are multiples of 32, the patch size."""
    check_model_name(name)
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    if not (isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    if not (isinstance(decoder_depth, int) and decoder_depth >= 0):
        raise ValueError(f"decoder_depth must be a whole number >= 0, got {decoder_depth!r}")
    if not (isinstance(decoder_embed_dim, int) and decoder_embed_dim > 0):
        raise ValueError(f"decoder_embed_dim must be a positive whole number, got {decoder_embed_dim!r}")
    if not (isinstance(in_chans, int) and in_chans > 0):
        raise ValueError(f"in_chans must be a positive whole number, got {in_chans!r}")
    return FCMAE(
        name, backend=backend, mask_ratio=float(mask_ratio), decoder_depth=decoder_depth,
        decoder_embed_dim=decoder_embed_dim, norm_pix_loss=bool(norm_pix_loss), in_chans=in_chans,
    )
