//! Redirected system calls (DESIGN.md 4.2–4.3): stock tools run in the SVM and read the
//! GVM's kernel state. Every claim is checked against ground truth the GVM prints itself,
//! on its own console, with its own (busybox) tools — nothing of ours runs in the GVM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::common::*;
use super::instance::{runtime, start, vmm_in};

/// The GVM's serial console, driven through `exterior-vmm console` with piped input: the
/// shell there is the GVM's own root shell (the test image's /init starts one when no
/// `exterior_run` is given). Piped, `console` sends its input, prints the console backlog
/// and what follows, and leaves after two quiet seconds; so a command's output is
/// collected by attaching again until its end marker shows.
pub(super) struct GvmConsole {
    rt: PathBuf,
    name: String,
    seq: u32,
}

impl GvmConsole {
    pub(super) fn attach(rt: &Path, name: &str) -> GvmConsole {
        GvmConsole {
            rt: rt.to_path_buf(),
            name: name.to_string(),
            seq: 0,
        }
    }

    /// One `console` session with `input`; what it printed. A session that does not end
    /// (it should leave 300 ms after the console falls silent) fails the test. The short
    /// idle saves CI minutes: [`GvmConsole::run`] attaches again (the backlog comes back)
    /// until its end marker shows.
    fn console(&self, input: &[u8]) -> String {
        let (code, out, err) = run_within(
            vmm_in(&self.rt).args(["console", &self.name, "--idle-ms", "300"]),
            Some(input),
            Duration::from_secs(60),
        );
        assert_eq!(code, 0, "`console {}` failed: {err}", self.name);
        out.replace('\r', "")
    }

    /// Waits until the GVM's console log (the instance's `NAME.gvm.log`, all it printed)
    /// shows `want`, or fails the test.
    pub(super) fn expect(&self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let log = self.rt.join(format!("{}.gvm.log", self.name));
        loop {
            let out =
                String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).replace('\r', "");
            if out.contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} on the GVM's console within {limit:?}; console:\n{out}"
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Types `input` on the GVM's console.
    pub(super) fn send(&self, input: &str) {
        self.console(input.as_bytes());
    }

    /// Runs `script` in the GVM's shell and returns what it printed. The markers are
    /// computed by the shell, so the echo of the typed line never matches them.
    pub(super) fn run(&mut self, script: &str) -> String {
        self.seq += 1;
        let base = self.seq * 1000;
        // busybox ash's line editing asks the terminal for the cursor position at each
        // prompt and eats the first typed characters as the answer: leading blanks absorb
        // that.
        let line =
            format!("        echo @@B$(({base} + 3))@@; {script}; echo @@E$(({base} + 7))@@\n");
        let (b, e) = (format!("@@B{}@@\n", base + 3), format!("@@E{}@@", base + 7));
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut out = self.console(line.as_bytes());
        loop {
            if let Some(start) = out.rfind(&b) {
                if let Some(len) = out[start..].find(&e) {
                    return out[start + b.len()..start + len].to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the GVM's shell did not answer `{script}`; console:\n{out}"
            );
            out = self.console(b"");
        }
    }
}

/// (pid, comm) pairs of a `ps` listing; kernel workers come and go, so they are left out.
/// Names are cut to 15 characters: busybox prints a task's `comm` (TASK_COMM_LEN), procps
/// the longer name the kernel keeps for its threads.
pub(super) fn processes(listing: &str) -> BTreeSet<(u32, String)> {
    listing
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            let comm: String = f.next()?.chars().take(15).collect();
            Some((pid, comm))
        })
        .filter(|(_, c)| !c.starts_with("kworker/"))
        .collect()
}

/// The words of a listing, as a set (busybox `ls` on the GVM's terminal prints columns,
/// GNU `ls` into a pipe one name a line).
fn words(listing: &str) -> BTreeSet<String> {
    listing.split_whitespace().map(str::to_string).collect()
}

pub(super) fn module_names(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "Module")
        .map(str::to_string)
        .collect()
}

pub(super) fn info(rt: &Path, name: &str, key: &str) -> u64 {
    let (code, out, err) = run(vmm_in(rt).args(["info", name]));
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("info has no {key}: {out}"))
}

