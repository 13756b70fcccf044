//! One redirected call, from the SVM program's OUT to its result.
//!
//! A call runs in *segments* (`segment.rs`). Each segment holds the GVM (quiesce), lends
//! one of its CPUs to the shadow task, runs the redirect vCPU until the call returns or
//! stops at a trap, then commits or drops the call's stores (`cow.rs`) and gives the CPU
//! back:
//!
//! ```text
//!  segment ─▶ returned ─────────────────────────▶ commit, done
//!         ─▶ stopped (fault, NX, overrun) ──────▶ roll back, fail
//!         ─▶ would sleep (__schedule trap):
//!              interruptibly, before any commit ─▶ roll back, fail ("would block")
//!              otherwise ─▶ park: commit, return from __schedule as a spurious wake-up,
//!                           release the GVM so it makes the progress the call waits for
//!                           (a grace period, a lock, a work item), then a new segment
//! ```
//!
//! A parked call is in the GVM like a task that sleeps on another CPU: its stack, task
//! and wait-queue entries live in GVM memory (the shadow block, allocated from the GVM's
//! page allocator), its state reads `TASK_RUNNING`, so wake-ups do not touch run queues;
//! the call's wait loop sees the condition when it is resumed. A call that sleeps longer
//! than its deadline (`--call-deadline`, 30 s by default) in all, or fails after it has
//! been parked, stays parked, like a task in D state: the GVM stays consistent, and the
//! engine refuses further calls.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use redirect::call_profile::CallProfile;
use redirect::paging::{AddressSpace, PagingMode, Privilege, DEFAULT_MAX_PHYS_BITS};
use redirect::traps;
use svm_runtime::redirect_abi::{BufferList, BUFFER_LIST_SIZE};

use super::engine::Engine;
use super::error::Error;
use super::segment::{Parked, Segment, SegmentEnd, SYS_DELETE_MODULE};
use super::timing::Phase;
use super::Executor;
use crate::vstate::quiesce::{self, QuiescePolicy, VcpuSnapshot};

/// How long to try to quiesce the GVM for one segment.
const QUIESCE_BUDGET: Duration = Duration::from_secs(10);
/// How long one attempt waits for a GVM vCPU to leave KVM_RUN.
const PARK_TIMEOUT: Duration = Duration::from_secs(1);
/// First and longest pause of a parked call before it is resumed.
const PARK_MIN: Duration = Duration::from_millis(1);
const PARK_MAX: Duration = Duration::from_millis(50);

impl Executor {
    /// Says why the program's call in `regs` may not run, or copies its buffers in (and,
    /// for `delete_module`, reads the module's name) from the program, which is stopped.
    pub(super) fn prepare_call(
        &self,
        engine: &mut Engine,
        profile: &CallProfile,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Result<(), Error> {
        if engine.stopped {
            return Err(Error::EngineStopped);
        }
        if regs.rax == SYS_DELETE_MODULE && engine.parts.gvm_vcpus.len() > 1 {
            // Freeing a module's memory flushes every CPU's TLB by IPI and waits for the
            // others, which are held during the call: it would end parked, holding the
            // GVM's rtnl and module locks. Refused before anything runs.
            return Err(Error::DeleteModuleOnSmp);
        }
        let trusted = self.svm_control.get().ok_or(Error::NoTrustedControl)?;
        let syms = &profile.kernel.symbols;
        engine.trust(trusted.checked(syms.entry_syscall_64)?, syms.idt_table);
        // The call reaches copies of the ranges the shim listed, and nothing else of the
        // SVM; what it may write is copied back only if it returns (`finish`).
        let svm_mem = engine.parts.svm_mem.clone();
        let program = AddressSpace::new(&svm_mem, svm_paging(sregs)?, sregs.cr3);
        engine.read_twins(profile, svm_paging(sregs)?, sregs.cr3);
        let mut list = vec![0u8; BUFFER_LIST_SIZE];
        program
            .read(regs.rcx, &mut list, Privilege::User)
            .map_err(|source| Error::BufferListUnreadable {
                at: regs.rcx,
                source,
            })?;
        engine.removing = None;
        if regs.rax == SYS_DELETE_MODULE {
            engine.removing = program
                .read_cstr(regs.rdi, traps::MODULE_NAME_LEN, Privilege::User)
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok());
        }
        engine.load_buffers(&BufferList::decode(&list)?, &program)
    }

