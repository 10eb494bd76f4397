"""The sampler that serves whole weighted mini-batch coresets, a fixed number per epoch."""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_crest.distributed import batch_share

# Batches a CoresetPlan remembers having served: far more than any loader reads ahead (CrestCallback refuses more).
MAX_READ_AHEAD = 1024

# What the sampler yields for one example: its position in the training set and its weight.
Key = tuple[int, float]


class CoresetPlan:
    """The coresets of the current selection, served round-robin until the next selection replaces them.

    :class:`~lightning_crest.CrestCallback` writes it, :class:`CoresetSampler` reads one global batch per step.
    CREST trains on the same ``P`` coresets, in turn, for as long as its quadratic model says they still describe
    the loss. Reading is lazy, so a new selection applies from the next batch the data loader asks for. When the
    sampler finds the plan empty it calls :attr:`refill` with the number of steps left in the epoch. An entry with
    empty weights is a random subset whose coreset is not picked yet: :attr:`resolve` turns it into
    ``(indices, weights)`` the first time the sampler reaches it.

    Loader workers read batches ahead of training. :attr:`served` counts the batches handed out and
    :meth:`served_since` returns the last ones, so that a checkpoint can keep those read but not yet trained;
    :attr:`replay` holds such batches after a restore, and they are served again, first, before the plan goes on.

    :attr:`resume_step` is the in-epoch step that iterators start from: ``0``, except after restoring a checkpoint
    saved inside an epoch, where Lightning restarts the epoch's data loader but asks only for the steps that are
    left. It holds until the resumed epoch trains its first step (the callback then sets it back to ``0``), so that
    every iterator Lightning starts for that epoch starts there. Every iterator first calls
    :attr:`on_iterator_start` with its epoch and first step, so epoch-start work also happens when Lightning resumes
    into a new epoch without calling its own epoch-start hooks (the callback makes that call idempotent), and
    batches that a dropped iterator's workers read ahead are served again by the next. A sampler that starts
    reading the plan first passes itself to :attr:`check_reader`, which refuses any but the trainer's: another reader
    would use up batches that training then skips.
    """

    def __init__(self) -> None:
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.cursor = 0
        self.served = 0
        self.replay: list[tuple[Tensor, Tensor]] = []
        self._recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=MAX_READ_AHEAD)
        self.resume_step = 0
        self.refill: Callable[[int], None] | None = None
        self.resolve: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self.on_iterator_start: Callable[[int, int], None] | None = None
        self.check_reader: Callable[[CoresetSampler], None] | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def replace(self, batches: Sequence[tuple[Tensor, Tensor]], cursor: int = 0) -> None:
        """Serve ``batches``, ``(indices, weights)`` pairs of shape ``(B,)``, from now on, starting at ``cursor``."""
        self.batches = [(idx.cpu(), w.cpu()) for idx, w in batches]
        self.cursor = cursor

    def served_since(self, count: int) -> list[tuple[Tensor, Tensor]]:
        """The last ``count`` batches served (at most the last 1024)."""
        if count > len(self._recent):
            raise RuntimeError(
                f"{count} batches are read ahead of training, more than the {len(self._recent)} the plan keeps; "
                "lower the data loader's `prefetch_factor * num_workers` (`CrestDataModule(prefetch_factor=...)`)."
            )
        return list(self._recent)[len(self._recent) - count :]

    def unserve(self, count: int) -> None:
        """Serve the last ``count`` batches served again, first: the loader that read them is gone."""
        batches = self.served_since(count)
        for _ in batches:
            self._recent.pop()
        self.served -= len(batches)
        self.replay[:0] = batches

    def restart(self) -> None:
        """Forget what was served: a new data loader starts reading."""
        self.served = 0
        self._recent.clear()

    def next(self, steps_left: int) -> tuple[Tensor, Tensor]:
        """The next global batch: a replayed one, else the plan's next (refilled first when it is empty)."""
        batch = self.replay.pop(0) if self.replay else self._next_planned(steps_left)
        self.served += 1
        self._recent.append(batch)
        return batch

    def _next_planned(self, steps_left: int) -> tuple[Tensor, Tensor]:
        if not self.batches and self.refill is not None:
            self.refill(steps_left)
        if not self.batches:
            raise RuntimeError(
                "The coreset plan is empty: CrestDataModule serves coresets only while a CrestCallback is "
                "attached to the Trainer that uses it."
            )
        slot = self.cursor % len(self.batches)
        indices, weights = self.batches[slot]
        if weights.numel() == 0 and self.resolve is not None:
            # A random subset whose coreset is picked the first time it is needed.
            indices, weights = self.batches[slot] = self.resolve(indices)
        self.cursor += 1
        return indices, weights


