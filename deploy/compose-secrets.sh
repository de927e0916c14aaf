#!/usr/bin/env bash
# Create (once) the Redis password docker-compose.yml hands to its containers as
# the compose secret `redis_password`, and check an existing one:
#
#   bash deploy/compose-secrets.sh            # writes deploy/secrets/redis_password
#   docker compose up --build --scale ray-worker=2
#
# Compose mounts the file read-only at /run/secrets/redis_password in the
# `redis` and `ray-head` containers only; redis-server and the driver read it
# there. It never becomes an environment variable, a command-line argument or a
# label, so `docker inspect` and `ps` do not show it.
#
# Modes: the directory is 0700 (no other user of this host can reach the file)
# and the file 0644, because compose without swarm bind-mounts the file with
# the host's owner and mode, and the containers run as unprivileged users
# (`redis`, `apex`) that must be able to read it.
#
# Idempotent: an existing file is kept (its password checked, the modes
# repaired). To use a file elsewhere, set REDIS_PASSWORD_FILE (in .env or the
# environment) to its path; this script then checks that file and never
# creates it. To change the password: delete the file, run this again, and
# `docker compose down -v` first (the AOF volume keeps nothing of it, but a
# running redis keeps the old one until it restarts).
#
# The password goes into the replay's redis:// URL, so it may hold only letters,
# digits and - _ . ~ (the generated one is 32 such characters). Exit 2 with a
# message saying what to fix.
set -euo pipefail
cd "$(dirname "$0")/.."

err() {
    echo "[compose-secrets] error: $*" >&2
    exit 2
}

default=deploy/secrets/redis_password
file=${REDIS_PASSWORD_FILE:-}
if [ -z "$file" ] && [ -f .env ]; then
    # The same value compose would use (.env holds KEY="value" lines).
    file=$(grep -E '^REDIS_PASSWORD_FILE=' .env | tail -1 | cut -d= -f2- | sed -e 's/^["'\'']//' -e 's/["'\'']$//' || true)
fi
file=${file:-$default}

if [ "$file" = "$default" ] || [ "$file" = "./$default" ]; then
    mkdir -p deploy/secrets
    chmod 700 deploy/secrets
    if [ ! -e "$file" ]; then
        umask 077
        # 24 random bytes, base64url without padding: 32 URL-safe characters.
        head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$file.new"
        mv -f "$file.new" "$file"
        echo "[compose-secrets] wrote a new Redis password to $file" >&2
    fi
    chmod 644 "$file"
else
    [ -e "$file" ] || err "REDIS_PASSWORD_FILE=$file does not exist: create it (one line, the password) or unset REDIS_PASSWORD_FILE to use $default"
fi

[ -f "$file" ] || err "$file is not a regular file (a directory Docker created for a missing bind source?): remove it and run this script again"
pw=$(cat "$file")
[ -n "$pw" ] || err "$file is empty: delete it and run this script again (or write a password into it)"
case "$pw" in
    *[!A-Za-z0-9._~-]*)
        err "$file holds characters other than letters, digits and - _ . ~ (the password goes into a redis:// URL; a trailing newline is fine): delete it and run this script again"
        ;;
esac
mode=$(stat -c %a "$file")
case "$mode" in
    *[4567]) ;;
    *) err "$file has mode $mode: the containers (users redis and apex) cannot read it; chmod 644 it and keep it in a directory only you can enter (chmod 700 its directory)" ;;
esac
dir_mode=$(stat -c %a "$(dirname "$file")")
case "$dir_mode" in
    *00) ;;
    *) echo "[compose-secrets] warning: $(dirname "$file") has mode $dir_mode: other users of this host can read $file; chmod 700 $(dirname "$file")" >&2 ;;
esac
echo "[compose-secrets] $file is ready (mounted as /run/secrets/redis_password)" >&2
