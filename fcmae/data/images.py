"""A source's images as a torch dataset: each record opened, augmented from its sample's seed,
decoded, and batched as `Item`s; unreadable images replaced and counted."""
import itertools
import warnings

import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data.arrays import open_image, whole_image
from fcmae.data.contract import DataError, Item, collate
from fcmae.data.decoders import ScaledDecoder
from fcmae.data.sampling import derive_seed, seeded
from fcmae.data.transforms import to_device

UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Images(torch.utils.data.Dataset):
    """Items of `source` (see fcmae.data.contract): `transform` draws each sample's crop from
    (seed, epoch, the sample's seed index) and `decoder` decodes it.

    Items come in micro-batches (`__getitems__`). An unreadable image is skipped with a warning
    naming it; what stands in for it is, in this order, the images the source offers after it
    (a folder's next files) and the next readable image of its micro-batch. The stand-in is
    augmented with the seed of the image it replaces and keeps its own label; each item says
    how many images it stood in for, so the training loop can count them.
    """

    def __init__(self, source, transform, decoder=None, seed=0):
        self.source, self.transform, self.seed = source, transform, seed
        self.decoder = decoder or ScaledDecoder()

    def __len__(self):
        return len(self.source)

    @property
    def classes(self):
        return self.source.classes

    def batch_sampler(self, batch_size, update_freq, num_processes, rank, seed):
        return self.source.batch_sampler(batch_size, update_freq, num_processes, rank, seed)

    def evaluation_batches(self, rank, world, batch_size):
        return self.source.evaluation_batches(rank, world, batch_size)

    def relabel(self, mapping):
        self.source.relabel(mapping)

    def load(self, record, seed_index, epoch):
        """`record` transformed with the augmentation of (epoch, seed_index); None when unreadable."""
        try:
            with seeded(derive_seed(self.seed, "sample", epoch, seed_index)), self.open(record) as img:
                return self.transform(img, record, self.decoder)
        except UNREADABLE as err:
            warnings.warn(f"skipping unreadable image {record.name}: {err}", stacklevel=2)
            return None

    def open(self, record):
        """`record` opened as the transform's channels read it (fcmae.data.arrays.open_image)."""
        return open_image(record, getattr(self.transform, "in_chans", 3))

    def __getitems__(self, keys):
        records = [self.source.record(key) for key in keys]
        bad = set()  # names of the images found unreadable in this micro-batch: each is read once
        items = []
        for i, key in enumerate(keys):
            epoch, seed_index, skipped = key[-2], records[i].seed_index, 0
            for record in self.candidates(records, i):
                if record.name not in bad:
                    image = self.load(record, seed_index, epoch)
                    if image is not None:
                        break
                    bad.add(record.name)
                skipped += 1
            else:
                raise DataError(f"no image of a micro-batch of {len(keys)} from {self.source.where} is readable, "
                                f"nor any that could stand in for them")
            items.append(Item(image, -1 if record.label is None else record.label, skipped, index=seed_index))
        return items

    def candidates(self, records, i):
        """records[i], then what may stand in for it: the source's next images, then the rest of the micro-batch."""
        yield records[i]
        yield from self.source.stand_ins(records[i])
        yield from (records[j] for j in itertools.chain(range(i + 1, len(records)), range(i)))

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def stand_in_batch(self, count):
        """A micro-batch of `count` items made of the data's first readable images (repeated when
        fewer): what a process whose own data cannot be read trains on until every process stops at
        the next loss read-back; nothing trained on it is saved. ConfigError when none is readable."""
        readable = []
        for record in itertools.islice(self.source.first_records(), 4 * count):
            image = self.load(record, record.seed_index, 0)
            if image is not None:
                readable.append(Item(image, -1 if record.label is None else record.label, index=record.seed_index))
            if len(readable) == count:
                break
        if not readable:
            raise ConfigError(f"none of the first images of {self.source.where} is readable")
        return collate([readable[i % len(readable)] for i in range(count)])

    def decode_ahead(self, batches, device):
        """A loader's iterator of batches, wrapped by a decoder that decodes a micro-batch ahead of its
        step (`ahead`: the dali decoder); unchanged for the others."""
        ahead = getattr(self.decoder, "ahead", None)
        return batches if ahead is None else ahead(batches, device)

    def prepare(self, batch, device, channels_last=False):
        """(the batch's images as the model takes them, on `device`; images skipped in the batch).
        uint8 images are converted and normalised there; an on-device decoder decodes first.
        `channels_last`: the images in channels-last memory (see to_device)."""
        images, skipped = batch.image, int(batch.skipped.sum())  # counted on the host: the batch is there
        if not isinstance(images, torch.Tensor):  # what an on-device decoder shipped undecoded
            images, failed = self.decoder.decode_batch(images, device)
            skipped += failed
        return to_device(images, device, self.transform.mean, self.transform.std, channels_last,
                         normalised=getattr(self.transform, "normalised", False)), skipped

    def pictures(self, count, scan=10_000):
        """The first `count` readable images, whole (for the reconstruction pictures): PIL images, or
        an array's float (C, H, W) pixels; unreadable ones among the first `scan` images skipped.
        ConfigError (one sentence, with the first image's problem) when none of them is readable."""
        pictures, seen, first_problem = [], 0, None
        for record in itertools.islice(self.source.first_records(), scan):
            seen += 1
            try:
                with self.open(record) as img:
                    pictures.append(whole_image(img, getattr(self.transform, "in_chans", 3)))
            except UNREADABLE as err:
                if first_problem is None and isinstance(err, ValueError):  # a reason the file itself gives
                    first_problem = f"{record.name} {err}"
                continue
            if len(pictures) == count:
                break
        if not pictures:
            some = f"the first {seen}" if seen == scan else f"the {seen}"
            why = f" ({first_problem})" if first_problem else " (not an image file, or damaged)"
            raise ConfigError(f"none of {some} images of {self.source.where} is readable{why}; check the files, or "
                              "point --data_path at readable images")
        return pictures
