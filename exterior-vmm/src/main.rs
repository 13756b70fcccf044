//! The `exterior-vmm` binary: the command line over the `vmm` library. Parses arguments
//! (`cli`), runs a guest or an instance, talks to running instances over their control
//! sockets (`client`), and holds the other verbs: sealed images (`cli_image`), the KVM
//! probe (`probe`) and the boot benchmark (`bench`).

mod bench;
mod cli;
mod cli_image;
mod client;
mod paths;
mod probe;

use std::path::Path;
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vmm::builder::{run_vm, BuildError, RunOptions};
use vmm::config::{self, ConfigError, ConsoleTarget, VmConfig};
use vmm::exit::ExitReason;
use vmm::instance::runtime::{validate_name, RuntimeDir};
use vmm::instance::{check_same_kernel, run_instance, InstanceConfig, MAX_QUIESCE_HOLD};

use cli::{Cli, Command, KvmProbeCmd, RunCmd};
use client::ClientError;

/// Exit status for bad input (arguments, files, images).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for host or KVM failures.
const EXIT_HOST: u8 = 3;
/// Exit status of `exec` when the instance could not run the command at all.
const EXIT_EXEC_FAILED: u8 = 255;
/// Set in the environment of the background process `run --detach` starts.
const DAEMON_ENV: &str = "EXTERIOR_DAEMON";
/// How long `run --detach` waits for the instance to be ready, and `stop` for it to end.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of `console --idle-ms`: below 50 ms a session ends between two lines of one
/// answer; above ten minutes it is a hang, not a pause.
const MIN_CONSOLE_IDLE_MS: u64 = 50;
const MAX_CONSOLE_IDLE_MS: u64 = 600_000;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Run(cmd) => run(cmd),
        Command::KvmProbe(cmd) => kvm_probe(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Keygen(cmd) => image_cmd(cmd.run()),
        Command::Seal(cmd) => image_cmd(cmd.run()),
        Command::Inspect(cmd) => image_cmd(cmd.run()),
        Command::List(cmd) => with_runtime(|rt| {
            for name in rt.instances()? {
                let pid = rt.pid(&name);
                if cmd.json {
                    println!("{}", serde_json::json!({ "name": name, "pid": pid }));
                } else {
                    let pid = pid.map(|p| p.to_string()).unwrap_or_default();
                    println!("{name}\tpid {pid}");
                }
            }
            Ok(0)
        }),
        Command::Info(cmd) => with_runtime(|rt| {
            let info = client::info(rt, &cmd.name)?;
            if cmd.json {
                println!("{}", client::info_json(&info));
            } else {
                print!("{info}");
            }
            Ok(0)
        }),
        Command::Stop(cmd) => with_runtime(|rt| {
            client::stop(rt, &cmd.name, STOP_TIMEOUT)?;
            Ok(0)
        }),
        Command::Exec(cmd) => {
            if cmd.command.is_empty() {
                return fail(
                    EXIT_BAD_INPUT,
                    "exec: no command given (exec NAME -- CMD ARGS...)",
                );
            }
            with_runtime(|rt| client::exec(rt, &cmd.name, cmd.command, false, cmd.local))
        }
        Command::Shell(cmd) => with_runtime(|rt| {
            client::exec(
                rt,
                &cmd.name,
                vec!["/bin/bash".into(), "-i".into()],
                true,
                cmd.local,
            )
        }),
        // Refused here with exit status 2, before any instance is asked.
        Command::Quiesce(cmd) if u128::from(cmd.hold) > MAX_QUIESCE_HOLD.as_millis() => fail(
            EXIT_BAD_INPUT,
            format!(
                "quiesce: --hold {} ms is longer than the {} ms allowed",
                cmd.hold,
                MAX_QUIESCE_HOLD.as_millis()
            ),
        ),
        Command::Quiesce(cmd) => {
            with_runtime(|rt| match client::quiesce(rt, &cmd.name, cmd.hold)? {
                Ok(report) => {
                    print!("{report}");
                    Ok(0)
                }
                Err(busy) => {
                    eprintln!("exterior-vmm: {busy}");
                    Ok(1)
                }
            })
        }
        Command::Console(cmd) if !(MIN_CONSOLE_IDLE_MS..=MAX_CONSOLE_IDLE_MS).contains(&cmd.idle_ms) => {
            fail(
                EXIT_BAD_INPUT,
                format!(
                    "console: --idle-ms {} is outside {MIN_CONSOLE_IDLE_MS}..={MAX_CONSOLE_IDLE_MS}",
                    cmd.idle_ms
                ),
            )
        }
        Command::Console(cmd) => with_runtime(|rt| {
            client::console(rt, &cmd.name, cmd.svm, Duration::from_millis(cmd.idle_ms))?;
            Ok(0)
        }),
    }
}

