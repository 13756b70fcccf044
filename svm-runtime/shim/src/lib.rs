//! `libexterior_shim.so`: the preload library of every program the SVM's agent starts.
//!
//! Its ELF constructor arms Linux *syscall user dispatch* for the program's main thread:
//! from then on every system call made outside the shim's *gate* (one assembly section
//! holding all of the shim's `syscall` instructions) raises SIGSYS. The handler asks
//! [`svm_runtime::policy`] what to do with the call:
//!
//! - **redirect** it to the GVM: fault in its user buffers and list them (the only program
//!   memory the call will reach: the VMM copies those bytes through bounce pages), then
//!   `out %al, $0xE7` with the call in the registers and the list's address in RCX
//!   ([`svm_runtime::redirect_abi`]); the VMM runs it in the program's
//!   shadow task in the GVM and writes the result to RAX and a status to RCX. A redirected
//!   call that creates an fd gets a *placeholder* fd in the SVM (`/dev/null`, reserving the
//!   number) mapped to the GVM's fd; calls on the placeholder are redirected with the fd
//!   translated. The GVM kernel's result is checked against the call's contract (see
//!   [`svm_runtime::policy`], "What a redirected call may return") before it is used or
//!   returned: `read` never says it read more than it was asked, a new fd is an `int`,
//!   nothing is a pointer; a result out of contract becomes `EIO`, with a line on stderr.
//! - **run it locally**: the handler returns into a gate *trampoline* that re-issues the call
//!   with the program's own signal mask, so a blocking call stays interruptible and restarts
//!   as usual; the handler itself never blocks on a local call.
//!
//! # Environment
//!
//! - `EXTERIOR_SHIM_OFF=1`: do not arm; the program runs entirely locally.
//! - `EXTERIOR_SHIM_LOOPBACK=1` (host tests only): arm and apply the whole policy and fd
//!   tracking, but run each redirected call locally (from the gate) instead of the `out`, as
//!   if the VMM had answered with status 0. No `ioperm` is needed.
//! - `EXTERIOR_SHIM_STATS=1`: at exit, print `exterior-shim: redirected=N local=M` to stderr
//!   (calls the policy redirected / ran locally in this process image).
//!
//! Without loopback the constructor needs `ioperm(0xE7)` (root); if that or arming fails it
//! prints `exterior: cannot reach the VMM (ioperm: EPERM)` (or the reason) and exits with
//! 126: running locally would show the SVM's state as if it were the GVM's.
//!
//! # Limits
//!
//! - Only dynamically linked programs load a preload library: a static binary (busybox-static,
//!   most Go programs), or a program whose environment lost `LD_PRELOAD`, runs locally.
//! - The handler runs on the stack of the diverted call (no `SA_ONSTACK`) and needs about
//!   7 KiB of it besides the kernel's signal frame; a runtime that makes system calls on tiny
//!   stacks (Go's goroutines) is not supported.
//! - Dispatch is per thread and not inherited by `fork`, `clone` or `execve`. Each exec'd
//!   program re-arms through `LD_PRELOAD` (if its environment still carries it). A fork
//!   child re-arms itself: the shim runs fork-like calls from its handler, so the child starts
//!   there, re-arms, and dups every GVM fd of its placeholder table so that it owns them as it
//!   owns its copies of local fds. Threads, and children cloned onto a new stack
//!   (`posix_spawn`) until they exec, are not diverted: there, a placeholder is `/dev/null`.
//! - Placeholders that are not close-on-exec are handed to the exec'd image in
//!   `EXTERIOR_SHIM_FDS=<placeholder>:<gvm fd>,…` (added to the `execve` environment; the new
//!   image's shim takes each one that is still an open `/dev/null` and unsets the variable),
//!   so `grep x < /proc/mounts` in a diverted shell works. Close-on-exec placeholders' GVM fds
//!   stay open in the GVM after a successful exec (the shim cannot know the exec succeeds),
//!   and so do those a program leaves open when it exits (libc may still flush a stdio buffer
//!   into one after the shim's destructor): the VMM has to reap them.
//! - Paths are classified lexically; relative paths follow the working directory, which is
//!   the SVM's (see [`svm_runtime::policy`]).
//! - `vfork` runs as `fork`; `clone3` fails with `ENOSYS` (glibc falls back to `clone`).
//! - `EXTERIOR_SHIM_STATS` keeps a duplicate of stderr at fd 1000 or above (close-on-exec).
//! - A SIGSYS that is not a dispatch (sent with `kill`, or seccomp's) is ignored; the
//!   program's own SIGSYS handler is accepted and never installed.
//! - The pages of redirected buffers are faulted in by reading (and for outputs, writing back)
//!   one byte per page; another, undiverted thread writing that byte at that instant loses
//!   its write.

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("exterior-shim supports x86-64 Linux only");

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::Relaxed};

use svm_runtime::policy::{self, nr, Accept, Decision, FdTable, Len, Redirect, Shape, Str, Then};
use svm_runtime::redirect_abi::{self, BufferList, Status};

