"""The benchmarks in tests/bench run end to end at tiny sizes, so none of them can rot: training
throughput, equal-time quality, evaluation throughput, the packings of the artifact, and the GPU benchmark and the skip-merge A/B
in their CPU dry modes. (The artifact benchmark's quick mode is run by test_quant.py.) Their numbers
are not checked here: performance claims come from full runs, committed under tests/bench/results/."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_VOCAB

BENCH = ROOT / "tests" / "bench"


def run_bench(script: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_train_bench_quick(tmp_path):
    out = tmp_path / "train.json"
    proc = run_bench("train_bench.py", "--quick", "--no-compile", "--out", str(out))
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"baseline", "default plain", "default plain isolated", "default looped",
                                   "default run-average"}
    for r in doc["results"].values():
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0
    assert doc["ratio_run_average_vs_baseline"] > 0 and doc["ratio_isolated_vs_plain_ms_per_step"] > 0
    assert "x baseline" in proc.stdout


def test_eval_bench_quick(tmp_path):
    out = tmp_path / "eval.json"
    run_bench("eval_bench.py", "--quick", "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["sliding_tokens_per_s"] > 0 and doc["ttt_tokens_per_s"] > 0


def test_ttt_bench_quick(tmp_path):
    out = tmp_path / "ttt.json"
    run_bench("ttt_bench.py", "--quick", "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["hint_tokens"] == 100_000 and 0 < doc["hinted_share"] < 1
    runs = ("sliding_ttt", "doc_lora_record_values", "doc_lora_smoke_scaled")
    assert all(doc[k]["tokens_per_s"] > 0 for k in runs)
    assert doc["doc_lora_smoke_scaled"]["settings"]["NGRAM_TILT"] == "1"


def test_pack_bench_quick(tmp_path):
    """Every packing is read back inside the benchmark; here: all five rows, and no packing below the
    integers' order-0 entropy (the artifact holds them and more)."""
    out = tmp_path / "pack.json"
    run_bench("pack_bench.py", "--quick", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and rows[0]["packing"].startswith("order-0 entropy")
    assert all(r["bytes"] > rows[0]["bytes"] for r in rows[1:])


def test_gpu_bench_dry_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_bench("gpu_bench.py", "--dry", "--out", str(out), "--profile", str(tmp_path / "profile.txt"))
    doc = json.loads(out.read_text())
    assert doc["dry"] and doc["device"] == "cpu (dry)"
    assert set(doc["train"]) == {"plain", "looped", "run average"}
    assert doc["train"]["looped"]["flops_per_token"] > doc["train"]["plain"]["flops_per_token"] > 0
    for key in ("steps_in_budget_8gpu", "sliding_seconds_8gpu", "ttt_seconds_8gpu"):
        assert math.isfinite(doc[key]) and doc[key] > 0
    assert "MFU" in proc.stdout
    assert (tmp_path / "profile.txt").read_text().count("aten::mm") >= 2  # a table for plain and for looped


def test_skip_merge_bench_dry_mode(tmp_path):
    out = tmp_path / "skip.json"
    proc = run_bench("skip_merge_bench.py", "--dry", "--out", str(out))
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 2 and all(r["ms_per_step"] > 0 and r["top_kernels"] for r in doc["results"].values())
    assert "ms/step" in proc.stdout


@pytest.mark.slow
def test_quality_bench_quick(tiny_data, tmp_path):
    out = tmp_path / "quality.json"
    proc = run_bench("quality_bench.py", "--quick", "--nproc", "1", "--out", str(out), "--env", f"DATA_PATH={tiny_data}",
                     "--env", f"TOKENIZER_PATH={tiny_data / 'tokenizer.model'}", "--env", f"VOCAB_SIZE={TINY_VOCAB}")
    doc = json.loads(out.read_text())
    stack, base = doc["results"]["default stack"][0], doc["results"]["baseline architecture"][0]
    assert stack["params"] > base["params"] and stack["steps"] > 0 and base["steps"] > 0
    assert math.isfinite(doc["ttt_bpb_gap"])
    assert "default stack minus baseline architecture" in proc.stdout


def test_gpu_bench_flops_per_token_by_hand():
    """2 layers x 32 wide, 2 heads / 1 kv head (head dim 16), MLP 2x, vocab 64, sequences of 16:
    per block q 32x32 + k 16x32 + v 16x32 + proj 32x32 + fc 64x32 + proj 32x64 = 7,168 weights;
    head 64 x 32 = 2,048; causal attention 16 x 32 per layer. Training = 6 FLOPs per weight."""
    sys.path.insert(0, str(BENCH))
    import gpu_bench
    from train_gpt import GPT, Hyperparameters

    args = Hyperparameters.from_env({"PRESET": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2",
                                     "NUM_KV_HEADS": "1", "MLP_MULT": "2", "VOCAB_SIZE": "64", "TRAIN_SEQ_LEN": "16"})
    assert gpu_bench.flops_per_token(GPT(args), args, looping=False) == 6 * (2 * 7168 + 2048 + 2 * 16 * 32)
