#!/bin/sh
# Lab check: L1 has a working KVM (kvm-amd, nested paging, a VM that runs real-mode code) and no QEMU.
check() { if [ "$2" = 0 ]; then echo "LAB-CHECK $1 ok $3"; else echo "LAB-CHECK $1 FAIL $3"; fail=1; fi; }
fail=0
grep -q '^kvm_amd ' /proc/modules; check kvm-amd-loaded $? "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
dmesg | grep -i -E 'kvm|svm' | sed 's/^/dmesg: /'
dmesg | grep -q 'Nested Paging enabled'; check nested-paging $?
[ -c /dev/kvm ]; check dev-kvm $? "$(ls -l /dev/kvm 2>&1)"
out=$(timeout 60 kvmcheck 2>&1); rc=$?
echo "$out" | sed 's/^/kvmcheck: /'
echo "$out" | grep -q KVMCHECK-OK; check kvmcheck $((rc + $?))
# The boot benchmark compares against QEMU in L1 later; it must come from the payload, not the lab.
! command -v qemu-system-x86_64 >/dev/null 2>&1; check no-qemu-in-l1 $? "$(command -v qemu-system-x86_64)"
exit $fail
