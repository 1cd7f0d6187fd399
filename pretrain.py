"""FCMAE pretraining of a ConvNeXt V2 encoder, driven by accelerate.

    python pretrain.py                                   # demo: atto on bundled photographs, CPU ok
    accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml --data_path /imagenet

Flags keep the names and defaults of the official main_pretrain.py. accelerate owns devices,
processes, mixed precision and checkpoint state; everything that decides what a step computes
(data order, crops, masks, learning rate) is a function of (seed, step), so a resumed run ends
exactly where the uninterrupted one would have.
"""
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torchvision.utils import save_image
from tqdm.auto import tqdm

import fcmae
from fcmae.config import ArgumentParser, ConfigError, parse_with_config, str2bool
from fcmae.data import (
    ImageFiles, StepBatchSampler, find_images, normalization, pretrain_transform, sample_photographs,
    view_transform,
)
from fcmae.models import BACKEND_CHOICES, list_models, random_patch_mask
from fcmae.training.checkpoint import TrainState, latest_checkpoint, save_checkpoint
from fcmae.training.optim import cosine_lr, param_groups, set_lr
from fcmae.visualize import reconstruction_grid
from fcmae.weights import WeightsError, export, load_into

# Settings for a plain `python pretrain.py` (no --data_path): a few minutes on a laptop CPU.
# Flags and --config still override each of them.
DEMO_DEFAULTS = dict(
    model="convnextv2_atto", input_size=128, batch_size=16, epochs=25, warmup_epochs=1,
    blr=1.5e-2, num_workers=2, save_ckpt_freq=5, output_dir="output_dir/demo", repeats=16,
)


