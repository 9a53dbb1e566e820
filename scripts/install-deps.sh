#!/usr/bin/env bash
# Installs the host packages and Rust targets vmfarm needs, and nothing that is already there.
# Usage: scripts/install-deps.sh [farm|test]   (test also installs what the test suite needs)
set -euo pipefail
what=${1:-farm}

# Debian package <- a command (or file) it provides.
farm_pkgs=(
  "qemu-system-x86:/usr/bin/qemu-system-x86_64"
  "qemu-utils:/usr/bin/qemu-img"
  "mmdebstrap:/usr/bin/mmdebstrap"
  "e2fsprogs:/usr/sbin/mkfs.ext4"
  "cpio:/usr/bin/cpio"
  "kmod:/usr/sbin/depmod"
  "busybox-static:/bin/busybox"
  "zstd:/usr/bin/zstd"
  "xz-utils:/usr/bin/xz"
  "lz4:/usr/bin/lz4"
  "musl-tools:/usr/bin/x86_64-linux-musl-gcc"
  # The KVM lab (tests/kvm-lab): static C helpers, stripping, ELF checks.
  "gcc:/usr/bin/gcc"
  "libc6-dev:/usr/lib/x86_64-linux-gnu/libc.a"
  "file:/usr/bin/file"
  "binutils:/usr/bin/strip"
  "git:/usr/bin/git"
  # Images that boot by firmware: OVMF (UEFI), their disks (the EFI partition, the partition
  # table) and each job's cloud-init seed (a FAT disk).
  "ovmf:/usr/share/ovmf/OVMF.fd"
  "dosfstools:/usr/sbin/mkfs.vfat"
  "mtools:/usr/bin/mcopy"
  "fdisk:/usr/sbin/sfdisk"
  # `ip`, which the tests use to find the host's addresses
  "iproute2:/usr/sbin/ip"
)
test_pkgs=(
  "postgresql:/usr/lib/postgresql/15/bin/postgres"
  "chromium:/usr/bin/chromium"
  "chromium-driver:/usr/bin/chromedriver"
  # `vmfarm ssh` under a real terminal (tests/ssh.rs)
  "tmux:/usr/bin/tmux"
  # The package's test (scripts/test-package.sh): its units checked, its server asked
  "systemd:/usr/bin/systemd-analyze"
  "curl:/usr/bin/curl"
)

pkgs=("${farm_pkgs[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
updated=0
for entry in "${pkgs[@]}"; do
  pkg=${entry%%:*} path=${entry#*:}
  [ -e "$path" ] && continue
  if [ $updated = 0 ]; then
    $SUDO apt-get update -qq
    updated=1
  fi
  # One package per call: a combined call has hit "held broken packages" on this image.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  echo "installed $pkg"
done

if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl
fi

# The Debian package is made with cargo-deb (scripts/deb.sh), at a known version.
if [ "$what" = test ] && ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb 3.8.0"; then
  cargo install cargo-deb --locked --version 3.8.0
fi

# The tests' S3-compatible server for artifacts in a bucket: s3s-fs (0.14.1: the newest that
# builds with Rust 1.95).
if [ "$what" = test ] && ! s3s-fs --version 2>/dev/null | grep -qx "s3s-fs 0.14.1"; then
  cargo install s3s-fs --locked --version 0.14.1 --features binary
fi
