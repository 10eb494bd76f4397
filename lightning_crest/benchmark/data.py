"""Datasets for the benchmark: Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision.

Every dataset returned here exposes a ``targets`` attribute of integer class labels, which the CREST
selection code and :func:`subset` rely on for per-class bookkeeping.

Fashion-MNIST is served by default from :class:`InMemoryVisionDataset`: torchvision still reads the
idx files, but the images are normalised once into a float tensor instead of going through PIL and
``ToTensor`` for every item. Measured on a 2-core CPU (train split, random indices, 2000 items)::

                                            torchvision (PIL)    in-memory
    single item, dataset[i]                      ~84 us             ~2.2 us
    batch of 128 (list of 128 items)             ~10.9 ms           ~0.16 ms  (via __getitems__)
    batch of 128 through a DataLoader            ~11.2 ms           ~0.28 ms
    (num_workers=0, incl. default_collate)

Building the in-memory copy costs ~0.2 s and ~190 MB (float32) for the 60k training images.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

__all__ = [
    "DATASET_NAMES",
    "InMemoryVisionDataset",
    "LabelledSubset",
    "load_dataset",
    "subset",
]

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100")

FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
# Per-channel statistics of the training images (std over all pixels, not the mean of per-image stds).
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, ...] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, ...] = (0.2673, 0.2564, 0.2762)

FETCH_FASHION_MNIST_HINT = (
    "run scripts/fetch-fashion-mnist {data_dir} (uses the Debian package dataset-fashion-mnist) "
    "or pass download=True / --download on a machine with internet"
)
DOWNLOAD_CIFAR_HINT = "pass download=True (--download) on a machine with internet"
# torchvision opens its downloads without a timeout, so a network that drops packets would stall them for ever.
DOWNLOAD_TIMEOUT_S = 60.0


class InMemoryVisionDataset(Dataset[tuple[Tensor, int]]):
    """Pre-normalised images held in one float tensor, served by indexing.

    Items are ``(image, label)`` with ``image`` a ``(C, H, W)`` float tensor and ``label`` a Python
    ``int``, i.e. the same as a torchvision dataset with ``ToTensor`` + ``Normalize`` returns.
    :meth:`__getitems__` lets a :class:`~torch.utils.data.DataLoader` fetch a whole batch with a
    single indexing operation.

    Args:
        data: Images, shape ``(N, C, H, W)``, already converted and normalised.
        targets: Class labels, shape ``(N,)``.
        classes: Optional class names, mirroring torchvision's ``classes`` attribute.

    Raises:
        ValueError: If ``data`` and ``targets`` disagree in length or ``data`` is not 4-D.
    """

    def __init__(self, data: Tensor, targets: Tensor, classes: Sequence[str] | None = None) -> None:
        if data.dim() != 4:
            raise ValueError(f"data must have shape (N, C, H, W), got {tuple(data.shape)}")
        if len(data) != len(targets):
            raise ValueError(f"data has {len(data)} items but targets has {len(targets)}")
        self.data = data
        self.targets = targets.long()
        self.classes = list(classes) if classes is not None else []

    @classmethod
    def from_uint8(
        cls,
        images: Tensor,
        targets: Tensor | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] | None = None,
    ) -> InMemoryVisionDataset:
        """Build from raw ``uint8`` images exactly as ``ToTensor()`` then ``Normalize(mean, std)`` would.

        Args:
            images: ``uint8`` images, shape ``(N, H, W)`` (grey) or ``(N, H, W, C)``.
            targets: Class labels, length ``N``.
            mean: Per-channel mean subtracted after scaling to ``[0, 1]``.
            std: Per-channel standard deviation divided by afterwards.
            classes: Optional class names.

        Returns:
            The in-memory dataset.

        Raises:
            ValueError: If ``images`` is not ``uint8`` or has an unsupported shape.
        """
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.dim() == 3:
            chw = images.unsqueeze(1)
        elif images.dim() == 4:
            chw = images.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {tuple(images.shape)}")
        # Same operations in the same order as ToTensor (divide by 255) and Normalize (subtract, divide),
        # so items are bit-identical to the per-item torchvision path.
        data = chw.contiguous().float().div(255)
        mean_t = torch.as_tensor(mean, dtype=data.dtype).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=data.dtype).view(1, -1, 1, 1)
        data.sub_(mean_t).div_(std_t)
        return cls(data, torch.as_tensor(targets, dtype=torch.long), classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.data[index], int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Return the items at ``indices`` as a list of ``(image, label)`` tuples.

        ``DataLoader`` calls this instead of ``__getitem__`` per index and passes the list straight to
        its ``collate_fn``, so the return type must be a list of samples, not a collated batch.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.data[index].unbind(0)
        labels: list[int] = self.targets[index].tolist()
        return list(zip(images, labels, strict=True))


class LabelledSubset(Subset[Any]):
    """A :class:`~torch.utils.data.Subset` that also carries the labels of its items as ``targets``.

    Args:
        dataset: The full dataset.
        indices: Indices into ``dataset``.
        targets: Labels of the selected items, aligned with ``indices``.
    """

    def __init__(self, dataset: Dataset[Any], indices: Sequence[int], targets: Tensor) -> None:
        super().__init__(dataset, indices)
        self.targets = targets


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened inside the block (torchvision's downloads) a timeout, then restore the default."""
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(default)


