//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The repository root, as set by tools/kvm-run. Panics (fails the test) when the suite is
/// run any other way: these tests must never pass by not running.
pub fn repo() -> PathBuf {
    match std::env::var_os("EXTERIOR_REPO") {
        Some(dir) if std::env::var_os("EXTERIOR_KVM_RUN").is_some() => PathBuf::from(dir),
        _ => panic!(
            "the end-to-end suite needs a real KVM: run it with `tools/test` \
             (or `tools/kvm-run -- <test binary>`), not directly"
        ),
    }
}

/// The images built by tools/setup: vmlinux, bzImage, gvm.cpio, kernel.release.
pub fn images() -> PathBuf {
    repo().join("images")
}

/// The pinned kernel release, e.g. `6.1.0-50-cloud-amd64`.
pub fn kernel_release() -> String {
    std::fs::read_to_string(images().join("kernel.release"))
        .expect("images/kernel.release (run tools/setup)")
        .trim()
        .to_string()
}

/// `exterior-vmm` from PATH (tools/kvm-run puts the release build first).
pub fn vmm() -> Command {
    let mut cmd = Command::new("exterior-vmm");
    cmd.env("EXTERIOR_IMAGES", images());
    cmd
}

/// A fresh, empty scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "exterior-e2e-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs a command to completion and returns (status code, stdout, stderr), printing both
/// so a failing test shows what the guest said.
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("spawn exterior-vmm");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    println!("--- {cmd:?}\n--- status {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    (status.code().unwrap_or(-1), stdout, stderr)
}
