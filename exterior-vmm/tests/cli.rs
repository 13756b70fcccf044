//! Bad input to `exterior-vmm run`: each case gets a specific error and exit status 2 (3 for
//! a host without KVM), before any guest runs. These need no working KVM.

use std::path::{Path, PathBuf};
use std::process::Command;

fn vmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exterior-vmm"));
    // Never fall back to images a developer happens to have.
    cmd.env("EXTERIOR_IMAGES", "/nonexistent-images");
    cmd
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("spawn exterior-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exterior-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An ELF64 x86-64 executable with one 16-byte PT_LOAD segment at 16 MiB: it loads, so
/// whatever fails after it is the case under test.
fn minimal_elf(dir: &Path) -> PathBuf {
    let mut elf = vec![0u8; 64 + 56 + 16];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16] = 2;
    elf[18] = 62;
    elf[20] = 1;
    elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52] = 64;
    elf[54] = 56;
    elf[56] = 1;
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes());
    let path = dir.join("vmlinux");
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn missing_kernel_file() {
    let (code, err) = run(vmm().args(["run", "--kernel", "/nonexistent/vmlinux"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("kernel /nonexistent/vmlinux: No such file"),
        "{err}"
    );
}

#[test]
fn missing_default_kernel_names_the_fix() {
    let (code, err) = run(vmm().arg("run"));
    assert_eq!(code, 2);
    assert!(err.contains("tools/setup"), "{err}");
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let dir = scratch("notkernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "just some text\n".repeat(100)).unwrap();
    let (code, err) = run(vmm().args(["run", "--kernel"]).arg(&path));
    assert_eq!(code, 2);
    assert!(err.contains("not a Linux kernel"), "{err}");
}

#[test]
fn a_truncated_elf_kernel() {
    let dir = scratch("truncated");
    let full = std::fs::read(minimal_elf(&dir)).unwrap();
    let path = dir.join("cut");
    // The header survives, the program headers do not.
    std::fs::write(&path, &full[..80]).unwrap();
    let (code, err) = run(vmm().args(["run", "--kernel"]).arg(&path));
    assert_eq!(code, 2);
    assert!(err.contains("invalid or truncated ELF kernel"), "{err}");
}

#[test]
fn an_empty_kernel_file() {
    let dir = scratch("empty");
    let path = dir.join("empty");
    std::fs::write(&path, b"").unwrap();
    let (code, err) = run(vmm().args(["run", "--kernel"]).arg(&path));
    assert_eq!(code, 2);
    assert!(err.contains("empty file"), "{err}");
}

#[test]
fn an_initrd_that_does_not_fit_in_memory() {
    let dir = scratch("initrd");
    let kernel = minimal_elf(&dir);
    let initrd = dir.join("big.cpio");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let (code, err) = run(vmm()
        .args(["run", "--mem", "64M", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd));
    assert_eq!(code, 2);
    assert!(err.contains("does not fit in 64 MiB"), "{err}");
}

#[test]
fn memory_too_small_or_unparsable() {
    let (code, err) = run(vmm().args(["run", "--mem", "16M"]));
    assert_eq!(code, 2);
    assert!(err.contains("too small"), "{err}");
    let (code, err) = run(vmm().args(["run", "--mem", "lots"]));
    assert_eq!(code, 2);
    assert!(err.contains("not a size"), "{err}");
}

#[test]
fn zero_cpus() {
    let (code, err) = run(vmm().args(["run", "--cpus", "0"]));
    assert_eq!(code, 2);
    assert!(err.contains("at least one vCPU"), "{err}");
}

#[test]
fn an_unknown_argument() {
    let (code, err) = run(vmm().args(["run", "--frobnicate"]));
    assert_eq!(code, 2);
    assert!(err.contains("Unrecognized argument: --frobnicate"), "{err}");
}

#[test]
fn a_host_without_kvm() {
    let dir = scratch("nokvm");
    let kernel = minimal_elf(&dir);
    let (code, err) = run(vmm()
        .env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--kernel"])
        .arg(&kernel));
    assert_eq!(code, 3);
    assert!(
        err.contains("cannot open /nonexistent/kvm") && err.contains("is KVM available"),
        "{err}"
    );
}

#[test]
fn kvm_probe_without_kvm_says_so() {
    let out = vmm()
        .env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .arg("kvm-probe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no usable KVM"));
}

fn with_runtime(cmd: &mut Command, tag: &str) -> PathBuf {
    let rt = scratch(tag).join("run");
    cmd.env("EXTERIOR_RUNTIME_DIR", &rt);
    rt
}

#[test]
fn instance_commands_name_a_missing_instance() {
    let mut cmd = vmm();
    with_runtime(&mut cmd, "missing");
    let (code, err) = run(cmd.args(["exec", "nope", "--", "true"]));
    assert_eq!(code, 2);
    assert!(err.contains("no running instance named nope"), "{err}");
}

#[test]
fn list_with_no_instances_prints_nothing() {
    let mut cmd = vmm();
    with_runtime(&mut cmd, "empty");
    let out = cmd.arg("list").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_instance_names_and_detach_without_name() {
    let dir = scratch("names");
    let kernel = minimal_elf(&dir);
    let mut cmd = vmm();
    with_runtime(&mut cmd, "names-rt");
    let (code, err) = run(cmd
        .args(["run", "--name", "../evil", "--kernel"])
        .arg(&kernel));
    assert_eq!(code, 2);
    assert!(err.contains("instance name"), "{err}");
    let (code, err) = run(vmm().args(["run", "--detach"]));
    assert_eq!(code, 2);
    assert!(err.contains("--detach needs --name"), "{err}");
}

#[test]
fn a_call_deadline_is_checked_and_needs_an_instance() {
    let dir = scratch("deadline");
    let kernel = minimal_elf(&dir);
    for bad in ["0", "3601"] {
        let mut cmd = vmm();
        with_runtime(&mut cmd, "deadline-rt");
        let (code, err) = run(cmd
            .args(["run", "--name", "dl", "--call-deadline", bad, "--kernel"])
            .arg(&kernel));
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "--call-deadline {bad}: give a whole number of seconds from 1 to 3600"
            )),
            "{err}"
        );
    }
    let (code, err) = run(vmm()
        .args(["run", "--call-deadline", "10", "--kernel"])
        .arg(&kernel));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--call-deadline needs --name"), "{err}");
}

#[test]
fn hold_times_are_checked_from_options_and_environment_and_need_an_instance() {
    let dir = scratch("hold");
    let kernel = minimal_elf(&dir);
    let attempt = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = vmm();
        with_runtime(&mut cmd, "hold-rt");
        cmd.env_remove("EXTERIOR_HOLD_SLICE_US")
            .env_remove("EXTERIOR_HOLD_IDLE_US");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        run(cmd
            .args(["run", "--name", "hold"])
            .args(args)
            .arg("--kernel")
            .arg(&kernel))
    };
    let (code, err) = attempt(&["--hold-slice-us", "1000001"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--hold-slice-us (EXTERIOR_HOLD_SLICE_US) 1000001: give a whole number of microseconds from 0 to 1000000"),
        "{err}"
    );
    let (code, err) = attempt(&[], Some(("EXTERIOR_HOLD_IDLE_US", "5000000")));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--hold-idle-us (EXTERIOR_HOLD_IDLE_US) 5000000:"),
        "{err}"
    );
    let (code, err) = attempt(&[], Some(("EXTERIOR_HOLD_SLICE_US", "2ms")));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("EXTERIOR_HOLD_SLICE_US=\"2ms\": not a whole number of microseconds"),
        "{err}"
    );
    // The option wins over the environment.
    let (code, err) = attempt(
        &["--hold-idle-us", "1000001"],
        Some(("EXTERIOR_HOLD_IDLE_US", "10")),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("(EXTERIOR_HOLD_IDLE_US) 1000001:"), "{err}");
    let (code, err) = run(vmm()
        .args(["run", "--hold-slice-us", "10", "--kernel"])
        .arg(&kernel));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--hold-slice-us and --hold-idle-us need --name"),
        "{err}"
    );
}

