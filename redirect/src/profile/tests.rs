//! Tests of the kernel profile on a crafted vmlinux (ELF with .text, .rodata and .BTF) and
//! crafted kallsyms text.

use super::btf::builder::BtfBuilder;
use super::elf::tests::build_elf;
use super::*;

const TEXT: u64 = 0xffff_ffff_8100_0000;
const RODATA: u64 = 0xffff_ffff_8200_0000;

/// Options for the crafted kernel.
#[derive(Clone, Copy)]
struct Fake {
    /// Omit this task_struct member.
    drop_member: Option<&'static str>,
    /// Use 6.2+ names: per-cpu `pcpu_hot` instead of current_task/cpu_current_top_of_stack.
    pcpu_hot: bool,
    /// Per-cpu offset of current_task in BTF.
    btf_current_task: u32,
    /// Whether BTF lists cpu_current_top_of_stack.
    btf_top_of_stack: bool,
    /// Whether the kernel has a stack protector (`fixed_percpu_data.stack_canary`).
    stack_protector: bool,
}

const FAKE: Fake = Fake {
    drop_member: None,
    pcpu_hot: false,
    btf_current_task: 0x2_1ac0,
    btf_top_of_stack: true,
    stack_protector: true,
};

fn fake_btf(f: Fake) -> Vec<u8> {
    let mut b = BtfBuilder::new();
    let ulong = b.int("long unsigned int", 8);
    let uint = b.int("unsigned int", 4);
    let int = b.int("int", 4);
    let chr = b.int("char", 1);
    let pid_t = b.typedef("pid_t", int);
    let ti = b.composite(
        "thread_info",
        false,
        24,
        &[
            ("flags", ulong, 0),
            ("syscall_work", ulong, 64),
            ("status", uint, 128),
        ],
    );
    let thread = b.composite(
        "thread_struct",
        false,
        64,
        &[
            ("tls_array", ulong, 0),
            ("sp", ulong, 192),
            ("fsbase", ulong, 256),
        ],
    );
    let kuid = b.composite("", false, 4, &[("val", uint, 0)]);
    let kuid_t = b.typedef("kuid_t", kuid);
    b.composite(
        "cred",
        false,
        176,
        &[
            ("usage", int, 0),
            ("uid", kuid_t, 32),
            ("gid", kuid_t, 64),
            ("suid", kuid_t, 96),
            ("sgid", kuid_t, 128),
            ("euid", kuid_t, 160),
        ],
    );
    let void_ptr = b.ptr(0);
    let comm = b.array(chr, int, 16);
    let state_union = b.composite("", true, 4, &[("__state", uint, 0)]);
    let anon_ptrs = b.composite(
        "",
        false,
        16,
        &[("stack", void_ptr, 0), ("usage", uint, 64)],
    );
    let members: Vec<(&str, u32, u32)> = [
        ("thread_info", ti, 0),
        ("", state_union, 192),
        ("", anon_ptrs, 256),
        ("flags", uint, 384),
        ("mm", void_ptr, 448),
        ("active_mm", void_ptr, 512),
        ("pid", pid_t, 576),
        ("tgid", pid_t, 608),
        ("real_cred", void_ptr, 640),
        ("cred", void_ptr, 704),
        ("comm", comm, 768),
        ("fs", void_ptr, 896),
        ("files", void_ptr, 960),
        ("nsproxy", void_ptr, 1024),
        ("rseq", void_ptr, 1088),
        ("thread", thread, 1152),
    ]
    .into_iter()
    .filter(|(n, _, _)| Some(*n) != f.drop_member)
    .collect();
    b.composite("task_struct", false, 208, &members);
    let mut vars = Vec::new();
    if f.pcpu_hot {
        let hot = b.composite(
            "pcpu_hot",
            false,
            64,
            &[
                ("current_task", void_ptr, 0),
                ("preempt_count", int, 64),
                ("top_of_stack", ulong, 128),
            ],
        );
        vars.push((b.var("pcpu_hot", hot), 0x3_2000, 64));
    } else {
        vars.push((b.var("current_task", void_ptr), f.btf_current_task, 8));
        vars.push((b.var("__preempt_count", int), 0x2_1ac8, 4));
        if f.btf_top_of_stack {
            vars.push((b.var("cpu_current_top_of_stack", ulong), 0x6004, 8));
        }
    }
    vars.push((b.var("fpu_fpregs_owner_ctx", void_ptr), 0x2_1ad0, 8));
    if f.stack_protector {
        let gs_base = b.array(chr, int, 40);
        let fixed = b.composite(
            "fixed_percpu_data",
            false,
            48,
            &[("gs_base", gs_base, 0), ("stack_canary", ulong, 320)],
        );
        vars.push((b.var("fixed_percpu_data", fixed), 0, 48));
    }
    let gdt = b.array(ulong, int, 512);
    vars.push((b.var("gdt_page", gdt), 0xb000, 4096));
    b.datasec(".data..percpu", &vars);
    b.build()
}

