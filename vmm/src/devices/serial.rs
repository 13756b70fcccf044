//! The 16550A serial console (vm-superio) on COM1, raising IRQ 4 through an irqfd, with an
//! output sink that remembers the last panic line the console showed. That line only
//! describes a panic the kernel reported through pvpanic (`devices::pvpanic`): console text
//! is the guest's, any user may print it, so it never decides anything.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;
use crate::sync::lock;

/// The guest console's serial line (COM1).
pub type ConsoleSerial = SerialDevice<ConsoleSink>;
/// The SVM's agent line (COM2): frames to and from `exterior-agent`.
pub type LinkSerial = SerialDevice<LinkSink>;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
pub const COM2_BASE: u16 = 0x2f8;
pub const COM2_GSI: u32 = 3;
pub const COM_LEN: u16 = 8;
/// Input waiting for room in the guest's receive FIFO is bounded; beyond it, input is
/// dropped (a guest that never reads its console cannot make the VMM grow without limit).
const MAX_PENDING_INPUT: usize = 1 << 20;

/// What the kernel prints first when it panics, and (with `panic=0`) last.
const PANIC_START: &str = "Kernel panic - not syncing";
const PANIC_END: &str = "---[ end Kernel panic";
/// Longest console line kept for matching; longer lines are cut (the guest controls them).
const MAX_LINE: usize = 1024;

/// Interrupt line of the serial port: an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Remembers the last console line that looked like a kernel panic. The guest writes these
/// bytes: we keep a bounded line buffer, match one fixed marker, and use the result only to
/// describe a panic the kernel reported through pvpanic. The *last* such line is kept, so a
/// user who printed a fake one earlier does not get to name a real panic.
#[derive(Default)]
pub struct PanicWatch {
    line: Vec<u8>,
    panic_line: Option<String>,
}

impl PanicWatch {
    /// Feeds console bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).trim_end().to_string();
                self.line.clear();
                if let Some(pos) = line.find(PANIC_START).filter(|_| !line.contains(PANIC_END)) {
                    self.panic_line = Some(line[pos..].to_string());
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    /// The last panic line the console showed, if any.
    pub fn panic_line(&self) -> Option<&str> {
        self.panic_line.as_deref()
    }
}

/// A copy of a console's output for clients that attach later (`exterior-vmm console`):
/// the last [`TAP_BACKLOG`] bytes, numbered by their position in the whole output, so that a
/// client is sent each byte once. (It used to get a backlog plus "what arrived since the
/// event loop last looked", and a byte printed between the two came twice: CI saw
/// `10.00.2.15` for `10.0.2.15` on a Debian guest's console.)
pub struct ConsoleTap {
    inner: Mutex<TapBuffers>,
    event: EventFd,
}

#[derive(Default)]
struct TapBuffers {
    backlog: VecDeque<u8>,
    /// Bytes recorded so far: the position just after the backlog's last byte.
    end: u64,
}

/// Bytes of console history replayed to a client that attaches.
pub const TAP_BACKLOG: usize = 64 * 1024;

impl ConsoleTap {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(TapBuffers::default()),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn record(&self, bytes: &[u8]) {
        let mut b = lock(&self.inner);
        b.backlog.extend(bytes);
        let excess = b.backlog.len().saturating_sub(TAP_BACKLOG);
        b.backlog.drain(..excess);
        b.end = b.end.saturating_add(bytes.len() as u64);
        drop(b);
        let _ = self.event.write(1);
    }

    /// The output after position `seen` that the backlog still holds (all of it for
    /// `seen == 0`: a client that just attached), and the position after it, which the
    /// client has then seen. A client that fell more than the backlog behind misses the
    /// bytes in between.
    pub fn since(&self, seen: u64) -> (Vec<u8>, u64) {
        let b = lock(&self.inner);
        let held = b.backlog.len();
        let first = b.end.saturating_sub(held as u64);
        let skip = usize::try_from(seen.saturating_sub(first)).map_or(held, |n| n.min(held));
        (b.backlog.range(skip..).copied().collect(), b.end)
    }

    /// Readable when output was recorded; the event loop clears it with
    /// [`ConsoleTap::clear_event`] before it sends clients what they have not seen.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    pub fn clear_event(&self) {
        let _ = self.event.read();
    }
}