// The gate: every `syscall` instruction of the shim, and nothing else. Syscall user dispatch
// lets calls from [exterior_gate_start, exterior_gate_end) through.
//
// - exterior_syscall6(nr, a1..a6): a raw system call (SysV C ABI; a6 on the stack).
// - exterior_restorer: SA_RESTORER of the SIGSYS handler, and where the program's own
//   rt_sigreturn is resumed.
// - exterior_tramp: re-issues the interrupted call locally. Entered by the handler's return
//   with the call's registers, R11 = where the program resumes. It steps over the red zone,
//   pushes R11, makes the call and returns to it. RCX and R11 are clobbered, as by `syscall`.
// - exterior_tramp_<reg>: the same, but RCX holds the program's value of <reg>, which the
//   handler replaced with an argument of its own; it is restored after the call. A clone
//   child on a new stack finds that value and its return address at the top of its stack.
global_asm!(
    ".pushsection .text.exterior_gate,\"ax\",@progbits",
    ".globl exterior_gate_start",
    ".hidden exterior_gate_start",
    "exterior_gate_start:",
    ".globl exterior_syscall6",
    ".hidden exterior_syscall6",
    ".type exterior_syscall6,@function",
    "exterior_syscall6:",
    "mov %rdi, %rax",
    "mov %rsi, %rdi",
    "mov %rdx, %rsi",
    "mov %rcx, %rdx",
    "mov %r8, %r10",
    "mov %r9, %r8",
    "mov 8(%rsp), %r9",
    "syscall",
    "ret",
    ".globl exterior_restorer",
    ".hidden exterior_restorer",
    "exterior_restorer:",
    "mov $15, %eax",
    "syscall",
    "ud2",
    ".globl exterior_tramp",
    ".hidden exterior_tramp",
    "exterior_tramp:",
    "lea -128(%rsp), %rsp",
    "push %r11",
    "syscall",
    "ret $128",
    ".irp reg, rdi, rsi, rdx, r10, r8, r9",
    ".globl exterior_tramp_\\reg",
    ".hidden exterior_tramp_\\reg",
    "exterior_tramp_\\reg:",
    "lea -128(%rsp), %rsp",
    "push %r11",
    "push %rcx",
    "syscall",
    "pop %\\reg",
    "ret $128",
    ".endr",
    ".globl exterior_gate_end",
    ".hidden exterior_gate_end",
    "exterior_gate_end:",
    ".popsection",
    options(att_syntax)
);

