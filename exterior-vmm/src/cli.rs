//! Command-line interface (argh): one binary, one verb per job.

use std::path::PathBuf;

use argh::FromArgs;

/// exterior-vmm: a KVM virtual machine monitor that runs guests and, from outside, the
/// stock management tools that act on them.
#[derive(FromArgs, Debug)]
pub struct Cli {
    #[argh(subcommand)]
    pub command: Command,
}

// `run`'s options make its variant the largest by far; the command line is parsed once.
#[allow(clippy::large_enum_variant)]
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunCmd),
    List(ListCmd),
    Info(InfoCmd),
    Stop(StopCmd),
    Exec(ExecCmd),
    Shell(ShellCmd),
    Console(ConsoleCmd),
    Quiesce(QuiesceCmd),
    KvmProbe(KvmProbeCmd),
    Bench(crate::bench::BenchCmd),
    Keygen(crate::cli_image::KeygenCmd),
    Seal(crate::cli_image::SealCmd),
    Inspect(crate::cli_image::InspectCmd),
}

/// Boot a guest. With no arguments it boots the pinned kernel and test image from images/.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run")]
pub struct RunCmd {
    /// kernel image: an ELF vmlinux or a bzImage (default: images/vmlinux)
    #[argh(option)]
    pub kernel: Option<PathBuf>,
    /// initramfs to pass to the kernel (default: images/gvm.cpio when --kernel is not given)
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// guest memory: MiB, or with a unit (512M, 1G); default 512M
    #[argh(option, default = "String::from(\"512M\")")]
    pub mem: String,
    /// number of vCPUs (default 1)
    #[argh(option, default = "1")]
    pub cpus: u32,
    /// extra kernel command-line parameters, appended after the defaults
    #[argh(option)]
    pub append: Option<String>,
    /// attach a raw disk image as a virtio-blk device (vda, vdb, ... in order): PATH, or
    /// PATH,ro for a read-only disk; ,direct bypasses the host page cache for aligned
    /// requests (O_DIRECT); may be repeated (at most 8)
    #[argh(option)]
    pub disk: Vec<String>,
    /// attach a virtio-net device to a tap: tap=NAME (created if it does not exist; needs
    /// CAP_NET_ADMIN) or tap=NAME,mac=XX:XX:XX:XX:XX:XX; may be repeated (with --disk, 8
    /// devices at most)
    #[argh(option)]
    pub net: Vec<String>,
    /// write the guest console to FILE instead of stdout
    #[argh(option)]
    pub console: Option<PathBuf>,
    /// boot a sealed image (from `exterior-vmm seal`) instead of --kernel/--initrd;
    /// memory, vCPUs and command line come from the image
    #[argh(option)]
    pub image: Option<PathBuf>,
    /// with --image: a trusted public key (KEY.pub); may be repeated
    #[argh(option)]
    pub trust: Vec<PathBuf>,
    /// do not install seccomp filters (debugging only)
    #[argh(switch)]
    pub no_seccomp: bool,
    /// start a named instance: the guest (GVM) plus its secure VM (SVM), reachable with
    /// `exec`, `shell`, `console` and `stop`
    #[argh(option)]
    pub name: Option<String>,
    /// with --name: run in the background; returns once the instance is ready
    #[argh(switch)]
    pub detach: bool,
    /// with --name: the kernel the SVM boots, a copy you trust of the GVM's: --kernel must
    /// load the same bytes (default: the pinned images/bzImage, or images/vmlinux when
    /// --kernel is an ELF vmlinux; a sealed image's own kernel with --image)
    #[argh(option)]
    pub svm_kernel: Option<PathBuf>,
    /// with --name: the SVM's initramfs (default: images/svm.cpio)
    #[argh(option)]
    pub svm_initrd: Option<PathBuf>,
    /// with --name: SVM memory (default 256M)
    #[argh(option, default = "String::from(\"256M\")")]
    pub svm_mem: String,
    /// with --name: seconds a redirected call may take in all (runs, quiesces, parks)
    /// before it is given up (default 30, 1 to 3600)
    #[argh(option)]
    pub call_deadline: Option<u64>,
    /// with --name: microseconds the GVM may stay held for one program's run of
    /// redirected calls (default 2000, or EXTERIOR_HOLD_SLICE_US; 0: one call a hold)
    #[argh(option)]
    pub hold_slice_us: Option<u64>,
    /// with --name: microseconds a hold waits for the program's next call (default 500,
    /// or EXTERIOR_HOLD_IDLE_US)
    #[argh(option)]
    pub hold_idle_us: Option<u64>,
}

/// List running instances: a line each, NAME<tab>pid PID.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct ListCmd {
    /// one JSON object per line and instance: {"name": ..., "pid": ...}
    #[argh(switch)]
    pub json: bool,
}

/// Describe a running instance: key=value lines, with the redirect engine's counters
/// (calls, failures, VM exits of the redirect vCPU, time the GVM was held).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "info")]
pub struct InfoCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
    /// one JSON object with the same fields (numbers as numbers)
    #[argh(switch)]
    pub json: bool,
}

/// Stop an instance: both of its VMs end and its socket is removed.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop")]
pub struct StopCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
}

/// Run a stock command in an instance's SVM against the GVM's kernel: its system calls on
/// kernel state (/proc, /sys, hostname, signals, modules, netlink...) run in the GVM.
/// exterior-vmm exec NAME [--local] -- CMD ARGS...
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "exec")]
pub struct ExecCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
    /// run without redirection: the command sees the SVM's own kernel
    #[argh(switch)]
    pub local: bool,
    /// the command and its arguments
    #[argh(positional, greedy)]
    pub command: Vec<String>,
}

/// Interactive shell in an instance's SVM; every program it starts is redirected to the
/// GVM's kernel (unless --local).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "shell")]
pub struct ShellCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
    /// no redirection: a shell on the SVM's own kernel
    #[argh(switch)]
    pub local: bool,
}

/// Attach to an instance's serial console (the GVM's, or the SVM's with --svm); Ctrl-]
/// detaches.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "console")]
pub struct ConsoleCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
    /// the SVM's console instead of the GVM's
    #[argh(switch)]
    pub svm: bool,
    /// with input that is not a terminal: leave once the console has been silent this
    /// many milliseconds after the input was sent (default 2000, 50 to 600000)
    #[argh(option, default = "2000")]
    pub idle_ms: u64,
}

/// Hold an instance's GVM at a safe point (every vCPU halted or in user mode), report each
/// vCPU's state and release it: the first step of a redirected call, as a diagnostic; with
/// --hold, keep it held that long first (a still guest for inspection). Exit status 1 when
/// the guest is busy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "quiesce")]
pub struct QuiesceCmd {
    /// instance name
    #[argh(positional)]
    pub name: String,
    /// milliseconds to keep the GVM held before releasing it (default 0, at most 60000);
    /// redirected calls wait meanwhile
    #[argh(option, default = "0")]
    pub hold: u64,
}

/// Tell whether this host's KVM runs guests natively. Exit status 0: native; 1: emulating
/// (cannot boot Linux; use tools/kvm-run); 2: no usable KVM.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "kvm-probe")]
pub struct KvmProbeCmd {}
