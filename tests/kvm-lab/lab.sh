#!/usr/bin/env bash
# vmfarm KVM lab: a real KVM one level down, for the VMM's tests (see README.md beside this file).
#
# L1 = Debian's stock cloud kernel under qemu-system-x86_64 TCG (-cpu max carries AMD SVM + NPT);
# its initramfs loads irqbypass, kvm, kvm-amd and then runs the caller's payload/run.sh.
#
# Usage:
#   lab.sh prepare                 fetch the kernel package, build the cached lab material; prints the cache dir
#   lab.sh path                    print the cache dir (prepares it first when needed)
#   lab.sh run --payload DIR [--out DIR] [--log FILE] [--timeout SECS] [--append "K=V ..."]
#                                  boot L1 with DIR at /payload, run /payload/run.sh there; the console goes
#                                  to stdout (and FILE). Files run.sh leaves in /out come back into --out DIR.
#                                  Exit status: run.sh's status (from the LAB-RESULT line), 124 when L1 timed
#                                  out, 125 when L1 ended without a LAB-RESULT line, 2 on a usage/setup error.
#   lab.sh l2-initrd --init FILE --out FILE [--add SRC:DEST]...
#                                  build an L2 initramfs (uncompressed cpio): busybox, the L2 modules in load
#                                  order, the lab helpers in /bin, and FILE as /lab-init, run after the
#                                  standard setup (mounts, modules) by /init; the guest then reboots
#                                  (`reboot -f`; LAB_L2_END=poweroff on its command line powers off instead).
#   lab.sh bench-boot [--runs N] [--cmdline "..."] [--timeout SECS] [--qcow2]
#                                  run `vmfarm bench boot` in L1: vmfarm (VMFARM_LAB_VMFARM, else the static
#                                  release build) beside this host's QEMU microvm, on the stock kernel and an
#                                  L2 initramfs that measures virtio-blk (on a raw disk, or --qcow2: a qcow2
#                                  overlay over an empty qcow2 base, as the worker's guests have); the figures
#                                  are at the console's end
#   lab.sh build-vmfarm [--debug]
#                                  build the static musl vmfarm binary (release unless --debug); prints its path
#
# Environment: VMFARM_CACHE (default ~/.cache/vmfarm), VMFARM_LAB_KERNEL_PKG (default: the package that
# linux-image-cloud-amd64 depends on), VMFARM_LAB_QEMU (default qemu-system-x86_64),
# VMFARM_LAB_SMP / VMFARM_LAB_MEM (L1 vCPUs / MiB, default 2 / 4096), VMFARM_LAB_TSC=host (L1 keeps
# wall-clock time on the host's TSC rate, VMFARM_LAB_TSC_KHZ or measured), VMFARM_LAB_BOOT_TIMEOUT
# (seconds for L1 to reach its init before one retry, default 120), VMFARM_LAB_OUT_SIZE (out disk, 1G).
set -euo pipefail

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${VMFARM_CACHE:-$HOME/.cache/vmfarm}/kvm-lab
QEMU=${VMFARM_LAB_QEMU:-qemu-system-x86_64}

# L1 needs the kvm modules, and virtio_blk for the disk that carries /out back to the host.
L1_MODULES=(irqbypass kvm kvm-amd virtio_mmio virtio_blk)
# L2 guests run the same stock kernel; these are the drivers for the devices of vmfarm's VMM.
L2_MODULES=(virtio_mmio virtio_blk vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
            virtio-rng virtio_console pvpanic pvpanic-mmio)

die() { echo "kvm-lab: $*" >&2; exit 2; }
log() { echo "kvm-lab: $*" >&2; }

