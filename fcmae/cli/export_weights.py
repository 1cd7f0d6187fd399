"""Export the encoder of an FCMAE checkpoint for timm, the official code or Hugging Face.

    python -m fcmae.export output_dir/checkpoints/checkpoint-00012000 --format timm --output base.safetensors
    python -m fcmae.export checkpoint-1599.pth --format official --output convnextv2_base_fcmae.pt
    python -m fcmae.export output_dir/encoder.safetensors --format hf --output convnextv2-base-fcmae/

CHECKPOINT is anything fcmae.weights reads: a pretraining checkpoint folder, an exported encoder,
an official (dense or MinkowskiEngine) checkpoint, a timm or Hugging Face state dict.
"""
from fcmae.config import ArgumentParser, command_name
from fcmae.weights import EXPORT_FORMATS, WeightsError, export


def main(argv=None):
    parser = ArgumentParser(command_name("export"), description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--output", required=True, help="file (timm, official) or folder (hf)")
    parser.add_argument("--pth", action="store_true", help="timm: a torch .pth file instead of safetensors")
    args = parser.parse_args(argv)
    try:
        path, report = export(args.checkpoint, args.format, args.output, pth=args.pth)
    except WeightsError as err:
        parser.error(f"{args.checkpoint}: {err}")
    left_out = report["dropped"]
    print(f"wrote the {args.format} encoder to {path}"
          + (f"; left out the decoder ({len(left_out)} tensors: proj, mask_token, decoder.*, pred)" if left_out else "")
          + (f"; added {', '.join(report['added'])}" if report.get("added") else ""))


if __name__ == "__main__":
    main()
