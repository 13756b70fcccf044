//! Lending a held GVM CPU to a redirected call (docs/ARCHITECTURE.md, "Decisions": the
//! call borrows a held GVM CPU, not the spare one). For the length of a segment the CPU's
//! per-cpu words say that the shadow task runs there: `current_task` is the shadow, the
//! top of stack is the shadow's, and the preempt count is raised so that nothing
//! schedules. Afterwards every word is put back as the GVM had it. A parked call keeps
//! what it added to the preempt count and the stack-protector canary it was entered with
//! (the canary is per task, loaded into a per-cpu word at each context switch, and the
//! CPU has run other tasks since).
//!
//! Everything here reads and writes through the GVM kernel's own address space: the
//! per-cpu base comes from `__per_cpu_offset` in GVM memory and is not trusted, so every
//! address derived from it is checked.

use thiserror::Error;

use crate::paging::{AddressSpace, Privilege, WalkError};
use crate::profile::KernelSymbols;

/// Per-cpu offsets (from the trusted kernel profile) of the words a lent CPU changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerCpuOffsets {
    /// `current_task`.
    pub current_task: u64,
    /// `cpu_current_top_of_stack`.
    pub top_of_stack: u64,
    /// The preempt count (`__preempt_count`; `pcpu_hot.preempt_count` from 6.2).
    pub preempt_count: u64,
    /// `fpu_fpregs_owner_ctx`: whose FPU state the CPU's registers hold. Saved and put
    /// back; a call's FPU use goes through the shadow's own state.
    pub fpregs_owner: u64,
    /// `fixed_percpu_data.stack_canary`, when the kernel has a stack protector.
    pub stack_canary: Option<u64>,
}

impl PerCpuOffsets {
    /// The offsets of the trusted kernel's profile.
    pub fn from_symbols(symbols: &KernelSymbols) -> PerCpuOffsets {
        PerCpuOffsets {
            current_task: symbols.current_task,
            top_of_stack: symbols.cpu_current_top_of_stack,
            preempt_count: symbols.preempt_count,
            fpregs_owner: symbols.fpregs_owner,
            stack_canary: symbols.stack_canary,
        }
    }
}

/// Why a CPU could not be lent or given back.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LendError {
    /// GVM kernel memory could not be read or written there.
    #[error("GVM kernel memory at {va:#x}: {source}")]
    Memory {
        /// The kernel virtual address.
        va: u64,
        /// Why the walk or the access failed.
        #[source]
        source: WalkError,
    },
    /// A per-cpu address does not fit in 64 bits (a hostile `__per_cpu_offset`).
    #[error("CPU {cpu}'s per-cpu base {base:#x} plus {offset:#x} overflows")]
    Overflow {
        /// The lent CPU.
        cpu: u32,
        /// Its per-cpu base, as read from GVM memory.
        base: u64,
        /// The offset that overflowed.
        offset: u64,
    },
}

/// One per-cpu word: where it is, and what the GVM had there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// Its kernel virtual address.
    pub va: u64,
    /// The GVM's value.
    pub value: u64,
}

/// What a parked call carries into its next segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallState {
    /// What the call had added to the lent CPU's preempt count.
    pub preempt_delta: u32,
    /// The stack canary the call's frames were entered with.
    pub canary: u64,
}

/// A GVM CPU's per-cpu words as the GVM had them, and the call's canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LentCpu {
    cpu: u32,
    pcpu_base: u64,
    current: Saved,
    top_of_stack: Saved,
    preempt: Saved,
    fpregs_owner: Saved,
    canary: Option<Saved>,
    call_canary: u64,
}

/// The 8-byte per-cpu word holding the preempt count, with `delta` added to the count:
/// the count is an int (its bit 31 is the inverted need-resched flag), and the word's upper
/// half is the next per-cpu variable, which is kept.
pub fn raise_preempt_count(word: u64, delta: u32) -> u64 {
    // Wrapping on purpose: the count is a 32-bit value the kernel itself adds to with
    // wrapping arithmetic (bit 31 is a flag, not a sign); no address is derived from it.
    (word & !0xffff_ffff) | u64::from((word as u32).wrapping_add(delta))
}

fn read_u64(kernel: &AddressSpace<'_>, va: u64) -> Result<u64, LendError> {
    let mut raw = [0u8; 8];
    kernel
        .read(va, &mut raw, Privilege::Supervisor)
        .map_err(|source| LendError::Memory { va, source })?;
    Ok(u64::from_le_bytes(raw))
}

fn write_u64(kernel: &AddressSpace<'_>, va: u64, value: u64) -> Result<(), LendError> {
    kernel
        .write(va, &value.to_le_bytes(), Privilege::Supervisor)
        .map_err(|source| LendError::Memory { va, source })
}

