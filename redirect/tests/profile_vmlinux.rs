//! The kernel profile against the real pinned kernel image, `images/vmlinux`.
//!
//! tools/setup builds the image (tools/test runs it first). When the file is missing this
//! test fails, telling how to get it: it must never pass by not running.

use std::path::PathBuf;
use std::time::Instant;

use redirect::profile::{find_section, release_from_rodata, Btf, Elf, Kind, Layouts};

fn vmlinux_path() -> PathBuf {
    match std::env::var_os("EXTERIOR_REPO") {
        Some(repo) => PathBuf::from(repo).join("images/vmlinux"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/vmlinux"),
    }
}

fn vmlinux() -> Vec<u8> {
    let path = vmlinux_path();
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the pinned kernel image {}: {e}\n\
             run tools/setup (it builds images/vmlinux; tools/test runs it first)",
            path.display()
        )
    })
}

#[test]
fn pinned_vmlinux_btf_layouts_and_percpu_vars() {
    let image = vmlinux();
    let elf = Elf::parse(&image).expect("vmlinux is an ELF64 LE image");
    let btf_bytes = find_section(&image, ".BTF").expect("vmlinux has a .BTF section");
    assert!(
        btf_bytes.len() > 1 << 20,
        "BTF is only {} bytes",
        btf_bytes.len()
    );

    let start = Instant::now();
    let btf = Btf::parse(btf_bytes).expect("vmlinux BTF parses");
    // Reported, not asserted: speed is measured by benchmarks, not tests.
    let parse_time = start.elapsed();
    eprintln!(
        "BTF: {} bytes, {} types, parsed in {parse_time:?}",
        btf_bytes.len(),
        btf.len()
    );

    let release = release_from_rodata(elf.section_data(".rodata").unwrap()).expect("banner");
    let pinned = std::fs::read_to_string(vmlinux_path().with_file_name("kernel.release"))
        .expect("images/kernel.release (run tools/setup)");
    assert_eq!(release, pinned.trim());

    let task = btf
        .struct_by_name("task_struct")
        .expect("struct task_struct");
    assert!(
        (4096..=16384).contains(&task.size),
        "task_struct is {} bytes",
        task.size
    );
    assert_eq!(task.members[0].name, "thread_info");
    assert_eq!(btf.member_offset("task_struct", "thread_info"), Some(0));
    assert_eq!(
        btf.member_offset("task_struct", "thread_info.flags"),
        Some(0)
    );
    let pid = btf.member("task_struct", "pid").expect("task_struct.pid");
    assert_eq!(btf.type_size(pid.type_id), Some(4));
    let comm = btf.member("task_struct", "comm").expect("task_struct.comm");
    assert_eq!(btf.type_size(comm.type_id), Some(16));
    let (elem, n) = btf.array_info(comm.type_id).expect("comm is an array");
    assert_eq!(n, 16);
    assert_eq!(
        btf.get(btf.resolve(elem).unwrap()).unwrap().name,
        Some("char")
    );
    // Members of nested anonymous structs/unions.
    for anon in ["__state", "cpus_ptr"] {
        assert!(
            btf.member_offset("task_struct", anon).is_some(),
            "task_struct.{anon}"
        );
    }

    // Every member of task_struct's anonymous structs/unions is found through them, at the
    // anonymous member's offset plus its own.
    let mut through_anon = 0;
    for anon in task.members.iter().filter(|m| m.name.is_empty()) {
        let inner = btf
            .struct_info(btf.resolve(anon.type_id).unwrap())
            .expect("anonymous member is a struct or union");
        for m in inner.members.iter().filter(|m| !m.name.is_empty()) {
            let loc = btf.member("task_struct", &m.name).expect(&m.name);
            assert_eq!(loc.bit_offset, anon.bit_offset + m.bit_offset, "{}", m.name);
            through_anon += 1;
        }
    }
    assert!(through_anon > 0, "6.1 task_struct has anonymous unions");

    let layouts = Layouts::from_btf(&btf).expect("all named offsets");
    eprintln!("{layouts:#x?}");
    let t = layouts.task;
    assert_eq!(t.comm_len, 16);
    assert!(t.thread_sp < t.size && t.thread_fsbase == t.thread_sp + 16);
    assert_eq!(layouts.cred.euid, layouts.cred.uid + 16);

    // Per-cpu variables the engine needs, straight from BTF's .data..percpu section.
    let percpu = btf
        .datasec_vars(".data..percpu")
        .expect(".data..percpu DATASEC");
    assert!(percpu.len() > 50, "{} per-cpu vars", percpu.len());
    for name in [
        "current_task",
        "cpu_current_top_of_stack",
        "gdt_page",
        "cpu_tss_rw",
    ] {
        let v = btf
            .percpu_var(name)
            .unwrap_or_else(|| panic!("per-cpu {name}"));
        eprintln!("per-cpu {name}: offset {:#x} size {:#x}", v.offset, v.size);
        assert!(v.offset < elf.section(".data..percpu").unwrap().size);
    }
    assert_eq!(btf.percpu_var("gdt_page").unwrap().size, 4096);
    assert!(btf.percpu_var("pcpu_hot").is_none(), "6.1 has no pcpu_hot");
    // Global variables are not in kernel BTF (only per-cpu ones are).
    assert!(btf.find(Kind::Var, "init_task").is_none());
}

#[test]
fn pinned_vmlinux_relocation_table() {
    use redirect::kaslr::Relocs;
    let image = vmlinux();
    let relocs = Relocs::parse(&image).unwrap();
    // Counted on the pinned image by an independent reader (a Python walk of the format in
    // arch/x86/boot/compressed/misc.c), not by this code.
    assert_eq!(
        (
            relocs.abs32.len(),
            relocs.inverse32.len(),
            relocs.abs64.len()
        ),
        (70515, 8438, 123579)
    );
    // `_end` as the pinned kernel's /proc/kallsyms lists it (`ffffffff83830000 B _end`,
    // read on a boot of it), not as this code computes it: .bss and .brk included,
    // .init.scratch (loaded past it, at 0xffffffff83a00000) not.
    assert_eq!(relocs.image_end, 0xffff_ffff_8383_0000);
    let elf = Elf::parse(&image).unwrap();
    let text = elf.section(".text").unwrap();
    let in_text = |a: &&u64| (text.addr..text.addr + text.size).contains(*a);
    assert_eq!(relocs.abs32.iter().filter(in_text).count(), 60897);
    assert_eq!(relocs.inverse32.iter().filter(in_text).count(), 8293);
    assert_eq!(relocs.abs64.iter().filter(in_text).count(), 23);
    // Moving a copy of .text gives what an independent implementation (the same Python
    // reader, applying misc.c's arithmetic) made of it: its SHA-256 for slide 0x2e000000.
    // (Measured the same way on two live boots, with and without KASLR: the moved live
    // text of one was the other's byte for byte; docs/ARCHITECTURE.md, "KASLR".)
    let original = elf.data(text).unwrap();
    let digest = |b: &[u8]| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b);
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(
        digest(original),
        "61537b3d9af9e904e789860752664f8bf90d298214ab6f17ae73ccc2700487a5"
    );
    let mut moved = original.to_vec();
    let changed = relocs.apply(&mut moved, text.addr, 0x2e00_0000).unwrap();
    assert_eq!(changed, 60897 + 8293 + 23);
    assert_eq!(
        digest(&moved),
        "f5274867d15c5a41308f224b80b7062ed4d5f71e1a15dcbb0968449629595978"
    );
}
