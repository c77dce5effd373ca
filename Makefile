# One command per job. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
REFUND := $(VENV)/bin/refund
PYTHON ?= python3
N ?= 30
SEED ?= 1

.PHONY: install up down status demo test lint format bench bench-batch clean histories chaos batch-1000

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

up: install
	$(REFUND) stack up

down:
	@if [ -x $(REFUND) ]; then $(REFUND) stack down; fi

status: install
	$(REFUND) stack status

demo: install
	$(PY) -m console.demo

test: install
	$(VENV)/bin/pytest -q

# Re-record the 1.0 histories the replay test checks (tests/histories/1.0/saga and
# batch-restore, recorded by the fixtures in tests/fixtures/; failed-refund/ is
# tests/test_failed_refund.py's). Only until 1.0 runs in production: after that a change of a
# workflow's commands gets workflow.patched and a new directory, and 1.0 keeps replaying
# (docs/versioning.md).
histories: install
	rm -rf tests/histories/1.0/saga tests/histories/1.0/batch-restore
	REFUND_RECORD_HISTORIES=1 $(VENV)/bin/pytest -q tests/test_saga.py tests/test_saga_events.py
	REFUND_RECORD_HISTORIES=1 $(VENV)/bin/pytest -q -m "not devserver" -k "not expires" tests/test_batch.py tests/test_restore.py
	# On its own server: after the recordings of the tests before it, the time-skipping
	# server no longer skips this test's 72 hours.
	REFUND_RECORD_HISTORIES=1 $(VENV)/bin/pytest -q -m "not devserver" -k expires tests/test_batch.py

# The saga against the naive saga and a no-op baseline, on a stack of its own
# (bench/README.md); N defaults to 500 here.
bench: N = 500
bench: install
	$(PY) -m bench.bench --n $(N)

# One cancelled event of N buyers through the batch path (bench/README.md); N defaults to 1000.
bench-batch: N = 1000
bench-batch: install
	$(PY) -m bench.batch --n $(N)

# N sagas with faults, worker kills and a Temporal restart; checks the invariants.
chaos: install
	$(PY) -m reliability.chaos --n $(N) --seed $(SEED)

# The 1,000-purchase batch on the dev server (about 7 minutes on 2 cores).
batch-1000: install
	REFUND_BATCH_1000=1 $(VENV)/bin/pytest -q -s tests/test_batch.py -k thousand

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: down
	rm -rf .data
