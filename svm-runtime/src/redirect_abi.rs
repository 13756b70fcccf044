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
//! | RCX | the address of the call's [`BufferList`] | a [`Status`] |
//! | R11 | 0 for a new call; the token of the pending call when polling it | the token, after [`Status::Pending`] |
//!
//! **A call never holds the SVM's vCPU for long.** The VMM answers a new call within
//! [`FIRST_WAIT_MS`] — with its result if it finished by then, else with
//! [`Status::Pending`] and a token in R11 — and the shim then *polls*: it repeats the same
//! `out` with that token in R11 (the other registers as before), and each poll is answered
//! within [`POLL_WAIT_MS`], with the result or `Pending` again. Between polls the SVM's
//! kernel runs (its timer ticks, RCU, the agent and other programs), however long the call
//! takes in the GVM. The buffers are copied in when the call starts and copied back when
//! the poll that returns the result is answered, while the SVM's vCPU is stopped.
//!
//! Pointer arguments are the program's own virtual addresses. The call reaches no memory
//! of the program but the byte ranges its [`BufferList`] names: the VMM copies them into
//! bounce pages of its own, maps those (and nothing else of the SVM) at the same addresses
//! in the call's view, and after a call that ran copies back only the ranges marked
//! [`BUFFER_WRITE`]. The shim lists every range the call's kernel code reads or writes
//! (its buffers, iovec arrays and `msghdr`s, the path it rewrote) and makes their pages
//! present, and writable where written, before the `out` (at most [`MAX_TOUCH`] bytes of
//! buffers per call), so the VMM's walk of its page tables never meets a page the SVM
//! kernel still has to fault in.
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

/// Bytes of a call's other buffers the shim faults in beyond [`MAX_TOUCH`] (or
/// [`MAX_MODULE_TOUCH`]): the address and length of a `recvfrom`, the name and control data
/// of a `msghdr`. A call whose buffers need more fails with `EFAULT` rather than reach
/// only part of them.
pub const MAX_SIDE_TOUCH: usize = 64 << 10;

/// Most bytes of a module image (`init_module`) the shim faults in: modules are bigger than
/// [`MAX_TOUCH`] and the call cannot be shortened.
pub const MAX_MODULE_TOUCH: usize = 64 << 20;

/// Most iovec entries the shim walks for one call (the kernel's `UIO_MAXIOV`; more is
/// `EINVAL` anyway).
pub const MAX_IOV: usize = 1024;

/// Most byte ranges one call's [`BufferList`] holds (contiguous ranges of one direction
/// are merged). A call with more fails in the shim with `EINVAL`, before the `out`.
pub const MAX_BUFFERS: usize = 128;

/// Set in a [`BufferList`] entry's length: the call may write the range (else it only
/// reads it), so the VMM copies it back after the call.
pub const BUFFER_WRITE: u64 = 1 << 63;

/// The program memory one redirected call may reach, in the program's memory at RCX on
/// the `out`: `count`, then `count` pairs of (address, length | [`BUFFER_WRITE`]).
#[repr(C)]
#[derive(Debug, Clone)]
pub struct BufferList {
    /// Entries in use.
    pub count: u64,
    /// (address, length | [`BUFFER_WRITE`]) for each range.
    pub entries: [[u64; 2]; MAX_BUFFERS],
}

/// Size in bytes of a [`BufferList`] in memory.
pub const BUFFER_LIST_SIZE: usize = core::mem::size_of::<BufferList>();

/// One range of a [`BufferList`], decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferRange {
    /// The program's virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Whether the call may write it.
    pub write: bool,
}

/// Why the VMM refused a [`BufferList`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferListError {
    /// `count` is more than [`MAX_BUFFERS`].
    #[error("the call's buffer list says it has {0} ranges, more than {MAX_BUFFERS}")]
    TooMany(u64),
    /// Fewer bytes than `count` needs.
    #[error("the call's buffer list is truncated")]
    Truncated,
}

impl Default for BufferList {
    fn default() -> Self {
        BufferList {
            count: 0,
            entries: [[0; 2]; MAX_BUFFERS],
        }
    }
}

impl BufferList {
    /// Adds `[addr, addr + len)`, merged into the last entry when it continues it in the
    /// same direction. Empty ranges and null pointers add nothing. False if the list is
    /// full or the range wraps.
    pub fn push(&mut self, addr: u64, len: u64, write: bool) -> bool {
        if addr == 0 || len == 0 {
            return true;
        }
        if len & BUFFER_WRITE != 0 || addr.checked_add(len).is_none() {
            return false;
        }
        let flag = if write { BUFFER_WRITE } else { 0 };
        let n = self.count as usize;
        if let Some([a, l]) = n.checked_sub(1).and_then(|i| self.entries.get_mut(i)) {
            let (last_len, last_flag) = (*l & !BUFFER_WRITE, *l & BUFFER_WRITE);
            if last_flag == flag && a.checked_add(last_len) == Some(addr) {
                let merged = last_len + len;
                if merged & BUFFER_WRITE == 0 {
                    *l = merged | flag;
                    return true;
                }
            }
        }
        match self.entries.get_mut(n) {
            Some(e) => {
                *e = [addr, len | flag];
                self.count += 1;
                true
            }
            None => false,
        }
    }

