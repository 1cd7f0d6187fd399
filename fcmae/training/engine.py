"""The training loop that pretrain.py and finetune.py share.

A `Run` owns the accelerator, the output folder (checkpoints, log.txt, args.json, trackers) and
the `TrainState`; `Run.plan` makes the schedule, `Run.start` sets a model up (weights, optimiser,
compile, prepare, resume, logs: the one order that works) and `Run.fit` runs the optimiser steps.
The scripts say only what differs: the data, the model, the loss of a micro-batch, and what
happens after a step and at the end of an epoch.

Everything a step computes is a function of (seed, step): the data order and augmentation come
from the dataset's batch sampler and per-sample seeds, and the global random generators are re-seeded
from (seed, step, process) before every step (drop path, mixup). A run killed at any moment and
resumed from its newest checkpoint therefore ends exactly where the uninterrupted run would have.

Nothing in a step makes the host wait for the device (fcmae.training.waits names the regions
that must not wait and the few built to). A stop signal (fcmae.training.signals), a due
time-based save and a process's unreadable data are agreed on by all processes at the loss
read-back every --log_every steps, inside the all-reduce that read-back makes anyway, so the
processes save, or stop, at the same step without any synchronisation of their own.
"""
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from fcmae.config import ConfigError
from fcmae.data import DataError, collate, derive_seed
from fcmae.optim import cosine_lr, set_lr
from fcmae.training.checkpoint import Checkpoint, TrainState, check_fits, latest_checkpoint, save_checkpoint
from fcmae.training.signals import PREEMPTED_EXIT_CODE, StopSignals, end_workers_at_exit, ignore_signals
from fcmae.training.waits import designed_wait, no_wait
from fcmae.weights import WeightsError
from fcmae.weights import describe as describe_loaded


@dataclass
class Schedule:
    """How long to train and the per-iteration learning rate (linear warm-up, half cosine)."""
    epochs: int
    steps_per_epoch: int
    lr: float
    min_lr: float
    warmup_epochs: float
    max_steps: int | None = None

    @property
    def last_step(self):
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps or total)

    def lr_at(self, global_step):
        return cosine_lr(global_step / self.steps_per_epoch, self.lr, self.min_lr, self.epochs, self.warmup_epochs)


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_step(seed, global_step, rank):
    """Seed torch, numpy and Python's generators for one optimiser step of one process."""
    value = derive_seed(seed, "step", global_step, rank)
    torch.manual_seed(value)
    np.random.seed(value & 0xFFFF_FFFF)  # numpy takes 32 bits
    random.seed(value)


