"""Multi-band images against RGB on the CPU: the input pipeline's images/s, and a training step's
time and memory, for 13-band uint16 tiles beside 3-channel images of the same size.

    python benchmarks/channels/run.py            # about 10 minutes on the 2-core development machine

1. writes --count synthetic 256x256 tiles to --work: 13-band uint16 TIFFs (planar, as GeoTIFFs
   are), and the same tiles' bands 4, 3, 2 at 8 bits as RGB PNGs and JPEGs (quality 90);
2. `python -m fcmae.bench --data` on each (RandomResizedCrop to 224, flip, to the CPU, normalised)
   with 0 workers (the loader's work in the main process: one core's rate) and 2, in --rounds
   interleaved rounds;
3. `python -m fcmae.bench` steps (zero_grad, forward, backward, AdamW) of convnextv2_atto, sparse
   backend, batch 8 at 224 px, with 3 and with 13 input channels, in the same interleaved rounds;
4. results/results.json: every round, and the medians.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KINDS = {"13-band uint16 TIFF": ("tif", 13), "RGB PNG": ("png", 3), "RGB JPEG": ("jpg", 3)}


def write_tiles(work, count):
    """The tiles of every kind, once (kept for a rerun)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = {kind: work / ext for kind, (ext, _) in KINDS.items()}
    if all(len(list(f.glob("*"))) == count for f in folders.values() if f.is_dir()) and all(
            f.is_dir() for f in folders.values()):
        return folders
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:256, 0:256]
    for i in range(count):
        # smooth fields per band plus noise: texture that compresses as images do
        phase = rng.random(13)[:, None, None] * 6.28
        bands = 0.5 + 0.25 * np.sin(x[None] / (9 + 3 * np.arange(13)[:, None, None]) + phase) * np.cos(y[None] / 17)
        bands = np.clip(bands + 0.05 * rng.standard_normal((13, 256, 256)), 0, 1)
        tifffile.imwrite(folders["13-band uint16 TIFF"] / f"{i:04d}.tif", (bands * 10000).astype(np.uint16),
                         photometric="minisblack", planarconfig="separate")
        rgb = Image.fromarray((bands[[3, 2, 1]].transpose(1, 2, 0) * 255).astype(np.uint8))
        rgb.save(folders["RGB PNG"] / f"{i:04d}.png")
        rgb.save(folders["RGB JPEG"] / f"{i:04d}.jpg", quality=90)
    return folders


def bench(*args):
    """The records `python -m fcmae.bench ARGS --json` writes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "records.json"
        subprocess.run([sys.executable, "-m", "fcmae.bench", *map(str, args), "--json", str(out)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--work", default=str(ROOT / "runs" / "channels"), help="where the tiles are written")
    p.add_argument("--count", type=int, default=200, help="tiles of each kind")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--results", default=str(HERE / "results"), help="where results.json goes")
    args = p.parse_args(argv)
    folders = write_tiles(Path(args.work), args.count)
    rounds = []
    for r in range(args.rounds):
        row = {"loader": {}, "step": {}}
        for kind, (_, chans) in KINDS.items():
            for record in bench("--data", folders[kind], "--in_chans", chans, "--num_workers", 0, 2,
                                "--batch_size", 32, "--batches", 5, "--input_size", 224):
                row["loader"][f"{kind}, {record['num_workers']} workers"] = record["images_per_s"]
        for chans in (3, 13):
            record = bench("--model", "convnextv2_atto", "--rows", "sparse", "--in_chans", chans, "--batch_size", 8,
                           "--input_size", 224, "--steps", 5, "--warmup", 2, "--device", "cpu")[0]
            row["step"][f"{chans} channels"] = {"step_ms": record["step_ms"], "peak_mib": record["peak_memory_mib"]}
        rounds.append(row)
        print(f"round {r + 1}: {json.dumps(row)}", flush=True)
    loader = rounds[0]["loader"]
    median = {"loader_images_per_s": {k: statistics.median(r["loader"][k] for r in rounds) for k in loader},
              "step_ms": {k: statistics.median(r["step"][k]["step_ms"] for r in rounds) for k in rounds[0]["step"]},
              "peak_rss_growth_mib": {k: statistics.median(r["step"][k]["peak_mib"] for r in rounds)
                                      for k in rounds[0]["step"]}}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps({"median": median, "rounds": rounds}, indent=1) + "\n")
    print(json.dumps(median, indent=1))


if __name__ == "__main__":
    main()
