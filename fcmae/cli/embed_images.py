"""Embed every image of a dataset with a pretrained or fine-tuned encoder: one vector per image,
with its name and label, in the data's own order.

    python -m fcmae.embed encoder.safetensors /data/photos --output photos.parquet
    python -m fcmae.embed model_best.safetensors hf:NAME:validation --output val.npy --output_kind logits
    accelerate launch --num_processes 8 -m fcmae.embed WEIGHTS /data/shards --output all.parquet

WEIGHTS is anything fcmae.weights reads; the model's size and input channels come from it, and the
input's statistics too when it keeps them (--mean/--std otherwise). DATA is any source pretraining
reads (a folder, shards, a Hugging Face dataset). Each image is seen through the evaluation's view
(resize, centre crop, every pixel decoded). --output_kind: "pooled" (the encoder's features,
globally average pooled), "pre_logits" (a classifier's pooled and normalised features, before its
last layer) or "logits". A .parquet output holds the columns index, name, label, class and
embedding; a .npy output the (images, dims) float32 array, with its index, name, label and class
columns in a .csv beside it. Unreadable images are named and left out.

The work is split into parts (one per shard, or --part_size images), each written to
OUTPUT.parts/ when done; a run that was stopped continues with the parts it had not finished.
Under accelerate launch each process embeds its own parts and the first writes the output.
"""
import csv
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from fcmae.config import POSITIVE_INT, ArgumentParser, ConfigError, command_name, float_list, number
from fcmae.data import DEFAULT_DECODER, DECODERS, EvalTransform, Images, Item, Selection, collate, get_decoder
from fcmae.data.registry import open_source
from fcmae.data.statistics import statistics_for
from fcmae.data.tar_shards import ShardSource
from fcmae.models import ENCODER_STRIDE
from fcmae.models.convnextv2 import average_pooled
from fcmae.weights import WeightsError, load_timm
from fcmae.weights.files import atomic_write

OUTPUT_KINDS = ("pooled", "pre_logits", "logits")
SUFFIXES = (".parquet", ".npy")


