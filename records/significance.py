"""Is a new result significantly better than a record? Reads the train.log of several runs (seeds)
and prints each run's score, their mean and standard deviation, and the one-sided p-value of a
t-test of "the mean val_loss is lower than the record's minus the margin" (the challenge asks for
0.005 nats at p < 0.01).

    python records/significance.py --record-val-loss 1.8243 runs/seed*/train.log
    python records/significance.py --record-val-bpb 1.0805 runs/seed1 runs/seed2 runs/seed3

A run's score is the last `<stage>_exact val_loss:... val_bpb:...` line of its log: the submission's
score (TTT when it ran, else the sliding window, else the round trip). A record given in val_bpb is
turned into nats with the runs' own val_loss / val_bpb ratio, which is fixed by the validation set
and the tokenizer, so that is only right when the record used the same tokenizer.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

EXACT_LINE = re.compile(r"^(\S+)_exact val_loss:(\S+) val_bpb:(\S+)\s*$", re.M)
SEED_LINE = re.compile(r"^\s*SEED=(\d+)\s", re.M)


class UsageError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


def read_run(path: Path) -> dict:
    """Score, stage and seed of one run, from its train.log (or a run directory holding one)."""
    log = path / "train.log" if path.is_dir() else path
    if not log.is_file():
        raise UsageError(f"{path}: no such log (give a train.log or the run directory that holds it)")
    text = log.read_text(encoding="utf-8", errors="replace")
    scores = EXACT_LINE.findall(text)
    if not scores:
        raise UsageError(f"{log}: no final `*_exact val_loss:... val_bpb:...` line; did the run finish?")
    stage, loss, bpb = scores[-1]
    seed = SEED_LINE.search(text)
    return {"log": str(log), "stage": stage, "val_loss": float(loss), "val_bpb": float(bpb),
            "seed": int(seed.group(1)) if seed else None}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by the continued fraction of the incomplete beta function (modified Lentz), using
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def one_sided_test(losses: list[float], record_loss: float, margin: float) -> dict:
    """t-test of H1: mean < record_loss - margin; p = P(T_{n-1} <= t)."""
    n = len(losses)
    mean, std = mean_std(losses)
    target = record_loss - margin
    if std == 0.0:
        t, p = (-math.inf, 0.0) if mean < target else (math.inf, 1.0)
    else:
        t = (mean - target) / (std / math.sqrt(n))
        p = student_t_cdf(t, n - 1)
    return {"n": n, "mean": mean, "std": std, "target": target, "t": t, "df": n - 1, "p_value": p}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="train.log files or run directories (one per seed)")
    record = ap.add_mutually_exclusive_group(required=True)
    record.add_argument("--record-val-loss", type=float, help="the record's val_loss in nats")
    record.add_argument("--record-val-bpb", type=float, help="the record's val_bpb (same tokenizer as the runs)")
    ap.add_argument("--margin", type=float, default=0.005, help="nats the mean must beat the record by (0.005)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level for the verdict (0.01)")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    try:
        runs = [read_run(p) for p in args.runs]
        if len(runs) < 2:
            raise UsageError("a t-test needs at least 2 runs (seeds)")
        losses = [r["val_loss"] for r in runs]
        bpbs = [r["val_bpb"] for r in runs]
        nats_per_bpb = sum(losses) / sum(bpbs)
        if args.record_val_loss is not None:
            record_loss = args.record_val_loss
        else:
            record_loss = args.record_val_bpb * nats_per_bpb
        test = one_sided_test(losses, record_loss, args.margin)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in runs:
        print(f"{r['log']}  seed:{r['seed']}  {r['stage']}  val_loss:{r['val_loss']:.8f}  val_bpb:{r['val_bpb']:.8f}")
    bpb_mean, bpb_std = mean_std(bpbs)
    print(f"runs:{test['n']}  val_loss mean:{test['mean']:.6f} std:{test['std']:.6f}  "
          f"val_bpb mean:{bpb_mean:.6f} std:{bpb_std:.6f}")
    given = (f"val_loss {record_loss:.6f}" if args.record_val_loss is not None else
             f"val_bpb {args.record_val_bpb:.6f} = val_loss {record_loss:.6f} (x{nats_per_bpb:.6f}, the runs' ratio)")
    print(f"record: {given}; to beat by {args.margin:g} nats: mean < {test['target']:.6f}")
    print(f"one-sided t-test: t:{test['t']:.4f} df:{test['df']} p_value:{test['p_value']:.6g}  -> "
          f"{'significant' if test['p_value'] < args.alpha else 'not significant'} at p < {args.alpha:g}")
    if args.json:
        doc = {"runs": runs, "record_val_loss": record_loss, "margin": args.margin, **test,
               "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std}
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
