//! Minimal ACPI tables: RSDP, XSDT, FADT (hardware-reduced), an empty DSDT and the MADT.
//!
//! The pinned Debian cloud kernel is built without `CONFIG_X86_MPPARSE`, so an MP table
//! is ignored and the MADT is the only way to tell it about more than one CPU. CPUs listed
//! as present but disabled become *possible* CPUs that never come online, which is how the
//! redirect engine later gets a spare per-CPU area in the guest (DESIGN.md 4.1). They must
//! be marked online-capable: Linux 6.1 skips disabled entries that are not.

use super::layout::{virtio_slot, ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_SLOTS};
use crate::devices::virtio::MMIO_SIZE;

const OEM_ID: &[u8; 6] = b"EXTVMM";
const OEM_TABLE_ID: &[u8; 8] = b"EXTERIOR";
const CREATOR_ID: &[u8; 4] = b"EXVM";
const SDT_HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
/// FADT flags: hardware-reduced ACPI, no fixed power or sleep button.
const FADT_FLAGS: u32 = (1 << 20) | (1 << 4) | (1 << 5);
/// IA-PC boot architecture flags: no VGA. The 8042 bit stays clear: there is no keyboard
/// controller beyond its reset line, so Linux need not probe for one.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_CPU_ENABLED: u32 = 1;
/// "Online capable": not running now, but may be brought up. Linux 6.1 ignores a disabled
/// entry without this flag; with it, the CPU counts as possible.
const MADT_CPU_ONLINE_CAPABLE: u32 = 2;

/// EISA IDs (compressed, as AML stores them) of the legacy devices in the DSDT.
const EISA_PNP0501_UART: u32 = 0x0105_d041;
const EISA_PNP0B00_RTC: u32 = 0x000b_d041;
/// The pvpanic device's ACPI id (QEMU's; Linux's pvpanic-mmio driver binds it).
const PVPANIC_HID: &[u8; 8] = b"QEMU0001";
/// virtio-mmio's ACPI id (Linux's virtio_mmio driver binds it).
const VIRTIO_MMIO_HID: &[u8; 8] = b"LNRO0005";

/// A device's `_HID`: a compressed EISA id, or an ACPI id string.
#[derive(Clone, Copy)]
enum Hid {
    Eisa(u32),
    Acpi(&'static [u8; 8]),
}

/// AML PkgLength for `len` bytes of content that follow it: the encoding counts itself.
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 64 {
        vec![(len + 1) as u8]
    } else {
        let total = len + 2;
        assert!(total < 4096, "two-byte PkgLength");
        vec![0x40 | (total & 0x0f) as u8, (total >> 4) as u8]
    }
}

/// The resource template of one legacy ISA device: IO(Decode16, base, base, 1, len), and
/// if `irq` is given, IRQNoFlags(){irq} (edge, active high).
fn legacy_resources(io_base: u16, io_len: u8, irq: Option<u8>) -> Vec<u8> {
    let io = io_base.to_le_bytes();
    let mut resources = vec![0x47, 0x01, io[0], io[1], io[0], io[1], 0x01, io_len];
    if let Some(irq) = irq {
        let irq_mask = (1u16 << (irq & 15)).to_le_bytes();
        resources.extend_from_slice(&[0x22, irq_mask[0], irq_mask[1]]);
    }
    resources
}

