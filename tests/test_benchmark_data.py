"""Tests for the benchmark datasets, the subset helper and the benchmark models."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

pytest.importorskip("torchvision")

from conftest import benchmark_script

from lightning_crest import CrestDataModule
from lightning_crest.benchmark.data import (
    DATASET_NAMES,
    InMemoryVisionDataset,
    LabelledSubset,
    load_dataset,
    subset,
)
from lightning_crest.benchmark.models import (
    MODEL_NAMES,
    SmallCNN,
    build_model,
    count_parameters,
    resnet18,
    resnet20,
)

FETCH_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch-fashion-mnist"
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory filled by the fetch script; skips when the Debian package is unavailable."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run scripts/fetch-fashion-mnist")
    root = tmp_path_factory.mktemp("data")
    result = subprocess.run(
        [str(FETCH_SCRIPT), str(root)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    if not all((root / "FashionMNIST" / "raw" / name).is_file() for name in RAW_FILES):
        pytest.skip(
            "Fashion-MNIST files unavailable: the Debian package dataset-fashion-mnist is not installed "
            f"and could not be installed ({result.stderr.strip()})"
        )
    return root


@pytest.fixture(scope="module")
def fashion(fashion_dir: Path) -> tuple[Dataset[Any], Dataset[Any], int]:
    return load_dataset("fashion-mnist", fashion_dir)


# --------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "in_channels", "size", "num_classes"),
    [
        ("small-cnn", 1, 28, 10),
        ("small-cnn", 3, 32, 100),
        ("resnet20", 3, 32, 10),
        ("resnet18", 3, 32, 100),
        ("resnet20", 1, 28, 7),
    ],
)
def test_models_return_logits(name: str, in_channels: int, size: int, num_classes: int) -> None:
    model = build_model(name, num_classes, in_channels, image_size=size)
    logits = model(torch.randn(3, in_channels, size, size))
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


def test_model_parameter_counts() -> None:
    # conv 1->32 5x5 (832) + conv 32->64 5x5 (51,264) + fc 1024->160 (164,000) + fc 160->10 (1,610).
    assert count_parameters(SmallCNN()) == 217_706
    # He et al. (2016) report 0.27M for ResNet-20 with option-A shortcuts.
    assert count_parameters(resnet20()) == 269_722
    # torchvision's ResNet-18 has 11,689,512; the 3x3 stem and the 10-way head make it ~11.17M.
    assert count_parameters(resnet18(10)) == 11_173_962


def test_small_cnn_other_image_size() -> None:
    model = SmallCNN(num_classes=10, in_channels=3, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(image_size=8)


def test_resnet18_keeps_resolution_in_stem() -> None:
    model = resnet18(10)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert stem.shape == (1, 64, 32, 32)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="valid names: small-cnn, resnet20, resnet18"):
        build_model("vgg11", 10, 3)
    assert set(MODEL_NAMES) == {"small-cnn", "resnet20", "resnet18"}


# ------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize(
    ("absent", "named"),
    [
        ({"matplotlib"}, "matplotlib, which is"),
        ({"torchvision", "matplotlib"}, "torchvision and matplotlib, which are"),
    ],
)
def test_benchmark_names_its_extra_when_a_dependency_is_missing(
    monkeypatch: pytest.MonkeyPatch, absent: set[str], named: str
) -> None:
    import lightning_crest.benchmark as package

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name in absent else find_spec(name, *args)
    )
    message = (
        f"The benchmark needs {named} not installed: pip install 'lightning-crest[vision]' (or '.[vision]' in a "
        "checkout)."
    )
    with pytest.raises(ImportError, match=re.escape(message)):
        importlib.reload(package)
    monkeypatch.undo()
    importlib.reload(package)


def test_fetch_script_is_idempotent(fashion_dir: Path) -> None:
    raw = fashion_dir / "FashionMNIST" / "raw"
    before = {name: (raw / name).stat().st_mtime_ns for name in RAW_FILES}
    result = subprocess.run([str(FETCH_SCRIPT), str(fashion_dir)], capture_output=True, text=True, check=True)
    assert "already present" in result.stdout
    assert {name: (raw / name).stat().st_mtime_ns for name in RAW_FILES} == before
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28


def test_fashion_mnist_in_memory(fashion: tuple[Dataset[Any], Dataset[Any], int]) -> None:
    train, test, num_classes = fashion
    assert num_classes == 10
    assert isinstance(train, InMemoryVisionDataset)
    assert isinstance(test, InMemoryVisionDataset)
    assert (len(train), len(test)) == (60000, 10000)
    for ds in (train, test):
        assert ds.targets.dtype == torch.long
        assert ds.targets.shape == (len(ds),)
        assert set(ds.targets.tolist()) == set(range(10))
    x, y = train[0]
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert isinstance(y, int)
    # The normalisation constants are the training-set statistics, so the result is ~standardised.
    assert abs(train.data.mean().item()) < 0.01
    assert abs(train.data.std().item() - 1.0) < 0.01


def test_in_memory_items_match_torchvision(
    fashion_dir: Path, fashion: tuple[Dataset[Any], Dataset[Any], int]
) -> None:
    mem_train, mem_test, _ = fashion
    tv_train, tv_test, _ = load_dataset("fashion-mnist", fashion_dir, in_memory=False)
    assert not isinstance(tv_train, InMemoryVisionDataset)
    pairs: list[tuple[Any, Any]] = [(mem_train, tv_train), (mem_test, tv_test)]
    for mem, tv in pairs:
        assert torch.equal(torch.as_tensor(tv.targets), mem.targets)
        for index in (0, 1, 1234, len(tv) - 1):
            x_tv, y_tv = tv[index]
            x_mem, y_mem = mem[index]
            assert y_mem == y_tv
            torch.testing.assert_close(x_mem, x_tv, rtol=0, atol=0)  # same ops, same order: bit-identical


def test_in_memory_dataloader_batches(fashion: tuple[Dataset[Any], Dataset[Any], int]) -> None:
    train = fashion[0]
    assert isinstance(train, InMemoryVisionDataset)
    items = train.__getitems__([5, 3, 5])
    assert [y for _, y in items] == [int(train.targets[i]) for i in (5, 3, 5)]
    torch.testing.assert_close(items[1][0], train[3][0], rtol=0, atol=0)

    loader = DataLoader(train, batch_size=128, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (128, 1, 28, 28)
    assert y.dtype == torch.long
    torch.testing.assert_close(x, train.data[:128], rtol=0, atol=0)
    assert torch.equal(y, train.targets[:128])


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid names: fashion-mnist, cifar10, cifar100"):
        load_dataset("mnist", tmp_path)
    assert DATASET_NAMES == ("fashion-mnist", "cifar10", "cifar100")


def test_missing_fashion_mnist_explains_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path)
    message = str(info.value)
    assert f"scripts/fetch-fashion-mnist {tmp_path}" in message
    assert "dataset-fashion-mnist" in message
    assert "download=True" in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_explains_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match="pass download=True"):
        load_dataset(name, tmp_path)
    with pytest.raises(ValueError, match="in_memory"):
        load_dataset(name, tmp_path, in_memory=True)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_downloads_run_under_a_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    # torchvision opens its downloads without a timeout: load_dataset gives its sockets one, and only for the download.
    import socket

    import lightning_crest.benchmark.data as bench_data

    seen: list[tuple[bool, float | None]] = []

    class Stalled:
        def __init__(self, root: Path, train: bool = True, download: bool = False, **kwargs: Any) -> None:
            seen.append((download, socket.getdefaulttimeout()))
            raise TimeoutError("timed out")

    monkeypatch.setattr(bench_data, "_spec", lambda _: (Stalled, (0.5,), (0.5,), 10))
    monkeypatch.setattr(bench_data, "_missing_files", lambda *_: [tmp_path / "missing"])
    before = socket.getdefaulttimeout()
    with pytest.raises(TimeoutError):
        load_dataset(name, tmp_path, download=True)
    assert seen == [(True, bench_data.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before  # restored, also when the download failed
    with pytest.raises(FileNotFoundError):  # no download: nothing is opened
        load_dataset(name, tmp_path)
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------- subset


class _Labels(Dataset[tuple[torch.Tensor, int]]):
    """Tiny labelled dataset whose item is its own index, to check what a subset serves."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), self.targets[index]


