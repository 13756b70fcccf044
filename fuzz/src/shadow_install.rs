//! Target `shadow_install`: the shadow task made from a hostile `init_task` and
//! `init_files` in a GVM memory image, into a block whose address the GVM's allocator
//! chose: `ShadowBlock::{at, install, prepare_call, state_va, mark_running}`, and
//! `shadow_task`, `shadow_files`, `rebase_self_pointers` on raw templates.
//!
//! Promises checked besides "no panic, no hang" (with a consistent struct layout, as BTF
//! gives; a fuzz-chosen layout is only run):
//! - `ShadowBlock::at` takes exactly the nonzero, aligned blocks that do not wrap;
//! - `install` succeeds only if the templates read, the shadow can be made from them and
//!   the block's task and file-table pages are mapped writable; it writes only the
//!   physical pages of the block's task and file table (when they are not page-table
//!   pages themselves), and exactly the shadow `shadow_task` / `shadow_files` make;
//! - that shadow is a user task on the lent CPU with the block's stack and file table,
//!   no mm, rseq, fs/gs base, work or flags, named "exterior", its FPU state embedded and
//!   owned by no CPU, and no word pointing back into `init_task` (nor its file table into
//!   `init_files`); the file table's count is 1;
//! - `prepare_call` and `mark_running` write only the shadow task's pages, the fields
//!   they name;
//! - `rebase_self_pointers` moves exactly the words that point into the original.

use std::collections::BTreeSet;

use redirect::shadow::{
    rebase_self_pointers, shadow_files, shadow_task, ShadowBlock, ShadowError, ShadowLayout,
    ShadowPlace, BLOCK_SIZE, THREAD_FLAGS_AT_CALL, THREAD_SIZE,
};
use redirect::{translate, Access, AddressSpace, GuestPhysMemory, PagingMode, Privilege};

use crate::codec::{Codec, Io};
use crate::image::{Addr, ImageSpec, Op, Places, Recorder};

const TASK_OFF: u64 = 0x4000;
const FILES_OFF: u64 = 0x8000;

/// A `shadow_install` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    /// GVM memory: tables, `init_task`, `init_files`, the block.
    pub gvm: ImageSpec,
    /// The GVM kernel's CR3.
    pub cr3: Addr,
    /// The block address the GVM's allocator returned.
    pub block: Addr,
    /// Round the block down to `BLOCK_SIZE` (a well-behaved allocator).
    pub block_align: bool,
    /// `init_task`'s address.
    pub init_task: Addr,
    /// Take the layout from `wild` instead of the consistent one.
    pub wild_layout: bool,
    /// Consistent layout: `task_struct` size (`0x70 + n % 0x4010`).
    pub task_size: u16,
    /// Consistent layout: `files_struct` size (`4 + n % 0x8010`).
    pub files_size: u16,
    /// Consistent layout: offset of `files_struct.count` (`% files_size`).
    pub files_count: u16,
    /// Wild layout, in [`ShadowLayout`] field order (each `% 0x4100` unless bit 63 is
    /// set; then raw).
    pub wild: Vec<u64>,
    /// The lent CPU at install and at the next call.
    pub cpu: [u32; 2],
    /// A raw template for the pure functions.
    pub template: Vec<u8>,
    /// Its address, and where its copy goes (`rebase_self_pointers`, `shadow_*`).
    pub from: u64,
    /// See `from`.
    pub to: u64,
}

impl Codec for Case {
    fn io(&mut self, io: &mut Io<'_>) {
        self.gvm.io(io);
        self.cr3.io(io);
        self.block.io(io);
        io.bool(&mut self.block_align);
        self.init_task.io(io);
        io.bool(&mut self.wild_layout);
        if self.wild_layout {
            self.wild.resize(18, 0);
            for v in &mut self.wild {
                io.u64(v);
            }
        } else {
            io.u16(&mut self.task_size);
            io.u16(&mut self.files_size);
            io.u16(&mut self.files_count);
        }
        io.u32(&mut self.cpu[0]);
        io.u32(&mut self.cpu[1]);
        io.blob(&mut self.template, 255);
        io.u64(&mut self.from);
        io.u64(&mut self.to);
    }
}

