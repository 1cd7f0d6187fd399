"""The training loop that pretrain.py and finetune.py share.

A `Run` owns the accelerator, the output folder (checkpoints, log.txt, args.json, trackers) and
the `TrainState`; `Run.fit` runs the optimiser steps. The scripts say only what differs: the
dataset, the loss of a micro-batch, and what happens after a step and at the end of an epoch.

Everything a step computes is a function of (seed, step): the data order and augmentation come
from the dataset's batch sampler and per-sample seeds, and the global random generators are re-seeded
from (seed, step, process) before every step (drop path, mixup). A run killed at any moment and
resumed from its newest checkpoint therefore ends exactly where the uninterrupted run would have.
"""
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from fcmae.config import ConfigError
from fcmae.data import DataError, collate, derive_seed
from fcmae.optim import cosine_lr, set_lr
from fcmae.training.checkpoint import TrainState, check_fits, latest_checkpoint, save_checkpoint


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


def seed_step(seed, global_step, rank):
    """Seed torch, numpy and Python's generators for one optimiser step of one process."""
    value = derive_seed(seed, "step", global_step, rank)
    torch.manual_seed(value)
    np.random.seed(value & 0xFFFF_FFFF)  # numpy takes 32 bits
    random.seed(value)


class Run:
    """The accelerator and everything a training run writes; `args` needs the shared flags
    (output_dir, log_dir, log_with, device, seed, resume, auto_resume, start_epoch, save_ckpt,
    save_ckpt_freq, save_ckpt_steps, save_ckpt_num, log_every, batch_size, update_freq,
    num_workers, pin_mem, clip_grad)."""

    def __init__(self, args, name, mixed_precision=None):
        self.args, self.name = args, name
        self.out = Path(args.output_dir) if args.output_dir else None
        self.log_dir = Path(args.log_dir) if args.log_dir else self.out
        self.log_with = None if args.log_with == "none" or self.log_dir is None else args.log_with
        project = ProjectConfiguration(project_dir=str(self.log_dir or "."), logging_dir=str(self.log_dir or "."))
        self.accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=mixed_precision,
                                       log_with=self.log_with, project_config=project)
        if self.accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN time its conv algorithms once
        self.say = self.accelerator.print
        self.main_process = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.ckpt_dir = self.out / "checkpoints" if self.out else None
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.saved_at = None
        # steps whose losses the host has not read yet: (global step, lr, loss on the device, files skipped)
        self.pending = []
        self.tic, self.timed_from, self.images_per_s = time.perf_counter(), 0, 0.0
        self.evaluation_loaders = {}  # id(dataset) -> DataLoader

    @property
    def device(self):
        return self.accelerator.device

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

    def describe_batch(self, lr, steps_per_epoch):
        a = self.args
        self.say(f"effective batch {self.eff_batch} = {a.batch_size} x {a.update_freq} accumulation x {self.world} "
                 f"processes; lr {lr:.3g} (blr {lr * 256 / self.eff_batch:.3g}); {steps_per_epoch} steps per epoch")

    def restore(self, model, steps_per_epoch, file_extras=None):
        """Continue from a checkpoint folder (--resume FOLDER, else the newest in output_dir with
        --auto_resume); else from the epoch in `file_extras` (a --resume weights file's), else
        --start_epoch. Returns the checkpoint folder resumed from, or None. A folder written for
        another model (a pretraining run's output_dir given to finetune.py, say) raises ConfigError."""
        args, state = self.args, self.state
        latest = latest_checkpoint(self.ckpt_dir) if args.auto_resume and self.ckpt_dir else None
        folder = args.resume if args.resume and Path(args.resume).is_dir() else latest
        if folder:
            problem = check_fits(folder, self.accelerator.unwrap_model(model))
            if problem:
                where = "--resume" if folder == args.resume else f"--output_dir {args.output_dir}"
                raise ConfigError(f"{problem} (found through {where}); give this run an --output_dir of its own"
                                  + (" and pass pretrained weights with --finetune" if self.name == "fcmae_finetune"
                                     else ""))
            self.accelerator.load_state(str(folder))
            self.saved_at = state.global_step
            self.say(f"resumed from {folder} at epoch {state.epoch}, step {state.global_step}")
        elif file_extras is not None and "epoch" in file_extras:
            state.epoch = int(file_extras["epoch"]) + 1
            state.global_step = state.epoch * steps_per_epoch
            self.say(f"continuing from {args.resume} at epoch {state.epoch}, with a fresh optimiser state")
        else:
            state.epoch = args.start_epoch
            state.global_step = args.start_epoch * steps_per_epoch
        return folder

    def open_logs(self):
        """args.json, log.txt trimmed to the epochs already done, trackers."""
        if self.out and self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=2, default=str))
            trim_log(self.out / "log.txt", keep_before_epoch=self.state.epoch)
        if self.log_with:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(self.args).items()}
            self.accelerator.init_trackers(self.name, config=hparams)

    def append_log(self, record):
        if self.out and self.main_process:
            with open(self.out / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(self, epoch=None, progress=None):
        """Save the accelerator's state (every process must call this), once per step at most,
        after reading back the pending losses: a non-finite one stops the run before it is saved."""
        if epoch is not None:
            self.read_losses(epoch, progress)
        if self.out and self.args.save_ckpt and self.saved_at != self.state.global_step:
            save_checkpoint(self.accelerator, self.ckpt_dir, self.state.global_step, self.args.save_ckpt_num)
            self.saved_at = self.state.global_step

    # ----- the loop ----------------------------------------------------------------------------

    def loader(self, dataset, batch_sampler):
        """A DataLoader of `dataset`'s Items whose workers persist: across epochs for training (the
        sampler is told each epoch, and the step it starts at, with `set_epoch`), across
        evaluations for an evaluation's fixed batches."""
        args = self.args
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.num_workers,
                                           pin_memory=args.pin_mem and self.device.type == "cuda",
                                           persistent_workers=args.num_workers > 0, collate_fn=collate)

    def evaluation_loader(self, dataset):
        """The loader of this process's share of `dataset` for an exact evaluation, made once."""
        if id(dataset) not in self.evaluation_loaders:
            batches = dataset.evaluation_batches(self.rank, self.world, self.args.batch_size)
            self.evaluation_loaders[id(dataset)] = self.loader(dataset, batches)
        return self.evaluation_loaders[id(dataset)]

    def fit(self, model, optimizer, dataset, schedule, micro_step, n_parameters, train_mode=None,
            after_step=None, end_epoch=None):
        """Train from where `self.state` stands to `schedule.last_step`.

        micro_step(batch) -> (loss, files skipped) runs the forward pass of one micro-batch; the
        backward pass, accumulation, clipping and the optimiser step happen here. after_step()
        runs after every optimiser step, end_epoch(epoch) after every complete epoch and returns
        entries for its log line. train_mode() puts the model in training mode (default
        model.train()).

        The host reads the losses back only every --log_every steps, before a checkpoint and at
        the end of an epoch, so the device is never waited for in between; a non-finite loss
        still stops the run before any checkpoint holds what followed it.
        """
        args, state, acc = self.args, self.state, self.accelerator
        train_mode = train_mode or model.train
        progress = tqdm(total=schedule.last_step, initial=state.global_step, disable=not self.main_process,
                        desc=self.name, dynamic_ncols=True)
        sampler = self.batch_sampler(dataset)
        loader = self.loader(dataset, sampler)
        stopped = state.global_step >= schedule.last_step
        while state.epoch < schedule.epochs and not stopped:
            epoch = state.epoch
            train_mode()
            sampler.set_epoch(epoch, start_step=state.step_in_epoch)
            batches = iter(loader)
            if not state.epoch_sums:
                state.epoch_sums = {"loss": 0.0, "lr": 0.0, "steps": 0, "skipped": 0}
            self.tic, self.timed_from = time.perf_counter(), state.step_in_epoch
            for step in range(state.step_in_epoch, schedule.steps_per_epoch):
                step_lr = schedule.lr_at(state.global_step)
                set_lr(optimizer, step_lr)
                seed_step(args.seed, state.global_step, self.rank)
                step_loss, skipped = None, 0
                for micro in range(args.update_freq):
                    try:
                        batch = next(batches)
                    except DataError as err:  # raised in a worker, it carries the worker's traceback
                        self.stop(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1],
                                  advice="make the data readable")
                    sync = micro == args.update_freq - 1  # all-reduce gradients on the last micro-step only
                    with contextlib.nullcontext() if sync else acc.no_sync(model):
                        with acc.autocast():
                            loss, n_skipped = micro_step(batch)
                        acc.backward(loss / args.update_freq)
                    loss = loss.detach().float() / args.update_freq
                    step_loss = loss if step_loss is None else step_loss + loss
                    skipped += n_skipped
                log_now = (state.global_step + 1) % args.log_every == 0
                grad_norm = None
                if args.clip_grad is not None or log_now:
                    max_norm = args.clip_grad if args.clip_grad is not None else float("inf")
                    grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.pending.append((state.global_step, step_lr, step_loss, skipped))
                state.global_step += 1
                state.step_in_epoch = step + 1
                if after_step is not None:
                    after_step()
                progress.update(1)
                if log_now:
                    loss_value = self.read_losses(epoch, progress)
                    if self.log_with:
                        scalars = {"train/loss": loss_value, "train/lr": step_lr,
                                   "train/images_per_s": self.images_per_s}
                        if grad_norm is not None:
                            scalars["train/grad_norm"] = float(grad_norm)
                        acc.log(scalars, step=state.global_step)
                if args.save_ckpt_steps and state.global_step % args.save_ckpt_steps == 0:
                    self.checkpoint(epoch, progress)
                if state.global_step >= schedule.last_step:
                    stopped = True
                    break

            self.read_losses(epoch, progress)
            sums = state.epoch_sums
            epoch_done = state.step_in_epoch == schedule.steps_per_epoch
            extra = {}
            if epoch_done:
                state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
                extra = (end_epoch(epoch) if end_epoch is not None else None) or {}
            if stopped or (epoch_done and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == schedule.epochs)):
                self.checkpoint()
            if epoch_done:
                self.append_log({"train_loss": sums["loss"] / sums["steps"], "train_lr": sums["lr"] / sums["steps"],
                                 **extra, "epoch": epoch, "n_parameters": n_parameters,
                                 "skipped_images": sums["skipped"]})
        progress.close()

    def read_losses(self, epoch, progress=None):
        """Read back the losses of the steps not read yet (one host synchronisation and one
        all-reduce for all of them), add them to the epoch's sums and stop on a non-finite one.
        Returns the newest step's loss (None when nothing was pending)."""
        pending, sums = self.pending, self.state.epoch_sums
        if not pending:
            return None
        losses = torch.stack([loss for _, _, loss, _ in pending])
        skipped = torch.tensor([float(n) for *_, n in pending], device=losses.device)
        totals = self.accelerator.reduce(torch.cat([losses, skipped]), reduction="sum").tolist()
        for (step, lr, _, _), loss_sum, n_skipped in zip(pending, totals, totals[len(pending):]):
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

    def stop(self, problem, advice="lower the learning rate (--blr) or use --clip_grad"):
        """Stop every process with `problem`, naming the last good checkpoint."""
        last = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        self.say(f"error: {problem}; stopping. The last good checkpoint is {last or 'none'}; {advice}, then resume "
                 "from it.")
        self.accelerator.end_training()
        sys.exit(1)

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


def trim_log(path, keep_before_epoch):
    """Drop log lines of epochs a resumed run will train again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line).get("epoch", -1) < keep_before_epoch]
    path.write_text("".join(line + "\n" for line in lines))
