"""Sharded input: python -m fcmae.shards, and pretrain.py / finetune.py reading webdataset shards."""
import io
import json
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from fcmae.data import PretrainTransform, ShardBatchSampler, Shards, open_images, write_shards
from fcmae.data import tar_shards as shard_module
from test_pretrain import ROOT, SMALL, env, final_params, kill_at_checkpoint, make_images, run_pretrain, run_script


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("folder"), count=24, classes=("a", "b", "c"))


def run_module(module, *args, expect=0):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


def test_shards_hold_exactly_the_folder_s_images_and_labels(folder, tmp_path):
    proc = run_module("fcmae.shards", folder, tmp_path / "s", "--per_shard", "5")
    assert "wrote 24 images (3 classes) in 5 shards" in proc.stdout and "shard 5 of 5, 24 of 24 images" in proc.stdout
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["classes"] == ["a", "b", "c"] and [e["images"] for e in index["shards"]] == [5, 5, 5, 5, 4]
    files = sorted(p for p in folder.rglob("*.png"))
    stored = {}
    for entry in index["shards"]:
        stored.update(members(tmp_path / "s" / entry["url"]))
    by_key = {}
    for name, data in stored.items():
        key, ext = name.split(".", 1)
        by_key.setdefault(key, {})[ext] = data
    assert len(by_key) == 24
    for key, sample in by_key.items():
        path = files[int(key)]  # keys number the images in the folder's sorted order
        assert sample["png"] == path.read_bytes()  # as stored, not re-encoded
        assert index["classes"][int(sample["cls"])] == path.parent.name
    # shuffled: the first shard mixes the classes
    first = members(tmp_path / "s" / index["shards"][0]["url"])
    assert len({v for k, v in first.items() if k.endswith(".cls")}) > 1


def test_writing_continues_where_it_stopped_and_refuses_other_settings(folder, tmp_path):
    out = tmp_path / "s"
    write_shards(folder, out, per_shard=7, say=lambda _: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000002.tar").unlink()  # as if the run was killed while writing it
    (out / ".shard-000002.tar.partial").write_bytes(b"torn")
    (out / "index.json").unlink()
    said = []
    write_shards(folder, out, per_shard=7, say=said.append)
    assert [s.split(":")[0] for s in said] == ["shard-000002.tar"]  # only the missing one
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "shard-000002.tar"} == \
        {k: v for k, v in before.items() if k != "shard-000002.tar"}
    assert (out / "index.json").is_file() and not list(out.glob(".*.partial"))
    with pytest.raises(Exception, match="written with other settings"):
        write_shards(folder, out, per_shard=5, say=lambda _: None)


@pytest.mark.parametrize("form", ["folder", "index", "pattern", "pattern without index"])
def test_data_path_forms(folder, tmp_path, form):
    out = tmp_path / "s"
    write_shards(folder, out, per_shard=10, say=lambda _: None)
    if form == "pattern without index":
        (out / "index.json").unlink()
    path = {"folder": out, "index": out / "index.json"}.get(form, str(out / "shard-{000000..000002}.tar"))
    shards = Shards.open(path)
    assert shards.counts == [10, 10, 4] and len(shards.urls) == 3
    assert shards.classes == (None if form == "pattern without index" else ["a", "b", "c"])


def stream(shards, epoch, rank, world, batch=3, start_step=0, update_freq=1):
    sampler = ShardBatchSampler(shards, batch, update_freq, world, rank, seed=7)
    sampler.set_epoch(epoch, start_step)
    return [[(s["index"], e, p) for s, e, p in b] for b in sampler]


def test_two_processes_read_disjoint_shares_that_cover_the_epoch(folder, tmp_path):
    write_shards(folder, tmp_path / "s", per_shard=3, say=lambda _: None)  # 8 shards of 3
    shards = Shards.open(tmp_path / "s")
    for epoch in (0, 1):
        parts = [stream(shards, epoch, rank, 2) for rank in (0, 1)]
        seen = [[i for batch in part for i, _, _ in batch] for part in parts]
        assert len(parts[0]) == len(parts[1]) == 4  # the same number of steps
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(24))
        positions = [p for part in parts for batch in part for _, _, p in batch]
        assert len(set(positions)) == 24  # every sample's mask has its own seed
    assert stream(shards, 0, 0, 2) != stream(shards, 1, 0, 2)  # another epoch, another order
    assert stream(shards, 0, 0, 2) == stream(shards, 0, 0, 2)  # a function of (seed, epoch, position)


