"""Every architecture feature, alone and all together: forward and backward finite,
the parameter count matches a formula written here, the feature changes the output (a silent no-op
fails), causality with a BOS in the middle of the sequence, nothing carried across a BOS by
SmearGate or BigramHash, every parameter in one optimizer group and receiving gradient, and
torch.compile(fullgraph=True) with one recompilation when recurrence switches on."""

import pytest
import torch

from conftest import counting_compile
from train_gpt import (BOS_ID, GPT, Hyperparameters, SmearGate, bigram_buckets, build_optimizers,
                       exclusive_self_attention, parameter_groups)

V, d, L, H, HKV, D = 64, 32, 4, 4, 2, 8
KV = HKV * D

# feature -> (variables, extra parameters by formula)
FEATURES = {
    "partial_rope": ({"ROPE_DIMS": "4"}, 0),
    "ln_scale": ({"LN_SCALE": "1"}, 0),
    "xsa_last_2": ({"XSA_LAST_N": "2"}, 0),
    "xsa_all": ({"XSA_LAST_N": str(L)}, 0),
    "gated_attn": ({"GATED_ATTN": "1"}, L * (H * d + H)),
    "gated_attn_headwise": ({"GATED_ATTN": "headwise", "XSA_LAST_N": str(L)}, L * (H * D + H)),
    "value_residual": ({"VALUE_RESIDUAL": "1"}, (L - 1) * 2),
    "value_embeddings": ({"VE_ENABLED": "1", "VE_DIM": "8", "VE_LAYERS": "2,3"}, V * 8 + 8 * KV + 1 + 2),
    "smear_gate": ({"SMEAR_GATE": "1"}, d),
    "bigram_hash": ({"BIGRAM_VOCAB_SIZE": "50", "BIGRAM_DIM": "8"}, 50 * 8 + 8 * d + 1),
    "leaky2": ({"MLP_ACT": "leaky2"}, 0),
    "skip_gates": ({"SKIP_GATES": "1"}, 2 * d),
    "recurrence": ({"NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2"}, 2 * d),  # 8 virtual: 4 skips
    "parallel_residual": ({"PARALLEL_RESIDUAL_START": "2"}, 0),
    "attn_res": ({"ATTN_RES": "1"}, L * d),
}
ALL = {k: v for env, _ in FEATURES.values() for k, v in env.items()} | {"XSA_LAST_N": str(L)}  # headwise gates
ALL_EXTRA = sum(extra for name, (_, extra) in FEATURES.items() if name not in ("skip_gates", "gated_attn")) + 4 * d


def make(env: dict, seed: int = 0) -> GPT:
    base = dict(PRESET="baseline", VOCAB_SIZE=str(V), NUM_LAYERS=str(L), MODEL_DIM=str(d), NUM_HEADS=str(H), NUM_KV_HEADS=str(HKV),
                MLP_MULT="2")
    torch.manual_seed(seed)
    model = GPT(Hyperparameters.from_env({**base, **env}))
    model.looping = model.args.num_loops > 0
    return model


def randomize(model: GPT, seed: int = 1) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0))
    return model


def tokens(B=2, T=24, seed=0):
    x = torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = BOS_ID
    x[:, 11] = BOS_ID  # a second document starts in the middle
    return x


BASE_PARAMS = V * d + L * (2 * d * d + 2 * d * KV + 2 * (2 * d * d) + H + 4 * d) + 2 * d


@pytest.mark.parametrize("name", list(FEATURES) + ["all"])
def test_feature_param_count_forward_backward(name):
    env, extra = (ALL, ALL_EXTRA) if name == "all" else FEATURES[name]
    model = randomize(make(env))
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMS + extra
    x = tokens()
    loss = model(x, torch.roll(x, -1, 1))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_changes_the_output(name):
    """Same values for every shared parameter; only the feature differs. A no-op feature fails."""
    on = randomize(make(FEATURES[name][0])).eval()
    if name == "recurrence":  # the same weights with the loop off
        off = make(FEATURES[name][0]).eval()
        off.load_state_dict(on.state_dict())
        off.looping = False
    else:
        off = make({}).eval()
        off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()}, strict=False)
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(on.forward_logits(x), off.forward_logits(x), atol=1e-4)


@pytest.mark.parametrize("name", list(FEATURES) + ["all"])
def test_feature_is_causal(name):
    env = ALL if name == "all" else FEATURES[name][0]
    model = randomize(make(env)).eval()
    x = tokens()
    with torch.no_grad():
        base = model.forward_logits(x)
        for t in (3, 10, 11, 16):
            y = x.clone()
            y[:, t + 1:] = torch.randint(2, V, y[:, t + 1:].shape)
            out = model.forward_logits(y)
            assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=0), (name, t)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)


def test_smear_gate_never_crosses_a_bos():
    smear = SmearGate(d)
    with torch.no_grad():
        smear.gate.fill_(3.0)
    x = torch.randn(1, 6, d)
    ids = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 8]])
    out = smear(x, ids)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 3], x[:, 3])  # BOS positions untouched
    assert not torch.allclose(out[:, 4], x[:, 4])  # inside a document it mixes
    x2 = x.clone()
    x2[:, :3] = torch.randn(1, 3, d)  # change the whole previous document
    assert torch.equal(smear(x2, ids)[:, 3:], out[:, 3:])