/// Runs a client command against the runtime directory; its result is the exit status.
fn with_runtime(f: impl FnOnce(&RuntimeDir) -> Result<i32, ClientError>) -> ExitCode {
    let result = RuntimeDir::open(RuntimeDir::default_path())
        .map_err(ClientError::from)
        .and_then(|rt| f(&rt));
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e @ ClientError::Runtime(_)) => fail(EXIT_BAD_INPUT, e),
        Err(e) => fail(EXIT_EXEC_FAILED, e),
    }
}

/// Parses the command line; usage errors exit with [`EXIT_BAD_INPUT`], `--help` with 0.
fn parse_args() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let command = args.first().map(String::as_str).unwrap_or("exterior-vmm");
    let command = command.rsplit('/').next().unwrap_or(command);
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    <Cli as argh::FromArgs>::from_args(&[command], &rest).map_err(|early| match early.status {
        Ok(()) => {
            println!("{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!("{}", early.output);
            ExitCode::from(EXIT_BAD_INPUT)
        }
    })
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("exterior-vmm: error: {message}");
    ExitCode::from(code)
}

fn console_target(path: Option<&Path>) -> ConsoleTarget {
    path.map(|p| ConsoleTarget::File(p.to_path_buf()))
        .unwrap_or(ConsoleTarget::Stdout)
}

fn build_config(cmd: &RunCmd) -> Result<VmConfig, ConfigError> {
    let mem_mib = config::check_mem_mib(config::parse_mem_mib(&cmd.mem)?)?;
    let cpus = config::check_cpus(cmd.cpus)?;
    let (kernel_path, initrd_path) = match &cmd.kernel {
        Some(kernel) => (kernel.clone(), cmd.initrd.clone()),
        None => {
            let images = paths::images_dir().ok_or(ConfigError::NoImagesDir("--kernel"))?;
            let kernel = images.join("vmlinux");
            if !kernel.exists() {
                return Err(ConfigError::NoDefaultKernel(kernel));
            }
            let initrd = cmd.initrd.clone().or_else(|| Some(images.join("gvm.cpio")));
            (kernel, initrd)
        }
    };
    let kernel = config::read_kernel(&kernel_path)?;
    let initrd = initrd_path
        .map(|p| config::read_initrd(&p, mem_mib))
        .transpose()?;
    Ok(VmConfig {
        mem_mib,
        cpus,
        cmdline: config::build_cmdline(cmd.append.as_deref()),
        kernel,
        kernel_path,
        initrd,
        console: console_target(cmd.console.as_deref()),
        disks: Vec::new(),
        nets: Vec::new(),
    })
}

/// The SVM boots a kernel the operator trusts with the SVM image: `--svm-kernel`; else, for
/// a sealed image, the image's own kernel (its signature, by a key the operator trusts,
/// vouches for it); else the pinned kernel in images/ of the GVM kernel's format. Never a
/// file only because the GVM boots it: a guest's `/boot/vmlinuz` may have been changed by
/// the guest (`vmm::instance::check_same_kernel` compares them, and the GVM then boots the
/// trusted file).
fn build_svm_config(cmd: &RunCmd, gvm: &VmConfig, log: &Path) -> Result<VmConfig, ConfigError> {
    let mem_mib = config::check_mem_mib(config::parse_mem_mib(&cmd.svm_mem)?)?;
    let initrd_path = match &cmd.svm_initrd {
        Some(path) => path.clone(),
        None => paths::images_dir()
            .ok_or(ConfigError::NoImagesDir("--svm-initrd"))?
            .join("svm.cpio"),
    };
    let initrd = config::read_svm_initrd(&initrd_path, mem_mib)?;
    let (kernel, kernel_path) = match &cmd.svm_kernel {
        Some(path) => (config::read_kernel(path)?, path.clone()),
        None if cmd.image.is_some() => (gvm.kernel.clone(), gvm.kernel_path.clone()),
        None => {
            let images = paths::images_dir().ok_or(ConfigError::NoImagesDir("--svm-kernel"))?;
            let pinned = images.join(if gvm.kernel_is_elf() {
                "vmlinux"
            } else {
                "bzImage"
            });
            if !pinned.exists() {
                return Err(ConfigError::NoSvmKernel(pinned));
            }
            (config::read_kernel(&pinned)?, pinned)
        }
    };
    Ok(VmConfig {
        mem_mib,
        cpus: 1,
        cmdline: config::build_cmdline(Some(config::SVM_CMDLINE)),
        kernel,
        kernel_path,
        initrd: Some(initrd),
        console: ConsoleTarget::File(log.to_path_buf()),
        disks: Vec::new(),
        nets: Vec::new(),
    })
}

