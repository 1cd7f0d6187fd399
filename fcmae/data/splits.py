"""Fine-tuning's data: the training and evaluation splits that --data_set and --data_path name,
with their transforms, and class indices that agree between them."""
from pathlib import Path

from fcmae.config import ConfigError
from fcmae.data.decoders import get_decoder
from fcmae.data.registry import open_images
from fcmae.data.transforms import EvalTransform, FinetuneTransform, mean_std


def split_roots(args):
    """(training root or None, evaluation root or None) for --data_set: folders of image files or
    of shards, or shard sources (patterns, URLs, index files) with image_folder."""
    root = args.data_path
    if args.data_set == "IMNET":
        train, val = str(Path(root) / "train"), str(Path(root) / "val")
        for folder, what in ((train, "train"), (val, "val")):
            needed = what == "val" and not args.disable_eval or what == "train" and not args.eval
            if needed and not Path(folder).is_dir():
                raise ConfigError(f"--data_path {root} has no {what}/ folder; --data_set IMNET reads <data_path>/train "
                                  "and <data_path>/val (use --data_set image_folder with --eval_data_path for other "
                                  "layouts" + (", or --disable_eval true)" if what == "val" else ")"))
        return (None if args.eval else train), (None if args.disable_eval else val)
    if not args.disable_eval and args.eval_data_path is None:
        raise ConfigError("--data_set image_folder evaluates on --eval_data_path; give it, or --disable_eval true")
    return (None if args.eval else root), (None if args.disable_eval else args.eval_data_path)


def check_class_count(root, classes, nb_classes):
    if nb_classes != len(classes):
        raise ConfigError(f"{root} has {len(classes)} classes but --nb_classes is {nb_classes}; "
                          f"pass --nb_classes {len(classes)}")


def finetune_datasets(args):
    """(training Images or None, evaluation Images or None, class names) for finetune.py's flags
    (data_set, data_path, eval_data_path, eval, disable_eval, nb_classes, input_size, in_chans,
    the augmentation flags, crop_pct, imagenet_default_mean_and_std, decoder, seed); the
    evaluation's labels are renumbered to the training classes by name."""
    train_root, eval_root = split_roots(args)
    mean, std = mean_std(args.imagenet_default_mean_and_std, args.in_chans)
    decoder = get_decoder(args.decoder)
    flag = "--data_path" if args.data_set == "image_folder" or args.eval else "--data_path train/"
    train = classes = None
    names_from = train_root
    if train_root is None and args.eval and args.data_set == "IMNET" and (Path(args.data_path) / "train").is_dir():
        names_from = str(Path(args.data_path) / "train")  # only the class names, to label the evaluation
    if names_from is not None:
        aa = None if args.aa is None or str(args.aa).lower() in ("none", "") else args.aa
        transform = FinetuneTransform(args.input_size, mean, std, aa, args.color_jitter, args.train_interpolation,
                                      args.reprob, args.remode, args.recount, args.in_chans)
        dataset = open_images(names_from, transform, args.seed, decoder=decoder, labelled=True, flag=flag)
        classes = dataset.classes
        check_class_count(names_from, classes, args.nb_classes)
        train = dataset if train_root is not None else None
    evaluation = None
    if eval_root is not None:
        flag = "--eval_data_path" if args.data_set == "image_folder" else "--data_path val/"
        transform = EvalTransform(args.input_size, mean, std, args.crop_pct, args.in_chans)
        evaluation = open_images(eval_root, transform, args.seed, decoder=decoder, labelled=True, flag=flag)
        eval_classes = evaluation.classes
        if classes is None:
            classes = eval_classes
            check_class_count(eval_root, classes, args.nb_classes)
        unknown = sorted(set(eval_classes) - set(classes))
        if unknown:
            raise ConfigError(f"{eval_root} has classes the training data lacks: {', '.join(unknown[:5])}")
        index = {name: i for i, name in enumerate(classes)}  # evaluation labels by class name
        evaluation.relabel([index[name] for name in eval_classes])
    return train, evaluation, classes

