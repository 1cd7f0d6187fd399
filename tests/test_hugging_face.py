"""Hugging Face datasets as a data source: save_to_disk folders, Parquet in the Hub's layout, hf:NAME.

The datasets are written here with `datasets` from the images of a folder, in the folder's order,
so every run on them can be compared with the same run on the folder. The Hub cannot be reached
from the test machines: hf:NAME is tested on a local copy of a repository (a folder in the Hub's
Parquet layout), which `datasets.load_dataset` reads through the same code path.
"""
import json
import re
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from fcmae.config import ConfigError
from fcmae.data import (
    EvalTransform, HuggingFaceSource, PretrainTransform, Selection, collate, find_images, normalization,
    open_images, open_source,
)
from test_finetune import CLASSES, SMALL as FINETUNE_SMALL, run_finetune
from test_finetune import fail as finetune_fails
from test_pretrain import (
    SMALL, final_params, kill_at_checkpoint, make_images, pretrain, run_pretrain, usage_error,
)
from test_shards import run_module


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """Parquet and hf: datasets are converted into the datasets cache: a fresh one for these tests."""
    cache = tmp_path_factory.mktemp("hf_cache")
    datasets.disable_progress_bars()  # the tests' own writing of datasets stays out of what the scripts say
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))  # for the scripts the tests start
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield cache


def image_files(folder):
    """The image files of a folder in the order a folder source reads them."""
    return [Path(f) for f in find_images(folder)]


def rows(files):
    """The rows of `files`: the image under a column name the source must find by type, the class
    as a ClassLabel beside an integer column it must not take for the label, and a text column."""
    return {"picture": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "width": [80] * len(files), "category": [CLASSES.index(f.parent.name) for f in files],
            "caption": [f.name for f in files]}


def features(classes=CLASSES):
    return datasets.Features({"picture": datasets.Image(), "width": datasets.Value("int64"),
                              "category": datasets.ClassLabel(names=list(classes)),
                              "caption": datasets.Value("string")})


def split_of(files, classes=CLASSES):
    data = rows(files)
    if list(classes) != list(CLASSES):  # the same classes under other numbers
        data["category"] = [list(classes).index(CLASSES[c]) for c in data["category"]]
    return datasets.Dataset.from_dict(data, features=features(classes))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """train/ and val/ class folders, and the same images as Hugging Face datasets:
    `disk` (save_to_disk of a DatasetDict), `parquet` (a folder in the Hub's layout, the training
    split in two files) and `glob` (the training files as a glob). The saved validation split numbers
    the classes in another order, as a DatasetDict's splits may: labels must be matched by class name."""
    root = tmp_path_factory.mktemp("hf")
    folders = root / "imagenet"
    make_images(folders / "train", count=24, size=72, classes=CLASSES)
    make_images(folders / "val", count=9, size=72, classes=CLASSES)
    splits = datasets.DatasetDict({"train": split_of(image_files(folders / "train")),
                                   "validation": split_of(image_files(folders / "val"), ("owl", "cat", "dog"))})
    splits.save_to_disk(root / "disk")
    (root / "parquet" / "data").mkdir(parents=True)
    splits["train"].select(range(13)).to_parquet(root / "parquet" / "data" / "train-00000-of-00002.parquet")
    splits["train"].select(range(13, 24)).to_parquet(root / "parquet" / "data" / "train-00001-of-00002.parquet")
    # a Parquet repository has one set of features for all its splits (datasets reads them from the first file)
    split_of(image_files(folders / "val")).to_parquet(root / "parquet" / "data" / "validation-00000-of-00001.parquet")
    return {"folders": folders, "disk": root / "disk", "parquet": root / "parquet",
            "glob": root / "parquet" / "data" / "train-*.parquet", "hub": f"hf:{root / 'parquet'}"}


def batch(dataset, keys):
    return collate(dataset.__getitems__(keys))


# ----- the source ------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["disk", "parquet", "glob", "hub"])
def test_rows_are_the_folder_s_images_in_its_order(imagenet, form):
    folder = open_images(imagenet["folders"], PretrainTransform(48), seed=3)
    data = open_images(imagenet[form], PretrainTransform(48), seed=3)
    assert isinstance(data.source, HuggingFaceSource) and len(data) == len(folder) == 24
    keys = [(i, 2, 23 - i) for i in range(24)]
    a, b = batch(folder, keys), batch(data, keys)
    assert torch.equal(a.image, b.image) and a.skipped.sum() == b.skipped.sum() == 0
    assert b.label.tolist() == [-1] * 24  # pretraining reads no labels


