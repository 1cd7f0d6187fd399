"""Write a folder of images as webdataset tar shards, with the index pretrain.py and finetune.py read.

    python -m fcmae.shards /data/imagenet/train /data/in1k-shards/train --per_shard 1000
    python -m fcmae.shards /data/imagenet/val /data/in1k-shards/val --per_shard 1000 --shuffle false
    python -m fcmae.shards /data/photos /data/photo-shards --max_size 512   # camera photos, shrunk once

SRC with one sub-folder of images per class gives labelled shards (`cls`, and the class names
in index.json); any other folder unlabelled ones. Images go in as stored, shuffled (seeded) so
that each shard mixes the classes; with --max_size those whose longer side exceeds it are
re-encoded to that size first (the others still go in as stored). Running the same command
again continues an interrupted one. See fcmae/data/conversion.py for the layout and
fcmae/data/tar_shards.py for how the training scripts read it.
"""
from pathlib import Path

from fcmae.config import COUNT, POSITIVE_INT, QUALITY, ArgumentParser, ConfigError, command_name, str2bool
from fcmae.data.tar_shards import INDEX
from fcmae.data.conversion import DEFAULT_QUALITY, cpu_count, write_shards


def main(argv=None):
    p = ArgumentParser(command_name("shards"), description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("src", help="a folder of images: class sub-folders (labelled) or any nesting (unlabelled)")
    p.add_argument("out", help="the folder for the shards and index.json")
    p.add_argument("--per_shard", type=POSITIVE_INT, default=1000, help="images per shard")
    p.add_argument("--shuffle", type=str2bool, default=True, help="shuffle the images before sharding")
    p.add_argument("--seed", type=COUNT, default=0, help="seeds the shuffle")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    p.add_argument("--max_size", type=POSITIVE_INT, default=None,
                   help="re-encode images whose longer side exceeds this many pixels to exactly that (aspect kept); "
                        "smaller ones go in as stored (default: none re-encoded)")
    p.add_argument("--quality", type=QUALITY, default=None,
                   help=f"JPEG (and lossy WebP) quality of re-encoded images, with --max_size (default: "
                        f"{DEFAULT_QUALITY})")
    p.add_argument("--workers", type=POSITIVE_INT, default=cpu_count(),
                   help="processes that re-encode, with --max_size; the shards do not depend on it")
    args = p.parse_args(argv)
    if args.quality is not None and args.max_size is None:
        p.error("--quality applies only with --max_size (without it images go in as stored)")
    quality = DEFAULT_QUALITY if args.quality is None else args.quality
    try:
        index = write_shards(args.src, args.out, args.per_shard, args.shuffle, args.seed, args.prefix,
                             max_size=args.max_size, quality=quality, workers=args.workers)
    except ConfigError as err:
        p.error(str(err))
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted; run the same command again to continue where it stopped\n")
    labels = f"{len(index['classes'])} classes" if index["classes"] else "no labels"
    shrunk = ""
    if args.max_size is not None:
        shrunk = (f"; {index['reencoded']} re-encoded to at most {args.max_size} px (quality {quality}), "
                  f"{index['unreadable']} unreadable stored as they were")
    print(f"wrote {index['images']} images ({labels}) in {len(index['shards'])} shards to {args.out}, "
          f"index {Path(args.out) / INDEX}{shrunk}")


if __name__ == "__main__":
    main()
