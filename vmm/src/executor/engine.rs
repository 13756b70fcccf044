//! The redirect VM: a KVM VM of its own whose memslots compose a call's view — GVM RAM at
//! its own addresses (mapped copy-on-write, `cow.rs`); above it the private window,
//! read-only but for its stacks; the bounce area that carries the call's user buffers (no
//! SVM memory at all: `redirect::bounce`); the verified modules' text and the kernel text,
//! a read-only copy of the SVM's trusted text moved by the GVM's KASLR slide — and one
//! vCPU that runs calls as a lent GVM CPU. Everything here touches KVM; what is written
//! into guest memory is computed in the `redirect` crate and in `regs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_regs, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use redirect::bounce::{BouncePlan, Range, BOUNCE_SIZE};
use redirect::call_profile::CallProfile;
use redirect::cpu_tables::{self, IDT_SIZE};
use redirect::kaslr;
use redirect::memory::Relocated;
use redirect::paging::{AddressSpace, PagingMode, Privilege, DEFAULT_MAX_PHYS_BITS};
use redirect::profile::KernelImage;
use redirect::shadow::ShadowBlock;
use redirect::stores::{Store, StoreSites};
use redirect::traps::{self, Args, Placed, Trap};
use redirect::view::{
    offsets, text_phys, View, ViewLayout, ViewTables, KSTUB_KVA, MODULE_COPY_SIZE,
    START_KERNEL_MAP, WINDOW_KVA, WINDOW_SIZE,
};
use redirect::GuestPhysMemory;
use svm_runtime::redirect_abi::BufferRange;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::cow::{CowError, CowRam};
use super::error::{kvm, Error, RunError, SlideRefusal, Unavailable};
use super::regs::{self, TrustedControl};
use super::timing::{Phase, PhaseTimes};
use super::trusted_modules::{verify_gvm, Twins, Verified};
use super::Parts;
use crate::boot::cpu::MSR_IA32_TSC;
use crate::boot::{cpu, cpuid};
use crate::vstate::memory::{create_guest_memory, GuestMemory, SharedMemory};
use crate::vstate::mmu::HostMmu;
use crate::vstate::quiesce::ControlState;
use crate::vstate::vm::{kvm_err, Vm, VmError};
use crate::vstate::watchdog::Watchdog;

/// How long one run of the redirect vCPU may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const KVM_MP_STATE_RUNNABLE: u32 = 0;
/// x86 Linux's reschedule IPI vector (`RESCHEDULE_VECTOR`).
const RESCHEDULE_VECTOR: u32 = 0xfd;
/// MSI address of the local APICs (destination APIC id in bits 12..19).
const MSI_APIC_BASE: u32 = 0xfee0_0000;
/// The stack the executor's own kernel-function calls run on, in the window.
const SCRATCH_STACK_TOP: u64 = offsets::SCRATCH_STACK + offsets::STACK_SIZE;
/// Of the places the relocation table names in the text, how many (per mille) must hold
/// the trusted bytes moved by the slide a GVM's LSTAR claims. A wrong slide (both slides
/// 2 MiB-aligned, inside the map) changes every 32-bit place, so nearly none agree; a GVM
/// that patched or hooked some functions of its text (a rootkit, ftrace, live patches) has
/// them disagree in those functions only: the pinned image's text has 69,213 places.
const SLIDE_AGREEMENT_PER_MILLE: usize = 900;
/// Bytes of the text a GVM whose kernel cannot move must hold at its link address.
const UNMOVED_SAMPLE: usize = 256 << 10;

/// How the engine found the GVM's slide (`info`'s `redirect_kernel_slide_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlideFound {
    /// Where the GVM CPU's LSTAR said.
    Lstar,
    /// By trying the kernel map's 2 MiB steps: LSTAR said otherwise (a hooked entry).
    Search,
    /// The image has no relocation table: its kernel cannot move.
    Fixed,
}

impl SlideFound {
    pub fn name(self) -> &'static str {
        match self {
            SlideFound::Lstar => "lstar",
            SlideFound::Search => "search",
            SlideFound::Fixed => "fixed",
        }
    }
}

/// How a run of the redirect vCPU ended when the call did not return.
pub(super) enum Stop {
    /// At a trap, with the trapped function's first four arguments.
    Trap(Trap, Args),
    Failed(Error),
}

impl<E: Into<Error>> From<E> for Stop {
    fn from(e: E) -> Stop {
        Stop::Failed(e.into())
    }
}

/// Where the redirect vCPU starts.
pub(super) enum Entry<'a> {
    /// At the stub, in user mode: `syscall` with the program's registers.
    Syscall(&'a kvm_regs),
    /// At a kernel function, in kernel mode, returning to the kernel stub.
    Function { address: u64, args: [u64; 2] },
}

/// The GVM CPU a run borrows: its control state and per-cpu base.
#[derive(Clone, Copy)]
pub(super) struct AsCpu<'a> {
    /// The GVM CPU's number.
    pub cpu: u8,
    pub control: &'a ControlState,
    pub pcpu_base: u64,
    /// Whether the GVM ran since the last run (a hold's first call): the vCPU's TSC is
    /// set to the CPU's (else it counts on from the last run, as the GVM's does) and the
    /// view's tables start a new epoch.
    pub after_gvm_ran: bool,
}

