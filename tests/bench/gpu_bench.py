"""One-GPU benchmark of the default configuration (PRESET=pr2005) at full size. Not collected by pytest.

    python tests/bench/gpu_bench.py            # on one H100: about 5 minutes, most of it compiling
    python tests/bench/gpu_bench.py --dry      # CPU, tiny sizes, the same code path (the tests run this)
    python tests/bench/gpu_bench.py --profile tests/bench/results/gpu_profile.txt   # + operator tables

Measures, with the per-GPU batch of an 8-GPU run (786,432 / 8 = 98,304 tokens, 48 sequences of 2048,
one micro-step) and the script's own choices (torch.compile, bf16 autocast, the attention backend):
* ms per training step with the plain 11-layer order and with layers 3-5 looped (17 virtual
  layers), and the run average (35% plain, 65% looped, by wall-clock share);
* model FLOP utilisation: 6 x (matrix parameters a token passes through, looped ones counted per
  pass, plus the output head) + 6 x T x d per virtual layer for causal attention (QK and AV), per
  token, against the GPU's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM);
* steps in 600 s on 8 GPUs (each GPU runs this step; the gradient exchange is not measured here);
* sliding-window (stride 64) and score-first TTT throughput on one GPU, extrapolated to the full
  sp8192 validation set (40,540,160 tokens) on 8 GPUs, and the seconds spent compiling their graphs
  (measured apart; a run spends them once, inside its evaluation time);
* peak GPU memory.
Writes tests/bench/results/gpu_bench.json (or --out).
"""

import argparse
import time

import torch

from benchlib import Trainer, eval_throughput, hyperparameters, print_table, runtime, save

VAL_TOKENS_SP8192 = 40_540_160
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}
WORLD = 8  # the per-GPU batch and the extrapolations are those of an 8-GPU run
FULL_SIZE = {"PRESET": "pr2005", "TRAIN_BATCH_TOKENS": 786432 // WORLD, "GRAD_ACCUM_STEPS": 1}
DRY = dict(DEVICE="cpu", NUM_LAYERS=6, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, VOCAB_SIZE=64, TRAIN_SEQ_LEN=32,
           EVAL_SEQ_LEN=32, EVAL_STRIDE=8, TTT_CHUNK_TOKENS=256, TTT_BATCH_SEQS=4, TTT_EPOCHS=1, COMPILE=0)


def flops_per_token(model, args, looping: bool) -> float:
    """Training FLOPs per token: 3 x forward (2 per multiply-add), matrices and causal attention."""
    order = model.layer_order() if looping else list(range(args.num_layers))
    per_layer = [sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
                 for block in model.blocks]
    matrix = sum(per_layer[i] for i in order) + args.vocab_size * args.model_dim
    attention = len(order) * args.train_seq_len * args.model_dim  # causal: T/2 keys x d x 2 (QK, AV)
    return 6.0 * (matrix + attention)


def profile_steps(trainer: Trainer, looping: bool, path: str, steps: int = 3) -> str:
    """torch.profiler over `steps` training steps: the operators with the most device time (host time
    on CPU) go to `path`; returns a line comparing the device's busy time with the wall clock."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.rt.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        trainer.steps(steps, looping)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"== {'looped' if looping else 'plain'}, {steps} steps, {wall * 1000:.1f} ms\n")
        f.write(events.table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not their host-side callers
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if cuda else float("nan")
    return (f"profile ({'looped' if looping else 'plain'}): {1000 * wall / steps:.1f} ms/step wall, device busy "
            f"{1000 * busy / steps:.1f} ms/step ({100 * busy / wall:.0f}%); operators in {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=2_000_000)
    ap.add_argument("--ttt-tokens", type=int, default=320_000)
    ap.add_argument("--out", default="tests/bench/results/gpu_bench.json")
    ap.add_argument("--profile", metavar="TXT", help="also profile 3 plain and 3 looped steps into this file")
    a = ap.parse_args(argv)
    env = dict(FULL_SIZE)
    steps, eval_tokens, ttt_tokens = a.steps, a.eval_tokens, a.ttt_tokens
    if a.dry:
        env.update(DRY, TRAIN_BATCH_TOKENS=128)
        steps, eval_tokens, ttt_tokens = 2, 512, 512
    args = hyperparameters(env)
    rt = runtime(args)
    if rt.device.type != "cuda" and not a.dry:
        raise SystemExit("error: no CUDA device; run with --dry for the CPU check")
    trainer = Trainer(args, rt, compile_model=rt.compile)
    for looping in (False, True):  # compile both graphs first (the run does this in its warm-up)
        trainer.steps(2, looping)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = {looping: 1000 * trainer.steps(steps, looping) for looping in (False, True)}
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if rt.device.type == "cuda" else 0.0
    profile_lines = [profile_steps(trainer, looping, a.profile) for looping in (False, True)] if a.profile else []
    run_ms = 1 / (0.35 / ms[False] + 0.65 / ms[True])  # tokens/s weighted by wall-clock share
    tokens = args.train_batch_tokens
    name = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu (dry)"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    rows, results = [], {}
    for label, looping, m in (("plain", False, ms[False]), ("looped", True, ms[True]), ("run average", None, run_ms)):
        f = (0.35 * flops_per_token(trainer.raw, args, False) + 0.65 * flops_per_token(trainer.raw, args, True)
             if looping is None else flops_per_token(trainer.raw, args, looping))
        tps = tokens / (m / 1000)
        mfu = tps * f / peak if peak else None
        results[label] = {"ms_per_step": m, "tokens_per_s": tps, "flops_per_token": f, "mfu": mfu}
        rows.append([label, m, tps, f"{100 * mfu:.1f}%" if mfu else "-"])
    steps_600 = (600 - args.gptq_reserve_seconds) / (run_ms / 1000)
    ev = eval_throughput(trainer.raw, args, rt, eval_tokens, ttt_tokens)
    sliding_s = VAL_TOKENS_SP8192 / (WORLD * ev["sliding_tokens_per_s"])
    ttt_s = VAL_TOKENS_SP8192 / (WORLD * ev["ttt_tokens_per_s"])
    print(f"{name}, {rt.attn_backend}, compile {'on' if rt.compile else 'off'}, per-GPU batch {tokens} tokens")
    print_table(["training step", "ms/step", "tokens/s/GPU", "MFU"], rows)
    print(f"steps in {600 - args.gptq_reserve_seconds:g} s on {WORLD} GPUs (no communication): {steps_600:.0f}")
    print_table(["evaluation", "tokens/s/GPU", f"s for the val set on {WORLD} GPUs"],
                [["sliding window", ev["sliding_tokens_per_s"], sliding_s], ["score-first TTT", ev["ttt_tokens_per_s"], ttt_s]])
    if "compile_seconds" in ev:
        print(f"compiling the scoring and TTT graphs (once per run, inside the evaluation time): "
              f"{ev['compile_seconds']:.0f} s")
    print(f"peak memory: {peak_mem:.1f} GiB")
    print("\n".join(profile_lines))
    save(a.out, {"bench": "gpu", "dry": a.dry, "device": name, "attention": rt.attn_backend, "compile": rt.compile,
                 "per_gpu_batch_tokens": tokens, "train": results, "steps_in_budget_8gpu": steps_600,
                 "sliding_tokens_per_s": ev["sliding_tokens_per_s"], "ttt_tokens_per_s": ev["ttt_tokens_per_s"],
                 "eval_compile_seconds": ev.get("compile_seconds"),
                 "sliding_seconds_8gpu": sliding_s, "ttt_seconds_8gpu": ttt_s, "peak_memory_gib": peak_mem})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
