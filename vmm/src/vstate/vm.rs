//! The KVM VM object: memory slots, in-kernel irqchip and PIT.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use crate::boot::layout::KVM_TSS_ADDR;

/// A failure of KVM, or of the host around a KVM operation.
#[derive(Debug, Error)]
pub enum VmError {
    /// The KVM device could not be opened.
    #[error("cannot open {path}: {source} (is KVM available on this host? load kvm and kvm_intel/kvm_amd, and check permissions)")]
    OpenKvm {
        /// The device path (normally /dev/kvm).
        path: String,
        /// Why it could not be opened.
        source: kvm_ioctls::Error,
    },
    /// The KVM device speaks another API version (the one it reported).
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    /// A host-side step around KVM failed (the message says which).
    #[error("{0}")]
    Host(String),
    /// KVM did not accept an MSR of the vCPU setup (the MSR's index).
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRefused(u32),
    /// A KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
}

/// Maps a KVM ioctl error to [`VmError::Kvm`], saying `what` was being done.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// An open /dev/kvm plus one VM created from it.
pub struct Vm {
    pub(crate) kvm: Kvm,
    /// The VM's descriptor.
    pub fd: VmFd,
}

impl Vm {
    /// Opens the KVM device at `kvm_path` and creates a VM.
    pub fn new(kvm_path: &Path) -> Result<Self, VmError> {
        let cpath =
            std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes()).map_err(|_| {
                VmError::OpenKvm {
                    path: kvm_path.display().to_string(),
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                }
            })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|source| VmError::OpenKvm {
            path: kvm_path.display().to_string(),
            source,
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        Ok(Self { kvm, fd })
    }

    /// Registers every region of `mem` as a memory slot, in order.
    pub(crate) fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Host(format!("memory slot {slot}: {e}")))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host+len) is a live mapping owned by `mem`, which
            // the caller keeps alive for as long as the VM exists (the VM is dropped first at
            // process exit); slots do not overlap because vm-memory regions do not.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(kvm_err("set user memory region"))?;
        }
        Ok(())
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub(crate) fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("set TSS address"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        Ok(())
    }
}
