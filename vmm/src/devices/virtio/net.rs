//! virtio-net on a tap device (virtio 1.2, section 5.1): one receive and one transmit
//! queue, the MAC in the config space, no offloads.
//!
//! Frames cross between the tap and guest memory on a `net-io` thread of their own
//! (behind its own seccomp filter) that waits in epoll on the tap and on the two queues'
//! ioeventfds. Both sides carry the same 12-byte virtio-net header, so a frame is copied
//! once each way through a bounce buffer. When the guest has posted no receive buffers
//! the frame read from the tap is kept and the tap is left unwatched until the guest
//! posts some, so nothing spins and nothing is dropped by the device.
//!
//! Hostile input: transmit chains are capped in length and in bytes, their header is
//! zeroed before the host kernel sees it (no offload was negotiated, so no checksum or
//! segmentation request may reach the tap), and a driver that breaks a ring is served
//! nothing more until it resets.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{give_up, Interrupt, VirtioDevice};
use crate::devices::tap::{FramePort, VNET_HDR_LEN};
use crate::sync::lock;
use crate::vstate::dma_gate::DmaGate;

pub const QUEUE_SIZE: u16 = 256;
/// The largest frame with its header: a 64 KiB packet plus Ethernet header (the guest's
/// MTU may be raised that far without VIRTIO_NET_F_MTU).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535;
/// The shortest: header plus an Ethernet header.
const MIN_FRAME: usize = VNET_HDR_LEN + 14;
/// Frames moved per round before the worker lets go of the device.
const BATCH: usize = QUEUE_SIZE as usize;
/// More descriptors than this in one transmit chain is a hostile chain.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// A MAC address.
pub type Mac = [u8; 6];

/// The rings while the driver has the device running.
struct Active {
    mem: GuestMemoryMmap<()>,
    rx: Queue,
    tx: Queue,
    broken: bool,
}

/// What the worker and the transport share.
struct Shared<P> {
    port: P,
    active: Option<Active>,
    /// A frame read from the port that no receive buffer has taken yet: its length in
    /// `rx_buf`.
    deferred: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    /// The driver wants an interrupt.
    notify: bool,
    /// Receive only: a frame waits for buffers the guest has not posted.
    starved: bool,
    /// Work is left: go again without waiting.
    more: bool,
}

impl<P: FramePort> Shared<P> {
    fn new(port: P) -> Self {
        Self {
            port,
            active: None,
            deferred: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
        }
    }

