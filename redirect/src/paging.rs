//! x86-64 4-level page walks through a guest's own page tables.
//!
//! The tables are guest data and may be hostile: entries may point outside guest memory, set
//! reserved bits, point back at upper-level tables (cycles) or alias one table many times.
//! Nothing here panics, recurses more than four levels deep, or does unbounded work:
//! - [`translate`] reads at most four entries;
//! - [`read_virt`], [`write_virt`] and [`read_cstr`] translate page by page and are bounded by
//!   the caller's length;
//! - [`for_each_mapping`] counts the table pages it visits and fails with
//!   [`WalkError::TooManyTables`] past the caller's cap.
//!
//! Model: long mode with 4-level paging (LA57 is rejected as unsupported), 4 KiB, 2 MiB and
//! 1 GiB pages. Permissions accumulate across levels: writable = RW at every level, user = US
//! at every level, no-execute = XD at any level (when EFER.NXE; otherwise XD is a reserved
//! bit). Writes always require RW (as with CR0.WP=1, which Linux sets); SMEP, SMAP and
//! protection keys are not modelled. The walker only reads the tables: it never sets accessed
//! or dirty bits. CR3's low 12 bits (PCD/PWT or PCID) and bits above MAXPHYADDR are ignored.
//!
//! A leaf may map a guest-physical address outside guest RAM (MMIO, or a hostile entry):
//! [`translate`] still returns it, and data accesses through it fail with
//! [`WalkError::Data`]. A table pointer outside guest RAM fails the walk with
//! [`WalkError::TableRead`].

use std::fmt;
use std::ops::{ControlFlow, RangeInclusive};

use thiserror::Error;

use crate::memory::{GuestPhysMemory, MemError};

/// The base page size.
pub const PAGE_SIZE: u64 = 0x1000;
/// MAXPHYADDR used when the caller has nothing better (the architectural maximum).
pub const DEFAULT_MAX_PHYS_BITS: u8 = 52;
/// A default cap on table pages visited by [`for_each_mapping`]: 256 MiB worth of tables.
pub const DEFAULT_MAX_TABLES: usize = 1 << 16;

const ENTRIES: usize = 512;
pub(crate) const PTE_P: u64 = 1 << 0;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
pub(crate) const PTE_PS: u64 = 1 << 7;
pub(crate) const PTE_XD: u64 = 1 << 63;
/// Bits 12..51: the largest possible address field.
pub(crate) const ADDR_FIELD: u64 = ((1 << 52) - 1) & !(PAGE_SIZE - 1);
/// Canonical 48-bit addresses, mapped onto a contiguous "linear" range 0..2^48.
const LINEAR_MASK: u64 = (1 << 48) - 1;
const UPPER_HALF_START: u64 = 0xffff_8000_0000_0000;
const LOWER_HALF_END: u64 = 0x0000_7fff_ffff_ffff;

/// The control-register and EFER bits that decide the paging mode (Intel SDM vol. 3,
/// 2.5 and 2.2.1); the VMM's boot code uses the same ones.
pub mod control_bits {
    /// CR0: protected mode.
    pub const CR0_PE: u64 = 1;
    /// CR0: extension type (always 1 on modern CPUs).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4: physical address extension.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4: 5-level paging.
    pub const CR4_LA57: u64 = 1 << 12;
    /// EFER: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER: no-execute enable.
    pub const EFER_NXE: u64 = 1 << 11;
}
use control_bits::{CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA, EFER_NXE};

/// The size of a page mapped by a leaf entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB, mapped by a PT entry.
    Size4K,
    /// 2 MiB, mapped by a PD entry with PS set.
    Size2M,
    /// 1 GiB, mapped by a PDPT entry with PS set.
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }
}

/// A level of the page-table hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Page-map level 4, the table CR3 points to (bits 47..39 of the address).
    Pml4,
    /// Page-directory-pointer table (bits 38..30); may map 1 GiB pages.
    Pdpt,
    /// Page directory (bits 29..21); may map 2 MiB pages.
    Pd,
    /// Page table (bits 20..12); maps 4 KiB pages.
    Pt,
}

impl Level {
    const ALL: [Level; 4] = [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];

