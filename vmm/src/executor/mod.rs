//! The redirect executor (DESIGN.md 4.2): runs one system call of an SVM program on the
//! GVM's kernel, natively, on a redirect vCPU that borrows a held GVM CPU's identity.
//! A call's stores reach the GVM only if it returns (`cow`); what it must not do on a
//! borrowed CPU — sleep, fault, run code outside the trusted image — is trapped
//! (`redirect::traps`) and the call is rolled back.
//!
//! ```text
//!  SVM program ──SIGSYS──▶ shim ──OUT 0xE7──▶ SVM vCPU thread ──▶ Executor::call
//!                                                   │ 1 quiesce GVM vCPUs (HLT / CPL 3)
//!                                                   │ 2 view page tables in the window
//!                                                   │ 3 lent CPU: current = shadow task
//!                                                   │ 4 KVM_RUN redirect vCPU at CPL 3:
//!                                                   │     syscall ─▶ GVM kernel (native)
//!                                                   │     sysret ─▶ store to sentinel (exit)
//!  RAX, RCX (status) ◀─────────────────────────────┘ 5 commit or roll back, release
//! ```
//!
//! The redirect vCPU lives in its own KVM VM whose memslots compose the view: GVM RAM at
//! its own addresses except the kernel text, which comes from the SVM (read-only: code run
//! for the operator is the trusted image's, never the GVM's), the private window, and SVM
//! RAM at `svm_base`. Only this module touches KVM; the pure parts (view tables, shadow
//! task, traps) are in the `redirect` crate, and the vCPU register values in `regs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod call;
mod cow;
mod regs;

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
};
use kvm_ioctls::{VcpuFd, VmFd};
use redirect::profile::{KernelImage, KernelProfile, SymbolTable};
use redirect::shadow::ShadowLayout;
use redirect::view::{ViewLayout, WINDOW_SIZE};
use redirect::GuestPhysMemory;
use svm_runtime::redirect_abi::{Status, PORT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{cpu, cpuid};
use crate::devices::PioBus;
use crate::sync::lock;
use crate::vstate::memory::{create_guest_memory, GuestMemory, SharedMemory};
use crate::vstate::quiesce::{kick_signal, VcpuControl};
use crate::vstate::vcpu::PortHook;
use crate::vstate::vm::{kvm_err, Vm, VmError};
use cow::CowRam;
use redirect::traps::{self, ModuleLayout, TRAPS};

/// `__START_KERNEL_map`: kernel-image virtual addresses are this plus the physical address
/// (the loader puts the image at its link address; `nokaslr`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// How long one redirected call may run on the lent CPU.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to try to quiesce the GVM for one call.
const QUIESCE_BUDGET: Duration = Duration::from_secs(10);
/// How long one attempt waits for a GVM vCPU to leave KVM_RUN.
const PARK_TIMEOUT: Duration = Duration::from_secs(1);
const ERRNO_EBUSY: i64 = 16;
const ERRNO_EIO: i64 = 5;
const ERRNO_ENOSYS: i64 = 38;
const KVM_MP_STATE_RUNNABLE: u32 = 0;
/// x86 Linux's reschedule IPI vector (`RESCHEDULE_VECTOR`).
const RESCHEDULE_VECTOR: u32 = 0xfd;
/// MSI address of the local APICs (destination APIC id in bits 12..19).
const MSI_APIC_BASE: u32 = 0xfee0_0000;

/// Counters, readable while calls run (`exterior-vmm info`).
#[derive(Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub failed: AtomicU64,
    pub busy: AtomicU64,
    /// VM exits of the redirect vCPU in redirected calls, the final store included (a call
    /// that sleeps has one more per time it is parked); port I/O is counted apart.
    pub exits: AtomicU64,
    /// VM exits for port I/O during calls: the GVM kernel printing on its serial console
    /// (printk from the lent CPU), one per byte or status read.
    pub console_exits: AtomicU64,
    /// VM exits of the executor's own kernel-function calls (allocating the shadow).
    pub setup_exits: AtomicU64,
    /// Nanoseconds the GVM was held, summed.
    pub held_ns: AtomicU64,
    /// Calls stopped at a trap and rolled back (would sleep, faulted, ran outside the image).
    pub rolled_back: AtomicU64,
    /// GVM pages written by committed calls.
    pub committed_pages: AtomicU64,
    /// Times a call slept in the GVM kernel and was parked (then resumed).
    pub parked: AtomicU64,
    /// Why the last failed call failed (one line).
    pub last_error: Mutex<String>,
    /// How long the GVM was held for each of the last [`HOLD_SAMPLES`] calls, in µs.
    pub recent_holds_us: Mutex<std::collections::VecDeque<u64>>,
}

