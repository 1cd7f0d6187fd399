"""Images for pretraining and fine-tuning: folders of files (with labels from class folders),
the bundled sample photographs, augmentation, and a sampler that makes every batch, crop and
mask a function of (seed, epoch, position), through one seed derivation, `derive_seed`.

Because nothing depends on the order workers run in, on the number of processes or on where
a run was interrupted, a resumed run sees exactly the batches the uninterrupted run saw.
"""
import contextlib
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, create_transform
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fcmae.config import ConfigError
from fcmae.models import random_patch_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(in_chans):
    """(mean, std) for RGB (ImageNet's) or greyscale images (the mean of ImageNet's three)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.449,), (0.226,))

# Real photographs that scikit-image ships (no download at run time); the synthetic ones
# (chessboard, logo, phantom, ...) are left out.
SAMPLE_PHOTOGRAPHS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)


def find_images(data_path):
    """Image files under `data_path` (or `data_path/train` when that exists), sorted.

    Class sub-folders, nested folders and flat folders all work; labels are not used.
    """
    root = Path(data_path)
    if not root.exists():
        raise ConfigError(f"--data_path {root} does not exist; point it at a folder of images "
                          "(class sub-folders or flat), or at an ImageNet root holding train/")
    if not root.is_dir():
        raise ConfigError(f"--data_path {root} is a file, not a folder of images")
    if (root / "train").is_dir():
        root = root / "train"
    files = []
    for folder, subdirs, names in os.walk(root, followlinks=True):
        subdirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ConfigError(f"--data_path {root} holds no images (looked for {', '.join(IMG_EXTENSIONS[:6])}, "
                          "... in it and its sub-folders)")
    return files


def sample_photographs():
    """Paths of the real photographs bundled with scikit-image."""
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("the built-in sample photographs come with scikit-image; "
                          "run `pip install scikit-image` or pass --data_path") from None
    folder = Path(skimage.data.__file__).parent
    files = [str(folder / name) for name in SAMPLE_PHOTOGRAPHS if (folder / name).is_file()]
    if not files:
        raise ConfigError(f"no sample photographs found in {folder}; pass --data_path")
    return files


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


# The streams of random numbers a run draws; each is seeded by derive_seed(seed, stream, keys...).
STREAMS = {"order": 1, "sample": 2, "mask": 3, "step": 4, "pictures": 5}


def derive_seed(seed, stream, *keys):
    """A 63-bit seed for one use of `stream` ("order": an epoch's data order; "sample": one
    sample's augmentation; "mask": one sample's patch mask; "step": the global generators of an
    optimiser step; "pictures": the fixed reconstruction pictures), different for every (seed,
    keys) and the same on every machine: numpy's SeedSequence hashes them (non-negative ints)."""
    words = np.random.SeedSequence([seed, STREAMS[stream], *keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


@contextlib.contextmanager
def seeded(seed):
    """Seed torch's, Python's and numpy's global generators inside the block (torchvision and timm
    transforms draw from all three) and restore them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)  # numpy takes 32 bits
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ImageFiles(torch.utils.data.Dataset):
    """Image files as augmented tensors; items are looked up by (index, epoch[, position]).

    The augmentation of item (index, epoch) is seeded from (seed, epoch, index). An unreadable
    file is skipped with a warning naming it, and the next readable file stands in; each item
    returns how many files it skipped, so the training loop can count them.
    """

    def __init__(self, files, transform, in_chans=3, seed=0, repeats=1):
        self.files = list(files)
        self.transform = transform
        self.mode = "RGB" if in_chans == 3 else "L"
        self.seed = seed
        self.repeats = repeats  # each file counted this many times per epoch (small sets)

    def __len__(self):
        return len(self.files) * self.repeats

    def load(self, index):
        """(PIL image, files skipped) for `index`, stepping past unreadable files."""
        for skipped in range(len(self.files)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                with Image.open(path) as img:
                    return img.convert(self.mode), skipped
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
        raise RuntimeError("none of the image files could be read")

    def __getitem__(self, key):
        index, epoch = key[:2]
        img, skipped = self.load(index % len(self.files))
        with seeded(derive_seed(self.seed, "sample", epoch, index)):
            return self.transform(img), skipped


class LabelledImages(ImageFiles):
    """ImageFiles with a class index per file; items are (tensor, label, files skipped). A file
    that stands in for an unreadable one brings its own label."""

    def __init__(self, files, labels, transform, in_chans=3, seed=0):
        super().__init__(files, transform, in_chans, seed)
        self.labels = list(labels)

    def __getitem__(self, key):
        index, epoch = key[:2]
        img, skipped = self.load(index)
        with seeded(derive_seed(self.seed, "sample", epoch, index)):
            return self.transform(img), self.labels[(index + skipped) % len(self.files)], skipped


def class_folders(root, flag="--data_path"):
    """(files, labels, class names) of a folder with one sub-folder of images per class."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{flag} {root} does not exist or is not a folder; it must hold one sub-folder of "
                          "images per class")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {root} has no class sub-folders; it must hold one sub-folder of images "
                          "per class") from None
    if not samples:
        raise ConfigError(f"{flag} {root} holds no images in its class sub-folders")
    files, labels = zip(*samples)
    return list(files), list(labels), classes


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


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of (index, epoch, position) keys for one process, from optimiser step
    `start_step` on; position is the sample's place in the epoch's order.

    Each epoch draws one permutation from (seed, epoch). Optimiser step t of the epoch uses
    positions [t * G, (t + 1) * G) of it, G = batch_size * update_freq * num_processes;
    micro-step m of process r takes its own contiguous slice. So the global batch of a step
    does not depend on the number of processes or on gradient accumulation. One sampler serves
    a whole run: `set_epoch` says which epoch (and step) the next pass starts at, so the
    DataLoader and its workers can persist across epochs.
    """

    def __init__(self, dataset_size, batch_size, update_freq, num_processes, rank, seed, epoch=0,
                 start_step=0):
        self.global_batch = batch_size * update_freq * num_processes
        self.steps = dataset_size // self.global_batch
        self.batch_size, self.update_freq = batch_size, update_freq
        self.num_processes, self.rank = num_processes, rank
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.dataset_size = dataset_size

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps - self.start_step) * self.update_freq

    def offset_in_step(self, micro):
        """Where this process's micro-batch starts within its optimiser step's global batch."""
        return (micro * self.num_processes + self.rank) * self.batch_size

    def positions(self, step, micro):
        """Positions in the epoch's permutation of this process's micro-batch."""
        start = step * self.global_batch + self.offset_in_step(micro)
        return range(start, start + self.batch_size)

    def __iter__(self):
        epoch, start_step = self.epoch, self.start_step  # as set when this pass began
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "order", epoch))).tolist()
        for step in range(start_step, self.steps):
            for micro in range(self.update_freq):
                yield [(order[p], epoch, p) for p in self.positions(step, micro)]


class WithMasks(torch.utils.data.Dataset):
    """A dataset's items, each with a random patch mask (L,) drawn from (seed, epoch, position):
    a sample at a given place of an epoch gets the same mask on any number of processes, with any
    accumulation, before and after a resume. Masks are drawn in the loader's workers."""

    def __init__(self, dataset, num_patches, mask_ratio, seed):
        self.dataset, self.num_patches, self.mask_ratio, self.seed = dataset, num_patches, mask_ratio, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        _, epoch, position = key
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "mask", epoch, position))
        return (*self.dataset[key], random_patch_mask(1, self.num_patches, self.mask_ratio, generator=generator)[0])
