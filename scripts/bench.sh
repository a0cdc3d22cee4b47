#!/usr/bin/env bash
# Benchmarks: the baseline and bkbundle side by side in one run, printing ratios.
#
#   scripts/bench.sh            all sections
#   scripts/bench.sh pack       issue 2: pack / verify against docker save (+gzip, sha256sum)
#   scripts/bench.sh install    issue 3: image loading against docker load -i; a re-run; memory
#   scripts/bench.sh packages   issue 5: object upload against nats-py's put of the same 500 MB
#                               file to the same nats-server; a re-run; memory
#   scripts/bench.sh regions    issue 10: regions apply of 50 regions x 15 keys on releases 0012 and
#                               0044 against psql running the same INSERTs; a re-run
#   scripts/bench.sh agent-doctor  issue 13: doctor --agent on a clean agent host and on one with
#                               every link broken (containers of the demo's busybox base, against
#                               the demo installed for them); seconds and peak memory
#   scripts/bench.sh backup     issue 14: backup of a demo site grown to ~200 MB of database and
#                               ~1 GB of objects against `pg_dump | zstd` plus a nats-py download
#                               of every bucket; memory; restore after `down -v` against the backup
#   scripts/bench.sh push       issue 16: push of the ~1 GB images to a docker-registry against
#                               skopeo copy of their docker save tar; a re-run; memory; --compression
#                               zstd; install --images-from against docker pull of the same images
#                               (PULL_RUNS rounds, default 3)
#   scripts/bench.sh delta      issue 17: app1 rebuilt with a new ~175 MB layer: the delta bundle
#                               (pack --base) against that layer's compressed size; its install on
#                               the site of the base against a full install on a fresh engine
#                               (bytes streamed, seconds); merge; a full bundle on the base's site
#   scripts/bench.sh pack-remote  issue 17: pack of the ~1 GB images from a loopback docker-registry
#                               and from an OCI layout (both filled by skopeo) against pack through
#                               the engine's docker save; memory
#
# Images: three images of ~1 GB in total sharing a ~480 MB base layer, built from this machine's
# own files (binaries, libraries, text: realistic compression), and a ~3 GB set for the
# memory-does-not-grow check. Building them takes a few minutes the first time; they are kept.
# Needs: docker, GNU time (/usr/bin/time), gzip, sha256sum (agent-doctor: openssl, nsenter,
# iptables; backup: docker-compose, zstd, nats-py; push: docker-registry, skopeo, curl,
# docker-compose); run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${BENCH_DIR:-/var/tmp/bkbundle-bench}
mkdir -p "$WORK"
SECTIONS=${*:-pack install packages regions agent-doctor backup push delta pack-remote}

say() { printf '%s\n' "$*"; }
need() { command -v "$1" >/dev/null || { say "missing $1: run scripts/setup.sh"; exit 1; }; }
need docker; need gzip; need sha256sum; [ -x /usr/bin/time ] || { say "missing /usr/bin/time: apt-get install time"; exit 1; }

cargo build --release --quiet
# .cargo/config.toml names the target explicitly (static glibc), so the outputs are under it.
BK=$ROOT/target/x86_64-unknown-linux-gnu/release/bkbundle

# time_rss OUTVAR CMD...: run CMD, store "seconds peak_rss_kib" in OUTVAR. For bkbundle (run with
# -v) the peak is its own VmHWM as it reports it: GNU time's %M would include the largest waited-for
# child (docker-compose, a Python program of ~40 MiB). CMD's stdout is kept in $WORK/stdout.out
# (a --json report, for the figures of its parts).
time_rss() {
  local var=$1; shift
  /usr/bin/time -f '%e %M' -o "$WORK/time.out" "$@" >"$WORK/stdout.out" 2>"$WORK/stderr.out" || { cat "$WORK/stderr.out" >&2; return 1; }
  local t m own
  read -r t m < <(tail -n1 "$WORK/time.out")
  own=$(sed -n 's/^bkbundle: peak memory \([0-9]*\) kB$/\1/p' "$WORK/stderr.out" | tail -n1)
  printf -v "$var" '%s %s' "$t" "${own:-$m}"
}
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
mb() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6:.0f} MB')" "$1"; }
gbps() { python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]) / 1e9:.2f} GB/s')" "$1" "$2"; }

build_image() { # name base-or-empty layer-mb seed roots...
  local name=$1 base=$2 size=$3 seed=$4; shift 4
  if docker image inspect "$name" >/dev/null 2>&1; then return; fi
  local ctx; ctx=$(mktemp -d "$WORK/ctx.XXXX")
  python3 scripts/bench-images.py "$ctx/layer.tar" "$size" "$seed" "$@"
  if [ -z "$base" ]; then
    docker import "$ctx/layer.tar" "$name" >/dev/null
  else
    printf 'FROM %s\nADD layer.tar /\n' "$base" > "$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "$name" "$ctx" >/dev/null
  fi
  rm -rf "$ctx"
}

# make_images [small]: small builds only the ~1 GB set (base, app1-app3), not the ~3 GB one.
make_images() {
  say "== building benchmark images (skipped when present)"
  build_image bkbundle-bench/base:1 "" 480 0 /usr/bin /usr/libexec /usr/share
  for i in 1 2 3; do build_image "bkbundle-bench/app$i:1" bkbundle-bench/base:1 175 "$i" /usr/lib /usr/local /usr/share; done
  [ "${1:-}" != small ] || return 0
  for i in 4 5 6 7 8 9 10 11 12; do build_image "bkbundle-bench/app$i:1" bkbundle-bench/base:1 280 "$i" /usr/lib /root/.rustup /root/.pyenv; done
}

recipe() { # file images...
  local f=$1; shift
  { printf 'format = 1\n[bundle]\nname = "bench"\nversion = "1"\n'
    for i in "$@"; do printf '[[images]]\nref = "%s"\npull = false\n' "$i"; done; } > "$f"
}

