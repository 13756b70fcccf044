//! One description of an input's layout that both decodes fuzzer bytes and encodes seeds.
//!
//! A case type implements [`Codec::io`] once, calling [`Io`] for each field in order. While
//! decoding, `Io` overwrites the fields from the input (zeros once it is used up, so every
//! byte string is a valid case); while encoding, it appends them. Fields are stored raw:
//! ranges are applied where a value is used, so `decode(encode(c)) == c` for any case
//! whose lists are no longer than their maxima.

/// The direction of an [`Io`] pass.
enum Mode<'a> {
    Read { data: &'a [u8], pos: usize },
    Write(Vec<u8>),
}

/// A decoding or encoding pass over a case.
pub struct Io<'a>(Mode<'a>);

impl<'a> Io<'a> {
    fn reader(data: &'a [u8]) -> Self {
        Io(Mode::Read { data, pos: 0 })
    }

    fn writer() -> Self {
        Io(Mode::Write(Vec::new()))
    }

    fn raw<const N: usize>(&mut self, value: &mut [u8; N]) {
        match &mut self.0 {
            Mode::Read { data, pos } => {
                let rest = data.get(*pos..).unwrap_or_default();
                let n = rest.len().min(N);
                *value = [0; N];
                value[..n].copy_from_slice(&rest[..n]);
                *pos += n;
            }
            Mode::Write(out) => out.extend_from_slice(value),
        }
    }

    /// One byte.
    pub fn u8(&mut self, v: &mut u8) {
        let mut b = [*v];
        self.raw(&mut b);
        *v = b[0];
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, v: &mut u16) {
        let mut b = v.to_le_bytes();
        self.raw(&mut b);
        *v = u16::from_le_bytes(b);
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, v: &mut u32) {
        let mut b = v.to_le_bytes();
        self.raw(&mut b);
        *v = u32::from_le_bytes(b);
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, v: &mut u64) {
        let mut b = v.to_le_bytes();
        self.raw(&mut b);
        *v = u64::from_le_bytes(b);
    }

    /// A flag: one byte, its low bit.
    pub fn bool(&mut self, v: &mut bool) {
        let mut b = u8::from(*v);
        self.u8(&mut b);
        *v = b & 1 != 0;
    }

    /// A byte string of at most `max` (≤ 255) bytes: its length, then the bytes.
    pub fn blob(&mut self, v: &mut Vec<u8>, max: usize) {
        let mut len = v.len().min(max) as u8;
        self.u8(&mut len);
        v.resize(usize::from(len).min(max), 0);
        for b in v.iter_mut() {
            self.u8(b);
        }
    }

    /// A list of at most `max` (≤ 255) items: its length, then each item.
    pub fn list<T: Codec>(&mut self, v: &mut Vec<T>, max: usize) {
        let mut len = v.len().min(max) as u8;
        self.u8(&mut len);
        v.resize_with(usize::from(len).min(max), T::default);
        for item in v.iter_mut() {
            item.io(self);
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        match self.0 {
            Mode::Write(out) => out,
            Mode::Read { .. } => Vec::new(),
        }
    }
}

/// A case (or part of one) that fuzzer bytes decode into.
pub trait Codec: Default + Clone {
    /// Visits every field, in the order they are stored.
    fn io(&mut self, io: &mut Io<'_>);

    /// The case `data` describes (missing bytes read as zero).
    fn decode(data: &[u8]) -> Self {
        let mut case = Self::default();
        case.io(&mut Io::reader(data));
        case
    }

    /// The bytes that decode into this case (for seeds).
    fn encode(&self) -> Vec<u8> {
        let mut copy = self.clone();
        let mut io = Io::writer();
        copy.io(&mut io);
        io.into_bytes()
    }
}
