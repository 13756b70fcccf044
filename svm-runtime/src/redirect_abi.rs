//! The redirect ABI between a diverted program in the SVM and the VMM.
//!
//! The preload library (`svm-runtime/shim/`, `libexterior_shim.so`) asks for this one I/O port with
//! `ioperm(PORT, 1, 1)` when it loads. To run a system call in the GVM it executes, from its
//! SIGSYS handler, `out %al, $PORT` (one byte: `ioperm` grants exactly one port) with the call in the registers exactly as the `syscall`
//! instruction would take it:
//!
//! | register | on the `out` | after the VMM resumes the vCPU |
//! | --- | --- | --- |
//! | RAX | system call number | result: a value or `-errno`, exactly as `syscall` returns |
//! | RDI RSI RDX R10 R8 R9 | arguments 1–6 (fds already translated to the GVM's) | unchanged |
//! | RCX | anything (declared clobbered) | a [`Status`] |
//!
//! Pointer arguments are the program's own virtual addresses; the VMM walks the program's
//! page tables from the exit's CR3. The shim makes every page that the call reads present,
//! and every page that it writes present and writable, before the `out` (at most
//! [`MAX_TOUCH`] bytes per call), so the walk never meets a page the guest kernel still has
//! to fault in.
//!
//! Nothing else crosses: no shared memory, no second port. A status other than
//! [`Status::Done`] means the call did not run in the GVM; RAX then holds the errno the
//! program sees (see [`Status::errno`]), and the shim says why on stderr once per process.
//!
//! RAX after [`Status::Done`] is the GVM kernel's answer, which may be hostile: the shim
//! checks it against the call's contract (`policy::Redirect::accept`: `-errno`, 0, a byte
//! count within the call's buffers, a new fd, or a small range; never a pointer) before the
//! program or the shim's fd table sees it, and turns anything else into `-EIO`.

/// The I/O port of the redirect (one byte wide: only the `out` itself matters).
pub const PORT: u16 = 0xE7;

/// Raw x86-64 number of `ioperm(2)`, which the shim calls once from its constructor.
pub const SYS_IOPERM: u64 = 173;

/// Exit status of a diverted program whose shim cannot reach the VMM (the `ioperm` failed or
/// the kernel refused syscall user dispatch). Running the program locally instead would show
/// the SVM's state as if it were the GVM's, so the program does not run at all.
pub const EXIT_UNREACHABLE: i32 = 126;

/// Most bytes of user buffers the shim faults in for one redirected call; stream calls
/// (`read`, `write`, `pread64`, `pwrite64`, `getdents64`) are shortened to this length, which
/// their contracts allow.
pub const MAX_TOUCH: usize = 1 << 20;

/// Most bytes of a module image (`init_module`) the shim faults in: modules are bigger than
/// [`MAX_TOUCH`] and the call cannot be shortened.
pub const MAX_MODULE_TOUCH: usize = 64 << 20;

/// Most iovec entries the shim walks for one call (the kernel's `UIO_MAXIOV`; more is
/// `EINVAL` anyway).
pub const MAX_IOV: usize = 1024;

/// What the VMM writes to RCX after a redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    /// The call ran in the GVM; RAX is its result.
    Done = 0,
    /// The GVM could not be brought to a safe point in time; RAX = `-EBUSY`.
    Busy = 1,
    /// The VMM failed while redirecting (bad registers, page walk failed, …); RAX = `-EIO`.
    Failed = 2,
    /// The redirect engine has not finished starting (no shadow task yet); RAX = `-ENOSYS`.
    NotReady = 3,
}

impl Status {
    /// Decodes RCX; `None` for a value the VMM must never write.
    pub fn from_rcx(rcx: u64) -> Option<Status> {
        Some(match rcx {
            0 => Status::Done,
            1 => Status::Busy,
            2 => Status::Failed,
            3 => Status::NotReady,
            _ => return None,
        })
    }

    /// The errno the VMM puts in RAX with this status (0 for [`Status::Done`]).
    pub fn errno(self) -> i32 {
        match self {
            Status::Done => 0,
            Status::Busy => libc::EBUSY,
            Status::Failed => libc::EIO,
            Status::NotReady => libc::ENOSYS,
        }
    }

    /// The words of the shim's one-line notice: `exterior: <reason> (<call>)`.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Done => "the call ran in the guest",
            Status::Busy => "the guest is busy",
            Status::Failed => "the redirect failed in the VMM",
            Status::NotReady => "the redirect engine is not ready",
        }
    }
}

/// Notice for an RCX value outside [`Status`].
pub const REASON_UNKNOWN_STATUS: &str = "the VMM answered with an unknown status";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_rcx() {
        for s in [Status::Done, Status::Busy, Status::Failed, Status::NotReady] {
            assert_eq!(Status::from_rcx(s as u64), Some(s));
        }
        assert_eq!(Status::from_rcx(4), None);
        assert_eq!(Status::from_rcx(u64::MAX), None);
    }

    #[test]
    fn status_errnos_are_the_documented_ones() {
        assert_eq!(Status::Done.errno(), 0);
        assert_eq!(Status::Busy.errno(), 16);
        assert_eq!(Status::Failed.errno(), 5);
        assert_eq!(Status::NotReady.errno(), 38);
        assert_eq!(Status::Busy.reason(), "the guest is busy");
    }

    #[test]
    fn abi_constants() {
        assert_eq!(PORT, 0xE7);
        assert_eq!(SYS_IOPERM, libc::SYS_ioperm as u64);
        assert!(MAX_TOUCH.is_power_of_two() && MAX_MODULE_TOUCH > MAX_TOUCH);
    }
}
