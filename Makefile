# The two commands a newcomer needs are `make demo` and `make test`; the rest serve them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
DEMO_DIR ?= demo-data
DEMO_SIZE ?= 1GiB
BENCH_SIZE ?= 1GiB

.PHONY: setup demo test lint typecheck bench bench-deps clean

# Idempotent: creates the virtualenv once, then installs exactly what uv.lock pins.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --extra dev --quiet
	touch $@

setup: $(VENV)/.synced

# Generates a 1 GiB dataset once, runs it through the embedded cluster, then proves it:
# verify every replica and restore every file byte-exact.
demo: setup
	@test -d $(DEMO_DIR)/aws_s3_bucket || $(BIN)/multicloud gen-data $(DEMO_DIR)/aws_s3_bucket --size $(DEMO_SIZE)
	$(BIN)/multicloud run --source $(DEMO_DIR)/aws_s3_bucket --batch-id demo --data-dir $(DEMO_DIR)/cluster
	$(BIN)/multicloud verify demo --data-dir $(DEMO_DIR)/cluster
	rm -rf $(DEMO_DIR)/restored
	$(BIN)/multicloud restore demo --to $(DEMO_DIR)/restored --data-dir $(DEMO_DIR)/cluster
	diff -r $(DEMO_DIR)/aws_s3_bucket $(DEMO_DIR)/restored && echo "restored copy is byte-identical to the source"
	$(BIN)/multicloud cluster status --data-dir $(DEMO_DIR)/cluster

test: setup
	$(BIN)/pytest -q -p no:cacheprovider --cov=multicloud --cov-report=term --cov-fail-under=90

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench-deps:
	@command -v rclone >/dev/null || (apt-get update -qq && apt-get install -y -qq rclone >/dev/null)

bench: setup bench-deps
	$(BIN)/python benchmarks/run_benchmarks.py --size $(BENCH_SIZE)

clean:
	rm -rf $(VENV) .multicloud $(DEMO_DIR) bench-out .coverage
