#!/usr/bin/env bash
# Build, without a container registry, the images docker-compose.yml needs, and
# print the `export` lines that point compose at them:
#
#   eval "$(bash deploy/local-images.sh)"
#   docker compose up --build --scale ray-worker=2
#
# Users who can pull from Docker Hub never need this: compose then uses
# python:3.11-slim-bookworm and redis:7. Needs root (debootstrap), a running
# Docker engine, `debootstrap` (apt-get install debootstrap) and Debian's package
# mirror over http.
#
# What it builds:
#   APEX_BASE_IMAGE  apex-dqn-base:bookworm  `debootstrap --variant=minbase bookworm`
#                    with python3, python3-venv, python-is-python3, ca-certificates,
#                    procps, redis-server (7.0), and this host's extra CA
#                    certificates (/usr/local/share/ca-certificates, e.g. a TLS-
#                    intercepting proxy's) installed with update-ca-certificates,
#                    so pip inside `docker build` trusts what the host trusts.
#   REDIS_IMAGE      apex-dqn-redis:bookworm  that base, running as user `redis`
#                    in /data (the layout of the official redis image).
#   TORCH_WHEEL      build/wheels/torch-<version>+cpu-*.whl, when this host's pip
#                    resolves `torch==<version>` to a CPU build (e.g. from a local
#                    wheel directory); the Dockerfile then installs torch from that
#                    file instead of the PyTorch CPU index. Not printed otherwise.
#
# Idempotent and cached: the base image carries a label with a digest of its
# inputs (suite, packages, mirror, CA certificates) and is rebuilt only when
# that digest changes; a second run takes seconds (measured: ~50 s the first
# time on 2 cores, 0.2 s after). Progress goes to stderr, only the export lines
# to stdout. Exit 2: this machine lacks something (root, debootstrap, a Docker
# engine), the message says what; exit 1: a build step failed.
#
#   APEX_LOCAL_BASE_TAG   default apex-dqn-base:bookworm
#   APEX_LOCAL_REDIS_TAG  default apex-dqn-redis:bookworm
#   DEBIAN_MIRROR         default http://deb.debian.org/debian
#   TORCH_VERSION         default 2.13.0 (as in deploy/Dockerfile)
#   PYTHON                interpreter whose pip downloads the wheel (default python3)
#   APEX_LOCAL_REBUILD=1  rebuild the base even when its digest matches
set -euo pipefail
cd "$(dirname "$0")/.."

base_tag=${APEX_LOCAL_BASE_TAG:-apex-dqn-base:bookworm}
redis_tag=${APEX_LOCAL_REDIS_TAG:-apex-dqn-redis:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
torch_version=${TORCH_VERSION:-2.13.0}
suite=bookworm
packages=python3,python3-venv,python-is-python3,ca-certificates,procps,redis-server
ca_dir=/usr/local/share/ca-certificates
label=org.apex-dqn.base-inputs

log() { echo "[local-images] $*" >&2; }
# Exit 2: something this machine lacks (root, a tool, a running engine); the
# message says what. Exit 1: a build step failed.
need() {
    echo "[local-images] error: $*" >&2
    exit 2
}
die() {
    echo "[local-images] error: $*" >&2
    exit 1
}

command -v docker >/dev/null 2>&1 || need "no docker client on PATH (apt-get install docker.io)"
docker info >/dev/null 2>&1 || need "the Docker engine does not answer (start dockerd, or check DOCKER_HOST)"

# Digest of everything that goes into the base image.
ca_files=()
if [ -d "$ca_dir" ]; then
    while IFS= read -r -d '' f; do ca_files+=("$f"); done \
        < <(find "$ca_dir" -type f -name '*.crt' -print0 | sort -z)
fi
inputs=$({
    echo "v1 $suite $mirror minbase $packages"
    for f in "${ca_files[@]}"; do echo "$f $(sha256sum < "$f")"; done
} | sha256sum | cut -c1-16)

have=$(docker image inspect -f "{{ index .Config.Labels \"$label\" }}" "$base_tag" 2>/dev/null || true)
if [ "$have" = "$inputs" ] && [ "${APEX_LOCAL_REBUILD:-0}" != 1 ]; then
    log "$base_tag is up to date (inputs $inputs)"
else
    [ "$(id -u)" = 0 ] || need "debootstrap needs root: run this script as root (sudo)"
    command -v debootstrap >/dev/null 2>&1 || need "debootstrap is not installed: apt-get install debootstrap"
    root=$(mktemp -d /var/tmp/apex-rootfs.XXXXXX)
    cleanup() {
        # debootstrap mounts proc/sys inside the target; never rm -r across a mount.
        for m in proc sys dev/pts dev; do
            mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
        done
        rm -rf --one-file-system "$root"
    }
    trap cleanup EXIT
    log "debootstrap --variant=minbase $suite from $mirror (about a minute) ..."
    if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
        > "$root.log" 2>&1; then
        tail -20 "$root.log" >&2
        rm -f "$root.log"
        die "debootstrap failed (log above); check that $mirror is reachable over http"
    fi
    rm -f "$root.log"
    if [ ${#ca_files[@]} -gt 0 ]; then
        log "adding ${#ca_files[@]} CA certificate(s) from $ca_dir"
        cp "${ca_files[@]}" "$root/usr/local/share/ca-certificates/"
        out=$(chroot "$root" update-ca-certificates 2>&1) || die "update-ca-certificates failed: $out"
    fi
    # Small and reproducible-ish: no package caches, no docs, no logs.
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
    log "docker import -> $base_tag"
    tar -C "$root" --numeric-owner --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change "LABEL $label=$inputs" \
            --change 'CMD ["bash"]' \
            - "$base_tag" > /dev/null
    cleanup
    trap - EXIT
fi

# The redis image: a Dockerfile on stdin, no context; Docker's layer cache makes
# a repeated build a no-op.
log "docker build -> $redis_tag"
redis_dockerfile="FROM $base_tag
RUN mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD [\"redis-server\"]"
out=$(docker build -q -t "$redis_tag" - <<< "$redis_dockerfile" 2>&1) ||
    die "docker build of $redis_tag failed: $out"

echo "export APEX_BASE_IMAGE=$base_tag"
echo "export REDIS_IMAGE=$redis_tag"

# torch: a CPU wheel into the build context (the root .dockerignore keeps
# build/wheels in it), when this host's pip resolves one.
wheel_dir=build/wheels
wheel=$(ls "$wheel_dir"/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    mkdir -p "$wheel_dir"
    tmp=$(mktemp -d "$wheel_dir/.dl.XXXXXX")
    log "pip download torch==$torch_version (no deps, cp311) ..."
    if "${PYTHON:-python3}" -m pip download -q "torch==$torch_version" --no-deps \
        --only-binary=:all: --python-version 3.11 -d "$tmp" >&2; then
        got=$(ls "$tmp"/torch-*.whl 2>/dev/null | head -1 || true)
        case "$got" in
            *+cpu-*) mv "$got" "$wheel_dir/" && wheel=$wheel_dir/$(basename "$got") ;;
            *) log "pip resolved ${got:-nothing} (not a CPU build): the image gets torch from TORCH_INDEX_URL (default: the PyTorch CPU index)" ;;
        esac
    else
        log "pip download failed: the image gets torch from TORCH_INDEX_URL (default: the PyTorch CPU index)"
    fi
    rm -rf "$tmp"
fi
if [ -n "$wheel" ]; then
    log "torch wheel: $wheel"
    echo "export TORCH_WHEEL=$wheel"
fi
