"""pretrain.py end to end on tiny images: outputs, resume, multi-process, bad input."""
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import fcmae
from fcmae.config import parse_with_config
from fcmae.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pretrain", ROOT / "pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)

# atto at 64x64 with a narrow decoder: a step takes a few tens of milliseconds
SMALL = ["--model", "convnextv2_atto", "--input_size", "64", "--decoder_embed_dim", "64",
         "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2",
         "--num_workers", "0", "--log_with", "none"]


def make_images(folder, count=24, size=80, classes=("a", "b")):
    """Small real-looking images (smooth colour gradients plus noise) in class sub-folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        sub = Path(folder) / classes[i % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + i), yy * rng.uniform(), xx * yy], -1)
        img = np.clip((base * 0.5 + 0.5 + rng.normal(0, 0.05, base.shape)) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(sub / f"img_{i:03d}.png")
    return Path(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


def usage_error(script, args, capsys):
    """What `script`.main(args) says when it stops with a usage error: one line, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{Path(script.__file__).name}: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def run_script(script, *args, launcher=None, timeout=600, expect=0):
    """Run one of the project's scripts as a user would; its exit code must be `expect`."""
    command = (launcher or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect, f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                        f"{result.stderr[-3000:]}"
    return result


def run_pretrain(*args, **kwargs):
    return run_script("pretrain.py", *args, **kwargs)


def kill_at_checkpoint(args, out, step):
    """Start pretrain.py with a checkpoint every step and kill it (SIGKILL) once checkpoint `step` exists."""
    command = [sys.executable, str(ROOT / "pretrain.py"), *map(str, args), "--output_dir", str(out),
               "--save_ckpt_steps", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"checkpoint-{step:08d}").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def final_params(out):
    return load_file(str(sorted((Path(out) / "checkpoints").glob("checkpoint-*"))[-1] / "model.safetensors"))


def test_end_to_end_writes_checkpoint_log_picture_and_encoder(images, tmp_path):
    out = tmp_path / "run"
    result = run_pretrain(*SMALL, "--log_with", "tensorboard", "--data_path", images, "--output_dir", out)
    assert "done after 12 steps" in result.stdout
    assert (out / "checkpoints" / "checkpoint-00000012" / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "epoch", "n_parameters"} <= lines[0].keys()
    assert lines[0]["n_parameters"] == sum(p.numel() for p in fcmae.create_model(
        "convnextv2_atto", decoder_embed_dim=64).parameters())
    picture = Image.open(out / "reconstructions" / "epoch_0001.png")
    assert picture.size == (3 * 66 + 2, 8 * 66 + 2)  # 3 columns, 8 images, 2px padding
    assert list(out.rglob("events.out.tfevents.*"))
    # the exported encoder loads into timm's dense model (all but the head it never had)
    dense = timm.create_model("convnextv2_atto", num_classes=0)
    missing, unexpected = dense.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=False)
    assert not unexpected and set(missing) == {"head.norm.weight", "head.norm.bias"}


