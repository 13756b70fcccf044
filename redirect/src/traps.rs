//! Traps in the redirect view's private kernel text: the entry of each function below is
//! replaced by `movabs %rax, TRAP_KVA + 8 * index`, a store to a page no memslot backs, so
//! reaching it exits to the VMM, which stops the call there. The call's stores to GVM RAM
//! are then dropped (the VMM's copy-on-write GVM RAM, `vmm/src/executor/cow.rs`): a call
//! that would sleep, or that faults, leaves the GVM exactly as it was, and nothing of the
//! GVM's oops path runs.
//!
//! Everything here is pure: the trap table and code, decoding which trap a store hit, and
//! describing a trap from its arguments by reading (hostile) GVM memory, including a
//! bounded walk of the GVM's module list.

use crate::module_text::LoadedModule;
use crate::paging::{AddressSpace, Privilege};
use crate::profile::{KernelProfile, SymbolTable};
use crate::view::TRAP_KVA;

/// x86 page-fault error code: the access was an instruction fetch.
const PF_INSTR: u64 = 1 << 4;
/// x86 page-fault error code: the page was present (a protection fault).
const PF_PROT: u64 = 1 << 0;
/// `pt_regs.ip`: after r15..r8, ax, cx, dx, si, di, orig_ax (16 words).
const PT_REGS_IP: u64 = 16 * 8;
/// Most modules a name lookup walks (the list lives in GVM memory: hostile input).
const MAX_MODULES: usize = 4096;
/// `MODULE_NAME_LEN` on x86-64.
pub const MODULE_NAME_LEN: usize = 56;

/// Why a call stopped at a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// `__schedule`: the call would sleep (or be preempted) on a borrowed CPU.
    Sleep,
    /// `spurious_kernel_fault`: the first stop of a protection fault on a kernel address,
    /// such as an instruction fetch from a no-execute page of the view (code outside the
    /// trusted image), before the kernel decides the fault is fatal.
    KernelProtectionFault,
    /// `page_fault_oops`: an unhandled page fault in kernel mode.
    PageFaultOops,
    /// `die`: a fatal exception (BUG, invalid opcode, ...).
    Die,
    /// `die_addr`: a fatal general-protection fault.
    DieAddr,
    /// `oops_begin`: anything else on its way to an oops.
    OopsBegin,
    /// `panic`.
    Panic,
}

/// Every trap, with the kernel function it is patched into and whether the engine may run
/// without it.
pub const TRAPS: [(Trap, &str, bool); 7] = [
    (Trap::Sleep, "__schedule", true),
    (Trap::KernelProtectionFault, "spurious_kernel_fault", false),
    (Trap::PageFaultOops, "page_fault_oops", false),
    (Trap::Die, "die", false),
    (Trap::DieAddr, "die_addr", false),
    (Trap::OopsBegin, "oops_begin", false),
    (Trap::Panic, "panic", false),
];

/// The patched-in instruction of trap `index`: `movabs %rax, TRAP_KVA + 8 * index`.
pub fn trap_code(index: usize) -> [u8; 10] {
    let mut code = [0u8; 10];
    code[..2].copy_from_slice(&[0x48, 0xa3]);
    code[2..].copy_from_slice(&(TRAP_KVA + 8 * index as u64).to_le_bytes());
    code
}

/// The trap whose store hit `offset` bytes into the trap page.
pub fn trap_at(offset: u64) -> Option<Trap> {
    if !offset.is_multiple_of(8) {
        return None;
    }
    TRAPS
        .get(usize::try_from(offset / 8).ok()?)
        .map(|(trap, _, _)| *trap)
}

/// A trap placed at its function's address in the trusted text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Index in [`TRAPS`].
    pub index: usize,
    /// The function's kernel virtual address.
    pub address: u64,
}

/// Why the traps cannot be placed or patched in.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TrapError {
    /// The trusted kernel's symbols lack a function the engine cannot run without.
    #[error("the SVM's kallsyms has no {0}")]
    MissingFunction(&'static str),
    /// A trap's function is not inside the kernel text being patched.
    #[error("{name} {address:#x} is outside the kernel text")]
    OutsideText {
        /// The function.
        name: &'static str,
        /// Its address.
        address: u64,
    },
}