@pytest.mark.parametrize("form", ["disk", "parquet", "hub"])
def test_labels_and_class_names_come_from_the_class_label(imagenet, form):
    mean, std = normalization(3)
    for split, folder in (("train", "train"), ("validation", "val")):
        data = open_source(imagenet[form], labelled=True, selection=Selection((split,)))
        files = open_source(imagenet["folders"] / folder, labelled=True)
        names = [data.classes[data.record((i, 0, 0)).label] for i in range(len(data))]
        assert names == [files.classes[files.record((i, 0, 0)).label] for i in range(len(files))]
    if form == "disk":
        assert data.classes == ["owl", "cat", "dog"]  # the validation split's own numbering
    evaluation = open_images(imagenet[form], EvalTransform(48, mean, std), labelled=True,
                             selection=Selection(("validation",)))
    assert "split validation of" in evaluation.source.record((0, 0, 0)).name


def test_several_splits_are_read_one_after_the_other(imagenet):
    both = open_source(imagenet["disk"], selection=Selection(("train", "validation")))
    assert len(both) == 33
    assert both.record((23, 0, 0)).name.startswith("row 23 of split train of")
    assert both.record((24, 0, 0)).name.startswith("row 0 of split validation of")
    with pytest.raises(ConfigError, match="has other classes than"):  # labelled: one numbering of classes
        open_source(imagenet["disk"], labelled=True, selection=Selection(("train", "validation")))


