# make bench: the main job (venv, install, build, `python -m tkpy bench`).
# make test:  venv, install, build, pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
CPU_ONLY := build/cpu-only-install

.PHONY: build test bench test-cpu-only clean

$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests -m "not slow"

bench: build
	$(PY) -m tkpy bench

# A second, CPU-only build (TKPY_DISABLE_CUDA=1) installed aside, running every CPU test.
test-cpu-only: $(DEPS)
	rm -rf $(CPU_ONLY)
	TKPY_DISABLE_CUDA=1 $(PY) -m pip install --no-build-isolation --no-deps --target $(CPU_ONLY) .
	PYTHONPATH=$(CPU_ONLY) $(PY) -c "import tkpy, sys; sys.exit('expected a CPU-only build' if tkpy.cuda_compiled() else 0)"
	PYTHONPATH=$(CPU_ONLY) $(PY) -m pytest tests -m "not slow and not gpu" -p no:cacheprovider

clean:
	rm -rf build python/tkpy/_C*.so
