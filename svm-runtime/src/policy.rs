//! Which system calls of a diverted SVM program run in the GVM, and how (x86-64 only).
//!
//! This is the pure half of the preload shim (`svm-runtime/shim/`, `libexterior_shim.so`): the shim's
//! SIGSYS handler hands every diverted call to [`decide`] and carries out the [`Decision`].
//! Nothing here allocates, blocks or panics on any input, so it is safe to call from a signal
//! handler; every loop is bounded by a constant or by the length of a slice.
//!
//! # What runs in the GVM
//!
//! - Kernel-wide state: `uname`, `sethostname`, `setdomainname`, `sysinfo`, `syslog`,
//!   `init_module`, `finit_module` (on a redirected fd; on a local one it fails with
//!   `ENOSYS`, so kmod falls back to `init_module` with the image in memory),
//!   `delete_module`, and `statfs` of any absolute path (`df`).
//! - Other processes: `kill` unless it names the program itself or its own process group
//!   (pid 0); `setpriority`/`getpriority` unless `who` is 0 or the program's own pid. So
//!   `kill 1234` and `renice -p 1234` act in the GVM while `nice cmd` acts on itself.
//!   `tkill`/`tgkill` stay local: their only stock users signal their own threads. The price:
//!   a program signalling its own SVM children (a shell's `kill %1`, `kill $!`) signals the
//!   GVM's process of that number instead. Likewise `ioprio_get`/`ioprio_set`, and the
//!   calls naming one process by its pid unless it is 0 or the program's own:
//!   `prlimit64`, `sched_{get,set}{affinity,scheduler,param,attr}`,
//!   `sched_rr_get_interval`, `getpgid`, `getsid` (`taskset -p`, `chrt -p`, `prlimit`).
//! - Paths under `/proc` and `/sys` (exactly `/proc`, `/sys`, or below `/proc/` or `/sys/`,
//!   after lexical `.`/`..`/`//` clean-up) for `open`, `openat`, `openat2`, `stat`, `lstat`,
//!   `newfstatat`, `statx`, `access`, `faccessat`, `faccessat2`, `readlink`, `readlinkat`;
//!   relative paths when their dirfd is itself redirected. Also a few files that describe
//!   the GVM's state: `/dev/kmsg`, `/etc/passwd`, `/etc/group`, `/etc/hosts`,
//!   `/etc/hostid`, `/etc/mtab`, the login records (`/run/utmp`, `/var/run/utmp`,
//!   `/var/log/{wtmp,btmp,lastlog}`), `/run/netns/…`, `/run/udev/…`, and the mount
//!   tables of `/proc/self` (see [`rewrite_for_gvm`]).
//! - `socket(AF_NETLINK, …)`.
//! - Calls on a redirected fd (see [`FdTable`]): `read`, `pread64`, `readv`, `preadv`,
//!   `write`, `pwrite64`, `writev`, `pwritev`, `lseek`, `fstat`, `fstatfs`, `getdents64`,
//!   `close`, `fcntl` (`F_GETFL`, `F_SETFL`, `F_GETFD`, `F_SETFD`; `F_DUPFD*` as a dup; other
//!   commands fail with `EINVAL`), `ioctl`, `sendto`, `recvfrom`, `sendmsg`, `recvmsg`, `bind`,
//!   `connect`, `shutdown`, `getsockname`, `getpeername`, `setsockopt`, `getsockopt`,
//!   `fadvise64`, `dup`, `dup2`, `dup3`, and the `*at` calls above with it as dirfd
//!   (`AT_EMPTY_PATH` included). `mmap` of it fails with `ENODEV`. Any other call on it runs
//!   locally on the placeholder (`/dev/null`).
//!
//! # `/proc/self` stays local
//!
//! `/proc/self/…` and `/proc/thread-self/…` (and `/proc/self` itself) describe the calling
//! program: the dynamic loader and libc read `/proc/self/maps`, `exe`, `fd/`, `status`, and
//! the GVM's shadow task that would answer them is not the program. They run in the SVM.
//! `/proc/<the program's own pid>` is *not* special: it names whatever the GVM has at that
//! pid, as any other pid would. Known gaps of this lexical rule: `openat(<redirected /proc
//! fd>, "self/…")` is redirected, and a symlink outside `/proc` into it (`/etc/mtab`,
//! `/dev/fd`) stays local; so does everything relative to the working directory, even after
//! `chdir("/proc")`.
//!
//! # What a redirected call may return
//!
//! The GVM's kernel may be hostile, so its answer is checked against the call's contract
//! ([`Ret`], part of every [`Redirect`]) before the program, or the shim's fd table, sees
//! it. Every call may return `-errno` (`-4095..=-1`, [`MAX_ERRNO`]); besides that:
//!
//! | contract | calls |
//! | --- | --- |
//! | 0 ([`Ret::Zero`]) | `uname`, `sysinfo`, `sethostname`, `setdomainname`, `kill`, `setpriority`, `ioprio_set`, `prlimit64`, `sched_set*`, `sched_getparam`, `sched_getattr`, `sched_rr_get_interval`, `syslog` (but reads and sizes), `*_module`, `stat`s, `statfs`, `access`es, `fstat`, `fstatfs`, `close`, `fadvise64`, `bind`, `connect`, `shutdown`, `get/setsockopt`, `getsockname`, `getpeername`, `fcntl(F_SETFL/F_SETFD)` |
//! | a count of bytes of buffer *k* ([`Ret::Bytes`]): at most its length as the shim measured it *before* the call (an iovec array or a `msghdr`: the sum of the iovecs' lengths), and at most [`MAX_RW_COUNT`] | `read`, `pread64`, `getdents64`, `write`, `pwrite64`, `readv`, `preadv`, `writev`, `pwritev`, `readlink`, `readlinkat`, `sendto`, `recvfrom`, `sendmsg`, `recvmsg`, `sched_getaffinity`, `syslog` reads |
//! | a new GVM fd, `0..=i32::MAX` ([`Ret::Fd`]), which the shim maps to a placeholder and never hands to the program itself | `open`, `openat`, `openat2`, `socket`, `dup` (and `dup2`, `dup3`, `fcntl(F_DUPFD*)`, which become one) |
//! | a value in a range ([`Ret::Range`]) | `getpriority` 1..=40; `ioprio_get` 0..=0xffff; `sched_getscheduler` 0..=`SCHED_RESET_ON_FORK \| 7`; `getpgid`, `getsid` 0..=`PID_MAX_LIMIT`; `syslog` sizes 0..=`i32::MAX`; `lseek` 0..=`i64::MAX` (an offset); `fcntl(F_GETFL)` and `ioctl` 0..=`i32::MAX`; `fcntl(F_GETFD)` 0..=1; `recvfrom`/`recvmsg` with `MSG_TRUNC` 0..=[`MAX_RW_COUNT`] (the packet's true length, which may exceed the buffer) |
//!
//! A result out of contract becomes `-EIO` (the shim says so on stderr, naming the call and
//! the value): never a count larger than the buffer it counts, never an fd that an `as i32`
//! would truncate into another one. A call added without a contract gets [`Ret::Zero`], the
//! strictest.
//!
//! **No redirected call returns a pointer.** The calls whose result is an address (`mmap`,
//! `mremap`, `brk`, `shmat`) run locally (`mmap` of a placeholder fails with `ENODEV`), so
//! every redirected result is `-errno`, 0, an fd, a small number, a byte count bounded by
//! the program's own buffer, or an `lseek` offset: nothing the program dereferences. Only
//! `lseek` may return more than `i32::MAX` (its ABI type is `off_t`); an offset above
//! `i64::MAX` (`/proc/<pid>/mem` of kernel addresses) is refused.
//!
//! The VMM writes only RAX and RCX; the bytes a call writes into the program's buffers are
//! written by the GVM's kernel through the view (bounded by the pages the view maps, not
//! by this contract).
//!
//! # Refused
//!
//! Calls that would change the SVM where the operator means the GVM, and are not
//! redirected, fail with `ENOSYS` and a line on stderr ([`Decision::Refuse`]): `mount`,
//! `umount2`, `swapon`, `swapoff`, `pivot_root`, `reboot`, the System V IPC calls that make,
//! change or remove objects, and `pidfd_open` of another process. Advisory locks on a
//! redirected fd succeed without being taken ([`Decision::Pretend`]).
//!
//! # Everything else is local
//!
//! Local calls are re-issued unchanged, with rewrites that keep the shim alive and the
//! re-issue correct (see the variants of [`Decision`]): SIGSYS can never be blocked or get
//! another handler ([`sanitize_sigset`], [`sigprocmask`]); `fork`-like calls run so that the
//! child re-arms (`vfork` runs as `fork`); `clone3` fails with `ENOSYS` (glibc then falls back
//! to `clone`); `clone` with a new stack (threads, `posix_spawn`) is told where to return in
//! the child, which is not diverted; `execve` gets the surviving placeholders added to its
//! environment ([`FDS_ENV`]).

use core::sync::atomic::{AtomicI32, Ordering};

use crate::redirect_abi::{MAX_MODULE_TOUCH, MAX_TOUCH};

/// Placeholder fds the shim can track: a placeholder numbered at or above this is refused
/// with `EMFILE`.
pub const FD_TABLE_SIZE: usize = 4096;

/// Longest path (with its NUL) the shim copies; longer ones are `ENAMETOOLONG` in the kernel.
pub const PATH_MAX: usize = 4096;

/// x86-64 system call numbers the policy looks at.
pub mod nr {
    macro_rules! nrs {
        ($($name:ident = $sys:ident),* $(,)?) => {
            $(#[doc = concat!("`", stringify!($sys), "`.")] pub const $name: u64 = libc::$sys as u64;)*
        };
    }
    nrs! {
        READ = SYS_read, WRITE = SYS_write, OPEN = SYS_open, CLOSE = SYS_close,
        STAT = SYS_stat, FSTAT = SYS_fstat, LSTAT = SYS_lstat, LSEEK = SYS_lseek,
        MMAP = SYS_mmap, RT_SIGACTION = SYS_rt_sigaction, RT_SIGPROCMASK = SYS_rt_sigprocmask,
        RT_SIGRETURN = SYS_rt_sigreturn, IOCTL = SYS_ioctl, PREAD64 = SYS_pread64,
        PWRITE64 = SYS_pwrite64, READV = SYS_readv, WRITEV = SYS_writev, ACCESS = SYS_access,
        DUP = SYS_dup, DUP2 = SYS_dup2, SOCKET = SYS_socket, CONNECT = SYS_connect,
        SENDTO = SYS_sendto, RECVFROM = SYS_recvfrom, SENDMSG = SYS_sendmsg,
        RECVMSG = SYS_recvmsg, SHUTDOWN = SYS_shutdown, BIND = SYS_bind,
        GETSOCKNAME = SYS_getsockname, GETPEERNAME = SYS_getpeername,
        SETSOCKOPT = SYS_setsockopt, GETSOCKOPT = SYS_getsockopt, CLONE = SYS_clone,
        FORK = SYS_fork, VFORK = SYS_vfork, KILL = SYS_kill, UNAME = SYS_uname,
        FCNTL = SYS_fcntl, READLINK = SYS_readlink, SYSINFO = SYS_sysinfo,
        RT_SIGSUSPEND = SYS_rt_sigsuspend, FSTATFS = SYS_fstatfs,
        GETPRIORITY = SYS_getpriority, SETPRIORITY = SYS_setpriority,
        SETHOSTNAME = SYS_sethostname, SETDOMAINNAME = SYS_setdomainname,
        INIT_MODULE = SYS_init_module, DELETE_MODULE = SYS_delete_module,
        GETDENTS64 = SYS_getdents64, FADVISE64 = SYS_fadvise64, OPENAT = SYS_openat,
        NEWFSTATAT = SYS_newfstatat, READLINKAT = SYS_readlinkat, FACCESSAT = SYS_faccessat,
        PSELECT6 = SYS_pselect6, PPOLL = SYS_ppoll, EPOLL_PWAIT = SYS_epoll_pwait,
        DUP3 = SYS_dup3, PREADV = SYS_preadv, PWRITEV = SYS_pwritev,
        FINIT_MODULE = SYS_finit_module, STATX = SYS_statx, CLONE3 = SYS_clone3,
        CLOSE_RANGE = SYS_close_range, OPENAT2 = SYS_openat2, FACCESSAT2 = SYS_faccessat2,
        EPOLL_PWAIT2 = SYS_epoll_pwait2, GETPID = SYS_getpid, EXECVE = SYS_execve,
        EXECVEAT = SYS_execveat, SCHED_YIELD = SYS_sched_yield, STATFS = SYS_statfs,
        SYSLOG = SYS_syslog, GETPGID = SYS_getpgid, GETSID = SYS_getsid,
        SCHED_SETPARAM = SYS_sched_setparam, SCHED_GETPARAM = SYS_sched_getparam,
        SCHED_SETSCHEDULER = SYS_sched_setscheduler,
        SCHED_GETSCHEDULER = SYS_sched_getscheduler,
        SCHED_RR_GET_INTERVAL = SYS_sched_rr_get_interval,
        SCHED_SETAFFINITY = SYS_sched_setaffinity, SCHED_GETAFFINITY = SYS_sched_getaffinity,
        SCHED_SETATTR = SYS_sched_setattr, SCHED_GETATTR = SYS_sched_getattr,
        IOPRIO_SET = SYS_ioprio_set, IOPRIO_GET = SYS_ioprio_get, PRLIMIT64 = SYS_prlimit64,
        MOUNT = SYS_mount, UMOUNT2 = SYS_umount2, SWAPON = SYS_swapon, SWAPOFF = SYS_swapoff,
        PIVOT_ROOT = SYS_pivot_root, REBOOT = SYS_reboot, PIDFD_OPEN = SYS_pidfd_open,
        SHMGET = SYS_shmget, SHMCTL = SYS_shmctl, SEMGET = SYS_semget, SEMCTL = SYS_semctl,
        MSGGET = SYS_msgget, MSGCTL = SYS_msgctl,
    }
}

/// The bit of SIGSYS in a kernel `sigset_t` word.
pub const SIGSYS_BIT: u64 = 1 << (libc::SIGSYS - 1);
const UNBLOCKABLE: u64 = SIGSYS_BIT | 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);

