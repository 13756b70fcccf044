//! Quiescing a VM: stop every vCPU outside KVM_RUN at a point where no guest CPU holds a
//! kernel lock — halted (idle) or running user code (CPL 3) — then let them go again.
//!
//! The redirect engine runs GVM kernel code on a lent CPU while the GVM's own CPUs are held
//! here (DESIGN.md 4.2 step 2). A vCPU caught in the kernel is released and tried again a
//! bounded number of times; if the guest never reaches a safe point the caller gets
//! [`QuiesceError::Busy`] rather than a hang.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::sync::lock;

/// What a parked vCPU was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSnapshot {
    pub index: u8,
    /// Current privilege level (0 kernel, 3 user).
    pub cpl: u8,
    /// Halted in HLT, waiting for an interrupt.
    pub halted: bool,
    pub rip: u64,
    /// Its control state, which the redirect vCPU mirrors.
    pub control: ControlState,
}

/// The control registers and MSRs of a parked vCPU that the redirect vCPU must share with
/// it (DESIGN.md 4.2a: CR0, CR4 and EFER must mirror a GVM vCPU's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlState {
    /// The paging controls: how to walk this CPU's page tables (at CR3). Nothing else of
    /// a GVM CPU's control state runs a call (the redirect vCPU runs with the trusted SVM
    /// kernel's, `executor::regs::TrustedControl`).
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The time-stamp counter when it parked: the redirect vCPU reads the GVM's clock
    /// (kvm-clock scales the TSC), so it must count from the same value.
    pub tsc: u64,
    /// Where its `syscall` enters (MSR LSTAR): the GVM's claim of its kernel's KASLR
    /// slide, believed only once the GVM's text agrees (`executor::Engine::learn_slide`).
    pub lstar: u64,
}

impl VcpuSnapshot {
    /// Halted or in user mode: it holds no kernel lock and is in no kernel critical section.
    pub fn at_safe_point(&self) -> bool {
        self.halted || self.cpl == 3
    }

