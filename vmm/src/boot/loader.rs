//! Kernel and initrd loading plus the zero page (boot_params), for the 64-bit boot protocol.

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::{ram_ranges, GuestMemory};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest initrd address a 64-bit kernel accepts when the image does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Offset of the 64-bit entry point in a bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("not a Linux kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" setup header)")]
    NotAKernel,
    #[error("invalid or truncated ELF kernel: {0}")]
    Elf(loader::Error),
    #[error("invalid or truncated bzImage kernel: {0}")]
    BzImage(loader::Error),
    #[error("the kernel does not fit in guest memory")]
    KernelTooBig,
    #[error("the initrd ({size} bytes) does not fit in guest memory between the kernel end ({kernel_end:#x}) and {limit:#x}; raise --mem")]
    InitrdDoesNotFit {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; at most {CMDLINE_MAX} are supported")]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory at {addr:#x}: {reason}")]
    GuestWrite { addr: u64, reason: String },
}

/// What the vCPU setup needs to know after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point (physical; paging identity-maps it).
    pub entry: GuestAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(image: &[u8]) -> Result<KernelFormat, LoadError> {
    if super::bzimage::is_elf(image) {
        Ok(KernelFormat::Elf)
    } else if image.get(0x202..0x206) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(LoadError::NotAKernel)
    }
}

fn write_err(addr: u64, e: impl std::fmt::Display) -> LoadError {
    LoadError::GuestWrite {
        addr,
        reason: e.to_string(),
    }
}

/// Loads the kernel, initrd and command line into `mem` and writes the zero page.
/// `rsdp` is the address of the ACPI RSDP, passed to the kernel in boot_params.
pub fn load_linux(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<BootInfo, LoadError> {
    let format = detect_format(kernel)?;
    let mut image = Cursor::new(kernel);
    let (result, entry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
                .map_err(LoadError::Elf)?;
            let entry = r.kernel_load;
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
                .map_err(LoadError::BzImage)?;
            let entry = r
                .kernel_load
                .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
                .ok_or(LoadError::KernelTooBig)?;
            (r, entry)
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    // Command line.
    if cmdline.as_bytes().contains(&0) {
        return Err(LoadError::CmdlineNul);
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong { len: cmdline.len() });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| write_err(CMDLINE_ADDR, e))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    // Initrd: as high as allowed, page aligned, above the kernel.
    if let Some(initrd) = initrd {
        let addr_max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            n => u64::from(n),
        };
        let low_end = ram_ranges(mem_size)
            .first()
            .map(|r| r.0.raw_value() + r.1)
            .unwrap_or(0);
        let limit = low_end.min(addr_max.saturating_add(1));
        let size = initrd.len() as u64;
        let kernel_end = result.kernel_end;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or(LoadError::InitrdDoesNotFit {
                size,
                kernel_end,
                limit,
            })?;
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(|e| write_err(addr, e))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.acpi_rsdp_addr = rsdp.raw_value();
    let e820 = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = *entry;
    }
    params.e820_entries = e820.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| write_err(ZERO_PAGE_ADDR, e))?;
    Ok(BootInfo { entry })
}

/// The e820 map: low RAM below the EBDA, the BIOS area reserved (it holds the ACPI tables),
/// then RAM from 1 MiB, split around the 32-bit MMIO hole.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(ACPI_START, BIOS_END - ACPI_START, E820_RESERVED),
    ];
    for (addr, len, _) in ram_ranges(mem_size) {
        let start = addr.raw_value().max(HIMEM_START);
        let end = addr.raw_value() + len;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_memory, MMIO_HOLE_END, MMIO_HOLE_START};

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let map = e820_map(4 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            EBDA_START + (MMIO_HOLE_START - HIMEM_START) + (4 << 30) - MMIO_HOLE_START
        );
        assert!(map.iter().any(|e| e.addr == MMIO_HOLE_END));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let shared = create_guest_memory("t", 64 << 20).unwrap();
        let err = load_linux(
            &shared.mem,
            64 << 20,
            &[0u8; 4096],
            None,
            "",
            GuestAddress(0),
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::NotAKernel), "{err}");
    }

    #[test]
    fn truncated_elf_is_refused() {
        // A valid-looking ELF64 x86-64 header whose program headers lie beyond the file.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16] = 2; // ET_EXEC
        elf[18] = 62; // EM_X86_64
        elf[20] = 1;
        elf[32..40].copy_from_slice(&0x4000u64.to_le_bytes()); // e_phoff beyond EOF
        elf[52] = 64; // e_ehsize
        elf[54] = 56; // e_phentsize
        elf[56] = 1; // e_phnum
        let shared = create_guest_memory("t", 64 << 20).unwrap();
        let err = load_linux(&shared.mem, 64 << 20, &elf, None, "", GuestAddress(0)).unwrap_err();
        assert!(matches!(err, LoadError::Elf(_)), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        assert!(matches!(
            check_cmdline_for_test(&"x".repeat(CMDLINE_MAX)),
            Err(LoadError::CmdlineTooLong { .. })
        ));
    }

    fn check_cmdline_for_test(cmdline: &str) -> Result<BootInfo, LoadError> {
        // A minimal ELF that loads one empty segment, enough to reach the cmdline checks.
        let shared = create_guest_memory("t", 64 << 20).unwrap();
        let elf = minimal_elf();
        load_linux(&shared.mem, 64 << 20, &elf, None, cmdline, GuestAddress(0))
    }

    /// An ELF64 executable with one PT_LOAD segment of 16 bytes at 16 MiB.
    fn minimal_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 + 16];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[16] = 2;
        elf[18] = 62;
        elf[20] = 1;
        elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52] = 64;
        elf[54] = 56;
        elf[56] = 1;
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_vaddr
        elf[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
        elf[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        elf[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes()); // p_memsz
        elf
    }

    #[test]
    fn minimal_elf_loads_and_initrd_goes_high() {
        let shared = create_guest_memory("t", 64 << 20).unwrap();
        let initrd = vec![0xabu8; 8192];
        let info = load_linux(
            &shared.mem,
            64 << 20,
            &minimal_elf(),
            Some(&initrd),
            "console=ttyS0",
            GuestAddress(ACPI_START),
        )
        .unwrap();
        assert_eq!(info.entry, GuestAddress(0x100_0000));
        let params: boot_params = shared.mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let image = params.hdr.ramdisk_image as u64;
        assert_eq!(image, (64 << 20) - 8192);
        assert_eq!({ params.hdr.ramdisk_size }, 8192);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        let mut cmd = [0u8; 14];
        shared
            .mem
            .read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn initrd_that_cannot_fit_is_refused() {
        let shared = create_guest_memory("t", 64 << 20).unwrap();
        let initrd = vec![0u8; 63 << 20];
        let err = load_linux(
            &shared.mem,
            64 << 20,
            &minimal_elf(),
            Some(&initrd),
            "",
            GuestAddress(0),
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::InitrdDoesNotFit { .. }), "{err}");
    }
}
