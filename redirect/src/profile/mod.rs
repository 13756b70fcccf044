//! The kernel profile: symbols and struct layouts of the pinned guest kernel.
//!
//! The redirect engine edits GVM kernel state by hand (the lent CPU's `current`, a shadow
//! `task_struct`, GDT/IDT/TSS, syscall MSRs), so it needs field offsets and addresses of the
//! exact kernel the GVM runs. They come from two sources that describe that kernel:
//! - the image `images/vmlinux`: its `.BTF` section gives struct layouts and the per-cpu
//!   variables (the `.data..percpu` DATASEC, whose offsets are per-cpu offsets), its
//!   `.rodata` the release string; it carries no symbol table;
//! - `/proc/kallsyms` of the SVM, which runs the identical kernel with `nokaslr`: addresses
//!   of everything else, and the per-cpu offsets again.
//!
//! [`KernelProfile::new`] cross-checks the two (`_stext` and `__start_rodata` against the
//! image's section addresses, per-cpu offsets against BTF) and fails with a clear
//! [`ProfileError`] if anything is missing or inconsistent.
//!
//! Submodules: [`elf`] (sections of an ELF64 image), [`btf`] (BTF types), [`kallsyms`]
//! (symbol table), [`identity`] (whether the GVM's kernel is the SVM's, byte for byte). All
//! parse untrusted bytes without panicking.

pub mod btf;
pub mod elf;
pub mod identity;
pub mod kallsyms;

use thiserror::Error;

pub use btf::{Btf, BtfError, Kind, Member, MemberLocation, StructInfo, TypeInfo, VarInfo};
pub use elf::{find_section, Elf, ElfError, Section};
pub use kallsyms::{KallsymsError, Symbol, SymbolRef, SymbolTable};

