"""Images as arrays: any number of channels, 8 or 16 bits or float (multi-band TIFF and GeoTIFF,
`.npy`, 16-bit PNG), read, checked and cropped.

Which images are arrays. With --in_chans 1 or 3, `.npy` files and, with 1, 16-bit greyscale
images; Pillow reads every other image as it always has, as RGB or greyscale. With any other
channel count, every image: TIFFs through tifffile (a GeoTIFF's pixel data; its georeferencing
is not read), `.npy` files through numpy, other formats through Pillow.

Layout: (H, W) is one channel; (C, H, W) or (H, W, C), whichever axis has --in_chans entries
(the first when both do).

Values: an integer image is scaled by its type's largest value, as torchvision's
`to_dtype(scale=True)` does (uint8 by 255, uint16 by 65535, int16 by 32767), so that 8-bit images
keep the units of ImageNet's statistics; a float image is used as stored. --mean and --std are in
these units.

A file with another channel count, a non-finite value or another pixel type raises ValueError
(fcmae.data.images skips it, names it and counts it, as any unreadable image).
"""
import io
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from fcmae.data.decoders.pil import load

NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
ARRAY_EXTENSIONS = (".npy",)  # beyond torchvision's IMG_EXTENSIONS, which has .tif and .tiff
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
INTEGER_TYPES = (np.uint8, np.uint16, np.int16)
FLOAT_TYPES = (np.float16, np.float32, np.float64)  # float64 becomes float32: the model computes in float32


def rgb_or_grey(in_chans):
    return in_chans in (1, 3)


def image_mode(in_chans):
    """The Pillow mode of the RGB or greyscale path; None for other channel counts (arrays only)."""
    return {3: "RGB", 1: "L"}.get(in_chans)


def kind_of(record):
    """'npy', 'tiff' or None (another image format), from the file's name or its first bytes."""
    if record.data is None:
        suffix = Path(record.path).suffix.lower()
        return "npy" if suffix == ".npy" else "tiff" if suffix in (".tif", ".tiff") else None
    head = record.data[:8]
    return "npy" if head.startswith(NPY_MAGIC) else "tiff" if head[:4] in TIFF_MAGICS else None


def open_image(record, in_chans):
    """`record` opened: Pillow's lazily opened image where it is read as RGB or greyscale or
    through Pillow anyway, else an ArrayFile (see the module's text)."""
    kind = kind_of(record)
    if kind == "npy" or kind == "tiff" and not rgb_or_grey(in_chans):
        return ArrayFile(record, kind, in_chans)
    return record.open()


class ArrayFile:
    """A `.npy` or TIFF file; `with` gives its pixels, float32 (C, H, W) (see `channels_first`)."""

    def __init__(self, record, kind, in_chans):
        self.record, self.kind, self.in_chans = record, kind, in_chans

    def __enter__(self):
        record = self.record
        source = record.path if record.data is None else io.BytesIO(record.data)
        if self.kind == "npy":
            array = np.load(source, allow_pickle=False)
        else:
            import tifffile
            try:
                array = tifffile.imread(source)
            except tifffile.TiffFileError as err:
                raise ValueError(f"not a readable TIFF file ({err})") from None
        return channels_first(array, self.in_chans)

    def __exit__(self, *exc):
        return False


def pixels_of(img, in_chans):
    """The float32 (C, H, W) pixels of an opened image that is read as an array; None for a Pillow
    image that the RGB or greyscale path reads."""
    if isinstance(img, torch.Tensor):
        return img
    if rgb_or_grey(in_chans) and not (in_chans == 1 and img.mode in SIXTEEN_BIT_MODES):
        return None
    img.load()
    return channels_first(np.asarray(img), in_chans)


def whole_image(img, in_chans):
    """An opened image whole: Pillow's, loaded as RGB or greyscale, or an array's float (C, H, W) pixels."""
    pixels = pixels_of(img, in_chans)
    return load(img, image_mode(in_chans)) if pixels is None else pixels


def channels_first(array, in_chans):
    """`array` as float32 (C, H, W) with the module's values; ValueError (a phrase that follows the
    file's name) when its channels, pixel type or values do not fit."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if array.shape[0] != in_chans and array.shape[-1] == in_chans:
            array = array.transpose(2, 0, 1)
    else:
        raise ValueError(f"is an array of shape {tuple(array.shape)}, not an image of (H, W), (C, H, W) or (H, W, C)")
    if array.shape[0] != in_chans:
        what = "1 channel" if array.shape[0] == 1 else f"shape {tuple(array.shape)}, neither axis of it {in_chans} channels"
        raise ValueError(f"has {what}, and --in_chans is {in_chans}")
    dtype = array.dtype.type
    if dtype in INTEGER_TYPES:
        return F2.to_dtype(torch.from_numpy(np.ascontiguousarray(array)), torch.float32, scale=True)
    if dtype not in FLOAT_TYPES:
        raise ValueError(f"has {array.dtype} pixels; fcmae reads uint8, uint16, int16 and float images")
    pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(pixels).all():
        raise ValueError("holds NaN or infinite values")
    return pixels


def crop_array(pixels, crop):
    """`crop` (a contract.Crop) of float (C, H, W) pixels: the box cut out, then resized per channel
    with torch's antialiased interpolation (no clamping: arrays have no range to keep), flipped if asked."""
    top, left, height, width = crop.box
    out = F.resized_crop(pixels, top, left, height, width, list(crop.size), crop.interpolation, antialias=True)
    return out.flip(-1) if crop.flip else out


def channels_last(pixels):
    """(C, H, W) -> (H, W, C), the layout the uint8 images ship in (see fcmae.data.transforms.to_device)."""
    return pixels.permute(1, 2, 0).contiguous()

