"""CrestCallback behaviours found untested by a mutation audit of callback.py."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from conftest import RecordedDraws, Recorder, TinyClassifier, blobs, fit, make_trainer
from torch import Tensor

import lightning_crest.callback as crest_callback
from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.datamodule import item_seed


def test_a_relative_error_equal_to_tau_does_not_reselect(monkeypatch: pytest.MonkeyPatch) -> None:
    # Re-selection needs the error to exceed tau: an error of exactly tau keeps the selection.
    monkeypatch.setattr(crest_callback, "relative_error", lambda predicted, actual: 0.05)
    kept = Recorder(random_subset_size=0.1, tau=0.05, interval_mul=1e-6)
    fit(kept, max_epochs=2)
    assert kept.steps("check") == list(range(1, 9))  # T1 = 1 over 2 epochs of ceil(0.1 * 1200 / 32) = 4 steps
    assert kept.steps("select") == [0]
    # Just under the error, every check re-selects (the patched error did reach the decision).
    drifted = Recorder(random_subset_size=0.1, tau=0.0499, interval_mul=1e-6)
    fit(drifted, max_epochs=2)
    assert drifted.steps("select") == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_check_one_step_before_the_epoch_end_reselects_at_once_with_loader_workers() -> None:
    # With loader workers the epoch's last batch is read ahead: a check that fails with one step left selects at
    # once (that batch is stale), rather than training it under the old model and selecting at the next epoch.
    class DriftAtStep3(Recorder):
        def _check(self) -> bool:
            super()._check()
            return self._trainer is not None and self._trainer.global_step == 3

    callback = DriftAtStep3(random_subset_size=0.1, tau=1e9, interval_mul=1e-6)
    torch.manual_seed(0)
    dm = CrestDataModule(blobs(), batch_size=32, num_workers=2)
    trainer = make_trainer([callback], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 8
    assert callback.steps("select") == [0, 3]
    assert 4 not in callback.steps("check")  # the batch read before the selection is not checked


class Ascent(TinyClassifier):
    """Gradient ascent on the weighted loss: every example's loss grows during training."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return -super().training_step(batch, batch_idx)


def test_check_losses_enter_the_exclusion_window() -> None:
    # The window keeps each example's largest loss: the losses measured at the checks count, not only those of the
    # selection. Under gradient ascent the last check (after the last step) holds the check sample's largest losses.
    data = blobs()
    callback = CrestCallback(random_subset_size=0.1, tau=1e9, interval_mul=1e-6, drop_interval=100)
    _, model = fit(callback, data=data, model=Ascent(), max_epochs=2)
    assert callback._selections == 1
    assert callback._checks == 8
    check = callback._check_indices
    model.eval()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(
            model(data.tensors[0][check]), data.tensors[1][check], reduction="none"
        )
    window = callback._window_max_loss[check]
    assert bool(torch.isfinite(window).all())
    assert bool((window >= final - 1e-5).all())
    torch.testing.assert_close(window, torch.maximum(window, final), rtol=1e-5, atol=1e-5)


def test_check_losses_at_the_selection_enter_the_exclusion_window() -> None:
    # In a fit whose loss falls, the check sample's losses are largest when they are measured at the selection: the
    # window keeps them.
    anchors: list[Tensor] = []

    class AnchorLosses(CrestCallback):
        def _forward(
            self, indices: Tensor, check_batches: list[Any] | None = None, **kwargs: Any
        ) -> tuple[Tensor, Tensor, Tensor | None]:
            logits, losses, embeddings = super()._forward(indices, check_batches, **kwargs)
            if check_batches is not None:
                anchors.append(losses[: len(self._check_indices)].clone())
            return logits, losses, embeddings

    callback = AnchorLosses(random_subset_size=0.1, tau=1e9, interval_mul=1e-6, drop_interval=100)
    fit(callback, data=blobs(), model=TinyClassifier(lr=0.2), max_epochs=2)
    assert callback._selections == 1
    assert len(anchors) == 1
    window = callback._window_max_loss[callback._check_indices]
    torch.testing.assert_close(window, anchors[0])


