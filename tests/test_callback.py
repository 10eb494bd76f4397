"""CrestCallback in real (small) fits: budget, control of re-selection, exclusion, logging, errors."""

from __future__ import annotations

import copy
import csv
import inspect
import itertools
import math
import pickle
import re
import subprocess
import sys
import time
import warnings
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import LabelledTensors, RecordedDraws, Recorder, TinyClassifier, blobs, fit, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

import lightning_crest.callback as crest_callback
from lightning_crest import CrestCallback, CrestDataModule, weighted_cross_entropy
from lightning_crest._modules import eval_mode
from lightning_crest.datamodule import item_seed
from lightning_crest.quadratic import rademacher_like
from lightning_crest.selection import facility_location, gradient_proxy


def seeded_classifier(**kwargs: Any) -> TinyClassifier:
    """A TinyClassifier whose initial weights do not depend on the tests that ran before (`fit` seeds after)."""
    torch.manual_seed(0)
    return TinyClassifier(**kwargs)


def test_budget_is_exact() -> None:
    data = blobs(n=1000)
    callback = CrestCallback(fraction=0.15, random_subset_size=0.1)
    trainer, _ = fit(callback, data=data, batch_size=32, max_epochs=3)
    steps_per_epoch = math.ceil(0.15 * 1000 / 32)
    assert trainer.global_step == 3 * steps_per_epoch
    assert trainer.num_training_batches == steps_per_epoch


def test_coresets_are_served_whole_and_round_robin() -> None:
    # A huge tau never re-selects: the P = 5 coresets of the first selection serve all 2 x 4 steps, wrapping at 5.
    callback = Recorder(random_subset_size=0.1, tau=1e9)
    fit(callback, max_epochs=2)
    assert callback.steps("select") == [0]
    # T1 = 1: a check after every step, epoch ends included; none re-selects.
    assert callback.steps("check") == list(range(1, 9))
    plan = callback._dm.plan
    assert len(plan) == 5  # P = b * T1 at the first selection
    assert len(callback.batches) == 8
    data = blobs()
    for step, (inputs, weights) in enumerate(callback.batches):
        indices, planned = plan.batches[step % len(plan)]  # step t trains on coreset t mod P
        assert len(indices) == 32
        assert torch.equal(inputs, data.tensors[0][indices])
        assert torch.equal(weights, planned)
        assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    # `coresets` lists the plan: the first coreset picked at the selection, the others as training reached them.
    picked = [(c, w) for *_, coresets, weights in callback.picks for c, w in zip(coresets, weights)]
    assert [len(subsets) for _, subsets, *_ in callback.picks] == [1, 1, 1, 1, 1]
    assert len(callback.coresets) == len(picked) == 5
    for (indices, weights), (picked_indices, picked_weights) in zip(callback.coresets, picked):
        assert torch.equal(indices, picked_indices)
        assert torch.equal(weights, picked_weights)


def test_coresets_are_facility_location_picks_at_the_weights_of_their_step() -> None:
    # hessian_probes=2: two coresets picked in one call at each selection, the others one by one when reached.
    callback = Recorder(random_subset_size=0.1, hessian_probes=2)
    fit(callback, max_epochs=2)
    selections = callback.steps("select")
    assert len(selections) > 1
    assert {len(subsets) for _, subsets, *_ in callback.picks} == {1, 2}
    # Some coresets were picked at a step without a selection: with the weights of that step, not the selection's.
    assert {step for step, *_ in callback.picks} > set(selections)
    for _, subsets, logits, targets, coresets, weights in callback.picks:
        for subset, z, y, coreset, weight in zip(subsets, logits, targets, coresets, weights):
            reference = facility_location(gradient_proxy(z, y), 32, y)
            assert torch.equal(coreset, subset[reference.indices])
            expected = reference.weights.float() * 32 / len(subset)  # cluster sizes scaled to average 1
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)


def test_more_classes_than_picks_picks_within_the_classes_drawn() -> None:
    # 40 classes, global batch 16: not every class can have a pick. Each subset's picks go to classes drawn in
    # proportion to their sizes, and are the greedy's within each of them (from the module's own proxies).
    callback = Recorder(random_subset_size=0.1)
    data = blobs(num_classes=40)
    trainer, _ = fit(callback, data=data, model=TinyClassifier(num_classes=40), batch_size=16, max_epochs=1)
    assert trainer.global_step == 8  # ceil(0.1 * 1200 / 16)
    assert callback.picks
    for _, subsets, logits, targets, coresets, weights in callback.picks:
        for subset, z, y, coreset, weight in zip(subsets, logits, targets, coresets, weights):
            assert len(y.unique()) > 16
            budgets = torch.bincount(data.targets[coreset], minlength=40)
            share = torch.bincount(y, minlength=40) * 16 / len(subset)
            assert bool((budgets >= share.floor()).all() and (budgets <= share.ceil()).all())
            reference = facility_location(gradient_proxy(z, y), 16, y, budgets=budgets)
            assert torch.equal(coreset, subset[reference.indices])
            # Every class here has a share below one pick (at most 15 of its members in 120): each pick stands for
            # r / m examples, so all weigh alike.
            assert int(torch.bincount(y).max()) < len(subset) / 16
            torch.testing.assert_close(weight, torch.ones(16), rtol=0, atol=1e-6)


def test_tau_zero_reselects_at_every_check() -> None:
    # tau = 0 and interval_mul close to 0 keep T1 = 1: a check after every step, epoch ends included.
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-6)
    trainer, _ = fit(callback, max_epochs=2)
    checks = callback.steps("check")
    assert checks == list(range(1, trainer.global_step + 1))
    # A failed check re-selects at once; on an epoch's last step the next epoch starts with the selection.
    # Either way the selection happens before the next step; the last step of training has none to feed.
    assert callback.steps("select") == [0, *checks[:-1]]


@pytest.mark.parametrize(
    ("tau", "interval_mul", "lr", "max_epochs"),
    [(0.0, 3.0, 0.05, 2), (0.1, 2.0, 0.005, 7)],
    ids=["every check fails", "checks pass at T1 = 1 and 3"],
)
def test_adaptive_interval_and_coresets_follow_the_formulas(
    tau: float, interval_mul: float, lr: float, max_epochs: int
) -> None:
    callback = Recorder(random_subset_size=0.1, tau=tau, interval_mul=interval_mul, coreset_mul=2)
    trainer, _ = fit(callback, model=seeded_classifier(lr=lr), max_epochs=max_epochs)
    first, *later = callback.adaptations
    assert first[:2] == (1, 2)  # T1 = 1, P = b at the first selection
    assert len(callback.plans[0]) == 2
    assert later
    peak = first[2]
    for interval, num_coresets, reference, current in later:
        peak = max(peak, current)
        assert reference == peak  # the sharpest curvature so far
        ratio = interval_mul * peak / current
        # A ratio within float32 rounding of an integer is that integer; any other is rounded up.
        expected = round(ratio) if abs(ratio - round(ratio)) <= 1e-5 * ratio else math.ceil(ratio)
        assert interval == max(1, expected)
        assert num_coresets == 2 * interval
    # Checks come every T1 steps after a selection, T1 the interval it set, until the next one or the end.
    selections = callback.steps("select")
    ends = [*selections[1:], trainer.global_step]
    intervals = [interval for interval, *_ in callback.adaptations]
    expected = [
        check
        for start, end, interval in zip(selections, ends, intervals)
        for check in range(start + interval, end + 1, interval)
    ]
    assert callback.steps("check") == expected
    assert max(intervals) > 1
    # Each selection plans the P = b T1 coresets of its own interval.
    assert [len(plan) for plan in callback.plans] == [p for _, p, *_ in callback.adaptations]


def test_the_interval_is_measured_from_the_sharpest_curvature_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    # A curvature that rises from 1 to 4, then falls to 2: T1 = ceil(h * 4 / 2) = 6 at h = 3, where the paper's
    # reference, the first selection's curvature, would give ceil(3 * 1 / 2) = 2.
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=3.0, coreset_mul=1)
    norms = [1.0, 4.0, 2.0]
    monkeypatch.setattr(
        crest_callback.QuadraticModel,
        "curvature_norm",
        lambda self: norms[min(callback._selections, len(norms) - 1)],
    )
    fit(callback, max_epochs=2)
    intervals = [interval for interval, *_ in callback.adaptations]
    assert intervals[:3] == [1, 3, 6]  # the first T1 is 1; then ceil(3 * 4 / 4) and ceil(3 * 4 / 2)
    assert set(intervals[2:]) == {6}


class AnchorRecorder(Recorder):
    """Also keeps, at every selection, the first subset, its losses, the check sample and the anchor loss."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.anchors: list[tuple[Tensor, Tensor, Tensor, float]] = []

    def _pick(self, subsets: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        coresets, weights, losses = super()._pick(subsets, *args)
        self._last_pick = (subsets[0].clone(), losses[: subsets.shape[1]].clone())
        return coresets, weights, losses

    def _select_coresets(self) -> None:
        super()._select_coresets()
        first, losses = self._last_pick
        anchor_loss = self._quadratic.anchor_loss
        assert anchor_loss is not None
        self.anchors.append((first, losses, self._check_indices.clone(), anchor_loss))


@pytest.mark.parametrize("check_size", [None, 7])
def test_check_sample_is_part_of_the_first_subset_measured_at_the_anchor(check_size: int | None) -> None:
    callback = AnchorRecorder(
        random_subset_size=0.1, tau=0.0, interval_mul=1e-6, check_size=check_size, check_sample="subset"
    )
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


@pytest.mark.parametrize("check_size", [None, 40])
def test_independent_check_sample_is_a_stratified_draw_measured_at_the_anchor(check_size: int | None) -> None:
    data = blobs()
    measured: list[
        tuple[Tensor, float, float, Tensor]
    ] = []  # check sample, L0, reference loss, first coreset

    class Anchors(Recorder):
        def _select_coresets(self) -> None:
            super()._select_coresets()
            module = self._module
            assert module is not None
            check = self._check_indices.clone()
            module.eval()
            with torch.no_grad():  # the parameters of the selection: no step has been taken since
                reference = float(
                    torch.nn.functional.cross_entropy(module(data.tensors[0][check]), data.tensors[1][check])
                )
            module.train()
            anchor_loss = self._quadratic.anchor_loss
            assert anchor_loss is not None
            measured.append((check, anchor_loss, reference, self._dm.plan.batches[0][0].clone()))

    fit(
        Anchors(random_subset_size=0.1, tau=0.0, interval_mul=1e-6, check_size=check_size),
        data=data,
        max_epochs=1,
    )
    assert len(measured) > 2
    shares = torch.bincount(data.targets, minlength=4).float() / len(data.targets)
    overlaps = []
    for check, anchor_loss, reference, first_coreset in measured:
        size = check_size or 120
        assert len(check.unique()) == len(check) == size
        # Class-stratified: each class has its share of the sample, rounded up or down.
        assert bool(((torch.bincount(data.targets[check], minlength=4) - size * shares).abs() < 1).all())
        # L0 is the plain eval-mode loss of exactly the examples the checks evaluate.
        assert anchor_loss == pytest.approx(reference, rel=1e-5)
        overlaps.append(len(set(check.tolist()) & set(first_coreset.tolist())))
    # Drawn apart from the subsets: the first coreset (32 examples) meets it only by chance (3.2 expected for
    # 120 of 1,200; all 32 when the sample is the first subset).
    assert sum(overlaps) / len(overlaps) < 8
    assert len({tuple(sorted(c.tolist())) for c, *_ in measured}) == len(measured)  # fresh at every selection


def test_check_sample_option_is_checked() -> None:
    with pytest.raises(ValueError, match="`check_sample` must be 'independent' or 'subset', got 'first'"):
        CrestCallback(check_sample="first")  # type: ignore[arg-type]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checks_start_with_the_selections_own_batches(num_workers: int) -> None:
    # Loader workers read batches ahead, so a selection's first batches can come from the plan before it.
    served_under: list[int] = []  # the selection each served batch comes from
    checked_under: list[tuple[int, int]] = []  # (selection of the batch just trained, current selection)

    class Tracking(CrestCallback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            plan, serve = self._dm.plan, self._dm.plan.next

            def next_batch(steps_left: int) -> tuple[Tensor, Tensor]:
                batch = serve(steps_left)
                served_under.append(self._selections)
                return batch

            plan.next = next_batch  # type: ignore[method-assign]

        def _check(self) -> bool:
            checked_under.append((served_under[self._trained - 1], self._selections))
            return super()._check()

    callback = Tracking(fraction=0.5, random_subset_size=0.1, tau=0.01)
    torch.manual_seed(0)
    dm = CrestDataModule(blobs(), batch_size=32, num_workers=num_workers)
    trainer = make_trainer([callback], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert len(served_under) >= trainer.global_step == 38
    assert callback._selections >= 5
    assert len(checked_under) >= 6
    assert all(batch == current for batch, current in checked_under)


def test_checks_use_the_normalisation_statistics_of_the_selection() -> None:
    # lr 0: the parameters never move, so the model predicts L0 exactly; the running statistics still move.
    class Normalised(TinyClassifier):
        def __init__(self) -> None:
            super().__init__(lr=0.0)
            self.net.insert(1, torch.nn.BatchNorm1d(32))

    rhos = []

    class Rhos(CrestCallback):
        def _check(self) -> bool:
            drifted = super()._check()
            rhos.append(self._rho)
            return drifted

    model = Normalised()
    before = model.net[1].running_mean.clone()
    fit(Rhos(random_subset_size=0.1), model=model, max_epochs=2)
    assert not torch.equal(model.net[1].running_mean, before)  # training moved them, and kept them
    assert len(rhos) >= 4
    assert rhos == [0.0] * len(rhos)


@pytest.mark.parametrize("selection", ["random", "crest"])
def test_loaders_reloaded_every_epoch_with_workers(selection: str) -> None:
    # Lightning then creates each epoch's iterator twice; the first one's workers read batches that are never
    # trained, and the sampler it builds starts at epoch 0.
    epochs: list[int] = []

    class Epochs(Recorder):
        def _begin_epoch(self, epoch: int) -> None:
            if max(epoch, self._epoch_floor) != self._started_epoch:
                epochs.append(epoch)
            super()._begin_epoch(epoch)

    callback = Epochs(random_subset_size=0.1, selection=selection, tau=0.01)
    torch.manual_seed(0)
    dm = CrestDataModule(blobs(), batch_size=32, num_workers=2)
    trainer = make_trainer([callback], max_epochs=3, reload_dataloaders_every_n_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert epochs == [0, 1, 2]
    assert trainer.global_step == 12
    if selection == "random":
        assert callback._selections == 3  # one plan per epoch
    assert callback._trained == dm.plan.served  # nothing left counted as read ahead


def test_check_size_larger_than_the_subset() -> None:
    with pytest.raises(ValueError, match="`check_size`=500 exceeds the random subset size r=120"):
        fit(CrestCallback(random_subset_size=0.1, check_size=500), max_epochs=1)


class Augmented(LabelledTensors):
    """Every read of an item adds fresh noise, like a random augmentation."""

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = super().__getitem__(index)
        return inputs + 0.5 * torch.randn_like(inputs), targets


@pytest.mark.parametrize("check_size", [None, 16])
def test_anchor_loss_and_checks_see_the_same_augmented_inputs(check_size: int | None) -> None:
    # With a zero learning rate delta stays 0, so the model predicts L0 exactly and rho measures only whether
    # L0 and the check losses come from the same inputs: they do, although every read of an item differs.
    data = blobs()
    callback = Recorder(random_subset_size=0.1, check_size=check_size, tau=1e9)
    fit(callback, data=Augmented(*data.tensors), model=seeded_classifier(lr=0.0), max_epochs=1)
    assert callback.steps("check")
    assert callback._rho == 0.0


def normalised(batch: Any, dataloader_idx: int) -> Any:
    """Takes 10 off the inputs after they reach the device, as Lightning suggests for transforms on the GPU."""
    inputs, *rest = batch
    return [inputs - 10.0, *rest]


class DeviceNormalised(TinyClassifier):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return normalised(batch, dataloader_idx)


class NormalisingDataModule(CrestDataModule):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return normalised(batch, dataloader_idx)


class InputsSeen(CrestCallback):
    """Keeps the mean of every input batch that CREST's own passes give the module."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.means: list[float] = []

    def compute_logits(self, pl_module: L.LightningModule, inputs: Any) -> Tensor:
        self.means.append(float(inputs.mean()))
        return super().compute_logits(pl_module, inputs)


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`")
@pytest.mark.parametrize("owner", ["module", "datamodule"])
def test_crest_passes_go_through_the_batch_transfer_hooks(owner: str) -> None:
    # The inputs are stored 10 above what the model trains on; the hook takes it off on the device. CREST's
    # proxies, checks and coreset gradients must score what training sees, not the stored inputs.
    data = blobs()
    shifted = LabelledTensors(data.tensors[0] + 10.0, data.tensors[1])
    callback = InputsSeen(random_subset_size=0.1, tau=0.0)
    model = DeviceNormalised() if owner == "module" else TinyClassifier()
    dm_class = CrestDataModule if owner == "module" else NormalisingDataModule
    torch.manual_seed(0)
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(model, datamodule=dm_class(shifted, batch_size=32))
    assert callback._selections > 1
    assert len(callback.means) > 10
    assert max(abs(mean) for mean in callback.means) < 2.0  # the stored inputs average 10


class DeviceAugmented(TinyClassifier):
    """Adds fresh noise to every training batch on the device: a random augmentation in the transfer hook."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.training:
            return batch
        inputs, *rest = batch
        return [inputs + 0.5 * torch.randn_like(inputs), *rest]


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`")
@pytest.mark.parametrize("check_size", [None, 16])
def test_checks_see_the_same_views_from_a_random_transfer_hook(check_size: int | None) -> None:
    # As with random augmentations in the data set: with a zero learning rate the model predicts L0 exactly, so
    # rho is 0 only if L0 and every check see the same draw of the hook's noise.
    callback = Recorder(random_subset_size=0.1, check_size=check_size, tau=1e9)
    fit(callback, model=DeviceAugmented(lr=0.0), max_epochs=1)
    assert callback.steps("check")
    assert callback._rho == 0.0


