"""What every random-access source shares: images at indices 0..n-1, read in the order of a
StepBatchSampler, optionally counted several times per epoch, and relabelled by a mapping."""
from fcmae.data.sampling import StepBatchSampler, share


class IndexedSource:
    """A source whose images are at indices 0..count-1 (a folder's files, a dataset's rows).

    A subclass gives `count` and `image_record(index)`. Keys are (index, epoch, position) from a
    StepBatchSampler, index < count x repeats: a repeated image gets crops of its own (its seed
    index is the key's), and stand-ins for an unreadable image are the next ones, wrapping around.
    """
    repeats = 1  # each image counted this many times per epoch (small sets)
    label_map = None  # label i becomes label_map[i] (see relabel)

    @property
    def count(self):
        raise NotImplementedError

    def image_record(self, index):
        """The Record of image `index` < count."""
        raise NotImplementedError

    def labels(self):
        """Every image's class index (None when unlabelled), without reading the images; subclasses
        that can, read them faster."""
        return [self._record(i).label for i in range(self.count)]

    def __len__(self):
        return self.count * self.repeats

    def _record(self, index):
        record = self.image_record(index % self.count)
        if record.label is not None and self.label_map is not None:
            record = record._replace(label=self.label_map[record.label])
        return record

    def record(self, key):
        return self._record(key[0])._replace(seed_index=key[0])

    def stand_ins(self, record):
        """The images after an unreadable one, in order, wrapping around."""
        start = record.seed_index % self.count
        return (self._record(start + k) for k in range(1, self.count))

    def first_records(self):
        return (self._record(i) for i in range(self.count))

    def batch_sampler(self, batch_size, update_freq, num_processes, rank, seed):
        return StepBatchSampler(len(self), batch_size, update_freq, num_processes, rank, seed)

    def evaluation_batches(self, rank, world, batch_size):
        """A contiguous share (shares differ by at most one image), in batches of (index, 0, 0) keys."""
        mine = share(len(self), rank, world)
        return [[(i, 0, 0) for i in mine[s:s + batch_size]] for s in range(0, len(mine), batch_size)]

    def relabel(self, mapping):
        self.label_map = list(mapping) if self.label_map is None else [mapping[i] for i in self.label_map]


class Subset(IndexedSource):
    """Some of a random-access source's images, `indices` in that order (a k-NN bank's sample)."""

    def __init__(self, source, indices):
        self.base, self.indices = source, list(indices)
        self.kind, self.classes = source.kind, source.classes
        self.where = f"{len(self.indices)} images of {source.where}"

    @property
    def count(self):
        return len(self.indices)

    def image_record(self, index):
        return self.base._record(self.indices[index])
