"""Images beyond RGB: multi-band uint16 TIFFs and float32 .npy arrays through pretraining, the
statistics from the data, exports, fine-tuning, resume; the array pipeline against a float64
reference; RGB weights adapted to N channels; bad inputs."""
import json
import math

import numpy as np
import pytest
import tifffile
import timm
import torch
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torchvision.transforms import functional as F

import fcmae
from fcmae.cli.reconstruct_images import main as reconstruct_main
from fcmae.data import EvalTransform, FolderSource, PretrainTransform, Record, seeded
from fcmae.data.arrays import channels_first
from fcmae.data.statistics import channel_statistics, sample_records, whole_pixels
from fcmae.training.monitors import pooled_features
from fcmae.weights import export, load_into
from test_finetune import finetune
from test_pretrain import final_params, kill_at_checkpoint, pretrain, run_pretrain

BANDS = 13
RUN = ["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "4", "--epochs", "2", "--num_workers", "0",
       "--device", "cpu", "--log_with", "none", "--warmup_epochs", "0", "--decoder_embed_dim", "32", "--blr", "1e-2",
       "--norm_stats", "auto"]


def tile(rng, bands, dtype, height=72, width=80):
    """A synthetic multi-band tile: a ramp per band plus noise, so every band has its own statistics."""
    ramp = np.linspace(0, 1, width)[None, None, :] * (1 + np.arange(bands))[:, None, None]
    values = ramp + rng.random((bands, height, width))
    if dtype == np.uint16:
        return (values * 2000).astype(np.uint16)
    return (values * 3 - 1).astype(dtype)


