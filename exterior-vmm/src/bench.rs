//! `exterior-vmm bench boot`: time from spawn to the guest's /init and the VMM's peak
//! resident memory, exterior-vmm against `qemu-system-x86_64 -machine microvm` booting the
//! same kernel, initrd and command line on the same KVM, runs alternating.
//!
//! Both VMMs get the ELF vmlinux: exterior-vmm loads it directly, QEMU's microvm boots it
//! through its PVH entry point (the kernel has CONFIG_PVH), so the very same file runs.
//! The guest's /init (images/gvm.cpio) runs `exterior_run="echo MARKER"`, then reboots,
//! which ends both VMMs. The kernel command lines are the same except for the reboot
//! method: exterior-vmm's `reboot=k` pulses its i8042 reset line, but microvm has no
//! i8042 (with `reboot=k` the guest ends in the firmware's reset vector and QEMU never
//! exits), so QEMU gets `reboot=t`: a triple fault, which `-no-reboot` turns into an exit.
//! It only matters after /init has been reached.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use argh::FromArgs;
use thiserror::Error;

use vmm::config::DEFAULT_CMDLINE;

use crate::paths;

/// The line the guest prints once its /init runs the command.
pub const MARKER: &str = "BENCH-INIT-REACHED";
/// Guest memory and vCPUs, the same for both VMMs.
const MEM: &str = "512M";
const CPUS: &str = "1";
/// How often the child's VmHWM is sampled and its exit polled.
const POLL: Duration = Duration::from_millis(10);
/// Output lines kept for error messages.
const TAIL_LINES: usize = 20;
/// How long a VMM may take to exit after its guest reached /init before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// Exit status for bad arguments or missing files.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for a failed measurement (QEMU missing, no /init, timeout, VMM failure).
const EXIT_FAILED: u8 = 1;

/// Benchmarks.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "bench")]
pub struct BenchCmd {
    #[argh(subcommand)]
    pub command: BenchSubcommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum BenchSubcommand {
    Boot(BenchBootCmd),
}

/// Time to the guest's /init and peak resident memory of exterior-vmm and of
/// `qemu-system-x86_64 -machine microvm` (same kernel, initrd and KVM), runs alternating;
/// prints per-run figures, medians and the ratios exterior/qemu.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "boot")]
pub struct BenchBootCmd {
    /// the QEMU executable (default: qemu-system-x86_64 on PATH)
    #[argh(option, default = "PathBuf::from(\"qemu-system-x86_64\")")]
    pub qemu: PathBuf,
    /// runs of each VMM (default 5)
    #[argh(option, default = "5")]
    pub runs: u32,
    /// kernel image for both VMMs (default: images/vmlinux)
    #[argh(option)]
    pub kernel: Option<PathBuf>,
    /// initramfs for both VMMs (default: images/gvm.cpio)
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// seconds a guest may take to reach /init before its VMM is killed (default 300)
    #[argh(option, default = "300")]
    pub timeout: u64,
}

#[derive(Debug, Error)]
enum BenchError {
    #[error("{0}")]
    BadInput(String),
    #[error("QEMU not found: {0} (install qemu-system-x86, or pass --qemu PATH)")]
    QemuMissing(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("{vmm}: {source}")]
    Io {
        vmm: &'static str,
        source: io::Error,
    },
    #[error("{vmm}: the guest never reached /init (no \"{MARKER}\" line); the VMM {status}{tail}")]
    NoInit {
        vmm: &'static str,
        status: ExitStatus,
        tail: String,
    },
    #[error("{vmm}: killed after {secs} s: the guest did not reach /init (see --timeout){tail}")]
    Timeout {
        vmm: &'static str,
        secs: u64,
        tail: String,
    },
    #[error("{vmm}: the guest reached /init but the VMM {status}{tail}")]
    Failed {
        vmm: &'static str,
        status: ExitStatus,
        tail: String,
    },
}

impl BenchError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            BenchError::BadInput(_) => EXIT_BAD_INPUT,
            _ => EXIT_FAILED,
        })
    }
}

/// Runs `exterior-vmm bench ...`.
pub fn run(cmd: BenchCmd) -> ExitCode {
    let result = match cmd.command {
        BenchSubcommand::Boot(boot) => bench_boot(&boot),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exterior-vmm bench: error: {e}");
            e.exit_code()
        }
    }
}

/// One VMM under test: a name for the table and how to start it.
struct Vmm {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
}

/// What one boot measured.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Spawn to the marker line on the child's stdout.
    init: Duration,
    /// Peak resident set (VmHWM) of the child, KiB.
    peak_rss_kib: u64,
    /// The child did not exit within [`EXIT_GRACE`] after /init and was killed.
    killed: bool,
}

