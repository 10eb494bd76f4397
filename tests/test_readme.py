"""The README's code runs as written (with a shorter run, and inputs for the selection sketch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_block(after: str) -> str:
    """The first ```python block after the heading ``after``."""
    match = re.search(re.escape(after) + r"\n.*?```python\n(.*?)```", README, re.S)
    assert match is not None, f"no python block after {after!r}"
    return match.group(1)


@pytest.mark.slow
def test_usage_trains_crest_on_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (ROOT / "data" / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST is not in data/ (scripts/fetch-fashion-mnist data)")
    code = python_block("## Usage")
    assert "max_epochs=25" in code
    assert 'datasets.FashionMNIST("data"' in code
    code = code.replace("max_epochs=25", "max_epochs=1, logger=False, enable_checkpointing=False")
    code = code.replace('datasets.FashionMNIST("data"', f"datasets.FashionMNIST({str(ROOT / 'data')!r}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (Usage)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 47  # type: ignore[attr-defined]  # ceil(0.1 * 60000 / 128), as the comment says
    assert trainer.callbacks[0].statistics["selections"] >= 1  # type: ignore[attr-defined]


def test_selection_sketch_runs() -> None:
    torch.manual_seed(0)
    namespace: dict[str, object] = {
        "logits": torch.randn(300, 10),
        "targets": torch.arange(300) % 10,
        "embeddings": torch.randn(300, 32),
        "g_batch": torch.randn(3, 300, 10),
        "labels_batch": (torch.arange(300) % 10).expand(3, 300),
        "big": torch.randn(5000, 10),
    }
    exec(compile(python_block("### Selection on its own"), "README.md (Selection)", "exec"), namespace)
    assert namespace["g"].shape == (300, 10 + 64)  # type: ignore[attr-defined]
    picked = namespace["sel"]
    assert len(picked.indices) == 128  # type: ignore[attr-defined]
    assert float(picked.weights.sum()) == 300  # type: ignore[attr-defined]  # cluster sizes cover the subset


def argument_table(caption: str) -> dict[str, str]:
    """Argument name -> default as written, from the table under ``caption`` in the README's Arguments section."""
    section = README.split("### Arguments\n", 1)[1].split("\n### ", 1)[0]
    table = section.split(caption, 1)[1].split("\n\n", 2)[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {name.strip("| `"): default.strip("`") for name, default, *_ in rows}


@pytest.mark.parametrize("cls", ["CrestCallback", "CrestDataModule"])
def test_argument_tables_match_the_signatures(cls: str) -> None:
    import inspect

    import lightning_crest

    parameters = inspect.signature(getattr(lightning_crest, cls)).parameters
    table = argument_table(f"`{cls}`")
    assert list(table) == list(parameters)  # every argument, in the signature's order
    for name, parameter in parameters.items():
        expected = "(required)" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        assert table[name] == expected.replace("'", '"'), name
