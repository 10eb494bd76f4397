"""CrestDataModule on its own: argument checks, labels, and plain training once a CREST fit is over."""

from __future__ import annotations

import copy as copy_module
import pathlib
import pickle
import random
import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import LabelledTensors, TinyClassifier, blobs, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.distributed import batch_share, share


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": True}, "`batch_size` must be a positive int, got True"),
        ({"pin_memory": 0}, "`pin_memory` must be True or False, got 0"),
    ],
)
def test_bools_and_ints_are_not_taken_for_one_another(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrestDataModule(blobs(n=40), **kwargs)


@pytest.mark.parametrize("eval_batch_size", [0, -4, 2.5])
def test_eval_batch_size_must_be_positive(eval_batch_size: Any) -> None:
    with pytest.raises(ValueError, match=f"`eval_batch_size` must be a positive int, got {eval_batch_size}"):
        CrestDataModule(blobs(n=40), eval_batch_size=eval_batch_size)


@pytest.mark.parametrize("seed", [1.5, -1, 2**63, True])
def test_seed_must_be_an_int_in_range_or_none(seed: Any) -> None:
    # The plain epochs seed torch's generator with `seed + epoch`: 2**64 - 1 failed at the second epoch.
    with pytest.raises(
        ValueError, match=rf"`seed` must be an int in \[0, 2\*\*63\), or None .*; got {seed!r}"
    ):
        CrestDataModule(blobs(n=40), seed=seed)
    assert CrestDataModule(blobs(n=40), seed=2**63 - 1).seed == 2**63 - 1


def test_a_numpy_integer_seed_shuffles_plain_epochs() -> None:
    # torch's sampler seeds its generator with a Python int only: NumPy's is converted.
    dm = CrestDataModule(blobs(n=40), batch_size=8, seed=np.int64(3))
    assert type(dm.seed) is int
    first = [batch[1] for batch in dm.train_dataloader()]
    again = [batch[1] for batch in CrestDataModule(blobs(n=40), batch_size=8, seed=3).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_an_iterable_dataset_with_a_length_is_refused() -> None:
    class Stream(torch.utils.data.IterableDataset[tuple[Tensor, int]]):
        def __iter__(self) -> Any:
            return iter([(torch.zeros(2), 0)] * 4)

        def __len__(self) -> int:
            return 4

    with pytest.raises(
        TypeError, match="`train_dataset` must be a map-style dataset with a length, got Stream"
    ):
        CrestDataModule(Stream())


def test_eval_batch_size_defaults_to_the_batch_size() -> None:
    assert CrestDataModule(blobs(n=40), batch_size=16).eval_batch_size == 16


def test_targets_attribute_of_the_wrong_length() -> None:
    data = blobs(n=40)
    data.targets = data.targets[:30]
    with pytest.raises(ValueError, match="has 30 labels for 40 items"):
        _ = CrestDataModule(data).labels


class Relabelled(LabelledTensors):
    """Items whose targets a transform changes, while ``targets`` keeps the raw labels (torchvision's way)."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        return inputs, (target + 1) % 4


def test_targets_attribute_that_disagrees_with_the_items() -> None:
    data = blobs(n=40)
    with pytest.raises(ValueError, match=r"`train_dataset.targets\[0\]` is .* but item 0 has target"):
        _ = CrestDataModule(Relabelled(data.tensors[0], data.targets)).labels


def test_labels_without_a_targets_attribute_are_read_from_the_items() -> None:
    data = blobs(n=40)
    plain = torch.utils.data.TensorDataset(*data.tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a small set is read without a word
        assert torch.equal(CrestDataModule(plain).labels, data.targets)


def test_reading_the_labels_of_a_large_set_item_by_item_is_announced() -> None:
    targets = torch.arange(10_001) % 3
    plain = torch.utils.data.TensorDataset(torch.zeros(10_001, 1), targets)
    with pytest.warns(
        UserWarning, match=r"no `targets` attribute: CREST reads the class of each of its 10001 items"
    ):
        assert torch.equal(CrestDataModule(plain).labels, targets)
    labelled = LabelledTensors(torch.zeros(10_001, 1), targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(CrestDataModule(labelled).labels, targets)


class NumpyTargets(torch.utils.data.Dataset[tuple[Tensor, np.int64]]):
    """Items whose targets are numpy integers, as a dataset indexing a numpy array returns them."""

    def __init__(self, data: LabelledTensors, dtype: Any = np.int64) -> None:
        self.inputs, self.targets_np = data.tensors[0], data.targets.numpy().astype(dtype)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, np.int64]:
        return self.inputs[index], self.targets_np[index]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_numpy_integer_targets_are_class_indices(dtype: Any) -> None:
    # Other widths than int64 reach the training step (and CREST's own passes) as int64, as torch's losses need.
    data = blobs(n=320)
    dm = CrestDataModule(NumpyTargets(data, dtype), batch_size=32)
    assert torch.equal(dm.labels, data.targets)
    seen = []

    class Seen(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(batch[1].dtype)
            return super().training_step(batch, batch_idx)

    model = Seen()
    trainer = make_trainer([CrestCallback(fraction=0.2, random_subset_size=0.2)], max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert seen == [torch.int64] * 4
    assert dm.fetch([0, 1])[1].dtype == torch.int64


def test_a_new_training_set_is_checked_and_its_labels_read() -> None:
    dm = CrestDataModule(blobs(n=320), batch_size=32)
    assert torch.equal(dm.labels, blobs(n=320).targets)
    other = blobs(n=320, num_classes=3, seed=5)
    dm.train_dataset = other
    assert torch.equal(dm.labels, other.targets)
    with pytest.raises(TypeError, match="`train_dataset` items must be \\(input, target\\) pairs"):
        dm.train_dataset = torch.utils.data.TensorDataset(torch.zeros(4, 2))
    assert dm.train_dataset is other


def test_int32_tensor_targets_are_class_indices() -> None:
    data = blobs(n=320)
    dm = CrestDataModule(LabelledTensors(data.tensors[0], data.targets.int()), batch_size=32)
    trainer = make_trainer([CrestCallback(fraction=0.2, random_subset_size=0.2)], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 4
    assert dm.fetch([0, 1])[1].dtype == torch.int64


@pytest.mark.parametrize("first", ["crest", "random", "crest then none"])
def test_a_new_callback_on_a_used_data_module_starts_afresh(first: str) -> None:
    def crest_fit(dm: CrestDataModule) -> TinyClassifier:
        torch.manual_seed(0)
        model = TinyClassifier()
        make_trainer([CrestCallback(random_subset_size=0.1, tau=0.02)], max_epochs=2).fit(
            model, datamodule=dm
        )
        return model

    used = CrestDataModule(blobs(), batch_size=32)
    selection = "random" if first == "random" else "crest"
    make_trainer([CrestCallback(selection=selection)], max_epochs=1).fit(TinyClassifier(), datamodule=used)
    if first == "crest then none":
        make_trainer(max_epochs=1).fit(TinyClassifier(), datamodule=used)
    model, reference = crest_fit(used), crest_fit(CrestDataModule(blobs(), batch_size=32))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


def test_predict_dataset() -> None:
    data = blobs(n=100)
    dm = CrestDataModule(data, predict_dataset=torch.utils.data.TensorDataset(data.tensors[0]), batch_size=32)
    model = TinyClassifier()
    model.predict_step = lambda batch, batch_idx: model(batch[0])  # type: ignore[method-assign]
    predictions = make_trainer(max_epochs=1).predict(model, datamodule=dm)
    assert predictions is not None
    with torch.no_grad():  # every item once, in order
        torch.testing.assert_close(torch.cat(predictions), model(data.tensors[0]))  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="without a `predict_dataset`; pass one"):
        make_trainer(max_epochs=1).predict(model, datamodule=CrestDataModule(data))


def test_validation_runs_only_with_a_validation_set() -> None:
    dm = CrestDataModule(blobs(n=64), batch_size=32)
    trainer = make_trainer(max_epochs=1)
    with pytest.warns(UserWarning, match="no `val_dataloader`. Skipping val loop") as caught:
        trainer.fit(TinyClassifier(), datamodule=dm)
    assert not any("across ranks is zero" in str(w.message) for w in caught)
    assert "val_acc" not in trainer.callback_metrics
    dm.val_dataset = blobs(n=48, seed=1)  # set later: validation runs on it, every item once
    trainer = make_trainer(max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.num_val_batches == [2]
    assert "val_acc" in trainer.callback_metrics
    dm.val_dataset = None
    trainer = make_trainer(max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert "val_acc" not in trainer.callback_metrics


def test_a_subclass_keeps_its_own_val_dataloader_without_a_validation_set() -> None:
    class OwnValidation(CrestDataModule):
        def val_dataloader(self) -> Any:
            return DataLoader(blobs(n=48, seed=1), batch_size=16)

    dm = OwnValidation(blobs(n=64), batch_size=32)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.num_val_batches == [3]
    assert "val_acc" in trainer.callback_metrics


def test_a_fit_without_the_callback_after_a_crest_fit_trains_full_epochs() -> None:
    dm = CrestDataModule(blobs(n=320), batch_size=32)
    crest = make_trainer([CrestCallback(fraction=0.2, random_subset_size=0.2)], max_epochs=1)
    crest.fit(TinyClassifier(), datamodule=dm)
    assert crest.global_step == 2  # ceil(0.2 * 320 / 32)
    plain = make_trainer(max_epochs=1)
    plain.fit(TinyClassifier(), datamodule=dm)
    assert plain.global_step == 10  # every example once


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_fit_without_the_callback_after_a_failed_crest_fit_trains_full_epochs(failure: type) -> None:
    # Lightning skips `teardown` when a fit raises or is interrupted: the data module must still be released.
    class FailsAtStep2(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.trainer.global_step == 2:
                raise failure("stop")
            return super().training_step(batch, batch_idx)

    dm = CrestDataModule(blobs(n=320), batch_size=32)
    crest = make_trainer([CrestCallback(fraction=0.5, random_subset_size=0.2)], max_epochs=1)
    # Lightning shuts down on an interrupt and exits.
    with pytest.raises(SystemExit if failure is KeyboardInterrupt else failure):
        crest.fit(FailsAtStep2(), datamodule=dm)
    assert crest.global_step == 2
    plain = make_trainer(max_epochs=1)
    plain.fit(TinyClassifier(), datamodule=dm)
    assert plain.global_step == 10  # every example once, in plain shuffled batches
    assert dm.steps_per_epoch is None


@pytest.mark.parametrize(("total", "world_size"), [(20, 8), (18, 8), (128, 3), (5, 5), (300, 2)])
def test_shares_are_balanced_and_cover_every_row(total: int, world_size: int) -> None:
    parts = [range(total)[share(total, rank, world_size)] for rank in range(world_size)]
    assert [i for part in parts for i in part] == list(range(total))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert min(map(len, parts)) >= 1


def test_batch_shares_interleave_the_picks() -> None:
    picks = list(range(12))
    shares = [picks[batch_share(rank, 3)] for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_loaders_use_their_batch_sizes_and_the_global_rank() -> None:
    data = blobs(n=40)
    dm = CrestDataModule(data, data, data, batch_size=8, eval_batch_size=16, predict_dataset=data)
    assert dm.train_dataloader().batch_size == 8
    assert [dm.val_dataloader().batch_size, dm.test_dataloader().batch_size] == [16, 16]
    assert dm.predict_dataloader().batch_size == 16
    dm.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=4,
        global_rank=2,
        local_rank=0,
        current_epoch=0,
        strategy=SimpleNamespace(broadcast=lambda seed, src: seed),
    )
    sampler = dm.train_dataloader().sampler
    assert (sampler.rank, sampler.num_replicas) == (2, 4)  # type: ignore[attr-defined]


def test_fetch_keeps_the_order_of_a_dataset_with_getitems() -> None:
    data = blobs(n=40)
    subset = torch.utils.data.Subset(data, range(40))
    subset.targets = data.targets  # type: ignore[attr-defined]
    inputs, targets = CrestDataModule(subset).fetch([5, 3, 7])
    assert torch.equal(targets, data.targets[[5, 3, 7]])
    assert torch.equal(inputs, data.tensors[0][[5, 3, 7]])


class DrawsFromEveryGenerator(LabelledTensors):
    """Every read adds a draw from torch's, NumPy's and Python's global generators, like random augmentations."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        noise = torch.rand(()) + float(np.random.rand()) + random.random()  # noqa: NPY002
        return inputs + noise, target


def test_fetch_with_a_seed_repeats_each_items_views_and_restores_the_generators() -> None:
    data = DrawsFromEveryGenerator(*blobs(n=40).tensors)
    dm = CrestDataModule(data)
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    seeded = dm.fetch([5, 3, 7], seed=11)[0]
    # The global generators are where they were: the seeded reads drew from generators of their own.
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])  # noqa: NPY002
    assert random.getstate() == states[2]
    # Each item's view depends on the seed and its index only, not on what is fetched with it or in which order.
    assert torch.equal(dm.fetch([7, 5], seed=11)[0], seeded[[2, 0]])
    assert not torch.equal(dm.fetch([5, 3, 7], seed=12)[0], seeded)
    # Without a seed each read is a fresh view, drawn from the global generators.
    assert not torch.equal(dm.fetch([5, 3, 7])[0], dm.fetch([5, 3, 7])[0])
    assert not torch.equal(torch.get_rng_state(), states[0])
    # The seeded views are views of the right items: the noise is one number per item, below 3.
    offset = seeded - data.tensors[0][[5, 3, 7]]
    assert torch.allclose(offset, offset[:, :1].expand_as(offset))
    assert bool(((offset > 0) & (offset < 3)).all())
    assert len(set(offset[:, 0].tolist())) == 3  # each item its own draw


