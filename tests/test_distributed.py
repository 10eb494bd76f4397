"""CREST on several CPU processes (gloo): shared plans, disjoint shares, the same decisions, resume, launchers."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import make_trainer
from ddp_script import GLOBAL_BATCH, Audit, Classifier, TeardownSums, accuracy, setting
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_crest.callback as crest_callback
from lightning_crest import CrestCallback, datamodule, distributed
from lightning_crest.distributed import gather_shares, mean_over_processes, release_process_group, share

pytestmark = pytest.mark.ddp

EPOCHS = 3
RESUME_STEP = 12  # inside the second epoch (10 steps per epoch)


def fit(
    devices: int,
    record: Path,
    *,
    ckpt_path: str | None = None,
    extra: list[Any] | None = None,
    model_class: type[Classifier] = Classifier,
    crest: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Classifier, list[list[Any]], float]:
    """A CREST fit on ``devices`` CPU processes with the same global batch (and ``crest``'s options beside the
    setting's); returns rank 0's weights, its selections and the logged number of selections."""
    dm, options = setting(GLOBAL_BATCH // devices, **(crest or {}))
    torch.manual_seed(0)
    model = model_class()
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = make_trainer(
        [Audit(record=str(record), **options), *(extra or [])],
        strategy=strategy,
        devices=devices,
        max_epochs=EPOCHS,
        **kwargs,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, json.loads(record.read_text()), float(trainer.callback_metrics["crest/selections"])


@pytest.fixture(scope="module")
def two_processes(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Classifier, list[list[Any]], float, Path]:
    """One 2-process ddp_spawn fit, audited inside the workers, with a checkpoint every 3 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    steps = ModelCheckpoint(tmp / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    model, selections, logged = fit(2, tmp / "two.json", extra=[steps], enable_checkpointing=True)
    return model, selections, logged, tmp


def test_two_processes_share_one_plan_and_split_each_coreset(two_processes: Any) -> None:
    # The assertions run inside both workers (Audit: sampler kept with rank and num_replicas, disjoint shares
    # that make up the planned global batch, identical plans and decisions after every step); a failed one fails
    # the fit. Here: the fit ran to the end and its counts came back.
    _, selections, logged, _ = two_processes
    assert logged == len(selections) > 3


def test_two_processes_match_one_process_with_the_global_batch(two_processes: Any, tmp_path: Path) -> None:
    two, two_selections, _, _ = two_processes
    one, one_selections, _ = fit(1, tmp_path / "one.json")
    # With the same seed both draw the same random subsets; proxies, losses, gradients and Hessian probes are
    # computed on shares and combined: the same arithmetic up to float32 summation order (the gradient is the
    # all-reduced mean of two half-batch means, not one mean of 32). The first selection, made before any
    # training step, is therefore identical, plan for plan. After that, rounding differences of ~1e-7 in the
    # weights can flip near-ties in facility location (CREST.md: proxies are mostly tiny), so later plans may
    # differ in a few picks. Measured here before the setting had `embedding_proxy`: 14 selections in both runs at
    # the same 14 steps, weights apart by at most 0.03, test accuracy 34.25% vs 33.75%; with it, 14 selections
    # with every plan identical and 35.50% in both. A flipped check (rho within rounding of tau) could add or remove one
    # selection, hence a count within one; accuracy within 3 points (12 of 400 examples), well above the
    # measured 0.5 but below what a broken split (e.g. ranks training on the same share) would cost.
    assert one_selections[0] == two_selections[0]
    assert abs(len(one_selections) - len(two_selections)) <= 1
    test_set = setting(GLOBAL_BATCH)[0].test_dataset
    assert abs(accuracy(one, test_set) - accuracy(two, test_set)) <= 0.03


@pytest.mark.parametrize("subsample", [3, 4])
def test_a_subsampled_probe_on_two_processes_is_the_one_process_probe(subsample: int, tmp_path: Path) -> None:
    # Every k-th pick of the whole coreset is probed, whichever process holds it: with k = 4 process 1 holds none
    # (its picks are the odd ones) and still draws the probe vector beside process 0. The first selection comes
    # before any step, so its curvature is the one process's up to float32 summation order. (Taken every k-th
    # pick of each process's share, it was 7% apart at k = 2.)
    norms = []
    for devices in (1, 2):
        record = tmp_path / f"{devices}.json"
        fit(devices, record, crest={"hessian_subsample": subsample, "hessian_every": 1})
        norms.append(json.loads(Path(f"{record}.curvatures").read_text())[0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


class PicksApart(Audit):
    """Process 1's greedy gives its picks in reverse order, as a near tie broken otherwise on a GPU would differ.
    The audit asserts at every step that both processes hold the same plan and train its shares."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.global_rank == 1:  # in the spawned worker's own copy of the module
            greedy = crest_callback.facility_location

            def reversed_picks(*args: Any, **kwargs: Any) -> Any:
                picked = greedy(*args, **kwargs)
                return dataclasses.replace(
                    picked, indices=picked.indices.flip(-1), weights=picked.weights.flip(-1)
                )

            crest_callback.facility_location = reversed_picks  # type: ignore[assignment]


def test_every_process_trains_process_0s_picks(tmp_path: Path) -> None:
    dm, options = setting(GLOBAL_BATCH // 2)
    trainer = make_trainer(
        [PicksApart(record=str(tmp_path / "selections.json"), **options)],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=1,
    )
    torch.manual_seed(0)
    trainer.fit(Classifier(), datamodule=dm)
    assert float(trainer.callback_metrics["crest/selections"]) >= 2


def test_resume_mid_epoch_on_two_processes(two_processes: Any, tmp_path: Path) -> None:
    full, full_selections, _, tmp = two_processes
    ckpt = tmp / "ckpt" / f"step={RESUME_STEP}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == RESUME_STEP
    resumed, selections, _ = fit(2, tmp_path / "resumed.json", ckpt_path=str(ckpt))
    assert selections == [s for s in full_selections if s[0] > RESUME_STEP]
    # gloo's all-reduce of two CPU tensors sums in a fixed order, so the resumed run repeats the arithmetic.
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), full.parameters()))


class Normalised(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net.insert(1, torch.nn.BatchNorm1d(32))


def test_resume_with_batch_norm_on_two_processes(tmp_path: Path) -> None:
    # Unsynchronised BatchNorm: DDP gives every process process 0's running statistics at each training forward,
    # and each then updates its own; a checkpoint holds process 0's. CREST's passes between two steps must not see
    # a process's own update, or process 1 would score differently after a restore.
    every = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    full, full_selections, _ = fit(
        2, tmp_path / "full.json", extra=[every], enable_checkpointing=True, model_class=Normalised
    )
    # Mid-epoch; without the shared statistics, resuming from steps 5, 7 and 13 each went another way.
    ckpt = tmp_path / "ckpt" / "step=5.ckpt"
    resumed, selections, _ = fit(2, tmp_path / "resumed.json", ckpt_path=str(ckpt), model_class=Normalised)
    assert selections == [s for s in full_selections if s[0] > 5]
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), full.parameters()))


@pytest.mark.parametrize("strategy", ["ddp", "ddp_notebook"])
def test_launchers_that_run_the_script(strategy: str, tmp_path: Path) -> None:
    # Plain ddp re-launches the command line for rank 1 (it would re-run pytest); ddp_notebook forks, which is
    # safer in a fresh process than inside the pytest session. The script fits (audited), then tests.
    script = Path(__file__).parent / "ddp_script.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # In a session of its own: a rank that hangs is killed with the other processes, which would hold the pipes.
    with subprocess.Popen(
        [sys.executable, str(script), strategy, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(
                f"the {strategy} script did not finish in 240 s (a process waits for another?):\n{output[-3000:]}"
            )
    assert process.returncode == 0, output[-3000:]
    assert "terminate called" not in output  # no abort at exit in any rank (the group is released)
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["selections"] >= 2
    assert report["logged_test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    if strategy == "ddp":  # rank 0 is the parent process: its trainer ran the fit itself
        assert report["global_step"] == 2 * 10
    # Process 0 built the training loader alone as each fit and epoch started without waiting for the other (the
    # plain epochs' seed is process 0's, taken in the data module's `setup`): 10 CREST steps in each of the 2
    # epochs, then a plain epoch of 600 examples per process in batches of 16.
    assert (tmp_path / "loader_lengths").read_text().split() == ["10", "10", "10", "38", "38"]


@pytest.mark.parametrize(
    ("check_size", "match"),
    [
        (1, "`check_size`=1 is smaller than the 2 processes that share each check; raise it."),
        (  # with check_sample="subset": the rest of the first subset is scored beside the check sample
            119,
            "`check_size`=119 leaves 1 of the random subset's r=120 examples to score besides it, fewer than the 2 "
            "processes that share them; lower it to at most 118, or pass None",
        ),
    ],
)
def test_check_sizes_that_leave_a_process_without_rows_are_refused(check_size: int, match: str) -> None:
    # Refused in setup, before any process group work: a fake two-process trainer is enough.
    dm, _ = setting(GLOBAL_BATCH // 2)
    trainer = SimpleNamespace(
        datamodule=dm, accumulate_grad_batches=1, callbacks=[], strategy=SimpleNamespace(), world_size=2
    )
    callback = CrestCallback(
        fraction=0.25, random_subset_size=0.1, check_size=check_size, check_sample="subset"
    )
    with pytest.raises(ValueError, match=re.escape(match)):
        callback.setup(trainer, Classifier(), "fit")  # type: ignore[arg-type]


class MeanWeighted(Classifier):
    """Unweighted in effect on process 0 (the weights' mean is 1 in a coreset); weighted on the others."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        inputs, targets, weights = batch
        if self.global_rank > 0:
            return super().training_step(batch, batch_idx)
        losses = torch.nn.functional.cross_entropy(self(inputs), targets, reduction="none")
        return losses.mean() * weights.mean()


class RecordsRefusals(CrestCallback):
    """Writes each process's refusal of the loss to ``<path>.<rank>``; then waits for the other process."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path

    def _check_weights_used(self, batch: Any) -> None:
        try:
            super()._check_weights_used(batch)
        except RuntimeError as error:
            assert self._trainer is not None
            Path(f"{self.path}.{self._trainer.global_rank}").write_text(str(error))
            # Reached by both only if both refuse: neither is stopped before writing (gloo; at worst 30 s).
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            raise


def test_a_loss_that_ignores_the_weights_on_one_process_stops_every_process(tmp_path: Path) -> None:
    # The processes agree on the refusal: each raises it (one alone would leave the other waiting, or dying on a
    # closed connection).
    dm, options = setting(GLOBAL_BATCH // 2)
    records = tmp_path / "refusal"
    trainer = make_trainer(
        [RecordsRefusals(str(records), **options)], strategy="ddp_spawn", devices=2, max_epochs=1
    )
    with pytest.raises(Exception, match="same gradient although the examples' losses differ"):
        trainer.fit(MeanWeighted(), datamodule=dm)
    for rank in (0, 1):
        assert (
            Path(f"{records}.{rank}")
            .read_text()
            .startswith("The training loss gave every example's weight the same gradient although")
        )


@pytest.mark.parametrize(("total", "world_size"), [(7, 3), (10, 4), (5, 2), (6, 3)])
def test_gather_shares_of_uneven_totals(total: int, world_size: int) -> None:
    full = torch.arange(2 * total).reshape(total, 2) + 1
    size = -(-total // world_size)

    def all_gather(padded: torch.Tensor) -> torch.Tensor:
        assert padded.shape == (size, 2)
        parts = [full[share(total, rank, world_size)] for rank in range(world_size)]
        return torch.stack([torch.cat([p, p.new_zeros(size - len(p), 2)]) for p in parts])

    trainer: Any = SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(all_gather=all_gather))
    for rank in range(world_size):
        assert torch.equal(gather_shares(trainer, full[share(total, rank, world_size)], total), full)


def test_mean_over_processes_averages() -> None:
    # Two processes holding `value` and `value + 2`: the strategy's mean is what comes back (a new tensor here).
    calls: list[str] = []

    def reduce(value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        calls.append(reduce_op)
        return (value + (value + 2)) / 2

    trainer: Any = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    assert torch.equal(mean_over_processes(trainer, torch.ones(3)), torch.full((3,), 2.0))
    assert calls == ["mean"]
    alone: Any = SimpleNamespace(world_size=1, strategy=None)
    assert torch.equal(mean_over_processes(alone, torch.ones(3)), torch.ones(3))


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A pretend initialised process group: records its destruction and the exit finalizers registered."""
    events: list[Any] = []
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: "destroyed" not in events)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: events.append("destroyed"))

    def finalize(obj: Any, callback: Any, exitpriority: int | None = None) -> None:
        events.append(("at exit", obj, callback, exitpriority))

    monkeypatch.setattr(distributed.multiprocessing.util, "Finalize", finalize)
    monkeypatch.setattr(distributed, "_released_at_exit_by", None)
    return events


def _trainer(world_size: int) -> Any:
    return SimpleNamespace(world_size=world_size)


def test_the_group_is_released_at_the_exit_of_the_process_only(process_group: list[Any]) -> None:
    release_process_group(_trainer(1))
    assert process_group == []  # one process: no group of ours to release
    for _ in range(3):
        release_process_group(_trainer(2))
    # One finalizer (they run at the exit of main and worker processes alike), nothing destroyed yet.
    assert process_group == [("at exit", None, distributed._destroy_at_exit, 0)]
    distributed._destroy_at_exit()
    assert process_group[-1] == "destroyed"
    distributed._destroy_at_exit()  # the group is gone: nothing to do
    assert process_group.count("destroyed") == 1


def test_the_group_outlives_teardown_and_goes_at_the_workers_exit(tmp_path: Path) -> None:
    dm, options = setting(GLOBAL_BATCH // 2)
    dm.val_dataset = None  # the workers' copies skip validation too
    trainer = make_trainer(
        [CrestCallback(**options), TeardownSums(str(tmp_path / "sum"))],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=1,
    )
    trainer.fit(Classifier(), datamodule=dm)
    assert [(tmp_path / f"sum.{rank}").read_text() for rank in range(2)] == ["3.0", "3.0"]
    # The spawned workers released the group when they exited.
    assert [(tmp_path / f"sum.exit.{rank}").read_text() for rank in range(2)] == ["initialized=False"] * 2


def test_the_data_module_releases_the_group_at_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[Any] = []
    monkeypatch.setattr(datamodule, "release_process_group", released.append)
    dm, _ = setting(GLOBAL_BATCH)
    dm.teardown("fit")  # not attached to a trainer
    assert released == []
    trainer = _trainer(2)
    dm.trainer = trainer
    dm.teardown("fit")
    assert released == [trainer]


def test_a_forked_worker_registers_its_own_release(
    process_group: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A forked worker (ddp_notebook) inherits its parent's flag but not its finalizer (multiprocessing clears them).
    monkeypatch.setattr(distributed, "_released_at_exit_by", os.getpid() + 1)
    release_process_group(_trainer(2))
    assert process_group == [("at exit", None, distributed._destroy_at_exit, 0)]
    assert distributed._released_at_exit_by == os.getpid()