fn bench_boot(cmd: &BenchBootCmd) -> Result<(), BenchError> {
    if cmd.runs == 0 {
        return Err(BenchError::BadInput("--runs must be at least 1".into()));
    }
    if cmd.timeout == 0 {
        return Err(BenchError::BadInput("--timeout must be at least 1".into()));
    }
    let default = |name: &str| {
        paths::images_dir().map(|dir| dir.join(name)).ok_or_else(|| {
            BenchError::BadInput(format!(
                "no images directory for the default {name}: set EXTERIOR_IMAGES, run tools/setup, or pass the path"
            ))
        })
    };
    let kernel = match &cmd.kernel {
        Some(path) => path.clone(),
        None => default("vmlinux")?,
    };
    let initrd = match &cmd.initrd {
        Some(path) => path.clone(),
        None => default("gvm.cpio")?,
    };
    for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        if !path.is_file() {
            return Err(BenchError::BadInput(format!(
                "{what} {} is not a file (run tools/setup, or pass --{what})",
                path.display()
            )));
        }
    }
    let exe = std::env::current_exe().map_err(|source| BenchError::Spawn {
        program: PathBuf::from("exterior-vmm (current executable)"),
        source,
    })?;
    let qemu_version = qemu_version(&cmd.qemu)?;
    let timeout = Duration::from_secs(cmd.timeout);
    let vmms = [
        Vmm {
            name: "exterior-vmm",
            program: exe,
            args: exterior_args(&kernel, &initrd),
        },
        Vmm {
            name: "qemu-microvm",
            program: cmd.qemu.clone(),
            args: qemu_args(&kernel, &initrd),
        },
    ];

    println!(
        "# bench boot: kernel {}, initrd {}, {MEM}, {CPUS} vCPU, {} runs each, alternating",
        kernel.display(),
        initrd.display(),
        cmd.runs
    );
    println!("# qemu: {} ({qemu_version})", cmd.qemu.display());
    println!("# init_ms: spawn to \"{MARKER}\" from /init; peak_rss_mib: VmHWM of the VMM process");
    println!(
        "{:<7} {:<14} {:>10} {:>13}",
        "run", "vmm", "init_ms", "peak_rss_mib"
    );
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=cmd.runs {
        for (vmm, out) in vmms.iter().zip(samples.iter_mut()) {
            let sample = measure(vmm, timeout)?;
            print_row(&run.to_string(), vmm.name, sample);
            out.push(sample);
        }
    }
    let medians: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| {
            let init: Vec<f64> = s.iter().map(|x| millis(x.init)).collect();
            let rss: Vec<f64> = s.iter().map(|x| kib_to_mib(x.peak_rss_kib)).collect();
            (median(&init).unwrap_or(0.0), median(&rss).unwrap_or(0.0))
        })
        .collect();
    for (vmm, (init, rss)) in vmms.iter().zip(&medians) {
        println!(
            "{:<7} {:<14} {:>10.1} {:>13.1}",
            "median", vmm.name, init, rss
        );
    }
    if let [(e_init, e_rss), (q_init, q_rss)] = medians[..] {
        println!(
            "{:<7} {:<14} {:>10} {:>13}",
            "ratio",
            "exterior/qemu",
            format_ratio(e_init, q_init),
            format_ratio(e_rss, q_rss)
        );
    }
    Ok(())
}

fn print_row(run: &str, vmm: &str, sample: Sample) {
    let note = if sample.killed {
        format!("  (killed: no exit {} s after /init)", EXIT_GRACE.as_secs())
    } else {
        String::new()
    };
    println!(
        "{:<7} {:<14} {:>10.1} {:>13.1}{note}",
        run,
        vmm,
        millis(sample.init),
        kib_to_mib(sample.peak_rss_kib)
    );
    // Progress is visible while the next boot runs; a closed stdout shows up at exit.
    let _ = io::stdout().flush();
}

/// The kernel command-line parameter that makes the test image's /init print [`MARKER`].
fn guest_param() -> String {
    format!("exterior_run=\"echo {MARKER}\"")
}

fn exterior_args(kernel: &Path, initrd: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), kernel.into()];
    args.extend([
        "--initrd".into(),
        initrd.into(),
        "--mem".into(),
        MEM.into(),
        "--cpus".into(),
        CPUS.into(),
        "--append".into(),
        guest_param().into(),
    ]);
    args
}

