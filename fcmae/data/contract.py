"""The dataset contract: what a data source provides, the item every loader yields, and the errors.

A *source* (a folder of image files, webdataset shards, ...) says where each image's bytes are
and in which order a run reads them; it never decodes. `fcmae.data.images.Images` turns a source
into a torch dataset: it opens each record, draws the sample's augmentation from its seed,
decodes through a decoder (fcmae.data.decoders) and returns `Item`s. Every loader, pretraining's
and fine-tuning's, training and evaluation, yields `Item`s batched by `collate`.

A new source is one file: a class that satisfies `Source` with a `claims` and an `open`
classmethod, added to `fcmae.data.SOURCES`.
"""
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from PIL import Image


class DataError(RuntimeError):
    """Data that cannot be read mid-run (a shard gone, a batch without one readable image); the
    message is one sentence."""


class Record(NamedTuple):
    """Where one image is, before anything is decoded.

    seed_index: the number its augmentation is seeded by (with the seed and the epoch);
    label: its class index, or None when the source has no labels;
    name: how a warning names it (a path, or a shard member);
    path / data: the file to read, or its bytes (exactly one of the two is set).
    """
    seed_index: int
    label: int | None
    name: str
    path: str | None = None
    data: bytes | None = None

    def open(self):
        """The image, opened lazily: PIL reads the header (size, format), not the pixels."""
        return Image.open(self.path if self.data is None else io.BytesIO(self.data))

    def read(self):
        """The file's bytes."""
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


class Selection(NamedTuple):
    """What to read of data that has splits and columns (a Hugging Face dataset); None leaves the
    choice to the source (its `train` split, the column of an Image or ClassLabel feature). Other
    sources refuse a selection."""
    splits: tuple[str, ...] | None = None
    image_column: str | None = None
    label_column: str | None = None

    def __bool__(self):
        return any(value is not None for value in self)


class Crop(NamedTuple):
    """What an augmentation drew for one image, before anything is decoded: the box (top, left,
    height, width, in the full-size image's pixels, as torchvision's crop), the output size
    (height, width), whether to flip horizontally, and the resize filter (a torchvision
    InterpolationMode). A decoder turns (image, Crop) into pixels (see fcmae.data.decoders)."""
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    flip: bool
    interpolation: Any


class Item(NamedTuple):
    """One sample, or a batch of them (`collate`): the same type for pretraining and fine-tuning.

    image: uint8 (H, W, C) for the paths that ship uint8 (pretraining, evaluation; float32 for
        images read as arrays, in the same units: see fcmae.data.arrays), float32
        (C, H, W) normalised for fine-tuning's training transform (RandAugment and random erasing
        work on other types), or what an on-device decoder decodes in the main process (see
        fcmae.data.decoders); fcmae.data.transforms.to_device makes all of them the model's input;
    label: the class index, -1 when unlabelled (a LongTensor in a batch);
    skipped: how many unreadable images this one stands in for (0 or more);
    mask: the patch mask (L,) of pretraining (None elsewhere);
    index: the seed index of the image it is (or stands in for), which seeds its augmentation and
        a held-out mask (-1 when unknown; a LongTensor in a batch).
    """
    image: Any
    label: Any = -1
    skipped: Any = 0
    mask: Any = None
    index: Any = -1


def collate(items):
    """A list of Items -> one Item of batched fields (tensors stacked; None stays None; what is
    neither a tensor nor a number goes to the decoder's own `collate`)."""
    first = items[0]
    images = [item.image for item in items]
    if isinstance(first.image, torch.Tensor):
        if len({image.dtype for image in images}) > 1:  # 8-bit and 16-bit images of one greyscale run
            images = [image.float().div_(255) if image.dtype == torch.uint8 else image for image in images]
        images = torch.stack(images)
    else:
        images = type(first.image).collate(images)
    return Item(
        images,
        torch.tensor([item.label for item in items], dtype=torch.long),
        torch.tensor([item.skipped for item in items], dtype=torch.long),
        None if first.mask is None else torch.stack([item.mask for item in items]),
        torch.tensor([item.index for item in items], dtype=torch.long),
    )


@runtime_checkable
class TrainSampler(Protocol):
    """Micro-batches of keys for one process of a training run, from a given step on.

    One sampler serves a whole run: `set_epoch` says which epoch, and from which optimiser step,
    the next pass starts, so the DataLoader and its workers can persist across epochs. The keys'
    order is a function of (seed, epoch, position) only."""
    steps: int  # optimiser steps per epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Sequence]: ...  # a micro-batch: a list of keys, or a sequence like one

    def __len__(self) -> int: ...


@runtime_checkable
class Source(Protocol):
    """Where images come from. Keys are whatever the source's samplers yield; a key's last two
    entries are (epoch, position), as `WithMasks` expects."""
    where: str                   # how messages name it: --data_path as given
    kind: str                    # how messages name its kind of data ("image files", "shards", ...)
    classes: list[str] | None    # class names when labelled, else None

    @classmethod
    def claims(cls, data_path: str) -> bool:
        """Whether --data_path names data of this kind (checked in the order of fcmae.data.SOURCES)."""

    @classmethod
    def open(cls, data_path: str, labelled: bool, flag: str, selection: Selection) -> "Source":
        """The source; ConfigError (one sentence naming `flag`) when it cannot be used. Only
        sources with `selectable = True` are given a non-empty selection."""

    def __len__(self) -> int: ...

    def record(self, key) -> Record:
        """The image a sampler's key names; cheap: no decoding."""

    def stand_ins(self, record: Record) -> Iterable[Record]:
        """Images that may stand in for an unreadable one beyond its micro-batch (random-access
        sources: the next ones; streams: none)."""

    def batch_sampler(self, batch_size: int, update_freq: int, num_processes: int, rank: int,
                      seed: int) -> TrainSampler: ...

    def evaluation_batches(self, rank: int, world: int, batch_size: int) -> Iterable[list]:
        """This process's share for an exact evaluation, in batches of keys: every image of the
        data in exactly one process, nothing padded."""

    def first_records(self) -> Iterable[Record]:
        """Records from the start of the data (for the reconstruction pictures)."""

    def relabel(self, mapping: list[int]) -> None:
        """Rename the class indices: label i becomes mapping[i] (evaluation classes to training classes)."""
