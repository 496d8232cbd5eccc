# dialog-shard: `make run` serves on 127.0.0.1:50051, `make test` runs the suite.
# Both create the virtualenv on first use from the locked versions in requirements/ (`make test` also
# `npm ci` for the buf CLI the README and API-compatibility tests run); nothing else is needed but
# Python 3.11+, make and npm. `make lock` refreshes the locks on purpose.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed-stamp
#: Every package of the dev virtualenv, exact versions with hashes (uv pip compile); the runtime
#: lock is the subset the server needs, for deploy/Dockerfile.
DEV_LOCK := requirements/dev.lock
RUNTIME_LOCK := requirements/runtime.lock
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet
NODE_INSTALLED := node_modules/.installed-stamp
PY_SOURCES := server client tests scripts bench examples
#: The last released API (a buf image); `make lint` refuses changes that break it.
API_BASELINE := api/released.json

.PHONY: all install lock run test lint fmt proto proto-check api-release clean bench bench-quick bench-scale bench-rebalance bench-archive cluster

all: lint test

# Only what the lock names, checked against its hashes; then the project itself, without resolving
# anything and with the locked setuptools as its build backend.
$(INSTALLED): $(DEV_LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(INSTALLED)

## Re-resolve requirements/*.lock from pyproject.toml to the newest allowed versions (on purpose only),
## then reinstall; regenerate the stubs with `make proto` if grpcio-tools moved.
lock: $(INSTALLED)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra dev --extra embedded $(LOCK_FLAGS) \
		--upgrade --output-file $(DEV_LOCK)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) --upgrade --output-file $(RUNTIME_LOCK)
	$(MAKE) install

$(NODE_INSTALLED): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## Serve in the foreground with an embedded PostgreSQL (4 shard tables) under .data/.
run: $(INSTALLED)
	$(BIN)/dialog-server --dev

## N local PostgreSQL servers (one shard each, default 4) + the service, in the foreground; data in .data/cluster/.
## e.g. make cluster CLUSTER_ARGS="--shards 2 --base-port 55000"
cluster: $(INSTALLED)
	$(BIN)/python scripts/local_cluster.py $(CLUSTER_ARGS)

## The test suite: real PostgreSQL servers and a real gRPC server, started by the fixtures;
## node_modules brings the buf CLI that the README and API-compatibility tests call.
test: $(INSTALLED) $(NODE_INSTALLED)
	$(BIN)/pytest

## Benchmark on local PostgreSQL shards with h2load and pgbench (~5 min); results in bench-results/.
## BENCH_ARGS passes options through, e.g. BENCH_ARGS="--repeats 5 --workers 1".
bench: $(INSTALLED)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## The same in one short round (~1 min): a smoke test of the numbers, not a measurement to quote.
bench-quick: $(INSTALLED)
	$(BIN)/python -m bench.run --quick

## Throughput and CPU per 1,000 messages over 1, 2 and 4 shard servers and 1 and 2 worker processes (~6 min).
bench-scale: $(INSTALLED)
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

## SendMessage throughput and p99 while the automatic rebalancer moves a hot shard's pairs, and without it (~2 min).
bench-rebalance: $(INSTALLED)
	$(BIN)/python -m bench.rebalance $(REBALANCE_ARGS)

## The archive (~2 min): bytes per message in PostgreSQL vs the Parquet files, messages archived per
## second, and GetDialog latency of a hot page vs the first and a deep archived page.
bench-archive: $(INSTALLED)
	$(BIN)/python -m bench.archive $(ARCHIVE_ARGS)

lint: $(INSTALLED) $(NODE_INSTALLED)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/mypy server client bench tests
	$(BIN)/lint-imports
	$(BIN)/python scripts/gen_protos.py --check
	npx --no-install buf lint
	npx --no-install buf format -d --exit-code protos
	npx --no-install buf breaking --against $(API_BASELINE)

fmt: $(INSTALLED)
	$(BIN)/ruff format $(PY_SOURCES)
	$(BIN)/ruff check --fix $(PY_SOURCES)

## Regenerate client/gen from protos/ (reproducible: `make proto` on a clean tree leaves no diff).
proto: $(INSTALLED)
	$(BIN)/python scripts/gen_protos.py

proto-check: $(INSTALLED)
	$(BIN)/python scripts/gen_protos.py --check

## At a release: record protos/ as the released API that `make lint` (buf breaking) compares against.
api-release: $(NODE_INSTALLED)
	npx --no-install buf build --exclude-source-info -o $(API_BASELINE)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