    pub fn describe(&self) -> String {
        let what = if self.halted {
            "halted".to_string()
        } else if self.cpl == 3 {
            "in user mode".to_string()
        } else {
            format!("in the kernel (CPL {})", self.cpl)
        };
        format!("vCPU {} {what} at rip {:#x}", self.index, self.rip)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuiesceError {
    #[error("guest busy: {0} after {1} attempts (it never reached an idle or user-mode point)")]
    Busy(String, u32),
    #[error("vCPU {0} did not stop within {1:?}")]
    NoResponse(u8, Duration),
    #[error("the VM is stopping")]
    Stopping,
}

#[derive(Default)]
struct State {
    pause: bool,
    parked: Option<VcpuSnapshot>,
    thread: Option<libc::pthread_t>,
    stopped: bool,
}

/// Shared between one vCPU thread and whoever quiesces its VM.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing; the
/// interrupted ioctl returns EINTR).
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the no-op kick handler, without SA_RESTART so KVM_RUN returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed means no flags and an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as *const () as usize;
    // SAFETY: `action` is initialised and `on_kick` is a valid handler for one int argument.
    if unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VcpuControl {
    /// Called by the vCPU thread when it starts.
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        lock(&self.state).thread = Some(unsafe { libc::pthread_self() });
    }

    /// Called by the vCPU thread when it ends; quiescers stop waiting for it.
    pub fn mark_stopped(&self) {
        let mut s = lock(&self.state);
        s.stopped = true;
        s.thread = None;
        self.changed.notify_all();
    }

    /// Called by the vCPU thread between KVM_RUN calls: if a pause is requested, record
    /// the snapshot taken by `snapshot` and wait until released (or `stop` says so).
    pub fn park_if_requested(
        &self,
        snapshot: impl FnOnce() -> VcpuSnapshot,
        stop: impl Fn() -> bool,
    ) {
        let mut s = lock(&self.state);
        if !s.pause {
            return;
        }
        let snap = snapshot();
        s.parked = Some(snap);
        self.changed.notify_all();
        while s.pause && !stop() {
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if s.pause && s.parked.is_none() {
                // Released and asked again before this thread woke up: it has not run
                // since, so its snapshot still holds. (Without this the new quiescer
                // waited for a park that never came, a whole park timeout.)
                s.parked = Some(snap);
                self.changed.notify_all();
            }
        }
        s.parked = None;
        self.changed.notify_all();
    }

    fn request(&self, pause: bool) {
        let mut s = lock(&self.state);
        s.pause = pause;
        if !pause {
            s.parked = None;
        }
        self.changed.notify_all();
    }

    fn kick(&self) {
        kick_thread(&lock(&self.state));
    }

    /// Its snapshot if it is parked now.
    fn parked_now(&self) -> Result<Option<VcpuSnapshot>, QuiesceError> {
        let s = lock(&self.state);
        if s.stopped {
            return Err(QuiesceError::Stopping);
        }
        Ok(s.parked)
    }

    /// Waits until parked or `deadline`, kicking again every [`KICK_AGAIN`] (a kick that
    /// lands just before the thread enters KVM_RUN is lost); `None` at the deadline. The
    /// state is checked and waited on under one lock: a park between the two cannot be
    /// missed.
    fn wait_parked(&self, deadline: Instant) -> Result<Option<VcpuSnapshot>, QuiesceError> {
        let mut s = lock(&self.state);
        loop {
            if s.stopped {
                return Err(QuiesceError::Stopping);
            }
            if let Some(snap) = s.parked {
                return Ok(Some(snap));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let (guard, waited) = self
                .changed
                .wait_timeout(s, KICK_AGAIN.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner());
            s = guard;
            if waited.timed_out() && s.parked.is_none() {
                kick_thread(&s);
            }
        }
    }
}

/// Waits until every vCPU of `controls` is parked (their snapshots into `snapshots`, in
/// order) or `deadline`; the first one still not parked then. Every vCPU not yet parked
/// is kicked again every [`KICK_AGAIN`], not only the one waited for: a lost kick must not
/// wait for its turn.
fn wait_all_parked(
    controls: &[Arc<VcpuControl>],
    deadline: Instant,
    snapshots: &mut Vec<VcpuSnapshot>,
) -> Result<Option<u8>, QuiesceError> {
    let mut parked: Vec<Option<VcpuSnapshot>> = vec![None; controls.len()];
    loop {
        for (slot, c) in parked.iter_mut().zip(controls) {
            if slot.is_none() {
                *slot = c.parked_now()?;
            }
        }
        let Some(first) = parked.iter().position(Option::is_none) else {
            snapshots.extend(parked.into_iter().flatten());
            return Ok(None);
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(Some(u8::try_from(first).unwrap_or(u8::MAX)));
        }
        for (slot, c) in parked.iter().zip(controls) {
            if slot.is_none() {
                c.kick();
            }
        }
        if let Some(c) = controls.get(first) {
            c.wait_parked((now + KICK_AGAIN).min(deadline))?;
        }
    }
}

/// How long a quiescer waits for a kicked vCPU before it kicks it again.
const KICK_AGAIN: Duration = Duration::from_millis(1);

/// Sends the kick signal to a vCPU's thread, if it runs.
fn kick_thread(s: &State) {
    if let Some(thread) = s.thread {
        // SAFETY: the thread id was registered by a live vCPU thread and is cleared (under
        // the same lock the caller holds) before that thread exits; the signal's handler
        // does nothing and takes no lock.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
}

/// How hard to try: attempts until `budget` is spent (at least one), releasing the guest
/// between them for a delay that doubles from `first_delay` up to `max_delay` — so a guest
/// in a long kernel operation gets time to finish it, on slow (nested) hardware too.
#[derive(Debug, Clone, Copy)]
pub struct QuiescePolicy {
    pub budget: Duration,
    /// How long one attempt waits for all the vCPUs to come out of KVM_RUN.
    pub park_timeout: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for QuiescePolicy {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(10),
            park_timeout: Duration::from_secs(1),
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }
}

/// Holds a VM's vCPUs parked; dropping it lets them run again.
pub struct Quiesced {
    controls: Vec<Arc<VcpuControl>>,
    pub snapshots: Vec<VcpuSnapshot>,
    pub attempts: u32,
    pub took: Duration,
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        for c in &self.controls {
            c.request(false);
        }
    }
}

/// The first vCPU that is not at a safe point, if any.
pub fn first_busy(snapshots: &[VcpuSnapshot]) -> Option<&VcpuSnapshot> {
    snapshots.iter().find(|s| !s.at_safe_point())
}

/// Parks every vCPU of a VM at a safe point, or fails once `policy.budget` is spent.
pub fn quiesce(
    controls: &[Arc<VcpuControl>],
    policy: QuiescePolicy,
) -> Result<Quiesced, QuiesceError> {
    let start = Instant::now();
    let mut delay = policy.first_delay;
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        // The guard releases every vCPU on any early return.
        let mut held = Quiesced {
            controls: controls.to_vec(),
            snapshots: Vec::with_capacity(controls.len()),
            attempts: attempt,
            took: Duration::ZERO,
        };
        // Every vCPU is asked and kicked before any is waited for: they stop in parallel,
        // and the wait is as long as the slowest, not the sum.
        for c in controls {
            c.request(true);
        }
        let deadline = Instant::now() + policy.park_timeout;
        let silent = wait_all_parked(controls, deadline, &mut held.snapshots)?;
        let out_of_time = start.elapsed() + delay > policy.budget;
        // A vCPU that does not come out of KVM_RUN in time is retried like a busy one
        // (a guest running without exits cannot be interrupted on some nested setups).
        if let Some(index) = silent {
            if out_of_time {
                return Err(QuiesceError::NoResponse(index, policy.park_timeout));
            }
        } else {
            match first_busy(&held.snapshots) {
                None => {
                    held.took = start.elapsed();
                    return Ok(held);
                }
                Some(busy) => {
                    if out_of_time {
                        return Err(QuiesceError::Busy(busy.describe(), attempt));
                    }
                }
            }
        }
        drop(held);
        std::thread::sleep(delay);
        delay = (delay * 2).min(policy.max_delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    fn snap(index: u8, cpl: u8, halted: bool) -> VcpuSnapshot {
        VcpuSnapshot {
            index,
            cpl,
            halted,
            rip: 0x1000,
            control: ControlState::default(),
        }
    }

    #[test]
    fn only_halted_or_user_mode_is_safe() {
        assert!(snap(0, 3, false).at_safe_point());
        assert!(snap(0, 0, true).at_safe_point());
        assert!(!snap(0, 0, false).at_safe_point());
        let all = [snap(0, 3, false), snap(1, 0, false)];
        assert_eq!(first_busy(&all).map(|s| s.index), Some(1));
    }

    /// A fake vCPU thread: parks when asked, reporting the CPL in `cpl`.
    fn fake_vcpu(control: Arc<VcpuControl>, cpl: Arc<AtomicU8>, stop: Arc<AtomicBool>) {
        std::thread::spawn(move || {
            control.register_current_thread();
            while !stop.load(Ordering::Relaxed) {
                control.park_if_requested(
                    || snap(0, cpl.load(Ordering::Relaxed), false),
                    || stop.load(Ordering::Relaxed),
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            control.mark_stopped();
        });
    }

    #[test]
    fn a_vcpu_in_user_mode_is_held_then_released() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        fake_vcpu(control.clone(), Arc::new(AtomicU8::new(3)), stop.clone());
        let held = quiesce(std::slice::from_ref(&control), QuiescePolicy::default()).unwrap();
        assert_eq!(held.snapshots, vec![snap(0, 3, false)]);
        assert!(lock(&control.state).parked.is_some());
        drop(held);
        std::thread::sleep(Duration::from_millis(50));
        assert!(lock(&control.state).parked.is_none(), "not released");
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_vcpu_stuck_in_the_kernel_makes_the_guest_busy_not_a_hang() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        fake_vcpu(control.clone(), Arc::new(AtomicU8::new(0)), stop.clone());
        let policy = QuiescePolicy {
            budget: Duration::from_millis(100),
            ..QuiescePolicy::default()
        };
        let err = quiesce(std::slice::from_ref(&control), policy)
            .err()
            .unwrap();
        assert!(
            matches!(err, QuiesceError::Busy(ref what, n) if what.contains("in the kernel") && n > 1),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            lock(&control.state).parked.is_none(),
            "left parked after failing"
        );
        stop.store(true, Ordering::Relaxed);
    }

    /// A fake vCPU thread that, like one in KVM_RUN, notices nothing until it is sent the
    /// kick signal; once kicked it waits at `all_kicked` until every other one was kicked
    /// too, and only then parks.
    fn kicked_vcpu(index: u8, control: Arc<VcpuControl>, all_kicked: Arc<std::sync::Barrier>) {
        std::thread::spawn(move || {
            control.register_current_thread();
            let mut kicked = false;
            loop {
                let run = libc::timespec {
                    tv_sec: 60,
                    tv_nsec: 0,
                };
                // SAFETY: `run` is a valid timespec; no remainder is asked for. The kick
                // signal's handler (installed without SA_RESTART) makes it return EINTR.
                unsafe { libc::nanosleep(&run, std::ptr::null_mut()) };
                if !kicked {
                    kicked = true;
                    all_kicked.wait();
                }
                control.park_if_requested(|| snap(index, 3, false), || false);
            }
        });
    }

    #[test]
    fn every_vcpu_is_kicked_before_any_is_waited_for() {
        install_kick_handler().unwrap();
        let vcpus = 4;
        let all_kicked = Arc::new(std::sync::Barrier::new(vcpus));
        let controls: Vec<_> = (0..vcpus)
            .map(|_| Arc::new(VcpuControl::default()))
            .collect();
        for (i, c) in controls.iter().enumerate() {
            kicked_vcpu(i as u8, c.clone(), all_kicked.clone());
        }
        // Let every thread register before the first kick.
        while controls.iter().any(|c| lock(&c.state).thread.is_none()) {
            std::thread::yield_now();
        }
        let policy = QuiescePolicy {
            budget: Duration::ZERO,
            park_timeout: Duration::from_secs(20),
            ..QuiescePolicy::default()
        };
        // Kicking and waiting for one vCPU at a time never gets past the first: it waits
        // for the others, which nobody kicked.
        let held = quiesce(&controls, policy).unwrap();
        let parked: Vec<u8> = held.snapshots.iter().map(|s| s.index).collect();
        assert_eq!(parked, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_vcpu_released_and_asked_again_before_it_woke_up_is_still_parked() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        fake_vcpu(control.clone(), Arc::new(AtomicU8::new(3)), stop.clone());
        let held = quiesce(std::slice::from_ref(&control), QuiescePolicy::default()).unwrap();
        // A release and the next request in one go, as when a hold ends and another begins
        // before the vCPU's thread gets the lock.
        {
            let mut s = lock(&control.state);
            s.pause = false;
            s.parked = None;
            control.changed.notify_all();
            s.pause = true;
            control.changed.notify_all();
        }
        let policy = QuiescePolicy {
            budget: Duration::ZERO,
            park_timeout: Duration::from_secs(2),
            ..QuiescePolicy::default()
        };
        let again = quiesce(std::slice::from_ref(&control), policy);
        assert_eq!(
            again.as_ref().map(|h| h.snapshots.clone()).ok(),
            Some(vec![snap(0, 3, false)]),
            "{:?}",
            again.err()
        );
        drop(again);
        drop(held);
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_vcpu_that_never_parks_is_reported() {
        let control = Arc::new(VcpuControl::default());
        let policy = QuiescePolicy {
            budget: Duration::ZERO,
            park_timeout: Duration::from_millis(20),
            first_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        assert_eq!(
            quiesce(&[control], policy).err(),
            Some(QuiesceError::NoResponse(0, Duration::from_millis(20)))
        );
    }
}