def get_args_parser():
    p = ArgumentParser(command_name("embed"), description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("weights", help="an encoder, checkpoint or fine-tuned model, in any layout fcmae reads")
    p.add_argument("data", help="a folder of images, shards, or a Hugging Face dataset (hf:NAME[:SPLIT])")
    p.add_argument("--output", required=True, help="the embeddings: a .parquet or .npy file")
    p.add_argument("--output_kind", default="pooled", choices=OUTPUT_KINDS,
                   help="the encoder's pooled features, a classifier's pre-logits, or its logits")
    p.add_argument("--l2_normalize", action="store_true", help="scale every embedding to unit length")
    p.add_argument("--input_size", default=224, type=number(int, ENCODER_STRIDE), help="the view's side in pixels")
    p.add_argument("--crop_pct", default=None, type=number(float, 0, 1, low_open=True),
                   help="the centre crop's share of the resized image (default 0.875, as evaluation)")
    p.add_argument("--decoder", default="full", choices=[d for d in DECODERS if d != "dali"],
                   help=f"full: every pixel decoded; {DEFAULT_DECODER}: JPEGs at reduced scale when the view allows")
    p.add_argument("--mean", default=None, type=float_list,
                   help="the per-channel mean the weights were trained with (default: the weights', else ImageNet's)")
    p.add_argument("--std", default=None, type=float_list, help="the per-channel standard deviation, as --mean")
    p.add_argument("--image_column", default=None, help="Hugging Face datasets: the image column")
    p.add_argument("--label_column", default=None, help="Hugging Face datasets: the label column")
    p.add_argument("--batch_size", default=64, type=POSITIVE_INT, help="images per batch and process")
    p.add_argument("--num_workers", default=4, type=number(int, 0), help="loader processes per process")
    p.add_argument("--part_size", default=10_000, type=POSITIVE_INT,
                   help="images per part of random-access data (shards: one part per shard)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                   help="the forward pass's arithmetic (no: fp32, equal to timm's forward)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    return p


def check_output(path):
    """The output path, or one sentence saying why it cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file name ending in .parquet or .npy")
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"--output {path} must end in .parquet or .npy")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError('a .parquet output needs pyarrow: pip install pyarrow (or "fcmae[hf]"), or write '
                              ".npy") from None
    return path


def open_labelled(data, selection):
    """The source of `data`, with its labels when it has them (class folders, a label column)."""
    try:
        return open_source(data, labelled=True, flag="DATA", selection=selection)
    except ConfigError:
        return open_source(data, labelled=False, flag="DATA", selection=selection)


def embedding_function(model, report, kind, weights):
    """images -> (n, dims) float32 of `kind`; ConfigError when the weights cannot give it."""
    if kind != "pooled":
        if "head.norm.weight" in report["not_loaded"] or model.num_classes == 0 and kind == "logits":
            raise ConfigError(f"{weights} holds an encoder without a classifier head, so it has no {kind}; pass "
                              "fine-tuned weights (finetune.py's model_best.safetensors) or --output_kind pooled")
    if kind == "pooled":
        return lambda x: average_pooled(model, x)
    if kind == "pre_logits":
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True).float()
    return lambda x: model(x).float()


class Unsubstituted(torch.utils.data.Dataset):
    """An Images dataset whose unreadable images stay missing (a training loader puts another image
    in their place): each key gives (item or None, the record)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitems__(self, keys):
        rows = []
        for key in keys:
            record = self.images.source.record(key)
            image = self.images.load(record, record.seed_index, 0)  # None (and a warning) when unreadable
            item = None if image is None else Item(image, -1 if record.label is None else record.label,
                                                   index=record.seed_index)
            rows.append((item, record._replace(data=None)))  # the bytes stay in the worker
        return rows


def collate_rows(rows):
    """(a batch of the readable items or None, their records, the unreadable images' names)."""
    readable = [(item, record) for item, record in rows if item is not None]
    batch = collate([item for item, _ in readable]) if readable else None
    return batch, [record for _, record in readable], [record.name for item, record in rows if item is None]


class Parts:
    """The parts of a run in OUTPUT.parts/: the plan they were made with, and one .npz per part."""

    def __init__(self, output, plan):
        self.folder = output.with_name(output.name + ".parts")
        self.plan = plan

    def path(self, part):
        return self.folder / f"part-{part:05d}.npz"

    def done(self, part):
        return self.path(part).is_file()

    def start(self, main_process):
        """Write the plan (the first process), or check that the parts there were made with it."""
        plan_file = self.folder / "plan.json"
        if main_process and not plan_file.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(plan_file, lambda tmp: tmp.write_text(json.dumps(self.plan, indent=1)))

    def check(self):
        theirs = json.loads((self.folder / "plan.json").read_text())
        differ = sorted(k for k in set(theirs) | set(self.plan) if theirs.get(k) != self.plan.get(k))
        if differ:
            raise ConfigError(f"{self.folder} holds parts of an earlier run with other settings ({', '.join(differ)}); "
                              "give the same settings to continue it, or delete the folder to start again")

    def write(self, part, embeddings, records, unreadable):
        columns = dict(embeddings=embeddings, index=np.array([r.seed_index for r in records], dtype=np.int64),
                       label=np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64),
                       name=np.array([r.name for r in records], dtype=str), unreadable=np.array(unreadable, dtype=str))
        atomic_write(self.path(part), lambda tmp: save_npz(tmp, columns))

    def read_all(self, count):
        parts = [np.load(self.path(p)) for p in range(count)]
        return {key: np.concatenate([part[key] for part in parts]) for key in ("embeddings", "index", "label", "name",
                                                                              "unreadable")}


def write_output(path, rows, classes):
    """The embeddings and their columns, each file written whole and then renamed (the .csv index first)."""
    labels = [None if label < 0 else int(label) for label in rows["label"]]
    names = [None if label is None or classes is None else classes[label] for label in labels]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        embeddings = rows["embeddings"]
        column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), embeddings.shape[1])
        table = pa.table({"index": pa.array(rows["index"], pa.int64()), "name": pa.array(rows["name"].tolist()),
                          "label": pa.array(labels, pa.int64()), "class": pa.array(names, pa.string()),
                          "embedding": column})
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return

    def write_index(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "name", "label", "class"])
            writer.writerows(zip(rows["index"].tolist(), rows["name"].tolist(), labels, names))

    atomic_write(path.with_suffix(".csv"), write_index)
    atomic_write(path, lambda tmp: save_npy(tmp, rows["embeddings"]))


