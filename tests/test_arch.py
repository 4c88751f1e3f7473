"""Every architecture feature, alone and all together: forward and backward finite,
the parameter count matches a formula written here, the feature changes the output (a silent no-op
fails), causality with a BOS in the middle of the sequence, nothing carried across a BOS by
SmearGate or BigramHash, every parameter in one optimizer group and receiving gradient, and
torch.compile(fullgraph=True) with one recompilation when recurrence switches on."""

import pytest
import torch

from conftest import counting_compile
from train_gpt import (BOS_ID, GPT, ConfigError, Hyperparameters, SmearGate, WindowSmearGate, bigram_buckets, build_optimizers,
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
    "gated_attn_headwise": ({"GATED_ATTN": "headwise", "XSA_LAST_N": str(L)}, L * H * d),  # H rows of c_q
    "gated_attn_sparse": ({"GATED_ATTN": "sparse", "GATE_WINDOW": "5", "XSA_LAST_N": "2"}, L * H * 5),
    "value_residual": ({"VALUE_RESIDUAL": "1"}, L * 2),  # layer 0's pair is held but unused
    "value_embeddings": ({"VE_ENABLED": "1", "VE_DIM": "8", "VE_LAYERS": "2,3"}, V * 8 + 8 * KV + 1 + 2),
    "smear_gate": ({"SMEAR_GATE": "1"}, d),
    "smear_window": ({"SMEAR_GATE": "1", "SMEAR_MODE": "window", "GATE_WINDOW": "5"}, 5 + 1),
    "bigram_hash": ({"BIGRAM_VOCAB_SIZE": "50", "BIGRAM_DIM": "8"}, 50 * 8 + 8 * d + 1),
    "leaky2": ({"MLP_ACT": "leaky2"}, 0),
    "skip_gates": ({"SKIP_GATES": "1"}, 2 * d),
    "recurrence": ({"NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2"}, 2 * d),  # 8 virtual: 4 skips
    "recurrence_layer": ({"NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "2", "LOOP_MODE": "layer"}, 2),
    "parallel_residual": ({"PARALLEL_RESIDUAL_START": "2"}, 0),
    "parallel_residual_gate": ({"PARALLEL_RESIDUAL_START": "2", "PARALLEL_RESIDUAL_GATE": "1"}, 2),
    "attn_res": ({"ATTN_RES": "1"}, (L - L // 2) * d),  # queries for the layers after the first block
    "parallel_lanes": ({"PARALLEL_LANES_START": "3"}, L * 6),  # (L, 2) residual and (L, 2, 2) write factors
}
# Every feature at once, but one gate form, one recurrence form and no routing (which needs
# physical layers: ATTN_RES with recurrence is refused).
# The variable that turns a feature on, where its entry above also sets the context it works in.
FEATURE_SWITCH = {"parallel_residual_gate": "PARALLEL_RESIDUAL_GATE", "gated_attn_headwise": "GATED_ATTN",
                  "gated_attn_sparse": "GATED_ATTN"}
NOT_IN_ALL = ("gated_attn", "gated_attn_sparse", "smear_window", "recurrence_layer", "attn_res", "parallel_lanes")
ALL = {k: v for name, (env, _) in FEATURES.items() if name not in NOT_IN_ALL for k, v in env.items()}
ALL_EXTRA = sum(extra for name, (_, extra) in FEATURES.items() if name not in NOT_IN_ALL + ("skip_gates",)) + 4 * d


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
    if name.startswith("recurrence"):  # the same weights with the loop off
        off = make(FEATURES[name][0]).eval()
        off.load_state_dict(on.state_dict())
        off.looping = False
    else:  # the feature's setting alone removed: what it needs (parallel blocks, XSA, ...) stays
        kept = {k: v for k, v in FEATURES[name][0].items() if name in FEATURE_SWITCH and k != FEATURE_SWITCH[name]}
        off = make(kept).eval()
        shapes = {k: v.shape for k, v in off.state_dict().items()}  # c_q without the headwise gate rows
        off.load_state_dict({k: v[:shapes[k][0]] for k, v in on.state_dict().items() if k in shapes}, strict=False)
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


def test_window_smear_gate_by_hand():
    """x_t + lam * sigmoid(w . x_t[:5]) * x_{t-1}, nothing at position 0 or at a BOS; identity at init."""
    smear = WindowSmearGate(5)
    x = torch.randn(1, 6, d)
    ids = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 8]])
    assert torch.equal(smear(x, ids), x)  # lam = 0, w = 0
    with torch.no_grad():
        smear.gate.copy_(torch.randn(5))
        smear.lam.fill_(0.7)
    out = smear(x, ids)
    for t in range(6):
        expected = x[0, t]
        if t > 0 and ids[0, t] != BOS_ID:
            expected = x[0, t] + 0.7 * torch.sigmoid(x[0, t, :5] @ smear.gate) * x[0, t - 1]
        torch.testing.assert_close(out[0, t], expected)


def test_sparse_attention_gate_by_hand():
    """GATED_ATTN=sparse: each head's output (after XSA) times sigmoid(SPARSE_GATE_SCALE * W_h . x[:5]),
    x the attention's normalised input; the same weights ungated give the head outputs."""
    env = {"GATE_WINDOW": "5", "SPARSE_GATE_SCALE": "0.7", "XSA_LAST_N": str(L)}
    gated = randomize(make({**env, "GATED_ATTN": "sparse"})).eval()
    plain = make(env).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate_w" not in k})
    attn, plain_attn = gated.blocks[1].attn, plain.blocks[1].attn
    heads = []
    plain_attn.proj.register_forward_pre_hook(lambda m, inp: heads.append(inp[0]))
    x = torch.randn(2, 7, d)
    cos, sin = gated.rotary(7, "cpu")
    with torch.no_grad():
        out = attn(x, cos, sin)[0]
        plain_attn(x, cos, sin)
        g = torch.sigmoid(0.7 * x[..., :5] @ attn.gate_w.T)  # (B, T, H)
        y = heads[0].view(2, 7, H, D) * g[..., None]
        torch.testing.assert_close(out, attn.proj(y.reshape(2, 7, d)))


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


@pytest.mark.parametrize("features", ["all", "recurrence_layer", "attn_res"])
def test_all_parameters_grouped_and_trained(features):
    """Every trainable parameter is in one optimizer group and moves in three steps; the only one that
    does not train is layer 0's value-residual pair, which nothing reads."""
    model = make(ALL if features == "all" else {**FEATURES[features][0], "VALUE_RESIDUAL": "1"})
    groups = parameter_groups(model)
    names = [n for g in groups.values() for n, _ in g]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(set(names)) == len(names)
    assert set(n for n, _ in model.named_parameters()) - set(trainable) == {"blocks.0.attn.vr_lambda"}
    if features == "all":
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
        assert not torch.equal(p, before[n]) or n == "blocks.0.attn.vr_lambda", f"{n} never changed"


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


def test_ln_scale_is_the_physical_layers_before_and_after_the_switch():
    """The normalised input of block i's attention has RMS 1/sqrt(i+1), whether recurrence is off or
    on (then blocks 1 and 2 run three times each: always their own scale, never the virtual depth's)."""
    model = randomize(make({"LN_SCALE": "1", "NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2"})).eval()
    seen = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, inp, out, i=i: seen.append((i, inp[0].pow(2).mean(-1).sqrt())))
    for looping in (False, True):
        seen.clear()
        model.looping = looping
        with torch.no_grad():
            model.forward_logits(tokens())
        assert [i for i, _ in seen] == model.layer_order()
        for i, rms in seen:
            assert torch.allclose(rms, torch.full_like(rms, (i + 1) ** -0.5), rtol=1e-4), (looping, i)


