"""The loader's CPU time in the main process (the one that launches the GPU's work) per image
delivered, for each kind of source, in two source trees side by side.

    python benchmarks/loader/main_process.py OUT_DIR --trees before=/path/to/old/checkout after=.

Writes once, under OUT_DIR/data: `--images` ImageNet-sized JPEGs made as benchmarks/loader/photos.py
makes them (500x375, quality 95, about 90 KB), the same files as shards (`python -m fcmae.shards`,
`--per_shard` images each, in the folder's order) and as Parquet files in the Hub's layout
(benchmarks/loader/sources.py). Then, in `--rounds` rounds, each in another (rotated) order, it
runs one child process per (tree, source) with PYTHONPATH set to that tree; the child builds
pretrain.py's loader (WithMasks over Images: RandomResizedCrop 224, flip, uint8, masks; a
DataLoader with `--workers` persistent workers and the collate, as fcmae.training.engine builds
it), reads `--epochs` epochs of batches of `--batch_size`, and times everything after the first
batch: time.process_time() of the main process (all its threads: the DataLoader's, DALI's), and
the workers' CPU time (psutil), per image delivered. The sources: the folder, the shards, the
Parquet folder (decoder `scaled`), and the folder with `--decoder dali` on the CPU, whose decoding
(Images.prepare's part, and the decoding ahead where the tree has it) runs in the main process by
design. Each row is the median of its rounds. With `--pair N`, one more child per tree then measures
the folder and the shards in turn, N times each, in one process: a comparison of the two that
machine drift between rounds (other work on the machine) touches less. Writes
OUT_DIR/main_process.md and .json (or into `--results`).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SOURCES = ("folder", "shards", "parquet", "dali")


# ----- the child: one measurement, with the fcmae of PYTHONPATH -------------------------------------

def measure(data, decoder, workers, epochs, batch_size):
    import psutil
    import torch

    import fcmae
    from fcmae.data import PretrainTransform, WithMasks, collate, get_decoder, open_images

    images = open_images(data, PretrainTransform(224), decoder=get_decoder(decoder))
    dataset = WithMasks(images, num_patches=(224 // 32) ** 2, mask_ratio=0.6, seed=0)
    sampler = dataset.batch_sampler(batch_size, 1, 1, 0, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)
    me = psutil.Process()

    def workers_cpu():
        return sum(sum(child.cpu_times()[:2]) for child in me.children())

    delivered, start = 0, None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        if hasattr(dataset, "decode_ahead"):  # as the training loop does, where the tree has it
            batches = dataset.decode_ahead(batches, torch.device("cpu"))
        for batch in batches:
            if not isinstance(batch.image, torch.Tensor):  # an on-device decoder decodes here
                images.decoder.decode_batch(batch.image, "cpu")
            if start is None:  # after the first batch: the workers are up
                start = time.process_time(), time.perf_counter(), workers_cpu()
                continue
            delivered += len(batch.label)
    main_s, wall_s, workers_s = (time.process_time() - start[0], time.perf_counter() - start[1],
                                 workers_cpu() - start[2])
    return {"fcmae": os.path.dirname(fcmae.__file__), "images": delivered,
            "main_ms_per_image": 1e3 * main_s / delivered, "workers_ms_per_image": 1e3 * workers_s / delivered,
            "images_per_s": delivered / wall_s}


def child(args):
    if args.pair:  # folder and shards in turn, in this one process: the runs of a pair see the same machine
        results = {"folder": [], "shards": []}
        for k in range(args.pair):
            for name in ("folder", "shards") if k % 2 == 0 else ("shards", "folder"):
                data = args.data if name == "folder" else args.shards
                results[name].append(measure(data, "scaled", args.workers, args.epochs, args.batch_size))
        Path(args.child).write_text(json.dumps(results))
        return
    result = measure(args.data, args.decoder, args.workers, args.epochs, args.batch_size)
    Path(args.child).write_text(json.dumps(result))


# ----- the parent: data, rounds, table --------------------------------------------------------------

def write_data(out, count, per_shard):
    """The JPEGs, their shards and their Parquet files under `out` (each written once)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's fcmae writes the data
    from photos import KINDS, sources, write  # noqa: E402  (benchmarks/loader/)
    from sources import write_hugging_face  # noqa: E402

    from fcmae.data import open_source, write_shards
    folder = out / "imagenet"
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        size, quality, sigma = KINDS["imagenet"]
        photographs = sources(None)
        for i in range(count):
            write((folder / f"imagenet_{i:05d}.jpg", photographs[i % len(photographs)], size, quality, sigma, i))
    if not (out / "shards" / "index.json").is_file():
        write_shards(folder, out / "shards", per_shard=per_shard, shuffle=False, say=lambda _: None)
    if not (out / "hf" / "disk").is_dir():
        write_hugging_face(folder, out / "hf", per_file=100)
    open_source(out / "hf" / "parquet")  # converts the Parquet into the datasets cache, once
    return {"folder": (folder, "scaled"), "shards": (out / "shards", "scaled"),
            "parquet": (out / "hf" / "parquet", "scaled"), "dali": (folder, "dali")}


