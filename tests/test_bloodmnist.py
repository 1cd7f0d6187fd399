"""The BloodMNIST label-fraction study (benchmarks/bloodmnist/run.py): the stratified subsets,
and the CI-sized preset end to end through the real pipeline (class folders, pretrain.py, the
export, finetune.py, learning-rate choice on val, test of the chosen runs, report).

The CI preset tests the pipeline only: at 40 images a class and a few epochs the accuracies are
near chance, so nothing is asserted about the gain (docs/evidence.md reports the full study's)."""
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or shared/ inside it); FCMAE_BLOODMNIST names another copy
CANDIDATES = [os.environ.get("FCMAE_BLOODMNIST", ""), ROOT.parent / "shared" / "data" / "bloodmnist.npz",
              ROOT / "shared" / "data" / "bloodmnist.npz"]
NPZ = next((Path(c) for c in CANDIDATES if c and Path(c).is_file()), None)
spec = importlib.util.spec_from_file_location("bloodmnist_run", ROOT / "benchmarks" / "bloodmnist" / "run.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_stratified_subsets_keep_the_class_balance_and_follow_the_seed():
    labels = ["a"] * 852 + ["b"] * 2181 + ["c"] * 7 + ["d"] * 1000
    for fraction in (0.01, 0.1, 0.5, 1.0):
        chosen = study.stratified_subset(labels, fraction, seed=0)
        counts = Counter(labels[i] for i in chosen)
        assert counts == {c: min(n, max(1, round(fraction * n))) for c, n in Counter(labels).items()}
        assert chosen == sorted(set(chosen))  # sorted, no index twice
        assert chosen == study.stratified_subset(labels, fraction, seed=0)  # the seed fixes it
    assert study.stratified_subset(labels, 0.1, seed=0) != study.stratified_subset(labels, 0.1, seed=1)
    assert Counter(labels[i] for i in study.stratified_subset(labels, 0.01, seed=3))["c"] == 1  # never empty
    assert study.stratified_subset(labels, 1.0, seed=5) == list(range(len(labels)))


@pytest.mark.slow
def test_ci_sized_study_runs_end_to_end(tmp_path):
    if NPZ is None:
        message = "bloodmnist.npz not found in ../shared/data (set FCMAE_BLOODMNIST to its path)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    command = [sys.executable, str(ROOT / "benchmarks" / "bloodmnist" / "run.py"), "--npz", str(NPZ),
               "--preset", "ci", "--work", str(tmp_path)]
    # one thread a process, as the other tests' scripts: pytest's other worker shares the cores, and
    # OpenMP threads that wait for a busy core spin (the study took 24 of CI's 32 minutes with two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "results.json").read_text())
    assert summary["images"] == {"train": 320, "val": 320, "test": 320}
    assert len(summary["pretrain_loss"]) == 6
    # pretraining saw the train and val images, without labels
    assert "on 640 images from" in (tmp_path / "logs" / "pretrain.txt").read_text()
    table = summary["table"]
    assert list(table) == ["0.25", "1.0"]
    assert [table[f]["labelled_images"] for f in table] == [80, 320]
    assert summary["subsets"]["0.25/0"] != summary["subsets"]["0.25/1"]
    assert all(len(files) == 80 for key, files in summary["subsets"].items() if key.startswith("0.25"))
    for fraction, seeds in (("0.25", 2), ("1.0", 1)):
        for arm in ("pretrained", "scratch"):
            entry = table[fraction][arm]
            assert len(entry["test_acc1"]) == seeds
            val = entry["val_acc1_by_blr"]
            assert set(val) == {"0.004", "0.016"} and val[f"{entry['blr']:g}"] == max(val.values())
    # test accuracy exists only for the chosen learning rates
    tested = {p.parent.name for p in tmp_path.glob("*/test.json")}
    assert len(tested) == 2 * (2 + 1) and len(list(tmp_path.glob("*/val.json"))) == 2 * 2 * (2 + 1)
    assert all(f"blr{table[n.split('_')[1][8:]][n.split('_')[0]]['blr']:g}" in n for n in tested)
    # the export step wrote the official layout, and the pretrained arm read it
    assert f"loaded the encoder from {tmp_path / 'encoder_fcmae.pt'}" in \
        (tmp_path / "logs" / "pretrained_fraction1.0_seed0_blr0.004.txt").read_text()
    for name in ("accuracy_vs_labels.png", "results.md", "pretrain_loss.png", "reconstructions_start.png",
                 "reconstructions_end.png"):
        assert (tmp_path / "results" / name).is_file(), name


@pytest.mark.parametrize("override, message", [
    ('{"pretrain_epoch": 80}', "--override names ['pretrain_epoch'], which no preset has; the keys are ["),
    ('{pretrain_epochs: 80}', "--override is not valid JSON"),
    ('[80]', "--override must be a JSON object of preset values"),
])
def test_a_bad_override_is_named_before_anything_runs(tmp_path, override, message):
    command = [sys.executable, str(ROOT / "benchmarks" / "bloodmnist" / "run.py"), "--npz", str(tmp_path / "none.npz"),
               "--preset", "ci", "--override", override, "--work", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
