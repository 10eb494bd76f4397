# Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench benchmark venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,faiss,vision]'
	touch $(STAMP)

# The main job: CREST and random mini-batches at a 10% budget on Fashion-MNIST with a small CNN.
demo: $(STAMP)
	scripts/fetch-fashion-mnist data
	$(PY) -m lightning_crest.benchmark --methods random,crest --budget 0.1 --seeds 1 --epochs 10 --output outputs/demo.json

lint: $(STAMP)
	$(PY) -m ruff check lightning_crest tests benchmarks notebooks
	$(PY) -m ruff format --check lightning_crest tests benchmarks notebooks
	$(PY) -m mypy lightning_crest

test: lint
	scripts/fetch-fashion-mnist data
	$(PY) -m pytest

# Selection engine speed (prints tables).
bench: $(STAMP)
	scripts/fetch-fashion-mnist data
	$(PY) benchmarks/selection.py

# The full Fashion-MNIST comparison at 10% and 20% budgets (about 80 minutes on 2 cores).
benchmark: $(STAMP)
	scripts/fetch-fashion-mnist data
	$(PY) -m lightning_crest.benchmark --budget 0.1 0.2 --seeds 3 --output benchmarks/results/fashion_mnist.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
