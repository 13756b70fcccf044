//! Validated VM configuration: what `exterior-vmm run` turns its arguments into.
//!
//! Everything here is checked before a single byte reaches guest memory or KVM is opened,
//! so bad input fails fast with a specific error.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::devices::virtio::block::DiskImage;

/// Smallest guest we agree to build: the pinned kernel plus a small initramfs do not boot
/// in less.
pub(crate) const MIN_MEM_MIB: u64 = 64;
/// Largest guest RAM: keeps a typo (`--mem 64G` on a 24 GiB host) from becoming an
/// out-of-memory kill halfway through boot.
pub(crate) const MAX_MEM_MIB: u64 = 64 * 1024;
/// vCPU limit: the MADT and the APIC ID space we lay out use 8-bit APIC IDs.
pub(crate) const MAX_CPUS: u8 = 254;
/// How long a redirected call may take in all — its runs, quiesces and parks — before it
/// is given up, unless `--call-deadline` says otherwise (issue #12: "default 30 s").
pub const DEFAULT_CALL_DEADLINE_SECS: u64 = 30;
/// The longest `--call-deadline`: an hour, the longest a stuck call could ever hold the
/// engine before this bound existed.
pub const MAX_CALL_DEADLINE_SECS: u64 = 3600;
/// How long the GVM stays held for one program's run of redirected calls (`--hold-slice-us`)
/// and how long a hold waits for the program's next call (`--hold-idle-us`), on a host
/// with a hardware KVM (issue #15: a 2 ms slice). The nested harness sets its own
/// (`tools/kvm-run`), where one call alone takes milliseconds.
pub const DEFAULT_HOLD_SLICE_US: u64 = 2_000;
/// See [`DEFAULT_HOLD_SLICE_US`].
pub const DEFAULT_HOLD_IDLE_US: u64 = 500;
/// The longest hold slice or idle gap: a second, the longest a GVM could be held for the
/// exterior shell's sake, past which its own timers and watchdogs would notice.
pub const MAX_HOLD_US: u64 = 1_000_000;
/// Virtio devices sit at fixed MMIO slots with GSIs 16-23 (`boot::layout`), so at most 8.
pub const MAX_DISKS: usize = 8;
/// A kernel image larger than this is certainly not one (the pinned vmlinux is ~60 MiB).
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// The kernel command line every guest gets before `--append`. `reboot=k` makes a guest
/// reboot (and `panic=-1` a panic) arrive as an i8042 reset that the VMM turns into an exit;
/// `pci=off` skips probing a bus we do not emulate; `no5lvl` keeps a bzImage's
/// decompressor from turning on 5-level paging where the CPU offers LA57 (`-cpu max` in
/// the nested harness does), since the engine walks 4-level page tables only (with it
/// on, every call of a bzImage instance was refused). A vmlinux entered at `startup_64`
/// keeps the VMM's 4-level tables either way. KASLR stays on, as the distribution ships
/// it: the redirect engine learns a GVM's slide; only an instance's SVM adds
/// [`SVM_CMDLINE`].
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off no5lvl";

/// What an instance's SVM adds to [`DEFAULT_CMDLINE`]: `nokaslr`, so that its kernel's
/// addresses are the image's link addresses (its kallsyms is the profile the engine moves
/// by a GVM's slide, and its text the copy it moves), and a quiet boot.
pub const SVM_CMDLINE: &str = "nokaslr quiet";

