//! Target `view_builder`: `redirect::bounce::BouncePlan::new` on a fuzz-chosen list of
//! buffer ranges, then `redirect::view::build_view` (with its `confine_execution`) on a
//! hostile GVM image and CR3 and that plan, then the page walker (`translate`,
//! `for_each_mapping`, `read_cstr`, `read_virt`) over the same GVM image.
//!
//! Promises checked besides "no panic, no hang":
//! - the plan: one bounce page per distinct page the non-empty ranges touch, writable iff
//!   a range that may be written touches it, at distinct offsets `0, 4096, ..` (as many as
//!   pages); refused exactly when a non-empty range leaves the user half
//!   (`NotUser`, the first such) or the pages pass `max_pages` (`TooLarge`), whichever
//!   comes first in the list;
//! - `build_view` never writes GVM memory, and fails only for a reason the input has: the
//!   GVM's tables, its use of the window's slot, a bounce page past the bounce area
//!   (`BounceOutOfRange` names it), the full table pool (`PoolExhausted` with the pool's
//!   size) or buffers in every user slot 1..256 (`NoStubSlot`); never the window;
//! - in a built view, every kernel-half PML4 slot but 511 and the window's is no-execute;
//!   every executable mapping of slot 511 is a page of the trusted text mapped read-only
//!   to its own physical page (`va - __START_KERNEL_map`), or meets `also_exec`; every
//!   mapping over the text is such a page, and every text page translates to it;
//! - the window's slot maps exactly the scratch stack, the trap page and the read-only
//!   kernel stub (the VMM's tables and stubs have no alias: promise 4);
//! - the user half maps exactly the stub (read-only, executable, in the first user PML4
//!   slot 1..256 without buffer pages), the sentinel (writable, no-execute) and each page
//!   of the plan at its own address to `bounce_gpa` + its offset, inside the bounce area,
//!   4 KiB, user, no-execute, writable iff the plan says so; as many as
//!   `View::user_mappings`;
//! - every present entry of every table the view wrote into the window (its PML4 and
//!   the `View::tables` pool pages) has accessed set, and dirty where it is writable: the
//!   window is read-only to the redirect vCPU, whose page walker must never need to
//!   write there;
//! - the walker: `for_each_mapping` reports aligned, canonical, increasing, disjoint
//!   mappings within its budget that `translate` agrees with; `translate` of one address
//!   agrees with a one-address `for_each_mapping`; `read_cstr` agrees with `read_virt`.
//!
//! The views map no SVM memory any more (the bounce pages replaced the SVM alias), so the
//! bug this target once found there — an SVM page rebased past 52 bits wrapping onto low
//! memory — is gone with it, and so are its reproducers (`svm-user-page-wraps-*`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use redirect::bounce::{BounceError, BouncePlan, Range, BOUNCE_SIZE, USER_END};
use redirect::memory::Relocated;
use redirect::view::{
    offsets, ModuleCopy, View, ViewError, ViewLayout, ViewTables, KSTUB_KVA, MODULE_AREA,
    TRAP_KVA, WINDOW_KVA, WINDOW_SIZE, WINDOW_SLOT,
};
use redirect::{
    for_each_mapping, is_canonical, read_cstr, read_virt, translate, Access, GuestPhysMemory,
    Level, Mapping, MemoryImage, PageSize, PagingMode, Privilege, WalkError,
};

use crate::codec::{Codec, Io};
use crate::image::{meets, Addr, Built, Composed, ImageSpec, Op, Places, Recorder};

const XD: u64 = 1 << 63;
const P: u64 = 1;
const RW: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const ADDR: u64 = ((1 << 52) - 1) & !0xfff;
const PAGE: u64 = 0x1000;
const USER_TOP: u64 = USER_END - 1;
const SLOT_511_KVA: u64 = 0xffff_ff80_0000_0000;
/// Pages in the bounce area.
const BOUNCE_PAGES: u64 = BOUNCE_SIZE / PAGE;
/// Pages of the window's table pool.
const POOL_PAGES: u64 = (WINDOW_SIZE - offsets::TABLES) / PAGE;
/// Most page visits the ranges of one case may cost `BouncePlan::new` (and the oracle):
/// copies stop there, so a case stays fast however many long ranges it repeats.
const MAX_RANGE_PAGES: u64 = 1 << 16;
/// Bytes of the bounce area the walks can read (zeroes): only tables are read, and the
/// view's tables are not there; a GVM table may point there.
const BOUNCE_IMAGE: u64 = 16 * PAGE;

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

