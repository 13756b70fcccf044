//! Sealed appliance images (DESIGN.md section 7).
//!
//! One file holds a signed JSON manifest (format version, VM config, creation time,
//! signer, and offset/size/sha256 of each part) followed by the parts (kernel, optional
//! initrd). The on-disk format is specified in `appliance/FORMAT.md`.
//!
//! The image is hostile input. [`open_verified`] reads the whole file once (at most
//! [`MAX_IMAGE_SIZE`] bytes), checks the header, the ed25519 signature against the
//! trusted keys *before* parsing the manifest, then the manifest's rules and every
//! part's digest, and only then hands out the part bytes. The caller boots exactly the
//! bytes that were verified; nothing is read again.

#![deny(missing_docs)]

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod error;
mod keys;
#[doc(hidden)]
pub mod testing;
mod util;

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
pub use error::{ImageError, KeyError, SealError};
pub use keys::{
    encode_public, encode_secret, fingerprint, keygen, load_signing_key, load_trusted,
    load_verifying_key, parse_public, parse_secret, public_key_path, GeneratedKey, PUBLIC_HEADER,
    SECRET_HEADER,
};
pub use util::format_unix_utc;

/// The 8 bytes every image starts with.
pub const MAGIC: [u8; 8] = *b"EXTVMIMG";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// magic (8) + version (u32 LE) + manifest length (u32 LE).
pub const HEADER_LEN: usize = 16;
/// An ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Largest image file accepted (and written).
pub const MAX_IMAGE_SIZE: u64 = 1 << 30;
/// Largest manifest accepted (and written).
pub const MAX_MANIFEST_LEN: u32 = 64 * 1024;
/// Smallest guest memory a manifest may declare, in MiB (the VMM's own limit).
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest memory a manifest may declare, in MiB (the VMM's own limit).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs a manifest may declare (the VMM's limit: 8-bit APIC IDs).
pub const MAX_CPUS: u8 = 254;
/// Longest command line a manifest may carry (x86 COMMAND_LINE_SIZE less the NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;

const MIB: u64 = 1 << 20;

/// VM configuration carried (and signed) in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Extra kernel command line, appended by the VMM to its base command line exactly
    /// as `run --append` would be.
    pub cmdline: String,
    /// Also boot the SVM attached to this GVM.
    pub svm: bool,
}

/// The parts an image can hold, in the order they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    /// The kernel (always present, always first).
    Kernel,
    /// The initramfs (optional, after the kernel).
    Initrd,
}

impl fmt::Display for PartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PartKind::Kernel => "kernel",
            PartKind::Initrd => "initrd",
        })
    }
}

/// One part: where it is (relative to the start of the payload) and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    /// Which part this is.
    pub name: PartKind,
    /// Where it starts, in bytes from the start of the payload.
    pub offset: u64,
    /// Its length in bytes.
    pub size: u64,
    /// sha256 of its bytes (hex in the JSON).
    #[serde(with = "util::serde_hex32")]
    pub sha256: [u8; 32],
}

impl PartEntry {
    /// The digest as hex.
    pub fn sha256_hex(&self) -> String {
        util::hex_encode(&self.sha256)
    }
}

/// The signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Must equal the header's version.
    pub format_version: u32,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub created_unix: u64,
    /// The ed25519 public key that signed the image (informational: trust comes from
    /// the caller's key list; this only lets a refusal name the unknown key).
    #[serde(with = "util::serde_hex32")]
    pub signer: [u8; 32],
    /// How to boot the parts.
    pub config: VmConfig,
    /// The kernel, then optionally the initrd, contiguous in the payload.
    pub parts: Vec<PartEntry>,
}

impl Manifest {
    /// Fingerprint of the key the manifest names as signer, if it is a valid key.
    pub fn signer_fingerprint(&self) -> Option<String> {
        VerifyingKey::from_bytes(&self.signer)
            .ok()
            .map(|k| fingerprint(&k))
    }

    /// The entry for `kind`, if present.
    pub fn part(&self, kind: PartKind) -> Option<&PartEntry> {
        self.parts.iter().find(|p| p.name == kind)
    }
}

