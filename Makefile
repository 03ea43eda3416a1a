# Hounsfield: developer and CI entry points. `make run` and `make test` work on a fresh clone with no
# configuration (embedded PostgreSQL and blobs in ./var). Every target is idempotent and quiet when there is
# nothing to do.

SHELL := /bin/bash
.DEFAULT_GOAL := test
MAKEFLAGS += --no-print-directory

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
# Debian packages the tests need (dcmtk: the DIMSE peers echoscu, storescu, findscu, movescu, getscu, storescp;
# chromium: the headless browser that runs OHIF in tests/e2e/test_ohif*.py; orthanc and orthanc-dicomweb: the PACS
# peer of tests/e2e/test_orthanc_peer.py). Installed only when missing.
APT_PACKAGES ?= dcmtk chromium orthanc orthanc-dicomweb
# The npm project of the browser tests (OHIF's prebuilt viewer and playwright-core, pinned in package-lock.json).
BROWSER_DIR := tests/browser
BROWSER_STAMP := $(BROWSER_DIR)/node_modules/.package-lock.json
# Extra arguments: `make run ARGS="--port 18080 --data /tmp/hf"`, `make test ARGS="tests/dicomweb/test_stow.py -x"`.
ARGS ?=

.PHONY: venv run test lint system-deps browser-deps

venv: $(STAMP)
	@:

$(VENV)/bin/python:
	@echo "creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)

# Re-install only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "installing hounsfield and its test dependencies into $(VENV)"
	@$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,models]'
	@touch $@

run: venv
	@exec $(VENV)/bin/hounsfield serve $(ARGS)

test: venv system-deps browser-deps
	@RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/python -m pytest -q -p no:cacheprovider $(ARGS)

lint: venv
	@$(VENV)/bin/ruff check server dicomweb authz fhir inference tests conformance benchmarks
	@$(VENV)/bin/mypy
	@$(VENV)/bin/mypy conformance

# Installs the missing packages of APT_PACKAGES with apt-get, as root or through sudo. With CI=true a package
# that cannot be installed is an error; elsewhere it is a warning (tests needing it then fail or skip).
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else \
		echo "system-deps: cannot install$$missing (not root, no sudo)" >&2; \
		if [ "$${CI:-}" = true ]; then exit 1; fi; exit 0; \
	fi; \
	echo "system-deps: installing$$missing"; \
	if ! { $$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; then \
		echo "system-deps: apt-get could not install$$missing" >&2; \
		if [ "$${CI:-}" = true ]; then exit 1; fi; \
	fi

# `npm ci` for the browser tests, only when package-lock.json or package.json is newer than node_modules (npm
# writes the stamp). Install scripts are off: nothing runs at install time and nothing is downloaded later (no
# `playwright install`; the browser is Debian's chromium). Missing npm is an error with CI=true, else a warning.
browser-deps: $(BROWSER_STAMP)
	@:

$(BROWSER_STAMP): $(BROWSER_DIR)/package-lock.json $(BROWSER_DIR)/package.json
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "browser-deps: npm not found (Node.js 20 is needed for tests/e2e/test_ohif*.py)" >&2; \
		if [ "$${CI:-}" = true ]; then exit 1; fi; exit 0; \
	fi; \
	echo "browser-deps: npm ci in $(BROWSER_DIR)"; \
	cd $(BROWSER_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null && touch node_modules/.package-lock.json
