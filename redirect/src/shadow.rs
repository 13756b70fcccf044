//! The shadow task (DESIGN.md 4.2 step 4): the `current` of the lent CPU while it runs a
//! redirected call.
//!
//! It is a copy of the GVM's `init_task` placed in a block of GVM memory the executor takes
//! from the GVM's own page allocator (so the GVM can reach a parked call's wait-queue
//! entries and lock owners), edited into a
//! plain user task that borrows the GVM's root credentials, root fs, namespaces, signal
//! structures and cgroups (so paths, /proc and hostnames resolve as in the GVM's init),
//! and owns what must not touch the GVM's tasks: its own kernel stack, its own
//! `files_struct` (fds opened by redirected calls live there, not in any GVM process), its
//! own FPU state. It is never linked into the GVM's task list, so no GVM tool sees it.
//!
//! Copies are rebased: every 8-byte word that points into the original object is moved to
//! the copy's address, which fixes every self-referencing list head, the embedded FPU
//! state pointer, and `group_leader`/`real_parent` (the idle task is its own leader).

use thiserror::Error;

use crate::paging::{AddressSpace, Privilege, WalkError};
use crate::profile::KernelProfile;

/// Linux `__state` bits.
const TASK_INTERRUPTIBLE: u32 = 1;
const TASK_UNINTERRUPTIBLE: u32 = 2;
/// TIF_NEED_FPU_LOAD (x86, 6.1): restore the task's FPU state before returning to user.
const TIF_NEED_FPU_LOAD: u64 = 14;
/// The shadow's thread flags at the start of every call: only TIF_NEED_FPU_LOAD.
pub const THREAD_FLAGS_AT_CALL: u64 = 1 << TIF_NEED_FPU_LOAD;

/// Why the shadow task could not be laid out, made or updated.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShadowError {
    /// Kernel BTF lacks a struct or member the shadow needs (or `init_task`'s FPU state is
    /// not embedded in it); names what is missing.
    #[error("kernel BTF has no {0}, needed for the shadow task")]
    MissingField(&'static str),
    /// A struct is larger than the room the shadow block has for it.
    #[error("{what} is {size:#x} bytes, more than the {room:#x} the shadow block has for it")]
    TooLarge {
        /// The struct.
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The room for it in bytes.
        room: u64,
    },
    /// A template read from the GVM is shorter than its struct, or a field offset lies
    /// outside it; names the struct.
    #[error("the template {0} is shorter than its struct")]
    ShortTemplate(&'static str),
    /// GVM kernel memory could not be read or written there.
    #[error("GVM kernel memory at {va:#x}: {source}")]
    Memory {
        /// The kernel virtual address.
        va: u64,
        /// Why the walk or the access failed.
        #[source]
        source: WalkError,
    },
    /// The GVM's allocator returned an unusable block address (zero, not aligned to
    /// [`BLOCK_SIZE`], or wrapping); holds that address.
    #[error("the GVM's page allocator gave {0:#x} for the shadow block (64 KiB, aligned)")]
    BadBlock(u64),
    /// An address in the shadow block (or a pointer rebased into it) does not fit in 64
    /// bits: the block's address came from the GVM.
    #[error("shadow address {base:#x} plus {offset:#x} overflows")]
    AddressOverflow {
        /// The address in the block.
        base: u64,
        /// What was added to it.
        offset: u64,
    },
}

/// Order of the shadow block: 2^4 GVM pages.
pub const BLOCK_ORDER: u64 = 4;
/// The shadow block's size; it is aligned to it.
pub const BLOCK_SIZE: u64 = 0x1000 << BLOCK_ORDER;
/// The kernel stack (`THREAD_SIZE` on x86-64, aligned to it) is the block's start.
pub const THREAD_SIZE: u64 = 0x4000;
const TASK_OFF: u64 = 0x4000;
const FILES_OFF: u64 = 0x8000;

/// The shadow task's home in GVM memory: one block from the GVM's page allocator
/// (direct-map addresses) holding its kernel stack, `task_struct` and `files_struct`.
/// The block is the GVM's, so everything a call leaves in the GVM's lists (wait-queue
/// entries on its stack, lock owners) stays addressable there after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowBlock {
    base: u64,
}

