#!/usr/bin/env bash
# Set up ./.venv on first use, then run `apex-dqn train` with the given flags
# (default: Pong on local Ray with an embedded redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/apex-dqn train "$@"
