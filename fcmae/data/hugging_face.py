"""The source of Hugging Face datasets: folders written by `datasets.save_to_disk`, Parquet files in
the Hub's layout, and `hf:NAME[:SPLIT]` for a dataset on the Hub (or a local copy of its repository).

Rows are read by random access from Arrow's memory map, like a folder's files: keys, data order,
crops, masks and resumes are a folder's (fcmae.data.indexed), and the loader's workers decode the
images through the same decoders. Parquet and Hub datasets are converted once into Arrow files in
the `datasets` cache (HF_DATASETS_CACHE; about the size of the Parquet) by `datasets.load_dataset`,
which later runs reuse; a `save_to_disk` folder is read where it is. `datasets` is an optional
dependency (the `hf` extra), imported only when such data is named.
"""
import bisect
import glob
import io
from pathlib import Path

import numpy as np

from fcmae.config import ConfigError
from fcmae.data.contract import Record, Selection
from fcmae.data.indexed import IndexedSource

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
ARRAY_FEATURES = ("Array2D", "Array3D")  # images stored as arrays
# where a folder in the Hub's layout keeps its Parquet files: at its top, in data/, or in a folder per
# split (only these are looked in: a folder of a million images is not listed to find out)
PARQUET_FOLDERS = (".", "data", "train", "validation", "valid", "val", "test")


