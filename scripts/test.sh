#!/usr/bin/env bash
# Installs what the tests need and runs every test, plus the format and lint checks.
# KVM-lab tests fail rather than skip when VMFARM_REQUIRE_KVM=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh test
export VMFARM_CACHE=${VMFARM_CACHE:-$HOME/.cache/vmfarm}
mkdir -p "$VMFARM_CACHE"

# A real PostgreSQL server for the server's tests, stopped whatever happens.
eval "$(bash scripts/test-postgres.sh start)"
trap 'bash scripts/test-postgres.sh stop' EXIT

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