/// A signal set with SIGSYS removed: the shim's SIGSYS must stay deliverable, or the next
/// diverted system call kills the program.
pub fn sanitize_sigset(set: u64) -> u64 {
    set & !SIGSYS_BIT
}

/// `rt_sigprocmask(how, set)` applied to the mask `current`: the new mask (SIGSYS, SIGKILL
/// and SIGSTOP never in it), or the errno for an invalid `how`.
pub fn sigprocmask(how: u64, current: u64, set: u64) -> Result<u64, i32> {
    let new = match how {
        h if h == libc::SIG_BLOCK as u64 => current | set,
        h if h == libc::SIG_UNBLOCK as u64 => current & !set,
        h if h == libc::SIG_SETMASK as u64 => set,
        _ => return Err(libc::EINVAL),
    };
    Ok(new & !UNBLOCKABLE)
}

/// Rewrites, in place, a NUL-terminated absolute path about to be redirected so that it
/// means in the GVM what it means to the program: `/proc/net` and `/proc/mounts` are
/// symlinks to `self/…`, and the shadow task that runs redirected calls is nobody's
/// `self` (pid 0, so `/proc/self` fails there). They become `/proc/1/net`,
/// `/proc/1/mounts`: the network namespace and mounts of the GVM's init. So do the mount
/// tables of `/proc/self` and `/proc/thread-self` ([`MOUNT_TABLES`], spelled plainly:
/// another spelling reaches the GVM unchanged and fails there, never shows the SVM's),
/// and `/etc/mtab`.
/// Returns whether it changed anything (false also when the result would not fit).
pub fn rewrite_for_gvm(path: &mut [u8; PATH_MAX]) -> bool {
    const SELF_LINKS: [&[u8]; 2] = [b"/proc/net", b"/proc/mounts"];
    let Some(len) = path.iter().position(|&b| b == 0) else {
        return false;
    };
    const MTAB: &[u8] = b"/etc/mtab";
    const INIT_MOUNTS: &[u8] = b"/proc/1/mounts\0";
    if &path[..len] == MTAB {
        path[..INIT_MOUNTS.len()].copy_from_slice(INIT_MOUNTS);
        return true;
    }
    for own in [b"/proc/self/".as_slice(), b"/proc/thread-self/"] {
        let Some(table) = path[..len].strip_prefix(own) else {
            continue;
        };
        if !MOUNT_TABLES.contains(&table) {
            return false;
        }
        // "/proc/" + "1/" + the table and its NUL: shorter than before.
        path.copy_within(own.len()..=len, 8);
        path[6..8].copy_from_slice(b"1/");
        return true;
    }
    let linked = SELF_LINKS
        .iter()
        .any(|p| path[..len].starts_with(p) && matches!(path.get(p.len()), Some(b'/') | Some(0)));
    if !linked || len + 2 >= PATH_MAX {
        return false;
    }
    // "/proc" + "/1" + the rest.
    path.copy_within(5..=len, 7);
    path[5..7].copy_from_slice(b"/1");
    true
}

/// The files of `/proc/self` that describe the system's mounts rather than the program:
/// the GVM's (init's, see [`rewrite_for_gvm`]).
const MOUNT_TABLES: [&[u8]; 3] = [b"mounts", b"mountinfo", b"mountstats"];

/// Files of `/etc` that describe the GVM's users, its name's address and host id
/// (`hostname -f`, `hostid`), and `/etc/mtab` (rewritten to init's mounts: in the GVM it
/// is a link to `self`, which the shadow task is not).
const ETC_FILES: [&[u8]; 5] = [b"passwd", b"group", b"mtab", b"hosts", b"hostid"];

/// Directories of `/run` that describe the GVM's state.
const RUN_DIRS: [&[u8]; 2] = [b"netns", b"udev"];

/// The login records of `/var/log`.
const LOGIN_LOGS: [&[u8]; 3] = [b"wtmp", b"btmp", b"lastlog"];

/// `NETLINK_SOCK_DIAG`, the netlink protocol of `ss`.
const NETLINK_SOCK_DIAG: u64 = 4;

/// Where a path's object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The SVM's own: run the call locally.
    Svm,
    /// The GVM's kernel state (`/proc`, `/sys`): redirect the call.
    Gvm,
}

/// Classifies an absolute path (bytes without the NUL) by its first two components after
/// lexical clean-up; a relative path is [`Place::Svm`] (its dirfd decides, see [`decide`]).
pub fn classify_path(path: &[u8]) -> Place {
    classify_path_for(path, None)
}

/// [`classify_path`] for a program whose pid is `own_pid`: `/proc/<own_pid>` is the program
/// itself, like `/proc/self` (procps looks itself up that way). The SVM's agent starts
/// programs with pids far above any the GVM uses (see `exterior-agent`), so this never
/// hides a GVM process.
pub fn classify_path_for(path: &[u8], own_pid: Option<i32>) -> Place {
    if path.first() != Some(&b'/') {
        return Place::Svm;
    }
    // Only the first three components of the cleaned path matter, so track the depth and
    // those three: a `..` that climbs back to depth 1 to 3 uncovers the recorded component.
    let (mut depth, mut first, mut second, mut third): (usize, &[u8], &[u8], &[u8]) =
        (0, b"", b"", b"");
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => depth = depth.saturating_sub(1),
            _ => {
                depth += 1;
                match depth {
                    1 => first = comp,
                    2 => second = comp,
                    3 => third = comp,
                    _ => {}
                }
            }
        }
    }
    let own = second == b"self" || second == b"thread-self";
    match (depth, first) {
        (0, _) => Place::Svm,
        (_, b"sys") => Place::Gvm,
        (1, b"proc") => Place::Gvm,
        // The kernel log device (`dmesg`).
        (2, b"dev") if second == b"kmsg" => Place::Gvm,
        // The GVM's users and logins (`ps` user names, `who`, `w`, `last`) and its mount
        // table's old name.
        (2, b"etc") if ETC_FILES.contains(&second) => Place::Gvm,
        (2, b"run") if second == b"utmp" => Place::Gvm,
        // Its named network namespaces (`ip netns list`) and udev's database of its
        // devices (`lsblk`'s FS, LABEL and UUID columns).
        (2.., b"run") if RUN_DIRS.contains(&second) => Place::Gvm,
        (3, b"var") if second == b"run" && third == b"utmp" => Place::Gvm,
        (3, b"var") if second == b"log" && LOGIN_LOGS.contains(&third) => Place::Gvm,
        // The program's mount table is the GVM's (`mount`, `findmnt`, `df`): the rewrite
        // makes it init's.
        (3, b"proc") if own && MOUNT_TABLES.contains(&third) => Place::Gvm,
        (_, b"proc") if own => Place::Svm,
        (_, b"proc") if own_pid.is_some_and(|pid| is_decimal(second, pid)) => Place::Svm,
        (_, b"proc") => Place::Gvm,
        _ => Place::Svm,
    }
}

/// True if `text` is the decimal form of `n` (no sign, no leading zeros).
fn is_decimal(text: &[u8], n: i32) -> bool {
    let mut buf = [0u8; 20];
    n >= 0 && text == decimal(n as u64, &mut buf)
}

/// `n` in decimal, written at the end of `buf` without allocating (the SIGSYS handler
/// formats with it); returns the digits.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Placeholder fd (in the SVM) → the GVM's fd. Lock-free and allocation-free, so the SIGSYS
/// handler can use a `static` one.
pub struct FdTable {
    remote: [AtomicI32; FD_TABLE_SIZE],
}

impl Default for FdTable {
    fn default() -> Self {
        Self::new()
    }
}

impl FdTable {
    /// A table with no placeholders.
    pub const fn new() -> FdTable {
        FdTable {
            remote: [const { AtomicI32::new(-1) }; FD_TABLE_SIZE],
        }
    }

    fn slot(&self, fd: i64) -> Option<&AtomicI32> {
        usize::try_from(fd).ok().and_then(|i| self.remote.get(i))
    }

    /// The GVM fd behind a register holding an `int` fd (only its low 32 bits count, as in
    /// the kernel), if it is a placeholder.
    pub fn remote(&self, reg: u64) -> Option<i32> {
        let r = self
            .slot(i64::from(reg as u32 as i32))?
            .load(Ordering::Relaxed);
        (r >= 0).then_some(r)
    }

    /// Records `placeholder → remote`; false (nothing recorded) when the placeholder is out
    /// of the table's range or either number is negative.
    pub fn insert(&self, placeholder: i32, remote: i32) -> bool {
        match self.slot(i64::from(placeholder)) {
            Some(s) if remote >= 0 => {
                s.store(remote, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Forgets a placeholder, returning its GVM fd.
    pub fn take(&self, placeholder: i32) -> Option<i32> {
        let r = self
            .slot(i64::from(placeholder))?
            .swap(-1, Ordering::Relaxed);
        (r >= 0).then_some(r)
    }

    /// Whether any placeholder lies in `[first, last]` (fd numbers as the kernel reads them).
    pub fn any_in(&self, first: u32, last: u32) -> bool {
        let end = (last as usize).min(FD_TABLE_SIZE - 1);
        (first as usize..=end).any(|fd| self.remote[fd].load(Ordering::Relaxed) >= 0)
    }
}

/// Environment variable that hands placeholders across `execve`: `EXTERIOR_SHIM_FDS=` then
/// `placeholder:remote` pairs separated by commas (decimal).
pub const FDS_ENV: &str = "EXTERIOR_SHIM_FDS";

/// Parses the value of [`FDS_ENV`] into `(placeholder, remote)` pairs, calling `each` for every
/// well-formed pair (at most [`FD_TABLE_SIZE`]); malformed pairs are skipped.
pub fn parse_fds_env(value: &[u8], mut each: impl FnMut(i32, i32)) {
    let num = |s: &[u8]| -> Option<i32> {
        if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        s.iter().try_fold(0i32, |n, &d| {
            n.checked_mul(10)?.checked_add(i32::from(d - b'0'))
        })
    };
    for pair in value.split(|&b| b == b',').take(FD_TABLE_SIZE) {
        let mut it = pair.splitn(2, |&b| b == b':');
        if let (Some(Some(p)), Some(Some(r))) = (it.next().map(num), it.next().map(num)) {
            each(p, r);
        }
    }
}

/// Writes the value of [`FDS_ENV`] for `pairs` into `out`; returns the length used. Stops
/// before a pair that would not fit.
pub fn format_fds_env(pairs: impl Iterator<Item = (i32, i32)>, out: &mut [u8]) -> usize {
    let mut len = 0;
    for (p, r) in pairs {
        let mut item = [0u8; 24];
        let mut n = 0;
        if len > 0 {
            item[0] = b',';
            n = 1;
        }
        for (i, v) in [p, r].into_iter().enumerate() {
            if i == 1 {
                item[n] = b':';
                n += 1;
            }
            let mut buf = [0u8; 20];
            let digits = decimal(u64::from(v.max(0) as u32), &mut buf);
            item[n..n + digits.len()].copy_from_slice(digits);
            n += digits.len();
        }
        match out.get_mut(len..len + n) {
            Some(dst) => dst.copy_from_slice(&item[..n]),
            None => break,
        }
        len += n;
    }
    len
}

/// A string argument as the shim copied it from the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Str<'a> {
    /// The call has no string argument.
    None,
    /// The bytes before the NUL.
    Ok(&'a [u8]),
    /// The pointer could not be read.
    Fault,
    /// No NUL within [`PATH_MAX`] bytes.
    TooLong,
}

/// The index of the call's string argument (a path, a module name or module parameters),
/// which the shim copies before calling [`decide`].
pub fn string_arg(nr: u64) -> Option<usize> {
    use nr::*;
    match nr {
        OPEN | STAT | LSTAT | ACCESS | READLINK | STATFS | DELETE_MODULE => Some(0),
        OPENAT | OPENAT2 | NEWFSTATAT | STATX | FACCESSAT | FACCESSAT2 | READLINKAT
        | FINIT_MODULE => Some(1),
        INIT_MODULE => Some(2),
        _ => None,
    }
}

/// The length of a user buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    /// This many bytes (the size of the structure the call fills or reads).
    Const(usize),
    /// The value of this argument.
    Arg(usize),
    /// The value of this `int` argument (its low 32 bits, as the kernel reads it; a
    /// negative one is 0 bytes).
    ArgInt(usize),
    /// The `u32` (a `socklen_t`) this argument points to.
    ArgPtr(usize),
}

impl Len {
    /// The length for the call's arguments `args`; `None` for [`Len::ArgPtr`], which is
    /// in the program's memory (the shim reads it).
    pub fn of(self, args: &[u64; 6]) -> Option<u64> {
        match self {
            Len::Const(n) => Some(n as u64),
            Len::Arg(i) => args.get(i).copied(),
            Len::ArgInt(i) => args.get(i).map(|&a| (a as u32 as i32).max(0) as u64),
            Len::ArgPtr(_) => None,
        }
    }
}

/// Largest `-errno` a system call returns (the kernel's `MAX_ERRNO`): results in
/// `-MAX_ERRNO..=-1` are errors, whatever the call.
pub const MAX_ERRNO: i64 = 4095;

/// Most bytes one read or write moves (the kernel's `MAX_RW_COUNT`, `INT_MAX` rounded down
/// to a page): the cap of every byte count a redirected call returns.
pub const MAX_RW_COUNT: u64 = 0x7fff_f000;

/// What a redirected call may return besides `-errno`: its contract (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// 0.
    Zero,
    /// A count of bytes moved through `bufs[k]`: at most that buffer's length as the shim
    /// measured it before the call (for an iovec array or a `msghdr`, the sum of its
    /// iovecs' lengths) and at most [`MAX_RW_COUNT`].
    Bytes(usize),
    /// A new GVM fd: `0..=i32::MAX`.
    Fd,
    /// A value in `lo..=hi`.
    Range(i64, i64),
}

/// The results a call accepts: `-errno`, or a value in `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// The smallest successful result.
    pub lo: i64,
    /// The largest successful result.
    pub hi: i64,
}

impl Accept {
    /// A new fd (an `int`, never negative).
    pub const FD: Accept = Accept {
        lo: 0,
        hi: i32::MAX as i64,
    };

