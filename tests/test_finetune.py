"""finetune.py end to end on tiny generated class folders, layer-wise lr decay, weight import into
the dense classifier, linear probing, exact evaluation and exact resume."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

import fcmae
from fcmae import layouts, weights
from fcmae.optim import param_groups
from fcmae.data import share
from test_pretrain import env, make_images, run_script, usage_error
from test_weights import minkowski_checkpoint

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("finetune", ROOT / "finetune.py")
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)

CLASSES = ("cat", "dog", "owl")
# small-data additions to the TRAINING.md commands: tiny images, few of them, two epochs on CPU
SMALL = ["--input_size", "64", "--batch_size", "4", "--epochs", "2", "--nb_classes", "3", "--num_workers", "0",
         "--log_with", "none", "--device", "cpu"]


def training_md_command(size):
    """The single-machine fine-tuning command of the official TRAINING.md for `size`, as written
    (after its launcher), with its placeholder paths."""
    recipes = {
        "atto": "--blr 2e-4 --epochs 600 --warmup_epochs 0 --layer_decay_type 'single' --layer_decay 0.9 "
                "--weight_decay 0.3 --drop_path 0.1 --reprob 0.25 --mixup 0. --cutmix 0. --smoothing 0.2",
        "tiny": "--blr 8e-4 --epochs 300 --warmup_epochs 40 --layer_decay_type 'single' --layer_decay 0.9 "
                "--weight_decay 0.05 --drop_path 0.2 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1",
        "base": "--blr 6.25e-4 --epochs 100 --warmup_epochs 20 --layer_decay_type 'group' --layer_decay 0.6 "
                "--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1",
    }
    command = (f"--model convnextv2_{size} --batch_size 32 --update_freq 4 {recipes[size]} "
               "--model_ema True --model_ema_eval True --use_amp True --finetune /path/to/checkpoint "
               "--data_path /path/to/imagenet-1k --output_dir /path/to/save_results")
    return [word.strip("'") for word in command.split()]  # what the shell hands over


def with_paths(command, finetune_from, data, out):
    swap = {"/path/to/checkpoint": str(finetune_from), "/path/to/imagenet-1k": str(data),
            "/path/to/save_results": str(out)}
    return [swap.get(word, word) for word in command]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_images(root / "train", count=24, size=72, classes=CLASSES)
    make_images(root / "val", count=9, size=72, classes=CLASSES)
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A 'pretrained' atto encoder as pretrain.py writes it (timm layout, no head)."""
    torch.manual_seed(0)
    model = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64)
    path, _ = weights.export(model, "timm", tmp_path_factory.mktemp("enc") / "encoder.safetensors")
    return path


def run_finetune(*args, **kwargs):
    return run_script("finetune.py", *args, **kwargs)


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def last_checkpoint(out):
    return sorted((Path(out) / "checkpoints").glob("checkpoint-*"))[-1]


# ----- layer-wise lr decay ------------------------------------------------------------------------

def scales_by_name(groups):
    return {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["param_names"]}


def test_single_layer_decay_matches_hand_computed_ids():
    with torch.device("meta"):
        model = timm.create_model("convnextv2_atto", num_classes=10)  # depths 2, 2, 6, 2: 12 layers
    groups = param_groups(model, 0.3, layer_decay=0.9, layer_decay_type="single")
    got = scales_by_name(groups)
    d = 0.9
    expected = {  # scale = 0.9 ** (12 + 1 - id)
        "stem.0.weight": (d ** 12, 0.3),                       # id 1
        "stem.1.weight": (d ** 12, 0.0),
        "stages.0.blocks.0.conv_dw.weight": (d ** 12, 0.3),    # id 1
        "stages.0.blocks.1.mlp.fc1.weight": (d ** 11, 0.3),    # id 2
        "stages.1.downsample.1.weight": (d ** 10, 0.3),        # id 3, with stage 1's first block
        "stages.1.downsample.0.bias": (d ** 10, 0.0),
        "stages.1.blocks.1.mlp.grn.weight": (d ** 9, 0.0),     # id 4, GRN never decayed
        "stages.2.blocks.0.conv_dw.bias": (d ** 8, 0.0),       # id 5
        "stages.2.blocks.5.mlp.fc2.weight": (d ** 3, 0.3),     # id 10
        "stages.3.downsample.1.weight": (d ** 2, 0.3),         # id 11
        "stages.3.blocks.1.norm.weight": (d ** 1, 0.0),        # id 12
        "head.norm.weight": (1.0, 0.0),                        # id 13
        "head.fc.weight": (1.0, 0.3),
        "head.fc.bias": (1.0, 0.0),
    }
    for name, (scale, wd) in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-12), name
        assert got[name][1] == wd, name
    assert sorted(got) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert len(groups) == 26  # ids 1..13, each with decayed and not-decayed tensors
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        assert all(p is dict(model.named_parameters())[n] for p, n in zip(group["params"], group["param_names"]))


