"""Decoding with Pillow (libjpeg-turbo for JPEG) in the loader's workers.

`full` decodes every pixel and then crops and resizes with torchvision's functions: the path of
torchvision's RandomResizedCrop, bit for bit. `scaled` decodes a JPEG at 1/2, 1/4 or 1/8 of its
size in the DCT domain (Pillow's `draft`) whenever the crop box keeps at least the output's
resolution at that scale, and resizes from there: on large photographs most of the decoding
and resizing work goes away. Everything else (PNG, WebP, ..., and JPEGs Pillow cannot scale)
takes the `full` path, and so does a crop that needs every pixel.

Why Pillow's draft and not simplejpeg or PyTurboJPEG: all three run libjpeg-turbo's scaled
IDCT; measured on 12-megapixel JPEGs on the 2-core development machine they decode at the same
speed (the entropy decoding of the whole file dominates), and Pillow is already here and keeps
the colour conversion of the full path.
"""
import numpy as np
import torch
from torchvision.transforms import functional as F

REDUCTIONS = (8, 4, 2)  # the DCT scales Pillow's JPEG decoder offers, largest first


def load(img, mode):
    """The pixels of a lazily opened image, in `mode` ("RGB" or "L")."""
    if img.mode == mode:
        img.load()
        return img
    return img.convert(mode)


def to_tensor(img):
    """A PIL image as a uint8 (H, W, C) tensor. Channels last, as decoded: stacking these into a
    batch is a plain copy, where (C, H, W) views would make the collate transpose every image
    (1.5 ms for 224x224 RGB on one core: a quarter of the whole pipeline)."""
    array = np.array(img)
    return torch.from_numpy(array if array.ndim == 3 else array[..., None])


class FullDecoder:
    """Every pixel decoded; crops and resizes exactly as torchvision's RandomResizedCrop does."""
    name = "full"
    on_device = False

    def reduce(self, img, most):
        """Make `img` (opened, not loaded) decode at 1/s of its size, s <= `most`; returns s."""
        return 1

    def whole(self, img, mode, most=1.0):
        """The image at a size reduced by at most `most` in each side, in `mode`."""
        self.reduce(img, most)
        return load(img, mode)

    def crop_pil(self, img, crop, mode):
        """`crop` (a contract.Crop) of `img` as a PIL image of crop.size, flipped if asked."""
        top, left, height, width = crop.box
        out_h, out_w = crop.size
        s = self.reduce(img, min(width / out_w, height / out_h))
        img = load(img, mode)
        if s == 1:
            out = F.resized_crop(img, top, left, height, width, [out_h, out_w], crop.interpolation)
        else:  # the same box at 1/s scale: fractional, so one resize of that region of the image
            box = (left / s, top / s, (left + width) / s, (top + height) / s)
            out = img.resize((out_w, out_h), F.pil_modes_mapping[crop.interpolation], box=box)
        return F.hflip(out) if crop.flip else out

    def crop(self, img, record, crop, mode):
        """`crop` of `img` as a uint8 (H, W, C) tensor (on-device decoders return what they decode later)."""
        return to_tensor(self.crop_pil(img, crop, mode))


class ScaledDecoder(FullDecoder):
    """JPEGs decoded at the smallest DCT scale that keeps the crop's resolution (see the module's text)."""
    name = "scaled"

    def reduce(self, img, most):
        if img.format != "JPEG" or most < 2:
            return 1
        width, height = img.size
        s = next(s for s in REDUCTIONS if s <= most)
        # Pillow picks the largest scale with size[i] // requested[i] >= scale; W // (W // s) >= s always
        drafted = img.draft(None, (max(1, width // s), max(1, height // s)))
        if drafted is None:  # a JPEG Pillow cannot scale (several tiles, or already configured)
            return 1
        return round(width / drafted[1][2])
