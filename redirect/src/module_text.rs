//! Module text the view may run: a loaded module's core text, checked byte for byte
//! against the trusted SVM kernel's load of the same `.ko` (issue #13 item 6).
//!
//! The view runs trusted code only. The SVM image carries the pinned kernel package's
//! modules for the devices and file systems operators' tools list, and the SVM kernel —
//! the same build as the GVM's, on the same virtual CPU — loads them at boot: each is a
//! *twin*, the text the package's `.ko` becomes when this kernel loads it, its load-time
//! rewriting (alternatives, thunks, ftrace) included. A GVM module of the same name is
//! trusted when its core text equals its twin's, byte for byte, except where loading puts
//! an address or the running kernel's state into the text — and there it must say the
//! same thing:
//! - **relocation sites** (the `.ko`'s relocations into its core text sections): the
//!   GVM's value must lead where the twin's leads, in the same terms — to the same address
//!   if the twin's leads outside every module (the kernel image: both kernels are one
//!   build at the same addresses), to the same offset of the same module, by name, if it
//!   leads into one (the module itself, or one whose symbol it uses);
//! - **sites the kernel rewrites when it loads a module** (alternatives, paravirt
//!   sites, static calls, return and retpoline thunks, ftrace's `__fentry__` calls; the
//!   replacement code of alternatives is core text too): a relocation site among them may
//!   instead hold exactly the twin's bytes — both kernels rewrote the instruction the
//!   same way, and it no longer holds an address;
//! - **jump labels**: the site's own bytes, a `nop` of its size, or a `jmp` of its size
//!   to its target (whether a key is on is GVM data);
//! - **lock prefixes**: `lock`, or the `ds` prefix a kernel on one CPU writes instead.
//!
//! Anything else that differs — one byte of a page's padding too, since the view maps
//! whole pages — leaves the module untrusted. An instruction the kernel rewrote to one
//! that holds an address of its own (an alternative's `call`, fixed up for where it
//! landed) differs between the copies outside any relocation site and fails the check:
//! refused, never wrongly trusted.
//!
//! The `.ko` comes from the SVM image, whose digest the VMM checks; everything read from
//! it is still bounds-checked, and the GVM side (its text, its module list) is hostile.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::kaslr::KERNEL_IMAGE_SIZE;
use crate::profile::elf::SHF_ALLOC;
use crate::profile::{Elf, ElfError};
use crate::view::START_KERNEL_MAP;

const SHT_SYMTAB: u32 = 2;
const SHT_RELA: u32 = 4;
const SHF_EXECINSTR: u64 = 0x4;
const PAGE: u64 = 0x1000;
const SYM_SIZE: usize = 24;
const RELA_SIZE: usize = 24;
/// Largest core text accepted (the largest module of the pinned kernel has about 3 MiB).
pub const MAX_TEXT: u64 = 16 << 20;

const R_X86_64_NONE: u32 = 0;
const R_X86_64_64: u32 = 1;
const R_X86_64_PC32: u32 = 2;
const R_X86_64_PLT32: u32 = 4;
const R_X86_64_32: u32 = 10;
const R_X86_64_32S: u32 = 11;
const R_X86_64_PC64: u32 = 24;

/// The bytes of the kernel's 2- and 5-byte nops (`x86_nops[]` of the pinned kernel).
const NOP2: [u8; 2] = [0x66, 0x90];
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const LOCK: u8 = 0xf0;
const DS: u8 = 0x3e;

/// How a relocation site holds its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// 32 bits, relative to the site (`R_X86_64_PC32`, `R_X86_64_PLT32`).
    Pc32,
    /// 64 bits, relative to the site.
    Pc64,
    /// 32 bits, zero-extended.
    Abs32,
    /// 32 bits, sign-extended.
    Abs32S,
    /// 64 bits.
    Abs64,
}

impl SiteKind {
    fn of(r_type: u32) -> Option<Option<SiteKind>> {
        Some(Some(match r_type {
            R_X86_64_NONE => return Some(None),
            R_X86_64_64 => SiteKind::Abs64,
            R_X86_64_PC32 | R_X86_64_PLT32 => SiteKind::Pc32,
            R_X86_64_32 => SiteKind::Abs32,
            R_X86_64_32S => SiteKind::Abs32S,
            R_X86_64_PC64 => SiteKind::Pc64,
            _ => return None,
        }))
    }

