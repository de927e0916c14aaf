#!/usr/bin/env bash
# Create (once) the two secrets docker-compose.yml hands to its containers, and
# check existing ones:
#
#   bash deploy/compose-secrets.sh   # writes deploy/secrets/{redis_password,ray_auth_token}
#   docker compose up --build --scale ray-worker=2
#
# * `redis_password` (REDIS_PASSWORD_FILE): the replay's Redis password,
#   mounted read-only at /run/secrets/redis_password in `redis` and `ray-head`;
#   redis-server and the driver read it there.
# * `ray_auth_token` (RAY_AUTH_TOKEN_FILE): Ray's auth token (token auth is on
#   by default, RAY_AUTH_MODE=token), mounted at /run/secrets/ray_auth_token in
#   `ray-head` and `ray-worker`, which read it through RAY_AUTH_TOKEN_PATH. The
#   dashboard on http://localhost:8265 asks for it: paste the file's content.
#
# Neither becomes an environment variable, a command-line argument or a label,
# so `docker inspect` and `ps` do not show them.
#
# Modes: the directory is 0700 (no other user of this host can reach the files)
# and the files 0644, because compose without swarm bind-mounts a file with the
# host's owner and mode, and the containers run as unprivileged users
# (`redis`, `apex`) that must be able to read it.
#
# Idempotent: an existing file is kept (its content checked, the modes
# repaired). To use a file elsewhere, set REDIS_PASSWORD_FILE or
# RAY_AUTH_TOKEN_FILE (in .env or the environment) to its path; this script
# then checks that file and never creates it. To change the password: delete the
# file, run this again, and `docker compose down -v` first (the AOF volume keeps
# nothing of it, but a running redis keeps the old one until it restarts).
#
# Both go into URLs or headers, so they may hold only letters, digits and
# - _ . ~ (the generated password is 32 such characters, the token 64 hex
# digits). Exit 2 with a message saying what to fix.
set -euo pipefail
cd "$(dirname "$0")/.."

err() {
    echo "[compose-secrets] error: $*" >&2
    exit 2
}

# The value compose would use for $1 (.env holds KEY="value" lines), else $2.
setting() {
    local v=${!1:-}
    if [ -z "$v" ] && [ -f .env ]; then
        v=$(grep -E "^$1=" .env | tail -1 | cut -d= -f2- | sed -e 's/^["'\'']//' -e 's/["'\'']$//' || true)
    fi
    echo "${v:-$2}"
}

# secret NAME VARIABLE WHAT GENERATOR: create (default path only) and check one.
secret() {
    local name=$1 var=$2 what=$3 generate=$4 default file value mode dir_mode
    default=deploy/secrets/$name
    file=$(setting "$var" "$default")
    if [ "$file" = "$default" ] || [ "$file" = "./$default" ]; then
        mkdir -p deploy/secrets
        chmod 700 deploy/secrets
        if [ ! -e "$file" ]; then
            (umask 077 && $generate > "$file.new")
            mv -f "$file.new" "$file"
            echo "[compose-secrets] wrote a new $what to $file" >&2
        fi
        chmod 644 "$file"
    else
        [ -e "$file" ] || err "$var=$file does not exist: create it (one line, the $what) or unset $var to use $default"
    fi
    [ -f "$file" ] || err "$file is not a regular file (a directory Docker created for a missing bind source?): remove it and run this script again"
    value=$(cat "$file")
    [ -n "$value" ] || err "$file is empty: delete it and run this script again (or write the $what into it)"
    case "$value" in
        *[!A-Za-z0-9._~-]*)
            err "$file holds characters other than letters, digits and - _ . ~ (the $what goes into a URL or a header; a trailing newline is fine): delete it and run this script again"
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
    echo "[compose-secrets] $file is ready (mounted as /run/secrets/$name)" >&2
}

# 24 random bytes, base64url without padding: 32 URL-safe characters.
new_password() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }
# 32 random bytes as 64 hex digits.
new_token() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

secret redis_password REDIS_PASSWORD_FILE "Redis password" new_password
secret ray_auth_token RAY_AUTH_TOKEN_FILE "Ray auth token" new_token