def test_uniform_subsets_wrap_around_a_small_pool_without_repeating_an_example() -> None:
    # 40 classes, subsets of 20: plain uniform subsets. 60 examples hold fewer than the 4 x 20 drawn at once.
    data = blobs(n=60, num_classes=40)
    callback = RecordedDraws(random_subset_size=20, tau=1e9)
    fit(callback, data=data, model=TinyClassifier(num_classes=40), batch_size=16, max_epochs=1)
    draws = callback.draws
    wrapped = [drawn for _, drawn in draws if drawn.numel() > 60]
    assert wrapped  # the P - 1 = 4 subsets planned beyond the probed one
    for pool, drawn in draws:
        assert bool(pool[drawn].all())
        for members in drawn:
            assert len(members.unique()) == len(members) == 20
        # Consecutive positions modulo the pool: each example appears floor or ceil of numel / 60 times.
        times = torch.bincount(drawn.flatten(), minlength=60)
        assert set(times.tolist()) <= {drawn.numel() // 60, math.ceil(drawn.numel() / 60)}


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_uniform_subsets_mix_the_classes(selection: str) -> None:
    # 40 balanced classes of 30 examples, subsets and random batches of 16: too few slots for stratified quotas.
    # A uniform draw of 16 holds about 13 distinct classes; slices of a class-sorted order would hold one or two.
    data = blobs(n=1200, num_classes=40)
    callback = RecordedDraws(random_subset_size=16, tau=1e9, selection=selection)
    fit(callback, data=data, model=TinyClassifier(num_classes=40), batch_size=16, max_epochs=1)
    labels = data.targets
    subsets = torch.cat([drawn for _, drawn in callback.draws])
    assert len(subsets) >= 5
    distinct = torch.tensor([len(labels[members].unique()) for members in subsets], dtype=torch.float)
    assert float(distinct.mean()) > 10
    # Every draw is a new one, not the same members of the pool again.
    assert len({tuple(sorted(members.tolist())) for members in subsets}) == len(subsets)


def test_a_fractional_random_subset_size_rounds_up() -> None:
    callback = CrestCallback(random_subset_size=0.1234, tau=1e9)
    fit(callback, max_epochs=1)
    expected = math.ceil(0.1234 * 1200)  # 148.08 -> 149: never fewer than the fraction asks
    assert callback._subset == expected == 149
    assert len(callback._check_indices) == expected  # check_size=None checks on the whole first subset


@pytest.mark.parametrize("kind", [float, np.float64])
def test_decimal_fractions_are_not_rounded_up_by_float_noise(kind: Any) -> None:
    # In floats 0.07 * 1200 / 12 is 7.000000000000001 and 0.07 * 1200 is 84.00000000000001: ceil would give a step
    # per epoch and an example per subset more than asked for. NumPy's floats (from a config or a sweep) too.
    callback = CrestCallback(fraction=kind(0.07), random_subset_size=kind(0.07), tau=1e9)
    trainer, _ = fit(callback, batch_size=12, max_epochs=1)
    assert callback._steps_per_epoch == 7
    assert trainer.global_step == 7
    assert callback._subset == 84


def test_as_many_classes_as_picks_gives_every_class_exactly_one_pick() -> None:
    # 16 classes and a global batch of 16: the greedy still runs class by class, one pick each, even once the
    # model is confident and the proxies of well-learned examples of different classes are close.
    data = blobs(n=1200, num_classes=16, noise=0.3)
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-6)
    fit(callback, data=data, model=TinyClassifier(num_classes=16, lr=0.5), batch_size=16, max_epochs=3)
    assert callback._per_class
    picks = [coreset for *_, coresets, _ in callback.picks for coreset in coresets]
    assert len(picks) > 10
    for coreset in picks:
        assert torch.bincount(data.targets[coreset], minlength=16).tolist() == [1] * 16