def _spec(name: str) -> tuple[type[datasets.VisionDataset], tuple[float, ...], tuple[float, ...], int]:
    if name == "fashion-mnist":
        return datasets.FashionMNIST, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 10
    if name == "cifar10":
        return datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, 10
    if name == "cifar100":
        return datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, 100
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _missing_files(name: str, root: Path) -> list[Path]:
    """Files torchvision needs for ``name`` under ``root`` that do not exist.

    Uses the same class attributes torchvision checks (``resources`` for MNIST-style datasets,
    ``base_folder``/``train_list``/``test_list`` for CIFAR), so the check cannot drift from where
    torchvision actually reads. Content (md5) is left to torchvision.
    """
    if name == "fashion-mnist":
        raw = root / "FashionMNIST" / "raw"
        # torchvision reads the unpacked files: "train-images-idx3-ubyte.gz" -> "train-images-idx3-ubyte".
        wanted = [
            raw / os.path.splitext(os.path.basename(url))[0] for url, _ in datasets.FashionMNIST.resources
        ]
        # Older torchvision versions cached the data in processed/*.pt; those still load.
        processed = root / "FashionMNIST" / "processed"
        legacy = [
            processed / datasets.FashionMNIST.training_file,
            processed / datasets.FashionMNIST.test_file,
        ]
        if all(path.is_file() for path in legacy):
            return []
    else:
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        folder = root / cls.base_folder
        files = [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        wanted = [folder / file for file in files]
    return [path for path in wanted if not path.is_file()]


def load_dataset(
    name: str,
    data_dir: str | Path,
    *,
    download: bool = False,
    augment: bool = True,
    in_memory: bool | None = None,
) -> tuple[Dataset[Any], Dataset[Any], int]:
    """Load the train and test splits of a benchmark dataset.

    Args:
        name: One of :data:`DATASET_NAMES`: ``"fashion-mnist"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: Root directory, laid out as torchvision expects (e.g. ``DATA_DIR/FashionMNIST/raw``).
        download: Let torchvision download missing files (needs internet); a connection that stalls for
            :data:`DOWNLOAD_TIMEOUT_S` seconds fails (torchvision tries its other mirrors first), and the error
            is raised.
        augment: For CIFAR, apply ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip`` to the
            training split. Fashion-MNIST is never augmented.
        in_memory: Serve Fashion-MNIST from a pre-normalised :class:`InMemoryVisionDataset` instead of
            the per-item PIL pipeline. ``None`` means ``True`` for Fashion-MNIST; CIFAR only supports the
            torchvision pipeline because its augmentation is per item.

    Returns:
        ``(train, test, num_classes)``. Both datasets yield ``(image, label)`` with ``image`` a
        normalised ``(C, H, W)`` float tensor and expose ``targets``.

    Raises:
        ValueError: Unknown ``name``, or ``in_memory=True`` for CIFAR.
        FileNotFoundError: Files are missing and ``download`` is ``False``; the message says how to get them.
    """
    cls, mean, std, num_classes = _spec(name)
    if in_memory is None:
        in_memory = name == "fashion-mnist"
    if in_memory and name != "fashion-mnist":
        raise ValueError(f"in_memory=True is only supported for fashion-mnist, not {name!r}")

    root = Path(data_dir)
    if not download:
        missing = _missing_files(name, root)
        if missing:
            hint = FETCH_FASHION_MNIST_HINT if name == "fashion-mnist" else DOWNLOAD_CIFAR_HINT
            hint = hint.format(data_dir=root)
            raise FileNotFoundError(
                f"{name} not found in {root} (missing {missing[0]}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): {hint}"
            )

    train_ds: Dataset[Any]
    test_ds: Dataset[Any]
    # torchvision downloads missing files when a split is built; under a timeout, a stalled one fails.
    with _socket_timeout(DOWNLOAD_TIMEOUT_S) if download else nullcontext():
        if in_memory:
            # torchvision still parses the idx files; only the per-item PIL/ToTensor work is replaced.
            train_ds, test_ds = (
                InMemoryVisionDataset.from_uint8(split.data, split.targets, mean, std, split.classes)
                for split in (cls(root, train=train, download=download) for train in (True, False))
            )
            return train_ds, test_ds, num_classes
        normalize: list[Callable[..., Any]] = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        train_tf: list[Callable[..., Any]] = []
        if augment and name != "fashion-mnist":
            train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        train_ds = cls(
            root, train=True, download=download, transform=transforms.Compose(train_tf + normalize)
        )
        test_ds = cls(root, train=False, download=download, transform=transforms.Compose(normalize))
        return train_ds, test_ds, num_classes


def subset(dataset: Dataset[Any], fraction_or_count: float | int, seed: int = 0) -> LabelledSubset:
    """Draw a class-stratified random subset, e.g. for quick benchmark runs.

    Each class gets a share proportional to its frequency; rounding is settled by largest remainder so
    the size is exactly the one asked for. Indices are returned in ascending order so the subset does
    not depend on iteration order of the sampler that later shuffles it.

    Args:
        dataset: A dataset with a ``targets`` attribute (list or tensor of integer labels).
        fraction_or_count: A float in ``(0, 1]`` (fraction of the dataset) or an int in
            ``[1, len(dataset)]`` (number of items).
        seed: Seed of the random draw within each class.

    Returns:
        A :class:`LabelledSubset` whose ``targets`` is a ``LongTensor`` aligned with its indices.

    Raises:
        ValueError: If the dataset has no ``targets`` or the requested size is out of range.
    """
    raw_targets = getattr(dataset, "targets", None)
    if raw_targets is None:
        raise ValueError("subset needs a dataset with a `targets` attribute")
    targets = torch.as_tensor(raw_targets, dtype=torch.long)
    n = len(targets)
    if isinstance(fraction_or_count, bool) or not isinstance(fraction_or_count, int | float):
        raise ValueError(f"fraction_or_count must be a float or an int, got {fraction_or_count!r}")
    if isinstance(fraction_or_count, float):
        if not 0.0 < fraction_or_count <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction_or_count}")
        count = max(1, round(fraction_or_count * n))
    else:
        count = fraction_or_count
    if not 1 <= count <= n:
        raise ValueError(f"count must be in [1, {n}], got {count}")

    classes, class_sizes = torch.unique(targets, return_counts=True)
    quotas = class_sizes.double() * count / n
    alloc = quotas.floor().long()
    # Largest remainder: hand the leftover items to the classes that lost most to flooring.
    leftover = count - int(alloc.sum())
    if leftover > 0:
        alloc[torch.argsort(quotas - alloc, descending=True, stable=True)[:leftover]] += 1

    generator = torch.Generator().manual_seed(seed)
    chosen: list[Tensor] = []
    for cls, k in zip(classes.tolist(), alloc.tolist(), strict=True):
        members = torch.nonzero(targets == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    indices = torch.cat(chosen).sort().values
    return LabelledSubset(dataset, indices.tolist(), targets[indices])
