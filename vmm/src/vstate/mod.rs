//! KVM-facing state: guest memory, the VM object and its vCPUs (Firecracker's split).

pub mod memory;
pub(crate) mod quiesce;
pub(crate) mod vcpu;
pub mod vm;
pub(crate) mod watchdog;
