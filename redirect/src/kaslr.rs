//! KASLR: the kernel's own relocation table, a GVM's slide, and the trusted text moved by it.
//!
//! A kernel built with `CONFIG_RANDOMIZE_BASE` is moved by its bzImage decompressor to a
//! random 2 MiB-aligned virtual address (and, separately, a random physical one). The
//! decompressor fixes the image's absolute references with a table Kbuild
//! (`arch/x86/tools/relocs`) appends to the decompressed payload, after the ELF, when
//! `CONFIG_X86_NEED_RELOCS=y` (`arch/x86/boot/compressed/misc.c`, `handle_relocations`).
//! Read from the end of the payload backwards, it is three lists of 32-bit words, each a
//! location's link address sign-extended to 64 bits, each list ended by a zero word:
//!
//! ```text
//!   ELF image … | 0 | 64-bit relocations … | 0 | inverse 32-bit … | 0 | 32-bit … | (end)
//! ```
//!
//! A 32-bit location gets the slide added (wrapping in 32 bits), an inverse one subtracted
//! (references to per-cpu data, which does not move), a 64-bit one added.
//!
//! The redirect engine runs a copy of the trusted kernel's text; a GVM booted with KASLR runs
//! the same text moved by its slide, so the copy must be moved the same way with the same
//! table, and the table is read from the trusted (SVM's) kernel image, never from the GVM.
//! Nothing here touches guest memory: the slide's inputs (a GVM register, a GVM page walk)
//! are hostile, and are only ever checked against the image, never used to decide what runs.

use thiserror::Error;

use crate::profile::elf::{Elf, ElfError, SHF_ALLOC, SHT_NOBITS};
use crate::view::START_KERNEL_MAP;

/// The granule of a kernel's virtual slide: `CONFIG_PHYSICAL_ALIGN` (2 MiB in the pinned
/// kernels' configs), which the decompressor aligns the random address to.
pub const SLIDE_ALIGN: u64 = 0x20_0000;
/// The kernel-image map with `CONFIG_RANDOMIZE_BASE` (`KERNEL_IMAGE_SIZE`, 1 GiB from
/// `__START_KERNEL_map`): a slid image ends inside it.
pub const KERNEL_IMAGE_SIZE: u64 = 1 << 30;

/// Why a relocation table could not be read or applied.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RelocError {
    /// The payload does not start with a readable ELF image.
    #[error("the kernel payload is not an ELF image: {0}")]
    Elf(#[from] ElfError),
    /// The ELF names no loaded section in the kernel-image map.
    #[error("the kernel image has no loaded section in the kernel map")]
    NoImage,
    /// The payload ends before one of the three lists' zero terminators.
    #[error("the kernel's relocation table has no end to its {0} list (a truncated payload)")]
    Unterminated(&'static str),
    /// The lists, read from the end, reach back into the ELF image: no table follows it.
    #[error("no relocation table follows the kernel's ELF image (ending at {elf_end:#x}; the lists reach back to {table_start:#x}): not a relocatable kernel's payload")]
    NoTable {
        /// The ELF's end in the payload.
        elf_end: u64,
        /// Where the lists would start.
        table_start: u64,
    },
    /// An entry names a place outside the image ([`Relocs::image`]).
    #[error("relocation at {0:#x} lies outside the kernel image")]
    OutsideImage(u64),
    /// An entry's word starts inside the copy but ends past it.
    #[error("relocation at {addr:#x} straddles the end of the copy at {end:#x}")]
    Straddles {
        /// The location's link address.
        addr: u64,
        /// The first link address past the copy.
        end: u64,
    },
}

/// Why a slide was not believed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SlideError {
    /// LSTAR is below the image's own entry point.
    #[error("the GVM's LSTAR {lstar:#x} lies below entry_SYSCALL_64's link address {link:#x}")]
    BelowLink {
        /// The GVM CPU's LSTAR.
        lstar: u64,
        /// `entry_SYSCALL_64` in the image.
        link: u64,
    },
    /// The slide is not a multiple of [`SLIDE_ALIGN`].
    #[error("the GVM's kernel slide {0:#x} is not a multiple of 2 MiB")]
    Unaligned(u64),
    /// The slid image would end past the kernel-image map.
    #[error("the GVM's kernel slide {0:#x} puts the image past the 1 GiB kernel map")]
    TooFar(u64),
}

