//! A hostile GVM kernel (issue #12): `rootfs/hostile/hostile.c`, a test-only module built
//! against the pinned kernel's headers and packed into the test GVM image only, does what
//! rootkits do, one behaviour at a time through its parameters. The GVM's own tools are
//! fooled; the exterior tools, which run the trusted image's text, are not; and the VMM and
//! the SVM keep answering throughout.

use std::path::Path;
use std::time::{Duration, Instant};

use super::common::*;
use super::instance::{runtime, start, vmm_in};
use super::recovery::last_error;
use super::redirect::{assert_the_slide_is_the_gvms, exterior, processes, Boot, GvmConsole};

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

/// `exec` of a stock command expected to fail, run as [`exterior`] runs it: (exit code,
/// stdout, stderr), whatever they are.
fn exterior_outcome(rt: &Path, name: &str, argv: &[&str]) -> (i32, String, String) {
    run(vmm_in(rt).args(["exec", name, "--"]).args(argv))
}

/// `exec` of a stock command, started and left running (its output discarded).
fn exterior_child(rt: &Path, name: &str, argv: &[&str]) -> std::process::Child {
    vmm_in(rt)
        .args(["exec", name, "--"])
        .args(argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn exterior-vmm exec")
}

/// The SVM's own hostname, read without redirection.
fn svm_hostname(rt: &Path, name: &str) -> String {
    let (code, out, err) = run(vmm_in(rt).args([
        "exec",
        name,
        "--local",
        "--",
        "cat",
        "/proc/sys/kernel/hostname",
    ]));
    assert_eq!(code, 0, "the SVM's own hostname: {err}");
    out.trim().to_string()
}

/// What the shim prints when the VMM refuses a redirected `sethostname`.
const REFUSED_SETHOSTNAME: &str = "exterior: the redirect failed in the VMM (sethostname)";

/// The guest-physical address of the write that `exterior-vmm info`'s
/// `redirect_last_error` says the view does not back (`RunError::UnbackedWrite`: "the call
/// wrote to guest-physical 0x…, which the view does not back …"), if it says that.
fn unbacked_write(info: &str) -> Option<u64> {
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("redirect_last_error="))?;
    let (_, rest) = line.split_once("the call wrote to guest-physical 0x")?;
    if !rest.contains("which the view does not back") {
        return None;
    }
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).ok()
}

/// The guest-physical address and page of a store that `exterior-vmm info`'s
/// `redirect_last_error` says was refused as stray (`ForgedStore::Stray`: "a store to
/// guest-physical 0x… in the sentinel page, where neither a stub nor a trap stores").
fn stray_store(info: &str) -> Option<(u64, String)> {
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("redirect_last_error="))?;
    let (_, rest) = line.split_once("a store to guest-physical 0x")?;
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    let (_, rest) = rest.split_once(" in ")?;
    let (page, _) = rest.split_once(", where neither a stub nor a trap stores; refused")?;
    Some((u64::from_str_radix(&hex, 16).ok()?, page.to_string()))
}

