//! Which GVM modules' text the view runs (issue #13 item 6; the check itself is
//! `redirect::module_text`).
//!
//! - At build: the `.ko` files the SVM image carries under [`TRUSTED_DIR`] (the image's
//!   digest is checked before it boots), read as the module loader lays them out.
//! - At the first call: the SVM kernel's own loaded copies of them — its *twins*, loaded
//!   by the SVM's /init at boot — read through an SVM address space (trusted memory) and
//!   checked against the package's layout.
//! - At each epoch of the view (the GVM ran, so it may have loaded, removed or rewritten
//!   modules): the GVM's module list walked, every module with a twin checked against it,
//!   and the text of those that pass copied into the redirect VM's read-only module copy
//!   area, which the view maps at their addresses. Every other module stays no-execute,
//!   and a call that reaches it is refused with the reason recorded here.

use redirect::module_text::{self, KoText, LoadedModule, TextCopy};
use redirect::paging::{AddressSpace, Privilege};
use redirect::traps::{CallMemory, ModuleLayout};
use redirect::view::{ModuleCopy, MODULE_AREA, MODULE_COPY_SIZE};

/// Where the SVM image keeps the trusted modules (`rootfs/build-svm`).
pub const TRUSTED_DIR: &str = "usr/lib/modules/trusted/";
/// Why a module without a twin is not trusted.
const NOT_LISTED: &str =
    "it is not among the modules the SVM loads to check against (docs/LIMITS.md)";
/// Most files a cpio archive is read for (the SVM image has a few thousand).
const MAX_CPIO_ENTRIES: usize = 1 << 20;

/// A trusted module file: its module name and what it says about its core text.
#[derive(Debug, Clone)]
pub struct TrustedKo {
    pub name: String,
    pub ko: KoText,
}

/// The files of a newc ("070701") cpio archive, as (name, data); stops at the trailer or
/// at the first malformed header.
fn newc(cpio: &[u8]) -> Vec<(&str, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let hex = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
    };
    let pad4 = |v: usize| v.checked_add(3).map(|v| v & !3);
    while out.len() < MAX_CPIO_ENTRIES {
        let Some(h) = at.checked_add(110).and_then(|end| cpio.get(at..end)) else {
            break;
        };
        if &h[..6] != b"070701" && &h[..6] != b"070702" {
            break;
        }
        let (Some(size), Some(namesize)) = (hex(&h[54..62]), hex(&h[94..102])) else {
            break;
        };
        let name_start = at + 110;
        let Some(data_start) = name_start.checked_add(namesize).and_then(pad4) else {
            break;
        };
        let Some(data_end) = data_start.checked_add(size) else {
            break;
        };
        let (Some(name), Some(data)) = (
            cpio.get(name_start..name_start + namesize.saturating_sub(1)),
            cpio.get(data_start..data_end),
        ) else {
            break;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            break;
        };
        if name == "TRAILER!!!" {
            break;
        }
        out.push((name, data));
        let Some(next) = pad4(data_end) else { break };
        at = next;
    }
    out
}

/// The trusted module files in the SVM image `cpio`, parsed; and a warning for each that
/// could not be (its module then stays untrusted).
pub fn from_svm_image(cpio: &[u8]) -> (Vec<TrustedKo>, Vec<String>) {
    let mut kos = Vec::new();
    let mut warnings = Vec::new();
    for (path, data) in newc(cpio) {
        let path = path.trim_start_matches("./").trim_start_matches('/');
        let Some(file) = path
            .strip_prefix(TRUSTED_DIR)
            .and_then(|f| f.strip_suffix(".ko"))
        else {
            continue;
        };
        // Module names use '_' where file names may use '-' (pvpanic-mmio.ko).
        let name = file.replace('-', "_");
        match KoText::parse(data) {
            Ok(ko) => kos.push(TrustedKo { name, ko }),
            Err(e) => warnings.push(format!("trusted module {path}: {e}")),
        }
    }
    (kos, warnings)
}

/// A twin: the SVM kernel's loaded copy of a trusted module.
struct Twin {
    /// Index into the trusted files.
    ko: usize,
    base: u64,
    text: Vec<u8>,
}

/// The SVM's twins, read once.
pub struct Twins {
    svm_modules: Vec<LoadedModule>,
    twins: Vec<Twin>,
}