/// A relocatable kernel's relocation table: the link addresses of the places a slide
/// changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relocs {
    /// Places of 32-bit absolute references: `+= slide`.
    pub abs32: Vec<u64>,
    /// Places of 32-bit references to per-cpu data: `-= slide`.
    pub inverse32: Vec<u64>,
    /// Places of 64-bit absolute references: `+= slide`.
    pub abs64: Vec<u64>,
    /// The end of the image's loaded sections in the kernel map, `.bss` and `.brk`
    /// included (`_end`): a slide keeps it inside the map.
    pub image_end: u64,
}

/// A table word as the link address it names.
fn sign_extend(word: u32) -> u64 {
    i64::from(word as i32) as u64
}

impl Relocs {
    /// Reads the table at the end of a decompressed payload (`vmlinux` as
    /// `boot::bzimage` extracts it, or a file made from a bzImage the same way): after the
    /// ELF image, never inside it. Every entry must name a place in the image, as the
    /// decompressor demands: from its lowest loaded address in the kernel map to `.bss`
    /// (or the end of its last loaded section). The walk is bounded by the payload.
    pub fn parse(payload: &[u8]) -> Result<Relocs, RelocError> {
        let elf = Elf::parse(payload)?;
        let (lo, hi) = image_range(&elf).ok_or(RelocError::NoImage)?;
        let mut words = payload
            .rchunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let mut read = 0u64;
        let mut list = |name| -> Result<Vec<u64>, RelocError> {
            let mut out = Vec::new();
            loop {
                read += 1;
                match words.next() {
                    None => return Err(RelocError::Unterminated(name)),
                    Some(0) => return Ok(out),
                    Some(word) => {
                        let addr = sign_extend(word);
                        if !(lo..hi).contains(&addr) {
                            return Err(RelocError::OutsideImage(addr));
                        }
                        out.push(addr);
                    }
                }
            }
        };
        // The lists' order, from the end: 32-bit, inverse 32-bit, 64-bit.
        let abs32 = list("32-bit")?;
        let inverse32 = list("inverse 32-bit")?;
        let abs64 = list("64-bit")?;
        // rchunks_exact leaves len % 4 bytes at the front, so the words read end here.
        let table_start = (payload.len() as u64).saturating_sub(read.saturating_mul(4));
        if table_start < elf.end() {
            return Err(RelocError::NoTable {
                elf_end: elf.end(),
                table_start,
            });
        }
        Ok(Relocs {
            abs32,
            inverse32,
            abs64,
            image_end: image_end(&elf).unwrap_or(hi),
        })
    }

    /// The places that lie whole in the link range [`start`, `end`): what a copy of that
    /// range can be moved by and checked at.
    pub fn within(&self, start: u64, end: u64) -> Relocs {
        let held = |width: u64| {
            move |addr: &&u64| **addr >= start && addr.checked_add(width).is_some_and(|e| e <= end)
        };
        Relocs {
            abs32: self.abs32.iter().filter(held(4)).copied().collect(),
            inverse32: self.inverse32.iter().filter(held(4)).copied().collect(),
            abs64: self.abs64.iter().filter(held(8)).copied().collect(),
            image_end: self.image_end,
        }
    }

    /// How many places the table names.
    pub fn len(&self) -> usize {
        self.abs32.len() + self.inverse32.len() + self.abs64.len()
    }

    /// Whether the table names no place (a kernel that cannot be moved).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves `bytes`, a copy of the image's link addresses [`base`, `base + len`), by
    /// `slide` as the decompressor moves the image: the places inside the copy are changed,
    /// the others (data the copy does not hold) left alone. Returns how many were changed.
    pub fn apply(&self, bytes: &mut [u8], base: u64, slide: u64) -> Result<usize, RelocError> {
        let end = base.saturating_add(bytes.len() as u64);
        let mut changed = 0;
        let mut patch =
            |addr: u64, width: usize, f: &dyn Fn(&mut [u8])| -> Result<(), RelocError> {
                if addr < base || addr >= end {
                    return Ok(());
                }
                // addr - base < bytes.len(), so it fits in usize.
                let at = (addr - base) as usize;
                let word = at
                    .checked_add(width)
                    .and_then(|e| bytes.get_mut(at..e))
                    .ok_or(RelocError::Straddles { addr, end })?;
                f(word);
                changed += 1;
                Ok(())
            };
        let add32 = |delta: u32| {
            move |w: &mut [u8]| {
                let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]).wrapping_add(delta);
                w.copy_from_slice(&v.to_le_bytes());
            }
        };
        // The decompressor adds the low 32 bits of the slide to a 32-bit place
        // (`*(uint32_t *)ptr += delta`) and subtracts them from an inverse one.
        let up = add32(slide as u32);
        let down = add32((slide as u32).wrapping_neg());
        for &addr in &self.abs32 {
            patch(addr, 4, &up)?;
        }
        for &addr in &self.inverse32 {
            patch(addr, 4, &down)?;
        }
        for &addr in &self.abs64 {
            patch(addr, 8, &|w: &mut [u8]| {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                w.copy_from_slice(&u64::from_le_bytes(b).wrapping_add(slide).to_le_bytes());
            })?;
        }
        Ok(changed)
    }
}

