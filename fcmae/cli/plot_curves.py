"""Draw the curves of pretraining runs: training loss, held-out loss and k-NN top-1 against epochs.

    python -m fcmae.curves output_dir/run                      # output_dir/run/curves.png
    python -m fcmae.curves runs/blr1e-4 runs/blr3e-4 --output compare.png

Each OUTPUT_DIR is a pretrain.py output folder; its log.txt has one line per epoch (and the
held-out loss and k-NN accuracy where the run measured them, --eval_data_path and
--knn_train_path). Several folders are drawn over each other, named by their folder, to compare
recipes. pretrain.py draws the same picture for its own run as output_dir/curves.png.
"""
from pathlib import Path

from fcmae.config import ArgumentParser, command_name
from fcmae.visualize import draw_curves, read_log


def get_args_parser():
    p = ArgumentParser(command_name("curves"), description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="pretrain.py output folders (with log.txt)")
    p.add_argument("--output", default=None,
                   help="the picture (PNG; default: OUTPUT_DIR/curves.png for one run, curves.png for several)")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    runs = {}
    for folder in map(Path, args.runs):
        log = folder / "log.txt"
        if not log.is_file():
            parser.error(f"{folder} has no log.txt; name the output folder of a pretrain.py run (--output_dir)")
        records = read_log(log)
        if not records:
            parser.error(f"{log} is empty: the run has not finished an epoch yet")
        runs[folder.name or str(folder)] = records
    output = Path(args.output) if args.output else (Path(args.runs[0]) / "curves.png" if len(runs) == 1
                                                   else Path("curves.png"))
    if output.is_dir():
        parser.error(f"--output {output} is a folder; name a .png file")
    print(f"curves of {len(runs)} run(s): {draw_curves(runs, output)}")
    return output


if __name__ == "__main__":
    main()
