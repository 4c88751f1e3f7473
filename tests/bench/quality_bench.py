"""Equal-time quality on this machine: the smoke preset (the default stack's features) against the
baseline architecture at the same size, both trained for the same CPU seconds with the same
optimiser, quantisation and evaluation, under torchrun with 2 processes. Not collected by pytest.

    python tests/bench/quality_bench.py                       # 2 x the smoke preset's 150 s, ~7 minutes
    python tests/bench/quality_bench.py --seconds 60 --seeds 1337 42
    python tests/bench/quality_bench.py --quick               # tiny, seconds (the tests run this)

"Baseline architecture" = the smoke preset with every architecture feature switched back to the
naive baseline's (relu2, QK gain 1.5, full RoPE, no LN scale, XSA, gates, gated skips or
recurrence), at the same size (MLP width included).
The runs alternate (stack, baseline, stack, ...) so that both see the same machine load. Prints a
table (pre-quant, round-trip and final TTT val_bpb, steps) and writes
tests/bench/results/quality_bench.json (or --out).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, print_table, save

BASELINE_ARCHITECTURE = dict(MLP_ACT="relu2", QK_GAIN_INIT=1.5, ROPE_DIMS=0, LN_SCALE=0, XSA_LAST_N=0, GATED_ATTN="0",
                             SKIP_GATES=0, NUM_LOOPS=0)
QUICK = dict(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32,
             TRAIN_BATCH_TOKENS=512, LOOP_START=0, LOOP_END=1, EVAL_STRIDE=8, TTT_CHUNK_TOKENS=2048,
             TTT_EPOCHS=1, GPTQ_RESERVE_SECONDS=0.5, GPTQ_CALIB_SEQS=8, EVAL_BATCH_SEQS=16, TTT_BATCH_SEQS=8)


def run(env: dict, nproc: int, out_dir: Path) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    full.update({k: str(v) for k, v in env.items()}, OUT_DIR=str(out_dir), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    proc = subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: the run in {out_dir} failed:\n{proc.stderr[-2000:]}")
    sub = json.loads((out_dir / "submission.json").read_text())
    log = (out_dir / "train.log").read_text()
    return {"val_bpb": sub["val_bpb"], "stages": sub["stages"], "steps": sub["steps"],
            "train_seconds": sub["train_seconds"], "params": int(re.search(r"params (\d+)", log).group(1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few seconds each")
    ap.add_argument("--seconds", type=float, default=0, help="training seconds (default: the smoke preset's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable for both runs, e.g. --env DATA_PATH=data/mine (repeatable)")
    ap.add_argument("--out", default="tests/bench/results/quality_bench.json")
    a = ap.parse_args(argv)
    common = {"PRESET": "smoke", **(QUICK if a.quick else {})}
    if a.seconds or a.quick:
        common["MAX_WALLCLOCK_SECONDS"] = a.seconds or 3
    common.update(item.split("=", 1) for item in a.env)
    results = {"default stack": [], "baseline architecture": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for label, extra in (("default stack", {}), ("baseline architecture", BASELINE_ARCHITECTURE)):
                out = Path(tmp) / f"{label.split()[0]}_{seed}"
                r = run({**common, **extra, "SEED": seed}, a.nproc, out)
                results[label].append({"seed": seed, **r})
                print(f"{label} seed {seed}: val_bpb {r['val_bpb']:.4f} in {r['steps']} steps", flush=True)
    rows = []
    for label, runs in results.items():
        mean = lambda key: sum(r["stages"][key] for r in runs) / len(runs)  # noqa: E731
        rows.append([label, runs[0]["params"], sum(r["steps"] for r in runs) / len(runs), mean("pre_quant"),
                     mean("roundtrip"), mean("ttt") if runs[0]["stages"].get("ttt") else float("nan")])
    print(f"equal-time quality: {common.get('MAX_WALLCLOCK_SECONDS', 'the preset')} s of training, "
          f"{a.nproc} processes, seeds {a.seeds}")
    print_table(["variant", "params", "steps", "pre-quant bpb", "round-trip bpb", "TTT bpb"], rows)
    gap = rows[0][-1] - rows[1][-1]
    print(f"default stack minus baseline architecture (TTT val_bpb): {gap:+.4f}")
    save(a.out, {"bench": "quality", "quick": a.quick, "nproc": a.nproc, "seeds": a.seeds,
                 "train_seconds": common.get("MAX_WALLCLOCK_SECONDS"), "results": results, "ttt_bpb_gap": gap})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