def test_transfer_hooks_that_change_the_batch_structure_are_refused() -> None:
    class DictBatches(TinyClassifier):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            inputs, targets, weights = batch
            return {"inputs": inputs, "targets": targets, "weights": weights}

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return super().training_step(list(batch.values()), batch_idx)

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(TypeError, match=r"return an \(inputs, targets, weights\) batch .* got dict"):
        trainer.fit(DictBatches(), datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 0


def test_skipped_steps_do_not_count_as_ignoring_the_weights() -> None:
    class SkipsFirst(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    callback = CrestCallback(random_subset_size=0.1)
    trainer, _ = fit(callback, model=SkipsFirst(), max_epochs=1)
    assert trainer.global_step == math.ceil(0.1 * 1200 / 32)
    assert callback._weights_checked  # on the first step that had a loss


def test_a_step_may_change_the_weights_in_place() -> None:
    class Normalising(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets, weights = batch
            weights /= weights.mean()  # already 1: the loss is unchanged
            return super().training_step((inputs, targets, weights), batch_idx)

    torch.manual_seed(0)
    reference = TinyClassifier()
    normalising = Normalising()
    normalising.load_state_dict(reference.state_dict())
    for model in (reference, normalising):
        trainer, _ = fit(CrestCallback(random_subset_size=0.1), model=model, max_epochs=1)
        assert trainer.global_step == 4
    assert all(
        torch.allclose(p, q) for p, q in zip(reference.parameters(), normalising.parameters(), strict=True)
    )


def test_hessian_params_that_select_nothing_are_refused() -> None:
    model = TinyClassifier()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="`hessian_params`='last_layer' selects no trainable parameters"):
        fit(CrestCallback(hessian_params="last_layer"), model=model, max_epochs=1)


def test_a_model_built_in_configure_model_is_modelled() -> None:
    class Deferred(TinyClassifier):  # its layers appear after the callbacks' setup
        def __init__(self) -> None:
            super().__init__()
            del self.net

        def configure_model(self) -> None:
            if not hasattr(self, "net"):
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
                )

    for hessian_params in ("all", "last_layer"):
        callback = CrestCallback(random_subset_size=0.1, hessian_params=hessian_params)  # type: ignore[arg-type]
        trainer, _ = fit(callback, model=Deferred(), max_epochs=1)
        assert trainer.global_step == 4
        assert callback.statistics["selections"] >= 1
        assert callback._modelled == (
            ("net.2.weight", "net.2.bias")
            if hessian_params == "last_layer"
            else ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
        )


def test_hessian_params_the_loss_does_not_use_are_refused() -> None:
    class Auxiliary(TinyClassifier):  # a head registered after the classifier, unused by the loss
        def __init__(self) -> None:
            super().__init__()
            self.aux = torch.nn.Linear(32, 2)

    message = "`hessian_params`='last_layer' chose parameters that the loss does not depend on (66 values of Auxiliary)"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(CrestCallback(hessian_params="last_layer"), model=Auxiliary(), max_epochs=1)
    fit(CrestCallback(hessian_params="all"), model=Auxiliary(), max_epochs=1)  # the other parameters carry it


class ActivationLast(TinyClassifier):
    """A PReLU used before the head but registered after it: the last module with parameters of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.PReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net[2](self.act(self.net[1](self.net[0](inputs))))  # type: ignore[no-any-return]


class ConvHead(TinyClassifier):
    """The output layer a 1x1 convolution, its (B, C, 1, 1) output flattened into the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(32, 4, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.net[1](self.net[0](inputs))
        return self.head(hidden[:, :, None, None]).flatten(1)  # type: ignore[no-any-return]


def test_last_layer_that_does_not_give_the_logits_is_warned_once_per_fit() -> None:
    with pytest.warns(
        UserWarning,
        match=r"models act\.weight, the parameters of the last module registered with any "
        r"\(PReLU\), but that module's output is not the logits",
    ) as caught:
        fit(
            CrestCallback(random_subset_size=0.1, hessian_params="last_layer"),
            model=ActivationLast(),
            max_epochs=2,
        )
    assert sum("output is not the logits" in str(w.message) for w in caught) == 1
    # Once per fit: fitting the same module again with the same callback checks it again.
    callback, model = CrestCallback(random_subset_size=0.1, hessian_params="last_layer"), ActivationLast()
    trainer = make_trainer([callback], max_epochs=1)
    dm = CrestDataModule(blobs(), batch_size=32)
    for epochs in (1, 2):
        trainer.fit_loop.max_epochs = epochs
        with pytest.warns(UserWarning, match="output is not the logits") as caught:
            trainer.fit(model, datamodule=dm)
        assert sum("output is not the logits" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*output is not the logits")
        fit(CrestCallback(random_subset_size=0.1, hessian_params="last_layer"), max_epochs=1)
        fit(
            CrestCallback(random_subset_size=0.1, hessian_params="last_layer"), model=ConvHead(), max_epochs=1
        )
        fit(CrestCallback(random_subset_size=0.1, hessian_params="all"), model=ActivationLast(), max_epochs=1)


def test_true_half_precision_reaches_the_selections() -> None:
    callback = CrestCallback(random_subset_size=0.1, tau=0.02)
    _, model = fit(callback, precision="bf16-true", max_epochs=2)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert callback._selections > 1
    assert math.isfinite(callback._rho)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_proxy_dtype_scores_subsets_under_autocast_and_nothing_else(dtype: torch.dtype | None) -> None:
    # Every scoring pass is compared with the module's own logits at that moment, in float32 and under autocast.
    # Per scoring pass: its logits, the float32 and autocast references, and which rows are the check sample.
    scored: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    graph_passes: list[bool] = []  # autocast state of every forward pass with gradients (training, probes)

    class Watch(CrestCallback):
        def _forward(
            self, indices: Tensor, check_batches: list[Any] | None = None, **kwargs: Any
        ) -> tuple[Tensor, Tensor, Tensor | None]:
            logits, losses, embeddings = super()._forward(indices, check_batches, **kwargs)
            module = self._module
            assert module is not None
            inputs = self._dm.train_dataset[indices][0]
            with eval_mode(module), torch.no_grad():
                exact = module(inputs)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16):
                    low = module(inputs).float()
            checked = torch.arange(len(indices)) < (len(self._check_indices) if check_batches else 0)
            scored.append((logits, exact, low, checked))
            return logits, losses, embeddings

    class Tracked(TinyClassifier):
        def forward(self, inputs: Tensor) -> Tensor:
            if torch.is_grad_enabled():
                graph_passes.append(torch.is_autocast_enabled("cpu"))
            return super().forward(inputs)

    callback = Watch(random_subset_size=0.1, check_size=40, tau=0.02, proxy_dtype=dtype)
    torch.manual_seed(0)  # the initial weights, whatever ran before
    fit(callback, model=Tracked(), max_epochs=2)
    assert callback._selections > 1
    assert graph_passes
    assert not any(graph_passes)
    assert any(bool(checked.any()) for *_, checked in scored)
    assert any(bool((~checked).any()) for *_, checked in scored)
    for logits, exact, low, checked in scored:
        # The check sample is always measured in the trainer's precision, as at every check.
        torch.testing.assert_close(logits[checked], exact[checked])
        scoring = ~checked
        if not scoring.any():  # the check sample's own pass at a selection
            continue
        if dtype is None:
            torch.testing.assert_close(logits[scoring], exact[scoring])
        else:
            # Half-precision logits: representable in the dtype, and those of the autocast pass.
            assert torch.equal(logits[scoring], logits[scoring].to(dtype).float())
            torch.testing.assert_close(logits[scoring], low[scoring], rtol=2e-2, atol=2e-2)
            assert not torch.equal(logits[scoring], exact[scoring])


def test_proxy_dtype_without_autocast_on_the_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    message = "`proxy_dtype`=torch.bfloat16 needs autocast, which torch does not offer on 'cpu' devices"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(CrestCallback(proxy_dtype=torch.bfloat16), max_epochs=1)


def test_proxy_dtype_under_double_precision_is_refused() -> None:
    message = "`proxy_dtype`=torch.bfloat16 has no effect under precision='64-true'"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(CrestCallback(proxy_dtype=torch.bfloat16), model=TinyClassifier().double(), precision="64-true")


def test_embedding_proxy_appends_a_sketch_of_the_last_layers_weight_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sketched: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    selected: list[Tensor] = []
    sketch, select = crest_callback.last_layer_sketch, crest_callback.facility_location

    def recorded_sketch(
        logits: Tensor, targets: Tensor, embeddings: Tensor, dim: int, generator: Any
    ) -> Tensor:
        assert dim == 16
        proxies = sketch(logits, targets, embeddings, dim, generator)
        sketched.append((logits, targets, embeddings, proxies))
        return proxies

    def recorded_selection(proxies: Tensor, *args: Any, **kwargs: Any) -> Any:
        selected.append(proxies)
        return select(proxies, *args, **kwargs)

    monkeypatch.setattr(crest_callback, "last_layer_sketch", recorded_sketch)
    monkeypatch.setattr(crest_callback, "facility_location", recorded_selection)
    torch.manual_seed(0)
    model = TinyClassifier()
    initial = copy.deepcopy(model)
    callback = RecordedDraws(random_subset_size=0.1, embedding_proxy=16)
    data = blobs()
    fit(callback, data=data, model=model, max_epochs=2)
    # Every selection's proxies are the sketch (the check sample's pass computes none), 4 classes + 4 x 4 values.
    assert len(sketched) == len(selected) > 1
    for (_, _, _, proxies), given in zip(sketched, selected, strict=True):
        assert given.shape[-1] == 4 + 16
        assert torch.equal(given.reshape(-1, 20), proxies)
    # The first, before any step: the embeddings are the inputs of the last nn.Linear, in eval mode, of the
    # examples of the first random subset, whose logits and targets come with them.
    logits, targets, embeddings, _ = sketched[0]
    subset = callback.draws[0][1].flatten()
    inputs = data.tensors[0][subset]
    with torch.no_grad():
        torch.testing.assert_close(embeddings, initial.net[:2](inputs))
        torch.testing.assert_close(logits, initial(inputs))
    assert torch.equal(targets, data.tensors[1][subset])


class WithoutLinear(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Bilinear(16, 16, 4))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net[0](inputs, inputs)  # type: ignore[no-any-return]


class LowRankUpdate(TinyClassifier):
    """A low-rank branch registered after the output layer and added to its output: the logits are not its output."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(32, 2), nn.Linear(2, 4)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.net[1](self.net[0](inputs))
        return self.net[2](hidden) + self.up(self.down(hidden))  # type: ignore[no-any-return]


class KeywordHead(TinyClassifier):
    def forward(self, inputs: Tensor) -> Tensor:
        return self.net[2](input=self.net[1](self.net[0](inputs)))  # type: ignore[no-any-return]


def test_embedding_proxy_reads_a_head_called_with_a_keyword() -> None:
    callback = CrestCallback(random_subset_size=0.1, embedding_proxy=8)
    trainer, _ = fit(callback, model=KeywordHead(), max_epochs=1)
    assert trainer.global_step == 4


class UnusedLastLinear(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.auxiliary = nn.Linear(32, 4)  # registered after the output layer, never called


@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        (WithoutLinear, "has none. Pass embedding_proxy=0"),
        (UnusedLastLinear, r"its last one \(Linear\(in_features=32, out_features=4.*\) had no call"),
        (
            LowRankUpdate,
            r"its last one \(Linear\(in_features=2, out_features=4.*\) had \(32, 2\) -> \(32, 4\)\.",
        ),
    ],
)
def test_embedding_proxy_without_a_last_linear_giving_the_logits_is_refused_before_training(
    model_class: type[TinyClassifier], match: str
) -> None:
    torch.manual_seed(0)
    model = model_class()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="`embedding_proxy`=8 .*" + match):
        fit(CrestCallback(random_subset_size=0.1, embedding_proxy=8), model=model)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("value", [-1, 2.0, True, 65537, 10**12])
def test_embedding_proxy_must_be_an_int_up_to_65536(value: Any) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`embedding_proxy` must be an int in [0, 65536] (0: the logits' gradient only; each example of a random "
            f"subset gets about that many values more), got {value!r}."
        ),
    ):
        CrestCallback(embedding_proxy=value)
    assert CrestCallback(embedding_proxy=65536).embedding_proxy == 65536


def test_a_forward_without_gradients_is_refused_at_the_first_selection(data: Any) -> None:
    class InferenceForward(TinyClassifier):
        @torch.no_grad()
        def forward(self, inputs: Tensor) -> Tensor:
            return self.net(inputs)  # type: ignore[no-any-return]

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets, weights = batch
            return weighted_cross_entropy(self.net(inputs), targets, weights)

    trainer = make_trainer([CrestCallback(random_subset_size=0.2)], max_epochs=1)
    with pytest.raises(ValueError, match=r"computes with `InferenceForward\.forward` .* carry no gradient"):
        trainer.fit(InferenceForward(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 0


class DetachedLoss(CrestCallback):
    def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return super().per_example_loss(logits.detach(), targets)


def test_a_per_example_loss_without_gradients_is_refused_at_the_first_selection(data: Any) -> None:
    trainer = make_trainer([DetachedLoss(random_subset_size=0.2)], max_epochs=1)
    with pytest.raises(ValueError, match=r"`per_example_loss` returned losses that carry no gradient"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 0


def test_labels_that_are_ids_rather_than_indices_are_refused_before_any_selection() -> None:
    # Counting 10**9 classes would allocate gigabytes per random subset.
    n = 400
    ids = LabelledTensors(torch.randn(n, 16), torch.tensor([10**9, 7] * (n // 2)))
    trainer = make_trainer([CrestCallback(random_subset_size=0.2)], max_epochs=1)
    with pytest.raises(
        ValueError,
        match=r"training labels go up to 1000000000, so CREST would count 1000000001 classes \(2 present\) in "
        r"every random subset: labels must be class indices from 0 to C - 1, one per logit, with C at most 16777216",
    ):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(ids, batch_size=32))


def test_many_classes_with_few_examples_each_train() -> None:
    # A vocabulary of 70,000 classes over 300 examples (most classes absent), one logit each: real class indices.
    n = 300
    labels = torch.randint(0, 70_000, (n,), generator=torch.Generator().manual_seed(0))
    vocabulary = LabelledTensors(torch.randn(n, 16), labels)
    trainer = make_trainer([CrestCallback(random_subset_size=96)], max_epochs=1)
    trainer.fit(TinyClassifier(num_classes=70_000), datamodule=CrestDataModule(vocabulary, batch_size=32))
    assert trainer.global_step == math.ceil(0.1 * n / 32)
    # Labels {3, 7} are 8 classes, 6 of them absent: trained with 8 logits.
    sparse = LabelledTensors(torch.randn(n, 16), torch.tensor([3, 7] * (n // 2)))
    trainer = make_trainer([CrestCallback(random_subset_size=96)], max_epochs=1)
    trainer.fit(TinyClassifier(num_classes=8), datamodule=CrestDataModule(sparse, batch_size=32))
    assert trainer.global_step == math.ceil(0.1 * n / 32)


class NegativeLoss(CrestCallback):
    def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return super().per_example_loss(logits, targets) - 1.0


class NaNLoss(CrestCallback):
    def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return (
            super().per_example_loss(logits, targets).log().sub(1.0).sqrt()
        )  # NaN where the loss is under e


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (NegativeLoss, r"`per_example_loss` returned a negative loss \(-0\.\d+\): CREST's check is relative"),
        (NaNLoss, r"`per_example_loss` returned non-finite losses for finite logits: the loss function"),
    ],
)
def test_a_per_example_loss_that_is_negative_or_not_finite_is_refused(
    data: Any, kind: type[CrestCallback], match: str
) -> None:
    trainer = make_trainer([kind(random_subset_size=0.2)], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 0


class Settings(L.Callback):
    """Changes the CREST settings, or the data module's, on the instances before the fit reaches CREST's setup."""

    def __init__(self, target: str, name: str, value: Any) -> None:
        self.target, self.name, self.value = target, name, value

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        crest = next(c for c in trainer.callbacks if isinstance(c, CrestCallback))  # type: ignore[attr-defined]
        setattr(crest if self.target == "callback" else trainer.datamodule, self.name, self.value)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("target", "name", "value", "match"),
    [
        (
            "callback",
            "fraction",
            1.5,
            r"`fraction` must lie in \(0\.0, 1\.0\], got 1\.5; for 1\.5% pass 0\.015",
        ),
        ("callback", "tau", -1.0, r"`tau` must lie in \[0\.0, inf\], got -1\.0"),
        ("callback", "embedding_proxy", 10**12, r"`embedding_proxy` must be an int in \[0, 65536\]"),
        ("callback", "hessian_params", "head", r"`hessian_params` must be 'all' or 'last_layer', got 'head'"),
        ("data module", "batch_size", 0, r"`batch_size` must be a positive int, got 0"),
        ("data module", "batch_size", None, r"`batch_size` must be a positive int, got None"),
        ("data module", "prefetch_factor", 4, r"`prefetch_factor`=4 applies to loader workers"),
    ],
)
def test_settings_changed_on_the_instances_are_checked_when_a_fit_starts(
    data: Any, target: str, name: str, value: Any, match: str
) -> None:
    # Changed after construction (by hand, or by a tuner run without CREST), before any step trains.
    callback = CrestCallback(random_subset_size=0.2)
    trainer = make_trainer([Settings(target, name, value), callback], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 0


def test_numpy_settings_set_on_the_instances_become_python_numbers_when_a_fit_starts(data: Any) -> None:
    callback = CrestCallback(random_subset_size=0.2)
    callback.fraction = np.float64(0.2)  # type: ignore[assignment]
    callback.seed = np.int64(3)  # type: ignore[assignment]
    dm = CrestDataModule(data, batch_size=32)
    dm.seed = np.int64(5)  # type: ignore[assignment]
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == math.ceil(0.2 * len(data) / 32)
    assert type(callback.fraction) is float
    assert type(callback.seed) is int
    assert type(dm.seed) is int


@pytest.mark.parametrize(("limit", "steps"), [(3, 3), (4, 4), (10, 4), (0.5, 2), (1.0, 4), (0, 0), (0.0, 0)])
def test_limit_train_batches_warns_only_when_it_cuts_crest_epochs(limit: float, steps: int) -> None:
    # CREST's epochs here have ceil(0.1 * 1200 / 32) = 4 steps.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(CrestCallback(random_subset_size=0.1), max_epochs=1, limit_train_batches=limit)
    assert trainer.global_step == steps
    assert any("cuts CREST's epochs" in str(w.message) for w in caught) == (0 < steps < 4)


def test_max_steps_without_max_epochs_warns() -> None:
    with pytest.warns(
        UserWarning, match=r"`max_steps`=10 without `max_epochs` trains that many coreset steps"
    ):
        trainer, _ = fit(CrestCallback(random_subset_size=0.1), max_epochs=None, max_steps=10)
    assert trainer.global_step == 10  # over three short epochs of 4 steps
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*max_steps.*")
        trainer, _ = fit(CrestCallback(random_subset_size=0.1), max_epochs=2, max_steps=10)
    assert trainer.global_step == 8


def test_a_callback_reused_for_another_model_starts_afresh() -> None:
    def second_fit(callback: CrestCallback) -> TinyClassifier:
        model = seeded_classifier(num_classes=3)
        fit(callback, data=blobs(num_classes=3), model=model, max_epochs=2)
        return model

    reused = CrestCallback(random_subset_size=0.1, tau=0.02)
    fit(reused, max_epochs=1)  # four classes: a quadratic model of another shape, and a pool of its own
    fresh = CrestCallback(random_subset_size=0.1, tau=0.02)
    model, reference = second_fit(reused), second_fit(fresh)
    assert reused._selections == fresh._selections > 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


def test_random_baseline_uses_weight_one_and_no_model() -> None:
    callback = Recorder(selection="random")
    trainer, _ = fit(callback, max_epochs=2)
    assert all(bool((w == 1).all()) for _, w in callback.batches)
    assert not callback.events  # no coreset selection, no checks
    assert trainer.global_step == 2 * math.ceil(0.1 * 1200 / 32)
    # Fresh batches: no example repeats within an epoch.
    steps = trainer.num_training_batches
    epoch = torch.cat([x for x, _ in callback.batches[:steps]])
    assert len(torch.unique(epoch, dim=0)) == len(epoch)


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_random_batches_and_subsets_are_class_stratified(selection: str) -> None:
    data = blobs()
    callback = RecordedDraws(random_subset_size=0.1, selection=selection)
    fit(callback, data=data, max_epochs=2)
    draws = callback.draws  # the pool and the subsets (or batches) drawn from it
    assert draws
    for pool, drawn in draws:
        assert bool(pool[drawn].all())
        share = drawn.shape[1] * torch.bincount(data.targets[pool], minlength=4) / int(pool.sum())
        for members in drawn:
            assert len(members.unique()) == len(members)
            counts = torch.bincount(data.targets[members], minlength=4)
            assert bool((counts >= share.floor()).all() and (counts <= share.ceil()).all())


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_logged_statistics_and_timings(selection: str) -> None:
    callback = CrestCallback(random_subset_size=0.1, drop_interval=1, selection=selection)
    trainer, _ = fit(callback, max_epochs=2)
    logged = {
        name.removeprefix("crest/"): float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("crest/")
    }
    state = {
        "selections": callback._selections,
        "pool_size": int(callback.pool.sum()),
        "selection_time": callback._selection_time,
    }
    if selection == "crest":  # random batches have no quadratic model: no rho, T1 or P
        state |= {
            "rho": callback._rho,
            "check_interval": callback._interval,
            "num_coresets": callback._num_coresets,
        }
        assert math.isfinite(callback._rho)
    else:
        assert callback._selections == 2  # one per epoch
    assert logged.keys() == {*state, "overhead"}
    assert {name: logged[name] for name in state} == pytest.approx(state, rel=1e-6)
    statistics = callback.statistics
    assert statistics.keys() == logged.keys()
    assert {name: statistics[name] for name in state} == pytest.approx(state, rel=1e-6)
    timings = callback.timings
    assert timings.keys() == {"proxies", "greedy", "hessian", "checks", "exclusion"}
    assert min(timings.values()) >= 0
    # The phases that ran took time, the others none (the exclusion ran at the start of epoch 1).
    ran = set(timings) if selection == "crest" else set()
    assert {name for name, seconds in timings.items() if seconds > 0} == ran
    # Parts of CREST's own time, itself a part of the fit's.
    assert sum(timings.values()) <= callback._crest_time
    assert 0 < callback._selection_time <= callback._crest_time
    assert 0 < logged["overhead"] < 1
    # A selection's time includes its passes, greedy picks and quadratic model, also those of coresets picked
    # when first reached.
    picking = timings["proxies"] + timings["greedy"] + timings["hessian"]
    assert picking <= callback._selection_time
    # After the fit the share stays that of the fit's time, however long after it is read.
    after = callback.statistics["overhead"]
    assert callback._fit_end is not None
    assert after == pytest.approx(callback.own_time / (callback._fit_end - callback._fit_start))
    time.sleep(0.05)
    assert callback.statistics["overhead"] == after
    assert after == pytest.approx(logged["overhead"], rel=0.5)


def test_a_check_that_fails_on_an_epochs_last_step_keeps_its_coresets_until_the_next_selection() -> None:
    # tau = 0: every check fails. On an epoch's last step the new selection waits for the next epoch; until then,
    # and after the last epoch, `coresets` still shows the selection that was trained.
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-9)  # T1 = 1 throughout
    fit(callback, max_epochs=2)
    steps = len(callback.batches) // 2
    # A selection at the start (step 0), after every step but an epoch's last, and at the second epoch's start.
    assert callback.steps("select") == list(range(2 * steps))
    assert callback.steps("check") == list(range(1, 2 * steps + 1))
    last = callback.plans[-1]
    assert callback.coresets
    assert all(torch.equal(i, j) for (i, _), (j, _) in zip(callback.coresets, last))
    assert torch.equal(callback.coresets[0][1], last[0][1])


class ExclusionRecorder(CrestCallback):
    """Keeps the losses recorded in each window, the pool around each drop and every random draw."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window: list[tuple[Tensor, Tensor]] = []
        self.drops: list[tuple[int, Tensor, Tensor, list[tuple[Tensor, Tensor]]]] = []  # epoch, before, after
        self.draws: list[tuple[int, Tensor]] = []  # (drops so far, subsets)

    def _record_losses(self, indices: Tensor, losses: Tensor) -> None:
        super()._record_losses(indices, losses)
        self.window.append((indices.clone(), losses.clone()))

    def _drop_learned_examples(self) -> int:
        before = self.pool
        dropped = super()._drop_learned_examples()
        assert self._trainer is not None
        self.drops.append((self._trainer.current_epoch, before, self.pool, self.window))
        self.window = []
        return dropped

    def _draw(self, count: int, size: int) -> Tensor:
        subsets = super()._draw(count, size)
        self.draws.append((len(self.drops), subsets.clone()))
        return subsets


class Smoothed(Recorder):
    """Label-smoothed cross-entropy as the per-example loss: it never falls under the smoothed targets' entropy."""

    def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=0.1)


def test_a_loss_with_a_floor_above_the_threshold_warns_before_the_first_step() -> None:
    # Label-smoothed cross-entropy never falls under the entropy of the smoothed targets (0.35 for 0.1 over 4
    # classes): with drop_threshold=0.1 nothing could ever be excluded, which the first selection says.

    class Stopped(Exception):
        pass

    class StopAtTheFirstStep(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            raise Stopped

    floor = "stays above `drop_threshold`"
    trainer = make_trainer([Smoothed(random_subset_size=0.2), StopAtTheFirstStep()], max_epochs=1)
    dm = CrestDataModule(blobs(), batch_size=32)
    with (
        pytest.warns(
            UserWarning,
            match=r"stays above `drop_threshold`=0\.1 even on confident correct predictions "
            r"\(its lowest value on them was about 0\.349\), so no example can be excluded as learned\.",
        ),
        pytest.raises(Stopped),
    ):
        trainer.fit(TinyClassifier(), datamodule=dm)
    # A threshold above the floor, the plain loss, or no exclusion: no warning.
    for quiet in (
        Smoothed(random_subset_size=0.2, drop_threshold=0.4),
        CrestCallback(random_subset_size=0.2),
        Smoothed(random_subset_size=0.2, drop_learned=False),
    ):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", ".*" + re.escape(floor))
            fit(quiet, max_epochs=1)


def test_the_loss_floor_is_probed_again_in_each_fit() -> None:
    # A threshold raised above the floor keeps the first fit quiet; lowered under it before the next fit, it warns.
    callback = Smoothed(random_subset_size=0.2, drop_threshold=0.4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*stays above `drop_threshold`")
        fit(callback, max_epochs=1)
    callback.drop_threshold = 0.1
    with pytest.warns(UserWarning, match=r"stays above `drop_threshold`=0\.1"):
        fit(callback, max_epochs=1)


def test_the_loss_floor_probe_changes_nothing_in_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:

    runs = []
    for probe in (True, False):
        if not probe:
            monkeypatch.setattr(CrestCallback, "_warn_on_a_loss_floor", lambda self, logits, targets: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, model = fit(
                callback := Smoothed(random_subset_size=0.2), max_epochs=2, model=seeded_classifier()
            )
        runs.append((callback, [p.detach().clone() for p in model.parameters()]))
    (probed, probed_params), (plain, plain_params) = runs
    assert probed.events == plain.events
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(probed.batches, plain.batches)
    )
    assert all(torch.equal(a, b) for a, b in zip(probed_params, plain_params))


@pytest.mark.parametrize(
    ("min_pool_fraction", "min_class_fraction"), [(0.9, 0.2), (0.5, 0.95)], ids=["pool floor", "class floors"]
)
def test_exclusion_drops_learned_examples_down_to_the_floors(
    min_pool_fraction: float, min_class_fraction: float
) -> None:
    data = blobs(n=1200, noise=0.3)  # separable: most examples are learned quickly
    callback = ExclusionRecorder(
        random_subset_size=0.2,
        drop_interval=2,
        min_pool_fraction=min_pool_fraction,
        min_class_fraction=min_class_fraction,
    )
    trainer, _ = fit(callback, data=data, max_epochs=5, model=seeded_classifier(lr=0.2))
    assert [epoch for epoch, *_ in callback.drops] == [2, 4]  # every drop_interval epochs, none at the start
    for _, before, after, window in callback.drops:
        recorded, high = torch.zeros(1200, dtype=torch.bool), torch.zeros(1200, dtype=torch.bool)
        for indices, losses in window:
            recorded[indices] = True
            high[indices[losses > 0.1]] = True
        assert not bool((after & ~before).any())
        # Every example dropped had losses recorded in the window, all of them at most drop_threshold.
        assert bool((recorded & ~high)[before & ~after].all())
    pool = callback.pool
    class_floors = [math.ceil(min_class_fraction * int(size)) for size in torch.bincount(data.targets)]
    kept = torch.bincount(data.targets[pool], minlength=4).tolist()
    assert all(k >= floor for k, floor in zip(kept, class_floors))
    # Far more examples were learned than the floors let go: the binding floor is reached exactly.
    assert int(pool.sum()) == max(math.ceil(min_pool_fraction * 1200), sum(class_floors))
    assert trainer.callback_metrics["crest/pool_size"] == int(pool.sum())
    # Random subsets (and so their coresets) drawn after a drop come from the pool it left.
    pools = [torch.ones(1200, dtype=torch.bool), *(after for _, _, after, _ in callback.drops)]
    assert {drops for drops, _ in callback.draws} == {0, 1, 2}
    for drops, subsets in callback.draws:
        assert bool(pools[drops][subsets].all())


def test_selection_time_counts_the_coresets_picked_when_first_reached() -> None:
    spent = {"select": 0.0, "resolve": 0.0}

    class Timed(CrestCallback):
        def _select(self, steps_left: int) -> None:
            start = time.perf_counter()
            super()._select(steps_left)
            spent["select"] += time.perf_counter() - start

        def _resolve(self, subset: Tensor) -> tuple[Tensor, Tensor]:
            start = time.perf_counter()
            picked = super()._resolve(subset)
            spent["resolve"] += time.perf_counter() - start
            return picked

    callback = Timed(random_subset_size=0.1, tau=1e9)
    fit(callback, max_epochs=2)
    assert spent["resolve"] > 0.2 * spent["select"]  # four of each selection's five coresets are picked later
    total = spent["select"] + spent["resolve"]
    assert 0.9 * total <= callback._selection_time <= total


def test_the_seed_sets_crests_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    # The draws of subsets, and the seeds the check sample's views are read under (its items, and the transfer
    # hooks through `item_seed`): the same seed repeats them, another gives others.
    fetch = CrestDataModule.fetch
    view_seeds: list[int] = []

    def recorded_fetch(self: CrestDataModule, indices: list[int], seed: int | None = None) -> Any:
        if seed is not None:
            view_seeds.append(seed)
        return fetch(self, indices, seed)

    monkeypatch.setattr(CrestDataModule, "fetch", recorded_fetch)
    firsts, seeds = [], []
    for seed in (0, 1, 0):
        callback = RecordedDraws(random_subset_size=0.1, seed=seed)
        view_seeds.clear()
        fit(callback, max_epochs=1)
        firsts.append(callback.draws[0][1])
        seeds.append(list(view_seeds))
    assert torch.equal(firsts[0], firsts[2])
    assert not torch.equal(firsts[0], firsts[1])
    assert seeds[0] == seeds[2]
    assert len(seeds[0]) == len(seeds[1]) > 1
    assert not set(seeds[0]) & set(seeds[1])


def test_the_default_seed_follows_lightnings_global_seed() -> None:
    def first_draw(seed: int | None = None, global_seed: int | None = None) -> Tensor:
        callback = RecordedDraws(random_subset_size=0.1, seed=seed)
        if global_seed is not None:  # after the callback is made: the seed is read when the fit starts
            L.seed_everything(global_seed, verbose=False)
        fit(callback, max_epochs=1)
        return callback.draws[0][1]

    unseeded = first_draw()
    assert torch.equal(unseeded, first_draw(seed=0))  # Lightning's default global seed is 0
    one, two = first_draw(global_seed=1), first_draw(global_seed=2)
    assert not torch.equal(one, two)
    assert torch.equal(one, first_draw(global_seed=1))
    assert torch.equal(one, first_draw(seed=1, global_seed=2))  # an explicit seed wins


@pytest.mark.parametrize("drop_learned", [True, False])
def test_drop_learned_switch(drop_learned: bool) -> None:
    callback = CrestCallback(random_subset_size=0.2, drop_interval=1, drop_learned=drop_learned)
    fit(callback, data=blobs(n=1200, noise=0.3), max_epochs=3, model=seeded_classifier(lr=0.2))
    assert bool(callback.pool.all()) is not drop_learned
    assert (callback.timings["exclusion"] > 0) is drop_learned


def test_no_example_dropped_as_learned_is_trained_after_its_exclusion() -> None:
    # Checks that always pass keep a selection's coresets in turn across epochs; those picked, and the random subsets
    # still to be picked from, were drawn before an exclusion. The exclusion selects anew from the pool.
    class Trained(ExclusionRecorder):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.trained: list[tuple[int, Tensor]] = []  # (epoch, inputs)

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
        ) -> None:
            self.trained.append((trainer.current_epoch, batch[0].clone()))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, i)

    data = blobs(n=1200, noise=0.3)
    callback = Trained(random_subset_size=0.2, drop_interval=1, tau=1e9)
    fit(callback, data=data, max_epochs=3, model=seeded_classifier(lr=0.2))
    pools = {epoch: after for epoch, before, after, _ in callback.drops}
    assert [int((~pool).sum()) > 0 for pool in pools.values()] == [True, True]  # drops at epochs 1 and 2
    rows = data.tensors[0]
    for epoch, inputs in callback.trained:
        if epoch in pools:
            indices = (inputs[:, None, :] == rows[None]).all(-1).float().argmax(1)
            assert bool(pools[epoch][indices].all()), epoch


def test_a_fresh_trainer_goes_on_with_the_exclusion_window_of_the_last_fit() -> None:
    # Windows are drop_interval epochs of CREST's, across fits: the first fit's epoch 2 opens one that the second
    # fit's epoch 0 closes, although the second Trainer counts its epochs from 0 again.
    callback = ExclusionRecorder(random_subset_size=0.2, drop_interval=2)
    data, model = blobs(n=1200, noise=0.3), seeded_classifier(lr=0.2)
    drops = []
    for fit_number in range(2):
        fit(callback, data=data, max_epochs=3, model=model)
        drops += [(fit_number, epoch) for epoch, *_ in callback.drops]
        callback.drops.clear()
        assert callback.timings["exclusion"] > 0  # timed afresh in every fit
    assert drops == [(0, 2), (1, 1)]


class SelectionCount(CrestCallback):
    """Keeps the number of earlier selections at each selection."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counts: list[int] = []

    def _select_coresets(self) -> None:
        self.counts.append(self._selections)
        super()._select_coresets()


def test_fitting_again_on_another_training_set_starts_afresh() -> None:
    callback = SelectionCount(random_subset_size=0.2, drop_interval=1)
    model = seeded_classifier(lr=0.2)
    fit(callback, data=blobs(n=1200, noise=0.3), max_epochs=3, model=model)
    assert not bool(callback.pool.all())
    # The same size, other examples: the first set's exclusions and quadratic model say nothing about them.
    callback.counts.clear()
    fit(callback, data=blobs(n=1200, noise=0.3, seed=1), max_epochs=1, model=model)
    assert bool(callback.pool.all())
    assert callback.counts[0] == 0
    # The same set again goes on where it stopped.
    fit(callback, data=blobs(n=1200, noise=0.3, seed=1), max_epochs=3, model=model)
    kept, selections = callback.pool, callback._selections
    assert not bool(kept.all())
    callback.counts.clear()
    fit(callback, data=blobs(n=1200, noise=0.3, seed=1), max_epochs=1, model=model)
    assert torch.equal(callback.pool, kept)
    assert callback.counts[0] == selections


def test_a_copy_sent_to_spawned_workers_starts_afresh() -> None:
    # ddp_spawn pickles the callback for its workers without the module (see __getstate__): the copy cannot tell
    # the module and training set of its earlier fit, so it starts afresh, not on that fit's pool and model.
    callback = SelectionCount(random_subset_size=0.2, drop_interval=1)
    fit(callback, data=blobs(n=1200, noise=0.3), max_epochs=3, model=seeded_classifier(lr=0.2))
    assert not bool(callback.pool.all())
    spawned = pickle.loads(ForkingPickler.dumps(callback))
    spawned.counts.clear()
    fit(spawned, data=blobs(n=1200, noise=0.3, seed=1), max_epochs=1, model=seeded_classifier(lr=0.2))
    assert bool(spawned.pool.all())
    assert spawned.counts[0] == 0


def test_fitting_the_same_module_again_with_another_batch_size_selects_anew() -> None:
    # Every coreset picked at the selection, and checks that always pass: the plan keeps coresets of 32.
    callback = SelectionCount(random_subset_size=0.2, hessian_probes=None, tau=1e9)
    model, dm = TinyClassifier(), CrestDataModule(blobs(), batch_size=32)
    make_trainer([callback], max_epochs=1).fit(model, datamodule=dm)
    assert {len(w) for _, w in callback.coresets} == {32}
    callback.counts.clear()
    dm.batch_size = 64
    trainer = make_trainer([callback], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    # It goes on (the same selection count) with a selection of coresets of 64.
    assert callback.counts == [1]
    assert {len(w) for _, w in callback.coresets} == {64}
    assert trainer.global_step == math.ceil(0.1 * len(dm.labels) / 64)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_transfer_hooks_run_as_for_training_batches(precision: str) -> None:
    # In training mode, with gradients enabled and outside autocast, as Lightning runs them for a training batch:
    # a hook that augments in training mode (dropout on the inputs, say) augments what CREST scores too.
    seen: set[tuple[bool, bool, bool]] = set()

    class Watched(TinyClassifier):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            seen.add((self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return batch

    fit(InputsSeen(random_subset_size=0.1), model=Watched(), max_epochs=1, precision=precision)
    assert seen == {(True, True, False)}


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`")
def test_transfer_hooks_that_reorder_the_rows_are_refused() -> None:
    class Sorting(TinyClassifier):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            order = torch.argsort(batch[1], stable=True)  # rows moved together: training would not notice
            return [part[order] for part in batch]

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(TypeError, match="whose targets are not the ones given, in their order"):
        trainer.fit(Sorting(), datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer`")
def test_transfer_hooks_that_reorder_the_targets_in_place_are_refused() -> None:
    class Reversing(TinyClassifier):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            inputs, targets, _ = batch
            inputs.copy_(inputs.flip(0))
            targets.copy_(targets.flip(0))
            return batch

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(TypeError, match="whose targets are not the ones given, in their order"):
        trainer.fit(Reversing(), datamodule=CrestDataModule(blobs(), batch_size=32))


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer`")
def test_a_hook_that_scales_the_inputs_in_place_leaves_the_kept_check_sample_alone() -> None:
    # The check sample is loaded once and goes through the hooks at every check: each time it must start from the
    # same inputs. With a zero learning rate the model predicts L0 exactly, so rho stays 0.
    class Scaling(TinyClassifier):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            batch[0].mul_(1.5)
            return batch

    callback = Recorder(random_subset_size=0.1, check_size=16, tau=1e9)
    fit(callback, model=Scaling(lr=0.0), max_epochs=1)
    assert len(callback.steps("check")) > 1
    assert callback._rho == 0.0


def test_hook_seeds_of_the_check_sample_differ_from_item_seeds_and_across_processes() -> None:
    callback = CrestCallback()
    seeds = set()
    for rank in (0, 1):
        callback._trainer = SimpleNamespace(global_rank=rank)  # type: ignore[assignment]
        seeds |= {callback._hook_seed(7, position) for position in range(100)}
    assert len(seeds) == 200
    assert not seeds & {item_seed(7, index) for index in range(10_000)}


@pytest.mark.parametrize("hessian_params", ["all", "last_layer"])
def test_quadratic_model_parameters(hessian_params: str) -> None:
    callback = CrestCallback(random_subset_size=0.1, hessian_params=hessian_params)  # type: ignore[arg-type]
    _, model = fit(callback, max_epochs=1)
    modelled = list(model.parameters() if hessian_params == "all" else model.net[-1].parameters())
    assert [id(p) for p in callback._model_parameters()] == [id(p) for p in modelled]
    assert callback._quadratic.gradient.numel() == sum(p.numel() for p in modelled)


@pytest.mark.parametrize("hessian_probes", [1, 3, None])
def test_hessian_probes(hessian_probes: int | None) -> None:
    callback = Recorder(random_subset_size=0.1, hessian_probes=hessian_probes)
    fit(callback, max_epochs=2)
    # The probed coresets are picked at the selection (None: as many as the previous selection planned, since a
    # selection's own P follows from its probes), the others when training reaches them; the quadratic model
    # takes one update per probe.
    picked = [sum(w.numel() > 0 for _, w in plan) for plan in callback.plans]
    previous = [callback.coreset_mul] + [len(plan) for plan in callback.plans[:-1]]
    limits = previous if hessian_probes is None else [hessian_probes] * len(previous)
    assert picked == [min(limit, len(plan)) for limit, plan in zip(limits, callback.plans, strict=True)]
    assert callback._quadratic.step == sum(picked)


@pytest.mark.parametrize(("hessian_every", "second_order"), [(1, True), (3, True), (1, False), (3, False)])
def test_hessian_every(monkeypatch: pytest.MonkeyPatch, hessian_every: int, second_order: bool) -> None:
    callback = CrestCallback(random_subset_size=0.1, hessian_every=hessian_every, second_order=second_order)
    gradients: list[tuple[int, bool]] = []  # (selection, with a graph for the probe) of each coreset gradient
    grad = torch.autograd.grad

    def spy(*args: Any, **kwargs: Any) -> Any:
        if "create_graph" in kwargs:  # the coreset gradient of _build_model (the probe's own call sets none)
            gradients.append((callback._selections, kwargs["create_graph"]))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    fit(callback, max_epochs=2)
    q, selections = callback._quadratic, callback._selections
    assert selections > hessian_every
    # One gradient per selection (hessian_probes=1); a double backward only at selections 0, k, 2k, ...
    probed = list(range(0, selections, hessian_every))
    assert [s for s, _ in gradients] == list(range(selections))
    assert [s for s, graph in gradients if graph] == (probed if second_order else [])
    assert (q.step, q.curvature_steps) == (selections, len(probed))
    # The first-order model's curvature is its eps alone, probed or not.
    assert bool((q.hessian == q.eps).all()) is not second_order


@pytest.mark.parametrize("subsample", [1, 3])
def test_hessian_subsample_probes_every_kth_example(monkeypatch: pytest.MonkeyPatch, subsample: int) -> None:
    # At the first selection: the gradient of the whole weighted coreset, and z * (H_S z) with H_S the exact Hessian
    # of the weighted mean loss of every k-th pick, from autograd on the flat parameters with the probe's own z.
    calls: list[tuple[L.LightningModule, Tensor, Tensor, Tensor, Tensor, Tensor | None]] = []
    derivatives = CrestCallback._coreset_derivatives

    def spy(
        self: CrestCallback,
        indices: Tensor,
        weights: Tensor,
        params: list[Tensor],
        probe: bool,
        positions: Tensor,
    ) -> Any:
        module, state = copy.deepcopy(self._module), self._generator.get_state()
        grad, curvature = derivatives(self, indices, weights, params, probe, positions)
        calls.append((module, indices, weights, state, grad, curvature))
        return grad, curvature

    monkeypatch.setattr(CrestCallback, "_coreset_derivatives", spy)
    data = blobs()
    fit(CrestCallback(random_subset_size=0.1, hessian_subsample=subsample), data=data, max_epochs=1)
    module, indices, weights, state, grad, curvature = calls[0]
    assert curvature is not None
    inputs, targets = data.tensors[0][indices], data.tensors[1][indices]
    named = list(module.named_parameters())
    flat = torch.cat([p.detach().flatten() for _, p in named])

    def loss(vector: Tensor, rows: slice) -> Tensor:
        chunks = torch.split(vector, [p.numel() for _, p in named])
        params = {name: chunk.view_as(p) for (name, p), chunk in zip(named, chunks, strict=True)}
        logits = torch.func.functional_call(module, params, (inputs[rows],))
        per_example = torch.nn.functional.cross_entropy(logits, targets[rows], reduction="none")
        return (weights[rows] * per_example).mean()

    leaf = flat.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(loss(leaf, slice(None)), leaf)
    generator = torch.Generator()
    generator.set_state(state)
    z = torch.cat([t.flatten() for t in rademacher_like(list(module.parameters()), generator)])
    sampled = torch.autograd.functional.hessian(lambda v: loss(v, slice(None, None, subsample)), flat)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(curvature, z * (sampled @ z), rtol=1e-4, atol=1e-6)
    if subsample > 1:  # the probe really is the sample's: the whole coreset's Hessian gives another estimate
        whole = torch.autograd.functional.hessian(lambda v: loss(v, slice(None)), flat)
        assert not torch.allclose(curvature, z * (whole @ z), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"knn": 8, "backend": "torch", "similarity": "exp"}])
def test_selection_options_reach_facility_location(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(facility_location).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments)
        return facility_location(*args, **kwargs)

    monkeypatch.setattr(crest_callback, "facility_location", spy)
    fit(CrestCallback(random_subset_size=0.1, **options), max_epochs=1)
    expected = {"knn": None, "backend": "auto", "similarity": "distance", **options}
    assert calls
    assert all({name: call[name] for name in expected} == expected for call in calls)


def test_module_ignoring_weights_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="does not use the batch's weights"):
        fit(CrestCallback(random_subset_size=0.1), model=TinyClassifier(use_weights=False), max_epochs=1)


class MeanWeighted(TinyClassifier):
    """A loss that uses the weights only through their mean: unweighted in effect, since it is 1 in a coreset."""

    def __init__(self, reduce: str, tuple_batches: bool = False) -> None:
        super().__init__()
        self.reduce, self.tuple_batches = reduce, tuple_batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return tuple(batch) if self.tuple_batches and len(batch) == 3 else batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, weights = batch
        losses = torch.nn.functional.cross_entropy(self(inputs), targets, reduction="none")
        if self.reduce == "broadcast":
            return (losses * weights[:, None]).mean()
        return losses.mean() * weights.mean()


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`")
@pytest.mark.parametrize(
    ("reduce", "tuple_batches"), [("broadcast", False), ("mean", False), ("broadcast", True)]
)
def test_a_loss_that_uses_only_the_weights_mean_is_an_error(reduce: str, tuple_batches: bool) -> None:
    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(RuntimeError, match="same gradient although the examples' losses differ"):
        trainer.fit(MeanWeighted(reduce, tuple_batches), datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 1


def test_random_batches_take_any_use_of_their_weights() -> None:
    # Every weight is 1 there: the loss scaled by their mean is the weighted loss.
    callback = CrestCallback(selection="random")
    trainer, _ = fit(callback, model=MeanWeighted("mean"), max_epochs=1)
    assert trainer.global_step == 4
    assert callback._weights_checked
    assert callback._undecided_weight_steps == 0


class Noisy(TinyClassifier):
    """Draws random numbers in eval mode too."""

    def forward(self, inputs: Tensor) -> Tensor:
        return super().forward(inputs + 0.1 * torch.randn_like(inputs))


class Shifting(TinyClassifier):
    """Changes its inputs in place."""

    def forward(self, inputs: Tensor) -> Tensor:
        return super().forward(inputs.add_(1.0))


@pytest.mark.parametrize("model_class", [Noisy, Shifting])
def test_the_weights_check_leaves_the_run_as_it_would_be(
    monkeypatch: pytest.MonkeyPatch, model_class: type[TinyClassifier]
) -> None:
    def run() -> tuple[L.LightningModule, Tensor]:
        torch.manual_seed(0)
        model = model_class()
        fit(CrestCallback(random_subset_size=0.1), model=model, max_epochs=2)
        return model, torch.get_rng_state()

    measured, measured_state = run()
    monkeypatch.setattr(CrestCallback, "_losses_differ", lambda self, module, batch: False)
    unmeasured, unmeasured_state = run()
    assert all(torch.equal(p, q) for p, q in zip(measured.parameters(), unmeasured.parameters(), strict=True))
    assert torch.equal(measured_state, unmeasured_state)


class ZeroHead(TinyClassifier):
    """A last layer that starts at zero: every example's loss is log(C) until it moves."""

    def __init__(self, warmup: int = 0) -> None:
        super().__init__()
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)
        self.warmup = warmup

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.warmup:
            return optimizer
        # A linear warm-up from 0: the first step leaves the losses equal for the second one too.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize(("warmup", "undecided"), [(0, 1), (1000, 2), (10**6, 4)])
