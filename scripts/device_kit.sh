#!/usr/bin/env bash
# Wheels for running scripts/gpu_check.sh on a GPU machine that has PyTorch but no package registry (the
# lent H200 of this workplace: CPython 3.12, torch and transformers preinstalled, nothing can be fetched).
# Run here, where the registry answers, after scripts/setup.sh: it writes into DIR the packages posttrain
# needs that such an image lacks, at the versions this checkout's .venv holds, built for CPython 3.12 on
# manylinux x86-64, and prints their total size (a lent machine takes 64 MiB of files a call, repo included).
# vLLM's CUDA wheel (hundreds of MB) does not fit: run the check with `--generation hf` there.
#   bash scripts/device_kit.sh .whl          # then, on the GPU machine (python3 holding torch):
#   POSTTRAIN_WHEELS=.whl bash scripts/gpu_check.sh --generation hf
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: scripts/device_kit.sh DIR}
PYVER=${KIT_PYTHON_VERSION:-3.12}
VENV_PY=.venv/bin/python
[ -x "$VENV_PY" ] || { echo "device_kit: no .venv here; run scripts/setup.sh first" >&2; exit 2; }
# posttrain's own requirements and theirs that the image lacks (KINDS.md's package list): torch, numpy,
# pandas, pyarrow, accelerate, safetensors, tokenizers, huggingface-hub and the rest are there already.
# transformers is there too, at another version than the one posttrain pins.
PACKAGES=(transformers trl peft datasets pydantic pydantic_core annotated-types typing-inspection
  typing_extensions datasketch dill multiprocess hjson mergekit immutables)
mkdir -p "$DIR"
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
    { echo "device_kit: $name is not installed in .venv" >&2; exit 2; }
  pins+=("$name==$version")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DIR" "${pins[@]}"
# DeepSpeed publishes only a source archive; built without its compiled ops it is one pure-Python wheel
# (the ops are compiled on first use, with the GPU machine's nvcc).
ds=$("$VENV_PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
DS_BUILD_OPS=0 "$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$ds"
ls -1 "$DIR"
echo "device_kit: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
