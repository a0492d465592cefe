#!/usr/bin/env bash
# The Dockerfile and docker-compose.yml, end to end (`make docker-test`; not part of `make test`):
#   1. a Docker daemon (installed from Debian's docker.io and started, if none runs);
#   2. a Debian base image with Python 3.11 (debootstrap, then `docker import`), kept by tag
#      between runs, standing in for python:3.11-slim, which Docker Hub would give;
#   3. the Chinwag image built on it, torch from a CPU wheel on this machine when there is one;
#   4. `chinwag console` in it: the echo generator, then the built-in model, with no
#      conversion at start (the image made it);
#   5. docker-compose.yml as shipped, with a PostgreSQL image made from Debian's package
#      (compose_roundtrip.py): a message through the Telegram emulator is answered by the
#      built-in model, both rows are in PostgreSQL, and both services turn healthy.
# Exit status: 0 passed, 1 failed, 3 no Docker daemon can run here (nothing was tested).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then  # dockerd, debootstrap and apt-get need root
    sudo -n true 2>/dev/null || { echo "[docker-test] NOT TESTED: needs root or sudo" >&2; exit 3; }
    exec sudo -E "$0" "$@"
fi
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=chinwag-test/python:3.11-bookworm-1  # bump the suffix when the recipe changes
POSTGRES_IMAGE=chinwag-test/postgres:15
IMAGE=chinwag-test/chinwag:latest
WORK=$(mktemp -d /tmp/chinwag-docker-test.XXXXXX)
STARTED_DOCKERD=""
SERVER=""
TORCH_INDEX=""

log() { printf '[docker-test %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
no_docker() { log "NOT TESTED: $*"; exit 3; }
cleanup() {
    [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
    if [ -n "$STARTED_DOCKERD" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null && wait "$STARTED_DOCKERD" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # a timeout still cleans up
timed() {  # timed LABEL COMMAND...: runs it, logs how long it took
    local label=$1 start=$SECONDS
    shift
    "$@"
    log "$label took $((SECONDS - start)) s"
}
apt_install() {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

ensure_docker() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
        missing+=(docker-compose)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} from Debian's packages"
        apt_install "${missing[@]}" || no_docker "cannot install ${missing[*]}"
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (its log: $WORK/dockerd.log)"
        dockerd >"$WORK/dockerd.log" 2>&1 &
        STARTED_DOCKERD=$!
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
            sleep 1
        done
        if ! docker info >/dev/null 2>&1; then
            tail -n 15 "$WORK/dockerd.log" >&2 || true
            no_docker "dockerd does not start here (a container without the privileges it needs?)"
        fi
    fi
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
    log "docker $(docker version -f '{{.Server.Version}}'), $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version)"
}

# Debian bookworm's python3 is 3.11, as in python:3.11-slim. pip in the build trusts what pip
# here trusts: the certificates of a TLS-inspecting proxy in front of PyPI, say.
build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: kept from an earlier run"
        return
    fi
    local rootfs=$WORK/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
}

# The Dockerfile takes torch from PyTorch's index; where that cannot be reached (these CI
# machines reach PyPI only) a one-package index serves the CPU wheel that lies on this disk.
serve_torch_index() {
    if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=$TORCH_INDEX_URL; return; fi
    local spec dir=$WORK/torch-index/simple/torch
    spec=$(sed -n 's/^ARG TORCH_SPEC=//p' Dockerfile)
    mkdir -p "$dir"
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "$spec+cpu" -d "$dir"; then
        log "no CPU wheel for $spec here: the build takes it from PyTorch's index"
        return
    fi
    local wheel
    wheel=$(basename "$(ls "$dir"/torch-*.whl)")
    printf '<a href="%s">%s</a>\n' "$wheel" "$wheel" >"$dir/index.html"
    local port
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$WORK/torch-index" \
        >"$WORK/torch-index.log" 2>&1 &
    SERVER=$!
    TORCH_INDEX="http://127.0.0.1:$port/simple"
    for _ in $(seq 50); do curl -sf "$TORCH_INDEX/torch/" >/dev/null && return; sleep 0.1; done
    fail "the local torch index did not start: $(cat "$WORK/torch-index.log")"
}

build_images() {
    local args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
    serve_torch_index
    [ -z "$TORCH_INDEX" ] || args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX")
    docker build -q "${args[@]}" -t "$POSTGRES_IMAGE" tests/docker/postgres >/dev/null \
        || fail "building the PostgreSQL stand-in"
    local previous
    previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    docker build "${args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; fail "docker build"; }
    # The image an earlier run built (2 GB) goes; the build cache stays.
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
    log "image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

check_image() {
    local user
    user=$(docker run --rm "$IMAGE" id -un)
    [ "$user" = chinwag ] || fail "the image runs as $user, not as chinwag"

    local words="ahoy from the container 3f9a" out
    out=$(echo "$words" | docker run --rm -i -e CHINWAG_GENERATOR=echo "$IMAGE" chinwag console) \
        || fail "chinwag console (echo) failed"
    [[ $out == *"$words"* ]] || fail "chinwag console (echo) answered: $out"
    log "chinwag console (echo) answered"

    # The settings .env.example gives (~/.cache/chinwag) find the cache the build made.
    out=$(echo "What is the capital of France?" | docker run --rm -i \
        -e CHINWAG_MODEL_CACHE_DIR='~/.cache/chinwag' -e CHINWAG_MAX_REPLY_TOKENS=24 \
        -e CHINWAG_TEMPERATURE=0 "$IMAGE" chinwag console 2>"$WORK/console.err") \
        || { cat "$WORK/console.err" >&2; fail "chinwag console (built-in model) failed"; }
    ! grep -q converting "$WORK/console.err" || fail "the model was converted at start: $(cat "$WORK/console.err")"
    [[ $out == *[[:alpha:]]* ]] || fail "chinwag console (built-in model) answered: '$out'"
    log "chinwag console (built-in model) answered: ${out//$'\n'/ }"
}

check_compose() {
    # This host's address on the default bridge, which containers on any bridge can reach.
    local gateway
    gateway=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
    [ -n "$gateway" ] || gateway=$(ip -4 -o addr show docker0 | awk '{sub("/.*", "", $4); print $4}')
    [ -n "$gateway" ] || fail "cannot tell the Docker bridge's address"
    "$PYTHON" -m tests.docker.compose_roundtrip --compose "${COMPOSE[*]}" \
        --image "$IMAGE" --postgres-image "$POSTGRES_IMAGE" --gateway "$gateway" \
        --work "$WORK" || fail "docker-compose.yml"
}

ensure_docker
timed "base image" build_base
timed "images" build_images
timed "image checks" check_image
timed "compose" check_compose
log "PASSED"
