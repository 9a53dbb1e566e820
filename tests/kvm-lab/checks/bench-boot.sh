#!/bin/sh
# The boot benchmark in L1 (run.sh of `lab.sh bench-boot`): `vmfarm bench boot` on the stock kernel
# and the initramfs of checks/bench-guest.sh, vmfarm beside the payload's QEMU, with a 256 MiB raw
# disk in L1's RAM. BENCH_RUNS comes from `lab.sh run --append`, the guest's command line from
# /payload/cmdline.
truncate -s 256M /tmp/bench.img
vmfarm bench boot --kernel /payload/l2/vmlinuz --initrd /payload/l2/initrd.cpio --disk /tmp/bench.img \
  --cpus 2 --memory 512MiB --runs "${BENCH_RUNS:-5}" --marker L2-INIT --end L2-LAB-INIT-EXIT \
  --cmdline "$(cat /payload/cmdline) LAB_L2_END=poweroff BENCH_BLK_MIB=128" \
  --timeout-secs 90 --qemu /payload/bin/qemu-system-x86_64 --qemu-arg=-L --qemu-arg=/payload/share/qemu
