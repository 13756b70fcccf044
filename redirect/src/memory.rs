//! Guest-physical memory as the redirect engine sees it.
//!
//! [`GuestPhysMemory`] is the narrow, object-safe trait through which the engine reads and
//! writes a VM's memory. Every access is bounds-checked: a range that is not entirely backed by
//! guest RAM (past the end, in a hole such as the 32-bit MMIO gap, or wrapping around the
//! 64-bit address space) is an error, never a panic and never a partial access reported as
//! success.
//!
//! Implementations:
//! - [`MemoryImage`]: `Vec<u8>`-backed regions, for tests and crafted images;
//! - `vm_memory::GuestMemoryMmap<()>`: the VMM's guest memory. Writes go straight to the
//!   shared mapping, so they land in the guest at once.

use std::sync::{Mutex, MutexGuard};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Why a guest-physical access failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MemError {
    /// Some byte of `[gpa, gpa + len)` is not backed by guest memory (or the range wraps).
    #[error("guest-physical range {gpa:#x}+{len:#x} is not backed by guest memory")]
    OutOfRange {
        /// Guest-physical start of the requested range.
        gpa: u64,
        /// Length of the requested range in bytes.
        len: u64,
    },
    /// The backend refused an access to a range it claims to contain.
    #[error("guest-physical access at {gpa:#x}+{len:#x} failed: {reason}")]
    Backend {
        /// Guest-physical start of the requested range.
        gpa: u64,
        /// Length of the requested range in bytes.
        len: u64,
        /// The backend's error, as text.
        reason: String,
    },
    /// A [`MemoryImage`] was built with an invalid region layout.
    #[error("invalid memory image layout: {0}")]
    InvalidLayout(String),
}

/// A VM's guest-physical memory.
///
/// Object-safe: the engine uses `&dyn GuestPhysMemory`. Writes take `&self` because guest
/// memory is shared with running vCPUs (the implementations use interior mutability).
pub trait GuestPhysMemory {
    /// True if every byte of `[gpa, gpa + len)` is backed by guest memory. An empty range is
    /// contained; a range whose end wraps past `u64::MAX` is not.
    fn contains(&self, gpa: u64, len: u64) -> bool;

    /// Fills `buf` from guest-physical `gpa`. Fails without side effects unless the whole
    /// range is backed.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Writes `buf` at guest-physical `gpa`. Fails without writing anything unless the whole
    /// range is backed.
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;

