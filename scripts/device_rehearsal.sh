#!/usr/bin/env bash
# Rehearses the GPU run on this machine, without a GPU, in the device's software: a Python 3.12 venv
# with torch 2.11.0 (CUDA 13.0) and the device's package versions (no diffusers there). It builds
# tkpy in that venv, which `gpu_run.py prep` then carries to the device (.gpu-carry/), collects the
# GPU tests and benchmarks, and runs the harness's own tests, dry runs included. Downloads several
# GB the first time; not part of CI. Run it whenever the harness or the build changes, and before
# every device lease (the carried build must match the sources).
#
#   scripts/device_rehearsal.sh          REHEARSAL_VENV (default .rehearsal-venv), PYTHON312 (python3.12)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${REHEARSAL_VENV:-$REPO/.rehearsal-venv}
PY=$VENV/bin/python
start=$(date +%s)

if [[ ! -x $PY ]]; then
    "${PYTHON312:-python3.12}" -m venv "$VENV"
fi
# The device's versions (the tool library's KINDS.md, 2026-11); the build tools as in requirements-dev.txt.
"$PY" -m pip install -q torch==2.11.0 numpy==2.5.2 transformers==5.17.0 triton==3.6.0 safetensors==0.8.0 \
    tokenizers==0.23.2 pytest pytest-xdist pytest-benchmark hypothesis nvidia-ml-py tqdm \
    matplotlib setuptools wheel cmake==4.4.4 ninja==1.13.2 nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
"$PY" -c "import sys, torch; print('rehearsal: Python', sys.version.split()[0], 'torch', torch.__version__)"

echo "rehearsal: build for the device and fill .gpu-carry/"
# The carried build holds the tile library's self-test ops, which the device's GPU tests run first.
TKPY_SELFTEST=1 "$PY" scripts/gpu_run.py prep --python "$PY"

echo "rehearsal: collect what the device runs"
for what in tests benchmarks; do
    PYTHONPATH=python "$PY" -m pytest "$what" -m gpu --collect-only -q -p no:cacheprovider | tail -1
done

echo "rehearsal: the harness's tests, its dry runs included, under the device's versions"
PYTHONPATH=python "$PY" -m pytest tests/test_gpu_run.py -q -p no:cacheprovider
echo "rehearsal: passed in $(( $(date +%s) - start )) s"
