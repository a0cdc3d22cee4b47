#!/usr/bin/env bash
# Build the demo images and the demo agent package, offline, with no registry.
#
#   bkbundle-demo/base:1  `docker import` of a root filesystem made from Debian's busybox-static
#   bkbundle-demo/app:1   FROM base + /app (a process that logs a line every few seconds)
#   bkbundle-demo/web:1   FROM base + /www (served by busybox httpd on port 8080)
#   bkbundle-demo/postgres:15  FROM base + this host's Debian PostgreSQL 15 server (binaries, the
#                         shared libraries ldd reports, share/, zoneinfo) and pg-entrypoint.sh; the
#                         client tools too (psql, pg_dump, pg_restore, pg_dumpall), in
#                         /usr/lib/postgresql/15/bin as Debian lays them out: `bkbundle backup` and
#                         `restore` run them inside the container, as they do in the stack's real image
#   bkbundle-demo/nats:2  FROM base + this host's Debian nats-server with JetStream on /data; TLS on
#                         4222 and the leafnode port 7422 when /etc/nats/certs holds a certificate
#   bkbundle-demo/fusion-collector:1  FROM base + the agent artifacts laid out like upstream's
#                         bklite/fusion-collector (controller trees, installers, arm64 prestage), in
#                         two layers: the second replaces bin/telegraf and deletes bin/debug-dump
#   examples/demo/packages/fusion-collectors-linux-amd64.zip   the demo controller package
#
# Idempotent: an image that already exists is skipped unless --force (all) or --rebuild IMAGE (that
# one) is given; the package is rewritten only when its (deterministic) content changes. The base root filesystem tarball is
# deterministic (sorted, fixed mtimes, numeric owner 0), so re-importing it yields the same layer.
set -euo pipefail

usage() {
    echo "usage: $0 [--force | --rebuild IMAGE...]   (needs docker, python3, busybox-static, postgresql and nats-server: scripts/setup.sh)"
    echo "  --force          rebuild every image"
    echo "  --rebuild IMAGE  rebuild this one (e.g. bkbundle-demo/nats:2), keep the others; repeatable"
}
force=0
rebuild=" "
expect_image=0
for arg in "$@"; do
    if [ "$expect_image" = 1 ]; then
        rebuild="$rebuild$arg "
        expect_image=0
        continue
    fi
    case "$arg" in
    --force) force=1 ;;
    --rebuild) expect_image=1 ;;
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
if [ "$expect_image" = 1 ]; then
    usage >&2
    exit 2
fi

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
FUSION=bkbundle-demo/fusion-collector:1
PG_MAJOR=15
for image in $rebuild; do
    case " $BASE $APP $WEB $PG $NATS $FUSION " in
    *" $image "*) ;;
    *) die "--rebuild $image: not an image this script builds ($BASE $APP $WEB $PG $NATS $FUSION)" ;;
    esac
done
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
    if [ "$force" = 1 ] || [ "${rebuild#* "$1" }" != "$rebuild" ] || ! image_exists "$1"; then return 0; fi
    log "skipped $1 (exists; --rebuild $1 rebuilds it)"
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
    # The web entry answers at the agents' endpoint (server_url is NODE_SERVER_URL + this path),
    # as the platform's does, so `doctor --agent` on a demo agent host finds the path served.
    mkdir -p "$ctx/root/www/api/v1/node_mgmt/open_api"
    printf '{"result": false, "message": "the bkbundle demo has no BK-Lite server: this stands in for its agent API"}\n' \
        >"$ctx/root/www/api/v1/node_mgmt/open_api/node"
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

# A demo PostgreSQL image made before it carried the client tools backup and restore run in it
# (pg_dump, pg_restore) is made again.
if [ "$force" = 0 ] && image_exists "$PG" &&
    ! docker run --rm --entrypoint /bin/sh "$PG" -c "/usr/lib/postgresql/$PG_MAJOR/bin/pg_dump --version && /usr/lib/postgresql/$PG_MAJOR/bin/pg_restore --version" >/dev/null 2>&1; then
    log "$PG lacks pg_dump/pg_restore (made by an older version of this script): rebuilding it"
    rebuild="$rebuild$PG "
fi

