"""ONNX export: the graph gives PyTorch's features and logits with onnxruntime at any batch size,
says how to prepare its input, and its float16 twin is written only when it stays finite."""
import json
import sys

import numpy as np
import onnx  # the test extra installs onnx, onnxruntime and onnxscript
import onnxruntime as ort
import pytest
import timm
import torch

import fcmae
from fcmae import weights
from fcmae.data.statistics import statistics_for
from fcmae.models.convnextv2 import average_pooled
from fcmae.weights import onnx as onnx_export
from conftest import randomize_, rel_err
from test_weights import export_cli


SIZE = 64  # atto at 64 px keeps an export to a few seconds


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A pretrained atto encoder as pretrain.py writes it (timm layout, no head)."""
    torch.manual_seed(0)
    model = randomize_(fcmae.create_model("convnextv2_atto", decoder_embed_dim=64))
    return weights.export(model, "timm", tmp_path_factory.mktemp("enc") / "encoder.safetensors")[0]


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A fine-tuned 4-channel atto classifier (5 classes) that keeps its input's statistics."""
    torch.manual_seed(1)
    model = randomize_(timm.create_model("convnextv2_atto", num_classes=5, in_chans=4))
    statistics = {"mean": "[0.1, 0.2, 0.3, 0.4]", "std": "[0.5, 0.6, 0.7, 0.8]",
                  "channel_names": '["red", "green", "blue", "nir"]'}
    return weights.save_weights(model.state_dict(), tmp_path_factory.mktemp("cls") / "model_best.safetensors",
                                metadata={"model": "convnextv2_atto", **statistics})


def test_features_match_pytorch_at_other_batch_sizes_and_the_fp16_graph_is_written(encoder_file, tmp_path, capsys):
    path = tmp_path / "atto.onnx"
    code, out, err = export_cli(capsys, encoder_file, "--format", "onnx", "--output", path, "--input_size", SIZE)
    assert code == 0, err
    assert f"images (batch, 3, {SIZE}, {SIZE}) -> features (batch, 320)" in out
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["features"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]  # the batch axis is symbolic
    meta = metadata(path)
    assert meta["model"] == "convnextv2_atto" and meta["in_chans"] == "3" and meta["input_size"] == str(SIZE)
    assert meta["output"] == "features" and "num_classes" not in meta
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert "ImageNet" in meta["statistics"] and meta["fp16"].startswith("finite on 8 sample photographs")

    reference, _ = weights.load_timm(encoder_file)
    reference.eval()
    for batch in (3, 1):  # traced at 2
        imgs = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        (got,) = session(path).run(None, {"images": imgs.numpy()})
        with torch.no_grad():
            want = average_pooled(reference, imgs)
        assert got.shape == (batch, 320) and rel_err(torch.from_numpy(got), want) < 1e-4

    # the float16 graph: written, float32 in and out, finite and close on the photographs
    half = tmp_path / "atto.fp16.onnx"
    assert f"wrote the float16 graph to {half}" in out
    stored = onnx.load(str(half)).graph
    assert {i.data_type for i in stored.initializer if i.dims and len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert stored.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # takes what the fp32 graph takes
    photos = onnx_export.sample_batch(3, SIZE, statistics_for(encoder_file, 3))
    (got,) = session(half).run(None, {"images": photos})
    (want,) = session(path).run(None, {"images": photos})
    assert got.dtype == np.float32 and np.isfinite(got).all() and rel_err(torch.from_numpy(got),
                                                                         torch.from_numpy(want)) < 1e-2


def test_a_classifier_exports_its_logits_with_the_statistics_it_keeps(classifier_file, tmp_path):
    path, report = weights.export_onnx(classifier_file, tmp_path / "cls.onnx", input_size=SIZE)  # auto: logits
    assert report["output"] == "logits" and report["fp16"] == tmp_path / "cls.fp16.onnx"
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    meta = metadata(path)
    assert meta["in_chans"] == "4" and meta["num_classes"] == "5"
    assert json.loads(meta["mean"]) == [0.1, 0.2, 0.3, 0.4] and json.loads(meta["std"]) == [0.5, 0.6, 0.7, 0.8]
    assert json.loads(meta["channel_names"]) == ["red", "green", "blue", "nir"]
    assert str(classifier_file) in meta["statistics"]
    reference, report = weights.load_timm(classifier_file)
    assert report["head"] == "classifier loaded"
    imgs = torch.randn(3, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    (got,) = session(path).run(None, {"images": imgs.numpy()})
    with torch.no_grad():
        want = reference.eval()(imgs)
    assert got.shape == (3, 5) and rel_err(torch.from_numpy(got), want) < 1e-4
    # the photographs' RGB repeated over the 4 channels, normalised per channel
    photos = onnx_export.sample_batch(4, SIZE, statistics_for(classifier_file, 4))
    mean, std = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.5, 0.6, 0.7, 0.8])
    pixels = photos * std[None, :, None, None] + mean[None, :, None, None]
    assert photos.shape == (8, 4, SIZE, SIZE) and np.allclose(pixels[:, 3], pixels[:, 0], atol=1e-6)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_fp16_overflow_in_grn_is_refused_and_named(tmp_path, capsys):
    """Block 0's GELU output near 30 at each of the 16 x 16 positions of stage 0: the sum of squares
    (about 230,000) exceeds float16's 65504 while every value and the norm itself fit."""
    model = timm.create_model("convnextv2_atto", num_classes=0)
    with torch.no_grad():
        model.stages[0].blocks[0].mlp.fc1.bias.fill_(30.0)
    source = weights.save_weights(model.state_dict(), tmp_path / "loud.safetensors")
    path, half = tmp_path / "loud.onnx", tmp_path / "loud.fp16.onnx"
    half.write_text("an earlier export's float16 graph")
    code, out, err = export_cli(capsys, source, "--format", "onnx", "--output", path, "--input_size", SIZE)
    assert code == 0, err
    sentence = (f"fp16 overflows: the features are not finite in float16 at stages.0.blocks.0.mlp.grn (its sum of "
                f"squares exceeds 65504) on the sample photographs at {SIZE} px, so only the fp32 graph is written")
    assert sentence in out.splitlines()
    assert not half.exists()
    assert metadata(path)["fp16"] == sentence
    photos = onnx_export.sample_batch(3, SIZE, statistics_for(source, 3))
    (features,) = session(path).run(None, {"images": photos})
    assert np.isfinite(features).all()  # float32 is fine: the overflow is float16's


