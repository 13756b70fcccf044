//! Target `view_builder`: `redirect::view::build_view` (with its `confine_execution`) on
//! a hostile GVM image and CR3 and a fuzz-chosen SVM program image, then the page walker
//! (`translate`, `for_each_mapping`, `read_cstr`, `read_virt`) over the same GVM image.
//!
//! Promises checked besides "no panic, no hang":
//! - `build_view` never writes GVM or SVM memory;
//! - in a built view, every kernel-half PML4 slot but 511 and the window's is no-execute;
//!   every executable mapping of slot 511 is a page of the trusted text mapped read-only
//!   to its own physical page (`va - __START_KERNEL_map`), or meets `also_exec`; every
//!   mapping over the text is such a page, and every text page translates to it;
//! - the window's slot maps exactly the scratch stack, the trap page and the read-only
//!   kernel stub (the VMM's tables and stubs have no alias: promise 4);
//! - the user half maps only the stub, the sentinel and the program's user pages, each
//!   at `svm_base` + what the SVM's own tables say, with the same size and permissions;
//! - the walker: `for_each_mapping` reports aligned, canonical, increasing, disjoint
//!   mappings within its budget that `translate` agrees with; `translate` of one address
//!   agrees with a one-address `for_each_mapping`; `read_cstr` agrees with `read_virt`.

use std::ops::ControlFlow;

use redirect::memory::Relocated;
use redirect::view::{
    build_view, offsets, View, ViewLayout, KSTUB_KVA, START_KERNEL_MAP, TRAP_KVA, WINDOW_KVA,
    WINDOW_SIZE, WINDOW_SLOT,
};
use redirect::{
    for_each_mapping, is_canonical, read_cstr, read_virt, translate, Access, GuestPhysMemory,
    Level, Mapping, MemoryImage, PageSize, PagingMode, Privilege, WalkError,
};

use crate::codec::{Codec, Io};
use crate::image::{meets, Addr, Built, Composed, ImageSpec, Op, Places, Recorder};

const XD: u64 = 1 << 63;
const P: u64 = 1;
const USER_TOP: u64 = 0x0000_7fff_ffff_ffff;
const SLOT_511_KVA: u64 = 0xffff_ff80_0000_0000;

/// One address to translate and read a string at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// The guest-virtual address.
    pub gva: Addr,
    /// `read_cstr`'s limit: `max_len % 8193`.
    pub max_len: u16,
}

impl Codec for Probe {
    fn io(&mut self, io: &mut Io<'_>) {
        self.gva.io(io);
        io.u16(&mut self.max_len);
    }
}

/// A `view_builder` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    /// GVM memory.
    pub gvm: ImageSpec,
    /// The GVM vCPU's CR3.
    pub gvm_cr3: Addr,
    /// SVM memory (the calling program's tables).
    pub svm: ImageSpec,
    /// The program's CR3.
    pub svm_cr3: Addr,
    /// Bit 0: EFER.NXE off; the rest: MAXPHYADDR (0: 52, else `32 + n % 22`: 53 is bad).
    pub svm_mode: u8,
    /// First page of the trusted text (guest-physical page number, below 2 GiB).
    pub text_page: u32,
    /// Pages of text: `1 + text_pages % 2048`.
    pub text_pages: u16,
    /// GiB of GVM RAM past the image's end (`% 8`): moves the window and the SVM alias.
    pub gvm_end_gib: u8,
    /// 0: no `also_exec`; 1: a range in PML4 slot 511; 2: a raw range.
    pub also_kind: u8,
    /// Where the `also_exec` range starts (raw, or an offset into slot 511).
    pub also_start: u64,
    /// Its length in bytes.
    pub also_len: u32,
    /// Paging mode of the walker checks on the GVM image: as `svm_mode` (31 or 53: bad).
    pub walk_mode: u8,
    /// Addresses the walker checks look at.
    pub probes: Vec<Probe>,
}

impl Codec for Case {
    fn io(&mut self, io: &mut Io<'_>) {
        self.gvm.io(io);
        self.gvm_cr3.io(io);
        self.svm.io(io);
        self.svm_cr3.io(io);
        io.u8(&mut self.svm_mode);
        io.u32(&mut self.text_page);
        io.u16(&mut self.text_pages);
        io.u8(&mut self.gvm_end_gib);
        io.u8(&mut self.also_kind);
        io.u64(&mut self.also_start);
        io.u32(&mut self.also_len);
        io.u8(&mut self.walk_mode);
        io.list(&mut self.probes, 8);
    }
}

