"""The GPU benchmark in one call: training-step table, input pipeline and a real pretrain.py run.

    python benchmarks/gpu/run.py OUT_DIR                 # one CUDA GPU, about 8 minutes
    python benchmarks/gpu/run.py OUT_DIR --smoke         # a minute on CPU: checks the script itself

Writes OUT_DIR/summary.md and OUT_DIR/summary.json (well under 1 MB together). In order of
importance, each part only while time is left (`--budget_s`, default 450 s; a part that would
not end in time is cut off and reported as not measured):
1. `python -m fcmae.bench` rows at 224 px, bf16: sparse, dense and timm, eager, for
   convnextv2_base (batch 128) and convnextv2_atto (batch 256); minkowski too where MinkowskiEngine's
   CUDA build is installed;
2. the exactness tests on the GPU: tests/test_backends.py and tests/test_minkowski.py, their CUDA
   cases (backends agree with dense to the CPU tolerances), where pytest is installed; and the
   synchronisation check on the GPU (`python -m fcmae.bench --sync_check cuda`: pretrain.py in
   bf16 and finetune.py in fp16 with its gradient scaler, a few steps each, under CUDA's sync
   debug mode inside every step and evaluation batch);
3. the input pipeline on a folder of synthetic JPEG photographs it writes (ImageNet-like size
   and file size) and on the same images as webdataset shards, at several worker counts: images/s
   of one process (one GPU) with the `scaled` decoder (Pillow in the workers, the CPU path) and,
   where NVIDIA DALI imports, the `dali` decoder (nvJPEG and the hardware decoder in the main
   process), at the same worker counts; without DALI the table says why it is left out;
4. 200 steps of pretrain.py (base, batch 128, bf16) on that folder, loader included;
5. the same table compiled (torch.compile), base first (minkowski cannot be compiled).

Run it from a checkout on any machine with one CUDA GPU, in an environment with the project
installed (`pip install -e .`, or its requirements and PYTHONPATH=. from the checkout's root):
    python benchmarks/gpu/run.py OUT_DIR
The dali rows need NVIDIA DALI (`pip install -e ".[dali]"`, CUDA 13 drivers); without it the
loader table says why they are left out. The minkowski row needs MinkowskiEngine's CUDA build
(`bash scripts/install_minkowski.sh --cuda`); without it the row is left out. pytest runs the
exactness tests where it is installed. Nothing is downloaded: the photographs are synthetic.
"""
import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fcmae.cli import benchmark as bench  # noqa: E402  (the checkout, not an installed copy)
from fcmae.config import ConfigError  # noqa: E402
from fcmae.data import get_decoder, write_shards  # noqa: E402
from fcmae.models.backends import runnable  # noqa: E402

FULL = dict(device="cuda", precision="bf16", input_size=224,
            models=[("convnextv2_base", 128), ("convnextv2_atto", 256)],
            steps=20, warmup=3, images=2000, image_size=(500, 375), loader_workers=[1, 4, 14], loader_batches=8,
            pretrain=dict(model="convnextv2_base", batch_size=128, steps=200, workers=14),
            tests=["tests/test_backends.py", "tests/test_minkowski.py", "-k", "cuda"])
SMOKE = dict(device="cpu", precision="fp32", input_size=64, models=[("convnextv2_atto", 2)], steps=1, warmup=0,
             images=12, image_size=(96, 80), loader_workers=[0, 1], loader_batches=2,
             pretrain=dict(model="convnextv2_atto", batch_size=4, steps=3, workers=1),
             tests=["tests/test_minkowski.py", "-k", "cpu"])


