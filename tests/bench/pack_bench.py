"""Packing benchmark: the model bytes of a preset's SIZE_CHECK stand-in weights under each way of
packing them. Not collected by pytest.

    python tests/bench/pack_bench.py                  # pr1855 at full size, about 12 minutes on 2 CPU cores
    python tests/bench/pack_bench.py --quick          # tiny, seconds (the tests run this)
    python tests/bench/pack_bench.py --tail 0         # normal stand-in weights instead of the preset's

Rows: the order-0 entropy of the rounded integers, role by role (no coder that sees each value
alone does better); one byte-shuffled brotli-11 stream (the seeds' packing); the integers grouped
by role (PACK_GROUPS) with brotli-11 and with zpaq-5; and grouped with zpaq-5 and the preset's
PACK_SORTED_ROLES. Every artifact is read back and compared with what was packed. Seconds are
pack and unpack on this machine. Writes tests/bench/results/pack_bench.json (or --out).
"""

import argparse
import sys
import time

import numpy as np
import torch
from benchlib import ROOT, save, tg


def entropy_bytes(q: dict) -> float:
    """Sum over roles of n * H(values of the role), in bytes."""
    roles: dict[str, list] = {}
    for name, t in q.items():
        roles.setdefault(tg.role_of(name), []).append(t.reshape(-1).to(torch.int16) + 128)
    total = 0.0
    for parts in roles.values():
        counts = np.bincount(torch.cat(parts).numpy(), minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        total += -(counts[counts > 0] * np.log2(p)).sum() / 8
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pr1855")
    ap.add_argument("--tail", type=float, default=None, help="SIZE_CHECK_TAIL (default: the preset's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "tests/bench/results/pack_bench.json"))
    a = ap.parse_args()
    env = {"PRESET": a.preset}
    if a.tail is not None:
        env["SIZE_CHECK_TAIL"] = str(a.tail)
    if a.quick:
        env.update(VOCAB_SIZE="1024", NUM_LAYERS="2", MODEL_DIM="256", NUM_LOOPS="0", PARALLEL_LANES_START="-1",
                   PARALLEL_RESIDUAL_START="-1")
    args = tg.Hyperparameters.from_env(env)
    model = tg.GPT(args)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(tg.stand_in(p.shape, args))
    qstate = tg.quantize_state_dict(model.state_dict(), args)
    meta = tg.artifact_meta(args, tg.run_switches(args))
    sorted_roles = tuple(filter(None, args.pack_sorted_roles.split(",")))
    level = 1 if a.quick else -1
    plain, ordered = tg.group_rows(qstate["q"], ()), tg.group_rows(qstate["q"], sorted_roles)
    ways = [("one stream, brotli", "brotli", None),
            ("grouped, brotli", "brotli", plain),
            ("grouped, zpaq", "zpaq", plain),
            (f"grouped, zpaq, rows sorted in {len(sorted_roles)} roles", "zpaq", ordered)]
    rows = [dict(packing="order-0 entropy of the integers alone", bytes=round(entropy_bytes(qstate["q"])))]
    print(f"{a.preset}{' (quick)' if a.quick else ''}, stand-in tail {args.size_check_tail:g}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    print(f"  {rows[0]['packing']:45s} {rows[0]['bytes']:>12,d}", flush=True)
    for label, compressor, grouping in ways:
        t0 = time.perf_counter()
        blob = tg.pack_artifact(qstate, meta, compressor, level, args.byte_shuffle, grouping)
        t1 = time.perf_counter()
        _, read = tg.unpack_artifact(blob)
        t2 = time.perf_counter()
        assert all(torch.equal(read[s][n], qstate[s][n]) for s in tg.SECTIONS for n in qstate[s]), label
        rows.append(dict(packing=label, bytes=len(blob), pack_s=round(t1 - t0, 1), unpack_s=round(t2 - t1, 1)))
        print(f"  {label:45s} {len(blob):>12,d}  pack {t1 - t0:6.1f}s  unpack {t2 - t1:6.1f}s", flush=True)
    save(a.out, dict(preset=a.preset, quick=a.quick, tail=args.size_check_tail, level=level, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
