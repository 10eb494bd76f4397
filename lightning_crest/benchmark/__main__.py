"""Benchmark CREST against full-data and random training: ``python -m lightning_crest.benchmark --help``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import math
import numbers
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.benchmark.data import DATASET_NAMES, LabelledSubset, load_dataset, subset
from lightning_crest.benchmark.models import MODEL_NAMES, build_model
from lightning_crest.benchmark.module import Classifier
from lightning_crest.datamodule import _is_class_index, _read_labels

METHODS = ("full", "random", "crest", "crest-no-drop", "crest-first-order")
DEFAULT_MODEL = {"fashion-mnist": "small-cnn", "cifar10": "resnet20", "cifar100": "resnet18"}
PROXY_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class SelectionTrace(L.Callback):
    """Records the number of selections after every step, for the plot of selections over training."""

    def __init__(self, crest: CrestCallback) -> None:
        self.crest = crest
        self.trace: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        selections = int(self.crest.statistics["selections"])
        if not self.trace or self.trace[-1][1] != selections:
            self.trace.append((trainer.global_step, selections))


def make_callback(method: str, budget: float, seed: int, args: argparse.Namespace) -> CrestCallback | None:
    """The CREST callback of a benchmark method (``None`` for full-data training)."""
    if method == "full":
        return None
    if method == "random":
        return CrestCallback(fraction=budget, selection="random", seed=seed)
    options: dict[str, Any] = {
        "fraction": budget,
        "tau": args.tau,
        "interval_mul": args.interval_mul,
        "coreset_mul": args.coreset_mul,
        "hessian_every": args.hessian_every,
        "hessian_subsample": args.hessian_subsample,
        "proxy_dtype": PROXY_DTYPES[args.proxy_dtype],
        "embedding_proxy": args.embedding_proxy,
        "random_subset_size": args.random_subset_size,
        "check_size": args.check_size,
        "check_sample": args.check_sample,
        "drop_learned": method != "crest-no-drop",
        "drop_interval": args.drop_interval,
        "second_order": method != "crest-first-order",
        "seed": seed,
    }
    return CrestCallback(**options)


def run_one(
    method: str, budget: float, seed: int, data: tuple[Any, Any, int], args: argparse.Namespace
) -> dict[str, Any]:
    """Train and test one (method, budget, seed) and return its record."""
    train, test, num_classes = data
    L.seed_everything(seed, workers=True, verbose=False)
    model = make_model(args.model, num_classes, train)
    module = Classifier(model, num_classes, lr=args.lr, memory_format=MEMORY_FORMATS[args.memory_format])
    callback = make_callback(method, budget, seed, args)
    trace = SelectionTrace(callback) if callback is not None and method.startswith("crest") else None
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        callbacks=[c for c in (callback, trace) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )
    # The seed also orders full-data epochs (CREST's draws follow the callback's).
    dm = CrestDataModule(
        train, test_dataset=test, batch_size=args.batch_size, num_workers=args.num_workers, seed=seed
    )
    _reset_peak_memory(args.device)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_time = time.perf_counter() - start
    metrics = dict(trainer.callback_metrics)  # testing resets them
    test_acc = float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"])
    return {
        "method": method,
        "budget": 1.0 if method == "full" else budget,
        "seed": seed,
        "test_acc": test_acc,
        "train_time_s": train_time,
        "steps": trainer.global_step,
        "selections": int(metrics.get("crest/selections", 0)) if method.startswith("crest") else 0,
        # CREST's share of the same wall time as train_time_s (the logged value counts from the first step).
        "overhead": callback.own_time / train_time
        if callback is not None and method.startswith("crest")
        else 0.0,
        "peak_memory_mb": _peak_memory_mb(args.device),
        # Seconds of CREST's own work by part (forward passes for proxies, facility location, Hessian probes, ...).
        "crest_time_s": callback.timings if callback is not None and method.startswith("crest") else {},
        "selection_trace": [] if trace is None else trace.trace,
    }


class UsageError(ValueError):
    """A ``--dataset`` or ``--model`` of the user's own that cannot be used (errors inside it propagate as they are)."""


