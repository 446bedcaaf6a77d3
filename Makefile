# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if missing (CPU torch pin first), install, run the demo
#   make test   - same bootstrap, then the test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mrhscale-installed
# CPU build of torch; see README for a CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: demo test bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mrhscale needs Python >= 3.11 (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,matlab,register,s3]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mrhscale demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