/// The guest-physical range [start, end) of the fake namespace's nodename, from the
/// module's `alias_uts_split` ok line ("nodename at phys [0x…, 0x…)").
fn nodename_range(note: &str) -> Option<(u64, u64)> {
    let (_, rest) = note.split_once("nodename at phys [0x")?;
    let (start, rest) = rest.split_once(", 0x")?;
    let end = rest.split(')').next()?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

#[test]
fn a_rootkit_in_the_gvm_fools_its_own_tools_but_not_the_exterior_ones() {
    let rt = runtime("hostile");
    // Step 8's call is given up at this deadline (not the default 30 s: it shows the option
    // reaches the engine, and saves the suite 15 s). From the bzImage, so with KASLR on.
    let (bz, initrd) = (images().join("bzImage"), images().join("gvm.cpio"));
    let (bz, initrd) = (bz.to_str().expect("UTF-8"), initrd.to_str().expect("UTF-8"));
    let _instance = start(
        &rt,
        "hk",
        &["--kernel", bz, "--initrd", initrd, "--call-deadline", "15"],
    );
    let mut gvm = GvmConsole::attach(&rt, "hk");
    let loaded = gvm.run("insmod /lib/modules/hostile.ko && echo loaded=$((6*7))");
    assert!(loaded.contains("loaded=42"), "insmod hostile.ko:\n{loaded}");
    let truth = gvm.run("cat /proc/sys/kernel/hostname").trim().to_string();
    assert!(!truth.is_empty(), "the GVM has no hostname");

    // 0. The syscall entry hooked before the first exterior call: LSTAR, the GVM's claim
    // of its KASLR slide, leads into the module. The engine finds the slide by the text
    // itself (promise 21), and it is the one the GVM reports.
    switch(&mut gvm, "hook_lstar", "1");
    assert_eq!(exterior(&rt, "hk", &["uname", "-n"]).trim(), truth);
    assert_the_slide_is_the_gvms(&rt, "hk", &mut gvm, Boot::Moved { by: "search" });
    switch(&mut gvm, "hook_lstar", "0");

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

    // 6. Hole 2: a redirected call runs on the GVM's own kernel page tables, so a mapping
    // the GVM makes decides which physical memory the trusted text reads and writes for
    // the operator. The module points the uts_ns of the shadow task's nsproxy (the shadow
    // copies init_task, whose nsproxy the module replaced at insmod, before this
    // instance's first redirected call; the GVM's real tasks keep theirs) at an alias
    // the module maps: of physical B + init_uts_ns (6a), or straddling physical page B
    // and a page of GVM RAM (6b). Where B leads must not be SVM memory nor the view's own
    // tables: the exterior uname and hostname must fail there, not read SVM memory nor
    // write either. The addresses are the redirect VM's layout before the fix
    // (`ViewLayout::for_guest`) for this GVM, which `start` runs with `--mem 256M`
    // (checked here): the window at the 1 GiB boundary after GVM RAM, 0x4000_0000, its
    // first page the view's PML4; all of SVM RAM, writable, at svm_base, the 64 GiB
    // boundary after the window, 0x10_0000_0000. The SVM runs the same kernel, `nokaslr`,
    // at its link address; the GVM with KASLR elsewhere: B = svm_base plus the distance
    // between the two kernels' init_uts_ns (a multiple of 2 MiB) made the alias the SVM's
    // own init_uts_ns.
    let ram_end = gvm
        .run("grep 'System RAM' /proc/iomem")
        .lines()
        .filter_map(|l| l.trim().split_once('-'))
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .filter_map(|end| u64::from_str_radix(end, 16).ok())
        .max()
        .unwrap_or(0);
    assert!(
        ram_end > 0 && ram_end < 1 << 30,
        "GVM RAM must end below 1 GiB for the layout above: {ram_end:#x}"
    );
    gvm.run("hostname hk-gvm");
    let gvm_host = gvm.run("cat /proc/sys/kernel/hostname").trim().to_string();
    assert_eq!(gvm_host, "hk-gvm", "the GVM's hostname did not change");
    let svm_host = svm_hostname(&rt, "hk");
    assert!(
        !svm_host.is_empty() && svm_host != gvm_host,
        "the SVM's hostname {svm_host:?} must be set and differ from the GVM's"
    );
    // The GVM boots with KASLR: a kernel-image symbol's physical address is its address
    // less `_text`'s, plus where the kernel's code starts in RAM (/proc/iomem, as root).
    let symbol = |gvm: &mut GvmConsole, name: &str| {
        gvm.run(&format!("grep -w {name} /proc/kallsyms"))
            .split_whitespace()
            .next()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .unwrap_or(0)
    };
    let (uts_va, text_va) = (symbol(&mut gvm, "init_uts_ns"), symbol(&mut gvm, "_text"));
    let code_pa = gvm
        .run("grep 'Kernel code' /proc/iomem")
        .trim()
        .split('-')
        .next()
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .unwrap_or(0);
    assert!(
        text_va != 0 && code_pa != 0,
        "the GVM shows no _text ({text_va:#x}) or no kernel code in /proc/iomem ({code_pa:#x})"
    );
    let uts_pa = uts_va.wrapping_sub(text_va).wrapping_add(code_pa);
    assert!(
        uts_va != 0 && uts_pa < ram_end,
        "init_uts_ns at {uts_va:#x} (phys {uts_pa:#x}) is not in the GVM's kernel image"
    );

    // 6a. The alias at svm_base + the SVM's init_uts_ns: the SVM's own hostname.
    let (code, svm_syms, err) = run(vmm_in(&rt).args([
        "exec",
        "hk",
        "--local",
        "--",
        "grep",
        "-w",
        "init_uts_ns",
        "/proc/kallsyms",
    ]));
    assert_eq!(code, 0, "the SVM's kallsyms: {err}");
    let svm_uts_pa = svm_syms
        .split_whitespace()
        .next()
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .and_then(|va| va.checked_sub(0xffff_ffff_8000_0000))
        .unwrap_or_else(|| panic!("no init_uts_ns in the SVM's kallsyms: {svm_syms:?}"));
    let svm_base: u64 = 0x10_0000_0000;
    let alias_base = (svm_base + svm_uts_pa)
        .checked_sub(uts_pa)
        .filter(|b| b % 0x1000 == 0)
        .unwrap_or_else(|| panic!("no alias base for {svm_uts_pa:#x} from {uts_pa:#x}"));
    switch(&mut gvm, "alias_uts", &format!("{alias_base:#x}"));
    let note = gvm.run("dmesg | grep 'alias_uts = ' | tail -n 1");
    assert!(
        note.contains(&format!("init_uts_ns at phys {uts_pa:#x}")),
        "the module's alias is not where the test computed: {note}"
    );
    let (code, out, err) = exterior_outcome(&rt, "hk", &["uname", "-n"]);
    assert!(
        !out.contains(&svm_host),
        "the exterior uname read the SVM's memory: {out:?}"
    );
    assert_ne!(
        code, 0,
        "the exterior uname succeeded through the alias (printed {out:?}, stderr {err:?}); \
         if it printed the GVM's hostname, the shadow task did not take the module's nsproxy"
    );
    // Debian's hostname(1) exits 0 when sethostname fails with anything but EPERM or
    // EINVAL, so the refusal is read from the shim's notice and the VMM's last error.
    let (_, _, err) = exterior_outcome(&rt, "hk", &["hostname", "pwned"]);
    assert!(
        err.contains(REFUSED_SETHOSTNAME),
        "the exterior sethostname was not refused through the alias: {err}"
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    assert!(
        info.contains("which the view does not back"),
        "the refusal does not name the unbacked access: {info}"
    );
    assert_eq!(
        svm_hostname(&rt, "hk"),
        svm_host,
        "the exterior sethostname wrote the SVM's memory"
    );
    assert_eq!(
        gvm.run("cat /proc/sys/kernel/hostname").trim(),
        gvm_host,
        "the GVM's own hostname changed"
    );

    // 6b. The window's first page, the view's PML4. The window is a read-only memslot, so
    // a store there must exit to the VMM and fail the call. A plain alias cannot show that:
    // sethostname first checks CAP_SYS_ADMIN in uts_ns->user_ns, which it would read from
    // the PML4 (a table entry taken for a pointer) and fail on before any store, window
    // read-only or not. So the module splits its namespace over two virtually contiguous
    // pages: sysname and nodename at the end of the window's first page, user_ns and the
    // rest in a page of GVM RAM holding init_uts_ns's own values (user_ns = &init_user_ns,
    // which the shadow's credentials pass). The check passes, and the first access the
    // call makes to the window is the store of the new nodename (memcpy in sethostname),
    // over PML4 entries 0x1f6..0x1fe, 0x1fd the window's own slot; the VMM must refuse
    // exactly that store: an unbacked write inside the nodename, inside the window page.
    const WINDOW: u64 = 1 << 30;
    switch(&mut gvm, "alias_uts_split", &format!("{WINDOW:#x}"));
    let note = gvm.run("dmesg | grep 'alias_uts_split = ' | tail -n 1");
    let nodename = nodename_range(&note)
        .unwrap_or_else(|| panic!("the module does not say where nodename is: {note}"));
    assert!(
        WINDOW <= nodename.0 && nodename.0 < nodename.1 && nodename.1 <= WINDOW + 0x1000,
        "the module's nodename is not in the window's first page: {note}"
    );
    let (_, _, err) = exterior_outcome(&rt, "hk", &["hostname", "pwned"]);
    assert!(
        err.contains(REFUSED_SETHOSTNAME),
        "the exterior sethostname was not refused with nodename on the view's tables: {err}"
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    let wrote = unbacked_write(&info).unwrap_or_else(|| {
        panic!("the refusal does not name an unbacked write (module: {note}): {info}")
    });
    assert!(
        (WINDOW..WINDOW + 0x1000).contains(&wrote) && (nodename.0..nodename.1).contains(&wrote),
        "the refused write at {wrote:#x} is not the nodename store into the window page \
         [{:#x}, {:#x}) (module: {note}): {info}",
        nodename.0,
        nodename.1
    );
    assert_eq!(
        gvm.run("cat /proc/sys/kernel/hostname").trim(),
        gvm_host,
        "the GVM's own hostname changed"
    );

    // 6c. Promise 10: the sentinel, the unbacked page whose store ends a call (the stub's
    // `mov %rax` after `syscall`): the page after the 4 MiB window. The same split puts
    // nodename at its end, so the exterior sethostname's memcpy of the new name stores
    // there. Believed, that store would end the call as "returned" — committing it with
    // the stored bytes for a result; it must be refused as a stray store into the
    // sentinel page (only the page's first word is the stub's), the GVM left unchanged.
    const SENTINEL: u64 = WINDOW + (4 << 20);
    switch(&mut gvm, "alias_uts_split", &format!("{SENTINEL:#x}"));
    let (_, _, err) = exterior_outcome(&rt, "hk", &["hostname", "pwned"]);
    assert!(
        err.contains(REFUSED_SETHOSTNAME),
        "the exterior sethostname was not refused with nodename on the sentinel: {err}"
    );
    let note = gvm.run("dmesg | grep 'alias_uts_split = ' | tail -n 1");
    let nodename = nodename_range(&note)
        .unwrap_or_else(|| panic!("the module does not say where nodename is: {note}"));
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    let (stored, page) = stray_store(&info)
        .unwrap_or_else(|| panic!("the refusal does not name a stray store: {info}"));
    assert!(
        page == "the sentinel page"
            && (SENTINEL..SENTINEL + 0x1000).contains(&stored)
            && (nodename.0..nodename.1).contains(&stored),
        "the refused store to {page} at {stored:#x} is not the nodename store into the \
         sentinel (module: {note}): {info}"
    );
    assert_eq!(
        gvm.run("cat /proc/sys/kernel/hostname").trim(),
        gvm_host,
        "the GVM's own hostname changed"
    );

    // 6d. Back on init_uts_ns: the engine and its view survived all three.
    switch(&mut gvm, "alias_uts_split", "0");
    assert_eq!(
        exterior(&rt, "hk", &["uname", "-n"]).trim(),
        gvm_host,
        "the exterior uname after the alias is gone"
    );
    assert_eq!(svm_hostname(&rt, "hk"), svm_host);
    assert_vmm_and_svm_answer(&rt, "hk");

    // 7. Hole 4: the IDT. Reading /proc/hostile_hook runs the module's code; from outside
    // that is a fetch from a no-execute page, which the trusted page-fault handler reports:
    // the call is refused naming the module (promise 1). The module now gives every GVM
    // CPU a private copy of its IDT and points the page-fault gate of idt_table, the table
    // the kernel's symbol names, at the breakpoint handler: the GVM keeps working, and a
    // view that took its IDT from GVM memory would hand that fault to the wrong handler.
    assert!(
        gvm.run("cat /proc/hostile_hook")
            .contains("hostile hook ran"),
        "the module's /proc/hostile_hook does not work in the GVM"
    );
    switch(&mut gvm, "hijack_idt", "1");
    let note = gvm.run("dmesg | grep 'hijack_idt = ' | tail -n 1");
    assert!(
        note.contains("#PF gate -> asm_exc_int3"),
        "the module did not hijack the gate: {note}"
    );
    assert!(
        gvm.run("cat /proc/hostile_hook")
            .contains("hostile hook ran"),
        "the GVM broke on its private IDT"
    );
    let (code, out, err) = exterior_outcome(&rt, "hk", &["cat", "/proc/hostile_hook"]);
    assert!(
        code != 0 && !out.contains("hostile hook ran"),
        "the exterior read of /proc/hostile_hook ran the module's code (exit {code}, \
         stdout {out:?}, stderr {err:?})"
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    assert!(
        info.contains("outside the trusted kernel image") && info.contains("(in module hostile)"),
        "the fault did not reach the trusted page-fault handler: {info}"
    );
    assert_eq!(
        exterior(&rt, "hk", &["uname", "-n"]).trim(),
        gvm_host,
        "the exterior uname under the hijacked IDT"
    );
    switch(&mut gvm, "hijack_idt", "0");
    assert_vmm_and_svm_answer(&rt, "hk");

    // 7b. Hole 4: trusted code that loads a descriptor table, reached through a function
    // pointer in GVM data. The module points the read function of /proc/hostile_gadget (an
    // ops table in its data) at idt_invalidate, which loads an empty IDT; the exterior
    // read runs it — trusted text, executable in the view — and returns to the stub on
    // that IDT. The store that ends the call comes from its site, but the lent CPU is off
    // the window's tables: the call must be refused naming the IDTR, and rolled back.
    // (Without the check, run by hand: the call was committed, and only the shim's
    // contract caught its garbage count, -2130507472: EIO with no word from the VMM.)
    switch(&mut gvm, "gadget_lidt", "1");
    let (code, out, err) = exterior_outcome(&rt, "hk", &["cat", "/proc/hostile_gadget"]);
    assert!(
        code != 0 && err.contains("exterior: the redirect failed in the VMM (read)"),
        "the exterior read through the gadget was not refused (exit {code}, stdout {out:?}, \
         stderr {err:?})"
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    assert!(
        info.contains("switched the lent CPU's IDTR off the VMM's descriptor tables")
            && info.contains("rolled back"),
        "the refusal does not name the switched IDTR: {info}"
    );
    switch(&mut gvm, "gadget_lidt", "0");
    assert_eq!(
        exterior(&rt, "hk", &["uname", "-n"]).trim(),
        gvm_host,
        "the exterior uname after the gadget"
    );
    assert_vmm_and_svm_answer(&rt, "hk");

    // 7c. Module code runs only as the kernel package shipped it (#13 item 6). The GVM's
    // dummy module, loaded from the package, runs for the operator: its statistics
    // function, behind sysfs, is trusted. Once the rootkit changes one byte of that
    // module's text — padding its code never runs, so the GVM notices nothing — the
    // module is refused, naming the byte; with the byte back, it is trusted again.
    gvm.run("modprobe dummy");
    let tx = ["cat", "/sys/class/net/dummy0/statistics/tx_packets"];
    let count = gvm.run(&tx.join(" ")).trim().to_string();
    assert_eq!(
        exterior(&rt, "hk", &tx).trim(),
        count,
        "dummy0's count, from outside"
    );
    switch(&mut gvm, "alter_dummy", "1");
    let (code, out, err) = exterior_outcome(&rt, "hk", &tx);
    assert!(
        code != 0 && out.is_empty(),
        "the altered dummy module ran for the operator (exit {code}, stdout {out:?}, \
         stderr {err:?})"
    );
    let why = last_error(&rt, "hk");
    assert!(
        why.contains("(in module dummy)")
            && why.contains(
                "module dummy is not trusted: its text differs from the SVM's copy at offset 0xfff"
            ),
        "{why}"
    );
    assert_eq!(gvm.run(&tx.join(" ")).trim(), count, "the GVM's own read");
    switch(&mut gvm, "alter_dummy", "0");
    assert_eq!(
        exterior(&rt, "hk", &tx).trim(),
        count,
        "dummy0's count, trusted again"
    );

    // 8. Hole 5: a call that spins. The module takes the siglock of a sleeping process
    // and keeps it (the lock word only; the process sleeps on, unsignalled); the exterior
    // `kill -CONT` of it spins in lock_task_sighand with interrupts off — or, with KVM's
    // paravirt spinlocks, halts to wait for a kick that never comes. Either way the run
    // must be cut and rolled back, not hang the SVM or the engine: after the release the
    // same exterior kill works.
    let victim = gvm
        .run("sleep 3600 >/dev/null 2>&1 & echo $!")
        .trim()
        .to_string();
    assert!(victim.parse::<u32>().is_ok(), "no victim pid: {victim:?}");
    switch(&mut gvm, "lock_siglock", &victim);
    let (code, out, err) = exterior_outcome(&rt, "hk", &["kill", "-CONT", &victim]);
    assert!(
        code != 0 && err.contains("exterior: the redirect failed in the VMM (kill)"),
        "the exterior kill on a held siglock was not refused (exit {code}, stdout {out:?}, \
         stderr {err:?})"
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    assert!(
        (info.contains("the call halted the lent CPU")
            || info.contains("the call did not return within 5s"))
            && info.contains("rolled back"),
        "the spinning call was not cut and rolled back: {info}"
    );
    switch(&mut gvm, "lock_siglock", "0");
    assert!(
        gvm.run(&format!("kill -0 {victim} && echo alive=$((6*7))"))
            .contains("alive=42"),
        "the victim died while its siglock was held"
    );
    let (code, _, err) = exterior_outcome(&rt, "hk", &["kill", "-TERM", &victim]);
    assert_eq!(code, 0, "the exterior kill after the release: {err}");
    assert_vmm_and_svm_answer(&rt, "hk");

    // 8b. Hole 5: a GVM that never lets itself be held. 5 s after the switch, a module
    // thread spins for 16 s with preemption off: the GVM's only CPU stays in its kernel,
    // never at a point where the VMM may hold it (halted or in user mode). A loop of
    // exterior unames runs across it: the calls whose quiesce falls in the spin's first
    // 6 s must end "busy" when the quiesce gives up (10 s), the SVM must answer
    // meanwhile, and the calls after the spin must work again.
    switch(&mut gvm, "spin_kernel", "16");
    let across = vmm_in(&rt)
        .args(["exec", "hk", "--", "sh", "-c"])
        .arg("for i in $(seq 25); do uname -n || echo busy-$i; sleep 0.5; done")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn exterior-vmm exec");
    std::thread::sleep(Duration::from_secs(12));
    let (code, out, err) = run(vmm_in(&rt).args(["exec", "hk", "--local", "--", "echo", "svm-ok"]));
    assert_eq!(
        (code, out.trim()),
        (0, "svm-ok"),
        "the SVM while the GVM will not be held: {err}"
    );
    let done = across.wait_with_output().expect("the uname loop");
    let (out, err) = (
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
    );
    let info = run(vmm_in(&rt).args(["info", "hk"])).1;
    assert!(
        out.lines().any(|l| l.starts_with("busy-"))
            && err.contains("exterior: the guest is busy (uname)")
            && info.contains("guest busy:")
            && info.contains("(it never reached an idle or user-mode point)"),
        "no exterior uname was refused as busy while the GVM spun in its kernel \
         (stdout {out:?}, stderr {err:?}): {info}"
    );
    assert_eq!(
        out.lines().last(),
        Some(gvm_host.as_str()),
        "the exterior uname did not work again after the spin: {out:?}"
    );
    assert_vmm_and_svm_answer(&rt, "hk");

    // 9. Hole 5: a call that sleeps in the GVM for as long as the GVM likes. The module's
    // kernel thread takes uts_sem for writing and keeps it, so the exterior uname sleeps
    // on it: parked, resumed, parked again until its budget is spent, then left parked
    // (the engine stops: this step comes last). Meanwhile the SVM must keep running —
    // the redirect port answers "pending" and the shim polls, so the SVM's vCPU is never
    // held for the call — and so must the control socket: a local command in the SVM
    // completes while the exterior uname is still waiting, and the SVM's kernel logs no
    // RCU stall. (With the port synchronous, the SVM froze for the whole call.)
    switch(&mut gvm, "hold_uts_sem", "1");
    let mut stuck = exterior_child(&rt, "hk", &["uname", "-n"]);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        stuck.try_wait().expect("try_wait").is_none(),
        "the exterior uname ended while uts_sem was held"
    );
    let (code, out, err) = run(vmm_in(&rt).args(["exec", "hk", "--local", "--", "echo", "svm-ok"]));
    assert_eq!(
        (code, out.trim()),
        (0, "svm-ok"),
        "the SVM while a call waits: {err}"
    );
    let (code, out, err) = run(vmm_in(&rt).args(["info", "hk"]));
    assert_eq!(code, 0, "info while a call waits: {err}");
    assert!(out.contains("redirect_calls="), "{out}");
    assert!(
        stuck.try_wait().expect("try_wait").is_none(),
        "the exterior uname ended before the SVM was shown to answer"
    );
    // The call's bound is its 15 s deadline plus one segment past it (a quiesce of up to
    // 10 s and a run of up to 5 s); the rest is margin for the nested harness.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = stuck.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the exterior uname never ended: the call is not bounded"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        !status.success(),
        "the exterior uname succeeded while uts_sem was held"
    );
    let (code, _, _) = run(vmm_in(&rt).args(["info", "hk"]));
    assert_eq!(code, 0);
    let (code, dmesg, err) = run(vmm_in(&rt).args(["exec", "hk", "--local", "--", "dmesg"]));
    assert_eq!(code, 0, "dmesg in the SVM failed: {err}");
    assert!(
        !dmesg.trim().is_empty(),
        "dmesg in the SVM printed nothing: {err}"
    );
    let stalls: Vec<&str> = dmesg
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("rcu") && l.contains("stall")
        })
        .collect();
    assert!(
        stalls.is_empty(),
        "the SVM's kernel logged an RCU stall:\n{}",
        stalls.join("\n")
    );
    switch(&mut gvm, "hold_uts_sem", "0");
    assert_eq!(
        gvm_uname(&mut gvm),
        gvm_host,
        "the GVM's own uname after the release"
    );
    let (_, info, _) = run(vmm_in(&rt).args(["info", "hk"]));
    assert!(
        info.contains("stays parked") && info.contains("took more than 15s"),
        "the engine does not say why it stopped, or not after --call-deadline 15: {info}"
    );
    assert_vmm_and_svm_answer(&rt, "hk");
}
