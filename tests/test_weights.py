"""Weights in and out: exports load where they should and give the same outputs; imports are
exact and strict."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.models.convnext import checkpoint_filter_fn

import fcmae
from fcmae import weights
from fcmae.cli import export_weights
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


def read_card(folder):
    """(the YAML metadata block, the whole text) of a Hugging Face export's README.md."""
    text = (Path(folder) / "README.md").read_text()
    assert text.startswith("---\n")
    front = text.split("---\n", 2)[1]
    return yaml.safe_load(front), text


def export_cli(capsys, *args):
    """python -m fcmae.export ARGS in this process: (exit code, stdout, stderr)."""
    try:
        export_weights.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def fine_tuning_run(root, finetune_from):
    """A fine-tuning run's folder as finetune.py leaves it (written here: the record's files as the
    engine writes them, and the best weights), started from `finetune_from`."""
    run = root / "atto_ft"
    (run / "checkpoints" / "checkpoint-00000006").mkdir(parents=True)
    args = {"model": "convnextv2_atto", "data_path": str(root / "data"), "data_set": "image_folder", "epochs": 2,
            "batch_size": 4, "update_freq": 2, "blr": 2e-4, "lr": None, "warmup_epochs": 0, "weight_decay": 0.3,
            "input_size": 64, "in_chans": 3, "nb_classes": 3, "linear_probe": False, "finetune": str(finetune_from),
            "resume": "", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "channel_names": None}
    (run / "args.json").write_text(json.dumps(args, indent=2))
    state = {"format": 2, "train_state": {"epoch": 2, "step_in_epoch": 0, "global_step": 6, "epoch_sums": {},
                                          "script": {"best": {"acc1": 77.7778, "epoch": 0}}},
             "run": {"eff_batch": 8, "steps_per_epoch": 3, "batch_size": 4, "update_freq": 2, "processes": 1},
             "scaler": None}
    (run / "checkpoints" / "checkpoint-00000006" / "state.json").write_text(json.dumps(state))
    metrics = {"epoch": 1, "data": str(root / "data" / "val"), "test_loss": 1.0123, "test_acc1": 66.6667,
               "test_acc5": 100.0, "test_images": 9, "max_accuracy": 77.7778, "best": {"acc1": 77.7778, "epoch": 0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    classifier = timm.create_model("convnextv2_atto", num_classes=3)
    weights.save_weights(classifier.state_dict(), run / "model_best.safetensors",
                         metadata={"model": "convnextv2_atto", "epoch": "0", "acc1": "77.7778"})
    return run


@pytest.mark.parametrize("started_from,licence", [("own", "MIT"), ("official_name", None)])
def test_the_model_card_of_a_fine_tuned_model_tells_its_run_and_results(started_from, licence, tmp_path, capsys):
    if started_from == "own":  # this project's encoder, in its own layout: nothing to warn of
        start = weights.export(fcmae.create_model("convnextv2_atto"), "timm", tmp_path / "encoder.safetensors")[0]
    else:  # no longer there, but named as the official releases are
        start = tmp_path / "gone" / "convnextv2_atto_1k_224_fcmae.pt"
    run = fine_tuning_run(tmp_path, start)
    code, out, err = export_cli(capsys, run / "model_best.safetensors", "--format", "hf", "--output",
                                tmp_path / "atto-ft", *(["--license", licence] if licence else []))
    assert code == 0, err
    meta, card = read_card(tmp_path / "atto-ft")
    assert meta["license"] == (licence.lower() if licence else "other")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert {"convnextv2", "fcmae", "image-feature-extraction"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": str(tmp_path / "data" / "val"), "type": "imagefolder"}
    assert [(m["name"], m["value"]) for m in result["metrics"]] == [("top-1 accuracy", 66.6667),
                                                                      ("top-5 accuracy", 100.0)]
    for line in ("- Training: fine-tuning with fcmae, run folder `atto_ft`.",
                 "effective batch 8 (4 per process x 2 accumulation x 1 processes), blr 0.0002, lr 6.25e-06",
                 f"- Started from: `--finetune {start}`.",
                 "- Steps: global step 6, epoch 2 in progress with 0 of its steps done (state.json of "
                 "checkpoint-00000006)",
                 f"The run's latest evaluation (metrics.json, epoch 1, on `{tmp_path / 'data' / 'val'}`)",
                 "- top-1 accuracy: 66.67%", "- top-5 accuracy: 100.00%", "- loss: 1.0123",
                 "- best top-1 accuracy of the run: 77.78% at epoch 0",
                 "- Normalisation: mean (0.5, 0.4, 0.3), std (0.2, 0.2, 0.2)",
                 'ConvNextV2Model.from_pretrained("atto-ft")', 'upload_folder(folder_path="atto-ft"'):
        assert line in card, line
    assert ("the licence was not stated" in card) == (licence is None)
    if started_from == "own":
        assert "Licence warning" not in card and "warning" not in out
    else:
        why = f"their run started from --finetune {start}, and convnextv2_atto_1k_224_fcmae.pt is named as the"
        assert "warning: these weights may descend from the official ConvNeXt V2 checkpoints" in out and why in out
        assert card.count("CC-BY-NC 4.0") == 2  # at the top and in the licence section


def test_official_weights_get_the_licence_warning_and_no_record(make_model, tmp_path, capsys):
    import transformers
    model = make_model("convnextv2_atto", decoder_embed_dim=64, decoder_depth=2).eval()
    path = tmp_path / "checkpoint-41.pth"
    torch.save(minkowski_checkpoint(model), path)
    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=5)
    transformers.ConvNextV2ForImageClassification(config).save_pretrained(str(tmp_path / "hub"))
    official, _ = weights.export(model, "official", tmp_path / "mine.pt")
    mine, _ = weights.export(model, "timm", tmp_path / "mine.safetensors")
    for source, why in ((path, "they are in the official MinkowskiEngine layout"),
                        (tmp_path / "hub", "they are in the layout of the Hub's facebook/convnextv2-* classifiers"),
                        (official, "they are in the official dense layout"), (mine, None)):
        code, out, err = export_cli(capsys, source, "--format", "hf", "--output", tmp_path / "card")
        assert code == 0, err
        meta, card = read_card(tmp_path / "card")
        assert meta["license"] == "other" and "model-index" not in meta
        assert "- Data, recipe and steps: not recorded" in card and "Evaluation: not recorded." in card
        assert (why is not None) == ("warning: " in out) == ("Licence warning" in card), source
        if why:
            assert why in out and why in card


@pytest.mark.parametrize("args,message", [
    (["--format", "hf", "--license", "not a licence!"], "--license 'not a licence!' is not a licence id; give an "
                                                        "SPDX-like id such as apache-2.0, mit or cc-by-nc-4.0"),
    (["--format", "timm", "--license", "mit"], "--license is for --format hf; leave it out of --format timm"),
])
def test_bad_licences_stop_with_one_sentence(args, message, tmp_path, capsys):
    source, _ = weights.export(fcmae.create_model("convnextv2_atto"), "timm", tmp_path / "e.safetensors")
    code, out, err = export_cli(capsys, source, "--output", tmp_path / "card", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "card").exists()


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

    # the Hugging Face folder's model card tells the checkpoint's own record
    _, report = weights.export(checkpoint, "hf", tmp_path / "hf")
    meta, card = read_card(tmp_path / "hf")
    assert meta["license"] == "other" and "model-index" not in meta and report["warning"] is None
    for line in (f"- Data: `{data}`.", "- Training: FCMAE pretraining with fcmae, run folder `run`.",
                 "effective batch 4 (4 per process x 1 accumulation x 1 processes), blr 0.01, lr 0.000156",
                 "mask ratio 0.6, input size 64 px, max steps 1",
                 "- Steps: global step 1, epoch 0 in progress with 1 of its steps done (state.json of "
                 f"{checkpoint.name})",
                 "Evaluation: not recorded (the run has no metrics.json).",
                 "- Architecture: `convnextv2_atto`, depths 2, 2, 6, 2, widths 40, 80, 160, 320; 3.39M parameters",
                 "- Input: 3 channels; trained at 64 px", "the licence was not stated"):
        assert line in card, line
    assert "Licence warning" not in card

    # --init starts a new run from those weights (lr 0: the first checkpoint still holds them)
    result = run_cli("pretrain.py", *SMALL, "--data_path", data, "--output_dir", tmp_path / "again",
                     "--max_steps", "1", "--init", tmp_path / "enc.pt", "--lr", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded the encoder from" in result.stdout
    again_checkpoint = next((tmp_path / "again" / "checkpoints").glob("checkpoint-*"))
    again = load_file(str(again_checkpoint / "model.safetensors"))
    for key in exported:
        assert torch.equal(again[key], exported[key]), key
    # a run started from weights in the official layout: the card and the report warn of CC-BY-NC
    _, report = weights.export(again_checkpoint, "hf", tmp_path / "hf_again")
    why = f"their run started from --init {tmp_path / 'enc.pt'}, and they are in the official dense layout"
    assert why in report["warning"] and "CC-BY-NC 4.0" in report["warning"]
    assert f"> **Licence warning:** {report['warning']}." in read_card(tmp_path / "hf_again")[1]
    (tmp_path / "enc.pt").unlink()  # gone, and not named as the official releases are: nothing to go by
    assert weights.export(again_checkpoint, "hf", tmp_path / "hf_again")[1]["warning"] is None

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
