#!/usr/bin/env bash
# Prometheus and Grafana on a Ray head, for the dashboard's metric charts and the
# Ape-X Grafana dashboard. cluster.yaml's head_start_ray_commands run it after
# `ray start --head` (which they give RAY_PROMETHEUS_HOST and RAY_GRAFANA_HOST
# pointing here); its head_setup_commands install both from signed apt
# repositories (Ubuntu's `prometheus`, Grafana's apt.grafana.com).
#
# - Prometheus scrapes every Ray node that Ray lists in
#   $RAY_TMP/prom_metrics_service_discovery.json (the head keeps it current,
#   through restarts: it is a link to the running session's file), keeps its data
#   under $APEX_STATE_DIR/prometheus, and listens on 127.0.0.1:$APEX_PROMETHEUS_PORT.
# - Grafana runs on the grafana.ini that `ray start` wrote into the session
#   (anonymous Viewer, embedding allowed, Ray's dashboards and its Prometheus
#   data source provisioned), with deploy/grafana/dashboards/apex-dqn.json
#   copied next to Ray's dashboards; it listens on 127.0.0.1:$APEX_GRAFANA_PORT,
#   keeps its data under $APEX_STATE_DIR/grafana. Without Grafana installed it is
#   skipped with a warning.
# Both listen on loopback only: reach them through SSH
# (`ray attach deploy/cluster.yaml -p 8265 -p 3000 -p 9090`).
#
# Each run stops the Prometheus and Grafana that an earlier run started (their
# pid files) and starts them again, so a Ray restart (new session, new Grafana
# config) is picked up. Logs: $APEX_STATE_DIR/{prometheus,grafana}/*.log.
#   APEX_STATE_DIR         default ~/.apex-dqn
#   APEX_PROMETHEUS_PORT   default 9090
#   APEX_GRAFANA_PORT      default 3000
#   RAY_TMP                Ray's --temp-dir, default /tmp/ray
set -euo pipefail
umask 077
state=${APEX_STATE_DIR:-$HOME/.apex-dqn}
prom_port=${APEX_PROMETHEUS_PORT:-9090}
grafana_port=${APEX_GRAFANA_PORT:-3000}
ray_tmp=${RAY_TMP:-/tmp/ray}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$state/prometheus" "$state/grafana"
chmod 700 "$state"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_old() {  # the process an earlier run started, by its pid file
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

wait_listening() {  # port, pid, name, log
    for _ in $(seq 300); do
        listening "$1" && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "[start-metrics] $3 exited; its log, $4:" >&2
            tail -n 20 "$4" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "[start-metrics] $3 is not listening on 127.0.0.1:$1 after 30 s; see $4" >&2
    return 1
}

# ---- Prometheus
stop_old "$state/prometheus/prometheus.pid"
if listening "$prom_port"; then
    echo "[start-metrics] port $prom_port is taken by another process: not starting Prometheus (set APEX_PROMETHEUS_PORT and RAY_PROMETHEUS_HOST)" >&2
    exit 1
fi
prom=$(command -v prometheus || true)
if [ -z "$prom" ]; then
    echo "[start-metrics] prometheus is not installed: sudo apt-get install --no-install-recommends prometheus (cluster.yaml's head_setup_commands do)" >&2
    exit 1
fi
cat > "$state/prometheus/prometheus.yml" <<CONF
# written by deploy/start-metrics.sh: every Ray node Ray lists, every 10 s (as Ray's own config)
global:
  scrape_interval: 10s
  evaluation_interval: 10s
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ['$ray_tmp/prom_metrics_service_discovery.json']
CONF
setsid nohup "$prom" --config.file="$state/prometheus/prometheus.yml" \
    --web.listen-address="127.0.0.1:$prom_port" \
    --storage.tsdb.path="$state/prometheus/data" \
    >"$state/prometheus/prometheus.log" 2>&1 </dev/null &
echo $! >"$state/prometheus/prometheus.pid"
wait_listening "$prom_port" "$!" Prometheus "$state/prometheus/prometheus.log"
echo "[start-metrics] Prometheus on 127.0.0.1:$prom_port (pid $(cat "$state/prometheus/prometheus.pid"))"

# ---- Grafana
stop_old "$state/grafana/grafana.pid"
grafana=$(command -v grafana || true)
if [ -z "$grafana" ]; then
    echo "[start-metrics] warning: Grafana is not installed (cluster.yaml's head_setup_commands install it from apt.grafana.com); the dashboard's charts stay empty" >&2
    exit 0
fi
ini="$ray_tmp/session_latest/metrics/grafana/grafana.ini"
for _ in $(seq 600); do [ -s "$ini" ] && break; sleep 0.1; done  # the dashboard writes it at start
if [ ! -s "$ini" ]; then
    echo "[start-metrics] $ini is missing: start Ray first (ray start --head), then run this again" >&2
    exit 1
fi
if listening "$grafana_port"; then
    echo "[start-metrics] port $grafana_port is taken by another process: not starting Grafana (set APEX_GRAFANA_PORT and RAY_GRAFANA_HOST)" >&2
    exit 1
fi
cp "$repo/deploy/grafana/dashboards/apex-dqn.json" "$(dirname "$ini")/dashboards/"
setsid nohup "$grafana" server --homepath "${GRAFANA_HOME:-/usr/share/grafana}" --config "$ini" \
    cfg:default.paths.data="$state/grafana/data" cfg:default.paths.logs="$state/grafana" \
    cfg:default.server.http_addr=127.0.0.1 cfg:default.server.http_port="$grafana_port" \
    >"$state/grafana/grafana.log" 2>&1 </dev/null &
echo $! >"$state/grafana/grafana.pid"
wait_listening "$grafana_port" "$!" Grafana "$state/grafana/grafana.log"
echo "[start-metrics] Grafana on 127.0.0.1:$grafana_port (pid $(cat "$state/grafana/grafana.pid"))"
