"""Losses of weighted coreset batches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_crest.selection._gradients import check_logits_and_targets


def weighted_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``weights * cross_entropy`` over a batch: the loss of a weighted mini-batch coreset.

    CREST's weights average 1 within a coreset, so the value is on the scale of an ordinary mean loss and learning
    rates carry over from full-data training. Uniform batches (weights of 1) give plain cross-entropy.

    Args:
        logits: ``(B, C)`` class scores.
        targets: ``(B,)`` integer classes.
        weights: ``(B,)`` per-example weights, as served by :class:`~lightning_crest.CrestDataModule`.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the shapes are not ``(B, C)``, ``(B,)`` and ``(B,)``.
    """
    check_logits_and_targets(logits, targets, rows="B")
    if weights.shape != targets.shape:
        raise ValueError(
            f"`weights` must have the shape of `targets` {tuple(targets.shape)}, got {tuple(weights.shape)}."
        )
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (weights.to(losses.dtype) * losses).mean()
