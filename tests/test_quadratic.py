"""Tests for :mod:`lightning_crest.quadratic` (Hutchinson probes and the smoothed quadratic model)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_crest.quadratic import (
    QuadraticModel,
    hutchinson_diagonal,
    rademacher_like,
    relative_error,
)

EPS = 1e-4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


# --------------------------------------------------------------------------- rademacher_like


def test_rademacher_like_shapes_values_and_determinism() -> None:
    refs = [torch.empty(3, 4), torch.empty(5, dtype=torch.float64), torch.empty(2, 1, 2)]
    zs = rademacher_like(refs, _gen(1))
    assert [z.shape for z in zs] == [r.shape for r in refs]
    assert [z.dtype for z in zs] == [r.dtype for r in refs]
    flat = torch.cat([z.reshape(-1).float() for z in zs])
    assert set(flat.unique().tolist()) == {-1.0, 1.0}
    again = rademacher_like(refs, _gen(1))
    assert all(torch.equal(a, b) for a, b in zip(zs, again, strict=True))
    other = rademacher_like(refs, _gen(2))
    assert not all(torch.equal(a, b) for a, b in zip(zs, other, strict=True))
    # Balanced: mean of 100k signs has standard error 1/sqrt(1e5) ~ 3.2e-3.
    big = rademacher_like([torch.empty(100_000)], _gen(3))[0]
    assert abs(big.mean().item()) < 0.02
    assert rademacher_like([], _gen()) == []


def test_rademacher_like_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rademacher_like([torch.empty(10)], _gen())
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- hutchinson_diagonal


def test_hutchinson_exact_for_diagonal_hessian() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 7.0]])
    b = torch.tensor([0.3, -1.2, 2.5, 0.1])
    w = torch.randn(2, 3, generator=_gen(), requires_grad=True)
    v = torch.randn(4, generator=_gen(1), requires_grad=True)
    linear = torch.randn(3, generator=_gen(2), requires_grad=True)  # gradient is a constant
    unused = torch.randn(2, generator=_gen(3), requires_grad=True)  # loss does not depend on it
    params = [w, v, linear, unused]
    loss = 0.5 * (a * w**2).sum() + 0.5 * (b * v**2).sum() + (linear * 2.0).sum() + (w.sum() * 3.0)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    for seed in range(3):  # every probe is exact because z_i^2 = 1
        est = hutchinson_diagonal(grads, params, _gen(seed), retain_graph=True)
        torch.testing.assert_close(est[0], a, rtol=0, atol=0)
        torch.testing.assert_close(est[1], b, rtol=0, atol=0)
        assert torch.equal(est[2], torch.zeros(3))
        assert torch.equal(est[3], torch.zeros(2))
        assert all(e.dtype == torch.float32 and not e.requires_grad for e in est)


def _probe_mean(
    make_grads: Callable[[], tuple[Tensor, ...]], params: Sequence[Tensor], n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Mean and one single probe of ``n`` Hutchinson probes, flattened."""
    grads = make_grads()
    gen = _gen(seed)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    first = None
    for _ in range(n):
        est = _flat(hutchinson_diagonal(grads, params, gen, retain_graph=True)).double()
        first = est if first is None else first
        total += est
    assert first is not None
    return total / n, first


def test_hutchinson_mean_converges_for_full_symmetric_hessian() -> None:
    m = torch.randn(6, 6, generator=_gen(5), dtype=torch.float64)
    a = m + m.T + 6.0 * torch.eye(6, dtype=torch.float64)
    w = torch.randn(6, generator=_gen(6), dtype=torch.float64, requires_grad=True)

    def make_grads() -> tuple[Tensor, ...]:
        return torch.autograd.grad(0.5 * w @ a @ w, [w], create_graph=True)

    n = 4000
    mean, single = _probe_mean(make_grads, [w], n, seed=7)
    # Per entry, z_i (A z)_i = A_ii + sum_{j != i} A_ij z_i z_j; the products z_i z_j (j != i) are
    # uncorrelated, zero-mean, unit-variance, so Var = sum_{j != i} A_ij^2 and the standard error of the
    # mean is sqrt(Var / n). 5 standard errors: a false failure has probability < 1e-5 per entry.
    diag = torch.diagonal(a)
    se = ((a**2).sum(1) - diag**2).div(n).sqrt()
    assert torch.all((mean - diag).abs() <= 5 * se), (mean, diag, se)
    # The tolerance is meaningful: one probe is far off and the tolerance is much tighter than that.
    assert (single - diag).abs().max() > 10 * se.max()


