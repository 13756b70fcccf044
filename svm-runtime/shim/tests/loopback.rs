//! Stock host tools under `LD_PRELOAD=libexterior_shim.so` in loopback mode: every call is
//! diverted and classified and every redirected one runs locally through the shim's fd
//! tracking, so the output must equal the output without the shim.
//!
//! The cdylib is the one cargo built for this test run (`<target>/<profile>/`, next to the
//! `deps/` folder holding this test binary).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shim() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_shim).clone()
}

/// Cargo does not build a cdylib-only package for its integration tests, so build it here,
/// with the cargo, target dir and profile that built this test.
fn build_shim() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .args(["build", "--quiet", "-p", "exterior-shim", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(other) => {
            cargo.args(["--profile", other]);
        }
        None => {}
    }
    let status = cargo.status().expect("run cargo");
    assert!(status.success(), "{cargo:?}: {status}");
    let so = profile_dir.join("libexterior_shim.so");
    assert!(so.is_file(), "{} is missing after {cargo:?}", so.display());
    so
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Loopback,
    LoopbackStats,
    Off,
}

fn command(mode: Mode, argv: &[&str]) -> Command {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in [
        "LD_PRELOAD",
        "EXTERIOR_SHIM_OFF",
        "EXTERIOR_SHIM_LOOPBACK",
        "EXTERIOR_SHIM_STATS",
    ] {
        c.env_remove(v);
    }
    if mode != Mode::Plain {
        c.env("LD_PRELOAD", shim());
    }
    match mode {
        Mode::Plain => {}
        Mode::Loopback => {
            c.env("EXTERIOR_SHIM_LOOPBACK", "1");
        }
        Mode::LoopbackStats => {
            c.env("EXTERIOR_SHIM_LOOPBACK", "1")
                .env("EXTERIOR_SHIM_STATS", "1");
        }
        Mode::Off => {
            c.env("EXTERIOR_SHIM_OFF", "1")
                .env("EXTERIOR_SHIM_STATS", "1");
        }
    }
    c
}

/// Runs to completion (reading its output meanwhile), killing the child after a minute: a
/// hang must fail, not block CI.
fn wait(mut c: Command) -> Output {
    let child = c.spawn().expect("spawn");
    let pid = i32::try_from(child.id()).expect("pid");
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let hung = watch.recv_timeout(Duration::from_secs(60)).is_err();
        if hung {
            // SAFETY: signals our own child, not yet reaped (the main thread reaps it only
            // after it exits, and then tells us before we time out).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        hung
    });
    let out = child.wait_with_output().expect("output");
    let _ = done.send(());
    assert!(!watchdog.join().expect("watchdog"), "{c:?} hung");
    out
}

