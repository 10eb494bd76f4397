"""Helpers over a torch module's modes, calls and parameters for CrestCallback's own passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    # Each submodule gets its own mode back: a frozen part the user keeps in eval mode stays there.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def inputs_of(layer: torch.nn.Module, captured: list[tuple[Any, Any]]) -> Iterator[None]:
    """Append the (first) input and output of every call of ``layer`` to ``captured`` for the duration."""

    def record(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        captured.append((args[0] if args else kwargs.get("input"), output))

    handle = layer.register_forward_hook(record, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def last_owner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The last module, in registration order, with trainable parameters of its own."""
    owners = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return owners[-1] if owners else None


def compiled(module: torch.nn.Module) -> bool:
    """Whether ``torch.compile`` wraps the module or any of its submodules (Lightning unwraps a compiled
    LightningModule and keeps its compiler context)."""
    return bool(getattr(module, "_compiler_ctx", None)) or any(
        hasattr(m, "_orig_mod") for m in module.modules()
    )


@contextmanager
def swapped(tensors: list[Tensor], values: list[Tensor]) -> Iterator[None]:
    """Give ``tensors`` the ``values`` for the duration, in place."""
    saved = [t.clone() for t in tensors]
    for t, value in zip(tensors, values, strict=True):
        t.copy_(value)
    try:
        yield
    finally:
        for t, value in zip(tensors, saved, strict=True):
            t.copy_(value)
