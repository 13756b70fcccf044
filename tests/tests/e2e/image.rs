//! Sealed appliance images end to end (DESIGN.md section 7, appliance/FORMAT.md): seal
//! the test GVM, boot it with `run --image`, and see altered, truncated or untrusted
//! images refused before anything boots.

use std::path::{Path, PathBuf};

use super::common::*;

/// What the sealed GVM's `exterior_run` prints.
const GREETING: &str = "sealed-hello";

fn arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `exterior-vmm keygen -o DIR/NAME`: returns (secret key, public key, fingerprint).
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let key = dir.join(name);
    let (code, out, err) = run(vmm().args(["keygen", "-o", arg(&key)]));
    assert_eq!(code, 0, "keygen failed: {err}");
    let public = dir.join(format!("{name}.pub"));
    assert!(
        key.is_file() && public.is_file(),
        "keygen wrote no key pair"
    );
    let fingerprint = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .expect("keygen prints the fingerprint")
        .trim()
        .to_string();
    (key, public, fingerprint)
}

/// Seal images/vmlinux + images/gvm.cpio with `exterior_run="echo sealed-hello"`.
fn seal_test_gvm(dir: &Path, key: &Path) -> PathBuf {
    seal_gvm_with(dir, key, &format!("echo {GREETING}"), &[])
}

/// Seal images/vmlinux + images/gvm.cpio with `exterior_run="SCRIPT"` and `extra` seal
/// options (e.g. `--mem`, `--cpus`).
fn seal_gvm_with(dir: &Path, key: &Path, script: &str, extra: &[&str]) -> PathBuf {
    let image = dir.join("gvm.img");
    let append = format!("exterior_run=\"{script}\"");
    let (code, out, err) = run(vmm()
        .args([
            "seal",
            "--kernel",
            arg(&images().join("vmlinux")),
            "--initrd",
            arg(&images().join("gvm.cpio")),
            "--append",
            &append,
            "--key",
            arg(key),
            "-o",
            arg(&image),
        ])
        .args(extra));
    assert_eq!(code, 0, "seal failed: {err}");
    assert!(
        out.contains("signature: valid"),
        "seal did not report a signature"
    );
    image
}

/// File offset of the kernel part: FORMAT.md puts it first in the payload, right after
/// magic (8) + version (4) + manifest length (4) + manifest + signature (64).
fn kernel_offset(image: &[u8]) -> usize {
    assert_eq!(image.get(..8), Some(&b"EXTVMIMG"[..]), "not a sealed image");
    let len: [u8; 4] = image[12..16].try_into().unwrap();
    16 + u32::from_le_bytes(len) as usize + 64
}

fn run_image(image: &Path, trust: &[&Path]) -> (i32, String, String) {
    let mut cmd = vmm();
    cmd.args(["run", "--image", arg(image)]);
    for key in trust {
        cmd.args(["--trust", arg(key)]);
    }
    run(&mut cmd)
}

/// `run` refused the image: exit status 2 (bad input, as the README promises), a refusal
/// on stderr, and no guest output at all (nothing was loaded, let alone booted).
fn assert_refused_before_boot((code, out, err): &(i32, String, String)) {
    assert_eq!(*code, 2, "run did not refuse the image with status 2");
    assert!(
        err.contains("refusing image"),
        "no refusal on stderr: {err}"
    );
    assert!(!out.contains("Linux version"), "a kernel booted");
    assert!(!out.contains("sealed-"), "the guest ran");
}

#[test]
fn sealed_gvm_boots_from_its_image() {
    let dir = scratch_dir("image-boot");
    let (key, public, fingerprint) = keygen(&dir, "key");
    let image = seal_test_gvm(&dir, &key);

    let (code, out, err) = run(vmm().args(["inspect", arg(&image), "--trust", arg(&public)]));
    assert_eq!(code, 0, "inspect refused a good image: {err}");
    assert!(out.contains(&format!("signature: valid (key {fingerprint})")));
    assert!(
        out.contains(GREETING),
        "inspect does not show the command line"
    );

    let (code, out, err) = run_image(&image, &[&public]);
    assert_eq!(code, 0, "run --image failed: {err}");
    // A line of its own: the kernel also echoes its command line, which contains it.
    assert_clean_console("the sealed guest's console", &out);
    let console = after_init("the sealed guest's console", &out);
    assert!(
        console.lines().any(|l| l.trim() == GREETING),
        "the sealed exterior_run did not run"
    );
    assert!(console.contains("exterior_run: exit status 0"));
}

