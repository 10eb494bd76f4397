"""Per-example gradient proxies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_crest._checks import check_integer_tensor


def gradient_proxy(logits: Tensor, targets: Tensor) -> Tensor:
    """Gradient of the cross-entropy loss with respect to the logits, one row per example.

    ``softmax(z_i) - onehot(y_i)`` is the last-layer gradient that CREST (and CRAIG before it) uses as a cheap,
    low-dimensional stand-in for the full per-example gradient.

    Args:
        logits: ``(r, C)`` class scores, any floating dtype.
        targets: ``(r,)`` integer class indices in ``[0, C)``.

    Returns:
        ``(r, C)`` float32 tensor on the logits' device.

    Raises:
        TypeError: If ``logits`` is not floating point or ``targets`` not integer.
        ValueError: If the shapes disagree or a target lies outside ``[0, C)``.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"`logits` must be a floating-point tensor, got {_describe(logits)}.")
    check_integer_tensor("targets", targets, "class indices")
    check_logits_and_targets(logits, targets, rows="r")
    num_classes = logits.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"`targets` must lie in [0, {num_classes}) for logits with {num_classes} classes, "
            f"got values in [{int(targets.min())}, {int(targets.max())}]."
        )
    proxy = torch.softmax(logits.float(), dim=1)
    return proxy - F.one_hot(targets.long(), num_classes).to(proxy.dtype)


def last_layer_sketch(
    logits: Tensor, targets: Tensor, embeddings: Tensor, dim: int, generator: torch.Generator | None = None
) -> Tensor:
    """Gradient proxies of the whole last linear layer: :func:`gradient_proxy` (the bias's gradient), followed by
    a random sketch of each example's weight gradient ``(softmax(z_i) - onehot(y_i)) h_i^T``, ``h_i`` the layer's
    input (the penultimate embedding), without forming that ``C x D`` matrix.

    The sketch is ``((p_i - y_i) A) kron (h_i B)`` with Gaussian ``A`` (``C x k1``) and ``B`` (``D x k2``), entries of
    variance ``1/k1`` and ``1/k2``: its inner products, and so its squared distances, are unbiased estimates of
    those of the weight gradients. ``k1 = C`` with ``A`` the identity (exact on the class side) when ``C * C <=
    dim``; otherwise ``k1 = floor(sqrt(dim))``. ``k2 = dim // k1``.

    Args:
        logits: ``(r, C)`` class scores.
        targets: ``(r,)`` class indices in ``[0, C)``.
        embeddings: ``(r, D)`` inputs of the last linear layer.
        dim: Size of the sketch, ``k1 * k2 <= dim``.
        generator: Source of the projections (a CPU generator); ``None`` uses torch's default one.

    Returns:
        ``(r, C + k1 * k2)`` float32 tensor on the logits' device.
    """
    proxy = gradient_proxy(logits, targets)
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or len(embeddings) != len(proxy):
        raise ValueError(
            f"`embeddings` must have shape ({len(proxy)}, D) to match `logits` {tuple(logits.shape)}, got "
            f"{_describe(embeddings)}."
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
    classes, features = proxy.shape[1], embeddings.shape[1]
    left = classes if classes * classes <= dim else math.isqrt(dim)
    right = dim // left
    device = proxy.device
    if left < classes:
        projection = torch.randn(classes, left, generator=generator).div_(math.sqrt(left))
        left_part = proxy @ projection.to(device)
    else:
        left_part = proxy
    projection = torch.randn(features, right, generator=generator).div_(math.sqrt(right))
    right_part = embeddings.float() @ projection.to(device)
    sketch = (left_part[:, :, None] * right_part[:, None, :]).flatten(1)
    return torch.cat([proxy, sketch], dim=1)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def check_logits_and_targets(logits: Tensor, targets: Tensor, rows: str) -> None:
    """Raise a ``ValueError`` naming the argument unless ``logits`` is ``(rows, C)`` and ``targets`` ``(rows,)``."""
    if logits.ndim != 2:
        raise ValueError(f"`logits` must have shape ({rows}, C), got {tuple(logits.shape)}.")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"`targets` must have shape ({logits.shape[0]},) to match `logits` {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}."
        )
