"""Runs that survive a cluster: stop signals, a killed worker, a new allocation, a safe resume.

Progress is watched through the reconstruction picture pretrain.py writes after every step
(--vis_every 1), so a signal lands at a step the test does not choose exactly.
"""
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcmae.training.signals import PREEMPTED_EXIT_CODE, parse_signals
from test_pretrain import ROOT, SMALL, env, final_params, pretrain, run_pretrain

ARGS = [*SMALL, "--epochs", "3", "--log_every", "1", "--vis_every", "1"]  # 3 x 6 steps of 4 images


def launcher(port, *extra):
    """accelerate launch with 2 CPU processes (see test_pretrain's multi-process test)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *extra]


def start(command, out, **extra_env):
    """`command` (pretrain.py after a launcher or the interpreter) writing to `out`."""
    return subprocess.Popen([*command, "--output_dir", str(out)], cwd=ROOT, env={**env(), **extra_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc, out, step):
    picture = out / "reconstructions" / f"step_{step:08d}.png"
    deadline = time.time() + 300
    while not picture.exists():
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the run did not reach step {step}"
        time.sleep(0.02)


def finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def worker_pid(launcher_pid, rank):
    """The pid of the training process of `rank` that `launcher_pid` started."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"pretrain.py" in cmdline and f"RANK={rank}".encode() in environ and is_descendant(entry.name,
                                                                                                 launcher_pid):
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def is_descendant(pid, ancestor):
    while pid not in ("0", "1"):
        if int(pid) == ancestor:
            return True
        try:
            pid = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return False
    return False


def pretrain_here(*args, capsys, expect=0):
    """pretrain.main in this process (no start-up cost); returns (stdout, stderr)."""
    capsys.readouterr()
    if expect == 0:
        pretrain.main(list(map(str, args)))
    else:
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main(list(map(str, args)))
        assert exit_info.value.code == expect
    return capsys.readouterr()


def checkpoints(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))


