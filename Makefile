# Two commands for a fresh clone: `make test` (the whole suite) and, once the
# training work lands, `make train`. Everything is installed into .venv from
# this repository's own files; torch is pinned in constraints.txt so pip takes
# the CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
