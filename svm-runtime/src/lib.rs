//! svm-runtime: what runs inside the SVM.
//!
//! - [`protocol`]: the framed wire format spoken between the VMM and the in-SVM agent
//!   (over the SVM's second serial port) and between `exterior-vmm` clients and a running
//!   instance (over its control socket).
//! - `exterior-agent` (binary): started by the SVM's /init; runs the commands the VMM
//!   sends (`exterior-vmm exec`/`shell`) and streams their output and exit status back.
//! - [`redirect_abi`]: the port and registers of one redirected system call (SVM program ⇄
//!   VMM).
//! - `policy` (x86-64): which system calls of a diverted program run in the GVM; used by the
//!   preload shim (`svm-runtime/shim/`, `libexterior_shim.so`).

#![deny(missing_docs)]

pub mod protocol;
pub mod redirect_abi;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod policy;
