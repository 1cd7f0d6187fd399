"""Shrinking once, on write: python -m fcmae.shards --max_size and python -m fcmae.shrink."""
import contextlib
import io
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from fcmae.cli import write_shards as shards_command
from fcmae.cli import shrink_images as shrink_command
from fcmae.config import ConfigError
from fcmae.data.shrinking import KEPT, REENCODED, UNREADABLE, shrink_image
from fcmae.data.conversion import image_tree, shrink_folder, source_files, write_shards
from test_pretrain import SMALL, make_images, run_pretrain
from test_shards import run_module

S = 120  # --max_size of these tests: make_images' 80-pixel images stay as they are
# the larger images, by name: (outcome, format and mode of the result)
LARGER = {
    "a/wide.jpg": (REENCODED, "JPEG", "RGB"), "b/tall.jpg": (REENCODED, "JPEG", "RGB"),
    "a/grey.jpg": (REENCODED, "JPEG", "L"), "b/cmyk.jpg": (REENCODED, "JPEG", "CMYK"),
    "a/alpha.png": (REENCODED, "PNG", "RGBA"), "b/palette.png": (REENCODED, "PNG", "RGBA"),
    "a/lossy.webp": (REENCODED, "WEBP", "RGB"), "b/nested/deep/lossless.webp": (REENCODED, "WEBP", "RGB"),
    "a/edge.jpg": (KEPT, "JPEG", "RGB"),  # exactly S: kept
    "b/broken.jpg": (UNREADABLE, None, None), "a/truncated.jpg": (UNREADABLE, None, None),
}


def picture(width, height, seed=0):
    """A smooth colour picture with some noise, as an RGB PIL image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / (7 + seed)), np.cos(yy / 11), np.sin((xx + yy) / 17)], -1) * 0.4 + 0.5
    return Image.fromarray(np.clip((base + rng.normal(0, 0.03, base.shape)) * 255, 0, 255).astype(np.uint8))


def orientation_exif(value=6):
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation: 6 = shown rotated by 90 degrees
    return exif.tobytes()


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """make_images' small PNGs in class folders a/ and b/, plus the larger images of LARGER."""
    root = make_images(tmp_path_factory.mktemp("photos"), count=8, classes=("a", "b"))
    (root / "b" / "nested" / "deep").mkdir(parents=True)
    picture(400, 150, 1).save(root / "a/wide.jpg", quality=95, exif=orientation_exif(), icc_profile=SRGB)
    picture(150, 370, 2).save(root / "b/tall.jpg", quality=95, subsampling=0)
    picture(300, 300, 3).convert("L").save(root / "a/grey.jpg", quality=95)
    picture(260, 200, 4).convert("CMYK").save(root / "b/cmyk.jpg", quality=95)
    alpha = picture(330, 200, 5).convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize((330, 200)))
    alpha.save(root / "a/alpha.png")
    palette = picture(250, 130, 6).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "b/palette.png", transparency=0)
    picture(300, 200, 7).save(root / "a/lossy.webp", quality=90)
    picture(300, 200, 8).save(root / "b/nested/deep/lossless.webp", lossless=True)
    picture(S, 90, 9).save(root / "a/edge.jpg", quality=90)
    (root / "b/broken.jpg").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    picture(600, 400, 10).save(buffer, "JPEG", quality=90)
    (root / "a/truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 3])
    return root


def check_copy(src, files, what):
    """`files` {relative name: bytes} hold every image of `src`: small and unreadable ones byte for
    byte, larger ones with the longer side S and the aspect within a pixel, format and mode as LARGER says."""
    assert sorted(files) == sorted(str(p) for p in image_tree(src)), what
    for name, data in files.items():
        original = (src / name).read_bytes()
        outcome, fmt, mode = LARGER.get(name, (KEPT, "PNG", "RGB"))
        if outcome != REENCODED:
            assert data == original, name
            continue
        with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(data)) as after:
            (w, h), (w2, h2) = before.size, after.size
            assert max(w2, h2) == S and (w2 == S) == (w >= h), name
            assert abs(h2 - h * w2 / w) <= 1 and abs(w2 - w * h2 / h) <= 1, name
            assert (after.format, after.mode) == (fmt, mode), name


