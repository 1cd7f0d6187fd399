"""Image transforms: the pretraining augmentation, the fine-tuning and evaluation transforms
(timm's), the picture view, and the normalisations they share."""
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, create_transform
from torchvision import transforms

from fcmae.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(in_chans):
    """(mean, std) for RGB (ImageNet's) or greyscale images (the mean of ImageNet's three)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.449,), (0.226,))


def pretrain_transform(input_size, in_chans=3):
    """The official FCMAE augmentation: RandomResizedCrop(scale 0.2-1, bicubic), flip, normalise."""
    if in_chans not in (1, 3):
        raise ConfigError(f"image folders give 1 (greyscale) or 3 (RGB) channels; --in_chans is {in_chans}")
    mean, std = normalization(in_chans)
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def view_transform(input_size, in_chans=3):
    """Deterministic resize + centre crop, for the reconstruction pictures."""
    mean, std = normalization(in_chans)
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def mean_std(imagenet_default_mean_and_std=True, in_chans=3):
    """ImageNet's mean/std (the default), or Inception's (0.5, 0.5, 0.5), as the official flag."""
    if imagenet_default_mean_and_std or in_chans != 3:
        return normalization(in_chans)
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def finetune_transform(input_size, mean, std, auto_augment=None, color_jitter=None, interpolation="bicubic",
                       reprob=0.0, remode="pixel", recount=1):
    """timm's training transform: RandomResizedCrop, flip, RandAugment / colour jitter, random erasing."""
    return create_transform(input_size, is_training=True, auto_augment=auto_augment, color_jitter=color_jitter,
                            interpolation=interpolation, re_prob=reprob, re_mode=remode, re_count=recount,
                            mean=mean, std=std)


def eval_transform(input_size, mean, std, crop_pct=None):
    """As the official evaluation: resize to input_size / crop_pct (crop_pct 0.875 by default)
    and centre-crop, bicubic; at 384 pixels and above a plain resize to input_size."""
    if input_size >= 384:
        return create_transform(input_size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                                crop_pct=1.0, crop_mode="squash")
    return create_transform(input_size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                            crop_pct=crop_pct or 0.875, crop_mode="center")
