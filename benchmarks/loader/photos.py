"""The photographs the loader benchmark reads: ImageNet-sized JPEGs and 12-megapixel camera JPEGs.

    python benchmarks/loader/photos.py OUT_DIR [--photos DIR ...]

Writes, from real photographs (scikit-image's colour photographs, plus every image in the
--photos folders), seeded, so the same command writes the same files:
- OUT_DIR/imagenet: `--imagenet` JPEGs of 500x375 at quality 95 (about 90 KB each, like
  ImageNet's training images): a random 4:3 region of a photograph, resized, with mild sensor
  noise (sigma 5 levels; without it the upsampled photographs compress far smaller than real ones);
- OUT_DIR/camera: `--camera` JPEGs of 4000x3000 at quality 92 (about 2.4 MB each, like a
  12-megapixel phone or camera picture), made the same way with sigma 4.
The decoding cost of a JPEG follows its pixel count and its compressed size, which these match;
their content is real photographs, upsampled (which real camera pictures are not).
"""
import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fcmae.data import find_images, sample_photographs  # noqa: E402

KINDS = {"imagenet": ((500, 375), 95, 5.0), "camera": ((4000, 3000), 92, 4.0)}


def sources(folders):
    files = [f for f in sample_photographs() if Image.open(f).mode == "RGB"]
    return files + [f for folder in folders or [] for f in find_images(folder)]


def write(job):
    path, source, (width, height), quality, sigma, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(source) as img:
        img = img.convert("RGB")
    w, h = img.size
    cw = int(w * rng.uniform(0.6, 1.0))
    ch = min(h, cw * height // width)
    cw = ch * width // height
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = img.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
    return os.path.getsize(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--photos", nargs="*", help="more folders of photographs to draw from")
    p.add_argument("--imagenet", type=int, default=400, help="how many ImageNet-sized JPEGs")
    p.add_argument("--camera", type=int, default=40, help="how many 12-megapixel JPEGs")
    args = p.parse_args(argv)
    files = sources(args.photos)
    for kind, count in (("imagenet", args.imagenet), ("camera", args.camera)):
        size, quality, sigma = KINDS[kind]
        folder = Path(args.out) / kind
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(folder / f"{kind}_{i:05d}.jpg", files[i % len(files)], size, quality, sigma, i) for i in range(count)]
        with Pool(os.cpu_count()) as pool:
            sizes = pool.map(write, jobs)
        print(f"{folder}: {count} JPEGs of {size[0]}x{size[1]}, {np.mean(sizes) / 1e3:.0f} KB on average, "
              f"from {len(files)} photographs")


if __name__ == "__main__":
    main()