/// How a GVM's own text agreed with the trusted text moved by a claimed slide, at the
/// places the slide changes (elsewhere the bytes do not depend on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteCheck {
    /// Places whose bytes in the GVM's text are the moved trusted ones.
    pub agree: usize,
    /// Places whose bytes differ.
    pub differ: usize,
    /// Places of the copies' range that one of them does not hold whole (a short copy).
    pub skipped: usize,
}

impl SiteCheck {
    /// Whether the slide checks out: every place of the range was compared, and at least
    /// `min_per_mille` (at most 1000) of them agree. A GVM that patched some functions of
    /// its text disagrees at their places; a wrong slide at nearly all, provided both
    /// slides passed [`virtual_slide`] (a 2 MiB-aligned error smaller than 4 GiB changes
    /// every 32-bit place).
    pub fn holds(&self, min_per_mille: usize) -> bool {
        let (agree, differ) = (self.agree as u128, self.differ as u128);
        let total = agree + differ;
        let min = min_per_mille.min(1000) as u128;
        self.skipped == 0 && total > 0 && agree * 1000 >= total * min
    }
}

impl Relocs {
    /// Compares `gvm`, the GVM's text as found at the claimed place, with `moved`, the
    /// trusted text moved by the claimed slide (both start at link address `base`), at
    /// every place of the table from `base` to the end of the longer of the two; a place
    /// one of them does not hold whole is counted as skipped.
    pub fn check_sites(&self, moved: &[u8], gvm: &[u8], base: u64) -> SiteCheck {
        let mut check = SiteCheck {
            agree: 0,
            differ: 0,
            skipped: 0,
        };
        let len = moved.len().max(gvm.len());
        let lists = [(&self.abs32, 4), (&self.inverse32, 4), (&self.abs64, 8)];
        for (list, width) in lists {
            for &addr in list {
                let Some(at) = addr.checked_sub(base).and_then(|a| usize::try_from(a).ok()) else {
                    continue;
                };
                if at >= len {
                    continue;
                }
                let range = at..at.saturating_add(width);
                match (moved.get(range.clone()), gvm.get(range)) {
                    (Some(a), Some(b)) if a == b => check.agree += 1,
                    (Some(_), Some(_)) => check.differ += 1,
                    _ => check.skipped += 1,
                }
            }
        }
        check
    }
}

/// The link range relocations may name: the lowest loaded address in the kernel map to
/// `.bss` (the decompressor's `__bss_start` bound), or to the end of the last loaded section
/// with file data when there is no `.bss`.
fn image_range(elf: &Elf<'_>) -> Option<(u64, u64)> {
    let in_map =
        |s: &&crate::profile::Section| s.flags & SHF_ALLOC != 0 && s.addr >= START_KERNEL_MAP;
    let lo = elf.sections().iter().filter(in_map).map(|s| s.addr).min()?;
    let hi = match elf.section(".bss").filter(|s| in_map(s)) {
        Some(bss) => bss.addr,
        None => elf
            .sections()
            .iter()
            .filter(in_map)
            .filter(|s| s.sh_type != SHT_NOBITS)
            .filter_map(|s| s.addr.checked_add(s.size))
            .max()?,
    };
    (lo < hi).then_some((lo, hi))
}

/// The image's end as the decompressor's KASLR bounds it, `_end`: the end of `.brk`, else
/// of `.bss`, else of the last loaded section in the kernel map. (`.init.scratch`, loaded
/// past `_end`, does not count: a slide may put it past the map.)
fn image_end(elf: &Elf<'_>) -> Option<u64> {
    let in_map =
        |s: &&crate::profile::Section| s.flags & SHF_ALLOC != 0 && s.addr >= START_KERNEL_MAP;
    [".brk", ".bss"]
        .iter()
        .find_map(|name| elf.section(name).filter(|s| in_map(s)))
        .map(|s| s.addr.checked_add(s.size))
        .unwrap_or_else(|| {
            elf.sections()
                .iter()
                .filter(in_map)
                .filter_map(|s| s.addr.checked_add(s.size))
                .max()
        })
}