/// Why a VM description was refused; the message names the argument or file at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// `--mem` is not a number with an optional K/M/G unit (the text given).
    #[error("--mem {0:?}: not a size (use e.g. 512M, 1G, or a number of MiB)")]
    MemUnparsable(String),
    /// Guest memory below the smallest guest that boots (MiB asked for).
    #[error("--mem {0} MiB: too small, the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    /// Guest memory above the supported maximum (MiB asked for).
    #[error("--mem {0} MiB: larger than the {MAX_MEM_MIB} MiB this VMM supports")]
    MemTooLarge(u64),
    /// `--call-deadline` out of range.
    #[error(
        "--call-deadline {0}: give a whole number of seconds from 1 to {MAX_CALL_DEADLINE_SECS}"
    )]
    CallDeadline(u64),
    /// A hold slice or idle gap out of range.
    #[error("{what} {us}: give a whole number of microseconds from 0 to {MAX_HOLD_US}")]
    HoldTime {
        /// The option (and environment variable).
        what: &'static str,
        /// The value given.
        us: u64,
    },
    /// `--cpus 0`.
    #[error("--cpus 0: a guest needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than 8-bit APIC IDs allow (the count asked for).
    #[error("--cpus {0}: at most {MAX_CPUS} vCPUs are supported")]
    TooManyCpus(u32),
    /// The kernel file could not be opened or read.
    #[error("kernel {path}: {source}")]
    KernelUnreadable {
        /// The kernel file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The kernel is larger than [`MAX_KERNEL_BYTES`].
    #[error("kernel {path}: {size} bytes is larger than any kernel image ({MAX_KERNEL_BYTES} bytes at most)")]
    KernelTooLarge {
        /// The kernel file (or the sealed image holding it).
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The kernel file is empty.
    #[error("kernel {0}: empty file")]
    KernelEmpty(PathBuf),
    /// The initrd could not be opened or read.
    #[error("initrd {path}: {source}")]
    InitrdUnreadable {
        /// The initrd file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The initrd would not fit in guest memory.
    #[error(
        "initrd {path}: {size} bytes does not fit in {mem_mib} MiB of guest memory (raise --mem)"
    )]
    InitrdTooLarge {
        /// The initrd file (or the sealed image holding it).
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The guest memory it was checked against, in MiB.
        mem_mib: u64,
    },
    /// A `--disk` image cannot be opened, is not a raw image, or is locked by another VM.
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::DiskError),
    /// A `--disk` argument is not `PATH` or `PATH,ro`.
    #[error("--disk {0:?}: give PATH or PATH,ro (a path containing a comma cannot be given)")]
    DiskSpec(String),
    /// More `--disk` and `--net` arguments than virtio slots.
    #[error("{0} disks and network devices: at most {MAX_DISKS} virtio devices are supported")]
    TooManyDisks(usize),
    /// A `--net` argument is not `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`.
    #[error("--net {0:?}: give tap=NAME or tap=NAME,mac=XX:XX:XX:XX:XX:XX (a unicast MAC)")]
    NetSpec(String),
    /// The tap device cannot be attached.
    #[error(transparent)]
    Tap(#[from] crate::devices::tap::TapError),
    /// No `--kernel` was given and the default kernel (this path) is missing.
    #[error("no kernel given and the default {0} does not exist: pass --kernel, or run `tools/setup` to fetch the pinned kernel")]
    NoDefaultKernel(PathBuf),
    /// No `--svm-kernel` was given and the pinned kernel the SVM boots (this path) is
    /// missing.
    #[error("the SVM boots the pinned kernel {0}, which does not exist: run `tools/setup` to fetch it, or pass --svm-kernel with a kernel you trust that is the GVM's")]
    NoSvmKernel(PathBuf),
    /// An instance needs the SVM's initramfs (this path), which is missing.
    #[error("SVM image {0} does not exist: run `tools/setup` to build images/svm.cpio, or pass --svm-initrd")]
    NoSvmImage(PathBuf),
    /// A default image was needed and there is no images directory.
    #[error("no {0} given and no images directory: set EXTERIOR_IMAGES, or run `tools/setup` in the repository this binary was built in (the working directory is never searched)")]
    NoImagesDir(&'static str),
    /// The SVM image has no digest recorded beside it.
    #[error("SVM image {image}: no recorded digest at {digest_file} ({source}): rebuild it with rootfs/build-svm, which records it")]
    SvmDigestUnreadable {
        /// The SVM image.
        image: PathBuf,
        /// Where its digest should be.
        digest_file: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The digest file is not `sha256sum` output.
    #[error("SVM image {image}: {digest_file} does not start with a sha256 in hex")]
    SvmDigestMalformed {
        /// The SVM image.
        image: PathBuf,
        /// The digest file.
        digest_file: PathBuf,
    },
    /// The SVM image is not the one its digest was recorded for.
    #[error("SVM image {image}: sha256 {actual} is not the recorded {recorded} (from {digest_file}): refusing to boot it; rebuild it with rootfs/build-svm")]
    SvmDigestMismatch {
        /// The SVM image.
        image: PathBuf,
        /// The digest file.
        digest_file: PathBuf,
        /// The recorded digest (hex).
        recorded: String,
        /// The image's digest (hex).
        actual: String,
    },
}

/// Parses a memory size: a plain number is MiB; suffixes K, M, G (optionally followed by
/// `i` and/or `B`, case-insensitive) scale it. Returns MiB.
pub fn parse_mem_mib(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::MemUnparsable(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let unit = suffix.to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let mib = match unit {
        "" | "m" => Some(value),
        "k" => {
            if !value.is_multiple_of(1024) {
                return Err(bad());
            }
            Some(value / 1024)
        }
        "g" => value.checked_mul(1024),
        _ => None,
    };
    mib.ok_or_else(bad)
}

/// Checks a memory size in MiB against the supported range.
pub fn check_mem_mib(mib: u64) -> Result<u64, ConfigError> {
    if mib < MIN_MEM_MIB {
        return Err(ConfigError::MemTooSmall(mib));
    }
    if mib > MAX_MEM_MIB {
        return Err(ConfigError::MemTooLarge(mib));
    }
    Ok(mib)
}

/// Checks a call deadline in seconds (`--call-deadline`).
pub fn check_call_deadline(secs: u64) -> Result<std::time::Duration, ConfigError> {
    match secs {
        1..=MAX_CALL_DEADLINE_SECS => Ok(std::time::Duration::from_secs(secs)),
        _ => Err(ConfigError::CallDeadline(secs)),
    }
}

/// Checks a hold slice and idle gap in microseconds.
pub fn check_hold_policy(
    slice_us: u64,
    idle_us: u64,
) -> Result<crate::executor::HoldPolicy, ConfigError> {
    let check = |us: u64, what| match us {
        0..=MAX_HOLD_US => Ok(std::time::Duration::from_micros(us)),
        _ => Err(ConfigError::HoldTime { what, us }),
    };
    Ok(crate::executor::HoldPolicy {
        slice: check(slice_us, "--hold-slice-us (EXTERIOR_HOLD_SLICE_US)")?,
        idle: check(idle_us, "--hold-idle-us (EXTERIOR_HOLD_IDLE_US)")?,
    })
}

/// Checks a vCPU count.
pub fn check_cpus(cpus: u32) -> Result<u8, ConfigError> {
    match cpus {
        0 => Err(ConfigError::NoCpus),
        n if n > u32::from(MAX_CPUS) => Err(ConfigError::TooManyCpus(n)),
        n => Ok(n as u8),
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// This process's standard output (a plain `run`).
    Stdout,
    /// Appended to this file (`--console FILE`, instance logs).
    File(PathBuf),
}

/// A fully validated VM description. Kernel and initrd are held as bytes: what was checked
/// (sizes here, signatures for sealed images) is exactly what gets loaded.
#[derive(Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB (see [`check_mem_mib`]).
    pub mem_mib: u64,
    /// vCPUs to start (see [`check_cpus`]).
    pub cpus: u8,
    /// The whole kernel command line, usually from [`build_cmdline`].
    pub cmdline: String,
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel: Vec<u8>,
    /// Where the kernel came from (a file, or the sealed image), for error messages.
    pub kernel_path: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<Vec<u8>>,
    /// Where the serial console's output goes.
    pub console: ConsoleTarget,
    /// Raw disk images, opened and locked, in `--disk` order (the guest's vda, vdb, ...).
    pub disks: Vec<DiskImage>,
    /// Network devices, in `--net` order (after the disks in the virtio slots).
    pub nets: Vec<NetDevice>,
}

impl VmConfig {
    /// Whether the kernel is an ELF vmlinux (else a bzImage, or what the loader refuses).
    pub fn kernel_is_elf(&self) -> bool {
        crate::boot::bzimage::is_elf(&self.kernel)
    }
}

/// One `--disk PATH[,ro][,direct]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The raw image file.
    pub path: PathBuf,
    /// `,ro`: the guest sees a read-only disk and the device refuses writes.
    pub read_only: bool,
    /// `,direct`: aligned requests bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
}

/// Parses `PATH` with options `ro` (`rw` is accepted as the default, spelt out) and
/// `direct`.
pub fn parse_disk(text: &str) -> Result<DiskSpec, ConfigError> {
    let bad = || ConfigError::DiskSpec(text.to_string());
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let (mut read_only, mut direct) = (false, false);
    for option in parts {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            "direct" => direct = true,
            _ => return Err(bad()),
        }
    }
    Ok(DiskSpec {
        path: PathBuf::from(path),
        read_only,
        direct,
    })
}

/// One `--net tap=NAME[,mac=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The tap device's name.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// A default MAC for the tap `name`: locally administered, unicast, the same on every
/// boot (derived from the name).
fn default_mac(name: &str) -> [u8; 6] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    [0x06, h[0], h[1], h[2], h[3], h[4]]
}

