"""Export the encoder of an FCMAE checkpoint for timm, the official code or Hugging Face, or as an ONNX graph.

    python -m fcmae.export output_dir/checkpoints/checkpoint-00012000 --format timm --output base.safetensors
    python -m fcmae.export checkpoint-1599.pth --format official --output convnextv2_base_fcmae.pt
    python -m fcmae.export output_dir/encoder.safetensors --format hf --output convnextv2-base-fcmae/ --license mit
    python -m fcmae.export runs/atto_ft/model_best.safetensors --format onnx --output atto.onnx

CHECKPOINT is anything fcmae.weights reads: a pretraining checkpoint folder, an exported encoder,
an official (dense or MinkowskiEngine) checkpoint, a timm or Hugging Face state dict, a
fine-tuned classifier. hf writes a model card (README.md) for the Hub beside the weights; onnx
writes timm's convnextv2 as one graph (features or logits, batch axis dynamic) and, when it stays
finite in float16 on sample photographs, its float16 graph too (see docs/serving.md).
"""
from fcmae.config import ArgumentParser, ConfigError, command_name, float_list, number
from fcmae.weights import EXPORT_FORMATS, WeightsError, export
from fcmae.weights import onnx as onnx_export

ONNX_OUTPUTS = ("auto", *onnx_export.OUTPUTS)
DEFAULT_INPUT_SIZE = 224


def get_args_parser():
    parser = ArgumentParser(command_name("export"), description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--format", required=True, choices=(*EXPORT_FORMATS, "onnx"))
    parser.add_argument("--output", required=True, help="file (timm, official, onnx) or folder (hf)")
    parser.add_argument("--pth", action="store_true", help="timm: a torch .pth file instead of safetensors")
    parser.add_argument("--license", default=None,
                        help="hf: the model card's licence, an SPDX-like id such as apache-2.0, mit or cc-by-nc-4.0 "
                             "(default: other, with a line saying it was not stated)")
    parser.add_argument("--onnx_output", default=None, choices=ONNX_OUTPUTS,
                        help="onnx: the graph's output: features (the encoder's, averaged over the positions), "
                             "logits (the classifier's), or auto: logits when the weights have a classifier, else "
                             "features (default: auto)")
    parser.add_argument("--input_size", default=None, type=number(int, 32),
                        help=f"onnx: the image side the graph is traced at (default: {DEFAULT_INPUT_SIZE})")
    parser.add_argument("--mean", default=None, type=float_list,
                        help="onnx: the per-channel mean the graph's input is normalised with, written in its "
                             "metadata (default: the one the weights keep, else ImageNet's for RGB and greyscale)")
    parser.add_argument("--std", default=None, type=float_list, help="onnx: the per-channel standard deviation, "
                                                                      "as --mean")
    return parser


# the flags that belong to one format
FORMAT_FLAGS = (("license", "hf"), ("onnx_output", "onnx"), ("input_size", "onnx"), ("mean", "onnx"),
                ("std", "onnx"))


def check_flags(parser, args):
    """A flag of one format given with another: one sentence."""
    for flag, fmt in FORMAT_FLAGS:
        if getattr(args, flag) is not None and args.format != fmt:
            parser.error(f"--{flag} is for --format {fmt}; leave it out of --format {args.format}")


def export_graph(parser, args):
    try:
        onnx_export.require()
    except WeightsError as err:
        parser.error(str(err))
    try:
        path, report = onnx_export.export_onnx(args.checkpoint, args.output, args.onnx_output or "auto",
                                               args.input_size or DEFAULT_INPUT_SIZE, args.mean, args.std)
    except WeightsError as err:
        parser.error(f"{args.checkpoint}: {err}")
    except ConfigError as err:  # the statistics: its sentence names the weights
        parser.error(str(err))
    shape = (f"(batch, {report['width']})" if report["output"] == "features"
             else f"(batch, {report['num_classes']})")
    print(f"wrote the ONNX graph of {report['model']} to {path}: {onnx_export.INPUT} (batch, {report['in_chans']}, "
          f"{report['input_size']}, {report['input_size']}) -> {report['output']} {shape}, batch axis dynamic; "
          f"the normalisation in its metadata: {report['statistics']['source']}")
    if report["fp16"] is not None:
        print(f"wrote the float16 graph to {report['fp16']}: finite on {report['checked']}, within "
              f"{report['fp16_difference']:.1e} of float32 (relative)")
    else:
        print(report["fp16_problem"])


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.format == "onnx":
        return export_graph(parser, args)
    try:
        path, report = export(args.checkpoint, args.format, args.output, pth=args.pth, license=args.license)
    except WeightsError as err:
        parser.error(f"{args.checkpoint}: {err}")
    left_out = report["dropped"]
    print(f"wrote the {args.format} encoder to {path}"
          + (f"; left out the decoder ({len(left_out)} tensors: proj, mask_token, decoder.*, pred)" if left_out else "")
          + (f"; added {', '.join(report['added'])}" if report.get("added") else "")
          + (f"; its model card is {report['card']}" if report.get("card") else ""))
    if report.get("warning"):
        print(f"warning: {report['warning']}")


if __name__ == "__main__":
    main()
