"""Weights in and out: exports load where they should and give the same outputs; imports are
exact and strict."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.convnext import checkpoint_filter_fn

import fcmae
from fcmae import weights
from fcmae.weights import WeightsError
from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["convnextv2_atto", "convnextv2_tiny"])  # 1x1-conv MLP in timm / Linear MLP
def model(request, make_model):
    return make_model(request.param, decoder_embed_dim=64, decoder_depth=2).eval()


def latent(model, imgs, mask=None):
    mask = torch.zeros(imgs.shape[0], (imgs.shape[2] // 32) * (imgs.shape[3] // 32)) if mask is None else mask
    with torch.no_grad():
        return model.forward_encoder(imgs, mask)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def test_timm_round_trip(model, tmp_path):
    imgs = torch.randn(2, 3, 96, 64)
    for name, pth in (("enc.safetensors", False), ("enc.pth", True)):
        path, report = weights.export(model, "timm", tmp_path / name)
        assert "mask_token" in report["dropped"] and all(not k.startswith("encoder.") for k in report["dropped"])
        dense = timm.create_model(model.encoder.name, num_classes=0, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        with torch.no_grad():
            assert rel_err(dense.forward_features(imgs), latent(model, imgs)) < 2e-5
        missing, unexpected = dense.load_state_dict(
            load_file(str(path)) if not pth else torch.load(path), strict=False)
        assert not unexpected and set(missing) == {"head.norm.weight", "head.norm.bias"}
        back = weights.load(path)
        assert_same_tensors(back, {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")})


def test_official_round_trip_and_timms_own_converter_agrees(model, tmp_path):
    path, _ = weights.export(model, "official", tmp_path / "fcmae.pt")
    saved = torch.load(path)
    official = saved["model"]
    assert set(saved) == {"model"}
    assert "downsample_layers.0.0.weight" in official and "stages.0.0.dwconv.weight" in official
    assert official["stages.0.0.grn.gamma"].shape == (1, 1, 1, 4 * model.encoder.dims[0])
    assert official["stages.0.0.pwconv1.weight"].dim() == 2  # Linear, whatever timm uses
    assert_same_tensors(weights.load(path), {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")})
    # timm's converter for the official layout is an independent check of the mapping
    dense = timm.create_model(model.encoder.name, num_classes=0).eval()
    missing, unexpected = dense.load_state_dict(checkpoint_filter_fn(official, dense), strict=False)
    assert not unexpected and set(missing) == {"head.norm.weight", "head.norm.bias"}
    imgs = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        assert rel_err(dense.forward_features(imgs), latent(model, imgs)) < 2e-5


def test_hugging_face_export_loads_with_nothing_missing(model, tmp_path):
    import transformers  # the test extra installs it
    folder, report = weights.export(model, "hf", tmp_path / "hf")
    hf, info = transformers.ConvNextV2Model.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.layer_norm_eps == 1e-6
    imgs = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(hf.eval()(imgs).last_hidden_state, latent(model, imgs)) < 2e-5
    # and it reads back
    back = weights.load(folder)
    assert_same_tensors(back, {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")})


def test_a_hugging_face_classifier_from_the_hub_fine_tunes_with_its_head(tmp_path):
    """ConvNextV2ForImageClassification as the Hub's facebook/convnextv2-* models are saved: its
    trunk and head load into timm's model, which then gives the same logits."""
    import transformers
    torch.manual_seed(0)
    # the Hub's configs keep transformers' default layer_norm_eps (1e-12) for the head's LayerNorm,
    # where timm's has 1e-6: a difference far below the tolerance
    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=5)
    hf = transformers.ConvNextV2ForImageClassification(config).eval()
    for p in hf.parameters():  # nothing left at an initial value that timm's would share by chance
        torch.nn.init.normal_(p, std=0.1)
    hf.save_pretrained(str(tmp_path / "hub"))
    classifier = timm.create_model("convnextv2_atto", num_classes=5).eval()
    report = weights.load_classifier(classifier, tmp_path / "hub")
    assert report["head"] == "classifier loaded" and not report["dropped"]
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(classifier(imgs), hf(imgs).logits) < 2e-5
    # into FCMAE: the encoder, with the head left out and said
    report = weights.load_into(fcmae.create_model("convnextv2_atto"), tmp_path / "hub")
    assert {"classifier.weight", "convnextv2.layernorm.weight"} <= set(report["dropped"])


