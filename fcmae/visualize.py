"""Pictures of what the model sees and reconstructs."""
import torch
from torchvision.utils import make_grid

from fcmae.data import derive_seed
from fcmae.data.transforms import device_values
from fcmae.models import ENCODER_STRIDE, random_patch_mask


def picture_masks(count, input_size, mask_ratio, seed):
    """The masks of `count` reconstruction pictures: pretrain.py's pictures and
    `python -m fcmae.reconstruct` draw the same ones for the same seed."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "pictures"))
    return random_patch_mask(count, (input_size // ENCODER_STRIDE) ** 2, mask_ratio, generator=generator)


def denormalize(imgs, mean, std):
    mean = device_values(tuple(mean), imgs.device).view(1, -1, 1, 1)
    std = device_values(tuple(std), imgs.device).view(1, -1, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, imgs, mask, mean, std, num_visible=None):
    """A (3, H, W) picture in [0, 1]: one row per image, columns original / masked input /
    reconstruction (visible patches pasted back). num_visible: the visible patches of every mask,
    when the caller knows it (see FCMAE.prepare_mask)."""
    _, pred, _ = model(imgs, mask, num_visible=num_visible)
    recon = model.reconstruct(imgs, pred, mask)
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, model.patch_size ** 2 * model.in_chans),
                               grid=model.grid_size(imgs))
    original = denormalize(imgs.float(), mean, std)
    masked = original * (1 - removed) + 0.5 * removed  # masked patches shown grey
    rows = torch.stack([original, masked, denormalize(recon, mean, std)], dim=1).flatten(0, 1)
    if rows.shape[1] == 1:
        rows = rows.expand(-1, 3, -1, -1)
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)
