"""The pool that random subsets are drawn from: class-stratified quotas, and the learned examples that leave it."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def stratified_quotas(counts: Tensor, size: int, count: int, generator: torch.Generator) -> Tensor:
    """Class sizes of ``count`` class-stratified random subsets of ``size`` from a pool with class sizes ``counts``.

    Each class gets the floor or the ceiling of its share ``size * n_c / n``, and exactly its share on average: the
    fractional parts are rounded systematically (one uniform offset) over the classes in a random order, drawn anew
    for every subset. Largest-remainder rounding would give the spare slots to the same classes every time (with ten
    equal classes and batches of 128, the last two classes would get 12 examples in every batch, the others 13). A
    class whose share is below one slot is in a subset with that probability: a slot in every subset would give it
    its share's inverse times its weight (a class of 30 among 60,000 examples, about 16 times in batches of 128).

    Returns:
        ``(count, C)`` int64 quotas; every row sums to ``size``.
    """
    total = int(counts.sum())
    order = torch.rand(count, len(counts), generator=generator).argsort(dim=1)
    offset = torch.randint(total, (count, 1), generator=generator)
    return _rounded(counts, size, total, order, offset)


def sampled_class_budgets(counts: Tensor, budget: int, generator: torch.Generator) -> Tensor:
    """Picks per class for pools with more classes than picks: ``budget`` split in proportion to each row's class
    sizes ``counts`` ``(P, C)``, with the fractional parts rounded systematically as in :func:`stratified_quotas`.

    Each class gets the floor or the ceiling of its share ``budget * n_c / r``, and exactly its share on average: a
    class whose share is below one pick gets one with probability equal to its share, and none otherwise (there is
    no slot to give it). Every row sums to ``budget``; no class gets more picks than members.
    """
    total = counts.sum(1, keepdim=True)
    order = torch.rand(counts.shape, generator=generator).argsort(dim=1)
    # One uniform offset per row in [0, r).
    offset = (
        (torch.rand(len(counts), 1, generator=generator, dtype=torch.float64) * total)
        .long()
        .clamp(max=total - 1)
    )
    return _rounded(counts, budget, total, order, offset)


def _rounded(counts: Tensor, size: int, total: Tensor | int, order: Tensor, offset: Tensor) -> Tensor:
    """``size * counts / total`` per row ``(P, C)``, rounded systematically: the floor, and a spare slot for a class
    whose fractional part (the classes laid end to end in ``order``) holds one of the boundaries ``offset + j *
    total``, which happens with that fraction's probability for an offset uniform in ``[0, total)``."""
    base = size * counts // total
    # Fractional parts, in units of 1 / total; they sum to a multiple of total.
    remainders = (size * counts % total).expand_as(order).gather(1, order)
    ends = remainders.cumsum(dim=1)
    spare = (ends + offset) // total - (ends - remainders + offset) // total
    return base + torch.zeros_like(spare).scatter_(1, order, spare)


def learned_examples(
    max_loss: Tensor,
    pool: Tensor,
    labels: Tensor,
    *,
    threshold: float,
    min_pool_fraction: float,
    min_class_fraction: float,
    min_pool: int = 0,
) -> Tensor:
    """Pool examples to drop as learned: every loss recorded for them was at most ``threshold``.

    The most learned (lowest largest loss) go first. A class keeps at least ``ceil(min_class_fraction * n_c)``
    members in the pool and the pool at least ``max(ceil(min_pool_fraction * n), min_pool)`` examples; examples with
    no recorded loss (``NaN``) stay.

    Args:
        max_loss: ``(n,)`` largest loss recorded per example in the window, ``NaN`` where none was.
        pool: ``(n,)`` bool, examples still in the pool.
        labels: ``(n,)`` classes.
        threshold: Loss at or under which an example counts as learned.
        min_pool_fraction: Floor of the pool, as a fraction of ``n``.
        min_class_fraction: Floor of each class, as a fraction of its size.
        min_pool: Floor of the pool, as a number of examples (the callback passes its random subset size).

    Returns:
        ``(k,)`` int64 indices of the examples to drop.
    """
    num_classes = int(labels.max()) + 1
    candidates = torch.nonzero(pool & (max_loss <= threshold)).flatten()
    candidates = candidates[torch.argsort(max_loss[candidates], stable=True)]
    sizes = torch.bincount(labels, minlength=num_classes)
    in_pool = torch.bincount(labels[pool], minlength=num_classes)
    room = (in_pool - torch.ceil(min_class_fraction * sizes.double()).long()).clamp(min=0)
    classes = labels[candidates]
    # Rank of each candidate within its class, in order of increasing loss.
    by_class = torch.argsort(classes, stable=True)
    starts = torch.bincount(classes, minlength=num_classes).cumsum(0) - torch.bincount(
        classes, minlength=num_classes
    )
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(by_class)) - starts[classes[by_class]]
    dropped = candidates[rank < room[classes]]
    global_room = max(0, int(pool.sum()) - max(math.ceil(min_pool_fraction * len(pool)), min_pool))
    return dropped[:global_room]
