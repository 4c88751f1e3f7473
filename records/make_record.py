"""Turn finished run directories (one per seed) into a records folder ready for a pull request:

    python records/make_record.py --out records/2026-11-25_my_idea runs/seed1337 runs/seed42 runs/seed2025 \
        --name "My idea" --author "A. Person" --github-id aperson --blurb "what changed, in one line"

The folder gets `train_gpt.py` (the code the runs counted: the self-extracting copy when they used
SELF_EXTRACT=1, with the readable source beside it as `train_gpt_readable.py`), `train_seed<S>.log`
for every run, `submission.json` (the mean score over the seeds, every seed's numbers, the worst
bytes and times), `requirements.txt`, `runs.png` (the seeds' training curves, stage scores, TTT
chunks and bytes, drawn by plot_runs.py) and a README skeleton with the results table, the
picture, the settings and the launch command. The runs must come from the same script and the same
settings, apart from the seed; the script is taken from the logs (each log holds the source and its
sha256), so what is submitted is exactly what ran. The folder is built beside its destination and renamed into place.
"""

import argparse
import ast
import base64
import datetime
import hashlib
import json
import lzma
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plot_runs import PER_RUN, plot_runs  # noqa: E402
from significance import UsageError, mean_std, read_run  # noqa: E402
from train_gpt import without_docs  # noqa: E402  (what the packed copy holds)

ROOT = Path(__file__).resolve().parents[1]
DUMP_LINE = re.compile(r"^  ([A-Z][A-Z0-9_]*)=(.*)  \((default|env|preset [\w-]+)\)$")
SCRIPT_LINE = re.compile(r"^script: \S+ sha256:([0-9a-f]{64}) bytes:(\d+)$", re.M)
SOURCE_START = "=" * 40 + " source " + "=" * 40 + "\n"
SOURCE_END = "\n" + "=" * 88 + "\n"
PACKED_SOURCE = re.compile(r'b85decode\("([^"]*)"\)')


def settings_of(log_text: str, log: Path) -> dict[str, tuple[object, str]]:
    """{NAME: (value, source)} from the hyperparameter dump at the top of a train.log."""
    settings = {}
    for line in log_text.splitlines():
        m = DUMP_LINE.match(line)
        if m:
            settings[m.group(1)] = (ast.literal_eval(m.group(2)), m.group(3))
        elif settings:
            break
    if not settings:
        raise UsageError(f"{log}: no hyperparameter dump at the top; is this a train_gpt.py log?")
    return settings


def source_of(log_text: str, log: Path) -> str:
    """The script's source as the log recorded it, checked against the logged sha256."""
    m = SCRIPT_LINE.search(log_text)
    start = log_text.find(SOURCE_START)
    end = log_text.find(SOURCE_END, start + len(SOURCE_START))
    if not m or start < 0 or end < 0:
        raise UsageError(f"{log}: the script's source or its sha256 line is missing")
    source = log_text[start + len(SOURCE_START):end]
    if hashlib.sha256(source.encode()).hexdigest() != m.group(1):
        raise UsageError(f"{log}: the source in the log does not match its sha256 (the log was edited?)")
    return source


def load_run(run_dir: Path) -> dict:
    log = run_dir / "train.log"
    sub = run_dir / "submission.json"
    for f in (log, sub):
        if not f.is_file():
            raise UsageError(f"{run_dir}: no {f.name}; give the OUT_DIR of a finished run")
    text = log.read_text(encoding="utf-8")
    return {"dir": run_dir, "log": log, "text": text, "score": read_run(log), "settings": settings_of(text, log),
            "source": source_of(text, log), "submission": json.loads(sub.read_text(encoding="utf-8"))}


