"""FCMAE pretraining of a ConvNeXt V2 encoder, driven by accelerate.

    python pretrain.py                                   # demo: atto on bundled photographs, CPU ok
    accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml --data_path /imagenet

Flags keep the names and defaults of the official main_pretrain.py. accelerate owns devices,
processes, mixed precision and checkpoint state; everything that decides what a step computes
(data order, crops, masks, learning rate) is a function of (seed, step), so a resumed run ends
exactly where the uninterrupted one would have.
"""
import functools
import warnings

import torch
from accelerate.utils import set_seed
from torchvision.utils import save_image

import fcmae
from fcmae.config import (
    COUNT, POSITIVE, POSITIVE_INT, ArgumentParser, ConfigError, channel_list, number, parse_with_config, str2bool,
    usage_errors,
)
from fcmae.data import (
    PretrainTransform, Selection, WithMasks, get_decoder, held_out_images, knn_images, normalization, open_images,
    open_source, view_transform,
)
from fcmae.data.arrays import rgb_or_grey
from fcmae.data.statistics import resolve_statistics, write_statistics
from fcmae.models import (
    BACKEND_CHOICES, BACKENDS, ENCODER_STRIDE, num_visible_patches, resolve_backend,
)
from fcmae.optim import pretraining_optimizer
from fcmae.training.arguments import add_run_arguments, argument_groups, check_run_args, split_list
from fcmae.training.engine import Run, trainable_parameters
from fcmae.training.monitors import KnnMonitor, Monitors
from fcmae.training.waits import designed_wait
from fcmae.visualize import draw_curves, picture_masks, read_log, reconstruction_grid
from fcmae.weights import export, load_into

# Settings for a plain `python pretrain.py` (no --data_path): a few minutes on a laptop CPU.
# Flags and --config still override each of them.
DEMO_DEFAULTS = dict(
    model="convnextv2_atto", input_size=128, batch_size=16, epochs=25, warmup_epochs=1,
    blr=1.5e-2, num_workers=2, save_ckpt_freq=5, output_dir="output_dir/demo", repeats=16,
)
DESCRIPTION = f"""FCMAE pretraining of ConvNeXt V2 encoders (ConvNeXt V2 paper, arXiv:2301.00808).
With --data_path, the defaults below are the official recipe's (main_pretrain.py). Without it, a
demo runs on the photographs bundled with scikit-image, with these defaults instead (flags and
--config still override them): {", ".join(f"{k} {v}" for k, v in DEMO_DEFAULTS.items())}."""


