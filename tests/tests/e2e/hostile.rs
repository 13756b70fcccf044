//! A hostile GVM kernel (issue #12): `rootfs/hostile/hostile.c`, a test-only module built
//! against the pinned kernel's headers and packed into the test GVM image only, does what
//! rootkits do, one behaviour at a time through its parameters. The GVM's own tools are
//! fooled; the exterior tools, which run the trusted image's text, are not; and the VMM and
//! the SVM keep answering throughout.

use std::path::Path;
use std::time::{Duration, Instant};

use super::common::*;
use super::instance::{runtime, start, vmm_in};
use super::redirect::{exterior, processes, GvmConsole};

/// Switches one of the module's behaviours; the module confirms each on the console.
fn switch(gvm: &mut GvmConsole, knob: &str, value: &str) {
    let out = gvm.run(&format!(
        "echo {value} > /sys/module/hostile/parameters/{knob} && echo switched=$((40+2))"
    ));
    assert!(
        out.contains("switched=42"),
        "hostile: {knob}={value} failed in the GVM:\n{out}"
    );
}

/// The GVM's nodename as its own `uname -n` reports it (through the patched path).
fn gvm_uname(gvm: &mut GvmConsole) -> String {
    gvm.run("uname -n").trim().to_string()
}

/// The instance still answers its control socket and runs local commands in the SVM.
fn assert_vmm_and_svm_answer(rt: &Path, name: &str) {
    let (code, out, err) = run(vmm_in(rt).args(["info", name]));
    assert_eq!(code, 0, "info failed: {err}");
    assert!(out.contains("redirect_calls="), "{out}");
    let (code, out, err) = run(vmm_in(rt).args(["exec", name, "--local", "--", "echo", "svm-ok"]));
    assert_eq!((code, out.trim()), (0, "svm-ok"), "the SVM: {err}");
}

#[test]
fn a_rootkit_in_the_gvm_fools_its_own_tools_but_not_the_exterior_ones() {
    let rt = runtime("hostile");
    let _instance = start(&rt, "hk", &[]);
    let mut gvm = GvmConsole::attach(&rt, "hk");
    let loaded = gvm.run("insmod /lib/modules/hostile.ko && echo loaded=$((6*7))");
    assert!(loaded.contains("loaded=42"), "insmod hostile.ko:\n{loaded}");
    let truth = gvm.run("cat /proc/sys/kernel/hostname").trim().to_string();
    assert!(!truth.is_empty(), "the GVM has no hostname");

    // 1. ftrace hooks hide a process from getdents64 on /proc and refuse `kill` of it.
    let pid = gvm
        .run("sleep 3600 & echo $! >/tmp/hidden; cat /tmp/hidden")
        .trim()
        .to_string();
    let pid_n: u32 = pid.parse().unwrap_or_else(|_| panic!("no pid: {pid:?}"));
    switch(&mut gvm, "hide_pid", &pid);
    let own_ps = processes(&gvm.run("ps -o pid,comm"));
    assert!(
        !own_ps.iter().any(|(p, _)| *p == pid_n),
        "the hook did not hide {pid} from the GVM's own ps: {own_ps:?}"
    );
    let own_kill = gvm.run(&format!("kill -9 {pid} 2>&1; echo kill-status=$?"));
    assert!(
        !own_kill.contains("kill-status=0"),
        "the hook did not refuse the GVM's own kill: {own_kill}"
    );
    let outside = processes(&exterior(&rt, "hk", &["ps", "-eo", "pid,comm"]));
    assert!(
        outside.contains(&(pid_n, "sleep".to_string())),
        "the exterior ps does not list the hidden sleep {pid}: {outside:?}"
    );
    exterior(&rt, "hk", &["kill", "-9", &pid]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let gone = format!("[ -e /proc/{pid}/stat ] && echo alive || echo gone");
    while gvm.run(&gone).trim() != "gone" {
        assert!(
            Instant::now() < deadline,
            "the hidden process survived the exterior kill -9"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    switch(&mut gvm, "hide_pid", "0");
    assert_vmm_and_svm_answer(&rt, "hk");

    // 2. The start of a redirected system call's handler patched in the GVM's text.
    switch(&mut gvm, "patch_uname", "1");
    assert_eq!(gvm_uname(&mut gvm), "rootkit", "the patch did not take");
    assert_eq!(
        exterior(&rt, "hk", &["uname", "-n"]).trim(),
        truth,
        "the exterior uname ran the GVM's patched text"
    );
    switch(&mut gvm, "patch_uname", "0");
    assert_eq!(gvm_uname(&mut gvm), truth);

    // 3. Hole 1: the GVM's page tables point the kernel text page of that handler at a
    // patched copy in GVM RAM. The view maps the text with tables of its own.
    switch(&mut gvm, "remap_uname", "1");
    assert_eq!(gvm_uname(&mut gvm), "remapped", "the remap did not take");
    assert_eq!(
        exterior(&rt, "hk", &["uname", "-n"]).trim(),
        truth,
        "the exterior uname ran the GVM's remapped copy of the text"
    );
    switch(&mut gvm, "remap_uname", "0");
    assert_eq!(gvm_uname(&mut gvm), truth);
    assert_vmm_and_svm_answer(&rt, "hk");

    // 4. The module unlinks itself from the module list: DKOM, invisible to the kernel's
    // own code too, so the exterior lsmod does not see it either (docs/SECURITY.md says
    // so); what is checked is that both views agree and nothing breaks.
    switch(&mut gvm, "hide_self", "1");
    let own = gvm.run("cat /proc/modules");
    assert!(!own.contains("hostile"), "hide_self did not take: {own}");
    let outside = exterior(&rt, "hk", &["cat", "/proc/modules"]);
    assert!(
        outside.contains("pvpanic_mmio") && !outside.contains("hostile"),
        "the exterior /proc/modules: {outside}"
    );
    switch(&mut gvm, "hide_self", "0");
    assert!(gvm.run("cat /proc/modules").contains("hostile"));
    assert_vmm_and_svm_answer(&rt, "hk");

    // 5. The GVM's syscall entry hooked through its LSTAR (a trampoline in the module):
    // the view enters through the trusted entry with the SVM kernel's MSRs, so the exterior
    // tools work as before (they used to be refused: "syscall entry is hooked").
    switch(&mut gvm, "hook_lstar", "1");
    assert_eq!(
        gvm_uname(&mut gvm),
        truth,
        "the GVM broke under its hooked entry"
    );
    assert_eq!(exterior(&rt, "hk", &["uname", "-n"]).trim(), truth);
    let outside = processes(&exterior(&rt, "hk", &["ps", "-eo", "pid,comm"]));
    assert!(
        outside.iter().any(|(p, _)| *p == 1) && outside.len() > 5,
        "the exterior ps under a hooked LSTAR: {outside:?}"
    );
    switch(&mut gvm, "hook_lstar", "0");
    assert_vmm_and_svm_answer(&rt, "hk");
}
