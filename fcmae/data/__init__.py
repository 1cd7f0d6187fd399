"""Images for pretraining and fine-tuning.

- `contract`: what a data source provides (`Source`, `TrainSampler`), the `Item` every loader
  yields, `collate`, `Crop`, `DataError`;
- sources, one file each: `folders` (folders of image files, the sample photographs),
  `tar_shards` (webdataset tar shards) and `hugging_face` (save_to_disk folders, Parquet, the Hub),
  the random-access ones built on `indexed`; `registry`: SOURCES, which --data_path is matched against;
- `decoders`: how pixels are decoded (Pillow, JPEGs at reduced scale, NVIDIA DALI);
- `transforms`: the augmentations, drawn before decoding, and the normalisation on the device;
- `images`: a source, a transform and a decoder as a torch dataset;
- `sampling`: the seeds of every random stream, the sampler of random-access sources, the masks;
- `splits`: fine-tuning's training and evaluation data, pretraining's monitors' data; `mixup`: Mixup/CutMix on the device;
  `conversion`: writing shards and shrunk copies of folders; `shrinking`: re-encoding one large
  image at a smaller size.
"""
from fcmae.data.contract import Crop, DataError, Item, Record, Selection, Source, TrainSampler, collate
from fcmae.data.decoders import DECODERS, DEFAULT_DECODER, FullDecoder, ScaledDecoder, get_decoder
from fcmae.data.folders import (
    IMG_EXTENSIONS, SAMPLE_PHOTOGRAPHS, FolderSource, class_folders, find_images, sample_photographs,
)
from fcmae.data.hugging_face import HuggingFaceSource, holds_splits, is_hugging_face, parse_splits
from fcmae.data.images import Images
from fcmae.data.indexed import IndexedSource
from fcmae.data.mixup import Mixup
from fcmae.data.registry import SOURCES, open_images, open_source, source_class
from fcmae.data.sampling import STREAMS, StepBatchSampler, WithMasks, derive_seed, seeded, share
from fcmae.data.tar_shards import Shards, ShardBatchSampler, ShardSource, is_shard_source
from fcmae.data.splits import finetune_datasets, held_out_images, knn_images
from fcmae.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, EvalTransform, FinetuneTransform, PretrainTransform, eval_transform, mean_std,
    normalization, to_device, view_transform,
)
from fcmae.data.conversion import write_shards

__all__ = [
    "Crop", "DataError", "Item", "Record", "Selection", "Source", "TrainSampler", "collate", "DECODERS",
    "DEFAULT_DECODER", "FullDecoder", "ScaledDecoder", "get_decoder", "IMG_EXTENSIONS", "SAMPLE_PHOTOGRAPHS",
    "FolderSource", "class_folders", "find_images", "sample_photographs", "HuggingFaceSource", "holds_splits",
    "is_hugging_face", "parse_splits", "Images", "IndexedSource", "Mixup", "SOURCES", "open_images", "open_source",
    "source_class", "STREAMS", "StepBatchSampler", "WithMasks", "derive_seed", "seeded", "share", "Shards",
    "ShardBatchSampler", "ShardSource", "is_shard_source", "finetune_datasets", "held_out_images", "knn_images", "IMAGENET_MEAN", "IMAGENET_STD",
    "EvalTransform", "FinetuneTransform", "PretrainTransform", "eval_transform", "mean_std", "normalization",
    "to_device", "view_transform", "write_shards",
]