def get_args_parser():
    p = ArgumentParser("pretrain.py", description=DESCRIPTION,
                       usage="python pretrain.py [options]  (or accelerate launch pretrain.py [options])")
    groups = argument_groups(p)
    add_run_arguments(
        p, groups, output_dir="./output_dir",
        data_help="ImageNet root (with train/), or any folder of images, nested or flat; webdataset shards; a "
                  "Hugging Face dataset (a save_to_disk folder, Parquet files or their folder, hf:NAME[:SPLIT]); "
                  "labels are not used (default: the demo on the bundled photographs)",
        resume_help="checkpoint folder to resume from, or a weights file with its epoch (an official "
                    "main_pretrain.py checkpoint: weights and epoch carry over, the optimiser starts afresh)")
    p.set_defaults(epochs=800, warmup_epochs=40, blr=1.5e-4, min_lr=0.0)

    g = groups["model"]
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="encoder implementation; all compute "
                   "the same network, 'auto' the fastest installed")
    g.add_argument("--mask_ratio", default=0.6, type=number(float, 0, 1, high_open=True),
                   help="fraction of each image's 32x32 patches removed (int(L x (1 - ratio)) stay visible)")
    g.add_argument("--norm_pix_loss", default=True, type=str2bool, nargs="?", const=True,
                   help="normalise each target patch by its mean and standard deviation")
    g.add_argument("--no_norm_pix_loss", dest="norm_pix_loss", action="store_false",
                   help="the same as --norm_pix_loss false")
    g.add_argument("--decoder_depth", default=1, type=COUNT, help="ConvNeXt V2 blocks in the decoder")
    g.add_argument("--decoder_embed_dim", default=512, type=POSITIVE_INT, help="the decoder's width")
    g.add_argument("--init", default="", help="start from these weights (any layout fcmae.weights reads)")

    groups["data"].add_argument("--repeats", default=1, type=POSITIVE_INT,
                                help="count each image this many times per epoch (for very small data sets)")
    groups["data"].add_argument("--data_splits", default=None, type=split_list,
                                help="Hugging Face datasets: the splits to pretrain on, joined by + (default: train; "
                                     "e.g. train+validation)")
    groups["checkpoints"].add_argument("--vis_every", default=0, type=COUNT,
                                       help="a reconstruction picture every N optimiser steps too (0: only at "
                                            "the end of each epoch)")
    groups["checkpoints"].add_argument("--show_channels", default=None, type=channel_list,
                                       help="the three channels the pictures show as red, green and blue, or one as "
                                            "grey (e.g. 3,2,1; counted from 0; default: RGB, the one channel, or "
                                            "the first three)")

    g = p.add_argument_group("monitors: is pretraining working? (logged to log.txt, metrics.json, the tracker and "
                             "output_dir/curves.png)")
    g.add_argument("--eval_data_path", default=None,
                   help="held-out images (any source --data_path takes): their reconstruction loss, with fixed views "
                        "and masks, every --eval_freq epochs and at the end; the pictures show them")
    g.add_argument("--eval_split", default=None, type=split_list,
                   help="a Hugging Face --data_path's split(s) to hold out instead (e.g. validation)")
    g.add_argument("--eval_freq", default=1, type=POSITIVE_INT, help="the held-out loss every N epochs")
    g.add_argument("--knn_train_path", default=None,
                   help="labelled images (class folders, labelled shards, a Hugging Face dataset or split): the bank "
                        "of an online weighted k-NN classifier on the encoder's pooled features")
    g.add_argument("--knn_eval_path", default=None, help="labelled images the k-NN classifier is scored on")
    g.add_argument("--knn_every", default=1, type=POSITIVE_INT, help="the k-NN accuracy every N epochs")
    g.add_argument("--knn_k", default=20, type=POSITIVE_INT, help="neighbours that vote")
    g.add_argument("--knn_temperature", default=0.07, type=POSITIVE, help="the votes' weight is exp(similarity / T)")
    g.add_argument("--knn_max_images", default=None, type=POSITIVE_INT,
                   help="at most this many bank images, a seeded class-balanced sample (folders, Hugging Face)")
    g.add_argument("--label_column", default=None,
                   help="Hugging Face k-NN data: the column of class labels (default: the one ClassLabel column)")
    return p


def demo_defaults(args):
    """Without --data_path, pretrain the small model on the sample photographs."""
    return DEMO_DEFAULTS if args.data_path is None else {}


