"""The CIFAR-10 and CIFAR-100 paths of the benchmark on tiny fake data in torchvision's on-disk format.

The files are pickled dicts laid out as torchvision's ``CIFAR10`` / ``CIFAR100`` read them. torchvision checks
their md5 sums against the real archives' files, so the tests swap in the md5 sums of the fake files (the
integrity checks themselves still run).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from torchvision import datasets

from lightning_crest.benchmark import __main__ as bench
from lightning_crest.benchmark.data import load_dataset

# The usual CIFAR training-set statistics, written out here rather than imported from the library.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DEFAULT_MODEL = {"cifar10": "resnet20", "cifar100": "resnet18"}
# Images per class in the fake train / test splits.
PER_CLASS = {"cifar10": (10, 3), "cifar100": (4, 1)}


@dataclass
class FakeCifar:
    """What was written for one dataset: the raw images and labels of each split, and the files' md5 sums."""

    name: str
    classes: list[str]
    train_images: np.ndarray  # uint8, (N, 3072): 1024 red, then 1024 green, then 1024 blue values
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    md5: dict[str, str]


def _split(num_classes: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Random uint8 images, ``per_class`` of each class, in shuffled order."""
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    images = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    return images, [int(label) for label in labels]


def _dump(path: Path, obj: dict[str, Any]) -> str:
    path.write_bytes(pickle.dumps(obj))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _splits(
    root: Path, name: str, rng: np.random.Generator
) -> tuple[Path, np.ndarray, list[int], np.ndarray, list[int]]:
    """The (new) folder torchvision reads ``name`` from, and fake train and test images and labels."""
    folder = root / (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100).base_folder
    folder.mkdir(parents=True)
    per_train, per_test = PER_CLASS[name]
    return folder, *_split(NUM_CLASSES[name], per_train, rng), *_split(NUM_CLASSES[name], per_test, rng)


def _write_cifar10(root: Path, rng: np.random.Generator) -> FakeCifar:
    folder, train_images, train_labels, test_images, test_labels = _splits(root, "cifar10", rng)
    classes = [f"class{c}" for c in range(10)]
    md5 = {}
    # Five training batches of uneven sizes; torchvision concatenates them in order.
    bounds = [0, 15, 35, 55, 80, len(train_labels)]
    for number, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        batch = {
            "batch_label": f"training batch {number} of 5",
            "labels": train_labels[lo:hi],
            "data": train_images[lo:hi],
        }
        md5[f"data_batch_{number}"] = _dump(folder / f"data_batch_{number}", batch)
    test = {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_images}
    md5["test_batch"] = _dump(folder / "test_batch", test)
    md5["batches.meta"] = _dump(folder / "batches.meta", {"label_names": classes, "num_vis": 3072})
    return FakeCifar("cifar10", classes, train_images, train_labels, test_images, test_labels, md5)


def _write_cifar100(root: Path, rng: np.random.Generator) -> FakeCifar:
    folder, train_images, train_labels, test_images, test_labels = _splits(root, "cifar100", rng)
    classes = [f"fine{c}" for c in range(100)]
    md5 = {}
    for file, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        split = {"data": images, "fine_labels": labels, "coarse_labels": [label // 5 for label in labels]}
        md5[file] = _dump(folder / file, split)
    meta = {"fine_label_names": classes, "coarse_label_names": [f"coarse{c}" for c in range(20)]}
    md5["meta"] = _dump(folder / "meta", meta)
    return FakeCifar("cifar100", classes, train_images, train_labels, test_images, test_labels, md5)


def _expect_fake_md5(monkeypatch: pytest.MonkeyPatch, fake: FakeCifar) -> None:
    """Make torchvision's integrity checks (data files and meta file) expect the fake files' md5 sums."""
    cls = datasets.CIFAR10 if fake.name == "cifar10" else datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [[file, fake.md5[file]] for file, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[file, fake.md5[file]] for file, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": fake.md5[cls.meta["filename"]]})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FakeCifar]]:
    """One data directory holding both fake datasets, as ``--data-dir`` expects."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    return root, {"cifar10": _write_cifar10(root, rng), "cifar100": _write_cifar100(root, rng)}


@pytest.fixture(params=["cifar10", "cifar100"])
def cifar(
    request: pytest.FixtureRequest,
    fake_root: tuple[Path, dict[str, FakeCifar]],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Path, FakeCifar]:
    """The data directory and one fake dataset, with torchvision expecting the fake files' md5 sums."""
    root, fakes = fake_root
    fake = fakes[request.param]
    _expect_fake_md5(monkeypatch, fake)
    return root, fake


def _normalised(images: np.ndarray, name: str) -> torch.Tensor:
    """ToTensor + Normalize with the CIFAR statistics, computed directly: ``(N, 3, 32, 32)`` floats."""
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS[name])
    return (torch.from_numpy(images).view(-1, 3, 32, 32).float() / 255 - mean) / std