def assert_same(a, b, rtol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if rtol:
            torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=1e-7, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from test_pretrain import make_images
    return make_images(tmp_path_factory.mktemp("images"))


# ----- one process -------------------------------------------------------------------------------------

def test_stop_signal_saves_that_step_exits_75_and_the_resume_is_bitwise(images, tmp_path):
    args = [*ARGS, "--data_path", images]
    run_pretrain(*args, "--output_dir", tmp_path / "straight")
    out = tmp_path / "stopped"
    proc = start([sys.executable, str(ROOT / "pretrain.py"), *map(str, args)], out)
    signalled_at = random.Random().randint(2, 14)
    wait_for_step(proc, out, signalled_at)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a second one changes nothing
    code, stdout, stderr = finish(proc)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr and "received SIGTERM" in stderr
    step = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    assert signalled_at <= step < 18 and checkpoints(out)[-1] == step  # the step it stopped at, saved
    assert f"checkpoint-{step:08d}" in stdout
    result = run_pretrain(*args, "--output_dir", out)
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{step:08d}'}" in result.stdout
    assert_same(final_params(tmp_path / "straight"), final_params(out))
    assert (out / "log.txt").read_text() == (tmp_path / "straight" / "log.txt").read_text()


@pytest.mark.slow  # waits for wall-clock saves: 34 s on 2 cores
def test_time_based_saves(images, tmp_path, capsys):
    out = tmp_path / "run"
    # 0.001 minutes: due at every read-back (steps 4, 8, 12 and the epochs' ends)
    pretrain_here(*SMALL, "--data_path", images, "--output_dir", out, "--save_ckpt_minutes", "0.001",
                  "--log_every", "4", "--save_ckpt_num", "0", capsys=capsys)
    assert checkpoints(out) == [4, 6, 8, 12]
    # not due yet: only the epochs' ends
    pretrain_here(*SMALL, "--data_path", images, "--output_dir", tmp_path / "later", "--save_ckpt_minutes", "60",
                  "--log_every", "4", "--save_ckpt_num", "0", "--epochs", "1", capsys=capsys)
    assert checkpoints(tmp_path / "later") == [6]


def test_stop_signals_flag():
    assert parse_signals("TERM,usr1, SIGINT") == ("SIGTERM", "SIGUSR1", "SIGINT")
    assert parse_signals("none") == ()
    with pytest.raises(ValueError, match="not a signal"):
        parse_signals("TERM,KILL")


# ----- resuming safely ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished one-process run with a checkpoint every 3 steps, and its uninterrupted twin."""
    out = tmp_path_factory.mktemp("finished")
    pretrain.main(list(map(str, [*SMALL, "--data_path", images, "--output_dir", out, "--save_ckpt_steps", "3",
                                 "--save_ckpt_num", "0"])))
    return out


class Crafted:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


@pytest.mark.parametrize("file", ["optimizer.pt", "state.json", "model.safetensors"])
def test_a_tampered_checkpoint_is_refused_and_runs_nothing(images, finished, tmp_path, file, capsys):
    folder = tmp_path / "checkpoints" / "checkpoint-00000009"
    shutil.copytree(finished / "checkpoints" / "checkpoint-00000009", folder)
    witness = tmp_path / "witness"
    if file == "optimizer.pt":
        (folder / file).write_bytes(pickle.dumps({"state": Crafted(witness)}, protocol=2))
    else:
        (folder / file).write_bytes(b"\x80\x04 torn")
    _, err = pretrain_here(*SMALL, "--data_path", images, "--output_dir", tmp_path, expect=2, capsys=capsys)
    assert not witness.exists()
    assert err.startswith("pretrain.py: error: ") and len(err.strip().splitlines()) == 1, err
    assert str(folder / file) in err
    if file == "optimizer.pt":
        assert "holds more than tensors and numbers" in err and "could run code" in err


def test_a_checkpoint_from_before_this_format_resumes_bitwise_and_its_pickles_run_nothing(images, finished, tmp_path,
                                                                                          capsys):
    """Write checkpoint 9 as accelerate's save_state did (optimizer.bin, custom_checkpoint_0.pkl,
    random_states_0.pkl); resuming it ends where the run did. Its pickles go through weights_only."""
    import json
    import numpy as np
    new = finished / "checkpoints" / "checkpoint-00000009"
    old = tmp_path / "checkpoints" / "checkpoint-00000009"
    old.mkdir(parents=True)
    shutil.copy(new / "model.safetensors", old / "model.safetensors")
    torch.save(torch.load(new / "optimizer.pt", weights_only=True), old / "optimizer.bin")
    torch.save(json.loads((new / "state.json").read_text())["train_state"], old / "custom_checkpoint_0.pkl")
    # accelerate pickles numpy's generator state here; it is never read
    torch.save({"step": 0, "numpy_random_seed": np.random.get_state()}, old / "random_states_0.pkl")
    out, _ = pretrain_here(*SMALL, "--data_path", images, "--output_dir", tmp_path, "--save_ckpt_num", "0",
                           capsys=capsys)
    assert "resumed from" in out and "step 9" in out
    assert_same(load_file(str(finished / "checkpoints" / "checkpoint-00000012" / "model.safetensors")),
                final_params(tmp_path))
    # and a crafted pickle in the old layout is refused the same way
    witness = tmp_path / "witness"
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Crafted(witness), protocol=2))
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-00000012")
    _, err = pretrain_here(*SMALL, "--data_path", images, "--output_dir", tmp_path, expect=2, capsys=capsys)
    assert not witness.exists() and "could run code" in err and len(err.strip().splitlines()) == 1


def test_the_train_state_keeps_a_scripts_numbers_and_reads_the_older_layout():
    """Fine-tuning's best accuracies live in TrainState.script; a state.json written before that
    (with "best" beside the counters) is read into it."""
    import json
    from fcmae.training.checkpoint import TrainState
    state = TrainState()
    state.global_step, state.script["best"] = 8, {"acc1": 50.0, "epoch": 1}
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert back.state_dict() == state.state_dict()
    older = {"epoch": 2, "step_in_epoch": 0, "global_step": 8, "epoch_sums": {}, "best": {"acc1": 50.0, "epoch": 1}}
    back = TrainState()
    back.load_state_dict(older)
    assert back.script == {"best": {"acc1": 50.0, "epoch": 1}} and back.global_step == 8
    assert "best" not in back.state_dict()


