#!/bin/busybox sh
# /init of the lab's L2 guests (built by `lab.sh l2-initrd`): mounts, the virtio/vsock/pvpanic modules
# in dependency order, then the test's own script /lab-init. When that returns the guest reboots
# (`reboot -f`: with reboot=k the VMM's i8042 line ends the VM), or powers off with LAB_L2_END=poweroff.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/load.order); do insmod "/lib/modules/$m" || echo "L2 insmod $m FAILED"; done
echo "L2-INIT uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc)"
sh /lab-init
echo "L2-LAB-INIT-EXIT rc=$?"
sync
if [ "${LAB_L2_END:-reboot}" = poweroff ]; then poweroff -f; else reboot -f; fi
