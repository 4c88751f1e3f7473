"""Draw finished runs side by side in one PNG:

    python records/plot_runs.py runs/a runs/b --out compare.png
    python records/plot_runs.py records/pr2005 runs/mine_1337 runs/mine_42

Four panels: (1) the training loss against the step and against the training seconds, with the
step at which each switch turned on marked (depth recurrence `looping`, `late_qat`); (2) the val_bpb
of every evaluation stage the run has (pre-quant, round trip, sliding window, TTT); (3) TTT's bpb
per chunk (or per document batch) in the order TTT scored them; (4) the artifact's bytes, model and
code, against the 16,000,000-byte cap.

Each argument is a run's OUT_DIR (train.log, submission.json, ttt_chunks.jsonl) or a records folder
(train_seed<S>.log files, submission.json). Runs whose hyperparameter dumps differ only in the seed
(SEED, RUN_ID, OUT_DIR, the submission's names) are one configuration: drawn as the mean over the
seeds with a band from the lowest to the highest. What a log lacks (a stage it never reached, a
truncated last line) is left out with a warning that names it; a folder that is not there or holds
no log is one `error:` line and exit status 2. The PNG is written to a temporary file and renamed.
"""

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from significance import UsageError  # noqa: E402

CAP_BYTES = 16_000_000  # the challenge's cap (train_gpt.CAP_BYTES; importing the script would pull in torch)
FIGSIZE_IN, DPI = (16, 10), 100  # 1600 x 1000 pixels
# Differ between the seeds of one configuration without changing what is trained.
PER_RUN = {"SEED", "RUN_ID", "OUT_DIR", "SUBMISSION_NAME", "AUTHOR", "GITHUB_ID", "BLURB"}
SWITCH_STYLES = {"looping": "--", "late_qat": ":"}  # any other switch: dash-dot
STAGE_LABELS = {"pre_quant": "pre-quant", "roundtrip": "round trip", "sliding": "sliding", "ttt": "TTT"}

DUMP_LINE = re.compile(r"^  ([A-Z][A-Z0-9_]*)=(.*)  \((?:default|env|preset [\w-]+)\)$")
SOURCE_START = "=" * 40 + " source " + "=" * 40
SOURCE_END = "=" * 88
TRAIN_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:(\d+)ms step_avg:\S+ms lr_mult:\S+( \w+:\S+)*$")
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+) train_time:\d+ms ")
SWITCH_LINE = re.compile(r"^(\w+): on at step (\d+) \(lr_mult")
EXACT_LINE = re.compile(r"^(\S+)_exact val_loss:\S+ val_bpb:(\S+)$")
BYTES_LINES = {"total": re.compile(r"^Total submission size \S+: (\d+) bytes$"),
               "model": re.compile(r"^Serialized model \S+: (\d+) bytes$"),
               "code": re.compile(r"^Code size: (\d+) bytes")}


@dataclass
class Run:
    """What one run's log (and its folder's other files) say, in the units the panels draw."""
    name: str
    log: Path
    settings: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_loss, training seconds)
    switches: dict[str, int] = field(default_factory=dict)  # name -> step it turned on at
    stages: dict[str, float] = field(default_factory=dict)  # stage -> val_bpb, in the order they ran
    chunks: list[tuple[int, float]] = field(default_factory=list)  # (chunk or batch index, bpb)
    chunk_key: str = "chunk"
    bytes: dict[str, int] = field(default_factory=dict)  # total, model, code

    def seconds_at(self, step: float) -> float:
        """Training seconds at a step, interpolated between the logged steps."""
        import numpy as np

        return float(np.interp(step, [s for s, _, _ in self.steps], [t for _, _, t in self.steps]))


def stage_of(tag: str) -> str:
    """The stage a `<tag>_exact` line scores: final_<scheme>_roundtrip, ..._sliding_window, legal_ttt."""
    if tag.endswith("_roundtrip"):
        return "roundtrip"
    if tag.endswith("_sliding_window"):
        return "sliding"
    return "ttt" if tag == "legal_ttt" else tag


