# satellite: `make` builds the .pyz files, `make test` runs the tests, `make demo` runs the demo.
PYTHON ?= python3
VENV   := .venv
PYTEST_ARGS ?=

.PHONY: all build test demo fuzz soak bench clean

all: build

build: dist/satellite.pyz dist/satellite-client.pyz

dist/satellite.pyz dist/satellite-client.pyz: satellite.py satellite_client.py build_zipapp.py
	$(PYTHON) build_zipapp.py

# A venv with the test-only packages (the runtime needs none), and the system tools the tests use.
$(VENV)/.installed: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

test: $(VENV)/.installed build
	tests/setup-system.sh
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

# The fuzz tests with 20,000 examples each instead of CI's 300.
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=long $(VENV)/bin/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

# 10,000 sessions issued, used and ended through 2 workers beside steady load; prints RSS, threads and
# descriptors per worker over time and fails on growth (SOAK_SESSIONS, SOAK_SECONDS, SOAK_WORKERS to change).
SOAK_WORKERS ?= 2
soak: $(VENV)/.installed
	$(VENV)/bin/python bench/soak.py --workers $(SOAK_WORKERS)

# satellite beside configurable-http-proxy, nginx and the direct path (wrk); writes bench/results.md.
# Then nginx and HAProxy deciding at the front vs satellite alone; writes bench/results-front.md.
# Then the spread over 2 and 4 workers and the cost of the shared limits; writes bench/results-workers.md.
bench: $(VENV)/.installed
	tests/setup-system.sh
	$(VENV)/bin/python bench/bench.py
	$(VENV)/bin/python bench/front.py
	$(VENV)/bin/python bench/workers.py

demo: build
	$(PYTHON) contrib/demo.py

clean:
	rm -rf dist .demo .bench .pytest_cache tests/__pycache__ __pycache__