/// How an instance's GVM kernel was booted, for [`assert_the_slide_is_the_gvms`].
pub(super) enum Boot {
    /// From the bzImage: its decompressor moved the kernel (virtually or physically: both
    /// staying put is a 1 in tens of thousands chance); the engine found the slide `by`
    /// (`info`'s `redirect_kernel_slide_by`: `lstar` or `search`).
    Moved { by: &'static str },
    /// From the ELF vmlinux, which the VMM loads at its link address: slide 0, confirmed
    /// by LSTAR (the pinned vmlinux, extracted from the bzImage's payload, carries the
    /// relocation table).
    AtLink,
}

/// Checks, after the instance's first exterior call, that the engine found the KASLR slide
/// the GVM reports about itself — its `_text` (from /proc/kallsyms, read as root on its
/// console) less the image's link address — the way `boot` says. The GVM boots without
/// `nokaslr`.
pub(super) fn assert_the_slide_is_the_gvms(
    rt: &Path,
    name: &str,
    gvm: &mut GvmConsole,
    boot: Boot,
) {
    const TEXT_LINK: u64 = 0xffff_ffff_8100_0000;
    const TEXT_LINK_PHYS: u64 = 0x100_0000;
    let cmdline = gvm.run("cat /proc/cmdline");
    assert!(
        !cmdline.is_empty() && !cmdline.contains("nokaslr"),
        "the GVM was to boot with KASLR: {cmdline:?}"
    );
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let text = gvm.run("grep -w _text /proc/kallsyms");
    let gvm_slide = text
        .split_whitespace()
        .next()
        .and_then(hex)
        .and_then(|a| a.checked_sub(TEXT_LINK))
        .unwrap_or_else(|| panic!("no _text in the GVM's kallsyms: {text:?}"));
    let code = gvm.run("grep 'Kernel code' /proc/iomem");
    let code_pa = code
        .trim()
        .split('-')
        .next()
        .and_then(hex)
        .unwrap_or_else(|| panic!("no kernel code in the GVM's /proc/iomem: {code:?}"));
    let (status, out, err) = run(vmm_in(rt).args(["info", name]));
    assert_eq!(status, 0, "{err}");
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("info has no {key}: {out}"))
    };
    let found = field("redirect_kernel_slide");
    let found = found
        .strip_prefix("0x")
        .and_then(hex)
        .unwrap_or_else(|| panic!("info names no kernel slide: {found:?}"));
    assert_eq!(
        found, gvm_slide,
        "the engine's slide {found:#x} is not the GVM's own {gvm_slide:#x} ({text})"
    );
    let by = field("redirect_kernel_slide_by");
    match boot {
        Boot::Moved { by: expected } => {
            assert_eq!(by, expected, "slide {found:#x}");
            assert!(
                found != 0 || code_pa != TEXT_LINK_PHYS,
                "KASLR moved the GVM's kernel neither virtually nor physically"
            );
        }
        Boot::AtLink => {
            assert_eq!(by, "lstar", "slide {found:#x}");
            assert_eq!(
                (found, code_pa),
                (0, TEXT_LINK_PHYS),
                "an ELF vmlinux moved"
            );
        }
    }
    eprintln!("--- the GVM's KASLR slide: {found:#x} ({by}), kernel code at {code_pa:#x}");
}

/// `exec` of a stock command, which must succeed; its stdout.
pub(super) fn exterior(rt: &Path, name: &str, argv: &[&str]) -> String {
    let (code, out, err) = run(vmm_in(rt).args(["exec", name, "--"]).args(argv));
    assert_eq!(code, 0, "`{}` failed in the SVM: {err}", argv.join(" "));
    out
}

fn local(rt: &Path, name: &str, argv: &[&str]) -> String {
    let (code, out, err) = run(vmm_in(rt).args(["exec", name, "--local", "--"]).args(argv));
    assert_eq!(
        code,
        0,
        "`{}` failed locally in the SVM: {err}",
        argv.join(" ")
    );
    out
}

