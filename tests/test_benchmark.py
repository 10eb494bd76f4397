"""The benchmark command end to end on small synthetic images: its records, relative metrics, tables and plot."""

from __future__ import annotations

import json
import logging
import math
import re
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("matplotlib")

from conftest import benchmark_script

from lightning_crest import CrestCallback
from lightning_crest.benchmark import __main__ as bench
from lightning_crest.benchmark.data import InMemoryVisionDataset
from lightning_crest.benchmark.models import build_model
from lightning_crest.benchmark.module import Classifier

REQUIRED_KEYS = {
    "method",
    "budget",
    "seed",
    "test_acc",
    "rel_error",
    "train_time_s",
    "speedup",
    "selections",
    "overhead",
    "peak_memory_mb",
}
PARTS = {"proxies", "greedy", "hessian", "checks", "exclusion"}


def _images(n: int, seed: int) -> InMemoryVisionDataset:
    """Ten classes of 28x28 grey images: a class-specific bright square on noise, learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 10
    data = 0.5 * torch.randn(n, 1, 28, 28, generator=gen)
    for cls in range(10):
        row, col = divmod(cls, 5)
        data[targets == cls, :, 4 + 12 * row : 12 + 12 * row, 2 + 5 * col : 6 + 5 * col] += 2.0
    return InMemoryVisionDataset(data, targets)


def _use_images(monkeypatch: pytest.MonkeyPatch, train: int, test: int) -> None:
    """Make the benchmark load ``train`` and ``test`` synthetic images (:func:`_images`) for any data set."""

    def load(name: str, root: Any, download: bool = False) -> tuple[Any, Any, int]:
        return _images(train, seed=0), _images(test, seed=1), 10

    monkeypatch.setattr(bench, "load_dataset", load)


# One short CREST run on 256 images: the benchmark's options that other tests add to.
_ONE_CREST_RUN = ["--methods", "crest", "--epochs", "1", "--batch-size", "32", "--budget", "0.5"]
_ONE_CREST_RUN += ["--random-subset-size", "64", "--check-size", "32"]


def test_relative_error_is_signed_and_each_seed_orders_the_full_data_epochs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        {"method": "full", "seed": 0, "test_acc": 0.90, "train_time_s": 100.0},
        {"method": "random", "seed": 0, "test_acc": 0.918, "train_time_s": 10.0},
        {"method": "crest", "seed": 0, "test_acc": 0.891, "train_time_s": 20.0},
    ]
    bench.add_relative_metrics(runs)
    assert [r["rel_error"] for r in runs] == pytest.approx([0.0, -0.02, 0.01])
    assert [r["speedup"] for r in runs] == pytest.approx([1.0, 10.0, 5.0])

    _use_images(monkeypatch, 256, 64)
    seeds: list[int] = []

    class Recorded(bench.CrestDataModule):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seeds.append(self.seed)

    monkeypatch.setattr(bench, "CrestDataModule", Recorded)
    bench.main(
        ["--methods", "full", "--epochs", "1", "--batch-size", "64", "--seeds", "2", "--seed-offset", "3"]
    )
    assert seeds == [0, 3, 4]  # the untimed warm-up, then one run per seed


def test_benchmark_records_tables_and_plot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _use_images(monkeypatch, 640, 200)
    output = tmp_path / "results.json"
    argv = ["--epochs", "2", "--seeds", "2", "--batch-size", "32", "--budget", "0.25"]
    argv += ["--random-subset-size", "64", "--check-size", "32", "--output", str(output)]
    bench.main(argv)

    result = json.loads(output.read_text())
    assert result["machine"]["gpu"] is None  # the GPU's name, for --device cuda
    runs = result["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in bench.METHODS]
    for run in runs:
        assert set(run) >= REQUIRED_KEYS
        # The squares are learned: full data all but perfectly, a quarter of its steps well above chance (0.1).
        assert run["test_acc"] >= (0.95 if run["method"] == "full" else 0.5)
        assert run["train_time_s"] > 0
        assert run["peak_memory_mb"] > 0
        full = next(r for r in runs if r["method"] == "full" and r["seed"] == run["seed"])
        assert run["rel_error"] == pytest.approx((full["test_acc"] - run["test_acc"]) / full["test_acc"])
        assert run["speedup"] == pytest.approx(full["train_time_s"] / run["train_time_s"])
        if run["method"] == "full":
            assert (run["budget"], run["rel_error"], run["speedup"]) == (1.0, 0, 1)
        if run["method"].startswith("crest"):
            assert run["budget"] == 0.25
            assert run["selections"] >= 1
            assert 0 < run["overhead"] < 1
            parts = run["crest_time_s"]
            assert set(parts) == PARTS
            assert all(parts[p] > 0 for p in ("proxies", "greedy", "hessian", "checks"))
            # The parts are pieces of CREST's own time, itself a share (overhead) of the training time.
            assert sum(parts.values()) <= run["overhead"] * run["train_time_s"]
            assert run["selection_trace"]
            assert run["selection_trace"][-1][1] <= run["selections"]
        else:
            assert (run["crest_time_s"], run["selections"], run["overhead"]) == ({}, 0, 0)
            assert run["selection_trace"] == []
    # Full data trains 20 steps per epoch, the budgeted methods a quarter of that.
    assert {r["method"]: r["steps"] for r in runs if r["seed"] == 0} == {
        "full": 40,
        **{m: 10 for m in bench.METHODS if m != "full"},
    }

    printed = capsys.readouterr().out
    assert "| crest | 25% | 2 |" in printed
    assert "| crest-first-order | 25% |" in printed.split("CREST's own time by part")[1]
    assert output.with_suffix(".png").stat().st_size > 0


def test_benchmark_hides_lightnings_info_lines_unless_asked_for_progress(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _use_images(monkeypatch, 256, 64)
    caplog.set_level(logging.INFO)
    level = logging.getLogger("lightning.pytorch").level
    bench.main(_ONE_CREST_RUN)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lightning")] == []
    assert logging.getLogger("lightning.pytorch").level == level
    bench.main([*_ONE_CREST_RUN, "--progress"])
    assert any("GPU available" in r.getMessage() for r in caplog.records if r.name.startswith("lightning"))


def test_benchmark_options_and_seed_reach_the_callback() -> None:
    argv = ["--tau", "0.1", "--interval-mul", "2", "--coreset-mul", "1"]
    argv += [
        "--hessian-every",
        "4",
        "--hessian-subsample",
        "2",
        "--proxy-dtype",
        "bfloat16",
        "--embedding-proxy",
        "9",
    ]
    args = bench.parse_args(
        [*argv, "--random-subset-size", "300", "--check-size", "none", "--check-sample", "subset"]
    )
    for method in ("crest", "crest-no-drop", "crest-first-order"):
        callback = bench.make_callback(method, 0.1, 7, args)
        assert callback is not None
        options = (callback.tau, callback.interval_mul, callback.coreset_mul)
        assert (*options, callback.hessian_every, callback.hessian_subsample) == (0.1, 2, 1, 4, 2)
        assert (callback.random_subset_size, callback.check_size, callback.fraction) == (300, None, 0.1)
        assert callback.check_sample == "subset"
        assert callback.proxy_dtype == torch.bfloat16
        assert callback.embedding_proxy == 9
        assert (callback.drop_learned, callback.second_order) == (
            method != "crest-no-drop",
            method != "crest-first-order",
        )
        # Each seed draws its own random subsets, not only its own initial weights.
        assert callback.seed == 7
    random = bench.make_callback("random", 0.2, 3, args)
    assert random is not None
    assert (random.selection, random.fraction, random.seed) == ("random", 0.2, 3)
    assert bench.make_callback("full", 1.0, 0, args) is None


def test_benchmark_defaults_are_the_callbacks() -> None:
    args, callback = bench.parse_args([]), CrestCallback()
    # The paper's settings; the sizes of the samples CREST estimates from (r, the check, the probe) are the
    # benchmark's own, chosen from measurements (README, Results).
    names = ("tau", "interval_mul", "coreset_mul", "hessian_every")
    assert [getattr(args, name) for name in names] == [getattr(callback, name) for name in names]
    assert bench.PROXY_DTYPES[args.proxy_dtype] is callback.proxy_dtype is None
    assert args.embedding_proxy == callback.embedding_proxy == 0


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--hessian-every", "0"], "--hessian-every must be a positive int, got 0"),
        (["--hessian-subsample", "0"], "--hessian-subsample must be a positive int, got 0"),
        (["--coreset-mul", "0"], "--coreset-mul must be a positive int, got 0"),
        (
            ["--embedding-proxy", "-1"],
            "--embedding-proxy must be an int in [0, 65536] (0: the logits' gradient only; each example of a random "
            "subset gets about that many values more), got -1.",
        ),
        (["--tau", "-1"], "--tau must lie in [0.0, inf], got -1.0"),
        (["--tau", "inf"], "--tau must be finite, got inf"),
        (
            ["--seeds", "1.5"],
            "argument --seeds: must be an integer, got '1.5'",
        ),  # it named a private function
        (["--check-size", "1.5"], "argument --check-size: must be an integer, got '1.5'"),
        (["--budget", "x"], "argument --budget: must be a number, got 'x'"),
        (
            ["--seeds", "2", "--seed-offset", "4294967295"],  # the second seed's run failed after the first's
            "--seed-offset 4294967295 with --seeds 2 reaches seed 4294967296, beyond Lightning's largest seed",
        ),
        (["--random-subset-size", "2.5"], "a fraction in (0, 1] or a whole count such as 300, got 2.5"),
        (["--check-size", "0"], "argument --check-size: must be a positive integer, got 0"),
        (["--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
        (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        (["--batch-size", "-2"], "argument --batch-size: must be a positive integer, got -2"),
        (["--num-workers", "-1"], "argument --num-workers: must be 0 or more, got -1"),
        (["--lr", "0"], "argument --lr: must be a positive number, got 0"),
        (
            ["--budget", "0.1", "1.5"],
            "argument --budget: must be a fraction of full training in (0, 1], got 1.5",
        ),
        (["--methods", ","], "--methods names no method"),
        (["--methods", "crest,craig"], "unknown --methods ['craig']"),
        (["--output", "/dev/null/runs.json"], "--output /dev/null/runs.json: cannot create its folder"),
        (["--output", "runs.png"], "--output runs.png names the plot; name the JSON file"),
        (["--methods", "crest,random,crest"], "--methods lists crest more than once"),
        (["--budget", "0.1", "0.2", "0.1"], "--budget lists 0.1 more than once"),
    ],
)
def test_benchmark_refuses_bad_options_before_training(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch finds no CUDA device")
def test_benchmark_refuses_cuda_without_a_cuda_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "--device cuda: torch finds no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--check-size", "100"], "--check-size=100 exceeds the random subset size r=64"),
        (["--check-size", "100"], "or pass --check-size none to check on r examples"),
        (
            ["--random-subset-size", "300"],
            "--random-subset-size=300 must lie between the global batch (32) and",
        ),
        (
            ["--random-subset-size", "16"],
            "--random-subset-size=16 must lie between the global batch (32) and",
        ),
        (["--batch-size", "300"], "--batch-size 300 is larger than the 256 training examples"),
    ],
)
def test_options_that_do_not_fit_the_training_set_are_refused_before_the_first_run(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], match: str
) -> None:
    _use_images(monkeypatch, 256, 64)

    def run_one(*args: Any) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(bench, "run_one", run_one)
    argv = ["--methods", "full,crest", "--batch-size", "32", "--random-subset-size", "64", *argv]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert str(exit_info.value.code).startswith("python -m lightning_crest.benchmark: error: ")
    assert match in str(exit_info.value.code)


def test_quick_keeps_the_full_sets_random_subset_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # --quick trains on 10k images; a fractional r of that smaller set would shrink towards the batch size, where a
    # coreset is its whole subset. It keeps the full set's r instead.
    _use_images(monkeypatch, 12_000, 64)
    seen: list[tuple[int, float | int]] = []

    class Stop(Exception):
        pass

    def run_one(method: str, budget: float, seed: int, data: Any, args: Any) -> None:
        seen.append((len(data[0]), args.random_subset_size))
        if len(seen) == 2:  # the untimed warm-up, then the first timed run
            raise Stop

    monkeypatch.setattr(bench, "run_one", run_one)
    with pytest.raises(Stop):
        bench.main(
            [
                "--quick",
                "--methods",
                "crest",
                "--random-subset-size",
                "0.01",
                "--batch-size",
                "32",
                "--check-size",
                "32",
            ]
        )
    assert seen[1] == (10_000, 120)  # 1% of 12,000, not of 10,000


def test_budgets_are_printed_with_the_digits_they_need() -> None:
    assert [bench.percent(b) for b in (0.1, 0.2, 1.0, 0.005, 0.125)] == [
        "10%",
        "20%",
        "100%",
        "0.5%",
        "12.5%",
    ]


def test_the_plot_tells_budgets_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import matplotlib.figure

    figures: list[Any] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    runs = [
        {
            "method": m,
            "budget": b,
            "seed": 0,
            "test_acc": 0.9,
            "train_time_s": 10 * b,
            "steps": 10,
            "selections": 2,
        }
        # Runs saved by an earlier version traced the random baseline's plans too.
        | {"selection_trace": [(0, 1), (5, 2)] if m != "full" else []}
        for m, b in [("full", 1.0), ("random", 0.1), ("random", 0.2), ("crest", 0.1), ("crest", 0.2)]
    ]
    bench.plot(runs, tmp_path / "plot.png")
    left, right = figures[0].axes
    assert left.get_legend_handles_labels()[1] == [
        "full",
        "random 10%",
        "random 20%",
        "crest 10%",
        "crest 20%",
    ]
    assert right.get_legend_handles_labels()[1] == ["crest 10%", "crest 20%"]
    one_budget = [r for r in runs if r["budget"] in (1.0, 0.1)]
    bench.plot(one_budget, tmp_path / "plot.png")
    assert figures[1].axes[0].get_legend_handles_labels()[1] == ["full", "random", "crest"]


def test_drop_interval_reaches_crest_but_not_its_no_drop_ablation() -> None:
    assert bench.parse_args([]).drop_interval == 20
    args = bench.parse_args(["--drop-interval", "2"])
    crest = bench.make_callback("crest", 0.1, 0, args)
    assert crest is not None
    assert (crest.drop_learned, crest.drop_interval) == (True, 2)
    ablation = bench.make_callback("crest-no-drop", 0.1, 0, args)
    assert ablation is not None
    assert not ablation.drop_learned


def test_benchmark_refuses_a_folder_as_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--output", str(tmp_path)])
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err
    args = bench.parse_args(["--output", str(tmp_path / "new" / "runs.json")])  # its folder is created
    assert (tmp_path / "new").is_dir()
    assert args.output == tmp_path / "new" / "runs.json"


def test_benchmark_reports_missing_data_as_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data-dir", str(tmp_path), "--methods", "random", "--quick"])
    assert str(exit_info.value.code).startswith(
        "python -m lightning_crest.benchmark: error: fashion-mnist not found"
    )
    assert "scripts/fetch-fashion-mnist" in str(exit_info.value.code)


def test_benchmark_reports_a_failed_download_as_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import urllib.error

    def load(name: str, root: Any, download: bool = False) -> Any:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(bench, "load_dataset", load)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--dataset", "cifar10", "--download", "--data-dir", str(tmp_path), "--methods", "full"])
    message = str(exit_info.value.code)
    assert message.startswith(
        f"python -m lightning_crest.benchmark: error: could not download cifar10 into {tmp_path}"
    )
    assert "Name or service not known" in message
    assert "pass its folder as --data-dir" in message


def test_benchmark_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seeds SEEDS number of seeds per (method, budget) (default: 3)" in text
    assert "about 45 minutes on 2 CPU cores" in text
    assert "--seed-offset SEED_OFFSET first seed (default: 0)" in text  # 0 is a value, not an option left off
    assert "(default: None)" not in text
    assert "(default: False)" not in text


def test_benchmark_precision_reaches_the_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _use_images(monkeypatch, 256, 64)
    seen: list[str] = []

    class Trainer(bench.L.Trainer):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self.precision)

    monkeypatch.setattr(bench.L, "Trainer", Trainer)
    output = tmp_path / "results.json"
    bench.main([*_ONE_CREST_RUN, "--precision", "bf16-mixed", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["config"]["precision"] == "bf16-mixed"
    assert seen  # every Trainer the benchmark made (fit and test) got the precision
    assert set(seen) == {"bf16-mixed"}
    assert result["runs"][0]["selections"] >= 1


@pytest.mark.parametrize(("name", "layout"), [("channels_last", torch.channels_last), ("contiguous", None)])
def test_benchmark_memory_format_reaches_the_model(
    name: str,
    layout: torch.memory_format | None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_images(monkeypatch, 256, 64)
    modules: list[Classifier] = []

    class Recorded(Classifier):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            modules.append(self)

    monkeypatch.setattr(bench, "Classifier", Recorded)
    result = bench.main(
        [*_ONE_CREST_RUN, "--memory-format", name, "--output", str(tmp_path / "results.json")]
    )
    assert result["config"]["memory_format"] == name
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith(f"32-true, {name}")  # the run's settings are printed before it starts
    assert modules  # the full-data reference and CREST
    for module in modules:
        convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 2
        # After training: the optimizer's updates kept the layout (a 1-channel kernel is both layouts at once).
        assert all(w.is_contiguous(memory_format=layout or torch.contiguous_format) for w in convs)
        assert convs[1].is_contiguous() == (layout is None)


@pytest.mark.parametrize(
    ("name", "channels", "size"), [("small-cnn", 1, 28), ("resnet20", 3, 32), ("resnet18", 3, 32)]
)
def test_channels_last_classifier_computes_the_same_logits(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    reference = Classifier(build_model(name, 10, channels, image_size=size), 10).eval()
    fast = Classifier(build_model(name, 10, channels, image_size=size), 10, memory_format=torch.channels_last)
    fast.load_state_dict(reference.state_dict())
    fast.eval()
    inputs = torch.randn(4, channels, size, size)
    # Inputs are converted in forward, whatever layout the caller gives.
    first_conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    hidden: list[torch.Tensor] = []
    first_conv.register_forward_hook(lambda mod, args, out: hidden.append(out))
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs), reference(inputs), rtol=1e-4, atol=1e-5)
    assert hidden[0].is_contiguous(memory_format=torch.channels_last)
    assert not hidden[0].is_contiguous()


def _check_trace(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``benchmarks/check_trace.py`` as a module, with the benchmark's callback class restored after the test."""
    trace = benchmark_script("check_trace")
    monkeypatch.setattr(bench, "CrestCallback", bench.CrestCallback)  # the script swaps in its own
    return trace


