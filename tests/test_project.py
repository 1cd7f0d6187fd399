"""The project's entry points: the README's and the documentation's commands, CI script, benchmark CLI."""
import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import BACKEND_NAMES, MINKOWSKI
from test_pretrain import make_images

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def doc_command(marker, page="README.md"):
    """The shell command in the code block of `page` (README.md, docs/...) that follows the line
    containing `marker`."""
    text = (ROOT / page).read_text()
    match = re.search(re.escape(marker) + r".*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, f"{page} has no code block after {marker!r}"
    return match.group(1).strip()


def readme_command(marker):
    """The shell command in the README's code block that follows the line containing `marker`."""
    return doc_command(marker)


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("The whole suite, as CI runs it")
    assert "pytest" in command and "pip install" in command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines
    quick = readme_command("The quick suite")
    assert quick.endswith('pytest -m "not slow"') and "install_minkowski" not in quick


# the pages whose ```python blocks run offline as written (released-weights.md downloads from the Hub)
SNIPPET_PAGES = ["README.md", "docs/model.md", "docs/weights.md"]


def test_documented_python_snippets_run(tmp_path):
    """Every ```python block of the README and of the model and weights pages runs as written, in a
    folder holding the files it names."""
    import fcmae
    from safetensors.torch import save_file
    from fcmae import weights
    blocks = [block for page in SNIPPET_PAGES
              for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)]
    assert len(blocks) >= 2
    torch_model = fcmae.create_model("convnextv2_atto")
    weights.export(torch_model, "official", tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    checkpoint = tmp_path / "output_dir" / "demo" / "checkpoints" / "checkpoint-00000500"
    checkpoint.mkdir(parents=True)
    save_file(torch_model.state_dict(), str(checkpoint / "model.safetensors"))
    for block in blocks:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"documented snippet failed:\n{block}\n{result.stderr[-2000:]}"


def test_readme_main_command_runs_the_demo():
    install = readme_command("## Install")
    assert install.startswith("python3 -m venv .venv") and install.endswith("pip install -e .")
    assert readme_command("## Try it") == "python pretrain.py"


def bench_rows(stdout):
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    return {line.split()[1]: line.split() for line in lines[header + 1:] if line.strip()}


@pytest.mark.slow  # 40 s on 2 cores
def test_bench_prints_every_backend_and_timm(tmp_path):
    result = run("-m", "fcmae.bench", "--batch_size", "1", "--input_size", "64", "96",
                 "--steps", "1", "--warmup", "0", "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr
    assert "batch 1, 64x96, 3 channels, mask ratio 0.6, fp32" in result.stdout
    assert "whole training step (forward, backward, AdamW)" in result.stdout
    rows = bench_rows(result.stdout)
    assert set(rows) == set(BACKEND_NAMES) | {"timm"}
    assert all(float(row[2]) > 0 for row in rows.values())
    records = json.loads((tmp_path / "bench.json").read_text())
    assert {r["row"] for r in records} == set(rows)
    by_row = {r["row"]: r for r in records}
    # every FCMAE row is credited with the same (the sparse network's) FLOPs; timm's full image costs more
    assert by_row["dense"]["gflop_per_image"] == by_row["sparse"]["gflop_per_image"] > 0
    assert by_row["timm"]["gflop_per_image"] > by_row["sparse"]["gflop_per_image"]
    assert all(r["mfu"] is None for r in records)  # no GPU peak on the CPU


@pytest.mark.slow
def test_bench_compiles_each_row(tmp_path):
    result = run("-m", "fcmae.bench", "--batch_size", "2", "--input_size", "64", "--rows", "sparse", "timm",
                 "--steps", "1", "--warmup", "1", "--compile", "true", "--channels_last", "true",
                 "--json", tmp_path / "bench.json", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled, channels-last" in result.stdout
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["row"] for r in records] == ["sparse", "timm"]
    assert all(r["compile"] and r["images_per_s"] > 0 for r in records)
    assert [r["channels_last"] for r in records] == [False, True]


def test_loader_bench_measures_each_worker_count(tmp_path):
    make_images(tmp_path / "images", count=6)
    result = run("-m", "fcmae.bench", "--data", tmp_path / "images", "--input_size", "64", "--batch_size", "4",
                 "--num_workers", "0", "1", "--batches", "3", "--json", tmp_path / "loader.json")
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "loader.json").read_text())
    assert [r["num_workers"] for r in records] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in records)
    assert records[1]["images_per_s_per_worker"] == records[1]["images_per_s"]
    assert {r["decoder"] for r in records} == {"scaled"}  # pretrain.py's default pipeline, named
    result = run("-m", "fcmae.bench", "--data", tmp_path / "images", "--input_size", "64", "--batch_size", "4",
                 "--num_workers", "0", "--batches", "2", "--decoder", "full", "scaled", "--json", tmp_path / "l.json")
    assert result.returncode == 0, result.stderr
    assert [r["decoder"] for r in json.loads((tmp_path / "l.json").read_text())] == ["full", "scaled"]


