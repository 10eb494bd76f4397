"""Checkpoint and resume, interrupts, faults and bad input: CREST continues exactly where it stopped."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import LabelledTensors, TinyClassifier, blobs, make_trainer
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.quadratic import QuadraticModel

N, BATCH, FRACTION = 1200, 32, 0.25
STEPS = math.ceil(FRACTION * N / BATCH)  # 10 steps per epoch
EPOCHS = 3


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # These fits are tiny: with two torch threads on a shared 2-core machine they ran 30-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Tracer(CrestCallback):
    """Records every selection (global step, hook, digest of the plan) and every batch trained (step, digest)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selections: list[tuple[int, str, str]] = []
        self.trained: list[tuple[int, str]] = []
        self.stale: list[
            tuple[int, int]
        ] = []  # batches of the earlier plan still to train, at each selection
        self._hook = "batch"

    def _select(self, steps_left: int) -> None:
        super()._select(steps_left)
        plan = self._dm.plan.batches
        step = self._trainer.global_step if self._trainer is not None else -1
        self.selections.append((step, self._hook, digest(*(i for i, _ in plan), *(w for _, w in plan))))
        self.stale.append((step, self._stale))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hook = "epoch_start"
        super().on_train_epoch_start(trainer, pl_module)
        self._hook = "batch"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.trained.append((trainer.global_step, digest(batch[0], batch[2])))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)


def crest(kind: type[Tracer] | None = None, **kwargs: Any) -> Tracer:
    options: dict[str, Any] = {
        "fraction": FRACTION,
        "random_subset_size": 0.1,
        "tau": 0.02,
        "drop_interval": 1,
        "drop_threshold": 0.3,
    }
    options.update(kwargs)
    return (kind or Tracer)(**options)


