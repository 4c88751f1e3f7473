"""The seed presets: each turns on what its seed lists (checked against values written out here
from the seeds, not read from PRESETS), each fits the 16,000,000-byte cap at
full size, and each runs end to end at tiny dimensions with its features on."""

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, run_script, tiny_env
from train_gpt import CAP_BYTES, PRESETS, Hyperparameters

SEED_PRESETS = ("pr2005", "pr1658", "pr1232", "pr1696", "pr754")
FULL_SIZE = (*SEED_PRESETS, "baseline")

# Seed by seed (the values every preset must carry).
COMMON = dict(NUM_LAYERS=11, MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4, TRAIN_SEQ_LEN=2048, EVAL_SEQ_LEN=2048,
              TRAIN_BATCH_TOKENS=786432, LOGIT_SOFTCAP=30.0, TIE_EMBEDDINGS=True, ROPE_DIMS=16, LN_SCALE=True,
              EVAL_STRIDE=64, TTT_ENABLED=True)
SEED_TABLE = {
    "pr2005": dict(VOCAB_SIZE=8192, MLP_MULT=4, MLP_ACT="leaky2", LOOP_START=3, LOOP_END=5, NUM_LOOPS=2,
                   ENABLE_LOOPING_AT=0.35, UNET_SKIPS=True, SKIP_GATES=True, XSA_LAST_N=11, GATED_ATTN="headwise",
                   MUON_ROW_NORMALIZE=True, MUON_WD=0.095, MATRIX_LR=0.022, ADAM_WD=0.02, EMBED_WD=0.02,
                   EMA_DECAY=0.9965, WARMDOWN_FRAC=0.72, MIN_LR=0.0, GPTQ=True, MATRIX_BITS=6, EMBED_BITS=7,
                   COMPRESSOR="brotli", TTT_CHUNK_TOKENS=32000, TTT_EPOCHS=3, TTT_LR=0.005, TTT_MOMENTUM=0.9,
                   MAX_WALLCLOCK_SECONDS=600.0, SMEAR_GATE=False, VALUE_RESIDUAL=False, BIGRAM_VOCAB_SIZE=0),
    "pr1658": dict(VOCAB_SIZE=8192, MLP_MULT=4, LOOP_START=3, LOOP_END=5, ENABLE_LOOPING_AT=0.35, UNET_SKIPS=True,
                   PARALLEL_RESIDUAL_START=7, XSA_LAST_N=11, SMEAR_GATE=True, MUON_ROW_NORMALIZE=True, MUON_WD=0.095,
                   MATRIX_LR=0.022, SCALAR_LR=0.02, EMA_DECAY=0.9965, GPTQ=True, QUANT_CLIP="sdclip", MATRIX_BITS=6,
                   EMBED_BITS=8, COMPRESSOR="brotli", COMPRESS_LEVEL=-1, TTT_EPOCHS=3, TTT_CHUNK_TOKENS=32000,
                   TTT_LR=0.005, WARMDOWN_FRAC=0.72, GATED_ATTN="0"),
    "pr1232": dict(VOCAB_SIZE=1024, MLP_MULT=3, MLP_ACT="leaky2", GATED_ATTN="1", QK_GAIN_INIT=1.5,
                   VALUE_RESIDUAL=True, XSA_LAST_N=11, BIGRAM_VOCAB_SIZE=4096, BIGRAM_DIM=128, SMEAR_GATE=True,
                   MUON_WD=0.04, MUON_MOMENTUM=0.99, MATRIX_LR=0.025, SCALAR_LR=0.025, TIED_EMBED_LR=0.035,
                   EMA_DECAY=0.997, MATRIX_BITS=6, EMBED_BITS=6, COMPRESSOR="zstd", COMPRESS_LEVEL=16,
                   ITERATIONS=20000, WARMDOWN_ITERS=12000, WARMUP_STEPS=20, MAX_WALLCLOCK_SECONDS=0.0,
                   TTT_EPOCHS=10, TTT_LR=0.002, TTT_CHUNK_TOKENS=32768, TTT_FREEZE_BLOCKS=2, NUM_LOOPS=0),
    "pr1696": dict(VOCAB_SIZE=1024, MLP_MULT=3, MLP_ACT="leaky2", XSA_LAST_N=11, VE_ENABLED=True, VE_DIM=128,
                   VE_LAYERS="9,10", UNET_SKIPS=True, ATTN_RES=True, ATTN_RES_BLOCK_SIZE=2, ATTN_RES_MIX=0.25,
                   ATTN_RES_TEMP=1.1, PARALLEL_MUON=True, MUON_MOMENTUM_WARMUP_STEPS=1500, EMA_DECAY=0.997,
                   SWA_EVERY=50, MATRIX_BITS=6, LATE_QAT_THRESHOLD=0.15, COMPRESSOR="lzma", WARMDOWN_ITERS=3500,
                   TTT_LR=0.003, TTT_EPOCHS=3, TTT_FREEZE_BLOCKS=1, TTT_CHUNK_TOKENS=32768),
    "pr754": dict(VOCAB_SIZE=1024, MLP_MULT=3, MLP_ACT="leaky2", PARALLEL_MUON=True, MUON_WD=0.04,
                  MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM=0.99, MUON_MOMENTUM_WARMUP_STEPS=1500,
                  SMEAR_GATE=True, BIGRAM_VOCAB_SIZE=1536, BIGRAM_DIM=128, VALUE_RESIDUAL=True, GATED_ATTN="1",
                  XSA_LAST_N=4, ORTHO_INIT=True, EMA_DECAY=0.997, SWA_EVERY=50, SWA_START_SCALE=0.2,
                  QUANT_CLIP="sdclip", MATRIX_BITS=6, LATE_QAT_THRESHOLD=0.15, COMPRESSOR="zstd",
                  COMPRESS_LEVEL=22, WARMDOWN_ITERS=3500, TTT_LR=0.002, TTT_MOMENTUM=0.9, TTT_EPOCHS=3,
                  TTT_CHUNK_TOKENS=32000),
}
BASELINE = dict(VOCAB_SIZE=1024, NUM_LAYERS=9, MLP_MULT=2, MLP_ACT="relu2", TRAIN_SEQ_LEN=1024,
                TRAIN_BATCH_TOKENS=524288, QK_GAIN_INIT=1.5, MATRIX_LR=0.04, MUON_MOMENTUM=0.95,
                MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=500, MUON_WD=0.0, TIED_EMBED_LR=0.05,
                SCALAR_LR=0.04, WARMDOWN_ITERS=1200, MATRIX_BITS=8, EMBED_BITS=8, COMPRESSOR="zlib", EMA_DECAY=0.0,
                EVAL_STRIDE=0, TTT_ENABLED=False, ROPE_DIMS=0, LN_SCALE=False, XSA_LAST_N=0)