if want "$PG"; then
    pgbin="/usr/lib/postgresql/$PG_MAJOR/bin"
    pglib="/usr/lib/postgresql/$PG_MAJOR/lib"
    pgshare="/usr/share/postgresql/$PG_MAJOR"
    # The server, its setup tools, and the clients bkbundle backup/restore exec in the container
    # (the dump must come from the server's own pg_dump, whatever the operator's host has).
    pgtools="postgres initdb pg_ctl pg_isready psql pg_dump pg_restore pg_dumpall"
    for b in $pgtools; do
        [ -x "$pgbin/$b" ] ||
            die "$pgbin/$b is missing: apt-get install postgresql-$PG_MAJOR (or scripts/setup.sh)"
    done
    [ -d "$pgshare" ] || die "$pgshare is missing: apt-get install postgresql-$PG_MAJOR (or scripts/setup.sh)"
    [ -f /usr/share/zoneinfo/UTC ] || die "/usr/share/zoneinfo is missing: apt-get install tzdata"
    ctx="$work/postgres"
    r="$ctx/root"
    mkdir -p "$r$pgbin" "$r$pglib" "$r/usr/share/postgresql" "$r/usr/share/zoneinfo" "$r/usr/local/bin" \
        "$r/var/lib/postgresql/data" "$r/var/run/postgresql"
    for b in $pgtools; do
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
    # Every tool must start in the image: a shared library ldd did not report shows here, not in
    # the middle of a backup.
    if ! out="$(docker run --rm --entrypoint /bin/sh "$PG" -c \
        'for b in $0; do "$1/$b" --version || exit 1; done' "$pgtools" "$pgbin" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "a PostgreSQL tool does not run in $PG (see above)"
    fi
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
# bkbundle demo NATS server: clients on 4222, leafnodes (region proxies) on 7422, monitoring
# (/healthz, /varz) on 8222 in plain HTTP, JetStream (object store included) kept in /data, a volume.
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

# Client TLS (a `tls` block) when /etc/nats/certs holds nats-server.crt and nats-server.key, a
# comment otherwise; and the leafnode listener with the same credentials and the same TLS. Both
# written by nats-entrypoint.sh at every start, so mounting or removing the certificates and
# restarting the container is all it takes.
include ./tls.conf
include ./leafnodes.conf
CONF
    ln -s /run/nats/auth.conf "$r/etc/nats/auth.conf"
    ln -s /run/nats/tls.conf "$r/etc/nats/tls.conf"
    ln -s /run/nats/leafnodes.conf "$r/etc/nats/leafnodes.conf"
    mkdir -p "$r/etc/nats/certs"
    cat >"$r/usr/local/bin/nats-entrypoint.sh" <<'SH'
#!/bin/sh
# bkbundle demo NATS entrypoint (busybox sh): writes the client credentials from $NATS_USER and
# $NATS_PASSWORD to /run/nats/auth.conf, and the TLS and leafnode settings to
# /run/nats/tls.conf and /run/nats/leafnodes.conf (all included by /etc/nats/nats.conf), then
# execs nats-server in the foreground as the user nats. Arguments starting with "-" go to
# nats-server; any other command is run as is.
#
# TLS: when /etc/nats/certs (the install target's certs/, mounted read-only) holds
# nats-server.crt and nats-server.key, clients on 4222 and leafnodes on 7422 must use TLS with
# them; without either file both listen in plain text. The key is root's, mode 0600, on the
# host: it is copied to /run/nats/certs, owned by nats, before privileges are dropped.
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

certs=/etc/nats/certs
crt="$certs/nats-server.crt"
key="$certs/nats-server.key"
# Last start's copies go first: certificates removed from the host mean plain text now.
rm -rf /run/nats/certs
tls=""
if [ -e "$crt" ] || [ -e "$key" ]; then
    [ -s "$crt" ] || die "$key is there but $crt is missing or empty: give both files (TLS) or neither (plain text)"
    [ -s "$key" ] || die "$crt is there but $key is missing or empty: give both files (TLS) or neither (plain text)"
    [ -r "$key" ] || die "$key is not readable by uid $(id -u): run the container as root (the default)"
    mkdir -p /run/nats/certs
    cp "$crt" /run/nats/certs/nats-server.crt
    cp "$key" /run/nats/certs/nats-server.key
    chmod 0644 /run/nats/certs/nats-server.crt
    chmod 0600 /run/nats/certs/nats-server.key
    tls='tls {
  cert_file: "/run/nats/certs/nats-server.crt"
  key_file: "/run/nats/certs/nats-server.key"
  timeout: 5
}'
    log "TLS on 4222 (clients) and 7422 (leafnodes) with $crt"
