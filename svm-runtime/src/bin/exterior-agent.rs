//! exterior-agent: the SVM side of `exterior-vmm exec` and `shell`.
//!
//! Started by the SVM's /init (which stays PID 1 and falls back to a console shell if the
//! agent exits). It speaks the frame protocol of
//! `svm_runtime::protocol` on a serial line (default /dev/ttyS1, which the VMM wires to
//! the instance's control socket): it runs each requested command — on pipes, or on a
//! pseudo-terminal for interactive shells — streams stdout/stderr back, and reports the
//! exit status. It reaps every child it can, so it also works as PID 1.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use svm_runtime::protocol::{
    chunks, profile_symbol_lines, Decoder, ExecRequest, ExitStatus, Frame, Kind,
};

const DEFAULT_LINE: &str = "/dev/ttyS1";
const READ_CHUNK: usize = 4096;
/// The redirect shim, preloaded into every command not run with `--local`.
const SHIM: &str = "/usr/lib/exterior/libexterior_shim.so";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Session {
    pid: i32,
    /// Where stdin frames go: the pipe, or the pty master.
    input: Option<File>,
    /// Output sources still open: (file, frame kind).
    outputs: Vec<(File, Kind)>,
    pty: bool,
    status: Option<ExitStatus>,
}

fn main() {
    let line = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_LINE.to_string());
    let link = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&line)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("exterior-agent: cannot open {line}: {e}");
            std::process::exit(1);
        }
    };
    set_raw(link.as_raw_fd());
    let mut agent = Agent {
        link,
        sessions: HashMap::new(),
    };
    raise_pids();
    // The redirect engine's symbols ride on Ready: reading kallsyms is the slow part of
    // start-up, and the VMM must not redirect anything before it has them.
    let symbols = std::fs::read_to_string("/proc/kallsyms")
        .map(|text| profile_symbol_lines(&text))
        .unwrap_or_else(|e| {
            eprintln!("exterior-agent: cannot read /proc/kallsyms: {e}");
            String::new()
        });
    agent.send(&Frame::new(Kind::Ready, 0, symbols.into_bytes()));
    eprintln!("exterior-agent: serving on {line}");
    agent.serve();
}

/// Programs in the SVM get pids far above any the GVM uses, so `/proc/<own pid>` (which
/// the shim keeps local, as `/proc/self`) never names a GVM process. Linux's largest
/// pid_max on 64-bit is 4194304; the GVM's default is 32768 (or 1024 per possible CPU).
const FIRST_SVM_PID: u32 = 4_000_000;

fn raise_pids() {
    let write = |path: &str, value: String| {
        if let Err(e) = std::fs::write(path, value) {
            eprintln!("exterior-agent: cannot write {path}: {e}");
        }
    };
    write("/proc/sys/kernel/pid_max", "4194304".into());
    write("/proc/sys/kernel/ns_last_pid", FIRST_SVM_PID.to_string());
}