/// Calls whose hold time `info` summarises.
const HOLD_SAMPLES: usize = 4096;

impl Stats {
    fn record_hold(&self, held: Duration) {
        let ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        self.held_ns.fetch_add(ns, Ordering::Relaxed);
        let mut recent = lock(&self.recent_holds_us);
        if recent.len() == HOLD_SAMPLES {
            recent.pop_front();
        }
        recent.push_back(ns / 1000);
    }

    /// (median, maximum) of the recent per-call hold times in µs; zeros before any call.
    pub fn hold_summary_us(&self) -> (u64, u64) {
        let mut v: Vec<u64> = lock(&self.recent_holds_us).iter().copied().collect();
        v.sort_unstable();
        (
            v.get(v.len() / 2).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0),
        )
    }
}

/// The image's `.text` as guest-physical [start, end), page-aligned.
fn text_range(image: &KernelImage) -> Result<(u64, u64), String> {
    let (addr, size) = image.text;
    let start = addr
        .checked_sub(START_KERNEL_MAP)
        .ok_or("kernel .text is not in the kernel-image range")?;
    let end = start
        .checked_add(size)
        .and_then(|e| e.checked_add(0xfff))
        .map(|e| e & !0xfff)
        .ok_or("kernel .text size overflows")?;
    Ok((start & !0xfff, end))
}

struct Profile {
    kernel: KernelProfile,
    shadow: ShadowLayout,
    /// Per-cpu offset of the preempt count (`__preempt_count`; `pcpu_hot` from 6.2).
    preempt_count: u64,
    /// Per-cpu offset of `fpu_fpregs_owner_ctx`: whose FPU state the CPU's registers hold.
    fpregs_owner: u64,
    /// (index in [`TRAPS`], address) of every trap the SVM's symbols let us place.
    traps: Vec<(usize, u64)>,
    /// Where loaded modules are listed, to name the one an address falls in.
    modules: Option<ModuleLayout>,
    /// `__get_free_pages`: where the shadow's memory comes from.
    get_free_pages: u64,
    /// Per-cpu offset of the stack-protector canary (`fixed_percpu_data.stack_canary`).
    stack_canary: Option<u64>,
}

/// Hands the vCPU thread a kick if a call overruns (KVM_RUN then returns EINTR).
struct Watchdog {
    armed: Mutex<Option<(libc::pthread_t, Instant)>>,
    changed: Condvar,
}

impl Watchdog {
    fn spawn(seccomp: bool) -> std::io::Result<Arc<Watchdog>> {
        let dog = Arc::new(Watchdog {
            armed: Mutex::new(None),
            changed: Condvar::new(),
        });
        let me = dog.clone();
        std::thread::Builder::new()
            .name("redirect-watchdog".into())
            .spawn(move || {
                if seccomp {
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                        log::error!("redirect watchdog: {e}");
                        return;
                    }
                }
                me.watch()
            })?;
        Ok(dog)
    }

    fn watch(&self) {
        let mut armed = lock(&self.armed);
        loop {
            let wait = match *armed {
                None => Duration::from_secs(3600),
                Some((thread, deadline)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        // SAFETY: the thread id belongs to the vCPU thread that armed us and
                        // disarms before it can exit; the kick handler does nothing.
                        unsafe { libc::pthread_kill(thread, kick_signal()) };
                        Duration::from_millis(20)
                    } else {
                        deadline - now
                    }
                }
            };
            armed = self
                .changed
                .wait_timeout(armed, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn arm(&self, timeout: Duration) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *lock(&self.armed) = Some((me, Instant::now() + timeout));
        self.changed.notify_all();
    }

    fn disarm(&self) {
        *lock(&self.armed) = None;
        self.changed.notify_all();
    }
}

/// The parts of an instance the executor works with.
pub struct Parts {
    pub gvm_mem: GuestMemory,
    pub svm_mem: GuestMemory,
    pub gvm_vcpus: Vec<Arc<VcpuControl>>,
    pub gvm_bus: Arc<PioBus>,
    /// The GVM's VM (its own descriptor): for the IPIs a call owes the GVM's CPUs.
    pub gvm_vm: VmFd,
    /// The GVM's spare CPU (its number = the GVM's vCPU count).
    pub spare_cpu: u8,
}

