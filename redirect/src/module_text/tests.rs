use super::*;

/// A section of a synthetic `.ko`: name, type, flags, alignment, link, info, data.
struct Sec {
    name: &'static str,
    ty: u32,
    flags: u64,
    align: u64,
    link: u32,
    info: u32,
    data: Vec<u8>,
}

fn progbits(name: &'static str, flags: u64, align: u64, data: Vec<u8>) -> Sec {
    Sec {
        name,
        ty: 1,
        flags,
        align,
        link: 0,
        info: 0,
        data,
    }
}

/// Relocations into section `info`, symbols in section `link` (the symbol table's index).
fn rela(name: &'static str, link: u32, info: u32, entries: &[(u64, u32, u32, i64)]) -> Sec {
    let mut data = Vec::new();
    for &(offset, sym, r_type, addend) in entries {
        data.extend_from_slice(&offset.to_le_bytes());
        data.extend_from_slice(&((u64::from(sym) << 32) | u64::from(r_type)).to_le_bytes());
        data.extend_from_slice(&addend.to_le_bytes());
    }
    Sec {
        name,
        ty: SHT_RELA,
        flags: 0x40,
        align: 8,
        link,
        info,
        data,
    }
}

/// A symbol table of (section index, value) entries; entry 0 is the null symbol.
fn symtab(symbols: &[(u16, u64)]) -> Sec {
    let mut data = vec![0u8; SYM_SIZE];
    for &(shndx, value) in symbols {
        let mut s = [0u8; SYM_SIZE];
        s[6..8].copy_from_slice(&shndx.to_le_bytes());
        s[8..16].copy_from_slice(&value.to_le_bytes());
        data.extend_from_slice(&s);
    }
    Sec {
        name: ".symtab",
        ty: SHT_SYMTAB,
        flags: 0,
        align: 8,
        link: 0,
        info: 0,
        data,
    }
}

/// An ELF64 relocatable file with `secs` at indices 1.., then the section name table.
fn build(secs: &[Sec]) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2;
    out[5] = 1;
    out[6] = 1;
    let mut names = vec![0u8];
    let mut headers = vec![[0u8; 64]];
    let mut header = |name: usize, ty: u32, flags: u64, off: usize, s: &Sec, size: usize| {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&(name as u32).to_le_bytes());
        h[4..8].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&flags.to_le_bytes());
        h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
        h[40..44].copy_from_slice(&s.link.to_le_bytes());
        h[44..48].copy_from_slice(&s.info.to_le_bytes());
        h[48..56].copy_from_slice(&s.align.to_le_bytes());
        headers.push(h);
    };
    for s in secs {
        let name = names.len();
        names.extend_from_slice(s.name.as_bytes());
        names.push(0);
        let off = out.len();
        out.extend_from_slice(&s.data);
        header(name, s.ty, s.flags, off, s, s.data.len());
    }
    let name = names.len();
    names.extend_from_slice(b".shstrtab\0");
    let off = out.len();
    out.extend_from_slice(&names);
    let strtab = progbits("", 0, 1, vec![]);
    header(name, 3, 0, off, &strtab, names.len());
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let shoff = out.len() as u64;
    for h in &headers {
        out.extend_from_slice(h);
    }
    out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    out[0x3c..0x3e].copy_from_slice(&(headers.len() as u16).to_le_bytes());
    out[0x3e..0x40].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
    out
}

const AX: u64 = SHF_ALLOC | SHF_EXECINSTR;
const KERNEL_FN: u64 = 0xffff_ffff_8123_4560;
const SVM_BASE: u64 = 0xffff_ffff_c000_2000;
const GVM_BASE: u64 = 0xffff_ffff_c030_0000;
const SVM_DEP: u64 = 0xffff_ffff_c000_8000;
const GVM_DEP: u64 = 0xffff_ffff_c010_0000;