/// The GVM kernel's virtual slide, from the address its CPU's LSTAR holds (where a
/// `syscall` enters: `entry_SYSCALL_64`, slid) and that symbol's link address, for an image
/// whose link range ends at `image_end`. The GVM chooses its LSTAR, so the result is only a
/// claim: it must be 2 MiB-aligned and keep the image in the kernel map here, and the
/// caller checks it against the GVM's own text before using it.
pub fn virtual_slide(lstar: u64, entry_link: u64, image_end: u64) -> Result<u64, SlideError> {
    let slide = lstar.checked_sub(entry_link).ok_or(SlideError::BelowLink {
        lstar,
        link: entry_link,
    })?;
    if slide % SLIDE_ALIGN != 0 {
        return Err(SlideError::Unaligned(slide));
    }
    let fits = image_end
        .checked_add(slide)
        .is_some_and(|e| e > START_KERNEL_MAP && e - START_KERNEL_MAP <= KERNEL_IMAGE_SIZE);
    if !fits {
        return Err(SlideError::TooFar(slide));
    }
    Ok(slide)
}

/// Bytes of a sample of the text checked at every candidate slide before the whole text
/// is: 256 KiB, 1 MiB in (past the entry code), over a thousand places in the pinned image.
const SAMPLE: (usize, usize) = (1 << 20, 256 << 10);

/// Finds a GVM kernel's virtual slide: the first of `claim` (what its LSTAR says, if that
/// passed [`virtual_slide`]) and then every 2 MiB step that keeps the image (ending at link
/// address `image_end`) in the kernel map, under which the GVM's text agrees with `text`
/// (the trusted text, at link address `link`) moved by it, at `min_per_mille` of the
/// table's places: first over a sample, then over the whole text. `read` reads the GVM's
/// memory at a kernel-virtual address through its own tables (hostile; false where it
/// cannot). With the whole text's check; `None` if no slide checks out.
pub fn find_slide(
    relocs: &Relocs,
    text: &[u8],
    link: u64,
    image_end: u64,
    claim: Option<u64>,
    min_per_mille: usize,
    read: impl Fn(u64, &mut [u8]) -> bool,
) -> Option<(u64, SiteCheck)> {
    let steps = (0..KERNEL_IMAGE_SIZE / SLIDE_ALIGN)
        .map(|i| i * SLIDE_ALIGN)
        .filter(|&v| virtual_slide(image_end.saturating_add(v), image_end, image_end).is_ok())
        .filter(|&v| Some(v) != claim);
    let len = text.len();
    let sample = len.min(SAMPLE.0)..len.min(SAMPLE.0 + SAMPLE.1);
    let at = |offset: usize| link.checked_add(offset as u64);
    let sample_relocs = relocs.within(at(sample.start)?, at(sample.end)?);
    // A text with no place in the sample (shorter than the sample's offset) is checked
    // whole at once.
    let sampled = !sample_relocs.is_empty();
    let agrees = |relocs: &Relocs, range: std::ops::Range<usize>, slide: u64| {
        let base = at(range.start)?;
        let mut moved = text.get(range)?.to_vec();
        relocs.apply(&mut moved, base, slide).ok()?;
        let mut theirs = vec![0u8; moved.len()];
        read(base.checked_add(slide)?, &mut theirs).then_some(())?;
        Some(relocs.check_sites(&moved, &theirs, base)).filter(|c| c.holds(min_per_mille))
    };
    // A GVM may plant the moved sample at every step, each then checked whole: a few
    // whole-text checks are allowed, not hundreds (one slide is the GVM's).
    let mut whole_checks = 0;
    for slide in claim.into_iter().chain(steps) {
        if sampled && agrees(&sample_relocs, sample.clone(), slide).is_none() {
            continue;
        }
        if whole_checks == MAX_WHOLE_CHECKS {
            return None;
        }
        whole_checks += 1;
        if let Some(check) = agrees(relocs, 0..len, slide) {
            return Some((slide, check));
        }
    }
    None
}

/// How many candidate slides whose sample agreed [`find_slide`] checks over the whole text.
const MAX_WHOLE_CHECKS: usize = 4;

