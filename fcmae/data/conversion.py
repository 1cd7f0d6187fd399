"""Writing data: a folder of images as webdataset tar shards with their index, or as a shrunk copy.

`write_shards` (or `python -m fcmae.shards`): each image goes into a shard as stored (no
re-encoding unless asked to shrink, below), with its class index (`cls`) when the folder has
class sub-folders; the images are shuffled (seeded) first, so that every shard holds a mix of
classes. `index.json` beside the shards lists each shard with its image count and the class
names. Each shard is written under a temporary name and renamed when complete, so an interrupted
run continues where it stopped.

Shrinking, once, on write (`max_size`; `write_shards` and `shrink_folder`, or `python -m
fcmae.shrink` for runs that stay with folders): decoding a 12-megapixel camera JPEG costs tens of
milliseconds in every epoch, even at reduced DCT scale, so images whose longer side exceeds
`max_size` are re-encoded once at that size (fcmae.data.shrinking); the others are kept byte for byte.
Re-encoding runs in `workers` processes; results are used in the images' order, so the output
does not depend on the number of workers.
"""
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

from fcmae.config import ConfigError
from fcmae.data.folders import IMG_EXTENSIONS, class_folders, find_images
from fcmae.data.tar_shards import INDEX, webdataset
from fcmae.data.shrinking import (
    DEFAULT_QUALITY, KEPT, REENCODED, UNREADABLE, Shrunk, check_shrink_settings, shrink_file,
)

def cpu_count():
    """The CPUs this process may use (its affinity mask under a scheduler or in a container), else
    the machine's count: the default number of re-encoding processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def warn_stderr(message):
    """How the writers warn by default: one line on stderr, apart from the progress on stdout."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


# ----- in parallel, in order -----------------------------------------------------------------------

def _ignore_interrupt():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process alone, which ends the pool