def import_object(spec: str, flag: str) -> Callable[..., Any]:
    """The function that ``module:name`` names, for a ``--dataset`` or ``--model`` of the user's own."""
    module_name, _, name = spec.partition(":")
    builtins = DATASET_NAMES if flag == "--dataset" else MODEL_NAMES
    if not module_name or not name:
        raise UsageError(
            f"{flag} {spec!r} is neither a built-in ({', '.join(builtins)}) nor module:function naming one of "
            "your own (my_workload:data, say)"
        )
    if module_name.endswith(".py"):
        raise UsageError(f"{flag} {spec} names a file; name its module: {module_name[:-3]}:{name}")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name + ".").startswith(error.name + "."):
            raise  # the module was found, and something it imports was not: the user's environment
        raise UsageError(
            f"{flag} {spec}: cannot find module {module_name}; run the benchmark from the folder that holds it, or "
            "add that folder to PYTHONPATH"
        ) from error
    for part in name.split("."):
        if not hasattr(found, part):
            raise UsageError(f"{flag} {spec}: {module_name} has no {name!r}")
        found = getattr(found, part)
    if not callable(found):
        raise UsageError(f"{flag} {spec} is not a function but {found!r}")
    return found  # type: ignore[no-any-return]


def make_model(spec: str, num_classes: int, train: Dataset[Any]) -> nn.Module:
    """A fresh network: a built-in sized by the first training image, or ``function(num_classes)`` of one's own."""
    if spec in MODEL_NAMES:
        image = train[0][0]
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise UsageError(
                f"--model {spec} takes images, (channels, height, width) tensors, but the first training input is "
                f"{shape}; name a model of your own (module:function)"
            )
        try:
            return build_model(spec, num_classes, image.shape[0], image_size=image.shape[-1])
        except ValueError as error:
            raise UsageError(f"--model {spec}: {error}") from error
    model = import_object(spec, "--model")(num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_own_dataset(spec: str) -> tuple[Dataset[Any], Dataset[Any], int]:
    """Call the function ``--dataset module:function`` names: ``(train, test)`` or ``(train, test, num_classes)``.

    Splits without a ``targets`` attribute get one, read from their items once here (the benchmark draws
    class-stratified subsets of them, and every run's data module reads the training labels)."""
    loaded = import_object(spec, "--dataset")()
    if not isinstance(loaded, tuple | list) or len(loaded) not in (2, 3):
        raise UsageError(
            f"--dataset {spec} returned {type(loaded).__name__}"
            f"{f' of {len(loaded)}' if isinstance(loaded, tuple | list) else ''}; return (train, test) or (train, "
            "test, num_classes): datasets of (input, class index) items"
        )
    splits, largest = [], 0
    for which, dataset in zip(("train", "test"), loaded[:2], strict=True):
        try:
            labels = _read_labels(dataset) if which == "train" else _test_labels(dataset)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--dataset {spec}: its {which} split: {error}") from error
        if getattr(dataset, "targets", None) is None:
            dataset = LabelledSubset(dataset, range(len(labels)), labels)
        splits.append(dataset)
        largest = max(largest, int(labels.max()) if len(labels) else 0)
    num_classes = loaded[2] if len(loaded) == 3 else largest + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise UsageError(f"--dataset {spec} gave num_classes={num_classes!r}; return an int")
    if num_classes <= largest:
        raise UsageError(
            f"--dataset {spec} gave num_classes={num_classes!r}, but its labels go up to {largest}; return an int "
            f"above {largest}, or (train, test) alone to count the classes from the labels"
        )
    return splits[0], splits[1], int(num_classes)


def _test_labels(dataset: Dataset[Any]) -> torch.Tensor:
    """The class of every item of a test split: its ``targets``, else its items', as non-negative integers."""
    found = getattr(dataset, "targets", None)
    targets = found if found is not None else [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    if found is None:
        for index, target in enumerate(targets):
            if not _is_class_index(target):
                raise TypeError(
                    f"item {index} has target {target!r}; targets must be integer class indices (scalars)"
                )
    labels = torch.as_tensor(targets)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            f"`targets` must be a 1-d sequence of integer classes, got dtype {labels.dtype} and shape "
            f"{tuple(labels.shape)}"
        )
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(
            f"targets must be non-negative class indices, got {int(labels.min())}; number them from 0"
        )
    return labels.long()


@contextlib.contextmanager
def _quiet_lightning(quiet: bool) -> Iterator[None]:
    """Hide Lightning's informational lines (devices, tips, why fit stopped), repeated for every run; warnings stay."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _reset_peak_memory(device: str) -> None:
    # The last run's trainer, callback and module hold each other in cycles: free them, so that their tensors do
    # not count in this run's peak.
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux resets the process's peak resident set size (VmHWM) when "5" is written to clear_refs.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(device: str) -> float:
    """Peak memory of the run: CUDA allocations, or the process's peak resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    # Elsewhere, the peak since the process started (kilobytes on Linux, bytes on macOS).
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def add_relative_metrics(runs: list[dict[str, Any]]) -> None:
    """Relative error and speedup of every run against full-data training of the same seed (or their mean)."""
    full = {r["seed"]: r for r in runs if r["method"] == "full"}
    for run in runs:
        reference = full.get(run["seed"])
        if reference is None and full:
            reference = {
                "test_acc": statistics.mean(r["test_acc"] for r in full.values()),
                "train_time_s": statistics.mean(r["train_time_s"] for r in full.values()),
            }
        if reference is None:
            run["rel_error"], run["speedup"] = None, None
            continue
        # Signed, as the paper's: negative where the run beat full-data training.
        run["rel_error"] = (reference["test_acc"] - run["test_acc"]) / reference["test_acc"]
        run["speedup"] = reference["train_time_s"] / run["train_time_s"]


def _by_method_and_budget(runs: list[dict[str, Any]]) -> list[tuple[tuple[str, float], list[dict[str, Any]]]]:
    """The runs grouped by ``(method, budget)``, in the order the groups first appear."""
    keys = dict.fromkeys((r["method"], r["budget"]) for r in runs)
    return [(key, [r for r in runs if (r["method"], r["budget"]) == key]) for key in keys]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation per (method, budget)."""
    rows = []
    for key, group in _by_method_and_budget(runs):

        def stat(name: str, group: list[dict[str, Any]] = group) -> tuple[float, float]:
            values = [r[name] for r in group if r[name] is not None]
            if not values:
                return math.nan, math.nan
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        rows.append(
            {"method": key[0], "budget": key[1], "seeds": len(group), **{n: stat(n) for n in _COLUMNS}}
        )
    return rows


_COLUMNS = ("test_acc", "rel_error", "train_time_s", "speedup", "selections", "overhead", "peak_memory_mb")


def format_time_table(runs: list[dict[str, Any]]) -> str:
    """A markdown table of where CREST's own time went: mean seconds per part over the seeds of each CREST run."""
    crest_runs = [r for r in runs if r.get("crest_time_s")]
    if not crest_runs:
        return ""
    parts = list(crest_runs[0]["crest_time_s"])
    lines = [
        "| method | budget | train time (s) | " + " | ".join(f"{p} (s)" for p in parts) + " | selections |",
        "|" + "---|" * (len(parts) + 4),
    ]
    for key, group in _by_method_and_budget(crest_runs):
        means = [statistics.mean(r["crest_time_s"][p] for r in group) for p in parts]
        lines.append(
            f"| {key[0]} | {percent(key[1])} | {statistics.mean(r['train_time_s'] for r in group):.1f} | "
            + " | ".join(f"{m:.1f}" for m in means)
            + f" | {statistics.mean(r['selections'] for r in group):.0f} |"
        )
    return "\n".join(lines)


def percent(fraction: float) -> str:
    """A budget as a percentage with the digits it needs: 10%, 0.5%, 12.5%."""
    return f"{100 * fraction:.4g}%"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows."""
    header = "| method | budget | seeds | test acc (%) | rel. error (%) | train time (s) | speedup | selections | overhead (%) | peak memory (MB) |"
    lines = [header, "|" + "---|" * 10]
    for row in rows:

        def pm(name: str, scale: float = 1.0, digits: int = 1, row: dict[str, Any] = row) -> str:
            mean, std = row[name]
            if math.isnan(mean):
                return "-"
            return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"

        lines.append(
            f"| {row['method']} | {percent(row['budget'])} | {row['seeds']} | {pm('test_acc', 100, 2)} | "
            f"{pm('rel_error', 100, 2)} | {pm('train_time_s')} | {pm('speedup', digits=2)} | {pm('selections', digits=0)} | "
            f"{pm('overhead', 100)} | {pm('peak_memory_mb', digits=0)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against wall time for every run, and selections over training for the CREST runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # A colour per method; with several budgets, a marker (and a line style) per budget.
    budgets = list(dict.fromkeys(r["budget"] for r in runs if r["method"] != "full"))
    for number, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        color = f"C{number}"
        for budget in dict.fromkeys(r["budget"] for r in runs if r["method"] == method):
            group = [r for r in runs if (r["method"], r["budget"]) == (method, budget)]
            label = method if len(budgets) < 2 or method == "full" else f"{method} {percent(budget)}"
            style = budgets.index(budget) if budget in budgets else 0
            left.scatter(
                [r["train_time_s"] for r in group],
                [100 * r["test_acc"] for r in group],
                label=label,
                c=color,
                marker="o^sDvP*X"[style % 8],
            )
            # The random baseline's plans are not selections (runs saved before it stopped recording them have some).
            traced = [r for r in group if r["selection_trace"] and r["method"].startswith("crest")]
            for index, run in enumerate(traced):
                steps, counts = zip(*run["selection_trace"], (run["steps"], run["selections"]))
                right.step(
                    steps,
                    counts,
                    where="post",
                    color=color,
                    linestyle=("-", "--", ":", "-.")[style % 4],
                    label=label if index == 0 else None,
                    alpha=0.8,
                )
    left.set(xlabel="training wall time (s)", ylabel="test accuracy (%)", title="accuracy against time")
    left.legend()
    right.set(
        xlabel="optimizer step",
        ylabel="selections so far",
        title="CREST selections over training (every seed)",
    )
    if right.get_legend_handles_labels()[0]:
        right.legend()
    else:
        right.text(0.5, 0.5, "no CREST run", ha="center", va="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# Parsed here, not by argparse: its own message names the type function ("invalid _positive_int value").
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _fraction_or_count(text: str) -> float | int:
    value = _float(text)
    if value >= 1 and value.is_integer() and "." not in text:
        return int(value)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1] or a whole count such as 300, got {text}")
    return value


def _optional_count(text: str) -> int | None:
    return None if text.lower() == "none" else _positive_int(text)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _budget(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of full training in (0, 1], got {text}")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that are values, not those of flags and of options that are off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:  # not 0, a value
            return action.help
        return super()._get_help_string(action)


_MAX_SEED = 2**32 - 1  # the largest seed `L.seed_everything` takes

# CrestCallback's errors name its arguments; the benchmark's user passed these flags.
_FLAGS = (
    "tau",
    "interval_mul",
    "coreset_mul",
    "hessian_every",
    "hessian_subsample",
    "proxy_dtype",
    "embedding_proxy",
    "random_subset_size",
    "check_size",
)


def _as_flags(error: ValueError) -> str:
    """A CrestCallback error with its argument names written as the benchmark's flags."""
    message = str(error)
    for name in _FLAGS:
        message = message.replace(f"`{name}`", "--" + name.replace("_", "-"))
    return message.replace("pass None to check", "pass --check-size none to check")


def check_sizes(args: argparse.Namespace, n: int) -> None:
    """Exit with a usage error if an option does not fit a training set of ``n`` examples, before any run."""
    try:
        if args.batch_size > n:
            raise ValueError(
                f"--batch-size {args.batch_size} is larger than the {n} training examples; lower it"
            )
        for method in args.methods:
            for budget in args.budget:
                callback = make_callback(method, budget, args.seed_offset, args)
                if callback is not None and callback.selection == "crest":
                    callback._subset_size(n, args.batch_size)
    except ValueError as error:
        sys.exit(f"python -m lightning_crest.benchmark: error: {_as_flags(error)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_crest.benchmark",
        description="Benchmark CREST against full-data and random training: test accuracy, wall time, "
        "selections and CREST's overhead per (method, budget, seed), printed as a table (and, with --output, "
        "written as JSON and a plot).",
        epilog="Without options it runs the five methods at a 10% budget with 3 seeds on Fashion-MNIST: about "
        "45 minutes on 2 CPU cores. --quick runs the same code on a subset in under a minute.",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        help=f"training and test data: {', '.join(DATASET_NAMES)}, or module:function of your own, returning "
        "(train, test) or (train, test, num_classes) datasets of (input, class index) items",
    )
    parser.add_argument(
        "--model",
        help=f"network: {', '.join(MODEL_NAMES)} (default: by --dataset), or module:function of your own, taking "
        "num_classes and returning a torch.nn.Module whose forward maps a batch of inputs to (B, num_classes) logits",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument(
        "--budget", type=_budget, nargs="+", default=[0.1], help="one or more fractions of full training"
    )
    parser.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds per (method, budget)")
    parser.add_argument("--seed-offset", type=_non_negative_int, default=0, help="first seed")
    parser.add_argument(
        "--epochs", type=_positive_int, default=25, help="reference epochs of the full-data recipe"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="mini-batch (and coreset) size")
    parser.add_argument("--lr", type=_positive_float, default=0.05, help="peak learning rate of SGD")
    parser.add_argument("--tau", type=float, default=0.05, help="CREST: check tolerance")
    parser.add_argument(
        "--interval-mul", type=float, default=1.0, help="CREST h: T1 = ceil(h ||H_ref|| / ||H_t||)"
    )
    parser.add_argument(
        "--coreset-mul", type=int, default=5, help="CREST b: coresets per selection per step of T1"
    )
    parser.add_argument(
        "--hessian-every", type=int, default=1, help="CREST: probe the curvature at every k-th selection"
    )
    parser.add_argument(
        "--hessian-subsample",
        type=int,
        default=4,
        help="CREST: run each curvature probe on every k-th example of the coreset (1: all of it, the paper)",
    )
    parser.add_argument(
        "--proxy-dtype",
        default="none",
        choices=tuple(PROXY_DTYPES),
        help="CREST: autocast dtype of the forward passes that score random subsets ('none': the --precision)",
    )
    parser.add_argument(
        "--embedding-proxy",
        type=int,
        default=0,
        help="CREST: append a sketch of about k values of the last layer's weight gradient to the proxies (0: none)",
    )
    parser.add_argument(
        "--random-subset-size",
        type=_fraction_or_count,
        default=0.005,
        help="CREST r: a fraction of the training set (a float) or a count (an int)",
    )
    parser.add_argument(
        "--check-size",
        type=_optional_count,
        default=128,
        help="CREST: examples in the check sample ('none': r)",
    )
    parser.add_argument(
        "--check-sample",
        choices=["independent", "subset"],
        default="independent",
        help="CREST: the check sample is a random draw of its own, or part of the first random subset",
    )
    parser.add_argument(
        "--drop-interval",
        type=_positive_int,
        default=20,
        help="CREST T2: epochs between exclusions of learned examples",
    )
    parser.add_argument("--data-dir", default="data", help="folder of the data sets")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing data")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    parser.add_argument(
        "--precision",
        default="32-true",
        choices=("32-true", "bf16-mixed", "16-mixed"),
        help="Lightning's Trainer precision; CREST's own forward passes run under it too",
    )
    parser.add_argument(
        "--memory-format",
        default="channels_last",
        choices=tuple(MEMORY_FORMATS),
        help="layout of the model's weights and input batches, for every method",
    )
    parser.add_argument(
        "--num-workers", type=_non_negative_int, default=0, help="data loader worker processes"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10k training images, at most 5 epochs, 1 seed (replaces --seeds); a fractional "
        "--random-subset-size keeps the full set's r",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file of all runs (a PNG plot is written next to it)",
    )
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar and messages")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        parser.error(f"--methods names no method; choose from {','.join(METHODS)}")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    for flag, values in (("--methods", args.methods), ("--budget", args.budget)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:  # each would run again and count as another seed
            parser.error(f"{flag} lists {', '.join(map(str, repeated))} more than once; name each once")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is False); use --device cpu"
        )
    last_seed = args.seed_offset + args.seeds - 1
    if last_seed > _MAX_SEED:  # Lightning's seed_everything would refuse it, after the earlier seeds' runs
        parser.error(
            f"--seed-offset {args.seed_offset} with --seeds {args.seeds} reaches seed {last_seed}, beyond Lightning's "
            f"largest seed {_MAX_SEED}; lower --seed-offset"
        )
    try:  # CrestCallback checks its options; a bad one is reported now, not after the full-data run
        for method in args.methods:
            for budget in args.budget:
                make_callback(method, budget, args.seed_offset, args)
    except ValueError as error:
        parser.error(_as_flags(error))
    if args.output is not None:  # found out now, not after the runs
        folder = args.output.parent
        if args.output.is_dir():
            parser.error(f"--output {args.output} is a folder; name a JSON file in it")
        if args.output.suffix.lower() == ".png":
            parser.error(
                f"--output {args.output} names the plot; name the JSON file (the plot is written next to it, as .png)"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--output {args.output}: cannot create its folder ({error})")
        if not os.access(folder, os.W_OK):
            parser.error(f"--output {args.output}: its folder {folder} is not writable")
    for flag, spec, builtins in (
        ("--dataset", args.dataset, DATASET_NAMES),
        ("--model", args.model, MODEL_NAMES),
    ):
        if spec is not None and spec not in builtins:
            try:  # a typo or a module off the path is found now, not after the first runs
                import_object(spec, flag)
            except UsageError as error:
                parser.error(str(error))
    if args.dataset not in DATASET_NAMES:
        if args.model is None:
            parser.error(
                f"--dataset {args.dataset} is a data set of your own: name its network with --model "
                f"({', '.join(MODEL_NAMES)}, or module:function of your own)"
            )
        if args.download:
            parser.error(
                f"--download fetches the built-in data sets, not --dataset {args.dataset}; leave it out"
            )
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    if args.quick:
        args.epochs, args.seeds = min(args.epochs, 5), 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    try:
        if args.dataset in DATASET_NAMES:
            train, test, num_classes = load_dataset(args.dataset, args.data_dir, download=args.download)
        else:
            train, test, num_classes = load_own_dataset(args.dataset)
    except (FileNotFoundError, UsageError) as error:
        sys.exit(f"python -m lightning_crest.benchmark: error: {error}")
    except (OSError, RuntimeError) as error:  # torchvision's download: URLError, or its own RuntimeError
        if not args.download:
            raise
        sys.exit(
            f"python -m lightning_crest.benchmark: error: could not download {args.dataset} into {args.data_dir} "
            f"({error}). Download it where there is a network and pass its folder as --data-dir."
        )
    try:  # a model of the wrong kind is found before the runs
        make_model(args.model, num_classes, train)
    except UsageError as error:
        sys.exit(f"python -m lightning_crest.benchmark: error: {error}")
    if args.quick:
        if isinstance(args.random_subset_size, float):
            # The full set's r, so that coresets are still picked from subsets larger than a batch.
            full_set = CrestCallback(random_subset_size=args.random_subset_size)
            args.random_subset_size = full_set._subset_size(len(train), args.batch_size)  # type: ignore[arg-type]
        train = subset(train, min(10_000, len(train)), seed=0)  # type: ignore[arg-type]
        test = subset(test, min(2_000, len(test)), seed=0)  # type: ignore[arg-type]
    sizes = len(train), len(test)  # type: ignore[arg-type]
    check_sizes(args, sizes[0])
    print(
        f"{args.dataset} / {args.model}: {sizes[0]} train, {sizes[1]} test, {args.epochs} reference epochs, "
        f"{args.seeds} seed{'s' if args.seeds > 1 else ''}, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, device {args.device}, {args.precision}, "
        f"{args.memory_format}",
        flush=True,
    )
    # One short untimed CREST fit first: the first fit of a process also pays for thread pools, kernel caches and
    # lazy imports, which made the first of several short timed runs up to three times slower.
    small = subset(train, min(sizes[0], 20 * args.batch_size), seed=0)
    warm_up = argparse.Namespace(**vars(args) | {"epochs": 1, "check_size": None, "progress": False})
    warm_up.random_subset_size = min(len(small), 3 * args.batch_size)
    with _quiet_lightning(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_one("crest", 0.5, 0, (small, subset(test, min(sizes[1], 1000), seed=0), num_classes), warm_up)
    runs = []
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        for method in args.methods:
            for budget in [1.0] if method == "full" else args.budget:
                with _quiet_lightning(not args.progress):
                    run = run_one(method, budget, seed, (train, test, num_classes), args)
                runs.append(run)
                print(
                    f"  {method:<18} budget {percent(run['budget']):>5}  seed {seed}  test acc {100 * run['test_acc']:.2f}%  "
                    f"{run['train_time_s']:7.1f} s  {run['steps']} steps  {run['selections']} selections  "
                    f"overhead {100 * run['overhead']:.0f}%",
                    flush=True,
                )
    add_relative_metrics(runs)
    table = format_table(summarize(runs))
    print()
    print(table)
    times = format_time_table(runs)
    if times:
        print("\nCREST's own time by part (mean over seeds):\n")
        print(times)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "output"} | {"output": str(args.output)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
        "runs": runs,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
        plot(runs, args.output.with_suffix(".png"))
        print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
