"""Benchmarks: training-step throughput and memory of the FCMAE backends against timm, and the
input pipeline's images/s.

    python -m fcmae.bench --model convnextv2_atto --batch_size 8 --input_size 224
    python -m fcmae.bench --model convnextv2_base --batch_size 128 --precision bf16 --compile true
    python -m fcmae.bench --data /path/to/images --input_size 224 --num_workers 0 2 4 8

A training step is what pretrain.py does per optimiser step: zero_grad, forward (under autocast
for bf16/fp16), backward and pretrain.py's fused AdamW, with its parameter groups. Rows: one per
encoder backend (the whole FCMAE: encoder, decoder, loss) and `timm`, the reference: timm's
convnextv2_<size> supervised step (cross-entropy on random labels) at the same batch, size and
precision. Each row runs in a fresh process, so its peak memory is its own; all FCMAE rows see the same images and masks.

FLOPs are 3x the forward pass's matmul and convolution FLOPs counted by torch's
FlopCounterMode (the usual rule: the backward pass costs twice the forward); element-wise work
and the optimiser are not counted. For the FCMAE rows they are the sparse backend's, the work
the masked model needs (its depthwise convs counted over the whole zero-filled map, as it runs
them), so the dense row's MFU shows the work it wastes on masked positions. On CUDA the peak is
a measured bf16 matrix product (8192^3), and MFU = FLOPs per second / that peak.
"""
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fcmae.config import COUNT, POSITIVE_INT, ArgumentParser, ConfigError, command_name, number, str2bool
from fcmae.data import (
    DECODERS, DEFAULT_DECODER, PretrainTransform, collate, get_decoder, is_hugging_face, is_shard_source, open_images,
    source_class,
)
from fcmae.models import BACKENDS, ENCODER_STRIDE, create_convnextv2, create_model, list_models, runnable
from fcmae.optim import pretraining_optimizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = ArgumentParser(command_name("bench"), description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", nargs="+", default=["convnextv2_atto"], choices=list_models(), metavar="NAME",
                        help=f"one or more ConvNeXt V2 sizes: {', '.join(list_models())}")
    parser.add_argument("--rows", nargs="+", default=None, choices=[*BACKENDS, "timm"], metavar="ROW",
                        help=f"FCMAE backends and the timm reference: {', '.join([*BACKENDS, 'timm'])} (default: those "
                             "that can run here and, with --compile, compile)")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=8, help="images per step")
    parser.add_argument("--input_size", type=number(int, ENCODER_STRIDE), nargs="+", default=[224], metavar="PX",
                        help="one value for square images, or height and width")
    parser.add_argument("--mask_ratio", type=number(float, 0, 1, high_open=True), default=0.6,
                        help="fraction of the patches removed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run the rows")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast precision")
    parser.add_argument("--compile", default=False, type=str2bool,
                        help="torch.compile each row (FCMAE: fullgraph; compile time reported apart)")
    parser.add_argument("--channels_last", default=False, type=str2bool,
                        help="channels-last weights and inputs for the dense and timm rows (the sparse "
                             "backend works channels-last inside either way)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=COUNT, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=POSITIVE_INT, default=1,
                        help="run the rows this many times in turn and keep the median (evens out machine drift)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the records to FILE")
    # the input pipeline
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="measure the input pipeline on this image folder instead of training steps")
    parser.add_argument("--num_workers", type=COUNT, nargs="+", default=[0, 2],
                        help="with --data: the DataLoader worker counts to measure")
    parser.add_argument("--batches", type=POSITIVE_INT, default=20, help="with --data: timed batches per worker count")
    parser.add_argument("--in_chans", type=POSITIVE_INT, default=3,
                        help="the images' channels (as pretrain.py's --in_chans): the steps' inputs, and --data's")
    parser.add_argument("--decoder", nargs="+", default=[DEFAULT_DECODER], choices=list(DECODERS), metavar="NAME",
                        help=f"with --data: the decoders to measure, of {', '.join(DECODERS)} (default: "
                             f"{DEFAULT_DECODER}, pretrain.py's)")
    # operation counts
    parser.add_argument("--count_ops", nargs="?", const="meta", default=None, choices=["meta", "cpu"],
                        help="instead of timing: count the operations dispatched (each a kernel launch on a GPU) by one "
                             "forward and backward pass of each FCMAE backend, on the meta device (no memory: any size "
                             "and batch at once; the default with the flag alone) or on the CPU")
    # the synchronisation check
    parser.add_argument("--sync_check", nargs="?", const="meta", default=None, choices=["meta", "cuda"],
                        help="instead of timing: run a few steps of pretrain.py and finetune.py on a stand-in for the "
                             "GPU (meta, PyTorch's data-less device; or cuda: a real GPU under CUDA's sync debug mode) "
                             "and report every host synchronisation inside a step or evaluation batch; exit status 1 "
                             "if any (default with the flag alone: meta)")
    parser.add_argument("--pretrain_script", default=None, metavar="PATH",
                        help="with --sync_check: the pretrain.py to check (default: the one beside the fcmae package)")
    parser.add_argument("--finetune_script", default=None, metavar="PATH",
                        help="with --sync_check: the finetune.py to check (default: the one beside the fcmae package)")
    args = parser.parse_args(argv)
    if len(args.input_size) not in (1, 2):
        parser.error("--input_size takes one value (square) or two (height width)")
    if any(s % ENCODER_STRIDE for s in args.input_size):
        parser.error(f"--input_size must be a multiple of {ENCODER_STRIDE} (the patch size), got {args.input_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.rows is None:  # every backend that runs here (and compiles, with --compile), and timm
        args.rows = [b.name for b in runnable(args.device, args.compile)] + ["timm"]
    for backend in (BACKENDS[row] for row in args.rows if row in BACKENDS):
        reason = backend.cannot_run(args.device)  # the backend's own sentence: not installed, a CPU-only build, ...
        if reason:
            parser.error(reason)
        if args.compile and not backend.compiles:
            parser.error(backend.compile_refusal(f"the {backend.name} row", "leave it out of --rows, or --compile off"))
    readable = args.data is None or Path(args.data).is_dir() or is_shard_source(args.data) or is_hugging_face(args.data)
    if not readable:
        parser.error(f"--data {args.data} is neither a folder of images nor shards nor a Hugging Face dataset")
    return args


def image_size(args):
    return tuple((args.input_size * 2)[:2])


# ----- training steps -----------------------------------------------------------------------------

def build_step(args, model_name, row, device):
    """(step function, model, forward FLOPs per step) of one row, before any compilation."""
    height, width = image_size(args)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(args.batch_size, args.in_chans, height, width, generator=gen).to(device)
    channels_last = args.channels_last and row in ("dense", "timm")
    if channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    if row == "timm":
        model = create_convnextv2(model_name, in_chans=args.in_chans).to(device)
        labels = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)

        def forward():
            return F.cross_entropy(model(imgs), labels)
    else:
        model = create_model(model_name, backend=row, mask_ratio=args.mask_ratio, in_chans=args.in_chans).to(device)
        mask = model.random_mask(imgs.cpu(), generator=gen).to(device)
        num_visible = model.num_visible(imgs)

        def forward():
            return model(imgs, mask, num_visible=num_visible)[0]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = pretraining_optimizer(model, lr=1e-4, weight_decay=0.05)  # pretrain.py's, groups included
    dtype = PRECISIONS[args.precision]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = forward()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if row in ("timm", "sparse"):
            forward()
        else:  # the FCMAE rows are credited with the work the masked model needs: the sparse backend's
            model.set_backend("sparse")
            forward()
            model.set_backend(row)
    return step, model, counter.get_total_flops()