def test_equal_losses_on_the_first_steps_do_not_count_as_ignoring_the_weights(
    warmup: int, undecided: int
) -> None:
    # The longest warm-up keeps the losses within 1e-6 of each other over the whole fit: never decided, never refused.
    callback = CrestCallback(random_subset_size=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not tell")
        trainer, _ = fit(callback, model=ZeroHead(warmup), max_epochs=1)
    assert trainer.global_step == 4
    assert callback._undecided_weight_steps == undecided
    assert callback._weights_checked == (undecided < 4)


@pytest.mark.parametrize("warmup", [100, 1000])
def test_losses_that_round_equal_in_bf16_do_not_count_as_ignoring_the_weights(warmup: int) -> None:
    # The training loss in bf16 rounds the losses of a small head to one value, which float32 tells apart.
    trainer, _ = fit(
        CrestCallback(random_subset_size=0.1), model=ZeroHead(warmup), max_epochs=2, precision="bf16-true"
    )
    assert trainer.global_step == 8


def test_a_loss_whose_weights_get_no_gradient_is_warned_after_a_while() -> None:
    class Zeroed(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets, weights = batch
            return torch.nn.functional.cross_entropy(self(inputs), targets) + 0 * weights.sum()

    callback = CrestCallback(random_subset_size=0.1)
    with pytest.warns(
        UserWarning, match="could not tell in 20 steps whether the training loss weights"
    ) as caught:
        trainer, _ = fit(callback, model=Zeroed(), max_epochs=6)
    assert trainer.global_step == 24
    assert sum("could not tell" in str(w.message) for w in caught) == 1
    assert callback._undecided_weight_steps == 20


class Probabilities(TinyClassifier):
    """A forward that returns probabilities; ``classes`` outputs (more than the data's 4: a wide softmax)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__(num_classes=classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return (10 * super().forward(inputs)).softmax(1)  # spread out: a wide sum rounds further from 1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, weights = batch
        return weighted_cross_entropy(super().forward(inputs), targets, weights)


@pytest.mark.parametrize(("precision", "classes"), [("32-true", 4), ("bf16-true", 4), ("32-true", 20_000)])
def test_a_forward_that_returns_probabilities_is_warned_once_per_fit(precision: str, classes: int) -> None:
    callback, model = CrestCallback(random_subset_size=0.1), Probabilities(classes)
    trainer = make_trainer([callback], max_epochs=1, precision=precision)
    dm = CrestDataModule(blobs(), batch_size=32)
    for epochs in (1, 2):  # fitting the same module again with the same callback checks it again
        trainer.fit_loop.max_epochs = epochs
        with pytest.warns(
            UserWarning, match=r"`compute_logits` returned probabilities \(every row in \[0, 1\]"
        ) as caught:
            trainer.fit(model, datamodule=dm)
        assert sum("returned probabilities" in str(w.message) for w in caught) == 1


def test_logits_and_log_probabilities_are_not_taken_for_probabilities() -> None:
    class LogProbabilities(TinyClassifier):  # the log of probabilities are logits too
        def forward(self, inputs: Tensor) -> Tensor:
            return super().forward(inputs).log_softmax(1)

    class WideZeroHead(TinyClassifier):  # all-zero logits over 300 classes, scored in bf16
        def __init__(self) -> None:
            super().__init__(num_classes=300)
            torch.nn.init.zeros_(self.net[2].weight)
            torch.nn.init.zeros_(self.net[2].bias)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*returned probabilities")
        fit(CrestCallback(random_subset_size=0.1), max_epochs=1)
        fit(CrestCallback(random_subset_size=0.1), model=LogProbabilities(), max_epochs=1)
        fit(CrestCallback(random_subset_size=0.1), model=WideZeroHead(), max_epochs=1, precision="bf16-mixed")


def test_a_step_that_unpacks_two_values_is_told_of_the_weights() -> None:
    class Pairs(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets = batch
            return torch.nn.functional.cross_entropy(self(inputs), targets)

    with pytest.raises(ValueError, match=r"too many values to unpack \(expected 2\)") as raised:
        fit(CrestCallback(random_subset_size=0.1), model=Pairs(), max_epochs=1)
    assert "unpack `inputs, targets, weights = batch`" in "".join(getattr(raised.value, "__notes__", []))


class StepOnAnIterator(TinyClassifier):
    def training_step(self, dataloader_iter: Any) -> Tensor:  # type: ignore[override]
        batch, batch_idx, _ = next(dataloader_iter)
        return super().training_step(batch, batch_idx)


def test_a_step_on_the_data_loader_iterator_is_warned_that_its_weights_go_unchecked() -> None:
    # Lightning gives `on_train_batch_start` no batch then, so no probe reaches the loss.
    with pytest.warns(
        UserWarning, match="could not check that the training loss uses the batch's weights"
    ) as caught:
        fit(CrestCallback(random_subset_size=0.1), model=StepOnAnIterator(use_weights=False), max_epochs=2)
    assert sum("batch's weights" in str(w.message) for w in caught) == 1


def test_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    callback = CrestCallback(random_subset_size=0.1)
    model = TinyClassifier()
    model.net.insert(1, torch.nn.BatchNorm1d(32))
    fit(callback, model=model, max_epochs=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = CrestCallback(random_subset_size=0.1)
    restored.load_state_dict(state)
    assert torch.equal(restored._pool, callback._pool)  # type: ignore[arg-type]
    assert len(restored._anchor_stats) == 2
    assert all(torch.equal(a, b) for a, b in zip(restored._anchor_stats, callback._anchor_stats, strict=True))
    assert restored._interval == callback._interval
    assert restored._selections == callback._selections
    saved = callback.statistics
    for name in ("selections", "rho", "check_interval", "num_coresets", "pool_size", "selection_time"):
        assert restored.statistics[name] == pytest.approx(saved[name], nan_ok=True)
    assert torch.equal(restored._generator.get_state(), callback._generator.get_state())
    assert restored._quadratic.predict(callback._model_parameters()) == pytest.approx(
        callback._quadratic.predict(callback._model_parameters())
    )


# --- bad input, raised before training starts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"`fraction` must lie in \(0.0, 1.0\], got 0.0"),
        ({"fraction": 1.5}, r"`fraction` must lie in \(0.0, 1.0\], got 1.5"),
        ({"fraction": 10}, r"`fraction` must lie in \(0.0, 1.0\], got 10; for 10% pass 0.1\.$"),
        ({"fraction": 250}, r"`fraction` must lie in \(0.0, 1.0\], got 250\.$"),
        ({"tau": -1.0}, r"`tau` must lie in \[0.0, inf\], got -1.0"),
        ({"tau": math.nan}, r"`tau` must lie in \[0.0, inf\], got nan"),
        ({"fraction": math.nan}, r"`fraction` must lie in \(0.0, 1.0\], got nan"),
        ({"fraction": math.inf}, r"`fraction` must lie in \(0.0, 1.0\], got inf"),
        ({"min_pool_fraction": -math.inf}, r"`min_pool_fraction` must lie in \[0.0, 1.0\], got -inf"),
        ({"interval_mul": 0.0}, r"`interval_mul` must lie in \(0.0, inf\], got 0.0"),
        (
            {"interval_mul": math.inf},
            r"`interval_mul` must be at most 1000 \(each selection plans .*, got inf",
        ),
        (
            {"interval_mul": 1e300},
            r"`interval_mul` must be at most 1000 .*, got 1e\+300; to re-select rarely",
        ),
        (
            {"coreset_mul": 1001},
            r"`coreset_mul` must be at most 1000 \(each selection plans .*\), got 1001\.",
        ),
        (
            {"fraction": np.float32(0.1)},
            r"`fraction` must be a Python int or float, got np.float32\(0.1\); pass float",
        ),
        ({"tau": "0.1"}, "`tau` must be a Python int or float, got '0.1'.$"),
        ({"random_subset_size": 0}, "`random_subset_size` as a count must be at least 1, got 0"),
        (
            {"random_subset_size": "1%"},
            "`random_subset_size` must be a float fraction or an int count, got '1%'",
        ),
        (
            {"random_subset_size": 300.0},
            r"as a float is a fraction of the training set in \(0, 1\], got 300.0; pass 300 \(an int\) for a count",
        ),
        ({"drop_learned": "no"}, "`drop_learned` must be True or False, got 'no'"),
        ({"second_order": None}, "`second_order` must be True or False, got None"),
        ({"drop_learned": 1}, "`drop_learned` must be True or False, got 1"),
        ({"fraction": True}, "`fraction` must be a Python int or float, got True"),
        ({"fraction": 10**400}, r"`fraction` must lie in \(0.0, 1.0\], got 1000000000"),
        ({"coreset_mul": True}, "`coreset_mul` must be a positive int, got True.$"),
        (
            {"coreset_mul": np.int64(5)},
            r"`coreset_mul` must be a positive int, got np.int64\(5\); pass int\(",
        ),
        ({"check_size": np.int64(0)}, r"`check_size` must be a positive int, got np.int64\(0\).$"),
        (
            {"random_subset_size": np.int64(300)},
            r"`random_subset_size` must be a float fraction or an int count, got np.int64\(300\); pass int\(",
        ),
        (
            {"random_subset_size": np.float32(0.5)},
            r"`random_subset_size` must be a float fraction or an int count, got np.float32\(0.5\); pass float\(",
        ),
        (
            {"seed": "a"},
            r"`seed` must be an int in \[0, 2\*\*63\), or None for Lightning's global seed; got 'a'",
        ),
        (
            {"seed": 2**63},
            r"`seed` must be an int in \[0, 2\*\*63\), or None for Lightning's global seed; got 9223372036854775808",
        ),
        (
            {"seed": 2**70},
            r"`seed` must be an int in \[0, 2\*\*63\), or None for Lightning's global seed; got 1180591620717411303424",
        ),
        (
            {"seed": -1},
            r"`seed` must be an int in \[0, 2\*\*63\), or None for Lightning's global seed; got -1",
        ),
        (
            {"seed": True},
            r"`seed` must be an int in \[0, 2\*\*63\), or None for Lightning's global seed; got True",
        ),
        ({"backend": "annoy"}, "`backend` must be 'auto', 'torch' or 'faiss', got 'annoy'"),
        ({"similarity": "cosine"}, "`similarity` must be 'distance' or 'exp', got 'cosine'"),
        ({"coreset_mul": 0}, "`coreset_mul` must be a positive int, got 0"),
        ({"hessian_every": 0}, "`hessian_every` must be a positive int, got 0"),
        ({"hessian_subsample": 0}, "`hessian_subsample` must be a positive int, got 0"),
        ({"hessian_params": "first"}, "`hessian_params` must be 'all' or 'last_layer', got 'first'"),
        ({"selection": "craig"}, "`selection` must be 'crest' or 'random', got 'craig'"),
        ({"knn": -3}, "`knn` must be a positive int, got -3"),
        ({"check_size": 0}, "`check_size` must be a positive int, got 0"),
        ({"check_size": 128.0}, "`check_size` must be a positive int, got 128.0; pass 128"),
        ({"tau": math.inf}, "`tau` must be finite, got inf: the check could never fail"),
        (
            {"drop_threshold": math.inf},
            "`drop_threshold` must be finite, got inf: every example scored would",
        ),
        (
            {"proxy_dtype": torch.float32},
            r"`proxy_dtype` must be torch.bfloat16, torch.float16 or None \(the trainer's precision\), "
            "got torch.float32",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrestCallback(**kwargs)


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_a_training_set_of_one_class_is_refused_before_training(selection: str) -> None:
    data = blobs()
    one_class = type(data)(data.tensors[0], torch.full_like(data.targets, 2))
    with pytest.raises(ValueError, match=r"The training set holds one class \(label 2, all 1200 examples\)"):
        fit(CrestCallback(selection=selection), data=one_class, max_epochs=1)  # type: ignore[arg-type]


class TokenClassifier(TinyClassifier):
    """Mean of token embeddings, then a linear layer; the embedding's gradient is sparse with ``sparse=True``."""

    def __init__(self, sparse: bool) -> None:
        super().__init__(lr=0.0)  # the weights stay those of the first selection
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(48, 8, sparse=sparse), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, inputs: Tensor) -> Tensor:
        embedded = self.net[1](self.net[0](inputs)).mean(1)
        return self.net[2](embedded)  # type: ignore[no-any-return]


def test_a_sparse_embedding_is_modelled_as_the_dense_one() -> None:
    # nn.Embedding(sparse=True) gives the coreset gradient and the Hutchinson probe sparse tensors.
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (1200,), generator=generator)
    tokens = torch.randint(0, 40, (1200, 6), generator=generator)
    tokens[:, 0] = 40 + 2 * targets + torch.randint(0, 2, (1200,), generator=generator)
    data = LabelledTensors(tokens, targets)
    states = []
    for sparse in (False, True):
        callback = CrestCallback(random_subset_size=0.1, tau=1e9, seed=0)
        fit(callback, data=data, model=TokenClassifier(sparse), max_epochs=1)
        assert callback._selections == 1
        states.append(callback._quadratic.state_dict())
    for key in ("grad_avg", "hess_sq_avg", "w0"):
        torch.testing.assert_close(states[1][key], states[0][key])
    assert bool(states[1]["hess_sq_avg"][: 48 * 8].abs().sum() > 0)  # the embedding's own curvature


