# Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,faiss,vision]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/selection.py

lint: $(STAMP)
	$(PY) -m ruff check lightning_crest tests benchmarks
	$(PY) -m ruff format --check lightning_crest tests benchmarks
	$(PY) -m mypy lightning_crest

test: lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/selection.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
