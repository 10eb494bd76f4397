"""Small image classifiers for the benchmark.

* :class:`SmallCNN`: a two-convolution network for 28x28 grey images (Fashion-MNIST).
* :func:`resnet20`: the CIFAR ResNet-20 of He et al. (2016), option-A (parameter-free) shortcuts.
* :func:`resnet18`: torchvision's ResNet-18 with the ImageNet stem replaced for 32x32 inputs.

Every model maps a ``(B, C, H, W)`` batch to logits of shape ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "MODEL_NAMES",
    "ResNetCifar",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "resnet18",
    "resnet20",
]


class SmallCNN(nn.Module):
    """Conv(32, 5x5) -> ReLU -> MaxPool -> Conv(64, 5x5) -> ReLU -> MaxPool -> FC(hidden) -> ReLU -> FC.

    The convolutions are unpadded, so a 28x28 input shrinks to 24 -> 12 -> 8 -> 4, giving a
    64 * 4 * 4 = 1024 feature vector. With 10 classes, one input channel and the default ``hidden=160``
    the model has 217,706 parameters (184,586 with ``hidden=128``).

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        hidden: Width of the hidden fully connected layer.
        image_size: Side of the (square) input images; sizes the first fully connected layer.

    Raises:
        ValueError: If ``image_size`` is too small for the two convolutions and poolings.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, hidden: int = 160, image_size: int = 28
    ) -> None:
        super().__init__()
        # Each stage: 5x5 valid convolution (-4), then 2x2 max-pooling (floor halving).
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 12, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(B, num_classes)`` for a batch of shape ``(B, in_channels, H, W)``."""
        out: Tensor = self.classifier(self.features(x))
        return out


class _BasicBlockA(nn.Module):
    """ResNet basic block with the option-A shortcut of He et al. (2016).

    When the block downsamples, the shortcut subsamples the input spatially and zero-pads the new
    channels instead of using a 1x1 convolution, which keeps ResNet-20 at the published ~0.27M
    parameters.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        # Split the padding across both sides of the channel dimension, as the original implementation.
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the two convolutions and add the shortcut."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with three stages of 16, 32 and 64 channels (He et al., 2016, section 4.2).

    Args:
        blocks_per_stage: ``n`` in the paper; depth is ``6n + 2`` (3 gives ResNet-20).
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
    """

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlockA(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        # He initialisation for the convolutions, as in the paper (and torchvision's ResNets).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(B, num_classes)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits: Tensor = self.fc(out)
        return logits


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """ResNet-20 for 32x32 images (about 0.27M parameters with 10 classes).

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Returns:
        The model.
    """
    return ResNetCifar(3, num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> tv_resnet.ResNet:
    """torchvision's ResNet-18 adapted for 32x32 images (about 11.2M parameters with 10 classes).

    The ImageNet stem (7x7 stride-2 convolution followed by max-pooling) would reduce a 32x32 image
    to 8x8 before the first block, so it is replaced by a 3x3 stride-1 convolution and no pooling.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Returns:
        The model.
    """
    model = tv_resnet.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# (num_classes, in_channels, image_size) -> model. The ResNets end in global average pooling and so
# accept any input size; only SmallCNN needs the size to dimension its first linear layer.
_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small-cnn": lambda num_classes, in_channels, image_size: SmallCNN(
        num_classes, in_channels, image_size=image_size
    ),
    "resnet20": lambda num_classes, in_channels, _: resnet20(num_classes, in_channels),
    "resnet18": lambda num_classes, in_channels, _: resnet18(num_classes, in_channels),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int, *, image_size: int = 28) -> nn.Module:
    """Build a model by name.

    Args:
        name: One of :data:`MODEL_NAMES`: ``"small-cnn"``, ``"resnet20"`` or ``"resnet18"``.
        num_classes: Number of output logits.
        in_channels: Channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        image_size: Side of the square input images (28 for Fashion-MNIST, 32 for CIFAR); only
            ``"small-cnn"`` depends on it.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    return builder(num_classes, in_channels, image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
