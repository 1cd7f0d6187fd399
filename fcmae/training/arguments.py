"""The flags pretrain.py and finetune.py share, declared once, in the help's groups.

Names and defaults follow the official scripts; each script sets the defaults that differ
(epochs, blr, ...) with `parser.set_defaults`. Every numeric flag carries its range in its type
(`fcmae.config.number`), so a value out of range, on the command line or in a config file,
stops the script with one sentence before anything runs.
"""
import argparse
from pathlib import Path

import torch

from fcmae.config import (
    COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigError, float_list, name_list, number, str2bool,
)
from fcmae.data.decoders import DECODERS, DEFAULT_DECODER
from fcmae.data.hugging_face import parse_splits
from fcmae.models import ENCODER_STRIDE, list_models
from fcmae.training.signals import DEFAULT_STOP_SIGNALS, PREEMPTED_EXIT_CODE, parse_signals

# (key, title) of the help's groups, in order
GROUPS = (
    ("model", "model"),
    ("optimisation", "optimisation"),
    ("data", "data"),
    ("checkpoints", "checkpoints and logs"),
    ("devices", "devices and precision"),
)


def argument_groups(parser):
    """The help's groups of `parser`, by key (see GROUPS)."""
    return {key: parser.add_argument_group(title) for key, title in GROUPS}