@pytest.fixture
def imbalanced() -> _Labels:
    # 600 / 300 / 100 items of classes 0 / 1 / 2, interleaved so that order carries no class signal.
    targets = [0] * 600 + [1] * 300 + [2] * 100
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    return _Labels([targets[i] for i in order])


def test_subset_is_stratified(imbalanced: _Labels) -> None:
    sub = subset(imbalanced, 0.1, seed=0)
    assert isinstance(sub, LabelledSubset)
    assert len(sub) == 100
    assert sub.targets.dtype == torch.long
    assert torch.bincount(sub.targets).tolist() == [60, 30, 10]
    # targets are aligned with the served items and indices are unique.
    assert len(set(sub.indices)) == len(sub)
    for position in (0, 50, 99):
        x, y = sub[position]
        assert y == int(sub.targets[position]) == imbalanced.targets[int(x.item())]


def test_subset_count_seed_and_validation(imbalanced: _Labels) -> None:
    sub = subset(imbalanced, 7, seed=3)
    assert len(sub) == 7
    # Largest remainder: quotas 4.2 / 2.1 / 0.7 -> 4 / 2 / 1.
    assert torch.bincount(sub.targets, minlength=3).tolist() == [4, 2, 1]
    assert list(subset(imbalanced, 0.2, seed=5).indices) == list(subset(imbalanced, 0.2, seed=5).indices)
    assert list(subset(imbalanced, 0.2, seed=5).indices) != list(subset(imbalanced, 0.2, seed=6).indices)
    assert len(subset(imbalanced, 1.0)) == 1000
    for bad in (0.0, 1.5, 0, 1001, True):
        with pytest.raises(ValueError, match="must be"):
            subset(imbalanced, bad)


