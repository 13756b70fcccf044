//! The redirect view's private window and its page tables (DESIGN.md 4.1 and 4.2 step 3).
//!
//! The redirect vCPU runs in a guest-physical space composed of memslots: GVM RAM at its own
//! addresses, the kernel text from the SVM, a private window owned by the VMM (read-only but
//! for its scratch stack) and the call's bounce pages ([`crate::bounce`]) — no SVM memory.
//! This module lays out the window and builds, in it, the page tables the redirect vCPU
//! runs on:
//! - kernel half (PML4 entries 256..511): the GVM's own kernel entries, copied from a GVM
//!   vCPU's CR3, so the GVM kernel sees its usual address space;
//! - PML4 entry [`WINDOW_SLOT`]: of the window at [`WINDOW_KVA`], only the scratch stack
//!   and the CPU's private stacks (supervisor, no-execute, each below a guard page) and,
//!   read-only, the CPU's GDT, TSS and IDT ([`crate::cpu_tables`]) — these page tables and
//!   the stubs have no virtual alias, so code the call runs cannot rewrite them; then the
//!   trap page and the read-only kernel stub page ([`KSTUB_KVA`]);
//! - user half: the pages of the call's buffers, each at the program's own address, mapped to
//!   its bounce page (read-only unless a range in it is written, never executable), so user
//!   pointers in the call reach copies of the listed bytes and nothing else of the SVM;
//! - execution is confined to the trusted kernel text ([`ViewLayout::exec_text`]): every
//!   other kernel-half range (modules, heap, direct map, vmalloc) is no-execute in the view,
//!   set at the highest table level that covers only untrusted memory (the PML4 for most
//!   slots; a copied PDPT and PD for slot 511, which holds the image and the modules), so
//!   a hook that jumps out of the image faults on NX instead of running; and the text's
//!   own addresses are mapped by tables of the view's own, page by page, to the text's
//!   physical pages (the read-only slot of the trusted text), so the GVM's tables cannot
//!   point them at a patched copy;
//! - one free user PML4 slot: the stub page (`syscall`, then a store to the *sentinel* page,
//!   whose guest-physical address no memslot backs, so the store exits to the VMM with RAX).
//!
//! Everything read from the GVM is bounded (a fixed number of tables copied), and tables come
//! from a fixed pool in the window: a view that needs more (buffers scattered over very many
//! GiB) is refused with [`ViewError::PoolExhausted`].

use thiserror::Error;

use crate::bounce::{BouncePlan, BOUNCE_SIZE};
use crate::memory::{GuestPhysMemory, MemError};
use crate::paging::{PageSize, ADDR_FIELD, PTE_P, PTE_PS, PTE_RW, PTE_US, PTE_XD};

/// PML4 slot of the window's kernel mapping: 0xffff_fe80_0000_0000, the 0.5 TB hole x86-64
/// Linux leaves unused with 4-level tables between the cpu_entry_area and the ESPFIX stacks
/// (Documentation/arch/x86/x86_64/mm.rst). It lies above `vaddr_end` (the cpu_entry_area's
/// base, `arch/x86/mm/kaslr.c`), so `CONFIG_RANDOMIZE_MEMORY`, which places the direct map,
/// vmalloc and vmemmap anywhere below it, never puts them there. (Slot 0x1f0, used before,
/// lies in the KASAN shadow range, inside the randomised range.) A GVM that maps it anyway
/// is refused ([`ViewError::SlotInUse`]).
pub const WINDOW_SLOT: usize = 0x1fd;
/// Kernel-virtual address of the window's first byte.
pub const WINDOW_KVA: u64 = 0xffff_0000_0000_0000 | ((WINDOW_SLOT as u64) << 39);
/// Size of the window: two 2 MiB pages.
pub const WINDOW_SIZE: u64 = 4 << 20;
/// A kernel-virtual page right after the window that maps [`ViewLayout::trap_gpa`], which no
/// memslot backs: a store there from patched kernel code exits to the VMM (the executor's
/// trap for calls that would sleep).
pub const TRAP_KVA: u64 = WINDOW_KVA + WINDOW_SIZE;
/// Offset in the trap page that [`kstub_code`] stores to: "the kernel function returned".
pub const KERNEL_RETURN_SLOT: u64 = 0x800;
/// A supervisor-executable page after the trap page: the return address of kernel
/// functions the executor calls itself (it maps window offset [`offsets::KSTUB`]). The one
/// kernel-half page outside the trusted text the view lets execute; it holds only
/// [`kstub_code`].
pub const KSTUB_KVA: u64 = TRAP_KVA + 0x1000;

/// Where things live in the window (offsets from its start).
pub mod offsets {
    /// The view's PML4.
    pub const PML4: u64 = 0;
    /// The user stub page: `syscall`, then the store to the sentinel.
    pub const STUB: u64 = 0x1000;
    /// The kernel stub page ([`super::KSTUB_KVA`]).
    pub const KSTUB: u64 = 0x2000;
    /// The GDT (at the page's start) and the TSS (at [`TSS_IN_PAGE`]) the redirect vCPU
    /// runs on (`crate::cpu_tables`); mapped read-only at [`super::ViewLayout::kva`].
    pub const GDT_TSS: u64 = 0x3000;
    /// Where the TSS sits in the [`GDT_TSS`] page.
    pub const TSS_IN_PAGE: u64 = 0x800;
    /// The IDT the redirect vCPU runs on (one page), mapped read-only.
    pub const IDT: u64 = 0x4000;
    /// The stack the executor's own kernel-function calls run on (16 KiB). The shadow
    /// task, its stack and its file table live in GVM memory (see the executor).
    pub const SCRATCH_STACK: u64 = 0x2_0000;
    /// Size in bytes of the scratch stack at [`SCRATCH_STACK`].
    pub const STACK_SIZE: u64 = 0x4000;
    /// The CPU's private stacks (`RSP0`, then IST1..IST7; [`crate::cpu_tables::tss`]), one
    /// per [`CPU_STACK_SLOT`] bytes: an unmapped guard page, then [`CPU_STACK_SIZE`] bytes
    /// of stack. After the scratch stack, whose top the first guard page also guards.
    pub const CPU_STACKS: u64 = SCRATCH_STACK + STACK_SIZE;
    /// Bytes of one private stack: Linux's `EXCEPTION_STKSZ` (its NMI entry code finds
    /// out whether it interrupted itself by that size).
    pub const CPU_STACK_SIZE: u64 = 0x2000;
    /// Bytes of a guard page and a private stack.
    pub const CPU_STACK_SLOT: u64 = 0x1000 + CPU_STACK_SIZE;
    /// The end of the window's writable part: the scratch stack and the private stacks.
    pub const WRITABLE_END: u64 =
        CPU_STACKS + CPU_STACK_SLOT * crate::cpu_tables::CPU_STACKS as u64;
    /// Page-table pages for the view, to the end of the window.
    pub const TABLES: u64 = 0x10_0000;
}

/// Highest canonical user address.
const USER_TOP: u64 = 0x0000_7fff_ffff_ffff;
/// Accessed and dirty: set up front, so the CPU never writes them back into the window.
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
/// Where the bounce area starts, from the window's start: past the window, the sentinel
/// and trap pages, and the engine's flush page (at the sentinel + 2 MiB).
pub const BOUNCE_OFFSET: u64 = 8 << 20;

/// Bytes of the read-only area that holds the verified modules' text copies.
pub const MODULE_COPY_SIZE: u64 = 16 << 20;
/// The kernel's module area (`MODULES_VADDR`..`MODULES_END` of x86-64 with 4-level
/// paging): a module text the view runs must lie inside it.
pub const MODULE_AREA: (u64, u64) = (0xffff_ffff_c000_0000, 0xffff_ffff_ff00_0000);

/// A loaded module's core text the view runs (`crate::module_text` verified it): its
/// kernel-virtual pages [start, end) map, read-only and executable, to the copy of the
/// verified bytes at guest-physical `copy` (in the read-only module copy area), not to
/// the GVM's pages, which any GVM mapping and any store of the call could change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleCopy {
    /// First byte (page-aligned).
    pub start: u64,
    /// End (page-aligned).
    pub end: u64,
    /// Guest-physical address of the copy's first page.
    pub copy: u64,
}

/// Where the window, the sentinel and the bounce area sit in the redirect VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewLayout {
    /// Guest-physical start of the window (2 MiB aligned).
    pub window_gpa: u64,
    /// Guest-physical start of the bounce area ([`crate::bounce::BOUNCE_SIZE`] bytes).
    pub bounce_gpa: u64,
    /// A guest-physical page no memslot backs: the stub's store there exits with RAX.
    pub sentinel_gpa: u64,
    /// The kernel-virtual range [start, end) the view leaves executable: the trusted
    /// image's `.text`, page-rounded, where the GVM's kernel has it (its link addresses
    /// moved by the GVM's KASLR slide, [`ViewLayout::slide_text`]).
    pub exec_text: (u64, u64),
    /// Guest-physical start of the read-only slot that holds the trusted text (2 MiB
    /// aligned, above GVM RAM): the view maps `exec_text` page by page to it.
    pub text_gpa: u64,
    /// One more range left executable, to 4 KiB pages, for one call: the text of the
    /// module that a `delete_module` removes (its exit function runs in the call).
    pub also_exec: Option<(u64, u64)>,
    /// Guest-physical start of the read-only area ([`MODULE_COPY_SIZE`] bytes) that holds
    /// the verified modules' text.
    pub module_copy_gpa: u64,
    /// The verified modules' text: executable in the view, from the copies.
    pub modules: Vec<ModuleCopy>,
}

