"""The data besides pretraining's own: fine-tuning's training and evaluation splits (--data_set,
--data_path), and pretraining's monitors' held-out and k-NN images; with their transforms, and
class indices that agree between the parts."""
from pathlib import Path

from fcmae.config import ConfigError
from fcmae.data.arrays import rgb_or_grey
from fcmae.data.contract import Selection
from fcmae.data.decoders import get_decoder
from fcmae.data.hugging_face import holds_splits, is_hugging_face
from fcmae.data.images import Images
from fcmae.data.indexed import IndexedSource, Subset
from fcmae.data.registry import open_images, open_source
from fcmae.data.sampling import balanced_subset
from fcmae.data.statistics import resolve_statistics
from fcmae.data.transforms import EvalTransform, FinetuneTransform, mean_std, normalization


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


def finetune_datasets(args, weights_statistics=None):
    """(training Images or None, evaluation Images or None, class names, statistics) for
    finetune.py's flags (data_set, data_path, eval_data_path, eval, disable_eval, nb_classes,
    input_size, in_chans, the augmentation flags, crop_pct, the statistics' flags, decoder, seed);
    the evaluation's labels are renumbered to the training classes by name. The statistics (see
    fcmae.data.statistics.resolve_statistics) are the weights' when they keep them."""
    (train_root, train_selection), (eval_root, eval_selection) = (
        pair or (None, Selection()) for pair in split_roots(args))
    default = mean_std(args.imagenet_default_mean_and_std, args.in_chans) if rgb_or_grey(args.in_chans) else None
    root, chosen = (train_root, train_selection) if train_root is not None else (eval_root, eval_selection)
    statistics = resolve_statistics(args, lambda: open_source(root, labelled=True, selection=chosen),
                                    args.output_dir, default, weights_statistics)
    mean, std = statistics["mean"], statistics["std"]
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
        if classes is None:
            classes = evaluation.classes
            check_class_count(eval_root, classes, args.nb_classes)
        label_by_name(evaluation, classes, f"{eval_root} has classes the training data lacks")
    return train, evaluation, classes, statistics


def label_by_name(dataset, classes, problem):
    """Renumber `dataset`'s labels to `classes` by class name; ConfigError ("<problem>: names")
    when it has classes that `classes` lacks."""
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown:
        raise ConfigError(f"{problem}: {', '.join(unknown[:5])}")
    index = {name: i for i, name in enumerate(classes)}
    dataset.relabel([index[name] for name in dataset.classes])


def monitor_view(args):
    """The monitors' fixed view of an image (resize, centre crop: the evaluation's) and its decoder
    (decoded in the loader's workers: `scaled` where pretraining decodes with dali)."""
    mean, std = normalization(args.in_chans, args.mean, args.std)
    decoder = get_decoder("scaled" if args.decoder == "dali" else args.decoder)
    return EvalTransform(args.input_size, mean, std, in_chans=args.in_chans), decoder


def held_out_images(args):
    """pretrain.py's held-out images (--eval_data_path, or the --eval_split of a Hugging Face
    --data_path) in the monitors' view, or None when there are none."""
    if args.eval_data_path is None and args.eval_split is None:
        return None
    if args.eval_data_path is None and not (args.data_path and holds_splits(args.data_path)):
        raise ConfigError(f"--eval_split {'+'.join(args.eval_split)} names a split of a Hugging Face dataset with "
                          "splits, and --data_path is none; give the held-out images with --eval_data_path instead")
    root, flag = (args.eval_data_path, "--eval_data_path") if args.eval_data_path else (args.data_path, "--data_path")
    splits = args.eval_split or (("validation",) if holds_splits(root) else None)
    transform, decoder = monitor_view(args)
    return open_images(root, transform, args.seed, decoder=decoder, flag=flag,
                       selection=Selection(splits, args.image_column))


def knn_images(args):
    """(bank, queries): the k-NN monitor's labelled images (--knn_train_path, --knn_eval_path) in
    the monitors' view, the queries' labels renumbered to the bank's classes by name, the bank cut
    to a seeded, class-balanced --knn_max_images; None without --knn_train_path."""
    if args.knn_train_path is None and args.knn_eval_path is None:
        return None
    if args.knn_train_path is None or args.knn_eval_path is None:
        raise ConfigError("the k-NN monitor needs both --knn_train_path (the labelled bank) and --knn_eval_path "
                          "(the labelled queries)")
    transform, decoder = monitor_view(args)
    parts = []
    for path, flag in ((args.knn_train_path, "--knn_train_path"), (args.knn_eval_path, "--knn_eval_path")):
        parts.append(open_images(path, transform, args.seed, decoder=decoder, labelled=True, flag=flag,
                                 selection=Selection(None, args.image_column, args.label_column)))
    bank, queries = parts
    if args.knn_max_images is not None and args.knn_max_images < len(bank):
        if not isinstance(bank.source, IndexedSource):
            raise ConfigError(f"--knn_max_images picks images of the bank at random, which {bank.source.kind} "
                              "cannot give; write a smaller bank (fewer shards) instead")
        chosen = balanced_subset(bank.source.labels(), args.knn_max_images, args.seed)
        bank = Images(Subset(bank.source, chosen), bank.transform, bank.decoder, bank.seed)
    label_by_name(queries, bank.classes, f"--knn_eval_path {args.knn_eval_path} has classes the k-NN bank "
                                         f"--knn_train_path {args.knn_train_path} lacks, which it could never name")
    return bank, queries

