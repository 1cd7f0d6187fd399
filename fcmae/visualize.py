"""Pictures of what the model sees and reconstructs, and of how a run goes (its curves)."""
import json
import math
from pathlib import Path

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


def contrast(imgs, show):
    """Channels `show` of normalised images, mean -2 to +2 standard deviations of each channel
    spread over [0, 1]: a picture of bands that have no colours of their own."""
    return (imgs[:, list(show)] * 0.25 + 0.5).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, imgs, mask, mean, std, num_visible=None, show=None):
    """A (3, H, W) picture in [0, 1]: one row per image, columns original / masked input /
    reconstruction (visible patches pasted back). num_visible: the visible patches of every mask,
    when the caller knows it (see FCMAE.prepare_mask). `show`: the channels shown as red, green
    and blue (or one as grey) with the contrast of `contrast`; by default RGB and greyscale images
    as they are, other images' first three channels (or first one)."""
    _, pred, _ = model(imgs, mask, num_visible=num_visible)
    recon = model.reconstruct(imgs, pred, mask)
    if show is None and model.in_chans in (1, 3):
        original, recon = denormalize(imgs.float(), mean, std), denormalize(recon, mean, std)
    else:
        show = show or ((0, 1, 2) if model.in_chans >= 3 else (0,))
        original, recon = contrast(imgs.float(), show), contrast(recon.float(), show)
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, model.patch_size ** 2 * model.in_chans),
                               grid=model.grid_size(imgs))[:, :original.shape[1]]  # the same in every channel
    masked = original * (1 - removed) + 0.5 * removed  # masked patches shown grey
    rows = torch.stack([original, masked, recon], dim=1).flatten(0, 1)
    if rows.shape[1] == 1:
        rows = rows.expand(-1, 3, -1, -1)
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)


# the curves of a run's log.txt: (its key, the panel's title)
CURVES = (("train_loss", "training loss"), ("held_out_loss", "held-out loss"), ("knn_top1", "k-NN top-1 (%)"))


def read_log(path):
    """The records of a run's log.txt (one JSON object a line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def draw_curves(runs, path):
    """One PNG of the training loss, the held-out loss and the k-NN top-1 against epochs, for one
    run or several ({name: log records}); a curve a run does not have is left out. Written whole,
    then renamed."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4), constrained_layout=True)
    for axis, (key, title) in zip(axes, CURVES):
        for name, records in runs.items():
            # x: the epochs done (a run that stopped inside an epoch logs how far it got as partial_epoch)
            points = [(r.get("partial_epoch") or r["epoch"] + 1, r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("epochs")
        axis.grid(alpha=0.3)
        if not axis.lines:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes, color="grey")
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=100, format="png")
    pyplot.close(figure)
    partial.replace(path)
    return path
