"""Splitting CREST's own work across processes and putting the pieces back together."""

from __future__ import annotations

import math
import multiprocessing.util
import os

import lightning as L
import torch
from torch import Tensor


def share(total: int, rank: int, world_size: int) -> slice:
    """Contiguous rows of ``total`` that process ``rank`` computes, balanced: sizes differ by at most one, and
    none is empty when ``total >= world_size``."""
    return slice(rank * total // world_size, (rank + 1) * total // world_size)


def gather_shares(trainer: L.Trainer, rows: Tensor, total: int) -> Tensor:
    """Concatenate every process's :func:`share` of ``total`` rows in rank order; identical on every process.

    Shares differ in size when ``total`` is not a multiple of the process count, so each is padded to the
    largest before the gather and the padding is cut afterwards.
    """
    world_size = trainer.world_size
    if world_size == 1:
        return rows
    size = math.ceil(total / world_size)
    padded = rows.new_zeros((size, *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = trainer.strategy.all_gather(padded)
    parts = (share(total, rank, world_size) for rank in range(world_size))
    return torch.cat([shared[: part.stop - part.start] for shared, part in zip(gathered, parts, strict=True)])


def batch_share(rank: int, world_size: int) -> slice:
    """The examples of a global coreset batch that process ``rank`` trains on: every ``world_size``-th pick.

    Picks come in greedy order (decreasing gain, classes interleaved by gain), so contiguous slices would give
    each process a different mix of classes and difficulty, and skewed statistics to unsynchronised batch norm.
    """
    return slice(rank, None, world_size)


def broadcast_from_first(trainer: L.Trainer, tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place, on every process, with process 0's (nothing with one process)."""
    if trainer.world_size == 1:
        return
    for tensor in tensors:
        torch.distributed.broadcast(tensor, src=0)


def mean_over_processes(trainer: L.Trainer, value: Tensor) -> Tensor:
    """Average ``value`` over processes (identity with one)."""
    if trainer.world_size == 1:
        return value
    return trainer.strategy.reduce(value, reduce_op="mean")


def release_process_group(trainer: L.Trainer) -> None:
    """Destroy the default process group when this process exits, after a multi-process run.

    A gloo process group still alive at interpreter exit sometimes aborts the process ("terminate called without an
    active exception") after a successful fit. The group is not destroyed when the trainer call ends: the
    callbacks' and the module's ``teardown`` come after the data module's and may still use it, and a later
    ``trainer.fit``/``test`` in the same script reuses it. The release is a :mod:`multiprocessing` finalizer, which
    runs at the exit of the main process and also of spawned and forked workers (``ddp_spawn``, ``ddp_notebook``),
    where ``atexit`` hooks do not run.
    """
    if (
        trainer.world_size == 1
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        return
    global _released_at_exit_by
    if _released_at_exit_by != os.getpid():  # a forked worker inherits the flag, not the finalizer
        multiprocessing.util.Finalize(None, _destroy_at_exit, exitpriority=0)
        _released_at_exit_by = os.getpid()


_released_at_exit_by: int | None = None


def _destroy_at_exit() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
