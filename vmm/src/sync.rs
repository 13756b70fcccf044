//! Locking shared VMM state.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning. A mutex is poisoned when a thread panics while
/// holding it; the panic has already been reported, and what these mutexes guard (device
/// registers, console buffers, counters, vCPU control) stays usable, so serving the guest
/// on is better than stopping the whole VMM (or every other thread that touches the same
/// state) over it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
