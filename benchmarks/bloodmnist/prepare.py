"""BloodMNIST (MedMNIST v2, CC BY 4.0) as class folders of PNG files, upscaled for 32x32 patches.

    python benchmarks/bloodmnist/prepare.py --npz ../shared/data/bloodmnist.npz --out data/bloodmnist64

Writes <out>/{train,val,test}/<k>_<class>/<split>_<index>.png from the official splits. The
28x28 originals are upscaled with bicubic interpolation to --size pixels (64 by default: a 2x2
grid of 32x32 patches, the smallest grid on which masking leaves something to predict, at a
compute cost that fits a CPU budget). --per_class_limit keeps the first N images of each class
per split (for the CI-sized run).
"""
import argparse
import concurrent.futures
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
           "neutrophil", "platelet")
SPLITS = ("train", "val", "test")


def write_images(jobs, size):
    """Upscale and save (image, path) pairs; run in worker processes."""
    for image, path in jobs:
        Image.fromarray(image).resize((size, size), Image.BICUBIC).save(path)


def prepare(npz, out, size=64, per_class_limit=None, workers=None):
    """Write the class folders (skipped when `out` already holds the same preparation); returns `out`."""
    out = Path(out)
    stamp = {"npz": str(Path(npz).resolve()), "size": size, "per_class_limit": per_class_limit}
    marker = out / "prepared.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    data = np.load(npz)
    counts, jobs = {}, []
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        seen = np.zeros(len(CLASSES), dtype=int)
        for index, (image, label) in enumerate(zip(images, labels)):
            if per_class_limit is not None and seen[label] >= per_class_limit:
                continue
            seen[label] += 1
            folder = out / split / f"{label}_{CLASSES[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((image, folder / f"{split}_{index:05d}.png"))
        counts[split] = int(seen.sum())
    workers = workers or os.cpu_count() or 1
    chunk = -(-len(jobs) // workers)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for done in [pool.submit(write_images, jobs[i:i + chunk], size) for i in range(0, len(jobs), chunk)]:
            done.result()
    marker.write_text(json.dumps(stamp))
    print(f"wrote {counts} images ({size}x{size} PNG) to {out}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", required=True, help="bloodmnist.npz from MedMNIST v2")
    p.add_argument("--out", required=True, help="folder for the class folders")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--per_class_limit", type=int, default=None)
    args = p.parse_args()
    prepare(args.npz, args.out, args.size, args.per_class_limit)


if __name__ == "__main__":
    main()
