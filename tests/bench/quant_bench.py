"""Artifact benchmark (issue: the artifact). Not collected by pytest.

    python tests/bench/quant_bench.py                 # full size, about 10 minutes on 2 CPU cores
    python tests/bench/quant_bench.py --quick         # tiny sizes, seconds (the tests run this)

Part 1, full-size model (11 layers x 512, vocab 8192, MLP 4x; random-normal weights, int6 SDClip
matrices and an int7 embedding, as SIZE_CHECK measures): bytes, seconds and bits per parameter of
each compressor at its top level, with and without byte shuffle.
Part 2, the smoke model: trained for --train-seconds on the sample corpus, then the quantisation
gap (val_bpb after the artifact round trip minus before) for int8 (baseline quantile clip), int6
plain rounding (SDClip) and int6 GPTQ (SDClip, calibrated on training data). The smoke model's
matrices are below the 65,536-element passthrough size, so this benchmark lowers that size to 4,096
to quantise every matrix as a full-size model would.
Prints a table and writes tests/bench/results/quant_bench.json (or --out).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def compressor_table(args_env: dict, levels: dict) -> list[dict]:
    args = tg.Hyperparameters.from_env(args_env)
    torch.manual_seed(0)
    model = tg.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    raw = tg.serialize(tg.quantize_state_dict(model.state_dict(), args), tg.architecture_of(args))
    rows = []
    for name in tg.COMPRESSORS:
        for shuffle in (False, True):
            data = tg.byte_shuffle(raw) if shuffle else raw
            t0 = time.perf_counter()
            n = len(tg.compress(data, name, levels[name]))
            rows.append(dict(compressor=name, level=levels[name], shuffle=shuffle, bytes=n,
                             seconds=round(time.perf_counter() - t0, 2), bits_per_param=round(8 * n / n_params, 4)))
            print(f"  {name:7s} level {levels[name]:2d} shuffle {int(shuffle)}: {n:>11,d} bytes "
                  f"{rows[-1]['seconds']:7.1f}s {rows[-1]['bits_per_param']:.3f} bits/param", flush=True)
    return rows, n_params


def quant_gaps(data: Path, env: dict, train_seconds: float) -> list[dict]:
    cpu = tg.CPU_RUNTIME_FOR_TESTS
    rt = tg.Runtime(**{**cpu.__dict__, "autocast_dtype": torch.bfloat16 if tg.cpu_supports_bf16() else None})
    args = tg.Hyperparameters.from_env({"PRESET": "smoke", "DATA_PATH": str(data),
                                        "TOKENIZER_PATH": str(data / "tokenizer.model"), "GRAD_ACCUM_STEPS": "1", **env})
    ctx = tg.Context(args, rt)
    val = tg.load_validation(args)
    torch.manual_seed(args.seed)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args, rt.device)
    loader = tg.DistributedTokenLoader(tg.check_train_shards(args.data_path), args.vocab_size, 0, 1, "cpu")
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < train_seconds:
        tg.apply_schedule(optimizers, step, time.perf_counter() - t0,
                          args.replace("benchmark", max_wallclock_seconds=train_seconds, gptq_reserve_seconds=0.0))
        tg.training_step(model, optimizers, [loader.next_batch(args.train_batch_tokens, args.train_seq_len)], ctx, 1)
        step += 1
    before = tg.evaluate(model, val, ctx).val_bpb
    print(f"  smoke model: {step} steps in {train_seconds:g}s, val_bpb {before:.4f} before quantisation", flush=True)
    tg.PASSTHROUGH_MAX_ELEMENTS = 4096  # see the docstring: quantise every matrix of this small model
    files = tg.check_train_shards(args.data_path)
    hessians = tg.collect_hessians(model, tg.training_calibration_batches(files, ctx, args.train_batch_tokens, 1), rt)
    rows = []
    for label, over, h in (("int8 quantile", dict(matrix_bits=8, embed_bits=8, matrix_clip="quantile",
                                                   embed_clip="quantile"), None),
                           ("int6 round (sdclip)", dict(matrix_bits=6, embed_bits=8, matrix_clip="sdclip"), None),
                           ("int6 GPTQ (sdclip)", dict(matrix_bits=6, embed_bits=8, matrix_clip="sdclip"), hessians)):
        qargs = args.replace("benchmark", **over)
        blob = tg.pack_artifact(tg.quantize_state_dict(model.state_dict(), qargs, h), tg.architecture_of(qargs),
                                "brotli", -1, True)
        q = tg.GPT(qargs)
        q.load_state_dict(tg.dequantize_state_dict(tg.unpack_artifact(blob)[1]))
        after = tg.evaluate(q, val, tg.Context(qargs, rt)).val_bpb
        rows.append(dict(scheme=label, val_bpb_before=round(before, 5), val_bpb_after=round(after, 5),
                         gap=round(after - before, 5), bytes=len(blob)))
        print(f"  {label:22s} gap {after - before:+.4f} ({before:.4f} -> {after:.4f}), {len(blob):,d} bytes", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the benchmark runs")
    ap.add_argument("--data", default=str(ROOT / "data/sample/shakespeare_sp1024"))
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--out", default=str(ROOT / "tests/bench/results/quant_bench.json"))
    a = ap.parse_args()
    full = dict(PRESET="pr2005", VOCAB_SIZE="8192", NUM_LAYERS="11", MODEL_DIM="512", MLP_MULT="4", MATRIX_BITS="6",
                MATRIX_CLIP="sdclip", EMBED_BITS="7", EMBED_CLIP_SIGMAS="15")
    levels = dict(zlib=9, zstd=22, brotli=11, lzma=9, zpaq=5)
    smoke = {}
    if a.quick:
        full.update(VOCAB_SIZE="1024", NUM_LAYERS="1", MODEL_DIM="256", NUM_LOOPS="0")
        levels = dict(zlib=1, zstd=1, brotli=1, lzma=1, zpaq=1)
        smoke = dict(NUM_LAYERS="1", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_BATCH_TOKENS="2048",
                     NUM_LOOPS="0")
    print("compressors, full-size model" + (" (quick: tiny)" if a.quick else ""), flush=True)
    rows, n_params = compressor_table(full, levels)
    print("quantisation gap, smoke model", flush=True)
    data = Path(a.data)
    env = dict(smoke)
    info = json.loads((data / "build_info.json").read_text())
    env["VOCAB_SIZE"] = str(info["vocab_size"])
    gaps = quant_gaps(data, env, 3.0 if a.quick else a.train_seconds)
    out = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, quick=a.quick, params=n_params,
               compressors=rows, quant_gaps=gaps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tg.atomic_write_text(a.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
