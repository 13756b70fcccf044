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
        engine.trust(trusted.checked(syms.entry_syscall_64)?, syms.idt_table)?;
        // The call reaches copies of the ranges the shim listed, and nothing else of the
        // SVM; what it may write is copied back only if it returns (`finish`).
        let svm_mem = engine.parts.svm_mem.clone();
        let program = AddressSpace::new(&svm_mem, svm_paging(sregs)?, sregs.cr3);
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

    /// Runs a prepared call on the GVM (the worker thread).
    pub(super) fn run_call(
        &self,
        engine: &mut Engine,
        profile: &CallProfile,
        regs: &kvm_regs,
    ) -> Result<i64, Error> {
        let _exclusive = self.hold_gvm();
        let result = self.segments(engine, profile, regs);
        engine.layout.also_exec = None;
        result
    }

    fn segments(
        &self,
        engine: &mut Engine,
        profile: &CallProfile,
        regs: &kvm_regs,
    ) -> Result<i64, Error> {
        let policy = QuiescePolicy {
            budget: QUIESCE_BUDGET,
            park_timeout: PARK_TIMEOUT,
            ..QuiescePolicy::default()
        };
        let mut parked: Option<Parked> = None;
        let mut pause = PARK_MIN;
        let call_started = Instant::now();
        loop {
            let started = Instant::now();
            // The vCPUs, then the devices: a disk must not write guest memory while the
            // call runs or commits (`vstate::dma_gate`).
            let gvm_dma = engine.parts.gvm_dma.clone();
            let held = quiesce::quiesce(&engine.parts.gvm_vcpus, policy).and_then(|held| {
                match gvm_dma.pause(PARK_TIMEOUT) {
                    Some(paused) => Ok((held, paused)),
                    None => Err(quiesce::QuiesceError::Busy(
                        format!(
                            "a device was still in the middle of a request after {PARK_TIMEOUT:?}"
                        ),
                        held.attempts,
                    )),
                }
            });
            let (held, devices_paused) = match held {
                Ok(held) => held,
                Err(e) if parked.is_none() => return Err(e.into()),
                Err(e) => {
                    // A parked call must be resumed: keep trying within its budget.
                    if call_started.elapsed() > self.call_deadline {
                        return Err(give_up(engine, Error::StayedBusy(e)));
                    }
                    continue;
                }
            };
            // The CPU a parked call slept on (its stack and per-cpu state expect it), else
            // an idle one, else any.
            let pick: Option<&VcpuSnapshot> = match parked {
                Some(p) => held.snapshots.iter().find(|s| s.index == p.cpu),
                None => held
                    .snapshots
                    .iter()
                    .find(|s| s.halted)
                    .or(held.snapshots.first()),
            };
            let end = match pick {
                Some(lent) => Segment::open(engine, profile, &self.stats, lent)
                    .and_then(|segment| segment.run(regs, parked.as_ref())),
                None => Err(Error::NoCpuToLend),
            };
            drop(devices_paused);
            drop(held);
            self.stats.record_hold(started.elapsed());
            match end {
                Ok(SegmentEnd::Returned(v)) => return Ok(v),
                Ok(SegmentEnd::Stopped(e)) | Err(e) => {
                    return Err(match parked {
                        Some(_) => give_up(engine, e),
                        None => e,
                    })
                }
                Ok(SegmentEnd::Slept(at)) => {
                    self.stats.parked.fetch_add(1, Ordering::Relaxed);
                    parked = Some(at);
                    // A call that passed its deadline is given up at its next park: the
                    // bound is the deadline plus one segment (a quiesce, up to
                    // QUIESCE_BUDGET, and a run, up to 5 s).
                    if call_started.elapsed() > self.call_deadline {
                        return Err(give_up(engine, Error::TookTooLong(self.call_deadline)));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(PARK_MAX);
                }
            }
        }
    }
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