/// Whether `gvm`, a GVM's text read where a kernel without a relocation table must be (at
/// its link address), holds `trusted`'s bytes at `min_per_mille` of them: that kernel
/// cannot have moved, and this says the GVM has not moved another in (a `kexec`).
pub fn unmoved_text_agrees(trusted: &[u8], gvm: &[u8], min_per_mille: usize) -> bool {
    let same = trusted.iter().zip(gvm).filter(|(a, b)| a == b).count() as u128;
    let min = min_per_mille.min(1000) as u128;
    !trusted.is_empty() && trusted.len() == gvm.len() && same * 1000 >= trusted.len() as u128 * min
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::elf::tests::build_elf;

    const TEXT: u64 = 0xffff_ffff_8100_0000;

    /// A kernel ELF: 0x100 bytes of `.text` at [`TEXT`], `.bss` at `TEXT + 0x1000` (so
    /// places may lie in [TEXT, TEXT + 0x1000)), and a section without an address.
    fn elf() -> Vec<u8> {
        build_elf(&[
            (".text", 1, TEXT, &[0x90; 0x100]),
            (".BTF", 1, 0, b"types"),
            (".bss", SHT_NOBITS, TEXT + 0x1000, &[0; 0x40]),
        ])
    }

    /// A payload: `elf` bytes, then the three lists as the relocs tool writes them.
    fn payload(elf: &[u8], abs64: &[u64], inverse32: &[u64], abs32: &[u64]) -> Vec<u8> {
        let mut out = elf.to_vec();
        let word = |out: &mut Vec<u8>, a: u64| out.extend_from_slice(&(a as u32).to_le_bytes());
        word(&mut out, 0);
        // Each list is read from the end backwards: written in reverse.
        for &a in abs64.iter().rev() {
            word(&mut out, a);
        }
        word(&mut out, 0);
        for &a in inverse32.iter().rev() {
            word(&mut out, a);
        }
        word(&mut out, 0);
        for &a in abs32.iter().rev() {
            word(&mut out, a);
        }
        out
    }

    #[test]
    fn the_three_lists_are_read_from_the_end() {
        let p = payload(&elf(), &[TEXT + 0x40], &[TEXT + 8, TEXT + 12], &[TEXT + 4]);
        let r = Relocs::parse(&p).unwrap();
        assert_eq!(r.abs32, vec![TEXT + 4]);
        assert_eq!(r.inverse32, vec![TEXT + 8, TEXT + 12]);
        assert_eq!(r.abs64, vec![TEXT + 0x40]);
        assert_eq!(r.len(), 4);
        // The image ends with .bss.
        assert_eq!(r.image_end, TEXT + 0x1040);
        // Empty lists are a table too (a kernel with nothing to move), and a stray byte
        // between the ELF and the table is not read.
        let mut padded = elf();
        padded.push(0xaa);
        let p = payload(&padded, &[], &[], &[TEXT + 0xffc]);
        assert_eq!(Relocs::parse(&p).unwrap().abs32, vec![TEXT + 0xffc]);
    }

    #[test]
    fn a_slide_moves_each_kind_as_the_decompressor_does() {
        let r = Relocs {
            abs32: vec![TEXT],
            inverse32: vec![TEXT + 4],
            abs64: vec![TEXT + 8],
            image_end: TEXT + 0x1000,
        };
        let mut text = Vec::new();
        text.extend_from_slice(&0x8100_1234u32.to_le_bytes()); // mov $sym, %eax (sign-extended)
        text.extend_from_slice(&0x0000_2000u32.to_le_bytes()); // a per-cpu offset
        text.extend_from_slice(&(TEXT + 0x100).to_le_bytes());
        text.extend_from_slice(&[0xcc; 4]); // nothing to move
        let slide = 0x1e00_0000;
        assert_eq!(r.apply(&mut text, TEXT, slide).unwrap(), 3);
        assert_eq!(text[0..4], 0x9f00_1234u32.to_le_bytes());
        assert_eq!(
            text[4..8],
            0x0000_2000u32.wrapping_sub(0x1e00_0000).to_le_bytes()
        );
        assert_eq!(text[8..16], (TEXT + 0x100 + slide).to_le_bytes());
        assert_eq!(text[16..], [0xcc; 4]);
        // Back again: the same table with the slide undone gives the original bytes.
        r.apply(&mut text, TEXT, slide.wrapping_neg()).unwrap();
        assert_eq!(text[0..4], 0x8100_1234u32.to_le_bytes());
        assert_eq!(text[4..8], 0x0000_2000u32.to_le_bytes());
        assert_eq!(text[8..16], (TEXT + 0x100).to_le_bytes());
    }

    /// A 1.5 MiB text at [`TEXT`] with a 32-bit reference to itself every 64 bytes and a
    /// 64-bit one every 4 KiB (one straddling the sample's end), and its table.
    fn text_with_places() -> (Vec<u8>, Relocs) {
        let len = 0x18_0000usize;
        let mut text: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = Relocs::default();
        for off in (0..len - 8).step_by(64) {
            let target = (TEXT + off as u64) as u32;
            text[off..off + 4].copy_from_slice(&target.to_le_bytes());
            r.abs32.push(TEXT + off as u64);
        }
        let straddling = SAMPLE.0 + SAMPLE.1 - 4;
        for off in (32..len - 8).step_by(4096).chain([straddling]) {
            text[off..off + 8].copy_from_slice(&(TEXT + off as u64).to_le_bytes());
            r.abs64.push(TEXT + off as u64);
        }
        (text, r)
    }

    /// A GVM whose kernel map holds `gvm` at `at` (and nothing else readable).
    fn gvm_at(gvm: Vec<u8>, at: u64) -> impl Fn(u64, &mut [u8]) -> bool {
        move |va: u64, buf: &mut [u8]| {
            let Some(off) = va.checked_sub(at).and_then(|o| usize::try_from(o).ok()) else {
                return false;
            };
            match gvm.get(off..off.saturating_add(buf.len())) {
                Some(bytes) if off + buf.len() <= gvm.len() => {
                    buf.copy_from_slice(bytes);
                    true
                }
                _ => false,
            }
        }
    }

    #[test]
    fn the_slide_is_found_as_claimed_behind_a_hooked_lstar_and_despite_a_patch() {
        const END: u64 = TEXT + 0x200_0000;
        let (text, r) = text_with_places();
        let slide = 0x2e00_0000;
        let mut slid = text.clone();
        r.apply(&mut slid, TEXT, slide).unwrap();
        let find = |gvm: &Vec<u8>, claim| {
            find_slide(
                &r,
                &text,
                TEXT,
                END,
                claim,
                900,
                gvm_at(gvm.clone(), TEXT + slide),
            )
        };
        let (found, check) = find(&slid, Some(slide)).unwrap();
        assert_eq!(found, slide);
        assert_eq!((check.agree, check.differ, check.skipped), (r.len(), 0, 0));
        // LSTAR hooked (its claim wrong or none): every step is tried.
        assert_eq!(find(&slid, Some(0x1000_0000)).map(|f| f.0), Some(slide));
        assert_eq!(find(&slid, None).map(|f| f.0), Some(slide));
        // A rootkit patched some functions: a few places differ, the slide stands.
        let mut patched = slid.clone();
        for off in (0..20_000).step_by(64).chain(SAMPLE.0..SAMPLE.0 + 640) {
            patched[off] ^= 0xff;
        }
        let (found, check) = find(&patched, Some(slide)).unwrap();
        assert_eq!(found, slide);
        assert!(
            check.differ > 300 && check.agree > 20 * check.differ,
            "{check:?}"
        );
    }

    #[test]
    fn no_slide_is_believed_without_the_moved_text_behind_it() {
        const END: u64 = TEXT + 0x200_0000;
        let (text, r) = text_with_places();
        let slide = 0x2e00_0000;
        // The text unmoved, at the slid place: the claim fails, and so does every step.
        let unmoved = gvm_at(text.clone(), TEXT + slide);
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, unmoved),
            None
        );
        // Moved by the slide but placed elsewhere (the GVM's tables lie): refused.
        let mut slid = text.clone();
        r.apply(&mut slid, TEXT, slide).unwrap();
        let misplaced = gvm_at(slid.clone(), TEXT + slide + SLIDE_ALIGN);
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, misplaced),
            None
        );
        // Nothing readable, or only the sample: refused.
        let nothing = |_: u64, _: &mut [u8]| false;
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, nothing),
            None
        );
        let sample_only = gvm_at(slid[..SAMPLE.0 + SAMPLE.1].to_vec(), TEXT + slide);
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, sample_only),
            None
        );
        // Half the places changed: below the bar.
        let mut half = slid.clone();
        for off in (0..text.len() - 8).step_by(128) {
            half[off] ^= 0xff;
        }
        let half = gvm_at(half, TEXT + slide);
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, half),
            None
        );
    }

    #[test]
    fn a_gvm_that_plants_the_sample_everywhere_costs_a_few_whole_checks() {
        const END: u64 = TEXT + 0x200_0000;
        let (text, r) = text_with_places();
        let slide = 0x2e00_0000;
        // At every step, the sample moved by that step: each passes the sample check, and
        // none the whole text's. The search gives up after a few whole-text checks.
        let reads = std::cell::Cell::new(0usize);
        let planted = |va: u64, buf: &mut [u8]| {
            let Some(off) = va.checked_sub(TEXT) else {
                return false;
            };
            let step = off & !(SLIDE_ALIGN - 1);
            let start = (off - step) as usize;
            if buf.len() > SAMPLE.1 {
                reads.set(reads.get() + 1);
                return true; // zeros: the whole text never agrees
            }
            let mut sample = text[start..start + buf.len()].to_vec();
            r.within(TEXT + start as u64, TEXT + (start + buf.len()) as u64)
                .apply(&mut sample, TEXT + start as u64, step)
                .unwrap();
            buf.copy_from_slice(&sample);
            true
        };
        assert_eq!(
            find_slide(&r, &text, TEXT, END, Some(slide), 900, planted),
            None
        );
        assert_eq!(reads.get(), MAX_WHOLE_CHECKS);
    }

    #[test]
    fn a_text_too_short_for_the_sample_is_checked_whole() {
        const END: u64 = TEXT + 0x200_0000;
        let (text, r) = text_with_places();
        let short = &text[..0x8_0000];
        let r = r.within(TEXT, TEXT + 0x8_0000);
        let slide = 0x20_0000;
        let mut slid = short.to_vec();
        r.apply(&mut slid, TEXT, slide).unwrap();
        let found = find_slide(&r, short, TEXT, END, None, 900, gvm_at(slid, TEXT + slide));
        assert_eq!(found.map(|f| f.0), Some(slide));
    }

    #[test]
    fn an_unmoved_text_is_believed_only_where_it_is_the_trusted_one() {
        let trusted: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut gvm = trusted.clone();
        for b in gvm.iter_mut().step_by(20) {
            *b ^= 0xff; // 5% patched
        }
        assert!(unmoved_text_agrees(&trusted, &gvm, 900));
        for b in gvm.iter_mut().step_by(5) {
            *b ^= 0x55; // another 20%
        }
        assert!(!unmoved_text_agrees(&trusted, &gvm, 900));
        assert!(!unmoved_text_agrees(&trusted, &trusted[..100], 900));
        assert!(!unmoved_text_agrees(&[], &[], 900));
    }

    #[test]
    fn a_sub_table_holds_only_the_places_whole_in_its_range() {
        let r = Relocs {
            abs32: vec![TEXT, TEXT + 0xffc, TEXT + 0xffe],
            inverse32: vec![TEXT - 2],
            abs64: vec![TEXT + 0xff8, TEXT + 0xffc],
            image_end: TEXT + 0x1000,
        };
        let sub = r.within(TEXT, TEXT + 0x1000);
        assert_eq!(sub.abs32, vec![TEXT, TEXT + 0xffc]);
        assert!(sub.inverse32.is_empty());
        assert_eq!(sub.abs64, vec![TEXT + 0xff8]);
    }

    #[test]
    fn places_outside_the_copy_are_left_and_one_across_its_end_is_an_error() {
        let outside = Relocs {
            abs32: vec![TEXT - 4, TEXT + 0x1000],
            inverse32: vec![],
            abs64: vec![TEXT + 0x2000],
            image_end: TEXT + 0x3000,
        };
        let mut text = vec![0u8; 16];
        assert_eq!(outside.apply(&mut text, TEXT, SLIDE_ALIGN).unwrap(), 0);
        assert_eq!(text, vec![0u8; 16]);
        let across = Relocs {
            abs64: vec![TEXT + 12],
            ..Relocs::default()
        };
        assert_eq!(
            across.apply(&mut text, TEXT, SLIDE_ALIGN),
            Err(RelocError::Straddles {
                addr: TEXT + 12,
                end: TEXT + 16
            })
        );
    }

    #[test]
    fn hostile_or_missing_tables_are_errors() {
        assert!(matches!(
            Relocs::parse(&[0xff; 64]),
            Err(RelocError::Elf(ElfError::BadMagic))
        ));
        assert!(matches!(Relocs::parse(&[]), Err(RelocError::Elf(_))));
        // An ELF with nothing after it: the zero words the walk finds are the ELF's own.
        assert!(matches!(
            Relocs::parse(&elf()),
            Err(RelocError::NoTable { .. })
        ));
        // Places outside the image: below the kernel map, and past .bss's start.
        for place in [0x7fff_f000, TEXT - 4, TEXT + 0x1000, 0xffff_ffff_ffff_fffc] {
            let p = payload(&elf(), &[], &[], &[place]);
            assert_eq!(Relocs::parse(&p), Err(RelocError::OutsideImage(place)));
            let p = payload(&elf(), &[place], &[], &[]);
            assert_eq!(Relocs::parse(&p), Err(RelocError::OutsideImage(place)));
        }
        // An ELF with no loaded section in the kernel map has no image to name.
        let user = build_elf(&[(".text", 1, 0x40_0000, b"code")]);
        assert_eq!(
            Relocs::parse(&payload(&user, &[], &[], &[])),
            Err(RelocError::NoImage)
        );
    }

    #[test]
    fn a_gvm_text_checks_out_at_the_places_a_slide_changes() {
        // 100 places of each width and kind, 8 bytes apart.
        let r = Relocs {
            abs32: (0..100).map(|i| TEXT + i * 24).collect(),
            inverse32: (0..100).map(|i| TEXT + i * 24 + 8).collect(),
            abs64: (0..100).map(|i| TEXT + i * 24 + 16).collect(),
            image_end: TEXT + 2400,
        };
        let trusted = vec![0x11u8; 2400];
        let mut moved = trusted.clone();
        r.apply(&mut moved, TEXT, 0x20_0000).unwrap();
        let checked = |agree, differ, skipped| SiteCheck {
            agree,
            differ,
            skipped,
        };
        // The GVM moved by the same slide: every place agrees.
        let check = r.check_sites(&moved, &moved, TEXT);
        assert_eq!(check, checked(300, 0, 0));
        assert!(check.holds(990) && check.holds(5000));
        // A GVM that patched three places (one of each kind) still checks out at 99%.
        let mut patched = moved.clone();
        for at in [24, 32, 40] {
            patched[at] ^= 0xff;
        }
        let check = r.check_sites(&moved, &patched, TEXT);
        assert_eq!(check, checked(297, 3, 0));
        assert!(check.holds(990) && !check.holds(1000));
        // Another slide: no place agrees, whatever its kind.
        let mut other = trusted.clone();
        r.apply(&mut other, TEXT, 0x40_0000).unwrap();
        let check = r.check_sites(&moved, &other, TEXT);
        assert_eq!(check, checked(0, 300, 0));
        assert!(!check.holds(1));
        // A short GVM copy: the places it does not hold whole (one cut in half at 2398
        // bytes, the 64-bit place at 2392) are skipped, and then nothing holds.
        let check = r.check_sites(&moved, &moved[..2398], TEXT);
        assert_eq!(check, checked(299, 0, 1));
        assert!(!check.holds(0));
        let check = r.check_sites(&moved, &moved[..1200], TEXT);
        assert_eq!(check, checked(150, 0, 150));
        // Places below the copies' start are not theirs; no place at all never holds.
        let check = r.check_sites(&moved[24..], &moved[24..], TEXT + 24);
        assert_eq!(check, checked(297, 0, 0));
        assert!(!r.check_sites(&[], &[], TEXT).holds(0));
    }

    #[test]
    fn a_slide_must_be_aligned_and_keep_the_image_in_the_kernel_map() {
        let entry = TEXT + 0xa0_0000;
        let end = TEXT + 0x240_0000;
        assert_eq!(virtual_slide(entry, entry, end), Ok(0));
        assert_eq!(
            virtual_slide(entry + 0x1e00_0000, entry, end),
            Ok(0x1e00_0000)
        );
        assert_eq!(
            virtual_slide(entry + 0x1000, entry, end),
            Err(SlideError::Unaligned(0x1000))
        );
        assert_eq!(
            virtual_slide(entry - SLIDE_ALIGN, entry, end),
            Err(SlideError::BelowLink {
                lstar: entry - SLIDE_ALIGN,
                link: entry
            })
        );
        // The last slide that fits, and the first that does not.
        let room = START_KERNEL_MAP + KERNEL_IMAGE_SIZE - end;
        assert_eq!(virtual_slide(entry + room, entry, end), Ok(room));
        assert_eq!(
            virtual_slide(entry + room + SLIDE_ALIGN, entry, end),
            Err(SlideError::TooFar(room + SLIDE_ALIGN))
        );
        assert!(virtual_slide(u64::MAX, entry, end).is_err());
    }
}