def measure_row(args, model_name, row):
    """Times and peak memory of one row; runs in a process of its own."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the training scripts: cuDNN picks its fastest conv algorithms
    step, model, forward_flops = build_step(args, model_name, row, device)
    if args.compile:
        model.compile(fullgraph=True) if row != "timm" else model.compile()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baseline = current_rss()  # model, optimiser state (empty) and inputs, before any step
    start = time.perf_counter()
    for _ in range(max(args.warmup, 1 if args.compile else 0)):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # growth of the process's peak resident memory over its state before the first step
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"step_s": step_s, "peak_bytes": peak, "warmup_s": warmup_s, "flops": 3 * forward_flops}


def current_rss():
    """Resident memory of this process now, in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def matmul_peak(device, size=8192, repeats=20):
    """Measured bf16 matrix-product rate of the GPU, FLOP/s (median of `repeats`, random inputs,
    rotating among three input sets so that no product reads another's output from the cache)."""
    pairs = [(torch.randn(size, size, device=device, dtype=torch.bfloat16),
              torch.randn(size, size, device=device, dtype=torch.bfloat16)) for _ in range(3)]
    for a, b in pairs:
        a @ b
    times = []
    for i in range(repeats):
        a, b = pairs[i % 3]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size ** 3 / statistics.median(times)