extern "C" {
    fn exterior_syscall6(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> i64;
    static exterior_gate_start: u8;
    static exterior_gate_end: u8;
    static exterior_restorer: u8;
    static exterior_tramp: u8;
    static exterior_tramp_rdi: u8;
    static exterior_tramp_rsi: u8;
    static exterior_tramp_rdx: u8;
    static exterior_tramp_r10: u8;
    static exterior_tramp_r8: u8;
    static exterior_tramp_r9: u8;
}

/// A raw system call through the gate.
///
/// # Safety
/// The call must be sound for its arguments (pointers valid for what the kernel does with
/// them, no fd or mapping pulled from under Rust code).
unsafe fn sys(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: the gate only issues the system call; the caller vouches for its arguments
    // (this function's contract).
    unsafe { exterior_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

fn addr(sym: &u8) -> u64 {
    sym as *const u8 as u64
}

const PR_SET_SYSCALL_USER_DISPATCH: u64 = 59;
const PR_SYS_DISPATCH_ON: u64 = 1;
const SYS_USER_DISPATCH: c_int = 2;
const SA_RESTORER: u64 = 0x0400_0000;
const PAGE: u64 = 4096;
const STATS_FD_MIN: u64 = 1000;
/// Loopback mode: lowest fd number of the local stand-ins for GVM fds.
const LOOPBACK_FD_MIN: u64 = 512;

static FDS: FdTable = FdTable::new();
static ARMED: AtomicBool = AtomicBool::new(false);
static LOOPBACK: AtomicBool = AtomicBool::new(false);
/// Where the `EXTERIOR_SHIM_STATS` line goes: a private duplicate of stderr, because many
/// programs (coreutils) close their stderr before they exit. -1: no statistics.
static STATS_FD: AtomicI32 = AtomicI32::new(-1);
static OWN_PID: AtomicI32 = AtomicI32::new(0);
static REDIRECTED: AtomicU64 = AtomicU64::new(0);
static LOCAL: AtomicU64 = AtomicU64::new(0);
static NOTICED: AtomicBool = AtomicBool::new(false);
/// When process_vm_readv/writev are refused (seccomp), buffers are touched directly.
static NO_VM_RW: AtomicBool = AtomicBool::new(false);

/// Sanitised signal masks for calls re-issued after the handler returns (rt_sigsuspend,
/// ppoll, pselect6, epoll_pwait*): they must outlive the handler's frame. `[mask, &mask,
/// size]`, the last two for pselect6's `{ const sigset_t *, size_t }`. A ring: only a signal
/// handler nesting 32 deep inside such calls could reuse a slot in use.
static MASK_SLOTS: [[AtomicU64; 3]; 32] = [const { [const { AtomicU64::new(0) }; 3] }; 32];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// The kernel's `struct sigaction` (x86-64).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KSigaction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

// ---------------------------------------------------------------------------------------
// Messages, without allocation or libc.

struct Line {
    buf: [u8; 200],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 200],
            len: 0,
        }
    }
    fn push(&mut self, s: &[u8]) -> &mut Line {
        for &b in s {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        self
    }
    fn num(&mut self, n: u64) -> &mut Line {
        let mut buf = [0u8; 20];
        self.push(policy::decimal(n, &mut buf))
    }
    fn signed(&mut self, n: i64) -> &mut Line {
        if n < 0 {
            self.push(b"-");
        }
        self.num(n.unsigned_abs())
    }
    /// The system call's name, or its number if the policy has no name for it.
    fn call(&mut self, nr: u64) -> &mut Line {
        match policy::syscall_name(nr) {
            Some(name) => self.push(name.as_bytes()),
            None => self.num(nr),
        }
    }
    fn errno(&mut self, errno: i64) -> &mut Line {
        let name: &[u8] = match errno as i32 {
            libc::EPERM => b"EPERM",
            libc::EINVAL => b"EINVAL",
            libc::ENOSYS => b"ENOSYS",
            libc::EFAULT => b"EFAULT",
            libc::EACCES => b"EACCES",
            _ => return self.push(b"errno ").num(errno as u64),
        };
        self.push(name)
    }
    fn write_to(&self, fd: i32) {
        let len = self.len.min(self.buf.len());
        // SAFETY: writes `len` initialised bytes of our own buffer to an fd.
        unsafe {
            sys(
                nr::WRITE,
                [fd as u64, self.buf.as_ptr() as u64, len as u64, 0, 0, 0],
            )
        };
    }
    fn write_stderr(&self) {
        self.write_to(2)
    }
}

fn die(what: &[u8], errno: i64) -> ! {
    Line::new()
        .push(b"exterior: ")
        .push(what)
        .errno(errno)
        .push(b")\n")
        .write_stderr();
    loop {
        // SAFETY: exit_group never returns and touches no memory of ours.
        unsafe {
            sys(
                libc::SYS_exit_group as u64,
                [redirect_abi::EXIT_UNREACHABLE as u64, 0, 0, 0, 0, 0],
            )
        };
    }
}

// ---------------------------------------------------------------------------------------
// Arming.

fn env_is_one(name: &CStr) -> bool {
    // SAFETY: getenv with a NUL-terminated name; runs in the constructor, before any thread
    // of the program exists, so nothing modifies the environment concurrently. The result is
    // either NULL or a NUL-terminated string that we only read.
    unsafe {
        let v = libc::getenv(name.as_ptr());
        !v.is_null() && CStr::from_ptr(v).to_bytes() == b"1"
    }
}

/// Takes over the placeholders a diverted parent handed across `execve` (see
/// [`policy::FDS_ENV`]): each must still be an open `/dev/null`. The variable is removed so
/// that it cannot reach a later exec stale.
fn inherit_placeholders() {
    let name = c"EXTERIOR_SHIM_FDS";
    debug_assert_eq!(name.to_bytes(), policy::FDS_ENV.as_bytes());
    // SAFETY: getenv/fstat/unsetenv in the constructor, before the program has threads;
    // the value is read before unsetenv may free it.
    unsafe {
        let v = libc::getenv(name.as_ptr());
        if v.is_null() {
            return;
        }
        policy::parse_fds_env(CStr::from_ptr(v).to_bytes(), |p, r| {
            let mut st: libc::stat = core::mem::zeroed();
            let dev_null = libc::fstat(p, &mut st) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFCHR
                && st.st_rdev == libc::makedev(1, 3);
            if dev_null {
                FDS.insert(p, r);
            }
        });
        libc::unsetenv(name.as_ptr());
    }
}

extern "C" fn init() {
    if env_is_one(c"EXTERIOR_SHIM_OFF") {
        return;
    }
    let loopback = env_is_one(c"EXTERIOR_SHIM_LOOPBACK");
    LOOPBACK.store(loopback, Relaxed);
    if env_is_one(c"EXTERIOR_SHIM_STATS") {
        let dupfd = libc::F_DUPFD_CLOEXEC as u64;
        // SAFETY: duplicates fd 2 (if open) to a number we keep.
        let fd = unsafe { sys(nr::FCNTL, [2, dupfd, STATS_FD_MIN, 0, 0, 0]) };
        STATS_FD.store(fd.max(-1) as i32, Relaxed);
    }
    let port = u64::from(redirect_abi::PORT);
    // SAFETY: ioperm and getpid take no pointers.
    let (io, pid) = unsafe {
        let io = if loopback {
            0
        } else {
            sys(redirect_abi::SYS_IOPERM, [port, 1, 1, 0, 0, 0])
        };
        (io, sys(nr::GETPID, [0; 6]))
    };
    if io < 0 {
        die(b"cannot reach the VMM (ioperm: ", -io);
    }
    OWN_PID.store(pid as i32, Relaxed);
    inherit_placeholders();
    let act = KSigaction {
        handler: on_sigsys as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as usize
            as u64,
        flags: libc::SA_SIGINFO as u64 | SA_RESTORER,
        // SAFETY: taking the address of a symbol of the gate; it is never read as a u8.
        restorer: addr(unsafe { &exterior_restorer }),
        mask: u64::MAX,
    };
    let unblock = policy::SIGSYS_BIT;
    let (sigsys, sig_unblock) = (libc::SIGSYS as u64, libc::SIG_UNBLOCK as u64);
    // SAFETY: the pointers are to live locals of the kernel's layouts.
    let sa = unsafe {
        sys(
            nr::RT_SIGPROCMASK,
            [sig_unblock, &unblock as *const u64 as u64, 0, 8, 0, 0],
        );
        sys(
            nr::RT_SIGACTION,
            [sigsys, &act as *const KSigaction as u64, 0, 8, 0, 0],
        )
    };
    let pr = if sa < 0 { 0 } else { arm() };
    if sa < 0 {
        die(b"cannot divert system calls (rt_sigaction: ", -sa);
    }
    if pr < 0 {
        die(b"cannot divert system calls (prctl: ", -pr);
    }
    ARMED.store(true, Relaxed);
}

/// Arms syscall user dispatch for the calling thread, our gate allowed; 0 or -errno.
fn arm() -> i64 {
    // SAFETY: only addresses of our gate symbols are taken; prctl takes no pointer it
    // dereferences here (the selector is NULL).
    unsafe {
        let (start, end) = (addr(&exterior_gate_start), addr(&exterior_gate_end));
        let args = [
            PR_SET_SYSCALL_USER_DISPATCH,
            PR_SYS_DISPATCH_ON,
            start,
            end - start,
            0,
            0,
        ];
        sys(libc::SYS_prctl as u64, args)
    }
}

/// In a new child process: dispatch is not inherited, arm it again (same handler, gate and
/// fd table copy); count afresh.
fn arm_child() {
    // SAFETY: getpid takes no pointers.
    OWN_PID.store(unsafe { sys(nr::GETPID, [0; 6]) } as i32, Relaxed);
    let pr = arm();
    if pr < 0 {
        die(b"cannot divert system calls (prctl: ", -pr);
    }
    REDIRECTED.store(0, Relaxed);
    LOCAL.store(0, Relaxed);
    // The child's placeholders are copies: give it GVM fds of its own, as fork gives it
    // files of its own, so that its close does not close its parent's.
    for fd in 0..policy::FD_TABLE_SIZE as i32 {
        if let Some(remote) = FDS.remote(fd as u64) {
            let own = checked_call(
                nr::DUP,
                [remote as u64, 0, 0, 0, 0, 0],
                Accept::FD,
                &BufferList::default(),
            );
            match policy::gvm_fd(own) {
                Some(own) if FDS.insert(fd, own) => {}
                _ => {
                    FDS.take(fd);
                }
            }
        }
    }
}

extern "C" fn fini() {
    let fd = STATS_FD.load(Relaxed);
    // SAFETY: getpid takes no pointers.
    let armed_here = ARMED.load(Relaxed)
        && unsafe { sys(nr::GETPID, [0; 6]) } == i64::from(OWN_PID.load(Relaxed));
    // A child that was not re-armed (a clone on a new stack) has no statistics of its own.
    // GVM fds the program did not close stay open here: libc flushes stdio buffers only
    // after the destructors ran, and such a flush may still write to one.
    if armed_here && fd >= 0 {
        Line::new()
            .push(b"exterior-shim: redirected=")
            .num(REDIRECTED.load(Relaxed))
            .push(b" local=")
            .num(LOCAL.load(Relaxed))
            .push(b"\n")
            .write_to(fd);
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = fini;

// ---------------------------------------------------------------------------------------
// The program's memory, read and written so that a bad pointer is EFAULT, not a crash.

#[repr(C)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Copies between the program's address space and ours with process_vm_readv/writev on
/// ourselves: `remote` iovecs against one local buffer. Returns bytes moved or -errno.
///
/// # Safety
/// `local` must be valid for `local_len` bytes (writable when reading).
unsafe fn vm_copy(write: bool, local: u64, local_len: u64, remote: &[Iovec]) -> i64 {
    let nr = if write {
        libc::SYS_process_vm_writev
    } else {
        libc::SYS_process_vm_readv
    };
    let liov = Iovec {
        base: local,
        len: local_len,
    };
    let pid = OWN_PID.load(Relaxed) as u64;
    // SAFETY: `liov` and `remote` are live for the call; `local` is valid for
    // `local_len` bytes (this function's contract); the kernel checks the remote ranges.
    unsafe {
        sys(
            nr as u64,
            [
                pid,
                &liov as *const _ as u64,
                1,
                remote.as_ptr() as u64,
                remote.len() as u64,
                0,
            ],
        )
    }
}

fn vm_rw_refused(r: i64) -> bool {
    let refused = r == -i64::from(libc::ENOSYS) || r == -i64::from(libc::EPERM);
    if refused {
        NO_VM_RW.store(true, Relaxed);
    }
    refused
}

/// Reads `out.len()` bytes at `at` (split at page boundaries, so a partial read stops at an
/// unreadable page). Returns how many bytes were read.
fn peek(at: u64, out: &mut [u8]) -> usize {
    peek_until(at, out, false)
}

/// [`peek`] of a C string: without process_vm_readv it stops after the NUL, so it does not
/// read past the string into what may be unmapped.
fn peek_str(at: u64, out: &mut [u8]) -> usize {
    peek_until(at, out, true)
}

fn peek_until(at: u64, out: &mut [u8], nul: bool) -> usize {
    if at == 0 || out.is_empty() {
        return 0;
    }
    let len = out.len() as u64;
    if !NO_VM_RW.load(Relaxed) {
        let first = (PAGE - at % PAGE).min(len);
        let iov = [
            Iovec {
                base: at,
                len: first,
            },
            Iovec {
                base: at.wrapping_add(first),
                len: len - first,
            },
        ];
        let n = if first == len { &iov[..1] } else { &iov[..] };
        // SAFETY: `out` is a live, writable local buffer of `len` bytes.
        let r = unsafe { vm_copy(false, out.as_mut_ptr() as u64, len, n) };
        if !vm_rw_refused(r) {
            return r.max(0) as usize;
        }
    }
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: fallback when the kernel refuses process_vm_readv: the program handed
        // this pointer to a system call that reads this much (or up to the NUL) of it.
        *b = unsafe { core::ptr::read_volatile(at.wrapping_add(i as u64) as *const u8) };
        if nul && *b == 0 {
            return i + 1;
        }
    }
    out.len()
}

fn peek_u64(at: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    (peek(at, &mut b) == 8).then(|| u64::from_ne_bytes(b))
}

/// Writes `data` at `at` in the program; false if it is not writable.
fn poke(at: u64, data: &[u8]) -> bool {
    if at == 0 {
        return false;
    }
    if !NO_VM_RW.load(Relaxed) {
        let iov = [Iovec {
            base: at,
            len: data.len() as u64,
        }];
        // SAFETY: `data` is a live local buffer the kernel only reads.
        let r = unsafe { vm_copy(true, data.as_ptr() as u64, data.len() as u64, &iov) };
        if !vm_rw_refused(r) {
            return r == data.len() as i64;
        }
    }
    for (i, &b) in data.iter().enumerate() {
        // SAFETY: fallback without process_vm_writev: the program gave this address for the
        // kernel to write (oldset, oldact, clone stack), so it is expected to be writable.
        unsafe { core::ptr::write_volatile(at.wrapping_add(i as u64) as *mut u8, b) };
    }
    true
}

/// Copies the NUL-terminated string at `at` into `buf`.
fn copy_str(at: u64, buf: &mut [u8; policy::PATH_MAX]) -> Str<'_> {
    let n = peek_str(at, buf);
    match buf[..n].iter().position(|&b| b == 0) {
        Some(end) => Str::Ok(&buf[..end]),
        None if n == buf.len() => Str::TooLong,
        None => Str::Fault,
    }
}

/// Makes the pages of `[at, at + len)` present (and writable if `write`) in the program's
/// page tables by reading one byte per page (and writing it back), and then lists the range
/// in `list`: what the call may reach. False — and nothing listed — if a page is not
/// accessible that way, the range is longer than what is left of `*budget` (a call
/// reaches all of its buffers or fails: a range cut short would fault in the GVM's kernel
/// half-way through the call), or the list is full.
fn touch(at: u64, len: u64, write: bool, budget: &mut u64, list: &mut BufferList) -> bool {
    if at == 0 || len == 0 {
        return true;
    }
    if len > *budget {
        return false;
    }
    *budget -= len;
    touch_pages(at, len, write) && list.push(at, len, write)
}

/// The faulting-in of [`touch`].
fn touch_pages(at: u64, len: u64, write: bool) -> bool {
    const BATCH: usize = 64;
    let end = at.saturating_add(len);
    let mut next = at;
    let mut scratch = [0u8; BATCH];
    // At most MAX_MODULE_TOUCH / PAGE / BATCH rounds.
    while next < end {
        let mut iov = [const { Iovec { base: 0, len: 1 } }; BATCH];
        let mut n = 0;
        while n < BATCH && next < end {
            iov[n].base = next;
            n += 1;
            next = (next / PAGE + 1).saturating_mul(PAGE);
        }
        if NO_VM_RW.load(Relaxed) {
            for v in &iov[..n] {
                let p = v.base as *mut u8;
                // SAFETY: fallback without process_vm_*: the program passed this buffer to a
                // system call that accesses it with this direction, so it is mapped so.
                unsafe {
                    let b = core::ptr::read_volatile(p);
                    if write {
                        core::ptr::write_volatile(p, b);
                    }
                }
            }
            continue;
        }
        let local = scratch.as_mut_ptr() as u64;
        // SAFETY: `scratch` is a live local buffer of BATCH >= n bytes.
        let r = unsafe { vm_copy(false, local, n as u64, &iov[..n]) };
        if vm_rw_refused(r) {
            next = at;
            continue;
        }
        if r != n as i64 {
            return false;
        }
        // SAFETY: as above; writes back the bytes just read.
        if write && unsafe { vm_copy(true, local, n as u64, &iov[..n]) } != n as i64 {
            return false;
        }
    }
    true
}

/// Touches the buffers of an iovec array (`count` entries, at most MAX_IOV) and lists the
/// array (which the kernel reads) and them. Returns their total length (saturating), or
/// None if the array or a buffer is inaccessible.
fn touch_iov(
    at: u64,
    count: u64,
    write: bool,
    budget: &mut u64,
    list: &mut BufferList,
) -> Option<u64> {
    let count = count.min(redirect_abi::MAX_IOV as u64);
    if !list.push(at, count * 16, false) {
        return None;
    }
    let mut i = 0;
    let mut total = 0u64;
    while i < count {
        let mut raw = [0u8; 16 * 16];
        let want = ((count - i) as usize).min(16) * 16;
        let got = peek(at.wrapping_add(i * 16), &mut raw[..want]);
        if got < want {
            return None;
        }
        total = total.saturating_add(policy::iov_bytes(&raw[..want]));
        for e in raw[..want].chunks_exact(16) {
            let base = u64::from_ne_bytes(e[..8].try_into().unwrap_or_default());
            let len = u64::from_ne_bytes(e[8..].try_into().unwrap_or_default());
            if !touch(base, len, write, budget, list) {
                return None;
            }
        }
        i += 16;
    }
    Some(total)
}

/// Touches a `struct msghdr` and everything it points to, and lists them (the header is
/// written back by a receive). Returns the total length of its iovecs (what a send or
/// receive of it may count), or None if something is inaccessible.
fn touch_msg(at: u64, write: bool, budget: &mut u64, list: &mut BufferList) -> Option<u64> {
    let mut h = [0u8; 56];
    if peek(at, &mut h) < h.len() {
        return None;
    }
    let listed = if write {
        touch(at, 56, true, budget, list)
    } else {
        list.push(at, 56, false)
    };
    if !listed {
        return None;
    }
    let word = |o: usize| u64::from_ne_bytes(h[o..o + 8].try_into().unwrap_or_default());
    let namelen = u64::from(u32::from_ne_bytes(h[8..12].try_into().unwrap_or_default()));
    if !touch(word(0), namelen, write, budget, list) {
        return None;
    }
    let total = touch_iov(word(16), word(24), write, budget, list)?;
    touch(word(32), word(40), write, budget, list).then_some(total)
}

/// Faults in every buffer of a redirected call and lists it in `list`. Returns whether all
/// of them are accessible (and listed), and each one's length in bytes as the program
/// gives it now, before the call (for an iovec array or a `msghdr`, its iovecs' total):
/// what the call's result may count ([`Redirect::accept`]).
fn touch_buffers(r: &Redirect, list: &mut BufferList) -> (bool, [Option<u64>; 3]) {
    let mut budget = (r.touch_limit + redirect_abi::MAX_SIDE_TOUCH) as u64;
    let mut ok = true;
    let mut sizes = [None; 3];
    for (b, size) in r.bufs.iter().zip(sizes.iter_mut()) {
        let Some(b) = b else { continue };
        let ptr = r.args[b.arg];
        let len = match b.len {
            Len::ArgPtr(i) => {
                let mut l = [0u8; 4];
                if r.args[i] != 0 && peek(r.args[i], &mut l) < 4 {
                    ok = false;
                }
                u64::from(u32::from_ne_bytes(l))
            }
            other => other.of(&r.args).unwrap_or(0),
        };
        *size = match b.shape {
            Shape::Flat => touch(ptr, len, b.write, &mut budget, list).then_some(len),
            Shape::Iov => touch_iov(ptr, len, b.write, &mut budget, list),
            Shape::Msg if ptr == 0 => Some(0),
            Shape::Msg => touch_msg(ptr, b.write, &mut budget, list),
        };
        ok &= size.is_some();
    }
    (ok, sizes)
}

// ---------------------------------------------------------------------------------------
// Redirecting.

/// One redirected call: through the VMM, or locally in loopback mode. `list` names the
/// program memory the call may reach; nothing else of the program is in its view.
fn vmm_call(nr: u64, a: [u64; 6], list: &BufferList) -> i64 {
    if LOOPBACK.load(Relaxed) {
        // SAFETY: the program's own call with its own (or our translated) arguments, whose
        // buffers it vouched for by making the call.
        let ret = unsafe { sys(nr, a) };
        if ret >= 0
            && matches!(
                nr,
                nr::OPEN | nr::OPENAT | nr::OPENAT2 | nr::SOCKET | nr::DUP
            )
        {
            // The "GVM's" fds share the program's fd numbers here: move them out of its way
            // (the program's dup2 onto a low number must not hit one).
            // SAFETY: fcntl/close of the fd the call just created.
            unsafe {
                let moved = sys(
                    nr::FCNTL,
                    [ret as u64, libc::F_DUPFD as u64, LOOPBACK_FD_MIN, 0, 0, 0],
                );
                if moved >= 0 {
                    sys(nr::CLOSE, [ret as u64, 0, 0, 0, 0, 0]);
                    return moved;
                }
            }
        }
        return ret;
    }
    // A new call (token 0), then polls with the token the VMM hands out while it runs:
    // each `out` holds the SVM's vCPU for milliseconds at most (redirect_abi).
    let (mut rax, mut rcx): (u64, u64);
    let mut token = 0u64;
    loop {
        // SAFETY: ioperm granted this port in the constructor. The VMM runs the call in the
        // GVM and may write the ranges `list` marks written (program memory, hence no
        // `nomem`), when it answers with the result; it writes RAX, RCX and R11 only. The
        // argument registers are declared clobbered in case it does not keep them. `list`
        // lives until the last `out` returns.
        unsafe {
            asm!(
                "out {port}, al",
                port = const redirect_abi::PORT,
                inout("rax") nr => rax,
                inout("rdi") a[0] => _,
                inout("rsi") a[1] => _,
                inout("rdx") a[2] => _,
                inout("r10") a[3] => _,
                inout("r8") a[4] => _,
                inout("r9") a[5] => _,
                inout("rcx") list as *const BufferList as u64 => rcx,
                inout("r11") token => token,
                options(nostack, preserves_flags),
            );
        }
        if rcx != Status::Pending as u64 || token == 0 {
            break;
        }
        // The SVM's other programs first: with one SVM vCPU, a program polling back to
        // back would keep the one whose call is done (or the agent) waiting for a tick.
        // SAFETY: sched_yield takes no arguments and touches no memory.
        unsafe { sys(nr::SCHED_YIELD, [0; 6]) };
    }
    if rcx != Status::Done as u64 && !NOTICED.swap(true, Relaxed) {
        let mut line = Line::new();
        line.push(b"exterior: ");
        match Status::from_rcx(rcx) {
            Some(s) => line.push(s.reason().as_bytes()),
            None => line.push(redirect_abi::REASON_UNKNOWN_STATUS.as_bytes()),
        };
        line.push(b" (").call(nr).push(b")\n").write_stderr();
    }
    if matches!(Status::from_rcx(rcx), None | Some(Status::Pending)) {
        // No status (the VMM did not answer: RCX still holds the list), or pending without
        // a token to poll with: RAX is not a result.
        return -i64::from(libc::EIO);
    }
    rax as i64
}

/// A redirected call whose result is checked against what it `accept`s: a result out of
/// contract (a hostile GVM kernel's) becomes `-EIO`, with one line on stderr naming the
/// call and the value, before anything uses it.
fn checked_call(nr: u64, a: [u64; 6], accept: Accept, list: &BufferList) -> i64 {
    let ret = vmm_call(nr, a, list);
    accept.check(ret).unwrap_or_else(|bad| {
        let mut line = Line::new();
        line.push(b"exterior: the guest kernel returned ")
            .signed(bad);
        line.push(b" from ")
            .call(nr)
            .push(b", outside its contract (-errno or ")
            .signed(accept.lo)
            .push(b"..=")
            .signed(accept.hi)
            .push(b"): EIO\n")
            .write_stderr();
        -i64::from(libc::EIO)
    })
}

fn remote_close(remote: i32) {
    // The result is not used: the placeholder is gone whatever the GVM says.
    vmm_call(
        nr::CLOSE,
        [remote as u64, 0, 0, 0, 0, 0],
        &BufferList::default(),
    );
}

/// Reserves a placeholder for a new GVM fd and returns it (or -errno, the GVM fd closed).
fn reserve(remote: i32, cloexec: bool) -> i64 {
    let flags = libc::O_RDONLY | if cloexec { libc::O_CLOEXEC } else { 0 };
    let at_fdcwd = libc::AT_FDCWD as i64 as u64;
    // SAFETY: openat of a static NUL-terminated path.
    let p = unsafe {
        sys(
            nr::OPENAT,
            [
                at_fdcwd,
                c"/dev/null".as_ptr() as u64,
                flags as u64,
                0,
                0,
                0,
            ],
        )
    };
    if p >= 0 && !FDS.insert(p as i32, remote) {
        // SAFETY: closes the fd we just opened.
        unsafe { sys(nr::CLOSE, [p as u64, 0, 0, 0, 0, 0]) };
        remote_close(remote);
        return -i64::from(libc::EMFILE);
    }
    if p < 0 {
        remote_close(remote);
    }
    p
}

/// Carries out a redirect; returns the program's result. The GVM's result is checked
/// against the call's contract first ([`Redirect::accept`], with the buffer lengths measured
/// before the call), so what follows sees only `-errno` or a value in contract.
fn redirect(mut r: Redirect, nr: u64, orig: [u64; 6], path: &mut [u8; policy::PATH_MAX]) -> i64 {
    let mut list = BufferList::default();
    let (accessible, sizes) = touch_buffers(&r, &mut list);
    if !accessible && r.strict {
        return -i64::from(if list.count as usize == redirect_abi::MAX_BUFFERS {
            libc::EINVAL
        } else {
            libc::EFAULT
        });
    }
    if let Some(i) = r.string_arg {
        policy::rewrite_for_gvm(path);
        r.args[i] = path.as_ptr() as u64;
        let len = path
            .iter()
            .position(|&b| b == 0)
            .map_or(path.len(), |n| n + 1);
        if !list.push(r.args[i], len as u64, false) {
            return -i64::from(libc::EINVAL);
        }
    }
    let ret = checked_call(r.nr, r.args, r.accept(&sizes), &list);
    match r.then {
        Then::Result => ret,
        Then::NewFd { cloexec } => match policy::gvm_fd(ret) {
            Some(remote) => reserve(remote, cloexec),
            None => ret,
        },
        Then::Close { placeholder } => {
            FDS.take(placeholder);
            // SAFETY: closes the placeholder the program asked to close.
            unsafe { sys(nr::CLOSE, [placeholder as u64, 0, 0, 0, 0, 0]) };
            ret
        }
        Then::Dup => {
            let Some(remote) = policy::gvm_fd(ret) else {
                return ret;
            };
            // SAFETY: the program's own dup/dup2/dup3/fcntl on its placeholder.
            let local = unsafe { sys(nr, orig) };
            if local < 0 {
                remote_close(remote);
                return local;
            }
            if let Some(old) = FDS.take(local as i32) {
                remote_close(old);
            }
            if !FDS.insert(local as i32, remote) {
                // SAFETY: closes the fd the local dup just created.
                unsafe { sys(nr::CLOSE, [local as u64, 0, 0, 0, 0, 0]) };
                remote_close(remote);
                return -i64::from(libc::EMFILE);
            }
            local
        }
        Then::AlsoLocal => {
            if ret >= 0 {
                // SAFETY: the program's own fcntl(F_SETFD) on its placeholder.
                unsafe { sys(nr, orig) };
            }
            ret
        }
    }
}

// ---------------------------------------------------------------------------------------
// The handler.

const ARG_REGS: [c_int; 6] = [
    libc::REG_RDI,
    libc::REG_RSI,
    libc::REG_RDX,
    libc::REG_R10,
    libc::REG_R8,
    libc::REG_R9,
];

fn tramp_for(arg: usize) -> u64 {
    // SAFETY: only the addresses of gate symbols are taken.
    unsafe {
        addr(match arg {
            0 => &exterior_tramp_rdi,
            1 => &exterior_tramp_rsi,
            2 => &exterior_tramp_rdx,
            3 => &exterior_tramp_r10,
            4 => &exterior_tramp_r8,
            _ => &exterior_tramp_r9,
        })
    }
}

type Gregs = [libc::greg_t; 23];

fn reg(g: &mut Gregs, r: c_int) -> &mut libc::greg_t {
    &mut g[r as usize]
}

/// Resumes the program in a trampoline that re-issues the call (RAX) locally, with argument
/// `arg` (if any) replaced for the call only.
fn resume_local(g: &mut Gregs, arg: Option<(usize, u64)>) {
    let rip = *reg(g, libc::REG_RIP);
    *reg(g, libc::REG_R11) = rip;
    let tramp = match arg {
        None => {
            // SAFETY: only the address of a gate symbol is taken.
            addr(unsafe { &exterior_tramp })
        }
        Some((i, value)) => {
            let r = ARG_REGS[i.min(5)];
            *reg(g, libc::REG_RCX) = *reg(g, r);
            *reg(g, r) = value as libc::greg_t;
            tramp_for(i)
        }
    };
    *reg(g, libc::REG_RIP) = tramp as libc::greg_t;
}

extern "C" fn on_sigsys(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel calls an SA_SIGINFO handler with a valid siginfo and ucontext that
    // live on this thread's stack for the duration of the handler; nothing else aliases them.
    let (info, uc) = unsafe { (&*info, &mut *(ctx as *mut libc::ucontext_t)) };
    if info.si_code != SYS_USER_DISPATCH {
        return;
    }
    // The kernel's sigset is the first word of libc's larger sigset_t.
    let mask = core::ptr::addr_of_mut!(uc.uc_sigmask).cast::<u64>();
    let g = &mut uc.uc_mcontext.gregs;
    let nr = *reg(g, libc::REG_RAX) as u64;
    let args = ARG_REGS.map(|r| g[r as usize] as u64);
    let mut path = [0u8; policy::PATH_MAX];
    let s = match policy::string_arg(nr) {
        Some(i) => copy_str(args[i], &mut path),
        None => Str::None,
    };
    let decision = policy::decide(nr, args, &FDS, OWN_PID.load(Relaxed), s);
    let counter = if matches!(decision, Decision::Redirect(_)) {
        &REDIRECTED
    } else {
        &LOCAL
    };
    counter.fetch_add(1, Relaxed);
    let result = match decision {
        Decision::Local => return resume_local(g, None),
        Decision::Fork { nr, args } => {
            // SAFETY: a fork-like call without shared memory: the child runs on its own copy
            // of this frame and of everything else.
            let ret = unsafe { sys(nr, args) };
            if ret == 0 {
                arm_child();
            }
            ret
        }
        Decision::CloneNewStack => {
            // The child starts on the new stack in the trampoline: leave it the program's
            // RSI (the stack) and the return address there, where its pop/ret find them.
            let (stack, rip) = (args[1], *reg(g, libc::REG_RIP) as u64);
            let top = stack.wrapping_sub(144);
            let mut frame = [0u8; 16];
            frame[..8].copy_from_slice(&stack.to_ne_bytes());
            frame[8..].copy_from_slice(&rip.to_ne_bytes());
            if !poke(top, &frame) {
                -i64::from(libc::EFAULT)
            } else {
                return resume_local(g, Some((1, top)));
            }
        }
        Decision::Exec { envp } => {
            let env = exec_env(args[envp]);
            return resume_local(g, env.map(|v| (envp, v)));
        }
        Decision::SigReturn => {
            // SAFETY: only the address of a gate symbol is taken.
            *reg(g, libc::REG_RIP) = addr(unsafe { &exterior_restorer }) as libc::greg_t;
            return;
        }
        Decision::SigProcMask => {
            // SAFETY: `mask` points into the live ucontext (see above).
            let current = unsafe { mask.read() };
            sigprocmask(args, current).map_or_else(
                |e| e,
                |new| {
                    // SAFETY: as above; the handler's return installs this mask.
                    unsafe { mask.write(new) };
                    0
                },
            )
        }
        Decision::SigAction => sigaction(nr, args),
        Decision::MaskArg { idx, indirect } => match mask_arg(args[idx], indirect) {
            Some(value) => return resume_local(g, Some((idx, value))),
            None => return resume_local(g, None),
        },
        Decision::LocalThenRelease { first, last } => {
            // SAFETY: the program's own dup2/dup3/close_range; these do not block.
            let ret = unsafe { sys(nr, args) };
            if ret >= 0 {
                for fd in first..=last.min(policy::FD_TABLE_SIZE as u32 - 1) {
                    if let Some(remote) = FDS.take(fd as i32) {
                        remote_close(remote);
                    }
                }
            }
            ret
        }
        Decision::Fail(e) => e,
        Decision::Pretend => 0,
        Decision::Refuse(e) => {
            Line::new()
                .push(b"exterior: ")
                .call(nr)
                .push(b" is refused: it would act on the SVM, not the GVM (docs/LIMITS.md): ")
                .errno(e.saturating_neg())
                .push(b"\n")
                .write_stderr();
            e
        }
        Decision::Redirect(r) => redirect(r, nr, args, &mut path),
    };
    *reg(g, libc::REG_RAX) = result as libc::greg_t;
}

/// rt_sigprocmask emulated on the mask the handler's return restores (a real one here would
/// be undone by that return). Returns the new mask or -errno.
fn sigprocmask(a: [u64; 6], current: u64) -> Result<u64, i64> {
    let (how, set, oset, size) = (a[0], a[1], a[2], a[3]);
    if size != 8 {
        return Err(-i64::from(libc::EINVAL));
    }
    let new = if set == 0 {
        current
    } else {
        let set = peek_u64(set).ok_or(-i64::from(libc::EFAULT))?;
        policy::sigprocmask(how, current, set).map_err(|e| -i64::from(e))?
    };
    if oset != 0 && !poke(oset, &current.to_ne_bytes()) {
        return Err(-i64::from(libc::EFAULT));
    }
    Ok(new)
}

/// rt_sigaction: SIGSYS is ours (the program is told it succeeded and that SIGSYS has the
/// default action); other signals' masks lose SIGSYS.
fn sigaction(nr: u64, a: [u64; 6]) -> i64 {
    let (sig, act, oact) = (a[0], a[1], a[2]);
    if sig == libc::SIGSYS as u64 {
        if a[3] != 8 {
            return -i64::from(libc::EINVAL);
        }
        if oact != 0 && !poke(oact, &[0u8; 32]) {
            return -i64::from(libc::EFAULT);
        }
        return 0;
    }
    let mut copy = KSigaction::default();
    let mut args = a;
    if act != 0 {
        let mut raw = [0u8; 32];
        if peek(act, &mut raw) < raw.len() {
            return -i64::from(libc::EFAULT);
        }
        let word =
            |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        copy.handler = word(0);
        copy.flags = word(1);
        copy.restorer = word(2);
        copy.mask = policy::sanitize_sigset(word(3));
        args[1] = &copy as *const KSigaction as u64;
    }
    // SAFETY: rt_sigaction with our sanitised copy (live until the call returns) and the
    // program's oact pointer, which the kernel checks.
    unsafe { sys(nr, args) }
}

/// A sanitised copy of the signal mask argument in a slot that outlives the handler; the new
/// argument value, or None to run the call unchanged (the kernel reports a bad pointer).
fn mask_arg(arg: u64, indirect: bool) -> Option<u64> {
    let slot = &MASK_SLOTS[NEXT_SLOT.fetch_add(1, Relaxed) % MASK_SLOTS.len()];
    let (set_ptr, size) = if indirect {
        (peek_u64(arg)?, peek_u64(arg.wrapping_add(8))?)
    } else {
        (arg, 0)
    };
    let set = peek_u64(set_ptr)?;
    slot[0].store(policy::sanitize_sigset(set), Relaxed);
    if !indirect {
        return Some(slot[0].as_ptr() as u64);
    }
    slot[1].store(slot[0].as_ptr() as u64, Relaxed);
    slot[2].store(size, Relaxed);
    Some(slot[1].as_ptr() as u64)
}

/// Buffers for the environment of an `execve` that hands placeholders on; they must outlive
/// the handler (the call runs from the trampoline).
struct ExecBufs {
    envp: UnsafeCell<[u64; EXEC_MAX_ENV + 2]>,
    var: UnsafeCell<[u8; 4096]>,
}

// SAFETY: only a diverted thread writes them, from its SIGSYS handler with every signal
// blocked, and only diverted threads exist in number one (dispatch is per thread and the
// shim arms only the thread that loads it, or a fork child's only thread).
unsafe impl Sync for ExecBufs {}

const EXEC_MAX_ENV: usize = 2048;
static EXEC: ExecBufs = ExecBufs {
    envp: UnsafeCell::new([0; EXEC_MAX_ENV + 2]),
    var: UnsafeCell::new([0; 4096]),
};

/// Placeholders that survive an exec (not close-on-exec), with their GVM fds.
fn survivors() -> impl Iterator<Item = (i32, i32)> {
    (0..policy::FD_TABLE_SIZE as i32).filter_map(|fd| {
        let remote = FDS.remote(fd as u64)?;
        // SAFETY: F_GETFD takes no pointer.
        let flags = unsafe { sys(nr::FCNTL, [fd as u64, libc::F_GETFD as u64, 0, 0, 0, 0]) };
        (flags >= 0 && flags & i64::from(libc::FD_CLOEXEC) == 0).then_some((fd, remote))
    })
}

/// The environment for an exec: the program's, without any stale [`policy::FDS_ENV`], plus
/// the surviving placeholders. None: nothing to hand on, or an environment the buffers cannot
/// hold (the new image then sees its placeholders as `/dev/null`).
fn exec_env(user_envp: u64) -> Option<u64> {
    let prefix = policy::FDS_ENV.as_bytes();
    // SAFETY: see `ExecBufs`: no other reference to the buffers exists while we fill them.
    let (envp, var) = unsafe { (&mut *EXEC.envp.get(), &mut *EXEC.var.get()) };
    var[..prefix.len()].copy_from_slice(prefix);
    var[prefix.len()] = b'=';
    let start = prefix.len() + 1;
    let end = var.len() - 1;
    let len = policy::format_fds_env(survivors(), &mut var[start..end]);
    if len == 0 {
        return None;
    }
    var[start + len] = 0;
    let (mut n, mut read) = (0, 0);
    let mut chunk = [0u8; 8 * 64];
    // A NULL envp is an empty environment. At most EXEC_MAX_ENV / 64 + 1 rounds.
    #[allow(clippy::while_immutable_condition)] // left by `break`/`return`, bounded by `read`
    'copy: while user_envp != 0 {
        if read >= EXEC_MAX_ENV {
            return None;
        }
        let got = peek(user_envp.wrapping_add(8 * read as u64), &mut chunk);
        if got < 8 {
            return None;
        }
        for word in chunk[..got - got % 8].chunks_exact(8) {
            read += 1;
            let ptr = u64::from_ne_bytes(word.try_into().unwrap_or_default());
            if ptr == 0 {
                break 'copy;
            }
            let mut head = [0u8; 32];
            let stale = peek_str(ptr, &mut head[..start]) == start && head[..start] == var[..start];
            if !stale {
                *envp.get_mut(n)? = ptr;
                n += 1;
            }
        }
    }
    if n >= EXEC_MAX_ENV {
        return None;
    }
    envp[n] = var.as_ptr() as u64;
    envp[n + 1] = 0;
    Some(envp.as_ptr() as u64)
}