fn fake_vmlinux(f: Fake) -> Vec<u8> {
    let btf = fake_btf(f);
    let mut rodata = vec![0u8; 64];
    rodata.extend_from_slice(b"Linux version %s\0Linux version \0");
    rodata.extend_from_slice(
        b"Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\n\0",
    );
    build_elf(&[
        (".text", 1, TEXT, b"\xcc\xcc\xcc\xcc"),
        (".rodata", 1, RODATA, &rodata),
        (".BTF", 1, RODATA + 0x1000, &btf),
    ])
}

const KALLSYMS: &str = "\
0000000000000000 A fixed_percpu_data
0000000000000000 A __per_cpu_start
0000000000006000 A cpu_tss_rw
0000000000006004 A cpu_current_top_of_stack
000000000000b000 A gdt_page
0000000000021ac0 A current_task
0000000000034000 A __per_cpu_end
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81200000 T __get_free_pages
ffffffff81a00000 T entry_SYSCALL_64
ffffffff81e01ef2 T _etext
ffffffff82000000 D __start_rodata
ffffffff82400000 D __end_rodata
ffffffff82a00000 D init_task
ffffffff82a10000 D __per_cpu_offset
ffffffff83000000 b idt_table
ffffffff83400000 D init_top_pgt
ffffffffc0000000 t evil_hook\t[rootkit]
";

#[test]
fn builds_a_profile_from_crafted_kernel() {
    let p = KernelProfile::new(&fake_vmlinux(FAKE), KALLSYMS).unwrap();
    assert_eq!(p.release, "6.1.0-50-cloud-amd64");
    let t = p.layouts.task;
    assert_eq!(t.size, 208);
    assert_eq!(t.thread_info_flags, 0);
    assert_eq!(t.stack, 32);
    assert_eq!((t.flags, t.mm, t.active_mm), (48, 56, 64));
    assert_eq!((t.pid, t.tgid), (72, 76));
    assert_eq!((t.real_cred, t.cred), (80, 88));
    assert_eq!((t.comm, t.comm_len), (96, 16));
    assert_eq!((t.fs, t.files, t.nsproxy, t.rseq), (112, 120, 128, 136));
    assert_eq!((t.thread_sp, t.thread_fsbase), (144 + 24, 144 + 32));
    assert_eq!(
        p.layouts.cred,
        CredLayout {
            size: 176,
            uid: 4,
            euid: 20
        }
    );
    let s = p.symbols;
    assert_eq!(s.init_task, 0xffff_ffff_82a0_0000);
    assert_eq!(s.init_top_pgt, 0xffff_ffff_8340_0000);
    assert_eq!(s.per_cpu_offset, 0xffff_ffff_82a1_0000);
    assert_eq!(s.idt_table, 0xffff_ffff_8300_0000);
    assert_eq!(s.entry_syscall_64, 0xffff_ffff_81a0_0000);
    assert_eq!((s.stext, s.etext), (TEXT, 0xffff_ffff_81e0_1ef2));
    assert_eq!(
        (s.start_rodata, s.end_rodata),
        (RODATA, 0xffff_ffff_8240_0000)
    );
    assert_eq!(s.current_task, 0x2_1ac0);
    assert_eq!(s.cpu_current_top_of_stack, 0x6004);
    assert_eq!(s.gdt_page, 0xb000);
    assert_eq!((s.preempt_count, s.fpregs_owner), (0x2_1ac8, 0x2_1ad0));
    // fixed_percpu_data sits at the start of the per-cpu area; the canary at byte 40.
    assert_eq!(s.stack_canary, Some(40));
    assert_eq!(s.get_free_pages, 0xffff_ffff_8120_0000);
    assert_eq!(s.cpu_tss_rw, 0x6000);
    assert_eq!(p.offset_of("task_struct", "__state"), Some(24));
    assert_eq!(
        p.kallsyms
            .symbolize(0xffff_ffff_c000_0010)
            .unwrap()
            .to_string(),
        "evil_hook+0x10 [rootkit]"
    );
}