/// An image whose signature, manifest and digests all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The kernel's bytes, digest-checked.
    pub kernel: Vec<u8>,
    /// The initrd's bytes, digest-checked, if the image has one.
    pub initrd: Option<Vec<u8>>,
    /// The trusted key whose signature verified.
    pub signer: VerifyingKey,
}

impl VerifiedImage {
    /// The manifest's VM configuration.
    pub fn config(&self) -> &VmConfig {
        &self.manifest.config
    }

    /// Fingerprint of the key that signed the image.
    pub fn signer_fingerprint(&self) -> String {
        fingerprint(&self.signer)
    }
}

// ---------------------------------------------------------------------------------
// Parsing and verification.

fn le_u32(buf: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let b: [u8; 4] = buf.get(at..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The fixed-position pieces of an image.
struct Framed<'a> {
    version: u32,
    /// header || manifest: the bytes the signature covers.
    signed: &'a [u8],
    manifest: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
    /// Offset of the payload (first part) in the file.
    payload_start: usize,
}

/// Check size, magic, version and lengths; split out the signed region and signature.
fn frame(buf: &[u8]) -> Result<Framed<'_>, ImageError> {
    let file_len = len64(buf.len());
    if file_len > MAX_IMAGE_SIZE {
        return Err(ImageError::TooLarge {
            size: file_len,
            max: MAX_IMAGE_SIZE,
        });
    }
    let have = buf.get(..MAGIC.len()).unwrap_or(buf);
    if !MAGIC.starts_with(have) {
        return Err(ImageError::BadMagic);
    }
    let truncated = |what, needed: usize| ImageError::Truncated {
        what,
        needed: len64(needed),
        actual: file_len,
    };
    let (Some(version), Some(manifest_len)) = (le_u32(buf, 8), le_u32(buf, 12)) else {
        return Err(truncated("header", HEADER_LEN));
    };
    if version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if manifest_len > MAX_MANIFEST_LEN {
        return Err(ImageError::ManifestTooLarge {
            len: u64::from(manifest_len),
            max: u64::from(MAX_MANIFEST_LEN),
        });
    }
    // Both sums are small: manifest_len <= MAX_MANIFEST_LEN.
    let signed_end = usize::try_from(manifest_len)
        .ok()
        .and_then(|m| HEADER_LEN.checked_add(m))
        .ok_or(ImageError::ManifestTooLarge {
            len: u64::from(manifest_len),
            max: u64::from(MAX_MANIFEST_LEN),
        })?;
    let sig_end = signed_end
        .checked_add(SIGNATURE_LEN)
        .ok_or(truncated("manifest and signature", usize::MAX))?;
    let (Some(signed), Some(sig)) = (buf.get(..signed_end), buf.get(signed_end..sig_end)) else {
        return Err(truncated("manifest and signature", sig_end));
    };
    let manifest = signed.get(HEADER_LEN..).unwrap_or_default();
    let signature: [u8; SIGNATURE_LEN] = sig
        .try_into()
        .map_err(|_| truncated("signature", sig_end))?;
    Ok(Framed {
        version,
        signed,
        manifest,
        signature,
        payload_start: sig_end,
    })
}

/// Only the `signer` field, for naming an unknown key in a refusal.
#[derive(Deserialize)]
struct SignerOnly {
    #[serde(with = "util::serde_hex32")]
    signer: [u8; 32],
}

/// Check the signature over the framed header+manifest. Returns the trusted key that
/// made it. Nothing of the manifest is interpreted before this succeeds (except to
/// name the signer in an `UnknownKey` refusal).
fn check_signature(f: &Framed<'_>, trusted: &[VerifyingKey]) -> Result<VerifyingKey, ImageError> {
    if f.signature.iter().all(|&b| b == 0) {
        return Err(ImageError::Unsigned);
    }
    if trusted.is_empty() {
        return Err(ImageError::NoTrustedKeys);
    }
    let sig = Signature::from_bytes(&f.signature);
    if let Some(k) = trusted
        .iter()
        .find(|k| k.verify_strict(f.signed, &sig).is_ok())
    {
        return Ok(*k);
    }
    // Diagnose: a well-formed manifest naming a key we do not trust is "unknown key";
    // anything else is a broken signature.
    if let Ok(claim) = serde_json::from_slice::<SignerOnly>(f.manifest) {
        if let Ok(k) = VerifyingKey::from_bytes(&claim.signer) {
            if !trusted.contains(&k) {
                return Err(ImageError::UnknownKey {
                    fingerprint: fingerprint(&k),
                    trusted: trusted.len(),
                });
            }
        }
    }
    Err(ImageError::BadSignature)
}

