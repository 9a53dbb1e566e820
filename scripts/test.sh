#!/usr/bin/env bash
# Installs what the tests need and runs every test, plus the format and lint checks.
# KVM-lab tests fail rather than skip when VMFARM_REQUIRE_KVM=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh test
export VMFARM_CACHE=${VMFARM_CACHE:-$HOME/.cache/vmfarm}
mkdir -p "$VMFARM_CACHE"

# One clean build, kept small: no incremental state (it only pays for edits, which CI does not
# make), and the test binaries built once, before the images are built with the `vmfarm` binary
# they make (a separate `cargo build -p vmfarm` resolves features without the dev-dependencies and
# builds the farm's crates a second time).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The static guest agent, and the guest images the tests boot (cached by their inputs).
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cargo build --locked --release -p vmfarm-agent --target x86_64-unknown-linux-musl
export VMFARM_AGENT=$target/x86_64-unknown-linux-musl/release/vmfarm-agent
cargo nextest run --workspace --locked --no-run
for image in tiny debian-11 debian-12 debian-13 debian-12-cloud; do
  "$target/debug/vmfarm" images build "$image" --images-dir "$VMFARM_CACHE/test-images"
done

# The Debian package: it builds, installs in a fresh Debian root, and its server answers there.
bash scripts/test-package.sh

# A smoke run of every fuzz target (fuzz/, nightly): its seeds and a few seconds of fuzzing each,
# built unoptimized (the optimized build costs twice the CPU time). The long runs are
# `scripts/fuzz.sh all SECONDS`, by hand.
FUZZ_DEV=1 bash scripts/fuzz.sh all 3

# A real PostgreSQL server for the server's tests, stopped whatever happens.
eval "$(bash scripts/test-postgres.sh start)"
trap 'bash scripts/test-postgres.sh stop' EXIT

cargo nextest run --workspace --locked --no-fail-fast
echo "test.sh: build outputs $(du -sh "$target" | cut -f1) in $target"