#[test]
fn stock_tools_in_the_svm_read_the_gvm_kernel_state() {
    let rt = runtime("redirect");
    // Booted from the bzImage, as users have their kernels (/boot/vmlinuz-*): the engine
    // takes the vmlinux it reads from the payload itself. The other instance tests boot
    // the ELF vmlinux.
    let bz = images().join("bzImage");
    let initrd = images().join("gvm.cpio");
    // And with a disk, which its devices write while exterior calls hold it.
    let disk = scratch_dir("redirect-disk").join("vda.img");
    std::fs::write(&disk, vec![0u8; 32 << 20]).unwrap();
    let tag = nonce();
    let _instance = start(
        &rt,
        "rd",
        &[
            "--kernel",
            bz.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            // Holds that end only when a program's calls stop coming, or it ends (the
            // harness's own 100 ms slice ends some halfway through a run of calls).
            // The SVM's memory differs from the GVM's (256M), so `free` tells them apart.
            "--svm-mem",
            "288M",
            // An instance's GVM takes extra command-line text.
            "--append",
            &format!("exterior_tag={tag}"),
            "--hold-slice-us",
            "1000000",
            "--hold-idle-us",
            "200000",
        ],
    );
    let mut gvm = GvmConsole::attach(&rt, "rd");

    // Ground truth, set up and printed by the GVM itself. The dummy module is loaded
    // without a device (its code, run when a dummy device is listed, is checked in
    // tests/e2e/recovery.rs).
    // The GVM differs from the SVM in everything read below (names, a module, an address
    // and an MTU, a listener, processes), and each check also shows the SVM's own value
    // (`--local`) is different, so no check passes by reading the SVM.
    let domain = format!("gvm-{}", nonce());
    // A user of the GVM's own, logged in on pts/7 as far as its utmp says (one 384-byte
    // glibc `struct utmp`: USER_PROCESS of pid 1, so `who` finds its process alive).
    // Eight characters at most: `w` cuts longer names.
    let user: String = format!("op{}", nonce()).chars().take(8).collect();
    // The GVM's /etc/hostid holds bytes 11 22 33 44: glibc reads them as one int.
    let hostid = "44332211";
    let utmp_size = gvm.run(&format!(
        "echo '{user}:x:4242:4242::/tmp:/bin/sh' >>/etc/passwd; printf '\\021\\042\\063\\104' >/etc/hostid; \
         mkdir -p /var; ln -s /run /var/run; z() {{ head -c $1 /dev/zero; }}; \
         {{ printf '\\007\\000\\000\\000\\001\\000\\000\\000pts/7'; z 27; \
         printf 'ex07{user}'; z {pad}; z 308; }} >/run/utmp; wc -c </run/utmp",
        pad = 32 - user.len()
    ));
    assert_eq!(utmp_size.trim(), "384");
    gvm.run(&format!(
        "hostname exterior-target; echo {domain} >/proc/sys/kernel/domainname; \
         modprobe dummy numdummies=0; ip addr add 10.9.8.7/24 dev lo; ip link set lo mtu 61234; \
         printf '#!/bin/sh\\nwhile :; do sleep 3600; done\\n' >/tmp/xmarker; chmod +x /tmp/xmarker; \
         /tmp/xmarker & nc -l -p 7777 >/dev/null 2>&1 & \
         mkdir /tmp/mnt-{tag}; mount -t tmpfs -o size=3m exterior-{tag} /tmp/mnt-{tag}; \
         echo exterior-kmsg-{tag} >/dev/kmsg; sleep 1",
        tag = domain
    ));
    let gvm_ps = processes(&gvm.run("ps -o pid,comm"));
    let gvm_modules = module_names(&gvm.run("cat /proc/modules"));
    let gvm_cmdline = gvm.run("cat /proc/cmdline");
    let gvm_sys_modules = words(&gvm.run("ls /sys/module"));
    let gvm_files = gvm.run("ls /; ls -la /tmp /root");
    assert!(gvm_ps.iter().any(|(_, c)| c == "xmarker"), "{gvm_ps:?}");
    assert!(
        gvm_cmdline.contains(&format!(" exterior_tag={tag}")),
        "{gvm_cmdline}"
    );
    // One spare possible CPU beyond the one it runs (the MADT lists it disabled).
    assert_eq!(
        gvm.run("cat /sys/devices/system/cpu/possible /sys/devices/system/cpu/online"),
        "0-1\n0\n"
    );
    assert!(gvm_modules.contains("dummy"), "{gvm_modules:?}");
    assert!(
        gvm_sys_modules.contains("dummy") && !gvm_sys_modules.contains("autofs4"),
        "{gvm_sys_modules:?}"
    );
    let calls_before = info(&rt, "rd", "redirect_calls");
    let holds_before = info(&rt, "rd", "redirect_holds");

    // ps: exactly the GVM's processes (less the GVM's own `ps`), none of the SVM's.
    let ps = processes(&exterior(&rt, "rd", &["ps", "-eo", "pid,comm"]));
    // ... its run of calls (three or more a process) under few holds of the GVM, not one
    // each.
    let (calls, holds) = (
        info(&rt, "rd", "redirect_calls") - calls_before,
        info(&rt, "rd", "redirect_holds") - holds_before,
    );
    assert!(
        calls >= 3 * gvm_ps.len() as u64 && holds > 0 && holds * 4 <= calls,
        "ps made {calls} redirected calls under {holds} holds of the GVM"
    );
    let expected: BTreeSet<_> = gvm_ps.iter().filter(|(_, c)| c != "ps").cloned().collect();
    assert_eq!(ps, expected, "exterior ps differs from the GVM's own ps");
    assert_the_slide_is_the_gvms(&rt, "rd", &mut gvm, Boot::Moved { by: "lstar" });
    assert!(!ps.iter().any(|(_, c)| c.starts_with("exterior")), "{ps:?}");
    let svm_ps = processes(&local(&rt, "rd", &["ps", "-eo", "pid,comm"]));
    assert!(
        svm_ps.iter().any(|(_, c)| c == "exterior-agent"),
        "{svm_ps:?}"
    );

    // lsmod: the GVM's modules; the SVM's own list differs (it loads the trusted
    // modules, autofs4 among them, which this GVM does not).
    let lsmod = module_names(&exterior(&rt, "rd", &["lsmod"]));
    assert_eq!(lsmod, gvm_modules);
    assert!(!gvm_modules.contains("autofs4"), "{gvm_modules:?}");
    let svm_lsmod = local(&rt, "rd", &["lsmod"]);
    assert!(
        svm_lsmod.starts_with("Module") && module_names(&svm_lsmod).contains("autofs4"),
        "{svm_lsmod}"
    );

    // Files of /proc and /sys, the names, links and listening sockets agree with the GVM.
    assert_eq!(exterior(&rt, "rd", &["cat", "/proc/cmdline"]), gvm_cmdline);
    assert_ne!(local(&rt, "rd", &["cat", "/proc/cmdline"]), gvm_cmdline);
    assert_eq!(
        exterior(&rt, "rd", &["cat", "/proc/sys/kernel/domainname"]).trim(),
        domain
    );
    assert_eq!(
        local(&rt, "rd", &["cat", "/proc/sys/kernel/domainname"]).trim(),
        "(none)"
    );
    assert_eq!(
        exterior(&rt, "rd", &["uname", "-n"]).trim(),
        "exterior-target"
    );
    assert_eq!(exterior(&rt, "rd", &["hostname"]).trim(), "exterior-target");
    assert_eq!(local(&rt, "rd", &["uname", "-n"]).trim(), "svm");
    assert_eq!(
        words(&exterior(&rt, "rd", &["ls", "/sys/module"])),
        gvm_sys_modules,
        "ls /sys/module differs from the GVM's"
    );
    let svm_sys_modules = words(&local(&rt, "rd", &["ls", "/sys/module"]));
    assert!(
        svm_sys_modules.contains("kernel") && svm_sys_modules.contains("autofs4"),
        "{svm_sys_modules:?}"
    );
    assert_eq!(
        exterior(&rt, "rd", &["cat", "/sys/class/net/lo/mtu"]).trim(),
        "61234"
    );
    assert_eq!(
        local(&rt, "rd", &["cat", "/sys/class/net/lo/mtu"]).trim(),
        "65536"
    );
    let link = exterior(&rt, "rd", &["ip", "-o", "link", "show", "lo"]);
    assert!(
        link.contains("lo: <LOOPBACK,UP,LOWER_UP> mtu 61234 "),
        "{link}"
    );
    let svm_link = local(&rt, "rd", &["ip", "-o", "link", "show", "lo"]);
    assert!(
        svm_link.contains("lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 "),
        "{svm_link}"
    );
    let addrs = exterior(&rt, "rd", &["ip", "-br", "addr"]);
    assert!(
        addrs.contains("10.9.8.7/24") && addrs.contains("127.0.0.1/8"),
        "ip -br addr does not show the GVM's addresses: {addrs}"
    );
    let svm_addrs = local(&rt, "rd", &["ip", "-br", "addr"]);
    assert!(
        svm_addrs.contains("127.0.0.1/8") && !svm_addrs.contains("10.9.8.7"),
        "{svm_addrs}"
    );
    let ss = exterior(&rt, "rd", &["ss", "-ltn"]);
    assert!(
        ss.contains(":7777"),
        "ss -ltn does not show the GVM's listener: {ss}"
    );
    let svm_ss = local(&rt, "rd", &["ss", "-ltn"]);
    assert!(
        svm_ss.starts_with("State") && !svm_ss.contains(":7777"),
        "{svm_ss}"
    );

    // The tools that read the system through the program's own view of it (issue #13
    // item 7): the kernel log, the mount table and file system usage are the GVM's.
    let kmsg_marker = format!("exterior-kmsg-{domain}");
    assert!(gvm.run("dmesg").contains(&kmsg_marker));
    for dmesg in [&["dmesg"][..], &["dmesg", "-S"]] {
        let log = exterior(&rt, "rd", dmesg);
        assert!(
            log.contains(&kmsg_marker) && log.contains("Linux version"),
            "`{}` does not show the GVM's kernel log: {log}",
            dmesg.join(" ")
        );
    }
    let mount_point = format!("/tmp/mnt-{domain}");
    let source = format!("exterior-{domain}");
    for mounts in [&["mount"][..], &["findmnt", "-l"]] {
        let table = exterior(&rt, "rd", mounts);
        assert!(
            table
                .lines()
                .any(|l| l.contains(&mount_point) && l.contains(&source)),
            "`{}` does not show the GVM's mounts: {table}",
            mounts.join(" ")
        );
    }
    let usage = |listing: &str| -> Vec<String> {
        let line = listing.lines().find(|l| l.starts_with(&source));
        line.unwrap_or_else(|| panic!("no {source} in df: {listing}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // POSIX format: busybox's df otherwise puts a name longer than 20 characters on a
    // line of its own (this one's length follows the test's pid: it failed so).
    let gvm_df = usage(&gvm.run("df -kP"));
    assert_eq!(gvm_df[1], "3072", "{gvm_df:?}");
    assert_eq!(usage(&exterior(&rt, "rd", &["df", "-kP"])), gvm_df);

    // /etc/mtab is init's mount table too.
    assert!(exterior(&rt, "rd", &["cat", "/etc/mtab"]).contains(&mount_point));
    // The GVM's users and logins (its /etc/passwd and utmp).
    let who = exterior(&rt, "rd", &["who"]);
    assert!(
        who.lines()
            .any(|l| l.starts_with(&user) && l.contains("pts/7")),
        "who does not show the GVM's login: {who}"
    );
    assert_eq!(exterior(&rt, "rd", &["users"]).trim(), user);
    assert_eq!(exterior(&rt, "rd", &["id", "-nu", "4242"]).trim(), user);
    // Calls that would change the SVM where the operator means the GVM are refused,
    // saying so.
    let (code, _, err) =
        run(vmm_in(&rt).args(["exec", "rd", "--", "mount", "-t", "tmpfs", "none", "/mnt"]));
    assert!(
        code != 0
            && err.contains("exterior: mount is refused: it would act on the SVM, not the GVM"),
        "mount in the SVM: status {code}, {err}"
    );
    // The SVM's own answers to all of the above (one command, to save the harness's
    // minutes) differ: no marker of the GVM's, no user 4242, and no tmpfs on /mnt.
    let svm = local(
        &rt,
        "rd",
        &[
            "sh",
            "-c",
            "dmesg; dmesg -S; mount; findmnt -l; df -k; cat /etc/mtab; who; users; \
             id -nu 4242 || echo no-user-4242; cat /proc/mounts; hostid",
        ],
    );
    for marker in [&kmsg_marker[..], &mount_point, &source, &user, hostid] {
        assert!(
            !svm.contains(marker),
            "{marker} in the SVM's answers: {svm}"
        );
    }
    assert!(
        svm.contains("no-user-4242") && !svm.contains(" /mnt "),
        "{svm}"
    );

    // Another process's limits, scheduling and I/O priority are the GVM's, written and
    // read: set from outside, the GVM's own /proc and busybox agree, and so does the
    // exterior reading of them (values the SVM's processes never have).
    let (marker_pid, _) = gvm_ps.iter().find(|(_, c)| c == "xmarker").unwrap();
    let pid = marker_pid.to_string();
    exterior(&rt, "rd", &["prlimit", "--pid", &pid, "--nofile=100:200"]);
    exterior(&rt, "rd", &["chrt", "-f", "-p", "10", &pid]);
    exterior(&rt, "rd", &["ionice", "-c", "3", "-p", &pid]);
    let limits = gvm.run(&format!("grep 'open files' /proc/{pid}/limits"));
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>(),
        ["Max", "open", "files", "100", "200", "files"],
        "{limits}"
    );
    let stat = gvm.run(&format!("cat /proc/{pid}/stat"));
    let fields: Vec<_> = stat.split_whitespace().collect();
    assert_eq!(
        (fields.get(39), fields.get(40)),
        (Some(&"10"), Some(&"1")),
        "rt_priority and policy (SCHED_FIFO) in the GVM: {stat}"
    );
    assert_eq!(gvm.run(&format!("ionice -p {pid}")).trim(), "idle");
    let nofile = exterior(
        &rt,
        "rd",
        &[
            "prlimit",
            "--pid",
            &pid,
            "--nofile",
            "--noheadings",
            "-o",
            "SOFT,HARD",
        ],
    );
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>(),
        ["100", "200"]
    );
    assert_eq!(
        exterior(&rt, "rd", &["chrt", "-p", &pid]),
        format!(
            "pid {pid}'s current scheduling policy: SCHED_FIFO\n\
             pid {pid}'s current scheduling priority: 10\n"
        )
    );
    assert_eq!(exterior(&rt, "rd", &["ionice", "-p", &pid]).trim(), "idle");

    // More of the image's tools, broadly (docs/LIMITS.md lists them all), in one command
    // to save the harness's minutes: each must succeed and show something of the GVM's
    // that the SVM does not have, or be refused with its reason.
    let mem_total = gvm.run("grep MemTotal /proc/meminfo");
    let mem_total = mem_total
        .split_whitespace()
        .nth(1)
        .expect("MemTotal")
        .to_string();
    let sweep = [
        "top -b -n 1".to_string(),
        "pgrep -l xmarker".to_string(),
        format!("pmap {pid}"),
        "free -k".to_string(),
        "w -h".to_string(),
        "uptime".to_string(),
        "utmpdump /var/run/utmp 2>/dev/null".to_string(),
        "lsblk -d -n -o NAME".to_string(),
        format!("lsfd -p {pid} -o COMMAND"),
        format!("stat -f -c %b {mount_point}"),
        "sysctl -n kernel.hostname".to_string(),
        "hostid".to_string(),
        "pidwait xmarker 2>&1".to_string(),
        "ipcmk -Q 2>&1".to_string(),
    ];
    let script: Vec<String> = sweep
        .iter()
        .enumerate()
        .map(|(i, c)| format!("echo @@{i}@@; {c} || echo @@status-$?@@"))
        .collect();
    let out = exterior(&rt, "rd", &["sh", "-c", &script.join("; ")]);
    let answer = |cmd: &str| -> &str {
        let i = sweep.iter().position(|c| c.starts_with(cmd)).expect(cmd);
        let from = out.find(&format!("@@{i}@@\n")).expect("marker") + format!("@@{i}@@\n").len();
        let to = out[from..]
            .find(&format!("@@{}@@", i + 1))
            .map_or(out.len(), |n| from + n);
        &out[from..to]
    };
    let succeeded = |cmd: &str| -> &str {
        let text = answer(cmd);
        assert!(!text.contains("@@status-"), "`{cmd}` failed: {text}");
        text
    };
    let gvm_only = [
        ("top", "xmarker"),
        ("pgrep", &format!("{pid} xmarker")[..]),
        // The GVM's programs are busybox; the SVM has none.
        ("pmap", "busybox"),
        ("w", &user[..]),
        ("uptime", " 1 user"),
        ("utmpdump", &user[..]),
        ("lsblk", "vda"),
        ("lsfd", "xmarker"),
        // The GVM's /etc/hostid (its own busybox agrees, below).
        ("hostid", hostid),
    ];
    for (cmd, mark) in gvm_only {
        let text = succeeded(cmd);
        assert!(
            text.contains(mark),
            "`{cmd}` does not show the GVM's {mark}: {text}"
        );
    }
    let free = succeeded("free");
    let mem = free
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .unwrap_or_default();
    assert_eq!(
        mem.split_whitespace().nth(1),
        Some(mem_total.as_str()),
        "{free}"
    );
    let svm_mem = local(&rt, "rd", &["grep", "MemTotal", "/proc/meminfo"]);
    assert_ne!(svm_mem.split_whitespace().nth(1), Some(mem_total.as_str()));
    // 3 MiB of 4 KiB blocks.
    assert_eq!(succeeded("stat").trim(), "768");
    assert_eq!(succeeded("sysctl").trim(), "exterior-target");
    assert_eq!(gvm.run("hostid").trim(), hostid);
    for (cmd, call) in [("pidwait", "pidfd_open"), ("ipcmk", "msgget")] {
        let text = answer(cmd);
        assert!(
            text.contains(&format!("exterior: {call} is refused")) && text.contains("@@status-"),
            "`{cmd}` was not refused: {text}"
        );
    }

    // The session left nothing behind in the GVM: same processes, modules and files.
    let after_ps: BTreeSet<_> = processes(&gvm.run("ps -o pid,comm"))
        .into_iter()
        .filter(|(_, c)| c != "ps")
        .collect();
    assert_eq!(after_ps, expected, "the GVM's processes changed");
    assert_eq!(module_names(&gvm.run("cat /proc/modules")), gvm_modules);
    assert_eq!(gvm.run("ls /; ls -la /tmp /root"), gvm_files);

    // The disk is the GVM's (the SVM has none), and the GVM writes and reads it back whole
    // while exterior calls hold it: every hold pauses the disk's I/O thread between
    // requests (vstate/dma_gate.rs), so no commit of a call lands on a page the disk was
    // filling, nor does a call see memory change under it.
    assert_eq!(gvm.run("cat /sys/block/vda/size").trim(), "65536");
    assert_eq!(
        exterior(&rt, "rd", &["cat", "/sys/block/vda/size"]).trim(),
        "65536"
    );
    assert!(!words(&local(&rt, "rd", &["ls", "/sys/block"])).contains("vda"));
    // (dmesg -n 1: drop_caches logs each use, which would flood the console the test
    // reads.) The loop runs until told to stop, so it overlaps the exterior calls below whatever
    // the speeds (30 rounds once ended within one exterior call).
    gvm.run(
        "dmesg -n 1; dd if=/dev/urandom of=/tmp/blob bs=64k count=16 2>/dev/null; \
         (i=0; while [ ! -e /tmp/stop ]; do o=$((i % 30)); \
         dd if=/tmp/blob of=/dev/vda bs=64k seek=$o conv=fsync 2>/dev/null; \
         echo 3 >/proc/sys/vm/drop_caches; dd if=/dev/vda of=/tmp/back bs=64k skip=$o count=16 2>/dev/null; \
         cmp -s /tmp/blob /tmp/back || echo corrupt-$i; i=$((i+1)); done; echo disk-loop-rounds=$i) \
         >/tmp/disk.log 2>&1 & true",
    );
    let mut stats_seen = BTreeSet::new();
    for _ in 0..6 {
        stats_seen.insert(exterior(&rt, "rd", &["cat", "/sys/block/vda/stat"]));
    }
    gvm.run("touch /tmp/stop");
    let mut polls = 0;
    let loop_log = loop {
        let log = gvm.run("cat /tmp/disk.log");
        if log.contains("disk-loop-rounds=") {
            break log;
        }
        polls += 1;
        assert!(polls < 60, "the GVM's disk loop did not stop: {log}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    assert!(
        !loop_log.contains("corrupt") && !loop_log.contains("disk-loop-rounds=0"),
        "the GVM's disk data changed, or its loop never ran: {loop_log}"
    );
    assert!(
        stats_seen.len() > 1,
        "the disk did no I/O while exterior calls ran: {stats_seen:?}"
    );
    assert_eq!(
        exterior(&rt, "rd", &["cat", "/sys/block/vda/stat"]),
        gvm.run("cat /sys/block/vda/stat").trim_start_matches('\n'),
        "the disk's counters, once idle, differ from the GVM's"
    );

    // One VM exit per redirected call: the final store, nothing inside the call (and one
    // more each time a call sleeps in the GVM kernel and is parked, reads rarely do, and
    // one more per retry after the GVM ran).
    let calls = info(&rt, "rd", "redirect_calls") - calls_before;
    assert!(calls > 100, "only {calls} calls were redirected");
    assert_eq!(info(&rt, "rd", "redirect_failed"), 0);
    assert_eq!(
        info(&rt, "rd", "redirect_exits"),
        info(&rt, "rd", "redirect_calls")
            + info(&rt, "rd", "redirect_parked")
            + info(&rt, "rd", "redirect_retried"),
        "VM exits of the redirect vCPU differ from the number of calls"
    );
}
