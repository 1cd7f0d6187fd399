"""The source of webdataset tar shards: finding them, and reading them in an exact, resumable order
(fcmae.data.conversion writes them).

--data_path may name a folder of shards with its index, an index file (a path, URL or
`pipe:` command; shard names in it are relative to it), or shards themselves (one .tar, a brace
pattern, a URL, a `pipe:` command), whose counts then come from an index.json beside them or,
lacking one, from reading the shards once. Each process reads its own share of the shards: in
epoch e the shard order is a permutation drawn from (seed, e), process r takes every world-th
shard from r on, and takes every sample of each of its shards, in an order drawn from (seed, e,
shard) over the shard's places in tar order. So the data order is a function of (seed, epoch,
position), computed from the shards' counts alone; a resumed run skips whole shards by their
counts, and the samples of a shard before its position, without reading them.

Who reads what. The batch sampler runs in the main process and does no I/O: its keys name a
sample by (shard, its place among the shard's samples in tar order), with the epoch and the
position. The loader's workers turn a key into the image's bytes (ShardSource.record), each
through a cache of its own (ShardTables), so that no micro-batch makes a worker read a whole
shard again:
- a local, uncompressed .tar file is scanned once per worker, headers only (tarfile, seeking past
  the data; the small `cls` members are read), into a table of where each sample's image lies;
  a key then costs one positioned read of that image's bytes. Each worker keeps the tables of
  the last 32 shards it used (a few hundred bytes a sample) and one open file per table;
- a URL, a `pipe:` command or a compressed tar cannot be read at an offset, so the worker that
  first needs one of its samples reads it whole, with webdataset's tar iteration, and keeps its
  bytes in memory: the last 2 shards it used, and the next one of its process's order, read
  ahead by a thread. The cost of reading in the workers: W workers read (download) such a shard
  W times instead of once, and each holds up to 3 shards in memory (about 3 x 100 MB for shards
  of 1,000 ImageNet images); the main process, which launches the GPU's work, reads nothing.
Both give the same samples: grouped as webdataset groups a tar's members (by key, in tar order),
numbered by their keys. A member that is not a readable image is replaced by the next good one
of its micro-batch, with a warning, and counted; so is a sample without an image file, and each
place of a shard that ends early (read_shard). A shard that cannot be read when its
turn comes raises DataError in the worker: that process keeps in step with the others on a
stand-in until the next loss read-back, where all stop with one sentence (fcmae.training.engine).
"""
import collections
import collections.abc
import contextlib
import json
import os
import re
import sys
import tarfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from fcmae.config import ConfigError
from fcmae.data.contract import DataError, Record
from fcmae.data.folders import IMG_EXTENSIONS
from fcmae.data.sampling import derive_seed

INDEX = "index.json"


def webdataset():
    """The webdataset library, imported when shards are first used: folders of files need none of it."""
    try:
        import webdataset
        import webdataset.shardlists
        import webdataset.tariterators
    except ImportError:
        raise ConfigError("shards need the webdataset library, which is not installed: "
                          "pip install webdataset") from None
    return webdataset


IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)


# ----- finding shards --------------------------------------------------------------------------------

def is_remote(url):
    return url.startswith("pipe:") or "://" in url


def is_shard_source(data_path):
    """Whether --data_path names shards (or their index) rather than a folder of image files."""
    text = str(data_path)
    if is_remote(text) or "{" in text or "::" in text or text.endswith((".tar", ".json")):
        return True
    folder = Path(text)
    return folder.is_dir() and ((folder / INDEX).is_file() or any(folder.glob("*.tar")))


def _read_json(url):
    with webdataset().gopen(url) as stream:
        return json.loads(stream.read())


def _beside(url, name):
    """`name` resolved against the folder of `url` (a path or URL; None for pipe: commands)."""
    if url.startswith("pipe:"):
        return None
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


def _samples(stream, url):
    """The samples (dicts of member extension -> bytes, with "__key__") of an open tar stream."""
    tariterators = webdataset().tariterators
    return tariterators.group_by_keys({**m, "__url__": url} for m in tariterators.tar_file_iterator(stream))


def _count(url):
    """Images in one shard, by reading it (local files: headers only)."""
    if not is_remote(url):
        with open(url, "rb") as f:
            return len({m.name.split(".", 1)[0] for m in tarfile.open(fileobj=f) if m.isreg()})
    with webdataset().gopen(url) as stream:
        return sum(1 for _ in _samples(stream, url))


