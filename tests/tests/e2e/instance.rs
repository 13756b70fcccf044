//! Instances: a GVM and its SVM in one VMM process, driven by name (`run --name --detach`,
//! `list`, `exec`, `console`, `stop`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
/// it running and starving the tests after it. Dropped in a test that has not failed, it
/// also checks the instance's logs: neither guest's console may show kernel trouble after
/// its init started, and the VMM must not have panicked.
pub struct Instance {
    rt: PathBuf,
    name: String,
}

/// How long the guard's `stop` may take before the instance is killed instead.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

impl Instance {
    fn log(&self, kind: &str) -> String {
        let path = self.rt.join(format!("{}.{kind}.log", self.name));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The checks of a clean run (see the type's comment): the GVM's whole console, the
    /// SVM's console (it boots `quiet`, so it shows only errors; the running SVM's whole
    /// kernel log is checked by [`Instance::assert_svm_kernel_log_clean`]) with its agent
    /// started, and a VMM log without a panic.
    pub(super) fn assert_logs_clean(&self) {
        assert_clean_console("the GVM's console", &self.log("gvm"));
        let svm = self.log("svm");
        assert!(
            svm.contains("exterior-agent: serving on"),
            "the SVM's agent never started:\n{svm}"
        );
        assert_clean_console("the SVM's console", &svm);
        let vmm = self.log("vmm");
        assert!(!vmm.contains("panicked"), "the VMM panicked:\n{vmm}");
    }

    /// The running SVM's kernel log (`dmesg`, which `quiet` keeps off its console), read
    /// without redirection: no warning, oops or BUG.
    fn assert_svm_kernel_log_clean(&self) {
        let (code, out, err) = run_within(
            vmm_in(&self.rt).args(["exec", &self.name, "--local", "--", "dmesg"]),
            None,
            STOP_DEADLINE,
        );
        assert_eq!(code, 0, "dmesg in the SVM failed: {err}");
        assert!(
            out.contains("Linux version"),
            "the SVM's dmesg is empty: {out}"
        );
        assert_clean_console("the SVM's kernel log", &out);
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: what the VMM and the GVM said last explains most failures,
            // and the engine's counters and phase times tell a slow call from a stuck one.
            let mut info = vmm_in(&self.rt);
            info.args(["info", &self.name]);
            let counters = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (code, out, err) = run_within(&mut info, None, Duration::from_secs(20));
                format!("{out}(status {code}) {err}")
            }))
            .unwrap_or_else(|_| "(info did not answer within 20 s)".into());
            eprintln!("--- info {}\n{counters}", self.name);
            // Where the VMM's threads wait, when it no longer answers.
            let lock = self.rt.join(format!("{}.lock", self.name));
            if let Some(pid) = std::fs::read_to_string(lock)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                eprintln!("--- the VMM's threads\n{}", thread_states(pid));
            }
            for kind in ["vmm", "gvm"] {
                let path = self.rt.join(format!("{}.{kind}.log", self.name));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                eprintln!(
                    "--- {} (last 60 lines)\n{}",
                    path.display(),
                    tail(&text, 60)
                );
            }
        }
        let lock = self.rt.join(format!("{}.lock", self.name));
        if lock.exists() && !std::thread::panicking() {
            self.assert_svm_kernel_log_clean();
        }
        if lock.exists() {
            let pid = std::fs::read_to_string(&lock).unwrap_or_default();
            let mut stop = vmm_in(&self.rt);
            stop.args(["stop", &self.name]);
            // A stop that hangs is killed by the deadline (a panic, caught here: the
            // instance is killed below either way).
            let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_within(&mut stop, None, STOP_DEADLINE).0 == 0
            }))
            .unwrap_or(false);
            if !stopped {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                if !std::thread::panicking() {
                    panic!(
                        "instance {} did not stop within {STOP_DEADLINE:?}",
                        self.name
                    );
                }
            }
        }
        if !std::thread::panicking() {
            self.assert_logs_clean();
        }
    }
}

#[must_use]
pub fn start(rt: &Path, name: &str, extra: &[&str]) -> Instance {
    start_with(
        rt,
        name,
        vmm_in(rt)
            .args(["run", "--name", name, "--detach", "--mem", "256M"])
            .args(extra),
    )
}

/// The instance `name` in runtime directory `rt`, started by `cmd` (a `run --name NAME
/// --detach` command line with that runtime directory, e.g. in a network namespace).
#[must_use]
pub fn start_with(rt: &Path, name: &str, cmd: &mut Command) -> Instance {
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "instance did not start: {err}");
    Instance {
        rt: rt.to_path_buf(),
        name: name.to_string(),
    }
}

pub(super) fn pid_of(rt: &Path, name: &str) -> i32 {
    std::fs::read_to_string(rt.join(format!("{name}.lock")))
        .expect("lock file")
        .trim()
        .parse()
        .expect("pid in lock file")
}