/// Exit counters of a run: its own, and port I/O (the GVM's console) apart.
pub(super) struct Counters<'a> {
    pub exits: &'a AtomicU64,
    pub console: &'a AtomicU64,
    /// Where the time goes: the view, the flush and the run are timed here.
    pub phases: &'a PhaseTimes,
}

pub(super) struct Engine {
    vm: Vm,
    vcpu: VcpuFd,
    window: SharedMemory,
    /// The bounce area: the current call's user buffers, copied in from the program.
    bounce: SharedMemory,
    /// The current call's bounce pages (empty between calls).
    buffers: BouncePlan,
    /// The module a `delete_module` call names (read from the program when it began).
    pub removing: Option<String>,
    pub layout: ViewLayout,
    pub parts: Parts,
    /// The kernel text the redirect vCPU runs.
    text: TextSlot,
    /// The GVM kernel's KASLR slide, once learnt and checked ([`Engine::learn_slide`]);
    /// no call runs before.
    slide: Option<u64>,
    /// How it was found.
    slide_found: Option<SlideFound>,
    /// The trusted SVM kernel's `idt_table` (kernel-virtual, from [`Engine::trust`]): the
    /// view's IDT is made from it once the slide is known.
    idt_table: u64,
    /// GVM RAM, mapped copy-on-write: a call's stores are committed or dropped as a whole.
    cow: CowRam,
    /// Where the shadow task lives in GVM memory, once made (at the first call).
    pub shadow: Option<ShadowBlock>,
    /// Set when a call was left parked in the GVM kernel: calls are refused from then on.
    pub stopped: bool,
    /// The control state every run uses: the trusted SVM kernel's, learnt at the first
    /// call (see `regs`), with the CPU's tables in the window ([`Engine::trust`]).
    trusted: Option<TrustedControl>,
    /// The view's page tables, kept for the calls of an epoch.
    views: ViewTables,
    /// The host KVM's MMU: the tables are kept across calls only under shadow paging.
    host_mmu: HostMmu,
    /// The modules whose text the view runs: their twins in the SVM and this epoch's
    /// check of the GVM's (`trusted_modules`).
    modules: ModuleTrust,
    /// A spare one-page slot, deleted and re-added at each new epoch of the view's tables:
    /// deleting a memslot makes KVM drop every shadow page and TLB entry of the VM. Between
    /// epochs the view's tables are rewritten by the VMM and the GVM's kernel tables by
    /// the GVM, both behind this VM's back, so nothing it cached may survive.
    flush_slot: (u32, u64, u64),
    watchdog: Arc<Watchdog>,
}

/// The kernel text of the view: a read-only slot above GVM RAM
/// ([`ViewLayout::text_gpa`]) that holds, from the first call on, a private copy of the
/// SVM's text moved by the GVM's slide, in which `__schedule` is patched to exit: a call
/// that would sleep must stop before it switches the borrowed CPU to another task
/// (hardware breakpoints would do too, but nested TCG does not deliver them).
struct TextSlot {
    /// Guest-physical start of the text in the SVM (its link address less
    /// `__START_KERNEL_map`: the SVM boots `nokaslr`).
    svm_gpa: u64,
    size: u64,
    copy: SharedMemory,
    /// The SVM's text moved by the slide, from [`Engine::learn_slide`] until the traps are
    /// patched into it and it is written to the slot.
    moved: Option<Vec<u8>>,
    filled: bool,
}

/// The trusted modules' twins (read at the first call) and what the current epoch
/// verified, with the read-only area the verified text is copied to.
struct ModuleTrust {
    twins: Option<Twins>,
    verified: Verified,
    /// `verified.summary()`, made once a check.
    summary: String,
    area: SharedMemory,
}

/// The image's `.text` as guest-physical [start, end), page-aligned.
pub(super) fn text_range(image: &KernelImage) -> Result<(u64, u64), Unavailable> {
    let (link, size) = image.text;
    text_phys(link, size).ok_or(Unavailable::Text {
        start: link,
        end: link.saturating_add(size),
        why: "not in the kernel-image map",
    })
}