def run(
    callback: CrestCallback,
    *,
    ckpt_path: str | None = None,
    extra: list[Any] | None = None,
    model: L.LightningModule | None = None,
    train: LabelledTensors | None = None,
    num_workers: int = 0,
    **kwargs: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    torch.manual_seed(0)
    model = model if model is not None else TinyClassifier()
    train = train if train is not None else blobs(n=N)
    dm = CrestDataModule(train, blobs(n=200, seed=1), batch_size=BATCH, num_workers=num_workers)
    options: dict[str, Any] = {"max_epochs": EPOCHS}
    options.update(kwargs)
    trainer = make_trainer([callback, *(extra or [])], **options)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


def run_interrupted(callback: CrestCallback, **kwargs: Any) -> None:
    """:func:`run`, ended by a KeyboardInterrupt (Ctrl-C). Lightning 2.6 handles it gracefully (on_exception hooks,
    teardown), then exits with status 1; it also ignores further SIGINTs, which this undoes."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run(callback, **kwargs)
    finally:
        signal.signal(signal.SIGINT, handler)


def same_parameters(a: L.LightningModule, b: L.LightningModule) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    ("selection", "num_workers", "hessian_every"),
    [("crest", 0, 1), ("random", 0, 1), ("crest", 2, 1), ("crest", 0, 2)],
)
def test_resume_mid_epoch_and_at_epoch_ends_is_bit_exact(
    tmp_path: Path, selection: str, num_workers: int, hessian_every: int
) -> None:
    # One uninterrupted run saves a checkpoint after every 3rd step (mid-epoch at steps 3, 6, 13, ..., and on an
    # epoch's last step at 30) and one after every epoch; resuming from any of them must give the same later
    # selections, the same batches and bit-identical final parameters. On CPU with one thread-count and the same
    # data order every operation is repeated in the same order, so exact equality is the right test. With loader
    # workers, the batches read ahead of training at a checkpoint are saved with it and served first on resume.
    # With hessian_every the resumed run must also keep the schedule of curvature probes.
    steps = ModelCheckpoint(tmp_path / "steps", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    epochs = ModelCheckpoint(tmp_path / "epochs", filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    full = crest(selection=selection, hessian_every=hessian_every)
    trainer, reference = run(full, extra=[steps, epochs], enable_checkpointing=True, num_workers=num_workers)
    assert trainer.global_step == EPOCHS * STEPS
    if selection == "crest":
        assert len(full.selections) > 3  # re-selections happen after the resume points

    for ckpt in ("steps/step=12.ckpt", "steps/step=15.ckpt", "epochs/epoch=0.ckpt"):
        resumed = crest(selection=selection, hessian_every=hessian_every)
        start = torch.load(tmp_path / ckpt, weights_only=True)["global_step"]
        trainer, model = run(resumed, ckpt_path=str(tmp_path / ckpt), num_workers=num_workers)
        assert trainer.global_step == EPOCHS * STEPS, ckpt
        assert resumed.trained == [t for t in full.trained if t[0] > start], ckpt
        # Checkpoints are written after CREST's on_train_batch_end and before the next on_train_epoch_start. A run
        # resumed from an epoch's end may start the next epoch from its sampler, before that hook: (step, plan) only.
        later = [s[::2] for s in full.selections if s[0] > start or (s[0] == start and s[1] == "epoch_start")]
        assert [s[::2] for s in resumed.selections] == later, ckpt
        assert same_parameters(model, reference), ckpt
        counts = (resumed._quadratic.step, resumed._quadratic.curvature_steps)
        assert counts == (full._quadratic.step, full._quadratic.curvature_steps), ckpt


class StepScheduled(TinyClassifier):
    """A cosine schedule over the fit's steps, sized as the README says: ``estimated_stepping_batches``."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_resume_mid_epoch_with_reloaded_loaders_and_a_schedule_sized_in_steps(tmp_path: Path) -> None:
    # `estimated_stepping_batches` builds the training loader before Lightning restores the epoch, and with
    # `reload_dataloaders_every_n_epochs` it builds another after: two iterators of the resumed epoch. The first's
    # workers read the batches a restore has still to serve; the second serves them again, from the saved step.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    options: dict[str, Any] = {"num_workers": 2, "reload_dataloaders_every_n_epochs": 1}
    full = crest()
    trainer, reference = run(full, model=StepScheduled(), extra=[steps], enable_checkpointing=True, **options)
    assert trainer.global_step == EPOCHS * STEPS
    for start in (12, 16, 24):  # inside the second and third epochs
        resumed = crest()
        trainer, model = run(
            resumed, model=StepScheduled(), ckpt_path=str(tmp_path / f"step={start}.ckpt"), **options
        )
        assert trainer.global_step == EPOCHS * STEPS, start
        # It skipped the batches the first iterator read, and trained a whole epoch after the saved step.
        assert resumed.trained == [t for t in full.trained if t[0] > start], start
        assert same_parameters(model, reference), start


def test_a_resumed_fit_that_trains_no_step_leaves_the_next_fits_epochs_whole(tmp_path: Path) -> None:
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    run(crest(), extra=[steps], enable_checkpointing=True, max_epochs=1)
    callback = crest()
    dm = CrestDataModule(blobs(n=N), batch_size=BATCH)
    trainer = make_trainer([callback], max_steps=4)
    trainer.fit(TinyClassifier(), datamodule=dm, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert trainer.global_step == 4
    assert callback.trained == []
    # The saved step was the stopped fit's: a fit without `ckpt_path` starts its epochs at their first step.
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == STEPS


class Augmented(LabelledTensors):
    """Every read of an item adds fresh noise from torch's global generator, like a random augmentation."""

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = super().__getitem__(index)
        return inputs + 0.5 * torch.randn_like(inputs), targets


class RhoTracer(Tracer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rhos: list[tuple[int, float]] = []

    def _check(self) -> bool:
        drifted = super()._check()
        self.rhos.append((self._trainer.global_step if self._trainer else -1, self._rho))
        return drifted


def test_checks_after_a_restore_see_the_views_that_the_selection_saw(tmp_path: Path) -> None:
    # With a zero learning rate the parameters never move, so the quadratic model predicts L0 exactly and rho is 0
    # only if a check measures the check sample on the views L0 was measured on. A restored run loads the check
    # sample again: read under the selection's own seed, it comes back as the same views.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    full = RhoTracer(fraction=FRACTION, random_subset_size=0.1)
    run(
        full,
        extra=[steps],
        enable_checkpointing=True,
        model=TinyClassifier(lr=0.0),
        train=Augmented(*blobs(n=N).tensors),
        max_epochs=1,
    )
    assert full.rhos
    assert all(rho == 0.0 for _, rho in full.rhos)

    resumed = RhoTracer(fraction=FRACTION, random_subset_size=0.1)
    ckpt = str(tmp_path / "step=3.ckpt")
    run(
        resumed,
        ckpt_path=ckpt,
        model=TinyClassifier(lr=0.0),
        train=Augmented(*blobs(n=N).tensors),
        max_epochs=1,
    )
    assert resumed.selections == []  # every check after the restore is against the selection made before it
    assert [step for step, _ in resumed.rhos] == [step for step, _ in full.rhos if step > 3]
    assert all(rho == 0.0 for _, rho in resumed.rhos)


@pytest.mark.parametrize(("selection", "num_workers"), [("crest", 0), ("random", 0), ("crest", 2)])
def test_checkpoint_on_the_last_step_of_an_epoch(tmp_path: Path, selection: str, num_workers: int) -> None:
    # every_n_train_steps = steps per epoch saves on the last batch of each epoch (in on_train_batch_end, before
    # on_train_epoch_end). Lightning then resumes straight into the next epoch without calling
    # on_train_epoch_start; the epoch-start work (random redraw, dropping learned examples) must still happen.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=STEPS, save_top_k=-1)
    full = crest(selection=selection)
    _, reference = run(full, extra=[steps], enable_checkpointing=True, num_workers=num_workers)
    resumed = crest(selection=selection)
    _, model = run(resumed, ckpt_path=str(tmp_path / f"step={STEPS}.ckpt"), num_workers=num_workers)
    assert resumed.trained == [t for t in full.trained if t[0] > STEPS]
    assert torch.equal(resumed.pool, full.pool)
    assert same_parameters(model, reference)


@pytest.mark.parametrize("checkpoint", ["step=5.ckpt", "step=10.ckpt"])  # mid-epoch, and on an epoch's end
def test_resuming_with_another_global_batch_or_epoch_length_is_refused(
    tmp_path: Path, checkpoint: str
) -> None:
    # The plan holds global batches of the checkpoint's size and its position counts the checkpoint's epoch length:
    # another batch size (or number of processes), or another training set, would train the wrong number of steps.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    run(crest(), extra=[steps], enable_checkpointing=True, max_epochs=1)
    ckpt = str(tmp_path / checkpoint)

    def resume(callback: CrestCallback, batch_size: int = BATCH, n: int = N, seed: int = 0) -> None:
        dm = CrestDataModule(blobs(n=n, seed=seed), batch_size=batch_size)
        make_trainer([callback], max_epochs=EPOCHS).fit(TinyClassifier(), datamodule=dm, ckpt_path=ckpt)

    with pytest.raises(
        ValueError,
        match=r"global batches of 32 examples; this run's are 1 process x batch_size=16 = 16\. Resume",
    ):
        resume(crest(), batch_size=BATCH // 2)
    with pytest.raises(ValueError, match=r"epochs have 10 steps; this run's have 5 \(.*n=600\)"):
        resume(crest(), n=N // 2)
    # A training set a little larger keeps the epoch length; its new examples would never be drawn.
    with pytest.raises(ValueError, match=r"training set of 1200 examples; this run's has 1210\. Resume with"):
        resume(crest(), n=N + 10)
    # Another split or order of the same size: the state's pool, plan and check sample would be other examples'.
    with pytest.raises(
        ValueError, match=r"training set of 1200 examples with other labels, in order, than this"
    ):
        resume(crest(), seed=1)
    # A checkpoint saved before the labels' fingerprint was kept resumes as it did then.
    saved = torch.load(ckpt, weights_only=True)
    del saved["callbacks"]["Tracer"]["labels_digest"]
    torch.save(saved, tmp_path / "without_digest.ckpt")
    make_trainer([crest()], max_epochs=EPOCHS).fit(
        TinyClassifier(),
        datamodule=CrestDataModule(blobs(n=N, seed=1), batch_size=BATCH),
        ckpt_path=str(tmp_path / "without_digest.ckpt"),
    )
    by_hand = crest()  # loaded before `fit`, the state waits for the fit's `setup`
    by_hand.load_state_dict(torch.load(ckpt, weights_only=True)["callbacks"]["Tracer"])
    with pytest.raises(ValueError, match=r"training set of 1200 examples; this run's has 1210\. Resume with"):
        make_trainer([by_hand], max_epochs=EPOCHS).fit(
            TinyClassifier(), datamodule=CrestDataModule(blobs(n=N + 10), batch_size=BATCH)
        )
    # Another budget, baseline or seed is refused too, before any step: the restored state would not be theirs.
    for name, value in (("fraction", 0.5), ("selection", "random"), ("seed", 1)):
        saved = repr(torch.load(ckpt, weights_only=True)["callbacks"]["Tracer"][name])
        with pytest.raises(
            ValueError,
            match=rf"trained with CrestCallback\({name}={saved}\); this run's has {name}={value!r}\. Resume with",
        ):
            resume(crest(**{name: value}))
    # A refused state is dropped: the same callback then fits afresh without `ckpt_path`.
    refused = crest()
    with pytest.raises(ValueError, match="training set of 1200 examples"):
        resume(refused, n=N + 10)
    make_trainer([refused], max_epochs=1).fit(
        TinyClassifier(), datamodule=CrestDataModule(blobs(n=N + 10), batch_size=BATCH)
    )
    assert len(refused.pool) == N + 10
    assert refused.statistics["selections"] == len(refused.selections)  # its own, none of the checkpoint's
    # Likewise a callback with a fit of its own behind it: the refusal drops that fit's state too (the module's
    # weights are the checkpoint's by then).
    fitted, module = crest(fraction=0.5), TinyClassifier()
    data = CrestDataModule(blobs(n=N), batch_size=BATCH)
    make_trainer([fitted], max_epochs=1).fit(module, datamodule=data)
    with pytest.raises(ValueError, match=r"trained with CrestCallback\(fraction="):
        make_trainer([fitted], max_epochs=EPOCHS).fit(module, datamodule=data, ckpt_path=ckpt)
    assert fitted.state_dict() == {}
    earlier = len(fitted.selections)
    assert earlier > 0
    make_trainer([fitted], max_epochs=1).fit(module, datamodule=data)
    assert fitted.statistics["selections"] == len(fitted.selections) - earlier
    # The same settings resume.
    resumed = crest()
    resume(resumed)
    assert resumed._trainer is not None
    assert resumed._trainer.global_step == EPOCHS * STEPS


def test_resuming_with_another_random_subset_size_picks_the_restored_subsets_at_their_size(
    tmp_path: Path,
) -> None:
    # Every coreset after a selection's first is picked when reached: a mid-epoch checkpoint holds subsets of r=120.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    run(crest(hessian_probes=1), extra=[steps], enable_checkpointing=True, max_epochs=1)
    ckpt = str(tmp_path / "step=5.ckpt")
    state = torch.load(ckpt, weights_only=True)["callbacks"]["Tracer"]
    pending = [idx for idx, w in zip(state["plan_indices"], state["plan_weights"]) if w.numel() == 0]
    assert pending
    assert {len(idx) for idx in pending} == {N // 10}
    resolved: list[tuple[int, Tensor]] = []  # (subset size, weights) of every coreset picked when reached
    resumed = crest(random_subset_size=0.2, tau=1e9)  # no check fails before they are reached
    resolve = resumed._resolve

    def recorded(subset: Tensor) -> tuple[Tensor, Tensor]:
        indices, weights = resolve(subset)
        resolved.append((len(subset), weights))
        return indices, weights

    resumed._resolve = recorded  # type: ignore[method-assign]
    trainer, _ = run(resumed, ckpt_path=ckpt, max_epochs=2)
    assert trainer.global_step == 2 * STEPS
    assert resumed._subset == N // 5
    # The restored subsets' coresets weigh as any other: their cluster sizes sum to their own r, not this run's.
    assert N // 10 in {size for size, _ in resolved}
    for _, weights in resolved:
        assert weights.sum().item() == pytest.approx(BATCH)
    sizes = {len(w) for _, w in resumed.coresets}
    assert sizes == {BATCH}
    for _, weights in resumed.coresets:
        assert torch.allclose(weights.sum(), torch.tensor(float(BATCH)))


class StepSaver(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 5:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("saver_first", [True, False])
def test_a_checkpoint_saved_inside_a_step_before_crests_end_warns(tmp_path: Path, saver_first: bool) -> None:
    saver = StepSaver(tmp_path / "step5.ckpt")
    callback = crest()
    callbacks = [saver, callback] if saver_first else [callback, saver]
    torch.manual_seed(0)
    trainer = make_trainer(callbacks, max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(blobs(n=N), batch_size=BATCH))
    warned = [w for w in caught if "saved inside a training step" in str(w.message)]
    assert len(warned) == saver_first
    assert (tmp_path / "step5.ckpt").exists()


def test_a_step_skipped_by_the_module_leaves_no_step_open_for_later_checkpoints(tmp_path: Path) -> None:
    # `on_train_batch_start` returning -1 skips the rest of the epoch, without `on_train_batch_end`.
    class Skipping(TinyClassifier):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
            return -1 if self.current_epoch == 0 and batch_idx == 3 else None

    epochs = ModelCheckpoint(tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    torch.manual_seed(0)
    trainer = make_trainer([crest(), epochs], max_epochs=2, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "A checkpoint is saved inside a training step")
        trainer.fit(Skipping(), datamodule=CrestDataModule(blobs(n=N), batch_size=BATCH))
    assert trainer.global_step == 3 + STEPS


class SeedTracer(Tracer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_seeds: list[tuple[int, int | None]] = []

    def _select_coresets(self) -> None:
        super()._select_coresets()
        self.check_seeds.append((self._trainer.global_step if self._trainer else -1, self._check_seed))


def test_a_resume_without_a_seed_keeps_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run was seeded by `L.seed_everything(5)`; the resumed process was not: it goes on with seed 5.
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    full = crest(SeedTracer)
    _, reference = run(full, extra=[steps], enable_checkpointing=True)
    ckpt = str(tmp_path / "step=15.ckpt")
    assert torch.load(ckpt, weights_only=True)["callbacks"]["SeedTracer"]["seed"] == 5
    monkeypatch.delenv("PL_GLOBAL_SEED")
    resumed = crest(SeedTracer)
    _, model = run(resumed, ckpt_path=ckpt)
    later = [s for s in full.check_seeds if s[0] > 15]
    assert later
    assert resumed.check_seeds == later
    assert resumed.selections == [s for s in full.selections if s[0] > 15]
    assert same_parameters(model, reference)
    # A seed given explicitly must be the checkpoint's.
    with pytest.raises(ValueError, match=r"trained with CrestCallback\(seed=5\); this run's has seed=0\."):
        run(crest(SeedTracer, seed=0), ckpt_path=ckpt)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_from_a_validation_checkpoint_on_an_epochs_last_step(tmp_path: Path, num_workers: int) -> None:
    # Validated twice per epoch, the second time on its last step, where the checkpoint is written. Lightning resumes
    # into that epoch with no batch left and creates an iterator for it, whose workers (starting the next epoch)
    # read its first batches; then it creates the next epoch's. Those batches must be served again, not skipped.
    val = ModelCheckpoint(tmp_path, filename="{step}", save_top_k=-1)
    full = crest()
    _, reference = run(
        full, extra=[val], enable_checkpointing=True, num_workers=num_workers, val_check_interval=0.5
    )
    for step in (STEPS, 2 * STEPS):
        resumed = crest()
        trainer, model = run(
            resumed,
            ckpt_path=str(tmp_path / f"step={step}.ckpt"),
            num_workers=num_workers,
            val_check_interval=0.5,
        )
        assert trainer.global_step == EPOCHS * STEPS
        assert resumed.trained == [t for t in full.trained if t[0] > step], step
        assert same_parameters(model, reference), step


def test_resume_after_epochs_cut_short_with_loader_workers(tmp_path: Path) -> None:
    # With `limit_train_batches`, workers read batches beyond each epoch's end that are never trained; a mid-epoch
    # checkpoint of a later epoch must save only the batches read ahead in that epoch.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    full = crest()
    with pytest.warns(UserWarning, match="`limit_train_batches`=7 cuts CREST's epochs"):
        run(full, extra=[steps], enable_checkpointing=True, num_workers=2, limit_train_batches=7)
    resumed = crest()
    with pytest.warns(UserWarning, match="`limit_train_batches`=7 cuts CREST's epochs"):
        _, model = run(resumed, ckpt_path=str(tmp_path / "step=9.ckpt"), num_workers=2, limit_train_batches=7)
    assert resumed.trained == [t for t in full.trained if t[0] > 9]
    with pytest.warns(UserWarning, match="`limit_train_batches`=7 cuts CREST's epochs"):
        _, reference = run(crest(), num_workers=2, limit_train_batches=7)
    assert same_parameters(model, reference)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_the_last_step_of_epochs_cut_short(tmp_path: Path, num_workers: int) -> None:
    # Lightning's epoch (7 steps) ends before CREST's (10): a checkpoint on its last step ends the epoch, and the
    # resumed run trains the whole next one.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
    full = crest()
    with pytest.warns(UserWarning, match="`limit_train_batches`=7 cuts CREST's epochs"):
        _, reference = run(
            full, extra=[steps], enable_checkpointing=True, num_workers=num_workers, limit_train_batches=7
        )
    resumed = crest()
    with pytest.warns(UserWarning, match="`limit_train_batches`=7 cuts CREST's epochs"):
        trainer, model = run(
            resumed, ckpt_path=str(tmp_path / "step=7.ckpt"), num_workers=num_workers, limit_train_batches=7
        )
    assert trainer.global_step == EPOCHS * 7
    assert resumed.trained == [t for t in full.trained if t[0] > 7]
    assert torch.equal(resumed.pool, full.pool)
    assert same_parameters(model, reference)


def test_resume_twice_from_a_run_resumed_mid_epoch(tmp_path: Path) -> None:
    # The second checkpoint is saved by a run that resumed mid-epoch (and so never started that epoch itself), on
    # the epoch's last step: it must still name that epoch, so that the next one starts with its own work (with
    # workers, the loader starts reading it before Lightning moves its epoch counter on).
    def every_five(name: str) -> ModelCheckpoint:
        return ModelCheckpoint(tmp_path / name, filename="{step}", every_n_train_steps=5, save_top_k=-1)

    full = crest()
    _, reference = run(full, extra=[every_five("a")], enable_checkpointing=True, num_workers=2)
    run(
        crest(),
        ckpt_path=str(tmp_path / "a" / "step=15.ckpt"),
        extra=[every_five("b")],
        enable_checkpointing=True,
        num_workers=2,
    )
    resumed = crest()
    _, model = run(resumed, ckpt_path=str(tmp_path / "b" / "step=20.ckpt"), num_workers=2)
    assert resumed.trained == [t for t in full.trained if t[0] > 20]
    assert torch.equal(resumed.pool, full.pool)
    assert same_parameters(model, reference)


def test_a_checkpoint_keeps_the_batches_a_restore_has_still_to_serve(tmp_path: Path) -> None:
    # A checkpoint saved with loader workers holds the batches they read ahead. Resumed without workers, those are
    # served one per step; a checkpoint saved before they all are must keep the rest, and count them as read before
    # a selection made meanwhile, for the next resume to repeat the run. (A run without workers does not repeat one
    # with them: workers read a lazily picked coreset ahead, so its proxies come from the weights of an earlier step.)
    def every_step(name: str) -> ModelCheckpoint:
        return ModelCheckpoint(tmp_path / name, filename="{step}", every_n_train_steps=1, save_top_k=-1)

    run(crest(), extra=[every_step("a")], enable_checkpointing=True, num_workers=2)
    state = torch.load(tmp_path / "a" / "step=15.ckpt", weights_only=True)["callbacks"]["Tracer"]
    assert len(state["in_flight_indices"]) >= 2  # read ahead by the workers
    first = crest()
    _, reference = run(
        first,
        ckpt_path=str(tmp_path / "a" / "step=15.ckpt"),
        extra=[every_step("b")],
        enable_checkpointing=True,
    )
    # A selection made while the restored batches are served: the rest of them come before its own.
    replayed = 15 + len(state["in_flight_indices"])
    assert [(s, stale) for s, stale in first.stale if 16 < s <= replayed] == [(18, replayed - 18)]
    resumed = crest()
    _, model = run(resumed, ckpt_path=str(tmp_path / "b" / "step=16.ckpt"))
    assert resumed.trained == [t for t in first.trained if t[0] > 16]
    assert resumed.selections == [s for s in first.selections if s[0] > 16]
    assert same_parameters(model, reference)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fitting_again_with_the_same_trainer_goes_on_from_its_epoch(num_workers: int) -> None:
    # Two fits of 2 and then 3 epochs against one of 3. The second fit's loader starts reading before Lightning's
    # epoch-start hook, as after a restore: the start-of-epoch work must still be that of epoch 2 (the exclusion
    # of learned examples included). Without workers the runs are the same to the bit; with them, a new loader
    # reads ahead on its own schedule, so only what epoch 2's start decides (the pool) is compared.
    class Plain(TinyClassifier):  # Lightning builds the optimizer anew for each fit: no state to lose
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    full = crest()
    torch.manual_seed(0)
    _, reference = run(full, model=Plain(), num_workers=num_workers)
    continued = crest()
    torch.manual_seed(0)
    model = Plain()
    dm = CrestDataModule(blobs(n=N), blobs(n=200, seed=1), batch_size=BATCH, num_workers=num_workers)
    trainer = make_trainer([continued], max_epochs=EPOCHS - 1)
    trainer.fit(model, datamodule=dm)
    trainer.fit_loop.max_epochs = EPOCHS
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == EPOCHS * STEPS
    assert torch.equal(continued.pool, full.pool)
    if num_workers == 0:
        assert continued.trained == full.trained
        assert same_parameters(model, reference)


def test_a_fresh_trainer_counts_its_epochs_from_the_first(tmp_path: Path) -> None:
    # The callback and model of a resumed fit, which ended at epoch 3, fitted again with a fresh Trainer: its epochs
    # count from 0, and each starts with its own random batches, not those of the epoch before.
    epochs = ModelCheckpoint(tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    run(crest(selection="random"), extra=[epochs], enable_checkpointing=True, max_epochs=2)
    callback = crest(selection="random")
    trainer, model = run(callback, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert trainer.current_epoch == EPOCHS
    before = len(callback.trained)
    make_trainer([callback], max_epochs=2).fit(
        model, datamodule=CrestDataModule(blobs(n=N), batch_size=BATCH)
    )
    batches = [digest for _, digest in callback.trained[before:]]
    assert len(batches) == 2 * STEPS
    assert len(set(batches)) == 2 * STEPS


def test_stop_after_an_epoch_then_resume_with_loggers_and_callbacks(tmp_path: Path) -> None:
    def extras(name: str) -> list[Any]:
        return [
            ModelCheckpoint(tmp_path / name, monitor="val_acc", mode="max", save_last=True),
            EarlyStopping(monitor="val_acc", mode="max", patience=100),
            LearningRateMonitor(logging_interval="step"),
        ]

    full = crest()
    _, reference = run(
        full,
        extra=extras("full"),
        logger=CSVLogger(tmp_path, "logs"),
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    first = crest()
    run(
        first,
        extra=extras("run"),
        logger=CSVLogger(tmp_path, "logs"),
        enable_checkpointing=True,
        log_every_n_steps=1,
        max_epochs=1,
    )
    last = tmp_path / "run" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # the whole Lightning checkpoint, CREST's state included
    assert any(key.startswith("Tracer") or "fraction" in key for key in state["callbacks"])
    second = crest()
    trainer, model = run(
        second,
        ckpt_path=str(last),
        extra=extras("run"),
        logger=CSVLogger(tmp_path, "logs"),
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    assert trainer.global_step == EPOCHS * STEPS
    assert first.selections + second.selections == full.selections
    assert same_parameters(model, reference)
    # Every run logged CREST's statistics and the learning rate next to the validation metric.
    for version in (tmp_path / "logs").iterdir():
        header = (version / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"crest/selections", "crest/rho", "val_acc", "lr-SGD"} <= set(header)


class StopAt(L.Callback):
    """Stops the run after a global step, as `Timer` and `EarlyStopping` do inside an epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class Epochs(L.Callback):
    """Records the epoch of every step trained."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(trainer.current_epoch)


@pytest.mark.parametrize("stop", ["max_steps", "should_stop"])
def test_a_run_stopped_inside_an_epoch_resumes_as_lightning_does(tmp_path: Path, stop: str) -> None:
    # Stopped at step 13 of 10-step epochs, the checkpoint is saved at the end of epoch 1.
    ckpt = ModelCheckpoint(tmp_path, filename="last", monitor=None)
    options: dict[str, Any] = {"max_steps": 13} if stop == "max_steps" else {}
    stopper = [StopAt(13)] if stop == "should_stop" else []
    first, _ = run(crest(), extra=[*stopper, ckpt], enable_checkpointing=True, **options)
    assert first.global_step == 13
    # Lightning resumes it with epoch 2, which must get all its 10 steps (it got the 7 left of epoch 1's).
    epochs = Epochs()
    second, _ = run(crest(), ckpt_path=str(tmp_path / "last.ckpt"), extra=[epochs])
    assert epochs.steps == [2] * STEPS
    assert second.global_step == 13 + STEPS
    # With `max_steps` raised, Lightning finishes epoch 1 instead: the uninterrupted run, bit for bit.
    epochs, resumed = Epochs(), crest()
    _, model = run(resumed, ckpt_path=str(tmp_path / "last.ckpt"), extra=[epochs], max_steps=2 * STEPS)
    assert epochs.steps == [1] * (2 * STEPS - 13)
    whole = crest()
    _, reference = run(whole, max_steps=2 * STEPS)
    assert same_parameters(model, reference)
    assert resumed.trained == whole.trained[13:]


def test_interrupt_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    class Interrupt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 14:
                raise KeyboardInterrupt

    every = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    full = crest()
    _, reference = run(full)
    interrupted = crest()
    run_interrupted(interrupted, extra=[every, Interrupt()], enable_checkpointing=True)
    assert len(interrupted.trained) == 14
    resumed = crest()
    trainer, model = run(resumed, ckpt_path=str(tmp_path / "step=12.ckpt"))
    assert trainer.global_step == EPOCHS * STEPS
    assert interrupted.trained[:12] + resumed.trained == full.trained
    assert same_parameters(model, reference)


@pytest.mark.parametrize(
    ("selection", "num_workers", "epoch"),
    [("crest", 0, 1), ("random", 0, 1), ("crest", 2, 1), ("crest", 0, 0)],
)
def test_interrupt_before_an_epochs_first_step_resumes_without_redoing_its_start(
    tmp_path: Path, selection: str, num_workers: int, epoch: int
) -> None:
    # Interrupted before the epoch's first step, its start-of-epoch work (a selection, or the epoch's random batches)
    # is done and batches may be read ahead. The resumed run must not redo that work, which would drop those batches
    # (and, for random batches, draw the epoch's plan again from a generator already moved on).
    class Interrupt(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.current_epoch == epoch:
                raise KeyboardInterrupt

    full = crest(selection=selection)
    _, reference = run(full, num_workers=num_workers)
    interrupted = crest(selection=selection)
    run_interrupted(
        interrupted,
        extra=[OnExceptionCheckpoint(tmp_path, filename="interrupted"), Interrupt()],
        enable_checkpointing=True,
        num_workers=num_workers,
    )
    state = torch.load(tmp_path / "interrupted.ckpt", weights_only=True)
    assert state["global_step"] == epoch * STEPS
    resumed = crest(selection=selection)
    trainer, model = run(resumed, ckpt_path=str(tmp_path / "interrupted.ckpt"), num_workers=num_workers)
    assert trainer.global_step == EPOCHS * STEPS
    assert interrupted.trained + resumed.trained == full.trained
    assert same_parameters(model, reference)


class InterruptedAtEpochStart(Tracer):
    """Raises KeyboardInterrupt (as Ctrl-C would) inside the start-of-epoch work of the epoch at step ``at``: at its
    first draw or exclusion, or (``after_drop``) in the selection that an exclusion forces."""

    def __init__(self, at: int = -1, after_drop: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at
        self.after_drop = after_drop
        self.dropped = 0

    def _interrupt(self) -> None:
        if self._trainer is not None and self._trainer.global_step == self.at:
            self.at = -1
            raise KeyboardInterrupt

    def _draw(self, count: int, size: int) -> Tensor:
        if not self.after_drop or self.dropped:
            self._interrupt()
        return super()._draw(count, size)

    def _drop_learned_examples(self) -> int:
        if not self.after_drop:
            self._interrupt()
        self.dropped = super()._drop_learned_examples()
        return self.dropped


@pytest.mark.parametrize(
    ("selection", "after_drop", "tau"),
    [("crest", False, 0.02), ("random", False, 0.02), ("crest", True, 1e9)],
)
def test_an_interrupt_inside_an_epochs_start_has_that_start_redone(
    tmp_path: Path, selection: str, after_drop: bool, tau: float
) -> None:
    # Resumed from an epoch's last step, the next epoch's start-of-epoch work (CREST's exclusion of learned examples
    # and the selection it forces, or the epoch's random batches) runs when the sampler reads its first batch.
    # Interrupted inside that work, the checkpoint must not count it as done, or the resumed run would skip it. With
    # checks that always pass, only the exclusion calls for a selection at that epoch's start.
    steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=STEPS, save_top_k=-1)
    # One class for all three runs: a checkpoint's callback state is keyed by the class's name.
    full = crest(InterruptedAtEpochStart, selection=selection, tau=tau)
    _, reference = run(full, extra=[steps], enable_checkpointing=True)
    if after_drop:
        assert (STEPS, "epoch_start") in [(step, hook) for step, hook, _ in full.selections]
    interrupted = crest(
        InterruptedAtEpochStart, selection=selection, at=STEPS, after_drop=after_drop, tau=tau
    )
    run_interrupted(
        interrupted,
        ckpt_path=str(tmp_path / f"step={STEPS}.ckpt"),
        extra=[OnExceptionCheckpoint(tmp_path, filename="interrupted")],
        enable_checkpointing=True,
    )
    assert isinstance(interrupted, InterruptedAtEpochStart)
    assert interrupted.at == -1  # it fired
    resumed = crest(InterruptedAtEpochStart, selection=selection, tau=tau)
    trainer, model = run(resumed, ckpt_path=str(tmp_path / "interrupted.ckpt"))
    assert trainer.global_step == EPOCHS * STEPS
    assert interrupted.trained + resumed.trained == full.trained[STEPS:]
    assert torch.equal(resumed.pool, full.pool)
    assert same_parameters(model, reference)


class DiesInWorker(LabelledTensors):
    """Its loader worker process exits abruptly after serving ``limit`` items (CREST's own reads are not counted)."""

    def __init__(self, data: LabelledTensors, limit: int) -> None:
        super().__init__(*data.tensors)
        self.limit = limit
        self.served = 0

    def __getitem__(self, index: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            self.served += 1
            if self.served > self.limit:
                os._exit(1)
        return super().__getitem__(index)


def test_dead_loader_worker_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    every = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    torch.manual_seed(0)
    dying = CrestDataModule(DiesInWorker(blobs(n=N), limit=13 * BATCH), batch_size=BATCH, num_workers=1)
    trainer = make_trainer([crest(), every], max_epochs=EPOCHS, enable_checkpointing=True)
    # The loader reports the dead worker as a RuntimeError, or, when it died while handing over a batch's shared
    # memory, as the ConnectionResetError of that transfer (more often on a loaded machine).
    with pytest.raises((RuntimeError, ConnectionResetError)) as failure:
        trainer.fit(TinyClassifier(), datamodule=dying)
    assert isinstance(failure.value, ConnectionResetError) or "worker" in str(failure.value)
    last = max(tmp_path.glob("step=*.ckpt"), key=lambda path: int(path.stem.split("=")[1]))
    start = torch.load(last, weights_only=True)["global_step"]
    assert 4 <= start < 13
    resumed = crest()
    trainer, model = run(resumed, ckpt_path=str(last), num_workers=1)
    assert trainer.global_step == EPOCHS * STEPS
    # The run goes on as if the worker had never died: the same batches and parameters as an uninterrupted run.
    full = crest()
    _, reference = run(full, num_workers=1)
    assert resumed.trained == [t for t in full.trained if t[0] > start]
    assert same_parameters(model, reference)


# --- faults and bad input ----------------------------------------------------------------------------------


class NaNAfter(TinyClassifier):
    """Its eval-mode logits turn NaN from global step ``k`` on (CREST scores examples in eval mode)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, inputs: Tensor) -> Tensor:
        logits = super().forward(inputs)
        if not self.training and self.trainer.global_step >= self.k:
            return logits * math.nan
        return logits


@pytest.mark.parametrize("proxy_dtype", [None, torch.float16])
def test_non_finite_gradient_proxies_name_the_step(proxy_dtype: torch.dtype | None) -> None:
    message = r"Non-finite gradient proxies while picking a coreset at global step 0: the model's logits contain NaN or inf\."
    # Half precision overflows at 65504: the message says so only when the proxies were scored in it.
    hint = (
        " They were scored under proxy_dtype=torch.float16, whose range may have overflowed"
        if proxy_dtype
        else "$"
    )
    with pytest.raises(FloatingPointError, match=message + hint):
        run(crest(proxy_dtype=proxy_dtype), model=NaNAfter(0))


@pytest.mark.parametrize("name", ["gradient", "curvature"])
def test_non_finite_derivatives_of_a_coreset_stop_the_selection(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Smoothed over the run, one inf would have left every later prediction NaN (and every check passing).
    derivatives = CrestCallback._coreset_derivatives

    def overflowed(self: CrestCallback, *args: Any) -> tuple[Tensor, Tensor | None]:
        grad, curvature = derivatives(self, *args)
        if self._trainer is not None and self._trainer.global_step >= 3:
            if name == "gradient":
                grad = grad * math.inf
            elif curvature is not None:
                curvature = curvature * math.inf
        return grad, curvature

    monkeypatch.setattr(CrestCallback, "_coreset_derivatives", overflowed)
    with pytest.raises(
        FloatingPointError, match=rf"Non-finite {name} of a coreset's loss .* at global step \d+"
    ):
        run(crest(tau=0.0))


def test_a_prediction_that_overflows_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # Far off the model's scale its two terms overflow to inf of both signs: a NaN rho, which no longer passes.
    monkeypatch.setattr(QuadraticModel, "predict", lambda self, params: math.nan)
    callback = crest(tau=1e9, drop_learned=False)
    run(callback)
    assert callback._checks > 0
    assert math.isnan(callback.statistics["rho"])
    # One selection at the start, and one after every check but the last, at the fit's last step.
    assert callback._selections == callback._checks


def test_non_finite_check_loss_names_the_step() -> None:
    with pytest.raises(FloatingPointError, match="Non-finite loss on the check sample at global step 5"):
        run(crest(tau=1e9), model=NaNAfter(5))


class Corrupt(LabelledTensors):
    """Item ``bad`` fails to load, as a truncated image file would."""

    def __init__(self, bad: int) -> None:
        data = blobs(n=N)
        super().__init__(*data.tensors)
        self.bad = bad

    def __getitem__(self, index: int) -> Any:
        if index == self.bad:
            raise OSError(f"cannot read item {index}: file truncated")
        return super().__getitem__(index)


def test_unreadable_item_raises_the_datasets_error_in_crest_fetch() -> None:
    dm = CrestDataModule(Corrupt(bad=7), batch_size=BATCH)
    with pytest.raises(OSError, match="cannot read item 7") as raised:
        dm.fetch([3, 7, 9])
    assert "CREST failed to load training item 7" in "\n".join(getattr(raised.value, "__notes__", []))
    # In a fit: the first selection scores a random subset of the whole set (random_subset_size=1.0).
    trainer = make_trainer([crest(random_subset_size=1.0)], max_epochs=1)
    with pytest.raises(OSError, match="cannot read item 7"):
        trainer.fit(TinyClassifier(), datamodule=dm)


def test_unreadable_item_raises_the_datasets_error_in_training() -> None:
    # Random selection with the whole budget reads every item for training and none for scoring.
    trainer = make_trainer([crest(selection="random", fraction=1.0)], max_epochs=1)
    with pytest.raises(OSError, match="cannot read item 7"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(Corrupt(bad=7), batch_size=BATCH))


def test_bf16_mixed_precision_keeps_crest_in_float32() -> None:
    dtypes: set[torch.dtype] = set()
    in_bf16: list[bool] = []

    class Watch(Tracer):
        def _forward(
            self, indices: Tensor, *args: Any, **kwargs: Any
        ) -> tuple[Tensor, Tensor, Tensor | None]:
            logits, losses, embeddings = super()._forward(indices, *args, **kwargs)
            dtypes.update({logits.dtype, losses.dtype})
            # Computed under the trainer's bf16 autocast, returned in float32.
            in_bf16.append(torch.equal(logits, logits.bfloat16().float()))
            return logits, losses, embeddings

    callback = Watch(fraction=FRACTION, random_subset_size=0.1, tau=0.02)
    trainer, model = run(callback, precision="bf16-mixed", max_epochs=2)
    assert trainer.precision == "bf16-mixed"
    assert len(callback.selections) > 1
    assert dtypes == {torch.float32}  # logits and losses behind the proxies and the recorded losses
    assert in_bf16
    assert all(in_bf16)
    state = callback._quadratic.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if isinstance(v, Tensor))
    assert all(w.dtype == torch.float32 for _, w in callback.coresets)
    assert math.isfinite(callback._rho)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_sharded_strategies_are_refused() -> None:
    # FSDP and DeepSpeed need a GPU to construct a Trainer, so only the callback's own check is exercised.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    dm = CrestDataModule(blobs(n=N), batch_size=BATCH)
    fake = SimpleNamespace(
        datamodule=dm, accumulate_grad_batches=1, callbacks=[], strategy=FSDPStrategy(), world_size=1
    )
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        CrestCallback().setup(fake, TinyClassifier(), "fit")  # type: ignore[arg-type]


def test_a_state_from_another_version_is_refused_with_the_key_it_lacks() -> None:
    callback = crest()
    run(callback, max_epochs=1)
    saved = callback.state_dict()
    # Every key but the labels' fingerprint, which checkpoints of earlier versions lack and resume without.
    for key in sorted(saved.keys() - {"labels_digest"}):
        state = {name: value for name, value in saved.items() if name != key}
        # (A callback with a seed of its own does not read the state's at load, and a fit needed it still.)
        for fresh in (crest(), crest(seed=3)):
            with pytest.raises(ValueError, match=f"lacks '{key}': it was saved by another version"):
                fresh.load_state_dict(state)
            assert fresh.state_dict() == {}


def test_a_state_that_fails_to_load_leaves_the_callback_as_it_was() -> None:
    # The keys are read in turn: one missing halfway through left the pool, generator and quadratic model of the
    # broken state in place, and a fresh callback with a pool but no plan ("pickled after a fit").
    other = crest(seed=1)
    run(other, max_epochs=2)
    broken = other.state_dict()
    del broken["global_batch"]  # among the last keys read
    fresh = crest()
    with pytest.raises(ValueError, match=r"lacks 'global_batch'"):
        fresh.load_state_dict(broken)
    assert fresh.state_dict() == {}
    callback = crest()
    run(callback, max_epochs=1)
    before = callback.state_dict()
    with pytest.raises(ValueError, match=r"lacks 'global_batch'"):
        callback.load_state_dict(broken)
    after = callback.state_dict()
    assert after.keys() == before.keys()
    for key in ("pool", "window_max_loss", "rng_state", "check_indices"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert after["quadratic"].keys() == before["quadratic"].keys()
    assert (after["interval"], after["selections"], after["checks"]) == (
        before["interval"],
        before["selections"],
        before["checks"],
    )


def test_numpy_float_settings_are_kept_as_python_floats_for_weights_only_checkpoints(tmp_path: Path) -> None:
    callback = crest(fraction=np.float64(FRACTION), random_subset_size=np.float64(0.1))
    assert type(callback.fraction) is float
    assert type(callback.random_subset_size) is float
    ckpt = ModelCheckpoint(tmp_path, filename="last", monitor=None)
    run(callback, extra=[ckpt], enable_checkpointing=True, max_epochs=1)
    torch.load(tmp_path / "last.ckpt", weights_only=True)
    trainer, _ = run(crest(fraction=np.float64(FRACTION)), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == EPOCHS * STEPS


class Evaluated(TinyClassifier):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_a_checkpoint_leaves_crest_state_alone(tmp_path: Path, stage: str) -> None:
    # Lightning restores callbacks for every stage given a `ckpt_path`; only a fit resumes CREST. Evaluating an
    # earlier checkpoint (`ckpt_path="best"`, say) keeps the fit's state, and the next fit does not resume from it.
    callback = crest(tau=0.0)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer, model = run(callback, extra=[saver], model=Evaluated(), enable_checkpointing=True)
    selections, pool = callback.statistics["selections"], callback.pool
    early = tmp_path / "epoch=0-step=3.ckpt"
    data = blobs(n=200, seed=1)
    dm = CrestDataModule(blobs(n=N), data, test_dataset=data, predict_dataset=data, batch_size=BATCH)
    getattr(trainer, stage)(model, datamodule=dm, ckpt_path=str(early))
    assert callback.statistics["selections"] == selections
    assert torch.equal(callback.pool, pool)
    # A new model in a new Trainer: a fresh fit, every epoch whole.
    again, _ = run(callback)
    assert again.global_step == EPOCHS * STEPS
    assert [step for step, _ in callback.trained[-EPOCHS * STEPS :]] == list(range(1, EPOCHS * STEPS + 1))


def test_evaluating_a_checkpoint_without_crest_state_leaves_the_next_load_alone(tmp_path: Path) -> None:
    # Lightning calls `load_state_dict` only for a callback whose saved state is not empty: a checkpoint of a run
    # without CREST must not leave the next load (by hand, here) ignored.
    model = Evaluated()
    trainer = make_trainer([ModelCheckpoint(dirpath=tmp_path)], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=CrestDataModule(blobs(n=N), batch_size=BATCH))
    source = crest()
    run(source, max_epochs=1)
    callback = crest()
    data = blobs(n=200, seed=1)
    make_trainer([callback]).test(
        model,
        datamodule=CrestDataModule(blobs(n=N), test_dataset=data, batch_size=BATCH),
        ckpt_path=str(next(tmp_path.glob("*.ckpt"))),
    )
    callback.load_state_dict(source.state_dict())
    assert callback._selections == source._selections > 0


def test_a_failed_restore_outside_a_fit_leaves_the_next_load_alone(tmp_path: Path) -> None:
    # Another callback's restore fails after CREST's `on_load_checkpoint` and before its `load_state_dict`.
    class Failing(L.Callback):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            raise RuntimeError("cannot restore")

        def state_dict(self) -> dict[str, Any]:
            return {"saved": True}

    source = crest()
    saver = ModelCheckpoint(dirpath=tmp_path)
    _, model = run(
        source, extra=[Failing(), saver], model=Evaluated(), max_epochs=1, enable_checkpointing=True
    )
    callback = crest()
    data = blobs(n=200, seed=1)
    with pytest.raises(RuntimeError, match="cannot restore"):
        make_trainer([Failing(), callback]).validate(
            model,
            datamodule=CrestDataModule(blobs(n=N), data, batch_size=BATCH),
            ckpt_path=saver.best_model_path,
        )
    callback.load_state_dict(source.state_dict())
    assert callback._selections == source._selections > 0


def test_an_accumulation_schedule_after_a_mid_epoch_restore_is_refused_before_its_epoch(
    tmp_path: Path,
) -> None:
    # Resumed after 5 steps of epoch 2 (25 of 10-step epochs). With `max_steps`=45 the fit certainly reaches epoch 3,
    # where the schedule sets an accumulation of 2: refused before its first step. With 31 it reaches epoch 3 only
    # by the epoch's trained steps, which the restore does not say reliably: refused when epoch 3 starts, before
    # any of its steps. With 30 it ends with epoch 2 and trains.
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=25)
    run(crest(), extra=[saver], max_epochs=-1, max_steps=26, enable_checkpointing=True)
    checkpoint = str(tmp_path / "epoch=2-step=25.ckpt")
    for max_steps, trained in ((45, 25), (31, 30), (30, None)):
        schedule = GradientAccumulationScheduler({0: 1, 3: 2})
        callback = crest()
        if trained is None:
            trainer, _ = run(
                callback, extra=[schedule], ckpt_path=checkpoint, max_epochs=-1, max_steps=max_steps
            )
            assert trainer.global_step == max_steps
            continue
        with pytest.raises(ValueError, match="`accumulate_grad_batches`=2"):
            run(callback, extra=[schedule], ckpt_path=checkpoint, max_epochs=-1, max_steps=max_steps)
        assert [step for step, _ in callback.trained][-1:] == ([trained] if trained > 25 else [])


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal states: the same keys, and equal values, tensors (also inside lists and nested dicts) included."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor):
            # NaN marks an example without a recorded loss.
            return isinstance(y, Tensor) and torch.equal(x.nan_to_num(-1.0), y.nan_to_num(-1.0))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return bool(x == y)

    return same(a, b)


def test_a_state_loaded_by_hand_is_saved_as_loaded_until_a_fit_takes_it() -> None:
    source = crest()
    run(source, max_epochs=2)
    state = source.state_dict()
    fresh = crest()
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)  # it failed: no data module held the plan
    # A callback of an earlier fit, too, saves the loaded state, not the plan its last fit left in its data module.
    used = crest()
    run(used, max_epochs=1, train=blobs(n=N, seed=3))
    used.load_state_dict(state)
    assert same_state(used.state_dict(), state)
    # Once a fit takes it, the state is the fit's again.
    trainer, _ = run(fresh, max_epochs=3)
    assert trainer.global_step == 3 * fresh._steps_per_epoch
    assert not same_state(fresh.state_dict(), state)


def test_a_state_loaded_by_hand_goes_on_over_every_epoch_of_a_fresh_trainer() -> None:
    # The state's next epoch is the fresh Trainer's epoch 0, and each later epoch starts as its own: random
    # batches drawn anew every epoch. (The Trainer's epochs below the saved one were taken for that one.)
    source = crest(selection="random")
    run(source, max_epochs=3)
    loaded = crest(selection="random")
    loaded.load_state_dict(source.state_dict())
    trainer, _ = run(loaded, max_epochs=4)
    assert trainer.global_step == 4 * loaded._steps_per_epoch
    assert loaded._selections == source._selections + 4  # one plan per epoch


def test_a_mid_epoch_state_loaded_by_hand_into_a_trained_trainer_with_workers_is_refused() -> None:
    # Such a Trainer starts a first iterator of the epoch and drops it, and its workers' read-ahead took the state's
    # place in the epoch: the epoch ran whole, on other batches. A fresh Trainer goes on from the saved step.
    source = crest()
    saved: list[dict[str, Any]] = []

    class Saving(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 5:  # inside the first epoch (10 steps)
                saved.append(source.state_dict())

    run(source, extra=[Saving()], max_epochs=1)
    trained = crest()
    dm = CrestDataModule(blobs(n=N), batch_size=BATCH, num_workers=2)
    trainer = make_trainer([trained], max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    trained.load_state_dict(saved[0])
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(
        ValueError, match=r"stopped inside an epoch \(step 5 of 10\), and this Trainer trained before"
    ):
        trainer.fit(TinyClassifier(), datamodule=dm)
    fresh = crest()
    fresh.load_state_dict(saved[0])
    trainer, _ = run(fresh, max_epochs=1, num_workers=2)
    assert trainer.global_step == 5  # the steps left in the saved epoch


def test_a_deep_copy_of_a_fitted_callback_carries_its_state() -> None:
    source = crest()
    run(source, max_epochs=2)
    state = source.state_dict()
    clone = copy.deepcopy(source)
    assert same_state(clone.state_dict(), state)  # it raised: the plan stayed with the source's data module
    # The copy goes on as the same state loaded by hand does, and leaves the source as it was.
    loaded = crest()
    loaded.load_state_dict(state)
    _, by_copy = run(clone, max_epochs=1)
    _, by_hand = run(loaded, max_epochs=1)
    assert same_parameters(by_copy, by_hand)
    assert clone.selections[len(source.selections) :] == loaded.selections
    assert clone._selections == loaded._selections > source._selections
    assert same_state(source.state_dict(), state)
    # A pickled one has no plan: its state is refused, not saved incomplete.
    with pytest.raises(RuntimeError, match=r"pickled after a fit.*copy\.deepcopy"):
        pickle.loads(pickle.dumps(source)).state_dict()
    assert copy.deepcopy(crest()).state_dict() == {}


def test_a_deep_copy_taken_inside_a_step_is_not_warned_about_as_a_checkpoint() -> None:
    source = crest()
    copies: list[CrestCallback] = []

    class Copying(L.Callback):  # listed before CrestCallback: its batch end runs inside CREST's step
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 5:
                copies.append(copy.deepcopy(source))

    torch.manual_seed(0)
    trainer = make_trainer([Copying(), source], max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saved inside a training step")
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(blobs(n=N), batch_size=BATCH))
    assert copies
    assert copies[0].state_dict()["epoch_step"] == 4  # the step in progress is not counted yet
