"""Evaluation: the sliding window scores every target once with its full allowed
context (checked by brute force), score-first TTT is legal (earlier chunks are bit-identical when a
later chunk changes; a chunk is scored before any update that used it), 2 processes give what
1 process gives, for the sliding window and TTT alike, and a long stage reports its progress."""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import log_values, run_script, tiny_env
from test_model import randomize, tiny_args
from train_gpt import (CPU_RUNTIME_FOR_TESTS, GPT, ByteTables, Context, Progress, ValidationSet, eval_windows,
                       evaluate, evaluate_ttt, read_shard, ttt_frozen, ttt_lr_at, ttt_train_chunk, window_sums,
                       write_shard)


def on_cpu(args) -> Context:
    return Context(args, CPU_RUNTIME_FOR_TESTS)


@pytest.mark.parametrize("n, L, stride", [(10, 32, 8), (32, 32, 8), (33, 32, 8), (200, 32, 8), (203, 32, 7),
                                          (1000, 64, 64 - 1), (77, 16, 0), (64, 16, 0)])
def test_windows_score_each_target_once(n, L, stride):
    ws = eval_windows(n, L, stride)
    scored = []
    for i, (start, length, first) in enumerate(ws):
        assert start >= 0 and 0 < length <= L and start + length <= n and 0 <= first < length
        scored.extend(range(start + first, start + length))
        if i > 0 and stride:
            assert first >= L - stride  # every scored target has at least L - stride tokens of context
    assert scored == list(range(n))  # each target once, in order, the tail included


def tiny_tables(vocab=64):
    """Hand-made byte tables: id 1 is BOS (boundary), ids >= 32 have a leading space."""
    ids = torch.arange(vocab)
    return ByteTables(base_bytes=(ids % 3) + (ids != 1).long(), leading_space=ids >= 32, boundary=ids == 1)