/// A buffer of the call: a range of the program's memory, maybe repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buffer {
    /// Where it starts (`at` reduced): 0 raw; 1 below 4 GiB; 2 in user PML4 slot
    /// `at % 256`, `(at >> 8) % 1 GiB` into it; 3 `at % 1 MiB` below the end of the user
    /// half (0: at the end); 4 the previous buffer's start (0x400000 for the first) plus
    /// `at` as a signed offset, `% 64 KiB`.
    pub kind: u8,
    /// See `kind`.
    pub at: u64,
    /// Its length: `len % (64 KiB + 1)`, or `len % (BOUNCE_SIZE + 8 KiB)` when long.
    pub len: u32,
    /// Bit 0: the call may write it; bit 1: long; the rest: the stride of its copies,
    /// `1 << (12 + (flags >> 2) % 36)` (4 KiB to 128 TiB).
    pub flags: u8,
    /// Copies after the first, each a stride further (while the sum fits in 64 bits and
    /// the case's page budget lasts).
    pub repeat: u8,
}

impl Codec for Buffer {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.kind);
        io.u64(&mut self.at);
        io.u32(&mut self.len);
        io.u8(&mut self.flags);
        io.u8(&mut self.repeat);
    }
}

impl Buffer {
    fn start(&self, prev: u64) -> u64 {
        let v = self.at;
        match self.kind % 5 {
            0 => v,
            1 => v % (1 << 32),
            2 => ((v % 256) << 39) + (v >> 8) % (1 << 30),
            3 => USER_END - v % (1 << 20),
            _ => prev.wrapping_add_signed(v as i64 % 0x1_0000),
        }
    }

    fn len(&self) -> u64 {
        if self.flags & 2 != 0 {
            u64::from(self.len) % (BOUNCE_SIZE + 2 * PAGE)
        } else {
            u64::from(self.len) % 0x1_0001
        }
    }
}

/// A `view_builder` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    /// GVM memory.
    pub gvm: ImageSpec,
    /// The GVM vCPU's CR3.
    pub gvm_cr3: Addr,
    /// The call's buffers, in order.
    pub buffers: Vec<Buffer>,
    /// The plan's most pages: `m % 4` 0 or 1: 64; 2: `(m >> 2) % 1024`; 3: the bounce
    /// area's pages, `- 2 + (m >> 2) % 4` (one past it at most).
    pub max_pages: u16,
    /// First page of the trusted text (guest-physical page number, below 2 GiB).
    pub text_page: u32,
    /// Pages of text: `1 + text_pages % 2048`.
    pub text_pages: u16,
    /// GiB of GVM RAM past the image's end (`% 8`): moves the window and the bounce area.
    /// Bit 3: one verified module text (`ViewLayout::modules`) in the module area, at
    /// page `(also_start >> 12) % 0x3f000` of it, `1 + (also_len >> 16) % 16` pages.
    pub gvm_end_gib: u8,
    /// 0: no `also_exec`; 1: a range in PML4 slot 511; 2: a raw range.
    pub also_kind: u8,
    /// Where the `also_exec` range starts (raw, or an offset into slot 511).
    pub also_start: u64,
    /// Its length in bytes.
    pub also_len: u32,
    /// Paging mode of the walker checks on the GVM image. Bit 0: EFER.NXE off; the rest:
    /// MAXPHYADDR (0: 52, else `30 + n % 23`: 30, 31 and 53 are bad).
    pub walk_mode: u8,
    /// Addresses the walker checks look at.
    pub probes: Vec<Probe>,
}