impl Case {
    fn layout(&self) -> ShadowLayout {
        if self.wild_layout {
            let w = |i: usize| {
                let v = self.wild.get(i).copied().unwrap_or(0);
                if v >> 63 != 0 {
                    v
                } else {
                    v % 0x4100
                }
            };
            return ShadowLayout {
                task_size: w(0),
                flags: w(1),
                ti_flags: w(2),
                ti_syscall_work: w(3),
                ti_cpu: w(4),
                state: w(5),
                on_cpu: w(6),
                stack: w(7),
                mm: w(8),
                files: w(9),
                rseq: w(10),
                comm: w(11),
                fpstate_ptr: w(12),
                fpu_last_cpu: w(13),
                fsbase: w(14),
                gsbase: w(15),
                files_size: w(16),
                files_count: w(17),
            };
        }
        let files_size = 4 + u64::from(self.files_size) % 0x8010;
        consistent(
            0x70 + u64::from(self.task_size) % 0x4010,
            files_size,
            u64::from(self.files_count) % files_size,
        )
    }
}

/// A layout whose fields do not overlap, all below 0x70 (`fpstate_ptr` at 0x50).
fn consistent(task_size: u64, files_size: u64, files_count: u64) -> ShadowLayout {
    ShadowLayout {
        task_size,
        ti_flags: 0,
        ti_syscall_work: 8,
        flags: 0x10,
        ti_cpu: 0x18,
        state: 0x1c,
        stack: 0x20,
        mm: 0x28,
        files: 0x30,
        rseq: 0x38,
        comm: 0x40,
        fpstate_ptr: 0x50,
        fsbase: 0x58,
        gsbase: 0x60,
        fpu_last_cpu: 0x68,
        on_cpu: 0x6c,
        files_size,
        files_count,
    }
}

fn word(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap())
}

fn half(bytes: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
}

/// What one case did (for the seed tests).
#[derive(Debug)]
pub struct Outcome {
    /// `ShadowBlock::install`'s result, if the block was accepted.
    pub install: Option<Result<(), ShadowError>>,
}

/// Runs one input.
pub fn run(data: &[u8]) -> Outcome {
    check(&Case::decode(data))
}