class Run:
    """The accelerator and everything a training run writes; `args` needs the shared flags
    (output_dir, log_dir, log_with, device, seed, resume, auto_resume, start_epoch, save_ckpt,
    save_ckpt_freq, save_ckpt_steps, save_ckpt_num, save_ckpt_minutes, stop_signals, dist_timeout,
    remap_epochs, log_every, batch_size, update_freq, num_workers, pin_mem, clip_grad)."""

    # A stand-in for the GPU (fcmae.training.sync_check, set while it runs): the steps run on its
    # device, and its loader() sees every batch the DataLoader delivers.
    stand_in = None

    def __init__(self, args, name, mixed_precision=None, resume_advice=""):
        self.args, self.name = args, name
        self.resume_advice = resume_advice  # added to the sentence refusing another run's checkpoint
        self.out = Path(args.output_dir) if args.output_dir else None
        self.log_dir = Path(args.log_dir) if args.log_dir else self.out
        self.log_with = None if args.log_with == "none" or self.log_dir is None else args.log_with
        project = ProjectConfiguration(project_dir=str(self.log_dir or "."), logging_dir=str(self.log_dir or "."))
        # a process whose peer died must not wait in a collective forever
        timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout))
        if mixed_precision == "bf16" and args.device != "cpu" and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{torch.cuda.get_device_name()} has no bf16 arithmetic, which --mixed_precision bf16 "
                              "(and the configs in configs/) ask for; pass --mixed_precision fp16 instead")
        self.accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=mixed_precision,
                                       log_with=self.log_with, project_config=project, kwargs_handlers=[timeout])
        if self.accelerator.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # accelerate runs fp16 on the CPU as fp32, silently; torch's CPU autocast and gradient scaler
            # make it fp16 there too (and test the GPU's fp16 path, scaler included, on the CPU)
            self.accelerator.native_amp, self.accelerator.scaler = True, torch.amp.GradScaler("cpu")
        self.say = self.accelerator.print
        self.main_process = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_process_group(self.world, args.device)
        self.tf32 = False
        if self.accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN time its conv algorithms once
            # fp32 matrix products and convolutions on tensor cores (TF32, ~1e-3 relative), unless --tf32 false
            self.tf32 = args.tf32 and self.accelerator.mixed_precision == "no"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        self.ckpt_dir = self.out / "checkpoints" if self.out else None
        self.state = TrainState()
        self.model = self.optimizer = self.steps_per_epoch_ = None  # set by restore
        self.modules = {}  # other modules saved with each checkpoint (see keep)
        self.saved_at, self.saved_time = None, time.monotonic()
        self.signals = None  # the stop signals' handlers, installed while fit runs
        self.stop_agreed = self.save_agreed = False
        # steps whose losses the host has not read yet: (global step, lr, loss on the device, files skipped)
        self.pending = []
        self.tic, self.timed_from, self.images_per_s = time.perf_counter(), 0, 0.0
        self.evaluation_loaders = {}  # id(dataset) -> DataLoader
        self.data_error = None  # this process's unreadable data (one sentence), until all processes stop
        self.logged = None  # called after each log.txt line (see fit)

    @property
    def device(self):
        return self.stand_in.device if self.stand_in is not None else self.accelerator.device

    @property
    def precision(self):
        """The run's arithmetic, for its summary line: "bf16 mixed precision", "fp32 with TF32 ...", "fp32"."""
        mixed = self.accelerator.mixed_precision
        if mixed != "no":
            return f"{mixed} mixed precision"
        return "fp32 with TF32 matrix products" if self.tf32 else "fp32"

    @property
    def eff_batch(self):
        return self.args.batch_size * self.args.update_freq * self.world

    # ----- start -------------------------------------------------------------------------------

    def batch_sampler(self, dataset):
        """This process's batch sampler of `dataset` (a folder's or shards', the dataset knows which)."""
        args = self.args
        return dataset.batch_sampler(args.batch_size, args.update_freq, self.world, self.rank, args.seed)

    def steps_per_epoch(self, dataset):
        """Optimiser steps per epoch (the last incomplete global batch is dropped)."""
        steps = self.batch_sampler(dataset).steps
        if steps == 0:
            raise ConfigError(f"the data has {len(dataset)} images, fewer than one effective batch of "
                              f"{self.eff_batch} (batch_size x update_freq x processes; with shards, in each "
                              "process's smallest share); lower --batch_size or --update_freq")
        return steps

    def peak_lr(self):
        """--lr, or --blr scaled by the effective batch / 256 (the official rule)."""
        return self.args.lr if self.args.lr is not None else self.args.blr * self.eff_batch / 256

    def plan(self, dataset, warmup_epochs, warmup_steps=0):
        """The schedule of training on `dataset` (None: nothing to train, as for an evaluation):
        steps per epoch, peak lr, warm-up (`warmup_steps` instead of epochs when above 0);
        ConfigError when the data is less than one batch."""
        a = self.args
        steps = self.steps_per_epoch(dataset) if dataset is not None else 1
        warmup = warmup_steps / steps if warmup_steps > 0 else warmup_epochs
        return Schedule(a.epochs, steps, self.peak_lr(), a.min_lr, warmup, a.max_steps)

    def load_weights(self, load, model, path):
        """`load(model, path)` (a fcmae.weights loader), said; ConfigError naming the file when it does not fit."""
        try:
            loaded = load(model, path)
        except WeightsError as err:
            raise ConfigError(f"{path}: {err}") from None
        self.say(describe_loaded(loaded, path))
        return loaded

    def start(self, model, schedule, make_optimizer, load, weights=(), extras=None, compile_options=None,
              summary=None):
        """Set `model` up to train, in the one order that works; returns (model, optimizer), prepared.

        1. the files of `weights`, then a --resume weights file, each loaded by `load(model, path)`;
        2. the model moved to the run's device; extras(model) -> {name: module}: a script's own
           state (fine-tuning's EMA), made from the loaded weights and saved with every checkpoint;
        3. make_optimizer(model); 4. torch.compile with --compile (`compile_options`), after the
           extras are copied; 5. accelerate's prepare; 6. the resume (restore); 7. summary(model)
           said (the unwrapped model), with the batch and learning rate; the logs opened.
        ConfigError for anything a user must fix (weights that do not fit, a foreign checkpoint).
        """
        args = self.args
        resume_file = args.resume if args.resume and Path(args.resume).is_file() else ""
        loaded = None
        for path in filter(None, [*weights, resume_file]):
            loaded = self.load_weights(load, model, path)
        if self.stand_in is None:
            model.to(self.device)  # first: the extras (an EMA's copy) are made where the model trains
        kept = extras(model) if extras is not None else {}
        if self.stand_in is not None:  # made on the host, where torch builds their generators, then moved
            for module in (model, *kept.values()):
                module.to(self.device)
        optimizer = make_optimizer(model)
        if args.compile:
            model.compile(**(compile_options or {}))
        model, optimizer = self.accelerator.prepare(model, optimizer,
                                                    device_placement=[self.stand_in is None] * 2)
        for name, module in kept.items():
            self.keep(name, module)
        self.restore(model, optimizer, schedule.steps_per_epoch, file_extras=loaded["extras"] if resume_file else None)
        if summary is not None:
            self.say(summary(self.accelerator.unwrap_model(model)))
        self.describe_batch(schedule.lr, schedule.steps_per_epoch)
        self.open_logs()
        return model, optimizer

    def describe_batch(self, lr, steps_per_epoch):
        a = self.args
        self.say(f"effective batch {self.eff_batch} = {a.batch_size} x {a.update_freq} accumulation x {self.world} "
                 f"processes; lr {lr:.3g} (blr {lr * 256 / self.eff_batch:.3g}); {steps_per_epoch} steps per epoch")

    def keep(self, name, module):
        """Save `module`'s state dict with every checkpoint (as name.safetensors) and restore it on
        resume; call before restore."""
        self.modules[name] = module

    def restore(self, model, optimizer, steps_per_epoch, file_extras=None):
        """Continue from a checkpoint folder (--resume FOLDER, else the newest in output_dir with
        --auto_resume); else from the epoch in `file_extras` (a --resume weights file's), else
        --start_epoch. Returns the checkpoint folder resumed from, or None. A folder written for
        another model (a pretraining run's output_dir given to finetune.py, say), a damaged or
        tampered one, or one of another effective batch raises ConfigError."""
        args, state = self.args, self.state
        self.model, self.optimizer, self.steps_per_epoch_ = model, optimizer, steps_per_epoch
        latest = latest_checkpoint(self.ckpt_dir) if args.auto_resume and self.ckpt_dir else None
        folder = args.resume if args.resume and Path(args.resume).is_dir() else latest
        if folder:
            problem = check_fits(folder, self.accelerator.unwrap_model(model))
            if problem:
                where = "--resume" if folder == args.resume else f"--output_dir {args.output_dir}"
                raise ConfigError(f"{problem} (found through {where}); give this run an --output_dir of its own"
                                  + self.resume_advice)
            checkpoint = Checkpoint(folder)
            remapped = self.check_shape(checkpoint, steps_per_epoch)
            checkpoint.load_model(self.accelerator.unwrap_model(model))
            checkpoint.load_optimizer(optimizer)
            for position, (name, module) in enumerate(self.modules.items(), start=1):
                checkpoint.load_module(name, module, position)
            if checkpoint.scaler and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(checkpoint.scaler)
            state.load_state_dict(checkpoint.train_state)
            if remapped:
                state.step_in_epoch = min(round(state.step_in_epoch * steps_per_epoch / remapped), steps_per_epoch)
                state.global_step = state.epoch * steps_per_epoch + state.step_in_epoch
                self.say(f"--remap_epochs: the checkpoint's {remapped:g} steps per epoch mapped to this run's "
                         f"{steps_per_epoch}")
            self.saved_at = None if remapped else state.global_step
            self.say(f"resumed from {folder} at epoch {state.epoch}, step {state.global_step}")
        elif file_extras is not None and "epoch" in file_extras:
            state.epoch = int(file_extras["epoch"]) + 1
            state.global_step = state.epoch * steps_per_epoch
            self.say(f"continuing from {args.resume} at epoch {state.epoch}, with a fresh optimiser state")
        else:
            state.epoch = args.start_epoch
            state.global_step = args.start_epoch * steps_per_epoch
        return folder

    def run_shape(self):
        """What fixes the steps of an epoch, saved with each checkpoint."""
        a = self.args
        return {"eff_batch": self.eff_batch, "steps_per_epoch": self.steps_per_epoch_, "batch_size": a.batch_size,
                "update_freq": a.update_freq, "processes": self.world}

    def check_shape(self, checkpoint, steps_per_epoch):
        """The checkpoint's steps per epoch when they differ from this run's and --remap_epochs
        allows it (else ConfigError); None when they agree or cannot be known."""
        saved = checkpoint.run_shape
        train = checkpoint.train_state
        saved_steps = saved.get("steps_per_epoch")
        if saved_steps is None and train["epoch"] > 0:  # an older checkpoint: its counters tell
            saved_steps = (train["global_step"] - train["step_in_epoch"]) / train["epoch"]
        saved_batch = saved.get("eff_batch")
        if saved_steps in (None, steps_per_epoch) and saved_batch in (None, self.eff_batch):
            return None
        if not self.args.remap_epochs:
            if saved_batch not in (None, self.eff_batch):
                why = (f"was trained with an effective batch of {saved_batch} ({saved.get('batch_size')} x "
                       f"{saved.get('update_freq')} accumulation x {saved.get('processes')} processes), and this run's "
                       f"is {self.eff_batch} ({self.args.batch_size} x {self.args.update_freq} x {self.world})")
            else:
                why = (f"has {saved_steps:g} steps per epoch and this run {steps_per_epoch} (the data changed, or its "
                       "batch)")
            raise ConfigError(f"the checkpoint {checkpoint.folder} {why}; resume with the batch it was trained "
                              "with (keep batch_size x update_freq x processes), or pass --remap_epochs true to "
                              "continue its schedule by epochs")
        return saved_steps if saved_steps not in (None, steps_per_epoch) else None

    def open_logs(self):
        """args.json, log.txt trimmed to the epochs already done, trackers."""
        if self.out and self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=2, default=str))
            trim_log(self.out / "log.txt", keep_before_epoch=self.state.epoch)
        if self.log_with:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(self.args).items()}
            self.accelerator.init_trackers(self.name, config=hparams)

    def write_metrics(self, record):
        """output_dir/metrics.json: the latest evaluation, for programs to read (written whole, then
        renamed, so a reader never sees half a file)."""
        if self.out and self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            partial = self.out / ".metrics.json.partial"
            partial.write_text(json.dumps(record, indent=1))
            os.replace(partial, self.out / "metrics.json")

    def append_log(self, record):
        if self.out and self.main_process:
            with open(self.out / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.logged is not None:
                self.logged(record)

    def checkpoint(self, epoch=None, progress=None):
        """Save the run (every process must call this), once per step at most, after reading back
        the pending losses: a non-finite one stops the run before it is saved."""
        if epoch is not None:
            self.read_losses(epoch, progress)
        if self.out and self.args.save_ckpt and self.saved_at != self.state.global_step:
            with designed_wait("checkpoint"):  # the state dicts copied to the host
                save_checkpoint(self.accelerator, self.ckpt_dir, self.state.global_step, self.args.save_ckpt_num,
                                self.model, self.optimizer, self.state, self.modules, self.run_shape())
            self.saved_at = self.state.global_step
        self.saved_time, self.save_agreed = time.monotonic(), False

    # ----- the loop ----------------------------------------------------------------------------

    def loader(self, dataset, batch_sampler):
        """A DataLoader of `dataset`'s Items whose workers persist: across epochs for training (the
        sampler is told each epoch, and the step it starts at, with `set_epoch`), across
        evaluations for an evaluation's fixed batches."""
        args = self.args
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.num_workers,
                                             pin_memory=args.pin_mem and self.device.type == "cuda",
                                             persistent_workers=args.num_workers > 0, collate_fn=collate,
                                             worker_init_fn=functools.partial(ignore_signals, args.stop_signals))
        end_workers_at_exit(loader)
        return loader if self.stand_in is None else self.stand_in.loader(loader, pin=args.pin_mem)

    def evaluation_loader(self, dataset):
        """The loader of this process's share of `dataset` for an exact evaluation, made once."""
        if id(dataset) not in self.evaluation_loaders:
            batches = dataset.evaluation_batches(self.rank, self.world, self.args.batch_size)
            self.evaluation_loaders[id(dataset)] = self.loader(dataset, batches)
        return self.evaluation_loaders[id(dataset)]

    def fit(self, model, optimizer, dataset, schedule, micro_step, train_mode=None, after_step=None, end_epoch=None,
            logged=None):
        """Train from where `self.state` stands to `schedule.last_step`.

        micro_step(batch) -> (loss, files skipped) runs the forward pass of one micro-batch; the
        backward pass, accumulation, clipping and the optimiser step happen here. after_step()
        runs after every optimiser step, end_epoch(epoch) after every complete epoch and returns
        entries for its log line; logged(record) after each log.txt line is written. train_mode()
        puts the model in training mode (default model.train()).

        The host reads the losses back only every --log_every steps, before a checkpoint and at
        the end of an epoch, so the device is never waited for in between; a non-finite loss
        still stops the run before any checkpoint holds what followed it.
        """
        progress = tqdm(total=schedule.last_step, initial=self.state.global_step, disable=not self.main_process,
                        desc=self.name, dynamic_ncols=True)
        self.logged = logged
        n_parameters = trainable_parameters(model)  # for the log lines
        with self.lost_peers_stop(), self.stop_signals():
            self._train(model, optimizer, dataset, schedule, micro_step, n_parameters, train_mode, after_step,
                        end_epoch, progress)
        progress.close()

    def _train(self, model, optimizer, dataset, schedule, micro_step, n_parameters, train_mode, after_step,
               end_epoch, progress):
        """fit's epochs and steps, while the stop signals are handled and a lost peer is one sentence."""
        state = self.state
        sampler = self.batch_sampler(dataset)
        loader = self.loader(dataset, sampler)
        stopped = state.global_step >= schedule.last_step
        while state.epoch < schedule.epochs and not stopped:
            epoch = state.epoch
            (train_mode or model.train)()
            sampler.set_epoch(epoch, start_step=state.step_in_epoch)
            batches = self.micro_batches(loader, dataset)
            state.epoch_sums = state.epoch_sums or {"loss": 0.0, "lr": 0.0, "steps": 0, "skipped": 0}
            self.tic, self.timed_from = time.perf_counter(), state.step_in_epoch
            for step in range(state.step_in_epoch, schedule.steps_per_epoch):
                with no_wait("optimiser step"):
                    step_lr, grad_norm = self.optimizer_step(model, optimizer, batches, schedule, micro_step)
                    state.step_in_epoch = step + 1
                    if after_step is not None:
                        after_step()
                progress.update(1)
                self.log_and_save(epoch, progress, step_lr, grad_norm)
                if state.global_step >= schedule.last_step:
                    stopped = True
                    break
                if self.stop_agreed:
                    break  # saved below, at the end of the epoch when this step ended it
            self.end_of_epoch(epoch, schedule, end_epoch, n_parameters, stopped, progress)

    def optimizer_step(self, model, optimizer, batches, schedule, micro_step):
        """One optimiser step: --update_freq micro-batches (gradients all-reduced on the last one
        only), clipping, the update. The loss stays on the device (see read_losses); returns
        (lr, grad norm or None: it is computed with --clip_grad or when the step is logged)."""
        args, state, acc = self.args, self.state, self.accelerator
        step_lr = schedule.lr_at(state.global_step)
        set_lr(optimizer, step_lr)
        seed_step(args.seed, state.global_step, self.rank)
        step_loss, skipped = None, 0
        for micro in range(args.update_freq):
            batch = next(batches)
            sync = micro == args.update_freq - 1  # all-reduce gradients on the last micro-step only
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    loss, n_skipped = micro_step(batch)
                acc.backward(loss / args.update_freq)
            loss = loss.detach().float() / args.update_freq
            step_loss = loss if step_loss is None else step_loss + loss
            skipped += n_skipped
        grad_norm = None
        if args.clip_grad is not None or (state.global_step + 1) % args.log_every == 0:
            max_norm = args.clip_grad if args.clip_grad is not None else float("inf")
            grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.pending.append((state.global_step, step_lr, step_loss, skipped))
        state.global_step += 1
        return step_lr, grad_norm

    def micro_batches(self, loader, dataset):
        """The loader's micro-batches. When this process's data cannot be read (a DataError: a shard
        gone, a micro-batch without one readable image), it keeps in step with the others on a
        stand-in (its last good micro-batch, else `dataset.stand_in_batch`) until the next loss
        read-back, where every process learns of it and all stop at the same step, before anything
        is saved (see read_losses)."""
        # made here, not at the first micro-batch: making it draws from the global generator, which
        # the step re-seeds just before (a run resumed mid-epoch would draw differently)
        batches = iter(loader)
        if hasattr(dataset, "decode_ahead"):  # a decoder in this process (dali) starts each batch a step ahead
            batches = dataset.decode_ahead(batches, self.device)
        return self.kept_in_step(batches, dataset)

    def kept_in_step(self, batches, dataset):
        """`batches`, with a stand-in for each micro-batch that could not be read (see micro_batches)."""
        last = None
        while True:
            try:
                batch = next(batches)
                last = batch if self.data_error is None else last
            except StopIteration:
                if self.data_error is None:
                    return
                batch = last
            except DataError as err:  # raised in a worker, it carries the worker's traceback
                self.data_error = self.data_error or str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]
                batch = last
            if batch is None:  # nothing of this epoch was read yet
                try:
                    batch = last = dataset.stand_in_batch(self.args.batch_size)
                except (ConfigError, DataError):
                    self.stop_for_data(1)  # nothing readable stands in: this process stops alone
            yield batch

    def log_and_save(self, epoch, progress, step_lr, grad_norm):
        """After a step: the loss read back and the scalars logged every --log_every steps; a
        checkpoint every --save_ckpt_steps steps, or when the processes agreed on a save."""
        args, state = self.args, self.state
        if state.global_step % args.log_every == 0:
            loss_value = self.read_losses(epoch, progress)
            if self.log_with:
                scalars = {"train/loss": loss_value, "train/lr": step_lr, "train/images_per_s": self.images_per_s}
                if grad_norm is not None:
                    with designed_wait("loss read-back"):  # the device is idle after the read-back above
                        scalars["train/grad_norm"] = float(grad_norm)
                self.accelerator.log(scalars, step=state.global_step)
        if args.save_ckpt_steps and state.global_step % args.save_ckpt_steps == 0 or self.save_agreed:
            self.checkpoint(epoch, progress)

    def end_of_epoch(self, epoch, schedule, end_epoch, n_parameters, stopped, progress):
        """Where an epoch's steps end (complete, or stopped): the losses read back; for a complete
        epoch the script's end_epoch and the log line; a checkpoint when one is due; the exit of
        a preempted run."""
        args, state = self.args, self.state
        self.read_losses(epoch, progress)
        sums = state.epoch_sums
        epoch_done = state.step_in_epoch == schedule.steps_per_epoch
        extra = {}
        if epoch_done:
            state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
            extra = (end_epoch(epoch) if end_epoch is not None else None) or {}
        scheduled = epoch_done and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == schedule.epochs)
        if stopped or scheduled or self.stop_agreed or self.save_agreed:
            self.checkpoint()
        if epoch_done:
            self.append_log({"train_loss": sums["loss"] / sums["steps"], "train_lr": sums["lr"] / sums["steps"],
                             **extra, "epoch": epoch, "n_parameters": n_parameters, "skipped_images": sums["skipped"]})
        if self.stop_agreed and not stopped and state.epoch < schedule.epochs:
            progress.close()
            self.preempted()

    def read_losses(self, epoch, progress=None):
        """Read back the losses of the steps not read yet (one host synchronisation and one
        all-reduce for all of them), add them to the epoch's sums and stop on a non-finite one.
        Returns the newest step's loss (None when nothing was pending)."""
        pending, sums = self.pending, self.state.epoch_sums
        if not pending:
            return None
        with designed_wait("loss read-back"):
            losses = torch.stack([loss for _, _, loss, _ in pending])
            # the files skipped, then this process's votes: to stop (a signal came), to save (time is up),
            # and that its data could not be read
            minutes = self.args.save_ckpt_minutes
            save_due = bool(minutes) and time.monotonic() - self.saved_time >= 60 * minutes
            signalled = self.signals is not None and self.signals.received is not None
            counts = [float(n) for *_, n in pending] + [float(signalled), float(save_due), float(bool(self.data_error))]
            totals = self.accelerator.reduce(torch.cat([losses, torch.tensor(counts, device=losses.device)]),
                                             reduction="sum").tolist()
        if totals[-1] > 0:
            self.stop_for_data(int(totals[-1]))
        self.stop_agreed = self.stop_agreed or totals[-3] > 0
        self.save_agreed = self.save_agreed or totals[-2] > 0
        for (step, lr, _, _), loss_sum, n_skipped in zip(pending, totals, totals[len(pending):-3]):
            loss_value = loss_sum / self.world
            if not math.isfinite(loss_value):
                self.stop(f"the loss became {loss_value} at step {step} (epoch {epoch})")
            sums["loss"] += loss_value
            sums["lr"] += lr
            sums["steps"] += 1
            sums["skipped"] += int(n_skipped)
        self.pending = []
        images = self.eff_batch * (self.state.step_in_epoch - self.timed_from)
        self.images_per_s = images / max(time.perf_counter() - self.tic, 1e-9)
        if progress is not None:
            progress.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                 img_s=f"{self.images_per_s:.1f}", refresh=False)
        return loss_value

    # ----- the end -----------------------------------------------------------------------------

    def stop(self, problem, advice="lower the learning rate (--blr) or use --clip_grad", everyone=False):
        """Stop this process with `problem`, naming the last good checkpoint: said by the main process,
        or by this one whatever its rank with `everyone` (a problem only it knows)."""
        last = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        sentence = f"error: {problem}; stopping. The last good checkpoint is {last or 'none'}; {advice}, then resume " \
                   "from it."
        if everyone:
            print(sentence, flush=True)  # where the main process says its own (accelerator.print)
        else:
            self.say(sentence)
        self.accelerator.end_training()
        sys.exit(1)

    def stop_for_data(self, failed):
        """Every process, at the same read-back: `failed` processes could not read their data. Each of
        them says why; the main process, when its own data was fine, says that another's was not."""
        where = f"at step {self.state.global_step}"
        if self.data_error:
            who = f"process {self.rank} of {self.world}: " if self.world > 1 else ""
            self.stop(f"{who}{self.data_error} ({where})", advice="make the data readable", everyone=True)
        self.stop(f"{failed} of the {self.world} processes could not read their data ({where}; their messages say "
                  "why)", advice="make the data readable")

    @contextlib.contextmanager
    def stop_signals(self):
        """Handle --stop_signals while training (before, there is nothing to save)."""
        self.signals = StopSignals(self.args.stop_signals)
        try:
            yield
        finally:
            self.signals.uninstall()

    @contextlib.contextmanager
    def lost_peers_stop(self):
        """A collective that fails because another process died or hung stops this one with a
        sentence instead of gloo's or NCCL's traceback."""
        try:
            yield
        except RuntimeError as err:
            text = str(err)
            if self.world == 1 or not (isinstance(err, torch.distributed.DistError) or any(
                    word in text for word in ("gloo", "NCCL", "Connection", "timed out", "Timed out"))):
                raise
            last = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
            print(f"error: process {self.rank} of {self.world} lost the others at step {self.state.global_step} "
                  f"({text.strip().splitlines()[0][:200]}): another process died or hung, and the launcher's report "
                  f"names its rank. The last good checkpoint is {last or 'none'}; with the elastic launch flags "
                  "(docs/cluster.md) the group restarts from it by itself, else run the same command again.",
                  file=sys.stderr)
            sys.exit(1)

    def preempted(self):
        """Every process: the checkpoint is saved; exit with PREEMPTED_EXIT_CODE."""
        step = self.state.global_step
        saved = (f"checkpoint {self.ckpt_dir / f'checkpoint-{step:08d}'}" if self.saved_at == step
                 else "nothing saved (--output_dir is empty or --save_ckpt false)")
        received = self.signals.received
        self.say(f"stopped at step {step} on a stop signal ({received or 'received by another process'}): {saved}; "
                 f"exit code {PREEMPTED_EXIT_CODE}. Run the same command again to continue.")
        self.accelerator.end_training()
        sys.exit(PREEMPTED_EXIT_CODE)

    def check_replicas(self, model):
        """DDP keeps the processes' parameters equal; check it once, cheaply."""
        if self.world == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        sums = self.accelerator.gather(checksum.reshape(1))
        if not torch.equal(sums, sums[:1].expand_as(sums)):
            self.say("error: the processes' parameters differ at the end of training")
            sys.exit(1)
        self.say(f"parameters identical on all {self.world} processes")

    def finish(self):
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def check_process_group(world, device):
    """A process that a launcher started as one of several (WORLD_SIZE above 1) but that formed no
    process group would train alone, into the same folder as its would-be peers: ConfigError."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world == 1:
        remedy = ("torch sees no GPU here: pass --device cpu to train on the CPU in several processes"
                  if device != "cpu" and not torch.cuda.is_available() else
                  "check that the launcher's processes can reach each other (MASTER_ADDR, MASTER_PORT)")
        raise ConfigError(f"this process was launched as one of {launched} (WORLD_SIZE={launched}) but formed no "
                          f"process group with the others, so each would train alone; {remedy}")


def trim_log(path, keep_before_epoch):
    """Drop log lines of epochs a resumed run will train again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line).get("epoch", -1) < keep_before_epoch]
    path.write_text("".join(line + "\n" for line in lines))