def get_args_parser():
    p = ArgumentParser("pretrain.py", description="FCMAE pretraining of ConvNeXt V2 encoders.")
    p.add_argument("--config", default=None, help="YAML file whose keys are these argument names")
    p.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    p.add_argument("--epochs", default=800, type=int)
    p.add_argument("--warmup_epochs", default=40, type=int)
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--max_steps", default=None, type=int,
                   help="stop after this many optimiser steps (smoke runs); the schedule still "
                        "follows --epochs")
    # model
    p.add_argument("--model", default="convnextv2_base", choices=list_models())
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="encoder implementation")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--in_chans", default=3, type=int, choices=[1, 3])
    p.add_argument("--mask_ratio", default=0.6, type=float)
    p.add_argument("--norm_pix_loss", default=True, type=str2bool, nargs="?", const=True,
                   help="normalise target patches (default true; --norm_pix_loss false to turn off)")
    p.add_argument("--no_norm_pix_loss", dest="norm_pix_loss", action="store_false")
    p.add_argument("--decoder_depth", default=1, type=int)
    p.add_argument("--decoder_embed_dim", default=512, type=int)
    # optimiser
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * batch / 256)")
    p.add_argument("--blr", default=1.5e-4, type=float, help="base lr, scaled by effective batch / 256")
    p.add_argument("--min_lr", default=0.0, type=float)
    p.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (off by default)")
    # data and output
    p.add_argument("--data_path", default=None,
                   help="ImageNet root (with train/), or any folder of images; none: sample photographs")
    p.add_argument("--repeats", default=1, type=int,
                   help="count each image this many times per epoch (for very small data sets)")
    p.add_argument("--output_dir", default="./output_dir", help="checkpoints, logs, pictures; '' saves nothing")
    p.add_argument("--log_dir", default=None, help="TensorBoard / tracker folder (default: output_dir)")
    p.add_argument("--log_with", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    p.add_argument("--log_every", default=20, type=int, help="tracker scalars every N optimiser steps")
    p.add_argument("--vis_every", default=0, type=int,
                   help="reconstruction picture every N optimiser steps too (0: only at epoch ends)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="force a device (default: what accelerate chooses)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: what `accelerate config` / `accelerate launch` set")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="",
                   help="checkpoint folder to resume from, or a weights file with its epoch (an official "
                        "main_pretrain.py checkpoint: weights and epoch carry over, the optimiser starts afresh)")
    p.add_argument("--init", default="", help="start from these weights (any layout fcmae.weights reads)")
    p.add_argument("--auto_resume", default=True, type=str2bool,
                   help="continue from the newest checkpoint in output_dir")
    p.add_argument("--save_ckpt", default=True, type=str2bool)
    p.add_argument("--save_ckpt_freq", default=1, type=int, help="checkpoint every N epochs")
    p.add_argument("--save_ckpt_steps", default=0, type=int, help="also every N optimiser steps (0: off)")
    p.add_argument("--save_ckpt_num", default=3, type=int, help="keep the newest N checkpoints")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin_mem", default=True, type=str2bool)
    return p


def demo_defaults(args):
    """Without --data_path, pretrain the small model on the sample photographs."""
    return DEMO_DEFAULTS if args.data_path is None else {}


def check_args(args):
    positive = ["batch_size", "epochs", "update_freq", "decoder_embed_dim", "save_ckpt_freq", "log_every",
                "repeats"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["warmup_epochs", "decoder_depth", "num_workers", "save_ckpt_steps", "vis_every", "start_epoch"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.input_size % 32 or args.input_size < 32:
        raise ConfigError(f"--input_size must be a multiple of 32 (the patch size), got {args.input_size}")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ConfigError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max_steps must be at least 1, got {args.max_steps}")
    for name in ("resume", "init"):
        if getattr(args, name) and not Path(getattr(args, name)).exists():
            raise ConfigError(f"--{name} {getattr(args, name)} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; leave --device out to use the CPU")


# Depthwise-conv weight gradients come out of the channels-last convs with other (equivalent)
# strides than the weights; DDP copies these small tensors into its buckets. Harmless, so quiet.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def mask_seed(seed, global_step):
    return (seed * 1_000_003 + global_step) * 7_919 + 17


def main(argv=None):
    parser = get_args_parser()
    args = parse_with_config(parser, argv, extra_defaults=demo_defaults)
    try:
        check_args(args)
        files = sample_photographs() if args.data_path is None else find_images(args.data_path)
        transform = pretrain_transform(args.input_size, args.in_chans)
    except ConfigError as err:
        parser.error(str(err))

    out = Path(args.output_dir) if args.output_dir else None
    log_dir = Path(args.log_dir) if args.log_dir else out
    log_with = None if args.log_with == "none" or log_dir is None else args.log_with
    accelerator = Accelerator(
        cpu=args.device == "cpu", mixed_precision=args.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(log_dir or "."), logging_dir=str(log_dir or ".")),
    )
    main_process = accelerator.is_main_process
    say = accelerator.print
    world, rank = accelerator.num_processes, accelerator.process_index

    dataset = ImageFiles(files, transform, args.in_chans, seed=args.seed, repeats=args.repeats)
    eff_batch = args.batch_size * args.update_freq * world
    steps_per_epoch = len(dataset) // eff_batch
    if steps_per_epoch == 0:
        parser.error(f"the data has {len(dataset)} images, fewer than one effective batch of {eff_batch} "
                     "(batch_size x update_freq x processes); lower --batch_size or --update_freq")
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    total_steps = steps_per_epoch * args.epochs
    last_step = min(total_steps, args.max_steps or total_steps)

    set_seed(args.seed)  # the initial weights; data, crops and masks have seeds of their own
    model = fcmae.create_model(
        args.model, backend=args.backend, img_size=args.input_size, mask_ratio=args.mask_ratio,
        decoder_depth=args.decoder_depth, decoder_embed_dim=args.decoder_embed_dim,
        norm_pix_loss=args.norm_pix_loss, in_chans=args.in_chans,
    )
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resume_file = args.resume if args.resume and Path(args.resume).is_file() else ""
    loaded = None
    for weights_path in filter(None, [args.init, resume_file]):
        try:
            loaded = load_into(model, weights_path)
        except WeightsError as err:
            parser.error(f"{weights_path}: {err}")
        dropped = loaded["dropped"]
        say(f"loaded the {loaded['loaded']} from {weights_path}"
            + (f"; left out of it: {', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}" if dropped else "")
            + ("; the decoder starts from its initialisation" if loaded["not_loaded"] else ""))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    ckpt_dir = out / "checkpoints" if out else None
    latest = latest_checkpoint(ckpt_dir) if args.auto_resume and ckpt_dir else None
    # an explicit checkpoint folder first; then this run's own newest checkpoint, which is further
    # along than --init or a --resume weights file it started from
    resume_from = args.resume if args.resume and not resume_file else latest
    if resume_from:
        accelerator.load_state(str(resume_from))
        say(f"resumed from {resume_from} at epoch {state.epoch}, step {state.global_step}")
    elif resume_file:
        state.epoch = int(loaded["extras"].get("epoch", -1)) + 1
        state.global_step = state.epoch * steps_per_epoch
        say(f"continuing from {resume_file} at epoch {state.epoch}, with a fresh optimiser state")
    else:
        state.epoch = args.start_epoch
        state.global_step = args.start_epoch * steps_per_epoch

    source = "the sample photographs bundled with scikit-image" if args.data_path is None else args.data_path
    say(f"pretraining {args.model} ({n_parameters / 1e6:.1f}M parameters, backend {unwrapped.backend}) on "
        f"{len(files)} images from {source}, {args.input_size}px, on {world} x {accelerator.device} "
        f"({accelerator.mixed_precision} mixed precision)")
    say(f"effective batch {eff_batch} = {args.batch_size} x {args.update_freq} accumulation x {world} "
        f"processes; lr {lr:.3g} (blr {lr * 256 / eff_batch:.3g}); {steps_per_epoch} steps per epoch")

    if out and main_process:
        (out / "reconstructions").mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        trim_log(out / "log.txt", keep_before_epoch=state.epoch)
    if log_with:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("fcmae_pretrain", config=hparams)

    num_patches = (args.input_size // 32) ** 2
    # fixed images and masks for the reconstruction pictures
    view = view_transform(args.input_size, args.in_chans)
    vis_imgs = torch.stack([view(dataset.load(i)[0]) for i in range(min(8, len(files)))])
    vis_masks = random_patch_mask(len(vis_imgs), num_patches, args.mask_ratio,
                                  generator=torch.Generator().manual_seed(args.seed))
    mean, std = normalization(args.in_chans)

    def save_picture(tag):
        if not main_process:
            return
        unwrapped.eval()
        with accelerator.autocast():
            grid = reconstruction_grid(unwrapped, vis_imgs.to(accelerator.device),
                                       vis_masks.to(accelerator.device), mean, std)
        unwrapped.train()
        if out:
            save_image(grid, out / "reconstructions" / f"{tag}.png")
        if log_with == "tensorboard":
            accelerator.get_tracker("tensorboard").log_images(
                {"reconstruction": grid.unsqueeze(0).numpy()}, step=state.global_step)

    def checkpoint():
        if out and args.save_ckpt:
            save_checkpoint(accelerator, ckpt_dir, state.global_step, args.save_ckpt_num)

    progress = tqdm(total=last_step, initial=state.global_step, disable=not main_process,
                    desc="pretrain", dynamic_ncols=True)
    model.train()
    stopped = state.global_step >= last_step
    saved_at = state.global_step if resume_from else None
    while state.epoch < args.epochs and not stopped:
        epoch = state.epoch
        sampler = StepBatchSampler(len(dataset), args.batch_size, args.update_freq, world, rank,
                                   args.seed, epoch, start_step=state.step_in_epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=args.num_workers,
            pin_memory=args.pin_mem and accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        sums = state.epoch_sums or {"loss": 0.0, "lr": 0.0, "steps": 0, "skipped": 0}
        tic = time.perf_counter()
        for step in range(state.step_in_epoch, steps_per_epoch):
            step_lr = cosine_lr(state.global_step / steps_per_epoch, lr, args.min_lr, args.epochs,
                                args.warmup_epochs)
            set_lr(optimizer, step_lr)
            masks = random_patch_mask(eff_batch, num_patches, args.mask_ratio,
                                      generator=torch.Generator().manual_seed(mask_seed(args.seed, state.global_step)))
            step_loss = torch.zeros((), device=accelerator.device)
            skipped = 0
            for micro in range(args.update_freq):
                imgs, n_skipped = next(batches)
                first = sampler.offset_in_step(micro)  # this micro-batch's rows of the step's masks
                mask = masks[first:first + args.batch_size].to(accelerator.device, non_blocking=True)
                imgs = imgs.to(accelerator.device, non_blocking=True)
                # gradients are all-reduced only on the last micro-step
                sync = micro == args.update_freq - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, _, _ = model(imgs, mask)
                    accelerator.backward(loss / args.update_freq)
                step_loss += loss.detach() / args.update_freq
                skipped += int(n_skipped.sum())
            log_now = (state.global_step + 1) % args.log_every == 0
            grad_norm = None
            if args.clip_grad is not None or log_now:
                max_norm = args.clip_grad if args.clip_grad is not None else float("inf")
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # the one host sync of a step: global loss (for the log and the finite check), skipped files
            totals = accelerator.reduce(torch.stack([step_loss, torch.tensor(float(skipped), device=step_loss.device)]),
                                        reduction="sum").tolist()
            loss_value, skipped = totals[0] / world, int(totals[1])
            if not math.isfinite(loss_value):
                last = latest_checkpoint(ckpt_dir) if ckpt_dir else None
                say(f"error: the loss became {loss_value} at step {state.global_step} (epoch {epoch}); "
                    f"stopping. The last good checkpoint is {last or 'none'}; lower --blr or use "
                    "--clip_grad, then resume from it.")
                accelerator.end_training()
                sys.exit(1)
            state.global_step += 1
            state.step_in_epoch = step + 1
            sums["loss"] += loss_value
            sums["lr"] += step_lr
            sums["steps"] += 1
            sums["skipped"] += skipped
            state.epoch_sums = sums
            images_per_s = eff_batch * (step + 1 - sampler.start_step) / (time.perf_counter() - tic)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{step_lr:.2e}",
                                 img_s=f"{images_per_s:.1f}", refresh=False)
            if log_with and log_now:
                scalars = {"train/loss": loss_value, "train/lr": step_lr, "train/images_per_s": images_per_s}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                accelerator.log(scalars, step=state.global_step)
            if args.vis_every and state.global_step % args.vis_every == 0:
                save_picture(f"step_{state.global_step:08d}")
            if args.save_ckpt_steps and state.global_step % args.save_ckpt_steps == 0:
                checkpoint()
                saved_at = state.global_step
            if state.global_step >= last_step:
                stopped = True
                break

        epoch_done = state.step_in_epoch == steps_per_epoch
        if epoch_done:
            state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
            save_picture(f"epoch_{epoch:04d}")
        epoch_ckpt = epoch_done and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs)
        if (epoch_ckpt or stopped) and saved_at != state.global_step:
            checkpoint()
            saved_at = state.global_step
        if epoch_done and out and main_process:
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps({"train_loss": sums["loss"] / sums["steps"], "train_lr": sums["lr"] / sums["steps"],
                                    "epoch": epoch, "n_parameters": n_parameters,
                                    "skipped_images": sums["skipped"]}) + "\n")
    progress.close()
    if world > 1:  # DDP keeps replicas equal; check it once, cheaply, at the end
        checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum()
        sums_all = accelerator.gather(checksum.reshape(1))
        if not torch.equal(sums_all, sums_all[:1].expand_as(sums_all)):
            say("error: the processes' parameters differ at the end of training")
            sys.exit(1)
        say(f"parameters identical on all {world} processes")

    if out and main_process:
        export(unwrapped, "timm", out / "encoder.safetensors")  # atomic, safetensors, timm layout
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if out:
        say(f"done after {state.global_step} steps: encoder {out / 'encoder.safetensors'} (timm layout), "
            f"checkpoints {ckpt_dir}, log {out / 'log.txt'}, pictures {out / 'reconstructions'}"
            + (f", {args.log_with} logs {log_dir}" if log_with else ""))
    else:
        say(f"done after {state.global_step} steps (nothing saved: --output_dir is empty)")


def trim_log(path, keep_before_epoch):
    """Drop log lines of epochs a resumed run will train again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line).get("epoch", -1) < keep_before_epoch]
    path.write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