def test_default_preset_is_pr2005():
    assert Hyperparameters.from_env({}).preset == "pr2005"
    assert list(PRESETS)[:5] == list(SEED_PRESETS)


@pytest.mark.parametrize("name", SEED_PRESETS)
def test_preset_matches_the_spec_table(name):
    values = Hyperparameters.from_env({"PRESET": name}).as_dict()
    expected = {**COMMON, **SEED_TABLE[name]}
    assert {k: values[k] for k in expected} == expected
    assert values["DATA_PATH"].endswith(f"fineweb10B_sp{values['VOCAB_SIZE']}")
    assert values["TOKENIZER_PATH"].endswith(f"fineweb_{values['VOCAB_SIZE']}_bpe.model")


def test_baseline_matches_the_spec_table():
    values = Hyperparameters.from_env({"PRESET": "baseline"}).as_dict()
    assert {k: values[k] for k in BASELINE} == BASELINE


def test_smoke_has_exactly_the_default_presets_features():
    """Only shape, lengths, rates and data differ; every feature switch is pr2005's."""
    scale_only = {"data_path", "tokenizer_path", "vocab_size", "num_layers", "model_dim", "num_heads",
                  "num_kv_heads", "loop_start", "loop_end", "train_seq_len", "eval_seq_len", "train_batch_tokens",
                  "iterations", "max_wallclock_seconds", "warmdown_frac", "warmdown_iters", "val_loss_every",
                  "train_log_every", "compile_warmup_steps", "matrix_lr", "scalar_lr", "tied_embed_lr",
                  "qk_gain_init", "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps",
                  "grad_clip_norm", "ema_decay", "gptq_calib_seqs", "gptq_reserve_seconds", "byte_shuffle",
                  "ttt_chunk_tokens", "ttt_batch_seqs"}
    smoke, default = PRESETS["smoke"], PRESETS["pr2005"]
    assert {k for k in set(smoke) | set(default) if smoke.get(k) != default.get(k)} <= scale_only


