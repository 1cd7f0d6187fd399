"""Does FCMAE pretraining give a better fine-tuned model when labels are scarce? A label-fraction
study on BloodMNIST, end to end with the project's own commands.

    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz                # CPU, hours
    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz --preset ci    # minutes
    python benchmarks/bloodmnist/run.py --npz ../shared/data/bloodmnist.npz --preset gpu --jobs 4

1. prepare.py writes class folders of PNG files at the preset's resolution (official splits);
2. pretrain.py pretrains convnextv2_atto once, without labels, on every train and val image;
3. `python -m fcmae.export` writes its encoder in the official layout;
4. for each label fraction and seed, a class-stratified subset of the training split (fixed by
   the seed, recorded in subsets.json) is fine-tuned with finetune.py twice: from the pretrained
   encoder and from scratch, same recipe and budget, at every learning rate of the preset;
5. each arm's learning rate is chosen per fraction by its mean top-1 on the validation split;
   only the chosen runs are evaluated on the test split;
6. results.json, results.md (the table), accuracy_vs_labels.png, the pretraining loss and the
   reconstructions before and after pretraining go to --results.

Every step runs the scripts as a user would (a subprocess each, nothing special-cased for this
data in the library) and is skipped when its output is complete, so an interrupted study
continues where it stopped. --override changes a preset's values (JSON) for a variant, e.g.
--override '{"pretrain_epochs": 80}'.
"""
import argparse
import concurrent.futures
import json
import random
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
# the fine-tuning recipe, identical for both arms: timm's RandAugment, random erasing, label
# smoothing, drop path; no layer decay (it would slow the scratch arm's early layers)
RECIPE = ["--batch_size", "32", "--weight_decay", "0.05", "--drop_path", "0.1", "--smoothing", "0.1",
          "--reprob", "0.25", "--layer_decay", "1.0", "--mixup", "0", "--cutmix", "0", "--model_ema", "false"]
FULL = dict(
    input_size=96, device="cpu", mixed_precision="no", num_workers=2, per_class_limit=None,
    pretrain_epochs=30, pretrain_seed=0,
    pretrain=["--batch_size", "64", "--blr", "6e-3", "--warmup_epochs", "2", "--save_ckpt_freq", "5",
              "--log_every", "20"],
    # label fraction -> (seeds, fine-tuning epochs): about 300, 370 and 1,100 steps of batch 32
    fractions={"0.01": [[0, 1, 2], 100], "0.1": [[0, 1, 2], 10], "1.0": [[0], 3]},
    blrs=[4e-3, 1.6e-2],  # lr 5e-4 and 2e-3 at batch 32, for each arm
)
PRESETS = {
    "full": FULL,
    # 40 images a class and split, a few minutes: the slow test in CI (a test of the pipeline)
    "ci": dict(
        FULL, per_class_limit=40, pretrain_epochs=6,
        pretrain=["--batch_size", "32", "--blr", "1.2e-2", "--warmup_epochs", "1", "--save_ckpt_freq", "6",
                  "--log_every", "10"],
        fractions={"0.25": [[0, 1], 4], "1.0": [[0], 2]},
    ),
    # one GPU (H100/H200), the whole study within one 8-minute call, run with --jobs 4
    "gpu": dict(
        FULL, device="cuda", mixed_precision="bf16", num_workers=4, pretrain_epochs=60,
        pretrain=["--batch_size", "256", "--blr", "3e-3", "--warmup_epochs", "5", "--save_ckpt_freq", "20",
                  "--log_every", "20", "--num_workers", "12"],
        fractions={"0.01": [[0, 1, 2], 100], "0.1": [[0, 1, 2], 20], "1.0": [[0], 5]},
    ),
}

TIMINGS_LOCK = threading.Lock()


def stratified_subset(labels, fraction, seed):
    """Sorted indices of a class-stratified subset: round(fraction x count) of each class (at least
    one), drawn by a generator seeded with `seed`, so the same arguments give the same subset."""
    by_class = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        take = min(len(members), max(1, round(fraction * len(members))))
        chosen += rng.sample(members, take)
    return sorted(chosen)


def subset_folder(train, fraction, seed, out):
    """Class folders of symbolic links to the chosen training images; returns (folder, file names)."""
    files = sorted(p for p in Path(train).rglob("*.png"))
    chosen = [files[i] for i in stratified_subset([p.parent.name for p in files], fraction, seed)]
    if not (out / "complete").is_file():
        for path in chosen:
            link = out / path.parent.name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(path)
        (out / "complete").touch()
    return out, [f"{p.parent.name}/{p.name}" for p in chosen]


