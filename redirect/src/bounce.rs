//! The SVM program memory a redirected call may reach (DESIGN.md 4.4; issue #12, hole 2).
//!
//! The redirect VM holds no SVM memory. A call's user buffers — the byte ranges the shim
//! lists for it (`svm_runtime::redirect_abi::BufferList`) — are copied into *bounce pages*
//! the VMM owns, and the view maps those pages, and nothing else, at the program's own
//! virtual addresses (so pointer arguments need no rewriting). Only the listed bytes are
//! copied in: the rest of each bounce page is zero, so the GVM never sees the program's
//! neighbouring memory. After a call that ran, only the ranges marked written are copied
//! back into the program: whatever else the GVM's kernel wrote to a bounce page is dropped.
//! A GVM page table that points anywhere else cannot reach SVM memory, because there is
//! none in the redirect VM to reach.
//!
//! The plan here is pure: which program pages a call reaches, in which bounce page each
//! lives, and the copies in and out (through the program's own page tables, trusted: they
//! are the SVM's).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::memory::{GuestPhysMemory, MemError};
use crate::paging::{AddressSpace, Privilege, WalkError};

const PAGE: u64 = 0x1000;
/// Size of the bounce area: the largest buffer a call may have (a module image for
/// `init_module`, `svm_runtime::redirect_abi::MAX_MODULE_TOUCH`, 64 MiB) plus room for the
/// call's other ranges, each of which may straddle pages (the VMM checks this covers them).
pub const BOUNCE_SIZE: u64 = 68 << 20;
/// One past the highest user address (the user half of the 48-bit address space).
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// A range of the program's memory that the call may read, or read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The program's virtual address of its first byte.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Whether the call may write it (copied back after the call).
    pub write: bool,
}

/// Why a call's buffers cannot be bounced.
#[derive(Debug, Error)]
pub enum BounceError {
    /// A range is not in the user half of the address space.
    #[error("the call's buffer {addr:#x}+{len:#x} is not in user memory")]
    NotUser {
        /// Its start.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The ranges span more pages than the bounce area holds.
    #[error("the call's buffers span more than {0} pages")]
    TooLarge(usize),
    /// The program's memory could not be read or written through its page tables.
    #[error("the program's memory at {addr:#x}: {source}")]
    Program {
        /// The address.
        addr: u64,
        /// Why.
        #[source]
        source: WalkError,
    },
    /// The bounce area could not be read or written.
    #[error("the bounce area: {0}")]
    Bounce(#[from] MemError),
}

/// One program page a call reaches, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BouncePage {
    /// The program's virtual address of the page.
    pub va: u64,
    /// Offset of its bounce page in the bounce area.
    pub offset: u64,
    /// Whether a listed range in it may be written.
    pub writable: bool,
}

/// The bounce pages of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BouncePlan {
    ranges: Vec<Range>,
    /// Page VA → (index of its bounce page, writable).
    pages: BTreeMap<u64, (u64, bool)>,
}

impl BouncePlan {
    /// Plans the bounce pages of `ranges` (empty ones are dropped), at most `max_pages`.
    pub fn new(ranges: &[Range], max_pages: usize) -> Result<BouncePlan, BounceError> {
        let mut plan = BouncePlan::default();
        for &r in ranges.iter().filter(|r| r.len > 0) {
            let end = r
                .addr
                .checked_add(r.len)
                .filter(|&end| end <= USER_END)
                .ok_or(BounceError::NotUser {
                    addr: r.addr,
                    len: r.len,
                })?;
            // Bounded before the loop: a range longer than the area is refused whole.
            let first = r.addr & !(PAGE - 1);
            if (end - first).div_ceil(PAGE) > max_pages as u64 {
                return Err(BounceError::TooLarge(max_pages));
            }
            let mut va = first;
            while va < end {
                let next = plan.pages.len() as u64;
                let entry = plan.pages.entry(va).or_insert((next, false));
                entry.1 |= r.write;
                if plan.pages.len() > max_pages {
                    return Err(BounceError::TooLarge(max_pages));
                }
                va += PAGE;
            }
            plan.ranges.push(r);
        }
        Ok(plan)
    }

