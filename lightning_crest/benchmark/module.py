"""The LightningModule every benchmark method trains: same model, optimizer and schedule for all."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_crest.losses import weighted_cross_entropy


def step_schedule(
    step: int, total: int, warmup: float = 0.1, milestones: tuple[float, ...] = (0.6, 0.85)
) -> float:
    """Learning-rate factor of the reference recipe: linear warm-up, then x0.1 at each milestone.

    Args:
        step: Optimizer steps taken so far.
        total: Optimizer steps of the whole run (under a budget: the budgeted steps).
        warmup: Share of ``total`` spent warming up.
        milestones: Shares of ``total`` after which the rate drops tenfold.
    """
    warmup_steps = max(1, round(warmup * total))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.1 ** sum(step >= m * total for m in milestones)


class Classifier(L.LightningModule):
    """Classifier trained on ``(inputs, targets, weights)`` batches with SGD and :func:`step_schedule`.

    Args:
        model: Network whose forward takes a batch of inputs (a tensor, or what the items' inputs collate to) and
            returns ``(B, C)`` logits.
        num_classes: Number of classes.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        memory_format: Layout of the model's weights and of every 4-d input batch. ``torch.channels_last`` (the
            benchmark's default) made the small CNN's forward pass 2.3x faster on a 2-core CPU than the default
            ``torch.contiguous_format`` (its first max-pooling alone was 5.8 ms of 12.9 ms per 128 images).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "memory_format"])
        self.memory_format = memory_format
        self.model = model.to(memory_format=memory_format)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, inputs: Any) -> Tensor:
        # Inputs as the items hold them: one tensor, or a tuple or dict of them for a model of one's own.
        if isinstance(inputs, Tensor) and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=self.memory_format)
        return self.model(inputs)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, weights = batch
        loss = weighted_cross_entropy(self(inputs), targets, weights)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.test_acc(self(inputs), targets)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step_schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