/// Raw mode: no echo, no line editing, no output post-processing — the line carries frames.
fn set_raw(fd: RawFd) {
    // SAFETY: termios is plain data; zeroed is a valid starting value for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid out pointer; on failure (not a tty) we keep going: a pipe or
    // socket carries frames just as well.
    if unsafe { libc::tcgetattr(fd, &mut t) } == 0 {
        // SAFETY: cfmakeraw edits only `t`; tcsetattr reads a valid termios.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

struct Agent {
    link: File,
    sessions: HashMap<u32, Session>,
}

impl Agent {
    fn send(&mut self, frame: &Frame) {
        // Nothing to do about a failed write to our only link but keep serving.
        let _ = self.link.write_all(&frame.encode());
    }

    fn serve(&mut self) {
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // Poll set: the link, then every open output of every session.
            let mut fds = vec![libc::pollfd {
                fd: self.link.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut owners = Vec::new();
            for (id, s) in &self.sessions {
                for (i, (f, _)) in s.outputs.iter().enumerate() {
                    fds.push(libc::pollfd {
                        fd: f.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    owners.push((*id, i));
                }
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
            if n > 0 {
                if fds[0].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                    match self.link.read(&mut buf) {
                        Ok(0) | Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                        Ok(k) => decoder.push(&buf[..k]),
                    }
                    while let Some(result) = decoder.next_frame() {
                        match result {
                            Ok(frame) => self.handle(frame),
                            Err(e) => eprintln!("exterior-agent: bad frame: {e}"),
                        }
                    }
                }
                // Read outputs; remember which ones closed.
                let mut closed = Vec::new();
                for (pfd, (id, i)) in fds[1..].iter().zip(owners) {
                    if pfd.revents == 0 {
                        continue;
                    }
                    let Some(session) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    let (file, kind) = &mut session.outputs[i];
                    let kind = *kind;
                    match file.read(&mut buf) {
                        Ok(0) | Err(_) => closed.push((id, i)),
                        Ok(k) => {
                            let data = buf[..k].to_vec();
                            for f in chunks(kind, id, &data, READ_CHUNK) {
                                self.send(&f);
                            }
                        }
                    }
                }
                // Remove closed outputs, highest index first so indices stay valid.
                closed.sort_by(|a, b| b.cmp(a));
                for (id, i) in closed {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.outputs.remove(i);
                    }
                }
            }
            self.reap();
            self.finish_sessions();
        }
    }

    fn handle(&mut self, frame: Frame) {
        let id = frame.id;
        match frame.kind {
            Kind::Exec => match ExecRequest::decode(&frame.payload) {
                Some(req) => self.spawn(id, req),
                None => self.fail(id, "malformed exec request"),
            },
            Kind::Stdin => {
                if let Some(input) = self.sessions.get_mut(&id).and_then(|s| s.input.as_mut()) {
                    let _ = input.write_all(&frame.payload);
                }
            }
            Kind::StdinEof => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    if s.pty {
                        // End of input on a terminal is ^D at the start of a line.
                        if let Some(input) = s.input.as_mut() {
                            let _ = input.write_all(b"\x04");
                        }
                    } else {
                        s.input = None;
                    }
                }
            }
            Kind::Signal => {
                if let (Some(s), Some(&sig)) = (self.sessions.get(&id), frame.payload.first()) {
                    // A pty session's command leads its own process group: signal all of it.
                    let target = if s.pty { -s.pid } else { s.pid };
                    // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
                    unsafe { libc::kill(target, i32::from(sig)) };
                }
            }
            Kind::Resize => {
                if let (Some(s), Some(p)) = (self.sessions.get(&id), frame.payload.get(..4)) {
                    if let (true, Some(input)) = (s.pty, s.input.as_ref()) {
                        let ws = libc::winsize {
                            ws_row: u16::from_le_bytes([p[0], p[1]]),
                            ws_col: u16::from_le_bytes([p[2], p[3]]),
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
                        unsafe { libc::ioctl(input.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
            }
            other => eprintln!("exterior-agent: ignoring {other:?} frame"),
        }
    }

    fn fail(&mut self, id: u32, message: &str) {
        self.send(&Frame::new(Kind::Error, id, message.as_bytes().to_vec()));
        self.send(&Frame::new(Kind::Exit, id, ExitStatus::Code(127).encode()));
    }

    fn spawn(&mut self, id: u32, req: ExecRequest) {
        if self.sessions.contains_key(&id) {
            return self.fail(id, "session id already in use");
        }
        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("TERM", "linux")
            .current_dir("/");
        if !req.local {
            // Without the shim the command would show the SVM's own state as if it were
            // the GVM's: refuse rather than run it.
            if !std::path::Path::new(SHIM).is_file() {
                return self.fail(id, &format!("the redirect shim {SHIM} is missing"));
            }
            cmd.env("LD_PRELOAD", SHIM);
        }
        let result = if req.tty {
            spawn_on_pty(&mut cmd)
        } else {
            spawn_on_pipes(&mut cmd)
        };
        match result {
            Ok(session) => {
                self.sessions.insert(id, session);
            }
            Err(e) => self.fail(id, &format!("{}: {e}", req.argv[0])),
        }
    }

    /// Collects exit statuses of our children, and reaps orphans (we may be PID 1).
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a valid local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let exit = if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            };
            if let Some(s) = self.sessions.values_mut().find(|s| s.pid == pid) {
                s.status = Some(exit);
            }
        }
    }

    /// Reports sessions whose command exited and whose output has drained. A pty's master
    /// reports EIO once the last slave holder is gone, so its output also ends.
    fn finish_sessions(&mut self) {
        let done: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.status.is_some() && (s.outputs.is_empty() || s.pty))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(mut s) = self.sessions.remove(&id) {
                // Drain what a pty still holds.
                if s.pty {
                    let mut buf = vec![0u8; READ_CHUNK];
                    for (f, kind) in &mut s.outputs {
                        set_nonblocking(f.as_raw_fd());
                        while let Ok(k @ 1..) = f.read(&mut buf) {
                            let data = buf[..k].to_vec();
                            for fr in chunks(*kind, id, &data, READ_CHUNK) {
                                let _ = self.link.write_all(&fr.encode());
                            }
                        }
                    }
                }
                if let Some(status) = s.status {
                    self.send(&Frame::new(Kind::Exit, id, status.encode()));
                }
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own; flags are read then written back with O_NONBLOCK.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

fn spawn_on_pipes(cmd: &mut Command) -> std::io::Result<Session> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let file = |fd: Option<OwnedFd>| fd.map(File::from);
    let input = file(child.stdin.take().map(OwnedFd::from));
    let mut outputs = Vec::new();
    if let Some(f) = file(child.stdout.take().map(OwnedFd::from)) {
        outputs.push((f, Kind::Stdout));
    }
    if let Some(f) = file(child.stderr.take().map(OwnedFd::from)) {
        outputs.push((f, Kind::Stderr));
    }
    Ok(Session {
        pid: child.id() as i32,
        input,
        outputs,
        pty: false,
        status: None,
    })
}

fn spawn_on_pty(cmd: &mut Command) -> std::io::Result<Session> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into valid locals; name, termios and winsize
    // may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let stdin = slave.try_clone()?;
    let stdout = slave.try_clone()?;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls: setsid, then make stdin (the pty slave) the controlling tty.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(slave))
        .spawn()?;
    let output = master.try_clone()?;
    Ok(Session {
        pid: child.id() as i32,
        input: Some(master),
        outputs: vec![(output, Kind::Stdout)],
        pty: true,
        status: None,
    })
}