/// Runs one case and checks the promises.
pub fn check(case: &Case) -> Outcome {
    check_pure(case);
    let gvm = case.gvm.build(Places::default());
    let mem = Recorder::new(&gvm.mem);
    let mode = PagingMode::default();
    let cr3 = gvm.addr(&case.cr3);
    let kernel = AddressSpace::new(&mem, mode, cr3);
    let mut base = gvm.addr(&case.block);
    if case.block_align {
        base &= !(BLOCK_SIZE - 1);
    }
    let block = ShadowBlock::at(base);
    let good =
        base != 0 && base.is_multiple_of(BLOCK_SIZE) && base.checked_add(BLOCK_SIZE).is_some();
    assert_eq!(block.is_ok(), good, "ShadowBlock::at({base:#x}): {block:?}");
    let Ok(block) = block else {
        return Outcome { install: None };
    };
    assert_eq!(
        (block.stack_top(), block.task(), block.files()),
        (base + THREAD_SIZE, base + TASK_OFF, base + FILES_OFF)
    );
    let layout = case.layout();
    let init_task = gvm.addr(&case.init_task);
    let [cpu, next_cpu] = case.cpu;

    if case.wild_layout {
        let install = block.install(&kernel, init_task, &layout, cpu);
        let _ = block.prepare_call(&kernel, &layout, next_cpu);
        let _ = block.state_va(&layout);
        let _ = block.mark_running(&kernel, &layout);
        return Outcome {
            install: Some(install),
        };
    }

    // What install should make, computed as it does, from the same (unchanged) memory.
    let place = ShadowPlace {
        task: block.task(),
        stack: base,
        files: block.files(),
        cpu,
    };
    let read = |va: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        kernel
            .read(va, &mut buf, Privilege::Supervisor)
            .ok()
            .map(|()| buf)
    };
    let fits =
        layout.task_size <= FILES_OFF - TASK_OFF && layout.files_size <= BLOCK_SIZE - FILES_OFF;
    let template = read(init_task, layout.task_size).filter(|_| fits);
    let task = template.as_ref().and_then(|t| {
        let made = shadow_task(t, init_task, &layout, &place, FILES_OFF - TASK_OFF).ok()?;
        check_task(&made, t, init_task, &layout, &place, base);
        Some(made)
    });
    let files_ptr = template.as_ref().map(|t| word(t, layout.files));
    let files = task.as_ref().and(files_ptr).and_then(|ptr| {
        let t = read(ptr, layout.files_size)?;
        let made = shadow_files(&t, ptr, &layout, place.files, BLOCK_SIZE - FILES_OFF).ok()?;
        check_files(&made, &t, ptr, &layout, &place, base);
        Some(made)
    });

    // The physical pages install may write (backed, mapped writable), and the pages of
    // the table entries that lead to them.
    mem.log_reads.set(true);
    let pages = |va: u64, len: u64| -> Option<Vec<u64>> {
        (va >> 12..=(va + len - 1) >> 12)
            .map(|p| {
                translate(&mem, &mode, cr3, p << 12, Access::WRITE)
                    .ok()
                    .map(|t| t.gpa >> 12)
                    .filter(|page| mem.contains(page << 12, 0x1000))
            })
            .collect()
    };
    // Only when the structs fit the block (else install refuses them, and these sums
    // could leave the address space).
    let task_pages = fits.then(|| pages(place.task, layout.task_size)).flatten();
    let files_pages = fits
        .then(|| pages(place.files, layout.files_size))
        .flatten();
    mem.log_reads.set(false);
    let tables: BTreeSet<u64> = mem
        .reads
        .borrow()
        .iter()
        .map(|(gpa, _)| gpa >> 12)
        .collect();
    let task_only: BTreeSet<u64> = task_pages.iter().flatten().copied().collect();
    let allowed: BTreeSet<u64> = files_pages
        .iter()
        .flatten()
        .copied()
        .chain(task_only.iter().copied())
        .collect();
    // Writes cannot change a translation, and no two parts share a page.
    let stable = allowed.is_disjoint(&tables);
    let distinct = allowed.len()
        == task_pages.as_ref().map_or(0, Vec::len) + files_pages.as_ref().map_or(0, Vec::len);
    let confined = |what: &str, pages: &BTreeSet<u64>| {
        if !stable {
            return;
        }
        for &(gpa, len) in mem.writes.borrow().iter() {
            for page in gpa >> 12..=(gpa + len - 1) >> 12 {
                assert!(
                    pages.contains(&page),
                    "{what} wrote {gpa:#x}+{len:#x}, outside the pages it may write ({pages:x?})"
                );
            }
        }
    };

    mem.writes.borrow_mut().clear();
    let install = block.install(&kernel, init_task, &layout, cpu);
    confined("install", &allowed);
    let writable = task_pages.is_some() && files_pages.is_some();
    match (&install, &task, &files) {
        (Ok(()), Some(task), Some(files)) => {
            assert!(
                writable,
                "install wrote through a page that is not writable"
            );
            if stable && distinct {
                assert_eq!(read(place.task, layout.task_size).as_ref(), Some(task));
                assert_eq!(read(place.files, layout.files_size).as_ref(), Some(files));
            }
        }
        (Ok(()), _, _) => panic!("install succeeded where its shadow cannot be made"),
        // (Unless its first write changed the tables: the block over the GVM's own.)
        (Err(e), Some(_), Some(_)) => assert!(
            !writable || !stable,
            "install failed ({e}) though the shadow can be made and its pages are writable"
        ),
        (Err(_), _, _) => {}
    }

    if install.is_ok() {
        mem.writes.borrow_mut().clear();
        let prepared = block.prepare_call(&kernel, &layout, next_cpu);
        assert_eq!(
            block.state_va(&layout),
            Ok(place.task + layout.state),
            "state_va"
        );
        let running = block.mark_running(&kernel, &layout);
        confined("prepare_call or mark_running", &task_only);
        if stable {
            assert!(
                prepared.is_ok(),
                "prepare_call failed after install: {prepared:?}"
            );
            assert!(
                running.is_ok(),
                "mark_running failed after install: {running:?}"
            );
            if distinct {
                let t = read(place.task, layout.task_size).expect("the task reads back");
                assert_eq!(half(&t, layout.ti_cpu), next_cpu);
                assert_eq!(word(&t, layout.ti_flags), THREAD_FLAGS_AT_CALL);
                assert_eq!(half(&t, layout.fpu_last_cpu), u32::MAX);
                assert_eq!(half(&t, layout.state), 0);
            }
        }
    }
    Outcome {
        install: Some(install),
    }
}