/// Why a kernel profile could not be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProfileError {
    /// The image could not be read as ELF, or lacks a section.
    #[error("vmlinux: {0}")]
    Elf(#[from] ElfError),
    /// The image's `.BTF` section could not be parsed.
    #[error("vmlinux .BTF: {0}")]
    Btf(#[from] BtfError),
    /// The kallsyms text could not be parsed.
    #[error("kallsyms: {0}")]
    Kallsyms(#[from] KallsymsError),
    /// `.rodata` holds no `linux_banner` to take the release from.
    #[error("vmlinux has no \"Linux version <release>\" banner in .rodata")]
    NoRelease,
    /// BTF has no struct of that name (or only one of size 0).
    #[error("kernel BTF has no struct {0}")]
    MissingStruct(&'static str),
    /// The struct has no member at that path.
    #[error("kernel BTF: struct {structure} has no member {member}")]
    MissingMember {
        /// The struct.
        structure: &'static str,
        /// The member path (e.g. `thread.sp`).
        member: &'static str,
    },
    /// The member is a bitfield or does not start on a byte, or it starts at or past the
    /// struct's end.
    #[error("kernel BTF: {structure}.{member} is not byte-aligned or lies outside the struct")]
    BadMember {
        /// The struct.
        structure: &'static str,
        /// The member path.
        member: &'static str,
    },
    /// The layout breaks an assumption of the engine (e.g. `thread_info` is not the first
    /// member of `task_struct`).
    #[error("kernel BTF: {0}")]
    BadLayout(String),
    /// kallsyms has no ordinary (not per-cpu) symbol of that name.
    #[error("kallsyms has no symbol {0}")]
    MissingSymbol(&'static str),
    /// Neither kallsyms nor BTF gives the per-cpu offset of a variable the engine needs.
    #[error("per-cpu variable {name} not found in kallsyms or in BTF{hint}")]
    MissingPerCpu {
        /// The variable.
        name: &'static str,
        /// Appended to the message: where else it was looked for (may be empty).
        hint: &'static str,
    },
    /// kallsyms lists the variable only as an ordinary address, not as a per-cpu offset.
    #[error("kallsyms lists {0} with an address, but it must be a per-cpu variable")]
    NotPerCpu(&'static str),
    /// kallsyms and BTF give different per-cpu offsets for the variable.
    #[error("per-cpu offset of {name} is {kallsyms:#x} in kallsyms but {btf:#x} in BTF: they describe different kernels")]
    PerCpuMismatch {
        /// The variable.
        name: &'static str,
        /// Its offset according to kallsyms.
        kallsyms: u64,
        /// Its offset according to BTF's `.data..percpu` DATASEC.
        btf: u64,
    },
    /// No kernel can have this slide: it is not 2 MiB-aligned or not below 1 GiB.
    #[error("kallsyms cannot be moved by slide {0:#x}: a KASLR slide is a multiple of 2 MiB below 1 GiB")]
    BadSlide(u64),
    /// A kallsyms address differs from the image's link address of the section it starts
    /// (another kernel, or KASLR).
    #[error(
        "kallsyms puts {symbol} at {kallsyms:#x} but vmlinux section {section} is at {image:#x}: \
         the kallsyms text comes from a different kernel, or KASLR is on (boot the SVM with nokaslr)"
    )]
    ImageMismatch {
        /// The symbol (`_stext` or `__start_rodata`).
        symbol: &'static str,
        /// The section it should start (`.text` or `.rodata`).
        section: &'static str,
        /// The symbol's address in kallsyms.
        kallsyms: u64,
        /// The section's address in the image.
        image: u64,
    },
    /// The kernel's bounding symbols contradict each other (text and rodata out of order,
    /// `entry_SYSCALL_64` outside the text).
    #[error("kallsyms symbols are out of order: {0}")]
    BadSymbols(String),
}

/// Byte offsets in `struct task_struct` (and its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// Size of `struct task_struct` in bytes.
    pub size: u64,
    /// `pid`: the task's thread ID.
    pub pid: u64,
    /// `tgid`: the thread-group (process) ID.
    pub tgid: u64,
    /// `comm`: the task's name.
    pub comm: u64,
    /// Size of the `comm` array (TASK_COMM_LEN, 16).
    pub comm_len: u64,
    /// `cred`: pointer to the effective (subjective) credentials.
    pub cred: u64,
    /// `real_cred`: pointer to the objective credentials.
    pub real_cred: u64,
    /// `fs`: pointer to the `fs_struct` (root and working directory).
    pub fs: u64,
    /// `files`: pointer to the open-file table (`files_struct`).
    pub files: u64,
    /// `nsproxy`: pointer to the task's namespaces.
    pub nsproxy: u64,
    /// `mm`: pointer to the task's user address space (NULL for kernel threads).
    pub mm: u64,
    /// `active_mm`: the address space the task runs on (a kernel thread's is borrowed).
    pub active_mm: u64,
    /// `flags`: the PF_* flags.
    pub flags: u64,
    /// `thread_info.flags` (TIF_*): with CONFIG_THREAD_INFO_IN_TASK, `thread_info` is the
    /// first member of task_struct.
    pub thread_info_flags: u64,
    /// `stack`: pointer to the base of the task's kernel stack.
    pub stack: u64,
    /// `thread.sp`: the kernel stack pointer saved when the task is switched out.
    pub thread_sp: u64,
    /// `thread.fsbase`: the task's saved FS base.
    pub thread_fsbase: u64,
    /// `rseq`: the task's registered restartable-sequence area (a user pointer).
    pub rseq: u64,
}

/// Byte offsets in `struct cred`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredLayout {
    /// Size of `struct cred` in bytes.
    pub size: u64,
    /// `uid`: the real user ID.
    pub uid: u64,
    /// `euid`: the effective user ID.
    pub euid: u64,
}

/// The struct layouts the redirect engine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layouts {
    /// `struct task_struct`.
    pub task: TaskLayout,
    /// `struct cred`.
    pub cred: CredLayout,
}

fn struct_size(btf: &Btf, name: &'static str) -> Result<u64, ProfileError> {
    let s = btf.struct_id(name).and_then(|id| btf.type_size(id));
    s.filter(|&n| n > 0)
        .ok_or(ProfileError::MissingStruct(name))
}

fn offset(btf: &Btf, structure: &'static str, member: &'static str) -> Result<u64, ProfileError> {
    let size = struct_size(btf, structure)?;
    let loc = btf
        .member(structure, member)
        .ok_or(ProfileError::MissingMember { structure, member })?;
    loc.byte_offset()
        .filter(|&off| off < size)
        .ok_or(ProfileError::BadMember { structure, member })
}

