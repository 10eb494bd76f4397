"""CrestCallback in real (small) fits: budget, control of re-selection, exclusion, logging, errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TinyClassifier, blobs, fit, make_trainer
from torch import Tensor

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.callback import learned_examples


class Recorder(CrestCallback):
    """Keeps what happened at every selection and check, for assertions."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, int]] = []
        self.adaptations: list[tuple[int, int, float, float]] = []
        self.batches: list[tuple[Tensor, Tensor]] = []

    def _select_coresets(self, count: int) -> None:
        super()._select_coresets(count)
        self.events.append(("select", self._trainer.global_step if self._trainer else -1))
        q = self._quadratic
        self.adaptations.append(
            (self._interval, self._num_coresets, self._peak_curvature, q.curvature_norm())
        )

    def _check(self) -> bool:
        drifted = super()._check()
        self.events.append(("check", self._trainer.global_step if self._trainer else -1))
        return drifted

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.batches.append((batch[0].detach().clone(), batch[2].detach().clone()))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)


def test_budget_is_exact() -> None:
    data = blobs(n=1000)
    callback = CrestCallback(fraction=0.15, random_subset_size=0.1)
    trainer, _ = fit(callback, data=data, batch_size=32, max_epochs=3)
    steps_per_epoch = math.ceil(0.15 * 1000 / 32)
    assert trainer.global_step == 3 * steps_per_epoch
    assert trainer.num_training_batches == steps_per_epoch


def test_batches_are_whole_weighted_coresets() -> None:
    callback = Recorder(random_subset_size=0.1, tau=1e9)
    fit(callback, max_epochs=1)
    plan = callback._dm.plan
    assert len(plan) == 5  # P = b * T1 at the first selection
    for inputs, weights in callback.batches:
        assert inputs.shape[0] == 32
        assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    # Served round-robin: step t trains on coreset t mod P.
    data = blobs()
    for step, (inputs, _) in enumerate(callback.batches):
        indices, _ = plan.batches[step % len(plan)]
        assert torch.equal(inputs, data.tensors[0][indices])


def test_tau_zero_reselects_at_every_check() -> None:
    # interval_mul close to 0 keeps T1 = 1: a check after every step, epoch ends included.
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-6)
    trainer, _ = fit(callback, max_epochs=2)
    checks = [step for kind, step in callback.events if kind == "check"]
    selections = [step for kind, step in callback.events if kind == "select"]
    assert checks == list(range(1, trainer.global_step + 1))
    # A failed check re-selects at once; on an epoch's last step the next epoch starts with the selection.
    # Either way the selection happens before the next step; the last step of training has none to feed.
    assert selections == [0, *checks[:-1]]


def test_huge_tau_selects_once() -> None:
    callback = Recorder(random_subset_size=0.1, tau=1e9)
    fit(callback, max_epochs=3)
    assert [kind for kind, _ in callback.events].count("select") == 1
    assert callback._checks > 0


def test_adaptive_interval_and_coresets_follow_the_formulas() -> None:
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=3.0, coreset_mul=2)
    fit(callback, max_epochs=2)
    first, *later = callback.adaptations
    assert first[:2] == (1, 2)  # T1 = 1, P = b at the first selection
    assert later
    peak = first[2]
    for interval, num_coresets, reference, current in later:
        peak = max(peak, current)
        assert reference == peak  # the sharpest curvature so far
        assert interval == max(1, math.ceil(3.0 * peak / current * (1 - 1e-6)))
        assert num_coresets == 2 * interval
    assert len({interval for interval, *_ in later}) >= 1


