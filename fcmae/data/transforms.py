"""Image transforms: the pretraining augmentation, the fine-tuning and evaluation transforms
(timm's), the picture view, and the normalisation on the device.

A transform runs in a loader worker on an image that is opened but not decoded yet, inside the
sample's seeded block: it draws its random crop and flip first, from the same generators and in
the same order as torchvision's and timm's transforms, and only then asks the decoder for the
pixels, so that a decoder can decode no more than the crop needs (see fcmae.data.decoders).

Which paths ship uint8 to the main process (4x less to copy; converted and normalised on the
device, inside the step, by `to_device`): pretraining and evaluation. Fine-tuning's training
transform ships float32 normalised images, because RandAugment's fill, random erasing and
colour jitter work after the normalisation; the reconstruction pictures are float32 too.

Images read as arrays (any channel count, 16 bits, float: fcmae.data.arrays) get the same crops
and flips from the same draws, cut out and then resized with torch's antialiased interpolation.
After that resize float32 is the smallest type that holds their values exactly, so pretraining
and evaluation ship them as float32 (H, W, C), normalised on the device as the uint8 ones.
"""
import functools
import random

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

from fcmae.config import ConfigError
from fcmae.data.arrays import channels_last, crop_array, image_mode, pixels_of, rgb_or_grey
from fcmae.data.contract import Crop
from fcmae.data.decoders.pil import to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = transforms.InterpolationMode.BICUBIC


def normalization(in_chans, mean=None, std=None):
    """(mean, std), one value per channel: as given, else ImageNet's for RGB, their mean for
    greyscale images; ConfigError for other channel counts without statistics."""
    if mean is None and std is None:
        if not rgb_or_grey(in_chans):
            raise ConfigError(f"{in_chans}-channel images have no default statistics; give --mean and --std with "
                              f"{in_chans} values each, or --norm_stats auto to compute them from the data")
        return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.449,), (0.226,))
    if mean is None or std is None:
        raise ConfigError("--mean and --std go together; give both, or neither")
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) != in_chans:
            raise ConfigError(f"{flag} has {len(values)} values and --in_chans is {in_chans}; give one per channel")
    if min(std) <= 0:
        raise ConfigError(f"--std must be positive in every channel, got {','.join(f'{v:g}' for v in std)}")
    return tuple(mean), tuple(std)


def mean_std(imagenet_default_mean_and_std=True, in_chans=3):
    """ImageNet's mean/std (the default), or Inception's (0.5, 0.5, 0.5), as the official flag."""
    if imagenet_default_mean_and_std or in_chans != 3:
        return normalization(in_chans)
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def pair(size):
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


@functools.lru_cache(maxsize=None)
def device_values(values, device):
    """The float32 vector `values` (a tuple) on `device`, made once and filled there one value at a
    time: a small tensor copied from the host's pageable memory would make a CUDA host wait."""
    vector = torch.empty(len(values), dtype=torch.float32, device=device)
    for i, value in enumerate(values):
        vector[i] = value
    return vector


def to_device(images, device, mean, std, channels_last=False, normalised=False):
    """A batch as the model takes it, (N, C, H, W) float32 on `device`: (N, H, W, C) images, uint8
    or float32 (arrays), are converted and normalised there, with the operations of ToTensor +
    Normalize (so the same values as in a worker); `normalised` (N, C, H, W) float images are only
    moved. The copy leaves pinned memory (the loader pins its batches on CUDA) without waiting.
    `channels_last`: in channels-last memory (the shipped layout: no copy), else contiguous."""
    images = images.to(device, non_blocking=True)
    if not normalised:
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        images = images.sub_(device_values(tuple(mean), images.device))
        images = images.div_(device_values(tuple(std), images.device)).permute(0, 3, 1, 2)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class PretrainTransform:
    """The official FCMAE augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) and a
    horizontal flip with probability 0.5, drawn as torchvision's RandomResizedCrop and
    RandomHorizontalFlip draw them; ships uint8 (arrays: float32)."""
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)

    def __init__(self, input_size, in_chans=3, mean=None, std=None):
        self.in_chans, self.mode = in_chans, image_mode(in_chans)
        self.size = pair(input_size)
        self.mean, self.std = normalization(in_chans, mean, std)

    def plan(self, img):
        box = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return Crop(box, self.size, bool(torch.rand(1) < 0.5), BICUBIC)

    def __call__(self, img, record, decoder):
        pixels = pixels_of(img, self.in_chans)
        if pixels is None:
            return decoder.crop(img, record, self.plan(img), self.mode)
        return channels_last(crop_array(pixels, self.plan(pixels)))


