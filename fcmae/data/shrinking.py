"""Shrinking one image, once, on write: an image file larger than a size re-encoded at that size,
the others kept byte for byte (see shrink_image). fcmae.data.conversion uses it for shards and for a
shrunk copy of a folder."""
import io
from pathlib import Path
from typing import NamedTuple

from PIL import Image, JpegImagePlugin

from fcmae.config import ConfigError
from fcmae.data.arrays import NPY_MAGIC, TIFF_MAGICS

# JPEG quality of re-encoded images. Measured on 12-megapixel photos shrunk to 512 (against the same
# resize stored losslessly): quality 85: 39 kB, 37.3 dB PSNR; 90: 49 kB, 38.4 dB; 95: 71 kB, 40.0 dB.
# 90 is the middle ground: 1.1 dB over 85 for 25% more bytes, where 95 adds 1.6 dB for 45% more.
DEFAULT_QUALITY = 90
KEPT, REENCODED, UNREADABLE = "kept", "re-encoded", "unreadable"
# Formats a re-encoded image keeps (Pillow's names; MPO, a camera JPEG with extra frames, is JPEG);
# any other content becomes a lossless PNG under its old name (Pillow, and so the loaders, open files
# by their content, not their extension).
KEPT_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM")


class Shrunk(NamedTuple):
    """What `shrink_image` made of an image: the bytes to store, how (KEPT: as they were;
    REENCODED; UNREADABLE: as they were, since they could not be decoded), and why not (a reason)."""
    data: bytes
    outcome: str
    reason: str = ""


def shrunk_size(size, max_size):
    """(width, height) with the longer side `max_size` and the aspect kept (rounded, at least 1)."""
    width, height = size
    if width >= height:
        return max_size, max(1, round(height * max_size / width))
    return max(1, round(width * max_size / height)), max_size


def shrink_image(data, max_size, quality=DEFAULT_QUALITY):
    """The image file `data` (bytes) as a `Shrunk`: kept byte for byte when its longer side is at
    most `max_size`, else re-encoded with the longer side exactly `max_size` (aspect kept).

    Pixels: downscaled with Pillow's Lanczos filter (antialiased). A JPEG is first decoded at 1/2,
    1/4 or 1/8 scale in the DCT domain (Pillow's `draft`) when that still leaves at least twice
    the target size in each side: on 12-megapixel photos shrunk to 512 that is 2.9 times faster
    than a full decode (11.5 against 4.0 images/s on one core), and the result within 46 dB PSNR
    of the full decode's.
    Format: kept, under the same name. JPEG (and MPO, a camera JPEG with extra frames) becomes a
    baseline JPEG at `quality` with the source's chroma subsampling; PNG, TIFF (LZW), BMP and
    PPM/PGM stay lossless; WebP stays lossless when it was (a VP8L bitstream), else lossy at
    `quality`; any other content becomes a lossless PNG (Pillow, and so the loaders, open files by
    their content). Only the first frame of a multi-frame file is kept: the one the loaders read.
    Mode: kept (greyscale, RGB and CMYK JPEGs stay so; alpha stays where the format stores it),
    except where the antialiased resize needs another: palette images become RGB (RGBA with
    transparency), bilevel ones greyscale; 16-bit ones are resized as 32-bit integers and stored as
    16-bit again. Should the format refuse the result, the EXIF and ICC data are dropped, then the
    pixels converted to RGB or L, as the loaders would.
    Metadata: EXIF and ICC data are copied. Pixels are never rotated by the EXIF orientation: the
    project's loaders ignore it, so a shrunk image must not differ from its source in that.
    Arrays: a `.npy` file, or a TIFF Pillow cannot open (multi-band, float), is kept as it is.
    Unreadable: any other file Pillow cannot open, or (when larger) decode, including one over Pillow's
    decompression-bomb limit, comes back as it is, UNREADABLE with the reason, so that the loaders
    name and skip it as they always do. A small file whose pixels are broken is not noticed here:
    its pixels are not decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max(img.size) <= max_size:
                return Shrunk(data, KEPT)
            return Shrunk(_reencode(img, data, max_size, quality), REENCODED)
    except Exception as err:  # Pillow raises many types for bad data; none may stop a long run
        if data[:8].startswith(NPY_MAGIC) or data[:4] in TIFF_MAGICS:
            return Shrunk(data, KEPT)  # an array (.npy, a multi-band TIFF): the loaders read it as it is
        return Shrunk(data, UNREADABLE, f"{type(err).__name__}: {err}")


def _reencode(img, data, max_size, quality):
    """The bytes of `img` (opened, not decoded) at `max_size`; see shrink_image."""
    is_jpeg = img.format in ("JPEG", "MPO")
    fmt = "JPEG" if is_jpeg else img.format if img.format in KEPT_FORMATS else "PNG"
    size = shrunk_size(img.size, max_size)
    metadata = {key: img.info[key] for key in ("exif", "icc_profile") if img.info.get(key)}
    options = {}
    if fmt == "JPEG":
        sampling = JpegImagePlugin.get_sampling(img) if is_jpeg else -1
        options = {"quality": quality, "subsampling": sampling if sampling in (0, 1, 2) else 2}
        if is_jpeg:  # Pillow picks the largest DCT scale that keeps at least the size asked for
            img.draft(None, (2 * size[0], 2 * size[1]))
    elif fmt == "WEBP":
        options = {"lossless": True} if _lossless_webp(data) else {"quality": quality}
    elif fmt == "TIFF":
        options = {"compression": "tiff_lzw"}
    small = _resizable(img).resize(size, Image.LANCZOS)
    if img.mode.startswith("I;16"):
        small = small.convert("I;16")  # back to 16 bits (clipped): what PNG, TIFF and PGM store
    error = None
    for picture, extra in ((small, metadata), (small, {}), (_storable(small), {})):
        buffer = io.BytesIO()
        try:
            picture.save(buffer, fmt, **options, **extra)
            return buffer.getvalue()
        except (OSError, ValueError, KeyError, TypeError) as err:  # a mode or metadata the format refuses
            error = err
    raise error


def _resizable(img):
    """`img` in a mode Pillow's antialiased resize handles: it resizes palette ("P") and bilevel
    ("1") images by nearest neighbour only, and 16-bit ones not in every Pillow version."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):
        return img.convert("I")
    return img


def _storable(img):
    """`img` as the loaders would see it: L when it has one band, else RGB."""
    return img.convert("L" if len(img.getbands()) == 1 else "RGB")


def _lossless_webp(data):
    """Whether a WebP file holds a lossless (VP8L) image: its RIFF chunks, walked from byte 12."""
    pos = 12
    while pos + 8 <= len(data):
        tag, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag in (b"VP8 ", b"VP8L"):
            return tag == b"VP8L"
        pos += 8 + length + (length & 1)
    return False


def shrink_file(path, max_size, quality):
    """shrink_image of a file, in a worker process; a file that cannot be read at all is one sentence."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or err})") from None
    return shrink_image(data, max_size, quality)


def check_shrink_settings(max_size, quality, workers):
    """One sentence for a bad setting given to the library directly (the commands check their flags)."""
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ConfigError(f"max_size must be a whole number of pixels of at least 1, got {max_size!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"quality must be a whole number in [1, 100], got {quality!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number of at least 1, got {workers!r}")