fn read(kernel: &AddressSpace<'_>, va: u64, buf: &mut [u8]) -> Result<(), ShadowError> {
    kernel
        .read(va, buf, Privilege::Supervisor)
        .map_err(|source| ShadowError::Memory { va, source })
}

fn write(kernel: &AddressSpace<'_>, va: u64, bytes: &[u8]) -> Result<(), ShadowError> {
    kernel
        .write(va, bytes, Privilege::Supervisor)
        .map_err(|source| ShadowError::Memory { va, source })
}

impl ShadowBlock {
    /// The block at `base`, as the GVM's allocator returned it (hostile: checked).
    pub fn at(base: u64) -> Result<ShadowBlock, ShadowError> {
        if base == 0 || !base.is_multiple_of(BLOCK_SIZE) || base.checked_add(BLOCK_SIZE).is_none() {
            return Err(ShadowError::BadBlock(base));
        }
        Ok(ShadowBlock { base })
    }

    // `at` checked that `base + BLOCK_SIZE` fits, and every offset below is less than
    // BLOCK_SIZE: these sums cannot overflow.

    /// The shadow `task_struct`.
    pub fn task(&self) -> u64 {
        self.base + TASK_OFF
    }

    /// The top of the shadow's kernel stack.
    pub fn stack_top(&self) -> u64 {
        self.base + THREAD_SIZE
    }

    /// The shadow `files_struct`.
    pub fn files(&self) -> u64 {
        self.base + FILES_OFF
    }

    /// The address of the shadow `task_struct`'s field at `offset` (from the profile,
    /// which does not bound it by the block).
    fn field(&self, offset: u64) -> Result<u64, ShadowError> {
        let base = self.task();
        base.checked_add(offset)
            .ok_or(ShadowError::AddressOverflow { base, offset })
    }

    /// Makes the shadow task and file table in the block from the GVM's `init_task` (at
    /// `init_task`) and its file table, for a call on CPU `cpu`.
    pub fn install(
        &self,
        kernel: &AddressSpace<'_>,
        init_task: u64,
        layout: &ShadowLayout,
        cpu: u32,
    ) -> Result<(), ShadowError> {
        let too_large = |what, size, room| ShadowError::TooLarge { what, size, room };
        if layout.task_size > FILES_OFF - TASK_OFF {
            return Err(too_large(
                "task_struct",
                layout.task_size,
                FILES_OFF - TASK_OFF,
            ));
        }
        if layout.files_size > BLOCK_SIZE - FILES_OFF {
            return Err(too_large(
                "files_struct",
                layout.files_size,
                BLOCK_SIZE - FILES_OFF,
            ));
        }
        // Both sizes are bounded by the block just above.
        let mut template = vec![0u8; layout.task_size as usize];
        read(kernel, init_task, &mut template)?;
        let files_ptr = read_u64(&template, layout.files)?;
        let place = ShadowPlace {
            task: self.task(),
            stack: self.base,
            files: self.files(),
            cpu,
        };
        let task = shadow_task(&template, init_task, layout, &place, FILES_OFF - TASK_OFF)?;
        let mut files_template = vec![0u8; layout.files_size as usize];
        read(kernel, files_ptr, &mut files_template)?;
        let files = shadow_files(
            &files_template,
            files_ptr,
            layout,
            place.files,
            BLOCK_SIZE - FILES_OFF,
        )?;
        write(kernel, place.task, &task)?;
        write(kernel, place.files, &files)
    }

    /// Readies the shadow for a new call on CPU `cpu`: it runs there, and its FPU state is
    /// in no CPU's registers (the kernel restores it on the way out, as for any task).
    pub fn prepare_call(
        &self,
        kernel: &AddressSpace<'_>,
        layout: &ShadowLayout,
        cpu: u32,
    ) -> Result<(), ShadowError> {
        write(kernel, self.field(layout.ti_cpu)?, &cpu.to_le_bytes())?;
        write(
            kernel,
            self.field(layout.ti_flags)?,
            &THREAD_FLAGS_AT_CALL.to_le_bytes(),
        )?;
        write(
            kernel,
            self.field(layout.fpu_last_cpu)?,
            &u32::MAX.to_le_bytes(),
        )
    }

    /// Where the shadow's `__state` is (what a call that reached `__schedule` set it to).
    pub fn state_va(&self, layout: &ShadowLayout) -> Result<u64, ShadowError> {
        self.field(layout.state)
    }

