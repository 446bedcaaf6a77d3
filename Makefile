# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if missing (CPU torch pin first), install mrhscale alone, run the demo
#   make test   - the demo's install plus the extras the suite needs, then the test suite
# Both are idempotent: each install step reruns only when pyproject.toml changes. The test
# stamp is made after the demo stamp, so a test environment is always a demo environment too.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.mrhscale-demo
TEST_STAMP := $(VENV)/.mrhscale-test
# the demo needs the core package alone (no extra: mrhscale/demo.py); the suite these extras
TEST_EXTRAS ?= test,matlab,register,s3
# CPU build of torch; see README for a CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=
# test processes (pytest-xdist): the suite is mostly one busy core at a time (one process
# driving a Dask cluster, torch on one thread), so 2 processes halve it on 2 cores; a test
# file stays in one process (its module fixtures are made once). TEST_JOBS=0: one process.
TEST_JOBS ?= 2
# the suite's processes (pytest's, the CLI's, Dask workers, torchrun ranks) import the same
# modules: compiled once into __pycache__ even where PYTHONDONTWRITEBYTECODE is set (each
# pytest process otherwise compiles its ~190 test modules and mrhscale's again, ~7 s)
TEST_ENV ?= env -u PYTHONDONTWRITEBYTECODE

.PHONY: demo test bench env env-demo clean

env: $(TEST_STAMP)

env-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mrhscale needs Python >= 3.11 (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e .
	@touch $(DEMO_STAMP)

$(TEST_STAMP): $(DEMO_STAMP)
	$(PY) -m pip install -q -e ".[$(TEST_EXTRAS)]"
	@touch $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/mrhscale demo --out $(DEMO_OUT)

test: $(TEST_STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
