//! Legacy devices on the port I/O bus: serial console, i8042 reset line, CMOS RTC, pvpanic.

pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use bus::{PioBus, PioDevice};