/// Parses `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`.
pub fn parse_net(text: &str) -> Result<NetSpec, ConfigError> {
    let bad = || ConfigError::NetSpec(text.to_string());
    let (mut tap, mut mac) = (None, None);
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() && !name.is_empty() => tap = Some(name),
            Some(("mac", m)) if mac.is_none() => {
                let bytes: Vec<u8> = m
                    .split(':')
                    .map(|b| {
                        if b.len() == 2 {
                            u8::from_str_radix(b, 16).ok()
                        } else {
                            None
                        }
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                let mac_bytes: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
                // Multicast or all-zero addresses cannot be a NIC's.
                if mac_bytes[0] & 1 != 0 || mac_bytes == [0; 6] {
                    return Err(bad());
                }
                mac = Some(mac_bytes);
            }
            _ => return Err(bad()),
        }
    }
    let tap = tap.ok_or_else(bad)?;
    Ok(NetSpec {
        tap: tap.to_string(),
        mac: mac.unwrap_or_else(|| default_mac(tap)),
    })
}

/// A network device: an attached tap and the guest's MAC.
#[derive(Debug)]
pub struct NetDevice {
    /// The attached tap.
    pub tap: crate::devices::tap::Tap,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Attaches the `--net` taps (after `disks` disks: they share the virtio slots).
pub fn open_nets(texts: &[String], disks: usize) -> Result<Vec<NetDevice>, ConfigError> {
    if disks + texts.len() > MAX_DISKS {
        return Err(ConfigError::TooManyDisks(disks + texts.len()));
    }
    texts
        .iter()
        .map(|text| {
            let spec = parse_net(text)?;
            Ok(NetDevice {
                tap: crate::devices::tap::Tap::open(&spec.tap)?,
                mac: spec.mac,
            })
        })
        .collect()
}

/// Opens and locks the `--disk` images; the first error is reported, the others not tried.
pub fn open_disks(texts: &[String]) -> Result<Vec<DiskImage>, ConfigError> {
    if texts.len() > MAX_DISKS {
        return Err(ConfigError::TooManyDisks(texts.len()));
    }
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let spec = parse_disk(text)?;
            Ok(DiskImage::open(
                &spec.path,
                spec.read_only,
                spec.direct,
                index,
            )?)
        })
        .collect()
}