#[test]
fn bad_disks_are_refused_before_any_guest_runs() {
    let dir = scratch("disks");
    let kernel = minimal_elf(&dir);
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 700]).unwrap();
    let good = dir.join("good.img");
    std::fs::write(&good, vec![0u8; 4096]).unwrap();
    let missing = dir.join("missing.img");
    let cases = [
        (
            format!("{}", missing.display()),
            "missing.img: No such file or directory",
        ),
        (
            format!("{},ro", odd.display()),
            "700 bytes is not a whole number of 512-byte sectors",
        ),
        (
            format!("{},readonly", good.display()),
            "give PATH or PATH,ro",
        ),
    ];
    for (disk, want) in cases {
        let (code, err) = run(vmm()
            .args(["run", "--disk", &disk, "--kernel"])
            .arg(&kernel));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "--disk {disk}: {err}");
    }
    // An instance checks its disks before anything starts too.
    let mut cmd = vmm();
    with_runtime(&mut cmd, "disks-rt");
    let (code, err) = run(cmd
        .args([
            "run",
            "--name",
            "d",
            "--disk",
            odd.to_str().unwrap(),
            "--kernel",
        ])
        .arg(&kernel));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not a whole number of 512-byte sectors"),
        "{err}"
    );
    // The image was not touched by any of it.
    assert_eq!(std::fs::read(&good).unwrap(), vec![0u8; 4096]);
}

