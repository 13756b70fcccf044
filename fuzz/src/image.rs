//! Hostile guest memory images built from fuzzer input, and memory wrappers the targets
//! check promises with.
//!
//! An [`ImageSpec`] is a small guest-physical memory (at most [`MAX_PAGES`] pages at 0,
//! plus an optional second region past a hole) with optional baseline page tables, edited
//! by a list of [`Op`]s: single table entries, whole tables of one (aliasing) entry,
//! words, byte strings and filled pages. Addresses in ops are [`Addr`]s, which name pages
//! of the image, 2 MiB frames, the redirect window, the bounce area, kernel virtual
//! addresses of the image or raw values, so the fuzzer reaches well-formed tables, cycles
//! and aliases quickly instead of guessing 52-bit addresses.

use std::cell::{Cell, RefCell};

use redirect::bounce::BOUNCE_SIZE;
use redirect::view::{BOUNCE_OFFSET, WINDOW_SIZE};
use redirect::{GuestPhysMemory, MemError, MemoryImage};

use crate::codec::{Codec, Io};

/// Most pages of an image's first region (512 KiB).
pub const MAX_PAGES: u64 = 128;
/// Where the baseline kernel tables map the image: `__START_KERNEL_map`.
pub const K: u64 = 0xffff_ffff_8000_0000;
/// Most pages of the optional second region.
const MAX_EXTRA_PAGES: u64 = 16;
/// Present, writable, user.
const PRW: u64 = 0x3;
const PRWU: u64 = 0x7;
const PS: u64 = 0x80;
const XD: u64 = 1 << 63;

/// Addresses outside the image that [`Addr`] can name (they depend on the target).
#[derive(Debug, Clone, Copy)]
pub struct Places {
    /// Guest-physical start of the redirect window.
    pub window_gpa: u64,
    /// Guest-physical start of the bounce area (the call's buffers).
    pub bounce_gpa: u64,
}

impl Default for Places {
    fn default() -> Self {
        Places {
            window_gpa: 1 << 30,
            bounce_gpa: (1 << 30) + BOUNCE_OFFSET,
        }
    }
}

/// An address, as a kind and a raw value the kind reduces into range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addr {
    /// What `v` counts (see [`Built::addr`]).
    pub kind: u8,
    /// The raw value.
    pub v: u64,
}

impl Codec for Addr {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.kind);
        io.u64(&mut self.v);
    }
}

impl Addr {
    /// A raw value.
    pub fn raw(v: u64) -> Addr {
        Addr { kind: 0, v }
    }
    /// Byte `off` of the image's first region (guest-physical).
    pub fn phys(off: u64) -> Addr {
        Addr { kind: 1, v: off }
    }
    /// Page `n` of the image's first region (guest-physical).
    pub fn page(n: u64) -> Addr {
        Addr { kind: 2, v: n }
    }
    /// The 2 MiB frame `n`.
    pub fn frame_2m(n: u64) -> Addr {
        Addr { kind: 3, v: n }
    }
    /// The window page at byte `off` of it.
    pub fn window(off: u64) -> Addr {
        Addr { kind: 4, v: off }
    }
    /// Page `n` of the bounce area.
    pub fn bounce(n: u64) -> Addr {
        Addr { kind: 5, v: n }
    }
    /// Byte `off` of the image's first region at its kernel virtual address `K + off`.
    pub fn kva(off: u64) -> Addr {
        Addr { kind: 6, v: off }
    }
}

/// One edit of an image. Which fields are stored depends on `kind` (see [`Op::io`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Op {
    /// 0: one table entry; 1: a whole table of one entry (stepped); 2: a word; 3: bytes;
    /// 4: a page filled with one byte.
    pub kind: u8,
    /// Where (a page for tables and fills, a byte address otherwise; guest-physical).
    pub at: Addr,
    /// Entry index (kind 0) or step (kind 1: 0, 4 KiB, 2 MiB, 1 GiB).
    pub index: u16,
    /// The entry's target, or the word's value.
    pub target: Addr,
    /// Entry flags: bits 0..11 as is; bit 13 sets bit 51, bit 14 bit 12, bit 15 XD.
    pub flags: u16,
    /// Bytes (kind 3) or the fill byte (kind 4, first byte).
    pub data: Vec<u8>,
}

impl Codec for Op {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.kind);
        self.at.io(io);
        match self.kind % 5 {
            0 | 1 => {
                io.u16(&mut self.index);
                self.target.io(io);
                io.u16(&mut self.flags);
            }
            2 => self.target.io(io),
            3 => io.blob(&mut self.data, 64),
            _ => io.blob(&mut self.data, 1),
        }
    }
}