class NumpyJitter(LabelledTensors):
    """Every read adds a draw from NumPy's global generator only."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        return inputs + float(np.random.rand()), target  # noqa: NPY002


def test_a_seeded_fetch_seeds_numpy_per_item_and_per_seed() -> None:
    data = NumpyJitter(*blobs(n=40).tensors)
    dm = CrestDataModule(data)

    def noise(seed: int) -> list[float]:
        return (dm.fetch([0, 1, 2], seed=seed)[0] - data.tensors[0][:3])[:, 0].tolist()

    assert noise(5) == noise(5)
    assert len(set(noise(5))) == 3
    assert not set(noise(5)) & set(noise(6))


def test_a_subset_with_int32_targets_is_fetched_with_int64_targets() -> None:
    # `random_split` gives a Subset, which reads its items through `__getitems__`.
    data = blobs(n=40)
    subset = torch.utils.data.Subset(LabelledTensors(data.tensors[0], data.targets.int()), range(40))
    inputs, targets = CrestDataModule(subset).fetch([5, 3, 7])
    assert targets.dtype == torch.int64
    assert torch.equal(targets, data.targets[[5, 3, 7]])
    assert torch.equal(inputs, data.tensors[0][[5, 3, 7]])


class OneRelabelled(LabelledTensors):
    """Items whose target differs from the ``targets`` attribute at one index only."""

    def __init__(self, data: LabelledTensors, index: int) -> None:
        super().__init__(data.tensors[0], data.targets)
        self.index = index

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        return inputs, (target + 1) % 4 if index == self.index else target


@pytest.mark.parametrize("index", [20, 39])
def test_targets_attribute_is_spot_checked_beyond_the_first_item(index: int) -> None:
    with pytest.raises(
        ValueError, match=rf"`train_dataset.targets\[{index}\]` is .* but item {index} has target"
    ):
        _ = CrestDataModule(OneRelabelled(blobs(n=40), index)).labels


class SwappedClasses(LabelledTensors):
    """Items of classes 1 and 2 swapped by a transform, ``targets`` keeping the raw labels; the items the labels are
    spot-checked at (0, n // 2, n - 1) are of class 0, which the transform keeps."""

    def __init__(self, data: LabelledTensors) -> None:
        targets = data.targets.clone()
        targets[[0, len(targets) // 2, len(targets) - 1]] = 0
        super().__init__(data.tensors[0], targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        return inputs, torch.where(target == 1, 2, torch.where(target == 2, 1, target))


def test_labels_that_disagree_with_items_the_spot_checks_miss_stop_the_first_selection() -> None:
    dataset = SwappedClasses(blobs(n=200))
    dm = CrestDataModule(dataset, batch_size=16)
    assert torch.equal(dm.labels, dataset.targets)  # read from the attribute, past its spot checks
    trainer = make_trainer([CrestCallback(fraction=0.25, random_subset_size=48, check_size=16)])
    with pytest.raises(
        ValueError, match=r"Training item \d+ has target [12], but CrestDataModule read its label as"
    ):
        trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 0


def test_targets_attribute_longer_than_the_data_set() -> None:
    data = blobs(n=40)
    data.targets = torch.cat([data.targets, data.targets[:5]])
    with pytest.raises(ValueError, match="has 45 labels for 40 items"):
        _ = CrestDataModule(data).labels


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (
            lambda t: t.reshape(-1, 1),
            TypeError,
            r"1-d sequence of integer classes, got dtype torch.int64 and shape",
        ),
        (
            lambda t: t.float(),
            TypeError,
            r"got dtype torch.float32 and shape \(40,\). Make it hold the class index",
        ),
        (lambda t: t > 1, TypeError, "got dtype torch.bool"),
        (lambda t: torch.where(t == 2, -1, t), ValueError, "non-negative class indices, got -1"),
        (
            lambda t: [("cat", "dog", "owl", "pig")[int(y)] for y in t],
            TypeError,
            r"`train_dataset.targets` must be a 1-d sequence of integer classes; torch cannot read \['[a-z]{3}', ",
        ),
    ],
    ids=["2-d", "float", "bool", "negative", "names"],
)
def test_bad_targets_attributes_are_refused(targets: Any, error: type[Exception], match: str) -> None:
    data = blobs(n=40)
    data.targets = targets(data.targets)
    with pytest.raises(error, match=match):
        _ = CrestDataModule(data).labels


def test_negative_targets_read_from_the_items_are_refused() -> None:
    data = blobs(n=40)
    labels = torch.where(torch.arange(40) == 30, -1, data.targets)  # item 0 is fine, a later one is not
    with pytest.raises(ValueError, match="non-negative class indices, got -1"):
        _ = CrestDataModule(torch.utils.data.TensorDataset(data.tensors[0], labels)).labels


def test_int32_targets_become_int64_labels() -> None:
    data = blobs(n=40)
    narrow = LabelledTensors(data.tensors[0], data.targets.int())
    labels = CrestDataModule(narrow).labels
    assert labels.dtype == torch.int64
    assert torch.equal(labels, data.targets)


@pytest.mark.parametrize("target", [True, np.bool_(True), torch.tensor(True), 1.0, torch.tensor([1])])
def test_targets_that_are_not_integer_scalars_are_refused(target: Any) -> None:
    items = [(torch.zeros(2), target)] * 4
    with pytest.raises(TypeError, match=r"targets must be integer class indices .* for item 0"):
        CrestDataModule(items)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_workers", [True, -1, 1.0])
def test_num_workers_must_be_a_non_negative_int(num_workers: Any) -> None:
    with pytest.raises(ValueError, match=f"`num_workers` must be a non-negative int, got {num_workers!r}"):
        CrestDataModule(blobs(n=40), num_workers=num_workers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 1, "prefetch_factor": 0}, r"`prefetch_factor` must be a positive int, got 0"),
        ({"num_workers": 1, "persistent_workers": 1}, r"`persistent_workers` must be True or False, got 1"),
        ({"prefetch_factor": 1}, r"`prefetch_factor`=1 applies to loader workers, but `num_workers` is 0"),
        (
            {"persistent_workers": True},
            r"`persistent_workers`=True applies to loader workers, but `num_workers` is 0",
        ),
    ],
)
def test_worker_options_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrestDataModule(blobs(n=40), **kwargs)