fn mode_of(bits: u8, base: u8) -> PagingMode {
    let phys = match bits >> 1 {
        0 => 52,
        n => base + n % 23,
    };
    PagingMode::new(bits & 1 == 0, phys)
}

/// Runs one input; the view it built, if any.
pub fn run(data: &[u8]) -> Option<View> {
    check(&Case::decode(data))
}

/// Runs one case and checks the promises; the view it built, if any.
pub fn check(case: &Case) -> Option<View> {
    let text_start = (u64::from(case.text_page) % 0x8_0000) << 12;
    let text = (
        text_start,
        text_start + ((1 + u64::from(case.text_pages) % 2048) << 12),
    );
    let gvm_end = case.gvm.end() + (u64::from(case.gvm_end_gib % 8) << 30);
    let mut layout = ViewLayout::for_guest(gvm_end, text)?;
    layout.also_exec = match case.also_kind % 3 {
        0 => None,
        1 => {
            let start = SLOT_511_KVA + ((case.also_start % (1 << 39)) & !0xfff);
            Some((start, start.saturating_add(u64::from(case.also_len))))
        }
        _ => case
            .also_start
            .checked_add(u64::from(case.also_len))
            .map(|end| (case.also_start, end)),
    };
    let places = Places {
        window_gpa: layout.window_gpa,
        svm_base: layout.svm_base,
    };
    let gvm = case.gvm.build(places);
    let svm = case.svm.build(places);
    let gvm_cr3 = gvm.addr(&case.gvm_cr3);
    let svm_cr3 = svm.addr(&case.svm_cr3);
    let svm_mode = mode_of(case.svm_mode, 31);

    let window_mem = MemoryImage::new(WINDOW_SIZE as usize);
    let window = Relocated {
        inner: &window_mem,
        base: layout.window_gpa,
    };
    let gvm_seen = Recorder::new(&gvm.mem);
    let svm_seen = Recorder::new(&svm.mem);
    let view = build_view(
        &window, &layout, &gvm_seen, gvm_cr3, &svm_seen, &svm_mode, svm_cr3,
    );
    assert!(
        gvm_seen.writes.borrow().is_empty(),
        "build_view wrote GVM memory: {:x?}",
        gvm_seen.writes.borrow()
    );
    assert!(
        svm_seen.writes.borrow().is_empty(),
        "build_view wrote SVM memory: {:x?}",
        svm_seen.writes.borrow()
    );
    if let Ok(view) = &view {
        let svm_alias = Relocated {
            inner: &svm.mem,
            base: layout.svm_base,
        };
        let composed = Composed(vec![&gvm.mem, &window, &svm_alias]);
        check_view(
            view,
            &layout,
            &window_mem,
            &composed,
            (&svm.mem, &svm_mode, svm_cr3),
        );
    }
    check_walker(&gvm, gvm_cr3, &mode_of(case.walk_mode, 30), &case.probes);
    view.ok()
}