/// The resource template of one virtio-mmio device: Memory32Fixed(ReadWrite, base, len)
/// and Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive){gsi}.
fn virtio_resources(base: u32, len: u32, gsi: u32) -> Vec<u8> {
    let mut r = vec![0x86, 0x09, 0x00, 0x01];
    r.extend_from_slice(&base.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    // Extended interrupt: flags bit 0 consumer, bit 1 edge; one interrupt.
    r.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    r.extend_from_slice(&gsi.to_le_bytes());
    r
}

/// One device for the DSDT: `Device(\_SB.NAME) { _HID, _UID, _CRS }`.
///
/// In hardware-reduced ACPI mode Linux sets up no legacy (ISA) interrupts, so a device
/// hard-wired to IRQ 4 never gets one. Describing it here makes Linux's PNP layer map its
/// GSI through the IOAPIC — without it the serial port's transmit interrupt never arrives
/// and user-space console output stalls.
fn aml_device(name: &[u8; 4], hid: Hid, uid: u8, mut resources: Vec<u8>) -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const BUFFER_OP: u8 = 0x11;
    const BYTE_PREFIX: u8 = 0x0a;
    resources.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut body = vec![NAME_OP];
    body.extend_from_slice(b"_HID");
    match hid {
        Hid::Eisa(id) => {
            body.push(DWORD_PREFIX);
            body.extend_from_slice(&id.to_le_bytes());
        }
        Hid::Acpi(id) => {
            body.push(STRING_PREFIX);
            body.extend_from_slice(id);
            body.push(0);
        }
    }
    body.push(NAME_OP);
    body.extend_from_slice(b"_UID");
    body.extend_from_slice(&[BYTE_PREFIX, uid]);
    body.push(NAME_OP);
    body.extend_from_slice(b"_CRS");
    body.push(BUFFER_OP);
    assert!(resources.len() < 256, "byte-sized buffer length");
    let mut buffer = vec![BYTE_PREFIX, resources.len() as u8];
    buffer.extend_from_slice(&resources);
    body.extend(pkg_length(buffer.len()));
    body.extend_from_slice(&buffer);

    // \_SB_.NAME as a dual name path from the root.
    let mut content = vec![b'\\', 0x2e];
    content.extend_from_slice(b"_SB_");
    content.extend_from_slice(name);
    content.extend_from_slice(&body);
    let mut device = vec![0x5b, 0x82];
    device.extend(pkg_length(content.len()));
    device.extend_from_slice(&content);
    device
}

/// One legacy ISA device with an I/O range and an optional edge-triggered IRQ.
fn aml_legacy_device(
    name: &[u8; 4],
    hid: Hid,
    uid: u8,
    io_base: u16,
    io_len: u8,
    irq: Option<u8>,
) -> Vec<u8> {
    aml_device(name, hid, uid, legacy_resources(io_base, io_len, irq))
}

/// The DSDT's AML: the COM1 UART, COM2 when present, the CMOS RTC, pvpanic, and the first
/// `virtio_devices` virtio-mmio slots.
fn dsdt_aml(com2: bool, virtio_devices: usize) -> Vec<u8> {
    let uart = Hid::Eisa(EISA_PNP0501_UART);
    let mut aml = aml_legacy_device(b"COM1", uart, 0, 0x3f8, 8, Some(4));
    if com2 {
        aml.extend(aml_legacy_device(b"COM2", uart, 1, 0x2f8, 8, Some(3)));
    }
    let rtc = Hid::Eisa(EISA_PNP0B00_RTC);
    aml.extend(aml_legacy_device(b"RTC_", rtc, 0, 0x70, 2, Some(8)));
    let port = crate::devices::pvpanic::PVPANIC_PORT;
    let len = crate::devices::pvpanic::PVPANIC_LEN as u8;
    aml.extend(aml_legacy_device(
        b"PEVT",
        Hid::Acpi(PVPANIC_HID),
        0,
        port,
        len,
        None,
    ));
    for index in 0..virtio_devices.min(VIRTIO_SLOTS) {
        let (base, gsi) = virtio_slot(index);
        // VR00..VR07.
        let name = [b'V', b'R', b'0', b'0' + index as u8];
        let resources = virtio_resources(base as u32, MMIO_SIZE as u32, gsi);
        aml.extend(aml_device(
            &name,
            Hid::Acpi(VIRTIO_MMIO_HID),
            index as u8,
            resources,
        ));
    }
    aml
}