    /// Bytes the site holds.
    pub fn width(self) -> u64 {
        match self {
            SiteKind::Pc32 | SiteKind::Abs32 | SiteKind::Abs32S => 4,
            SiteKind::Pc64 | SiteKind::Abs64 => 8,
        }
    }

    /// The value the site's bytes hold, at address `at`: S + A of the relocation (for a
    /// site relative to itself, the bytes plus `at`).
    fn decode(self, bytes: &[u8], at: u64) -> u64 {
        let mut b = [0u8; 8];
        b[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
        let v64 = u64::from_le_bytes(b);
        let v32 = v64 as u32;
        match self {
            SiteKind::Pc32 => at.wrapping_add(i64::from(v32 as i32) as u64),
            SiteKind::Pc64 => at.wrapping_add(v64),
            SiteKind::Abs32 => u64::from(v32),
            SiteKind::Abs32S => i64::from(v32 as i32) as u64,
            SiteKind::Abs64 => v64,
        }
    }

    /// The bytes that hold `target` (S + A) at a site at `at`; `None` if no value of
    /// this kind can.
    fn encode(self, target: u64, at: u64) -> Option<Vec<u8>> {
        Some(match self {
            SiteKind::Pc32 => i32::try_from(target.wrapping_sub(at) as i64)
                .ok()?
                .to_le_bytes()
                .to_vec(),
            SiteKind::Pc64 => target.wrapping_sub(at).to_le_bytes().to_vec(),
            SiteKind::Abs32 => u32::try_from(target).ok()?.to_le_bytes().to_vec(),
            SiteKind::Abs32S => i32::try_from(target as i64).ok()?.to_le_bytes().to_vec(),
            SiteKind::Abs64 => target.to_le_bytes().to_vec(),
        })
    }
}

/// A relocation site in the core text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Offset from the core text's start.
    pub offset: u64,
    /// How it holds its value.
    pub kind: SiteKind,
    /// The relocation's addend: the site holds the symbol's address plus this (a call's
    /// is -4), so the symbol — what is placed — is the value minus it.
    pub addend: u64,
}

/// A jump label's site in the core text: a `nop` or a `jmp` to `target` of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpLabel {
    /// Offset of the site from the core text's start.
    pub offset: u64,
    /// 2 or 5.
    pub len: u64,
    /// Offset of the jump's target from the core text's start.
    pub target: u64,
}

/// What a `.ko` says about its core text once loaded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KoText {
    /// Size of the core text as the module loader lays it out (whole pages).
    pub text_size: u64,
    /// Relocation sites, by offset.
    pub sites: Vec<Site>,
    /// [start, end) ranges the kernel rewrites at load (static calls, thunks, ftrace).
    pub rewritten: Vec<(u64, u64)>,
    /// Lock prefixes (`.smp_locks`).
    pub locks: Vec<u64>,
    /// Jump labels (`__jump_table`).
    pub jump_labels: Vec<JumpLabel>,
}

/// Why a `.ko` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KoError {
    /// Its ELF structure.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// It has no symbol table.
    #[error("the module has no symbol table")]
    NoSymbols,
    /// Its core text is larger than [`MAX_TEXT`], or its sections do not add up.
    #[error("the module's core text is larger than {MAX_TEXT:#x} bytes")]
    TooLarge,
    /// A section's alignment is not a power of two.
    #[error("section {0} has an alignment that is not a power of two")]
    Alignment(String),
    /// A relocation the module loader would not apply.
    #[error("relocation type {r_type} in {section} is not one the module loader applies")]
    RelocationType {
        /// The `R_X86_64_*` number.
        r_type: u32,
        /// The relocation section.
        section: String,
    },
    /// A relocation outside its section, or naming a symbol past the table.
    #[error("a relocation in {0} lies outside its section or names no symbol")]
    Relocation(String),
    /// A jump label whose site holds neither a jump nor a nop.
    #[error("the jump label at text offset {0:#x} is neither a 2- nor a 5-byte jmp or nop")]
    JumpLabel(u64),
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at.saturating_add(8)) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

