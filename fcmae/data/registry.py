"""The registry of data sources: --data_path goes to the first source that claims it.

A new source is one file (see fcmae.data.contract.Source) and one entry in SOURCES, before
FolderSource, which claims every path the others leave.
"""
from fcmae.config import ConfigError
from fcmae.data.folders import FolderSource
from fcmae.data.images import Images
from fcmae.data.shards import ShardSource

SOURCES = (ShardSource, FolderSource)


def open_source(data_path, labelled=False, flag="--data_path"):
    """The source --data_path names (None: the sample photographs); ConfigError when it cannot be read."""
    source = next(cls for cls in SOURCES if cls.claims(data_path))
    return source.open(data_path, labelled=labelled, flag=flag)


def open_images(data_path, transform, seed=0, repeats=1, decoder=None, labelled=False, flag="--data_path"):
    """The images of --data_path as a dataset (fcmae.data.images.Images) of `transform`'s items."""
    source = open_source(data_path, labelled, flag)
    if repeats != 1:
        if not hasattr(source, "repeats"):
            raise ConfigError(f"--repeats works with folders of images only, not with {source.where}; write the "
                              "data with the images repeated instead")
        source.repeats = repeats
    return Images(source, transform, decoder, seed)
