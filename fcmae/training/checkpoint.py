"""Atomic, rotating training checkpoints that load without running anything they hold.

A checkpoint is a folder `checkpoint-<step>`:

    model.safetensors      the model's parameters and buffers
    <name>.safetensors     other modules the script keeps (fine-tuning's EMA)
    optimizer.pt           the optimiser's state dict, read back with torch.load(weights_only=True)
    state.json             where training stands (TrainState), the run's shape (effective batch,
                           steps per epoch) and the gradient scaler's numbers

No file is a general pickle, so a tampered folder cannot run code on resume: safetensors and
JSON hold data only, and `weights_only` unpickles tensors, numbers and containers and refuses
anything else. Random-generator states are not saved: every step re-seeds from (seed, step,
process). Folders written by accelerate's `save_state` (before this format) still resume: their
optimizer.bin and custom_checkpoint_*.pkl go through the same `weights_only` loading and their
random_states_*.pkl are not read.

The main process writes the folder under a temporary name and renames it when complete, so a run
killed while saving never leaves a folder that a resume would pick up. Assumes the output folder
is shared by all processes (one node, or a shared filesystem across nodes).
"""
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fcmae.config import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FORMAT = 2
MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"
# what accelerate's save_state wrote (format 1): the optimiser, then the registered objects in order
OLD_OPTIMIZER, OLD_OBJECT = "optimizer.bin", "custom_checkpoint_{}.pkl"


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


# ----- writing ---------------------------------------------------------------------------------------

def save_checkpoint(accelerator, folder, step, keep, model, optimizer, state, modules=None, run_shape=None):
    """Save `model`, `optimizer`, the TrainState `state` and the extra `modules` ({name: module})
    as `folder/checkpoint-<step>`; keep the newest `keep` (0 or less keeps all). Every process
    must call this; the main process writes (the processes' states are equal under DDP)."""
    folder = Path(folder)
    final = folder / f"checkpoint-{step:08d}"
    partial = folder / f".partial-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a run killed while saving
        partial.mkdir(parents=True)
        for name, module in {"model": accelerator.unwrap_model(model), **(modules or {})}.items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                      str(partial / f"{name}.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), partial / OPTIMIZER)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        record = {"format": FORMAT, "train_state": state.state_dict(), "run": run_shape or {}, "scaler": scaler}
        (partial / STATE).write_text(json.dumps(record, indent=1))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)  # atomic: the checkpoint appears whole or not at all
        if keep > 0:
            for old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----- reading ---------------------------------------------------------------------------------------

class Checkpoint:
    """A checkpoint folder opened for resuming; every problem is a ConfigError of one sentence."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if (self.folder / STATE).is_file():
            self.format = FORMAT
            record = self._json(self.folder / STATE)
            if not isinstance(record, dict) or not isinstance(record.get("train_state"), dict):
                raise ConfigError(f"{self.folder / STATE} is not the state file of a checkpoint (no train_state)")
            self.train_state, self.run_shape = record["train_state"], record.get("run") or {}
            self.scaler = record.get("scaler")
        elif (self.folder / OLD_OBJECT.format(0)).is_file():
            self.format = 1
            self.train_state = self._torch(self.folder / OLD_OBJECT.format(0))
            self.run_shape, self.scaler = {}, None
        else:
            raise ConfigError(f"{self.folder} is not a checkpoint folder (it has no {STATE}); give --resume a "
                              "checkpoint-NNNNNNNN folder from a run's output_dir/checkpoints, or a weights file")
        counters = [self.train_state.get(k) for k in ("epoch", "step_in_epoch", "global_step")]
        if not all(isinstance(c, int) and c >= 0 for c in counters):
            raise ConfigError(f"the checkpoint {self.folder} does not say where training stood (epoch, step_in_epoch, "
                              "global_step); it is damaged, resume from an older one")
        if not (self.folder / MODEL).is_file():
            raise ConfigError(f"the checkpoint {self.folder} has no {MODEL}; it was not written completely")

    def load_model(self, model):
        model.load_state_dict(self._tensors(self.folder / MODEL))

    def load_optimizer(self, optimizer):
        path = self.folder / (OPTIMIZER if self.format == FORMAT else OLD_OPTIMIZER)
        optimizer.load_state_dict(self._torch(path))

    def load_module(self, name, module, position):
        """An extra module saved as `name` (format 2), or as accelerate's registered object after the
        TrainState, at `position` (format 1)."""
        if self.format == FORMAT:
            module.load_state_dict(self._tensors(self.folder / f"{name}.safetensors"))
        else:
            module.load_state_dict(self._torch(self.folder / OLD_OBJECT.format(position)))

    @staticmethod
    def _json(path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} cannot be read as JSON ({type(err).__name__}: {err}); the checkpoint is "
                              "damaged, resume from an older one") from None

    @staticmethod
    def _tensors(path):
        if not path.is_file():
            raise ConfigError(f"the checkpoint has no {path.name} ({path}); it was written by another kind of run")
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise ConfigError(f"{path} is not a readable safetensors file ({err}); the checkpoint is damaged, "
                              "resume from an older one") from None

    @staticmethod
    def _torch(path):
        """torch.load that unpickles only tensors, numbers, strings and containers of them."""
        if not path.is_file():
            raise ConfigError(f"the checkpoint has no {path.name} ({path}); it was not written completely")
        try:
            with warnings.catch_warnings():  # a crafted file's pickle protocol is not worth a warning
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0][:160]
            raise ConfigError(f"{path} holds more than tensors and numbers ({detail}); it was not loaded, since "
                              "unpickling it could run code: use checkpoints from a source you trust") from None
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                              "the checkpoint is damaged, resume from an older one") from None


def checkpoint_kind(keys):
    """What kind of run wrote a model with these state-dict keys, in words."""
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith(("decoder.", "pred.")) for k in keys):
        return "an FCMAE pretraining checkpoint (pretrain.py)"
    if any(k.startswith("head.") for k in keys):
        return "a classifier checkpoint (finetune.py)"
    return "a checkpoint of another model"


def check_fits(folder, model):
    """None when the model saved in checkpoint `folder` has exactly `model`'s parameters, else a
    sentence saying what the folder holds instead."""
    path = Path(folder) / MODEL
    if not path.is_file():
        return None  # Checkpoint says what is missing
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = set(f.keys())
    except (OSError, SafetensorError) as err:
        return f"{path} is not a readable safetensors file ({err}); the checkpoint is damaged"
    if saved == set(model.state_dict()):
        return None
    return f"{folder} is {checkpoint_kind(saved)}, made for another model than this run's"


class TrainState:
    """Where training stands, saved with every checkpoint as JSON."""

    def __init__(self):
        self.epoch = 0            # the epoch in progress
        self.step_in_epoch = 0    # optimiser steps done in it
        self.global_step = 0      # optimiser steps done in all
        self.epoch_sums = {}      # running sums for the epoch's log line
        self.script = {}          # the training script's own numbers (fine-tuning's best accuracies)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        known = set(vars(self))
        vars(self).update({k: v for k, v in state.items() if k in known})
        if "script" not in state:  # written before `script` existed: its other entries were the script's
            self.script = {k: v for k, v in state.items() if k not in known}
