"""CREST coresets for data-efficient training with PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_crest.losses import weighted_cross_entropy

if TYPE_CHECKING:
    from lightning_crest.callback import CrestCallback
    from lightning_crest.datamodule import CrestDataModule

__version__ = "0.1.0"

__all__ = ["CrestCallback", "CrestDataModule", "__version__", "weighted_cross_entropy"]


def __getattr__(name: str) -> Any:
    # The callback and the data module load Lightning when first asked for: the selection engine, the losses and the
    # quadratic model need only torch and NumPy.
    if name == "CrestCallback":
        from lightning_crest.callback import CrestCallback

        return CrestCallback
    if name == "CrestDataModule":
        from lightning_crest.datamodule import CrestDataModule

        return CrestDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
