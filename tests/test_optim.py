"""Muon against torch.optim.Muon, Newton-Schulz orthogonality, and the schedules against
hand-computed values."""

import copy

import pytest
import torch

from train_gpt import (EMA, SWA, ConfigError, Hyperparameters, LateQAT, Muon, ParallelMuon, QATLinear, QuantSpec, apply_final_weights,
                       build_optimizers, dequantize_state_dict, fake_quantize, quantize_state_dict,
                       lr_multiplier, muon_momentum_at, zeropower_via_newtonschulz5)


def run_muon(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.data


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 80), (128, 48)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(shape, nesterov):
    """Three steps (so the momentum buffers must agree too). torch keeps buf = lerp(buf, g, 1-mu),
    ours buf = mu*buf + g: the same direction scaled by (1-mu), which Newton-Schulz normalises away;
    what remains is bf16 rounding of differently scaled inputs, about 1% of the displacement."""
    torch.manual_seed(0)
    w0, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    ours = run_muon(Muon, w0, grads, **kw)
    ref = run_muon(torch.optim.Muon, w0, grads, adjust_lr_fn="original", **kw)
    rel = lambda a: ((a - ref).norm() / (ref - w0).norm()).item()  # noqa: E731
    assert rel(ours) < 0.02  # measured 0.009-0.011
    # The tolerance is tight enough to catch a wrong momentum, Nesterov flag or weight decay:
    assert rel(run_muon(Muon, w0, grads, **{**kw, "momentum": 0.5})) > 0.1
    assert rel(run_muon(Muon, w0, grads, **{**kw, "nesterov": not nesterov})) > 0.1
    assert rel(run_muon(Muon, w0, grads, **{**kw, "weight_decay": 0.0})) > 0.1


def test_muon_batches_by_shape_as_single_matrices():
    """One Muon over matrices of three shapes (orthogonalised per shape in a batch) moves each matrix
    as a Muon over that matrix alone does, with MuonEq-R and a missing gradient among them."""
    torch.manual_seed(0)
    shapes = [(32, 48), (48, 32), (32, 48), (16, 16), (32, 48), (48, 32)]
    w0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    grads[1][4] = None
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1, row_normalize=True)
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = Muon(params, **kw)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = None if g is None else g.clone()
        opt.step()
    for i, p in enumerate(params):
        alone = torch.nn.Parameter(w0[i].clone())
        single = Muon([alone], **kw)
        for step in grads:
            alone.grad = None if step[i] is None else step[i].clone()
            single.step()
        assert ((p.data - alone.data).norm() / (alone.data - w0[i]).norm()).item() < 1e-2, i


def test_newton_schulz_equals_torch_implementation():
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    for shape in ((64, 32), (32, 96)):
        g = torch.randn(shape)
        assert torch.equal(zeropower_via_newtonschulz5(g, 5), _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7))


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 64)):
        s = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(shape), 5).float())
        assert s.min() > 0.5 and s.max() < 1.25


