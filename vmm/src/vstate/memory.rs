//! Guest RAM: one memfd per VM, mapped as vm-memory regions around the 32-bit MMIO hole.
//!
//! A memfd (rather than anonymous memory) lets later work map the same pages into a second
//! KVM VM or process without copies, which the redirect engine needs.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit MMIO hole (IOAPIC, LAPIC, and room for future devices).
pub(crate) const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole: RAM continues here.
pub(crate) const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// Guest RAM as vm-memory regions mapped from the memfd.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Why guest memory could not be created.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    /// The memfd could not be grown to the guest's size.
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Resize {
        /// The size asked for, in bytes.
        size: u64,
        /// Why `ftruncate` failed.
        source: std::io::Error,
    },
    /// vm-memory could not map the file's ranges.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// The RAM ranges of a guest with `size` bytes: below the MMIO hole, then above 4 GiB.
/// Each entry is (guest address, length, offset in the backing file).
pub(crate) fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size, 0)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START, 0),
            (
                GuestAddress(MMIO_HOLE_END),
                size - MMIO_HOLE_START,
                MMIO_HOLE_START,
            ),
        ]
    }
}

/// Guest memory plus the file that backs it.
pub struct SharedMemory {
    /// The guest's RAM, mapped.
    pub mem: GuestMemory,
    /// The memfd behind `mem`, kept open as long as the memory lives.
    pub file: File,
}

/// Creates `size` bytes of guest RAM backed by a fresh memfd.
pub fn create_guest_memory(name: &str, size: u64) -> Result<SharedMemory, MemoryError> {
    let file = memfd(name)?;
    file.set_len(size)
        .map_err(|source| MemoryError::Resize { size, source })?;
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(addr, len, offset)| {
            let file = file.try_clone().map_err(MemoryError::Memfd)?;
            Ok((addr, len as usize, Some(FileOffset::new(file, offset))))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    Ok(SharedMemory { mem, file })
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call, and the flags
    // are a valid combination; the call has no other memory effects.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid, and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guests_have_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20, 0)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START, 0));
        assert_eq!(r[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
        assert_eq!(r[1].2, MMIO_HOLE_START);
    }

    #[test]
    fn memory_is_backed_by_the_memfd() {
        use std::os::unix::fs::FileExt;
        let shared = create_guest_memory("test", 4 << 20).unwrap();
        shared
            .mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        shared.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(shared.mem.num_regions(), 1);
    }
}