def test_worker_options_reach_every_loader() -> None:
    data = blobs(n=40)
    dm = CrestDataModule(data, data, num_workers=1, prefetch_factor=1, persistent_workers=False)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert (loader.prefetch_factor, loader.persistent_workers) == (1, False)
    default = CrestDataModule(data, data, num_workers=1)
    for loader in (default.train_dataloader(), default.val_dataloader()):
        assert (loader.prefetch_factor, loader.persistent_workers) == (2, True)
    assert not CrestDataModule(data, persistent_workers=False).train_dataloader().persistent_workers
    # Settled when a loader is built, as for `num_workers`: workers turned off later turn persistence off too.
    default.num_workers = 0
    assert not default.val_dataloader().persistent_workers


def test_a_crest_fit_with_one_batch_read_ahead_and_workers_started_each_epoch() -> None:
    callback = CrestCallback(random_subset_size=0.1, tau=0.01)
    torch.manual_seed(0)
    dm = CrestDataModule(blobs(), batch_size=32, num_workers=1, prefetch_factor=1, persistent_workers=False)
    trainer = make_trainer([callback], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 8
    assert callback._trained == dm.plan.served  # nothing left counted as read ahead
    assert callback._selections > 2


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_reading_ahead_more_batches_than_the_plan_keeps_is_refused_before_any_step(selection: str) -> None:
    # A mid-epoch checkpoint gives the batches read ahead back to the next loader: the plan keeps the last 1024.
    dm = CrestDataModule(blobs(), batch_size=32, num_workers=2, prefetch_factor=512)
    trainer = make_trainer([CrestCallback(random_subset_size=0.1, selection=selection)], max_epochs=1)  # type: ignore[arg-type]
    message = r"CrestDataModule\(num_workers=2, prefetch_factor=512\) reads 1025 batches ahead of training, more than"
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 0
    dm.prefetch_factor = 511
    trainer = make_trainer([CrestCallback(random_subset_size=0.1, selection=selection)], max_epochs=1)  # type: ignore[arg-type]
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 4


def test_plain_epochs_are_shuffled_with_the_seed_of_the_data_module() -> None:
    data = blobs(n=40)

    def order(seed: int | None, epoch: int) -> list[int]:
        sampler = CrestDataModule(data, batch_size=8, seed=seed).train_dataloader().sampler
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        keys = list(sampler)
        assert all(weight == 1.0 for _, weight in keys)
        return [index for index, _ in keys]

    reference = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    reference.set_epoch(1)
    assert order(7, 1) == list(reference)
    assert order(7, 1) != order(8, 1)
    assert sorted(order(8, 1)) == list(range(40))
    # By default, Lightning's global seed, as its own distributed sampler takes it (0 without one).
    assert order(None, 1) == order(0, 1)
    L.seed_everything(7, verbose=False)
    assert order(None, 1) == order(7, 1)
    assert order(8, 1) != order(7, 1)  # an explicit seed wins
    # Under DDP the processes shuffle with process 0's global seed, whatever theirs.
    dm = CrestDataModule(data, batch_size=8)
    dm.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=2, global_rank=1, current_epoch=1, strategy=SimpleNamespace(broadcast=lambda seed, src: 3)
    )
    served = [index for index, _ in dm.train_dataloader().sampler]  # type: ignore[attr-defined]
    reference = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    reference.set_epoch(1)
    assert served == list(reference)