/// The hold slice and idle gap: the options, else the environment, else the defaults.
fn hold_policy(cmd: &RunCmd) -> Result<vmm::HoldPolicy, String> {
    let value = |flag: Option<u64>, env: &str, default: u64| match flag {
        Some(us) => Ok(us),
        None => match std::env::var(env) {
            Ok(text) => text
                .parse::<u64>()
                .map_err(|_| format!("{env}={text:?}: not a whole number of microseconds")),
            Err(_) => Ok(default),
        },
    };
    let slice = value(
        cmd.hold_slice_us,
        "EXTERIOR_HOLD_SLICE_US",
        vmm::config::DEFAULT_HOLD_SLICE_US,
    )?;
    let idle = value(
        cmd.hold_idle_us,
        "EXTERIOR_HOLD_IDLE_US",
        vmm::config::DEFAULT_HOLD_IDLE_US,
    )?;
    vmm::config::check_hold_policy(slice, idle).map_err(|e| e.to_string())
}

fn run(cmd: RunCmd) -> ExitCode {
    if cmd.detach && cmd.name.is_none() {
        return fail(EXIT_BAD_INPUT, "--detach needs --name");
    }
    if cmd.call_deadline.is_some() && cmd.name.is_none() {
        return fail(
            EXIT_BAD_INPUT,
            "--call-deadline needs --name (only an instance redirects calls)",
        );
    }
    if cmd.svm_kernel.is_some() && cmd.name.is_none() {
        return fail(
            EXIT_BAD_INPUT,
            "--svm-kernel needs --name (only an instance has an SVM)",
        );
    }
    if (cmd.hold_slice_us.is_some() || cmd.hold_idle_us.is_some()) && cmd.name.is_none() {
        return fail(
            EXIT_BAD_INPUT,
            "--hold-slice-us and --hold-idle-us need --name (only an instance redirects calls)",
        );
    }
    let mut config = match &cmd.image {
        Some(image) => {
            if cmd.kernel.is_some() || cmd.initrd.is_some() || cmd.append.is_some() {
                return fail(
                    EXIT_BAD_INPUT,
                    "--image cannot be combined with --kernel, --initrd or --append",
                );
            }
            let console = console_target(cmd.console.as_deref());
            match cli_image::run_config_from_image(image, &cmd.trust, console) {
                // An image that asks for an SVM becomes an instance, which needs a name.
                Ok((_, true)) if cmd.name.is_none() => {
                    return fail(
                        EXIT_BAD_INPUT,
                        format!(
                            "image {} asks for an SVM: pass --name NAME to run it as an instance",
                            image.display()
                        ),
                    )
                }
                Ok((c, _)) => c,
                Err(e) => return fail(EXIT_BAD_INPUT, e),
            }
        }
        None => match build_config(&cmd) {
            Ok(c) => c,
            Err(e) => return fail(EXIT_BAD_INPUT, e),
        },
    };
    config.disks = match config::open_disks(&cmd.disk) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    // A detaching parent checks the taps' specs only: the daemon attaches them (a tap
    // that one process holds cannot be attached by another).
    let detaching = cmd.detach && std::env::var_os(DAEMON_ENV).is_none();
    config.nets = if detaching {
        for text in &cmd.net {
            if let Err(e) = config::parse_net(text) {
                return fail(EXIT_BAD_INPUT, e);
            }
        }
        Vec::new()
    } else {
        match config::open_nets(&cmd.net, config.disks.len()) {
            Ok(n) => n,
            Err(e) => return fail(EXIT_BAD_INPUT, e),
        }
    };
    let opts = RunOptions {
        kvm_device: paths::kvm_device(),
        seccomp: !cmd.no_seccomp,
    };
    let result = match &cmd.name {
        None => run_vm(config, &opts),
        Some(name) => {
            if let Err(e) = validate_name(name) {
                return fail(EXIT_BAD_INPUT, e);
            }
            let runtime = match RuntimeDir::open(RuntimeDir::default_path()) {
                Ok(rt) => rt,
                Err(e) => return fail(EXIT_HOST, e),
            };
            if runtime.is_live(name) {
                let pid = runtime.pid(name).map(|p| p.to_string()).unwrap_or_default();
                return fail(
                    EXIT_BAD_INPUT,
                    format!("an instance named {name} is already running (pid {pid})"),
                );
            }
            let call_deadline = match vmm::config::check_call_deadline(
                cmd.call_deadline
                    .unwrap_or(vmm::config::DEFAULT_CALL_DEADLINE_SECS),
            ) {
                Ok(d) => d,
                Err(e) => return fail(EXIT_BAD_INPUT, e),
            };
            let hold_policy = match hold_policy(&cmd) {
                Ok(p) => p,
                Err(e) => return fail(EXIT_BAD_INPUT, e),
            };
            let svm_log = runtime.log(name, "svm");
            let svm = match build_svm_config(&cmd, &config, &svm_log) {
                Ok(c) => c,
                Err(e) => return fail(EXIT_BAD_INPUT, e),
            };
            if cmd.detach && std::env::var_os(DAEMON_ENV).is_none() {
                // The daemon checks again (run_instance); the parent reports a refusal here.
                if let Err(e) = check_same_kernel(&config, &svm) {
                    return fail(EXIT_BAD_INPUT, e);
                }
                // The daemon opens and locks the disks itself: let go of ours (opened
                // above only to report a bad --disk here, with exit status 2).
                drop(config);
                return detach(&runtime, name, cmd.console.is_none());
            }
            // Fresh logs for this run (an old instance's stayed for post-mortems).
            let _ = std::fs::write(&svm_log, b"");
            run_instance(
                InstanceConfig {
                    name: name.clone(),
                    gvm: config,
                    svm,
                    call_deadline,
                    hold_policy,
                },
                &runtime,
                &opts,
            )
        }
    };
    match result {
        Ok(reason) => report(reason),
        Err(
            e @ (BuildError::Load { .. }
            | BuildError::Vmlinux { .. }
            | BuildError::KernelMismatch { .. }
            | BuildError::KernelFormats { .. }
            | BuildError::Console { .. }),
        ) => fail(EXIT_BAD_INPUT, e),
        Err(e) => fail(EXIT_HOST, e),
    }
}