def test_plain_run_uses_the_bundled_photographs(tmp_path):
    result = run_pretrain("--max_steps", "2", "--batch_size", "4", "--input_size", "64",
                          "--num_workers", "0", "--log_with", "none", "--output_dir", tmp_path / "demo")
    assert "from the sample photographs bundled with scikit-image" in result.stdout
    assert "pretraining convnextv2_atto" in result.stdout
    assert (tmp_path / "demo" / "encoder.safetensors").is_file()


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=2e-3, betas=(0.9, 0.95))
    imgs = torch.randn(4, 3, 64, 64).cumsum(-1) / 8  # smooth-ish structure to learn
    mask = model.random_mask(imgs)
    losses = []
    for _ in range(40):
        loss, _, _ = model(imgs, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_groups_exclude_norms_grn_biases_and_mask_token():
    model = fcmae.create_model("convnextv2_tiny", decoder_embed_dim=64)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "mask_token" in no_decay_names
    assert all(n.endswith(("bias", "weight")) for n in no_decay_names - {"mask_token"})
    assert {n for n in no_decay_names if ".grn." in n} == {n for n, _ in model.named_parameters() if ".grn." in n}
    assert all(p.ndim > 1 for p in decay["params"]) and len(decay["params"]) > 0


def test_kill_and_resume_ends_where_the_uninterrupted_run_ends(images, tmp_path):
    args = [*SMALL, "--epochs", "3", "--data_path", images]
    run_pretrain(*args, "--output_dir", tmp_path / "straight")

    out = tmp_path / "killed"
    kill_at_checkpoint(args, out, step=8)  # mid-epoch 2 of 3
    # debris of a save that was cut short must not be picked up
    debris = out / "checkpoints" / ".partial-checkpoint-00000099"
    debris.mkdir(exist_ok=True)
    (debris / "model.safetensors").write_bytes(b"torn")

    result = run_pretrain(*args, "--output_dir", out, "--save_ckpt_steps", "1")
    assert "resumed from" in result.stdout
    straight, resumed = final_params(tmp_path / "straight"), final_params(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key  # bitwise on CPU
    assert (out / "log.txt").read_text() == (tmp_path / "straight" / "log.txt").read_text()
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == 3  # --save_ckpt_num


@pytest.mark.slow
def test_two_processes_match_one_and_accumulation(images, tmp_path):
    # accelerate runs `--cpu` launches as a single process (unless MPI is set up): CPU DDP goes
    # through its torchrun launcher, with --device cpu on the script
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "29517"]
    args = [*SMALL, "--data_path", images, "--blr", "0.05"]
    # 2 processes x 2 micro-steps of 1: the shipped configs' path (gradients all-reduced on the last
    # micro-step only, the others under no_sync)
    two = run_pretrain(*args, "--batch_size", "1", "--update_freq", "2", "--output_dir", tmp_path / "two",
                       "--device", "cpu", launcher=accelerate)
    assert "Traceback" not in two.stderr and "Grad strides" not in two.stderr
    assert "parameters identical on all 2 processes" in two.stdout
    assert two.stdout.count("pretraining convnextv2_atto") == 1  # only the main process speaks
    run_pretrain(*args, "--batch_size", "4", "--output_dir", tmp_path / "one")
    run_pretrain(*args, "--batch_size", "1", "--update_freq", "4", "--output_dir", tmp_path / "accum")
    one, accum = final_params(tmp_path / "one"), final_params(tmp_path / "accum")
    for other in (final_params(tmp_path / "two"), accum):
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    for key, value in final_params(tmp_path / "two").items():  # 2 x 2 against 1 x 4, the same micro-batches
        torch.testing.assert_close(value, accum[key], rtol=1e-4, atol=1e-6, msg=key)
    # and training moved the weights far more than that tolerance
    torch.manual_seed(0)
    start = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64).state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 3e-3


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    data = make_images(tmp_path / "data", count=8)
    (data / "a" / "notes.jpg").write_text("this is not an image")
    good = (data / "b" / "img_001.png").read_bytes()
    (data / "b" / "truncated.png").write_bytes(good[: len(good) // 3])
    result = run_pretrain(*SMALL, "--epochs", "1", "--repeats", "2", "--data_path", data,
                          "--output_dir", tmp_path / "run")
    assert "skipping unreadable image" in result.stderr and "notes.jpg" in result.stderr
    assert "truncated.png" in result.stderr
    log = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[0])
    assert log["skipped_images"] >= 2


@pytest.mark.parametrize("when", ["checkpoint every step", "read back late"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, when):
    """Read back at once (a checkpoint every step) or only at the next --log_every step, a
    non-finite loss stops the run naming its step, and no checkpoint holds what followed it."""
    out = tmp_path / "run"
    extra = ["--save_ckpt_steps", "1"] if when == "checkpoint every step" else ["--log_every", "5"]
    command = [sys.executable, str(ROOT / "pretrain.py"), *SMALL, "--data_path", str(images),
               "--output_dir", str(out), "--lr", "1e12", "--warmup_epochs", "0", "--no_norm_pix_loss", *extra]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "the loss became" in result.stdout and "last good checkpoint is" in result.stdout
    assert "Traceback" not in result.stderr
    step = int(re.search(r"the loss became \S+ at step (\d+)", result.stdout).group(1))
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert not list((out / "checkpoints").glob(".partial-*"))
    assert all(int(c.name.split("-")[1]) <= step for c in checkpoints)  # none after the bad step
    if when == "checkpoint every step":
        assert checkpoints
        load_file(str(checkpoints[-1] / "model.safetensors"))  # complete and readable
    else:
        assert step < 5 and not checkpoints  # found at the first read, naming the first bad step


@pytest.mark.parametrize("args,message", [
    (["--model", "convnextv2_small"], "argument --model: invalid choice: 'convnextv2_small'"),
    (["--input_size", "100"], "--input_size must be a multiple of 32"),
    (["--mask_ratio", "1.0"], r"--mask_ratio must be in \[0, 1\)"),
    (["--mask_ratio", "-0.2"], r"--mask_ratio must be in \[0, 1\)"),
    (["--data_path", "/no/such/folder"], "--data_path /no/such/folder does not exist"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--resume", "/no/such/checkpoint"], "--resume /no/such/checkpoint does not exist"),
    (["--init", "/no/such/weights.pt"], "--init /no/such/weights.pt does not exist"),
])
def test_bad_arguments_stop_with_one_sentence(args, message, capsys):
    assert re.search(message, usage_error(pretrain, args, capsys))


def test_empty_folder_and_too_few_images(tmp_path, capsys):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(SystemExit):
        pretrain.main(["--data_path", str(tmp_path / "empty")])
    assert "holds no images" in capsys.readouterr().err
    data = make_images(tmp_path / "few", count=3)
    command = [sys.executable, str(ROOT / "pretrain.py"), "--data_path", str(data), "--batch_size", "4",
               "--output_dir", str(tmp_path / "out"), "--log_with", "none"]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "fewer than one effective batch" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("batch_sise: 32\n")
    with pytest.raises(SystemExit):
        pretrain.main(["--config", str(config)])
    assert "unknown key 'batch_sise'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_parse_and_build_their_models(config):
    args = parse_with_config(pretrain.get_args_parser(), ["--config", str(config), "--data_path", "/data"])
    pretrain.check_args(args)
    assert args.model == config.stem and args.data_path == "/data"
    assert args.batch_size * args.update_freq * 8 == 4096  # one 8-GPU node, as documented
    assert (args.blr, args.epochs, args.warmup_epochs, args.mask_ratio) == (1.5e-4, 1600, 40, 0.6)
    assert args.mixed_precision == "bf16"  # the GPU's fast path (the official code ran fp32)
    with torch.device("meta"):
        model = fcmae.create_model(args.model, mask_ratio=args.mask_ratio,
                                   decoder_depth=args.decoder_depth, decoder_embed_dim=args.decoder_embed_dim)
    assert model.encoder.name == args.model


def test_command_line_overrides_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 32\nblr: 0.001\nnorm_pix_loss: false\n")
    parser = pretrain.get_args_parser()
    args = parse_with_config(parser, ["--config", str(config), "--blr", "0.002", "--data_path", "/d"])
    assert (args.batch_size, args.blr, args.norm_pix_loss) == (32, 0.002, False)
    # with no --data_path the demo settings apply, beneath the file and the flags
    args = parse_with_config(pretrain.get_args_parser(), ["--config", str(config)],
                             extra_defaults=pretrain.demo_defaults)
    assert (args.model, args.batch_size, args.input_size) == ("convnextv2_atto", 32, 128)


def test_checkpoint_rotation_keeps_the_newest(images, tmp_path):
    out = tmp_path / "run"
    run_pretrain(*SMALL, "--data_path", images, "--output_dir", out, "--save_ckpt_steps", "2",
                 "--save_ckpt_num", "2")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-00000010", "checkpoint-00000012"]
    shutil.rmtree(out)


class Keys(torch.utils.data.Dataset):
    """Returns each key it is asked for, and the process that served it."""

    def __len__(self):
        return 37

    def __getitem__(self, key):
        return torch.tensor(key), os.getpid()


def test_persistent_workers_give_exactly_the_batches_of_fresh_loaders():
    from fcmae.data import StepBatchSampler
    plan = [(0, 0), (1, 0), (2, 3), (3, 1)]  # (epoch, step it starts at): a resume mid-epoch too
    fresh = []
    for epoch, start in plan:
        sampler = StepBatchSampler(37, 3, 2, 2, 1, seed=5, epoch=epoch, start_step=start)
        fresh.append([keys.tolist() for keys, _ in torch.utils.data.DataLoader(Keys(), batch_sampler=sampler)])
    sampler = StepBatchSampler(37, 3, 2, 2, 1, seed=5)
    loader = torch.utils.data.DataLoader(Keys(), batch_sampler=sampler, num_workers=2, persistent_workers=True)
    persistent, workers = [], set()
    for epoch, start in plan:
        sampler.set_epoch(epoch, start_step=start)
        batches = list(loader)
        persistent.append([keys.tolist() for keys, _ in batches])
        workers |= {pid for _, pids in batches for pid in pids.tolist()}
    assert persistent == fresh
    assert len(fresh[0]) == 37 // 12 * 2 and len(fresh[2]) == 0 and len(fresh[3]) == 4
    assert len(workers) == 2  # the same two worker processes served every epoch


def test_losses_are_read_back_only_when_needed(images, tmp_path, monkeypatch):
    """The host reads the losses every --log_every steps, before checkpoints and at epoch ends,
    never in between (each read waits for the device)."""
    from fcmae.training.engine import Run
    reads, original = [], Run.read_losses

    def recording(self, epoch, progress=None):
        if self.pending:
            reads.append((self.state.global_step, len(self.pending)))
        return original(self, epoch, progress)

    monkeypatch.setattr(Run, "read_losses", recording)
    # 24 images, batch 4: 6 steps an epoch, 2 epochs; a read every 4 steps and a checkpoint at step 9
    pretrain.main([*SMALL, "--data_path", str(images), "--output_dir", str(tmp_path / "run"),
                   "--log_every", "4", "--save_ckpt_steps", "9", "--save_ckpt_freq", "5"])
    assert reads == [(4, 4), (6, 2), (8, 2), (9, 1), (12, 3)]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and all(math.isfinite(e["train_loss"]) for e in log)


@pytest.mark.slow
def test_compiled_pretraining_matches_eager(images, tmp_path):
    """--compile (the sparse encoder, decoder and loss as one fullgraph) trains as eager does, to
    rounding: the compiler reorders floating-point sums, so not bitwise. The yardstick is how far
    training moved each tensor: a compiled run that did not train at all would be 100% off."""
    # no warm-up and a large rate, so that three steps move the weights far beyond rounding
    args = [*SMALL, "--data_path", images, "--max_steps", "3", "--batch_size", "2", "--warmup_epochs", "0",
            "--blr", "0.5"]
    run_pretrain(*args, "--output_dir", tmp_path / "eager")
    result = run_pretrain(*args, "--output_dir", tmp_path / "compiled", "--compile", "true", timeout=1200)
    assert "torch.compile" in result.stdout
    eager, compiled = final_params(tmp_path / "eager"), final_params(tmp_path / "compiled")
    torch.manual_seed(0)  # the runs' own initial weights (--seed 0)
    start = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64).state_dict()
    assert eager.keys() == compiled.keys() == start.keys()
    for key in eager:
        moved = (eager[key] - start[key]).norm()
        if not moved:  # what these steps do not train
            assert torch.equal(compiled[key], eager[key]), key
            continue
        # measured: at most 6e-5 of the movement (atto, 3 steps, 2-core CPU)
        assert (compiled[key] - eager[key]).norm() <= 1e-3 * moved, key
    assert max((eager[k] - start[k]).abs().max() for k in eager) > 1e-3  # the steps did train
