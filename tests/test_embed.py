"""python -m fcmae.embed: embeddings equal to timm's forward, in the data's order on any number of
processes, resumed after a kill without redoing finished parts, and one sentence for bad input."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fcmae
from conftest import randomize_, rel_err
from fcmae.data import sample_photographs, share, write_shards
from test_project import ROOT, run

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not ImageNet's: the weights' own must be used


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The sample photographs in two class folders, with one damaged file."""
    root = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(sample_photographs()):
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        shutil.copy(path, root / "ab"[i % 2] / f"{i:02d}_{os.path.basename(path)}")
    (root / "a" / "99_damaged.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(an FCMAE encoder exported for timm with its statistics, a fine-tuned timm classifier file)."""
    folder = tmp_path_factory.mktemp("weights")
    model = randomize_(fcmae.create_model("convnextv2_atto"), seed=3)
    encoder, _ = fcmae.weights.export(model, "timm", folder / "encoder.safetensors",
                                      statistics={"mean": MEAN, "std": STD})
    classifier = randomize_(timm.create_model("convnextv2_atto", num_classes=5), seed=4)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(folder / "classifier.safetensors"))
    return encoder, folder / "classifier.safetensors"


def embed(*args, launcher=(), timeout=300):
    """The command, at 64 px in the main process unless `args` say otherwise."""
    return run(*launcher, "-m", "fcmae.embed", "--input_size", "64", "--num_workers", "0", "--device", "cpu", *args,
               timeout=timeout)


