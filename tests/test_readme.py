"""The README says what the code does: the variables table is generated from Hyperparameters, the
Quick start's sample command builds the data where the smoke preset looks for it, and .ci/run runs
the Quick start's test command."""

import re
import subprocess

from conftest import ROOT
from readme_table import variables_table
from train_gpt import HOW_TO_GET_DATA, PRESETS

README = (ROOT / "README.md").read_text(encoding="utf-8")


def quick_start_blocks() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_variables_table_is_current():
    assert variables_table() in README, "README table is stale: run python tests/readme_table.py --write"


def test_quick_start_commands():
    run, test = quick_start_blocks()[:2]
    build = re.search(r"python data/build_shards.py (.*?) &&", run).group(1)
    assert f"--out {PRESETS['smoke']['data_path'].removeprefix('./')}" in build
    assert build in HOW_TO_GET_DATA  # the error message for missing data gives the same command
    assert "PRESET=smoke torchrun --standalone --nproc_per_node=2 train_gpt.py" in run
    assert "pip install -r requirements.txt" in run and test.strip().endswith("python -m pytest -q tests")


def test_ci_runs_the_readme_test_command():
    awk = re.search(r"cmd=\$\(awk '(.*?)' README.md\)", (ROOT / ".ci/run").read_text()).group(1)
    out = subprocess.run(["awk", awk, str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout
    assert out.strip() == quick_start_blocks()[1].strip()