/// `__START_KERNEL_map`: a kernel image's link addresses are this plus the physical address
/// it is linked for (where a `nokaslr` kernel sits).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// The guest-physical [start, end), rounded out to pages, of the kernel-image range
/// `size` bytes long linked at `link`; `None` if it is not in the kernel-image map.
pub fn text_phys(link: u64, size: u64) -> Option<(u64, u64)> {
    let start = link.checked_sub(START_KERNEL_MAP)?;
    let end = start.checked_add(size)?.checked_add(0xfff)? & !0xfff;
    Some((start & !0xfff, end))
}

impl ViewLayout {
    /// The redirect VM's layout for a GVM whose RAM ends at guest-physical `gvm_end`, for
    /// a kernel text linked for physical `text` ([`text_phys`]): the window at the next
    /// 1 GiB boundary, the sentinel and trap pages right after it, the bounce area 8 MiB
    /// past the window's start, then the module copy area and the text slot. The text is
    /// executable at its link addresses until [`ViewLayout::slide_text`] moves it. `None`
    /// if that does not fit in the address space.
    pub fn for_guest(gvm_end: u64, text: (u64, u64)) -> Option<ViewLayout> {
        let align = |v: u64, a: u64| v.checked_add(a - 1).map(|v| v & !(a - 1));
        let window_gpa = align(gvm_end, 1 << 30)?;
        let sentinel_gpa = window_gpa.checked_add(WINDOW_SIZE)?;
        let module_copy_gpa = window_gpa.checked_add(BOUNCE_OFFSET + BOUNCE_SIZE)?;
        let text_gpa = align(module_copy_gpa.checked_add(MODULE_COPY_SIZE)?, 2 << 20)?;
        let text_len = text.1.checked_sub(text.0)?;
        if text_gpa.checked_add(text_len)? > 1 << 52 {
            return None;
        }
        Some(ViewLayout {
            window_gpa,
            sentinel_gpa,
            exec_text: (
                START_KERNEL_MAP.checked_add(text.0)?,
                START_KERNEL_MAP.checked_add(text.1)?,
            ),
            also_exec: None,
            text_gpa,
            bounce_gpa: window_gpa.checked_add(BOUNCE_OFFSET)?,
            module_copy_gpa,
            modules: Vec::new(),
        })
    }

    /// Makes the text executable at its link addresses (`link`, [start, end)) moved by a
    /// GVM's KASLR `slide`: where that GVM's kernel runs it. `None` (and nothing changed)
    /// if the moved range leaves the kernel-image map.
    pub fn slide_text(&mut self, link: (u64, u64), slide: u64) -> Option<()> {
        let map_end = START_KERNEL_MAP + crate::kaslr::KERNEL_IMAGE_SIZE;
        let start = link.0.checked_add(slide)?;
        let end = link.1.checked_add(slide)?;
        if start < START_KERNEL_MAP || end > map_end || start > end {
            return None;
        }
        self.exec_text = (start, end);
        Some(())
    }

    /// Guest-physical address of window offset `off`.
    pub fn gpa(&self, off: u64) -> u64 {
        self.window_gpa + off
    }

    /// The unbacked page [`TRAP_KVA`] maps.
    pub fn trap_gpa(&self) -> u64 {
        self.sentinel_gpa + 0x1000
    }

    /// Kernel-virtual address of window offset `off`.
    pub fn kva(off: u64) -> u64 {
        WINDOW_KVA + off
    }

    /// Kernel-virtual tops of the CPU's private stacks: `RSP0`, IST1..IST7.
    pub fn cpu_stack_tops() -> [u64; crate::cpu_tables::CPU_STACKS] {
        let mut tops = [0; crate::cpu_tables::CPU_STACKS];
        for (i, top) in (0u64..).zip(tops.iter_mut()) {
            *top = Self::kva(offsets::CPU_STACKS + (i + 1) * offsets::CPU_STACK_SLOT);
        }
        tops
    }
}

/// Why [`build_view`] could not build a view.
#[derive(Debug, Error)]
pub enum ViewError {
    /// The window could not be read or written.
    #[error("the window: {0}")]
    Window(MemError),
    /// A GVM kernel page-table page the view copies is not in GVM memory.
    #[error("the GVM's page tables at {cr3:#x}: {source}")]
    GvmTables {
        /// The GVM CR3 the view was built from.
        cr3: u64,
        /// Why the read failed.
        source: MemError,
    },
    /// A verified module's text lies outside the kernel's module area, or over the
    /// trusted text.
    #[error(
        "a module's text the view would run lies outside the kernel's module area or over \
         the kernel's text"
    )]
    ModuleOutsideArea,
    /// The GVM kernel has a present entry in [`WINDOW_SLOT`].
    #[error(
        "the GVM kernel uses PML4 slot {WINDOW_SLOT:#x}, which the view reserves for its window"
    )]
    SlotInUse,
    /// The window's page-table pool ran out; holds the number of pages used.
    #[error("the view needs more than its {0} page-table pages")]
    PoolExhausted(u64),
    /// A bounce page lies outside the bounce area, or a buffer page outside user memory.
    #[error("the call's buffer page {va:#x} (bounce offset {offset:#x}) does not fit the view")]
    BounceOutOfRange {
        /// The program's virtual address of the page.
        va: u64,
        /// Its offset in the bounce area.
        offset: u64,
    },
    /// User PML4 slots 1..256 all hold buffers, so the stub has nowhere to go.
    #[error("the call's buffers are in every user PML4 slot: no room for the stub")]
    NoStubSlot,
}

/// What [`build_view`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// CR3 for the redirect vCPU.
    pub cr3: u64,
    /// User-virtual address of the stub (`syscall` is its first instruction).
    pub stub_va: u64,
    /// User-virtual address the stub stores RAX to (maps `sentinel_gpa`).
    pub sentinel_va: u64,
    /// Buffer pages mapped (one per bounce page).
    pub user_mappings: usize,
    /// Page-table pages used from the pool.
    pub tables: u64,
}

/// The stub: `syscall; movabs %rax, (sentinel); jmp .` — the jump is never reached.
pub fn stub_code(sentinel_va: u64) -> [u8; 14] {
    let mut code = [0u8; 14];
    code[..2].copy_from_slice(&[0x0f, 0x05]);
    code[2..4].copy_from_slice(&[0x48, 0xa3]);
    code[4..12].copy_from_slice(&sentinel_va.to_le_bytes());
    code[12..].copy_from_slice(&[0xeb, 0xfe]);
    code
}

/// The kernel stub: `movabs %rax, TRAP_KVA + KERNEL_RETURN_SLOT; jmp .` — a kernel
/// function the executor called returns here, and the store exits with its result.
pub fn kstub_code() -> [u8; 12] {
    let mut code = [0u8; 12];
    code[..2].copy_from_slice(&[0x48, 0xa3]);
    code[2..10].copy_from_slice(&(TRAP_KVA + KERNEL_RETURN_SLOT).to_le_bytes());
    code[10..].copy_from_slice(&[0xeb, 0xfe]);
    code
}

/// Bump allocator of zeroed page-table pages in the window.
struct Pool<'a> {
    window: &'a dyn GuestPhysMemory,
    next: u64,
    end: u64,
    used: u64,
    /// The GVM pages copied into the pool (the kernel half depends on them).
    copied: Vec<u64>,
}

impl Pool<'_> {
    fn alloc(&mut self) -> Result<u64, ViewError> {
        if self.next >= self.end {
            return Err(ViewError::PoolExhausted(self.used));
        }
        let gpa = self.next;
        self.window
            .write_phys(gpa, &[0u8; 4096])
            .map_err(ViewError::Window)?;
        self.next += 4096;
        self.used += 1;
        Ok(gpa)
    }

    /// The table that entry `index` of table `table` points to, made if absent.
    fn child(&mut self, table: u64, index: u64, user: bool) -> Result<u64, ViewError> {
        let slot = table + index * 8;
        let entry = self.window.read_u64(slot).map_err(ViewError::Window)?;
        if entry & PTE_P != 0 && entry & PTE_PS == 0 {
            return Ok(entry & ADDR_FIELD);
        }
        // Absent (or a large page we overwrite: mappings never overlap, so this is not hit
        // for well-formed input: buffer pages are 4 KiB and distinct).
        let child = self.alloc()?;
        // Dirty is ignored here (the entry points to a table): preset like everything in
        // the read-only window (see `write_table`).
        let flags = PTE_P | PTE_RW | PTE_A | PTE_D | if user { PTE_US } else { 0 };
        self.window
            .write_u64(slot, child | flags)
            .map_err(ViewError::Window)?;
        Ok(child)
    }

    /// Maps `va` → `pa` with a leaf of `size` under the PML4 at `pml4`.
    fn map(
        &mut self,
        pml4: u64,
        va: u64,
        pa: u64,
        size: PageSize,
        leaf_flags: u64,
    ) -> Result<(), ViewError> {
        let user = leaf_flags & PTE_US != 0;
        let idx = |shift: u32| (va >> shift) & 0x1ff;
        let pdpt = self.child(pml4, idx(39), user)?;
        let (table, index, ps) = match size {
            PageSize::Size1G => (pdpt, idx(30), PTE_PS),
            PageSize::Size2M => (self.child(pdpt, idx(30), user)?, idx(21), PTE_PS),
            PageSize::Size4K => {
                let pd = self.child(pdpt, idx(30), user)?;
                (self.child(pd, idx(21), user)?, idx(12), 0)
            }
        };
        self.window
            .write_u64(table + index * 8, (pa & ADDR_FIELD) | leaf_flags | ps)
            .map_err(ViewError::Window)
    }
}