    /// Runs a prepared call on the GVM (the worker thread) of the program whose address
    /// space is `space`, under `hold` if it holds the GVM for that program already. The
    /// hold is left in place for the program's next call if the call returned and no
    /// park came between; else it is released ([`Executor::release`]).
    pub(super) fn run_call<'e>(
        &'e self,
        engine: &mut Engine,
        profile: &CallProfile,
        regs: &kvm_regs,
        space: u64,
        hold: &mut Option<Hold<'e>>,
    ) -> Result<i64, Error> {
        if hold.as_ref().is_some_and(|h| h.space != space) {
            self.release(engine, hold.take(), HoldEnd::OtherProgram);
        }
        let result = self.segments(engine, profile, regs, space, hold);
        if engine.layout.also_exec.take().is_some() || result.is_err() {
            // The next call's view must not let the module run; a failed call (rolled
            // back, refused) ends the hold.
            self.release(engine, hold.take(), HoldEnd::Call);
        }
        result
    }

    /// Holds the GVM: its vCPUs at a safe point, then its devices (a disk must not write
    /// guest memory while a call runs or commits, `vstate::dma_gate`). The CPU lent is the
    /// one a parked call slept on (its stack and per-cpu state expect it), else an idle
    /// one, else any.
    fn take_hold(
        &self,
        engine: &Engine,
        space: u64,
        parked: Option<&Parked>,
    ) -> Result<Hold<'_>, Error> {
        let policy = QuiescePolicy {
            budget: QUIESCE_BUDGET,
            park_timeout: PARK_TIMEOUT,
            ..QuiescePolicy::default()
        };
        let started = Instant::now();
        let exclusive = self.hold_gvm();
        let held = quiesce::quiesce(&engine.parts.gvm_vcpus, policy).and_then(|held| match engine
            .parts
            .gvm_dma
            .pause(PARK_TIMEOUT)
        {
            Some(paused) => Ok((held, paused)),
            None => Err(quiesce::QuiesceError::Busy(
                format!("a device was still in the middle of a request after {PARK_TIMEOUT:?}"),
                held.attempts,
            )),
        });
        self.stats.phases.since(Phase::Quiesce, started);
        let (vcpus, devices) = held?;
        let lent = match parked {
            Some(p) => vcpus.snapshots.iter().find(|s| s.index == p.cpu),
            None => vcpus
                .snapshots
                .iter()
                .find(|s| s.halted)
                .or(vcpus.snapshots.first()),
        }
        .copied()
        // (Dropping the guards lets the GVM go again.)
        .ok_or(Error::NoCpuToLend)?;
        Ok(Hold {
            started,
            space,
            lent,
            calls: 0,
            went_through: false,
            devices,
            vcpus,
            _exclusive: exclusive,
        })
    }

    /// Lets the GVM go again: its devices, its vCPUs, then, if a call of the hold went
    /// through, the reschedule IPIs its wake-ups (a signal, a released lock, queued work)
    /// owe the GVM's CPUs, so they take effect now and not at the next interrupt.
    pub(super) fn release(&self, engine: &Engine, hold: Option<Hold<'_>>, why: HoldEnd) {
        let Some(Hold {
            started: held_since,
            went_through,
            devices,
            vcpus,
            ..
        }) = hold
        else {
            return;
        };
        self.stats.hold_ends[why as usize].fetch_add(1, Ordering::Relaxed);
        let phases = &self.stats.phases;
        let started = Instant::now();
        drop(devices);
        drop(vcpus);
        phases.since(Phase::Release, started);
        self.stats.record_hold(held_since.elapsed());
        if went_through {
            let started = Instant::now();
            engine.kick_gvm_cpus();
            phases.since(Phase::Ipi, started);
        }
    }

    fn segments<'e>(
        &'e self,
        engine: &mut Engine,
        profile: &CallProfile,
        regs: &kvm_regs,
        space: u64,
        hold: &mut Option<Hold<'e>>,
    ) -> Result<i64, Error> {
        let mut parked: Option<Parked> = None;
        let mut pause = PARK_MIN;
        let call_started = Instant::now();
        let mut retried_after_gvm_ran = false;
        loop {
            let h = match hold {
                Some(h) => h,
                None => match self.take_hold(engine, space, parked.as_ref()) {
                    Ok(h) => hold.insert(h),
                    Err(e) if parked.is_none() => return Err(e),
                    Err(e) => {
                        // A parked call must be resumed: keep trying within its budget.
                        if call_started.elapsed() > self.call_deadline {
                            return Err(give_up(engine, Error::StayedBusy(Box::new(e))));
                        }
                        continue;
                    }
                },
            };
            // The GVM's TSC counts on while it is held, and so does the redirect vCPU's
            // once set: it is set at a hold's first call only.
            let first_of_hold = h.calls == 0;
            let earlier_went_through = h.went_through;
            h.calls += 1;
            let end = self
                .gvm_profile(engine, profile, &h.lent.control)
                .and_then(|gvm_profile| Segment::open(engine, gvm_profile, &self.stats, &h.lent))
                .and_then(|segment| segment.run(regs, parked.as_ref(), first_of_hold));
            match end {
                Ok(SegmentEnd::Returned(v)) => {
                    h.went_through = true;
                    return Ok(v);
                }
                Ok(SegmentEnd::Stopped(Error::WouldBlock))
                    if earlier_went_through && !retried_after_gvm_ran =>
                {
                    // It may wait for what an earlier call of the hold set off (a message,
                    // a signal to a GVM process that answers), which the GVM could not act
                    // on while held. The rollback left the GVM as it was: once more, after
                    // the GVM has run a moment, under a hold of its own.
                    self.release(engine, hold.take(), HoldEnd::Call);
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    retried_after_gvm_ran = true;
                    std::thread::sleep(PARK_MIN);
                }
                Ok(SegmentEnd::Stopped(e)) | Err(e) => {
                    self.release(engine, hold.take(), HoldEnd::Call);
                    return Err(match parked {
                        Some(_) => give_up(engine, e),
                        None => e,
                    });
                }
                Ok(SegmentEnd::Slept(at)) => {
                    // The GVM must run to make the progress the call waits for.
                    h.went_through = true;
                    self.release(engine, hold.take(), HoldEnd::Call);
                    self.stats.parked.fetch_add(1, Ordering::Relaxed);
                    parked = Some(at);
                    // A call that passed its deadline is given up at its next park: the
                    // bound is the deadline plus one segment (a quiesce, up to
                    // QUIESCE_BUDGET, and a run, up to 5 s).
                    if call_started.elapsed() > self.call_deadline {
                        return Err(give_up(engine, Error::TookTooLong(self.call_deadline)));
                    }
                    let parking = Instant::now();
                    std::thread::sleep(pause);
                    self.stats.phases.since(Phase::Park, parking);
                    pause = (pause * 2).min(PARK_MAX);
                }
            }
        }
    }
}