def read_log(log: Path, name: str, warn) -> Run:
    """Every curve and number of a train.log; the source block it holds is skipped."""
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:  # no newline after the last line: the run was cut off while writing it
        warn(f"{log}: line {len(lines)} truncated, ignored")
        lines.pop()
    run = Run(name, log)
    in_source, after_final = False, False
    for n, line in enumerate(lines, 1):
        if in_source or line == SOURCE_START:
            in_source = line != SOURCE_END
            continue
        if m := DUMP_LINE.match(line):
            run.settings[m.group(1)] = m.group(2)
        elif m := TRAIN_LINE.match(line):
            run.steps.append((int(m.group(1)), float(m.group(2)), int(m.group(3)) / 1000))
        elif m := VAL_LINE.match(line):
            if after_final:  # the evaluation of the final weights, before quantisation
                run.stages["pre_quant"] = float(m.group(2))
                after_final = False
        elif line.startswith("step:"):
            warn(f"{log}: line {n} malformed, ignored")
        elif line.startswith("final weights:"):
            after_final = True
        elif m := SWITCH_LINE.match(line):
            run.switches.setdefault(m.group(1), int(m.group(2)))
        elif m := EXACT_LINE.match(line):
            run.stages[stage_of(m.group(1))] = float(m.group(2))
        else:
            for key, pattern in BYTES_LINES.items():
                if m := pattern.match(line):
                    run.bytes[key] = int(m.group(1))
    return run


def read_chunks(path: Path, warn) -> tuple[list[tuple[int, float]], str]:
    """(index, bpb) of every line of a ttt_chunks.jsonl; the index is `chunk` or `batch`."""
    points, key = [], "chunk"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            doc = json.loads(line)
            key = "chunk" if "chunk" in doc else "batch"
            points.append((int(doc[key]), float(doc["bpb"])))
        except (ValueError, KeyError, TypeError):
            warn(f"{path}: line {n} {'truncated' if not line.rstrip().endswith('}') else 'malformed'}, ignored")
    return points, key


def expected_stages(settings: dict[str, str]) -> list[str]:
    """The stages a run with these settings reaches when it finishes (all of them without a dump)."""
    stages = ["pre_quant", "roundtrip"]
    if settings.get("EVAL_STRIDE", "1") != "0":
        stages.append("sliding")
    if settings.get("TTT_ENABLED", "True") in ("True", "1"):
        stages.append("ttt")
    return stages


def check_complete(run: Run, where: str, chunks_file: Path | None, warn) -> None:
    """A warning for each thing a finished run of these settings would have and this one lacks."""
    if not run.steps:
        warn(f"{run.log}: no training step lines; its loss curve is left out")
    for stage in expected_stages(run.settings):
        if stage not in run.stages:
            warn(f"{run.log}: no {STAGE_LABELS[stage]} score (the log ends before it)")
    if "total" not in run.bytes:
        warn(f"{run.log}: no artifact size line; left out of the bytes panel")
    if "ttt" in expected_stages(run.settings) and not run.chunks:
        warn(f"{where}: no TTT chunks ({'ttt_chunks.jsonl missing' if chunks_file else 'a records folder keeps none'})")


def fill_from_submission(run: Run, sub: dict) -> None:
    """What a cut-off log lacks and submission.json has (the scores of each stage, the bytes)."""
    for stage, bpb in (sub.get("stages") or {}).items():
        if isinstance(bpb, (int, float)):
            run.stages.setdefault(stage, float(bpb))
    for key in ("total", "model", "code"):
        if isinstance(sub.get(f"bytes_{key}"), int):
            run.bytes.setdefault(key, sub[f"bytes_{key}"])