/// Places every trap whose function `symbols` names; a required one missing is an error,
/// an optional one is left out and named in the second list.
pub fn place(symbols: &SymbolTable) -> Result<(Vec<Placed>, Vec<&'static str>), TrapError> {
    let mut placed = Vec::new();
    let mut absent = Vec::new();
    for (index, (_, name, required)) in TRAPS.iter().enumerate() {
        match symbols.address(name) {
            Some(address) => placed.push(Placed { index, address }),
            None if *required => return Err(TrapError::MissingFunction(name)),
            None => absent.push(*name),
        }
    }
    Ok((placed, absent))
}

/// Patches each trap's code over its function's entry in `text`, a copy of the kernel
/// text linked at `text_va`.
pub fn patch_text(text: &mut [u8], text_va: u64, traps: &[Placed]) -> Result<(), TrapError> {
    for trap in traps {
        let code = trap_code(trap.index);
        let name = TRAPS.get(trap.index).map_or("?", |t| t.1);
        let outside = TrapError::OutsideText {
            name,
            address: trap.address,
        };
        let at = trap
            .address
            .checked_sub(text_va)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(outside.clone())?;
        text.get_mut(at..at.saturating_add(code.len()))
            .filter(|slot| slot.len() == code.len())
            .ok_or(outside)?
            .copy_from_slice(&code);
    }
    Ok(())
}

/// The function arguments at the trap (System V: RDI, RSI, RDX, RCX).
#[derive(Debug, Clone, Copy, Default)]
pub struct Args(pub [u64; 4]);

/// Reads kernel memory as the call saw it: the window (shadow stack, pt_regs) through
/// `window`, everything else through the GVM's kernel address space.
pub struct CallMemory<'a> {
    /// The GVM kernel's address space, read when `window` does not serve an address.
    pub kernel: &'a AddressSpace<'a>,
    /// Fills the buffer from kernel-virtual address `va` in the window; false if it
    /// cannot (then the GVM is read instead).
    pub window: &'a dyn Fn(u64, &mut [u8]) -> bool,
}

/// The window reader of a [`CallMemory`] that sees only GVM memory.
fn no_window(_: u64, _: &mut [u8]) -> bool {
    false
}

impl<'a> CallMemory<'a> {
    /// Kernel memory without the window: for code that runs outside a call.
    pub fn gvm_only(kernel: &'a AddressSpace<'a>) -> CallMemory<'a> {
        CallMemory {
            kernel,
            window: &no_window,
        }
    }

    fn read(&self, va: u64, buf: &mut [u8]) -> bool {
        (self.window)(va, buf) || self.kernel.read(va, buf, Privilege::Supervisor).is_ok()
    }

    fn u64(&self, va: u64) -> Option<u64> {
        let mut raw = [0u8; 8];
        self.read(va, &mut raw).then(|| u64::from_le_bytes(raw))
    }

    /// A NUL-terminated string of at most `max` bytes, printable ASCII only.
    fn string(&self, va: u64, max: usize) -> Option<String> {
        let mut raw = vec![0u8; max];
        if !self.read(va, &mut raw) {
            // The string may end near a page boundary: try the bytes up to it.
            let room = usize::try_from(0x1000 - (va & 0xfff)).ok()?.min(max);
            raw.truncate(room);
            if !self.read(va, &mut raw) {
                return None;
            }
        }
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Some(
            raw[..end]
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        char::from(b)
                    } else {
                        '?'
                    }
                })
                .collect::<String>()
                .trim_end()
                .to_string(),
        )
    }
}

/// Where to find loaded modules in GVM memory (`modules` list and `struct module`).
#[derive(Debug, Clone, Copy)]
pub struct ModuleLayout {
    /// Kernel-virtual address of the `modules` list head.
    pub list_head: u64,
    /// Byte offset of `module.list` (the list node).
    pub list: u64,
    /// Byte offset of `module.name` ([`MODULE_NAME_LEN`] bytes).
    pub name: u64,
    /// Byte offset of `module.core_layout.base`: start of the module's core image.
    pub base: u64,
    /// Byte offset of `module.core_layout.size`: the core image's size in bytes.
    pub size: u64,
    /// Byte offset of `module.core_layout.text_size`: size in bytes of the core image's
    /// text, at its start.
    pub text_size: u64,
}

