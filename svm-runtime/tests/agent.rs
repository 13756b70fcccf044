//! The agent, driven over a pseudo-terminal standing in for the SVM's serial line.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use svm_runtime::protocol::{Decoder, ExecRequest, ExitStatus, Frame, Kind};

struct Line {
    master: File,
    /// Held open while the line lives: until the agent opens the terminal by name, a
    /// master with no slave open reads EIO.
    _slave: File,
    agent: Child,
    decoder: Decoder,
}

impl Line {
    fn start() -> Self {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills two valid locals; the optional arguments may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // Close-on-exec, both: the tests run in parallel, and an agent another test spawns
        // meanwhile must not inherit this line (an agent holding another test's terminal
        // made one test in six fail: a frame lost, or none within the deadline).
        for fd in [master, slave] {
            // SAFETY: fcntl on a descriptor openpty just returned; FD_CLOEXEC is a valid
            // descriptor flag.
            let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            assert_eq!(rc, 0);
        }
        // SAFETY: ptsname returns a pointer to a static buffer valid until the next call.
        let name = unsafe { std::ffi::CStr::from_ptr(libc::ptsname(master)) }
            .to_string_lossy()
            .into_owned();
        let agent = Command::new(env!("CARGO_BIN_EXE_exterior-agent"))
            .arg(&name)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // SAFETY: master and slave were created by openpty and are owned only here.
        let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        let mut line = Line {
            master,
            _slave: slave,
            agent,
            decoder: Decoder::default(),
        };
        let ready = line.next_frame();
        assert_eq!(ready.kind, Kind::Ready);
        line
    }

    fn send(&mut self, f: Frame) {
        self.master.write_all(&f.encode()).unwrap();
    }

    fn next_frame(&mut self) -> Frame {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(r) = self.decoder.next_frame() {
                return r.unwrap();
            }
            assert!(Instant::now() < deadline, "no frame from the agent");
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 200) } > 0 {
                let n = self.master.read(&mut buf).unwrap();
                self.decoder.push(&buf[..n]);
            }
        }
    }

    /// Runs a command; returns (stdout, stderr, status).
    fn exec(&mut self, id: u32, tty: bool, argv: &[&str]) -> (String, String, ExitStatus) {
        let req = ExecRequest {
            local: true,
            tty,
            argv: argv.iter().map(|s| s.to_string()).collect(),
        };
        self.send(Frame::new(Kind::Exec, id, req.encode()));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f = self.next_frame();
            assert_eq!(f.id, id);
            match f.kind {
                Kind::Stdout => out.extend(f.payload),
                Kind::Stderr | Kind::Error => err.extend(f.payload),
                Kind::Exit => {
                    return (
                        String::from_utf8_lossy(&out).into_owned(),
                        String::from_utf8_lossy(&err).into_owned(),
                        ExitStatus::decode(&f.payload).unwrap(),
                    )
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

#[test]
fn commands_stream_output_and_status() {
    let mut line = Line::start();
    let (out, _, status) = line.exec(1, false, &["echo", "hello", "agent"]);
    assert_eq!(out, "hello agent\n");
    assert_eq!(status, ExitStatus::Code(0));
    let (_, _, status) = line.exec(2, false, &["false"]);
    assert_eq!(status, ExitStatus::Code(1));
    let (out, err, status) = line.exec(3, false, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(status, ExitStatus::Code(3));
}

#[test]
fn a_missing_program_is_an_error_with_status_127() {
    let mut line = Line::start();
    let (_, err, status) = line.exec(9, false, &["/nonexistent/tool"]);
    assert!(err.contains("/nonexistent/tool"), "{err}");
    assert_eq!(status, ExitStatus::Code(127));
}

#[test]
fn stdin_reaches_the_command_and_signals_kill_it() {
    let mut line = Line::start();
    let req = ExecRequest {
        local: true,
        tty: false,
        argv: vec!["cat".into()],
    };
    line.send(Frame::new(Kind::Exec, 5, req.encode()));
    line.send(Frame::new(Kind::Stdin, 5, b"piped\n".to_vec()));
    line.send(Frame::new(Kind::StdinEof, 5, Vec::new()));
    let f = line.next_frame();
    assert_eq!(
        (f.kind, f.payload.as_slice()),
        (Kind::Stdout, &b"piped\n"[..])
    );
    assert_eq!(line.next_frame().kind, Kind::Exit);

    let req = ExecRequest {
        local: true,
        tty: false,
        argv: vec!["sleep".into(), "30".into()],
    };
    line.send(Frame::new(Kind::Exec, 6, req.encode()));
    line.send(Frame::new(Kind::Signal, 6, vec![9]));
    let f = line.next_frame();
    assert_eq!(f.kind, Kind::Exit);
    assert_eq!(ExitStatus::decode(&f.payload), Some(ExitStatus::Signal(9)));
}

#[test]
fn tty_sessions_run_on_a_terminal() {
    let mut line = Line::start();
    let (out, _, status) = line.exec(
        7,
        true,
        &["sh", "-c", "test -t 0 && test -t 1 && echo on-a-tty"],
    );
    assert!(out.contains("on-a-tty"), "{out:?}");
    assert_eq!(status, ExitStatus::Code(0));
}