def test_headwise_gate_logits_are_rows_of_c_q():
    """Each head's output is scaled by sigmoid of c_q's extra row for that head applied to the block's
    normalised input (no bias); the rows are a Muon matrix and the artifact rounds them with c_q."""
    from train_gpt import quant_spec_for

    model = randomize(make({"GATED_ATTN": "headwise", "XSA_LAST_N": str(L)})).eval()
    attn = model.blocks[1].attn
    assert attn.c_q.weight.shape == (d + H, d) and not hasattr(attn, "gate_w")
    plain = make({"XSA_LAST_N": str(L)}).blocks[1].attn.eval()  # the same attention without a gate
    plain.load_state_dict({**attn.state_dict(), "c_q.weight": attn.c_q.weight[:d]})
    x = torch.randn(2, 7, d)
    cos, sin = model.rotary(7, "cpu")
    seen = {}
    for name, module in (("gated", attn), ("plain", plain)):
        module.proj.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0]))
        with torch.no_grad():
            module(x, cos, sin)
    gate = torch.sigmoid(x @ attn.c_q.weight[d:].T)  # (2, 7, H)
    expected = seen["plain"].view(2, 7, H, D) * gate[..., None]
    assert torch.allclose(seen["gated"], expected.view(2, 7, d), atol=1e-6)
    groups = {n for n, _ in parameter_groups(model)["matrix"]}
    assert "blocks.1.attn.c_q.weight" in groups and not any("gate" in n for n, _ in model.named_parameters())
    big = torch.zeros(512 + 8, 512)
    assert quant_spec_for("blocks.1.attn.c_q.weight", big, model.args) is not None  # rounded with c_q, gate rows too


