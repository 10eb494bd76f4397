"""Splitting CREST's own work across processes and putting the pieces back together."""

from __future__ import annotations

import atexit
import math

import lightning as L
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
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


def mean_over_processes(trainer: L.Trainer, value: Tensor) -> Tensor:
    """Average ``value`` over processes (identity with one)."""
    if trainer.world_size == 1:
        return value
    return trainer.strategy.reduce(value, reduce_op="mean")


def release_process_group(trainer: L.Trainer) -> None:
    """Destroy the default process group at the end of a multi-process run, before the process exits.

    A gloo process group still alive at interpreter exit sometimes aborts the process ("terminate called without an
    active exception") after a successful fit. Spawned and forked workers (``ddp_spawn``, ``ddp_notebook``) end
    with the trainer call, so the group goes now. Processes of plain ``ddp`` run the rest of the user's script,
    whose next ``trainer.fit``/``test`` reuses the group, so it goes at interpreter exit instead.
    """
    if (
        trainer.world_size == 1
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        return
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        torch.distributed.destroy_process_group()
    else:
        global _exit_hook_registered
        if not _exit_hook_registered:
            atexit.register(_destroy_at_exit)
            _exit_hook_registered = True


_exit_hook_registered = False


def _destroy_at_exit() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
