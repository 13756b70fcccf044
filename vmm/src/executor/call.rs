//! One redirected call, from the SVM program's OUT to its result.
//!
//! A call runs in *segments*. Each segment holds the GVM (quiesce), lends one of its CPUs
//! to the shadow task, runs the redirect vCPU until the call returns or stops at a trap,
//! then commits or drops the call's stores (`cow.rs`) and gives the CPU back:
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
//! than [`SLEEP_BUDGET`], or fails after it has been parked, stays parked, like a task
//! in D state: the GVM stays consistent, and the engine refuses further calls.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuExit;
use redirect::lend::{CallState, LentCpu, PerCpuOffsets};
use redirect::paging::{AddressSpace, PagingMode, Privilege, DEFAULT_MAX_PHYS_BITS};
use redirect::shadow::{shadow_files, shadow_task, ShadowPlace};
use redirect::view::{build_view, offsets, ViewLayout, KERNEL_RETURN_SLOT, KSTUB_KVA};
use redirect::GuestPhysMemory;
use std::sync::atomic::Ordering;
use svm_runtime::redirect_abi::Status;

use super::regs;
use super::{
    Engine, Executor, Outcome, Profile, CALL_TIMEOUT, ERRNO_EBUSY, ERRNO_EIO, ERRNO_ENOSYS,
    KVM_MP_STATE_RUNNABLE, MSI_APIC_BASE, PARK_TIMEOUT, QUIESCE_BUDGET, RESCHEDULE_VECTOR,
};
use crate::boot::cpu::MSR_IA32_TSC;
use crate::sync::lock;
use crate::vstate::quiesce::{self, ControlState, QuiesceError, QuiescePolicy, VcpuSnapshot};
use redirect::traps::{self, Args, CallMemory, Trap};
use redirect::view::{WINDOW_KVA, WINDOW_SIZE};

/// Linux `__state` bits.
const TASK_INTERRUPTIBLE: u32 = 1;
const TASK_UNINTERRUPTIBLE: u32 = 2;
/// How long a call may stay parked, in total, before it is given up (left parked).
const SLEEP_BUDGET: Duration = Duration::from_secs(20);
/// First and longest pause of a parked call before it is resumed.
const PARK_MIN: Duration = Duration::from_millis(1);
const PARK_MAX: Duration = Duration::from_millis(50);
/// The shadow block: 2^4 GVM pages (64 KiB, aligned to its size) holding the shadow's
/// kernel stack (THREAD_SIZE, aligned), task and file table.
const SHADOW_ORDER: u64 = 4;
const SHADOW_TASK_OFF: u64 = 0x4000;
const SHADOW_FILES_OFF: u64 = 0x8000;
const SHADOW_BLOCK: u64 = 0x1_0000;
/// The stack the executor's own kernel-function calls run on, in the window.
const SCRATCH_STACK_TOP: u64 = offsets::SCRATCH_STACK + offsets::STACK_SIZE;
/// `delete_module`'s system call number (x86-64).
const SYS_DELETE_MODULE: u64 = 176;

/// Where the shadow lives in GVM memory (direct-map addresses of the shadow block).
#[derive(Debug, Clone, Copy)]
pub(super) struct ShadowAt {
    block: u64,
}

impl ShadowAt {
    fn task(&self) -> u64 {
        self.block + SHADOW_TASK_OFF
    }
    /// The kernel stack is the block's first THREAD_SIZE bytes.
    fn stack_top(&self) -> u64 {
        self.block + offsets::STACK_SIZE
    }
}

/// The GVM CPU a segment runs as: its control state and its per-cpu words as the GVM had
/// them (`redirect::lend`).
struct Lent {
    cpu: u8,
    control: ControlState,
    words: LentCpu,
}

/// A call parked at `__schedule`, to be resumed.
#[derive(Clone, Copy)]
struct Parked {
    regs: kvm_regs,
    cpu: u8,
    /// What the call had added to the lent CPU's preempt count, and the stack canary its
    /// frames were entered with (the canary is per task, loaded into a per-cpu word at
    /// each context switch; the lent CPU has run other tasks since).
    state: CallState,
}

