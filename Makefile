# Two commands for a fresh clone: `make test` (the whole suite) and `make train`
# (the toy translation demo: trains, prints test scores, writes runs/toy_translation/version_N/, a new N each run). Everything is installed into .venv from
# this repository's own files; torch is pinned in constraints.txt so pip takes
# the CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-oldest lint train bench figures gpu-check clean

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

# The whole suite on the oldest torch the package supports (pyproject.toml's floor), in a
# second environment. PyPI has no CPU-only build of that release: pip takes the CUDA one and
# the NVIDIA libraries its import loads (about 4.6 GB; the tests run on the CPU).
VENV_OLDEST := .venv-oldest
STAMP_OLDEST := $(VENV_OLDEST)/.installed

$(STAMP_OLDEST): pyproject.toml constraints-oldest.txt
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install --quiet --upgrade pip
	$(VENV_OLDEST)/bin/pip install --quiet -c constraints-oldest.txt -e '.[dev]'
	touch $(STAMP_OLDEST)

test-oldest: $(STAMP_OLDEST)
	$(VENV_OLDEST)/bin/pytest -q

train: $(STAMP)
	$(BIN)/attention-train --config configs/toy_translation.yaml

bench: $(STAMP)
	$(BIN)/attention-bench --device cpu --config configs/bench/small.yaml

# The README's table of current figures, rewritten from the committed results
# (`python scripts/readme_figures.py --check` says whether it is current).
figures: $(STAMP)
	$(BIN)/python scripts/readme_figures.py

# What a session lent a GPU runs (README, "Benchmarks"): tests on cuda, a compiled bf16
# training run and the base and long benchmarks, results in OUT (the device machine sets
# OUT itself). With that machine's own python3, no .venv: nothing is installed. Where torch
# sees no CUDA device it prints one line and runs nothing.
OUT ?= gpu-results

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(OUT)

clean:
	rm -rf $(VENV) $(VENV_OLDEST) .pytest_cache .hypothesis .ruff_cache
