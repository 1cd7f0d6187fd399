"""Folders of image files (labelled from class folders too) and the bundled sample photographs."""
import os
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fcmae.config import ConfigError
from fcmae.data.sampling import StepBatchSampler, derive_seed, seeded, share

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

    def __getitems__(self, keys):
        return [self[key] for key in keys]

    def batch_sampler(self, batch_size, update_freq, num_processes, rank, seed):
        return StepBatchSampler(len(self), batch_size, update_freq, num_processes, rank, seed)

    def pictures(self, count):
        """The first `count` readable images, as PIL images (for the reconstruction pictures)."""
        return [self.load(i)[0] for i in range(min(count, len(self.files)))]


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

    def relabel(self, mapping):
        """Rename the class indices: label i becomes mapping[i] (evaluation folders to training classes)."""
        self.labels = [mapping[label] for label in self.labels]

    def evaluation_batches(self, rank, world, batch_size):
        """This process's contiguous share for an exact evaluation (shares differ by at most one
        image, nothing padded or counted twice), in batches of (index, 0) keys."""
        mine = share(len(self), rank, world)
        return [[(i, 0) for i in mine[s:s + batch_size]] for s in range(0, len(mine), batch_size)]


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
