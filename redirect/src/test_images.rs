//! Memory images shared by this crate's unit tests.

use crate::memory::{GuestPhysMemory, MemoryImage};

/// Where [`kernel_image`] maps the kernel half: the start of the kernel text mapping.
pub(crate) const K: u64 = 0xffff_ffff_8000_0000;

/// A 4 MiB image whose page tables (CR3 0x1000) map the kernel half K.. → 0.. with two
/// 2 MiB pages.
pub(crate) fn kernel_image() -> MemoryImage {
    let mem = MemoryImage::new(0x40_0000);
    mem.write_u64(0x1000 + 511 * 8, 0x3000 | 3).unwrap();
    mem.write_u64(0x3000 + 510 * 8, 0x4000 | 3).unwrap();
    mem.write_u64(0x4000, 0x83).unwrap();
    mem.write_u64(0x4008, 0x20_0000 | 0x83).unwrap();
    mem
}
