"""The input pipeline before and after, side by side: images/s per loader worker on the same files.

    python benchmarks/loader/photos.py /tmp/photos --photos MORE_PHOTOS    # the data sets
    python -m fcmae.shrink /tmp/photos/camera /tmp/photos/camera_512 --max_size 512
    python benchmarks/loader/run.py /tmp/photos OUT_DIR --baseline 628764e

For every data set (subfolders of DATA: imagenet, camera, camera_512 by default) and round, it
runs `python -m fcmae.bench --data SET --num_workers W` of the baseline commit (checked out into
a temporary git worktree; its pipeline decodes everything and ships float32) and of this
checkout once per decoder, in turn, each round in another order, so that machine drift hits all
alike; each row is the median of its rounds. Writes OUT_DIR/loader.md and OUT_DIR/loader.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fcmae.data import find_images  # noqa: E402
# timed batches per data set: 5-15 s of the baseline's time each on one worker of a 2-core machine
BATCHES = {"imagenet": 60, "camera": 4, "camera_512": 60}


def bench(tree, data, workers, batches, batch_size, decoder=None):
    """images/s of `python -m fcmae.bench --data` run from source tree `tree`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "fcmae.bench", "--data", str(data), "--num_workers", str(workers),
                   "--batches", str(batches), "--batch_size", str(batch_size), "--device", "cpu", "--json", out.name]
        if decoder:
            command += ["--decoder", decoder]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
        return json.loads(Path(out.name).read_text())[0]["images_per_s"]


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a folder holding the data sets (see benchmarks/loader/photos.py)")
    p.add_argument("out")
    p.add_argument("--sets", nargs="+", default=list(BATCHES))
    p.add_argument("--baseline", default="628764e", help="the commit to compare with (default: the last one before reduced-scale decoding)")
    p.add_argument("--decoders", nargs="+", default=["scaled", "full"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args(argv)
    baseline = Path(tempfile.mkdtemp()) / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        rows = []
        for name in args.sets:
            data = Path(args.data) / name
            runs = {"baseline": []} | {d: [] for d in args.decoders}
            rows_of_a_round = list(runs)
            for k in range(args.rounds):  # each round in another order: no row always runs first or last
                for row in rows_of_a_round[k % len(runs):] + rows_of_a_round[:k % len(runs)]:
                    tree, decoder = (baseline, None) if row == "baseline" else (ROOT, row)
                    runs[row].append(bench(tree, data, args.workers, BATCHES.get(name, 10), args.batch_size, decoder))
            files = find_images(data)
            rows.append({"set": name, "images": len(files),
                         "mean_kb": sum(os.path.getsize(f) for f in files) / len(files) / 1e3,
                         **{k: statistics.median(v) for k, v in runs.items()}, "rounds": runs})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"Images/s with {args.workers} loader worker(s), RandomResizedCrop 224 + flip, batch {args.batch_size}, "
             f"median of {args.rounds} rounds; baseline = commit {args.baseline}; {machine}.", "",
             "| data | mean file | baseline | " + " | ".join(args.decoders) + " | " +
             " | ".join(f"{d} / baseline" for d in args.decoders) + " |",
             "|---" * (3 + 2 * len(args.decoders)) + "|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['mean_kb']:.0f} KB | {r['baseline']:.1f} | "
                     + " | ".join(f"{r[d]:.1f}" for d in args.decoders) + " | "
                     + " | ".join(f"{r[d] / r['baseline']:.2f}x" for d in args.decoders) + " |")
    by_set = {r["set"]: r for r in rows}
    if "camera" in by_set and "camera_512" in by_set:
        ratio = by_set["camera_512"][args.decoders[0]] / by_set["camera"]["baseline"]
        lines += ["", f"camera_512 ({args.decoders[0]}) against camera (baseline): {ratio:.1f}x"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.md").write_text("\n".join(lines) + "\n")
    (out / "loader.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
