# One command per job. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
REFUND := $(VENV)/bin/refund
PYTHON ?= python3
N ?= 30

.PHONY: install up down status demo test lint format bench clean histories

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
	$(PY) -m refundsaga.demo

test: install
	$(VENV)/bin/pytest -q

# Re-record the saga histories the replay test checks (after an intended workflow change
# that is guarded by workflow.patched, keep the old files too).
histories: install
	rm -f tests/histories/*.json
	REFUND_RECORD_HISTORIES=1 $(VENV)/bin/pytest -q tests/test_saga.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: down
	rm -rf .data
