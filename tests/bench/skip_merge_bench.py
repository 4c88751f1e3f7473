"""A/B of the gated U-Net skip merge's grouping on one GPU (found with gpu_bench --profile). Not
collected by pytest.

    python tests/bench/skip_merge_bench.py          # one GPU: about 2 minutes, mostly compiling
    python tests/bench/skip_merge_bench.py --dry    # CPU, tiny sizes, eager (the tests run this)

The merge is usually written g*x + (1-g)*(w*skip); GPT.merge_skip computes g*x + ((1-g)*w)*skip, the same
values. With the written grouping the backward needs four sums over the tokens for w and g, and
Inductor fused them with the RMS-norm backward into one kernel per skip that ran ~10x slower than
its neighbours; the per-channel factor formed first leaves two. Times the compiled training step of
pr2005 at full size (plain 11-layer order, the per-GPU batch of an 8-GPU run) with each grouping in
one process, and lists the kernels with the most device time. Writes
tests/bench/results/skip_merge_bench.json (or --out).
"""

import argparse

import torch

from benchlib import Trainer, hyperparameters, print_table, runtime, save, tg
from gpu_bench import DRY, FULL_SIZE


def spec_grouping(self, x, skip, j):
    g = torch.sigmoid(self.skip_gates[j])
    return g * x + (1 - g) * (self.skip_weights[j] * skip)


def top_kernels(trainer: Trainer, n: int = 8) -> list[tuple[str, float]]:
    """(name, ms per step) of the n kernels (operators on CPU) with the most self time over 3 steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.rt.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.steps(3)
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=self_time, reverse=True)
    return [(e.key[:120], self_time(e) / 3 / 1000) for e in events[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes, eager")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="tests/bench/results/skip_merge_bench.json")
    a = ap.parse_args(argv)
    env = {**FULL_SIZE, **(dict(DRY, TRAIN_BATCH_TOKENS=128) if a.dry else {})}
    steps = 2 if a.dry else a.steps
    current = tg.GPT.merge_skip
    rows, results = [], {}
    try:
        for label, merge in (("written grouping (1-g)*(w*skip)", spec_grouping), ("current ((1-g)*w)*skip", current)):
            torch._dynamo.reset()
            tg.GPT.merge_skip = merge
            args = hyperparameters(env)
            rt = runtime(args)
            if rt.device.type != "cuda" and not a.dry:
                raise SystemExit("error: no CUDA device; run with --dry for the CPU check")
            trainer = Trainer(args, rt, compile_model=rt.compile)
            trainer.steps(2)
            ms = 1000 * min(trainer.steps(steps) for _ in range(2))
            results[label] = {"ms_per_step": ms, "top_kernels": top_kernels(trainer)}
            rows.append([label, ms])
            del trainer
    finally:
        tg.GPT.merge_skip = current
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.dry else "cpu (dry)"
    print(f"{name}: pr2005 plain order, {env['TRAIN_BATCH_TOKENS']} tokens per step")
    print_table(["skip merge", "ms/step"], rows)
    for label, r in results.items():
        print(f"-- {label}: kernels with the most time (ms/step)")
        print("\n".join(f"{t:8.3f}  {k}" for k, t in r["top_kernels"]))
    save(a.out, {"bench": "skip_merge", "dry": a.dry, "device": name, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