def test_a_check_size_equal_to_the_subset_is_accepted() -> None:
    callback = CrestCallback(random_subset_size=120, check_size=120, tau=1e9)
    trainer, _ = fit(callback, max_epochs=1)
    assert trainer.global_step == 4
    assert len(callback._check_indices.unique()) == 120


def test_hessian_probes_beyond_the_planned_coresets_are_not_taken() -> None:
    # P = coreset_mul = 2 at the first selection: only those 2 coresets update the quadratic model, not 10.
    callback = CrestCallback(random_subset_size=0.1, hessian_probes=10, coreset_mul=2, tau=1e9)
    fit(callback, max_epochs=1)
    assert callback._selections == 1
    assert len(callback.coresets) == 2
    assert callback._quadratic.step == 2


def test_a_state_loaded_by_hand_into_a_used_callback_is_kept_for_the_next_fit() -> None:
    # Dropping learned examples at every epoch shrinks the pool; that state, loaded into a callback that already
    # trained another module, must reach the next fit instead of being reset with the earlier module's state.
    data = blobs(noise=0.3)
    saved = CrestCallback(random_subset_size=0.2, drop_interval=1, tau=1e9)
    fit(saved, data=data, model=TinyClassifier(lr=0.2), max_epochs=2)
    state = saved.state_dict()
    assert int(state["pool"].sum()) < 1200
    used = CrestCallback(random_subset_size=0.2, drop_interval=1, tau=1e9)
    fit(used, data=data, max_epochs=1)
    used.load_state_dict(state)
    fit(used, data=data, model=TinyClassifier(lr=0.2), max_epochs=3)
    assert used._selections >= state["selections"]
    assert int(used.pool.sum()) <= int(state["pool"].sum())
    assert not bool((used.pool & ~state["pool"]).any())  # examples dropped before stay dropped


def test_an_example_scored_twice_in_one_call_keeps_its_largest_loss() -> None:
    # Overlapping subsets score an example twice (with random augmentations, with two losses): it is learned only
    # if every loss is below the threshold, so the window keeps the larger, whichever came last.
    callback = CrestCallback()
    callback._window_max_loss = torch.full((5,), math.nan)
    callback._record_losses(torch.tensor([2, 3, 2]), torch.tensor([0.9, 0.2, 0.05]))
    callback._record_losses(torch.tensor([2, 4]), torch.tensor([0.5, 0.01]))
    recorded = callback._window_max_loss
    assert recorded[[2, 3, 4]].tolist() == pytest.approx([0.9, 0.2, 0.01])
    assert bool(recorded[[0, 1]].isnan().all())  # never scored: stays in the pool


def test_the_exclusion_window_restarts_after_each_drop() -> None:
    # An example with a high loss in one window is judged afresh in the next.
    callback = CrestCallback(drop_threshold=0.1, min_pool_fraction=0.0, min_class_fraction=0.0)
    callback._pool = torch.ones(6, dtype=torch.bool)
    callback._labels = torch.tensor([0, 0, 0, 1, 1, 1])
    callback._subset = 0  # no random subset to keep room for
    callback._window_max_loss = torch.full((6,), math.nan)
    callback._record_losses(torch.arange(6), torch.full((6,), 0.5))
    callback._drop_learned_examples()
    assert bool(callback.pool.all())
    assert bool(callback._window_max_loss.isnan().all())
    callback._record_losses(torch.arange(6), torch.full((6,), 0.05))
    callback._drop_learned_examples()
    assert not bool(callback.pool.any())