@pytest.fixture(scope="module")
def model_and_val():
    torch.manual_seed(0)
    model = randomize(GPT(tiny_args(NUM_LAYERS="2"))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    val = torch.randint(0, 64, (601,))
    val[::37] = 1
    return model, val


def test_sliding_window_equals_brute_force(model_and_val):
    model, val = model_and_val
    args = tiny_args(EVAL_SEQ_LEN="32", EVAL_STRIDE="8", EVAL_BATCH_SEQS="5")
    tables = tiny_tables()
    result = evaluate(model, ValidationSet.from_tables(val, tables), on_cpu(args), stride=8)
    n = len(val) - 1
    assert result.tokens == n
    assert result.bytes == int(tables.count(val[:-1], val[1:]).sum())
    brute = 0.0
    with torch.no_grad():
        for start, length, first in eval_windows(n, 32, 8):
            for j in range(start + first, start + length):  # target j with context start..j, alone
                brute += model.token_nll(val[None, start:j + 1], val[None, start + 1:j + 2])[0, -1].double().item()
    assert result.nll == pytest.approx(brute, rel=1e-6)
    plain = evaluate(model, ValidationSet.from_tables(val, tables), on_cpu(args), stride=0)
    assert plain.tokens == n and plain.nll != pytest.approx(result.nll, rel=1e-4)  # the stride matters


TTT_ENV = dict(EVAL_SEQ_LEN="32", EVAL_STRIDE="8", EVAL_BATCH_SEQS="4", TTT_ENABLED="1", TTT_CHUNK_TOKENS="128",
               TTT_EPOCHS="2", TTT_LR="0.05", TTT_BATCH_SEQS="3", TTT_FREEZE_BLOCKS="1", NUM_LAYERS="2")


def test_ttt_earlier_chunks_do_not_see_later_tokens(model_and_val):
    model, val = model_and_val
    args, tables = tiny_args(**TTT_ENV), tiny_tables()
    _, base = evaluate_ttt(copy.deepcopy(model), ValidationSet.from_tables(val, tables), on_cpu(args))
    k = 2
    changed = val.clone()
    changed[k * 128 + 1:(k + 1) * 128 + 1] = torch.randint(2, 64, (128,))  # the tokens of chunk k's targets
    _, after = evaluate_ttt(copy.deepcopy(model), ValidationSet.from_tables(changed, tables), on_cpu(args))
    assert [r["nll"] for r in after[:k]] == [r["nll"] for r in base[:k]]  # bit-identical
    assert after[k]["nll"] != base[k]["nll"] and after[k + 1]["nll"] != base[k + 1]["nll"]


def test_ttt_scores_a_chunk_before_training_on_it(model_and_val):
    model, val = model_and_val
    args, tables = tiny_args(**TTT_ENV), tiny_tables()
    result, records = evaluate_ttt(copy.deepcopy(model), ValidationSet.from_tables(val, tables), on_cpu(args))
    n = len(val) - 1
    assert len(records) == math.ceil(n / 128) and sum(r["tokens"] for r in records) == result.tokens == n
    # Replay with the public pieces: chunk k must be scored with the weights trained on chunks < k only.
    k, n_train = 3, len(records) - 1
    m = copy.deepcopy(model)
    m.blocks[0].requires_grad_(False)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    chunk_windows = lambda c: [w for w in eval_windows(n, 32, 8) if (w[0] + w[2]) // 128 == c]  # noqa: E731
    for c in range(k):
        for g in opt.param_groups:
            g["lr"] = ttt_lr_at(c, n_train, args)
        ttt_train_chunk(m, opt, params, val, c * 128, (c + 1) * 128, on_cpu(args))
    vset = ValidationSet.from_tables(val, tables)
    assert window_sums(m, vset, chunk_windows(k), on_cpu(args))[0].item() == records[k]["nll"]
    ttt_train_chunk(m, opt, params, val, k * 128, (k + 1) * 128, on_cpu(args))  # the illegal order differs
    assert window_sums(m, vset, chunk_windows(k), on_cpu(args))[0].item() < records[k]["nll"]
    assert torch.equal(m.blocks[0].attn.c_q.weight, model.blocks[0].attn.c_q.weight)  # frozen block untouched


def test_evaluation_batches_have_one_shape(model_and_val):
    """Short windows and short batches are padded (window_batch), so a compiled scoring model sees one
    input shape for scoring and one for TTT training: a tail of another size would recompile inside
    the timed evaluation (on an H100 that cost 309 s before the padding)."""
    model, val = model_and_val
    args, tables = tiny_args(**TTT_ENV), tiny_tables()
    m = copy.deepcopy(model)
    shapes, hidden = {"score": set(), "train": set()}, m.hidden

    def spy(x, segment_len=0, lora=None):
        shapes["train" if torch.is_grad_enabled() else "score"].add(tuple(x.shape))
        return hidden(x, segment_len, lora)

    m.hidden = spy
    vset, ctx = ValidationSet.from_tables(val, tables), on_cpu(args)
    evaluate(m, vset, ctx)  # 600 targets: 18 windows of 32 and one of 24
    evaluate(m, vset, ctx, stride=8)
    evaluate_ttt(m, vset, ctx)  # chunks of 4 sequences, TTT batches of 3 and 1
    assert shapes == {"score": {(4, 32)}, "train": {(3, 32)}}


def test_ttt_cosine_schedule():
    args = tiny_args(TTT_LR="0.004")
    assert [ttt_lr_at(c, 4, args) for c in range(5)] == pytest.approx([0.004, 0.003414, 0.002, 0.000586, 0.0], abs=1e-6)
    # with a warm-up over 5% of 40 chunks (2), then the cosine over the other 37 trained chunks
    warm = tiny_args(TTT_LR="0.004", TTT_WARMUP_FRAC="0.05")
    cosine = lambda k: 0.004 * 0.5 * (1 + math.cos(math.pi * k / 37))  # noqa: E731
    assert [ttt_lr_at(c, 39, warm) for c in (0, 1, 2, 20, 38)] == pytest.approx(
        [0.002, 0.004, 0.004, cosine(18), cosine(36)], abs=1e-9)


def test_ttt_freezes_whole_blocks_or_only_their_scales():
    model = GPT(tiny_args(NUM_LAYERS="2", TTT_FREEZE_BLOCKS="1"))
    block0 = {n for n, _ in model.named_parameters() if n.startswith("blocks.0.")}
    assert ttt_frozen(model, model.args) == block0
    scales = ttt_frozen(model, model.args.replace("test", ttt_freeze_matrices=False))
    assert scales == {"blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "blocks.0.attn.q_gain"}


@pytest.fixture(scope="module")
def artifact(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    proc = run_script(tiny_env(tiny_data, out, ITERATIONS=20))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_stage_outputs(artifact):
    sub = json.loads((artifact / "submission.json").read_text())
    lines = [json.loads(x) for x in (artifact / "ttt_chunks.jsonl").read_text().splitlines()]
    assert all(set(r) == {"chunk", "tokens", "bytes", "nll", "bpb", "seconds"} for r in lines)
    assert [r["chunk"] for r in lines] == list(range(len(lines)))
    assert sum(r["tokens"] for r in lines) == sub["val_tokens"]
    bpb = sum(r["nll"] for r in lines) / (math.log(2) * sum(r["bytes"] for r in lines))
    assert bpb == pytest.approx(sub["val_bpb"], rel=1e-12) and sub["stages"]["ttt"] == sub["val_bpb"]
    assert set(sub["eval_seconds"]) == {"roundtrip", "sliding", "ttt"}
    assert sub["compliance"]["score_first_ttt"] is True
    log = (artifact / "train.log").read_text()
    tokens = log_values(log, "val_tokens")
    assert len(set(tokens)) == 1  # pre-quant, round trip, sliding and TTT all score every target once
    for tag in ("final_int6_gptq_brotli_roundtrip_exact", "final_int6_gptq_brotli_sliding_window_exact",
                "legal_ttt_exact"):
        assert f"{tag} val_loss:" in log


def test_two_processes_and_legality_end_to_end(artifact, tiny_data, tmp_path):
    """EVAL_ONLY with TTT: 1 process reproduces the run, 2 processes match it, and changing one
    chunk's tokens leaves every earlier chunk's score bit-identical under 2 processes too."""
    env = dict(EVAL_ONLY=1, ARTIFACT=artifact / "model.ptz")
    one = run_script(tiny_env(tiny_data, tmp_path / "one", **env))
    two = run_script(tiny_env(tiny_data, tmp_path / "two", **env), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    sub = json.loads((artifact / "submission.json").read_text())
    e1, e2 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert e1["val_bpb"] == sub["val_bpb"]
    for stage in ("roundtrip", "sliding", "ttt"):
        assert e2["stages"][stage]["val_bpb"] == pytest.approx(e1["stages"][stage]["val_bpb"], abs=2e-4), stage

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    val = read_shard(data / "fineweb_val_000000.bin", 320).astype(np.int64)
    k, C = 2, 2048
    val[k * C + 1:(k + 1) * C + 1] = np.random.default_rng(0).integers(2, 320, C)
    write_shard(data / "fineweb_val_000000.bin", val)
    changed = run_script(tiny_env(tiny_data, tmp_path / "changed", DATA_PATH=data, **env), nproc=2)
    assert changed.returncode == 0, changed.stderr[-3000:]
    before, after = ([json.loads(x) for x in (tmp_path / d / "ttt_chunks.jsonl").read_text().splitlines()]
                     for d in ("two", "changed"))
    assert [r["nll"] for r in after[:k]] == [r["nll"] for r in before[:k]]
    assert after[k]["nll"] != before[k]["nll"]


def test_progress_reports_long_stages_only():
    """A fake clock, one second per item: a 12-item stage with a 5 s interval says where it is at
    items 5 and 10, with the time left at the rate so far; a 4-item stage (and the last item) says
    nothing."""
    now = [0.0]
    lines = []
    long = Progress(lines.append, "ttt", 12, every_s=5.0, clock=lambda: now[0])
    for done in range(1, 13):
        now[0] += 1.0
        long.update(done)
    assert lines == ["ttt: 5/12 (42%, eta 7s)", "ttt: 10/12 (83%, eta 2s)"]
    lines.clear()
    now[0] = 0.0
    short = Progress(lines.append, "gptq calibration", 4, every_s=5.0, clock=lambda: now[0])
    for done in range(1, 5):
        now[0] += 1.0
        short.update(done)
    assert lines == []
    Progress(None, "other ranks", 3, every_s=0.0).update(1)  # no log: nothing, not an error
