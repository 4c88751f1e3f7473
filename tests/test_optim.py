"""Muon against torch.optim.Muon, Newton-Schulz orthogonality, and the schedules against
hand-computed values (SPEC section 3)."""

import pytest
import torch

from train_gpt import Hyperparameters, Muon, lr_multiplier, muon_momentum_at, zeropower_via_newtonschulz5


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


def hp(**env):
    return Hyperparameters.from_env({k: str(v) for k, v in env.items()})


def test_warmdown_by_iterations():
    a = hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert [lr_multiplier(s, 0.0, a) for s in (0, 79, 80, 90, 99)] == [1.0, 1.0, 1.0, 0.5, 0.05]
    a = hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0, MIN_LR=0.1)
    assert lr_multiplier(90, 0.0, a) == pytest.approx(0.55)
    assert lr_multiplier(100, 0.0, a) == pytest.approx(0.1)


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
    assert lr_multiplier(1, 600 * (1 - 0.36), a) == pytest.approx(0.1 + 0.9 * 0.5)


def test_linear_warmup():
    a = hp(WARMUP_STEPS=10, ITERATIONS=1000, WARMDOWN_ITERS=0)
    assert [lr_multiplier(s, 0.0, a) for s in (0, 4, 9, 10)] == [pytest.approx(0.1), pytest.approx(0.5), 1.0, 1.0]


def test_momentum_warmup():
    a = hp(MUON_MOMENTUM=0.95, MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=500)
    assert muon_momentum_at(0, a) == pytest.approx(0.85)
    assert muon_momentum_at(250, a) == pytest.approx(0.90)
    assert muon_momentum_at(5000, a) == pytest.approx(0.95)
    assert muon_momentum_at(3, hp(MUON_MOMENTUM_WARMUP_STEPS=0, MUON_MOMENTUM=0.9)) == 0.9
