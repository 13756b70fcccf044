//! The VMM library behind the `exterior-vmm` binary: KVM VMs and vCPUs, guest memory,
//! Linux boot, legacy devices, the event loop, seccomp filters, instances (a GVM and its
//! SVM in one process, with their control socket) and the redirect executor.
//!
//! The command line, the instance client, image verbs, the KVM probe and the boot
//! benchmark are in the `exterior-vmm` crate; this crate exports only what it calls.

#![deny(missing_docs)]

pub(crate) mod boot;
pub mod builder;
pub mod config;
pub(crate) mod devices;
pub(crate) mod event_loop;
pub(crate) mod executor;
pub use executor::HoldPolicy;
pub mod exit;
pub mod instance;
pub(crate) mod seccomp;
pub(crate) mod sync;
pub mod terminal;
pub mod vstate;