/// How a segment ended.
enum SegmentEnd {
    Returned(i64),
    /// Parked at `__schedule` and committed.
    Slept(Parked),
    /// Stopped; this segment's stores were dropped.
    Stopped(String),
}

/// How a call ended when it did not return.
pub(super) enum Stop {
    /// At a trap, with the trapped function's first four arguments.
    Trap(Trap, Args),
    Failed(String),
}

impl From<String> for Stop {
    fn from(why: String) -> Stop {
        Stop::Failed(why)
    }
}

enum CallError {
    Busy(String),
    Failed(String),
}

/// Where the redirect vCPU starts.
enum Entry<'a> {
    /// At the stub, in user mode: `syscall` with the program's registers.
    Syscall(&'a kvm_regs),
    /// At a kernel function, in kernel mode, returning to the kernel stub.
    Function { address: u64, args: [u64; 2] },
}

impl Executor {
    /// Runs the system call in `regs` (RAX = number, RDI RSI RDX R10 R8 R9 = arguments) of
    /// the SVM program whose control registers are `sregs`.
    pub fn call(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Outcome {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let fail = |status: Status, errno: i64, why: String| {
            log::warn!("redirected syscall {} failed: {why}", regs.rax);
            *lock(&self.stats.last_error) =
                format!("syscall {}: {}", regs.rax, why.replace('\n', " "));
            Outcome {
                result: -errno,
                status,
            }
        };
        let profile = match self.profile.get() {
            Some(Ok(p)) => p,
            Some(Err(e)) => return fail(Status::NotReady, ERRNO_ENOSYS, e.clone()),
            None => {
                return fail(
                    Status::NotReady,
                    ERRNO_ENOSYS,
                    "the SVM has not reported its kernel symbols yet".into(),
                )
            }
        };
        let mut guard = lock(&self.engine);
        let engine = match guard.as_mut() {
            Ok(e) => e,
            Err(e) => return fail(Status::NotReady, ERRNO_ENOSYS, e.clone()),
        };
        let result = if let Some(why) = &engine.stuck {
            Err(CallError::Failed(why.clone()))
        } else if regs.rax == SYS_DELETE_MODULE && engine.parts.gvm_vcpus.len() > 1 {
            // Freeing a module's memory flushes every CPU's TLB by IPI and waits for the
            // others, which are held during the call: it would end parked, holding the
            // GVM's rtnl and module locks. Refused before anything runs.
            Err(CallError::Failed(
                "delete_module is not redirected to a GVM with more than one CPU: unloading \
                 waits for the other CPUs (a TLB flush by IPI), which are held during a call"
                    .into(),
            ))
        } else {
            let _exclusive = self.hold_gvm();
            let result = self.run_call(engine, profile, regs, sregs);
            engine.layout.also_exec = None;
            result
        };
        match result {
            Ok(result) => Outcome {
                result,
                status: Status::Done,
            },
            Err(CallError::Busy(why)) => {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                fail(Status::Busy, ERRNO_EBUSY, why)
            }
            Err(CallError::Failed(why)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                fail(Status::Failed, ERRNO_EIO, why)
            }
        }
    }

    fn run_call(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Result<i64, CallError> {
        let policy = QuiescePolicy {
            budget: QUIESCE_BUDGET,
            park_timeout: PARK_TIMEOUT,
            ..QuiescePolicy::default()
        };
        let mut parked: Option<Parked> = None;
        let mut slept = Duration::ZERO;
        let mut pause = PARK_MIN;
        loop {
            let started = Instant::now();
            let held = match quiesce::quiesce(&engine.parts.gvm_vcpus, policy) {
                Ok(h) => h,
                Err(e) => {
                    let why = e.to_string();
                    let busy = matches!(e, QuiesceError::Busy(..));
                    if parked.is_none() {
                        return Err(if busy {
                            CallError::Busy(why)
                        } else {
                            CallError::Failed(why)
                        });
                    }
                    // A parked call must be resumed: keep trying within its budget.
                    slept += QUIESCE_BUDGET;
                    if slept > SLEEP_BUDGET {
                        return Err(self.give_up(engine, &format!("the GVM stayed busy: {why}")));
                    }
                    continue;
                }
            };
            // The CPU a parked call slept on (its stack and per-cpu state expect it), else
            // an idle one, else any.
            let wanted = parked.map(|p| p.cpu);
            let pick: Option<&VcpuSnapshot> = match wanted {
                Some(cpu) => held.snapshots.iter().find(|s| s.index == cpu),
                None => held
                    .snapshots
                    .iter()
                    .find(|s| s.halted)
                    .or(held.snapshots.first()),
            };
            let Some(lent) = pick.copied() else {
                let why = "the GVM has no vCPU to lend";
                return Err(if parked.is_some() {
                    self.give_up(engine, why)
                } else {
                    CallError::Failed(why.into())
                });
            };
            let end = self.segment(
                engine,
                profile,
                lent.index,
                &lent.control,
                regs,
                sregs,
                parked.as_ref(),
            );
            drop(held);
            self.stats.record_hold(started.elapsed());
            match end {
                Ok(SegmentEnd::Returned(v)) => return Ok(v),
                Ok(SegmentEnd::Stopped(why)) if parked.is_none() => {
                    return Err(CallError::Failed(why))
                }
                Ok(SegmentEnd::Stopped(why)) | Err(why) if parked.is_some() => {
                    return Err(self.give_up(engine, &why))
                }
                Ok(SegmentEnd::Stopped(why)) | Err(why) => return Err(CallError::Failed(why)),
                Ok(SegmentEnd::Slept(at)) => {
                    self.stats.parked.fetch_add(1, Ordering::Relaxed);
                    parked = Some(at);
                    if slept > SLEEP_BUDGET {
                        return Err(self.give_up(
                            engine,
                            &format!("the call slept for more than {SLEEP_BUDGET:?}"),
                        ));
                    }
                    std::thread::sleep(pause);
                    slept += pause;
                    pause = (pause * 2).min(PARK_MAX);
                }
            }
        }
    }

    /// A parked call that cannot be finished stays parked in the GVM; the engine stops.
    fn give_up(&self, engine: &mut Engine, why: &str) -> CallError {
        let stuck = format!(
            "{why}; the call had already slept in the GVM kernel, so its first steps are the \
             GVM's: it stays parked there like a task in uninterruptible sleep, with any lock \
             it holds, and the redirect engine stops (restart the instance)"
        );
        engine.stuck = Some(
            "a previous redirected call is left sleeping in the GVM kernel; the redirect \
             engine is stopped (restart the instance)"
                .into(),
        );
        CallError::Failed(stuck)
    }

    /// One segment on GVM CPU `cpu` (held): lend it to the shadow, run, settle, give back.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        cpu: u8,
        control: &ControlState,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        resume: Option<&Parked>,
    ) -> Result<SegmentEnd, String> {
        let syms = &profile.kernel.symbols;
        let gvm_mem = engine.parts.gvm_mem.clone();
        let mode = PagingMode::from_control_regs(
            control.cr0,
            control.cr4,
            control.efer,
            DEFAULT_MAX_PHYS_BITS,
        )
        .map_err(|e| format!("GVM vCPU {cpu}: {e}"))?;
        let kernel = AddressSpace::new(&gvm_mem, mode, control.cr3);
        if control.lstar != syms.entry_syscall_64 {
            return Err(format!(
                "the GVM's LSTAR {:#x} is not entry_SYSCALL_64 {:#x}: its syscall entry is hooked or it runs another kernel",
                control.lstar, syms.entry_syscall_64
            ));
        }
        let offsets = PerCpuOffsets {
            current_task: syms.current_task,
            top_of_stack: syms.cpu_current_top_of_stack,
            preempt_count: profile.preempt_count,
            fpregs_owner: profile.fpregs_owner,
            stack_canary: profile.stack_canary,
        };
        let mut lent = Lent {
            cpu,
            control: *control,
            words: LentCpu::read(&kernel, syms.per_cpu_offset, u32::from(cpu), &offsets)
                .map_err(|e| e.to_string())?,
        };
        let shadow = match engine.shadow {
            Some(s) => s,
            None => {
                let s = self.install_shadow(engine, profile, &kernel, &lent, sregs)?;
                engine.shadow = Some(s);
                s
            }
        };
        let lay = &profile.shadow;
        if resume.is_none() {
            if regs.rax == SYS_DELETE_MODULE {
                engine.layout.also_exec =
                    self.module_being_removed(engine, profile, &kernel, regs, sregs);
            }
            // Per call: the shadow runs on `cpu`, and its FPU state is not in any CPU's
            // registers (the kernel restores it on the way out, as for any task).
            write_bytes(
                &kernel,
                shadow.task() + lay.ti_cpu,
                &u32::from(cpu).to_le_bytes(),
            )?;
            write_bytes(
                &kernel,
                shadow.task() + lay.ti_flags,
                &redirect::shadow::THREAD_FLAGS_AT_CALL.to_le_bytes(),
            )?;
            write_bytes(
                &kernel,
                shadow.task() + lay.fpu_last_cpu,
                &u32::MAX.to_le_bytes(),
            )?;
        }
        // A resumed call keeps its preempt count and the canary it started with.
        let lend = lent
            .words
            .lend(
                &kernel,
                shadow.task(),
                shadow.stack_top(),
                resume.map(|p| p.state),
            )
            .map_err(|e| e.to_string());
        let run = match (lend, resume) {
            (Err(e), _) => Err(Stop::Failed(e)),
            (Ok(()), None) => self.start(engine, profile, &lent, sregs, Entry::Syscall(regs)),
            (Ok(()), Some(p)) => self.resume(engine, profile, &lent, sregs, &p.regs),
        };
        let end = self.settle_segment(
            engine,
            profile,
            &kernel,
            &lent,
            shadow,
            run,
            resume.is_some(),
        );
        let restored = lent.words.give_back(&kernel);
        let end = end?;
        restored.map_err(|e| format!("giving CPU {cpu} back: {e}"))?;
        if !matches!(end, SegmentEnd::Stopped(_)) {
            // Wake-ups the call made (a signal, a released lock, queued work) take effect
            // now, not at the GVM CPUs' next interrupt.
            self.kick_gvm_cpus(engine);
        }
        Ok(end)
    }

    /// Commits or drops what a segment wrote, according to how it ended; see the module
    /// docs. The lent CPU's per-cpu words are still the shadow's here.
    #[allow(clippy::too_many_arguments)]
    fn settle_segment(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        kernel: &AddressSpace<'_>,
        lent: &Lent,
        shadow: ShadowAt,
        run: Result<i64, Stop>,
        was_parked: bool,
    ) -> Result<SegmentEnd, String> {
        match run {
            Ok(v) => {
                let pages = engine
                    .settle(true)
                    .map_err(|e| format!("committing the call: {e}"))?;
                self.stats
                    .committed_pages
                    .fetch_add(pages, Ordering::Relaxed);
                Ok(SegmentEnd::Returned(v))
            }
            Err(Stop::Trap(Trap::Sleep, _)) => {
                let state_va = shadow.task() + profile.shadow.state;
                let state = engine
                    .cow
                    .read_private_u32(kernel, state_va)
                    .unwrap_or(TASK_UNINTERRUPTIBLE);
                if !was_parked
                    && state & TASK_INTERRUPTIBLE != 0
                    && state & TASK_UNINTERRUPTIBLE == 0
                {
                    engine.settle(false)?;
                    self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                    return Ok(SegmentEnd::Stopped(
                        "the call would block: it waits interruptibly in the GVM kernel (for \
                         data, an event or a signal), which a redirected call may not do; it \
                         was rolled back: the GVM is unchanged"
                            .into(),
                    ));
                }
                self.park(engine, kernel, lent, state_va)
            }
            Err(stop) => {
                let settled = engine.settle(false);
                self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                let window = engine.window();
                let layout = engine.layout;
                let read_window = |va: u64, buf: &mut [u8]| {
                    va.checked_sub(WINDOW_KVA)
                        .filter(|off| off + buf.len() as u64 <= WINDOW_SIZE)
                        .is_some_and(|off| window.read_phys(layout.gpa(off), buf).is_ok())
                };
                let memory = CallMemory {
                    kernel,
                    window: &read_window,
                };
                let why = match stop {
                    Stop::Trap(trap, args) => {
                        traps::describe(trap, args, &memory, profile.modules.as_ref())
                    }
                    Stop::Failed(why) => why,
                };
                let dropped = match (settled, was_parked) {
                    (Ok(_), false) => "it was rolled back: the GVM is unchanged".to_string(),
                    (Ok(_), true) => "its last step was rolled back".to_string(),
                    (Err(e), _) => format!("rolling it back failed: {e}"),
                };
                Ok(SegmentEnd::Stopped(format!("{why}; {dropped}")))
            }
        }
    }

    /// Parks a call stopped at `__schedule`: commits it, makes `__schedule` return (the
    /// call's wait loop will see a spurious wake-up and check its condition again), and
    /// marks the shadow running so GVM wake-ups leave run queues alone.
    fn park(
        &self,
        engine: &mut Engine,
        kernel: &AddressSpace<'_>,
        lent: &Lent,
        state_va: u64,
    ) -> Result<SegmentEnd, String> {
        complete_pending_exit(engine);
        let mut regs = engine
            .vcpu
            .get_regs()
            .map_err(|e| format!("redirect vCPU registers: {e}"))?;
        let pages = engine
            .settle(true)
            .map_err(|e| format!("committing the sleeping call: {e}"))?;
        self.stats
            .committed_pages
            .fetch_add(pages, Ordering::Relaxed);
        regs.rip = read_u64(kernel, regs.rsp)?;
        regs.rsp += 8;
        let state = lent.words.park(kernel).map_err(|e| e.to_string())?;
        write_bytes(kernel, state_va, &0u32.to_le_bytes())?;
        Ok(SegmentEnd::Slept(Parked {
            regs,
            cpu: lent.cpu,
            state,
        }))
    }

    /// The text of the module a `delete_module` call names, if it is loaded: removing a
    /// module runs its own exit function, so for that call (only) its text is executable
    /// in the view. The name comes from the program's memory in the SVM.
    fn module_being_removed(
        &self,
        engine: &Engine,
        profile: &Profile,
        kernel: &AddressSpace<'_>,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Option<(u64, u64)> {
        let mode =
            PagingMode::from_control_regs(sregs.cr0, sregs.cr4, sregs.efer, DEFAULT_MAX_PHYS_BITS)
                .ok()?;
        let program = AddressSpace::new(&engine.parts.svm_mem, mode, sregs.cr3);
        let raw = program
            .read_cstr(regs.rdi, traps::MODULE_NAME_LEN, Privilege::User)
            .ok()?;
        let name = std::str::from_utf8(&raw).ok()?;
        let text = profile
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

    /// Sends every GVM CPU a reschedule IPI.
    fn kick_gvm_cpus(&self, engine: &Engine) {
        for cpu in 0..engine.parts.gvm_vcpus.len() as u32 {
            let msi = kvm_bindings::kvm_msi {
                address_lo: MSI_APIC_BASE | (cpu << 12),
                data: RESCHEDULE_VECTOR,
                ..Default::default()
            };
            if let Err(e) = engine.parts.gvm_vm.signal_msi(msi) {
                log::warn!("redirect: reschedule IPI to GVM CPU {cpu}: {e}");
            }
        }
    }

    /// Sets the redirect vCPU up as `lent`'s CPU on a fresh view and runs it from `entry`.
    fn start(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        lent: &Lent,
        sregs: &kvm_sregs,
        entry: Entry<'_>,
    ) -> Result<i64, Stop> {
        complete_pending_exit(engine);
        let syms = &profile.kernel.symbols;
        let control = &lent.control;
        let pcpu_base = lent.words.pcpu_base();
        let view = self.fresh_view(engine, profile, control, sregs)?;
        let vcpu = &engine.vcpu;
        let mode = match entry {
            Entry::Function { .. } => regs::Mode::Kernel,
            Entry::Syscall(_) => regs::Mode::User {
                fs_base: sregs.fs.base,
            },
        };
        let kernel_mode = mode == regs::Mode::Kernel;
        let tables = regs::CpuTables {
            pcpu_base,
            gdt_page: syms.gdt_page,
            cpu_tss_rw: syms.cpu_tss_rw,
            idt_table: syms.idt_table,
        };
        let current = vcpu
            .get_sregs()
            .map_err(|e| format!("redirect vCPU sregs: {e}"))?;
        let s = regs::segment_registers(current, control, view.cr3, &tables, mode)
            .map_err(|e| e.to_string())?;
        vcpu.set_sregs(&s)
            .map_err(|e| format!("redirect vCPU sregs: {e}"))?;
        let msrs = Msrs::from_entries(&regs::msrs(control, pcpu_base, mode))
            .map_err(|e| format!("MSR list: {e:?}"))?;
        match vcpu.set_msrs(&msrs) {
            Ok(5) => {}
            other => return Err(format!("redirect vCPU MSRs: {other:?}").into()),
        }
        vcpu.set_xcrs(&regs::xcrs(control))
            .map_err(|e| format!("redirect vCPU XCR0: {e}"))?;
        let r = match entry {
            Entry::Syscall(regs) => kvm_regs {
                rax: regs.rax,
                rdi: regs.rdi,
                rsi: regs.rsi,
                rdx: regs.rdx,
                r10: regs.r10,
                r8: regs.r8,
                r9: regs.r9,
                rsp: regs.rsp,
                rip: view.stub_va,
                rflags: 0x202,
                ..Default::default()
            },
            Entry::Function { address, args } => {
                // Return address: the kernel stub, on the scratch stack in the window.
                let rsp = ViewLayout::kva(SCRATCH_STACK_TOP - 8);
                engine
                    .window()
                    .write_phys(
                        engine.layout.gpa(SCRATCH_STACK_TOP - 8),
                        &KSTUB_KVA.to_le_bytes(),
                    )
                    .map_err(|e| format!("window: {e}"))?;
                kvm_regs {
                    rdi: args[0],
                    rsi: args[1],
                    rsp,
                    rip: address,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
        };
        vcpu.set_regs(&r)
            .map_err(|e| format!("redirect vCPU registers: {e}"))?;
        // Not the BSP: KVM starts it waiting for INIT/SIPI; and a failed call may leave it
        // halted. Either way, it runs now.
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(|e| format!("redirect vCPU state: {e}"))?;
        // The executor's own kernel-function calls are not redirected calls: their exits
        // are counted apart.
        let exits = if kernel_mode {
            &self.stats.setup_exits
        } else {
            &self.stats.exits
        };
        self.run_until_sentinel(engine, exits)
    }

    /// Resumes a parked call at `at` on a fresh view (the GVM ran meanwhile), with the
    /// lent CPU's current TSC. Everything else of the vCPU is as the call left it.
    fn resume(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        lent: &Lent,
        sregs: &kvm_sregs,
        at: &kvm_regs,
    ) -> Result<i64, Stop> {
        let view = self.fresh_view(engine, profile, &lent.control, sregs)?;
        let vcpu = &engine.vcpu;
        let mut s = vcpu
            .get_sregs()
            .map_err(|e| format!("redirect vCPU sregs: {e}"))?;
        s.cr3 = view.cr3;
        vcpu.set_sregs(&s)
            .map_err(|e| format!("redirect vCPU sregs: {e}"))?;
        let tsc = [kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: lent.control.tsc,
            ..Default::default()
        }];
        let msrs = Msrs::from_entries(&tsc).map_err(|e| format!("MSR list: {e:?}"))?;
        vcpu.set_msrs(&msrs)
            .map_err(|e| format!("redirect vCPU TSC: {e}"))?;
        vcpu.set_regs(at)
            .map_err(|e| format!("redirect vCPU registers: {e}"))?;
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(|e| format!("redirect vCPU state: {e}"))?;
        self.run_until_sentinel(engine, &self.stats.exits)
    }

    /// Builds the view tables for this segment and drops the redirect VM's cached
    /// translations of the last one.
    fn fresh_view(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        control: &ControlState,
        sregs: &kvm_sregs,
    ) -> Result<redirect::view::View, String> {
        let layout = engine.layout;
        let svm_mode =
            PagingMode::from_control_regs(sregs.cr0, sregs.cr4, sregs.efer, DEFAULT_MAX_PHYS_BITS)
                .map_err(|e| format!("SVM program: {e}"))?;
        let view = build_view(
            &engine.window(),
            &layout,
            &engine.parts.gvm_mem,
            control.cr3,
            &engine.parts.svm_mem,
            &svm_mode,
            sregs.cr3,
        )
        .map_err(|e| e.to_string())?;
        engine.private_text(&profile.traps)?;
        engine.forget_cached_translations()?;
        Ok(view)
    }

    fn run_until_sentinel(
        &self,
        engine: &mut Engine,
        exits: &std::sync::atomic::AtomicU64,
    ) -> Result<i64, Stop> {
        let sentinel = engine.layout.sentinel_gpa;
        let trap_page = engine.layout.trap_gpa();
        let started = Instant::now();
        self.watchdog.arm(CALL_TIMEOUT);
        let bus = engine.parts.gvm_bus.clone();
        let value = |data: &[u8]| {
            let mut raw = [0u8; 8];
            let n = data.len().min(8);
            raw[..n].copy_from_slice(&data[..n]);
            i64::from_le_bytes(raw)
        };
        let result = loop {
            let exit = engine.vcpu.run();
            match exit {
                Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => {
                    self.stats.console_exits.fetch_add(1, Ordering::Relaxed)
                }
                _ => exits.fetch_add(1, Ordering::Relaxed),
            };
            match exit {
                Ok(VcpuExit::MmioWrite(addr, data)) if addr == sentinel => break Ok(value(data)),
                Ok(VcpuExit::MmioWrite(addr, data)) if addr == trap_page + KERNEL_RETURN_SLOT => {
                    break Ok(value(data))
                }
                Ok(VcpuExit::MmioWrite(addr, _)) if addr.wrapping_sub(trap_page) < 0x1000 => {
                    break match traps::trap_at(addr - trap_page) {
                        // Without the trap's arguments its report would be made from
                        // zeros: a failed read is a failure of its own.
                        Some(trap) => match engine.vcpu.get_regs() {
                            Ok(r) => Err(Stop::Trap(trap, Args([r.rdi, r.rsi, r.rdx, r.rcx]))),
                            Err(e) => Err(Stop::Failed(format!(
                                "the call stopped at the {trap:?} trap, whose arguments could \
                                 not be read: {e}"
                            ))),
                        },
                        None => Err(Stop::Failed(format!(
                            "the call stored to the trap page at {addr:#x}, which no trap uses"
                        ))),
                    };
                }
                // The lent CPU's printk reaches the GVM's own serial port.
                Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
                Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
                Ok(VcpuExit::MmioWrite(addr, _)) => {
                    break Err(Stop::Failed(format!(
                        "the call wrote to guest-physical {addr:#x}, which the view does not back \
                         (kernel text is read-only there)"
                    )))
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0xff);
                    break Err(Stop::Failed(format!(
                        "the call read guest-physical {addr:#x}, which the view does not back"
                    )));
                }
                Ok(VcpuExit::Hlt) => {
                    break Err(Stop::Failed("the call halted the lent CPU".into()))
                }
                Ok(VcpuExit::Shutdown) => {
                    break Err(Stop::Failed(
                        "the lent CPU triple-faulted during the call".into(),
                    ))
                }
                Ok(other) => {
                    break Err(Stop::Failed(format!(
                        "unexpected exit of the lent CPU: {other:?}"
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if started.elapsed() >= CALL_TIMEOUT {
                        break Err(Stop::Failed(format!(
                            "the call did not return within {CALL_TIMEOUT:?} (it may be waiting \
                             for another CPU, and those are held while it runs)"
                        )));
                    }
                }
                Err(e) => break Err(Stop::Failed(format!("KVM_RUN on the lent CPU: {e}"))),
            }
        };
        self.watchdog.disarm();
        match result {
            Err(Stop::Failed(e)) => {
                let at = match engine.vcpu.get_regs() {
                    Ok(r) => format!("lent CPU at rip {:#x}", r.rip),
                    Err(e) => format!("lent CPU's rip unreadable: {e}"),
                };
                Err(Stop::Failed(format!("{e} ({at})")))
            }
            other => other,
        }
    }

    /// Makes the shadow task, stack and file table in a block of GVM memory taken from the
    /// GVM's own page allocator (a kernel-function call on the lent CPU, which is not yet
    /// lent to anyone: the call runs as whatever task that CPU was running, with
    /// preemption off, and cannot sleep). The block is the GVM's, so everything a call
    /// leaves in the GVM's lists (wait-queue entries on its stack, lock owners) stays
    /// addressable there after the call.
    fn install_shadow(
        &self,
        engine: &mut Engine,
        profile: &Profile,
        kernel: &AddressSpace<'_>,
        lent: &Lent,
        sregs: &kvm_sregs,
    ) -> Result<ShadowAt, String> {
        let syms = &profile.kernel.symbols;
        let lay = &profile.shadow;
        lent.words
            .disable_preemption(kernel)
            .map_err(|e| e.to_string())?;
        let entry = Entry::Function {
            address: profile.get_free_pages,
            // No GFP flags: an allocation that neither sleeps nor reclaims.
            args: [0, SHADOW_ORDER],
        };
        let run = self.start(engine, profile, lent, sregs, entry);
        let settled = engine.settle(run.is_ok());
        let restored = lent.words.give_back(kernel).map_err(|e| e.to_string());
        let block = match run {
            Ok(v) => v as u64,
            Err(Stop::Trap(trap, args)) => {
                return Err(format!(
                    "allocating the shadow task in the GVM: {}",
                    traps::describe(
                        trap,
                        args,
                        &CallMemory::gvm_only(kernel),
                        profile.modules.as_ref()
                    )
                ));
            }
            Err(Stop::Failed(why)) => {
                return Err(format!("allocating the shadow task in the GVM: {why}"))
            }
        };
        settled.map_err(|e| format!("committing the shadow allocation: {e}"))?;
        restored?;
        if block == 0 || block % SHADOW_BLOCK != 0 {
            return Err(format!(
                "the GVM's page allocator gave {block:#x} for the shadow block (64 KiB)"
            ));
        }
        let read = |va: u64, buf: &mut [u8]| read_bytes(kernel, va, buf);
        let size = usize::try_from(lay.task_size).map_err(|e| e.to_string())?;
        let mut template = vec![0u8; size];
        read(syms.init_task, &mut template)?;
        let files_ptr = {
            let off = usize::try_from(lay.files).map_err(|e| e.to_string())?;
            let bytes: [u8; 8] = template
                .get(off..off + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or("init_task is shorter than its layout")?;
            u64::from_le_bytes(bytes)
        };
        let at = ShadowAt { block };
        let place = ShadowPlace {
            task: at.task(),
            stack: block,
            files: block + SHADOW_FILES_OFF,
            cpu: u32::from(lent.cpu),
        };
        let task = shadow_task(
            &template,
            syms.init_task,
            lay,
            &place,
            SHADOW_FILES_OFF - SHADOW_TASK_OFF,
        )
        .map_err(|e| e.to_string())?;
        let mut files_template =
            vec![0u8; usize::try_from(lay.files_size).map_err(|e| e.to_string())?];
        read(files_ptr, &mut files_template)?;
        let files = shadow_files(
            &files_template,
            files_ptr,
            lay,
            place.files,
            SHADOW_BLOCK - SHADOW_FILES_OFF,
        )
        .map_err(|e| e.to_string())?;
        write_bytes(kernel, place.task, &task)?;
        write_bytes(kernel, place.files, &files)?;
        log::info!("redirect: shadow task at {:#x} (GVM memory)", place.task);
        Ok(at)
    }
}

/// The last segment ended in an MMIO exit that KVM still means to complete; let it do
/// that now, without entering the guest, so the state set next is what runs.
fn complete_pending_exit(engine: &mut Engine) {
    engine.vcpu.set_kvm_immediate_exit(1);
    let _ = engine.vcpu.run();
    engine.vcpu.set_kvm_immediate_exit(0);
}

fn read_bytes(kernel: &AddressSpace<'_>, va: u64, buf: &mut [u8]) -> Result<(), String> {
    kernel
        .read(va, buf, Privilege::Supervisor)
        .map_err(|e| format!("GVM kernel memory at {va:#x}: {e}"))
}

fn read_u64(kernel: &AddressSpace<'_>, va: u64) -> Result<u64, String> {
    let mut raw = [0u8; 8];
    read_bytes(kernel, va, &mut raw).map(|()| u64::from_le_bytes(raw))
}

fn write_bytes(kernel: &AddressSpace<'_>, va: u64, bytes: &[u8]) -> Result<(), String> {
    kernel
        .write(va, bytes, Privilege::Supervisor)
        .map_err(|e| format!("GVM kernel memory at {va:#x}: {e}"))
}
