# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench install clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Serve the demo on http://127.0.0.1:8000 (SQLite, in-memory channel layer).
run: $(STAMP)
	$(BIN)/python manage.py migrate --no-input -v 0
	$(BIN)/python manage.py check --fail-level ERROR
	$(BIN)/python manage.py board_demo
	@echo "Serving on http://127.0.0.1:8000  (Ctrl-C stops)"
	DEBUG=1 $(BIN)/daphne -b 127.0.0.1 -p 8000 config.asgi:application

## Run the test suite (SQLite by default; DATABASE_URL and REDIS_URL switch to the services):
## in parallel (TEST_WORKERS, one per CPU up to 4 by default; 1 for one process), then the fault
## tests one at a time (tests/run.py).
test: $(STAMP) browser
	$(BIN)/python tests/run.py $(PYTEST_ARGS)

## Debian's Chromium for the browser tests, installed when missing and apt-get may run.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's chromium and chromium-driver for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
	      || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null); \
	  else echo "chromium is missing: the browser tests will skip (fail under CI)"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .test-db-*.sqlite3* .pytest_cache .mypy_cache .ruff_cache *.egg-info
