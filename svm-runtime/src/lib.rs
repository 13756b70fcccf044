//! svm-runtime: what runs inside the SVM.
//!
//! - [`protocol`]: the framed wire format spoken between the VMM and the in-SVM agent
//!   (over the SVM's second serial port) and between `exterior-vmm` clients and a running
//!   instance (over its control socket).
//! - `exterior-agent` (binary): started by the SVM's /init; runs the commands the VMM
//!   sends (`exterior-vmm exec`/`shell`) and streams their output and exit status back.

pub mod protocol;
