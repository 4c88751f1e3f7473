"""DOC_ISOLATION: segment ids against a brute-force definition, no logit of a later document moved by
any token of an earlier one (every architecture feature on), each document scored as if alone, the
GPU path's cu_seqlens against the mask (a CPU reference of the varlen kernel's math), and the packed
training layout in a run."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import counting_compile, log_values, run_script, tiny_env
from test_arch import ALL, FEATURES, V, make, randomize
from train_gpt import (BOS_ID, CPU_RUNTIME_FOR_TESTS, ConfigError, Context, Hyperparameters, batch_split, causal_attention,
                       document_segments, segment_bounds, training_layout, varlen_capacity)


def brute_segments(row: list[int], cut: int) -> list[tuple[int, int]]:
    """(document, chunk) of every position: documents start at each BOS (the part before the first
    one is document 0), chunks every `cut` tokens from the document's start (cut 0: one chunk)."""
    out, doc, start = [], 0, 0
    for t, tok in enumerate(row):
        if tok == BOS_ID:
            doc, start = doc + 1, t
        out.append((doc, (t - start) // cut if cut else 0))
    return out


@pytest.mark.parametrize("cut", [0, 3, 5])
def test_segments_match_a_brute_force_definition(cut):
    g = torch.Generator().manual_seed(cut)
    ids = torch.randint(0, 6, (4, 40), generator=g)  # BOS_ID (1) about one token in six
    seg = document_segments(ids, cut)
    for row, s in zip(ids.tolist(), seg.tolist()):
        ref = brute_segments(row, cut)
        for i in range(len(row)):
            for j in range(len(row)):
                assert (s[i] == s[j]) == (ref[i] == ref[j])


def with_bos(B=2, T=24, seed=0, at=(0, 7, 15)) -> torch.Tensor:
    x = torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))
    x[:, list(at)] = BOS_ID
    return x


@pytest.mark.parametrize("features", ["all", "recurrence_layer", "attn_res", "gated_attn", "gated_attn_sparse",
                                      "smear_window", "parallel_lanes"])
def test_no_token_moves_a_later_documents_logits(features):
    """Documents at 0..6, 7..14, 15..23: changing any token of an earlier document (each position
    in turn) leaves every logit of the later ones bit-identical; without DOC_ISOLATION they move."""
    env = ALL if features == "all" else {**FEATURES[features][0], "VALUE_RESIDUAL": "1", "SMEAR_GATE": "1"}
    model = randomize(make({**env, "DOC_ISOLATION": "1"})).eval()
    plain = randomize(make(env)).eval()
    x = with_bos()
    with torch.no_grad():
        base, base_plain = model.forward_logits(x), plain.forward_logits(x)
        for pos in range(1, 15):
            if pos == 7:
                continue  # a BOS
            changed = x.clone()
            changed[:, pos] = (changed[:, pos] - 2 + 1) % (V - 2) + 2
            later = 7 if pos < 7 else 15
            assert torch.equal(model.forward_logits(changed)[:, later:], base[:, later:]), pos
            assert not torch.allclose(plain.forward_logits(changed)[:, later:], base_plain[:, later:]), pos


def test_each_document_scores_as_if_alone():
    model = randomize(make({**ALL, "DOC_ISOLATION": "1"})).eval()
    x = with_bos(B=1)
    with torch.no_grad():
        packed = model.forward_logits(x)
        for lo, hi in ((0, 7), (7, 15), (15, 24)):
            alone = model.forward_logits(x[:, lo:hi])
            assert torch.allclose(packed[:, lo:hi], alone, atol=2e-4), (lo, hi)  # rounding: a leak moves logits by ~1


def test_a_packed_row_is_cut_every_segment_len():
    """segment_len=4: a 10-token document is scored as the pieces 0..3, 4..7, 8..9 alone (no SmearGate
    or BigramHash here: at a cut they read the token before, which a piece alone has not)."""
    model = randomize(make({"DOC_ISOLATION": "1", "XSA_LAST_N": "2", "VALUE_RESIDUAL": "1"})).eval()
    x = with_bos(B=1, T=16, at=(0, 10))
    with torch.no_grad():
        packed = model.forward_logits(x, segment_len=4)
        for lo, hi in ((0, 4), (4, 8), (8, 10), (10, 14), (14, 16)):
            assert torch.allclose(packed[:, lo:hi], model.forward_logits(x[:, lo:hi]), atol=2e-4), (lo, hi)  # rounding: a leak moves logits by ~1


