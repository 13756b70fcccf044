//! The SVM's redirect port (`svm_runtime::redirect_abi`): calls start on the SVM's vCPU
//! thread and run on the executor's worker thread, so the SVM's vCPU is never held longer
//! than a few milliseconds however long a call takes in the GVM (a call may take up to
//! its budget, tens of seconds; an SVM vCPU held that long stalls the SVM's kernel: RCU
//! stall warnings, no ticks, no agent).
//!
//! ```text
//!  out (R11 = 0) ──▶ begin: checks, buffers copied in ──▶ worker: segments ──▶ outcome
//!      ◀── Pending, token (if not done within FIRST_WAIT)                       │
//!  out (R11 = token) ──▶ wait ≤ POLL_WAIT ──▶ Pending, or: finish (buffers copied back)
//! ```
//!
//! One call is in flight at a time (the bounce area and the engine are one); a new call
//! that arrives meanwhile is answered "pending" at once — with one SVM vCPU the program
//! whose call is in flight cannot collect it while another holds that vCPU — with a token
//! of its own, and starts when a poll of it finds the engine free. A finished call nobody
//! collects (its program was killed) is dropped after [`ORPHAN_AFTER`], its buffers zeroed
//! and never copied back. Programs are told apart by their address space: CR3 without
//! its PCID and no-flush bits, which change while a program waits.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use svm_runtime::redirect_abi::{Status, FIRST_WAIT_MS, POLL_WAIT_MS, PORT};

use super::call::HoldEnd;
use super::error::Error;
use super::{read_svm_control, Executor, HoldPolicy, Outcome};
use crate::sync::lock;
use crate::vstate::vcpu::PortHook;

/// A finished call not collected for this long is dropped (a live program polls every
/// few milliseconds; one that stops polling was killed or stopped).
pub const ORPHAN_AFTER: Duration = Duration::from_secs(2);
/// Most calls waiting for their turn (one per SVM program that is waiting).
const MAX_QUEUED: usize = 256;
/// A waiting call not polled for this long is forgotten.
const QUEUED_FOR: Duration = Duration::from_secs(10);
/// The bits of CR3 that are not the address space: the PCID (which Linux reassigns as
/// address spaces come and go on a CPU) and no-flush. (PTI's bit 12 stays: at the `out`
/// a program is always in user mode, so it is always the same half of its table pair;
/// without PTI two programs' tables may differ in bit 12 alone.)
const CR3_NOT_ADDRESS_SPACE: u64 = 0xfff | (1 << 63);

/// Which program an `out` comes from.
fn address_space(cr3: u64) -> u64 {
    cr3 & !CR3_NOT_ADDRESS_SPACE
}
const ERRNO_EINPROGRESS: i64 = 115;
const ERRNO_EIO: i64 = 5;
const ERRNO_EBUSY: i64 = 16;

/// The call in flight.
struct InFlight {
    token: u64,
    /// The system call number (for the log).
    nr: u64,
    /// The calling program's CR3: a poll must come from the same address space.
    cr3: u64,
    /// Set by the worker.
    outcome: Option<Result<i64, Error>>,
    finished: Option<Instant>,
}

/// What the port knows about calls: the one in flight and those waiting for their turn.
#[derive(Default)]
pub(super) struct Calls {
    in_flight: Option<InFlight>,
    /// Token → (program CR3, last poll).
    queued: HashMap<u64, (u64, Instant)>,
    next_token: u64,
}

/// What an `out` is, by its R11 and the program's CR3.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// A poll of the call in flight.
    Poll,
    /// A call to start (new, with a fresh token, or a waiting one polling for its turn).
    Start(u64),
    /// A poll whose token names no call of this program.
    Unknown,
}

