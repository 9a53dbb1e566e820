#!/usr/bin/env bash
# Builds vmfarm's Debian package with cargo-deb (its metadata is in Cargo.toml):
# target/debian/vmfarm_VERSION-1_amd64.deb. `PROFILE=dev` packages the debug build that the tests
# already made (target/debug/vmfarm) instead of building the release one: the same package, but
# for the speed of its binary.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
case "$profile" in
release) out=release ;;
dev) out=debug ;;
*) echo "PROFILE is release or dev, not $profile" >&2; exit 2 ;;
esac
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0
cargo build --locked --release -p vmfarm-agent --target x86_64-unknown-linux-musl
if [ "$profile" = release ]; then
  cargo build --locked --release -p vmfarm
fi
[ -x "$target/$out/vmfarm" ] || { echo "no $target/$out/vmfarm: build it first" >&2; exit 1; }
# Man pages and shell completions, made from the clap definitions by the binary itself.
generated=$target/packaging
rm -rf "$generated"
mkdir -p "$generated/man" "$generated/completions"
# The static guest agent (cargo-deb takes built products from target/release only).
cp "$target/x86_64-unknown-linux-musl/release/vmfarm-agent" "$generated/"
"$target/$out/vmfarm" man-pages "$generated/man"
"$target/$out/vmfarm" completions bash >"$generated/completions/vmfarm.bash"
"$target/$out/vmfarm" completions zsh >"$generated/completions/_vmfarm"
"$target/$out/vmfarm" completions fish >"$generated/completions/vmfarm.fish"
cargo deb --locked --no-build --profile "$profile" -p vmfarm --output "$target/debian/"
