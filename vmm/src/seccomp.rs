//! Seccomp filters per thread kind, compiled with seccompiler and installed before guest
//! code runs. A blocked system call raises SIGSYS; the handler names it and exits, so a
//! gap in a list shows up as a clear message rather than a silent kill.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit status when a thread made a system call its filter does not allow.
pub const SECCOMP_EXIT_CODE: i32 = 159;

/// The kinds of thread in a running VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates port I/O.
    Vcpu,
    /// The event loop: console input, exit events, teardown.
    EventLoop,
    /// A virtio-blk device's I/O thread: waits on its queue's eventfd, moves data between
    /// the image and guest memory, flushes.
    BlockIo,
    /// A virtio-net device's I/O thread: waits in epoll on its tap and queues, moves
    /// frames between the tap and guest memory.
    NetIo,
}

/// Calls every thread may make: memory management for the allocator, locks, signals,
/// time, console output, and exiting.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The vCPU thread adds ioctl (KVM_RUN and register access) and close (its own vCPU fd
/// when it stops).
const VCPU: &[i64] = &[libc::SYS_ioctl, libc::SYS_close];

/// The event loop adds epoll, closing descriptors at teardown, terminal control (ioctl),
/// fcntl and fsync for the console file, and for instances: accepting and serving control
/// socket clients and removing the socket and lock files when the instance stops.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_flock,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The block I/O thread adds seeking and flushing its image (read and write are common).
/// No ioctl, no open: the image was opened and locked before the thread started.
const BLOCK_IO: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// The network I/O thread adds epoll (read and write of the tap are common).
const NET_IO: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// System calls allowed for `kind`.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let extra = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::EventLoop => EVENT_LOOP,
        ThreadKind::BlockIo => BLOCK_IO,
        ThreadKind::NetIo => NET_IO,
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// Compiles the filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// Compiles and installs the filter for `kind` on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), String> {
    let program =
        filter(kind).map_err(|e| format!("compiling the {kind:?} seccomp filter: {e}"))?;
    seccompiler::apply_filter(&program)
        .map_err(|e| format!("installing the {kind:?} seccomp filter: {e}"))
}

/// Installs the SIGSYS handler that reports a blocked system call.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: `sigaction` is plain data; zeroed is a valid "no flags, empty mask" value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is fully initialised and `on_sigsys` has the signature SA_SIGINFO
    // requires; the previous action is not needed (null).
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS, the kernel's siginfo holds the call address at offset 16 and the system
    // call number (int) at offset 24.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; offset 24 is
        // inside the 128-byte structure and suitably aligned for an i32.
        unsafe { *(info as *const u8).add(24).cast::<i32>() }
    };
    // Only async-signal-safe work here: format into a stack buffer, write(2), _exit(2).
    let mut msg = *b"exterior-vmm: seccomp blocked system call           \n";
    let mut n = nr.unsigned_abs();
    let mut pos = msg.len() - 2;
    loop {
        msg[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || pos == 42 {
            break;
        }
        pos -= 1;
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_thread_kind() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::BlockIo,
            ThreadKind::NetIo,
        ] {
            assert!(!filter(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn vcpu_threads_cannot_open_files_or_spawn() {
        let vcpu = allowed(ThreadKind::Vcpu);
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_socket,
        ] {
            assert!(!vcpu.contains(&forbidden));
        }
        assert!(vcpu.contains(&libc::SYS_ioctl));
        assert!(!allowed(ThreadKind::EventLoop).contains(&libc::SYS_openat));
    }

    #[test]
    fn block_io_threads_only_read_write_seek_and_flush() {
        let blk = allowed(ThreadKind::BlockIo);
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_socket,
            libc::SYS_ioctl,
            libc::SYS_ftruncate,
            libc::SYS_unlink,
        ] {
            assert!(!blk.contains(&forbidden), "{forbidden}");
        }
        for needed in [libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fdatasync] {
            assert!(blk.contains(&needed), "{needed}");
        }
        let net = allowed(ThreadKind::NetIo);
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_ioctl,
            libc::SYS_socket,
            libc::SYS_execve,
        ] {
            assert!(!net.contains(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn a_blocked_call_is_reported_and_exits() {
        // Run in a child process: the filter cannot be removed once installed.
        // SAFETY: fork in a test process; the child only calls async-signal-safe functions
        // and functions that do not take locks held by other threads (seccomp install and
        // a raw syscall), then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                install_sigsys_handler().ok()?;
                install(ThreadKind::Vcpu).ok()?;
                // SAFETY: getppid takes no arguments and is blocked by the vCPU filter.
                unsafe { libc::syscall(libc::SYS_getppid) };
                Some(0)
            })()
            .unwrap_or(1);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child we just forked; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_CODE);
    }
}