/// QEMU microvm with the command line exterior-vmm builds ([`DEFAULT_CMDLINE`] + the
/// marker command; `reboot=t` instead of `reboot=k`, see the module documentation), a
/// serial console on stdout and no other devices.
fn qemu_args(kernel: &Path, initrd: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        MEM,
        "-smp",
        CPUS,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend([
        "-kernel".into(),
        kernel.into(),
        "-initrd".into(),
        initrd.into(),
        "-append".into(),
        format!("{} {}", qemu_cmdline_base(), guest_param()).into(),
    ]);
    args
}

/// [`DEFAULT_CMDLINE`] with a reboot method that ends QEMU microvm.
fn qemu_cmdline_base() -> String {
    DEFAULT_CMDLINE.replace("reboot=k", "reboot=t")
}

/// The first line of `qemu --version`; also tells a missing QEMU early.
fn qemu_version(qemu: &Path) -> Result<String, BenchError> {
    let output = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => BenchError::QemuMissing(qemu.to_path_buf()),
            _ => BenchError::Spawn {
                program: qemu.to_path_buf(),
                source,
            },
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if !output.status.success() || first.is_empty() {
        return Err(BenchError::Spawn {
            program: qemu.to_path_buf(),
            source: io::Error::other(format!("`--version` {}", output.status)),
        });
    }
    Ok(first)
}

/// Kills and reaps the child however measuring ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots once: spawn, wait for the marker line, sample VmHWM until the child exits.
fn measure(vmm: &Vmm, timeout: Duration) -> Result<Sample, BenchError> {
    let io_err = |source| BenchError::Io {
        vmm: vmm.name,
        source,
    };
    let start = Instant::now();
    let child = Command::new(&vmm.program)
        .args(&vmm.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound if vmm.name == "qemu-microvm" => {
                BenchError::QemuMissing(vmm.program.clone())
            }
            _ => BenchError::Spawn {
                program: vmm.program.clone(),
                source,
            },
        })?;
    let mut child = ChildGuard(child);
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().map(|out| {
        thread::spawn(move || {
            read_lines(out, |line| {
                if is_marker_line(line) {
                    let _ = tx.send(Instant::now());
                }
            })
        })
    });
    let stderr = child
        .0
        .stderr
        .take()
        .map(|err| thread::spawn(move || read_lines(err, |_| {})));

    let mut deadline = start + timeout;
    let mut init: Option<Duration> = None;
    let mut peak = 0;
    let mut killed = false;
    let status = loop {
        // Sampled before each exit check: the last sample is at most POLL before the exit.
        if let Some(kib) = read_vm_hwm(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.0.try_wait().map_err(io_err)? {
            break status;
        }
        if Instant::now() >= deadline {
            if init.is_none() {
                drop(child);
                return Err(BenchError::Timeout {
                    vmm: vmm.name,
                    secs: timeout.as_secs(),
                    tail: tails(stdout, stderr),
                });
            }
            // Measured already; a VMM that does not stop is noted, not fatal.
            killed = true;
            let _ = child.0.kill();
            break child.0.wait().map_err(io_err)?;
        }
        match rx.recv_timeout(POLL) {
            Ok(at) => {
                if init.is_none() {
                    init = Some(at.saturating_duration_since(start));
                    deadline = Instant::now() + EXIT_GRACE;
                }
                if let Some(kib) = read_vm_hwm(pid) {
                    peak = peak.max(kib);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // stdout closed: the child is exiting.
            Err(RecvTimeoutError::Disconnected) => thread::sleep(POLL),
        }
    };
    // A marker read just before the exit may still be in the channel.
    if init.is_none() {
        init = rx
            .try_recv()
            .ok()
            .map(|at| at.saturating_duration_since(start));
    }
    let tail = tails(stdout, stderr);
    match init {
        None => Err(BenchError::NoInit {
            vmm: vmm.name,
            status,
            tail,
        }),
        Some(_) if !killed && !status.success() => Err(BenchError::Failed {
            vmm: vmm.name,
            status,
            tail,
        }),
        Some(init) => {
            if killed {
                eprintln!(
                    "exterior-vmm bench: warning: {} did not exit {} s after its guest reached /init; killed{tail}",
                    vmm.name,
                    EXIT_GRACE.as_secs()
                );
            }
            Ok(Sample {
                init,
                peak_rss_kib: peak,
                killed,
            })
        }
    }
}

type Tail = Option<JoinHandle<VecDeque<String>>>;

/// Reads `input` to its end line by line, calling `each` per line (without the line end);
/// returns the last [`TAIL_LINES`] lines.
fn read_lines(input: impl Read, mut each: impl FnMut(&str)) -> VecDeque<String> {
    let mut reader = BufReader::new(input);
    let mut buf = Vec::new();
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        each(line);
        tail.push_back(line.to_string());
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    }
    tail
}

/// The last output lines of a finished child, for an error message ("" when none).
fn tails(stdout: Tail, stderr: Tail) -> String {
    let mut text = String::new();
    for (name, handle) in [("stdout", stdout), ("stderr", stderr)] {
        let lines = handle.and_then(|h| h.join().ok()).unwrap_or_default();
        if lines.is_empty() {
            continue;
        }
        text.push_str(&format!("\n  last lines of its {name}:"));
        for line in lines {
            text.push_str("\n  | ");
            text.push_str(&line);
        }
    }
    text
}

/// Whether a console line is the guest's marker output. The kernel also echoes its
/// command line, which holds the marker text after `exterior_run=`; that does not count.
fn is_marker_line(line: &str) -> bool {
    line.trim_end().ends_with(MARKER) && !line.contains("exterior_run")
}

/// VmHWM (peak resident set, KiB) of a process, from /proc/PID/status.
fn read_vm_hwm(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_hwm(&s))
}