fn check_view(
    view: &View,
    layout: &ViewLayout,
    window: &MemoryImage,
    composed: &dyn GuestPhysMemory,
    (svm, svm_mode, svm_cr3): (&dyn GuestPhysMemory, &PagingMode, u64),
) {
    let w = layout.window_gpa;
    assert_eq!(view.cr3, w + offsets::PML4);
    for slot in 256..511u64 {
        let e = window
            .read_u64(slot * 8)
            .expect("the view's PML4 is in the window");
        if slot != WINDOW_SLOT as u64 && e & P != 0 {
            assert!(e & XD != 0, "PML4 slot {slot} is executable: {e:#x}");
        }
    }
    let mode = PagingMode::default();
    let walk = |range, limit, f: &mut dyn FnMut(&Mapping)| match for_each_mapping(
        composed,
        &mode,
        view.cr3,
        range,
        limit,
        |m| {
            f(m);
            ControlFlow::Continue(())
        },
    ) {
        Ok(_) => true,
        Err(WalkError::TooManyTables { .. }) => false,
        Err(e) => panic!("walking the view: {e}"),
    };

    // Slot 511: the trusted text, and execution confined to it (and `also_exec`).
    let text = layout.exec_text;
    let own_text_page = |m: &Mapping| {
        m.page_size == PageSize::Size4K
            && meets(m.gva, 0x1000, text)
            && m.gva.checked_sub(START_KERNEL_MAP) == Some(m.gpa)
            && !m.writable
            && !m.user
    };
    walk(SLOT_511_KVA..=u64::MAX, 1024, &mut |m| {
        let size = m.page_size.bytes();
        if meets(m.gva, size, text) {
            assert!(
                own_text_page(m),
                "a view mapping over the trusted text {text:x?} is not the text's own page: {m:x?}"
            );
        }
        if !m.nx {
            assert!(
                own_text_page(m) || layout.also_exec.is_some_and(|a| meets(m.gva, size, a)),
                "executable kernel mapping outside the trusted text {text:x?} and also_exec \
                 {:x?}: {m:x?}",
                layout.also_exec
            );
        }
    });
    let pages = (text.1 - text.0) >> 12;
    for page in (0..pages.min(16)).chain(pages.saturating_sub(16)..pages) {
        let va = text.0 + (page << 12) + 0x123;
        match translate(composed, &mode, view.cr3, va, Access::READ) {
            Ok(t) => {
                assert_eq!(t.gpa, va - START_KERNEL_MAP, "text page {va:#x}: {t:x?}");
                assert!(!t.writable, "text page {va:#x} is writable");
            }
            // The view keeps the GVM's PML4[511] flags: PS there breaks the whole slot.
            Err(WalkError::Reserved {
                level: Level::Pml4, ..
            }) => {}
            Err(e) => panic!("text page {va:#x} does not translate in the view: {e}"),
        }
    }

    // The window's slot: the scratch stack, the trap page and the kernel stub, nothing else.
    let mut seen = Vec::new();
    assert!(
        walk(WINDOW_KVA..=WINDOW_KVA + (1 << 39) - 1, 64, &mut |m| seen
            .push(*m)),
        "the window's slot has too many tables"
    );
    let page = |gva, gpa, writable, nx| Mapping {
        gva,
        gpa,
        page_size: PageSize::Size4K,
        writable,
        user: false,
        nx,
    };
    let mut want: Vec<Mapping> = (0..offsets::STACK_SIZE / 0x1000)
        .map(|i| {
            let off = offsets::SCRATCH_STACK + i * 0x1000;
            page(WINDOW_KVA + off, w + off, true, true)
        })
        .collect();
    want.push(page(TRAP_KVA, layout.trap_gpa(), true, true));
    want.push(page(KSTUB_KVA, w + offsets::KSTUB, false, false));
    assert_eq!(seen, want, "the window's slot maps something else");

    // The user half: the stub, the sentinel and the program's pages, rebased.
    let mut program = 0usize;
    let complete = walk(0..=USER_TOP, 1024, &mut |m| {
        assert!(
            m.user,
            "a user-half mapping of the view is supervisor: {m:x?}"
        );
        let page = |gpa, writable, nx| Mapping {
            user: true,
            ..page(m.gva, gpa, writable, nx)
        };
        if m.gva == view.stub_va {
            assert_eq!(*m, page(w + offsets::STUB, false, false), "the stub");
        } else if m.gva == view.sentinel_va {
            assert_eq!(*m, page(layout.sentinel_gpa, true, true), "the sentinel");
        } else {
            program += 1;
            if program > 64 {
                return;
            }
            let t = translate(svm, svm_mode, svm_cr3, m.gva, Access::USER_READ)
                .unwrap_or_else(|e| panic!("view maps {m:x?}, the SVM program does not: {e}"));
            let rebased = layout.svm_base.checked_add(t.gpa);
            // A page past 52 bits once wrapped onto low memory; build_view now refuses
            // the view (ViewError::SvmPageOutOfRange, found by this target: reproducers in
            // seeds/view_builder/svm-user-page-wraps-*).
            assert_eq!(
                (rebased, t.page_size, t.writable, t.nx),
                (Some(m.gpa), m.page_size, m.writable, m.nx),
                "the view's user mapping {m:x?} is not the program's {t:x?} rebased to {:#x}",
                layout.svm_base
            );
        }
    });
    assert!(complete, "the view's user half has too many tables");
    assert_eq!(program, view.user_mappings, "user mappings in the view");
}

