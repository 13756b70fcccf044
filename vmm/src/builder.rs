//! Turns a validated [`VmConfig`] into a running VM: guest memory, boot data, KVM objects,
//! devices and vCPU threads (`build_vm`, `BuiltVm::start`). [`run_vm`] is the plain
//! `exterior-vmm run`: one VM, its console on stdout, the event loop on this thread.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{acpi, cpu, layout, loader};
use crate::config::{ConsoleTarget, VmConfig};
use crate::devices::cmos::Cmos;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::devices::serial::{
    ConsoleSerial, ConsoleSink, ConsoleTap, LinkInbox, LinkSerial, LinkSink, SerialDevice,
    COM1_BASE, COM1_GSI, COM2_BASE, COM2_GSI, COM_LEN,
};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Interrupt, VirtioDevice, MMIO_SIZE};
use crate::devices::{MmioBus, PioBus};
use crate::event_loop::{ExitWatcher, StdinInput};
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{self, ThreadKind};
use crate::sync::lock;
use crate::terminal::RawModeGuard;
use crate::vstate::dma_gate::DmaGate;
use crate::vstate::memory::{create_guest_memory, MemoryError, SharedMemory};
use crate::vstate::quiesce::{self, VcpuControl};
use crate::vstate::vcpu::{PortHook, Vcpu};
use crate::vstate::vm::{kvm_err, Vm, VmError};

const CMOS_BASE: u16 = 0x70;
const CMOS_LEN: u16 = 2;

/// Why a VM (or an instance) could not be built or run. `Load` and `Console` are bad input
/// (the kernel or the console file); the others are host or KVM failures.
#[derive(Debug, Error)]
pub enum BuildError {
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, its initrd or its command line could not be loaded into guest memory.
    #[error("kernel {path}: {source}")]
    Load {
        /// Where the kernel came from ([`VmConfig::kernel_path`]).
        path: PathBuf,
        /// What the loader refused.
        source: loader::LoadError,
    },
    /// An instance's kernel is a bzImage whose ELF vmlinux (which the redirect engine
    /// reads) cannot be had from its payload.
    #[error("kernel {path}: {source}")]
    Vmlinux {
        /// Where the kernel came from.
        path: PathBuf,
        /// Why its payload gave no vmlinux.
        source: crate::boot::bzimage::BzImageError,
    },
    /// An instance's GVM kernel does not load the same bytes as the kernel its SVM boots.
    #[error(
        "--kernel {gvm} is not the kernel the SVM boots ({svm}): {source}. The redirect \
         engine runs the SVM's kernel code on the GVM's data, so the GVM must boot that very \
         kernel: boot it with {svm}, or pass --svm-kernel with a copy you trust of the GVM's"
    )]
    KernelMismatch {
        /// Where the GVM's kernel came from.
        gvm: PathBuf,
        /// Where the SVM's kernel came from.
        svm: PathBuf,
        /// How they differ.
        source: redirect::profile::identity::KernelMismatch,
    },
    /// An instance's GVM kernel and SVM kernel are in different formats.
    #[error(
        "--kernel {gvm} is {gvm_format} and the kernel the SVM boots ({svm}) {svm_format}: \
         give the SVM's kernel in the GVM's format (--svm-kernel); the two boot paths set \
         the kernel up differently"
    )]
    KernelFormats {
        /// Where the GVM's kernel came from.
        gvm: PathBuf,
        /// "a bzImage" or "an ELF vmlinux".
        gvm_format: &'static str,
        /// Where the SVM's kernel came from.
        svm: PathBuf,
        /// "a bzImage" or "an ELF vmlinux".
        svm_format: &'static str,
    },
    /// ACPI tables, page tables or the GDT could not be written to guest memory.
    #[error("writing boot structures: {0}")]
    BootData(String),
    /// KVM refused or failed an operation.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The console file could not be opened.
    #[error("console {path}: {source}")]
    Console {
        /// The `--console` file.
        path: PathBuf,
        /// Why it could not be opened.
        source: std::io::Error,
    },
    /// Another host resource failed: eventfds, threads, signal handlers, seccomp, the
    /// event loop, the runtime directory.
    #[error("host resource: {0}")]
    Host(String),
}

pub(crate) fn host_err(what: &str) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |e| BuildError::Host(format!("{what}: {e}"))
}

/// Host-side options that are not part of the guest's description.
pub struct RunOptions {
    /// The KVM device (normally /dev/kvm).
    pub kvm_device: PathBuf,
    /// Install seccomp filters on VMM threads.
    pub seccomp: bool,
}