impl Layouts {
    /// Computes the layouts from kernel BTF; fails naming the first missing piece.
    pub fn from_btf(btf: &Btf) -> Result<Layouts, ProfileError> {
        let t = |m| offset(btf, "task_struct", m);
        let comm_type = btf
            .member("task_struct", "comm")
            .ok_or(ProfileError::MissingMember {
                structure: "task_struct",
                member: "comm",
            })?
            .type_id;
        let (_, comm_len) = btf.array_info(comm_type).ok_or_else(|| {
            ProfileError::BadLayout("task_struct.comm is not an array".to_string())
        })?;
        let task = TaskLayout {
            size: struct_size(btf, "task_struct")?,
            pid: t("pid")?,
            tgid: t("tgid")?,
            comm: t("comm")?,
            comm_len,
            cred: t("cred")?,
            real_cred: t("real_cred")?,
            fs: t("fs")?,
            files: t("files")?,
            nsproxy: t("nsproxy")?,
            mm: t("mm")?,
            active_mm: t("active_mm")?,
            flags: t("flags")?,
            thread_info_flags: t("thread_info.flags")?,
            stack: t("stack")?,
            thread_sp: t("thread.sp")?,
            thread_fsbase: t("thread.fsbase")?,
            rseq: t("rseq")?,
        };
        if t("thread_info")? != 0 {
            return Err(ProfileError::BadLayout(
                "thread_info is not the first member of task_struct \
                 (CONFIG_THREAD_INFO_IN_TASK expected)"
                    .to_string(),
            ));
        }
        let c = |m| offset(btf, "cred", m);
        let cred = CredLayout {
            size: struct_size(btf, "cred")?,
            uid: c("uid")?,
            euid: c("euid")?,
        };
        Ok(Layouts { task, cred })
    }
}

/// Addresses (kernel virtual, as a `nokaslr` kernel has them; [`KernelProfile::slid`] moves
/// them for a KASLR GVM) and per-cpu offsets the engine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSymbols {
    /// `init_task`: the idle task of CPU 0, the template of the shadow task.
    pub init_task: u64,
    /// `init_top_pgt`: the kernel's initial top-level page table (PML4).
    pub init_top_pgt: u64,
    /// `__per_cpu_offset[]`: per-cpu base of each CPU.
    pub per_cpu_offset: u64,
    /// `entry_SYSCALL_64`: the 64-bit system-call entry point (what MSR LSTAR holds).
    pub entry_syscall_64: u64,
    /// `idt_table`: the kernel's interrupt descriptor table.
    pub idt_table: u64,
    /// `_stext`: start of the kernel text.
    pub stext: u64,
    /// `_etext`: end of the kernel text.
    pub etext: u64,
    /// `__start_rodata`: start of the kernel's read-only data.
    pub start_rodata: u64,
    /// `__end_rodata`: end of the kernel's read-only data.
    pub end_rodata: u64,
    /// Per-cpu offset of `current_task` (6.1; `pcpu_hot.current_task` from 6.2).
    pub current_task: u64,
    /// Per-cpu offset of `cpu_current_top_of_stack` (6.1; `pcpu_hot.top_of_stack` from 6.2).
    pub cpu_current_top_of_stack: u64,
    /// Per-cpu offset of `gdt_page`.
    pub gdt_page: u64,
    /// Per-cpu offset of `cpu_tss_rw`.
    pub cpu_tss_rw: u64,
    /// Per-cpu offset of the preempt count (`__preempt_count`; `pcpu_hot.preempt_count`
    /// from 6.2).
    pub preempt_count: u64,
    /// Per-cpu offset of `fpu_fpregs_owner_ctx`: whose FPU state a CPU's registers hold.
    pub fpregs_owner: u64,
    /// Per-cpu offset of the stack-protector canary (`fixed_percpu_data.stack_canary`),
    /// when the kernel has one.
    pub stack_canary: Option<u64>,
    /// `__get_free_pages`: where the shadow task's memory comes from.
    pub get_free_pages: u64,
}

fn address(table: &SymbolTable, name: &'static str) -> Result<u64, ProfileError> {
    table.address(name).ok_or(ProfileError::MissingSymbol(name))
}

/// The per-cpu offset of `name` from kallsyms and/or BTF, which must agree.
fn percpu(table: &SymbolTable, btf: &Btf, name: &'static str) -> Result<Option<u64>, ProfileError> {
    let from_kallsyms = table.percpu_offset(name);
    if from_kallsyms.is_none() && table.address(name).is_some() {
        return Err(ProfileError::NotPerCpu(name));
    }
    let from_btf = btf.percpu_var(name).map(|v| v.offset);
    match (from_kallsyms, from_btf) {
        (Some(k), Some(b)) if k != b => Err(ProfileError::PerCpuMismatch {
            name,
            kallsyms: k,
            btf: b,
        }),
        (k, b) => Ok(k.or(b)),
    }
}

