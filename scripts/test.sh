#!/usr/bin/env bash
# Install (if needed), lint and format-check with ruff, and run the whole test suite, slow end-to-end tests included.
#   bash scripts/test.sh -m "not slow"     # the quick part only (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .  # settings in pyproject.toml [tool.ruff]; a finding fails CI
.venv/bin/ruff format --check .  # a file `ruff format` would change fails CI too: run `.venv/bin/ruff format .`
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
