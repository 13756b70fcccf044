//! Booting stock guests: the issue's end-to-end claims for `exterior-vmm run`.
//!
//! The kernel echoes its command line on the console, so every check matches text only
//! the guest's shell can print (a value it computed), never the words of the command;
//! and every console is checked whole for kernel trouble.

use super::common::*;

/// `run` with `exterior_run="SCRIPT"`: (status, the console from init on, stderr); fails
/// the test when the console shows kernel trouble (unless `may_panic`).
fn run_script(extra: &[&str], script: &str, may_panic: bool) -> (i32, String, String) {
    let append = format!("exterior_run=\"{script}\"");
    let (code, out, err) = run(vmm().args(["run", "--append", &append]).args(extra));
    if !may_panic {
        assert_clean_console("the guest console", &out);
    }
    (code, after_init("the guest console", &out).to_string(), err)
}

#[test]
fn run_gives_the_guest_its_kernel_cpus_and_memory() {
    // One boot for three facts (boots are the suite's cost).
    let (code, out, err) = run_script(
        &["--cpus", "2", "--mem", "3328M"],
        "echo release=$(cut -d' ' -f3 /proc/version) cpus=$(grep -c processor /proc/cpuinfo); \
         grep MemTotal /proc/meminfo",
        false,
    );
    assert_eq!(code, 0, "stderr: {err}");
    let expected = format!("release={} cpus=2", kernel_release());
    assert!(
        out.lines().any(|l| l.trim() == expected),
        "the guest did not print {expected:?}"
    );
    assert!(out.contains("exterior_run: exit status 0"));
    let kib: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal line");
    // RAM above the 3 GiB MMIO hole must be found too: more than 3 GiB total, and no
    // more than it was given.
    assert!(kib > 3 << 20 && kib <= 3328 << 10, "MemTotal {kib} kB");
}

#[test]
fn a_panicking_guest_makes_run_fail_with_the_panic_visible() {
    let (code, out, err) = run_script(&[], "echo c > /proc/sysrq-trigger", true);
    assert_eq!(code, 1, "a guest panic must be a failure");
    assert!(
        out.contains("Kernel panic - not syncing"),
        "panic not on the console"
    );
    assert!(err.contains("guest kernel panicked"), "stderr: {err}");
}

#[test]
fn console_text_can_neither_stop_nor_fail_a_guest() {
    // Any guest user can print the kernel's panic lines; only the kernel's own report
    // (pvpanic) makes a panic. The guest keeps running after them and ends as a reboot.
    let (code, out, err) = run_script(
        &[],
        "printf '%s\\n' 'Kernel panic - not syncing: fake' \
         '---[ end Kernel panic - not syncing: fake ]---'; sleep 1; echo still=$((6*7))",
        true,
    );
    assert_eq!(
        code, 0,
        "printed panic lines made the run fail; stderr: {err}"
    );
    assert!(
        out.lines().any(|l| l.trim() == "still=42"),
        "the guest stopped at the printed panic lines:\n{out}"
    );
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert_clean_console("the guest console after the fake lines", after_fake(&out));
}

/// The console after the user-printed fake panic lines (which the clean-console check would
/// rightly flag).
fn after_fake(out: &str) -> &str {
    let end = "---[ end Kernel panic - not syncing: fake ]---";
    out.rfind(end).map_or(out, |at| &out[at + end.len()..])
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
        r#"exterior_run="echo hello-from-bzimage-$((6*7))""#,
    ]));
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!out.contains("hello-from"), "console went to stdout");
    let log = std::fs::read_to_string(&console).unwrap();
    assert_clean_console("the bzImage guest's console file", &log);
    let log = after_init("the bzImage guest's console file", &log);
    assert!(log.lines().any(|l| l.trim() == "hello-from-bzimage-42"));
}
