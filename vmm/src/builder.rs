//! Turns a validated [`VmConfig`] into a running VM and waits for it to stop: guest memory,
//! boot data, KVM objects, devices, vCPU threads, then the event loop on this thread.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{acpi, cpu, layout, loader};
use crate::config::{ConsoleTarget, VmConfig};
use crate::devices::bus::lock;
use crate::devices::cmos::Cmos;
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN};
use crate::devices::PioBus;
use crate::event_loop::{ExitWatcher, StdinInput};
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{self, ThreadKind};
use crate::terminal::RawModeGuard;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{Vm, VmError};

const I8042_BASE: u16 = 0x60;
const I8042_LEN: u16 = 5;
const CMOS_BASE: u16 = 0x70;
const CMOS_LEN: u16 = 2;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: loader::LoadError,
    },
    #[error("writing boot structures: {0}")]
    BootData(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("console {path}: {source}")]
    Console {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host resource: {0}")]
    Host(String),
}

/// Host-side options that are not part of the guest's description.
pub struct RunOptions {
    /// The KVM device (normally /dev/kvm).
    pub kvm_device: PathBuf,
    /// Install seccomp filters on VMM threads.
    pub seccomp: bool,
}

fn host_err(what: &str) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |e| BuildError::Host(format!("{what}: {e}"))
}

/// The i8042 reset line stops the VM.
struct ResetLine(Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.signal(ExitReason::Reset);
        Ok(())
    }
}

/// Boots `config` and runs it until the guest stops. Returns why it stopped.
pub fn run_vm(config: VmConfig, opts: &RunOptions) -> Result<ExitReason, BuildError> {
    // 1. Guest memory and everything the kernel finds in it: no KVM needed yet, so a bad
    //    kernel or initrd is reported before the host is touched.
    let shared = create_guest_memory("exterior-guest-ram", config.mem_bytes())?;
    let mem = &shared.mem;
    let tables = acpi::build(config.cpus, 0);
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
    let exit = Arc::new(ExitSignal::new().map_err(host_err("exit eventfd"))?);
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
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_GSI)
        .map_err(crate::vstate::vm::kvm_err("register serial irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        ConsoleSink::new(console_out, exit.clone()),
    )));
    let mut bus = PioBus::new();
    let overlap = |e: crate::devices::bus::OverlapError| BuildError::Host(e.to_string());
    bus.insert(COM1_BASE, COM1_LEN, serial.clone())
        .map_err(overlap)?;
    bus.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042(I8042Device::new(ResetLine(exit.clone()))))),
    )
    .map_err(overlap)?;
    bus.insert(CMOS_BASE, CMOS_LEN, Arc::new(Mutex::new(Cmos::default())))
        .map_err(overlap)?;
    let bus = Arc::new(bus);

    // 4. vCPUs, each on its own thread behind its seccomp filter.
    if opts.seccomp {
        seccomp::install_sigsys_handler().map_err(host_err("SIGSYS handler"))?;
    }
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for index in 0..config.cpus {
        let vcpu = Vcpu::new(&vm.fd, index)?;
        vcpu.configure(&vm, config.cpus, &boot)?;
        vcpus.push(vcpu);
    }
    for vcpu in vcpus {
        let (bus, exit) = (bus.clone(), exit.clone());
        let use_seccomp = opts.seccomp;
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || {
                if use_seccomp {
                    if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                        exit.signal(ExitReason::VmmError(e));
                        return;
                    }
                }
                vcpu.run(bus, exit);
            })
            .map_err(host_err("spawn vCPU thread"))?;
    }

    // 5. The event loop on this thread.
    let reason = event_loop(serial.clone(), exit.clone(), opts)?;
    let mut serial = lock(&serial);
    serial.flush();
    // A panic with panic=-1 ends in a reset: report the panic, not a clean reboot.
    Ok(match (reason, serial.panic_line()) {
        (ExitReason::Reset, Some(line)) => ExitReason::GuestPanic(line),
        (reason, _) => reason,
    })
}

fn event_loop(
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitSignal>,
    opts: &RunOptions,
) -> Result<ExitReason, BuildError> {
    let _raw = RawModeGuard::enable(libc::STDIN_FILENO);
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| BuildError::Host(format!("event manager: {e:?}")))?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
    manager.add_subscriber(Arc::new(Mutex::new(StdinInput { serial })));
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

/// vm-superio's i8042 on the port bus (only the reset command does anything).
struct I8042(I8042Device<ResetLine>);

impl crate::devices::PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(self.0.read(offset as u8));
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(b) = data.first() {
            let _ = self.0.write(offset as u8, *b);
        }
    }
}
