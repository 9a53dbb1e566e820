#!/bin/busybox sh
# /init of the KVM lab's L1 (built into the cached base initramfs by lab.sh).
# Loads the kvm and virtio modules, runs /payload/run.sh, prints "LAB-RESULT rc=N", hands /out back
# on the out disk (a tar on /dev/vda) and powers off. Words KEY=val at the end of the kernel command
# line arrive here as environment variables (LAB_TIMEOUT and whatever `lab.sh run --append` adds).
/bin/busybox --install -s /bin
export PATH=/payload/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# cgroup v2, for the VMM jail's per-guest cgroups (memory, cpu, pids).
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "LAB-L1 no cgroup2"
up() { cut -d' ' -f1 /proc/uptime; }
echo "LAB-L1-INIT uptime=$(up) kernel=$(uname -r) cpus=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
for m in $(cat /lab/mods/load.order); do
  case "$m" in
    kvm-amd.ko|kvm_amd.ko)
      case "$flags" in *" svm "*) ;; *) echo "LAB-L1 the CPU has no svm flag: kvm-amd not loaded"; continue ;; esac ;;
  esac
  insmod "/lab/mods/$m" || echo "LAB-L1 insmod $m FAILED"
done
echo "LAB-L1-MODULES $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
if [ -c /dev/kvm ]; then echo "LAB-L1-KVM /dev/kvm present"; else echo "LAB-L1-KVM /dev/kvm missing"; fi
# The out disk, when the host gave one (a virtio-blk device on microvm's virtio-mmio).
if grep -qx 0x0002 /sys/bus/virtio/devices/*/device 2>/dev/null; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
fi
mkdir -p /out
t=${LAB_TIMEOUT:-600}; t=$((t - 30)); [ $t -lt 10 ] && t=10
echo "LAB-L1-RUN uptime=$(up) limit=${t}s"
cd /payload && timeout "$t" sh ./run.sh
rc=$?
cd /
if [ -b /dev/vda ]; then tar -cf /dev/vda -C /out . && sync || echo "LAB-L1 could not write /out to the out disk"; fi
echo "LAB-RESULT rc=$rc uptime=$(up)"
sleep 0.3
poweroff -f