def _crops_and_flips(image: np.ndarray, name: str) -> torch.Tensor:
    """Every output of RandomCrop(32, padding=4) + RandomHorizontalFlip for one raw image: ``(162, 3, 32, 32)``."""
    padded = np.zeros((3, 40, 40), dtype=np.uint8)  # zero padding of the uint8 image, before ToTensor
    padded[:, 4:36, 4:36] = image.reshape(3, 32, 32)
    crops = [padded[:, top : top + 32, left : left + 32] for top in range(9) for left in range(9)]
    views = np.stack(crops + [crop[:, :, ::-1] for crop in crops]).reshape(-1, 3 * 32 * 32)
    return _normalised(views, name)


def test_load_dataset_reads_fake_cifar(cifar: tuple[Path, FakeCifar]) -> None:
    root, fake = cifar
    train, test, num_classes = load_dataset(fake.name, root)
    assert num_classes == NUM_CLASSES[fake.name]
    assert (len(train), len(test)) == (len(fake.train_labels), len(fake.test_labels))  # type: ignore[arg-type]
    for ds, labels in ((train, fake.train_labels), (test, fake.test_labels)):
        assert list(ds.targets) == labels  # type: ignore[attr-defined]
        assert ds.classes == fake.classes  # type: ignore[attr-defined]

    # The test split is not augmented: every item is exactly the normalised raw image.
    expected = _normalised(fake.test_images, fake.name)
    for index in range(len(fake.test_labels)):
        x, y = test[index]
        assert x.shape == (3, 32, 32)
        assert x.dtype == torch.float32
        assert y == fake.test_labels[index]
        torch.testing.assert_close(x, expected[index], rtol=0, atol=1e-6)

    # Without augmentation the training split is served the same way.
    plain_train = load_dataset(fake.name, root, augment=False)[0]
    expected_train = _normalised(fake.train_images, fake.name)
    for index in (0, 1, len(fake.train_labels) - 1):
        x, y = plain_train[index]
        assert y == fake.train_labels[index]
        torch.testing.assert_close(x, expected_train[index], rtol=0, atol=1e-6)


def test_training_split_is_augmented(cifar: tuple[Path, FakeCifar]) -> None:
    root, fake = cifar
    train = load_dataset(fake.name, root)[0]
    torch.manual_seed(0)
    for index in (0, len(fake.train_labels) - 1):
        views = _crops_and_flips(fake.train_images[index], fake.name)
        reads = []
        for _ in range(8):
            x, y = train[index]
            assert x.shape == (3, 32, 32)
            assert y == fake.train_labels[index]
            # Each read is one padded crop of the image, possibly mirrored, normalised like the test split.
            distance = (views - x).abs().flatten(1).amax(1)
            assert distance.min() < 1e-5
            reads.append(int(distance.argmin()))
        # 8 draws out of 162 possible views: all equal would mean no randomness (chance ~3e-16 otherwise).
        assert len(set(reads)) > 1