    /// Sends what the guest queued for transmission.
    fn transmit(&mut self, gate: &DmaGate, stop: &AtomicBool) -> Round {
        let Some(Active {
            mem, tx, broken, ..
        }) = self.active.as_mut()
        else {
            return Round::default();
        };
        let mut round = Round::default();
        let mut used = false;
        for served in 0..=BATCH {
            let _pass = gate.enter();
            if *broken || tx.iter(&*mem).is_err() {
                *broken = true;
                log::debug!("virtio-net: the driver broke its transmit ring");
                break;
            }
            if served == BATCH || stop.load(Ordering::Relaxed) {
                round.more = true;
                break;
            }
            let Some(chain) = tx.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            // Gather the frame; anything malformed is dropped, the chain still returned.
            let mut len = 0usize;
            let mut ok = true;
            for (n, d) in chain.enumerate() {
                let dlen = d.len() as usize;
                let end = len.checked_add(dlen).filter(|&e| e <= MAX_FRAME);
                match end {
                    Some(end) if n < MAX_CHAIN && !d.is_write_only() => {
                        if mem
                            .read_slice(&mut self.tx_buf[len..end], d.addr())
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                        len = end;
                    }
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok && len >= MIN_FRAME {
                // No offload was negotiated: the header asks for nothing.
                self.tx_buf[..VNET_HDR_LEN].fill(0);
                if let Err(e) = self.port.send(&self.tx_buf[..len]) {
                    log::debug!("virtio-net: a frame was not sent: {e}");
                }
            }
            if tx.add_used(&*mem, head, 0).is_err() {
                *broken = true;
                break;
            }
            used = true;
        }
        let _pass = gate.enter();
        round.notify = used && tx.needs_notification(&*mem).unwrap_or(true);
        round
    }

    /// Moves frames from the port into the guest's receive buffers.
    fn receive(&mut self, gate: &DmaGate, stop: &AtomicBool) -> Round {
        let Some(Active {
            mem, rx, broken, ..
        }) = self.active.as_mut()
        else {
            return Round::default();
        };
        let mut round = Round::default();
        let mut used = false;
        for served in 0..=BATCH {
            let _pass = gate.enter();
            if *broken || rx.iter(&*mem).is_err() {
                *broken = true;
                log::debug!("virtio-net: the driver broke its receive ring");
                break;
            }
            if served == BATCH || stop.load(Ordering::Relaxed) {
                round.more = true;
                break;
            }
            let len = match self.deferred {
                Some(len) => len,
                None => match self.port.recv(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::debug!("virtio-net: reading the tap: {e}");
                        break;
                    }
                },
            };
            self.deferred = Some(len);
            let Some(chain) = rx.pop_descriptor_chain(&*mem) else {
                round.starved = true;
                break;
            };
            self.deferred = None;
            let head = chain.head_index();
            // Without VIRTIO_NET_F_MRG_RXBUF a frame takes one buffer (virtio 1.2, 5.1.6.3.2).
            if len >= VNET_HDR_LEN {
                self.rx_buf[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            }
            let mut written = 0usize;
            for (n, d) in chain.enumerate() {
                if written == len || n >= MAX_CHAIN || !d.is_write_only() {
                    break;
                }
                let k = (d.len() as usize).min(len - written);
                if mem
                    .write_slice(&self.rx_buf[written..written + k], d.addr())
                    .is_err()
                {
                    break;
                }
                written += k;
            }
            // A frame that did not fit is dropped; the buffer goes back unused.
            let used_len = if written == len { len as u32 } else { 0 };
            if rx.add_used(&*mem, head, used_len).is_err() {
                *broken = true;
                break;
            }
            used = true;
        }
        let _pass = gate.enter();
        round.notify = used && rx.needs_notification(&*mem).unwrap_or(true);
        round
    }
}

/// The virtio-net device.
pub struct Net<P> {
    shared: Arc<Mutex<Shared<P>>>,
    stop: Arc<AtomicBool>,
    mac: Mac,
    rx_evt: EventFd,
    queue_sizes: [u16; 2],
}

const TOKEN_TAP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;

impl<P: FramePort + AsRawFd + 'static> Net<P> {
    /// The device and its I/O thread, which waits on the port and the two queues'
    /// eventfds (`evts`: receive, transmit) and raises `interrupt`. `confine` runs first on
    /// that thread (its failure fails this call); `fatal` stops the VM should the thread
    /// become unable to wait.
    pub fn new(
        port: P,
        mac: Mac,
        evts: [&EventFd; 2],
        interrupt: Arc<Interrupt>,
        gate: Arc<DmaGate>,
        confine: impl FnOnce() -> Result<(), String> + Send + 'static,
        fatal: impl Fn(String) + Send + 'static,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let port_fd = port.as_raw_fd();
        let (rx_evt, tx_evt) = (evts[0].try_clone()?, evts[1].try_clone()?);
        epoll.ctl(
            ControlOperation::Add,
            port_fd,
            EpollEvent::new(EventSet::empty(), TOKEN_TAP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            rx_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_RX),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            tx_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TX),
        )?;
        let shared = Arc::new(Mutex::new(Shared::new(port)));
        let stop = Arc::new(AtomicBool::new(false));
        let own_rx = evts[0].try_clone()?;
        let worker = Worker {
            shared: shared.clone(),
            stop: stop.clone(),
            epoll,
            port_fd,
            rx_evt,
            tx_evt,
            interrupt,
            gate,
        };
        super::spawn_io_thread("net-io", confine, move || worker.run(&fatal))?;
        Ok(Self {
            shared,
            stop,
            mac,
            rx_evt: own_rx,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
        })
    }
}

struct Worker<P> {
    shared: Arc<Mutex<Shared<P>>>,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
    port_fd: i32,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<Interrupt>,
    gate: Arc<DmaGate>,
}