/// A per-cpu variable that kernels from 6.2 moved into `struct pcpu_hot`: the old name,
/// else `pcpu_hot` plus the member's offset.
fn percpu_hot(
    table: &SymbolTable,
    btf: &Btf,
    name: &'static str,
    hot_member: &str,
) -> Result<u64, ProfileError> {
    if let Some(off) = percpu(table, btf, name)? {
        return Ok(off);
    }
    let hot = percpu(table, btf, "pcpu_hot")?;
    hot.zip(btf.member_offset("pcpu_hot", hot_member))
        .and_then(|(base, off)| base.checked_add(off))
        .ok_or(ProfileError::MissingPerCpu {
            name,
            hint: " (nor pcpu_hot, where kernels from 6.2 keep it)",
        })
}

fn required_percpu(
    table: &SymbolTable,
    btf: &Btf,
    name: &'static str,
) -> Result<u64, ProfileError> {
    percpu(table, btf, name)?.ok_or(ProfileError::MissingPerCpu { name, hint: "" })
}

/// x86-64 keeps the canary in `fixed_percpu_data`, which the kernel's linker script asserts
/// is at the start of the per-cpu area (GCC reads %gs:40); none without a stack protector.
fn stack_canary(table: &SymbolTable, btf: &Btf) -> Result<Option<u64>, ProfileError> {
    let Some(member) = btf.member_offset("fixed_percpu_data", "stack_canary") else {
        return Ok(None);
    };
    let base = percpu(table, btf, "fixed_percpu_data")?.unwrap_or(0);
    base.checked_add(member)
        .map(Some)
        .ok_or_else(|| ProfileError::BadLayout("fixed_percpu_data.stack_canary overflows".into()))
}

impl KernelSymbols {
    /// Looks the symbols up in kallsyms, per-cpu ones also in BTF (they must agree; BTF
    /// alone suffices for them).
    pub fn resolve(table: &SymbolTable, btf: &Btf) -> Result<KernelSymbols, ProfileError> {
        let syms = KernelSymbols {
            init_task: address(table, "init_task")?,
            init_top_pgt: address(table, "init_top_pgt")?,
            per_cpu_offset: address(table, "__per_cpu_offset")?,
            entry_syscall_64: address(table, "entry_SYSCALL_64")?,
            idt_table: address(table, "idt_table")?,
            stext: address(table, "_stext")?,
            etext: address(table, "_etext")?,
            start_rodata: address(table, "__start_rodata")?,
            end_rodata: address(table, "__end_rodata")?,
            current_task: percpu_hot(table, btf, "current_task", "current_task")?,
            cpu_current_top_of_stack: percpu_hot(
                table,
                btf,
                "cpu_current_top_of_stack",
                "top_of_stack",
            )?,
            gdt_page: required_percpu(table, btf, "gdt_page")?,
            cpu_tss_rw: required_percpu(table, btf, "cpu_tss_rw")?,
            preempt_count: percpu_hot(table, btf, "__preempt_count", "preempt_count")?,
            fpregs_owner: required_percpu(table, btf, "fpu_fpregs_owner_ctx")?,
            stack_canary: stack_canary(table, btf)?,
            get_free_pages: address(table, "__get_free_pages")?,
        };
        if !(syms.stext < syms.etext
            && syms.etext <= syms.start_rodata
            && syms.start_rodata < syms.end_rodata)
        {
            return Err(ProfileError::BadSymbols(format!(
                "expected _stext < _etext <= __start_rodata < __end_rodata, got {:#x} {:#x} {:#x} {:#x}",
                syms.stext, syms.etext, syms.start_rodata, syms.end_rodata
            )));
        }
        if !(syms.stext..syms.etext).contains(&syms.entry_syscall_64) {
            return Err(ProfileError::BadSymbols(format!(
                "entry_SYSCALL_64 {:#x} is outside the kernel text",
                syms.entry_syscall_64
            )));
        }
        Ok(syms)
    }
}

/// Finds the kernel release in the `linux_banner` ("Linux version 6.1.0-50-cloud-amd64 (...").
pub fn release_from_rodata(rodata: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"Linux version ";
    let mut rest = rodata;
    while let Some(pos) = rest.iter().position(|&c| c == b'L') {
        rest = &rest[pos..];
        if let Some(after) = rest.strip_prefix(PREFIX) {
            // A release is at most 64 bytes (__NEW_UTS_LEN) of printable text.
            let end = after
                .iter()
                .take(65)
                .position(|&c| !c.is_ascii_graphic())
                .unwrap_or(65);
            if (1..=64).contains(&end) && after[0].is_ascii_digit() && after.get(end) == Some(&b' ')
            {
                return std::str::from_utf8(&after[..end]).ok().map(str::to_string);
            }
        }
        rest = &rest[1..];
    }
    None
}

