#!/usr/bin/env bash
# Installs what the farm needs, builds vmfarm and runs it on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh farm
cargo build --release --locked
# The farm's `up` arrives with the server and worker issues; until then, check the examples.
./target/release/vmfarm validate configs/examples/*.toml
