//! The ELF vmlinux inside a bzImage: what users have (`/boot/vmlinuz-*`) turned into what
//! the redirect engine reads (BTF, the text's place, the release banner).
//!
//! A bzImage's setup header (Documentation/x86/boot.rst) gives the compressed payload's
//! place (`payload_offset`, relative to the protected-mode code, and `payload_length`, at
//! 0x248 and 0x24c, protocol 2.08+). Kbuild appends the decompressed size as a 32-bit
//! little-endian number to every payload (gzip's own trailer holds it too), so the output
//! is sized and bounded before anything is decompressed. The formats are the ones a
//! distribution kernel uses: LZ4 (legacy frames, Debian 12's cloud kernel), gzip, xz (with
//! the x86 BCJ filter the kernel's `xz_wrap.sh` adds: liblzma) and zstd.
//!
//! The kernel file is the operator's, not the guest's, but it is still input: every offset
//! is checked, the output is capped at [`MAX_KERNEL_BYTES`], and what comes out must be an
//! ELF file of exactly the announced size.

use std::borrow::Cow;
use std::io::Read;

use thiserror::Error;

use crate::config::MAX_KERNEL_BYTES;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// Legacy LZ4 frames (`lz4 -l`): this magic, then blocks of (le32 size, data), each
/// decompressing to at most 8 MiB.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// A payload compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Gzip,
    Xz,
    Zstd,
}

/// Why no vmlinux could be had from a kernel file.
#[derive(Debug, Error)]
pub enum BzImageError {
    #[error("neither an ELF vmlinux nor a bzImage (no \"HdrS\" setup header at 0x202)")]
    NotAKernel,
    #[error(
        "bzImage boot protocol {0:#06x} is older than 2.08, which first gives the payload's place"
    )]
    OldProtocol(u16),
    #[error("bzImage payload at {offset:#x}+{length:#x} lies outside the {size}-byte file")]
    PayloadOutside {
        offset: u64,
        length: u64,
        size: usize,
    },
    #[error(
        "bzImage payload is compressed with {0}, which is not supported (LZ4, gzip, xz or zstd)"
    )]
    Unsupported(&'static str),
    #[error("bzImage payload announces a {0}-byte vmlinux: larger than any kernel ({MAX_KERNEL_BYTES} bytes at most)")]
    TooLarge(u64),
    #[error("bzImage payload ({format:?}) does not decompress: {reason}")]
    Corrupt { format: Compression, reason: String },
    #[error("bzImage payload ({format:?}) decompressed to {got} bytes, not the {want} announced")]
    WrongSize {
        format: Compression,
        got: u64,
        want: u64,
    },
    #[error("bzImage payload decompressed to something that is not an ELF file")]
    NotElf,
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether `kernel` is an ELF image (a vmlinux) rather than, say, a bzImage.
pub fn is_elf(kernel: &[u8]) -> bool {
    kernel.starts_with(ELF_MAGIC)
}

/// The ELF vmlinux of `kernel`: itself if it is one, else the decompressed payload of a
/// bzImage.
pub fn vmlinux(kernel: &[u8]) -> Result<Cow<'_, [u8]>, BzImageError> {
    if is_elf(kernel) {
        return Ok(Cow::Borrowed(kernel));
    }
    let (format, stream, size) = payload(kernel)?;
    let out = decompress(format, stream, size)?;
    if !is_elf(&out) {
        return Err(BzImageError::NotElf);
    }
    Ok(Cow::Owned(out))
}