#[test]
fn bad_network_devices_are_refused_before_any_guest_runs() {
    let dir = scratch("nets");
    let kernel = minimal_elf(&dir);
    for (net, want) in [
        ("extap0", "give tap=NAME or tap=NAME,mac="),
        ("tap=extap0,mac=01:00:5e:00:00:01", "(a unicast MAC)"),
        ("tap=this-name-is-too-long", "a name of 1 to 15 letters"),
    ] {
        let (code, err) = run(vmm().args(["run", "--net", net, "--kernel"]).arg(&kernel));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "--net {net}: {err}");
    }
}

#[test]
fn exec_without_a_command() {
    let (code, err) = run(vmm().args(["exec", "x"]));
    assert_eq!(code, 2);
    assert!(err.contains("no command given"), "{err}");
}

#[test]
fn a_shared_runtime_directory_is_refused() {
    let dir = scratch("shared-rt");
    let rt = dir.join("run");
    std::fs::create_dir(&rt).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = run(vmm().env("EXTERIOR_RUNTIME_DIR", &rt).arg("list"));
    assert_eq!(code, 2);
    assert!(err.contains("is not private"), "{err}");
}

#[test]
fn a_quiesce_hold_past_a_minute_is_refused_before_any_instance_is_asked() {
    let dir = scratch("hold");
    let (code, err) = run(vmm()
        .env("EXTERIOR_RUNTIME_DIR", dir.join("run"))
        .args(["quiesce", "nowhere", "--hold", "60001"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--hold 60001 ms is longer than the 60000 ms allowed"),
        "{err}"
    );
    let (code, err) = run(vmm().args(["quiesce", "nowhere", "--hold", "soon"]));
    assert_ne!(code, 0);
    assert!(err.contains("--hold"), "{err}");
}

#[test]
fn a_console_idle_outside_its_bounds_is_refused_before_any_instance_is_asked() {
    let dir = scratch("idle");
    for idle in ["0", "49", "600001"] {
        let (code, err) = run(vmm().env("EXTERIOR_RUNTIME_DIR", dir.join("run")).args([
            "console",
            "nowhere",
            "--idle-ms",
            idle,
        ]));
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("--idle-ms {idle} is outside 50..=600000")),
            "{err}"
        );
    }
}

