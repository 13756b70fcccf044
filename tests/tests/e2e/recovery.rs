//! Writes, recovery and safety (DESIGN.md section 4): stock tools in the SVM change the
//! GVM's kernel state, including calls that sleep in its kernel; what a redirected call
//! must not do (run code outside the trusted image, wait for an event) is refused with a
//! reason and rolled back. Every effect is checked from inside the GVM, on its own
//! console, with its own tools.

use std::path::Path;
use std::time::{Duration, Instant};

use super::common::*;
use super::instance::{runtime, start, vmm_in};
use super::redirect::{exterior, info, module_names, processes, GvmConsole};

/// `exec` of a command one of whose calls is refused (the shim says so on stderr; how
/// the tool reacts, and its exit status, are the tool's business); its stderr.
pub(super) fn refused(rt: &Path, name: &str, argv: &[&str]) -> String {
    let (_, out, err) = run(vmm_in(rt).args(["exec", name, "--"]).args(argv));
    assert!(
        err.contains("exterior: the redirect failed"),
        "`{}` was expected to have a call refused: {out}{err}",
        argv.join(" ")
    );
    err
}

/// The `redirect_last_error=` line of `info`.
pub(super) fn last_error(rt: &Path, name: &str) -> String {
    info_line(rt, name, "redirect_last_error")
}

/// The value of the `KEY=` line of `info` (empty if there is none).
pub(super) fn info_line(rt: &Path, name: &str, key: &str) -> String {
    let (code, out, err) = run(vmm_in(rt).args(["info", name]));
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_default()
        .to_string()
}

