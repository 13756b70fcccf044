//! Raw mode for an interactive console: keystrokes go to the guest unprocessed, and the
//! terminal is restored however the VMM stops.

use std::os::fd::RawFd;

/// Restores the saved terminal settings when dropped.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Puts `fd` in raw mode if it is a terminal; `None` otherwise.
    pub fn enable(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid out pointer for the duration of the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the structure it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the guest's "\n" still returns the carriage.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restoring settings read from the same descriptor by `enable`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