def test_subset_of_in_memory_dataset_loads_batches(fashion: tuple[Dataset[Any], Dataset[Any], int]) -> None:
    train = fashion[0]
    assert isinstance(train, InMemoryVisionDataset)
    sub = subset(train, 0.01, seed=0)
    assert len(sub) == 600
    assert torch.bincount(sub.targets).tolist() == [60] * 10
    x, y = next(iter(DataLoader(sub, batch_size=64)))
    assert x.shape == (64, 1, 28, 28)
    assert torch.equal(y, sub.targets[:64])


def run_benchmark_script(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` with ``args``; return what it printed."""
    script = Path(__file__).parents[1] / "benchmarks" / name
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_check_script_runs_on_cpu() -> None:
    # The GPU check is run by hand on a GPU; its code path is exercised here on CPU and small sizes.
    args = [
        "--device",
        "cpu",
        "--n",
        "1500",
        "--epochs",
        "1",
        "--large",
        "3000",
        "--knn",
        "8",
        "--strategy",
        "ddp",
        "--fit-knn",
        "8",
    ]
    out = run_benchmark_script("gpu_check.py", *args)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    rows = {row[0]: row[1] for row in cells if len(row) == 2}
    assert rows["device"] == "cpu"
    assert rows["strategy, processes, process group"] == "ddp, 1, gloo"
    assert float(rows["CREST proxies time, s"]) > 0
    assert rows["fit's selection"] == "knn=8, torch"
    # The fit's subsets: r = 3% of 1500, raised to the global batch of 128.
    for pools in ("one pool", "ten pools"):
        assert float(rows[f"dense selection, ms per coreset (m=128 of r=128), {pools} per call"]) > 0
    assert float(rows["kNN selection, ms per coreset (m=128 of r=128, knn=8), one pool per call"]) > 0
    assert float(rows["median step time, ms"]) > 0
    assert int(rows["selections"]) >= 1


def test_weights_reach_the_batches_of_a_dataset_with_getitems() -> None:
    # InMemoryVisionDataset loads batches through __getitems__, a path of its own in WeightedDataset.
    dataset = InMemoryVisionDataset(torch.randn(64, 1, 4, 4), torch.arange(64) % 4)
    dm = CrestDataModule(dataset, batch_size=8)
    # Picks come in greedy order, not sorted: each keeps its own weight and place.
    picks = torch.tensor([13, 8, 15, 9, 12, 10, 14, 11])
    dm.plan.replace([(picks, torch.linspace(0.5, 1.5, 8))])
    dm.use_plan(1)
    ((inputs, targets, weights),) = list(dm.train_dataloader())
    torch.testing.assert_close(weights, torch.linspace(0.5, 1.5, 8))
    assert torch.equal(targets, picks % 4)
    assert torch.equal(inputs, torch.stack([dataset[i][0] for i in picks.tolist()]))


def test_many_classes_script_prints_every_run_and_the_means(fashion_dir: Path) -> None:
    out = run_benchmark_script(
        "many_classes.py",
        "--data-dir",
        str(fashion_dir),
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--per-class",
        "100",
    )
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    runs = [[cell.strip() for cell in row] for row in rows if len(row) == 7 and row[2].strip() == "0"]
    assert [(r[0], r[1]) for r in runs] == [
        ("balanced", "crest"),
        ("balanced", "random"),
        ("longtail", "crest"),
        ("longtail", "random"),
    ]
    for variant, method, _, accuracy, selections, tail_weight, tail_data in runs:
        assert 0 < float(accuracy) <= 100
        assert (int(selections) >= 1) if method == "crest" else selections == "-"
        # 100 images of each class; the long tail keeps 3 of each of its five classes.
        assert float(tail_data) == pytest.approx(0.5 if variant == "balanced" else 15 / 515, abs=1e-4)
        assert 0 < float(tail_weight) < 1
    assert len(re.findall(r"^\| \w+ \| \w+ \| [0-9.]+ ± [0-9.]+ \|$", out, re.M)) == 4
    # Without `--drop-interval` nothing is excluded in so few epochs (drop_interval=20): no pool table.
    assert "share of CREST's pool" not in out


def test_many_classes_script_prints_the_pool_shares_after_each_exclusion(fashion_dir: Path) -> None:
    args = [
        "--data-dir",
        str(fashion_dir),
        "--seeds",
        "1",
        "--epochs",
        "3",
        "--per-class",
        "200",
        "--lr",
        "0.05",
    ]
    out = run_benchmark_script(
        "many_classes.py", *args, "--sets", "longtail", "--methods", "crest", "--drop-interval", "1"
    )
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()]
    pools = [row for row in rows if len(row) == 14 and row[0] == "longtail"]
    assert pools, out
    # 200 images of each of classes 0-4, 6 of each of classes 5-9.
    data_share = torch.tensor([200.0] * 5 + [6.0] * 5) / 1030
    for _, seed, epoch, size, *ratios in pools:
        assert seed == "0"
        # Exclusions come as epochs 1 and 2 start (epochs from 0), after the window each one closes.
        assert int(epoch) in (1, 2)
        assert 515 <= int(size) < 1030
        shares = torch.tensor([float(r) for r in ratios]) * data_share
        # The pool's shares add up to 1; no class rises above the pool floor's 1 / min_pool_fraction.
        assert float(shares.sum()) == pytest.approx(1.0, abs=0.01)
        assert max(float(r) for r in ratios) <= 1030 / int(size) + 0.005


def test_easy_task_script_prints_a_row_per_tau_and_seed_and_the_random_baseline() -> None:
    out = run_benchmark_script(
        "easy_task.py", "--seeds", "1", "--epochs", "2", "--taus", "0.5", "2", "--size", "400"
    )
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()]
    runs = [row for row in rows if len(row) == 14 and row[7] == "0"]
    assert [row[0] for row in runs] == ["0.5", "2.0", "random"]
    for tau, selections, checks, *_, steps, overhead, _, _, loss, accuracy in runs:
        # 400 sequences at 10% in batches of 40: one step per epoch.
        assert steps == "2"
        assert 0 <= float(overhead.rstrip("%")) <= 100
        assert float(loss) > 0
        assert 0 <= float(accuracy) <= 100
        if tau != "random":
            made, failed = re.fullmatch(r"(\d+) \((\d+)\)", checks).groups()  # type: ignore[union-attr]
            assert int(selections) >= 1
            assert int(failed) <= int(made)
    summary = [row[0] for row in rows if len(row) == 6 and row[0] not in ("method", "---")]
    assert summary == ["crest, tau 0.5", "crest, tau 2.0", "random"]


def test_the_easy_tasks_label_says_whether_the_marker_occurs() -> None:
    easy_task = benchmark_script("easy_task")
    data = easy_task.Sequences(500, 12, seed=3)
    assert torch.equal(data.targets, (data.tokens == easy_task.MARKER).any(1).long())
    assert 0.4 < float(data.targets.float().mean()) < 0.6
    tokens, target = data[7]
    assert torch.equal(tokens, data.tokens[7])
    assert target == int(data.targets[7])


def test_step_cost_script_prints_both_layouts(fashion_dir: Path) -> None:
    out = run_benchmark_script(
        "step_cost.py", "--data-dir", str(fashion_dir), "--rounds", "1", "--batch", "32", "--subset", "70"
    )
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| c")]
    assert [row[0].strip() for row in rows] == ["contiguous", "channels_last"]
    for _, step, forward, ratio in rows:
        assert float(step) > 0
        assert float(forward) > 0
        assert float(ratio) == pytest.approx(float(forward) / float(step), rel=0.05)  # of rounded times
