#!/usr/bin/env bash
# Build the demo images and the demo agent package, offline, with no registry.
#
#   bkbundle-demo/base:1  `docker import` of a root filesystem made from Debian's busybox-static
#   bkbundle-demo/app:1   FROM base + /app (a process that logs a line every few seconds)
#   bkbundle-demo/web:1   FROM base + /www (served by busybox httpd on port 8080)
#   bkbundle-demo/postgres:15  FROM base + this host's Debian PostgreSQL 15 server (binaries, the
#                         shared libraries ldd reports, share/, zoneinfo) and pg-entrypoint.sh
#   bkbundle-demo/nats:2  FROM base + this host's Debian nats-server with JetStream on /data
#   examples/demo/packages/fusion-collectors-linux-amd64.zip   the demo controller package
#
# Idempotent: an image that already exists is skipped unless --force is given; the package is
# rewritten only when its (deterministic) content changes. The base root filesystem tarball is
# deterministic (sorted, fixed mtimes, numeric owner 0), so re-importing it yields the same layer.
set -euo pipefail

usage() {
    echo "usage: $0 [--force]   (needs docker, python3, busybox-static, postgresql and nats-server: scripts/setup.sh)"
}
force=0
for arg in "$@"; do
    case "$arg" in
    --force) force=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
done

log() { printf 'demo-images: %s\n' "$*"; }
die() {
    printf 'demo-images: error: %s\n' "$*" >&2
    exit 1
}

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/bkbundle-demo.XXXXXX")"
trap 'rm -rf "$work"' EXIT

BASE=bkbundle-demo/base:1
APP=bkbundle-demo/app:1
WEB=bkbundle-demo/web:1
PG=bkbundle-demo/postgres:15
NATS=bkbundle-demo/nats:2
PG_MAJOR=15
# Fixed timestamp for every file we generate (2024-01-01T00:00:00Z).
EPOCH=1704067200

# ---- the demo controller package -----------------------------------------------------------
write_package() {
    local out="$root/examples/demo/packages/fusion-collectors-linux-amd64.zip"
    mkdir -p "$(dirname "$out")"
    python3 - "$out" <<'PY'
import os, sys, zipfile, io

out = sys.argv[1]
script = lambda name, body: "#!/bin/sh\n# demo %s (bkbundle test fixture)\n%s" % (name, body)
files = {
    "install.sh": script("installer", """set -eu
# usage: install.sh SERVER_URL SERVER_TOKEN CLOUD_REGION_ID GROUP NODE_NAME NODE_ID
cd "$(dirname "$0")"
sed -i -e "s#__SERVER__URL__#${1:-}#" -e "s#__SERVER__API__TOKEN__#${2:-}#" \\
    -e "s#__CLOUD__REGION__ID__#${3:-}#" -e "s#__GROUP__ID__#${4:-}#" \\
    -e "s#__NODE__NAME__#${5:-}#" -e "s#__NODE__ID__#${6:-}#" sidecar.yml
echo "installed collector-sidecar in $(pwd)"
"""),
    "uninstall.sh": script("uninstaller", 'echo "uninstalled collector-sidecar"\n'),
    "sidecar.yml": """server_url: "__SERVER__URL__"
server_api_token: "__SERVER__API__TOKEN__"
node_id: "__NODE__ID__"
node_name: "__NODE__NAME__"
update_interval: 10
tls_skip_verify: true
send_status: true
cache_path: "./cache"
log_path: "./log"
collector_configuration_directory: "./generated"
tags:
  - "zone:__CLOUD__REGION__ID__"
  - "group:__GROUP__ID__"
""",
    "collector-sidecar": script("collector-sidecar", 'echo "collector-sidecar demo"\nexec sleep 3600\n'),
    "bin/telegraf": script("telegraf", 'echo "Telegraf 1.0.0 (demo)"\n'),
    "bin/vector": script("vector", 'echo "vector 1.0.0 (demo)"\n'),
    "bin/nats-executor": script("nats-executor", 'echo "nats-executor 1.0.0 (demo)"\n'),
}
dirs = ["bin/", "cache/", "generated/", "log/"]
when = (2024, 1, 1, 0, 0, 0)
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    for d in sorted(dirs):
        info = zipfile.ZipInfo(d, when)
        info.create_system = 3
        info.external_attr = (0o040755 << 16) | 0x10
        z.writestr(info, b"")
    for name in sorted(files):
        info = zipfile.ZipInfo(name, when)
        info.create_system = 3
        info.compress_type = zipfile.ZIP_DEFLATED
        mode = 0o644 if name.endswith(".yml") else 0o755
        info.external_attr = (0o100000 | mode) << 16
        z.writestr(info, files[name].encode())
data = buf.getvalue()
try:
    with open(out, "rb") as f:
        if f.read() == data:
            print("unchanged")
            sys.exit(0)
except FileNotFoundError:
    pass
tmp = out + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, out)
print("wrote")
PY
}
case "$(write_package)" in
wrote) log "wrote examples/demo/packages/fusion-collectors-linux-amd64.zip" ;;
unchanged) log "examples/demo/packages/fusion-collectors-linux-amd64.zip is up to date" ;;
*) die "could not write the demo package" ;;
esac

