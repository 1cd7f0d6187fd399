"""Show what a pretrained FCMAE model sees and draws: original, masked input and reconstruction.

    python -m fcmae.reconstruct output_dir/checkpoints/checkpoint-00012000 photo.jpg cat.png --output grid.png
    python -m fcmae.reconstruct checkpoint-1599.pth photo.jpg --mask_ratio 0.75 --seed 3

WEIGHTS is any file fcmae.weights reads that holds the decoder: this project's checkpoints (a
checkpoint folder or its model.safetensors) or an official main_pretrain.py (MinkowskiEngine)
checkpoint. The model's size, input channels and decoder come from the file, and the input's
statistics from the run the checkpoint belongs to (its statistics.json) when it kept them. Each
image (any file pretraining reads: photographs, multi-band TIFFs, .npy arrays) is resized and
centre cropped to --input_size, masked at random (the same masks for the same --seed) and drawn
as one row of the picture, as pretrain.py draws its own.
"""
import torch
from torchvision.utils import save_image

from fcmae.config import COUNT, ArgumentParser, ConfigError, channel_list, command_name, float_list, number, str2bool
from fcmae.data import Record, view_transform
from fcmae.data.arrays import open_image, whole_image
from fcmae.data.images import UNREADABLE
from fcmae.data.statistics import statistics_for
from fcmae.models import ENCODER_STRIDE, list_models
from fcmae.visualize import picture_masks, reconstruction_grid
from fcmae.weights import WeightsError, load_fcmae


def get_args_parser():
    p = ArgumentParser(command_name("reconstruct"), description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("weights", help="a pretraining checkpoint (with the decoder)")
    p.add_argument("images", nargs="+", help="image files, one row of the picture each")
    p.add_argument("--output", default="reconstruction.png", help="the picture (PNG)")
    p.add_argument("--mask_ratio", default=0.6, type=number(float, 0, 1, high_open=True),
                   help="fraction of each image's patches removed")
    p.add_argument("--seed", default=0, type=COUNT, help="seeds the masks")
    p.add_argument("--input_size", default=224, type=number(int, ENCODER_STRIDE),
                   help=f"image side in pixels, a multiple of {ENCODER_STRIDE}")
    p.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                   help="the ConvNeXt V2 size the weights must be (default: whatever the file holds)")
    p.add_argument("--norm_pix_loss", default=True, type=str2bool,
                   help="whether the model was trained on normalised target patches (the official recipe)")
    p.add_argument("--mean", default=None, type=float_list,
                   help="the per-channel mean the model was trained with (default: the run's, else ImageNet's)")
    p.add_argument("--std", default=None, type=float_list, help="the per-channel standard deviation, as --mean")
    p.add_argument("--show_channels", default=None, type=channel_list,
                   help="the three channels shown as red, green and blue, or one as grey (counted from 0; default: "
                        "RGB, the one channel, or the first three)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.input_size % ENCODER_STRIDE:
        parser.error(f"--input_size must be a multiple of {ENCODER_STRIDE} (the patch size), got {args.input_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA GPU; leave --device out to use the CPU")
    try:
        model, report = load_fcmae(args.weights, mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss)
    except WeightsError as err:
        parser.error(f"{args.weights}: {err}")
    arch = report["architecture"]
    if not arch.has_decoder:
        parser.error(f"{args.weights} holds a {arch.name} encoder without the decoder, so it cannot reconstruct "
                     "anything; pass a pretraining checkpoint (output_dir/checkpoints/checkpoint-<step>, or an "
                     "official main_pretrain.py checkpoint)")
    if args.model and args.model != arch.name:
        parser.error(f"{args.weights} holds {arch.name}, not {args.model}; leave --model out or pass {arch.name}")

    in_chans = model.in_chans
    if args.show_channels is not None and max(args.show_channels) >= in_chans:
        parser.error(f"--show_channels names a channel beyond the {in_chans} the model takes (counted from 0)")
    try:
        statistics = statistics_for(args.weights, in_chans, args.mean, args.std)
        mean, std = statistics["mean"], statistics["std"]
    except ConfigError as err:
        parser.error(str(err))
    view = view_transform(args.input_size, in_chans, mean, std)
    pictures = []
    for path in args.images:
        try:
            with open_image(Record(0, None, path, path=path), in_chans) as img:
                pictures.append(view(whole_image(img, in_chans)))
        except UNREADABLE as err:
            parser.error(f"{path} is not a readable image ({err if isinstance(err, ValueError) else type(err).__name__})")
    imgs = torch.stack(pictures).to(args.device)
    masks = picture_masks(len(imgs), args.input_size, args.mask_ratio, args.seed)
    grid = reconstruction_grid(model.to(args.device).eval(), imgs, masks.to(args.device), mean, std,
                               show=args.show_channels)
    save_image(grid, args.output)
    print(f"wrote {args.output}: {len(imgs)} image(s), {arch.name}, {args.input_size} px, "
          f"{int(masks[0].sum())} of {masks.shape[1]} patches masked; columns: original, masked input, reconstruction")


if __name__ == "__main__":
    main()