    /// Bit position of the address bits this level's index starts at.
    const fn shift(self) -> u32 {
        match self {
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    const fn next(self) -> Option<Level> {
        match self {
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pd => Some(Level::Pt),
            Level::Pt => None,
        }
    }

    /// Index into this level's table for a (linear or canonical) address.
    const fn index(self, addr: u64) -> u64 {
        (addr >> self.shift()) & (ENTRIES as u64 - 1)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

/// Who performs an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// CPL 0–2: user and supervisor pages alike (SMAP/SMEP not modelled).
    Supervisor,
    /// CPL 3: every level must have US set.
    User,
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Any present mapping allows it.
    Read,
    /// Needs RW at every level.
    Write,
    /// Needs no XD at any level.
    Execute,
}

/// An access to check a translation against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or execute.
    pub kind: AccessKind,
    /// Supervisor or user.
    pub privilege: Privilege,
}

impl Access {
    /// A supervisor read.
    pub const READ: Access = Access::new(AccessKind::Read, Privilege::Supervisor);
    /// A supervisor write.
    pub const WRITE: Access = Access::new(AccessKind::Write, Privilege::Supervisor);
    /// A supervisor instruction fetch.
    pub const EXECUTE: Access = Access::new(AccessKind::Execute, Privilege::Supervisor);
    /// A user-mode (CPL 3) read.
    pub const USER_READ: Access = Access::new(AccessKind::Read, Privilege::User);
    /// A user-mode (CPL 3) write.
    pub const USER_WRITE: Access = Access::new(AccessKind::Write, Privilege::User);
    /// A user-mode (CPL 3) instruction fetch.
    pub const USER_EXECUTE: Access = Access::new(AccessKind::Execute, Privilege::User);

    /// An access of `kind` at `privilege`.
    pub const fn new(kind: AccessKind, privilege: Privilege) -> Self {
        Access { kind, privilege }
    }

    fn permits(self, writable: bool, user: bool, nx: bool) -> bool {
        if self.privilege == Privilege::User && !user {
            return false;
        }
        match self.kind {
            AccessKind::Read => true,
            AccessKind::Write => writable,
            AccessKind::Execute => !nx,
        }
    }
}

/// The paging configuration of the vCPU whose tables are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingMode {
    /// EFER.NXE: bit 63 of entries means no-execute (otherwise it is reserved).
    pub nx_enabled: bool,
    /// CR4.LA57: 5-level paging, which is not supported (every walk fails).
    pub la57: bool,
    /// MAXPHYADDR, 32..=52: entry address bits at and above it are reserved.
    pub max_phys_bits: u8,
}

impl Default for PagingMode {
    fn default() -> Self {
        PagingMode::new(true, DEFAULT_MAX_PHYS_BITS)
    }
}

impl PagingMode {
    /// 4-level paging with EFER.NXE = `nx_enabled` and the given MAXPHYADDR (not checked
    /// here; a walk with a value outside 32..=52 fails with [`WalkError::BadMaxPhysBits`]).
    pub const fn new(nx_enabled: bool, max_phys_bits: u8) -> Self {
        PagingMode {
            nx_enabled,
            la57: false,
            max_phys_bits,
        }
    }

    /// From a vCPU's control registers (e.g. `KVM_GET_SREGS`) and its MAXPHYADDR
    /// (CPUID 0x8000_0008 EAX bits 7..0, as given to the guest). Fails unless the vCPU is in long
    /// mode with 4-level paging.
    pub fn from_control_regs(
        cr0: u64,
        cr4: u64,
        efer: u64,
        max_phys_bits: u8,
    ) -> Result<Self, WalkError> {
        if cr0 & CR0_PG == 0 {
            return Err(WalkError::Unsupported {
                reason: "paging is disabled (CR0.PG=0)",
            });
        }
        if cr4 & CR4_PAE == 0 || efer & EFER_LMA == 0 {
            return Err(WalkError::Unsupported {
                reason: "the vCPU is not in long mode (CR4.PAE=0 or EFER.LMA=0)",
            });
        }
        let mode = PagingMode {
            nx_enabled: efer & EFER_NXE != 0,
            la57: cr4 & CR4_LA57 != 0,
            max_phys_bits,
        };
        mode.validate()?;
        Ok(mode)
    }