else
    log "no $crt and $key: clients (4222) and leafnodes (7422) in plain text"
fi
if [ -n "$tls" ]; then
    printf '# written by nats-entrypoint.sh at start: TLS with the certificate in %s\n%s\n' "$certs" "$tls"
else
    printf '# written by nats-entrypoint.sh at start: no certificate in %s, plain text\n' "$certs"
fi >/run/nats/tls.conf.tmp
mv /run/nats/tls.conf.tmp /run/nats/tls.conf
{
    printf 'leafnodes {\n  listen: 0.0.0.0:7422\n  authorization {\n    user: %s\n    password: %s\n  }\n' "$user" "$password"
    [ -z "$tls" ] || printf '%s\n' "$tls" | sed -e 's/^/  /'
    echo '}'
} >/run/nats/leafnodes.conf.tmp
mv /run/nats/leafnodes.conf.tmp /run/nats/leafnodes.conf

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
EXPOSE 4222 7422 8222
HEALTHCHECK --interval=2s --timeout=3s --retries=30 --start-period=2s CMD ["/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz"]
ENTRYPOINT ["/usr/local/bin/nats-entrypoint.sh"]
DF
    build "$NATS" "$ctx"
fi

# ---- the agent artifacts, laid out like upstream's bklite/fusion-collector --------------------
# Made without `docker build`: the image is written as a `docker save` archive (base's layer, two
# layers of our own, a config, a manifest) and loaded with `docker load`, so every byte is ours
# and fixed: the image id is the same at every run. A `RUN rm` step would be the only other way to
# get a deletion into a layer, and its whiteout and directory carry the time of the build.
#   layer 1  the trees of the 1.0.0 release candidate: /opt/fusion-collectors (linux controller),
#            /opt/release/linux/fusion-collectors/bklite-controller-installer,
#            /opt/release/windows/fusion-collectors (windows tree and installer),
#            /opt/release/linux/prestage/arm64 (arm64 binaries)
#   layer 2  the 1.0.0 fix: bin/telegraf replaced, bin/debug-dump deleted (a whiteout), so that a
#            pack which reads the layers without applying them ships the wrong telegraf and a file
#            that is not in the image.
# Every file is a small demo stand-in that says what it stands for (the .exe files are text).
if want "$FUSION"; then
    ctx="$work/fusion"
    mkdir -p "$ctx/base"
    docker save "$BASE" | tar -C "$ctx/base" -xf -
    base_diff="$(docker image inspect -f '{{index .RootFS.Layers 0}}' "$BASE")"
    old="$(docker image inspect -f '{{.Id}}' "$FUSION" 2>/dev/null || true)"
    python3 - "$ctx" "$base_diff" "$FUSION" "$EPOCH" <<'PY'
import hashlib, io, json, os, sys, tarfile

ctx, base_diff, ref, epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def sh(what, body):
    return "#!/bin/sh\n# bkbundle demo stand-in for %s (not the real program)\n%s" % (what, body)

def exe(what):
    return "bkbundle demo stand-in for %s: text, not a Windows program\n" % what