def test_group_layer_decay_matches_hand_computed_ids():
    with torch.device("meta"):
        model = timm.create_model("convnextv2_base", num_classes=10)  # depths 3, 3, 27, 3: 12 groups
    got = scales_by_name(param_groups(model, 0.05, layer_decay=0.6, layer_decay_type="group"))
    d = 0.6
    expected = {  # scale = 0.6 ** (12 + 1 - id)
        "stem.0.weight": d ** 13,                           # id 0
        "stages.0.blocks.2.mlp.fc1.weight": d ** 12,        # id 1
        "stages.1.downsample.1.weight": d ** 11,            # id 2
        "stages.1.blocks.0.conv_dw.weight": d ** 11,        # id 2
        "stages.2.downsample.1.weight": d ** 10,            # id 3
        "stages.2.blocks.2.mlp.fc2.weight": d ** 10,        # id 3 + 2 // 3
        "stages.2.blocks.3.mlp.fc2.weight": d ** 9,         # id 4
        "stages.2.blocks.26.conv_dw.weight": d ** 2,        # id 3 + 26 // 3 = 11
        "stages.3.downsample.1.weight": d ** 1,             # id 12
        "stages.3.blocks.2.mlp.fc1.weight": d ** 1,         # id 12
        "head.fc.weight": 1.0,                              # id 13
    }
    for name, scale in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-12), name


def test_no_layer_decay_gives_two_groups_and_timm_builds_the_optimizer():
    assert fcmae.optim.param_groups is param_groups  # reachable as fcmae.optim after `import fcmae`
    model = timm.create_model("convnextv2_atto", num_classes=5)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and all(g["lr_scale"] == 1.0 for g in groups)
    optimizer = create_optimizer_v2(param_groups(model, 0.05, 0.9, "single"), opt="adamw", lr=1e-3)
    fcmae.optim.set_lr(optimizer, 1e-3)
    head = next(g for g in optimizer.param_groups if "head.fc.weight" in g["param_names"])
    stem = next(g for g in optimizer.param_groups if "stem.0.weight" in g["param_names"])
    assert head["lr"] == pytest.approx(1e-3) and stem["lr"] == pytest.approx(1e-3 * 0.9 ** 12)
    with pytest.raises(ValueError, match="single' or 'group'"):
        param_groups(model, 0.05, 0.9, "per_block")


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_the_optimizer_is_fused_where_timm_allows_and_steps_as_the_unfused(opt, monkeypatch):
    args = finetune.get_args_parser().parse_args(["--opt", opt, "--layer_decay", "0.8", "--weight_decay", "0.05"])
    torch.manual_seed(0)
    models = [timm.create_model("convnextv2_atto", num_classes=5) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    fused = finetune.build_optimizer(args, models[0], lr=1e-2)
    monkeypatch.setattr(finetune, "fused_option", lambda opt: {})
    plain = finetune.build_optimizer(args, models[1], lr=1e-2)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    assert [g["lr_scale"] for g in fused.param_groups] == [g["lr_scale"] for g in plain.param_groups]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain)):
            fcmae.optim.set_lr(optimizer, 1e-2)
            optimizer.zero_grad()
            model(images).square().mean().backward()
            optimizer.step()
    # the same update to rounding, measured against how far each tensor moved: AdamW's first steps
    # are near-sign steps, so a rounding in a tiny gradient can show as a whole step in one element
    # (up to 2e-5 absolute, by the initial weights), yet at most 8.3e-6 of the tensor's movement
    # (AdamW, 6 initialisations)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert (a - b).norm() <= 1e-4 * (a - start[name]).norm(), name
    assert max((p - start[n]).abs().max().item() for n, p in models[0].named_parameters()) > 1e-3
    assert finetune.fused_option("lamb") == {}  # timm's own optimisers have no fused kernel: built as they are


