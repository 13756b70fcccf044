//! The redirect executor (DESIGN.md 4.2): runs one system call of an SVM program on the
//! GVM's kernel, natively, on a redirect vCPU that borrows a held GVM CPU's identity.
//! A call's stores reach the GVM only if it returns (`cow`); what it must not do on a
//! borrowed CPU — sleep, fault, run code outside the trusted image — is trapped
//! (`redirect::traps`) and the call is rolled back.
//!
//! ```text
//!  SVM program ──SIGSYS──▶ shim ──OUT 0xE7──▶ SVM vCPU thread: RedirectPort (port.rs)
//!                                   │ 0 begin: checks; the listed buffers into bounce pages
//!                                   ▼ redirect-worker thread: run_begun
//!                                   │ 1 quiesce GVM vCPUs (HLT / CPL 3)
//!                                   │ 2 view page tables in the window
//!                                   │ 3 lent CPU: current = shadow task
//!                                   │ 4 KVM_RUN redirect vCPU at CPL 3:
//!                                   │     syscall ─▶ GVM kernel (native)
//!                                   │     sysret ─▶ store to sentinel (exit)
//!                                   │ 5 commit or roll back, release
//!  RAX, RCX ◀── the OUT (at once) or a poll of it: finish (written ranges copied back)
//! ```
//!
//! This file is the executor's public face; `port` the SVM's redirect port and the worker
//! thread, `engine` the redirect VM (memslots, the vCPU and its runs), `segment` one lent
//! CPU's run of a call, `call` how segments make a call (parking), `cow` the copy-on-write GVM RAM, `regs` the vCPU's register values and
//! `error` why calls fail. Everything that needs no KVM is in the `redirect` crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod call;
pub use call::HoldEnd;
mod cow;
mod engine;
mod error;
mod port;
mod regs;
mod segment;
pub mod timing;
pub mod trusted_modules;

pub use error::{Error, Unavailable};
pub use port::RedirectPort;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuFd, VmFd};
use redirect::call_profile::CallProfile;
use redirect::paging::AddressSpace;
use redirect::profile::{KernelImage, SymbolTable};
use svm_runtime::redirect_abi::Status;

use crate::devices::PioBus;
use crate::sync::lock;
use crate::vstate::memory::GuestMemory;
use crate::vstate::mmu::HostMmu;
use crate::vstate::quiesce::{ControlState, VcpuControl};
use crate::vstate::vcpu::{read_msrs, read_xcr0};
use crate::vstate::vm::Vm;
use crate::vstate::watchdog::Watchdog;
use engine::Engine;
pub use engine::SlideFound;
use regs::{ControlError, TrustedControl};

const ERRNO_EBUSY: i64 = 16;
const ERRNO_EIO: i64 = 5;
const ERRNO_ENOSYS: i64 = 38;

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
    /// Calls stopped at a trap and rolled back (would sleep, faulted, ran outside the image).
    pub rolled_back: AtomicU64,
    /// GVM pages written by committed calls.
    pub committed_pages: AtomicU64,
    /// Times a call slept in the GVM kernel and was parked (then resumed).
    pub parked: AtomicU64,
    /// Calls that would block after earlier calls of their hold went through, rolled back
    /// and run once more under a hold of their own (each such run has its own exit).
    pub retried: AtomicU64,
    /// Answers "pending" the redirect port gave (the call had not finished in time).
    pub pending: AtomicU64,
    /// Nanoseconds the SVM's vCPU spent in the redirect port, summed.
    pub port_ns: AtomicU64,
    /// Nanoseconds calls took on the worker thread (`run_begun`), summed.
    pub worker_ns: AtomicU64,
    /// Why the last failed call failed (one line).
    pub last_error: Mutex<String>,
    /// Which GVM modules the last check trusted, and why the others not (one line).
    pub modules: Mutex<String>,
    /// How long the GVM was held, per hold (from the start of its quiesce to its release).
    pub holds: Mutex<timing::Samples>,
    /// Where the segments' time went (`timing`).
    pub phases: timing::PhaseTimes,
    /// Holds ended, by why (indexed by `call::HoldEnd`).
    pub hold_ends: [AtomicU64; call::HoldEnd::ALL.len()],
}

