//! Helpers shared by the unit tests and the fuzz target (`fuzz/`). Not a stable API.

use sha2::{Digest, Sha256};

use crate::{
    build_image, inspect_bytes, parse_and_verify, validate_config, verify_owned, PartKind,
    SigningKey, VerifiedImage, VerifyingKey, VmConfig, HEADER_LEN, SIGNATURE_LEN,
};

/// Seed byte of the key the fuzz target trusts and re-signs with.
pub const FUZZ_KEY_SEED: u8 = 0x42;
/// Creation time of [`sample_image`].
pub const SAMPLE_CREATED: u64 = 1_767_225_600;

/// A deterministic signing key.
pub fn fixed_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn sample_config() -> VmConfig {
    VmConfig {
        mem_mib: 64,
        cpus: 1,
        cmdline: "exterior_run=\"echo hi\"".into(),
        svm: false,
    }
}

pub fn sample_kernel() -> Vec<u8> {
    (0..96u32)
        .map(|i| u8::try_from(i.wrapping_mul(7) % 251).unwrap_or(0))
        .collect()
}

pub fn sample_initrd() -> Vec<u8> {
    b"070701 pretend cpio archive".to_vec()
}

/// A small valid image (kernel + initrd) signed by `key`; deterministic.
pub fn sample_image(key: &SigningKey) -> Vec<u8> {
    build_image(
        sample_config(),
        &sample_kernel(),
        Some(&sample_initrd()),
        SAMPLE_CREATED,
        key,
    )
    .unwrap_or_default()
}

/// Recompute the signature of a (possibly mangled) image in place with `key`, over
/// whatever header and manifest length it declares. `false` if it is too short.
pub fn resign(buf: &mut [u8], key: &SigningKey) -> bool {
    let Some(mlen) = buf
        .get(12..16)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .and_then(|m| usize::try_from(m).ok())
    else {
        return false;
    };
    let Some(signed_end) = HEADER_LEN.checked_add(mlen) else {
        return false;
    };
    let Some(sig_end) = signed_end.checked_add(SIGNATURE_LEN) else {
        return false;
    };
    if sig_end > buf.len() {
        return false;
    }
    let (signed, rest) = buf.split_at_mut(signed_end);
    let sig = ed25519_dalek::Signer::sign(key, signed).to_bytes();
    match rest.get_mut(..SIGNATURE_LEN) {
        Some(slot) => {
            slot.copy_from_slice(&sig);
            true
        }
        None => false,
    }
}

/// Verify `buf` both ways (borrowed and owned) and, if it is accepted, check what a
/// verified image promises. Panics on any broken promise; returns the image.
pub fn check_invariants(buf: &[u8], trusted: &[VerifyingKey]) -> Option<VerifiedImage> {
    let by_slice = parse_and_verify(buf, trusted);
    let by_owned = verify_owned(buf.to_vec(), trusted);
    let img = match (by_slice, by_owned) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.manifest, b.manifest);
            assert_eq!(a.kernel, b.kernel);
            assert_eq!(a.initrd, b.initrd);
            assert_eq!(a.signer, b.signer);
            a
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            return None;
        }
        (a, b) => panic!("borrowed and owned verification disagree: {a:?} vs {b:?}"),
    };
    assert!(trusted.contains(&img.signer));
    assert_eq!(img.manifest.signer, img.signer.to_bytes());
    assert!(validate_config(img.config()).is_ok());
    let k = img
        .manifest
        .part(PartKind::Kernel)
        .expect("verified image has a kernel");
    assert_eq!(k.size, img.kernel.len() as u64);
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&img.kernel)), k.sha256);
    let mut total = k.size;
    match (img.manifest.part(PartKind::Initrd), &img.initrd) {
        (Some(e), Some(bytes)) => {
            assert_eq!(e.size, bytes.len() as u64);
            assert_eq!(<[u8; 32]>::from(Sha256::digest(bytes)), e.sha256);
            total += e.size;
        }
        (None, None) => {}
        _ => panic!("initrd entry and bytes disagree"),
    }
    assert!(total <= img.config().mem_mib << 20);
    assert!(total <= buf.len() as u64);
    Some(img)
}

/// The fuzz target's body. Input byte 0 selects a mode: odd = the rest is an image
/// whose signature is recomputed with the trusted fuzz key first (so the fuzzer can
/// explore everything behind the signature check); any input is also verified as is.
pub fn fuzz_one(data: &[u8]) {
    let key = fixed_key(FUZZ_KEY_SEED);
    let vk = key.verifying_key();
    check_invariants(data, &[vk]);
    let _ = inspect_bytes(data, &[vk]);
    let _ = inspect_bytes(data, &[]);
    if let Some((&mode, rest)) = data.split_first() {
        if mode & 1 == 1 {
            let mut image = rest.to_vec();
            if resign(&mut image, &key) {
                check_invariants(&image, &[vk]);
            }
        }
    }
}
