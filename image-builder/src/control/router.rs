//! Several clients on one console: what the control proxy keeps to let
//! them share it (docs/control.md, Attaching).
//!
//! The console knows one host: one sequence-number space, one `Hello`, one
//! swap being received. The proxy gives each request the console gets a
//! number of its own ([`Router::from_client`]) and gives each answer back
//! the client's number, to that client only ([`Router::from_console`]);
//! events go to every client. What the console keeps for the host is kept
//! per client here:
//!
//! - **`Hello`**: a client's requests before its own `Hello` are refused
//!   here (`NotHello`), as the console refuses a host's, even when another
//!   client has said it. A console that restarted has forgotten the
//!   host's: a welcomed client's request it refuses `NotHello` is sent
//!   again, once, behind a `Hello` of the proxy's with the key the console
//!   welcomed ([`Router::resent`]), and the client sees only its answer.
//! - **Swaps**: one client's swap at a time. Another client's `SwapBegin`,
//!   `SwapChunk` or `SwapCommit` meanwhile is refused here
//!   (`SwapByAnotherClient`), and a chunk or commit from a client that
//!   began no swap is refused as the console refuses one without a
//!   `SwapBegin` (`SwapOutOfOrder { expected: 0 }`), so that no client
//!   adds to another's upload, not even one left unfinished by a client
//!   that went away. A swap that has sent nothing for [`SWAP_IDLE`] is
//!   abandoned: another client may begin its own, and the idle client's
//!   next chunk is refused.
//! - **Quotas**: a client has at most [`MAX_IN_FLIGHT`] requests waiting
//!   for the console (the proxy reads no more of it until one is
//!   answered), so that one flooding client delays the others by at most
//!   that many requests.
//! - `UseDebugPort` is the runner's, never a client's: it is not passed
//!   on (a client sending it would send every client's answers where the
//!   runner may not read).
//! - **What a client leaves behind** (`AtDetach`, answered here): a page
//!   watch a client declares (a view of a domain it listens through) is
//!   undone for it if it leaves without clearing it: the proxy sends the
//!   console, under numbers of its own ([`Router::outbox`]), the domain
//!   back to view 0, an answer `SwitchView(0)` to each of the view's
//!   events it passed on (an answered one is refused, harmlessly), the
//!   listen off and the view destroyed, and answers so each of the view's
//!   events that comes meanwhile, until the view's destruction is
//!   answered. A vCPU held by a killed agent's event would otherwise wait
//!   for ever, and the domain stay in a view nobody watches. A listener
//!   declared without a view (a VMI agent's, whose views are meant to
//!   outlast it) is undone by the listen off alone, which retries each
//!   event it held (the domain's no-listener policy then applies). One
//!   client's watch of a domain at a time
//!   ([`ControlError::WatchedByAnotherClient`]): two would each move the
//!   domain into their own view, or listen to its events, and the first to
//!   end would end the other's listen.

use ipc_schema::altp2m::{Action, AltRequest};
use ipc_schema::control::{
    ControlError, ControlEvent, ControlReply, ControlRequest, FromHost, ToHost, Watch,
};
use ipc_schema::hypercall::Request;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The most requests one client may have waiting for the console.
pub const MAX_IN_FLIGHT: usize = 32;

/// How long a swap may send nothing before another client may begin its
/// own (a swap's chunks follow each other within a round trip).
pub const SWAP_IDLE: Duration = Duration::from_secs(30);

/// The most requests waiting for the console, all clients together; beyond
/// it the oldest is forgotten (its answer, if it ever comes, is stray).
/// Only reached by a console that stopped answering.
const MAX_WAITING: usize = 4096;

/// A client of the proxy (its number in the proxy).
pub type ClientId = u64;

/// The proxy itself, for the requests it sends of its own (a watch
/// undone): their answers are nobody's.
const PROXY: ClientId = ClientId::MAX;

/// The most watches one client may leave to the proxy (`AtDetach`).
pub const MAX_WATCHES: usize = 16;

/// The most events of a watched view the proxy keeps the numbers of, to
/// answer them if the watch's client leaves: far more than the domain has
/// vCPUs to wait on them (each waits on one at most).
const WATCH_EVENTS: usize = 64;

/// How long a watch being undone keeps its domain from another client's
/// watch if the console answers nothing of the undoing.
const UNDO_IDLE: Duration = SWAP_IDLE;

/// A page watch a client left to the proxy (`AtDetach`).
#[derive(Debug)]
struct Held {
    /// Its client; `Err(when)` once it left without clearing it: being
    /// undone since then.
    client: Result<ClientId, Instant>,
    /// The view of its own, if any (`None`: a listener alone).
    view: Option<u16>,
    /// The numbers of its view's latest events (answered or not).
    events: VecDeque<u32>,
}

/// What becomes of a client's request. (One at a time, moved on at once:
/// its size does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum FromClient {
    /// To the console, under the proxy's sequence number.
    Console(FromHost),
    /// Answered by the proxy itself, to the client that asked.
    Answer(ToHost),
    /// Not passed on, not answered (`UseDebugPort`, which the console
    /// never answers either).
    Dropped,
}

/// Who gets a frame of the console's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    Client(ClientId),
    /// Every client: events, and errors about frames the console could not
    /// read (sequence number 0).
    All,
}

/// Where a client stands with `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Greeting {
    /// It has not said it (or the console refused it).
    Fresh,
    /// Said, not yet answered: its next requests go on behind it, as the
    /// console takes them in order.
    Said,
    Welcomed,
}

/// What a request waiting for the console needs when its answer comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Hello,
    SwapBegin,
    SwapChunk,
    SwapCommit,
    Other,
    /// The proxy's own, undoing a watch of the domain; `last`: the view's
    /// destruction, the end of the undoing.
    Undo {
        domain: u16,
        last: bool,
    },
}

#[derive(Clone, Debug)]
struct Waiting {
    client: ClientId,
    /// The client's own sequence number.
    seq: u32,
    kind: Kind,
    /// The request, kept to send again once if the console has forgotten
    /// the host's `Hello` ([`Router::hello_again`]); `None` once sent again.
    request: Option<ControlRequest>,
}

