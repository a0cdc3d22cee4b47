#!/usr/bin/env bash
# The main job on the built-in demo, with nothing but Docker on the host:
#   1. install prerequisites (scripts/setup.sh) and build bkbundle (release);
#   2. make the demo images and agent package offline (scripts/demo-images.sh);
#   3. pack examples/demo/recipe.toml into target/demo/demo.bkb, verify it, show what is inside;
#   4. install it on the local Docker engine into target/demo/bkdemo: load the images from the
#      bundle, lay out the stack (web on 127.0.0.1:18080, PostgreSQL, NATS), start it and wait
#      until every service is healthy.
# Re-running is safe: images are kept, the bundle is rewritten, install converges ("already
# installed"). Stop the demo with: docker-compose -p bkdemo -f target/demo/bkdemo/docker-compose.yml stop
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/demo-images.sh
cargo build --release --locked
BK=target/release/bkbundle
mkdir -p target/demo

echo "== bkbundle pack examples/demo/recipe.toml -o target/demo/demo.bkb"
"$BK" pack examples/demo/recipe.toml -o target/demo/demo.bkb
echo "== bkbundle verify target/demo/demo.bkb"
"$BK" verify target/demo/demo.bkb
echo "== bkbundle inspect target/demo/demo.bkb"
"$BK" inspect target/demo/demo.bkb
echo "== bkbundle install target/demo/demo.bkb --target target/demo/bkdemo --config examples/demo/install.toml"
"$BK" install target/demo/demo.bkb --target "$PWD/target/demo/bkdemo" --config examples/demo/install.toml
