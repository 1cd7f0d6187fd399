"""CPU time of a whole training step (zero_grad, forward, backward, AdamW) of FCMAE in two checkouts,
side by side, and their operation counts.

    python benchmarks/ops/step_time.py --before /path/to/other/checkout --rounds 3

Each round runs one subprocess per checkout (PYTHONPATH set to it), in turn, so that machine drift
falls on both alike; a subprocess times every (model, backend) case in float32 on the CPU and
reports its fastest timed step, wall clock and CPU time (the least disturbed by other work on a
shared machine). The figure kept is the median over rounds. Operation counts
(one forward and backward pass, dispatched operations) are taken with this checkout's counter
(fcmae/models/op_count.py, loaded by path) running each checkout's model.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AFTER = HERE.parents[1]
CASES = [("convnextv2_atto", 8), ("convnextv2_base", 2)]  # (model, batch) at 224 px
BACKENDS = ["sparse", "dense"]
COUNTS = [("convnextv2_base", 64, "meta"), ("convnextv2_atto", 2, "cpu")]

WORKER = r"""
import importlib.util, json, sys, time
import torch
import fcmae
from fcmae.models import create_model
from fcmae.optim import pretraining_optimizer
spec = importlib.util.spec_from_file_location("op_count", sys.argv[1])
op_count = importlib.util.module_from_spec(spec); spec.loader.exec_module(op_count)
cases, backends, counts, steps, warmup = json.loads(sys.argv[2])
out = {"step_s": {}, "cpu_s": {}, "ops": {}, "package": fcmae.__file__}
for model_name, batch in cases:
    for backend in backends:
        torch.manual_seed(0)
        model = create_model(model_name, backend=backend)
        gen = torch.Generator().manual_seed(0)
        imgs = torch.randn(batch, 3, 224, 224, generator=gen)
        mask = model.random_mask(imgs, generator=gen)
        optimizer = pretraining_optimizer(model, lr=1e-4, weight_decay=0.05)
        def step():
            optimizer.zero_grad(set_to_none=True)
            model(imgs, mask, num_visible=model.num_visible(imgs))[0].backward()
            optimizer.step()
        for _ in range(warmup):
            step()
        walls, cpus = [], []
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        # the fastest step: the one least disturbed by the machine's other work
        out["step_s"][f"{model_name} b{batch} {backend}"] = min(walls)
        out["cpu_s"][f"{model_name} b{batch} {backend}"] = min(cpus)
for model_name, batch, device in counts:
    for backend in backends:
        c = op_count.count_ops(model_name, backend, batch, (224, 224), device=device)
        out["ops"][f"{model_name} b{batch} {device} {backend}"] = [c.forward, c.backward, c.total]
print(json.dumps(out))
"""


def run(tree, steps, warmup, counts):
    env = {**os.environ, "PYTHONPATH": str(tree)}
    config = json.dumps([CASES, BACKENDS, COUNTS if counts else [], steps, warmup])
    done = subprocess.run([sys.executable, "-c", WORKER, str(AFTER / "fcmae/models/op_count.py"), config],
                          env=env, cwd=tree, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"the checkout {tree} ran the package at {result['package']}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--machine", default="2-core development machine, no GPU, shared with other work")
    parser.add_argument("--out", default=str(HERE / "results" / "step_time"))
    parser.add_argument("--only", nargs="+", default=None, metavar="CASE",
                        help="time only these cases, as MODEL:BACKEND (e.g. convnextv2_atto:sparse); no op counts")
    args = parser.parse_args()
    if args.only:
        CASES[:] = [(m, b) for m, b in CASES if any(o.split(":")[0] == m for o in args.only)]
        BACKENDS[:] = [b for b in BACKENDS if any(o.split(":")[1] == b for o in args.only)]
    trees = {"before": Path(args.before).resolve(), "after": AFTER}
    times = {name: {} for name in trees}
    cpu_times = {name: {} for name in trees}
    ops = {}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            result = run(tree, args.steps, args.warmup, counts=r == 0 and not args.only)
            for case, seconds in result["step_s"].items():
                times[name].setdefault(case, []).append(seconds)
                cpu_times[name].setdefault(case, []).append(result["cpu_s"][case])
            if r == 0:
                ops[name] = result["ops"]
    load.append(os.getloadavg()[0])
    import torch
    record = {"load_average_1min_start_end": load, "machine": args.machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "trees": {k: str(v) for k, v in trees.items()}, "step_s": times, "cpu_s": cpu_times, "ops": ops}
    lines = [f"# Training step on the CPU, before and after ({args.machine})", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, 224 px, mask ratio 0.6; whole step "
             f"(zero_grad, forward, backward, AdamW): the fastest of {args.steps} steps after {args.warmup} warm-up (wall clock, "
             f"and the process's CPU time, both threads), median of "
             f"{args.rounds} interleaved rounds; {record['date']}; 1-minute load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end (the other work's share).", "",
             "| case | before ms | after ms | after / before | CPU ms before | CPU ms after | after / before "
             "| before, each round | after, each round |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for case in times["after"]:
        b, a = (statistics.median(times[n][case]) * 1e3 for n in ("before", "after"))
        cb, ca = (statistics.median(cpu_times[n][case]) * 1e3 for n in ("before", "after"))
        rounds = [", ".join(f"{t * 1e3:.0f}" for t in times[n][case]) for n in ("before", "after")]
        lines.append(f"| {case} | {b:.0f} | {a:.0f} | {a / b:.2f} | {cb:.0f} | {ca:.0f} | {ca / cb:.2f} "
                     f"| {rounds[0]} | {rounds[1]} |")
    if ops.get("after"):
        lines += ["", "Operations dispatched by one forward and backward pass:", "",
                  "| case | before (fwd / bwd / total) | after (fwd / bwd / total) | change |", "|---|---:|---:|---:|"]
    for case in ops.get("after", {}):
        b, a = ops["before"][case], ops["after"][case]
        lines.append(f"| {case} | {b[0]} / {b[1]} / {b[2]} | {a[0]} / {a[1]} / {a[2]} | {100 * (a[2] / b[2] - 1):+.1f}% |")
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
