"""Multi-process CREST fits: the checks that must run inside every worker, and a script for plain ``ddp``.

Plain ``strategy="ddp"`` re-launches the command line for every other rank, so it cannot run inside pytest; the
tests run this file through ``subprocess``::

    python tests/ddp_script.py ddp OUT_DIR          # or ddp_notebook

Rank 0 writes ``OUT_DIR/result.json`` and ``OUT_DIR/loader_lengths``. ``ddp_spawn`` tests import :class:`Audit`,
:class:`TeardownSums` and :func:`setting` from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing.util
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TinyClassifier, blobs, make_trainer

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.sampler import CoresetSampler

N = 1200
GLOBAL_BATCH = 32


def digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TeardownSums(L.Callback):
    """Sums ``rank + 1`` over the processes in its teardown, which Lightning calls after the data module's, and
    records at the process's exit, after every other finalizer, whether the process group is still up."""

    def __init__(self, path: str) -> None:
        self.path = path

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(trainer.global_rank + 1)), reduce_op="sum")
        torch.distributed.barrier()
        Path(f"{self.path}.{trainer.global_rank}").write_text(str(float(total)))
        exit_record = Path(f"{self.path}.exit.{trainer.global_rank}")
        multiprocessing.util.Finalize(None, _record_group, args=(exit_record,), exitpriority=-1)