/// The payload's format, its compressed stream and the decompressed size it announces.
fn payload(kernel: &[u8]) -> Result<(Compression, &[u8], usize), BzImageError> {
    if kernel.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err(BzImageError::NotAKernel);
    }
    let version = kernel
        .get(PROTOCOL_VERSION..PROTOCOL_VERSION + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    if version < 0x0208 {
        return Err(BzImageError::OldProtocol(version));
    }
    let setup_sects = match kernel.get(SETUP_SECTS) {
        Some(0) | None => 4, // 0 means 4 (boot.rst)
        Some(&n) => usize::from(n),
    };
    let (offset, length) = (
        le32(kernel, PAYLOAD_OFFSET).unwrap_or(0),
        le32(kernel, PAYLOAD_LENGTH).unwrap_or(0),
    );
    let outside = || BzImageError::PayloadOutside {
        offset: u64::from(offset),
        length: u64::from(length),
        size: kernel.len(),
    };
    let start = (setup_sects + 1)
        .checked_mul(512)
        .and_then(|s| s.checked_add(offset as usize))
        .ok_or_else(outside)?;
    let end = start.checked_add(length as usize).ok_or_else(outside)?;
    let data = kernel.get(start..end).ok_or_else(outside)?;
    if data.len() < 8 {
        return Err(outside());
    }
    let (stream, trailer) = data.split_at(data.len() - 4);
    let size = u64::from(le32(trailer, 0).unwrap_or(0));
    if size > MAX_KERNEL_BYTES {
        return Err(BzImageError::TooLarge(size));
    }
    let format = match data {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4,
        [b'B', b'Z', b'h', ..] => return Err(BzImageError::Unsupported("bzip2")),
        [0x5d, 0x00, 0x00, ..] => return Err(BzImageError::Unsupported("lzma")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(BzImageError::Unsupported("lzo")),
        _ => return Err(BzImageError::Unsupported("an unknown format")),
    };
    // gzip's stream ends with its own size field: the payload is the stream, whole.
    let stream = if format == Compression::Gzip {
        data
    } else {
        stream
    };
    Ok((format, stream, size as usize))
}

fn decompress(format: Compression, stream: &[u8], size: usize) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |reason: String| BzImageError::Corrupt { format, reason };
    let out = match format {
        Compression::Lz4 => lz4_legacy(stream, size).map_err(corrupt)?,
        Compression::Gzip => read_bounded(flate2::read::GzDecoder::new(stream), size)
            .map_err(|e| corrupt(e.to_string()))?,
        Compression::Xz => read_bounded(liblzma::read::XzDecoder::new(stream), size)
            .map_err(|e| corrupt(e.to_string()))?,
        Compression::Zstd => {
            // The kernel's zstd22 may use a window as large as the image; bounded by the
            // size cap, not ruzstd's default for untrusted input.
            let decoder = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                stream,
                MAX_KERNEL_BYTES,
            )
            .map_err(|e| corrupt(e.to_string()))?;
            read_bounded(decoder, size).map_err(|e| corrupt(e.to_string()))?
        }
    };
    if out.len() != size {
        return Err(BzImageError::WrongSize {
            format,
            got: out.len() as u64,
            want: size as u64,
        });
    }
    Ok(out)
}

