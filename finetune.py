"""Supervised fine-tuning, linear probing and evaluation of ConvNeXt V2 encoders, driven by accelerate.

    accelerate launch finetune.py --config configs/finetune/convnextv2_atto.yaml \
        --finetune output_dir/encoder.safetensors --data_path /path/to/imagenet-1k --output_dir runs/atto_ft
    python finetune.py --model convnextv2_atto --linear_probe true --finetune encoder.safetensors \
        --data_set image_folder --data_path train/ --eval_data_path val/ --nb_classes 8
    python finetune.py --model convnextv2_atto --eval true --resume runs/atto_ft/model_best.safetensors \
        --data_path /path/to/imagenet-1k

Flags keep the names and defaults of the official main_finetune.py. The model is timm's
convnextv2_<size>; RandAugment, random erasing, Mixup/CutMix, the losses and EMA are timm's; the
loop, checkpoints, exact resume and logs are the engine pretrain.py uses.
"""
import math
from pathlib import Path

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from fcmae.config import ArgumentParser, ConfigError, parse_with_config, str2bool
from fcmae.data import LabelledImages, class_folders, eval_transform, finetune_transform, mean_std
from fcmae.models import list_models
from fcmae.models.convnextv2 import create_convnextv2
from fcmae.optim import param_groups
from fcmae.training.checkpoint import latest_checkpoint
from fcmae.training.engine import Run, Schedule, add_run_arguments
from fcmae.training.evaluate import evaluate
from fcmae.weights import WeightsError, describe, load_classifier, save_weights

# What --linear_probe turns off: it trains BatchNorm + Linear on frozen features with light
# augmentation (random resized crop and flip), as MAE's linear probing.
PROBE_OVERRIDES = dict(aa=None, color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0, cutmix_minmax=None,
                       smoothing=0.0, drop_path=0.0, layer_decay=1.0)


def get_args_parser():
    p = ArgumentParser("finetune.py", description="Fine-tune, linear-probe or evaluate ConvNeXt V2 encoders.")
    p.add_argument("--config", default=None, help="YAML file whose keys are these argument names")
    p.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--max_steps", default=None, type=int,
                   help="stop after this many optimiser steps (smoke runs); the schedule still follows --epochs")
    # model
    p.add_argument("--model", default="convnextv2_base", choices=list_models())
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--in_chans", default=3, type=int, choices=[1, 3])
    p.add_argument("--drop_path", default=0.0, type=float, help="stochastic depth rate")
    p.add_argument("--layer_decay_type", default="single", choices=["single", "group"],
                   help="'single': one lr scale per block; 'group': three blocks per scale (base and up)")
    p.add_argument("--head_init_scale", default=0.001, type=float,
                   help="scale of the classifier's initial weights (the head of a model trained from scratch)")
    p.add_argument("--linear_probe", default=False, type=str2bool,
                   help="train only a BatchNorm (no affine) + Linear head on the frozen encoder")
    # EMA
    p.add_argument("--model_ema", default=False, type=str2bool)
    p.add_argument("--model_ema_decay", default=0.9999, type=float)
    p.add_argument("--model_ema_force_cpu", default=False, type=str2bool)
    p.add_argument("--model_ema_eval", default=False, type=str2bool, help="also evaluate the EMA weights")
    # optimiser
    p.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (off by default)")
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * batch / 256)")
    p.add_argument("--blr", default=5e-4, type=float, help="base lr, scaled by effective batch / 256")
    p.add_argument("--layer_decay", default=1.0, type=float)
    p.add_argument("--min_lr", default=1e-6, type=float)
    p.add_argument("--warmup_epochs", default=20, type=int)
    p.add_argument("--warmup_steps", default=-1, type=int, help="warm-up in optimiser steps; overrides "
                   "--warmup_epochs when above 0")
    p.add_argument("--opt", default="adamw", help="any optimiser timm's create_optimizer_v2 knows")
    p.add_argument("--opt_eps", default=1e-8, type=float)
    p.add_argument("--opt_betas", default=None, type=float, nargs="+")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    # augmentation
    p.add_argument("--color_jitter", default=None, type=float, help="used only without --aa")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' for none")
    p.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    p.add_argument("--train_interpolation", default="bicubic", choices=["random", "bilinear", "bicubic"])
    p.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    p.add_argument("--remode", default="pixel", choices=["const", "rand", "pixel"])
    p.add_argument("--recount", default=1, type=int)
    p.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (on when above 0)")
    p.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (on when above 0)")
    p.add_argument("--cutmix_minmax", default=None, type=float, nargs="+")
    p.add_argument("--mixup_prob", default=1.0, type=float)
    p.add_argument("--mixup_switch_prob", default=0.5, type=float)
    p.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    # weights
    p.add_argument("--finetune", default="", help="pretrained weights (any layout fcmae.weights reads)")
    # data
    p.add_argument("--data_path", default=None, help="IMNET: the root holding train/ and val/; image_folder: "
                   "the training class folders")
    p.add_argument("--eval_data_path", default=None, help="image_folder: the evaluation class folders")
    p.add_argument("--data_set", default="IMNET", choices=["IMNET", "image_folder"])
    p.add_argument("--nb_classes", default=1000, type=int, help="must equal the number of class folders")
    p.add_argument("--imagenet_default_mean_and_std", default=True, type=str2bool,
                   help="ImageNet mean/std (true) or Inception's 0.5 (false)")
    p.add_argument("--crop_pct", default=None, type=float, help="evaluation centre-crop fraction (default 0.875)")
    # output, precision, resume
    p.add_argument("--use_amp", default=False, type=str2bool,
                   help="mixed precision on CUDA (bf16 where supported, else fp16), float32 on CPU; "
                        "--mixed_precision overrides it")
    p.add_argument("--resume", default="", help="checkpoint folder, or weights file, to continue from "
                   "(with --eval: the weights to evaluate)")
    p.add_argument("--eval", default=False, type=str2bool,
                   help="only evaluate one set of weights: --resume, else the newest checkpoint, else --finetune")
    p.add_argument("--disable_eval", default=False, type=str2bool, help="no evaluation during training")
    add_run_arguments(p, output_dir="./output_dir/finetune")
    return p


