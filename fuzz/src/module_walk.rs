//! Target `module_walk`: a hostile module list (and hostile trap arguments) in a GVM
//! memory image, through `redirect::traps::ModuleLayout::{module_at, module_text, loaded}` and
//! `redirect::traps::describe`, with a window reader like the engine's.
//!
//! Promises checked besides "no panic, no hang":
//! - the walks only read: no write reaches GVM memory, and asking twice gives the same
//!   answer;
//! - each walk is bounded: at most [`MAX_READS_PER_WALK`] physical reads, whatever the
//!   list (the crate walks at most 4096 entries);
//! - a module name found is at most `MODULE_NAME_LEN` characters of printable ASCII with
//!   no trailing blank; a module's text is `[base, base + text_size)` with
//!   `text_size < 2^32` and no wrap;
//! - a report (`describe`) is one line of printable ASCII of bounded length, with or
//!   without a module layout: GVM bytes cannot put control characters on the operator's
//!   terminal.

use redirect::traps::{describe, Args, CallMemory, ModuleLayout, MODULE_NAME_LEN, TRAPS};
use redirect::view::WINDOW_KVA;
use redirect::{AddressSpace, GuestPhysMemory, MemoryImage, PagingMode};

use crate::codec::{Codec, Io};
use crate::image::{Addr, ImageSpec, Op, Places, Recorder};

/// Most physical reads one module walk may make: 4096 entries, each a few words and a
/// name, each word at most two pages of four-level walks.
pub const MAX_READS_PER_WALK: usize = 4096 * 64 + 64;
/// Bytes of the window the reader serves.
const WINDOW_BYTES: u64 = 0x1_0000;

/// A `module_walk` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    /// GVM memory: tables, the list head, the modules.
    pub gvm: ImageSpec,
    /// The GVM kernel's CR3.
    pub cr3: Addr,
    /// `modules`, the list head.
    pub list_head: Addr,
    /// Take the five offsets raw, instead of below 0x400.
    pub offsets_raw: bool,
    /// Offsets of `module.list`, `.name`, `.core_layout.base`, `.size`, `.text_size`.
    pub offsets: [u64; 5],
    /// Where in the window (`% WINDOW_BYTES`) `window` goes.
    pub window_off: u16,
    /// Bytes in the window (the shadow stack and pt_regs during a call).
    pub window: Vec<u8>,
    /// The name asked for (a `delete_module` argument; lossy UTF-8).
    pub name: Vec<u8>,
    /// The address asked about.
    pub addr: Addr,
    /// The trap (`% TRAPS.len()`).
    pub trap: u8,
    /// The trap's arguments.
    pub args: [Addr; 4],
}

impl Codec for Case {
    fn io(&mut self, io: &mut Io<'_>) {
        self.gvm.io(io);
        self.cr3.io(io);
        self.list_head.io(io);
        io.bool(&mut self.offsets_raw);
        for o in &mut self.offsets {
            io.u64(o);
        }
        io.u16(&mut self.window_off);
        io.blob(&mut self.window, 255);
        io.blob(&mut self.name, 64);
        self.addr.io(io);
        io.u8(&mut self.trap);
        for a in &mut self.args {
            a.io(io);
        }
    }
}

fn check_name(name: &str) {
    assert!(
        name.len() <= MODULE_NAME_LEN,
        "module name longer than MODULE_NAME_LEN: {name:?}"
    );
    assert!(
        name.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
        "module name with unprintable characters: {name:?}"
    );
    assert_eq!(name, name.trim_end(), "module name with trailing blanks");
}

fn check_report(report: &str) {
    assert!(!report.is_empty(), "empty report");
    assert!(report.len() <= 1024, "report of {} bytes", report.len());
    assert!(
        report.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
        "report with unprintable characters: {report:?}"
    );
}

/// The outcome of one case (for the seed tests).
#[derive(Debug, Default)]
pub struct Outcome {
    /// `module_at(addr)`.
    pub module_at: Option<String>,
    /// `module_text(name)`.
    pub module_text: Option<(u64, u64)>,
    /// `describe` with the module layout.
    pub report: String,
}

/// Runs one input.
pub fn run(data: &[u8]) -> Outcome {
    check(&Case::decode(data))
}