def test_hutchinson_mean_matches_brute_force_hessian_of_tiny_mlp() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    init = _gen(9)
    with torch.no_grad():  # deterministic init without reseeding the global RNG
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=init, dtype=torch.float64))
    x = torch.randn(8, 3, generator=_gen(10), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=_gen(11))
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]

    def loss_of_flat(flat: Tensor) -> Tensor:
        chunks = [c.reshape(s) for c, s in zip(torch.split(flat, numels), shapes, strict=True)]
        out = functional_call(net, dict(zip(names, chunks, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(loss_of_flat, flat0)
    diag = torch.diagonal(hess)

    def make_grads() -> tuple[Tensor, ...]:
        loss = nn.functional.cross_entropy(net(x), y)
        return torch.autograd.grad(loss, params, create_graph=True)

    n = 500
    mean, _ = _probe_mean(make_grads, params, n, seed=12)
    # Same variance argument as for the quadratic: Var_i = sum_{j != i} H_ij^2. The small absolute term
    # covers float32 rounding of the per-probe output.
    se = ((hess**2).sum(1) - diag**2).div(n).sqrt()
    assert torch.all((mean - diag).abs() <= 5 * se + 1e-6), (mean - diag).abs().max()
    assert diag.abs().max() > 1e-2  # the target is not trivially zero


def test_hutchinson_through_a_sparse_embedding_is_the_dense_ones() -> None:
    # nn.Embedding(sparse=True) gives sparse gradients, and a sparse H z: returned dense, as with sparse=False.
    torch.manual_seed(0)
    tokens = torch.randint(0, 12, (16, 5))
    targets = torch.randint(0, 3, (16,))
    probes = []
    for sparse in (False, True):
        torch.manual_seed(1)
        embedding, head = nn.Embedding(12, 4, sparse=sparse), nn.Linear(4, 3)
        params = [embedding.weight, *head.parameters()]
        loss = nn.functional.cross_entropy(head(torch.tanh(embedding(tokens)).mean(1)), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        assert grads[0].is_sparse is sparse
        probes.append(hutchinson_diagonal(grads, params, torch.Generator().manual_seed(2)))
    for dense, from_sparse in zip(*probes, strict=True):
        assert not from_sparse.is_sparse
        torch.testing.assert_close(from_sparse, dense)
    assert bool(probes[1][0].abs().sum() > 0)


def test_hutchinson_validates_inputs() -> None:
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="got 0 gradients for 1 parameters"):
        hutchinson_diagonal([], [w])
    with pytest.raises(ValueError, match=r"gradient 0 has shape \(4,\), parameter has \(3,\)"):
        hutchinson_diagonal([torch.zeros(4)], [w])


# --------------------------------------------------------------------------- relative_error


def test_relative_error() -> None:
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(0.9, 1.0) == pytest.approx(0.1)
    assert relative_error(-2.0, -1.0) == pytest.approx(1.0)
    assert relative_error(0.0, 0.0) == 0.0
    err = relative_error(1e-3, 0.0)  # guard: finite and huge instead of ZeroDivisionError
    assert math.isfinite(err)
    assert err > 1e6


# --------------------------------------------------------------------------- QuadraticModel


class _Quadratic:
    """L(w) = c + b^T w + 1/2 sum_i a_i w_i^2 over two parameter tensors; diagonal Hessian ``a``."""

    def __init__(self) -> None:
        self.a = [torch.tensor([[1.0, 2.0], [0.5, 3.0]]), torch.tensor([4.0, 0.25, 1.5])]
        self.b = [torch.tensor([[0.2, -0.1], [0.3, 0.0]]), torch.tensor([-0.5, 0.4, 0.1])]
        self.c = 1.7

    def loss(self, params: list[Tensor]) -> Tensor:
        total = torch.tensor(self.c)
        for p, a, b in zip(params, self.a, self.b, strict=True):
            total = total + (b * p).sum() + 0.5 * (a * p**2).sum()
        return total

    def grad(self, params: list[Tensor]) -> list[Tensor]:
        return [b + a * p.detach() for p, a, b in zip(params, self.a, self.b, strict=True)]

    def params(self) -> list[Tensor]:
        return [
            torch.tensor([[0.5, -1.0], [2.0, 0.3]], requires_grad=True),
            torch.tensor([1.0, -0.7, 0.2], requires_grad=True),
        ]


def _fitted(q: _Quadratic, params: list[Tensor], **kwargs: float) -> QuadraticModel:
    model = QuadraticModel(**kwargs)
    model.update(q.grad(params), q.a)
    model.anchor(params, float(q.loss(params).detach()))
    return model


def _expected_prediction(q: _Quadratic, params: list[Tensor], w0: Tensor, eps: float) -> float:
    # The model uses a + eps as curvature, so it overshoots the true loss by eps/2 * ||delta||^2.
    d = _flat(params) - w0
    return float(q.loss(params).detach()) + 0.5 * eps * float(d.double().square().sum())


def test_predict_is_exact_on_a_quadratic() -> None:
    q = _Quadratic()
    params = q.params()
    w0 = _flat(params)
    model = _fitted(q, params)
    assert model.predict(params) == pytest.approx(float(q.loss(params).detach()), rel=1e-6)
    gen = _gen(20)
    for scale in (0.01, 0.3, 1.0, 3.0):
        moved = [(p + scale * torch.randn(p.shape, generator=gen)).detach() for p in params]
        expected = _expected_prediction(q, moved, w0, EPS)
        assert model.predict(moved) == pytest.approx(expected, rel=1e-5, abs=1e-5)
        # The eps offset is visible at large displacements, so accounting for it matters.
        if scale == 3.0:
            assert abs(expected - float(q.loss(moved).detach())) > 1e-4


def test_single_update_is_bias_corrected_exactly() -> None:
    g = [torch.tensor([0.5, -2.0]), torch.tensor([[3.0]])]
    h = [torch.tensor([-1.5, 0.25]), torch.tensor([[4.0]])]
    model = QuadraticModel()
    model.update(g, h)
    assert model.step == 1
    assert torch.equal(model.gradient, _flat(g))
    assert torch.equal(model.hessian, _flat(h).abs() + EPS)


def test_ema_matches_independent_formula() -> None:
    beta1, beta2 = 0.9, 0.999
    g1, g2, g3 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([0.2, 1, 4])
    h1, h2, h3 = torch.tensor([2.0, -1.0, 0.1]), torch.tensor([0.5, 3.0, 0.3]), torch.tensor([1.0, 1, -2])
    model = QuadraticModel(beta1, beta2)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    for t, (g, h) in enumerate([(g1, h1), (g2, h2), (g3, h3)], start=1):
        model.update([g], [h])
        m = beta1 * m + (1 - beta1) * g.double()
        v = beta2 * v + (1 - beta2) * h.double() ** 2
        torch.testing.assert_close(model.gradient.double(), m / (1 - beta1**t), rtol=1e-6, atol=1e-7)
        expected_h = (v / (1 - beta2**t)).sqrt() + EPS
        torch.testing.assert_close(model.hessian.double(), expected_h, rtol=1e-6, atol=1e-7)
    # Smoothing is real: the result differs from the last observation.
    assert not torch.allclose(model.gradient, g3)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=1e-2),
    ],
    ids=["sgd-momentum-wd", "adam-wd"],
)
def test_delta_is_real_parameter_change_under_optimizers(
    make_opt: Callable[[list[Tensor]], torch.optim.Optimizer],
) -> None:
    q = _Quadratic()
    params = q.params()
    opt = make_opt(params)
    for _ in range(3):  # build up optimizer state before the anchor
        opt.zero_grad()
        q.loss(params).backward()
        opt.step()
    model = _fitted(q, params)
    w0 = _flat(params).clone()
    for _ in range(5):
        opt.zero_grad()
        q.loss(params).backward()
        opt.step()
    d = model.delta(params)
    assert torch.equal(d, _flat(params) - w0)
    # Momentum / Adam / weight decay make the step differ from -lr * gradient, yet delta is still exact.
    assert d.abs().max() > 1e-3
    expected = _expected_prediction(q, params, w0, EPS)
    assert model.predict(params) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_check_interval_follows_curvature_ratio() -> None:
    # beta2 = 0 disables smoothing and eps = 0.25 keeps every value exact in float32.
    model = QuadraticModel(beta1=0.0, beta2=0.0, eps=0.25)
    w = [torch.zeros(4)]
    model.update([torch.zeros(4)], [torch.full((4,), 3.75)])  # hessian = 4
    model.anchor(w, 1.0)
    ref = model.reference_norm
    assert ref == pytest.approx(8.0)
    assert model.check_interval(3.0) == 3
    model.update([torch.zeros(4)], [torch.full((4,), 1.75)])  # curvature halves: hessian = 2
    assert model.check_interval(3.0) == 6
    assert model.check_interval(2.5) == 5
    assert model.check_interval(0.1) == 1  # ceil(0.2)
    model.anchor(w, 0.5)  # later anchors keep H_0
    assert model.reference_norm == ref
    model.update([torch.zeros(4)], [torch.full((4,), 7.75)])  # curvature doubles: hessian = 8
    assert model.check_interval(3.0) == 2  # ceil(1.5)
    assert model.check_interval(1.0) == 1  # ceil(0.5), never below 1
    for h in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="h must be a positive finite number"):
            model.check_interval(h)


