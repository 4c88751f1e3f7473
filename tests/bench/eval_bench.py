"""Evaluation throughput on this machine: sliding-window scoring and score-first TTT of the smoke
preset's model, in tokens per second, one process. Not collected by pytest.

    python tests/bench/eval_bench.py              # 65,536 tokens, about a minute
    python tests/bench/eval_bench.py --quick      # tiny (the tests run this)

Random tokens and one byte per token (throughput does not depend on either); the model is freshly
initialised (the forward costs the same trained or not). TTT runs its real schedule: score a chunk,
then TTT_EPOCHS passes of SGD over it. Writes tests/bench/results/eval_bench.json (or --out).
"""

import argparse

import torch

from benchlib import Trainer, eval_throughput, hyperparameters, print_table, runtime, save


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="tests/bench/results/eval_bench.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = {"PRESET": "smoke"}
    tokens = a.tokens
    if a.quick:
        env.update(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, LOOP_START=0, LOOP_END=1, VOCAB_SIZE=64,
                   EVAL_SEQ_LEN=32, EVAL_STRIDE=8, TTT_CHUNK_TOKENS=256, TTT_BATCH_SEQS=4, TTT_EPOCHS=1)
        tokens = 1024
    args = hyperparameters(env)
    rt = runtime(args)
    trainer = Trainer(args, rt)
    r = eval_throughput(trainer.raw, args, rt, tokens)
    print(f"evaluation throughput, {tokens} tokens, {a.threads} thread(s), seq {args.eval_seq_len}, "
          f"stride {args.eval_stride}, TTT {args.ttt_epochs} epochs per chunk of {args.ttt_chunk_tokens}")
    print_table(["stage", "tokens/s"], [["sliding window", r["sliding_tokens_per_s"]],
                                         ["score-first TTT", r["ttt_tokens_per_s"]]])
    save(a.out, {"bench": "eval", "quick": a.quick, "tokens": tokens, "threads": a.threads, **r})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