/// The proxy's bookkeeping for several clients on one console. See the
/// module documentation.
#[derive(Debug)]
pub struct Router {
    next: u32,
    waiting: BTreeMap<u32, Waiting>,
    clients: HashMap<ClientId, Greeting>,
    /// The client whose swap the console is receiving, and when it last
    /// sent a part of it.
    swapper: Option<(ClientId, Instant)>,
    /// The watches clients left to the proxy, by domain.
    watches: BTreeMap<u16, Held>,
    /// The proxy's own requests for the console, not yet sent.
    outbox: Vec<FromHost>,
    /// The key of the last `Hello` the console welcomed.
    key: Option<[u8; 8]>,
    /// Answers for nobody (their client left, or they were forgotten).
    pub stray: u64,
    /// Watches undone for clients that left without.
    pub undone: u64,
    /// Requests sent again behind a `Hello` of the proxy's, the console
    /// having forgotten the host's (it restarted).
    pub resent: u64,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    pub fn new() -> Self {
        Self {
            next: 1,
            waiting: BTreeMap::new(),
            clients: HashMap::new(),
            swapper: None,
            watches: BTreeMap::new(),
            outbox: Vec::new(),
            key: None,
            stray: 0,
            undone: 0,
            resent: 0,
        }
    }

    /// A client attached.
    pub fn attach(&mut self, client: ClientId) {
        self.clients.insert(client, Greeting::Fresh);
    }

    /// A client left at `now`: its waiting requests are forgotten (their
    /// answers will be stray), its swap, if any, is over for the proxy (the
    /// console's half-received one is replaced by the next `SwapBegin`),
    /// and the watches it left to the proxy are undone (requests in
    /// [`Router::outbox`]).
    pub fn leave(&mut self, client: ClientId, now: Instant) {
        self.clients.remove(&client);
        self.waiting.retain(|_, w| w.client != client);
        if self.swapping() == Some(client) {
            self.swapper = None;
        }
        let mut undo = Vec::new();
        for (&domain, h) in &mut self.watches {
            if h.client == Ok(client) {
                h.client = Err(now);
                undo.push((domain, h.view, std::mem::take(&mut h.events)));
            }
        }
        for (domain, view, events) in undo {
            self.undone += 1;
            let external = |request| AltRequest::External { domain, request };
            let [other, last] = [false, true].map(|last| Kind::Undo { domain, last });
            let Some(view) = view else {
                // A listener alone: its events are retried as it detaches.
                self.own(AltRequest::Listen { domain, on: false }, last);
                continue;
            };
            self.own(external(Request::ViewSwitchAll { view: 0 }), other);
            for event in events {
                self.answer_switched(event, domain);
            }
            self.own(AltRequest::Listen { domain, on: false }, other);
            self.own(external(Request::ViewDestroy { view }), last);
        }
    }

    /// The proxy's own requests for the console (a watch undone), to send
    /// in this order; their answers are nobody's.
    pub fn outbox(&mut self) -> Vec<FromHost> {
        std::mem::take(&mut self.outbox)
    }

    /// Sends altp2m `request` of the proxy's own.
    fn own(&mut self, request: AltRequest, kind: Kind) {
        let request = ControlRequest::Altp2m(request);
        self.queue(PROXY, 0, kind, request, true);
    }

    /// Puts `request` (of `client`, its number `seq`) in the outbox under a
    /// number of the proxy's, kept to send again if `keep`.
    fn queue(
        &mut self,
        client: ClientId,
        seq: u32,
        kind: Kind,
        request: ControlRequest,
        keep: bool,
    ) {
        let ours = self.wait(client, seq, kind, keep.then(|| request.clone()));
        self.outbox.push(FromHost { seq: ours, request });
    }

    /// Answers event `event` of `domain` in view 0.
    fn answer_switched(&mut self, event: u32, domain: u16) {
        let answer = AltRequest::Answer {
            event,
            action: Action::SwitchView(0),
        };
        let last = false;
        self.own(answer, Kind::Undo { domain, last });
    }

    /// A request of `client`'s (its number `seq`; `request` kept to send
    /// again) for the console: the proxy's number for it.
    fn wait(
        &mut self,
        client: ClientId,
        seq: u32,
        kind: Kind,
        request: Option<ControlRequest>,
    ) -> u32 {
        let ours = self.next;
        // (0 is the console's "unknown" and never one of ours.)
        self.next = self.next.wrapping_add(1).max(1);
        let w = Waiting {
            client,
            seq,
            kind,
            request,
        };
        self.waiting.insert(ours, w);
        if self.waiting.len() > MAX_WAITING {
            self.waiting.pop_first();
        }
        ours
    }

    /// `AtDetach` from `client`: the watch left to the proxy, or taken
    /// back.
    fn at_detach(&mut self, client: ClientId, w: Watch, set: bool, now: Instant) -> ControlReply {
        let refuse = |e| ControlReply::Error(e);
        let domain = w.domain;
        if let Some(h) = self.watches.get(&domain) {
            match h.client {
                Ok(c) if c == client => {
                    if set {
                        if h.view != w.view {
                            self.watches.insert(domain, Held::new(client, w.view));
                        }
                    } else {
                        self.watches.remove(&domain);
                    }
                    return ControlReply::Done;
                }
                // Its undoing went unanswered: the domain is free again.
                Err(since) if now.duration_since(since) >= UNDO_IDLE => {
                    self.watches.remove(&domain);
                }
                _ => return refuse(ControlError::WatchedByAnotherClient { domain }),
            }
        }
        if !set {
            return ControlReply::Done;
        }
        let mine = self.watches.values().filter(|h| h.client == Ok(client));
        if mine.count() >= MAX_WATCHES {
            let max = MAX_WATCHES as u16;
            return refuse(ControlError::TooManyWatches { max });
        }
        self.watches.insert(domain, Held::new(client, w.view));
        ControlReply::Done
    }