def check_args(args):
    for name in ["batch_size", "epochs", "update_freq", "save_ckpt_freq", "log_every", "nb_classes", "recount"]:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["warmup_epochs", "num_workers", "save_ckpt_steps", "start_epoch", "drop_path", "smoothing",
                 "reprob", "mixup", "cutmix"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.input_size < 32:
        raise ConfigError(f"--input_size must be at least 32 (the encoder's stride), got {args.input_size}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ConfigError(f"--crop_pct must be in (0, 1], got {args.crop_pct}")
    if args.layer_decay <= 0:
        raise ConfigError(f"--layer_decay must be above 0, got {args.layer_decay}")
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f"mixup / cutmix pair each batch with its reverse, so --batch_size must be even, "
                          f"got {args.batch_size}")
    if args.eval and args.disable_eval:
        raise ConfigError("--eval true and --disable_eval true contradict each other")
    for name in ("resume", "finetune"):
        if getattr(args, name) and not Path(getattr(args, name)).exists():
            raise ConfigError(f"--{name} {getattr(args, name)} does not exist")
    if args.data_path is None:
        raise ConfigError("--data_path is required: the ImageNet root (train/ and val/) or, with --data_set "
                          "image_folder, a folder of class sub-folders")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; leave --device out to use the CPU")


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def data_folders(args):
    """(training folder or None, evaluation folder or None) for --data_set."""
    root = Path(args.data_path)
    if args.data_set == "IMNET":
        train, val = root / "train", root / "val"
        for folder, what in ((train, "train"), (val, "val")):
            needed = what == "val" and not args.disable_eval or what == "train" and not args.eval
            if needed and not folder.is_dir():
                raise ConfigError(f"--data_path {root} has no {what}/ folder; --data_set IMNET reads <data_path>/train "
                                  "and <data_path>/val (use --data_set image_folder with --eval_data_path for other "
                                  "layouts" + (", or --disable_eval true)" if what == "val" else ")"))
        return (None if args.eval else train), (None if args.disable_eval else val)
    if not args.disable_eval and args.eval_data_path is None:
        raise ConfigError("--data_set image_folder evaluates on --eval_data_path; give it, or --disable_eval true")
    return (None if args.eval else root), (None if args.disable_eval else Path(args.eval_data_path))


def build_datasets(args):
    """(train dataset or None, eval dataset or None, class names), with their class indices agreeing."""
    train_root, eval_root = data_folders(args)
    mean, std = mean_std(args.imagenet_default_mean_and_std, args.in_chans)
    flag = "--data_path" if args.data_set == "image_folder" or args.eval else "--data_path train/"
    train = classes = None
    if train_root is not None or (args.eval and args.data_set == "IMNET" and (Path(args.data_path) / "train").is_dir()):
        root = train_root or Path(args.data_path) / "train"
        files, labels, classes = class_folders(root, flag)
        if args.nb_classes != len(classes):
            raise ConfigError(f"{root} has {len(classes)} class folders but --nb_classes is {args.nb_classes}; "
                              f"pass --nb_classes {len(classes)}")
        if train_root is not None:
            aa = None if args.aa is None or str(args.aa).lower() in ("none", "") else args.aa
            transform = finetune_transform(args.input_size, mean, std, aa, args.color_jitter,
                                           args.train_interpolation, args.reprob, args.remode, args.recount)
            train = LabelledImages(files, labels, transform, args.in_chans, seed=args.seed)
    evaluation = None
    if eval_root is not None:
        flag = "--eval_data_path" if args.data_set == "image_folder" else "--data_path val/"
        files, labels, eval_classes = class_folders(eval_root, flag)
        if classes is None:
            classes = eval_classes
            if args.nb_classes != len(classes):
                raise ConfigError(f"{eval_root} has {len(classes)} class folders but --nb_classes is "
                                  f"{args.nb_classes}; pass --nb_classes {len(classes)}")
        unknown = sorted(set(eval_classes) - set(classes))
        if unknown:
            raise ConfigError(f"{eval_root} has class folders the training data lacks: {', '.join(unknown[:5])}")
        index = {name: i for i, name in enumerate(classes)}  # evaluation labels by class name
        labels = [index[eval_classes[label]] for label in labels]
        evaluation = LabelledImages(files, labels, eval_transform(args.input_size, mean, std, args.crop_pct),
                                    args.in_chans, seed=args.seed)
    return train, evaluation, classes


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


def mixed_precision(args):
    """(accelerate's mixed_precision, a note for the user or None) from --mixed_precision / --use_amp."""
    if args.mixed_precision is not None or not args.use_amp:
        return args.mixed_precision, None
    if args.device == "cpu" or not torch.cuda.is_available():
        return None, "--use_amp: no CUDA device, so training runs in float32"
    return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None


def evaluate_only(args, run, model, eval_set, load, parser):
    """--eval: the accuracy of one set of weights (--resume, else the newest checkpoint in
    output_dir, else --finetune); a checkpoint folder gives its model weights."""
    latest = latest_checkpoint(run.ckpt_dir) if args.auto_resume and run.ckpt_dir else None
    source = args.resume or latest or args.finetune
    if not source:
        parser.error("--eval true needs weights: --resume (a checkpoint folder or weights file), --finetune, "
                     "or a checkpoint in --output_dir")
    loaded = load(source)
    if not loaded["head_loaded"]:
        parser.error(f"{source} has no classifier for {args.nb_classes} classes ({loaded['head']}); "
                     "evaluate fine-tuned weights")
    stats = evaluate(run, model.to(run.device), eval_set)
    run.say(f"accuracy of the network on the {stats['images']} test images: top-1 {stats['acc1']:.2f}%, "
            f"top-5 {stats['acc5']:.2f}%, loss {stats['loss']:.4f}")
    run.finish()
    return stats


def main(argv=None):
    parser = get_args_parser()
    args = parse_with_config(parser, argv)
    if args.linear_probe:
        vars(args).update(PROBE_OVERRIDES)
    try:
        check_args(args)
        train_set, eval_set, classes = build_datasets(args)
    except ConfigError as err:
        parser.error(str(err))

    precision, note = mixed_precision(args)
    run = Run(args, "fcmae_finetune", mixed_precision=precision)
    accelerator, say, out = run.accelerator, run.say, run.out
    if note:
        say(note)
    steps_per_epoch = 1
    if train_set is not None:
        try:
            steps_per_epoch = run.steps_per_epoch(len(train_set))
        except ConfigError as err:
            parser.error(str(err))
    lr = run.peak_lr()
    warmup = args.warmup_steps / steps_per_epoch if args.warmup_steps > 0 else args.warmup_epochs
    schedule = Schedule(args.epochs, steps_per_epoch, lr, args.min_lr, warmup, args.max_steps)

    set_seed(args.seed)  # the initial weights (the head, when trained from scratch)
    model = build_model(args)

    def load(weights_path):
        try:
            loaded = load_classifier(model, weights_path)
        except WeightsError as err:
            parser.error(f"{weights_path}: {err}")
        say(describe(loaded, weights_path))
        return loaded

    if args.eval:
        return evaluate_only(args, run, model, eval_set, load, parser)
    resume_file = args.resume if args.resume and Path(args.resume).is_file() else ""
    loaded = None
    for weights_path in filter(None, [args.finetune, resume_file]):
        loaded = load(weights_path)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ema = None
    if args.model_ema:
        ema = ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    groups = param_groups(model, args.weight_decay, args.layer_decay, args.layer_decay_type)
    optimizer_args = dict(eps=args.opt_eps, **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}))
    try:
        optimizer = create_optimizer_v2(groups, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **optimizer_args)
    except (AssertionError, ValueError, TypeError) as err:
        parser.error(f"--opt {args.opt}: {err}")
    if args.compile:
        model.compile()  # after the EMA copy is made: the copy must not share the compiled call
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.to(accelerator.device if not args.model_ema_force_cpu else "cpu")
        accelerator.register_for_checkpointing(ema)
    try:
        run.restore(model, steps_per_epoch, file_extras=loaded["extras"] if resume_file else None)
    except ConfigError as err:
        parser.error(str(err))

    def evaluate_all():
        """Top-1, top-5 and loss of the model (and of the EMA weights when asked), as log entries."""
        stats = {f"test_{k}": v for k, v in evaluate(run, unwrapped, eval_set).items()}
        if ema is not None and args.model_ema_eval:
            stats.update({f"test_{k}_ema": v for k, v in evaluate(run, ema.module, eval_set).items()})
        return stats

    mixup = None
    if mixup_active(args):
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        criterion = SoftTargetCrossEntropy()  # smoothing is in mixup's soft targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    what = "linear probe of" if args.linear_probe else "fine-tuning"
    say(f"{what} {args.model} ({n_parameters / 1e6:.2f}M trainable parameters) on {len(train_set)} images in "
        f"{len(classes)} classes from {args.data_path}, {args.input_size}px, on {run.world} x {accelerator.device} "
        f"({accelerator.mixed_precision} mixed precision{', torch.compile' if args.compile else ''})"
        + ("; augmentation, mixup, smoothing, drop path and layer decay off" if args.linear_probe else ""))
    run.describe_batch(lr, steps_per_epoch)
    run.open_logs()

    def train_mode():
        model.train()
        if args.linear_probe:  # frozen encoder: inference mode everywhere but the probe's BatchNorm
            unwrapped.eval()
            unwrapped.head.fc.train()

    def micro_step(batch, offset):
        imgs, labels, n_skipped = batch
        imgs, labels = imgs.to(accelerator.device, non_blocking=True), labels.to(accelerator.device, non_blocking=True)
        if mixup is not None:
            imgs, labels = mixup(imgs, labels)
        return criterion(model(imgs), labels), int(n_skipped.sum())

    def after_step():
        if ema is not None:
            ema.update(unwrapped, step=run.state.global_step)

    def end_epoch(epoch):
        if eval_set is None:
            return {}
        stats = evaluate_all()
        best = run.state.best
        for suffix, weights in (("", unwrapped), ("_ema", ema.module if ema is not None else None)):
            acc1 = stats.get(f"test_acc1{suffix}")
            if acc1 is None:
                continue
            if acc1 > best.get(f"acc1{suffix}", -math.inf):
                best[f"acc1{suffix}"], best[f"epoch{suffix}"] = acc1, epoch
                if out and args.save_ckpt and run.main_process:
                    save_weights(weights.state_dict(), out / f"model_best{suffix}.safetensors",
                                 metadata={"model": args.model, "epoch": str(epoch), "acc1": f"{acc1:.4f}"})
            stats[f"max_accuracy{suffix}"] = best[f"acc1{suffix}"]
        say(f"epoch {epoch}: top-1 {stats['test_acc1']:.2f}% (best {best['acc1']:.2f}%), top-5 "
            f"{stats['test_acc5']:.2f}%, loss {stats['test_loss']:.4f}"
            + (f"; EMA top-1 {stats['test_acc1_ema']:.2f}%" if "test_acc1_ema" in stats else ""))
        if run.log_with:
            accelerator.log({k.replace("test_", "test/"): v for k, v in stats.items()}, step=run.state.global_step)
        return stats

    run.fit(model, optimizer, train_set, schedule, micro_step, n_parameters, train_mode=train_mode,
            after_step=after_step, end_epoch=end_epoch)
    run.check_replicas(unwrapped)
    run.finish()
    best = run.state.best
    if best:
        say(f"done after {run.state.global_step} steps: best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}"
            + (f" ({out / 'model_best.safetensors'})" if out and args.save_ckpt else "")
            + (f"; EMA best {best['acc1_ema']:.2f}%" if "acc1_ema" in best else ""))
    else:
        say(f"done after {run.state.global_step} steps")
    return best


if __name__ == "__main__":
    main()
