//! Just enough of ELF64 little-endian to find a kernel image's sections.
//!
//! The pinned `vmlinux` is stripped of its symbol table but keeps its section headers,
//! `.BTF` (types) and `.rodata` (the version banner). It may also be followed by extra data
//! (the decompressor's payload carries relocations after the ELF): only the ranges that the
//! headers name are ever read.
//!
//! Every offset and size in the file is untrusted: all arithmetic is checked and every range
//! is bounds-checked against the buffer, so hostile input yields an [`ElfError`], never a
//! panic.

use thiserror::Error;

/// Section type of a section without file data (`.bss`).
pub const SHT_NOBITS: u32 = 8;
/// Section flag: the section occupies memory when the image is loaded.
pub const SHF_ALLOC: u64 = 0x2;
/// Section type of a string table.
pub const SHT_STRTAB: u32 = 3;

const EHDR_SIZE: usize = 64;
const SHDR_SIZE: usize = 64;
/// Section index meaning "the real value is stored in section header 0".
const SHN_XINDEX: u16 = 0xffff;
/// Longest section name considered (a real one is a few dozen bytes).
const MAX_NAME_LEN: usize = 256;

/// Why an ELF image could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// The file does not start with `\x7fELF`.
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    /// The file is ELF but not ELF64 little-endian; says which.
    #[error("unsupported ELF file: {0} (only ELF64 little-endian is supported)")]
    Unsupported(&'static str),
    /// A range the headers name lies (partly) outside the file.
    #[error("ELF file truncated: {what} at {offset:#x}+{len:#x} lies past the end ({file_len:#x} bytes)")]
    Truncated {
        /// What the range holds (e.g. "section data").
        what: &'static str,
        /// File offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
        /// Length of the file in bytes.
        file_len: u64,
    },
    /// The headers are inconsistent (no section table, bad entry size or index, ...).
    #[error("malformed ELF file: {0}")]
    Malformed(String),
    /// No section has the requested name.
    #[error("ELF file has no section named {0:?}")]
    NoSuchSection(String),
    /// The section is `SHT_NOBITS` (like `.bss`), so the file holds no data for it.
    #[error("ELF section {0:?} has no data in the file (NOBITS)")]
    NoData(String),
}

/// One section header, with its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Section name from the section-name string table (empty if the name is unreadable).
    pub name: String,
    /// `sh_type`, e.g. [`SHT_STRTAB`] or [`SHT_NOBITS`].
    pub sh_type: u32,
    /// `sh_flags` (`SHF_*` bits).
    pub flags: u64,
    /// Virtual address when loaded (0 for non-allocated sections; `.data..percpu` is linked
    /// at 0 on x86-64 SMP kernels).
    pub addr: u64,
    /// Offset of the section's data in the file.
    pub offset: u64,
    /// Size of the section in bytes (in memory; in the file too unless NOBITS).
    pub size: u64,
    /// `sh_link`: a related section's index (a symbol table's string table, a
    /// relocation section's symbol table).
    pub link: u32,
    /// `sh_info`: for a relocation section, the index of the section it applies to.
    pub info: u32,
    /// `sh_addralign`: the alignment the section needs when loaded (0 and 1: none).
    pub addralign: u64,
}

/// An ELF64 little-endian image held in memory.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    sections: Vec<Section>,
    /// The first file offset past everything the headers name (`u64::MAX` if that wraps).
    end: u64,
}

fn file_len(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}

/// `bytes[offset..offset + len]`, or a `Truncated` error naming `what`.
fn range<'a>(
    bytes: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let err = || ElfError::Truncated {
        what,
        offset,
        len,
        file_len: file_len(bytes),
    };
    let start = usize::try_from(offset).map_err(|_| err())?;
    let n = usize::try_from(len).map_err(|_| err())?;
    let end = start.checked_add(n).ok_or_else(err)?;
    bytes.get(start..end).ok_or_else(err)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    match b.get(off..off.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    match b.get(off..off.saturating_add(4)) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    match b.get(off..off.saturating_add(8)) {
        Some(s) => u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        None => 0,
    }
}

