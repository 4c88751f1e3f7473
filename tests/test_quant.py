"""int8 per-row quantisation error bounds, and the artifact: exact round trip for every compressor,
and one clear error for truncated, corrupt, foreign or future-version files (SPEC section 4)."""

import struct

import pytest
import torch

from train_gpt import (ARTIFACT_HEADER, COMPRESSORS, GPT, ArtifactError, Hyperparameters, architecture_of,
                       dequantize_state_dict, pack_artifact, quantize_int8_rows, quantize_state_dict,
                       unpack_artifact)


def test_int8_rows_error_bound_and_range():
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    w[3] = 0.0  # a zero row (zero-initialised projections) must not divide by zero
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.abs().max() <= 127 and torch.all(q[3] == 0)
    deq = q.float() * scale.float()[:, None]
    clip = torch.quantile(w.abs(), 0.9999984, dim=1, keepdim=True)
    inside = w.abs() <= clip
    err = (deq - w).abs()
    assert torch.all(err[inside] <= scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-6)
    assert torch.isfinite(deq).all()


def trained_like_state():
    args = Hyperparameters.from_env({"VOCAB_SIZE": "512", "NUM_LAYERS": "2", "MODEL_DIM": "256",
                                     "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2"})
    model = GPT(args)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return args, model.state_dict()


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_artifact_round_trip_is_exact(compressor):
    args, state = trained_like_state()
    qstate = quantize_state_dict(state)
    assert qstate["q"], "some matrices must be quantised"
    assert "blocks.0.attn_scale" in qstate["passthrough"]
    before = dequantize_state_dict(qstate)
    arch, q2 = unpack_artifact(pack_artifact(qstate, architecture_of(args), compressor, -1))
    after = dequantize_state_dict(q2)
    assert arch == architecture_of(args)
    assert before.keys() == after.keys() == state.keys()
    for name in before:
        assert before[name].dtype == state[name].dtype
        assert torch.equal(before[name], after[name]), name


def test_bad_artifacts_give_one_clear_error():
    args, state = trained_like_state()
    blob = pack_artifact(quantize_state_dict(state), architecture_of(args), "zlib", 9)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    future = bytearray(blob)
    future[4] = 99
    cases = [
        (blob[:-100], "truncated"),
        (blob[:10], "bad magic"),
        (bytes(flipped), "CRC32"),
        (b"PK\x03\x04 a zip file" + blob, "bad magic"),
        (bytes(future), "version 99"),
        (ARTIFACT_HEADER.pack(b"PGLF", 1, 0, 5, 0) + b"hello", "CRC32"),
    ]
    for data, words in cases:
        with pytest.raises(ArtifactError, match=words) as e:
            unpack_artifact(data)
        assert "\n" not in str(e.value)
    junk = b"not zlib data at all"
    import zlib
    with pytest.raises(ArtifactError, match="cannot be decoded"):
        unpack_artifact(ARTIFACT_HEADER.pack(b"PGLF", 1, 0, len(junk), zlib.crc32(junk)) + junk)
    assert struct.calcsize("<4sBBQI") == ARTIFACT_HEADER.size
