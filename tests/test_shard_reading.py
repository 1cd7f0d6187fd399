"""Shards read in the loader's workers (fcmae/data/tar_shards.py): the sampler in the main process
reads nothing and sends small keys; a worker reads a local tar by its members' offsets, and a URL
or pipe: command whole, each shard once; both readings give exactly webdataset's samples."""
import gzip
import io
import os
import tarfile
import warnings
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from fcmae.data import DataError, PretrainTransform, collate, open_images, write_shards
from fcmae.data import tar_shards as shard_module
from fcmae.data.tar_shards import ShardRef, ShardTables, Shards, read_shard
from test_pretrain import make_images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    write_shards(make_images(root / "images", count=24, size=40), root / "s", per_shard=4, say=lambda _: None)
    return root / "s"


def tar_of(members):
    """A tar file's bytes: (name, bytes) members, or (name, None) for a folder."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def reading(url, expected):
    """What read_shard gives for `url`: each sample's fields and image bytes, and how many warnings it
    said; or 'DataError'."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            table = read_shard(url, expected)
        except DataError:
            return "DataError"
    return [(s.index, s.ext, s.cls, table.image(i)) for i, s in enumerate(table.samples)], len(said)


def test_reading_by_offsets_gives_webdataset_s_samples_however_the_file_ends(tmp_path):
    """A local tar read headers-only against the same file read whole by webdataset (through a pipe:
    command): the same samples, fillings and warnings, cut at every 97th byte; a gzipped tar (read
    whole) too."""
    rng = torch.Generator().manual_seed(0)
    members = []
    for i in range(6):
        members += [(f"{i:09d}.jpg", bytes(torch.randint(0, 256, (600 + 90 * i,), generator=rng).tolist())),
                    (f"{i:09d}.cls", str(i % 3).encode())]
    members[3:3] = [("__meta__", b"x"), ("folder", None)]  # skipped by webdataset, and by the offsets
    members += [("named.PNG", b"p" * 700), ("named.json", b"{}"), ("noextension", b"z"),
                ("000000099.txt", b"no image"), ("000000100.jpg", b"a"), ("000000100.jpg", b"b")]  # a duplicate
    data = tar_of(members)
    path = tmp_path / "shard.tar"
    cuts = list(range(0, len(data), 97)) + [len(data)]
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert shard_module.is_seekable(str(path))
        assert reading(str(path), 10) == reading(f"pipe:cat {path}", 10), cut
    whole = reading(str(path), 10)[0]
    assert [s[:3] for s in whole[:9]] == [(i, "jpg", i % 3) for i in range(6)] + [(6, "png", None), (99, None, None),
                                                                                   (0, "jpg", 0)]  # filled up
    assert whole[8][3] is None and whole[7][3] is None  # no image: read as unreadable
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress(data))
    assert not shard_module.is_seekable(str(tmp_path / "shard.tar.gz"))
    assert reading(str(tmp_path / "shard.tar.gz"), 10) == reading(str(path), 10)


def test_the_sampler_reads_nothing_and_sends_small_keys(shards, monkeypatch):
    dataset = open_images(shards, PretrainTransform(32))
    sampler = dataset.batch_sampler(4, 1, 1, 0, seed=3)

    def no_reading(*args, **kwargs):
        raise AssertionError("the main process read a shard")

    for name in ("read_shard", "is_seekable", "_local_members", "_streamed_members"):
        monkeypatch.setattr(shard_module, name, no_reading)
    monkeypatch.setattr("builtins.open", no_reading)
    batches = [list(batch) for batch in sampler] + [list(b) for b in dataset.evaluation_batches(0, 1, 5)]
    sizes = [len(ForkingPickler.dumps(batch)) for batch in sampler]
    monkeypatch.undo()
    assert len(batches) == 6 + 5 and max(sizes) < 600  # about what sixteen small tuples and two paths take
    keys = [key for batch in batches[:6] for key in batch]
    assert sorted(member["index"] for member, _, _ in keys) == list(range(24))  # read here, when asked


def loader_batches(dataset, workers, epochs=2):
    sampler = dataset.batch_sampler(2, 1, 1, 0, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_workers_read_each_shard_once_and_the_main_process_none(shards, tmp_path, monkeypatch):
    """Two workers, two epochs: each reads a local shard's table once, the main process never; the
    batches equal those of no workers, and those of the same shards read whole through pipe:
    commands (in the workers, read ahead)."""
    log = tmp_path / "reads.txt"
    original = shard_module.read_shard

    def logged(url, expected):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {url}\n")
        return original(url, expected)

    monkeypatch.setattr(shard_module, "read_shard", logged)  # the forked workers inherit it
    monkeypatch.setattr(shard_module, "TABLES", ShardTables())  # this test's own (the workers make theirs)
    local = open_images(shards, PretrainTransform(32), seed=1)
    piped = open_images(shards, PretrainTransform(32), seed=1)
    piped.source.shards.urls = [f"pipe:cat {url}" for url in piped.source.shards.urls]
    with_workers = loader_batches(local, 2)
    reads = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert str(os.getpid()) not in {pid for pid, _ in reads}
    assert len(reads) == len(set(map(tuple, reads))) and len({pid for pid, _ in reads}) == 2  # once per worker
    log.unlink()
    for other in (loader_batches(local, 0), loader_batches(piped, 2)):
        assert len(other) == len(with_workers) == 24
        for a, b in zip(with_workers, other):
            assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert all(url.startswith("pipe:") for _, url in (line.split(" ", 1) for line in log.read_text().splitlines())
               if _ != str(os.getpid()))


def test_a_worker_that_cannot_read_its_shard_raises_one_data_error(shards, tmp_path):
    bad = tmp_path / "s"
    bad.mkdir()
    for p in shards.iterdir():
        (bad / p.name).write_bytes(p.read_bytes() if p.name != "shard-000003.tar" else b"\x00garbage" * 100)
    dataset = open_images(bad, PretrainTransform(32))
    with pytest.raises(DataError) as caught:
        loader_batches(dataset, 1, epochs=1)
    last = str(caught.value).strip().splitlines()[-1]  # what the training loop reports
    assert "DataError: the shard " in last and "shard-000003.tar cannot be read (ReadError" in last


def test_shards_read_whole_are_kept_few_and_the_next_is_read_ahead(shards):
    found = Shards.open(shards)
    urls = [f"pipe:cat {url}" for url in found.urls]
    tables = ShardTables()
    refs = [ShardRef(i, url, 4, (urls[i + 1], 4) if i + 1 < len(urls) else None) for i, url in enumerate(urls)]
    for i, ref in enumerate(refs):
        assert len(tables.get(ref)) == 4
        kept = list(tables.remote)
        assert kept[-1] == (urls[i + 1] if i + 1 < len(urls) else ref.url)  # the next one, reading
        assert len(kept) <= shard_module.REMOTE_SHARDS + 1 and not tables.local
    assert tables.get(refs[-1]) is tables.get(refs[-1])  # kept, not read again