/// Adds the time since `since` to `counter`, in nanoseconds.
fn add_elapsed(counter: &AtomicU64, since: std::time::Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::Relaxed);
}

impl Stats {
    fn record_hold(&self, held: Duration) {
        lock(&self.holds).record(held);
    }

    /// The GVM's holds: their total, and the median and maximum of the recent ones.
    pub fn hold_summary(&self) -> timing::Summary {
        lock(&self.holds).summary()
    }
}

/// The parts of an instance the executor works with.
pub struct Parts {
    pub gvm_mem: GuestMemory,
    pub svm_mem: GuestMemory,
    pub gvm_vcpus: Vec<Arc<VcpuControl>>,
    /// The GVM's devices' gate: paused with the vCPUs for every hold (`vstate::dma_gate`).
    pub gvm_dma: Arc<crate::vstate::dma_gate::DmaGate>,
    pub gvm_bus: Arc<PioBus>,
    /// The GVM's VM (its own descriptor): for the IPIs a call owes the GVM's CPUs.
    pub gvm_vm: VmFd,
    /// The GVM's spare CPU (its number = the GVM's vCPU count).
    pub spare_cpu: u8,
    /// The module files whose loaded text the view may run once it is checked against the
    /// SVM's own load of them (`trusted_modules`).
    pub trusted_modules: Vec<trusted_modules::TrustedKo>,
    /// The trusted image's relocation table (from the bzImage's payload; an ELF vmlinux
    /// has none): how the text moves with a GVM's KASLR slide.
    pub relocs: Result<redirect::kaslr::Relocs, redirect::kaslr::RelocError>,
}

/// One call's outcome: RAX for the program, and the status for the shim.
pub struct Outcome {
    pub result: i64,
    pub status: Status,
}

/// The executor of one instance; the SVM's vCPU threads call it through [`PortHook`].
pub struct Executor {
    engine: Mutex<Result<Engine, Arc<Unavailable>>>,
    /// Whether the redirect VM was created (fixed at construction): `is_ready` must not
    /// take the engine lock, which a call holds while it runs or is parked.
    engine_created: bool,
    image: Mutex<Option<KernelImage>>,
    profile: OnceLock<Result<CallProfile, Arc<Unavailable>>>,
    /// The GVM kernel's profile: `profile` moved by the GVM's KASLR slide (the same when
    /// it has none), made at the first hold ([`Executor::gvm_profile`]).
    gvm_profile: OnceLock<CallProfile>,
    /// The GVM kernel's KASLR slide and how it was found, once learnt (`info`'s
    /// `redirect_kernel_slide` and `redirect_kernel_slide_by`).
    slide: OnceLock<(u64, SlideFound)>,
    /// Taken by whoever holds the GVM's vCPUs (a call, or `exterior-vmm quiesce`).
    gvm_hold: Mutex<()>,
    /// The trusted SVM kernel's control state, read from its vCPU at the first call.
    svm_control: OnceLock<TrustedControl>,
    /// The redirect port's calls in flight and waiting (`port.rs`).
    port: port::Port,
    /// How long a call may take in all before it is given up (`--call-deadline`).
    call_deadline: Duration,
    /// How long the GVM stays held for a program's run of calls.
    hold_policy: HoldPolicy,
    /// The host KVM's MMU (`info`'s `redirect_host_mmu`).
    pub host_mmu: HostMmu,
    pub stats: Stats,
}

/// How long the GVM stays held for one program's run of calls (`--hold-slice-us`,
/// `--hold-idle-us`): a hold ends once it is `slice` old (checked between calls) or when
/// the program's next call has not come within `idle` of the last one's end. A zero slice
/// holds the GVM for one call at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldPolicy {
    /// The longest a hold lasts, checked between calls.
    pub slice: Duration,
    /// The longest a hold waits for the program's next call.
    pub idle: Duration,
}