def write_photo(args):
    """A JPEG with a photograph's statistics for the decoder: smooth colour regions, edges and
    sensor noise (random, seeded by its index), at quality 90."""
    path, index, (width, height) = args
    rng = np.random.default_rng(index)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32)
    pixels += 40 * (np.indices((height, width)).sum(0) % rng.integers(20, 60) < 4)[..., None]  # stripes: edges
    pixels += rng.normal(0, 12, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_photos(folder, count, size):
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img_{i:06d}.jpg", i, size) for i in range(count)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_photo, jobs)
    return sum(p.stat().st_size for p in folder.iterdir()) / count


def machine():
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def step_table(plan, compile_, peak, deadline):
    records = []
    for model, batch in plan["models"]:
        runs = runnable(plan["device"], compile_)
        ranked = sorted((b for b in runs if b.auto_rank is not None), key=lambda b: b.auto_rank)
        rows = [b.name for b in ranked] + ["timm"] + [b.name for b in runs if b.auto_rank is None]
        args = bench.parse_args(["--model", model, "--rows", *rows, "--batch_size", str(batch),
                                 "--input_size", str(plan["input_size"]), "--device", plan["device"],
                                 "--precision", plan["precision"], "--compile", str(compile_),
                                 "--steps", str(plan["steps"]), "--warmup", str(plan["warmup"])])
        records += bench.bench_steps(args, peak=peak, deadline=deadline)
    return records


def gpu_tests(plan, deadline):
    """The exactness tests' cases for the plan's device, run by pytest in a subprocess."""
    # one process, without setup.cfg's pytest-xdist options: a few cases on one device
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *plan["tests"]]
    record = {"command": shlex.join(command[1:])}
    if importlib.util.find_spec("pytest") is None:
        return {**record, "skipped": "pytest is not installed"}
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {**record, "skipped": "out of time"}
    lines = result.stdout.strip().splitlines()
    return {**record, "returncode": result.returncode, "result": lines[-1] if lines else "",
            "backends": [b.name for b in runnable(plan["device"])],
            "output_tail": "" if result.returncode == 0 else (result.stdout + result.stderr)[-3000:]}


def sync_check(plan, deadline):
    """`python -m fcmae.bench --sync_check`: on the GPU under CUDA's sync debug mode (the smoke plan:
    the meta device standing in for it), in a subprocess."""
    where = "cuda" if plan["device"] == "cuda" else "meta"
    command = [sys.executable, "-m", "fcmae.bench", "--sync_check", where]
    record = {"command": shlex.join(command[1:]), "device": where}
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {**record, "skipped": "out of time"}
    lines = (result.stdout + result.stderr).strip().splitlines()
    return {**record, "returncode": result.returncode, "result": lines[-1] if lines else "",
            "output_tail": "" if result.returncode == 0 else "\n".join(lines[-40:])}


def pretrain_run(plan, data, repeats, out, deadline):
    p = plan["pretrain"]
    command = [sys.executable, str(ROOT / "pretrain.py"), "--data_path", str(data), "--model", p["model"],
               "--batch_size", str(p["batch_size"]), "--input_size", str(plan["input_size"]),
               "--max_steps", str(p["steps"]), "--epochs", "1", "--warmup_epochs", "0", "--repeats", str(repeats),
               "--num_workers", str(p["workers"]), "--log_with", "none", "--save_ckpt", "false",
               "--output_dir", "", "--log_every", "50"]
    if plan["device"] == "cuda":
        command += ["--mixed_precision", plan["precision"]]
    else:
        command += ["--device", "cpu"]
    record = {"command": shlex.join(command[1:]).replace(str(ROOT) + "/", ""), "model": p["model"],
              "batch_size": p["batch_size"], "steps": p["steps"], "num_workers": p["workers"]}
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {**record, "skipped": "out of time"}
    record["wall_s"] = time.monotonic() - start
    match = re.search(r"done after (\d+) steps \(([\d.]+) images/s", result.stdout)
    if result.returncode != 0 or not match:
        return {**record, "failed": (result.stdout + result.stderr)[-2000:]}
    return {**record, "steps_done": int(match.group(1)), "images_per_s": float(match.group(2))}


