"""Images for pretraining and fine-tuning: folders of files or webdataset shards, transforms,
and the sampling that makes every batch, crop and mask a function of (seed, epoch, position).

`open_images` and `open_labelled` turn --data_path into a dataset of either kind; both kinds
give their own batch sampler (`dataset.batch_sampler`), pictures and evaluation batches.
"""
from fcmae.config import ConfigError
from fcmae.data.folders import (
    IMG_EXTENSIONS, SAMPLE_PHOTOGRAPHS, ImageFiles, LabelledImages, class_folders, find_images, sample_photographs,
)
from fcmae.data.sampling import (
    STREAMS, DataError, StepBatchSampler, WithMasks, derive_seed, seeded, share,
)
from fcmae.data.shards import Shards, ShardBatchSampler, ShardImages, is_shard_source, write_shards
from fcmae.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, eval_transform, finetune_transform, mean_std, normalization, pretrain_transform,
    view_transform,
)


def open_images(data_path, transform, in_chans=3, seed=0, repeats=1):
    """Unlabelled images from --data_path: shards (see fcmae.data.shards), a folder of image
    files, or, when None, the photographs bundled with scikit-image."""
    if data_path is not None and is_shard_source(data_path):
        if repeats != 1:
            raise ConfigError("--repeats works with folders of images only; write the shards with the images "
                              "repeated instead")
        return ShardImages(Shards.open(data_path), transform, in_chans, seed)
    files = sample_photographs() if data_path is None else find_images(data_path)
    return ImageFiles(files, transform, in_chans, seed=seed, repeats=repeats)


def open_labelled(root, transform, in_chans=3, seed=0, flag="--data_path"):
    """(labelled dataset, class names) from class folders or labelled shards."""
    if is_shard_source(root):
        shards = Shards.open(root)
        return ShardImages(shards, transform, in_chans, seed, labelled=True), shards.classes
    files, labels, classes = class_folders(root, flag)
    return LabelledImages(files, labels, transform, in_chans, seed=seed), classes


__all__ = [
    "IMG_EXTENSIONS", "SAMPLE_PHOTOGRAPHS", "ImageFiles", "LabelledImages", "class_folders", "find_images",
    "sample_photographs", "STREAMS", "DataError", "StepBatchSampler", "WithMasks", "derive_seed", "seeded", "share",
    "Shards", "ShardBatchSampler", "ShardImages", "is_shard_source", "write_shards", "IMAGENET_MEAN",
    "IMAGENET_STD", "eval_transform", "finetune_transform", "mean_std", "normalization", "pretrain_transform",
    "view_transform", "open_images", "open_labelled",
]
