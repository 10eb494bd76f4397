"""weighted_cross_entropy, gradient_proxy and last_layer_sketch against autograd and the direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_crest import weighted_cross_entropy
from lightning_crest.selection import gradient_proxy, last_layer_sketch


def _batch(b: int = 8, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, c, (b,), generator=gen)
    return logits, targets, 2 * torch.rand(b, generator=gen, dtype=torch.float64)


def test_weighted_cross_entropy_is_the_weighted_mean_of_per_example_losses() -> None:
    logits, targets, weights = _batch()
    value = weighted_cross_entropy(logits, targets, weights)
    torch.testing.assert_close(value, (weights * F.cross_entropy(logits, targets, reduction="none")).mean())
    # The same in plain Python: log-sum-exp of the row minus the target's logit.
    losses = [
        math.log(sum(math.exp(z) for z in row)) - row[y]
        for row, y in zip(logits.tolist(), targets.tolist(), strict=True)
    ]
    expected = sum(w * loss for w, loss in zip(weights.tolist(), losses, strict=True)) / len(losses)
    assert float(value) == pytest.approx(expected, rel=1e-12)


def test_weighted_cross_entropy_with_unit_weights_is_cross_entropy() -> None:
    logits, targets, _ = _batch(seed=1)
    logits = logits.float()
    value = weighted_cross_entropy(logits, targets, torch.ones(8))
    torch.testing.assert_close(value, F.cross_entropy(logits, targets))


def test_weighted_cross_entropy_with_label_smoothing() -> None:
    logits, targets, weights = _batch(seed=3)
    value = weighted_cross_entropy(logits, targets, weights, label_smoothing=0.1)
    # The smoothed target puts 0.9 + 0.1 / C on the class and 0.1 / C on every other: its cross-entropy, by hand.
    log_probs = logits.log_softmax(1)
    smoothed = torch.full_like(log_probs, 0.1 / 5).scatter_(1, targets[:, None], 0.9 + 0.1 / 5)
    torch.testing.assert_close(value, (weights * -(smoothed * log_probs).sum(1)).mean())
    uniform = weighted_cross_entropy(logits, targets, torch.ones(8, dtype=torch.float64), label_smoothing=0.1)
    torch.testing.assert_close(uniform, F.cross_entropy(logits, targets, label_smoothing=0.1))
    # NumPy numbers pass, as torch takes them.
    torch.testing.assert_close(
        weighted_cross_entropy(logits, targets, weights, label_smoothing=np.float32(0.1)), value
    )
    # At 1 every target is uniform, as torch takes it.
    full = weighted_cross_entropy(logits, targets, weights, label_smoothing=1.0)
    torch.testing.assert_close(
        full, (weights * F.cross_entropy(logits, targets, reduction="none", label_smoothing=1.0)).mean()
    )
    for bad in (-0.1, 1.5, 1.0001):
        with pytest.raises(ValueError, match=rf"`label_smoothing` must lie in \[0.0, 1.0\], got {bad}"):
            weighted_cross_entropy(logits, targets, weights, label_smoothing=bad)
    # True passed the range check as 1.0: targets all uniform, a loss that no longer depends on the labels.
    for bad in (True, "0.1"):
        with pytest.raises(
            ValueError, match=f"`label_smoothing` must be a number in \\[0, 1\\], got {bad!r}"
        ):
            weighted_cross_entropy(logits, targets, weights, label_smoothing=bad)  # type: ignore[arg-type]


def test_weighted_cross_entropy_refuses_float_targets_and_weights_of_another_type() -> None:
    logits, targets, weights = _batch(seed=3)
    with pytest.raises(
        TypeError, match=r"`targets` must be an integer tensor of class indices, got dtype torch\.float"
    ):
        weighted_cross_entropy(logits, targets.float(), weights)
    with pytest.raises(TypeError, match="`weights` must be a tensor of shape \\(B,\\), got list"):
        weighted_cross_entropy(logits, targets, weights.tolist())  # type: ignore[arg-type]


def test_weighted_cross_entropy_gradients_reach_weights_and_logits() -> None:
    logits, targets, weights = _batch(seed=2)
    logits.requires_grad_()
    weights.requires_grad_()
    weighted_cross_entropy(logits, targets, weights).backward()
    rows = torch.arange(8)
    losses = torch.logsumexp(logits, dim=1) - logits[rows, targets]
    torch.testing.assert_close(weights.grad, losses.detach() / 8)
    onehot = torch.zeros(8, 5, dtype=torch.float64)
    onehot[rows, targets] = 1
    expected = weights.detach().unsqueeze(1) / 8 * (torch.softmax(logits.detach(), dim=1) - onehot)
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize(
    ("logits_dtype", "weights_dtype"),
    [(torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.float64, torch.float32)],
)
def test_weighted_cross_entropy_keeps_the_dtype_of_the_logits(
    logits_dtype: torch.dtype, weights_dtype: torch.dtype
) -> None:
    # Float32 weights (as the data module serves them) must not promote bf16 autocast logits, nor float64 weights
    # a float32 model's loss.
    logits, targets, weights = _batch(seed=5)
    value = weighted_cross_entropy(logits.to(logits_dtype), targets, weights.to(weights_dtype))
    assert value.dtype == logits_dtype
    expected = (weights * F.cross_entropy(logits.to(logits_dtype).double(), targets, reduction="none")).mean()
    tolerance = 5e-2 if logits_dtype == torch.bfloat16 else 1e-6
    assert float(value) == pytest.approx(float(expected), rel=tolerance)


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape", "weights_shape", "match"),
    [
        ((8, 5), (8,), (8, 1), r"`weights` must have the shape of `targets` \(8,\), got \(8, 1\)"),
        ((8, 5), (8,), (7,), r"`weights` must have the shape of `targets` \(8,\), got \(7,\)"),
        ((8, 5), (9,), (9,), r"`targets` must have shape \(8,\) to match .*, got \(9,\)"),
        ((8, 5), (8, 1), (8, 1), r"`targets` must have shape \(8,\) to match .*, got \(8, 1\)"),
        ((8,), (8,), (8,), r"`logits` must have shape \(B, C\), got \(8,\)"),
        ((8, 5, 2), (8,), (8,), r"`logits` must have shape \(B, C\), got \(8, 5, 2\)"),
    ],
    ids=["weights-2d", "weights-length", "targets-length", "targets-2d", "logits-1d", "logits-3d"],
)
def test_weighted_cross_entropy_bad_shapes_name_argument_and_shape(
    logits_shape: tuple[int, ...], targets_shape: tuple[int, ...], weights_shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_cross_entropy(
            torch.randn(logits_shape), torch.zeros(targets_shape, dtype=torch.long), torch.ones(weights_shape)
        )


def test_gradient_proxy_is_the_cross_entropy_gradient_per_example() -> None:
    logits, targets, _ = _batch(b=12, c=4, seed=3)
    targets[:4] = torch.arange(4)  # every class is some row's target
    logits.requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), logits)
    proxy = gradient_proxy(logits.detach(), targets)
    assert proxy.dtype == torch.float32
    for row in range(12):
        torch.testing.assert_close(proxy[row], expected[row].float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_proxy_of_low_precision_logits_is_float32(dtype: torch.dtype) -> None:
    logits, targets, _ = _batch(b=10, c=6, seed=4)
    low = (4 * logits).to(dtype)  # up to ~40: exp overflows in float16, not in the float32 softmax
    exact = low.double().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(exact, targets, reduction="sum"), exact)
    proxy = gradient_proxy(low, targets)
    assert proxy.dtype == torch.float32
    torch.testing.assert_close(proxy, expected.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (
            torch.zeros(3, 4, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            TypeError,
            "`logits` must be a floating-point .* torch.int64",
        ),
        (
            [[0.0, 1.0]],
            torch.zeros(1, dtype=torch.long),
            TypeError,
            "`logits` must be a floating-point tensor, got list",
        ),
        (torch.zeros(3, 4), torch.zeros(3), TypeError, "`targets` must be an integer .* torch.float32"),
        (
            torch.zeros(3, 4),
            torch.zeros(3, dtype=torch.bool),
            TypeError,
            "`targets` must be an integer .* torch.bool",
        ),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), ValueError, r"`logits` must have shape \(r, C\)"),
        (
            torch.zeros(3, 4),
            torch.zeros(2, dtype=torch.long),
            ValueError,
            r"`targets` must have shape \(3,\)",
        ),
        (torch.zeros(3, 4), torch.tensor([0, 4, 1]), ValueError, r"`targets` must lie in \[0, 4\)"),
        (torch.zeros(3, 4), torch.tensor([0, -1, 1]), ValueError, r"`targets` must lie in \[0, 4\)"),
    ],
)
def test_gradient_proxy_bad_input(
    logits: object, targets: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gradient_proxy(logits, targets)  # type: ignore[arg-type]


def _last_layer_gradients(classes: int, features: int = 7, rows: int = 6) -> tuple[torch.Tensor, ...]:
    """Logits, targets and embeddings of a linear layer, and each row's exact weight and bias gradient."""
    gen = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(features, classes)
    embeddings = torch.randn(rows, features, generator=gen)
    targets = torch.randint(0, classes, (rows,), generator=gen)
    grads = []
    for row in range(rows):
        loss = F.cross_entropy(layer(embeddings[row : row + 1]), targets[row : row + 1])
        weight, bias = torch.autograd.grad(loss, [layer.weight, layer.bias])
        grads.append((weight.flatten(), bias))
    with torch.no_grad():
        logits = layer(embeddings)
    weights = torch.stack([w for w, _ in grads])
    biases = torch.stack([b for _, b in grads])
    return logits, targets, embeddings, weights, biases