pub(super) fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn an_instance_runs_stock_commands_in_its_svm_and_stops_cleanly() {
    let rt = runtime("lifecycle");
    let _instance = start(&rt, "life", &[]);
    let pid = pid_of(&rt, "life");

    let (code, out, _) = run(vmm_in(&rt).arg("list"));
    assert_eq!(code, 0);
    assert_eq!(out, format!("life\tpid {pid}\n"), "list");
    let (code, out, _) = run(vmm_in(&rt).args(["list", "--json"]));
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("{{\"name\":\"life\",\"pid\":{pid}}}\n"),
        "list --json"
    );
    let (code, out, _) = run(vmm_in(&rt).args(["info", "life", "--json"]));
    assert_eq!(code, 0);
    assert!(
        out.starts_with('{')
            && out.trim_end().ends_with('}')
            && out.contains("\"name\":\"life\"")
            && out.contains(&format!("\"pid\":{pid},"))
            && out.contains("\"redirect_calls\":"),
        "info --json: {out}"
    );

    let (code, out, err) = run(vmm_in(&rt).args(["exec", "life", "--", "uname", "-r"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), kernel_release());

    // The SVM's kernel reports a panic to the VMM through pvpanic (console text decides
    // nothing): its driver is bound to the device the VMM describes.
    let (code, out, err) = run(vmm_in(&rt).args([
        "exec",
        "life",
        "--local",
        "--",
        "ls",
        "/sys/bus/platform/drivers/pvpanic-mmio",
    ]));
    assert_eq!(code, 0, "no pvpanic driver in the SVM: {err}");
    assert!(
        out.split_whitespace().any(|f| f.starts_with("QEMU0001:")),
        "the SVM's pvpanic driver has no device: {out}"
    );

    let (code, _, _) = run(vmm_in(&rt).args(["exec", "life", "--", "false"]));
    assert_eq!(code, 1);
    // A command killed by a signal exits 128+N, as a shell reports it (SIGTERM: 143).
    let (code, _, _) =
        run(vmm_in(&rt).args(["exec", "life", "--local", "--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(code, 128 + 15, "a command killed by SIGTERM");
    // A command that does not exist: 127 and the reason, as from a shell.
    let (code, _, err) = run(vmm_in(&rt).args(["exec", "life", "--", "no-such-tool"]));
    assert_eq!(code, 127);
    assert!(
        err.contains("no-such-tool: No such file or directory"),
        "{err}"
    );
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
        match out.trim() {
            "gvm" => break,
            // The GVM's kernel before its init named it: still the GVM's answer.
            "(none)" => {}
            other => panic!("the redirected hostname is not the GVM's: {other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the GVM's init never set its hostname"
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
    // ... and released: the GVM's shell answers on its console.
    let answer = super::redirect::GvmConsole::attach(&rt, "life").run("echo q-$((6*7))");
    assert_eq!(answer.trim(), "q-42", "the GVM does not run after quiesce");

    // `shell` gives bash on a terminal in the SVM; here its input is piped.
    let (code, text, _) = run_with_stdin(
        vmm_in(&rt).args(["shell", "life"]),
        Some(b"tty && echo shell-says-$((6*7)); exit 3\n"),
    );
    assert_eq!(code, 3, "shell exit status");
    assert!(text.contains("shell-says-42"), "{text}");
    assert!(text.contains("/dev/pts/"), "not on a terminal: {text}");

    // Piped `console` sessions that leave while the GVM is still printing: the writes to
    // them fail, and the instance goes on answering every client after them (one failed
    // write once left an instance answering none: `doomed` in instance/server.rs).
    for round in 0..3 {
        let ticks =
            format!("        for i in $(seq 12); do echo tick-{round}-$i; sleep 0.05; done\n");
        let (code, _, err) = run_within(
            vmm_in(&rt).args(["console", "life", "--idle-ms", "50"]),
            Some(ticks.as_bytes()),
            Duration::from_secs(60),
        );
        assert_eq!(code, 0, "console: {err}");
        let (code, out, err) = run_within(
            vmm_in(&rt).args(["info", "life"]),
            None,
            Duration::from_secs(60),
        );
        assert_eq!(
            code, 0,
            "info after a console session left mid-output: {err}"
        );
        assert!(out.contains("name=life\n"), "{out}");
    }
    wait_for("the GVM's last tick", Duration::from_secs(60), || {
        let (code, out, _) = run_within(
            vmm_in(&rt).args(["console", "life", "--idle-ms", "300"]),
            None,
            Duration::from_secs(60),
        );
        code == 0 && out.contains("tick-2-12\r\n")
    });

    // Nothing on the control socket waits on the guest. An operator holds the GVM
    // (`quiesce --hold`) and a redirected call waits inside the executor for it, as a
    // parked call would; meanwhile info answers within a second, both consoles show their
    // backlog, and stop (which also waits for the VMM to exit) ends it within five seconds,
    // not at the hold's end.
    const DEADLINE: Duration = Duration::from_secs(120);
    let info_before = run_within(vmm_in(&rt).args(["info", "life"]), None, DEADLINE);
    assert_eq!(info_before.0, 0, "{}", info_before.2);
    let calls = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("redirect_calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no redirect_calls in info:\n{text}"))
    };
    let calls_before = calls(&info_before.1);
    let held = {
        let rt = rt.clone();
        std::thread::spawn(move || {
            run_within(
                vmm_in(&rt).args(["quiesce", "life", "--hold", "30000"]),
                None,
                DEADLINE,
            )
        })
    };
    // Quiescing an idle GVM takes milliseconds; then the hold begins.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !held.is_finished(),
        "the 30 s hold ended early: {:?}",
        held.join()
    );
    let waiting = {
        let rt = rt.clone();
        std::thread::spawn(move || {
            run_within(
                vmm_in(&rt).args(["exec", "life", "--", "hostname"]),
                None,
                DEADLINE,
            )
        })
    };
    let answers_within = |limit: Duration, args: &[&str]| -> String {
        let started = std::time::Instant::now();
        let (code, out, err) = run_within(vmm_in(&rt).args(args), None, DEADLINE);
        let took = started.elapsed();
        assert_eq!(code, 0, "{args:?} while the GVM is held: {err}");
        assert!(took < limit, "{args:?} took {took:?} while the GVM is held");
        out
    };
    let answers_quickly = |args: &[&str]| answers_within(Duration::from_secs(1), args);
    let mut polls = 0;
    while calls(&answers_quickly(&["info", "life"])) == calls_before {
        polls += 1;
        assert!(
            polls < 50,
            "the redirected hostname never reached the executor"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!held.is_finished() && !waiting.is_finished());
    // A piped `console` prints what comes until 2 s of quiet: the backlog must come in the
    // first second, or it would leave with nothing.
    let console_limit = Duration::from_secs(3);
    let gvm_console = answers_within(console_limit, &["console", "life"]);
    assert!(gvm_console.contains("q-42"), "{gvm_console}");
    let svm_console = answers_within(console_limit, &["console", "life", "--svm"]);
    assert!(
        svm_console.contains("exterior-agent: serving on"),
        "{svm_console}"
    );
    assert!(!held.is_finished() && !waiting.is_finished());
    answers_within(Duration::from_secs(5), &["stop", "life"]);
    // The hold and the waiting call end with the instance, not at the end of the hold.
    let (held, waiting) = (held.join(), waiting.join());
    assert!(held.is_ok() && waiting.is_ok(), "{held:?} {waiting:?}");
    assert!(!alive(pid), "the VMM process is still there");
    assert!(!rt.join("life.sock").exists(), "socket left behind");
    assert!(!rt.join("life.lock").exists(), "lock left behind");
    // list printed the instance while it ran (above); now it prints nothing at all.
    let (code, out, _) = run(vmm_in(&rt).arg("list"));
    assert_eq!((code, out.as_str()), (0, ""), "list after stop");
    let (code, _, err) = run(vmm_in(&rt).args(["exec", "life", "--", "true"]));
    assert_eq!(code, 2);
    assert!(err.contains("no running instance named life"), "{err}");
}

#[test]
fn names_are_unique_and_a_killed_instance_can_be_replaced() {
    let rt = runtime("names");
    let first = start(&rt, "dup", &[]);
    let (code, _, err) = run(vmm_in(&rt).args(["run", "--name", "dup", "--detach"]));
    assert_eq!(code, 2);
    assert!(err.contains("already running"), "{err}");

    let pid = pid_of(&rt, "dup");
    // A command is running in the instance when its VMM dies: `exec` cannot finish it
    // and says so with status 255.
    let mut exec = vmm_in(&rt)
        .args([
            "exec",
            "dup",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut exec_out = std::io::BufReader::new(exec.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut exec_out, &mut line).expect("read exec's output");
    assert_eq!(
        line.trim(),
        "started",
        "the command did not start in the SVM"
    );
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = exec.try_wait().expect("wait for exec") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = exec.kill();
            panic!("exec did not end after its instance was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut exec.stderr.take().expect("piped stderr"), &mut err)
        .expect("read exec's stderr");
    assert_eq!(status.code(), Some(255), "exec of a killed instance: {err}");
    assert!(err.contains("exterior-vmm: error:"), "{err}");
    // Already dead: its logs are checked now (the new instance's replace them), and its
    // guard must not touch the new one.
    first.assert_logs_clean();
    std::mem::forget(first);
    let _second = start(&rt, "dup", &[]);
    let (code, out, _) = run(vmm_in(&rt).args(["exec", "dup", "--", "echo", "again"]));
    assert_eq!((code, out.trim()), (0, "again"));
    assert_eq!(run(vmm_in(&rt).args(["stop", "dup"])).0, 0);
}
