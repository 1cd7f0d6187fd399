"""The registry of data sources: --data_path goes to the first source that claims it.

A new source is one file (see fcmae.data.contract.Source) and one entry in SOURCES, before
FolderSource, which claims every path the others leave.
"""
from fcmae.config import ConfigError
from fcmae.data.contract import Selection
from fcmae.data.folders import FolderSource
from fcmae.data.hugging_face import HuggingFaceSource
from fcmae.data.images import Images
from fcmae.data.tar_shards import ShardSource

SOURCES = (HuggingFaceSource, ShardSource, FolderSource)


def source_class(data_path):
    """The class of the source that --data_path names."""
    return next(cls for cls in SOURCES if cls.claims(data_path))


def open_source(data_path, labelled=False, flag="--data_path", selection=Selection()):
    """The source --data_path names (None: the sample photographs); ConfigError when it cannot be read."""
    source = source_class(data_path)
    if selection and not getattr(source, "selectable", False):
        chosen = ", ".join(f"{field.replace('_', ' ')} {'+'.join(value) if field == 'splits' else value}"
                           for field, value in selection._asdict().items() if value is not None)
        raise ConfigError(f"{flag} {data_path} is not a Hugging Face dataset, so it has no splits or columns to "
                          f"choose ({chosen}); leave those flags out")
    return source.open(data_path, labelled=labelled, flag=flag, selection=selection)


def open_images(data_path, transform, seed=0, repeats=1, decoder=None, labelled=False, flag="--data_path",
                selection=Selection()):
    """The images of --data_path as a dataset (fcmae.data.images.Images) of `transform`'s items."""
    source = open_source(data_path, labelled, flag, selection)
    if repeats != 1:
        if not hasattr(source, "repeats"):
            raise ConfigError(f"--repeats works with folders of images and Hugging Face datasets, not with "
                              f"{source.where}; write the data with the images repeated instead")
        source.repeats = repeats
    return Images(source, transform, decoder, seed)
