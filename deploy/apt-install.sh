#!/usr/bin/env bash
# apt-get update + install on a node that has just booted, for cluster.yaml's
# setup commands: bash deploy/apt-install.sh PACKAGE...  (no package: update only)
#
# A fresh cloud VM runs apt itself for its first minutes (cloud-init's
# package_update, unattended-upgrades from apt-daily*.timer), and a second
# apt-get then fails at once with "Could not get lock". So this waits:
#   - for cloud-init to finish (`cloud-init status --wait`, where cloud-init exists);
#   - for the lists lock, by retrying `apt-get update` every APEX_APT_RETRY_S
#     seconds (default 10), up to APEX_APT_ATTEMPTS times (default 60). apt's own
#     DPkg::Lock::Timeout does not cover `apt-get update`'s lock
#     (/var/lib/apt/lists/lock): apt 2.6 fails on it at once with the option set;
#   - for the dpkg lock during install, with apt's -o DPkg::Lock::Timeout=600.
# Runs apt-get through sudo unless already root. APT_CONFIG is honoured (apt's own
# variable; the tests point it at a private apt directory).
set -euo pipefail
attempts=${APEX_APT_ATTEMPTS:-60}
retry_s=${APEX_APT_RETRY_S:-10}
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo --preserve-env=APT_CONFIG,DEBIAN_FRONTEND)
export DEBIAN_FRONTEND=noninteractive

if command -v cloud-init >/dev/null 2>&1; then
    echo "[apt-install] waiting for cloud-init to finish"
    cloud-init status --wait >/dev/null || echo "[apt-install] warning: cloud-init reports an error; going on" >&2
fi

for ((i = 1; ; i++)); do
    if err=$("${sudo[@]}" apt-get -qq update 2>&1 >/dev/null); then
        [ -z "$err" ] || printf '%s\n' "$err" >&2   # warnings
        break
    fi
    if [ "$i" -ge "$attempts" ]; then
        printf '%s\n' "$err" >&2
        echo "[apt-install] apt-get update failed $i times (above: the last error); if another apt holds the lock, wait for it (ps -C apt-get,apt,unattended-upgr) and run setup again (ray up)" >&2
        exit 1
    fi
    echo "[apt-install] apt-get update failed (attempt $i of $attempts): $(printf '%s' "$err" | grep -m1 '^E:' || printf '%s' "$err" | tail -n1); retrying in ${retry_s}s" >&2
    sleep "$retry_s"
done

if [ "$#" -gt 0 ]; then
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@"
fi