def members(path):
    """(name, bytes) of a tar's members, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def shard_images(out, src):
    """{relative source name: bytes} of the images in the shards of `out` (keys number the sorted images)."""
    files = source_files(src)[0]
    index = json.loads((out / "index.json").read_text())
    found = {}
    for entry in index["shards"]:
        for name, data in members(out / entry["url"]):
            key, ext = name.split(".", 1)
            if ext != "cls":
                found[os.path.relpath(files[int(key)], src)] = data
    return found


def run_main(command, *args):
    """`command`'s main in this process (no interpreter to start: the tests stay quick); its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        command.main([str(a) for a in args])
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue())


def quiet(_):
    pass


# ----- one image -----------------------------------------------------------------------------------

def test_each_kind_of_image(photos):
    for name, (outcome, fmt, mode) in LARGER.items():
        data = (photos / name).read_bytes()
        result = shrink_image(data, S, quality=90)
        assert result.outcome == outcome, (name, result.reason)
        assert (result.data == data) == (outcome != REENCODED), name
        assert bool(result.reason) == (outcome == UNREADABLE), name
    wide = Image.open(io.BytesIO(shrink_image((photos / "a/wide.jpg").read_bytes(), S).data))
    # EXIF (orientation too) and ICC kept; the pixels are not rotated: the loaders ignore the orientation
    assert wide.size == (S, 45) and wide.getexif()[0x0112] == 6 and wide.info["icc_profile"] == SRGB
    tall = Image.open(io.BytesIO(shrink_image((photos / "b/tall.jpg").read_bytes(), S).data))
    assert JpegImagePlugin.get_sampling(tall) == 0 and JpegImagePlugin.get_sampling(wide) == 2  # as the source
    # PNG stays lossless: exactly the Lanczos resize of the pixels
    source = Image.open(photos / "a/alpha.png")
    shrunk = Image.open(io.BytesIO(shrink_image((photos / "a/alpha.png").read_bytes(), S).data))
    assert np.array_equal(np.asarray(shrunk), np.asarray(source.resize(shrunk.size, Image.LANCZOS)))
    lossless = shrink_image((photos / "b/nested/deep/lossless.webp").read_bytes(), S).data
    assert b"VP8L" in lossless[12:40] and b"VP8L" not in shrink_image((photos / "a/lossy.webp").read_bytes(), S).data
    # 16-bit greyscale stays 16-bit; a smaller quality, a smaller file
    buffer = io.BytesIO()
    Image.fromarray((np.arange(200 * 150).reshape(150, 200) * 2).astype(np.uint16)).save(buffer, "PNG")
    deep = Image.open(io.BytesIO(shrink_image(buffer.getvalue(), S).data))
    assert deep.size == (S, 90) and deep.mode.startswith("I") and np.asarray(deep).max() > 255
    big = (photos / "a/wide.jpg").read_bytes()
    assert len(shrink_image(big, S, quality=50).data) < len(shrink_image(big, S, quality=95).data)


# ----- the folder copy -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shrunk_folder(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("copy") / "small"
    result = run_main(shrink_command, photos, out, "--max_size", S, "--workers", 2)
    return out, result


def test_the_copy_keeps_the_tree_and_shrinks_only_the_larger_images(photos, shrunk_folder):
    out, result = shrunk_folder
    check_copy(photos, {str(p): (out / p).read_bytes() for p in image_tree(out)}, "the copy")
    assert "19 of 19 images" in result.stdout and "images/s" in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"shrank 19 images into {out} (at most {S} px, quality 90): 8 re-encoded, "
                              "9 copied, 2 unreadable (copied as they were); ") and " before, " in summary
    for name in ("b/broken.jpg", "a/truncated.jpg"):
        assert str(photos / name) in result.stderr and "is not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((out / ".plan.json").read_text())["max_size"] == S