def test_check_trace_records_the_terms_of_the_model_that_each_check_compared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _check_trace(monkeypatch)
    _use_images(monkeypatch, 256, 64)
    output = tmp_path / "trace.json"
    trace.main([*_ONE_CREST_RUN, "--epochs", "3", "--seeds", "1", "--trace", str(output)])
    rows = json.loads(output.read_text())
    assert rows == trace.TRACED[-1].rows
    assert len(rows) >= 3
    for row in rows:
        predicted = row["L0"] + row["first_order"] + row["second_order"]
        # The terms recorded rebuild the prediction the check compared: its rho, and its decision.
        assert abs(predicted - row["actual"]) / row["actual"] == pytest.approx(row["rho"], rel=1e-4, abs=1e-6)
        assert row["failed"] == (row["rho"] > 0.05)
        assert row["second_order"] >= 0
    out = capsys.readouterr().out
    scored, steps, selections = map(
        int, re.findall(r"\n(\d+) random subsets scored .* of (\d+) steps, over (\d+) sel", out)[0]
    )
    # One subset per coreset, picked when a step first needs it: one per selection and more for the later coresets
    # reached, at most one per step (and one more for a selection after the last step).
    assert scored == trace.TRACED[-1].subsets_scored
    assert selections < scored <= steps + 1
    table = out.split("| phase (steps) | checks | failed |")[1].splitlines()[2:]
    phases = [line.split(" | ") for line in table if line.startswith("| ")]
    # Every check falls in one phase of the schedule.
    assert sum(int(cells[1]) for cells in phases) == len(rows)
    assert sum(int(cells[2]) for cells in phases) == sum(row["failed"] for row in rows)
    norms = [row["curvature_norm"] for row in rows]
    assert min(norms) > 0
    first, largest, step, smallest, last = re.findall(
        r"\|\|H_t\|\| \(it sets T1\): (\S+) at the first check, largest (\S+) at step (\d+), smallest (\S+), "
        r"(\S+) at the last",
        out,
    )[0]
    assert float(first) == pytest.approx(norms[0], rel=1e-2)
    assert float(largest) == pytest.approx(max(norms), rel=1e-2)
    assert rows[norms.index(max(norms))]["step"] == int(step)
    assert float(smallest) == pytest.approx(min(norms), rel=1e-2)
    assert float(last) == pytest.approx(norms[-1], rel=1e-2)


