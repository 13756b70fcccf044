//! Frames: `MAGIC, kind: u8, id: u32 LE, len: u32 LE, payload[len]`.
//!
//! The same format runs over the SVM's serial line (agent ⇄ VMM) and over an instance's
//! Unix control socket (client ⇄ VMM). The decoder treats its input as hostile: lengths are
//! bounded, unknown kinds are errors for that frame only, and after garbage it resynchronises
//! on the next magic byte.

use thiserror::Error;

/// The byte every frame starts with; the decoder resynchronises on it.
pub const MAGIC: u8 = 0xe5;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 10;
/// Largest payload accepted; bigger frames are refused, not buffered.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What a frame means. Directions: C = client, V = VMM, A = agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A→V: the agent is up (payload: [`profile_symbol_lines`] of its /proc/kallsyms).
    Ready = 1,
    /// C→V→A: run a command ([`ExecRequest`]).
    Exec = 2,
    /// C→V→A: bytes for the command's stdin.
    Stdin = 3,
    /// C→V→A: stdin is closed.
    StdinEof = 4,
    /// C→V→A: deliver a signal (payload: one byte, the signal number).
    Signal = 5,
    /// C→V→A: terminal size (payload: rows u16 LE, cols u16 LE).
    Resize = 6,
    /// A→V→C: command output.
    Stdout = 7,
    /// A→V→C: command error output.
    Stderr = 8,
    /// A→V→C: the command ended ([`ExitStatus`]).
    Exit = 9,
    /// Any direction: a request failed (payload: UTF-8 message).
    Error = 10,
    /// C→V: stop the instance.
    Stop = 11,
    /// C→V: describe the instance; V→C: the answer (payload: `key=value` lines).
    Info = 12,
    /// C→V: attach to a console (payload: b"gvm" or b"svm").
    Console = 13,
    /// V→C: console output; C→V: console input.
    ConsoleData = 14,
    /// C→V: hold the GVM's vCPUs at a safe point and release them (a diagnostic of the
    /// redirect's first step); V→C answers with Info, or Error when the guest is busy.
    Quiesce = 15,
}

impl Kind {
    /// The kind with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Ready,
            2 => Exec,
            3 => Stdin,
            4 => StdinEof,
            5 => Signal,
            6 => Resize,
            7 => Stdout,
            8 => Stderr,
            9 => Exit,
            10 => Error,
            11 => Stop,
            12 => Info,
            13 => Console,
            14 => ConsoleData,
            15 => Quiesce,
            _ => return None,
        })
    }
}

/// Kernel symbols the agent reports in its `Ready` frame: the lines of the SVM's
/// `/proc/kallsyms` that name these (the SVM runs the GVM's kernel with `nokaslr`, so its
/// addresses are the image's link addresses; the engine moves them by a GVM's KASLR slide).
/// The VMM's redirect engine builds its kernel profile from them plus the image's BTF; an
/// SVM that lies here can only break its own redirected calls.
pub const PROFILE_SYMBOLS: &[&str] = &[
    "_stext",
    "_etext",
    "__start_rodata",
    "__end_rodata",
    "init_task",
    "init_top_pgt",
    "__per_cpu_offset",
    "entry_SYSCALL_64",
    "idt_table",
    "__schedule",
    "current_task",
    "cpu_current_top_of_stack",
    "gdt_page",
    "cpu_tss_rw",
    // Traps (redirect/src/traps.rs) and the module list, to name a module.
    "spurious_kernel_fault",
    "page_fault_oops",
    "die",
    "die_addr",
    "oops_begin",
    "panic",
    "modules",
    // The executor allocates the shadow task from the GVM's page allocator.
    "__get_free_pages",
];