def test_a_resumed_stream_skips_shards_without_reading_them(folder, tmp_path, monkeypatch):
    write_shards(folder, tmp_path / "s", per_shard=5, say=lambda _: None)
    shards = Shards.open(tmp_path / "s")
    full = stream(shards, 2, 0, 1, batch=2, update_freq=2)  # 24 images: 6 steps of 2 x 2
    read = []
    original = shard_module.read_shard
    monkeypatch.setattr(shard_module, "read_shard", lambda url, n: read.append(url) or original(url, n))
    resumed = stream(shards, 2, 0, 1, batch=2, start_step=4, update_freq=2)
    assert resumed == full[8:]  # exactly the rest of the epoch
    # positions 16..23 lie in the last two shards of this epoch's order: the others are never opened
    assert len(read) == 2


@pytest.mark.slow
def test_pretraining_on_shards_trains_as_on_the_folder(folder, tmp_path):
    """One image a shard, written in the folder's order: the shard order is then the folder's
    permutation and every image keeps its index, so the runs are bitwise equal. With larger shards
    the order differs by design (each process reads whole shards), so equality is not expected."""
    write_shards(folder, tmp_path / "s", per_shard=1, shuffle=False, say=lambda _: None)
    args = [*SMALL, "--epochs", "2"]
    run_pretrain(*args, "--data_path", folder, "--output_dir", tmp_path / "from_folder")
    run_pretrain(*args, "--data_path", tmp_path / "s", "--output_dir", tmp_path / "from_shards")
    a, b = final_params(tmp_path / "from_folder"), final_params(tmp_path / "from_shards")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "from_folder" / "log.txt").read_text() == (tmp_path / "from_shards" / "log.txt").read_text()


