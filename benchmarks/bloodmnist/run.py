"""Does FCMAE pretraining help on real images? BloodMNIST, end to end with the project's commands.

    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz               # full CPU run
    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz --preset ci   # a few minutes
    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz --preset gpu --jobs 4

1. prepare.py turns the .npz into class folders of PNG files at the preset's resolution (official splits);
2. pretrain.py pretrains convnextv2_atto on train/ without labels, for a fixed number of epochs;
3. `python -m fcmae.export` writes its encoder in the official layout;
4. finetune.py --linear_probe true trains a probe on that encoder and on a randomly initialised
   one, for several seeds, and evaluates on test/;
5. finetune.py fine-tunes from the pretrained encoder and trains from scratch, same budget;
6. results.json, results.md (the table) and PNG plots go to --results.

Every step runs the scripts as a user would (a subprocess each, nothing special-cased for this
data in the library) and is skipped when its output is complete, so an interrupted run continues.
The evaluation recipe is fixed in PRESETS and identical for both encoders; --override changes a
preset's values (JSON) for a variant, e.g. --override '{"pretrain_epochs": 80}'.
"""
import argparse
import concurrent.futures
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from prepare import CLASSES, prepare  # noqa: E402

MODEL = "convnextv2_atto"
PROBE = ["--weight_decay", "0", "--warmup_epochs", "1"]
FINETUNE = ["--warmup_epochs", "1", "--layer_decay", "0.9", "--weight_decay", "0.05", "--drop_path", "0.1",
            "--smoothing", "0.1", "--reprob", "0.25"]
# about 30 minutes of pretraining on 2 CPU cores, then about 30 of probes and fine-tunes
FULL = dict(
    input_size=64, device="cpu", mixed_precision="no", num_workers=2,
    per_class_limit=None, pretrain_epochs=25, pretrain_seed=0,
    pretrain=["--batch_size", "64", "--blr", "6e-3", "--warmup_epochs", "2", "--save_ckpt_freq", "5",
              "--log_every", "10"],
    probe_seeds=(0, 1, 2), probe_epochs=3, probe=["--batch_size", "256", "--blr", "1e-2", *PROBE],
    finetune_seeds=(0,), finetune_epochs=3, finetune=["--batch_size", "64", "--blr", "4e-3", *FINETUNE],
)
PRESETS = {
    "full": FULL,
    # a few hundred images, a few minutes: the slow test in CI
    "ci": dict(
        FULL, per_class_limit=40, pretrain_epochs=40,
        pretrain=["--batch_size", "32", "--blr", "1.2e-2", "--warmup_epochs", "2", "--save_ckpt_freq", "40",
                  "--log_every", "10"],
        probe_epochs=10, probe=["--batch_size", "64", "--blr", "4e-2", *PROBE],
        finetune=["--batch_size", "32", "--blr", "8e-3", *FINETUNE],
    ),
    # one GPU (H100/H200), a few minutes: the full data at 128 px, more epochs, bf16
    "gpu": dict(
        FULL, input_size=128, device="cuda", mixed_precision="bf16", num_workers=12, pretrain_epochs=60,
        pretrain=["--batch_size", "256", "--blr", "2e-3", "--warmup_epochs", "5", "--save_ckpt_freq", "20",
                  "--log_every", "20"],
        probe_epochs=10, finetune_epochs=10, finetune=["--batch_size", "128", "--blr", "4e-3", *FINETUNE],
    ),
}


TIMINGS_LOCK = threading.Lock()