impl ModuleLayout {
    /// The layout from the kernel's kallsyms (`modules`) and BTF (`struct module`); `None`
    /// if any of them is missing.
    pub fn from_profile(kernel: &KernelProfile) -> Option<ModuleLayout> {
        let btf = &kernel.btf;
        Some(ModuleLayout {
            list_head: kernel.kallsyms.address("modules")?,
            list: btf.member_offset("module", "list")?,
            name: btf.member_offset("module", "name")?,
            base: btf.member_offset("module", "core_layout.base")?,
            size: btf.member_offset("module", "core_layout.size")?,
            text_size: btf.member_offset("module", "core_layout.text_size")?,
        })
    }

    /// Visits loaded modules (at most [`MAX_MODULES`]) until `found` says stop; returns
    /// what it returned.
    fn find<T>(&self, mem: &CallMemory<'_>, mut found: impl FnMut(u64) -> Option<T>) -> Option<T> {
        let mut node = mem.u64(self.list_head)?;
        for _ in 0..MAX_MODULES {
            if node == self.list_head {
                return None;
            }
            let module = node.checked_sub(self.list)?;
            if let Some(t) = found(module) {
                return Some(t);
            }
            node = mem.u64(node)?;
        }
        None
    }

    /// Every loaded module (at most [`MAX_MODULES`]), in list order, with its core text's
    /// size; the walk ends at the first entry it cannot read.
    pub fn loaded(&self, mem: &CallMemory<'_>) -> Vec<(LoadedModule, u64)> {
        let mut out = Vec::new();
        let mut node = mem.u64(self.list_head);
        for _ in 0..MAX_MODULES {
            let Some(n) = node.filter(|&n| n != self.list_head) else {
                break;
            };
            let entry = n.checked_sub(self.list).and_then(|module| {
                let field = |off: u64| mem.u64(module.checked_add(off)?);
                let module = LoadedModule {
                    name: mem.string(module.checked_add(self.name)?, MODULE_NAME_LEN)?,
                    base: field(self.base)?,
                    size: field(self.size)? & 0xffff_ffff,
                };
                Some((module, field(self.text_size)? & 0xffff_ffff))
            });
            let Some(entry) = entry else { break };
            out.push(entry);
            node = mem.u64(n);
        }
        out
    }

    /// The core text [start, end) of the loaded module called `name`.
    pub fn module_text(&self, mem: &CallMemory<'_>, name: &str) -> Option<(u64, u64)> {
        self.find(mem, |module| {
            let this = mem.string(module.checked_add(self.name)?, MODULE_NAME_LEN)?;
            if this != name {
                return None;
            }
            let base = mem.u64(module.checked_add(self.base)?)?;
            let text = mem.u64(module.checked_add(self.text_size)?)? & 0xffff_ffff;
            Some((base, base.checked_add(text)?))
        })
    }

    /// The name of the GVM module whose core image holds `addr`, walking at most
    /// `MAX_MODULES` (4096) list entries.
    pub fn module_at(&self, mem: &CallMemory<'_>, addr: u64) -> Option<String> {
        self.find(mem, |module| {
            let base = mem.u64(module.checked_add(self.base)?)?;
            let size = mem.u64(module.checked_add(self.size)?)? & 0xffff_ffff;
            if addr >= base && addr - base < size {
                mem.string(module.checked_add(self.name)?, MODULE_NAME_LEN)
            } else {
                None
            }
        })
    }
}

/// " (in module NAME)" when `addr` lies in a loaded module.
fn in_module(modules: Option<&ModuleLayout>, mem: &CallMemory<'_>, addr: u64) -> String {
    modules
        .and_then(|m| m.module_at(mem, addr))
        .map(|name| format!(" (in module {name})"))
        .unwrap_or_default()
}