@pytest.mark.parametrize(
    ("classes", "dim", "width"),
    [(3, 12, 3 + 3 * 4), (5, 12, 5 + 3 * 4)],
    ids=["classes kept exactly", "classes projected"],
)
def test_last_layer_sketch_estimates_the_last_layers_gradient_geometry(
    classes: int, dim: int, width: int
) -> None:
    logits, targets, embeddings, weights, biases = _last_layer_gradients(classes)
    # Unbiased: over many projections, the sketches' inner products average to the weight gradients'.
    gen = torch.Generator().manual_seed(0)
    draws = 1000
    products = torch.zeros(len(logits), len(logits), dtype=torch.float64)
    squares = torch.zeros_like(products)
    for _ in range(draws):
        sketch = last_layer_sketch(logits, targets, embeddings, dim, gen)
        assert sketch.shape == (len(logits), width)
        assert sketch.dtype == torch.float32
        torch.testing.assert_close(sketch[:, :classes], biases)  # the bias's gradient, exactly
        gram = (sketch[:, classes:] @ sketch[:, classes:].T).double()
        products += gram
        squares += gram**2
    mean = products / draws
    error = ((squares / draws - mean**2) / draws).sqrt()
    exact = (weights @ weights.T).double()
    assert bool(((mean - exact).abs() <= 4 * error + 1e-6).all()), (mean - exact) / error
    # And a projection that keeps nothing apart would fail: the diagonal is far from zero.
    assert bool((exact.diagonal() > 10 * error.diagonal()).all())