/// The shadow task `shadow_task` made from `template` (the consistent layout).
fn check_task(
    task: &[u8],
    template: &[u8],
    template_va: u64,
    l: &ShadowLayout,
    place: &ShadowPlace,
    block: u64,
) {
    assert_eq!(task.len() as u64, l.task_size);
    assert_eq!(word(task, l.stack), place.stack);
    assert_eq!(word(task, l.files), place.files);
    for (what, off) in [
        ("mm", l.mm),
        ("rseq", l.rseq),
        ("fsbase", l.fsbase),
        ("gsbase", l.gsbase),
        ("syscall_work", l.ti_syscall_work),
    ] {
        assert_eq!(word(task, off), 0, "{what}");
    }
    assert_eq!(word(task, l.ti_flags), THREAD_FLAGS_AT_CALL);
    assert_eq!(half(task, l.flags), 0, "flags");
    assert_eq!(half(task, l.state), 0, "state");
    assert_eq!(half(task, l.on_cpu), 0, "on_cpu");
    assert_eq!(half(task, l.ti_cpu), place.cpu);
    assert_eq!(half(task, l.fpu_last_cpu), u32::MAX);
    assert_eq!(
        &task[l.comm as usize..l.comm as usize + 16],
        b"exterior\0\0\0\0\0\0\0\0"
    );
    let fp = word(task, l.fpstate_ptr);
    assert!(
        fp >= place.task && fp - place.task < l.task_size,
        "fpstate {fp:#x} is not embedded in the shadow"
    );
    // Nothing of the copy points back into init_task (when the block is elsewhere).
    let original = (template_va, template_va.saturating_add(l.task_size));
    if block.saturating_add(BLOCK_SIZE) <= original.0 || original.1 <= block {
        for off in (0x70..l.task_size & !7).step_by(8) {
            let v = word(task, off);
            assert!(
                v < original.0 || v >= original.1,
                "task word {off:#x} ({v:#x}) still points into init_task"
            );
            let was = word(template, off);
            let want = if was >= original.0 && was < original.1 {
                place.task + (was - template_va)
            } else {
                was
            };
            assert_eq!(v, want, "task word {off:#x} (was {was:#x})");
        }
    }
}

/// The shadow file table `shadow_files` made (the consistent layout).
fn check_files(
    files: &[u8],
    template: &[u8],
    template_va: u64,
    l: &ShadowLayout,
    place: &ShadowPlace,
    block: u64,
) {
    assert_eq!(files.len() as u64, l.files_size);
    assert_eq!(half(files, l.files_count), 1, "files_struct.count");
    let original = (template_va, template_va.saturating_add(l.files_size));
    if block.saturating_add(BLOCK_SIZE) <= original.0 || original.1 <= block {
        for off in (0..l.files_size & !7).step_by(8) {
            if off + 8 > l.files_count && off < l.files_count + 4 {
                continue;
            }
            let v = word(files, off);
            assert!(
                v < original.0 || v >= original.1,
                "files word {off:#x} ({v:#x}) still points into init_files"
            );
            let was = word(template, off);
            let want = if was >= original.0 && was < original.1 {
                place.files + (was - template_va)
            } else {
                was
            };
            assert_eq!(v, want, "files word {off:#x} (was {was:#x})");
        }
    }
}

