"""Supervised fine-tuning, linear probing and evaluation of ConvNeXt V2 encoders, driven by accelerate.

    accelerate launch finetune.py --config configs/finetune/convnextv2_atto.yaml \
        --finetune output_dir/encoder.safetensors --data_path /path/to/imagenet-1k --output_dir runs/atto_ft
    python finetune.py --model convnextv2_atto --linear_probe true --finetune encoder.safetensors \
        --data_set image_folder --data_path train/ --eval_data_path val/ --nb_classes 8
    python finetune.py --model convnextv2_atto --eval true --resume runs/atto_ft/model_best.safetensors \
        --data_path /path/to/imagenet-1k

Flags keep the names and defaults of the official main_finetune.py. The model is timm's
convnextv2_<size>; RandAugment, random erasing, Mixup/CutMix (its per-sample modes batched on the
device, fcmae.data.mixup), the losses and EMA are timm's; the loop, checkpoints, exact resume and
logs are the engine pretrain.py uses.
"""
import functools
import math

import torch
from accelerate.utils import set_seed
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from fcmae.config import (
    NON_NEGATIVE, POSITIVE, POSITIVE_INT, ArgumentParser, ConfigError, number, parse_with_config, str2bool,
    usage_errors,
)
from fcmae.data import Mixup, finetune_datasets
from fcmae.data.statistics import write_statistics
from fcmae.models.convnextv2 import create_convnextv2
from fcmae.optim import fused_option, param_groups
from fcmae.training.arguments import add_run_arguments, argument_groups, check_run_args, split_list
from fcmae.training.checkpoint import latest_checkpoint
from fcmae.training.engine import Run, trainable_parameters
from fcmae.training.evaluate import evaluate
from fcmae.training.waits import designed_wait
from fcmae.weights import load_classifier, read_statistics, save_weights
from fcmae.weights.files import statistics_metadata

# What --linear_probe changes: it trains BatchNorm + Linear on frozen features with light
# augmentation (random resized crop and flip), as MAE's linear probing. These beat a config
# file's values; a flag given on the command line beats them.
PROBE_DEFAULTS = dict(aa="none", color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0, cutmix_minmax=None,
                      smoothing=0.0, drop_path=0.0, layer_decay=1.0)
FRACTION = number(float, 0, 1)
BELOW_ONE = number(float, 0, 1, high_open=True)
DESCRIPTION = """Fine-tune, linear-probe or evaluate ConvNeXt V2 encoders (timm's convnextv2_<size>) with
labels. --data_path is required. Defaults are the official recipe's (main_finetune.py); see configs/finetune/
for each size's."""