    /// Whether a call that stopped in `__schedule` with the shadow in `state` waits
    /// interruptibly (for data, an event or a signal), which a call may not do.
    pub fn waits_interruptibly(state: u32) -> bool {
        state & TASK_INTERRUPTIBLE != 0 && state & TASK_UNINTERRUPTIBLE == 0
    }

    /// Marks the shadow running (a parked call): wake-ups in the GVM then leave run queues
    /// alone, and the call's wait loop sees its condition when it is resumed.
    pub fn mark_running(
        &self,
        kernel: &AddressSpace<'_>,
        layout: &ShadowLayout,
    ) -> Result<(), ShadowError> {
        write(kernel, self.state_va(layout)?, &0u32.to_le_bytes())
    }
}

/// Field offsets the shadow needs beyond [`crate::profile::Layouts`]. Offsets are byte
/// offsets in `struct task_struct` unless stated otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLayout {
    /// Size of `struct task_struct` in bytes.
    pub task_size: u64,
    /// `flags` (PF_*): zero in the shadow, which is neither a kernel thread nor idle.
    pub flags: u64,
    /// `thread_info.flags` (TIF_*): [`THREAD_FLAGS_AT_CALL`] at every call.
    pub ti_flags: u64,
    /// `thread_info.syscall_work`: zero in the shadow, so no seccomp, tracing or syscall
    /// user dispatch work runs on its calls.
    pub ti_syscall_work: u64,
    /// `thread_info.cpu` (a `u32`): the lent CPU.
    pub ti_cpu: u64,
    /// `__state` (a `u32`): what a call that reached `__schedule` set it to.
    pub state: u64,
    /// `on_cpu`: 1 in the idle-task template; 0 in the shadow, so GVM tasks contending
    /// for a lock it holds sleep instead of spinning on it.
    pub on_cpu: u64,
    /// `stack`: the base of the task's kernel stack.
    pub stack: u64,
    /// `mm`: NULL in the shadow, so a fault on an unmapped user address ends in -EFAULT.
    pub mm: u64,
    /// `files`: the shadow's own `files_struct`.
    pub files: u64,
    /// `rseq`: NULL in the shadow.
    pub rseq: u64,
    /// `comm`: the task name, "exterior" in the shadow.
    pub comm: u64,
    /// `thread.fpu.fpstate`: must point at the FPU state embedded in the task.
    pub fpstate_ptr: u64,
    /// `thread.fpu.last_cpu`: -1 means no CPU holds this task's FPU registers.
    pub fpu_last_cpu: u64,
    /// `thread.fsbase`: zero in the shadow.
    pub fsbase: u64,
    /// `thread.gsbase`: zero in the shadow.
    pub gsbase: u64,
    /// Size of `struct files_struct` in bytes.
    pub files_size: u64,
    /// Byte offset of `files_struct.count`: 1 in the shadow.
    pub files_count: u64,
}

impl ShadowLayout {
    /// Takes the offsets from `p`'s layouts and BTF; fails naming the first one missing.
    pub fn from_profile(p: &KernelProfile) -> Result<ShadowLayout, ShadowError> {
        let t = &p.layouts.task;
        let off = |s: &str, m: &'static str| p.offset_of(s, m).ok_or(ShadowError::MissingField(m));
        let files_size = p
            .btf
            .struct_id("files_struct")
            .and_then(|id| p.btf.type_size(id))
            .ok_or(ShadowError::MissingField("struct files_struct"))?;
        Ok(ShadowLayout {
            task_size: t.size,
            flags: t.flags,
            ti_flags: t.thread_info_flags,
            ti_syscall_work: off("task_struct", "thread_info.syscall_work")?,
            ti_cpu: off("task_struct", "thread_info.cpu")?,
            state: off("task_struct", "__state")?,
            on_cpu: off("task_struct", "on_cpu")?,
            stack: t.stack,
            mm: t.mm,
            files: t.files,
            rseq: t.rseq,
            comm: t.comm,
            fpstate_ptr: off("task_struct", "thread.fpu.fpstate")?,
            fpu_last_cpu: off("task_struct", "thread.fpu.last_cpu")?,
            fsbase: t.thread_fsbase,
            gsbase: off("task_struct", "thread.gsbase")?,
            files_size,
            files_count: off("files_struct", "count")?,
        })
    }
}