    /// `ret` if it is `-errno` or in `lo..=hi`; else `Err(ret)`, out of contract.
    pub fn check(self, ret: i64) -> Result<i64, i64> {
        if (-MAX_ERRNO..=-1).contains(&ret) || (self.lo..=self.hi).contains(&ret) {
            Ok(ret)
        } else {
            Err(ret)
        }
    }
}

/// The GVM fd in a result that [`Accept::FD`] accepted: `None` for `-errno` (or anything
/// that is not an `int` fd, so no value can be truncated into another fd).
pub fn gvm_fd(ret: i64) -> Option<i32> {
    i32::try_from(ret).ok().filter(|fd| *fd >= 0)
}

/// The total length of an iovec array's entries (`struct iovec`, 16 bytes each, as the
/// program's memory holds them), saturating; a trailing partial entry is ignored.
pub fn iov_bytes(raw: &[u8]) -> u64 {
    raw.chunks_exact(16).fold(0u64, |sum, e| {
        let mut len = [0u8; 8];
        len.copy_from_slice(&e[8..]);
        sum.saturating_add(u64::from_ne_bytes(len))
    })
}

/// How a user buffer is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `len` bytes at the pointer.
    Flat,
    /// An iovec array; `len` is the entry count.
    Iov,
    /// A `struct msghdr` with its name, iovecs and control data.
    Msg,
}

/// A user buffer the redirected call reads (`write == false`) or writes; the shim makes its
/// pages present (and writable) before the `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// The argument holding the pointer.
    pub arg: usize,
    /// How long it is.
    pub len: Len,
    /// Whether the call writes it (else it only reads it).
    pub write: bool,
    /// How it is laid out.
    pub shape: Shape,
}

/// What the shim does with the GVM's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Hand it to the program.
    Result,
    /// It is a new GVM fd: reserve a placeholder (`/dev/null`) and return that.
    NewFd {
        /// Whether the placeholder gets `FD_CLOEXEC` (the call asked for close-on-exec).
        cloexec: bool,
    },
    /// The placeholder's GVM fd was closed: close the placeholder and forget it (whatever
    /// the result).
    Close {
        /// The placeholder fd in the SVM.
        placeholder: i32,
    },
    /// The call was rewritten to a `dup` of the placeholder's GVM fd: run the program's
    /// original call locally on the placeholder, map the fd it returns to the new GVM fd (a
    /// placeholder it replaced is released), or close the new GVM fd if the local call fails.
    Dup,
    /// Also run the original call locally on the placeholder (`F_SETFD`).
    AlsoLocal,
}

/// A call to run in the GVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// The system call number (x86-64).
    pub nr: u64,
    /// Arguments with placeholders translated and lengths clamped.
    pub args: [u64; 6],
    /// Point this argument at the shim's NUL-terminated copy of the string argument.
    pub string_arg: Option<usize>,
    /// The user buffers the call reads or writes.
    pub bufs: [Option<Buf>; 3],
    /// Most bytes of buffers to fault in for the call (plus
    /// [`crate::redirect_abi::MAX_SIDE_TOUCH`]); a call whose buffers need more fails.
    pub touch_limit: usize,
    /// Whether a buffer that cannot be touched fails the call with `EFAULT` (false for
    /// `ioctl`, whose argument may not be a pointer at all).
    pub strict: bool,
    /// What to do with the result.
    pub then: Then,
    /// What the result may be (checked before it is used or returned).
    pub ret: Ret,
}

impl Redirect {
    fn new(nr: u64, args: [u64; 6]) -> Redirect {
        Redirect {
            nr,
            args,
            string_arg: None,
            bufs: [None; 3],
            touch_limit: MAX_TOUCH,
            strict: true,
            then: Then::Result,
            ret: Ret::Zero,
        }
    }

    /// The results this call accepts, with `sizes[k]` the length in bytes of `bufs[k]` as
    /// the shim measured it before the call (`None`: not measured, 0 bytes).
    pub fn accept(&self, sizes: &[Option<u64>; 3]) -> Accept {
        match self.ret {
            Ret::Zero => Accept { lo: 0, hi: 0 },
            Ret::Fd => Accept::FD,
            Ret::Range(lo, hi) => Accept { lo, hi },
            Ret::Bytes(k) => {
                let n = sizes.get(k).copied().flatten().unwrap_or(0);
                Accept {
                    lo: 0,
                    // At most MAX_RW_COUNT, which fits.
                    hi: n.min(MAX_RW_COUNT) as i64,
                }
            }
        }
    }
    fn buf(mut self, arg: usize, len: Len, write: bool, shape: Shape) -> Redirect {
        if let Some(slot) = self.bufs.iter_mut().find(|b| b.is_none()) {
            *slot = Some(Buf {
                arg,
                len,
                write,
                shape,
            });
        }
        self
    }
    fn input(self, arg: usize, len: Len) -> Redirect {
        self.buf(arg, len, false, Shape::Flat)
    }
    fn output(self, arg: usize, len: Len) -> Redirect {
        self.buf(arg, len, true, Shape::Flat)
    }
    /// Sets what the shim does with the result; a result that is a new GVM fd gets the
    /// fd contract with it.
    fn then(mut self, then: Then) -> Redirect {
        self.then = then;
        if matches!(then, Then::NewFd { .. } | Then::Dup) {
            self.ret = Ret::Fd;
        }
        self
    }
    fn ret(mut self, ret: Ret) -> Redirect {
        self.ret = ret;
        self
    }
    fn string(mut self, arg: usize) -> Redirect {
        self.string_arg = Some(arg);
        self
    }
    fn clamp(mut self, arg: usize) -> Redirect {
        self.args[arg] = self.args[arg].min(MAX_TOUCH as u64);
        self
    }
    /// [`Redirect::clamp`] for an `int` length, as the kernel reads it (a negative one is
    /// left for the kernel to refuse).
    fn clamp_int(mut self, arg: usize) -> Redirect {
        let len = self.args[arg] as u32 as i32;
        if len >= 0 {
            self.args[arg] = (len as u64).min(MAX_TOUCH as u64);
        }
        self
    }
}

/// What the shim does with one diverted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Re-issue it in the SVM unchanged.
    Local,
    /// A new process that does not share memory: run `nr(args)` from the handler, so that the
    /// child, which starts as a copy of the handler's frame, re-arms dispatch for itself before
    /// it returns to the program (dispatch is not inherited). `vfork` runs as `fork` (its
    /// child would otherwise run on, and overwrite, the parent's frame).
    Fork {
        /// The call to make: `fork`, or `clone` without `CLONE_VM`.
        nr: u64,
        /// Its arguments.
        args: [u64; 6],
    },
    /// `clone` with a new stack: the child must find its way back on that stack.
    CloneNewStack,
    /// `execve`/`execveat`: run it locally, with the placeholders that survive the exec
    /// described to the new image in its environment (argument `envp`), see
    /// [`FDS_ENV`].
    Exec {
        /// The index of the `envp` argument.
        envp: usize,
    },
    /// The program's own `rt_sigreturn`: resume at the shim's restorer with the program's
    /// stack untouched.
    SigReturn,
    /// Emulate `rt_sigprocmask` on the mask the handler's return restores.
    SigProcMask,
    /// `rt_sigaction`: pretend for SIGSYS, clear SIGSYS from `sa_mask` otherwise.
    SigAction,
    /// Re-issue it locally with the signal mask at argument `idx` sanitised; `indirect`: the
    /// argument points to `{ const sigset_t *, size_t }` (`pselect6`).
    MaskArg {
        /// The index of the signal-mask argument.
        idx: usize,
        /// Whether that argument points to `{ const sigset_t *, size_t }`.
        indirect: bool,
    },
    /// Run it locally, then (if it succeeded) close the GVM fds of the placeholders in
    /// `[first, last]` and forget them: `dup2`/`dup3` onto a placeholder, `close_range`.
    LocalThenRelease {
        /// The lowest fd released.
        first: u32,
        /// The highest fd released.
        last: u32,
    },
    /// Do not run it; return this (`-errno`).
    Fail(i64),
    /// Do not run it: run locally it would act on the SVM where the program means the
    /// GVM, and it is not redirected. The shim says so on stderr and returns this
    /// (`-errno`).
    Refuse(i64),
    /// Do not run it; report success (0).
    Pretend,
    /// Run it in the GVM.
    Redirect(Redirect),
}

const STAT_SIZE: usize = 144;
const STATX_SIZE: usize = 256;
const STATFS_SIZE: usize = 120;
const UTSNAME_SIZE: usize = 6 * 65;
const SYSINFO_SIZE: usize = 112;
const IFREQ_SIZE: usize = 40;
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
const RLIMIT_SIZE: usize = 16;
const SCHED_PARAM_SIZE: usize = 4;
const TIMESPEC_SIZE: usize = 16;
/// `SCHED_ATTR_SIZE_VER1`.
const SCHED_ATTR_SIZE: usize = 56;
/// The flag `sched_getscheduler` may add to the policy (0..=7).
const SCHED_RESET_ON_FORK: i64 = 0x4000_0000;
/// The kernel's `PID_MAX_LIMIT` on 64-bit: no pid or session id is larger.
const PID_MAX_LIMIT: i64 = 1 << 22;
const IOPRIO_WHO_PROCESS: u64 = 1;
/// `_IO(0xb7, 1)` and `_IO(0xb7, 2)`.
const NS_GET_USERNS: u32 = 0xb701;
const NS_GET_PARENT: u32 = 0xb702;
const SYSLOG_ACTION_READ: i32 = 2;
const SYSLOG_ACTION_READ_CLEAR: i32 = 4;
const SYSLOG_ACTION_SIZE_UNREAD: i32 = 9;
const SYSLOG_ACTION_SIZE_BUFFER: i32 = 10;

fn fail(errno: i32) -> Decision {
    Decision::Fail(-i64::from(errno))
}

