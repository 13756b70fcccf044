//! The client side of an instance's control socket: `exec`, `shell`, `console`, `stop`,
//! `info`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use svm_runtime::protocol::{Decoder, ExecRequest, ExitStatus, Frame, Kind};
use thiserror::Error;

use vmm::instance::runtime::{self, RuntimeDir, RuntimeError};
use vmm::terminal::RawModeGuard;

/// Ctrl-] ends a console session, as in telnet.
const CONSOLE_ESCAPE: u8 = 0x1d;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("instance {name}: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    #[error("instance {0} closed the connection before answering (did it stop?)")]
    Closed(String),
    #[error("instance {name}: bad data on the control socket: {detail}")]
    Protocol { name: String, detail: String },
    #[error("instance {name} did not stop within {secs} s")]
    StopTimeout { name: String, secs: u64 },
}

/// A connection to a running instance.
pub struct Connection {
    name: String,
    stream: UnixStream,
    decoder: Decoder,
}

impl Connection {
    pub fn open(dir: &RuntimeDir, name: &str) -> Result<Self, ClientError> {
        runtime::validate_name(name)?;
        if !dir.is_live(name) {
            dir.remove_leftovers(name);
            return Err(RuntimeError::NotRunning(name.to_string()).into());
        }
        let stream = UnixStream::connect(dir.socket(name)).map_err(|source| ClientError::Io {
            name: name.to_string(),
            source,
        })?;
        Ok(Self {
            name: name.to_string(),
            stream,
            decoder: Decoder::default(),
        })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Io {
            name: self.name.clone(),
            source,
        }
    }

    pub fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let bytes = frame.encode();
        self.stream
            .write_all(&bytes)
            .map_err(|source| ClientError::Io {
                name: self.name.clone(),
                source,
            })
    }

    /// The next frame; `None` when the instance closed the connection.
    pub fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(r) = self.decoder.next_frame() {
                return r.map(Some).map_err(|e| ClientError::Protocol {
                    name: self.name.clone(),
                    detail: e.to_string(),
                });
            }
            let n = self.stream.read(&mut buf).map_err(self.io())?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    fn try_clone_stream(&self) -> Result<UnixStream, ClientError> {
        self.stream.try_clone().map_err(self.io())
    }
}

/// `key=value` lines of an instance's `info` answer.
pub fn info(dir: &RuntimeDir, name: &str) -> Result<String, ClientError> {
    let mut conn = Connection::open(dir, name)?;
    conn.send(&Frame::new(Kind::Info, 1, Vec::new()))?;
    match conn.recv()? {
        Some(f) if f.kind == Kind::Info => Ok(String::from_utf8_lossy(&f.payload).into_owned()),
        Some(f) => Err(ClientError::Protocol {
            name: name.to_string(),
            detail: format!("expected info, got {:?}", f.kind),
        }),
        None => Err(ClientError::Closed(name.to_string())),
    }
}

/// `info`'s `key=value` lines as one JSON object with the same keys (sorted): values made
/// only of decimal digits that fit in a u64 become numbers, the rest strings.
pub fn info_json(info: &str) -> serde_json::Value {
    let fields = info
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let value = match value.parse::<u64>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => serde_json::Value::from(n),
                _ => serde_json::Value::from(value),
            };
            (key.to_string(), value)
        });
    serde_json::Value::Object(fields.collect())
}

/// Holds the GVM's vCPUs at a safe point and releases them; returns the report.
pub fn quiesce(
    dir: &RuntimeDir,
    name: &str,
    hold_ms: u64,
) -> Result<Result<String, String>, ClientError> {
    let mut conn = Connection::open(dir, name)?;
    let hold = if hold_ms == 0 {
        Vec::new()
    } else {
        hold_ms.to_string().into_bytes()
    };
    conn.send(&Frame::new(Kind::Quiesce, 1, hold))?;
    match conn.recv()? {
        Some(f) if f.kind == Kind::Info => Ok(Ok(String::from_utf8_lossy(&f.payload).into_owned())),
        Some(f) if f.kind == Kind::Error => {
            Ok(Err(String::from_utf8_lossy(&f.payload).into_owned()))
        }
        Some(f) => Err(ClientError::Protocol {
            name: name.to_string(),
            detail: format!("expected a quiesce report, got {:?}", f.kind),
        }),
        None => Err(ClientError::Closed(name.to_string())),
    }
}