impl<P: FramePort> Worker<P> {
    /// Never returns (see `block::Worker::run`).
    fn run(self, fatal: &dyn Fn(String)) -> ! {
        let mut events = [EpollEvent::default(); 3];
        let mut watching_port = false;
        loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => give_up(fatal, format!("virtio-net I/O thread: waiting: {e}")),
            }
            // Both eventfds are non-blocking: a read that finds nothing is harmless.
            let _ = self.rx_evt.read();
            let _ = self.tx_evt.read();
            let mut shared = lock(&self.shared);
            let tx = shared.transmit(&self.gate, &self.stop);
            let rx = shared.receive(&self.gate, &self.stop);
            if tx.notify || rx.notify {
                self.interrupt.signal_used_queue();
            }
            let want_port = shared.active.is_some() && !rx.starved;
            drop(shared);
            if tx.more {
                let _ = self.tx_evt.write(1);
            }
            if rx.more {
                let _ = self.rx_evt.write(1);
            }
            if want_port != watching_port {
                let events = if want_port {
                    EventSet::IN
                } else {
                    EventSet::empty()
                };
                let event = EpollEvent::new(events, TOKEN_TAP);
                if let Err(e) = self
                    .epoll
                    .ctl(ControlOperation::Modify, self.port_fd, event)
                {
                    give_up(
                        fatal,
                        format!("virtio-net I/O thread: watching the tap: {e}"),
                    );
                }
                watching_port = want_port;
            }
        }
    }
}