impl VmConfig {
    /// Guest memory size in bytes.
    pub(crate) fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// Builds the full kernel command line: the defaults, then the user's additions (later
/// parameters win in Linux, so `--append` can override a default).
pub fn build_cmdline(append: Option<&str>) -> String {
    match append.map(str::trim) {
        Some(extra) if !extra.is_empty() => format!("{DEFAULT_CMDLINE} {extra}"),
        _ => DEFAULT_CMDLINE.to_string(),
    }
}

/// Reads a kernel image, bounded in size.
pub fn read_kernel(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    if size > MAX_KERNEL_BYTES {
        return Err(ConfigError::KernelTooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    if size == 0 {
        return Err(ConfigError::KernelEmpty(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_KERNEL_BYTES)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

/// Reads an initrd after checking that it can fit in guest memory at all; placement is
/// checked exactly by the boot code.
pub fn read_initrd(path: &Path, mem_mib: u64) -> Result<Vec<u8>, ConfigError> {
    let unreadable = |source| ConfigError::InitrdUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    check_initrd_size(path, size, mem_mib)?;
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(size)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

/// Where the digest of the SVM image at `image` is recorded: `<image>.sha256`, in
/// `sha256sum` format, written by rootfs/build-svm.
fn svm_digest_file(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Reads the SVM's initramfs and checks it against the digest recorded beside it before
/// anything boots: the SVM is trusted code (its tools act for the operator), so a changed,
/// truncated or swapped image is refused rather than run.
pub fn read_svm_initrd(image: &Path, mem_mib: u64) -> Result<Vec<u8>, ConfigError> {
    if !image.exists() {
        return Err(ConfigError::NoSvmImage(image.to_path_buf()));
    }
    let digest_file = svm_digest_file(image);
    let recorded = std::fs::read_to_string(&digest_file).map_err(|source| {
        ConfigError::SvmDigestUnreadable {
            image: image.to_path_buf(),
            digest_file: digest_file.clone(),
            source,
        }
    })?;
    let recorded = recorded
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| ConfigError::SvmDigestMalformed {
            image: image.to_path_buf(),
            digest_file: digest_file.clone(),
        })?;
    let bytes = read_initrd(image, mem_mib)?;
    let actual = sha256_hex(&bytes);
    if actual != recorded {
        return Err(ConfigError::SvmDigestMismatch {
            image: image.to_path_buf(),
            digest_file,
            recorded,
            actual,
        });
    }
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An initrd must leave room for the kernel: we require it to fit in half of guest RAM.
pub fn check_initrd_size(path: &Path, size: u64, mem_mib: u64) -> Result<(), ConfigError> {
    if size > (mem_mib << 20) / 2 {
        return Err(ConfigError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            mem_mib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_deadline_is_a_second_to_an_hour() {
        assert_eq!(check_call_deadline(1).unwrap().as_secs(), 1);
        assert_eq!(
            check_call_deadline(DEFAULT_CALL_DEADLINE_SECS)
                .unwrap()
                .as_secs(),
            30
        );
        assert_eq!(check_call_deadline(3600).unwrap().as_secs(), 3600);
        for bad in [0, 3601, u64::MAX] {
            let e = check_call_deadline(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--call-deadline {bad}:")), "{e}");
        }
    }

    #[test]
    fn a_hold_slice_and_idle_gap_are_up_to_a_second() {
        let p = check_hold_policy(DEFAULT_HOLD_SLICE_US, 0).unwrap();
        assert_eq!(p.slice.as_micros(), 2000);
        assert!(p.idle.is_zero());
        let p = check_hold_policy(0, MAX_HOLD_US).unwrap();
        assert_eq!((p.slice.as_micros(), p.idle.as_secs()), (0, 1));
        let e = check_hold_policy(MAX_HOLD_US + 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--hold-slice-us (EXTERIOR_HOLD_SLICE_US) 1000001:"),
            "{e}"
        );
        let e = check_hold_policy(1, u64::MAX).unwrap_err().to_string();
        assert!(
            e.starts_with("--hold-idle-us (EXTERIOR_HOLD_IDLE_US) 1844"),
            "{e}"
        );
    }

    #[test]
    fn disk_specs_take_a_path_and_ro() {
        let d = parse_disk("/tmp/a.img").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/tmp/a.img"), false));
        let d = parse_disk("b.img,ro").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("b.img"), true));
        assert!(!parse_disk("b.img,ro,rw").unwrap().read_only);
        let d = parse_disk("c.img,direct,ro").unwrap();
        assert!(d.direct && d.read_only);
        assert!(!parse_disk("c.img").unwrap().direct);
        assert!(parse_disk("c.img,directly").is_err());
        for bad in ["", ",ro", "a.img,", "a.img,readonly", "a,b.img"] {
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--disk {bad:?}:")), "{e}");
        }
    }

    #[test]
    fn net_specs_take_a_tap_and_a_unicast_mac() {
        let n = parse_net("tap=extap0").unwrap();
        assert_eq!(n.tap, "extap0");
        assert_eq!(n.mac[0], 0x06, "locally administered, unicast");
        assert_eq!(n.mac, parse_net("tap=extap0").unwrap().mac, "stable");
        assert_ne!(n.mac, parse_net("tap=extap1").unwrap().mac);
        let n = parse_net("tap=t,mac=52:54:00:ab:CD:ef").unwrap();
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        for bad in [
            "",
            "tap=",
            "extap0",
            "mac=52:54:00:00:00:01",
            "tap=a,tap=b",
            "tap=a,mac=52:54:00:00:00",
            "tap=a,mac=52:54:00:00:00:0g",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
            "tap=a,mtu=9000",
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--net {bad:?}:")), "{e}");
        }
    }

    #[test]
    fn disk_images_must_exist_be_whole_sectors_and_not_too_many() {
        let dir = std::env::temp_dir().join(format!("exterior-disk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.img");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let empty = dir.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let arg = |p: &Path, extra: &str| format!("{}{extra}", p.display());

        let disks = open_disks(&[arg(&good, ",ro")]).unwrap();
        assert_eq!(disks[0].sectors(), 8);
        assert!(disks[0].read_only());
        let e = open_disks(&[arg(&odd, "")]).unwrap_err().to_string();
        assert!(
            e.contains("1000 bytes is not a whole number of 512-byte sectors"),
            "{e}"
        );
        let e = open_disks(&[arg(&empty, "")]).unwrap_err().to_string();
        assert!(e.contains("empty image"), "{e}");
        let e = open_disks(&[arg(&dir.join("missing.img"), "")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.img") && e.contains("No such file"),
            "{e}"
        );
        let e = open_disks(&[arg(&dir, ",ro")]).unwrap_err().to_string();
        assert!(e.contains("not a regular file or a block device"), "{e}");
        // A FIFO is refused without blocking in open(2).
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = open_disks(&[arg(&fifo, ",ro")]).unwrap_err().to_string();
        assert!(e.contains("not a regular file or a block device"), "{e}");
        let nine: Vec<String> = (0..9).map(|_| arg(&good, ",ro")).collect();
        let e = open_disks(&nine).unwrap_err().to_string();
        assert!(e.contains("at most 8 virtio devices"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_writable_disk_is_locked_against_a_second_user() {
        let dir = std::env::temp_dir().join(format!("exterior-disk-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::write(&img, vec![0u8; 512]).unwrap();
        let path = img.display().to_string();
        let first = open_disks(std::slice::from_ref(&path)).unwrap();
        for second in [path.clone(), format!("{path},ro")] {
            let e = open_disks(&[second]).unwrap_err().to_string();
            assert!(e.contains("in use by another process"), "{e}");
        }
        drop(first);
        // Two readers may share an image.
        let ro = format!("{path},ro");
        let _a = open_disks(std::slice::from_ref(&ro)).unwrap();
        let _b = open_disks(std::slice::from_ref(&ro)).unwrap();
        assert!(
            open_disks(&[path]).is_err(),
            "a writer while readers hold it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mem_sizes_parse_with_units() {
        assert_eq!(parse_mem_mib("512").unwrap(), 512);
        assert_eq!(parse_mem_mib("512M").unwrap(), 512);
        assert_eq!(parse_mem_mib("512MiB").unwrap(), 512);
        assert_eq!(parse_mem_mib("2G").unwrap(), 2048);
        assert_eq!(parse_mem_mib("2gb").unwrap(), 2048);
        assert_eq!(parse_mem_mib("1048576K").unwrap(), 1024);
    }

    #[test]
    fn mem_sizes_reject_garbage() {
        for bad in [
            "",
            "abc",
            "12X",
            "-5",
            "1.5G",
            "1000K",
            "99999999999999999999G",
        ] {
            assert!(
                matches!(parse_mem_mib(bad), Err(ConfigError::MemUnparsable(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn mem_range_is_enforced() {
        assert!(matches!(
            check_mem_mib(16),
            Err(ConfigError::MemTooSmall(16))
        ));
        assert!(matches!(
            check_mem_mib(MAX_MEM_MIB + 1),
            Err(ConfigError::MemTooLarge(_))
        ));
        assert_eq!(check_mem_mib(MIN_MEM_MIB).unwrap(), MIN_MEM_MIB);
    }

    #[test]
    fn cpus_are_checked() {
        assert!(matches!(check_cpus(0), Err(ConfigError::NoCpus)));
        assert!(matches!(
            check_cpus(255),
            Err(ConfigError::TooManyCpus(255))
        ));
        assert_eq!(check_cpus(2).unwrap(), 2);
    }

    #[test]
    fn cmdline_appends_after_defaults() {
        assert_eq!(build_cmdline(None), DEFAULT_CMDLINE);
        assert_eq!(build_cmdline(Some("  ")), DEFAULT_CMDLINE);
        assert_eq!(
            build_cmdline(Some("quiet")),
            format!("{DEFAULT_CMDLINE} quiet")
        );
    }

    #[test]
    fn initrd_must_fit_half_of_memory() {
        let p = Path::new("x");
        assert!(check_initrd_size(p, 32 << 20, 64).is_ok());
        assert!(matches!(
            check_initrd_size(p, (32 << 20) + 1, 64),
            Err(ConfigError::InitrdTooLarge { .. })
        ));
    }
}
