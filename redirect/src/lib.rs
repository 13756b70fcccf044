//! The redirect engine of exterior-vmm.
//!
//! The engine runs a system call issued by a program in the trusted SVM on the GVM's own
//! kernel, on a lent vCPU whose address space (a *view*) is composed from GVM memory, the
//! trusted kernel image and a private window (see the project design, section 4: views and redirected system calls).
//!
//! This crate is kept free of KVM: it receives guest memory through the narrow
//! [`GuestPhysMemory`] trait, so everything here can be unit-tested on crafted memory images
//! ([`MemoryImage`]). The VMM hands over its `vm_memory::GuestMemoryMmap<()>` directly; an
//! implementation of the trait for it lives in [`memory`].
//!
//! This is the engine's foundation:
//! - [`memory`]: bounds-checked guest-physical reads and writes;
//! - [`paging`]: x86-64 4-level page walks through a guest's own (possibly hostile) page
//!   tables — single translations, virtual reads and writes that cross pages, bounded C-string
//!   reads, and a bounded enumeration of all mappings (used to build view page tables);
//! - [`profile`]: symbols and struct layouts of the pinned kernel;
//! - [`view`]: the private window's layout and the view page tables of a redirected call;
//! - [`bounce`]: the bounce pages that carry a call's user buffers (no SVM memory is in
//!   the redirect VM);
//! - [`cpu_tables`]: the IDT, GDT and TSS the redirect vCPU runs on (never the GVM's);
//! - [`kaslr`]: the kernel's relocation table, and finding a GVM's KASLR slide by it;
//! - [`shadow`]: the shadow task that is `current` on the lent CPU during a call;
//! - [`lend`]: lending a held GVM CPU to a call (its per-cpu words) and giving it back;
//! - [`module_text`]: which loaded modules' text the view may run (checked against the
//!   trusted SVM's load of the same `.ko`);
//! - [`call_profile`]: what a call needs from the kernel profile, derived once;
//! - [`stores`]: which stores to the unbacked sentinel and trap pages end a call;
//! - [`traps`]: the traps patched into the view's private kernel text (sleep, faults,
//!   panic) and the reports made from them.
//!
//! Everything that reads guest-controlled data is written so that no input can make it panic,
//! loop forever or touch memory outside the guest: a malicious GVM can make an operation fail,
//! never crash the VMM.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bounce;
pub mod call_profile;
pub mod cpu_tables;
pub mod kaslr;
pub mod lend;
pub mod memory;
pub mod module_text;
pub mod paging;
pub mod profile;
pub mod shadow;
pub mod stores;
pub mod traps;
pub mod view;

#[cfg(test)]
mod test_images;

pub use memory::{GuestPhysMemory, MemError, MemoryImage};
pub use paging::{
    for_each_mapping, is_canonical, read_cstr, read_virt, translate, write_virt, Access,
    AccessKind, AddressSpace, Level, Mapping, PageSize, PagingMode, Privilege, Translation,
    WalkError, WalkStats, DEFAULT_MAX_PHYS_BITS, DEFAULT_MAX_TABLES, PAGE_SIZE,
};
pub use profile::{KernelProfile, ProfileError};