/// Check the VM config's own rules.
pub fn validate_config(c: &VmConfig) -> Result<(), ImageError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&c.mem_mib) {
        return Err(ImageError::MemOutOfRange {
            mem_mib: c.mem_mib,
            min: MIN_MEM_MIB,
            max: MAX_MEM_MIB,
        });
    }
    if c.cpus == 0 || c.cpus > MAX_CPUS {
        return Err(ImageError::CpusOutOfRange {
            cpus: c.cpus,
            max: MAX_CPUS,
        });
    }
    if c.cmdline.len() > MAX_CMDLINE_LEN {
        return Err(ImageError::CmdlineTooLong {
            len: c.cmdline.len(),
            max: MAX_CMDLINE_LEN,
        });
    }
    if c.cmdline.chars().any(char::is_control) {
        return Err(ImageError::CmdlineInvalid);
    }
    Ok(())
}

/// Byte ranges (within the file) of the verified parts.
struct Located {
    kernel: Range<usize>,
    initrd: Option<Range<usize>>,
}

/// Check the manifest's parts and config against each other and against the file:
/// structure, memory, bounds, layout, trailing data. Digests are not checked here.
fn check_manifest(m: &Manifest, version: u32, payload_len: u64) -> Result<(), ImageError> {
    if m.format_version != version {
        return Err(ImageError::VersionMismatch {
            header: version,
            manifest: m.format_version,
        });
    }
    // Structure: kernel, then optionally initrd, nothing else.
    let mut parts = m.parts.iter().enumerate();
    match parts.next() {
        Some((_, p)) if p.name == PartKind::Kernel => {}
        Some((index, p)) if m.parts.iter().any(|q| q.name == PartKind::Kernel) => {
            return Err(ImageError::UnexpectedPart {
                index,
                part: p.name,
            })
        }
        _ => return Err(ImageError::MissingKernel),
    }
    match parts.next() {
        None => {}
        Some((_, p)) if p.name == PartKind::Initrd => {}
        Some((index, p)) => {
            return Err(ImageError::UnexpectedPart {
                index,
                part: p.name,
            })
        }
    }
    if let Some((index, p)) = parts.next() {
        return Err(ImageError::UnexpectedPart {
            index,
            part: p.name,
        });
    }
    if let Some(p) = m.parts.iter().find(|p| p.size == 0) {
        return Err(ImageError::EmptyPart { part: p.name });
    }

    validate_config(&m.config)?;

    // Declared sizes against declared memory (manifest-internal; before the file).
    let mem_bytes = m.config.mem_mib.saturating_mul(MIB);
    let total = m
        .parts
        .iter()
        .try_fold(0u64, |acc, p| acc.checked_add(p.size));
    match total {
        Some(t) if t <= mem_bytes => {}
        _ => {
            return Err(ImageError::ExceedsMemory {
                total: total.unwrap_or(u64::MAX),
                mem_mib: m.config.mem_mib,
            })
        }
    }

    // Declared sizes against the file, then the canonical contiguous layout.
    let mut expected = 0u64;
    for p in &m.parts {
        match p.offset.checked_add(p.size) {
            Some(end) if end <= payload_len => {}
            _ => {
                return Err(ImageError::PartExceedsFile {
                    part: p.name,
                    offset: p.offset,
                    size: p.size,
                    payload: payload_len,
                })
            }
        }
        if p.offset != expected {
            return Err(ImageError::BadLayout {
                part: p.name,
                offset: p.offset,
                expected,
            });
        }
        // Cannot overflow: offset + size <= payload_len was checked above.
        expected = p.offset.saturating_add(p.size);
    }
    if expected != payload_len {
        return Err(ImageError::TrailingData {
            extra: payload_len.saturating_sub(expected),
        });
    }
    Ok(())
}

