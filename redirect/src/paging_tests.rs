//! Page-walk tests on crafted memory images.

use std::ops::ControlFlow;

use super::*;
use crate::memory::MemoryImage;

const P: u64 = PTE_P;
const RW: u64 = PTE_RW;
const US: u64 = PTE_US;
const PS: u64 = PTE_PS;
const XD: u64 = PTE_XD;
const ALL: u64 = P | RW | US;

const MEM_SIZE: usize = 4 << 20;
const TABLES_START: u64 = 0x10_0000;

/// Builds page tables inside a 4 MiB memory image.
struct Builder {
    mem: MemoryImage,
    next: u64,
    cr3: u64,
}

impl Builder {
    fn new() -> Self {
        let mut b = Builder {
            mem: MemoryImage::new(MEM_SIZE),
            next: TABLES_START,
            cr3: 0,
        };
        b.cr3 = b.alloc();
        b
    }

    fn alloc(&mut self) -> u64 {
        let t = self.next;
        self.next += PAGE_SIZE;
        t
    }

    fn leaf_level(size: PageSize) -> Level {
        match size {
            PageSize::Size4K => Level::Pt,
            PageSize::Size2M => Level::Pd,
            PageSize::Size1G => Level::Pdpt,
        }
    }

    /// Maps `gva` to `gpa` with a leaf of `size` carrying `flags`; intermediate entries get
    /// P|RW|US.
    fn map(&mut self, gva: u64, gpa: u64, size: PageSize, flags: u64) {
        let leaf = Self::leaf_level(size);
        let mut table = self.cr3;
        for level in Level::ALL {
            let slot = table + level.index(gva) * 8;
            if level == leaf {
                let ps = if size == PageSize::Size4K { 0 } else { PS };
                self.mem.write_u64(slot, gpa | flags | ps).unwrap();
                return;
            }
            let e = self.mem.read_u64(slot).unwrap();
            table = if e & P != 0 {
                e & ADDR_FIELD
            } else {
                let t = self.alloc();
                self.mem.write_u64(slot, t | ALL).unwrap();
                t
            };
        }
    }

    /// Address of the entry at `level` on the walk of `gva`.
    fn slot(&self, level: Level, gva: u64) -> u64 {
        let mut table = self.cr3;
        for l in Level::ALL {
            let slot = table + l.index(gva) * 8;
            if l == level {
                return slot;
            }
            table = self.mem.read_u64(slot).unwrap() & ADDR_FIELD;
        }
        unreachable!()
    }

    fn update(&self, level: Level, gva: u64, f: impl Fn(u64) -> u64) {
        let slot = self.slot(level, gva);
        let e = self.mem.read_u64(slot).unwrap();
        self.mem.write_u64(slot, f(e)).unwrap();
    }

    fn space(&self) -> AddressSpace<'_> {
        AddressSpace::new(&self.mem, PagingMode::default(), self.cr3)
    }

    fn tr(&self, gva: u64, access: Access) -> Result<Translation, WalkError> {
        self.space().translate(gva, access)
    }
}

const KERNEL: u64 = 0xffff_ffff_8000_0000;

#[test]
fn translate_4k() {
    let mut b = Builder::new();
    b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
    let t = b.tr(0x40_1234, Access::USER_WRITE).unwrap();
    assert_eq!(
        t,
        Translation {
            gpa: 0x5234,
            page_size: PageSize::Size4K,
            writable: true,
            user: true,
            nx: false
        }
    );
    assert!(matches!(
        b.tr(0x40_2000, Access::READ),
        Err(WalkError::NotPresent {
            level: Level::Pt,
            ..
        })
    ));
}

#[test]
fn translate_2m_and_1g() {
    let mut b = Builder::new();
    b.map(0x20_0000, 0x4000_0000, PageSize::Size2M, ALL);
    b.map(KERNEL, 0x1_0000_0000, PageSize::Size1G, P | RW);
    let t = b.tr(0x3f_fff8, Access::READ).unwrap();
    assert_eq!(t.gpa, 0x401f_fff8);
    assert_eq!(t.page_size, PageSize::Size2M);
    let t = b.tr(KERNEL + 0x1234_5678, Access::WRITE).unwrap();
    assert_eq!(t.gpa, 0x1_1234_5678);
    assert_eq!(t.page_size, PageSize::Size1G);
    assert!(!t.user);
    // Bit 12 of a large leaf is PAT, not address.
    b.update(Level::Pd, 0x20_0000, |e| e | 0x1000);
    assert_eq!(b.tr(0x20_0010, Access::READ).unwrap().gpa, 0x4000_0010);
}