@pytest.mark.slow
def test_kill_and_resume_on_shards_ends_where_the_uninterrupted_run_ends(folder, tmp_path):
    write_shards(folder, tmp_path / "s", per_shard=5, say=lambda _: None)
    args = [*SMALL, "--epochs", "3", "--data_path", tmp_path / "s", "--num_workers", "2"]
    run_pretrain(*args, "--output_dir", tmp_path / "straight")
    out = tmp_path / "killed"
    kill_at_checkpoint(args, out, step=8)  # mid-epoch 2 of 3
    result = run_pretrain(*args, "--output_dir", out, "--save_ckpt_steps", "1")
    assert "resumed from" in result.stdout
    straight, resumed = final_params(tmp_path / "straight"), final_params(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bitwise on CPU
    assert (out / "log.txt").read_text() == (tmp_path / "straight" / "log.txt").read_text()


def rewrite_member(shard, key, data):
    """Replace member `key` of a tar shard by `data` (a corrupt image, say)."""
    files = members(shard)
    with tarfile.open(shard, "w") as tar:
        for name, content in files.items():
            content = data if name == key else content
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def test_a_corrupt_member_is_skipped_counted_and_never_stops_the_run(folder, tmp_path):
    write_shards(folder, tmp_path / "s", per_shard=6, say=lambda _: None)
    shard = tmp_path / "s" / "shard-000001.tar"
    key = next(n for n in members(shard) if n.endswith(".png"))
    rewrite_member(shard, key, b"not an image at all")
    result = run_pretrain(*SMALL, "--epochs", "2", "--data_path", tmp_path / "s", "--output_dir", tmp_path / "run")
    assert "skipping unreadable image" in result.stderr and key.split(".")[0] in result.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [entry["skipped_images"] for entry in log] == [1, 1]  # once an epoch, in every epoch


def test_a_missing_or_unreadable_shard_is_one_sentence(folder, tmp_path):
    write_shards(folder, tmp_path / "s", per_shard=6, say=lambda _: None)
    result = run_pretrain(*SMALL, "--data_path", str(tmp_path / "s" / "shard-{000000..000009}.tar"),
                          "--output_dir", tmp_path / "a", expect=2)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--data_path names 6 shard(s) that do not exist, the first" in result.stderr
    (tmp_path / "s" / "shard-000002.tar").unlink()
    result = run_pretrain(*SMALL, "--data_path", tmp_path / "s", "--output_dir", tmp_path / "b", expect=2)
    assert "lists 1 shard(s) that do not exist, the first" in result.stderr and "shard-000002.tar" in result.stderr
    # a shard that exists but cannot be read stops the run when it is reached, naming it
    (tmp_path / "s" / "shard-000002.tar").write_bytes(b"\x00garbage" * 100)
    result = run_pretrain(*SMALL, "--data_path", tmp_path / "s", "--output_dir", tmp_path / "c", expect=1)
    assert "Traceback" not in result.stderr
    assert re.search(r"error: the shard \S*shard-000002.tar cannot be read \(.*\); stopping\. The last good "
                     r"checkpoint is .*; make the data readable, then resume from it\.", result.stdout), result.stdout


@pytest.mark.slow
def test_finetune_trains_and_evaluates_from_shards(folder, tmp_path):
    write_shards(folder, tmp_path / "train", per_shard=5, say=lambda _: None)
    val = make_images(tmp_path / "val_images", count=9, classes=("a", "b", "c"))
    write_shards(val, tmp_path / "val", per_shard=4, say=lambda _: None)
    out = tmp_path / "ft"
    result = run_script("finetune.py", "--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4",
                        "--epochs", "2", "--nb_classes", "3", "--num_workers", "0", "--log_with", "none",
                        "--data_set", "image_folder", "--data_path", tmp_path / "train",
                        "--eval_data_path", str(tmp_path / "val" / "shard-{000000..000002}.tar"), "--output_dir", out)
    assert "on 24 images in 3 classes" in result.stdout
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 2 and all(0 <= entry["test_acc1"] <= 100 for entry in log)
    # the evaluation saw the 9 validation images: the same figures as from their folder
    model = out / "model_best.safetensors"
    common = ["--model", "convnextv2_atto", "--input_size", "64", "--nb_classes", "3", "--num_workers", "0",
              "--data_set", "image_folder", "--eval", "true", "--resume", model, "--output_dir", ""]
    from_shards = run_script("finetune.py", *common, "--data_path", tmp_path / "train", "--eval_data_path",
                             tmp_path / "val")
    from_folder = run_script("finetune.py", *common, "--data_path", folder, "--eval_data_path", val)
    line = re.compile(r"accuracy of the network on the 9 test images: .*")
    assert line.search(from_shards.stdout).group(0) == line.search(from_folder.stdout).group(0)
    assert load_file(str(model))


def test_unlabelled_shards_cannot_fine_tune(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in make_images(tmp_path / "classes", count=4).rglob("*.png"):
        p.rename(flat / p.name)  # no class folders: unlabelled shards
    write_shards(flat, tmp_path / "s", per_shard=4, say=lambda _: None)
    result = run_script("finetune.py", "--data_set", "image_folder", "--data_path", tmp_path / "s", "--disable_eval",
                        "true", "--nb_classes", "2", "--output_dir", "", expect=2)
    assert "carry no class labels" in result.stderr and "Traceback" not in result.stderr


def test_the_loader_bench_reads_shards_beside_the_folder(folder, tmp_path):
    write_shards(folder, tmp_path / "s", per_shard=8, say=lambda _: None)
    for data in (folder, tmp_path / "s"):
        run_module("fcmae.bench", "--data", data, "--input_size", "64", "--batch_size", "4",
                   "--num_workers", "0", "--batches", "2", "--json", tmp_path / "b.json")
        record = json.loads((tmp_path / "b.json").read_text())[0]
        assert record["shards"] == (data != folder) and record["images_per_s"] > 0
    dataset = open_images(tmp_path / "s", PretrainTransform(64))
    assert len(dataset) == 24 and len(dataset.pictures(5)) == 5


def test_an_index_through_a_pipe_and_shard_counts_that_cannot_work(folder, tmp_path):
    out = tmp_path / "s"
    write_shards(folder, out, per_shard=10, say=lambda _: None)
    with pytest.raises(Exception, match="names shards relative to it, which a pipe: command has not"):
        Shards.open(f"pipe:cat {out / 'index.json'}")
    index = json.loads((out / "index.json").read_text())
    for entry in index["shards"]:
        entry["url"] = f"pipe:cat {out / entry['url']}"  # full pipe: commands work
    (tmp_path / "piped.json").write_text(json.dumps(index))
    shards = Shards.open(f"pipe:cat {tmp_path / 'piped.json'}")
    assert shards.counts == [10, 10, 4] and len(stream(shards, 0, 0, 1, batch=4)) == 6
    with pytest.raises(Exception, match="has 3 shard.s. for 4 processes, and every process reads whole shards"):
        open_images(out, PretrainTransform(64)).batch_sampler(2, 1, 4, 0, 0)