def two_classes(root, count=12):
    """(index, its class folder under `root`) for `count` images, alternating between two classes."""
    for i in range(count):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(exist_ok=True)
        yield i, folder


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory):
    """Two classes of 13-band uint16 GeoTIFF-like tiles, most (C, H, W) planar, some (H, W, C)."""
    root = tmp_path_factory.mktemp("tiffs")
    rng = np.random.default_rng(0)
    for i, folder in two_classes(root):
        array = tile(rng, BANDS, np.uint16)
        if i % 3:
            tifffile.imwrite(folder / f"tile{i:02d}.tif", array, photometric="minisblack", planarconfig="separate")
        else:
            tifffile.imwrite(folder / f"tile{i:02d}.tiff", array.transpose(1, 2, 0), photometric="minisblack",
                             planarconfig="contig")
    return root


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Two classes of 5-channel float32 .npy images, (H, W, C)."""
    root = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(1)
    for i, folder in two_classes(root):
        np.save(folder / f"image{i:02d}.npy", tile(rng, 5, np.float32, 64, 64).transpose(1, 2, 0))
    return root


def test_the_uint16_pipeline_equals_a_float64_reference(tiffs):
    path = next(tiffs.rglob("*.tif"))
    raw = tifffile.imread(path).astype(np.float64) / 65535  # (C, H, W), the pipeline's units
    record = Record(0, None, str(path), path=str(path))
    mean, std = tuple(np.linspace(0.1, 0.3, BANDS)), tuple(np.linspace(0.05, 0.1, BANDS))
    pretraining = PretrainTransform(48, BANDS, mean, std)
    for seed in range(4):
        with seeded(seed):
            crop = pretraining.plan(torch.empty(BANDS, *raw.shape[1:]))
        top, left, height, width = crop.box
        reference = F.resized_crop(torch.from_numpy(raw), top, left, height, width, [48, 48], crop.interpolation,
                                   antialias=True)
        reference = reference.flip(-1) if crop.flip else reference
        with seeded(seed), fcmae.data.arrays.open_image(record, BANDS) as img:
            shipped = pretraining(img, record, None)  # (H, W, C) float32, normalised on the device
        assert shipped.dtype == torch.float32 and shipped.shape == (48, 48, BANDS)
        assert torch.allclose(shipped.permute(2, 0, 1).double(), reference, rtol=0, atol=1e-6)
        on_device = fcmae.data.to_device(shipped[None], "cpu", mean, std)[0]
        expected = (reference - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        assert torch.allclose(on_device.double(), expected, rtol=0, atol=1e-4)
    evaluation = EvalTransform(32, mean, std, in_chans=BANDS)
    with fcmae.data.arrays.open_image(record, BANDS) as img:
        shipped = evaluation(img, record, None)
    short = math.floor(32 / 0.875)  # timm's evaluation: resize the short side to size / crop_pct, centre crop
    resized = F.resize(torch.from_numpy(raw), short, F.InterpolationMode.BICUBIC, antialias=True)
    assert torch.allclose(shipped.permute(2, 0, 1).double(), F.center_crop(resized, 32), rtol=0, atol=1e-6)


def test_the_statistics_equal_numpys_over_the_same_seeded_sample(tiffs):
    source = FolderSource.open(str(tiffs))
    mean, std, used = channel_statistics(source, BANDS, 5, seed=3)
    records = sample_records(source, 5, seed=3)
    assert used == 5 and len({r.name for r in records}) == 5
    assert [r.name for r in records] != [r.name for r in sample_records(source, 5, seed=4)]
    pixels = np.concatenate([channels_first(tifffile.imread(r.path), BANDS).double().flatten(1).numpy()
                             for r in records], axis=1)
    np.testing.assert_allclose(mean, pixels.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(axis=1), rtol=1e-8)
    # the RGB path's units: 8-bit images scaled to [0, 1], as ToTensor scales them
    rgb = whole_pixels(Record(0, None, "x", path=str(fcmae.data.sample_photographs()[0])), 3)
    assert rgb.shape[0] == 3 and 0 <= float(rgb.min()) and float(rgb.max()) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("data, channels", [("tiffs", BANDS), ("arrays", 5)])
def test_n_channel_data_pretrains_exports_loads_into_timm_and_fine_tunes_with_its_statistics(
        data, channels, request, tmp_path, capsys):
    root = request.getfixturevalue(data)
    out = tmp_path / "pretrain"
    names = [f"B{i:02d}" for i in range(1, channels + 1)]
    pretrain.main([*RUN, "--data_path", str(root), "--in_chans", str(channels), "--output_dir", str(out),
                   "--channel_names", ",".join(names)])
    said = capsys.readouterr().out
    assert f"{channels} channels" in said and "statistics: computed from 12 images" in said
    saved = json.loads((out / "statistics.json").read_text())
    assert len(saved["mean"]) == channels and saved["images"] == 12 and saved["channel_names"] == names
    # the reconstruction command reads the run's statistics and shows three chosen channels
    picture = tmp_path / "reconstruction.png"
    image = next(p for p in sorted(root.rglob("*")) if p.is_file())
    reconstruct_main([str(sorted((out / "checkpoints").iterdir())[-1]), str(image), "--input_size", "64",
                      "--output", str(picture), "--show_channels", "3,2,1"])
    assert picture.is_file() and "wrote" in capsys.readouterr().out
    # the export carries them, loads into timm with in_chans, and gives fcmae's features
    model = timm.create_model("convnextv2_atto", in_chans=channels, num_classes=0)
    missing, unexpected = model.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=False)
    assert not unexpected and sorted(missing) == ["head.norm.bias", "head.norm.weight"]  # every tensor but the head
    fcmae_model = fcmae.create_model("convnextv2_atto", in_chans=channels, decoder_embed_dim=32)
    load_into(fcmae_model, str(out / "encoder.safetensors"))
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        ours = pooled_features(fcmae_model.encoder.eval(), x)
        theirs = torch.nn.functional.normalize(model.eval().forward_features(x).mean(dim=(2, 3)), dim=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    hf = tmp_path / "hf"
    export(str(out / "encoder.safetensors"), "hf", hf)
    config = json.loads((hf / "config.json").read_text())
    assert config["num_channels"] == channels and config["image_mean"] == saved["mean"]
    # fine-tuning reads them back from the weights
    ft = tmp_path / "finetune"
    finetune.main([*RUN[:RUN.index("--decoder_embed_dim")], "--data_set", "image_folder", "--data_path", str(root),
                   "--eval_data_path", str(root), "--nb_classes", "2", "--in_chans", str(channels), "--aa", "none",
                   "--mixup", "0", "--cutmix", "0", "--epochs", "1", "--finetune", str(out / "encoder.safetensors"),
                   "--output_dir", str(ft)])
    said = capsys.readouterr().out
    assert f"statistics: those of the weights ({out / 'encoder.safetensors'})" in said
    metadata = fcmae.weights.read_statistics(ft / "model_best.safetensors")
    assert list(metadata["mean"]) == saved["mean"] and list(metadata["std"]) == saved["std"]
    assert list(metadata["channel_names"]) == names
    # weights whose channels are named otherwise are refused, in one sentence
    with pytest.raises(SystemExit):
        finetune.main([*RUN[:RUN.index("--decoder_embed_dim")], "--data_set", "image_folder", "--data_path",
                       str(root), "--eval_data_path", str(root), "--nb_classes", "2", "--in_chans", str(channels),
                       "--aa", "none", "--finetune", str(out / "encoder.safetensors"), "--output_dir",
                       str(tmp_path / "refused"), "--channel_names", ",".join(reversed(names))])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "were trained on the channels B01," in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("data, channels", [("tiffs", BANDS), ("arrays", 5)])
def test_a_killed_n_channel_run_resumes_exactly(data, channels, request, tmp_path):
    args = [*RUN, "--data_path", str(request.getfixturevalue(data)), "--in_chans", str(channels),
            "--save_ckpt_num", "0"]
    straight = tmp_path / "straight"
    run_pretrain(*args, "--output_dir", straight)  # as the other resume tests: both runs in processes of their own
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, 2)
    assert (killed / "statistics.json").read_text() == (straight / "statistics.json").read_text()
    result = run_pretrain(*args, "--output_dir", killed)
    assert "resumed from" in result.stdout and f"statistics: {killed / 'statistics.json'}" in result.stdout
    a, b = final_params(straight), final_params(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("channels", [1, 4, BANDS])
def test_rgb_weights_load_into_n_channels_with_timms_adapted_stem(channels, tmp_path, capsys):
    rgb = fcmae.create_model("convnextv2_atto")
    path, _ = export(rgb, "timm", tmp_path / "rgb.safetensors")
    model = fcmae.create_model("convnextv2_atto", in_chans=channels)
    report = load_into(model, str(path), adapt_stem=True)
    expected = adapt_input_conv(channels, rgb.encoder.stem[0].weight.detach())
    assert torch.equal(model.encoder.stem[0].weight.detach(), expected)
    assert report["stem"].startswith(f"the stem adapted from 3 to {channels} input channels")
    with pytest.raises(fcmae.weights.WeightsError, match="3 input channels"):
        load_into(fcmae.create_model("convnextv2_atto", in_chans=channels), str(path))


def test_pretraining_from_rgb_weights_says_it_adapted_the_stem_or_refuses(tiffs, tmp_path, capsys):
    path, _ = export(fcmae.create_model("convnextv2_atto"), "timm", tmp_path / "rgb.safetensors")
    args = [*RUN, "--data_path", str(tiffs), "--in_chans", str(BANDS), "--init", str(path), "--max_steps", "1"]
    pretrain.main([*args, "--output_dir", str(tmp_path / "adapted")])
    assert f"the stem adapted from 3 to {BANDS} input channels (repeated and scaled by 3/{BANDS})" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit):
        pretrain.main([*args, "--output_dir", str(tmp_path / "refused"), "--adapt_stem", "false"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "3 input channels" in errors[0], errors


@pytest.mark.parametrize("kind", ["shards", "hugging face arrays"])
def test_arrays_come_from_shards_and_hugging_face_array_features(kind, arrays, tmp_path, capsys):
    if kind == "shards":
        data = tmp_path / "shards"
        fcmae.data.write_shards(arrays, data, per_shard=5, say=lambda *a: None)  # the .npy files as they are
    else:
        datasets = pytest.importorskip("datasets")
        files = sorted(arrays.rglob("*.npy"))
        features = datasets.Features({"image": datasets.Array3D((64, 64, 5), "float32")})
        data = tmp_path / "hf"
        datasets.Dataset.from_dict({"image": [np.load(f) for f in files]}, features=features).save_to_disk(data)
    pretrain.main([*RUN, "--data_path", str(data), "--in_chans", "5", "--output_dir", str(tmp_path / "o"),
                   "--epochs", "1"])
    said = capsys.readouterr().out
    assert "on 12 images" in said and "done after 3 steps" in said
    line = json.loads((tmp_path / "o" / "log.txt").read_text().splitlines()[-1])
    assert line["skipped_images"] == 0 and math.isfinite(line["train_loss"])


def test_bad_n_channel_files_are_skipped_named_and_counted(tiffs, tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    for path in sorted(tiffs.rglob("*.tif*"))[:8]:
        (root / path.name).write_bytes(path.read_bytes())
    rng = np.random.default_rng(2)
    tifffile.imwrite(root / "four_bands.tif", tile(rng, 4, np.uint16), photometric="minisblack",
                     planarconfig="separate")
    bad_float = tile(rng, BANDS, np.float32)
    bad_float[0, 0, 0] = np.nan
    np.save(root / "nan.npy", bad_float)
    np.save(root / "int32.npy", tile(rng, BANDS, np.uint16).astype(np.int32))
    with pytest.warns(UserWarning) as warned:
        pretrain.main([*RUN, "--data_path", str(root), "--in_chans", str(BANDS), "--output_dir", str(tmp_path / "o"),
                       "--epochs", "1", "--batch_size", "11"])
    messages = "\n".join(str(w.message) for w in warned)
    assert "four_bands.tif" in messages and "and --in_chans is 13" in messages
    assert "nan.npy" in messages and "NaN or infinite" in messages
    assert "int32.npy" in messages and "int32 pixels" in messages
    line = json.loads((tmp_path / "o" / "log.txt").read_text().splitlines()[-1])
    assert line["skipped_images"] >= 3


@pytest.mark.parametrize("case", ["all disagree", "wrong count of means", "dali", "randaugment"])
def test_bad_channel_settings_are_one_sentence(case, tiffs, tmp_path, capsys):
    script, args, expected = {
        "all disagree": (pretrain, ["--in_chans", "4"], "neither axis of it 4 channels, and --in_chans is 4"),
        "wrong count of means": (pretrain, ["--in_chans", str(BANDS), "--mean", "0.1,0.2", "--std", "0.1,0.2"],
                                 "--mean has 2 values and --in_chans is 13"),
        "dali": (pretrain, ["--in_chans", str(BANDS), "--decoder", "dali"], "--decoder dali decodes RGB"),
        "randaugment": (finetune, ["--in_chans", str(BANDS), "--data_set", "image_folder", "--eval_data_path",
                                   str(tiffs), "--nb_classes", "2"], "pass --aa none"),
    }[case]
    run = [a for a in RUN if a not in ("--norm_stats", "auto")]
    if script is finetune:
        run = run[:run.index("--decoder_embed_dim")]
    with pytest.raises(SystemExit) as exit_info:
        script.main([*run, "--data_path", str(tiffs), "--output_dir", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], errors
