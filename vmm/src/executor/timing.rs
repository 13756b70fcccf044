//! Where a redirected call's time goes: each phase of a segment (`call.rs`, `segment.rs`)
//! timed on its own, the recent samples kept for medians and maxima (`exterior-vmm info`).
//! A call that was parked has one sample per segment in each phase it went through.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Samples a summary is made of (per phase, and of the holds).
pub const SAMPLES: usize = 4096;

/// The steps of a segment, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Stopping the GVM's vCPUs at a safe point and pausing its devices.
    Quiesce,
    /// Reading the lent CPU's per-cpu words and lending it to the shadow task.
    Lend,
    /// Writing the view's page tables (and, once, the private text with its traps).
    View,
    /// Making the redirect VM drop what it cached of the last view (the memslot flip).
    Flush,
    /// The redirect vCPU running the call, its exits included.
    Run,
    /// Committing or dropping the call's stores (dirty log, copies, discards).
    Commit,
    /// Restoring the lent CPU's per-cpu words.
    GiveBack,
    /// The reschedule IPIs to the GVM's CPUs after a call that went through.
    Ipi,
    /// Letting the GVM's vCPUs and devices go again.
    Release,
    /// A parked call's pause before its next segment (the GVM runs meanwhile).
    Park,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Quiesce,
        Phase::Lend,
        Phase::View,
        Phase::Flush,
        Phase::Run,
        Phase::Commit,
        Phase::GiveBack,
        Phase::Ipi,
        Phase::Release,
        Phase::Park,
    ];

    /// The phase's name in `info` (`redirect_phase_<name>_…`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Quiesce => "quiesce",
            Phase::Lend => "lend",
            Phase::View => "view",
            Phase::Flush => "flush",
            Phase::Run => "run",
            Phase::Commit => "commit",
            Phase::GiveBack => "give_back",
            Phase::Ipi => "ipi",
            Phase::Release => "release",
            Phase::Park => "park",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A summary of samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Samples ever recorded (not only the recent ones).
    pub count: u64,
    /// Sum of every sample ever recorded.
    pub total_us: u64,
    /// Median and maximum of the last [`SAMPLES`].
    pub median_us: u64,
    pub max_us: u64,
}

/// The last [`SAMPLES`] durations of one kind, in nanoseconds, with a running total.
#[derive(Default)]
pub struct Samples {
    recent: VecDeque<u64>,
    count: u64,
    total_ns: u64,
}

impl Samples {
    pub fn record(&mut self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if self.recent.len() == SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(ns);
        self.count = self.count.saturating_add(1);
        self.total_ns = self.total_ns.saturating_add(ns);
    }

    pub fn summary(&self) -> Summary {
        let mut v: Vec<u64> = self.recent.iter().copied().collect();
        v.sort_unstable();
        Summary {
            count: self.count,
            total_us: self.total_ns / 1000,
            median_us: v.get(v.len() / 2).copied().unwrap_or(0) / 1000,
            max_us: v.last().copied().unwrap_or(0) / 1000,
        }
    }
}

/// The samples of every phase.
#[derive(Default)]
pub struct PhaseTimes {
    phases: Mutex<[Samples; Phase::ALL.len()]>,
}

impl PhaseTimes {
    pub fn record(&self, phase: Phase, took: Duration) {
        lock(&self.phases)[phase.index()].record(took);
    }

    /// Records the time since `since` for `phase`.
    pub fn since(&self, phase: Phase, since: Instant) {
        self.record(phase, since.elapsed());
    }

    pub fn summary(&self, phase: Phase) -> Summary {
        lock(&self.phases)[phase.index()].summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_has_its_own_slot_and_name() {
        for (i, phase) in Phase::ALL.iter().enumerate() {
            assert_eq!(phase.index(), i);
        }
        let mut names: Vec<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Phase::ALL.len());
    }

    #[test]
    fn a_summary_has_the_median_and_maximum_of_the_recent_samples_and_the_total_of_all() {
        let mut s = Samples::default();
        assert_eq!(s.summary(), Summary::default());
        for us in [5, 1, 9] {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(
            s.summary(),
            Summary {
                count: 3,
                total_us: 15,
                median_us: 5,
                max_us: 9
            }
        );
        // Old samples leave the median and maximum, not the count or total.
        for _ in 0..SAMPLES {
            s.record(Duration::from_micros(2));
        }
        let summary = s.summary();
        assert_eq!((summary.median_us, summary.max_us), (2, 2));
        assert_eq!(summary.count, 3 + SAMPLES as u64);
        assert_eq!(summary.total_us, 15 + 2 * SAMPLES as u64);
    }

    #[test]
    fn phases_are_recorded_apart() {
        let t = PhaseTimes::default();
        t.record(Phase::Run, Duration::from_millis(3));
        t.record(Phase::Quiesce, Duration::from_millis(7));
        assert_eq!(t.summary(Phase::Run).median_us, 3000);
        assert_eq!(t.summary(Phase::Quiesce).max_us, 7000);
        assert_eq!(t.summary(Phase::Flush).count, 0);
    }
}