/// Decides one diverted call. `own_pid` is the program's pid in the SVM; `s` is its string
/// argument as copied by the shim ([`string_arg`]).
pub fn decide(nr: u64, a: [u64; 6], fds: &FdTable, own_pid: i32, s: Str) -> Decision {
    use nr::*;
    let redirect = |r: Redirect| Decision::Redirect(r);
    let call = Redirect::new(nr, a);
    let int = |i: usize| a[i] as u32 as i32;
    match nr {
        RT_SIGRETURN => return Decision::SigReturn,
        RT_SIGPROCMASK => return Decision::SigProcMask,
        RT_SIGACTION => return Decision::SigAction,
        RT_SIGSUSPEND | PPOLL | EPOLL_PWAIT | EPOLL_PWAIT2 | PSELECT6 => {
            let (idx, indirect) = match nr {
                RT_SIGSUSPEND => (0, false),
                PPOLL => (3, false),
                PSELECT6 => (5, true),
                _ => (4, false),
            };
            return if a[idx] == 0 {
                Decision::Local
            } else {
                Decision::MaskArg { idx, indirect }
            };
        }
        // They would mount, swap, reboot or pivot the SVM, or make, change or remove its
        // System V IPC objects (`ipcmk`, `ipcrm`; `ipcs` and `lsipc` read the GVM's
        // /proc/sysvipc) (docs/LIMITS.md).
        MOUNT | UMOUNT2 | SWAPON | SWAPOFF | PIVOT_ROOT | REBOOT | SHMGET | SHMCTL | SEMGET
        | SEMCTL | MSGGET | MSGCTL => {
            return Decision::Refuse(-i64::from(libc::ENOSYS));
        }
        // A pidfd is polled locally, where a placeholder would be always ready: `pidwait`
        // would return at once. ENOSYS makes callers that can fall back to `kill` do so.
        PIDFD_OPEN if int(0) != own_pid => return Decision::Refuse(-i64::from(libc::ENOSYS)),
        FORK => return Decision::Fork { nr, args: a },
        VFORK => return Decision::Fork { nr: FORK, args: a },
        CLONE3 => return fail(libc::ENOSYS),
        EXECVE => return Decision::Exec { envp: 2 },
        EXECVEAT => return Decision::Exec { envp: 3 },
        CLONE => {
            let (vm, vfork) = (libc::CLONE_VM as u64, libc::CLONE_VFORK as u64);
            return if a[1] != 0 {
                Decision::CloneNewStack
            } else if a[0] & vm == 0 {
                Decision::Fork { nr, args: a }
            } else if a[0] & vfork != 0 {
                let mut args = a;
                args[0] &= !(vm | vfork);
                Decision::Fork { nr, args }
            } else {
                // Two threads on one stack: nothing sane to preserve.
                Decision::Local
            };
        }
        UNAME => return redirect(call.output(0, Len::Const(UTSNAME_SIZE))),
        SYSINFO => return redirect(call.output(0, Len::Const(SYSINFO_SIZE))),
        SETHOSTNAME | SETDOMAINNAME => return redirect(call.input(0, Len::Arg(1))),
        KILL => {
            let pid = int(0);
            return if pid == 0 || pid == own_pid {
                Decision::Local
            } else {
                redirect(call)
            };
        }
        // They name processes by (which, who): `who` 0 is the caller's own process, group
        // or user; "process" (PRIO_PROCESS, IOPRIO_WHO_PROCESS) with the program's own pid
        // is the program too.
        SETPRIORITY | GETPRIORITY | IOPRIO_GET | IOPRIO_SET => {
            let process = match nr {
                SETPRIORITY | GETPRIORITY => libc::PRIO_PROCESS as u64,
                _ => IOPRIO_WHO_PROCESS,
            };
            let who = int(1);
            if who == 0 || (a[0] == process && who == own_pid) {
                return Decision::Local;
            }
            return redirect(match nr {
                // The raw call returns 20 - nice: 1..=40.
                GETPRIORITY => call.ret(Ret::Range(1, 40)),
                IOPRIO_GET => call.ret(Ret::Range(0, 0xffff)),
                _ => call,
            });
        }
        // Calls about one process named by its pid (argument 0; 0 is the caller): another
        // process's scheduling, affinity, limits and session are the GVM's (`chrt -p`,
        // `taskset -p`, `prlimit --pid`).
        PRLIMIT64
        | SCHED_SETAFFINITY
        | SCHED_GETAFFINITY
        | SCHED_SETSCHEDULER
        | SCHED_GETSCHEDULER
        | SCHED_SETPARAM
        | SCHED_GETPARAM
        | SCHED_RR_GET_INTERVAL
        | SCHED_SETATTR
        | SCHED_GETATTR
        | GETPGID
        | GETSID => {
            let pid = int(0);
            if pid == 0 || pid == own_pid {
                return Decision::Local;
            }
            return redirect(match nr {
                PRLIMIT64 => call
                    .input(2, Len::Const(RLIMIT_SIZE))
                    .output(3, Len::Const(RLIMIT_SIZE)),
                SCHED_SETAFFINITY => call.clamp_int(1).input(2, Len::ArgInt(1)),
                // The raw call returns the bytes of the mask it wrote.
                SCHED_GETAFFINITY => call
                    .clamp_int(1)
                    .output(2, Len::ArgInt(1))
                    .ret(Ret::Bytes(0)),
                SCHED_SETSCHEDULER => call.input(2, Len::Const(SCHED_PARAM_SIZE)),
                SCHED_GETSCHEDULER => call.ret(Ret::Range(0, SCHED_RESET_ON_FORK | 7)),
                SCHED_SETPARAM => call.input(1, Len::Const(SCHED_PARAM_SIZE)),
                SCHED_GETPARAM => call.output(1, Len::Const(SCHED_PARAM_SIZE)),
                SCHED_RR_GET_INTERVAL => call.output(1, Len::Const(TIMESPEC_SIZE)),
                // The kernel reads the size from the structure: one larger than the
                // version-1 layout reaches past the listed range and fails in the GVM.
                SCHED_SETATTR => call.input(1, Len::Const(SCHED_ATTR_SIZE)),
                SCHED_GETATTR => call.output(1, Len::ArgInt(2)),
                _ => call.ret(Ret::Range(0, PID_MAX_LIMIT)),
            });
        }
        // The kernel log (`dmesg -S`, `dmesg -C`, `dmesg -n`).
        SYSLOG => {
            let call = call.clamp_int(2);
            return redirect(match int(0) {
                SYSLOG_ACTION_READ..=SYSLOG_ACTION_READ_CLEAR => {
                    call.output(1, Len::ArgInt(2)).ret(Ret::Bytes(0))
                }
                SYSLOG_ACTION_SIZE_UNREAD | SYSLOG_ACTION_SIZE_BUFFER => {
                    call.ret(Ret::Range(0, i32::MAX.into()))
                }
                _ => call,
            });
        }
        INIT_MODULE => {
            return match s {
                Str::Ok(_) => {
                    let mut r = call.input(0, Len::Arg(1)).string(2);
                    r.touch_limit = MAX_MODULE_TOUCH;
                    redirect(r)
                }
                Str::TooLong => fail(libc::E2BIG),
                _ => fail(libc::EFAULT),
            }
        }
        DELETE_MODULE => {
            return match s {
                Str::Ok(_) => redirect(call.string(0)),
                Str::TooLong => fail(libc::ENOENT),
                _ => fail(libc::EFAULT),
            }
        }
        // sock_diag (`ss`): its first request in a GVM without inet_diag loaded autoloads
        // the module through a usermode helper and sleeps, holding sock_diag_mutex; a call
        // that sleeps is stopped, which would leave that mutex held. Refused here, `ss`
        // falls back to /proc/net/*, which is redirected (docs/LIMITS.md).
        SOCKET if a[0] == libc::AF_NETLINK as u64 && a[2] == NETLINK_SOCK_DIAG => {
            return fail(libc::EPROTONOSUPPORT);
        }
        SOCKET if a[0] == libc::AF_NETLINK as u64 => {
            let cloexec = a[1] & libc::SOCK_CLOEXEC as u64 != 0;
            return redirect(call.then(Then::NewFd { cloexec }));
        }
        DUP2 | DUP3 => {
            let (old, new) = (fds.remote(a[0]), int(1));
            if a[0] as u32 == new as u32 {
                // Nothing to duplicate: dup2 checks the fd, dup3 fails with EINVAL.
                return Decision::Local;
            }
            if old.is_some() && !(0..FD_TABLE_SIZE as i32).contains(&new) {
                return fail(libc::EMFILE);
            }
            if old.is_none() {
                return if fds.remote(a[1]).is_some() {
                    Decision::LocalThenRelease {
                        first: new as u32,
                        last: new as u32,
                    }
                } else {
                    Decision::Local
                };
            }
        }
        // A module file in the SVM cannot be loaded by the GVM: ENOSYS makes kmod fall back
        // to init_module with the image in memory, which is redirected.
        FINIT_MODULE if fds.remote(a[0]).is_none() => return fail(libc::ENOSYS),
        CLOSE_RANGE => {
            let (first, last) = (a[0] as u32, a[1] as u32);
            let release = a[2] & CLOSE_RANGE_CLOEXEC == 0 && fds.any_in(first, last);
            return if release {
                Decision::LocalThenRelease { first, last }
            } else {
                Decision::Local
            };
        }
        MMAP => {
            let anon = a[3] & libc::MAP_ANONYMOUS as u64 != 0;
            return if !anon && fds.remote(a[4]).is_some() {
                fail(libc::ENODEV)
            } else {
                Decision::Local
            };
        }
        _ => {}
    }

    // Path calls: (dirfd argument, path argument).
    let at = match nr {
        OPEN | STAT | LSTAT | ACCESS | READLINK | STATFS => Some((None, 0)),
        OPENAT | OPENAT2 | NEWFSTATAT | STATX | FACCESSAT | FACCESSAT2 | READLINKAT => {
            Some((Some(0), 1))
        }
        _ => None,
    };
    if let Some((dirfd, path)) = at {
        let Str::Ok(p) = s else {
            return Decision::Local;
        };
        let mut call = call.string(path);
        if p.first() == Some(&b'/') {
            // A file system's usage is the GVM's wherever it is mounted (`df`, `stat -f`):
            // every absolute `statfs` goes there.
            if nr != STATFS && classify_path_for(p, Some(own_pid)) == Place::Svm {
                return Decision::Local;
            }
        } else {
            match dirfd.and_then(|i| fds.remote(a[i]).map(|r| (i, r))) {
                Some((i, r)) => call.args[i] = r as u64,
                None => return Decision::Local,
            }
        }
        let call = match nr {
            OPEN => call.then(Then::NewFd {
                cloexec: a[1] & libc::O_CLOEXEC as u64 != 0,
            }),
            OPENAT => call.then(Then::NewFd {
                cloexec: a[2] & libc::O_CLOEXEC as u64 != 0,
            }),
            // The flags are in user memory: an inherited placeholder is useless anyway.
            OPENAT2 => call
                .input(2, Len::Arg(3))
                .then(Then::NewFd { cloexec: true }),
            STAT | LSTAT => call.output(1, Len::Const(STAT_SIZE)),
            STATFS => call.output(1, Len::Const(STATFS_SIZE)),
            NEWFSTATAT => call.output(2, Len::Const(STAT_SIZE)),
            STATX => call.output(4, Len::Const(STATX_SIZE)),
            READLINK => call.output(1, Len::ArgInt(2)).ret(Ret::Bytes(0)),
            READLINKAT => call.output(2, Len::ArgInt(3)).ret(Ret::Bytes(0)),
            _ => call,
        };
        return redirect(call);
    }

    // Calls on a redirected fd (argument 0).
    let Some(remote) = fds.remote(a[0]) else {
        return Decision::Local;
    };
    let placeholder = int(0);
    let mut call = call;
    call.args[0] = remote as u64;
    let dup = |mut c: Redirect| {
        c.nr = DUP;
        c.args = [remote as u64, 0, 0, 0, 0, 0];
        redirect(c.then(Then::Dup))
    };
    let iov = |c: Redirect, write: bool| c.buf(1, Len::Arg(2), write, Shape::Iov);
    let socklen_out = |c: Redirect, buf: usize, len: usize| {
        c.output(buf, Len::ArgPtr(len)).output(len, Len::Const(4))
    };
    // With MSG_TRUNC a receive returns the datagram's true length, which may exceed the
    // buffer (iproute2 sizes its buffer with MSG_PEEK | MSG_TRUNC).
    let received = |flags: u64| {
        if flags as u32 & libc::MSG_TRUNC as u32 != 0 {
            Ret::Range(0, MAX_RW_COUNT as i64)
        } else {
            Ret::Bytes(0)
        }
    };
    let bytes = Ret::Bytes(0);
    redirect(match nr {
        READ | PREAD64 | GETDENTS64 => call.clamp(2).output(1, Len::Arg(2)).ret(bytes),
        WRITE | PWRITE64 => call.clamp(2).input(1, Len::Arg(2)).ret(bytes),
        READV | PREADV => iov(call, true).ret(bytes),
        WRITEV | PWRITEV => iov(call, false).ret(bytes),
        LSEEK => call.ret(Ret::Range(0, i64::MAX)),
        FADVISE64 | SHUTDOWN => call,
        FSTAT => call.output(1, Len::Const(STAT_SIZE)),
        FSTATFS => call.output(1, Len::Const(STATFS_SIZE)),
        CLOSE => call.then(Then::Close { placeholder }),
        FINIT_MODULE => match s {
            Str::Ok(_) => call.string(1),
            Str::TooLong => return fail(libc::E2BIG),
            _ => return fail(libc::EFAULT),
        },
        FCNTL => match a[1] as u32 as i32 {
            libc::F_GETFL => call.ret(Ret::Range(0, i32::MAX.into())),
            libc::F_GETFD => call.ret(Ret::Range(0, 1)),
            libc::F_SETFL => call,
            libc::F_SETFD => call.then(Then::AlsoLocal),
            libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => return dup(call),
            // Advisory locks on GVM files are not taken (glibc's utmp reader takes one):
            // each redirected call runs while no GVM process is in its kernel, so one read
            // is atomic with the GVM's writes anyway, and a lock left by a program that
            // dies would block the GVM's own writers.
            libc::F_SETLK | libc::F_SETLKW | libc::F_OFD_SETLK | libc::F_OFD_SETLKW => {
                return Decision::Pretend
            }
            _ => return fail(libc::EINVAL),
        },
        DUP | DUP2 | DUP3 => return dup(call),
        // nsfs ioctls that return a new fd (`lsns` asks for a namespace's owner and
        // parent): the number would be the GVM's, not one the program could use. EPERM is
        // what an unprivileged caller gets, and `lsns` shows the column empty.
        IOCTL if matches!(a[1] as u32, NS_GET_USERNS | NS_GET_PARENT) => return fail(libc::EPERM),
        IOCTL => {
            // Sized ioctls say how much they move; the old socket ioctls take a struct ifreq.
            let cmd = a[1] as u32;
            let (dir, size) = (cmd >> 30, ((cmd >> 16) & 0x3fff) as usize);
            let (len, write) = if dir == 0 {
                (IFREQ_SIZE, true)
            } else {
                (size, dir & 2 != 0)
            };
            let mut c = call
                .buf(2, Len::Const(len), write, Shape::Flat)
                .ret(Ret::Range(0, i32::MAX.into()));
            c.strict = false;
            c
        }
        SENDTO => call.input(1, Len::Arg(2)).input(4, Len::Arg(5)).ret(bytes),
        RECVFROM => socklen_out(call.clamp(2).output(1, Len::Arg(2)), 4, 5).ret(received(a[3])),
        SENDMSG => call.buf(1, Len::Const(0), false, Shape::Msg).ret(bytes),
        RECVMSG => call
            .buf(1, Len::Const(0), true, Shape::Msg)
            .ret(received(a[2])),
        BIND | CONNECT => call.input(1, Len::Arg(2)),
        GETSOCKNAME | GETPEERNAME => socklen_out(call, 1, 2),
        SETSOCKOPT => call.input(3, Len::Arg(4)),
        GETSOCKOPT => socklen_out(call, 3, 4),
        _ => return Decision::Local,
    })
}