fn run(mode: Mode, argv: &[&str]) -> Output {
    wait(command(mode, argv))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Same stdout and a successful exit, with and without the shim.
fn same(argv: &[&str]) {
    let plain = run(Mode::Plain, argv);
    let shim = run(Mode::Loopback, argv);
    assert!(
        plain.status.success(),
        "{argv:?} failed without the shim: {plain:?}"
    );
    assert!(
        shim.status.success(),
        "{argv:?} failed under the shim: {:?}\n{}",
        shim.status,
        String::from_utf8_lossy(&shim.stderr)
    );
    assert!(!plain.stdout.is_empty(), "{argv:?} printed nothing");
    assert_eq!(stdout(&shim), stdout(&plain), "{argv:?}");
}

/// (redirected, local) from the `EXTERIOR_SHIM_STATS` line of the process itself (the last
/// one: children print theirs first).
fn stats(o: &Output) -> Option<(u64, u64)> {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err.lines().rfind(|l| l.starts_with("exterior-shim: "))?;
    let mut n = line.split(['=', ' ']).filter_map(|w| w.parse::<u64>().ok());
    Some((n.next()?, n.next()?))
}

#[test]
fn cat_proc_version() {
    same(&["cat", "/proc/version"]);
}

#[test]
fn uname_n() {
    same(&["uname", "-n"]);
    same(&["uname", "-a"]);
}

#[test]
fn shell_pipeline() {
    same(&[
        "sh",
        "-c",
        "cat /proc/version | head -c 30; echo; uname -n | tr a-z A-Z; \
         wc -l < /proc/cpuinfo; (cat /proc/sys/kernel/ostype)",
    ]);
}

#[test]
fn shell_builtin_reads_a_redirected_fd_through_dup() {
    // The shell opens the file (a placeholder), dups it onto fd 0 and reads it itself.
    same(&["sh", "-c", "read x < /proc/sys/kernel/ostype; echo \"[$x]\"; exec 3</proc/version; read y <&3; echo ${y%% *}"]);
}

#[test]
fn ls_proc() {
    let non_pids = |o: &Output| -> Vec<String> {
        stdout(o)
            .lines()
            .filter(|l| !l.bytes().all(|b| b.is_ascii_digit()))
            .map(String::from)
            .collect()
    };
    let plain = run(Mode::Plain, &["ls", "/proc"]);
    let shim = run(Mode::Loopback, &["ls", "/proc"]);
    assert!(shim.status.success(), "{shim:?}");
    assert!(non_pids(&plain).contains(&"version".to_string()));
    assert_eq!(non_pids(&shim), non_pids(&plain));
    assert!(
        stdout(&shim).lines().any(|l| l == "1"),
        "no pid 1 in {}",
        stdout(&shim)
    );
}

#[test]
fn ps_lists_the_same_processes() {
    assert!(
        have("ps"),
        "no ps on this host: tools/setup installs procps (apt-get install procps)"
    );
    let mut c = command(Mode::Loopback, &["ps", "-eo", "pid,comm"]);
    let child = c.spawn().expect("spawn ps");
    let pid = child.id();
    let shim = child.wait_with_output().expect("ps output");
    let plain = run(Mode::Plain, &["ps", "-eo", "pid,comm"]);
    assert!(shim.status.success(), "{shim:?}");
    let (s, p) = (stdout(&shim), stdout(&plain));
    assert_eq!(s.lines().next(), p.lines().next(), "header");
    let line_of = |out: &str, pid: u32| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
            .map(String::from)
    };
    assert_eq!(line_of(&s, 1), line_of(&p, 1), "pid 1");
    assert!(line_of(&s, 1).is_some());
    let me = line_of(&s, pid).unwrap_or_else(|| panic!("ps did not list itself ({pid}):\n{s}"));
    assert!(me.ends_with(" ps"), "{me}");
    let own = std::process::id();
    assert!(
        line_of(&s, own).is_some() && line_of(&p, own).is_some(),
        "the test process"
    );
}

#[test]
fn proc_self_stays_local() {
    let mut c = command(Mode::Loopback, &["head", "-c", "100", "/proc/self/status"]);
    let child = c.spawn().expect("spawn head");
    let pid = child.id();
    let o = child.wait_with_output().expect("head output");
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(out.starts_with("Name:\thead\n"), "{out}");
    let plain = stdout(&run(
        Mode::Plain,
        &["head", "-c", "100", "/proc/self/status"],
    ));
    let upto_state = |s: &str| s.lines().take(3).collect::<Vec<_>>().join("\n");
    assert_eq!(upto_state(&out), upto_state(&plain));
    if let Some(tgid) = out.lines().find_map(|l| l.strip_prefix("Tgid:\t")) {
        assert_eq!(
            tgid,
            pid.to_string(),
            "/proc/self must be the program itself"
        );
    }
}

#[test]
fn stats_count_redirected_calls() {
    let o = run(Mode::LoopbackStats, &["cat", "/proc/version"]);
    assert!(o.status.success(), "{o:?}");
    let (redirected, local) = stats(&o).unwrap_or_else(|| panic!("no stats line: {o:?}"));
    // openat, fstat, fadvise, read ×2, close at least.
    assert!(redirected >= 4, "redirected={redirected}");
    assert!(local > 0, "local={local}");

    // A program that touches no GVM state redirects nothing.
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let o = run(Mode::LoopbackStats, &["cat", manifest]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stats(&o).map(|s| s.0),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("exterior-shim"));

    // uname is redirected even though it names no file.
    let o = run(Mode::LoopbackStats, &["uname", "-n"]);
    assert!(stats(&o).is_some_and(|(r, _)| r >= 1), "{o:?}");
}