    fn validate(&self) -> Result<(), WalkError> {
        if self.la57 {
            return Err(WalkError::Unsupported {
                reason: "5-level paging (CR4.LA57) is not supported",
            });
        }
        if !(32..=52).contains(&self.max_phys_bits) {
            return Err(WalkError::BadMaxPhysBits {
                bits: self.max_phys_bits,
            });
        }
        Ok(())
    }

    /// Address bits 12..MAXPHYADDR. Only valid after `validate`.
    fn addr_mask(&self) -> u64 {
        let below = 1u64
            .checked_shl(u32::from(self.max_phys_bits))
            .map_or(u64::MAX, |b| b - 1);
        ADDR_FIELD & below
    }

    /// Address-field bits MAXPHYADDR..51, which must be zero.
    fn reserved_addr_bits(&self) -> u64 {
        ADDR_FIELD & !self.addr_mask()
    }
}

/// The result of translating one guest-virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address of the translated byte (page base + offset).
    pub gpa: u64,
    /// Size of the page that maps it.
    pub page_size: PageSize,
    /// RW at every level.
    pub writable: bool,
    /// US at every level.
    pub user: bool,
    /// XD at some level (always false without EFER.NXE).
    pub nx: bool,
}

/// One leaf mapping found by [`for_each_mapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// Canonical guest-virtual address of the page (aligned to `page_size`).
    pub gva: u64,
    /// Guest-physical address of the page (aligned to `page_size`); not necessarily RAM.
    pub gpa: u64,
    /// Size of the page.
    pub page_size: PageSize,
    /// RW at every level.
    pub writable: bool,
    /// US at every level.
    pub user: bool,
    /// XD at some level (always false without EFER.NXE).
    pub nx: bool,
}

/// What [`for_each_mapping`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Table pages read, counting each visit of an aliased table.
    pub tables_visited: usize,
    /// Leaf mappings passed to the callback.
    pub mappings: usize,
    /// Present entries skipped because they set reserved bits (a CPU would fault on them).
    pub skipped_reserved: usize,
    /// Present entries skipped because the table they point to is not in guest memory.
    pub skipped_unreadable: usize,
    /// The callback asked to stop.
    pub stopped: bool,
}

/// Why a page walk or a virtual access failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// The vCPU is not in 4-level long-mode paging (paging off, not long mode, or LA57).
    #[error("unsupported paging mode: {reason}")]
    Unsupported {
        /// Which condition failed.
        reason: &'static str,
    },
    /// [`PagingMode::max_phys_bits`] is outside 32..=52.
    #[error("unsupported MAXPHYADDR {bits} (expected 32..=52)")]
    BadMaxPhysBits {
        /// The rejected MAXPHYADDR.
        bits: u8,
    },
    /// The address is not 48-bit canonical.
    #[error("guest-virtual address {gva:#x} is not canonical")]
    NonCanonical {
        /// The rejected address.
        gva: u64,
    },
    /// `[gva, gva + len)` wraps past `u64::MAX`.
    #[error("guest-virtual range {gva:#x}+{len:#x} wraps the address space")]
    AddressOverflow {
        /// Start of the range.
        gva: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// An entry on the walk has P clear.
    #[error("guest-virtual address {gva:#x} is not mapped: {level} entry not present")]
    NotPresent {
        /// The address being translated.
        gva: u64,
        /// The level whose entry is not present.
        level: Level,
    },
    /// An entry on the walk sets reserved bits (a CPU would raise a reserved-bit fault).
    #[error("guest-virtual address {gva:#x}: {level} entry {entry:#x} sets reserved bits")]
    Reserved {
        /// The address being translated.
        gva: u64,
        /// The level of the offending entry.
        level: Level,
        /// The raw entry.
        entry: u64,
    },
    /// A page-table page is not in guest memory.
    #[error(
        "guest-virtual address {gva:#x}: cannot read the {level} table at {table:#x}: {source}"
    )]
    TableRead {
        /// The address being translated (for [`for_each_mapping`], the start of the range).
        gva: u64,
        /// The level of the unreadable table.
        level: Level,
        /// Guest-physical address of the table.
        table: u64,
        /// Why the read failed.
        source: MemError,
    },
    /// The mapping exists but does not permit the access.
    #[error(
        "{access:?} access to guest-virtual address {gva:#x} denied by its mapping {translation:?}"
    )]
    Protection {
        /// The address accessed.
        gva: u64,
        /// The access that was denied.
        access: Access,
        /// The mapping found for `gva`.
        translation: Translation,
    },
    /// The address translates, but the guest-physical bytes it maps to are not guest memory.
    #[error("guest-virtual address {gva:#x} maps to {gpa:#x}: {source}")]
    Data {
        /// Guest-virtual start of the failing piece (within one page).
        gva: u64,
        /// The guest-physical address it translates to.
        gpa: u64,
        /// Why the access failed.
        source: MemError,
    },
    /// [`read_cstr`] found no NUL within its limit.
    #[error("no NUL terminator within {max_len} bytes of guest-virtual address {gva:#x}")]
    StringTooLong {
        /// Start of the string.
        gva: u64,
        /// The limit, in bytes, terminator included.
        max_len: usize,
    },
    /// [`for_each_mapping`] would read more table pages than its cap.
    #[error("page tables visit more than {limit} table pages (cyclic or aliased tables?)")]
    TooManyTables {
        /// The caller's cap on table pages.
        limit: usize,
    },
}

