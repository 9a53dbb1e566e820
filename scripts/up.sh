#!/usr/bin/env bash
# Installs what the farm needs, builds vmfarm and its guest agent, and runs the farm on the
# embedded defaults: server + local worker on http://127.0.0.1:8080, data in ./vmfarm-data,
# the tiny and debian-12 images built there on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh farm
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cargo build --release --locked -p vmfarm-agent --target x86_64-unknown-linux-musl
cargo build --release --locked -p vmfarm
export VMFARM_AGENT=$target/x86_64-unknown-linux-musl/release/vmfarm-agent
exec "$target/release/vmfarm" up "$@"