#[test]
fn off_does_not_arm() {
    let o = run(Mode::Off, &["cat", "/proc/version"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stats(&o), None, "armed despite EXTERIOR_SHIM_OFF=1");
    assert_eq!(
        stdout(&o),
        stdout(&run(Mode::Plain, &["cat", "/proc/version"]))
    );
}

#[test]
fn sigsys_cannot_be_ignored_or_blocked_away() {
    // `trap "" SYS` is rt_sigaction(SIGSYS, SIG_IGN): had it taken effect, the shell's next
    // diverted call would kill it.
    same(&[
        "sh",
        "-c",
        "trap '' SYS; cat /proc/version; trap - SYS; uname -n",
    ]);
    assert!(
        have("perl"),
        "no perl on this host (Debian's perl-base is essential)"
    );
    {
        same(&[
            "perl",
            "-e",
            "use POSIX; sigprocmask(SIG_BLOCK, POSIX::SigSet->new(SIGSYS)); \
             open F, '/proc/version' or die; print scalar <F>",
        ]);
    }
}

#[test]
fn blocking_local_calls_stay_interruptible() {
    let mut c = command(Mode::Loopback, &["sleep", "30"]);
    let mut child = c.spawn().expect("spawn sleep");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signals our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("SIGTERM did not interrupt a diverted sleep");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = child.wait().expect("status");
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
}

#[test]
fn threads_and_children_work() {
    // sort creates a worker thread for a big input (clone on a new stack; not diverted); the
    // shell forks subshells (re-armed) and execs tools (re-armed through LD_PRELOAD).
    let big = std::env::temp_dir().join(format!("exterior-shim-sort-{}", std::process::id()));
    let lines: String = (0..300_000u32)
        .map(|i| format!("{}\n", i.wrapping_mul(2_654_435_761)))
        .collect();
    std::fs::write(&big, lines).expect("write the sort input");
    let big_path = big.to_str().expect("utf-8 temp path");
    same(&["sort", "--parallel=2", "/proc/filesystems", big_path]);
    let _ = std::fs::remove_file(&big);
    same(&[
        "sh",
        "-c",
        "for i in 1 2 3; do (read x < /proc/sys/kernel/ostype; echo $i $x) & wait; done",
    ]);
}

#[test]
fn without_ioperm_the_program_does_not_run() {
    // Needs an unprivileged run, where ioperm fails with EPERM: as root, drop to nobody with
    // setpriv. (The real `out` must never run on the host.) The preload is set by `env` after
    // the uid change, so only `cat` is diverted.
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    // A copy anyone can read: the build tree may sit under a directory uid 65534 cannot
    // enter.
    let copy = std::env::temp_dir().join(format!("exterior-shim-test-{}.so", std::process::id()));
    std::fs::copy(shim(), &copy).expect("copy the shim");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("make the copy readable");
    let preload = format!("LD_PRELOAD={}", copy.display());
    let mut argv: Vec<&str> = vec![];
    if root.unwrap_or(true) {
        assert!(
            have("setpriv"),
            "running as root without setpriv: tools/setup installs util-linux"
        );
        argv.extend([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]);
    }
    argv.extend(["env", &preload, "cat", "/proc/version"]);
    let mut c = command(Mode::Plain, &argv);
    c.current_dir("/");
    let o = wait(c);
    let _ = std::fs::remove_file(&copy);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(126), "{o:?}");
    assert!(o.stdout.is_empty(), "ran locally: {}", stdout(&o));
    // EPERM without CAP_SYS_RAWIO; ENOSYS on kernels built without ioperm support.
    let err = err.trim_end();
    assert!(
        err == "exterior: cannot reach the VMM (ioperm: EPERM)"
            || err == "exterior: cannot reach the VMM (ioperm: ENOSYS)",
        "{err}"
    );
}
