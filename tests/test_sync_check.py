"""The synchronisation check: nothing in a training step or an evaluation batch makes the host wait
for the GPU, checked on the meta device standing in for it (fcmae.training.sync_check)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.cli import benchmark
from fcmae.training import waits
from fcmae.training.sync_check import StandIn, StandInLimit

ROOT = Path(__file__).resolve().parents[1]


def test_the_training_scripts_never_wait_for_the_device():
    """As a user runs it: pretrain.py (2 micro-steps a step, the held-out loss, the k-NN monitor) and
    finetune.py (Mixup/CutMix, EMA, clipping, an evaluation of the model and the EMA weights) on
    the stand-in."""
    result = subprocess.run([sys.executable, "-m", "fcmae.bench", "--sync_check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("no host synchronisation in 6 steps and 16 batches (2 held-out, 8 k-NN, 6 evaluation)"), last
    for designed in ("loss read-back", "checkpoint", "evaluation totals", "reconstruction picture", "held-out totals",
                     "k-NN totals"):
        assert designed in last  # counted apart, not hidden


def copy_with(script, tmp_path, anchor, inserted):
    """A copy of `script` with `inserted` placed before the line `anchor`; (path, inserted line number)."""
    lines = (ROOT / script).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == anchor)
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at, indent + inserted)
    path = tmp_path / script
    path.write_text("\n".join(lines) + "\n")
    return path, at + 1


def test_a_wait_placed_in_a_step_is_found_and_its_line_named(tmp_path, capsys):
    pretrain, pretrain_line = copy_with("pretrain.py", tmp_path, "return loss, n_skipped",
                                        "float(loss), torch.tensor(1.0, device=run.device)")
    finetune, finetune_line = copy_with("finetune.py", tmp_path, "return criterion(model(imgs), labels), n_skipped",
                                        "labels.sum().item()")
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--sync_check", "--pretrain_script", str(pretrain), "--finetune_script", str(finetune)])
    assert stop.value.code == 1
    said = capsys.readouterr().out.splitlines()
    found = [line for line in said if line.startswith(str(tmp_path))]
    assert len(found) == 3, said
    assert f"{pretrain}:{pretrain_line} in micro_step: reads a device value on the host" in found[0]
    assert f"{pretrain}:{pretrain_line} in micro_step: torch.tensor(..., device=...) copies" in found[1]
    assert f"{finetune}:{finetune_line} in micro_step: reads a device value on the host" in found[2]
    assert all("(in an optimiser step, 6 times)" in line for line in found)  # 3 steps of 2 micro-steps
    assert said[-1].startswith("3 host synchronisation(s) found in 6 optimiser steps, 2 held-out batches")


def test_a_missing_script_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--sync_check", "--pretrain_script", str(tmp_path / "nowhere.py")])
    assert "does not exist; name it with --pretrain_script" in str(stop.value.code)


def findings(step, *, pinned=(), designed=None):
    """The problems the stand-in finds in `step()` run inside a no_wait region (or a designed one)."""
    stand_in = StandIn([Path(__file__).parent])
    for tensor in pinned:
        stand_in.mark_pinned([tensor])
    region = waits.designed_wait(designed) if designed else waits.no_wait("optimiser step")
    with stand_in.watching(), region:
        try:
            step()
        except StandInLimit:  # found, and not computable without data
            pass
    return [f.problem for f in stand_in.report.findings], stand_in.report


META = torch.device("meta")


def test_what_makes_the_host_wait_is_found_and_what_does_not_is_not():
    host, pinned = torch.ones(4), torch.ones(4)
    device = torch.ones(4, device=META)
    cases = {
        "copies from the host to the device out of unpinned (pageable) memory": lambda: host.to(META, non_blocking=True),
        "copies from the host to the device without non_blocking=True": lambda: pinned.to(META),
        "copies from the device to the host": lambda: device.cpu(),
        "reads a device value on the host": lambda: device.sum().item(),
        "has an output size that depends on the data (nonzero)": lambda: device.nonzero(),
        "indexes with a boolean mask": lambda: device[device > 0],
        "repeats by counts on the device without output_size": lambda: device.repeat_interleave(device.long()),
        "torch.tensor(..., device=...) copies Python data": lambda: torch.tensor([1.0, 2.0], device=META),
        "torch.as_tensor(..., device=...) copies Python data": lambda: torch.as_tensor([1.0], device=META),
        "Tensor.new_tensor copies Python data": lambda: device.new_tensor([1.0]),
    }
    for problem, step in cases.items():
        found, _ = findings(step, pinned=[pinned])
        assert len(found) == 1 and found[0].startswith(problem), (problem, found)
    # what a step may do: device arithmetic, a fill, a pinned non-blocking copy, a device tensor as_tensor'd again
    clean, _ = findings(lambda: (device * 2 + 1, torch.full((3,), 2.0, device=META), torch.as_tensor(device, device=META),
                                 pinned.to(META, non_blocking=True)), pinned=[pinned])
    assert clean == []


def test_designed_waits_are_counted_apart_and_nothing_outside_regions_is_checked():
    device = torch.ones(4, device=META)
    found, report = findings(lambda: device.sum().item(), designed="loss read-back")
    assert found == [] and report.designed == {"loss read-back": 1}
    stand_in = StandIn([])
    with stand_in.watching():
        device.sum().item()  # set-up, exports: outside any region
    assert stand_in.report.findings == [] and not stand_in.report.designed