impl Op {
    /// Entry `index` of the table at `table` points at `target` with `flags`.
    pub fn entry(table: Addr, index: u16, target: Addr, flags: u16) -> Op {
        Op {
            kind: 0,
            at: table,
            index,
            target,
            flags,
            data: Vec::new(),
        }
    }
    /// Every entry of the table at `table` is `target + i * step` with `flags`.
    pub fn table(table: Addr, step: u16, target: Addr, flags: u16) -> Op {
        Op {
            kind: 1,
            index: step,
            ..Op::entry(table, 0, target, flags)
        }
    }
    /// The word at `at` is `value`.
    pub fn word(at: Addr, value: Addr) -> Op {
        Op {
            kind: 2,
            at,
            target: value,
            ..Op::default()
        }
    }
    /// `data` at `at`.
    pub fn bytes(at: Addr, data: &[u8]) -> Op {
        Op {
            kind: 3,
            at,
            data: data.to_vec(),
            ..Op::default()
        }
    }
}

/// A guest memory image to build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    /// Pages of the first region: `1 + pages % MAX_PAGES`.
    pub pages: u8,
    /// Baselines to leave out: bit 0 the kernel tables, bit 1 the user tables (see
    /// [`ImageSpec::build`]).
    pub omit: u8,
    /// Pages of the second region (`extra_pages % 17`, 0: none).
    pub extra_pages: u8,
    /// Where the second region starts (a page number, reduced below 1 GiB).
    pub extra_base: u32,
    /// Edits, in order.
    pub ops: Vec<Op>,
}

impl Codec for ImageSpec {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.pages);
        io.u8(&mut self.omit);
        io.u8(&mut self.extra_pages);
        io.u32(&mut self.extra_base);
        io.list(&mut self.ops, 48);
    }
}

/// An image and what its addresses resolve to.
pub struct Built {
    /// The memory.
    pub mem: MemoryImage,
    /// Bytes in the first region.
    pub size: u64,
    /// The second region (base, size), if any.
    pub extra: Option<(u64, u64)>,
    /// Where window and bounce-area addresses lead.
    pub places: Places,
}

impl ImageSpec {
    /// Bytes in the first region.
    pub fn size(&self) -> u64 {
        (1 + u64::from(self.pages) % MAX_PAGES) << 12
    }

    /// The second region (base, size), if any: page-aligned, past the first region and
    /// below 1 GiB.
    pub fn extra(&self) -> Option<(u64, u64)> {
        let pages = u64::from(self.extra_pages) % (MAX_EXTRA_PAGES + 1);
        if pages == 0 {
            return None;
        }
        let room = (1 << 18) - MAX_PAGES - MAX_EXTRA_PAGES - 1;
        let base = MAX_PAGES + 1 + u64::from(self.extra_base) % room;
        Some((base << 12, pages << 12))
    }

    /// The end of the highest region.
    pub fn end(&self) -> u64 {
        self.extra().map_or(self.size(), |(b, s)| b + s)
    }

    /// Builds the image. Baseline tables (unless left out), CR3 at page 1:
    /// - kernel: PML4[511] → page 3, PDPT[510] → page 4, PD[0] and PD[1] → the 2 MiB pages
    ///   at 0 and 2 MiB, so `K + x` maps guest-physical `x` for the image's first 4 MiB;
    /// - user: PML4[0] → page 2, PDPT[0] → page 5, PD[2] → page 6, PT[0] → 2 MiB: user
    ///   address 4 MiB maps guest-physical 2 MiB (the view tests' program page).
    ///
    /// Then the ops, in order; an edit outside the image is dropped.
    pub fn build(&self, places: Places) -> Built {
        let size = self.size();
        let extra = self.extra();
        let mut regions = vec![(0, vec![0u8; size as usize])];
        if let Some((base, len)) = extra {
            regions.push((base, vec![0u8; len as usize]));
        }
        let mem = MemoryImage::from_regions(regions).unwrap_or_else(|_| MemoryImage::new(0));
        let built = Built {
            mem,
            size,
            extra,
            places,
        };
        let put = |gpa: u64, v: u64| {
            let _ = built.mem.write_u64(gpa, v);
        };
        if self.omit & 1 == 0 {
            put(0x1000 + 511 * 8, 0x3000 | PRW);
            put(0x3000 + 510 * 8, 0x4000 | PRW);
            put(0x4000, PS | PRW);
            put(0x4008, 0x20_0000 | PS | PRW);
        }
        if self.omit & 2 == 0 {
            put(0x1000, 0x2000 | PRWU);
            put(0x2000, 0x5000 | PRWU);
            put(0x5000 + 2 * 8, 0x6000 | PRWU);
            put(0x6000, 0x20_0000 | PRWU);
        }
        for op in &self.ops {
            built.apply(op);
        }
        built
    }
}

fn entry_flags(flags: u16) -> u64 {
    let f = u64::from(flags);
    (f & 0xfff)
        | if f & (1 << 13) != 0 { 1 << 51 } else { 0 }
        | if f & (1 << 14) != 0 { 1 << 12 } else { 0 }
        | if f & (1 << 15) != 0 { XD } else { 0 }
}