#[test]
fn rw_cleared_at_any_level_makes_page_read_only() {
    for level in Level::ALL {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        b.update(level, 0x40_1000, |e| e & !RW);
        let t = b.tr(0x40_1000, Access::USER_READ).unwrap();
        assert!(!t.writable, "{level}");
        assert!(t.user && !t.nx);
        assert!(
            matches!(
                b.tr(0x40_1000, Access::WRITE),
                Err(WalkError::Protection { gva: 0x40_1000, .. })
            ),
            "{level}"
        );
        assert!(b
            .space()
            .write(0x40_1000, &[1], Privilege::Supervisor)
            .is_err());
    }
}

#[test]
fn us_cleared_at_any_level_makes_page_supervisor() {
    for level in Level::ALL {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        b.update(level, 0x40_1000, |e| e & !US);
        let t = b.tr(0x40_1000, Access::WRITE).unwrap();
        assert!(!t.user && t.writable, "{level}");
        assert!(matches!(
            b.tr(0x40_1000, Access::USER_READ),
            Err(WalkError::Protection { .. })
        ));
        let mut buf = [0u8; 4];
        assert!(b
            .space()
            .read(0x40_1000, &mut buf, Privilege::User)
            .is_err());
        assert!(b
            .space()
            .read(0x40_1000, &mut buf, Privilege::Supervisor)
            .is_ok());
    }
}

#[test]
fn nx_at_any_level() {
    for level in Level::ALL {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        assert!(b.tr(0x40_1000, Access::EXECUTE).is_ok());
        b.update(level, 0x40_1000, |e| e | XD);
        let t = b.tr(0x40_1000, Access::READ).unwrap();
        assert!(t.nx && t.writable && t.user, "{level}");
        assert!(matches!(
            b.tr(0x40_1000, Access::USER_EXECUTE),
            Err(WalkError::Protection { .. })
        ));
        // Without EFER.NXE, XD is a reserved bit.
        let mode = PagingMode::new(false, 52);
        assert!(matches!(
            translate(&b.mem, &mode, b.cr3, 0x40_1000, Access::READ),
            Err(WalkError::Reserved { level: l, .. }) if l == level
        ));
    }
}