# Polar Express's published coefficients (Amsel et al. 2025, Algorithm 1 at five steps), written out
# here, not read from the script.
POLAR = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
         (4.042929935166739, -2.808917465908714, 0.5000178451051316),
         (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
         (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
         (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def polynomial_steps_float64(g: torch.Tensor, schedule) -> torch.Tensor:
    """The odd polynomial iteration in float64, the wide side last: x <- a x + b (x x^T) x + c (x x^T)^2 x."""
    x = g.double() / g.double().norm()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x if wide else x.T


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (128, 32)])
def test_polar_express_is_closer_to_the_polar_factor(shape):
    """MUON_POLAR=1: the bf16 iteration follows the float64 one with the published coefficients, and
    after five steps it is nearer the SVD's polar factor U V^T than the classic quintic (measured:
    relative error 0.09-0.15 against 0.21-0.23)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    ours = zeropower_via_newtonschulz5(g.float(), 5, polar=True).double()
    reference = polynomial_steps_float64(g, POLAR)
    assert (ours - reference).norm() / reference.norm() < 0.02  # bf16 rounding only
    classic = zeropower_via_newtonschulz5(g.float(), 5).double()
    error = lambda x: ((x - polar).norm() / polar.norm()).item()  # noqa: E731
    assert error(ours) < 0.7 * error(classic)
    assert error(reference) < 0.7 * error(polynomial_steps_float64(g, [(3.4445, -4.7750, 2.0315)] * 5))


def test_polar_express_needs_at_most_five_steps():
    with pytest.raises(ConfigError, match="coefficients for 5 Newton-Schulz steps"):
        Hyperparameters.from_env({"MUON_POLAR": "1", "MUON_BACKEND_STEPS": "6"})


def hp(**env):
    return Hyperparameters.from_env({"PRESET": "baseline", **{k: str(v) for k, v in env.items()}})


def test_warmdown_by_iterations():
    a = hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert [lr_multiplier(s, 0.0, a) for s in (0, 79, 80, 90, 99)] == [1.0, 1.0, 1.0, 0.5, 0.05]
    a = hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0, MIN_LR=0.1)  # a floor, not a new end point
    assert [lr_multiplier(s, 0.0, a) for s in (90, 97, 98, 99, 100)] == pytest.approx([0.5, 0.15, 0.1, 0.1, 0.1])


def test_warmdown_by_iterations_is_wallclock_aware():
    a = hp(ITERATIONS=10000, WARMDOWN_ITERS=10, MAX_WALLCLOCK_SECONDS=100)
    assert lr_multiplier(50, 80.0, a) == 1.0  # 1.6 s/step: 20 s left > 10 steps x 1.6 s
    assert lr_multiplier(50, 92.0, a) == pytest.approx(8.0 / (10 * 92.0 / 50))
    assert lr_multiplier(50, 100.0, a) == 0.0


def test_warmdown_by_fraction():
    a = hp(WARMDOWN_FRAC=0.5, MAX_WALLCLOCK_SECONDS=100, ITERATIONS=1000)
    assert lr_multiplier(10, 40.0, a) == 1.0
    assert lr_multiplier(10, 75.0, a) == pytest.approx(0.5)
    assert lr_multiplier(900, 10.0, a) == pytest.approx(0.2)  # iterations run out first
    a = hp(WARMDOWN_FRAC=0.72, MAX_WALLCLOCK_SECONDS=600, MIN_LR=0.1)
    assert lr_multiplier(1, 600 * (1 - 0.36), a) == pytest.approx(0.5)
    assert lr_multiplier(1, 600 * (1 - 0.036), a) == pytest.approx(0.1)  # (1 - f) / w = 0.05, floored


def test_linear_warmup():
    a = hp(WARMUP_STEPS=10, ITERATIONS=1000, WARMDOWN_ITERS=0)
    assert [lr_multiplier(s, 0.0, a) for s in (0, 4, 9, 10)] == [pytest.approx(0.1), pytest.approx(0.5), 1.0, 1.0]


def test_momentum_warmup():
    a = hp(MUON_MOMENTUM=0.95, MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=500)
    assert muon_momentum_at(0, a) == pytest.approx(0.85)
    assert muon_momentum_at(250, a) == pytest.approx(0.90)
    assert muon_momentum_at(5000, a) == pytest.approx(0.95)
    assert muon_momentum_at(3, hp(MUON_MOMENTUM_WARMUP_STEPS=0, MUON_MOMENTUM=0.9)) == 0.9


def test_muoneq_r_normalises_rows_before_newton_schulz():
    torch.manual_seed(0)
    w0, g = torch.randn(48, 32), torch.randn(48, 32) * torch.linspace(0.1, 5, 48)[:, None]
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    Muon([p], lr=0.02, momentum=0.9, row_normalize=True).step()
    u = g + 0.9 * g  # Nesterov from an empty buffer
    u = u / u.norm(dim=1, keepdim=True)
    expected = w0 - 0.02 * (zeropower_via_newtonschulz5(u, 5) * (48 / 32) ** 0.5).float()
    torch.testing.assert_close(p.data, expected, atol=1e-6, rtol=0)
    q = torch.nn.Parameter(w0.clone())
    q.grad = g.clone()
    Muon([q], lr=0.02, momentum=0.9).step()
    assert not torch.allclose(q.data, p.data, atol=1e-4)  # the switch matters


def test_adamw_groups_decay_decoupled():
    from test_arch import make

    model = make({"ADAM_WD": "0.5", "EMBED_WD": "0.25", "BIGRAM_VOCAB_SIZE": "10", "BIGRAM_DIM": "4"})
    args = model.args
    opt = build_optimizers(model, args, torch.device("cpu"))[0]
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.tok_emb.weight)] == decay[id(model.bigram.table.weight)] == 0.25
    assert decay[id(model.blocks[0].attn_scale)] == decay[id(model.bigram.proj.weight)] == 0.5
    before = model.blocks[0].attn_scale.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient leaves only the decoupled decay: p *= 1 - lr*wd
    torch.testing.assert_close(model.blocks[0].attn_scale.detach(), before * (1 - args.scalar_lr * 0.5))


def test_ema_and_swa_arithmetic_and_application():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema, swa = EMA(model, 0.9), SWA()
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    torch.testing.assert_close(ema.shadow[0], torch.full((1, 2), 0.29))  # 0.9*(0.9*0 + 0.1) + 0.1*2
    for value in (1.0, 2.0, 6.0):
        swa.add([torch.full((1, 2), value)])
    torch.testing.assert_close(swa.mean[0], torch.full((1, 2), 3.0))
    assert apply_final_weights(model, ema, swa) == "mean of EMA (decay 0.9) and the SWA mean of 3 snapshots"
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), (0.29 + 3.0) / 2))  # really applied
    assert apply_final_weights(model, None, swa) == "SWA mean of 3 snapshots" and torch.all(model.weight == 3.0)
    assert apply_final_weights(model, ema, SWA()) == "EMA (decay 0.9)" and torch.allclose(model.weight, ema.shadow[0])
    assert apply_final_weights(model, None, None) == "raw weights of the last step"


def test_late_qat_is_straight_through_fake_quantisation():
    """The forward uses the rounded weight (SDClip int6, computed here by hand), the backward passes
    the gradient to the float weight unchanged."""
    torch.manual_seed(0)
    lin = QATLinear(16, 8)
    x = torch.randn(4, 16)
    plain = lin(x)
    lin.qat = QuantSpec(6, "sdclip", 12.85)
    out = lin(x)
    w = lin.weight.detach()
    scale = (12.85 * w.std(dim=1) / 31).half().float()[:, None]
    wq = torch.clamp(torch.round(w / scale), -31, 31) * scale
    torch.testing.assert_close(out, x @ wq.T)
    assert not torch.allclose(out, plain)
    out.sum().backward()  # straight through: the gradient of w is that of the quantised weight
    torch.testing.assert_close(lin.weight.grad, torch.ones(4, 8).T @ x)


@pytest.mark.parametrize("bits, clip", [(6, "sdclip"), (6, "search"), (8, "quantile"), (5, "rowmax")])
def test_late_qat_trains_against_the_artifacts_grid(bits, clip):
    """For the same weights and scheme, the weight a QAT forward uses is exactly the weight the
    artifact stores (dequantised), and QAT covers exactly the matrices the artifact rounds."""
    from test_arch import make, randomize

    model = randomize(make({"MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MATRIX_BITS": str(bits),
                            "MATRIX_CLIP": clip, "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "512"}))
    args = model.args
    stored = dequantize_state_dict(quantize_state_dict(model.state_dict(), args))
    quantised = set(quantize_state_dict(model.state_dict(), args)["q"])
    message = LateQAT(args).set(model, True)
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, QATLinear) and m.qat is not None:
            seen.add(f"{name}.weight")
            assert torch.equal(fake_quantize(m.weight, m.qat), stored[f"{name}.weight"]), name
            assert not torch.equal(stored[f"{name}.weight"], m.weight), name  # rounding changed something
            x = torch.randn(3, m.in_features)
            torch.testing.assert_close(m(x), x @ stored[f"{name}.weight"].T, rtol=0, atol=1e-5)
    assert seen == quantised - {"tok_emb.weight"} and "bigram.proj.weight" in seen  # the embedding is no QATLinear
    assert message == f"int{bits} fake quantisation in {len(seen)} matrices"


def test_late_qat_switch_changes_the_compiled_forward():
    from conftest import counting_compile
    from test_arch import make, randomize, tokens

    compiles = []
    model = randomize(make({"MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MATRIX_BITS": "6"}))
    compiled = counting_compile(model, compiles)
    x = tokens()
    before = [compiled(x, x) for _ in range(2)]
    # mlp.fc and mlp.proj of 4 layers exceed 65,536 elements
    assert LateQAT(model.args).set(model, True) == "int6 fake quantisation in 8 matrices"
    after = [compiled(x, x) for _ in range(2)]
    assert len(compiles) == 2 and not torch.allclose(before[0], after[0])
    torch._dynamo.reset()


def test_parallel_muon_with_two_processes_equals_plain_muon(tiny_data, tmp_path):
    """Banks, reduce-scatter, batched Newton-Schulz and all-gather under torchrun with 2 CPU processes
    give the weights that unbanked Muon gives in one process with the same global batch (MuonEq-R,
    weight decay and clipping of the averaged gradients on). In one process without clipping the two
    are bit-identical; otherwise float rounding of the clip factor and of the reductions, amplified
    by bf16 Newton-Schulz, leaves a few % of a matrix's displacement (DDP with 2 processes against 1
    process: 1-3%; banked: 2-8%, measured), far below what a missing clip changes (20-30%) or a wrong
    slice or a missing average would."""
    import os
    import subprocess
    import sys

    from conftest import KNOB_NAMES, ROOT

    base = {k: v for k, v in os.environ.items() if k not in KNOB_NAMES}
    base.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = str(ROOT / "tests/dist_steps.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    runs = {
        "plain": ([sys.executable, script], "0", "0.3"),
        "banked2": (torchrun, "1", "0.3"),
        "plain_noclip": ([sys.executable, script], "0", "0"),
        "banked1_noclip": ([sys.executable, script], "1", "0"),
    }
    out = {}
    for name, (cmd, flag, clip) in runs.items():
        proc = subprocess.run(cmd + [str(tiny_data), str(tmp_path / f"{name}.pt")],
                              env={**base, "PARALLEL_MUON": flag, "GRAD_CLIP_NORM": clip},
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = torch.load(tmp_path / f"{name}.pt")
    init, ref = out["plain"]["init"], out["plain"]["final"]

    def rel(other: str, name: str) -> float:
        return ((out[other]["final"][name] - ref[name]).norm() / (ref[name] - init[name]).norm()).item()

    for name in ref:
        assert torch.equal(out["banked1_noclip"]["final"][name], out["plain_noclip"]["final"][name]), name
        assert rel("banked2", name) < (0.1 if name.endswith(".weight") and "blocks" in name else 0.01), name
    assert max(rel("plain_noclip", n) for n in ref) > 0.1  # the tolerance would notice a missing clip


def test_parallel_muon_continues_after_load_state_dict():
    """The compile warm-up undoes itself with load_state_dict, which replaces the group dicts; the
    banks must still find their group (a crash at the first real step of pr754 and pr1696)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    opt = ParallelMuon(weights, lr=0.02, momentum=0.9)
    saved = [w.detach().clone() for w in weights], copy.deepcopy(opt.state_dict())

    def step():
        for w in weights:
            w.grad = torch.ones_like(w)
        opt.reduce_gradients()
        opt.step()

    step()
    reference = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w, s in zip(weights, saved[0]):
            w.copy_(s)
    opt.load_state_dict(saved[1])
    step()
    assert all(torch.equal(w, r) for w, r in zip(weights, reference))


