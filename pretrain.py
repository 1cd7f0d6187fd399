"""FCMAE pretraining of a ConvNeXt V2 encoder, driven by accelerate.

    python pretrain.py                                   # demo: atto on bundled photographs, CPU ok
    accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml --data_path /imagenet

Flags keep the names and defaults of the official main_pretrain.py. accelerate owns devices,
processes, mixed precision and checkpoint state; everything that decides what a step computes
(data order, crops, masks, learning rate) is a function of (seed, step), so a resumed run ends
exactly where the uninterrupted one would have.
"""
import warnings
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torchvision.utils import save_image

import fcmae
from fcmae.config import ArgumentParser, ConfigError, parse_with_config, str2bool
from fcmae.data import ImageFiles, find_images, normalization, pretrain_transform, sample_photographs, view_transform
from fcmae.models import BACKEND_CHOICES, list_models, num_visible_patches, random_patch_mask
from fcmae.optim import param_groups
from fcmae.training.engine import Run, Schedule, add_run_arguments
from fcmae.visualize import reconstruction_grid
from fcmae.weights import WeightsError, describe, export, load_into

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
    p.add_argument("--resume", default="",
                   help="checkpoint folder to resume from, or a weights file with its epoch (an official "
                        "main_pretrain.py checkpoint: weights and epoch carry over, the optimiser starts afresh)")
    p.add_argument("--init", default="", help="start from these weights (any layout fcmae.weights reads)")
    p.add_argument("--vis_every", default=0, type=int,
                   help="reconstruction picture every N optimiser steps too (0: only at epoch ends)")
    add_run_arguments(p, output_dir="./output_dir")
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

    run = Run(args, "fcmae_pretrain", mixed_precision=args.mixed_precision)
    accelerator, say, out = run.accelerator, run.say, run.out
    dataset = ImageFiles(files, transform, args.in_chans, seed=args.seed, repeats=args.repeats)
    try:
        steps_per_epoch = run.steps_per_epoch(len(dataset))
    except ConfigError as err:
        parser.error(str(err))
    lr = run.peak_lr()
    schedule = Schedule(args.epochs, steps_per_epoch, lr, args.min_lr, args.warmup_epochs, args.max_steps)

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
        say(describe(loaded, weights_path))
    # fused: one kernel for the whole update (3x faster than the default on 2 CPU cores, and fewer launches on GPU)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    if args.compile:
        model.compile(fullgraph=True)  # encoder, decoder and loss as one graph; the mask checks stay eager
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # an explicit checkpoint folder first; then this run's own newest checkpoint, which is further
    # along than --init or a --resume weights file it started from
    try:
        run.restore(model, steps_per_epoch, file_extras=loaded["extras"] if resume_file else None)
    except ConfigError as err:
        parser.error(str(err))

    source = "the sample photographs bundled with scikit-image" if args.data_path is None else args.data_path
    say(f"pretraining {args.model} ({n_parameters / 1e6:.1f}M parameters, backend {unwrapped.backend}) on "
        f"{len(files)} images from {source}, {args.input_size}px, on {run.world} x {accelerator.device} "
        f"({accelerator.mixed_precision} mixed precision{', torch.compile' if args.compile else ''})")
    run.describe_batch(lr, steps_per_epoch)
    run.open_logs()
    if out and run.main_process:
        (out / "reconstructions").mkdir(parents=True, exist_ok=True)

    num_patches = (args.input_size // 32) ** 2
    # fixed images and masks for the reconstruction pictures
    view = view_transform(args.input_size, args.in_chans)
    vis_imgs = torch.stack([view(dataset.load(i)[0]) for i in range(min(8, len(files)))])
    vis_masks = random_patch_mask(len(vis_imgs), num_patches, args.mask_ratio,
                                  generator=torch.Generator().manual_seed(args.seed))
    mean, std = normalization(args.in_chans)

    def save_picture(tag):
        if not run.main_process:
            return
        unwrapped.eval()
        # eager: a picture of 8 images in eval mode is not worth compiling a second graph for
        with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            grid = reconstruction_grid(unwrapped, vis_imgs.to(accelerator.device),
                                       vis_masks.to(accelerator.device), mean, std)
        unwrapped.train()
        if out:
            save_image(grid, out / "reconstructions" / f"{tag}.png")
        if run.log_with == "tensorboard":
            accelerator.get_tracker("tensorboard").log_images(
                {"reconstruction": grid.unsqueeze(0).numpy()}, step=run.state.global_step)

    step_masks = {}
    num_visible = num_visible_patches(num_patches, args.mask_ratio)  # in every mask: no check needs the device

    def micro_step(batch, offset):
        imgs, n_skipped = batch
        step = run.state.global_step
        if step not in step_masks:  # the masks of the whole global batch, a function of (seed, step)
            step_masks.clear()
            masks = random_patch_mask(run.eff_batch, num_patches, args.mask_ratio,
                                      generator=torch.Generator().manual_seed(mask_seed(args.seed, step)))
            step_masks[step] = masks.pin_memory() if accelerator.device.type == "cuda" else masks
        mask = step_masks[step][offset:offset + args.batch_size].to(accelerator.device, non_blocking=True)
        loss, _, _ = model(imgs.to(accelerator.device, non_blocking=True), mask, num_visible=num_visible)
        return loss, int(n_skipped.sum())

    def after_step():
        if args.vis_every and run.state.global_step % args.vis_every == 0:
            save_picture(f"step_{run.state.global_step:08d}")

    if run.state.global_step == 0:
        save_picture("step_00000000")  # the untrained model, to compare the later pictures with
    run.fit(model, optimizer, dataset, schedule, micro_step, n_parameters, after_step=after_step,
            end_epoch=lambda epoch: save_picture(f"epoch_{epoch:04d}"))
    run.check_replicas(unwrapped)
    if out and run.main_process:
        export(unwrapped, "timm", out / "encoder.safetensors")  # atomic, safetensors, timm layout
    run.finish()
    speed = f"{run.images_per_s:.1f} images/s in the last epoch"
    if out:
        say(f"done after {run.state.global_step} steps ({speed}): encoder {out / 'encoder.safetensors'} (timm "
            f"layout), checkpoints {run.ckpt_dir}, log {out / 'log.txt'}, pictures {out / 'reconstructions'}"
            + (f", {args.log_with} logs {run.log_dir}" if run.log_with else ""))
    else:
        say(f"done after {run.state.global_step} steps ({speed}; nothing saved: --output_dir is empty)")


if __name__ == "__main__":
    main()