struct Engine {
    vm: Vm,
    vcpu: VcpuFd,
    window: SharedMemory,
    layout: ViewLayout,
    parts: Parts,
    /// The kernel text the redirect vCPU runs.
    text: TextSlot,
    /// GVM RAM, mapped copy-on-write: a call's stores are committed or dropped as a whole.
    cow: CowRam,
    /// Where the shadow task lives in GVM memory, once made (at the first call).
    shadow: Option<call::ShadowAt>,
    /// Set when a call was left parked in the GVM kernel: why calls are refused now.
    stuck: Option<String>,
    /// A spare one-page slot, deleted and re-added before every call: deleting a memslot
    /// makes KVM drop every shadow page and TLB entry of the VM. The view's tables are
    /// rewritten by the VMM and the GVM's kernel tables by the GVM, both behind this VM's
    /// back, so nothing it cached from the last call may survive.
    flush_slot: (u32, u64, u64),
}

impl Engine {
    /// The window, at the guest-physical address the redirect VM sees it.
    fn window(&self) -> WindowAt<'_> {
        WindowAt {
            mem: &self.window.mem,
            base: self.layout.window_gpa,
        }
    }

    /// Commits (or drops) what the redirect vCPU wrote to GVM RAM since the last settle;
    /// the number of pages (see `cow.rs`).
    fn settle(&self, commit: bool) -> Result<u64, String> {
        self.cow.settle(&self.vm.fd, commit)
    }

    fn forget_cached_translations(&self) -> Result<(), String> {
        let (slot, gpa, host) = self.flush_slot;
        set_slot(&self.vm, slot, gpa, 0, host, 0)
            .and_then(|()| set_slot(&self.vm, slot, gpa, 0x1000, host, 0))
            .map_err(|e| format!("flushing the redirect VM's MMU: {e}"))
    }
}

/// The executor of one instance; the SVM's vCPU threads call it through [`PortHook`].
pub struct Executor {
    engine: Mutex<Result<Engine, String>>,
    /// Whether the redirect VM was created (fixed at construction): `is_ready` must not
    /// take the engine lock, which a call holds while it runs or is parked.
    engine_created: bool,
    image: Mutex<Option<KernelImage>>,
    profile: OnceLock<Result<Profile, String>>,
    watchdog: Arc<Watchdog>,
    /// Taken by whoever holds the GVM's vCPUs (a call, or `exterior-vmm quiesce`).
    gvm_hold: Mutex<()>,
    pub stats: Stats,
}

fn set_slot(vm: &Vm, slot: u32, gpa: u64, size: u64, host: u64, flags: u32) -> Result<(), VmError> {
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
    unsafe { vm.fd.set_user_memory_region(region) }.map_err(kvm_err("set redirect memory slot"))
}

fn host_ranges(mem: &GuestMemory) -> Result<Vec<(u64, u64, u64)>, VmError> {
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Host(format!("guest memory: {e}")))?;
            Ok((r.start_addr().raw_value(), r.len(), host as u64))
        })
        .collect()
}

/// Hands out the redirect VM's memslots in order.
struct Slots<'a> {
    vm: &'a Vm,
    next: u32,
}

impl Slots<'_> {
    /// Adds a slot (none for an empty range); returns the number it used.
    fn add(&mut self, gpa: u64, size: u64, host: u64, flags: u32) -> Result<u32, VmError> {
        if size > 0 {
            set_slot(self.vm, self.next, gpa, size, host, flags)?;
            self.next += 1;
        }
        Ok(self.next.saturating_sub(1))
    }

    /// Adds GVM RAM [gpa, gpa+size) from the private mapping, with dirty logging.
    fn add_ram(&mut self, cow: &mut CowRam, gpa: u64, size: u64) -> Result<(), VmError> {
        if size == 0 {
            return Ok(());
        }
        let piece = cow.add_piece(self.next, gpa, size).map_err(VmError::Host)?;
        self.add(gpa, size, piece.private, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(())
    }
}

