# The two-command promise: `make demo` and `make test` on a fresh Debian 12 with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench faults system-deps venv libvirt-python clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# libvirt-python when libvirt's headers are there (after `make system-deps`); see pyproject.toml.
libvirt-python: venv
	@$(BIN)/python -c 'import libvirt' 2>/dev/null || ! pkg-config --exists libvirt 2>/dev/null || \
		$(BIN)/pip install -q -e '.[dev,libvirt]'

venv: $(STAMP)

demo: venv
	$(BIN)/siterecovery demo

# Installs the real peers the tests run against (qemu-img/qemu-io, nbdinfo/nbdcopy, fio, rsync,
# Go + govmomi for vcsim, Chromium for the portal) when they are missing.
system-deps:
	bash scripts/install-system-deps.sh

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports  # the layer contracts in pyproject.toml

typecheck: venv libvirt-python
	$(BIN)/mypy src

pytest: venv libvirt-python
	$(BIN)/pytest -q -p no:cacheprovider --durations=30

test: system-deps lint typecheck pytest

# Every bench in bench/ (see bench/README.md); results go to bench/results/. At the default scale
# the capture bench's sustained phase runs 60 s (RPO sampled while it runs). A quick pass:
# `make bench BENCH_SCALE=0.1`; some of them: `make bench BENCHES="rpo points"`.
bench: BENCH_SCALE ?= 1.0
bench: venv system-deps
	SITERECOVERY_BENCH_SCALE=$(BENCH_SCALE) $(BIN)/python -m bench $(BENCHES)

# The fault-injection soak (docs/faults.md): FAULT_KILLS kill -9's under a live writer, seeded by
# FAULT_SEED, plus the corruption, link-cut (FAULT_CUT seconds) and full-volume cases; figures go
# to bench/results/faults.md. `make test` runs the same suite as a short seeded pass (12 kills, a
# 12 s cut).
faults: FAULT_KILLS ?= 50
faults: FAULT_SEED ?= 1
faults: FAULT_CUT ?= 30
faults: venv system-deps
	SITERECOVERY_FAULT_KILLS=$(FAULT_KILLS) SITERECOVERY_FAULT_SEED=$(FAULT_SEED) \
	SITERECOVERY_FAULT_CUT_SECONDS=$(FAULT_CUT) \
	SITERECOVERY_FAULT_RESULTS=bench/results/faults.md $(BIN)/pytest -q -p no:cacheprovider -rxX --timeout 3600 tests/faults

clean:
	rm -rf $(VENV) build src/*.egg-info