impl Calls {
    fn arrival(&mut self, r11: u64, cr3: u64) -> Arrival {
        let cr3 = address_space(cr3);
        if r11 == 0 {
            let token = self.next_token.max(1);
            self.next_token = token.wrapping_add(1).max(1);
            return Arrival::Start(token);
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.token == r11 && f.cr3 == cr3)
        {
            return Arrival::Poll;
        }
        match self.queued.get(&r11) {
            Some(&(owner, _)) if owner == cr3 => Arrival::Start(r11),
            _ => Arrival::Unknown,
        }
    }

    /// Takes the call in flight if it finished more than [`ORPHAN_AFTER`] before `now` and
    /// was never collected.
    fn take_orphan(&mut self, now: Instant) -> Option<InFlight> {
        let orphaned = self
            .in_flight
            .as_ref()
            .and_then(|f| f.finished)
            .is_some_and(|t| now.saturating_duration_since(t) > ORPHAN_AFTER);
        if orphaned {
            self.in_flight.take()
        } else {
            None
        }
    }

    /// Remembers `token` as waiting for its turn (forgetting waiters gone quiet); false if
    /// too many wait.
    fn wait_turn(&mut self, token: u64, cr3: u64, now: Instant) -> bool {
        let cr3 = address_space(cr3);
        self.queued
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < QUEUED_FOR);
        if self.queued.len() >= MAX_QUEUED && !self.queued.contains_key(&token) {
            return false;
        }
        self.queued.insert(token, (cr3, now));
        true
    }
}

/// A call the worker runs: everything `begin` checked and prepared.
struct Job {
    token: u64,
    regs: kvm_regs,
    /// The calling program's address space.
    space: u64,
}

/// What the shim is told.
enum Answer {
    Done(Outcome),
    Pending(u64),
}

/// The port's shared state and the worker's inbox.
pub(super) struct Port {
    calls: Mutex<Calls>,
    changed: Condvar,
    jobs: Mutex<Option<Sender<Job>>>,
}

impl Port {
    pub fn new() -> Port {
        Port {
            calls: Mutex::new(Calls {
                next_token: 1,
                ..Calls::default()
            }),
            changed: Condvar::new(),
            jobs: Mutex::new(None),
        }
    }
}

/// Starts the worker that runs begun calls, with the vCPU seccomp filter if `seccomp`.
pub(super) fn spawn_worker(executor: &Arc<Executor>, seccomp: bool) -> std::io::Result<()> {
    let (jobs, inbox) = channel();
    let weak = Arc::downgrade(executor);
    std::thread::Builder::new()
        .name("redirect-worker".into())
        .spawn(move || {
            if seccomp {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    log::error!("redirect worker: {e}");
                    return;
                }
            }
            serve(&inbox, &weak)
        })?;
    *lock(&executor.port.jobs) = Some(jobs);
    Ok(())
}

fn serve(inbox: &Receiver<Job>, executor: &Weak<Executor>) {
    while let Ok(job) = inbox.recv() {
        let Some(executor) = executor.upgrade() else {
            return;
        };
        executor.serve_run(job, inbox);
    }
}

/// How long the worker waits, holding the GVM for a `age`-old hold, for the program's
/// next call; and, if none comes by then, why the hold ends.
fn hold_wait(policy: HoldPolicy, age: Duration) -> (Duration, HoldEnd) {
    let slice_left = policy.slice.saturating_sub(age);
    if slice_left < policy.idle {
        (slice_left, HoldEnd::Slice)
    } else {
        (policy.idle, HoldEnd::Idle)
    }
}