/// Everything the redirect engine needs to know about the pinned guest kernel.
#[derive(Debug, Clone)]
pub struct KernelProfile {
    /// Kernel release, e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// The named addresses and per-cpu offsets.
    pub symbols: KernelSymbols,
    /// The named struct offsets.
    pub layouts: Layouts,
    /// The whole symbol table (to name addresses, e.g. a hook pointing into a module).
    pub kallsyms: SymbolTable,
    /// The kernel's types, for offsets beyond [`Layouts`].
    pub btf: Btf,
}

/// What the image itself tells, before a kallsyms text is at hand: its types, its release
/// and where its `.text` and `.rodata` sections are linked. The VMM keeps this (not the
/// 50 MiB image) until the SVM has reported its symbols.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// Kernel release, from the banner in `.rodata`.
    pub release: String,
    /// The image's `.BTF` types.
    pub btf: Btf,
    /// `.text`: link address and size.
    pub text: (u64, u64),
    /// Link address of `.rodata`.
    pub rodata: u64,
}

impl KernelImage {
    /// Reads an ELF vmlinux: `.BTF`, the release banner in `.rodata`, the section addresses.
    pub fn parse(vmlinux: &[u8]) -> Result<KernelImage, ProfileError> {
        let elf = Elf::parse(vmlinux)?;
        let btf = Btf::parse(elf.section_data(".BTF")?)?;
        let release =
            release_from_rodata(elf.section_data(".rodata")?).ok_or(ProfileError::NoRelease)?;
        let section = |name: &str| {
            elf.section(name)
                .map(|s| (s.addr, s.size))
                .ok_or_else(|| ElfError::NoSuchSection(name.to_string()))
        };
        Ok(KernelImage {
            release,
            btf,
            text: section(".text")?,
            rodata: section(".rodata")?.0,
        })
    }

    /// Completes the profile with `table`, the kallsyms of a machine running this image
    /// with `nokaslr`; fails if the table describes another kernel or a relocated one.
    pub fn into_profile(self, table: SymbolTable) -> Result<KernelProfile, ProfileError> {
        // First, that kallsyms describes this image at its link address: a mismatch here
        // (KASLR, another kernel) would make every other check fail less clearly.
        for (symbol, section, image) in [
            ("_stext", ".text", self.text.0),
            ("__start_rodata", ".rodata", self.rodata),
        ] {
            let value = address(&table, symbol)?;
            if image != value {
                return Err(ProfileError::ImageMismatch {
                    symbol,
                    section,
                    kallsyms: value,
                    image,
                });
            }
        }
        KernelProfile::from_parts(self.release, self.btf, table)
    }
}

impl KernelProfile {
    /// Builds the profile from the bytes of `vmlinux` and the text of `/proc/kallsyms` read
    /// on a machine running that kernel with `nokaslr`.
    pub fn new(vmlinux: &[u8], kallsyms: &str) -> Result<KernelProfile, ProfileError> {
        let image = KernelImage::parse(vmlinux)?;
        image.into_profile(SymbolTable::parse(kallsyms)?)
    }

    /// Builds the profile from already-parsed parts, e.g. the SVM's `/sys/kernel/btf/vmlinux`
    /// and `/proc/kallsyms` when no image file is at hand.
    pub fn from_parts(
        release: String,
        btf: Btf,
        kallsyms: SymbolTable,
    ) -> Result<KernelProfile, ProfileError> {
        let layouts = Layouts::from_btf(&btf)?;
        let symbols = KernelSymbols::resolve(&kallsyms, &btf)?;
        Ok(KernelProfile {
            release,
            symbols,
            layouts,
            kallsyms,
            btf,
        })
    }

    /// The profile of this kernel moved by KASLR's virtual `slide` (`redirect::kaslr`):
    /// every address in the image moved, per-cpu offsets and layouts as they are. The
    /// profile itself comes from a `nokaslr` machine (the SVM); this is the GVM's view of
    /// it once its slide is known.
    pub fn slid(&self, slide: u64) -> Result<KernelProfile, ProfileError> {
        let table = self
            .kallsyms
            .slid(slide)
            .ok_or(ProfileError::BadSlide(slide))?;
        KernelProfile::from_parts(self.release.clone(), self.btf.clone(), table)
    }

    /// Byte offset of `path` in struct `structure` (see [`Btf::member`]), for fields beyond
    /// [`Layouts`].
    pub fn offset_of(&self, structure: &str, path: &str) -> Option<u64> {
        self.btf.member_offset(structure, path)
    }
}

#[cfg(test)]
mod tests;
