"""What CREST's check sees over a benchmark run: the quadratic model against simpler predictions of the loss.

At every check it records the loss on the check sample (``actual``), the anchor loss ``L0``, the model's first-
and second-order terms ``g.delta`` and ``delta.diag(H).delta / 2`` with the smoothed gradient ``g``, and the
first-order term with the gradient of the selection's probed coreset instead (the last of them with
``hessian_probes=None``), and the smoothed curvature's norm, which sets ``T1``. It prints, by phase of the
learning-rate schedule, how many checks failed and the median relative error of three predictions: the model as
built, the loss staying at ``L0``, and the model with the selection's own gradient.

With ``--wide N`` it also measures, at every selection and check, the loss on one fixed random sample of ``N``
training examples (under the same normalisation statistics as the check), and prints how far that loss moved and
how the model would have fared against it: how much of the check sample's movement is its own sampling noise. The
measurement leaves the run as it would be without it. The check sample comes from the pool and the wide sample
from the whole training set, so the two compare like with like only before the first exclusion of learned
examples.

    python benchmarks/check_trace.py --budget 0.1 --seeds 1 [other benchmark options] [--trace trace.json] [--wide N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch
from torch import Tensor

from lightning_crest import CrestCallback
from lightning_crest._modules import swapped
from lightning_crest.benchmark import __main__ as bench

# Every callback made, in order: the benchmark's untimed warm-up fit comes first, the traced run last.
TRACED: list[TracedCallback] = []


class TracedCallback(CrestCallback):
    """Records the terms of the quadratic model at every check."""

    _own_gradient: Tensor | None = None
    _check_loss: Tensor | None = None
    wide_size = 0  # set by --wide
    _wide_batches: list[Any] | None = None
    _wide_L0 = float("nan")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[dict[str, Any]] = []
        self.subsets_scored = 0  # one per coreset picked: coresets are picked when a step first needs them
        TRACED.append(self)

    def _pick(self, subsets: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        self.subsets_scored += len(subsets)
        return super()._pick(subsets, *args)

    def _build_model(self, coresets: Tensor, weights: Tensor, loss: float) -> None:
        update = self._quadratic.update

        def keep(grads: Any, hess_diag: Any = None) -> None:
            self._own_gradient = grads[0].detach().flatten().clone()
            update(grads, hess_diag)

        self._quadratic.update = keep  # type: ignore[method-assign]
        try:
            super()._build_model(coresets, weights, loss)
        finally:
            del self._quadratic.update

    def _wide_loss(self) -> float:
        """Mean loss on the fixed wide sample, with the selection's normalisation statistics (as the check)."""
        if self._wide_batches is None:
            # Drawn once, with a generator of its own: CREST's draws stay as they are.
            order = torch.randperm(len(self._dm.labels), generator=torch.Generator().manual_seed(12345))
            chunks = torch.split(order[: self.wide_size], self._dm.eval_batch_size)
            self._wide_batches = [self._dm.fetch(chunk.tolist(), seed=0) for chunk in chunks]
        with swapped(self._running_stats(), self._anchor_stats):
            _, losses, _, _ = super()._evaluate(self._wide_batches, seed=0)
        return float(losses.mean())

    def _select_coresets(self) -> None:
        super()._select_coresets()
        if self.wide_size:
            self._wide_L0 = self._wide_loss()

    def _check(self) -> bool:
        wide = {"wide_L0": self._wide_L0, "wide_actual": self._wide_loss()} if self.wide_size else {}
        model = self._quadratic
        assert self._own_gradient is not None
        assert self._trainer is not None
        delta = model.delta(self._model_parameters())
        row = {
            "step": self._trainer.global_step,
            "since_selection": self._steps_since_selection,
            "L0": model.anchor_loss,
            "first_order": float(model.gradient @ delta),
            "own_first_order": float(self._own_gradient @ delta),
            "second_order": float(0.5 * (model.hessian * delta * delta).sum()),
            "curvature_norm": model.curvature_norm(),
        }
        self._check_loss = None
        failed = super()._check()
        if self._check_loss is None:  # re-selected without measuring (the trainable parameters changed)
            return failed
        self.rows.append(row | wide | {"actual": float(self._check_loss), "rho": self._rho, "failed": failed})
        return failed

    def _evaluate(
        self, batches: list[Any], dtype: Any = None, seed: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        scores = super()._evaluate(batches, dtype, seed, **kwargs)
        self._check_loss = scores[1].mean()
        return scores


def _error(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def _phases(rows: list[dict[str, Any]], total_steps: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """The checks in each phase of the benchmark's schedule (warm-up over the first 10%, x0.1 at 60% and 85%)."""
    bounds = [
        0,
        round(0.1 * total_steps),
        round(0.6 * total_steps),
        round(0.85 * total_steps),
        total_steps + 1,
    ]
    names = ["warm-up", "full rate", "rate x0.1", "rate x0.01"]
    return [
        (f"{name} ({low + 1}-{min(high, total_steps)})", [r for r in rows if low < r["step"] <= high])
        for name, low, high in zip(names, bounds, bounds[1:])
    ]


def summarize(rows: list[dict[str, Any]], total_steps: int) -> str:
    lines = [
        "| phase (steps) | checks | failed | median rho | median error of L0 | median error, own gradient | "
        "median steps since selection |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, part in _phases(rows, total_steps):
        if not part:
            continue
        model = [r["rho"] for r in part]
        constant = [_error(r["L0"], r["actual"]) for r in part]
        own = [_error(r["L0"] + r["own_first_order"] + r["second_order"], r["actual"]) for r in part]
        lines.append(
            f"| {name} | {len(part)} | {sum(r['failed'] for r in part)} | "
            f"{statistics.median(model):.3f} | {statistics.median(constant):.3f} | {statistics.median(own):.3f} | "
            f"{statistics.median(r['since_selection'] for r in part):g} |"
        )
    return "\n".join(lines)


def _correlation(a: list[float], b: list[float]) -> str:
    try:
        return f"{statistics.correlation(a, b):.2f}"
    except statistics.StatisticsError:  # fewer than two points, or a constant series
        return "-"


def summarize_wide(rows: list[dict[str, Any]], total_steps: int, tau: float) -> str:
    lines = [
        "| phase (steps) | checks | failed | would fail on the wide sample | median movement of the check "
        "sample's loss | median movement of the wide sample's loss | correlation of the two | median rho, wide |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, part in _phases(rows, total_steps):
        if not part:
            continue
        rho = [_error(r["wide_L0"] + r["first_order"] + r["second_order"], r["wide_actual"]) for r in part]
        moved = [r["actual"] - r["L0"] for r in part]
        wide_moved = [r["wide_actual"] - r["wide_L0"] for r in part]
        lines.append(
            f"| {name} | {len(part)} | {sum(r['failed'] for r in part)} | {sum(x > tau for x in rho)} | "
            f"{statistics.median(abs(m) / r['L0'] for m, r in zip(moved, part)):.3f} | "
            f"{statistics.median(abs(m) / r['wide_L0'] for m, r in zip(wide_moved, part)):.3f} | "
            f"{_correlation(moved, wide_moved)} | {statistics.median(rho):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", help="write every check's record to this JSON file")
    parser.add_argument(
        "--wide", type=int, default=0, help="also measure the loss on this many training examples"
    )
    args, rest = parser.parse_known_args(argv)
    TracedCallback.wide_size = args.wide
    bench.CrestCallback = TracedCallback  # type: ignore[misc]
    result = bench.main(["--methods", "crest", *rest])
    runs = result["runs"]
    if len(runs) != 1:
        sys.exit("check_trace.py traces one run: pass one --budget and --seeds 1")
    traced = TRACED[-1]
    print(
        f"\n{traced.subsets_scored} random subsets scored for the coresets of {runs[0]['steps']} steps, over "
        f"{runs[0]['selections']} selections."
    )
    print("\nThe check over training (rho: the quadratic model's relative error):\n")
    rows = traced.rows
    print(summarize(rows, runs[0]["steps"]))
    if rows:
        norms = [r["curvature_norm"] for r in rows]
        top = max(range(len(rows)), key=norms.__getitem__)
        print(
            f"\nSmoothed curvature norm ||H_t|| (it sets T1): {norms[0]:.3g} at the first check, largest "
            f"{norms[top]:.3g} at step {rows[top]['step']}, smallest {min(norms):.3g}, {norms[-1]:.3g} at the last."
        )
    if args.wide:
        print(f"\nThe check sample against a fixed sample of {args.wide} training examples:\n")
        print(summarize_wide(rows, runs[0]["steps"], result["config"]["tau"]))
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1:])