impl Twins {
    /// Reads the twins of `kos` from the SVM kernel (`svm`: any SVM address space, of
    /// which only the kernel half is read); a warning for each that is missing or does not
    /// have the package's layout (it then verifies nothing).
    pub fn read(
        kos: &[TrustedKo],
        layout: &ModuleLayout,
        svm: &AddressSpace<'_>,
    ) -> (Twins, Vec<String>) {
        let loaded = layout.loaded(&CallMemory::gvm_only(svm));
        let mut twins = Vec::new();
        let mut warnings = Vec::new();
        for (i, ko) in kos.iter().enumerate() {
            let Some((m, text_size)) = loaded.iter().find(|(m, _)| m.name == ko.name) else {
                warnings.push(format!("the SVM has not loaded trusted module {}", ko.name));
                continue;
            };
            if *text_size != ko.ko.text_size {
                warnings.push(format!(
                    "the SVM's {} has {text_size:#x} bytes of text, the package's layout {:#x}",
                    ko.name, ko.ko.text_size
                ));
                continue;
            }
            // At most MAX_TEXT bytes (KoText::parse bounds it).
            let mut text = vec![0u8; ko.ko.text_size as usize];
            if let Err(e) = svm.read(m.base, &mut text, Privilege::Supervisor) {
                warnings.push(format!("the SVM's {} cannot be read: {e}", ko.name));
                continue;
            }
            twins.push(Twin {
                ko: i,
                base: m.base,
                text,
            });
        }
        let svm_modules = loaded.into_iter().map(|(m, _)| m).collect();
        (Twins { svm_modules, twins }, warnings)
    }

    /// How many trusted modules have a twin.
    pub fn len(&self) -> usize {
        self.twins.len()
    }

    /// Whether no trusted module has a twin.
    pub fn is_empty(&self) -> bool {
        self.twins.is_empty()
    }
}

/// A verified module's text.
#[derive(Debug)]
pub struct VerifiedText {
    pub name: String,
    /// Its kernel-virtual start.
    pub start: u64,
    pub text: Vec<u8>,
}

/// What one epoch trusts: each verified module's text, and why each other module is not
/// trusted.
#[derive(Debug, Default)]
pub struct Verified {
    pub texts: Vec<VerifiedText>,
    pub refused: Vec<(String, String)>,
}

impl Verified {
    /// The view's module copies when the texts sit in order, page-aligned, from
    /// guest-physical `area` (as [`Verified::area_bytes`] lays them out).
    pub fn copies(&self, area: u64) -> Vec<ModuleCopy> {
        let mut off = 0;
        self.texts
            .iter()
            .map(|t| {
                let len = t.text.len() as u64;
                let copy = ModuleCopy {
                    start: t.start,
                    end: t.start + len,
                    copy: area + off,
                };
                off += len;
                copy
            })
            .collect()
    }

    /// "trusted: a, b; refused: c (why); not on the trusted list: d, e", for `info`.
    pub fn summary(&self) -> String {
        let trusted: Vec<&str> = self.texts.iter().map(|t| t.name.as_str()).collect();
        let (unlisted, refused): (Vec<_>, Vec<_>) =
            self.refused.iter().partition(|(_, why)| why == NOT_LISTED);
        let refused: Vec<String> = refused
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        let unlisted: Vec<&str> = unlisted.iter().map(|(name, _)| name.as_str()).collect();
        format!(
            "trusted: {}; refused: {}; not on the trusted list: {}",
            trusted.join(", "),
            refused.join(", "),
            unlisted.join(", ")
        )
    }

    /// Why the module called `name` is not trusted, if it was refused.
    pub fn why_not(&self, name: &str) -> Option<&str> {
        self.refused
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, why)| why.as_str())
    }
}