def test_rho_is_the_error_relative_to_the_measured_loss() -> None:
    # rho = |F(delta) - L| / L with L the check sample's mean loss, recomputed here from the data set directly.
    class Audited(Recorder):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.rhos: list[tuple[float, float]] = []

        def _check(self) -> bool:
            drifted = super()._check()
            module = self._module
            assert module is not None
            inputs, targets = self._dm.train_dataset[self._check_indices]
            module.eval()
            with torch.no_grad():
                actual = float(torch.nn.functional.cross_entropy(module(inputs), targets))
            module.train()
            predicted = self._quadratic.predict(self._model_parameters())
            self.rhos.append((self._rho, abs(predicted - actual) / actual))
            return drifted

    callback = Audited(random_subset_size=0.1, tau=0.02)
    fit(callback, max_epochs=2)
    assert len(callback.rhos) > 3
    assert max(rho for rho, _ in callback.rhos) > 0.01  # the model drifted: the two arguments' order matters
    for rho, expected in callback.rhos:
        assert rho == pytest.approx(expected, rel=1e-4)


def test_the_check_sample_mixes_the_classes() -> None:
    # Subsets come grouped by class: a check sample smaller than the subset is a random part of it, not its head.
    data = blobs()
    samples: list[Tensor] = []

    class Samples(Recorder):
        def _select_coresets(self) -> None:
            super()._select_coresets()
            samples.append(self._check_indices.clone())

    fit(Samples(random_subset_size=0.1, check_size=16, tau=0.0, interval_mul=1e-6), data=data, max_epochs=1)
    assert len(samples) >= 3
    shares = torch.bincount(data.targets[torch.cat(samples)], minlength=4).float()
    assert bool((shares / shares.sum() > 0.1).all()), shares


def test_crests_own_passes_leave_the_normalisation_statistics_alone() -> None:
    # Scoring, the quadratic model and the checks run in eval mode: only training steps move the running statistics.
    class Normalised(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net.insert(1, torch.nn.BatchNorm1d(32))

    calls: list[str] = []

    class Guarded(CrestCallback):
        def _guard(self, name: str, work: Any, *args: Any) -> Any:
            stats = [s.clone() for s in self._running_stats()]
            result = work(*args)
            assert all(torch.equal(a, b) for a, b in zip(stats, self._running_stats(), strict=True)), name
            calls.append(name)
            return result

        def _pick(self, *args: Any) -> Any:
            return self._guard("pick", super()._pick, *args)

        def _build_model(self, *args: Any) -> None:
            self._guard("model", super()._build_model, *args)

        def _check(self) -> bool:
            return bool(self._guard("check", super()._check))

    fit(Guarded(random_subset_size=0.1, tau=0.02), model=Normalised(), max_epochs=2)
    assert {"pick", "model", "check"} <= set(calls)


def _warnings_of_fit(callback: CrestCallback) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(callback, max_epochs=1)
    return [str(w.message) for w in record]


def _subset_warnings(phrase: str, size: float) -> tuple[list[str], list[str]]:
    """The warnings holding ``phrase`` of a CREST fit and of a random-baseline fit with ``random_subset_size=size``."""
    found = []
    for selection in ("crest", "random"):
        callback = CrestCallback(fraction=0.1, random_subset_size=size, tau=1e9, selection=selection)
        found.append([m for m in _warnings_of_fit(callback) if phrase in m])
    return found[0], found[1]


@pytest.mark.parametrize(("size", "warns"), [(0.01, True), (32, True), (33, False)])
def test_random_subsets_no_larger_than_the_global_batch_warn_that_crest_selects_nothing(
    size: float, warns: bool
) -> None:
    # 1% of 1200 is 12, raised to the global batch of 32: every coreset would be its whole subset.
    found, random = _subset_warnings("no more than the global batch", size)
    assert len(found) == warns
    if warns:
        assert f"`random_subset_size`={size} gives random subsets of r=32 examples" in found[0]
    assert not random  # the random baseline selects nothing anyway


@pytest.mark.parametrize(("size", "warns"), [(33, True), (63, True), (64, False)])
def test_random_subsets_under_twice_the_global_batch_warn_that_crest_selects_little(
    size: int, warns: bool
) -> None:
    # A coreset of 32 from 40 examples is nearly the whole subset: CREST pays for a selection it barely makes.
    found, random = _subset_warnings("less than twice the global batch", size)
    assert len(found) == warns
    if warns:
        assert (
            f"r={size} examples, less than twice the global batch of 32: each coreset keeps 32 of" in found[0]
        )
    assert not random


@pytest.mark.parametrize(
    ("batch_size", "size", "selection", "warns"),
    [(4, 120, "crest", True), (4, 12, "crest", False), (5, 120, "crest", False), (4, 120, "random", False)],
)
def test_random_subsets_many_times_a_coreset_with_few_picks_per_class_warn(
    batch_size: int, size: int, selection: str, warns: bool
) -> None:
    # Four classes: coresets of 4 have one pick per class, each standing for r / 4 examples (at batch 8 on
    # Fashion-MNIST, r = 100 trained to 74% against 82% for r = 20 and for random batches).
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback = CrestCallback(fraction=0.05, random_subset_size=size, tau=1e9, selection=selection)
        fit(callback, batch_size=batch_size, max_epochs=1)
    found = [str(w.message) for w in record if "at most one pick per class" in str(w.message)]
    assert len(found) == warns
    if warns:
        assert "r=120 examples for coresets of 4 over 4 classes" in found[0]
        assert "each standing for about 30 examples" in found[0]
        assert "of about 8 to 12" in found[0]


def test_a_training_set_smaller_than_a_global_batch_is_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"1200 examples, fewer than one global batch of 2000 .*lower the data"
    ):
        fit(CrestCallback(), batch_size=2000, max_epochs=1)