/// What to build besides the guest itself.
pub(crate) struct VmSpec {
    pub config: VmConfig,
    /// "GVM"/"SVM" when one process runs several VMs; empty otherwise.
    pub label: &'static str,
    /// CPUs listed in the MADT as possible but never started (DESIGN.md 4.1).
    pub spare_cpus: u8,
    /// Copy console output here too (for `exterior-vmm console`).
    pub console_tap: Option<Arc<ConsoleTap>>,
    /// A second serial port (COM2) carrying frames, delivered to this inbox.
    pub link: Option<Arc<LinkInbox>>,
}

/// A VM whose memory is loaded and whose devices and vCPUs exist, ready to start.
pub(crate) struct BuiltVm {
    pub label: &'static str,
    pub memory: SharedMemory,
    pub vm: Vm,
    vcpus: Vec<Vcpu>,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    /// Passed by device threads around each request; paused while the VM is held.
    pub dma_gate: Arc<DmaGate>,
    pub console: Arc<Mutex<ConsoleSerial>>,
    pub link: Option<Arc<Mutex<LinkSerial>>>,
    exit: Arc<ExitSignal>,
    /// One per vCPU, filled by [`BuiltVm::start`]: how the quiescer holds them.
    pub controls: Vec<Arc<VcpuControl>>,
    /// Handles one I/O port on every vCPU (set before [`BuiltVm::start`]).
    pub port_hook: Option<Arc<dyn PortHook>>,
}

fn serial_irq(vm: &Vm, gsi: u32) -> Result<EventFd, BuildError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
    vm.fd
        .register_irqfd(&irq, gsi)
        .map_err(kvm_err("register serial irqfd"))?;
    Ok(irq)
}

/// The irqfd and the queues' notification eventfds of virtio slot `index`: KVM raises the
/// slot's GSI when the irqfd is written, and signals queue *q*'s eventfd when the driver
/// writes *q* to the slot's QueueNotify register (so a vCPU never leaves the kernel for
/// it). `blocking`: whether the eventfds block in read(2).
fn virtio_slot_events(
    vm: &Vm,
    index: usize,
    queues: u32,
    blocking: bool,
) -> Result<(u64, Arc<Interrupt>, Vec<EventFd>), BuildError> {
    let (base, gsi) = layout::virtio_slot(index);
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("virtio irq eventfd"))?;
    vm.fd
        .register_irqfd(&irq, gsi)
        .map_err(kvm_err("register virtio irqfd"))?;
    let notify = base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
    let flags = if blocking { 0 } else { libc::EFD_NONBLOCK };
    let mut evts = Vec::new();
    for queue in 0..queues {
        let evt = EventFd::new(flags).map_err(host_err("virtio queue eventfd"))?;
        let registered = if queues == 1 {
            vm.fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(notify), NoDatamatch)
        } else {
            vm.fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(notify), queue)
        };
        registered.map_err(kvm_err("register virtio ioeventfd"))?;
        evts.push(evt);
    }
    Ok((base, Arc::new(Interrupt::new(irq)), evts))
}

/// A device for a virtio slot: its MMIO base, the device, its interrupt, its queues'
/// eventfds.
type SlotDevice = (u64, Box<dyn VirtioDevice>, Arc<Interrupt>, Vec<EventFd>);

/// The virtio devices: `disks` (virtio-blk) then `nets` (virtio-net), in the MMIO slots the
/// DSDT describes, each with an I/O thread behind its own seccomp filter that passes
/// `dma_gate` around every request and stops the VM through `exit` if it cannot go on.
fn virtio_devices(
    vm: &Vm,
    memory: &SharedMemory,
    disks: Vec<crate::devices::virtio::block::DiskImage>,
    nets: Vec<crate::config::NetDevice>,
    dma_gate: &Arc<DmaGate>,
    exit: &Arc<ExitSignal>,
    seccomp: bool,
) -> Result<MmioBus, BuildError> {
    let mut bus = MmioBus::new();
    if seccomp && !(disks.is_empty() && nets.is_empty()) {
        // Before the I/O threads confine themselves: a call their filter blocks is named.
        seccomp::install_sigsys_handler().map_err(host_err("SIGSYS handler"))?;
    }
    let confine = move |kind| {
        move || {
            if seccomp {
                seccomp::install(kind)
            } else {
                Ok(())
            }
        }
    };
    let fatal = || {
        let exit = exit.clone();
        move |why| exit.signal(ExitReason::VmmError(why))
    };
    let mut devices: Vec<SlotDevice> = Vec::new();
    let disk_count = disks.len();
    for (index, disk) in disks.into_iter().enumerate() {
        let (base, interrupt, evts) = virtio_slot_events(vm, index, 1, true)?;
        let block = Block::new(
            disk,
            &evts[0],
            interrupt.clone(),
            dma_gate.clone(),
            confine(ThreadKind::BlockIo),
            fatal(),
        )
        .map_err(host_err("virtio-blk I/O thread"))?;
        devices.push((base, Box::new(block), interrupt, evts));
    }
    for (i, net) in nets.into_iter().enumerate() {
        let (base, interrupt, evts) = virtio_slot_events(vm, disk_count + i, 2, false)?;
        let device = Net::new(
            net.tap,
            net.mac,
            [&evts[0], &evts[1]],
            interrupt.clone(),
            dma_gate.clone(),
            confine(ThreadKind::NetIo),
            fatal(),
        )
        .map_err(host_err("virtio-net I/O thread"))?;
        devices.push((base, Box::new(device), interrupt, evts));
    }
    for (base, device, interrupt, evts) in devices {
        let transport = MmioTransport::new(device, memory.mem.clone(), interrupt, evts)
            .map_err(BuildError::Host)?;
        bus.insert(base, MMIO_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|e| BuildError::Host(e.to_string()))?;
    }
    Ok(bus)
}