def test_check_interval_of_a_ratio_that_float32_rounding_puts_above_an_integer() -> None:
    # The curvature falls to a third of its reference (diagonal a, then a / 3, eps included); its float32 norms give
    # a ratio of 3.000000114, which is 3.
    a = torch.rand(5, generator=torch.Generator().manual_seed(3)) + 0.5
    model = QuadraticModel(beta1=0.0, beta2=0.0)
    model.update([torch.zeros(5)], [a])
    model.anchor([torch.zeros(5)], 1.0)
    model.update([torch.zeros(5)], [(a + model.eps) / 3 - model.eps])
    assert 3 < model.reference_norm / model.curvature_norm() < 3 + 1e-6
    assert model.check_interval(1.0) == 3


def test_check_interval_before_reference_raises() -> None:
    model = QuadraticModel()
    model.anchor([torch.zeros(2)], 1.0)  # anchor before any update records no reference
    model.update([torch.zeros(2)], [torch.ones(2)])
    with pytest.raises(RuntimeError, match="reference curvature"):
        model.check_interval(1.0)
    model.anchor([torch.zeros(2)], 1.0)
    assert model.check_interval(1.0) == 1


def test_state_dict_round_trip() -> None:
    q = _Quadratic()
    params = q.params()
    model = QuadraticModel(beta1=0.8, beta2=0.99)
    gen = _gen(30)
    for _ in range(4):
        noisy = [p + 0.1 * torch.randn(p.shape, generator=gen) for p in params]
        model.update(q.grad(noisy), [a + 0.1 * torch.rand(a.shape, generator=gen) for a in q.a])
    model.anchor(params, float(q.loss(params).detach()))
    model.update(q.grad(params), q.a)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = QuadraticModel()
    restored.load_state_dict(torch.load(buf, weights_only=True))

    moved = [(p + 0.2).detach() for p in params]
    assert restored.predict(moved) == model.predict(moved)
    assert restored.step == model.step == 5
    assert torch.equal(restored.gradient, model.gradient)
    assert torch.equal(restored.hessian, model.hessian)
    assert restored.reference_norm == model.reference_norm
    assert restored.check_interval(7.0) == model.check_interval(7.0)
    assert (restored.beta1, restored.beta2) == (0.8, 0.99)
    # The restored copy is independent of the original.
    model.update(q.grad(moved), q.a)
    assert restored.step == 5