def run(stage, command, work, timings):
    """Run one of the project's commands, its output in work/logs/<stage>.txt; record its wall time."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(map(str, command))}", flush=True)
    tic = time.perf_counter()
    with open(logs / f"{stage}.txt", "w") as log:
        result = subprocess.run([str(c) for c in command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (logs / f"{stage}.txt").read_text()[-2000:]
        sys.exit(f"{stage} failed (exit {result.returncode}); its log is {logs / f'{stage}.txt'}:\n{tail}")
    with TIMINGS_LOCK:
        timings[stage] = round(time.perf_counter() - tic, 1)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))


def epochs_logged(folder):
    log = Path(folder) / "log.txt"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_spread(entry, digits):
    """'mean ± std' of a table entry ({"runs", "mean", "std"}); the mean alone for a single run."""
    spread = f" ± {entry['std']:.{digits}f}" if len(entry["runs"]) > 1 else ""
    return f"{entry['mean']:.{digits}f}{spread}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", required=True, help="bloodmnist.npz (MedMNIST v2)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--override", default="{}", help="JSON object of preset values to change")
    p.add_argument("--jobs", type=int, default=1, help="probes and fine-tunes run this many at a time")
    p.add_argument("--work", default=None, help="runs and data (default: runs/bloodmnist_<preset>)")
    p.add_argument("--results", default=None, help="table and plots (default: <work>/results)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    try:
        override = json.loads(args.override)
    except json.JSONDecodeError as error:
        p.error(f"--override is not valid JSON ({error}); write it like '{{\"input_size\": 128}}'")
    if not isinstance(override, dict):
        p.error("--override must be a JSON object of preset values, like '{\"input_size\": 128}'")
    unknown = sorted(set(override) - set(cfg))
    if unknown:
        p.error(f"--override names {unknown}, which no preset has; the keys are {sorted(cfg)}")
    cfg.update(override)
    work = Path(args.work or ROOT / "runs" / f"bloodmnist_{args.preset}").resolve()
    results = Path(args.results or work / "results").resolve()
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    py = sys.executable
    common = ["--model", MODEL, "--input_size", cfg["input_size"], "--device", cfg["device"],
              "--mixed_precision", cfg["mixed_precision"], "--num_workers", cfg["num_workers"]]

    data = prepare(args.npz, work / "data", size=cfg["input_size"], per_class_limit=cfg["per_class_limit"])
    counts = {split: sum(1 for _ in (data / split).rglob("*.png")) for split in ("train", "test")}

    pre = work / "pretrain"
    if len(epochs_logged(pre)) < cfg["pretrain_epochs"] or not (pre / "encoder.safetensors").is_file():
        run("pretrain", [py, "pretrain.py", *common, *cfg["pretrain"], "--epochs", cfg["pretrain_epochs"],
                         "--data_path", data / "train", "--output_dir", pre, "--seed", cfg["pretrain_seed"]],
            work, timings)
    encoder = work / "encoder_fcmae.pt"
    if not encoder.is_file():
        run("export", [py, "-m", "fcmae.export", pre / "encoder.safetensors", "--format", "official",
                       "--output", encoder], work, timings)

    labelled = ["--data_set", "image_folder", "--data_path", data / "train", "--eval_data_path", data / "test",
                "--nb_classes", len(CLASSES), "--crop_pct", "1.0", "--log_with", "none", "--mixup", "0",
                "--cutmix", "0", "--model_ema", "false"]
    pending, names = [], []
    for kind, seeds, epochs, extra in (("probe", cfg["probe_seeds"], cfg["probe_epochs"], ["--linear_probe", "true"]),
                                       ("finetune", cfg["finetune_seeds"], cfg["finetune_epochs"], [])):
        for init in ("pretrained", "random"):
            for seed in seeds:
                name = f"{kind}_{init}_seed{seed}"
                names.append(name)
                if len(epochs_logged(work / name)) < epochs:
                    weights = ["--finetune", encoder] if init == "pretrained" else []
                    pending.append((name, [py, "finetune.py", *common, *labelled, *cfg[kind], *extra, *weights,
                                           "--epochs", epochs, "--seed", seed, "--output_dir", work / name]))
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for done in [pool.submit(run, name, command, work, timings) for name, command in pending]:
            done.result()
    runs = {name: epochs_logged(work / name) for name in names}
    return report(cfg, runs, pre, results, counts, timings, args.preset)


def report(cfg, runs, pre, results, counts, timings, preset):
    """results.json, results.md and the plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    final = {name: lines[-1]["test_acc1"] for name, lines in runs.items()}  # the last epoch, not the best
    table = {}
    for kind in ("probe", "finetune"):
        for init in ("pretrained", "random"):
            values = [v for n, v in final.items() if n.startswith(f"{kind}_{init}_")]
            mean, std = mean_std(values)
            table[f"{kind}_{init}"] = {"runs": values, "mean": mean, "std": std}
    margin = {kind: table[f"{kind}_pretrained"]["mean"] - table[f"{kind}_random"]["mean"]
              for kind in ("probe", "finetune")}
    pre_log = epochs_logged(pre)
    summary = {"preset": preset, "config": cfg, "images": counts, "table": table, "margin": margin,
               "wall_seconds": timings,
               "pretrain_loss": [line["train_loss"] for line in pre_log],
               "curves": {n: [line["test_acc1"] for line in lines] for n, lines in runs.items()}}
    (results / "results.json").write_text(json.dumps(summary, indent=1))

    def cell(key):
        return f"{mean_spread(table[key], 2)} (n={len(table[key]['runs'])})"

    md = [f"| encoder ({MODEL}, {cfg['input_size']} px) | linear probe top-1 % | fine-tune top-1 % |",
          "|---|---|---|",
          f"| random initialisation | {cell('probe_random')} | {cell('finetune_random')} (from scratch) |",
          f"| FCMAE pretrained, {cfg['pretrain_epochs']} epochs | {cell('probe_pretrained')} | "
          f"{cell('finetune_pretrained')} |",
          f"| pretrained minus random | {margin['probe']:+.2f} | {margin['finetune']:+.2f} |"]
    (results / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    # pretraining loss, and the reconstructions before and after
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(len(pre_log)), summary["pretrain_loss"], marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel="masked-patch MSE (normalised pixels)", title="FCMAE pretraining loss")
    fig.tight_layout()
    fig.savefig(results / "pretrain_loss.png", dpi=120)
    plt.close(fig)
    pictures = sorted((pre / "reconstructions").glob("epoch_*.png"))
    shutil.copy(pre / "reconstructions" / "step_00000000.png", results / "reconstructions_start.png")
    shutil.copy(pictures[-1], results / "reconstructions_end.png")

    # accuracy: pretrained vs random, each seed a dot
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, kind, title in ((axes[0], "probe", "linear probe"), (axes[1], "finetune", "fine-tune")):
        for i, init in enumerate(("random", "pretrained")):
            t = table[f"{kind}_{init}"]
            ax.bar(i, t["mean"], yerr=t["std"], color=("tab:gray", "tab:blue")[i], alpha=0.7, capsize=4)
            ax.scatter([i] * len(t["runs"]), t["runs"], color="black", s=10, zorder=3)
        ax.set(xticks=[0, 1], xticklabels=["random init", "FCMAE"], ylabel="test top-1 %", title=title)
    for name, curve in summary["curves"].items():
        style = "-" if name.startswith("finetune") else ":"
        color = "tab:blue" if "pretrained" in name else "tab:gray"
        axes[2].plot(range(1, len(curve) + 1), curve, style, color=color, marker="o", ms=3, alpha=0.8,
                     label=name.rsplit("_seed", 1)[0].replace("_", ", ") if name.endswith("seed0") else None)
    axes[2].set(xlabel="epoch", ylabel="test top-1 %", title="test accuracy per epoch")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "accuracy.png", dpi=120)
    plt.close(fig)
    print(f"results in {results}")
    return summary


if __name__ == "__main__":
    main()
