"""Execute the notebooks in ``notebooks/`` and check what they print.

Each notebook trains small models on CPU (well under a minute each). They read Fashion-MNIST from
``$LIGHTNING_CREST_DATA`` (default ``data/`` in the repository root) and fall back to a synthetic data set when the
files are missing, so these tests run either way.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"


def _kernel_python() -> None:
    """Fail early, with a clear message, unless the ``python3`` kernel runs this interpreter.

    jupyter_client launches a kernelspec whose ``argv[0]`` is ``python`` with ``sys.executable``; ipykernel's
    wheel installs such a spec into ``<venv>/share/jupyter/kernels/python3``.
    """
    try:
        spec = kernelspec.KernelSpecManager().get_kernel_spec(KERNEL)
    except kernelspec.NoSuchKernel:
        pytest.fail(f"no {KERNEL!r} kernelspec; run `{sys.executable} -m ipykernel install --sys-prefix`")
    program = spec.argv[0]
    if program not in ("python", "python3") and Path(program).resolve() != Path(sys.executable).resolve():
        pytest.fail(
            f"the {KERNEL!r} kernelspec runs {program}, not this interpreter ({sys.executable}); "
            f"run `{sys.executable} -m ipykernel install --sys-prefix`"
        )


def execute(name: str) -> tuple[Any, float]:
    """Run ``notebooks/<name>`` with the repository root as working directory; return it and the seconds taken."""
    _kernel_python()
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def stream_text(nb: Any) -> str:
    """Everything the notebook's code cells printed to stdout."""
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


def figures(nb: Any) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: commit notebooks with their outputs cleared"
            assert cell.execution_count is None
    assert str(ROOT) not in NOTEBOOKS.joinpath(name).read_text(), f"{name} holds an absolute path"


def test_quickstart() -> None:
    nb, seconds = execute("01_quickstart.ipynb")
    text = stream_text(nb)
    print(f"01_quickstart.ipynb executed in {seconds:.1f} s")
    assert re.search(r"^data: .+; 2000 training and 1000 test images, 10 classes$", text, re.M)
    # The table read back from the CSV logger has the crest/* columns and at least one selection.
    assert re.search(r"step\s+selections\s+rho\s+check_interval\s+num_coresets\s+pool_size", text)
    selections = re.search(r"^(\d+) selections in (\d+) steps", text, re.M)
    assert selections is not None
    assert 1 <= int(selections[1]) <= int(selections[2])
    accuracies = dict(re.findall(r"^\s+(CREST coresets|random mini-batches):\s+([0-9.]+)$", text, re.M))
    assert "test accuracy" in text
    assert set(accuracies) == {"CREST coresets", "random mini-batches"}
    for value in accuracies.values():
        assert 0.3 < float(value) <= 1.0  # both learn well above chance (0.1)
    assert figures(nb) >= 1


def test_what_crest_selects() -> None:
    nb, seconds = execute("02_what_crest_selects.ipynb")
    text = stream_text(nb)
    print(f"02_what_crest_selects.ipynb executed in {seconds:.1f} s")
    # The notebook asserts the invariants of every selection itself; this is the line it prints after them.
    checked = re.search(r"^checked (\d+) selections, (\d+) coresets of 32: sizes", text, re.M)
    assert checked is not None
    assert int(checked[1]) >= 2
    assert re.search(r"^  loss ratio selected/pool: +[0-9.]+ -> [0-9.]+$", text, re.M)
    assert re.search(r"^weights: min [0-9.]+, median [0-9.]+, max [0-9.]+", text, re.M)
    assert re.search(r"^excluded \d+ of 1500 examples", text, re.M)
    assert figures(nb) >= 5
    if "data: Fashion-MNIST" in text:  # what the text says of the run, which it observed on Fashion-MNIST
        heavy = re.search(
            r"^mean loss at selection: weight > 1: ([0-9.]+), weight <= 1: ([0-9.]+)$", text, re.M
        )
        assert heavy is not None
        assert float(heavy[1]) < float(heavy[2])  # heavier picks stand for easier examples
        excluded = re.search(
            r"^excluded (\d+) of 1500 examples; .*: excluded ([0-9.]+), still in the pool ([0-9.]+)$",
            text,
            re.M,
        )
        assert excluded is not None
        assert int(excluded[1]) > 0
        assert float(excluded[2]) < float(excluded[3])