/// True for 48-bit canonical addresses (bits 63..47 all equal).
pub fn is_canonical(gva: u64) -> bool {
    let top = (gva as i64) >> 47;
    top == 0 || top == -1
}

/// Sign-extends a 48-bit linear address to a canonical one.
fn canonical_from_linear(lin: u64) -> u64 {
    (((lin & LINEAR_MASK) << 16) as i64 >> 16) as u64
}

/// A decoded entry.
enum Entry {
    NotPresent,
    Reserved,
    Table(u64),
    Leaf { base: u64, size: PageSize },
}

fn decode(entry: u64, level: Level, mode: &PagingMode) -> Entry {
    if entry & PTE_P == 0 {
        return Entry::NotPresent;
    }
    if entry & mode.reserved_addr_bits() != 0 || (!mode.nx_enabled && entry & PTE_XD != 0) {
        return Entry::Reserved;
    }
    let addr = entry & mode.addr_mask();
    let large = match level {
        Level::Pml4 if entry & PTE_PS != 0 => return Entry::Reserved,
        Level::Pml4 => None,
        Level::Pdpt => (entry & PTE_PS != 0).then_some(PageSize::Size1G),
        Level::Pd => (entry & PTE_PS != 0).then_some(PageSize::Size2M),
        Level::Pt => {
            return Entry::Leaf {
                base: addr,
                size: PageSize::Size4K,
            }
        }
    };
    match large {
        None => Entry::Table(addr),
        Some(size) => {
            // Bit 12 is PAT; bits 13 up to the page size are reserved.
            if addr & size.offset_mask() & !0x1fff != 0 {
                return Entry::Reserved;
            }
            Entry::Leaf {
                base: addr & !size.offset_mask(),
                size,
            }
        }
    }
}

/// Permissions accumulated down the levels.
#[derive(Clone, Copy)]
struct Perms {
    writable: bool,
    user: bool,
    nx: bool,
}

impl Perms {
    const TOP: Perms = Perms {
        writable: true,
        user: true,
        nx: false,
    };

    fn and(self, entry: u64, mode: &PagingMode) -> Perms {
        Perms {
            writable: self.writable && entry & PTE_RW != 0,
            user: self.user && entry & PTE_US != 0,
            nx: self.nx || (mode.nx_enabled && entry & PTE_XD != 0),
        }
    }
}