/// The modules `info` says the last check trusted.
pub(super) fn trusted_modules(rt: &Path, name: &str) -> Vec<String> {
    let line = info_line(rt, name, "redirect_modules");
    let trusted = line
        .strip_prefix("trusted: ")
        .and_then(|l| l.split(';').next())
        .unwrap_or_else(|| panic!("redirect_modules={line}"));
    trusted
        .split(", ")
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

/// The GVM's whole console log: no oops, BUG, panic or warning. (The
/// instance guard checks this again when the test ends; here it is checked at the point
/// the scenario claims it.)
fn assert_no_oops(rt: &Path, name: &str) {
    let log = std::fs::read_to_string(rt.join(format!("{name}.gvm.log"))).expect("GVM log");
    assert_clean_console("the GVM's console", &log);
}

/// `kill -9 PID` from outside, PID being `comm` in the GVM; waits (a minute at most) until
/// the GVM's /proc no longer has it.
pub(super) fn kill_from_outside(
    rt: &Path,
    name: &str,
    gvm: &mut GvmConsole,
    pid: &str,
    comm: &str,
) {
    assert_eq!(
        gvm.run(&format!("cat /proc/{pid}/comm")).trim(),
        comm,
        "pid {pid} is not {comm} in the GVM"
    );
    exterior(rt, name, &["kill", "-9", pid]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let gone = format!("[ -d /proc/{pid} ] && echo alive || echo gone");
    while gvm.run(&gone).trim() != "gone" {
        assert!(Instant::now() < deadline, "{comm} survived kill -9");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `ip addr add CIDR dev lo`, then `del`, from outside; the GVM's own `ip` sees each.
pub(super) fn add_and_remove_address(rt: &Path, name: &str, gvm: &mut GvmConsole, cidr: &str) {
    let ip = cidr.split('/').next().unwrap_or(cidr);
    exterior(rt, name, &["ip", "addr", "add", cidr, "dev", "lo"]);
    let addrs = gvm.run("ip addr show dev lo");
    assert!(
        addrs.contains(&format!("inet {cidr}")) && addrs.contains("inet 127.0.0.1/8"),
        "{addrs}"
    );
    exterior(rt, name, &["ip", "addr", "del", cidr, "dev", "lo"]);
    let addrs = gvm.run("ip addr show dev lo");
    assert!(
        !addrs.contains(ip) && addrs.contains("inet 127.0.0.1/8"),
        "{addrs}"
    );
}

fn nice_of(gvm: &mut GvmConsole, pid: &str) -> String {
    gvm.run(&format!("cut -d' ' -f19 /proc/{pid}/stat"))
        .trim()
        .to_string()
}

#[test]
fn an_operator_recovers_a_misbehaving_gvm_from_outside() {
    let rt = runtime("recovery");
    // A virtio-net device (on a tap the VMM makes, no traffic): its driver is a module.
    let _instance = start(&rt, "rc", &["--net", "tap=rctap0,mac=52:54:00:12:34:57"]);
    let mut gvm = GvmConsole::attach(&rt, "rc");

    // The GVM misbehaves: a process spinning in a loop and a module nobody asked for
    // (dummy, from the kernel package, stands in for a malicious one).
    gvm.run(
        "modprobe dummy; printf '#!/bin/sh\\nwhile :; do :; done\\n' >/tmp/runaway; \
         chmod +x /tmp/runaway; /tmp/runaway & sleep 3600 & echo $! >/tmp/sleeper; sleep 1",
    );
    assert!(processes(&gvm.run("ps -o pid,comm"))
        .iter()
        .any(|(_, c)| c == "runaway"));
    let calls_before = info(&rt, "rc", "redirect_calls");

    // ps finds the runaway; kill -9 ends it.
    let ps = processes(&exterior(&rt, "rc", &["ps", "-eo", "pid,comm"]));
    let (pid, _) = ps
        .iter()
        .find(|(_, c)| c == "runaway")
        .cloned()
        .unwrap_or_else(|| panic!("exterior ps does not show the runaway: {ps:?}"));
    kill_from_outside(&rt, "rc", &mut gvm, &pid.to_string(), "runaway");

    // sysctl -w and hostname change the GVM's names; renice its priorities.
    exterior(&rt, "rc", &["sysctl", "-w", "kernel.hostname=recovered"]);
    assert_eq!(gvm.run("hostname").trim(), "recovered");
    exterior(
        &rt,
        "rc",
        &["sysctl", "-w", "kernel.domainname=exterior.test"],
    );
    assert_eq!(
        gvm.run("cat /proc/sys/kernel/domainname").trim(),
        "exterior.test"
    );
    let sleeper = gvm.run("cat /tmp/sleeper").trim().to_string();
    assert_eq!(nice_of(&mut gvm, &sleeper), "0");
    exterior(&rt, "rc", &["renice", "-n", "7", "-p", &sleeper]);
    assert_eq!(nice_of(&mut gvm, &sleeper), "7");
    exterior(&rt, "rc", &["hostname", "renamed-by-hostname"]);
    assert_eq!(gvm.run("hostname").trim(), "renamed-by-hostname");
    exterior(&rt, "rc", &["sysctl", "-w", "kernel.hostname=recovered"]);

    // ip addr add and del change the GVM's addresses.
    add_and_remove_address(&rt, "rc", &mut gvm, "10.11.12.13/24");

    // A call that would crash the GVM: sysrq's crash handler panics. The panic is caught
    // before the GVM's own panic path runs, the call is refused, and everything it stored
    // is dropped: sysrq's "Trigger a crash" line (it reaches the console as the call runs)
    // is not in the GVM's log buffer, and the RCU stall suppression sysrq turned on is off.
    let stall = "/sys/module/rcupdate/parameters/rcu_cpu_stall_suppress";
    assert_eq!(gvm.run(&format!("cat {stall}")).trim(), "0");
    let console_exits = info(&rt, "rc", "redirect_console_exits");
    refused(&rt, "rc", &["sh", "-c", "echo c >/proc/sysrq-trigger"]);
    assert!(
        info(&rt, "rc", "redirect_console_exits") > console_exits,
        "sysrq printed nothing on the GVM's console from the lent CPU"
    );
    let why = last_error(&rt, "rc");
    assert!(
        why.contains("the call made the GVM kernel panic: sysrq triggered crash")
            && why.contains("rolled back: the GVM is unchanged"),
        "{why}"
    );
    // The call did run in the GVM's kernel: sysrq's banner went out on the GVM's own
    // serial port from the lent CPU (the command typed there lacks the "sysrq: " prefix).
    let console = std::fs::read_to_string(rt.join("rc.gvm.log")).expect("GVM log");
    assert!(
        console.contains("sysrq: Trigger a crash"),
        "sysrq's banner is not on the GVM's console"
    );
    // ... and left nothing behind: not the banner in the log buffer (whose boot lines
    // are still there), not the stall suppression.
    assert_eq!(
        gvm.run(&format!(
            "cat {stall}; dmesg | grep -c 'Trigger a crash'; dmesg | grep -c 'Linux version'"
        )),
        "0\n0\n1\n",
        "the refused call left stores in the GVM"
    );

    // Module code the distribution shipped runs for the operator once it is checked
    // (#13 item 6): listing the dummy device runs the module's statistics function,
    // trusted because its text is, byte for byte, what the SVM's kernel made of the same
    // dummy.ko. What it counts is what the GVM counts (two pings out of dummy0; no IPv6
    // there, whose router solicitations would race the two reads).
    let sent = gvm.run(
        "echo 1 >/proc/sys/net/ipv6/conf/dummy0/disable_ipv6; ip addr add 10.77.0.1/24 \
         dev dummy0; ip link set dummy0 up; ping -c 2 -W 1 10.77.0.2 >/dev/null 2>&1; \
         cat /sys/class/net/dummy0/statistics/tx_packets",
    );
    assert_eq!(
        sent.trim(),
        "2",
        "the GVM's dummy0 did not send the two pings"
    );
    let link = exterior(&rt, "rc", &["ip", "-s", "link", "show", "dummy0"]);
    let tx = link
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("TX:"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(tx, Some("2"), "exterior ip -s link:\n{link}");
    // virtio_net, every cloud guest's network driver, runs too: listing its device runs
    // its statistics function.
    let mac = gvm.run("cat /sys/class/net/eth0/address");
    assert_eq!(mac.trim(), "52:54:00:12:34:57", "the GVM's eth0");
    let eth0 = exterior(&rt, "rc", &["ip", "-br", "link", "show", "eth0"]);
    assert!(
        eth0.starts_with("eth0 ") && eth0.contains("52:54:00:12:34:57"),
        "exterior ip -br link: {eth0}"
    );
    let trusted = trusted_modules(&rt, "rc");
    assert!(
        ["dummy", "virtio_net"]
            .iter()
            .all(|m| trusted.iter().any(|t| t == m)),
        "{}",
        info_line(&rt, "rc", "redirect_modules")
    );

    // Taking a link down waits for an RCU grace period: the call sleeps in the GVM
    // kernel, is parked while the GVM runs, and is resumed to finish.
    let parked_before = info(&rt, "rc", "redirect_parked");
    exterior(&rt, "rc", &["ip", "link", "set", "lo", "down"]);
    let link = gvm.run("ip link show lo");
    assert!(
        link.contains("lo: <LOOPBACK> mtu"),
        "lo is not down in the GVM: {link}"
    );
    assert!(info(&rt, "rc", "redirect_parked") > parked_before);
    exterior(&rt, "rc", &["ip", "link", "set", "lo", "up"]);
    let link = gvm.run("ip link show lo");
    assert!(
        link.contains("lo: <LOOPBACK,UP,LOWER_UP> mtu"),
        "lo is not up again: {link}"
    );

    // lsmod finds the module; rmmod unloads it (its own exit function may run in that
    // call, and only in that call).
    assert!(module_names(&exterior(&rt, "rc", &["lsmod"])).contains("dummy"));
    exterior(&rt, "rc", &["rmmod", "dummy"]);
    assert_eq!(
        gvm.run(
            "grep -c '^dummy ' /proc/modules; \
             [ -e /sys/class/net/dummy0 ] && echo dummy0 || echo no-dummy0"
        ),
        "0\nno-dummy0\n",
        "dummy is still loaded in the GVM"
    );

    // A call that would wait for an event (ip monitor waits for netlink messages) is
    // refused before it sleeps, and rolled back.
    refused(&rt, "rc", &["ip", "monitor", "link"]);
    let why = last_error(&rt, "rc");
    assert!(
        why.contains("would block") && why.contains("rolled back"),
        "{why}"
    );

    // The GVM keeps running and answering, without an oops, while its own busy work and
    // a thousand mixed calls from outside go on (the soak below).
    let failed_before = info(&rt, "rc", "redirect_failed");
    soak(&rt, "rc", &mut gvm, &sleeper);
    assert_eq!(
        info(&rt, "rc", "redirect_failed"),
        failed_before,
        "{}",
        last_error(&rt, "rc")
    );
    assert_no_oops(&rt, "rc");
    // The sysrq crash and ip monitor: one refused call each.
    let rolled_back = info(&rt, "rc", "redirect_rolled_back");
    assert!(
        rolled_back >= 2,
        "only {rolled_back} calls were rolled back"
    );
    assert!(info(&rt, "rc", "redirect_calls") > calls_before);
    // One exit per call, plus one per time a call was parked and one per retry (a call
    // that would block after earlier calls of its hold went through runs once more).
    assert_eq!(
        info(&rt, "rc", "redirect_exits"),
        info(&rt, "rc", "redirect_calls")
            + info(&rt, "rc", "redirect_parked")
            + info(&rt, "rc", "redirect_retried"),
    );
    // No VMM panic: the instance still answers, and its log has none.
    let vmm_log = std::fs::read_to_string(rt.join("rc.vmm.log")).expect("VMM log");
    assert!(!vmm_log.contains("panicked"), "{vmm_log}");
}

/// Rounds of the soak: each runs 26 commands (5 x hostname, sysctl -w, renice, kill -0,
/// two /proc reads, then ps -e), about 760 redirected calls (4,584 in 6 rounds, measured
/// in the nested harness), so 2 rounds make some 1,500 — half again the thousand the test
/// asserts. (It is the suite's longest test: 250–380 s for 4 rounds in the nested harness,
/// of a CI run that must stay under 30 minutes and now also boots disk and network
/// guests.)
const ROUNDS: u32 = 2;

/// A thousand mixed calls against a busy GVM (instance `name`, whose process `sleeper`
/// sleeps): every command succeeds, the counters agree with the work done, the GVM's
/// console answers between rounds, and its own view agrees with the final state.
fn soak(rt: &Path, name: &str, gvm: &mut GvmConsole, sleeper: &str) {
    // The GVM is busy with its own work: a shell loop writing files and reading procfs.
    gvm.run(
        "printf '#!/bin/sh\\nwhile :; do cat /proc/meminfo >/tmp/m; ls /proc >/dev/null; done\\n' \
         >/tmp/busy; chmod +x /tmp/busy; /tmp/busy & sleep 1",
    );
    let start_calls = info(rt, name, "redirect_calls");
    // A fixed number of rounds (not "until the counter says 1,000"): the counter is the
    // product's, and is checked against the work done below.
    let mut commands = 0u32;
    for round in 1..=ROUNDS {
        // Every command's status is checked: "ok" after it succeeded, or its name and
        // status after it failed; a round must print 26 "ok" lines (5 x 5 commands and ps)
        // and no failure.
        let script = format!(
            "exec 3>&1; check() {{ if \"$@\"; then echo ok >&3; else echo \"FAILED($?): $*\" >&3; fi; }}; \
             for i in 1 2 3 4 5; do check hostname soak-{round}-$i; \
             check sysctl -q -w kernel.domainname=dom-{round}-$i; \
             check renice -n $((i + {round} % 5)) -p {sleeper} >/dev/null; \
             check kill -0 {sleeper}; check cat /proc/loadavg /proc/uptime >/dev/null; done; \
             check ps -eo pid,comm >/dev/null; uname -n"
        );
        let out = exterior(rt, name, &["sh", "-c", &script]);
        let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAILED")).collect();
        assert!(failed.is_empty(), "round {round}: {failed:?}\n{out}");
        let oks = out.lines().filter(|l| *l == "ok").count();
        // ("ok" goes to fd 3, the real stdout, also where a command's output is dropped.)
        assert_eq!(oks, 26, "round {round}: not every command ran:\n{out}");
        assert_eq!(out.lines().last(), Some(format!("soak-{round}-5").as_str()));
        commands += 26;
        let alive = gvm.run(&format!("echo alive-$(({round} * 2))"));
        assert!(alive.contains(&format!("alive-{}", round * 2)), "{alive}");
    }
    let round = ROUNDS;
    let calls = info(rt, name, "redirect_calls") - start_calls;
    eprintln!("soak: {calls} redirected calls by {commands} commands in {round} rounds");
    assert!(
        calls >= 1000,
        "only {calls} redirected calls in {round} rounds"
    );
    // The GVM's own view agrees with the final state, and its processes with ps outside.
    assert_eq!(gvm.run("hostname").trim(), format!("soak-{round}-5"));
    assert_eq!(
        gvm.run("cat /proc/sys/kernel/domainname").trim(),
        format!("dom-{round}-5")
    );
    assert_eq!(nice_of(gvm, sleeper), (5 + round % 5).min(19).to_string());
    let outside = processes(&exterior(rt, name, &["ps", "-eo", "pid,comm"]));
    let inside = processes(&gvm.run("ps -o pid,comm"));
    let stable = |set: &std::collections::BTreeSet<(u32, String)>| {
        set.iter()
            .filter(|(_, c)| !["ps", "cat", "ls", "busy"].contains(&c.as_str()))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(stable(&outside), stable(&inside));
}
