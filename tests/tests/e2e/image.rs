//! Sealed appliance images end to end (DESIGN.md section 7, appliance/FORMAT.md): seal
//! the test GVM and boot it with `run --image`. Altered, truncated or untrusted images
//! are refused before anything loads, which needs no KVM: those tests are host tests
//! (`exterior-vmm/tests/cli.rs`).

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

fn run_image(image: &Path, trust: &[&Path]) -> (i32, String, String) {
    let mut cmd = vmm();
    cmd.args(["run", "--image", arg(image)]);
    for key in trust {
        cmd.args(["--trust", arg(key)]);
    }
    run(&mut cmd)
}

/// One sealed image, inspected and booted: `inspect` shows its signer, command line,
/// memory and CPUs; `run --image` boots it with them (two tests once, one boot now).
#[test]
fn a_sealed_gvm_boots_from_its_image_with_the_memory_and_cpus_it_was_sealed_with() {
    let dir = scratch_dir("image-boot");
    let (key, public, fingerprint) = keygen(&dir, "key");
    let image = seal_gvm_with(
        &dir,
        &key,
        &format!(
            "echo {GREETING}; echo sealed-cpus=$(grep -c processor /proc/cpuinfo) \
             sealed-mem=$(sed -n s/^MemTotal:\\ *//p /proc/meminfo)"
        ),
        &["--mem", "768M", "--cpus", "2"],
    );

    let (code, out, err) = run(vmm().args(["inspect", arg(&image), "--trust", arg(&public)]));
    assert_eq!(code, 0, "inspect refused a good image: {err}");
    assert!(out.contains(&format!("signature: valid (key {fingerprint})")));
    assert!(
        out.contains(GREETING),
        "inspect does not show the command line"
    );
    assert!(
        out.contains("memory: 768 MiB") && out.contains("cpus: 2"),
        "{out}"
    );

    let (code, out, err) = run_image(&image, &[&public]);
    assert_eq!(code, 0, "run --image failed: {err}");
    assert_clean_console("the sealed guest's console", &out);
    // A line of its own: the kernel also echoes its command line, which contains it.
    let console = after_init("the sealed guest's console", &out);
    assert!(
        console.lines().any(|l| l.trim() == GREETING),
        "the sealed exterior_run did not run"
    );
    assert!(console.contains("exterior_run: exit status 0"));
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