/// A module "m" of three text sections, an init section between them, and:
/// - `.text`+0x10: a call to a kernel function (PC32, undefined symbol 1);
/// - `.text`+0x20: the address of its own `.text`+0x28 (Abs64, section symbol 2);
/// - `.text.unlikely`+0x1: a call into module "dep" (PC32, undefined symbol 1: the
///   loader resolves it, these tests only need the site; the loaded copies call dep's
///   first byte);
/// - a return thunk at `.text`+0x30 (a `jmp`, site +0x31), a jump label at `.text`+0x40
///   (a 5-byte nop) to `.exit.text`+0, and a lock prefix at `.text`+0x48;
/// - an alternative over the kernel call, 5 bytes at `.text`+0xf.
fn module() -> Vec<u8> {
    let mut text = vec![0xcc; 0x50];
    text[0x30] = 0xe9;
    text[0x40..0x45].copy_from_slice(&NOP5);
    text[0x48] = LOCK;
    build(&[
        progbits(".text", AX, 16, text),                  // 1
        progbits(".init.text", AX, 1, vec![0xcc; 0x20]),  // 2
        progbits(".text.unlikely", AX, 1, vec![0xcc; 5]), // 3
        progbits(".exit.text", AX, 1, vec![0xcc; 3]),     // 4
        symtab(&[(0, 0), (1, 0), (4, 0)]),                // 5: undef, .text, .exit.text
        rela(
            ".rela.text",
            5,
            1,
            &[
                (0x10, 1, R_X86_64_PLT32, -4),
                (0x20, 2, R_X86_64_64, 0x28),
                (0x31, 1, R_X86_64_PLT32, -4),
            ],
        ),
        rela(".rela.text.unlikely", 5, 3, &[(1, 1, R_X86_64_PC32, -4)]),
        rela(".rela.init.text", 5, 2, &[(1, 1, R_X86_64_PC32, -4)]),
        progbits(".return_sites", SHF_ALLOC, 1, vec![0; 4]), // 9
        rela(".rela.return_sites", 5, 9, &[(0, 2, R_X86_64_PC32, 0x30)]),
        progbits("__jump_table", SHF_ALLOC | 1, 8, vec![0; 16]), // 11
        rela(
            ".rela__jump_table",
            5,
            11,
            &[
                (0, 2, R_X86_64_PC32, 0x40),
                (4, 3, R_X86_64_PC32, 0),
                (8, 1, R_X86_64_64, 0),
            ],
        ),
        progbits(".smp_locks", SHF_ALLOC, 4, vec![0; 4]), // 13
        rela(".rela.smp_locks", 5, 13, &[(0, 2, R_X86_64_PC32, 0x48)]),
        progbits(
            ".altinstructions",
            SHF_ALLOC,
            1,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 2],
        ), // 15
        rela(
            ".rela.altinstructions",
            5,
            15,
            &[(0, 2, R_X86_64_PC32, 0xf)],
        ),
    ])
}

#[test]
fn the_core_text_is_laid_out_as_the_module_loader_does_and_its_sites_found() {
    let ko = KoText::parse(&module()).unwrap();
    assert_eq!(ko.text_size, 0x1000);
    // .text at 0, .text.unlikely at 0x50, .exit.text at 0x55; .init.text is not core.
    assert_eq!(
        ko.sites,
        vec![
            Site {
                offset: 0x10,
                kind: SiteKind::Pc32,
                addend: -4i64 as u64,
            },
            Site {
                offset: 0x20,
                kind: SiteKind::Abs64,
                addend: 0x28i64 as u64,
            },
            Site {
                offset: 0x31,
                kind: SiteKind::Pc32,
                addend: -4i64 as u64,
            },
            Site {
                offset: 0x51,
                kind: SiteKind::Pc32,
                addend: -4i64 as u64,
            },
        ]
    );
    assert_eq!(ko.rewritten, vec![(0xf, 0x14), (0x30, 0x35)]);
    assert_eq!(
        ko.jump_labels,
        vec![JumpLabel {
            offset: 0x40,
            len: 5,
            target: 0x55
        }]
    );
    assert_eq!(ko.locks, vec![0x48]);
}

/// The text `ko` gives at `base` with the kernel function, the module's own text and
/// `dep`'s function at `dep`+0x100 filled in, as a loader would.
fn loaded(base: u64, dep: u64) -> Vec<u8> {
    loaded_in(base, dep, 0)
}

