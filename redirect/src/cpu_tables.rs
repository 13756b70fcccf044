//! The descriptor tables and stacks the redirect vCPU runs on (DESIGN.md 4.5: "IDT, GDT,
//! TSS, IST stacks: VMM-owned, read-only pages built from the trusted image").
//!
//! The GVM's own tables decide control: an IDT gate is a code address, a GDT descriptor
//! decides whether the code behind a selector runs in 64-bit mode, and the TSS's stack
//! pointers decide where the CPU pushes an exception frame. A hostile GVM kernel can
//! rewrite all three in its memory (and give its own CPUs private copies, so it keeps
//! working), so the view never uses them:
//! - the IDT is the trusted SVM kernel's (`idt_table`, set up by the same image on the same
//!   virtual hardware), every present gate checked to be an interrupt or trap gate through
//!   the kernel code segment and rebuilt from its checked fields; a gate whose handler is
//!   not in the trusted text is left out (not present). Linux leaves such gates itself:
//!   the exception vectors it installs no handler for keep their boot-time handler in
//!   `.init.text`, freed after boot (in the pinned kernel, without `CONFIG_X86_MCE`,
//!   vector 18 and the reserved ones), so the kernel itself would run freed memory there;
//! - the GDT is built here, for the lent CPU: the six descriptors Linux's `gdt_page` starts
//!   with on x86-64 (`arch/x86/kernel/cpu/common.c`), the TSS, and the lent CPU's getcpu
//!   entry (`setup_getcpu`), which the kernel's own entry code reads: with FSGSBASE,
//!   `paranoid_entry` (NMI, #DB, #MC, #DF) finds the per-cpu base with `lsl` on it. The
//!   LDT and TLS entries stay empty: only user code and a context switch (which the view
//!   traps at `__schedule`) load them;
//! - the TSS is built here too: `RSP0` and the seven IST pointers lead to the window's
//!   private stacks, and the I/O bitmap lies past the TSS's limit (user port I/O faults).
//!
//! The kernel's own writes to its per-cpu `gdt_page` and `cpu_tss_rw` (TLS on a context
//! switch, the entry code's scratch word) still go to GVM memory through its per-cpu base:
//! that is data; the CPU reads these tables only.

use thiserror::Error;

/// Gates in the IDT.
pub const IDT_ENTRIES: usize = 256;
/// Bytes of the IDT: 256 gates of 16 bytes, one page.
pub const IDT_SIZE: usize = IDT_ENTRIES * 16;
/// Descriptors in the GDT (`GDT_ENTRIES` on x86-64).
pub const GDT_ENTRIES: usize = 16;
/// Bytes of the GDT.
pub const GDT_SIZE: usize = GDT_ENTRIES * 8;
/// Bytes of the 64-bit TSS (`struct x86_hw_tss`); its limit is one less.
pub const TSS_SIZE: usize = 0x68;
/// Private stacks: `RSP0` (index 0) and IST1..IST7.
pub const CPU_STACKS: usize = 8;

/// The kernel code segment (`__KERNEL_CS`, GDT entry 2): every gate must name it.
const KERNEL_CS: u16 = 0x10;
/// GDT entry of the TSS (`GDT_ENTRY_TSS`; 16 bytes, entries 8 and 9).
const GDT_ENTRY_TSS: usize = 8;
/// GDT entry whose limit holds the CPU and node numbers (`GDT_ENTRY_CPUNODE`).
const GDT_ENTRY_CPUNODE: usize = 15;
/// Bits of the CPU number in that limit (`VDSO_CPUNODE_BITS`); the node number is above.
const CPUNODE_BITS: u32 = 12;
/// Gate types (`GATE_INTERRUPT`, `GATE_TRAP`), with the descriptor's S bit (0).
const GATE_INTERRUPT: u8 = 0x0e;
const GATE_TRAP: u8 = 0x0f;
/// A present descriptor.
const PRESENT: u8 = 0x80;
/// A busy 64-bit TSS: what `ltr` leaves in the GDT, and what TR is set to directly.
const TYPE_BUSY_TSS: u64 = 0x0b;