def get_args_parser():
    p = ArgumentParser("finetune.py", usage="python finetune.py --data_path PATH [options]  (or accelerate launch "
                       "finetune.py ...)", description=DESCRIPTION)
    groups = argument_groups(p)
    add_run_arguments(
        p, groups, output_dir="./output_dir/finetune",
        data_help="required: with --data_set IMNET the root holding train/ and val/, or a Hugging Face dataset "
                  "with train and validation splits (a save_to_disk folder, a Parquet folder, hf:NAME); with "
                  "image_folder the training class folders, shards or one Hugging Face split",
        resume_help="checkpoint folder, or weights file, to continue from (with --eval: the weights to evaluate)")
    p.set_defaults(epochs=100, warmup_epochs=20, blr=5e-4, min_lr=1e-6)

    g = groups["model"]
    g.add_argument("--finetune", default="", help="pretrained weights (any layout fcmae.weights reads)")
    g.add_argument("--drop_path", default=0.0, type=BELOW_ONE, help="stochastic depth rate")
    g.add_argument("--head_init_scale", default=0.001, type=POSITIVE,
                   help="scale of the classifier's initial weights (a model trained from scratch)")
    g.add_argument("--linear_probe", default=False, type=str2bool,
                   help="train only a BatchNorm (no affine) + Linear head on the frozen encoder; turns off "
                        f"{', '.join(PROBE_DEFAULTS)} unless given on the command line")
    g.add_argument("--model_ema", default=False, type=str2bool, help="keep an exponential moving average of the "
                   "weights")
    g.add_argument("--model_ema_decay", default=0.9999, type=FRACTION, help="the EMA's decay per step")
    g.add_argument("--model_ema_force_cpu", default=False, type=str2bool, help="keep the EMA on the CPU")
    g.add_argument("--model_ema_eval", default=False, type=str2bool, help="also evaluate the EMA weights")

    g = groups["optimisation"]
    g.add_argument("--layer_decay", default=1.0, type=number(float, 0, 1, low_open=True),
                   help="layer-wise lr decay: each layer's lr is this times the next one's (1: off)")
    g.add_argument("--layer_decay_type", default="single", choices=["single", "group"],
                   help="'single': one lr scale per block; 'group': three blocks per scale (base and up)")
    g.add_argument("--warmup_steps", default=-1, type=number(int, -1),
                   help="warm-up in optimiser steps; overrides --warmup_epochs when above 0")
    g.add_argument("--opt", default="adamw", help="any optimiser timm's create_optimizer_v2 knows")
    g.add_argument("--opt_eps", default=1e-8, type=POSITIVE, help="the optimiser's epsilon")
    g.add_argument("--opt_betas", default=None, type=BELOW_ONE, nargs="+", help="the optimiser's betas")
    g.add_argument("--momentum", default=0.9, type=FRACTION, help="SGD momentum")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' for none")
    g.add_argument("--color_jitter", default=None, type=NON_NEGATIVE, help="colour jitter strength, used only "
                   "without --aa")
    g.add_argument("--train_interpolation", default="bicubic", choices=["random", "bilinear", "bicubic"],
                   help="resize interpolation of the training crops")
    g.add_argument("--smoothing", default=0.1, type=BELOW_ONE, help="label smoothing")
    g.add_argument("--reprob", default=0.25, type=FRACTION, help="random erasing probability")
    g.add_argument("--remode", default="pixel", choices=["const", "rand", "pixel"], help="random erasing fill")
    g.add_argument("--recount", default=1, type=POSITIVE_INT, help="random erasing count")
    g.add_argument("--mixup", default=0.0, type=NON_NEGATIVE, help="mixup alpha (on when above 0)")
    g.add_argument("--cutmix", default=0.0, type=NON_NEGATIVE, help="cutmix alpha (on when above 0)")
    g.add_argument("--cutmix_minmax", default=None, type=number(float, 0, 1, low_open=True), nargs="+",
                   help="cutmix box size bounds (turn cutmix on; overrides --cutmix)")
    g.add_argument("--mixup_prob", default=1.0, type=FRACTION, help="probability of mixing a batch")
    g.add_argument("--mixup_switch_prob", default=0.5, type=FRACTION, help="probability of cutmix over mixup")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"], help="what mixes")

    g = groups["data"]
    g.add_argument("--data_set", default="IMNET", choices=["IMNET", "image_folder"],
                   help="IMNET: <data_path>/train and /val; image_folder: --data_path and --eval_data_path")
    g.add_argument("--eval_data_path", default=None, help="image_folder: the evaluation class folders (or shards, "
                   "or a Hugging Face dataset)")
    g.add_argument("--train_split", default=None, type=split_list,
                   help="Hugging Face datasets: the training split(s), joined by + (default: train)")
    g.add_argument("--eval_split", default=None, type=split_list,
                   help="Hugging Face datasets: the evaluation split (default: validation)")
    g.add_argument("--label_column", default=None,
                   help="Hugging Face datasets: the column of class labels (default: the one ClassLabel column)")
    g.add_argument("--nb_classes", default=1000, type=POSITIVE_INT, help="must equal the number of class folders")
    g.add_argument("--imagenet_default_mean_and_std", default=True, type=str2bool,
                   help="ImageNet mean/std (true) or Inception's 0.5 (false)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=False, type=str2bool,
                   help="only evaluate one set of weights: --resume, else the newest checkpoint, else --finetune")
    g.add_argument("--disable_eval", default=False, type=str2bool, help="no evaluation during training")
    g.add_argument("--crop_pct", default=None, type=number(float, 0, 1, low_open=True),
                   help="evaluation centre-crop fraction (default 0.875; at 384 px and up a plain resize)")

    groups["devices"].add_argument("--use_amp", default=False, type=str2bool,
                                   help="mixed precision on CUDA (bf16 where supported, else fp16), float32 on CPU; "
                                        "--mixed_precision overrides it")
    groups["devices"].add_argument("--channels_last", default=None, type=str2bool,
                                   help="the model and its inputs in channels-last memory, faster convolutions on "
                                        "GPUs (default: true on CUDA, false elsewhere)")
    return p


