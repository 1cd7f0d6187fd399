"""The source of folders of image files (labelled from class folders too) and of the bundled sample
photographs."""
import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS as PILLOW_EXTENSIONS
from torchvision.datasets.folder import find_classes, make_dataset

from fcmae.config import ConfigError
from fcmae.data.arrays import ARRAY_EXTENSIONS
from fcmae.data.contract import Record
from fcmae.data.indexed import IndexedSource

IMG_EXTENSIONS = PILLOW_EXTENSIONS + ARRAY_EXTENSIONS  # the files a folder's images are

# Real photographs that scikit-image ships (no download at run time); the synthetic ones
# (chessboard, logo, phantom, ...) are left out.
SAMPLE_PHOTOGRAPHS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)


def find_images(data_path, flag="--data_path"):
    """Image files under `data_path` (or `data_path/train` when that exists), sorted.

    Class sub-folders, nested folders and flat folders all work; labels are not used.
    """
    root = Path(data_path)
    if not root.exists():
        raise ConfigError(f"{flag} {root} does not exist; point it at a folder of images "
                          "(class sub-folders or flat), or at an ImageNet root holding train/")
    if not root.is_dir():
        raise ConfigError(f"{flag} {root} is a file, not a folder of images")
    if (root / "train").is_dir():
        root = root / "train"
    files = []
    for folder, subdirs, names in os.walk(root, followlinks=True):
        subdirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ConfigError(f"{flag} {root} holds no images (looked for {', '.join(IMG_EXTENSIONS[:6])}, "
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


class FolderSource(IndexedSource):
    """Image files (a folder's, or the sample photographs), labelled when `labels` is given."""
    kind = "image files"

    def __init__(self, files, labels=None, classes=None, where="", repeats=1):
        self.files, self.file_labels, self.classes, self.where = list(files), labels, classes, where
        self.repeats = repeats

    @classmethod
    def claims(cls, data_path):
        return True  # the last resort: any other path must be a folder of images

    @classmethod
    def open(cls, data_path, labelled=False, flag="--data_path", selection=None):
        if labelled:
            files, labels, classes = class_folders(data_path, flag)
            return cls(files, labels, classes, where=str(data_path))
        files = sample_photographs() if data_path is None else find_images(data_path, flag)
        return cls(files, where="the sample photographs" if data_path is None else str(data_path))

    @property
    def count(self):
        return len(self.files)

    def image_record(self, index):
        label = None if self.file_labels is None else self.file_labels[index]
        return Record(index, label, self.files[index], path=self.files[index])

    def labels(self):
        if self.file_labels is None:
            return [None] * self.count
        return self.file_labels if self.label_map is None else [self.label_map[label] for label in self.file_labels]


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
