#!/usr/bin/env bash
# The GPU check: the quickstart pipeline on CUDA in bf16 with vLLM, on one GPU and then on every visible GPU
# (ZeRO-3 ranks, colocated engines), plus the tests marked `gpu`; prints a table of stage times and peak GPU
# memory. Without CUDA it says so and exits 0. About 10 minutes on one GPU.
#   bash scripts/gpu_check.sh                     # installs the GPU extras into .venv if needed
#   POSTTRAIN_WHEELS=dir bash scripts/gpu_check.sh  # offline machine: install from wheels in dir
#   POSTTRAIN_WHEELS=.whl bash scripts/gpu_check.sh --generation hf   # wheels from scripts/device_kit.sh: no vLLM
#   PYTHON=/path/python bash scripts/gpu_check.sh   # use an environment that already has everything
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi); skipped"
  exit 0
fi
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${POSTTRAIN_WHEELS:-}" ]; then
  # No registry reachable: install posttrain and whatever the wheels bring on top of the machine's python.
  PY=${BASE_PYTHON:-python3}
  "$PY" -m pip install -q --no-index --find-links "$POSTTRAIN_WHEELS" --no-build-isolation --no-deps -e .
  "$PY" -m pip install -q --no-index --no-deps "$POSTTRAIN_WHEELS"/*.whl
  "$PY" -m pip check || echo "gpu_check: (the conflicts above are with the machine's own packages; going on)"
else
  POSTTRAIN_EXTRAS=${POSTTRAIN_EXTRAS:-gpu,merge,dev} bash scripts/setup.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
# test_notebook needs the dev extras (nbclient) only to be collected, and has no test marked gpu.
"$PY" -m pytest -p no:cacheprovider -q -m gpu tests/ --ignore=tests/test_notebook.py
"$PY" scripts/gpu_check.py "$@"
