//! Whether two kernel images are the same kernel: every byte that is loaded into memory.
//!
//! The redirect engine runs the SVM's kernel text on the GVM's data, with the SVM's symbols
//! and the image's struct layouts. That is only right when the GVM runs that very kernel: the
//! same build (layouts, symbol places) and not changed after it was built (its code). The
//! GVM's kernel file is the operator's input, but it may have come with the guest (its
//! `/boot`), so it is compared with the trusted one, section by section, never believed for
//! its name, release string or build-id; those only make the refusal readable.
//!
//! "Loaded" means `SHF_ALLOC` sections: their names, addresses and sizes (`.bss` too), and
//! the bytes of those with file data (`.text`, `.rodata`, `.data`, `.init.text`, the
//! alternatives, `.notes`). Symbol tables, debug sections and the relocation table after the
//! ELF are not loaded and may differ (an unstripped vmlinux of a build tree is the same
//! kernel as the distribution's stripped one). A name given to two loaded sections is
//! refused: a second copy would be looked past. Program headers are not compared: the VMM
//! boots the GVM from the trusted file once this passes (`vmm::instance`), so the GVM
//! file's own headers are never used.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use super::elf::{Elf, ElfError, Section, SHF_ALLOC, SHT_NOBITS};
use super::release_from_rodata;

/// `NT_GNU_BUILD_ID`, the note type of the linker's build-id.
const NT_GNU_BUILD_ID: u32 = 3;
/// Longest build-id shown (a SHA-1 one is 20 bytes; the linker allows up to a few dozen).
const MAX_BUILD_ID: usize = 64;

/// What a kernel image says it is: shown in a refusal, decides nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The release in its `.rodata` banner, e.g. `6.1.0-50-cloud-amd64`.
    pub release: Option<String>,
    /// The linker's build-id from its notes, in hex.
    pub build_id: Option<String>,
}

impl Identity {
    /// Reads the release banner and the build-id note of an ELF image (absent ones are
    /// `None`; neither is required).
    pub fn of(elf: &Elf<'_>) -> Identity {
        Identity {
            release: elf
                .section_data(".rodata")
                .ok()
                .and_then(release_from_rodata),
            build_id: elf
                .sections()
                .iter()
                .filter(|s| s.name == ".notes" || s.sh_type == SHT_NOTE)
                .filter_map(|s| elf.data(s).ok())
                .find_map(build_id_note),
        }
    }
}

/// `SHT_NOTE`.
const SHT_NOTE: u32 = 7;

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.release {
            Some(r) => write!(f, "release {r}")?,
            None => write!(f, "no release banner")?,
        }
        match &self.build_id {
            Some(id) => write!(f, ", build-id {id}"),
            None => write!(f, ", no build-id"),
        }
    }
}

/// The hex build-id in a notes section's data, if it has one. Each note is a 12-byte header
/// (name size, descriptor size, type), the name and the descriptor, each padded to 4 bytes;
/// every size is checked against what is left, so the walk ends within the data.
fn build_id_note(mut notes: &[u8]) -> Option<String> {
    let pad4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let word = |at: usize| {
            let b = notes.get(at..at + 4)?;
            usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()
        };
        let (name_size, desc_size) = (word(0)?, word(4)?);
        let kind = u32::try_from(word(8)?).ok()?;
        let name_end = 12usize.checked_add(pad4(name_size)?)?;
        let desc_end = name_end.checked_add(pad4(desc_size)?)?;
        let name = notes.get(12..12usize.checked_add(name_size)?)?;
        let desc = notes.get(name_end..name_end.checked_add(desc_size)?)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" && (1..=MAX_BUILD_ID).contains(&desc.len()) {
            return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// How two kernels' loaded bytes differ (the first difference found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// A loaded section one kernel has and the other has not, or has at another address or
    /// of another size.
    Layout {
        /// The section's name.
        section: String,
        /// Its (address, size) in the GVM's kernel, if it has it.
        gvm: Option<(u64, u64)>,
        /// Its (address, size) in the SVM's kernel, if it has it.
        svm: Option<(u64, u64)>,
    },
    /// Two loaded sections of one kernel have the same name.
    Duplicate {
        /// The name.
        section: String,
        /// "GVM" or "SVM".
        which: &'static str,
    },
    /// The same section at the same place with other bytes.
    Bytes {
        /// The section's name.
        section: String,
        /// Offset of the first differing byte in the section.
        offset: u64,
        /// How many of the section's bytes differ.
        count: u64,
        /// How many loaded sections differ in bytes in all.
        sections: usize,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = |p: &Option<(u64, u64)>| match p {
            Some((addr, size)) => format!("at {addr:#x}, {size:#x} bytes"),
            None => "absent".to_string(),
        };
        match self {
            Difference::Layout { section, gvm, svm } => write!(
                f,
                "loaded section {section} is {} in the GVM's kernel and {} in the SVM's",
                place(gvm),
                place(svm)
            ),
            Difference::Duplicate { section, which } => write!(
                f,
                "the {which}'s kernel has more than one loaded section named {section:?}"
            ),
            Difference::Bytes {
                section,
                offset,
                count,
                sections,
            } => write!(
                f,
                "{count} bytes of {section} differ, the first at offset {offset:#x} \
                 ({sections} loaded section(s) differ in all)"
            ),
        }
    }
}

