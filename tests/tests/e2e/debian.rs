//! The Debian 12 disk guest (rootfs/build-guest): systemd as init on an ext4 root on
//! virtio-blk, networkd on virtio-net, sshd, a serial getty; booted by `run` from the
//! pinned bzImage and the initramfs initramfs-tools made for it, as a user would.
//!
//! The guest's answers are read on its console after a root login, as lines only the
//! guest's shell can have computed (`$((6*7))` is echoed as typed; only its value counts),
//! and from the network namespace the VMM runs in (sshd's banner, which only the guest's
//! sshd sends).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

/// The guest's root disk: the L1 disk tools/kvm-run attaches (a copy-on-write snapshot of
/// images/debian.img), or, on a host KVM, a copy of the image in `dir`.
fn guest_disk(dir: &Path) -> PathBuf {
    if let Some(dev) = std::env::var_os("EXTERIOR_GUEST_DISK") {
        return PathBuf::from(dev);
    }
    let image = images().join("debian.img");
    assert!(
        image.is_file(),
        "{} is missing: run rootfs/build-guest (tools/setup does)",
        image.display()
    );
    let copy = dir.join("debian.img");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&copy)
        .status()
        .expect("run cp");
    assert!(status.success(), "cannot copy {}", image.display());
    copy
}

/// The guest's serial console: what it printed (a file) and its keyboard (the VMM's stdin).
struct Console {
    log: PathBuf,
    keys: ChildStdin,
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until the console, after byte `from`, holds `want`; returns where it ends.
    fn expect(&self, from: usize, want: &str, limit: Duration) -> usize {
        let started = Instant::now();
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|rest| rest.find(want)) {
                return from + at + want.len();
            }
            assert!(
                started.elapsed() < limit,
                "no {want:?} on the console within {limit:?}:\n{}",
                text
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.keys
            .write_all(format!("{line}\n").as_bytes())
            .expect("type on the console");
    }

    /// Types `command` on the root shell and returns what the console shows until the
    /// next prompt (the command's echo, then its output).
    fn shell(&mut self, from: &mut usize, command: &str) -> String {
        self.type_line(command);
        let end = self.expect(*from, PROMPT, Duration::from_secs(300));
        let text = self.text();
        let out = text[*from..end].to_string();
        *from = end;
        out
    }
}

/// The root shell's prompt in the guest.
const PROMPT: &str = "root@exterior-guest:~#";

/// The value of the first console line that starts with `key=`. A carriage return starts
/// the line afresh, as on a terminal (bash ends a command's echo with `ESC[?2004l` CR).
fn value(out: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    out.split(['\n', '\r'])
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{out}"))
        .trim()
        .to_string()
}

#[test]
fn a_debian_disk_guest_boots_systemd_to_a_login_and_serves_ssh_on_its_network() {
    let dir = scratch_dir("debian");
    let disk = guest_disk(&dir);
    let log = dir.join("console.log");
    let mut child = vmm_in_own_netns()
        .args(["run", "--kernel"])
        .arg(images().join("bzImage"))
        .arg("--initrd")
        .arg(images().join("debian-initrd.img"))
        .arg("--disk")
        .arg(&disk)
        .args(["--net", "tap=exdeb0", "--mem", "1G", "--cpus", "2"])
        .args(["--append", "root=LABEL=exterior-root rw", "--console"])
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn unshare -n exterior-vmm run");
    let keys = child.stdin.take().expect("piped stdin");
    let pid = child.id();
    let mut vmm = KillOnDrop(child);
    let mut console = Console { log, keys };
    let booted = Instant::now();

    // The namespace's end of the guest's network (the guest's own address comes from its
    // image: systemd-networkd, 10.0.2.15/24).
    wait_for_tap(&mut vmm, "exdeb0");
    address_namespace_end(pid, "exdeb0");

    // systemd's getty on the serial console.
    let mut at = console.expect(0, "exterior-guest login:", Duration::from_secs(600));
    let to_login = booted.elapsed();
    console.type_line("root");
    at = console.expect(at, "root@exterior-guest:~#", Duration::from_secs(120));

    // The system as the guest sees it: systemd is pid 1, the root is the ext4 disk, every
    // unit started (`is-system-running --wait` is "running", not "degraded"), eth0 has the
    // image's address. One short line a command: the echo of `key=$(...)` never starts a
    // line with `key=`, only the command's output does.
    let mut ask = |command: &str, key: &str| {
        let out = console.shell(&mut at, command);
        value(&out, key)
    };
    assert_eq!(ask("echo init=$(ps -o comm= -p 1)", "init"), "systemd");
    assert_eq!(
        ask("echo root=$(findmnt -no SOURCE,FSTYPE /)", "root"),
        "/dev/vda ext4"
    );
    let state = ask("echo state=$(systemctl is-system-running --wait)", "state");
    let failed = ask("echo failed=$(systemctl --failed --no-legend)", "failed");
    assert_eq!(state, "running", "failed units: {failed}");
    assert_eq!(
        ask("echo eth0=$(ip -br -4 addr show eth0)", "eth0"),
        "eth0 UP 10.0.2.15/24"
    );

    // sshd answers on the guest's network, from the namespace.
    let (code, banner) = in_ns(pid, "printf '' | nc -w 10 10.0.2.15 22 | head -n 1");
    assert_eq!(code, 0);
    assert!(
        banner.starts_with("SSH-2.0-OpenSSH_"),
        "no SSH banner from the guest: {banner:?}"
    );

    // Boot times as the guest's systemd measured them (docs/PERFORMANCE.md).
    let analyze = ask("echo analyze=$(systemd-analyze | head -n 1)", "analyze");
    let multiuser = ask(
        "echo multiuser=$(systemd-analyze | grep -o 'after.*')",
        "multiuser",
    );
    println!(
        "boot: login prompt {:.1} s after the VMM started; {analyze}; multi-user.target reached {multiuser}",
        to_login.as_secs_f64(),
    );
    // A pasted line longer than the receive FIFO (64 bytes) and Linux's 256-byte read
    // per interrupt arrives whole (it once stopped at 64 bytes: see event_loop.rs).
    let long = ask(&format!("echo long=$((6*7)) # {}", "x".repeat(300)), "long");
    assert_eq!(long, "42");

    // A clean stop: the guest reboots (reboot=k), the VMM ends with status 0.
    console.type_line("systemctl reboot");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = vmm.0.try_wait().expect("wait for the VMM") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the VMM did not stop within 180 s of `systemctl reboot`:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(status.success(), "the VMM ended with {status}");
    assert_clean_console("the Debian guest's console", &console.text());
    std::fs::remove_dir_all(&dir).unwrap();
}