impl<P: FramePort> VirtioDevice for Net<P> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6] first; nothing else is offered.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), String> {
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err("virtio-net: two queues expected".into());
        };
        lock(&self.shared).active = Some(Active {
            mem,
            rx,
            tx,
            broken: false,
        });
        // The worker starts watching the tap and serves what was queued before DRIVER_OK.
        self.rx_evt
            .write(1)
            .map_err(|e| format!("virtio-net: waking the I/O thread: {e}"))
    }

    fn reset(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            let mut shared = lock(&self.shared);
            shared.active = None;
            shared.deferred = None;
        }
        self.stop.store(false, Ordering::Relaxed);
        // The worker stops watching the tap on its next round.
        let _ = self.rx_evt.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[derive(Default)]
    struct FakePort {
        inbox: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl FramePort for FakePort {
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let frame = self
                .inbox
                .pop_front()
                .ok_or_else(|| std::io::Error::from(ErrorKind::WouldBlock))?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
    }

    const RXQ: u64 = 0x0;
    const TXQ: u64 = 0x1_0000;
    const BUF: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A device with its two queues in `mem`, and the mock queues to fill them.
    fn device(
        mem: &GuestMemoryMmap<()>,
    ) -> (
        Shared<FakePort>,
        MockSplitQueue<'_, GuestMemoryMmap<()>>,
        MockSplitQueue<'_, GuestMemoryMmap<()>>,
    ) {
        let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(mem, GuestAddress(TXQ), 16);
        let mut shared = Shared::new(FakePort::default());
        shared.active = Some(Active {
            mem: mem.clone(),
            rx: rxq.create_queue::<Queue>().unwrap(),
            tx: txq.create_queue::<Queue>().unwrap(),
            broken: false,
        });
        (shared, rxq, txq)
    }

    /// Adds one chain of (address, length, device-writable) buffers at descriptor `at`.
    fn chain(q: &MockSplitQueue<'_, GuestMemoryMmap<()>>, at: u16, bufs: &[(u64, u32, bool)]) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, at + i as u16 + 1))
            })
            .collect();
        q.add_desc_chains(&descs, at).unwrap();
    }

    fn used_len(
        mem: &GuestMemoryMmap<()>,
        q: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
        n: u64,
    ) -> u32 {
        let elem: [u32; 2] = mem
            .read_obj(q.used_addr().unchecked_add(4 + 8 * n))
            .unwrap();
        elem[1]
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    fn go() -> (DmaGate, AtomicBool) {
        (DmaGate::default(), AtomicBool::new(false))
    }

    #[test]
    fn a_transmitted_frame_reaches_the_tap_with_its_header_zeroed() {
        let mem = memory();
        let (mut dev, _rxq, txq) = device(&mem);
        // Header with offload requests the guest may not make, then the frame, split.
        let mut hdr = [0xffu8; VNET_HDR_LEN];
        hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
        mem.write_slice(&[0xab; 60], GuestAddress(BUF + 0x1000))
            .unwrap();
        chain(
            &txq,
            0,
            &[(BUF, VNET_HDR_LEN as u32, false), (BUF + 0x1000, 60, false)],
        );
        let (gate, stop) = go();
        let round = dev.transmit(&gate, &stop);
        assert!(round.notify && !round.more);
        assert_eq!(dev.port.sent.len(), 1);
        let sent = &dev.port.sent[0];
        assert_eq!(sent.len(), VNET_HDR_LEN + 60);
        assert!(
            sent[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "header not zeroed"
        );
        assert!(sent[VNET_HDR_LEN..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn hostile_transmit_chains_are_dropped_but_returned() {
        let mem = memory();
        let (mut dev, _rxq, txq) = device(&mem);
        // Too short; one device-writable buffer; larger than any frame; outside RAM.
        chain(&txq, 0, &[(BUF, 20, false)]);
        chain(&txq, 1, &[(BUF, 100, true)]);
        chain(&txq, 2, &[(BUF, MAX_FRAME as u32, false), (BUF, 1, false)]);
        chain(&txq, 4, &[(1 << 40, 100, false)]);
        let (gate, stop) = go();
        dev.transmit(&gate, &stop);
        assert!(dev.port.sent.is_empty(), "{:?}", dev.port.sent.len());
        assert_eq!(
            dev.active.as_ref().unwrap().tx.next_used(),
            4,
            "every chain returned"
        );
    }

    #[test]
    fn a_received_frame_fills_the_guests_buffers_as_one_buffer() {
        let mem = memory();
        let (mut dev, rxq, _txq) = device(&mem);
        dev.port.inbox.push_back(frame(100, 0x5a));
        chain(&rxq, 0, &[(BUF, 64, true), (BUF + 0x1000, 1526, true)]);
        let (gate, stop) = go();
        let round = dev.receive(&gate, &stop);
        assert!(round.notify && !round.starved);
        assert_eq!(used_len(&mem, &rxq, 0), 100);
        let mut got = [0u8; 100];
        mem.read_slice(&mut got[..64], GuestAddress(BUF)).unwrap();
        mem.read_slice(&mut got[64..], GuestAddress(BUF + 0x1000))
            .unwrap();
        let num_buffers = u16::from_le_bytes([got[10], got[11]]);
        assert_eq!(num_buffers, 1);
        assert!(got[VNET_HDR_LEN..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn a_frame_waits_for_buffers_and_is_not_dropped() {
        let mem = memory();
        let (mut dev, rxq, _txq) = device(&mem);
        dev.port.inbox.push_back(frame(80, 1));
        let (gate, stop) = go();
        let round = dev.receive(&gate, &stop);
        assert!(round.starved && !round.notify);
        assert_eq!(dev.deferred, Some(80));
        chain(&rxq, 0, &[(BUF, 2048, true)]);
        let round = dev.receive(&gate, &stop);
        assert!(round.notify && !round.starved);
        assert_eq!(used_len(&mem, &rxq, 0), 80);
        assert_eq!(dev.deferred, None);
    }

    #[test]
    fn a_frame_larger_than_its_buffer_is_dropped_and_the_buffer_returned_empty() {
        let mem = memory();
        let (mut dev, rxq, _txq) = device(&mem);
        dev.port.inbox.push_back(frame(1000, 2));
        dev.port.inbox.push_back(frame(50, 3));
        chain(&rxq, 0, &[(BUF, 512, true)]);
        chain(&rxq, 1, &[(BUF + 0x1000, 512, true)]);
        let (gate, stop) = go();
        dev.receive(&gate, &stop);
        assert_eq!(used_len(&mem, &rxq, 0), 0);
        assert_eq!(used_len(&mem, &rxq, 1), 50);
    }

    #[test]
    fn a_broken_ring_is_served_nothing() {
        let mem = memory();
        let (mut dev, rxq, txq) = device(&mem);
        dev.port.inbox.push_back(frame(80, 1));
        mem.write_obj(40u16, rxq.avail_addr().unchecked_add(2))
            .unwrap();
        mem.write_obj(40u16, txq.avail_addr().unchecked_add(2))
            .unwrap();
        let (gate, stop) = go();
        assert_eq!(dev.receive(&gate, &stop), Round::default());
        assert_eq!(dev.transmit(&gate, &stop), Round::default());
        assert!(dev.active.as_ref().unwrap().broken);
        assert_eq!(dev.port.inbox.len(), 1, "nothing read for a broken ring");
    }

    #[test]
    fn config_space_is_the_mac() {
        let mac = [0x06, 1, 2, 3, 4, 5];
        let dev = Net::<FakePort> {
            shared: Arc::new(Mutex::new(Shared::new(FakePort::default()))),
            stop: Arc::default(),
            mac,
            rx_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            queue_sizes: [QUEUE_SIZE; 2],
        };
        let mut got = [0u8; 8];
        dev.read_config(0, &mut got);
        assert_eq!(got, [0x06, 1, 2, 3, 4, 5, 0, 0]);
        let mut one = [0u8; 1];
        dev.read_config(5, &mut one);
        assert_eq!(one, [5]);
        assert_ne!(dev.features() & (1 << VIRTIO_NET_F_MAC), 0);
    }
}
