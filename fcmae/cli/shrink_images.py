"""Write a copy of a folder of images with the large ones shrunk, for runs that read folders.

    python -m fcmae.shrink /data/photos /data/photos-512 --max_size 512
    pretrain.py ... --data_path /data/photos-512

Decoding a 12-megapixel camera JPEG costs tens of milliseconds in every epoch; shrinking it once
costs about as much once. The copy has the same tree (class folders, any nesting); images whose
longer side exceeds --max_size are re-encoded to exactly that (aspect kept, same format: JPEG at
--quality, PNG lossless), the others copied byte for byte. Running the same command again
continues an interrupted one. python -m fcmae.shards --max_size does the same on the way into shards.
See fcmae/data/shrinking.py (shrink_image) for what is re-encoded and how.
"""
from fcmae.config import POSITIVE_INT, QUALITY, ArgumentParser, ConfigError, command_name
from fcmae.data.conversion import DEFAULT_QUALITY, cpu_count, shrink_folder


def size(count):
    """Bytes as a short figure: 2.41 GB, 312.5 MB, 45.0 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.{1 if unit != 'GB' else 2}f} {unit}"
    return f"{count} B"


def main(argv=None):
    p = ArgumentParser(command_name("shrink"), description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("src", help="a folder of images (class sub-folders or any nesting)")
    p.add_argument("out", help="the folder for the copy: new, or written by an earlier run of this command")
    p.add_argument("--max_size", type=POSITIVE_INT, required=True,
                   help="re-encode images whose longer side exceeds this many pixels to exactly that (aspect kept)")
    p.add_argument("--quality", type=QUALITY, default=DEFAULT_QUALITY,
                   help="JPEG (and lossy WebP) quality of re-encoded images")
    p.add_argument("--workers", type=POSITIVE_INT, default=cpu_count(),
                   help="processes that re-encode; the copy does not depend on it")
    args = p.parse_args(argv)
    try:
        s = shrink_folder(args.src, args.out, args.max_size, args.quality, args.workers)
    except ConfigError as err:
        p.error(str(err))
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted; run the same command again to continue where it stopped\n")
    earlier = f", {s['existing']} already there from an earlier run" if s["existing"] else ""
    print(f"shrank {s['images']} images into {args.out} (at most {args.max_size} px, quality {args.quality}): "
          f"{s['reencoded']} re-encoded, {s['copied']} copied, {s['unreadable']} unreadable (copied as they were)"
          f"{earlier}; {size(s['bytes_before'])} before, {size(s['bytes_after'])} after")


if __name__ == "__main__":
    main()