/// Why the GVM's kernel cannot be run by the redirect engine with the SVM's.
#[derive(Debug, Error)]
pub enum KernelMismatch {
    /// One of the images is not an ELF image the engine can read.
    #[error("the {which}'s kernel: {source}")]
    Unreadable {
        /// "GVM" or "SVM".
        which: &'static str,
        /// What is wrong with it.
        source: ElfError,
    },
    /// Both are readable and their loaded bytes differ.
    #[error("{0}")]
    Differs(Box<Drift>),
}

/// Two readable kernels whose loaded bytes differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// What the GVM's kernel says it is.
    pub gvm: Identity,
    /// What the SVM's kernel says it is.
    pub svm: Identity,
    /// The first difference.
    pub difference: Difference,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (gvm, svm) = (&self.gvm, &self.svm);
        let what = if gvm.build_id.is_some() && gvm.build_id == svm.build_id {
            "the same build-id with other bytes: a kernel changed after it was built"
        } else {
            "another build"
        };
        write!(
            f,
            "the GVM's kernel is not the SVM's: GVM {gvm}; SVM {svm}; {}; {what}",
            self.difference
        )
    }
}

/// The loaded sections by name; `Err` with a name that two of them have.
fn loaded<'e>(elf: &'e Elf<'_>) -> Result<BTreeMap<&'e str, &'e Section>, String> {
    let mut map = BTreeMap::new();
    for s in elf.sections() {
        if s.flags & SHF_ALLOC != 0 && map.insert(s.name.as_str(), s).is_some() {
            return Err(s.name.clone());
        }
    }
    Ok(map)
}