need_cmds() {
  local missing=() c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  [ ${#missing[@]} = 0 ] || die "missing host tools: ${missing[*]} (run scripts/install-deps.sh)"
}

busybox_static() {
  local b
  for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then echo "$b"; return; fi
  done
  die "no static busybox (apt-get install busybox-static)"
}

# The kernel package: the one the linux-image-cloud-amd64 metapackage depends on.
kernel_pkg() {
  if [ -n "${VMFARM_LAB_KERNEL_PKG:-}" ]; then echo "$VMFARM_LAB_KERNEL_PKG"; return; fi
  local p
  p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
  if [ -z "$p" ]; then
    log "apt has no linux-image-cloud-amd64; running apt-get update"
    apt_update
    p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
  fi
  [ -n "$p" ] || die "cannot find the package linux-image-cloud-amd64 depends on (set VMFARM_LAB_KERNEL_PKG)"
  echo "$p"
}

apt_update() {
  local sudo=
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2 || die "apt-get update failed"
}

pkg_version() {
  apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

# The cache key: the package and its version, plus a hash of this harness (script, inits, helpers),
# so that a change to any of them builds fresh material.
harness_hash() {
  (cd "$LAB_DIR" && cat lab.sh l1-init.sh l2-init.sh helpers/*.c host/*.c) | sha256sum | cut -c1-12
}

# Prints the modules (paths relative to the modules dir) for the given names, dependencies first.
module_closure() {
  local moddir=$1; shift
  awk -v want="$*" '
    function norm(s) { gsub(/-/, "_", s); return s }
    function base(p,   n) { n = split(p, a, "/"); p = a[n]; sub(/\.ko(\.[a-z]+)?$/, "", p); return norm(p) }
    function visit(m,   i, n, d) {
      if (m in done) return
      if (!(m in path)) { print "kvm-lab: module not found: " m > "/dev/stderr"; exit 3 }
      done[m] = 1
      n = split(deps[m], d, " ")
      for (i = n; i >= 1; i--) visit(base(d[i]))
      print path[m]
    }
    { p = $1; sub(/:$/, "", p); m = base(p); path[m] = p; deps[m] = ""; for (i = 2; i <= NF; i++) deps[m] = deps[m] " " $i }
    END { n = split(want, w, " "); for (i = 1; i <= n; i++) visit(norm(w[i])) }
  ' "$moddir/modules.dep"
}

# Copies modules (in load order) into DEST and writes DEST/load.order (file names, one a line).
copy_modules() {
  local moddir=$1 dest=$2; shift 2
  local list m f
  list=$(module_closure "$moddir" "$@") || die "module dependency resolution failed"
  mkdir -p "$dest"; : > "$dest/load.order"
  for m in $list; do
    f=$(basename "$m")
    case "$f" in
      *.ko) cp "$moddir/$m" "$dest/$f" ;;
      *.ko.xz) xz -dc "$moddir/$m" > "$dest/${f%.xz}"; f=${f%.xz} ;;
      *.ko.zst) zstd -qdc "$moddir/$m" > "$dest/${f%.zst}"; f=${f%.zst} ;;
      *) die "unknown module format: $m" ;;
    esac
    echo "$f" >> "$dest/load.order"
  done
}

# Turns a bzImage into the ELF vmlinux QEMU can boot through PVH (faster than the bzImage path).
extract_vmlinux() {
  local img=$1 out=$2 pos
  for pos in $(grep -obUaP '\x02\x21\x4c\x18' "$img" | cut -d: -f1); do
    tail -c +$((pos + 1)) "$img" | lz4 -dc 2>/dev/null > "$out.tmp" || true
    if readelf -h "$out.tmp" >/dev/null 2>&1; then mv "$out.tmp" "$out"; return 0; fi
  done
  rm -f "$out.tmp"; return 1
}

# Builds the cache dir for the current key if it is not complete yet; prints its path.
prepare() {
  need_cmds apt-get apt-cache dpkg-deb depmod cpio gcc lz4 readelf sha256sum flock file
  local bb pkg ver key dir tmp kver moddir
  bb=$(busybox_static)
  pkg=$(kernel_pkg)
  ver=$(pkg_version "$pkg")
  [ -n "$ver" ] || die "no version known for $pkg"
  key="$pkg-$ver-$(harness_hash)"
  dir=$CACHE_ROOT/$key
  if [ -e "$dir/.complete" ]; then touch "$dir/.complete"; echo "$dir"; return; fi
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.lock"
  flock -w 600 9 || die "timed out waiting for $CACHE_ROOT/.lock"
  if [ -e "$dir/.complete" ]; then exec 9>&-; echo "$dir"; return; fi
  log "preparing $dir"
  local t0=$SECONDS
  tmp=$(mktemp -d "$CACHE_ROOT/.tmp.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  mkdir -p "$CACHE_ROOT/debs"
  local deb
  deb=$(ls "$CACHE_ROOT/debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1) || true
  if [ -z "$deb" ]; then
    (cd "$tmp" && apt-get download "$pkg=$ver" >&2) || { apt_update; (cd "$tmp" && apt-get download "$pkg=$ver" >&2); } ||
      die "apt-get download $pkg=$ver failed"
    mv "$tmp"/*.deb "$CACHE_ROOT/debs/"
    deb=$(ls "$CACHE_ROOT/debs/${pkg}_"*.deb | head -1)
  fi
  dpkg-deb -x "$deb" "$tmp/pkg"
  kver=$(ls "$tmp/pkg/lib/modules" | head -1)
  moddir=$tmp/pkg/lib/modules/$kver
  depmod -b "$tmp/pkg" "$kver"
  mkdir -p "$tmp/out/bin"
  cp "$tmp/pkg/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
  extract_vmlinux "$tmp/out/vmlinuz" "$tmp/out/vmlinux" || log "no PVH vmlinux in the bzImage; L1 boots the bzImage"
  echo "$kver" > "$tmp/out/kernel-release"
  echo "$pkg $ver" > "$tmp/out/kernel-package"
  copy_modules "$moddir" "$tmp/out/l1-mods" "${L1_MODULES[@]}"
  copy_modules "$moddir" "$tmp/out/l2-mods" "${L2_MODULES[@]}"
  cp "$bb" "$tmp/out/bin/busybox"
  local c
  for c in "$LAB_DIR"/helpers/*.c; do
    gcc -O2 -Wall -static -o "$tmp/out/bin/$(basename "$c" .c)" "$c" || die "cannot build $c"
  done
  mkdir -p "$tmp/out/host"
  gcc -O2 -Wall -o "$tmp/out/host/tsc-khz" "$LAB_DIR/host/tsc-khz.c" || die "cannot build host/tsc-khz.c"
  # L1's base initramfs: busybox, helpers, modules, /init. The payload is a second archive appended per run.
  local r=$tmp/l1root
  mkdir -p "$r"/{bin,sbin,usr/bin,proc,sys,dev,tmp,out,payload,lab/mods}
  cp "$tmp/out/bin/"* "$r/bin/"
  cp "$tmp/out/l1-mods/"* "$r/lab/mods/"
  cp "$LAB_DIR/l1-init.sh" "$r/init"; chmod 755 "$r/init"
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$tmp/out/l1-base.cpio"
  rm -rf "$dir"; mv "$tmp/out" "$dir"
  touch "$dir/.complete"
  rm -rf "$tmp"; trap - EXIT
  # Material of other harness versions or kernels, unused for a week, goes.
  find "$CACHE_ROOT" -mindepth 2 -maxdepth 2 -name .complete -mtime +7 -printf '%h\n' | xargs -r rm -rf
  exec 9>&-
  log "prepared in $((SECONDS - t0)) s"
  echo "$dir"
}

# Adds the shared libraries of dynamic ELF executables in ROOT/payload/bin to ROOT (same absolute paths).
add_shared_libs() {
  local root=$1 f lib
  [ -d "$root/payload/bin" ] || return 0
  for f in "$root"/payload/bin/*; do
    [ -f "$f" ] && [ -x "$f" ] || continue
    file -L "$f" | grep -q 'dynamically linked' || continue
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*'); do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
    done
  done
}

lab_cleanup() {
  [ -n "${LAB_QPID:-}" ] && kill -TERM "$LAB_QPID" 2>/dev/null
  [ -n "${LAB_WORK:-}" ] && rm -rf "$LAB_WORK"
  return 0
}

run_lab() {
  local payload= out= logf= timeout=600 append=
  while [ $# -gt 0 ]; do
    case "$1" in
      --payload) payload=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      --log) logf=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      --append) append=$2; shift 2 ;;
      *) die "run: unknown argument $1" ;;
    esac
  done
  [ -n "$payload" ] && [ -f "$payload/run.sh" ] || die "run: --payload DIR with a run.sh is required"
  need_cmds "$QEMU" timeout cpio
  local dir work rc kernel t0=$SECONDS
  dir=$(prepare)
  work=$(mktemp -d "${TMPDIR:-/tmp}/vmfarm-lab.XXXXXX")
  LAB_WORK=$work LAB_QPID=
  # QEMU runs as a background job, which ignores SIGINT: stop it (timeout relays the TERM) on any exit.
  trap 'lab_cleanup' EXIT
  trap 'exit 130' INT TERM HUP
  # Payload archive: DIR at /payload, plus the shared libraries its dynamic executables need.
  mkdir -p "$work/root/payload"
  cp -a "$payload/." "$work/root/payload/"
  add_shared_libs "$work/root"
  (cd "$work/root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$work/payload.cpio"
  cat "$dir/l1-base.cpio" "$work/payload.cpio" > "$work/initrd.cpio"
  local disk=()
  if [ -n "$out" ]; then
    disk=(-drive "id=out,file=$work/out.img,format=raw,if=none,cache=unsafe" -device virtio-blk-device,drive=out)
  fi
  kernel=$dir/vmlinux; [ -e "$kernel" ] || kernel=$dir/vmlinuz
  # L1's clock. By default L1 is told tsc_early_khz=2000000 (without it the TSC calibration can hang
  # under TCG), finds its vCPUs' TSCs unsynchronised and runs on refined-jiffies, which falls behind
  # wall-clock time under load. VMFARM_LAB_TSC=host tells L1 the host's real TSC rate and
  # tsc=reliable, so L1 keeps wall-clock time on the TSC (for timings taken in L1); see README.md.
  local clock="tsc_early_khz=2000000" khz
  if [ "${VMFARM_LAB_TSC:-}" = host ]; then
    khz=${VMFARM_LAB_TSC_KHZ:-$("$dir/host/tsc-khz" 2>/dev/null || true)}
    case "$khz" in ''|*[!0-9]*) die "cannot measure the host's TSC rate (set VMFARM_LAB_TSC_KHZ)" ;; esac
    clock="tsc_early_khz=$khz tsc=reliable"
  fi
  log "payload packed in $((SECONDS - t0)) s"
  # A boot that has not reached L1's init after boot_limit seconds is killed and tried again (once):
  # under heavy host load an L1 boot has been seen to stall for good before its init.
  local boot_limit=${VMFARM_LAB_BOOT_TIMEOUT:-120} attempt
  for attempt in 1 2; do
    t0=$SECONDS
    log "booting L1 ($(cat "$dir/kernel-release"), initrd $(( $(stat -c %s "$work/initrd.cpio") / 1048576 )) MiB, $clock, timeout ${timeout}s, attempt $attempt)"
    [ -n "$out" ] && { rm -f "$work/out.img"; truncate -s "${VMFARM_LAB_OUT_SIZE:-1G}" "$work/out.img"; }
    : > "$work/console.raw"
    # The console (ttyS0) is QEMU's stdout. -no-reboot: L1's poweroff, reboot or panic (panic=-1) ends
    # QEMU. timeout --foreground keeps QEMU in this process group: killing the group ends everything.
    set +e
    timeout --foreground -k 10 "$timeout" "$QEMU" -M microvm -accel tcg,thread=multi -smp "${VMFARM_LAB_SMP:-2}" \
      -cpu max -m "${VMFARM_LAB_MEM:-4096}" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
      -kernel "$kernel" -initrd "$work/initrd.cpio" "${disk[@]}" \
      -append "console=ttyS0 quiet $clock panic=-1 rdinit=/init LAB_TIMEOUT=$timeout $append" \
      </dev/null > "$work/console.raw" 2>&1 &
    local qpid=$! booted=0 stalled=0
    LAB_QPID=$qpid
    tail -n +1 -f --pid="$qpid" "$work/console.raw" &
    local tpid=$!
    while kill -0 "$qpid" 2>/dev/null; do
      if [ $booted = 0 ]; then
        if grep -q LAB-L1-INIT "$work/console.raw"; then
          booted=1
        elif [ $((SECONDS - t0)) -ge "$boot_limit" ]; then
          log "L1 did not reach its init in ${boot_limit}s; stopping it"
          stalled=1
          kill -TERM "$qpid" 2>/dev/null
        fi
      fi
      sleep 0.25
    done
    wait "$qpid"; rc=$?
    wait "$tpid" 2>/dev/null
    LAB_QPID=
    set -e
    log "L1 ran $((SECONDS - t0)) s"
    [ $stalled = 1 ] && [ $attempt = 1 ] && continue
    break
  done
  tr -d '\r' < "$work/console.raw" > "$work/console.log"
  [ -n "$logf" ] && cp "$work/console.log" "$logf"
  local result
  result=$(grep -a -o 'LAB-RESULT rc=[0-9]*' "$work/console.log" | tail -1 | cut -d= -f2) || true
  if [ -n "$out" ] && [ -n "$result" ]; then
    mkdir -p "$out"
    tar -xf "$work/out.img" -C "$out" 2>/dev/null || log "no /out archive came back"
  fi
  log "done after $((SECONDS - t0)) s (qemu rc=$rc, LAB-RESULT rc=${result:-none})"
  if [ "$stalled" = 1 ] || [ "$rc" = 124 ] || [ "$rc" = 137 ]; then log "L1 timed out"; return 124; fi
  [ -n "$result" ] || { log "L1 ended without a LAB-RESULT line"; return 125; }
  return "$result"
}

l2_initrd() {
  local init= out= adds=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --init) init=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      --add) adds+=("$2"); shift 2 ;;
      *) die "l2-initrd: unknown argument $1" ;;
    esac
  done
  [ -f "$init" ] && [ -n "$out" ] || die "l2-initrd: --init FILE and --out FILE are required"
  local dir r a
  dir=$(prepare)
  r=$(mktemp -d "${TMPDIR:-/tmp}/vmfarm-l2.XXXXXX")
  mkdir -p "$r"/{bin,sbin,usr/bin,proc,sys,dev,tmp,mnt,lib/modules}
  cp "$dir/bin/"* "$r/bin/"
  cp "$dir/l2-mods/"* "$r/lib/modules/"
  cp "$LAB_DIR/l2-init.sh" "$r/init"; chmod 755 "$r/init"
  cp "$init" "$r/lab-init"; chmod 755 "$r/lab-init"
  for a in "${adds[@]}"; do
    mkdir -p "$r/$(dirname "${a#*:}")"; cp -a "${a%%:*}" "$r/${a#*:}"
  done
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out"
  rm -rf "$r"
}

# The static musl vmfarm binary for L1 (release unless --debug).
build_vmfarm() {
  local profile=release flags=(--release)
  while [ $# -gt 0 ]; do
    case "$1" in
      --debug) profile=debug; flags=() ;;
      *) die "build-vmfarm: unknown argument $1" ;;
    esac
    shift
  done
  local root
  root=$(cd "$LAB_DIR/../.." && pwd)
  (cd "$root" && cargo build "${flags[@]}" --target x86_64-unknown-linux-musl -p vmfarm >&2) || die "cargo build failed"
  echo "${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-musl/$profile/vmfarm"
}

# `vmfarm bench boot` in L1, with QEMU (binary, libraries, microvm firmware) in the payload.
bench_boot() {
  local runs=5 cmdline="console=ttyS0 reboot=k panic=-1" timeout=900 qcow2=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --qcow2) qcow2=1; shift ;;
      --runs) runs=$2; shift 2 ;;
      --cmdline) cmdline=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      *) die "bench-boot: unknown argument $1" ;;
    esac
  done
  need_cmds "$QEMU" strip qemu-img
  local dir p vmfarm f rc=0
  dir=$(prepare)
  vmfarm=${VMFARM_LAB_VMFARM:-$(build_vmfarm)}
  p=$(mktemp -d "${TMPDIR:-/tmp}/vmfarm-bench.XXXXXX")
  mkdir -p "$p"/{bin,l2,share/qemu}
  strip -o "$p/bin/vmfarm" "$vmfarm" 2>/dev/null || cp "$vmfarm" "$p/bin/vmfarm"
  cp -L "$(command -v "$QEMU")" "$p/bin/qemu-system-x86_64"
  for f in bios-microvm.bin qboot.rom pvh.bin linuxboot_dma.bin kvmvapic.bin; do
    cp -L "/usr/share/qemu/$f" "$p/share/qemu/"
  done
  cp "$dir/vmlinuz" "$p/l2/vmlinuz"
  l2_initrd --init "$LAB_DIR/checks/bench-guest.sh" --out "$p/l2/initrd.cpio"
  cp "$LAB_DIR/checks/bench-boot.sh" "$p/run.sh"
  if [ $qcow2 = 1 ]; then
    mkdir -p "$p/disks"
    qemu-img create -q -f qcow2 "$p/disks/base.qcow2" 256M
    qemu-img create -q -f qcow2 -F qcow2 -u -b /payload/disks/base.qcow2 "$p/disks/bench.qcow2" 256M
  fi
  # Words of --append reach run.sh as variables; the command line has spaces, so it goes in a file.
  echo "$cmdline" > "$p/cmdline"
  run_lab --payload "$p" --timeout "$timeout" --append "BENCH_RUNS=$runs" || rc=$?
  rm -rf "$p"
  return "$rc"
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  prepare|path) prepare ;;
  run) run_lab "$@" ;;
  l2-initrd) l2_initrd "$@" ;;
  build-vmfarm) build_vmfarm "$@" ;;
  bench-boot) bench_boot "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
