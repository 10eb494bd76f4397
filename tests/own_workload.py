"""A workload of a user's own for the benchmark's ``--dataset`` and ``--model`` (``module:function``).

Four Gaussian blobs in 8 dimensions, served without a ``targets`` attribute, and an MLP. ``pair_data`` and
``pair_model`` give each input as a ``(features, scale)`` pair, a model input that is not one tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

CLASSES = 4


def _blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % CLASSES
    return centres[labels] + torch.randn(n, 8, generator=generator), labels


def data() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]]]:
    return TensorDataset(*_blobs(640, seed=1)), TensorDataset(*_blobs(200, seed=2))


def data_with_classes() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]], int]:
    return (*data(), 6)


def too_few_classes() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]], int]:
    return (*data(), 3)


def numpy_classes() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]], object]:
    import numpy as np

    return (*data(), np.int64(4))


def float_test_labels() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]]]:
    features, labels = _blobs(200, seed=2)
    return data()[0], TensorDataset(features, labels.float())


def negative_test_label() -> tuple[Dataset[tuple[Tensor, Tensor]], Dataset[tuple[Tensor, Tensor]]]:
    features, labels = _blobs(200, seed=2)
    labels[5] = -1
    return data()[0], TensorDataset(features, labels)


def model(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, num_classes))


class _Pairs(Dataset[tuple[tuple[Tensor, Tensor], Tensor]]):
    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        return (self.features[index], torch.tensor(2.0)), self.labels[index]


def pair_data() -> tuple[
    Dataset[tuple[tuple[Tensor, Tensor], Tensor]], Dataset[tuple[tuple[Tensor, Tensor], Tensor]]
]:
    return _Pairs(*_blobs(640, seed=1)), _Pairs(*_blobs(200, seed=2))


class _PairModel(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = model(num_classes)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        features, scale = inputs
        return self.net(features / scale[:, None])  # type: ignore[no-any-return]


def pair_model(num_classes: int) -> nn.Module:
    return _PairModel(num_classes)


def one_split() -> Dataset[tuple[Tensor, Tensor]]:
    return data()[0]


def not_a_model(num_classes: int) -> str:
    return "mlp"


NOT_A_FUNCTION = 3