def run_child(tree, data, decoder, args, out, *extra):
    result_file = out / "child.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_file), "--data", str(data),
               "--decoder", decoder, "--workers", str(args.workers), "--epochs", str(args.epochs),
               "--batch_size", str(args.batch_size), *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
    result = json.loads(result_file.read_text())
    for one in [result] if "fcmae" in result else [r for v in result.values() for r in v]:
        if not Path(one["fcmae"]).resolve().is_relative_to(Path(tree).resolve()):
            raise RuntimeError(f"the child imported fcmae from {one['fcmae']}, not from {tree}")
    return result


def paired_lines(paired, args):
    """The folder against the shards, measured in turn in one process per tree."""
    lines = ["", f"## Folder and shards in turn, in one process per tree ({args.pair} runs of each, alternating)", "",
             "| tree | main ms/image, folder | main ms/image, shards | shards / folder, median of the pairs |",
             "|---|---|---|---|"]
    for name, result in paired.items():
        folder, shards = ([r["main_ms_per_image"] for r in result[s]] for s in ("folder", "shards"))
        ratios = [b / a for a, b in zip(folder, shards)]
        lines.append(f"| {name} | {statistics.median(folder):.3f} ({min(folder):.3f}-{max(folder):.3f}) | "
                     f"{statistics.median(shards):.3f} ({min(shards):.3f}-{max(shards):.3f}) | "
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return lines


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def table(rows, trees, args, machine, sources):
    names = list(trees)
    lines = ["# The loader's CPU time in the main process, per image delivered", "",
             f"{machine}; {args.images} ImageNet-sized JPEGs (500x375, about 90 KB); {args.workers} loader workers, "
             f"batch {args.batch_size}, {args.epochs} epochs after the first batch, RandomResizedCrop 224 + flip + "
             f"masks (pretrain.py's loader); median of {args.rounds} rounds in rotated order (range in brackets). "
             f"Shards: {args.per_shard} images each. dali: DALI's CPU pipeline, which decodes in the main process. "
             f"Trees: " + ", ".join(f"{name} = {path}" for name, path in trees.items()), "",
             "| source | " + " | ".join(f"main ms/image, {n}" for n in names) + " | "
             + " | ".join(f"workers ms/image, {n}" for n in names) + " | "
             + " | ".join(f"images/s, {n}" for n in names) + " |",
             "|---" * (1 + 3 * len(names)) + "|"]
    for source in sources:
        cells = []
        for field, digits in (("main_ms_per_image", 3), ("workers_ms_per_image", 2), ("images_per_s", 1)):
            for name in names:
                values = [r[field] for r in rows[name][source]]
                cells.append(f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
                             f"{max(values):.{digits}f})")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    if {"folder", "shards"} <= set(sources):
        lines.append("")
        for name in names:
            folder, shards = (statistics.median(r["main_ms_per_image"] for r in rows[name][s])
                              for s in ("folder", "shards"))
            lines.append(f"{name}: the main process spends {shards:.3f} ms per image from shards, {folder:.3f} from "
                         f"the folder ({shards / folder:.2f}x).")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--trees", nargs="+", default=None, help="NAME=PATH of each source tree (default: this one)")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--per_shard", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pair", type=int, default=0, help="then, in one process per tree, measure the folder and "
                   "the shards in turn, this many times each (0: not)")
    p.add_argument("--results", help="where main_process.md/.json go (default OUT_DIR)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a measurement's result file (the child's mode)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--decoder", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.out is None:
        p.error("OUT_DIR is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parents[2]
    trees = dict(t.split("=", 1) for t in args.trees) if args.trees else {"this": str(here)}
    trees = {name: str(Path(path).resolve()) for name, path in trees.items()}
    os.environ["HF_DATASETS_CACHE"] = str(out / "data" / "cache")  # for the children too
    sources = write_data(out / "data", args.images, args.per_shard)
    runs = [(name, source) for source in args.sources for name in trees]
    rows = {name: {source: [] for source in SOURCES} for name in trees}
    for r in range(args.rounds):
        for name, source in runs[r % len(runs):] + runs[:r % len(runs)]:
            data, decoder = sources[source]
            result = run_child(trees[name], data, decoder, args, out)
            rows[name][source].append(result)
            print(f"round {r + 1}: {source:<8} {name:<8} main {result['main_ms_per_image']:.3f} ms/image, workers "
                  f"{result['workers_ms_per_image']:.2f} ms/image, {result['images_per_s']:.1f} images/s", flush=True)
    paired = {}
    for name in trees if args.pair else ():
        paired[name] = run_child(trees[name], sources["folder"][0], "scaled", args, out, "--pair", args.pair,
                                 "--shards", sources["shards"][0])
        print(f"paired, {name}: done", flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = table(rows, trees, args, machine, [s for s in SOURCES if s in args.sources])
    if paired:
        lines += paired_lines(paired, args)
    results = Path(args.results) if args.results else out
    results.mkdir(parents=True, exist_ok=True)
    (results / "main_process.md").write_text("\n".join(lines) + "\n")
    (results / "main_process.json").write_text(json.dumps({"machine": machine, "trees": trees, "args": vars(args),
                                                           "rows": rows, "paired": paired}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
