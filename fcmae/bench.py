"""Benchmark the encoder backends: whole-FCMAE forward+backward step time and peak memory.

    python -m fcmae.bench --model convnextv2_atto --batch-size 8 --input-size 224

Each backend runs in a fresh process, so its peak memory is its own; all see the same images
and masks. A step is zero_grad, forward (under autocast for bf16/fp16) and backward; the
optimiser step is left out (it is the same for every backend).
"""
import argparse
import multiprocessing
import resource
import statistics
import sys
import time

import torch

from fcmae.models import BACKENDS, create_model, list_models
from fcmae.models.backends import minkowski


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fcmae.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnextv2_atto", choices=list_models())
    installed = [b for b in BACKENDS if b != "minkowski" or minkowski.is_available()]
    parser.add_argument("--backends", nargs="+", default=installed, choices=list(BACKENDS),
                        help=f"default: the installed ones ({', '.join(installed)})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="PX",
                        help="one value for square images, or height and width")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the backends this many times in turn (evens out machine drift)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if len(args.input_size) not in (1, 2):
        parser.error("--input-size takes one value (square) or two (height width)")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")
    return args


def measure(args, backend):
    """Time `args.steps` steps of one backend; runs in its own process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = (args.input_size * 2)[:2]
    torch.manual_seed(0)
    model = create_model(args.model, backend=backend, img_size=(height, width), mask_ratio=args.mask_ratio)
    model.to(device)
    imgs = torch.randn(args.batch_size, 3, height, width, device=device)
    mask = model.random_mask(imgs)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(imgs, mask)
        loss.backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baseline = current_rss()  # model, optimiser-free state and inputs, before any step
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # growth of the process's peak resident memory over its state before the first step
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return times, peak


def current_rss():
    """Resident memory of this process now, in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def describe_device(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} torch threads"


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    ctx = multiprocessing.get_context("spawn")
    times = {b: [] for b in args.backends}
    peaks = {b: 0 for b in args.backends}
    for _ in range(args.rounds):
        for backend in args.backends:
            with ctx.Pool(1) as pool:
                step_times, peak = pool.apply(measure, (args, backend))
            times[backend] += step_times
            peaks[backend] = max(peaks[backend], peak)

    height, width = (args.input_size * 2)[:2]
    memory_kind = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{args.model}, batch {args.batch_size}, {height}x{width}, mask ratio {args.mask_ratio}, "
          f"{args.precision}, {describe_device(args.device)}, torch {torch.__version__}")
    print(f"whole FCMAE forward+backward, median of {args.steps * args.rounds} steps")
    print(f"{'backend':<10}{'step ms':>10}{'images/s':>10}{memory_kind:>20}{'vs ' + args.backends[0]:>10}")
    first = statistics.median(times[args.backends[0]])
    for backend in args.backends:
        median = statistics.median(times[backend])
        print(f"{backend:<10}{median * 1e3:>10.1f}{args.batch_size / median:>10.1f}"
              f"{peaks[backend] / 2**20:>17.0f} MiB{first / median:>9.2f}x")


if __name__ == "__main__":
    main()