impl KoText {
    /// Reads `ko`, a kernel module file of the pinned kernel, the way that kernel's module
    /// loader lays out its core text (6.1 `layout_sections`: every allocated executable
    /// section not named `.init*`, in section order, each at its alignment; the whole
    /// rounded up to pages).
    pub fn parse(ko: &[u8]) -> Result<KoText, KoError> {
        let elf = Elf::parse(ko)?;
        let sections = elf.sections();
        let mut placed: Vec<Option<u64>> = vec![None; sections.len()];
        let mut size = 0u64;
        for (at, s) in placed.iter_mut().zip(sections) {
            let text = SHF_ALLOC | SHF_EXECINSTR;
            if s.flags & text != text || s.name.starts_with(".init") {
                continue;
            }
            let align = s.addralign.max(1);
            if !align.is_power_of_two() {
                return Err(KoError::Alignment(s.name.clone()));
            }
            let start = align_up(size, align).ok_or(KoError::TooLarge)?;
            *at = Some(start);
            size = start.checked_add(s.size).ok_or(KoError::TooLarge)?;
            if size > MAX_TEXT {
                return Err(KoError::TooLarge);
            }
        }
        let text_size = align_up(size, PAGE).ok_or(KoError::TooLarge)?;
        // The text as the file has it, for the jump labels' sizes.
        let mut image = vec![0u8; size as usize];
        for (at, s) in placed.iter().zip(sections) {
            if let Some(at) = at {
                let data = elf.data(s)?;
                image[*at as usize..][..data.len()].copy_from_slice(data);
            }
        }
        let symtab = sections
            .iter()
            .find(|s| s.sh_type == SHT_SYMTAB)
            .ok_or(KoError::NoSymbols)?;
        let symbols = elf.data(symtab)?;
        // Where symbol `index` + `addend` lies in the core text, if it does.
        let in_text = |index: u64, addend: u64| -> Result<Option<u64>, ()> {
            let at = usize::try_from(index)
                .ok()
                .and_then(|i| i.checked_mul(SYM_SIZE))
                .ok_or(())?;
            let sym = symbols.get(at..at + SYM_SIZE).ok_or(())?;
            let shndx = usize::from(le_u16(sym, 6));
            let value = le_u64(sym, 8);
            let Some(Some(base)) = placed.get(shndx) else {
                return Ok(None);
            };
            let off = base.wrapping_add(value).wrapping_add(addend);
            Ok(Some(off).filter(|&o| o < size))
        };
        let mut ko_text = KoText {
            text_size,
            ..KoText::default()
        };
        let mut jumps: BTreeMap<u64, (Option<u64>, Option<u64>)> = BTreeMap::new();
        for rela in sections.iter().filter(|s| s.sh_type == SHT_RELA) {
            let Some(target) = usize::try_from(rela.info)
                .ok()
                .and_then(|i| sections.get(i).map(|s| (i, s)))
            else {
                continue;
            };
            let bad = || KoError::Relocation(rela.name.clone());
            for entry in elf.data(rela)?.chunks_exact(RELA_SIZE) {
                let (r_offset, r_info) = (le_u64(entry, 0), le_u64(entry, 8));
                let addend = le_u64(entry, 16);
                let r_type = r_info as u32;
                if let Some(Some(base)) = placed.get(target.0) {
                    let kind = SiteKind::of(r_type).ok_or_else(|| KoError::RelocationType {
                        r_type,
                        section: rela.name.clone(),
                    })?;
                    let Some(kind) = kind else { continue };
                    let end = r_offset.checked_add(kind.width()).ok_or_else(bad)?;
                    if end > target.1.size {
                        return Err(bad());
                    }
                    ko_text.sites.push(Site {
                        offset: base + r_offset,
                        kind,
                        addend,
                    });
                    continue;
                }
                let site = in_text(r_info >> 32, addend).map_err(|()| bad())?;
                let Some(site) = site else { continue };
                let rewritten = &mut ko_text.rewritten;
                // The length byte of an alternative's or a paravirt site's entry.
                let entry_len = |size: u64, at: u64| -> Result<u64, KoError> {
                    let data = elf.data(target.1)?;
                    let i = (r_offset - r_offset % size)
                        .checked_add(at)
                        .ok_or_else(bad)?;
                    let len = usize::try_from(i)
                        .ok()
                        .and_then(|i| data.get(i))
                        .ok_or_else(bad)?;
                    Ok(u64::from(*len))
                };
                match target.1.name.as_str() {
                    // 6.1's `struct alt_instr` (12 bytes, `instrlen` at 10) and
                    // `struct paravirt_patch_site` (16 bytes, `len` at 9).
                    ".altinstructions" if r_offset % 12 == 0 => {
                        rewritten.push((site, site + entry_len(12, 10)?));
                    }
                    ".parainstructions" if r_offset % 16 == 0 => {
                        rewritten.push((site, site + entry_len(16, 9)?));
                    }
                    ".static_call_sites" if r_offset % 8 == 0 => rewritten.push((site, site + 5)),
                    // A call, a jmp or (6 bytes) a jcc to a thunk.
                    ".retpoline_sites" => rewritten.push((site, site + 6)),
                    ".return_sites" | "__mcount_loc" => rewritten.push((site, site + 5)),
                    ".smp_locks" => ko_text.locks.push(site),
                    "__jump_table" => {
                        let entry = jumps.entry(r_offset / 16).or_default();
                        match r_offset % 16 {
                            0 => entry.0 = Some(site),
                            4 => entry.1 = Some(site),
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
        }
        for (code, target) in jumps.into_values() {
            let (Some(offset), Some(target)) = (code, target) else {
                continue;
            };
            let len = match image.get(offset as usize) {
                Some(0xeb | 0x66) => 2,
                Some(0xe9 | 0x0f) => 5,
                _ => return Err(KoError::JumpLabel(offset)),
            };
            if offset + len > size {
                return Err(KoError::JumpLabel(offset));
            }
            ko_text.jump_labels.push(JumpLabel {
                offset,
                len,
                target,
            });
        }
        ko_text.sites.sort_by_key(|s| s.offset);
        ko_text.rewritten.sort_unstable();
        ko_text.locks.sort_unstable();
        Ok(ko_text)
    }

    fn rewritten_at(&self, start: u64, end: u64) -> bool {
        self.rewritten.iter().any(|&(s, e)| start < e && s < end)
    }
}

/// A module as one kernel has it loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModule {
    /// `module.name`.
    pub name: String,
    /// `module.core_layout.base`.
    pub base: u64,
    /// `module.core_layout.size`.
    pub size: u64,
}

/// Where an address leads, in terms both kernels share.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place<'a> {
    /// In the kernel-image map, at this link address: each kernel has it moved by its
    /// own KASLR slide.
    Image(u64),
    /// Outside the image map and every module: the same address in both.
    Absolute(u64),
    /// `offset` bytes into the core image of the module called `name`.
    InModule(&'a str, u64),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Image(a) | Place::Absolute(a) => write!(f, "{a:#x}"),
            Place::InModule(name, off) => write!(f, "{name}+{off:#x}"),
        }
    }
}

/// Where `addr`, an address in the kernel of `copy`, leads.
fn place<'a>(copy: &TextCopy<'a>, addr: u64) -> Place<'a> {
    let image_map = START_KERNEL_MAP..START_KERNEL_MAP + KERNEL_IMAGE_SIZE;
    if let Some(m) = copy
        .modules
        .iter()
        .find(|m| addr >= m.base && addr - m.base < m.size)
    {
        return Place::InModule(&m.name, addr - m.base);
    }
    match addr.checked_sub(copy.slide) {
        Some(link) if image_map.contains(&addr) && image_map.contains(&link) => Place::Image(link),
        _ => Place::Absolute(addr),
    }
}

