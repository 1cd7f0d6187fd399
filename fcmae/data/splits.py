"""Fine-tuning's data: the training and evaluation splits that --data_set and --data_path name,
with their transforms, and class indices that agree between them."""
from pathlib import Path

from fcmae.config import ConfigError
from fcmae.data.contract import Selection
from fcmae.data.decoders import get_decoder
from fcmae.data.hugging_face import holds_splits, is_hugging_face
from fcmae.data.registry import open_images
from fcmae.data.transforms import EvalTransform, FinetuneTransform, mean_std


def selection(args, splits):
    """What to read of a Hugging Face dataset (nothing to choose for other data)."""
    return Selection(splits, args.image_column, args.label_column)


def split_roots(args):
    """((training root, Selection) or None, (evaluation root, Selection) or None) for --data_set:
    folders of image files or of shards, shard sources (patterns, URLs, index files), or Hugging
    Face datasets (their train and validation splits, or with image_folder what each path names)."""
    root = args.data_path
    train_needed, eval_needed = not args.eval, not args.disable_eval
    if args.data_set == "IMNET" and is_hugging_face(root):
        if not holds_splits(root):
            raise ConfigError(f"--data_path {root} names one split of a Hugging Face dataset, and --data_set IMNET "
                              "reads its train and validation splits; name the whole dataset, or use --data_set "
                              "image_folder with --eval_data_path")
        return ((root, selection(args, args.train_split or ("train",))) if train_needed else None,
                (root, selection(args, args.eval_split or ("validation",))) if eval_needed else None)
    if args.data_set == "IMNET":
        train, val = str(Path(root) / "train"), str(Path(root) / "val")
        for folder, what in ((train, "train"), (val, "val")):
            needed = what == "val" and eval_needed or what == "train" and train_needed
            if needed and not Path(folder).is_dir():
                raise ConfigError(f"--data_path {root} has no {what}/ folder; --data_set IMNET reads <data_path>/train "
                                  "and <data_path>/val (use --data_set image_folder with --eval_data_path for other "
                                  "layouts" + (", or --disable_eval true)" if what == "val" else ")"))
        return ((train, selection(args, args.train_split)) if train_needed else None,
                (val, selection(args, args.eval_split)) if eval_needed else None)
    if eval_needed and args.eval_data_path is None:
        raise ConfigError("--data_set image_folder evaluates on --eval_data_path; give it, or --disable_eval true")
    eval_splits = args.eval_split or (("validation",) if eval_needed and holds_splits(args.eval_data_path) else None)
    return ((root, selection(args, args.train_split)) if train_needed else None,
            (args.eval_data_path, selection(args, eval_splits)) if eval_needed else None)


def check_class_count(root, classes, nb_classes):
    if nb_classes != len(classes):
        raise ConfigError(f"{root} has {len(classes)} classes but --nb_classes is {nb_classes}; "
                          f"pass --nb_classes {len(classes)}")


def finetune_datasets(args):
    """(training Images or None, evaluation Images or None, class names) for finetune.py's flags
    (data_set, data_path, eval_data_path, eval, disable_eval, nb_classes, input_size, in_chans,
    the augmentation flags, crop_pct, imagenet_default_mean_and_std, decoder, seed); the
    evaluation's labels are renumbered to the training classes by name."""
    (train_root, train_selection), (eval_root, eval_selection) = (
        pair or (None, Selection()) for pair in split_roots(args))
    mean, std = mean_std(args.imagenet_default_mean_and_std, args.in_chans)
    decoder = get_decoder(args.decoder)
    folders = args.data_set == "IMNET" and not is_hugging_face(args.data_path)  # <data_path>/train and /val
    flag = "--data_path train/" if folders and not args.eval else "--data_path"
    train = classes = None
    names_from, names_selection = train_root, train_selection
    if train_root is None and args.eval and folders and (Path(args.data_path) / "train").is_dir():
        names_from = str(Path(args.data_path) / "train")  # only the class names, to label the evaluation
    if names_from is not None:
        aa = None if args.aa is None or str(args.aa).lower() in ("none", "") else args.aa
        transform = FinetuneTransform(args.input_size, mean, std, aa, args.color_jitter, args.train_interpolation,
                                      args.reprob, args.remode, args.recount, args.in_chans)
        dataset = open_images(names_from, transform, args.seed, decoder=decoder, labelled=True, flag=flag,
                              selection=names_selection)
        classes = dataset.classes
        check_class_count(names_from, classes, args.nb_classes)
        train = dataset if train_root is not None else None
    evaluation = None
    if eval_root is not None:
        flag = ("--eval_data_path" if args.data_set == "image_folder" else
                "--data_path val/" if folders else "--data_path")
        transform = EvalTransform(args.input_size, mean, std, args.crop_pct, args.in_chans)
        evaluation = open_images(eval_root, transform, args.seed, decoder=decoder, labelled=True, flag=flag,
                                 selection=eval_selection)
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