/// Checks that the ELF images `gvm` and `svm` load the same bytes at the same addresses.
pub fn same_kernel(gvm: &[u8], svm: &[u8]) -> Result<(), KernelMismatch> {
    let parse = |which, bytes| {
        Elf::parse(bytes).map_err(|source| KernelMismatch::Unreadable { which, source })
    };
    let (g, s) = (parse("GVM", gvm)?, parse("SVM", svm)?);
    let differs = |difference| {
        KernelMismatch::Differs(Box::new(Drift {
            gvm: Identity::of(&g),
            svm: Identity::of(&s),
            difference,
        }))
    };
    let duplicate = |which| move |section| Difference::Duplicate { section, which };
    let gl = loaded(&g).map_err(duplicate("GVM")).map_err(differs)?;
    let sl = loaded(&s).map_err(duplicate("SVM")).map_err(differs)?;
    let place = |sec: Option<&&Section>| sec.map(|sec| (sec.addr, sec.size));
    // The same names at the same places (in name order, either side's extra one first).
    for name in gl.keys().chain(sl.keys()) {
        let (a, b) = (place(gl.get(name)), place(sl.get(name)));
        if a != b {
            return Err(differs(Difference::Layout {
                section: name.to_string(),
                gvm: a,
                svm: b,
            }));
        }
    }
    let mut first: Option<(String, u64, u64)> = None;
    let mut sections = 0;
    for (name, sec) in &gl {
        let Some(other) = sl.get(name) else {
            continue; // Not reached: the layout check above found every one.
        };
        if sec.sh_type == SHT_NOBITS || other.sh_type == SHT_NOBITS {
            if sec.sh_type != other.sh_type {
                return Err(differs(Difference::Layout {
                    section: name.to_string(),
                    gvm: place(Some(sec)),
                    svm: place(Some(other)),
                }));
            }
            continue; // Zero-filled: its place and size are its content.
        }
        let a = g.data(sec).map_err(|source| KernelMismatch::Unreadable {
            which: "GVM",
            source,
        })?;
        let b = s.data(other).map_err(|source| KernelMismatch::Unreadable {
            which: "SVM",
            source,
        })?;
        if a == b {
            continue;
        }
        sections += 1;
        if first.is_none() {
            // Same size (checked above), so the zip covers both.
            let mut diffs = a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y);
            let offset = diffs.next().map_or(0, |(i, _)| i as u64);
            let count = 1 + diffs.count() as u64;
            first = Some((name.to_string(), offset, count));
        }
    }
    match first {
        None => Ok(()),
        Some((section, offset, count)) => Err(differs(Difference::Bytes {
            section,
            offset,
            count,
            sections,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::elf::tests::build_elf;

    const NOTE_TYPE: u32 = SHT_NOTE;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    fn kernel(text: &[u8], build_id: &[u8], extra: &[(&str, u32, u64, &[u8])]) -> Vec<u8> {
        let mut notes = note(b"Xen\0", 6, b"linux\0");
        notes.extend(note(b"GNU\0", NT_GNU_BUILD_ID, build_id));
        let rodata = b"Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org) #1\0";
        let mut sections: Vec<(&str, u32, u64, &[u8])> = vec![
            (".text", 1, 0xffff_ffff_8100_0000, text),
            (".rodata", 1, 0xffff_ffff_8200_0000, rodata),
            (".notes", NOTE_TYPE, 0xffff_ffff_8240_0000, &notes),
        ];
        sections.extend_from_slice(extra);
        build_elf(&sections)
    }

    #[test]
    fn the_same_loaded_bytes_are_the_same_kernel_whatever_else_differs() {
        let a = kernel(b"\x0f\x05\xc3", b"\xbb\x60", &[]);
        assert!(same_kernel(&a, &a).is_ok());
        // A section that is not loaded (address 0: no SHF_ALLOC in the test builder), such
        // as a symbol table, and a tail after the ELF (the relocations) may differ.
        let b = kernel(b"\x0f\x05\xc3", b"\xbb\x60", &[(".symtab", 2, 0, b"syms")]);
        let mut c = a.clone();
        c.extend_from_slice(b"relocation table");
        assert!(same_kernel(&b, &a).is_ok());
        assert!(same_kernel(&a, &c).is_ok());
    }

    #[test]
    fn a_patched_kernel_is_named_with_its_first_changed_byte() {
        let svm = kernel(b"\x0f\x05\xc3\x90\x90", b"\xbb\x60", &[]);
        let gvm = kernel(b"\x0f\x05\xcc\x90\xcc", b"\xbb\x60", &[]);
        let err = same_kernel(&gvm, &svm).unwrap_err();
        let KernelMismatch::Differs(drift) = &err else {
            panic!("{err}");
        };
        let Drift {
            gvm: g,
            svm: s,
            difference,
        } = drift.as_ref();
        assert_eq!(g, s);
        assert_eq!(g.release.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert_eq!(g.build_id.as_deref(), Some("bb60"));
        assert_eq!(
            difference,
            &Difference::Bytes {
                section: ".text".into(),
                offset: 2,
                count: 2,
                sections: 1
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("2 bytes of .text differ, the first at offset 0x2")
                && text.contains("changed after it was built"),
            "{text}"
        );
    }

    #[test]
    fn another_build_shows_both_build_ids() {
        let svm = kernel(b"\x0f\x05\xc3", b"\xbb\x60", &[]);
        let gvm = kernel(b"\x0f\x05\xc3", b"\x12\x34", &[]);
        let text = same_kernel(&gvm, &svm).unwrap_err().to_string();
        assert!(
            text.contains("GVM release 6.1.0-50-cloud-amd64, build-id 1234; SVM release 6.1.0-50-cloud-amd64, build-id bb60")
                && text.contains("of .notes differ")
                && text.contains("another build"),
            "{text}"
        );
    }

    #[test]
    fn a_loaded_section_moved_added_or_missing_is_a_layout_difference() {
        let svm = kernel(b"\x0f\x05\xc3", b"\xbb\x60", &[]);
        let more = kernel(
            b"\x0f\x05\xc3",
            b"\xbb\x60",
            &[(".data", 1, 0xffff_ffff_8300_0000, b"d")],
        );
        let longer = kernel(b"\x0f\x05\xc3\xc3", b"\xbb\x60", &[]);
        for (gvm, svm, want) in [
            (
                &more,
                &svm,
                Difference::Layout {
                    section: ".data".into(),
                    gvm: Some((0xffff_ffff_8300_0000, 1)),
                    svm: None,
                },
            ),
            (
                &svm,
                &more,
                Difference::Layout {
                    section: ".data".into(),
                    gvm: None,
                    svm: Some((0xffff_ffff_8300_0000, 1)),
                },
            ),
            (
                &longer,
                &svm,
                Difference::Layout {
                    section: ".text".into(),
                    gvm: Some((0xffff_ffff_8100_0000, 4)),
                    svm: Some((0xffff_ffff_8100_0000, 3)),
                },
            ),
        ] {
            match same_kernel(gvm, svm) {
                Err(KernelMismatch::Differs(drift)) => assert_eq!(drift.difference, want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_bss_of_another_size_or_a_second_section_of_a_name_is_refused() {
        let bss = |n: usize| {
            let zeros = vec![0u8; n];
            kernel(
                b"\xc3",
                b"\xbb",
                &[(".bss", SHT_NOBITS, 0xffff_ffff_8300_0000, &zeros)],
            )
        };
        match same_kernel(&bss(0x2000), &bss(0x1000)) {
            Err(KernelMismatch::Differs(drift)) => assert_eq!(
                drift.difference,
                Difference::Layout {
                    section: ".bss".into(),
                    gvm: Some((0xffff_ffff_8300_0000, 0x2000)),
                    svm: Some((0xffff_ffff_8300_0000, 0x1000)),
                }
            ),
            other => panic!("{other:?}"),
        }
        assert!(same_kernel(&bss(0x1000), &bss(0x1000)).is_ok());
        // A second .text further on (a patched copy the first check would look past).
        let twice = kernel(
            b"\xc3",
            b"\xbb",
            &[(".text", 1, 0xffff_ffff_8400_0000, b"\xcc")],
        );
        let plain = kernel(b"\xc3", b"\xbb", &[]);
        let err = same_kernel(&twice, &plain).unwrap_err().to_string();
        assert!(
            err.contains("the GVM's kernel has more than one loaded section named \".text\""),
            "{err}"
        );
        assert!(same_kernel(&plain, &twice).is_err());
    }

    #[test]
    fn section_data_past_the_end_of_the_file_is_unreadable() {
        let good = kernel(b"\x0f\x05\xc3", b"\xbb", &[]);
        // Stretch .text's size (the first section header after the null one) far past the end.
        let mut bad = good.clone();
        let shoff = u64::from_le_bytes(bad[0x28..0x30].try_into().unwrap()) as usize;
        let size_at = shoff + 64 + 32;
        bad[size_at..size_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = same_kernel(&bad, &good);
        // The layout differs first (another size); with both stretched, the data is unreadable.
        assert!(matches!(err, Err(KernelMismatch::Differs(_))), "{err:?}");
        let both = same_kernel(&bad, &bad);
        assert!(
            matches!(both, Err(KernelMismatch::Unreadable { which: "GVM", .. })),
            "{both:?}"
        );
    }

    #[test]
    fn unreadable_images_and_hostile_notes_are_errors_not_panics() {
        let good = kernel(b"\xc3", b"\xbb", &[]);
        assert!(matches!(
            same_kernel(b"MZ not a kernel", &good),
            Err(KernelMismatch::Unreadable { which: "GVM", .. })
        ));
        assert!(matches!(
            same_kernel(&good, &good[..40]),
            Err(KernelMismatch::Unreadable { which: "SVM", .. })
        ));
        // Notes whose sizes run past the end, or wrap, end the walk without an id.
        for bad in [
            vec![0xff; 12],
            [
                4u32.to_le_bytes(),
                u32::MAX.to_le_bytes(),
                3u32.to_le_bytes(),
            ]
            .concat(),
            [
                u32::MAX.to_le_bytes(),
                0u32.to_le_bytes(),
                3u32.to_le_bytes(),
            ]
            .concat(),
            vec![0; 11],
        ] {
            assert_eq!(build_id_note(&bad), None);
        }
        // A run of empty notes ends at the data's end.
        assert_eq!(build_id_note(&[0u8; 4096]), None);
        assert_eq!(
            build_id_note(&note(b"GNU\0", NT_GNU_BUILD_ID, b"\x01\xff")).as_deref(),
            Some("01ff")
        );
    }
}
