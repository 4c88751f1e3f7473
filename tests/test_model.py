"""The model: shapes, causality (future tokens never change earlier logits), GQA against an explicit
repeat-and-attend reference, RoPE's relative-position property, the initialisation table, and that
every trainable parameter is in exactly one optimizer group."""

import math

import pytest
import torch
import torch.nn.functional as F

from train_gpt import GPT, Hyperparameters, Rotary, apply_rotary, causal_attention, parameter_groups


def tiny_args(**env):
    base = dict(PRESET="baseline", VOCAB_SIZE="64", NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2")
    base.update(env)
    return Hyperparameters.from_env(base)


def randomize(model):
    """Zero-initialised projections would hide bugs: give every weight a random value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_shapes_and_loss():
    model = GPT(tiny_args())
    x = torch.randint(0, 64, (3, 16))
    assert model.forward_logits(x).shape == (3, 16, 64)
    loss = model(x, torch.randint(0, 64, (3, 16)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.1  # near-uniform at init


@pytest.mark.parametrize("env", [{}, {"TIE_EMBEDDINGS": "0"}, {"UNET_SKIPS": "0"}, {"NUM_KV_HEADS": "4"}])
@pytest.mark.parametrize("autocast", [False, True])
def test_causality(env, autocast):
    model = randomize(GPT(tiny_args(**env))).eval()
    x = torch.randint(0, 64, (2, 24))
    x[:, 10] = 1  # a BOS in the middle of the sequence
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
    with ctx, torch.no_grad():
        base = model.forward_logits(x)
        for t in (0, 9, 10, 17):
            y = x.clone()
            y[:, t + 1:] = torch.randint(0, 64, y[:, t + 1:].shape)
            out = model.forward_logits(y)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1])
            assert not torch.equal(out[:, t + 1:], base[:, t + 1:])  # the test can fail


def test_gqa_matches_repeated_kv_reference():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 12, 6, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    out = causal_attention(q, k, v, "sdpa")
    # Reference: query head h uses kv head h // (H / Hkv), plain softmax with a causal mask.
    kr, vr = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / D ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_is_relative_and_norm_preserving():
    torch.manual_seed(0)
    rot = Rotary(16, 10000.0)
    cos, sin = rot(40, "cpu")
    q, k = torch.randn(16), torch.randn(16)

    def at(vec, pos):
        x = vec.expand(1, 40, 1, 16)
        return apply_rotary(x, cos, sin)[0, pos, 0]

    assert torch.allclose(at(q, 7).norm(), q.norm(), atol=1e-5)
    d1 = at(q, 5) @ at(k, 2)
    d2 = at(q, 33) @ at(k, 30)
    assert torch.allclose(d1, d2, atol=1e-4)
    assert not torch.allclose(d1, at(q, 5) @ at(k, 4), atol=1e-3)
    # frequencies: theta_i = base^(-2i/d) with the rotated width d (no rescaling with the length)
    assert torch.allclose(torch.atan2(sin[0, 1, 0], cos[0, 1, 0]), 10000.0 ** (-torch.arange(0, 16, 2) / 16), atol=1e-5)
    # direction, by hand: position 1 turns the pair (x[0], x[8]) = (1, 0) by -theta_0 = -1 radian
    e0 = torch.zeros(16)
    e0[0] = 1.0
    assert torch.allclose(at(e0, 1)[[0, 8]], torch.tensor([math.cos(1.0), -math.sin(1.0)]), atol=1e-6)


def test_init_table():
    args = tiny_args()
    model = GPT(args)
    assert abs(model.tok_emb.weight.std().item() - args.tied_embed_init_std) < 0.001
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
        assert torch.equal(block.resid_mix, torch.stack((torch.ones(32), torch.zeros(32))))
        assert torch.all(block.attn.q_gain == args.qk_gain_init)
    assert model.skip_weights.shape == (2, 32)


def test_every_parameter_in_exactly_one_group_and_all_get_gradients():
    for env in ({}, {"TIE_EMBEDDINGS": "0"}):
        model = randomize(GPT(tiny_args(**env)))
        groups = parameter_groups(model)
        names = [n for g in groups.values() for n, _ in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert all(p.ndim == 2 for _, p in groups["matrix"])
        x = torch.randint(0, 64, (2, 16))
        model(x, x).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_count_formula():
    args = tiny_args()
    d, L, V, hkv = 32, 4, 64, 2 * 8
    per_block = d * d * 2 + d * hkv * 2 + 2 * (2 * d * d) + 4 + 4 * d  # q,o; k,v; fc,proj; q_gain; scales+mix
    expected = V * d + L * per_block + 2 * d
    assert sum(p.numel() for p in GPT(args).parameters()) == expected


def test_flash_backends_get_bf16_inputs(monkeypatch):
    """FlashAttention takes bf16 only, while q and k leave the QK-norm in float32 under autocast: the
    flash paths cast, and give the same result as SDPA (a stand-in module checks the dtypes)."""
    import sys
    import types

    def fake_flash(q, k, v, causal):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and causal
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        return y.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash))
    torch.manual_seed(0)
    q, k = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8)
    v = torch.randn(2, 16, 2, 8).bfloat16()
    flash = causal_attention(q, k, v, "flash2")
    sdpa = causal_attention(q.bfloat16(), k.bfloat16(), v, "sdpa")
    assert flash.dtype == torch.bfloat16 and torch.allclose(flash.float(), sdpa.float(), atol=1e-2)