impl Engine {
    fn new(vm: Vm, image_text: (u64, u64), parts: Parts) -> Result<Engine, VmError> {
        vm.fd
            .set_tss_address(crate::boot::layout::KVM_TSS_ADDR)
            .map_err(kvm_err("set TSS address"))?;
        // A LAPIC so that what the lent CPU does to its APIC (IPIs, EOIs) goes nowhere.
        vm.fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let gvm = host_ranges(&parts.gvm_mem)?;
        let svm = host_ranges(&parts.svm_mem)?;
        let (text_lo, text_hi) = image_text;
        let gvm_end = gvm.iter().map(|(g, l, _)| g + l).max().unwrap_or(0);
        let align = |v: u64, a: u64| (v + a - 1) & !(a - 1);
        let window_gpa = align(gvm_end, 1 << 30);
        let layout = ViewLayout {
            window_gpa,
            sentinel_gpa: window_gpa + WINDOW_SIZE,
            exec_text: (START_KERNEL_MAP + text_lo, START_KERNEL_MAP + text_hi),
            also_exec: None,
            svm_base: align(window_gpa + WINDOW_SIZE + 0x1000, 1 << 36),
        };
        let mut cow = CowRam::map(&parts.gvm_mem).map_err(VmError::Host)?;
        let mut slots = Slots { vm: &vm, next: 0 };
        let mut text_mapped = false;
        let mut text_slot = (0, 0, 0, 0);
        for &(gpa, len, _) in &gvm {
            let end = gpa + len;
            if text_lo >= gpa && text_hi <= end {
                slots.add_ram(&mut cow, gpa, text_lo - gpa)?;
                let (svm_gpa, _, svm_host) = svm
                    .iter()
                    .find(|(g, l, _)| text_lo >= *g && text_hi <= g + l)
                    .copied()
                    .ok_or_else(|| VmError::Host("the SVM's memory has no kernel text".into()))?;
                text_slot = (
                    slots.add(
                        text_lo,
                        text_hi - text_lo,
                        svm_host + (text_lo - svm_gpa),
                        KVM_MEM_READONLY,
                    )?,
                    text_lo,
                    text_hi - text_lo,
                    svm_host + (text_lo - svm_gpa),
                );
                slots.add_ram(&mut cow, text_hi, end - text_hi)?;
                text_mapped = true;
            } else {
                slots.add_ram(&mut cow, gpa, len)?;
            }
        }
        if !text_mapped {
            return Err(VmError::Host(format!(
                "the kernel text {text_lo:#x}..{text_hi:#x} is not in GVM memory"
            )));
        }
        let window = create_guest_memory("exterior-redirect-window", WINDOW_SIZE)
            .map_err(|e| VmError::Host(e.to_string()))?;
        let text_copy = create_guest_memory("exterior-redirect-text", text_hi - text_lo)
            .map_err(|e| VmError::Host(e.to_string()))?;
        let window_host = host_ranges(&window.mem)?;
        for &(_, len, host) in &window_host {
            slots.add(window_gpa, len, host, 0)?;
        }
        for &(gpa, len, host) in &svm {
            slots.add(layout.svm_base + gpa, len, host, 0)?;
        }
        let flush_gpa = layout.sentinel_gpa + (2 << 20);
        let flush_host = window_host.first().map(|r| r.2).unwrap_or(0);
        let flush_slot = (
            slots.add(flush_gpa, 0x1000, flush_host, 0)?,
            flush_gpa,
            flush_host,
        );
        // The window's memory object is relocated: vm-memory regions start at 0, the
        // redirect VM sees it at window_gpa. Reads and writes below go through `window_at`.
        let vcpu = vm
            .fd
            .create_vcpu(u64::from(parts.spare_cpu))
            .map_err(kvm_err("create redirect vCPU"))?;
        let mut supported: CpuId = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        cpuid::patch_entries(
            supported.as_mut_slice(),
            parts.spare_cpu,
            parts.spare_cpu.saturating_add(1),
        );
        vcpu.set_cpuid2(&supported).map_err(kvm_err("set CPUID"))?;
        vcpu.set_fpu(&cpu::boot_fpu()).map_err(kvm_err("set FPU"))?;
        Ok(Engine {
            vm,
            vcpu,
            window,
            layout,
            parts,
            text: TextSlot {
                slot: text_slot.0,
                gpa: text_slot.1,
                size: text_slot.2,
                svm_host: text_slot.3,
                copy: text_copy,
                private: false,
            },
            cow,
            shadow: None,
            stuck: None,
            flush_slot,
        })
    }
}