/// `run --name` with `--svm-initrd PATH` (and `--svm-kernel` the same file as `--kernel`),
/// on a host without KVM: everything about the SVM image is checked before KVM is opened,
/// so a refusal here is the image check's.
fn run_instance_with_svm_image(tag: &str, svm: &Path) -> (i32, String) {
    let dir = scratch(tag);
    let kernel = minimal_elf(&dir);
    let mut cmd = vmm();
    with_runtime(&mut cmd, &format!("{tag}-rt"));
    run(cmd
        .env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--name", tag, "--kernel"])
        .arg(&kernel)
        // The SVM boots the same bytes (the kernel check passes: tests below attack it).
        .arg("--svm-kernel")
        .arg(&kernel)
        .arg("--svm-initrd")
        .arg(svm))
}

#[test]
fn an_svm_image_without_a_recorded_digest_is_refused() {
    let dir = scratch("svm-nodigest");
    let svm = dir.join("svm.cpio");
    std::fs::write(&svm, b"070701 not really a cpio").unwrap();
    let (code, err) = run_instance_with_svm_image("svmnodigest", &svm);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no recorded digest") && err.contains("svm.cpio.sha256"),
        "{err}"
    );
}

#[test]
fn an_svm_image_that_changed_after_its_digest_was_recorded_is_refused() {
    let dir = scratch("svm-changed");
    let svm = dir.join("svm.cpio");
    let bytes = b"070701 the image as it was built".to_vec();
    // sha256 of the bytes above, computed independently with `sha256sum`.
    let recorded = "1ea65ab827f76b9c8cf31ddd1574ce72d4d922e6f16addb2798fc1c5d23b8062";
    std::fs::write(
        dir.join("svm.cpio.sha256"),
        format!("{recorded}  svm.cpio\n"),
    )
    .unwrap();
    let mut changed = bytes.clone();
    changed[7] ^= 1;
    std::fs::write(&svm, &changed).unwrap();
    let (code, err) = run_instance_with_svm_image("svmchanged", &svm);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not the recorded") && err.contains(recorded) && err.contains("refusing"),
        "{err}"
    );
}

#[test]
fn an_svm_image_matching_its_digest_gets_as_far_as_kvm() {
    let dir = scratch("svm-good");
    let svm = dir.join("svm.cpio");
    let bytes = b"070701 the image as it was built".to_vec();
    std::fs::write(&svm, &bytes).unwrap();
    let recorded = "1ea65ab827f76b9c8cf31ddd1574ce72d4d922e6f16addb2798fc1c5d23b8062";
    std::fs::write(
        dir.join("svm.cpio.sha256"),
        format!("{recorded}  svm.cpio\n"),
    )
    .unwrap();
    let (code, err) = run_instance_with_svm_image("svmgood", &svm);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot open /nonexistent/kvm"), "{err}");
}

#[test]
fn images_in_the_working_directory_are_never_used() {
    // A copy of the binary where no repository's images/ is beside it, run from a directory
    // the guest's owner might control, holding a file named like the default kernel: were
    // it used, the refusal would name it ("not a Linux kernel").
    let exe_dir = scratch("cwd-exe").join("target/release");
    std::fs::create_dir_all(&exe_dir).unwrap();
    let exe = exe_dir.join("exterior-vmm");
    std::fs::copy(env!("CARGO_BIN_EXE_exterior-vmm"), &exe).unwrap();
    let dir = scratch("cwd-images");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/vmlinux"), "planted text\n".repeat(100)).unwrap();
    let out = Command::new(&exe)
        .env_remove("EXTERIOR_IMAGES")
        .env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .current_dir(&dir)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no --kernel given and no images directory")
            && err.contains("the working directory is never searched"),
        "{err}"
    );
}

// Sealed images (appliance/FORMAT.md) that are altered, truncated or untrusted are
// refused before anything loads: a check of the image alone, so it needs no KVM and runs
// here, on a synthetic kernel and initrd (tests/e2e/image.rs boots real sealed images).
// With no KVM device, an image wrongly accepted fails with status 3, not 2.

