#!/usr/bin/env bash
# `apex-dqn train` on a Ray cluster's head node, against the redis-server that
# deploy/start-redis.sh started there. Run it through the cluster launcher:
#   ray exec deploy/cluster.yaml 'bash ~/apex-dqn/deploy/cluster-train.sh --env ALE/Pong-v5 --actors 32' --tmux
# Extra arguments go to `apex-dqn train`; later flags win, so --ray-address given
# here replaces the default below, and --redis-url / --redis-url-file replace the
# URL passed in APEX_REDIS_URL.
# The URL (it holds the Redis password) goes through the environment, never argv:
# argv is visible to every local user in ps and as a Ray job's entrypoint.
set -euo pipefail
state=${APEX_STATE_DIR:-$HOME/.apex-dqn}
if [ ! -s "$state/redis-url" ]; then
    echo "[cluster-train] $state/redis-url is missing: run deploy/start-redis.sh on the head first (cluster.yaml's head_start_ray_commands do)" >&2
    exit 1
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # as the cluster yamls start Ray
APEX_REDIS_URL=$(cat "$state/redis-url")
export APEX_REDIS_URL
# APEX_DQN: the command to run (word-split on purpose), e.g. "python -m deploy.cli".
# shellcheck disable=SC2086
exec ${APEX_DQN:-apex-dqn} train --ray-address "${RAY_ADDRESS:-auto}" "$@"