impl LentCpu {
    /// Reads CPU `cpu`'s per-cpu base from the `__per_cpu_offset` array at
    /// `per_cpu_offset`, then the words it will lend.
    pub fn read(
        kernel: &AddressSpace<'_>,
        per_cpu_offset: u64,
        cpu: u32,
        offsets: &PerCpuOffsets,
    ) -> Result<LentCpu, LendError> {
        let slot = u64::from(cpu)
            .checked_mul(8)
            .and_then(|o| per_cpu_offset.checked_add(o))
            .ok_or(LendError::Overflow {
                cpu,
                base: per_cpu_offset,
                offset: u64::from(cpu).saturating_mul(8),
            })?;
        let pcpu_base = read_u64(kernel, slot)?;
        let word = |offset: u64| -> Result<Saved, LendError> {
            let va = pcpu_base.checked_add(offset).ok_or(LendError::Overflow {
                cpu,
                base: pcpu_base,
                offset,
            })?;
            Ok(Saved {
                va,
                value: read_u64(kernel, va)?,
            })
        };
        let canary = offsets.stack_canary.map(word).transpose()?;
        Ok(LentCpu {
            cpu,
            pcpu_base,
            current: word(offsets.current_task)?,
            top_of_stack: word(offsets.top_of_stack)?,
            preempt: word(offsets.preempt_count)?,
            fpregs_owner: word(offsets.fpregs_owner)?,
            call_canary: canary.map_or(0, |c| c.value),
            canary,
        })
    }

    /// The lent CPU's number.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// Its per-cpu base (as read from GVM memory).
    pub fn pcpu_base(&self) -> u64 {
        self.pcpu_base
    }

    /// The canary the call runs with: the CPU's own for a new call, the call's first one
    /// when it resumes.
    pub fn call_canary(&self) -> u64 {
        self.call_canary
    }

    /// Lends the CPU to the shadow task (`task`, whose kernel stack ends at `stack_top`):
    /// a new call raises the preempt count by one; a resumed call gets back what it had
    /// added and the canary it was entered with.
    pub fn lend(
        &mut self,
        kernel: &AddressSpace<'_>,
        task: u64,
        stack_top: u64,
        resume: Option<CallState>,
    ) -> Result<(), LendError> {
        if let (Some(state), Some(canary)) = (resume, self.canary) {
            write_u64(kernel, canary.va, state.canary)?;
            self.call_canary = state.canary;
        }
        let delta = resume.map_or(1, |s| s.preempt_delta);
        write_u64(kernel, self.current.va, task)?;
        write_u64(kernel, self.top_of_stack.va, stack_top)?;
        write_u64(
            kernel,
            self.preempt.va,
            raise_preempt_count(self.preempt.value, delta),
        )
    }

    /// Raises the CPU's preempt count by one for a kernel-function call the executor
    /// makes itself while the CPU is not lent (undone by [`LentCpu::give_back`]).
    pub fn disable_preemption(&self, kernel: &AddressSpace<'_>) -> Result<(), LendError> {
        write_u64(
            kernel,
            self.preempt.va,
            raise_preempt_count(self.preempt.value, 1),
        )
    }

    /// What a call parked now carries into its next segment: what it has added to the
    /// preempt count so far, and its canary.
    pub fn park(&self, kernel: &AddressSpace<'_>) -> Result<CallState, LendError> {
        let now = read_u64(kernel, self.preempt.va)? as u32;
        Ok(CallState {
            // The inverse of `raise_preempt_count`'s wrapping add (a count, not an
            // address): whatever the GVM left there, the delta is put back exactly.
            preempt_delta: now.wrapping_sub(self.preempt.value as u32),
            canary: self.call_canary,
        })
    }