/// A NUL-terminated name at `off` in a string table (bounded; lossy on bad UTF-8).
fn name_at(strtab: &[u8], off: u32) -> String {
    let Some(rest) = usize::try_from(off).ok().and_then(|o| strtab.get(o..)) else {
        return String::new();
    };
    let rest = &rest[..rest.len().min(MAX_NAME_LEN)];
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

impl<'a> Elf<'a> {
    /// Reads the ELF header and all section headers of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let ehdr = range(bytes, 0, EHDR_SIZE as u64, "ELF header").map_err(|e| {
            if bytes.len() >= 4 && bytes[..4] != *b"\x7fELF" {
                ElfError::BadMagic
            } else {
                e
            }
        })?;
        if ehdr[..4] != *b"\x7fELF" {
            return Err(ElfError::BadMagic);
        }
        if ehdr[4] != 2 {
            return Err(ElfError::Unsupported("not ELF64"));
        }
        if ehdr[5] != 1 {
            return Err(ElfError::Unsupported("not little-endian"));
        }
        let shoff = u64_at(ehdr, 0x28);
        let shentsize = u16_at(ehdr, 0x3a);
        let mut shnum = u64::from(u16_at(ehdr, 0x3c));
        let mut shstrndx = u32::from(u16_at(ehdr, 0x3e));
        if shoff == 0 {
            return Err(ElfError::Malformed("no section header table".into()));
        }
        if usize::from(shentsize) < SHDR_SIZE {
            return Err(ElfError::Malformed(format!(
                "section header entry size {shentsize} is smaller than {SHDR_SIZE}"
            )));
        }
        let entsize = u64::from(shentsize);
        // Extended numbering: counts too large for the header live in section header 0.
        if shnum == 0 || shstrndx == u32::from(SHN_XINDEX) {
            let sh0 = range(bytes, shoff, entsize, "section header 0")?;
            if shnum == 0 {
                shnum = u64_at(sh0, 32);
            }
            if shstrndx == u32::from(SHN_XINDEX) {
                shstrndx = u32_at(sh0, 40);
            }
        }
        if shnum == 0 {
            return Err(ElfError::Malformed("no sections".into()));
        }
        let table_len = shnum
            .checked_mul(entsize)
            .ok_or_else(|| ElfError::Malformed(format!("{shnum} section headers overflow")))?;
        // This bounds shnum by the file size, so the loops below are bounded too.
        let table = range(bytes, shoff, table_len, "section header table")?;
        const EMPTY: [u8; SHDR_SIZE] = [0; SHDR_SIZE];
        let header = |i: u64| -> &[u8] {
            // i < shnum and shnum * entsize == table.len(), so this never falls back.
            usize::try_from(i.saturating_mul(entsize))
                .ok()
                .and_then(|start| table.get(start..start.checked_add(SHDR_SIZE)?))
                .unwrap_or(&EMPTY)
        };
        if u64::from(shstrndx) >= shnum {
            return Err(ElfError::Malformed(format!(
                "section name table index {shstrndx} out of range ({shnum} sections)"
            )));
        }
        let strhdr = header(u64::from(shstrndx));
        let strtab = if u32_at(strhdr, 4) == SHT_NOBITS {
            &[][..]
        } else {
            range(
                bytes,
                u64_at(strhdr, 24),
                u64_at(strhdr, 32),
                "section name table",
            )?
        };
        let sections: Vec<Section> = (0..shnum)
            .map(|i| {
                let h = header(i);
                Section {
                    name: name_at(strtab, u32_at(h, 0)),
                    sh_type: u32_at(h, 4),
                    flags: u64_at(h, 8),
                    addr: u64_at(h, 16),
                    offset: u64_at(h, 24),
                    size: u64_at(h, 32),
                    link: u32_at(h, 40),
                    info: u32_at(h, 44),
                    addralign: u64_at(h, 48),
                }
            })
            .collect();
        let phoff = u64_at(ehdr, 0x20);
        let phdrs = u64::from(u16_at(ehdr, 0x36)) * u64::from(u16_at(ehdr, 0x38));
        let end = sections
            .iter()
            .filter(|s: &&Section| s.sh_type != SHT_NOBITS)
            .map(|s| s.offset.checked_add(s.size))
            .chain([
                shoff.checked_add(table_len),
                phoff.checked_add(phdrs),
                Some(EHDR_SIZE as u64),
            ])
            .try_fold(0u64, |end, e| e.map(|e| end.max(e)))
            .unwrap_or(u64::MAX);
        Ok(Elf {
            bytes,
            sections,
            end,
        })
    }

    /// The first file offset past the headers and every section's data: what follows is
    /// not the ELF's (a kernel payload's relocation table).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// All section headers, in file order (index 0 is the null section).
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The first section called `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The file data of `section` (bounds-checked; NOBITS sections have none).
    pub fn data(&self, section: &Section) -> Result<&'a [u8], ElfError> {
        if section.sh_type == SHT_NOBITS {
            return Err(ElfError::NoData(section.name.clone()));
        }
        range(self.bytes, section.offset, section.size, "section data")
    }

    /// The file data of the section called `name`.
    pub fn section_data(&self, name: &str) -> Result<&'a [u8], ElfError> {
        let section = self
            .section(name)
            .ok_or_else(|| ElfError::NoSuchSection(name.to_string()))?;
        self.data(section)
    }
}

/// Finds the section called `name` in the ELF64 little-endian image `bytes` and returns its
/// data, e.g. `find_section(vmlinux, ".BTF")`.
pub fn find_section<'a>(bytes: &'a [u8], name: &str) -> Result<&'a [u8], ElfError> {
    Elf::parse(bytes)?.section_data(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 LE file: header, then each section's data, then the section
    /// name table, then the section headers. `sections` are (name, type, addr, data).
    pub(crate) fn build_elf(sections: &[(&str, u32, u64, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; EHDR_SIZE];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        let mut names = vec![0u8];
        let mut headers: Vec<(u32, u32, u64, u64, u64)> = vec![(0, 0, 0, 0, 0)];
        for (name, ty, addr, data) in sections {
            let name_off = names.len() as u32;
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            let off = out.len() as u64;
            if *ty != SHT_NOBITS {
                out.extend_from_slice(data);
            }
            headers.push((name_off, *ty, *addr, off, data.len() as u64));
        }
        let shstr_name = names.len() as u32;
        names.extend_from_slice(b".shstrtab\0");
        let shstr_off = out.len() as u64;
        out.extend_from_slice(&names);
        headers.push((shstr_name, SHT_STRTAB, 0, shstr_off, names.len() as u64));
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        for (name, ty, addr, off, size) in &headers {
            let mut h = [0u8; SHDR_SIZE];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            // Sections with an address are loaded (SHF_ALLOC), as in a vmlinux.
            if *addr != 0 {
                h[8..16].copy_from_slice(&2u64.to_le_bytes());
            }
            h[16..24].copy_from_slice(&addr.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&h);
        }
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&(SHDR_SIZE as u16).to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&(headers.len() as u16).to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
        out
    }

    #[test]
    fn finds_sections_by_name() {
        let elf = build_elf(&[
            (".text", 1, 0xffff_ffff_8100_0000, b"code"),
            (".BTF", 1, 0, b"btf-bytes"),
            (".bss", SHT_NOBITS, 0x1000, &[0u8; 32]),
        ]);
        // Trailing data after the ELF (like vmlinux's relocations) is ignored.
        let mut with_tail = elf.clone();
        with_tail.extend_from_slice(&[0xaa; 100]);
        for bytes in [&elf, &with_tail] {
            assert_eq!(find_section(bytes, ".BTF").unwrap(), b"btf-bytes");
            let parsed = Elf::parse(bytes).unwrap();
            let text = parsed.section(".text").unwrap();
            assert_eq!(text.addr, 0xffff_ffff_8100_0000);
            assert_eq!(parsed.data(text).unwrap(), b"code");
            assert_eq!(
                parsed.section_data(".bss"),
                Err(ElfError::NoData(".bss".into()))
            );
            assert_eq!(
                parsed.section_data(".nope"),
                Err(ElfError::NoSuchSection(".nope".into()))
            );
        }
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(Elf::parse(b""), Err(ElfError::Truncated { .. })));
        assert_eq!(Elf::parse(b"MZ\0\0").unwrap_err(), ElfError::BadMagic);
        let good = build_elf(&[(".BTF", 1, 0, b"x")]);
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert!(matches!(Elf::parse(&elf32), Err(ElfError::Unsupported(_))));
        let mut big = good.clone();
        big[5] = 2;
        assert!(matches!(Elf::parse(&big), Err(ElfError::Unsupported(_))));
        let mut bad_strndx = good.clone();
        bad_strndx[0x3e] = 0x50;
        assert!(matches!(
            Elf::parse(&bad_strndx),
            Err(ElfError::Malformed(_))
        ));
        let mut huge_shoff = good.clone();
        huge_shoff[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Elf::parse(&huge_shoff),
            Err(ElfError::Truncated { .. })
        ));
        let mut small_ent = good.clone();
        small_ent[0x3a] = 10;
        assert!(matches!(
            Elf::parse(&small_ent),
            Err(ElfError::Malformed(_))
        ));
    }

    #[test]
    fn section_data_out_of_file_is_an_error() {
        let mut elf = build_elf(&[(".BTF", 1, 0, b"abc")]);
        let shoff = u64_at(&elf, 0x28) as usize;
        // Section 1's size -> enormous.
        let size_at = shoff + SHDR_SIZE + 32;
        elf[size_at..size_at + 8].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        assert!(matches!(
            find_section(&elf, ".BTF"),
            Err(ElfError::Truncated { .. })
        ));
    }

    #[test]
    fn every_truncation_and_byte_flip_is_handled() {
        let elf = build_elf(&[(".text", 1, 0x1000, b"code"), (".BTF", 1, 0, b"btf-bytes")]);
        for len in 0..elf.len() {
            let _ = find_section(&elf[..len], ".BTF");
        }
        for i in 0..elf.len() {
            for v in [0u8, 0xff, 0x80, 0x01] {
                let mut m = elf.clone();
                m[i] = v;
                let _ = find_section(&m, ".BTF");
                let _ = Elf::parse(&m).map(|e| e.sections().len());
            }
        }
    }
}
