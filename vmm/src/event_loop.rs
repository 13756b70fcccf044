//! The event loop (event-manager): console input from stdin and the VM-stopped event.

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::devices::serial::ConsoleSerial;
use crate::exit::ExitSignal;
use crate::sync::lock;

/// Forwards what the user types to the guest's serial port.
pub struct StdinInput {
    pub serial: Arc<Mutex<ConsoleSerial>>,
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Everything std's stdin buffer holds goes to the guest now: epoll watches the
        // descriptor, not that buffer, so bytes left in it would wait for the next
        // keystroke (a 64-byte read here once cut every pasted line at 64 bytes).
        let mut stdin = std::io::stdin().lock();
        let n = if events.event_set().contains(EventSet::IN) {
            match stdin.fill_buf() {
                Ok(bytes) => {
                    lock(&self.serial).input(bytes);
                    bytes.len()
                }
                Err(_) => 0,
            }
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching stdin; the guest keeps running.
            let _ = ops.remove(events);
            return;
        }
        stdin.consume(n);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // stdin may be a regular file or /dev/null, which epoll refuses: then there is no
        // console input, which is fine for a non-interactive run.
        let fd = std::io::stdin().as_raw_fd();
        let _ = ops.add(event_manager::Events::new_raw(fd, EventSet::IN));
    }
}

/// Wakes the loop when the VM stops.
pub struct ExitWatcher {
    pub exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            self.exit.signal(crate::exit::ExitReason::VmmError(format!(
                "cannot watch the VM exit event: {e:?}"
            )));
        }
    }
}