# ---- images ----------------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker not found: run scripts/setup.sh"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer 'docker info': run scripts/setup.sh"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
want() { # want IMAGE: 0 when it must be built
    if [ "$force" = 1 ] || ! image_exists "$1"; then return 0; fi
    log "skipped $1 (exists; --force rebuilds)"
    return 1
}

# Everything generated gets the same mtime so builds are reproducible.
stamp() { find "$1" -exec touch -h -d "@$EPOCH" {} +; }

if want "$BASE"; then
    busybox=""
    if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
        busybox="$(dpkg -L busybox-static | grep -E '/s?bin/busybox$' | head -n1)"
    fi
    [ -n "$busybox" ] && [ -x "$busybox" ] ||
        die "Debian's busybox-static is not installed (a static busybox is needed): apt-get install busybox-static, or scripts/setup.sh"
    rootfs="$work/rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root"
    cp "$busybox" "$rootfs/bin/busybox"
    chmod 0755 "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list | LC_ALL=C sort -u); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    [ -e "$rootfs/bin/sh" ] || die "busybox has no sh applet"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
        >"$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
    chmod 1777 "$rootfs/tmp"
    chmod 0700 "$rootfs/root"
    stamp "$rootfs"
    tar -C "$rootfs" --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
        --format=gnu -cf "$work/rootfs.tar" .
    docker import \
        --change 'ENV PATH=/bin' \
        --change 'CMD ["/bin/sh"]' \
        --message "bkbundle demo base (busybox-static)" \
        "$work/rootfs.tar" "$BASE" >/dev/null
    log "built $BASE ($(docker image inspect -f '{{index .RootFS.Layers 0}}' "$BASE"))"
fi

# The context's root/ is copied onto / in one COPY: unlike `COPY app/ /app/`, whose target
# directory the classic builder creates with the current time, every entry of the layer then
# carries the fixed mtime, so a rebuild yields the same layer.
build() { # build IMAGE CONTEXT_DIR
    stamp "$2"
    local old
    old="$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)"
    local out
    if ! out="$(DOCKER_BUILDKIT=0 docker build --quiet -t "$1" "$2" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "docker build of $1 failed"
    fi
    log "built $1 ($(docker image inspect -f '{{.Size}}' "$1") bytes)"
    # A --force rebuild leaves the previous image untagged; drop it unless something uses it.
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$1")" ] &&
        [ -z "$(docker image inspect -f '{{join .RepoTags ","}}' "$old" 2>/dev/null)" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

if want "$APP"; then
    ctx="$work/app"
    mkdir -p "$ctx/root/app"
    cat >"$ctx/root/app/run.sh" <<'SH'
#!/bin/sh
# bkbundle demo app: logs a line every few seconds; /tmp/healthy is what its healthcheck tests.
trap 'echo "app: stopping"; exit 0' TERM INT
mkdir -p /data
count=$(cat /data/ticks 2>/dev/null || echo 0)
echo "app: starting (previous ticks: $count)"
touch /tmp/healthy
while :; do
    count=$((count + 1))
    echo "$count" >/data/ticks
    echo "app: tick $count"
    sleep "${TICK_SECONDS:-3}" &
    wait $!
done
SH
    chmod 0755 "$ctx/root/app/run.sh"
    echo "ok" >"$ctx/root/app/healthy"
    cat >"$ctx/Dockerfile" <<'DF'
FROM bkbundle-demo/base:1
COPY root/ /
VOLUME /data
HEALTHCHECK --interval=2s --timeout=2s --retries=10 CMD ["/bin/sh", "-c", "test -f /tmp/healthy"]
CMD ["/app/run.sh"]
DF
    build "$APP" "$ctx"
fi

if want "$WEB"; then
    ctx="$work/web"
    mkdir -p "$ctx/root/www"
    cat >"$ctx/root/www/index.html" <<'HTML'
<!doctype html>
<html><head><title>bkbundle demo</title></head>
<body><h1>bkbundle demo web</h1><p>served by busybox httpd</p></body></html>
HTML
    cat >"$ctx/Dockerfile" <<'DF'
FROM bkbundle-demo/base:1
COPY root/ /
EXPOSE 8080
HEALTHCHECK --interval=2s --timeout=2s --retries=10 CMD ["/bin/sh", "-c", "wget -q -O- http://127.0.0.1:8080/ >/dev/null"]
# busybox httpd in the foreground; the shell around it makes `docker stop` immediate (PID 1
# ignores SIGTERM unless it traps it).
CMD ["/bin/sh", "-c", "trap 'exit 0' TERM INT; busybox httpd -f -p 8080 -h /www & wait $!"]
DF
    build "$WEB" "$ctx"
fi

# ---- PostgreSQL and NATS, from this host's Debian packages ------------------------------------
# Both images are FROM base plus one layer copied from the host: the programs, the shared
# libraries `ldd` reports for them (at the paths ldd names, so the dynamic loader's default search
# finds them without an ld.so.cache), data files, and an entrypoint run by busybox sh.

# elf_deps FILE: the absolute paths of the shared libraries FILE needs (nothing for a static
# binary); "missing:NAME" for each that ldd cannot resolve.
elf_deps() {
    ldd "$1" 2>/dev/null | awk '
        $2 == "=>" && $3 == "not" { print "missing:" $1; next }
        $2 == "=>" && $3 ~ /^\// { print $3; next }
        $1 ~ /^\// { print $1 }' || true
}

# add_libs ROOT FILE...: copies into ROOT every shared library FILE... need, dereferenced, at the
# path ldd reports. Fails naming the library when one cannot be resolved.
add_libs() {
    local root="$1" f dep
    shift
    for f in "$@"; do
        for dep in $(elf_deps "$f"); do
            case "$dep" in
            missing:*) die "$f needs ${dep#missing:}, which ldd cannot find on this host" ;;
            esac
            if [ ! -e "$root$dep" ]; then
                mkdir -p "$root$(dirname "$dep")"
                cp -L "$dep" "$root$dep"
                chmod 0755 "$root$dep"
            fi
        done
    done
}

