//! The 16550A serial console (vm-superio) on COM1, raising IRQ 4 through an irqfd, with an
//! output sink that watches the guest kernel's console for a panic.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;
use crate::exit::{ExitReason, ExitSignal};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_GSI: u32 = 4;

/// What the kernel prints first when it panics, and last when it is done printing.
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

/// Watches console lines for a kernel panic. The guest writes these bytes: we only keep a
/// bounded line buffer and never interpret anything but the two fixed markers.
#[derive(Default)]
pub struct PanicWatch {
    line: Vec<u8>,
    panic_line: Option<String>,
}

impl PanicWatch {
    /// Feeds console bytes; returns the panic line once the panic report is complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        let mut done = None;
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).trim_end().to_string();
                self.line.clear();
                if self.panic_line.is_none() {
                    if let Some(pos) = line.find(PANIC_START) {
                        self.panic_line = Some(line[pos..].to_string());
                    }
                } else if line.contains(PANIC_END) {
                    done = self.panic_line.clone();
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        done
    }

    /// The panic line, if the kernel has started panicking.
    pub fn panic_line(&self) -> Option<&str> {
        self.panic_line.as_deref()
    }
}

/// Where console output goes: the user's stdout or file, plus the panic watch.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    watch: PanicWatch,
    exit: Arc<ExitSignal>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        Self {
            out,
            watch: PanicWatch::default(),
            exit,
        }
    }

    pub fn panic_line(&self) -> Option<&str> {
        self.watch.panic_line()
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(line) = self.watch.feed(buf) {
            let _ = self.out.flush();
            self.exit.signal(ExitReason::GuestPanic(line));
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

pub type ConsoleSerial = Serial<IrqTrigger, NoEvents, ConsoleSink>;

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    pub serial: ConsoleSerial,
}

impl SerialDevice {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), sink),
        }
    }

    /// Queues bytes typed by the user for the guest; returns how many fit in the FIFO.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The panic line the guest printed, if any.
    pub fn panic_line(&self) -> Option<String> {
        self.serial.writer().panic_line().map(str::to_string)
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = self.serial.read(offset as u8);
        data.fill(value);
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
    fn panic_is_reported_when_the_report_ends() {
        let mut w = PanicWatch::default();
        assert_eq!(w.feed(b"[    1.0] Run /init as init process\n"), None);
        assert_eq!(
            w.feed(b"[    2.0] Kernel panic - not syncing: Attempted to kill init!\n"),
            None
        );
        assert_eq!(
            w.panic_line(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
        let done = w.feed(b"[    2.1] ---[ end Kernel panic - not syncing: Attempted ]---\n");
        assert_eq!(
            done.as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
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