def test_check_trace_measures_a_wide_sample_without_changing_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _check_trace(monkeypatch)
    _use_images(monkeypatch, 256, 64)
    argv = [*_ONE_CREST_RUN, "--epochs", "3", "--seeds", "1"]
    trace.main(argv)
    plain = trace.TRACED[-1].rows
    trace.main([*argv, "--wide", "100"])
    wide = trace.TRACED[-1].rows
    keys = {"wide_L0", "wide_actual"}
    assert len(plain) >= 3
    # The same checks with the same outcomes: the extra forward passes change nothing in the run.
    assert [{k: v for k, v in row.items() if k not in keys} for row in wide] == plain
    for row in wide:
        assert 0 < row["wide_L0"] < math.inf
        assert 0 < row["wide_actual"] < math.inf
    # wide_L0 is measured at each selection, not once.
    assert len({row["wide_L0"] for row in wide}) > 1
    table = (
        capsys.readouterr().out.split("| phase (steps) | checks | failed | would fail")[1].splitlines()[2:]
    )
    phases = [line.split(" | ") for line in table if line.startswith("| ")]
    assert phases
    # The counts rebuild from the rows: checks, and the model's failures against the wide sample's loss.
    counted = sum(int(cells[1]) for cells in phases)
    assert counted == len(wide)
    would_fail = [
        abs(r["wide_L0"] + r["first_order"] + r["second_order"] - r["wide_actual"]) / r["wide_actual"] > 0.05
        for r in wide
    ]
    assert sum(int(cells[3]) for cells in phases) == sum(would_fail)


