"""The same images from a folder of files and from a Hugging Face dataset (Parquet in the Hub's
layout, and a save_to_disk folder), side by side.

    python benchmarks/loader/photos.py /tmp/photos        # the data sets
    python benchmarks/loader/sources.py /tmp/photos/imagenet OUT_DIR

Writes the folder's images, in its order and as stored (no re-encoding), as Parquet files of
`--per_file` rows (OUT_DIR/data/parquet/data/train-*.parquet) and as a save_to_disk folder, then
runs `python -m fcmae.bench --data SOURCE --num_workers W` of this checkout on each in turn, each
round in another order; each row is the median of its rounds. The first read of
the Parquet folder converts it into the datasets cache (OUT_DIR/data/cache, timed apart); the
rounds read the Arrow copy, as every run after the first does. Writes OUT_DIR/sources.md and
OUT_DIR/sources.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from run import bench, cpu_name  # noqa: E402  (benchmarks/loader/run.py)

from fcmae.data import find_images  # noqa: E402


def write_hugging_face(folder, out, per_file):
    """The folder's images as a Parquet folder (Hub layout) and a save_to_disk folder."""
    import datasets
    files = find_images(folder)
    features = datasets.Features({"image": datasets.Image()})
    table = datasets.Dataset.from_dict({"image": [{"bytes": Path(f).read_bytes(), "path": None} for f in files]},
                                       features=features)
    parts = -(-len(files) // per_file)
    (out / "parquet" / "data").mkdir(parents=True, exist_ok=True)
    for i in range(parts):
        rows = range(i * per_file, min(len(files), (i + 1) * per_file))
        table.select(rows).to_parquet(out / "parquet" / "data" / f"train-{i:05d}-of-{parts:05d}.parquet")
    table.save_to_disk(out / "disk")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a folder of images (e.g. the imagenet set of benchmarks/loader/photos.py)")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--per_file", type=int, default=100, help="rows per Parquet file")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    os.environ["HF_DATASETS_CACHE"] = str(data / "cache")  # for the bench processes too
    if not (data / "disk").is_dir():
        write_hugging_face(args.folder, data, args.per_file)
    sources = {"folder": args.folder, "parquet": data / "parquet", "save_to_disk": data / "disk"}
    start = time.perf_counter()
    bench(ROOT, sources["parquet"], 0, 1, args.batch_size)  # converts the Parquet into the cache once
    conversion_s = time.perf_counter() - start
    rates = {name: [] for name in sources}
    names = list(sources)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rate = bench(ROOT, sources[name], args.workers, args.batches, args.batch_size)
            rates[name].append(rate)
            print(f"round {r + 1}: {name} {rate:.1f} images/s", flush=True)
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "images": len(find_images(args.folder)), "workers": args.workers, "batch_size": args.batch_size,
              "batches": args.batches, "rounds": args.rounds, "first_read_with_conversion_s": conversion_s,
              "images_per_s": {name: statistics.median(v) for name, v in rates.items()}, "all": rates}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The same {result['images']} images from each source ({args.folder})", "",
             f"{result['machine']}; {args.workers} worker(s), batch {args.batch_size}, {args.batches} batches, "
             f"median of {args.rounds} rounds in rotated order; `python -m fcmae.bench --data SOURCE` "
             "(RandomResizedCrop 224, flip, uint8; decoder scaled)", "",
             "| source | images/s | vs folder |", "|---|---|---|"]
    folder_rate = result["images_per_s"]["folder"]
    for name, rate in result["images_per_s"].items():
        lines.append(f"| {name} | {rate:.1f} | {rate / folder_rate:.2f}x |")
    lines += ["", f"First read of the Parquet folder, with its conversion into the datasets cache and one batch: "
                  f"{conversion_s:.1f} s"]
    (out / "sources.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
