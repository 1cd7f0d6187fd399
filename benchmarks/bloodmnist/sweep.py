"""Which pretraining settings make FCMAE beat a random encoder at the CI preset's size? Variants of
run.py's "ci" preset (only the pretraining changes; the probes and fine-tunes stay as they are),
several at a time, one table at the end.

    python benchmarks/bloodmnist/sweep.py --npz ../shared/data/bloodmnist.npz --device cuda --parallel 3

Writes <work>/<variant>/ (each a run.py work folder) and <work>/sweep.md, <work>/sweep.json.
"""
import argparse
import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import PRESETS, mean_spread  # noqa: E402

PRETRAIN = PRESETS["ci"]["pretrain"]
VARIANTS = {
    "64px_40ep": {},
    "64px_200ep": {"pretrain_epochs": 200},
    "128px_40ep": {"input_size": 128},
    "128px_100ep": {"input_size": 128, "pretrain_epochs": 100},
    "128px_100ep_seed1": {"input_size": 128, "pretrain_epochs": 100, "pretrain_seed": 1},
    "128px_100ep_decoder4": {"input_size": 128, "pretrain_epochs": 100,
                             "pretrain": PRETRAIN + ["--decoder_depth", "4"]},
    "128px_200ep": {"input_size": 128, "pretrain_epochs": 200},
    "128px_800images_40ep": {"input_size": 128, "per_class_limit": 100},
    "224px_40ep": {"input_size": 224},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", required=True)
    p.add_argument("--work", default="runs/bloodmnist_sweep")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--parallel", type=int, default=1, help="variants at a time")
    p.add_argument("--jobs", type=int, default=1, help="run.py --jobs for each variant")
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--override", default="{}", help="JSON values applied to every variant (smoke runs)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    common = json.loads(args.override)

    def one(name):
        override = {"device": args.device, **VARIANTS[name], **common}
        command = [sys.executable, HERE / "run.py", "--npz", args.npz, "--preset", "ci", "--jobs", args.jobs,
                   "--override", json.dumps(override), "--work", work / name]
        with open(work / f"{name}.log", "w") as log:
            code = subprocess.run([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: exit {code}", flush=True)
        results = work / name / "results" / "results.json"
        return json.loads(results.read_text()) if code == 0 and results.is_file() else None

    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        summaries = dict(zip(names, pool.map(one, names)))
    rows = ["| variant | pretrain s | probe random | probe pretrained | margin | fine-tune random | "
            "fine-tune pretrained |",
            "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        if s is None:
            rows.append(f"| {name} | failed, see {name}.log | | | | | |")
            continue
        probe_random, probe_pretrained, finetune_random, finetune_pretrained = (
            mean_spread(s["table"][key], 1)
            for key in ("probe_random", "probe_pretrained", "finetune_random", "finetune_pretrained"))
        rows.append(f"| {name} | {s['wall_seconds'].get('pretrain', 0):.0f} | {probe_random} | {probe_pretrained} | "
                    f"{s['margin']['probe']:+.1f} | {finetune_random} | {finetune_pretrained} |")
    (work / "sweep.md").write_text("\n".join(rows) + "\n")
    (work / "sweep.json").write_text(json.dumps(summaries, indent=1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