def timm_reference(model_file, files, kind, mean=MEAN, std=STD):
    """timm's own evaluation transform and forward pass on the same files."""
    if kind == "pooled":  # the export, as timm loads a pretrained file
        model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(model_file)})
    else:  # timm's pretrained loading drops a classifier of other than 1000 classes
        model = timm.create_model("convnextv2_atto", num_classes=5)
        model.load_state_dict(load_file(str(model_file)))
    model.eval()
    transform = timm.data.create_transform(64, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        features = model.forward_features(x)
        if kind == "pooled":
            return features.mean(dim=(2, 3))
        return model.forward_head(features, pre_logits=kind == "pre_logits")


@pytest.mark.parametrize("kind", ["pooled", "pre_logits", "logits"])
def test_embeddings_equal_timms_forward_in_the_folders_order(photos, weights, tmp_path, kind):
    encoder, classifier = weights
    out = tmp_path / "emb.parquet"
    result = embed(encoder if kind == "pooled" else classifier, photos, "--output", out, "--output_kind", kind,
                   "--part_size", "7")
    assert result.returncode == 0, result.stderr
    assert "1 unreadable image(s) left out" in result.stdout and "99_damaged.jpg" in result.stderr
    assert (f"normalised with those kept with the weights ({encoder})" if kind == "pooled"
            else "normalised with ImageNet's (the weights keep none)") in result.stdout
    table = pq.read_table(out).to_pandas()
    files = sorted(str(p) for p in photos.glob("*/*") if "damaged" not in p.name)
    assert list(table["name"]) == files  # class folders in order, the damaged file left out
    assert list(table["index"]) == [i for i in range(len(files) + 1) if i != 10]  # a/99_damaged.jpg is 11th
    assert list(table["class"]) == [os.path.basename(os.path.dirname(f)) for f in files]
    assert list(table["label"]) == ["ab".index(c) for c in table["class"]]
    got = torch.tensor(np.stack(table["embedding"].to_numpy()))
    mean, std = (MEAN, STD) if kind == "pooled" else (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    want = timm_reference(encoder if kind == "pooled" else classifier, files, kind, mean, std)
    assert got.shape == want.shape == (len(files), 320 if kind != "logits" else 5)
    assert rel_err(got, want) < 1e-5
    assert not (tmp_path / "emb.parquet.parts").exists()


def test_npy_output_has_its_index_beside_it_and_can_be_normalised(photos, weights, tmp_path):
    out = tmp_path / "emb.npy"
    result = embed(weights[0], photos / "b", "--output", out, "--l2_normalize")
    assert result.returncode == 0, result.stderr
    vectors = np.load(out)
    assert vectors.shape == (10, 320) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    rows = (tmp_path / "emb.csv").read_text().splitlines()
    assert rows[0] == "index,name,label,class" and len(rows) == 11
    assert rows[1].split(",")[2:] == ["", ""]  # a flat folder: no labels


def first_parts(parts, count, proc, limit=120):
    """Wait until `count` parts are written, then kill `proc` at once."""
    deadline = time.monotonic() + limit
    while len(list(parts.glob("part-*.npz"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.npz")}


@pytest.mark.slow  # 30 s on 2 cores
def test_a_killed_run_continues_without_redoing_its_finished_parts(photos, weights, tmp_path):
    args = [weights[0], photos, "--part_size", "2", "--batch_size", "1", "--input_size", "224"]
    straight = embed(*args, "--output", tmp_path / "straight.parquet")
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fcmae.embed", *map(str, args), "--output", str(out), "--num_workers", "0",
               "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    finished = first_parts(tmp_path / "killed.parquet.parts", 3, proc)
    assert not out.exists() and len(finished) >= 3
    # a rerun with other settings is refused, and the parts are kept
    other = embed(*args[:-1], "128", "--output", out)
    assert other.returncode == 2 and "holds parts of an earlier run with other settings (input_size)" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed.parquet.parts").glob("part-*.npz")} == finished
    resumed = embed(*args, "--output", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"in 11 parts ({len(finished)} done before)" in resumed.stdout
    # only the images of the parts not done before are embedded: 21 over 11 parts, the damaged one (index 10) not
    todo = [i for p in range(11) if f"part-{p:05d}.npz" not in finished for i in share(21, p, 11) if i != 10]
    assert f"; {len(todo)} embedded here" in resumed.stdout
    a, b = (pq.read_table(tmp_path / f).to_pandas() for f in ("straight.parquet", "killed.parquet"))
    assert a.drop(columns="embedding").equals(b.drop(columns="embedding"))
    # the killed run had one thread: the same numbers, up to the order of float additions
    assert np.allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 40 s on 2 cores
def test_two_processes_write_the_shards_in_their_order(photos, weights, tmp_path):
    shards = tmp_path / "shards"
    write_shards(photos, shards, per_shard=4, shuffle=False, say=lambda *_: None, warn=lambda *_: None)
    one = embed(weights[0], shards, "--output", tmp_path / "one.parquet")
    assert one.returncode == 0, one.stderr
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531"]
    two = run(*launcher, "-m", "fcmae.embed", weights[0], shards, "--output", tmp_path / "two.parquet",
              "--input_size", "64", "--num_workers", "1", "--device", "cpu", timeout=300)
    assert two.returncode == 0, two.stderr
    assert "in 6 parts (0 done before) on 2 process(es)" in two.stdout
    a, b = pq.read_table(tmp_path / "one.parquet").to_pandas(), pq.read_table(tmp_path / "two.parquet").to_pandas()
    assert list(b["index"]) == sorted(b["index"]) and len(b) == 20  # every readable image, in the shards' order
    assert list(a["index"]) == list(b["index"]) and list(a["name"]) == list(b["name"])
    assert np.allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("no encoder", "these weights are in no ConvNeXt V2 layout this project knows"),
    ("unknown kind", "argument --output_kind: invalid choice: 'cls'"),
    ("a folder", "is a folder; give a file name ending in .parquet or .npy"),
    ("no classifier", "holds an encoder without a classifier head, so it has no logits; pass fine-tuned weights"),
])
def test_bad_input_is_one_sentence(photos, weights, tmp_path, case, message):
    source, args = weights[0], ["--output", tmp_path / "emb.parquet"]
    if case == "no encoder":
        save_file({"linear.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
        source = tmp_path / "other.safetensors"
    elif case == "unknown kind":
        args += ["--output_kind", "cls"]
    elif case == "a folder":
        args = ["--output", tmp_path]
    else:
        args += ["--output_kind", "logits"]
    result = embed(source, photos, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