def check_same_system(runs: list[dict]) -> None:
    first = runs[0]
    seeds = [r["submission"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"the runs repeat a seed ({seeds}); each run must have its own SEED")
    for r in runs[1:]:
        if r["source"] != first["source"]:
            raise UsageError(f"{r['dir']} ran a different train_gpt.py than {first['dir']} (sha256 differs)")
        names = (set(r["settings"]) | set(first["settings"])) - PER_RUN
        differ = sorted(k for k in names if r["settings"].get(k, (None,))[0] != first["settings"].get(k, (None,))[0])
        if differ:
            raise UsageError(f"{r['dir']} and {first['dir']} differ in {', '.join(differ)}; "
                             "a record's runs may differ only in SEED")


def shipped_code(run: dict) -> tuple[bytes, str | None]:
    """(code counted by the runs, readable source when the counted code is the packed copy)."""
    if not run["settings"]["SELF_EXTRACT"][0]:
        return run["source"].encode("utf-8"), None
    packed = run["dir"] / "train_gpt_packed.py"
    if not packed.is_file():
        raise UsageError(f"{run['dir']}: SELF_EXTRACT=1 but train_gpt_packed.py is missing")
    code = packed.read_bytes()
    m = PACKED_SOURCE.search(code.decode("ascii", errors="replace"))
    # the packed copy holds the logged source without docstrings and comments: compare syntax trees
    same = m and ast.dump(ast.parse(without_docs(lzma.decompress(base64.b85decode(m.group(1))).decode("utf-8")))) \
        == ast.dump(ast.parse(without_docs(run["source"])))
    if not same:
        raise UsageError(f"{packed} does not unpack to the code of the source in {run['log']}")
    return code, run["source"]


def launch_command(run: dict) -> str:
    """The command that reproduces a run: PRESET plus every variable the run set itself."""
    settings = run["settings"]
    env = [f"PRESET={settings['PRESET'][0]}"]
    for name, (value, source) in sorted(settings.items()):
        if source == "env" and name not in PER_RUN | {"PRESET"}:
            env.append(f"{name}={int(value) if isinstance(value, bool) else value}")
    hardware = run["submission"].get("hardware", "")
    nproc = int(hardware.split("x")[0]) if hardware[:1].isdigit() else 8
    return " ".join(env + ["SEED=<seed>", f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py"])


def merged_submission(runs: list[dict], meta: dict) -> dict:
    subs = [r["submission"] for r in runs]
    losses = [s["val_loss"] for s in subs]
    bpbs = [s["val_bpb"] for s in subs]
    loss_mean, loss_std = mean_std(losses) if len(runs) > 1 else (losses[0], 0.0)
    bpb_mean, bpb_std = mean_std(bpbs) if len(runs) > 1 else (bpbs[0], 0.0)
    doc = dict(subs[0])
    doc.update({k: v for k, v in meta.items() if v})
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc.update(val_loss=loss_mean, val_loss_std=loss_std, val_bpb=bpb_mean, val_bpb_std=bpb_std,
               bytes_total=max(s["bytes_total"] for s in subs), bytes_model=max(s["bytes_model"] for s in subs),
               bytes_code=max(s["bytes_code"] for s in subs), train_seconds=max(s["train_seconds"] for s in subs),
               seed=[s["seed"] for s in subs], steps=[s["steps"] for s in subs],
               step_avg_ms=sum(s["step_avg_ms"] for s in subs) / len(subs))
    doc["runs"] = [{"seed": s["seed"], "val_loss": s["val_loss"], "val_bpb": s["val_bpb"],
                    "steps": s["steps"], "train_seconds": s["train_seconds"], "eval_seconds": s["eval_seconds"],
                    "bytes_total": s["bytes_total"], "stages": s.get("stages", {})} for s in subs]
    doc["eval_seconds"] = {stage: max(s["eval_seconds"].get(stage, 0.0) for s in subs)
                           for stage in subs[0]["eval_seconds"]}
    doc["compliance"] = {}
    for key, first in subs[0]["compliance"].items():  # a flag holds only if it holds for every seed
        values = [s["compliance"].get(key) for s in subs]
        doc["compliance"][key] = all(v is True for v in values) if all(isinstance(v, bool) for v in values) else first
    doc["hyperparameters"] = {k: v for k, v in subs[0]["hyperparameters"].items() if k not in PER_RUN}
    return doc


def readme_text(doc: dict, runs: list[dict], command: str, packed: bool) -> str:
    rows = ["| seed | steps | train s | eval s | pre-quant | round trip | sliding | TTT | bytes total |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        st = r["stages"]
        cell = [f"{st[k]:.4f}" if isinstance(st.get(k), (int, float)) else "-"
                for k in ("pre_quant", "roundtrip", "sliding", "ttt")]
        rows.append(f"| {r['seed']} | {r['steps']} | {r['train_seconds']:.1f} | {sum(r['eval_seconds'].values()):.1f} | "
                    + " | ".join(cell) + f" | {r['bytes_total']:,} |")
    settings = runs[0]["settings"]
    changed = [f"| `{k}` | `{v!r}` | {src} |" for k, (v, src) in sorted(settings.items())
               if src != "default" and k not in PER_RUN]
    files = ["- `train_gpt.py`: the code counted in `bytes_code`"
             + (" (the self-extracting copy; `train_gpt_readable.py` is the same source, readable)" if packed else ""),
             "- `train_seed<S>.log`: every run's full log (settings, versions, source, every line)",
             "- `submission.json`: the mean over the seeds and every seed's numbers",
             "- `runs.png`: the picture above (`python records/plot_runs.py <run folders> --out runs.png`)",
             "- `requirements.txt`: the Python packages (flash-attn for GPU: see the project README)"]
    return "\n".join([
        f"# {doc.get('name') or 'TODO: name'}",
        "",
        doc.get("blurb") or "TODO: one paragraph: what this submission changes and why it helps.",
        "",
        f"**val_bpb {doc['val_bpb']:.4f}** (mean of {len(runs)} seeds, std {doc['val_bpb_std']:.4f}; "
        f"val_loss {doc['val_loss']:.4f} nats), artifact at most {doc['bytes_total']:,} bytes "
        f"({doc['bytes_model']:,} model + {doc['bytes_code']:,} code), on {doc.get('hardware', '?')}.",
        "",
        "## Results",
        "",
        *rows,
        "",
        "Significance against the current record (the challenge asks for 0.005 nats at p < 0.01):",
        "`python records/significance.py --record-val-bpb <record> train_seed*.log`",
        "",
        "![training loss by step and by time, val_bpb of each stage, TTT bpb per chunk, artifact bytes; "
        "mean over the seeds, band min..max](runs.png)",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Settings that differ from the script's defaults",
        "",
        "| variable | value | from |",
        "|---|---|---|",
        *changed,
        "",
        "## Files",
        "",
        *files,
        "",
        "## Notes",
        "",
        "TODO: what was tried, what did not work, anything a reviewer should know.",
        "",
    ])


def make_record(run_dirs: list[Path], out: Path, meta: dict, force: bool = False) -> Path:
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another --out or pass --force to replace it")
    runs = [load_run(d) for d in run_dirs]
    check_same_system(runs)
    code, readable = shipped_code(runs[0])
    doc = merged_submission(runs, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "train_gpt.py").write_bytes(code)
        if readable is not None:
            (tmp / "train_gpt_readable.py").write_text(readable, encoding="utf-8")
        for r in runs:
            shutil.copyfile(r["log"], tmp / f"train_seed{r['submission']['seed']}.log")
        plot_runs(run_dirs, tmp / "runs.png", lambda msg: print(f"warning: {msg}", file=sys.stderr))
        (tmp / "submission.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(ROOT / "requirements.txt", tmp / "requirements.txt")
        (tmp / "README.md").write_text(readme_text(doc, runs, launch_command(runs[0]), readable is not None),
                                       encoding="utf-8")
        old = out.with_name(f".{out.name}.replaced") if out.exists() else None
        if old:  # --force: the previous folder stays whole until the new one is in place
            out.rename(old)
        tmp.rename(out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="OUT_DIR of each finished run (one per seed)")
    ap.add_argument("--out", type=Path, required=True, help="the records folder to create")
    ap.add_argument("--name", default="", help="submission name (default: the runs' SUBMISSION_NAME or preset)")
    ap.add_argument("--author", default="")
    ap.add_argument("--github-id", default="")
    ap.add_argument("--blurb", default="")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    meta = {"name": args.name, "author": args.author, "github_id": args.github_id, "blurb": args.blurb}
    try:
        out = make_record(args.runs, args.out, meta, args.force)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