def test_layer_recurrence_blends_each_extra_pass_by_its_gate():
    """LOOP_MODE=layer on one layer, by hand: x1 = B(x0), x2 = x1 + g * (B(x1) - x1); with the gate at
    its initial 0 the recurrence changes nothing."""
    model = randomize(make({"NUM_LAYERS": "1", "NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "0",
                            "LOOP_MODE": "layer", "UNET_SKIPS": "0"})).eval()
    assert model.units(looping=True) == [[0, 0]] and model.skip_weights is None
    x = tokens()
    block, g = model.blocks[0], model.recur_gates[0]
    with torch.no_grad():
        x0 = torch.nn.functional.rms_norm(model.tok_emb(x), (d,))
        cos, sin = model.rotary(x.size(1), "cpu")
        x1 = block(x0, x0, cos, sin)[0]
        x2 = x1 + g * (block(x1, x0, cos, sin)[0] - x1)
        expected = torch.nn.functional.rms_norm(x2, (d,))
        assert torch.allclose(model.hidden(x), expected, atol=1e-5)
        model.recur_gates.zero_()
        model.looping = False
        off = model.hidden(x)
        model.looping = True
        assert torch.equal(model.hidden(x), off)


@pytest.mark.parametrize("mode", ["span", "layer"])
def test_layer_zero_never_mixes_in_its_own_values(mode):
    """Value residual with a recurrence that repeats layer 0: its second pass gets no v0, so the pair
    that layer 0 holds (for the records' parameter count) has no effect."""
    model = randomize(make({"VALUE_RESIDUAL": "1", "NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "1",
                            "LOOP_MODE": mode})).eval()
    assert model.layer_order(looping=True).count(0) == 2
    x = tokens()
    with torch.no_grad():
        before = model.hidden(x)
        model.blocks[0].attn.vr_lambda.copy_(torch.tensor([3.0, -2.0]))
        assert torch.equal(model.hidden(x), before)
        model.blocks[1].attn.vr_lambda.copy_(torch.tensor([3.0, -2.0]))  # the check can fail: layer 1's matters
        assert not torch.allclose(model.hidden(x), before)


def test_layer_recurrence_pairs_skips_over_physical_layers():
    model = make({"NUM_LAYERS": "11", "NUM_LOOPS": "1", "LOOP_START": "3", "LOOP_END": "5", "LOOP_MODE": "layer"})
    assert model.layer_order(looping=True) == [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10]
    assert model.skip_weights.shape == (5, d) and model.recur_gates.shape == (3,)