/// What the sealed command prints.
const GREETING: &str = "sealed-hello";

/// `keygen -o DIR/NAME`: (secret key, public key, fingerprint).
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let key = dir.join(name);
    let out = vmm().arg("keygen").arg("-o").arg(&key).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "keygen failed");
    let fingerprint = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:").map(|f| f.trim().to_string()))
        .expect("keygen prints the fingerprint");
    (key, dir.join(format!("{name}.pub")), fingerprint)
}

/// A sealed image of a minimal kernel and initrd whose command runs GREETING.
fn sealed(dir: &Path, key: &Path) -> PathBuf {
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, b"070701 a stand-in initramfs".repeat(8)).unwrap();
    let image = dir.join("gvm.img");
    let out = vmm()
        .arg("seal")
        .arg("--kernel")
        .arg(minimal_elf(dir))
        .arg("--initrd")
        .arg(&initrd)
        .args(["--append", &format!("exterior_run=\"echo {GREETING}\"")])
        .arg("--key")
        .arg(key)
        .arg("-o")
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "seal failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("signature: valid"));
    image
}

/// File offset of the kernel part: right after magic (8) + version (4) + manifest length
/// (4) + manifest + signature (64).
fn kernel_offset(image: &[u8]) -> usize {
    assert_eq!(image.get(..8), Some(&b"EXTVMIMG"[..]), "not a sealed image");
    let len: [u8; 4] = image[12..16].try_into().unwrap();
    16 + u32::from_le_bytes(len) as usize + 64
}

/// `run --image IMAGE --trust KEY...`: refused with status 2 and "refusing image"; its
/// stderr.
fn refused_image(image: &Path, trust: &[&Path]) -> String {
    let mut cmd = vmm();
    cmd.env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .arg("run")
        .arg("--image")
        .arg(image);
    for key in trust {
        cmd.arg("--trust").arg(key);
    }
    let (code, err) = run(&mut cmd);
    assert_eq!(code, 2, "run did not refuse the image with status 2: {err}");
    assert!(
        err.contains("refusing image"),
        "no refusal on stderr: {err}"
    );
    err
}

#[test]
fn one_flipped_byte_in_a_sealed_kernel_is_refused_before_boot() {
    let dir = scratch("image-kernel-flip");
    let (key, public, _) = keygen(&dir, "key");
    let image = sealed(&dir, &key);
    let mut bytes = std::fs::read(&image).unwrap();
    let kernel_len = std::fs::metadata(dir.join("vmlinux")).unwrap().len() as usize;
    let at = kernel_offset(&bytes) + kernel_len / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    let err = refused_image(&image, &[&public]);
    assert!(err.contains("digest mismatch in kernel part"), "{err}");
    let out = vmm()
        .arg("inspect")
        .arg(&image)
        .arg("--trust")
        .arg(&public)
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(0),
        "inspect accepted a tampered image"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("signature: NOT verified"));
}

#[test]
fn an_edited_manifest_is_refused_before_boot() {
    let dir = scratch("image-manifest-edit");
    let (key, public, _) = keygen(&dir, "key");
    let image = sealed(&dir, &key);
    let mut bytes = std::fs::read(&image).unwrap();
    // Change the sealed command: "sealed-hello" -> "sealed-jello".
    let at = bytes[..kernel_offset(&bytes)]
        .windows(GREETING.len())
        .position(|w| w == GREETING.as_bytes())
        .expect("command line in the manifest");
    bytes[at + "sealed-".len()] = b'j';
    std::fs::write(&image, &bytes).unwrap();
    let err = refused_image(&image, &[&public]);
    assert!(err.contains("signature does not verify"), "{err}");
}