class Finetuned(TinyClassifier):
    """A backbone and a head; BackboneFinetuning freezes the backbone, then unfreezes it into the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = self.net[:2]
        self.head = self.net[2]

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


@pytest.mark.parametrize("hessian_every", [1, 3])
@pytest.mark.parametrize("hessian_params", ["all", "last_layer"])
def test_unfreezing_parameters_mid_run_models_the_new_set_afresh(
    hessian_params: str, hessian_every: int
) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    sizes: list[tuple[int, int]] = []

    class Sizes(CrestCallback):
        def _build_model(self, coresets: Tensor, weights: Tensor, loss: float) -> None:
            super()._build_model(coresets, weights, loss)
            sizes.append((self._trainer.current_epoch, len(self._quadratic.gradient)))  # type: ignore[union-attr]

    callback = Sizes(
        fraction=0.25, random_subset_size=0.1, hessian_params=hessian_params, hessian_every=hessian_every
    )
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    torch.manual_seed(0)
    model = Finetuned()
    trainer = make_trainer([callback, unfreeze], max_epochs=3)
    trainer.fit(model, datamodule=CrestDataModule(blobs(), batch_size=32))
    assert trainer.global_step == 3 * math.ceil(0.25 * 1200 / 32)
    head = sum(p.numel() for p in model.head.parameters())
    everything = sum(p.numel() for p in model.parameters())
    after = everything if hessian_params == "all" else head
    # The head alone until the backbone is unfrozen at epoch 1, then the new set from the first selection that
    # models it (at epoch 1's start, or at the next check, which fails on the changed set) to the end; with
    # `hessian_every` > 1, a fresh model is probed whatever the count of selections.
    switch = next(i for i, (epoch, size) in enumerate(sizes) if epoch >= 1 and size == after)
    assert {size for _, size in sizes[:switch]} == {head}
    assert {size for _, size in sizes[switch:]} == {after}
    assert sizes[switch][0] == 1


def test_a_shrinking_interval_plans_only_the_new_p_coresets() -> None:
    # With hessian_probes=None a selection picks the previous P coresets at once; when T1 shrinks, only the new
    # P = b * T1 of them are planned.
    class Shrinking(Recorder):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.intervals = itertools.chain([3], itertools.repeat(1))

        def _adapted_interval(self) -> int:
            return next(self.intervals)

    callback = Shrinking(random_subset_size=0.1, tau=0.0, coreset_mul=2, hessian_probes=None)
    fit(callback, max_epochs=2)
    assert [p for _, p, *_ in callback.adaptations][:3] == [2, 6, 2]
    assert [len(plan) for plan in callback.plans][:3] == [2, 6, 2]


def test_each_selection_reads_its_check_sample_under_its_own_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # An example drawn into the check samples of two selections gets fresh random views at each.
    fetch = CrestDataModule.fetch
    seeds: set[int] = set()

    def recorded_fetch(self: CrestDataModule, indices: list[int], seed: int | None = None) -> Any:
        if seed is not None:
            seeds.add(seed)
        return fetch(self, indices, seed)

    monkeypatch.setattr(CrestDataModule, "fetch", recorded_fetch)
    callback = Recorder(random_subset_size=0.1, tau=0.0, interval_mul=1e-6)
    fit(callback, max_epochs=1)
    assert len(callback.steps("select")) > 1
    assert len(seeds) == len(callback.steps("select"))


def test_seeds_apart_only_above_32_bits_read_other_views_of_the_check_sample() -> None:
    # The items' views come from item_seed(check seed, index), which keeps 64 bits of the check seed: every bit of
    # the seed must reach those 64 bits, or seeds 1 and 1 + 2**32 read the same views.
    class FirstCheckSeed(CrestCallback):
        first: int | None = None

        def _select_coresets(self) -> None:
            super()._select_coresets()
            self.first = self._check_seed if self.first is None else self.first

    views = []
    for seed in (1, 1 + 2**32):
        callback = FirstCheckSeed(random_subset_size=0.1, seed=seed)
        fit(callback, max_epochs=1)
        assert callback.first is not None
        views.append({item_seed(callback.first, index) for index in range(1200)})
    assert views[0].isdisjoint(views[1])


def test_a_state_loaded_by_hand_keeps_its_seed_and_generator_without_a_seed_given() -> None:
    # Loaded before the fit into a fresh callback with seed=None, the state's seed and generator go on: the fit
    # draws as a callback given the checkpoint's seed explicitly does.
    saved = CrestCallback(random_subset_size=0.1, seed=7)
    fit(saved, max_epochs=1)
    state = saved.state_dict()
    draws = []
    for seed in (7, None):
        callback = RecordedDraws(random_subset_size=0.1, seed=seed)
        callback.load_state_dict(state)
        fit(callback, max_epochs=2)
        assert callback._seed == 7
        draws.append([drawn for _, drawn in callback.draws])
    assert len(draws[0]) == len(draws[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*draws))


def test_a_check_sample_of_one_example_per_process_is_accepted() -> None:
    callback = CrestCallback(random_subset_size=0.1, check_size=1)
    fit(callback, max_epochs=1)
    assert len(callback._check_indices) == 1
    assert callback._checks > 0
    assert math.isfinite(callback._rho)


def test_a_check_sample_that_is_the_whole_first_subset_is_accepted() -> None:
    callback = CrestCallback(random_subset_size=120, check_size=120, check_sample="subset", tau=1e9)
    trainer, _ = fit(callback, max_epochs=1)
    assert trainer.global_step == 4
    assert len(callback._check_indices.unique()) == 120


def test_a_training_set_of_exactly_one_global_batch_is_accepted() -> None:
    trainer, _ = fit(CrestCallback(tau=1e9), data=blobs(n=32), batch_size=32, max_epochs=2)
    assert trainer.global_step == 2


def test_random_batches_as_large_as_the_class_count_hold_each_class_by_its_share() -> None:
    # Four classes of about 300 in batches of 4: each class's share of a batch, near 1, rounded up or down.
    data = blobs()
    callback = RecordedDraws(selection="random")
    fit(callback, data=data, batch_size=4, max_epochs=1)
    share = 4 * torch.bincount(data.targets, minlength=4) / len(data.targets)
    assert callback.draws
    for _, drawn in callback.draws:
        for batch in drawn:
            counts = torch.bincount(data.targets[batch], minlength=4)
            assert bool((counts >= share.floor()).all() and (counts <= share.ceil()).all())


def test_the_random_baseline_draws_fresh_batches_every_epoch_and_excludes_nothing() -> None:
    callback = RecordedDraws(selection="random", drop_interval=1)
    fit(callback, max_epochs=3)
    assert len(callback.draws) == 3  # one draw of the epoch's batches per epoch
    assert not torch.equal(callback.draws[0][1], callback.draws[1][1])
    assert bool(callback.pool.all())
    assert callback.timings["exclusion"] == 0.0


def test_random_subsets_take_each_class_in_turn_as_a_loop_over_the_classes_does() -> None:
    # The draw's vectorised bookkeeping against the plain loop it replaces: subset k takes the next quotas[k, c]
    # members of class c (in the shuffled order) from where subset k - 1 stopped, wrapping round a small class; the
    # classes in order within each subset. Skewed pools, tiny classes, absent classes, one subset or several.
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for trial in range(200):
        num_classes = int(torch.randint(1, 40, (1,), generator=gen))
        n = int(torch.randint(num_classes, 2000, (1,), generator=gen))
        labels = (torch.rand(n, generator=gen) ** (1 + trial % 4) * num_classes).long()
        pool = torch.rand(n, generator=gen) < 0.2 + 0.8 * float(torch.rand(1, generator=gen))
        if int(pool.sum()) < 2:
            continue
        size = int(torch.randint(1, int(pool.sum()) + 1, (1,), generator=gen))
        count = int(torch.randint(1, 6, (1,), generator=gen))
        callback = CrestCallback()
        callback._pool, callback._labels, callback._num_classes = pool, labels, num_classes
        callback._generator = torch.Generator().manual_seed(trial)
        drawn = callback._draw(count, size)
        # The reference replays the draw's random numbers: the shuffle, then the quotas.
        replay = torch.Generator().manual_seed(trial)
        members = torch.nonzero(pool).flatten()
        shuffled = members[torch.randperm(len(members), generator=replay)]
        by_class = [shuffled[labels[shuffled] == c] for c in range(num_classes)]
        counts = torch.tensor([len(m) for m in by_class])
        if int((counts > 0).sum()) > size:
            continue  # uniform subsets, not stratified
        quotas = crest_callback.stratified_quotas(counts, size, count, replay)
        taken = [0] * num_classes
        expected = []
        for k in range(count):
            subset = []
            for c in range(num_classes):
                for _ in range(int(quotas[k, c])):
                    subset.append(int(by_class[c][taken[c] % len(by_class[c])]))
                    taken[c] += 1
            expected.append(subset)
        assert drawn.tolist() == expected, trial
        compared += 1
    assert compared > 150


def test_with_more_classes_than_picks_each_class_keeps_its_share_of_the_weight() -> None:
    # 40 classes, 16 picks: one large class (a share of about 5 picks per coreset), 39 small ones (about 0.3). Each
    # coreset's picks go to classes drawn in proportion to their sizes in its subset, within each class; a small
    # class's pick stands for r / m examples, a large class's picks for its members. Picked over the whole subset,
    # a pick took the weight of every class left out (up to a third of a step's loss on one example).
    gen = torch.Generator().manual_seed(0)
    targets = torch.where(
        torch.rand(2000, generator=gen) < 0.3, 0, torch.randint(1, 40, (2000,), generator=gen)
    )
    data = blobs(n=2000, num_classes=40)
    data = type(data)(data.tensors[0], targets)
    callback = Recorder(fraction=0.2, random_subset_size=240, tau=0.01)
    fit(callback, data=data, model=TinyClassifier(num_classes=40), batch_size=16, max_epochs=1)
    assert not callback._per_class
    r, m = 240, 16
    for _, subsets, _, subset_targets, coresets, weights in callback.picks:
        for subset, labels, coreset, weight in zip(subsets, subset_targets, coresets, weights):
            counts = torch.bincount(labels, minlength=40)
            share = counts * m / r
            picked = data.targets[coreset]
            per_class = torch.bincount(picked, minlength=40)
            assert bool((per_class >= share.floor()).all() and (per_class <= share.ceil()).all())
            assert set(coreset.tolist()) <= set(subset.tolist())
            # Each class picked from weighs as the examples it stands for, scaled by m / r: the weights average 1
            # over coresets (scaled to each one's own total, a small class's pick lost 1 / (m + 1) of its weight).
            classes = picked.unique()
            stands_for = torch.maximum(counts[classes].float(), torch.tensor(r / m))
            totals = torch.zeros(40).index_add_(0, picked, weight)[classes]
            ratios = totals / stands_for
            torch.testing.assert_close(ratios, torch.full_like(ratios, m / r), rtol=1e-5, atol=0)
    assert len(callback.picks) >= 3


def test_with_more_classes_than_picks_rare_classes_weigh_their_share_of_the_training_set() -> None:
    # 20 classes of 300 and 80 of 3, subsets of 200, coresets of 64: the 80 rare classes are 3.8% of the training
    # set. With a slot in every subset for a class too small for one, they took 10 times their share of the
    # coresets' weight.
    sizes = torch.tensor([300] * 20 + [3] * 80)
    targets = torch.repeat_interleave(torch.arange(100), sizes)
    data = blobs(n=len(targets), num_classes=100)
    data = type(data)(data.tensors[0], targets)
    callback = Recorder(
        fraction=0.05, random_subset_size=200, hessian_probes=None, tau=0.0, drop_learned=False
    )
    fit(callback, data=data, model=TinyClassifier(num_classes=100), batch_size=64, max_epochs=2)
    assert not callback._per_class
    rare = total = 0.0
    coresets = 0
    for _, _, _, _, picked, weights in callback.picks:
        for coreset, weight in zip(picked, weights):
            rare += float(weight[targets[coreset] >= 20].sum())
            total += float(weight.sum())
            coresets += 1
    assert coresets >= 40
    assert rare / total == pytest.approx(240 / 6240, abs=0.015)


def long_tailed_blobs() -> Any:
    # Three classes of 600 and one of 6: the small one is 0.33% of the training set, a third of a slot in subsets of
    # 100 and 5% of one in batches of 16.
    targets = torch.repeat_interleave(torch.arange(4), torch.tensor([600, 600, 600, 6]))
    data = blobs(n=len(targets))
    return type(data)(data.tensors[0], targets)


def test_a_class_too_small_for_a_slot_weighs_its_share_where_every_class_has_picks() -> None:
    # Four classes, coresets of 16: every class present in a subset has picks. A slot in every subset for the small
    # class gave it three times its share of the coresets' weight (1/100 of every coreset against 0.33%).
    data = long_tailed_blobs()
    callback = Recorder(
        fraction=0.5, random_subset_size=100, hessian_probes=None, tau=0.0, drop_learned=False
    )
    fit(callback, data=data, batch_size=16, max_epochs=2)
    assert callback._per_class
    rare = total = 0.0
    coresets = 0
    for _, _, _, _, picked, weights in callback.picks:
        for coreset, weight in zip(picked, weights):
            rare += float(weight[data.targets[coreset] == 3].sum())
            total += float(weight.sum())
            coresets += 1
    assert coresets >= 100
    assert rare / total == pytest.approx(6 / 1806, abs=0.0017)


def test_random_batches_hold_a_class_too_small_for_a_slot_in_proportion() -> None:
    # One slot in every batch of 16 gave the small class 1/16 of the random baseline's examples, 19 times its share.
    data = long_tailed_blobs()
    callback = RecordedDraws(selection="random", fraction=0.5)
    fit(callback, data=data, batch_size=16, max_epochs=3)
    batches = torch.cat([drawn.flatten() for _, drawn in callback.draws])
    assert len(batches) > 2500
    assert float((data.targets[batches] == 3).float().mean()) == pytest.approx(6 / 1806, abs=0.002)
