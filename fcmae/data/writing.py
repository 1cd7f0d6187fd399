"""Writing data: a folder of images as webdataset tar shards with their index.

`write_shards` (or `python -m fcmae.shards`): each image goes into a shard as stored (no
re-encoding), with its class index (`cls`) when the folder has class sub-folders; the images are
shuffled (seeded) first, so that every shard holds a mix of classes. `index.json` beside the
shards lists each shard with its image count and the class names. Each shard is written under a
temporary name and renamed when complete, so an interrupted run continues where it stopped.
"""
import json
import os
import random
import time
from pathlib import Path

from fcmae.config import ConfigError
from fcmae.data.folders import IMG_EXTENSIONS, class_folders, find_images
from fcmae.data.shards import INDEX, webdataset


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