/// [`loaded`] in a kernel whose image KASLR moved by `slide`.
fn loaded_in(base: u64, dep: u64, slide: u64) -> Vec<u8> {
    let elf = module();
    let e = Elf::parse(&elf).unwrap();
    let mut t = vec![0u8; 0x1000];
    t[..0x50].copy_from_slice(e.section_data(".text").unwrap());
    t[0x50..0x55].copy_from_slice(e.section_data(".text.unlikely").unwrap());
    t[0x55..0x58].copy_from_slice(e.section_data(".exit.text").unwrap());
    let pc32 = |t: &mut Vec<u8>, at: usize, to: u64| {
        let v = to.wrapping_sub(base + at as u64) as i64 as i32;
        t[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    pc32(&mut t, 0x10, KERNEL_FN + slide);
    t[0x20..0x28].copy_from_slice(&(base + 0x28).to_le_bytes());
    pc32(&mut t, 0x31, KERNEL_FN + slide + 0x40);
    // A call to dep's first function: the value (S - 4) lies before dep's text.
    pc32(&mut t, 0x51, dep - 4);
    t
}

fn modules(base: u64, dep: u64) -> Vec<LoadedModule> {
    vec![
        LoadedModule {
            name: "dep".into(),
            base: dep,
            size: 0x3000,
        },
        LoadedModule {
            name: "m".into(),
            base,
            size: 0x2000,
        },
    ]
}

fn check(gvm_text: &[u8]) -> Result<(), Mismatch> {
    check_with(gvm_text, &modules(GVM_BASE, GVM_DEP))
}

fn check_with(gvm_text: &[u8], gvm_modules: &[LoadedModule]) -> Result<(), Mismatch> {
    check_in(gvm_text, gvm_modules, 0)
}

/// [`check_with`] for a GVM whose kernel KASLR moved by `slide`.
fn check_in(gvm_text: &[u8], gvm_modules: &[LoadedModule], slide: u64) -> Result<(), Mismatch> {
    let ko = KoText::parse(&module()).unwrap();
    let twin_text = loaded(SVM_BASE, SVM_DEP);
    let svm_modules = modules(SVM_BASE, SVM_DEP);
    let twin = TextCopy {
        base: SVM_BASE,
        text: &twin_text,
        modules: &svm_modules,
        slide: 0,
    };
    let gvm = TextCopy {
        base: GVM_BASE,
        text: gvm_text,
        modules: gvm_modules,
        slide,
    };
    verify(&ko, "m", &twin, &gvm)
}

#[test]
fn in_a_slid_gvm_kernel_references_lead_to_the_slid_image() {
    const SLIDE: u64 = 0x2e00_0000;
    let gvm_modules = modules(GVM_BASE, GVM_DEP);
    let slid = loaded_in(GVM_BASE, GVM_DEP, SLIDE);
    assert_eq!(check_in(&slid, &gvm_modules, SLIDE), Ok(()));
    // The kernel's references left at the link addresses, or moved by another slide, lead
    // elsewhere than the twin's (the module's own and its dependency's still agree).
    let unslid = loaded(GVM_BASE, GVM_DEP);
    let other = loaded_in(GVM_BASE, GVM_DEP, SLIDE + 0x20_0000);
    for (text, slide) in [(&unslid, SLIDE), (&slid, 0), (&other, SLIDE)] {
        assert!(
            matches!(
                check_in(text, &gvm_modules, slide),
                Err(Mismatch::Relocation { offset: 0x10, .. })
            ),
            "slide {slide:#x}"
        );
    }
}

#[test]
fn a_copy_loaded_elsewhere_matches_its_twin_in_the_same_terms() {
    let gvm = loaded(GVM_BASE, GVM_DEP);
    assert_ne!(
        gvm,
        loaded(SVM_BASE, SVM_DEP),
        "the bases must make the copies differ"
    );
    assert_eq!(check(&gvm), Ok(()));
}

#[test]
fn one_byte_changed_anywhere_else_is_refused_the_padding_too() {
    for at in [0x0, 0x15, 0x4f, 0x57, 0x800, 0xfff] {
        let mut gvm = loaded(GVM_BASE, GVM_DEP);
        gvm[at] ^= 0x01;
        assert_eq!(
            check(&gvm),
            Err(Mismatch::Bytes(at as u64)),
            "offset {at:#x}"
        );
    }
}

#[test]
fn a_relocated_address_that_leads_elsewhere_is_refused() {
    // The kernel call pointed at another kernel address (a gadget), the module's own
    // address pointed into the heap, the call into "dep" into "dep"'s neighbour.
    let cases: [(usize, u64, &str); 3] = [
        (0x10, KERNEL_FN + 1, "0xffffffff81234564"),
        (0x51, GVM_DEP + 0x100 - 4, "dep+0x0"),
        (0x20, 0xffff_8880_0000_1000, "m+0x0"),
    ];
    for (at, to, expected) in cases {
        let mut gvm = loaded(GVM_BASE, GVM_DEP);
        if at == 0x20 {
            gvm[at..at + 8].copy_from_slice(&to.to_le_bytes());
        } else {
            let v = to.wrapping_sub(GVM_BASE + at as u64) as i64 as i32;
            gvm[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            check(&gvm),
            Err(Mismatch::Relocation {
                offset: at as u64,
                expected: expected.into()
            }),
            "site {at:#x}"
        );
    }
    // The twin's raw bytes at a relocation site are not accepted outside rewritten
    // sites: in the GVM's copy they would lead elsewhere.
    let mut gvm = loaded(GVM_BASE, GVM_DEP);
    let twin = loaded(SVM_BASE, SVM_DEP);
    gvm[0x51..0x55].copy_from_slice(&twin[0x51..0x55]);
    assert!(matches!(
        check(&gvm),
        Err(Mismatch::Relocation { offset: 0x51, .. })
    ));
}

#[test]
fn a_dependency_the_gvm_lacks_or_lists_twice_is_refused() {
    let gvm = loaded(GVM_BASE, GVM_DEP);
    let mut without = modules(GVM_BASE, GVM_DEP);
    without.remove(0);
    assert!(matches!(
        check_with(&gvm, &without),
        Err(Mismatch::Relocation { offset: 0x51, .. })
    ));
    let mut twice = modules(GVM_BASE, GVM_DEP);
    twice.push(LoadedModule {
        name: "m".into(),
        base: GVM_BASE + 0x10_0000,
        size: 0x2000,
    });
    assert_eq!(check_with(&gvm, &twice), Err(Mismatch::Listing));
    let mut elsewhere = modules(GVM_BASE, GVM_DEP);
    elsewhere[1].base += 0x1000;
    assert_eq!(check_with(&gvm, &elsewhere), Err(Mismatch::Listing));
}

#[test]
fn rewritten_sites_may_hold_the_twins_bytes_jump_labels_either_state_locks_either_prefix() {
    // Both kernels turned the return thunk's jmp into `ret; int3...`.
    let mut twin = loaded(SVM_BASE, SVM_DEP);
    let mut gvm = loaded(GVM_BASE, GVM_DEP);
    // And the alternative over the kernel call into `clac` and nops.
    for t in [&mut twin, &mut gvm] {
        t[0x30..0x35].copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
        t[0xf..0x14].copy_from_slice(&[0x0f, 0x01, 0xca, 0x66, 0x90]);
    }
    let ko = KoText::parse(&module()).unwrap();
    let svm_modules = modules(SVM_BASE, SVM_DEP);
    let gvm_modules = modules(GVM_BASE, GVM_DEP);
    let copy = |base, text: &[u8], m: &[LoadedModule]| -> Result<(), Mismatch> {
        let twin = TextCopy {
            base: SVM_BASE,
            text: &twin,
            modules: &svm_modules,
            slide: 0,
        };
        verify(
            &ko,
            "m",
            &twin,
            &TextCopy {
                base,
                text,
                modules: m,
                slide: 0,
            },
        )
    };
    assert_eq!(copy(GVM_BASE, &gvm, &gvm_modules), Ok(()));
    // A jump label on: `jmp` to the label's target, 5 bytes.
    let mut on = gvm.clone();
    on[0x40..0x45].copy_from_slice(&[0xe9, 0x10, 0, 0, 0]);
    assert_eq!(copy(GVM_BASE, &on, &gvm_modules), Ok(()));
    for bad in [[0xe9, 0x11, 0, 0, 0], [0x0f, 0x0b, 0x90, 0x90, 0x90]] {
        let mut g = gvm.clone();
        g[0x40..0x45].copy_from_slice(&bad);
        assert_eq!(
            copy(GVM_BASE, &g, &gvm_modules),
            Err(Mismatch::JumpLabel(0x40))
        );
    }
    let mut ds = gvm.clone();
    ds[0x48] = DS;
    assert_eq!(copy(GVM_BASE, &ds, &gvm_modules), Ok(()));
    ds[0x48] = 0x90;
    assert_eq!(copy(GVM_BASE, &ds, &gvm_modules), Err(Mismatch::Lock(0x48)));
}

#[test]
fn copies_of_the_wrong_size_are_refused() {
    let gvm = loaded(GVM_BASE, GVM_DEP);
    assert_eq!(
        check(&gvm[..0x800]),
        Err(Mismatch::Size {
            ko: 0x1000,
            twin: 0x1000,
            gvm: 0x800
        })
    );
}

#[test]
fn hostile_module_files_are_errors() {
    let text = || progbits(".text", AX, 16, vec![0xcc; 0x20]);
    let no_symbols = build(&[text()]);
    assert_eq!(KoText::parse(&no_symbols), Err(KoError::NoSymbols));
    let bad_type = build(&[
        text(),
        symtab(&[]),
        rela(".rela.text", 2, 1, &[(0, 0, 37, 0)]),
    ]);
    assert_eq!(
        KoText::parse(&bad_type),
        Err(KoError::RelocationType {
            r_type: 37,
            section: ".rela.text".into()
        })
    );
    let outside = build(&[
        text(),
        symtab(&[]),
        rela(".rela.text", 2, 1, &[(0x1e, 0, R_X86_64_PC32, 0)]),
    ]);
    assert_eq!(
        KoText::parse(&outside),
        Err(KoError::Relocation(".rela.text".into()))
    );
    let no_symbol = build(&[
        text(),
        symtab(&[]),
        progbits(".smp_locks", SHF_ALLOC, 4, vec![0; 4]),
        rela(".rela.smp_locks", 2, 3, &[(0, 9, R_X86_64_PC32, 0)]),
    ]);
    assert_eq!(
        KoText::parse(&no_symbol),
        Err(KoError::Relocation(".rela.smp_locks".into()))
    );
    let odd_align = build(&[progbits(".text", AX, 3, vec![0; 4]), symtab(&[])]);
    assert_eq!(
        KoText::parse(&odd_align),
        Err(KoError::Alignment(".text".into()))
    );
    let mut huge = progbits(".text", AX, 16, vec![]);
    huge.ty = 8; // NOBITS: a size without data
    let mut file = build(&[huge, symtab(&[])]);
    // Section 1's size, past MAX_TEXT.
    let shoff = u64::from_le_bytes(file[0x28..0x30].try_into().unwrap()) as usize;
    file[shoff + 64 + 32..shoff + 64 + 40].copy_from_slice(&(MAX_TEXT + 1).to_le_bytes());
    assert_eq!(KoText::parse(&file), Err(KoError::TooLarge));
    assert!(matches!(KoText::parse(b"\x7fELF"), Err(KoError::Elf(_))));
    // A jump label whose site is neither a jmp nor a nop.
    let jl = build(&[
        text(),
        symtab(&[(1, 0)]),
        progbits("__jump_table", SHF_ALLOC | 1, 8, vec![0; 16]),
        rela(
            ".rela__jump_table",
            2,
            3,
            &[(0, 1, R_X86_64_PC32, 4), (4, 1, R_X86_64_PC32, 8)],
        ),
    ]);
    assert_eq!(KoText::parse(&jl), Err(KoError::JumpLabel(4)));
}