/// The VmHWM figure in KiB from the text of /proc/PID/status.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let mut words = rest.split_whitespace();
    let value = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// The median; the mean of the middle two for an even count. `None` when empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `a / b` as "0.42x"; "n/a" when `b` is not positive.
fn format_ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "n/a".to_string()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_parsed_from_proc_status() {
        let status = "Name:\tqemu\nVmPeak:\t  999 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12345));
        assert_eq!(parse_vm_hwm("VmHWM: 7"), Some(7));
        // Zombies and kernel threads have no VmHWM line.
        assert_eq!(parse_vm_hwm("Name:\tx\nState:\tZ (zombie)\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t  12 MB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t  lots kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\n"), None);
    }

    #[test]
    fn own_vm_hwm_is_readable() {
        assert!(read_vm_hwm(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[2.0, 100.0, 1.0, 3.0, 2.0]), Some(2.0));
    }

    #[test]
    fn ratio_formatting() {
        assert_eq!(format_ratio(1.0, 4.0), "0.25x");
        assert_eq!(format_ratio(3.0, 2.0), "1.50x");
        assert_eq!(format_ratio(2.0, 3.0), "0.67x");
        assert_eq!(format_ratio(1.0, 0.0), "n/a");
        assert_eq!(format_ratio(f64::NAN, 1.0), "n/a");
    }

    #[test]
    fn marker_line_is_the_echo_not_the_command_line() {
        assert!(is_marker_line(MARKER));
        assert!(is_marker_line("BENCH-INIT-REACHED\r"));
        assert!(is_marker_line(
            "[    1.2] random: crng init done\rBENCH-INIT-REACHED"
        ));
        let param = guest_param();
        assert!(!is_marker_line(&format!(
            "[    0.000000] Command line: {DEFAULT_CMDLINE} {param}"
        )));
        assert!(!is_marker_line(
            "Unknown kernel command line parameters \"nokaslr exterior_run=echo BENCH-INIT-REACHED\", will be passed to user space."
        ));
        assert!(!is_marker_line("exterior_run: exit status 0"));
    }

    #[test]
    fn both_vmms_get_the_same_guest() {
        let (k, i) = (Path::new("/k/vmlinux"), Path::new("/i/gvm.cpio"));
        let ext = exterior_args(k, i);
        let qemu = qemu_args(k, i);
        let after = |args: &[OsString], flag: &str| {
            let at = args.iter().position(|a| a == flag)?;
            args.get(at + 1).cloned()
        };
        assert_eq!(after(&ext, "--kernel"), after(&qemu, "-kernel"));
        assert_eq!(after(&ext, "--initrd"), after(&qemu, "-initrd"));
        assert_eq!(after(&ext, "--mem"), after(&qemu, "-m"));
        assert_eq!(after(&ext, "--cpus"), after(&qemu, "-smp"));
        // exterior-vmm prepends DEFAULT_CMDLINE itself (config::build_cmdline); QEMU
        // gets the same but for the reboot method.
        let ext_cmdline =
            vmm::config::build_cmdline(after(&ext, "--append").as_deref().and_then(|a| a.to_str()));
        assert!(ext_cmdline.contains("reboot=k"));
        assert_eq!(
            Some(OsString::from(ext_cmdline.replace("reboot=k", "reboot=t"))),
            after(&qemu, "-append")
        );
    }

    #[test]
    fn read_lines_keeps_the_tail_and_sees_every_line() {
        let text: String = (0..30).map(|n| format!("line {n}\r\n")).collect();
        let mut seen = 0;
        let tail = read_lines(text.as_bytes(), |_| seen += 1);
        assert_eq!(seen, 30);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.back().map(String::as_str), Some("line 29"));
    }
}
