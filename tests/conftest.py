"""Shared test helpers: a small labelled data set and a tiny Lightning classifier."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_crest import CrestCallback, CrestDataModule, weighted_cross_entropy


class LabelledTensors(TensorDataset):
    """``(x, y)`` pairs with a ``targets`` attribute, like torchvision datasets."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        super().__init__(inputs, targets)
        self.targets = targets


def blobs(
    n: int = 1200, num_classes: int = 4, dim: int = 16, seed: int = 0, noise: float = 1.5
) -> LabelledTensors:
    """Overlapping Gaussian classes: learnable, but not so easy that the loss vanishes at once."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 1.5
    targets = torch.randint(0, num_classes, (n,), generator=gen)
    inputs = centres[targets] + noise * torch.randn(n, dim, generator=gen)
    return LabelledTensors(inputs, targets)


class TinyClassifier(L.LightningModule):
    def __init__(
        self, dim: int = 16, num_classes: int = 4, lr: float = 0.05, use_weights: bool = True
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, num_classes))
        self.lr = lr
        self.use_weights = use_weights

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, weights = batch
        logits = self(inputs)
        if not self.use_weights:
            return nn.functional.cross_entropy(logits, targets)
        return weighted_cross_entropy(logits, targets, weights)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_acc", (self(inputs).argmax(1) == targets).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Recorder(CrestCallback):
    """Keeps what happened at every selection, pick and check, for assertions."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, int]] = []
        self.adaptations: list[tuple[int, int, float, float]] = []
        self.plans: list[list[tuple[Tensor, Tensor]]] = []  # the plan right after each selection
        # (global step, subsets, their logits and targets at that moment, coresets, weights), one per `_pick`.
        self.picks: list[tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]] = []
        self.batches: list[tuple[Tensor, Tensor]] = []

    def _select_coresets(self) -> None:
        super()._select_coresets()
        self.events.append(("select", self._trainer.global_step if self._trainer else -1))
        q = self._quadratic
        self.adaptations.append(
            (self._interval, self._num_coresets, self._peak_curvature, q.curvature_norm())
        )
        self.plans.append([(i.clone(), w.clone()) for i, w in self._dm.plan.batches])

    def _pick(self, subsets: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        # The reference's input: logits of the module as it is now, in eval mode, read straight from the data set.
        module, trainer = self._module, self._trainer
        assert module is not None
        assert trainer is not None
        inputs, targets = self._dm.train_dataset[subsets]  # (k, r, d), (k, r)
        training = module.training
        module.eval()
        with torch.no_grad():
            logits = torch.stack([module(x.to(module.device)) for x in inputs]).cpu()
        module.train(training)
        coresets, weights, losses = super()._pick(subsets, *args)
        self.picks.append((trainer.global_step, subsets.clone(), logits, targets, coresets, weights))
        return coresets, weights, losses

    def _check(self) -> bool:
        drifted = super()._check()
        self.events.append(("check", self._trainer.global_step if self._trainer else -1))
        return drifted

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.batches.append((batch[0].detach().clone(), batch[2].detach().clone()))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)

    def steps(self, kind: str) -> list[int]:
        return [step for event, step in self.events if event == kind]


class RecordedDraws(CrestCallback):
    """Keeps every draw of random subsets (or random batches) with the pool it was drawn from."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.draws: list[tuple[Tensor, Tensor]] = []

    def _draw(self, count: int, size: int) -> Tensor:
        drawn = super()._draw(count, size)
        assert self._pool is not None
        self.draws.append((self._pool.clone(), drawn))
        return drawn


@pytest.fixture(autouse=True)
def no_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # `L.seed_everything` leaves its seed in the environment, where CREST's default seeds read it: every test
    # starts without one, whatever an earlier test seeded.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def make_trainer(callbacks: list[Any] | None = None, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks or [], **options)


def fit(
    callback: CrestCallback | None,
    *,
    data: LabelledTensors | None = None,
    model: L.LightningModule | None = None,
    batch_size: int = 32,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    torch.manual_seed(0)
    dm = CrestDataModule(data if data is not None else blobs(), batch_size=batch_size)
    model = model if model is not None else TinyClassifier()
    trainer = make_trainer([callback] if callback is not None else None, **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer, model


@pytest.fixture
def data() -> LabelledTensors:
    return blobs()


def benchmark_script(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