bench_pack() {
  make_images
  local small=(bkbundle-bench/app1:1 bkbundle-bench/app2:1 bkbundle-bench/app3:1)
  local big=("${small[@]}"); for i in 4 5 6 7 8 9 10 11 12; do big+=("bkbundle-bench/app$i:1"); done
  recipe "$WORK/small.toml" "${small[@]}"
  recipe "$WORK/big.toml" "${big[@]}"
  rm -f "$WORK"/*.bkb "$WORK"/x.tar "$WORK"/x.tar.gz

  say "== pack: ~1 GB of images (3 images sharing a base layer)"
  local t_save t_gz t_pack
  time_rss t_save docker save -o "$WORK/x.tar" "${small[@]}"
  local raw; raw=$(stat -c %s "$WORK/x.tar"); rm -f "$WORK/x.tar"
  time_rss t_gz bash -c "docker save ${small[*]} | gzip -6 > '$WORK/x.tar.gz' && sha256sum '$WORK/x.tar.gz'"
  local gz; gz=$(stat -c %s "$WORK/x.tar.gz"); rm -f "$WORK/x.tar.gz"
  time_rss t_pack "$BK" -v --no-progress pack "$WORK/small.toml" -o "$WORK/small.bkb"
  local bkb; bkb=$(stat -c %s "$WORK/small.bkb")
  local bin; bin=$(stat -c %s "$BK")
  say "docker save -o               ${t_save% *} s   ($(mb "$raw") tar)"
  say "docker save | gzip -6 + sha  ${t_gz% *} s   ($(mb "$gz"))"
  say "bkbundle pack                ${t_pack% *} s   ($(mb "$bkb") bundle, of which $(mb "$bin") is the bkbundle binary)  peak RSS $(( ${t_pack#* } / 1024 )) MiB"
  say "ratio pack / docker save -o        $(ratio "${t_pack% *}" "${t_save% *}")   (target <= 1.3)"
  say "ratio pack / save|gzip|sha256sum   $(ratio "${t_pack% *}" "${t_gz% *}")   (target <= 0.25)"
  say "ratio bundle size / gzip size      $(ratio "$bkb" "$gz")   (target <= 1.00; bundle includes the binary)"

  say "== verify (from page cache)"
  cat "$WORK/small.bkb" > /dev/null
  local t_ver t_sha
  time_rss t_sha sha256sum "$WORK/small.bkb"
  time_rss t_ver "$BK" -v --no-progress verify "$WORK/small.bkb"
  say "sha256sum of the bundle      ${t_sha% *} s   ($(gbps "$bkb" "${t_sha% *}"))"
  say "bkbundle verify              ${t_ver% *} s   ($(gbps "$bkb" "${t_ver% *}"), target >= 1 GB/s)  peak RSS $(( ${t_ver#* } / 1024 )) MiB"

  say "== memory does not grow with bundle size: ~3 GB of images"
  local t_pack3 t_ver3
  time_rss t_pack3 "$BK" -v --no-progress pack "$WORK/big.toml" -o "$WORK/big.bkb"
  cat "$WORK/big.bkb" > /dev/null
  time_rss t_ver3 "$BK" -v --no-progress verify "$WORK/big.bkb"
  local big_size; big_size=$(stat -c %s "$WORK/big.bkb")
  say "pack   1 GB: $(( ${t_pack#* } / 1024 )) MiB   3 GB: $(( ${t_pack3#* } / 1024 )) MiB   ratio $(ratio "${t_pack3#* }" "${t_pack#* }") (target <= 1.10, both <= 64 MiB)"
  say "verify 1 GB: $(( ${t_ver#* } / 1024 )) MiB   3 GB: $(( ${t_ver3#* } / 1024 )) MiB   ratio $(ratio "${t_ver3#* }" "${t_ver#* }") (target <= 1.10, both <= 64 MiB)"
  say "3 GB bundle: $(mb "$big_size"), pack ${t_pack3% *} s, verify ${t_ver3% *} s ($(gbps "$big_size" "${t_ver3% *}"))"
  rm -f "$WORK"/*.bkb
}

# Remove every benchmark image, so that a load really loads all layers, the shared base included
# (a fresh offline host). The next run of this script builds them again (a few minutes).
# A parent removed in the same `docker rmi` as its children can be refused ("has dependent child
# images"), whatever -f says: repeat until none is left. drop_images PATTERN (default: all of them).
drop_images() {
  local pattern=${1:-bkbundle-bench/*} ids
  for _ in 1 2 3 4; do
    ids=$(docker images -q "$pattern" | sort -u)
    [ -n "$ids" ] || return 0
    docker rmi -f $ids >/dev/null 2>&1 || true
  done
  say "could not remove every image of $pattern: $(docker images "$pattern" --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
  return 1
}

bench_install() {
  make_images
  local small=(bkbundle-bench/app1:1 bkbundle-bench/app2:1 bkbundle-bench/app3:1)
  recipe "$WORK/small.toml" "${small[@]}"
  # A stack so install has something to start: pack refuses a stack whose images the bundle does
  # not carry, so the service is app1 itself, running the static busybox its base layer holds.
  mkdir -p "$WORK/stack"
  printf 'version: "2.4"\nservices:\n  app:\n    image: bkbundle-bench/app1:1\n    command: ["/l0/usr/bin/busybox", "sleep", "3600"]\n    stop_signal: SIGKILL\n' > "$WORK/stack/docker-compose.yml"
  printf 'X=1\n' > "$WORK/stack/env.template"
  printf '[stack]\ndir = "stack"\ncompose = "docker-compose.yml"\nenv_template = "env.template"\nproject = "bkbench"\n' >> "$WORK/small.toml"
  "$BK" -v --no-progress pack "$WORK/small.toml" -o "$WORK/small.bkb" >/dev/null
  docker save -o "$WORK/x.tar" "${small[@]}"
  local raw; raw=$(stat -c %s "$WORK/x.tar")

  say "== install: image loading (~1 GB, 3 images sharing a base layer)"
  local t_load t_inst
  docker-compose -p bkbench -f "$WORK/stack/docker-compose.yml" down >/dev/null 2>&1 || true
  drop_images
  cat "$WORK/x.tar" > /dev/null
  time_rss t_load docker load -i "$WORK/x.tar"
  drop_images
  rm -rf "$WORK/target"
  cat "$WORK/small.bkb" > /dev/null
  time_rss t_inst "$BK" -v --no-progress install "$WORK/small.bkb" --target "$WORK/target" --timeout 120
  say "docker load -i (uncompressed save tar, $(mb "$raw"))   ${t_load% *} s"
  say "bkbundle install (verify + load + start + health)    ${t_inst% *} s   peak RSS $(( ${t_inst#* } / 1024 )) MiB (target <= 64)"
  # The image step alone, from the install report of a fresh load.
  docker-compose -p bkbench -f "$WORK/target/docker-compose.yml" down >/dev/null 2>&1 || true
  drop_images
  rm -rf "$WORK/target"
  local images_s; images_s=$("$BK" --json --no-progress install "$WORK/small.bkb" --target "$WORK/target" --timeout 120 | python3 -c 'import json,sys; r=json.load(sys.stdin); print([s["seconds"] for s in r["steps"] if s["name"]=="images"][0])')
  say "bkbundle image step alone                           $images_s s"
  say "ratio image loading / docker load -i     $(ratio "$images_s" "${t_load% *}")   (target <= 1.2)"

  say "== install: re-run when everything is installed"
  local t_rerun
  time_rss t_rerun "$BK" -v --no-progress install "$WORK/small.bkb" --target "$WORK/target"
  say "bkbundle install (already installed)     ${t_rerun% *} s   (target <= 10 s)  peak RSS $(( ${t_rerun#* } / 1024 )) MiB"
  docker-compose -p bkbench -f "$WORK/target/docker-compose.yml" down >/dev/null 2>&1 || true
  rm -rf "$WORK/target" "$WORK/x.tar" "$WORK"/*.bkb
}

# bench_delta: version 1 = dapp1:1 dapp2:1 dapp3:1; version 2 = dapp1:2 (the base layer and a new
# ~175 MB layer) dapp2:1 dapp3:1. Each version's stack runs its dapp1.
# The service has a health check, as BK-Lite's have: without one install waits its steady time
# (5 s) after the start, the same fixed wait on both sides.
delta_stack() { # dir image
  mkdir -p "$1"
  printf 'version: "2.4"\nservices:\n  app:\n    image: %s\n    command: ["/l0/usr/bin/busybox", "sleep", "3600"]\n    stop_signal: SIGKILL\n    healthcheck:\n      test: ["CMD", "/l0/usr/bin/busybox", "true"]\n      interval: 1s\n      retries: 30\n' "$2" > "$1/docker-compose.yml"
  printf 'X=1\n' > "$1/env.template"
}
# streamed FILE: the bytes of layers an install --json report's plan says it streams.
streamed() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(i.get("stream") or 0 for i in r["plan"]["images"]))' "$1"; }
images_step() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print([s["seconds"] for s in r["steps"] if s["name"]=="images"][0])' "$1"; }

bench_delta() {
  need docker-compose
  # Images of its own, built like the others (a ~480 MB base, three ~175 MB application layers),
  # so that removing them for a fresh engine leaves the other sections' images alone.
  say "== building the delta section's images (skipped when present)"
  # (the base salted: the same files as the other sections' base, in a layer of its own)
  BENCH_SALT=delta build_image bkbundle-bench/dbase:1 "" 480 0 /usr/bin /usr/libexec /usr/share
  for i in 1 2 3; do build_image "bkbundle-bench/dapp$i:1" bkbundle-bench/dbase:1 175 "5$i" /usr/lib /usr/local /usr/share; done
  build_image bkbundle-bench/dapp1:2 bkbundle-bench/dbase:1 175 59 /usr/lib /usr/local /usr/share
  local v1=(bkbundle-bench/dapp1:1 bkbundle-bench/dapp2:1 bkbundle-bench/dapp3:1)
  local v2=(bkbundle-bench/dapp1:2 bkbundle-bench/dapp2:1 bkbundle-bench/dapp3:1)
  delta_stack "$WORK/dstack1" bkbundle-bench/dapp1:1
  delta_stack "$WORK/dstack2" bkbundle-bench/dapp1:2
  recipe "$WORK/d1.toml" "${v1[@]}"
  printf '[stack]\ndir = "dstack1"\ncompose = "docker-compose.yml"\nenv_template = "env.template"\nproject = "bkdelta"\n' >> "$WORK/d1.toml"
  recipe "$WORK/d2.toml" "${v2[@]}"
  sed -i 's/^version = "1"/version = "2"/' "$WORK/d2.toml"
  printf '[stack]\ndir = "dstack2"\ncompose = "docker-compose.yml"\nenv_template = "env.template"\nproject = "bkdelta"\n' >> "$WORK/d2.toml"
  rm -f "$WORK"/d*.bkb; rm -rf "$WORK/dtarget1" "$WORK/dtarget2"
  "$BK" --no-progress pack "$WORK/d1.toml" -o "$WORK/d1.bkb" >/dev/null
  "$BK" --no-progress pack "$WORK/d2.toml" -o "$WORK/d2-full.bkb" >/dev/null
  local t_dpack
  time_rss t_dpack "$BK" -v --no-progress pack "$WORK/d2.toml" -o "$WORK/d2-delta.bkb" --base "$WORK/d1.bkb"

  say "== delta: app1 rebuilt with a new ~175 MB layer, against a base of app1:1 app2:1 app3:1"
  # The changed layer: app1:2's top layer, as the full version 2 bundle stores it.
  local changed; changed=$(python3 - "$WORK/d2-full.bkb" <<'PY'
import subprocess, sys, tomllib
m = tomllib.loads(subprocess.run(["tar", "-xOf", sys.argv[1], "bundle.toml"], capture_output=True, check=True, text=True).stdout)
img = [i for i in m["images"] if "bkbundle-bench/dapp1:2" in i["refs"]][0]
top = [l for l in m["layers"] if l["diff_id"] == img["layers"][-1]][0]
print([f["size"] for f in m["files"] if f["path"] == top["file"]][0])
PY
)
  local full delta
  full=$(stat -c %s "$WORK/d2-full.bkb"); delta=$(stat -c %s "$WORK/d2-delta.bkb")
  say "full bundle of version 2      $(mb "$full")"
  say "delta bundle (pack --base)    $(mb "$delta") in ${t_dpack% *} s, peak RSS $(( ${t_dpack#* } / 1024 )) MiB"
  say "changed layer, compressed     $(mb "$changed")"
  say "ratio delta / changed layer   $(ratio "$delta" "$changed")   (target <= 1.10)"

  # A full install of version 2 on a fresh engine (no bench image at all).
  docker-compose -p bkdelta -f "$WORK/dstack1/docker-compose.yml" down >/dev/null 2>&1 || true
  drop_images 'bkbundle-bench/d*'
  cat "$WORK/d2-full.bkb" > /dev/null
  local t_full t_delta
  time_rss t_full "$BK" -v --json --no-progress install "$WORK/d2-full.bkb" --target "$WORK/dtarget1" --timeout 120
  cp "$WORK/stdout.out" "$WORK/full.json"
  docker-compose -p bkdelta -f "$WORK/dtarget1/docker-compose.yml" down >/dev/null 2>&1 || true
  # The site of version 1 (installed from the base), then the delta on it.
  "$BK" --no-progress install "$WORK/d1.bkb" --target "$WORK/dtarget2" --timeout 120 >/dev/null
  docker rmi bkbundle-bench/dapp1:2 >/dev/null
  cat "$WORK/d2-delta.bkb" > /dev/null
  time_rss t_delta "$BK" -v --json --no-progress install "$WORK/d2-delta.bkb" --target "$WORK/dtarget2" --timeout 120 --no-backup
  cp "$WORK/stdout.out" "$WORK/delta.json"
  local b_full b_delta
  b_full=$(streamed "$WORK/full.json"); b_delta=$(streamed "$WORK/delta.json")
  say "full install (fresh engine)   ${t_full% *} s, images step $(images_step "$WORK/full.json") s, $(mb "$b_full") of layers streamed"
  say "delta install (base's site)   ${t_delta% *} s, images step $(images_step "$WORK/delta.json") s, $(mb "$b_delta") of layers streamed, peak RSS $(( ${t_delta#* } / 1024 )) MiB"
  say "ratio bytes streamed delta / full   $(ratio "$b_delta" "$b_full")   (target <= 0.35)"
  say "ratio time delta / full install     $(ratio "${t_delta% *}" "${t_full% *}")   (target <= 0.50)"

  # The full version 2 bundle on the base's site streams only what the engine lacks as well.
  docker-compose -p bkdelta -f "$WORK/dtarget2/docker-compose.yml" down >/dev/null 2>&1 || true
  rm -rf "$WORK/dtarget2"
  "$BK" --no-progress install "$WORK/d1.bkb" --target "$WORK/dtarget2" --timeout 120 >/dev/null
  docker rmi bkbundle-bench/dapp1:2 >/dev/null
  local t_fb
  time_rss t_fb "$BK" -v --json --no-progress install "$WORK/d2-full.bkb" --target "$WORK/dtarget2" --timeout 120 --no-backup
  say "full bundle on the base's site  ${t_fb% *} s, $(mb "$(streamed "$WORK/stdout.out")") of layers streamed (before issue 17: every layer of dapp1:2, $(mb "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(i["size"] for i in r["plan"]["images"] if i["action"]=="load"))' "$WORK/stdout.out")"))"

  local t_merge
  time_rss t_merge "$BK" -v --no-progress merge "$WORK/d1.bkb" "$WORK/d2-delta.bkb" -o "$WORK/d2-merged.bkb"
  say "merge base + delta            ${t_merge% *} s ($(mb "$(stat -c %s "$WORK/d2-merged.bkb")")), peak RSS $(( ${t_merge#* } / 1024 )) MiB"
  docker-compose -p bkdelta -f "$WORK/dtarget2/docker-compose.yml" down >/dev/null 2>&1 || true
  rm -rf "$WORK/dtarget1" "$WORK/dtarget2" "$WORK"/d*.bkb
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A throwaway PostgreSQL (the newest release's node_mgmt tables) and nats-server -js on free loopback ports;
# stopped by the EXIT trap.
start_servers() {
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  rm -rf "$WORK/pg" "$WORK/js"; mkdir -p "$WORK/pg" "$WORK/js"
  chown postgres "$WORK/pg"
  PGPORT=$(free_port)
  runuser -u postgres -- "$pgbin/initdb" -D "$WORK/pg/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" \
    -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1" -w start >/dev/null
  psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c 'CREATE DATABASE bench' >/dev/null
  psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d bench -f tests/fixtures/releases/0044.sql >/dev/null
  NATSPORT=$(free_port)
  printf 'listen: "127.0.0.1:%s"\njetstream { store_dir: "%s" }\n' "$NATSPORT" "$WORK/js" > "$WORK/nats.conf"
  nats-server -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
  NATSPID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$NATSPORT") 2>/dev/null && break; sleep 0.1; done
  trap stop_servers EXIT
}
stop_servers() {
  [ -z "${NATSPID:-}" ] || kill "$NATSPID" 2>/dev/null || true
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$WORK/pg/data" -m fast stop >/dev/null 2>&1 || true
}

bench_packages() {
  need nats-server; need psql
  python3 -c 'import nats' 2>/dev/null || { say "missing nats-py: run scripts/setup.sh"; exit 1; }
  local pkgdir="$WORK/packages"
  mkdir -p "$pkgdir"
  local file="$pkgdir/benchprobe-1.0.0-linux-amd64"
  [ "$(stat -c %s "$file" 2>/dev/null || echo 0)" = 500000000 ] || head -c 500000000 /dev/urandom > "$file"
  printf 'format = 1\n[bundle]\nname = "pkgbench"\nversion = "1"\n[[packages]]\nfile = "%s"\ntype = "collector"\nos = "linux"\narch = "x86_64"\nobject = "BenchProbe"\nversion = "1.0.0"\n' "$file" > "$WORK/pkg.toml"
  "$BK" --no-progress pack "$WORK/pkg.toml" -o "$WORK/pkg.bkb" >/dev/null
  start_servers
  local db="postgres://postgres@127.0.0.1:$PGPORT/bench" nats="nats://127.0.0.1:$NATSPORT"
  cat "$file" "$WORK/pkg.bkb" > /dev/null

  say "== packages: upload of one 500 MB package to nats-server $(nats-server --version | awk '{print $NF}') (JetStream, file store)"
  local t_py t_bk t_re
  time_rss t_py python3 - "$nats" "$file" <<'PY'
import asyncio, sys, nats
from nats.js.api import ObjectMeta, ObjectMetaOptions
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    store = await js.create_object_store("pybench")
    with open(sys.argv[2], "rb") as f:
        meta = ObjectMeta(name="linux/x86_64/BenchProbe/1.0.0/benchprobe", description="benchprobe",
                          options=ObjectMetaOptions(max_chunk_size=128 * 1024))
        await store.put(meta.name, f, meta=meta)
    await nc.close()
asyncio.run(main())
PY
  time_rss t_bk "$BK" -v --no-progress init-packages --auto --bundle "$WORK/pkg.bkb" --database-url "$db" --nats-url "$nats"
  local sent; sent=$("$BK" --json --no-progress init-packages --auto --bundle "$WORK/pkg.bkb" --database-url "$db" --nats-url "$nats" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bytes_sent"], r["skipped"])')
  time_rss t_re "$BK" -v --no-progress init-packages --auto --bundle "$WORK/pkg.bkb" --database-url "$db" --nats-url "$nats"
  say "nats-py object put (128 KiB chunks)          ${t_py% *} s   $(python3 -c "print(f'{500/float(\"${t_py% *}\"):.0f}')") MB/s   peak RSS $(( ${t_py#* } / 1024 )) MiB"
  say "bkbundle init-packages (1 MiB chunks)        ${t_bk% *} s   $(python3 -c "print(f'{500/float(\"${t_bk% *}\"):.0f}')") MB/s   peak RSS $(( ${t_bk#* } / 1024 )) MiB (target <= 64)"
  say "throughput ratio bkbundle / nats-py          $(ratio "${t_py% *}" "${t_bk% *}")   (target >= 2)"
  say "re-run, nothing changed                      ${t_re% *} s   (target <= 1 s; bytes sent, objects skipped: $sent)   peak RSS $(( ${t_re#* } / 1024 )) MiB"
  bench_artifacts "$db"
  stop_servers
  rm -f "$WORK/pkg.bkb"
}

# issue 12: a 400 MB controller package that gets the site CA on the way (its zip entries copied
# raw, certs/ca.crt appended) and a 100 MB installer (no row), to a NATS serving TLS from a site CA,
# as the stacks that carry a CA do; against nats-py putting the same two files as they are
# (128 KiB chunks, upstream's uploader) to the same server, over TLS too. Target: >= 2x nats-py.
bench_artifacts() {
  local db=$1 dir="$WORK/artifacts"
  mkdir -p "$dir/target/certs"
  local zipf="$dir/fusion-collectors-linux-amd64.zip" inst="$dir/bklite-controller-installer"
  if [ ! -f "$zipf" ]; then
    python3 - "$zipf" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("fusion-collectors/install.sh", "#!/bin/sh\n")
    z.writestr("fusion-collectors/sidecar.yml", 'server_url: "__SERVER__URL__"\n')
    for name in ("collector-sidecar", "bin/telegraf", "bin/vector", "bin/nats-executor"):
        with z.open("fusion-collectors/" + name, "w", force_zip64=True) as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
PY
  fi
  [ "$(stat -c %s "$inst" 2>/dev/null || echo 0)" = 100000000 ] || head -c 100000000 /dev/urandom > "$inst"
  printf 'format = 1\n[bundle]\nname = "artbench"\nversion = "1"\n[[packages]]\nfile = "%s"\ntype = "controller"\nos = "linux"\narch = "x86_64"\nobject = "Controller"\nversion = "9.9.9"\n[[installers]]\nfile = "%s"\nos = "linux"\narch = "x86_64"\n' "$zipf" "$inst" > "$dir/recipe.toml"
  "$BK" --no-progress pack "$dir/recipe.toml" -o "$dir/art.bkb" >/dev/null
  # An install target's TLS files, as install writes them: the site CA and the NATS certificate.
  local c="$dir/target/certs"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/ca.key" -out "$c/ca.crt" -days 30 -subj "/CN=bench CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$c/nats-server.key" -out "$dir/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName = IP:127.0.0.1\n' > "$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$c/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 30 -extfile "$dir/san.ext" -out "$c/nats-server.crt" 2>/dev/null
  local port; port=$(free_port)
  rm -rf "$WORK/js-tls"; mkdir -p "$WORK/js-tls"
  printf 'listen: "127.0.0.1:%s"\njetstream { store_dir: "%s" }\ntls { cert_file: "%s", key_file: "%s" }\n' "$port" "$WORK/js-tls" "$c/nats-server.crt" "$c/nats-server.key" > "$dir/nats.conf"
  nats-server -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
  local tlspid=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  printf 'NATS_PORT=%s\n' "$port" > "$dir/target/.env"
  local nats="tls://127.0.0.1:$port"
  local total; total=$(( $(stat -c %s "$zipf") + $(stat -c %s "$inst") ))
  cat "$zipf" "$inst" "$dir/art.bkb" > /dev/null
  say "== artifacts: a $(mb "$(stat -c %s "$zipf")") controller package given the site CA on the way, and a $(mb "$(stat -c %s "$inst")") installer, to NATS over TLS"
  local t_py t_bk t_re
  time_rss t_py python3 - "$nats" "$zipf" "$inst" "$c/ca.crt" <<'PY'
import asyncio, ssl, sys, nats
from nats.js.api import ObjectMeta, ObjectMetaOptions
async def main():
    nc = await nats.connect(sys.argv[1], tls=ssl.create_default_context(cafile=sys.argv[4]))
    store = await nc.jetstream().create_object_store("pyart")
    for key, path in (("linux/x86_64/Controller/9.9.9/fusion-collectors-linux-amd64.zip", sys.argv[2]),
                      ("installer/linux/x86_64/bklite-controller-installer", sys.argv[3])):
        with open(path, "rb") as f:
            meta = ObjectMeta(name=key, description=key.rsplit("/", 1)[1], options=ObjectMetaOptions(max_chunk_size=128 * 1024))
            await store.put(key, f, meta=meta)
    await nc.close()
asyncio.run(main())
PY
  # --env-file of the target: its certs/ make bkbundle verify NATS with the CA and add it to the
  # controller package, as after an install.
  time_rss t_bk "$BK" -v --no-progress init-packages --auto --bundle "$dir/art.bkb" --env-file "$dir/target/.env" --database-url "$db" --nats-url "$nats" --bucket artbench
  local sent; sent=$("$BK" --json --no-progress init-packages --auto --bundle "$dir/art.bkb" --env-file "$dir/target/.env" --database-url "$db" --nats-url "$nats" --bucket artbench | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bytes_sent"], r["skipped"], [p.get("object_digest") is not None for p in r["packages"]])')
  time_rss t_re "$BK" -v --no-progress init-packages --auto --bundle "$dir/art.bkb" --env-file "$dir/target/.env" --database-url "$db" --nats-url "$nats" --bucket artbench
  kill "$tlspid" 2>/dev/null || true
  say "nats-py object put, as they are (128 KiB)   ${t_py% *} s   $(python3 -c "print(f'{$total/1e6/float(\"${t_py% *}\"):.0f}')") MB/s   peak RSS $(( ${t_py#* } / 1024 )) MiB"
  say "bkbundle init-packages, CA added (1 MiB)    ${t_bk% *} s   $(python3 -c "print(f'{$total/1e6/float(\"${t_bk% *}\"):.0f}')") MB/s   peak RSS $(( ${t_bk#* } / 1024 )) MiB"
  say "throughput ratio bkbundle / nats-py          $(ratio "${t_py% *}" "${t_bk% *}")   (target >= 2)"
  say "re-run, nothing changed                      ${t_re% *} s   (bytes sent, objects skipped, CA added per object: $sent)"
  rm -f "$dir/art.bkb"
}

# issue 10: `regions apply` of 50 regions x 15 keys in one transaction (target <= 2 s), on the
# oldest release in the field (0012) and the newest (0044); then the no-change re-run. The baseline
# is psql running the same number of INSERTs (750 env rows, 50 regions) in one transaction.
bench_regions() {
  need psql
  start_servers
  local dir="$WORK/regions"; mkdir -p "$dir"
  {
    printf 'format = 1\n[bundle]\nname = "regionsbench"\nversion = "1"\n[stack]\ndir = "%s"\ncompose = "docker-compose.yml"\n' "$PWD/examples/demo/stack"
    printf '[regions]\nrequired = ["NODE_SERVER_URL", "NATS_SERVERS", "NATS_PROTOCOL", "NATS_PASSWORD"]\n[regions.env]\n'
    printf 'NODE_SERVER_URL = "${SERVER_URL}"\nNATS_SERVERS = "${HOST_IP}:4222"\nNATS_PROTOCOL = "nats"\nNATS_PASSWORD = "${NATS_ADMIN_PASSWORD}"\n'
    for i in $(seq 11); do printf 'BENCH_KEY_%02d = "value-%02d"\n' "$i" "$i"; done
  } > "$dir/recipe.toml"
  "$BK" --no-progress pack "$dir/recipe.toml" -o "$dir/regions.bkb" >/dev/null
  printf 'SERVER_URL=https://192.0.2.10:443\nHOST_IP=192.0.2.10\nNATS_ADMIN_PASSWORD=bench-pw\nSECRET_KEY=bench-secret-key\n' > "$dir/site.env"
  { printf 'format = 1\n'; for i in $(seq 50); do printf '[[regions]]\nname = "region-%02d"\nproxy_address = "192.0.2.%d"\n' "$i" "$((i + 100))"; done; } > "$dir/install.toml"
  for release in 0012 0044; do
    psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE r$release" >/dev/null
    psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d "r$release" -f "tests/fixtures/releases/$release.sql" >/dev/null
    psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE b$release TEMPLATE r$release" >/dev/null
    local db="postgres://postgres@127.0.0.1:$PGPORT/r$release"
    local t_bk t_re t_sql
    say "== regions on release $release: 51 regions (default + 50 with a proxy) x 15 keys"
    time_rss t_bk "$BK" --no-progress regions apply --bundle "$dir/regions.bkb" --config "$dir/install.toml" --env-file "$dir/site.env" --database-url "$db"
    time_rss t_re "$BK" --no-progress regions apply --bundle "$dir/regions.bkb" --config "$dir/install.toml" --env-file "$dir/site.env" --database-url "$db"
    python3 - "$release" > "$dir/baseline.sql" <<'PY'
import sys
print("BEGIN;")
for i in range(2, 52):
    print(f"INSERT INTO node_mgmt_cloudregion (id, created_at, updated_at, created_by, updated_by, name, introduction, domain, updated_by_domain) VALUES ({i}, now(), now(), 'system', 'system', 'region-{i}', '', 'domain.com', 'domain.com');")
for i in range(1, 52):
    for k in range(15):
        print(f"INSERT INTO node_mgmt_sidecarenv (key, value, type, description, cloud_region_id, is_pre) VALUES ('K{k}', 'value-{k}', 'str', '', {i}, false);")
print("COMMIT;")
PY
    time_rss t_sql psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d "b$release" -f "$dir/baseline.sql"
    local rows; rows=$(psql -Atq -h 127.0.0.1 -p "$PGPORT" -U postgres -d "r$release" -c 'SELECT count(*) FROM node_mgmt_sidecarenv')
    say "psql, the same INSERTs in one transaction  ${t_sql% *} s   (baseline)"
    say "bkbundle regions apply                      ${t_bk% *} s   (target <= 2 s; $rows env rows; peak RSS $(( ${t_bk#* } / 1024 )) MiB)"
    say "re-run, nothing changed                     ${t_re% *} s"
  done
  stop_servers
}

# issue 13: `doctor --agent` on agent hosts that are containers of bkbundle-demo/base:1 (busybox, no
# libc: the carried binary as the field runs it) on a Docker network of their own, against the demo
# stack installed for them on the network's gateway (NATS over TLS from the site CA; the web stands
# in for the server), as tests/it/agent_doctor.rs does. A clean host, and one with every link broken
# where breaking costs the most time: the server's name asked of a resolver that never answers, NATS
# traffic dropped (and behind the drop a CA that signed nothing and a wrong password). Each is
# diagnosed AGENT_RUNS times (default 5): the median of doctor's own seconds (its report) and of the
# `docker exec` around it, and the binary's peak memory (-v), against the issue's figures. Packets
# are dropped in each container's own network namespace, never by this host's rules; nothing leaves
# the machine (the resolver every host is given is 127.0.0.1, the name ends in .invalid).
AGENT_NET=bktbenchagent
AGENT_PROJECT=bktbenchagent
agent_cleanup() {
  docker rm -f bktbenchagent-clean bktbenchagent-broken >/dev/null 2>&1 || true
  [ ! -f "$WORK/agent/target/docker-compose.yml" ] ||
    docker-compose -p "$AGENT_PROJECT" -f "$WORK/agent/target/docker-compose.yml" down -v >/dev/null 2>&1 || true
  docker network rm "$AGENT_NET" >/dev/null 2>&1 || true
}

# agent_tree DIR SERVER_URL NATS_URL CA: an agent's install dir as upstream's package and install.sh
# leave it: tests/agent/sidecar.yml rendered (its header left out), node-id, the sidecar and the
# collectors executable, CA as certs/ca.crt, the NATS-Executor config the server generates for TLS.
# DIR.resolv.conf is the host's /etc/resolv.conf.
agent_tree() {
  local d=$1
  rm -rf "$d"; mkdir -p "$d/bin" "$d/certs" "$d/generated" "$d/cache" "$d/log"
  awk 'body || !/^#/ { body = 1; print }' tests/agent/sidecar.yml |
    sed -e "s|__SERVER__URL__|$2|" -e 's|__SERVER__API__TOKEN__|benchToken0123456789abcdef|' \
        -e 's|__TAGS__|"zone:1", "group:1"|' -e 's|__NODE__NAME__|bench-agent|' > "$d/sidecar.yml"
  echo bench-node-1 > "$d/node-id"
  local b
  for b in collector-sidecar bin/telegraf bin/vector bin/nats-executor; do
    printf '#!/bin/sh\nexec sleep 3600\n' > "$d/$b"; chmod 0755 "$d/$b"
  done
  cp "$4" "$d/certs/ca.crt"
  printf 'nats_urls: "%s"\nnats_instanceId: "bench-node-1"\nnats_conn_timeout: 600\n\ntls_enabled: "true"\ntls_skip_verify: "false"\ntls_ca_file: "/opt/fusion-collectors/certs/ca.crt"\n' \
    "$3" > "$d/generated/3b1f0c52-natsexecutor-linux.yaml"
  printf 'nameserver 127.0.0.1\n' > "$d.resolv.conf"
}

# agent_host NAME TREE [MATCH...]: container NAME on $AGENT_NET with TREE at /opt/fusion-collectors
# (read-only) and the binary at /bkbundle; each MATCH (iptables match arguments, one string) is
# dropped in the container's own network namespace.
agent_host() {
  local name=$1 tree=$2; shift 2
  docker run -d --rm --name "$name" --network "$AGENT_NET" -v "$tree:/opt/fusion-collectors:ro" \
    -v "$BK:/bkbundle:ro" -v "$tree.resolv.conf:/etc/resolv.conf:ro" bkbundle-demo/base:1 sleep 3600 >/dev/null
  local pid match; pid=$(docker inspect -f '{{.State.Pid}}' "$name")
  for match in "$@"; do
    # shellcheck disable=SC2086 # the match is several arguments
    nsenter -t "$pid" -n iptables -A OUTPUT $match -j DROP
  done
}

# agent_runs NAME: doctor --agent AGENT_RUNS times in container NAME; prints the medians of its own
# seconds and of the docker exec's, the largest peak memory (MiB), and the last run's exit code,
# errors and warnings.
agent_runs() {
  local name=$1 out="$WORK/agent/runs-$1.txt" i t0 t1 rc
  : > "$out"
  for i in $(seq "$AGENT_RUNS"); do
    t0=$(date +%s.%N); rc=0
    docker exec "$name" /bkbundle -v --json --no-progress doctor --agent >"$WORK/agent/report.json" 2>"$WORK/agent/stderr.txt" || rc=$?
    t1=$(date +%s.%N)
    python3 - "$WORK/agent/report.json" "$WORK/agent/stderr.txt" "$t0" "$t1" "$rc" >>"$out" <<'PY' || { cat "$WORK/agent/stderr.txt" >&2; return 1; }
import json, re, sys
report, stderr, t0, t1, rc = sys.argv[1:]
r = json.load(open(report))
peak = re.findall(r"^bkbundle: peak memory (\d+) kB$", open(stderr).read(), re.M)
print(r["seconds"], float(t1) - float(t0), peak[-1] if peak else "nan", rc, r["errors"], r["warnings"])
PY
  done
  python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda i: statistics.median(float(r[i]) for r in rows)
peak = max(float(r[2]) for r in rows)
peak = "?" if peak != peak else f"{peak / 1024:.1f}"  # no -v line: nan
print(f"{med(0):.2f} {med(1):.2f} {peak} {rows[-1][3]} {rows[-1][4]} {rows[-1][5]}")
PY
}

bench_agent_doctor() {
  need openssl; need nsenter; need iptables; need docker-compose
  AGENT_RUNS=${AGENT_RUNS:-5}
  local dir="$WORK/agent"
  mkdir -p "$dir"
  bash scripts/demo-images.sh >/dev/null
  agent_cleanup
  trap agent_cleanup EXIT
  docker network create "$AGENT_NET" >/dev/null
  local gw; gw=$(docker network inspect -f '{{(index .IPAM.Config 0).Gateway}}' "$AGENT_NET")
  local web nats pg; web=$(free_port); nats=$(free_port); pg=$(free_port)
  "$BK" --no-progress pack examples/demo/recipe.toml -o "$dir/demo.bkb" >/dev/null
  # NATS published on the gateway only (install reaches it there too); its certificate names the
  # gateway (HOST_IP). The web is published on every address.
  printf 'format = 1\nproject = "%s"\n[env]\nWEB_PORT = "%s"\nPOSTGRES_PORT = "%s"\nNATS_PORT = "%s"\nHOST_IP = "%s"\nSERVER_URL = "http://%s:%s"\nNATS_BIND_IP = "%s"\n[nats]\nurl = "tls://%s:%s"\n[health]\ntimeout_secs = 180\n' \
    "$AGENT_PROJECT" "$web" "$pg" "$nats" "$gw" "$gw" "$web" "$gw" "$gw" "$nats" > "$dir/install.toml"
  rm -rf "$dir/target"
  "$BK" --no-progress install "$dir/demo.bkb" --target "$dir/target" --config "$dir/install.toml" >"$dir/install.log" 2>&1 ||
    { cat "$dir/install.log" >&2; return 1; }
  local user pw
  user=$(sed -n 's/^NATS_USER=//p' "$dir/target/.env"); pw=$(sed -n 's/^NATS_PASSWORD=//p' "$dir/target/.env")
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/stranger.key" \
    -out "$dir/stranger.crt" -days 30 -subj "/CN=bench stranger CA" 2>/dev/null
  agent_tree "$dir/clean" "http://$gw:$web/api/v1/node_mgmt/open_api/node" "tls://$user:$pw@$gw:$nats" "$dir/target/certs/ca.crt"
  agent_tree "$dir/broken" "http://bklite-server.invalid:$web/api/v1/node_mgmt/open_api/node" \
    "tls://$user:wrong-password@$gw:$nats" "$dir/stranger.crt"
  agent_host bktbenchagent-clean "$dir/clean"
  # A nameserver that never answers: an address on the agents' network that no host holds (a
  # DROP rule in the container itself would fail the query at once with EPERM, not silently).
  printf 'nameserver %s\n' "${gw%.*}.254" > "$dir/broken.resolv.conf"
  agent_host bktbenchagent-broken "$dir/broken" "-p tcp -d $gw --dport $nats"

  say "== doctor --agent in containers of bkbundle-demo/base:1 (busybox, no libc), $AGENT_RUNS runs each"
  local clean broken
  clean=$(agent_runs bktbenchagent-clean)
  broken=$(agent_runs bktbenchagent-broken)
  read -r c_own c_wall c_peak c_rc c_err c_warn <<<"$clean"
  read -r b_own b_wall b_peak b_rc b_err b_warn <<<"$broken"
  say "clean host                 ${c_own} s   (docker exec ${c_wall} s; exit $c_rc, $c_err errors, $c_warn warnings)   (target <= 3 s)"
  say "every link broken          ${b_own} s   (docker exec ${b_wall} s; exit $b_rc, $b_err errors, $b_warn warnings)   (target <= 15 s)"
  say "  (server name asked of a silent resolver, NATS traffic dropped, behind it a stranger CA and a wrong password)"
  say "peak memory                clean $c_peak MiB, broken $b_peak MiB   (target <= 32 MiB)"
  [ "$c_rc" = 0 ] && [ "$b_rc" = 10 ] && [ "$b_err" -ge 2 ] ||
    say "NOTE: expected exit 0 for the clean host and exit 10 with an error per chain for the broken one: these figures do not measure a full diagnosis"
  agent_cleanup
  trap - EXIT
  rm -f "$dir/demo.bkb"
}

# issue 14: backup and restore of a site with ~1 GB of objects and a ~200 MB database. The demo is
# installed under a compose project of its own on free ports, then grown: a table of md5 rows
# (BACKUP_ROWS, generate_series) in database bklite, and 20 objects of ~1 GB in all in a bucket of
# its NATS (bench-objects.py fill, nats-py over TLS). The baseline, one step after the other:
# `pg_dump | zstd` through `docker exec` in the stack's postgres container, and bench-objects.py
# download (nats-py, object by object, digest-checked) of every bucket of the site. Then `bkbundle
# backup` of the same site (targets: >= 0.8x the baseline's throughput, <= 64 MiB), `down -v` (the
# field's mistake) and `bkbundle restore` of the file (target: <= 1.5x the backup's time). The
# scratch project (containers, volumes, network) and every file are removed at the end, also when
# a step fails.
BACKUP_PROJECT=bkbenchbackup
backup_cleanup() {
  local dir="$WORK/backup" ids
  if [ -f "$dir/target/docker-compose.yml" ] && [ -f "$dir/target/.env" ]; then
    docker-compose -p "$BACKUP_PROJECT" -f "$dir/target/docker-compose.yml" --env-file "$dir/target/.env" \
      down -v >/dev/null 2>&1 || true
  fi
  # What a compose file no longer describes (a step that failed half-way): by the project's label.
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$BACKUP_PROJECT")
  # shellcheck disable=SC2086 # one id an argument
  [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
  ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$BACKUP_PROJECT")
  # shellcheck disable=SC2086
  [ -z "$ids" ] || docker volume rm $ids >/dev/null 2>&1 || true
  ids=$(docker network ls -q --filter "label=com.docker.compose.project=$BACKUP_PROJECT")
  # shellcheck disable=SC2086
  [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
  rm -rf "$dir"
}

# backup_env KEY: a value of the scratch site's .env.
backup_env() { sed -n "s/^$1=//p" "$WORK/backup/target/.env"; }

# backup_pg SQL: psql in the site's postgres container, on database bklite; its output.
backup_pg() {
  docker exec "$(backup_pg_container)" psql -X -q -At -v ON_ERROR_STOP=1 -U postgres -d bklite -c "$1"
}
backup_pg_container() {
  docker ps -q --filter "label=com.docker.compose.project=$BACKUP_PROJECT" \
    --filter "label=com.docker.compose.service=postgres" --filter status=running | head -n1
}

# backup_conn: bench-objects.py's arguments for the site's NATS (TLS, its CA, its user), into
# the array NATS_ARGS.
backup_conn() {
  NATS_ARGS=(--server "tls://127.0.0.1:$(backup_env NATS_PORT)" --user "$(backup_env NATS_USER)"
    --password "$(backup_env NATS_PASSWORD)" --ca "$WORK/backup/target/certs/ca.crt")
}

# quiet_py CMD...: CMD with nats-py's "returning true from eof_received() has no effect when using
# ssl" (asyncio's, at every TLS close) left out of its stderr.
quiet_py() { "$@" 2> >(grep -v 'eof_received() has no effect' >&2); }

# backup_buckets: every object store bucket of the site's NATS, as nats-py lists them.
backup_buckets() {
  python3 - "tls://127.0.0.1:$(backup_env NATS_PORT)" "$(backup_env NATS_USER)" "$(backup_env NATS_PASSWORD)" \
    "$WORK/backup/target/certs/ca.crt" <<'PY'
import asyncio, ssl, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], user=sys.argv[2], password=sys.argv[3],
                            tls=ssl.create_default_context(cafile=sys.argv[4]))
    infos = await nc.jetstream().streams_info()
    print("\n".join(sorted(s.config.name[4:] for s in infos if s.config.name.startswith("OBJ_"))))
    await nc.close()
asyncio.run(main())
PY
}

# json_of FILE EXPR: EXPR (Python, over the report r) of the --json report in FILE.
json_of() { python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

bench_backup() {
  need docker-compose; need zstd
  python3 -c 'import nats' 2>/dev/null || { say "missing nats-py: run scripts/setup.sh"; exit 1; }
  local rows=${BACKUP_ROWS:-1200000} dir="$WORK/backup"
  local t="$dir/target"
  bash scripts/demo-images.sh >/dev/null
  backup_cleanup
  trap backup_cleanup EXIT
  mkdir -p "$dir/base"
  "$BK" --no-progress pack examples/demo/recipe.toml -o "$dir/demo.bkb" >/dev/null
  # The server URL is the web's port on this host's first address (not a loopback address, which
  # install refuses for agents): doctor, at the end of a restore, reaches it; an address that does
  # not answer would add its 3 s connect timeout to the restore.
  local web gw
  web=$(free_port); gw=$(hostname -I | awk '{print $1}'); gw=${gw:-192.0.2.10}
  printf 'format = 1\nproject = "%s"\n[env]\nWEB_PORT = "%s"\nPOSTGRES_PORT = "%s"\nNATS_PORT = "%s"\nHOST_IP = "%s"\nSERVER_URL = "http://%s:%s"\n[health]\ntimeout_secs = 180\n' \
    "$BACKUP_PROJECT" "$web" "$(free_port)" "$(free_port)" "$gw" "$gw" "$web" > "$dir/install.toml"
  "$BK" --no-progress install "$dir/demo.bkb" --target "$t" --config "$dir/install.toml" >"$dir/install.log" 2>&1 ||
    { cat "$dir/install.log" >&2; return 1; }

  say "== backup: the demo site grown to $rows rows of table data and ~1 GB of objects"
  backup_pg "CREATE TABLE bench_rows (id bigint PRIMARY KEY, a text, b text, c text);
    INSERT INTO bench_rows SELECT i, md5(i::text), md5('b' || i), md5('c' || i) FROM generate_series(1, $rows) i" >/dev/null
  backup_pg "VACUUM ANALYZE bench_rows" >/dev/null
  backup_conn
  quiet_py python3 scripts/bench-objects.py fill "${NATS_ARGS[@]}" --bucket benchobjects --count 20 --total-mb 1000 >/dev/null
  local dbsize buckets
  dbsize=$(backup_pg "SELECT pg_database_size('bklite')")
  mapfile -t buckets < <(quiet_py backup_buckets)
  say "site: database bklite $(mb "$dbsize") on disk; buckets ${buckets[*]}"

  # The baseline, warm like the backup after it (the objects were just written, the table too).
  local t_dump b objbytes=0 n=0 t_dl
  time_rss t_dump bash -c "set -o pipefail; docker exec $(backup_pg_container) pg_dump -U postgres bklite | zstd -q -f -o '$dir/base/bklite.sql.zst'"
  local dumpbytes; dumpbytes=$(stat -c %s "$dir/base/bklite.sql.zst")
  local t_objs=0
  for b in "${buckets[@]}"; do
    time_rss t_dl python3 scripts/bench-objects.py download "${NATS_ARGS[@]}" --bucket "$b" --out "$dir/base/objects/$b"
    objbytes=$(( objbytes + $(json_of "$WORK/stdout.out" 'r["bytes"]') ))
    n=$(( n + $(json_of "$WORK/stdout.out" 'r["objects"]') ))
    t_objs=$(python3 -c "print(round($t_objs + ${t_dl% *}, 2))")
  done
  rm -rf "$dir/base"
  local t_base; t_base=$(python3 -c "print(round(${t_dump% *} + $t_objs, 2))")

  local t_bk; time_rss t_bk "$BK" -v --json --no-progress backup --target "$t" -o "$dir/site.bkbak"
  cp "$WORK/stdout.out" "$dir/backup.json"
  local bkbytes; bkbytes=$(stat -c %s "$dir/site.bkbak")
  local parts; parts=$(json_of "$dir/backup.json" '"; ".join("%s %.1f s" % (p["part"], p["seconds"]) for p in r["parts"])')
  say "pg_dump | zstd (docker exec)               ${t_dump% *} s   ($(mb "$dumpbytes"))"
  say "nats-py download, $n objects of ${#buckets[@]} buckets   $t_objs s   ($(mb "$objbytes"))"
  say "baseline, one after the other              $t_base s   ($(mb $(( dumpbytes + objbytes ))))"
  say "bkbundle backup                            ${t_bk% *} s   ($(mb "$bkbytes"))   peak RSS $(( ${t_bk#* } / 1024 )) MiB (target <= 64)"
  say "  parts: $parts"
  say "throughput ratio baseline / bkbundle       $(ratio "$t_base" "${t_bk% *}")   (target >= 0.8)"
  say "ratio backup size / baseline bytes         $(ratio "$bkbytes" $(( dumpbytes + objbytes )))"

  say "== restore after docker-compose down -v"
  docker-compose -p "$BACKUP_PROJECT" -f "$t/docker-compose.yml" --env-file "$t/.env" down -v >/dev/null 2>&1
  cat "$dir/site.bkbak" "$dir/demo.bkb" > /dev/null
  local t_re; time_rss t_re "$BK" -v --json --no-progress restore "$dir/site.bkbak" --bundle "$dir/demo.bkb" --target "$t"
  cp "$WORK/stdout.out" "$dir/restore.json"
  local steps; steps=$(json_of "$dir/restore.json" '"; ".join("%s %.1f s" % (s["name"], s["seconds"]) for s in r["steps"])')
  local back; back=$(backup_pg "SELECT count(*) FROM bench_rows")
  local doctor; doctor=$(json_of "$dir/restore.json" '"%d errors, %d warnings" % (r["doctor_errors"], r["doctor_warnings"])')
  say "bkbundle restore                           ${t_re% *} s   peak RSS $(( ${t_re#* } / 1024 )) MiB   ($back of $rows rows back; doctor: $doctor)"
  say "  steps: $steps"
  say "ratio restore / backup time                $(ratio "${t_re% *}" "${t_bk% *}")   (target <= 1.5)"
  [ "$back" = "$rows" ] || say "NOTE: the table did not come back whole: these figures do not measure a full restore"
  backup_cleanup
  trap - EXIT
}

# issue 16: the ~1 GB benchmark images (3 images sharing a base layer) into an OCI distribution
# registry, and a host installed from it. Each side gets a fresh Debian docker-registry
# (distribution, plain HTTP on a free loopback port, storage under $WORK/registry), so neither finds
# the other's blobs. The baseline is `skopeo copy docker-archive:<docker save tar>:REF
# docker://REGISTRY/REF` of each image, one after the other (what an operator without bkbundle
# runs); bkbundle pushes the bundle the images were packed into (zstd, recompressed to gzip on the
# way). Targets: >= 1.0x skopeo's throughput, peak RSS <= 64 MiB, a re-run <= 1 s sending 0 bytes.
# `--compression zstd` (the stored layers as they are) to a third registry is an extra line. Then
# the three images are removed from the engine (those tags only; the shared base layer stays,
# held by bkbundle-bench/base:1) and `docker pull` of each from the baseline's registry is timed
# against `install --images-from` from bkbundle's (target <= 1.2x, the install's images step),
# in PULL_RUNS rounds (default 3), medians printed.
# A pull skips the base layer by the blob's digest once the engine has pulled that blob before (on
# a machine's first run both sides fetch it, after that neither does): the same for both sides.
# When pack has --no-images, the install is of the bundle without layers, as on the other hosts.
# The registries, their storage, the stack and the pulled tags are removed at the end, also when a
# step fails; the three images are back under their tags (reloaded from the save tar if need be).
PUSH_REFS=(bkbundle-bench/app1:1 bkbundle-bench/app2:1 bkbundle-bench/app3:1)
REG_PIDS=()

# registry_start VAR NAME: a fresh docker-registry serving plain HTTP on a free loopback port, with
# its storage (and config, log) in $WORK/registry/NAME; its host:port into VAR once /v2/ answers.
registry_start() {
  local var=$1 dir="$WORK/registry/$2" port pid i
  rm -rf "$dir"; mkdir -p "$dir/storage"
  port=$(free_port)
  printf 'version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$dir/storage" "$port" > "$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  pid=$!
  REG_PIDS+=("$pid")
  for i in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$dir/log" >&2; say "docker-registry $2 exited"; return 1; }
    [ "$i" -lt 100 ] || { say "docker-registry $2 does not answer on 127.0.0.1:$port"; return 1; }
    sleep 0.1
  done
  printf -v "$var" '127.0.0.1:%s' "$port"
}

# push_restore: the three bench images under their own tags again (an install that failed between
# removing and tagging them leaves them gone: loaded back from the save tar).
push_restore() {
  local r missing=0
  for r in "${PUSH_REFS[@]}"; do docker image inspect "$r" >/dev/null 2>&1 || missing=1; done
  [ "$missing" = 0 ] || [ ! -f "$WORK/push.tar" ] || docker load -q -i "$WORK/push.tar" >/dev/null 2>&1 || true
}

push_cleanup() {
  local pid r
  [ ! -f "$WORK/push-target/docker-compose.yml" ] ||
    docker-compose -p bkbenchpush -f "$WORK/push-target/docker-compose.yml" down >/dev/null 2>&1 || true
  for pid in "${REG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${REG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  REG_PIDS=()
  # The pulled images' registry tags (127.0.0.1:PORT/...): exactly those, by name.
  for r in $(docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^127\.0\.0\.1:[0-9]+/bkbundle-bench/app[123]:1$' || true); do
    docker rmi "$r" >/dev/null 2>&1 || true
  done
  push_restore
  rm -rf "$WORK/registry" "$WORK/push-cache" "$WORK/push-target" "$WORK/push-stack" "$WORK/push.toml" "$WORK/push.tar" "$WORK/push.bkb" "$WORK/push-bare.bkb"
}

# push_drop: remove the three bench images from the engine, by their tags (never a prune).
push_drop() { docker rmi "${PUSH_REFS[@]}" >/dev/null; }

# bk_error: the error of the bkbundle run time_rss last ran (--json: its report's message; else
# the last line of its stderr).
bk_error() {
  python3 - "$WORK/stdout.out" "$WORK/stderr.out" <<'PY'
import json, sys
try:
    print("error: " + json.load(open(sys.argv[1]))["error"]["message"])
except Exception:
    lines = [l for l in open(sys.argv[2], errors="replace").read().splitlines() if l.strip()]
    print(lines[-1] if lines else "failed, no message")
PY
}

# sent_bytes: the total bytes a push sent, from its --json report in $WORK/stdout.out ("?" when
# the report does not say).
sent_bytes() {
  python3 - "$WORK/stdout.out" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    v = r.get("bytes_sent") if isinstance(r, dict) else None
    print("?" if v is None else v)
except Exception:
    print("?")
PY
}

# median X...: the median of the numbers, to 2 decimals.
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }

# mbps BYTES SECONDS: throughput in MB/s.
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6 / float(sys.argv[2]):.0f} MB/s')" "$1" "$2"; }

bench_push() {
  need docker-registry; need skopeo; need curl; need docker-compose
  # First what a killed run left (its registries' storage, its stack; the images back from its tar).
  push_cleanup
  trap push_cleanup EXIT
  make_images small
  local r
  mkdir -p "$WORK/registry"
  # The bundle: the three images, and a stack for install to start. Pack refuses a service whose
  # image the bundle does not carry, so the service runs app1: its files are this host's, under
  # /l0 for the base layer, the static busybox of busybox-static among them (no health check: ready
  # after install's steady time; SIGKILL, as sleep ignores a TERM as PID 1).
  recipe "$WORK/push.toml" "${PUSH_REFS[@]}"
  mkdir -p "$WORK/push-stack"
  printf 'version: "2.4"\nservices:\n  app:\n    image: %s\n    command: ["/l0/usr/bin/busybox", "sleep", "3600"]\n    stop_signal: SIGKILL\n' \
    "${PUSH_REFS[0]}" > "$WORK/push-stack/docker-compose.yml"
  printf 'X=1\n' > "$WORK/push-stack/env.template"
  printf '[stack]\ndir = "push-stack"\ncompose = "docker-compose.yml"\nenv_template = "env.template"\nproject = "bkbenchpush"\n' >> "$WORK/push.toml"
  "$BK" --no-progress pack "$WORK/push.toml" -o "$WORK/push.bkb" >/dev/null
  docker save -o "$WORK/push.tar" "${PUSH_REFS[@]}"
  local raw; raw=$(stat -c %s "$WORK/push.tar")
  # push remembers the digests recompressed layers got (a killed push resumes with them): its own
  # fresh cache here, so the first push is a cold one and only the re-runs find what it wrote.
  export BKBUNDLE_CACHE_DIR="$WORK/push-cache"
  local base_reg bk_reg zstd_reg
  registry_start base_reg baseline
  registry_start bk_reg bkbundle
  registry_start zstd_reg zstd

  say "== push: ~1 GB of images (3 sharing a base layer; $(mb "$raw") docker save tar) to docker-registry $(docker-registry --version | awk '{print $NF}'), plain HTTP"
  local t_sk t_bk t_re t_zs sent ok=1
  cat "$WORK/push.tar" > /dev/null
  # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
  time_rss t_sk bash -c 'tar=$1 reg=$2; shift 2; for r; do skopeo copy -q --dest-tls-verify=false "docker-archive:$tar:$r" "docker://$reg/$r"; done' \
    _ "$WORK/push.tar" "$base_reg" "${PUSH_REFS[@]}"
  say "skopeo copy docker-archive: (each image)   ${t_sk% *} s   $(mbps "$raw" "${t_sk% *}")   peak RSS $(( ${t_sk#* } / 1024 )) MiB"
  cat "$WORK/push.bkb" > /dev/null
  if time_rss t_bk "$BK" -v --json --no-progress push "$WORK/push.bkb" --registry "$bk_reg" --registry-insecure 2>/dev/null; then
    say "bkbundle push (gzip, from zstd)            ${t_bk% *} s   $(mbps "$raw" "${t_bk% *}")   peak RSS $(( ${t_bk#* } / 1024 )) MiB (target <= 64)"
    say "throughput ratio bkbundle / skopeo         $(ratio "${t_sk% *}" "${t_bk% *}")   (target >= 1.0)"
    if time_rss t_re "$BK" -v --json --no-progress push "$WORK/push.bkb" --registry "$bk_reg" --registry-insecure 2>/dev/null; then
      sent=$(sent_bytes)
      say "re-run, nothing changed                    ${t_re% *} s   (target <= 1 s; bytes sent: $sent, target 0)   peak RSS $(( ${t_re#* } / 1024 )) MiB"
    else
      say "re-run, nothing changed                    $(bk_error)"
    fi
  else
    ok=0
    say "bkbundle push (gzip, from zstd)            $(bk_error)"
  fi
  cat "$WORK/push.bkb" > /dev/null
  if time_rss t_zs "$BK" -v --json --no-progress push "$WORK/push.bkb" --registry "$zstd_reg" --registry-insecure --compression zstd 2>/dev/null; then
    say "bkbundle push --compression zstd (stored)  ${t_zs% *} s   $(mbps "$raw" "${t_zs% *}")   peak RSS $(( ${t_zs#* } / 1024 )) MiB   (a third fresh registry)"
  else
    say "bkbundle push --compression zstd (stored)  $(bk_error)"
  fi

  local runs=${PULL_RUNS:-3}
  say "== install from the registry: the three images removed from the engine (the shared ~480 MB base layer stays, held by bkbundle-bench/base:1), $runs rounds"
  # Whether install --images-from can be measured, and from which bundle: the one without layers
  # when pack can leave them out (--no-images), as on the other hosts.
  local inst=1 bundle="$WORK/push.bkb" what="the whole bundle"
  if ! "$BK" install --help 2>/dev/null | grep -q -- --images-from; then
    inst=0; say "install --images-from: not available in this build"
  elif [ "$ok" = 0 ]; then
    inst=0; say "install --images-from: skipped, the push above failed (nothing to pull)"
  elif "$BK" pack --help 2>/dev/null | grep -q -- --no-images &&
      "$BK" --no-progress pack "$WORK/push.toml" --no-images -o "$WORK/push-bare.bkb" >/dev/null 2>&1; then
    bundle="$WORK/push-bare.bkb"; what="a bundle without layers"
  fi
  # Rounds of: docker pull from the baseline's registry; the same from bkbundle's (its gzip -1
  # layers: what they cost the engine, apart from what install adds); install --images-from. Each
  # pull's images are tagged back under the bundle's references, as install leaves them. The
  # figures are the medians (a shared host's engine varies a lot from one pull to the next).
  local round t_pull pulls=() pulls2=() insts=() steps=() peak=0 images_s
  for round in $(seq "$runs"); do
    push_drop
    # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
    time_rss t_pull bash -c 'reg=$1; shift; for r; do docker pull -q "$reg/$r"; done' _ "$base_reg" "${PUSH_REFS[@]}"
    for r in "${PUSH_REFS[@]}"; do docker tag "$base_reg/$r" "$r"; docker rmi "$base_reg/$r" >/dev/null; done
    pulls+=("${t_pull% *}")
    if [ "$ok" = 1 ]; then
      push_drop
      # shellcheck disable=SC2016
      time_rss t_pull bash -c 'reg=$1; shift; for r; do docker pull -q "$reg/$r"; done' _ "$bk_reg" "${PUSH_REFS[@]}"
      for r in "${PUSH_REFS[@]}"; do docker tag "$bk_reg/$r" "$r"; docker rmi "$bk_reg/$r" >/dev/null; done
      pulls2+=("${t_pull% *}")
    fi
    [ "$inst" = 1 ] || continue
    push_drop
    rm -rf "$WORK/push-target"
    cat "$bundle" > /dev/null
    if time_rss t_pull "$BK" -v --json --no-progress install "$bundle" --target "$WORK/push-target" --timeout 120 \
        --images-from "$bk_reg" --registry-insecure 2>/dev/null; then
      insts+=("${t_pull% *}")
      [ "${t_pull#* }" -le "$peak" ] || peak=${t_pull#* }
      images_s=$(json_of "$WORK/stdout.out" '(["%.2f" % s["seconds"] for s in r.get("steps", []) if s.get("name") == "images"] or ["?"])[0]')
      [ "$images_s" = "?" ] || steps+=("$images_s")
    else
      inst=0
      say "bkbundle install --images-from             $(bk_error)"
      push_restore
    fi
    docker-compose -p bkbenchpush -f "$WORK/push-target/docker-compose.yml" down >/dev/null 2>&1 || true
    rm -rf "$WORK/push-target"
  done
  local m_pull; m_pull=$(median "${pulls[@]}")
  say "docker pull (each image, baseline's reg.)  $m_pull s   (${pulls[*]})"
  [ "${#pulls2[@]}" = 0 ] ||
    say "docker pull (each image, bkbundle's reg.)  $(median "${pulls2[@]}") s   (${pulls2[*]}; for comparison: the layers bkbundle pushed)"
  if [ "${#insts[@]}" -gt 0 ]; then
    local m_inst; m_inst=$(median "${insts[@]}")
    say "bkbundle install --images-from             $m_inst s   (${insts[*]}; $what: verify + pull + start + health)   peak RSS $(( peak / 1024 )) MiB"
    if [ "${#steps[@]}" = "${#insts[@]}" ]; then
      local m_step; m_step=$(median "${steps[@]}")
      say "bkbundle images step alone                 $m_step s   (${steps[*]})"
      say "ratio images step / docker pull            $(ratio "$m_step" "$m_pull")   (target <= 1.2; medians)"
    else
      say "ratio install / docker pull                $(ratio "$m_inst" "$m_pull")   (target <= 1.2; medians; no images step in the report: the whole install)"
    fi
  fi
  push_cleanup
  trap - EXIT
  unset BKBUNDLE_CACHE_DIR
}

# issue 17: pack without the engine's export. The ~1 GB images (3 sharing a base layer) copied by
# skopeo from the engine into a loopback docker-registry and into an OCI layout directory (both
# hold gzip layers, as registries do), then side by side, page cache warm for each: pack through
# the engine (docker save through its API, recompressed to zstd), pack from the registry and pack
# from the OCI layout (gzip layers stored as they are, the shared base fetched once). Targets:
# >= 1.5x the speed of the engine's pack, peak RSS <= 64 MiB.
remote_cleanup() {
  local pid
  for pid in "${REG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${REG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  REG_PIDS=()
  rm -rf "$WORK/registry" "$WORK/remote-layout" "$WORK"/remote-*.toml "$WORK"/remote-*.bkb
}

bench_pack_remote() {
  need docker-registry; need skopeo; need curl
  remote_cleanup
  trap remote_cleanup EXIT
  make_images small
  mkdir -p "$WORK/registry"
  local reg layout="$WORK/remote-layout" r
  registry_start reg remote
  say "== pack-remote: filling a docker-registry and an OCI layout with the ~1 GB images (skopeo, not timed)"
  for r in "${PUSH_REFS[@]}"; do
    skopeo copy -q --dest-tls-verify=false "docker-daemon:$r" "docker://$reg/$r"
    skopeo copy -q "docker-daemon:$r" "oci:$layout:$r"
  done
  recipe "$WORK/remote-engine.toml" "${PUSH_REFS[@]}"
  { printf 'format = 1\n[bundle]\nname = "bench"\nversion = "1"\n[registry]\nmirror = "%s"\n' "$reg"
    for r in "${PUSH_REFS[@]}"; do printf '[[images]]\nref = "%s"\n' "$r"; done; } > "$WORK/remote-registry.toml"
  { printf 'format = 1\n[bundle]\nname = "bench"\nversion = "1"\n'
    for r in "${PUSH_REFS[@]}"; do printf '[[images]]\nref = "%s"\noci_layout = "%s"\n' "$r" "$layout"; done; } > "$WORK/remote-layout.toml"

  say "== pack-remote: ~1 GB of images, through the engine vs from the registry vs from the OCI layout"
  local t_save t_eng t_reg t_lay s_eng s_reg s_lay fetched
  time_rss t_save docker save -o "$WORK/remote-save.tar" "${PUSH_REFS[@]}"
  rm -f "$WORK/remote-save.tar"
  time_rss t_eng "$BK" -v --no-progress pack "$WORK/remote-engine.toml" -o "$WORK/remote-engine.bkb"
  s_eng=$(stat -c %s "$WORK/remote-engine.bkb")
  find "$WORK/registry/remote/storage" -type f -exec cat {} + >/dev/null
  time_rss t_reg "$BK" -v --json --no-progress pack "$WORK/remote-registry.toml" -o "$WORK/remote-registry.bkb" --registry-insecure
  fetched=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["layers_fetched"], "layers fetched,", r["layers_skipped"], "skipped,", r["bytes_fetched"], "bytes")' "$WORK/stdout.out")
  s_reg=$(stat -c %s "$WORK/remote-registry.bkb")
  local t_rec s_rec
  time_rss t_rec "$BK" -v --no-progress pack "$WORK/remote-registry.toml" -o "$WORK/remote-recompress.bkb" --registry-insecure --recompress
  s_rec=$(stat -c %s "$WORK/remote-recompress.bkb")
  find "$layout" -type f -exec cat {} + >/dev/null
  time_rss t_lay "$BK" -v --no-progress pack "$WORK/remote-layout.toml" -o "$WORK/remote-layout.bkb"
  s_lay=$(stat -c %s "$WORK/remote-layout.bkb")
  local ids_ok=yes
  for b in registry recompress layout; do
    "$BK" --no-progress verify "$WORK/remote-$b.bkb" >/dev/null || ids_ok="no: verify of the $b bundle failed"
  done
  say "docker save -o (for reference)          ${t_save% *} s"
  say "pack through the engine (docker save)   ${t_eng% *} s   ($(mb "$s_eng") bundle, zstd)   peak RSS $(( ${t_eng#* } / 1024 )) MiB"
  say "pack from the registry                  ${t_reg% *} s   ($(mb "$s_reg") bundle, gzip as fetched; $fetched)   peak RSS $(( ${t_reg#* } / 1024 )) MiB (target <= 64)"
  say "pack from the registry --recompress     ${t_rec% *} s   ($(mb "$s_rec") bundle, zstd)   peak RSS $(( ${t_rec#* } / 1024 )) MiB"
  say "pack from the OCI layout                ${t_lay% *} s   ($(mb "$s_lay") bundle)   peak RSS $(( ${t_lay#* } / 1024 )) MiB (target <= 64)"
  say "speed ratio registry / engine           $(ratio "${t_eng% *}" "${t_reg% *}")   (target >= 1.5)"
  say "speed ratio OCI layout / engine         $(ratio "${t_eng% *}" "${t_lay% *}")   (target >= 1.5)"
  say "speed ratio registry --recompress / engine  $(ratio "${t_eng% *}" "${t_rec% *}")"
  say "both verify                             $ids_ok"
  remote_cleanup
  trap - EXIT
}

for s in $SECTIONS; do
  case $s in
    pack) bench_pack ;;
    install) bench_install ;;
    packages) bench_packages ;;
    regions) bench_regions ;;
    agent-doctor) bench_agent_doctor ;;
    backup) bench_backup ;;
    push) bench_push ;;
    delta) bench_delta ;;
    pack-remote) bench_pack_remote ;;
    *) say "unknown section $s (known: pack install packages regions agent-doctor backup push delta pack-remote)"; exit 2 ;;
  esac
done