/// Kernel-virtual address of PML4 slot 511's first byte.
const SLOT_511_KVA: u64 = 0xffff_ff80_0000_0000;
/// The PAT bit of a 2 MiB or 1 GiB page entry.
const PTE_PAT_LARGE: u64 = 1 << 12;
/// The PAT bit of a 4 KiB page entry (where larger entries have PS).
const PTE_PAT_4K: u64 = 1 << 7;

/// Whether [lo, lo + size) meets [start, end).
fn meets(lo: u64, size: u64, (start, end): (u64, u64)) -> bool {
    lo < end && lo.saturating_add(size) > start
}

/// Copies the GVM table at `gpa` into a pool page; returns the copy and its entries.
fn copy_table(
    pool: &mut Pool<'_>,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    gpa: u64,
) -> Result<(u64, [u64; 512]), ViewError> {
    let mut raw = [0u8; 4096];
    gvm.read_phys(gpa, &mut raw)
        .map_err(|source| ViewError::GvmTables { cr3, source })?;
    pool.copied.push(gpa & ADDR_FIELD & !0xfff);
    let mut entries = [0u64; 512];
    for (e, b) in entries.iter_mut().zip(raw.chunks_exact(8)) {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        *e = u64::from_le_bytes(w);
    }
    Ok((pool.alloc()?, entries))
}

/// Writes a table into the pool with accessed and dirty set on every present entry (dirty
/// is ignored in entries that point to a table): the window is read-only to the redirect
/// vCPU, so its page walker must find nothing to write back.
fn write_table(pool: &Pool<'_>, gpa: u64, entries: &[u64; 512]) -> Result<(), ViewError> {
    let mut raw = [0u8; 4096];
    for (b, &e) in raw.chunks_exact_mut(8).zip(entries) {
        let e = if e & PTE_P != 0 { e | PTE_A | PTE_D } else { e };
        b.copy_from_slice(&e.to_le_bytes());
    }
    pool.window.write_phys(gpa, &raw).map_err(ViewError::Window)
}

/// Makes PML4 slot 511 no-execute outside the trusted text, and makes the text's own
/// translation the view's, not the GVM's: its PDPT is copied into the pool with NX on
/// every entry that holds no text (the module a `delete_module` removes excepted, see
/// [`ViewLayout::also_exec`]), and the GiB that holds the text gets a PD of the view's
/// own ([`own_text_gib`]).
fn confine_execution(
    pool: &mut Pool<'_>,
    pml4: u64,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    layout: &ViewLayout,
) -> Result<(), ViewError> {
    let text = layout.exec_text;
    let extra = layout.also_exec.unwrap_or((0, 0));
    let top = pool
        .window
        .read_u64(pml4 + 511 * 8)
        .map_err(ViewError::Window)?;
    let (pdpt_copy, mut pdpt) = if top & PTE_P != 0 {
        copy_table(pool, gvm, cr3, top & ADDR_FIELD)?
    } else {
        (pool.alloc()?, [0u64; 512])
    };
    let own = &layout.modules;
    if own.iter().any(|m| {
        m.start < MODULE_AREA.0
            || m.end > MODULE_AREA.1
            || m.start >= m.end
            || meets(m.start, m.end - m.start, text)
    }) {
        return Err(ViewError::ModuleOutsideArea);
    }
    for (i, entry) in (0u64..).zip(pdpt.iter_mut()) {
        let gib = SLOT_511_KVA + (i << 30);
        if meets(gib, 1 << 30, text) {
            *entry = own_text_gib(pool, gvm, cr3, gib, *entry, layout)?;
        } else if own.iter().any(|m| meets(gib, 1 << 30, (m.start, m.end))) {
            // Verified module text: a PD of the view's own (see `own_pages_pt`).
            let (pd_gpa, mut pd) = pd_of(pool, gvm, cr3, *entry)?;
            confine_pd(pool, gvm, cr3, gib, &mut pd, extra, own)?;
            write_table(pool, pd_gpa, &pd)?;
            *entry = pd_gpa | PTE_P | PTE_RW | PTE_A;
        } else if *entry & PTE_P == 0 {
            continue;
        } else if !meets(gib, 1 << 30, extra) {
            *entry |= PTE_XD;
        } else if *entry & PTE_PS == 0 {
            let (pd_copy, mut pd) = copy_table(pool, gvm, cr3, *entry & ADDR_FIELD)?;
            confine_pd(pool, gvm, cr3, gib, &mut pd, extra, &[])?;
            write_table(pool, pd_copy, &pd)?;
            *entry = pd_copy | (*entry & !ADDR_FIELD);
        }
    }
    write_table(pool, pdpt_copy, &pdpt)?;
    let flags = if top & PTE_P != 0 {
        top & !ADDR_FIELD
    } else {
        PTE_P | PTE_RW | PTE_A | PTE_D
    };
    pool.window
        .write_u64(pml4 + 511 * 8, pdpt_copy | flags)
        .map_err(ViewError::Window)
}

/// Sets NX on every present entry of `pd` (the PD of the GiB at `gib`) that does not meet
/// `extra`; the part that does gets a PT of its own, executable to the page. A 2 MiB
/// region that holds verified module text (`own`) gets a PT of its own too
/// ([`own_pages_pt`]).
fn confine_pd(
    pool: &mut Pool<'_>,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    gib: u64,
    pd: &mut [u64; 512],
    extra: (u64, u64),
    own: &[ModuleCopy],
) -> Result<(), ViewError> {
    for (j, e) in (0u64..).zip(pd.iter_mut()) {
        let mib2 = gib + (j << 21);
        if own.iter().any(|m| meets(mib2, 1 << 21, (m.start, m.end))) {
            *e = own_pages_pt(pool, gvm, cr3, mib2, *e, extra, own)?;
            continue;
        }
        if *e & PTE_P == 0 {
            continue;
        }
        if !meets(mib2, 1 << 21, extra) {
            *e |= PTE_XD;
        } else if *e & PTE_PS == 0 {
            let (pt_copy, mut pt) = copy_table(pool, gvm, cr3, *e & ADDR_FIELD)?;
            for (k, pte) in (0u64..).zip(pt.iter_mut()) {
                if !meets(mib2 + (k << 12), 1 << 12, extra) {
                    *pte |= PTE_XD;
                }
            }
            write_table(pool, pt_copy, &pt)?;
            *e = pt_copy | (*e & !ADDR_FIELD);
        }
    }
    Ok(())
}

/// The PD entry for the 2 MiB region at `mib2` (GVM entry `gvm_entry`), which holds
/// verified module text: a PT of the view's own in which each page of that text maps,
/// read-only and executable, to its copy in the module copy area, and every other page
/// keeps the GVM's translation (of a PT, a 2 MiB page or nothing), no-execute unless it
/// meets `extra`.
fn own_pages_pt(
    pool: &mut Pool<'_>,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    mib2: u64,
    gvm_entry: u64,
    extra: (u64, u64),
    own: &[ModuleCopy],
) -> Result<u64, ViewError> {
    let (pt_gpa, mut pt) = if gvm_entry & PTE_P == 0 {
        (pool.alloc()?, [0u64; 512])
    } else if gvm_entry & PTE_PS != 0 {
        // A 2 MiB page, split into 4 KiB ones (the PAT bit moves from bit 12 to bit 7).
        let base = gvm_entry & ADDR_FIELD & !((1 << 21) - 1);
        let pat = if gvm_entry & PTE_PAT_LARGE != 0 {
            PTE_PAT_4K
        } else {
            0
        };
        let flags = (gvm_entry & !ADDR_FIELD & !PTE_PS) | pat;
        let mut pt = [0u64; 512];
        for (k, e) in (0u64..).zip(pt.iter_mut()) {
            *e = (base + (k << 12)) | flags;
        }
        (pool.alloc()?, pt)
    } else {
        copy_table(pool, gvm, cr3, gvm_entry & ADDR_FIELD)?
    };
    for (k, pte) in (0u64..).zip(pt.iter_mut()) {
        let va = mib2 + (k << 12);
        if let Some(m) = own.iter().find(|m| meets(va, 1 << 12, (m.start, m.end))) {
            *pte = (m.copy + (va - m.start)) | PTE_P | PTE_A;
        } else if *pte & PTE_P != 0 && !meets(va, 1 << 12, extra) {
            *pte |= PTE_XD;
        }
    }
    write_table(pool, pt_gpa, &pt)?;
    Ok(pt_gpa | PTE_P | PTE_RW | PTE_A)
}

/// A PD for the GiB whose PDPT entry in the GVM is `gvm_entry`: a copy of the GVM's PD,
/// a 1 GiB page split into 2 MiB ones, or an empty one.
fn pd_of(
    pool: &mut Pool<'_>,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    gvm_entry: u64,
) -> Result<(u64, [u64; 512]), ViewError> {
    if gvm_entry & PTE_P == 0 {
        Ok((pool.alloc()?, [0u64; 512]))
    } else if gvm_entry & PTE_PS != 0 {
        // A 1 GiB page, split into 2 MiB ones (the PAT bit is bit 12 in both).
        let base = gvm_entry & ADDR_FIELD & !((1 << 30) - 1);
        let flags = (gvm_entry & !ADDR_FIELD) | (gvm_entry & PTE_PAT_LARGE);
        let mut pd = [0u64; 512];
        for (j, e) in (0u64..).zip(pd.iter_mut()) {
            *e = (base + (j << 21)) | flags;
        }
        Ok((pool.alloc()?, pd))
    } else {
        copy_table(pool, gvm, cr3, gvm_entry & ADDR_FIELD)
    }
}