    /// How many of `client`'s requests wait for the console.
    pub fn in_flight(&self, client: ClientId) -> usize {
        self.waiting.values().filter(|w| w.client == client).count()
    }

    /// The client whose swap the console is receiving.
    fn swapping(&self) -> Option<ClientId> {
        self.swapper.map(|(c, _)| c)
    }

    /// A request from `client`, which came at `now`.
    pub fn from_client(&mut self, client: ClientId, m: FromHost, now: Instant) -> FromClient {
        let Some(&greeting) = self.clients.get(&client) else {
            return FromClient::Dropped;
        };
        if self
            .swapper
            .is_some_and(|(c, last)| c != client && now.duration_since(last) >= SWAP_IDLE)
        {
            // Abandoned: its client is still there, its swap is not.
            self.swapper = None;
        }
        let refuse = |e| {
            FromClient::Answer(ToHost::Reply {
                seq: m.seq,
                reply: ControlReply::Error(e),
            })
        };
        let kind = match m.request {
            ControlRequest::UseDebugPort => return FromClient::Dropped,
            ControlRequest::Hello { .. } => Kind::Hello,
            _ if greeting == Greeting::Fresh => return refuse(ControlError::NotHello),
            ControlRequest::AtDetach { watch, set } => {
                let reply = self.at_detach(client, watch, set, now);
                return FromClient::Answer(ToHost::Reply { seq: m.seq, reply });
            }
            ControlRequest::SwapBegin { .. } | ControlRequest::SwapChunk { .. }
                if self.swapping().is_some_and(|c| c != client) =>
            {
                return refuse(ControlError::SwapByAnotherClient);
            }
            ControlRequest::SwapCommit if self.swapping().is_some_and(|c| c != client) => {
                return refuse(ControlError::SwapByAnotherClient);
            }
            ControlRequest::SwapChunk { .. } | ControlRequest::SwapCommit
                if self.swapper.is_none() =>
            {
                return refuse(ControlError::SwapOutOfOrder { expected: 0 });
            }
            ControlRequest::SwapBegin { .. } => Kind::SwapBegin,
            ControlRequest::SwapCommit => Kind::SwapCommit,
            ControlRequest::SwapChunk { .. } => Kind::SwapChunk,
            _ => Kind::Other,
        };
        match kind {
            Kind::Hello if greeting == Greeting::Fresh => {
                self.clients.insert(client, Greeting::Said);
            }
            Kind::SwapBegin | Kind::SwapChunk | Kind::SwapCommit => {
                self.swapper = Some((client, now));
            }
            _ => {}
        }
        let seq = self.wait(client, m.seq, kind, Some(m.request.clone()));
        FromClient::Console(FromHost {
            seq,
            request: m.request,
        })
    }

    /// A frame from the console: who gets it, as they get it; `None` for
    /// an answer whose client has gone (counted in [`Router::stray`]).
    pub fn from_console(&mut self, m: ToHost) -> Option<(Dest, ToHost)> {
        if let ToHost::Event(ControlEvent::Violation(e)) = &m {
            self.watched_event(e.id, e.domain, e.view);
        }
        match m {
            ToHost::Event(_) | ToHost::Reply { seq: 0, .. } => Some((Dest::All, m)),
            ToHost::Data { seq, offset, bytes } => match self.waiting.get(&seq) {
                Some(w) => Some((
                    Dest::Client(w.client),
                    ToHost::Data {
                        seq: w.seq,
                        offset,
                        bytes,
                    },
                )),
                None => {
                    self.stray += 1;
                    None
                }
            },
            ToHost::Reply { seq, reply } => {
                let Some(mut w) = self.waiting.remove(&seq) else {
                    self.stray += 1;
                    return None;
                };
                if reply == ControlReply::Error(ControlError::NotHello) && self.hello_again(&mut w)
                {
                    return None;
                }
                self.answered(&w, &reply);
                (w.client != PROXY)
                    .then_some((Dest::Client(w.client), ToHost::Reply { seq: w.seq, reply }))
            }
        }
    }

    /// Event `id`, of `domain` in `view`: kept by the watch of the view,
    /// answered at once if its watch is being undone.
    fn watched_event(&mut self, id: u32, domain: u16, view: u16) {
        let Some(h) = self
            .watches
            .get_mut(&domain)
            .filter(|h| h.view == Some(view))
        else {
            return;
        };
        if h.client.is_err() {
            self.answer_switched(id, domain);
            return;
        }
        if h.events.len() == WATCH_EVENTS {
            h.events.pop_front();
        }
        h.events.push_back(id);
    }

    /// `w`, a request refused `NotHello`: if its client had been welcomed
    /// (or it is the proxy's), the console has forgotten the host's `Hello`
    /// (a restarted console starts afresh, having done nothing with the
    /// request): the proxy says it again, with the key the console
    /// welcomed, and sends the request again behind it, once. False
    /// otherwise: the refusal is the client's.
    fn hello_again(&mut self, w: &mut Waiting) -> bool {
        let welcomed =
            w.client == PROXY || self.clients.get(&w.client) == Some(&Greeting::Welcomed);
        let Some(key) = self.key.filter(|_| welcomed && w.kind != Kind::Hello) else {
            return false;
        };
        let Some(request) = w.request.take() else {
            return false;
        };
        self.resent += 1;
        // (The Hello kept: its answer names the key welcomed.)
        self.queue(PROXY, 0, Kind::Hello, ControlRequest::Hello { key }, true);
        self.queue(w.client, w.seq, w.kind, request, false);
        true
    }