/// Reads `reader` to its end, but never more than one byte past `size` (enough to tell
/// that the stream is longer than announced).
fn read_bounded(reader: impl Read, size: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size);
    reader.take(size as u64 + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// Legacy LZ4 frames, as the kernel's `lz4 -l` writes them and `lib/decompress_unlz4.c`
/// reads them: a magic number (which may repeat between blocks), then sized blocks.
fn lz4_legacy(stream: &[u8], size: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; size];
    let (mut at, mut written) = (0usize, 0usize);
    while at < stream.len() {
        let word = stream
            .get(at..at + 4)
            .ok_or_else(|| format!("a block header cut short at {at:#x}"))?;
        at += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        let block = at
            .checked_add(len)
            .and_then(|end| stream.get(at..end))
            .ok_or_else(|| format!("a {len}-byte block at {at:#x} runs past the payload"))?;
        at += len;
        let room = out.len() - written;
        if room == 0 {
            return Err(format!("data beyond the announced {size} bytes"));
        }
        let dest = &mut out[written..written + room.min(LZ4_LEGACY_BLOCK)];
        written += lz4_flex::block::decompress_into(block, dest).map_err(|e| e.to_string())?;
    }
    out.truncate(written);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uncompressed test payload: an ELF magic, then x86-looking code (E8/E9 calls and
    /// jumps, which the xz BCJ filter rewrites) and text. Generated here, independently of
    /// the code under test; the fixtures below were compressed from it by the command-line
    /// tools with the kernel's own options (`tools/make-bzimage-fixtures`).
    fn plain() -> Vec<u8> {
        let mut v = ELF_MAGIC.to_vec();
        for i in 0u32..2048 {
            v.push(if i % 3 == 0 { 0xe8 } else { 0xe9 });
            v.extend_from_slice(&(i.wrapping_mul(2_654_435_761)).to_le_bytes());
            v.extend_from_slice(b"exterior ");
        }
        v
    }

    /// A bzImage around `payload`: 4 setup sectors and the boot sector, protocol 2.15, the
    /// payload 0x100 bytes into the protected-mode code.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512 + 0x100];
        k[SETUP_SECTS] = 4;
        k[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        k[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        k[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&0x100u32.to_le_bytes());
        k[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        k.extend_from_slice(payload);
        k.extend_from_slice(&[0u8; 64]); // what follows the payload in a real image
        k
    }

    fn fixture(ext: &str) -> Vec<u8> {
        let path = format!(
            "{}/src/boot/fixtures/payload.{ext}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn every_supported_format_gives_the_same_vmlinux() {
        let want = plain();
        for (ext, format) in [
            ("lz4", Compression::Lz4),
            ("gz", Compression::Gzip),
            ("xz", Compression::Xz),
            ("zst", Compression::Zstd),
        ] {
            let k = bzimage(&fixture(ext));
            assert_eq!(payload(&k).unwrap().0, format, "{ext}");
            assert_eq!(vmlinux(&k).unwrap().as_ref(), want.as_slice(), "{ext}");
        }
    }

    /// The pinned kernel's bzImage holds the pinned vmlinux: what this module extracts is,
    /// byte for byte, what `guest-kernel/fetch` extracted with the `lz4` tool and checked
    /// against its recorded sha256. Needs `tools/setup` (`tools/test` runs it first);
    /// without the images it fails, it does not skip.
    #[test]
    fn the_pinned_bzimage_payload_is_the_pinned_vmlinux() {
        let image = |name: &str| {
            let path = format!("{}/../images/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{path}: {e} (run tools/setup to fetch the pinned kernel)")
            })
        };
        let want = image("vmlinux");
        let bz = image("bzImage");
        let got = vmlinux(&bz).expect("extract the pinned payload");
        assert!(
            got.as_ref() == want.as_slice(),
            "the extracted vmlinux is not images/vmlinux"
        );
    }

    #[test]
    fn an_elf_is_its_own_vmlinux() {
        let elf = plain();
        assert!(matches!(vmlinux(&elf).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn a_wrong_announced_size_or_a_cut_stream_is_refused() {
        for ext in ["lz4", "xz", "zst", "gz"] {
            let mut p = fixture(ext);
            let n = p.len();
            let size = u32::from_le_bytes(p[n - 4..].try_into().unwrap());
            p[n - 4..].copy_from_slice(&(size - 1).to_le_bytes());
            let e = vmlinux(&bzimage(&p)).unwrap_err();
            assert!(
                matches!(
                    e,
                    BzImageError::WrongSize { .. } | BzImageError::Corrupt { .. }
                ),
                "{ext}: {e}"
            );
            // Cut in the middle of the stream, size trailer kept.
            let p = fixture(ext);
            let mut cut = p[..n / 2].to_vec();
            cut.extend_from_slice(&p[n - 4..]);
            let e = vmlinux(&bzimage(&cut)).unwrap_err();
            assert!(
                matches!(
                    e,
                    BzImageError::WrongSize { .. } | BzImageError::Corrupt { .. }
                ),
                "{ext} cut: {e}"
            );
        }
    }

    #[test]
    fn headers_that_lie_are_refused_not_followed() {
        assert!(matches!(
            vmlinux(b"MZ not a kernel"),
            Err(BzImageError::NotAKernel)
        ));
        let good = bzimage(&fixture("lz4"));
        let mut k = good.clone();
        k[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            vmlinux(&k),
            Err(BzImageError::PayloadOutside { .. })
        ));
        let mut k = good.clone();
        k[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            vmlinux(&k),
            Err(BzImageError::PayloadOutside { .. })
        ));
        let mut k = good.clone();
        k[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            vmlinux(&k),
            Err(BzImageError::OldProtocol(0x0206))
        ));
        // A payload announcing 4 GiB is refused before anything is allocated.
        let mut p = fixture("lz4");
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            vmlinux(&bzimage(&p)),
            Err(BzImageError::TooLarge(_))
        ));
        // Other compressors are named.
        let mut bz2 = b"BZh91AY&SY".to_vec();
        bz2.extend_from_slice(&[0u8; 8]);
        let e = vmlinux(&bzimage(&bz2)).unwrap_err().to_string();
        assert!(e.contains("bzip2"), "{e}");
        // A stream that decompresses fine to something that is not an ELF file.
        let mut p = LZ4_LEGACY_MAGIC.to_vec();
        let block = lz4_flex::block::compress(b"MZ, not an ELF file");
        p.extend_from_slice(&(block.len() as u32).to_le_bytes());
        p.extend_from_slice(&block);
        p.extend_from_slice(&19u32.to_le_bytes());
        assert!(matches!(vmlinux(&bzimage(&p)), Err(BzImageError::NotElf)));
    }

    #[test]
    fn lz4_blocks_that_run_past_the_payload_are_refused() {
        let mut p = LZ4_LEGACY_MAGIC.to_vec();
        p.extend_from_slice(&1000u32.to_le_bytes());
        p.extend_from_slice(&[0u8; 10]);
        p.extend_from_slice(&64u32.to_le_bytes()); // announced size
        let e = vmlinux(&bzimage(&p)).unwrap_err().to_string();
        assert!(e.contains("runs past the payload"), "{e}");
    }
}
