//! Instances: a GVM and its SVM in one process, found by name through a control socket in
//! an owner-only runtime directory (`exterior-vmm run --name`, `list`, `stop`, `exec`,
//! `shell`, `console`). This is the instance's side; the client side of the socket is the
//! `exterior-vmm` crate's `client`.

mod clients;
mod quiesce_worker;
pub mod runtime;
pub(crate) mod server;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use crate::boot::bzimage;
use crate::builder::{
    build_vm, host_err, run_event_loop, warn_of_unreported_panic, BuildError, RunOptions, VmSpec,
};
use crate::config::VmConfig;
use crate::devices::serial::{ConsoleTap, LinkInbox};
use crate::executor::{trusted_modules, Executor, Parts as ExecutorParts, RedirectPort};
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp;
use quiesce_worker::QuiesceWorker;

/// The longest `quiesce --hold` an instance grants.
pub use quiesce_worker::MAX_HOLD as MAX_QUIESCE_HOLD;
use redirect::profile::{identity, KernelImage};
use runtime::{InstanceLock, RuntimeDir};
use server::ControlServer;

/// Everything needed to start an instance.
pub struct InstanceConfig {
    /// The instance's name: its socket, lock and logs in the runtime directory.
    pub name: String,
    /// The user's guest.
    pub gvm: VmConfig,
    /// The secure VM that runs `exterior-agent` and the redirected commands.
    pub svm: VmConfig,
    /// How long a redirected call may take in all (`--call-deadline`).
    pub call_deadline: std::time::Duration,
    /// How long the GVM stays held for a program's run of calls.
    pub hold_policy: crate::executor::HoldPolicy,
}

/// The ELF vmlinux of `vm`'s kernel: the file itself, or a bzImage's payload.
fn vmlinux_of(vm: &VmConfig) -> Result<Cow<'_, [u8]>, BuildError> {
    bzimage::vmlinux(&vm.kernel).map_err(|source| BuildError::Vmlinux {
        path: vm.kernel_path.clone(),
        source,
    })
}

/// Refuses a GVM kernel that is not the kernel the SVM boots: another format (each boot
/// path sets the kernel up its own way: a bzImage's decompressor picks its paging mode, a
/// vmlinux keeps the VMM's), or other loaded bytes (`redirect::profile::identity`). The
/// redirect engine runs the SVM's kernel text, with the SVM's symbols, on the GVM's data.
/// Passing says the operator's `--kernel` is that kernel; what the GVM boots is the SVM's
/// file all the same ([`run_instance`]), so nothing in the GVM's file that the comparison
/// does not look at (program headers, a bzImage's own decompressor) is ever run. The same
/// file costs one comparison of its bytes.
pub fn check_same_kernel(gvm: &VmConfig, svm: &VmConfig) -> Result<(), BuildError> {
    if gvm.kernel == svm.kernel {
        return Ok(());
    }
    check_against(gvm, svm, &vmlinux_of(svm)?)
}

/// [`check_same_kernel`] with the SVM kernel's vmlinux already at hand.
fn check_against(gvm: &VmConfig, svm: &VmConfig, svm_vmlinux: &[u8]) -> Result<(), BuildError> {
    if gvm.kernel == svm.kernel {
        return Ok(());
    }
    let format = |c: &VmConfig| {
        if c.kernel_is_elf() {
            "an ELF vmlinux"
        } else {
            "a bzImage"
        }
    };
    if format(gvm) != format(svm) {
        return Err(BuildError::KernelFormats {
            gvm: gvm.kernel_path.clone(),
            gvm_format: format(gvm),
            svm: svm.kernel_path.clone(),
            svm_format: format(svm),
        });
    }
    identity::same_kernel(&vmlinux_of(gvm)?, svm_vmlinux).map_err(|source| {
        BuildError::KernelMismatch {
            gvm: gvm.kernel_path.clone(),
            svm: svm.kernel_path.clone(),
            source,
        }
    })
}