class Shards:
    """The shards of --data_path, with their image counts and class names (None: unlabelled)."""

    def __init__(self, urls, counts, classes, where):
        self.urls, self.counts, self.classes, self.where = list(urls), list(counts), classes, where

    @property
    def images(self):
        return sum(self.counts)

    @classmethod
    def open(cls, data_path):
        text = str(data_path)
        if not is_remote(text) and Path(text).is_dir():
            folder = Path(text)
            if (folder / INDEX).is_file():
                return cls.from_index(str(folder / INDEX))
            urls = sorted(str(p) for p in folder.glob("*.tar"))
            return cls.counted(urls, text)
        if text.endswith(".json"):
            return cls.from_index(text)
        urls = webdataset().shardlists.expand_urls(text)
        missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
        if missing:
            raise ConfigError(f"--data_path names {len(missing)} shard(s) that do not exist, the first {missing[0]}")
        index_url = _beside(urls[0], INDEX)
        if index_url and (is_remote(index_url) or Path(index_url).is_file()):
            try:
                index = cls.from_index(index_url)
            except (OSError, ValueError, ConfigError):
                index = None
            if index is not None:
                by_name = {u.rsplit("/", 1)[-1]: n for u, n in zip(index.urls, index.counts)}
                if all(u.rsplit("/", 1)[-1] in by_name for u in urls):
                    return cls(urls, [by_name[u.rsplit("/", 1)[-1]] for u in urls], index.classes, text)
        return cls.counted(urls, text)

    @classmethod
    def from_index(cls, url):
        try:
            index = _read_json(url)
        except (OSError, ValueError) as err:
            raise ConfigError(f"the shard index {url} cannot be read ({type(err).__name__}: {err})") from None
        if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
            raise ConfigError(f"{url} is not a shard index written by python -m fcmae.shards")
        absolute = [is_remote(e["url"]) or e["url"].startswith("/") for e in index["shards"]]
        if url.startswith("pipe:") and not all(absolute):
            raise ConfigError(f"the index from {url} names shards relative to it, which a pipe: command has not; "
                              "write their full URLs or pipe: commands into it")
        urls = [e["url"] if whole else _beside(url, e["url"]) for e, whole in zip(index["shards"], absolute)]
        missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
        if missing:
            raise ConfigError(f"the shard index {url} lists {len(missing)} shard(s) that do not exist, the first "
                              f"{missing[0]}")
        return cls(urls, [e["images"] for e in index["shards"]], index.get("classes"), url)

    @classmethod
    def counted(cls, urls, where):
        if not urls:
            raise ConfigError(f"--data_path {where} holds no .tar shards")
        print(f"counting the images of {len(urls)} shard(s) without an index (write one with python -m fcmae.shards)",
              file=sys.stderr)
        counts = []
        for url in urls:
            try:
                counts.append(_count(url))
            except tarfile.TarError:
                raise ConfigError(f"{url} is not a tar archive; --data_path takes a folder of images or webdataset "
                                  "shards (.tar files, their folder or their index.json)") from None
            except (OSError, ValueError) as err:
                raise ConfigError(f"the shard {url} of {where} cannot be read ({type(err).__name__}: {err})") from None
        return cls(urls, counts, None, where)


# ----- reading ---------------------------------------------------------------------------------------

SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members, which it skips
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile reads them, but not at an offset
LOCAL_TABLES, REMOTE_SHARDS = 32, 2  # how many shards a worker keeps (see the module's text)


def is_seekable(url):
    """Whether `url` is a local, uncompressed tar file, whose members can be read at their offsets
    (False when it cannot be opened: reading it whole then says why)."""
    if is_remote(url):
        return False
    try:
        with open(url, "rb") as f:
            return not f.read(6).startswith(COMPRESSED)
    except OSError:
        return False