def check_args(args):
    """What the flags' own ranges cannot say."""
    check_run_args(args, weights_flags=("resume", "init"))
    if args.input_size % ENCODER_STRIDE:
        raise ConfigError(f"--input_size must be a multiple of {ENCODER_STRIDE} (the patch size), got "
                          f"{args.input_size}")
    backend = BACKENDS.get(args.backend)  # None: auto, which chooses one that compiles
    if args.compile and backend is not None and not backend.compiles:
        raise ConfigError(backend.compile_refusal(f"--backend {backend.name}", f"use --backend "
                                                  f"{resolve_backend('auto')} with --compile, or leave --compile off"))
    patches = (args.input_size // ENCODER_STRIDE) ** 2
    if args.decoder == "dali" and not rgb_or_grey(args.in_chans):
        raise ConfigError(f"--decoder dali decodes RGB and greyscale images, and --in_chans is {args.in_chans}; "
                          "use --decoder scaled")
    if args.show_channels is not None and max(args.show_channels) >= args.in_chans:
        raise ConfigError(f"--show_channels {','.join(map(str, args.show_channels))} names a channel beyond the "
                          f"{args.in_chans} of --in_chans (channels count from 0)")
    if num_visible_patches(patches, args.mask_ratio) == 0:
        raise ConfigError(f"--input_size {args.input_size} and --mask_ratio {args.mask_ratio} leave no patch visible "
                          f"(int({patches} x {1 - args.mask_ratio:g}) = 0 of {patches}); use a larger --input_size or "
                          "a lower --mask_ratio")


# Depthwise-conv weight gradients come out of the channels-last convs with other (equivalent)
# strides than the weights; DDP copies these small tensors into its buckets. Harmless, so quiet.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class Pictures:
    """Original / masked input / reconstruction of fixed images (PIL images; 8 of the data's first
    readable ones) and masks, drawn now and then (output_dir/reconstructions/<tag>.png and
    TensorBoard), by the main process only."""

    def __init__(self, run, model, images, args):
        self.run, self.model = run, model
        self.folder = run.out / "reconstructions" if run.out else None
        view = view_transform(args.input_size, args.in_chans, args.mean, args.std)
        self.images = torch.stack([view(img) for img in images])
        self.masks = picture_masks(len(self.images), args.input_size, args.mask_ratio, args.seed)
        self.num_visible = num_visible_patches(self.masks.shape[1], args.mask_ratio)  # in every mask
        self.mean, self.std = normalization(args.in_chans, args.mean, args.std)
        self.show = args.show_channels
        if self.folder and run.main_process:
            self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, tag):
        run, device = self.run, self.run.device
        if not run.main_process:
            return
        self.model.eval()
        # eager: a picture of 8 images in eval mode is not worth compiling a second graph for
        with designed_wait("reconstruction picture"), run.accelerator.autocast(), \
                torch.compiler.set_stance("force_eager"):
            grid = reconstruction_grid(self.model, self.images.to(device), self.masks.to(device), self.mean, self.std,
                                       num_visible=self.num_visible, show=self.show)
        self.model.train()
        if self.folder:
            save_image(grid, self.folder / f"{tag}.png")
        if run.log_with == "tensorboard":
            run.accelerator.get_tracker("tensorboard").log_images(
                {"reconstruction": grid.unsqueeze(0).numpy()}, step=run.state.global_step)


def summary(args, model, images, run, statistics):
    source = "the sample photographs bundled with scikit-image" if args.data_path is None else args.data_path
    channels = "" if args.in_chans == 3 else f", {args.in_chans} channels"
    return (f"pretraining {args.model} ({trainable_parameters(model) / 1e6:.1f}M parameters, backend "
            f"{model.backend}) on {len(images) // args.repeats} images from {source}, {args.input_size}px{channels}, "
            f"on {run.world} x {run.device} ({run.precision}"
            f"{', torch.compile' if args.compile else ''}); statistics: {statistics['source']}")


