//! Where the binary finds things on the host: the default images and the KVM device.
//! Shared by the verbs that boot guests (`run`, `kvm-probe`) and the boot benchmark.

use std::path::PathBuf;

/// Where the default images live: $EXTERIOR_IMAGES, else `images/` of the repository this
/// binary was built in (target/<profile>/exterior-vmm) if it holds a kernel. Never the
/// working directory: the images are trusted code, and an operator may well be standing in
/// a directory the guest's owner controls (an extracted disk, a case folder).
pub fn images_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("EXTERIOR_IMAGES") {
        return Some(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(repo) = exe
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.parent())
        {
            let candidate = repo.join("images");
            if candidate.join("vmlinux").exists() {
                return Some(candidate);
            }
        }
    }
    None
}

/// The KVM device: $EXTERIOR_KVM_DEVICE or /dev/kvm.
pub fn kvm_device() -> PathBuf {
    std::env::var_os("EXTERIOR_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}
