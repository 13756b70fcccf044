//! How the host's KVM translates guest memory: two-dimensional paging (Intel EPT, AMD NPT)
//! or shadow paging. The redirect engine keeps its view's tables across calls only where
//! it knows what that means for cached translations (`executor/engine.rs`).

/// The host KVM's MMU, as its module parameters say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMmu {
    /// Shadow paging: KVM caches guest page tables in shadow pages, which a new CR3 (a new
    /// root) never reuses stale.
    Shadow,
    /// EPT or NPT: the guest's own translations are cached in the TLB, tagged by PCID.
    Tdp,
    /// Neither module's parameter could be read.
    Unknown,
}

impl HostMmu {
    /// Reads `/sys/module/kvm_intel/parameters/ept` and `/sys/module/kvm_amd/parameters/npt`.
    pub fn detect() -> HostMmu {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Self::from_params(
            read("/sys/module/kvm_intel/parameters/ept").as_deref(),
            read("/sys/module/kvm_amd/parameters/npt").as_deref(),
        )
    }

    /// The MMU from the two parameters' texts (a bool prints `Y`/`N`, an int `1`/`0`).
    pub fn from_params(ept: Option<&str>, npt: Option<&str>) -> HostMmu {
        let on = |text: Option<&str>| match text.map(str::trim) {
            Some("Y" | "y" | "1") => Some(true),
            Some("N" | "n" | "0") => Some(false),
            _ => None,
        };
        match (on(ept), on(npt)) {
            (Some(true), _) | (_, Some(true)) => HostMmu::Tdp,
            (Some(false), _) | (_, Some(false)) => HostMmu::Shadow,
            (None, None) => HostMmu::Unknown,
        }
    }

    /// Its name in `info` (`redirect_host_mmu`).
    pub fn name(self) -> &'static str {
        match self {
            HostMmu::Shadow => "shadow",
            HostMmu::Tdp => "tdp",
            HostMmu::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mmu_follows_whichever_vendor_module_is_loaded() {
        assert_eq!(HostMmu::from_params(Some("Y\n"), None), HostMmu::Tdp);
        assert_eq!(HostMmu::from_params(None, Some("1\n")), HostMmu::Tdp);
        assert_eq!(HostMmu::from_params(None, Some("0\n")), HostMmu::Shadow);
        assert_eq!(HostMmu::from_params(Some("N\n"), None), HostMmu::Shadow);
        assert_eq!(HostMmu::from_params(None, None), HostMmu::Unknown);
        assert_eq!(HostMmu::from_params(Some("?"), Some("")), HostMmu::Unknown);
    }
}
