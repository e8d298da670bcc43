# Two commands for a newcomer:  `make run` (main job on the sample world) and `make test`.
# Each builds/updates .venv from pyproject.toml by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geopak-installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install run test test-fast ui bench clean-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dagster job execute -m pipeline.definitions -j run_pipeline_job

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# quick local runs: everything but the end-to-end runs marked slow (CI and `make test` run those too)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

# Ports: GEOPAK_UI_PORT (Dagster UI, 3000) and GEOPAK_REPORTS_URL (report server, http://127.0.0.1:3001).
ui: $(STAMP)
	$(BIN)/geopak ui

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-data:
	rm -rf data
