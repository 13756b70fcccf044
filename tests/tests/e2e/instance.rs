//! Instances: a GVM and its SVM in one VMM process, driven by name (`run --name --detach`,
//! `list`, `exec`, `console`, `stop`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::*;

/// A private runtime directory for one test, so tests cannot see each other's instances.
pub fn runtime(tag: &str) -> PathBuf {
    scratch_dir(tag).join("run")
}

pub fn vmm_in(rt: &Path) -> Command {
    let mut cmd = vmm();
    cmd.env("EXTERIOR_RUNTIME_DIR", rt);
    cmd
}

/// A running instance; stopped (or killed) when dropped, so a failing test does not leave
/// it running and starving the tests after it.
pub struct Instance {
    rt: PathBuf,
    name: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let lock = self.rt.join(format!("{}.lock", self.name));
        if !lock.exists() {
            return;
        }
        let stopped = vmm_in(&self.rt)
            .args(["stop", &self.name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !stopped {
            if let Ok(pid) = std::fs::read_to_string(&lock) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[must_use]
pub fn start(rt: &Path, name: &str, extra: &[&str]) -> Instance {
    let (code, _, err) = run(vmm_in(rt)
        .args(["run", "--name", name, "--detach", "--mem", "256M"])
        .args(extra));
    assert_eq!(code, 0, "instance did not start: {err}");
    Instance {
        rt: rt.to_path_buf(),
        name: name.to_string(),
    }
}

fn pid_of(rt: &Path, name: &str) -> i32 {
    std::fs::read_to_string(rt.join(format!("{name}.lock")))
        .expect("lock file")
        .trim()
        .parse()
        .expect("pid in lock file")
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn an_instance_runs_stock_commands_in_its_svm_and_stops_cleanly() {
    let rt = runtime("lifecycle");
    let _instance = start(&rt, "life", &[]);
    let pid = pid_of(&rt, "life");

    let (code, out, _) = run(vmm_in(&rt).arg("list"));
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("life\t")), "list: {out}");

    let (code, out, err) = run(vmm_in(&rt).args(["exec", "life", "--", "uname", "-r"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), kernel_release());

    let (code, _, _) = run(vmm_in(&rt).args(["exec", "life", "--", "false"]));
    assert_eq!(code, 1);
    let (code, out, err) = run(vmm_in(&rt).args([
        "exec",
        "life",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 7",
    ]));
    assert_eq!((code, out.trim(), err.trim()), (7, "to-out", "to-err"));

    // The SVM's tools are the distribution's, not busybox applets.
    let (code, out, _) = run(vmm_in(&rt).args(["exec", "life", "--", "ps", "--version"]));
    assert_eq!(code, 0);
    assert!(out.contains("procps-ng"), "{out}");
    let (code, out, _) = run(vmm_in(&rt).args(["exec", "life", "--", "ls", "--version"]));
    assert_eq!(code, 0);
    assert!(out.contains("GNU coreutils"), "{out}");
    // Commands are redirected to the GVM's kernel unless --local: the hostname is the one
    // the GVM's init sets (once it has booted), the SVM's own only with --local.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let (code, out, err) = run(vmm_in(&rt).args(["exec", "life", "--", "hostname"]));
        assert_eq!(code, 0, "{err}");
        if out.trim() == "gvm" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the redirected hostname never became the GVM's: {out}"
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let (code, out, _) = run(vmm_in(&rt).args(["exec", "life", "--local", "--", "hostname"]));
    assert_eq!((code, out.trim()), (0, "svm"));

    // The GVM (a shell waiting on its console) can be held at a safe point — its vCPU
    // halted or in user mode, never inside the kernel — and released.
    let (code, out, err) = run(vmm_in(&rt).args(["quiesce", "life"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("quiesced in "), "{out}");
    assert!(
        out.contains("vCPU 0 halted") || out.contains("vCPU 0 in user mode"),
        "{out}"
    );
    assert!(!out.contains("in the kernel"), "{out}");

    // `shell` gives bash on a terminal in the SVM; here its input is piped.
    let (code, text, _) = run_with_stdin(
        vmm_in(&rt).args(["shell", "life"]),
        Some(b"tty && echo shell-says-$((6*7)); exit 3\n"),
    );
    assert_eq!(code, 3, "shell exit status");
    assert!(text.contains("shell-says-42"), "{text}");
    assert!(text.contains("/dev/pts/"), "not on a terminal: {text}");

    let (code, _, err) = run(vmm_in(&rt).args(["stop", "life"]));
    assert_eq!(code, 0, "{err}");
    assert!(!alive(pid), "the VMM process is still there");
    assert!(!rt.join("life.sock").exists(), "socket left behind");
    assert!(!rt.join("life.lock").exists(), "lock left behind");
    let (_, out, _) = run(vmm_in(&rt).arg("list"));
    assert!(!out.contains("life"), "list after stop: {out}");
    let (code, _, err) = run(vmm_in(&rt).args(["exec", "life", "--", "true"]));
    assert_eq!(code, 2);
    assert!(err.contains("no running instance named life"), "{err}");
}

#[test]
fn the_gvm_gets_one_spare_possible_cpu_and_its_console_can_be_read() {
    let rt = runtime("possible");
    let _instance = start(
        &rt,
        "cpus",
        &[
            "--cpus",
            "1",
            "--append",
            r#"exterior_run="echo possible=$(cat /sys/devices/system/cpu/possible) online=$(cat /sys/devices/system/cpu/online); sleep 3600""#,
        ],
    );
    // The GVM prints its line early in boot; the console backlog holds it.
    let mut seen = String::new();
    for _ in 0..60 {
        let (code, out, _) = run(vmm_in(&rt)
            .args(["console", "cpus"])
            .stdin(std::process::Stdio::null()));
        assert_eq!(code, 0);
        seen = out;
        if seen.contains("possible=") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    assert!(seen.contains("possible=0-1 online=0"), "console: {seen}");
    let (code, out, _) = run(vmm_in(&rt)
        .args(["console", "cpus", "--svm"])
        .stdin(std::process::Stdio::null()));
    assert_eq!(code, 0);
    assert!(
        out.contains("exterior-agent: serving on /dev/ttyS1"),
        "SVM console: {out}"
    );
    assert_eq!(run(vmm_in(&rt).args(["stop", "cpus"])).0, 0);
}

#[test]
fn names_are_unique_and_a_killed_instance_can_be_replaced() {
    let rt = runtime("names");
    let first = start(&rt, "dup", &[]);
    let (code, _, err) = run(vmm_in(&rt).args(["run", "--name", "dup", "--detach"]));
    assert_eq!(code, 2);
    assert!(err.contains("already running"), "{err}");

    let pid = pid_of(&rt, "dup");
    // SIGKILL: no chance to clean up.
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!alive(pid));
    std::mem::forget(first); // already dead; its guard must not touch the new one
    let _second = start(&rt, "dup", &[]);
    let (code, out, _) = run(vmm_in(&rt).args(["exec", "dup", "--", "echo", "again"]));
    assert_eq!((code, out.trim()), (0, "again"));
    assert_eq!(run(vmm_in(&rt).args(["stop", "dup"])).0, 0);
}
