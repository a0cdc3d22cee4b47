#!/usr/bin/env bash
# Install every prerequisite of bkbundle's build and test suite on a Debian host.
#
# Idempotent and fast when everything is already there: it only calls apt-get or pip for what
# is missing, never removes anything, and prints one line per thing it did.
# Run as root (or with passwordless sudo).
set -euo pipefail

did=0
log() {
    printf 'setup: %s\n' "$*"
    did=$((did + 1))
}
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root (or install sudo): apt-get needs it"
    SUDO=(sudo)
fi

have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}
compose_works() {
    { have docker && docker compose version >/dev/null 2>&1; } ||
        { have docker-compose && docker-compose version >/dev/null 2>&1; }
}
pg_installed() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && have psql; }

# ---- apt packages --------------------------------------------------------------------------
missing=()
pg_installed || missing+=(postgresql)
have nats-server || missing+=(nats-server)
# The demo images need a *static* busybox: Debian's busybox-static, not the dynamic busybox.
pkg_installed busybox-static || missing+=(busybox-static)
have minisign || missing+=(minisign)
have skopeo || missing+=(skopeo)
have docker-registry || missing+=(docker-registry)
# htpasswd -B: the bcrypt password file of the test registry with basic auth.
have htpasswd || missing+=(apache2-utils)
# A Redis for doctor's stale-cache test (the server caches region env there).
have redis-server || missing+=(redis-server)
have zstd || missing+=(zstd)
have openssl || missing+=(openssl)
# The agent-host tests: a network namespace on a veth (ip netns, ip link).
have ip || missing+=(iproute2)
# doctor --agent's live tests and benchmark drop packets inside an agent container's own network
# namespace (nsenter -n iptables), never in this host's rules.
have iptables || missing+=(iptables)
have nsenter || missing+=(util-linux)
[ -x /usr/bin/time ] || missing+=(time) # GNU time: peak memory in scripts/bench.sh
have python3 || missing+=(python3)
# pip is only needed when the Python packages below are missing.
py_ok=0
have python3 && python3 -c 'import nats, cryptography' >/dev/null 2>&1 && py_ok=1
if [ "$py_ok" = 0 ] && ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
# Any Docker engine will do (docker.io, docker-ce, ...); only install Debian's when none is there.
{ have docker && have dockerd; } || missing+=(docker.io)
compose_ok=0
compose_works && compose_ok=1
[ "$compose_ok" = 1 ] || missing+=(docker-compose)

if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    # Keep packages' post-install scripts from starting system services (a PostgreSQL cluster on
    # 5432, a registry on 5000): the tests start their own throwaway servers on free ports.
    # Docker is the exception and is started below. An existing policy is left untouched.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# written by bkbundle scripts/setup.sh during apt-get install\nexit 101\n' |
            "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        made_policy=1
    fi
    log "apt-get install ${missing[*]}"
    status=0
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >/tmp/bkbundle-setup-apt.log 2>&1 ||
        status=$?
    if [ "$made_policy" = 1 ]; then
        "${SUDO[@]}" rm -f "$policy" # only the file this script itself just wrote
    fi
    if [ "$status" -ne 0 ]; then
        tail -n 30 /tmp/bkbundle-setup-apt.log >&2
        die "apt-get install ${missing[*]} failed (exit $status); full log: /tmp/bkbundle-setup-apt.log"
    fi
fi

# ---- Python packages (baselines and helper scripts) ----------------------------------------
if [ "$py_ok" = 0 ]; then
    pip_args=(--quiet --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
    if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
        pip_args+=(--break-system-packages)
    fi
    log "pip install nats-py cryptography"
    python3 -m pip install "${pip_args[@]}" nats-py cryptography ||
        die "python3 -m pip install nats-py cryptography failed"
    python3 -c 'import nats, cryptography' || die "nats-py/cryptography installed but python3 cannot import them"
fi

# ---- Docker daemon -------------------------------------------------------------------------
docker_up() { docker info >/dev/null 2>&1; }
wait_docker() { # wait_docker DEADLINE(epoch seconds)
    while [ "$(date +%s)" -lt "$1" ]; do
        docker_up && return 0
        sleep 1
    done
    docker_up
}
if have docker && ! docker_up; then
    deadline=$(($(date +%s) + 60))
    started=""
    if [ -d /run/systemd/system ] && have systemctl &&
        "${SUDO[@]}" systemctl start docker >/dev/null 2>&1 &&
        wait_docker $(($(date +%s) + 20)); then
        started="systemctl start docker"
    elif have service && "${SUDO[@]}" service docker start >/dev/null 2>&1 &&
        wait_docker $(($(date +%s) + 20)); then
        started="service docker start"
    elif have dockerd; then
        # No init system: run the daemon directly, detached from this shell.
        "${SUDO[@]}" sh -c 'nohup setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &'
        if wait_docker "$deadline"; then
            started="dockerd (log /var/log/dockerd.log)"
        fi
    fi
    [ -n "$started" ] || die "the Docker daemon does not answer 'docker info' after 60 s; see /var/log/dockerd.log"
    log "started the Docker daemon: $started"
fi
have docker && docker_up || die "docker is not usable ('docker info' fails): install docker.io and start dockerd"
[ "$compose_ok" = 1 ] || compose_works || die "neither 'docker compose' nor 'docker-compose' works after installing docker-compose"

# ---- Rust ----------------------------------------------------------------------------------
if ! have cargo; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        die "cargo is installed in ~/.cargo/bin but not on PATH: run 'source \"\$HOME/.cargo/env\"' (or add ~/.cargo/bin to PATH)"
    fi
    die "cargo not found: install the Rust toolchain (rustup, https://rustup.rs, or 'apt-get install cargo' for Debian's older one)"
fi

[ "$did" -gt 0 ] || log "all prerequisites already present"