/// The kernel text of the view. It starts as the SVM's own pages (read-only); before the
/// first call it becomes a private copy of them in which `__schedule` is patched to exit:
/// a call that would sleep must stop before it switches the borrowed CPU to another task
/// (hardware breakpoints would do too, but nested TCG does not deliver them).
struct TextSlot {
    slot: u32,
    gpa: u64,
    size: u64,
    svm_host: u64,
    copy: SharedMemory,
    private: bool,
}

impl Engine {
    /// Switches the text slot to the private copy with the traps patched in (once).
    fn private_text(&mut self, traps: &[(usize, u64)]) -> Result<(), String> {
        if self.text.private {
            return Ok(());
        }
        let t = &self.text;
        let size = usize::try_from(t.size).map_err(|e| e.to_string())?;
        let mut bytes = vec![0u8; size];
        self.parts
            .svm_mem
            .read_phys(t.gpa, &mut bytes)
            .map_err(|e| format!("the SVM's kernel text: {e}"))?;
        for &(index, va) in traps {
            let code = traps::trap_code(index);
            let name = TRAPS.get(index).map_or("?", |t| t.1);
            let at = va
                .checked_sub(START_KERNEL_MAP + t.gpa)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|o| o + code.len() <= size)
                .ok_or_else(|| format!("{name} {va:#x} is outside the kernel text"))?;
            bytes[at..at + code.len()].copy_from_slice(&code);
        }
        t.copy
            .mem
            .write_phys(0, &bytes)
            .map_err(|e| format!("the private kernel text: {e}"))?;
        let host = host_ranges(&t.copy.mem)
            .map_err(|e| e.to_string())?
            .first()
            .map(|r| r.2)
            .ok_or("the private kernel text has no mapping")?;
        set_slot(&self.vm, t.slot, t.gpa, 0, t.svm_host, KVM_MEM_READONLY)
            .and_then(|()| set_slot(&self.vm, t.slot, t.gpa, t.size, host, KVM_MEM_READONLY))
            .map_err(|e| format!("switching to the private kernel text: {e}"))?;
        self.text.private = true;
        Ok(())
    }
}

/// The window as the redirect VM sees it: guest-physical `window_gpa + off` is byte `off`
/// of the window's memory.
struct WindowAt<'a> {
    mem: &'a GuestMemory,
    base: u64,
}

impl WindowAt<'_> {
    /// Offset in the window's memory of guest-physical `gpa`.
    fn offset(&self, gpa: u64, len: usize) -> Result<u64, redirect::MemError> {
        gpa.checked_sub(self.base)
            .ok_or(redirect::MemError::OutOfRange {
                gpa,
                len: len as u64,
            })
    }
}

impl GuestPhysMemory for WindowAt<'_> {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_sub(self.base)
            .is_some_and(|off| self.mem.contains(off, len))
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), redirect::MemError> {
        self.mem.read_phys(self.offset(gpa, buf.len())?, buf)
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), redirect::MemError> {
        self.mem.write_phys(self.offset(gpa, buf.len())?, buf)
    }
}

/// One call's outcome: RAX for the program, and the status for the shim.
pub struct Outcome {
    pub result: i64,
    pub status: Status,
}

impl Executor {
    /// Creates the redirect VM for an instance. Failures do not stop the instance: they
    /// are reported, and every redirected call then fails with the reason.
    pub fn new(
        kvm_device: &std::path::Path,
        image: Result<KernelImage, String>,
        parts: Parts,
        seccomp: bool,
    ) -> std::io::Result<Arc<Executor>> {
        let engine = image.as_ref().map_err(String::clone).and_then(|img| {
            let text = text_range(img)?;
            Vm::new(kvm_device)
                .and_then(|vm| Engine::new(vm, text, parts))
                .map_err(|e| format!("cannot create the redirect VM: {e}"))
        });
        if let Err(e) = &engine {
            log::error!("redirect engine unavailable: {e}");
        }
        Ok(Arc::new(Executor {
            engine_created: engine.is_ok(),
            engine: Mutex::new(engine),
            image: Mutex::new(image.ok()),
            profile: OnceLock::new(),
            watchdog: Watchdog::spawn(seccomp)?,
            gvm_hold: Mutex::new(()),
            stats: Stats::default(),
        }))
    }

    /// True once calls can run: the redirect VM exists and the profile is complete. Never
    /// waits (the control socket's event loop asks, for `info`).
    pub fn is_ready(&self) -> bool {
        self.engine_created && matches!(self.profile.get(), Some(Ok(_)))
    }

