"""Shared fixtures: a tiny tokenizer and shards built once per session from the sample corpus,
and helpers that run train_gpt.py as a user would (plain python or torchrun) with a tiny model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import train_gpt  # noqa: E402
from build_shards import build  # noqa: E402

TINY_VOCAB = 320
KNOB_NAMES = {f.name.upper() for f in train_gpt.Hyperparameters.knobs()}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """1,500 speeches of the sample, 50 of them validation, a 320-piece tokenizer, small shards
    (so the loader crosses shard boundaries and wraps around)."""
    text = (ROOT / "data/sample/tinyshakespeare.txt").read_text(encoding="utf-8")
    src = tmp_path_factory.mktemp("corpus") / "part.txt"
    src.write_text("\n\n".join(text.split("\n\n")[:1500]), encoding="utf-8")
    out = tmp_path_factory.mktemp("tiny_data")
    build([str(src)], TINY_VOCAB, 50, out, shard_tokens=20_000, threads=1)
    return out


@pytest.fixture(scope="session")
def two_seeds(tiny_data, tmp_path_factory) -> list[Path]:
    """Two finished tiny runs of one configuration (seeds 7 and 8), every stage on, late QAT switching
    on in the warm-down; shared by the records-folder and plot tests."""
    runs = []
    for seed in (7, 8):
        out = tmp_path_factory.mktemp(f"seed{seed}")
        proc = run_script(tiny_env(tiny_data, out, SEED=seed, LATE_QAT_THRESHOLD=0.6))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(out)
    return runs


def tiny_env(data: Path, out_dir: Path, **overrides) -> dict:
    """Variables for a 2-layer, 32-wide model that trains 5 steps in a few seconds."""
    env = dict(
        PRESET="smoke", DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"),
        VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
        MLP_MULT="2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", TRAIN_BATCH_TOKENS="512",
        ITERATIONS="5", MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="2", TRAIN_LOG_EVERY="1",
        VAL_LOSS_EVERY="0", OUT_DIR=str(out_dir), EVAL_BATCH_SEQS="16",
        LOOP_START="0", LOOP_END="1", GPTQ_RESERVE_SECONDS="0", EVAL_STRIDE="8", TTT_ENABLED="1", TTT_CHUNK_TOKENS="2048", TTT_EPOCHS="1", TTT_BATCH_SEQS="8",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(env: dict, nproc: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run train_gpt.py in a clean environment: plain python (nproc=0) or torchrun with nproc."""
    full = {k: v for k, v in os.environ.items() if k not in KNOB_NAMES}
    full.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full.update(env)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    else:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    return subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def log_values(text: str, key: str) -> list[str]:
    """Every numeric `key:value` in the order it appears (the logged source has `key:{...}`)."""
    import re

    return re.findall(rf"(?<![\w]){re.escape(key)}:(-?\d[\d.]*(?:e[-+]?\d+)?|nan|inf)", text)


def counting_compile(model, compiles: list):
    """torch.compile(fullgraph=True) with a backend that records every graph it is given and runs it
    eagerly: len(compiles) is the number of (re)compilations, without Inductor's cost."""
    import torch

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