/// Where console output goes: the user's stdout or a file, an optional tap, and the panic
/// watch.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    watch: PanicWatch,
    tap: Option<Arc<ConsoleTap>>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            watch: PanicWatch::default(),
            tap: None,
        }
    }

    /// Also copies output to `tap`.
    pub fn with_tap(mut self, tap: Arc<ConsoleTap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// The last panic line the console showed (a description, never a decision).
    pub fn panic_line(&self) -> Option<&str> {
        self.watch.panic_line()
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch.feed(buf);
        if let Some(tap) = &self.tap {
            tap.record(buf);
        }
        // Output errors (a closed stdout) must not stop the guest: drop the bytes.
        let _ = self.out.write_all(buf);
        if buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The VMM's end of a serial line that carries frames (the SVM agent's line): bytes the
/// guest sends are queued for the event loop, which decodes them.
pub struct LinkSink {
    inbox: Arc<LinkInbox>,
}

/// Bytes received from the guest on a frame line, and the eventfd that announces them.
pub struct LinkInbox {
    bytes: Mutex<Vec<u8>>,
    event: EventFd,
}

/// A guest that floods its line faster than the VMM decodes loses the excess.
const MAX_LINK_INBOX: usize = 4 << 20;

impl LinkInbox {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            bytes: Mutex::new(Vec::new()),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn take(&self) -> Vec<u8> {
        let _ = self.event.read();
        std::mem::take(&mut lock(&self.bytes))
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl LinkSink {
    pub fn new(inbox: Arc<LinkInbox>) -> Self {
        Self { inbox }
    }
}

impl Write for LinkSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = lock(&self.inbox.bytes);
        if bytes.len() < MAX_LINK_INBOX {
            bytes.extend_from_slice(buf);
        }
        drop(bytes);
        let _ = self.inbox.event.write(1);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A 16550A on the port bus, with lossless input: bytes that do not fit the guest's
/// receive FIFO wait here and move in as the guest reads.
pub struct SerialDevice<W: Write + Send> {
    pub serial: Serial<IrqTrigger, NoEvents, W>,
    pending: VecDeque<u8>,
    /// The receive FIFO's capacity when empty.
    fifo_size: usize,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(irq: EventFd, sink: W) -> Self {
        let serial = Serial::new(IrqTrigger(irq), sink);
        Self {
            fifo_size: serial.fifo_capacity(),
            serial,
            pending: VecDeque::new(),
        }
    }

    /// Queues bytes for the guest to read.
    pub fn input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.refill();
    }

    /// Moves the next waiting byte into the receive FIFO once the guest has emptied it.
    ///
    /// One byte at a time, because vm-superio drops the received-data interrupt on every
    /// read of the data register, even with bytes left in the FIFO. Linux's 8250 driver
    /// reads at most 256 bytes per interrupt and waits for the next edge, so bytes left
    /// behind with no interrupt pending sat there until the user typed again (a pasted
    /// 257-byte line lost its last byte; a shell line typed by the Debian guest's e2e test
    /// stopped half-way). Refilled singly, the FIFO holds data only right after an
    /// enqueue, which raises the interrupt: the driver keeps reading (LSR shows data) or
    /// comes back on that edge.
    fn refill(&mut self) {
        if self.serial.fifo_capacity() < self.fifo_size {
            return;
        }
        if let Some(byte) = self.pending.pop_front() {
            // The FIFO is empty: this cannot fall short except on an interrupt error, in
            // which case the guest still reads the byte when it next polls.
            let _ = self.serial.enqueue_raw_bytes(&[byte]);
        }
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }

    pub fn sink(&self) -> &W {
        self.serial.writer()
    }
}

impl SerialDevice<ConsoleSink> {
    /// The panic line the guest printed, if any.
    pub fn panic_line(&self) -> Option<String> {
        self.sink().panic_line().map(str::to_string)
    }
}

impl<W: Write + Send> PioDevice for SerialDevice<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = self.serial.read(offset as u8);
        data.fill(value);
        if offset == 0 {
            self.refill();
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(b) = data.first() {
            // An interrupt that cannot be raised is a host eventfd failure; the byte itself
            // was still handled, so keep going rather than stop the guest.
            let _ = self.serial.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_panic_line_is_kept_and_nothing_else() {
        let mut w = PanicWatch::default();
        w.feed(b"[    1.0] Run /init as init process\n");
        assert_eq!(w.panic_line(), None);
        // A user's fake line first, then the kernel's own: the kernel's names the panic.
        w.feed(b"Kernel panic - not syncing: fake\n");
        w.feed(b"[    2.0] Kernel panic - not syncing: Attempted to kill init!\n");
        w.feed(b"[    2.1] ---[ end Kernel panic - not syncing: Attempted ]---\n");
        assert_eq!(
            w.panic_line(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
    }

    #[test]
    fn input_beyond_the_fifo_waits_and_arrives_in_order() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Vec::<u8>::new());
        let input: Vec<u8> = (0..200u8).collect();
        dev.input(&input);
        let mut got = Vec::new();
        for _ in 0..1000 {
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break; // no data ready
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }

    /// One pass of Linux's `serial8250_handle_irq` on receive: IIR says whether anything is
    /// pending; then at most 256 bytes while LSR shows data (`serial8250_rx_chars`).
    fn linux_rx_pass(dev: &mut SerialDevice<Vec<u8>>, got: &mut Vec<u8>) -> bool {
        let mut iir = [0u8];
        dev.read(2, &mut iir);
        if iir[0] & 1 != 0 {
            return false; // UART_IIR_NO_INT
        }
        for _ in 0..256 {
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        true
    }

    #[test]
    fn a_long_paste_reaches_an_interrupt_driven_guest_whole() {
        // The guest runs its handler only on an interrupt edge (the irqfd), and stops
        // reading after 256 bytes a pass, as Linux's 8250 driver does. Every byte must
        // still arrive: data left in the FIFO must keep an interrupt pending.
        for len in [1, 63, 64, 65, 255, 256, 257, 300, 320, 1000] {
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut dev = SerialDevice::new(irq, Vec::<u8>::new());
            dev.write(1, &[0x01]); // IER: received-data interrupt on
            let input: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
            dev.input(&input);
            let mut got = Vec::new();
            for _ in 0..100 {
                if dev.serial.interrupt_evt().0.read().is_err() {
                    break; // no edge since the last handler run: the guest sleeps
                }
                while linux_rx_pass(&mut dev, &mut got) {}
            }
            assert_eq!(
                got.len(),
                input.len(),
                "{len} bytes typed: some stuck in the device"
            );
            assert_eq!(got, input);
        }
    }

    #[test]
    fn the_tap_keeps_a_bounded_backlog() {
        let tap = ConsoleTap::new().unwrap();
        tap.record(&vec![b'x'; TAP_BACKLOG + 10]);
        tap.record(b"end");
        let (all, end) = tap.since(0);
        assert_eq!(all.len(), TAP_BACKLOG);
        assert!(all.ends_with(b"end"));
        assert_eq!(end, (TAP_BACKLOG + 13) as u64);
        // A client that saw the first 5 bytes fell out of the backlog: it gets what is held.
        assert_eq!(tap.since(5).0, all);
        assert!(tap.since(end).0.is_empty());
        assert!(tap.since(u64::MAX).0.is_empty());
    }

    #[test]
    fn a_byte_printed_while_a_client_attaches_reaches_it_once() {
        let tap = ConsoleTap::new().unwrap();
        tap.record(b"10.");
        tap.record(b"0"); // the event loop has not looked yet
        let (backlog, seen) = tap.since(0); // a client attaches
        assert_eq!(backlog, b"10.0");
        tap.clear_event(); // the event loop looks, for the byte before the attach
        let (fresh, seen) = tap.since(seen);
        assert!(fresh.is_empty(), "sent twice: {fresh:?}");
        tap.record(b".2.15");
        let (fresh, seen) = tap.since(seen);
        assert_eq!(fresh, b".2.15");
        assert_eq!(seen, 9);
    }

    #[test]
    fn long_lines_are_bounded() {
        let mut w = PanicWatch::default();
        w.feed(&vec![b'a'; 100_000]);
        assert!(w.line.len() <= MAX_LINE);
        w.feed(b"\n");
        assert!(w.line.is_empty());
    }
}
