//! The port I/O bus (port ranges; unclaimed ports read as all-ones) and the MMIO bus
//! (guest-physical ranges outside RAM; unclaimed addresses read as zeros).

use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// A device reachable through `in`/`out` instructions.
pub trait PioDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port ranges and their devices. Built once before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps a registered device")]
pub struct OverlapError {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` on ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), OverlapError> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        });
        if overlaps || len == 0 || end > 0x1_0000 {
            return Err(OverlapError { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    /// Handles an `in`: unclaimed ports float high, as on a PC.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Handles an `out`: writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((range, offset)) = self.find(port) {
            lock(&range.device).write(offset, data);
        }
    }
}

/// A device reached through guest-physical addresses outside RAM (virtio-mmio).
pub trait MmioDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct MmioRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// Guest-physical ranges and their devices, like [`PioBus`]. Unclaimed addresses read as
/// zeros and drop writes (the LAPIC and IOAPIC are KVM's and never exit here).
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<MmioRange>,
}

#[derive(Debug, thiserror::Error)]
#[error("MMIO range {base:#x}+{len:#x} overlaps a registered device")]
pub struct MmioOverlapError {
    pub base: u64,
    pub len: u64,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), MmioOverlapError> {
        let err = || MmioOverlapError { base, len };
        let end = base.checked_add(len).ok_or_else(err)?;
        let overlaps = self
            .ranges
            .iter()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end);
        if overlaps || len == 0 {
            return Err(err());
        }
        self.ranges.push(MmioRange { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&MmioRange, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    /// Handles a read exit: unclaimed addresses read as zeros.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => data.fill(0),
        }
    }

    /// Handles a write exit: writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((range, offset)) = self.find(addr) {
            lock(&range.device).write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn ports_route_to_devices_with_offsets() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fb, &mut b);
        assert_eq!(b[0], 3);
        bus.write(0x3f9, &[7]);
        assert_eq!(dev.lock().unwrap().0, vec![(1, 7)]);
        bus.read(0x80, &mut b);
        assert_eq!(b[0], 0xff);
    }

    struct MmioEcho(Vec<(u64, u8)>);
    impl MmioDevice for MmioEcho {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn mmio_addresses_route_to_devices_and_overlaps_are_refused() {
        let dev = Arc::new(Mutex::new(MmioEcho(Vec::new())));
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        let mut b = [0u8; 4];
        bus.read(0xd000_0070, &mut b);
        assert_eq!(b, [0x70; 4]);
        bus.write(0xd000_0fff, &[9]);
        assert_eq!(dev.lock().unwrap().0, vec![(0xfff, 9)]);
        bus.read(0xd000_1000, &mut b);
        assert_eq!(b, [0; 4], "one past the end is unclaimed");
        assert!(bus.insert(0xd000_0800, 0x1000, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX - 1, 4, dev.clone()).is_err());
        assert!(bus.insert(0xd000_1000, 0, dev).is_err());
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = PioBus::new();
        bus.insert(0x60, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x64, 1, dev.clone()).is_err());
        assert!(bus.insert(0xffff, 2, dev).is_err());
    }
}