#[test]
fn an_image_signed_by_an_unknown_key_or_by_none_trusted_is_refused() {
    let dir = scratch("image-unknown-key");
    let (key, _, signer) = keygen(&dir, "signer");
    let (_, other, _) = keygen(&dir, "other");
    let image = sealed(&dir, &key);
    let err = refused_image(&image, &[&other]);
    assert!(
        err.contains(&format!("signed by key {signer}")) && err.contains("not among"),
        "{err}"
    );
    // No trusted key at all is a refusal too, never "unchecked".
    let err = refused_image(&image, &[]);
    assert!(err.contains("no trusted public key"), "{err}");
}

#[test]
fn a_truncated_image_is_refused() {
    let dir = scratch("image-truncated");
    let (key, public, _) = keygen(&dir, "key");
    let image = sealed(&dir, &key);
    let len = std::fs::metadata(&image).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = refused_image(&image, &[&public]);
    assert!(err.contains("truncated"), "{err}");
}

// The kernel an instance's SVM boots is a trusted one (--svm-kernel, else the pinned
// kernel in images/), and the GVM's must load the same bytes: a kernel that came with the
// guest (its /boot) may have been changed by it. These use the real pinned kernel (which
// tools/setup fetches before the tests run; a missing one fails them, never skips them)
// and a stand-in SVM image with its digest recorded (the real one is built later, after
// the release build).

fn pinned(name: &str) -> PathBuf {
    let repo = std::env::var_os("EXTERIOR_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let path = repo.join("images").join(name);
    assert!(
        path.exists(),
        "{} is missing: run tools/setup (tools/test runs it first)",
        path.display()
    );
    path
}

/// File offset of the first byte of `section`'s data in the ELF image `elf`.
fn section_offset(elf: &[u8], section: &str) -> usize {
    let parsed = redirect::profile::Elf::parse(elf).unwrap();
    let s = parsed.section(section).unwrap();
    usize::try_from(s.offset).unwrap()
}

/// A stand-in SVM image whose digest is recorded beside it (it passes the image check).
fn stand_in_svm_image(dir: &Path) -> PathBuf {
    let svm = dir.join("svm.cpio");
    std::fs::write(&svm, b"070701 the image as it was built").unwrap();
    std::fs::write(
        dir.join("svm.cpio.sha256"),
        "1ea65ab827f76b9c8cf31ddd1574ce72d4d922e6f16addb2798fc1c5d23b8062  svm.cpio\n",
    )
    .unwrap();
    svm
}

/// `run --name TAG` of the GVM kernel `gvm` with `--svm-kernel svm`, on a host without
/// KVM: a refusal with status 2 is the kernel check's; status 3 (no KVM) means the check
/// let it through.
fn run_with_kernels(tag: &str, gvm: &Path, svm: &Path, detach: bool) -> (i32, String) {
    let mut cmd = vmm();
    let image = stand_in_svm_image(&scratch(&format!("{tag}-svm")));
    with_runtime(&mut cmd, &format!("{tag}-rt"));
    cmd.env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--name", tag, "--kernel"])
        .arg(gvm)
        .arg("--svm-initrd")
        .arg(image)
        .arg("--svm-kernel")
        .arg(svm);
    if detach {
        cmd.arg("--detach");
    }
    run(&mut cmd)
}

#[test]
fn a_gvm_kernel_changed_after_it_was_built_is_refused_naming_the_change() {
    let dir = scratch("kernel-patched");
    let svm = pinned("vmlinux");
    let mut bytes = std::fs::read(&svm).unwrap();
    let at = section_offset(&bytes, ".text") + 0x1234;
    bytes[at] ^= 0xff;
    let patched = dir.join("vmlinux-patched");
    std::fs::write(&patched, &bytes).unwrap();
    for detach in [false, true] {
        let (code, err) = run_with_kernels("patched", &patched, &svm, detach);
        assert_eq!(code, 2, "detach {detach}: {err}");
        assert!(
            err.contains(&format!(
                "--kernel {} is not the kernel the SVM boots ({})",
                patched.display(),
                svm.display()
            )) && err.contains("1 bytes of .text differ, the first at offset 0x1234")
                && err.contains("the same build-id with other bytes"),
            "detach {detach}: {err}"
        );
        // Both sides say what they are: the pinned release and build-id, twice.
        let id = "release 6.1.0-50-cloud-amd64, build-id bb603a9147d3efe4744bf83c83eee397c591cc20";
        assert!(
            err.contains(&format!("GVM {id}; SVM {id}")),
            "detach {detach}: {err}"
        );
    }
}

#[test]
fn a_gvm_kernel_of_another_build_is_refused_with_both_build_ids() {
    let dir = scratch("kernel-build");
    let svm = pinned("vmlinux");
    let mut bytes = std::fs::read(&svm).unwrap();
    // The build-id note's descriptor: "GNU\0" then the 20 bytes.
    let notes = section_offset(&bytes, ".notes");
    let id = "bb603a9147d3efe4744bf83c83eee397c591cc20";
    let gnu = bytes[notes..]
        .windows(4)
        .position(|w| w == b"GNU\0")
        .unwrap();
    let desc = notes + gnu + 4;
    assert_eq!(bytes[desc], 0xbb, "the pinned build-id starts with bb");
    bytes[desc] = 0x42;
    let other = dir.join("vmlinux-other");
    std::fs::write(&other, &bytes).unwrap();
    let (code, err) = run_with_kernels("build", &other, &svm, false);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("build-id 42{}; SVM", &id[2..]))
            && err.contains(&format!("build-id {id}; "))
            && err.contains("of .notes differ")
            && err.contains("another build"),
        "{err}"
    );
}

