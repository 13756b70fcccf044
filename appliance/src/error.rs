//! Error types. Every refusal is its own variant so callers (and tests) can tell
//! them apart; the `Display` text is what the CLI prints.

use std::io;
use std::path::PathBuf;

use crate::PartKind;

/// Why an image was refused (or could not be read).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image is {size} bytes, larger than the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("not an exterior-vmm sealed image (bad magic)")]
    BadMagic,
    #[error("unsupported image format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("image truncated: the {what} needs {needed} bytes but the file has {actual}")]
    Truncated {
        what: &'static str,
        needed: u64,
        actual: u64,
    },
    #[error("manifest length {len} exceeds the {max}-byte limit")]
    ManifestTooLarge { len: u64, max: u64 },
    #[error("image is unsigned (all-zero signature)")]
    Unsigned,
    #[error("no trusted public key given (pass --trust KEY.pub)")]
    NoTrustedKeys,
    #[error(
        "image is signed by key {fingerprint}, which is not among the {trusted} trusted key(s)"
    )]
    UnknownKey { fingerprint: String, trusted: usize },
    #[error("signature does not verify against the trusted key(s): the header or manifest was altered, or the signature is corrupt")]
    BadSignature,
    #[error("manifest is not valid: {0}")]
    ManifestInvalid(String),
    #[error("manifest says format version {manifest} but the header says {header}")]
    VersionMismatch { header: u32, manifest: u32 },
    #[error("manifest names signer {claimed} but the signature was made by key {actual}")]
    SignerMismatch { claimed: String, actual: String },
    #[error("manifest has no kernel part")]
    MissingKernel,
    #[error("manifest part #{index} ({part}) is unexpected: parts must be kernel, then at most one initrd")]
    UnexpectedPart { index: usize, part: PartKind },
    #[error("{part} part is empty")]
    EmptyPart { part: PartKind },
    #[error("declared guest memory {mem_mib} MiB is outside {min}..={max} MiB")]
    MemOutOfRange { mem_mib: u64, min: u64, max: u64 },
    #[error("declared vCPU count {cpus} is outside 1..={max}")]
    CpusOutOfRange { cpus: u8, max: u8 },
    #[error("command line is {len} bytes, longer than the {max}-byte limit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a control character")]
    CmdlineInvalid,
    #[error(
        "declared part sizes ({total} bytes) exceed the declared guest memory ({mem_mib} MiB)"
    )]
    ExceedsMemory { total: u64, mem_mib: u64 },
    #[error("image truncated or declared sizes exceed the file: {part} part (offset {offset}, size {size}) does not fit the {payload}-byte payload")]
    PartExceedsFile {
        part: PartKind,
        offset: u64,
        size: u64,
        payload: u64,
    },
    #[error("{part} part is at payload offset {offset}, expected {expected} (parts must be contiguous, kernel first)")]
    BadLayout {
        part: PartKind,
        offset: u64,
        expected: u64,
    },
    #[error("{extra} unsigned trailing byte(s) after the last part")]
    TrailingData { extra: u64 },
    #[error("sha256 digest mismatch in {part} part: manifest says {expected}, contents hash to {actual}")]
    DigestMismatch {
        part: PartKind,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Problems with key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("key file {path} is not a valid key: {reason}")]
    BadFormat { path: PathBuf, reason: String },
    #[error("secret key {path} has mode {mode:o}: it must not be readable or writable by group or others (chmod 600)")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cannot get randomness for key generation: {0}")]
    Random(String),
}

/// Why `seal` could not produce an image. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read {path}: {source}")]
    Input {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write image {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image would be {size} bytes, larger than the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("manifest would be {len} bytes, larger than the {max}-byte limit")]
    ManifestTooLarge { len: u64, max: u64 },
    #[error("invalid VM configuration: {0}")]
    Config(#[source] ImageError),
    #[error("internal error: the sealed image does not verify: {0}")]
    SelfCheck(#[source] ImageError),
    #[error(transparent)]
    Key(#[from] KeyError),
}