# ----- weights into the classifier -----------------------------------------------------------------

def trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


@pytest.fixture
def source():
    torch.manual_seed(1)
    return fcmae.create_model("convnextv2_atto", decoder_embed_dim=64, decoder_depth=1)


def test_every_weight_format_loads_the_same_trunk(source, tmp_path):
    expected = weights.encoder_state({k: v for k, v in source.state_dict().items() if k.startswith("encoder.")})
    files = {
        "timm": weights.export(source, "timm", tmp_path / "enc.safetensors")[0],
        "official": weights.export(source, "official", tmp_path / "enc_fcmae.pt")[0],
        "hf": weights.export(source, "hf", tmp_path / "hf")[0],
        "ours (with decoder)": tmp_path / "fcmae.pth",
        "official sparse training checkpoint": tmp_path / "checkpoint-41.pth",
    }
    torch.save({"model": source.state_dict()}, files["ours (with decoder)"])
    torch.save(minkowski_checkpoint(source), files["official sparse training checkpoint"])
    for what, path in files.items():
        torch.manual_seed(2)
        model = timm.create_model("convnextv2_atto", num_classes=3)
        report = weights.load_classifier(model, path)
        got = model.state_dict()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (what, key)
        assert report["head"] == "classifier re-initialised (the file has none)", what
        assert got["head.fc.bias"].abs().max() == 0 and 0 < got["head.fc.weight"].std() < 1e-4, what
        if what.startswith(("ours", "official sparse")):
            assert "mask_token" in report["dropped"] and "proj.weight" in report["dropped"], what


def test_a_fine_tuned_head_loads_when_it_fits_and_is_replaced_when_not(tmp_path):
    torch.manual_seed(3)
    tuned = timm.create_model("convnextv2_atto", num_classes=3)
    torch.nn.init.normal_(tuned.head.norm.weight)
    for layout, path in (("timm", tmp_path / "tuned.pth"), ("official", tmp_path / "official_ft.pth")):
        state = tuned.state_dict()
        if layout == "official":  # the dense official layout with its head
            official = {theirs: layouts.to_theirs(state[ours.removeprefix("encoder.")], kind)
                        for ours, theirs, kind in weights.weight_format("official").rows(
                            weights.Architecture("convnextv2_atto", 3))}
            official.update({"norm.weight": state["head.norm.weight"], "norm.bias": state["head.norm.bias"],
                             "head.weight": state["head.fc.weight"], "head.bias": state["head.fc.bias"]})
            state = {"model": official}
        torch.save(state, path)
        same = timm.create_model("convnextv2_atto", num_classes=3)
        assert weights.load_classifier(same, path)["head"] == "classifier loaded"
        for key, value in tuned.state_dict().items():
            assert torch.equal(same.state_dict()[key], value), (layout, key)
        other = timm.create_model("convnextv2_atto", num_classes=5)
        report = weights.load_classifier(other, path)
        assert report["head"] == "classifier re-initialised (the file's has 3 classes, the model 5)"
        assert torch.equal(other.head.norm.weight, tuned.head.norm.weight)  # the head's norm still loads


def test_weights_of_another_size_are_refused(encoder_file):
    model = timm.create_model("convnextv2_femto", num_classes=3)
    with pytest.raises(weights.WeightsError, match="the weights are convnextv2_atto .* pass --model convnextv2_atto"):
        weights.load_classifier(model, encoder_file)


# ----- finetune.py end to end ----------------------------------------------------------------------