def add_run_arguments(parser, groups, output_dir, data_help, resume_help):
    """The shared flags: `parser` gets --config and --seed, `groups` (from argument_groups) the rest."""
    parser.add_argument("--config", default=None, help="YAML file whose keys are these flags' names; flags on the "
                        "command line override it")
    parser.add_argument("--seed", default=0, type=COUNT, help="seeds the initial weights, the data order, the "
                        "crops, pretraining's masks and every step's randomness")

    g = groups["model"]
    g.add_argument("--model", default="convnextv2_base", choices=list_models(), metavar="NAME",
                   help=f"ConvNeXt V2 size: {', '.join(list_models())}")
    g.add_argument("--input_size", default=224, type=number(int, ENCODER_STRIDE), help="image side in pixels")
    g.add_argument("--in_chans", default=3, type=POSITIVE_INT,
                   help="the images' channels: 3 for RGB, 1 for greyscale, any other number for multi-band TIFFs and "
                        ".npy arrays (see docs/channels.md)")
    g.add_argument("--adapt_stem", default=True, type=str2bool,
                   help="weights with other input channels than --in_chans (RGB weights for 13 bands) load with their "
                        "stem adapted as timm adapts it; false refuses them")

    g = groups["optimisation"]
    g.add_argument("--batch_size", default=64, type=POSITIVE_INT, help="images per process and micro-step")
    g.add_argument("--update_freq", default=1, type=POSITIVE_INT,
                   help="gradient accumulation: micro-steps per optimiser step")
    g.add_argument("--epochs", default=100, type=POSITIVE_INT, help="length of the schedule")
    g.add_argument("--max_steps", default=None, type=POSITIVE_INT,
                   help="stop after this many optimiser steps (smoke runs); the schedule still follows --epochs")
    g.add_argument("--blr", default=1e-3, type=NON_NEGATIVE,
                   help="base learning rate: lr = blr x effective batch / 256, effective batch = batch_size x "
                        "update_freq x processes")
    g.add_argument("--lr", default=None, type=NON_NEGATIVE,
                   help="absolute learning rate; overrides --blr (default: blr x effective batch / 256)")
    g.add_argument("--min_lr", default=0.0, type=NON_NEGATIVE, help="learning rate at the end of the cosine")
    g.add_argument("--warmup_epochs", default=0, type=COUNT, help="epochs of linear learning-rate warm-up")
    g.add_argument("--weight_decay", default=0.05, type=NON_NEGATIVE,
                   help="AdamW weight decay (never on biases, norms, GRN and the mask token)")
    g.add_argument("--clip_grad", default=None, type=POSITIVE, help="clip the gradient norm to this (off by default)")

    g = groups["data"]
    g.add_argument("--data_path", default=None, help=data_help)
    g.add_argument("--num_workers", default=10, type=COUNT, help="DataLoader worker processes per process "
                   "(size them with python -m fcmae.bench --data PATH)")
    g.add_argument("--decoder", default=DEFAULT_DECODER, choices=list(DECODERS),
                   help="how images are decoded: " + "; ".join(f"{k}: {v}" for k, (_, v) in DECODERS.items()))
    g.add_argument("--mean", default=None, type=float_list,
                   help="per-channel mean of the pixels (comma-separated, one per channel; 8- and 16-bit images "
                        "scaled to [0, 1]); default: ImageNet's for RGB and greyscale")
    g.add_argument("--std", default=None, type=float_list, help="per-channel standard deviation, as --mean")
    g.add_argument("--norm_stats", default=None, choices=["auto"],
                   help="auto: --mean and --std computed from --norm_stats_images images of the data (the default "
                        "for channel counts other than 1 and 3), kept in output_dir/statistics.json")
    g.add_argument("--norm_stats_images", default=1000, type=POSITIVE_INT,
                   help="images --norm_stats auto samples (seeded)")
    g.add_argument("--channel_names", default=None, type=name_list,
                   help="the channels' names in order (e.g. B02,B03,B04,B08), kept with the statistics and the "
                        "weights; fine-tuning weights whose names differ is refused")
    g.add_argument("--image_column", default=None,
                   help="Hugging Face datasets: the column of encoded images (default: the one Image column)")
    g.add_argument("--pin_mem", default=True, type=str2bool, help="pinned host memory for faster copies to the GPU")

    g = groups["checkpoints"]
    g.add_argument("--output_dir", default=output_dir, help="checkpoints, logs and results; '' saves nothing")
    g.add_argument("--resume", default="", help=resume_help)
    g.add_argument("--auto_resume", default=True, type=str2bool, help="continue from the newest checkpoint in "
                   "output_dir")
    g.add_argument("--save_ckpt", default=True, type=str2bool, help="write checkpoints")
    g.add_argument("--save_ckpt_freq", default=1, type=POSITIVE_INT, help="a checkpoint every N epochs")
    g.add_argument("--save_ckpt_steps", default=0, type=COUNT, help="also every N optimiser steps (0: off)")
    g.add_argument("--save_ckpt_num", default=3, type=int, help="keep the newest N checkpoints (0: all)")
    g.add_argument("--save_ckpt_minutes", default=0, type=NON_NEGATIVE,
                   help="also when this many minutes have passed since the last save, at the next loss read-back "
                        "(0: off; for clusters that end jobs without a warning signal)")
    g.add_argument("--stop_signals", default=DEFAULT_STOP_SIGNALS, type=signal_list,
                   help="on any of these signals every process finishes its step, a checkpoint is saved at the next "
                        f"loss read-back (within --log_every steps) and the run exits with code {PREEMPTED_EXIT_CODE}; "
                        "'none': the signals' usual effect")
    g.add_argument("--remap_epochs", default=False, type=str2bool,
                   help="resume a checkpoint whose steps per epoch differ from this run's (another effective batch or "
                        "data size) at the same point of the same epoch; refused otherwise")
    g.add_argument("--start_epoch", default=0, type=COUNT, help="epoch to start at when not resuming")
    g.add_argument("--log_dir", default=None, help="TensorBoard / tracker folder (default: output_dir)")
    g.add_argument("--log_with", default="tensorboard", choices=["tensorboard", "wandb", "none"],
                   help="where scalars go besides log.txt")
    g.add_argument("--log_every", default=20, type=POSITIVE_INT,
                   help="read the loss back and log scalars every N optimiser steps")

    g = groups["devices"]
    g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="force a device (default: what accelerate chooses)")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: what `accelerate config` / `accelerate launch` set (the GPU configs in configs/ "
                        "set bf16)")
    g.add_argument("--tf32", default=True, type=str2bool,
                   help="on CUDA without mixed precision: fp32 matrix products and convolutions on tensor cores "
                        "(TF32, about 1e-3 relative error); false for true fp32")
    g.add_argument("--dist_timeout", default=10, type=POSITIVE,
                   help="minutes a process waits in a collective for the others before it fails (a dead peer)")
    g.add_argument("--compile", default=False, type=str2bool,
                   help="torch.compile the model (the first steps take longer while it compiles)")


def split_list(text):
    """An argparse type for split names joined by + (train+validation)."""
    try:
        return parse_splits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def signal_list(text):
    """An argparse type for --stop_signals."""
    try:
        return parse_signals(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_run_args(args, weights_flags=("resume",)):
    """The checks both scripts need beyond each flag's range: files that must exist, the device."""
    for name in ("output_dir", "log_dir"):
        folder = getattr(args, name)
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"--{name} {folder} is a file, not a folder; name a folder (it is created if missing)")
    for name in weights_flags:
        if getattr(args, name) and not Path(getattr(args, name)).exists():
            raise ConfigError(f"--{name} {getattr(args, name)} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; leave --device out to use the CPU")
