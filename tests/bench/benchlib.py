"""Shared pieces of the benchmarks: a single-process runtime, timed training steps on random tokens
(throughput does not depend on the data), evaluation throughput, tables and JSON results."""

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

# The smoke preset's dimensions, the MLP's hidden width included: the baseline preset is measured at
# these too, so that a comparison shows what the stack's features cost, not a wider MLP.
SMOKE_SHAPE = {k.upper(): str(tg.PRESETS["smoke"][k]) for k in (
    "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "train_seq_len", "eval_seq_len",
    "train_batch_tokens")}


def hyperparameters(env: dict) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


def runtime(args: tg.Hyperparameters) -> tg.Runtime:
    """One process on CUDA when there is one, else the CPU (bf16 autocast where supported)."""
    return tg.init_runtime(args, {})


class Trainer:
    """A model, its optimizers and EMA, stepping exactly as train() does (training_step + EMA)."""

    def __init__(self, args: tg.Hyperparameters, rt: tg.Runtime, compile_model: bool = False, seed: int = 0):
        self.args, self.rt, self.ctx = args, rt, tg.Context(args, rt)
        torch.manual_seed(seed)
        self.raw = tg.GPT(args, rt.attn_backend).to(rt.device)
        self.optimizers = tg.build_optimizers(self.raw, args, rt.device)
        self.model = torch.compile(self.raw, dynamic=False) if compile_model else self.raw
        self.ema = tg.EMA(self.raw, args.ema_decay) if args.ema_decay > 0 else None
        self.accum, self.local = tg.batch_split(self.ctx)
        self.row_len, self.segment_len = tg.training_layout(args, rt, self.local)
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens_per_step = args.train_batch_tokens

    def batches(self):
        out = []
        for _ in range(self.accum):
            t = torch.randint(0, self.args.vocab_size, (self.local + 1,), generator=self.gen)
            out.append((t[:-1].view(-1, self.row_len).to(self.rt.device), t[1:].view(-1, self.row_len).to(self.rt.device)))
        return out

    def steps(self, n: int, looping: bool = False) -> float:
        """Seconds per step over n steps (the clock starts and ends with the device idle)."""
        self.raw.looping = looping
        batches = [self.batches() for _ in range(n)]
        self.rt.sync()
        t0 = time.perf_counter()
        for b in batches:
            tg.training_step(self.model, self.optimizers, b, self.ctx, self.accum, self.segment_len)
            if self.ema is not None:
                self.ema.update(self.raw)
        self.rt.sync()
        return (time.perf_counter() - t0) / n


def synthetic_tables(vocab_size: int, device) -> tg.ByteTables:
    """One byte per token: evaluation throughput does not depend on the byte counts."""
    return tg.ByteTables(torch.ones(vocab_size, dtype=torch.int64), torch.zeros(vocab_size, dtype=torch.bool),
                         torch.zeros(vocab_size, dtype=torch.bool)).to(device)


def first_tokens(val: tg.ValidationSet, n: int) -> tg.ValidationSet:
    return tg.ValidationSet(val.tokens[:n], val.target_bytes[:n], val.byte_source)


def eval_throughput(raw: tg.GPT, args: tg.Hyperparameters, rt: tg.Runtime, n_tokens: int,
                    ttt_tokens: int | None = None) -> dict:
    """Tokens per second of the sliding window (n_tokens) and of score-first TTT (the first ttt_tokens,
    default n_tokens; when TTT_ENABLED) on random tokens, scored as score_artifact scores."""
    gen = torch.Generator().manual_seed(1)
    val = torch.randint(0, args.vocab_size, (n_tokens + 1,), generator=gen)
    val[0] = tg.BOS_ID
    val = tg.ValidationSet.from_tables(val, synthetic_tables(args.vocab_size, rt.device))
    ctx = tg.Context(args, rt)
    model = tg.compile_for_scoring(copy.deepcopy(raw), rt)  # as score_artifact scores the artifact's model
    model.looping = args.num_loops > 0
    out = {}
    if rt.compile:  # compile the scoring and TTT graphs first (counted apart: the run compiles them once)
        t0 = time.perf_counter()
        tg.evaluate(model, val, ctx)
        if args.ttt_enabled:
            tg.evaluate_ttt(model, first_tokens(val, 2 * args.ttt_chunk_tokens + 1), ctx)
        out["compile_seconds"] = time.perf_counter() - t0
    r = tg.evaluate(model, val, ctx, stride=args.eval_stride)
    out["sliding_tokens_per_s"] = r.tokens / r.seconds
    if args.ttt_enabled:
        r, _ = tg.evaluate_ttt(model, first_tokens(val, (ttt_tokens or n_tokens) + 1), ctx)
        out["ttt_tokens_per_s"] = r.tokens / r.seconds
    return out


def median(xs):
    return statistics.median(xs)


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def save(path: str | Path, doc: dict) -> None:
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__, **doc}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tg.atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