/// Builds a VM from `spec`; its stops are reported to `exit`.
pub(crate) fn build_vm(
    spec: VmSpec,
    exit: Arc<ExitSignal>,
    opts: &RunOptions,
) -> Result<BuiltVm, BuildError> {
    let mut config = spec.config;
    let disks = std::mem::take(&mut config.disks);
    let nets = std::mem::take(&mut config.nets);
    // 1. Guest memory and everything the kernel finds in it: no KVM needed yet, so a bad
    //    kernel or initrd is reported before the host is touched.
    let memory = create_guest_memory("exterior-guest-ram", config.mem_bytes())?;
    let mem = &memory.mem;
    let tables = acpi::build(
        config.cpus,
        spec.spare_cpus,
        spec.link.is_some(),
        disks.len() + nets.len(),
    );
    mem.write_slice(&tables.bytes, GuestAddress(layout::ACPI_START))
        .map_err(|e| BuildError::BootData(format!("ACPI tables: {e}")))?;
    let boot = loader::load_linux(
        mem,
        config.mem_bytes(),
        &config.kernel,
        config.initrd.as_deref(),
        &config.cmdline,
        GuestAddress(tables.rsdp_addr),
    )
    .map_err(|source| BuildError::Load {
        path: config.kernel_path.clone(),
        source,
    })?;
    cpu::write_boot_structures(mem).map_err(|e| BuildError::BootData(e.to_string()))?;

    // 2. KVM objects.
    let vm = Vm::new(&opts.kvm_device)?;
    vm.register_memory(mem)?;
    vm.setup_irqchip()?;

    // 3. Devices.
    let console_out: Box<dyn Write + Send> = match &config.console {
        ConsoleTarget::Stdout => Box::new(std::io::stdout()),
        ConsoleTarget::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::Console {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let mut sink = ConsoleSink::new(console_out);
    if let Some(tap) = spec.console_tap {
        sink = sink.with_tap(tap);
    }
    let console = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq(&vm, COM1_GSI)?,
        sink,
    )));
    let mut bus = PioBus::new();
    let overlap = |e: crate::devices::bus::OverlapError| BuildError::Host(e.to_string());
    bus.insert(COM1_BASE, COM_LEN, console.clone())
        .map_err(overlap)?;
    let link = match spec.link {
        Some(inbox) => {
            let serial = Arc::new(Mutex::new(SerialDevice::new(
                serial_irq(&vm, COM2_GSI)?,
                LinkSink::new(inbox),
            )));
            bus.insert(COM2_BASE, COM_LEN, serial.clone())
                .map_err(overlap)?;
            Some(serial)
        }
        None => None,
    };
    bus.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )
    .map_err(overlap)?;
    bus.insert(CMOS_BASE, CMOS_LEN, Arc::new(Mutex::new(Cmos::default())))
        .map_err(overlap)?;
    bus.insert(
        PVPANIC_PORT,
        PVPANIC_LEN,
        Arc::new(Mutex::new(PvPanic::new(
            exit.clone(),
            console.clone(),
            spec.label,
        ))),
    )
    .map_err(overlap)?;

    let dma_gate = Arc::new(DmaGate::default());
    let mmio = virtio_devices(&vm, &memory, disks, nets, &dma_gate, &exit, opts.seccomp)?;

    // 4. vCPUs.
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for index in 0..config.cpus {
        let vcpu = Vcpu::new(&vm.fd, index)?;
        vcpu.configure(&vm, config.cpus, &boot)?;
        vcpus.push(vcpu);
    }
    Ok(BuiltVm {
        label: spec.label,
        memory,
        vm,
        vcpus,
        bus: Arc::new(bus),
        mmio: Arc::new(mmio),
        dma_gate,
        console,
        link,
        exit,
        controls: Vec::new(),
        port_hook: None,
    })
}

