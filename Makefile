# Thin wrappers. `make demo` and `make test` install into .venv first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-and-serve study test faults bench up up-scale down status repro clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: pip takes the local CPU wheel instead of pulling GBs of CUDA packages.
	# TORCH_INDEX_URL picks another build of it (the Dockerfile's GPU variant).
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# The rest through uv, which fetches and installs in parallel: the same pinned versions in about a
	# minute where pip takes 3. It keeps the torch above (it satisfies the pin). Compiled to bytecode
	# as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else would, and every process would
	# compile MLflow, Prefect and transformers again on import.
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[test,scale]"
	touch $@

install: $(VENV)/.installed

# The whole story (transpeft/demo/story.py): data, bases, the local stack, the fleet, v2 and v3, the report.
demo: install
	$(VENV)/bin/transpeft story --report demo-report

# The container's command: the story, then the stack stays up (its UIs) while the worker's log streams.
demo-and-serve: demo
	tail -F .stack/logs/worker.log

# The transfer study on the demo family (transpeft/study.py), its strategies phase included: about an hour on
# 2 CPU cores, resumable.
study: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro study

# The fault suite, the story and the stack's restarts run beside the rest, their output printed after
# it: most of their time is spent waiting (a minute of silence before Prefect marks a killed run
# Crashed, a server's outage, MLflow's retry backoff, flow runs polled) while the rest computes.
FAULTS_LOG := $(or $(TMPDIR),/tmp)/transpeft-faults-$(shell echo $$PPID).log
BESIDE := tests/faults tests/test_story.py tests/test_stack.py
test: install
	@$(PY) -m pytest $(BESIDE) --basetemp="$(FAULTS_LOG).tmp" > "$(FAULTS_LOG)" 2>&1 & faults=$$!; \
	$(PY) -m pytest $(addprefix --ignore=,$(BESIDE)); rest=$$?; \
	wait $$faults; fault_status=$$?; \
	echo; echo "== $(BESIDE), run beside the rest:"; cat "$(FAULTS_LOG)"; \
	rm -rf "$(FAULTS_LOG)" "$(FAULTS_LOG).tmp"; \
	exit $$(( rest || fault_status ))

# The fault-injection suite alone (part of `make test`), writing what it measured for the README's table.
faults: install
	TRANSPEFT_FAULTS_REPORT=tests/faults/results.json $(PY) -m pytest tests/faults -q

repro: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The local stack (Prefect server, MLflow, webhook receiver, worker): transpeft/stack.py.
up: install
	$(VENV)/bin/transpeft stack up

# The at-scale configuration on this machine: PostgreSQL, an S3-compatible server, a Dask cluster.
up-scale: install
	$(VENV)/bin/transpeft stack up --scale

down:
	$(VENV)/bin/transpeft stack down

status:
	$(VENV)/bin/transpeft stack status

bench: install
	$(PY) bench/bench_core.py

clean:
	rm -rf demo-report .pytest_cache
