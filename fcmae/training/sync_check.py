"""The synchronisation check: do the training scripts' steps ever make the host wait for the GPU?

`python -m fcmae.bench --sync_check` runs pretrain.py (two micro-steps per optimiser step, its
held-out loss and k-NN monitor) and finetune.py (Mixup/CutMix, label smoothing, gradient clipping, EMA, an evaluation with the EMA
weights) for a few steps each on small images it writes, and reports every operation inside a
step or an evaluation batch (fcmae.training.waits.no_wait) that would make a CUDA host wait:

- a scalar read of a device tensor (`.item()`, `float()`, `int()`, `bool()`, `.tolist()`);
- an operation whose output shape depends on the data (`nonzero`, `masked_select`, `unique`,
  boolean indexing, `repeat_interleave` without its output size);
- a copy from the host to the device out of unpinned memory or without `non_blocking`,
  including `torch.tensor(..., device=...)`, `torch.as_tensor(..., device=...)` and
  `Tensor.new_tensor`;
- any copy from the device to the host.

Without a GPU the steps run on a stand-in device, PyTorch's meta device: tensors with shapes and
dtypes but no data, on which every operation is seen by a TorchDispatchMode. Host tensors count as
pinned when the engine's DataLoader would pin them on CUDA (its batches, with --pin_mem). What
the meta device cannot compute is stood in for: a scalar read gives 0, a copy to the host gives
zeros, nonzero assumes every element is non-zero. Each finding names its source line. The
designed waits (fcmae.training.waits.designed_wait: loss read-backs, checkpoints, evaluation
totals, pictures) are counted apart; what happens outside steps (set-up, exports) is not checked.
The meta device knows no autocast, so the stand-in runs in float32.

On a CUDA GPU (`--device cuda`) the same steps run for real, in bf16 (pretraining) and fp16 with
its gradient scaler (fine-tuning), under torch.cuda.set_sync_debug_mode("error") inside the
`no_wait` regions: the first synchronisation stops the check with its traceback.
"""
import contextlib
import importlib.util
import io
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from fcmae.training import waits

# operations whose output size depends on the data: the host waits to learn it
DATA_DEPENDENT = {
    "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::bincount", "aten::nonzero_numpy", "aten::argwhere",
}
SCALAR_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
COPIES = {"aten::_to_copy", "aten::copy_"}
LIBRARY = Path(torch.__file__).parent  # frames in torch itself never name a finding
THIS_FILE = Path(__file__).resolve()


@dataclass
class Finding:
    problem: str   # what would wait
    where: str     # the source line, "path:line in function"
    region: str    # the no_wait region's name
    count: int = 1


@dataclass
class Report:
    findings: list = field(default_factory=list)
    regions: Counter = field(default_factory=Counter)    # no_wait regions entered, by name
    designed: Counter = field(default_factory=Counter)   # designed_wait regions that waited, by name
    failures: list = field(default_factory=list)         # scripts that did not run to their end

    def summary(self):
        checked = ", ".join(f"{n} {plural(name, n)}" for name, n in self.regions.items()) or "nothing"
        designed = ", ".join(f"{name} {n}" for name, n in self.designed.items()) or "none"
        return checked, designed


def plural(name, n):
    return name if n == 1 else name + ("es" if name.endswith("ch") else "s")


def source_line(project_roots):
    """'file:line in function' of the innermost frame outside torch and this module; when that
    frame is in another library, the innermost frame of the project's own code is added."""
    frames = [f for f in traceback.extract_stack()
              if not Path(f.filename).resolve().is_relative_to(LIBRARY) and Path(f.filename).resolve() != THIS_FILE
              and "contextlib" not in f.filename]
    if not frames:
        return "an unknown line"

    def name(frame):
        return f"{frame.filename}:{frame.lineno} in {frame.name}"

    inner = frames[-1]
    ours = [f for f in frames if any(Path(f.filename).resolve().is_relative_to(r) for r in project_roots)]
    if ours and ours[-1] is not inner:
        return f"{name(inner)}, called from {name(ours[-1])}"
    return name(inner)


