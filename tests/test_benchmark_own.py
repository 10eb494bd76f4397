"""The benchmark on a workload of the user's own: ``--dataset`` and ``--model`` as ``module:function``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

pytest.importorskip("matplotlib")

from lightning_crest.benchmark import __main__ as bench

HERE = Path(__file__).parent
OWN = ["--dataset", "own_workload:data", "--model", "own_workload:model"]
# Short runs: 640 training examples, 20 per class in each random subset of 96.
SHORT = ["--epochs", "3", "--batch-size", "32", "--budget", "0.5", "--random-subset-size", "96"]
SHORT += ["--check-size", "32", "--seeds", "1"]


@pytest.fixture
def own_workload(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(HERE))
    import own_workload

    return own_workload


@pytest.fixture
def built(own_workload: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``num_classes`` of every model that ``own_workload:model`` builds."""
    sizes: list[int] = []
    original = own_workload.model

    def model(num_classes: int) -> nn.Module:
        sizes.append(num_classes)
        return original(num_classes)  # type: ignore[no-any-return]

    monkeypatch.setattr(own_workload, "model", model)
    return sizes


def test_every_method_trains_and_tests_a_model_of_ones_own_on_data_of_ones_own(
    built: list[int], tmp_path: Path
) -> None:
    output = tmp_path / "own.json"
    result = bench.main([*OWN, *SHORT, "--methods", "full,random,crest", "--output", str(output)])
    runs = {run["method"]: run for run in result["runs"]}
    assert set(runs) == {"full", "random", "crest"}
    # Four well-separated blobs: every method learns them.
    assert all(run["test_acc"] > 0.9 for run in runs.values()), {m: r["test_acc"] for m, r in runs.items()}
    assert runs["crest"]["selections"] > 0
    assert runs["full"]["steps"] == 3 * 20  # 640 examples in batches of 32, 3 epochs
    assert runs["random"]["steps"] == runs["crest"]["steps"] == 3 * 10
    # The classes are counted from the labels (0 to 3); one model for the check, one for the warm-up, one per run.
    assert built == [4] * 5
    config = json.loads(output.read_text())["config"]
    assert (config["dataset"], config["model"]) == ("own_workload:data", "own_workload:model")
    assert output.with_suffix(".png").is_file()


def test_a_given_number_of_classes_sizes_the_model(built: list[int]) -> None:
    argv = ["--dataset", "own_workload:data_with_classes", "--model", "own_workload:model", *SHORT]
    bench.main([*argv, "--methods", "random", "--epochs", "1"])
    assert built == [6] * 3


def test_inputs_that_are_not_one_tensor_reach_the_model_as_collated(own_workload: Any) -> None:
    # Each input is a (features, scale) pair; the model divides by the scale. --quick takes subsets of both
    # splits by class, which they have no `targets` attribute for.
    argv = ["--dataset", "own_workload:pair_data", "--model", "own_workload:pair_model", *SHORT]
    result = bench.main([*argv, "--quick", "--methods", "random,crest"])
    assert [run["method"] for run in result["runs"]] == ["random", "crest"]
    assert all(run["test_acc"] > 0.9 for run in result["runs"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--dataset", "own_workload"],
            "--dataset 'own_workload' is neither a built-in (fashion-mnist, cifar10, ",
        ),
        (
            ["--model", "resnet"],
            "--model 'resnet' is neither a built-in (small-cnn, resnet20, resnet18) nor ",
        ),
        (
            ["--dataset", "no_such_module_anywhere:data", "--model", "small-cnn"],
            "cannot find module no_such_module_anywhere; run the benchmark from the folder that holds it, or add "
            "that folder to PYTHONPATH",
        ),
        (["--dataset", "own_workload:missing", "--model", "small-cnn"], "own_workload has no 'missing'"),
        (
            ["--model", "own_workload:NOT_A_FUNCTION"],
            "--model own_workload:NOT_A_FUNCTION is not a function but 3",
        ),
        (["--dataset", "own_workload:data"], "is a data set of your own: name its network with --model"),
        (
            ["--dataset", "own_workload.py:data", "--model", "small-cnn"],
            "--dataset own_workload.py:data names a file; name its module: own_workload:data",
        ),
        ([*OWN, "--download"], "--download fetches the built-in data sets, not --dataset own_workload:data"),
    ],
)
def test_a_workload_that_cannot_be_used_is_a_usage_error(
    own_workload: Any, argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--dataset", "own_workload:one_split", "--model", "own_workload:model"],
            "--dataset own_workload:one_split returned TensorDataset; return (train, test) or (train, test, "
            "num_classes)",
        ),
        (
            ["--dataset", "own_workload:too_few_classes", "--model", "own_workload:model"],
            "gave num_classes=3, but its labels go up to 3; return an int above 3",
        ),
        (
            ["--dataset", "own_workload:data", "--model", "own_workload:not_a_model"],
            "--model own_workload:not_a_model returned a str, not a torch.nn.Module",
        ),
        (
            ["--dataset", "own_workload:float_test_labels", "--model", "own_workload:model"],
            "its test split: item 0 has target tensor(",
        ),
        (
            ["--dataset", "own_workload:negative_test_label", "--model", "own_workload:model"],
            "its test split: targets must be non-negative class indices, got -1",
        ),
        (
            ["--dataset", "own_workload:data", "--model", "small-cnn"],
            "--model small-cnn takes images, (channels, height, width) tensors, but the first training input is (8,)",
        ),
        (
            ["--dataset", "fashion-mnist", "--data-dir", "{tmp}", "--model", "own_workload:model"],
            "fashion-mnist not found in",
        ),
    ],
)
def test_what_the_functions_return_is_checked_before_the_first_run(
    own_workload: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], match: str
) -> None:
    def run_one(*args: Any) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(bench, "run_one", run_one)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([arg.format(tmp=tmp_path) for arg in argv])
    message = str(exit_info.value.code)
    assert message.startswith("python -m lightning_crest.benchmark: error: ")
    assert match in message


def test_the_command_imports_the_workload_from_the_current_folder() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-m", "lightning_crest.benchmark", *OWN, *SHORT, "--methods", "random"],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "own_workload:data / own_workload:model: 640 train, 200 test" in completed.stdout
    assert "random" in completed.stdout.splitlines()[-1] or "| random" in completed.stdout


def test_a_number_of_classes_from_numpy_is_taken(built: list[int]) -> None:
    argv = ["--dataset", "own_workload:numpy_classes", "--model", "own_workload:model", *SHORT]
    bench.main([*argv, "--methods", "random", "--epochs", "1"])
    assert built == [4] * 3


def test_a_module_that_fails_to_import_something_else_is_not_taken_for_a_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found, but its own import fails: the user's environment, told as it is, not "run from the folder that holds it".
    (tmp_path / "needs_a_package.py").write_text("import no_such_package_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_package_anywhere"):
        bench.parse_args(["--dataset", "needs_a_package:data", "--model", "small-cnn"])


def test_an_error_inside_a_model_of_ones_own_is_not_taken_for_a_failed_download(
    own_workload: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def model(num_classes: int) -> nn.Module:
        raise RuntimeError("the model's own bug")

    monkeypatch.setattr(own_workload, "model", model)
    monkeypatch.setattr(bench, "load_dataset", lambda *args, **kwargs: (*own_workload.data(), 4))
    with pytest.raises(RuntimeError, match="the model's own bug"):
        bench.main(["--download", "--model", "own_workload:model", "--methods", "random"])