def test_the_untimed_warm_up_leaves_the_timed_runs_as_they_would_be_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_images(monkeypatch, 256, 64)
    # Two epochs and a check sample: the warm-up runs one epoch with none, which must not leak into the others.
    argv = [*_ONE_CREST_RUN, "--seeds", "1", "--methods", "crest,random", "--epochs", "2"]
    warmed = bench.main(argv)["runs"]
    # The same runs without the warm-up before them: main's first call of run_one (the warm-up) skipped.
    calls: list[str] = []
    run_one = bench.run_one

    def skip_warm_up(method: str, *args: Any) -> dict[str, Any]:
        calls.append(method)
        return {} if len(calls) == 1 else run_one(method, *args)

    monkeypatch.setattr(bench, "run_one", skip_warm_up)
    alone = bench.main(argv)["runs"]
    assert calls == ["crest", "crest", "random"]
    keys = ("method", "test_acc", "steps", "selections", "selection_trace")
    assert [[run[k] for k in keys] for run in alone] == [[run[k] for k in keys] for run in warmed]
    assert warmed[0]["steps"] == 2 * 4  # 2 epochs of 4 steps (half of 256 images in batches of 32)


def test_each_run_measures_its_peak_memory_without_the_objects_of_earlier_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A finished fit's trainer, callback and module hold each other in reference cycles; uncollected, their tensors
    # (CUDA ones too) would count in the next run's peak.
    _use_images(monkeypatch, 640, 200)
    made: list[weakref.ref[CrestCallback]] = []
    make_callback, reset = bench.make_callback, bench._reset_peak_memory

    def recording(*args: Any) -> CrestCallback | None:
        callback = make_callback(*args)
        if callback is not None:
            made.append(weakref.ref(callback))
        return callback

    alive_at_reset: list[list[bool]] = []

    def resetting(device: str) -> None:
        reset(device)
        alive_at_reset.append([ref() is not None for ref in made])

    monkeypatch.setattr(bench, "make_callback", recording)
    monkeypatch.setattr(bench, "_reset_peak_memory", resetting)
    bench.main([*_ONE_CREST_RUN, "--seeds", "3"])
    assert len(alive_at_reset) == 4  # the warm-up fit and three seeds
    for alive in alive_at_reset:
        assert alive[-1]  # this run's callback, made before the reset
        assert not any(alive[:-1]), alive