/// Asks the instance to stop and waits until its process is gone.
pub fn stop(dir: &RuntimeDir, name: &str, timeout: Duration) -> Result<(), ClientError> {
    let pid = dir.pid(name);
    let mut conn = Connection::open(dir, name)?;
    conn.send(&Frame::new(Kind::Stop, 1, Vec::new()))?;
    // The answer, then the close; either may be cut short by the exit.
    while let Ok(Some(_)) = conn.recv() {}
    let deadline = Instant::now() + timeout;
    while dir.is_live(name) || pid.is_some_and(process_exists) {
        if Instant::now() > deadline {
            return Err(ClientError::StopTimeout {
                name: name.to_string(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Copies this process's stdin to the instance as frames of `kind` (then `eof`, if any),
/// on a thread; `escape` ends the copy when typed.
fn pump_stdin(mut stream: UnixStream, id: u32, kind: Kind, eof: Option<Kind>, escape: Option<u8>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let stdin = std::io::stdin();
        let mut stdin = stdin.lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = &buf[..n];
                    if let Some(pos) = escape.and_then(|e| data.iter().position(|b| *b == e)) {
                        let _ = stream.write_all(&Frame::new(kind, id, &data[..pos]).encode());
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if stream
                        .write_all(&Frame::new(kind, id, data).encode())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if let Some(eof) = eof {
            let _ = stream.write_all(&Frame::new(eof, id, Vec::new()).encode());
        }
    });
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data, filled by TIOCGWINSZ for a terminal.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize to the valid pointer.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Runs `argv` in the instance's SVM; returns its exit status the way a shell reports it.
/// With `tty` the command gets a terminal and this terminal goes raw (for `shell`).
pub fn exec(
    dir: &RuntimeDir,
    name: &str,
    argv: Vec<String>,
    tty: bool,
    local: bool,
) -> Result<i32, ClientError> {
    let mut conn = Connection::open(dir, name)?;
    const ID: u32 = 1;
    conn.send(&Frame::new(
        Kind::Exec,
        ID,
        ExecRequest { tty, local, argv }.encode(),
    ))?;
    let _raw = if tty {
        RawModeGuard::enable(libc::STDIN_FILENO)
    } else {
        None
    };
    if tty {
        if let Some((rows, cols)) = terminal_size() {
            let mut p = rows.to_le_bytes().to_vec();
            p.extend_from_slice(&cols.to_le_bytes());
            conn.send(&Frame::new(Kind::Resize, ID, p))?;
        }
    }
    if tty || !stdin_is_tty() {
        // Forward input: the user's keystrokes, or piped data.
        pump_stdin(
            conn.try_clone_stream()?,
            ID,
            Kind::Stdin,
            Some(Kind::StdinEof),
            None,
        );
    } else {
        // An interactive terminal but no tty requested: the command gets no input.
        conn.send(&Frame::new(Kind::StdinEof, ID, Vec::new()))?;
    }
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let Some(frame) = conn.recv()? else {
            return Err(ClientError::Closed(name.to_string()));
        };
        match frame.kind {
            Kind::Stdout => {
                let _ = stdout.write_all(&frame.payload);
                let _ = stdout.flush();
            }
            Kind::Stderr => {
                let _ = stderr.write_all(&frame.payload);
            }
            Kind::Error => {
                let _ = writeln!(
                    stderr,
                    "exterior-vmm: {}",
                    String::from_utf8_lossy(&frame.payload)
                );
            }
            Kind::Exit => {
                let status =
                    ExitStatus::decode(&frame.payload).ok_or_else(|| ClientError::Protocol {
                        name: name.to_string(),
                        detail: "malformed exit status".into(),
                    })?;
                return Ok(status.shell_code());
            }
            _ => {}
        }
    }
}

/// Attaches to the GVM's (or SVM's) serial console. Ctrl-] detaches. With input that is not
/// a terminal, the session ends once the console has been silent for `idle` after that
/// input was sent.
pub fn console(dir: &RuntimeDir, name: &str, svm: bool, idle: Duration) -> Result<(), ClientError> {
    let mut conn = Connection::open(dir, name)?;
    let which: &[u8] = if svm { b"svm" } else { b"gvm" };
    conn.send(&Frame::new(Kind::Console, 0, which))?;
    let tty = stdin_is_tty();
    let _raw = if tty {
        eprintln!(
            "exterior-vmm: attached to {name}'s {} console; Ctrl-] detaches",
            if svm { "SVM" } else { "GVM" }
        );
        RawModeGuard::enable(libc::STDIN_FILENO)
    } else {
        None
    };
    if tty {
        pump_stdin(
            conn.try_clone_stream()?,
            0,
            Kind::ConsoleData,
            None,
            Some(CONSOLE_ESCAPE),
        );
    } else {
        // Piped input: send it all, then print output for a moment longer and leave.
        let mut input = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut input);
        if !input.is_empty() {
            conn.send(&Frame::new(Kind::ConsoleData, 0, input))?;
        }
        conn.stream
            .set_read_timeout(Some(idle))
            .map_err(|source| ClientError::Io {
                name: name.to_string(),
                source,
            })?;
    }
    let mut stdout = std::io::stdout();
    loop {
        match conn.recv() {
            Ok(Some(f)) if f.kind == Kind::ConsoleData => {
                let _ = stdout.write_all(&f.payload);
                let _ = stdout.flush();
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(ClientError::Io { source, .. })
                if !tty
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(())
            }
            Err(e) => {
                // Ctrl-] shut the socket down: that is a normal detach.
                if tty {
                    return Ok(());
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_becomes_one_json_object_with_numbers_and_strings() {
        let json = info_json(
            "name=web\nredirect_calls=42\nredirect_last_error=the call \"x\" = y\n\
             odd line without a value\nredirect_held_us=007\nbig=99999999999999999999\n\
             signed=-1\n",
        );
        assert_eq!(
            json.to_string(),
            r#"{"big":"99999999999999999999","name":"web","redirect_calls":42,"redirect_held_us":7,"redirect_last_error":"the call \"x\" = y","signed":"-1"}"#
        );
    }
}