/// The `Ready` payload: the `PROFILE_SYMBOLS` lines of a kallsyms text, in its order.
pub fn profile_symbol_lines(kallsyms: &str) -> String {
    let mut out = String::new();
    for line in kallsyms.lines() {
        let mut fields = line.split_ascii_whitespace();
        if let (Some(_), Some(_), Some(name), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        {
            if PROFILE_SYMBOLS.contains(&name) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// One decoded (or to-be-encoded) frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame means.
    pub kind: Kind,
    /// The request or session it belongs to. Ids are per link: the VMM maps each client's
    /// ids to session ids of its own towards the agent.
    pub id: u32,
    /// Its payload; the layout depends on `kind`.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` for `id` carrying `payload`.
    pub fn new(kind: Kind, id: u32, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            kind,
            id,
            payload: payload.into(),
        }
    }

    /// Encodes the frame. Payloads longer than [`MAX_PAYLOAD`] must be split by the caller
    /// (see [`chunks`]); they are truncated here rather than producing an undecodable frame.
    pub fn encode(&self) -> Vec<u8> {
        let payload = &self.payload[..self.payload.len().min(MAX_PAYLOAD)];
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(MAGIC);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }
}

/// Splits `data` into frames of at most `max` payload bytes each.
pub fn chunks(kind: Kind, id: u32, data: &[u8], max: usize) -> impl Iterator<Item = Frame> + '_ {
    data.chunks(max.clamp(1, MAX_PAYLOAD))
        .map(move |c| Frame::new(kind, id, c))
}

/// A bad stretch of input; the decoder has already skipped it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A header declares a payload over [`MAX_PAYLOAD`].
    #[error("frame of kind {kind} declares {len} payload bytes (limit {MAX_PAYLOAD})")]
    TooLong {
        /// The header's kind byte.
        kind: u8,
        /// The declared payload length.
        len: u32,
    },
    /// A complete frame of a kind this build does not know (its kind byte).
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Bytes before the next [`MAGIC`] (how many).
    #[error("{0} bytes of garbage skipped before a frame")]
    Garbage(usize),
}

/// Incremental decoder: push bytes as they arrive, pop frames as they complete.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, an error for a bad one (already skipped), or `None` when
    /// more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, DecodeError>> {
        if self.buf.is_empty() {
            return None;
        }
        if self.buf[0] != MAGIC {
            let skip = self
                .buf
                .iter()
                .position(|b| *b == MAGIC)
                .unwrap_or(self.buf.len());
            self.buf.drain(..skip);
            return Some(Err(DecodeError::Garbage(skip)));
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let kind_byte = self.buf[1];
        let id = u32::from_le_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]);
        let len = u32::from_le_bytes([self.buf[6], self.buf[7], self.buf[8], self.buf[9]]);
        if len as usize > MAX_PAYLOAD {
            // Drop the magic so the next call resynchronises past this header.
            self.buf.drain(..1);
            return Some(Err(DecodeError::TooLong {
                kind: kind_byte,
                len,
            }));
        }
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return None;
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Some(match Kind::from_u8(kind_byte) {
            Some(kind) => Ok(Frame { kind, id, payload }),
            None => Err(DecodeError::UnknownKind(kind_byte)),
        })
    }
}

/// The payload of an [`Kind::Exec`] frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// Run on a pseudo-terminal (interactive shell) instead of pipes.
    pub tty: bool,
    /// Run without the redirect shim: the command sees the SVM's own kernel.
    pub local: bool,
    /// The command and its arguments (at least one).
    pub argv: Vec<String>,
}

const FLAG_TTY: u8 = 1;
const FLAG_LOCAL: u8 = 2;

const MAX_ARGS: usize = 4096;