def varlen_reference(q, k, v, cu: torch.Tensor) -> torch.Tensor:
    """What a varlen kernel computes on flattened (N, H, D) inputs: causal attention within each
    [cu[i], cu[i+1]), one segment at a time."""
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            y = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], k[lo:hi].transpose(0, 1)[None],
                                               v[lo:hi].transpose(0, 1)[None], is_causal=True,
                                               enable_gqa=q.size(1) != k.size(1))
            out[lo:hi] = y[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("cut", [0, 5])
def test_varlen_bounds_give_the_masked_attention(cut):
    B, T, H, Hkv, D = 3, 20, 4, 2, 8
    g = torch.Generator().manual_seed(cut)
    ids = torch.randint(0, 5, (B, T), generator=g)
    seg = document_segments(ids, cut)
    capacity = varlen_capacity(B, T) + 30
    cu = segment_bounds(seg, capacity)
    n = int((seg[:, 1:] != seg[:, :-1]).sum()) + B  # segment starts, every row's first position included
    assert cu.dtype == torch.int32 and len(cu) == capacity + 1
    assert cu[:n].tolist() == sorted(cu[:n].tolist()) and (cu[n:] == B * T).all() and cu[0] == 0
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
    masked = causal_attention(q, k, v, "sdpa", seg)
    ref = varlen_reference(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu).view(B, T, H, D)
    assert torch.allclose(masked, ref, atol=1e-5)


def test_two_processes_match_one_with_packed_rows(tiny_data, tmp_path):
    one = run_script(tiny_env(tiny_data, tmp_path / "one", DOC_ISOLATION=1, ITERATIONS=3, TTT_ENABLED=0))
    two = run_script(tiny_env(tiny_data, tmp_path / "two", DOC_ISOLATION=1, ITERATIONS=3, TTT_ENABLED=0), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "documents isolated, each micro-batch one packed row cut every 32" in one.stdout
    l1, l2 = (log_values(p.stdout, "train_loss") for p in (one, two))
    assert len(l1) == len(l2) == 3 and all(abs(float(a) - float(b)) <= 1e-3 for a, b in zip(l1, l2)), (l1, l2)
    b1, b2 = (log_values(p.stdout, "val_bpb") for p in (one, two))
    assert abs(float(b1[-1]) - float(b2[-1])) <= 1e-3, (b1, b2)


def test_packed_rows_on_a_gpu_need_the_varlen_kernel():
    """SDPA would need a (rows x rows) mask of a 98,304-token row: refused at start-up, with the fix."""
    args = Hyperparameters.from_env({"PRESET": "pr2005", "DOC_ISOLATION": "1", "TRAIN_LOADER": "stream"})
    gpu = dataclasses.replace(CPU_RUNTIME_FOR_TESTS, device=torch.device("cuda"), world_size=8)
    local = batch_split(Context(args, gpu))[1]
    with pytest.raises(ConfigError, match="needs FlashAttention's varlen kernel"):
        training_layout(args, gpu, local)
    assert training_layout(args, dataclasses.replace(gpu, attn_backend="flash3"), local) == (98304, 2048)
    assert training_layout(args, CPU_RUNTIME_FOR_TESTS, local) == (98304, 2048)
    shuffled = args.replace("test", train_loader="shuffled")
    assert training_layout(shuffled, gpu, local) == (2048, 0)  # rows stay rows: the mask is per row


def test_isolation_compiles_as_one_graph():
    """torch.compile(fullgraph=True) captures the segments and the cu_seqlens construction (GPU path)
    without a graph break or a host sync; the same graph serves every batch."""
    compiles = []
    model = randomize(make({**ALL, "DOC_ISOLATION": "1"}))
    compiled = counting_compile(model, compiles)
    for seed in range(3):
        x = with_bos(seed=seed, at=(0, 3 + seed, 15))
        assert torch.allclose(compiled(x, torch.roll(x, -1, 1), 8), model(x, torch.roll(x, -1, 1), 8))
    assert len(compiles) == 1
    bounds = torch.compile(lambda s: segment_bounds(s, varlen_capacity(*s.shape)), fullgraph=True, backend="eager")
    seg = document_segments(with_bos(T=256, at=(0, 100)), 64)
    assert torch.equal(bounds(seg), segment_bounds(seg, varlen_capacity(2, 256)))