def main(argv=None):
    parser = get_args_parser()
    args = parse_with_config(parser, argv, extra_defaults=demo_defaults)
    with usage_errors(parser):
        check_args(args)
        selection = Selection(args.data_splits, args.image_column)
        statistics = resolve_statistics(args, lambda: open_source(args.data_path, selection=selection), args.output_dir)
        # what every transform and picture normalises with
        args.mean, args.std, args.channel_names = statistics["mean"], statistics["std"], statistics["channel_names"]
        images = open_images(args.data_path, PretrainTransform(args.input_size, args.in_chans, args.mean, args.std),
                             seed=args.seed, repeats=args.repeats, decoder=get_decoder(args.decoder),
                             selection=selection)
        held_out, knn = held_out_images(args), knn_images(args)  # the monitors' data, or None
        shown = (held_out or images).pictures(8)  # the pictures' images; a sentence when none can be read
        run = Run(args, "fcmae_pretrain", mixed_precision=args.mixed_precision)
        if "images" in statistics and run.out and run.main_process:  # computed: kept for a restart
            write_statistics(run.out, {k: v for k, v in statistics.items() if k != "source"})
        num_patches = (args.input_size // ENCODER_STRIDE) ** 2
        dataset = WithMasks(images, num_patches, args.mask_ratio, seed=args.seed)  # each image with its mask
        monitors = Monitors(
            run, None if held_out is None else WithMasks(held_out, num_patches, args.mask_ratio, args.seed, held_out=True),
            None if knn is None else KnnMonitor(*knn, args.knn_k, args.knn_temperature),
            num_visible_patches(num_patches, args.mask_ratio), args.eval_freq, args.knn_every)
        schedule = run.plan(dataset, args.warmup_epochs)
        set_seed(args.seed)  # the initial weights; data, crops and masks have seeds of their own
        model = fcmae.create_model(
            args.model, backend=args.backend, mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth,
            decoder_embed_dim=args.decoder_embed_dim, norm_pix_loss=args.norm_pix_loss, in_chans=args.in_chans,
        )
        # an explicit checkpoint folder first; then this run's own newest checkpoint, which is further
        # along than --init or a --resume weights file it started from
        model, optimizer = run.start(
            model, schedule, lambda m: pretraining_optimizer(m, schedule.lr, args.weight_decay),
            functools.partial(load_into, adapt_stem=args.adapt_stem),
            weights=[args.init], compile_options=dict(fullgraph=True),  # encoder, decoder and loss: one graph
            summary=lambda m: summary(args, m, images, run, statistics))
    unwrapped = run.accelerator.unwrap_model(model)
    pictures = Pictures(run, unwrapped, shown, args)
    num_visible = num_visible_patches(num_patches, args.mask_ratio)  # in every mask: no check needs the device

    def micro_step(batch):
        imgs, n_skipped = dataset.prepare(batch, run.device)  # uint8 to normalised floats, on the device
        loss, _, _ = model(imgs, batch.mask.to(run.device, non_blocking=True), num_visible=num_visible)
        return loss, n_skipped

    def after_step():
        if args.vis_every and run.state.global_step % args.vis_every == 0:
            pictures.save(f"step_{run.state.global_step:08d}")

    def end_epoch(epoch):
        pictures.save(f"epoch_{epoch:04d}")
        return monitors(unwrapped, epoch, last=epoch + 1 == schedule.epochs)

    def logged(record):  # curves.png redrawn from log.txt after each of its lines
        if run.out and run.main_process:
            draw_curves({run.out.name: read_log(run.out / "log.txt")}, run.out / "curves.png")

    if run.state.global_step == 0:
        pictures.save("step_00000000")  # the untrained model, to compare the later pictures with
    run.fit(model, optimizer, dataset, schedule, micro_step, after_step=after_step, end_epoch=end_epoch,
            logged=logged)
    monitors.at_end(unwrapped)
    run.check_replicas(unwrapped)
    out = run.out
    if out and run.main_process:
        # atomic, safetensors, timm layout; statistics other than the defaults in its metadata
        kept = None if statistics.get("default") else statistics
        export(unwrapped, "timm", out / "encoder.safetensors", statistics=kept)
    run.finish()
    speed = f"{run.images_per_s:.1f} images/s in the last epoch"
    if out:
        run.say(f"done after {run.state.global_step} steps ({speed}): encoder {out / 'encoder.safetensors'} (timm "
                f"layout), checkpoints {run.ckpt_dir}, log {out / 'log.txt'}, pictures {out / 'reconstructions'}"
                + (f", {args.log_with} logs {run.log_dir}" if run.log_with else ""))
    else:
        run.say(f"done after {run.state.global_step} steps ({speed}; nothing saved: --output_dir is empty)")


if __name__ == "__main__":
    main()