def test_the_copy_continues_where_it_stopped_and_refuses_other_settings(photos, tmp_path):
    out = tmp_path / "small"
    first = shrink_folder(photos, out, S, say=quiet, warn=quiet)
    assert (first["reencoded"], first["copied"], first["unreadable"], first["existing"]) == (8, 9, 2, 0)
    assert first["bytes_after"] < first["bytes_before"]
    before = {p: (out / p).stat().st_mtime_ns for p in image_tree(out)}
    gone = ["a/wide.jpg", "b/img_001.png", "b/nested/deep/lossless.webp"]
    for name in gone:
        (out / name).unlink()  # as if the run was killed before these
    (out / "a/.wide.jpg.partial").write_bytes(b"torn")  # and while writing this one
    said = []
    again = shrink_folder(photos, out, S, say=said.append, warn=quiet, every=0)
    assert (again["reencoded"], again["copied"], again["unreadable"], again["existing"]) == (2, 1, 0, 16)
    assert len(said) == 3 and said[-1].startswith("19 of 19 images")
    after = {p: (out / p).stat().st_mtime_ns for p in image_tree(out)}
    assert {str(p) for p in after if after[p] != before[p]} == set(gone)  # only the missing ones written
    assert not list(out.rglob("*.partial")) and again["bytes_after"] == first["bytes_after"]
    check_copy(photos, {str(p): (out / p).read_bytes() for p in image_tree(out)}, "the resumed copy")
    with pytest.raises(ConfigError, match="written with other settings"):
        shrink_folder(photos, out, S, quality=80, say=quiet, warn=quiet)
    with pytest.raises(ConfigError, match="written with other settings"):
        shrink_folder(photos, out, S + 1, say=quiet, warn=quiet)


# ----- shards --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shrunk_shards(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    result = run_main(shards_command, photos, out, "--per_shard", 5, "--max_size", S, "--workers", 2)
    return out, result


def test_shards_shrink_only_the_larger_images_and_record_it(photos, shrunk_shards):
    out, result = shrunk_shards
    check_copy(photos, shard_images(out, photos), "the shards")
    index = json.loads((out / "index.json").read_text())
    assert (index["max_size"], index["quality"], index["reencoded"], index["unreadable"]) == (S, 90, 8, 2)
    assert index["classes"] == ["a", "b"] and [e["images"] for e in index["shards"]] == [5, 5, 5, 4]
    assert result.stdout.strip().splitlines()[-1].endswith(
        f"; 8 re-encoded to at most {S} px (quality 90), 2 unreadable stored as they were")
    assert "b/broken.jpg is not a readable image" in result.stderr and "Traceback" not in result.stderr
    plan = json.loads((out / ".plan.json").read_text())
    assert (plan["max_size"], plan["quality"]) == (S, 90)


def test_shards_do_not_depend_on_the_number_of_workers(photos, shrunk_shards, tmp_path):
    out, _ = shrunk_shards
    write_shards(photos, tmp_path / "one", per_shard=5, max_size=S, workers=1, say=quiet, warn=quiet)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"):
        assert members(tmp_path / "one" / name) == members(out / name)  # the same members, in the same order
    assert (tmp_path / "one" / "index.json").read_text() == (out / "index.json").read_text()


def test_shards_continue_where_they_stopped_and_refuse_other_settings(photos, shrunk_shards, tmp_path):
    out = tmp_path / "s"
    write_shards(photos, out, per_shard=5, max_size=S, workers=1, say=quiet, warn=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000002.tar").unlink()  # as if the run was killed while writing it
    (out / ".shard-000002.tar.partial").write_bytes(b"torn")
    (out / "index.json").unlink()
    with open(out / ".stats.jsonl", "a") as f:
        f.write('{"url": "shard-0000')  # a line torn by the kill
    said = []
    index = write_shards(photos, out, per_shard=5, max_size=S, workers=2, say=said.append, warn=quiet)
    assert [s.split(":")[0] for s in said] == ["shard-000002.tar"]  # only the missing one
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "shard-000002.tar"} == \
        {k: v for k, v in before.items() if k != "shard-000002.tar"}
    assert not list(out.glob(".*.partial")) and (index["reencoded"], index["unreadable"]) == (8, 2)
    assert (out / "index.json").read_text() == (shrunk_shards[0] / "index.json").read_text()
    assert members(out / "shard-000002.tar") == members(shrunk_shards[0] / "shard-000002.tar")
    for other in ({"max_size": S, "quality": 80}, {"max_size": S + 1}, {}):
        with pytest.raises(ConfigError, match="written with other settings"):
            write_shards(photos, out, per_shard=5, say=quiet, warn=quiet, **other)