impl Codec for Case {
    fn io(&mut self, io: &mut Io<'_>) {
        self.gvm.io(io);
        self.gvm_cr3.io(io);
        io.list(&mut self.buffers, 16);
        io.u16(&mut self.max_pages);
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

impl Case {
    /// The call's ranges: each buffer and its copies, until the page budget is spent.
    pub fn ranges(&self) -> Vec<Range> {
        let mut out = Vec::new();
        let mut prev = 0x40_0000;
        let mut budget = MAX_RANGE_PAGES;
        for b in &self.buffers {
            let addr = b.start(prev);
            prev = addr;
            let len = b.len();
            let cost = len / PAGE + 2;
            let stride = 1u64 << (12 + (b.flags >> 2) % 36);
            for i in 0..=u64::from(b.repeat) {
                let Some(addr) = addr.checked_add(i * stride) else {
                    break;
                };
                if budget < cost {
                    return out;
                }
                budget -= cost;
                out.push(Range {
                    addr,
                    len,
                    write: b.flags & 1 != 0,
                });
            }
        }
        out
    }

    /// The plan's `max_pages`.
    pub fn max_pages(&self) -> usize {
        let m = u64::from(self.max_pages);
        let pages = match m % 4 {
            0 | 1 => 64,
            2 => (m >> 2) % 1024,
            _ => BOUNCE_PAGES - 2 + (m >> 2) % 4,
        };
        pages as usize
    }
}

fn mode_of(bits: u8, base: u8) -> PagingMode {
    let phys = match bits >> 1 {
        0 => 52,
        n => base + n % 23,
    };
    PagingMode::new(bits & 1 == 0, phys)
}

/// What a case came to.
#[derive(Debug)]
pub enum Outcome {
    /// `ViewLayout::for_guest` found no room (nothing else was run).
    NoLayout,
    /// `BouncePlan::new` refused the buffers (no view was built).
    NoPlan(BounceError),
    /// What `build_view` returned.
    Built(Result<View, ViewError>),
}

impl Outcome {
    /// The view built, if any.
    pub fn view(&self) -> Option<&View> {
        match self {
            Outcome::Built(Ok(view)) => Some(view),
            _ => None,
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) -> Outcome {
    check(&Case::decode(data))
}

/// Runs one case and checks the promises.
pub fn check(case: &Case) -> Outcome {
    let text_start = (u64::from(case.text_page) % 0x8_0000) << 12;
    let text = (
        text_start,
        text_start + ((1 + u64::from(case.text_pages) % 2048) << 12),
    );
    let gvm_end = case.gvm.end() + (u64::from(case.gvm_end_gib % 8) << 30);
    let Some(mut layout) = ViewLayout::for_guest(gvm_end, text) else {
        return Outcome::NoLayout;
    };
    // A KASLR slide, from the bits of `gvm_end_gib` the RAM's end and the modules leave
    // (none when the slid text would leave the kernel map).
    let slide = u64::from(case.gvm_end_gib >> 4) << 21;
    let _ = layout.slide_text(layout.exec_text, slide);
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
    if case.gvm_end_gib & 8 != 0 {
        let start = MODULE_AREA.0 + (((case.also_start >> 12) % 0x3f000) << 12);
        let pages = 1 + u64::from(case.also_len >> 16) % 16;
        layout.modules = vec![ModuleCopy {
            start,
            end: start + (pages << 12),
            copy: layout.module_copy_gpa,
        }];
    }
    let places = Places {
        window_gpa: layout.window_gpa,
        bounce_gpa: layout.bounce_gpa,
    };
    let gvm = case.gvm.build(places);
    let gvm_cr3 = gvm.addr(&case.gvm_cr3);

    let ranges = case.ranges();
    let max_pages = case.max_pages();
    let plan = BouncePlan::new(&ranges, max_pages);
    check_plan(&ranges, max_pages, &plan);
    let outcome = match plan {
        Err(e) => Outcome::NoPlan(e),
        Ok(plan) => Outcome::Built(check_build(&layout, &gvm, gvm_cr3, &plan)),
    };
    check_walker(&gvm, gvm_cr3, &mode_of(case.walk_mode, 30), &case.probes);
    outcome
}

/// What `BouncePlan::new` should make of `ranges`: the pages (VA → writable), or the
/// error. Costs a page visit per page of each range, as the plan does (bounded by
/// `MAX_RANGE_PAGES` in [`Case::ranges`]).
fn expected_plan(ranges: &[Range], max_pages: usize) -> Result<BTreeMap<u64, bool>, BounceError> {
    let mut pages = BTreeMap::new();
    for r in ranges.iter().filter(|r| r.len > 0) {
        let Some(end) = r.addr.checked_add(r.len).filter(|&e| e <= USER_END) else {
            return Err(BounceError::NotUser {
                addr: r.addr,
                len: r.len,
            });
        };
        let first = r.addr & !(PAGE - 1);
        if (end - first).div_ceil(PAGE) > max_pages as u64 {
            return Err(BounceError::TooLarge(max_pages));
        }
        for va in (first..end).step_by(PAGE as usize) {
            *pages.entry(va).or_insert(false) |= r.write;
        }
        if pages.len() > max_pages {
            return Err(BounceError::TooLarge(max_pages));
        }
    }
    Ok(pages)
}

fn check_plan(ranges: &[Range], max_pages: usize, plan: &Result<BouncePlan, BounceError>) {
    match (expected_plan(ranges, max_pages), plan) {
        (Ok(want), Ok(plan)) => {
            let got: BTreeMap<u64, bool> = plan.pages().map(|p| (p.va, p.writable)).collect();
            assert_eq!(got.len(), plan.len(), "the plan lists a page twice");
            if got != want {
                let diff = want
                    .iter()
                    .find(|(va, w)| got.get(va) != Some(w))
                    .or_else(|| got.iter().find(|(va, w)| want.get(va) != Some(w)));
                panic!(
                    "the plan's pages are not the ranges' ({} vs {}; first difference at \
                     {diff:x?}, planned {:?}, wanted {:?})",
                    got.len(),
                    want.len(),
                    diff.and_then(|(va, _)| got.get(va)),
                    diff.and_then(|(va, _)| want.get(va)),
                );
            }
            let mut offsets: Vec<u64> = plan.pages().map(|p| p.offset).collect();
            offsets.sort_unstable();
            assert!(
                offsets.iter().zip(0u64..).all(|(&o, i)| o == i * PAGE),
                "the plan's bounce offsets are not 0, 4096, .. one per page"
            );
            assert!(plan.len() <= max_pages && plan.is_empty() == want.is_empty());
        }
        (
            Err(BounceError::NotUser { addr, len }),
            Err(BounceError::NotUser { addr: a, len: l }),
        ) if (addr, len) == (*a, *l) => {}
        (Err(BounceError::TooLarge(m)), Err(BounceError::TooLarge(n))) if m == *n => {}
        (want, got) => panic!("BouncePlan::new gave {got:?}, not {want:?}"),
    }
}

/// `build_view` on `plan`: no GVM writes, errors only for a reason, and a view that keeps
/// the promises.
fn check_build(
    layout: &ViewLayout,
    gvm: &Built,
    gvm_cr3: u64,
    plan: &BouncePlan,
) -> Result<View, ViewError> {
    let window_mem = MemoryImage::new(WINDOW_SIZE as usize);
    let window = Relocated {
        inner: &window_mem,
        base: layout.window_gpa,
    };
    let gvm_seen = Recorder::new(&gvm.mem);
    let mut tables = ViewTables::default();
    let view = tables
        .build(&window, layout, &gvm_seen, gvm_cr3, plan)
        .map(|(view, _)| view);
    assert!(
        gvm_seen.writes.borrow().is_empty(),
        "build_view wrote GVM memory: {:x?}",
        gvm_seen.writes.borrow()
    );
    // Which user PML4 slots hold buffer pages.
    let mut slots = [false; 256];
    for p in plan.pages() {
        if let Some(s) = slots.get_mut((p.va >> 39) as usize) {
            *s = true;
        }
    }
    match &view {
        Ok(view) => {
            let bounce_mem = MemoryImage::new(BOUNCE_IMAGE as usize);
            let bounce = Relocated {
                inner: &bounce_mem,
                base: layout.bounce_gpa,
            };
            let composed = Composed(vec![&gvm.mem, &window, &bounce]);
            check_view(view, layout, &window_mem, &composed, plan, &slots);
            // A later view of the same epoch (the next call of a hold): the same promises,
            // and not a byte of the first view's tables rewritten.
            let before = table_pages(&window_mem, view);
            let (later, new_epoch) = tables
                .build(&window, layout, &gvm_seen, gvm_cr3, plan)
                .unwrap_or_else(|e| panic!("a later view failed where the first did not: {e}"));
            if !new_epoch {
                assert_ne!(later.cr3, view.cr3);
                assert!(
                    table_pages(&window_mem, view) == before,
                    "a later view of the epoch rewrote the first one's tables"
                );
            }
            check_view(&later, layout, &window_mem, &composed, plan, &slots);
            assert!(
                gvm_seen.writes.borrow().is_empty(),
                "a later view wrote GVM memory"
            );
        }
        Err(ViewError::Window(e)) => panic!("build_view failed on its own window: {e}"),
        Err(ViewError::GvmTables { .. }) => {}
        // The harness places its module in the module area; the text may reach there.
        Err(ViewError::ModuleOutsideArea) => assert!(
            layout
                .modules
                .iter()
                .any(|m| meets(m.start, m.end - m.start, layout.exec_text)),
            "a module copy in the module area, off the text, was refused: {:x?} (text {:x?})",
            layout.modules,
            layout.exec_text
        ),
        Err(ViewError::SlotInUse) => {
            let e = gvm.mem.read_u64((gvm_cr3 & ADDR) + WINDOW_SLOT as u64 * 8);
            assert!(
                e.as_ref().is_ok_and(|&e| e != 0),
                "SlotInUse, but the GVM's PML4 entry is {e:x?}"
            );
        }
        Err(ViewError::PoolExhausted(n)) => assert_eq!(*n, POOL_PAGES, "PoolExhausted({n})"),
        Err(ViewError::BounceOutOfRange { va, offset }) => assert!(
            plan.pages().any(|p| (p.va, p.offset) == (*va, *offset)
                && (p.offset >= BOUNCE_SIZE || p.va >= USER_END)),
            "BounceOutOfRange names {va:#x} at {offset:#x}, which fits (or is not planned)"
        ),
        Err(ViewError::NoStubSlot) => assert!(
            slots[1..].iter().all(|&s| s),
            "NoStubSlot, but a user slot 1..256 holds no buffer page"
        ),
    }
    view
}

/// The window's PML4 page and the pool pages a view may use, as they are now.
fn table_pages(window: &MemoryImage, view: &View) -> Vec<u8> {
    let mut pages = vec![0u8; ((1 + view.tables) * PAGE) as usize];
    let (pml4, pool) = pages.split_at_mut(PAGE as usize);
    window
        .read_phys(offsets::PML4, pml4)
        .expect("the PML4 is in the window");
    window
        .read_phys(offsets::TABLES, pool)
        .expect("the pool is in the window");
    pages
}

fn check_view(
    view: &View,
    layout: &ViewLayout,
    window: &MemoryImage,
    composed: &dyn GuestPhysMemory,
    plan: &BouncePlan,
    slots: &[bool; 256],
) {
    let w = layout.window_gpa;
    // An epoch's first view has the window's PML4; later ones one from the pool.
    let pml4 = view.cr3 - w;
    assert!(
        pml4 == offsets::PML4
            || (pml4 % PAGE == 0
                && pml4 >= offsets::TABLES
                && pml4 < offsets::TABLES + view.tables * PAGE),
        "the view's PML4 is at window offset {pml4:#x}"
    );
    for slot in 256..511u64 {
        let e = window
            .read_u64(pml4 + slot * 8)
            .expect("the view's PML4 is in the window");
        if slot != WINDOW_SLOT as u64 && e & P != 0 {
            assert!(e & XD != 0, "PML4 slot {slot} is executable: {e:#x}");
        }
    }

    // Every table the view wrote: accessed on every present entry, dirty where writable.
    assert!(view.tables <= POOL_PAGES, "{} pool pages", view.tables);
    let pool = (0..view.tables).map(|i| offsets::TABLES + i * PAGE);
    let mut raw = [0u8; PAGE as usize];
    for table in std::iter::once(pml4).chain(pool) {
        window
            .read_phys(table, &mut raw)
            .expect("the view's tables are in the window");
        for (i, b) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            assert!(
                e & P == 0 || (e & A != 0 && (e & RW == 0 || e & D != 0)),
                "entry {i} of the view's table at window offset {table:#x} lacks accessed or \
                 dirty: {e:#x}"
            );
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
            && m.gva.checked_sub(text.0).map(|off| layout.text_gpa + off) == Some(m.gpa)
            && !m.writable
            && !m.user
    };
    // A verified module's page: to its copy, read-only, at the same offset.
    let module_copy_page = |m: &Mapping| {
        layout.modules.iter().any(|c| {
            m.page_size == PageSize::Size4K
                && meets(m.gva, 0x1000, (c.start, c.end))
                && m.gva.checked_sub(c.start).map(|off| c.copy + off) == Some(m.gpa)
                && !m.writable
                && !m.user
        })
    };
    walk(SLOT_511_KVA..=u64::MAX, 1024, &mut |m| {
        let size = m.page_size.bytes();
        if layout
            .modules
            .iter()
            .any(|c| meets(m.gva, size, (c.start, c.end)))
        {
            assert!(
                module_copy_page(m),
                "a view mapping over a verified module's text is not its copy: {m:x?}"
            );
        }
        if meets(m.gva, size, text) {
            assert!(
                own_text_page(m),
                "a view mapping over the trusted text {text:x?} is not the text's own page: {m:x?}"
            );
        }
        if !m.nx {
            assert!(
                own_text_page(m)
                    || module_copy_page(m)
                    || layout.also_exec.is_some_and(|a| meets(m.gva, size, a)),
                "executable kernel mapping outside the trusted text {text:x?}, the verified \
                 modules and also_exec \
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
                assert_eq!(
                    t.gpa,
                    layout.text_gpa + (va - text.0),
                    "text page {va:#x}: {t:x?}"
                );
                assert!(!t.writable, "text page {va:#x} is writable");
            }
            // The view keeps the GVM's PML4[511] flags: PS there breaks the whole slot.
            Err(WalkError::Reserved {
                level: Level::Pml4, ..
            }) => {}
            Err(e) => panic!("text page {va:#x} does not translate in the view: {e}"),
        }
    }

    // The window's slot: the scratch stack, the CPU's private stacks and tables, the trap
    // page and the kernel stub, nothing else.
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
    // The CPU's private stacks: eight of 8 KiB, each above a 4 KiB guard page that is not
    // mapped; the CPU's tables, read-only.
    for stack in 0..8 {
        for i in 1..3 {
            let off = offsets::CPU_STACKS + stack * 0x3000 + i * 0x1000;
            want.push(page(WINDOW_KVA + off, w + off, true, true));
        }
    }
    for off in [offsets::GDT_TSS, offsets::IDT] {
        want.push(page(WINDOW_KVA + off, w + off, false, true));
    }
    want.push(page(TRAP_KVA, layout.trap_gpa(), true, true));
    want.push(page(KSTUB_KVA, w + offsets::KSTUB, false, false));
    want.sort_by_key(|m| m.gva);
    assert_eq!(seen, want, "the window's slot maps something else");

    // The user half: the stub, the sentinel and the plan's pages, nothing else.
    let stub_slot = (1..256).find(|&s| !slots[s]).map(|s| (s as u64) << 39);
    assert_eq!(
        Some(view.stub_va),
        stub_slot,
        "the stub is not in the first user slot without buffers"
    );
    let user = |gva, gpa, writable, nx| Mapping {
        user: true,
        ..page(gva, gpa, writable, nx)
    };
    let mut want: Vec<Mapping> = plan
        .pages()
        .map(|p| {
            assert!(
                p.offset < BOUNCE_SIZE && p.va < USER_END,
                "the view maps buffer page {p:x?} outside the bounce area or the user half"
            );
            user(p.va, layout.bounce_gpa + p.offset, p.writable, true)
        })
        .collect();
    assert_eq!(want.len(), view.user_mappings, "user mappings in the view");
    want.push(user(view.stub_va, w + offsets::STUB, false, false));
    want.push(user(view.sentinel_va, layout.sentinel_gpa, true, true));
    want.sort_by_key(|m| m.gva);
    let mut seen = Vec::new();
    assert!(
        walk(0..=USER_TOP, 1024, &mut |m| seen.push(*m)),
        "the view's user half has too many tables"
    );
    if seen != want {
        let i = seen.iter().zip(&want).take_while(|(s, w)| s == w).count();
        panic!(
            "the view's user half maps {} pages, not the stub, the sentinel and the {} \
             buffer pages; first difference: {:x?}, wanted {:x?}",
            seen.len(),
            view.user_mappings,
            seen.get(i),
            want.get(i)
        );
    }
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

/// Small valid cases: the view unit tests' guest and call (a read buffer and a written
/// one), a GVM that points the text at a copy (2 MiB entry and 1 GiB page), one with
/// modules, a direct map and `also_exec` (and the same with a verified module instead of
/// `also_exec`), one whose kernel tables point into the bounce
/// area and the window, a call without buffers, buffers that share and straddle pages,
/// end the user half and fill slots 1..5; and two that stop at a limit: buffers in every
/// user slot (the pool runs out before the stub has nowhere to go) and one page past the
/// bounce area.
pub fn seeds() -> Vec<(&'static str, Case)> {
    let raw = |addr: u64, len: u32, write: bool| Buffer {
        kind: 0,
        at: addr,
        len,
        flags: u8::from(write),
        repeat: 0,
    };
    let base = Case {
        gvm: ImageSpec {
            pages: 16,
            ..ImageSpec::default()
        },
        gvm_cr3: Addr::page(1),
        buffers: vec![raw(0x40_0010, 16, false), raw(0x7f00_0000_1ff8, 8, true)],
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
    let with_buffers = |buffers: Vec<Buffer>, max_pages: u16| Case {
        buffers,
        max_pages,
        ..base.clone()
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
    // The first module page verified instead (run from its copy); the second stays the
    // GVM's, no-execute.
    let mut verified_module = modules.clone();
    verified_module.also_kind = 0;
    verified_module.also_start = 0;
    verified_module.also_len = 0;
    verified_module.gvm_end_gib = 8;
    // The same module where the trusted text reaches into the module area (the fuzzer's
    // first find: the text's own tables replaced the module's, unchecked): refused.
    let mut module_over_text = verified_module.clone();
    module_over_text.text_page = 0x4_0000;
    // Kernel tables a hostile GVM aims at the redirect VM's own memory: PML4[300] at a
    // bounce page, PML4[301] at the window's first page (the view's PML4), the image's
    // PDPT[509] and a whole PD of 2 MiB entries at the bounce area.
    let into_bounce = with_gvm_ops(vec![
        Op::entry(Addr::page(1), 300, Addr::bounce(0), 3),
        Op::entry(Addr::page(1), 301, Addr::window(0), 3),
        Op::entry(Addr::page(3), 509, Addr::bounce(1), 3),
        Op::entry(Addr::page(3), 508, Addr::page(10), 3),
        Op::table(Addr::page(10), 2, Addr::bounce(0), 0x83),
    ]);
    let near = |delta: i64, len: u32, write: bool| Buffer {
        kind: 4,
        at: delta as u64,
        len,
        flags: u8::from(write),
        repeat: 0,
    };
    let shared = with_buffers(
        vec![
            // Straddling 0x400000 and 0x401000, read; then written in 0x401000 and 0x403000
            // (0x402000 read), and once more read in 0x401000.
            Buffer {
                kind: 1,
                at: 0x40_0ff0,
                len: 0x20,
                ..Buffer::default()
            },
            near(0x110, 8, true),
            near(0xef8, 0x1010, false),
            near(0x1008, 1, true),
            near(-0x1500, 0x10, false),
            // An empty range is no page; the last 16 bytes of the user half, written.
            near(0x8000, 0, true),
            Buffer {
                kind: 3,
                at: 0x10,
                len: 0x10,
                flags: 1,
                repeat: 0,
            },
            // Slots 1 to 5, 16 bytes across a page boundary in each: the stub goes to 6.
            Buffer {
                kind: 2,
                at: 1 | (0x1ff8 << 8),
                len: 16,
                flags: (39 - 12) << 2,
                repeat: 4,
            },
        ],
        0,
    );
    let every_slot = with_buffers(
        vec![Buffer {
            kind: 2,
            at: 1,
            len: 1,
            flags: (39 - 12) << 2,
            repeat: 254,
        }],
        (300 << 2) | 2,
    );
    let past_the_bounce_area = with_buffers(
        vec![Buffer {
            kind: 1,
            at: 0x1000,
            len: (BOUNCE_SIZE + PAGE) as u32,
            flags: 2,
            repeat: 0,
        }],
        (3 << 2) | 3,
    );
    vec![
        ("guest", base.clone()),
        (
            "text-at-a-copy",
            with_gvm_ops(vec![Op::entry(Addr::page(4), 0, Addr::frame_2m(1), 0x83)]),
        ),
        ("text-in-a-1g-page", hostile_1g),
        ("modules-and-also-exec", modules),
        ("a-verified-module", verified_module),
        ("a-module-over-the-text", module_over_text),
        ("gvm-tables-into-the-bounce-area", into_bounce),
        ("no-buffers", with_buffers(Vec::new(), 0)),
        ("shared-straddling-and-top-buffers", shared),
        ("buffers-in-every-user-slot", every_slot),
        ("one-page-past-the-bounce-area", past_the_bounce_area),
    ]
}
