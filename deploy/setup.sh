#!/usr/bin/env bash
# Create ./.venv and install apex-dqn into it, with a torch build that fits this
# machine. Idempotent: a second run only reinstalls when pyproject.toml changed.
#   PYTHON=python3.12      interpreter to build the venv from (default python3)
#   TORCH_SPEC="torch==X"  torch requirement to install first (default: the CPU-
#                          tested pin without a GPU, the newest CUDA build with one)
#   TORCH_INDEX_URL=URL    e.g. https://download.pytorch.org/whl/cpu for a small CPU build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "apex-dqn needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1). Set PYTHON=python3.11 (or newer)." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then spec=$TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch>=2.4"
    else spec="torch==2.13.0"; fi
    echo "[setup] installing $spec"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" install "$spec" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" install "$spec"
    fi
fi
stamp=.venv/.apex-dqn-installed
want=$(cat pyproject.toml | cksum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing apex-dqn and its dependencies into .venv"
    # extras: test (pytest, ruff) and wandb (--track wandb; tests/test_tracking.py runs it offline)
    "${PIP[@]}" install -e ".[test,wandb]"
    echo "$want" > "$stamp"
fi
