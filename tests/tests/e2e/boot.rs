//! Booting stock guests: the issue's end-to-end claims for `exterior-vmm run`.

use super::common::*;

#[test]
fn run_prints_kernel_version_and_cpu_count() {
    let (code, out, err) = run(vmm().args([
        "run",
        "--append",
        r#"exterior_run="cat /proc/version; grep -c processor /proc/cpuinfo""#,
        "--cpus",
        "2",
    ]));
    assert_eq!(code, 0, "stderr: {err}");
    let release = kernel_release();
    assert!(
        out.contains(&format!("Linux version {release}")),
        "no kernel version in output"
    );
    assert!(
        out.lines().any(|l| l.trim() == "2"),
        "the guest did not count 2 processors"
    );
    assert!(out.contains("exterior_run: exit status 0"));
}

#[test]
fn a_panicking_guest_makes_run_fail_with_the_panic_visible() {
    let (code, out, err) = run(vmm().args([
        "run",
        "--append",
        r#"exterior_run="echo c > /proc/sysrq-trigger""#,
    ]));
    assert_eq!(code, 1, "a guest panic must be a failure");
    assert!(
        out.contains("Kernel panic - not syncing"),
        "panic not on the console"
    );
    assert!(err.contains("guest kernel panicked"), "stderr: {err}");
}

#[test]
fn bzimage_boots_too_with_console_to_file() {
    let dir = scratch_dir("bzimage");
    let console = dir.join("console.log");
    let (code, out, err) = run(vmm().args([
        "run",
        "--kernel",
        images().join("bzImage").to_str().unwrap(),
        "--initrd",
        images().join("gvm.cpio").to_str().unwrap(),
        "--mem",
        "256M",
        "--console",
        console.to_str().unwrap(),
        "--append",
        r#"exterior_run="echo hello-from-bzimage""#,
    ]));
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        !out.contains("hello-from-bzimage"),
        "console went to stdout"
    );
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("hello-from-bzimage"));
}

#[test]
fn the_guest_sees_the_memory_it_was_given() {
    let (code, out, err) = run(vmm().args([
        "run",
        "--mem",
        "3328M",
        "--append",
        r#"exterior_run="grep MemTotal /proc/meminfo""#,
    ]));
    assert_eq!(code, 0, "stderr: {err}");
    let kib: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal line");
    // RAM above the 3 GiB MMIO hole must be found too: more than 3 GiB total.
    assert!(kib > 3 << 20, "MemTotal {kib} kB");
}