    /// Reads a little-endian `u64` at `gpa` (no alignment required).
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut bytes = [0u8; 8];
        self.read_phys(gpa, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes a little-endian `u64` at `gpa` (no alignment required).
    fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemError> {
        self.write_phys(gpa, &value.to_le_bytes())
    }
}

fn len_u64(len: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// One region of a [`MemoryImage`].
#[derive(Debug)]
struct ImageRegion {
    base: u64,
    data: Vec<u8>,
}

impl ImageRegion {
    /// Exclusive end; construction guarantees it does not overflow.
    fn end(&self) -> u64 {
        self.base.saturating_add(len_u64(self.data.len()))
    }
}

/// Guest memory made of `Vec<u8>`-backed regions, with holes between them.
///
/// Meant for tests and for crafted images; accesses may span adjacent regions.
#[derive(Debug)]
pub struct MemoryImage {
    /// Sorted by base, non-overlapping, non-empty.
    regions: Mutex<Vec<ImageRegion>>,
}

impl MemoryImage {
    /// `size` zeroed bytes at guest-physical 0.
    pub fn new(size: usize) -> Self {
        Self::from_bytes(0, vec![0; size]).unwrap_or_else(|_| Self::empty())
    }

    /// A memory with no bytes at all.
    pub fn empty() -> Self {
        MemoryImage {
            regions: Mutex::new(Vec::new()),
        }
    }

    /// One region holding `bytes` at guest-physical `base`.
    pub fn from_bytes(base: u64, bytes: Vec<u8>) -> Result<Self, MemError> {
        Self::from_regions(vec![(base, bytes)])
    }

    /// Zeroed regions `(base, size)`; gaps between them are holes.
    pub fn with_regions(regions: &[(u64, usize)]) -> Result<Self, MemError> {
        Self::from_regions(
            regions
                .iter()
                .map(|&(base, size)| (base, vec![0; size]))
                .collect(),
        )
    }

    /// Regions `(base, contents)`, in any order; they must not overlap or wrap.
    pub fn from_regions(regions: Vec<(u64, Vec<u8>)>) -> Result<Self, MemError> {
        let mut regions: Vec<ImageRegion> = regions
            .into_iter()
            .filter(|(_, data)| !data.is_empty())
            .map(|(base, data)| ImageRegion { base, data })
            .collect();
        regions.sort_by_key(|r| r.base);
        let mut prev_end: Option<u64> = None;
        for r in &regions {
            let end = r.base.checked_add(len_u64(r.data.len())).ok_or_else(|| {
                MemError::InvalidLayout(format!(
                    "region at {:#x} of {:#x} bytes wraps the address space",
                    r.base,
                    r.data.len()
                ))
            })?;
            if prev_end.is_some_and(|p| r.base < p) {
                return Err(MemError::InvalidLayout(format!(
                    "region at {:#x} overlaps the previous one",
                    r.base
                )));
            }
            prev_end = Some(end);
        }
        Ok(MemoryImage {
            regions: Mutex::new(regions),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ImageRegion>> {
        // A panic while holding the lock cannot leave the byte vectors inconsistent.
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Splits `[gpa, gpa + len)` into (region index, offset in region, length) pieces, or
    /// fails if some byte is not backed.
    fn pieces(
        regions: &[ImageRegion],
        gpa: u64,
        len: u64,
    ) -> Result<Vec<(usize, usize, usize)>, MemError> {
        let out_of_range = MemError::OutOfRange { gpa, len };
        let end = gpa.checked_add(len).ok_or(out_of_range.clone())?;
        let mut pieces = Vec::new();
        let mut cur = gpa;
        while cur < end {
            // First region whose end is above `cur`.
            let idx = regions.partition_point(|r| r.end() <= cur);
            let region = regions.get(idx).ok_or(out_of_range.clone())?;
            if region.base > cur {
                return Err(out_of_range);
            }
            let piece_end = end.min(region.end());
            let offset = usize::try_from(cur - region.base).map_err(|_| out_of_range.clone())?;
            let n = usize::try_from(piece_end - cur).map_err(|_| out_of_range.clone())?;
            pieces.push((idx, offset, n));
            cur = piece_end;
        }
        Ok(pieces)
    }
}

impl GuestPhysMemory for MemoryImage {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        Self::pieces(&self.lock(), gpa, len).is_ok()
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let regions = self.lock();
        let len = len_u64(buf.len());
        let mut done = 0usize;
        for (idx, offset, n) in Self::pieces(&regions, gpa, len)? {
            let src = regions
                .get(idx)
                .and_then(|r| r.data.get(offset..offset.checked_add(n)?));
            let dst = done.checked_add(n).and_then(|e| buf.get_mut(done..e));
            match (src, dst) {
                (Some(src), Some(dst)) => dst.copy_from_slice(src),
                _ => return Err(MemError::OutOfRange { gpa, len }),
            }
            done += n;
        }
        Ok(())
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let mut regions = self.lock();
        let len = len_u64(buf.len());
        let mut done = 0usize;
        // `pieces` validated the whole range, so nothing is written unless all of it fits.
        for (idx, offset, n) in Self::pieces(&regions, gpa, len)? {
            let dst = regions
                .get_mut(idx)
                .and_then(|r| r.data.get_mut(offset..offset.checked_add(n)?));
            let src = done.checked_add(n).and_then(|e| buf.get(done..e));
            match (dst, src) {
                (Some(dst), Some(src)) => dst.copy_from_slice(src),
                _ => return Err(MemError::OutOfRange { gpa, len }),
            }
            done += n;
        }
        Ok(())
    }
}

/// The VMM's guest memory (`vmm::vstate::memory::GuestMemory`).
impl GuestPhysMemory for GuestMemoryMmap<()> {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        let Ok(count) = usize::try_from(len) else {
            return false;
        };
        gpa.checked_add(len).is_some()
            && GuestMemoryBackend::check_range(self, GuestAddress(gpa), count)
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = len_u64(buf.len());
        if !self.contains(gpa, len) {
            return Err(MemError::OutOfRange { gpa, len });
        }
        self.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MemError::Backend {
                gpa,
                len,
                reason: e.to_string(),
            })
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let len = len_u64(buf.len());
        if !self.contains(gpa, len) {
            return Err(MemError::OutOfRange { gpa, len });
        }
        self.write_slice(buf, GuestAddress(gpa))
            .map_err(|e| MemError::Backend {
                gpa,
                len,
                reason: e.to_string(),
            })
    }
}

/// Another memory seen at a different guest-physical address: `base + off` here is `off`
/// in `inner` (the redirect VM maps its window's memory object, which starts at 0, high).
pub struct Relocated<'a> {
    /// The memory itself.
    pub inner: &'a dyn GuestPhysMemory,
    /// Where its byte 0 appears.
    pub base: u64,
}

impl Relocated<'_> {
    fn offset(&self, gpa: u64, len: usize) -> Result<u64, MemError> {
        gpa.checked_sub(self.base).ok_or(MemError::OutOfRange {
            gpa,
            len: len as u64,
        })
    }
}

impl GuestPhysMemory for Relocated<'_> {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_sub(self.base)
            .is_some_and(|off| self.inner.contains(off, len))
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read_phys(self.offset(gpa, buf.len())?, buf)
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.inner.write_phys(self.offset(gpa, buf.len())?, buf)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn relocated_memory_is_reached_only_at_its_new_address() {
        let inner = MemoryImage::new(0x2000);
        let moved = Relocated {
            inner: &inner,
            base: 0x1_0000_0000,
        };
        moved.write_phys(0x1_0000_1ff8, &[1, 2, 3, 4]).unwrap();
        let mut raw = [0u8; 4];
        inner.read_phys(0x1ff8, &mut raw).unwrap();
        assert_eq!(raw, [1, 2, 3, 4]);
        assert!(moved.contains(0x1_0000_0000, 0x2000));
        assert!(!moved.contains(0x1_0000_1fff, 2));
        assert!(!moved.contains(0x1000, 1));
        assert!(moved.read_phys(0x1ff8, &mut raw).is_err());
        assert!(moved.write_phys(0x1_0000_1ffe, &raw).is_err());
    }

