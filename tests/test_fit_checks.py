"""Checks at fit start, called directly: their boundaries and what they let through."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_crest import CrestDataModule
from lightning_crest._fit_checks import check_data_module, check_loader, warn_on_probabilities
from lightning_crest.sampler import MAX_READ_AHEAD, CoresetPlan, CoresetSampler

DATA = TensorDataset(torch.randn(64, 2), torch.arange(64) % 2)


def test_reading_ahead_exactly_the_batches_the_plan_keeps_is_allowed() -> None:
    # One worker's prefetch and the batch Lightning fetches ahead: 1024 can all be served again, 1025 cannot.
    prefetch = MAX_READ_AHEAD - 1
    check_data_module(CrestDataModule(DATA, batch_size=8, num_workers=1, prefetch_factor=prefetch), 64, 1)
    with pytest.raises(ValueError, match=rf"reads {MAX_READ_AHEAD + 1} batches ahead"):
        check_data_module(
            CrestDataModule(DATA, batch_size=8, num_workers=1, prefetch_factor=prefetch + 1), 64, 1
        )


def test_a_loader_reading_another_plan_is_refused() -> None:
    dm = CrestDataModule(DATA, batch_size=8)
    other = CoresetSampler(DATA, 8, plan=CoresetPlan(), steps_per_epoch=2)
    trainer: Any = SimpleNamespace(train_dataloader=DataLoader(DATA, batch_size=8, sampler=other))
    with pytest.raises(TypeError, match=r"does not read CREST's coresets"):
        check_loader(trainer, dm)
    ours = CoresetSampler(DATA, 8, plan=dm.plan, steps_per_epoch=2)
    trainer = SimpleNamespace(train_dataloader=DataLoader(DATA, batch_size=8, sampler=ours))
    check_loader(trainer, dm)


def test_one_row_that_sums_to_one_is_not_taken_for_probabilities() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_probabilities(torch.tensor([[0.25, 0.75]]))  # one example: too little to tell
    with pytest.warns(UserWarning, match=r"returned probabilities"):
        warn_on_probabilities(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
