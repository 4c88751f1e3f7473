"""The README's table of variables, generated from Hyperparameters so that it cannot drift.
`python tests/readme_table.py --write` rewrites the table in README.md (after its marker comment);
tests/test_readme.py checks the README holds the current table."""

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


def write_readme(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- variables table")) + 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = variables_table().split("\n")
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(variables_table())
