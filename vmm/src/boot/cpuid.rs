//! Per-vCPU CPUID: what KVM supports, with topology and the hypervisor bit filled in.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bit 31: "running under a hypervisor". Without it the Debian kernel does not
/// look for kvm-clock and hangs calibrating the TSC (DESIGN.md section 3).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, "EBX[23:16] is valid".
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Patches KVM's supported CPUID entries for vCPU `index` of `count`.
pub fn patch_entries(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package,
                // EBX[15:8] CLFLUSH line size in quadwords.
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Extended topology: EDX is the x2APIC ID of this CPU.
            0xb | 0x1f => e.edx = u32::from(index),
            // AMD extended APIC ID.
            0x8000_001e => e.eax = u32::from(index),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_and_hypervisor_bit_are_set() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ];
        patch_entries(&mut entries, 1, 2);
        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(entries[0].ebx >> 24, 1);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 2);
        assert_eq!(entries[1].edx, 1);
    }
}
