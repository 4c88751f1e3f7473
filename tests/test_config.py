"""Hyperparameters: defaults, presets, explicit variables winning, type/range errors that name the
variable, checks between variables, and the typo warning."""

import pytest

from conftest import run_script
from train_gpt import PRESETS, ConfigError, Hyperparameters


def test_defaults_then_preset_then_env():
    hp = Hyperparameters.from_env({})
    assert hp.preset == "pr2005" and hp.vocab_size == PRESETS["pr2005"]["vocab_size"] == 8192
    hp = Hyperparameters.from_env({"PRESET": "smoke", "NUM_LAYERS": "3", "MATRIX_LR": "0.01", "TIE_EMBEDDINGS": "off"})
    assert hp.num_layers == 3 and hp.matrix_lr == 0.01 and hp.tie_embeddings is False
    assert hp.model_dim == PRESETS["smoke"]["model_dim"]
    assert hp.sources["num_layers"] == "env" and hp.sources["model_dim"] == "preset smoke"
    assert hp.sources["rope_base"] == "default"


def test_dump_lists_every_knob_with_its_source():
    hp = Hyperparameters.from_env({"SEED": "7"})
    dump = "\n".join(hp.dump())
    for f in Hyperparameters.knobs():
        assert f"{f.name.upper()}=" in dump
    assert "SEED=7  (env)" in dump


@pytest.mark.parametrize("env, words", [
    ({"NUM_LAYERS": "abc"}, ["NUM_LAYERS", "integer"]),
    ({"NUM_LAYERS": "0"}, ["NUM_LAYERS", "out of range", "1 to 64"]),
    ({"SEED": "-1"}, ["SEED", "out of range", ">= 0"]),
    ({"MATRIX_LR": "nan"}, ["MATRIX_LR", "finite"]),
    ({"BETA1": "1.5"}, ["BETA1", "0.0 to 1.0"]),
    ({"TIE_EMBEDDINGS": "maybe"}, ["TIE_EMBEDDINGS", "0 or 1"]),
    ({"COMPRESSOR": "gzip"}, ["COMPRESSOR", "zstd", "brotli"]),
    ({"PRESET": "nope"}, ["PRESET", "baseline", "smoke"]),
    ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, ["MODEL_DIM", "NUM_HEADS"]),
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS"]),
    ({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "64"}, ["TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN"]),
    ({"EVAL_ONLY": "1"}, ["ARTIFACT"]),
    ({"QUANT_CLIP": "percentile"}, ["QUANT_CLIP", "MATRIX_CLIP=search"]),
    ({"ATTN_RES_BLOCK_SIZE": "2"}, ["ATTN_RES_BLOCKS", "number of blocks"]),
    ({"ATTN_RES": "1", "NUM_LOOPS": "1"}, ["ATTN_RES", "NUM_LOOPS"]),
    ({"PARALLEL_RESIDUAL_GATE": "1", "PARALLEL_RESIDUAL_START": "-1"}, ["PARALLEL_RESIDUAL_GATE", "PARALLEL_RESIDUAL_START"]),
    ({"BIGRAM_PROJ_MUON": "1", "BIGRAM_VOCAB_SIZE": "0"}, ["BIGRAM_PROJ_MUON", "BIGRAM_VOCAB_SIZE"]),
    ({"SIZE_CHECK_TAIL": "2"}, ["SIZE_CHECK_TAIL", "degrees of freedom"]),
    ({"EMBED_BITS": "12"}, ["EMBED_BITS", "16"]),
    ({"GPTQ_DAMP": "0"}, ["GPTQ_DAMP", "out of range"]),
    ({"LQER_RANK": "8"}, ["LQER_RANK", "LQER_TOP_K > 0"]),
    ({"PRESET": "pr754", "MLP_CLIP_SIGMAS": "11.5"}, ["MLP_CLIP_SIGMAS", "MATRIX_CLIP=sdclip"]),
    ({"TTT_FREEZE_MATRICES": "0"}, ["TTT_FREEZE_MATRICES", "TTT_FREEZE_BLOCKS > 0"]),
    ({"SMEAR_MODE": "window"}, ["SMEAR_MODE", "SMEAR_GATE=1"]),
    ({"PACK_SORTED_ROLES": "mlp.fc.weight"}, ["PACK_SORTED_ROLES", "PACK_GROUPS=1"]),
    ({"PACK_GROUPS": "1", "PACK_SORTED_ROLES": "mlp.fc.weight,mlp.fcc.weight"}, ["'mlp.fcc.weight'", "mlp.fc.weight"]),
    ({"PACK_GROUPS": "1", "PACK_SORTED_ROLES": "lm_head.weight"}, ["lm_head.weight", "TIE_EMBEDDINGS=1"]),
    ({"PACK_GROUPS": "1", "PACK_SORTED_ROLES": "tok_emb.weight", "EMBED_BITS": "16"}, ["tok_emb.weight", "EMBED_BITS=16"]),
    ({"PACK_GROUPS": "1", "PACK_SORTED_ROLES": "mlp.fc.weight", "MODEL_DIM": "8192", "MLP_MULT": "9"}, ["65,536 rows", "MLP_MULT"]),
])
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(ConfigError) as e:
        Hyperparameters.from_env(env)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_typo_warnings():
    hp = Hyperparameters.from_env({"MATRX_LR": "0.1", "matrix_lr": "0.2", "NUM_LAYER": "3",
                                   "PATH": "/bin", "OMP_NUM_THREADS": "1", "HOME": "/root", "RANK": "0"})
    text = "\n".join(hp.warnings)
    assert "MATRX_LR" in text and "did you mean MATRIX_LR" in text
    assert "matrix_lr" in text and "upper case" in text
    assert "NUM_LAYER " in text and "did you mean NUM_LAYERS" in text
    assert len(hp.warnings) == 3  # PATH, HOME, OMP_NUM_THREADS, RANK are not typos
    assert hp.matrix_lr == PRESETS["pr2005"]["matrix_lr"]  # the misspelt values were not used


def test_bad_variable_on_the_command_line_is_one_line(tmp_path):
    proc = run_script({"NUM_LAYERS": "eleven", "OUT_DIR": str(tmp_path / "out")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: NUM_LAYERS='eleven' is not an integer (accepted: 1 to 64)"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_compressor_without_its_package_is_refused_at_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "brotli" else real(name, *a))
    with pytest.raises(ConfigError, match="COMPRESSOR=brotli needs the brotli package"):
        Hyperparameters.from_env({"PRESET": "pr2005"})
    assert Hyperparameters.from_env({"PRESET": "pr2005", "COMPRESSOR": "lzma"}).compressor == "lzma"