/// The walker over the GVM image: `for_each_mapping` and `translate` agree, and strings
/// read as the bytes do.
fn check_walker(gvm: &Built, cr3: u64, mode: &PagingMode, probes: &[Probe]) {
    let mem: &dyn GuestPhysMemory = &gvm.mem;
    let limit = 256;
    let mut count = 0usize;
    let mut next = 0u128;
    let mut sample = Vec::new();
    let all = for_each_mapping(mem, mode, cr3, 0..=u64::MAX, limit, |m| {
        let size = m.page_size.bytes();
        assert!(is_canonical(m.gva), "{m:x?}");
        assert!(
            m.gva % size == 0 && m.gpa % size == 0,
            "unaligned mapping {m:x?}"
        );
        assert!(
            u128::from(m.gva) >= next,
            "mapping {m:x?} out of order or overlapping"
        );
        next = u128::from(m.gva) + u128::from(size);
        count += 1;
        if sample.len() < 32 {
            sample.push(*m);
        }
        ControlFlow::Continue(())
    });
    match &all {
        Ok(stats) => {
            assert_eq!(stats.mappings, count);
            assert!(stats.tables_visited <= limit);
        }
        Err(WalkError::TooManyTables { limit: l }) => assert_eq!(*l, limit),
        Err(WalkError::TableRead {
            level: Level::Pml4, ..
        })
        | Err(WalkError::BadMaxPhysBits { .. }) => {}
        Err(e) => panic!("for_each_mapping failed unexpectedly: {e}"),
    }
    for m in &sample {
        for off in [0, m.page_size.bytes() - 1] {
            let t = translate(mem, mode, cr3, m.gva + off, Access::READ)
                .unwrap_or_else(|e| panic!("{m:x?} was enumerated but does not translate: {e}"));
            assert_eq!(
                (t.gpa, t.page_size, t.writable, t.user, t.nx),
                (m.gpa + off, m.page_size, m.writable, m.user, m.nx),
                "translate disagrees with for_each_mapping"
            );
        }
    }
    for p in probes {
        let gva = gvm.addr(&p.gva);
        let t = translate(mem, mode, cr3, gva, Access::READ);
        let mut one = Vec::new();
        let walked = for_each_mapping(mem, mode, cr3, gva..=gva, 8, |m| {
            one.push(*m);
            ControlFlow::Continue(())
        });
        match (&t, &walked) {
            (Ok(t), Ok(_)) => {
                assert_eq!(
                    one.len(),
                    1,
                    "{gva:#x} translates ({t:x?}), walk saw {one:x?}"
                );
                let m = one[0];
                assert!(m.gva <= gva && gva - m.gva < m.page_size.bytes());
                assert_eq!(
                    (m.gpa + (gva - m.gva), m.page_size, m.writable, m.user, m.nx),
                    (t.gpa, t.page_size, t.writable, t.user, t.nx),
                    "translate and a one-address walk disagree at {gva:#x}"
                );
            }
            (
                Err(WalkError::NonCanonical { .. })
                | Err(WalkError::NotPresent { .. })
                | Err(WalkError::Reserved { .. }),
                Ok(_),
            ) => assert!(one.is_empty(), "{gva:#x}: {t:?}, walk saw {one:x?}"),
            (Err(WalkError::TableRead { level, .. }), w) if *level != Level::Pml4 => {
                assert!(w.is_ok() && one.is_empty(), "{gva:#x}: {t:?}, walk {w:?}")
            }
            (
                Err(WalkError::TableRead { .. }),
                Err(WalkError::TableRead {
                    level: Level::Pml4, ..
                }),
            )
            | (Err(WalkError::BadMaxPhysBits { .. }), Err(WalkError::BadMaxPhysBits { .. })) => {}
            (t, w) => {
                panic!("translate ({t:?}) and a one-address walk ({w:?}) disagree at {gva:#x}")
            }
        }

        let max_len = usize::from(p.max_len) % 8193;
        let s = read_cstr(mem, mode, cr3, gva, max_len, Privilege::Supervisor);
        // `read_virt` of the bytes `read_cstr` read. A range whose end is exactly 2^64
        // (it holds the address space's last byte) is refused by the crate's ranged
        // accesses (AddressOverflow, as `GuestPhysMemory::contains`), though `read_cstr`
        // reads it page by page.
        let reread = |len: usize| {
            let mut raw = vec![0xffu8; len];
            match read_virt(mem, mode, cr3, gva, &mut raw, Privilege::Supervisor) {
                Ok(()) => Some(raw),
                Err(WalkError::AddressOverflow { .. }) if gva.checked_add(len as u64).is_none() => {
                    None
                }
                Err(e) => panic!("read_cstr read these {len} bytes, read_virt fails: {e}"),
            }
        };
        match s {
            Ok(s) => {
                assert!(s.len() < max_len && !s.contains(&0), "read_cstr gave {s:?}");
                if let Some(raw) = reread(s.len() + 1) {
                    assert_eq!(raw[..s.len()], s[..], "read_cstr and read_virt disagree");
                    assert_eq!(raw[s.len()], 0, "read_cstr stopped before no NUL");
                }
            }
            Err(WalkError::StringTooLong { max_len: m, .. }) => {
                assert_eq!(m, max_len);
                if let Some(raw) = reread(max_len) {
                    assert!(!raw.contains(&0), "read_cstr missed a NUL");
                }
            }
            Err(e) => {
                let mut raw = vec![0u8; max_len];
                assert!(
                    read_virt(mem, mode, cr3, gva, &mut raw, Privilege::Supervisor).is_err(),
                    "read_cstr failed ({e}) where read_virt of its limit does not"
                );
            }
        }
    }
}