impl BuiltVm {
    /// Starts one thread per vCPU, each behind the vCPU seccomp filter.
    pub fn start(&mut self, seccomp: bool) -> Result<(), BuildError> {
        quiesce::install_kick_handler().map_err(host_err("vCPU kick signal handler"))?;
        let prefix = if self.label.is_empty() {
            "vcpu".to_string()
        } else {
            format!("{}-vcpu", self.label.to_lowercase())
        };
        for vcpu in self.vcpus.drain(..) {
            let (bus, mmio, exit) = (self.bus.clone(), self.mmio.clone(), self.exit.clone());
            let control = Arc::new(VcpuControl::default());
            self.controls.push(control.clone());
            let label = self.label;
            let hook = self.port_hook.clone();
            std::thread::Builder::new()
                .name(format!("{prefix}{}", vcpu.index))
                .spawn(move || {
                    if seccomp {
                        if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                            exit.signal(ExitReason::VmmError(e));
                            return;
                        }
                    }
                    vcpu.run(bus, mmio, exit, label, control, hook);
                })
                .map_err(host_err("spawn vCPU thread"))?;
        }
        Ok(())
    }

    /// The port-I/O bus of this VM's devices (the redirect vCPU's printk goes to the GVM's).
    pub fn bus(&self) -> Arc<PioBus> {
        self.bus.clone()
    }

    /// The panic line this VM's kernel printed, if any.
    pub fn panic_line(&self) -> Option<String> {
        lock(&self.console).panic_line()
    }

    /// Ends this VM's part in the process. The vCPU threads keep using guest memory until
    /// the process exits, so the memory must stay mapped: it is deliberately not unmapped.
    pub fn retire(self) {
        lock(&self.console).flush();
        std::mem::forget(self);
    }
}

/// A reset stays a reset whatever the console said: only the kernel's pvpanic report makes
/// a panic (console text is the guest users' too). A panic line before a plain reset is
/// worth a warning, though: the kernel probably panicked without the pvpanic driver loaded.
pub(crate) fn warn_of_unreported_panic(label: &str, reason: &ExitReason, line: Option<String>) {
    if let (ExitReason::Reset, Some(line)) = (reason, line) {
        log::warn!(
            "{label}{}the console showed \"{line}\" before the reset, but the kernel reported \
             no panic (pvpanic; is the pvpanic-mmio module loaded?): treated as a reset",
            if label.is_empty() { "" } else { ": " }
        );
    }
}

/// An event-loop subscriber.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the event loop on this thread, behind the event-loop seccomp filter, until a stop
/// reason is recorded in `exit`. One of `subscribers` must consume `exit`'s eventfd.
pub(crate) fn run_event_loop(
    subscribers: Vec<Subscriber>,
    exit: &ExitSignal,
    opts: &RunOptions,
) -> Result<ExitReason, BuildError> {
    let mut manager = EventManager::<Subscriber>::new()
        .map_err(|e| BuildError::Host(format!("event manager: {e:?}")))?;
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    if opts.seccomp {
        seccomp::install(ThreadKind::EventLoop).map_err(BuildError::Host)?;
    }
    loop {
        if let Some(reason) = exit.reason() {
            return Ok(reason);
        }
        manager
            .run()
            .map_err(|e| BuildError::Host(format!("event loop: {e:?}")))?;
    }
}

/// Boots `config` and runs it until the guest stops. Returns why it stopped.
pub fn run_vm(config: VmConfig, opts: &RunOptions) -> Result<ExitReason, BuildError> {
    let exit = Arc::new(ExitSignal::new().map_err(host_err("exit eventfd"))?);
    let spec = VmSpec {
        config,
        label: "",
        spare_cpus: 0,
        console_tap: None,
        link: None,
    };
    let mut vm = build_vm(spec, exit.clone(), opts)?;
    if opts.seccomp {
        seccomp::install_sigsys_handler().map_err(host_err("SIGSYS handler"))?;
    }
    vm.start(opts.seccomp)?;
    let reason = {
        let _raw = RawModeGuard::enable(libc::STDIN_FILENO);
        let subscribers: Vec<Subscriber> = vec![
            Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })),
            Arc::new(Mutex::new(StdinInput {
                serial: vm.console.clone(),
            })),
        ];
        run_event_loop(subscribers, &exit, opts)?
    };
    warn_of_unreported_panic("", &reason, vm.panic_line());
    vm.retire();
    Ok(reason)
}
