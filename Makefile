# rskdist: the two quick-start commands and their helpers.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: demo test test-fast test-slow install bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Re-install when the project's dependency list changes.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job.
demo: $(STAMP)
	bash launchers/demo.sh $(ARGS)

# Default tier: unit + distributed + integration (slow tests excluded).
test: $(STAMP)
	$(VPY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow and not gpu and not distributed and not integration" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VPY) -m pytest -m "slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) tools/bench_loss.py

clean:
	rm -rf $(VENV) runs .pytest_cache
