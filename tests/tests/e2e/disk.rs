//! Disks (`run --disk`): virtio-blk on raw images, end to end with the pinned kernel's own
//! virtio_mmio and virtio_blk drivers. The guest's data must survive the VMM being killed
//! and the guest crashing; a read-only disk must stay byte for byte as it was.
//!
//! Every check reads either the image file on the host (only the guest can have put the
//! bytes there) or a value the guest's shell computed; never the command line's words.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::common::*;

const DISK_BYTES: u64 = 16 << 20;
const SECTOR: u64 = 512;

fn bytes_at(path: &Path, sector: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(sector * SECTOR)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Boots with `args`, waits until the console file shows `marker` on a line of its own,
/// then kills the VMM with SIGKILL. Returns the console.
fn boot_and_kill_at(args: &[String], console: &Path, marker: &str) -> String {
    let mut child = vmm()
        .args(args)
        .arg("--console")
        .arg(console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn exterior-vmm");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.lines().any(|l| l.trim() == marker) {
            child.kill().expect("SIGKILL the VMM");
            let status = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "the VMM ended by itself ({status}) before it was killed:\n{text}"
            );
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the VMM exited ({status}) before the guest printed {marker}:\n{text}");
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("no {marker} within 300 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn disk_data_survives_a_killed_vmm_and_a_guest_crash_and_ro_disks_stay_untouched() {
    let dir = scratch_dir("disk");
    let rw = dir.join("rw.img");
    std::fs::write(&rw, vec![0u8; DISK_BYTES as usize]).unwrap();
    // The read-only disk: sector N starts with "sector-N".
    let ro = dir.join("ro.img");
    let mut pattern = vec![0u8; 64 * SECTOR as usize];
    for (n, sector) in pattern.chunks_mut(SECTOR as usize).enumerate() {
        let label = format!("sector-{n}");
        sector[..label.len()].copy_from_slice(label.as_bytes());
    }
    std::fs::write(&ro, &pattern).unwrap();
    let n = nonce();

    // Boot 1: the guest sees both disks, reads the ro one, fails to write it, writes the
    // rw one and syncs (a virtio FLUSH); then the VMM is killed with SIGKILL.
    let script = format!(
        "echo vda-sectors=$(cat /sys/block/vda/size) vdb-ro=$(cat /sys/block/vdb/ro); \
         echo vdb-sector-5=$(dd if=/dev/vdb bs=512 skip=5 count=1 2>/dev/null | head -c 8); \
         dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; echo ro-write-status=$?; \
         printf 'mark-%s' {n} | dd of=/dev/vda bs=512 seek=100 2>/dev/null; \
         sync; echo synced-$((6*7)); sleep 600"
    );
    let args = [
        "run".to_string(),
        "--disk".into(),
        rw.display().to_string(),
        "--disk".into(),
        format!("{},ro", ro.display()),
        "--append".into(),
        format!("exterior_run=\"{script}\""),
    ];
    let console = boot_and_kill_at(&args, &dir.join("console1.log"), "synced-42");
    assert_clean_console("boot 1", &console);
    let out = after_init("boot 1", &console);
    let expected_sectors = format!("vda-sectors={} vdb-ro=1", DISK_BYTES / SECTOR);
    for want in [expected_sectors.as_str(), "vdb-sector-5=sector-5"] {
        assert!(out.lines().any(|l| l.trim() == want), "no {want:?}:\n{out}");
    }
    let status = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("ro-write-status="))
        .expect("ro-write-status line");
    assert_ne!(status, "0", "a write to the read-only disk succeeded");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        pattern,
        "the read-only image changed"
    );
    let mark = format!("mark-{n}");
    assert_eq!(
        bytes_at(&rw, 100, mark.len()),
        mark.as_bytes(),
        "what the guest wrote and synced is not in the image after SIGKILL"
    );

    // Boot 2: the data is there for the guest too; a second write, synced, survives the
    // guest panicking (pvpanic: run fails with the panic).
    let script =
        "echo readback=$(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | tr -d '\\000'); \
         printf 'crash-%s' $((7*6)) | dd of=/dev/vda bs=512 seek=200 2>/dev/null; \
         sync; echo c > /proc/sysrq-trigger";
    let (code, out, err) = run(vmm().args([
        "run",
        "--disk",
        rw.to_str().unwrap(),
        "--append",
        &format!("exterior_run=\"{script}\""),
    ]));
    assert_eq!(code, 1, "the guest's panic must fail the run: {err}");
    assert!(err.contains("guest kernel panicked"), "{err}");
    let out = after_init("boot 2", &out);
    let want = format!("readback={mark}");
    assert!(out.lines().any(|l| l.trim() == want), "no {want:?}:\n{out}");
    assert_eq!(
        bytes_at(&rw, 200, 8),
        b"crash-42",
        "synced data lost in a guest crash"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
