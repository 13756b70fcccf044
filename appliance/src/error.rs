//! Error types. Every refusal is its own variant so callers (and tests) can tell
//! them apart; the `Display` text is what the CLI prints.

use std::io;
use std::path::PathBuf;

use crate::PartKind;

/// Why an image was refused (or could not be read).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be read.
    #[error("cannot read image {path}: {source}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_IMAGE_SIZE`](crate::MAX_IMAGE_SIZE).
    #[error("image is {size} bytes, larger than the {max}-byte limit")]
    TooLarge {
        /// The file's size in bytes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file does not start with [`MAGIC`](crate::MAGIC).
    #[error("not an exterior-vmm sealed image (bad magic)")]
    BadMagic,
    #[error("unsupported image format version {found} (this build reads version {supported})")]
    /// The header's format version is not [`FORMAT_VERSION`](crate::FORMAT_VERSION).
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    #[error("image truncated: the {what} needs {needed} bytes but the file has {actual}")]
    /// The file ends before its header, manifest or signature does.
    Truncated {
        /// The piece that does not fit: "header", "manifest and signature" or "signature".
        what: &'static str,
        /// Bytes the file needs to hold it.
        needed: u64,
        /// The file's length.
        actual: u64,
    },
    /// The header declares a manifest longer than [`MAX_MANIFEST_LEN`](crate::MAX_MANIFEST_LEN).
    #[error("manifest length {len} exceeds the {max}-byte limit")]
    ManifestTooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The signature is all zeros: the image was never signed.
    #[error("image is unsigned (all-zero signature)")]
    Unsigned,
    /// Verification was asked for with no trusted key.
    #[error("no trusted public key given (pass --trust KEY.pub)")]
    NoTrustedKeys,
    #[error(
        "image is signed by key {fingerprint}, which is not among the {trusted} trusted key(s)"
    )]
    /// No trusted key verifies the signature, and the manifest names a key that is not
    /// trusted.
    UnknownKey {
        /// Fingerprint of the key the manifest names as signer.
        fingerprint: String,
        /// How many keys were trusted.
        trusted: usize,
    },
    #[error("signature does not verify against the trusted key(s): the header or manifest was altered, or the signature is corrupt")]
    /// No trusted key verifies the signature, yet the manifest names no untrusted key: the
    /// header, the manifest or the signature was altered.
    BadSignature,
    /// The (signed) manifest is not the expected JSON (the parser's message).
    #[error("manifest is not valid: {0}")]
    ManifestInvalid(String),
    #[error("manifest says format version {manifest} but the header says {header}")]
    /// The manifest's format version differs from the header's.
    VersionMismatch {
        /// The header's version.
        header: u32,
        /// The manifest's version.
        manifest: u32,
    },
    #[error("manifest names signer {claimed} but the signature was made by key {actual}")]
    /// The manifest names another signer than the key whose signature verified.
    SignerMismatch {
        /// Fingerprint of the key the manifest names.
        claimed: String,
        /// Fingerprint of the key that signed.
        actual: String,
    },
    /// The manifest lists no kernel.
    #[error("manifest has no kernel part")]
    MissingKernel,
    #[error("manifest part #{index} ({part}) is unexpected: parts must be kernel, then at most one initrd")]
    /// The parts are not a kernel followed by at most one initrd.
    UnexpectedPart {
        /// Position of the offending entry in the manifest's part list.
        index: usize,
        /// Its kind.
        part: PartKind,
    },
    #[error("{part} part is empty")]
    /// A part has size zero.
    EmptyPart {
        /// Which part.
        part: PartKind,
    },
    #[error("declared guest memory {mem_mib} MiB is outside {min}..={max} MiB")]
    /// The declared guest memory is outside the VMM's limits.
    MemOutOfRange {
        /// The declared memory in MiB.
        mem_mib: u64,
        /// The smallest allowed, in MiB.
        min: u64,
        /// The largest allowed, in MiB.
        max: u64,
    },
    #[error("declared vCPU count {cpus} is outside 1..={max}")]
    /// The declared vCPU count is zero or above the VMM's limit.
    CpusOutOfRange {
        /// The declared count.
        cpus: u8,
        /// The most allowed.
        max: u8,
    },
    #[error("command line is {len} bytes, longer than the {max}-byte limit")]
    /// The command line is longer than [`MAX_CMDLINE_LEN`](crate::MAX_CMDLINE_LEN).
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a control character.
    #[error("command line contains a control character")]
    CmdlineInvalid,
    #[error(
        "declared part sizes ({total} bytes) exceed the declared guest memory ({mem_mib} MiB)"
    )]
    /// The parts together are larger than the declared guest memory.
    ExceedsMemory {
        /// Their declared sizes summed, in bytes (`u64::MAX` if the sum overflows).
        total: u64,
        /// The declared memory in MiB.
        mem_mib: u64,
    },
    #[error("image truncated or declared sizes exceed the file: {part} part (offset {offset}, size {size}) does not fit the {payload}-byte payload")]
    /// A part's declared range runs past the end of the file.
    PartExceedsFile {
        /// Which part.
        part: PartKind,
        /// Its declared offset in the payload.
        offset: u64,
        /// Its declared size.
        size: u64,
        /// The payload's actual length (the file after the signature).
        payload: u64,
    },
    #[error("{part} part is at payload offset {offset}, expected {expected} (parts must be contiguous, kernel first)")]
    /// A part does not start where the previous one ends (kernel at offset 0).
    BadLayout {
        /// Which part.
        part: PartKind,
        /// Its declared offset in the payload.
        offset: u64,
        /// Where it had to start.
        expected: u64,
    },
    #[error("{extra} unsigned trailing byte(s) after the last part")]
    /// Bytes follow the last part: nothing signed covers them.
    TrailingData {
        /// How many.
        extra: u64,
    },
    #[error("sha256 digest mismatch in {part} part: manifest says {expected}, contents hash to {actual}")]
    /// A part's contents do not hash to the digest in the manifest.
    DigestMismatch {
        /// Which part.
        part: PartKind,
        /// The manifest's sha256, in hex.
        expected: String,
        /// The contents' sha256, in hex.
        actual: String,
    },
    /// A trusted key file could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Problems with key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key")]
    /// `keygen` would overwrite an existing key file.
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    #[error("key file {path} is not a valid key: {reason}")]
    /// A key file does not hold a key in the expected format.
    BadFormat {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    #[error("secret key {path} has mode {mode:o}: it must not be readable or writable by group or others (chmod 600)")]
    /// A secret key file is accessible to group or others.
    Permissions {
        /// The secret key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The system's random source failed (its message).
    #[error("cannot get randomness for key generation: {0}")]
    Random(String),
}

/// Why `seal` could not produce an image. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A kernel or initrd to seal could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// The image could not be written.
    #[error("cannot write image {path}: {source}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// Why it could not be written.
        #[source]
        source: io::Error,
    },
    /// The image (or an input) would be larger than [`MAX_IMAGE_SIZE`](crate::MAX_IMAGE_SIZE).
    #[error("the image would be {size} bytes, larger than the {max}-byte limit")]
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The manifest would be longer than [`MAX_MANIFEST_LEN`](crate::MAX_MANIFEST_LEN).
    #[error("manifest would be {len} bytes, larger than the {max}-byte limit")]
    ManifestTooLarge {
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The VM configuration or parts break a rule that verification would enforce.
    #[error("invalid VM configuration: {0}")]
    Config(#[source] ImageError),
    /// The freshly sealed image failed verification (a bug, never written out).
    #[error("internal error: the sealed image does not verify: {0}")]
    SelfCheck(#[source] ImageError),
    /// The signing key could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
}
