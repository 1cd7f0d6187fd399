"""Per-channel statistics of the data (--norm_stats auto): the mean and standard deviation of
every channel over a seeded sample of whole images, in the units the model is fed in (see
fcmae.data.arrays: 8-bit images scaled to [0, 1], 16-bit ones to [0, 1], floats as stored).

Every process computes them over the same sample, in float64, so every process gets the same
values without a collective; a run computes them once and keeps them in its folder
(STATISTICS_FILE), which a restarted run reads back.
"""
import json
import random
import warnings
from pathlib import Path

import torch

from fcmae.config import ConfigError
from fcmae.data.arrays import open_image, rgb_or_grey, whole_image
from fcmae.data.decoders.pil import to_tensor
from fcmae.data.indexed import IndexedSource
from fcmae.data.sampling import derive_seed
from fcmae.data.transforms import normalization

STATISTICS_FILE = "statistics.json"


def sample_records(source, count, seed):
    """`count` records of `source`: a seeded sample, in index order, of a random-access source;
    the first `count` of a stream (shards)."""
    if isinstance(source, IndexedSource):
        chosen = sorted(random.Random(derive_seed(seed, "norm_stats")).sample(range(source.count),
                                                                              min(count, source.count)))
        return [source.image_record(i) for i in chosen]
    records = []
    for record in source.first_records():
        records.append(record)
        if len(records) == count:
            break
    return records


def whole_pixels(record, in_chans):
    """A record's whole image as float (C, H, W) in the model's units."""
    with open_image(record, in_chans) as img:
        image = whole_image(img, in_chans)
    if isinstance(image, torch.Tensor):
        return image
    return to_tensor(image).permute(2, 0, 1).float() / 255  # 8 bits, scaled as ToTensor scales them


def channel_statistics(source, in_chans, count, seed):
    """(mean, std, images used): per channel over `count` images of `source` (see sample_records),
    population standard deviation, accumulated in float64; unreadable images are skipped with a
    warning; ConfigError when none is readable."""
    from fcmae.data.images import UNREADABLE

    total = torch.zeros(in_chans, dtype=torch.float64)
    squares = torch.zeros(in_chans, dtype=torch.float64)
    pixels_seen = used = 0
    problem = None  # the first reason a file itself gives
    for record in sample_records(source, count, seed):
        try:
            pixels = whole_pixels(record, in_chans).double().flatten(1)
        except UNREADABLE as err:
            warnings.warn(f"skipping unreadable image {record.name}: {err}", stacklevel=2)
            problem = problem or (f"{record.name} {err}" if isinstance(err, ValueError) else None)
            continue
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
        pixels_seen += pixels.shape[1]
        used += 1
    if not used:
        why = f" ({problem})" if problem else ""
        raise ConfigError(f"--norm_stats auto found no readable image among {count} of {source.where}{why}; check "
                          "the files and --in_chans")
    mean = total / pixels_seen
    std = (squares / pixels_seen - mean.square()).clamp_min(0).sqrt()
    if (std == 0).any():
        flat = [i for i, s in enumerate(std.tolist()) if s == 0]
        raise ConfigError(f"channel(s) {', '.join(map(str, flat))} of {source.where} are constant over the "
                          f"{used} images sampled, so they cannot be normalised; give --mean and --std instead")
    return tuple(mean.tolist()), tuple(std.tolist()), used


