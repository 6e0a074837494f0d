# Two commands for a fresh machine with Python 3.10+ and make: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean prometheus browser compat

# The oldest releases perfmw supports (tests/oldest-constraints.txt), a middle of them
# (tests/middle-constraints.txt) and the newest with nothing else installed beside perfmw
# (tests/newest-constraints.txt: the main venv's test peers hold a few back), for `make compat`.
# Only the tests that these releases can run: pymongo before 4.10 has no AsyncMongoClient, which
# tests/test_mongo.py needs.
COMPAT_VENVS := .venv-oldest .venv-middle .venv-newest
COMPAT_TESTS := tests/test_routes.py tests/test_middleware.py tests/test_compat.py

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

test: lint prometheus browser compat
	$(BIN)/python -m pytest

# SecantusDB asks for pymongo>=4.6 but serves pymongo 4.4 (tests/test_compat.py runs on it), so
# it is installed without its dependency check. Starlette 0.27 warns about the on_startup
# argument one test passes to FastAPI: that warning is not an error there. The 10,000-request
# cap test (a minute on a busy machine) runs in the main venv only: the cap is no release's.
.venv-%/.installed: pyproject.toml tests/%-constraints.txt
	rm -rf .venv-$*
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet -c tests/$*-constraints.txt -e . fastapi motor \
	  opentelemetry-proto opentelemetry-instrumentation-fastapi 'pytest>=8' 'httpx>=0.27,<1' \
	  'uvicorn>=0.30' 'websockets>=12' s2sphere shapely python-dateutil
	.venv-$*/bin/python -m pip install --quiet -c tests/$*-constraints.txt --no-deps SecantusDB
	touch $@

compat: $(COMPAT_VENVS:%=%/.installed)
	@for venv in $(COMPAT_VENVS); do \
	  echo "== $$venv: $$($$venv/bin/python -c 'import fastapi, starlette, pymongo; \
	    from importlib.metadata import version; \
	    print("fastapi", fastapi.__version__, "starlette", starlette.__version__, \
	    "pymongo", pymongo.version, "opentelemetry-sdk", version("opentelemetry-sdk"), \
	    "opentelemetry-instrumentation-fastapi", \
	    version("opentelemetry-instrumentation-fastapi"))')"; \
	  $$venv/bin/python -m pytest -p no:cacheprovider -q \
	    -W 'ignore:The on_startup and on_shutdown parameters are deprecated:DeprecationWarning' \
	    --deselect tests/test_middleware.py::test_ten_thousand_raw_paths_stay_within_max_routes \
	    $(COMPAT_TESTS) || exit 1; \
	done

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
	rm -rf $(VENV) $(COMPAT_VENVS) .pytest_cache .mypy_cache .ruff_cache
