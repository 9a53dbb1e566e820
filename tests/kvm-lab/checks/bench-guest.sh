#!/bin/sh
# The boot benchmark's L2 guest (its /lab-init; see `lab.sh bench-boot`): a sequential O_DIRECT write
# and then read of the first BENCH_BLK_MIB MiB of /dev/vda, in 1 MiB requests, reported to
# `vmfarm bench boot` as "vmfarm-bench KEY VALUE" lines.
mib=${BENCH_BLK_MIB:-128}
[ -b /dev/vda ] || { echo "L2-BENCH no /dev/vda"; exit 0; }
up() { cut -d' ' -f1 /proc/uptime; }
rate() { awk -v m="$mib" -v a="$1" -v b="$2" 'BEGIN { if (b > a) printf "%.1f\n", m / (b - a); else print "nan" }'; }
t0=$(up)
dd if=/dev/zero of=/dev/vda bs=1M count="$mib" oflag=direct 2>/dev/null || echo "L2-BENCH write failed"
t1=$(up)
dd if=/dev/vda of=/dev/null bs=1M count="$mib" iflag=direct 2>/dev/null || echo "L2-BENCH read failed"
t2=$(up)
echo "vmfarm-bench blk-write-MiB/s $(rate "$t0" "$t1")"
echo "vmfarm-bench blk-read-MiB/s $(rate "$t1" "$t2")"
