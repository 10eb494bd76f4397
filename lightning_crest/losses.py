"""Losses of weighted coreset batches."""

from __future__ import annotations

import numbers

import torch.nn.functional as F
from torch import Tensor

from lightning_crest._checks import check_integer_tensor, check_range
from lightning_crest.selection._gradients import check_logits_and_targets


def weighted_cross_entropy(
    logits: Tensor, targets: Tensor, weights: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """Mean of ``weights * cross_entropy`` over a batch: the loss of a weighted mini-batch coreset.

    CREST's weights average 1 within a coreset, so the value is on the scale of an ordinary mean loss and learning
    rates carry over from full-data training. Uniform batches (weights of 1) give plain cross-entropy.

    Args:
        logits: ``(B, C)`` class scores.
        targets: ``(B,)`` integer classes.
        weights: ``(B,)`` per-example weights, as served by :class:`~lightning_crest.CrestDataModule`.
        label_smoothing: As :func:`torch.nn.functional.cross_entropy` takes it, in ``[0, 1]``. It changes the
            training loss only: CrestCallback scores examples with its own ``per_example_loss`` (plain
            cross-entropy by default), which is what ``drop_threshold`` is compared with.

    Returns:
        A scalar tensor.

    Raises:
        TypeError: If ``targets`` is not an integer tensor or ``weights`` not a tensor.
        ValueError: If the shapes are not ``(B, C)``, ``(B,)`` and ``(B,)``, or ``label_smoothing`` is not a number
            in ``[0, 1]``.
    """
    check_logits_and_targets(logits, targets, rows="B")
    check_integer_tensor("targets", targets, "class indices")
    if not isinstance(weights, Tensor):
        raise TypeError(f"`weights` must be a tensor of shape (B,), got {type(weights).__name__}.")
    if weights.shape != targets.shape:
        raise ValueError(
            f"`weights` must have the shape of `targets` {tuple(targets.shape)}, got {tuple(weights.shape)}."
        )
    # Any real number (NumPy's too, as torch takes them); a bool would pass as 0 or 1.
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise ValueError(f"`label_smoothing` must be a number in [0, 1], got {label_smoothing!r}.")
    check_range("label_smoothing", float(label_smoothing), 0.0, 1.0)
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    return (weights.to(losses.dtype) * losses).mean()
