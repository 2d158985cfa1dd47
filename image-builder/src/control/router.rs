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
//!   client has said it.
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

use ipc_schema::control::{ControlError, ControlReply, ControlRequest, FromHost, ToHost};
use std::collections::{BTreeMap, HashMap};
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
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    client: ClientId,
    /// The client's own sequence number.
    seq: u32,
    kind: Kind,
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
    /// Answers for nobody (their client left, or they were forgotten).
    pub stray: u64,
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
            stray: 0,
        }
    }

    /// A client attached.
    pub fn attach(&mut self, client: ClientId) {
        self.clients.insert(client, Greeting::Fresh);
    }

    /// A client left: its waiting requests are forgotten (their answers
    /// will be stray), its swap, if any, is over for the proxy (the
    /// console's half-received one is replaced by the next `SwapBegin`).
    pub fn leave(&mut self, client: ClientId) {
        self.clients.remove(&client);
        self.waiting.retain(|_, w| w.client != client);
        if self.swapping() == Some(client) {
            self.swapper = None;
        }
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
        let seq = self.next;
        // (0 is the console's "unknown" and never one of ours.)
        self.next = self.next.wrapping_add(1).max(1);
        self.waiting.insert(
            seq,
            Waiting {
                client,
                seq: m.seq,
                kind,
            },
        );
        if self.waiting.len() > MAX_WAITING {
            self.waiting.pop_first();
        }
        FromClient::Console(FromHost {
            seq,
            request: m.request,
        })
    }

    /// A frame from the console: who gets it, as they get it; `None` for
    /// an answer whose client has gone (counted in [`Router::stray`]).
    pub fn from_console(&mut self, m: ToHost) -> Option<(Dest, ToHost)> {
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
                let Some(w) = self.waiting.remove(&seq) else {
                    self.stray += 1;
                    return None;
                };
                self.answered(w, &reply);
                Some((Dest::Client(w.client), ToHost::Reply { seq: w.seq, reply }))
            }
        }
    }

    /// What an answer changes for its client.
    fn answered(&mut self, w: Waiting, reply: &ControlReply) {
        let mine = self.swapping() == Some(w.client);
        match w.kind {
            Kind::Hello => {
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
            _ => {}
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
        r.leave(2);
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
        r.leave(1);
        assert_eq!(r.from_console(error(to.seq, ControlError::Malformed)), None);
        assert_eq!(r.stray, 1);
        assert_eq!(r.in_flight(1), 0);
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
    }
}