FC = "opt/fusion-collectors/"
WIN = "opt/release/windows/fusion-collectors/"
ARM = "opt/release/linux/prestage/arm64/"
# Upstream's agents/fusion-collector/misc/linux/sidecar.yml, its placeholders as they are.
SIDECAR_LINUX = """server_url: "__SERVER__URL__"
server_api_token: "__SERVER__API__TOKEN__"
node_id: "file:/opt/fusion-collectors/node-id"
node_name: "__NODE__NAME__"
update_interval: 10
tls_skip_verify: true
send_status: true
list_log_files: []
cache_path: "/opt/fusion-collectors/cache"
log_path: "/opt/fusion-collectors/log"
log_rotate_max_file_size: "10MiB"
log_rotate_keep_files: 10
collector_validation_timeout: "1m"
collector_shutdown_timeout: "10s"
collector_configuration_directory: "/opt/fusion-collectors/generated"

tags: [__TAGS__]

collector_binaries_accesslist:
  - "/opt/fusion-collectors/bin/*"
  - "/opt/fusion-collectors/bin/*/*"
"""
# Upstream's misc/windows/sidecar.yml (its placeholders differ from linux's: one underscore).
SIDECAR_WINDOWS = """server_url: "__SERVER_URL__"
server_api_token: "__SERVER_API_TOKEN__"
node_id: "__NODE_ID__"
update_interval: 10
tls_skip_verify: true
send_status: true
list_log_files: []
cache_path: "c:\\\\fusion-collectors\\\\cache"
log_path: "c:\\\\fusion-collectors\\\\logs"
collector_configuration_directory: "c:\\\\fusion-collectors\\\\generated"
tags: __TAGS__
collector_binaries_accesslist:
- "c:\\\\fusion-collectors\\\\bin\\\\*"
"""
INSTALL_SH = sh("install.sh (upstream: misc/linux/install.sh)", r"""set -eu
# usage: install.sh SERVER_URL SERVER_API_TOKEN ZONE GROUPS [NODE_NAME] [NODE_ID] [CPU_ARCHITECTURE]
# Renders sidecar.yml beside it as upstream's does (no systemd here: a demo).
[ $# -ge 4 ] && [ $# -le 7 ] || { echo "usage: $0 server_url server_api_token zone groups [node_name] [node_id] [cpu_architecture]" >&2; exit 1; }
cd "$(dirname "$0")"
esc() { printf '%s' "$1" | sed -e 's/[&|\\]/\\&/g'; }
tags="\"zone:$(esc "$3")\", \"group:$(esc "$4")\""
[ -z "${7:-}" ] || tags="$tags, \"cpu_architecture:$(esc "$7")\""
[ -z "${6:-}" ] || echo "$6" >./node-id
sed -i -e "s|__SERVER__URL__|$(esc "$1")|g" -e "s|__SERVER__API__TOKEN__|$(esc "$2")|g" \
    -e "s|__TAGS__|$tags|g" -e "s|__NODE__NAME__|$(esc "${5:-}")|g" sidecar.yml
echo "installed collector-sidecar in $(pwd) (demo)"
""")
VERSION = 'LINUX_SIDECAR_VERSION="1.0.0"\nWINDOWS_SIDECAR_VERSION="1.0.0"\n'

# path -> (content, mode); a path ending in "/" is a directory.
layer1 = {
    FC + "collector-sidecar": (sh("collector-sidecar 1.0.0", 'echo "collector-sidecar 1.0.0 (demo)"\nexec sleep 3600\n'), 0o755),
    FC + "bin/telegraf": (sh("telegraf 1.0.0-rc1", 'echo "Telegraf 1.0.0-rc1 (demo)"\n'), 0o755),
    FC + "bin/vector": (sh("vector 1.0.0", 'echo "vector 1.0.0 (demo)"\n'), 0o755),
    FC + "bin/nats-executor": (sh("nats-executor 1.0.0", 'echo "nats-executor 1.0.0 (demo)"\n'), 0o755),
    FC + "bin/debug-dump": (sh("a debugging tool the release deletes", 'echo "must not ship"\n'), 0o755),
    FC + "cache/": (None, 0o755),
    FC + "generated/": (None, 0o755),
    FC + "log/": (None, 0o755),
    FC + "misc/VERSION": (VERSION, 0o644),
    FC + "misc/linux/install.sh": (INSTALL_SH, 0o755),
    FC + "misc/linux/uninstall.sh": (sh("uninstall.sh", 'echo "uninstalled collector-sidecar (demo)"\n'), 0o755),
    FC + "misc/linux/sidecar.yml": (SIDECAR_LINUX, 0o644),
    FC + "misc/linux/sidecar.service": ("""# bkbundle demo copy of upstream's misc/linux/sidecar.service
[Unit]
Description=Fusion Collector BK Sidecar
After=network.target

[Service]
Type=simple
EnvironmentFile=-/etc/fusion-collectors/environment
ExecStart=/opt/fusion-collectors/collector-sidecar -c /opt/fusion-collectors/sidecar.yml
User=root
Group=root
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
""", 0o644),
    "opt/release/linux/fusion-collectors/bklite-controller-installer": (sh("bklite-controller-installer (linux)",
        'echo "bklite-controller-installer 1.0.0 (demo): would fetch the installer session and the controller package"\n'), 0o755),
    WIN + "bklite-controller-installer.exe": (exe("bklite-controller-installer.exe"), 0o644),
    WIN + "collector-sidecar.exe": (exe("collector-sidecar.exe"), 0o644),
    WIN + "bin/telegraf.exe": (exe("bin/telegraf.exe"), 0o644),
    WIN + "bin/vector.exe": (exe("bin/vector.exe"), 0o644),
    WIN + "bin/nats-executor.exe": (exe("bin/nats-executor.exe"), 0o644),
    WIN + "sidecar.yml": (SIDECAR_WINDOWS, 0o644),
    WIN + "install.ps1": ("# bkbundle demo stand-in for upstream's misc/windows/install.ps1\nWrite-Output 'installed (demo)'\n", 0o644),
    ARM + "collector-sidecar": (sh("collector-sidecar 1.0.0 (arm64)", 'echo "collector-sidecar 1.0.0 arm64 (demo)"\n'), 0o755),
    ARM + "telegraf": (sh("telegraf 1.0.0 (arm64)", 'echo "Telegraf 1.0.0 arm64 (demo)"\n'), 0o755),
    ARM + "vector": (sh("vector 1.0.0 (arm64)", 'echo "vector 1.0.0 arm64 (demo)"\n'), 0o755),
    ARM + "nats-executor": (sh("nats-executor 1.0.0 (arm64)", 'echo "nats-executor 1.0.0 arm64 (demo)"\n'), 0o755),
}
layer2 = {
    FC + "bin/telegraf": (sh("telegraf 1.0.0", 'echo "Telegraf 1.0.0 (demo)"\n'), 0o755),
    # A whiteout: the file of this name in the layers below is deleted.
    FC + "bin/.wh.debug-dump": ("", 0o644),
}

