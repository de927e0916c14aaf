#!/usr/bin/env bash
# Keep one redis-server running: deploy/start-redis.sh starts this with setsid.
#   redis-supervisor.sh REDIS_SERVER CONF PIDFILE LOG
# Restarts the server on the same config (and so the same AOF) when it dies:
# kill -9, the OOM killer, a crash. Waits 1, 2, 4 ... 30 s between tries (back
# to 1 s after a run of 10 s or more). Stops, without restarting it, when the
# server exits 0 (SIGTERM or SHUTDOWN: stopped on purpose), and gives up after 5
# starts in a row that each ended within 10 s (a config error, a port someone
# else holds). Its lines go to LOG, next to the server's own.
set -u
bin=$1 conf=$2 pidfile=$3 log=$4
echo $$ > "$pidfile"
trap 'rm -f "$pidfile"' EXIT
delay=1 quick=0
while :; do
    t0=$(date +%s)
    "$bin" "$conf" && rc=0 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "[redis-supervisor] redis-server stopped on purpose (exit 0): not restarted" >> "$log"
        exit 0
    fi
    if [ $(($(date +%s) - t0)) -lt 10 ]; then
        quick=$((quick + 1))
    else
        quick=0 delay=1
    fi
    if [ "$quick" -ge 5 ]; then
        echo "[redis-supervisor] redis-server failed 5 starts in a row (last exit $rc): giving up; fix what the lines above say, then run deploy/start-redis.sh again" >> "$log"
        exit 1
    fi
    echo "[redis-supervisor] redis-server exited $rc: restarting it in $delay s" >> "$log"
    sleep "$delay"
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
