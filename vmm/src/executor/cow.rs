//! GVM RAM as the redirect VM maps it: private (copy-on-write) mappings of the GVM's memfd.
//!
//! A redirected call's stores land in private copies of the pages it writes; the GVM's own
//! pages do not change while it runs. KVM logs which pages the call dirtied. When the call
//! returns, [`CowRam::settle`] copies exactly those pages into the GVM (commit); when it
//! fails — it would sleep, it faulted, it ran too long — the copies are dropped (rollback)
//! and the GVM is as it was before the call, byte for byte. Either way the private copies
//! are then discarded, so the next call starts from the GVM's current memory.

use std::os::fd::AsRawFd;

use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::GuestMemory;

const PAGE: u64 = 4096;

/// One GVM RAM region: its private mapping (unmapped on drop) and the GVM's own.
struct Mapping {
    gpa: u64,
    len: usize,
    /// Host address of the private mapping.
    private: u64,
    /// Host address of the GVM's own mapping of the region.
    shared: u64,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `private..private+len` is a mapping this struct made and nothing else
        // unmaps; KVM slots that pointed into it are gone with the redirect VM, dropped
        // first.
        unsafe { libc::munmap(self.private as *mut libc::c_void, self.len) };
    }
}

/// A piece of GVM RAM behind one KVM memslot with dirty logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub slot: u32,
    pub gpa: u64,
    pub len: u64,
    /// Host address of the piece in the private mapping (what the memslot points at).
    pub private: u64,
    /// Host address of the piece in the GVM's own mapping.
    pub shared: u64,
}

/// Why GVM RAM could not be mapped, or a call's stores not settled.
#[derive(Debug, Error)]
pub enum CowError {
    #[error(
        "GVM RAM is not backed by a file; the redirect view needs its memfd to map it \
         copy-on-write"
    )]
    NotFileBacked,
    #[error("GVM RAM region of {0:#x} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("mapping GVM RAM copy-on-write: {0}")]
    Map(#[source] std::io::Error),
    #[error("{gpa:#x}+{len:#x} is not GVM RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("dirty log of GVM RAM slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("dropping the call's private pages: {0}")]
    Discard(#[source] std::io::Error),
}

pub struct CowRam {
    mappings: Vec<Mapping>,
    pieces: Vec<Piece>,
}

impl CowRam {
    /// Maps every region of `gvm` (memfd-backed) privately.
    pub fn map(gvm: &GuestMemory) -> Result<CowRam, CowError> {
        let mut mappings = Vec::new();
        for region in gvm.iter() {
            let file = region.file_offset().ok_or(CowError::NotFileBacked)?;
            let too_large = CowError::TooLarge(region.len());
            let len = usize::try_from(region.len()).map_err(|_| too_large)?;
            let offset = libc::off_t::try_from(file.start())
                .map_err(|_| CowError::TooLarge(file.start()))?;
            let shared = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| CowError::NotRam {
                    gpa: region.start_addr().raw_value(),
                    len: region.len(),
                })? as u64;
            // SAFETY: a fresh private mapping of a file we hold open; it aliases no Rust
            // object, and only this module and KVM (through memslots) access it.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                    file.file().as_raw_fd(),
                    offset,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(CowError::Map(std::io::Error::last_os_error()));
            }
            mappings.push(Mapping {
                gpa: region.start_addr().raw_value(),
                len,
                private: addr as u64,
                shared,
            });
        }
        Ok(CowRam {
            mappings,
            pieces: Vec::new(),
        })
    }

    /// Host addresses (private, shared) of GVM-physical `gpa`, if it is RAM.
    pub fn host(&self, gpa: u64) -> Option<(u64, u64)> {
        self.mappings
            .iter()
            .find(|m| gpa >= m.gpa && gpa - m.gpa < m.len as u64)
            .map(|m| (m.private + (gpa - m.gpa), m.shared + (gpa - m.gpa)))
    }

    /// The u32 at kernel-virtual `va` as the running call sees it (its private copy if it
    /// wrote the page), translated through the GVM's kernel tables `kernel`.
    pub fn read_private_u32(
        &self,
        kernel: &redirect::paging::AddressSpace<'_>,
        va: u64,
    ) -> Option<u32> {
        let t = kernel.translate(va, redirect::paging::Access::READ).ok()?;
        if t.gpa % PAGE > PAGE - 4 {
            return None;
        }
        let (private, _) = self.host(t.gpa)?;
        // SAFETY: `private` lies in a live private mapping of GVM RAM (checked by `host`)
        // and the four bytes do not cross its page (checked above), so they are mapped;
        // the redirect vCPU is stopped, so nothing writes them now. Unaligned is fine.
        Some(unsafe { std::ptr::read_unaligned(private as *const u32) })
    }

    /// Records that memslot `slot` maps [gpa, gpa+len) of the private mapping.
    pub fn add_piece(&mut self, slot: u32, gpa: u64, len: u64) -> Result<Piece, CowError> {
        let (private, shared) = self
            .host(gpa)
            .filter(|_| self.host(gpa + len - 1).is_some())
            .ok_or(CowError::NotRam { gpa, len })?;
        let piece = Piece {
            slot,
            gpa,
            len,
            private,
            shared,
        };
        self.pieces.push(piece);
        Ok(piece)
    }

    /// After a call: fetches each piece's dirty log from `vm` (which also clears it),
    /// copies the dirty pages into the GVM if `commit`, and drops the private copies.
    /// Returns what the call had written, as guest-physical (start, length) runs.
    pub fn settle(&self, vm: &kvm_ioctls::VmFd, commit: bool) -> Result<Vec<(u64, u64)>, CowError> {
        let mut written = Vec::new();
        for piece in &self.pieces {
            // Pieces lie inside mappings, whose lengths are usize.
            let len = piece.len as usize;
            let bitmap =
                vm.get_dirty_log(piece.slot, len)
                    .map_err(|source| CowError::DirtyLog {
                        slot: piece.slot,
                        source,
                    })?;
            for (first, count) in dirty_runs(&bitmap, piece.len / PAGE) {
                let off = first * PAGE;
                // A run lies inside its piece.
                let n = (count * PAGE) as usize;
                if commit {
                    // SAFETY: both ranges lie inside the piece (the runs are bounded by its
                    // page count), in two different live mappings of the same file: the
                    // private copy and the GVM's own. The GVM is quiesced and the redirect
                    // vCPU stopped, so nobody else writes either range now.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (piece.private + off) as *const u8,
                            (piece.shared + off) as *mut u8,
                            n,
                        )
                    };
                }
                // SAFETY: the range lies in the private mapping; dropping its private copies
                // makes it show the file (the GVM's current pages) again.
                let rc = unsafe {
                    libc::madvise(
                        (piece.private + off) as *mut libc::c_void,
                        n,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(CowError::Discard(std::io::Error::last_os_error()));
                }
                written.push((piece.gpa + off, count * PAGE));
            }
        }
        Ok(written)
    }
}