/// Full verification of an in-memory image. Returns the manifest, the signing key and
/// the file ranges of the (digest-checked) parts.
fn verify(
    buf: &[u8],
    trusted: &[VerifyingKey],
) -> Result<(Manifest, VerifyingKey, Located), ImageError> {
    let f = frame(buf)?;
    let signer = check_signature(&f, trusted)?;
    let manifest: Manifest = serde_json::from_slice(f.manifest)
        .map_err(|e| ImageError::ManifestInvalid(e.to_string()))?;
    if manifest.signer != signer.to_bytes() {
        return Err(ImageError::SignerMismatch {
            claimed: manifest
                .signer_fingerprint()
                .unwrap_or_else(|| "(invalid key)".into()),
            actual: fingerprint(&signer),
        });
    }
    let payload = buf.get(f.payload_start..).unwrap_or_default();
    check_manifest(&manifest, f.version, len64(payload.len()))?;

    let mut kernel = None;
    let mut initrd = None;
    for p in &manifest.parts {
        // check_manifest proved offset + size <= payload.len().
        let start = usize::try_from(p.offset)
            .ok()
            .and_then(|o| f.payload_start.checked_add(o));
        let end = start
            .zip(usize::try_from(p.size).ok())
            .and_then(|(s, n)| s.checked_add(n));
        let range = start.zip(end).map(|(s, e)| s..e);
        let bytes = range.clone().and_then(|r| buf.get(r));
        let (Some(range), Some(bytes)) = (range, bytes) else {
            return Err(ImageError::PartExceedsFile {
                part: p.name,
                offset: p.offset,
                size: p.size,
                payload: len64(payload.len()),
            });
        };
        let actual: [u8; 32] = Sha256::digest(bytes).into();
        if actual != p.sha256 {
            return Err(ImageError::DigestMismatch {
                part: p.name,
                expected: p.sha256_hex(),
                actual: util::hex_encode(&actual),
            });
        }
        match p.name {
            PartKind::Kernel => kernel = Some(range),
            PartKind::Initrd => initrd = Some(range),
        }
    }
    let kernel = kernel.ok_or(ImageError::MissingKernel)?;
    Ok((manifest, signer, Located { kernel, initrd }))
}

/// Verify an in-memory image against `trusted` keys and copy out its parts.
/// (The entry point of the fuzz target.)
pub fn parse_and_verify(
    bytes: &[u8],
    trusted: &[VerifyingKey],
) -> Result<VerifiedImage, ImageError> {
    let (manifest, signer, loc) = verify(bytes, trusted)?;
    let copy = |r: Range<usize>| bytes.get(r).map(<[u8]>::to_vec).unwrap_or_default();
    Ok(VerifiedImage {
        kernel: copy(loc.kernel),
        initrd: loc.initrd.map(copy),
        manifest,
        signer,
    })
}

/// Verify an owned image buffer and move its parts out without re-reading anything.
pub fn verify_owned(
    mut buf: Vec<u8>,
    trusted: &[VerifyingKey],
) -> Result<VerifiedImage, ImageError> {
    let (manifest, signer, loc) = verify(&buf, trusted)?;
    // Layout is canonical: [.. | kernel | initrd], initrd (if any) runs to the end.
    let initrd = loc.initrd.map(|r| buf.split_off(r.start));
    buf.truncate(loc.kernel.end);
    buf.drain(..loc.kernel.start);
    Ok(VerifiedImage {
        manifest,
        kernel: buf,
        initrd,
        signer,
    })
}

fn read_image(path: &Path) -> Result<Vec<u8>, ImageError> {
    util::read_bounded(path, MAX_IMAGE_SIZE)
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .map_err(|size| ImageError::TooLarge {
            size,
            max: MAX_IMAGE_SIZE,
        })
}

