# Thin wrappers. `make demo` and `make test` install into .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo-out
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench up down repro clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: pip takes the local CPU wheel instead of pulling GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/transpeft demo --profile demo --out $(OUT)

test: install
	$(PY) -m pytest

repro: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

up: install
	mlflow/up

down:
	mlflow/down

bench: install
	$(PY) bench/bench_core.py

clean:
	rm -rf $(OUT) .pytest_cache