def read_folder(folder: Path, warn) -> list[Run]:
    """The runs of a run's OUT_DIR (one) or of a records folder (one per train_seed<S>.log)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (give a run's OUT_DIR or a records folder)")
    sub_path = folder / "submission.json"
    try:
        sub = json.loads(sub_path.read_text(encoding="utf-8")) if sub_path.is_file() else {}
    except ValueError:
        warn(f"{sub_path}: not valid JSON, ignored")
        sub = {}
    if (folder / "train.log").is_file():
        run = read_log(folder / "train.log", folder.name, warn)
        chunks_file = folder / "ttt_chunks.jsonl"
        if chunks_file.is_file():
            run.chunks, run.chunk_key = read_chunks(chunks_file, warn)
        fill_from_submission(run, sub)
        check_complete(run, str(folder), chunks_file, warn)
        return [run]
    logs = sorted(folder.glob("train_seed*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not logs:
        raise UsageError(f"{folder}: no train.log and no train_seed<S>.log files; "
                         "give a run's OUT_DIR or a records folder")
    runs = []
    by_seed = {r.get("seed"): r for r in sub.get("runs", []) if isinstance(r, dict)}
    for log in logs:
        seed = log.stem.removeprefix("train_seed")
        run = read_log(log, f"{folder.name}/seed{seed}", warn)
        fill_from_submission(run, by_seed.get(int(seed) if seed.isdigit() else seed, {}))
        check_complete(run, str(log), None, warn)
        runs.append(run)
    return runs


@dataclass
class Group:
    """Runs of one configuration (seeds): drawn as their mean with a min..max band."""
    label: str
    runs: list[Run]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by their settings apart from PER_RUN, in the order given. A run without a
    hyperparameter dump is a group of its own."""
    groups, keys = [], []
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.settings.items() if k not in PER_RUN)) if run.settings else id(run)
        if key in keys:
            groups[keys.index(key)].runs.append(run)
        else:
            keys.append(key)
            groups.append(Group(run.name, [run]))
    for g in groups:
        if len(g.runs) > 1:
            seeds = ", ".join(r.settings.get("SEED", "?") for r in g.runs)
            prefix = os.path.commonprefix([r.name for r in g.runs]).rstrip("/_-") or g.runs[0].name
            g.label = f"{prefix} ({len(g.runs)} seeds: {seeds})"
    return groups


def band(curves: list[tuple[list[float], list[float]]]):
    """(x, mean, low, high) of curves y(x) on the x values of all of them up to where the shortest ends."""
    import numpy as np

    end = min(xs[-1] for xs, _ in curves)
    grid = np.unique(np.concatenate([np.asarray(xs, dtype=float) for xs, _ in curves]))
    grid = grid[grid <= end]
    ys = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def draw_curves(ax, color, label, curves) -> None:
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return
    x, mean, low, high = band(curves)
    ax.plot(x, mean, color=color, label=label, lw=1.4)
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)


def mark_switches(ax, color, group: Group, in_seconds: bool) -> None:
    """A line at the mean step (or second) where each switch turned on, named at the top."""
    for name in sorted({n for r in group.runs for n in r.switches}):
        at = [r.seconds_at(r.switches[name]) if in_seconds else r.switches[name]
              for r in group.runs if name in r.switches and r.steps]
        if at:
            x = sum(at) / len(at)
            ax.axvline(x, color=color, ls=SWITCH_STYLES.get(name, "-."), lw=1.0)
            ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=8, color=color)


def spread(values: list[float]) -> tuple[float, float, float]:
    mean = sum(values) / len(values)
    return mean, mean - min(values), max(values) - mean