impl Executor {
    /// Creates the redirect VM for an instance. Failures do not stop the instance: they
    /// are reported, and every redirected call then fails with the reason.
    pub fn new(
        kvm_device: &std::path::Path,
        image: Result<KernelImage, redirect::ProfileError>,
        parts: Parts,
        call_deadline: Duration,
        hold_policy: HoldPolicy,
        seccomp: bool,
    ) -> std::io::Result<Arc<Executor>> {
        let watchdog = Watchdog::spawn("redirect-watchdog", seccomp)?;
        let host_mmu = HostMmu::detect();
        let engine = match &image {
            Err(e) => Err(Unavailable::Image(e.clone())),
            Ok(img) => engine::text_range(img).and_then(|text| {
                let vm = Vm::new(kvm_device)?;
                Engine::new(vm, text, parts, watchdog, host_mmu)
            }),
        };
        if let Err(e) = &engine {
            log::error!("redirect engine unavailable: {e}");
        }
        let executor = Arc::new(Executor {
            engine_created: engine.is_ok(),
            engine: Mutex::new(engine.map_err(Arc::new)),
            image: Mutex::new(image.ok()),
            profile: OnceLock::new(),
            gvm_profile: OnceLock::new(),
            slide: OnceLock::new(),
            gvm_hold: Mutex::new(()),
            svm_control: OnceLock::new(),
            port: port::Port::new(),
            call_deadline,
            hold_policy,
            host_mmu,
            stats: Stats::default(),
        });
        port::spawn_worker(&executor, seccomp)?;
        Ok(executor)
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
            .map_err(Unavailable::Kallsyms)
            .and_then(|table| Ok(image.into_profile(table)?))
            .and_then(|kernel| Ok(CallProfile::new(kernel)?));
        match &profile {
            Ok(p) => {
                for warning in &p.warnings {
                    log::warn!("redirect: {warning}");
                }
                if let Some(off) = p.kernel.symbols.stack_canary {
                    log::info!("redirect: stack canary at per-cpu offset {off:#x}");
                }
                log::info!("redirect engine ready: kernel {}", p.kernel.release);
            }
            Err(e) => log::error!("redirect engine unavailable: {e}"),
        }
        let _ = self.profile.set(profile.map_err(Arc::new));
    }

    /// The GVM kernel's KASLR slide and how it was found, once the first call learnt it.
    pub fn kernel_slide(&self) -> Option<(u64, SlideFound)> {
        self.slide.get().copied()
    }

    /// The GVM kernel's call-time profile: the trusted `profile` moved by the slide the
    /// engine learns from the held CPU `control` (`Engine::learn_slide`), the first time.
    fn gvm_profile(
        &self,
        engine: &mut Engine,
        profile: &CallProfile,
        control: &ControlState,
    ) -> Result<&CallProfile, Error> {
        if let Some(p) = self.gvm_profile.get() {
            return Ok(p);
        }
        let (slide, found) = engine.learn_slide(profile, control)?;
        let _ = self.slide.set((slide, found));
        let slid = match slide {
            0 => profile.clone(),
            _ => {
                let kernel = profile.kernel.slid(slide).map_err(Unavailable::Profile);
                let call = kernel.and_then(|k| Ok(CallProfile::new(k)?));
                call.map_err(|e| Error::Unavailable(Arc::new(e)))?
            }
        };
        Ok(self.gvm_profile.get_or_init(|| slid))
    }

    /// The call-time profile, or why calls cannot run.
    fn ready_profile(&self) -> Result<&CallProfile, Error> {
        match self.profile.get() {
            None => Err(Error::Unavailable(Arc::new(Unavailable::NoSymbols))),
            Some(Err(e)) => Err(Error::Unavailable(e.clone())),
            Some(Ok(profile)) => Ok(profile),
        }
    }