# write_passwd ROOT LINE...: /etc/passwd and /etc/group of the base plus the given users
# ("name:uid:gid:gecos:home").
write_passwd() {
    local root="$1" u name uid gid gecos home
    shift
    mkdir -p "$root/etc"
    {
        echo 'root:x:0:0:root:/root:/bin/sh'
        echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false'
        for u in "$@"; do
            IFS=: read -r name uid gid gecos home <<<"$u"
            echo "$name:x:$uid:$gid:$gecos:$home:/bin/sh"
        done
    } >"$root/etc/passwd"
    {
        echo 'root:x:0:'
        echo 'nogroup:x:65534:'
        for u in "$@"; do
            IFS=: read -r name uid gid gecos home <<<"$u"
            echo "$name:x:$gid:"
        done
    } >"$root/etc/group"
    chmod 0644 "$root/etc/passwd" "$root/etc/group"
}

if want "$PG"; then
    pgbin="/usr/lib/postgresql/$PG_MAJOR/bin"
    pglib="/usr/lib/postgresql/$PG_MAJOR/lib"
    pgshare="/usr/share/postgresql/$PG_MAJOR"
    for b in postgres initdb pg_ctl pg_isready psql; do
        [ -x "$pgbin/$b" ] ||
            die "$pgbin/$b is missing: apt-get install postgresql-$PG_MAJOR (or scripts/setup.sh)"
    done
    [ -d "$pgshare" ] || die "$pgshare is missing: apt-get install postgresql-$PG_MAJOR (or scripts/setup.sh)"
    [ -f /usr/share/zoneinfo/UTC ] || die "/usr/share/zoneinfo is missing: apt-get install tzdata"
    ctx="$work/postgres"
    r="$ctx/root"
    mkdir -p "$r$pgbin" "$r$pglib" "$r/usr/share/postgresql" "$r/usr/share/zoneinfo" "$r/usr/local/bin" \
        "$r/var/lib/postgresql/data" "$r/var/run/postgresql"
    for b in postgres initdb pg_ctl pg_isready psql; do
        cp -L "$pgbin/$b" "$r$pgbin/$b"
    done
    # Server modules (plpgsql, encoding conversions, snowball dictionaries, contrib extensions),
    # without the LLVM JIT (llvmjit.so needs the 100 MB libLLVM; the entrypoint sets jit = off),
    # its bitcode, and pgxs (build files). A module whose libraries this host lacks is left out.
    skipped=""
    for m in "$pglib"/*.so; do
        case "$(basename "$m")" in llvmjit*) continue ;; esac
        if elf_deps "$m" | grep -q '^missing:'; then
            skipped="$skipped $(basename "$m")"
            continue
        fi
        cp -L "$m" "$r$pglib/"
    done
    [ -z "$skipped" ] || log "$PG: left out server modules whose libraries are missing here:$skipped"
    # share/: catalog bootstrap, extension scripts, timezone sets, text search data; not man pages.
    tar -C /usr/share/postgresql --exclude="$PG_MAJOR/man" -cf - "$PG_MAJOR" | tar -C "$r/usr/share/postgresql" -xf -
    # Time zones (Debian's PostgreSQL uses the system tz database), without the leap-second
    # "right/" variants.
    tar -C /usr/share/zoneinfo --exclude=./right -cf - . | tar -C "$r/usr/share/zoneinfo" -xf -
    add_libs "$r" "$r$pgbin"/* "$r$pglib"/*.so
    write_passwd "$r" "postgres:999:999:PostgreSQL administrator:/var/lib/postgresql"
    cat >"$r/usr/local/bin/pg-entrypoint.sh" <<'SH'
#!/bin/sh
# bkbundle demo PostgreSQL entrypoint (busybox sh).
#
# First start (no $PGDATA/PG_VERSION): initdb into $PGDATA with the superuser `postgres` whose
# password is $POSTGRES_PASSWORD (scram-sha-256 over TCP, trust on the container's own socket),
# listen on every address, then create the database $POSTGRES_DB (default bklite). Every start:
# finish that setup if an earlier first start was interrupted, then exec postgres in the
# foreground as the user postgres. The password is only read on the first start; change it later
# with ALTER ROLE. Arguments starting with "-" go to postgres; any other command is run as is.
set -eu
PGBIN=/usr/lib/postgresql/15/bin
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
POSTGRES_DB="${POSTGRES_DB:-bklite}"
DONE="$PGDATA/bkbundle-init.done"
export PGDATA

log() { echo "pg-entrypoint: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    find "$PGDATA" /var/run/postgresql \! -user postgres -exec chown postgres:postgres {} +
    chmod 0700 "$PGDATA"
    chmod 2775 /var/run/postgresql
    as_postgres() { su -s /bin/sh -c 'exec "$0" "$@"' -- postgres "$@"; }
else
    as_postgres() { "$@"; }
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD:-}" ] ||
        die "POSTGRES_PASSWORD is not set: the superuser postgres needs a password (give -e POSTGRES_PASSWORD=...)"
    case "$POSTGRES_PASSWORD" in
    *"
"*) die "POSTGRES_PASSWORD must be one line" ;;
    esac
    log "initialising a new cluster in $PGDATA"
    pwfile="$(mktemp /tmp/pwfile.XXXXXX)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    [ "$(id -u)" != 0 ] || chown postgres "$pwfile"
    if ! as_postgres "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pwfile"; then
        rm -f "$pwfile"
        die "initdb into $PGDATA failed (see above)"
    fi
    rm -f "$pwfile"
    cat >>"$PGDATA/postgresql.conf" <<'CONF'

# bkbundle demo (pg-entrypoint.sh)
listen_addresses = '*'
password_encryption = 'scram-sha-256'
jit = off
CONF
    printf '%s\n' '' '# bkbundle demo (pg-entrypoint.sh): password logins from anywhere' \
        'host all all all scram-sha-256' >>"$PGDATA/pg_hba.conf"
fi

if [ ! -e "$DONE" ]; then
    log "creating database \"$POSTGRES_DB\" (if missing)"
    as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -w -t 120 -o "-c listen_addresses=''" start >&2 ||
        die "the temporary server for setup did not start (see above)"
    if ! printf '%s\n' "SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\\gexec" |
        as_postgres "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -v db="$POSTGRES_DB" -U postgres -d postgres; then
        as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >&2 || true
        die "could not create database \"$POSTGRES_DB\""
    fi
    as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >&2 ||
        die "the temporary server for setup did not stop"
    as_postgres touch "$DONE"
    log "setup done"
fi

if [ "$(id -u)" = 0 ]; then
    exec su -s /bin/sh -c 'exec "$0" "$@"' -- postgres "$PGBIN/postgres" -D "$PGDATA" "$@"
fi
exec "$PGBIN/postgres" -D "$PGDATA" "$@"
SH
    chmod 0755 "$r/usr/local/bin/pg-entrypoint.sh"
    cat >"$ctx/Dockerfile" <<DF
FROM $BASE
COPY root/ /
ENV PATH=$pgbin:/usr/local/bin:/bin PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to disconnect).
STOPSIGNAL SIGINT
HEALTHCHECK --interval=2s --timeout=3s --retries=30 --start-period=5s CMD ["$pgbin/pg_isready", "-q", "-h", "127.0.0.1", "-U", "postgres"]
ENTRYPOINT ["/usr/local/bin/pg-entrypoint.sh"]
DF
    build "$PG" "$ctx"
fi

if want "$NATS"; then
    nats_server=""
    if command -v nats-server >/dev/null 2>&1; then
        nats_server="$(command -v nats-server)"
    elif [ -x /usr/sbin/nats-server ]; then
        nats_server=/usr/sbin/nats-server
    fi
    [ -n "$nats_server" ] || die "nats-server is missing: apt-get install nats-server (or scripts/setup.sh)"
    ctx="$work/nats"
    r="$ctx/root"
    mkdir -p "$r/usr/sbin" "$r/etc/nats" "$r/usr/local/bin" "$r/data" "$r/run/nats"
    cp -L "$nats_server" "$r/usr/sbin/nats-server"
    chmod 0755 "$r/usr/sbin/nats-server"
    # Debian builds nats-server against glibc (not static): bring libc and the loader along.
    add_libs "$r" "$r/usr/sbin/nats-server"
    write_passwd "$r" "nats:998:998:NATS server:/data"
    cat >"$r/etc/nats/nats.conf" <<'CONF'
# bkbundle demo NATS server: clients on 4222, monitoring (/healthz, /varz) on 8222, JetStream
# (object store included) kept in /data, a volume.
server_name: bkdemo_nats
listen: 0.0.0.0:4222
http: 0.0.0.0:8222

jetstream {
  store_dir: "/data"
}

# User and password from $NATS_USER and $NATS_PASSWORD. nats-entrypoint.sh writes them, quoted,
# to auth.conf (a link to /run/nats/auth.conf) at every start rather than referring to the
# variables here: nats.conf parses a `$VAR` value as a config token, so a password such as
# 12345, true or 0E7kf... (a number) fails to load.
include ./auth.conf
CONF
    ln -s /run/nats/auth.conf "$r/etc/nats/auth.conf"
    cat >"$r/usr/local/bin/nats-entrypoint.sh" <<'SH'
#!/bin/sh
# bkbundle demo NATS entrypoint (busybox sh): writes the client credentials from $NATS_USER and
# $NATS_PASSWORD to /run/nats/auth.conf (included by /etc/nats/nats.conf), then execs
# nats-server in the foreground as the user nats. Arguments starting with "-" go to nats-server;
# any other command is run as is.
set -eu
log() { echo "nats-entrypoint: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

[ -n "${NATS_USER:-}" ] || die "NATS_USER is not set: clients must log in (give -e NATS_USER=... -e NATS_PASSWORD=...)"
[ -n "${NATS_PASSWORD:-}" ] || die "NATS_PASSWORD is not set: clients must log in (give -e NATS_PASSWORD=...)"
# A quoted nats.conf string: backslash and double quote escaped; one line only.
quote() {
    case "$1" in
    *"
"*) die "$2 must be one line" ;;
    esac
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/[\\"]/\\&/g')"
}
user="$(quote "$NATS_USER" NATS_USER)"
password="$(quote "$NATS_PASSWORD" NATS_PASSWORD)"

mkdir -p /run/nats
umask 077
printf 'authorization {\n  user: %s\n  password: %s\n}\n' "$user" "$password" >/run/nats/auth.conf.tmp
mv /run/nats/auth.conf.tmp /run/nats/auth.conf

if [ "$(id -u)" = 0 ]; then
    mkdir -p /data
    find /data /run/nats \! -user nats -exec chown nats:nats {} +
    exec su -s /bin/sh -c 'exec "$0" "$@"' -- nats /usr/sbin/nats-server --config /etc/nats/nats.conf "$@"
fi
exec /usr/sbin/nats-server --config /etc/nats/nats.conf "$@"
SH
    chmod 0755 "$r/usr/local/bin/nats-entrypoint.sh"
    cat >"$ctx/Dockerfile" <<DF
FROM $BASE
COPY root/ /
ENV PATH=/usr/sbin:/usr/local/bin:/bin
VOLUME /data
EXPOSE 4222 8222
HEALTHCHECK --interval=2s --timeout=3s --retries=30 --start-period=2s CMD ["/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz"]
ENTRYPOINT ["/usr/local/bin/nats-entrypoint.sh"]
DF
    build "$NATS" "$ctx"
fi