/// Small valid cases: the view unit tests' guest, a GVM that points the text at a copy
/// (2 MiB entry and 1 GiB page), one with modules, a direct map and `also_exec`, and an
/// aliasing program.
pub fn seeds() -> Vec<(&'static str, Case)> {
    let base = Case {
        gvm: ImageSpec {
            pages: 16,
            ..ImageSpec::default()
        },
        gvm_cr3: Addr::page(1),
        svm: ImageSpec {
            pages: 16,
            ..ImageSpec::default()
        },
        svm_cr3: Addr::page(1),
        text_page: 0,
        text_pages: 2,
        probes: vec![
            Probe {
                gva: Addr::kva(0x1ff0),
                max_len: 64,
            },
            Probe {
                gva: Addr::raw(0x40_0000),
                max_len: 16,
            },
        ],
        ..Case::default()
    };
    let with_gvm_ops = |ops: Vec<Op>| {
        let mut c = base.clone();
        c.gvm.ops = ops;
        c
    };
    let mut hostile_1g = with_gvm_ops(vec![Op::entry(
        Addr::page(3),
        510,
        Addr::raw(0x4000_0000),
        0x83,
    )]);
    hostile_1g.gvm_end_gib = 1;
    let mut modules = with_gvm_ops(vec![
        // Modules: PDPT[511] → page 7 → PT page 9: two 4 KiB pages.
        Op::entry(Addr::page(3), 511, Addr::page(7), 3),
        Op::entry(Addr::page(7), 0, Addr::page(9), 3),
        Op::entry(Addr::page(9), 0, Addr::page(1), 3),
        Op::entry(Addr::page(9), 1, Addr::page(2), 3),
        // Direct map: PML4[273] → page 8: 1 GiB at 0.
        Op::entry(Addr::page(1), 273, Addr::page(8), 3),
        Op::entry(Addr::page(8), 0, Addr::raw(0), 0x83),
        // Image PD[1] → 2 MiB of data.
        Op::entry(Addr::page(4), 1, Addr::frame_2m(1), 0x83),
    ]);
    modules.also_kind = 1;
    modules.also_start = (511 << 30) + 0x1000;
    modules.also_len = 0x1000;
    let mut aliasing = base.clone();
    // Two PD entries share one full PT: 1024 user pages.
    aliasing.svm.ops = vec![
        Op::entry(Addr::page(5), 3, Addr::page(6), 7),
        Op::table(Addr::page(6), 1, Addr::frame_2m(1), 7),
    ];
    aliasing.svm_mode = 1;
    vec![
        ("guest", base.clone()),
        (
            "text-at-a-copy",
            with_gvm_ops(vec![Op::entry(Addr::page(4), 0, Addr::frame_2m(1), 0x83)]),
        ),
        ("text-in-a-1g-page", hostile_1g),
        ("modules-and-also-exec", modules),
        ("aliasing-program", aliasing),
    ]
}
