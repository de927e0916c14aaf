#!/usr/bin/env bash
# `apex-dqn train` on a Ray cluster's head node, against the redis-server that
# deploy/start-redis.sh started there. Run it through the cluster launcher:
#   ray exec deploy/cluster.yaml 'bash ~/apex-dqn/deploy/cluster-train.sh --env ALE/Pong-v5 --actors 32' --tmux
# Extra arguments go to `apex-dqn train`; later flags win, so --redis-url or
# --ray-address given here replace the defaults below.
set -euo pipefail
state=${APEX_STATE_DIR:-$HOME/.apex-dqn}
if [ ! -s "$state/redis-url" ]; then
    echo "[cluster-train] $state/redis-url is missing: run deploy/start-redis.sh on the head first (cluster.yaml's head_start_ray_commands do)" >&2
    exit 1
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# APEX_DQN: the command to run (word-split on purpose), e.g. "python -m deploy.cli".
# shellcheck disable=SC2086
exec ${APEX_DQN:-apex-dqn} train --ray-address "${RAY_ADDRESS:-auto}" --redis-url "$(cat "$state/redis-url")" "$@"
