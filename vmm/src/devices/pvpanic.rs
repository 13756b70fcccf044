//! The pvpanic device (QEMU's ISA pvpanic: one port at 0x505, ACPI id `QEMU0001`): the guest
//! kernel's own report that it panicked. Linux's `pvpanic-mmio` driver (it binds the ACPI id
//! whether the resource is memory or I/O) writes `PVPANIC_PANICKED` from its panic notifier,
//! after the panic line and the backtrace are on the console and before `panic=-1` resets.
//!
//! This, and not console text, is how the VMM tells a panic from a reboot: anything on the
//! console may have been printed by any guest user, while this port is reachable only from
//! the guest kernel (or a root process with `ioperm`, which could panic the kernel anyway).
//! The console's last panic line only *describes* the panic.

use std::sync::{Arc, Mutex};

use super::serial::ConsoleSerial;
use super::PioDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::sync::lock;

/// The pvpanic port (QEMU's default `iobase`).
pub const PVPANIC_PORT: u16 = 0x505;
/// One port.
pub const PVPANIC_LEN: u16 = 1;
/// Event bit: the guest kernel panicked (include/uapi/misc/pvpanic.h).
const PVPANIC_PANICKED: u8 = 1 << 0;

/// The device: reads return the events it supports, a write with the panicked bit stops
/// the VM with [`ExitReason::GuestPanic`].
pub struct PvPanic {
    exit: Arc<ExitSignal>,
    /// The console whose last panic line describes the panic.
    console: Arc<Mutex<ConsoleSerial>>,
    /// Prefix of the report ("GVM", "SVM") when one process runs several VMs.
    label: &'static str,
}

impl PvPanic {
    /// A pvpanic device that reports to `exit`, describing the panic by `console`'s last
    /// panic line.
    pub fn new(
        exit: Arc<ExitSignal>,
        console: Arc<Mutex<ConsoleSerial>>,
        label: &'static str,
    ) -> Self {
        Self {
            exit,
            console,
            label,
        }
    }

    fn report(&self) -> String {
        let line = lock(&self.console).panic_line().unwrap_or_else(|| {
            "the kernel reported a panic (pvpanic) without a panic line on its console".to_string()
        });
        if self.label.is_empty() {
            line
        } else {
            format!("{}: {line}", self.label)
        }
    }
}

impl PioDevice for PvPanic {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // The capability byte: only "panicked" (no crash-loaded event: a kdump kernel
        // taking over is not something this VMM runs).
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        if data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0) {
            self.exit.signal(ExitReason::GuestPanic(self.report()));
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::serial::{ConsoleSink, SerialDevice};

    fn console() -> Arc<Mutex<ConsoleSerial>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(Box::new(std::io::sink()));
        Arc::new(Mutex::new(SerialDevice::new(irq, sink)))
    }

    fn print(console: &Arc<Mutex<ConsoleSerial>>, text: &[u8]) {
        // What the guest's `outb`s to the UART's data port amount to.
        for &b in text {
            lock(console).write(0, &[b]);
        }
    }

    #[test]
    fn the_capability_byte_offers_only_panicked() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = PvPanic::new(exit, console(), "");
        let mut cap = [0xffu8];
        dev.read(0, &mut cap);
        assert_eq!(cap, [1]);
    }

    #[test]
    fn console_text_alone_stops_nothing() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let con = console();
        let _dev = PvPanic::new(exit.clone(), con.clone(), "GVM");
        print(
            &con,
            b"Kernel panic - not syncing: fake\n---[ end Kernel panic - not syncing: fake ]---\n",
        );
        assert_eq!(exit.reason(), None);
        // Other writes to the port are not a panic either.
        let mut dev = PvPanic::new(exit.clone(), con, "GVM");
        dev.write(0, &[0]);
        dev.write(0, &[2]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn a_reported_panic_stops_the_vm_named_by_its_last_console_line() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let con = console();
        let mut dev = PvPanic::new(exit.clone(), con.clone(), "GVM");
        print(
            &con,
            b"[ 2.0] Kernel panic - not syncing: sysrq triggered crash\n",
        );
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(
            exit.reason(),
            Some(ExitReason::GuestPanic(
                "GVM: Kernel panic - not syncing: sysrq triggered crash".into()
            ))
        );
    }

    #[test]
    fn a_reported_panic_without_a_console_line_still_stops_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = PvPanic::new(exit.clone(), console(), "");
        dev.write(0, &[PVPANIC_PANICKED]);
        match exit.reason() {
            Some(ExitReason::GuestPanic(text)) => assert!(text.contains("pvpanic"), "{text}"),
            other => panic!("{other:?}"),
        }
    }
}