    /// Checks the call in `regs` (RAX = number, RDI RSI RDX R10 R8 R9 = arguments, RCX =
    /// its buffer list) of the SVM program whose control registers are `sregs`, and copies
    /// its buffers in; on the SVM's vCPU thread, the SVM stopped.
    fn begin(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), Error> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let profile = self.ready_profile()?;
        match &mut *lock(&self.engine) {
            Err(e) => Err(Error::Unavailable(e.clone())),
            Ok(engine) => self.prepare_call(engine, profile, regs, sregs),
        }
    }

    /// Runs a begun call of the program whose address space is `space` in the GVM (on
    /// the worker thread), under `hold` if it is that program's (see `call.rs`).
    fn run_begun<'e>(
        &'e self,
        regs: &kvm_regs,
        space: u64,
        hold: &mut Option<call::Hold<'e>>,
    ) -> Result<i64, Error> {
        let profile = self.ready_profile()?;
        match &mut *lock(&self.engine) {
            Err(e) => Err(Error::Unavailable(e.clone())),
            Ok(engine) => self.run_call(engine, profile, regs, space, hold),
        }
    }

    /// Ends a hold the worker kept between calls.
    fn end_hold(&self, hold: Option<call::Hold<'_>>, why: call::HoldEnd) {
        if hold.is_none() {
            return;
        }
        match &*lock(&self.engine) {
            Ok(engine) => self.release(engine, hold, why),
            // (No engine, no hold was ever taken.)
            Err(_) => drop(hold),
        }
    }

    /// Zeroes and forgets the bounce pages of a call whose result nobody takes.
    fn forget_buffers(&self) {
        if let Ok(engine) = &mut *lock(&self.engine) {
            if let Err(e) = engine.return_buffers(None) {
                log::error!("redirect: clearing the bounce area: {e}");
            }
        }
    }

    /// Ends call number `nr` with `result`: on success its written ranges are copied back
    /// into the program (whose control registers are `sregs` now; on the SVM's vCPU
    /// thread, the SVM stopped), and the bounce pages are cleared either way.
    fn finish(&self, nr: u64, sregs: &kvm_sregs, result: Result<i64, Error>) -> Outcome {
        let result = match result {
            Ok(v) => self.copy_back(sregs).map(|_| v),
            Err(e) => {
                self.forget_buffers();
                Err(e)
            }
        };
        let e = match result {
            Ok(result) => {
                return Outcome {
                    result,
                    status: Status::Done,
                }
            }
            Err(e) => e,
        };
        let (status, errno) = match &e {
            Error::Unavailable(_) => (Status::NotReady, ERRNO_ENOSYS),
            e if e.is_busy() => {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                (Status::Busy, ERRNO_EBUSY)
            }
            _ => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                (Status::Failed, ERRNO_EIO)
            }
        };
        let why = e.to_string();
        log::warn!("redirected syscall {nr} failed: {why}");
        *lock(&self.stats.last_error) = format!("syscall {nr}: {}", why.replace('\n', " "));
        Outcome {
            result: -errno,
            status,
        }
    }

    /// Copies a returned call's written ranges back into the program of `sregs`.
    fn copy_back(&self, sregs: &kvm_sregs) -> Result<u64, Error> {
        let mut guard = lock(&self.engine);
        let Ok(engine) = &mut *guard else {
            return Ok(0);
        };
        let svm_mem = engine.parts.svm_mem.clone();
        match call::svm_paging(sregs) {
            Ok(mode) => engine.return_buffers(Some(&AddressSpace::new(&svm_mem, mode, sregs.cr3))),
            Err(e) => {
                engine.return_buffers(None)?;
                Err(e)
            }
        }
    }
}

/// The SVM kernel's control state, as its vCPU (at a redirected call, in user mode) has it:
/// the state every run of the redirect vCPU uses instead of the GVM's (`regs`).
pub(super) fn read_svm_control(
    vcpu: &VcpuFd,
    sregs: &kvm_sregs,
) -> Result<TrustedControl, ControlError> {
    use crate::boot::cpu::{MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};
    let [star, lstar, sfmask] = read_msrs(vcpu, [MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK])
        .ok_or(ControlError::Unreadable("MSRs"))?;
    Ok(TrustedControl {
        cr0: sregs.cr0,
        cr4: sregs.cr4,
        efer: sregs.efer,
        apic_base: sregs.apic_base,
        star,
        lstar,
        sfmask,
        xcr0: read_xcr0(vcpu).ok_or(ControlError::Unreadable("XCR0"))?,
    })
}