def test_training_md_atto_command_fine_tunes_and_evaluates(data, encoder_file, tmp_path):
    out = tmp_path / "atto"
    command = with_paths(training_md_command("atto"), encoder_file, data, out)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run_finetune(*command, *SMALL, "--update_freq", "2", launcher=launcher)
    assert "loaded the encoder from" in result.stdout and "classifier re-initialised" in result.stdout
    assert "--use_amp: no CUDA device, so training runs in float32" in result.stdout
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    for line in lines:
        assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "test_acc1_ema",
                "max_accuracy", "n_parameters"} <= line.keys()
        assert line["test_images"] == 9 and line["test_acc5"] == 100.0  # 3 classes: top-5 covers them all
    best = max(line["test_acc1"] for line in lines)
    assert lines[-1]["max_accuracy"] == best
    assert f"best top-1 {best:.2f}%" in result.stdout
    assert (out / "model_best.safetensors").is_file() and (out / "model_best_ema.safetensors").is_file()
    assert last_checkpoint(out).name == "checkpoint-00000006"  # 24 images / (4 x 2) = 3 steps an epoch
    metrics = json.loads((out / "metrics.json").read_text())  # the last evaluation, for programs
    assert metrics["epoch"] == 1 and metrics["test_acc1"] == lines[-1]["test_acc1"]
    assert metrics["best"]["acc1"] == best and metrics["data"] == str(data / "val")

    # evaluation only: the best weights give the logged accuracy again, exactly
    result = run_finetune("--model", "convnextv2_atto", "--eval", "True", "--resume", out / "model_best.safetensors",
                          "--data_path", data, *SMALL, "--output_dir", "")
    best_line = next(line for line in lines if line["test_acc1"] == best)
    assert f"top-1 {best:.2f}%" in result.stdout and f"loss {best_line['test_loss']:.4f}" in result.stdout
    # the best EMA weights, and the newest checkpoint of the run (found by --auto_resume)
    result = run_finetune("--model", "convnextv2_atto", "--eval", "True", "--data_path", data, *SMALL,
                          "--resume", out / "model_best_ema.safetensors", "--output_dir", "")
    assert f"top-1 {max(line['test_acc1_ema'] for line in lines):.2f}%" in result.stdout
    result = run_finetune("--model", "convnextv2_atto", "--eval", "true", "--data_path", data, *SMALL,
                          "--output_dir", out)
    assert f"top-1 {lines[-1]['test_acc1']:.2f}%" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["acc1"] == lines[-1]["test_acc1"] and metrics["images"] == 9
    assert metrics["weights"] == str(last_checkpoint(out)) and metrics["loss"] == lines[-1]["test_loss"]


def tiny_encoder(tmp_path):
    model = fcmae.create_model("convnextv2_tiny", decoder_embed_dim=64)
    return weights.export(model, "official", tmp_path / "tiny_fcmae.pt")[0]


def test_training_md_tiny_command_with_mixup_cutmix_and_image_folder(data, tmp_path):
    out = tmp_path / "tiny"
    command = with_paths(training_md_command("tiny"), tiny_encoder(tmp_path), data / "train", out)
    result = run_finetune(*command, *SMALL, "--data_set", "image_folder", "--eval_data_path", data / "val")
    assert "fine-tuning convnextv2_tiny" in result.stdout and "effective batch 16 = 4 x 4" in result.stdout
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]
    assert last_checkpoint(out).name == "checkpoint-00000002"  # 24 images / 16: one step an epoch


@pytest.mark.slow
def test_training_md_base_command_group_decay(data, tmp_path):
    model = fcmae.create_model("convnextv2_base", decoder_embed_dim=64)
    encoder = weights.export(model, "timm", tmp_path / "base.safetensors")[0]
    out = tmp_path / "base"
    run_finetune(*with_paths(training_md_command("base"), encoder, data, out), *SMALL, "--max_steps", "2",
                 "--input_size", "32")
    assert last_checkpoint(out).name == "checkpoint-00000002"