#[test]
fn missing_member_is_named() {
    for member in ["pid", "rseq", "thread", "thread_info", "nsproxy", "comm"] {
        let f = Fake {
            drop_member: Some(member),
            ..FAKE
        };
        let err = KernelProfile::new(&fake_vmlinux(f), KALLSYMS).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("task_struct"), "{member}: {text}");
        assert!(text.contains(member), "{member}: {text}");
    }
}

#[test]
fn missing_symbols_are_named() {
    for name in [
        "init_task",
        "init_top_pgt",
        "__per_cpu_offset",
        "entry_SYSCALL_64",
        "idt_table",
        "_etext",
    ] {
        let text: String = KALLSYMS
            .lines()
            .filter(|l| !l.ends_with(&format!(" {name}")))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap_err();
        assert_eq!(
            err,
            ProfileError::MissingSymbol(match name {
                "init_task" => "init_task",
                "init_top_pgt" => "init_top_pgt",
                "__per_cpu_offset" => "__per_cpu_offset",
                "entry_SYSCALL_64" => "entry_SYSCALL_64",
                "idt_table" => "idt_table",
                _ => "_etext",
            })
        );
    }
}

#[test]
fn percpu_from_btf_alone_and_cross_checked() {
    // BTF alone gives per-cpu offsets kallsyms lacks.
    let text = KALLSYMS.replace("0000000000021ac0 A current_task\n", "");
    let p = KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap();
    assert_eq!(p.symbols.current_task, 0x2_1ac0);
    // cpu_tss_rw is in kallsyms only: without it, a clear error.
    let text = KALLSYMS.replace("0000000000006000 A cpu_tss_rw\n", "");
    let err = KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap_err();
    assert_eq!(
        err,
        ProfileError::MissingPerCpu {
            name: "cpu_tss_rw",
            hint: ""
        }
    );
    // Disagreement between kallsyms and BTF.
    let f = Fake {
        btf_current_task: 0x2_1ac8,
        ..FAKE
    };
    let err = KernelProfile::new(&fake_vmlinux(f), KALLSYMS).unwrap_err();
    assert!(matches!(
        err,
        ProfileError::PerCpuMismatch {
            name: "current_task",
            kallsyms: 0x2_1ac0,
            btf: 0x2_1ac8
        }
    ));
    // A per-cpu name listed with a real address.
    let text = KALLSYMS.replace("000000000000b000 A gdt_page", "ffffffff82b00000 D gdt_page");
    let err = KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap_err();
    assert_eq!(err, ProfileError::NotPerCpu("gdt_page"));
}

#[test]
fn a_kernel_without_stack_protector_has_no_canary_and_the_fpu_owner_is_required() {
    let f = Fake {
        stack_protector: false,
        ..FAKE
    };
    let p = KernelProfile::new(&fake_vmlinux(f), KALLSYMS).unwrap();
    assert_eq!(p.symbols.stack_canary, None);
    // A per-cpu offset that kallsyms and BTF disagree on is two kernels, not one.
    let text = format!("{KALLSYMS}0000000000021ad8 A fpu_fpregs_owner_ctx\n");
    assert_eq!(
        KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap_err(),
        ProfileError::PerCpuMismatch {
            name: "fpu_fpregs_owner_ctx",
            kallsyms: 0x2_1ad8,
            btf: 0x2_1ad0
        }
    );
    let text = KALLSYMS.replace("ffffffff81200000 T __get_free_pages\n", "");
    assert_eq!(
        KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap_err(),
        ProfileError::MissingSymbol("__get_free_pages")
    );
}