def loader_decoders():
    """The decoders of the loader table: scaled (Pillow in the workers: the CPU path) and dali where
    DALI imports; and why dali is left out (None when it is not)."""
    try:
        get_decoder("dali")
    except ConfigError as err:
        return ["scaled"], str(err)
    return ["scaled", "dali"], None


def loader_rates(plan, data, decoder):
    """`fcmae.bench`'s loader records of `decoder` on `data` at the plan's worker counts."""
    return bench.bench_loader(bench.parse_args([
        "--data", str(data), "--input_size", str(plan["input_size"]), "--batch_size",
        str(plan["pretrain"]["batch_size"]), "--batches", str(plan["loader_batches"]), "--decoder", decoder,
        "--num_workers", *map(str, plan["loader_workers"])]))


def markdown(summary):
    lines = [f"# GPU benchmark: {summary['machine'].get('gpu', 'CPU (smoke run)')}", "",
             "machine: " + ", ".join(f"{k} {v}" for k, v in summary["machine"].items()), ""]
    if summary.get("matmul_peak_tflops"):
        lines += [f"bf16 matmul peak (8192^3, measured): {summary['matmul_peak_tflops']:.0f} TFLOP/s", ""]
    lines += ["## Training step (forward, backward, fused AdamW)", "",
              "| model | batch | row | compiled | images/s | step ms | peak memory MiB | MFU | vs dense | vs timm |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    steps = summary["steps"]
    for r in steps:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['row']} | {r['compile']} | not measured: "
                         f"{r['skipped']} | | | | | |")
            continue
        same = {s["row"]: s for s in steps if s["model"] == r["model"] and s["compile"] == r["compile"]
                and "skipped" not in s}
        vs = [f"{r['images_per_s'] / same[n]['images_per_s']:.2f}x" if n in same else "" for n in ("dense", "timm")]
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['row']} | {r['compile']} | {r['images_per_s']:.0f} | "
                     f"{r['step_ms']:.1f} | {r['peak_memory_mib']:.0f} | {mfu} | {vs[0]} | {vs[1]} |")
    lines += ["", "Best of eager and compiled, per model and row:", ""]
    for model in dict.fromkeys(r["model"] for r in steps):
        best = {}
        for r in steps:
            if r["model"] == model and "skipped" not in r:
                if r["row"] not in best or r["images_per_s"] > best[r["row"]]["images_per_s"]:
                    best[r["row"]] = r
        if {"sparse", "dense", "timm"} <= set(best):
            s, d, t = best["sparse"], best["dense"], best["timm"]
            speed = s["images_per_s"]
            lines.append(f"- {model}: sparse {speed:.0f} images/s = {speed / d['images_per_s']:.2f}x dense-masked "
                         f"and {speed / t['images_per_s']:.2f}x timm; peak memory "
                         f"{s['peak_memory_mib'] / d['peak_memory_mib']:.2f}x dense-masked")
    tests = summary.get("tests")
    if tests:
        lines += ["", "## Exactness tests on this device", "", f"`{tests['command']}`", ""]
        if "skipped" in tests:
            lines.append("not run: " + tests["skipped"])
        else:
            lines.append(f"{tests['result']} (exit status {tests['returncode']}; backends that run on this device: "
                         f"{', '.join(tests['backends'])})")
            if tests["output_tail"]:
                lines += ["", "```", tests["output_tail"], "```"]
    check = summary.get("sync_check")
    if check:
        lines += ["", "## Host synchronisation in the training steps", "", f"`{check['command']}`", ""]
        lines.append("not run: " + check["skipped"] if "skipped" in check else
                     f"{check['result']} (exit status {check['returncode']})")
        if check.get("output_tail"):
            lines += ["", "```", check["output_tail"], "```"]
    loader = summary.get("loader", [])
    if loader:
        lines += ["", f"## Input pipeline ({summary['photos']})", "",
                  "images/s of one process (one GPU); scaled decodes in the workers (Pillow), dali in the main "
                  "process", "", "| read from | decoder | workers | images/s | per worker | vs scaled |",
                  "|---|---|---|---|---|---|"]
        scaled = {(r["shards"], r["num_workers"]): r["images_per_s"] for r in loader if r["decoder"] == "scaled"}
        for r in loader:
            per = f"{r['images_per_s_per_worker']:.0f}" if r.get("images_per_s_per_worker") else "-"
            kind = "webdataset shards" if r["shards"] else "image files"
            base = scaled.get((r["shards"], r["num_workers"]))
            vs = f"{r['images_per_s'] / base:.2f}x" if base and r["decoder"] != "scaled" else ""
            lines.append(f"| {kind} | {r['decoder']} | {r['num_workers']} | {r['images_per_s']:.0f} | {per} | {vs} |")
    if summary.get("loader_dali_missing"):
        lines += ["", "dali not measured: " + summary["loader_dali_missing"]]
    run = summary.get("pretrain")
    if run:
        lines += ["", "## pretrain.py", "", f"`{run['command']}`", ""]
        if "images_per_s" in run:
            lines.append(f"{run['steps_done']} steps, {run['images_per_s']:.0f} images/s over the run (loader "
                         f"included), {run['wall_s']:.0f} s wall time with start-up")
        else:
            lines.append("not measured: " + run.get("skipped", "failed") + ("\n\n```\n" + run["failed"] + "\n```"
                                                                              if "failed" in run else ""))
    lines += ["", f"total wall time {summary['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for summary.md and summary.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script")
    parser.add_argument("--budget_s", type=float, default=450, help="stop starting work after this many seconds")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; run with --smoke to check the script on CPU")
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine(), "plan": {k: v for k, v in plan.items()}}

    def save():
        summary["wall_s"] = time.monotonic() - start
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "summary.md").write_text(markdown(summary))

    peak = bench.run_in_process(bench.matmul_peak, "cuda") if plan["device"] == "cuda" else None
    summary["matmul_peak_tflops"] = peak / 1e12 if peak else None
    summary["steps"] = step_table(plan, False, peak, deadline)
    save()
    summary["tests"] = gpu_tests(plan, deadline)
    save()
    summary["sync_check"] = sync_check(plan, deadline)
    save()

    scratch = Path(tempfile.mkdtemp(prefix="fcmae_gpu_bench_"))
    photos = scratch / "photos"
    size = write_photos(photos, plan["images"], plan["image_size"])
    width, height = plan["image_size"]
    summary["photos"] = f"{plan['images']} synthetic JPEGs, {width}x{height}, {size / 1024:.0f} KiB on average"
    shards = scratch / "shards"
    write_shards(photos, shards, per_shard=max(1, plan["images"] // 8), say=lambda _: None)
    decoders, summary["loader_dali_missing"] = loader_decoders()
    summary["loader"] = []
    for data in (photos, shards):  # the same images as files and as webdataset shards
        for decoder in decoders:
            if time.monotonic() >= deadline or (decoder == "dali" and summary["loader_dali_missing"]):
                continue
            try:
                summary["loader"] += loader_rates(plan, data, decoder)
            except Exception as err:  # noqa: BLE001  (a DALI that imports but cannot run here: reported, not fatal)
                if decoder != "dali":
                    raise
                summary["loader_dali_missing"] = f"it failed: {type(err).__name__}: {str(err)[-500:]}"
            save()

    p = plan["pretrain"]
    repeats = -(-p["batch_size"] * p["steps"] // plan["images"])
    summary["pretrain"] = pretrain_run(plan, photos, repeats, args.out, deadline)
    save()

    shutil.rmtree(scratch, ignore_errors=True)
    if not args.smoke:
        summary["steps"] += step_table(plan, True, peak, deadline)
    save()
    print(markdown(summary))


if __name__ == "__main__":
    main()