/// Translates `gva` through the tables at `cr3` and checks `access` against the result.
pub fn translate(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    gva: u64,
    access: Access,
) -> Result<Translation, WalkError> {
    mode.validate()?;
    if !is_canonical(gva) {
        return Err(WalkError::NonCanonical { gva });
    }
    let mut table = cr3 & mode.addr_mask();
    let mut perms = Perms::TOP;
    // At most one entry per level: four reads, whatever the tables say.
    for level in Level::ALL {
        let entry_gpa = table | (level.index(gva) * 8);
        let entry = mem
            .read_u64(entry_gpa)
            .map_err(|source| WalkError::TableRead {
                gva,
                level,
                table,
                source,
            })?;
        match decode(entry, level, mode) {
            Entry::NotPresent => return Err(WalkError::NotPresent { gva, level }),
            Entry::Reserved => return Err(WalkError::Reserved { gva, level, entry }),
            Entry::Table(next) => {
                perms = perms.and(entry, mode);
                table = next;
            }
            Entry::Leaf { base, size } => {
                perms = perms.and(entry, mode);
                let translation = Translation {
                    gpa: base | (gva & size.offset_mask()),
                    page_size: size,
                    writable: perms.writable,
                    user: perms.user,
                    nx: perms.nx,
                };
                if !access.permits(perms.writable, perms.user, perms.nx) {
                    return Err(WalkError::Protection {
                        gva,
                        access,
                        translation,
                    });
                }
                return Ok(translation);
            }
        }
    }
    // Unreachable: `decode` never returns a table pointer at the PT level.
    Err(WalkError::NotPresent {
        gva,
        level: Level::Pt,
    })
}

/// A piece of a virtual access that lies within one page.
struct Chunk {
    gva: u64,
    gpa: u64,
    len: usize,
}

/// Translates every page of `[gva, gva + len)` and checks the physical pieces are backed,
/// before any data is touched.
fn plan(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    gva: u64,
    len: usize,
    access: Access,
) -> Result<Vec<Chunk>, WalkError> {
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    let end = gva
        .checked_add(len64)
        .ok_or(WalkError::AddressOverflow { gva, len: len64 })?;
    let mut chunks = Vec::new();
    let mut cur = gva;
    while cur < end {
        let t = translate(mem, mode, cr3, cur, access)?;
        // Stay within one 4 KiB page even inside large pages (bounded, simple).
        let page_left = PAGE_SIZE - (cur & (PAGE_SIZE - 1));
        let n = page_left.min(end - cur);
        if !mem.contains(t.gpa, n) {
            return Err(WalkError::Data {
                gva: cur,
                gpa: t.gpa,
                source: MemError::OutOfRange { gpa: t.gpa, len: n },
            });
        }
        let n_usize =
            usize::try_from(n).map_err(|_| WalkError::AddressOverflow { gva, len: len64 })?;
        chunks.push(Chunk {
            gva: cur,
            gpa: t.gpa,
            len: n_usize,
        });
        cur += n;
    }
    Ok(chunks)
}

