//! `kvm-probe`: does this host's KVM run guest code natively, or emulate every instruction?
//!
//! Runs a two-instruction loop in a tiny real-mode guest and times it. Hardware-assisted KVM
//! (even nested) takes nanoseconds per iteration; an emulating KVM takes about a microsecond
//! (DESIGN.md section 6) and cannot boot Linux.

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use vmm::vstate::memory::create_guest_memory;
use vmm::vstate::vm::{kvm_err, Vm, VmError};

/// Iterations of the timed loop.
const ITERATIONS: u32 = 200_000;
/// Above this many nanoseconds per iteration the KVM is considered emulating.
pub const NATIVE_THRESHOLD_NS: f64 = 100.0;
const CODE_ADDR: u64 = 0x1000;

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeResult {
    pub ns_per_iteration: f64,
}

impl ProbeResult {
    pub fn native(&self) -> bool {
        self.ns_per_iteration < NATIVE_THRESHOLD_NS
    }

    /// One line for humans and scripts.
    pub fn describe(&self) -> String {
        if self.native() {
            format!(
                "host KVM runs guests natively ({:.1} ns/iteration)",
                self.ns_per_iteration
            )
        } else {
            format!(
                "host KVM emulates instructions ({:.1} ns/iteration)",
                self.ns_per_iteration
            )
        }
    }
}

/// Real-mode code: `mov ecx, n; l: dec ecx; jnz l; hlt`.
fn loop_code(n: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xf4]);
    code
}

fn time_loop(vm: &Vm, n: u32) -> Result<Duration, VmError> {
    let shared = create_guest_memory("exterior-probe", 1 << 20)
        .map_err(|e| VmError::Host(format!("probe memory: {e}")))?;
    let mem = &shared.mem;
    mem.write_slice(&loop_code(n), GuestAddress(CODE_ADDR))
        .map_err(|e| VmError::Host(format!("write probe code: {e}")))?;
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| VmError::Host("probe memory has no region".into()))?;
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| VmError::Host(format!("probe memory: {e}")))?;
    let desc = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives in `shared` until after the vCPU stops running below; the
    // slot is removed implicitly when `vm` is dropped, and `shared` outlives this call.
    unsafe { vm.fd.set_user_memory_region(desc) }.map_err(kvm_err("probe memory slot"))?;
    let mut vcpu = vm.fd.create_vcpu(0).map_err(kvm_err("create probe vCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR => continue,
            Ok(other) => {
                return Err(VmError::Host(format!(
                    "probe loop ended in an unexpected exit: {other:?}"
                )));
            }
            Err(e) => return Err(kvm_err("run probe vCPU")(e)),
        }
    }
    let elapsed = start.elapsed();
    drop(vcpu);
    drop(shared);
    Ok(elapsed)
}

/// Times the loop on the KVM at `kvm_path`.
pub fn probe(kvm_path: &Path) -> Result<ProbeResult, VmError> {
    // Subtract a short run so VM entry/exit costs do not count as loop iterations.
    let short = time_loop(&Vm::new(kvm_path)?, 1)?;
    let long = time_loop(&Vm::new(kvm_path)?, ITERATIONS)?;
    let loop_ns = long.saturating_sub(short).as_nanos() as f64;
    Ok(ProbeResult {
        ns_per_iteration: loop_ns / f64::from(ITERATIONS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_code_is_a_counted_loop() {
        let code = loop_code(5);
        assert_eq!(&code[..2], &[0x66, 0xb9]);
        assert_eq!(u32::from_le_bytes(code[2..6].try_into().unwrap()), 5);
        assert_eq!(*code.last().unwrap(), 0xf4);
        // jnz jumps back over itself and the 2-byte dec.
        assert_eq!(code[code.len() - 2] as i8, -4);
    }

    #[test]
    fn threshold_separates_the_two_kinds() {
        assert!(ProbeResult {
            ns_per_iteration: 12.0
        }
        .native());
        assert!(!ProbeResult {
            ns_per_iteration: 1000.0
        }
        .native());
    }
}