/// The address `place` has in the kernel of `copy`.
fn address(copy: &TextCopy<'_>, place: &Place<'_>) -> Option<u64> {
    match *place {
        Place::Image(link) => link.checked_add(copy.slide),
        Place::Absolute(a) => Some(a),
        Place::InModule(name, off) => {
            let mut named = copy.modules.iter().filter(|m| m.name == name);
            let m = named.next().filter(|_| named.next().is_none())?;
            (off < m.size).then(|| m.base.checked_add(off)).flatten()
        }
    }
}

/// One kernel's copy of a module's core text.
#[derive(Debug, Clone, Copy)]
pub struct TextCopy<'a> {
    /// Its kernel-virtual start (`core_layout.base`).
    pub base: u64,
    /// Its bytes, [`KoText::text_size`] of them.
    pub text: &'a [u8],
    /// Every module that kernel has loaded, this one included.
    pub modules: &'a [LoadedModule],
    /// That kernel's KASLR slide (`redirect::kaslr`): its image is at the link addresses
    /// moved by this much.
    pub slide: u64,
}

/// Why a GVM module's text is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    /// The copies are not the size the package's layout gives.
    #[error("its text is {gvm:#x} bytes, the SVM's copy {twin:#x}, the package's layout {ko:#x}")]
    Size {
        /// The package's layout's.
        ko: u64,
        /// The SVM's copy's.
        twin: u64,
        /// The GVM's.
        gvm: u64,
    },
    /// The GVM lists its name more than once, or not at its base.
    #[error("the GVM's module list names it more than once or elsewhere")]
    Listing,
    /// A byte differs outside every site.
    #[error("its text differs from the SVM's copy at offset {0:#x}")]
    Bytes(u64),
    /// A relocation site leads elsewhere than the twin's.
    #[error("the address at text offset {offset:#x} does not lead to {expected}, as the SVM's copy's does")]
    Relocation {
        /// Offset of the site.
        offset: u64,
        /// Where the twin's leads.
        expected: String,
    },
    /// A jump label holds neither a nop nor a jump to its target.
    #[error("the jump label at text offset {0:#x} is neither a nop nor a jump to its target")]
    JumpLabel(u64),
    /// A lock prefix site holds another byte.
    #[error("the lock prefix at text offset {0:#x} is neither lock nor ds")]
    Lock(u64),
}

