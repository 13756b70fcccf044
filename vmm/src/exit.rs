//! Why a VM stopped, and the one-shot signal that carries it to the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sync::lock;

/// The reason a VM stopped. The first reason reported wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (i8042 reset line or a KVM reset event): a clean stop.
    Reset,
    /// The guest asked to power off (KVM shutdown event): a clean stop.
    PowerOff,
    /// A client asked the instance to stop (`exterior-vmm stop`).
    Stopped,
    /// The guest kernel panicked; the panic line.
    GuestPanic(String),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN) or KVM reported a guest crash.
    GuestCrash(String),
    /// KVM or the host failed us.
    VmmError(String),
}

impl ExitReason {
    /// Process exit status for this reason (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped => 0,
            ExitReason::GuestPanic(_) | ExitReason::GuestCrash(_) => 1,
            ExitReason::VmmError(_) => 3,
        }
    }
}

/// Set once by whichever thread sees the VM stop; wakes the event loop.
pub(crate) struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn signal(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        // A full eventfd counter still means "readable": nothing is lost if this fails.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_differ() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.signal(ExitReason::GuestPanic("x".into()));
        s.signal(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::GuestPanic("x".into())));
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::GuestCrash(String::new()).exit_code(), 1);
        assert_eq!(ExitReason::VmmError(String::new()).exit_code(), 3);
    }
}