/// The tables laid out for the BIOS area starting at [`ACPI_START`].
pub struct AcpiTables {
    /// Bytes to write at [`ACPI_START`].
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP.
    pub rsdp_addr: u64,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: header plus body, with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = SDT_HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - SDT_HEADER_LEN];
    let at = |off: usize| off - SDT_HEADER_LEN;
    body[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    body[at(109)..at(111)].copy_from_slice(&IAPC_BOOT_ARCH_NO_VGA.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(&FADT_FLAGS.to_le_bytes());
    body[at(131)] = 3; // FADT minor version (ACPI 6.3)
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(268)..at(276)].copy_from_slice(b"EXTVMM\0\0");
    sdt(b"FACP", 6, &body)
}

/// MADT: `cpus` enabled local APICs (APIC ID = CPU index), then `spare_cpus` online-capable
/// ones (possible but never started), then the IOAPIC.
fn madt(cpus: u8, spare_cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // no dual 8259 setup to disable
    let total = u16::from(cpus) + u16::from(spare_cpus);
    for id in 0..total {
        let flags = if id < u16::from(cpus) {
            MADT_CPU_ENABLED
        } else {
            MADT_CPU_ONLINE_CAPABLE
        };
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, id as u8, id as u8]);
        body.extend_from_slice(&flags.to_le_bytes());
    }
    let ioapic_id = total.min(255) as u8;
    body.extend_from_slice(&[MADT_IO_APIC, 12, ioapic_id, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+, with XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn align16(n: usize) -> usize {
    (n + 15) & !15
}

/// Builds all tables for `cpus` running CPUs and `spare_cpus` possible-only CPUs; `com2`
/// describes a second UART, `virtio_devices` the virtio-mmio slots in use.
pub fn build(cpus: u8, spare_cpus: u8, com2: bool, virtio_devices: usize) -> AcpiTables {
    // Layout: RSDP | XSDT | FADT | DSDT | MADT, each 16-byte aligned.
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(com2, virtio_devices));
    let madt = madt(cpus, spare_cpus);
    let xsdt_off = 64;
    let xsdt_len = SDT_HEADER_LEN + 2 * 8;
    let fadt_off = align16(xsdt_off + xsdt_len);
    let dsdt_off = align16(fadt_off + FADT_LEN);
    let madt_off = align16(dsdt_off + dsdt.len());
    let addr = |off: usize| ACPI_START + off as u64;

    let fadt = fadt(addr(dsdt_off));
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&addr(fadt_off).to_le_bytes());
    xsdt_body.extend_from_slice(&addr(madt_off).to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut bytes = vec![0u8; madt_off + madt.len()];
    for (off, table) in [
        (0, rsdp(addr(xsdt_off))),
        (xsdt_off, xsdt),
        (fadt_off, fadt),
        (dsdt_off, dsdt),
        (madt_off, madt),
    ] {
        bytes[off..off + table.len()].copy_from_slice(&table);
    }
    debug_assert!(ACPI_START + bytes.len() as u64 <= BIOS_END);
    AcpiTables {
        bytes,
        rsdp_addr: ACPI_START,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(bytes: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_START) as usize;
        let len = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        &bytes[off..off + len]
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn every_table_checksums_to_zero_and_links_up() {
        let t = build(2, 1, true, 2);
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&t.bytes, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut sigs = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let table = table_at(&t.bytes, u64::from_le_bytes(entry.try_into().unwrap()));
            assert_eq!(sum(table), 0);
            sigs.push(table[..4].to_vec());
            if &table[..4] == b"FACP" {
                assert_eq!(table.len(), FADT_LEN);
                let dsdt = u64::from_le_bytes(table[140..148].try_into().unwrap());
                let dsdt = table_at(&t.bytes, dsdt);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(sum(dsdt), 0);
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn com1_device_aml_is_well_formed() {
        let d = aml_legacy_device(b"COM1", Hid::Eisa(EISA_PNP0501_UART), 0, 0x3f8, 8, Some(4));
        assert_eq!(&d[..2], &[0x5b, 0x82]);
        // PkgLength covers everything after the opcode.
        assert_eq!(usize::from(d[2]), d.len() - 2);
        assert_eq!(&d[3..13], b"\\._SB_COM1");
        let crs = d.windows(4).position(|w| w == b"_CRS").unwrap();
        // _CRS, BufferOp, PkgLength, BytePrefix, size, then the template.
        let template = &d[crs + 8..];
        assert_eq!(template.len(), usize::from(d[crs + 7]));
        assert_eq!(&template[..8], &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]);
        assert_eq!(&template[8..11], &[0x22, 0x10, 0x00]);
        assert_eq!(&template[11..], &[0x79, 0]);
    }

    #[test]
    fn pvpanic_device_aml_is_well_formed() {
        // Hand-assembled from the ACPI spec (19.6 Device, 20.2.3 String, 6.4.2.5 I/O port
        // descriptor): Device(\_SB.PEVT) { Name(_HID, "QEMU0001") Name(_UID, 0)
        // Name(_CRS, ResourceTemplate() { IO(Decode16, 0x505, 0x505, 1, 1) }) }
        let mut want = vec![0x5b, 0x82, 52];
        want.extend_from_slice(b"\\._SB_PEVT");
        want.extend_from_slice(b"\x08_HID\x0dQEMU0001\x00");
        want.extend_from_slice(b"\x08_UID\x0a\x00");
        want.extend_from_slice(b"\x08_CRS\x11\x0d\x0a\x0a");
        want.extend_from_slice(&[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1, 0x79, 0]);
        assert_eq!(usize::from(want[2]), want.len() - 2);
        let d = aml_legacy_device(b"PEVT", Hid::Acpi(PVPANIC_HID), 0, 0x505, 1, None);
        assert_eq!(d, want);
        // And the DSDT carries it.
        assert!(dsdt_aml(false, 0).windows(want.len()).any(|w| w == want));
    }

    #[test]
    fn virtio_mmio_device_aml_is_well_formed() {
        // Hand-assembled (ACPI 6.5: 5.4 PkgLength, 6.4.3.4 Memory32Fixed, 6.4.3.6 Extended
        // Interrupt): Device(\_SB.VR01) { Name(_HID, "LNRO0005") Name(_UID, 1)
        // Name(_CRS, ResourceTemplate() { Memory32Fixed(ReadWrite, 0xd0001000, 0x1000)
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { 17 } }) }
        // 64 bytes follow the PkgLength, so it takes two bytes: 66 = 0x42 -> 0x42, 0x04.
        let mut want = vec![0x5b, 0x82, 0x42, 0x04];
        want.extend_from_slice(b"\\._SB_VR01");
        want.extend_from_slice(b"\x08_HID\x0dLNRO0005\x00");
        want.extend_from_slice(b"\x08_UID\x0a\x01");
        want.extend_from_slice(b"\x08_CRS\x11\x1a\x0a\x17");
        want.extend_from_slice(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0]);
        want.extend_from_slice(&[0x00, 0x10, 0x00, 0x00]);
        want.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01, 17, 0, 0, 0, 0x79, 0]);
        assert_eq!(
            want.len() - 2,
            66,
            "PkgLength counts itself and what follows"
        );
        let dsdt = dsdt_aml(false, 2);
        assert!(
            dsdt.windows(want.len()).any(|w| w == want),
            "VR01 not in the DSDT"
        );
        assert!(dsdt.windows(4).any(|w| w == b"VR00"));
        assert!(
            !dsdt.windows(4).any(|w| w == b"VR02"),
            "only the slots in use"
        );
        assert!(!dsdt_aml(false, 0).windows(8).any(|w| w == VIRTIO_MMIO_HID));
    }

    #[test]
    fn madt_lists_running_and_spare_cpus() {
        let m = madt(2, 1);
        let entries = &m[44..];
        let lapics: Vec<(u8, u32)> = entries
            .chunks(8)
            .take(3)
            .map(|e| {
                assert_eq!(e[0], MADT_LOCAL_APIC);
                (e[3], u32::from_le_bytes(e[4..8].try_into().unwrap()))
            })
            .collect();
        assert_eq!(lapics, vec![(0, 1), (1, 1), (2, MADT_CPU_ONLINE_CAPABLE)]);
        assert_eq!(entries[24], MADT_IO_APIC);
        assert_eq!(entries.len(), 3 * 8 + 12);
    }
}