impl Executor {
    /// Runs `first` and, while the GVM stays held for its program, the calls that follow
    /// it: the hold ends when the program's next call does not come within the idle gap,
    /// when the slice is used up (checked between calls: a hold lasts at most the slice
    /// plus one call), or when a call fails, parks or comes from another program
    /// (`call.rs`).
    fn serve_run(&self, first: Job, inbox: &Receiver<Job>) {
        let mut hold = None;
        let mut job = first;
        loop {
            let started = Instant::now();
            // A panic must not leave the call in flight forever (its program would poll
            // on), nor the GVM held.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_begun(&job.regs, job.space, &mut hold)
            }))
            .unwrap_or_else(|_| {
                self.end_hold(hold.take(), HoldEnd::Call);
                Err(Error::NoWorker)
            });
            super::add_elapsed(&self.stats.worker_ns, started);
            self.publish(job.token, result);
            let Some(held) = &hold else {
                return;
            };
            let (wait, ends) = hold_wait(self.hold_policy, held.started.elapsed());
            match inbox.recv_timeout(wait) {
                Ok(next) if !wait.is_zero() => job = next,
                Ok(next) => {
                    self.end_hold(hold.take(), ends);
                    job = next;
                }
                Err(_) => {
                    self.end_hold(hold.take(), ends);
                    return;
                }
            }
        }
    }

    /// Hands a finished call's result to the port, for its program's next poll.
    fn publish(&self, token: u64, result: Result<i64, Error>) {
        let port = &self.port;
        let mut calls = lock(&port.calls);
        match calls.in_flight.as_mut().filter(|f| f.token == token) {
            Some(f) => {
                f.outcome = Some(result);
                f.finished = Some(Instant::now());
            }
            None => log::warn!("redirect: call {token} finished after it was dropped"),
        }
        port.changed.notify_all();
    }
}