/// Moves every aligned 8-byte word of `bytes` that points into `[from, from + len)` to the
/// same offset from `to`; an error if a moved pointer would not fit in 64 bits.
pub fn rebase_self_pointers(bytes: &mut [u8], from: u64, to: u64) -> Result<(), ShadowError> {
    let len = bytes.len() as u64;
    for word in bytes.chunks_exact_mut(8) {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(word);
        let v = u64::from_le_bytes(raw);
        if v >= from && v - from < len {
            let offset = v - from;
            let moved = to
                .checked_add(offset)
                .ok_or(ShadowError::AddressOverflow { base: to, offset })?;
            word.copy_from_slice(&moved.to_le_bytes());
        }
    }
    Ok(())
}

fn put(bytes: &mut [u8], off: u64, value: &[u8]) -> Result<(), ShadowError> {
    let start = usize::try_from(off).map_err(|_| ShadowError::ShortTemplate("task_struct"))?;
    bytes
        .get_mut(start..start.saturating_add(value.len()))
        .filter(|slot| slot.len() == value.len())
        .ok_or(ShadowError::ShortTemplate("task_struct"))?
        .copy_from_slice(value);
    Ok(())
}

/// Where the shadow's parts live (kernel-virtual addresses in the shadow block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowPlace {
    /// The shadow `task_struct`.
    pub task: u64,
    /// The base (lowest address) of the shadow's kernel stack, stored in `task_struct.stack`.
    pub stack: u64,
    /// The shadow `files_struct`.
    pub files: u64,
    /// The number of the GVM CPU lent to the call.
    pub cpu: u32,
}

/// Makes the shadow `task_struct` from the GVM's `init_task` bytes (at `template_va`).
pub fn shadow_task(
    template: &[u8],
    template_va: u64,
    layout: &ShadowLayout,
    place: &ShadowPlace,
    room: u64,
) -> Result<Vec<u8>, ShadowError> {
    if layout.task_size > room {
        return Err(ShadowError::TooLarge {
            what: "task_struct",
            size: layout.task_size,
            room,
        });
    }
    let size =
        usize::try_from(layout.task_size).map_err(|_| ShadowError::ShortTemplate("task_struct"))?;
    let mut task = template
        .get(..size)
        .ok_or(ShadowError::ShortTemplate("task_struct"))?
        .to_vec();
    rebase_self_pointers(&mut task, template_va, place.task)?;
    // A user task that is not the idle task: no PF_KTHREAD (whose FPU handling warns on the
    // way back to user mode), no PF_IDLE.
    put(&mut task, layout.flags, &0u32.to_le_bytes())?;
    put(
        &mut task,
        layout.ti_flags,
        &THREAD_FLAGS_AT_CALL.to_le_bytes(),
    )?;
    // No seccomp, tracing or syscall user dispatch work on its calls.
    put(&mut task, layout.ti_syscall_work, &0u64.to_le_bytes())?;
    put(&mut task, layout.ti_cpu, &place.cpu.to_le_bytes())?;
    put(&mut task, layout.state, &0u32.to_le_bytes())?;
    put(&mut task, layout.on_cpu, &0u32.to_le_bytes())?;
    put(&mut task, layout.stack, &place.stack.to_le_bytes())?;
    // No mm: a fault on a user address the view does not map ends in -EFAULT through the
    // uaccess fixup, never in the GVM's fault handler "fixing" someone's page tables.
    put(&mut task, layout.mm, &0u64.to_le_bytes())?;
    put(&mut task, layout.files, &place.files.to_le_bytes())?;
    put(&mut task, layout.rseq, &0u64.to_le_bytes())?;
    put(&mut task, layout.fsbase, &0u64.to_le_bytes())?;
    put(&mut task, layout.gsbase, &0u64.to_le_bytes())?;
    put(&mut task, layout.comm, b"exterior\0\0\0\0\0\0\0\0")?;
    put(&mut task, layout.fpu_last_cpu, &u32::MAX.to_le_bytes())?;
    // fpstate already points into the copy when the template's pointed at its own embedded
    // state (rebased above); anything else would share FPU state with a GVM task.
    let fp = read_u64(&task, layout.fpstate_ptr)?;
    let task_end =
        place
            .task
            .checked_add(layout.task_size)
            .ok_or(ShadowError::AddressOverflow {
                base: place.task,
                offset: layout.task_size,
            })?;
    if !(place.task..task_end).contains(&fp) {
        return Err(ShadowError::MissingField(
            "an embedded FPU state in init_task (thread.fpu.fpstate points elsewhere)",
        ));
    }
    Ok(task)
}

