//! The control server's clients: accepted sockets in the event loop's set, each under a
//! token. A client leaves the set only through `EventOps` (`Clients::remove`), before its
//! socket closes: event-manager keeps its own table of registered descriptor numbers, which
//! a plain close does not clear, and the next client accepted on the same number could not
//! join (`FdAlreadyRegistered`) — nor could any after it, since the lowest free number is
//! that one again. Seen: a write to a piped `console` session that had left failed, the
//! socket was closed on the spot, and the instance answered no client again.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use event_manager::{EventOps, Events};
use svm_runtime::protocol::Decoder;
use vmm_sys_util::epoll::EventSet;

/// The first client token; the ones below are the server's own event sources.
const FIRST_CLIENT: u32 = 16;
/// A client that does not read its socket for this long is given up, so one stuck client
/// cannot stall the instance.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most clients served at once.
const MAX_CLIENTS: usize = 64;

/// Which guest's console a client watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Gvm,
    Svm,
}

pub(super) struct Client {
    pub stream: UnixStream,
    pub decoder: Decoder,
    pub console: Option<Which>,
    /// Position in that console's output up to which the client has been sent it.
    pub console_seen: u64,
}

#[derive(Default)]
pub(super) struct Clients {
    live: HashMap<u32, Client>,
    next_token: u32,
    /// Clients a write failed to: nothing more is sent to them or read from them, and
    /// they are removed at the end of the round (`take_doomed`), through `EventOps`.
    doomed: Vec<u32>,
}