#[test]
fn not_present_at_each_level() {
    for level in Level::ALL {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        b.update(level, 0x40_1000, |e| e & !P);
        assert_eq!(
            b.tr(0x40_1000, Access::READ),
            Err(WalkError::NotPresent {
                gva: 0x40_1000,
                level
            })
        );
        let mut stats_mappings = 0;
        let stats = b
            .space()
            .for_each_mapping(0..=u64::MAX, DEFAULT_MAX_TABLES, |_| {
                stats_mappings += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(stats_mappings, 0);
        assert_eq!(stats.mappings, 0);
    }
}

#[test]
fn non_canonical_addresses() {
    let mut b = Builder::new();
    b.map(0xffff_8000_0000_0000, 0x5000, PageSize::Size4K, ALL);
    assert!(b.tr(0xffff_8000_0000_0000, Access::READ).is_ok());
    for gva in [
        0x0000_8000_0000_0000,
        0x7fff_8000_0000_0000,
        0xfff7_8000_0000_0000,
        0x8000_0000_0000_0000,
    ] {
        assert_eq!(
            b.tr(gva, Access::READ),
            Err(WalkError::NonCanonical { gva })
        );
    }
    // A read running off the top of the lower half hits the hole.
    b.map(0x7fff_ffff_f000, 0x6000, PageSize::Size4K, ALL);
    let mut buf = [0u8; 0x20];
    assert_eq!(
        b.space()
            .read(0x7fff_ffff_fff0, &mut buf, Privilege::Supervisor),
        Err(WalkError::NonCanonical {
            gva: 0x8000_0000_0000
        })
    );
    // And a read wrapping past 2^64 is refused before any walk.
    assert!(matches!(
        b.space()
            .read(u64::MAX - 3, &mut buf, Privilege::Supervisor),
        Err(WalkError::AddressOverflow { .. })
    ));
}

#[test]
fn table_pointer_past_end_of_memory() {
    for level in [Level::Pml4, Level::Pdpt, Level::Pd] {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        // Point this level's entry at a table beyond the 4 MiB image.
        b.update(level, 0x40_1000, |e| (e & !ADDR_FIELD) | 0x1_0000_0000);
        let next = level.next().unwrap();
        assert!(
            matches!(
                b.tr(0x40_1000, Access::READ),
                Err(WalkError::TableRead { level: l, table: 0x1_0000_0000, .. }) if l == next
            ),
            "{level}"
        );
        let stats = b
            .space()
            .for_each_mapping(0..=u64::MAX, DEFAULT_MAX_TABLES, |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(stats.skipped_unreadable, 1);
        assert_eq!(stats.mappings, 0);
    }
    // CR3 itself outside memory, and an entry straddling the end of memory.
    let b = Builder::new();
    let mode = PagingMode::default();
    assert!(matches!(
        translate(&b.mem, &mode, u64::MAX, 0, Access::READ),
        Err(WalkError::TableRead {
            level: Level::Pml4,
            ..
        })
    ));
    assert!(
        for_each_mapping(&b.mem, &mode, 0xff_ffff_f000, 0..=u64::MAX, 16, |_| {
            ControlFlow::Continue(())
        })
        .is_err()
    );
}

#[test]
fn leaf_past_end_of_memory() {
    let mut b = Builder::new();
    b.map(0x40_0000, 0x3f_f000, PageSize::Size4K, ALL); // last page of memory
    b.map(0x40_1000, 0x40_0000, PageSize::Size4K, ALL); // first page past it
                                                        // Translation succeeds (it could be MMIO); data access fails, with nothing read.
    assert_eq!(b.tr(0x40_1000, Access::READ).unwrap().gpa, 0x40_0000);
    let mut buf = [0u8; 0x20];
    assert!(matches!(
        b.space().read(0x40_0ff0, &mut buf, Privilege::Supervisor),
        Err(WalkError::Data {
            gva: 0x40_1000,
            gpa: 0x40_0000,
            ..
        })
    ));
    assert!(b
        .space()
        .write(0x40_0ff0, &[0xaa; 0x20], Privilege::Supervisor)
        .is_err());
    assert_eq!(b.mem.read_u64(0x3f_fff0).unwrap(), 0, "no partial write");
}

#[test]
fn reserved_bits() {
    let mode40 = PagingMode::new(true, 40);
    for level in Level::ALL {
        let mut b = Builder::new();
        b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
        b.update(level, 0x40_1000, |e| e | (1 << 45));
        // Fine with MAXPHYADDR 52 as far as reserved bits go (the address then is out of
        // memory), reserved with MAXPHYADDR 40.
        assert!(!matches!(
            b.tr(0x40_1000, Access::READ),
            Err(WalkError::Reserved { .. })
        ));
        assert!(matches!(
            translate(&b.mem, &mode40, b.cr3, 0x40_1000, Access::READ),
            Err(WalkError::Reserved { level: l, .. }) if l == level
        ));
    }
    // PS at PML4 level is reserved.
    let mut b = Builder::new();
    b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
    b.update(Level::Pml4, 0x40_1000, |e| e | PS);
    assert!(matches!(
        b.tr(0x40_1000, Access::READ),
        Err(WalkError::Reserved {
            level: Level::Pml4,
            ..
        })
    ));
    // Low address bits of large leaves (above PAT) are reserved; PAT in a PTE is not.
    let mut b = Builder::new();
    b.map(0x20_0000, 0x40_0000, PageSize::Size2M, ALL);
    b.map(KERNEL, 0x4000_0000, PageSize::Size1G, ALL);
    b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL | PS);
    assert!(b.tr(0x40_1000, Access::READ).is_ok());
    b.update(Level::Pd, 0x20_0000, |e| e | (1 << 13));
    b.update(Level::Pdpt, KERNEL, |e| e | (1 << 20));
    assert!(matches!(
        b.tr(0x20_0000, Access::READ),
        Err(WalkError::Reserved {
            level: Level::Pd,
            ..
        })
    ));
    assert!(matches!(
        b.tr(KERNEL, Access::READ),
        Err(WalkError::Reserved {
            level: Level::Pdpt,
            ..
        })
    ));
    let stats = b
        .space()
        .for_each_mapping(0..=u64::MAX, DEFAULT_MAX_TABLES, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((stats.mappings, stats.skipped_reserved), (1, 2));
}

#[test]
fn paging_modes() {
    let b = Builder::new();
    let la57 = PagingMode {
        la57: true,
        ..PagingMode::default()
    };
    assert!(matches!(
        translate(&b.mem, &la57, b.cr3, 0, Access::READ),
        Err(WalkError::Unsupported { .. })
    ));
    for bits in [0, 31, 53, 255] {
        let m = PagingMode::new(true, bits);
        assert_eq!(
            translate(&b.mem, &m, b.cr3, 0, Access::READ),
            Err(WalkError::BadMaxPhysBits { bits })
        );
        assert!(for_each_mapping(&b.mem, &m, b.cr3, 0..=u64::MAX, 1, |_| {
            ControlFlow::Continue(())
        })
        .is_err());
    }
    let cr0 = 0x8005_0033;
    let cr4 = 0x3606f0;
    let efer = 0xd01;
    assert_eq!(
        PagingMode::from_control_regs(cr0, cr4, efer, 46),
        Ok(PagingMode::new(true, 46))
    );
    assert_eq!(
        PagingMode::from_control_regs(cr0, cr4, efer & !EFER_NXE, 46),
        Ok(PagingMode::new(false, 46))
    );
    assert!(PagingMode::from_control_regs(cr0 & !CR0_PG, cr4, efer, 46).is_err());
    assert!(PagingMode::from_control_regs(cr0, cr4, efer & !EFER_LMA, 46).is_err());
    assert!(PagingMode::from_control_regs(cr0, cr4 | CR4_LA57, efer, 46).is_err());
}

#[test]
fn self_referencing_pml4_entry() {
    // One PML4 entry pointing at the PML4 itself: a legal recursive mapping, and bounded.
    let b = Builder::new();
    b.mem.write_u64(b.cr3, b.cr3 | ALL).unwrap();
    let t = b.tr(0, Access::READ).unwrap();
    assert_eq!(t.gpa, b.cr3);
    let mut seen = Vec::new();
    let stats = b
        .space()
        .for_each_mapping(0..=u64::MAX, DEFAULT_MAX_TABLES, |m| {
            seen.push(*m);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(stats.tables_visited, 4);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].gva, seen[0].gpa), (0, b.cr3));
}

#[test]
fn pml4_cycle_everywhere_hits_the_cap() {
    // Every PML4 entry points back at the PML4: 1 + 512 + 512^2 + ... table visits.
    let b = Builder::new();
    for i in 0..512 {
        b.mem.write_u64(b.cr3 + i * 8, b.cr3 | ALL).unwrap();
    }
    for cap in [1, 100, 1000] {
        let mut calls = 0usize;
        let r = b.space().for_each_mapping(0..=u64::MAX, cap, |_| {
            calls += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(r, Err(WalkError::TooManyTables { limit: cap }));
        assert!(calls <= cap * 512);
    }
    assert!(matches!(
        b.space()
            .for_each_mapping(0..=u64::MAX, 4096, |_| { ControlFlow::Continue(()) }),
        Err(WalkError::TooManyTables { limit: 4096 })
    ));
    // A single translation through the cycle still reads at most four entries.
    assert_eq!(b.tr(0x1234, Access::READ).unwrap().gpa, b.cr3 | 0x234);
    // Also a cycle at a lower level: PD entries pointing back at the PDPT.
    let mut b = Builder::new();
    b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
    let pdpt = b.mem.read_u64(b.cr3).unwrap() & ADDR_FIELD;
    let pd = b.mem.read_u64(pdpt).unwrap() & ADDR_FIELD;
    for i in 0..512 {
        b.mem.write_u64(pd + i * 8, pdpt | ALL).unwrap();
    }
    let stats = b
        .space()
        .for_each_mapping(0..=u64::MAX, 1000, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(stats.tables_visited, 3 + 512);
}

#[test]
fn thousand_aliased_entries() {
    // PDPT: 512 entries -> one PD; PD: 488 entries -> one PT (1000 aliases in all); the PT
    // maps one page.
    let mut b = Builder::new();
    b.map(0, 0x5000, PageSize::Size4K, ALL);
    let pdpt = b.mem.read_u64(b.cr3).unwrap() & ADDR_FIELD;
    let pd = b.mem.read_u64(pdpt).unwrap() & ADDR_FIELD;
    let pt = b.mem.read_u64(pd).unwrap() & ADDR_FIELD;
    for i in 0..512 {
        b.mem.write_u64(pdpt + i * 8, pd | ALL).unwrap();
    }
    for i in 0..488 {
        b.mem.write_u64(pd + i * 8, pt | ALL).unwrap();
    }
    // 1 + 1 + 512 + 512 * 488 visits: far past a cap of 10_000.
    let r = b
        .space()
        .for_each_mapping(0..=u64::MAX, 10_000, |_| ControlFlow::Continue(()));
    assert_eq!(r, Err(WalkError::TooManyTables { limit: 10_000 }));
    // Restricted to the first GiB, the aliases are enumerated exactly.
    let mut gvas = Vec::new();
    let stats = b
        .space()
        .for_each_mapping(0..=(1 << 30) - 1, 10_000, |m| {
            gvas.push(m.gva);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(stats.tables_visited, 1 + 1 + 1 + 488);
    assert_eq!(gvas.len(), 488);
    assert!(gvas.windows(2).all(|w| w[1] - w[0] == 1 << 21));
    // Every alias translates to the same page.
    assert_eq!(b.tr(487 << 21, Access::READ).unwrap().gpa, 0x5000);
    assert_eq!(
        b.tr(((511u64 << 30) | (487 << 21)) + 8, Access::READ)
            .unwrap()
            .gpa,
        0x5008
    );
}

#[test]
fn for_each_mapping_order_range_and_stop() {
    let mut b = Builder::new();
    b.map(0x40_1000, 0x5000, PageSize::Size4K, ALL);
    b.map(0x60_0000, 0x20_0000, PageSize::Size2M, ALL | XD);
    b.map(0x4000_0000, 0x4000_0000, PageSize::Size1G, P);
    b.map(KERNEL, 0x100_0000, PageSize::Size2M, P | RW);
    b.map(0xffff_8000_0000_0000, 0x6000, PageSize::Size4K, P);
    let mut all = Vec::new();
    let stats = b
        .space()
        .for_each_mapping(0..=u64::MAX, DEFAULT_MAX_TABLES, |m| {
            all.push(*m);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(stats.mappings, 5);
    let gvas: Vec<u64> = all.iter().map(|m| m.gva).collect();
    assert_eq!(
        gvas,
        [
            0x40_1000,
            0x60_0000,
            0x4000_0000,
            0xffff_8000_0000_0000,
            KERNEL
        ]
    );
    assert_eq!(
        all[1],
        Mapping {
            gva: 0x60_0000,
            gpa: 0x20_0000,
            page_size: PageSize::Size2M,
            writable: true,
            user: true,
            nx: true
        }
    );
    assert!(!all[2].writable && !all[2].user);
    assert!(all[4].writable && !all[4].user);
    // Each mapping agrees with translate.
    for m in &all {
        let t = b.tr(m.gva, Access::READ).unwrap();
        assert_eq!(
            (t.gpa, t.page_size, t.writable, t.user, t.nx),
            (m.gpa, m.page_size, m.writable, m.user, m.nx)
        );
    }
    // A range inside the 1 GiB page still reports it whole; kernel half only.
    let mut v = Vec::new();
    b.space()
        .for_each_mapping(0x4000_1000..=0x4000_1fff, 64, |m| {
            v.push(m.gva);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(v, [0x4000_0000]);
    v.clear();
    b.space()
        .for_each_mapping(0x0000_8000_0000_0000..=u64::MAX, 64, |m| {
            v.push(m.gva);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(v, [0xffff_8000_0000_0000, KERNEL]);
    // Ranges entirely in the hole, or reversed, are empty.
    let s = b
        .space()
        .for_each_mapping(0x0000_8000_0000_0000..=0xfff0_0000_0000_0000, 64, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(s, WalkStats::default());
    #[allow(clippy::reversed_empty_ranges)]
    let s = b
        .space()
        .for_each_mapping(10..=5, 64, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(s.tables_visited, 0);
    // Stopping early.
    let mut n = 0;
    let s = b
        .space()
        .for_each_mapping(0..=u64::MAX, 64, |_| {
            n += 1;
            if n == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(s.stopped);
    assert_eq!(s.mappings, 2);
}

#[test]
fn read_write_virt_across_pages() {
    let mut b = Builder::new();
    // Two adjacent virtual pages backed by non-adjacent physical pages.
    b.map(0x40_0000, 0x9000, PageSize::Size4K, ALL);
    b.map(0x40_1000, 0x3000, PageSize::Size4K, ALL);
    let data: Vec<u8> = (0..64u8).collect();
    b.space().write(0x40_0fe0, &data, Privilege::User).unwrap();
    let mut back = [0u8; 64];
    b.space()
        .read(0x40_0fe0, &mut back, Privilege::User)
        .unwrap();
    assert_eq!(&back[..], &data[..]);
    let mut phys = [0u8; 32];
    b.mem.read_phys(0x3000, &mut phys).unwrap();
    assert_eq!(&phys[..], &data[32..]);
    b.mem.read_phys(0x9fe0, &mut phys).unwrap();
    assert_eq!(&phys[..], &data[..32]);
    // Empty accesses succeed without walking.
    b.space()
        .read(0xdead_0000, &mut [], Privilege::User)
        .unwrap();
}

#[test]
fn read_virt_into_unmapped_page_fails_whole() {
    let mut b = Builder::new();
    b.map(0x40_0000, 0x9000, PageSize::Size4K, ALL);
    let mut buf = [0u8; 64];
    assert_eq!(
        b.space().read(0x40_0fe0, &mut buf, Privilege::Supervisor),
        Err(WalkError::NotPresent {
            gva: 0x40_1000,
            level: Level::Pt
        })
    );
    // The write is refused before touching the mapped first page.
    assert!(b
        .space()
        .write(0x40_0fe0, &[0x55; 64], Privilege::Supervisor)
        .is_err());
    let mut phys = [0u8; 32];
    b.mem.read_phys(0x9fe0, &mut phys).unwrap();
    assert_eq!(phys, [0; 32]);
    // Read-only second page: a write spanning it is refused whole too.
    b.map(0x40_1000, 0x3000, PageSize::Size4K, P | US);
    assert!(matches!(
        b.space().write(0x40_0fe0, &[0x55; 64], Privilege::User),
        Err(WalkError::Protection { gva: 0x40_1000, .. })
    ));
    b.mem.read_phys(0x9fe0, &mut phys).unwrap();
    assert_eq!(phys, [0; 32]);
}

#[test]
fn read_cstr_bounds() {
    let mut b = Builder::new();
    b.map(0x40_0000, 0x9000, PageSize::Size4K, ALL);
    b.map(0x40_1000, 0x3000, PageSize::Size4K, ALL);
    // "hello" split across the page boundary.
    b.space()
        .write(0x40_0ffd, b"hello\0", Privilege::User)
        .unwrap();
    let s = b.space().read_cstr(0x40_0ffd, 64, Privilege::User).unwrap();
    assert_eq!(s, b"hello");
    // max_len counts the terminator.
    assert_eq!(
        b.space().read_cstr(0x40_0ffd, 6, Privilege::User).unwrap(),
        b"hello"
    );
    assert_eq!(
        b.space().read_cstr(0x40_0ffd, 5, Privilege::User),
        Err(WalkError::StringTooLong {
            gva: 0x40_0ffd,
            max_len: 5
        })
    );
    assert_eq!(
        b.space().read_cstr(0x40_0ffd, 0, Privilege::User),
        Err(WalkError::StringTooLong {
            gva: 0x40_0ffd,
            max_len: 0
        })
    );
    // No NUL anywhere within max_len.
    b.space()
        .write(0x40_0000, &[b'x'; 0x2000], Privilege::User)
        .unwrap();
    assert_eq!(
        b.space().read_cstr(0x40_0000, 0x1800, Privilege::User),
        Err(WalkError::StringTooLong {
            gva: 0x40_0000,
            max_len: 0x1800
        })
    );
    // Running into an unmapped page before a NUL is a walk error.
    assert!(matches!(
        b.space().read_cstr(0x40_0000, 0x10000, Privilege::User),
        Err(WalkError::NotPresent { gva: 0x40_2000, .. })
    ));
    // A NUL at the very end of the last mapped page needs no further page.
    b.mem.write_phys(0x3fff, &[0]).unwrap();
    assert_eq!(
        b.space()
            .read_cstr(0x40_1ffc, 0x10000, Privilege::User)
            .unwrap(),
        b"xxx"
    );
}

/// Deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn fuzz_random_tables_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let accesses = [
        Access::READ,
        Access::WRITE,
        Access::EXECUTE,
        Access::USER_READ,
        Access::USER_WRITE,
        Access::USER_EXECUTE,
    ];
    for round in 0..48 {
        // 24 pages of random tables with a hole at pages 8..12; pointers aim at pages 0..32.
        let mut bytes = vec![0u8; 24 * 0x1000];
        for slot in bytes.chunks_exact_mut(8) {
            let e = match rng.below(5) {
                0 => rng.next(),
                1 => 0,
                _ => {
                    (rng.below(32) << 12)
                        | (rng.next() & 0x1ff)
                        | P
                        | if rng.below(8) == 0 { XD } else { 0 }
                        | if rng.below(16) == 0 { 1 << 40 } else { 0 }
                }
            };
            slot.copy_from_slice(&e.to_le_bytes());
        }
        let tail = bytes.split_off(12 * 0x1000);
        bytes.truncate(8 * 0x1000);
        let mem = MemoryImage::from_regions(vec![(0, bytes), (12 * 0x1000, tail)]).unwrap();
        let mode = PagingMode::new(round % 2 == 0, [36, 46, 52][round % 3]);
        for _ in 0..300 {
            let cr3 = if rng.below(10) == 0 {
                rng.next()
            } else {
                (rng.below(26) << 12) | rng.below(0x1000)
            };
            let gva = match rng.below(4) {
                0 => rng.next(),
                1 => rng.below(1 << 32),
                2 => canonical_from_linear(rng.next()),
                _ => u64::MAX - rng.below(0x3000),
            };
            let access = accesses[rng.below(6) as usize];
            if let Ok(t) = translate(&mem, &mode, cr3, gva, access) {
                assert_eq!(t.gpa & 0xfff, gva & 0xfff);
            }
            let mut buf = [0u8; 0x1800];
            let len = rng.below(0x1800) as usize;
            let _ = read_virt(&mem, &mode, cr3, gva, &mut buf[..len], Privilege::User);
            let _ = read_cstr(&mem, &mode, cr3, gva, len, Privilege::Supervisor);
            if rng.below(20) == 0 {
                let _ = write_virt(&mem, &mode, cr3, gva, &buf[..len], Privilege::Supervisor);
            }
        }
        for _ in 0..4 {
            let cr3 = rng.below(26) << 12;
            let lo = canonical_from_linear(rng.next());
            let range = if rng.below(2) == 0 {
                0..=u64::MAX
            } else {
                lo..=u64::MAX
            };
            let mut n = 0usize;
            match for_each_mapping(&mem, &mode, cr3, range, 200, |m| {
                n += 1;
                assert!(is_canonical(m.gva));
                assert_eq!(m.gva & (m.page_size.bytes() - 1), 0);
                ControlFlow::Continue(())
            }) {
                Ok(s) => {
                    assert!(s.tables_visited <= 200);
                    assert_eq!(s.mappings, n);
                }
                Err(e) => assert!(matches!(
                    e,
                    WalkError::TooManyTables { limit: 200 } | WalkError::TableRead { .. }
                )),
            }
            assert!(n <= 200 * 512);
        }
    }
}
