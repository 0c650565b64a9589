# Common tasks. Run `make check` for everything CI runs.
PYTHON ?= python
SOURCES = acsp services scheduler agents tools tests bench

.PHONY: check lint format typecheck protos proto-check test

check: lint typecheck proto-check test

lint:
	$(PYTHON) -m ruff check $(SOURCES)
	$(PYTHON) -m ruff format --check $(SOURCES)

format:
	$(PYTHON) -m ruff format $(SOURCES)
	$(PYTHON) -m ruff check --fix $(SOURCES)

typecheck:
	$(PYTHON) -m mypy acsp services scheduler agents

protos:
	$(PYTHON) tools/gen_protos.py

proto-check:
	./tools/check_protos.sh

test:
	$(PYTHON) -m pytest -q