/// The PDPT entry for the GiB at `gib`, which holds (part of) the trusted text: a PD of
/// the view's own. Its 2 MiB regions without text keep the GVM's translation (from
/// `gvm_entry`: a PD, a 1 GiB page or nothing), no-execute; those with text get a PT of
/// the view's own that maps each text page, read-only and executable, to its page in the
/// read-only slot of the trusted text ([`ViewLayout::text_gpa`]), and nothing else. The
/// GVM's tables cannot change what code runs at the text's addresses.
fn own_text_gib(
    pool: &mut Pool<'_>,
    gvm: &dyn GuestPhysMemory,
    cr3: u64,
    gib: u64,
    gvm_entry: u64,
    layout: &ViewLayout,
) -> Result<u64, ViewError> {
    let text = layout.exec_text;
    let extra = layout.also_exec.unwrap_or((0, 0));
    let (pd_gpa, mut pd) = pd_of(pool, gvm, cr3, gvm_entry)?;
    confine_pd(pool, gvm, cr3, gib, &mut pd, extra, &layout.modules)?;
    for (j, e) in (0u64..).zip(pd.iter_mut()) {
        let mib2 = gib + (j << 21);
        if !meets(mib2, 1 << 21, text) {
            continue;
        }
        let pt_gpa = pool.alloc()?;
        let mut pt = [0u64; 512];
        for (k, pte) in (0u64..).zip(pt.iter_mut()) {
            let va = mib2 + (k << 12);
            if let Some(pa) = va
                .checked_sub(text.0)
                .filter(|_| meets(va, 1 << 12, text))
                .and_then(|off| layout.text_gpa.checked_add(off))
            {
                *pte = pa | PTE_P | PTE_A;
            }
        }
        write_table(pool, pt_gpa, &pt)?;
        *e = pt_gpa | PTE_P | PTE_RW | PTE_A;
    }
    write_table(pool, pd_gpa, &pd)?;
    Ok(pd_gpa | PTE_P | PTE_RW | PTE_A)
}

/// Builds the view page tables in `window` (see the module docs). `gvm_cr3` is any GVM
/// vCPU's CR3 (every process shares the kernel half); `buffers` are the call's bounce
/// pages, mapped at [`ViewLayout::bounce_gpa`]. The view's PML4 is the window's first
/// page ([`offsets::PML4`]); its tables follow from [`offsets::TABLES`].
pub fn build_view(
    window: &dyn GuestPhysMemory,
    layout: &ViewLayout,
    gvm: &dyn GuestPhysMemory,
    gvm_cr3: u64,
    buffers: &BouncePlan,
) -> Result<View, ViewError> {
    ViewTables::default()
        .build(window, layout, gvm, gvm_cr3, buffers)
        .map(|(view, _)| view)
}

/// The view's tables across the calls of an *epoch*: the time between two flushes of the
/// redirect VM's cached translations (under shadow paging, KVM's shadow pages of the
/// tables). Within an epoch no table page is ever written twice: the kernel half is built
/// once, at the epoch's first view, and every later view gets a new PML4 and new user
/// tables from the pool, the kernel half's entries copied in. So what KVM cached of the
/// epoch's earlier views stays true, and a call's view shares, and need not translate
/// again, everything but its own buffers (the kernel text above all: without this, every
/// call refaulted each page of it it ran).
///
/// The kernel half is the GVM's state at the epoch's start: an epoch ends — the next
/// [`ViewTables::build`] starts a new one and says so — when the GVM CPU's CR3 or the
/// extra executable range differ, when the pool runs out, when
/// [`ViewTables::forget`] was called (the GVM ran, or a call's stores were dropped: both
/// change GVM tables behind KVM's back), or when a call wrote a GVM page the kernel half
/// copied ([`ViewTables::forget_if_written`]).
#[derive(Debug, Default)]
pub struct ViewTables {
    kernel: Option<KernelHalf>,
}

/// What the epoch's kernel half was built from, and where its pool left off.
#[derive(Debug)]
struct KernelHalf {
    gvm_cr3: u64,
    also_exec: Option<(u64, u64)>,
    modules: Vec<ModuleCopy>,
    /// The GVM table pages it copied: the PML4 and those below slot 511 it made its own.
    copied: Vec<u64>,
    /// The pool's next free page, and pages used, after the epoch's last view.
    next: u64,
    used: u64,
}

impl ViewTables {
    /// The view for a call (see [`build_view`]), and whether it starts a new epoch: then,
    /// and only then, the redirect VM must drop its cached translations before it runs.
    pub fn build(
        &mut self,
        window: &dyn GuestPhysMemory,
        layout: &ViewLayout,
        gvm: &dyn GuestPhysMemory,
        gvm_cr3: u64,
        buffers: &BouncePlan,
    ) -> Result<(View, bool), ViewError> {
        let same = |k: &KernelHalf| {
            k.gvm_cr3 == gvm_cr3 && k.also_exec == layout.also_exec && k.modules == layout.modules
        };
        if let Some(kernel) = self.kernel.as_mut().filter(|k| same(k)) {
            match later_view(window, layout, kernel, buffers) {
                Err(ViewError::PoolExhausted(_)) => {}
                other => return other.map(|view| (view, false)),
            }
        }
        self.kernel = None;
        let (view, kernel) = first_view(window, layout, gvm, gvm_cr3, buffers)?;
        self.kernel = Some(kernel);
        Ok((view, true))
    }

    /// Ends the epoch: the next view is built afresh.
    pub fn forget(&mut self) {
        self.kernel = None;
    }

    /// Ends the epoch if a page in `written` (guest-physical (start, length) ranges, what
    /// a call committed) is one the kernel half was copied from.
    pub fn forget_if_written(&mut self, written: &[(u64, u64)]) {
        let hit = self.kernel.as_ref().is_some_and(|k| {
            k.copied.iter().any(|&page| {
                written
                    .iter()
                    .any(|&(start, len)| page >= start && page - start < len)
            })
        });
        if hit {
            self.kernel = None;
        }
    }
}

/// A later view of an epoch: a new PML4 from the pool with the kernel half's entries, and
/// the call's user half in new tables.
fn later_view(
    window: &dyn GuestPhysMemory,
    layout: &ViewLayout,
    kernel: &mut KernelHalf,
    buffers: &BouncePlan,
) -> Result<View, ViewError> {
    let mut pool = Pool {
        window,
        next: kernel.next,
        end: layout.gpa(WINDOW_SIZE),
        used: kernel.used,
        copied: Vec::new(),
    };
    let pml4 = pool.alloc()?;
    let mut half = [0u8; 2048];
    window
        .read_phys(layout.gpa(offsets::PML4) + 2048, &mut half)
        .map_err(ViewError::Window)?;
    window
        .write_phys(pml4 + 2048, &half)
        .map_err(ViewError::Window)?;
    let view = user_half(&mut pool, pml4, layout, buffers)?;
    kernel.next = pool.next;
    kernel.used = pool.used;
    Ok(view)
}

/// An epoch's first view: the kernel half in the window's PML4 (the template later views
/// copy), then the call's user half.
fn first_view(
    window: &dyn GuestPhysMemory,
    layout: &ViewLayout,
    gvm: &dyn GuestPhysMemory,
    gvm_cr3: u64,
    buffers: &BouncePlan,
) -> Result<(View, KernelHalf), ViewError> {
    let pml4 = layout.gpa(offsets::PML4);
    let mut top = [0u8; 4096];
    let gvm_pml4 = gvm_cr3 & ADDR_FIELD;
    gvm.read_phys(gvm_pml4 + 256 * 8, &mut top[256 * 8..])
        .map_err(|source| ViewError::GvmTables {
            cr3: gvm_cr3,
            source,
        })?;
    let slot = WINDOW_SLOT * 8;
    if top[slot..slot + 8] != [0u8; 8] {
        return Err(ViewError::SlotInUse);
    }
    // Slots 256..510 hold no kernel text: no-execute as a whole. Accessed is preset on
    // every kernel slot (see `write_table`).
    for (i, entry) in (256..).zip(top[256 * 8..].chunks_exact_mut(8)) {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(entry);
        let value = u64::from_le_bytes(raw);
        if value & PTE_P != 0 {
            let nx = if i < 511 { PTE_XD } else { 0 };
            entry.copy_from_slice(&(value | PTE_A | PTE_D | nx).to_le_bytes());
        }
    }
    window.write_phys(pml4, &top).map_err(ViewError::Window)?;
    let mut pool = Pool {
        window,
        next: layout.gpa(offsets::TABLES),
        end: layout.gpa(WINDOW_SIZE),
        used: 0,
        copied: vec![gvm_pml4 & !0xfff],
    };
    confine_execution(&mut pool, pml4, gvm, gvm_cr3, layout)?;

    // Of the window, the kernel half maps only the stacks and, read-only, the CPU's
    // descriptor tables: the view's page tables and stubs have no virtual alias in the
    // view, so no code the call runs can rewrite them.
    let stacks = ViewLayout::cpu_stack_tops().map(|top| {
        (
            top - WINDOW_KVA - offsets::CPU_STACK_SIZE,
            offsets::CPU_STACK_SIZE,
        )
    });
    for (start, len) in std::iter::once((offsets::SCRATCH_STACK, offsets::STACK_SIZE)).chain(stacks)
    {
        for off in (start..start + len).step_by(0x1000) {
            pool.map(
                pml4,
                ViewLayout::kva(off),
                layout.gpa(off),
                PageSize::Size4K,
                PTE_P | PTE_RW | PTE_A | PTE_D | PTE_XD,
            )?;
        }
    }
    for off in [offsets::GDT_TSS, offsets::IDT] {
        pool.map(
            pml4,
            ViewLayout::kva(off),
            layout.gpa(off),
            PageSize::Size4K,
            PTE_P | PTE_A | PTE_D | PTE_XD,
        )?;
    }

    pool.map(
        pml4,
        TRAP_KVA,
        layout.trap_gpa(),
        PageSize::Size4K,
        PTE_P | PTE_RW | PTE_A | PTE_D | PTE_XD,
    )?;
    pool.map(
        pml4,
        KSTUB_KVA,
        layout.gpa(offsets::KSTUB),
        PageSize::Size4K,
        PTE_P | PTE_A,
    )?;
    window
        .write_phys(layout.gpa(offsets::KSTUB), &kstub_code())
        .map_err(ViewError::Window)?;
    let view = user_half(&mut pool, pml4, layout, buffers)?;
    let kernel = KernelHalf {
        gvm_cr3,
        also_exec: layout.also_exec,
        modules: layout.modules.clone(),
        copied: std::mem::take(&mut pool.copied),
        next: pool.next,
        used: pool.used,
    };
    Ok((view, kernel))
}

