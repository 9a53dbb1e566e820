#!/bin/sh
# /lab-init of the L2 guest used by vm-suite.sh: what it does depends on LAB_TEST=... on its command line.
# Every result is one console line starting with "L2-"; the guest then reboots (see l2-init.sh).
up() { cut -d' ' -f1 /proc/uptime; }
echo "L2-MARKER test=${LAB_TEST:-none} uptime=$(up)"

# A 1 MiB pattern with a distinct line per 16 bytes, so that misplaced sectors show.
pattern() { awk -v t="$1" 'BEGIN { for (i = 0; i < 100000; i++) printf "%s-%010d\n", t, i }' | head -c 1048576; }
# The virtio disk with SECTORS 512-byte sectors (the order of vda/vdb is not part of the contract).
disk_by_size() { for b in /sys/block/vd*; do [ "$(cat "$b/size")" = "$1" ] && { echo "/dev/${b##*/}"; return; }; done; }
# Disks made by vm-suite.sh: raw 8 MiB (written at 1 MiB), qcow2 overlay 16 MiB over a base whose
# first MiB holds pattern "base" (written at 2 MiB; the first MiB must still read as the base).
RAW_SECTORS=16384 OVL_SECTORS=32768

case "$LAB_TEST" in
basic)
  echo "L2-NPROC $(nproc)"
  echo "L2-RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current 2>&1)"
  timeout 20 head -c 4096 /dev/hwrng > /tmp/rng
  n=$(wc -c < /tmp/rng)
  distinct=$(od -An -v -tx1 /tmp/rng | tr -s ' ' '\n' | grep . | sort -u | wc -l)
  echo "L2-RNG bytes=$n distinct=$distinct"
  ;;
disk-write)
  raw=$(disk_by_size $RAW_SECTORS); ovl=$(disk_by_size $OVL_SECTORS)
  echo "L2-DISKS raw=$raw overlay=$ovl all=$(ls /sys/block | tr '\n' ' ')"
  pattern raw > /tmp/raw; pattern overlay > /tmp/ovl
  dd if=/tmp/raw of="$raw" bs=65536 seek=16 conv=fsync 2>/dev/null && echo "L2-WROTE raw $(sha256sum < /tmp/raw | cut -c1-16) bytes=$(wc -c < /tmp/raw)"
  dd if=/tmp/ovl of="$ovl" bs=65536 seek=32 conv=fsync 2>/dev/null && echo "L2-WROTE overlay $(sha256sum < /tmp/ovl | cut -c1-16) bytes=$(wc -c < /tmp/ovl)"
  sync
  ;;
disk-read)
  raw=$(disk_by_size $RAW_SECTORS); ovl=$(disk_by_size $OVL_SECTORS)
  echo "L2-DISKS raw=$raw overlay=$ovl"
  want_raw=$(pattern raw | sha256sum | cut -c1-16)
  want_ovl=$(pattern overlay | sha256sum | cut -c1-16)
  want_base=$(pattern base | sha256sum | cut -c1-16)
  got_raw=$(dd if="$raw" bs=65536 skip=16 count=16 2>/dev/null | sha256sum | cut -c1-16)
  got_ovl=$(dd if="$ovl" bs=65536 skip=32 count=16 2>/dev/null | sha256sum | cut -c1-16)
  got_base=$(dd if="$ovl" bs=65536 count=16 2>/dev/null | sha256sum | cut -c1-16)
  [ "$got_raw" = "$want_raw" ] && echo "L2-READ raw ok" || echo "L2-READ raw BAD got=$got_raw want=$want_raw"
  [ "$got_ovl" = "$want_ovl" ] && echo "L2-READ overlay ok" || echo "L2-READ overlay BAD got=$got_ovl want=$want_ovl"
  [ "$got_base" = "$want_base" ] && echo "L2-READ base-through-overlay ok" || echo "L2-READ base-through-overlay BAD got=$got_base want=$want_base"
  ;;
vsock)
  VSOCK_TOOL_WAIT=60 vsock-tool listen-vsock 5000 "${LAB_VSOCK_BYTES:-10485760}" > /tmp/listen.log 2>&1 &
  lp=$!
  VSOCK_TOOL_WAIT=60 vsock-tool connect-vsock 2 6000 "${LAB_VSOCK_BYTES:-10485760}" 2>&1 | sed 's/^/L2-VSOCK /'
  wait $lp
  sed 's/^/L2-VSOCK /' /tmp/listen.log
  ;;
panic)
  echo "L2-PANICKING"
  sleep 0.5
  echo c > /proc/sysrq-trigger
  sleep 30
  ;;
*) echo "L2-UNKNOWN-TEST ${LAB_TEST:-}" ;;
esac
echo "L2-DONE test=${LAB_TEST:-none} uptime=$(up)"