/// Runs an instance until its GVM stops or a client asks it to stop.
pub fn run_instance(
    mut config: InstanceConfig,
    runtime: &RuntimeDir,
    opts: &RunOptions,
) -> Result<ExitReason, BuildError> {
    let lock = InstanceLock::acquire(runtime, &config.name)
        .map_err(|e| BuildError::Host(e.to_string()))?;
    let exit = Arc::new(ExitSignal::new().map_err(host_err("exit eventfd"))?);
    let gvm_tap = Arc::new(ConsoleTap::new().map_err(host_err("console tap"))?);
    let svm_tap = Arc::new(ConsoleTap::new().map_err(host_err("console tap"))?);
    let inbox = Arc::new(LinkInbox::new().map_err(host_err("agent link"))?);
    let gvm_cpus = config.gvm.cpus;
    // The redirect engine reads BTF and the text's place from the SVM's image (the GVM's
    // loads the same bytes): the ELF vmlinux, given as such or inside a bzImage's payload.
    let vmlinux = vmlinux_of(&config.svm)?;
    check_against(&config.gvm, &config.svm, &vmlinux)?;
    let image = KernelImage::parse(&vmlinux);
    // How the trusted text moves with the GVM's KASLR slide (a bzImage's payload has the
    // table after the ELF, and so has a vmlinux extracted from one; an image without one
    // cannot move).
    let relocs = redirect::kaslr::Relocs::parse(&vmlinux);
    drop(vmlinux);
    // The GVM boots the trusted file: the check compared what the kernels load, not every
    // byte of the GVM's file.
    config.gvm.kernel.clone_from(&config.svm.kernel);
    config.gvm.kernel_path.clone_from(&config.svm.kernel_path);

    let (trusted_modules, warnings) =
        trusted_modules::from_svm_image(config.svm.initrd.as_deref().unwrap_or_default());
    for w in warnings {
        log::warn!("redirect: {w}");
    }
    let mut gvm = build_vm(
        VmSpec {
            config: config.gvm,
            label: "GVM",
            // One more possible CPU than the GVM runs: the redirect vCPU's identity.
            spare_cpus: 1,
            console_tap: Some(gvm_tap.clone()),
            link: None,
        },
        exit.clone(),
        opts,
    )?;
    let mut svm = build_vm(
        VmSpec {
            config: config.svm,
            label: "SVM",
            spare_cpus: 0,
            console_tap: Some(svm_tap.clone()),
            link: Some(inbox.clone()),
        },
        exit.clone(),
        opts,
    )?;
    let link = svm
        .link
        .clone()
        .ok_or_else(|| BuildError::Host("the SVM has no agent line".into()))?;
    let listener = runtime
        .bind(&config.name)
        .map_err(|e| BuildError::Host(e.to_string()))?;
    if opts.seccomp {
        seccomp::install_sigsys_handler().map_err(host_err("SIGSYS handler"))?;
    }
    gvm.start(opts.seccomp)?;
    let gvm_vm = duplicate_vm_fd(&gvm.vm)?;
    let executor = Executor::new(
        &opts.kvm_device,
        image,
        ExecutorParts {
            gvm_mem: gvm.memory.mem.clone(),
            svm_mem: svm.memory.mem.clone(),
            gvm_vcpus: gvm.controls.clone(),
            gvm_dma: gvm.dma_gate.clone(),
            gvm_bus: gvm.bus(),
            gvm_vm,
            spare_cpu: gvm_cpus,
            trusted_modules,
            relocs,
        },
        config.call_deadline,
        config.hold_policy,
        opts.seccomp,
    )
    .map_err(host_err("redirect engine"))?;
    svm.port_hook = Some(Arc::new(RedirectPort(executor.clone())));
    svm.start(opts.seccomp)?;
    let quiesce = QuiesceWorker::spawn(gvm.controls.clone(), executor.clone(), opts.seccomp)
        .map_err(host_err("quiesce worker"))?;
    let server = ControlServer::new(server::Parts {
        name: config.name.clone(),
        gvm_cpus,
        listener,
        exit: exit.clone(),
        inbox,
        link,
        gvm_tap,
        svm_tap,
        gvm_console: gvm.console.clone(),
        svm_console: svm.console.clone(),
        quiesce,
        executor,
    });

    let reason = run_event_loop(vec![Arc::new(Mutex::new(server))], &exit, opts)?;
    // A panic is reported (and labelled) by the VM's pvpanic device; console text decides
    // nothing.
    warn_of_unreported_panic("SVM", &reason, svm.panic_line());
    warn_of_unreported_panic("GVM", &reason, gvm.panic_line());
    drop(lock);
    gvm.retire();
    svm.retire();
    Ok(reason)
}

/// A second descriptor of the GVM's VM, for the redirect engine (its IPIs to the GVM).
fn duplicate_vm_fd(vm: &crate::vstate::vm::Vm) -> Result<kvm_ioctls::VmFd, BuildError> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup of a descriptor we own; the result is checked before use.
    let fd = unsafe { libc::dup(vm.fd.as_raw_fd()) };
    if fd < 0 {
        return Err(host_err("duplicate the GVM's VM descriptor")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh duplicate of a KVM VM descriptor, owned by the VmFd from now.
    unsafe { vm.kvm.create_vmfd_from_rawfd(fd) }
        .map_err(|e| host_err("adopt the GVM's VM descriptor")(std::io::Error::from(e)))
}
