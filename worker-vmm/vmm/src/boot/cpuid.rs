//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC id, the VM's topology (one socket,
//! one thread per core) and the hypervisor bit.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Level types in leaves 0xb/0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    u32::BITS - n.saturating_sub(1).leading_zeros()
}

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `apic_id` of `cpu_count`.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], apic_id: u8, cpu_count: u8) {
    let id = u32::from(apic_id);
    let count = u32::from(cpu_count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC id, logical processors per package, CLFLUSH size (8 * 8).
                e.ebx = (id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in 31:26; the cache is shared by one thread (25:14 = 0),
                // except the last level, shared by all.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            // No virtual PMU.
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZE => {
                // ECX: APIC id size in 15:12, cores - 1 in 7:0.
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn test_cpuid_carries_apic_id_and_topology_per_vcpu() {
        for (apic_id, count) in [(0u8, 1u8), (1, 2), (3, 4), (5, 6)] {
            let mut entries = vec![
                leaf(LEAF_FEATURES, 0),
                leaf(LEAF_TOPOLOGY, 0),
                leaf(LEAF_TOPOLOGY, 1),
                leaf(LEAF_TOPOLOGY, 2),
                leaf(LEAF_AMD_SIZE, 0),
                leaf(LEAF_AMD_TOPOLOGY, 0),
            ];
            filter_cpuid(&mut entries, apic_id, count);
            let id = u32::from(apic_id);
            let n = u32::from(count);
            assert_eq!(entries[0].ebx >> 24, id);
            assert_eq!((entries[0].ebx >> 16) & 0xff, n);
            assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
            assert_eq!(entries[0].edx & EDX_HTT != 0, n > 1);
            assert_eq!((entries[1].ebx, entries[1].edx), (1, id));
            assert_eq!((entries[2].ebx, entries[2].ecx >> 8), (n, LEVEL_CORE));
            assert!(1 << entries[2].eax >= n);
            assert_eq!(entries[3].ecx, 2);
            assert_eq!(entries[4].ecx & 0xff, n - 1);
            assert_eq!(entries[5].eax, id);
        }
    }

    #[test]
    fn test_bits_for() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
