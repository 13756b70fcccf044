//! Device memory access paused while a VM is held (`DmaGate`).
//!
//! A redirected call commits the whole pages it wrote into the GVM. A device that wrote
//! guest memory during the call (a disk read completing into a page cache page that shares
//! a page with data the call changed) would have its bytes overwritten by the commit, and
//! a call's reads would see memory change under it. So every device I/O thread passes the
//! gate around each request it serves, and a hold pauses the gate: new requests wait, and
//! the pause waits for the one in flight to finish (bounded: a pause that does not get
//! the gate in time gives up and the hold fails as busy, like a vCPU that never parks).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

#[derive(Default)]
struct State {
    /// Holds in force (a count: a hold may nest with `exterior-vmm quiesce`).
    paused: u32,
    /// Requests being served.
    busy: u32,
}

/// The gate of one VM's devices.
#[derive(Default)]
pub struct DmaGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// A device request in flight; dropping it lets a pending pause through.
pub struct DmaPass<'a>(&'a DmaGate);

/// The devices paused; dropping it lets them run again. It owns a handle of the gate: a
/// hold outlives the call that took it (`executor::call::Hold`).
pub struct DmaPaused(Arc<DmaGate>);

impl DmaGate {
    /// Called by a device thread before it touches guest memory for a request: waits
    /// while the VM is held.
    pub fn enter(&self) -> DmaPass<'_> {
        let mut s = lock(&self.state);
        while s.paused > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.busy += 1;
        DmaPass(self)
    }

    /// Stops new device requests and waits up to `limit` for those in flight; `None` (and
    /// no pause) if they did not finish in time.
    pub fn pause(self: &Arc<Self>, limit: Duration) -> Option<DmaPaused> {
        let deadline = Instant::now() + limit;
        let mut s = lock(&self.state);
        s.paused += 1;
        while s.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.paused -= 1;
                self.changed.notify_all();
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Some(DmaPaused(self.clone()))
    }
}

impl Drop for DmaPass<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).busy -= 1;
        self.0.changed.notify_all();
    }
}

impl Drop for DmaPaused {
    fn drop(&mut self) {
        lock(&self.0.state).paused -= 1;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_pause_that_times_out_leaves_no_pause_behind() {
        let gate = Arc::new(DmaGate::default());
        let in_flight = gate.enter();
        assert!(
            gate.pause(Duration::from_millis(20)).is_none(),
            "a request is in flight"
        );
        drop(gate.enter()); // would block forever had the failed pause stayed
        drop(in_flight);
        assert!(gate.pause(Duration::from_millis(20)).is_some());
    }

    #[test]
    fn new_requests_wait_while_paused() {
        let gate = Arc::new(DmaGate::default());
        let served = Arc::new(AtomicBool::new(false));
        let paused = gate
            .pause(Duration::from_secs(5))
            .expect("nothing in flight");
        let device = {
            let (gate, served) = (gate.clone(), served.clone());
            std::thread::spawn(move || {
                let _pass = gate.enter();
                served.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !served.load(Ordering::SeqCst),
            "a request ran while the VM was held"
        );
        drop(paused);
        device.join().unwrap();
        assert!(served.load(Ordering::SeqCst));
    }

    #[test]
    fn a_pause_gets_the_gate_only_when_the_request_in_flight_ends() {
        let gate = Arc::new(DmaGate::default());
        let entered = Arc::new(std::sync::Barrier::new(2));
        let finished = Arc::new(AtomicBool::new(false));
        let device = {
            let (gate, entered, finished) = (gate.clone(), entered.clone(), finished.clone());
            std::thread::spawn(move || {
                let pass = gate.enter();
                entered.wait();
                std::thread::sleep(Duration::from_millis(50));
                finished.store(true, Ordering::SeqCst);
                drop(pass);
            })
        };
        entered.wait();
        let paused = gate.pause(Duration::from_secs(5));
        assert!(paused.is_some());
        assert!(
            finished.load(Ordering::SeqCst),
            "paused with a request still in flight"
        );
        drop(paused);
        device.join().unwrap();
        // Nested pauses: the gate opens only when both end.
        let a = gate.pause(Duration::from_secs(1)).unwrap();
        let b = gate.pause(Duration::from_secs(1)).unwrap();
        drop(a);
        assert_eq!(lock(&gate.state).paused, 1);
        drop(b);
        assert_eq!(lock(&gate.state).paused, 0);
    }
}
