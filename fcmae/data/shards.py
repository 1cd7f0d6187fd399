"""Webdataset tar shards: writing them from a folder, and reading them in an exact, resumable order.

Writing (`write_shards`, or `python -m fcmae.shards`): each image goes into a shard as stored
(no re-encoding), with its class index (`cls`) when the folder has class sub-folders; the images
are shuffled (seeded) first, so that every shard holds a mix of classes. `index.json` beside the
shards lists each shard with its image count and the class names. Each shard is written under a
temporary name and renamed when complete, so an interrupted run continues where it stopped.

Reading: --data_path may name a folder of shards with its index, an index file (a path, URL or
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
import io
import json
import os
import random
import sys
import tarfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data.folders import IMG_EXTENSIONS, class_folders, find_images
from fcmae.data.sampling import DataError, derive_seed, seeded

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


# ----- writing ---------------------------------------------------------------------------------------

def source_files(src):
    """(files, labels or None, class names or None) of a folder: labelled when it holds class folders only."""
    root = Path(src)
    has_loose_images = any(p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS) for p in root.iterdir())
    if not has_loose_images and any(p.is_dir() for p in root.iterdir()):
        try:
            files, labels, classes = class_folders(root, flag="SRC")
            return files, labels, classes
        except ConfigError:
            pass
    return find_images(root), None, None


def write_shards(src, out, per_shard=1000, shuffle=True, seed=0, prefix="shard", say=print):
    """Write the images of folder `src` as shards in `out` with their index; returns the index.
    A second call with the same arguments continues an interrupted one."""
    if not Path(src).is_dir():
        raise ConfigError(f"SRC {src} is not a folder of images")
    files, labels, classes = source_files(src)
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"src": str(Path(src).resolve()), "images": len(files), "per_shard": per_shard, "shuffle": shuffle,
            "seed": seed, "prefix": prefix}
    plan_file = out / ".plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise ConfigError(f"{out} holds shards written with other settings ({plan_file}); write to another folder "
                          "or delete it")
    plan_file.write_text(json.dumps(plan))
    chunks = [order[i:i + per_shard] for i in range(0, len(order), per_shard)]
    digits = max(6, len(str(len(chunks) - 1)))
    entries, tic = [], time.perf_counter()
    for number, chunk in enumerate(chunks):
        name = f"{prefix}-{number:0{digits}d}.tar"
        entries.append({"url": name, "images": len(chunk)})
        if (out / name).is_file():
            continue  # written by an earlier, interrupted call
        partial = out / f".{name}.partial"
        with webdataset().TarWriter(str(partial)) as sink:
            for i in chunk:
                path = Path(files[i])
                sample = {"__key__": f"{i:09d}", path.suffix.lower().lstrip("."): path.read_bytes()}
                if labels is not None:
                    sample["cls"] = str(labels[i]).encode()
                sink.write(sample)
        os.replace(partial, out / name)
        done = sum(e["images"] for e in entries)
        say(f"{name}: shard {number + 1} of {len(chunks)}, {done} of {len(files)} images, "
            f"{done / (time.perf_counter() - tic):.0f} images/s")
    index = {"format": "fcmae-shards", "images": len(files), "shards": entries, "classes": classes}
    partial = out / f".{INDEX}.partial"
    partial.write_text(json.dumps(index, indent=1))
    os.replace(partial, out / INDEX)
    return index


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
        try:
            counts = [_count(u) for u in urls]
        except (OSError, ValueError) as err:
            raise ConfigError(f"a shard of {where} cannot be read ({type(err).__name__}: {err})") from None
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


class ShardImages(torch.utils.data.Dataset):
    """Shard samples as augmented tensors, like data.ImageFiles (labelled: like LabelledImages).

    Items come in micro-batches (`__getitems__`), so that a member that is not a readable image
    can be replaced by the next good one of its batch, deterministically; each item returns how
    many it replaced. `label_map` renames class indices (evaluation shards to training classes)."""

    def __init__(self, shards, transform, in_chans=3, seed=0, labelled=False, label_map=None):
        if labelled and shards.classes is None:
            raise ConfigError(f"the shards of {shards.where} carry no class labels (written from a folder without "
                              "class sub-folders)")
        self.shards, self.transform, self.seed, self.labelled = shards, transform, seed, labelled
        self.mode = "RGB" if in_chans == 3 else "L"
        self.label_map = label_map

    def __len__(self):
        return self.shards.images

    def batch_sampler(self, batch_size, update_freq, num_processes, rank, seed):
        if len(self.shards.urls) < num_processes:
            raise ConfigError(f"{self.shards.where} has {len(self.shards.urls)} shard(s) for {num_processes} "
                              "processes, and every process reads whole shards; write smaller shards (--per_shard)")
        return ShardBatchSampler(self.shards, batch_size, update_freq, num_processes, rank, seed)

    def relabel(self, mapping):
        """Rename the class indices: label i becomes mapping[i] (evaluation shards to training classes)."""
        self.label_map = list(mapping)

    def decode(self, sample):
        if sample["image"] is None:
            return None
        try:
            with Image.open(io.BytesIO(sample["image"])) as img:
                return img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping member {sample['index']:09d} of the shards, not a readable image: {err}",
                          stacklevel=2)
            return None

    def __getitems__(self, keys):
        images = [self.decode(sample) for sample, _, _ in keys]
        good = [i for i, img in enumerate(images) if img is not None]
        if not good:
            raise DataError(f"no member of a batch of {len(keys)} from the shards of {self.shards.where} is a "
                            "readable image")
        items = []
        for i, (sample, epoch, _) in enumerate(keys):
            stand_in = next(j for j in good if j >= i) if any(j >= i for j in good) else good[0]
            used = keys[stand_in][0]
            with seeded(derive_seed(self.seed, "sample", epoch, used["index"])):
                tensor = self.transform(images[stand_in])
            skipped = int(stand_in != i)
            if self.labelled:
                label = used["cls"] if self.label_map is None else self.label_map[used["cls"]]
                items.append((tensor, label, skipped))
            else:
                items.append((tensor, skipped))
        return items

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def pictures(self, count):
        """The first `count` readable images of the first shard, as PIL images."""
        samples = read_shard(self.shards.urls[0], self.shards.counts[0])
        images = [img for img in map(self.decode, samples[:count * 2]) if img is not None]
        return images[:count]

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