def test_weights_without_statistics_take_them_from_the_flags(tmp_path, capsys):
    """A 5-channel timm file keeps no statistics and has no defaults: one sentence says to give
    --mean and --std, and with them the graph's metadata holds them."""
    model = timm.create_model("convnextv2_atto", num_classes=0, in_chans=5)
    source = weights.save_weights(model.state_dict(), tmp_path / "bands.safetensors")
    path = tmp_path / "bands.onnx"
    code, out, err = export_cli(capsys, source, "--format", "onnx", "--output", path, "--input_size", SIZE)
    assert code == 2 and not path.exists() and len(err.splitlines()) == 1
    assert f"{source} keeps no statistics of its input, and 5-channel images have no default statistics" in err
    assert "give --mean and --std with 5 values each" in err
    code, out, err = export_cli(capsys, source, "--format", "onnx", "--output", path, "--input_size", SIZE,
                                "--mean", "0.1,0.2,0.3,0.4,0.5", "--std", "1,2,3,4,5")
    assert code == 0, err
    assert "the normalisation in its metadata: given (--mean, --std)" in out
    meta = metadata(path)
    assert json.loads(meta["mean"]) == [0.1, 0.2, 0.3, 0.4, 0.5] and json.loads(meta["std"]) == [1, 2, 3, 4, 5]
    code, out, err = export_cli(capsys, source, "--format", "onnx", "--output", path, "--mean", "0.1,0.2")
    assert code == 2 and "--mean and --std go together" in err
    code, out, err = export_cli(capsys, source, "--format", "timm", "--output", tmp_path / "t.safetensors",
                                "--mean", "0.1,0.2,0.3,0.4,0.5", "--std", "1,2,3,4,5")
    assert code == 2 and "--mean is for --format onnx" in err


def test_statistics_kept_for_other_channels_are_refused_in_one_sentence(classifier_file, tmp_path):
    with pytest.raises(fcmae.config.ConfigError) as caught:
        statistics_for(classifier_file, 3)  # the file keeps 4 channels' statistics
    assert str(caught.value) == (f"the statistics kept with the weights ({classifier_file}) have 4 channels and "
                                 "the weights take 3; they do not belong together, so give --mean and --std with 3 "
                                 "values each")
    assert statistics_for(classifier_file, 3, (0.5,) * 3, (0.2,) * 3)["mean"] == (0.5,) * 3  # the flags win
    model = timm.create_model("convnextv2_atto", num_classes=0)
    flat = weights.save_weights(model.state_dict(), tmp_path / "flat.safetensors",
                                metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.0, 0.2]"})
    with pytest.raises(fcmae.config.ConfigError, match="must be positive in every channel, got 0.2,0,0.2"):
        statistics_for(flat, 3)  # a kept std of 0 would divide by zero


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_without_onnxruntime_one_sentence_says_what_to_install(module, encoder_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import onnxruntime` raises ImportError
    code, out, err = export_cli(capsys, encoder_file, "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert code == 2 and not (tmp_path / "m.onnx").exists()
    assert err == 'python -m fcmae.export: error: --format onnx needs onnx and onnxruntime: pip install "fcmae[onnx]"\n'


@pytest.mark.parametrize("args,message", [
    (["--onnx_output", "logits"], "the weights have no classifier head, so there are no logits to export; use "
                                  "--onnx_output features"),
    (["--input_size", "16"], "--input_size must be at least 32, got 16"),
])
def test_bad_onnx_requests_stop_with_one_sentence(args, message, encoder_file, tmp_path, capsys):
    code, out, err = export_cli(capsys, encoder_file, "--format", "onnx", "--output", tmp_path / "m.onnx", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err and not (tmp_path / "m.onnx").exists()


def test_onnx_flags_belong_to_the_onnx_format(encoder_file, tmp_path, capsys):
    code, _, err = export_cli(capsys, encoder_file, "--format", "timm", "--output", tmp_path / "e.safetensors",
                              "--input_size", "96")
    assert code == 2 and err.endswith("--input_size is for --format onnx; leave it out of --format timm\n")
