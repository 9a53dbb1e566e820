#!/bin/sh
# The boot benchmark in L1 (run.sh of `lab.sh bench-boot`): `vmfarm bench boot` on the stock kernel
# and the initramfs of checks/bench-guest.sh, vmfarm beside the payload's QEMU, with a 256 MiB disk
# in L1's RAM: raw, or a copy of the payload's qcow2 overlay (`lab.sh bench-boot --qcow2`). BENCH_RUNS comes
# from `lab.sh run --append`, the guest's command line from /payload/cmdline.
# Both kinds of disk live in L1's /tmp (tmpfs), and each run's fresh copy beside them.
disk=/tmp/bench.img
if [ -f /payload/disks/bench.qcow2 ]; then
  disk=/tmp/bench.qcow2
  cp /payload/disks/bench.qcow2 "$disk"
else
  truncate -s 256M "$disk"
fi
vmfarm bench boot --kernel /payload/l2/vmlinuz --initrd /payload/l2/initrd.cpio --disk "$disk" \
  --cpus 2 --memory 512MiB --runs "${BENCH_RUNS:-5}" --marker L2-INIT --end L2-LAB-INIT-EXIT \
  --cmdline "$(cat /payload/cmdline) LAB_L2_END=poweroff BENCH_BLK_MIB=128" \
  --timeout-secs 90 --qemu /payload/bin/qemu-system-x86_64 --qemu-arg=-L --qemu-arg=/payload/share/qemu \
  --jail