/// What to tell the operator about a call stopped at `trap` with `args`.
pub fn describe(
    trap: Trap,
    args: Args,
    mem: &CallMemory<'_>,
    modules: Option<&ModuleLayout>,
) -> String {
    let [a0, a1, a2, a3] = args.0;
    let ip_of = |regs: u64| regs.checked_add(PT_REGS_IP).and_then(|va| mem.u64(va));
    let at_ip = |regs: u64| match ip_of(regs) {
        Some(ip) => format!(" at rip {ip:#x}{}", in_module(modules, mem, ip)),
        None => String::new(),
    };
    match trap {
        Trap::Sleep => "the call would sleep: it entered the GVM's scheduler (__schedule), which \
                        a borrowed CPU must not do"
            .into(),
        Trap::KernelProtectionFault if a0 & (PF_INSTR | PF_PROT) == PF_INSTR | PF_PROT => format!(
            "the call tried to execute code outside the trusted kernel image at {a1:#x}{}; \
             the view maps it no-execute",
            in_module(modules, mem, a1)
        ),
        Trap::KernelProtectionFault => {
            format!("the call faulted on a protected kernel page at {a1:#x} (error code {a0:#x})")
        }
        Trap::PageFaultOops => format!(
            "the call faulted in the GVM kernel: page fault at {a2:#x} (error code {a1:#x}){}",
            at_ip(a0)
        ),
        Trap::Die | Trap::DieAddr => {
            let what = mem.string(a0, 64).unwrap_or_else(|| "exception".into());
            let addr = if trap == Trap::DieAddr && a3 != 0 {
                format!(" (address {a3:#x})")
            } else {
                String::new()
            };
            format!(
                "the call hit a fatal exception in the GVM kernel: {what}{addr}{}",
                at_ip(a1)
            )
        }
        Trap::OopsBegin => "the call reached the GVM kernel's oops path".into(),
        Trap::Panic => format!(
            "the call made the GVM kernel panic: {}",
            mem.string(a0, 96).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestPhysMemory, MemoryImage};
    use crate::paging::PagingMode;
    use crate::test_images::{kernel_image, K};

    #[test]
    fn traps_are_placed_from_symbols_and_patched_only_inside_the_text() {
        let syms = SymbolTable::parse(
            "ffffffff81000000 T _stext\nffffffff81000100 T __schedule\nffffffff81000200 T panic\n",
        )
        .unwrap();
        let (placed, absent) = place(&syms).unwrap();
        assert_eq!(
            placed,
            [
                Placed {
                    index: 0,
                    address: 0xffff_ffff_8100_0100
                },
                Placed {
                    index: 6,
                    address: 0xffff_ffff_8100_0200
                },
            ]
        );
        assert_eq!(absent.len(), 5);
        assert!(absent.contains(&"page_fault_oops"));
        let mut text = vec![0x90u8; 0x300];
        patch_text(&mut text, 0xffff_ffff_8100_0000, &placed).unwrap();
        assert_eq!(text[0x100..0x10a], trap_code(0));
        assert_eq!(text[0x200..0x20a], trap_code(6));
        assert!(text[..0x100].iter().all(|&b| b == 0x90));
        // A function whose trap would end past the text, or that lies before it.
        for address in [0xffff_ffff_8100_02f8, 0xffff_ffff_80ff_ffff] {
            let err = patch_text(
                &mut text,
                0xffff_ffff_8100_0000,
                &[Placed { index: 1, address }],
            );
            assert!(matches!(
                err,
                Err(TrapError::OutsideText {
                    name: "spurious_kernel_fault",
                    ..
                })
            ));
        }
        // __schedule is required: the engine cannot stop a sleeping call without it.
        let syms = SymbolTable::parse("ffffffff81000000 T _stext\n").unwrap();
        assert_eq!(place(&syms), Err(TrapError::MissingFunction("__schedule")));
    }

    #[test]
    fn each_trap_has_its_own_slot_in_the_trap_page() {
        for (i, (trap, _, _)) in TRAPS.iter().enumerate() {
            let code = trap_code(i);
            assert_eq!(&code[..2], &[0x48, 0xa3]);
            let target = u64::from_le_bytes(code[2..].try_into().unwrap());
            assert_eq!(trap_at(target - TRAP_KVA), Some(*trap));
        }
        assert_eq!(trap_at(3), None);
        assert_eq!(trap_at(8 * TRAPS.len() as u64), None);
        assert_eq!(
            TRAPS[0].1, "__schedule",
            "the sleep trap is the required one"
        );
    }

    fn layout() -> ModuleLayout {
        ModuleLayout {
            list_head: K + 0x10_0000,
            list: 8,
            name: 0x18,
            base: 0x100,
            size: 0x108,
            text_size: 0x10c,
        }
    }

    /// Adds a module at physical `at` with core image [base, base+size) after `prev`.
    fn add_module(mem: &MemoryImage, at: u64, name: &str, base: u64, size: u64, next: u64) {
        mem.write_u64(at + 8, next).unwrap();
        let mut raw = name.as_bytes().to_vec();
        raw.push(0);
        mem.write_phys(at + 0x18, &raw).unwrap();
        mem.write_u64(at + 0x100, base).unwrap();
        // size, and text_size (the upper half of the same word): half of it.
        mem.write_u64(at + 0x108, size | ((size / 2) << 32))
            .unwrap();
    }

    #[test]
    fn an_address_is_named_by_the_module_that_holds_it() {
        let mem = kernel_image();
        let l = layout();
        // head → dummy (0x20000) → evil (0x30000) → head
        mem.write_u64(0x10_0000, K + 0x2_0008).unwrap();
        add_module(
            &mem,
            0x2_0000,
            "dummy",
            0xffff_ffff_c000_0000,
            0x3000,
            K + 0x3_0008,
        );
        add_module(
            &mem,
            0x3_0000,
            "evil\x07",
            0xffff_ffff_c001_0000,
            0x1000,
            l.list_head,
        );
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let call = CallMemory::gvm_only(&kernel);
        assert_eq!(
            l.module_at(&call, 0xffff_ffff_c000_2fff).as_deref(),
            Some("dummy")
        );
        assert_eq!(
            l.module_at(&call, 0xffff_ffff_c001_0000).as_deref(),
            Some("evil?")
        );
        assert_eq!(l.module_at(&call, 0xffff_ffff_c000_3000), None);
        assert_eq!(
            l.module_text(&call, "dummy"),
            Some((0xffff_ffff_c000_0000, 0xffff_ffff_c000_1800))
        );
        assert_eq!(l.module_text(&call, "absent"), None);
        let m = |name: &str, base, size| LoadedModule {
            name: name.into(),
            base,
            size,
        };
        assert_eq!(
            l.loaded(&call),
            vec![
                (m("dummy", 0xffff_ffff_c000_0000, 0x3000), 0x1800),
                (m("evil?", 0xffff_ffff_c001_0000, 0x1000), 0x800),
            ]
        );
        let text = describe(
            Trap::KernelProtectionFault,
            Args([0x11, 0xffff_ffff_c000_0010, 0, 0]),
            &call,
            Some(&l),
        );
        assert!(
            text.contains("outside the trusted kernel image at 0xffffffffc0000010"),
            "{text}"
        );
        assert!(text.contains("(in module dummy)"), "{text}");
    }

    #[test]
    fn a_module_list_that_loops_or_points_nowhere_ends_the_walk() {
        let mem = kernel_image();
        let l = layout();
        // A cycle that never returns to the head.
        mem.write_u64(0x10_0000, K + 0x2_0008).unwrap();
        add_module(&mem, 0x2_0000, "a", 0x1000, 0x10, K + 0x2_0008);
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let call = CallMemory::gvm_only(&kernel);
        assert_eq!(l.module_at(&call, 0xffff_ffff_c000_0000), None);
        assert_eq!(
            l.loaded(&call).len(),
            MAX_MODULES,
            "the full list is bounded"
        );
        // A pointer to unmapped memory.
        mem.write_u64(0x10_0000, 0xdead_0000_0000).unwrap();
        assert_eq!(l.module_at(&call, 0xffff_ffff_c000_0000), None);
        assert_eq!(l.loaded(&call), vec![]);
        let text = describe(
            Trap::PageFaultOops,
            Args([0xbad, 2, 0x10, 0]),
            &call,
            Some(&l),
        );
        assert!(
            text.contains("page fault at 0x10 (error code 0x2)"),
            "{text}"
        );
    }
}