class StandIn(TorchDispatchMode):
    """The meta device standing in for a GPU, and the watcher of the waits' regions (see the module's
    text). The engine asks `Run.stand_in` for its device and passes its loaders through `loader`."""

    def __init__(self, project_roots):
        super().__init__()
        self.device = torch.device("meta")
        self.report = Report()
        self.project_roots = [Path(r).resolve() for r in project_roots]
        self.stack = []            # the regions entered, innermost last
        self.waited = False        # whether the innermost designed_wait region waited
        self.pinned = set()        # storage addresses of host tensors the loader would pin on CUDA
        self.keep_alive = []       # their storages, so that no address is reused while the check runs
        self.quiet = 0             # inside a wrapped factory that already reported its copy

    # ----- regions (fcmae.training.waits) -------------------------------------------------------
    def enter(self, kind, what):
        self.stack.append((kind, what))
        if kind == waits.NO_WAIT:
            self.report.regions[what] += 1
        else:
            self.waited = False

    def exit(self, kind, what):
        self.stack.pop()
        if kind == waits.DESIGNED_WAIT and self.waited:
            self.report.designed[what] += 1
            self.waited = False

    def wait(self, problem):
        """An operation that would make the host wait: a finding inside a step, counted inside a
        designed wait, ignored elsewhere."""
        if not self.stack:
            return
        kind, what = self.stack[-1]
        if kind == waits.DESIGNED_WAIT:
            self.waited = True
            return
        where = source_line(self.project_roots)
        for finding in self.report.findings:
            if (finding.problem, finding.where, finding.region) == (problem, where, what):
                finding.count += 1
                return
        self.report.findings.append(Finding(problem, where, what))

    # ----- the loader ---------------------------------------------------------------------------
    def loader(self, loader, pin):
        """`loader`, whose batches' tensors count as pinned when `pin` (as the engine's DataLoader
        pins them on CUDA with --pin_mem)."""
        return PinnedBatches(self, loader) if pin else loader

    def mark_pinned(self, batch):
        for value in batch:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                self.keep_alive.append(storage)
                self.pinned.add(storage.data_ptr())
        return batch

    def is_pinned(self, tensor):
        return tensor.untyped_storage().data_ptr() in self.pinned

    # ----- operations ---------------------------------------------------------------------------
    def on_device(self, value):
        return isinstance(value, torch.Tensor) and value.device.type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SCALAR_READS and any(self.on_device(a) for a in args):
            self.wait(f"reads a device value on the host ({name.split('::')[1]}: .item(), float(), int(), bool(), "
                      ".tolist() or a comparison)")
            return stand_in_scalar(args[0]) if name == "aten::_local_scalar_dense" else False
        data_dependent = None
        if name in DATA_DEPENDENT and any(self.on_device(a) for a in args):
            data_dependent = f"has an output size that depends on the data ({name.split('::')[1]})"
        elif name == "aten::index" and any(self.on_device(a) and a.dtype in (torch.bool, torch.uint8)
                                           for a in args[1] if a is not None):
            data_dependent = "indexes with a boolean mask (its output size depends on the data)"
        elif name == "aten::repeat_interleave" and self.on_device(args[0]) and kwargs.get("output_size") is None:
            data_dependent = "repeats by counts on the device without output_size (its output size depends on the data)"
        if data_dependent:
            self.wait(data_dependent)
            try:
                return func(*args, **kwargs)
            except (NotImplementedError, RuntimeError) as err:  # most have no meta implementation
                raise StandInLimit(f"the meta device cannot run {name} (an output size that depends on the "
                                   "data), so the check stops here") from err
        if name in COPIES:
            source, target = (args[0], kwargs.get("device") or args[0].device) if name == "aten::_to_copy" \
                else (args[1], args[0].device)
            non_blocking = kwargs.get("non_blocking", args[2] if name == "aten::copy_" and len(args) > 2 else False)
            if self.on_device(source) and target.type == "cpu":
                self.wait("copies from the device to the host")
                return (torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
                        if name == "aten::_to_copy" else args[0])
            if source.device.type == "cpu" and target.type == self.device.type and not self.quiet:
                if not non_blocking:
                    self.wait("copies from the host to the device without non_blocking=True")
                elif not self.is_pinned(source):
                    self.wait("copies from the host to the device out of unpinned (pageable) memory")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self):
        """Inside the block: every operation seen, the regions followed, and the meta device made
        able to run what the check needs (fused optimisers, nonzero)."""
        with fused_kernels_on_meta(), nonzero_on_meta(), self.factories(), self, waits.watching(self):
            yield self

    @contextlib.contextmanager
    def factories(self):
        """torch.tensor, torch.as_tensor and Tensor.new_tensor build their tensors from Python data
        inside C++, unseen by a dispatch mode: wrapped while the check runs."""
        originals = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}
        original_new = torch.Tensor.new_tensor

        def wrap(name, function):
            def factory(data, *args, **kwargs):
                device = kwargs.get("device", args[1] if name == "as_tensor" and len(args) > 1 else None)
                already = isinstance(data, torch.Tensor) and device is not None and data.device == torch.device(device)
                if device is not None and torch.device(device).type == self.device.type and not already:
                    self.wait(f"torch.{name}(..., device=...) copies Python data from pageable host memory")
                self.quiet += 1
                try:
                    return function(data, *args, **kwargs)
                finally:
                    self.quiet -= 1
            return factory

        def new_tensor(tensor, data, *args, **kwargs):
            device = kwargs.get("device", tensor.device)
            if torch.device(device).type == self.device.type:
                self.wait("Tensor.new_tensor copies Python data from pageable host memory")
            self.quiet += 1
            try:
                return original_new(tensor, data, *args, **kwargs)
            finally:
                self.quiet -= 1

        torch.tensor, torch.as_tensor = wrap("tensor", torch.tensor), wrap("as_tensor", torch.as_tensor)
        torch.Tensor.new_tensor = new_tensor
        try:
            yield
        finally:
            torch.tensor, torch.as_tensor = originals["tensor"], originals["as_tensor"]
            torch.Tensor.new_tensor = original_new