def test_two_processes_read_disjoint_shares_that_cover_the_data(imagenet):
    data = open_source(imagenet["parquet"])
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = data.batch_sampler(batch_size=3, update_freq=2, num_processes=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            seen.append([data.record(key).name for micro in sampler for key in micro])
        assert len(seen[0]) == len(seen[1]) == 12 and not set(seen[0]) & set(seen[1])
        assert len(set(seen[0] + seen[1])) == 24
    evaluated = [[key[0] for b in data.evaluation_batches(rank, 2, 5) for key in b] for rank in (0, 1)]
    assert sorted(evaluated[0] + evaluated[1]) == list(range(24)) and not set(evaluated[0]) & set(evaluated[1])


def test_a_corrupt_image_is_skipped_named_and_counted(imagenet, tmp_path):
    data = rows(image_files(imagenet["folders"] / "train")[:6])
    data["picture"][3] = {"bytes": b"not an image at all", "path": None}
    datasets.Dataset.from_dict(data, features=features()).save_to_disk(tmp_path / "broken")
    images = open_images(tmp_path / "broken", PretrainTransform(48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = batch(images, [(i, 0, i) for i in range(6)])
    said = [str(w.message) for w in caught]
    assert any(f"skipping unreadable image row 3 of {tmp_path / 'broken'}" in s for s in said), said
    assert got.skipped.tolist() == [0, 0, 0, 1, 0, 0]


# ----- the scripts -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pretraining_trains_as_on_the_folder_and_resumes_exactly(imagenet, tmp_path):
    """The same images in the same order: a save_to_disk folder gives the folder's run bitwise,
    and a Parquet run killed mid-epoch and resumed ends there too."""
    args = [*SMALL, "--epochs", "3", "--num_workers", "2"]
    run_pretrain(*args, "--data_path", imagenet["folders"], "--output_dir", tmp_path / "folder")
    run_pretrain(*args, "--data_path", imagenet["disk"], "--output_dir", tmp_path / "disk")
    parquet = [*args, "--data_path", imagenet["parquet"]]
    kill_at_checkpoint(parquet, tmp_path / "parquet", step=8)  # mid-epoch 2 of 3
    result = run_pretrain(*parquet, "--output_dir", tmp_path / "parquet")
    assert "resumed from" in result.stdout
    reference = final_params(tmp_path / "folder")
    for run in ("disk", "parquet"):
        params = final_params(tmp_path / run)
        assert params.keys() == reference.keys()
        assert all(torch.equal(params[k], reference[k]) for k in reference), run  # bitwise on CPU
        assert (tmp_path / run / "log.txt").read_text() == (tmp_path / "folder" / "log.txt").read_text(), run


@pytest.mark.slow
def test_fine_tuning_and_evaluation_read_class_labels(imagenet, tmp_path):
    """finetune.py on the DatasetDict (train and validation splits, the latter numbering the classes
    otherwise) trains and evaluates exactly as on train/ and val/ folders of the same images."""
    # a large initial head: predictions far from uniform, so that labels matched wrongly would show
    args = ["--model", "convnextv2_atto", *FINETUNE_SMALL, "--epochs", "1", "--aa", "none", "--reprob", "0",
            "--head_init_scale", "3"]
    run_finetune(*args, "--data_path", imagenet["folders"], "--output_dir", tmp_path / "folder")
    data = run_finetune(*args, "--data_path", imagenet["disk"], "--output_dir", tmp_path / "disk")
    assert (tmp_path / "disk" / "log.txt").read_text() == (tmp_path / "folder" / "log.txt").read_text()
    assert "3 classes from" in data.stdout
    a, b = load_file(str(tmp_path / "folder" / "model_best.safetensors")), \
        load_file(str(tmp_path / "disk" / "model_best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluation alone, on the Parquet folder's validation split, and on a split named with hf:NAME:SPLIT
    top1 = json.loads((tmp_path / "folder" / "log.txt").read_text().splitlines()[-1])["test_acc1"]
    for how in (["--data_path", imagenet["parquet"]],
                ["--data_set", "image_folder", "--data_path", imagenet["glob"], "--eval_data_path",
                 imagenet["hub"] + ":validation"]):
        result = run_finetune(*args, *how, "--eval", "true", "--resume", tmp_path / "disk" / "model_best.safetensors",
                              "--output_dir", "")
        assert f"top-1 {top1:.2f}%" in result.stdout and "on the 9 test images" in result.stdout


# ----- bad input -------------------------------------------------------------------------------------

def pretrain_fails(args, capsys):
    return usage_error(pretrain, args, capsys)


@pytest.mark.parametrize("flags,message", [
    (["--data_splits", "test"], r"has no split 'test'; its splits: train, validation"),
    (["--image_column", "photo"], r"has no column 'photo'; its columns: picture \(Image\), width \(int64\), "
                                  r"category \(ClassLabel of 3 classes\), caption \(string\)"),
    (["--image_column", "caption"], r"the column 'caption' of split train of .* holds string, not images"),
])
def test_pretraining_on_bad_choices_is_one_sentence(imagenet, flags, message, capsys):
    err = pretrain_fails(["--data_path", imagenet["disk"], *flags, "--output_dir", ""], capsys)
    assert re.search(message, err), err


def test_fine_tuning_on_bad_choices_is_one_sentence(imagenet, tmp_path, capsys):
    err = finetune_fails(["--data_path", imagenet["disk"], "--nb_classes", "3", "--eval_split", "val"], capsys)
    assert "has no split 'val'; its splits: train, validation" in err
    err = finetune_fails(["--data_path", imagenet["glob"], "--nb_classes", "3"], capsys)
    assert "names one split of a Hugging Face dataset, and --data_set IMNET reads its train and validation" in err
    err = finetune_fails(["--data_path", imagenet["disk"], "--nb_classes", "3", "--label_column", "picture"], capsys)
    assert "the column 'picture' of split train of" in err and "holds Image, not class labels" in err
    err = finetune_fails(["--data_path", imagenet["folders"], "--nb_classes", "3", "--train_split", "train"], capsys)
    assert "is not a Hugging Face dataset, so it has no splits or columns to choose (splits train)" in err
    unlabelled = datasets.Dataset.from_dict({"picture": rows(image_files(imagenet["folders"] / "val"))
                                             ["picture"]}, features=datasets.Features({"picture": datasets.Image()}))
    unlabelled.save_to_disk(tmp_path / "unlabelled")
    err = finetune_fails(["--data_set", "image_folder", "--data_path", tmp_path / "unlabelled", "--disable_eval",
                          "true", "--nb_classes", "3"], capsys)
    assert "has no column of class labels; its columns: picture (Image); name one with --label_column" in err


def test_a_split_without_labels_is_refused_for_fine_tuning(imagenet, tmp_path, capsys):
    train = split_of(image_files(imagenet["folders"] / "val"))
    test = train.map(lambda row: {"category": -1})  # as ImageNet's test split on the Hub
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "unlabelled_test")
    err = finetune_fails(["--data_path", tmp_path / "unlabelled_test", "--nb_classes", "3", "--eval_split", "test"],
                         capsys)
    assert "split test of" in err and "has rows without a class label (category = -1)" in err


def test_a_missing_datasets_library_is_one_sentence(imagenet, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    err = pretrain_fails(["--data_path", imagenet["parquet"], "--output_dir", ""], capsys)
    assert "needs the datasets library, which is not installed: pip install -e \".[hf]\"" in err


def test_the_loader_benchmark_runs_on_parquet(imagenet, tmp_path):
    result = run_module("fcmae.bench", "--data", imagenet["parquet"], "--input_size", "64", "--batch_size", "4",
                        "--num_workers", "0", "1", "--batches", "2", "--json", tmp_path / "loader.json")
    records = json.loads((tmp_path / "loader.json").read_text())
    assert [r["num_workers"] for r in records] == [0, 1] and all(r["images_per_s"] > 0 for r in records)
    assert {r["source"] for r in records} == {"a Hugging Face dataset"}
    assert "(a Hugging Face dataset)" in result.stdout