impl Built {
    /// What `a` names:
    /// 0 raw; 1 a byte of the first region; 2 a page of it; 3 a 2 MiB frame (first
    /// 4 GiB); 4 a window page; 5 a page of the bounce area; 6 a byte of the
    /// first region at its kernel virtual address; 7 a byte of the second region (raw
    /// without one).
    pub fn addr(&self, a: &Addr) -> u64 {
        match a.kind % 8 {
            0 => a.v,
            1 => a.v % self.size,
            2 => (a.v % (self.size >> 12)) << 12,
            3 => (a.v % 2048) << 21,
            4 => self.places.window_gpa + ((a.v % WINDOW_SIZE) & !0xfff),
            5 => self.places.bounce_gpa + ((a.v % (BOUNCE_SIZE >> 12)) << 12),
            6 => K + a.v % self.size,
            _ => match self.extra {
                Some((base, len)) => base + a.v % len,
                None => a.v,
            },
        }
    }

    /// `a` as a guest-physical address to edit: kernel virtual addresses (kind 6) are
    /// taken at their physical offset.
    fn phys(&self, a: &Addr) -> u64 {
        match a.kind % 8 {
            6 => a.v % self.size,
            _ => self.addr(a),
        }
    }

    fn apply(&self, op: &Op) {
        let at = self.phys(&op.at);
        match op.kind % 5 {
            0 => {
                let table = at & !0xfff;
                let slot = table + u64::from(op.index % 512) * 8;
                let v = (self.addr(&op.target) & !0xfff) | entry_flags(op.flags);
                let _ = self.mem.write_u64(slot, v);
            }
            1 => {
                let table = at & !0xfff;
                let step = [0u64, 1 << 12, 1 << 21, 1 << 30][usize::from(op.index % 4)];
                let base = self.addr(&op.target) & !0xfff;
                let flags = entry_flags(op.flags);
                let mut raw = [0u8; 4096];
                for (i, e) in (0u64..).zip(raw.chunks_exact_mut(8)) {
                    let v = base.wrapping_add(i.wrapping_mul(step)) | flags;
                    e.copy_from_slice(&v.to_le_bytes());
                }
                let _ = self.mem.write_phys(table, &raw);
            }
            2 => {
                let _ = self.mem.write_u64(at, self.addr(&op.target));
            }
            3 => {
                let _ = self.mem.write_phys(at, &op.data);
            }
            _ => {
                let byte = op.data.first().copied().unwrap_or(0);
                let _ = self.mem.write_phys(at & !0xfff, &[byte; 4096]);
            }
        }
    }

    /// Every byte of the image, region by region (to check it was not written).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        let _ = self.mem.read_phys(0, &mut out);
        if let Some((base, len)) = self.extra {
            let mut more = vec![0u8; len as usize];
            let _ = self.mem.read_phys(base, &mut more);
            out.extend_from_slice(&more);
        }
        out
    }
}

/// Several memories at disjoint guest-physical ranges, seen as one (as the redirect VM
/// composes GVM RAM, the window and the bounce area). An access is served by the first
/// memory that holds all of it.
pub struct Composed<'a>(pub Vec<&'a dyn GuestPhysMemory>);

impl Composed<'_> {
    fn find(&self, gpa: u64, len: usize) -> Result<&dyn GuestPhysMemory, MemError> {
        self.0
            .iter()
            .copied()
            .find(|m| m.contains(gpa, len as u64))
            .ok_or(MemError::OutOfRange {
                gpa,
                len: len as u64,
            })
    }
}

impl GuestPhysMemory for Composed<'_> {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        self.0.iter().any(|m| m.contains(gpa, len))
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.find(gpa, buf.len())?.read_phys(gpa, buf)
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.find(gpa, buf.len())?.write_phys(gpa, buf)
    }
}

/// A memory that records the writes made through it, counts reads and, when asked, records
/// them too.
pub struct Recorder<'a> {
    /// The memory itself.
    pub inner: &'a dyn GuestPhysMemory,
    /// Writes attempted, as (gpa, len).
    pub writes: RefCell<Vec<(u64, u64)>>,
    /// Reads attempted, as (gpa, len), while `log_reads` is set.
    pub reads: RefCell<Vec<(u64, u64)>>,
    /// Whether to record reads in `reads`.
    pub log_reads: Cell<bool>,
    /// Reads attempted.
    pub read_count: Cell<usize>,
}

impl<'a> Recorder<'a> {
    /// Records accesses to `inner`.
    pub fn new(inner: &'a dyn GuestPhysMemory) -> Self {
        Recorder {
            inner,
            writes: RefCell::new(Vec::new()),
            reads: RefCell::new(Vec::new()),
            log_reads: Cell::new(false),
            read_count: Cell::new(0),
        }
    }
}

impl GuestPhysMemory for Recorder<'_> {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        self.inner.contains(gpa, len)
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.read_count.set(self.read_count.get() + 1);
        if self.log_reads.get() {
            self.reads.borrow_mut().push((gpa, buf.len() as u64));
        }
        self.inner.read_phys(gpa, buf)
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.writes.borrow_mut().push((gpa, buf.len() as u64));
        self.inner.write_phys(gpa, buf)
    }
}

/// Whether [lo, lo + size) meets [start, end) (saturating, as the view does).
pub fn meets(lo: u64, size: u64, (start, end): (u64, u64)) -> bool {
    lo < end && lo.saturating_add(size) > start
}