class FinetuneTransform:
    """timm's training transform (RandomResizedCrop with its interpolation, flip, RandAugment or
    colour jitter, normalisation, random erasing), with its crop and flip drawn before decoding;
    ships float32 normalised. Arrays get the crop, flip, normalisation and random erasing;
    RandAugment and colour jitter work on Pillow's 8-bit images only."""
    normalised = True

    def __init__(self, input_size, mean, std, auto_augment=None, color_jitter=None, interpolation="bicubic",
                 reprob=0.0, remode="pixel", recount=1, in_chans=3):
        self.in_chans, self.mode = in_chans, image_mode(in_chans)
        self.mean, self.std = mean, std
        primary, secondary, final = create_transform(
            input_size, is_training=True, auto_augment=auto_augment, color_jitter=color_jitter,
            interpolation=interpolation, re_prob=reprob, re_mode=remode, re_count=recount, mean=mean, std=std,
            separate=True)
        self.rrc, flip = primary.transforms
        assert isinstance(self.rrc, RandomResizedCropAndInterpolation)
        assert isinstance(flip, transforms.RandomHorizontalFlip)
        self.flip_p = flip.p
        self.after_crop = transforms.Compose(secondary.transforms + final.transforms)
        self.photo_only = secondary.transforms  # RandAugment, colour jitter
        if self.photo_only and not rgb_or_grey(in_chans):
            raise ConfigError(f"RandAugment and colour jitter work on RGB and greyscale photographs, not on "
                              f"{in_chans}-channel images; pass --aa none and --color_jitter 0")
        # the normalisation and random erasing, which take tensors: arrays need no conversion to one
        self.array_steps = transforms.Compose([t for t in final.transforms if not isinstance(t, transforms.ToTensor)])

    def plan(self, img):
        rrc = self.rrc
        box = rrc.get_params(img, rrc.scale, rrc.ratio)
        choices = rrc.interpolation
        interpolation = random.choice(choices) if isinstance(choices, (tuple, list)) else choices
        return Crop(box, rrc.size, bool(torch.rand(1) < self.flip_p), interpolation)

    def __call__(self, img, record, decoder):
        pixels = pixels_of(img, self.in_chans)
        if pixels is None:
            return self.after_crop(decoder.crop_pil(img, self.plan(img), self.mode))
        if self.photo_only:
            raise ValueError("is read as an array (16 bits, float or .npy), and RandAugment and colour jitter work on "
                             "8-bit photographs; pass --aa none and --color_jitter 0 for such data")
        return self.array_steps(crop_array(pixels, self.plan(pixels)))


class EvalTransform:
    """The official evaluation (see `eval_transform`), decoded at the smallest scale that keeps the
    resize's resolution; ships uint8 (arrays: float32)."""

    def __init__(self, input_size, mean, std, crop_pct=None, in_chans=3):
        self.in_chans, self.mode = in_chans, image_mode(in_chans)
        self.mean, self.std = mean, std
        *steps, last = eval_transform(input_size, mean, std, crop_pct, uint8=True).transforms
        assert isinstance(last, MaybePILToTensor)  # replaced: ours ships channels last
        self.resize_crop = transforms.Compose(steps)
        self.resize = steps[0]

    def most(self, img):
        """How far the image may be reduced before the resize without losing resolution."""
        width, height = img.size
        if isinstance(self.resize.size, int):
            return min(width, height) / self.resize.size
        return min(height / self.resize.size[0], width / self.resize.size[1])

    def __call__(self, img, record, decoder):
        pixels = pixels_of(img, self.in_chans)
        if pixels is None:
            return to_tensor(self.resize_crop(decoder.whole(img, self.mode, self.most(img))))
        return channels_last(self.resize_crop(pixels))  # torchvision's resize of a tensor: antialiased


def eval_transform(input_size, mean, std, crop_pct=None, uint8=False):
    """As the official evaluation: resize to input_size / crop_pct (crop_pct 0.875 by default)
    and centre-crop, bicubic; at 384 pixels and above a plain resize to input_size. A PIL image
    in, a normalised float tensor out (uint8=True: a uint8 tensor, normalised by `to_device`)."""
    if input_size >= 384:
        return create_transform(input_size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                                crop_pct=1.0, crop_mode="squash", use_prefetcher=uint8)
    return create_transform(input_size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                            crop_pct=crop_pct or 0.875, crop_mode="center", use_prefetcher=uint8)


def view_transform(input_size, in_chans=3, mean=None, std=None):
    """Deterministic resize + centre crop of a PIL image or of an array's float (C, H, W) pixels,
    normalised (C, H, W) float32 out, for the reconstruction pictures."""
    mean, std = normalization(in_chans, mean, std)
    resize_crop = transforms.Compose([transforms.Resize(input_size, interpolation=BICUBIC),
                                      transforms.CenterCrop(input_size)])
    normalize = transforms.Normalize(mean, std)

    def view(img):
        img = resize_crop(img)
        return normalize(img if isinstance(img, torch.Tensor) else transforms.functional.to_tensor(img))
    return view