def datasets_library():
    """The datasets library, imported when a Hugging Face dataset is first named."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading a Hugging Face dataset needs the datasets library, which is not installed: "
                          "pip install -e \".[hf]\" in the fcmae checkout (or pip install datasets)") from None
    return datasets


def parse_splits(text):
    """'train+validation' (or 'train,validation') -> ('train', 'validation')."""
    names = tuple(name.strip() for name in str(text).replace(",", "+").split("+"))
    if not all(names):
        raise ValueError(f"{text!r} is not a list of split names such as train or train+validation")
    return names


# ----- what a --data_path names -----------------------------------------------------------------------

def kind_of(data_path):
    """'hub', 'dict' / 'dataset' (a save_to_disk folder), 'parquet' (a folder in the Hub's layout),
    'parquet files' (a file or glob), or None when --data_path is no Hugging Face dataset."""
    if data_path is None:
        return None
    text = str(data_path)
    if text.startswith(HUB_PREFIX):
        return "hub"
    folder = Path(text)
    if not folder.is_dir():  # a folder may end in .parquet too (Spark writes such folders)
        return "parquet files" if text.endswith(".parquet") else None
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    if any(next((folder / sub).glob("*.parquet"), None) for sub in PARQUET_FOLDERS):
        return "parquet"
    return None


def is_hugging_face(data_path):
    """Whether --data_path names a Hugging Face dataset."""
    return kind_of(data_path) is not None


def hub_name(data_path):
    """(name, split or None) of hf:NAME[:SPLIT]."""
    name, _, split = str(data_path)[len(HUB_PREFIX):].partition(":")
    return name, split or None


def holds_splits(data_path):
    """Whether --data_path names a dataset with named splits to choose from (not one split of it)."""
    kind = kind_of(data_path)
    return kind in ("dict", "parquet") or kind == "hub" and hub_name(data_path)[1] is None


def load(data_path, flag):
    """{split name: Dataset} of --data_path ({None: Dataset} when it names one unnamed split; all
    the splits of hf:NAME:SPLIT's dataset)."""
    datasets = datasets_library()
    kind, text = kind_of(data_path), str(data_path)
    try:
        if kind in ("dict", "dataset"):
            loaded = datasets.load_from_disk(text)
            return dict(loaded) if kind == "dict" else {str(loaded.split) if loaded.split else None: loaded}
        if kind == "parquet files":
            files = sorted(glob.glob(text))
            if not files:
                raise ConfigError(f"{flag} {text} matches no Parquet file")
            return {None: datasets.load_dataset("parquet", data_files=files, split="train")}
        if kind == "parquet":
            return dict(datasets.load_dataset("parquet", data_dir=text))
        return dict(datasets.load_dataset(hub_name(text)[0]))  # every split; open picks those asked for
    except ConfigError:
        raise
    except Exception as err:  # the library's many error types (missing files, network, Arrow, configs)
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{flag} {text} cannot be read as a Hugging Face dataset ({type(err).__name__}: "
                          f"{detail})") from None


# ----- columns ---------------------------------------------------------------------------------------

def describe(feature):
    """How a message names a column's feature type."""
    name = type(feature).__name__
    if name == "ClassLabel":
        return f"ClassLabel of {feature.num_classes} classes"
    if name == "Value":
        return feature.dtype
    if isinstance(feature, dict):
        return "a struct"
    return name


def is_image(feature):
    """Image features, binary columns and {bytes, path} structs hold encoded images; Array2D and
    Array3D features hold images as arrays ((H, W), (C, H, W) or (H, W, C), see fcmae.data.arrays)."""
    return (type(feature).__name__ in ("Image", *ARRAY_FEATURES)
            or type(feature).__name__ == "Value" and "binary" in feature.dtype
            or isinstance(feature, dict) and "bytes" in feature)


def npy_bytes(array):
    """`array` as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def is_label(feature):
    return type(feature).__name__ == "ClassLabel" or type(feature).__name__ == "Value" and (
        feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string"))


def choose_column(features, chosen, fits, what, flag, where):
    """The column `chosen` names (checked to fit), or the one column whose feature fits."""
    columns = ", ".join(f"{name} ({describe(f)})" for name, f in features.items())
    if chosen is not None:
        if chosen not in features:
            raise ConfigError(f"{where} has no column {chosen!r}; its columns: {columns}")
        if not fits(features[chosen]):
            raise ConfigError(f"the column {chosen!r} of {where} holds {describe(features[chosen])}, not {what}; its "
                              f"columns: {columns}")
        return chosen
    candidates = [name for name, f in features.items() if fits(f)]
    if what == "class labels":  # by feature type: a ClassLabel when there is one
        candidates = [n for n in candidates if type(features[n]).__name__ == "ClassLabel"] or [
            n for n in candidates if n in ("label", "labels")]
    if len(candidates) == 1:
        return candidates[0]
    detail = "no column" if not candidates else f"several columns ({', '.join(candidates)})"
    raise ConfigError(f"{where} has {detail} of {what}; its columns: {columns}; name one with {flag}")


class Part:
    """One split of the data: the Dataset (only the columns read), its image and label columns."""

    def __init__(self, split, dataset, selection, labelled, where):
        self.split, self.where = split, where if split is None else f"split {split} of {where}"
        features = dataset.features
        self.image = choose_column(features, selection.image_column, is_image, "images", "--image_column", self.where)
        self.label = choose_column(features, selection.label_column, is_label, "class labels", "--label_column",
                                   self.where) if labelled else None
        self.dataset = dataset.select_columns([self.image] + ([self.label] if labelled else []))
        if type(features[self.image]).__name__ == "Image":
            self.dataset = self.dataset.cast_column(self.image, datasets_library().Image(decode=False))
        # an array column is read as numpy arrays, handed on as .npy bytes: the array images' own decoder reads them
        self.arrays = self.dataset.with_format("numpy", columns=[self.image], output_all_columns=True) \
            if type(features[self.image]).__name__ in ARRAY_FEATURES else None
        self.classes, self.class_index = None, None
        if labelled:
            self.classes, self.class_index = self.label_names(features[self.label])

    def label_names(self, feature):
        """(class names, {stored value: class index} or None when the stored value is the index)."""
        values = self.dataset.select_columns([self.label]).with_format("arrow")[:][self.label]
        if type(feature).__name__ == "ClassLabel":
            import pyarrow.compute  # installed with datasets
            low = pyarrow.compute.min(values).as_py()
            if low is not None and low < 0:
                raise ConfigError(f"{self.where} has rows without a class label ({self.label} = {low}); fine-tuning "
                                  "and evaluation need labelled rows (choose another split)")
            return list(feature.names), None
        if values.null_count:
            raise ConfigError(f"{self.where} has {values.null_count} rows without a value in its label column "
                              f"{self.label!r}")
        names = sorted(set(values.to_pylist()))
        return [str(n) for n in names], {n: i for i, n in enumerate(names)}

    def __len__(self):
        return len(self.dataset)

    def labels(self):
        """Every row's class index (None when unlabelled), from the label column alone."""
        if self.label is None:
            return [None] * len(self)
        values = self.dataset.select_columns([self.label]).with_format("arrow")[:][self.label].to_pylist()
        return values if self.class_index is None else [self.class_index[v] for v in values]

    def record(self, row, seed_index):
        values = (self.dataset if self.arrays is None else self.arrays)[row]
        image = values[self.image]
        if self.arrays is not None:
            image = npy_bytes(image)
        data = image.get("bytes") if isinstance(image, dict) else image
        path = image.get("path") if isinstance(image, dict) and data is None else None
        label = None
        if self.label is not None:
            value = values[self.label]
            label = value if self.class_index is None else self.class_index[value]
        name = f"row {row} of {self.where}"
        if path:
            return Record(seed_index, label, name, path=path)
        return Record(seed_index, label, name, data=data or b"")  # no image in the row: unreadable


class HuggingFaceSource(IndexedSource):
    """The rows of one or more splits of a Hugging Face dataset, in order (see the module's text)."""
    kind = "a Hugging Face dataset"
    selectable = True

    def __init__(self, parts, where):
        self.parts, self.where = parts, where
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))
        self.classes = parts[0].classes
        differing = [p for p in parts[1:] if p.classes != self.classes]
        if differing:
            raise ConfigError(f"the {differing[0].where} has other classes than the {parts[0].where}; read the "
                              "splits one at a time")

    @classmethod
    def claims(cls, data_path):
        return is_hugging_face(data_path)

    @classmethod
    def open(cls, data_path, labelled=False, flag="--data_path", selection=Selection()):
        loaded = load(data_path, flag)
        where = str(data_path)
        named = hub_name(data_path)[1] if kind_of(data_path) == "hub" else None  # hf:NAME:SPLIT
        if holds_splits(data_path):
            splits = selection.splits or (DEFAULT_SPLIT,)
        elif selection.splits is not None:
            raise ConfigError(f"{flag} {where} is a single split, so no split can be chosen of it (asked for "
                              f"{'+'.join(selection.splits)}); name the whole dataset, or leave the split out")
        else:
            splits = parse_splits(named) if named else tuple(loaded)  # those hf:NAME:SPLIT names, or the one split
        missing = [s for s in splits if s not in loaded]
        if missing:
            raise ConfigError(f"{flag} {where} has no split {missing[0]!r}; its splits: {', '.join(loaded)}")
        parts = [Part(split, loaded[split], selection, labelled, where) for split in splits]
        if not sum(len(part) for part in parts):
            named = f" in {'+'.join(splits)}" if splits != (None,) else ""
            raise ConfigError(f"{flag} {where} holds no rows{named}")
        return cls(parts, where)

    @property
    def count(self):
        return self.offsets[-1]

    def labels(self):
        labels = [label for part in self.parts for label in part.labels()]
        return labels if self.label_map is None or labels[:1] == [None] else [self.label_map[i] for i in labels]

    def image_record(self, index):
        p = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[p].record(index - self.offsets[p], index)