def probe_defaults(args):
    """With --linear_probe true, the probe's settings (above a config file, below the command line)."""
    return PROBE_DEFAULTS if args.linear_probe else {}


def check_args(args):
    """What the flags' own ranges cannot say."""
    if args.data_path is None:
        raise ConfigError("--data_path is required: the ImageNet root (train/ and val/) or, with --data_set "
                          "image_folder, a folder of class sub-folders")
    check_run_args(args, weights_flags=("resume", "finetune"))
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f"mixup / cutmix pair each batch with its reverse, so --batch_size must be even, "
                          f"got {args.batch_size}")
    if args.decoder == "dali":
        raise ConfigError("--decoder dali decodes pretraining's crops on the GPU; fine-tuning's augmentation and "
                          "evaluation work on images decoded on the CPU: use --decoder scaled (the default) or full")
    if args.eval and args.disable_eval:
        raise ConfigError("--eval true and --disable_eval true contradict each other")


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_model(args):
    model = create_convnextv2(args.model, num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                              head_init_scale=args.head_init_scale, in_chans=args.in_chans)
    if args.linear_probe:
        width = model.head.fc.in_features
        model.head.fc = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, args.nb_classes))
        nn.init.trunc_normal_(model.head.fc[1].weight, std=0.01)
        nn.init.zeros_(model.head.fc[1].bias)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.fc.")
    return model


def channels_last(args, run):
    """--channels_last, whose default is the device's (true on CUDA)."""
    return args.channels_last if args.channels_last is not None else run.device.type == "cuda"


def on_device(args, run, model):
    """`model` on the run's device, in channels-last memory when asked (its inputs follow)."""
    model = model.to(run.device)
    return model.to(memory_format=torch.channels_last) if channels_last(args, run) else model


def mixed_precision(args):
    """(accelerate's mixed_precision, a note for the user or None) from --mixed_precision / --use_amp."""
    if args.mixed_precision is not None or not args.use_amp:
        return args.mixed_precision, None
    if args.device == "cpu" or not torch.cuda.is_available():
        return None, "--use_amp: no CUDA device, so training runs in float32"
    return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None


def evaluate_only(args, run, model, eval_set):
    """--eval: the accuracy of one set of weights (--resume, else the newest checkpoint in
    output_dir, else --finetune); a checkpoint folder gives its model weights."""
    latest = latest_checkpoint(run.ckpt_dir) if args.auto_resume and run.ckpt_dir else None
    source = args.resume or latest or args.finetune
    if not source:
        raise ConfigError("--eval true needs weights: --resume (a checkpoint folder or weights file), --finetune, "
                          "or a checkpoint in --output_dir")
    loaded = run.load_weights(functools.partial(load_classifier, adapt_stem=args.adapt_stem), model, source)
    if not loaded["head_loaded"]:
        raise ConfigError(f"{source} has no classifier for {args.nb_classes} classes ({loaded['head']}); "
                          "evaluate fine-tuned weights")
    stats = evaluate(run, on_device(args, run, model), eval_set, args.compile, channels_last(args, run))
    run.say(f"accuracy of the network on the {stats['images']} test images: top-1 {stats['acc1']:.2f}%, "
            f"top-5 {stats['acc5']:.2f}%, loss {stats['loss']:.4f}")
    run.write_metrics({"weights": str(source), "data": eval_set.source.where, **stats})
    run.finish()
    return stats


