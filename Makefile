# `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: most tests are compile-bound, on one core each.
TEST_WORKERS ?= 2

.PHONY: demo test test-slow install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,video,envs,mujoco]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wm demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf runs/demo