/// The code and data descriptors of Linux's x86-64 `gdt_page` (`GDT_ENTRY_INIT(flags, 0,
/// 0xfffff)` with flags 0xc09b, 0xa09b, 0xc093, 0xc0fb, 0xc0f3, 0xa0fb): kernel 32-bit
/// code, kernel 64-bit code, kernel data, user 32-bit code, user data, user 64-bit code.
/// Every one has its accessed bit set, so the CPU never writes the (read-only) table.
const GDT_SEGMENTS: [(usize, u64); 6] = [
    (1, 0x00cf_9b00_0000_ffff),
    (2, 0x00af_9b00_0000_ffff),
    (3, 0x00cf_9300_0000_ffff),
    (4, 0x00cf_fb00_0000_ffff),
    (5, 0x00cf_f300_0000_ffff),
    (6, 0x00af_fb00_0000_ffff),
];

/// Why the trusted kernel's IDT is not one the view may use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdtError {
    /// A present gate that is not what Linux sets up.
    #[error("IDT gate {vector}: {why}")]
    BadGate {
        /// The vector.
        vector: usize,
        /// What is wrong with it.
        why: GateFault,
    },
    /// The IDT is not one page.
    #[error("the IDT is {0} bytes, not {IDT_SIZE}")]
    Size(usize),
}

/// What is wrong with a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GateFault {
    /// It names a segment other than the kernel code segment.
    #[error("selector {0:#x} is not the kernel code segment")]
    Selector(u16),
    /// It is not an interrupt or trap gate (a call or task gate, or a segment descriptor).
    #[error("type {0:#x} is neither an interrupt nor a trap gate")]
    Type(u8),
    /// Bits the architecture reserves are set.
    #[error("reserved bits are set")]
    Reserved,
}

/// The IDT the view uses, and the vectors left out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedIdt {
    /// The table: [`IDT_SIZE`] bytes.
    pub table: Vec<u8>,
    /// Present gates of the trusted table whose handler is not in the trusted text (boot
    /// handlers in freed init text): not present here.
    pub left_out: Vec<(usize, u64)>,
}

/// The IDT the view uses: `trusted`'s gates (the trusted kernel's `idt_table`, at its
/// link addresses), each present one checked to be an interrupt or trap gate through the
/// kernel code segment and rebuilt from its checked fields, its handler moved by the GVM's
/// KASLR `slide`, if it enters `text` (the trusted `.text`, [start, end), link
/// addresses), left out otherwise; not-present gates are zero. `left_out` names the
/// unmoved handlers.
pub fn checked_idt(trusted: &[u8], text: (u64, u64), slide: u64) -> Result<CheckedIdt, IdtError> {
    if trusted.len() != IDT_SIZE {
        return Err(IdtError::Size(trusted.len()));
    }
    let mut idt = vec![0u8; IDT_SIZE];
    let mut left_out = Vec::new();
    for (vector, (gate, out)) in trusted
        .chunks_exact(16)
        .zip(idt.chunks_exact_mut(16))
        .enumerate()
    {
        let word = |i: usize| u16::from_le_bytes([gate[i], gate[i + 1]]);
        let dword = |i: usize| u32::from_le_bytes([gate[i], gate[i + 1], gate[i + 2], gate[i + 3]]);
        let flags = gate[5];
        if flags & PRESENT == 0 {
            continue;
        }
        let bad = |why| IdtError::BadGate { vector, why };
        let selector = word(2);
        if selector != KERNEL_CS {
            return Err(bad(GateFault::Selector(selector)));
        }
        let kind = flags & 0x1f;
        if kind != GATE_INTERRUPT && kind != GATE_TRAP {
            return Err(bad(GateFault::Type(kind)));
        }
        if gate[4] & !0x07 != 0 || dword(12) != 0 {
            return Err(bad(GateFault::Reserved));
        }
        let handler = u64::from(word(0)) | u64::from(word(6)) << 16 | u64::from(dword(8)) << 32;
        let moved = handler.checked_add(slide);
        let Some(moved) = moved.filter(|_| handler >= text.0 && handler < text.1) else {
            left_out.push((vector, handler));
            continue;
        };
        out.copy_from_slice(&gate_bytes(moved, gate[4] & 0x07, flags));
    }
    Ok(CheckedIdt {
        table: idt,
        left_out,
    })
}