#[test]
fn the_same_kernel_in_another_file_passes_the_check() {
    // The pinned vmlinux with bytes after it that nothing loads: another file, the same
    // kernel. The run gets past the check and stops at the missing KVM (the control for
    // the refusals above: their status 2 is the check's).
    let dir = scratch("kernel-same");
    let mut bytes = std::fs::read(pinned("vmlinux")).unwrap();
    bytes.extend_from_slice(b"not loaded");
    let copy = dir.join("vmlinux-copy");
    std::fs::write(&copy, &bytes).unwrap();
    let (code, err) = run_with_kernels("same", &copy, &pinned("vmlinux"), false);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot open /nonexistent/kvm"), "{err}");
}

#[test]
fn the_same_kernel_in_another_format_is_refused() {
    // The pinned bzImage carries the pinned vmlinux, but each boot path sets the kernel up
    // its own way, so the SVM must boot the GVM's format.
    let (code, err) = run_with_kernels("format", &pinned("bzImage"), &pinned("vmlinux"), false);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is a bzImage and the kernel the SVM boots")
            && err.contains("an ELF vmlinux: give the SVM's kernel in the GVM's format"),
        "{err}"
    );
}

#[test]
fn svm_kernel_without_an_instance_is_refused() {
    let dir = scratch("svmk-plain");
    let kernel = minimal_elf(&dir);
    let (code, err) = run(vmm()
        .args(["run", "--svm-kernel"])
        .arg(&kernel)
        .arg("--kernel")
        .arg(&kernel));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--svm-kernel needs --name"), "{err}");
}

#[test]
fn an_instance_without_svm_kernel_and_without_the_pinned_one_says_how_to_get_one() {
    let mut cmd = vmm();
    with_runtime(&mut cmd, "nosvmkernel-rt");
    let (code, err) = run(cmd
        .env("EXTERIOR_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--name", "nosvmk", "--kernel"])
        .arg(pinned("vmlinux"))
        .arg("--svm-initrd")
        .arg(stand_in_svm_image(&scratch("nosvmk-svm"))));
    assert_eq!(code, 2, "{err}");
    // (EXTERIOR_IMAGES names a directory that does not exist.)
    assert!(
        err.contains(
            "the SVM boots the pinned kernel /nonexistent-images/vmlinux, which does not \
             exist: run `tools/setup` to fetch it, or pass --svm-kernel"
        ),
        "{err}"
    );
}
