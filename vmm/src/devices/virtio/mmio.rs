//! The virtio-mmio register file (virtio 1.2, section 4.2.2), version 2 ("modern") only.
//!
//! The driver's writes are checked against the device status: feature and queue registers
//! change only before DRIVER_OK, FEATURES_OK sticks only for features the device offered
//! (VERSION_1 among them), and a queue is handed to the device only if virtio-queue finds
//! its rings valid in guest memory. Anything else is ignored, or marks the device
//! NEEDS_RESET, as the spec lets a device do; nothing the guest writes can panic the VMM.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};
use crate::devices::bus::MmioDevice;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION_MODERN: u32 = 2;
/// Vendor id reported to the driver ("EXVM" is not a PCI vendor; virtio-mmio has none).
const VENDOR_ID: u32 = 0x4d56_5845;

/// A virtio device behind the MMIO transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap<()>,
    interrupt: Arc<Interrupt>,
    /// Written by QueueNotify when the write did not go to the ioeventfd (KVM matches
    /// the notify address itself, so this is the fallback).
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    /// Each queue's descriptor table, available and used ring addresses as the driver
    /// wrote them (in halves); checked by virtio-queue at DRIVER_OK.
    rings: Vec<[u64; 3]>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    activated: bool,
    /// The driver wrote a queue size the queue could not take.
    bad_queue_size: bool,
}

