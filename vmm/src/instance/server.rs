//! The control server: the event-loop side of an instance. It accepts clients on the
//! control socket, relays `exec`/`shell` sessions to the SVM's agent over COM2, streams
//! consoles, and handles `stop` and `info`. It never waits on a guest: `quiesce` is
//! handed to a worker thread (`quiesce_worker.rs`).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use svm_runtime::protocol::{chunks, Decoder, Frame, Kind};
use vmm_sys_util::epoll::EventSet;

use super::clients::{Clients, Which};
use super::quiesce_worker::{parse_hold, QuiesceWorker, Request};
use crate::devices::serial::{ConsoleSerial, ConsoleTap, LinkInbox, LinkSerial};
use crate::executor::Executor;
use crate::exit::{ExitReason, ExitSignal};
use crate::sync::lock;

const TOKEN_LISTENER: u32 = 0;
const TOKEN_EXIT: u32 = 1;
const TOKEN_LINK: u32 = 2;
const TOKEN_GVM_TAP: u32 = 3;
const TOKEN_SVM_TAP: u32 = 4;
const TOKEN_QUIESCED: u32 = 5;
/// Largest chunk of console output per frame.
const CONSOLE_CHUNK: usize = 4096;

/// What the server is built from.
pub struct Parts {
    pub name: String,
    pub gvm_cpus: u8,
    pub listener: UnixListener,
    pub exit: Arc<ExitSignal>,
    pub inbox: Arc<LinkInbox>,
    pub link: Arc<Mutex<LinkSerial>>,
    pub gvm_tap: Arc<ConsoleTap>,
    pub svm_tap: Arc<ConsoleTap>,
    pub gvm_console: Arc<Mutex<ConsoleSerial>>,
    pub svm_console: Arc<Mutex<ConsoleSerial>>,
    /// Quiesces the GVM for `exterior-vmm quiesce`, off the event loop.
    pub quiesce: QuiesceWorker,
    /// The redirect engine: it gets the SVM's kernel symbols from the agent's Ready.
    pub executor: Arc<Executor>,
}

impl Parts {
    fn tap(&self, which: Which) -> &Arc<ConsoleTap> {
        match which {
            Which::Gvm => &self.gvm_tap,
            Which::Svm => &self.svm_tap,
        }
    }
}

pub struct ControlServer {
    parts: Parts,
    clients: Clients,
    link_decoder: Decoder,
    agent_ready: bool,
    /// Frames for the agent that arrived before it was ready.
    queued: Vec<Frame>,
    /// Agent session id → (client token, the client's id for it).
    sessions: HashMap<u32, (u32, u32)>,
    next_session: u32,
}

impl ControlServer {
    pub fn new(parts: Parts) -> Self {
        Self {
            parts,
            clients: Clients::default(),
            link_decoder: Decoder::default(),
            agent_ready: false,
            queued: Vec::new(),
            sessions: HashMap::new(),
            next_session: 1,
        }
    }

    fn send_agent(&mut self, frame: Frame) {
        if self.agent_ready {
            lock(&self.parts.link).input(&frame.encode());
        } else {
            self.queued.push(frame);
        }
    }

    /// A frame to a client; one that is closed or stuck is dropped, and its sessions
    /// ended, at the end of the round (`process`).
    fn send_client(&mut self, token: u32, frame: &Frame) {
        self.clients.send(token, &frame.encode());
    }