class StandInLimit(RuntimeError):
    """What the meta device cannot run, after its finding is recorded."""


class PinnedBatches:
    """A DataLoader whose batches the stand-in counts as pinned."""

    def __init__(self, stand_in, loader):
        self.stand_in, self.loader = stand_in, loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return map(self.stand_in.mark_pinned, iter(self.loader))


def stand_in_scalar(tensor):
    """What a scalar read of a meta tensor gives in the check: 0 of its kind."""
    if tensor.dtype == torch.bool:
        return False
    return 0.0 if tensor.dtype.is_floating_point or tensor.dtype.is_complex else 0


@contextlib.contextmanager
def fused_kernels_on_meta():
    """torch's fused optimiser kernels have meta implementations, but torch.optim refuses a
    device missing from its list: the list has the meta device too while the check runs."""
    from torch.optim import optimizer
    original = optimizer._get_fused_kernels_supported_devices
    optimizer._get_fused_kernels_supported_devices = lambda: [*original(), "meta"]
    try:
        yield
    finally:
        optimizer._get_fused_kernels_supported_devices = original


@contextlib.contextmanager
def nonzero_on_meta():
    """nonzero on the meta device assumes every element non-zero (its result's largest shape)."""
    from torch.fx.experimental import _config
    previous = _config.meta_nonzero_assume_all_nonzero
    _config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        _config.meta_nonzero_assume_all_nonzero = previous


