"""What makes every batch, crop and mask a function of (seed, epoch, position): one seed
derivation for every random stream, the batch sampler of random-access sources, and per-sample masks."""
import contextlib
import random

import numpy as np
import torch

from fcmae.models import random_patch_mask

# The streams of random numbers a run draws; each is seeded by derive_seed(seed, stream, keys...).
STREAMS = {"order": 1, "sample": 2, "mask": 3, "step": 4, "pictures": 5, "shard": 6, "held_out": 7, "knn": 8,
           "norm_stats": 9}


def derive_seed(seed, stream, *keys):
    """A 63-bit seed for one use of `stream` ("order": an epoch's data order, or shard order;
    "shard": the order inside one shard; "sample": one sample's augmentation; "mask": one
    sample's patch mask; "step": the global generators of an optimiser step; "pictures": the
    fixed reconstruction pictures; "norm_stats": the images --norm_stats auto samples), different
    for every (seed, keys) and the same on every machine: numpy's SeedSequence hashes them
    (non-negative ints)."""
    words = np.random.SeedSequence([seed, STREAMS[stream], *keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


@contextlib.contextmanager
def seeded(seed):
    """Seed torch's (CPU), Python's and numpy's global generators inside the block (torchvision and
    timm transforms draw from all three) and restore them afterwards. Only the CPU generator:
    torch.manual_seed would also queue a seed for every GPU, which costs more than a crop."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)  # numpy takes 32 bits
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def share(size, rank, world):
    """The indices of process `rank`'s contiguous share of `size` items (shares differ by at most one)."""
    return range(size * rank // world, size * (rank + 1) // world)


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
    """A dataset's items (fcmae.data.images.Images), each with a random patch mask (L,) drawn from
    (seed, epoch, position): a sample at a given place of an epoch gets the same mask on any
    number of processes, with any accumulation, before and after a resume. With `held_out`, the
    mask is drawn from (seed, the image's index) instead: the same at every evaluation, whatever
    the batches (pretraining's held-out loss). Masks are drawn in the loader's workers."""

    def __init__(self, dataset, num_patches, mask_ratio, seed, held_out=False):
        self.dataset, self.num_patches, self.mask_ratio, self.seed = dataset, num_patches, mask_ratio, seed
        self.held_out = held_out

    def __len__(self):
        return len(self.dataset)

    @property
    def source(self):
        return self.dataset.source

    def batch_sampler(self, *args, **kwargs):
        return self.dataset.batch_sampler(*args, **kwargs)

    def evaluation_batches(self, rank, world, batch_size):
        return self.dataset.evaluation_batches(rank, world, batch_size)

    def prepare(self, batch, device, channels_last=False):
        return self.dataset.prepare(batch, device, channels_last)

    def stand_in_batch(self, count):
        """The dataset's stand-in micro-batch (see Images.stand_in_batch), with masks."""
        batch = self.dataset.stand_in_batch(count)
        return batch._replace(mask=torch.stack([self.mask((0, i)) for i in range(count)]))

    def decode_ahead(self, batches, device):
        return self.dataset.decode_ahead(batches, device)

    def mask(self, key, index=-1):
        """The mask of the sample a key names (or, held out, of the image of seed index `index`)."""
        *_, epoch, position = key
        seed = derive_seed(self.seed, "held_out", index) if self.held_out else \
            derive_seed(self.seed, "mask", epoch, position)
        return random_patch_mask(1, self.num_patches, self.mask_ratio, generator=torch.Generator().manual_seed(seed))[0]

    def __getitems__(self, keys):
        items = self.dataset.__getitems__(keys)  # a whole micro-batch: bad images are replaced within it
        return [item._replace(mask=self.mask(key, item.index)) for item, key in zip(items, keys)]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


def balanced_subset(labels, count, seed):
    """Indices of a seeded subset of `count` of the items with `labels`, as balanced over the
    classes as they allow (every class gets count // classes, the remainder to the first
    classes that still have images), in index order."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "knn"))
    by_class = {}
    for index in torch.randperm(len(labels), generator=generator).tolist():
        by_class.setdefault(labels[index], []).append(index)
    chosen, classes = [], sorted(by_class)
    while len(chosen) < min(count, len(labels)):
        for label in classes:
            if by_class[label] and len(chosen) < count:
                chosen.append(by_class[label].pop())
    return sorted(chosen)