impl Executor {
    /// One `out` of the shim: a new call (`regs.r11 == 0`) or a poll of one.
    fn port_call(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Answer {
        let port = &self.port;
        let mut calls = lock(&port.calls);
        let token = match calls.arrival(regs.r11, sregs.cr3) {
            Arrival::Poll => {
                let deadline = Instant::now() + Duration::from_millis(POLL_WAIT_MS);
                return self.collect(calls, regs.r11, deadline, sregs);
            }
            Arrival::Unknown => return Answer::Done(self.refuse_poll(regs.r11)),
            Arrival::Start(token) => token,
        };
        // Its turn, if the engine is free (or holds only a call nobody collects); else it
        // waits, without holding the SVM's vCPU.
        if let Some(orphan) = calls.take_orphan(Instant::now()) {
            self.drop_orphan(orphan);
        }
        if calls.in_flight.is_some() {
            return self.queue(calls, token, sregs.cr3);
        }
        let wait = if regs.r11 == 0 {
            FIRST_WAIT_MS
        } else {
            POLL_WAIT_MS
        };
        let deadline = Instant::now() + Duration::from_millis(wait);
        calls.queued.remove(&token);
        if let Err(e) = self.begin(regs, sregs) {
            return Answer::Done(self.finish(regs.rax, sregs, Err(e)));
        }
        let sent = lock(&port.jobs).as_ref().is_some_and(|jobs| {
            let space = address_space(sregs.cr3);
            jobs.send(Job {
                token,
                regs: *regs,
                space,
            })
            .is_ok()
        });
        if !sent {
            return Answer::Done(self.finish(regs.rax, sregs, Err(Error::NoWorker)));
        }
        calls.in_flight = Some(InFlight {
            token,
            nr: regs.rax,
            cr3: address_space(sregs.cr3),
            outcome: None,
            finished: None,
        });
        self.collect(calls, token, deadline, sregs)
    }

    /// Waits until `deadline` for the call in flight (ours) to finish; its answer.
    fn collect(
        &self,
        mut calls: MutexGuard<'_, Calls>,
        token: u64,
        deadline: Instant,
        sregs: &kvm_sregs,
    ) -> Answer {
        let ours_done = |c: &Calls| {
            c.in_flight
                .as_ref()
                .is_some_and(|f| f.token == token && f.outcome.is_some())
        };
        loop {
            if ours_done(&calls) {
                break;
            }
            if calls.in_flight.as_ref().is_none_or(|f| f.token != token) {
                // Dropped meanwhile (the program was too slow to poll): not ours to take.
                drop(calls);
                return Answer::Done(self.refuse_poll(token));
            }
            let now = Instant::now();
            if now >= deadline {
                return Answer::Pending(token);
            }
            calls = self
                .port
                .changed
                .wait_timeout(calls, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let Some(InFlight {
            nr,
            outcome: Some(result),
            ..
        }) = calls.in_flight.take()
        else {
            return Answer::Pending(token);
        };
        // The engine is free: a waiting call may start. This one's buffers are copied back
        // first (the engine lock orders that: `begin` of the next takes it after).
        let answer = Answer::Done(self.finish(nr, sregs, result));
        self.port.changed.notify_all();
        drop(calls);
        answer
    }

    /// A call that must wait for its turn: remembered, and told to poll.
    fn queue(&self, mut calls: MutexGuard<'_, Calls>, token: u64, cr3: u64) -> Answer {
        if calls.wait_turn(token, cr3, Instant::now()) {
            return Answer::Pending(token);
        }
        self.stats.busy.fetch_add(1, Ordering::Relaxed);
        Answer::Done(Outcome {
            result: -ERRNO_EBUSY,
            status: Status::Busy,
        })
    }

    /// Drops a finished call nobody collected: its buffers are zeroed, never copied back.
    fn drop_orphan(&self, f: InFlight) {
        log::warn!(
            "redirect: call {} finished {:?} ago and was never collected (its program is \
             gone?): dropped",
            f.token,
            f.finished.map(|t| t.elapsed()).unwrap_or_default()
        );
        self.forget_buffers();
    }

    /// A poll with a token that names no call of the polling program (its result was
    /// dropped, it waited too long without polling, or it never was).
    fn refuse_poll(&self, token: u64) -> Outcome {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let why = format!(
            "a program polled with token {token}, which names no call of its own (a result \
             is dropped {ORPHAN_AFTER:?} after it is ready, and a waiting call {QUEUED_FOR:?} \
             after its last poll)"
        );
        log::warn!("redirect: {why}");
        *lock(&self.stats.last_error) = why;
        Outcome {
            result: -ERRNO_EIO,
            status: Status::Failed,
        }
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
        let executor = &self.0;
        if executor.svm_control.get().is_none() {
            match read_svm_control(vcpu, &sregs) {
                Ok(control) => {
                    let _ = executor.svm_control.set(control);
                }
                Err(e) => log::error!("redirect: {e}"),
            }
        }
        let started = Instant::now();
        let answer = executor.port_call(&regs, &sregs);
        super::add_elapsed(&executor.stats.port_ns, started);
        match answer {
            Answer::Done(outcome) => {
                regs.rax = outcome.result as u64;
                regs.rcx = outcome.status as u64;
                regs.r11 = 0;
            }
            Answer::Pending(token) => {
                executor.stats.pending.fetch_add(1, Ordering::Relaxed);
                regs.rax = (-ERRNO_EINPROGRESS) as u64;
                regs.rcx = Status::Pending as u64;
                regs.r11 = token;
            }
        }
        if let Err(e) = vcpu.set_regs(&regs) {
            log::error!("redirect: cannot write the SVM vCPU's registers: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(token: u64, cr3: u64, finished: Option<Instant>) -> InFlight {
        InFlight {
            token,
            nr: 63,
            cr3,
            outcome: finished.map(|_| Ok(0)),
            finished,
        }
    }

    #[test]
    fn a_hold_waits_for_the_next_call_no_longer_than_its_idle_gap_and_slice() {
        let ms = Duration::from_millis;
        let policy = HoldPolicy {
            slice: ms(20),
            idle: ms(5),
        };
        assert_eq!(hold_wait(policy, ms(0)), (ms(5), HoldEnd::Idle));
        assert_eq!(hold_wait(policy, ms(15)), (ms(5), HoldEnd::Idle));
        assert_eq!(hold_wait(policy, ms(17)), (ms(3), HoldEnd::Slice));
        assert_eq!(hold_wait(policy, ms(40)), (ms(0), HoldEnd::Slice));
        // A zero slice: one call a hold.
        let per_call = HoldPolicy {
            slice: ms(0),
            ..policy
        };
        assert_eq!(hold_wait(per_call, ms(0)), (ms(0), HoldEnd::Slice));
        let no_idle = HoldPolicy {
            idle: ms(0),
            ..policy
        };
        assert_eq!(hold_wait(no_idle, ms(1)), (ms(0), HoldEnd::Idle));
    }

    #[test]
    fn a_new_call_gets_a_fresh_nonzero_token_even_past_the_wrap() {
        let mut calls = Calls::default();
        assert_eq!(calls.arrival(0, 0x1000), Arrival::Start(1));
        assert_eq!(calls.arrival(0, 0x1000), Arrival::Start(2));
        calls.next_token = u64::MAX;
        assert_eq!(calls.arrival(0, 0x1000), Arrival::Start(u64::MAX));
        assert_eq!(
            calls.arrival(0, 0x1000),
            Arrival::Start(1),
            "0 is never a token"
        );
    }

    #[test]
    fn only_its_own_program_polls_a_call_and_unknown_tokens_are_refused() {
        let mut calls = Calls {
            in_flight: Some(in_flight(7, 0x1000, None)),
            ..Calls::default()
        };
        assert_eq!(calls.arrival(7, 0x1000), Arrival::Poll);
        assert_eq!(
            calls.arrival(7, 0x2000),
            Arrival::Unknown,
            "another program"
        );
        assert_eq!(calls.arrival(8, 0x1000), Arrival::Unknown, "never issued");
        assert!(calls.wait_turn(8, 0x2000, Instant::now()));
        assert_eq!(calls.arrival(8, 0x2000), Arrival::Start(8));
        assert_eq!(calls.arrival(8, 0x1000), Arrival::Unknown);
    }

    #[test]
    fn a_program_is_its_address_space_whatever_its_pcid() {
        // Linux hands a waiting program a new PCID once others ran.
        let mut calls = Calls {
            in_flight: Some(in_flight(7, address_space(0x1234_5000 | 3), None)),
            ..Calls::default()
        };
        assert_eq!(calls.arrival(7, 0x1234_5000 | 5), Arrival::Poll);
        assert_eq!(calls.arrival(7, 0x1234_5000 | (1 << 63) | 1), Arrival::Poll);
        assert_eq!(calls.arrival(7, 0x1234_4000 | 3), Arrival::Unknown);
        assert!(calls.wait_turn(9, 0x5000 | 2, Instant::now()));
        assert_eq!(calls.arrival(9, 0x5000 | 4), Arrival::Start(9));
    }

    #[test]
    fn a_result_nobody_collects_is_dropped_only_after_orphan_after() {
        let mut calls = Calls::default();
        let finished = Instant::now();
        calls.in_flight = Some(in_flight(3, 0x1000, None));
        assert!(
            calls.take_orphan(finished + ORPHAN_AFTER * 10).is_none(),
            "still running"
        );
        calls.in_flight = Some(in_flight(3, 0x1000, Some(finished)));
        assert!(calls.take_orphan(finished + ORPHAN_AFTER / 2).is_none());
        assert!(calls.in_flight.is_some());
        let orphan = calls.take_orphan(finished + ORPHAN_AFTER * 2);
        assert_eq!(orphan.map(|f| f.token), Some(3));
        assert!(calls.in_flight.is_none());
    }

    #[test]
    fn waiting_calls_are_bounded_and_forgotten_when_they_stop_polling() {
        let mut calls = Calls::default();
        let start = Instant::now();
        for t in 1..=MAX_QUEUED as u64 {
            assert!(calls.wait_turn(t, 0x1000, start));
        }
        assert!(!calls.wait_turn(9999, 0x1000, start), "one too many");
        assert!(calls.wait_turn(1, 0x1000, start), "a waiter polls again");
        let later = start + QUEUED_FOR * 2;
        assert!(
            calls.wait_turn(9999, 0x1000, later),
            "the quiet ones are forgotten"
        );
        assert_eq!(calls.queued.len(), 1);
    }
}
