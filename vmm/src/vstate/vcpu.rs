//! vCPUs: configuration for boot and the run loop (one thread each).

use std::sync::Arc;

use kvm_bindings::{CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::vm::{kvm_err, Vm, VmError};
use crate::boot::{cpu, cpuid, loader::BootInfo};
use crate::devices::{MmioBus, PioBus};
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::quiesce::{ControlState, VcpuControl, VcpuSnapshot};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_MP_STATE_HALTED: u32 = 3;
use crate::boot::cpu::{MSR_IA32_TSC, MSR_LSTAR};

pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
}

/// The values of the MSRs `indices` of `fd`, in that order; `None` unless KVM returned
/// every one of them.
pub fn read_msrs<const N: usize>(fd: &VcpuFd, indices: [u32; N]) -> Option<[u64; N]> {
    let wanted = indices.map(|index| kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    });
    let mut msrs = Msrs::from_entries(&wanted).ok()?;
    if fd.get_msrs(&mut msrs).ok()? != N {
        return None;
    }
    let mut values = [0u64; N];
    for (value, index) in values.iter_mut().zip(indices) {
        *value = msrs.as_slice().iter().find(|e| e.index == index)?.data;
    }
    Some(values)
}

/// XCR0 of `fd` (the XSAVE features its kernel enabled); `None` if KVM did not report it.
pub fn read_xcr0(fd: &VcpuFd) -> Option<u64> {
    let xcrs = fd.get_xcrs().ok()?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    xcrs.xcrs[..n].iter().find(|x| x.xcr == 0).map(|x| x.value)
}

/// Handles writes to one I/O port with the whole vCPU at hand (registers in and out), not
/// just the data byte: the SVM's redirect requests (see `crate::executor`).
pub trait PortHook: Send + Sync {
    fn port(&self) -> u16;
    /// Called after the guest's OUT to `port()` exited, before the vCPU runs again.
    fn handle(&self, vcpu: &VcpuFd);
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VmError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create vCPU"))?;
        Ok(Self { fd, index })
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for the 64-bit boot protocol.
    pub fn configure(&self, vm: &Vm, count: u8, boot: &BootInfo) -> Result<(), VmError> {
        let mut supported: CpuId = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        cpuid::patch_entries(supported.as_mut_slice(), self.index, count);
        self.fd
            .set_cpuid2(&supported)
            .map_err(kvm_err("set CPUID"))?;

        let entries = cpu::boot_msrs();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| VmError::Host(format!("MSR list: {e:?}")))?;
        let written = self.fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if written != entries.len() {
            let index = entries.get(written).map(|e| e.index).unwrap_or(0);
            return Err(VmError::MsrRefused(index));
        }

        self.fd
            .set_regs(&cpu::boot_regs(boot.entry))
            .map_err(kvm_err("set registers"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err("get sregs"))?;
        self.fd
            .set_sregs(&cpu::boot_sregs(sregs))
            .map_err(kvm_err("set sregs"))?;
        self.fd
            .set_fpu(&cpu::boot_fpu())
            .map_err(kvm_err("set FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
        cpu::configure_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
        Ok(())
    }

    /// What this vCPU is doing, for the quiescer (outside KVM_RUN only).
    fn snapshot(&self) -> VcpuSnapshot {
        let halted = self
            .fd
            .get_mp_state()
            .map(|s| s.mp_state == KVM_MP_STATE_HALTED)
            .unwrap_or(false);
        // On failure report CPL 0: "unsafe", so the quiescer retries instead of trusting it.
        let sregs = self.fd.get_sregs().ok();
        let cpl = sregs.map(|s| s.cs.dpl).unwrap_or(0);
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let mut control = ControlState::default();
        if let Some(s) = sregs {
            (control.cr0, control.cr3, control.cr4, control.efer) = (s.cr0, s.cr3, s.cr4, s.efer);
        }
        if let Some([tsc, lstar]) = read_msrs(&self.fd, [MSR_IA32_TSC, MSR_LSTAR]) {
            (control.tsc, control.lstar) = (tsc, lstar);
        }
        VcpuSnapshot {
            index: self.index,
            cpl,
            halted,
            rip,
            control,
        }
    }

    /// Runs the vCPU until the VM stops; reports why through `exit`. Between runs it parks
    /// when `control` asks (see [`crate::vstate::quiesce`]).
    pub fn run(
        mut self,
        bus: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        exit: Arc<ExitSignal>,
        label: &str,
        control: Arc<VcpuControl>,
        hook: Option<Arc<dyn PortHook>>,
    ) {
        control.register_current_thread();
        self.run_loop(&bus, &mmio, &exit, label, &control, hook.as_deref());
        control.mark_stopped();
    }

    fn run_loop(
        &mut self,
        bus: &PioBus,
        mmio: &MmioBus,
        exit: &ExitSignal,
        label: &str,
        control: &VcpuControl,
        hook: Option<&dyn PortHook>,
    ) {
        let hook_port = hook.map(|h| h.port());
        // Messages name the VM when one process runs several ("SVM vCPU 0").
        let index = if label.is_empty() {
            self.index.to_string()
        } else {
            format!("{} ({label})", self.index)
        };
        while exit.reason().is_none() {
            control.park_if_requested(|| self.snapshot(), || exit.reason().is_some());
            let mut hooked = false;
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, _)) if Some(port) == hook_port => hooked = true,
                Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
                Ok(VcpuExit::Shutdown) => exit.signal(ExitReason::GuestCrash(format!(
                    "vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN)"
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => exit.signal(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => {
                        ExitReason::GuestCrash(format!("vCPU {index}: KVM reported a guest crash"))
                    }
                    other => ExitReason::VmmError(format!(
                        "vCPU {index}: unknown KVM system event {other}"
                    )),
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => exit.signal(ExitReason::VmmError(
                    format!("vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"),
                )),
                Ok(VcpuExit::InternalError) => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    exit.signal(ExitReason::VmmError(format!(
                        "vCPU {index}: KVM internal error at guest RIP {rip:#x} (an instruction KVM could not emulate; \
                         a host whose KVM emulates every instruction cannot boot Linux — use tools/kvm-run)"
                    )))
                }
                Ok(other) => exit.signal(ExitReason::VmmError(format!(
                    "vCPU {index}: unexpected KVM exit {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => exit.signal(ExitReason::VmmError(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                ))),
            }
            if let (true, Some(hook)) = (hooked, hook) {
                hook.handle(&self.fd);
            }
        }
    }
}