/// The pure functions on a raw template: no panic, and `rebase_self_pointers` exactly.
fn check_pure(case: &Case) {
    let layout = case.layout();
    let mut bytes = case.template.clone();
    let before = bytes.clone();
    let (from, to) = (case.from, case.to);
    if rebase_self_pointers(&mut bytes, from, to).is_ok() {
        let len = before.len() as u64;
        for (old, new) in before.chunks_exact(8).zip(bytes.chunks_exact(8)) {
            let old = u64::from_le_bytes(old.try_into().unwrap());
            let new = u64::from_le_bytes(new.try_into().unwrap());
            let want = if old >= from && old - from < len {
                to + (old - from)
            } else {
                old
            };
            assert_eq!(new, want, "rebase {from:#x} → {to:#x} of {old:#x}");
        }
        assert_eq!(bytes[before.len() & !7..], before[before.len() & !7..]);
    }
    let place = ShadowPlace {
        task: to,
        stack: to.wrapping_sub(THREAD_SIZE),
        files: to.wrapping_add(FILES_OFF),
        cpu: case.cpu[0],
    };
    let room = u64::from(case.files_count);
    let _ = shadow_task(&case.template, from, &layout, &place, room);
    let _ = shadow_task(&case.template, from, &layout, &place, u64::MAX);
    let _ = shadow_files(&case.template, from, &layout, place.files, room);
    let _ = shadow_files(&case.template, from, &layout, place.files, u64::MAX);
}

/// Small valid cases: the unit tests' GVM (`init_task` with an embedded FPU state and a
/// self-pointing list head, `init_files` past it) installed into an aligned block; the
/// same with the files pointer leading nowhere, with the block over the templates, and
/// with a wild layout.
pub fn seeds() -> Vec<(&'static str, Case)> {
    let init_task = 0x4_0000u64;
    let init_files = 0x5_0000u64;
    let mut task = vec![0u8; 0x200];
    let kva = |off: u64| crate::image::K + off;
    task[0x50..0x58].copy_from_slice(&kva(init_task + 0x180).to_le_bytes());
    task[0x30..0x38].copy_from_slice(&kva(init_files).to_le_bytes());
    task[0x100..0x108].copy_from_slice(&kva(init_task + 0x100).to_le_bytes());
    task[0x108..0x110].copy_from_slice(&kva(init_task + 0x100).to_le_bytes());
    let mut ops: Vec<Op> = task
        .chunks(64)
        .enumerate()
        .map(|(i, c)| Op::bytes(Addr::phys(init_task + 64 * i as u64), c))
        .collect();
    ops.push(Op::bytes(Addr::phys(init_files), &[7u8; 0x40]));
    ops.push(Op::word(
        Addr::phys(init_files + 0x10),
        Addr::kva(init_files + 0x18),
    ));
    let base = Case {
        gvm: ImageSpec {
            pages: 127,
            ops,
            ..ImageSpec::default()
        },
        cr3: Addr::page(1),
        block: Addr::kva(0x1_0000),
        init_task: Addr::kva(init_task),
        task_size: 0x200 - 0x70,
        files_size: 0x40 - 4,
        files_count: 0,
        cpu: [1, 3],
        template: task.iter().copied().take(0xf0).collect(),
        from: kva(init_task),
        to: kva(0x1_4000),
        ..Case::default()
    };
    let mut nowhere = base.clone();
    nowhere.gvm.ops.push(Op::word(
        Addr::phys(init_task + 0x30),
        Addr::raw(0xffff_8000_dead_0000),
    ));
    let mut over = base.clone();
    over.block = Addr::kva(init_task);
    let mut wild = base.clone();
    wild.wild_layout = true;
    (wild.task_size, wild.files_size) = (0, 0);
    wild.wild = vec![
        0x200, 0x2c, 0, 8, 0x18, 0x1c, 0x6c, 0x20, 0x28, 0x30, 0x38, 0x40, 0x50, 0x68, 0x58, 0x60,
        0x40, 0,
    ];
    vec![
        ("install", base),
        ("files-nowhere", nowhere),
        ("block-over-init-task", over),
        ("wild-layout", wild),
    ]
}