impl Clients {
    /// Takes an accepted client into the event set under a fresh token; `None` (and the
    /// client sees its connection close) when too many are served or it cannot join.
    pub fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) -> Option<u32> {
        if self.live.len() >= MAX_CLIENTS {
            return None;
        }
        let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
        // A token still in use is skipped (after four billion clients the count wraps):
        // replacing a live client would close its registered descriptor.
        let mut token = self.next_token.max(FIRST_CLIENT);
        while self.live.contains_key(&token) {
            token = token.wrapping_add(1).max(FIRST_CLIENT);
        }
        self.next_token = token.wrapping_add(1);
        if let Err(e) = ops.add(Events::with_data(&stream, token, EventSet::IN)) {
            log::warn!("a control client could not join the event set: {e:?}");
            return None;
        }
        let client = Client {
            stream,
            decoder: Decoder::default(),
            console: None,
            console_seen: 0,
        };
        self.live.insert(token, client);
        Some(token)
    }

    /// A client still served (not one a write failed to).
    pub fn get_mut(&mut self, token: u32) -> Option<&mut Client> {
        if self.is_doomed(token) {
            return None;
        }
        self.live.get_mut(&token)
    }

    /// The console a served client watches.
    pub fn console_of(&self, token: u32) -> Option<Which> {
        self.live
            .get(&token)
            .filter(|_| !self.is_doomed(token))
            .and_then(|c| c.console)
    }

    /// Whether a write to the client has failed (it is dropped at the end of the round).
    pub fn is_doomed(&self, token: u32) -> bool {
        self.doomed.contains(&token)
    }

    /// Sends `bytes` whole; a client that is closed or stuck is doomed.
    pub fn send(&mut self, token: u32, bytes: &[u8]) {
        let Some(client) = self.get_mut(token) else {
            return;
        };
        if client.stream.write_all(bytes).is_err() {
            self.doomed.push(token);
        }
    }

    /// The served clients watching `which` console.
    pub fn watching(&self, which: Which) -> Vec<u32> {
        self.live
            .iter()
            .filter(|(t, c)| c.console == Some(which) && !self.is_doomed(**t))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Clients doomed since the last call: the caller removes each (and ends its work).
    pub fn take_doomed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.doomed)
    }

    /// Takes a client out of the event set, then closes its socket (in that order: see
    /// the module's comment).
    pub fn remove(&mut self, token: u32, ops: &mut EventOps) {
        self.doomed.retain(|&t| t != token);
        let Some(client) = self.live.remove(&token) else {
            return;
        };
        if let Err(e) = ops.remove(Events::with_data(&client.stream, token, EventSet::IN)) {
            log::warn!("control client {token} would not leave the event set: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const LISTENER: u32 = 0;
    const SEND: u32 = 1;

    /// The server's use of `Clients`, stripped down: accept, send to every client when
    /// `send` fires, read (and drop on end of file), and remove the doomed at the end of
    /// each round, as `ControlServer::process` does.
    struct Server {
        listener: UnixListener,
        send: EventFd,
        clients: Clients,
        admitted: Vec<u32>,
    }

    impl MutEventSubscriber for Server {
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            match events.data() {
                LISTENER => {
                    let (stream, _) = self.listener.accept().expect("accept");
                    if let Some(token) = self.clients.admit(stream, ops) {
                        self.admitted.push(token);
                    }
                }
                SEND => {
                    let _ = self.send.read();
                    let tokens: Vec<u32> = self.admitted.clone();
                    for t in tokens {
                        self.clients.send(t, b"hello");
                    }
                }
                token => {
                    let mut buf = [0u8; 64];
                    let n = match self.clients.get_mut(token) {
                        Some(c) => c.stream.read(&mut buf).unwrap_or(0),
                        None => 1,
                    };
                    if n == 0 {
                        self.clients.remove(token, ops);
                    }
                }
            }
            for t in self.clients.take_doomed() {
                self.clients.remove(t, ops);
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.listener, LISTENER, EventSet::IN))
                .unwrap();
            ops.add(Events::with_data(&self.send, SEND, EventSet::IN))
                .unwrap();
        }
    }

    fn server(tag: &str) -> (Arc<Mutex<Server>>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "exterior-clients-{}-{tag}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = Server {
            listener,
            send: EventFd::new(EFD_NONBLOCK).unwrap(),
            clients: Clients::default(),
            admitted: Vec::new(),
        };
        (Arc::new(Mutex::new(server)), path)
    }

    fn rounds(manager: &mut EventManager<Arc<Mutex<Server>>>, n: usize) {
        for _ in 0..n {
            manager.run_with_timeout(50).unwrap();
        }
    }

    #[test]
    fn a_client_a_write_failed_to_leaves_the_set_and_its_number_serves_the_next() {
        let (server, path) = server("doomed");
        let mut manager = EventManager::<Arc<Mutex<Server>>>::new().unwrap();
        manager.add_subscriber(server.clone());
        let served_fd =
            |s: &Server, token: u32| s.clients.live.get(&token).map(|c| c.stream.as_raw_fd());

        let mut current = UnixStream::connect(&path).unwrap();
        rounds(&mut manager, 2);
        let mut token = *server.lock().unwrap().admitted.last().unwrap();
        // Each time: the client leaves while a write to it is due, and a new one connects.
        // The send event is ready before the old client's end of file and the new one's
        // connection, so in one round the write fails, the old client goes, and the new
        // one is accepted, on the lowest free descriptor number: usually the old one's
        // (other tests running beside this one may take it, hence the repetitions).
        let mut reused = 0;
        for _ in 0..20 {
            let old_fd = served_fd(&server.lock().unwrap(), token).unwrap();
            server.lock().unwrap().send.write(1).unwrap();
            drop(current);
            current = UnixStream::connect(&path).unwrap();
            rounds(&mut manager, 2);
            let s = server.lock().unwrap();
            assert!(
                !s.clients.live.contains_key(&token),
                "the client a write failed to is still served"
            );
            let next = *s.admitted.last().unwrap();
            assert_ne!(next, token, "the next client was not admitted");
            if served_fd(&s, next) == Some(old_fd) {
                reused += 1;
            }
            token = next;
        }
        assert!(
            reused > 0,
            "no descriptor number was reused: nothing tested"
        );
        // And the last one is served.
        server.lock().unwrap().send.write(1).unwrap();
        rounds(&mut manager, 1);
        let mut got = [0u8; 5];
        current
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        current.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_doomed_client_gets_nothing_more_and_is_not_watching() {
        let (server, path) = server("quiet");
        let mut manager = EventManager::<Arc<Mutex<Server>>>::new().unwrap();
        manager.add_subscriber(server.clone());
        let _client = UnixStream::connect(&path).unwrap();
        rounds(&mut manager, 2);
        let mut s = server.lock().unwrap();
        let token = s.admitted[0];
        s.clients.get_mut(token).unwrap().console = Some(Which::Gvm);
        assert_eq!(s.clients.watching(Which::Gvm), vec![token]);
        s.clients.doomed.push(token);
        assert!(s.clients.get_mut(token).is_none());
        assert!(s.clients.watching(Which::Gvm).is_empty());
        drop(s);
        let _ = std::fs::remove_file(&path);
    }
}