class LoaderLengths(L.Callback):
    """Builds the training loader on process 0 alone when the fit and each epoch start, as a progress display under
    ``rank_zero_only`` might, and appends its length to ``path``: building it must not wait for the other process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    @rank_zero_only
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    def _record(self, trainer: L.Trainer) -> None:
        with self.path.open("a") as f:
            f.write(f"{len(trainer.datamodule.train_dataloader())}\n")  # type: ignore[attr-defined]


def _record_group(path: Path) -> None:
    path.write_text(f"initialized={torch.distributed.is_initialized()}")


def setting(batch_size: int, **kwargs: Any) -> tuple[CrestDataModule, dict[str, Any]]:
    """The data module and CREST options every multi-process test uses (the same data and seed everywhere)."""
    dm = CrestDataModule(
        blobs(n=N), blobs(n=200, seed=1), test_dataset=blobs(n=400, seed=2), batch_size=batch_size
    )
    options: dict[str, Any] = {
        "fraction": 0.25,
        "random_subset_size": 0.1,
        "tau": 0.02,
        "drop_interval": 1,
        "drop_threshold": 0.3,
        # Selections with and without a curvature probe: every process must make the same collective calls.
        "hessian_every": 2,
        # Proxies with the last layer's sketch: its embeddings are gathered beside the logits, in the same order.
        "embedding_proxy": 8,
    }
    options.update(kwargs)
    return dm, options


class Audit(CrestCallback):
    """A CrestCallback that asserts, inside every process, what only the processes themselves can see.

    - The train loader's sampler is our ``CoresetSampler`` with this process's rank and the process count
      (Lightning kept it instead of wrapping it in a ``DistributedSampler``).
    - Every step, the processes' batches put together are exactly the planned global batch, with its weights:
      the shares are disjoint and cover the coreset.
    - Seeded differently (``PL_GLOBAL_SEED``), the processes still draw the same: process 0's seed.
    - Every process takes the gradient and curvature of its own share of each coreset, and the shares make up the
      coreset.
    - After every step, every process holds the identical plan (indices, weights, order, cursor) and made the same
      decisions (selections, checks, interval, coresets per selection, rho, pool).

    Rank 0 records every selection (global step, digest of the plan) in :attr:`selections` and, with ``record``,
    writes them to that JSON file at the end of training (the parent process of ``ddp_spawn`` cannot see them).
    """

    def __init__(self, record: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.selections: list[tuple[int, str]] = []
        self.curvatures: list[float] = []  # the quadratic model's curvature norm after each selection
        self.audited_steps = 0

    def _build_model(self, coresets: Tensor, weights: Tensor, loss: float) -> None:
        super()._build_model(coresets, weights, loss)
        self.curvatures.append(self._quadratic.curvature_norm())

    def _select_coresets(self) -> None:
        super()._select_coresets()
        # Every process scores and anchors with process 0's normalisation statistics.
        assert self._trainer is not None
        for stat in self._anchor_stats:
            gathered = self._trainer.strategy.all_gather(stat)
            assert all(torch.equal(g, gathered[0]) for g in gathered), (
                "anchor statistics differ across processes"
            )

    def _select(self, steps_left: int) -> None:
        super()._select(steps_left)
        plan = self._dm.plan.batches
        step = self._trainer.global_step if self._trainer is not None else -1
        self.selections.append((step, digest(*(i for i, _ in plan), *(w for _, w in plan))))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Processes seeded differently (as `seed_everything(seed + rank)` would): CREST takes process 0's seed.
        os.environ["PL_GLOBAL_SEED"] = str(7 * trainer.global_rank)
        super().setup(trainer, pl_module, stage)

    def _coreset_derivatives(
        self, indices: Tensor, weights: Tensor, params: list[Tensor], probe: bool, positions: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        # Each process differentiates its own share of the coreset, and the shares make up the coreset.
        assert self._trainer is not None
        shares = self._trainer.strategy.all_gather(indices).reshape(-1)
        assert len(shares) == len(torch.unique(shares)) == self._global_batch, shares
        return super()._coreset_derivatives(indices, weights, params, probe, positions)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        sampler = trainer.train_dataloader.sampler  # type: ignore[union-attr]
        assert type(sampler) is CoresetSampler, type(sampler)
        assert (sampler.rank, sampler.num_replicas) == (trainer.global_rank, trainer.world_size)
        assert sampler.batch_size * trainer.world_size == self._global_batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        plan = self._dm.plan
        indices, weights = plan.batches[
            (plan.cursor - 1) % len(plan)
        ]  # what the sampler served for this step
        # Process r trains picks r, r + W, r + 2W, ... of the global batch: interleave the gathered shares.
        world = trainer.world_size
        inputs = trainer.strategy.all_gather(batch[0]).reshape(world, *batch[0].shape).transpose(0, 1)
        inputs = inputs.reshape(-1, batch[0].shape[-1])
        served = trainer.strategy.all_gather(batch[2]).reshape(world, -1).transpose(0, 1).reshape(-1)
        assert len(torch.unique(indices)) == len(indices) == trainer.world_size * len(batch[0])
        assert torch.equal(inputs, self._dm.train_dataset.tensors[0][indices])  # type: ignore[attr-defined]
        assert torch.equal(served, weights)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        plan = self._dm.plan
        fingerprint = digest(*(i for i, _ in plan.batches), *(w for _, w in plan.batches), self._pool)
        state = torch.tensor(
            [
                int(fingerprint[:15], 16),
                plan.cursor,
                self._selections,
                self._checks,
                self._interval,
                self._num_coresets,
                self._pool_size,
            ]
        )
        rho = torch.tensor([self._rho], dtype=torch.float64)
        states = trainer.strategy.all_gather(state).reshape(trainer.world_size, -1)
        rhos = trainer.strategy.all_gather(rho).reshape(trainer.world_size)
        assert bool((states == states[0]).all()), states
        assert bool((rhos == rhos[0]).all()) or math.isnan(self._rho), rhos
        self.audited_steps += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.audited_steps > 0
        if self.record is not None and trainer.global_rank == 0:
            Path(self.record).write_text(json.dumps(self.selections))
            Path(f"{self.record}.curvatures").write_text(json.dumps(self.curvatures))


class Classifier(TinyClassifier):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("test_acc", (self(inputs).argmax(1) == targets).float().mean(), sync_dist=True)


def accuracy(model: torch.nn.Module, data: Any) -> float:
    inputs, targets = data.tensors
    with torch.no_grad():
        return float((model(inputs).argmax(1) == targets).float().mean())


def main(strategy: str, out: Path) -> None:
    # Probes on every other example of each process's share, and each share scored in bf16: the processes must
    # still draw the same probe vectors and gather the same proxies.
    dm, options = setting(GLOBAL_BATCH // 2, hessian_subsample=2, proxy_dtype=torch.bfloat16)
    audit = Audit(record=str(out / "selections.json"), **options)
    torch.manual_seed(0)
    model = Classifier()
    lengths = out / "loader_lengths"
    trainer = make_trainer([audit, LoaderLengths(lengths)], strategy=strategy, devices=2, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    selections = float(trainer.callback_metrics["crest/selections"])
    # A test after the fit: the process group was released at the end of fit (ddp_notebook) or is reused (ddp).
    tested = trainer.test(model, datamodule=dm, verbose=False)
    if trainer.global_rank == 0:
        result = {
            "strategy": strategy,
            "global_step": trainer.global_step,
            "selections": selections,
            "logged_test_accuracy": tested[0]["test_acc"],
            "test_accuracy": accuracy(model, dm.test_dataset),
        }
        (out / "result.json").write_text(json.dumps(result))
    # Plain shuffled epochs (no CrestCallback) of the data module, with process 0 building the loader alone again,
    # the processes seeded differently again (process 0's seed is taken anew).
    os.environ["PL_GLOBAL_SEED"] = str(11 * trainer.global_rank)
    make_trainer([LoaderLengths(lengths)], strategy=strategy, devices=2, max_epochs=1).fit(
        Classifier(), datamodule=dm
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
