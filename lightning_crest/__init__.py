"""CREST coresets for data-efficient training with PyTorch Lightning."""

from lightning_crest.callback import CrestCallback
from lightning_crest.datamodule import CrestDataModule
from lightning_crest.losses import weighted_cross_entropy

__version__ = "0.1.0"

__all__ = ["CrestCallback", "CrestDataModule", "__version__", "weighted_cross_entropy"]