/// Load the trusted public key files, read the image once and verify it. On success
/// the returned kernel/initrd bytes are exactly the verified ones.
pub fn open_verified(path: &Path, trusted: &[PathBuf]) -> Result<VerifiedImage, ImageError> {
    let keys = load_trusted(trusted)?;
    if keys.is_empty() {
        return Err(ImageError::NoTrustedKeys);
    }
    verify_owned(read_image(path)?, &keys)
}

/// What `inspect` learned about an image.
#[derive(Debug)]
pub struct Inspection {
    /// The image file's length in bytes.
    pub file_len: u64,
    /// The manifest, parsed *without* trusting it (`Err` if the header or manifest is
    /// unreadable).
    pub manifest: Result<Manifest, ImageError>,
    /// Full verification: the signing key, or why the image is refused.
    pub verdict: Result<VerifyingKey, ImageError>,
}

/// Parse (untrusted) and verify an in-memory image for display.
pub fn inspect_bytes(bytes: &[u8], trusted: &[VerifyingKey]) -> Inspection {
    let manifest = frame(bytes).and_then(|f| {
        serde_json::from_slice::<Manifest>(f.manifest)
            .map_err(|e| ImageError::ManifestInvalid(e.to_string()))
    });
    Inspection {
        file_len: len64(bytes.len()),
        manifest,
        verdict: verify(bytes, trusted).map(|(_, k, _)| k),
    }
}

/// Read an image and its trusted keys and inspect it. `Err` only if the files cannot
/// be read; an invalid image is reported in the returned `verdict`.
pub fn inspect(path: &Path, trusted: &[PathBuf]) -> Result<Inspection, ImageError> {
    let keys = load_trusted(trusted)?;
    Ok(inspect_bytes(&read_image(path)?, &keys))
}

// ---------------------------------------------------------------------------------
// Sealing.

/// Frame `manifest_json` and `payload` as an image with header `version`, signing with
/// `key` (or leaving the signature all-zero). No checks: used by `build_image` after
/// validation and by tests to craft hostile images.
pub fn assemble(
    version: u32,
    manifest_json: &[u8],
    payload: &[&[u8]],
    key: Option<&SigningKey>,
) -> Vec<u8> {
    let mlen = u32::try_from(manifest_json.len()).unwrap_or(u32::MAX);
    let capacity = payload
        .iter()
        .fold(HEADER_LEN + SIGNATURE_LEN, |a, p| a.saturating_add(p.len()))
        .saturating_add(manifest_json.len());
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&mlen.to_le_bytes());
    out.extend_from_slice(manifest_json);
    let sig = match key {
        Some(k) => ed25519_dalek::Signer::sign(k, &out).to_bytes(),
        None => [0u8; SIGNATURE_LEN],
    };
    out.extend_from_slice(&sig);
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// Build the manifest for `config` and parts, in canonical layout.
pub fn build_manifest(
    config: VmConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    created_unix: u64,
    signer: &VerifyingKey,
) -> Manifest {
    let mut m = unhashed_manifest(config, kernel, initrd, created_unix, signer);
    hash_parts(&mut m, kernel, initrd);
    m
}

/// The manifest with all-zero digests (so it can be checked before hashing).
fn unhashed_manifest(
    config: VmConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    created_unix: u64,
    signer: &VerifyingKey,
) -> Manifest {
    let mut parts = Vec::with_capacity(2);
    let mut offset = 0u64;
    for (name, bytes) in [(PartKind::Kernel, Some(kernel)), (PartKind::Initrd, initrd)] {
        if let Some(b) = bytes {
            let size = len64(b.len());
            parts.push(PartEntry {
                name,
                offset,
                size,
                sha256: [0; 32],
            });
            offset = offset.saturating_add(size);
        }
    }
    Manifest {
        format_version: FORMAT_VERSION,
        created_unix,
        signer: signer.to_bytes(),
        config,
        parts,
    }
}

