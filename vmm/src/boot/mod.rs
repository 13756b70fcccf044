//! Turning a kernel, an initrd and a command line into guest memory ready for the first
//! instruction: loading, the zero page, e820, ACPI tables, and initial vCPU state.

pub mod acpi;
pub mod bzimage;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod loader;