class CoresetSampler(DistributedSampler[Key]):
    """Serves ``(index, weight)`` keys: whole coresets from a :class:`CoresetPlan`, or plain shuffled epochs.

    With a plan, an epoch is exactly ``steps_per_epoch`` batches of ``batch_size`` keys per process. Each global
    batch (``num_replicas * batch_size`` examples) comes from the plan and process ``rank`` takes every
    ``num_replicas``-th example of it from position ``rank`` on (:func:`~lightning_crest.distributed.batch_share`),
    so every process trains on a disjoint part of the same coreset with a similar mix of its picks. Without a plan it
    behaves like :class:`~torch.utils.data.DistributedSampler` over the whole dataset with weight 1.

    It subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning keeps it as it is under
    distributed strategies instead of wrapping it.

    Args:
        dataset: The training set (only its length is used).
        batch_size: Examples per process and step.
        num_replicas: Number of processes.
        rank: This process's rank.
        plan: Where the batches come from; ``None`` for plain shuffled epochs.
        steps_per_epoch: Batches per epoch when ``plan`` is given.
        shuffle: Shuffle plain epochs.
        seed: Seed of the plain shuffle.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        plan: CoresetPlan | None = None,
        steps_per_epoch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if plan is not None and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(
                f"`steps_per_epoch` must be a positive int with a plan, got {steps_per_epoch!r}."
            )
        self.batch_size = batch_size
        self.plan = plan
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        if self.plan is None:
            return super().__len__()
        assert self.steps_per_epoch is not None
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[Key]:
        if self.plan is None:
            for index in cast(Iterator[int], super().__iter__()):
                yield index, 1.0
            return
        assert self.steps_per_epoch is not None
        if self.plan.check_reader is not None:
            self.plan.check_reader(self)
        share = batch_share(self.rank, self.num_replicas)
        # After a mid-epoch resume Lightning counts the steps already trained and asks only for the rest.
        start = self.plan.resume_step % self.steps_per_epoch
        if self.plan.on_iterator_start is not None:
            # Lightning sets the sampler's epoch before it creates the epoch's iterator; with loader workers the
            # iterator starts before the trainer's own epoch counter moves on.
            self.plan.on_iterator_start(self.epoch, start)
        for step in range(start, self.steps_per_epoch):
            indices, weights = self.plan.next(self.steps_per_epoch - step)
            if len(indices) != self.num_replicas * self.batch_size:
                raise RuntimeError(
                    f"A planned batch holds {len(indices)} examples, expected {self.num_replicas} x batch_size="
                    f"{self.batch_size} (one share per process): the data module's `batch_size` changed after CrestCallback planned this "
                    "fit's coresets. Set it before the fit."
                )
            yield from zip(indices[share].tolist(), weights[share].tolist())


class WeightedDataset(Dataset[tuple[Any, Any, Tensor]]):
    """Reads ``(input, target)`` items by the sampler's ``(index, weight)`` keys and appends the weight."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key | int) -> tuple[Any, Any, Tensor]:
        index, weight = _key(key)
        return _weighted(self.dataset[index], weight)

    def __getitems__(self, keys: Sequence[Key | int]) -> list[tuple[Any, Any, Tensor]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [self[key] for key in keys]
        pairs = [_key(key) for key in keys]
        items = getitems([index for index, _ in pairs])
        return [_weighted(item, w) for item, (_, w) in zip(items, pairs)]


class WeightedCollate:
    """A user's ``collate_fn`` of ``(input, target)`` items, for :class:`WeightedDataset`'s weighted items."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[tuple[Any, Any, Tensor]]) -> list[Any]:
        inputs, targets = collated_pair(self.collate_fn, [(x, y) for x, y, _ in items])
        # A list, as default_collate makes of tuples: the step may replace the weights in place.
        return [inputs, targets, torch.stack([w for _, _, w in items])]


def collated_pair(collate_fn: Callable[[list[Any]], Any], items: list[tuple[Any, Any]]) -> tuple[Any, Tensor]:
    """Collate ``(input, target)`` items with a user's ``collate_fn`` and check the batch: an ``(inputs, targets)``
    pair whose targets are the items' own, in their order, as int64 class indices."""
    batch = collate_fn(items)
    size = len(items)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"`collate_fn` must return an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + f" for {size} items."
        )
    targets = batch[1]
    if (
        not isinstance(targets, Tensor)
        or targets.shape != (size,)
        or targets.is_floating_point()
        or targets.dtype == torch.bool
    ):
        got = (
            f"shape {tuple(targets.shape)} {targets.dtype}"
            if isinstance(targets, Tensor)
            else type(targets).__name__
        )
        raise TypeError(
            f"`collate_fn` must return the targets as a ({size},) tensor of class indices for {size} items, got {got}."
        )
    # CREST pairs every row with the example it picked and its weight: a collate that sorts (by length, say) would
    # pair them with others.
    if not torch.equal(targets.cpu().long(), torch.tensor([int(y) for _, y in items])):
        raise ValueError(
            "`collate_fn` must keep the items' order: the targets it returned are not the items' targets in order."
        )
    return batch[0], targets.long()


def class_index(target: Any) -> Any:
    """An integer target as torch's losses take class indices: int32 and other widths become int64."""
    if isinstance(target, Tensor):
        return target.long()
    return int(target) if isinstance(target, numbers.Integral) else target


def _weighted(item: tuple[Any, Any], weight: float) -> tuple[Any, Any, Tensor]:
    inputs, target = item
    return inputs, class_index(target), torch.tensor(weight, dtype=torch.float32)


def _key(key: Key | int) -> Key:
    # A plain index has weight 1: Lightning replaces the sampler for `overfit_batches` (without the callback).
    return (key, 1.0) if isinstance(key, int) else key