/// `run --detach`: start this same command in a new session in the background, with the
/// GVM console in the runtime directory, and return once the instance's SVM is ready.
fn detach(runtime: &RuntimeDir, name: &str, console_to_log: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail(EXIT_HOST, format!("cannot find this executable: {e}")),
    };
    let vmm_log = runtime.log(name, "vmm");
    let gvm_log = runtime.log(name, "gvm");
    let log_file = match std::fs::File::create(&vmm_log) {
        Ok(f) => f,
        Err(e) => return fail(EXIT_HOST, format!("{}: {e}", vmm_log.display())),
    };
    let _ = std::fs::write(&gvm_log, b"");
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    if console_to_log {
        args.push("--console".into());
        args.push(gvm_log.display().to_string());
    }
    let stderr = match log_file.try_clone() {
        Ok(f) => f,
        Err(e) => return fail(EXIT_HOST, e),
    };
    let mut child = Process::new(exe);
    child
        .args(&args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr);
    // SAFETY: the closure runs in the child between fork and exec and only calls setsid,
    // which is async-signal-safe: the instance leaves our session and terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match child.spawn() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_HOST, format!("cannot start the instance: {e}")),
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&vmm_log).unwrap_or_default();
            eprint!("{log}");
            return fail(
                status.code().map(|c| c as u8).unwrap_or(EXIT_HOST).max(1),
                format!(
                    "instance {name} stopped while starting ({status}); log: {}",
                    vmm_log.display()
                ),
            );
        }
        if let Ok(info) = client::info(runtime, name) {
            if info.lines().any(|l| l == "svm_ready=1") {
                println!("{name}");
                return ExitCode::SUCCESS;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return fail(
                EXIT_HOST,
                format!(
                    "instance {name} was not ready within {} s; log: {}",
                    READY_TIMEOUT.as_secs(),
                    vmm_log.display()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn report(reason: ExitReason) -> ExitCode {
    let code = reason.exit_code() as u8;
    match reason {
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped => {}
        ExitReason::GuestPanic(line) => eprintln!("exterior-vmm: guest kernel panicked: {line}"),
        ExitReason::GuestCrash(what) => eprintln!("exterior-vmm: guest crashed: {what}"),
        ExitReason::VmmError(what) => eprintln!("exterior-vmm: error: {what}"),
    }
    ExitCode::from(code)
}

fn kvm_probe(_cmd: KvmProbeCmd) -> ExitCode {
    match probe::probe(&paths::kvm_device()) {
        Ok(result) => {
            println!("{}", result.describe());
            ExitCode::from(if result.native() { 0 } else { 1 })
        }
        Err(e) => {
            println!("no usable KVM: {e}");
            ExitCode::from(2)
        }
    }
}

fn image_cmd(result: Result<(), cli_image::ImageCliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_BAD_INPUT, e),
    }
}