# ----- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [shards_command, shrink_command])
def test_bad_input_is_one_sentence(command, photos, shrunk_folder, shrunk_shards, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        (tmp_path / "missing", tmp_path / "o1"): "does not exist",
        (a_file, tmp_path / "o2"): "is a file, not a folder of images",
        (photos, a_file): f"OUT {a_file} is a file; name a folder",
        (photos, a_file / "below"): "cannot be created",
    }
    size = ["--max_size", str(S)]
    runs = [([str(src), str(out), *size], expected) for (src, out), expected in cases.items()]
    runs += [([str(photos), str(tmp_path / "o3"), "--max_size", "0"], "--max_size must be at least 1, got 0"),
             ([str(photos), str(tmp_path / "o4"), *size, "--quality", "0"], "--quality must be in [1, 100], got 0"),
             ([str(photos), str(tmp_path / "o5"), *size, "--quality", "101"], "--quality must be in [1, 100]"),
             ([str(photos), str(tmp_path / "o6"), *size, "--workers", "0"], "--workers must be at least 1")]
    written = (shrunk_shards if command is shards_command else shrunk_folder)[0]
    other = ["--per_shard", "5"] if command is shards_command else []
    runs += [([str(photos), str(written), *other, "--max_size", str(S + 1)], "written with other settings"),
             ([str(photos), str(written), *other, *size, "--quality", "80"], "written with other settings")]
    if command is shards_command:  # without --max_size too, as before
        runs += [([str(photos), str(a_file)], f"OUT {a_file} is a file; name a folder"),
                 ([str(photos), str(tmp_path / "o7"), "--quality", "80"], "--quality applies only with --max_size")]
    else:
        runs += [([str(photos), str(tmp_path / "o8")], "the following arguments are required: --max_size"),
                 ([str(photos), str(photos / "a" / "small"), *size], "lies inside SRC")]
    for argv, expected in runs:
        with pytest.raises(SystemExit) as stop:
            command.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_bad_input_through_the_command_line(photos, tmp_path):
    """As a user runs it: one sentence, exit code 2, no traceback (the shard writer raised
    FileExistsError for an OUT that is a file)."""
    (tmp_path / "a_file").write_text("x")
    result = run_module("fcmae.shards", photos, tmp_path / "a_file", expect=2)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "is a file; name a folder" in result.stderr


def test_a_copy_only_goes_into_a_new_folder_or_its_own(photos, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="holds files not written by python -m fcmae.shrink"):
        shrink_folder(photos, tmp_path / "full", S, say=quiet, warn=quiet)
    write_shards(photos, tmp_path / "shards", per_shard=50, say=quiet)
    with pytest.raises(ConfigError, match="written with other settings"):
        shrink_folder(photos, tmp_path / "shards", S, say=quiet, warn=quiet)


# ----- training on the results ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("form", ["folder", "shards"])
def test_pretraining_reads_the_shrunk_data(form, shrunk_folder, shrunk_shards, tmp_path):
    data = (shrunk_folder if form == "folder" else shrunk_shards)[0]
    out = tmp_path / "run"
    result = run_pretrain(*SMALL, "--epochs", "1", "--save_ckpt", "false", "--data_path", data, "--output_dir", out)
    assert "4 steps per epoch" in result.stdout  # 19 images, batches of 4
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    # 4 steps of 4 from 19 images: the unreadable ones, when drawn, are named and skipped
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    assert log[0]["skipped_images"] == result.stderr.count("skipping unreadable image")