/// Maps the call's buffers and the stub into the user half of `pml4`, whose user entries
/// are empty, with tables from `pool`.
fn user_half(
    pool: &mut Pool<'_>,
    pml4: u64,
    layout: &ViewLayout,
    buffers: &BouncePlan,
) -> Result<View, ViewError> {
    let window = pool.window;
    // The call's buffers, at the program's addresses, in their bounce pages.
    let mut user_mappings = 0usize;
    for page in buffers.pages() {
        let gpa = layout
            .bounce_gpa
            .checked_add(page.offset)
            .filter(|_| page.offset < BOUNCE_SIZE && page.va < USER_TOP)
            .ok_or(ViewError::BounceOutOfRange {
                va: page.va,
                offset: page.offset,
            })?;
        let rw = if page.writable { PTE_RW } else { 0 };
        let flags = PTE_P | PTE_US | PTE_A | PTE_D | PTE_XD | rw;
        pool.map(pml4, page.va, gpa, PageSize::Size4K, flags)?;
        user_mappings += 1;
    }

    // The stub, in the first user slot the buffers leave empty.
    let mut stub_slot = None;
    for i in 1..256u64 {
        if window.read_u64(pml4 + i * 8).map_err(ViewError::Window)? == 0 {
            stub_slot = Some(i);
            break;
        }
    }
    let stub_va = stub_slot.ok_or(ViewError::NoStubSlot)? << 39;
    let sentinel_va = stub_va + 0x1000;
    pool.map(
        pml4,
        stub_va,
        layout.gpa(offsets::STUB),
        PageSize::Size4K,
        PTE_P | PTE_US | PTE_A,
    )?;
    pool.map(
        pml4,
        sentinel_va,
        layout.sentinel_gpa,
        PageSize::Size4K,
        PTE_P | PTE_US | PTE_RW | PTE_A | PTE_D | PTE_XD,
    )?;
    window
        .write_phys(layout.gpa(offsets::STUB), &stub_code(sentinel_va))
        .map_err(ViewError::Window)?;
    Ok(View {
        cr3: pml4,
        stub_va,
        sentinel_va,
        user_mappings,
        tables: pool.used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::ControlFlow;

    use crate::bounce::Range;
    use crate::memory::MemoryImage;
    use crate::paging::{translate, Access, PagingMode};

    const WINDOW_GPA: u64 = 0x4000_0000;

    #[test]
    fn the_layout_follows_the_guest_and_refuses_to_wrap() {
        let text = text_phys(0xffff_ffff_8100_0000, 0x80_0123).unwrap();
        assert_eq!(text, (0x100_0000, 0x180_1000));
        assert_eq!(text_phys(0xffff_8000_0000_0000, 0x1000), None);
        assert_eq!(text_phys(START_KERNEL_MAP, u64::MAX), None);
        let l = ViewLayout::for_guest(0x4000_0001, text).unwrap();
        assert_eq!(l.window_gpa, 0x8000_0000);
        assert_eq!(l.sentinel_gpa, 0x8000_0000 + WINDOW_SIZE);
        assert_eq!(l.trap_gpa(), l.sentinel_gpa + 0x1000);
        assert_eq!(l.bounce_gpa, 0x8000_0000 + BOUNCE_OFFSET);
        assert!(
            l.bounce_gpa >= l.trap_gpa() + 0x1000 && BOUNCE_OFFSET >= WINDOW_SIZE + (3 << 20),
            "the bounce area overlaps the window, the sentinel, the trap or the flush page"
        );
        assert_eq!(l.exec_text, (0xffff_ffff_8100_0000, 0xffff_ffff_8180_1000));
        assert!(l.module_copy_gpa >= l.bounce_gpa + BOUNCE_SIZE);
        assert_eq!(l.text_gpa % (2 << 20), 0);
        assert!(l.text_gpa >= l.module_copy_gpa + MODULE_COPY_SIZE);
        assert_eq!(ViewLayout::for_guest(u64::MAX - 0x1000, text), None);
        // A slide moves the executable range, not the slot; one that leaves the kernel
        // map changes nothing.
        let mut slid = l.clone();
        slid.slide_text(l.exec_text, 0x2e00_0000).unwrap();
        assert_eq!(
            slid.exec_text,
            (0xffff_ffff_af00_0000, 0xffff_ffff_af80_1000)
        );
        assert_eq!(slid.text_gpa, l.text_gpa);
        assert_eq!(slid.slide_text(l.exec_text, 0x3f00_0000), None);
        assert_eq!(slid.slide_text(l.exec_text, u64::MAX), None);
        assert_eq!(
            slid.exec_text,
            (0xffff_ffff_af00_0000, 0xffff_ffff_af80_1000)
        );
    }
    const BOUNCE_GPA: u64 = WINDOW_GPA + BOUNCE_OFFSET;

    fn layout() -> ViewLayout {
        ViewLayout {
            window_gpa: WINDOW_GPA,
            bounce_gpa: BOUNCE_GPA,
            sentinel_gpa: WINDOW_GPA + WINDOW_SIZE,
            exec_text: (0xffff_ffff_8000_0000, 0xffff_ffff_8000_3000),
            // The text's slot is the GVM's own first pages here (as a `nokaslr` GVM's
            // was, before the slot moved above GVM RAM); see
            // `a_slid_text_runs_from_the_slot_at_its_slid_addresses` for another.
            text_gpa: 0,
            also_exec: None,
            module_copy_gpa: MODULE_COPY_GPA,
            modules: Vec::new(),
        }
    }
    const MODULE_COPY_GPA: u64 = BOUNCE_GPA + BOUNCE_SIZE;

    /// The window and the GVM's low 4 MiB in one image, as the redirect VM composes them:
    /// a walk through the view needs both.
    fn composed(window: &MemoryImage, gvm: &MemoryImage) -> MemoryImage {
        composed_with(window, gvm, Vec::new())
    }

    /// [`composed`], with `more` regions above the window (the module copy area).
    fn composed_with(
        window: &MemoryImage,
        gvm: &MemoryImage,
        more: Vec<(u64, Vec<u8>)>,
    ) -> MemoryImage {
        let mut regions = vec![(WINDOW_GPA, vec![0u8; WINDOW_SIZE as usize])];
        window.read_phys(WINDOW_GPA, &mut regions[0].1).unwrap();
        let mut low = vec![0u8; 0x40_0000];
        gvm.read_phys(0, &mut low).unwrap();
        regions.insert(0, (0, low));
        regions.extend(more);
        MemoryImage::from_regions(regions).unwrap()
    }

    /// A guest with a PML4 at 0x1000 whose kernel slot 511 maps 0xffffffff80000000 → 0
    /// (2 MiB page) and whose user half maps 0x400000 → 0x200000 (4 KiB, writable).
    fn guest() -> MemoryImage {
        let mem = MemoryImage::new(0x40_0000);
        // PML4 0x1000: [0] → PDPT 0x2000, [511] → PDPT 0x3000.
        mem.write_u64(0x1000, 0x2000 | 7).unwrap();
        mem.write_u64(0x1000 + 511 * 8, 0x3000 | 3).unwrap();
        // Kernel: PDPT 0x3000 [510] → PD 0x4000 [0] → 2 MiB at 0.
        mem.write_u64(0x3000 + 510 * 8, 0x4000 | 3).unwrap();
        mem.write_u64(0x4000, 0x83).unwrap();
        // User: PDPT 0x2000 [0] → PD 0x5000 [2] → PT 0x6000 [0] → 0x200000.
        mem.write_u64(0x2000, 0x5000 | 7).unwrap();
        mem.write_u64(0x5000 + 2 * 8, 0x6000 | 7).unwrap();
        mem.write_u64(0x6000, 0x20_0000 | 7).unwrap();
        mem
    }

    /// A zeroed window at [`WINDOW_GPA`].
    fn empty_window() -> MemoryImage {
        MemoryImage::from_regions(vec![(WINDOW_GPA, vec![0; WINDOW_SIZE as usize])]).unwrap()
    }

    /// Checks that every present entry of the view's table at `table` has accessed set,
    /// and dirty where it is writable (the window is read-only to the redirect vCPU: a
    /// walk that found one without would write to it); the number of present entries.
    fn assert_preset_accessed_and_dirty(window: &MemoryImage, table: u64) -> usize {
        let mut present = 0;
        for i in 0..512u64 {
            let e = window.read_u64(table + i * 8).unwrap();
            if e & PTE_P == 0 {
                continue;
            }
            present += 1;
            assert_ne!(e & PTE_A, 0, "entry {i} of table {table:#x}: {e:#x}");
            if e & PTE_RW != 0 {
                assert_ne!(e & PTE_D, 0, "entry {i} of table {table:#x}: {e:#x}");
            }
        }
        present
    }

    fn no_buffers() -> BouncePlan {
        BouncePlan::default()
    }

    /// A call that reads 16 bytes at 0x400010 and writes 8 at 0x7f00_0000_1ff8.
    fn two_buffers() -> BouncePlan {
        let r = |addr, len, write| Range { addr, len, write };
        BouncePlan::new(&[r(0x40_0010, 16, false), r(0x7f00_0000_1ff8, 8, true)], 16).unwrap()
    }

    #[test]
    fn the_view_has_the_gvm_kernel_the_buffers_the_window_and_the_stub() {
        let window = empty_window();
        let gvm = guest();
        let mode = PagingMode::default();
        let view = build_view(&window, &layout(), &gvm, 0x1000, &two_buffers()).unwrap();
        assert_eq!(view.cr3, WINDOW_GPA);
        assert_eq!(view.user_mappings, 2);
        let composed = composed(&window, &gvm);
        let walk = |va, access| translate(&composed, &mode, view.cr3, va, access);
        assert_eq!(
            walk(0xffff_ffff_8000_1234, Access::READ).unwrap().gpa,
            0x1234
        );
        // The buffers, at the program's addresses, in their bounce pages: the read one
        // read-only, neither executable.
        assert_eq!(
            walk(0x40_0010, Access::USER_READ).unwrap().gpa,
            BOUNCE_GPA + 0x10
        );
        assert!(walk(0x40_0010, Access::USER_WRITE).is_err());
        assert_eq!(
            walk(0x7f00_0000_1ffc, Access::USER_WRITE).unwrap().gpa,
            BOUNCE_GPA + 0x1ffc
        );
        assert!(walk(0x7f00_0000_1ffc, Access::USER_EXECUTE).is_err());
        // Nothing else of the program: the guest's own user mapping at 0x400000 is gone
        // from the page next to the buffer.
        assert!(walk(0x40_1000, Access::USER_READ).is_err());
        assert!(walk(0x7f00_0000_3000, Access::USER_READ).is_err());
        assert_eq!(
            walk(TRAP_KVA, Access::WRITE).unwrap().gpa,
            WINDOW_GPA + WINDOW_SIZE + 0x1000
        );
        assert_eq!(
            walk(KSTUB_KVA, Access::EXECUTE).unwrap().gpa,
            WINDOW_GPA + offsets::KSTUB
        );
        assert!(
            walk(KSTUB_KVA, Access::WRITE).is_err(),
            "the kernel stub is read-only"
        );
        assert!(walk(KSTUB_KVA, Access::USER_EXECUTE).is_err());
        let t = walk(WINDOW_KVA + 0x2_0008, Access::WRITE).unwrap();
        assert_eq!(t.gpa, WINDOW_GPA + 0x2_0008);
        let stack = WINDOW_KVA + offsets::SCRATCH_STACK;
        assert!(walk(stack, Access::EXECUTE).is_err(), "the stack is NX");
        assert!(
            walk(stack, Access::USER_READ).is_err(),
            "the stack is kernel-only"
        );
        // The CPU's tables: read-only, never executable, kernel-only.
        for off in [offsets::GDT_TSS, offsets::IDT] {
            let at = WINDOW_KVA + off;
            assert_eq!(walk(at, Access::READ).unwrap().gpa, WINDOW_GPA + off);
            for access in [Access::WRITE, Access::EXECUTE, Access::USER_READ] {
                assert!(walk(at, access).is_err(), "{off:#x}: {access:?}");
            }
        }
        // Each private stack: its pages writable up to its top, the page below it a guard.
        for top in ViewLayout::cpu_stack_tops() {
            let off = top - WINDOW_KVA;
            assert_eq!(
                walk(top - 8, Access::WRITE).unwrap().gpa,
                WINDOW_GPA + off - 8
            );
            let bottom = top - offsets::CPU_STACK_SIZE;
            assert!(walk(bottom, Access::WRITE).is_ok());
            assert!(
                walk(bottom - 1, Access::READ).is_err(),
                "guard below {top:#x}"
            );
            assert!(walk(top - 8, Access::EXECUTE).is_err());
        }
        // Nothing else of the window has a virtual address in the view: not its tables,
        // not the stubs' code (which runs from its own read-only mappings).
        for off in [
            offsets::PML4,
            offsets::STUB,
            offsets::KSTUB,
            offsets::SCRATCH_STACK - 0x1000,
            offsets::SCRATCH_STACK + offsets::STACK_SIZE,
            offsets::WRITABLE_END,
            offsets::TABLES,
            WINDOW_SIZE - 0x1000,
        ] {
            assert!(
                walk(WINDOW_KVA + off, Access::READ).is_err(),
                "window offset {off:#x} is mapped"
            );
        }
        // Every writable mapping of the view: none reaches the window outside the stacks.
        let stack_gpa = WINDOW_GPA + offsets::SCRATCH_STACK;
        let stack_gpa = stack_gpa..WINDOW_GPA + offsets::WRITABLE_END;
        let mut writable = 0;
        crate::paging::for_each_mapping(&composed, &mode, view.cr3, 0..=u64::MAX, 4096, |m| {
            let start = m.gpa;
            let end = m.gpa + m.page_size.bytes();
            let in_window = start < WINDOW_GPA + WINDOW_SIZE && end > WINDOW_GPA;
            let stack_only = start >= stack_gpa.start && end <= stack_gpa.end;
            if m.writable {
                writable += 1;
                assert!(
                    !in_window || stack_only,
                    "writable alias of the window: {m:?}"
                );
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(
            writable >= 4,
            "the walk saw no writable mapping: {writable}"
        );
        assert_eq!(view.stub_va, 1 << 39, "first user slot without buffers");
        let beside = build_view(
            &window,
            &layout(),
            &gvm,
            0x1000,
            &BouncePlan::new(
                &[Range {
                    addr: (1 << 39) + 0x10,
                    len: 1,
                    write: false,
                }],
                1,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(beside.stub_va, 2 << 39, "the stub avoids the buffers' slot");
        let view = build_view(&window, &layout(), &gvm, 0x1000, &two_buffers()).unwrap();
        assert_eq!(
            walk(view.stub_va, Access::USER_EXECUTE).unwrap().gpa,
            WINDOW_GPA + offsets::STUB
        );
        assert_eq!(
            walk(view.sentinel_va, Access::USER_WRITE).unwrap().gpa,
            WINDOW_GPA + WINDOW_SIZE
        );
        let mut code = [0u8; 14];
        window
            .read_phys(WINDOW_GPA + offsets::STUB, &mut code)
            .unwrap();
        assert_eq!(code, stub_code(view.sentinel_va));
    }

    #[test]
    fn only_the_trusted_text_is_executable_in_the_kernel_half() {
        let gvm = guest();
        // Image PD [1]: 0xffffffff80200000 → 2 MiB at 0x200000 (past the text).
        gvm.write_u64(0x4000 + 8, 0x20_0000 | 0x83).unwrap();
        // Modules: PDPT [511] → PD 0x7000 [0] → 2 MiB at 0 (0xffffffffc0000000).
        gvm.write_u64(0x3000 + 511 * 8, 0x7000 | 3).unwrap();
        gvm.write_u64(0x7000, 0x83).unwrap();
        // Direct map: PML4 [273] → PDPT 0x8000 [0] → 1 GiB at 0.
        gvm.write_u64(0x1000 + 273 * 8, 0x8000 | 3).unwrap();
        gvm.write_u64(0x8000, 0x83).unwrap();
        let window = empty_window();
        let mode = PagingMode::default();
        let view = build_view(&window, &layout(), &gvm, 0x1000, &no_buffers()).unwrap();
        let composed = composed(&window, &gvm);
        let walk = |va, access| translate(&composed, &mode, view.cr3, va, access);
        assert_eq!(
            walk(0xffff_ffff_8000_1000, Access::EXECUTE).unwrap().gpa,
            0x1000
        );
        for va in [
            0xffff_ffff_8020_0000u64,
            0xffff_ffff_c000_0000,
            0xffff_8880_0000_0000,
        ] {
            assert!(walk(va, Access::READ).is_ok(), "{va:#x} stays readable");
            assert!(walk(va, Access::EXECUTE).is_err(), "{va:#x} is no-execute");
        }
        // The GVM's own tables are untouched: the copies are in the window.
        assert_eq!(gvm.read_u64(0x3000 + 510 * 8).unwrap(), 0x4000 | 3);
        assert_eq!(gvm.read_u64(0x1000 + 273 * 8).unwrap(), 0x8000 | 3);
    }

    /// A GVM kernel that points the text's addresses at its own patched copy (hole 1 of
    /// issue #12): through a PD entry, or through a 1 GiB page over the whole image.
    #[test]
    fn the_text_runs_from_the_trusted_pages_whatever_the_gvm_tables_say() {
        let patched_copy = 0x20_0000u64;
        let hostile_pd = guest();
        // Image PD [0]: the text's 2 MiB → the GVM's copy; PD [1] → 2 MiB of data.
        hostile_pd.write_u64(0x4000, patched_copy | 0x83).unwrap();
        hostile_pd.write_u64(0x4000 + 8, 0x20_0000 | 0x83).unwrap();
        let hostile_1g = guest();
        // Image PDPT [510]: one 1 GiB page at 1 GiB: text and data all the GVM's choice.
        hostile_1g
            .write_u64(0x3000 + 510 * 8, 0x4000_0000 | 0x83)
            .unwrap();
        let mode = PagingMode::default();
        for (gvm, data_gpa) in [(hostile_pd, 0x20_0000u64), (hostile_1g, 0x4020_0000)] {
            let window =
                MemoryImage::from_regions(vec![(WINDOW_GPA, vec![0; WINDOW_SIZE as usize])])
                    .unwrap();
            let view = build_view(&window, &layout(), &gvm, 0x1000, &no_buffers()).unwrap();
            let composed = composed(&window, &gvm);
            let walk = |va, access| translate(&composed, &mode, view.cr3, va, access);
            // Every text page leads to its own physical page: the trusted text's slot.
            for page in 0..3u64 {
                let va = 0xffff_ffff_8000_0000 + page * 0x1000 + 0x10;
                assert_eq!(walk(va, Access::EXECUTE).unwrap().gpa, page * 0x1000 + 0x10);
                assert!(walk(va, Access::WRITE).is_err(), "text is read-only");
            }
            // The rest of the text's 2 MiB is not mapped at all; the next 2 MiB keep the
            // GVM's translation (data), no-execute.
            assert!(walk(0xffff_ffff_8000_3000, Access::READ).is_err());
            assert_eq!(
                walk(0xffff_ffff_8020_0008, Access::WRITE).unwrap().gpa,
                data_gpa + 8
            );
            assert!(walk(0xffff_ffff_8020_0000, Access::EXECUTE).is_err());
        }
    }

    /// A GVM booted with KASLR: the text runs at its slid addresses, from the slot above
    /// GVM RAM; its link addresses and the GVM's own text pages are not executable.
    #[test]
    fn a_slid_text_runs_from_the_slot_at_its_slid_addresses() {
        let gvm = guest();
        // Image PD [1]: the GVM's slid text, 2 MiB at guest-physical 0x20_0000.
        gvm.write_u64(0x4000 + 8, 0x20_0000 | 0x83).unwrap();
        let window =
            MemoryImage::from_regions(vec![(WINDOW_GPA, vec![0; WINDOW_SIZE as usize])]).unwrap();
        let slot = 0x1_0000_0000u64;
        let mut slid = ViewLayout {
            text_gpa: slot,
            ..layout()
        };
        let link = slid.exec_text;
        slid.slide_text(link, 0x20_0000).unwrap();
        let view = build_view(&window, &slid, &gvm, 0x1000, &no_buffers()).unwrap();
        let image = composed(&window, &gvm);
        let mode = PagingMode::default();
        let walk = |va, access| translate(&image, &mode, view.cr3, va, access);
        for page in 0..3u64 {
            let va = 0xffff_ffff_8020_0000 + page * 0x1000 + 0x10;
            assert_eq!(
                walk(va, Access::EXECUTE).unwrap().gpa,
                slot + page * 0x1000 + 0x10
            );
            assert!(walk(va, Access::WRITE).is_err(), "text is read-only");
        }
        assert!(walk(0xffff_ffff_8000_0000, Access::EXECUTE).is_err());
        assert!(walk(0xffff_ffff_8020_3000, Access::READ).is_err());

        // A text that the slide puts across a 2 MiB boundary: both regions get the
        // view's own tables, and the pages follow each other in the slot.
        let mut across = ViewLayout {
            text_gpa: slot,
            exec_text: (0xffff_ffff_801f_e000, 0xffff_ffff_8020_2000),
            ..layout()
        };
        across.slide_text(across.exec_text, 0x20_0000).unwrap();
        let window = empty_window();
        let view = build_view(&window, &across, &gvm, 0x1000, &no_buffers()).unwrap();
        let image = composed(&window, &gvm);
        let walk = |va, access| translate(&image, &mode, view.cr3, va, access);
        for page in 0..4u64 {
            let va = 0xffff_ffff_803f_e000 + page * 0x1000;
            assert_eq!(walk(va, Access::EXECUTE).unwrap().gpa, slot + page * 0x1000);
        }
        assert!(walk(0xffff_ffff_803f_d000, Access::READ).is_err());
        assert!(walk(0xffff_ffff_8040_2000, Access::READ).is_err());
    }

    #[test]
    fn one_more_range_can_be_left_executable_to_the_page() {
        let gvm = guest();
        // Modules: PDPT [511] → PD 0x7000 [0] → PT 0x9000: two 4 KiB pages, at 0x1000 and
        // 0x2000 (0xffffffffc0000000 and ..1000).
        gvm.write_u64(0x3000 + 511 * 8, 0x7000 | 3).unwrap();
        gvm.write_u64(0x7000, 0x9000 | 3).unwrap();
        gvm.write_u64(0x9000, 0x1000 | 3).unwrap();
        gvm.write_u64(0x9008, 0x2000 | 3).unwrap();
        let window = empty_window();
        let mode = PagingMode::default();
        let layout = ViewLayout {
            also_exec: Some((0xffff_ffff_c000_1000, 0xffff_ffff_c000_2000)),
            ..layout()
        };
        let view = build_view(&window, &layout, &gvm, 0x1000, &no_buffers()).unwrap();
        let composed = composed(&window, &gvm);
        let walk = |va, access| translate(&composed, &mode, view.cr3, va, access);
        assert!(walk(0xffff_ffff_c000_0000, Access::EXECUTE).is_err());
        assert_eq!(
            walk(0xffff_ffff_c000_1000, Access::EXECUTE).unwrap().gpa,
            0x2000
        );
        assert!(walk(0xffff_ffff_c000_0000, Access::READ).is_ok());
        assert_eq!(
            gvm.read_u64(0x9000).unwrap(),
            0x1000 | 3,
            "GVM tables untouched"
        );
    }

    #[test]
    fn a_verified_module_runs_from_its_copy_and_its_neighbours_stay_no_execute() {
        let gvm = guest();
        // Modules: PDPT [511] → PD 0x7000: [0] → PT 0x9000 with three 4 KiB pages (0x1000,
        // 0x2000, 0x3000 at 0xffffffffc0000000..3000); [1] a 2 MiB page at 0x200000.
        gvm.write_u64(0x3000 + 511 * 8, 0x7000 | 3).unwrap();
        gvm.write_u64(0x7000, 0x9000 | 3).unwrap();
        gvm.write_u64(0x7008, 0x20_0000 | 0x83).unwrap();
        for k in 0..3u64 {
            gvm.write_u64(0x9000 + k * 8, (0x1000 * (k + 1)) | 3)
                .unwrap();
        }
        let window = empty_window();
        let mode = PagingMode::default();
        let copy = |start: u64, pages: u64, copy: u64| ModuleCopy {
            start,
            end: start + pages * 0x1000,
            copy,
        };
        let with_modules = ViewLayout {
            // The module's text: the second page; and one page of the 2 MiB page.
            modules: vec![
                copy(0xffff_ffff_c000_1000, 1, MODULE_COPY_GPA),
                copy(0xffff_ffff_c020_5000, 1, MODULE_COPY_GPA + 0x1000),
            ],
            ..layout()
        };
        let view = build_view(&window, &with_modules, &gvm, 0x1000, &no_buffers()).unwrap();
        let composed = composed_with(&window, &gvm, vec![(MODULE_COPY_GPA, vec![0u8; 0x2000])]);
        let walk = |va, access| translate(&composed, &mode, view.cr3, va, access);
        let text = walk(0xffff_ffff_c000_1234, Access::EXECUTE).unwrap();
        assert_eq!(
            text.gpa,
            MODULE_COPY_GPA + 0x234,
            "the copy, not the GVM's page"
        );
        assert!(
            walk(0xffff_ffff_c000_1234, Access::WRITE).is_err(),
            "read-only"
        );
        assert_eq!(
            walk(0xffff_ffff_c020_5010, Access::EXECUTE).unwrap().gpa,
            MODULE_COPY_GPA + 0x1010
        );
        // Its neighbours keep the GVM's translation, no-execute: data stays reachable.
        for (va, gpa) in [
            (0xffff_ffff_c000_0000, 0x1000),
            (0xffff_ffff_c000_2000, 0x3000),
            (0xffff_ffff_c020_4000, 0x20_4000),
            (0xffff_ffff_c020_6000, 0x20_6000),
        ] {
            assert_eq!(walk(va, Access::WRITE).unwrap().gpa, gpa, "{va:#x}");
            assert!(walk(va, Access::EXECUTE).is_err(), "{va:#x}");
        }
        assert!(walk(0xffff_ffff_c040_0000, Access::READ).is_err());
        // A module copy outside the module area is refused.
        let outside = ViewLayout {
            modules: vec![copy(0xffff_ffff_8000_1000, 1, MODULE_COPY_GPA)],
            ..layout()
        };
        assert!(matches!(
            build_view(&window, &outside, &gvm, 0x1000, &no_buffers()),
            Err(ViewError::ModuleOutsideArea)
        ));
        // The set of modules is part of an epoch: another set starts a new one.
        let mut tables = ViewTables::default();
        let build = |t: &mut ViewTables, l: &ViewLayout| {
            t.build(&window, l, &gvm, 0x1000, &no_buffers()).unwrap().1
        };
        assert!(build(&mut tables, &with_modules));
        assert!(!build(&mut tables, &with_modules));
        assert!(build(&mut tables, &layout()));
    }

    #[test]
    fn a_gvm_using_the_window_slot_is_refused() {
        let window = empty_window();
        let gvm = guest();
        gvm.write_u64(0x1000 + (WINDOW_SLOT as u64) * 8, 0x7000 | 3)
            .unwrap();
        let err = build_view(&window, &layout(), &gvm, 0x1000, &no_buffers()).unwrap_err();
        assert!(matches!(err, ViewError::SlotInUse), "{err}");
    }

    #[test]
    fn unreadable_tables_are_errors_not_panics() {
        let window = empty_window();
        let err = build_view(&window, &layout(), &guest(), 0x7fff_f000, &no_buffers()).unwrap_err();
        assert!(matches!(err, ViewError::GvmTables { .. }), "{err}");
    }

    #[test]
    fn buffers_past_the_bounce_area_or_filling_the_pool_are_errors() {
        let window = empty_window();
        let pages = (BOUNCE_SIZE / 0x1000) as usize;
        let past = BouncePlan::new(
            &[Range {
                addr: 0x1000,
                len: BOUNCE_SIZE + 0x1000,
                write: false,
            }],
            pages + 1,
        )
        .unwrap();
        let err = build_view(&window, &layout(), &guest(), 0x1000, &past).unwrap_err();
        assert!(
            matches!(err, ViewError::BounceOutOfRange { va, .. } if va == 0x1000 + BOUNCE_SIZE),
            "{err}"
        );
        // One page in each of 1024 PDs: a PT page for each, more than the pool holds.
        let scattered: Vec<Range> = (0..1024u64)
            .map(|i| Range {
                addr: (1 << 21) * (i + 1),
                len: 1,
                write: true,
            })
            .collect();
        let plan = BouncePlan::new(&scattered, 1024).unwrap();
        let err = build_view(&window, &layout(), &guest(), 0x1000, &plan).unwrap_err();
        assert!(matches!(err, ViewError::PoolExhausted(_)), "{err}");
    }

    /// The window's table pages a view may use: its PML4 and the pool up to `view.tables`.
    fn table_pages(window: &MemoryImage, view: &View) -> Vec<(u64, Vec<u8>)> {
        let pool = WINDOW_GPA + offsets::TABLES;
        std::iter::once(WINDOW_GPA)
            .chain((pool..pool + view.tables * 4096).step_by(4096))
            .map(|gpa| {
                let mut page = vec![0u8; 4096];
                window.read_phys(gpa, &mut page).unwrap();
                (gpa, page)
            })
            .collect()
    }

    #[test]
    fn a_later_view_of_an_epoch_rewrites_no_table_an_earlier_one_uses() {
        let window = empty_window();
        let gvm = guest();
        let mode = PagingMode::default();
        let mut tables = ViewTables::default();
        let (first, new_epoch) = tables
            .build(&window, &layout(), &gvm, 0x1000, &two_buffers())
            .unwrap();
        assert!(new_epoch);
        assert_eq!(first.cr3, WINDOW_GPA);
        let before = table_pages(&window, &first);
        let other = BouncePlan::new(
            &[Range {
                addr: 0x6000_0000,
                len: 8,
                write: true,
            }],
            16,
        )
        .unwrap();
        let (second, new_epoch) = tables
            .build(&window, &layout(), &gvm, 0x1000, &other)
            .unwrap();
        assert!(!new_epoch, "same GVM CR3, nothing written: the same epoch");
        assert_ne!(second.cr3, first.cr3, "a PML4 of its own");
        assert!(second.tables > first.tables);
        assert_eq!(
            table_pages(&window, &first),
            before,
            "an earlier table changed"
        );
        let composed = composed(&window, &gvm);
        let walk = |cr3, va, access| translate(&composed, &mode, cr3, va, access);
        // The kernel half is the same; the user half is the second call's alone.
        for va in [0xffff_ffff_8000_1234, TRAP_KVA, KSTUB_KVA] {
            assert_eq!(
                walk(second.cr3, va, Access::READ).map(|t| t.gpa).ok(),
                walk(first.cr3, va, Access::READ).map(|t| t.gpa).ok(),
                "{va:#x}"
            );
        }
        assert!(walk(second.cr3, 0xffff_ffff_8060_0000, Access::EXECUTE).is_err());
        assert_eq!(
            walk(second.cr3, 0x6000_0004, Access::USER_WRITE)
                .unwrap()
                .gpa,
            BOUNCE_GPA + 4
        );
        assert!(walk(second.cr3, 0x40_0010, Access::USER_READ).is_err());
        assert!(walk(second.cr3, 0x7f00_0000_1ff8, Access::USER_READ).is_err());
        assert_eq!(
            walk(second.cr3, second.stub_va, Access::USER_EXECUTE)
                .unwrap()
                .gpa,
            WINDOW_GPA + offsets::STUB
        );
        // Every entry of the second view's own tables is preset, like the first's.
        let pool = WINDOW_GPA + offsets::TABLES;
        let own = (pool + first.tables * 4096..pool + second.tables * 4096).step_by(4096);
        let present: usize = own
            .map(|table| assert_preset_accessed_and_dirty(&window, table))
            .sum();
        assert!(present > 8, "only {present} entries");
    }

    #[test]
    fn an_epoch_ends_when_what_its_kernel_half_copied_may_have_changed() {
        let window = empty_window();
        let gvm = guest();
        let mut tables = ViewTables::default();
        let build = |t: &mut ViewTables, cr3, layout: &ViewLayout| {
            t.build(&window, layout, &gvm, cr3, &two_buffers())
                .unwrap()
                .1
        };
        assert!(build(&mut tables, 0x1000, &layout()));
        assert!(!build(&mut tables, 0x1000, &layout()));
        // A call wrote pages the kernel half did not copy (the user tables, data).
        tables.forget_if_written(&[(0x2000, 0x1000), (0x5000, 0x2000), (0x20_0000, 0x1000)]);
        assert!(!build(&mut tables, 0x1000, &layout()));
        // ... or the GVM's PML4 (0x1000), or the slot-511 PDPT it copied (0x3000).
        for page in [0x1000, 0x3000] {
            tables.forget_if_written(&[(0x20_0000, 0x1000), (page, 0x1000)]);
            assert!(build(&mut tables, 0x1000, &layout()), "{page:#x}");
        }
        tables.forget_if_written(&[(0, 0x10_0000)]);
        assert!(
            build(&mut tables, 0x1000, &layout()),
            "a run that covers them"
        );
        tables.forget();
        assert!(build(&mut tables, 0x1000, &layout()), "forgotten");
        // Another CR3 (same tables here), or another executable range.
        assert!(build(&mut tables, 0x1000 | 0x18, &layout()));
        let extra = ViewLayout {
            also_exec: Some((0xffff_ffff_8000_1000, 0xffff_ffff_8000_2000)),
            ..layout()
        };
        assert!(build(&mut tables, 0x1000 | 0x18, &extra));
        assert!(!build(&mut tables, 0x1000 | 0x18, &extra));
        assert!(build(&mut tables, 0x1000 | 0x18, &layout()));
    }

    #[test]
    fn a_full_pool_starts_a_new_epoch_instead_of_failing() {
        let window = empty_window();
        let gvm = guest();
        let pool_pages = (WINDOW_SIZE - offsets::TABLES) / 4096;
        let mut tables = ViewTables::default();
        let mut epochs = 0;
        let mut views = 0;
        while epochs < 3 {
            let (view, new_epoch) = tables
                .build(&window, &layout(), &gvm, 0x1000, &two_buffers())
                .unwrap();
            assert!(view.tables <= pool_pages);
            epochs += usize::from(new_epoch);
            views += 1;
            assert!(views < 10 * pool_pages as usize, "no new epoch ever");
        }
        // Each later view takes a PML4 and a few tables for its two buffers and the stub.
        assert!(views > 2 * 50, "only {views} views in two epochs");
    }

    #[test]
    fn every_table_entry_the_view_writes_is_accessed_and_leaves_dirty() {
        // The window is read-only to the redirect vCPU: a walk that found an entry without
        // accessed (or a leaf without dirty) would write to it.
        let gvm = guest();
        gvm.write_u64(0x1000 + 273 * 8, 0x8000 | 3).unwrap();
        gvm.write_u64(0x8000, 0x83).unwrap();
        gvm.write_u64(0x3000 + 511 * 8, 0x7000 | 3).unwrap();
        gvm.write_u64(0x7000, 0x9000 | 3).unwrap();
        gvm.write_u64(0x9000, 0x1000 | 3).unwrap();
        let window = empty_window();
        let layout = ViewLayout {
            also_exec: Some((0xffff_ffff_c000_0000, 0xffff_ffff_c000_1000)),
            ..layout()
        };
        let view = build_view(&window, &layout, &gvm, 0x1000, &two_buffers()).unwrap();
        let tables =
            WINDOW_GPA + offsets::TABLES..WINDOW_GPA + offsets::TABLES + view.tables * 4096;
        let checked: usize = std::iter::once(WINDOW_GPA)
            .chain(tables.step_by(4096))
            .map(|table| assert_preset_accessed_and_dirty(&window, table))
            .sum();
        assert!(checked > 20, "only {checked} entries");
        // A GVM without PML4[511]: the view makes that entry itself (found by the
        // `view_builder` fuzz target without dirty).
        gvm.write_u64(0x1000 + 511 * 8, 0).unwrap();
        build_view(&window, &layout, &gvm, 0x1000, &two_buffers()).unwrap();
        let e = window.read_u64(WINDOW_GPA + 511 * 8).unwrap();
        assert_eq!(e & (PTE_P | PTE_A | PTE_D), PTE_P | PTE_A | PTE_D, "{e:#x}");
    }
}
