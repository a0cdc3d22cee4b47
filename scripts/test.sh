#!/usr/bin/env bash
# The test command: install prerequisites, build the demo images, run every test.
#   scripts/test.sh [extra cargo test arguments...]   e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/demo-images.sh
exec cargo test --locked "$@"