def test_linear_probe_trains_only_the_head(data, encoder_file, tmp_path):
    out = tmp_path / "probe"
    result = run_finetune("--model", "convnextv2_atto", "--linear_probe", "true", "--finetune", encoder_file,
                          "--data_path", data, *SMALL, "--blr", "0.1", "--warmup_epochs", "0",
                          "--output_dir", out)
    assert "linear probe of convnextv2_atto (0.00M trainable parameters" in result.stdout
    lines = log_lines(out)
    assert lines[0]["n_parameters"] == 320 * 3 + 3
    state = load_file(str(last_checkpoint(out) / "model.safetensors"))
    assert "head.fc.0.running_mean" in state and "head.fc.0.weight" not in state  # BatchNorm without affine
    assert state["head.fc.0.num_batches_tracked"] == 12
    pretrained = load_file(str(encoder_file))
    for key, value in pretrained.items():
        assert torch.equal(state[key], value), key  # the encoder stays frozen
    assert torch.equal(state["head.norm.weight"], torch.ones(320))
    # the probe evaluates with --eval
    result = run_finetune("--model", "convnextv2_atto", "--linear_probe", "true", "--eval", "true", "--resume",
                          out / "model_best.safetensors", "--data_path", data, *SMALL, "--output_dir", "")
    assert f"top-1 {max(line['test_acc1'] for line in lines):.2f}%" in result.stdout


