//! Small helpers: hex, bounded file reading, atomic file creation, UTC time.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `bytes`.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode exactly 64 hex digits into 32 bytes.
pub(crate) fn hex_decode_32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *o = (nibble(*hi)? << 4) | nibble(*lo)?;
    }
    Some(out)
}

/// serde adapter: `[u8; 32]` as 64 lower-case hex digits.
pub(crate) mod serde_hex32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex_encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::hex_decode_32(&s).ok_or_else(|| D::Error::custom("expected 64 hex digits"))
    }
}

/// Read at most `max` bytes of `path`; `Err(Ok(size))` if the file is larger.
/// The buffer is never sized beyond `max` or the file's actual size.
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Result<Vec<u8>, u64>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Ok(Err(len));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    let got = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if got > max {
        return Ok(Err(got));
    }
    Ok(Ok(buf))
}

/// `path` with `suffix` appended to its file name (`key` -> `key.pub`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes a temporary file on drop unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Write `bytes` to `dest` all-or-nothing: a temporary file (created with `mode`,
/// O_EXCL) in the same directory is written and fsynced, then either renamed over
/// `dest` (`overwrite`) or hard-linked to it, which fails if `dest` exists. On any
/// failure the temporary file is removed and `dest` is untouched.
pub(crate) fn write_atomic(
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    overwrite: bool,
) -> io::Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{nanos}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let mut guard = TempGuard(Some(tmp.clone()));
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    if overwrite {
        fs::rename(&tmp, dest)?;
        guard.0 = None;
    } else {
        fs::hard_link(&tmp, dest)?;
        // `guard` removes the temporary name; `dest` keeps the data.
    }
    drop(guard);
    // Make the new directory entry durable; best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (proleptic Gregorian, UTC).
pub fn format_unix_utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe
        .saturating_add(era.saturating_mul(400))
        .saturating_add(i64::from(m <= 2));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let v: [u8; 32] = core::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(hex_decode_32(&hex_encode(&v)), Some(v));
        assert_eq!(hex_decode_32(&hex_encode(&v).to_uppercase()), Some(v));
        assert_eq!(hex_decode_32("00"), None);
        assert_eq!(hex_decode_32(&"g".repeat(64)), None);
        assert_eq!(hex_decode_32(&"é".repeat(32)), None);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_unix_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_utc(1_767_225_599), "2025-12-31T23:59:59Z");
        let _ = format_unix_utc(u64::MAX);
    }
}