def test_bigram_buckets_by_hand():
    ids = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 8], [9, 10, 11, 12, 13, 14]])
    b = bigram_buckets(ids, 50)
    assert b[0].tolist() == [49, 49, ((36313 * 6) ^ (27191 * 5)) % 49, 49, 49, ((36313 * 8) ^ (27191 * 7)) % 49]
    assert b[1, 0] == 49 and b[1, 3] == ((36313 * 12) ^ (27191 * 11)) % 49
    assert b.max() <= 49 and b.min() >= 0


def test_embedding_stage_does_not_carry_a_document_into_the_next():
    """With SmearGate and BigramHash on, the normalised input at a BOS and right after it does not
    depend on the previous document's tokens."""
    model = randomize(make({"SMEAR_GATE": "1", "BIGRAM_VOCAB_SIZE": "50", "BIGRAM_DIM": "8"}))
    captured = {}
    model.blocks[0].register_forward_hook(lambda m, inp, out: captured.__setitem__("x0", inp[1]))
    x = tokens()
    y = x.clone()
    y[:, 1:11] = torch.randint(2, V, (2, 10))
    with torch.no_grad():
        model.forward_logits(x)
        a = captured["x0"]
        model.forward_logits(y)
        b = captured["x0"]
    assert torch.equal(a[:, 11:13], b[:, 11:13])


def test_xsa_removes_the_own_value_component():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = exclusive_self_attention(y, v)
    v_rep = v.repeat_interleave(2, dim=2)
    assert torch.allclose((out * v_rep).sum(-1), torch.zeros(2, 5, 4), atol=1e-5)
    ref = y - (y * v_rep).sum(-1, keepdim=True) * v_rep / (v_rep * v_rep).sum(-1, keepdim=True)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_skip_merge_is_the_spec_formula(gated):
    """The written form: x + w*skip, or x = g*x + (1-g)*(w*skip) with g = sigmoid(gate); merge_skip groups the
    per-channel factors differently (for the GPU kernels), so values and gradients are compared."""
    model = randomize(make({"SKIP_GATES": "1"} if gated else {})).double()
    g = torch.Generator().manual_seed(3)
    x, skip = (torch.randn(2, 5, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = model.skip_weights[1]
    if gated:
        gate = torch.sigmoid(model.skip_gates[1])
        expected = gate * x + (1 - gate) * (w * skip)
    else:
        expected = x + w * skip
    got = model.merge_skip(x, skip, 1)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    wanted = [x, skip] + [p for p in (model.skip_weights, model.skip_gates) if p is not None]
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, wanted, upstream), torch.autograd.grad(expected, wanted, upstream)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_recurrence_order_and_switch():
    model = make({"NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2"})
    assert model.layer_order(looping=False) == [0, 1, 2, 3]
    assert model.layer_order(looping=True) == [0, 1, 2, 1, 2, 1, 2, 3]
    big = GPT(Hyperparameters.from_env({"PRESET": "baseline", "NUM_LAYERS": "11", "NUM_LOOPS": "2", "LOOP_START": "3", "LOOP_END": "5"}))
    assert big.layer_order(looping=True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]


def test_ortho_init():
    args = dict(MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="4", ORTHO_INIT="1")
    model = make(args)
    w = model.blocks[0].attn.c_q.weight
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0 and model.blocks[0].mlp.proj.weight.abs().sum() == 0
    plain = make({**args, "ORTHO_INIT": "0"}).blocks[0].attn.c_q.weight
    assert not torch.allclose(plain @ plain.T, torch.eye(64), atol=1e-2)


def test_all_parameters_grouped_and_trained():
    model = make(ALL)
    groups = parameter_groups(model)
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    assert {n for n, _ in groups["embed"]} == {"tok_emb.weight", "bigram.table.weight", "ve_table.weight"}
    assert len(groups["matrix"]) == 6 * L
    args = model.args
    optimizers = build_optimizers(model, args, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        x = torch.randint(2, V, (4, 16), generator=torch.Generator().manual_seed(step))
        x[:, 5] = BOS_ID
        model(x, torch.roll(x, -1, 1)).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} never changed: no gradient or no optimizer"


def test_compile_fullgraph_recompiles_once_when_looping_switches():
    compiles = []
    model = randomize(make(ALL))
    model.looping = False
    compiled = counting_compile(model, compiles)
    x = tokens()
    outs = [compiled(x, x) for _ in range(3)]
    assert len(compiles) == 1
    model.looping = True
    looped = [compiled(x, x) for _ in range(3)]
    assert len(compiles) == 2  # one recompilation, not one per step
    assert not torch.allclose(outs[0], looped[0])  # the switch really changes the compiled forward
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_the_full_feature_model():
    torch._dynamo.reset()
    model = randomize(make(ALL))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = tokens()
    loss = compiled(x, torch.roll(x, -1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.allclose(loss, model(x, torch.roll(x, -1, 1)), atol=1e-4)
    torch._dynamo.reset()