class Workers:
    """`map(function, items)` in the items' order, in `n` processes (`n` = 1: in this one). The pool
    starts at the first call, so a run with nothing left to do starts none."""

    def __init__(self, n):
        self.n, self.pool = n, None

    def map(self, function, items):
        if self.n <= 1:
            return map(function, items)
        if self.pool is None:
            self.pool = multiprocessing.Pool(self.n, initializer=_ignore_interrupt)
        return self.pool.imap(function, items, chunksize=max(1, min(16, len(items) // (8 * self.n))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ----- folders in and out --------------------------------------------------------------------------

def _source_folder(src):
    src = Path(src)
    if not src.exists():
        raise ConfigError(f"SRC {src} does not exist; name a folder of images")
    if not src.is_dir():
        raise ConfigError(f"SRC {src} is a file, not a folder of images")
    return src


def _output_folder(out, what):
    """`out` created (parents too); a file there, or a folder that cannot be made, is one sentence."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file; name a folder (new, or written by an earlier run) for {what}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"OUT {out} cannot be created ({err.strerror or err})") from None
    return out


def _check_plan(plan_file, plan, out, what):
    """Refuse `out` when an earlier run wrote it with other settings; else record this run's."""
    try:
        earlier = json.loads(plan_file.read_text()) if plan_file.is_file() else plan
    except ValueError:  # torn by an interrupted run: unknown settings
        earlier = None
    if earlier != plan:
        raise ConfigError(f"{out} holds {what} written with other settings ({plan_file}); write to another folder "
                          "or delete it")
    plan_file.write_text(json.dumps(plan))


def write_shards(src, out, per_shard=1000, shuffle=True, seed=0, prefix="shard", say=print, max_size=None,
                 quality=DEFAULT_QUALITY, workers=1, warn=warn_stderr):
    """Write the images of folder `src` as shards in `out` with their index; returns the index.
    A second call with the same arguments continues an interrupted one.

    With `max_size`, images larger than that are re-encoded (shrink_image) in `workers` processes;
    the settings go into the resume plan and the index (with how many images were re-encoded and
    how many could not be read: those are stored as they were, with a warning). How many of a
    shard's images were re-encoded is appended to `.stats.jsonl` before the shard is renamed, so
    the index counts the shards an interrupted run wrote too; a shard counts as written when both
    are there. Without `max_size` everything is as it was: images stored as they are."""
    src = _source_folder(src)
    shrinking = max_size is not None
    check_shrink_settings(max_size, quality, workers)
    files, labels, classes = source_files(src)
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    out = _output_folder(out, "the shards")
    plan = {"src": str(src.resolve()), "images": len(files), "per_shard": per_shard, "shuffle": shuffle,
            "seed": seed, "prefix": prefix}
    if shrinking:
        plan.update(max_size=max_size, quality=quality)
    _check_plan(out / ".plan.json", plan, out, "shards")
    stats_file = out / ".stats.jsonl"
    stats = _read_stats(stats_file) if shrinking else {}
    shrink = partial(shrink_file, max_size=max_size, quality=quality)
    chunks = [order[i:i + per_shard] for i in range(0, len(order), per_shard)]
    digits = max(6, len(str(len(chunks) - 1)))
    entries, tic = [], time.perf_counter()
    with Workers(workers if shrinking else 1) as pool:
        for number, chunk in enumerate(chunks):
            name = f"{prefix}-{number:0{digits}d}.tar"
            entries.append({"url": name, "images": len(chunk)})
            if (out / name).is_file() and (not shrinking or name in stats):
                continue  # written by an earlier, interrupted call
            partial_file = out / f".{name}.partial"
            counts = Counter()
            with webdataset().TarWriter(str(partial_file)) as sink:
                paths = [files[i] for i in chunk]
                images = pool.map(shrink, paths) if shrinking else (Shrunk(Path(f).read_bytes(), KEPT) for f in paths)
                for i, image in zip(chunk, images):
                    path = Path(files[i])
                    sample = {"__key__": f"{i:09d}", path.suffix.lower().lstrip("."): image.data}
                    if labels is not None:
                        sample["cls"] = str(labels[i]).encode()
                    sink.write(sample)
                    counts[image.outcome] += 1
                    if image.outcome == UNREADABLE:
                        warn(f"{path} is not a readable image ({image.reason}); stored as it is")
            if shrinking:
                stats[name] = {"url": name, "reencoded": counts[REENCODED], "unreadable": counts[UNREADABLE]}
                with open(stats_file, "a") as f:
                    f.write(json.dumps(stats[name]) + "\n")
            os.replace(partial_file, out / name)
            done = sum(e["images"] for e in entries)
            shrunk = f", {sum(s['reencoded'] for s in stats.values())} re-encoded" if shrinking else ""
            say(f"{name}: shard {number + 1} of {len(chunks)}, {done} of {len(files)} images, "
                f"{done / (time.perf_counter() - tic):.0f} images/s{shrunk}")
    index = {"format": "fcmae-shards", "images": len(files), "shards": entries, "classes": classes}
    if shrinking:
        written = [stats[e["url"]] for e in entries]
        index.update(max_size=max_size, quality=quality, reencoded=sum(s["reencoded"] for s in written),
                     unreadable=sum(s["unreadable"] for s in written))
    partial_file = out / f".{INDEX}.partial"
    partial_file.write_text(json.dumps(index, indent=1))
    os.replace(partial_file, out / INDEX)
    return index


def _read_stats(path):
    """{shard name: its counts} from `.stats.jsonl`; a line torn by an interrupted run is left out, and
    the file made to end with a newline, so that the next line appended starts on its own."""
    stats = {}
    if not path.is_file():
        return stats
    text = path.read_text()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            stats[entry["url"]] = entry
        except (ValueError, KeyError, TypeError):
            pass
    if text and not text.endswith("\n"):
        with open(path, "a") as f:
            f.write("\n")
    return stats


# ----- a shrunk copy of a folder -------------------------------------------------------------------

def image_tree(src):
    """The image files under `src` (any nesting, links followed), as sorted paths relative to it."""
    files = []
    for folder, subdirs, names in os.walk(src, followlinks=True):
        subdirs.sort()
        files += [Path(folder, n).relative_to(src) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return files


def _copy_shrunk(relative, src, out, max_size, quality):
    """Write one image of the copy: shrunk (or as it is) under a temporary name, renamed when complete.
    Returns (outcome, reason); runs in a worker process."""
    image = shrink_file(src / relative, max_size, quality)
    target = out / relative
    temporary = target.with_name(f".{target.name}.partial")
    try:
        temporary.write_bytes(image.data)
        os.replace(temporary, target)
    except OSError as err:
        raise ConfigError(f"cannot write {target} ({err.strerror or err}); fix that and run the same command "
                          "again to continue") from None
    return image.outcome, image.reason


def shrink_folder(src, out, max_size, quality=DEFAULT_QUALITY, workers=1, say=print, warn=warn_stderr, every=10.0):
    """Write a copy of folder `src` in `out` for runs that read folders: the same tree of image files
    (class folders and any nesting kept), those larger than `max_size` re-encoded (shrink_image) in
    `workers` processes, the others copied byte for byte. Other files (notes, label lists) are not
    copied: the loaders read images only. Each image is written under a temporary name and renamed
    when complete, and those already in `out` are skipped, so a second call continues an
    interrupted one; one with other settings is refused (`out/.plan.json`), and so is a folder not
    empty and not written by this function. A line of progress every `every` seconds.

    Returns a summary: images, reencoded, copied, unreadable (copied as they are, with a warning),
    existing (already there from an earlier run, not looked at), bytes_before, bytes_after (of every
    image of the copy)."""
    check_shrink_settings(max_size, quality, workers)
    src = _source_folder(src)
    if Path(out).resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"OUT {out} lies inside SRC {src}, so a second run would copy the copy; write it elsewhere")
    out = _output_folder(out, "the copy")
    plan_file = out / ".plan.json"
    if not plan_file.is_file() and any(out.iterdir()):
        raise ConfigError(f"OUT {out} holds files not written by python -m fcmae.shrink; write to a new folder")
    plan = {"format": "fcmae-shrink", "src": str(src.resolve()), "max_size": max_size, "quality": quality}
    _check_plan(plan_file, plan, out, "a copy")
    files = image_tree(src)
    if not files:
        raise ConfigError(f"SRC {src} holds no images (looked for {', '.join(IMG_EXTENSIONS[:6])}, ... in it and "
                          "its sub-folders)")
    todo = [relative for relative in files if not (out / relative).is_file()]
    for folder in sorted({(out / relative).parent for relative in todo}):
        folder.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    tic = last = time.perf_counter()
    copy = partial(_copy_shrunk, src=src, out=out, max_size=max_size, quality=quality)
    with Workers(workers) as pool:
        for done, (relative, (outcome, reason)) in enumerate(zip(todo, pool.map(copy, todo)), 1):
            counts[outcome] += 1
            if outcome == UNREADABLE:
                warn(f"{src / relative} is not a readable image ({reason}); copied as it is")
            now = time.perf_counter()
            if now - last >= every or done == len(todo):
                last = now
                rate = done / max(now - tic, 1e-9)
                say(f"{len(files) - len(todo) + done} of {len(files)} images, {rate:.1f} images/s, "
                    f"{counts[REENCODED]} re-encoded")
    return {"images": len(files), "reencoded": counts[REENCODED], "copied": counts[KEPT],
            "unreadable": counts[UNREADABLE], "existing": len(files) - len(todo),
            "bytes_before": sum((src / f).stat().st_size for f in files),
            "bytes_after": sum((out / f).stat().st_size for f in files)}