def test_a_state_dict_is_a_snapshot() -> None:
    # update() and anchor() change the averages and the anchor in place: a state kept in memory (an in-memory
    # checkpoint, one saved later) must not follow them.
    q = _Quadratic()
    params = q.params()
    model = QuadraticModel()
    model.update(q.grad(params), q.a)
    model.anchor(params, 1.0)
    state = model.state_dict()
    kept = {name: value.clone() for name, value in state.items() if isinstance(value, torch.Tensor)}
    assert {"grad_avg", "hess_sq_avg", "w0"} <= set(kept)
    moved = [(p + 0.5).detach() for p in params]
    model.update(q.grad(moved), [2 * a for a in q.a])
    model.anchor(moved, 2.0)
    for name, value in kept.items():
        assert torch.equal(state[name], value), name


def test_state_dict_round_trip_empty_state() -> None:
    buf = io.BytesIO()
    torch.save(QuadraticModel(eps=1e-3).state_dict(), buf)
    buf.seek(0)
    restored = QuadraticModel()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.step == 0
    assert not restored.is_anchored
    assert restored.eps == 1e-3
    with pytest.raises(RuntimeError, match="before anchor"):
        restored.predict([torch.zeros(2)])
    restored.update([torch.ones(2)], [torch.ones(2)])
    assert torch.equal(restored.gradient, torch.ones(2))


