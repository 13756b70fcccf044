//! Why a redirected call did not return a result. The executor keeps these typed; the
//! one-line `redirect_last_error` of `exterior-vmm info` is their `Display`.

use std::sync::Arc;
use std::time::Duration;

use redirect::bounce::BounceError;
use redirect::call_profile::CallProfileError;
use redirect::lend::LendError;
use redirect::profile::{KallsymsError, ProfileError};
use redirect::shadow::ShadowError;
use redirect::stores::ForgedStore;
use redirect::traps::TrapError;
use redirect::view::ViewError;
use redirect::{MemError, WalkError};
use svm_runtime::redirect_abi::BufferListError;
use thiserror::Error;

use super::cow::CowError;
use super::regs::ControlError;
use crate::vstate::memory::MemoryError;
use crate::vstate::quiesce::QuiesceError;
use crate::vstate::vm::VmError;

/// Why the executor cannot run calls at all.
#[derive(Debug, Error)]
pub enum Unavailable {
    #[error("the SVM has not reported its kernel symbols yet")]
    NoSymbols,
    #[error("the redirect engine needs the kernel as an ELF vmlinux with .BTF: {0}")]
    Image(#[source] ProfileError),
    #[error("the SVM's kallsyms: {0}")]
    Kallsyms(#[source] KallsymsError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    CallProfile(#[from] CallProfileError),
    #[error("cannot create the redirect VM: {0}")]
    Vm(#[from] VmError),
    #[error("cannot create the redirect VM: set memory slot: {0}")]
    Slot(#[source] kvm_ioctls::Error),
    #[error("cannot create the redirect VM: guest memory at {0:#x} has no host mapping")]
    Unmapped(u64),
    #[error("cannot create the redirect VM: {0}")]
    Memory(#[from] MemoryError),
    #[error("cannot create the redirect VM: {0}")]
    Cow(#[source] CowError),
    #[error("cannot create the redirect VM: the kernel text {start:#x}..{end:#x} is {why}")]
    Text {
        start: u64,
        end: u64,
        why: &'static str,
    },
}

/// Why the GVM kernel's KASLR slide was not believed (`Engine::learn_slide`): no call runs
/// until it is.
#[derive(Debug, Error)]
pub enum SlideRefusal {
    #[error(transparent)]
    Claim(redirect::kaslr::SlideError),
    #[error("moving the trusted text by {slide:#x}: {source}")]
    Move {
        slide: u64,
        #[source]
        source: redirect::kaslr::RelocError,
    },
    #[error(
        "no KASLR slide of the GVM's kernel checks out: its LSTAR {lstar:#x} claims {claim}, \
         and at no 2 MiB step of the kernel map does its text hold the trusted text moved by \
         that much ({min_per_mille} per mille of the relocated places needed)"
    )]
    NotFound {
        lstar: u64,
        claim: String,
        min_per_mille: usize,
    },
}

/// How a run of the redirect vCPU ended when the call neither returned nor trapped.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    ForgedStore(#[from] ForgedStore),
    #[error("the call stored to guest-physical {gpa:#x}, and the lent CPU's registers that say whether to believe it could not be read: {source}")]
    StoreUnverifiable {
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "the call wrote to guest-physical {0:#x}, which the view does not back (kernel text \
         is read-only there)"
    )]
    UnbackedWrite(u64),
    #[error("the call read guest-physical {0:#x}, which the view does not back")]
    UnbackedRead(u64),
    #[error(
        "the call switched the lent CPU's {0} off the VMM's descriptor tables (trusted code \
         that loads them, reached through a pointer in GVM data); refused"
    )]
    TablesSwitched(&'static str),
    #[error("the call halted the lent CPU")]
    Halted,
    #[error("the lent CPU triple-faulted during the call")]
    TripleFault,
    #[error("unexpected exit of the lent CPU: {0}")]
    UnexpectedExit(String),
    #[error(
        "the call did not return within {0:?} (it may be waiting for another CPU, and those \
         are held while it runs)"
    )]
    Timeout(Duration),
    #[error("KVM_RUN on the lent CPU: {0}")]
    Run(#[source] kvm_ioctls::Error),
}

