# The README's two commands:  make demo  |  make test
# Both create .venv on first use. torch==2.13.0 is installed first: on these machines it
# is a local CPU wheel, while a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdexp-installed

.PHONY: setup demo test test-all docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q 'torch>=2.2,<2.15'
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup          ## teacher → Hinton-KD student and CE-only student on MNIST-1D, with a summary
	$(BIN)/kdexp demo

test: setup          ## the test suite (slow end-to-end tests excluded; see test-all)
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

docs: setup          ## the documentation site in site/ (open site/index.html); warnings are errors
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf outputs .pytest_cache site
