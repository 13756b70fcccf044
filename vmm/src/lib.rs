//! exterior-vmm: the VMM crate. KVM VMs and vCPUs, guest memory, Linux boot, legacy
//! devices, the event loop, seccomp filters and the command line.

pub mod bench;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod cli_image;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod executor;
pub mod exit;
pub mod instance;
pub mod probe;
pub mod seccomp;
pub mod terminal;
pub mod vstate;
