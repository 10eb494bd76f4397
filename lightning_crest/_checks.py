"""Argument checks shared by the callback and the data module (each error names the argument and the value), and
the default of their seeds."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import torch


def conversion_hint(value: object) -> str:
    """``"; pass int(...)"`` or ``"; pass float(...)"`` for a number of another type (NumPy's), else ``""``: such a
    value would reach checkpoints, which then need ``weights_only=False`` to load."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return ""
    return f"; pass {'int' if isinstance(value, numbers.Integral) else 'float'}({value!r})"


def check_range(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a Python int or float, got {value!r}{conversion_hint(value)}.")
    too_low = value <= low if low_open else value < low
    if too_low or value > high or (isinstance(value, float) and math.isnan(value)):
        bracket = "(" if low_open else "["
        # A share given as a percentage: 10 for 10%.
        hint = f"; for {value:g}% pass {value / 100:g}" if high == 1.0 and 1 < value <= 100 else ""
        raise ValueError(f"`{name}` must lie in {bracket}{low}, {high}], got {value!r}{hint}.")


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1
        hint = conversion_hint(value) if integral else ""
        if isinstance(value, float) and value.is_integer() and value >= 1:
            hint = f"; pass {int(value)}"
        raise ValueError(f"`{name}` must be a positive int, got {value!r}{hint}.")


def check_finite(name: str, value: float, consequence: str) -> None:
    """Refuse an infinite value (its range is checked apart), saying what it would do."""
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}: {consequence}.")


def check_integer_tensor(name: str, value: object, what: str) -> torch.Tensor:
    """``value``, or a ``TypeError`` naming the argument unless it is a tensor of integers (bool excluded)."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        kind = f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"`{name}` must be an integer tensor of {what}, got {kind}.")
    return value


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise ValueError(
            f"`seed` must be an int in [0, 2**63), or None for Lightning's global seed; got {seed!r}."
        )


def global_seed(trainer: Any = None) -> int:
    """Lightning's global seed, as ``L.seed_everything`` left it (0 if it was not called), which Lightning's own
    distributed sampler follows too; with a ``trainer`` of several processes, process 0's, so that all draw alike."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if trainer is not None and trainer.world_size > 1:
        seed = int(trainer.strategy.broadcast(seed, src=0))
    return seed