def test_resume_continues_exactly(data, encoder_file, tmp_path):
    # every random source at once: RandAugment, random erasing, mixup/cutmix, drop path, EMA
    args = ["--model", "convnextv2_atto", "--finetune", encoder_file, "--data_path", data, *SMALL,
            "--epochs", "3", "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.2", "--reprob", "0.5",
            "--model_ema", "true", "--model_ema_decay", "0.9", "--model_ema_eval", "true", "--blr", "1e-2",
            "--layer_decay", "0.8", "--warmup_epochs", "1"]
    run_finetune(*args, "--output_dir", tmp_path / "straight")
    run_finetune(*args, "--output_dir", tmp_path / "stopped", "--max_steps", "8")  # stops inside epoch 2
    # the best accuracies of epochs 0 and 1 are saved with the checkpoint, as fine-tuning's own state
    saved = json.loads((last_checkpoint(tmp_path / "stopped") / "state.json").read_text())["train_state"]
    assert saved["script"]["best"]["epoch"] in (0, 1) and "acc1_ema" in saved["script"]["best"]
    result = run_finetune(*args, "--output_dir", tmp_path / "stopped")
    assert "resumed from" in result.stdout and "step 8" in result.stdout
    straight = last_checkpoint(tmp_path / "straight")
    resumed = last_checkpoint(tmp_path / "stopped")
    for name in ("model.safetensors",):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "straight" / "log.txt").read_text() == (tmp_path / "stopped" / "log.txt").read_text()
    a = load_file(str(tmp_path / "straight" / "model_best_ema.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model_best_ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_evaluate_exactly_and_train_like_one(data, encoder_file, tmp_path):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "29519"]
    args = ["--model", "convnextv2_atto", "--finetune", encoder_file, "--data_path", data, *SMALL,
            "--aa", "none", "--reprob", "0", "--smoothing", "0", "--blr", "1e-2", "--warmup_epochs", "0"]
    # 2 processes x 2 micro-steps of 1 (the shipped configs' no_sync path) against 1 process x 4
    two = run_finetune(*args, "--batch_size", "1", "--update_freq", "2", "--output_dir", tmp_path / "two",
                       launcher=accelerate)
    assert "parameters identical on all 2 processes" in two.stdout
    one = run_finetune(*args, "--batch_size", "1", "--update_freq", "4", "--output_dir", tmp_path / "one")
    a, b = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    for x, y in zip(a, b):  # 9 validation images over 2 processes: 4 + 5, none counted twice
        assert y["test_images"] == 9
        assert x["test_acc1"] == pytest.approx(y["test_acc1"]) and x["test_loss"] == pytest.approx(y["test_loss"],
                                                                                                      rel=1e-4)
    assert "Traceback" not in two.stderr + one.stderr
    alone, together = (load_file(str(last_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("one", "two"))
    for key in alone:
        torch.testing.assert_close(together[key], alone[key], rtol=1e-4, atol=1e-6, msg=key)


def test_eval_transform_as_the_official():
    from PIL import Image
    from fcmae.data import eval_transform
    img = Image.new("RGB", (400, 300))
    for size, crop_pct, resized in ((224, None, 256), (224, 0.95, 235), (64, 1.0, 64), (384, None, None)):
        steps = eval_transform(size, (0.5,) * 3, (0.5,) * 3, crop_pct).transforms
        assert eval_transform(size, (0.5,) * 3, (0.5,) * 3, crop_pct)(img).shape == (3, size, size)
        if resized is None:  # 384 and up: a plain resize of the whole image, no crop
            assert steps[0].size == (384, 384)
        else:
            assert steps[0].size == resized and steps[1].size == (size, size)


def test_shards_cover_every_index_once():
    for size in (0, 1, 7, 9, 10, 50001):
        for world in (1, 2, 3, 8):
            parts = [list(share(size, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(size))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ----- bad input -----------------------------------------------------------------------------------

def fail(args, capsys):
    return usage_error(finetune, args, capsys)


def test_missing_val_folder(tmp_path, capsys):
    make_images(tmp_path / "only_train" / "train", count=6, classes=CLASSES)
    err = fail(["--data_path", tmp_path / "only_train", "--nb_classes", "3"], capsys)
    assert "has no val/ folder" in err and "--disable_eval true" in err


def test_class_count_mismatch(data, capsys):
    err = fail(["--data_path", data], capsys)  # IMNET default: 1000 classes
    assert re.search(r"has 3 classes but --nb_classes is 1000; pass --nb_classes 3", err)


def test_eval_classes_the_training_data_lacks(data, tmp_path, capsys):
    make_images(tmp_path / "val", count=4, classes=("cat", "emu"))
    err = fail(["--data_set", "image_folder", "--data_path", data / "train", "--eval_data_path", tmp_path / "val",
                "--nb_classes", "3"], capsys)
    assert "has classes the training data lacks: emu" in err


def test_weights_for_another_size(data, encoder_file, capsys, tmp_path):
    err = fail(["--model", "convnextv2_femto", "--finetune", encoder_file, "--data_path", data, *SMALL,
                "--output_dir", tmp_path], capsys)
    assert "the weights are convnextv2_atto" in err and "pass --model convnextv2_atto" in err


@pytest.mark.parametrize("args,message", [
    (["--data_path", "/no/such/folder", "--data_set", "image_folder", "--disable_eval", "true"],
     "--data_path /no/such/folder does not exist"),
    (["--data_set", "image_folder"], "evaluates on --eval_data_path"),
    (["--mixup", "0.8", "--batch_size", "5"], "--batch_size must be even"),
    (["--finetune", "/no/such.pth"], "--finetune /no/such.pth does not exist"),
    (["--model_ema", "maybe"], "expected true or false, got 'maybe'"),
    (["--crop_pct", "1.5"], r"--crop_pct must be in \(0, 1\]"),
    (["--eval", "true", "--disable_eval", "true"], "contradict"),
    (["--decoder", "dali"], "--decoder dali decodes pretraining's crops on the GPU; .* use --decoder scaled"),
])
def test_bad_arguments_stop_with_one_sentence(data, args, message, capsys):
    defaults = ["--data_path", str(data), "--nb_classes", "3"]
    assert re.search(message, fail(defaults + args, capsys))


@pytest.mark.slow  # a pretraining run, then fine-tuning on its folder: 37 s on 2 cores
def test_a_pretraining_output_dir_is_named_not_a_traceback(data, tmp_path):
    """finetune.py pointed at a pretraining run's output_dir would resume from its checkpoints;
    it says what the folder holds instead of failing inside accelerate. And the other way round."""
    from test_pretrain import SMALL as PRETRAIN_SMALL, run_pretrain
    out = tmp_path / "pretrained"
    run_pretrain(*PRETRAIN_SMALL, "--epochs", "1", "--data_path", data / "train", "--output_dir", out)
    result = run_finetune("--model", "convnextv2_atto", "--data_path", data, *SMALL, "--output_dir", out, expect=2)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr and len(err.splitlines()) == 1
    assert re.search(r"checkpoint-00000006 is an FCMAE pretraining checkpoint \(pretrain.py\), made for another "
                     r"model than this run's \(found through --output_dir .*\); give this run an --output_dir of its "
                     r"own and pass pretrained weights with --finetune", err), err
    tuned = tmp_path / "tuned"
    run_finetune("--model", "convnextv2_atto", "--data_path", data, *SMALL, "--max_steps", "1",
                 "--disable_eval", "true", "--output_dir", tuned)
    result = run_pretrain(*PRETRAIN_SMALL, "--data_path", data / "train", "--resume", last_checkpoint(tuned),
                          "--output_dir", tmp_path / "again", expect=2)
    assert "is a classifier checkpoint (finetune.py)" in result.stderr and "Traceback" not in result.stderr


def test_eval_without_weights(data, tmp_path, capsys):
    result = run_finetune("--model", "convnextv2_atto", "--eval", "true", "--data_path", data, *SMALL,
                          "--output_dir", tmp_path / "nothing", expect=2)
    assert "--eval true needs weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.stem)
def test_finetune_configs_parse(config):
    from fcmae.config import parse_with_config
    args = parse_with_config(finetune.get_args_parser(), ["--config", str(config), "--data_path", "/data"])
    finetune.check_args(args)
    assert args.model == config.stem and args.batch_size * args.update_freq * 8 == 1024
    assert args.model_ema and args.model_ema_eval and args.aa == "rand-m9-mstd0.5-inc1"
    assert args.mixed_precision == "bf16"  # the GPU's fast path (the official AMP was fp16)
    official = {  # TRAINING.md
        "convnextv2_atto": (2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2),
        "convnextv2_tiny": (8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1),
        "convnextv2_base": (6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1),
    }
    if args.model in official:
        assert (args.blr, args.epochs, args.warmup_epochs, args.layer_decay_type, args.layer_decay,
                args.weight_decay, args.drop_path, args.mixup, args.cutmix, args.smoothing) == official[args.model]
    else:
        assert "NOT in the official TRAINING.md" in config.read_text()


@pytest.mark.slow
def test_compiled_fine_tuning_matches_eager(data, encoder_file, tmp_path):
    """--compile trains as eager does, to rounding, with an EMA beside it (made before compiling),
    and evaluates the model and the EMA weights (9 images in batches of 4: the last one smaller)
    between training steps without compiling anything again: no guard fails. SGD, since Adam
    turns a rounding-level difference in a near-zero gradient into a full step."""
    args = ["--model", "convnextv2_atto", "--finetune", encoder_file, "--data_path", data, *SMALL,
            "--max_steps", "8", "--model_ema", "true", "--model_ema_eval", "true", "--opt", "sgd", "--blr", "5",
            "--warmup_epochs", "0", "--aa", "none", "--reprob", "0"]  # 6 steps an epoch: train, evaluate, train
    eager_run = run_finetune(*args, "--output_dir", tmp_path / "eager")
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args), "--output_dir",
                             str(tmp_path / "compiled"), "--compile", "true"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1500, env={**env(), "TORCH_LOGS": "recompiles"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile" in result.stdout
    assert "Recompiling function" not in result.stderr, result.stderr[-3000:]
    compiled_eval, eager_eval = log_lines(tmp_path / "compiled")[0], log_lines(tmp_path / "eager")[0]
    for key in ("test_loss", "test_loss_ema"):  # the evaluation graph (last batch padded) as eager
        assert compiled_eval[key] == pytest.approx(eager_eval[key], rel=1e-3), key
    assert "EMA top-1" in eager_run.stdout
    eager = load_file(str(last_checkpoint(tmp_path / "eager") / "model.safetensors"))
    compiled = load_file(str(last_checkpoint(tmp_path / "compiled") / "model.safetensors"))
    pretrained = load_file(str(encoder_file))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((eager[k] - pretrained[k]).abs().max().item() for k in pretrained) > 1e-3
