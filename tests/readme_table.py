"""The README's table of variables, generated from Hyperparameters so that it cannot drift.
Print it with `python tests/readme_table.py`; tests/test_readme.py checks the README holds it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import Hyperparameters  # noqa: E402


def variables_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in Hyperparameters.knobs():
        d = int(f.default) if isinstance(f.default, bool) else f.default
        rows.append(f"| `{f.name.upper()}` | `{d if d != '' else '(empty)'}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(variables_table())