    /// What an answer changes for its client.
    fn answered(&mut self, w: &Waiting, reply: &ControlReply) {
        let mine = self.swapping() == Some(w.client);
        match w.kind {
            Kind::Hello => {
                if let (ControlReply::Welcome { .. }, Some(ControlRequest::Hello { key })) =
                    (reply, &w.request)
                {
                    self.key = Some(*key);
                }
                if let Some(g) = self.clients.get_mut(&w.client) {
                    match reply {
                        ControlReply::Welcome { .. } => *g = Greeting::Welcomed,
                        // (A refused second Hello leaves the first standing,
                        // as in the console.)
                        _ if *g == Greeting::Said => *g = Greeting::Fresh,
                        _ => {}
                    }
                }
            }
            // A refused begin received nothing; a commit that was not
            // refused for missing bytes ended the swap, done or not.
            Kind::SwapBegin if mine && *reply != ControlReply::Done => self.swapper = None,
            Kind::SwapCommit
                if mine
                    && !matches!(
                        reply,
                        ControlReply::Error(ControlError::SwapOutOfOrder { .. })
                    ) =>
            {
                self.swapper = None
            }
            Kind::Undo { domain, last: true }
                if self.watches.get(&domain).is_some_and(|h| h.client.is_err()) =>
            {
                self.watches.remove(&domain);
            }
            _ => {}
        }
    }
}