/// Checks every module on the GVM's list (read through `gvm`, the GVM kernel's address
/// space: hostile) that has a twin; the GVM's kernel image is moved by `slide`.
pub fn verify_gvm(
    kos: &[TrustedKo],
    twins: &Twins,
    layout: &ModuleLayout,
    gvm: &AddressSpace<'_>,
    slide: u64,
) -> Verified {
    let loaded = layout.loaded(&CallMemory::gvm_only(gvm));
    let gvm_modules: Vec<LoadedModule> = loaded.iter().map(|(m, _)| m.clone()).collect();
    let mut verified = Verified::default();
    let mut room = MODULE_COPY_SIZE;
    for (m, text_size) in &loaded {
        let twin = twins
            .twins
            .iter()
            .find(|t| kos.get(t.ko).is_some_and(|k| k.name == m.name));
        let check = || -> Result<Vec<u8>, String> {
            let twin = twin.ok_or(NOT_LISTED)?;
            let ko = &kos[twin.ko].ko;
            if *text_size != ko.text_size {
                return Err(format!(
                    "its text size {text_size:#x} is not the package's {:#x}",
                    ko.text_size
                ));
            }
            let end = m.base.checked_add(ko.text_size).ok_or("its text wraps")?;
            if m.base & 0xfff != 0 || m.base < MODULE_AREA.0 || end > MODULE_AREA.1 {
                return Err(format!(
                    "its text at {:#x} is not in the module area",
                    m.base
                ));
            }
            if ko.text_size > room {
                return Err("the redirect VM's module copy area is full".into());
            }
            let mut text = vec![0u8; ko.text_size as usize];
            gvm.read(m.base, &mut text, Privilege::Supervisor)
                .map_err(|e| format!("its text cannot be read: {e}"))?;
            let twin_copy = TextCopy {
                base: twin.base,
                text: &twin.text,
                modules: &twins.svm_modules,
                // The SVM boots `nokaslr`.
                slide: 0,
            };
            let gvm_copy = TextCopy {
                base: m.base,
                text: &text,
                modules: &gvm_modules,
                slide,
            };
            module_text::verify(ko, &m.name, &twin_copy, &gvm_copy).map_err(|e| e.to_string())?;
            Ok(text)
        };
        match check() {
            Ok(text) => {
                room -= text.len() as u64;
                verified.texts.push(VerifiedText {
                    name: m.name.clone(),
                    start: m.base,
                    text,
                });
            }
            Err(why) => verified.refused.push((m.name.clone(), why)),
        }
    }
    verified
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc entry for `name` with `data`.
    fn entry(name: &str, data: &[u8]) -> Vec<u8> {
        let mut e = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0o100644,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        e.extend_from_slice(name.as_bytes());
        e.push(0);
        while !e.len().is_multiple_of(4) {
            e.push(0);
        }
        e.extend_from_slice(data);
        while !e.len().is_multiple_of(4) {
            e.push(0);
        }
        e
    }

    #[test]
    fn the_trusted_module_files_are_read_from_the_svm_image() {
        let mut cpio = Vec::new();
        cpio.extend(entry("bin/sh", b"#!"));
        cpio.extend(entry(
            "usr/lib/modules/trusted/pvpanic-mmio.ko",
            b"not an ELF",
        ));
        cpio.extend(entry("usr/lib/modules/trusted/order", b"dummy\n"));
        cpio.extend(entry("lib/modules/pvpanic/pvpanic.ko", b"elsewhere"));
        cpio.extend(entry("TRAILER!!!", b""));
        cpio.extend(entry(
            "usr/lib/modules/trusted/after.ko",
            b"after the trailer",
        ));
        let names: Vec<&str> = newc(&cpio).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "bin/sh",
                "usr/lib/modules/trusted/pvpanic-mmio.ko",
                "usr/lib/modules/trusted/order",
                "lib/modules/pvpanic/pvpanic.ko"
            ]
        );
        let (kos, warnings) = from_svm_image(&cpio);
        assert!(kos.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("trusted module usr/lib/modules/trusted/pvpanic-mmio.ko: "),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_truncated_or_hostile_archive_ends_the_listing() {
        let mut cpio = entry("a", b"0123456789");
        cpio.extend(entry("b", b"x"));
        // "b"'s one byte of data ends 3 bytes before the archive (its padding).
        let b_end = cpio.len() - 3;
        for cut in 0..=cpio.len() {
            let n = newc(&cpio[..cut]).len();
            assert_eq!(
                n,
                usize::from(cut >= 122) + usize::from(cut >= b_end),
                "cut at {cut}"
            );
        }
        let mut huge = entry("c", b"");
        huge[54..62].copy_from_slice(b"ffffffff");
        assert!(newc(&huge).is_empty());
        assert!(newc(b"070701zzzz").is_empty());
    }

    #[test]
    fn copies_sit_in_order_in_the_area() {
        let v = Verified {
            texts: vec![
                VerifiedText {
                    name: "a".into(),
                    start: 0xffff_ffff_c000_0000,
                    text: vec![0; 0x2000],
                },
                VerifiedText {
                    name: "b".into(),
                    start: 0xffff_ffff_c010_0000,
                    text: vec![0; 0x1000],
                },
            ],
            refused: vec![
                ("hostile".into(), NOT_LISTED.into()),
                ("evil".into(), "its text differs".into()),
                ("pvpanic".into(), NOT_LISTED.into()),
            ],
        };
        let area = 0x1_0000_0000;
        assert_eq!(
            v.copies(area),
            [
                ModuleCopy {
                    start: 0xffff_ffff_c000_0000,
                    end: 0xffff_ffff_c000_2000,
                    copy: area
                },
                ModuleCopy {
                    start: 0xffff_ffff_c010_0000,
                    end: 0xffff_ffff_c010_1000,
                    copy: area + 0x2000
                },
            ]
        );
        assert_eq!(v.why_not("evil"), Some("its text differs"));
        assert_eq!(v.why_not("dummy"), None);
        assert_eq!(
            v.summary(),
            "trusted: a, b; refused: evil (its text differs); \
             not on the trusted list: hostile, pvpanic"
        );
    }
}