fn set_slot(
    vm: &Vm,
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host..host+size` lies inside a mapping of GVM, SVM or window memory that the
    // executor keeps alive (it owns clones of the memory objects, and guest memory is never
    // unmapped before the process exits); the slots do not overlap (built below from
    // disjoint ranges).
    unsafe { vm.fd.set_user_memory_region(region) }
}

/// (guest-physical start, length, host address) of each region of `mem`.
fn host_ranges(mem: &GuestMemory) -> Result<Vec<(u64, u64, u64)>, Unavailable> {
    mem.iter()
        .map(|r| {
            let start = r.start_addr().raw_value();
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| Unavailable::Unmapped(start))?;
            Ok((start, r.len(), host as u64))
        })
        .collect()
}

/// Host address of the first byte of `mem`, a VMM memfd of one region (the window, the
/// bounce area, the text copy).
fn host_base(mem: &GuestMemory) -> Result<u64, Unavailable> {
    host_ranges(mem)?
        .first()
        .map(|r| r.2)
        .ok_or(Unavailable::Unmapped(0))
}

/// Hands out the redirect VM's memslots in order.
struct Slots<'a> {
    vm: &'a Vm,
    next: u32,
}

impl Slots<'_> {
    /// Adds a slot (none for an empty range); returns the number it used.
    fn add(&mut self, gpa: u64, size: u64, host: u64, flags: u32) -> Result<u32, Unavailable> {
        if size > 0 {
            set_slot(self.vm, self.next, gpa, size, host, flags).map_err(Unavailable::Slot)?;
            self.next += 1;
        }
        Ok(self.next.saturating_sub(1))
    }

    /// Adds GVM RAM [gpa, gpa+size) from the private mapping, with dirty logging.
    fn add_ram(&mut self, cow: &mut CowRam, gpa: u64, size: u64) -> Result<(), Unavailable> {
        if size == 0 {
            return Ok(());
        }
        let piece = cow
            .add_piece(self.next, gpa, size)
            .map_err(Unavailable::Cow)?;
        self.add(gpa, size, piece.private, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(())
    }
}

impl Engine {
    /// Builds the redirect VM for an instance whose kernel text is GVM-physical
    /// `text` = [start, end).
    pub fn new(
        vm: Vm,
        text: (u64, u64),
        parts: Parts,
        watchdog: Arc<Watchdog>,
        host_mmu: HostMmu,
    ) -> Result<Engine, Unavailable> {
        vm.fd
            .set_tss_address(crate::boot::layout::KVM_TSS_ADDR)
            .map_err(kvm_err("set TSS address"))?;
        // A LAPIC so that what the lent CPU does to its APIC (IPIs, EOIs) goes nowhere.
        vm.fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let gvm = host_ranges(&parts.gvm_mem)?;
        // Of the SVM, the redirect VM maps nothing: the text slot holds a copy of its text.
        let (text_lo, text_hi) = text;
        let text_error = |why| Unavailable::Text {
            start: text_lo,
            end: text_hi,
            why,
        };
        let in_svm = host_ranges(&parts.svm_mem)?
            .iter()
            .any(|&(g, l, _)| text_lo >= g && text_hi <= g + l);
        if !in_svm {
            return Err(text_error("not in the SVM's memory"));
        }
        let gvm_end = gvm.iter().map(|(g, l, _)| g + l).max().unwrap_or(0);
        let layout = ViewLayout::for_guest(gvm_end, text)
            .ok_or_else(|| text_error("past the end of the redirect VM's address space"))?;
        let mut cow = CowRam::map(&parts.gvm_mem).map_err(Unavailable::Cow)?;
        let mut slots = Slots { vm: &vm, next: 0 };
        for &(gpa, len, _) in &gvm {
            slots.add_ram(&mut cow, gpa, len)?;
        }
        let window = create_guest_memory("exterior-redirect-window", WINDOW_SIZE)?;
        let text_copy = create_guest_memory("exterior-redirect-text", text_hi - text_lo)?;
        let text_host = host_base(&text_copy.mem)?;
        slots.add(
            layout.text_gpa,
            text_hi - text_lo,
            text_host,
            KVM_MEM_READONLY,
        )?;
        let window_host = host_base(&window.mem)?;
        // The window is read-only to the redirect vCPU but for its stacks: a GVM page
        // table that maps the window's page tables, stubs or CPU tables (any GVM table may
        // name any guest-physical page) cannot change them; a store there exits and fails
        // the call.
        let stack = (offsets::SCRATCH_STACK, offsets::WRITABLE_END);
        for (start, end, flags) in [
            (0, stack.0, KVM_MEM_READONLY),
            (stack.0, stack.1, 0),
            (stack.1, WINDOW_SIZE, KVM_MEM_READONLY),
        ] {
            slots.add(
                layout.window_gpa + start,
                end - start,
                window_host + start,
                flags,
            )?;
        }
        let bounce = create_guest_memory("exterior-redirect-bounce", BOUNCE_SIZE)?;
        let bounce_host = host_base(&bounce.mem)?;
        slots.add(layout.bounce_gpa, BOUNCE_SIZE, bounce_host, 0)?;
        // The verified modules' text, read-only: the view runs these copies, which neither
        // the GVM nor a store of the call can change (`trusted_modules`).
        let module_area = create_guest_memory("exterior-redirect-modules", MODULE_COPY_SIZE)?;
        let module_host = host_base(&module_area.mem)?;
        slots.add(
            layout.module_copy_gpa,
            MODULE_COPY_SIZE,
            module_host,
            KVM_MEM_READONLY,
        )?;
        let flush_gpa = layout.sentinel_gpa + (2 << 20);
        let flush_slot = (
            slots.add(flush_gpa, 0x1000, window_host, KVM_MEM_READONLY)?,
            flush_gpa,
            window_host,
        );
        let vcpu = Self::create_vcpu(&vm, parts.spare_cpu)?;
        Ok(Engine {
            vm,
            vcpu,
            window,
            bounce,
            buffers: BouncePlan::default(),
            removing: None,
            layout,
            parts,
            text: TextSlot {
                svm_gpa: text_lo,
                size: text_hi - text_lo,
                copy: text_copy,
                moved: None,
                filled: false,
            },
            slide: None,
            slide_found: None,
            idt_table: 0,
            cow,
            shadow: None,
            trusted: None,
            stopped: false,
            views: ViewTables::default(),
            modules: ModuleTrust {
                twins: None,
                verified: Verified::default(),
                summary: String::new(),
                area: module_area,
            },
            host_mmu,
            flush_slot,
            watchdog,
        })
    }

    /// Makes `control` (the trusted SVM kernel's, checked; its LSTAR moved by the GVM's
    /// slide in each run) the control state of every run, and the SVM kernel's `idt_table`
    /// (kernel-virtual) the source of the view's IDT ([`Engine::learn_slide`]).
    pub fn trust(&mut self, control: TrustedControl, idt_table: u64) {
        self.trusted = Some(control);
        self.idt_table = idt_table;
    }

    /// Writes the CPU's tables into the window, once the GVM's slide is known: the IDT
    /// checked from the SVM kernel's `idt_table`, its handlers moved by the slide, and the
    /// TSS built (`redirect::cpu_tables`); the GDT is the lent CPU's, written for each run
    /// ([`Engine::lend_gdt`]). The GVM's own tables are never used.
    fn write_cpu_tables(&self, slide: u64) -> Result<(), Error> {
        let idt_table = self.idt_table;
        let phys = idt_table
            .checked_sub(START_KERNEL_MAP)
            .ok_or(Error::IdtAddress(idt_table))?;
        let mut trusted = vec![0u8; IDT_SIZE];
        self.parts.svm_mem.read_phys(phys, &mut trusted)?;
        let link = self.text_link();
        let idt = cpu_tables::checked_idt(&trusted, link, slide)?;
        if !idt.left_out.is_empty() {
            log::info!(
                "redirect: IDT vectors whose handler is not in the trusted text (boot \
                 handlers the kernel never replaced) are not present in the view: {:x?}",
                idt.left_out
            );
        }
        let window = &self.window.mem;
        window.write_phys(offsets::IDT, &idt.table)?;
        window.write_phys(
            offsets::GDT_TSS + offsets::TSS_IN_PAGE,
            &cpu_tables::tss(ViewLayout::cpu_stack_tops()),
        )?;
        Ok(())
    }

    /// The text's link addresses [start, end), page-rounded.
    fn text_link(&self) -> (u64, u64) {
        let start = START_KERNEL_MAP + self.text.svm_gpa;
        (start, start + self.text.size)
    }

    /// The GVM kernel's KASLR slide (0 for a `nokaslr` GVM), learnt once from a held GVM
    /// CPU's `control`, and how it was found. The slide its LSTAR claims
    /// ([`kaslr::virtual_slide`]) is tried first, then every other 2 MiB step that keeps
    /// the image in the kernel map (a rootkit may have hooked LSTAR): a slide is believed
    /// when the GVM's text, read through that CPU's tables at the slid addresses, holds the
    /// trusted text moved by it (the SVM image's relocation table) at nearly every place
    /// the table names ([`SLIDE_AGREEMENT_PER_MILLE`]), first over a sample, then over the
    /// whole text ([`kaslr::find_slide`]). Then the view's text is that moved copy,
    /// executable at the slid addresses, and its IDT's handlers are moved alike. `profile`
    /// is the trusted kernel's, at its link addresses. Nothing the GVM says decides what
    /// code runs: only where the trusted copy is placed. A kernel without a relocation
    /// table (a vmlinux linked as such, not extracted from a bzImage) cannot move: its
    /// slide is 0, once its text is found there.
    pub fn learn_slide(
        &mut self,
        profile: &CallProfile,
        control: &ControlState,
    ) -> Result<(u64, SlideFound), Error> {
        if let Some(found) = self.slide.zip(self.slide_found) {
            return Ok(found);
        }
        let link = self.text_link();
        // The text fits in guest memory, hence in usize.
        let mut moved = vec![0u8; self.text.size as usize];
        self.parts
            .svm_mem
            .read_phys(self.text.svm_gpa, &mut moved)?;
        let entry = profile.kernel.symbols.entry_syscall_64;
        let mode = PagingMode::from_control_regs(
            control.cr0,
            control.cr4,
            control.efer,
            DEFAULT_MAX_PHYS_BITS,
        );
        let gvm_mem = &self.parts.gvm_mem;
        let read = |va: u64, buf: &mut [u8]| {
            mode.as_ref().is_ok_and(|mode| {
                let gvm = AddressSpace::new(gvm_mem, *mode, control.cr3);
                gvm.read(va, buf, Privilege::Supervisor).is_ok()
            })
        };
        let refusal = |claim: String| SlideRefusal::NotFound {
            lstar: control.lstar,
            claim,
            min_per_mille: SLIDE_AGREEMENT_PER_MILLE,
        };
        let (slide, found) = match &self.parts.relocs {
            Err(_) => {
                // The GVM's text must be the trusted one where it cannot but be.
                let sample = &moved[..moved.len().min(UNMOVED_SAMPLE)];
                let mut theirs = vec![0u8; sample.len()];
                let there = read(link.0, &mut theirs)
                    && kaslr::unmoved_text_agrees(sample, &theirs, SLIDE_AGREEMENT_PER_MILLE);
                if !there {
                    return Err(refusal("0 (the image has no relocation table)".into()).into());
                }
                (0, SlideFound::Fixed)
            }
            Ok(relocs) => {
                let claim = kaslr::virtual_slide(control.lstar, entry, relocs.image_end);
                let claimed = claim.as_ref().ok().copied();
                let search = kaslr::find_slide(
                    relocs,
                    &moved,
                    link.0,
                    relocs.image_end,
                    claimed,
                    SLIDE_AGREEMENT_PER_MILLE,
                    read,
                );
                let (slide, check) = search.ok_or_else(|| {
                    refusal(match &claim {
                        Ok(v) => format!("{v:#x}"),
                        Err(e) => format!("none ({e})"),
                    })
                })?;
                relocs
                    .apply(&mut moved, link.0, slide)
                    .map_err(|source| SlideRefusal::Move { slide, source })?;
                let found = if claimed == Some(slide) {
                    SlideFound::Lstar
                } else {
                    SlideFound::Search
                };
                log::info!(
                    "redirect: the GVM's kernel slide is {slide:#x} (LSTAR {:#x}; {}); its \
                     text agrees with the trusted text moved by it at {} of {} relocated \
                     places",
                    control.lstar,
                    found.name(),
                    check.agree,
                    check.agree + check.differ
                );
                (slide, found)
            }
        };
        self.layout
            .slide_text(link, slide)
            .ok_or(SlideRefusal::Claim(kaslr::SlideError::TooFar(slide)))?;
        self.write_cpu_tables(slide)?;
        self.text.moved = Some(moved);
        self.slide = Some(slide);
        self.slide_found = Some(found);
        Ok((slide, found))
    }

    /// Reads the SVM's twins of the trusted modules, the first time, through the calling
    /// program's page tables (`mode`, `cr3`), whose kernel half is the SVM kernel's. With
    /// page-table isolation on, a program's CR3 is its user PGD, which maps no module:
    /// the kernel's is the page below it (the pinned kernel, built with
    /// CONFIG_PAGE_TABLE_ISOLATION, allocates every PGD as an aligned 8 KiB pair), tried
    /// when the first finds no twin.
    pub fn read_twins(&mut self, profile: &CallProfile, mode: PagingMode, cr3: u64) {
        if self.modules.twins.is_some() {
            return;
        }
        let Some(layout) = profile.modules.as_ref() else {
            return;
        };
        let kos = &self.parts.trusted_modules;
        let svm_mem = &self.parts.svm_mem;
        let read = |cr3| Twins::read(kos, layout, &AddressSpace::new(svm_mem, mode, cr3));
        let (mut twins, mut warnings) = read(cr3);
        if twins.is_empty() && !kos.is_empty() && cr3 & 0x1000 != 0 {
            (twins, warnings) = read(cr3 & !0x1000);
        }
        for w in warnings {
            log::warn!("redirect: {w}");
        }
        log::info!(
            "redirect: {} of {} trusted modules have a twin in the SVM",
            twins.len(),
            self.parts.trusted_modules.len()
        );
        self.modules.twins = Some(twins);
    }

    /// Checks the GVM's modules against the twins (`gvm`: its kernel's address space) and
    /// makes the next views run the verified ones' text, from copies in the read-only
    /// module area. At each epoch: the GVM may have changed its modules since the last.
    /// The check's summary ("trusted: …; refused: … (why); not on the trusted list: …")
    /// when it differs from the last one's.
    pub fn check_modules(
        &mut self,
        profile: &CallProfile,
        gvm: &AddressSpace<'_>,
    ) -> Result<Option<String>, Error> {
        let (Some(twins), Some(layout)) = (&self.modules.twins, profile.modules.as_ref()) else {
            self.layout.modules.clear();
            return Ok(None);
        };
        let slide = self.slide.ok_or(Error::NoSlide)?;
        let verified = verify_gvm(&self.parts.trusted_modules, twins, layout, gvm, slide);
        let mut at = 0;
        for t in &verified.texts {
            self.modules.area.mem.write_phys(at, &t.text)?;
            at += t.text.len() as u64;
        }
        self.layout.modules = verified.copies(self.layout.module_copy_gpa);
        let summary = verified.summary();
        self.modules.verified = verified;
        if summary == self.modules.summary {
            return Ok(None);
        }
        log::info!("redirect: GVM modules {summary}");
        self.modules.summary = summary.clone();
        Ok(Some(summary))
    }

    /// Why the GVM module called `name` was not trusted in this epoch, if it was refused.
    pub fn why_untrusted(&self, name: &str) -> Option<&str> {
        self.modules.verified.why_not(name)
    }

    /// Writes the GDT of GVM CPU `cpu` into the window: its getcpu entry names the CPU
    /// (the kernel's paranoid entry path finds its per-cpu base by it).
    fn lend_gdt(&self, cpu: u8) -> Result<(), Error> {
        let tss_kva = ViewLayout::kva(offsets::GDT_TSS + offsets::TSS_IN_PAGE);
        self.window
            .mem
            .write_phys(offsets::GDT_TSS, &cpu_tables::gdt(tss_kva, cpu))?;
        Ok(())
    }

    /// The redirect vCPU: numbered like the GVM's spare CPU, with the GVM's CPUID.
    fn create_vcpu(vm: &Vm, number: u8) -> Result<VcpuFd, VmError> {
        let vcpu = vm
            .fd
            .create_vcpu(u64::from(number))
            .map_err(kvm_err("create redirect vCPU"))?;
        let mut supported: CpuId = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        cpuid::patch_entries(supported.as_mut_slice(), number, number.saturating_add(1));
        vcpu.set_cpuid2(&supported).map_err(kvm_err("set CPUID"))?;
        vcpu.set_fpu(&cpu::boot_fpu()).map_err(kvm_err("set FPU"))?;
        Ok(vcpu)
    }

    /// Reads the window at kernel-virtual `va` (for trap reports); false if outside it.
    pub fn read_window(&self, va: u64, buf: &mut [u8]) -> bool {
        va.checked_sub(WINDOW_KVA)
            .filter(|off| {
                off.checked_add(buf.len() as u64)
                    .is_some_and(|end| end <= WINDOW_SIZE)
            })
            .is_some_and(|off| self.window.mem.read_phys(off, buf).is_ok())
    }

    /// Commits (or drops) what the redirect vCPU wrote to GVM RAM since the last settle;
    /// the number of pages (see `cow.rs`); timed as [`Phase::Commit`]. The view's tables
    /// start a new epoch if what changed may be in them: after a rollback (the GVM pages
    /// go back to what they were, behind KVM's back) or a commit to a GVM table page the
    /// kernel half copied.
    pub fn settle(&mut self, commit: bool, phases: &PhaseTimes) -> Result<u64, CowError> {
        let started = Instant::now();
        let settled = self.cow.settle(&self.vm.fd, commit);
        match &settled {
            Ok(written) if commit => self.views.forget_if_written(written),
            _ => self.views.forget(),
        }
        phases.since(Phase::Commit, started);
        settled.map(|written| written.iter().map(|(_, len)| len / 0x1000).sum())
    }

    /// The u32 at GVM kernel-virtual `va` as the running call sees it.
    pub fn read_private_u32(&self, kernel: &AddressSpace<'_>, va: u64) -> Option<u32> {
        self.cow.read_private_u32(kernel, va)
    }

    /// Fills the text slot (once): the trusted text moved by the slide, with the traps
    /// (`traps`, placed at the slid addresses) patched in. Nothing has run from the slot
    /// before, so KVM has nothing of it cached.
    fn private_text(&mut self, traps: &[Placed]) -> Result<(), Error> {
        if self.text.filled {
            return Ok(());
        }
        let bytes = self.text.moved.as_mut().ok_or(Error::NoSlide)?;
        traps::patch_text(bytes, self.layout.exec_text.0, traps)?;
        self.text.copy.mem.write_phys(0, bytes)?;
        self.text.filled = true;
        self.text.moved = None;
        Ok(())
    }

    fn forget_cached_translations(&self) -> Result<(), Error> {
        let (slot, gpa, host) = self.flush_slot;
        set_slot(&self.vm, slot, gpa, 0, host, KVM_MEM_READONLY)
            .and_then(|()| set_slot(&self.vm, slot, gpa, 0x1000, host, KVM_MEM_READONLY))
            .map_err(kvm("flushing the redirect VM's MMU"))
    }

    /// Copies the call's buffers (`ranges`, from the shim's list) from `program` into the
    /// bounce area: the pages the next views map at the program's addresses.
    pub fn load_buffers(
        &mut self,
        ranges: &[BufferRange],
        program: &AddressSpace<'_>,
    ) -> Result<(), Error> {
        let ranges: Vec<Range> = ranges
            .iter()
            .map(|r| Range {
                addr: r.addr,
                len: r.len,
                write: r.write,
            })
            .collect();
        self.buffers = BouncePlan::new(&ranges, (BOUNCE_SIZE / 0x1000) as usize)?;
        if let Err(e) = self.buffers.fill(program, &self.bounce.mem) {
            self.return_buffers(None)?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Copies what the call may have written (its ranges marked written, nothing else)
    /// back into `program` (none if `None`: the call failed), then zeroes and forgets the
    /// call's bounce pages; the number of bytes.
    pub fn return_buffers(&mut self, program: Option<&AddressSpace<'_>>) -> Result<u64, Error> {
        let plan = std::mem::take(&mut self.buffers);
        let bytes = match program {
            Some(p) => plan.write_back(&self.bounce.mem, p),
            None => Ok(0),
        };
        plan.clear(&self.bounce.mem)?;
        Ok(bytes?)
    }

    /// Builds the view tables for a run on `control`'s address space; at a new epoch of
    /// the tables (`redirect::view::ViewTables`), drops what the redirect VM cached.
    fn fresh_view(
        &mut self,
        profile: &CallProfile,
        control: &ControlState,
        phases: &PhaseTimes,
    ) -> Result<View, Error> {
        let started = Instant::now();
        let window = Relocated {
            inner: &self.window.mem,
            base: self.layout.window_gpa,
        };
        let (view, new_epoch) = self.views.build(
            &window,
            &self.layout,
            &self.parts.gvm_mem,
            control.cr3,
            &self.buffers,
        )?;
        self.private_text(&profile.traps)?;
        phases.since(Phase::View, started);
        if new_epoch {
            let started = Instant::now();
            self.forget_cached_translations()?;
            phases.since(Phase::Flush, started);
        }
        Ok(view)
    }

    /// Sets the redirect vCPU up as `cpu` on a fresh view and runs it from `entry`.
    pub fn start(
        &mut self,
        profile: &CallProfile,
        cpu: AsCpu<'_>,
        entry: Entry<'_>,
        counters: Counters<'_>,
    ) -> Result<i64, Stop> {
        self.complete_pending_exit();
        // Under TDP the views of an epoch (all with PCID 0) rely on KVM flushing the
        // vCPU's TLB when KVM_SET_SREGS changes CR3 (6.1 does, in kvm_mmu_load; later
        // kernels may reuse a TDP root without it): a stale user-half entry would reach
        // the last call's bounce pages. Until views get a PCID each, every call there
        // starts an epoch, and a flush, as before epochs existed.
        if cpu.after_gvm_ran || self.host_mmu != HostMmu::Shadow {
            self.views.forget();
        }
        let view = self.fresh_view(profile, cpu.control, counters.phases)?;
        self.lend_gdt(cpu.cpu)?;
        let mode = match entry {
            Entry::Function { .. } => regs::Mode::Kernel,
            Entry::Syscall(_) => regs::Mode::User,
        };
        let trusted = self.trusted.ok_or(Error::NoTrustedControl)?;
        let trusted = trusted.slid(self.slide.ok_or(Error::NoSlide)?)?;
        let vcpu = &self.vcpu;
        let current = vcpu.get_sregs().map_err(kvm("get sregs"))?;
        let s = regs::segment_registers(current, &trusted, view.cr3, cpu.pcpu_base, mode);
        vcpu.set_sregs(&s).map_err(kvm("set sregs"))?;
        let mut entries = regs::msrs(&trusted, cpu.control.tsc, cpu.pcpu_base, mode).to_vec();
        if !cpu.after_gvm_ran {
            entries.retain(|e| e.index != MSR_IA32_TSC);
        }
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList)?;
        match vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))? {
            n if n == entries.len() => {}
            n => return Err(Error::Msrs(n).into()),
        }
        vcpu.set_xcrs(&regs::xcrs(&trusted))
            .map_err(kvm("set XCR0"))?;
        let r = match entry {
            Entry::Syscall(regs) => kvm_regs {
                rax: regs.rax,
                rdi: regs.rdi,
                rsi: regs.rsi,
                rdx: regs.rdx,
                r10: regs.r10,
                r8: regs.r8,
                r9: regs.r9,
                // Not the program's stack pointer, nor (`Mode::User`) its FS base: the
                // GVM's kernel saves both in the shadow's pt_regs, GVM memory, and would
                // learn where the SVM program's stack and TLS are. A call uses neither
                // (the stub needs no stack; a signal frame could not be written to the
                // program's stack anyway: the view maps only its listed buffers).
                rsp: 0,
                rip: view.stub_va,
                rflags: 0x202,
                ..Default::default()
            },
            Entry::Function { address, args } => {
                // Return address: the kernel stub, on the scratch stack in the window.
                self.window
                    .mem
                    .write_phys(SCRATCH_STACK_TOP - 8, &KSTUB_KVA.to_le_bytes())?;
                kvm_regs {
                    rdi: args[0],
                    rsi: args[1],
                    rsp: ViewLayout::kva(SCRATCH_STACK_TOP - 8),
                    rip: address,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
        };
        self.vcpu.set_regs(&r).map_err(kvm("set registers"))?;
        self.run(
            &StoreSites::new(&self.layout, &view, &profile.traps),
            counters,
        )
    }

    /// Resumes a parked call at `at` on a fresh view (the GVM ran meanwhile), with the
    /// lent CPU's current TSC. Everything else of the vCPU is as the call left it.
    pub fn resume(
        &mut self,
        profile: &CallProfile,
        cpu: u8,
        control: &ControlState,
        at: &kvm_regs,
        counters: Counters<'_>,
    ) -> Result<i64, Stop> {
        self.views.forget();
        let view = self.fresh_view(profile, control, counters.phases)?;
        self.lend_gdt(cpu)?;
        let vcpu = &self.vcpu;
        let mut s = vcpu.get_sregs().map_err(kvm("get sregs"))?;
        s.cr3 = view.cr3;
        // (A run that stopped off them was refused, never parked: this is belt and braces.)
        regs::set_descriptor_tables(&mut s);
        vcpu.set_sregs(&s).map_err(kvm("set sregs"))?;
        let tsc = [kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: control.tsc,
            ..Default::default()
        }];
        let msrs = Msrs::from_entries(&tsc).map_err(|_| Error::MsrList)?;
        vcpu.set_msrs(&msrs).map_err(kvm("set TSC"))?;
        vcpu.set_regs(at).map_err(kvm("set registers"))?;
        self.run(
            &StoreSites::new(&self.layout, &view, &profile.traps),
            counters,
        )
    }

    /// The registers where the last run stopped, its pending exit completed.
    pub fn stopped_registers(&mut self) -> Result<kvm_regs, Error> {
        self.complete_pending_exit();
        self.vcpu.get_regs().map_err(kvm("get registers"))
    }

    /// The last run ended in an MMIO exit that KVM still means to complete; let it do that
    /// now, without entering the guest, so the state set next is what runs.
    fn complete_pending_exit(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// Runs the redirect vCPU until the call stores to the sentinel (it returned), hits a
    /// trap, fails, or overruns [`CALL_TIMEOUT`].
    fn run(&mut self, sites: &StoreSites, counters: Counters<'_>) -> Result<i64, Stop> {
        // Not the BSP: KVM starts it waiting for INIT/SIPI; and a failed call may leave it
        // halted. Either way, it runs now.
        self.vcpu
            .set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm("set MP state"))?;
        let started = Instant::now();
        self.watchdog.arm(CALL_TIMEOUT);
        let bus = self.parts.gvm_bus.clone();
        let value = |data: &[u8]| {
            let mut raw = [0u8; 8];
            let n = data.len().min(8);
            raw[..n].copy_from_slice(&data[..n]);
            i64::from_le_bytes(raw)
        };
        let result = loop {
            let exit = self.vcpu.run();
            let counter = match exit {
                Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => counters.console,
                _ => counters.exits,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let stop = match exit {
                // The call returned or reached a trap — if the store came from its site
                // with the view loaded (`redirect::stores`). Without the registers there
                // is no telling, and a trap's report would be made from zeros.
                Ok(VcpuExit::MmioWrite(addr, data)) if sites.covers(addr) => {
                    let stored = value(data);
                    match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
                        (Ok(r), Ok(s)) => match (
                            sites.believe(addr, r.rip, s.cr3),
                            regs::descriptor_tables_changed(&s),
                        ) {
                            // The store came from its site, but a run that left the
                            // window's descriptor tables ran on the GVM's gates and
                            // stacks since: nothing it did is believed.
                            (Ok(_), Some(table)) => RunError::TablesSwitched(table),
                            (Ok(Store::Returned | Store::KernelReturned), None) => {
                                break Ok(stored)
                            }
                            (Ok(Store::Trapped(trap)), None) => {
                                break Err(Stop::Trap(trap, Args([r.rdi, r.rsi, r.rdx, r.rcx])))
                            }
                            (Err(forged), _) => RunError::ForgedStore(forged),
                        },
                        (Err(source), _) | (_, Err(source)) => {
                            RunError::StoreUnverifiable { gpa: addr, source }
                        }
                    }
                }
                // The lent CPU's printk reaches the GVM's own serial port.
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus.write(port, data);
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.read(port, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, _)) => RunError::UnbackedWrite(addr),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0xff);
                    RunError::UnbackedRead(addr)
                }
                Ok(VcpuExit::Hlt) => RunError::Halted,
                Ok(VcpuExit::Shutdown) => RunError::TripleFault,
                Ok(other) => RunError::UnexpectedExit(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if started.elapsed() < CALL_TIMEOUT {
                        continue;
                    }
                    RunError::Timeout(CALL_TIMEOUT)
                }
                Err(e) => RunError::Run(e),
            };
            let at = match self.vcpu.get_regs() {
                Ok(r) => format!("lent CPU at rip {:#x}", r.rip),
                Err(e) => format!("lent CPU's rip unreadable: {e}"),
            };
            break Err(Stop::Failed(Error::Run { stop, at }));
        };
        self.watchdog.disarm();
        counters.phases.since(Phase::Run, started);
        result
    }

    /// Sends every GVM CPU a reschedule IPI: wake-ups a call made (a signal, a released
    /// lock, queued work) take effect now, not at the GVM CPUs' next interrupt.
    pub fn kick_gvm_cpus(&self) {
        for cpu in 0..self.parts.gvm_vcpus.len() as u32 {
            let msi = kvm_bindings::kvm_msi {
                address_lo: MSI_APIC_BASE | (cpu << 12),
                data: RESCHEDULE_VECTOR,
                ..Default::default()
            };
            if let Err(e) = self.parts.gvm_vm.signal_msi(msi) {
                log::warn!("redirect: reschedule IPI to GVM CPU {cpu}: {e}");
            }
        }
    }
}

// The bounce area holds the largest call the shim lets through: the touch budget (a module
// image at most, and the side buffers), the ranges outside the budget (three iovec arrays,
// a msghdr, the path), and one page more per range for straddling.
const _: () = assert!(
    (svm_runtime::redirect_abi::MAX_MODULE_TOUCH + svm_runtime::redirect_abi::MAX_SIDE_TOUCH)
        as u64
        / 0x1000
        + (3 * svm_runtime::redirect_abi::MAX_IOV as u64 * 16 + 56 + 4096).div_ceil(0x1000)
        + 2 * svm_runtime::redirect_abi::MAX_BUFFERS as u64
        <= BOUNCE_SIZE / 0x1000
);
// The window's writable slot (the stacks) lies inside it, read-only on both sides, and the
// CPU's tables in the read-only part before it.
const _: () = assert!(
    offsets::SCRATCH_STACK > 0
        && SCRATCH_STACK_TOP <= offsets::CPU_STACKS
        && offsets::WRITABLE_END <= offsets::TABLES
        && offsets::GDT_TSS + 0x1000 <= offsets::SCRATCH_STACK
        && offsets::IDT + 0x1000 <= offsets::SCRATCH_STACK
        && cpu_tables::GDT_SIZE as u64 <= offsets::TSS_IN_PAGE
        && offsets::TSS_IN_PAGE + cpu_tables::TSS_SIZE as u64 <= 0x1000
);

#[cfg(test)]
mod tests {
    use redirect::view::{ViewLayout, BOUNCE_OFFSET};

    #[test]
    fn the_flush_page_lies_between_the_trap_page_and_the_bounce_area() {
        let layout = ViewLayout::for_guest(256 << 20, (0x100_0000, 0x200_0000)).unwrap();
        let flush = layout.sentinel_gpa + (2 << 20);
        assert!(flush > layout.trap_gpa() && flush + 0x1000 <= layout.bounce_gpa);
        assert_eq!(layout.bounce_gpa, layout.window_gpa + BOUNCE_OFFSET);
    }
}
