#!/usr/bin/env bash
# The main job on the built-in demo, with nothing but Docker on the host:
#   1. install prerequisites (scripts/setup.sh) and build bkbundle (release);
#   2. make the demo images and agent package offline (scripts/demo-images.sh);
#   3. pack examples/demo/recipe.toml into target/demo/demo.bkb, verify it, show what is inside;
#   4. remove the recipe's images from the engine, as on the offline host, which has never seen
#      them (demo-images.sh makes them again at the next run); an image a running container uses
#      is kept, and said so;
#   5. install it on the local Docker engine into target/demo/bkdemo: load the images from the
#      bundle, lay out the stack (web on 127.0.0.1:18080, PostgreSQL, NATS), start it and wait
#      until every service is healthy.
# Re-running is safe: the images are made again, the bundle is rewritten, install converges
# ("already installed"); while the demo stack runs its images stay in the engine, so a re-run's
# install finds them present instead of loading them. Stop the demo with:
#   docker-compose -p bkdemo -f target/demo/bkdemo/docker-compose.yml stop
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=examples/demo/recipe.toml

# The image references the recipe packs (its `ref = "..."` lines).
recipe_images() {
    sed -n 's/^ref = "\([^"]*\)"$/\1/p' "$1"
}

# remove_images REF...: `docker image rm` each (untag; the layers go when nothing else uses
# them), except one a running container uses; never forced, so one a stopped container still
# uses is kept too, with docker's reason.
remove_images() {
    local running ref id users out
    running="$(docker ps -q | xargs -r docker inspect -f '{{.Image}} {{.Name}}')"
    for ref in "$@"; do
        if ! id="$(docker image inspect -f '{{.Id}}' "$ref" 2>/dev/null)"; then
            echo "   $ref: not in the engine"
            continue
        fi
        users="$(printf '%s\n' "$running" | awk -v id="$id" '$1 == id { sub(/^\//, "", $2); printf " %s", $2 }')"
        if [ -n "$users" ]; then
            echo "   kept $ref: running container(s)$users use it (install will find it present)"
        elif out="$(docker image rm "$ref" 2>&1)"; then
            echo "   removed $ref"
        else
            echo "   kept $ref: $out"
        fi
    done
}

bash scripts/setup.sh
bash scripts/demo-images.sh
cargo build --release --locked
# .cargo/config.toml names the target explicitly (static glibc), so the outputs are under it.
BK=target/x86_64-unknown-linux-gnu/release/bkbundle
mkdir -p target/demo

echo "== bkbundle pack $RECIPE -o target/demo/demo.bkb"
"$BK" pack "$RECIPE" -o target/demo/demo.bkb
echo "== bkbundle verify target/demo/demo.bkb"
"$BK" verify target/demo/demo.bkb
echo "== bkbundle inspect target/demo/demo.bkb"
"$BK" inspect target/demo/demo.bkb
echo "== removing the demo's images from the engine, so that install loads them from the bundle"
mapfile -t images < <(recipe_images "$RECIPE")
[ "${#images[@]}" -gt 0 ] || {
    echo "demo: no image references (ref = \"...\") found in $RECIPE" >&2
    exit 1
}
remove_images "${images[@]}"
echo "== bkbundle install target/demo/demo.bkb --target target/demo/bkdemo --config examples/demo/install.toml"
"$BK" install target/demo/demo.bkb --target "$PWD/target/demo/bkdemo" --config examples/demo/install.toml
