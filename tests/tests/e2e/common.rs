//! Helpers shared by the end-to-end tests.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// How long one exterior-vmm command may take before the test gives up on it. Nested
/// TCG guests boot in 10-40 s; several minutes means the guest or L1 is wedged.
/// EXTERIOR_E2E_DEADLINE (seconds) overrides.
fn deadline() -> Duration {
    let secs = std::env::var("EXTERIOR_E2E_DEADLINE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs a command to completion and returns (status code, stdout, stderr), printing both
/// so a failing test shows what the guest said. A command that outlives `deadline()` is
/// killed and fails the test with what it printed so far and where its threads were
/// waiting, instead of wedging the whole suite.
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    run_with_stdin(cmd, None)
}

/// `run`, with `input` written to the command's stdin (then closed).
pub fn run_with_stdin(cmd: &mut Command, input: Option<&[u8]>) -> (i32, String, String) {
    let (code, stdout, stderr) = run_within(cmd, input, deadline());
    println!("--- {cmd:?}\n--- status {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    (code, stdout, stderr)
}

/// Runs a command with `input` on its stdin (or none) and returns (status code, stdout,
/// stderr) without printing them; -1 for a death by signal. A command still running after
/// `limit` is killed and fails the test, with what it printed and where it waited.
pub fn run_within(
    cmd: &mut Command,
    input: Option<&[u8]>,
    limit: Duration,
) -> (i32, String, String) {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    // Written from a thread: a command that does not read its input must not block the
    // test past its deadline.
    let feeder = input.map(|input| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break Some(status);
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        let where_ = thread_states(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        panic!(
            "{cmd:?} did not finish within {limit:?}; killed it.\n--- its threads\n{where_}\
             --- stdout so far\n{out}\n--- stderr so far\n{err}\n--- kernel log (tail)\n{}",
            kernel_log_tail()
        );
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    (status.code().unwrap_or(-1), stdout, stderr)
}

/// What a guest kernel prints when something went wrong in it: an oops, a BUG or WARN
/// (with its "cut here" line), a panic, a general protection fault, and the `INFO:`
/// reports of RCU stalls and hung tasks.
const KERNEL_TROUBLE: [&str; 8] = [
    "Oops",
    "BUG:",
    "WARNING:",
    "INFO:",
    "Kernel panic",
    "cut here",
    "general protection",
    "Call Trace",
];

/// Kernel warnings every guest boot prints in the nested test harness, matched by the
/// exact kernel source line: `XSAVE consistency problem: size 832 != kernel_size 576`
/// (CPUID leaf 0xD's total XSAVE size disagrees with the sum of its feature sizes, as L1's
/// KVM reports them under QEMU TCG). Not yet traced to its source (docs/LIMITS.md); no
/// other warning is excused.
const KNOWN_HARNESS_WARNINGS: [&str; 1] =
    ["WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 fpu__init_system_xstate"];

/// `console` without the WARN reports (from "cut here" to "end trace") that hold one of
/// [`KNOWN_HARNESS_WARNINGS`].
fn without_known_harness_warnings(console: &str) -> String {
    let mut kept = String::new();
    let mut block: Option<String> = None;
    for line in console.lines() {
        if line.contains("------------[ cut here ]------------") {
            if let Some(open) = block.take() {
                kept.push_str(&open);
            }
            block = Some(String::new());
        }
        match block.as_mut() {
            Some(open) => {
                open.push_str(line);
                open.push('\n');
                if line.contains("---[ end trace") {
                    let report = block.take().unwrap_or_default();
                    if !KNOWN_HARNESS_WARNINGS.iter().any(|w| report.contains(w)) {
                        kept.push_str(&report);
                    }
                }
            }
            None => {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    kept.push_str(&block.unwrap_or_default());
    kept
}

/// Fails the test when `console` (a guest's whole console) shows any sign of kernel
/// trouble, but for [`KNOWN_HARNESS_WARNINGS`]; `what` names the console in the message.
pub fn assert_clean_console(what: &str, console: &str) {
    let console = without_known_harness_warnings(console);
    for bad in KERNEL_TROUBLE {
        assert!(!console.contains(bad), "{what} shows {bad:?}:\n{console}");
    }
}

/// The part of a guest console log after the kernel started its init (what the kernel
/// prints before that is the same on every boot). Fails when init never ran.
pub fn after_init<'a>(what: &str, console: &'a str) -> &'a str {
    match console.split_once("Run /init") {
        Some((_, rest)) => rest,
        None => panic!("{what}: the kernel never ran /init:\n{console}"),
    }
}

/// A token no guest prints unless told to: the test's own process id and a counter, so a
/// test can tell output a command computed from text the kernel echoed.
pub fn nonce() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:04x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads a pipe to its end on a thread, so a chatty guest never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// One line per thread of `pid`: name, state and kernel wait channel, for a hang report.
pub fn thread_states(pid: u32) -> String {
    let mut report = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(no /proc entry)\n".into();
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let state = read("status")
            .lines()
            .filter(|l| l.starts_with("Name:") || l.starts_with("State:"))
            .collect::<Vec<_>>()
            .join(" ");
        report.push_str(&format!(
            "{}: {state} wchan={} stack:\n{}\n",
            task.file_name().to_string_lossy(),
            read("wchan"),
            read("stack")
        ));
    }
    report
}

/// The last lines of the host (L1) kernel log: soft lockups and KVM complaints show here.
fn kernel_log_tail() -> String {
    Command::new("dmesg")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        })
        .unwrap_or_else(|e| format!("(dmesg: {e})"))
}

/// Runs `sh -c SCRIPT` in the network namespace of `pid`; (status, stdout).
pub fn in_ns(pid: u32, script: &str) -> (i32, String) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("run nsenter");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "--- in ns: {script}\n--- status {:?}\n{stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// Waits until `cond` holds, polling every 200 ms, or fails the test naming `what`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `exterior-vmm` in a network namespace of its own (`unshare -n`): its taps, and all
/// their traffic, stay between the guest and that namespace.
pub fn vmm_in_own_netns() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.arg("-n")
        .arg(which("exterior-vmm"))
        .env("EXTERIOR_IMAGES", images());
    cmd
}

/// Waits until `vmm` (started by [`vmm_in_own_netns`]) has made `tap`; fails at once if
/// the VMM ended first.
pub fn wait_for_tap(vmm: &mut KillOnDrop, tap: &str) {
    let pid = vmm.0.id();
    wait_for("the VMM's tap", Duration::from_secs(60), || {
        if let Some(status) = vmm.0.try_wait().expect("wait for the VMM") {
            panic!("the VMM ended ({status}) before it made its tap {tap}");
        }
        in_ns(pid, &format!("ip link show {tap}")).0 == 0
    });
}

/// The namespace's end of `tap`: 10.0.2.1/24 and up (the guests are 10.0.2.15), with the
/// namespace's loopback up.
pub fn address_namespace_end(pid: u32, tap: &str) {
    let (code, _) = in_ns(
        pid,
        &format!("ip link set lo up && ip addr add 10.0.2.1/24 dev {tap} && ip link set {tap} up"),
    );
    assert_eq!(code, 0, "cannot address the namespace's end of {tap}");
}

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The full path of `name` on PATH (`unshare` execs it, and the tests' PATH is set by
/// tools/kvm-run).
pub fn which(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not on PATH"))
}