    /// Every page the call reaches, in address order.
    pub fn pages(&self) -> impl Iterator<Item = BouncePage> + '_ {
        self.pages
            .iter()
            .map(|(&va, &(index, writable))| BouncePage {
                va,
                offset: index * PAGE,
                writable,
            })
    }

    /// The number of bounce pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the call reaches no program memory.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// `r` split at page boundaries: (program address, bounce offset, length) of each piece.
    fn pieces(&self, r: Range) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
        let end = r.addr + r.len; // Checked in `new`.
        let mut at = r.addr;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let page = at & !(PAGE - 1);
            let len = (page + PAGE).min(end) - at;
            let (index, _) = *self.pages.get(&page)?;
            let piece = (at, index * PAGE + (at - page), len as usize);
            at += len;
            Some(piece)
        })
    }

    /// Zeroes the plan's bounce pages in `bounce` (offsets from 0), then copies every
    /// listed range in from the program.
    pub fn fill(
        &self,
        program: &AddressSpace<'_>,
        bounce: &dyn GuestPhysMemory,
    ) -> Result<(), BounceError> {
        let zero = [0u8; PAGE as usize];
        for p in self.pages() {
            bounce.write_phys(p.offset, &zero)?;
        }
        let mut buf = [0u8; PAGE as usize];
        for &r in &self.ranges {
            for (va, off, len) in self.pieces(r) {
                program
                    .read(va, &mut buf[..len], Privilege::User)
                    .map_err(|source| BounceError::Program { addr: va, source })?;
                bounce.write_phys(off, &buf[..len])?;
            }
        }
        Ok(())
    }

    /// Zeroes the plan's bounce pages: between calls the bounce area holds nothing of any
    /// program's.
    pub fn clear(&self, bounce: &dyn GuestPhysMemory) -> Result<(), BounceError> {
        let zero = [0u8; PAGE as usize];
        for p in self.pages() {
            bounce.write_phys(p.offset, &zero)?;
        }
        Ok(())
    }

    /// Copies the ranges the call may write back into the program; the number of bytes.
    pub fn write_back(
        &self,
        bounce: &dyn GuestPhysMemory,
        program: &AddressSpace<'_>,
    ) -> Result<u64, BounceError> {
        let mut buf = [0u8; PAGE as usize];
        let mut bytes = 0u64;
        for &r in self.ranges.iter().filter(|r| r.write) {
            for (va, off, len) in self.pieces(r) {
                bounce.read_phys(off, &mut buf[..len])?;
                program
                    .write(va, &buf[..len], Privilege::User)
                    .map_err(|source| BounceError::Program { addr: va, source })?;
                bytes += len as u64;
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryImage;
    use crate::paging::PagingMode;

    fn r(addr: u64, len: u64, write: bool) -> Range {
        Range { addr, len, write }
    }

    /// A program whose PML4 at 0x1000 maps 0x400000.. (4 pages) → 0x10000.. , user and
    /// writable, and whose memory around holds a recognisable pattern.
    fn program() -> MemoryImage {
        let mem = MemoryImage::new(0x20_0000);
        mem.write_u64(0x1000, 0x2000 | 7).unwrap();
        mem.write_u64(0x2000, 0x3000 | 7).unwrap();
        mem.write_u64(0x3000 + 2 * 8, 0x4000 | 7).unwrap();
        for i in 0..4u64 {
            mem.write_u64(0x4000 + i * 8, (0x1_0000 + i * PAGE) | 7)
                .unwrap();
        }
        let pattern: Vec<u8> = (0..4 * PAGE).map(|i| (i % 251) as u8 | 1).collect();
        mem.write_phys(0x1_0000, &pattern).unwrap();
        mem
    }

    #[test]
    fn pages_are_shared_by_ranges_and_writable_if_any_range_writes() {
        let plan = BouncePlan::new(
            &[
                r(0x40_0ff0, 0x20, false),
                r(0x40_1100, 8, true),
                r(0x40_3000, 0, true),
            ],
            16,
        )
        .unwrap();
        let pages: Vec<_> = plan.pages().collect();
        assert_eq!(
            pages,
            [
                BouncePage {
                    va: 0x40_0000,
                    offset: 0,
                    writable: false
                },
                BouncePage {
                    va: 0x40_1000,
                    offset: PAGE,
                    writable: true
                },
            ]
        );
    }

    #[test]
    fn only_listed_bytes_go_in_and_only_written_ranges_come_back() {
        let mem = program();
        let space = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let plan =
            BouncePlan::new(&[r(0x40_0ff0, 0x20, false), r(0x40_2100, 8, true)], 16).unwrap();
        let bounce = MemoryImage::new(16 * PAGE as usize);
        bounce.write_phys(0, &[0xee; 3 * PAGE as usize]).unwrap();
        plan.fill(&space, &bounce).unwrap();
        let mut page = vec![0u8; PAGE as usize];
        bounce.read_phys(0, &mut page).unwrap();
        let mut original = [0u8; 0x20];
        mem.read_phys(0x1_0ff0, &mut original).unwrap();
        assert_eq!(&page[0xff0..], &original[..0x10]);
        assert!(
            page[..0xff0].iter().all(|&b| b == 0),
            "bytes outside the range leaked"
        );
        bounce.read_phys(PAGE, &mut page).unwrap();
        assert_eq!(&page[..0x10], &original[0x10..]);
        assert!(page[0x10..].iter().all(|&b| b == 0));

        // The GVM writes all over both pages: only the written range comes back.
        bounce.write_phys(0, &[0xaa; 3 * PAGE as usize]).unwrap();
        let before_read_range = original;
        assert_eq!(plan.write_back(&bounce, &space).unwrap(), 8);
        plan.clear(&bounce).unwrap();
        let mut all = vec![0xffu8; 3 * PAGE as usize];
        bounce.read_phys(0, &mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0), "the bounce pages kept data");
        let mut back = [0u8; 0x10];
        mem.read_phys(0x1_20f8, &mut back).unwrap();
        assert_eq!(back[..8], program_bytes(0x1_20f8, 8)[..]);
        assert_eq!(back[8..], [0xaa; 8]);
        let mut after = [0u8; 0x20];
        mem.read_phys(0x1_0ff0, &mut after).unwrap();
        assert_eq!(
            after, before_read_range,
            "a read-only range was written back"
        );
        let mut next = [0u8; 8];
        mem.read_phys(0x1_2108, &mut next).unwrap();
        assert_eq!(next[..], program_bytes(0x1_2108, 8)[..]);
    }

    fn program_bytes(gpa: u64, n: u64) -> Vec<u8> {
        (gpa - 0x1_0000..gpa - 0x1_0000 + n)
            .map(|i| (i % 251) as u8 | 1)
            .collect()
    }

    #[test]
    fn ranges_outside_user_memory_or_too_large_are_refused() {
        for bad in [
            r(0xffff_8000_0000_0000, 8, false),
            r(USER_END - 4, 8, true),
            r(u64::MAX - 2, 8, false),
        ] {
            assert!(matches!(
                BouncePlan::new(&[bad], 16),
                Err(BounceError::NotUser { .. })
            ));
        }
        assert!(matches!(
            BouncePlan::new(&[r(0x1000, 17 * PAGE, false)], 16),
            Err(BounceError::TooLarge(16))
        ));
        let many: Vec<_> = (0..17).map(|i| r(0x1000 + i * 2 * PAGE, 1, true)).collect();
        assert!(matches!(
            BouncePlan::new(&many, 16),
            Err(BounceError::TooLarge(16))
        ));
        assert!(BouncePlan::new(&many[..16], 16).is_ok());
    }

    #[test]
    fn a_range_the_program_does_not_map_is_an_error() {
        let mem = program();
        let space = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let plan = BouncePlan::new(&[r(0x40_3ff8, 16, false)], 16).unwrap();
        let bounce = MemoryImage::new(16 * PAGE as usize);
        let err = plan.fill(&space, &bounce).unwrap_err();
        assert!(
            matches!(
                err,
                BounceError::Program {
                    addr: 0x40_4000,
                    ..
                }
            ),
            "{err}"
        );
    }
}