def run_in_process(function, *args, timeout=None):
    """function(*args) in a fresh process; TimeoutError after `timeout` seconds (the process is ended)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(function, args).get(timeout)


def describe_device(device):
    if device == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} torch threads"


def bench_steps(args, peak=None, deadline=None):
    """Records of every (model, row); `peak`: the matmul peak in FLOP/s (measured when None on
    CUDA); `deadline` (time.monotonic): rows that would end after it are skipped and say so."""
    height, width = image_size(args)
    if peak is None and args.device == "cuda":
        peak = run_in_process(matmul_peak, "cuda")
    records = []
    for model_name in args.model:
        results = {row: [] for row in args.rows}
        for _ in range(args.rounds):
            for row in args.rows:
                timeout = None if deadline is None else deadline - time.monotonic()
                try:
                    if timeout is not None and timeout <= 0:
                        raise multiprocessing.TimeoutError
                    results[row].append(run_in_process(measure_row, args, model_name, row, timeout=timeout))
                except multiprocessing.TimeoutError:
                    pass
        for row in args.rows:
            record = {
                "model": model_name, "row": row, "batch_size": args.batch_size, "input_size": [height, width],
                "mask_ratio": args.mask_ratio if row != "timm" else None, "precision": args.precision,
                "compile": args.compile, "channels_last": args.channels_last and row in ("dense", "timm"),
                "device": describe_device(args.device), "torch": torch.__version__,
                "matmul_peak_tflops": peak / 1e12 if peak else None,
            }
            if not results[row]:
                records.append({**record, "skipped": "out of time"})
                continue
            runs = sorted(results[row], key=lambda r: r["step_s"])
            median = runs[len(runs) // 2]
            flops = median["flops"]
            records.append({
                **record, "step_ms": median["step_s"] * 1e3, "images_per_s": args.batch_size / median["step_s"],
                "peak_memory_mib": max(r["peak_bytes"] for r in runs) / 2 ** 20,
                "warmup_s": median["warmup_s"], "gflop_per_image": flops / args.batch_size / 1e9,
                "mfu": flops / median["step_s"] / peak if peak else None,
            })
    return records


def print_steps(args, records):
    height, width = image_size(args)
    memory_kind = "peak CUDA mem" if args.device == "cuda" else "peak RSS growth"
    peak = records[0]["matmul_peak_tflops"]
    print(f"batch {args.batch_size}, {height}x{width}, {args.in_chans} channels, mask ratio {args.mask_ratio}, "
          f"{args.precision}"
          f"{', compiled' if args.compile else ''}{', channels-last' if args.channels_last else ''}, "
          f"{describe_device(args.device)}, torch {torch.__version__}"
          + (f"; bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print(f"whole training step (forward, backward, AdamW), mean of {args.steps} steps, median of "
          f"{args.rounds} round(s)")
    print(f"{'model':<18}{'row':<10}{'step ms':>10}{'images/s':>10}{memory_kind:>20}{'GFLOP/img':>11}"
          f"{'MFU':>7}{'vs dense':>10}{'vs timm':>9}")
    for record in records:
        if "skipped" in record:
            print(f"{record['model']:<18}{record['row']:<10}  not measured: {record['skipped']}")
            continue
        same = {r["row"]: r for r in records if r["model"] == record["model"] and "skipped" not in r}
        ratio = {name: (f"{record['images_per_s'] / same[name]['images_per_s']:.2f}x" if name in same else "")
                 for name in ("dense", "timm")}
        mfu = f"{100 * record['mfu']:.0f}%" if record["mfu"] is not None else "-"
        print(f"{record['model']:<18}{record['row']:<10}{record['step_ms']:>10.1f}{record['images_per_s']:>10.1f}"
              f"{record['peak_memory_mib']:>16.0f} MiB{record['gflop_per_image']:>11.2f}{mfu:>7}"
              f"{ratio['dense']:>10}{ratio['timm']:>9}")


# ----- the input pipeline -------------------------------------------------------------------------

def loader_rate(data, input_size, batch_size, num_workers, batches, decoder=DEFAULT_DECODER, device="cpu",
                in_chans=3):
    """Images/s of pretrain.py's input pipeline (read, crop, decode, flip, collate in the workers;
    conversion and normalisation, and an on-device decoder's decoding, in the main process) with
    `num_workers` workers, after the first batch (worker start-up) is out of the way. Images of
    `in_chans` channels (other than 1 and 3: normalised by 0 and 1, which costs what any
    statistics cost)."""
    stats = (None, None) if in_chans in (1, 3) else ((0.0,) * in_chans, (1.0,) * in_chans)
    dataset = open_images(data, PretrainTransform(input_size, in_chans, *stats), decoder=get_decoder(decoder),
                          flag="--data")
    if hasattr(dataset.source, "repeats"):  # repeat small random-access data: enough images for every batch
        dataset.source.repeats = -(-(batches + 1) * batch_size // len(dataset))
    sampler = dataset.batch_sampler(batch_size, 1, 1, 0, seed=0)
    if sampler.steps < batches + 1:
        raise ConfigError(f"--data {data} holds {len(dataset)} images, fewer than {batches + 1} batches of "
                          f"{batch_size}; lower --batches or --batch_size")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = dataset.decode_ahead(iter(loader), device)  # as the training loop takes them (dali: a batch ahead)
    dataset.prepare(next(it), device)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        dataset.prepare(next(it), device)
    sync()
    return batches * batch_size / (time.perf_counter() - start)


def bench_loader(args):
    size = image_size(args)
    device = torch.device(args.device)
    records = []
    kind = source_class(args.data).kind
    for decoder in args.decoder:
        for workers in args.num_workers:
            rate = loader_rate(args.data, size, args.batch_size, workers, args.batches, decoder, device, args.in_chans)
            records.append({"data": str(args.data), "source": kind, "shards": kind == "shards", "decoder": decoder,
                            "in_chans": args.in_chans,
                            "input_size": list(size), "batch_size": args.batch_size,
                            "device": describe_device(args.device),
                            "num_workers": workers, "images_per_s": rate,
                            "images_per_s_per_worker": rate / workers if workers else None})
    print(f"input pipeline on {args.data} ({kind}): {args.in_chans} channels, RandomResizedCrop to "
          f"{size[0]}x{size[1]}, flip, to {args.device}, normalised there; batch {args.batch_size}, {args.batches} "
          "batches")
    print(f"{'decoder':>8}{'workers':>8}{'images/s':>12}{'per worker':>12}")
    for r in records:
        per = f"{r['images_per_s_per_worker']:.1f}" if r["num_workers"] else "-"
        print(f"{r['decoder']:>8}{r['num_workers']:>8}{r['images_per_s']:>12.1f}{per:>12}")
    return records


def sync_check(args):
    """--sync_check: the report of fcmae.training.sync_check; its exit status."""
    from fcmae.training import sync_check
    scripts = sync_check.default_scripts()
    for name, given in (("pretrain.py", args.pretrain_script), ("finetune.py", args.finetune_script)):
        scripts[name] = Path(given) if given else scripts[name]
        if not scripts[name].is_file():
            raise SystemExit(f"{command_name('bench')}: error: --sync_check runs {name}, and {scripts[name]} does not "
                             f"exist; name it with --{name.split('.')[0]}_script")
    if args.sync_check == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{command_name('bench')}: error: --sync_check cuda needs a CUDA GPU, and torch sees none; "
                         "use --sync_check alone (the meta device stands in for it)")
    return sync_check.main(scripts, args.sync_check)


def count_ops(args):
    """--count_ops: records of the operations per forward and backward pass of every (model,
    backend) that runs here, and a table of them."""
    from fcmae.models.op_count import count_ops as count
    height, width = image_size(args)
    backends = [row for row in args.rows if row in BACKENDS]
    if args.count_ops == "meta":  # the pure-PyTorch backends (those torch.compile traces) run on the meta device
        backends = [b for b in backends if BACKENDS[b].compiles]
    records = []
    for model_name in args.model:
        for backend in backends:
            c = count(model_name, backend, args.batch_size, (height, width), args.mask_ratio, args.count_ops)
            records.append({"model": model_name, "row": backend, "batch_size": args.batch_size,
                            "input_size": [height, width], "mask_ratio": args.mask_ratio, "device": args.count_ops,
                            "torch": torch.__version__, "forward_ops": c.forward, "backward_ops": c.backward,
                            "total_ops": c.total})
    print(f"operations dispatched per forward and backward pass: batch {args.batch_size}, {height}x{width}, mask "
          f"ratio {args.mask_ratio}, {args.count_ops} device, torch {torch.__version__}")
    print(f"{'model':<18}{'row':<10}{'forward':>10}{'backward':>10}{'total':>10}")
    for r in records:
        print(f"{r['model']:<18}{r['row']:<10}{r['forward_ops']:>10}{r['backward_ops']:>10}{r['total_ops']:>10}")
    return records


def main(argv=None):
    args = parse_args(argv)
    if args.count_ops is not None:
        records = count_ops(args)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        return records
    if args.sync_check is not None:
        code = sync_check(args)
        if code:
            raise SystemExit(code)
        return []
    if args.data is not None:
        try:
            records = bench_loader(args)
        except ConfigError as err:
            raise SystemExit(f"python -m fcmae.bench: error: {err}") from None
    else:
        records = bench_steps(args)
        print_steps(args, records)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
