//! Fixed guest-physical addresses used at boot (the 64-bit Linux boot protocol).

/// GDT used to enter long mode.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT loaded until the kernel sets up its own.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD (first 1 GiB in 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept (the kernel's own limit is 2048 on x86 by default).
pub const CMDLINE_MAX: usize = 2048;
/// Extended BIOS data area: reserved in the e820 map, as on a PC.
pub const EBDA_START: u64 = 0x9fc00;
/// BIOS area holding the ACPI tables; the kernel also scans it for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory (and a bzImage's protected-mode part) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Local APIC and IOAPIC MMIO bases (architectural defaults).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// KVM needs three pages of guest-physical space for the TSS on Intel hosts.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Virtio-mmio devices: slot `i` at `VIRTIO_MMIO_BASE + i * 0x1000` (inside the 32-bit MMIO
/// hole, clear of the IOAPIC and LAPIC) raising GSI `VIRTIO_GSI_BASE + i`. GSIs 16-23 are
/// IOAPIC pins no ISA device claims, so the DSDT's edge/high declaration is all that
/// decides their trigger mode.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_GSI_BASE: u32 = 16;
/// IOAPIC pins 16..24 (KVM's IOAPIC has 24).
pub const VIRTIO_SLOTS: usize = 8;

/// The MMIO base and GSI of virtio slot `index` (below [`VIRTIO_SLOTS`]).
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * crate::devices::virtio::MMIO_SIZE,
        VIRTIO_GSI_BASE + index as u32,
    )
}