def test_compile_warmup_compiles_every_graph_the_run_uses(tiny_data):
    """After the warm-up, the run's real batches in every state it switches to (recurrence on, late
    QAT on) must reuse the warm-up's graphs: no recompilation inside the timed budget (a public
    record lost training time so)."""
    from conftest import TINY_VOCAB, counting_compile
    from train_gpt import (CPU_RUNTIME_FOR_TESTS, GPT, Context, DistributedTokenLoader, batch_split,
                           check_train_shards, compile_warmup, run_switches, training_step)

    args = Hyperparameters.from_env({
        "PRESET": "smoke", "VOCAB_SIZE": str(TINY_VOCAB), "NUM_LAYERS": "2", "MODEL_DIM": "256", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "LOOP_START": "0", "LOOP_END": "1", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "256",
        "COMPILE_WARMUP_STEPS": "4", "LATE_QAT_THRESHOLD": "0.15"})
    ctx = Context(args, CPU_RUNTIME_FOR_TESTS)
    torch.manual_seed(0)
    raw = GPT(args)
    optimizers = build_optimizers(raw, args, ctx.rt.device)
    compiles = []
    model = counting_compile(raw, compiles)
    accum, local = batch_split(ctx)
    switches = run_switches(args)
    assert [s.name for s in switches] == ["looping", "late_qat"]
    compile_warmup(model, raw, optimizers, switches, ctx, accum, local, (args.train_seq_len, 0))
    warmed = len(compiles)
    assert warmed == 4  # plain, looped, plain with QAT, looped with QAT
    loader = DistributedTokenLoader(check_train_shards(str(tiny_data)), TINY_VOCAB, 0, 1, ctx.rt.device)
    for looping, qat in ((False, False), (True, False), (True, True)):
        switches[0].set(raw, looping)
        switches[1].set(raw, qat)
        batches = [loader.next_batch(local, args.train_seq_len) for _ in range(accum)]
        training_step(model, optimizers, batches, ctx, accum)
    assert len(compiles) == warmed