def unlabelled_folder(data):
    """A folder that shows pretrain.py every train and val image (links to both splits)."""
    folder = data / "unlabelled"
    folder.mkdir(exist_ok=True)
    for split in ("train", "val"):
        link = folder / f"{split}_images"  # not "train": pretrain.py would read only <path>/train
        if not link.is_symlink():
            link.symlink_to(data / split)
    return folder


def run(stage, command, work, timings):
    """Run one of the project's commands, its output in work/logs/<stage>.txt; record its wall
    time; returns the output."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(map(str, command))}", flush=True)
    tic = time.perf_counter()
    with open(logs / f"{stage}.txt", "w") as log:
        result = subprocess.run([str(c) for c in command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    output = (logs / f"{stage}.txt").read_text()
    if result.returncode != 0:
        sys.exit(f"{stage} failed (exit {result.returncode}); its log is {logs / f'{stage}.txt'}:\n{output[-2000:]}")
    with TIMINGS_LOCK:
        timings[stage] = round(time.perf_counter() - tic, 1)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
    return output


def epochs_logged(folder):
    log = Path(folder) / "log.txt"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluation(name, split, command, work, timings):
    """Top-1 of a finished run's final weights on `split`, cached in <run>/<split>.json (from the
    metrics.json that finetune.py --eval writes in its output_dir, the run's folder)."""
    cache = work / name / f"{split}.json"
    if not cache.is_file():
        run(f"{name}_eval_{split}", command, work, timings)
        metrics = json.loads((work / name / "metrics.json").read_text())
        cache.write_text(json.dumps({key: metrics[key] for key in ("images", "acc1", "acc5")}))
    return json.loads(cache.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--npz", required=True, help="bloodmnist.npz (MedMNIST v2)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--override", default="{}", help="JSON object of preset values to change")
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes run this many at a time (GPU)")
    p.add_argument("--work", default=None, help="runs and data (default: runs/bloodmnist_<preset>)")
    p.add_argument("--results", default=None, help="table and plot (default: <work>/results)")
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
    counts = {split: sum(1 for _ in (data / split).rglob("*.png")) for split in ("train", "val", "test")}

    pre = work / "pretrain"
    if len(epochs_logged(pre)) < cfg["pretrain_epochs"] or not (pre / "encoder.safetensors").is_file():
        run("pretrain", [py, "pretrain.py", *common, *cfg["pretrain"], "--epochs", cfg["pretrain_epochs"],
                         "--data_path", unlabelled_folder(data), "--output_dir", pre, "--seed", cfg["pretrain_seed"]],
            work, timings)
    encoder = work / "encoder_fcmae.pt"
    if not encoder.is_file():
        run("export", [py, "-m", "fcmae.export", pre / "encoder.safetensors", "--format", "official",
                       "--output", encoder], work, timings)

    labelled = ["--data_set", "image_folder", "--nb_classes", len(CLASSES), "--crop_pct", "1.0", "--log_with", "none"]
    subsets, runs, pending = {}, {}, []
    for fraction, (seeds, epochs) in cfg["fractions"].items():
        for seed in seeds:
            folder, names = subset_folder(data / "train", float(fraction), seed,
                                          work / "subsets" / f"fraction{fraction}_seed{seed}")
            subsets[f"{fraction}/{seed}"] = names
            for arm in ("pretrained", "scratch"):
                for blr in cfg["blrs"]:
                    name = f"{arm}_fraction{fraction}_seed{seed}_blr{blr:g}"
                    runs[name] = dict(arm=arm, fraction=fraction, seed=seed, blr=blr, data=folder)
                    if len(epochs_logged(work / name)) < epochs:
                        weights = ["--finetune", encoder] if arm == "pretrained" else []
                        pending.append((name, [py, "finetune.py", *common, *labelled, *RECIPE, *weights,
                                               "--data_path", folder, "--disable_eval", "true", "--blr", blr,
                                               "--epochs", epochs, "--warmup_epochs", max(1, epochs // 10),
                                               "--save_ckpt_freq", max(1, epochs // 4), "--seed", seed,
                                               "--output_dir", work / name]))
    (work / "subsets.json").write_text(json.dumps(subsets))

    def evaluate(name, split):
        r = runs[name]
        command = [py, "finetune.py", *common, *labelled, "--eval", "true", "--data_path", r["data"],
                   "--eval_data_path", data / split, "--output_dir", work / name]
        return evaluation(name, split, command, work, timings)

    def train_and_validate(name, command):
        if command is not None:
            run(name, command, work, timings)
        return name, evaluate(name, "val")["acc1"]

    jobs = [(name, command) for name, command in pending] + [(n, None) for n in runs if n not in dict(pending)]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        val = dict(f.result() for f in [pool.submit(train_and_validate, *job) for job in jobs])

    # each arm's learning rate per fraction, by mean validation top-1 over the seeds; then test
    chosen = {}
    for fraction in cfg["fractions"]:
        for arm in ("pretrained", "scratch"):
            by_blr = {blr: statistics.mean(val[n] for n, r in runs.items()
                                           if (r["arm"], r["fraction"], r["blr"]) == (arm, fraction, blr))
                      for blr in cfg["blrs"]}
            chosen[fraction, arm] = max(by_blr, key=by_blr.get), by_blr
    test_runs = [n for n, r in runs.items() if r["blr"] == chosen[r["fraction"], r["arm"]][0]]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        test = dict(zip(test_runs, pool.map(lambda n: evaluate(n, "test")["acc1"], test_runs)))
    return report(cfg, runs, val, test, chosen, subsets, pre, results, counts, timings, args.preset)


def report(cfg, runs, val, test, chosen, subsets, pre, results, counts, timings, preset):
    """results.json, results.md and the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    table = {}
    for fraction in cfg["fractions"]:
        labels = len(subsets[f"{fraction}/{cfg['fractions'][fraction][0][0]}"])
        row = {"labelled_images": labels}
        for arm in ("pretrained", "scratch"):
            blr, val_by_blr = chosen[fraction, arm]
            accs = [test[n] for n, r in runs.items() if (r["arm"], r["fraction"], r["blr"]) == (arm, fraction, blr)]
            mean, std = mean_std(accs)
            row[arm] = {"test_acc1": accs, "mean": mean, "std": std, "blr": blr,
                        "lr": blr * 32 / 256, "val_acc1_by_blr": {f"{b:g}": v for b, v in val_by_blr.items()}}
        row["gain"] = row["pretrained"]["mean"] - row["scratch"]["mean"]
        # the gain is judged against the spread of both arms: None with a single seed
        seeded = min(len(row[arm]["test_acc1"]) for arm in ("pretrained", "scratch")) > 1
        row["gain_over_twice_larger_std"] = (row["gain"] > 2 * max(row["pretrained"]["std"], row["scratch"]["std"])
                                             if seeded else None)
        table[fraction] = row
    pre_log = epochs_logged(pre)
    summary = {"preset": preset, "config": {k: v for k, v in cfg.items()}, "images": counts, "table": table,
               "pretrain_loss": [line["train_loss"] for line in pre_log], "wall_seconds": timings,
               "validation_acc1": val, "subsets": subsets}
    (results / "results.json").write_text(json.dumps(summary, indent=1))

    def cell(entry):
        n = len(entry["test_acc1"])
        spread = f" ± {entry['std']:.2f}" if n > 1 else ""
        return f"{entry['mean']:.2f}{spread} (n={n}, lr {entry['lr']:g})"

    md = [f"| labels ({MODEL}, {cfg['input_size']} px) | from scratch | FCMAE pretrained | gain |",
          "|---|---|---|---|"]
    for fraction, row in table.items():
        mark = {True: " ✓", False: " ✗", None: ""}[row["gain_over_twice_larger_std"]]
        md.append(f"| {100 * float(fraction):g}% ({row['labelled_images']} images) | {cell(row['scratch'])} | "
                  f"{cell(row['pretrained'])} | {row['gain']:+.2f}{mark} |")
    (results / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    # the pretraining loss, and the reconstructions before and after it
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(len(pre_log)), summary["pretrain_loss"], marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel="masked-patch MSE (normalised pixels)", title="FCMAE pretraining loss")
    fig.tight_layout()
    fig.savefig(results / "pretrain_loss.png", dpi=120)
    plt.close(fig)
    pictures = sorted((pre / "reconstructions").glob("epoch_*.png"))
    shutil.copy(pre / "reconstructions" / "step_00000000.png", results / "reconstructions_start.png")
    shutil.copy(pictures[-1], results / "reconstructions_end.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm, color, label in (("scratch", "tab:gray", "from scratch"), ("pretrained", "tab:blue", "FCMAE pretrained")):
        xs = [100 * float(f) for f in table]
        ax.errorbar(xs, [table[f][arm]["mean"] for f in table], yerr=[table[f][arm]["std"] for f in table],
                    color=color, marker="o", capsize=4, label=label)
    ax.set(xscale="log", xlabel=f"labelled training images (% of {counts['train']:,})", ylabel="test top-1 %",
           title=f"BloodMNIST, {MODEL}, {cfg['input_size']} px, fine-tuned")
    ax.set_xticks([100 * float(f) for f in table], [f"{100 * float(f):g}%" for f in table])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "accuracy_vs_labels.png", dpi=120)
    plt.close(fig)
    print(f"results in {results}")
    return summary


if __name__ == "__main__":
    main()