#[test]
fn pcpu_hot_fallback_and_clear_error_when_absent() {
    let f = Fake {
        pcpu_hot: true,
        ..FAKE
    };
    let text = KALLSYMS
        .replace("0000000000006004 A cpu_current_top_of_stack\n", "")
        .replace("0000000000021ac0 A current_task\n", "");
    let p = KernelProfile::new(&fake_vmlinux(f), &text).unwrap();
    assert_eq!(p.symbols.current_task, 0x3_2000);
    assert_eq!(p.symbols.cpu_current_top_of_stack, 0x3_2010);
    assert_eq!(p.symbols.preempt_count, 0x3_2008);
    // Neither the 6.1 name (in kallsyms or BTF) nor pcpu_hot.
    let text = KALLSYMS.replace("0000000000006004 A cpu_current_top_of_stack\n", "");
    let f = Fake {
        btf_top_of_stack: false,
        ..FAKE
    };
    let err = KernelProfile::new(&fake_vmlinux(f), &text).unwrap_err();
    assert_eq!(
        err,
        ProfileError::MissingPerCpu {
            name: "cpu_current_top_of_stack",
            hint: " (nor pcpu_hot, where kernels from 6.2 keep it)"
        }
    );
    assert!(err.to_string().contains("pcpu_hot"));
}