impl Held {
    fn new(client: ClientId, view: Option<u16>) -> Self {
        Self {
            client: Ok(client),
            view,
            events: VecDeque::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::control::{CONTROL, ControlEvent};
    use ipc_schema::supervisor::name;
    use proptest::prelude::*;

    fn hello(seq: u32) -> FromHost {
        FromHost {
            seq,
            request: ControlRequest::Hello {
                key: CONTROL.key.to_bytes(),
            },
        }
    }

    fn ask(seq: u32, request: ControlRequest) -> FromHost {
        FromHost { seq, request }
    }

    /// Passes `m` from `client` and answers it as the console would with
    /// `reply`: what the client gets.
    fn round(r: &mut Router, client: ClientId, m: FromHost, reply: ControlReply) -> ToHost {
        match r.from_client(client, m, Instant::now()) {
            FromClient::Console(to) => {
                let (dest, back) = r
                    .from_console(ToHost::Reply { seq: to.seq, reply })
                    .expect("routed");
                assert_eq!(dest, Dest::Client(client));
                back
            }
            FromClient::Answer(a) => a,
            FromClient::Dropped => panic!("dropped"),
        }
    }

    /// A router with `clients` attached, each welcomed.
    fn welcomed(clients: &[ClientId]) -> Router {
        let mut r = Router::new();
        for &c in clients {
            r.attach(c);
            round(&mut r, c, hello(1), ControlReply::Welcome { version: 1 });
        }
        r
    }

    fn error(seq: u32, e: ControlError) -> ToHost {
        ToHost::Reply {
            seq,
            reply: ControlReply::Error(e),
        }
    }

    #[test]
    fn each_client_says_hello_for_itself() {
        let mut r = Router::new();
        r.attach(1);
        r.attach(2);
        let welcome = ControlReply::Welcome { version: 1 };
        round(&mut r, 1, hello(7), welcome.clone());
        // Client 1's hello does not count for client 2.
        let m = ask(7, ControlRequest::Service { index: 0 });
        assert_eq!(
            r.from_client(2, m.clone(), Instant::now()),
            FromClient::Answer(error(7, ControlError::NotHello))
        );
        assert!(matches!(
            r.from_client(1, m, Instant::now()),
            FromClient::Console(_)
        ));
        // A refused hello leaves a client as it was.
        let refused = ControlReply::Error(ControlError::WrongKey {
            console: [0; 8],
            host: [1; 8],
        });
        round(&mut r, 2, hello(8), refused.clone());
        assert!(matches!(
            r.from_client(
                2,
                ask(9, ControlRequest::Service { index: 0 }),
                Instant::now()
            ),
            FromClient::Answer(_)
        ));
        round(&mut r, 1, hello(10), refused);
        assert!(matches!(
            r.from_client(
                1,
                ask(11, ControlRequest::Service { index: 0 }),
                Instant::now()
            ),
            FromClient::Console(_)
        ));
        // Requests right behind a hello go on behind it.
        assert!(matches!(
            r.from_client(2, hello(12), Instant::now()),
            FromClient::Console(_)
        ));
        assert!(matches!(
            r.from_client(
                2,
                ask(13, ControlRequest::Domain { index: 0 }),
                Instant::now()
            ),
            FromClient::Console(_)
        ));
    }

    /// A restarted console has forgotten the host's `Hello`: a welcomed
    /// client's request it refuses `NotHello` goes again behind the
    /// proxy's own `Hello`, once, and the client sees only the answer; a
    /// client whose `Hello` is still on its way gets the refusal.
    #[test]
    fn a_restarted_consoles_forgotten_hello_is_said_again_for_the_clients() {
        let mut r = welcomed(&[1, 2]);
        let now = Instant::now();
        let domain = ControlRequest::Domain { index: 0 };
        let FromClient::Console(to) = r.from_client(1, ask(5, domain.clone()), now) else {
            panic!()
        };
        assert_eq!(r.from_console(error(to.seq, ControlError::NotHello)), None);
        let out = r.outbox();
        let sent: Vec<_> = out.iter().map(|m| m.request.clone()).collect();
        assert_eq!(sent, [hello(0).request, domain.clone()]);
        let answer = |seq, reply| ToHost::Reply { seq, reply };
        let welcome = ControlReply::Welcome { version: 1 };
        assert_eq!(r.from_console(answer(out[0].seq, welcome)), None);
        assert_eq!(
            r.from_console(answer(out[1].seq, ControlReply::Domain(None))),
            Some((Dest::Client(1), answer(5, ControlReply::Domain(None))))
        );
        // Refused again after it was sent again: the client's.
        let FromClient::Console(to) = r.from_client(2, ask(6, domain.clone()), now) else {
            panic!()
        };
        r.from_console(error(to.seq, ControlError::NotHello));
        let again = r.outbox();
        assert_eq!(
            r.from_console(error(again[1].seq, ControlError::NotHello)),
            Some((Dest::Client(2), error(6, ControlError::NotHello)))
        );
        assert_eq!((r.resent, r.stray), (2, 0));
        // A client whose Hello has not been answered: the refusal is its.
        r.attach(3);
        assert!(matches!(
            r.from_client(3, hello(1), now),
            FromClient::Console(_)
        ));
        let FromClient::Console(to) = r.from_client(3, ask(2, domain), now) else {
            panic!()
        };
        assert_eq!(
            r.from_console(error(to.seq, ControlError::NotHello)),
            Some((Dest::Client(3), error(2, ControlError::NotHello)))
        );
        assert!(r.outbox().is_empty());
    }

    #[test]
    fn one_swap_at_a_time_and_nobody_adds_to_anothers() {
        let mut r = welcomed(&[1, 2]);
        let begin = || ControlRequest::SwapBegin {
            name: name("vmm"),
            len: 4,
        };
        let chunk = || ControlRequest::SwapChunk {
            offset: 0,
            bytes: ipc_schema::ipc::BoundedVec(heapless::Vec::from_slice(&[1, 2, 3, 4]).unwrap()),
        };
        // A chunk or commit with no swap begun is refused here.
        assert_eq!(
            round(&mut r, 2, ask(2, chunk()), ControlReply::Done),
            error(2, ControlError::SwapOutOfOrder { expected: 0 })
        );
        round(&mut r, 1, ask(2, begin()), ControlReply::Done);
        for (seq, req) in [(3, begin()), (4, chunk()), (5, ControlRequest::SwapCommit)] {
            assert_eq!(
                r.from_client(2, ask(seq, req), Instant::now()),
                FromClient::Answer(error(seq, ControlError::SwapByAnotherClient))
            );
        }
        round(&mut r, 1, ask(3, chunk()), ControlReply::Done);
        // A commit refused for missing bytes keeps the swap; one answered
        // otherwise ends it.
        round(
            &mut r,
            1,
            ask(4, ControlRequest::SwapCommit),
            ControlReply::Error(ControlError::SwapOutOfOrder { expected: 4 }),
        );
        assert!(matches!(
            r.from_client(2, ask(6, begin()), Instant::now()),
            FromClient::Answer(_)
        ));
        round(
            &mut r,
            1,
            ask(5, ControlRequest::SwapCommit),
            ControlReply::Swapped { generation: 2 },
        );
        round(&mut r, 2, ask(7, begin()), ControlReply::Done);
        // The swapper leaves mid-upload: the next client begins its own,
        // and nobody may add to the one left behind.
        r.leave(2, Instant::now());
        assert_eq!(
            round(&mut r, 1, ask(8, chunk()), ControlReply::Done),
            error(8, ControlError::SwapOutOfOrder { expected: 0 })
        );
        // A refused begin received nothing.
        round(
            &mut r,
            1,
            ask(9, begin()),
            ControlReply::Error(ControlError::SwapTooLarge { max: 1 }),
        );
        assert_eq!(
            round(
                &mut r,
                1,
                ask(10, ControlRequest::SwapCommit),
                ControlReply::Done
            ),
            error(10, ControlError::SwapOutOfOrder { expected: 0 })
        );
    }

    /// A swap that sends nothing for `SWAP_IDLE` (its client hung, not
    /// gone) is abandoned to the next client's; each part sent keeps it.
    #[test]
    fn an_idle_swap_gives_way_and_its_late_chunks_are_refused() {
        let mut r = welcomed(&[1, 2]);
        let begin = || {
            ask(
                2,
                ControlRequest::SwapBegin {
                    name: name("vmm"),
                    len: 512,
                },
            )
        };
        let chunk = || {
            ask(
                3,
                ControlRequest::SwapChunk {
                    offset: 0,
                    bytes: ipc_schema::ipc::BoundedVec(heapless::Vec::new()),
                },
            )
        };
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let at = |r: &mut Router, c, m, t| match r.from_client(c, m, t) {
            FromClient::Console(to) => {
                r.from_console(ToHost::Reply {
                    seq: to.seq,
                    reply: ControlReply::Done,
                });
                None
            }
            FromClient::Answer(ToHost::Reply {
                reply: ControlReply::Error(e),
                ..
            }) => Some(e),
            other => panic!("{other:?}"),
        };
        assert_eq!(at(&mut r, 1, begin(), t0), None);
        assert_eq!(at(&mut r, 1, chunk(), t0 + 20 * s), None);
        // 20 s after its last part, not abandoned; 30 s after, it is.
        let busy = Some(ControlError::SwapByAnotherClient);
        assert_eq!(at(&mut r, 2, begin(), t0 + 40 * s), busy);
        assert_eq!(at(&mut r, 2, begin(), t0 + 20 * s + SWAP_IDLE), None);
        assert_eq!(at(&mut r, 1, chunk(), t0 + 51 * s), busy);
    }

    #[test]
    fn events_go_to_all_answers_to_nobody_else_and_a_debug_port_request_nowhere() {
        let mut r = welcomed(&[1]);
        let event = ToHost::Event(ControlEvent::Missed { count: 1 });
        assert_eq!(r.from_console(event.clone()), Some((Dest::All, event)));
        let unreadable = error(0, ControlError::Malformed);
        assert_eq!(
            r.from_console(unreadable.clone()),
            Some((Dest::All, unreadable))
        );
        assert_eq!(
            r.from_client(1, ask(2, ControlRequest::UseDebugPort), Instant::now()),
            FromClient::Dropped
        );
        // An answer to a client that left is nobody's.
        let FromClient::Console(to) = r.from_client(
            1,
            ask(3, ControlRequest::Domain { index: 0 }),
            Instant::now(),
        ) else {
            panic!()
        };
        r.leave(1, Instant::now());
        assert_eq!(r.from_console(error(to.seq, ControlError::Malformed)), None);
        assert_eq!(r.stray, 1);
        assert_eq!(r.in_flight(1), 0);
    }

    fn at_detach(seq: u32, domain: u16, view: impl Into<Option<u16>>, set: bool) -> FromHost {
        let watch = Watch {
            domain,
            view: view.into(),
        };
        ask(seq, ControlRequest::AtDetach { watch, set })
    }

    fn violation(id: u32, domain: u16, view: u16) -> ToHost {
        use ipc_schema::vmexit::AccessBits;
        let bits = |write| AccessBits {
            read: true,
            write,
            execute: false,
        };
        ToHost::Event(ControlEvent::Violation(ipc_schema::altp2m::VmEvent {
            id,
            domain,
            vcpu: 0,
            view,
            gpa: 0x1000,
            gla: None,
            access: bits(true),
            allowed: bits(false),
            rip: 0,
            internal: false,
            paused: true,
            qualification: 0,
        }))
    }

    /// The router's answer to `m` from `client` (refused or done here).
    fn local(r: &mut Router, client: ClientId, m: FromHost, now: Instant) -> ControlReply {
        match r.from_client(client, m, now) {
            FromClient::Answer(ToHost::Reply { reply, .. }) => reply,
            other => panic!("{other:?}"),
        }
    }

    /// What a watch left to the proxy becomes when its client leaves: the
    /// domain back in view 0, the view's events answered in view 0 (those
    /// that come meanwhile too, until the view's destruction is answered),
    /// the listen off, the view destroyed; the answers go to nobody, and
    /// are not stray.
    #[test]
    fn a_watch_left_behind_is_undone_for_its_client() {
        let mut r = welcomed(&[1, 2, 3]);
        let now = Instant::now();
        assert_eq!(
            local(&mut r, 1, at_detach(2, 1, 3, true), now),
            ControlReply::Done
        );
        // Events of its view are kept; others' are not its.
        for e in [violation(5, 1, 3), violation(6, 1, 4), violation(7, 2, 3)] {
            assert_eq!(r.from_console(e.clone()).map(|(d, _)| d), Some(Dest::All));
        }
        assert!(r.outbox().is_empty(), "nothing of its own while it stays");
        r.leave(2, now);
        assert!(r.outbox().is_empty(), "client 2 left nothing");
        r.leave(1, now);
        let switched = |event| {
            ControlRequest::Altp2m(AltRequest::Answer {
                event,
                action: Action::SwitchView(0),
            })
        };
        let ext = |request| ControlRequest::Altp2m(AltRequest::External { domain: 1, request });
        let out = r.outbox();
        let requests: Vec<_> = out.iter().map(|m| m.request.clone()).collect();
        assert_eq!(
            requests,
            [
                ext(Request::ViewSwitchAll { view: 0 }),
                switched(5),
                ControlRequest::Altp2m(AltRequest::Listen {
                    domain: 1,
                    on: false
                }),
                ext(Request::ViewDestroy { view: 3 }),
            ]
        );
        assert_eq!(r.undone, 1);
        // An event of the view that comes meanwhile is answered too.
        r.from_console(violation(8, 1, 3));
        let late = r.outbox();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].request, switched(8));
        // Meanwhile the domain is not another's to watch.
        assert_eq!(
            local(&mut r, 3, at_detach(3, 1, 5, true), now),
            ControlReply::Error(ControlError::WatchedByAnotherClient { domain: 1 })
        );
        // The answers are nobody's (not stray); the destruction's ends it.
        for m in out.iter().chain(&late) {
            let answer = ToHost::Reply {
                seq: m.seq,
                reply: ControlReply::Done,
            };
            assert_eq!(r.from_console(answer), None);
        }
        assert_eq!(r.stray, 0);
        r.from_console(violation(9, 1, 3));
        assert!(r.outbox().is_empty(), "the undoing is over");
        assert_eq!(
            local(&mut r, 3, at_detach(4, 1, 5, true), now),
            ControlReply::Done
        );
    }