fn hash_parts(m: &mut Manifest, kernel: &[u8], initrd: Option<&[u8]>) {
    for p in &mut m.parts {
        let bytes = match p.name {
            PartKind::Kernel => Some(kernel),
            PartKind::Initrd => initrd,
        };
        if let Some(b) = bytes {
            p.sha256 = Sha256::digest(b).into();
        }
    }
}

/// Build and sign an image in memory. Applies every rule `open_verified` applies, so a
/// sealed image never fails to open with the key it was sealed with.
pub fn build_image(
    config: VmConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    created_unix: u64,
    key: &SigningKey,
) -> Result<Vec<u8>, SealError> {
    build(config, kernel, initrd, created_unix, key).map(|(image, _)| image)
}

fn build(
    config: VmConfig,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    created_unix: u64,
    key: &SigningKey,
) -> Result<(Vec<u8>, Manifest), SealError> {
    let vk = key.verifying_key();
    let mut manifest = unhashed_manifest(config, kernel, initrd, created_unix, &vk);
    let payload_len = manifest
        .parts
        .iter()
        .fold(0u64, |a, p| a.saturating_add(p.size));
    check_manifest(&manifest, FORMAT_VERSION, payload_len).map_err(SealError::Config)?;
    hash_parts(&mut manifest, kernel, initrd);
    let json = serde_json::to_vec(&manifest)
        .map_err(|e| SealError::Config(ImageError::ManifestInvalid(e.to_string())))?;
    let mlen = len64(json.len());
    if mlen > u64::from(MAX_MANIFEST_LEN) {
        return Err(SealError::ManifestTooLarge {
            len: mlen,
            max: u64::from(MAX_MANIFEST_LEN),
        });
    }
    let size = len64(HEADER_LEN + SIGNATURE_LEN)
        .saturating_add(mlen)
        .saturating_add(payload_len);
    if size > MAX_IMAGE_SIZE {
        return Err(SealError::TooLarge {
            size,
            max: MAX_IMAGE_SIZE,
        });
    }
    let payload: Vec<&[u8]> = [Some(kernel), initrd].into_iter().flatten().collect();
    let image = assemble(FORMAT_VERSION, &json, &payload, Some(key));
    let (checked, _, _) = verify(&image, &[vk]).map_err(SealError::SelfCheck)?;
    Ok((image, checked))
}

/// What `seal` wrote.
#[derive(Debug, Clone)]
pub struct SealReport {
    /// The image file written.
    pub path: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// The manifest it carries.
    pub manifest: Manifest,
    /// The public half of the key that signed it.
    pub signer: VerifyingKey,
}

/// Creation time for a new image: `SOURCE_DATE_EPOCH` if set (reproducible builds),
/// else now.
pub fn creation_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

fn read_input(path: &Path) -> Result<Vec<u8>, SealError> {
    util::read_bounded(path, MAX_IMAGE_SIZE)
        .map_err(|source| SealError::Input {
            path: path.to_path_buf(),
            source,
        })?
        .map_err(|size| SealError::TooLarge {
            size,
            max: MAX_IMAGE_SIZE,
        })
}

/// Seal `kernel` (+ `initrd`) with `config`, signed by the secret key file `key`, into
/// `out`. The image is written to a temporary file beside `out` and renamed into place,
/// so on any error nothing is left behind (an existing `out` is replaced only on
/// success).
pub fn seal(
    kernel: &Path,
    initrd: Option<&Path>,
    config: VmConfig,
    key: &Path,
    out: &Path,
) -> Result<SealReport, SealError> {
    let sk = load_signing_key(key)?;
    let kernel_bytes = read_input(kernel)?;
    let initrd_bytes = initrd.map(read_input).transpose()?;
    let (image, manifest) = build(
        config,
        &kernel_bytes,
        initrd_bytes.as_deref(),
        creation_time(),
        &sk,
    )?;
    drop((kernel_bytes, initrd_bytes));
    util::write_atomic(out, &image, 0o644, true).map_err(|source| SealError::Output {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(SealReport {
        path: out.to_path_buf(),
        size: len64(image.len()),
        manifest,
        signer: sk.verifying_key(),
    })
}

#[cfg(test)]
mod tests;