SIZE_LINE = re.compile(r"^size_check preset:(\S+) params:(\d+) bytes_model:(\d+) bytes_code:(\d+) "
                       r"bytes_total:(\d+) limit:16000000$", re.M)


def size_check(name: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "SIZE_CHECK": "1", "PRESET": name}
    return subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.slow
def test_every_full_size_preset_fits_the_cap():
    """SIZE_CHECK=1 at full size for every preset, two at a time (brotli-11 on 36M weights takes
    about a minute on one core)."""
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(FULL_SIZE, pool.map(size_check, FULL_SIZE)))
    for name, proc in results.items():
        m = SIZE_LINE.search(proc.stdout)
        assert m and m.group(1) == name, (name, proc.stdout[-500:], proc.stderr[-2000:])
        params, model, code, total = map(int, m.groups()[1:])
        assert total == model + code and total <= CAP_BYTES, (name, proc.stdout)
        assert proc.returncode == 0
        assert params > 15_000_000 and 8 * model / params > 2.5  # real weights were measured, not zeros


def scaled_down(name: str, data, out) -> dict:
    """The preset with its every feature, at tiny width and length: 11 layers (so the recurrent span,
    the VE layers and the parallel-residual start stay where they are), 64 wide, 8 steps whose LR
    falls below the late-QAT and SWA thresholds."""
    p = PRESETS[name]
    env = tiny_env(data, out, PRESET=name, NUM_LAYERS=p.get("num_layers", 11), MODEL_DIM=64, NUM_HEADS=2,
                   NUM_KV_HEADS=1, MLP_MULT=p.get("mlp_mult", 4), VE_DIM=16, BIGRAM_DIM=16, TRAIN_SEQ_LEN=64,
                   EVAL_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512, ITERATIONS=8, WARMDOWN_ITERS=8, WARMUP_STEPS=0,
                   LOOP_START=p.get("loop_start", 3), LOOP_END=p.get("loop_end", 5), EVAL_STRIDE=16,
                   GPTQ_CALIB_SEQS=8, TTT_CHUNK_TOKENS=4096, TTT_EPOCHS=1, TTT_BATCH_SEQS=8,
                   TTT_ENABLED=int(p.get("ttt_enabled", False)))
    if not p.get("eval_stride", 64):
        env["EVAL_STRIDE"] = "0"
    if p.get("swa_every"):
        env["SWA_EVERY"] = "1"
    return env


def run_scaled(args) -> tuple[str, subprocess.CompletedProcess, str]:
    name, data, out = args
    proc = run_script(scaled_down(name, data, out), timeout=400)
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return name, proc, log


@pytest.mark.slow
def test_every_preset_runs_end_to_end_scaled_down(tiny_data, tmp_path):
    jobs = [(name, tiny_data, tmp_path / name) for name in FULL_SIZE]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_scaled, jobs))
    for name, proc, log in results:
        p = PRESETS[name]
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert f"PRESET='{name}'" in log
        final = "legal_ttt_exact" if p.get("ttt_enabled") else "final_int8_zlib_roundtrip_exact"
        assert final in log, name
        if p.get("num_loops"):
            assert "looping: on at step" in log, name
        if p.get("late_qat_threshold"):
            assert "late_qat: on at step" in log, name
        if p.get("gptq"):
            assert "quantised with GPTQ" in log, name
        if p.get("swa_every"):
            assert re.search(r"final weights: .*SWA", log), name
        elif p.get("ema_decay"):
            assert re.search(r"final weights: .*EMA", log), name
