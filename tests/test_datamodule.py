"""CrestDataModule on its own: argument checks, labels, and plain training once a CREST fit is over."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import LabelledTensors, TinyClassifier, blobs, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.distributed import batch_share, share


@pytest.mark.parametrize("eval_batch_size", [0, -4, 2.5])
def test_eval_batch_size_must_be_positive(eval_batch_size: Any) -> None:
    with pytest.raises(ValueError, match=f"`eval_batch_size` must be a positive int, got {eval_batch_size}"):
        CrestDataModule(blobs(n=40), eval_batch_size=eval_batch_size)


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
    assert torch.equal(CrestDataModule(plain).labels, data.targets)


class NumpyTargets(torch.utils.data.Dataset[tuple[Tensor, np.int64]]):
    """Items whose targets are numpy integers, as a dataset indexing a numpy array returns them."""

    def __init__(self, data: LabelledTensors) -> None:
        self.inputs, self.targets_np = data.tensors[0], data.targets.numpy()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, np.int64]:
        return self.inputs[index], self.targets_np[index]


def test_numpy_integer_targets_are_class_indices() -> None:
    data = blobs(n=320)
    dm = CrestDataModule(NumpyTargets(data), batch_size=32)
    assert torch.equal(dm.labels, data.targets)
    trainer = make_trainer([CrestCallback(fraction=0.2, random_subset_size=0.2)], max_epochs=2)
    trainer.fit(TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 4


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


def test_a_fit_without_the_callback_after_a_crest_fit_trains_full_epochs() -> None:
    dm = CrestDataModule(blobs(n=320), batch_size=32)
    crest = make_trainer([CrestCallback(fraction=0.2, random_subset_size=0.2)], max_epochs=1)
    crest.fit(TinyClassifier(), datamodule=dm)
    assert crest.global_step == 2  # ceil(0.2 * 320 / 32)
    plain = make_trainer(max_epochs=1)
    plain.fit(TinyClassifier(), datamodule=dm)
    assert plain.global_step == 10  # every example once


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
    dm.trainer = SimpleNamespace(world_size=4, global_rank=2, local_rank=0, current_epoch=0)  # type: ignore[assignment]
    sampler = dm.train_dataloader().sampler
    assert (sampler.rank, sampler.num_replicas) == (2, 4)  # type: ignore[attr-defined]


def test_fetch_keeps_the_order_of_a_dataset_with_getitems() -> None:
    data = blobs(n=40)
    subset = torch.utils.data.Subset(data, range(40))
    subset.targets = data.targets  # type: ignore[attr-defined]
    inputs, targets = CrestDataModule(subset).fetch([5, 3, 7])
    assert torch.equal(targets, data.targets[[5, 3, 7]])
    assert torch.equal(inputs, data.tensors[0][[5, 3, 7]])