def test_a_later_item_with_a_float_target_is_refused_when_labels_come_from_the_items() -> None:
    items = [(torch.zeros(2), 1)] * 3 + [(torch.zeros(2), 2.7)]
    dm = CrestDataModule(items)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"integer class indices \(scalars\), got 2.7 for item 3"):
        _ = dm.labels


class CountingReads(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A labelled dataset that counts the items read."""

    def __init__(self, data: LabelledTensors) -> None:
        self.data, self.targets, self.reads = data, data.targets, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        return self.data[index]


def test_labels_of_a_random_split_come_from_the_targets_under_it() -> None:
    data = blobs(n=60)
    parent = CountingReads(data)
    part, _ = torch.utils.data.random_split(parent, [40, 20], generator=torch.Generator().manual_seed(0))
    nested = torch.utils.data.Subset(part, list(range(0, 40, 2)))
    for dataset, indices in (
        (part, torch.as_tensor(part.indices)),
        (nested, torch.as_tensor(part.indices)[::2]),
    ):
        parent.reads = 0
        labels = CrestDataModule(dataset).labels
        assert torch.equal(labels, data.targets[indices])
        # The first item checked, then three spot checks of the attribute: no pass over the data.
        assert parent.reads <= 4
    parent.targets = data.targets.tolist()  # a list, as torchvision's datasets keep them
    assert torch.equal(CrestDataModule(part).labels, data.targets[torch.as_tensor(part.indices)])


def test_labels_of_a_concatenation_come_from_the_targets_of_its_parts() -> None:
    first, second = CountingReads(blobs(n=40)), CountingReads(blobs(n=30, seed=1))
    split, _ = torch.utils.data.random_split(second, [20, 10], generator=torch.Generator().manual_seed(0))
    joined = torch.utils.data.ConcatDataset([first, split])
    expected = torch.cat([first.targets, second.targets[torch.as_tensor(split.indices)]])
    for dataset, labels in (
        (joined, expected),
        (torch.utils.data.Subset(joined, [59, 0, 45]), expected[[59, 0, 45]]),
    ):
        first.reads = second.reads = 0
        assert torch.equal(CrestDataModule(dataset).labels, labels)
        assert first.reads + second.reads <= 4  # spot checks, no pass over the data
    # A part without targets: every item is read.
    plain = torch.utils.data.ConcatDataset(
        [first, torch.utils.data.TensorDataset(*blobs(n=30, seed=2).tensors)]
    )
    assert torch.equal(CrestDataModule(plain).labels, torch.cat([first.targets, blobs(n=30, seed=2).targets]))
    # A part whose `targets` are fewer than its items (those of another split, say): every item is read. Joined,
    # the targets would be 8 labels for 10 items that agree with them at the spot checks (0, 4 and 7).
    short = LabelledTensors(torch.zeros(6, 2), torch.tensor([0, 1, 0, 1, 0, 2]))
    short.targets = torch.tensor([0, 1, 0, 1])
    joined = torch.utils.data.ConcatDataset(
        [short, LabelledTensors(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]))]
    )
    assert CrestDataModule(joined).labels.tolist() == [0, 1, 0, 1, 0, 2, 0, 1, 2, 1]


class Halved(CountingReads):
    """Targets 0-3 mapped to 0-1 by the items, as a `target_transform` does; `targets` keeps the raw ones."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, target = super().__getitem__(index)
        return inputs, target // 2


def test_labels_of_a_split_whose_items_transform_the_targets_are_read_from_the_items() -> None:
    data = blobs(n=60)
    part = torch.utils.data.Subset(Halved(data), list(range(0, 60, 3)))
    assert torch.equal(CrestDataModule(part).labels, data.targets[::3] // 2)
    # On the dataset itself, such an attribute is refused: it is the user's to fix.
    with pytest.raises(ValueError, match="a `target_transform`"):
        _ = CrestDataModule(Halved(data)).labels


class Sequences(torch.utils.data.Dataset[tuple[Tensor, int]]):
    """Token sequences of different lengths; the class is the most frequent of 4 token groups."""

    def __init__(self, n: int = 600, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 4, (n,), generator=gen)
        lengths = torch.randint(3, 12, (n,), generator=gen)
        self.items = [
            (torch.randint(0, 5, (int(size),), generator=gen) + 5 * int(label), int(label))
            for size, label in zip(lengths, self.targets)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.items[index]


def pad(items: list[tuple[Tensor, int]]) -> tuple[dict[str, Tensor], Tensor]:
    tokens = torch.nn.utils.rnn.pad_sequence([x for x, _ in items], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x)) for x, _ in items], batch_first=True)
    return {"tokens": tokens, "mask": mask}, torch.tensor([y for _, y in items])