impl MmioTransport {
    /// `queue_evts` are the device's notification eventfds, one per queue (registered as
    /// ioeventfds on the QueueNotify register by the builder).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap<()>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, String> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("virtio queue of {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if queues.len() != queue_evts.len() {
            return Err("virtio-mmio: one notification eventfd per queue".into());
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            rings: vec![[0; 3]; queues.len()],
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            activated: false,
            bad_queue_size: false,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the driver sets the device up.
    fn queues_configurable(&self) -> bool {
        !self.activated
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        // Always: a device whose activation half-failed may still hold its queues.
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.rings.iter_mut().for_each(|r| *r = [0; 3]);
        self.activated = false;
        self.bad_queue_size = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 3.1.1); FAILED may come at any time.
        if value & self.status != self.status {
            log::warn!(
                "virtio-mmio: the driver cleared status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        let new = value & !self.status;
        self.status = value;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.acked_features & !offered != 0 || self.acked_features & version_1 == 0 {
                // The driver reads FEATURES_OK back and gives up when it did not stick.
                self.status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// Marks the device broken; a driver past DRIVER_OK hears of it by a config interrupt.
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.signal_config();
        }
    }

    fn activate(&mut self) {
        let needed =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        if self.activated
            || self.status & needed != needed
            || self.status & VIRTIO_CONFIG_S_FAILED != 0
        {
            self.needs_reset();
            return;
        }
        // Misaligned or wrapping ring addresses are refused here (virtio-queue's checks),
        // not silently replaced by the previous value.
        let placed = self.queues.iter_mut().zip(&self.rings).all(|(q, r)| {
            q.try_set_desc_table_address(GuestAddress(r[0])).is_ok()
                && q.try_set_avail_ring_address(GuestAddress(r[1])).is_ok()
                && q.try_set_used_ring_address(GuestAddress(r[2])).is_ok()
        });
        let all_valid = placed
            && !self.bad_queue_size
            && self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem));
        if !all_valid {
            log::debug!("virtio-mmio: DRIVER_OK with a queue not ready, misplaced or outside RAM");
            self.needs_reset();
            return;
        }
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                log::debug!("virtio-mmio: copying the queue configuration: {e:?}");
                self.needs_reset();
                return;
            }
        };
        match self
            .device
            .activate(self.mem.clone(), queues, self.acked_features)
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::warn!("virtio-mmio: activating the device failed: {e}");
                self.needs_reset();
            }
        }
    }

    /// Sets the low (`high == false`) or high half of ring address `which` of the selected
    /// queue (0 descriptors, 1 available, 2 used).
    fn set_ring_half(&mut self, which: usize, high: bool, value: u32) {
        if let Some(r) = self.rings.get_mut(self.queue_sel as usize) {
            r[which] = if high {
                (r[which] & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (r[which] & !0xffff_ffff) | u64::from(value)
            };
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let configurable = self.queues_configurable();
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                let before_features_ok = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if before_features_ok {
                    match self.driver_features_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            reg::VIRTIO_MMIO_QUEUE_NUM if configurable => {
                // virtio-queue refuses sizes that are zero, not a power of two or above
                // the maximum; the driver would then use a ring of a size the device does
                // not, so DRIVER_OK is refused until a reset.
                let size = u16::try_from(value).ok();
                let set = match (self.selected_queue(), size) {
                    (Some(q), Some(size)) => q.try_set_size(size).is_ok(),
                    _ => false,
                };
                self.bad_queue_size |= !set;
            }
            reg::VIRTIO_MMIO_QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            // Linux's vm_del_vq writes 0 and warns unless it reads 0 back, also on probe
            // error paths that never reset: the queue stops, and with it the device.
            reg::VIRTIO_MMIO_QUEUE_READY if value == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(false);
                }
                if self.activated {
                    self.device.reset();
                    self.activated = false;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => self.set_ring_half(0, false, value),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => self.set_ring_half(0, true, value),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => self.set_ring_half(1, false, value),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => self.set_ring_half(1, true, value),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW if configurable => self.set_ring_half(2, false, value),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => self.set_ring_half(2, true, value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY if self.activated => {
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio-mmio: queue notification: {e}");
                    }
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => log::debug!("virtio-mmio: write {value:#x} to register {offset:#x} ignored"),
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION_MODERN,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.device.read_config(offset - config, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
        } else {
            // Registers are 32-bit (virtio 1.2, 4.2.2.2).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            // No device here has a writable config field (no CONFIG_WCE, no MQ).
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the transport asked of it.
    #[derive(Default)]
    struct Log {
        activated: Vec<(u16, u64)>,
        resets: usize,
    }

    struct Fake(Arc<Mutex<Log>>);

    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 9);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            OFFERED
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap<()>,
            queues: Vec<Queue>,
            features: u64,
        ) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .activated
                .push((queues[0].size(), features));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(Fake(log.clone())), mem, irq, vec![evt]).unwrap();
        (t, log)
    }

    fn r(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// The Linux driver's sequence up to FEATURES_OK, acking `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 2);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1 << 9);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [0x42, 0x42], "config space goes to the device");
    }

    #[test]
    fn the_driver_handshake_activates_the_device_once() {
        let (mut t, log) = transport();
        negotiate(&mut t, OFFERED);
        setup_queue(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ALL_OK);
        assert_eq!(log.lock().unwrap().activated, vec![(8, OFFERED)]);
        // Queue registers are frozen now.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 4);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(log.lock().unwrap().activated.len(), 1);
        // Reset hands the queues back and clears everything.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn features_the_device_did_not_offer_or_no_version_1_do_not_stick() {
        for acked in [OFFERED | (1 << 3), 1 << 9] {
            let (mut t, log) = transport();
            negotiate(&mut t, acked);
            let status = r(&mut t, reg::VIRTIO_MMIO_STATUS);
            assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "{acked:#x}");
            setup_queue(&mut t);
            w(
                &mut t,
                reg::VIRTIO_MMIO_STATUS,
                status | VIRTIO_CONFIG_S_DRIVER_OK,
            );
            assert!(log.lock().unwrap().activated.is_empty());
            assert_ne!(
                r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
                0
            );
        }
    }

    #[test]
    fn a_queue_outside_ram_or_of_a_bad_size_is_not_activated() {
        for (num, desc) in [(8, 0x10_0000u32), (6, 0x1000), (32, 0x1000), (8, 0x1001)] {
            let (mut t, log) = transport();
            negotiate(&mut t, OFFERED);
            setup_queue(&mut t);
            w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, num);
            w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
            w(&mut t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
            assert!(
                log.lock().unwrap().activated.is_empty(),
                "num {num} desc {desc:#x}"
            );
            assert_ne!(
                r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
                0
            );
        }
    }

    #[test]
    fn a_queue_turned_off_after_driver_ok_stops_the_device_and_reads_back_off() {
        let (mut t, log) = transport();
        negotiate(&mut t, OFFERED);
        setup_queue(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(log.lock().unwrap().activated.len(), 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(log.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_broken_setup_after_driver_ok_raises_a_config_interrupt() {
        let (mut t, _) = transport();
        negotiate(&mut t, OFFERED);
        setup_queue(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0000); // outside RAM
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            2,
            "INT_CONFIG"
        );
    }

    #[test]
    fn odd_accesses_and_cleared_status_bits_are_ignored() {
        let (mut t, log) = transport();
        negotiate(&mut t, OFFERED);
        setup_queue(&mut t);
        // A two-byte or unaligned write to STATUS does nothing.
        t.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[0xff, 0]);
        t.write(
            u64::from(reg::VIRTIO_MMIO_STATUS) + 1,
            &ALL_OK.to_le_bytes(),
        );
        assert!(log.lock().unwrap().activated.is_empty());
        let mut b = [0xaau8; 2];
        t.read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut b);
        assert_eq!(b, [0, 0]);
        // Dropping ACKNOWLEDGE while adding DRIVER_OK is not a legal transition.
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ALL_OK & !VIRTIO_CONFIG_S_ACKNOWLEDGE,
        );
        assert!(log.lock().unwrap().activated.is_empty());
        // Interrupt status is acknowledged bit by bit.
        t.interrupt.signal_used_queue();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }
}
