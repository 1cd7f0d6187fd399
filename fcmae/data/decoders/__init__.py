"""Decoders: how an opened image and its drawn crop become pixels. One file per decoder, one line
each in DECODERS.

A decoder offers `crop(img, record, crop, mode)` (what a worker ships for a crop: a uint8 tensor,
or, for an on-device decoder, what it decodes later in the main process), `crop_pil` and `whole`
(PIL images for transforms that go on working on them: fine-tuning's RandAugment, evaluation's
resize), and `on_device`. An on-device decoder also offers `decode_batch(images, device)`.
"""
from fcmae.config import ConfigError
from fcmae.data.decoders.pil import FullDecoder, ScaledDecoder


def _dali():
    from fcmae.data.decoders.dali import DaliDecoder
    return DaliDecoder


# name -> (a zero-argument function giving the decoder class, what it is in a few words)
DECODERS = {
    "scaled": (lambda: ScaledDecoder, "Pillow; JPEGs decoded at 1/2, 1/4 or 1/8 scale when the crop allows "
                                      "(the default)"),
    "full": (lambda: FullDecoder, "Pillow; every pixel decoded, torchvision's RandomResizedCrop exactly"),
    "dali": (_dali, "NVIDIA DALI on the GPU (nvJPEG and the hardware JPEG decoder); pip install -e '.[dali]'"),
}
DEFAULT_DECODER = "scaled"


def get_decoder(name, **options):
    """The decoder called `name`; ConfigError when it is unknown or cannot run here."""
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name][0]()(**options)


__all__ = ["DECODERS", "DEFAULT_DECODER", "FullDecoder", "ScaledDecoder", "get_decoder"]
