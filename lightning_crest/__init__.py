"""CREST coresets for data-efficient training with PyTorch Lightning."""

__version__ = "0.1.0"

__all__ = ["__version__"]
