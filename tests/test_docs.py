"""The documentation: the site builds strictly, every documented command parses, the README's
headline table is the results file's, and what the differences page claims of the code holds."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import doc_commands

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "bloodmnist" / "results"


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: no broken link or anchor, no page missing from the navigation, no warning."""
    try:
        import mkdocs  # noqa: F401
        import material  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must build the documentation, but {err.name} is not installed: pip install -e \".[test]\"")
        pytest.skip(f"{err.name} is not installed (pip install -e \".[docs]\")")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "api" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "create_model" in api and "load_into" in api and "Source" in api


def test_every_page_is_in_the_navigation_and_every_picture_is_a_copy():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages and all(page in nav for page in pages), sorted(p for p in pages if p not in nav)
    for picture in (ROOT / "docs").rglob("*.png"):
        assert not picture.is_symlink(), picture


def test_every_documented_command_parses():
    """Each command that runs a tool of this project names only flags that tool's --help lists."""
    problems, count = doc_commands.check_files(doc_commands.doc_files())
    assert count >= 40, f"only {count} commands found: the checker no longer reads the code blocks"
    assert not problems, "\n".join(problems)


def test_the_checker_reports_a_renamed_flag(tmp_path):
    page = tmp_path / "pretraining.md"
    text = (ROOT / "docs" / "pretraining.md").read_text()
    assert "--knn_every 5" in text
    page.write_text(text.replace("--knn_every 5", "--knn_each 5"))
    problems, _ = doc_commands.check_files([page])
    assert len(problems) == 1 and "pretrain.py has no --knn_each" in problems[0], problems
    assert not doc_commands.check_files([ROOT / "docs" / "pretraining.md"])[0]


def test_the_checker_reads_the_shell_as_a_shell(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("""
```bash
# a comment --not_a_flag
export A=1 && FOO=bar python -m fcmae.curves runs/a --output x.png | tee log; python3 -m venv .venv
accelerate launch --multi_gpu --num_processes 2 pretrain.py \\
    --device cpu --output_dir ... &
srun bash -c "torchrun --nproc_per_node \\$((2 * 4)) finetune.py --no_such_flag 1" &
fcmae-nothing --help
python benchmarks/none.py
```

```python
pretrain.py --ignored_in_python
```
""")
    uses = doc_commands.uses_in(page)
    assert [(u.tool, u.launcher) for u in uses] == [
        ("fcmae.curves", ""), ("pretrain.py", "accelerate launch"), ("finetune.py", "torchrun"),
        ("fcmae-nothing", ""), ("benchmarks/none.py", "")]
    assert uses[0].flags == ["--output"] and uses[1].flags == ["--device", "--output_dir"]
    assert uses[1].launcher_flags == ("--multi_gpu", "--num_processes")
    assert uses[2].launcher_flags == ("--nproc_per_node",)
    problems, _ = doc_commands.check_files([page])
    assert len(problems) == 3, problems
    assert "finetune.py has no --no_such_flag" in problems[0]
    assert "fcmae-nothing is not a console script" in problems[1]
    assert "benchmarks/none.py --help` exited" in problems[2]


# ----- the README's headline table is the results files' --------------------------------------------------

def readme_headline_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Evidence", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, rows = lines[0], lines[2:]
    assert "from scratch, study grid" in header and "lr 1.25e-4" in header and "FCMAE pretrained" in header
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def mean_std(cell):
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", cell)]
    return numbers if numbers else None


def lower_lr_check():
    """{fraction: (mean, std)} of the scratch arm at lr 1.25e-4, from scratch_lr_check.md."""
    found = {}
    for line in (RESULTS / "scratch_lr_check.md").read_text().splitlines():
        match = re.match(r"\| (\d+)% .*?\| [^|]+\| [^|]+\| [^|]*\(([\d.]+) ± ([\d.]+)\) \|", line)
        if match:
            found[int(match.group(1)) / 100] = (float(match.group(2)), float(match.group(3)))
    return found


def test_the_readme_headline_table_matches_the_results():
    table = json.loads((RESULTS / "results.json").read_text())["table"]
    lower = lower_lr_check()
    rows = readme_headline_rows()
    assert len(rows) == len(table) == 3
    for row in rows:
        labels, study, low, pretrained, gain = row
        fraction = float(re.match(r"(\d+)%", labels).group(1)) / 100
        entry = table[str(fraction)]
        images = int(re.search(r"\(([\d,]+) images", labels).group(1).replace(",", ""))
        seeds = int(re.search(r"n=(\d+)", labels).group(1))
        assert images == entry["labelled_images"]
        assert seeds == len(entry["pretrained"]["test_acc1"]) == len(entry["scratch"]["test_acc1"])
        means = []
        for cell, arm in ((study, entry["scratch"]), (pretrained, entry["pretrained"])):
            numbers = mean_std(cell)
            assert numbers[0] == round(arm["mean"], 2), (labels, cell)
            if seeds > 1:
                assert numbers[1] == round(arm["std"], 2), (labels, cell)
            means.append(numbers[0])
        if fraction in lower:
            assert mean_std(low) == list(lower[fraction]), (labels, low)
            best_scratch = max(means[0], lower[fraction][0])
        else:
            assert low == "not run"
            best_scratch = means[0]
        assert float(gain) == pytest.approx(means[1] - best_scratch, abs=0.006), (labels, gain)
    # the prose quotes the same gains
    text = (ROOT / "README.md").read_text()
    assert "by 17.2 points of test top-1 with 1% of the labels and by 9.5 with 10%" in " ".join(text.split())


def test_the_readme_keeps_the_first_hour_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first = "\n".join(lines[:60])
    assert "pip install -e ." in first and "--num_processes 8" in first and "pretrain.py" in first


# ----- what the differences page says of the code ----------------------------------------------------------

def test_the_code_never_empties_the_cache_nor_searches_for_unused_parameters():
    """The official code calls torch.cuda.empty_cache() every step and asks DDP to search for unused
    parameters; neither is done here."""
    files = [*ROOT.glob("*.py"), *(ROOT / "fcmae").rglob("*.py")]
    for path in files:
        text = path.read_text()
        assert "empty_cache" not in text, path
        assert not re.search(r"find_unused_parameters\s*=\s*True", text), path


def test_every_test_the_differences_page_names_exists():
    text = (ROOT / "docs" / "differences.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 15
    for row in rows:
        backing = row.rstrip(" |").rsplit("|", 1)[1]
        named = re.findall(r"`([\w/.]+)(?:::(\w+))?`", backing)
        assert named, row
        for path, test in named:
            assert (ROOT / path).exists(), (path, row[:60])
            if test:
                assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), (path, test)
