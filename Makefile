# Two commands for a fresh machine with Python 3.10+ and make: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean prometheus browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.fastapi_app.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy --strict src

test: lint prometheus browser
	$(BIN)/python -m pytest

# promtool and prometheus for the alert-rule and end-to-end tests (Debian package, as root).
prometheus:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "*** prometheus/promtool missing and not installable here (needs root and apt-get):"; \
	    echo "*** the Prometheus tests will be SKIPPED. Install the 'prometheus' package."; \
	  fi; \
	fi

# Chromium for the dashboard's browser tests (Debian package, as root): Playwright drives it at
# /usr/bin/chromium and never downloads a browser of its own.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium; \
	  else \
	    echo "*** chromium missing and not installable here (needs root and apt-get):"; \
	    echo "*** the dashboard's browser tests will FAIL. Install the 'chromium' package."; \
	  fi; \
	fi

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