    /// A listener left to the proxy without a view (a VMI agent's): when
    /// its client leaves, the listen off and nothing more (its views stay;
    /// the events it held are retried by altp2m as the listen ends, so the
    /// proxy answers none); the domain is another's to watch once the
    /// listen off is answered. It excludes a page watch as one does.
    #[test]
    fn a_listener_left_behind_has_its_listen_ended_and_nothing_else() {
        let mut r = welcomed(&[1, 2]);
        let now = Instant::now();
        assert_eq!(
            local(&mut r, 1, at_detach(2, 4, None, true), now),
            ControlReply::Done
        );
        let busy = ControlReply::Error(ControlError::WatchedByAnotherClient { domain: 4 });
        assert_eq!(local(&mut r, 2, at_detach(2, 4, 3, true), now), busy);
        for e in [violation(5, 4, 0), violation(6, 4, 3)] {
            assert_eq!(r.from_console(e).map(|(d, _)| d), Some(Dest::All));
        }
        r.leave(1, now);
        let out = r.outbox();
        let requests: Vec<_> = out.iter().map(|m| m.request.clone()).collect();
        let off = AltRequest::Listen {
            domain: 4,
            on: false,
        };
        assert_eq!(requests, [ControlRequest::Altp2m(off)]);
        assert_eq!(r.undone, 1);
        r.from_console(violation(7, 4, 0));
        assert!(r.outbox().is_empty(), "its events are altp2m's to retry");
        assert_eq!(local(&mut r, 2, at_detach(3, 4, None, true), now), busy);
        let answer = ToHost::Reply {
            seq: out[0].seq,
            reply: ControlReply::Done,
        };
        assert_eq!(r.from_console(answer), None);
        assert_eq!(r.stray, 0);
        assert_eq!(
            local(&mut r, 2, at_detach(4, 4, None, true), now),
            ControlReply::Done
        );
    }

