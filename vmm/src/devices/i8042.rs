//! The i8042 keyboard controller (ports 0x60-0x64, vm-superio): only its reset line does
//! anything. `reboot=k` (the default command line) makes the guest pulse it, which stops
//! the VM with [`ExitReason::Reset`].

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::PioDevice;
use crate::exit::{ExitReason, ExitSignal};

pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

/// The i8042 reset line stops the VM.
struct ResetLine(Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.signal(ExitReason::Reset);
        Ok(())
    }
}

/// vm-superio's i8042 on the port bus (only the reset command does anything).
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// An i8042 whose reset line reports [`ExitReason::Reset`] to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(self.0.read(offset as u8));
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(b) = data.first() {
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_stops_the_vm_with_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        // A status read and other commands do not stop anything.
        let mut status = [0u8; 1];
        dev.read(4, &mut status);
        dev.write(4, &[0x20]);
        assert_eq!(exit.reason(), None);
        // 0xFE on the command port pulses the reset line (Linux's `reboot=k`).
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