def draw(groups: list[Group], out: Path) -> None:
    """The four panels, written to `out` atomically."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("matplotlib is not installed (pip install -r requirements.txt)") from None
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE_IN, dpi=DPI)
    (loss_step, loss_time, stages_ax), (chunks_ax, bytes_ax, notes_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stage_order = [s for s in STAGE_LABELS if any(s in r.stages for g in groups for r in g.runs)]
    stage_order += sorted({s for g in groups for r in g.runs for s in r.stages} - set(stage_order))
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        draw_curves(loss_step, color, g.label, [([s for s, _, _ in r.steps], [v for _, v, _ in r.steps])
                                                for r in g.runs])
        draw_curves(loss_time, color, g.label, [([t for _, _, t in r.steps], [v for _, v, _ in r.steps])
                                                for r in g.runs])
        mark_switches(loss_step, color, g, in_seconds=False)
        mark_switches(loss_time, color, g, in_seconds=True)
        xs, ys, errs = [], [], ([], [])
        for x, stage in enumerate(stage_order):
            values = [r.stages[stage] for r in g.runs if stage in r.stages]
            if values:
                mean, lo, hi = spread(values)
                xs.append(x + 0.08 * (i - (len(groups) - 1) / 2))
                ys.append(mean)
                errs[0].append(lo)
                errs[1].append(hi)
        if xs:
            stages_ax.errorbar(xs, ys, yerr=errs, color=color, marker="o", capsize=3, label=g.label)
            for x, y in zip(xs, ys):
                stages_ax.annotate(f"{y:.4f}", (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7,
                                   color=color)
        draw_curves(chunks_ax, color, g.label, [([c for c, _ in r.chunks], [b for _, b in r.chunks])
                                                for r in g.runs])
        sized = [r for r in g.runs if "total" in r.bytes]
        if sized:
            total, lo, hi = spread([r.bytes["total"] for r in sized])
            model = sum(r.bytes.get("model", r.bytes["total"]) for r in sized) / len(sized)
            bytes_ax.barh(i, model, color=color, label="model" if i == 0 else None)
            bytes_ax.barh(i, total - model, left=model, color=color, alpha=0.45, label="code" if i == 0 else None)
            if len(sized) > 1:
                bytes_ax.errorbar(total, i, xerr=[[lo], [hi]], color="black", capsize=3)
            bytes_ax.annotate(f"{total:,.0f}", (total, i), textcoords="offset points", xytext=(4, 0), va="center",
                              fontsize=8)
    loss_step.set(title="training loss by step (--: recurrence on, ..: late QAT on)", xlabel="step",
                  ylabel="train_loss")
    loss_time.set(title="training loss by training seconds", xlabel="seconds", ylabel="train_loss")
    stages_ax.set(title="val_bpb of each evaluation stage", ylabel="val_bpb")
    stages_ax.set_xticks(range(len(stage_order)), [STAGE_LABELS.get(s, s) for s in stage_order])
    keys = {r.chunk_key for g in groups for r in g.runs if r.chunks}
    chunks_ax.set(title="TTT bpb per " + (" / ".join(sorted(keys)) or "chunk") + ", in scoring order",
                  xlabel=" / ".join(sorted(keys)) or "chunk", ylabel="bpb")
    bytes_ax.axvline(CAP_BYTES, color="red", lw=1.2)
    bytes_ax.annotate(f"cap {CAP_BYTES:,}", (CAP_BYTES, 1), xycoords=("data", "axes fraction"), rotation=90,
                      va="top", ha="right", fontsize=8, color="red")
    bytes_ax.set(title="artifact bytes (model + code)", xlabel="million bytes", xlim=(0, CAP_BYTES * 1.08))
    bytes_ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e6:g}")
    bytes_ax.set_yticks(range(len(groups)), [g.label for g in groups], fontsize=8)
    bytes_ax.invert_yaxis()
    for ax in (loss_step, loss_time, stages_ax, chunks_ax, bytes_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right" if ax is bytes_ax else "best")
    notes_ax.axis("off")
    notes_ax.text(0, 1, "\n".join(f"{g.label}:\n" + "\n".join(f"  {r.log}" for r in g.runs) for g in groups),
                  va="top", fontsize=8, family="monospace", wrap=True)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def plot_runs(folders: list[Path], out: Path, warn) -> list[Group]:
    """Read every folder, group the runs by configuration and draw them into `out`."""
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for --out")
    runs = [run for folder in folders for run in read_folder(folder, warn)]
    groups = group_runs(runs)
    draw(groups, out)
    return groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="run OUT_DIRs and/or records folders")
    ap.add_argument("--out", type=Path, default=Path("compare.png"), help="the PNG to write (compare.png)")
    args = ap.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr)

    try:
        groups = plot_runs(args.folders, args.out, warn)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(groups)} configuration(s), {sum(len(g.runs) for g in groups)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