def test_two_lane_decoder_by_hand():
    """PARALLEL_LANES_START=2 on 4 layers (U-Net: encoder 0, 1; decoder 2, 3): the lanes start equal at
    layer 2, the skips join lane 0, attention reads lane 0 (with x0 through resid_mix), the MLP lane 1,
    each lane_k = r_k lane_k + P[0,k] a + P[1,k] m; the output is the normalised mean of the lanes."""
    model = randomize(make({"PARALLEL_LANES_START": "2", "XSA_LAST_N": "1"})).eval()
    x = tokens()
    norm = lambda t: torch.nn.functional.rms_norm(t, (d,))  # noqa: E731
    with torch.no_grad():
        h = x0 = norm(model.tok_emb(x))
        cos, sin = model.rotary(x.size(1), "cpu")
        skips = []
        for layer in (0, 1):
            h = model.blocks[layer](h, x0, cos, sin)[0]
            skips.append(h)
        lane0 = lane1 = h
        for j, layer in enumerate((2, 3)):
            block, r, P = model.blocks[layer], model.lane_resid[layer], model.lane_post[layer]
            lane0 = lane0 + model.skip_weights[j] * skips.pop()
            a = block.attn_scale * block.attn(norm(block.resid_mix[0] * lane0 + block.resid_mix[1] * x0) * block.ln_scale,
                                              cos, sin)[0]
            m = block.mlp_scale * block.mlp(norm(lane1) * block.ln_scale)
            lane0, lane1 = r[0] * lane0 + P[0, 0] * a + P[1, 0] * m, r[1] * lane1 + P[0, 1] * a + P[1, 1] * m
        torch.testing.assert_close(model.hidden(x), norm(0.5 * (lane0 + lane1)))


@pytest.mark.parametrize("env, words", [
    ({"PARALLEL_LANES_START": "2", "PARALLEL_RESIDUAL_START": "1"}, "PARALLEL_RESIDUAL_START"),
    ({"PARALLEL_LANES_START": "2", "ATTN_RES": "1"}, "ATTN_RES"),
    ({"PARALLEL_LANES_START": "1", "NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "1"}, "LOOP_END"),
    ({"PARALLEL_LANES_START": "4"}, "NUM_LAYERS"),
])
def test_two_lane_decoder_refuses_what_it_cannot_run(env, words):
    with pytest.raises(ConfigError, match=words):
        make(env)


def test_parallel_residual_gate_by_hand():
    model = randomize(make({"PARALLEL_RESIDUAL_START": "0", "PARALLEL_RESIDUAL_GATE": "1"})).eval()
    block = model.blocks[2]
    x, x0 = torch.randn(2, 5, d), torch.randn(2, 5, d)
    cos, sin = model.rotary(5, "cpu")
    with torch.no_grad():
        xin = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = torch.nn.functional.rms_norm(xin, (d,))
        a = block.attn(n, cos, sin)[0]
        g = block.par_gate
        expected = xin + g * block.attn_scale * a + (1 - g) * block.mlp_scale * block.mlp(n)
        assert torch.allclose(block(x, x0, cos, sin)[0], expected, atol=1e-6)


def test_attention_residual_routing_by_hand():
    """ATTN_RES_BLOCKS=2 on 4 layers: blocks of 2, sources = the embedding and layer 1's output, routing
    only in layers 2 and 3, logits q . rmsnorm(source) / (sqrt(d) * temp)."""
    model = randomize(make({"ATTN_RES": "1", "ATTN_RES_BLOCKS": "2", "ATTN_RES_TEMP": "0.6",
                            "ATTN_RES_MIX": "0.3"})).eval()
    assert model.attn_res_first == 2 and model.attn_res_q.shape == (2, d)
    g = torch.Generator().manual_seed(5)
    x, s0, s1 = (torch.randn(2, 5, d, generator=g) for _ in range(3))
    q = model.attn_res_q[1]  # layer 3's query
    logits = torch.stack([(torch.nn.functional.rms_norm(s, (d,)) * q).sum(-1) for s in (s0, s1)], -1) / (d ** 0.5 * 0.6)
    w = torch.softmax(logits, -1)
    expected = 0.7 * x + 0.3 * (w[..., :1] * s0 + w[..., 1:] * s1)
    with torch.no_grad():
        assert torch.allclose(model.route(x, [s0, s1], 3), expected, atol=1e-6)
    routed = []
    model.route = lambda x, sources, layer: routed.append((layer, len(sources))) or x
    with torch.no_grad():
        model.forward_logits(tokens())
    assert routed == [(2, 2), (3, 2)]
