//! One segment of a redirected call: a held GVM CPU is lent to the shadow task, the
//! redirect vCPU runs as that CPU until the call returns or stops, the call's stores are
//! committed or dropped, and the CPU is given back (see `call.rs` for how segments make
//! a call).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use redirect::call_profile::CallProfile;
use redirect::lend::{CallState, LentCpu};
use redirect::paging::{AddressSpace, PagingMode, Privilege, DEFAULT_MAX_PHYS_BITS};
use redirect::shadow::{ShadowBlock, BLOCK_ORDER};
use redirect::traps::{self, CallMemory, Trap};

use super::engine::{AsCpu, Counters, Engine, Entry, Stop};
use super::error::{Error, Rollback};
use super::timing::Phase;
use super::Stats;
use crate::vstate::quiesce::{ControlState, VcpuSnapshot};

/// `delete_module`'s system call number (x86-64).
pub(super) const SYS_DELETE_MODULE: u64 = 176;

/// A call parked at `__schedule`, to be resumed.
#[derive(Clone, Copy)]
pub(super) struct Parked {
    regs: kvm_regs,
    /// The CPU it slept on: its stack and per-cpu state expect that one.
    pub cpu: u8,
    /// What the call had added to the lent CPU's preempt count, and its stack canary.
    state: CallState,
}

/// How a segment ended.
pub(super) enum SegmentEnd {
    Returned(i64),
    /// Parked at `__schedule` and committed.
    Slept(Parked),
    /// Stopped; this segment's stores were dropped.
    Stopped(Error),
}

/// A held GVM CPU, lent to the call for one segment.
pub(super) struct Segment<'a> {
    engine: &'a mut Engine,
    profile: &'a CallProfile,
    stats: &'a Stats,
    cpu: u8,
    control: ControlState,
    mode: PagingMode,
    words: LentCpu,
    /// Time spent lending the CPU so far (reading its words, preparing the shadow).
    lending: Duration,
}

