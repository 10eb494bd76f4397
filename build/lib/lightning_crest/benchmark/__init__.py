"""Benchmark building blocks: datasets (``benchmark.data``) and small vision models (``benchmark.models``).

The submodules import torchvision and the benchmark plots with matplotlib, optional dependencies
(``lightning-crest[vision]``); this package imports nothing at load time, but checks that both are installed, so
that a benchmark never trains for an hour and then fails to draw its plot.
"""

import importlib.util

_missing = [name for name in ("torchvision", "matplotlib") if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"The benchmark needs {' and '.join(_missing)}, which {'is' if len(_missing) == 1 else 'are'} not installed: "
        "pip install 'lightning-crest[vision]' (or '.[vision]' in a checkout)."
    )