/// Reads `buf.len()` bytes at guest-virtual `gva`, translating each page with a read access
/// at `privilege`. Every page is translated and bounds-checked before anything is read; on
/// error the contents of `buf` are unspecified.
pub fn read_virt(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    gva: u64,
    buf: &mut [u8],
    privilege: Privilege,
) -> Result<(), WalkError> {
    let chunks = plan(
        mem,
        mode,
        cr3,
        gva,
        buf.len(),
        Access::new(AccessKind::Read, privilege),
    )?;
    let mut rest: &mut [u8] = buf;
    for c in chunks {
        let n = c.len.min(rest.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        mem.read_phys(c.gpa, head)
            .map_err(|source| WalkError::Data {
                gva: c.gva,
                gpa: c.gpa,
                source,
            })?;
        rest = tail;
    }
    Ok(())
}

/// Writes `buf` at guest-virtual `gva`, translating each page with a write access at
/// `privilege`. Every page is translated and bounds-checked before anything is written, so a
/// bad page anywhere in the range leaves guest memory untouched.
pub fn write_virt(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    gva: u64,
    buf: &[u8],
    privilege: Privilege,
) -> Result<(), WalkError> {
    let chunks = plan(
        mem,
        mode,
        cr3,
        gva,
        buf.len(),
        Access::new(AccessKind::Write, privilege),
    )?;
    let mut rest = buf;
    for c in chunks {
        let (head, tail) = rest.split_at(c.len.min(rest.len()));
        mem.write_phys(c.gpa, head)
            .map_err(|source| WalkError::Data {
                gva: c.gva,
                gpa: c.gpa,
                source,
            })?;
        rest = tail;
    }
    Ok(())
}

/// Reads a NUL-terminated string at guest-virtual `gva`, looking at no more than `max_len`
/// bytes (terminator included) and translating no page past the terminator. Returns the
/// bytes before the NUL.
pub fn read_cstr(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    gva: u64,
    max_len: usize,
    privilege: Privilege,
) -> Result<Vec<u8>, WalkError> {
    let access = Access::new(AccessKind::Read, privilege);
    let mut out = Vec::new();
    let mut page = [0u8; PAGE_SIZE as usize];
    let mut cur = gva;
    while out.len() < max_len {
        let t = translate(mem, mode, cr3, cur, access)?;
        let page_left = PAGE_SIZE - (cur & (PAGE_SIZE - 1));
        let want = usize::try_from(page_left)
            .unwrap_or(usize::MAX)
            .min(max_len - out.len());
        let chunk = &mut page[..want.min(PAGE_SIZE as usize)];
        mem.read_phys(t.gpa, chunk)
            .map_err(|source| WalkError::Data {
                gva: cur,
                gpa: t.gpa,
                source,
            })?;
        if let Some(nul) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            return Ok(out);
        }
        out.extend_from_slice(chunk);
        cur = match cur.checked_add(page_left) {
            Some(next) => next,
            None if out.len() < max_len => {
                return Err(WalkError::AddressOverflow {
                    gva,
                    len: u64::try_from(max_len).unwrap_or(u64::MAX),
                })
            }
            None => break,
        };
    }
    Err(WalkError::StringTooLong { gva, max_len })
}

/// Calls `f` for every leaf mapping that intersects `range` (canonical guest-virtual
/// addresses, inclusive; the non-canonical hole is skipped), in increasing address order.
/// Large pages are reported whole even if they only partly overlap the range.
///
/// Bounded against hostile tables: each table page read counts against `max_tables`
/// (aliased tables count once per visit), and going past it fails with
/// [`WalkError::TooManyTables`]. Entries with reserved bits and pointers to tables outside
/// guest memory are skipped and counted in [`WalkStats`] (a CPU would fault on them too);
/// only an unreadable top-level table is an error. `f` may return `ControlFlow::Break` to
/// stop early.
pub fn for_each_mapping<F>(
    mem: &dyn GuestPhysMemory,
    mode: &PagingMode,
    cr3: u64,
    range: RangeInclusive<u64>,
    max_tables: usize,
    f: F,
) -> Result<WalkStats, WalkError>
where
    F: FnMut(&Mapping) -> ControlFlow<()>,
{
    mode.validate()?;
    let (start, end) = (*range.start(), *range.end());
    let lo = if is_canonical(start) {
        start
    } else {
        UPPER_HALF_START
    };
    let hi = if is_canonical(end) {
        end
    } else {
        LOWER_HALF_END
    };
    let mut walker = Enumerator {
        mem,
        mode,
        max_tables,
        lin_lo: lo & LINEAR_MASK,
        lin_hi: hi & LINEAR_MASK,
        stats: WalkStats::default(),
        f,
    };
    if start > end || lo > hi {
        return Ok(walker.stats);
    }
    let root = cr3 & mode.addr_mask();
    if let ControlFlow::Break(()) = walker.visit(Level::Pml4, root, 0, Perms::TOP)? {
        walker.stats.stopped = true;
    }
    Ok(walker.stats)
}

struct Enumerator<'a, F> {
    mem: &'a dyn GuestPhysMemory,
    mode: &'a PagingMode,
    max_tables: usize,
    /// Inclusive bounds in 48-bit linear space.
    lin_lo: u64,
    lin_hi: u64,
    stats: WalkStats,
    f: F,
}