    /// Puts every per-cpu word back as the GVM had it.
    pub fn give_back(&self, kernel: &AddressSpace<'_>) -> Result<(), LendError> {
        [
            self.current,
            self.top_of_stack,
            self.preempt,
            self.fpregs_owner,
        ]
        .iter()
        .chain(self.canary.iter())
        .try_for_each(|w| write_u64(kernel, w.va, w.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestPhysMemory, MemoryImage};
    use crate::paging::PagingMode;
    use crate::test_images::{kernel_image, K};

    /// `__per_cpu_offset` at K + 0x10000; CPU 1's area at K + 0x20_0000.
    const PER_CPU_OFFSET: u64 = K + 0x1_0000;
    const PCPU1: u64 = K + 0x20_0000;
    const OFFSETS: PerCpuOffsets = PerCpuOffsets {
        current_task: 0x100,
        top_of_stack: 0x108,
        preempt_count: 0x110,
        fpregs_owner: 0x118,
        stack_canary: Some(0x28),
    };

    /// CPU 1 with its words set to recognisable values; the preempt count has bit 31 (the
    /// inverted need-resched flag) set, as an idle CPU's has.
    fn gvm() -> MemoryImage {
        let mem = kernel_image();
        let phys = |va: u64| va - K;
        mem.write_u64(phys(PER_CPU_OFFSET + 8), PCPU1).unwrap();
        for (off, v) in [
            (0x100, 0xaaaa),
            (0x108, 0xbbbb),
            (0x110, 0x8000_0002),
            (0x118, 0xdddd),
            (0x28, 0xcafe),
        ] {
            mem.write_u64(phys(PCPU1 + off), v).unwrap();
        }
        mem
    }

    fn word(mem: &MemoryImage, off: u64) -> u64 {
        let mut raw = [0u8; 8];
        mem.read_phys(PCPU1 + off - K, &mut raw).unwrap();
        u64::from_le_bytes(raw)
    }

    #[test]
    fn a_new_call_borrows_the_cpu_and_gives_everything_back() {
        let mem = gvm();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let mut lent = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap();
        assert_eq!(
            (lent.cpu(), lent.pcpu_base(), lent.call_canary()),
            (1, PCPU1, 0xcafe)
        );
        lent.lend(&kernel, 0x5000, 0x9000, None).unwrap();
        assert_eq!(
            [word(&mem, 0x100), word(&mem, 0x108), word(&mem, 0x110)],
            [0x5000, 0x9000, 0x8000_0003]
        );
        // The call takes a lock (preempt count +2) and parks.
        mem.write_u64(PCPU1 + 0x110 - K, 0x8000_0005).unwrap();
        let state = lent.park(&kernel).unwrap();
        assert_eq!(
            state,
            CallState {
                preempt_delta: 3,
                canary: 0xcafe
            }
        );
        lent.give_back(&kernel).unwrap();
        assert_eq!(
            [0x100, 0x108, 0x110, 0x118, 0x28].map(|o| word(&mem, o)),
            [0xaaaa, 0xbbbb, 0x8000_0002, 0xdddd, 0xcafe]
        );
    }

    #[test]
    fn a_resumed_call_gets_its_preempt_count_and_canary_back() {
        let mem = gvm();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        // Meanwhile the CPU ran another task, with its own canary.
        mem.write_u64(PCPU1 + 0x28 - K, 0xbeef).unwrap();
        let mut lent = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap();
        let parked = CallState {
            preempt_delta: 3,
            canary: 0xcafe,
        };
        lent.lend(&kernel, 0x5000, 0x9000, Some(parked)).unwrap();
        assert_eq!((word(&mem, 0x110), word(&mem, 0x28)), (0x8000_0005, 0xcafe));
        assert_eq!(lent.call_canary(), 0xcafe);
        lent.give_back(&kernel).unwrap();
        assert_eq!((word(&mem, 0x110), word(&mem, 0x28)), (0x8000_0002, 0xbeef));
    }

    #[test]
    fn preemption_off_for_the_executors_own_calls() {
        let mem = gvm();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let lent = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap();
        lent.disable_preemption(&kernel).unwrap();
        assert_eq!(word(&mem, 0x110), 0x8000_0003);
        assert_eq!(word(&mem, 0x100), 0xaaaa, "current is not lent");
        lent.give_back(&kernel).unwrap();
        assert_eq!(word(&mem, 0x110), 0x8000_0002);
    }

    #[test]
    fn a_hostile_per_cpu_base_is_an_error_not_a_wrap() {
        let mem = gvm();
        mem.write_u64(PER_CPU_OFFSET + 8 - K, u64::MAX - 0x10)
            .unwrap();
        let kernel = AddressSpace::new(&mem, PagingMode::default(), 0x1000);
        let err = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap_err();
        assert_eq!(
            err,
            LendError::Overflow {
                cpu: 1,
                base: u64::MAX - 0x10,
                offset: 0x28
            },
            "{err}"
        );
        // The base itself at the very top: the first word's address overflows too.
        mem.write_u64(PER_CPU_OFFSET + 8 - K, u64::MAX).unwrap();
        let err = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap_err();
        assert_eq!(
            err,
            LendError::Overflow {
                cpu: 1,
                base: u64::MAX,
                offset: 0x28
            }
        );
        // `__per_cpu_offset[cpu]` itself past the end of the address space.
        let err = LentCpu::read(&kernel, u64::MAX - 4, 1, &OFFSETS).unwrap_err();
        assert_eq!(
            err,
            LendError::Overflow {
                cpu: 1,
                base: u64::MAX - 4,
                offset: 8
            }
        );
        // A base that points nowhere mapped: a memory error naming the address.
        mem.write_u64(PER_CPU_OFFSET + 8 - K, 0x1234_0000).unwrap();
        let err = LentCpu::read(&kernel, PER_CPU_OFFSET, 1, &OFFSETS).unwrap_err();
        assert!(matches!(err, LendError::Memory { .. }), "{err}");
        assert!(err.to_string().contains("0x12340028"), "{err}");
    }

    #[test]
    fn the_need_resched_bits_survive_a_raise() {
        assert_eq!(
            raise_preempt_count(0xffff_ffff_8000_0001, 1),
            0xffff_ffff_8000_0002
        );
        assert_eq!(raise_preempt_count(0x1_ffff_ffff, 1), 0x1_0000_0000);
    }
}