#[test]
fn a_sealed_image_boots_with_the_memory_and_cpus_it_was_sealed_with() {
    let dir = scratch_dir("image-mem-cpus");
    let (key, public, _) = keygen(&dir, "key");
    let image = seal_gvm_with(
        &dir,
        &key,
        "echo sealed-cpus=$(grep -c processor /proc/cpuinfo) \
         sealed-mem=$(sed -n s/^MemTotal:\\ *//p /proc/meminfo)",
        &["--mem", "768M", "--cpus", "2"],
    );
    let (code, out, _) = run(vmm().args(["inspect", arg(&image), "--trust", arg(&public)]));
    assert_eq!(code, 0);
    assert!(
        out.contains("memory: 768 MiB") && out.contains("cpus: 2"),
        "{out}"
    );

    let (code, out, err) = run_image(&image, &[&public]);
    assert_eq!(code, 0, "run --image failed: {err}");
    assert_clean_console("the sealed guest's console", &out);
    let console = after_init("the sealed guest's console", &out);
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("sealed-cpus="))
        .unwrap_or_else(|| panic!("the sealed script did not run:\n{console}"));
    let (cpus, mem) = line
        .split_once(" sealed-mem=")
        .unwrap_or_else(|| panic!("no memory figure: {line}"));
    assert_eq!(cpus, "2", "the sealed guest does not have 2 CPUs");
    let kib: u64 = mem
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or_else(|_| panic!("MemTotal {mem:?}"));
    // What the kernel reports is what it was given, less its own image and reservations:
    // more than 512 MiB (the default) and no more than 768 MiB.
    assert!(kib > 512 << 10 && kib <= 768 << 10, "MemTotal {kib} kB");
}

#[test]
fn one_flipped_byte_in_the_kernel_is_refused_before_boot() {
    let dir = scratch_dir("image-kernel-flip");
    let (key, public, _) = keygen(&dir, "key");
    let image = seal_test_gvm(&dir, &key);
    let mut bytes = std::fs::read(&image).unwrap();
    let kernel_len = std::fs::metadata(images().join("vmlinux")).unwrap().len() as usize;
    let at = kernel_offset(&bytes) + kernel_len / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();

    let result = run_image(&image, &[&public]);
    assert_refused_before_boot(&result);
    assert!(
        result.2.contains("digest mismatch in kernel part"),
        "stderr does not name the digest mismatch: {}",
        result.2
    );

    let (code, out, _) = run(vmm().args(["inspect", arg(&image), "--trust", arg(&public)]));
    assert_ne!(code, 0, "inspect accepted a tampered image");
    assert!(out.contains("signature: NOT verified"));
}

#[test]
fn an_edited_manifest_is_refused_before_boot() {
    let dir = scratch_dir("image-manifest-edit");
    let (key, public, _) = keygen(&dir, "key");
    let image = seal_test_gvm(&dir, &key);
    let mut bytes = std::fs::read(&image).unwrap();
    // Change the sealed command: "sealed-hello" -> "sealed-jello".
    let at = bytes[..kernel_offset(&bytes)]
        .windows(GREETING.len())
        .position(|w| w == GREETING.as_bytes())
        .expect("command line in the manifest");
    bytes[at + "sealed-".len()] = b'j';
    std::fs::write(&image, &bytes).unwrap();

    let result = run_image(&image, &[&public]);
    assert_refused_before_boot(&result);
    assert!(
        result.2.contains("signature does not verify"),
        "stderr: {}",
        result.2
    );
}

#[test]
fn an_image_signed_by_an_unknown_key_is_refused() {
    let dir = scratch_dir("image-unknown-key");
    let (key, _, signer) = keygen(&dir, "signer");
    let (_, other, _) = keygen(&dir, "other");
    let image = seal_test_gvm(&dir, &key);

    let result = run_image(&image, &[&other]);
    assert_refused_before_boot(&result);
    assert!(
        result.2.contains(&format!("signed by key {signer}")) && result.2.contains("not among"),
        "stderr does not name the unknown key: {}",
        result.2
    );

    // No trusted key at all is a refusal too, never "unchecked".
    let result = run_image(&image, &[]);
    assert_refused_before_boot(&result);
    assert!(
        result.2.contains("no trusted public key"),
        "stderr: {}",
        result.2
    );
}

#[test]
fn a_truncated_image_is_refused() {
    let dir = scratch_dir("image-truncated");
    let (key, public, _) = keygen(&dir, "key");
    let image = seal_test_gvm(&dir, &key);
    let len = std::fs::metadata(&image).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();

    let result = run_image(&image, &[&public]);
    assert_refused_before_boot(&result);
    assert!(result.2.contains("truncated"), "stderr: {}", result.2);
}