impl<F: FnMut(&Mapping) -> ControlFlow<()>> Enumerator<'_, F> {
    /// Visits the table at `table`, which maps linear addresses from `lin_base`. Recursion is
    /// at most four deep: each call goes one level down.
    fn visit(
        &mut self,
        level: Level,
        table: u64,
        lin_base: u64,
        perms: Perms,
    ) -> Result<ControlFlow<()>, WalkError> {
        if self.stats.tables_visited >= self.max_tables {
            return Err(WalkError::TooManyTables {
                limit: self.max_tables,
            });
        }
        self.stats.tables_visited += 1;
        let mut page = [0u8; PAGE_SIZE as usize];
        if let Err(source) = self.mem.read_phys(table, &mut page) {
            if level == Level::Pml4 {
                return Err(WalkError::TableRead {
                    gva: canonical_from_linear(self.lin_lo),
                    level,
                    table,
                    source,
                });
            }
            self.stats.skipped_unreadable += 1;
            return Ok(ControlFlow::Continue(()));
        }
        let shift = level.shift();
        let first = self.lin_lo.saturating_sub(lin_base) >> shift;
        let last = (self.lin_hi.saturating_sub(lin_base) >> shift).min(ENTRIES as u64 - 1);
        let entries = page.chunks_exact(8).skip(first as usize);
        for (index, raw) in (first..=last).zip(entries) {
            let entry_lin = lin_base | (index << shift);
            let entry = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
            match decode(entry, level, self.mode) {
                Entry::NotPresent => {}
                Entry::Reserved => self.stats.skipped_reserved += 1,
                Entry::Table(next_table) => {
                    let Some(next_level) = level.next() else {
                        self.stats.skipped_reserved += 1;
                        continue;
                    };
                    let p = perms.and(entry, self.mode);
                    if self.visit(next_level, next_table, entry_lin, p)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                Entry::Leaf { base, size } => {
                    let p = perms.and(entry, self.mode);
                    let mapping = Mapping {
                        gva: canonical_from_linear(entry_lin),
                        gpa: base,
                        page_size: size,
                        writable: p.writable,
                        user: p.user,
                        nx: p.nx,
                    };
                    self.stats.mappings += 1;
                    if (self.f)(&mapping).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// A guest address space: memory, paging mode and CR3 together, for shorter call sites.
#[derive(Clone, Copy)]
pub struct AddressSpace<'a> {
    /// The guest's physical memory, which holds the tables and the data.
    pub mem: &'a dyn GuestPhysMemory,
    /// The paging configuration to walk with.
    pub mode: PagingMode,
    /// CR3: the PML4's guest-physical address (low 12 bits and bits above MAXPHYADDR are
    /// ignored).
    pub cr3: u64,
}

impl<'a> AddressSpace<'a> {
    /// Bundles `mem`, `mode` and `cr3`.
    pub fn new(mem: &'a dyn GuestPhysMemory, mode: PagingMode, cr3: u64) -> Self {
        AddressSpace { mem, mode, cr3 }
    }

    /// See [`translate`].
    pub fn translate(&self, gva: u64, access: Access) -> Result<Translation, WalkError> {
        translate(self.mem, &self.mode, self.cr3, gva, access)
    }

    /// See [`read_virt`].
    pub fn read(&self, gva: u64, buf: &mut [u8], privilege: Privilege) -> Result<(), WalkError> {
        read_virt(self.mem, &self.mode, self.cr3, gva, buf, privilege)
    }

    /// See [`write_virt`].
    pub fn write(&self, gva: u64, buf: &[u8], privilege: Privilege) -> Result<(), WalkError> {
        write_virt(self.mem, &self.mode, self.cr3, gva, buf, privilege)
    }

    /// See [`read_cstr`].
    pub fn read_cstr(
        &self,
        gva: u64,
        max_len: usize,
        privilege: Privilege,
    ) -> Result<Vec<u8>, WalkError> {
        read_cstr(self.mem, &self.mode, self.cr3, gva, max_len, privilege)
    }

    /// See [`for_each_mapping`].
    pub fn for_each_mapping<F>(
        &self,
        range: RangeInclusive<u64>,
        max_tables: usize,
        f: F,
    ) -> Result<WalkStats, WalkError>
    where
        F: FnMut(&Mapping) -> ControlFlow<()>,
    {
        for_each_mapping(self.mem, &self.mode, self.cr3, range, max_tables, f)
    }
}

#[cfg(test)]
#[path = "paging_tests.rs"]
mod tests;