def _local_members(f):
    """(key, {extension: (offset, size)}) of the local tar file `f`, from its headers alone, in tar
    order and grouped as webdataset groups a tar's members; raises where webdataset's reading of a
    damaged file raises, after the samples it would have yielded."""
    split = webdataset().tariterators.base_plus_ext
    end = os.fstat(f.fileno()).st_size
    current = None
    for info in tarfile.open(fileobj=f, mode="r:"):  # seeks past each member's data
        if not info.isreg() or info.name is None or SKIP_META.match(info.name):
            continue
        if info.offset_data + info.size > end:  # where webdataset's read of the member fails
            raise tarfile.ReadError("unexpected end of data")
        prefix, suffix = split(info.name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current[0]:
            if current is not None:
                yield current
            current = (prefix, {})
        if suffix in current[1]:
            raise ValueError(f"{info.name}: duplicate file name in tar file")
        current[1][suffix] = (info.offset_data, info.size)
    if current is not None:
        yield current


def _streamed_members(url):
    """(key, {extension: bytes}) of a shard read whole by webdataset (URLs, pipe: commands, compressed tars)."""
    with webdataset().gopen(url) as stream:
        for raw in _samples(stream, url):
            yield raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")}


class Sample(NamedTuple):
    """One sample of a shard: its index (the member's key when that is a number, else its place in
    the shard), its image's extension and its class index (None when it has none), and the image:
    its bytes, (offset, size) in the local tar file, or None (no image: read as unreadable)."""
    index: int
    ext: str | None
    cls: int | None
    image: bytes | tuple[int, int] | None


def read_shard(url, expected):
    """The ShardTable of one shard: exactly `expected` samples, in tar order. A local uncompressed
    tar file is read headers only (and its `cls` members): the images stay where they are; any
    other shard is read whole. A shard that ends early is filled up with unreadable places that
    repeat its first sample's index and class (the loader counts them as skipped). A shard that
    cannot be opened raises DataError."""
    local = is_seekable(url)
    samples = []
    try:
        with open(url, "rb") if local else contextlib.nullcontext() as f:
            for key, members in _local_members(f) if local else _streamed_members(url):
                ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if ext is None:
                    warnings.warn(f"member {key} of the shard {url} holds no image file; it counts as skipped",
                                  stacklevel=2)
                cls = members.get("cls")
                if local and cls is not None:
                    f.seek(cls[0])
                    cls = f.read(cls[1])
                samples.append(Sample(int(key) if key.isdigit() else len(samples), ext,
                                      None if cls is None else int(cls), members.get(ext)))
    except (OSError, EOFError, ValueError, tarfile.TarError) as err:
        if not samples:
            raise DataError(f"the shard {url} cannot be read ({type(err).__name__}: {err})") from None
        warnings.warn(f"the shard {url} ends early after {len(samples)} of {expected} images "
                      f"({type(err).__name__}); the rest counts as skipped", stacklevel=2)
    if not samples:
        raise DataError(f"the shard {url} holds no images")
    samples += [samples[0]._replace(image=None)] * max(0, expected - len(samples))
    return ShardTable(url, samples[:expected], local)


class ShardTable:
    """The samples of one shard (read_shard), and their images: in memory, or read from the local
    tar file at their offsets through a file that this process opens once."""

    def __init__(self, url, samples, local):
        self.url, self.samples, self.local = url, samples, local
        self.file = self.pid = None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, place):
        return self.samples[place]

    def image(self, place):
        """The image bytes of the sample at `place` (None: it has none); DataError when the shard's
        file can no longer be read."""
        image = self.samples[place].image
        if image is None or not self.local:
            return image
        offset, size = image
        try:
            if self.pid != os.getpid():  # a file of this process's own, not one a forked worker inherited
                self.file, self.pid = open(self.url, "rb"), os.getpid()
            if hasattr(os, "pread"):  # no file position shared with anyone
                return os.pread(self.file.fileno(), size, offset)
            self.file.seek(offset)
            return self.file.read(size)
        except OSError as err:
            raise DataError(f"the shard {self.url} cannot be read ({type(err).__name__}: {err})") from None

    def close(self):
        if self.file is not None and self.pid == os.getpid():
            self.file.close()
        self.file = self.pid = None


class _Reading:
    """One shard read whole: in a daemon thread once `start`ed (reading ahead), else by `result`."""

    def __init__(self, url, count):
        self.url, self.count = url, count
        self.thread = self.table = self.error = None
        self.done = False

    def start(self):
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        try:
            self.table = read_shard(self.url, self.count)
        except Exception as err:  # noqa: BLE001 (raised in the thread that asks for the table)
            self.error = err
        self.done = True

    def result(self):
        if self.thread is not None:
            self.thread.join()
        elif not self.done:
            self._read()
        if self.error is not None:
            raise self.error
        return self.table