impl ExecRequest {
    /// The payload: flags u8, argument count u16 LE, then each argument as length u16 LE
    /// and bytes (at most 4096 arguments of 65535 bytes; more is cut off).
    pub fn encode(&self) -> Vec<u8> {
        let flags = if self.tty { FLAG_TTY } else { 0 } | if self.local { FLAG_LOCAL } else { 0 };
        let mut out = vec![flags];
        out.extend_from_slice(&(self.argv.len().min(MAX_ARGS) as u16).to_le_bytes());
        for arg in self.argv.iter().take(MAX_ARGS) {
            let bytes = &arg.as_bytes()[..arg.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Parses a payload; `None` unless it is well formed, complete and has a command.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let (&flags, rest) = payload.split_first()?;
        let count = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        let mut rest = rest.get(2..)?;
        let mut argv = Vec::with_capacity(count.min(MAX_ARGS));
        for _ in 0..count {
            let len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let arg = rest.get(2..2 + len)?;
            argv.push(String::from_utf8(arg.to_vec()).ok()?);
            rest = rest.get(2 + len..)?;
        }
        if !rest.is_empty() || argv.is_empty() {
            return None;
        }
        Some(Self {
            tty: flags & FLAG_TTY != 0,
            local: flags & FLAG_LOCAL != 0,
            argv,
        })
    }
}

/// The payload of an [`Kind::Exit`] frame: the exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The command exited with this code.
    Code(i32),
    /// A signal (this number) killed the command.
    Signal(i32),
}

impl ExitStatus {
    /// The payload: tag u8 (0 code, 1 signal), then the value as i32 LE.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, value) = match self {
            ExitStatus::Code(c) => (0u8, *c),
            ExitStatus::Signal(s) => (1u8, *s),
        };
        let mut out = vec![tag];
        out.extend_from_slice(&value.to_le_bytes());
        out
    }

    /// Parses a payload; `None` for a short payload or an unknown tag.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let value = i32::from_le_bytes(payload.get(1..5)?.try_into().ok()?);
        match payload.first()? {
            0 => Some(ExitStatus::Code(value)),
            1 => Some(ExitStatus::Signal(value)),
            _ => None,
        }
    }

    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Code(c) => *c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lines_keep_only_the_named_symbols() {
        let text = "ffffffff81000000 T _stext\nffffffff81000010 T _stext_not\n\
                    000000000001fb80 A current_task\nffffffff81e00000 T _etext [mod]\n\
                    garbage\nffffffff82000000 D init_task\n";
        assert_eq!(
            profile_symbol_lines(text),
            "ffffffff81000000 T _stext\n000000000001fb80 A current_task\nffffffff82000000 D init_task\n"
        );
    }

    #[test]
    fn frames_round_trip_through_a_byte_stream() {
        let frames = vec![
            Frame::new(Kind::Ready, 0, vec![]),
            Frame::new(Kind::Stdout, 7, b"hello\n".to_vec()),
            Frame::new(Kind::Exit, 7, ExitStatus::Code(1).encode()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        let mut d = Decoder::default();
        let mut out = Vec::new();
        // Feed one byte at a time: frames complete only when whole.
        for b in bytes {
            d.push(&[b]);
            while let Some(f) = d.next_frame() {
                out.push(f.unwrap());
            }
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn garbage_is_skipped_and_oversized_frames_refused() {
        let mut d = Decoder::default();
        d.push(b"boot noise");
        let mut big = vec![MAGIC, Kind::Stdout as u8, 0, 0, 0, 0];
        big.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        d.push(&big);
        d.push(&Frame::new(Kind::Ready, 3, vec![]).encode());
        let mut results = Vec::new();
        while let Some(r) = d.next_frame() {
            results.push(r);
        }
        assert_eq!(results.first(), Some(&Err(DecodeError::Garbage(10))));
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(DecodeError::TooLong { .. }))));
        assert_eq!(
            results.last(),
            Some(&Ok(Frame::new(Kind::Ready, 3, vec![])))
        );
    }

    #[test]
    fn unknown_kinds_are_errors_not_panics() {
        let mut d = Decoder::default();
        d.push(&[MAGIC, 200, 0, 0, 0, 0, 1, 0, 0, 0, 42]);
        assert_eq!(d.next_frame(), Some(Err(DecodeError::UnknownKind(200))));
        assert_eq!(d.next_frame(), None);
    }

    #[test]
    fn exec_requests_round_trip_and_reject_truncation() {
        let req = ExecRequest {
            local: true,
            tty: true,
            argv: vec!["ps".into(), "-eo".into(), "pid,comm".into()],
        };
        let bytes = req.encode();
        assert_eq!(ExecRequest::decode(&bytes), Some(req));
        for cut in 0..bytes.len() {
            assert_eq!(ExecRequest::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(ExecRequest::decode(&[0, 0, 0]), None, "empty argv");
    }

    #[test]
    fn exit_statuses_round_trip() {
        for s in [
            ExitStatus::Code(0),
            ExitStatus::Code(1),
            ExitStatus::Signal(9),
        ] {
            assert_eq!(ExitStatus::decode(&s.encode()), Some(s));
        }
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::decode(&[2, 0, 0, 0, 0]), None);
    }

    #[test]
    fn decoder_survives_random_input() {
        let mut seed = 0x1234_5678_u64;
        let mut d = Decoder::default();
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let byte = if seed.is_multiple_of(7) {
                MAGIC
            } else {
                seed as u8
            };
            d.push(&[byte]);
            while let Some(r) = d.next_frame() {
                if let Ok(f) = r {
                    assert!(f.payload.len() <= MAX_PAYLOAD);
                }
            }
        }
    }
}
