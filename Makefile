# Two commands a user needs: `make train` and `make test`. Both create .venv and build the
# extension on a fresh machine; later runs reuse them (stamps below).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
EXT_SOURCES := $(wildcard csrc/cpu/* csrc/cuda/* python/*.cpp python/*.h) setup.py pyproject.toml
JOBS   ?= 2

.PHONY: train test test-fast test-slow setup setup-test bench docs clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(PIP) install -r requirements-test.txt
	# CUTLASS/CuTe headers for the sm_90a compile checks; --no-deps: only the headers are needed,
	# not the wheel's Python tooling (scipy, cuda-python, ...).
	$(PIP) install --no-deps nvidia-cutlass==4.2.0.0
	touch $@

$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built
setup-test: $(VENV)/.test-deps $(VENV)/.built

train: setup
	$(PY) -m ernie_core.train examples/configs/sft_tiny.yaml

# The whole suite: the fast tests, then the slow ones (multi-process layouts, long runs) as their own step.
test: setup-test
	$(MAKE) --no-print-directory test-fast
	$(MAKE) --no-print-directory test-slow

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

test-slow: setup-test
	$(PY) -m pytest -q -m "slow" || test $$? -eq 5  # 5: no slow tests collected

bench: setup-test
	$(PY) bench/train_throughput.py --quick

docs: setup
	$(PY) -m ernie_core.config.docs

clean:
	rm -rf build *.egg-info ernie_core/_C*.so output
