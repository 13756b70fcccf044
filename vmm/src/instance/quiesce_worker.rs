//! `exterior-vmm quiesce` off the event loop. Quiescing waits on the guest (vCPUs reaching
//! a safe point) and on redirected calls (which hold the GVM while they run or are parked,
//! tens of seconds at worst); the event loop must never wait on either, or one request
//! would freeze `info`, consoles, sessions and `stop` for every client. A worker thread,
//! started before the seccomp filters, takes requests from the loop, and hands each reply
//! back through a queue and an eventfd the loop watches.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use svm_runtime::protocol::{Frame, Kind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::executor::Executor;
use crate::sync::lock;
use crate::vstate::quiesce::{quiesce, QuiescePolicy, VcpuControl};

/// Longest hold a client may ask for.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// A client's quiesce request: who asked, and how long to keep the GVM held.
pub struct Request {
    pub token: u32,
    pub id: u32,
    pub hold: Duration,
}

/// The loop's side of the worker.
pub struct QuiesceWorker {
    requests: Sender<Request>,
    replies: Arc<Mutex<Vec<(u32, Frame)>>>,
    ready: Arc<EventFd>,
}

impl QuiesceWorker {
    /// Starts the worker thread for the GVM's vCPUs, with the vCPU seccomp filter if
    /// `seccomp` (it only waits, kicks vCPU threads and writes an eventfd).
    pub fn spawn(
        gvm_vcpus: Vec<Arc<VcpuControl>>,
        executor: Arc<Executor>,
        seccomp: bool,
    ) -> std::io::Result<QuiesceWorker> {
        let (requests, inbox) = channel();
        let replies = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let (out, wake) = (replies.clone(), ready.clone());
        std::thread::Builder::new()
            .name("quiesce-worker".into())
            .spawn(move || {
                if seccomp {
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                        log::error!("quiesce worker: {e}");
                        return;
                    }
                }
                serve(&inbox, &gvm_vcpus, &executor, &out, &wake)
            })?;
        Ok(QuiesceWorker {
            requests,
            replies,
            ready,
        })
    }

    /// Queues a request; false if the worker is gone.
    pub fn submit(&self, request: Request) -> bool {
        self.requests.send(request).is_ok()
    }

    /// Readable when replies are waiting.
    pub fn event(&self) -> &EventFd {
        &self.ready
    }

    /// The replies finished since the last call, as (client token, frame).
    pub fn take_replies(&self) -> Vec<(u32, Frame)> {
        let _ = self.ready.read();
        std::mem::take(&mut *lock(&self.replies))
    }
}

fn serve(
    inbox: &Receiver<Request>,
    gvm_vcpus: &[Arc<VcpuControl>],
    executor: &Executor,
    out: &Mutex<Vec<(u32, Frame)>>,
    wake: &EventFd,
) {
    while let Ok(request) = inbox.recv() {
        let frame = {
            // Never while a redirected call holds the GVM.
            let _exclusive = executor.hold_gvm();
            match quiesce(gvm_vcpus, QuiescePolicy::default()) {
                Ok(held) => {
                    let mut text = format!(
                        "quiesced in {} us after {} attempt(s)\n",
                        held.took.as_micros(),
                        held.attempts
                    );
                    for snap in &held.snapshots {
                        text.push_str(&snap.describe());
                        text.push('\n');
                    }
                    if !request.hold.is_zero() {
                        std::thread::sleep(request.hold);
                        text.push_str(&format!("held for {} ms\n", request.hold.as_millis()));
                    }
                    // Dropping `held` releases the vCPUs before the reply is sent.
                    drop(held);
                    Frame::new(Kind::Info, request.id, text.into_bytes())
                }
                Err(e) => Frame::new(Kind::Error, request.id, e.to_string().into_bytes()),
            }
        };
        lock(out).push((request.token, frame));
        // A full eventfd counter still means "readable": nothing is lost if this fails.
        let _ = wake.write(1);
    }
}

/// The hold a quiesce request's payload asks for: empty for none, else milliseconds as
/// decimal text, at most [`MAX_HOLD`].
pub fn parse_hold(payload: &[u8]) -> Result<Duration, String> {
    if payload.is_empty() {
        return Ok(Duration::ZERO);
    }
    let ms: u64 = std::str::from_utf8(payload)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or("the quiesce hold is not a number of milliseconds")?;
    let hold = Duration::from_millis(ms);
    if hold > MAX_HOLD {
        return Err(format!(
            "a quiesce hold of {ms} ms is longer than the {} s allowed",
            MAX_HOLD.as_secs()
        ));
    }
    Ok(hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_milliseconds_bounded_and_checked() {
        assert_eq!(parse_hold(b""), Ok(Duration::ZERO));
        assert_eq!(parse_hold(b"1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_hold(b"60000"), Ok(MAX_HOLD));
        assert!(parse_hold(b"60001")
            .unwrap_err()
            .contains("longer than the 60 s"));
        assert!(parse_hold(b"-1").is_err());
        assert!(parse_hold(b"1s").is_err());
        assert!(parse_hold(&[0xff]).is_err());
    }
}
