//! The `exterior-vmm` binary.

use std::process::ExitCode;

use vmm::builder::{run_vm, BuildError, RunOptions};
use vmm::cli::{self, Cli, Command, KvmProbeCmd, RunCmd};
use vmm::config::{self, ConfigError, ConsoleTarget, VmConfig};
use vmm::exit::ExitReason;

/// Exit status for bad input (arguments, files, images).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for host or KVM failures.
const EXIT_HOST: u8 = 3;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Run(cmd) => run(cmd),
        Command::KvmProbe(cmd) => kvm_probe(cmd),
        Command::Bench(cmd) => vmm::bench::run(cmd),
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

fn build_config(cmd: &RunCmd) -> Result<VmConfig, ConfigError> {
    let mem_mib = config::check_mem_mib(config::parse_mem_mib(&cmd.mem)?)?;
    let cpus = config::check_cpus(cmd.cpus)?;
    let images = cli::images_dir();
    let (kernel_path, initrd_path) = match &cmd.kernel {
        Some(kernel) => (kernel.clone(), cmd.initrd.clone()),
        None => {
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
        console: cmd
            .console
            .clone()
            .map(ConsoleTarget::File)
            .unwrap_or(ConsoleTarget::Stdout),
    })
}

fn run(cmd: RunCmd) -> ExitCode {
    let config = match build_config(&cmd) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let opts = RunOptions {
        kvm_device: cli::kvm_device(),
        seccomp: !cmd.no_seccomp,
    };
    match run_vm(config, &opts) {
        Ok(reason) => report(reason),
        Err(e @ (BuildError::Load { .. } | BuildError::Console { .. })) => fail(EXIT_BAD_INPUT, e),
        Err(e) => fail(EXIT_HOST, e),
    }
}

fn report(reason: ExitReason) -> ExitCode {
    let code = reason.exit_code() as u8;
    match reason {
        ExitReason::Reset | ExitReason::PowerOff => {}
        ExitReason::GuestPanic(line) => eprintln!("exterior-vmm: guest kernel panicked: {line}"),
        ExitReason::GuestCrash(what) => eprintln!("exterior-vmm: guest crashed: {what}"),
        ExitReason::VmmError(what) => eprintln!("exterior-vmm: error: {what}"),
    }
    ExitCode::from(code)
}

fn kvm_probe(_cmd: KvmProbeCmd) -> ExitCode {
    match vmm::probe::probe(&cli::kvm_device()) {
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
