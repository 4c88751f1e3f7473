"""The per-document LoRA TTT and the n-gram tilt on this machine, one process. Not collected by pytest.

    python tests/bench/ttt_bench.py --artifact runs/<smoke run>/model.ptz   # about 15 minutes on 2 cores
    python tests/bench/ttt_bench.py --quick                                  # tiny (the tests run this)

1. The n-gram hint pass: tokens per second over a stream of --hint-tokens (10M) Zipf-distributed
   tokens of an 8192-token vocabulary with repeated stretches (so that hints fire).
2. On the same weights (a smoke run's artifact, on the sample corpus), each with its val_bpb and
   scored tokens per second:
   - `sliding_ttt`: the smoke preset's own sliding-window SGD TTT;
   - `doc_lora_record_values`: pr2135's evaluation with its own values: per-document LoRA TTT with
     its adapters (rank 80, lr 8e-5, weight decay 2, chunks of 48), one global phase on the first
     5% of the documents (2,500 of 50,000 in the record) at its lr 0.001, windows 1.25x the
     training length (2560/2048), and the n-gram tilt;
   - `doc_lora_smoke_scaled`: the same evaluation scaled to the sample: chunks of 16 (a sample
     document is ~58 tokens, a FineWeb one ~960: with chunks of 48 most documents have one or two
     chunks and their adapters never train), the adapters' lr 1e-3 (the 128-wide smoke model
     trains at about twice pr2005's rates; 8e-5 moves its adapters by nothing measurable), and the
     global phase on half of the documents with the sliding TTT's rate and epochs.
Writes tests/bench/results/ttt_bench.json (or --out).
"""

import argparse
import copy
import time

import torch

from benchlib import hyperparameters, print_table, runtime, save, tg


def hint_throughput(n: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 8193, dtype=torch.float64)
    tokens = torch.multinomial(1.0 / ranks, n, replacement=True, generator=gen)  # Zipf over 8192 ids
    for start in torch.randint(0, n - 4096, (n // 20_000,), generator=gen).tolist():  # 5% repeated stretches
        src = int(torch.randint(0, n - 4096, (1,), generator=gen))
        tokens[start:start + 1000] = tokens[src:src + 1000].clone()
    t0 = time.perf_counter()
    hints = tg.ngram_hints(tokens, 16, 0.8)
    seconds = time.perf_counter() - t0
    return {"hint_tokens": n, "hint_seconds": seconds, "hint_tokens_per_s": n / seconds,
            "hinted_share": float((hints >= 0).float().mean())}


def smoke_size_envs(n_docs: int, quick: bool) -> dict[str, dict]:
    """The smoke preset's sliding TTT, and pr2135's evaluation at the smoke size: its values, and scaled."""
    base = {"PRESET": "smoke", "EVAL_STRIDE": "0"}
    if quick:
        base.update(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, LOOP_START=0, LOOP_END=1, VOCAB_SIZE=64,
                    EVAL_SEQ_LEN=32, TTT_CHUNK_TOKENS=256, TTT_BATCH_SEQS=4)
    p = tg.PRESETS["pr2135"]
    seq = int(base.get("EVAL_SEQ_LEN", tg.PRESETS["smoke"]["eval_seq_len"]))
    doc = dict(base, TTT_MODE="doc_lora", EVAL_SEQ_LEN=str(seq * 5 // 4), TTT_LORA_TARGETS=p["ttt_lora_targets"],
               TTT_LORA_LR=str(p["ttt_lora_lr"]), TTT_LORA_WD=str(p["ttt_lora_wd"]), TTT_PHASES="1",
               TTT_PHASE_DOCS=str(max(1, n_docs // 20)), TTT_LR=str(p["ttt_lr"]), TTT_EPOCHS="1",
               TTT_CHUNK_TOKENS=str(2 * seq),  # the record's 32,768 is 16 windows; a few steps here
               NGRAM_TILT="1")
    smoke = tg.PRESETS["smoke"]
    scaled = dict(doc, TTT_DOC_CHUNK="16", TTT_LORA_LR="1e-3", TTT_PHASE_DOCS=str(max(1, n_docs // 2)),
                  TTT_LR=str(smoke["ttt_lr"]), TTT_EPOCHS=str(smoke["ttt_epochs"]),
                  TTT_CHUNK_TOKENS=base.get("TTT_CHUNK_TOKENS", str(smoke["ttt_chunk_tokens"])))
    if quick:
        for env in (doc, scaled):
            env.update(TTT_DOC_BATCH="4", TTT_LORA_RANK="4", TTT_DOC_CHUNK="8")
    return {"sliding_ttt": base, "doc_lora_record_values": doc, "doc_lora_smoke_scaled": scaled}


def compare(artifact: str | None, quick: bool) -> dict:
    probe = hyperparameters({"PRESET": "smoke"})
    if quick:
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(2, 64, (1501,), generator=gen)
        tokens[torch.randint(0, 1500, (30,), generator=gen)] = tg.BOS_ID
        tokens[0] = tg.BOS_ID
        val = tg.ValidationSet.from_tables(tokens, tg.ByteTables(torch.ones(64, dtype=torch.long),
                                                                 torch.zeros(64, dtype=torch.bool),
                                                                 torch.arange(64) == tg.BOS_ID))
    else:
        val = tg.load_validation(probe)
    n_docs = len(tg.document_spans(val.tokens))
    out = {"docs": n_docs, "tokens": len(val.tokens) - 1}
    for name, env in smoke_size_envs(n_docs, quick).items():
        args = hyperparameters(dict(env, TTT_ENABLED="1"))
        rt = runtime(args)
        ctx = tg.Context(args, rt)
        if artifact:
            model = tg.model_from_artifact(artifact, ctx)
        else:
            torch.manual_seed(0)
            model = tg.GPT(args, rt.attn_backend).to(rt.device)
        model = tg.compile_for_scoring(model, rt)
        if "roundtrip_bpb" not in out:
            out["roundtrip_bpb"] = tg.evaluate(model, val, ctx).val_bpb
        run = tg.evaluate_doc_ttt if args.ttt_mode == "doc_lora" else tg.evaluate_ttt
        r, _ = run(copy.deepcopy(model), val, ctx)
        out[name] = {"val_bpb": r.val_bpb, "seconds": r.seconds, "tokens_per_s": r.tokens / r.seconds,
                     "settings": {k: v for k, v in env.items() if k != "PRESET"}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--artifact", default=None, help="a smoke run's model.ptz (default: random weights)")
    ap.add_argument("--hint-tokens", type=int, default=10_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="tests/bench/results/ttt_bench.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hints = hint_throughput(100_000 if a.quick else a.hint_tokens)
    print(f"n-gram hints: {hints['hint_tokens']:,} tokens in {hints['hint_seconds']:.2f}s "
          f"({hints['hint_tokens_per_s']:,.0f} tokens/s), {100 * hints['hinted_share']:.1f}% hinted")
    result = compare(a.artifact, a.quick)
    print(f"same weights ({a.artifact or 'random'}), {result['tokens']:,} targets in {result['docs']} documents; "
          f"round trip {result['roundtrip_bpb']:.4f}")
    print_table(["evaluation", "val_bpb", "seconds", "tokens/s"],
                [[k, result[k]["val_bpb"], result[k]["seconds"], result[k]["tokens_per_s"]]
                 for k in ("sliding_ttt", "doc_lora_record_values", "doc_lora_smoke_scaled")])
    save(a.out, {"bench": "ttt", "quick": a.quick, "artifact": a.artifact, "threads": a.threads, **hints, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