def save_npz(path, columns):
    with open(path, "wb") as f:  # a file, not a name: numpy would add .npz to the temporary name
        np.savez(f, **columns)


def save_npy(path, array):
    with open(path, "wb") as f:
        np.save(f, array)


def part_batches(source, part, parts, batch_size):
    """The key batches of `part` of `parts`: a contiguous share of random-access data, one shard of shards."""
    return list(source.evaluation_batches(part, parts, batch_size))


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA GPU; pass --device cpu")
    try:
        output = check_output(args.output)
        model, report = load_timm(args.weights)
        embed = embedding_function(model, report, args.output_kind, args.weights)
        in_chans = model.stem[0].in_channels
        statistics = statistics_for(args.weights, in_chans, args.mean, args.std)
        mean, std = statistics["mean"], statistics["std"]
        source = open_labelled(args.data, Selection(None, args.image_column, args.label_column))
    except (ConfigError, WeightsError) as err:
        parser.error(str(err) if not isinstance(err, WeightsError) else f"{args.weights}: {err}")

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    say = accelerator.print
    world, rank = accelerator.num_processes, accelerator.process_index
    images = Images(source, EvalTransform(args.input_size, mean, std, args.crop_pct, in_chans),
                    get_decoder(args.decoder))
    count = len(source.shards.urls) if isinstance(source, ShardSource) else math.ceil(len(source) / args.part_size)
    plan = {"weights": str(Path(args.weights).resolve()), "data": args.data, "output_kind": args.output_kind,
            "l2_normalize": args.l2_normalize, "input_size": args.input_size, "crop_pct": args.crop_pct,
            "decoder": args.decoder, "mean": list(mean), "std": list(std), "images": len(source), "parts": count,
            "image_column": args.image_column, "label_column": args.label_column}
    parts = Parts(output, plan)
    parts.start(accelerator.is_main_process)
    accelerator.wait_for_everyone()
    try:
        parts.check()
    except ConfigError as err:
        parser.error(str(err))
    mine = [p for p in range(rank, count, world) if not parts.done(p)]
    done_before = sum(parts.done(p) for p in range(count))
    say(f"embedding {len(source)} images of {source.where} in {count} parts ({done_before} done before) on {world} "
        f"process(es): {args.output_kind} of the {report['architecture'].name} of {args.weights}, "
        f"{args.input_size} px, normalised with {statistics['source']}")

    device = accelerator.device
    model = model.to(device).eval()
    dims = model.num_classes if args.output_kind == "logits" else model.num_features
    batches = {p: part_batches(source, p, count, args.batch_size) for p in mine}
    loader = torch.utils.data.DataLoader(Unsubstituted(images), batch_sampler=[b for p in mine for b in batches[p]],
                                         num_workers=args.num_workers, collate_fn=collate_rows,
                                         pin_memory=device.type == "cuda")
    tic, embedded = time.perf_counter(), 0
    stream = iter(loader)
    with torch.no_grad(), accelerator.autocast():
        for part in mine:
            vectors, records, unreadable = [], [], []
            for _ in batches[part]:
                batch, batch_records, batch_unreadable = next(stream)
                unreadable += batch_unreadable
                if batch is None:
                    continue
                imgs, _ = images.prepare(batch, device)
                vector = embed(imgs)
                vectors.append(torch.nn.functional.normalize(vector, dim=1) if args.l2_normalize else vector)
                records += batch_records
            # the part's one read-back from the device
            matrix = torch.cat(vectors).cpu().numpy() if vectors else np.zeros((0, dims), np.float32)
            parts.write(part, matrix, records, unreadable)
            embedded += len(records)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rows = parts.read_all(count)
        write_output(output, rows, source.classes)
        shutil.rmtree(parts.folder)
        seconds = time.perf_counter() - tic
        missing = len(rows["unreadable"])
        say(f"wrote {len(rows['index'])} embeddings of {dims} values to {output}"
            + (f" (and {output.with_suffix('.csv')})" if output.suffix == ".npy" else "")
            + f"; {embedded} embedded here in {seconds:.1f} s"
            + (f"; {missing} unreadable image(s) left out, named above" if missing else ""))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
