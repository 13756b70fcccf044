//! The redirect vCPU's architectural state for one segment of a call, as pure functions
//! (after Firecracker's `arch/x86_64/regs.rs`): segment registers and descriptor tables,
//! the system-call MSRs and XCR0. The control registers, EFER, the system-call MSRs and
//! XCR0 are the trusted SVM kernel's ([`TrustedControl`]: the same image on the same CPU
//! model sets them identically), never the GVM's, whose vCPU state a hostile kernel
//! chooses (write protection off, SMEP off, its own syscall entry); the GDT, IDT and TSS
//! are the window's (`redirect::cpu_tables`), never the GVM's; from the lent GVM CPU come
//! only its TSC and, through GVM memory, its per-cpu base (GS: data). They return what the
//! executor hands to `KVM_SET_SREGS`, `KVM_SET_MSRS` and `KVM_SET_XCRS`.

use kvm_bindings::{kvm_dtable, kvm_msr_entry, kvm_segment, kvm_sregs, kvm_xcrs};
use redirect::cpu_tables::{GDT_SIZE, IDT_SIZE, TSS_SIZE};
use redirect::view::{offsets, ViewLayout};

use crate::boot::cpu::{MSR_IA32_TSC, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};

/// Linux x86-64 GDT selectors (`arch/x86/include/asm/segment.h`): `__KERNEL_CS`,
/// `__KERNEL_DS`, `__USER_DS`, `__USER_CS` and the TSS (GDT entry 8).
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
pub const TSS_SELECTOR: u16 = 0x40;
/// The GDT, IDT and TSS limits.
const GDT_LIMIT: u16 = GDT_SIZE as u16 - 1;
const IDT_LIMIT: u16 = IDT_SIZE as u16 - 1;
const TSS_LIMIT: u32 = TSS_SIZE as u32 - 1;
/// Segment descriptor types: execute/read code, accessed; read/write data, accessed; busy
/// 64-bit TSS.
const TYPE_CODE: u8 = 11;
const TYPE_DATA: u8 = 3;
const TYPE_BUSY_TSS: u8 = 11;

/// CR0 bits the kernel always runs with: protected mode, write protection (a read-only
/// page stays read-only at CPL 0), paging.
const CR0_REQUIRED: u64 = (1 << 0) | (1 << 16) | (1 << 31);
/// EFER bits the kernel always runs with: `syscall`, long mode (enabled, active), NX.
const EFER_REQUIRED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
/// The APIC base MSR's "this is the bootstrap processor" bit: the lent CPU is not.
const APIC_BASE_BSP: u64 = 1 << 8;

/// The control state every segment runs with, taken from the trusted SVM kernel (its
/// vCPU at a redirected call) and checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedControl {
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub sfmask: u64,
    pub xcr0: u64,
}

/// The SVM's control state is not what its kernel sets up: something is badly wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(
        "the SVM kernel runs with CR0 {0:#x}, without protected mode, write protection or paging"
    )]
    Cr0(u64),
    #[error("the SVM kernel runs with EFER {0:#x}, without syscall, long mode or NX")]
    Efer(u64),
    #[error("the SVM kernel's LSTAR {found:#x} is not the trusted entry_SYSCALL_64 {expected:#x}")]
    Lstar { found: u64, expected: u64 },
    #[error("the SVM vCPU's {0} could not be read")]
    Unreadable(&'static str),
    #[error("the SVM kernel's LSTAR {lstar:#x} moved by the GVM's slide {slide:#x} wraps")]
    SlidLstar { lstar: u64, slide: u64 },
}

impl TrustedControl {
    /// Checks what the SVM kernel set up against what the trusted image must have:
    /// `entry_syscall_64` is its system-call entry.
    pub fn checked(self, entry_syscall_64: u64) -> Result<TrustedControl, ControlError> {
        if self.cr0 & CR0_REQUIRED != CR0_REQUIRED {
            return Err(ControlError::Cr0(self.cr0));
        }
        if self.efer & EFER_REQUIRED != EFER_REQUIRED {
            return Err(ControlError::Efer(self.efer));
        }
        if self.lstar != entry_syscall_64 {
            return Err(ControlError::Lstar {
                found: self.lstar,
                expected: entry_syscall_64,
            });
        }
        Ok(TrustedControl {
            apic_base: self.apic_base & !APIC_BASE_BSP,
            ..self
        })
    }