def test_muon_grad_normalize_divides_each_gradient_by_its_norm():
    """MUON_GRAD_NORMALIZE: the same as Muon fed g / ||g||_F (computed here), for one matrix and for
    the banked optimiser, over three steps (so the momentum sees normalised gradients)."""
    torch.manual_seed(0)
    w0, grads = torch.randn(32, 48), [torch.randn(32, 48) * s for s in (0.1, 3.0, 0.5)]
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    ours = run_muon(Muon, w0, grads, grad_normalize=True, **kw)
    ref = run_muon(Muon, w0, [g / g.norm() for g in grads], **kw)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert not torch.allclose(run_muon(Muon, w0, grads, **kw), ref, atol=1e-3)  # it matters at these scales

    def banked(grads_):
        p = torch.nn.Parameter(w0.clone())
        opt = ParallelMuon([p], grad_normalize=grads_ is grads, **kw)
        for g in grads_:
            p.grad = g.clone()
            opt.reduce_gradients()
            opt.step()
        return p.data
    assert torch.allclose(banked(grads), banked([g / g.norm() for g in grads]), atol=1e-6)


def test_per_share_clipping_by_hand():
    """GRAD_CLIP_SCOPE=share: the step's gradient is the mean over micro-batches of each one's own
    gradient clipped to the norm (computed here with torch's clip_grad_norm_ per micro-batch)."""
    from train_gpt import CPU_RUNTIME_FOR_TESTS, Context, training_step
    from test_arch import make, randomize

    model = randomize(make({"GRAD_CLIP_NORM": "0.05", "GRAD_CLIP_SCOPE": "share"}))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(2, 64, (2, 16), generator=g), torch.randint(2, 64, (2, 16), generator=g)) for _ in range(3)]
    expected = None
    for x, y in batches:
        ref.zero_grad()
        ref(x, y).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
        grads = [p.grad.clone() / 3 for p in ref.parameters()]
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]

    class Capture(torch.optim.Optimizer):  # records the gradient the optimiser is given
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]]
    opt = Capture(list(model.parameters()))
    training_step(model, [opt], batches, Context(model.args, CPU_RUNTIME_FOR_TESTS), 3)
    for got, want in zip(opt.seen, expected):
        assert torch.allclose(got, want, atol=1e-6)
    per_batch = copy.deepcopy(model)  # the whole batch's clip gives another gradient
    per_batch.args = per_batch.args.replace("test", grad_clip_scope="batch")
    opt2 = Capture(list(per_batch.parameters()))
    training_step(per_batch, [opt2], batches, Context(per_batch.args, CPU_RUNTIME_FOR_TESTS), 3)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(opt2.seen, expected))


@pytest.mark.parametrize("env", [{"GRAD_CLIP_SCOPE": "share"}, {"PARALLEL_MUON": "1"}, {}])
def test_a_parameter_the_forward_does_not_use_gets_no_adam_step(env):
    """Layer recurrence's gates are unused until the switch: they keep no gradient, so AdamW neither
    moves them (weight decay included) nor spends its bias correction on them (as in PR #1658)."""
    from train_gpt import CPU_RUNTIME_FOR_TESTS, Context, training_step
    from test_arch import make

    model = make({"NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "2", "LOOP_MODE": "layer", "GRAD_CLIP_NORM": "0.3",
                  "ADAM_WD": "0.1", **env})
    model.looping = False
    optimizers = build_optimizers(model, model.args, torch.device("cpu"))
    x = torch.randint(2, 64, (2, 16))
    training_step(model, optimizers, [(x, x)], Context(model.args, CPU_RUNTIME_FOR_TESTS), 1)
    adam = optimizers[0]
    assert model.recur_gates not in adam.state and torch.all(model.recur_gates == 0)
    assert model.blocks[0].attn_scale in adam.state  # the others did step
