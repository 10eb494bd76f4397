"""Per-example gradient proxies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"`targets` must be an integer tensor of class indices, got {_describe(targets)}.")
    check_logits_and_targets(logits, targets, rows="r")
    num_classes = logits.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"`targets` must lie in [0, {num_classes}) for logits with {num_classes} classes, "
            f"got values in [{int(targets.min())}, {int(targets.max())}]."
        )
    proxy = torch.softmax(logits.float(), dim=1)
    return proxy - F.one_hot(targets.long(), num_classes).to(proxy.dtype)


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
