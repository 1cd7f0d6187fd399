"""Does pretrain.py's k-NN monitor mean something? Its top-1 against pretraining epochs on
BloodMNIST, beside what fine-tuning the same checkpoints gives with 1% of the labels.

    python benchmarks/bloodmnist/knn_monitor.py --npz ../shared/data/bloodmnist.npz    # CPU, about 2 hours
    python benchmarks/bloodmnist/knn_monitor.py --npz ... --epochs 12 --finetuned 4,8,12  # a shorter schedule

1. prepare.py's class folders at the study's resolution (run.py's "full" preset: atto, 96 px);
2. pretrain.py with that preset's recipe on the training split only, so that the validation split
   is held out: its held-out loss and the k-NN top-1 (bank: a class-balanced 4,000 of the
   training split; queries: the validation split) after every epoch, a checkpoint every 5;
3. the same monitors for the untrained encoder (a run whose one step has learning rate 0);
4. finetune.py from the checkpoints of a few epochs and from scratch, with run.py's pretrained
   arm's recipe at 1% of the labels (3 seeds, the subsets run.py draws), scored on the test split;
5. knn_monitor.json and knn_vs_epochs.png in --results: whether the k-NN ranks the checkpoints
   as fine-tuning does.

Every step is skipped when its output is complete, so an interrupted run continues.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prepare import CLASSES, prepare  # noqa: E402
from run import FULL, MODEL, RECIPE, ROOT, epochs_logged, evaluation, run, subset_folder  # noqa: E402

FINETUNED_EPOCHS = (5, 15, 30)  # the checkpoints fine-tuned by default, beside random initialisation
FRACTION, SEEDS, FINETUNE_EPOCHS, FINETUNE_BLR = "0.01", (0, 1, 2), 100, 1.6e-2  # run.py's 1% row, pretrained arm


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--npz", required=True, help="bloodmnist.npz (MedMNIST v2)")
    p.add_argument("--work", default=None, help="runs and data (default: runs/bloodmnist_knn)")
    p.add_argument("--results", default=str(HERE / "results"), help="where knn_monitor.json and the plot go")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: run.py's full preset's)")
    p.add_argument("--finetuned", default=",".join(map(str, FINETUNED_EPOCHS)),
                   help="the epochs whose checkpoints are fine-tuned, comma-separated")
    args = p.parse_args(argv)
    finetuned_epochs = tuple(int(e) for e in args.finetuned.split(","))
    work = Path(args.work or ROOT / "runs" / "bloodmnist_knn").resolve()
    results = Path(args.results).resolve()
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    py, cfg = sys.executable, {**FULL, "pretrain_epochs": args.epochs or FULL["pretrain_epochs"]}
    save_every = str(math.gcd(*finetuned_epochs))  # a checkpoint at every epoch fine-tuned
    common = ["--model", MODEL, "--input_size", cfg["input_size"], "--device", cfg["device"],
              "--mixed_precision", cfg["mixed_precision"], "--num_workers", cfg["num_workers"]]
    data = prepare(args.npz, work / "data", size=cfg["input_size"], per_class_limit=None)
    monitors = ["--eval_data_path", data / "val", "--knn_train_path", data / "train", "--knn_eval_path", data / "val",
                "--knn_max_images", "4000", "--log_with", "none"]

    pre = work / "pretrain"
    if len(epochs_logged(pre)) < cfg["pretrain_epochs"]:
        run("pretrain", [py, "pretrain.py", *common, *cfg["pretrain"], *monitors, "--epochs", cfg["pretrain_epochs"],
                         "--save_ckpt_freq", save_every, "--save_ckpt_num", "0", "--data_path", data / "train",
                         "--output_dir", pre, "--seed", cfg["pretrain_seed"]], work, timings)
    untrained = work / "untrained"
    if not epochs_logged(untrained):  # one step at learning rate 0: the initial weights, measured
        run("untrained", [py, "pretrain.py", *common, *cfg["pretrain"], *monitors, "--epochs", "1", "--max_steps", "1",
                          "--lr", "0", "--data_path", data / "train", "--output_dir", untrained,
                          "--seed", cfg["pretrain_seed"]], work, timings)

    labelled = ["--data_set", "image_folder", "--nb_classes", len(CLASSES), "--crop_pct", "1.0", "--log_with", "none"]
    finetuned = {}
    for start in ("scratch", *finetuned_epochs):
        accs = []
        for seed in SEEDS:
            folder, _ = subset_folder(data / "train", float(FRACTION), seed, work / "subsets" / f"seed{seed}")
            name = f"finetune_{start}_seed{seed}"
            weights = [] if start == "scratch" else ["--finetune", checkpoint_of(pre, start)]
            if len(epochs_logged(work / name)) < FINETUNE_EPOCHS:
                run(name, [py, "finetune.py", *common, *labelled, *RECIPE, *weights, "--data_path", folder,
                           "--disable_eval", "true", "--blr", FINETUNE_BLR if start != "scratch" else 4e-3,
                           "--epochs", FINETUNE_EPOCHS, "--warmup_epochs", FINETUNE_EPOCHS // 10,
                           "--save_ckpt_freq", FINETUNE_EPOCHS // 4, "--seed", seed, "--output_dir", work / name],
                    work, timings)
            command = [py, "finetune.py", *common, *labelled, "--eval", "true", "--data_path", folder,
                       "--eval_data_path", data / "test", "--output_dir", work / name]
            accs.append(evaluation(name, "test", command, work, timings)["acc1"])
        finetuned[str(start)] = {"test_acc1": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs)}
    return report(pre, untrained, finetuned, finetuned_epochs, results, timings)


def checkpoint_of(pre, epoch):
    """The checkpoint folder saved at the end of `epoch` epochs (the one with the epoch's step)."""
    log = epochs_logged(pre)
    steps = sorted(int(p.name.split("-")[1]) for p in (pre / "checkpoints").glob("checkpoint-*"))
    per_epoch = steps[-1] // len(log)
    return pre / "checkpoints" / f"checkpoint-{epoch * per_epoch:08d}"


def report(pre, untrained, finetuned, finetuned_epochs, results, timings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, start = epochs_logged(pre), epochs_logged(untrained)[-1]
    epochs = [0] + [r["epoch"] + 1 for r in log]
    knn = [start["knn_top1"]] + [r["knn_top1"] for r in log]
    held_out = [start["held_out_loss"]] + [r["held_out_loss"] for r in log]
    knn_at = {e: knn[e] for e in finetuned_epochs}
    by_knn = sorted(finetuned_epochs, key=lambda e: knn_at[e])
    by_finetune = sorted(finetuned_epochs, key=lambda e: finetuned[str(e)]["mean"])
    summary = {"epochs": epochs, "knn_top1": knn, "knn_top5": [start["knn_top5"]] + [r["knn_top5"] for r in log],
               "held_out_loss": held_out, "train_loss": [None] + [r["train_loss"] for r in log],
               "finetuned_1pct_test_acc1": finetuned, "checkpoints_by_knn": by_knn,
               "checkpoints_by_finetuning": by_finetune, "same_ranking": by_knn == by_finetune,
               "wall_seconds": timings}
    results.mkdir(parents=True, exist_ok=True)
    (results / "knn_monitor.json").write_text(json.dumps(summary, indent=1) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(epochs, knn, marker="o", ms=3, color="tab:blue", label="k-NN top-1 (validation)")
    ax.set(xlabel="pretraining epoch", ylabel="top-1 %", title=f"BloodMNIST, {MODEL}: k-NN monitor and fine-tuning")
    xs = [0] + list(finetuned_epochs)
    ys = [finetuned["scratch"]["mean"]] + [finetuned[str(e)]["mean"] for e in finetuned_epochs]
    errs = [finetuned["scratch"]["std"]] + [finetuned[str(e)]["std"] for e in finetuned_epochs]
    ax.errorbar(xs, ys, yerr=errs, color="tab:orange", marker="s", capsize=4, linestyle="--",
                label="fine-tuned, 1% labels (test; epoch 0: from scratch)")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(results / "knn_vs_epochs.png", dpi=110)
    plt.close(fig)
    print(json.dumps({k: summary[k] for k in ("checkpoints_by_knn", "checkpoints_by_finetuning", "same_ranking")}))
    return summary


if __name__ == "__main__":
    main()
