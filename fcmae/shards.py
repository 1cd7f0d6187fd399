"""Write a folder of images as webdataset tar shards, with the index pretrain.py and finetune.py read.

    python -m fcmae.shards /data/imagenet/train /data/in1k-shards/train --per_shard 1000
    python -m fcmae.shards /data/imagenet/val /data/in1k-shards/val --per_shard 1000 --shuffle false

SRC with one sub-folder of images per class gives labelled shards (`cls`, and the class names
in index.json); any other folder unlabelled ones. Images go in as stored, shuffled (seeded) so
that each shard mixes the classes. Running the same command again continues an interrupted one.
See fcmae/data/writing.py for the layout and fcmae/data/shards.py for how the training scripts read it.
"""
from pathlib import Path

from fcmae.config import ArgumentParser, ConfigError, str2bool
from fcmae.data.shards import INDEX
from fcmae.data.writing import write_shards
from fcmae.training.arguments import COUNT, POSITIVE_INT


def main(argv=None):
    p = ArgumentParser("python -m fcmae.shards", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("src", help="a folder of images: class sub-folders (labelled) or any nesting (unlabelled)")
    p.add_argument("out", help="the folder for the shards and index.json")
    p.add_argument("--per_shard", type=POSITIVE_INT, default=1000, help="images per shard")
    p.add_argument("--shuffle", type=str2bool, default=True, help="shuffle the images before sharding")
    p.add_argument("--seed", type=COUNT, default=0, help="seeds the shuffle")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    args = p.parse_args(argv)
    try:
        index = write_shards(args.src, args.out, args.per_shard, args.shuffle, args.seed, args.prefix)
    except ConfigError as err:
        p.error(str(err))
    labels = f"{len(index['classes'])} classes" if index["classes"] else "no labels"
    print(f"wrote {index['images']} images ({labels}) in {len(index['shards'])} shards to {args.out}, "
          f"index {Path(args.out) / INDEX}")




if __name__ == "__main__":
    main()