@contextlib.contextmanager
def fresh_accelerator_state():
    """accelerate fixes a process's precision at its first Accelerator; each checked run has its own."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    reset()
    try:
        yield
    finally:
        reset()


class SyncDebug:
    """On CUDA: torch.cuda.set_sync_debug_mode("error") inside the no_wait regions only."""

    def __init__(self):
        self.report = Report()
        self.stack = []

    def enter(self, kind, what):
        self.stack.append(kind)
        if kind == waits.NO_WAIT:
            self.report.regions[what] += 1
        torch.cuda.set_sync_debug_mode("error" if kind == waits.NO_WAIT else "default")

    def exit(self, kind, what):
        self.stack.pop()
        torch.cuda.set_sync_debug_mode("error" if self.stack and self.stack[-1] == waits.NO_WAIT else "default")


# ----- the scripts' runs --------------------------------------------------------------------------

def write_images(folder, count, size=72, classes=("a", "b")):
    """`count` small RGB images with some structure, in class sub-folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        sub = Path(folder) / classes[i % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        base = np.stack([np.sin(6 * xx + i), yy * rng.uniform(), xx * yy], -1) * 0.5 + 0.5
        pixels = np.clip((base + rng.normal(0, 0.05, base.shape)) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"img_{i:03d}.png")
    return Path(folder)


def runs(scratch, device):
    """(script name, argv) of the checked runs: 3 optimiser steps of 2 micro-steps each, a loss
    read-back after the second and at the end, a checkpoint, pictures, the held-out loss and the
    k-NN monitor; fine-tuning with the shipped configs' Mixup/CutMix, smoothing and EMA, clipping,
    then an evaluation of the model and the EMA weights whose last batch is smaller."""
    train = write_images(scratch / "train", 12)
    held_out = write_images(scratch / "eval", 3)
    common = ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--update_freq", "2",
              "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--log_with", "none",
              "--log_every", "2", "--device", "cpu" if device.type != "cuda" else "cuda"]
    pretrain = [*common, "--data_path", str(train), "--decoder_embed_dim", "64", "--output_dir",
                str(scratch / "pretrain"), "--eval_data_path", str(held_out), "--knn_train_path", str(train),
                "--knn_eval_path", str(held_out), "--knn_k", "4"]
    finetune = [*common, "--data_set", "image_folder", "--data_path", str(train), "--eval_data_path",
                str(held_out), "--nb_classes", "2", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1",
                "--model_ema", "true", "--model_ema_eval", "true", "--clip_grad", "1.0", "--output_dir",
                str(scratch / "finetune")]
    if device.type == "cuda":  # the precisions of the shipped GPU configs, and fp16's gradient scaler
        pretrain += ["--mixed_precision", "bf16"]
        finetune += ["--mixed_precision", "fp16"]
    return [("pretrain.py", pretrain), ("finetune.py", finetune)]


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"_sync_checked_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(scripts, device="meta"):
    """Run each of `scripts` ({"pretrain.py": path, "finetune.py": path}) for a few steps on
    `device` ("meta": the stand-in; "cuda": a real GPU under sync debug mode) and return the Report."""
    from fcmae.training.engine import Run  # the engine imports this package's modules; late, no cycle
    device = torch.device(device)
    roots = [Path(__file__).resolve().parents[1], *(Path(p).resolve().parent for p in scripts.values())]
    watcher = StandIn(roots) if device.type == "meta" else SyncDebug()
    with tempfile.TemporaryDirectory(prefix="fcmae_sync_check_") as scratch:
        for name, argv in runs(Path(scratch), device):
            module, said = load_script(scripts[name]), io.StringIO()
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(fresh_accelerator_state())
                    if device.type == "meta":
                        Run.stand_in = watcher
                        stack.callback(setattr, Run, "stand_in", None)
                        stack.enter_context(watcher.watching())
                    else:
                        stack.enter_context(waits.watching(watcher))
                    stack.enter_context(contextlib.redirect_stdout(said))  # the scripts' own lines: kept for
                    stack.enter_context(contextlib.redirect_stderr(said))  # a run that fails, else quiet
                    module.main(argv)
            except SystemExit as stop:
                if stop.code not in (0, None):
                    watcher.report.failures.append(f"{name} stopped with exit code {stop.code}: "
                                                   f"{said.getvalue().strip()[-2000:]}")
            except Exception as err:  # noqa: BLE001  (reported: a sync under CUDA's debug mode, or a stand-in limit)
                where = traceback.extract_tb(err.__traceback__)
                line = next((f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(where)
                             if not Path(f.filename).resolve().is_relative_to(LIBRARY)), "?")
                watcher.report.failures.append(f"{name} stopped at {line}: {type(err).__name__}: "
                                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    return watcher.report


def default_scripts():
    """pretrain.py and finetune.py beside the fcmae package (a checkout, or an editable install)."""
    root = Path(__file__).resolve().parents[2]
    return {"pretrain.py": root / "pretrain.py", "finetune.py": root / "finetune.py"}


def main(scripts, device="meta", say=print):
    """Print the report; 0 when nothing waits, 1 otherwise."""
    report = check(scripts, device)
    for finding in report.findings:
        times = f", {finding.count} times" if finding.count > 1 else ""
        say(f"{finding.where}: {finding.problem} (in an {finding.region}{times})")
    for failure in report.failures:
        say(f"not checked to the end: {failure}")
    checked, designed = report.summary()
    steps = report.regions["optimiser step"]
    batches = ", ".join(f"{n} {what.removesuffix(' batch')}" for what, n in report.regions.items()
                        if what != "optimiser step")
    if report.findings or report.failures:
        say(f"{len(report.findings)} host synchronisation(s) found in {checked}; designed waits: {designed}")
        return 1
    say(f"no host synchronisation in {steps} steps and {sum(report.regions.values()) - steps} batches ({batches}) "
        f"on the {device} device; designed waits, outside them: {designed}")
    return 0