fn jump(len: u64, from: u64, to: u64) -> Option<Vec<u8>> {
    let rel = to.wrapping_sub(from + len) as i64;
    match len {
        2 => Some(vec![0xeb, i8::try_from(rel).ok()? as u8]),
        5 => {
            let mut j = vec![0xe9];
            j.extend_from_slice(&i32::try_from(rel).ok()?.to_le_bytes());
            Some(j)
        }
        _ => None,
    }
}

/// Checks the GVM's copy of the module called `name` against the SVM's (`twin`), by
/// the sites `ko` names (see the module docs).
pub fn verify(
    ko: &KoText,
    name: &str,
    twin: &TextCopy<'_>,
    gvm: &TextCopy<'_>,
) -> Result<(), Mismatch> {
    let n = ko.text_size;
    let len = |t: &TextCopy<'_>| u64::try_from(t.text.len()).unwrap_or(u64::MAX);
    if len(twin) != n || len(gvm) != n {
        return Err(Mismatch::Size {
            ko: n,
            twin: len(twin),
            gvm: len(gvm),
        });
    }
    if address(gvm, &Place::InModule(name, 0)) != Some(gvm.base) {
        return Err(Mismatch::Listing);
    }
    // Offsets below are < n, which is the length of both slices.
    let range = |start: u64, width: u64| -> Option<std::ops::Range<usize>> {
        let end = start.checked_add(width).filter(|&e| e <= n)?;
        Some(start as usize..end as usize)
    };
    let mut covered = vec![false; n as usize];
    for j in &ko.jump_labels {
        let r = range(j.offset, j.len).ok_or(Mismatch::JumpLabel(j.offset))?;
        let g = &gvm.text[r.clone()];
        let ok = g == &twin.text[r.clone()]
            || (j.len == 2 && g == NOP2)
            || (j.len == 5 && g == NOP5)
            || jump(j.len, j.offset, j.target).is_some_and(|b| b == g);
        if !ok {
            return Err(Mismatch::JumpLabel(j.offset));
        }
        covered[r].fill(true);
    }
    for &l in &ko.locks {
        let i = range(l, 1).ok_or(Mismatch::Lock(l))?.start;
        if covered[i] {
            continue;
        }
        if ![LOCK, DS].contains(&gvm.text[i]) || ![LOCK, DS].contains(&twin.text[i]) {
            return Err(Mismatch::Lock(l));
        }
        covered[i] = true;
    }
    for s in &ko.sites {
        let width = s.kind.width();
        let r = range(s.offset, width).ok_or(Mismatch::Bytes(s.offset))?;
        if covered[r.clone()].iter().all(|&c| c) {
            continue;
        }
        let (g, t) = (&gvm.text[r.clone()], &twin.text[r.clone()]);
        // The symbol the twin's value names, placed; the GVM's must name the same place.
        let symbol = s
            .kind
            .decode(t, twin.base.wrapping_add(s.offset))
            .wrapping_sub(s.addend);
        let to = place(twin, symbol);
        let relocated = address(gvm, &to)
            .and_then(|symbol| {
                let value = symbol.wrapping_add(s.addend);
                s.kind.encode(value, gvm.base.wrapping_add(s.offset))
            })
            .is_some_and(|b| b == g);
        // The scan of the rewritten ranges only where the cheap tests leave it a say.
        let rewritten = || g == t && ko.rewritten_at(s.offset, s.offset + width);
        if !(relocated || rewritten()) || covered[r.clone()].iter().any(|&c| c) {
            return Err(Mismatch::Relocation {
                offset: s.offset,
                expected: to.to_string(),
            });
        }
        covered[r].fill(true);
    }
    let differs = (0..n as usize).find(|&i| !covered[i] && gvm.text[i] != twin.text[i]);
    match differs {
        Some(i) => Err(Mismatch::Bytes(i as u64)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
