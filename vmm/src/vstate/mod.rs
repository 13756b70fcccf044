//! KVM-facing state: guest memory, the VM object and its vCPUs (Firecracker's split).

pub(crate) mod dma_gate;
pub mod memory;
pub(crate) mod mmu;
pub(crate) mod quiesce;
pub(crate) mod vcpu;
pub mod vm;
pub(crate) mod watchdog;