/// Runs one case and checks the promises.
pub fn check(case: &Case) -> Outcome {
    let gvm = case.gvm.build(Places::default());
    let seen = Recorder::new(&gvm.mem);
    let cr3 = gvm.addr(&case.cr3);
    let kernel = AddressSpace::new(&seen, PagingMode::default(), cr3);
    let window = MemoryImage::new(WINDOW_BYTES as usize);
    let _ = window.write_phys(u64::from(case.window_off) % WINDOW_BYTES, &case.window);
    // As the engine's `read_window`: served only when all of it is in the window.
    let reader = |va: u64, buf: &mut [u8]| {
        va.checked_sub(WINDOW_KVA)
            .filter(|off| {
                off.checked_add(buf.len() as u64)
                    .is_some_and(|end| end <= WINDOW_BYTES)
            })
            .is_some_and(|off| window.read_phys(off, buf).is_ok())
    };
    let call = CallMemory {
        kernel: &kernel,
        window: &reader,
    };
    let off = |i: usize| {
        if case.offsets_raw {
            case.offsets[i]
        } else {
            case.offsets[i] % 0x400
        }
    };
    let layout = ModuleLayout {
        list_head: gvm.addr(&case.list_head),
        list: off(0),
        name: off(1),
        base: off(2),
        size: off(3),
        text_size: off(4),
    };
    let bounded = |what: &str, f: &mut dyn FnMut()| {
        let before = seen.read_count.get();
        f();
        let reads = seen.read_count.get() - before;
        assert!(
            reads <= MAX_READS_PER_WALK,
            "{what} made {reads} reads of GVM memory"
        );
    };

    let addr = gvm.addr(&case.addr);
    let mut at = None;
    bounded("module_at", &mut || at = layout.module_at(&call, addr));
    if let Some(name) = &at {
        check_name(name);
    }
    let mut again = None;
    bounded("module_at", &mut || again = layout.module_at(&call, addr));
    assert_eq!(at, again, "module_at changed its answer");

    let name = String::from_utf8_lossy(&case.name);
    let mut text = None;
    bounded("module_text", &mut || {
        text = layout.module_text(&call, &name)
    });
    if let Some((start, end)) = text {
        assert!(
            start <= end && end - start <= u64::from(u32::MAX),
            "module text {start:#x}..{end:#x}"
        );
    }

    // The whole list, as the trusted-module check walks it (issue #13 item 6).
    let mut all = Vec::new();
    bounded("loaded", &mut || all = layout.loaded(&call));
    for (m, text_size) in &all {
        check_name(&m.name);
        assert!(
            m.size <= u64::from(u32::MAX) && *text_size <= u64::from(u32::MAX),
            "{m:?}: text {text_size:#x}"
        );
    }
    assert_eq!(layout.loaded(&call), all, "loaded changed its answer");

    let trap = TRAPS[usize::from(case.trap) % TRAPS.len()].0;
    let args = Args(case.args.clone().map(|a| gvm.addr(&a)));
    let mut report = String::new();
    // One module lookup at most, plus a few words and strings.
    bounded("describe", &mut || {
        report = describe(trap, args, &call, Some(&layout))
    });
    check_report(&report);
    let plain = describe(trap, args, &CallMemory::gvm_only(&kernel), None);
    check_report(&plain);

    assert!(
        seen.writes.borrow().is_empty(),
        "the module walk wrote GVM memory: {:x?}",
        seen.writes.borrow()
    );
    Outcome {
        module_at: at,
        module_text: text,
        report,
    }
}

/// A module at physical `at` (kernel address `K + at`): next pointer, name, core image
/// `[base, base + size)` with text `size / 2`, as the traps unit tests lay it out.
fn module(at: u64, name: &[u8], base: u64, size: u64, next: Addr) -> Vec<Op> {
    let mut raw = name.to_vec();
    raw.push(0);
    vec![
        Op::word(Addr::phys(at + 8), next),
        Op::bytes(Addr::phys(at + 0x18), &raw),
        Op::word(Addr::phys(at + 0x100), Addr::raw(base)),
        Op::word(Addr::phys(at + 0x108), Addr::raw(size | ((size / 2) << 32))),
    ]
}

/// Small valid cases: a two-module list asked by address and by name, a fatal exception
/// whose message and registers are in GVM memory and in the window, and lists that loop
/// or lead nowhere.
pub fn seeds() -> Vec<(&'static str, Case)> {
    let head = 0x1_0000u64;
    let mut ops = vec![Op::word(Addr::phys(head), Addr::kva(0x2_0008))];
    ops.extend(module(
        0x2_0000,
        b"dummy",
        0xffff_ffff_c000_0000,
        0x3000,
        Addr::kva(0x3_0008),
    ));
    ops.extend(module(
        0x3_0000,
        b"evil\x07",
        0xffff_ffff_c001_0000,
        0x1000,
        Addr::kva(head),
    ));
    let base = Case {
        gvm: ImageSpec {
            pages: 127,
            ops: ops.clone(),
            ..ImageSpec::default()
        },
        cr3: Addr::page(1),
        list_head: Addr::kva(head),
        offsets: [8, 0x18, 0x100, 0x108, 0x10c],
        name: b"dummy".to_vec(),
        addr: Addr::raw(0xffff_ffff_c000_2fff),
        trap: 1,
        args: [
            Addr::raw(0x11),
            Addr::raw(0xffff_ffff_c000_0010),
            Addr::raw(0),
            Addr::raw(0),
        ],
        ..Case::default()
    };
    // die(str, regs): the message in GVM memory, pt_regs in the window, rip in "evil".
    let mut die = base.clone();
    die.gvm
        .ops
        .push(Op::bytes(Addr::phys(0x4_0000), b"invalid opcode\0"));
    die.trap = 3;
    die.args = [
        Addr::kva(0x4_0000),
        Addr::raw(WINDOW_KVA + 0x100),
        Addr::raw(0),
        Addr::raw(0),
    ];
    die.window_off = 0x100 + 16 * 8;
    die.window = 0xffff_ffff_c001_0040u64.to_le_bytes().to_vec();
    die.name = b"evil?".to_vec();
    // The last module points back at the first, never at the head.
    let mut cycle = base.clone();
    cycle
        .gvm
        .ops
        .push(Op::word(Addr::phys(0x3_0008), Addr::kva(0x2_0008)));
    cycle.addr = Addr::raw(0xffff_ffff_d000_0000);
    cycle.trap = 2;
    cycle.args = [
        Addr::kva(0x4_0000),
        Addr::raw(2),
        Addr::raw(0x10),
        Addr::raw(0),
    ];
    let mut nowhere = base.clone();
    nowhere
        .gvm
        .ops
        .push(Op::word(Addr::phys(0x3_0008), Addr::raw(0xdead_0000_0000)));
    nowhere.trap = 6;
    nowhere.args[0] = Addr::kva(0x2_0018);
    vec![
        ("two-modules", base),
        ("die-with-window-regs", die),
        ("cycle", cycle),
        ("points-nowhere", nowhere),
    ]
}
