"""Training throughput on this machine: the default stack (the smoke preset: pr2005's features at
4 layers x 128, MLP 4x) against the baseline preset at the same dimensions (MLP width included; the
baseline keeps relu² and its optimiser), in one process, alternating rounds so that both see the
same machine load. Not collected by pytest.

    python tests/bench/train_bench.py                  # eager and torch.compile, about 5 minutes
    python tests/bench/train_bench.py --no-compile     # eager only
    python tests/bench/train_bench.py --quick          # a few tiny steps (the tests run this)

"default plain isolated" is the default stack with DOC_ISOLATION=1 (each micro-batch one packed row,
attention within documents: a block-diagonal mask on the CPU), next to "default plain".

The default stack runs its first 35% of the budget with the plain 4-layer order and the rest with
layer 2 looped (6 virtual layers); its run-average throughput is 0.35 x plain + 0.65 x looped
(tokens per second, weighted by the share of the wall-clock budget). Random tokens: throughput does
not depend on the data. Prints a table and writes tests/bench/results/train_bench.json (or --out).
"""

import argparse
import platform

import torch

from benchlib import SMOKE_SHAPE, Trainer, hyperparameters, median, print_table, runtime, save


def variants(quick: bool, compile_too: bool) -> list[tuple[str, dict, bool, bool]]:
    """(label, environment, looping, compiled)."""
    tiny = dict(NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=32,
                TRAIN_BATCH_TOKENS=256, VOCAB_SIZE=64) if quick else {}
    stack = {"PRESET": "smoke", **tiny}
    base = {"PRESET": "baseline", **SMOKE_SHAPE, **tiny}
    out = []
    for compiled in ([False, True] if compile_too else [False]):
        tag = " compiled" if compiled else ""
        out += [(f"baseline{tag}", base, False, compiled), (f"default plain{tag}", stack, False, compiled),
                (f"default plain isolated{tag}", {**stack, "DOC_ISOLATION": 1}, False, compiled),
                (f"default looped{tag}", stack, True, compiled)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 2 steps")
    ap.add_argument("--no-compile", action="store_true", help="eager mode only")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="steps per round and variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the smoke run uses 2 processes x 1)")
    ap.add_argument("--out", default="tests/bench/results/train_bench.json")
    a = ap.parse_args(argv)
    rounds, steps = (2, 2) if a.quick else (a.rounds, a.steps)
    torch.set_num_threads(a.threads)
    trainers, labels = {}, []
    for label, env, looping, compiled in variants(a.quick, not a.no_compile):
        args = hyperparameters(env)
        key = (env["PRESET"], env.get("DOC_ISOLATION", 0), compiled)
        if key not in trainers:
            trainers[key] = Trainer(args, runtime(args), compile_model=compiled)
        labels.append((label, key, looping))
    for trainer in trainers.values():  # warm-up: compilation and first-touch, both orders
        trainer.steps(2, looping=False)
        if trainer.args.num_loops:
            trainer.steps(2, looping=True)
    seconds = {label: [] for label, _, _ in labels}
    for _ in range(rounds):
        for label, key, looping in labels:
            seconds[label].append(trainers[key].steps(steps, looping))
    results = {}
    for label, key, _ in labels:
        s = median(seconds[label])
        results[label] = {"ms_per_step": 1000 * s, "tokens_per_s": trainers[key].tokens_per_step / s}
    for tag in [""] + ([" compiled"] if not a.no_compile else []):
        plain, looped = results[f"default plain{tag}"], results[f"default looped{tag}"]
        run_avg = 0.35 * plain["tokens_per_s"] + 0.65 * looped["tokens_per_s"]
        results[f"default run-average{tag}"] = {"ms_per_step": 1000 * trainers[("smoke", 0, bool(tag))].tokens_per_step
                                                / run_avg, "tokens_per_s": run_avg}
    rows = []
    for label, r in results.items():
        base = results["baseline compiled" if "compiled" in label else "baseline"]
        rows.append([label, r["ms_per_step"], r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"]])
    print(f"training throughput, {rounds} rounds x {steps} steps, {a.threads} thread(s), "
          f"{'tiny (quick)' if a.quick else 'smoke dimensions'}")
    print_table(["variant", "ms/step", "tokens/s", "x baseline"], rows)
    save(a.out, {"bench": "train", "quick": a.quick, "threads": a.threads, "rounds": rounds, "steps": steps,
                 "cpu": platform.processor() or platform.machine(), "results": results,
                 "ratio_run_average_vs_baseline": results["default run-average"]["tokens_per_s"]
                 / results["baseline"]["tokens_per_s"],
                 "ratio_isolated_vs_plain_ms_per_step": results["default plain isolated"]["ms_per_step"]
                 / results["default plain"]["ms_per_step"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