/// Name of a system call the policy may redirect, for the shim's notices.
pub fn syscall_name(nr: u64) -> Option<&'static str> {
    use nr::*;
    Some(match nr {
        READ => "read",
        WRITE => "write",
        OPEN => "open",
        CLOSE => "close",
        STAT => "stat",
        FSTAT => "fstat",
        LSTAT => "lstat",
        LSEEK => "lseek",
        IOCTL => "ioctl",
        PREAD64 => "pread64",
        PWRITE64 => "pwrite64",
        READV => "readv",
        WRITEV => "writev",
        ACCESS => "access",
        DUP => "dup",
        DUP2 => "dup2",
        DUP3 => "dup3",
        SOCKET => "socket",
        CONNECT => "connect",
        SENDTO => "sendto",
        RECVFROM => "recvfrom",
        SENDMSG => "sendmsg",
        RECVMSG => "recvmsg",
        SHUTDOWN => "shutdown",
        BIND => "bind",
        GETSOCKNAME => "getsockname",
        GETPEERNAME => "getpeername",
        SETSOCKOPT => "setsockopt",
        GETSOCKOPT => "getsockopt",
        KILL => "kill",
        UNAME => "uname",
        FCNTL => "fcntl",
        READLINK => "readlink",
        SYSINFO => "sysinfo",
        FSTATFS => "fstatfs",
        GETPRIORITY => "getpriority",
        SETPRIORITY => "setpriority",
        SETHOSTNAME => "sethostname",
        SETDOMAINNAME => "setdomainname",
        INIT_MODULE => "init_module",
        DELETE_MODULE => "delete_module",
        GETDENTS64 => "getdents64",
        FADVISE64 => "fadvise64",
        OPENAT => "openat",
        NEWFSTATAT => "newfstatat",
        READLINKAT => "readlinkat",
        FACCESSAT => "faccessat",
        PREADV => "preadv",
        PWRITEV => "pwritev",
        FINIT_MODULE => "finit_module",
        STATX => "statx",
        OPENAT2 => "openat2",
        FACCESSAT2 => "faccessat2",
        STATFS => "statfs",
        SYSLOG => "syslog",
        GETPGID => "getpgid",
        GETSID => "getsid",
        SCHED_SETPARAM => "sched_setparam",
        SCHED_GETPARAM => "sched_getparam",
        SCHED_SETSCHEDULER => "sched_setscheduler",
        SCHED_GETSCHEDULER => "sched_getscheduler",
        SCHED_RR_GET_INTERVAL => "sched_rr_get_interval",
        SCHED_SETAFFINITY => "sched_setaffinity",
        SCHED_GETAFFINITY => "sched_getaffinity",
        SCHED_SETATTR => "sched_setattr",
        SCHED_GETATTR => "sched_getattr",
        IOPRIO_SET => "ioprio_set",
        IOPRIO_GET => "ioprio_get",
        PRLIMIT64 => "prlimit64",
        MOUNT => "mount",
        UMOUNT2 => "umount2",
        SWAPON => "swapon",
        SWAPOFF => "swapoff",
        PIVOT_ROOT => "pivot_root",
        REBOOT => "reboot",
        PIDFD_OPEN => "pidfd_open",
        SHMGET => "shmget",
        SHMCTL => "shmctl",
        SEMGET => "semget",
        SEMCTL => "semctl",
        MSGGET => "msgget",
        MSGCTL => "msgctl",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::nr::*;
    use super::*;

    #[test]
    fn self_links_of_proc_point_at_the_gvms_init() {
        let rewrite = |p: &str| {
            let mut buf = [0u8; PATH_MAX];
            buf[..p.len()].copy_from_slice(p.as_bytes());
            let changed = rewrite_for_gvm(&mut buf);
            let end = buf.iter().position(|&b| b == 0).unwrap();
            (changed, String::from_utf8(buf[..end].to_vec()).unwrap())
        };
        assert_eq!(rewrite("/proc/net/tcp"), (true, "/proc/1/net/tcp".into()));
        assert_eq!(rewrite("/proc/net"), (true, "/proc/1/net".into()));
        assert_eq!(rewrite("/proc/mounts"), (true, "/proc/1/mounts".into()));
        assert_eq!(rewrite("/proc/netstat"), (false, "/proc/netstat".into()));
        assert_eq!(rewrite("/proc/version"), (false, "/proc/version".into()));
        assert_eq!(
            rewrite("/proc/self/mountinfo"),
            (true, "/proc/1/mountinfo".into())
        );
        assert_eq!(
            rewrite("/proc/thread-self/mounts"),
            (true, "/proc/1/mounts".into())
        );
        assert_eq!(
            rewrite("/proc/self/mountstats"),
            (true, "/proc/1/mountstats".into())
        );
        for same in [
            "/proc/self/maps",
            "/proc/self/mountinfo/",
            "/proc/./self/mounts",
        ] {
            assert_eq!(rewrite(same), (false, same.into()));
        }
        assert_eq!(rewrite("/etc/mtab"), (true, "/proc/1/mounts".into()));
        assert_eq!(rewrite("/etc//mtab"), (false, "/etc//mtab".into()));
        let mut unterminated = [b'x'; PATH_MAX];
        unterminated[..20].copy_from_slice(b"/proc/self/mountinfo");
        assert!(!rewrite_for_gvm(&mut unterminated), "no NUL: left alone");
        let mut full = [b'x'; PATH_MAX];
        full[..9].copy_from_slice(b"/proc/net");
        full[9] = b'/';
        full[PATH_MAX - 1] = 0;
        assert!(!rewrite_for_gvm(&mut full), "no room: left alone");
    }

    #[test]
    fn sock_diag_sockets_are_refused_so_ss_reads_proc_net() {
        let fds = FdTable::new();
        let d = decide(
            nr::SOCKET,
            [
                libc::AF_NETLINK as u64,
                libc::SOCK_RAW as u64,
                NETLINK_SOCK_DIAG,
                0,
                0,
                0,
            ],
            &fds,
            1,
            Str::None,
        );
        assert_eq!(d, Decision::Fail(-i64::from(libc::EPROTONOSUPPORT)));
    }

    const ME: i32 = 4242;
    const AT_FDCWD: u64 = libc::AT_FDCWD as i64 as u64;

    fn d(nr: u64, a: [u64; 6], fds: &FdTable, s: Str) -> Decision {
        decide(nr, a, fds, ME, s)
    }

    fn redirected(dec: Decision) -> Redirect {
        match dec {
            Decision::Redirect(r) => r,
            other => panic!("expected a redirect, got {other:?}"),
        }
    }

    #[test]
    fn paths_under_proc_and_sys_are_the_gvms() {
        for p in [
            "/proc",
            "/proc/",
            "/sys",
            "/sys/class/net",
            "/proc/1/stat",
            "//proc//version",
            "/./proc/./meminfo",
            "/proc/self/../1/status",
            "/etc/../proc/cpuinfo",
            "/proc/sys/kernel/hostname",
            "/proc/selfish",
            "/proc/4242/status",
            "/../../sys/kernel",
            "/sys/self",
            "/dev/kmsg",
            "//dev/./kmsg",
            "/proc/self/mountinfo",
            "/proc/self/mounts",
            "/proc/thread-self/mountstats",
            "/proc/self/fd/../mountinfo",
            "/etc/passwd",
            "/etc/group",
            "/etc/mtab",
            "/run/utmp",
            "/var/run/utmp",
            "/var//run/./utmp",
            "/var/log/wtmp",
            "/var/log/btmp",
            "/var/log/lastlog",
            "/etc/hosts",
            "/etc/hostid",
            "/run/netns",
            "/run/netns/blue",
            "/run/udev/data/b254:0",
        ] {
            assert_eq!(classify_path(p.as_bytes()), Place::Gvm, "{p}");
        }
    }

    #[test]
    fn the_programs_own_pid_directory_is_the_svms() {
        for p in [
            "/proc/4000123",
            "/proc/4000123/stat",
            "/proc//4000123/status",
        ] {
            assert_eq!(
                classify_path_for(p.as_bytes(), Some(4000123)),
                Place::Svm,
                "{p}"
            );
            assert_eq!(classify_path(p.as_bytes()), Place::Gvm, "{p}");
        }
        for p in [
            "/proc/40001230",
            "/proc/400012",
            "/proc/04000123",
            "/proc/1/stat",
        ] {
            assert_eq!(
                classify_path_for(p.as_bytes(), Some(4000123)),
                Place::Gvm,
                "{p}"
            );
        }
        assert!(is_decimal(b"0", 0) && !is_decimal(b"", 0) && !is_decimal(b"-1", -1));
    }

    #[test]
    fn other_paths_and_proc_self_are_the_svms() {
        for p in [
            "/",
            "",
            "proc/version",
            "./proc",
            "/procfs",
            "/system",
            "/etc/os-release",
            "/proc/self",
            "/proc/self/",
            "/proc/self/maps",
            "/proc/thread-self/status",
            "//proc/./self/fd/3",
            "/proc/1/../self/exe",
            "/proc/..",
            "/sys/..",
            "/proc/../etc",
            "/proc/1/../../etc/shadow",
            "/dev/null",
            "/dev/kmsg/x",
            "/dev/kmsgs",
            "/proc/self/mountinfo/x",
            "/proc/self/mountinfos",
            "/proc/self/fd/mountinfo",
            "/etc/shadow",
            "/etc/passwd-",
            "/etc/passwd/x",
            "/etc/hosts.allow",
            "/run/utmpx",
            "/run/netnsx",
            "/run/systemd/netns",
            "/var/log/syslog",
            "/var/run/wtmp",
            "/usr/var/log/wtmp",
            "/sysfs/x",
            "/usr/proc/1",
        ] {
            assert_eq!(classify_path(p.as_bytes()), Place::Svm, "{p}");
        }
    }

    #[test]
    fn deep_paths_are_bounded_and_climb_back_correctly() {
        let mut deep = b"/proc".to_vec();
        for _ in 0..2000 {
            deep.extend_from_slice(b"/a");
        }
        assert_eq!(classify_path(&deep), Place::Gvm);
        for _ in 0..2001 {
            deep.extend_from_slice(b"/..");
        }
        deep.extend_from_slice(b"/etc");
        assert_eq!(classify_path(&deep), Place::Svm);
    }

    #[test]
    fn fd_table_maps_takes_and_refuses_out_of_range() {
        let t = FdTable::new();
        assert_eq!(t.remote(3), None);
        assert!(t.insert(3, 7));
        assert_eq!(t.remote(3), Some(7));
        // Only the low 32 bits of the register name the fd.
        assert_eq!(t.remote(0xffff_ffff_0000_0003), Some(7));
        assert!(t.insert(0, 0));
        assert_eq!(t.remote(0), Some(0));
        assert!(t.insert(FD_TABLE_SIZE as i32 - 1, 1));
        assert!(!t.insert(FD_TABLE_SIZE as i32, 1));
        assert!(!t.insert(-1, 1));
        assert!(!t.insert(5, -1));
        assert_eq!(t.remote(FD_TABLE_SIZE as u64), None);
        assert_eq!(t.remote(AT_FDCWD), None);
        assert!(t.any_in(2, 3) && t.any_in(0, u32::MAX) && !t.any_in(4, 100));
        assert_eq!(t.take(3), Some(7));
        assert_eq!(t.take(3), None);
        assert_eq!(t.remote(3), None);
        assert_eq!(t.take(-5), None);
        assert_eq!(t.take(i32::MAX), None);
    }

    #[test]
    fn fds_env_round_trips() {
        let mut buf = [0u8; 64];
        let pairs = [(0, 5), (3, 12), (4095, 2_000_000_000)];
        let n = format_fds_env(pairs.into_iter(), &mut buf);
        assert_eq!(&buf[..n], b"0:5,3:12,4095:2000000000");
        let mut got = vec![];
        parse_fds_env(&buf[..n], |p, r| got.push((p, r)));
        assert_eq!(got, pairs);
        // Too small: whole pairs only.
        let n = format_fds_env(pairs.into_iter(), &mut buf[..10]);
        assert_eq!(&buf[..n], b"0:5,3:12");
        assert_eq!(format_fds_env([].into_iter(), &mut buf), 0);
        let mut got = vec![];
        parse_fds_env(
            b"1:2,x:3,4:,:5,6:7:8,9999999999:1,12345678901:1,-1:2,,10:11",
            |p, r| got.push((p, r)),
        );
        assert_eq!(got, [(1, 2), (10, 11)]);
    }

    #[test]
    fn exec_passes_placeholders_on() {
        let t = FdTable::new();
        assert_eq!(
            d(EXECVE, [1, 2, 3, 0, 0, 0], &t, Str::None),
            Decision::Exec { envp: 2 }
        );
        assert_eq!(
            d(EXECVEAT, [1, 2, 3, 4, 0, 0], &t, Str::None),
            Decision::Exec { envp: 3 }
        );
    }

    #[test]
    fn sigsets_never_block_sigsys() {
        assert_eq!(SIGSYS_BIT, 1 << 30);
        assert_eq!(sanitize_sigset(u64::MAX), !(1 << 30));
        assert_eq!(sanitize_sigset(0b101), 0b101);
        let sig = |n: i32| 1u64 << (n - 1);
        let (block, unblock, set) = (
            libc::SIG_BLOCK as u64,
            libc::SIG_UNBLOCK as u64,
            libc::SIG_SETMASK as u64,
        );
        assert_eq!(sigprocmask(block, sig(2), u64::MAX), Ok(!UNBLOCKABLE));
        assert_eq!(sigprocmask(block, sig(2), sig(10)), Ok(sig(2) | sig(10)));
        assert_eq!(sigprocmask(unblock, sig(2) | sig(10), sig(2)), Ok(sig(10)));
        assert_eq!(sigprocmask(set, sig(2), sig(31) | sig(15)), Ok(sig(15)));
        assert_eq!(sigprocmask(3, 0, 0), Err(libc::EINVAL));
    }

    #[test]
    fn signal_calls_are_guarded() {
        let t = FdTable::new();
        let none = [0; 6];
        assert_eq!(
            d(RT_SIGPROCMASK, none, &t, Str::None),
            Decision::SigProcMask
        );
        assert_eq!(d(RT_SIGACTION, none, &t, Str::None), Decision::SigAction);
        assert_eq!(d(RT_SIGRETURN, none, &t, Str::None), Decision::SigReturn);
        assert_eq!(
            d(RT_SIGSUSPEND, [8, 8, 0, 0, 0, 0], &t, Str::None),
            Decision::MaskArg {
                idx: 0,
                indirect: false
            }
        );
        assert_eq!(d(PPOLL, [1, 1, 0, 0, 8, 0], &t, Str::None), Decision::Local);
        assert_eq!(
            d(PPOLL, [1, 1, 0, 9, 8, 0], &t, Str::None),
            Decision::MaskArg {
                idx: 3,
                indirect: false
            }
        );
        assert_eq!(
            d(PSELECT6, [1, 0, 0, 0, 0, 9], &t, Str::None),
            Decision::MaskArg {
                idx: 5,
                indirect: true
            }
        );
        assert_eq!(
            d(EPOLL_PWAIT, [1, 2, 3, 4, 5, 8], &t, Str::None),
            Decision::MaskArg {
                idx: 4,
                indirect: false
            }
        );
    }

    #[test]
    fn process_creation_is_rewritten_to_be_safe() {
        let t = FdTable::new();
        assert_eq!(
            d(FORK, [0; 6], &t, Str::None),
            Decision::Fork {
                nr: FORK,
                args: [0; 6]
            }
        );
        assert_eq!(
            d(VFORK, [0; 6], &t, Str::None),
            Decision::Fork {
                nr: FORK,
                args: [0; 6]
            }
        );
        assert_eq!(
            d(CLONE3, [0; 6], &t, Str::None),
            Decision::Fail(-(libc::ENOSYS as i64))
        );
        // Threads and posix_spawn children get a stack of their own.
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(
            d(CLONE, [thread, 0x7000, 0, 0, 0, 0], &t, Str::None),
            Decision::CloneNewStack
        );
        // glibc's fork(): clone(SIGCHLD | CLONE_CHILD_*, 0, ...).
        let fork = 17 | (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
        let a = [fork, 0, 0, 0x1000, 0, 0];
        assert_eq!(
            d(CLONE, a, &t, Str::None),
            Decision::Fork { nr: CLONE, args: a }
        );
        let vfork = (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | 17;
        assert_eq!(
            d(CLONE, [vfork, 0, 0, 0, 0, 0], &t, Str::None),
            Decision::Fork {
                nr: CLONE,
                args: [17, 0, 0, 0, 0, 0]
            }
        );
        assert_eq!(
            d(CLONE, [libc::CLONE_VM as u64, 0, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
    }

    #[test]
    fn kernel_state_calls_go_to_the_gvm() {
        let t = FdTable::new();
        for nr in [UNAME, SYSINFO, SETHOSTNAME, SETDOMAINNAME] {
            assert!(matches!(
                d(nr, [0x1000, 5, 0, 0, 0, 0], &t, Str::None),
                Decision::Redirect(_)
            ));
        }
        let u = redirected(d(UNAME, [0x1000, 0, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(
            u.bufs[0],
            Some(Buf {
                arg: 0,
                len: Len::Const(390),
                write: true,
                shape: Shape::Flat
            })
        );
        let h = redirected(d(SETHOSTNAME, [0x1000, 5, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(
            h.bufs[0].map(|b| (b.len, b.write)),
            Some((Len::Arg(1), false))
        );
        for nr in [
            GETPID,
            libc::SYS_tgkill as u64,
            libc::SYS_tkill as u64,
            libc::SYS_getuid as u64,
            MMAP,
        ] {
            assert_eq!(
                d(nr, [1, 2, 3, 4, 5, 6], &t, Str::None),
                Decision::Local,
                "{nr}"
            );
        }
    }

    #[test]
    fn kill_and_priority_spare_the_program_itself() {
        let t = FdTable::new();
        let kill = |pid: i32| d(KILL, [pid as i64 as u64, 9, 0, 0, 0, 0], &t, Str::None);
        assert_eq!(kill(ME), Decision::Local);
        assert_eq!(kill(0), Decision::Local);
        assert!(matches!(kill(1), Decision::Redirect(_)));
        assert!(matches!(kill(-1), Decision::Redirect(_)));
        assert!(matches!(kill(-77), Decision::Redirect(_)));
        let prio = |nr: u64, which: i32, who: i32| {
            d(nr, [which as u64, who as u64, 5, 0, 0, 0], &t, Str::None)
        };
        for nr in [SETPRIORITY, GETPRIORITY] {
            assert_eq!(prio(nr, libc::PRIO_PROCESS as i32, 0), Decision::Local);
            assert_eq!(prio(nr, libc::PRIO_PROCESS as i32, ME), Decision::Local);
            assert_eq!(prio(nr, libc::PRIO_PGRP as i32, 0), Decision::Local);
            assert!(matches!(
                prio(nr, libc::PRIO_PROCESS as i32, 1),
                Decision::Redirect(_)
            ));
            assert!(matches!(
                prio(nr, libc::PRIO_PGRP as i32, ME),
                Decision::Redirect(_)
            ));
        }
    }

    #[test]
    fn other_processes_scheduling_affinity_limits_and_sessions_are_the_gvms() {
        let t = FdTable::new();
        let per_pid = [
            PRLIMIT64,
            SCHED_SETAFFINITY,
            SCHED_GETAFFINITY,
            SCHED_SETSCHEDULER,
            SCHED_GETSCHEDULER,
            SCHED_SETPARAM,
            SCHED_GETPARAM,
            SCHED_RR_GET_INTERVAL,
            SCHED_SETATTR,
            SCHED_GETATTR,
            GETPGID,
            GETSID,
        ];
        for nr in per_pid {
            let call = |pid: i32| {
                d(
                    nr,
                    [pid as i64 as u64, 0x1000, 0x2000, 0x3000, 0, 0],
                    &t,
                    Str::None,
                )
            };
            assert_eq!(call(0), Decision::Local, "{nr}: the caller");
            assert_eq!(call(ME), Decision::Local, "{nr}: the program itself");
            assert!(matches!(call(1), Decision::Redirect(_)), "{nr}");
            assert!(
                matches!(call(-5), Decision::Redirect(_)),
                "{nr}: the GVM refuses it"
            );
        }
        let buf = |r: &Redirect, k: usize| r.bufs[k].map(|b| (b.arg, b.len, b.write));
        let prlimit = redirected(d(PRLIMIT64, [7, 7, 0, 0x2000, 0, 0], &t, Str::None));
        assert_eq!(buf(&prlimit, 0), Some((2, Len::Const(16), false)));
        assert_eq!(buf(&prlimit, 1), Some((3, Len::Const(16), true)));
        assert_eq!(prlimit.ret, Ret::Zero);
        // taskset -p: the mask's bytes, no more than the program's buffer.
        let aff = redirected(d(
            SCHED_GETAFFINITY,
            [7, 128, 0x2000, 0, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(buf(&aff, 0), Some((2, Len::ArgInt(1), true)));
        assert_eq!(
            aff.accept(&[Some(128), None, None]),
            Accept { lo: 0, hi: 128 }
        );
        let huge = redirected(d(
            SCHED_GETAFFINITY,
            [7, 1 << 40 | 64, 0x2000, 0, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(huge.args[1], 64, "the kernel reads an unsigned int");
        let big = redirected(d(
            SCHED_GETAFFINITY,
            [7, 1 << 30, 0x2000, 0, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(
            big.args[1], MAX_TOUCH as u64,
            "shortened to what the shim faults in"
        );
        // chrt -p: a policy, with SCHED_RESET_ON_FORK at most.
        let policy = redirected(d(SCHED_GETSCHEDULER, [7, 0, 0, 0, 0, 0], &t, Str::None));
        let accept = policy.accept(&[None; 3]);
        assert!(accept.check(0x4000_0001).is_ok() && accept.check(0x4000_0008).is_err());
        let attr = redirected(d(SCHED_GETATTR, [7, 0x2000, 56, 0, 0, 0], &t, Str::None));
        assert_eq!(buf(&attr, 0), Some((1, Len::ArgInt(2), true)));
        let session = redirected(d(GETSID, [7, 0, 0, 0, 0, 0], &t, Str::None));
        assert!(session.accept(&[None; 3]).check(1 << 22).is_ok());
        assert!(session.accept(&[None; 3]).check((1 << 22) + 1).is_err());
        // ionice -p: ioprio_{get,set}(which, who) spare the program as setpriority does.
        let io =
            |nr: u64, which: u64, who: i32| d(nr, [which, who as u64, 0, 0, 0, 0], &t, Str::None);
        for nr in [IOPRIO_GET, IOPRIO_SET] {
            assert_eq!(io(nr, IOPRIO_WHO_PROCESS, 0), Decision::Local);
            assert_eq!(io(nr, IOPRIO_WHO_PROCESS, ME), Decision::Local);
            assert_eq!(io(nr, 2, 0), Decision::Local, "the program's own group");
            assert!(matches!(
                io(nr, IOPRIO_WHO_PROCESS, 1),
                Decision::Redirect(_)
            ));
            assert!(matches!(io(nr, 2, ME), Decision::Redirect(_)), "a group");
        }
        let prio = redirected(io(IOPRIO_GET, IOPRIO_WHO_PROCESS, 1));
        assert!(prio.accept(&[None; 3]).check(0x1_0000).is_err());
    }

    #[test]
    fn the_kernel_log_is_the_gvms() {
        let t = FdTable::new();
        let log = |action: i32, len: i64| {
            redirected(d(
                SYSLOG,
                [action as u64, 0x2000, len as u64, 0, 0, 0],
                &t,
                Str::None,
            ))
        };
        for read in 2..=4 {
            let r = log(read, 4096);
            assert_eq!(
                r.bufs[0].map(|b| (b.arg, b.len, b.write)),
                Some((1, Len::ArgInt(2), true))
            );
            assert_eq!(
                r.accept(&[Some(4096), None, None]),
                Accept { lo: 0, hi: 4096 }
            );
        }
        assert_eq!(log(3, 1 << 24).args[2], MAX_TOUCH as u64, "shortened");
        assert_eq!(
            log(3, -1).args[2],
            u64::MAX,
            "left for the kernel to refuse"
        );
        assert_eq!(
            log(3, -1).bufs[0].and_then(|b| b.len.of(&[0, 0, u64::MAX, 0, 0, 0])),
            Some(0)
        );
        for size in [9, 10] {
            assert_eq!(log(size, 0).ret, Ret::Range(0, i32::MAX.into()));
        }
        for other in [0, 1, 5, 6, 7, 8, 11, 99] {
            let r = log(other, 0);
            assert_eq!((r.ret, r.bufs), (Ret::Zero, [None; 3]), "{other}");
        }
        // dmesg opens /dev/kmsg.
        let open = d(
            OPENAT,
            [AT_FDCWD, 0x1000, 0, 0, 0, 0],
            &t,
            Str::Ok(b"/dev/kmsg"),
        );
        assert!(matches!(open, Decision::Redirect(_)));
    }

    #[test]
    fn every_absolute_statfs_is_the_gvms() {
        let t = FdTable::new();
        for p in ["/", "/etc", "/proc", "/home/../run"] {
            let r = redirected(d(
                STATFS,
                [0x1000, 0x2000, 0, 0, 0, 0],
                &t,
                Str::Ok(p.as_bytes()),
            ));
            assert_eq!(r.string_arg, Some(0), "{p}");
            assert_eq!(
                r.bufs[0].map(|b| (b.arg, b.len, b.write)),
                Some((1, Len::Const(STATFS_SIZE), true)),
                "{p}"
            );
            assert_eq!(r.ret, Ret::Zero);
        }
        for relative in [".", "proc", ""] {
            assert_eq!(
                d(
                    STATFS,
                    [0x1000, 0x2000, 0, 0, 0, 0],
                    &t,
                    Str::Ok(relative.as_bytes())
                ),
                Decision::Local,
                "{relative}"
            );
        }
        assert_eq!(string_arg(STATFS), Some(0));
    }

    #[test]
    fn calls_that_would_change_the_svm_instead_are_refused_with_a_reason() {
        let t = FdTable::new();
        for nr in [
            MOUNT, UMOUNT2, SWAPON, SWAPOFF, PIVOT_ROOT, REBOOT, SHMGET, SHMCTL, SEMGET, SEMCTL,
            MSGGET, MSGCTL,
        ] {
            assert_eq!(
                d(nr, [0x1000, 0x2000, 0x3000, 0, 0, 0], &t, Str::None),
                Decision::Refuse(-i64::from(libc::ENOSYS)),
                "{nr}"
            );
            assert!(syscall_name(nr).is_some(), "{nr}: the notice names it");
        }
        let pidfd = |pid: i32| d(PIDFD_OPEN, [pid as u64, 0, 0, 0, 0, 0], &t, Str::None);
        assert_eq!(pidfd(1), Decision::Refuse(-i64::from(libc::ENOSYS)));
        assert_eq!(pidfd(ME), Decision::Local);
    }

    #[test]
    fn modules() {
        let t = FdTable::new();
        let r = redirected(d(
            INIT_MODULE,
            [0x1000, 1 << 22, 0x2000, 0, 0, 0],
            &t,
            Str::Ok(b""),
        ));
        assert_eq!((r.string_arg, r.touch_limit), (Some(2), MAX_MODULE_TOUCH));
        assert_eq!(r.bufs[0].map(|b| (b.arg, b.len)), Some((0, Len::Arg(1))));
        assert_eq!(d(INIT_MODULE, [0; 6], &t, Str::Fault), Decision::Fail(-14));
        let r = redirected(d(
            DELETE_MODULE,
            [0x1000, 0, 0, 0, 0, 0],
            &t,
            Str::Ok(b"dummy"),
        ));
        assert_eq!(r.string_arg, Some(0));
        // finit_module of a local file: ENOSYS makes kmod fall back to init_module.
        assert_eq!(
            d(FINIT_MODULE, [3, 0x1000, 0, 0, 0, 0], &t, Str::Ok(b"")),
            Decision::Fail(-38)
        );
        t.insert(3, 11);
        let r = redirected(d(FINIT_MODULE, [3, 0x1000, 0, 0, 0, 0], &t, Str::Ok(b"")));
        assert_eq!((r.args[0], r.string_arg), (11, Some(1)));
    }

    #[test]
    fn path_calls_follow_the_path_and_the_dirfd() {
        let t = FdTable::new();
        let open = |path: &str| {
            d(
                OPEN,
                [0x1000, libc::O_CLOEXEC as u64, 0, 0, 0, 0],
                &t,
                Str::Ok(path.as_bytes()),
            )
        };
        let r = redirected(open("/proc/version"));
        assert_eq!(
            (r.string_arg, r.then),
            (Some(0), Then::NewFd { cloexec: true })
        );
        assert_eq!(open("/etc/os-release"), Decision::Local);
        assert_eq!(open("/proc/self/maps"), Decision::Local);
        assert_eq!(open("version"), Decision::Local);
        assert_eq!(d(OPEN, [0; 6], &t, Str::Fault), Decision::Local);
        assert_eq!(d(OPEN, [0; 6], &t, Str::TooLong), Decision::Local);

        let r = redirected(d(
            OPENAT,
            [AT_FDCWD, 0x1000, 0, 0, 0, 0],
            &t,
            Str::Ok(b"/sys/class"),
        ));
        assert_eq!(
            (r.args[0], r.then),
            (AT_FDCWD, Then::NewFd { cloexec: false })
        );
        assert_eq!(
            d(OPENAT, [AT_FDCWD, 0x1000, 0, 0, 0, 0], &t, Str::Ok(b"stat")),
            Decision::Local
        );
        assert_eq!(
            d(OPENAT, [5, 0x1000, 0, 0, 0, 0], &t, Str::Ok(b"stat")),
            Decision::Local
        );
        t.insert(5, 9);
        let r = redirected(d(OPENAT, [5, 0x1000, 0, 0, 0, 0], &t, Str::Ok(b"1/stat")));
        assert_eq!(r.args[0], 9);
        // An absolute local path ignores a redirected dirfd.
        assert_eq!(
            d(
                OPENAT,
                [5, 0x1000, 0, 0, 0, 0],
                &t,
                Str::Ok(b"/etc/os-release")
            ),
            Decision::Local
        );

        // fstat through newfstatat(fd, "", AT_EMPTY_PATH) and statx.
        let flags = libc::AT_EMPTY_PATH as u64;
        let r = redirected(d(
            NEWFSTATAT,
            [5, 0x1000, 0x2000, flags, 0, 0],
            &t,
            Str::Ok(b""),
        ));
        assert_eq!(r.args[0], 9);
        assert_eq!(
            r.bufs[0],
            Some(Buf {
                arg: 2,
                len: Len::Const(144),
                write: true,
                shape: Shape::Flat
            })
        );
        let r = redirected(d(
            STATX,
            [5, 0x1000, flags, 0xfff, 0x2000, 0],
            &t,
            Str::Ok(b""),
        ));
        assert_eq!(
            r.bufs[0].map(|b| (b.arg, b.len)),
            Some((4, Len::Const(256)))
        );
        assert_eq!(
            d(
                STATX,
                [4, 0x1000, flags, 0xfff, 0x2000, 0],
                &t,
                Str::Ok(b"")
            ),
            Decision::Local
        );

        let r = redirected(d(
            READLINKAT,
            [AT_FDCWD, 1, 0x2000, 100, 0, 0],
            &t,
            Str::Ok(b"/proc/1/exe"),
        ));
        assert_eq!(
            r.bufs[0].map(|b| (b.arg, b.len, b.write)),
            Some((2, Len::ArgInt(3), true))
        );
        for nr in [STAT, LSTAT, ACCESS, READLINK] {
            assert!(matches!(
                d(nr, [1, 2, 3, 0, 0, 0], &t, Str::Ok(b"/sys")),
                Decision::Redirect(_)
            ));
            assert_eq!(
                d(nr, [1, 2, 3, 0, 0, 0], &t, Str::Ok(b"/tmp")),
                Decision::Local
            );
        }
        for nr in [FACCESSAT, FACCESSAT2, OPENAT2] {
            assert!(matches!(
                d(nr, [AT_FDCWD, 2, 3, 8, 0, 0], &t, Str::Ok(b"/proc/1")),
                Decision::Redirect(_)
            ));
        }
    }

    #[test]
    fn netlink_sockets_only() {
        let t = FdTable::new();
        let ty = (libc::SOCK_RAW | libc::SOCK_CLOEXEC) as u64;
        let r = redirected(d(
            SOCKET,
            [libc::AF_NETLINK as u64, ty, 0, 0, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(r.then, Then::NewFd { cloexec: true });
        assert_eq!(
            d(SOCKET, [libc::AF_INET as u64, 2, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
        assert_eq!(
            d(SOCKET, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
    }

    #[test]
    fn calls_on_placeholders_are_translated() {
        let t = FdTable::new();
        t.insert(3, 40);
        let r = redirected(d(READ, [3, 0x1000, 1 << 30, 0, 0, 0], &t, Str::None));
        assert_eq!(r.args, [40, 0x1000, MAX_TOUCH as u64, 0, 0, 0]);
        assert_eq!(
            r.bufs[0],
            Some(Buf {
                arg: 1,
                len: Len::Arg(2),
                write: true,
                shape: Shape::Flat
            })
        );
        assert_eq!(
            d(READ, [4, 0x1000, 10, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
        let r = redirected(d(WRITE, [3, 0x1000, 10, 0, 0, 0], &t, Str::None));
        assert_eq!(r.bufs[0].map(|b| b.write), Some(false));
        let r = redirected(d(READV, [3, 0x1000, 2, 0, 0, 0], &t, Str::None));
        assert_eq!(
            r.bufs[0].map(|b| (b.shape, b.len, b.write)),
            Some((Shape::Iov, Len::Arg(2), true))
        );
        let r = redirected(d(RECVMSG, [3, 0x1000, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(
            r.bufs[0].map(|b| (b.shape, b.write)),
            Some((Shape::Msg, true))
        );
        let r = redirected(d(RECVFROM, [3, 1, 2, 0, 5, 6], &t, Str::None));
        assert_eq!(r.bufs.iter().flatten().count(), 3);
        assert_eq!(r.bufs[1].map(|b| (b.arg, b.len)), Some((4, Len::ArgPtr(5))));
        let r = redirected(d(GETSOCKOPT, [3, 1, 2, 0x1000, 0x2000, 0], &t, Str::None));
        assert_eq!(r.bufs[0].map(|b| (b.arg, b.len)), Some((3, Len::ArgPtr(4))));
        let r = redirected(d(IOCTL, [3, 0x8912, 0x1000, 0, 0, 0], &t, Str::None));
        assert!(!r.strict);
        assert_eq!(r.bufs[0].map(|b| b.len), Some(Len::Const(IFREQ_SIZE)));
        // _IOR('T', 1, u32): the kernel writes 4 bytes.
        let r = redirected(d(IOCTL, [3, 0x8004_5401, 0x1000, 0, 0, 0], &t, Str::None));
        assert_eq!(
            r.bufs[0].map(|b| (b.len, b.write)),
            Some((Len::Const(4), true))
        );
        for nr in [
            LSEEK,
            FSTAT,
            GETDENTS64,
            SENDTO,
            SENDMSG,
            BIND,
            GETSOCKNAME,
            SETSOCKOPT,
            FADVISE64,
            PWRITE64,
            PREAD64,
            WRITEV,
        ] {
            assert_eq!(
                redirected(d(nr, [3, 1, 2, 3, 4, 5], &t, Str::None)).args[0],
                40,
                "{nr}"
            );
        }
        // mmap of a placeholder cannot work; anonymous mappings ignore the fd.
        assert_eq!(
            d(MMAP, [0, 4096, 1, 2, 3, 0], &t, Str::None),
            Decision::Fail(-(libc::ENODEV as i64))
        );
        let anon = (libc::MAP_ANONYMOUS | libc::MAP_PRIVATE) as u64;
        assert_eq!(
            d(MMAP, [0, 4096, 1, anon, 3, 0], &t, Str::None),
            Decision::Local
        );
        // Calls the policy does not know run on the placeholder.
        assert_eq!(
            d(libc::SYS_fsync as u64, [3, 0, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
    }

    #[test]
    fn ioctls_that_return_a_gvm_fd_are_refused() {
        let t = FdTable::new();
        t.insert(3, 40);
        for cmd in [NS_GET_USERNS, NS_GET_PARENT] {
            let call = d(IOCTL, [3, cmd.into(), 0, 0, 0, 0], &t, Str::None);
            assert_eq!(call, Decision::Fail(-i64::from(libc::EPERM)), "{cmd:#x}");
        }
        // NS_GET_NSTYPE returns a small number: redirected.
        assert!(matches!(
            d(IOCTL, [3, 0xb703, 0, 0, 0, 0], &t, Str::None),
            Decision::Redirect(_)
        ));
    }

    #[test]
    fn fcntl_on_placeholders() {
        let t = FdTable::new();
        t.insert(3, 40);
        let f = |cmd: i32| d(FCNTL, [3, cmd as u64, 1, 0, 0, 0], &t, Str::None);
        assert_eq!(redirected(f(libc::F_GETFL)).then, Then::Result);
        assert_eq!(redirected(f(libc::F_SETFD)).then, Then::AlsoLocal);
        let r = redirected(f(libc::F_DUPFD_CLOEXEC));
        assert_eq!((r.nr, r.args[0], r.then), (DUP, 40, Then::Dup));
        // Locks on GVM files are never taken in the GVM (glibc's utmp reader asks for one).
        for lock in [
            libc::F_SETLK,
            libc::F_SETLKW,
            libc::F_OFD_SETLK,
            libc::F_OFD_SETLKW,
        ] {
            assert_eq!(f(lock), Decision::Pretend, "{lock}");
        }
        assert_eq!(f(libc::F_GETLK), Decision::Fail(-(libc::EINVAL as i64)));
        assert_eq!(f(libc::F_SETOWN), Decision::Fail(-(libc::EINVAL as i64)));
        assert_eq!(
            d(FCNTL, [4, libc::F_SETLK as u64, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
    }

    #[test]
    fn close_and_dup() {
        let t = FdTable::new();
        t.insert(3, 40);
        t.insert(6, 41);
        assert_eq!(
            redirected(d(CLOSE, [3, 0, 0, 0, 0, 0], &t, Str::None)).then,
            Then::Close { placeholder: 3 }
        );
        assert_eq!(d(CLOSE, [4, 0, 0, 0, 0, 0], &t, Str::None), Decision::Local);
        let r = redirected(d(DUP, [3, 0, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(
            (r.nr, r.args, r.then),
            (DUP, [40, 0, 0, 0, 0, 0], Then::Dup)
        );
        let r = redirected(d(DUP2, [3, 10, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(
            (r.nr, r.args[0], r.args[1], r.then),
            (DUP, 40, 0, Then::Dup)
        );
        assert!(matches!(
            d(DUP3, [3, 6, 0, 0, 0, 0], &t, Str::None),
            Decision::Redirect(_)
        ));
        // Same fd: nothing to duplicate.
        assert_eq!(d(DUP2, [3, 3, 0, 0, 0, 0], &t, Str::None), Decision::Local);
        // Onto a number the table cannot hold.
        assert_eq!(
            d(DUP2, [3, 5000, 0, 0, 0, 0], &t, Str::None),
            Decision::Fail(-(libc::EMFILE as i64))
        );
        // A local fd onto a placeholder releases the placeholder.
        assert_eq!(
            d(DUP2, [1, 6, 0, 0, 0, 0], &t, Str::None),
            Decision::LocalThenRelease { first: 6, last: 6 }
        );
        assert_eq!(d(DUP3, [1, 7, 0, 0, 0, 0], &t, Str::None), Decision::Local);
        assert_eq!(
            d(CLOSE_RANGE, [4, u32::MAX as u64, 0, 0, 0, 0], &t, Str::None),
            Decision::LocalThenRelease {
                first: 4,
                last: u32::MAX
            }
        );
        assert_eq!(
            d(CLOSE_RANGE, [7, 100, 0, 0, 0, 0], &t, Str::None),
            Decision::Local
        );
        assert_eq!(
            d(
                CLOSE_RANGE,
                [0, 100, CLOSE_RANGE_CLOEXEC, 0, 0, 0],
                &t,
                Str::None
            ),
            Decision::Local
        );
    }

    /// Every call the policy redirects, with placeholder 3 (GVM fd 40): (nr, args, string).
    fn every_redirect() -> Vec<Redirect> {
        let t = FdTable::new();
        t.insert(3, 40);
        let mut all = Vec::new();
        for nr in 0..460u64 {
            for s in [
                Str::Ok(b"/proc/1".as_slice()),
                Str::Ok(b"1/stat"),
                Str::None,
            ] {
                let mut variants = vec![[3, 1, 2, 3, 4, 5]];
                if nr == SOCKET {
                    variants = vec![[libc::AF_NETLINK as u64, 0, 0, 0, 0, 0]];
                }
                if nr == FCNTL {
                    variants = [
                        libc::F_GETFL,
                        libc::F_SETFL,
                        libc::F_GETFD,
                        libc::F_SETFD,
                        libc::F_DUPFD,
                    ]
                    .map(|cmd| [3, cmd as u64, 0, 0, 0, 0])
                    .to_vec();
                }
                if nr == GETPRIORITY || nr == SETPRIORITY {
                    variants = vec![[libc::PRIO_PROCESS as u64, 1, 0, 0, 0, 0]];
                }
                for a in variants {
                    if let Decision::Redirect(r) = d(nr, a, &t, s) {
                        all.push(r);
                    }
                }
            }
        }
        all
    }

    #[test]
    fn every_redirected_call_has_a_contract_that_fits_its_buffers_and_its_then() {
        let all = every_redirect();
        assert!(all.len() > 60, "{}", all.len());
        for r in all {
            let name = syscall_name(r.nr).unwrap_or("?");
            match r.ret {
                Ret::Bytes(k) => {
                    let b = r.bufs[k].unwrap_or_else(|| panic!("{name}: no buffer {k}"));
                    assert!(b.arg < 6 && r.strict, "{name}");
                }
                Ret::Fd => assert!(matches!(r.then, Then::NewFd { .. } | Then::Dup), "{name}"),
                Ret::Range(lo, hi) => assert!(0 <= lo && lo <= hi, "{name}"),
                Ret::Zero => {}
            }
            let makes_fd = matches!(r.then, Then::NewFd { .. } | Then::Dup);
            assert_eq!(makes_fd, r.ret == Ret::Fd, "{name}");
        }
    }

    #[test]
    fn no_redirected_call_can_return_a_pointer_sized_value() {
        // Whatever the buffers' lengths, only lseek (an off_t) may exceed an int.
        let huge = [Some(u64::MAX); 3];
        for r in every_redirect() {
            let accept = r.accept(&huge);
            let name = syscall_name(r.nr).unwrap_or("?");
            if r.nr == LSEEK {
                assert_eq!(
                    accept,
                    Accept {
                        lo: 0,
                        hi: i64::MAX
                    }
                );
            } else {
                assert!(accept.hi <= i64::from(i32::MAX), "{name}: {accept:?}");
                assert!(accept.check(0x7fff_1234_5678).is_err(), "{name}");
            }
            for hostile in [i64::MIN, -MAX_ERRNO - 1, -0x7fff_0000_0000] {
                assert_eq!(accept.check(hostile), Err(hostile), "{name}");
            }
            assert_eq!(accept.check(-i64::from(libc::ENOENT)), Ok(-2), "{name}");
        }
        // The calls that return addresses are never redirected.
        let t = FdTable::new();
        t.insert(3, 40);
        for nr in [
            MMAP,
            libc::SYS_mremap as u64,
            libc::SYS_brk as u64,
            libc::SYS_shmat as u64,
        ] {
            assert!(
                !matches!(
                    d(nr, [0, 4096, 3, 0, 3, 0], &t, Str::None),
                    Decision::Redirect(_)
                ),
                "{nr}"
            );
        }
    }

    #[test]
    fn a_read_that_returns_more_than_asked_is_refused() {
        let t = FdTable::new();
        t.insert(3, 40);
        for nr in [READ, PREAD64, GETDENTS64, WRITE, PWRITE64] {
            let r = redirected(d(nr, [3, 0x1000, 100, 0, 0, 0], &t, Str::None));
            let sizes = r.bufs.map(|b| b.and_then(|b| b.len.of(&r.args)));
            let accept = r.accept(&sizes);
            assert_eq!(accept, Accept { lo: 0, hi: 100 }, "{nr}");
            assert_eq!(accept.check(100), Ok(100));
            assert_eq!(accept.check(0), Ok(0));
            assert_eq!(accept.check(101), Err(101), "{nr}: count + 1");
            assert_eq!(accept.check(-4096), Err(-4096), "{nr}: below -MAX_ERRNO");
            assert_eq!(accept.check(i64::MAX), Err(i64::MAX), "{nr}");
            assert_eq!(accept.check(-4095), Ok(-4095));
        }
        // A count beyond MAX_TOUCH was shortened, and so is what the call may return.
        let r = redirected(d(READ, [3, 0x1000, 1 << 40, 0, 0, 0], &t, Str::None));
        let sizes = r.bufs.map(|b| b.and_then(|b| b.len.of(&r.args)));
        let most = MAX_TOUCH as i64;
        assert_eq!(r.accept(&sizes).check(most + 1), Err(most + 1));
        // Unmeasured buffers accept nothing but 0.
        assert_eq!(r.accept(&[None; 3]).check(1), Err(1));
        // readlink's bufsiz is an int: a negative one lets nothing through.
        let r = redirected(d(
            READLINK,
            [1, 0x2000, u64::MAX, 0, 0, 0],
            &t,
            Str::Ok(b"/proc/1/exe"),
        ));
        let sizes = r.bufs.map(|b| b.and_then(|b| b.len.of(&r.args)));
        assert_eq!(sizes[0], Some(0));
        assert_eq!(r.accept(&sizes).check(5), Err(5));
        let r = redirected(d(
            READLINKAT,
            [AT_FDCWD, 1, 0x2000, 0x1_0000_0010, 0, 0],
            &t,
            Str::Ok(b"/proc/1/exe"),
        ));
        let sizes = r.bufs.map(|b| b.and_then(|b| b.len.of(&r.args)));
        assert_eq!(r.accept(&sizes), Accept { lo: 0, hi: 16 });
        // Vectored and message calls count against what the shim measured.
        let r = redirected(d(READV, [3, 0x1000, 2, 0, 0, 0], &t, Str::None));
        assert_eq!(r.accept(&[Some(300), None, None]).check(301), Err(301));
        let r = redirected(d(RECVMSG, [3, 0x1000, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(r.accept(&[Some(300), None, None]).check(300), Ok(300));
        assert_eq!(r.accept(&[Some(300), None, None]).check(301), Err(301));
        // A byte count never exceeds MAX_RW_COUNT, whatever the buffers add up to.
        assert_eq!(
            r.accept(&[Some(u64::MAX), None, None]).hi,
            MAX_RW_COUNT as i64
        );
    }

    #[test]
    fn a_receive_with_msg_trunc_may_report_a_longer_datagram_but_no_more() {
        let t = FdTable::new();
        t.insert(3, 40);
        let peek_trunc = (libc::MSG_PEEK | libc::MSG_TRUNC) as u64;
        let r = redirected(d(RECVMSG, [3, 0x1000, peek_trunc, 0, 0, 0], &t, Str::None));
        let accept = r.accept(&[Some(0), None, None]);
        assert_eq!(accept.check(8192), Ok(8192));
        assert_eq!(accept.check(MAX_RW_COUNT as i64 + 1), Err(0x7fff_f001));
        let r = redirected(d(
            RECVFROM,
            [3, 0x1000, 16, peek_trunc, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(r.ret, Ret::Range(0, MAX_RW_COUNT as i64));
        let r = redirected(d(RECVFROM, [3, 0x1000, 16, 0, 0, 0], &t, Str::None));
        assert_eq!(r.ret, Ret::Bytes(0));
    }

    #[test]
    fn a_new_fd_out_of_range_is_refused_and_never_truncated() {
        let t = FdTable::new();
        t.insert(3, 40);
        let open = redirected(d(
            OPEN,
            [0x1000, 0, 0, 0, 0, 0],
            &t,
            Str::Ok(b"/proc/1/stat"),
        ));
        let dup = redirected(d(DUP2, [3, 7, 0, 0, 0, 0], &t, Str::None));
        let socket = redirected(d(
            SOCKET,
            [libc::AF_NETLINK as u64, 0, 0, 0, 0, 0],
            &t,
            Str::None,
        ));
        for r in [open, dup, socket] {
            let accept = r.accept(&[None; 3]);
            assert_eq!(accept, Accept::FD);
            assert_eq!(accept.check(5), Ok(5));
            // 0x1_0000_0005 `as i32` would be fd 5: a GVM fd other than the one returned.
            assert_eq!(accept.check(0x1_0000_0005), Err(0x1_0000_0005));
            assert_eq!(accept.check(i64::from(i32::MAX) + 1), Err(0x8000_0000));
            assert_eq!(accept.check(i64::MIN), Err(i64::MIN));
            assert_eq!(accept.check(-4096), Err(-4096));
            // u64::MAX reads as -1 by the system-call ABI: -EPERM, an error, no fd.
            assert_eq!(accept.check(u64::MAX as i64), Ok(-1));
        }
        assert_eq!(gvm_fd(5), Some(5));
        assert_eq!(gvm_fd(-1), None);
        assert_eq!(gvm_fd(0x1_0000_0005), None);
    }

    #[test]
    fn calls_that_return_zero_or_a_small_number_accept_nothing_else() {
        let t = FdTable::new();
        t.insert(3, 40);
        let zero = [
            redirected(d(UNAME, [0x1000, 0, 0, 0, 0, 0], &t, Str::None)),
            redirected(d(KILL, [1, 9, 0, 0, 0, 0], &t, Str::None)),
            redirected(d(CLOSE, [3, 0, 0, 0, 0, 0], &t, Str::None)),
            redirected(d(STAT, [1, 0x2000, 0, 0, 0, 0], &t, Str::Ok(b"/sys"))),
            redirected(d(
                FCNTL,
                [3, libc::F_SETFD as u64, 1, 0, 0, 0],
                &t,
                Str::None,
            )),
        ];
        for r in zero {
            let accept = r.accept(&[Some(4096); 3]);
            assert_eq!(accept.check(0), Ok(0));
            assert_eq!(accept.check(1), Err(1), "{:?}", syscall_name(r.nr));
        }
        let prio = redirected(d(GETPRIORITY, [0, 1, 0, 0, 0, 0], &t, Str::None));
        let accept = prio.accept(&[None; 3]);
        assert_eq!(
            (accept.check(40), accept.check(41), accept.check(0)),
            (Ok(40), Err(41), Err(0))
        );
        let getfd = redirected(d(
            FCNTL,
            [3, libc::F_GETFD as u64, 0, 0, 0, 0],
            &t,
            Str::None,
        ));
        assert_eq!(getfd.accept(&[None; 3]).check(2), Err(2));
        let lseek = redirected(d(LSEEK, [3, 0, 0, 0, 0, 0], &t, Str::None));
        assert_eq!(lseek.accept(&[None; 3]).check(1 << 40), Ok(1 << 40));
        assert_eq!(lseek.accept(&[None; 3]).check(-4096), Err(-4096));
    }

    #[test]
    fn iovec_lengths_add_up_without_wrapping() {
        let entry = |base: u64, len: u64| {
            let mut e = base.to_ne_bytes().to_vec();
            e.extend_from_slice(&len.to_ne_bytes());
            e
        };
        let mut raw = entry(0x1000, 100);
        raw.extend(entry(0x2000, 28));
        assert_eq!(iov_bytes(&raw), 128);
        raw.extend(entry(0x3000, u64::MAX));
        assert_eq!(iov_bytes(&raw), u64::MAX);
        assert_eq!(iov_bytes(&raw[..20]), 100, "a partial entry is not counted");
    }

    #[test]
    fn names_cover_every_redirectable_call() {
        assert_eq!(syscall_name(OPENAT), Some("openat"));
        assert_eq!(syscall_name(GETPID), None);
        let t = FdTable::new();
        t.insert(3, 40);
        for nr in 0..460u64 {
            for s in [Str::Ok(b"/proc/1".as_slice()), Str::None] {
                let a = if nr == SOCKET {
                    [libc::AF_NETLINK as u64, 0, 0, 0, 0, 0]
                } else {
                    [3, 1, 2, 3, 4, 5]
                };
                if let Decision::Redirect(r) = d(nr, a, &t, s) {
                    assert!(syscall_name(nr).is_some(), "no name for {nr}");
                    assert!(syscall_name(r.nr).is_some(), "no name for {}", r.nr);
                }
            }
        }
    }
}
