#!/bin/sh
# Lab checks of `vmfarm vm run` (run in L1 as /payload/run.sh; see tests/kvm_lab.rs).
# Payload: bin/vmfarm, l2/vmlinuz, l2/initrd.cpio (l2-guest.sh as /lab-init), disks/{raw.img,base.qcow2,
# overlay.qcow2}, and `sections`: the sections to run, one a line (basic disk vsock panic).
# Prints "LAB-CHECK <name> ok|FAIL <detail>" lines; the overlay goes back to the host in /out.
up() { cut -d' ' -f1 /proc/uptime; }
fail=0
check() { if [ "$2" = 0 ]; then echo "LAB-CHECK $1 ok $3"; else echo "LAB-CHECK $1 FAIL $3"; fail=1; fi; }
has() { grep -q "$2" "/tmp/$1.console"; }
CMDLINE="console=ttyS0 reboot=k panic=-1 quiet"
VM_TIMEOUT=${LAB_VM_TIMEOUT:-60}

# vm NAME ARGS...: one guest; console (stdout) in /tmp/NAME.console, vmfarm's own messages (stderr) in
# /tmp/NAME.err; both are echoed with a prefix. Sets $vm_rc.
vm() {
  name=$1; shift
  t0=$(up)
  echo "LAB-VM-START $name uptime=$t0"
  timeout -s KILL "$VM_TIMEOUT" vmfarm vm run --kernel /payload/l2/vmlinuz --initrd /payload/l2/initrd.cpio \
    --cpus 2 --memory 512MiB --timeout "$((VM_TIMEOUT - 10))s" "$@" > "/tmp/$name.console" 2> "/tmp/$name.err" < /dev/null
  vm_rc=$?
  sed "s/^/[$name console] /" "/tmp/$name.console"
  sed "s/^/[$name vmfarm] /" "/tmp/$name.err"
  echo "LAB-VM-END $name rc=$vm_rc secs=$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }')"
}

section() { grep -qx "$1" /payload/sections; }
command -v vmfarm >/dev/null || { echo "LAB-CHECK vmfarm-binary FAIL not in the payload"; exit 1; }
echo "LAB-VMFARM $(vmfarm --version 2>&1 | head -1)"

if section basic; then
  vm basic --cmdline "$CMDLINE LAB_TEST=basic"
  has basic "L2-MARKER test=basic"; check boot-marker $? "$(grep -m1 L2-MARKER /tmp/basic.console)"
  has basic "L2-NPROC 2"; check nproc-2 $? "$(grep -m1 L2-NPROC /tmp/basic.console)"
  rng=$(grep -m1 'L2-RNG bytes=' /tmp/basic.console)
  echo "$rng" | grep -q 'bytes=4096 ' && [ "$(echo "$rng" | sed 's/.*distinct=//')" -gt 200 ] 2>/dev/null
  check rng $? "$rng $(grep -m1 L2-RNG-CURRENT /tmp/basic.console)"
  has basic "L2-DONE test=basic"; d=$?
  [ $d = 0 ] && [ $vm_rc = 0 ]; check reboot-exit-0 $? "rc=$vm_rc"
fi

if section disk; then
  base_before=$(sha256sum /payload/disks/base.qcow2 | cut -c1-64)
  disks="--disk /payload/disks/raw.img --disk /payload/disks/overlay.qcow2"
  # shellcheck disable=SC2086
  vm disk-write --cmdline "$CMDLINE LAB_TEST=disk-write" $disks
  w=$(grep -c '^L2-WROTE' /tmp/disk-write.console)
  [ "$w" = 2 ] && [ $vm_rc = 0 ]; check disk-write $? "wrote=$w rc=$vm_rc"
  # shellcheck disable=SC2086
  vm disk-read --cmdline "$CMDLINE LAB_TEST=disk-read" $disks
  has disk-read "L2-READ raw ok"; check disk-raw-persists $?
  has disk-read "L2-READ overlay ok"; check disk-overlay-persists $?
  has disk-read "L2-READ base-through-overlay ok"; check disk-base-through-overlay $?
  [ "$(sha256sum /payload/disks/base.qcow2 | cut -c1-64)" = "$base_before" ]; check disk-base-unchanged $?
  cp /payload/disks/overlay.qcow2 /out/overlay.qcow2
fi

if section vsock; then
  bytes=${LAB_VSOCK_BYTES:-10485760}
  rm -f /tmp/v.sock /tmp/v.sock_6000
  VSOCK_TOOL_WAIT=90 vsock-tool listen-unix /tmp/v.sock_6000 "$bytes" > /tmp/vsock-g2h.log 2>&1 &
  lp=$!
  VM_TIMEOUT=$((VM_TIMEOUT + 60)) vm vsock --cmdline "$CMDLINE LAB_TEST=vsock LAB_VSOCK_BYTES=$bytes" --vsock /tmp/v.sock &
  vp=$!
  VSOCK_TOOL_WAIT=90 vsock-tool connect-hybrid /tmp/v.sock 5000 "$bytes" > /tmp/vsock-h2g.log 2>&1
  wait $lp
  wait $vp
  sed 's/^/[vsock host->guest] /' /tmp/vsock-h2g.log
  sed 's/^/[vsock guest->host] /' /tmp/vsock-g2h.log
  grep -q VSOCK-OK /tmp/vsock-h2g.log && grep -q 'L2-VSOCK VSOCK-OK guest-accepted' /tmp/vsock.console
  check vsock-host-to-guest $? "$(grep -h VSOCK- /tmp/vsock-h2g.log | head -1)"
  grep -q VSOCK-OK /tmp/vsock-g2h.log && grep -q 'L2-VSOCK VSOCK-OK guest->host' /tmp/vsock.console
  check vsock-guest-to-host $? "$(grep -h VSOCK- /tmp/vsock-g2h.log | head -1)"
fi

if section panic; then
  vm panic --cmdline "$CMDLINE LAB_TEST=panic"
  # The guest's own "L2-PANICKING" line can come out torn by the panic's printk: test the marker.
  has panic "L2-MARKER test=panic"; p=$?
  [ $p = 0 ] && [ $vm_rc != 0 ] && [ $vm_rc != 137 ] && grep -qi panic /tmp/panic.err
  check panic-exit-nonzero $? "rc=$vm_rc: $(tail -1 /tmp/panic.err)"
fi
exit $fail
