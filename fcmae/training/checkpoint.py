"""Atomic, rotating training checkpoints on top of accelerate's save_state / load_state.

A checkpoint is a folder `checkpoint-<step>` written by every process into a temporary folder
first and renamed when complete, so a run killed while saving never leaves a folder that a
resume would pick up and fail on. Assumes the output folder is shared by all processes (one
node, or a shared filesystem across nodes).
"""
import re
import shutil
from pathlib import Path

from safetensors import safe_open

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(folder):
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder):
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(accelerator, folder, step, keep):
    """Save the accelerator's registered state as `folder/checkpoint-<step>`; keep the newest
    `keep` (0 or less keeps all). Every process must call this."""
    folder = Path(folder)
    final = folder / f"checkpoint-{step:08d}"
    partial = folder / f".partial-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a run killed while saving
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)  # atomic: the checkpoint appears whole or not at all
        if keep > 0:
            for old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_kind(keys):
    """What kind of run wrote a model with these state-dict keys, in words."""
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith(("decoder.", "pred.")) for k in keys):
        return "an FCMAE pretraining checkpoint (pretrain.py)"
    if any(k.startswith("head.") for k in keys):
        return "a classifier checkpoint (finetune.py)"
    return "a checkpoint of another model"


def check_fits(folder, model):
    """None when the model saved in checkpoint `folder` has exactly `model`'s parameters, else a
    sentence saying what the folder holds instead (a resume would otherwise fail inside accelerate)."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None  # a layout this check does not know; accelerate will say what it misses
    with safe_open(str(path), framework="pt") as f:
        saved = set(f.keys())
    if saved == set(model.state_dict()):
        return None
    return f"{folder} is {checkpoint_kind(saved)}, made for another model than this run's"


class TrainState:
    """Where training stands, saved with every checkpoint (accelerate custom object)."""

    def __init__(self):
        self.epoch = 0            # the epoch in progress
        self.step_in_epoch = 0    # optimiser steps done in it
        self.global_step = 0      # optimiser steps done in all
        self.epoch_sums = {}      # running sums for the epoch's log line
        self.best = {}            # best evaluation results so far (fine-tuning)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)