    /// The control state for a GVM whose kernel KASLR moved by `slide`: `syscall` enters
    /// the trusted `entry_SYSCALL_64` where the view runs it (the SVM boots `nokaslr`).
    pub fn slid(self, slide: u64) -> Result<TrustedControl, ControlError> {
        let lstar = self
            .lstar
            .checked_add(slide)
            .ok_or(ControlError::SlidLstar {
                lstar: self.lstar,
                slide,
            })?;
        Ok(TrustedControl { lstar, ..self })
    }
}

/// The privilege a segment starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A kernel function the executor calls itself (CPL 0, the kernel's GS base).
    Kernel,
    /// A program's system call, entered from user mode through `syscall` (CPL 3, FS base
    /// 0, not the program's; the kernel's GS base waits in `KERNEL_GS_BASE` for `swapgs`).
    User,
}

/// A flat 64-bit segment: code (long mode) or data, at privilege `dpl`.
fn flat(selector: u16, code: bool, base: u64, dpl: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xffff_ffff,
        selector,
        type_: if code { TYPE_CODE } else { TYPE_DATA },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// `current` with the control registers, segments, GDT, IDT and TR of a segment that
/// starts in `mode` with the view's page tables at `view_cr3`, on the lent CPU whose
/// per-cpu base is `pcpu_base`. Everything else of `current` (the vCPU's other state) is
/// kept.
pub fn segment_registers(
    current: kvm_sregs,
    control: &TrustedControl,
    view_cr3: u64,
    pcpu_base: u64,
    mode: Mode,
) -> kvm_sregs {
    let mut s = current;
    s.cr0 = control.cr0;
    s.cr3 = view_cr3;
    s.cr4 = control.cr4;
    s.efer = control.efer;
    s.apic_base = control.apic_base;
    match mode {
        Mode::Kernel => {
            s.cs = flat(KERNEL_CS, true, 0, 0);
            s.ss = flat(KERNEL_DS, false, 0, 0);
            s.ds = flat(0, false, 0, 0);
            s.es = flat(0, false, 0, 0);
            s.fs = flat(0, false, 0, 0);
            s.gs = flat(0, false, pcpu_base, 0);
        }
        Mode::User => {
            s.cs = flat(USER_CS, true, 0, 3);
            s.ss = flat(USER_DS, false, 0, 3);
            s.ds = flat(USER_DS, false, 0, 3);
            s.es = flat(USER_DS, false, 0, 3);
            s.fs = flat(0, false, 0, 3);
            s.gs = flat(0, false, 0, 3);
        }
    }
    set_descriptor_tables(&mut s);
    s
}

/// Points GDTR, IDTR and TR at the window's tables and leaves no LDT: what every run of
/// the redirect vCPU starts on, a resumed one included.
pub fn set_descriptor_tables(s: &mut kvm_sregs) {
    s.gdt = kvm_dtable {
        base: ViewLayout::kva(offsets::GDT_TSS),
        limit: GDT_LIMIT,
        padding: [0; 3],
    };
    s.idt = kvm_dtable {
        base: ViewLayout::kva(offsets::IDT),
        limit: IDT_LIMIT,
        padding: [0; 3],
    };
    s.tr = kvm_segment {
        base: ViewLayout::kva(offsets::GDT_TSS + offsets::TSS_IN_PAGE),
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: TYPE_BUSY_TSS,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
}

/// Which descriptor-table register of `s` — the lent CPU at an exit the VMM is about to
/// believe — is no longer the window's, if one is not. Nothing a redirected call runs
/// loads them (Linux loads GDT, IDT and TR at CPU bring-up, the LDT at a context switch,
/// which a call never makes); only trusted code reached through a function pointer in GVM
/// data (`load_direct_gdt` loads the GVM's per-cpu `gdt_page`) could, and from then on the
/// GVM would choose the gates and stacks the call runs on.
pub fn descriptor_tables_changed(s: &kvm_sregs) -> Option<&'static str> {
    let mut expected = *s;
    set_descriptor_tables(&mut expected);
    if (s.gdt.base, s.gdt.limit) != (expected.gdt.base, expected.gdt.limit) {
        return Some("GDTR");
    }
    if (s.idt.base, s.idt.limit) != (expected.idt.base, expected.idt.limit) {
        return Some("IDTR");
    }
    if (s.tr.selector, s.tr.base, s.tr.limit)
        != (expected.tr.selector, expected.tr.base, expected.tr.limit)
    {
        return Some("TR");
    }
    // `lldt` of a null selector leaves no LDT whatever the descriptor cache says.
    if s.ldt.selector != 0 {
        return Some("LDTR");
    }
    None
}

/// The trusted system-call MSRs, the lent CPU's TSC, and `KERNEL_GS_BASE` (the kernel's GS
/// base in user mode, for `swapgs`; 0 in kernel mode, where GS already holds it).
pub fn msrs(control: &TrustedControl, tsc: u64, pcpu_base: u64, mode: Mode) -> [kvm_msr_entry; 5] {
    let other_gs = match mode {
        Mode::Kernel => 0,
        Mode::User => pcpu_base,
    };
    [
        (MSR_STAR, control.star),
        (MSR_LSTAR, control.lstar),
        (MSR_SYSCALL_MASK, control.sfmask),
        (MSR_KERNEL_GS_BASE, other_gs),
        (MSR_IA32_TSC, tsc),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
}

/// The trusted XCR0 (x87 state, bit 0, is architecturally always set).
pub fn xcrs(control: &TrustedControl) -> kvm_xcrs {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = control.xcr0.max(1);
    xcrs
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY_SYSCALL_64: u64 = 0xffff_ffff_8160_0000;

    /// What the SVM kernel sets up (Linux 6.1 on a CPU with SMEP/SMAP).
    fn svm() -> TrustedControl {
        TrustedControl {
            cr0: 0x8005_0033,
            cr4: 0x3506f0,
            efer: 0xd01,
            xcr0: 0x7,
            apic_base: 0xfee0_0900,
            star: 0x0023_0010_0000_0000,
            lstar: ENTRY_SYSCALL_64,
            sfmask: 0x4_7700,
        }
    }

    fn control() -> TrustedControl {
        svm().checked(ENTRY_SYSCALL_64).unwrap()
    }

    #[test]
    fn the_svm_kernels_control_state_is_checked_and_the_bsp_bit_dropped() {
        assert_eq!(control().apic_base, 0xfee0_0800);
        let no_wp = TrustedControl {
            cr0: 0x8000_0033,
            ..svm()
        };
        assert_eq!(
            no_wp.checked(ENTRY_SYSCALL_64),
            Err(ControlError::Cr0(0x8000_0033))
        );
        let no_nx = TrustedControl {
            efer: 0x501,
            ..svm()
        };
        assert_eq!(
            no_nx.checked(ENTRY_SYSCALL_64),
            Err(ControlError::Efer(0x501))
        );
        assert_eq!(
            svm().checked(ENTRY_SYSCALL_64 + 16),
            Err(ControlError::Lstar {
                found: ENTRY_SYSCALL_64,
                expected: ENTRY_SYSCALL_64 + 16
            })
        );
    }

    const PCPU_BASE: u64 = 0xffff_8880_1f00_0000;

    #[test]
    fn a_kernel_segment_runs_at_cpl0_with_the_kernel_gs_base() {
        let s = segment_registers(
            kvm_sregs::default(),
            &control(),
            0x9000,
            PCPU_BASE,
            Mode::Kernel,
        );
        assert_eq!(
            (s.cr0, s.cr3, s.cr4, s.efer),
            (0x8005_0033, 0x9000, 0x3506f0, 0xd01)
        );
        assert_eq!(
            (s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db),
            (KERNEL_CS, 0, 1, 0)
        );
        assert_eq!((s.ss.selector, s.ss.dpl, s.ss.db), (KERNEL_DS, 0, 1));
        assert_eq!(s.gs.base, PCPU_BASE);
        assert_eq!(s.fs.base, 0);
        // The window's tables (kernel-virtual 0xffff_fe80_0000_0000 + offset), never an
        // address derived from the GVM's per-cpu base.
        assert_eq!((s.gdt.base, s.gdt.limit), (0xffff_fe80_0000_3000, 127));
        assert_eq!((s.idt.base, s.idt.limit), (0xffff_fe80_0000_4000, 4095));
        assert_eq!(
            (s.tr.selector, s.tr.base, s.tr.limit, s.tr.type_),
            (TSS_SELECTOR, 0xffff_fe80_0000_3800, 0x67, 11)
        );
        let m = msrs(&control(), 123_456, PCPU_BASE, Mode::Kernel);
        assert_eq!(m[3].index, MSR_KERNEL_GS_BASE);
        assert_eq!(m[3].data, 0);
    }

    #[test]
    fn a_system_call_starts_at_cpl3_with_no_fs_of_the_programs_and_the_kernel_gs_in_waiting() {
        let mode = Mode::User;
        let s = segment_registers(kvm_sregs::default(), &control(), 0x9000, PCPU_BASE, mode);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (USER_CS, 3, 1));
        for seg in [s.ss, s.ds, s.es] {
            assert_eq!((seg.selector, seg.dpl, seg.type_), (USER_DS, 3, TYPE_DATA));
        }
        // The program's FS base (its TLS) is not the GVM's to see.
        assert_eq!((s.fs.base, s.gs.base), (0, 0));
        let m = msrs(&control(), 123_456, PCPU_BASE, mode);
        let by_index = |i: u32| m.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(by_index(MSR_KERNEL_GS_BASE), Some(PCPU_BASE));
        assert_eq!(by_index(MSR_LSTAR), Some(control().lstar));
        assert_eq!(by_index(MSR_STAR), Some(control().star));
        assert_eq!(by_index(MSR_SYSCALL_MASK), Some(control().sfmask));
        assert_eq!(by_index(MSR_IA32_TSC), Some(123_456));
    }

    #[test]
    fn a_run_that_left_the_windows_descriptor_tables_is_caught() {
        let start = segment_registers(
            kvm_sregs::default(),
            &control(),
            0x9000,
            PCPU_BASE,
            Mode::Kernel,
        );
        assert_eq!(descriptor_tables_changed(&start), None);
        // What a run may change, and KVM may report differently, is not a switch.
        let mut s = start;
        s.cr3 = 0xa000;
        s.gs.base = 0x1234;
        s.tr.type_ = 9;
        s.ldt.unusable = 0;
        assert_eq!(descriptor_tables_changed(&s), None);
        type Switch = fn(&mut kvm_sregs);
        let switched: [(&str, Switch); 7] = [
            ("GDTR", |s| s.gdt.base = PCPU_BASE + 0x1000),
            ("GDTR", |s| s.gdt.limit = 0xffff),
            ("IDTR", |s| s.idt.base = 0xffff_ffff_fe00_0000),
            ("IDTR", |s| s.idt.limit = 0x1ff),
            ("TR", |s| s.tr.selector = 0x50),
            ("TR", |s| s.tr.base = PCPU_BASE + 0x6000),
            ("LDTR", |s| s.ldt.selector = 0x50),
        ];
        for (what, switch) in switched {
            let mut s = start;
            switch(&mut s);
            assert_eq!(descriptor_tables_changed(&s), Some(what), "{s:?}");
        }
        // A resumed run starts on the window's tables again whatever it stopped with.
        let mut s = start;
        s.gdt.base = 0;
        s.ldt.selector = 0x50;
        set_descriptor_tables(&mut s);
        assert_eq!(descriptor_tables_changed(&s), None);
    }

    #[test]
    fn xcr0_keeps_x87_state_on() {
        let mut c = control();
        assert_eq!(xcrs(&c).xcrs[0].value, 0x7);
        c.xcr0 = 0;
        let x = xcrs(&c);
        assert_eq!((x.nr_xcrs, x.xcrs[0].xcr, x.xcrs[0].value), (1, 0, 1));
    }
}