#[test]
fn kaslr_or_foreign_kallsyms_is_detected() {
    let slid = KALLSYMS.replace("ffffffff81000000 T _stext", "ffffffff9a000000 T _stext");
    let err = KernelProfile::new(&fake_vmlinux(FAKE), &slid).unwrap_err();
    assert!(
        matches!(
            err,
            ProfileError::ImageMismatch {
                symbol: "_stext",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("nokaslr"));
    let moved = KALLSYMS.replace(
        "ffffffff82000000 D __start_rodata",
        "ffffffff81f00000 D __start_rodata",
    );
    let err = KernelProfile::new(&fake_vmlinux(FAKE), &moved).unwrap_err();
    assert!(
        matches!(
            err,
            ProfileError::ImageMismatch {
                symbol: "__start_rodata",
                ..
            }
        ),
        "{err}"
    );
    let disordered = KALLSYMS.replace("ffffffff81e01ef2 T _etext", "ffffffff80000000 T _etext");
    assert!(matches!(
        KernelProfile::new(&fake_vmlinux(FAKE), &disordered),
        Err(ProfileError::BadSymbols(_))
    ));
}

#[test]
fn bad_images_are_errors() {
    assert!(matches!(
        KernelProfile::new(b"not an elf", KALLSYMS),
        Err(ProfileError::Elf(_))
    ));
    let no_btf = build_elf(&[
        (".text", 1, TEXT, b"x"),
        (".rodata", 1, RODATA, b"Linux version 6.1 (x)"),
    ]);
    assert_eq!(
        KernelProfile::new(&no_btf, KALLSYMS).unwrap_err(),
        ProfileError::Elf(ElfError::NoSuchSection(".BTF".into()))
    );
    let btf = fake_btf(FAKE);
    let no_banner = build_elf(&[
        (".text", 1, TEXT, b"x"),
        (".rodata", 1, RODATA, b"Linux version %s\0"),
        (".BTF", 1, 0, &btf),
    ]);
    assert_eq!(
        KernelProfile::new(&no_banner, KALLSYMS).unwrap_err(),
        ProfileError::NoRelease
    );
    let bad_btf = build_elf(&[
        (".text", 1, TEXT, b"x"),
        (".rodata", 1, RODATA, b"x"),
        (".BTF", 1, 0, b"\xeb\x9f\x01\x00"),
    ]);
    assert_eq!(
        KernelProfile::new(&bad_btf, KALLSYMS).unwrap_err(),
        ProfileError::Btf(BtfError::BigEndian)
    );
    assert!(matches!(
        KernelProfile::new(&fake_vmlinux(FAKE), "junk\n"),
        Err(ProfileError::Kallsyms(_))
    ));
}

#[test]
fn release_banner_search() {
    assert_eq!(release_from_rodata(b""), None);
    assert_eq!(release_from_rodata(b"Linux version "), None);
    assert_eq!(
        release_from_rodata(b"LLinux version 6.1.0-x (a)"),
        Some("6.1.0-x".into())
    );
    assert_eq!(release_from_rodata(b"Linux version 6.1.0-x"), None);
    let long = format!("Linux version 6{} (x)", "1".repeat(80));
    assert_eq!(release_from_rodata(long.as_bytes()), None);
}

#[test]
fn a_slid_profile_moves_image_addresses_and_nothing_else() {
    // Past _end but in the kernel map (.init.scratch) moves; above the map (the fixmap,
    // the vsyscall page) does not.
    // The map's last byte moves, its end does not; a module symbol never does.
    let text = format!(
        "{KALLSYMS}ffffffff83800000 B _end\nffffffff83a00000 T __init_scratch_begin\n\
         ffffffffff600000 T fixed_page\nffffffffbfffffff T map_last\n\
         ffffffffc0000000 T map_end\nffffffff83b00000 t inside_hook\t[rootkit]\n"
    );
    let p = KernelProfile::new(&fake_vmlinux(FAKE), &text).unwrap();
    let slide = 0x2020_0000;
    let s = p.slid(slide).unwrap();
    let (a, b) = (p.symbols, s.symbols);
    for (before, after) in [
        (a.stext, b.stext),
        (a.etext, b.etext),
        (a.entry_syscall_64, b.entry_syscall_64),
        (a.init_task, b.init_task),
        (a.init_top_pgt, b.init_top_pgt),
        (a.per_cpu_offset, b.per_cpu_offset),
        (a.idt_table, b.idt_table),
        (a.get_free_pages, b.get_free_pages),
        (a.start_rodata, b.start_rodata),
    ] {
        assert_eq!(after, before + slide);
    }
    assert_eq!(b.entry_syscall_64, 0xffff_ffff_a1c0_0000);
    // Per-cpu offsets, module symbols and values outside the image stay.
    assert_eq!(
        (b.current_task, b.gdt_page, b.cpu_tss_rw),
        (a.current_task, a.gdt_page, a.cpu_tss_rw)
    );
    assert_eq!(b.current_task, 0x21ac0);
    assert_eq!(
        s.kallsyms.get("evil_hook").unwrap().addr,
        0xffff_ffff_c000_0000
    );
    assert_eq!(
        s.kallsyms.get("fixed_page").unwrap().addr,
        0xffff_ffff_ff60_0000
    );
    let scratch = s.kallsyms.get("__init_scratch_begin").unwrap().addr;
    assert_eq!(scratch, 0xffff_ffff_83a0_0000 + slide);
    let addr = |name| s.kallsyms.get(name).unwrap().addr;
    assert_eq!(addr("map_last"), 0xffff_ffff_bfff_ffff + slide);
    assert_eq!(addr("map_end"), 0xffff_ffff_c000_0000);
    assert_eq!(addr("inside_hook"), 0xffff_ffff_83b0_0000);
    // Lookups by address answer in moved terms.
    let at = s.kallsyms.symbolize(0xffff_ffff_8120_0010 + slide).unwrap();
    assert_eq!(at.to_string(), "__get_free_pages+0x10");
    assert_eq!(s.layouts.task, p.layouts.task);
    // Slides no kernel can have: unaligned, 1 GiB or more (the largest aligned one below
    // 1 GiB is accepted), or one that would wrap.
    for bad in [
        0x1000,
        0x2020_0001,
        0x4000_0000,
        u64::MAX - 0x1000,
        !0x1f_ffff,
    ] {
        assert_eq!(p.slid(bad).unwrap_err(), ProfileError::BadSlide(bad));
    }
    assert!(p.slid(0x3fe0_0000).is_ok());
    assert_eq!(p.slid(0).unwrap().symbols, p.symbols);
}
