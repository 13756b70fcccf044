//! End-to-end tests: real kernels on a real KVM. Run through `tools/kvm-run` (which puts the
//! release `exterior-vmm` on PATH and sets EXTERIOR_REPO); anywhere else they fail loudly.

mod boot;
mod common;
mod debian;
mod disk;
mod hostile;
mod image;
mod instance;
mod net;
mod recovery;
mod redirect;
mod smp;
