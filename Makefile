# Every target does its own set-up: a .venv, installed once and re-installed when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PORT ?= 3000
export JUICER_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(JUICER_DATA_DIR)/dagster_home

.PHONY: install browser system-packages demo test test-slow ui clean-data

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/juicer demo

# Debian packages the tests start themselves on 127.0.0.1: headless Chromium (browser tests), Redis
# (celery broker) and PostgreSQL (Dagster instance). Installed here, so `make test` passes alone.
system-packages:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then export DEBIAN_FRONTEND=noninteractive; echo "installing:$$missing"; \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }; fi

browser: system-packages

# `make test` is the default suite; the slow end-to-end tests (real servers, daemons, several juiced
# drops, benchmark smoke runs) run with `make test-slow`. CI (.ci/run) runs both.
test: $(STAMP) system-packages
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP) system-packages
	$(VENV)/bin/python -m pytest -q -m slow

ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	@echo "Dagster UI: http://127.0.0.1:$(PORT)   (DAGSTER_HOME=$(DAGSTER_HOME))"
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

# docs/settings.md, generated from the field descriptions in juicer_pipeline/settings.py (a test fails when stale).
.PHONY: docs
docs: $(STAMP)
	$(VENV)/bin/python -m juicer_pipeline.settings_reference --write docs/settings.md

clean-data:
	rm -rf data/drops data/world data/warehouse data/catalog.duckdb data/dagster_home
