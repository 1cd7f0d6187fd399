"""The project's entry points: README commands, CI script, benchmark CLI."""
import os
import re
import subprocess
import sys
from pathlib import Path


from conftest import BACKEND_NAMES

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def readme_command(marker):
    """The shell command in the README's code block that follows the line containing `marker`."""
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r".*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, f"README has no code block after {marker!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("Run the tests")
    assert "pytest" in command and "pip install" in command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def test_readme_main_command_runs_the_demo():
    command = readme_command("Try it")
    assert command.startswith("python3 -m venv .venv") and command.endswith("python pretrain.py")


def test_bench_prints_every_backend():
    result = run("-m", "fcmae.bench", "--batch-size", "1", "--input-size", "64", "96",
                 "--steps", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "convnextv2_atto, batch 1, 64x96, mask ratio 0.6, fp32" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:]}
    assert set(rows) == set(BACKEND_NAMES)
    assert all(float(row[1]) > 0 for row in rows.values())


def test_bench_rejects_bad_arguments_in_one_sentence():
    result = run("-m", "fcmae.bench", "--input-size", "64", "64", "64")
    assert result.returncode == 2 and "--input-size takes one value" in result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_without_data_says_what_it_needs():
    result = run("finetune.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("finetune.py: error: --data_path is required: the ImageNet root (train/ and "
                                     "val/) or, with --data_set image_folder, a folder of class sub-folders")
