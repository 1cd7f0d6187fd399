"""Weights files: reading a state dict from any file or folder that holds one, and writing
files atomically. Every problem is a WeightsError of one sentence."""
import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message lists what is wrong."""


# the first bytes of files that are often given where weights are expected
SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"PK\x03\x04", "a zip archive"),
              (b"\x1f\x8b", "a gzip file"), (b"\x80", "a pickle that holds no torch tensors"))
UNCLEAR = ("a zip archive", "a pickle that holds no torch tensors", "a file of unknown kind")


def file_kind(path):
    """What a file that is not weights is, in words, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head[257:262] == b"ustar":
        return "a tar archive"
    kind = next((kind for magic, kind in SIGNATURES if head.startswith(magic)), None)
    if kind:
        return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a file of unknown kind"
    return "a text file"


def read_state_dict(source):
    """(state dict, extras) from a path or a dict; extras holds e.g. the epoch of a training
    checkpoint. Handles folders (accelerate checkpoints, Hugging Face), .safetensors, and torch
    files (plain or wrapped in {"model": ...} / {"state_dict": ...}, DDP "module." prefixes)."""
    extras = {}
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if path.is_dir():
            files = [path / "model.safetensors", path / "pytorch_model.bin"]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                raise WeightsError(f"{path} holds no model.safetensors or pytorch_model.bin")
            path = found
        if not path.is_file():
            raise WeightsError(f"{path} does not exist")
        if path.suffix == ".safetensors":
            data = load_file(str(path))
        else:
            try:
                # official training checkpoints carry their argparse.Namespace
                with torch.serialization.safe_globals([argparse.Namespace]):
                    data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same sentence
                kind = file_kind(path)
                # an image or text file needs no detail; a damaged torch file does
                detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if kind in UNCLEAR else ""
                raise WeightsError(f"{path} is not a readable weights file: it is {kind}{detail}") from None
    if not isinstance(data, dict):
        raise WeightsError("the weights file does not hold a state dict")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(data.get(wrapper), dict):
            extras = {k: v for k, v in data.items() if k != wrapper and isinstance(v, (int, float, str))}
            data = data[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError("the weights file holds no tensors")
    return state, extras


def save_weights(state, path, metadata=None):
    """Write a state dict as safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def atomic_write(path, write):
    """`write(temporary path)`, then rename, so `path` is never half written."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def read_statistics(source):
    """The input statistics ({"mean", "std", "channel_names", "source"}) the weights at `source`
    were trained with, where the file keeps them (None elsewhere): a safetensors file's metadata
    (fcmae's timm export and fine-tuned weights), a Hugging Face folder's config.json (image_mean,
    image_std), or the statistics.json of the run whose checkpoint folder `source` is, or holds
    (RUN/checkpoints/checkpoint-N, its model.safetensors)."""
    if isinstance(source, dict) or not source:
        return None
    path = Path(source)
    if path.is_dir():
        for candidate in (path / "config.json", path.parent.parent / "statistics.json"):
            if candidate.is_file():
                values = json.loads(candidate.read_text())
                mean, std = values.get("image_mean", values.get("mean")), values.get("image_std", values.get("std"))
                if mean is not None and std is not None:
                    return statistics_of(mean, std, values.get("channel_names"), candidate)
        return None
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if "mean" in metadata and "std" in metadata:
            names = metadata.get("channel_names")
            return statistics_of(json.loads(metadata["mean"]), json.loads(metadata["std"]),
                                 None if names is None else json.loads(names), path)
    if path.name == "model.safetensors":  # in a checkpoint folder or a Hugging Face one
        return read_statistics(path.parent)
    return None


STATISTICS_KEYS = ("mean", "std", "channel_names")  # the input's, kept with the weights where a format can


def statistics_metadata(statistics):
    """`statistics` ({"mean", "std", "channel_names"}, or None) as safetensors metadata entries, which
    read_statistics reads back."""
    return {key: json.dumps(list(statistics[key])) for key in STATISTICS_KEYS
            if statistics and statistics.get(key) is not None}


def statistics_of(mean, std, names, where):
    return {"mean": tuple(mean), "std": tuple(std), "channel_names": None if names is None else tuple(names),
            "source": str(where)}
