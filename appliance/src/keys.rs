//! Key files.
//!
//! Both are small text files: a header line naming the kind, then the 32 key bytes as
//! 64 hex digits, each line ending in `\n`:
//!
//! ```text
//! exterior-vmm-ed25519-secret-v1      exterior-vmm-ed25519-public-v1
//! <64 hex: the ed25519 seed>          <64 hex: the ed25519 public key>
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::util::{hex_decode_32, hex_encode, read_bounded, with_suffix, write_atomic};
use crate::KeyError;

/// First line of a secret key file.
pub const SECRET_HEADER: &str = "exterior-vmm-ed25519-secret-v1";
/// First line of a public key file.
pub const PUBLIC_HEADER: &str = "exterior-vmm-ed25519-public-v1";
const MAX_KEY_FILE: u64 = 4096;

/// Short, stable name of a public key: the first 16 bytes of sha256(key), in hex.
pub fn fingerprint(key: &VerifyingKey) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex_encode(d.get(..16).unwrap_or(&d))
}

/// The public key file that goes with a secret key file (`KEY` -> `KEY.pub`).
pub fn public_key_path(secret: &Path) -> PathBuf {
    with_suffix(secret, ".pub")
}

/// Encode a secret key file.
pub fn encode_secret(key: &SigningKey) -> Zeroizing<String> {
    let seed = Zeroizing::new(key.to_bytes());
    Zeroizing::new(format!("{SECRET_HEADER}\n{}\n", hex_encode(&seed[..])))
}

/// Encode a public key file.
pub fn encode_public(key: &VerifyingKey) -> String {
    format!("{PUBLIC_HEADER}\n{}\n", hex_encode(key.as_bytes()))
}

fn bad(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::BadFormat {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parse `text` as a key file with `header`; returns the 32 key bytes.
fn decode(path: &Path, text: &str, header: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().ok_or_else(|| bad(path, "empty file"))?;
    if first != header {
        let hint = match (first, header) {
            (SECRET_HEADER, PUBLIC_HEADER) => " (this is a secret key; pass the .pub file)",
            (PUBLIC_HEADER, SECRET_HEADER) => " (this is a public key; pass the secret key)",
            _ => "",
        };
        return Err(bad(path, format!("first line must be `{header}`{hint}")));
    }
    let body = lines.next().ok_or_else(|| bad(path, "missing key line"))?;
    if lines.next().is_some() {
        return Err(bad(path, "unexpected extra lines"));
    }
    hex_decode_32(body)
        .map(Zeroizing::new)
        .ok_or_else(|| bad(path, "key line must be 64 hex digits"))
}

fn read_text(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = read_bounded(path, MAX_KEY_FILE)
        .map_err(io_err)?
        .map_err(|_| bad(path, "file too large for a key"))?;
    String::from_utf8(bytes)
        .map(Zeroizing::new)
        .map_err(|_| bad(path, "not UTF-8 text"))
}

/// Parse a public key file's contents.
pub fn parse_public(path: &Path, text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = decode(path, text, PUBLIC_HEADER)?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| bad(path, "not a valid ed25519 public key"))?;
    // A trusted key must be a canonical encoding of a point of large order: anything
    // else can be made to "verify" signatures nobody made.
    if key.is_weak() || key.to_edwards().compress().to_bytes() != *bytes {
        return Err(bad(path, "weak or non-canonical ed25519 public key"));
    }
    Ok(key)
}

/// Parse a secret key file's contents.
pub fn parse_secret(path: &Path, text: &str) -> Result<SigningKey, KeyError> {
    let seed = decode(path, text, SECRET_HEADER)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Load a public key file (`KEY.pub`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    parse_public(path, &read_text(path)?)
}

/// Load a secret key file; refuses one that group or others can access.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    parse_secret(path, &read_text(path)?)
}

/// Load every public key file in `paths`.
pub fn load_trusted(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, KeyError> {
    paths.iter().map(|p| load_verifying_key(p)).collect()
}

/// What `keygen` wrote.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The secret key file (mode 0600).
    pub secret_path: PathBuf,
    /// The public key file (`secret_path` + `.pub`, mode 0644).
    pub public_path: PathBuf,
    /// The public key.
    pub public: VerifyingKey,
}

fn exists(path: &Path) -> Result<bool, KeyError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Generate a key pair: `secret` (mode 0600) and `secret.pub` (mode 0644). Refuses if
/// either exists; each file appears complete or not at all, and if the public key
/// cannot be written the secret key is removed again.
pub fn keygen(secret: &Path) -> Result<GeneratedKey, KeyError> {
    let public_path = public_key_path(secret);
    for p in [secret, public_path.as_path()] {
        if exists(p)? {
            return Err(KeyError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();

    let map_write = |path: &Path, source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    write_atomic(secret, encode_secret(&key).as_bytes(), 0o600, false)
        .map_err(|e| map_write(secret, e))?;
    if let Err(e) = write_atomic(
        &public_path,
        encode_public(&public).as_bytes(),
        0o644,
        false,
    ) {
        let _ = fs::remove_file(secret);
        return Err(map_write(&public_path, e));
    }
    Ok(GeneratedKey {
        secret_path: secret.to_path_buf(),
        public_path,
        public,
    })
}