/// Runs of set bits in a KVM dirty bitmap, as (first page, page count), over `pages` bits.
pub fn dirty_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (word_index, &word) in (0u64..).zip(bitmap) {
        let mut bits = word;
        while bits != 0 {
            let page = word_index * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if page >= pages {
                return runs;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn dirty_bits_become_runs_within_the_piece() {
        assert_eq!(dirty_runs(&[], 10), vec![]);
        assert_eq!(dirty_runs(&[0b1011], 64), vec![(0, 2), (3, 1)]);
        // A run across a word boundary.
        assert_eq!(dirty_runs(&[1 << 63, 1], 128), vec![(63, 2)]);
        // Bits past the piece (a hostile or stale bitmap) are ignored.
        assert_eq!(dirty_runs(&[u64::MAX], 3), vec![(0, 3)]);
    }

    #[test]
    fn the_private_mapping_sees_the_gvm_until_written_and_writes_stay_private() {
        let gvm = create_guest_memory("cow-test", 1 << 20).unwrap();
        gvm.mem.write_obj(0x1234u64, GuestAddress(0x2000)).unwrap();
        let cow = CowRam::map(&gvm.mem).unwrap();
        let (private, shared) = cow.host(0x2000).unwrap();
        // SAFETY: both addresses are inside live 1 MiB mappings made above.
        unsafe {
            assert_eq!(*(private as *const u64), 0x1234);
            *(private as *mut u64) = 0x5678;
            assert_eq!(*(shared as *const u64), 0x1234);
        }
        assert_eq!(
            gvm.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            0x1234
        );
        assert!(cow.host(1 << 20).is_none());
    }
}