def test_a_second_crest_callback_is_refused_before_training() -> None:
    # Lightning refuses two callbacks with one state key; a subclass has its own and would plan the batches in turn.
    class MyCrest(CrestCallback):
        pass

    trainer = make_trainer([CrestCallback(), MyCrest()])
    model = TinyClassifier()
    with pytest.raises(
        ValueError, match=r"The Trainer has 2 CrestCallbacks \(CrestCallback, MyCrest\): each would"
    ):
        trainer.fit(model, datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 0


def test_a_hessian_subsample_of_the_global_batch_or_more_is_refused_before_training() -> None:
    # Every k-th pick from the first: k >= the batch probes the first pick alone.
    with pytest.raises(ValueError, match="`hessian_subsample`=32 is at least the global batch of 32: each"):
        fit(CrestCallback(random_subset_size=0.1, hessian_subsample=32), max_epochs=1)
    fit(CrestCallback(random_subset_size=0.1, hessian_subsample=32, second_order=False), max_epochs=1)
    fit(CrestCallback(hessian_subsample=32, selection="random"), max_epochs=1)


def test_infinite_settings_that_are_not_used_are_accepted() -> None:
    assert CrestCallback(drop_threshold=math.inf, drop_learned=False).drop_threshold == math.inf
    assert CrestCallback(tau=math.inf, selection="random").tau == math.inf


def test_an_int_too_large_for_a_float_is_checked_as_a_number() -> None:
    # math.isnan(10**400) raises OverflowError; within an unbounded range the value is simply large.
    assert CrestCallback(tau=10**400).tau == 10**400


def test_a_callback_never_fitted_saves_and_loads_an_empty_state(data: Any, tmp_path: Any) -> None:
    # As in a checkpoint saved after `validate` with the callback attached.
    callback = CrestCallback()
    trainer = make_trainer([callback])
    trainer.validate(TinyClassifier(), datamodule=CrestDataModule(data, data, batch_size=32))
    trainer.save_checkpoint(tmp_path / "validated.ckpt")
    assert callback.state_dict() == {}
    assert "CrestCallback" not in torch.load(tmp_path / "validated.ckpt", weights_only=True)["callbacks"]
    callback.load_state_dict({})
    assert len(callback.pool) == 0
    fit(callback, max_epochs=1)  # and it fits afresh
    assert callback.statistics["selections"] >= 1


def test_a_numpy_integer_seed_is_kept_as_a_python_int() -> None:
    callback = CrestCallback(seed=np.int64(3))
    assert type(callback.seed) is int
    assert callback.seed == 3


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


def test_gradient_accumulation_scheduled_later_is_refused_before_training(data: Any) -> None:
    schedule = L.pytorch.callbacks.GradientAccumulationScheduler({1: 2})
    trainer = make_trainer([CrestCallback(), schedule], max_epochs=2)
    with pytest.raises(ValueError, match="sets `accumulate_grad_batches`=2 from epoch 1, which would merge"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.parametrize("stop", [{"max_epochs": 2}, {"max_epochs": -1, "max_steps": 8}])
def test_gradient_accumulation_scheduled_after_the_last_epoch_trains(data: Any, stop: dict[str, int]) -> None:
    schedule = L.pytorch.callbacks.GradientAccumulationScheduler({2: 2})
    trainer = make_trainer([CrestCallback(random_subset_size=0.1), schedule], **stop)
    trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 8


def test_gradient_accumulation_over_before_a_resumed_epoch_trains(data: Any, tmp_path: Path) -> None:
    # A warm start with accumulation over its first two epochs, then CREST from epoch 2, where it is 1 again.
    schedule = {0: 2, 2: 1}
    dm = CrestDataModule(data, batch_size=32)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path)
    warm = make_trainer(
        [L.pytorch.callbacks.GradientAccumulationScheduler(schedule), saver],
        max_epochs=2,
        enable_checkpointing=True,
    )
    warm.fit(TinyClassifier(), datamodule=dm)
    callbacks = [
        CrestCallback(random_subset_size=0.1),
        L.pytorch.callbacks.GradientAccumulationScheduler(schedule),
    ]
    trainer = make_trainer(callbacks, max_epochs=4)
    trainer.fit(TinyClassifier(), datamodule=dm, ckpt_path=saver.best_model_path)
    assert trainer.current_epoch == 4


def test_gradient_accumulation_raised_during_the_run_is_refused_at_once(
    data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever raises it (here a scheduler the setup cannot see through), no merged step is trained.
    class Hidden(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                trainer.accumulate_grad_batches = 2

    trainer = make_trainer([CrestCallback(random_subset_size=0.1), Hidden()], max_epochs=2)
    with pytest.raises(ValueError, match="`accumulate_grad_batches`=2 would merge coresets"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.current_epoch == 1
    assert trainer.global_step == 4


@pytest.mark.parametrize("tuned", ["learning rate", "batch size"])
@pytest.mark.parametrize("how", ["callback", "tuner"])
def test_tuners_are_refused_before_their_search(data: Any, tuned: str, how: str) -> None:
    callbacks = L.pytorch.callbacks
    finder = (
        callbacks.LearningRateFinder(num_training_steps=5)
        if tuned == "learning rate"
        else callbacks.BatchSizeFinder()
    )
    trainer = make_trainer([CrestCallback(random_subset_size=0.1)] + ([finder] if how == "callback" else []))
    dm = CrestDataModule(data, batch_size=32)
    tuner = L.pytorch.tuner.Tuner(trainer)

    def search() -> None:
        if how == "callback":
            trainer.fit(TinyClassifier(), datamodule=dm)
        elif tuned == "learning rate":
            tuner.lr_find(TinyClassifier(), datamodule=dm, num_training=5)
        else:
            tuner.scale_batch_size(TinyClassifier(), datamodule=dm, max_trials=2)

    with pytest.raises(
        ValueError, match=f"{type(finder).__name__} .* runs its search steps without the other"
    ):
        search()
    assert trainer.global_step == 0
    assert dm.batch_size == 32


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`")
def test_a_tuple_batch_whose_weights_change_in_place_says_how_to_fix_it(data: Any) -> None:
    class TupleBatches(TinyClassifier):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return tuple(batch)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            weights = batch[2]
            weights.div_(weights.mean())
            return super().training_step(batch, batch_idx)

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(RuntimeError, match="leaf Variable") as raised:
        trainer.fit(TupleBatches(), datamodule=CrestDataModule(data, batch_size=32))
    assert "Change them out of place in the step" in "".join(getattr(raised.value, "__notes__", []))


def test_an_in_place_change_to_a_parameter_gets_no_note_on_tuple_batches(data: Any) -> None:
    class InPlace(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.net[0].bias.add_(0.0)  # a leaf that requires grad: torch refuses, whatever the batch
            return super().training_step(batch, batch_idx)

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1)
    with pytest.raises(RuntimeError, match="leaf Variable") as raised:
        trainer.fit(InPlace(), datamodule=CrestDataModule(data, batch_size=32))
    assert "batch is a tuple" not in "".join(getattr(raised.value, "__notes__", []))


def test_a_data_module_whose_train_dataloader_bypasses_the_plan_is_refused(data: Any) -> None:
    class OwnLoader(CrestDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    trainer = make_trainer([CrestCallback()], max_epochs=1)
    with pytest.raises(
        TypeError, match=r"training loader of OwnLoader does not read CREST's coresets \(its sampler "
    ):
        trainer.fit(TinyClassifier(), datamodule=OwnLoader(data, batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.parametrize("loader_batch", [64, 20])
def test_a_loader_rebuilt_around_the_sampler_with_another_batch_size_is_refused(
    data: Any, loader_batch: int
) -> None:
    # Rebuilt to pass an option the data module does not take; another batch size would merge or split coresets.
    class Rebuilt(CrestDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(
                loader.dataset, batch_size=loader_batch, sampler=loader.sampler, collate_fn=loader.collate_fn
            )

    trainer = make_trainer([CrestCallback()], max_epochs=1)
    with pytest.raises(
        ValueError,
        match=rf"training loader of Rebuilt batches {loader_batch} examples per step, but CREST's coresets give "
        r"each process 32 \(`batch_size`\)",
    ):
        trainer.fit(TinyClassifier(), datamodule=Rebuilt(data, batch_size=32))
    assert trainer.global_step == 0


def test_a_loader_rebuilt_around_the_sampler_with_the_same_batch_size_trains(data: Any) -> None:
    class Rebuilt(CrestDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(
                loader.dataset,
                batch_size=self.batch_size,
                sampler=loader.sampler,
                collate_fn=loader.collate_fn,
            )

    trainer = make_trainer([CrestCallback()], max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=Rebuilt(data, batch_size=32))
    assert trainer.global_step == math.ceil(0.1 * len(data) / 32)


def test_a_train_dataloader_reloaded_without_the_plan_is_refused(data: Any) -> None:
    class LaterOwnLoader(CrestDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
            if self.trainer is not None and self.trainer.current_epoch >= 1:
                return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.batch_size)
            return super().train_dataloader()

    trainer = make_trainer([CrestCallback()], max_epochs=3, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(TypeError, match="does not read CREST's coresets"):
        trainer.fit(TinyClassifier(), datamodule=LaterOwnLoader(data, batch_size=32))
    assert trainer.global_step == math.ceil(0.1 * len(data) / 32)  # the first epoch only


def test_stochastic_weight_averaging_recomputes_batch_norm_statistics(data: Any) -> None:
    # SWA adds an epoch without backward passes, with accumulation over the whole epoch, to recompute the
    # BatchNorm statistics of the averaged weights: it steps no optimizer, so merges no coresets.
    class Normalised(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net.insert(1, torch.nn.BatchNorm1d(32))

    checked_in: list[int] = []  # the epoch of every check

    class Checks(CrestCallback):
        def _check(self) -> bool:
            assert self._trainer is not None
            checked_in.append(self._trainer.current_epoch)
            return super()._check()

    swa = L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    model = Normalised()
    trainer = make_trainer([Checks(interval_mul=1e-6), swa], max_epochs=4)  # a check after every step
    trainer.fit(model, datamodule=CrestDataModule(data, batch_size=32))
    steps = math.ceil(0.1 * len(data) / 32)
    # No checks in the extra epoch: no training step moved the weights, SWA replaced them.
    assert sorted(set(checked_in)) == [0, 1, 2, 3]
    assert len(checked_in) == 4 * steps
    assert trainer.current_epoch == 5  # with SWA's extra epoch
    assert trainer.global_step == 4 * steps + 1  # Lightning steps once at its end, as without the callback
    norm = model.net[1]
    assert norm.momentum == 0.1  # put back after the extra epoch
    assert norm.num_batches_tracked == steps  # recomputed over that epoch alone
    assert not torch.allclose(norm.running_var, torch.ones(32))


def test_a_barebones_trainer_gets_no_logging_from_the_callback(data: Any) -> None:
    trainer = make_trainer([CrestCallback()], max_epochs=2, barebones=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    assert not [w for w in caught if "barebones" in str(w.message)]
    assert trainer.global_step == 2 * math.ceil(0.1 * len(data) / 32)


@pytest.mark.parametrize(
    ("hook", "source"),
    [
        ("on_train_epoch_end", "datamodule"),
        ("on_train_epoch_end", "trainer"),  # the trainer's own loader, iterated again
        ("on_fit_start", "datamodule"),  # before the trainer's loader exists
    ],
)
def test_reading_the_training_batches_in_a_hook_is_refused_before_it_uses_up_coresets(
    hook: str, source: str
) -> None:
    class Inspecting(TinyClassifier):
        def __init__(self, iterate: bool) -> None:
            super().__init__()
            self.iterate = iterate

        def inspect(self) -> None:
            dm = self.trainer.datamodule  # type: ignore[attr-defined]
            loader = dm.train_dataloader() if source == "datamodule" else self.trainer.train_dataloader
            assert len(loader) == dm.steps_per_epoch  # its length alone reads nothing
            if self.iterate:
                with torch.no_grad():
                    [self(inputs) for inputs, _, _ in loader]

    setattr(Inspecting, hook, Inspecting.inspect)
    callback = CrestCallback(random_subset_size=0.1)
    with pytest.raises(RuntimeError, match="read during the fit by something other than the training loop"):
        fit(callback, model=Inspecting(iterate=True), max_epochs=2)
    # The first epoch's steps at most: the inspecting reader took none.
    assert callback._dm.plan.served == (4 if hook == "on_train_epoch_end" else 0)
    trainer, _ = fit(CrestCallback(random_subset_size=0.1), model=Inspecting(iterate=False), max_epochs=2)
    assert trainer.global_step == 8


def test_overfit_batches_is_refused(data: Any) -> None:
    trainer = make_trainer([CrestCallback()], max_epochs=1, overfit_batches=2)
    with pytest.raises(ValueError, match="`overfit_batches`=2 replaces the coreset sampler"):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))


def test_overfit_batches_without_the_callback_trains_the_first_batches_with_weight_one(data: Any) -> None:
    weights = []

    class Recording(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            weights.append(batch[2])
            return super().training_step(batch, batch_idx)

    trainer = make_trainer(max_epochs=2, overfit_batches=2)
    trainer.fit(Recording(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.global_step == 4
    assert all(torch.equal(w, torch.ones(32)) for w in weights)


def test_a_frozen_submodule_in_eval_mode_stays_there(data: Any) -> None:
    modes = []

    class Frozen(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net.insert(1, torch.nn.Dropout(0.5))

        def on_train_start(self) -> None:
            self.net[1].eval()  # the user's choice: no dropout in this part

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            modes.append((self.training, self.net[0].training, self.net[1].training))
            return super().training_step(batch, batch_idx)

    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=2)
    trainer.fit(Frozen(), datamodule=CrestDataModule(data, batch_size=32))
    assert trainer.callbacks[0]._selections > 1  # type: ignore[attr-defined]
    assert modes == [(True, True, False)] * trainer.global_step


def test_val_check_interval_longer_than_an_epoch_is_refused(data: Any) -> None:
    trainer = make_trainer([CrestCallback()], max_epochs=1, val_check_interval=10)
    with pytest.raises(
        ValueError, match="`val_check_interval`=10 steps is longer than CREST's epochs of 4 steps"
    ):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, batch_size=32))
    trainer = make_trainer(
        [CrestCallback()], max_epochs=3, val_check_interval=6, check_val_every_n_epoch=None
    )
    trainer.fit(TinyClassifier(), datamodule=CrestDataModule(data, blobs(n=64, seed=1), batch_size=32))
    assert trainer.global_step == 12


def test_fast_dev_run_does_not_warn_about_its_limit(data: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*limit_train_batches.*")
        trainer, _ = fit(CrestCallback(random_subset_size=0.1), fast_dev_run=2)
    assert trainer.global_step == 2


def test_a_model_without_double_backward_is_told_to_use_a_first_order_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unsupported(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile with aot_autograd does not currently support double backward")

    monkeypatch.setattr(crest_callback, "hutchinson_diagonal", unsupported)
    with pytest.raises(
        RuntimeError, match=r"hessian_params='last_layer' .*, or pass second_order=False for a first-order"
    ):
        fit(CrestCallback(random_subset_size=0.1), max_epochs=1)
    trainer, _ = fit(CrestCallback(random_subset_size=0.1, second_order=False), max_epochs=1)
    assert trainer.global_step == 4


def test_an_allocation_failure_in_the_probe_is_not_called_a_missing_second_derivative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate"

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    monkeypatch.setattr(crest_callback, "hutchinson_diagonal", out_of_memory)
    with pytest.raises(RuntimeError) as caught:
        fit(CrestCallback(random_subset_size=0.1), max_epochs=1)
    assert str(caught.value) == message


def test_a_compiled_model_is_told_to_compile_only_the_training_steps_model() -> None:
    class Compiled(TinyClassifier):
        def __init__(self, in_tree: bool) -> None:
            super().__init__()
            # aot_eager: no double backward either, and no C++ compiler needed.
            compiled = torch.compile(self.net, backend="aot_eager")
            if in_tree:
                self.net = compiled
            self._compiled = [
                compiled
            ]  # the message's way: out of the module tree, for the training step only

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets, weights = batch
            return weighted_cross_entropy(self._compiled[0](inputs), targets, weights)

    for hessian_params in ("all", "last_layer"):
        with pytest.raises(
            RuntimeError, match=r"The model is compiled \(torch.compile\), and its compiled graph"
        ):
            fit(CrestCallback(random_subset_size=0.1, hessian_params=hessian_params), model=Compiled(True))  # type: ignore[arg-type]
    trainer, _ = fit(CrestCallback(random_subset_size=0.1), model=Compiled(False), max_epochs=1)
    assert trainer.global_step == 4


class Tokens(TinyClassifier):
    """Token sequences (class c draws its tokens from its own range) through an embedding and a head."""

    def __init__(self, bag: bool = False) -> None:
        super().__init__()
        self.bag = bag
        self.embed = nn.EmbeddingBag(200, 16) if bag else nn.Embedding(200, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 4)
        del self.net

    def forward(self, inputs: Tensor) -> Tensor:
        if self.bag:
            return self.head(self.embed(inputs))  # type: ignore[no-any-return]
        return self.head(self.encoder(self.embed(inputs)).mean(1))  # type: ignore[no-any-return]


def tokens(n: int = 640) -> LabelledTensors:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (n,), generator=gen)
    return LabelledTensors(torch.randint(0, 50, (n, 8), generator=gen) + 50 * targets[:, None], targets)


def test_attention_is_probed_with_a_kernel_that_has_a_second_derivative() -> None:
    # nn.TransformerEncoderLayer calls scaled_dot_product_attention, whose fused CPU kernel has no double backward.
    callback = CrestCallback(random_subset_size=0.2)
    trainer, _ = fit(callback, data=tokens(), model=Tokens(), max_epochs=2)
    assert trainer.global_step == 2 * 2
    assert callback.statistics["selections"] >= 1
    assert callback._quadratic.curvature_steps >= 1


def test_a_layer_without_double_backward_is_named_with_the_ways_around_it() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"the derivative for '_embedding_bag_backward' is not implemented.* Pass hessian_params='last_layer'",
    ):
        fit(CrestCallback(random_subset_size=0.2), data=tokens(), model=Tokens(bag=True), max_epochs=1)
    callback = CrestCallback(random_subset_size=0.2, hessian_params="last_layer")
    trainer, _ = fit(callback, data=tokens(), model=Tokens(bag=True), max_epochs=1)
    assert trainer.global_step == 2
    assert callback._quadratic.curvature_steps >= 1
    # With the bag registered last, 'last_layer' is the bag: the message names it instead of advising 'last_layer'.
    model = Tokens(bag=True)
    bag = model.embed
    del model.embed
    model.embed = bag
    with pytest.raises(
        RuntimeError,
        match=r"\(EmbeddingBag, compiled models\)\. hessian_params='last_layer' probed embed\.weight, the parameters "
        "of the last module that has any: register the output layer last, or pass second_order=False",
    ):
        fit(
            CrestCallback(random_subset_size=0.2, hessian_params="last_layer"),
            data=tokens(),
            model=model,
            max_epochs=1,
        )


def test_a_loader_built_before_crest_planned_its_epochs_is_refused_with_the_order_to_fix() -> None:
    # A warm-up callback sizing its schedule in `setup`, listed before CrestCallback, builds the loader first.
    class Warmup(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            self.total = trainer.estimated_stepping_batches

    class SizingData(CrestDataModule):  # its own `setup` runs before every callback's
        def setup(self, stage: str) -> None:
            self.total = self.trainer.estimated_stepping_batches  # type: ignore[union-attr]

    message = "serves full epochs of 38 batches: the data module's own `setup`, or a callback's listed before"
    trainer = make_trainer([Warmup(), CrestCallback(random_subset_size=0.1)], max_epochs=2)
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(TinyClassifier(), datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 0
    trainer = make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=2)
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(TinyClassifier(), datamodule=SizingData(blobs(), batch_size=32))
    assert trainer.global_step == 0
    warmup = Warmup()
    trainer = make_trainer([CrestCallback(random_subset_size=0.1), warmup], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=CrestDataModule(blobs(), batch_size=32))
    assert warmup.total == trainer.global_step == 2 * 4


def test_random_selection_ignores_crests_own_sizes() -> None:
    # No random subsets, checks or quadratic model: a subset size below the batch, a check sample larger than it
    # and a module without trainable parameters in the last layer are not refused.
    callback = CrestCallback(
        selection="random", random_subset_size=16, check_size=600, hessian_params="last_layer"
    )
    model = TinyClassifier()
    model.net[2].requires_grad_(False)
    trainer, _ = fit(callback, model=model, max_epochs=1)
    assert trainer.global_step == 4
    with pytest.raises(ValueError, match=r"`random_subset_size`=16 must lie between the global batch \(32\)"):
        fit(CrestCallback(random_subset_size=16), max_epochs=1)


def test_a_forward_with_more_arguments_points_to_compute_logits() -> None:
    class Masked(TinyClassifier):
        def forward(self, inputs: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
            return self.net(inputs * mask)  # type: ignore[no-any-return]

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'mask'") as caught:
        fit(CrestCallback(random_subset_size=0.1), model=Masked(), max_epochs=1)
    if sys.version_info >= (3, 11):
        assert "override CrestCallback.compute_logits(pl_module, inputs)" in "".join(caught.value.__notes__)


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


def test_targets_must_be_scalars() -> None:
    # A target of shape (1,) collates to (B, 1), which the loss cannot use.
    columns = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.zeros(10, 1, dtype=torch.long))
    with pytest.raises(
        TypeError, match=re.escape("integer class indices (scalars), got tensor([0]) for item 0")
    ):
        CrestDataModule(columns)


def test_logits_of_the_wrong_shape() -> None:
    class Flat(TinyClassifier):
        def forward(self, inputs: Tensor) -> Tensor:
            return super().forward(inputs)[:, :2]  # two of four classes

    with pytest.raises(
        ValueError,
        match=r"returned 2 logits per example but the training set has 4 classes \(its labels, class indices from 0, "
        r"go up to 3\)\. Return one logit per class, or number the classes from 0\.",
    ):
        fit(CrestCallback(random_subset_size=0.1), model=Flat(), max_epochs=1)


def test_a_single_logit_is_refused() -> None:
    # A binary classifier with one logit (as for a BCE loss): softmax over one logit is constant, so every proxy and
    # every loss would be 0, and the check's relative error 0 / 0.
    ones = blobs(num_classes=2)
    with pytest.raises(
        ValueError, match=r"returned 1 logit per example: .* Give a binary classifier two logits"
    ):
        fit(
            CrestCallback(random_subset_size=0.1),
            data=ones,
            model=TinyClassifier(num_classes=1),
            max_epochs=1,
        )


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
    # The same network behind a dict: the same coresets as the plain module's.
    torch.manual_seed(0)
    extended = Callback(random_subset_size=0.1, tau=0.02)
    fit(extended, model=DictOutput(), max_epochs=2)
    plain = CrestCallback(random_subset_size=0.1, tau=0.02)
    fit(plain, model=seeded_classifier(), max_epochs=2)
    assert extended._selections == plain._selections > 1
    for (indices, weights), (plain_indices, plain_weights) in zip(
        extended.coresets, plain.coresets, strict=True
    ):
        assert torch.equal(indices, plain_indices)
        assert torch.equal(weights, plain_weights)


def test_per_example_loss_extension_point() -> None:
    class Doubled(CrestCallback):
        def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
            return 2 * super().per_example_loss(logits, targets)

    # No re-selection: the anchor loss is measured once, at the same weights in both fits.
    doubled, plain = Doubled(random_subset_size=0.1, tau=1e9), CrestCallback(random_subset_size=0.1, tau=1e9)
    fit(doubled, model=seeded_classifier(), max_epochs=1)
    fit(plain, model=seeded_classifier(), max_epochs=1)
    assert plain._quadratic.anchor_loss is not None
    assert doubled._quadratic.anchor_loss == pytest.approx(2 * plain._quadratic.anchor_loss, rel=1e-6)


@pytest.mark.parametrize("drop_learned", [True, False])
def test_a_per_example_loss_of_another_shape_is_refused_before_training(drop_learned: bool) -> None:
    # A (B, 1) loss would broadcast against the (B,) weights into a (B, B) matrix: a wrong coreset gradient.
    class Column(CrestCallback):
        def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
            return super().per_example_loss(logits, targets)[:, None]

    torch.manual_seed(0)
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    message = (
        r"`per_example_loss` must return one loss per example, shape \(32,\) for a batch of 32, got \(32, 1\)"
    )
    with pytest.raises(ValueError, match=message):
        fit(Column(random_subset_size=0.2, drop_learned=drop_learned), model=model, max_epochs=1)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_pool_never_shrinks_below_one_random_subset() -> None:
    # No floor of its own (fractions 0) and a threshold every loss is under: only the subset size holds the pool.
    callback = CrestCallback(
        random_subset_size=0.2,
        drop_interval=1,
        drop_threshold=100.0,
        min_pool_fraction=0.0,
        min_class_fraction=0.0,
    )
    fit(callback, max_epochs=3)
    assert int(callback.pool.sum()) == callback._subset == 240


def test_crest_forward_passes_use_the_eval_batch_size() -> None:
    sizes: list[int] = []

    class Sized(TinyClassifier):
        def forward(self, inputs: Tensor) -> Tensor:
            # Scoring, checks and the weights' check (the probes take a training batch).
            if not torch.is_grad_enabled():
                sizes.append(len(inputs))
            return super().forward(inputs)

    dm = CrestDataModule(blobs(), batch_size=32, eval_batch_size=16)
    make_trainer([CrestCallback(random_subset_size=0.1)], max_epochs=1).fit(Sized(), datamodule=dm)
    assert sizes
    assert max(sizes) == 16


def test_full_data_training_without_callback(data: Any) -> None:
    trainer, _ = fit(None, data=data, max_epochs=1)
    assert trainer.global_step == math.ceil(1200 / 32)


@pytest.mark.parametrize("subset", ["0.1", "120"])  # a fraction, and a count that stays an int
def test_lightning_cli_configures_the_callback(tmp_path: Path, subset: str) -> None:
    script = Path(__file__).parent / "cli_app.py"
    command = [
        sys.executable,
        str(script),
        "fit",
        "--trainer.callbacks+=lightning_crest.CrestCallback",
        "--trainer.callbacks.fraction=0.25",
        "--trainer.callbacks.tau=0.02",
        f"--trainer.callbacks.random_subset_size={subset}",
        "--trainer.callbacks.proxy_dtype=torch.bfloat16",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False
    )  # a loaded machine
    assert result.returncode == 0, result.stderr[-2000:]
    expected = f"proxy_dtype=torch.bfloat16 random_subset_size={subset} steps=10"
    assert f"CREST fraction=0.25 tau=0.02 {expected}" in result.stdout


class LogCounter(TinyClassifier):
    """Records the global step of every ``log_dict`` call with CREST's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.logged_at: list[int] = []

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        if any(name.startswith("crest/") for name in dictionary):
            self.logged_at.append(self.trainer.global_step)
        super().log_dict(dictionary, *args, **kwargs)


class StatisticsTrace(L.Callback):
    def __init__(self, crest: CrestCallback) -> None:
        self.crest = crest
        self.trace: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.trace.append((trainer.global_step, self.crest.statistics["selections"]))


@pytest.mark.parametrize(
    ("every", "expected", "written"),
    [
        (4, [4, 5, 8, 10], [4, 5, 8, 10]),
        (1, [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10], [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10]),
        (0, [5, 10], [5, 10]),
    ],
)
def test_statistics_logged_where_the_loggers_write_and_at_epoch_ends(
    tmp_path: Path, every: int, expected: list[int], written: list[int]
) -> None:
    # 1200 examples, a budget of 12.5% in batches of 32: 5 steps per epoch.
    callback = CrestCallback(fraction=0.125, random_subset_size=0.1)
    trace = StatisticsTrace(callback)
    model = LogCounter()
    dm = CrestDataModule(blobs(), batch_size=32)
    trainer = make_trainer(
        [callback, trace], max_epochs=2, log_every_n_steps=every, logger=CSVLogger(tmp_path, "logs")
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 5
    assert model.logged_at == expected
    # The loggers wrote CREST's statistics at each of their steps and at each epoch's end (an epoch's last step that
    # is also one of theirs writes twice, the same values).
    assert trainer.logger is not None
    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
    rows = list(csv.DictReader(metrics_csv.open())) if metrics_csv.exists() else []
    crest_rows = [row for row in rows if row.get("crest/selections")]
    assert [int(row["step"]) + 1 for row in crest_rows] == written
    for first, second in itertools.pairwise(crest_rows):
        if first["step"] == second["step"]:
            assert {k: v for k, v in first.items() if k != "crest/overhead"} == {
                k: v for k, v in second.items() if k != "crest/overhead"
            }
    # `statistics` follows every step: one entry per step, the count of selections never behind the logged one.
    assert [step for step, _ in trace.trace] == list(range(1, 11))
    assert trace.trace[-1][1] == float(trainer.callback_metrics["crest/selections"]) == callback._selections