    /// Forgets a client (`Clients::remove`) and kills the commands it started in the SVM.
    fn drop_client(&mut self, token: u32, ops: &mut EventOps) {
        self.clients.remove(token, ops);
        let orphaned: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, (t, _))| *t == token)
            .map(|(sid, _)| *sid)
            .collect();
        for sid in orphaned {
            self.sessions.remove(&sid);
            // The client is gone: do not leave its command running in the SVM.
            self.send_agent(Frame::new(Kind::Signal, sid, vec![libc::SIGKILL as u8]));
        }
    }

    fn info(&self) -> String {
        use crate::executor::timing::Phase;
        let stats = &self.parts.executor.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let holds = stats.hold_summary();
        let phase = |p| stats.phases.summary(p);
        let mut info = format!(
            "name={}\npid={}\ngvm_cpus={}\nsvm_ready={}\nsessions={}\nredirect_ready={}\n\
             redirect_calls={}\nredirect_failed={}\nredirect_busy={}\nredirect_exits={}\n\
             redirect_console_exits={}\n\
             redirect_holds={}\nredirect_held_us={}\nredirect_held_median_us={}\n\
             redirect_held_max_us={}\n\
             redirect_setup_exits={}\nredirect_rolled_back={}\nredirect_parked={}\n\
             redirect_retried={}\n\
             redirect_committed_pages={}\nredirect_pending={}\nredirect_port_us={}\n\
             redirect_worker_us={}\nredirect_view_us={}\n\
             redirect_last_error={}\nredirect_modules={}\n",
            self.parts.name,
            std::process::id(),
            self.parts.gvm_cpus,
            u8::from(self.agent_ready),
            self.sessions.len(),
            u8::from(self.parts.executor.is_ready()),
            get(&stats.calls),
            get(&stats.failed),
            get(&stats.busy),
            get(&stats.exits),
            get(&stats.console_exits),
            holds.count,
            holds.total_us,
            holds.median_us,
            holds.max_us,
            get(&stats.setup_exits),
            get(&stats.rolled_back),
            get(&stats.parked),
            get(&stats.retried),
            get(&stats.committed_pages),
            get(&stats.pending),
            get(&stats.port_ns) / 1000,
            get(&stats.worker_ns) / 1000,
            phase(Phase::View).total_us + phase(Phase::Flush).total_us,
            crate::sync::lock(&stats.last_error),
            crate::sync::lock(&stats.modules),
        );
        info.push_str(&format!(
            "redirect_host_mmu={}\n",
            self.parts.executor.host_mmu.name()
        ));
        // Empty until the first call learnt it.
        let slide = self.parts.executor.kernel_slide();
        info.push_str(&format!(
            "redirect_kernel_slide={}\nredirect_kernel_slide_by={}\n",
            slide.map(|(v, _)| format!("{v:#x}")).unwrap_or_default(),
            slide.map(|(_, by)| by.name()).unwrap_or_default()
        ));
        for why in crate::executor::HoldEnd::ALL {
            info.push_str(&format!(
                "redirect_hold_ends_{}={}\n",
                why.name(),
                get(&stats.hold_ends[why as usize])
            ));
        }
        for p in Phase::ALL {
            let s = phase(p);
            let name = p.name();
            info.push_str(&format!(
                "redirect_phase_{name}_us={}\nredirect_phase_{name}_median_us={}\n\
                 redirect_phase_{name}_max_us={}\n",
                s.total_us, s.median_us, s.max_us
            ));
        }
        info
    }

    fn session_for(&self, token: u32, client_id: u32) -> Option<u32> {
        self.sessions
            .iter()
            .find(|(_, v)| **v == (token, client_id))
            .map(|(sid, _)| *sid)
    }

    fn handle_client_frame(&mut self, token: u32, frame: Frame) {
        match frame.kind {
            Kind::Exec => {
                let sid = self.next_session;
                self.next_session = self.next_session.wrapping_add(1).max(1);
                self.sessions.insert(sid, (token, frame.id));
                self.send_agent(Frame::new(Kind::Exec, sid, frame.payload));
            }
            Kind::Stdin | Kind::StdinEof | Kind::Signal | Kind::Resize => {
                if let Some(sid) = self.session_for(token, frame.id) {
                    self.send_agent(Frame::new(frame.kind, sid, frame.payload));
                }
            }
            Kind::Info => {
                let reply = Frame::new(Kind::Info, frame.id, self.info().into_bytes());
                self.send_client(token, &reply);
            }
            Kind::Quiesce => {
                // Quiescing waits on the guest and on redirected calls: the worker does it.
                let request = parse_hold(&frame.payload).map(|hold| Request {
                    token,
                    id: frame.id,
                    hold,
                });
                let refusal = match request {
                    Ok(r) => (!self.parts.quiesce.submit(r))
                        .then(|| "the quiesce worker has stopped".to_string()),
                    Err(why) => Some(why),
                };
                if let Some(why) = refusal {
                    self.send_client(token, &Frame::new(Kind::Error, frame.id, why.into_bytes()));
                }
            }
            Kind::Stop => {
                let reply = Frame::new(Kind::Info, frame.id, b"stopping\n".to_vec());
                self.send_client(token, &reply);
                self.parts.exit.signal(ExitReason::Stopped);
            }
            Kind::Console => {
                let which = match frame.payload.as_slice() {
                    b"svm" => Which::Svm,
                    _ => Which::Gvm,
                };
                let Some(c) = self.clients.get_mut(token) else {
                    return;
                };
                let (backlog, seen) = self.parts.tap(which).since(0);
                c.console = Some(which);
                c.console_seen = seen;
                for f in chunks(Kind::ConsoleData, 0, &backlog, CONSOLE_CHUNK) {
                    self.send_client(token, &f);
                }
            }
            Kind::ConsoleData => {
                let target = self.clients.console_of(token);
                match target {
                    Some(Which::Gvm) => lock(&self.parts.gvm_console).input(&frame.payload),
                    Some(Which::Svm) => lock(&self.parts.svm_console).input(&frame.payload),
                    None => {}
                }
            }
            other => {
                let msg = format!("unexpected {other:?} request");
                self.send_client(token, &Frame::new(Kind::Error, frame.id, msg.into_bytes()));
            }
        }
    }

    fn handle_agent_frame(&mut self, frame: Frame) {
        match frame.kind {
            Kind::Ready => {
                if !self.agent_ready {
                    self.parts.executor.set_symbols(&frame.payload);
                }
                self.agent_ready = true;
                let queued = std::mem::take(&mut self.queued);
                for f in queued {
                    self.send_agent(f);
                }
            }
            Kind::Stdout | Kind::Stderr | Kind::Error | Kind::Exit => {
                let Some(&(token, client_id)) = self.sessions.get(&frame.id) else {
                    return;
                };
                if frame.kind == Kind::Exit {
                    self.sessions.remove(&frame.id);
                }
                self.send_client(token, &Frame::new(frame.kind, client_id, frame.payload));
            }
            // Anything else from the SVM is ignored: it is not trusted to drive us.
            _ => {}
        }
    }

    fn on_listener(&mut self, ops: &mut EventOps) {
        if let Ok((stream, _)) = self.parts.listener.accept() {
            // Refused (too many, or it cannot join): the client sees the connection close.
            let _ = self.clients.admit(stream, ops);
        }
    }

    fn on_client(&mut self, token: u32, ops: &mut EventOps) {
        let mut buf = [0u8; 8192];
        let read = match self.clients.get_mut(token) {
            Some(c) => c.stream.read(&mut buf),
            None => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return self.drop_client(token, ops),
            Ok(n) => n,
        };
        let mut frames = Vec::new();
        if let Some(c) = self.clients.get_mut(token) {
            c.decoder.push(&buf[..n]);
            while let Some(r) = c.decoder.next_frame() {
                match r {
                    Ok(f) => frames.push(f),
                    // A client that speaks garbage is cut off.
                    Err(_) => {
                        frames.clear();
                        return self.drop_client(token, ops);
                    }
                }
            }
        }
        for f in frames {
            // A client a reply already failed to gets nothing more done for it.
            if self.clients.is_doomed(token) {
                break;
            }
            self.handle_client_frame(token, f);
        }
    }

    /// Sends each client watching `which` console the output it has not been sent.
    fn on_tap(&mut self, which: Which) {
        let tap = Arc::clone(self.parts.tap(which));
        tap.clear_event();
        for token in self.clients.watching(which) {
            let Some(c) = self.clients.get_mut(token) else {
                continue;
            };
            let (data, seen) = tap.since(c.console_seen);
            c.console_seen = seen;
            for f in chunks(Kind::ConsoleData, 0, &data, CONSOLE_CHUNK) {
                self.send_client(token, &f);
            }
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.on_listener(ops),
            TOKEN_EXIT => {
                let _ = self.parts.exit.event().read();
            }
            TOKEN_LINK => {
                let bytes = self.parts.inbox.take();
                self.link_decoder.push(&bytes);
                while let Some(r) = self.link_decoder.next_frame() {
                    match r {
                        Ok(f) => self.handle_agent_frame(f),
                        Err(e) => log::warn!("SVM agent line: {e}"),
                    }
                }
            }
            TOKEN_GVM_TAP => self.on_tap(Which::Gvm),
            TOKEN_SVM_TAP => self.on_tap(Which::Svm),
            TOKEN_QUIESCED => {
                for (token, reply) in self.parts.quiesce.take_replies() {
                    self.send_client(token, &reply);
                }
            }
            token => {
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    && !events.event_set().contains(EventSet::IN)
                {
                    self.drop_client(token, ops);
                } else {
                    self.on_client(token, ops);
                }
            }
        }
        for token in self.clients.take_doomed() {
            self.drop_client(token, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            Events::with_data(&self.parts.listener, TOKEN_LISTENER, EventSet::IN),
            Events::with_data(self.parts.exit.event(), TOKEN_EXIT, EventSet::IN),
            Events::with_data(self.parts.inbox.event(), TOKEN_LINK, EventSet::IN),
            Events::with_data(self.parts.gvm_tap.event(), TOKEN_GVM_TAP, EventSet::IN),
            Events::with_data(self.parts.svm_tap.event(), TOKEN_SVM_TAP, EventSet::IN),
            Events::with_data(self.parts.quiesce.event(), TOKEN_QUIESCED, EventSet::IN),
        ];
        for source in sources {
            if let Err(e) = ops.add(source) {
                self.parts.exit.signal(ExitReason::VmmError(format!(
                    "control server cannot watch its events: {e:?}"
                )));
            }
        }
    }
}