    use super::*;

    #[test]
    fn image_bounds() {
        let m = MemoryImage::new(0x2000);
        assert!(m.contains(0, 0x2000));
        assert!(m.contains(0x1ff8, 8));
        assert!(!m.contains(0x1ff9, 8));
        assert!(m.contains(0x2000, 0));
        assert!(!m.contains(u64::MAX, 2));
        m.write_u64(0x1ff8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.read_u64(0x1ff8).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(
            m.read_u64(0x1ffc),
            Err(MemError::OutOfRange {
                gpa: 0x1ffc,
                len: 8
            })
        );
        assert!(m.read_u64(u64::MAX - 3).is_err());
        assert!(m.write_u64(u64::MAX, 0).is_err());
        let mut big = vec![0u8; 0x3000];
        assert!(m.read_phys(0, &mut big).is_err());
    }

    #[test]
    fn image_holes_and_spanning() {
        let m =
            MemoryImage::with_regions(&[(0x3000, 0x1000), (0, 0x1000), (0x1000, 0x1000)]).unwrap();
        // 0x0..0x2000 contiguous over two regions, hole at 0x2000..0x3000.
        m.write_phys(0xffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        m.read_phys(0xffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(!m.contains(0x1ffc, 8));
        assert!(!m.contains(0x2000, 1));
        assert!(m.contains(0x3000, 0x1000));
        // A failed write leaves memory untouched.
        assert!(m.write_phys(0x1ffc, &[9; 8]).is_err());
        let mut b = [0u8; 4];
        m.read_phys(0x1ffc, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn image_layout_errors() {
        assert!(MemoryImage::with_regions(&[(0, 0x1000), (0x800, 0x1000)]).is_err());
        assert!(MemoryImage::with_regions(&[(u64::MAX - 10, 0x1000)]).is_err());
        let e = MemoryImage::empty();
        assert!(!e.contains(0, 1));
        assert!(e.contains(0, 0));
    }

    #[test]
    fn mmap_backend_with_hole() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .unwrap();
        let mem: &dyn GuestPhysMemory = &m;
        assert!(mem.contains(0, 0x2000));
        assert!(!mem.contains(0x1ff8, 0x10));
        assert!(!mem.contains(0x2000, 1));
        assert!(mem.contains(0x10ff8, 8));
        assert!(!mem.contains(u64::MAX - 1, 4));
        mem.write_u64(0x10ff8, 42).unwrap();
        assert_eq!(mem.read_u64(0x10ff8).unwrap(), 42);
        assert_eq!(
            mem.read_u64(0x1ffc),
            Err(MemError::OutOfRange {
                gpa: 0x1ffc,
                len: 8
            })
        );
        assert!(mem.write_u64(0x11000, 1).is_err());
        assert!(mem.read_u64(u64::MAX - 3).is_err());
    }
}
