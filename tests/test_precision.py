"""The GPU configuration's path, on the CPU: bf16 and fp16 (with its gradient scaler) runs of both
scripts, and the learning-rate schedule against a formula written here.

torch runs bf16 and fp16 autocast and the gradient scaler on the CPU too, so these runs take the
GPU's code path, scaler included; accelerate alone would run fp16 on the CPU as fp32.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fcmae.training.engine as engine
from test_finetune import SMALL as FINETUNE_SMALL, data, finetune  # noqa: F401  (data: the fixture)
from test_pretrain import SMALL, pretrain

# What half precision may change in the first epoch (6 steps) of the small runs' 2-epoch
# schedule, measured on this 2-core machine (torch 2.14): the epoch's mean loss, relative to
# fp32's, and all parameters together (the L2 norm of the difference over fp32's). Measured:
# pretraining bf16 1.1e-7 and 7.9e-5, fp16 2.0e-8 and 1.0e-5; fine-tuning bf16 5.7e-6 and 8.3e-5,
# fp16 1.1e-3 and 4.2e-3 (its gradient scaler skips an overflowing step at its first scale, as it
# should, which the others take). The tolerances are about 3x those.
TOLERANCES = {  # (loss, parameters)
    ("pretrain", "bf16"): (3e-7, 2.5e-4), ("pretrain", "fp16"): (6e-8, 3e-5),
    ("finetune", "bf16"): (2e-5, 2.5e-4), ("finetune", "fp16"): (3e-3, 1.3e-2),
}


@pytest.fixture
def fresh_accelerator():
    """accelerate fixes the precision of a process at its first Accelerator: reset it around each run."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    reset()
    yield reset
    reset()


def arguments(script, data):
    if script == "pretrain":
        return pretrain, [*SMALL, "--data_path", str(data / "train"), "--log_every", "3"]
    return finetune, ["--model", "convnextv2_atto", "--data_path", str(data), *FINETUNE_SMALL, "--aa", "none",
                      "--blr", "1e-2", "--warmup_epochs", "1", "--model_ema", "true", "--log_every", "3"]


def final_state(out):
    return load_file(str(sorted((Path(out) / "checkpoints").glob("checkpoint-*"))[-1] / "model.safetensors"))


def losses(out):
    return [json.loads(line)["train_loss"] for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_half_precision_runs_resume_exactly_and_stay_near_fp32(script, data, tmp_path, fresh_accelerator):
    module, args = arguments(script, data)

    def run(precision, out, steps=6):  # the first epoch of the 2-epoch schedule
        fresh_accelerator()
        module.main([*args, "--mixed_precision", precision, "--output_dir", str(tmp_path / out), "--max_steps",
                     str(steps)])

    run("no", "fp32")
    reference, reference_losses = final_state(tmp_path / "fp32"), losses(tmp_path / "fp32")
    for precision in ("bf16", "fp16"):
        run(precision, precision)
        run(precision, f"{precision}_resumed", steps=4)  # stopped inside the epoch, checkpoint saved
        run(precision, f"{precision}_resumed")
        straight, resumed = final_state(tmp_path / precision), final_state(tmp_path / f"{precision}_resumed")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"{precision}: the resume is not exact"
        assert losses(tmp_path / precision) == losses(tmp_path / f"{precision}_resumed")

        loss_tolerance, parameter_tolerance = TOLERANCES[(script, precision)]
        assert losses(tmp_path / precision) == pytest.approx(reference_losses, rel=loss_tolerance), precision
        floats = [k for k in reference if reference[k].is_floating_point()]
        deviation = (torch.cat([(straight[k] - reference[k]).flatten() for k in floats]).norm()
                     / torch.cat([reference[k].flatten() for k in floats]).norm()).item()
        assert 0 < deviation < parameter_tolerance, (precision, deviation)  # not fp32 in disguise, and close to it
    scalers = [json.loads((sorted((tmp_path / run / "checkpoints").glob("checkpoint-*"))[-1] / "state.json")
                          .read_text())["scaler"] for run in ("fp16", "fp16_resumed")]
    assert scalers[0] == scalers[1] and scalers[0]["scale"] > 0  # the gradient scaler resumed exactly too


def schedule_formula(step, steps_per_epoch, peak, min_lr, epochs, warmup_epochs):
    """The official schedule, in optimiser steps: linear warm-up from 0 over the warm-up steps, then
    half a cosine from the peak to min_lr over the remaining steps."""
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if step < warmup:
        return peak * step / warmup
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_the_learning_rate_schedule_is_the_official_formula(data, tmp_path, monkeypatch, fresh_accelerator):
    """Peak lr = blr x effective batch / 256, per-step warm-up, half cosine to min_lr: the rates the
    optimiser is given at every step of a run (times each group's layer-decay scale), then again
    after a resume with --remap_epochs at another batch size, which keeps the schedule by epochs."""
    given = []
    original = engine.set_lr

    def recording(optimizer, lr):
        original(optimizer, lr)
        given.append([group["lr"] / group.get("lr_scale", 1.0) for group in optimizer.param_groups])

    monkeypatch.setattr(engine, "set_lr", recording)
    # 24 images, batch 3 x 2 accumulation: 4 steps an epoch; 2 epochs, 1 of warm-up
    args = ["--model", "convnextv2_atto", "--data_path", str(data / "train"), "--input_size", "64",
            "--decoder_embed_dim", "64", "--batch_size", "3", "--update_freq", "2", "--epochs", "2",
            "--warmup_epochs", "1", "--blr", "0.032", "--min_lr", "1e-5", "--num_workers", "0", "--log_with", "none",
            "--save_ckpt_steps", "6", "--output_dir", str(tmp_path / "run"), "--save_ckpt_num", "0"]
    pretrain.main(args)
    peak = 0.032 * 6 / 256
    expected = [schedule_formula(step, 4, peak, 1e-5, 2, 1) for step in range(8)]
    assert len(given) == 8 and all(len(set(rates)) == 1 for rates in given)  # every group gets the step's rate
    assert [rates[0] for rates in given] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert given[4][0] == pytest.approx(peak) and given[0][0] == 0.0

    # resumed halfway through epoch 1 (step 6) at batch 6 x 2: 2 steps an epoch, twice the peak lr
    given.clear()
    fresh_accelerator()
    pretrain.main([*args[:-4], "--batch_size", "6", "--output_dir", str(tmp_path / "remapped"), "--resume",
                   str(tmp_path / "run" / "checkpoints" / "checkpoint-00000006"), "--remap_epochs", "true"])
    remapped = [schedule_formula(step, 2, 2 * peak, 1e-5, 2, 1) for step in range(3, 4)]  # step 3 = 1.5 epochs
    assert [rates[0] for rates in given] == pytest.approx(remapped, rel=1e-12)