# CREST needs a batch of at least one pick per class (100 for CIFAR-100) and a random subset of at least a batch.
# CIFAR-100 trains ResNet-20 instead of its default ResNet-18: CREST's Hessian probe alone takes ~6 s of ResNet-18
# on a 2-core CPU (ResNet-18 with 100 classes is covered by test_benchmark_data.test_models_return_logits).
@pytest.mark.parametrize(
    ("name", "model", "batch_size", "budget", "subset_size"),
    [("cifar10", None, 16, 0.2, 48), ("cifar100", "resnet20", 100, 0.25, 100)],
)
def test_benchmark_on_fake_cifar(
    fake_root: tuple[Path, dict[str, FakeCifar]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    model: str | None,
    batch_size: int,
    budget: float,
    subset_size: int,
) -> None:
    root, fakes = fake_root
    fake = fakes[name]
    _expect_fake_md5(monkeypatch, fake)
    output = tmp_path / "out" / "results.json"
    argv = ["--dataset", name, "--data-dir", str(root), "--methods", "random,crest", "--output", str(output)]
    argv += ["--epochs", "2", "--seeds", "1", "--batch-size", str(batch_size), "--budget", str(budget)]
    argv += ["--random-subset-size", str(subset_size), "--check-size", "16"]
    if model is not None:
        argv += ["--model", model]
    bench.main(argv)

    expected_model = model or DEFAULT_MODEL[name]
    n_train, n_test = len(fake.train_labels), len(fake.test_labels)
    # Trained and tested on every fake image (no --quick subsetting).
    assert f"{name} / {expected_model}: {n_train} train, {n_test} test" in capsys.readouterr().out
    result = json.loads(output.read_text())
    config = result["config"]
    assert (config["dataset"], config["model"], config["data_dir"]) == (name, expected_model, str(root))
    assert (config["methods"], config["epochs"], config["output"]) == (["random", "crest"], 2, str(output))
    runs = result["runs"]
    records = [(r["method"], r["budget"], r["seed"]) for r in runs]
    assert records == [("random", budget, 0), ("crest", budget, 0)]
    for run in runs:
        assert math.isfinite(run["test_acc"])
        assert 0.0 <= run["test_acc"] <= 1.0
        # Accuracy over the whole fake test split: a multiple of 1 / n_test.
        assert run["test_acc"] * n_test == pytest.approx(round(run["test_acc"] * n_test), abs=1e-3)
        # Both methods spend the same budget: ceil(budget * n_train / batch) steps per epoch, for 2 epochs.
        assert run["steps"] == 2 * math.ceil(budget * n_train / batch_size)
        assert (run["rel_error"], run["speedup"]) == (None, None)  # no full-data run to compare with
    random_run, crest_run = runs
    assert (random_run["selections"], random_run["crest_time_s"]) == (0, {})
    assert crest_run["selections"] >= 1
    assert crest_run["crest_time_s"]["proxies"] > 0
    assert crest_run["selection_trace"]
    assert output.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_default_cifar_models(name: str) -> None:
    assert bench.parse_args(["--dataset", name]).model == DEFAULT_MODEL[name]
    assert bench.parse_args(["--dataset", name, "--model", "small-cnn"]).model == "small-cnn"


@pytest.fixture
def use_fake(
    fake_root: tuple[Path, dict[str, FakeCifar]], monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], tuple[Path, FakeCifar]]:
    """Selects one fake dataset by name: its data directory and what was written, md5 sums expected."""

    def use(name: str) -> tuple[Path, FakeCifar]:
        root, fakes = fake_root
        _expect_fake_md5(monkeypatch, fakes[name])
        return root, fakes[name]

    return use


def test_a_batch_below_the_number_of_classes_runs(
    use_fake: Callable[[str], tuple[Path, FakeCifar]], tmp_path: Path
) -> None:
    # 100 classes in batches of 64: CREST picks its coresets over whole random subsets.
    root, _ = use_fake("cifar100")
    output = tmp_path / "r.json"
    argv = ["--dataset", "cifar100", "--data-dir", str(root), "--methods", "crest", "--batch-size", "64"]
    argv += ["--epochs", "1", "--seeds", "1", "--model", "resnet20", "--check-size", "32"]
    argv += ["--output", str(output)]
    bench.main(argv)
    (run,) = json.loads(output.read_text())["runs"]
    assert run["method"] == "crest"
    assert run["selections"] >= 1


@pytest.mark.filterwarnings("error:No artists with labels:UserWarning")  # the plot of a run without CREST
def test_quick_takes_the_whole_of_a_small_dataset(
    use_fake: Callable[[str], tuple[Path, FakeCifar]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, fake = use_fake("cifar10")
    output = tmp_path / "quick.json"
    argv = ["--dataset", "cifar10", "--data-dir", str(root), "--methods", "random", "--quick"]
    argv += ["--epochs", "1", "--batch-size", "20", "--output", str(output)]
    bench.main(argv)
    n_train, n_test = len(fake.train_labels), len(fake.test_labels)
    assert f"cifar10 / resnet20: {n_train} train, {n_test} test" in capsys.readouterr().out
    assert [run["method"] for run in json.loads(output.read_text())["runs"]] == ["random"]
