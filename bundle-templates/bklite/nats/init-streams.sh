#!/bin/sh
# One-shot JetStream set-up for BK-Lite, run by the `nats-init` service (image natsio/nats-box)
# every time the stack is brought up. It is idempotent: an existing stream is left alone.
#
# Upstream's bootstrap.sh created the same stream with a `docker run nats-box` after starting the
# infrastructure; here it is part of the stack so that `docker compose up` alone is complete and
# `telegraf` (which consumes the stream) only starts once it exists.
#
# Connection settings come from the environment (NATS_URL, NATS_USER, NATS_PASSWORD), which the
# `nats` CLI reads on its own. NATS serves TLS only: every command verifies the server with the
# site CA, NATS_TLS_CA_FILE (the install target's certs/ca.crt, mounted by docker-compose.yml).
set -u

STREAM=metrics
WAIT_SECONDS=${NATS_INIT_WAIT_SECONDS:-120}
CA_FILE=${NATS_TLS_CA_FILE:-/etc/nats/certs/ca.crt}

if [ ! -s "$CA_FILE" ]; then
    echo "nats-init: the site CA ${CA_FILE} is missing or empty: NATS cannot be verified." >&2
    echo "nats-init: bkbundle install writes it (certs/ca.crt in the install directory); re-run it, or check that certs/ is there." >&2
    exit 1
fi

nats_tls() {
    nats --tlsca "$CA_FILE" "$@"
}

# 1. Wait for the server, with a bound: nats has no healthcheck (its image has no shell).
waited=0
until nats_tls account info >/dev/null 2>&1; do
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
        echo "nats-init: cannot reach NATS at ${NATS_URL} as ${NATS_USER} after ${WAIT_SECONDS}s." >&2
        echo "nats-init: last error:" >&2
        nats_tls account info >&2 || true
        echo "nats-init: check 'docker compose logs nats' (a missing or unreadable certs/nats-server.crt or .key stops it), the certificate against ${CA_FILE}, and NATS_ADMIN_USERNAME/NATS_ADMIN_PASSWORD in the env file." >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

# 2. The metrics stream: agents publish `metrics.<node>`; the stack's telegraf consumes it and
#    writes to VictoriaMetrics. Same limits as upstream: 20 minutes or 100 MiB, whichever first.
if nats_tls stream info "$STREAM" >/dev/null 2>&1; then
    echo "nats-init: stream ${STREAM} exists, nothing to do."
    exit 0
fi

echo "nats-init: creating stream ${STREAM}."
exec nats --tlsca "$CA_FILE" stream add "$STREAM" \
    --subjects='metrics.*' \
    --storage=file \
    --replicas=1 \
    --retention=limits \
    --discard=old \
    --max-age=20m \
    --max-bytes=104857600 \
    --max-consumers=-1 \
    --max-msg-size=-1 \
    --max-msgs=-1 \
    --max-msgs-per-subject=1000000 \
    --dupe-window=5m \
    --no-allow-rollup \
    --no-deny-delete \
    --no-deny-purge \
    --defaults
