//! Network devices (`run --net tap=NAME`): virtio-net on a tap, end to end with the pinned
//! kernel's own virtio_net driver. The VMM runs in a network namespace of the test's own
//! (`unshare -n`), so the tap and all traffic stay between the guest and that namespace.
//!
//! Every check is made on the namespace's side by a program of the test (ping's exit
//! status, what nc received or got back), never on the guest console's echo of a command.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::common::*;

#[test]
fn a_guest_on_a_tap_talks_to_its_namespace_both_ways() {
    let dir = scratch_dir("net");
    let console = dir.join("console.log");
    let got = dir.join("got");
    let n = nonce();
    // The guest: its address, an echo server on 7000, a wait for the namespace's side,
    // then one line to the namespace's server on 7001 (no double quotes: the line sits in
    // exterior_run="...").
    let script = "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; \
         nc -ll -p 7000 -e sh -c 'read l; echo echo-$l' & \
         i=0; until ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1 || [ $i -ge 90 ]; do i=$((i+1)); done; \
         echo guest-$((6*7)) | nc 10.0.2.1 7001; echo net-ready-$((40+2)); sleep 600";
    let child = vmm_in_own_netns()
        .args([
            "run",
            "--net",
            "tap=extap0,mac=52:54:00:12:34:56",
            "--console",
        ])
        .arg(&console)
        .args(["--append", &format!("exterior_run=\"{script}\"")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn unshare -n exterior-vmm");
    let pid = child.id();
    let mut vmm = KillOnDrop(child);

    // The namespace's side: the tap the VMM made, an address, a server that records one
    // line and acknowledges it.
    wait_for_tap(&mut vmm, "extap0");
    let server = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "nc",
            "-l",
            "-p",
            "7001",
            "-e",
            "sh",
            "-c",
        ])
        .arg(format!("read l; echo $l > {}; echo ack", got.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the namespace's server");
    let _server = KillOnDrop(server);
    // Listening before the link is up: the guest's first successful ping may come at once.
    address_namespace_end(pid, "extap0");

    // Guest to namespace: the line the guest computed arrives.
    wait_for(
        "the guest's line on port 7001",
        Duration::from_secs(300),
        || std::fs::read_to_string(&got).is_ok_and(|t| t.contains("guest-42")),
    );
    // The guest prints its ready line after its nc ends, which may be after the
    // namespace's server recorded the line (a CI run read the console too early once).
    wait_for(
        "the guest's ready line on its console",
        Duration::from_secs(60),
        || {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            log.split_once("Run /init")
                .is_some_and(|(_, run)| run.lines().any(|l| l.trim() == "net-ready-42"))
        },
    );

    // Namespace to guest: ping, and a line echoed back by the guest's server.
    let (code, out) = in_ns(pid, "ping -c 3 -W 5 10.0.2.15");
    assert_eq!(code, 0, "ping of the guest failed: {out}");
    assert!(out.contains("3 packets received"), "{out}");
    let (code, out) = in_ns(pid, &format!("echo host-{n} | nc 10.0.2.15 7000"));
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("echo-host-{n}"),
        "the guest's echo server"
    );
    // The guest's MAC is the one asked for (seen from the namespace's neighbour table).
    let (_, neigh) = in_ns(pid, "ip neigh show 10.0.2.15");
    assert!(neigh.contains("52:54:00:12:34:56"), "{neigh}");
    assert_clean_console(
        "the guest console",
        &std::fs::read_to_string(&console).unwrap(),
    );
    drop(vmm);
    std::fs::remove_dir_all(&dir).unwrap();
}
