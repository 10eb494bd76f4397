"""The pool's pure functions: class-stratified quotas of the random subsets, and the learned examples to drop."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_crest.pool import learned_examples, sampled_class_budgets, stratified_quotas


def test_stratified_quotas_round_each_share_up_or_down_and_are_exact_on_average() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([700, 500, 300, 200, 300])  # shares of 10: 3.5, 2.5, 1.5, 1, 1.5
    share = 10 * counts / counts.sum()
    quotas = stratified_quotas(counts, 10, 20_000, generator)
    assert bool((quotas.sum(1) == 10).all())
    assert bool((quotas >= share.floor()).all() and (quotas <= share.ceil()).all())
    torch.testing.assert_close(quotas.float().mean(0), share.float(), atol=0.02, rtol=0)
    # Ten equal classes, 128 slots: every class gets the spare slots as often (largest remainder: always 0-7).
    quotas = stratified_quotas(torch.full((10,), 6000), 128, 20_000, generator)
    assert set(quotas.flatten().tolist()) == {12, 13}
    torch.testing.assert_close(quotas.float().mean(0), torch.full((10,), 12.8), atol=0.02, rtol=0)


def test_stratified_quotas_give_a_class_too_small_for_a_slot_one_by_its_shares_chance() -> None:
    # A slot in every subset would give the two small classes twice their share, and a class of 30 among 60,000
    # examples about 16 times its share in batches of 128.
    generator = torch.Generator().manual_seed(0)
    quotas = stratified_quotas(torch.tensor([90, 5, 5, 0]), 10, 20_000, generator)
    assert bool((quotas.sum(1) == 10).all())
    assert set(quotas[:, 1:3].flatten().tolist()) == {0, 1}
    torch.testing.assert_close(quotas.float().mean(0), torch.tensor([9.0, 0.5, 0.5, 0.0]), atol=0.02, rtol=0)
    quotas = stratified_quotas(torch.tensor([59_970, 30]), 128, 20_000, generator)
    assert float(quotas[:, 1].float().mean()) == pytest.approx(128 * 30 / 60_000, abs=0.01)


def test_sampled_class_budgets_give_each_class_its_share_on_average() -> None:
    # Pools with more classes than picks: 8 picks over 12 classes, shares from 0.27 to 2.13 (two rows), each class
    # the floor or the ceiling of its share, exactly its share on average; none more picks than members.
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([[1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0], [16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4]])
    counts = rows.repeat_interleave(10_000, dim=0)
    share = 8 * counts / counts.sum(1, keepdim=True)
    budgets = sampled_class_budgets(counts, 8, generator)
    assert bool((budgets.sum(1) == 8).all())
    assert bool(
        (budgets >= share.floor()).all() and (budgets <= share.ceil()).all() and (budgets <= counts).all()
    )
    for row in range(2):
        mean = budgets[row * 10_000 : (row + 1) * 10_000].float().mean(0)
        torch.testing.assert_close(mean, share[row * 10_000].float(), atol=0.02, rtol=0)
    # Every class of a row of twelve equal ones is left out as often.
    budgets = sampled_class_budgets(torch.full((12_000, 12), 5), 8, generator)
    assert set(budgets.flatten().tolist()) == {0, 1}
    torch.testing.assert_close(budgets.float().mean(0), torch.full((12,), 8 / 12), atol=0.02, rtol=0)


def test_stratified_quotas_give_the_spare_slots_in_a_random_order() -> None:
    # Four classes with a share of 1.5 slots each: any two of them may get the two spare slots, not only every
    # other class in a fixed order ({0, 2} or {1, 3}).
    quotas = stratified_quotas(torch.full((4,), 10), 6, 2_000, torch.Generator().manual_seed(0))
    assert set(quotas.flatten().tolist()) == {1, 2}
    pairs = {tuple(torch.nonzero(row == 2).flatten().tolist()) for row in quotas}
    assert pairs == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}


def test_stratified_quotas_are_exact_on_average_with_unequal_fractional_parts() -> None:
    # Shares 7.3 and 2.7: the spare slot goes to the first class 30% of the time, not half of it.
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([73, 27])
    quotas = stratified_quotas(counts, 10, 20_000, generator)
    assert bool((quotas.sum(1) == 10).all())
    assert set(quotas[:, 0].tolist()) == {7, 8}
    torch.testing.assert_close(quotas.float().mean(0), torch.tensor([7.3, 2.7]), atol=0.02, rtol=0)
    # Three classes with fractional parts 0.2, 0.3 and 0.5 of shares 2.2, 3.3 and 4.5.
    counts = torch.tensor([22, 33, 45])
    quotas = stratified_quotas(counts, 10, 20_000, generator)
    assert bool((quotas.sum(1) == 10).all())
    torch.testing.assert_close(quotas.float().mean(0), torch.tensor([2.2, 3.3, 4.5]), atol=0.02, rtol=0)


LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
MAX_LOSS = torch.tensor([0.01, 0.05, 0.5, math.nan, 0.02, 0.03, 0.04, 0.09, 0.2, 0.0])
FULL = torch.ones(10, dtype=torch.bool)
SHRUNK = torch.tensor([False, True, True, True, False, True, True, True, True, True])  # 0 and 4 already out


def learned_reference(
    max_loss: Tensor,
    pool: Tensor,
    labels: Tensor,
    *,
    threshold: float,
    min_pool_fraction: float,
    min_class_fraction: float,
    min_pool: int = 0,
) -> list[int]:
    """The docstring's rule one example at a time: the most learned first, while its class and the pool keep
    more than their floors (fractions of the full class and set sizes)."""
    sizes = torch.bincount(labels).tolist()
    kept = torch.bincount(labels[pool], minlength=len(sizes)).tolist()
    left = int(pool.sum())
    pool_floor = max(math.ceil(min_pool_fraction * len(pool)), min_pool)
    learned = sorted(
        (float(max_loss[i]), i) for i in range(len(pool)) if pool[i] and max_loss[i] <= threshold
    )
    dropped = []
    for _, i in learned:
        cls = int(labels[i])
        if kept[cls] > math.ceil(min_class_fraction * sizes[cls]) and left > pool_floor:
            dropped.append(i)
            kept[cls] -= 1
            left -= 1
    return sorted(dropped)


@pytest.mark.parametrize(
    ("pool", "floors", "expected"),
    [
        (FULL, {}, [0, 1, 4, 5, 6, 7, 9]),  # never recorded (3) and high-loss (2, 8) examples stay
        (FULL, {"min_class_fraction": 0.75}, [0, 9]),  # classes keep 3 of 4 and 5 of 6: their most learned go
        (FULL, {"min_pool_fraction": 0.7}, [0, 4, 9]),  # the pool keeps 7 of 10: the 3 most learned go
        (FULL, {"min_pool": 9}, [9]),
        (SHRUNK, {}, [1, 5, 6, 7, 9]),  # examples already out are not dropped again
        # Floors count against the full sizes: class 0 keeps ceil(0.6 * 4) = 3 of its 3 left, class 1
        # ceil(0.6 * 6) = 4 of 5 (against the sizes left it would be [1, 5, 9]).
        (SHRUNK, {"min_class_fraction": 0.6}, [9]),
        (SHRUNK, {"min_pool_fraction": 0.7}, [9]),  # 7 of all 10, not of the 8 left ([5, 9])
    ],
)
def test_learned_examples_rules(pool: Tensor, floors: dict[str, Any], expected: list[int]) -> None:
    args: dict[str, Any] = {"threshold": 0.1, "min_pool_fraction": 0.0, "min_class_fraction": 0.0, **floors}
    drop = learned_examples(MAX_LOSS, pool.clone(), LABELS, **args)
    assert sorted(drop.tolist()) == expected == learned_reference(MAX_LOSS, pool, LABELS, **args)


def test_learned_examples_match_the_reference_on_random_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(5, 40, (1,), generator=gen))
        labels = torch.randint(0, 3, (n,), generator=gen)
        max_loss = torch.rand(n, generator=gen) * 0.2
        max_loss[torch.rand(n, generator=gen) < 0.2] = math.nan
        pool = torch.rand(n, generator=gen) < 0.8
        pool_fraction, class_fraction = torch.rand(2, generator=gen).tolist()
        args: dict[str, Any] = {
            "threshold": 0.1,
            "min_pool_fraction": pool_fraction,
            "min_class_fraction": class_fraction,
        }
        drop = learned_examples(max_loss, pool, labels, **args)
        assert sorted(drop.tolist()) == learned_reference(max_loss, pool, labels, **args)


def test_the_learned_threshold_is_inclusive() -> None:
    # "At or under" the threshold: a loss of exactly 0 counts as learned at threshold 0.
    losses = torch.tensor([0.0, 0.25, 0.3])
    pool, labels = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long)
    floors: dict[str, Any] = {"min_pool_fraction": 0.0, "min_class_fraction": 0.0}
    assert learned_examples(losses, pool, labels, threshold=0.0, **floors).tolist() == [0]
    assert sorted(learned_examples(losses, pool, labels, threshold=0.25, **floors).tolist()) == [0, 1]
