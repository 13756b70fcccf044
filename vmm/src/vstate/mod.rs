//! KVM-facing state: guest memory, the VM object and its vCPUs (Firecracker's split).

pub mod memory;
pub mod quiesce;
pub mod vcpu;
pub mod vm;
pub mod watchdog;