def saved_statistics(folder):
    """The statistics a run saved in `folder` ({"mean", "std", "images", ...}), or None."""
    path = Path(folder) / STATISTICS_FILE if folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def write_statistics(folder, statistics):
    """Save `statistics` in `folder` (whole, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{STATISTICS_FILE}.partial"
    partial.write_text(json.dumps(statistics, indent=1) + "\n")
    partial.replace(folder / STATISTICS_FILE)


def resolve_statistics(args, source, folder, default=None, weights=None):
    """The statistics a run normalises with, as {"mean", "std", "source": how they were found,
    "channel_names" (or None)}, and "default": True for the defaults: --mean and --std; else
    those `weights` were trained with ({"mean", "std", "source"}, see
    fcmae.weights.read_statistics); else, with --norm_stats auto or a channel count other than 1
    and 3, those saved in `folder` by an earlier start of the run, or computed from `source()` (a
    callable: the data is opened only then); else `default` (mean, std), or ImageNet's. The
    channels' names are --channel_names, else the weights'; ConfigError when the two differ."""
    names = channel_names(args, weights)
    if args.mean is not None or args.std is not None:
        mean, std = normalization(args.in_chans, args.mean, args.std)
        return {"mean": mean, "std": std, "source": "--mean and --std", "channel_names": names}
    if weights is not None:
        if len(weights["mean"]) != args.in_chans:
            raise ConfigError(f"the weights {weights['source']} were trained on {len(weights['mean'])}-channel "
                              f"images, and --in_chans is {args.in_chans}; give --mean and --std for this data")
        return {"mean": tuple(weights["mean"]), "std": tuple(weights["std"]),
                "source": f"those of the weights ({weights['source']})", "channel_names": names}
    if args.norm_stats == "auto" or not rgb_or_grey(args.in_chans):
        saved = saved_statistics(folder)
        if saved is not None and len(saved["mean"]) == args.in_chans:
            return {**saved, "source": f"{Path(folder) / STATISTICS_FILE}",
                    "channel_names": names if names is not None else saved.get("channel_names")}
        data = source()
        mean, std, used = channel_statistics(data, args.in_chans, args.norm_stats_images, args.seed)
        return {"mean": mean, "std": std, "images": used, "seed": args.seed,
                "source": f"computed from {used} images of {data.where}", "channel_names": names}
    mean, std = default or normalization(args.in_chans)
    return {"mean": tuple(mean), "std": tuple(std), "source": "the defaults", "channel_names": names,
            "default": names is None}


def channel_names(args, weights=None):
    """--channel_names (checked against --in_chans and the weights' names), else the weights' names, else None."""
    names = getattr(args, "channel_names", None)
    theirs = (weights or {}).get("channel_names")
    if names is not None and len(names) != args.in_chans:
        raise ConfigError(f"--channel_names names {len(names)} channels and --in_chans is {args.in_chans}; name "
                          "each channel once")
    if names is not None and theirs is not None and tuple(names) != tuple(theirs):
        raise ConfigError(f"the weights {weights['source']} were trained on the channels {','.join(theirs)}, and "
                          f"--channel_names is {','.join(names)}; give the data in the weights' order")
    return tuple(names) if names is not None else tuple(theirs) if theirs is not None else None


def statistics_for(weights, in_chans, mean=None, std=None):
    """The input statistics a command that runs `weights` normalises with, as {"mean", "std",
    "channel_names", "source"} (source: where they come from, in words): --mean/--std when given,
    else those the weights keep (fcmae.weights.read_statistics), else the defaults of
    `normalization`; ConfigError (one sentence) when none applies, or when the kept ones have
    another channel count than the weights take."""
    from fcmae.weights import read_statistics

    if mean is not None or std is not None:
        mean, std = normalization(in_chans, mean, std)
        return {"mean": mean, "std": std, "channel_names": None, "source": "given (--mean, --std)"}
    kept = read_statistics(weights)
    if kept is not None:
        if len(kept["mean"]) != in_chans:
            raise ConfigError(f"the statistics kept with the weights ({kept['source']}) have {len(kept['mean'])} "
                              f"channels and the weights take {in_chans}; they do not belong together, so give "
                              f"--mean and --std with {in_chans} values each")
        mean, std = normalization(in_chans, kept["mean"], kept["std"])  # a kept std of 0 is refused too
        return {**kept, "mean": mean, "std": std, "source": f"those kept with the weights ({kept['source']})"}
    try:
        mean, std = normalization(in_chans)
    except ConfigError as err:
        raise ConfigError(f"{weights} keeps no statistics of its input, and {err}") from None
    where = "ImageNet's" if in_chans == 3 else "ImageNet's mean over RGB"
    return {"mean": mean, "std": std, "channel_names": None, "source": f"{where} (the weights keep none)"}