def build_criterion(args):
    """(Mixup/CutMix or None, loss): soft-target cross-entropy under mixup (its targets carry the
    smoothing), else label smoothing, else plain cross-entropy."""
    if mixup_active(args):
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def build_optimizer(args, model, lr):
    """timm's optimiser `--opt` over the layer-decayed parameter groups; ConfigError if timm refuses it."""
    groups = param_groups(model, args.weight_decay, args.layer_decay, args.layer_decay_type)
    extra = dict(eps=args.opt_eps, **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}))
    try:
        return create_optimizer_v2(groups, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, **extra, **fused_option(args.opt))
    except (AssertionError, ValueError, TypeError) as err:
        raise ConfigError(f"--opt {args.opt}: {err}") from None


def evaluation_entries(args, run, model, ema, eval_set):
    """Top-1, top-5 and loss of the model (and of the EMA weights with --model_ema_eval), as log entries."""
    kind = dict(compiled=args.compile, channels_last=channels_last(args, run))
    stats = {f"test_{k}": v for k, v in evaluate(run, model, eval_set, **kind).items()}
    if ema is not None and args.model_ema_eval:
        stats.update({f"test_{k}_ema": v for k, v in evaluate(run, ema.module, eval_set, **kind).items()})
    return stats


def evaluate_epoch(args, run, model, ema, eval_set, epoch):
    """The evaluation at the end of an epoch: said, logged, metrics.json, the best weights kept;
    returns the entries of the epoch's log line."""
    stats = evaluation_entries(args, run, model, ema, eval_set)
    best = keep_best(run, stats, {"": model, "_ema": ema.module if ema is not None else None}, epoch, args.model)
    run.write_metrics({"epoch": epoch, "data": eval_set.source.where, **stats, "best": best})
    run.say(f"epoch {epoch}: top-1 {stats['test_acc1']:.2f}% (best {best['acc1']:.2f}%), top-5 "
            f"{stats['test_acc5']:.2f}%, loss {stats['test_loss']:.4f}"
            + (f"; EMA top-1 {stats['test_acc1_ema']:.2f}%" if "test_acc1_ema" in stats else ""))
    if run.log_with:
        run.accelerator.log({k.replace("test_", "test/"): v for k, v in stats.items()}, step=run.state.global_step)
    return stats


def keep_best(run, stats, weights, epoch, model_name):
    """Update the best accuracies (returned; kept in the run's state, saved with its checkpoints)
    and write model_best{,_ema}.safetensors when they improve; adds max_accuracy entries to
    `stats`. `weights`: {"": model, "_ema": EMA model or None}."""
    best = run.state.script.setdefault("best", {})
    for suffix, module in weights.items():
        acc1 = stats.get(f"test_acc1{suffix}")
        if acc1 is None or module is None:
            continue
        if acc1 > best.get(f"acc1{suffix}", -math.inf):
            best[f"acc1{suffix}"], best[f"epoch{suffix}"] = acc1, epoch
            if run.out and run.args.save_ckpt and run.main_process:
                with designed_wait("checkpoint"):  # the weights copied to the host
                    # with the statistics it was trained with, which an evaluation of it reads back
                    save_weights(module.state_dict(), run.out / f"model_best{suffix}.safetensors",
                                 metadata={"model": model_name, "epoch": str(epoch), "acc1": f"{acc1:.4f}",
                                           **statistics_metadata(vars(run.args))})
        stats[f"max_accuracy{suffix}"] = best[f"acc1{suffix}"]
    return best


def probe_note(args):
    """What --linear_probe turned off, and what the command line kept."""
    kept = [f"--{k} {getattr(args, k)}" for k, v in PROBE_DEFAULTS.items() if getattr(args, k) != v]
    return ("; auto-augment, colour jitter, random erasing, mixup, cutmix, smoothing, drop path and layer decay "
            "off" + (f" except what the command line set: {', '.join(kept)}" if kept else ""))