/// What became of a stopped call's stores.
#[derive(Debug)]
pub enum Rollback {
    /// All of them were dropped.
    Unchanged,
    /// Its last segment's were dropped; earlier segments (before it was parked) stay.
    LastSegment,
    /// Dropping them failed.
    Failed(CowError),
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Unchanged => f.write_str("it was rolled back: the GVM is unchanged"),
            Rollback::LastSegment => f.write_str("its last step was rolled back"),
            Rollback::Failed(e) => write!(f, "rolling it back failed: {e}"),
        }
    }
}

/// Why a redirected call failed.
#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "the call would sleep, and its return address {0:#x} is outside the trusted kernel \
         text: not parked"
    )]
    ResumeOutsideText(u64),
    #[error(transparent)]
    Unavailable(#[from] Arc<Unavailable>),
    #[error(
        "a previous redirected call is left sleeping in the GVM kernel; the redirect engine \
         is stopped (restart the instance)"
    )]
    EngineStopped,
    #[error(
        "delete_module is not redirected to a GVM with more than one CPU: unloading waits \
         for the other CPUs (a TLB flush by IPI), which are held during a call"
    )]
    DeleteModuleOnSmp,
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error("the GVM has no vCPU to lend")]
    NoCpuToLend,
    #[error("GVM vCPU {cpu}: {source}")]
    GvmPaging {
        cpu: u8,
        #[source]
        source: WalkError,
    },
    #[error("SVM program: {0}")]
    SvmPaging(#[source] WalkError),
    #[error("the shim's buffer list at {at:#x}: {source}")]
    BufferListUnreadable {
        at: u64,
        #[source]
        source: WalkError,
    },
    #[error(transparent)]
    BufferList(#[from] BufferListError),
    #[error(transparent)]
    Bounce(#[from] BounceError),
    #[error("the redirect worker thread is gone")]
    NoWorker,
    #[error("the SVM's control state is not known yet (it is learnt at the first call)")]
    NoTrustedControl,
    #[error("the GVM kernel's slide is not known yet (it is learnt at the first call)")]
    NoSlide,
    #[error("the GVM kernel's KASLR slide: {0}")]
    Slide(#[from] SlideRefusal),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Lend(#[from] LendError),
    #[error("giving CPU {cpu} back: {source}")]
    GiveBack {
        cpu: u8,
        #[source]
        source: LendError,
    },
    #[error("the trusted SVM kernel's IDT: {0}")]
    Idt(#[from] redirect::cpu_tables::IdtError),
    #[error("the trusted SVM kernel's idt_table {0:#x} is not in the kernel image")]
    IdtAddress(u64),
    #[error("the shadow task: {0}")]
    Shadow(#[from] ShadowError),
    #[error("allocating the shadow task in the GVM: {0}")]
    ShadowAllocation(Box<Error>),
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("the private kernel text: {0}")]
    Text(#[from] TrapError),
    #[error("the window or the kernel text: {0}")]
    Memory(#[from] MemError),
    #[error("redirect vCPU: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("redirect vCPU: KVM took {0} of its 5 MSRs")]
    Msrs(usize),
    #[error("redirect vCPU: the MSR list does not fit KVM's MSR array")]
    MsrList,
    #[error("committing the call: {0}")]
    Commit(#[source] CowError),
    #[error("{stop} ({at})")]
    Run { stop: RunError, at: String },
    /// Stopped at a trap or failed while running, and rolled back as far as it could be.
    #[error("{why}; {rollback}")]
    Stopped { why: Box<Error>, rollback: Rollback },
    /// A trap's report, made from the trap's arguments and GVM memory.
    #[error("{0}")]
    Trapped(String),
    #[error(
        "the call would block: it waits interruptibly in the GVM kernel (for data, an event \
         or a signal), which a redirected call may not do; it was rolled back: the GVM is \
         unchanged"
    )]
    WouldBlock,
    #[error("the GVM stayed busy: {0}")]
    StayedBusy(#[source] Box<Error>),
    #[error("the call took more than {0:?}, runs, quiesces and sleeps included")]
    TookTooLong(Duration),
    /// A parked call that could not be finished: it stays parked in the GVM.
    #[error(
        "{0}; the call had already slept in the GVM kernel, so its first steps are the GVM's: \
         it stays parked there like a task in uninterruptible sleep, with any lock it holds, \
         and the redirect engine stops (restart the instance)"
    )]
    LeftParked(Box<Error>),
}

/// Tags a KVM ioctl's error with what the executor was doing.
pub(super) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

impl Error {
    /// Whether the GVM was merely busy (the shim may retry), not the call refused.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Quiesce(QuiesceError::Busy(..)))
    }
}
