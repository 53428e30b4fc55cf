# `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: most tests are compile-bound, on one core each.
TEST_WORKERS ?= 2

.PHONY: demo test test-slow lint install browser clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,video,envs,mujoco]"
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the `wm play` browser test (skipped without it); Playwright drives
# it, nothing is downloaded from elsewhere.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "apt-get could not install chromium: the browser test will be skipped"; \
	else echo "no /usr/bin/chromium and no root apt-get: the browser test will be skipped"; fi

demo: $(STAMP)
	$(BIN)/wm demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check wm_jax data_pipelines tests experiments
	$(BIN)/ruff format --check wm_jax data_pipelines tests experiments  # `ruff format` fixes it
	$(BIN)/lint-imports  # the import contracts in pyproject.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf runs/demo
