//! Virtio devices on the virtio-mmio transport (virtio 1.x, MMIO version 2).
//!
//! The virtqueues are rust-vmm's `virtio-queue`; this module adds what that crate leaves
//! to the VMM: the MMIO register file ([`mmio::MmioTransport`]), the interrupt
//! ([`Interrupt`]), and the devices ([`block`]). The pinned kernel has no command-line
//! virtio-mmio devices, so each device is also described in the DSDT (ACPI id `LNRO0005`,
//! `boot::acpi`), and the guest's initramfs loads `virtio_mmio` (DESIGN.md 5.1).
//!
//! Every register value, descriptor and buffer address comes from the guest and is hostile
//! input: the transport accepts only what the virtio spec allows in the current state, and
//! devices reach guest memory only through vm-memory's checked accessors.

pub mod block;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Bytes of guest-physical space per device: registers, then the config space at 0x100.
pub const MMIO_SIZE: u64 = 0x1000;

/// The used-ring bit of the interrupt status register (VIRTIO_MMIO_INT_VRING).
const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// The configuration-change bit (VIRTIO_MMIO_INT_CONFIG).
const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt: the status register the driver reads and acknowledges, and the
/// irqfd that raises the device's GSI (edge-triggered, as the DSDT declares it).
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt: cannot signal the irqfd: {e}");
        }
    }

    /// Tells the driver that the device's configuration (or status) changed.
    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt: cannot signal the irqfd: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's InterruptACK write: clears the bits it handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Starts a device's I/O thread `name`: `confine` (its seccomp filter) runs first on it, and
/// its failure is this call's, so a device never runs unconfined or silently dead; then
/// `run`, which never returns.
pub(crate) fn spawn_io_thread(
    name: &str,
    confine: impl FnOnce() -> Result<(), String> + Send + 'static,
    run: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let (confined_tx, confined_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let confined = confine();
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if ok {
                run();
            }
        })?;
    match confined_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(format!("{name} thread: {e}"))),
        Err(_) => Err(std::io::Error::other(format!(
            "{name} thread ended at start"
        ))),
    }
}

/// Ends an I/O thread's service for good: reports `why` through `fatal` (which stops the
/// VM) and parks. It never returns, so the thread never closes its descriptors (which its
/// seccomp filter does not allow); the process exit ends it.
pub(crate) fn give_up(fatal: &dyn Fn(String), why: String) -> ! {
    fatal(why);
    loop {
        std::thread::park();
    }
}

/// Reads a device's config space `config` at `offset` into `data`; bytes past its end read
/// as zeros (the guest chooses the offset and width).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// What the transport needs from a device. Queues are configured through the transport and
/// handed over on activation; `reset` takes them back.
pub trait VirtioDevice: Send {
    /// The virtio device id (VIRTIO_ID_BLOCK, ...).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific config space at `offset` (out of range reads as zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving `queues` with the features the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<virtio_queue::Queue>,
        acked_features: u64,
    ) -> Result<(), String>;
    /// Stops touching guest memory before it returns (the driver may free the rings next).
    fn reset(&mut self);
}