@pytest.mark.parametrize("args,message", [
    (["--input_size", "64", "64", "64"], "--input_size takes one value"),
    (["--input_size", "100"], "--input_size must be a multiple of 32"),
    (["--mask_ratio", "1"], r"--mask_ratio must be in \[0, 1\)"),
    (["--data", "/no/such/folder"], "--data /no/such/folder is neither a folder of images nor shards"),
    (["--rows", "fast"], "argument --rows: invalid choice: 'fast'"),
])
def test_bench_rejects_bad_arguments_in_one_sentence(args, message):
    result = run("-m", "fcmae.bench", *args)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_refuses_a_minkowski_row_it_cannot_run():
    result = run("-m", "fcmae.bench", "--rows", "minkowski", "--compile", "true")
    message = ("the minkowski row cannot be compiled" if MINKOWSKI
               else "the minkowski backend needs MinkowskiEngine, which is not installed")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_finetune_without_data_says_what_it_needs():
    result = run("finetune.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("finetune.py: error: --data_path is required: the ImageNet root (train/ and "
                                     "val/) or, with --data_set image_folder, a folder of class sub-folders")


@pytest.mark.slow
def test_gpu_benchmark_script_runs_its_smoke_plan_on_cpu(tmp_path):
    """benchmarks/gpu/run.py runs for real only on a GPU: its CPU smoke plan keeps
    every part of it (table, synthetic photographs, loader, pretrain.py run, summary) working."""
    result = run("benchmarks/gpu/run.py", tmp_path, "--smoke", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["row"] for r in summary["steps"]} == set(BACKEND_NAMES) | {"timm"}  # minkowski where installed
    assert all(r["images_per_s"] > 0 for r in summary["steps"] + summary["loader"])
    assert {r["shards"] for r in summary["loader"]} == {False, True}  # files and shards of the same images
    assert summary["pretrain"]["steps_done"] == 3 and summary["pretrain"]["images_per_s"] > 0
    tests = summary["tests"]  # the exactness tests for the plan's device, run by pytest
    expected = r"\d+ passed" if MINKOWSKI else r"\d+ skipped"
    assert tests["returncode"] == 0 and re.search(expected, tests["result"]), tests
    text = (tmp_path / "summary.md").read_text()
    assert "## Training step" in text and "## Input pipeline" in text and "## pretrain.py" in text
    assert "## Exactness tests on this device" in text
    check = summary["sync_check"]  # the stand-in's synchronisation check, on CPU
    assert check["returncode"] == 0 and "no host synchronisation in" in check["result"], check
    assert "## Host synchronisation in the training steps" in text
    assert (tmp_path / "summary.json").stat().st_size + len(text) < 1_000_000


def test_the_models_never_import_the_weights_package():
    """Layers import downward only: fcmae.weights reads the models, never the other way round."""
    for path in (ROOT / "fcmae" / "models").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) fcmae\.weights", text, re.M), path


def test_no_two_modules_share_a_name():
    """A name says which module is meant (the commands' five-line `python -m` entries excepted:
    they only name the command in fcmae/cli they run)."""
    names = [p.name for p in (ROOT / "fcmae").rglob("*.py") if p.name != "__init__.py"]
    entries = {"export.py", "shards.py", "shrink.py", "reconstruct.py", "bench.py", "curves.py", "embed.py"}
    assert all((ROOT / "fcmae" / name).stat().st_size < 300 for name in entries)  # an entry, not code
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("name", ["export", "shards", "shrink", "reconstruct", "bench", "curves"])
def test_each_command_runs_as_a_module_and_as_a_console_script(name, monkeypatch, capsys):
    # `python -m fcmae.<name>` is runpy's run_module as __main__, done here in this process
    monkeypatch.setattr(sys, "argv", [f"fcmae/{name}.py", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # the module may be imported already
        runpy.run_module(f"fcmae.{name}", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0 and f"usage: python -m fcmae.{name}" in capsys.readouterr().out
    # the console script, as installed
    script = Path(sys.executable).parent / f"fcmae-{name}"
    assert script.is_file(), f"fcmae-{name} is not installed: pip install -e . installs the console scripts"
    result = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"usage: fcmae-{name} " in result.stdout, (result.stdout[:200], result.stderr)
