# The two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.corespond-installed
DEMO_CONFIG := config/demo.yaml

.PHONY: demo test test-packages lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes; the install is editable, so code changes
# need nothing.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/corespond db upgrade -c $(DEMO_CONFIG)
	$(BIN)/corespond run -c $(DEMO_CONFIG)

test: $(STAMP) test-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The Debian packages the tests drive: PostgreSQL's server binaries (the suite starts its own
# server) and headless Chromium with its driver (the web-page tests). Installed when missing
# and this is root on a machine with apt-get; otherwise the tests that need them say so.
test-packages:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing the Debian packages the tests need:$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			$$missing >/dev/null; } || echo "could not install:$$missing"; \
	else \
		echo "the tests need the Debian packages:$$missing (apt-get install$$missing)"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy daemon adapters rules

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var build *.egg-info