class ShardTables:
    """The shards one process (a loader worker) keeps (see the module's text): the tables of the
    last LOCAL_TABLES local tar files it used; the last REMOTE_SHARDS shards read whole, and the
    next one of its process's order, read ahead."""

    def __init__(self):
        self.pid = os.getpid()
        self.local, self.remote = collections.OrderedDict(), collections.OrderedDict()
        self.seekable = {}

    def is_seekable(self, url):
        if url not in self.seekable:
            self.seekable[url] = is_seekable(url)
        return self.seekable[url]

    def get(self, ref):
        """The table of `ref`'s shard, read on first use."""
        if self.pid != os.getpid():  # inherited by a forked worker: the parent's threads and files are not its own
            self.__init__()
        if ref.url in self.local:
            self.local.move_to_end(ref.url)
            return self.local[ref.url]
        if self.is_seekable(ref.url):
            table = self.local[ref.url] = read_shard(ref.url, ref.count)
            while len(self.local) > LOCAL_TABLES:
                self.local.popitem(last=False)[1].close()
            return table
        reading = self.remote.pop(ref.url, None) or _Reading(ref.url, ref.count)
        self.remote[ref.url] = reading
        if ref.next is not None and ref.next[0] not in self.remote and not self.is_seekable(ref.next[0]):
            self.remote[ref.next[0]] = _Reading(*ref.next).start()
        while len(self.remote) > REMOTE_SHARDS + 1:
            self.remote.popitem(last=False)
        return reading.result()


TABLES = ShardTables()  # this process's; each loader worker has its own


class ShardRef:
    """A shard as keys name it: its number, URL and image count, and (URL, count) of the next shard
    of its process's order (None for the last). Pickles as these five values. Its `table`, read on
    first use and kept, is for callers outside the loader (tests, tools); the loader's workers read
    through their own ShardTables."""
    __slots__ = ("shard", "url", "count", "next", "_table")

    def __init__(self, shard, url, count, next=None):
        self.shard, self.url, self.count, self.next, self._table = shard, url, count, next, None

    def __reduce__(self):
        return ShardRef, (self.shard, self.url, self.count, self.next)

    def table(self):
        if self._table is None:
            self._table = read_shard(self.url, self.count)
        return self._table


def shard_refs(shards, numbers):
    """ShardRefs of shards `numbers` (in that order), each knowing the next."""
    numbers = list(numbers)
    nexts = [(shards.urls[s], shards.counts[s]) for s in numbers[1:]] + [None]
    return [ShardRef(s, shards.urls[s], shards.counts[s], n) for s, n in zip(numbers, nexts)]


class Member:
    """A key's sample: its ShardRef and its place among the shard's samples in tar order; no bytes.
    It also reads as a mapping of the sample's fields: `member["index"]` (or "ext", "cls", "image")
    reads the shard through the ref (ShardRef.table) when first asked."""
    __slots__ = ("ref", "place")

    def __init__(self, ref, place):
        self.ref, self.place = ref, place

    def __reduce__(self):
        return Member, (self.ref, self.place)

    def __iter__(self):
        return iter((self.ref, self.place))

    def __getitem__(self, field):
        table = self.ref.table()
        return table.image(self.place) if field == "image" else getattr(table[self.place], field)

    def __repr__(self):
        return f"Member(shard {self.ref.shard}, place {self.place})"


class ShardKeys(collections.abc.Sequence):
    """A micro-batch of (Member, epoch, position) keys, held as plain lists (each sample's ShardRef,
    place and position) and pickled as them: sending a micro-batch to a worker costs the main
    process about what a folder's (index, epoch, position) keys cost. The keys are made when read."""
    __slots__ = ("refs", "places", "epoch", "positions")

    def __init__(self, refs, places, epoch, positions):
        self.refs, self.places, self.epoch, self.positions = refs, places, epoch, positions

    def __reduce__(self):
        return ShardKeys, (self.refs, self.places, self.epoch, self.positions)

    def __len__(self):
        return len(self.places)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardKeys(self.refs[i], self.places[i], self.epoch, self.positions[i])
        return Member(self.refs[i], self.places[i]), self.epoch, self.positions[i]

    def __iter__(self):
        epoch = self.epoch
        return ((Member(ref, place), epoch, position)
                for ref, place, position in zip(self.refs, self.places, self.positions))

    def __repr__(self):
        return f"ShardKeys({list(self)!r})"