    /// Excludes redirected calls while the guard lives (for other users of quiescing).
    pub fn hold_gvm(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.gvm_hold)
    }

    /// Completes the kernel profile with the SVM's symbols (its agent's `Ready` payload).
    pub fn set_symbols(&self, kallsyms: &[u8]) {
        let Some(image) = lock(&self.image).take() else {
            return;
        };
        let profile = SymbolTable::parse_bytes(kallsyms)
            .map_err(|e| format!("the SVM's kallsyms: {e}"))
            .and_then(|table| image.into_profile(table).map_err(|e| e.to_string()))
            .and_then(|kernel| {
                let shadow = ShadowLayout::from_profile(&kernel).map_err(|e| e.to_string())?;
                let preempt_count = kernel
                    .btf
                    .percpu_var("__preempt_count")
                    .map(|v| v.offset)
                    .or_else(|| {
                        let hot = kernel.btf.percpu_var("pcpu_hot")?.offset;
                        hot.checked_add(kernel.btf.member_offset("pcpu_hot", "preempt_count")?)
                    })
                    .ok_or("kernel BTF has no per-cpu __preempt_count (nor pcpu_hot)")?;
                let fpregs_owner = kernel
                    .btf
                    .percpu_var("fpu_fpregs_owner_ctx")
                    .map(|v| v.offset)
                    .ok_or("kernel BTF has no per-cpu fpu_fpregs_owner_ctx")?;
                let mut traps = Vec::new();
                for (index, (_, name, required)) in TRAPS.iter().enumerate() {
                    match kernel.kallsyms.address(name) {
                        Some(va) => traps.push((index, va)),
                        None if *required => {
                            return Err(format!("the SVM's kallsyms has no {name}"))
                        }
                        None => log::warn!(
                            "redirect: the SVM's kallsyms has no {name}; that trap is not set"
                        ),
                    }
                }
                let get_free_pages = kernel
                    .kallsyms
                    .address("__get_free_pages")
                    .ok_or("the SVM's kallsyms has no __get_free_pages")?;
                // x86-64 keeps the canary in `fixed_percpu_data`, which the kernel's linker
                // script asserts is at the start of the per-cpu area (GCC reads %gs:40).
                let stack_canary = kernel
                    .btf
                    .member_offset("fixed_percpu_data", "stack_canary")
                    .map(|member| {
                        kernel
                            .btf
                            .percpu_var("fixed_percpu_data")
                            .map_or(0, |v| v.offset)
                            + member
                    });
                match stack_canary {
                    Some(off) => log::info!("redirect: stack canary at per-cpu offset {off:#x}"),
                    None => log::warn!(
                        "redirect: kernel BTF has no fixed_percpu_data.stack_canary; calls that \
                         sleep keep whatever canary the lent CPU has when resumed"
                    ),
                }
                let modules = ModuleLayout::from_profile(&kernel);
                if modules.is_none() {
                    log::warn!("redirect: cannot locate the GVM's module list; faults in modules are reported without the module's name");
                }
                Ok(Profile {
                    kernel,
                    shadow,
                    preempt_count,
                    fpregs_owner,
                    traps,
                    modules,
                    get_free_pages,
                    stack_canary,
                })
            });
        match &profile {
            Ok(p) => log::info!("redirect engine ready: kernel {}", p.kernel.release),
            Err(e) => log::error!("redirect engine unavailable: {e}"),
        }
        let _ = self.profile.set(profile);
    }
}

/// The SVM's redirect port: every vCPU of the SVM hands its OUTs to the executor.
pub struct RedirectPort(pub Arc<Executor>);

impl PortHook for RedirectPort {
    fn port(&self) -> u16 {
        PORT
    }

    fn handle(&self, vcpu: &VcpuFd) {
        let (Ok(mut regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            log::error!("redirect: cannot read the SVM vCPU's registers");
            return;
        };
        // Only user programs (the shim) ask; the SVM kernel has no business on this port.
        if sregs.cs.dpl != 3 {
            return;
        }
        let outcome = self.0.call(&regs, &sregs);
        regs.rax = outcome.result as u64;
        regs.rcx = outcome.status as u64;
        if let Err(e) = vcpu.set_regs(&regs) {
            log::error!("redirect: cannot write the SVM vCPU's registers: {e}");
        }
    }
}