/// Makes the shadow `files_struct` from the GVM's `init_files` bytes (at `template_va`):
/// its fd table is the embedded one, empty (kernel threads open nothing), count 1.
pub fn shadow_files(
    template: &[u8],
    template_va: u64,
    layout: &ShadowLayout,
    files_va: u64,
    room: u64,
) -> Result<Vec<u8>, ShadowError> {
    if layout.files_size > room {
        return Err(ShadowError::TooLarge {
            what: "files_struct",
            size: layout.files_size,
            room,
        });
    }
    let size = usize::try_from(layout.files_size)
        .map_err(|_| ShadowError::ShortTemplate("files_struct"))?;
    let mut files = template
        .get(..size)
        .ok_or(ShadowError::ShortTemplate("files_struct"))?
        .to_vec();
    rebase_self_pointers(&mut files, template_va, files_va)?;
    put(&mut files, layout.files_count, &1u32.to_le_bytes())
        .map_err(|_| ShadowError::ShortTemplate("files_struct"))?;
    Ok(files)
}

fn read_u64(bytes: &[u8], off: u64) -> Result<u64, ShadowError> {
    let start = usize::try_from(off).map_err(|_| ShadowError::ShortTemplate("task_struct"))?;
    let raw: [u8; 8] = bytes
        .get(start..start.saturating_add(8))
        .and_then(|s| s.try_into().ok())
        .ok_or(ShadowError::ShortTemplate("task_struct"))?;
    Ok(u64::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestPhysMemory;

    fn layout() -> ShadowLayout {
        ShadowLayout {
            task_size: 0x200,
            flags: 0x2c,
            ti_flags: 0,
            ti_syscall_work: 8,
            ti_cpu: 0x18,
            state: 0x1c,
            on_cpu: 0x6c,
            stack: 0x20,
            mm: 0x28,
            files: 0x30,
            rseq: 0x38,
            comm: 0x40,
            fpstate_ptr: 0x50,
            fpu_last_cpu: 0x68,
            fsbase: 0x58,
            gsbase: 0x60,
            files_size: 0x40,
            files_count: 0,
        }
    }

    #[test]
    fn self_pointers_move_with_the_copy_and_others_stay() {
        let mut bytes = vec![0u8; 32];
        bytes[0..8].copy_from_slice(&0x1000u64.to_le_bytes()); // the start
        bytes[8..16].copy_from_slice(&0x101fu64.to_le_bytes()); // last byte
        bytes[16..24].copy_from_slice(&0x1020u64.to_le_bytes()); // one past: outside
        bytes[24..32].copy_from_slice(&0xfffu64.to_le_bytes());
        rebase_self_pointers(&mut bytes, 0x1000, 0x9000).unwrap();
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(
            [word(0), word(1), word(2), word(3)],
            [0x9000, 0x901f, 0x1020, 0xfff]
        );
    }

    #[test]
    fn the_shadow_is_a_user_task_with_its_own_stack_files_and_fpu_state() {
        let l = layout();
        let mut template = vec![0xaau8; 0x200];
        let template_va: u64 = 0xffff_ffff_8260_0000;
        // list head pointing to itself, fpstate embedded, a pointer outside (cred).
        template[0x100..0x108].copy_from_slice(&(template_va + 0x100).to_le_bytes());
        template[0x50..0x58].copy_from_slice(&(template_va + 0x180).to_le_bytes());
        template[0x108..0x110].copy_from_slice(&0xffff_ffff_8270_0000u64.to_le_bytes());
        let place = ShadowPlace {
            task: 0xffff_f800_0001_0000,
            stack: 0xffff_f800_0002_0000,
            files: 0xffff_f800_0005_0000,
            cpu: 1,
        };
        let t = shadow_task(&template, template_va, &l, &place, 0x1000).unwrap();
        let r = |off: u64| read_u64(&t, off).unwrap();
        assert_eq!(r(0x100), place.task + 0x100);
        assert_eq!(r(0x108), 0xffff_ffff_8270_0000);
        assert_eq!(r(l.fpstate_ptr), place.task + 0x180);
        assert_eq!(r(l.stack), place.stack);
        assert_eq!(r(l.files), place.files);
        assert_eq!(r(l.mm), 0);
        assert_eq!(r(l.ti_flags), 1 << TIF_NEED_FPU_LOAD);
        assert_eq!(u32::from_le_bytes(t[0x2c..0x30].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(t[0x18..0x1c].try_into().unwrap()), 1);
        assert_eq!(&t[0x40..0x48], b"exterior");
        // The template (filled with 0xaa) was "on a CPU"; the shadow is not.
        assert_eq!(u32::from_le_bytes(t[0x6c..0x70].try_into().unwrap()), 0);
    }

    /// A GVM whose `init_task` (at K + 0x20_0000) points at `init_files` (K + 0x21_0000).
    fn gvm_with_init_task() -> (crate::MemoryImage, u64) {
        let mem = crate::test_images::kernel_image();
        let init_task = crate::test_images::K + 0x20_0000;
        let mut task = vec![0u8; 0x200];
        task[0x50..0x58].copy_from_slice(&(init_task + 0x180).to_le_bytes());
        task[0x30..0x38].copy_from_slice(&(init_task + 0x1_0000).to_le_bytes());
        mem.write_phys(0x20_0000, &task).unwrap();
        mem.write_phys(0x21_0000, &[7u8; 0x40]).unwrap();
        (mem, init_task)
    }

    #[test]
    fn the_shadow_block_is_installed_in_gvm_memory_and_readied_per_call() {
        use crate::paging::{AddressSpace, PagingMode};
        let (mem, init_task) = gvm_with_init_task();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let block = ShadowBlock::at(crate::test_images::K + 0x10_0000).unwrap();
        let l = layout();
        block.install(&kernel, init_task, &l, 1).unwrap();
        let word = |va: u64| {
            let mut raw = [0u8; 8];
            kernel.read(va, &mut raw, Privilege::Supervisor).unwrap();
            u64::from_le_bytes(raw)
        };
        assert_eq!(block.task(), block.stack_top());
        assert_eq!(
            word(block.task() + l.stack),
            block.stack_top() - THREAD_SIZE
        );
        assert_eq!(word(block.task() + l.files), block.files());
        assert_eq!(word(block.task() + l.fpstate_ptr), block.task() + 0x180);
        // The file table's count is 1, the rest is init_files'.
        assert_eq!(word(block.files()), 0x0707_0707_0000_0001);
        // The GVM's own init_task is untouched.
        assert_eq!(word(init_task + l.files), init_task + 0x1_0000);

        // A call on CPU 3 after one that left FPU state and other flags behind.
        let mut raw = [0xffu8; 8];
        kernel
            .write(block.task() + l.ti_flags, &raw, Privilege::Supervisor)
            .unwrap();
        block.prepare_call(&kernel, &l, 3).unwrap();
        assert_eq!(word(block.task() + l.ti_flags), THREAD_FLAGS_AT_CALL);
        kernel
            .read(
                block.task() + l.ti_cpu,
                &mut raw[..4],
                Privilege::Supervisor,
            )
            .unwrap();
        assert_eq!(u32::from_le_bytes(raw[..4].try_into().unwrap()), 3);

        // Parked: the shadow reads as running again.
        kernel
            .write(
                block.state_va(&l).unwrap(),
                &2u32.to_le_bytes(),
                Privilege::Supervisor,
            )
            .unwrap();
        block.mark_running(&kernel, &l).unwrap();
        let mut state = [0u8; 4];
        mem.read_phys(
            block.state_va(&l).unwrap() - crate::test_images::K,
            &mut state,
        )
        .unwrap();
        assert_eq!(state, [0; 4]);
    }

    #[test]
    fn hostile_blocks_and_templates_are_refused() {
        use crate::paging::{AddressSpace, PagingMode};
        for base in [0, 0x1000, !(BLOCK_SIZE - 1)] {
            assert_eq!(ShadowBlock::at(base), Err(ShadowError::BadBlock(base)));
        }
        let (mem, init_task) = gvm_with_init_task();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let block = ShadowBlock::at(crate::test_images::K + 0x10_0000).unwrap();
        // init_task's files pointer leads outside GVM memory.
        mem.write_u64(0x20_0030, 0xffff_8000_dead_0000).unwrap();
        assert!(matches!(
            block.install(&kernel, init_task, &layout(), 0),
            Err(ShadowError::Memory {
                va: 0xffff_8000_dead_0000,
                ..
            })
        ));
        // A block outside the GVM's mappings cannot be written.
        let unmapped = ShadowBlock::at(0xffff_8880_0000_0000).unwrap();
        assert!(matches!(
            unmapped.prepare_call(&kernel, &layout(), 0),
            Err(ShadowError::Memory { .. })
        ));
        // Interruptible waits are refused, uninterruptible ones (and both bits) parked.
        assert!(ShadowBlock::waits_interruptibly(1));
        assert!(!ShadowBlock::waits_interruptibly(2));
        assert!(!ShadowBlock::waits_interruptibly(3));
        assert!(!ShadowBlock::waits_interruptibly(0));
    }

    #[test]
    fn shadow_addresses_near_the_top_of_the_address_space_are_errors_not_wraps() {
        // The highest block `at` accepts: its own addresses fit.
        let top = ShadowBlock::at(0u64.wrapping_sub(2 * BLOCK_SIZE)).unwrap();
        assert_eq!(top.files(), u64::MAX - 2 * BLOCK_SIZE + 1 + FILES_OFF);
        // A field offset that leaves the address space.
        let far = ShadowLayout {
            state: u64::MAX - 0x10,
            ..layout()
        };
        assert_eq!(
            top.state_va(&far),
            Err(ShadowError::AddressOverflow {
                base: top.task(),
                offset: u64::MAX - 0x10
            })
        );
        // A self-pointer rebased to where it would wrap.
        let mut bytes = 0x1010u64.to_le_bytes().to_vec();
        bytes.resize(32, 0);
        assert_eq!(
            rebase_self_pointers(&mut bytes, 0x1000, u64::MAX - 4),
            Err(ShadowError::AddressOverflow {
                base: u64::MAX - 4,
                offset: 0x10
            })
        );
        // Template offsets at the end of usize are short templates, not panics.
        assert_eq!(
            put(&mut [0u8; 16], u64::MAX, &[1, 2]),
            Err(ShadowError::ShortTemplate("task_struct"))
        );
        assert_eq!(
            read_u64(&[0u8; 16], usize::MAX as u64 - 3),
            Err(ShadowError::ShortTemplate("task_struct"))
        );
        // The task's end overflowing is an error too.
        let place = ShadowPlace {
            task: u64::MAX - 0x100,
            stack: 0,
            files: 0,
            cpu: 1,
        };
        let mut template = vec![0u8; 0x200];
        template[0x50..0x58].copy_from_slice(&(u64::MAX - 0x80).to_le_bytes());
        assert_eq!(
            shadow_task(&template, 0, &layout(), &place, 0x1000),
            Err(ShadowError::AddressOverflow {
                base: u64::MAX - 0x100,
                offset: layout().task_size
            })
        );
    }

    #[test]
    fn bad_templates_are_errors() {
        let l = layout();
        let place = ShadowPlace {
            task: 0x1000,
            stack: 0,
            files: 0,
            cpu: 1,
        };
        assert_eq!(
            shadow_task(&[0u8; 0x10], 0, &l, &place, 0x1000),
            Err(ShadowError::ShortTemplate("task_struct"))
        );
        assert!(matches!(
            shadow_task(&[0u8; 0x200], 0, &l, &place, 0x100),
            Err(ShadowError::TooLarge { .. })
        ));
        // fpstate pointing outside the task.
        assert!(matches!(
            shadow_task(&[0u8; 0x200], 0x5000, &l, &place, 0x1000),
            Err(ShadowError::MissingField(_))
        ));
        let files = shadow_files(&[0u8; 0x40], 0, &l, 0x2000, 0x1000).unwrap();
        assert_eq!(&files[..4], &1u32.to_le_bytes());
        assert!(shadow_files(&[0u8; 0x8], 0, &l, 0x2000, 0x1000).is_err());
    }
}
