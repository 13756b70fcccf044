//! A deadline for a thread's `KVM_RUN`: past it, the thread gets the kick signal, so
//! `KVM_RUN` returns `EINTR` and the thread can give up on a guest that does not return.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::quiesce::kick_signal;
use crate::sync::lock;

/// Kicks the thread that armed it, every 20 ms past its deadline, until disarmed.
pub struct Watchdog {
    armed: Mutex<Option<(libc::pthread_t, Instant)>>,
    changed: Condvar,
}

impl Watchdog {
    /// Starts the watchdog's thread (named `name`), with the vCPU seccomp filter if
    /// `seccomp`: it only waits and sends signals.
    pub fn spawn(name: &str, seccomp: bool) -> std::io::Result<Arc<Watchdog>> {
        let dog = Arc::new(Watchdog {
            armed: Mutex::new(None),
            changed: Condvar::new(),
        });
        let me = dog.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if seccomp {
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                        log::error!("watchdog: {e}");
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
                        // SAFETY: the thread id belongs to the thread that armed us and
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

    /// Kicks the calling thread if it has not disarmed within `timeout`.
    pub fn arm(&self, timeout: Duration) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *lock(&self.armed) = Some((me, Instant::now() + timeout));
        self.changed.notify_all();
    }

    /// Cancels the deadline.
    pub fn disarm(&self) {
        *lock(&self.armed) = None;
        self.changed.notify_all();
    }
}