def summary(args, model, train_set, classes, run):
    what = "linear probe of" if args.linear_probe else "fine-tuning"
    return (f"{what} {args.model} ({trainable_parameters(model) / 1e6:.2f}M trainable parameters) on "
            f"{len(train_set)} images in {len(classes)} classes from {args.data_path}, {args.input_size}px, "
            f"on {run.world} x {run.device} ({run.precision}"
            f"{', channels-last' if channels_last(args, run) else ''}{', torch.compile' if args.compile else ''})"
            + (probe_note(args) if args.linear_probe else ""))


def model_ema(args, model):
    """{"ema": timm's EMA of `model`} with --model_ema (a copy of the loaded weights, where the model
    is; on the host with --model_ema_force_cpu, which copies the weights there every step), else {}."""
    if not args.model_ema:
        return {}
    return {"ema": ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)}


def main(argv=None):
    parser = get_args_parser()
    args = parse_with_config(parser, argv, overrides=probe_defaults)
    with usage_errors(parser):
        check_args(args)
        train_set, eval_set, classes, statistics = finetune_datasets(args, read_statistics(args.resume or args.finetune))
        args.mean, args.std, args.channel_names = statistics["mean"], statistics["std"], statistics["channel_names"]
        precision, note = mixed_precision(args)
        run = Run(args, "fcmae_finetune", mixed_precision=precision,
                  resume_advice=" and pass pretrained weights with --finetune")
        if note:
            run.say(note)
        if "images" in statistics and run.out and run.main_process:  # computed: kept for a restart
            write_statistics(run.out, {k: v for k, v in statistics.items() if k != "source"})
        if not statistics.get("default"):
            run.say(f"statistics: {statistics['source']}")
        schedule = run.plan(train_set, args.warmup_epochs, args.warmup_steps)
        set_seed(args.seed)  # the initial weights (the head, when trained from scratch)
        model = build_model(args)
        if args.eval:
            return evaluate_only(args, run, model, eval_set)
        if channels_last(args, run):  # before the optimiser takes the parameters
            model.to(memory_format=torch.channels_last)
        model, optimizer = run.start(
            model, schedule, lambda m: build_optimizer(args, m, schedule.lr),
            functools.partial(load_classifier, adapt_stem=args.adapt_stem),
            weights=[args.finetune], extras=lambda m: model_ema(args, m),
            summary=lambda m: summary(args, m, train_set, classes, run))  # compiled after the EMA copy is made
    unwrapped, ema = run.accelerator.unwrap_model(model), run.modules.get("ema")
    mixup, criterion = build_criterion(args)

    def train_mode():
        model.train()
        if args.linear_probe:  # frozen encoder: inference mode everywhere but the probe's BatchNorm
            unwrapped.eval()
            unwrapped.head.fc.train()

    inputs_channels_last = channels_last(args, run)

    def micro_step(batch):
        imgs, n_skipped = train_set.prepare(batch, run.device, inputs_channels_last)
        labels = batch.label.to(run.device, non_blocking=True)
        if mixup is not None:
            imgs, labels = mixup(imgs, labels)
        return criterion(model(imgs), labels), n_skipped

    def after_step():
        if ema is not None:
            ema.update(unwrapped, step=run.state.global_step)

    def end_epoch(epoch):
        return {} if eval_set is None else evaluate_epoch(args, run, unwrapped, ema, eval_set, epoch)

    run.fit(model, optimizer, train_set, schedule, micro_step, train_mode=train_mode,
            after_step=after_step, end_epoch=end_epoch)
    run.check_replicas(unwrapped)
    run.finish()
    best = run.state.script.get("best", {})
    if best:
        run.say(f"done after {run.state.global_step} steps: best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}"
                + (f" ({run.out / 'model_best.safetensors'})" if run.out and args.save_ckpt else "")
                + (f"; EMA best {best['acc1_ema']:.2f}%" if "acc1_ema" in best else ""))
    else:
        run.say(f"done after {run.state.global_step} steps")
    return best


if __name__ == "__main__":
    main()