def layer_tar(files):
    # Every parent directory gets its own entry (as docker's own layers have), all sorted,
    # owner 0, the fixed mtime.
    entries = dict(files)
    for path in list(files):
        parts = path.rstrip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]) + "/", (None, 0o755))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path in sorted(entries):
            content, mode = entries[path]
            info = tarfile.TarInfo(path.rstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = epoch, 0, 0, "", "", mode
            if path.endswith("/"):
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                data = content.encode()
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

with open(os.path.join(ctx, "base", "manifest.json")) as f:
    base_layer_path = json.load(f)[0]["Layers"][0]
with open(os.path.join(ctx, "base", base_layer_path), "rb") as f:
    base_layer = f.read()
if "sha256:" + hashlib.sha256(base_layer).hexdigest() != base_diff:
    sys.exit("the base layer docker save wrote is not the base image's layer %s" % base_diff)

out = os.path.join(ctx, "image")
os.makedirs(out)
layers = [base_layer, layer_tar(layer1), layer_tar(layer2)]
paths, diff_ids = [], []
for data in layers:
    h = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(out, h))
    with open(os.path.join(out, h, "layer.tar"), "wb") as f:
        f.write(data)
    paths.append(h + "/layer.tar")
    diff_ids.append("sha256:" + h)
created = "2024-01-01T00:00:00Z"
config = {
    "architecture": "amd64",
    "os": "linux",
    "created": created,
    "config": {
        "Env": ["PATH=/bin"],
        "Cmd": ["/bin/sh"],
        "Labels": {
            "org.opencontainers.image.title": "bkbundle demo fusion-collector (agent artifacts, like bklite/fusion-collector)",
            "org.opencontainers.image.version": "1.0.0",
        },
    },
    "rootfs": {"type": "layers", "diff_ids": diff_ids},
    "history": [
        {"created": created, "created_by": "bkbundle demo base (busybox-static)"},
        {"created": created, "created_by": "demo-images.sh: fusion-collector trees, 1.0.0 release candidate"},
        {"created": created, "created_by": "demo-images.sh: 1.0.0 fix: bin/telegraf replaced, bin/debug-dump deleted"},
    ],
}
config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
with open(os.path.join(out, config_name), "wb") as f:
    f.write(config_bytes)
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump([{"Config": config_name, "RepoTags": [ref], "Layers": paths}], f)
PY
    tar -C "$ctx/image" --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner -cf "$ctx/image.tar" .
    docker load -q -i "$ctx/image.tar" >/dev/null || die "docker load of $FUSION failed"
    log "built $FUSION ($(docker image inspect -f '{{.Id}}' "$FUSION"))"
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$FUSION")" ] &&
        [ -z "$(docker image inspect -f '{{join .RepoTags ","}}' "$old" 2>/dev/null)" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
fi