impl<'a> Segment<'a> {
    /// Checks the held CPU `lent` and reads the per-cpu words it will lend.
    pub fn open(
        engine: &'a mut Engine,
        profile: &'a CallProfile,
        stats: &'a Stats,
        lent: &VcpuSnapshot,
    ) -> Result<Segment<'a>, Error> {
        let started = Instant::now();
        let (cpu, control) = (lent.index, lent.control);
        let syms = &profile.kernel.symbols;
        // The GVM's own LSTAR, CR0, CR4 and EFER decide nothing about the run (the view
        // runs with the trusted SVM kernel's, `regs::TrustedControl`): a rootkit that
        // hooked the GVM's syscall entry is inspected like any other GVM. Its paging mode
        // only says how to walk its tables (hostile-safe).
        let mode = PagingMode::from_control_regs(
            control.cr0,
            control.cr4,
            control.efer,
            DEFAULT_MAX_PHYS_BITS,
        )
        .map_err(|source| Error::GvmPaging { cpu, source })?;
        let kernel = AddressSpace::new(&engine.parts.gvm_mem, mode, control.cr3);
        let words = LentCpu::read(
            &kernel,
            syms.per_cpu_offset,
            u32::from(cpu),
            &profile.percpu,
        )?;
        Ok(Segment {
            engine,
            profile,
            stats,
            cpu,
            control,
            mode,
            words,
            lending: started.elapsed(),
        })
    }

    /// Runs the program's call `regs` (or resumes it where it was parked), settles its
    /// stores and gives the CPU back. `after_gvm_ran`: the hold's first call (see
    /// `engine::AsCpu`).
    pub fn run(
        self,
        regs: &kvm_regs,
        resume: Option<&Parked>,
        after_gvm_ran: bool,
    ) -> Result<SegmentEnd, Error> {
        // A handle of its own: the kernel's address space is read while the engine, which
        // owns the GVM's memory handle, is used mutably.
        let gvm_mem = self.engine.parts.gvm_mem.clone();
        let kernel = AddressSpace::new(&gvm_mem, self.mode, self.control.cr3);
        self.run_on(&kernel, regs, resume, after_gvm_ran)
    }

    fn run_on(
        mut self,
        kernel: &AddressSpace<'_>,
        regs: &kvm_regs,
        resume: Option<&Parked>,
        after_gvm_ran: bool,
    ) -> Result<SegmentEnd, Error> {
        let shadow = self.shadow(kernel)?;
        let (profile, cpu) = (self.profile, self.cpu);
        if after_gvm_ran || resume.is_some() {
            // The GVM ran: it may have loaded, removed or rewritten modules.
            let started = Instant::now();
            let changed = self.engine.check_modules(profile, kernel)?;
            self.stats.phases.since(Phase::View, started);
            if let Some(summary) = changed {
                *crate::sync::lock(&self.stats.modules) = summary;
            }
        }
        let started = Instant::now();
        if resume.is_none() {
            if regs.rax == SYS_DELETE_MODULE {
                self.engine.layout.also_exec = self.module_being_removed(kernel);
            }
            shadow.prepare_call(kernel, &profile.shadow, u32::from(cpu))?;
        }
        // A resumed call keeps its preempt count and the canary it started with.
        let lend = self.words.lend(
            kernel,
            shadow.task(),
            shadow.stack_top(),
            resume.map(|p| p.state),
        );
        let phases = &self.stats.phases;
        phases.record(Phase::Lend, self.lending + started.elapsed());
        let counters = Counters {
            exits: &self.stats.exits,
            console: &self.stats.console_exits,
            phases: &self.stats.phases,
        };
        let run = match (lend, resume) {
            (Err(e), _) => Err(Stop::Failed(e.into())),
            (Ok(()), None) => {
                let as_cpu = AsCpu {
                    cpu,
                    control: &self.control,
                    pcpu_base: self.words.pcpu_base(),
                    after_gvm_ran,
                };
                let entry = Entry::Syscall(regs);
                self.engine.start(profile, as_cpu, entry, counters)
            }
            (Ok(()), Some(p)) => self
                .engine
                .resume(profile, cpu, &self.control, &p.regs, counters),
        };
        let end = self.settle(kernel, shadow, run, resume.is_some());
        let started = Instant::now();
        let restored = self.words.give_back(kernel);
        phases.since(Phase::GiveBack, started);
        let end = end?;
        restored.map_err(|source| Error::GiveBack { cpu, source })?;
        Ok(end)
    }

    /// The shadow block, made at the first call: taken from the GVM's own page allocator
    /// by a kernel-function call on this CPU, which is not yet lent to anyone (it runs as
    /// whatever task the CPU was running, with preemption off, and cannot sleep).
    fn shadow(&mut self, kernel: &AddressSpace<'_>) -> Result<ShadowBlock, Error> {
        if let Some(block) = self.engine.shadow {
            return Ok(block);
        }
        let profile = self.profile;
        let syms = &profile.kernel.symbols;
        self.words.disable_preemption(kernel)?;
        let entry = Entry::Function {
            address: syms.get_free_pages,
            // No GFP flags: an allocation that neither sleeps nor reclaims.
            args: [0, BLOCK_ORDER],
        };
        // The executor's own kernel-function calls are not redirected calls: their exits
        // are counted apart.
        let counters = Counters {
            exits: &self.stats.setup_exits,
            console: &self.stats.console_exits,
            phases: &self.stats.phases,
        };
        let as_cpu = AsCpu {
            cpu: self.cpu,
            control: &self.control,
            pcpu_base: self.words.pcpu_base(),
            after_gvm_ran: true,
        };
        let run = self.engine.start(profile, as_cpu, entry, counters);
        let settled = self.engine.settle(run.is_ok(), &self.stats.phases);
        let restored = self.words.give_back(kernel);
        let block = match run {
            Ok(v) => v as u64,
            Err(Stop::Trap(trap, args)) => {
                let memory = CallMemory::gvm_only(kernel);
                let report = traps::describe(trap, args, &memory, profile.modules.as_ref());
                return Err(Error::ShadowAllocation(Box::new(Error::Trapped(report))));
            }
            Err(Stop::Failed(e)) => return Err(Error::ShadowAllocation(Box::new(e))),
        };
        settled.map_err(Error::Commit)?;
        restored.map_err(|source| Error::GiveBack {
            cpu: self.cpu,
            source,
        })?;
        let block = ShadowBlock::at(block)?;
        block.install(kernel, syms.init_task, &profile.shadow, u32::from(self.cpu))?;
        log::info!("redirect: shadow task at {:#x} (GVM memory)", block.task());
        self.engine.shadow = Some(block);
        Ok(block)
    }

    /// Commits or drops what the segment wrote, according to how it ended (see `call.rs`).
    /// The lent CPU's per-cpu words are still the shadow's here.
    fn settle(
        &mut self,
        kernel: &AddressSpace<'_>,
        shadow: ShadowBlock,
        run: Result<i64, Stop>,
        was_parked: bool,
    ) -> Result<SegmentEnd, Error> {
        let engine = &mut *self.engine;
        let why = match run {
            Ok(v) => {
                let pages = engine
                    .settle(true, &self.stats.phases)
                    .map_err(Error::Commit)?;
                self.stats
                    .committed_pages
                    .fetch_add(pages, Ordering::Relaxed);
                return Ok(SegmentEnd::Returned(v));
            }
            Err(Stop::Trap(Trap::Sleep, _)) => {
                let layout = &self.profile.shadow;
                // A state that cannot be read counts as an uninterruptible sleep.
                let state = shadow
                    .state_va(layout)
                    .ok()
                    .and_then(|va| engine.read_private_u32(kernel, va))
                    .unwrap_or(2);
                if !was_parked && ShadowBlock::waits_interruptibly(state) {
                    engine
                        .settle(false, &self.stats.phases)
                        .map_err(Error::Commit)?;
                    self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                    return Ok(SegmentEnd::Stopped(Error::WouldBlock));
                }
                return self.park(kernel, shadow);
            }
            Err(Stop::Trap(trap, args)) => {
                let window = |va: u64, buf: &mut [u8]| engine.read_window(va, buf);
                let memory = CallMemory {
                    kernel,
                    window: &window,
                };
                let mut report =
                    traps::describe(trap, args, &memory, self.profile.modules.as_ref());
                // A module's code the view would not run: say why it was not trusted.
                if trap == Trap::KernelProtectionFault {
                    let why = self
                        .profile
                        .modules
                        .as_ref()
                        .and_then(|m| m.module_at(&memory, args.0[1]))
                        .and_then(|name| Some((engine.why_untrusted(&name)?, name)));
                    if let Some((why, name)) = why {
                        report.push_str(&format!("; module {name} is not trusted: {why}"));
                    }
                }
                Error::Trapped(report)
            }
            Err(Stop::Failed(e)) => e,
        };
        let rollback = match (engine.settle(false, &self.stats.phases), was_parked) {
            (Ok(_), false) => Rollback::Unchanged,
            (Ok(_), true) => Rollback::LastSegment,
            (Err(e), _) => Rollback::Failed(e),
        };
        self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
        Ok(SegmentEnd::Stopped(Error::Stopped {
            why: Box::new(why),
            rollback,
        }))
    }

    /// Parks a call stopped at `__schedule`: commits it, makes `__schedule` return (the
    /// call's wait loop will see a spurious wake-up and check its condition again), and
    /// marks the shadow running so GVM wake-ups leave run queues alone.
    fn park(
        &mut self,
        kernel: &AddressSpace<'_>,
        shadow: ShadowBlock,
    ) -> Result<SegmentEnd, Error> {
        let mut regs = self.engine.stopped_registers()?;
        let pages = self
            .engine
            .settle(true, &self.stats.phases)
            .map_err(Error::Commit)?;
        self.stats
            .committed_pages
            .fetch_add(pages, Ordering::Relaxed);
        let mut ret = [0u8; 8];
        kernel
            .read(regs.rsp, &mut ret, Privilege::Supervisor)
            .map_err(|source| Error::GvmPaging {
                cpu: self.cpu,
                source,
            })?;
        // The resume address is recorded now, from the frame the trusted text's call to
        // `__schedule` just pushed (the GVM has been held since); and it must lead back
        // into the trusted text, or the call is not resumed at all.
        regs.rip = u64::from_le_bytes(ret);
        let (text_start, text_end) = self.engine.layout.exec_text;
        if !(text_start..text_end).contains(&regs.rip) {
            return Err(Error::ResumeOutsideText(regs.rip));
        }
        // RSP is the GVM kernel's: never wrapped (the read above already refused a frame
        // that ends past the address space).
        regs.rsp = regs.rsp.checked_add(8).ok_or(Error::GvmPaging {
            cpu: self.cpu,
            source: redirect::WalkError::AddressOverflow {
                gva: regs.rsp,
                len: 8,
            },
        })?;
        let state = self.words.park(kernel)?;
        shadow.mark_running(kernel, &self.profile.shadow)?;
        Ok(SegmentEnd::Slept(Parked {
            regs,
            cpu: self.cpu,
            state,
        }))
    }

    /// The text of the module a `delete_module` call names, if it is loaded: removing a
    /// module runs its own exit function, so for that call (only) its text is executable
    /// in the view. The name was read from the program's memory when the call began.
    fn module_being_removed(&self, kernel: &AddressSpace<'_>) -> Option<(u64, u64)> {
        let name = self.engine.removing.as_deref()?;
        let text = self
            .profile
            .modules
            .as_ref()?
            .module_text(&CallMemory::gvm_only(kernel), name);
        if let Some((start, end)) = text {
            log::info!(
                "redirect: delete_module({name}): its text {start:#x}..{end:#x} may run in this call"
            );
        }
        text
    }
}
