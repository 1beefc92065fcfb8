# The two commands a newcomer needs are `make demo` and `make test`; the rest serve them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
DEMO_DIR ?= demo-data
DEMO_SIZE ?= 1GiB
BENCH_SIZE ?= 1GiB
BENCH_BEFORE ?=
SIM_SEEDS ?= 20000
SIM_FIRST ?= 1000
SOAK_SEEDS ?= 10
SOAK_OPS ?= 16

.PHONY: setup demo demo-cluster demo-clouds test lint bench bench-control bench-deps simulate \
	soak clean

# Idempotent: creates the virtualenv once, then installs exactly what uv.lock pins.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --upgrade >/dev/null
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --extra dev --quiet
	touch $@

# azurite (Azure Blob's emulator) for the cloud tests and demo: exactly what
# package-lock.json pins.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.synced node_modules/.package-lock.json

# The user's five-part demo on the embedded cluster: status, a 1 GiB run, results, a node
# failing mid-run and the batch finishing anyway, final statistics with verify and restore.
demo: setup
	$(BIN)/multicloud demo --workdir $(DEMO_DIR) --size $(DEMO_SIZE)

# The same with a real registry and six node processes; one is killed with SIGKILL mid-run.
demo-cluster: setup
	$(BIN)/multicloud demo --cluster-mode --workdir $(DEMO_DIR) --size $(DEMO_SIZE)

# The same five parts with the source in an S3 bucket and replicas in S3, GCS and Azure
# Blob: loopback emulators the demo starts and stops (no cloud account needed).
demo-clouds: setup
	$(BIN)/multicloud demo --clouds --workdir $(DEMO_DIR)/clouds --size $(DEMO_SIZE)

test: setup
	$(BIN)/pytest -q -p no:cacheprovider --cov=multicloud --cov-report=term --cov-fail-under=90

# More seeded fault schedules than `make test` plays (it runs seeds 0-999 and a slice per
# commit); SIM_FIRST/SIM_SEEDS choose them. A failure prints its shrunk reproduction.
simulate: setup
	$(BIN)/multicloud simulate --first $(SIM_FIRST) --seeds $(SIM_SEEDS)

# The same schedules against a registry and node processes: SIGKILL, SIGSTOP, registry
# restarts. Tens of seconds a seed; not part of `make test` (which plays one).
soak: setup
	$(BIN)/multicloud simulate --soak --seeds $(SOAK_SEEDS) --ops $(SOAK_OPS)

# ruff, mypy (strict) and the architecture: lint-imports checks that each layer imports only
# the layers below it and that no two modules of a package import each other.
lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

bench-deps:
	@command -v rclone >/dev/null || (apt-get update -qq && apt-get install -y -qq rclone >/dev/null)

# BENCH_BEFORE=<git rev> also runs that revision's embedded pipeline against this one.
bench: setup bench-deps
	$(BIN)/python benchmarks/run_benchmarks.py --size $(BENCH_SIZE) \
		$(if $(BENCH_BEFORE),--before $(BENCH_BEFORE))

# The control plane at scale, no data: placement, manifest commits and registry heartbeats
# for 1,000 simulated nodes in 4 clouds and 1,000,000 chunks (15-20 minutes on 2 cores).
bench-control: $(VENV)/.synced
	$(BIN)/python benchmarks/control_plane_bench.py

clean:
	rm -rf $(VENV) node_modules .multicloud $(DEMO_DIR) bench-out .coverage