class AnchorRecorder(Recorder):
    """Also keeps, at every selection, the first subset, its losses, the check sample and the anchor loss."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.anchors: list[tuple[Tensor, Tensor, Tensor, float]] = []

    def _pick(self, subsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        coresets, weights, losses = super()._pick(subsets)
        self._last_pick = (subsets[0].clone(), losses[: subsets.shape[1]].clone())
        return coresets, weights, losses

    def _select_coresets(self, count: int) -> None:
        super()._select_coresets(count)
        first, losses = self._last_pick
        anchor_loss = self._quadratic.anchor_loss
        assert anchor_loss is not None
        self.anchors.append((first, losses, self._check_indices.clone(), anchor_loss))


@pytest.mark.parametrize("check_size", [None, 7])
def test_check_sample_is_part_of_the_first_subset_measured_at_the_anchor(check_size: int | None) -> None:
    callback = AnchorRecorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-6, check_size=check_size)
    fit(callback, max_epochs=1)
    assert len(callback.anchors) > 2
    samples = set()
    for first, losses, check, anchor_loss in callback.anchors:
        assert len(check) == (check_size or len(first))
        assert len(set(check.tolist())) == len(check)
        positions = [first.tolist().index(i) for i in check.tolist()]  # raises if one is not in the subset
        # L0 is the loss of exactly the examples the checks evaluate: like is compared with like.
        assert anchor_loss == pytest.approx(float(losses[positions].mean()), rel=1e-6)
        samples.add(tuple(sorted(check.tolist())))
    assert len(samples) == len(callback.anchors)  # a fresh sample at every selection


def test_check_size_larger_than_the_subset() -> None:
    with pytest.raises(ValueError, match="`check_size`=500 exceeds the random subset size r=120"):
        fit(CrestCallback(random_subset_size=0.1, check_size=500), max_epochs=1)


def test_random_baseline_uses_weight_one_and_no_model() -> None:
    callback = Recorder(selection="random")
    trainer, _ = fit(callback, max_epochs=2)
    assert all(bool((w == 1).all()) for _, w in callback.batches)
    assert not callback.events  # no coreset selection, no checks
    assert trainer.global_step == 2 * math.ceil(0.1 * 1200 / 32)
    # Fresh uniform batches: no example repeats within an epoch.
    steps = trainer.num_training_batches
    epoch = torch.cat([x for x, _ in callback.batches[:steps]])
    assert len(torch.unique(epoch, dim=0)) == len(epoch)


def test_logged_statistics() -> None:
    callback = CrestCallback(random_subset_size=0.1)
    trainer, _ = fit(callback, max_epochs=1)
    metrics = trainer.callback_metrics
    for name in (
        "selections",
        "rho",
        "check_interval",
        "num_coresets",
        "pool_size",
        "selection_time",
        "overhead",
    ):
        assert f"crest/{name}" in metrics
    assert metrics["crest/selections"] >= 1
    assert metrics["crest/pool_size"] == 1200
    assert 0 < float(metrics["crest/overhead"]) < 1


def test_exclusion_drops_learned_examples_within_floors() -> None:
    data = blobs(n=1200, noise=0.3)  # separable: most examples are learned quickly
    callback = CrestCallback(
        random_subset_size=0.2, drop_interval=1, min_pool_fraction=0.6, min_class_fraction=0.7
    )
    trainer, _ = fit(callback, data=data, max_epochs=4, model=TinyClassifier(lr=0.2))
    pool = callback._pool
    assert pool is not None
    assert int(pool.sum()) < 1200  # something was learned and dropped
    assert int(pool.sum()) >= math.ceil(0.6 * 1200)
    for cls in range(4):
        size = int((data.targets == cls).sum())
        assert int(pool[data.targets == cls].sum()) >= math.ceil(0.7 * size)
    assert trainer.callback_metrics["crest/pool_size"] == int(pool.sum())


def test_learned_examples_rules() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    max_loss = torch.tensor([0.01, 0.05, 0.5, math.nan, 0.02, 0.03, 0.04, 0.09, 0.2, 0.0])
    pool = torch.ones(10, dtype=torch.bool)
    drop = learned_examples(
        max_loss, pool, labels, threshold=0.1, min_pool_fraction=0.0, min_class_fraction=0.0
    )
    assert sorted(drop.tolist()) == [0, 1, 4, 5, 6, 7, 9]  # never-recorded (3) and high-loss (2, 8) stay
    # Class floor: class 0 keeps ceil(0.75 * 4) = 3, so only its most learned example goes.
    drop = learned_examples(
        max_loss, pool, labels, threshold=0.1, min_pool_fraction=0.0, min_class_fraction=0.75
    )
    assert 0 in drop.tolist()
    assert 1 not in drop.tolist()
    # Global floor: at most 10 - ceil(0.8 * 10) = 2 drops, the two most learned.
    drop = learned_examples(
        max_loss, pool, labels, threshold=0.1, min_pool_fraction=0.8, min_class_fraction=0.0
    )
    assert sorted(drop.tolist()) == [0, 9]
    # Examples already out of the pool are not dropped again.
    pool[0] = False
    drop = learned_examples(
        max_loss, pool, labels, threshold=0.1, min_pool_fraction=0.0, min_class_fraction=0.0
    )
    assert 0 not in drop.tolist()


def test_module_ignoring_weights_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="does not use the batch's weights"):
        fit(CrestCallback(random_subset_size=0.1), model=TinyClassifier(use_weights=False), max_epochs=1)


def test_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    callback = CrestCallback(random_subset_size=0.1)
    fit(callback, max_epochs=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = CrestCallback(random_subset_size=0.1)
    restored.load_state_dict(state)
    assert torch.equal(restored._pool, callback._pool)  # type: ignore[arg-type]
    assert restored._interval == callback._interval
    assert restored._selections == callback._selections
    assert torch.equal(restored._generator.get_state(), callback._generator.get_state())
    assert restored._quadratic.predict(callback._model_parameters()) == pytest.approx(
        callback._quadratic.predict(callback._model_parameters())
    )


# --- bad input, raised before training starts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"`fraction` must lie in \(0.0, 1.0\]"),
        ({"fraction": 1.5}, "`fraction`"),
        ({"tau": -1.0}, "`tau`"),
        ({"random_subset_size": 0}, "`random_subset_size`"),
        ({"coreset_mul": 0}, "`coreset_mul`"),
        ({"hessian_params": "first"}, "`hessian_params`"),
        ({"selection": "craig"}, "`selection`"),
        ({"knn": -3}, "`knn`"),
        ({"check_size": 0}, "`check_size`"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrestCallback(**kwargs)


def test_random_subset_smaller_than_the_batch() -> None:
    with pytest.raises(ValueError, match="`random_subset_size`=10 must lie between the global batch"):
        fit(CrestCallback(random_subset_size=10), max_epochs=1)


def test_fraction_of_n_is_raised_to_the_batch() -> None:
    callback = CrestCallback(random_subset_size=0.001)
    fit(callback, max_epochs=1)
    assert callback._subset == 32


def test_requires_crest_datamodule(data: Any) -> None:
    trainer = make_trainer([CrestCallback()], max_epochs=1)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    with pytest.raises(TypeError, match="needs its batches from a CrestDataModule"):
        trainer.fit(TinyClassifier(), train_dataloaders=loader)


def test_gradient_accumulation_is_refused(data: Any) -> None:
    trainer = make_trainer([CrestCallback()], max_epochs=1, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))


def test_manual_optimization_is_refused(data: Any) -> None:
    class Manual(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    trainer = make_trainer([CrestCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(Manual(), datamodule=CrestDataModule(data, batch_size=32))


def test_items_must_be_pairs() -> None:
    triples = torch.utils.data.TensorDataset(
        torch.randn(10, 3), torch.zeros(10, dtype=torch.long), torch.ones(10)
    )
    with pytest.raises(TypeError, match=r"\(input, target\) pairs"):
        CrestDataModule(triples)


def test_targets_must_be_integers() -> None:
    floats = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.rand(10))
    with pytest.raises(TypeError, match="integer class indices"):
        CrestDataModule(floats)


def test_logits_of_the_wrong_shape() -> None:
    class Flat(TinyClassifier):
        def forward(self, inputs: Tensor) -> Tensor:
            return super().forward(inputs)[:, :2]  # two of four classes

    with pytest.raises(ValueError, match="returned 2 logits per example but the training set has 4 classes"):
        fit(CrestCallback(random_subset_size=0.1), model=Flat(), max_epochs=1)


def test_compute_logits_extension_point() -> None:
    class DictOutput(TinyClassifier):
        def forward(self, inputs: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
            return {"logits": self.net(inputs)}

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets, weights = batch
            return (
                weights * torch.nn.functional.cross_entropy(self(inputs)["logits"], targets, reduction="none")
            ).mean()

    class Callback(CrestCallback):
        def compute_logits(self, pl_module: L.LightningModule, inputs: Any) -> Tensor:
            return pl_module(inputs)["logits"]  # type: ignore[no-any-return]

    with pytest.raises(ValueError, match="compute_logits"):
        fit(CrestCallback(random_subset_size=0.1), model=DictOutput(), max_epochs=1)
    trainer, _ = fit(Callback(random_subset_size=0.1), model=DictOutput(), max_epochs=1)
    assert trainer.callback_metrics["crest/selections"] >= 1


def test_full_data_training_without_callback(data: Any) -> None:
    trainer, _ = fit(None, data=data, max_epochs=1)
    assert trainer.global_step == math.ceil(1200 / 32)


def test_lightning_cli_configures_the_callback(tmp_path: Path) -> None:
    script = Path(__file__).parent / "cli_app.py"
    command = [
        sys.executable,
        str(script),
        "fit",
        "--trainer.callbacks+=lightning_crest.CrestCallback",
        "--trainer.callbacks.fraction=0.25",
        "--trainer.callbacks.tau=0.02",
        "--trainer.callbacks.random_subset_size=0.1",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CREST fraction=0.25 tau=0.02 steps=10" in result.stdout
