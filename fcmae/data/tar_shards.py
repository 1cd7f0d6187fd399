"""The source of webdataset tar shards: finding them, and reading them in an exact, resumable order
(fcmae.data.conversion writes them).

--data_path may name a folder of shards with its index, an index file (a path, URL or
`pipe:` command; shard names in it are relative to it), or shards themselves (one .tar, a brace
pattern, a URL, a `pipe:` command), whose counts then come from an index.json beside them or,
lacking one, from reading the shards once. Each process reads its own share of the shards: in
epoch e the shard order is a permutation drawn from (seed, e), process r takes every world-th
shard from r on, and reads each of its shards whole, in an order drawn from (seed, e, shard).
So the data order is a function of (seed, epoch, position); a resumed run skips whole shards by
their counts and the rest of a shard without decoding. The shards are read in the main process
by threads, two ahead; the loader's workers decode and augment. A member that is not a readable
image is replaced by the next good one of its micro-batch, with a warning, and counted.
"""
import concurrent.futures
import json
import sys
import tarfile
import warnings
from pathlib import Path

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

def read_shard(url, expected):
    """The samples of one shard as dicts (index, image bytes, extension, label or None), exactly
    `expected` of them: a shard that ends early is filled up by repeating its last good sample
    (marked, so the loader counts it as skipped). A shard that cannot be opened raises DataError."""
    samples = []
    try:
        with webdataset().gopen(url) as stream:
            for raw in _samples(stream, url):
                ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
                key = raw["__key__"]
                if ext is None:
                    warnings.warn(f"member {key} of the shard {url} holds no image file; it counts as skipped",
                                  stacklevel=2)
                samples.append({"index": int(key) if key.isdigit() else len(samples), "image": raw.get(ext),
                                "ext": ext, "cls": int(raw["cls"]) if "cls" in raw else None})
    except (OSError, EOFError, ValueError, tarfile.TarError) as err:
        if not samples:
            raise DataError(f"the shard {url} cannot be read ({type(err).__name__}: {err})") from None
        warnings.warn(f"the shard {url} ends early after {len(samples)} of {expected} images "
                      f"({type(err).__name__}); the rest counts as skipped", stacklevel=2)
    if not samples:
        raise DataError(f"the shard {url} holds no images")
    while len(samples) < expected:
        samples.append({**samples[len(samples) % max(1, len(samples))], "image": None})
    return samples[:expected]


class ShardBatchSampler:
    """Micro-batches of (sample, epoch, position) keys for one process, from optimiser step
    `start_step` on; the counterpart of data.StepBatchSampler for shards (see the module's text).

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
        batch = []
        with concurrent.futures.ThreadPoolExecutor(2) as reader:  # reading runs two shards ahead
            ahead = [reader.submit(read_shard, self.shards.urls[s], self.shards.counts[s]) for s, _ in plan[:2]]
            for i, (shard, start) in enumerate(plan):
                samples = ahead.pop(0).result()
                if i + 2 < len(plan):
                    s = plan[i + 2][0]
                    ahead.append(reader.submit(read_shard, self.shards.urls[s], self.shards.counts[s]))
                order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(
                    derive_seed(self.seed, "shard", epoch, shard))).tolist()
                for offset, j in enumerate(order):
                    q = start + offset
                    if first <= q < last:
                        batch.append((samples[j], epoch, q * self.num_processes + self.rank))
                        if len(batch) == self.batch_size:
                            yield batch
                            batch = []


class ShardSource:
    """The source of shards (see the module's text): keys are (sample, epoch, position), the
    sample read by the sampler in the main process, its image bytes included."""
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
        sample = key[0]
        label = sample["cls"] if self.labelled else None
        if label is not None and self.label_map is not None:
            label = self.label_map[label]
        name = f"member {sample['index']:09d} of the shards of {self.where}"
        # a member without an image, or the filling of a shard that ended early: unreadable
        return Record(sample["index"], label, name, data=sample["image"] or b"")

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
        """The records of the first shard."""
        samples = read_shard(self.shards.urls[0], self.shards.counts[0])
        return (self.record((sample, 0, 0)) for sample in samples)

    def evaluation_batches(self, rank, world, batch_size):
        """This process's share for an exact evaluation: its shards (every world-th, in index
        order), all of their images, in batches of `batch_size` (the last one smaller)."""
        return EvaluationBatches(self.shards, rank, world, batch_size)


class EvaluationBatches:
    """Batches of (sample, 0, position) keys over a process's shards, in order, nothing dropped."""

    def __init__(self, shards, rank, world, batch_size):
        self.shards, self.mine, self.batch_size = shards, list(range(len(shards.urls)))[rank::world], batch_size

    def __iter__(self):
        batch = []
        for shard in self.mine:
            for sample in read_shard(self.shards.urls[shard], self.shards.counts[shard]):
                batch.append((sample, 0, 0))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def __len__(self):
        return -(-sum(self.shards.counts[s] for s in self.mine) // self.batch_size)