    /// One client's watch of a domain at a time; a client takes its own
    /// back, changes its view, and leaves nothing behind once taken back;
    /// an undoing the console never answers frees the domain after
    /// `UNDO_IDLE`; each client leaves at most `MAX_WATCHES`.
    #[test]
    fn one_watch_of_a_domain_at_a_time_and_a_bounded_number_per_client() {
        let mut r = welcomed(&[1, 2]);
        let t0 = Instant::now();
        let busy = ControlReply::Error(ControlError::WatchedByAnotherClient { domain: 1 });
        let done = ControlReply::Done;
        // Before its Hello, refused as everything else.
        r.attach(3);
        assert_eq!(
            local(&mut r, 3, at_detach(1, 1, 3, true), t0),
            ControlReply::Error(ControlError::NotHello)
        );
        assert_eq!(local(&mut r, 1, at_detach(2, 1, 3, true), t0), done);
        assert_eq!(local(&mut r, 2, at_detach(2, 1, 4, true), t0), busy);
        assert_eq!(local(&mut r, 2, at_detach(3, 1, 3, false), t0), busy);
        assert_eq!(local(&mut r, 2, at_detach(4, 2, 4, true), t0), done);
        // Its own again, another view: the new one is the watch's.
        assert_eq!(local(&mut r, 1, at_detach(3, 1, 6, true), t0), done);
        r.from_console(violation(5, 1, 3));
        r.from_console(violation(6, 1, 6));
        assert_eq!(local(&mut r, 1, at_detach(4, 1, 6, false), t0), done);
        assert_eq!(local(&mut r, 1, at_detach(5, 1, 6, false), t0), done);
        r.leave(1, t0);
        assert!(r.outbox().is_empty(), "taken back: nothing to undo");
        // Client 2 leaves its watch of domain 2; the console answers none
        // of the undoing.
        r.leave(2, t0);
        assert_eq!(r.outbox().len(), 3);
        r.attach(4);
        round(&mut r, 4, hello(1), ControlReply::Welcome { version: 1 });
        let busy2 = ControlReply::Error(ControlError::WatchedByAnotherClient { domain: 2 });
        assert_eq!(local(&mut r, 4, at_detach(2, 2, 9, true), t0), busy2);
        assert_eq!(
            local(&mut r, 4, at_detach(3, 2, 9, true), t0 + UNDO_IDLE),
            done
        );
        // At most MAX_WATCHES of one client.
        for d in 3..2 + MAX_WATCHES as u16 {
            assert_eq!(local(&mut r, 4, at_detach(4, d, 1, true), t0), done);
        }
        assert_eq!(
            local(&mut r, 4, at_detach(5, 100, 1, true), t0),
            ControlReply::Error(ControlError::TooManyWatches {
                max: MAX_WATCHES as u16
            })
        );
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// Client `c` sends a request with its sequence number `seq`.
        Send {
            c: u8,
            seq: u32,
        },
        /// The console answers the oldest request it holds, after streaming
        /// `data` data frames for it.
        Answer {
            data: u8,
        },
        Event,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..3, any::<u32>()).prop_map(|(c, seq)| Step::Send { c, seq }),
            (0u8..3).prop_map(|data| Step::Answer { data }),
            Just(Step::Event),
        ]
    }

    proptest! {
        /// Three clients, whose sequence numbers may collide, against a
        /// console answering in order: each client gets exactly the answers
        /// and data to its own requests, under its own numbers, in the
        /// order it asked, and every event; nobody gets anyone else's.
        #[test]
        fn every_client_gets_its_own_answers_and_every_event(
            steps in proptest::collection::vec(step(), 0..200)
        ) {
            let mut r = Router::new();
            let mut console = std::collections::VecDeque::new();
            // What each client asked, in order, and what it got.
            let mut asked: [Vec<u32>; 3] = Default::default();
            let mut got: [Vec<ToHost>; 3] = Default::default();
            let mut events = 0;
            let deliver = |r: &mut Router, got: &mut [Vec<ToHost>; 3], m: ToHost| {
                if let Some((dest, m)) = r.from_console(m) {
                    match dest {
                        Dest::Client(c) => got[c as usize].push(m),
                        Dest::All => got.iter_mut().for_each(|g| g.push(m.clone())),
                    }
                }
            };
            for c in 0..3u64 {
                r.attach(c);
                let FromClient::Console(h) = r.from_client(c, hello(0), Instant::now()) else { panic!() };
                deliver(&mut r, &mut got, ToHost::Reply { seq: h.seq, reply: ControlReply::Welcome { version: 1 } });
                got[c as usize].clear();
            }
            for s in steps {
                match s {
                    Step::Send { c, seq } => {
                        let m = ask(seq, ControlRequest::Domain { index: c.into() });
                        match r.from_client(c.into(), m, Instant::now()) {
                            FromClient::Console(to) => {
                                console.push_back(to.seq);
                                asked[usize::from(c)].push(seq);
                            }
                            other => prop_assert!(false, "{other:?}"),
                        }
                    }
                    Step::Answer { data } => {
                        let Some(seq) = console.pop_front() else { continue };
                        for offset in 0..u32::from(data) {
                            deliver(&mut r, &mut got, ToHost::Data {
                                seq,
                                offset,
                                bytes: ipc_schema::ipc::BoundedVec(heapless::Vec::new()),
                            });
                        }
                        deliver(&mut r, &mut got, ToHost::Reply { seq, reply: ControlReply::Done });
                    }
                    Step::Event => {
                        events += 1;
                        deliver(&mut r, &mut got, ToHost::Event(ControlEvent::Missed { count: events }));
                    }
                }
            }
            for c in 0..3 {
                let answered: Vec<u32> = got[c]
                    .iter()
                    .filter_map(|m| match m {
                        ToHost::Reply { seq, .. } => Some(*seq),
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(&answered[..], &asked[c][..answered.len()]);
                let seen_events = got[c].iter().filter(|m| matches!(m, ToHost::Event(_))).count();
                prop_assert_eq!(seen_events as u32, events);
                // Each data frame belongs to the request answered next.
                let mut pending = asked[c].iter();
                let mut current = pending.next();
                for m in &got[c] {
                    match m {
                        ToHost::Data { seq, .. } => prop_assert_eq!(Some(seq), current),
                        ToHost::Reply { seq, .. } => {
                            prop_assert_eq!(Some(seq), current);
                            current = pending.next();
                        }
                        ToHost::Event(_) => {}
                    }
                }
                prop_assert_eq!(r.in_flight(c as u64), asked[c].len() - answered.len());
            }
        }

        /// Clients declaring, taking back and leaving watches of three
        /// domains while violations come and the console answers the
        /// proxy's own requests, against a model: one live watch of a
        /// domain at a time (and none while one is undone); a client that
        /// leaves has exactly its watches undone, each in order (view 0,
        /// its view's events answered in view 0, listen off, view
        /// destroyed; a listener alone's the listen off alone), and each
        /// event of a view being undone answered as it comes; the proxy's
        /// answers reach no client and none is stray.
        #[test]
        fn watches_are_held_one_per_domain_and_undone_exactly_for_who_left(
            steps in proptest::collection::vec(watch_step(), 0..150)
        ) {
            use std::collections::BTreeMap as Map;
            let mut r = Router::new();
            let now = Instant::now();
            // The id each of the three client slots has now.
            let mut ids = [1u64, 2, 3];
            let mut next_id = 4;
            for &c in &ids {
                r.attach(c);
                round(&mut r, c, hello(1), ControlReply::Welcome { version: 1 });
            }
            // The model: live watches (client, view if any, events seen),
            // and those being undone (their views).
            let mut live: Map<u16, (ClientId, Option<u16>, Vec<u32>)> = Map::new();
            let mut closing: Map<u16, Option<u16>> = Map::new();
            // The proxy's requests the console has not answered yet.
            let mut console: VecDeque<FromHost> = VecDeque::new();
            let mut next_event = 1u32;
            let ext = |domain, request| ControlRequest::Altp2m(AltRequest::External { domain, request });
            let switched = |event| ControlRequest::Altp2m(AltRequest::Answer {
                event,
                action: Action::SwitchView(0),
            });
            for s in steps {
                let mut want: Vec<ControlRequest> = Vec::new();
                match s {
                    WatchStep::Set { c, d, view, set } => {
                        let id = ids[usize::from(c)];
                        let free = !closing.contains_key(&d)
                            && live.get(&d).is_none_or(|w| w.0 == id);
                        let reply = local(&mut r, id, at_detach(9, d, view, set), now);
                        if free {
                            prop_assert_eq!(reply, ControlReply::Done);
                            match (set, live.get(&d)) {
                                (false, _) => { live.remove(&d); }
                                (true, Some(w)) if w.1 == view => {}
                                (true, _) => { live.insert(d, (id, view, Vec::new())); }
                            }
                        } else {
                            prop_assert_eq!(
                                reply,
                                ControlReply::Error(ControlError::WatchedByAnotherClient { domain: d })
                            );
                        }
                    }
                    WatchStep::Leave { c } => {
                        let id = ids[usize::from(c)];
                        r.leave(id, now);
                        let left: Vec<u16> = live.iter().filter(|(_, w)| w.0 == id).map(|(&d, _)| d).collect();
                        for d in left {
                            let (_, view, events) = live.remove(&d).unwrap();
                            let off = ControlRequest::Altp2m(AltRequest::Listen { domain: d, on: false });
                            closing.insert(d, view);
                            // A listener alone: the listen off, no more.
                            let Some(view) = view else {
                                want.push(off);
                                continue;
                            };
                            want.push(ext(d, Request::ViewSwitchAll { view: 0 }));
                            let kept = events.len().saturating_sub(WATCH_EVENTS);
                            want.extend(events[kept..].iter().map(|&e| switched(e)));
                            want.push(off);
                            want.push(ext(d, Request::ViewDestroy { view }));
                        }
                        ids[usize::from(c)] = next_id;
                        r.attach(next_id);
                        round(&mut r, next_id, hello(1), ControlReply::Welcome { version: 1 });
                        next_id += 1;
                    }
                    WatchStep::Event { d, view } => {
                        let e = next_event;
                        next_event += 1;
                        let routed = r.from_console(violation(e, d, view));
                        prop_assert_eq!(routed.map(|(d, _)| d), Some(Dest::All));
                        if closing.get(&d) == Some(&Some(view)) {
                            want.push(switched(e));
                        } else if let Some(w) = live.get_mut(&d).filter(|w| w.1 == Some(view)) {
                            w.2.push(e);
                        }
                    }
                    WatchStep::Answer { n } => {
                        for _ in 0..n {
                            let Some(m) = console.pop_front() else { break };
                            let answer = ToHost::Reply { seq: m.seq, reply: ControlReply::Done };
                            prop_assert_eq!(r.from_console(answer), None);
                            // The undoing's last step: a view's
                            // destruction, or a listener's listen off.
                            match m.request {
                                ControlRequest::Altp2m(AltRequest::External {
                                    domain,
                                    request: Request::ViewDestroy { .. },
                                }) => {
                                    closing.remove(&domain);
                                }
                                ControlRequest::Altp2m(AltRequest::Listen { domain, on: false })
                                    if closing.get(&domain) == Some(&None) =>
                                {
                                    closing.remove(&domain);
                                }
                                _ => {}
                            }
                        }
                    }
                }
                let out = r.outbox();
                let got: Vec<ControlRequest> = out.iter().map(|m| m.request.clone()).collect();
                prop_assert_eq!(got, want);
                console.extend(out);
                prop_assert_eq!(r.stray, 0);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum WatchStep {
        Set {
            c: u8,
            d: u16,
            view: Option<u16>,
            set: bool,
        },
        Leave {
            c: u8,
        },
        Event {
            d: u16,
            view: u16,
        },
        Answer {
            n: u8,
        },
    }

    fn watch_step() -> impl Strategy<Value = WatchStep> {
        prop_oneof![
            // (View 0: a listener alone, without a view of its own.)
            3 => (0u8..3, 0u16..3, 0u16..3, any::<bool>())
                .prop_map(|(c, d, view, set)| WatchStep::Set { c, d, view: (view > 0).then_some(view), set }),
            1 => (0u8..3).prop_map(|c| WatchStep::Leave { c }),
            4 => (0u16..3, 0u16..3).prop_map(|(d, view)| WatchStep::Event { d, view }),
            2 => (0u8..8).prop_map(|n| WatchStep::Answer { n }),
        ]
    }
}
