"""Pretraining's monitors: the held-out reconstruction loss and the online k-NN accuracy are what a
checkpoint gives when computed by hand, they resume exactly and do not depend on the number of
processes; bad inputs are one sentence; the curves are drawn."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import fcmae
from fcmae.cli import plot_curves
from fcmae.data import derive_seed
from fcmae.data.sampling import balanced_subset
from fcmae.models import random_patch_mask
from test_pretrain import SMALL, final_params, make_images, pretrain, run_pretrain, usage_error

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitored")
    make_images(root / "train", count=24, size=80, classes=CLASSES)
    make_images(root / "val", count=9, size=80, classes=CLASSES)
    return root


def monitored(data, k=5):
    return [*SMALL, "--data_path", str(data / "train"), "--eval_data_path", str(data / "val"),
            "--knn_train_path", str(data / "train"), "--knn_eval_path", str(data / "val"), "--knn_k", str(k)]


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """2 epochs of 6 steps, both monitors after each."""
    out = tmp_path_factory.mktemp("straight")
    pretrain.main([*monitored(data), "--output_dir", str(out)])
    return out


def eval_view(path, size=64):
    """The evaluation's view written out here: resize the short side to size / 0.875 (bicubic),
    centre-crop `size`, ImageNet's normalisation."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        short = int(size / 0.875)
        w, h = img.size
        img = img.resize((short, round(h * short / w)) if w <= h else (round(w * short / h), short), Image.BICUBIC)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        pixels = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32))
    pixels = pixels.permute(2, 0, 1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (pixels - mean[:, None, None]) / std[:, None, None]


def labelled_files(folder):
    files = sorted(Path(folder).rglob("*.png"))
    return files, torch.tensor([CLASSES.index(f.parent.name) for f in files])


def test_the_logged_figures_are_what_the_weights_give_by_hand(straight, data):
    entries = log(straight)
    assert [e["epoch"] for e in entries] == [0, 1]
    assert all({"held_out_loss", "knn_top1", "knn_top5"} <= e.keys() for e in entries)
    assert json.loads((straight / "metrics.json").read_text())["held_out_loss"] == entries[-1]["held_out_loss"]

    # the held-out loss: the model of the last checkpoint on the fixed views and masks, in one call
    model = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64)
    model.load_state_dict(final_params(straight))
    files, labels = labelled_files(data / "val")
    imgs = torch.stack([eval_view(f) for f in files])
    masks = torch.cat([random_patch_mask(1, 4, 0.6, generator=torch.Generator().manual_seed(
        derive_seed(0, "held_out", i))) for i in range(len(files))])  # seed 0; the folder's i-th image
    with torch.no_grad():
        loss, _, _ = model(imgs, masks)
    assert loss.item() == pytest.approx(entries[-1]["held_out_loss"], rel=1e-5)

    # the k-NN accuracy: the exported encoder in timm, pooled, normalised, DINO's weighted vote
    timm_model = timm.create_model("convnextv2_atto", num_classes=0)
    missing, unexpected = timm_model.load_state_dict(load_file(str(straight / "encoder.safetensors")), strict=False)
    assert all(k.startswith("head.") for k in missing) and not unexpected
    timm_model.eval()
    bank_files, bank_labels = labelled_files(data / "train")
    with torch.no_grad():
        def features(paths):
            return F.normalize(timm_model.forward_features(torch.stack([eval_view(p) for p in paths])).mean((2, 3)))
        bank, queries = features(bank_files), features(files)
    similarity, neighbours = (queries @ bank.T).topk(5, dim=1)
    votes = torch.zeros(len(queries), len(CLASSES)).scatter_add_(1, bank_labels[neighbours], (similarity / 0.07).exp())
    top1 = 100.0 * (votes.argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(entries[-1]["knn_top1"], abs=0.1)


def test_a_killed_and_resumed_run_logs_the_same_figures(straight, data, tmp_path):
    out = tmp_path / "resumed"
    pretrain.main([*monitored(data), "--output_dir", str(out), "--max_steps", "8"])  # stops inside epoch 1
    assert log(out)[-1]["partial_epoch"] == pytest.approx(1 + 2 / 6)  # measured where it stopped
    pretrain.main([*monitored(data), "--output_dir", str(out)])
    assert (out / "log.txt").read_text() == (straight / "log.txt").read_text()  # bitwise on CPU
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(straight, data, tmp_path):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "29541"]
    run_pretrain(*monitored(data), "--batch_size", "2", "--device", "cpu", "--output_dir", tmp_path / "two",
                 launcher=accelerate)
    for one, two in zip(log(straight), log(tmp_path / "two")):
        assert two["held_out_loss"] == pytest.approx(one["held_out_loss"], rel=1e-4)
        assert two["knn_top1"] == pytest.approx(one["knn_top1"], abs=0.1)


@pytest.mark.parametrize("case", ["unlabelled", "disjoint classes", "k above the bank", "no held-out images",
                                  "one k-NN path"])
def test_bad_monitor_inputs_are_one_sentence(data, tmp_path, case, capsys):
    flat, empty, other = tmp_path / "flat", tmp_path / "empty", tmp_path / "other"
    flat.mkdir()
    shutil.copy(next((data / "val").rglob("*.png")), flat / "a.png")
    empty.mkdir()
    make_images(other, count=3, size=80, classes=("cat", "zebra"))
    args, message = {
        "unlabelled": (["--knn_eval_path", flat], "--knn_eval_path"),
        "disjoint classes": (["--knn_eval_path", other], "has classes the k-NN bank"),
        "k above the bank": (["--knn_k", "30"], "fewer than --knn_k 30"),
        "no held-out images": (["--eval_data_path", empty], "--eval_data_path"),
        "one k-NN path": ([], "needs both --knn_train_path"),
    }[case]
    base = monitored(data) if case != "one k-NN path" else [*SMALL, "--data_path", str(data / "train"),
                                                            "--knn_train_path", str(data / "train")]
    err = usage_error(pretrain, [*base, *args, "--output_dir", tmp_path / "run"], capsys)
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_curves_of_several_runs(straight, tmp_path, capsys):
    plot_curves.main([str(straight), str(straight), "--output", str(tmp_path / "both.png")])
    with Image.open(tmp_path / "both.png") as picture:
        assert picture.size[0] > 3 * picture.size[1] / 2  # three panels side by side
    with pytest.raises(SystemExit):
        plot_curves.main([str(tmp_path)])  # no log.txt
    assert "has no log.txt" in capsys.readouterr().err
    assert (straight / "curves.png").is_file()


def test_a_balanced_sample_of_the_bank():
    labels = [0] * 50 + [1] * 30 + [2] * 5
    chosen = balanced_subset(labels, 20, seed=0)
    counts = [sum(labels[i] == c for i in chosen) for c in range(3)]
    assert len(chosen) == 20 and counts == [8, 7, 5] and chosen == sorted(chosen)
    assert balanced_subset(labels, 20, seed=0) == chosen and balanced_subset(labels, 20, seed=1) != chosen


def test_a_run_whose_monitors_keep_loader_workers_exits(data, tmp_path):
    """The monitors' loaders keep their workers, which ignore the stop signals, until the process
    exits; it still exits (it once waited for them for ever, after its last line)."""
    result = run_pretrain(*monitored(data), "--num_workers", "1", "--max_steps", "2", "--output_dir", tmp_path / "run",
                          timeout=150)
    assert "k-NN top-1" in result.stdout and "done after 2 steps" in result.stdout