class BagOfTokens(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.seen: list[tuple[Tensor, Tensor]] = []  # lengths and weights of each training batch

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        mask = inputs["mask"].unsqueeze(-1)
        pooled = (self.embed(inputs["tokens"]) * mask).sum(1) / mask.sum(1)
        return self.net(pooled)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append((batch[0]["mask"].sum(1), batch[2]))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_acc", (self(inputs).argmax(1) == targets).float().mean())


def test_a_collate_fn_batches_variable_length_inputs_for_training_crest_and_evaluation() -> None:
    torch.manual_seed(0)
    dm = CrestDataModule(Sequences(), Sequences(n=200, seed=1), batch_size=32, collate_fn=pad)
    callback = CrestCallback(fraction=0.25, random_subset_size=100)
    model = BagOfTokens()
    trainer = make_trainer([callback], max_epochs=3)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3 * 5  # ceil(0.25 * 600 / 32) steps per epoch
    assert callback.statistics["selections"] >= 1
    # Training batches hold padded sequences of several lengths and carry the coreset's weights.
    assert {len(lengths) for lengths, _ in model.seen} == {32}
    assert all(len(lengths.unique()) > 1 for lengths, _ in model.seen)
    assert any(not torch.all(weights == 1) for _, weights in model.seen)
    for _, weights in model.seen:
        torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    assert trainer.validate(model, datamodule=dm)[0]["val_acc"] > 0.5
    inputs, targets = dm.fetch([0, 5, 7])
    assert inputs["tokens"].shape[0] == 3
    assert targets.tolist() == [Sequences().items[i][1] for i in (0, 5, 7)]


@pytest.mark.parametrize(
    ("collate_fn", "match"),
    [
        (
            lambda items: torch.stack([x for x, _ in items]),
            r"must return an \(inputs, targets\) pair, got Tensor",
        ),
        (
            lambda items: (torch.zeros(len(items), 2), [y for _, y in items]),
            r"as a \(3,\) tensor .* got list",
        ),
        (
            lambda items: (torch.zeros(len(items), 2), torch.zeros(len(items))),
            r"got shape \(3,\) torch.float32",
        ),
        (lambda items: (torch.zeros(len(items), 2), torch.ones(len(items), dtype=torch.bool)), "torch.bool"),
        (  # sorted, as before packing sequences: rows would be paired with other examples' weights and labels
            lambda items: default_collate(sorted(items, key=lambda item: -int(item[1]))),
            "`collate_fn` must keep the items' order",
        ),
    ],
)
def test_a_collate_fn_must_return_inputs_and_class_index_targets_in_order(
    collate_fn: Any, match: str
) -> None:
    data = LabelledTensors(torch.randn(40, 2), torch.arange(40) % 4)
    dm = CrestDataModule(data, batch_size=3, collate_fn=collate_fn)
    with pytest.raises((TypeError, ValueError), match=match):
        dm.fetch([0, 1, 2])
    dm.use_plan(None)
    with pytest.raises((TypeError, ValueError), match=match):
        next(iter(dm.train_dataloader()))


def test_a_seeded_fetch_seeds_the_collate_fn_too_and_restores_the_generators() -> None:
    def noisy(items: list[tuple[Tensor, Any]]) -> tuple[Tensor, Tensor]:
        inputs, targets = default_collate(items)
        return inputs + torch.rand(inputs.shape), targets  # a random augmentation applied to the batch

    dm = CrestDataModule(blobs(n=40), batch_size=4, collate_fn=noisy)
    state = torch.get_rng_state()
    first = dm.fetch([3, 1, 2], seed=7)[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # the global generator moves on; the seeded fetch does not depend on it
    assert torch.equal(dm.fetch([3, 1, 2], seed=7)[0], first)


def test_int32_targets_of_a_collate_fn_become_int64() -> None:
    def int32(items: list[tuple[Tensor, Any]]) -> tuple[Tensor, Tensor]:
        inputs, targets = default_collate(items)
        return inputs, targets.int()

    dm = CrestDataModule(blobs(n=40), batch_size=4, collate_fn=int32)
    assert dm.fetch([0, 1, 2])[1].dtype == torch.int64
    dm.use_plan(None)
    assert next(iter(dm.train_dataloader()))[1].dtype == torch.int64


def test_pin_memory_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`pin_memory` must be True or False, got 'no'"):
        CrestDataModule(blobs(n=40), pin_memory="no")  # type: ignore[arg-type]


def test_collate_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="`collate_fn` must be callable or None, got 'pad'"):
        CrestDataModule(blobs(n=40), collate_fn="pad")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_dataset": 32}, r"`val_dataset` must be a dataset or None, got int 32; pass the batch size as"),
        ({"test_dataset": 2.5}, r"`test_dataset` must be a dataset or None, got float 2.5.$"),
        (
            {"predict_dataset": DataLoader(blobs(n=8))},
            r"`predict_dataset` must be a dataset, got a DataLoader",
        ),
        (
            {"val_dataset": "data/val"},
            r"`val_dataset` must be a dataset, got the str 'data/val' \(a path\?\)",
        ),
        ({"test_dataset": b"test"}, r"`test_dataset` must be a dataset, got the bytes b'test' \(a path\?\)"),
        (
            {"val_dataset": [blobs(n=8), DataLoader(blobs(n=8))]},
            r"`val_dataset` must be a dataset or a list of datasets, got a list of DataLoaders; pass their",
        ),
        (
            {"predict_dataset": pathlib.Path("data")},
            r"`predict_dataset` must be a dataset, got the PosixPath PosixPath\('data'\) \(a path\?\)",
        ),
    ],
)
def test_evaluation_sets_must_be_datasets(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        CrestDataModule(blobs(n=40), **kwargs)
    dm = CrestDataModule(
        blobs(n=40), val_dataset=[(torch.zeros(16), 0)]
    )  # any sized sequence of items will do
    assert len(dm.val_dataloader().dataset) == 1  # type: ignore[arg-type]


class PerLoader(TinyClassifier):
    """Logs the loss of each evaluation loader under its own name; predicts each loader's batches' sizes."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _, targets = batch
        self.log("val_size", float(len(targets)), reduce_fx="sum", add_dataloader_idx=True)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _, targets = batch
        self.log("test_size", float(len(targets)), reduce_fx="sum", add_dataloader_idx=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> int:
        return len(batch[1])


def test_a_list_of_evaluation_sets_is_served_as_one_loader_each() -> None:
    # As LightningDataModule.from_datasets does: Lightning passes each loader's index to the step.
    dm = CrestDataModule(
        blobs(n=64),
        val_dataset=[blobs(n=24, seed=1), blobs(n=40, seed=2)],
        test_dataset=(blobs(n=8, seed=3), blobs(n=16, seed=4), blobs(n=32, seed=5)),
        predict_dataset=[blobs(n=20, seed=6)],
        batch_size=32,
        eval_batch_size=16,
    )
    trainer = make_trainer([CrestCallback(random_subset_size=0.5)], max_epochs=1)
    model = PerLoader()
    trainer.fit(model, datamodule=dm)
    assert [len(loader.dataset) for loader in trainer.val_dataloaders] == [24, 40]  # type: ignore[union-attr, arg-type]
    validated = trainer.validate(model, datamodule=dm, verbose=False)
    assert validated == [{"val_size/dataloader_idx_0": 24.0}, {"val_size/dataloader_idx_1": 40.0}]
    tested = trainer.test(model, datamodule=dm, verbose=False)
    assert [sum(result.values()) for result in tested] == [8.0, 16.0, 32.0]
    assert trainer.predict(model, datamodule=dm) == [16, 4]  # one loader: its predictions as they come
    # A list of items is one dataset, as before.
    items = CrestDataModule(blobs(n=40), val_dataset=[(torch.zeros(16), 0), (torch.ones(16), 1)])
    assert len(items.val_dataloader().dataset) == 2  # type: ignore[union-attr, arg-type]


def test_a_path_given_as_the_training_set_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"`train_dataset` must be a dataset, got the str 'data/train' \(a path\?\)"
    ):
        CrestDataModule("data/train")  # type: ignore[arg-type]


def test_a_data_loader_given_as_the_training_set_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"`train_dataset` must be a dataset, got a DataLoader; pass its `.dataset`"
    ):
        CrestDataModule(DataLoader(blobs(n=40), batch_size=10))


def test_without_a_validation_set_validation_stays_skipped_in_spawned_copies() -> None:
    # ddp_spawn sends the data module through multiprocessing's pickler, which rebuilds a `partial` without its
    # attributes: the stand-in for `val_dataloader` must still look like the base class's method there.
    from multiprocessing.reduction import ForkingPickler

    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = CrestDataModule(blobs(n=64), batch_size=32)
    for copy in (dm, pickle.loads(ForkingPickler.dumps(dm)), copy_module.deepcopy(dm)):
        assert not is_overridden("val_dataloader", copy)
        with pytest.raises(MisconfigurationException, match="created without a `val_dataset`"):
            copy.val_dataloader()
    dm.val_dataset = blobs(n=8)
    assert is_overridden("val_dataloader", pickle.loads(ForkingPickler.dumps(dm)))


def test_validate_without_a_validation_set_names_it() -> None:
    dm = CrestDataModule(blobs(n=64), batch_size=32)
    with pytest.raises(
        MisconfigurationException, match="CrestDataModule was created without a `val_dataset`"
    ):
        make_trainer().validate(TinyClassifier(), datamodule=dm)
