"""Does scaled JPEG decoding change pretraining? Short pretraining runs, each seed once with
`--decoder full` and once with `--decoder scaled`, and their per-epoch losses side by side.

    python benchmarks/loader/loss_curves.py PHOTOS OUT_DIR [--seeds 0 1 2] [--epochs 10]

With the same seed both runs see the same images in the same order with the same crops, flips
and masks; only the decoded pixels differ (by the deviation benchmarks/loader/deviation.py
measures). The question is whether that difference moves the loss curve by more than the seed
does: OUT_DIR/summary.json and the printed table give, per epoch, each run's mean loss, the
largest |scaled - full| over the seeds (same seed) and the standard deviation over the seeds of
the full runs. Large photographs make the scaled decoder reduce most crops (1/4 and 1/8 at
2560x1600 and 128 px).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(photos, out, decoder, seed, args):
    log = out / "log.txt"
    if not log.is_file() or len(log.read_text().splitlines()) < args.epochs:
        command = [sys.executable, str(ROOT / "pretrain.py"), "--data_path", str(photos), "--model", args.model,
                   "--input_size", str(args.input_size), "--batch_size", str(args.batch_size),
                   "--repeats", str(args.repeats), "--epochs", str(args.epochs), "--warmup_epochs", "1",
                   "--blr", str(args.blr), "--seed", str(seed), "--decoder", decoder,
                   "--num_workers", str(args.num_workers), "--log_with", "none", "--save_ckpt_freq", "1000",
                   "--output_dir", str(out), "--device", "cpu"]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(line)["train_loss"] for line in log.read_text().splitlines()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos")
    p.add_argument("out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--input_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=32)
    p.add_argument("--blr", type=float, default=1.5e-3)
    p.add_argument("--num_workers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    curves = {(d, s): run(args.photos, out / f"{d}_seed{s}", d, s, args)
              for s in args.seeds for d in ("full", "scaled")}
    rows = []
    for e in range(args.epochs):
        full = [curves["full", s][e] for s in args.seeds]
        scaled = [curves["scaled", s][e] for s in args.seeds]
        rows.append({"epoch": e, "full": full, "scaled": scaled,
                     "paired_max_abs_diff": max(abs(a - b) for a, b in zip(full, scaled)),
                     "seed_std_full": statistics.stdev(full) if len(full) > 1 else None})
    print(f"{'epoch':>5}  {'full (per seed)':<30}{'scaled (per seed)':<30}{'max |diff|':>11}{'seed std':>10}")
    for r in rows:
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        print(f"{r['epoch']:>5}  {fmt(r['full']):<30}{fmt(r['scaled']):<30}{r['paired_max_abs_diff']:>11.5f}"
              f"{r['seed_std_full'] or 0:>10.5f}")
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "epochs": rows}, indent=1))


if __name__ == "__main__":
    main()