/// Why a hold ended (`info`'s `redirect_hold_ends_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// It was as old as the slice.
    Slice,
    /// The program's next call did not come within the idle gap.
    Idle,
    /// A call of another program came.
    OtherProgram,
    /// A call failed, was rolled back or parked, or removed a module.
    Call,
}

impl HoldEnd {
    pub const ALL: [HoldEnd; 4] = [
        HoldEnd::Slice,
        HoldEnd::Idle,
        HoldEnd::OtherProgram,
        HoldEnd::Call,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HoldEnd::Slice => "slice",
            HoldEnd::Idle => "idle",
            HoldEnd::OtherProgram => "other_program",
            HoldEnd::Call => "call",
        }
    }
}

/// The GVM held for one program's run of calls: its vCPUs parked, its devices paused, one
/// CPU lent to each call in turn. The worker keeps it between the program's calls for as
/// long as the hold policy allows (`port.rs`); dropping it without
/// [`Executor::release`] lets the GVM go as well, without the IPIs.
pub(super) struct Hold<'e> {
    pub started: Instant,
    /// The address space of the program the calls come from (`port::address_space`).
    pub space: u64,
    /// The held CPU the calls borrow.
    lent: VcpuSnapshot,
    /// Calls run in it so far.
    pub calls: u64,
    /// Whether a call committed anything (the GVM's CPUs are sent IPIs at the release).
    went_through: bool,
    // Released devices first, then vCPUs, then the exclusion (field order is drop order;
    // `release` drops the first two itself, in that order, before the exclusion).
    devices: crate::vstate::dma_gate::DmaPaused,
    vcpus: quiesce::Quiesced,
    _exclusive: std::sync::MutexGuard<'e, ()>,
}

/// How to walk the page tables of the SVM program whose control registers are `sregs`.
pub(super) fn svm_paging(sregs: &kvm_sregs) -> Result<PagingMode, Error> {
    PagingMode::from_control_regs(sregs.cr0, sregs.cr4, sregs.efer, DEFAULT_MAX_PHYS_BITS)
        .map_err(Error::SvmPaging)
}

/// A parked call that cannot be finished stays parked in the GVM; the engine stops.
fn give_up(engine: &mut Engine, why: Error) -> Error {
    engine.stopped = true;
    Error::LeftParked(Box::new(why))
}
