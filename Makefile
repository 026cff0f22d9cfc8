# Thin wrappers. `make demo` and `make test` install into .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo-out
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench up down status repro clean

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

# The local stack (Prefect server, MLflow, webhook receiver, worker): transpeft/stack.py.
up: install
	$(VENV)/bin/transpeft stack up

down:
	$(VENV)/bin/transpeft stack down

status:
	$(VENV)/bin/transpeft stack status

bench: install
	$(PY) bench/bench_core.py

clean:
	rm -rf $(OUT) .pytest_cache