def test_a_changed_effective_batch_is_refused_or_remapped_by_epochs(images, finished, tmp_path, capsys):
    folder = finished / "checkpoints" / "checkpoint-00000009"  # epoch 1, 3 of its 6 steps done
    _, err = pretrain_here(*SMALL, "--data_path", images, "--resume", folder, "--batch_size", "8",
                           "--output_dir", tmp_path / "refused", expect=2, capsys=capsys)
    assert err.startswith("pretrain.py: error: ") and len(err.strip().splitlines()) == 1, err
    assert "effective batch of 4" in err and "is 8" in err and "--remap_epochs" in err
    out, _ = pretrain_here(*SMALL, "--data_path", images, "--resume", folder, "--batch_size", "8",
                           "--output_dir", tmp_path / "remapped", "--remap_epochs", "true", "--save_ckpt_num", "0",
                           capsys=capsys)
    # 3 steps per epoch now: half of epoch 1 done is step 3 + 2 (rounded), and the run ends at 6
    assert "resumed from" in out and "epoch 1, step 5" in out
    assert checkpoints(tmp_path / "remapped") == [6]


@pytest.mark.parametrize("case", ["output_dir is a file", "resume is not a checkpoint", "data_path is not a tar"])
def test_bad_inputs_are_one_sentence(tmp_path, case, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a tar archive\n")
    not_a_checkpoint = tmp_path / "somefolder"
    not_a_checkpoint.mkdir()
    args, expected = {
        "output_dir is a file": (["--output_dir", a_file], "--output_dir"),
        "resume is not a checkpoint": (["--resume", not_a_checkpoint], "is not a checkpoint folder"),
        "data_path is not a tar": (["--data_path", tmp_path / "shard.tar"], "is not a tar archive"),
    }[case]
    (tmp_path / "shard.tar").write_text("not a tar archive\n")
    _, err = pretrain_here(*SMALL, *args, expect=2, capsys=capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("pretrain.py: error: ") and expected in errors[0], err


# ----- two processes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_straight(images, tmp_path_factory):
    """The uninterrupted two-process run."""
    out = tmp_path_factory.mktemp("two_straight")
    run_pretrain(*ARGS, "--data_path", images, "--batch_size", "2", "--device", "cpu", "--output_dir", out,
                 launcher=launcher(29531), timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("receiver", ["launcher", "one worker"])
def test_a_stop_signal_to_the_launcher_or_one_worker_saves_one_step_for_all(images, two_straight, tmp_path,
                                                                          receiver):
    out = tmp_path / "stopped"
    args = [*map(str, ARGS), "--data_path", str(images), "--batch_size", "2", "--device", "cpu"]
    proc = start([*launcher(29532), str(ROOT / "pretrain.py"), *args], out)
    wait_for_step(proc, out, random.Random().randint(2, 12))
    target = proc.pid if receiver == "launcher" else worker_pid(proc.pid, rank=1)
    os.kill(target, signal.SIGTERM)
    code, stdout, stderr = finish(proc)
    # the launcher reports workers that did not exit 0 with its own code, 1; one that received the
    # signal itself exits from accelerate 1.16 on with 128 + the signal, as a shell reports a signalled process
    expected = {1, 128 + signal.SIGTERM} if receiver == "launcher" else {1}
    assert code in expected, stderr[-3000:]
    assert stdout.count("stopped at step") == 1 and f"exit code {PREEMPTED_EXIT_CODE}" in stdout
    step = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    assert checkpoints(out)[-1] == step and step < 18
    if receiver == "launcher":
        # a new allocation: one process with twice the accumulation continues the same run
        result = run_pretrain(*args, "--output_dir", out, "--update_freq", "2")
        assert "resumed from" in result.stdout
        assert_same(final_params(two_straight), final_params(out), rtol=1e-5)
    else:
        run_pretrain(*args, "--output_dir", out, launcher=launcher(29533))
        assert_same(final_params(two_straight), final_params(out))


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_resumes_and_ends_as_the_uninterrupted_run(images, two_straight,
                                                                                             tmp_path):
    out = tmp_path / "killed"
    args = [*map(str, ARGS), "--data_path", str(images), "--batch_size", "2", "--device", "cpu",
            "--save_ckpt_steps", "2"]
    elastic = launcher(29534, "--max_restarts", "1", "--rdzv_backend", "c10d", "--monitor_interval", "0.5")
    # the elastic recipe of docs/cluster.md: without a store of its own, the restarted group reads the dead one's addresses
    proc = start([*elastic, str(ROOT / "pretrain.py"), *args], out, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    wait_for_step(proc, out, random.Random().randint(3, 14))
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    code, stdout, stderr = finish(proc, timeout=600)
    assert code == 0, stdout[-2000:] + stderr[-6000:]
    assert "resumed from" in stdout
    # the survivor says what happened in one sentence (the launcher's own report names the dead rank)
    assert "process 0 of 2 lost the others" in stderr and "[rank0]: Traceback" not in stderr
    assert_same(final_params(two_straight), final_params(out))
    assert_same(load_file(str(two_straight / "encoder.safetensors")), load_file(str(out / "encoder.safetensors")))


@pytest.mark.slow
def test_unreadable_data_on_one_of_two_processes_stops_both_at_one_step_with_one_sentence(images, tmp_path):
    """Each process reads its own shards; one shard is damaged. Its process keeps in step on a
    stand-in until the next loss read-back, where both stop, nothing saved after the last good
    checkpoint, long before --dist_timeout."""
    from fcmae.data import write_shards
    shards = tmp_path / "shards"
    write_shards(images, shards, per_shard=12, say=lambda _: None)  # 2 shards of 12
    damaged = sorted(shards.glob("*.tar"))[1]
    damaged.write_bytes(b"\0" * 100 + damaged.read_bytes()[100:2000])
    out = tmp_path / "run"
    args = [*map(str, SMALL), "--data_path", str(shards), "--batch_size", "2", "--device", "cpu", "--epochs", "3",
            "--log_every", "2", "--dist_timeout", "5"]
    begun = time.monotonic()
    proc = start([*launcher(29536), str(ROOT / "pretrain.py"), *args], out)
    code, stdout, stderr = finish(proc, timeout=300)
    assert time.monotonic() - begun < 120, "a process waited for the other"
    assert code == 1
    said = [line for line in stdout.splitlines() + stderr.splitlines() if line.startswith("error: ")]
    assert any(re.match(r"error: process [01] of 2: the shard .*cannot be read .*\(at step (\d+)\); stopping\.", line)
               for line in said), stderr[-3000:]
    steps = {int(m.group(1)) for line in said for m in [re.search(r"at step (\d+)", line)] if m}
    assert len(steps) == 1, said  # both stopped at the same step
    assert 'pretrain.py", line' not in stderr  # no traceback of ours (the launcher reports its worker's exit)
    assert not (out / "checkpoints").exists() or checkpoints(out) == []


@pytest.mark.slow
def test_a_launch_of_two_processes_that_forms_no_group_refuses(images, tmp_path):
    """Without a GPU and without --device cpu, accelerate starts processes that form no group: each
    would train alone into the same folder. Each refuses instead."""
    proc = start([*launcher(29538), str(ROOT / "pretrain.py"), *map(str, SMALL), "--data_path", str(images)],
                 tmp_path / "run")
    code, stdout, stderr = finish(proc, timeout=300)
    assert code != 0
    refusals = [line for line in stderr.splitlines() if line.startswith("pretrain.py: error: ")]
    assert len(refusals) == 2 and all("launched as one of 2 (WORLD_SIZE=2) but formed no process group" in line
                                      and "--device cpu" in line for line in refusals), stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_process_of_several_alone_refuses(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    _, err = pretrain_here(*SMALL, "--data_path", images, "--output_dir", tmp_path / "run", expect=2, capsys=capsys)
    assert err.startswith("pretrain.py: error: this process was launched as one of 4 (WORLD_SIZE=4)"), err
    assert len(err.strip().splitlines()) == 1


# ----- the cluster page (docs/cluster.md) ------------------------------------------------------------------

def flags_of(command_text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", command_text))


@pytest.mark.parametrize("marker", ["## A dead worker", "## SLURM"])
def test_every_flag_of_the_documented_cluster_commands_exists(marker):
    """The sbatch script cannot run here; every flag of accelerate launch and pretrain.py in it must exist."""
    from accelerate.commands.launch import launch_command_parser
    from test_project import doc_command
    command = doc_command(marker, "docs/cluster.md")
    launch_part, script_part = command.split("pretrain.py", 1)
    launch_part = launch_part[launch_part.index("accelerate launch"):]
    known = {s for action in launch_command_parser()._actions for s in action.option_strings}
    assert flags_of(launch_part) and flags_of(launch_part) <= known, flags_of(launch_part) - known
    known = {s for action in pretrain.get_args_parser()._actions for s in action.option_strings}
    assert flags_of(script_part) and flags_of(script_part) <= known, flags_of(script_part) - known
    if marker == "## SLURM":
        assert "--stop_signals" in script_part and "--save_ckpt_minutes" in script_part
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in command and "--rdzv_backend c10d" in command