/// An interrupt or trap gate into `handler` through the kernel code segment, on IST stack
/// `ist` (0: none), with type, DPL and present bits `flags`.
fn gate_bytes(handler: u64, ist: u8, flags: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
    g[4] = ist;
    g[5] = flags;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// The GDT the view uses on GVM CPU `cpu` (NUMA node 0: the VMM describes no other):
/// Linux's code and data descriptors, a busy TSS at `tss_base`, and the getcpu entry.
pub fn gdt(tss_base: u64, cpu: u8) -> [u8; GDT_SIZE] {
    let mut entries = [0u64; GDT_ENTRIES];
    for (i, d) in GDT_SEGMENTS {
        entries[i] = d;
    }
    // `setup_getcpu`: limit = node << 12 | cpu; read-only data, accessed (type 5), user
    // (DPL 3), present, 32-bit.
    let limit = u64::from(u32::from(cpu) & ((1 << CPUNODE_BITS) - 1));
    entries[GDT_ENTRY_CPUNODE] = limit | 0xf5 << 40 | 1 << 54;
    let limit = (TSS_SIZE - 1) as u64;
    entries[GDT_ENTRY_TSS] = (limit & 0xffff)
        | (tss_base & 0xff_ffff) << 16
        | TYPE_BUSY_TSS << 40
        | u64::from(PRESENT) << 40
        | (limit >> 16 & 0xf) << 48
        | (tss_base >> 24 & 0xff) << 56;
    entries[GDT_ENTRY_TSS + 1] = tss_base >> 32;
    let mut bytes = [0u8; GDT_SIZE];
    for (chunk, e) in bytes.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    bytes
}

/// The TSS the view uses: `stack_tops[0]` as `RSP0` (the stack an interrupt from user mode
/// starts on), `stack_tops[1..]` as IST1..IST7, and no I/O bitmap.
pub fn tss(stack_tops: [u64; CPU_STACKS]) -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    t[4..12].copy_from_slice(&stack_tops[0].to_le_bytes());
    for (i, top) in stack_tops[1..].iter().enumerate() {
        let at = 0x24 + 8 * i;
        t[at..at + 8].copy_from_slice(&top.to_le_bytes());
    }
    // `io_bitmap_base` at or past the limit: no bitmap.
    t[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: (u64, u64) = (0xffff_ffff_8100_0000, 0xffff_ffff_8200_0000);

    /// A gate as the Linux 6.1 `gate_struct` lays it out, written field by field here (not
    /// with [`gate_bytes`]) so the test does not check the code against itself.
    fn linux_gate(handler: u64, selector: u16, ist: u8, kind: u8, dpl: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        let bits: u16 = u16::from(ist) | u16::from(kind) << 8 | u16::from(dpl) << 13 | 1 << 15;
        g[0..2].copy_from_slice(&((handler & 0xffff) as u16).to_le_bytes());
        g[2..4].copy_from_slice(&selector.to_le_bytes());
        g[4..6].copy_from_slice(&bits.to_le_bytes());
        g[6..8].copy_from_slice(&((handler >> 16 & 0xffff) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        g
    }

    fn idt_with(gates: &[(usize, [u8; 16])]) -> Vec<u8> {
        let mut idt = vec![0u8; IDT_SIZE];
        for (v, g) in gates {
            idt[v * 16..v * 16 + 16].copy_from_slice(g);
        }
        idt
    }

    #[test]
    fn the_trusted_kernels_gates_are_kept_as_they_are() {
        // #PF (interrupt gate), #DF on IST1, int3 at DPL 3, int 0x80 as a trap gate.
        let gates = [
            (14, linux_gate(TEXT.0 + 0x1230, KERNEL_CS, 0, 0x0e, 0)),
            (8, linux_gate(TEXT.0 + 0x4560, KERNEL_CS, 1, 0x0e, 0)),
            (3, linux_gate(TEXT.0 + 0x7890, KERNEL_CS, 0, 0x0e, 3)),
            (0x80, linux_gate(TEXT.1 - 0x10, KERNEL_CS, 0, 0x0f, 3)),
        ];
        let idt = idt_with(&gates);
        assert_eq!(
            checked_idt(&idt, TEXT, 0),
            Ok(CheckedIdt {
                table: idt,
                left_out: vec![]
            })
        );
    }

    #[test]
    fn a_slid_gvm_gets_the_trusted_gates_moved_by_its_slide() {
        const SLIDE: u64 = 0x2e00_0000;
        let gates = [
            (14, linux_gate(TEXT.0 + 0x1230, KERNEL_CS, 0, 0x0e, 0)),
            (8, linux_gate(TEXT.0 + 0x4560, KERNEL_CS, 1, 0x0e, 0)),
            (0x80, linux_gate(TEXT.1 - 0x10, KERNEL_CS, 0, 0x0f, 3)),
            (19, linux_gate(0xffff_c900_0000_1000, KERNEL_CS, 0, 0x0e, 0)),
        ];
        let moved = [
            (
                14,
                linux_gate(TEXT.0 + SLIDE + 0x1230, KERNEL_CS, 0, 0x0e, 0),
            ),
            (
                8,
                linux_gate(TEXT.0 + SLIDE + 0x4560, KERNEL_CS, 1, 0x0e, 0),
            ),
            (
                0x80,
                linux_gate(TEXT.1 + SLIDE - 0x10, KERNEL_CS, 0, 0x0f, 3),
            ),
        ];
        let checked = checked_idt(&idt_with(&gates), TEXT, SLIDE).unwrap();
        assert_eq!(checked.table, idt_with(&moved));
        // Checked at the link addresses: a handler already at a slid address is not
        // the trusted text's.
        assert_eq!(checked.left_out, vec![(19, 0xffff_c900_0000_1000)]);
        let slid_handler = [(14, linux_gate(TEXT.0 + SLIDE, KERNEL_CS, 0, 0x0e, 0))];
        let checked = checked_idt(&idt_with(&slid_handler), TEXT, SLIDE).unwrap();
        assert_eq!(checked.left_out, vec![(14, TEXT.0 + SLIDE)]);
    }

    #[test]
    fn junk_in_a_not_present_gate_is_dropped() {
        let mut idt = vec![0u8; IDT_SIZE];
        let mut junk = linux_gate(0xdead_beef, 0x1234, 7, 0x0c, 3);
        junk[5] &= !PRESENT;
        idt[20 * 16..21 * 16].copy_from_slice(&junk);
        let checked = checked_idt(&idt, TEXT, 0).unwrap();
        assert_eq!(
            (checked.table, checked.left_out),
            (vec![0u8; IDT_SIZE], vec![])
        );
    }

    #[test]
    fn a_gate_into_anything_but_the_trusted_text_is_left_out() {
        // Linux's boot handler for vector 18 (early_idt_handler_array + 18 * 9, in freed
        // init text), a handler in the heap, and one just past the text.
        let gates = [
            (18, linux_gate(TEXT.1 + 0x104_c0a2, KERNEL_CS, 0, 0x0e, 0)),
            (19, linux_gate(0xffff_c900_0000_1000, KERNEL_CS, 0, 0x0e, 0)),
            (20, linux_gate(TEXT.1, KERNEL_CS, 0, 0x0e, 0)),
            (14, linux_gate(TEXT.0 + 0x1230, KERNEL_CS, 0, 0x0e, 0)),
        ];
        let checked = checked_idt(&idt_with(&gates), TEXT, 0).unwrap();
        assert_eq!(checked.table, idt_with(&gates[3..]));
        assert_eq!(
            checked.left_out,
            vec![
                (18, TEXT.1 + 0x104_c0a2),
                (19, 0xffff_c900_0000_1000),
                (20, TEXT.1)
            ]
        );
    }

    #[test]
    fn a_gate_that_is_not_linuxs_is_refused() {
        let cases = [
            (
                linux_gate(TEXT.0, 0x33, 0, 0x0e, 0),
                GateFault::Selector(0x33),
            ),
            // A call gate, and a 64-bit code segment descriptor (S bit set).
            (
                linux_gate(TEXT.0, KERNEL_CS, 0, 0x0c, 0),
                GateFault::Type(0x0c),
            ),
            (
                linux_gate(TEXT.0, KERNEL_CS, 0, 0x1b, 0),
                GateFault::Type(0x1b),
            ),
        ];
        for (gate, why) in cases {
            let idt = idt_with(&[(14, gate)]);
            assert_eq!(
                checked_idt(&idt, TEXT, 0),
                Err(IdtError::BadGate { vector: 14, why })
            );
        }
        let mut reserved = linux_gate(TEXT.0, KERNEL_CS, 0, 0x0e, 0);
        reserved[12] = 1;
        let mut zero_bits = linux_gate(TEXT.0, KERNEL_CS, 0, 0x0e, 0);
        zero_bits[4] |= 0x08;
        for gate in [reserved, zero_bits] {
            assert_eq!(
                checked_idt(&idt_with(&[(255, gate)]), TEXT, 0),
                Err(IdtError::BadGate {
                    vector: 255,
                    why: GateFault::Reserved
                })
            );
        }
        assert_eq!(checked_idt(&[0u8; 16], TEXT, 0), Err(IdtError::Size(16)));
    }

    #[test]
    fn the_gdt_is_linuxs_with_a_busy_tss_at_the_given_base() {
        let gdt = gdt(0xffff_f800_1234_5678, 3);
        let entry = |i: usize| u64::from_le_bytes(gdt[i * 8..i * 8 + 8].try_into().unwrap());
        // What Linux 6.1's `gdt_page` initialiser gives: `GDT_ENTRY_INIT(flags, 0, 0xfffff)`
        // with its flags, expanded field by field as the kernel's macro does.
        let linux_with = |flags: u64, limit: u64| {
            (limit & 0xffff)
                | (flags & 0x0f) << 40
                | (flags >> 4 & 1) << 44
                | (flags >> 5 & 3) << 45
                | (flags >> 7 & 1) << 47
                | (limit >> 16 & 0xf) << 48
                | (flags >> 12 & 1) << 52
                | (flags >> 13 & 1) << 53
                | (flags >> 14 & 1) << 54
                | (flags >> 15 & 1) << 55
        };
        let linux = |flags: u64| linux_with(flags, 0xfffff);
        assert_eq!(entry(0), 0);
        assert_eq!(entry(1), linux(0xc09b), "GDT_ENTRY_KERNEL32_CS");
        assert_eq!(entry(2), linux(0xa09b), "__KERNEL_CS: 64-bit, DPL 0");
        assert_eq!(entry(3), linux(0xc093), "__KERNEL_DS");
        assert_eq!(entry(4), linux(0xc0fb), "__USER32_CS");
        assert_eq!(entry(5), linux(0xc0f3), "__USER_DS");
        assert_eq!(entry(6), linux(0xa0fb), "__USER_CS: 64-bit, DPL 3");
        // The TSS descriptor: limit 0x67, base split over both words, type 0xb, present.
        assert_eq!(entry(8), 0x1200_8b34_5678_0067);
        assert_eq!(entry(9), 0xffff_f800);
        // `setup_getcpu(3)` on node 0: `d.limit0 = 3; d.type = 5; d.dpl = 3; d.s = 1;
        // d.p = 1; d.d = 1`, i.e. flags 0x40f5.
        assert_eq!(entry(15), linux_with(0x40f5, 3), "GDT_ENTRY_CPUNODE");
        for i in [7, 10, 11, 12, 13, 14] {
            assert_eq!(entry(i), 0, "entry {i} is empty");
        }
    }

    #[test]
    fn the_tss_points_every_stack_at_the_given_tops_and_has_no_io_bitmap() {
        let tops = [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80].map(|t| t << 40);
        let t = tss(tops);
        let q = |at: usize| u64::from_le_bytes(t[at..at + 8].try_into().unwrap());
        assert_eq!(q(4), tops[0], "RSP0");
        assert_eq!((q(12), q(20)), (0, 0), "RSP1 and RSP2 unused");
        for (ist, top) in tops.iter().enumerate().skip(1) {
            assert_eq!(q(0x24 + 8 * (ist - 1)), *top, "IST{ist}");
        }
        assert_eq!(u16::from_le_bytes([t[0x66], t[0x67]]), 0x68);
    }
}
