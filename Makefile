# Every target bootstraps .venv from pyproject.toml first; nothing else needs installing by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test bench lint format prometheus clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,dataplane,postgres]'
	@rm -f $(VENV)/.installed-*; touch $@

# Debian's prometheus: the data plane's metrics store (demo and tests start it themselves).
prometheus:
	@command -v prometheus >/dev/null || test -x /usr/bin/prometheus || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus)

demo: $(STAMP) prometheus
	$(VENV)/bin/canaryflow demo

test: $(STAMP) prometheus lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff format --check canaryflow tasks flows deployments tests benchmarks
	$(VENV)/bin/ruff check canaryflow tasks flows deployments tests benchmarks
	$(VENV)/bin/mypy canaryflow

format: $(STAMP)
	$(VENV)/bin/ruff format canaryflow tasks flows deployments tests benchmarks
	$(VENV)/bin/ruff check --fix canaryflow tasks flows deployments tests benchmarks

bench: $(STAMP) prometheus
	$(PY) -m benchmarks.run

clean:
	rm -rf .canaryflow $(VENV)
