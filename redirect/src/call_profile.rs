//! What a redirected call needs to know about the trusted kernel, derived once from its
//! profile: the shadow task's layout, the per-cpu words a lent CPU changes, where the traps
//! go, and where loaded modules are listed (to name the module a fault hit).

use thiserror::Error;

use crate::lend::PerCpuOffsets;
use crate::profile::KernelProfile;
use crate::shadow::{ShadowError, ShadowLayout};
use crate::traps::{self, ModuleLayout, Placed, TrapError};

/// Why calls cannot run on this kernel.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CallProfileError {
    /// The shadow task's layout is incomplete.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// A required trap has no function.
    #[error(transparent)]
    Trap(#[from] TrapError),
}

/// The call-time profile of the trusted kernel.
#[derive(Debug, Clone)]
pub struct CallProfile {
    /// The kernel profile it was derived from.
    pub kernel: KernelProfile,
    /// Field offsets of the shadow task.
    pub shadow: ShadowLayout,
    /// The per-cpu words a lent CPU changes.
    pub percpu: PerCpuOffsets,
    /// Every trap the kernel's symbols let us place.
    pub traps: Vec<Placed>,
    /// Where loaded modules are listed, to name the one an address falls in.
    pub modules: Option<ModuleLayout>,
    /// What works less well on this kernel, for the log.
    pub warnings: Vec<String>,
}

impl CallProfile {
    /// Derives the call-time profile; what is missing but not needed becomes a warning.
    pub fn new(kernel: KernelProfile) -> Result<CallProfile, CallProfileError> {
        let shadow = ShadowLayout::from_profile(&kernel)?;
        let (traps, absent) = traps::place(&kernel.kallsyms)?;
        let mut warnings: Vec<String> = absent
            .iter()
            .map(|name| format!("the SVM's kallsyms has no {name}; that trap is not set"))
            .collect();
        if kernel.symbols.stack_canary.is_none() {
            warnings.push(
                "kernel BTF has no fixed_percpu_data.stack_canary; calls that sleep keep \
                 whatever canary the lent CPU has when resumed"
                    .into(),
            );
        }
        let modules = ModuleLayout::from_profile(&kernel);
        if modules.is_none() {
            warnings.push(
                "cannot locate the GVM's module list; faults in modules are reported without \
                 the module's name"
                    .into(),
            );
        }
        Ok(CallProfile {
            percpu: PerCpuOffsets::from_symbols(&kernel.symbols),
            kernel,
            shadow,
            traps,
            modules,
            warnings,
        })
    }
}