def minkowski_checkpoint(model, epoch=41):
    """A full official FCMAE training checkpoint (main_pretrain.py, MinkowskiEngine layout),
    written out here by hand from a known dense model, the way the official code lays it out."""
    sd = model.state_dict()
    out = {}
    enc = model.encoder
    out["encoder.downsample_layers.0.0.weight"] = sd["encoder.stem.0.weight"]
    out["encoder.downsample_layers.0.0.bias"] = sd["encoder.stem.0.bias"]
    out["encoder.downsample_layers.0.1.weight"] = sd["encoder.stem.1.weight"]
    out["encoder.downsample_layers.0.1.bias"] = sd["encoder.stem.1.bias"]

    def kernel_dw(w):  # (C, 1, 7, 7) -> (49, C): MinkowskiEngine's offset index is col * 7 + row
        c = w.shape[0]
        k = torch.empty(49, c)
        for row in range(7):
            for col in range(7):
                k[col * 7 + row] = w[:, 0, row, col]
        return k

    def kernel_conv(w):  # (C_out, C_in, 2, 2) -> (4, C_in, C_out)
        k = torch.empty(4, w.shape[1], w.shape[0])
        for row in range(2):
            for col in range(2):
                k[col * 2 + row] = w[:, :, row, col].t()
        return k

    for i, depth in enumerate(enc.depths):
        if i > 0:
            p = f"encoder.stages.{i}.downsample."
            out[f"encoder.downsample_layers.{i}.0.ln.weight"] = sd[p + "0.weight"]
            out[f"encoder.downsample_layers.{i}.0.ln.bias"] = sd[p + "0.bias"]
            out[f"encoder.downsample_layers.{i}.1.kernel"] = kernel_conv(sd[p + "1.weight"])
            out[f"encoder.downsample_layers.{i}.1.bias"] = sd[p + "1.bias"].reshape(1, -1)
        for j in range(depth):
            p, q = f"encoder.stages.{i}.blocks.{j}.", f"encoder.stages.{i}.{j}."
            out[q + "dwconv.kernel"] = kernel_dw(sd[p + "conv_dw.weight"])
            out[q + "dwconv.bias"] = sd[p + "conv_dw.bias"].reshape(1, -1)
            out[q + "norm.ln.weight"], out[q + "norm.ln.bias"] = sd[p + "norm.weight"], sd[p + "norm.bias"]
            for ours, theirs in (("mlp.fc1", "pwconv1"), ("mlp.fc2", "pwconv2")):
                out[q + theirs + ".linear.weight"] = sd[p + ours + ".weight"].flatten(1)
                out[q + theirs + ".linear.bias"] = sd[p + ours + ".bias"]
            out[q + "grn.gamma"] = sd[p + "mlp.grn.weight"].reshape(1, -1)
            out[q + "grn.beta"] = sd[p + "mlp.grn.bias"].reshape(1, -1)
    for key in ("proj.weight", "proj.bias", "mask_token", "pred.weight", "pred.bias"):
        out[key] = sd[key]
    for j in range(len(model.decoder)):
        p = f"decoder.{j}."
        out[p + "dwconv.weight"], out[p + "dwconv.bias"] = sd[p + "conv_dw.weight"], sd[p + "conv_dw.bias"]
        out[p + "norm.weight"], out[p + "norm.bias"] = sd[p + "norm.weight"], sd[p + "norm.bias"]
        for ours, theirs in (("mlp.fc1", "pwconv1"), ("mlp.fc2", "pwconv2")):
            out[p + theirs + ".weight"], out[p + theirs + ".bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
        out[p + "grn.gamma"] = sd[p + "mlp.grn.weight"].reshape(1, 1, 1, -1)
        out[p + "grn.beta"] = sd[p + "mlp.grn.bias"].reshape(1, 1, 1, -1)
    return {"model": out, "optimizer": {}, "epoch": epoch, "scaler": {},
            "args": argparse.Namespace(model=model.encoder.name, batch_size=64)}


def test_minkowski_checkpoint_loads_back_exactly(model, tmp_path):
    checkpoint = minkowski_checkpoint(model)
    # the hand-written kernels agree with the official conversion formula (NOTES, section 5)
    w = model.state_dict()["encoder.stages.0.blocks.0.conv_dw.weight"]
    k = checkpoint["model"]["encoder.stages.0.0.dwconv.kernel"]
    assert torch.equal(k.permute(1, 0).reshape(w.shape[0], 1, 7, 7).transpose(3, 2), w)
    w = model.state_dict()["encoder.stages.1.downsample.1.weight"]
    k = checkpoint["model"]["encoder.downsample_layers.1.1.kernel"]
    assert torch.equal(k.permute(2, 1, 0).reshape(w.shape[0], w.shape[1], 2, 2).transpose(3, 2), w)

    path = tmp_path / "checkpoint-41.pth"
    torch.save(checkpoint, path)
    assert_same_tensors(weights.load(path), model.state_dict())  # decoder included
    fresh = fcmae.create_model(model.encoder.name, decoder_embed_dim=64, decoder_depth=2).eval()
    report = weights.load_into(fresh, path)
    assert report["loaded"] == "encoder and decoder" and report["extras"]["epoch"] == 41
    imgs = torch.randn(2, 3, 96, 96)
    mask = model.random_mask(imgs)
    with torch.no_grad():
        assert torch.equal(fresh(imgs, mask)[1], model(imgs, mask)[1])


def test_official_grn_vectors_load_in_any_of_their_shapes(model, tmp_path):
    """The official code keeps GRN gamma/beta as (1, 1, 1, C) dense and (1, C) sparse, and its
    fine-tuning remap expects (1, C); every form loads to the same weights."""
    path, _ = weights.export(model, "official", tmp_path / "w.pt")
    official = torch.load(path)["model"]
    expected = weights.load(path)
    for shape in ((1, -1), (-1,)):
        reshaped = {k: v.reshape(shape) if ".grn." in k else v for k, v in official.items()}
        assert_same_tensors(weights.load({"model": reshaped}), expected)


def test_strict_errors_list_the_problems(model, tmp_path):
    path, _ = weights.export(model, "official", tmp_path / "w.pt")
    official = torch.load(path)["model"]
    broken = dict(official)
    broken["stages.0.0.dwconv.weight"] = torch.zeros(3, 1, 7, 7)
    del broken["stages.1.0.pwconv2.bias"]
    broken["stages.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        weights.load({"model": broken})
    message = str(err.value)
    assert "missing 1: stages.1.0.pwconv2.bias" in message
    assert "unexpected 1: stages.0.0.extra.weight" in message
    assert "wrong shape: stages.0.0.dwconv.weight (3, 1, 7, 7)" in message
    with pytest.raises(WeightsError, match="no ConvNeXt V2 layout"):
        weights.load({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable weights file: it is a text file"):
        weights.load(tmp_path / "junk.pt")
    (tmp_path / "photo.pt").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    with pytest.raises(WeightsError, match="it is a JPEG image"):
        weights.load(tmp_path / "photo.pt")
    other = fcmae.create_model("convnextv2_femto")
    with pytest.raises(WeightsError, match=f"the weights are {model.encoder.name}"):
        weights.load_into(other, path)


def test_classifier_heads_are_dropped_and_reported(tmp_path):
    classifier = timm.create_model("convnextv2_atto", num_classes=10)
    path = tmp_path / "classifier.pth"
    torch.save(classifier.state_dict(), path)
    model = fcmae.create_model("convnextv2_atto")
    report = weights.load_into(model, path)
    assert report["loaded"] == "encoder"
    assert {"head.fc.weight", "head.fc.bias", "head.norm.weight", "head.norm.bias"} == set(report["dropped"])
    assert "mask_token" in report["not_loaded"] and "pred.weight" in report["not_loaded"]
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(latent(model, imgs), classifier.eval().forward_features(imgs)) < 2e-5


class Prefixed(weights.formats.Timm):
    """A made-up format for the test: timm's keys under 'backbone.', the head under 'cls.'."""
    name = "prefixed"
    stem_key = "backbone.stem.0.weight"
    block_pattern = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight"
    classifier_pattern = r"cls\..*"
    head_keys = {"cls.weight": "head.fc.weight", "cls.bias": "head.fc.bias"}

    def rows(self, arch, shapes=None):
        return [(ours, f"backbone.{theirs}", kind) for ours, theirs, kind in super().rows(arch, shapes)]

    def head(self, state):
        return weights.WeightFormat.head(self, state)


def test_a_format_added_to_formats_alone_is_read_exported_and_gives_heads(monkeypatch, tmp_path):
    """The contributor's note: a new format is its class and its FORMATS entry, nothing else."""
    monkeypatch.setattr(weights.formats, "FORMATS", (*weights.formats.FORMATS, Prefixed()))
    model = fcmae.create_model("convnextv2_atto", decoder_depth=1, decoder_embed_dim=32)
    path, report = weights.export(model, "prefixed", tmp_path / "prefixed.safetensors")
    written = load_file(path)
    assert all(k.startswith("backbone.") for k in written) and "backbone.stem.0.weight" in written
    assert "mask_token" in report["dropped"]
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert_same_tensors(weights.load(path), encoder)
    # its classifier head goes to timm's head on fine-tuning, and strictness holds
    classifier = timm.create_model("convnextv2_atto", num_classes=4)
    state = {**written, "cls.weight": torch.randn(4, 320), "cls.bias": torch.randn(4)}
    report = weights.load_classifier(classifier, state)
    assert report["head"] == "classifier loaded" and torch.equal(classifier.head.fc.bias, state["cls.bias"])
    del state["backbone.stem.0.bias"]
    with pytest.raises(WeightsError, match="prefixed weights of convnextv2_atto do not match; missing 1: "
                                           "backbone.stem.0.bias"):
        weights.load(state)
    with pytest.raises(WeightsError, match="unknown export format 'minkowski'; choose one of: timm, official, hf, "
                                           "prefixed"):
        weights.export(model, "minkowski", tmp_path / "x")


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_export_from_an_interrupted_pretraining_checkpoint_and_init_from_it(tmp_path):
    from test_pretrain import SMALL, make_images

    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "run"
    result = run_cli("pretrain.py", *SMALL, "--data_path", data, "--output_dir", out, "--max_steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = next((out / "checkpoints").glob("checkpoint-*"))
    result = run_cli("-m", "fcmae.export", checkpoint, "--format", "official", "--output", tmp_path / "enc.pt")
    assert result.returncode == 0, result.stderr
    assert "wrote the official encoder" in result.stdout and "left out the decoder" in result.stdout
    trained = load_file(str(checkpoint / "model.safetensors"))
    exported = weights.load(tmp_path / "enc.pt")
    assert_same_tensors(exported, {k: v for k, v in trained.items() if k.startswith("encoder.")})

    # --init starts a new run from those weights (lr 0: the first checkpoint still holds them)
    result = run_cli("pretrain.py", *SMALL, "--data_path", data, "--output_dir", tmp_path / "again",
                     "--max_steps", "1", "--init", tmp_path / "enc.pt", "--lr", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded the encoder from" in result.stdout
    again = load_file(str(next((tmp_path / "again" / "checkpoints").glob("checkpoint-*")) / "model.safetensors"))
    for key in exported:
        assert torch.equal(again[key], exported[key]), key

    # a bad file gives one sentence
    result = run_cli("-m", "fcmae.export", tmp_path / "missing.pt", "--format", "timm", "--output", tmp_path / "x")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_resume_from_an_official_training_checkpoint(tmp_path, make_model):
    from test_pretrain import SMALL, make_images

    model = make_model("convnextv2_atto", decoder_embed_dim=64)
    path = tmp_path / "checkpoint-0.pth"
    torch.save(minkowski_checkpoint(model, epoch=0), path)
    data = make_images(tmp_path / "data", count=8)
    result = run_cli("pretrain.py", *SMALL, "--data_path", data, "--output_dir", tmp_path / "run", "--resume", path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded the encoder and decoder" in result.stdout
    assert "continuing from" in result.stdout and "at epoch 1" in result.stdout
    assert "done after 4 steps" in result.stdout  # 8 images / batch 4: 2 steps per epoch; epoch 1 of 2 left
