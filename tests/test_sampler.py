"""The coreset sampler: fixed epoch length, round-robin plan, disjoint shares per process, lazy refill."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_crest.sampler import CoresetPlan, CoresetSampler, WeightedDataset


def _plan(batches: int, size: int) -> CoresetPlan:
    plan = CoresetPlan()
    plan.replace(
        [(torch.arange(i * size, (i + 1) * size), torch.full((size,), float(i + 1))) for i in range(batches)]
    )
    return plan


def test_serves_each_rank_a_disjoint_share_of_every_global_batch() -> None:
    dataset = list(range(100))
    keys = []
    plans = [_plan(3, 8), _plan(3, 8)]  # every process holds the same plan
    for rank in range(2):
        sampler = CoresetSampler(dataset, 4, num_replicas=2, rank=rank, plan=plans[rank], steps_per_epoch=5)
        assert isinstance(sampler, DistributedSampler)
        assert len(sampler) == 5 * 4
        keys.append(list(sampler))
    for step in range(5):
        first = [i for i, _ in keys[0][step * 4 : (step + 1) * 4]]
        second = [i for i, _ in keys[1][step * 4 : (step + 1) * 4]]
        batch = step % 3  # round-robin over the three coresets
        # Every second pick of the global batch, so both processes get a mix of the greedy order.
        assert first == list(range(batch * 8, (batch + 1) * 8, 2))
        assert second == list(range(batch * 8 + 1, (batch + 1) * 8, 2))
        assert {w for _, w in keys[0][step * 4 : (step + 1) * 4]} == {float(batch + 1)}


def test_each_rank_gets_the_weights_of_its_own_picks() -> None:
    # Every pick has its own weight (as coresets do): a rank's share of the weights must follow its share of picks.
    batches = [(torch.arange(i * 8, (i + 1) * 8), 100.0 * i + torch.arange(8.0)) for i in range(3)]
    for rank in range(2):
        plan = CoresetPlan()
        plan.replace(batches)
        sampler = CoresetSampler(list(range(100)), 4, num_replicas=2, rank=rank, plan=plan, steps_per_epoch=3)
        for index, weight in sampler:
            batch, position = divmod(index, 8)
            assert weight == 100.0 * batch + position


def test_refills_lazily_with_the_steps_left() -> None:
    plan = CoresetPlan()
    asked = []

    def refill(steps_left: int) -> None:
        asked.append(steps_left)
        plan.replace([(torch.arange(4), torch.ones(4))])

    plan.refill = refill
    sampler = CoresetSampler(list(range(10)), 4, plan=plan, steps_per_epoch=3)
    iterator = iter(sampler)
    assert not asked  # nothing is read before the loader asks
    next(iterator)
    assert asked == [3]
    plan.replace([])
    for _ in range(4):
        next(iterator)
    assert asked == [3, 2]


def test_empty_plan_without_refill_is_an_error() -> None:
    sampler = CoresetSampler(list(range(10)), 4, plan=CoresetPlan(), steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="plan is empty"):
        next(iter(sampler))


def test_plain_epochs_without_plan() -> None:
    sampler = CoresetSampler(list(range(50)), 4, seed=3)
    keys = list(sampler)
    order = [i for i, _ in keys]
    assert sorted(order) == list(range(50))
    assert {w for _, w in keys} == {1.0}
    # Shuffled, by the seed.
    assert order != list(range(50))
    assert order == [i for i, _ in CoresetSampler(list(range(50)), 4, seed=3)]
    assert order != [i for i, _ in CoresetSampler(list(range(50)), 4, seed=4)]


def test_loader_yields_weighted_batches() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(12.0).unsqueeze(1), torch.arange(12) % 3)
    sampler = CoresetSampler(data, 4, plan=_plan(2, 4), steps_per_epoch=2)
    batches = list(DataLoader(WeightedDataset(data), batch_size=4, sampler=sampler))
    assert len(batches) == 2
    inputs, _targets, weights = batches[1]
    assert inputs.flatten().tolist() == [4.0, 5.0, 6.0, 7.0]
    assert weights.dtype == torch.float32
    assert weights.tolist() == [2.0] * 4


def test_served_since_and_restart() -> None:
    plan = CoresetPlan()
    plan.replace([(torch.arange(4), torch.ones(4)), (torch.arange(4, 8), torch.ones(4))])
    assert plan.served_since(0) == []
    first, second = plan.next(2), plan.next(1)
    assert [b[0].tolist() for b in plan.served_since(2)] == [first[0].tolist(), second[0].tolist()]
    plan.restart()
    assert plan.served == 0
    assert plan.served_since(0) == []


def test_replayed_batches_come_first_and_count_as_served() -> None:
    plan = CoresetPlan()
    plan.replace([(torch.arange(8, 12), torch.ones(4))])
    plan.replay = [(torch.arange(4), torch.ones(4)), (torch.arange(4, 8), torch.ones(4))]
    served = [plan.next(3)[0].tolist() for _ in range(3)]
    assert served == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [b[0].tolist() for b in plan.served_since(3)] == served


def test_replayed_batches_read_ahead_and_given_back_come_first_again_in_their_order() -> None:
    # After a restore an iterator reads two of the three replayed batches ahead; its epoch's iterator is made again
    # (the loader rebuilt within the epoch): the replay is served again from its start.
    plan = CoresetPlan()
    plan.replace([(torch.arange(100, 104), torch.ones(4))])
    plan.replay = [(torch.full((4,), i), torch.ones(4)) for i in range(3)]
    assert [int(plan.next(5)[0][0]) for _ in range(2)] == [0, 1]
    plan.unserve(2)
    assert [int(plan.next(5)[0][0]) for _ in range(4)] == [0, 1, 2, 100]


@pytest.mark.parametrize("steps", [0, -1, None])
def test_a_plan_needs_a_positive_epoch_length(steps: int | None) -> None:
    with pytest.raises(ValueError, match="steps_per_epoch"):
        CoresetSampler(list(range(8)), 4, plan=CoresetPlan(), steps_per_epoch=steps)  # type: ignore[arg-type]


def test_a_planned_batch_of_the_wrong_size_is_an_error() -> None:
    plan = CoresetPlan()
    plan.replace([(torch.arange(10), torch.ones(10))])
    sampler = CoresetSampler(list(range(20)), 4, num_replicas=2, rank=0, plan=plan, steps_per_epoch=1)
    with pytest.raises(RuntimeError, match="A planned batch holds 10 examples, expected 2 x batch_size=4"):
        list(sampler)


def test_a_random_subset_is_resolved_once_and_its_coreset_served_on_every_round() -> None:
    plan = CoresetPlan()
    plan.replace([(torch.arange(10), torch.empty(0)), (torch.arange(20, 24), torch.ones(4))])
    calls = []

    def resolve(subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(subset.tolist())
        return subset[:4] + 100 * len(calls), torch.full((4,), 2.0)

    plan.resolve = resolve
    served = [plan.next(4)[0].tolist() for _ in range(4)]
    assert calls == [list(range(10))]
    assert served == [[100, 101, 102, 103], [20, 21, 22, 23]] * 2


def test_batches_given_back_no_longer_count_as_served() -> None:
    plan = _plan(3, 4)
    for _ in range(3):
        plan.next(3)
    assert plan.served_since(0) == []
    plan.unserve(0)
    assert plan.replay == []
    assert plan.served == 3
    plan.unserve(2)
    assert plan.served == 1
    assert [int(indices[0]) for indices, _ in plan.served_since(1)] == [0]
    assert [int(indices[0]) for indices, _ in plan.replay] == [4, 8]


def test_a_restart_forgets_the_batches_served_before() -> None:
    plan = _plan(3, 4)
    plan.next(3)
    plan.restart()
    plan.next(3)
    with pytest.raises(RuntimeError, match=r"read ahead"):
        plan.served_since(2)


def test_a_resumed_epoch_starts_at_its_step_until_reset_and_the_next_epoch_is_whole() -> None:
    plan = _plan(8, 2)
    started: list[tuple[int, int]] = []
    plan.on_iterator_start = lambda epoch, start: started.append((epoch, start))
    sampler = CoresetSampler(list(range(16)), 2, plan=plan, steps_per_epoch=4)
    plan.resume_step = 3
    assert len(list(sampler)) == 2
    # Every iterator of the resumed epoch starts at its step, until the callback sets it back (its first step).
    assert len(list(sampler)) == 2
    plan.resume_step = 0
    sampler.set_epoch(1)
    assert len(list(sampler)) == 8
    assert started == [(0, 3), (0, 3), (1, 0)]