    /// Decodes a list as the VMM reads it from program memory: `count` first, then that
    /// many entries. Entries of length 0 are dropped.
    pub fn decode(raw: &[u8]) -> Result<Vec<BufferRange>, BufferListError> {
        let word = |i: usize| -> Option<u64> {
            let b = raw.get(i * 8..i * 8 + 8)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        let count = word(0).ok_or(BufferListError::Truncated)?;
        if count > MAX_BUFFERS as u64 {
            return Err(BufferListError::TooMany(count));
        }
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let (Some(addr), Some(len)) = (word(1 + 2 * i), word(2 + 2 * i)) else {
                return Err(BufferListError::Truncated);
            };
            let range = BufferRange {
                addr,
                len: len & !BUFFER_WRITE,
                write: len & BUFFER_WRITE != 0,
            };
            if range.len > 0 {
                out.push(range);
            }
        }
        Ok(out)
    }

    /// The bytes of the list's first `count` entries, as [`BufferList::decode`] reads them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = (self.count as usize).min(MAX_BUFFERS);
        let mut raw = self.count.to_le_bytes().to_vec();
        for [a, l] in &self.entries[..n] {
            raw.extend_from_slice(&a.to_le_bytes());
            raw.extend_from_slice(&l.to_le_bytes());
        }
        raw
    }
}

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
    /// The call is running (or another program's call is ahead of it): poll again with
    /// the token the VMM wrote to R11. RAX is meaningless.
    Pending = 4,
}

/// Longest the VMM keeps the SVM's vCPU on a new call before answering
/// [`Status::Pending`].
pub const FIRST_WAIT_MS: u64 = 50;

/// Longest the VMM keeps the SVM's vCPU on one poll.
pub const POLL_WAIT_MS: u64 = 10;

impl Status {
    /// Decodes RCX; `None` for a value the VMM must never write.
    pub fn from_rcx(rcx: u64) -> Option<Status> {
        Some(match rcx {
            0 => Status::Done,
            1 => Status::Busy,
            2 => Status::Failed,
            3 => Status::NotReady,
            4 => Status::Pending,
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
            Status::Pending => libc::EINPROGRESS,
        }
    }

    /// The words of the shim's one-line notice: `exterior: <reason> (<call>)`.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Done => "the call ran in the guest",
            Status::Busy => "the guest is busy",
            Status::Failed => "the redirect failed in the VMM",
            Status::NotReady => "the redirect engine is not ready",
            Status::Pending => "the call is still running",
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
        for s in [
            Status::Done,
            Status::Busy,
            Status::Failed,
            Status::NotReady,
            Status::Pending,
        ] {
            assert_eq!(Status::from_rcx(s as u64), Some(s));
        }
        assert_eq!(Status::from_rcx(5), None);
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
    fn contiguous_ranges_of_one_direction_merge_and_others_do_not() {
        let mut l = BufferList::default();
        assert!(l.push(0x1000, 0x10, false));
        assert!(l.push(0x1010, 0x20, false));
        assert!(l.push(0x1030, 0x8, true));
        assert!(l.push(0, 0x100, true) && l.push(0x5000, 0, true));
        assert!(l.push(0x2000, 4, true));
        let ranges = BufferList::decode(&l.to_bytes()).unwrap();
        let r = |addr, len, write| BufferRange { addr, len, write };
        assert_eq!(
            ranges,
            [
                r(0x1000, 0x30, false),
                r(0x1030, 8, true),
                r(0x2000, 4, true)
            ]
        );
    }

    #[test]
    fn a_full_list_or_a_wrapping_range_is_refused() {
        let mut l = BufferList::default();
        for i in 0..MAX_BUFFERS as u64 {
            assert!(l.push(0x1000 + i * 0x100, 1, i % 2 == 0));
        }
        assert!(!l.push(0x10_0000, 1, false));
        assert_eq!(l.count, MAX_BUFFERS as u64);
        assert!(!BufferList::default().push(u64::MAX - 1, 4, false));
        assert!(!BufferList::default().push(0x1000, BUFFER_WRITE, false));
    }

    #[test]
    fn a_hostile_or_short_list_is_an_error() {
        let mut raw = (MAX_BUFFERS as u64 + 1).to_le_bytes().to_vec();
        assert_eq!(
            BufferList::decode(&raw),
            Err(BufferListError::TooMany(MAX_BUFFERS as u64 + 1))
        );
        raw = 2u64.to_le_bytes().to_vec();
        raw.extend_from_slice(&[0u8; 24]);
        assert_eq!(BufferList::decode(&raw), Err(BufferListError::Truncated));
        assert_eq!(BufferList::decode(&[1, 2]), Err(BufferListError::Truncated));
        assert_eq!(BufferList::decode(&0u64.to_le_bytes()), Ok(vec![]));
    }

    #[test]
    fn abi_constants() {
        assert_eq!(PORT, 0xE7);
        assert_eq!(SYS_IOPERM, libc::SYS_ioperm as u64);
        assert!(MAX_TOUCH.is_power_of_two() && MAX_MODULE_TOUCH > MAX_TOUCH);
        assert_eq!(BUFFER_LIST_SIZE, 8 + 16 * MAX_BUFFERS);
    }
}