class ShardBatchSampler:
    """Micro-batches (ShardKeys) of (Member, epoch, position) keys for one process, from optimiser step
    `start_step` on; the counterpart of data.StepBatchSampler for shards (see the module's text).
    It reads nothing: the order comes from the shards' counts.

    Every process runs the same number of steps: those its smallest possible share of shards
    holds (the rest of a larger share is dropped, like the incomplete last batch of a folder)."""

    def __init__(self, shards, batch_size, update_freq, num_processes, rank, seed, epoch=0, start_step=0):
        self.shards, self.batch_size, self.update_freq = shards, batch_size, update_freq
        self.num_processes, self.rank, self.seed = num_processes, rank, seed
        self.epoch, self.start_step = epoch, start_step
        smallest = sorted(shards.counts)[:len(shards.counts) // num_processes]
        self.steps = sum(smallest) // (batch_size * update_freq)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps - self.start_step) * self.update_freq

    def my_shards(self, epoch):
        order = torch.randperm(len(self.shards.urls), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "order", epoch))).tolist()
        return order[self.rank::self.num_processes]

    def __iter__(self):
        epoch, start_step = self.epoch, self.start_step
        per_step = self.batch_size * self.update_freq
        first, last = start_step * per_step, self.steps * per_step  # this process's stream positions
        plan, position = [], 0  # (shard, position of its first sample) for the shards still needed
        for shard in self.my_shards(epoch):
            count = self.shards.counts[shard]
            if position + count > first and position < last:
                plan.append((shard, position))
            position += count
        refs, places, positions = [], [], []
        for ref, (shard, start) in zip(shard_refs(self.shards, [s for s, _ in plan]), plan):
            order = torch.randperm(ref.count, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "shard", epoch, shard))).tolist()
            for offset, place in enumerate(order):
                q = start + offset
                if first <= q < last:
                    refs.append(ref)
                    places.append(place)
                    positions.append(q * self.num_processes + self.rank)
                    if len(places) == self.batch_size:
                        yield ShardKeys(refs, places, epoch, positions)
                        refs, places, positions = [], [], []


class ShardSource:
    """The source of shards (see the module's text): keys are (Member, epoch, position); the
    loader's workers read the member (record)."""
    kind = "shards"

    def __init__(self, shards, labelled=False):
        if labelled and shards.classes is None:
            raise ConfigError(f"the shards of {shards.where} carry no class labels (written from a folder without "
                              "class sub-folders)")
        self.shards, self.where, self.labelled = shards, shards.where, labelled
        self.classes = shards.classes
        self.label_map = None

    @classmethod
    def claims(cls, data_path):
        return data_path is not None and is_shard_source(data_path)

    @classmethod
    def open(cls, data_path, labelled=False, flag="--data_path", selection=None):
        return cls(Shards.open(data_path), labelled)

    def __len__(self):
        return self.shards.images

    def record(self, key):
        """The sample a key names, its image bytes read (by this process's ShardTables)."""
        member = key[0]
        return self._record(TABLES.get(member.ref), member.place)

    def _record(self, table, place):
        sample = table[place]
        label = sample.cls if self.labelled else None
        if label is not None and self.label_map is not None:
            label = self.label_map[label]
        name = f"member {sample.index:09d} of the shards of {self.where}"
        # a member without an image, or the filling of a shard that ended early: unreadable
        return Record(sample.index, label, name, data=table.image(place) or b"")

    def stand_ins(self, record):
        return ()  # a stream: only the other members of the micro-batch can stand in

    def batch_sampler(self, batch_size, update_freq, num_processes, rank, seed):
        if len(self.shards.urls) < num_processes:
            raise ConfigError(f"{self.where} has {len(self.shards.urls)} shard(s) for {num_processes} "
                              "processes, and every process reads whole shards; write smaller shards (--per_shard)")
        return ShardBatchSampler(self.shards, batch_size, update_freq, num_processes, rank, seed)

    def relabel(self, mapping):
        self.label_map = list(mapping)

    def first_records(self):
        """The records of the shards in index order, the ones that cannot be read skipped."""
        for url, count in zip(self.shards.urls, self.shards.counts):
            try:
                table = read_shard(url, count)
            except DataError:
                continue
            try:
                for place in range(len(table)):
                    yield self._record(table, place)
            finally:
                table.close()

    def evaluation_batches(self, rank, world, batch_size):
        """This process's share for an exact evaluation: its shards (every world-th, in index
        order), all of their images, in batches of `batch_size` (the last one smaller)."""
        return EvaluationBatches(self.shards, rank, world, batch_size)


class EvaluationBatches:
    """Batches of (Member, 0, 0) keys over a process's shards, in order, nothing dropped; like the
    training sampler, it reads nothing (the loader's workers do)."""

    def __init__(self, shards, rank, world, batch_size):
        self.shards, self.mine, self.batch_size = shards, list(range(len(shards.urls)))[rank::world], batch_size

    def __iter__(self):
        refs, places = [], []
        for ref in shard_refs(self.shards, self.mine):
            for place in range(ref.count):
                refs.append(ref)
                places.append(place)
                if len(places) == self.batch_size:
                    yield ShardKeys(refs, places, 0, [0] * len(places))
                    refs, places = [], []
        if places:
            yield ShardKeys(refs, places, 0, [0] * len(places))

    def __len__(self):
        return -(-sum(self.shards.counts[s] for s in self.mine) // self.batch_size)