def test_load_state_dict_rejects_malformed_state() -> None:
    good = QuadraticModel().state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['beta1', "):
        QuadraticModel().load_state_dict({"version": 1, "step": 0})
    with pytest.raises(ValueError, match="step > 0"):
        QuadraticModel().load_state_dict({**good, "step": 3})
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got 1.5"):
        QuadraticModel().load_state_dict({**good, "beta1": 1.5})


def test_updates_without_a_probe_leave_the_curvature_and_its_bias_correction() -> None:
    beta1, beta2 = 0.9, 0.99
    gen = _gen(5)
    model = QuadraticModel(beta1, beta2)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    probes = 0
    for t, probed in enumerate([True, False, False, True, False, True], start=1):
        g, h = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
        before = model.hessian.clone() if t > 1 else None
        model.update([g], [h] if probed else None)
        if not probed:
            assert before is not None
            assert torch.equal(model.hessian, before)
        m = beta1 * m + (1 - beta1) * g.double()
        if probed:
            probes += 1
            v = beta2 * v + (1 - beta2) * h.double() ** 2
        assert (model.step, model.curvature_steps) == (t, probes)
        torch.testing.assert_close(model.gradient.double(), m / (1 - beta1**t), rtol=1e-6, atol=1e-7)
        # The curvature is corrected by its own count of probes, not by the count of updates.
        expected_h = (v / (1 - beta2**probes)).sqrt() + EPS
        torch.testing.assert_close(model.hessian.double(), expected_h, rtol=1e-6, atol=1e-7)


def test_first_update_needs_a_probe() -> None:
    model = QuadraticModel()
    with pytest.raises(ValueError, match=r"first update\(\) needs a Hessian diagonal"):
        model.update([torch.ones(3)])
    assert model.step == 0


def test_state_dict_keeps_the_count_of_probes() -> None:
    model = QuadraticModel()
    model.update([torch.ones(2)], [torch.ones(2)])
    model.update([torch.zeros(2)])
    state = model.state_dict()
    restored = QuadraticModel()
    restored.load_state_dict(state)
    assert (restored.step, restored.curvature_steps) == (2, 1)
    restored.update([torch.ones(2)], [3 * torch.ones(2)])
    model.update([torch.ones(2)], [3 * torch.ones(2)])
    assert torch.equal(restored.hessian, model.hessian)
    old = {k: v for k, v in state.items() if k != "hess_step"}
    with pytest.raises(ValueError, match="missing keys \\['hess_step'\\]"):
        QuadraticModel().load_state_dict(old)
    for probes in (0, 3):
        with pytest.raises(ValueError, match=f"{probes} curvature probes in 2 updates"):
            QuadraticModel().load_state_dict({**state, "hess_step": probes})
    for version in (None, 0, 2):
        with pytest.raises(ValueError, match=f"version {version!r}; this library reads version 1"):
            QuadraticModel().load_state_dict({**state, "version": version})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta1": 1.0}, "beta1"),
        ({"beta1": -0.1}, "beta1"),
        ({"beta1": float("nan")}, "beta1"),
        ({"beta2": 1.0}, "beta2"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-4}, "eps"),
        ({"eps": float("inf")}, "eps"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        QuadraticModel(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)


def test_usage_errors() -> None:
    model = QuadraticModel()
    w = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="before anchor"):
        model.predict(w)
    with pytest.raises(RuntimeError, match="before anchor"):
        model.delta(w)
    with pytest.raises(RuntimeError, match="update"):
        _ = model.gradient
    with pytest.raises(RuntimeError, match="update"):
        model.curvature_norm()
    model.anchor(w, 1.0)
    with pytest.raises(RuntimeError, match="update"):  # anchored but no statistics yet
        model.predict(w)
    model.update([torch.ones(3)], [torch.ones(3)])
    assert model.predict(w) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same parameter list"):
        model.update([torch.ones(4)], [torch.ones(4)])
    with pytest.raises(ValueError, match="Hessian diagonal"):
        QuadraticModel().update([torch.ones(3)], [torch.ones(2)])
    with pytest.raises(ValueError, match="params have 5 entries, the anchor has 3"):
        model.predict([torch.zeros(5)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_params_with_cpu_generator() -> None:
    w = torch.randn(5, device="cuda", requires_grad=True)
    a = torch.arange(1.0, 6.0, device="cuda")
    grads = torch.autograd.grad(0.5 * (a * w**2).sum(), [w], create_graph=True)
    est = hutchinson_diagonal(grads, [w], _gen())
    assert est[0].device.type == "cuda"
    torch.testing.assert_close(est[0], a)
    model = QuadraticModel()
    model.update([g.detach() for g in grads], est)
    model.anchor([w], 1.0)
    assert model.gradient.device.type == "cuda"
    assert model.predict([w]) == pytest.approx(1.0)


def test_check_interval_with_an_explicit_reference() -> None:
    model = QuadraticModel(beta2=0.0, eps=0.25)
    params = [torch.zeros(4)]
    model.update([torch.zeros(4)], [torch.full((4,), 1.75)])  # hessian = 1.75 + 0.25 = 2, norm 4
    model.anchor(params, 1.0)
    assert model.check_interval(1.0, reference=12.0) == 3
    assert model.check_interval(2.0, reference=4.0) == 2
    assert model.check_interval(1.0, reference=1.0) == 1


def test_hutchinson_gives_zeros_where_there_is_no_curvature() -> None:
    # A frozen parameter, and a loss linear in the other: the documented zeros, in float32, without a crash.
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    frozen = torch.tensor([3.0, 4.0, 5.0])
    (grad,) = torch.autograd.grad(0.5 * (torch.tensor([2.0, 3.0]) * w**2).sum(), [w], create_graph=True)
    estimate = hutchinson_diagonal([grad, None], [w, frozen], torch.Generator().manual_seed(0))
    assert torch.equal(estimate[0], torch.tensor([2.0, 3.0]))
    assert estimate[0].dtype == torch.float32
    assert torch.equal(estimate[1], torch.zeros(3))
    (linear,) = torch.autograd.grad(3.0 * w.sum(), [w], create_graph=True)
    estimate = hutchinson_diagonal([linear], [w], torch.Generator().manual_seed(0))
    assert torch.equal(estimate[0], torch.zeros(2))


def _trained_state(size: int = 3) -> dict[str, object]:
    model = QuadraticModel()
    model.update([torch.ones(size)], [torch.ones(size)])
    model.anchor([torch.zeros(size)], 1.0)
    return model.state_dict()


def test_load_state_dict_rejects_inconsistent_sizes_and_anchors() -> None:
    state = _trained_state()
    with pytest.raises(ValueError, match=r"tensor sizes differ \[3, 4\]"):
        QuadraticModel().load_state_dict({**state, "w0": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"tensor sizes differ \[2, 3\]"):
        QuadraticModel().load_state_dict({**state, "hess_sq_avg": torch.ones(2)})
    with pytest.raises(ValueError, match="w0 and loss0 must both be set or both be None"):
        QuadraticModel().load_state_dict({**state, "loss0": None})
    with pytest.raises(ValueError, match="w0 and loss0 must both be set or both be None"):
        QuadraticModel().load_state_dict({**state, "w0": None})
    with pytest.raises(ValueError, match=r"state\['w0'\] must be None or a 1-D tensor"):
        QuadraticModel().load_state_dict({**state, "w0": torch.zeros(1, 3)})


def test_loaded_state_does_not_alias_the_saved_tensors() -> None:
    state = _trained_state()
    model = QuadraticModel()
    model.load_state_dict(state)
    before = model.predict([torch.ones(3)])
    for name in ("grad_avg", "hess_sq_avg", "w0"):
        state[name].add_(100.0)  # type: ignore[union-attr]
    assert model.predict([torch.ones(3)]) == before
    assert torch.equal(model.gradient, torch.ones(3))


def test_anchor_fixes_the_size_before_any_update() -> None:
    model = QuadraticModel()
    model.anchor([torch.zeros(3)], 1.0)
    with pytest.raises(ValueError, match="got 4 entries but the model tracks 3"):
        model.update([torch.ones(4)], [torch.ones(4)])
    assert model.step == 0


def test_stored_vectors_are_detached_copies() -> None:
    w = torch.ones(3, requires_grad=True)
    grad = w * 2  # part of a graph
    model = QuadraticModel()
    model.update([grad], [grad * 3])
    model.anchor([w], torch.tensor(1.5, requires_grad=True))
    assert not model.gradient.requires_grad
    assert not model.hessian.requires_grad
    assert not model.delta([w]).requires_grad
    assert model.anchor_loss == 1.5
    with torch.no_grad():
        w.add_(1.0)  # moving the parameters afterwards moves them away from the recorded w0
    assert torch.equal(model.delta([w]), torch.ones(3))


def test_to_moves_every_stored_vector() -> None:
    model = QuadraticModel()
    model.update([torch.ones(3)], [torch.ones(3)])
    model.anchor([torch.zeros(3)], 1.0)
    assert model.to("meta") is model
    state = model.state_dict()
    for name in ("grad_avg", "hess_sq_avg", "w0"):
        assert state[name].device.type == "meta", name


def test_hutchinson_frees_the_double_backward_graph_unless_asked_to_keep_it() -> None:
    w = torch.randn(5, generator=_gen(0), requires_grad=True)
    (grad,) = torch.autograd.grad((w**4).sum(), [w], create_graph=True)
    gen = _gen(1)
    hutchinson_diagonal([grad], [w], gen, retain_graph=True)
    hutchinson_diagonal([grad], [w], gen)  # the graph kept once more, then freed
    with pytest.raises(RuntimeError, match=r"backward through the graph a second time"):
        hutchinson_diagonal([grad], [w], gen)