def test_last_layer_sketch_bad_input() -> None:
    logits, targets, embeddings, _, _ = _last_layer_gradients(3)
    with pytest.raises(
        ValueError, match=r"`embeddings` must have shape \(6, D\) .* got a tensor of .* \(5, 7\)"
    ):
        last_layer_sketch(logits, targets, embeddings[:5], 8)
    with pytest.raises(ValueError, match="`dim` must be a positive int, got 0"):
        last_layer_sketch(logits, targets, embeddings, 0)
    with pytest.raises(ValueError, match=r"`targets` must lie in \[0, 3\)"):
        last_layer_sketch(logits, targets + 3, embeddings, 8)


@pytest.mark.parametrize("dim", [9, 20])
def test_last_layer_sketch_is_exact_on_the_class_side_when_the_classes_fit(dim: int) -> None:
    # C * C <= dim: the class side is the proxy itself, not a projection of it. With one embedding for both rows,
    # <s_i, s_j> = <p_i, p_j> |h B|^2, so the ratios of inner products are those of the proxies.
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 3, generator=gen), torch.tensor([0, 2])
    embeddings = torch.randn(1, 5, generator=gen).expand(2, 5)
    proxy = gradient_proxy(logits, targets)
    sketch = last_layer_sketch(logits, targets, embeddings, dim, torch.Generator().manual_seed(1))[:, 3:]
    assert sketch.shape == (2, 3 * (dim // 3))
    ratio = (sketch[0] @ sketch[1]) / (sketch[0] @ sketch[0])
    torch.testing.assert_close(ratio, (proxy[0] @ proxy[1]) / (proxy[0] @ proxy[0]), rtol=1e-5, atol=1e-6)
