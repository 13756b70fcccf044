//! Devices: on the port I/O bus the serial console, i8042 reset line, CMOS RTC and pvpanic;
//! on the MMIO bus the virtio devices.

pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod tap;

pub use bus::{MmioBus, PioBus, PioDevice};
pub mod virtio;
