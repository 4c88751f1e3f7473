"""Device and processes, logging and outputs, as units: torchrun is detected only when all three of
its variables are set; every device choice (device, autocast, attention kernel, compile) is logged
with its reason, and a forced kernel that is missing is one clear error; only rank 0 writes the run
log; the output folder's default name; submission.json's fields and compliance flags."""

import datetime
import re
from pathlib import Path

import pytest
import torch

from train_gpt import (CAP_BYTES, CPU_RUNTIME_FOR_TESTS, ArtifactInfo, ConfigError, Context, EvalResult, Hyperparameters,
                       RunLog, TrainResult, cpu_supports_bf16, init_runtime, launched_by_torchrun, pick_attention_backend,
                       prepare_out_dir, submission_doc)

TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


def test_torchrun_is_detected_only_with_all_three_variables():
    assert launched_by_torchrun(TORCHRUN)
    for missing in TORCHRUN:
        assert not launched_by_torchrun({k: v for k, v in TORCHRUN.items() if k != missing})


def test_cpu_choices_are_logged_with_their_reason():
    rt = init_runtime(Hyperparameters.from_env({"PRESET": "smoke"}), {"RANK": "3", "WORLD_SIZE": "8"})
    assert not rt.distributed and (rt.rank, rt.world_size) == (0, 1) and rt.device.type == "cpu"  # not torchrun
    notes = "\n".join(rt.notes)
    assert re.search(r"^device: cpu x\d+ threads \(no CUDA device\)$", notes, re.M)
    assert "attention: sdpa (CPU)" in rt.notes and "torch.compile: off (COMPILE=auto)" in rt.notes
    bf16 = cpu_supports_bf16()
    assert (rt.autocast_dtype == torch.bfloat16) == bf16
    assert f"autocast: {'bf16 (bf16 supported)' if bf16 else 'off (float32) (no bf16 on this CPU)'}" in rt.notes
    forced = init_runtime(Hyperparameters.from_env({"PRESET": "smoke", "AUTOCAST": "off", "DEVICE": "cpu"}), {})
    assert forced.autocast_dtype is None and "autocast: off (float32) (AUTOCAST=off)" in forced.notes
    assert any(n.endswith("(DEVICE=cpu)") for n in forced.notes)


def test_cuda_requested_without_cuda_is_one_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ConfigError, match="DEVICE=cuda but no CUDA device is visible"):
        init_runtime(Hyperparameters.from_env({"PRESET": "smoke", "DEVICE": "cuda"}), {})


@pytest.mark.parametrize("backend", ["flash3", "flash2"])
def test_a_forced_missing_backend_is_one_error(backend):
    with pytest.raises(ConfigError, match=f"ATTN_BACKEND={backend} is not available on cpu"):
        pick_attention_backend(backend, torch.device("cpu"), [])
    notes = []
    assert pick_attention_backend("sdpa", torch.device("cpu"), notes) == "sdpa"
    assert notes == ["attention: sdpa (forced by ATTN_BACKEND)"]


@pytest.mark.parametrize("capability, importable, expected, reason", [
    (9, {"flash_attn_interface", "flash_attn"}, "flash3", "importable on CUDA"),
    (8, {"flash_attn_interface", "flash_attn"}, "flash2", "importable on CUDA"),  # FA3 kernels are Hopper only
    (9, {"flash_attn"}, "flash2", "importable on CUDA"),
    (9, set(), "sdpa", "WARNING: no FlashAttention importable on CUDA, slower"),
])
def test_cuda_backend_order(monkeypatch, capability, importable, expected, reason):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in importable else None)
    notes = []
    assert pick_attention_backend("auto", torch.device("cuda", 0), notes) == expected
    assert notes == [f"attention: {expected} ({reason})"]


def test_only_rank_0_writes_the_log(tmp_path, capsys):
    RunLog(tmp_path / "other.log", master=False)("seen by nobody")
    assert not (tmp_path / "other.log").exists()
    log = RunLog(tmp_path / "train.log", master=True)
    log("to both")
    log("to the file only", console=False)
    log.close()
    assert (tmp_path / "train.log").read_text() == "to both\nto the file only\n"
    assert capsys.readouterr().out == "to both\n"


def test_output_folder_default_and_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = Context(Hyperparameters.from_env({"PRESET": "smoke"}), CPU_RUNTIME_FOR_TESTS)
    out = prepare_out_dir(ctx)
    assert out.parent == Path("runs") and out.is_dir()
    stamp, preset = out.name.rsplit("_", 1)
    assert preset == "smoke" and datetime.datetime.strptime(stamp, "%Y%m%d_%H%M%S")
    named = prepare_out_dir(Context(Hyperparameters.from_env({"PRESET": "smoke", "RUN_ID": "try7"}), CPU_RUNTIME_FOR_TESTS))
    assert named == Path("runs/try7") and named.is_dir()
    chosen = prepare_out_dir(Context(Hyperparameters.from_env({"PRESET": "smoke", "RUN_ID": "x", "OUT_DIR": "o/p"}),
                                     CPU_RUNTIME_FOR_TESTS))
    assert chosen == Path("o/p") and chosen.is_dir()


def submission(train_seconds=590.0, bytes_model=15_000_000, eval_seconds=(100.0, 300.0)):
    ctx = Context(Hyperparameters.from_env({"PRESET": "pr2005", "AUTHOR": "me"}), CPU_RUNTIME_FOR_TESTS)
    stages = {"roundtrip": EvalResult(2.0, 10, 8, 1.0), "sliding": EvalResult(1.9, 10, 8, eval_seconds[0]),
              "ttt": EvalResult(1.8, 10, 8, eval_seconds[1])}
    result = TrainResult(steps=4000, train_seconds=train_seconds, stopped_early=True, pre_quant=EvalResult(1.7, 10, 8, 1.0))
    return submission_doc(ctx, result, ArtifactInfo(Path("model.ptz"), bytes_model, 50_000), stages)


def test_submission_fields():
    doc = submission()
    for key in ("name", "author", "github_id", "blurb", "date", "track", "val_loss", "val_bpb", "bytes_total",
                "bytes_model", "bytes_code", "seed", "steps", "step_avg_ms", "train_seconds", "eval_seconds",
                "hardware", "pytorch_version", "preset", "hyperparameters", "compliance"):
        assert key in doc, key
    assert doc["val_bpb"] == pytest.approx(1.8 / (8 * 0.6931471805599453)) and doc["val_loss"] == 0.18  # the last stage
    assert doc["stages"]["pre_quant"] == pytest.approx(1.7 / (8 * 0.6931471805599453))
    assert doc["bytes_total"] == 15_050_000 and doc["step_avg_ms"] == pytest.approx(147.5)
    assert doc["author"] == "me" and doc["name"] == "pr2005" and doc["hyperparameters"]["PRESET"] == "pr2005"
    assert doc["compliance"] == {"train_under_600s": True, "eval_under_600s": True,
                                 "artifact_under_16000000_bytes": True, "score_first_ttt": True}


def test_submission_compliance_flags_each_limit():
    assert not submission(train_seconds=600.5)["compliance"]["train_under_600s"]
    assert not submission(eval_seconds=(200.0, 399.5))["compliance"]["eval_under_600s"]
    over = submission(bytes_model=CAP_BYTES - 50_000 + 1)
    assert over["bytes_total"] == CAP_BYTES + 1 and not over["compliance"]["artifact_under_16000000_bytes"]
