//! The client of Parallax's control channel: talk to a running system
//! through its console service, from any Rust program.
//!
//! The console speaks [`ipc_schema::control`] on the machine's second serial
//! port (COM2). `cargo hv run` holds that port's host side and offers it on a
//! unix socket (`target/hv/work/ctl.sock` by default; the run prints it);
//! `cargo hv ctl` and `cargo hv swap` are [`Client`]s of that socket, and any
//! program can be one by linking this crate. It depends on `ipc-schema` (the
//! protocol's types) and nothing of the image builder. The protocol itself
//! is described in `docs/control.md`.
//!
//! # Example
//!
//! Connect, list the domains, create a view in one, and watch the events
//! that come:
//!
//! ```no_run
//! use parallax_client::altp2m::{AltRequest, Reply, Request};
//! use parallax_client::{Client, ClientError, describe_event, domains_table};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), ClientError> {
//! let mut console = Client::connect("target/hv/work/ctl.sock".as_ref())?
//!     .with_timeout(Duration::from_secs(5)); // each answer waits at most this
//! let domains = console.domains()?; // the first request says hello by itself
//! print!("{}", domains_table(&domains));
//!
//! // A view of the first domain as an external agent (docs/altp2m.md).
//! let domain = domains[0].id;
//! let Reply::View(view) = console.view_request(domain, Request::ViewCreate { default_access: None })?
//! else {
//!     unreachable!("ViewCreate answers a view")
//! };
//! println!("domain {domain}: view {view} created");
//! console.altp2m_done(AltRequest::Listen { domain, on: true })?;
//!
//! // Events until none comes for ten seconds (or use `on_event`, a callback).
//! for event in console.events(Duration::from_secs(10)) {
//!     println!("{}", describe_event(&event?));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`Client::watch_page`] does the whole external-agent dance for one page
//! (view, access, listen, switch, answer each violation, undo);
//! `examples/watch.rs` is `cargo hv ctl altp2m watch` built on it.
//!
//! # Wire
//!
//! Each message is one frame ([`frames`]): `COBS(postcard(value) ++ crc16_le) 00`.
//! The host sends [`FromHost`]` { seq, request }`; the console answers each
//! with [`ToHost::Reply`]` { seq, reply }` (same `seq`), before which a
//! streamed answer ([`ControlRequest::ReadMemory`]) comes as
//! [`ToHost::Data`] frames, and may send [`ToHost::Event`] at any time
//! (the timeout then counts from the last frame of the answer). The first request of a session is
//! [`ControlRequest::Hello`] with [`CONTROL`]'s key; the console answers
//! `Welcome { version }`, or `Error(WrongKey { console, host })` when the two
//! sides were built against different versions of the protocol.
//!
//! # The client
//!
//! - A [`Client`] works over any [`Transport`]: a byte stream that can bound
//!   how long a read or write waits ([`UnixStream`], [`TcpStream`], or any
//!   `Read + Write` wrapped in [`Untimed`]).
//! - Calls block until their answer comes, at most [`Client::with_timeout`]
//!   (default [`DEFAULT_TIMEOUT`]); the error names the request: `the console
//!   did not answer request #7 (Service 0) within 5 s`. Refusals and
//!   protocol errors are [`ClientError`]s that say what was refused and why.
//! - Requests carry increasing sequence numbers (starting at a random
//!   non-zero value, so that a reply meant for an earlier client of the same
//!   console is not taken for one of ours); a reply is matched by `seq`, and
//!   replies with other numbers are counted and dropped.
//! - Events that arrive while a request waits are queued for
//!   [`Client::next_event`] and [`Client::events`] (an iterator), or handed
//!   to the callback set by [`Client::on_event`].
//! - Frames that do not decode are dropped and counted
//!   ([`Client::stats`]), never a panic.
//! - [`Client::swap`] sends `SwapBegin`, the ELF in chunks of at most
//!   [`SWAP_CHUNK`] bytes, then `SwapCommit`; an ELF larger than
//!   [`MAX_SWAP`] is refused before anything is sent.
//! - [`altp2m`]: views, access, modes, listening to violations and answering
//!   them as an external agent.
//! - [`logdirty`]: dirty-page logs of a domain's RAM (start, read and clear,
//!   peek, status, stop), kept by the logdirty service.
//!
//! A [`Client`] waits for each answer before sending the next request. The
//! proxy of `cargo hv run` serves several connections at once (each gets
//! its own answers and every event; docs/control.md), and turns away, with
//! a message the error quotes, one more than it serves.

pub mod altp2m;
pub mod console;
pub mod frames;
pub mod introspect;
pub mod logdirty;
pub mod sharing;

use frames::{DropCounts, FrameReader};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The protocol's types, all of them (names, events, access bits...): a
/// program needs no dependency on `ipc-schema` of its own.
pub use ipc_schema;
pub use ipc_schema::control::{
    CONTROL, ControlError, ControlEvent, ControlReply, ControlRequest, FromHost, MAX_SWAP,
    SWAP_CHUNK, ToHost, Watch,
};
pub use ipc_schema::supervisor::{DomainInfo, Refusal, ServiceInfo};
pub use ipc_schema::syscall::DomainOp;

/// How long a request waits for its answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// `SwapCommit` starts the new instance and moves the state: it may wait
/// this many times the usual timeout.
const COMMIT_FACTOR: u32 = 6;

/// Events kept for [`Client::next_event`]; beyond this the oldest are
/// dropped (and counted).
const EVENT_QUEUE: usize = 4096;

/// A byte stream a [`Client`] can talk over: reads and writes whose waiting
/// can be bounded.
pub trait Transport: Read + Write {
    /// Bounds how long each following read or write may wait (`None`: as
    /// long as it takes).
    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

impl Transport for TcpStream {
    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

/// Any `Read + Write` as a [`Transport`] that cannot bound its waits: a read
/// blocks until bytes come, so timeouts are checked only between reads. For
/// streams that are known to answer (a pipe to a simulator, a test double).
#[derive(Debug)]
pub struct Untimed<S>(pub S);

impl<S: Read> Read for Untimed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Untimed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<S: Read + Write> Transport for Untimed<S> {
    fn set_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A request as errors name it: its sequence number and what it asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLabel {
    pub seq: u32,
    /// [`describe_request`] of it, e.g. `Service 3`.
    pub what: String,
}

impl fmt::Display for RequestLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request #{} ({})", self.seq, self.what)
    }
}

/// What went wrong talking to the console.
#[derive(Debug)]
pub enum ClientError {
    /// The control socket could not be reached.
    Connect { path: PathBuf, source: io::Error },
    /// Reading or writing the stream failed.
    Io {
        request: Option<RequestLabel>,
        source: io::Error,
    },
    /// No answer came in time.
    Timeout {
        request: RequestLabel,
        waited: Duration,
        /// What else was seen meanwhile (dropped frames, console errors), or
        /// empty.
        note: String,
    },
    /// The stream ended.
    Closed {
        request: Option<RequestLabel>,
        /// Text the other end sent that is not a frame (a proxy saying why
        /// it closed), if any.
        said: Option<String>,
    },
    /// The console refused the request at the protocol level.
    Console {
        request: RequestLabel,
        error: ControlError,
    },
    /// The supervisor refused the request.
    Refused {
        request: RequestLabel,
        refusal: Refusal,
    },
    /// An answer that does not answer the request.
    Unexpected {
        request: RequestLabel,
        reply: Box<ControlReply>,
    },
    /// The logdirty service refused the request (`asked`): why.
    Logdirty {
        request: RequestLabel,
        asked: ipc_schema::logdirty::LdRequest,
        error: ipc_schema::logdirty::LdError,
    },
    /// The introspect service refused the request: why.
    Introspect {
        request: RequestLabel,
        error: ipc_schema::introspect::IntroError,
    },
    /// The sharing service refused the request: why.
    Sharing {
        request: RequestLabel,
        error: ipc_schema::sharing::ShError,
    },
    /// Refused here, before anything was sent.
    Invalid(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { path, source } => match source.kind() {
                io::ErrorKind::NotFound => write!(
                    f,
                    "no control socket at {}: is `cargo hv run` running? (it prints the socket's path when it starts)",
                    path.display()
                ),
                io::ErrorKind::ConnectionRefused => write!(
                    f,
                    "{} is a control socket that nobody serves any more (the run that made it has ended)",
                    path.display()
                ),
                _ => write!(
                    f,
                    "cannot connect to the control socket {}: {source}",
                    path.display()
                ),
            },
            ClientError::Io {
                request: Some(r),
                source,
            } => write!(f, "{r} failed: {source}"),
            ClientError::Io {
                request: None,
                source,
            } => write!(f, "the control stream failed: {source}"),
            ClientError::Timeout {
                request,
                waited,
                note,
            } => {
                write!(
                    f,
                    "the console did not answer {request} within {}",
                    seconds(*waited)
                )?;
                if !note.is_empty() {
                    write!(f, " ({note})")?;
                }
                Ok(())
            }
            ClientError::Closed { request, said } => {
                match request {
                    Some(r) => write!(
                        f,
                        "the control connection closed while waiting for the answer to {r}"
                    )?,
                    None => write!(f, "the control connection closed")?,
                }
                if let Some(s) = said {
                    write!(f, "; the other end said: {s}")?;
                }
                Ok(())
            }
            ClientError::Console { request, error } => {
                // (What only the proxy of `cargo hv run` says.)
                let who = match error {
                    ControlError::SwapByAnotherClient
                    | ControlError::WatchedByAnotherClient { .. }
                    | ControlError::TooManyWatches { .. } => "the control proxy",
                    _ => "the console",
                };
                write!(f, "{who} rejected {request}: {}", describe_error(error))
            }
            ClientError::Refused { request, refusal } => write!(
                f,
                "the supervisor refused {request}: {}",
                describe_refusal(refusal)
            ),
            ClientError::Unexpected { request, reply } => write!(
                f,
                "the console answered {request} with {}, which does not answer it",
                describe_reply(reply)
            ),
            ClientError::Logdirty { asked, error, .. } => {
                write!(f, "logdirty: {}", logdirty::describe_refusal(error, asked))
            }
            ClientError::Introspect { request, error } => {
                write!(f, "introspect refused {request}: {error}")
            }
            // (Which domain is not there: the request names them.)
            ClientError::Sharing {
                request,
                error: error @ ipc_schema::sharing::ShError::NoSuchDomain,
            } => write!(f, "sharing: {} ({request})", sharing::describe_error(error)),
            ClientError::Sharing { error, .. } => {
                write!(f, "sharing: {}", sharing::describe_error(error))
            }
            ClientError::Invalid(why) => f.write_str(why),
        }
    }
}

/// The messages already include the underlying I/O error's text, so no
/// `source()` is given (error chains would repeat it).
impl std::error::Error for ClientError {}

impl ClientError {
    /// Whether the request went unanswered (the stream failed or ended, or
    /// no answer came in time): it may or may not have been done.
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. } | ClientError::Timeout { .. } | ClientError::Closed { .. }
        )
    }
}

/// `5 s`, `0.25 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// What a client has seen besides its answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Frames from the console that did not decode.
    pub dropped: DropCounts,
    /// Replies whose sequence number matched no waiting request (answers to
    /// requests that timed out, or to another client).
    pub stray_replies: u64,
    /// `Error` replies with sequence number 0: the console could not decode
    /// something it received.
    pub console_errors: u64,
    /// Events received.
    pub events: u64,
    /// Events dropped because nobody took them from a full queue.
    pub events_lost: u64,
}

type EventHandler = Box<dyn FnMut(&ControlEvent) + Send>;

/// Takes a streamed answer's bytes: (offset, bytes).
type DataSink<'a> = dyn FnMut(u32, &[u8]) + 'a;

/// A session with the console over a byte stream. See the [module
/// documentation](self).
pub struct Client<S> {
    stream: S,
    reader: FrameReader<ToHost>,
    incoming: Vec<ToHost>,
    replies: VecDeque<(u32, ControlReply)>,
    /// [`ToHost::Data`] frames (`seq`, offset, bytes) not yet taken.
    data: VecDeque<(u32, u32, Vec<u8>)>,
    events: VecDeque<ControlEvent>,
    on_event: Option<EventHandler>,
    next_seq: u32,
    timeout: Duration,
    version: Option<u32>,
    stray_replies: u64,
    console_errors: u64,
    last_console_error: Option<ControlError>,
    events_seen: u64,
    events_lost: u64,
    buf: Box<[u8]>,
}

impl<S> fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("next_seq", &self.next_seq)
            .field("timeout", &self.timeout)
            .field("version", &self.version)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<S> Client<S> {
    /// What the client has seen besides its answers.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            dropped: self.reader.dropped(),
            stray_replies: self.stray_replies,
            console_errors: self.console_errors,
            events: self.events_seen,
            events_lost: self.events_lost,
        }
    }

    /// The protocol version the console announced, once `Hello` was answered.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl Client<UnixStream> {
    /// Connects to a control socket (the one `cargo hv run` offers).
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        UnixStream::connect(path).map(Client::new).map_err(|source| {
            // (A file that is not a socket at all refuses the connection
            // too: say what it is instead.)
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(path).map(|m| m.file_type()) {
                Ok(t) if source.kind() == io::ErrorKind::ConnectionRefused && !t.is_socket() => {
                    let what = if t.is_dir() { "a directory" } else { "a file" };
                    ClientError::Invalid(format!(
                        "{} is {what}, not a control socket: give the path `cargo hv run` printed when it started",
                        path.display()
                    ))
                }
                _ => ClientError::Connect {
                    path: path.to_owned(),
                    source,
                },
            }
        })
    }
}

impl<S: Transport> Client<S> {
    /// A client over `stream`; nothing is sent yet.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            reader: FrameReader::new(),
            incoming: Vec::new(),
            replies: VecDeque::new(),
            data: VecDeque::new(),
            events: VecDeque::new(),
            on_event: None,
            next_seq: first_seq(),
            timeout: DEFAULT_TIMEOUT,
            version: None,
            stray_replies: 0,
            console_errors: 0,
            last_console_error: None,
            events_seen: 0,
            events_lost: 0,
            buf: vec![0u8; 4096].into_boxed_slice(),
        }
    }

    /// How long each request waits for its answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Changes how long each request waits for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The sequence number of the next request (0 is never used: the
    /// console answers undecodable frames with `seq` 0).
    pub fn with_first_seq(mut self, seq: u32) -> Self {
        self.next_seq = seq.max(1);
        self
    }

    /// Hands events to `handler` as they arrive (while any request or
    /// [`Client::next_event`] waits) instead of queueing them.
    pub fn on_event(&mut self, handler: impl FnMut(&ControlEvent) + Send + 'static) {
        self.on_event = Some(Box::new(handler));
    }

    /// Opens the session: `Hello` with this build's key of the protocol.
    /// Returns the console's protocol version.
    pub fn hello(&mut self) -> Result<u32, ClientError> {
        let (label, reply) = self.call_labelled(ControlRequest::Hello {
            key: CONTROL.key.to_bytes(),
        })?;
        match reply {
            ControlReply::Welcome { version } => {
                self.version = Some(version);
                Ok(version)
            }
            other => Err(unwanted(label, other)),
        }
    }

    /// Sends one request and returns the console's answer as it is (refusals
    /// and errors included). Does not say hello first.
    pub fn call(&mut self, request: ControlRequest) -> Result<ControlReply, ClientError> {
        self.call_labelled(request).map(|(_, r)| r)
    }

    /// The `index`-th service (0-based), `None` past the last.
    pub fn service(&mut self, index: u16) -> Result<Option<ServiceInfo>, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Service { index })? {
            (_, ControlReply::Service(s)) => Ok(s),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// Every service, asked one by one until the console says there are no
    /// more.
    pub fn services(&mut self) -> Result<Vec<ServiceInfo>, ClientError> {
        every("services", |i| self.service(i))
    }

    /// The `index`-th guest domain (0-based), `None` past the last.
    pub fn domain(&mut self, index: u16) -> Result<Option<DomainInfo>, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Domain { index })? {
            (_, ControlReply::Domain(d)) => Ok(d),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// Every guest domain.
    pub fn domains(&mut self) -> Result<Vec<DomainInfo>, ClientError> {
        every("domains", |i| self.domain(i))
    }

    /// The id of the domain `domain` names: an id (decimal, or hex with
    /// `0x`) as it is, without asking; else the name of a domain the
    /// console lists.
    pub fn domain_id(&mut self, domain: &str) -> Result<u16, ClientError> {
        if domain.starts_with(|c: char| c.is_ascii_digit()) {
            return logdirty::parse_number(domain)
                .ok()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| {
                    ClientError::Invalid(format!(
                        "domain {domain:?} is neither an id (0 to 65535) nor a name"
                    ))
                });
        }
        let domains = self.domains()?;
        // (The list keeps destroyed domains, whose ids may be another's
        // now: a name is a domain there, one only.)
        let destroyed = ipc_schema::syscall::DomainState::Destroyed as u8;
        let named: Vec<&DomainInfo> = domains
            .iter()
            .filter(|d| ipc_schema::supervisor::name_str(&d.name) == domain)
            .collect();
        let there: Vec<u16> = named
            .iter()
            .filter(|d| d.state != destroyed)
            .map(|d| d.id)
            .collect();
        match (there.as_slice(), named.first()) {
            ([id], _) => return Ok(*id),
            ([], Some(d)) => {
                return Err(ClientError::Invalid(format!(
                    "the domain named {domain:?} (id {}) was destroyed",
                    d.id
                )));
            }
            ([], None) => {}
            (ids, _) => {
                let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
                return Err(ClientError::Invalid(format!(
                    "domains {} are all named {domain:?}: say which by its id",
                    ids.join(", ")
                )));
            }
        }
        let known: Vec<String> = domains
            .iter()
            .map(|d| format!("{} {}", d.id, ipc_schema::supervisor::name_str(&d.name)))
            .collect();
        Err(ClientError::Invalid(if known.is_empty() {
            format!("no domain is named {domain:?} (the console lists no domains)")
        } else {
            format!(
                "no domain is named {domain:?} (the domains: {})",
                known.join(", ")
            )
        }))
    }

    /// Starts, pauses, unpauses or destroys domain `id`.
    pub fn domain_control(&mut self, id: u16, op: DomainOp) -> Result<(), ClientError> {
        self.ensure_hello()?;
        self.expect_done(ControlRequest::DomainControl { id, op })
    }

    /// VM fork of paused domain `parent`: the child's id. `name` empty:
    /// `<parent>-fork`; longer than a domain name is refused. Reset it with
    /// [`Self::domain_control`] and `DomainOp::Reset`.
    pub fn fork(&mut self, parent: u16, name: &str) -> Result<u16, ClientError> {
        if name.len() > ipc_schema::supervisor::NAME || name.contains('\0') {
            return Err(ClientError::Invalid(format!(
                "the fork's name {name:?} is not a domain name (at most {} bytes, no NUL)",
                ipc_schema::supervisor::NAME
            )));
        }
        self.ensure_hello()?;
        let name = ipc_schema::supervisor::name(name);
        match self.call_labelled(ControlRequest::Fork { parent, name })? {
            (_, ControlReply::Forked { id }) => Ok(id),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// `count` shadow pages for domain `id`, mapped right past its RAM and
    /// outside the memory map its guest was given (change_gfn targets):
    /// the first one's gfn.
    pub fn shadow_frames(&mut self, id: u16, count: u16) -> Result<u64, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::ShadowFrames { id, count })? {
            (_, ControlReply::Shadow { gfn }) => Ok(gfn),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// Makes service `name` fault (to test its supervision).
    pub fn inject_fault(&mut self, name: &str) -> Result<(), ClientError> {
        let name = service_name(name)?;
        self.ensure_hello()?;
        self.expect_done(ControlRequest::InjectFault { name })
    }

    /// Replaces the running service `name` by the ELF `elf`; returns the new
    /// instance's generation.
    pub fn swap(&mut self, name: &str, elf: &[u8]) -> Result<u32, ClientError> {
        self.swap_with_progress(name, elf, |_, _| {})
    }

    /// [`Client::swap`], calling `progress(bytes_sent, total)` after each
    /// chunk.
    pub fn swap_with_progress(
        &mut self,
        name: &str,
        elf: &[u8],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<u32, ClientError> {
        let wire_name = service_name(name)?;
        check_swap_size(name, elf.len())?;
        self.ensure_hello()?;
        self.expect_done(ControlRequest::SwapBegin {
            name: wire_name,
            len: elf.len() as u32,
        })?;
        let mut offset = 0usize;
        for chunk in elf.chunks(SWAP_CHUNK) {
            let bytes = heapless::Vec::from_slice(chunk).map_err(|_| {
                ClientError::Invalid(format!("a swap chunk of {} bytes", chunk.len()))
            })?;
            self.expect_done(ControlRequest::SwapChunk {
                offset: offset as u32,
                bytes: ipc_schema::ipc::BoundedVec(bytes),
            })?;
            offset += chunk.len();
            progress(offset, elf.len());
        }
        let (label, reply) =
            self.call_with(ControlRequest::SwapCommit, self.timeout * COMMIT_FACTOR)?;
        match reply {
            ControlReply::Swapped { generation } => Ok(generation),
            other => Err(unwanted(label, other)),
        }
    }

    /// The next event: a queued one, else the first to arrive within
    /// `timeout`; `None` if none came. With a handler set by
    /// [`Client::on_event`] events go to the handler, and this only waits.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<ControlEvent>, ClientError> {
        let until = Instant::now() + timeout;
        loop {
            self.drain_stray_replies();
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            self.fill(until, None)?;
        }
    }

    /// The events as they come, as an iterator: each item is
    /// [`Client::next_event`] with `timeout`, and the iteration ends when no
    /// event came within `timeout`, or after the first error (which it
    /// yields). With a handler set by [`Client::on_event`] events go to the
    /// handler, and this ends after the first `timeout` it waits.
    pub fn events(&mut self, timeout: Duration) -> Events<'_, S> {
        Events {
            client: self,
            timeout,
            done: false,
        }
    }

    fn ensure_hello(&mut self) -> Result<(), ClientError> {
        if self.version.is_none() {
            self.hello()?;
        }
        Ok(())
    }

    fn expect_done(&mut self, request: ControlRequest) -> Result<(), ClientError> {
        match self.call_labelled(request)? {
            (_, ControlReply::Done) => Ok(()),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    fn call_labelled(
        &mut self,
        request: ControlRequest,
    ) -> Result<(RequestLabel, ControlReply), ClientError> {
        self.call_with(request, self.timeout)
    }

    fn call_with(
        &mut self,
        request: ControlRequest,
        timeout: Duration,
    ) -> Result<(RequestLabel, ControlReply), ClientError> {
        self.call_streamed(request, timeout, None)
    }

    /// Sends `request` and waits for its reply, handing the [`ToHost::Data`]
    /// frames that come for it before the reply to `sink` (offset, bytes).
    /// `timeout` is how long it waits for the next frame, not for the
    /// whole answer.
    fn call_streamed(
        &mut self,
        request: ControlRequest,
        timeout: Duration,
        mut sink: Option<&mut DataSink<'_>>,
    ) -> Result<(RequestLabel, ControlReply), ClientError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let label = RequestLabel {
            seq,
            what: describe_request(&request),
        };
        let bytes = frames::encode(&FromHost { seq, request })
            .map_err(|e| ClientError::Invalid(format!("{label} does not fit in a frame: {e:?}")))?;
        // Answers to earlier requests that are still on their way are stray.
        self.drain_stray_replies();
        let dropped_before = self.reader.dropped().frames();
        let errors_before = self.console_errors;
        let sent = self
            .stream
            .set_timeout(Some(timeout.max(Duration::from_millis(1))))
            .and_then(|()| self.stream.write_all(&bytes))
            .and_then(|()| self.stream.flush());
        if let Err(source) = sent {
            if matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                // The other end hung up; it may have said why first.
                return Err(self.closed_while_sending(label));
            }
            return Err(ClientError::Io {
                request: Some(label),
                source,
            });
        }
        let mut until = Instant::now() + timeout;
        loop {
            while let Some((s, offset, bytes)) = self.data.pop_front() {
                match sink.as_mut() {
                    Some(sink) if s == seq => {
                        sink(offset, &bytes);
                        until = Instant::now() + timeout;
                    }
                    _ => self.stray_replies += 1,
                }
            }
            while let Some((s, reply)) = self.replies.pop_front() {
                if s == seq {
                    return Ok((label, reply));
                }
                self.note_stray(s, reply);
            }
            if Instant::now() >= until {
                let mut notes = Vec::new();
                let dropped = self.reader.dropped().frames() - dropped_before;
                if dropped > 0 {
                    notes.push(format!(
                        "{dropped} frame(s) that did not decode arrived meanwhile"
                    ));
                }
                if self.console_errors > errors_before
                    && let Some(e) = self.last_console_error
                {
                    notes.push(format!("the console reported: {}", describe_error(&e)));
                }
                return Err(ClientError::Timeout {
                    request: label,
                    waited: timeout,
                    note: notes.join("; "),
                });
            }
            self.fill(until, Some(&label))?;
        }
    }

    fn closed(&self, waiting: Option<&RequestLabel>) -> ClientError {
        ClientError::Closed {
            request: waiting.cloned(),
            said: self.reader.stray_text(),
        }
    }

    /// The error for a stream that closed under a write, with what the
    /// other end said before (read for a moment).
    fn closed_while_sending(&mut self, label: RequestLabel) -> ClientError {
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            match self.fill(until, None) {
                Ok(()) => {}
                Err(_) => break,
            }
        }
        ClientError::Closed {
            request: Some(label),
            said: self.reader.stray_text(),
        }
    }

    fn drain_stray_replies(&mut self) {
        while let Some((s, reply)) = self.replies.pop_front() {
            self.note_stray(s, reply);
        }
        self.stray_replies += self.data.len() as u64;
        self.data.clear();
    }

    fn note_stray(&mut self, seq: u32, reply: ControlReply) {
        match reply {
            ControlReply::Error(e) if seq == 0 => {
                self.console_errors += 1;
                self.last_console_error = Some(e);
            }
            _ => self.stray_replies += 1,
        }
    }

    /// Reads what comes until `until` (at least one read), and sorts the
    /// frames it completes.
    fn fill(&mut self, until: Instant, waiting: Option<&RequestLabel>) -> Result<(), ClientError> {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let io_err = |source| ClientError::Io {
            request: waiting.cloned(),
            source,
        };
        self.stream.set_timeout(Some(left)).map_err(io_err)?;
        let n = match self.stream.read(&mut self.buf) {
            // The peer closed; a reset means it closed with our request unread.
            Ok(0) => return Err(self.closed(waiting)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(self.closed(waiting));
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(io_err(e)),
        };
        self.reader.push(&self.buf[..n], &mut self.incoming);
        for frame in std::mem::take(&mut self.incoming) {
            match frame {
                ToHost::Reply { seq, reply } => self.replies.push_back((seq, reply)),
                ToHost::Data { seq, offset, bytes } => {
                    self.data.push_back((seq, offset, bytes.0.to_vec()))
                }
                ToHost::Event(e) => {
                    self.events_seen += 1;
                    match &mut self.on_event {
                        Some(handler) => handler(&e),
                        None => {
                            if self.events.len() >= EVENT_QUEUE {
                                self.events.pop_front();
                                self.events_lost += 1;
                            }
                            self.events.push_back(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The events of a [`Client`] as they come: see [`Client::events`].
#[derive(Debug)]
pub struct Events<'a, S> {
    client: &'a mut Client<S>,
    timeout: Duration,
    done: bool,
}

impl<S: Transport> Iterator for Events<'_, S> {
    type Item = Result<ControlEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.client.next_event(self.timeout).transpose();
        self.done = !matches!(next, Some(Ok(_)));
        next
    }
}

impl<S: Transport> std::iter::FusedIterator for Events<'_, S> {}

/// A random non-zero first sequence number.
fn first_seq() -> u32 {
    use std::hash::BuildHasher;
    let r = std::hash::RandomState::new().hash_one(std::process::id());
    // Leave room before wrapping; never 0.
    ((r as u32) & 0x3fff_ffff).max(1)
}

/// The error for an answer that is not the expected one: refusals and
/// protocol errors by name, anything else as unexpected.
fn unwanted(request: RequestLabel, reply: ControlReply) -> ClientError {
    match reply {
        ControlReply::Refused(refusal) => ClientError::Refused { request, refusal },
        ControlReply::Error(error) => ClientError::Console { request, error },
        reply => ClientError::Unexpected {
            request,
            reply: Box::new(reply),
        },
    }
}

/// A service name as the protocol carries it, refused here if it does not
/// fit (rather than cut).
pub fn service_name(name: &str) -> Result<ipc_schema::supervisor::Name, ClientError> {
    use ipc_schema::supervisor::NAME;
    if name.is_empty() {
        return Err(ClientError::Invalid("the service name is empty".into()));
    }
    if name.len() > NAME {
        return Err(ClientError::Invalid(format!(
            "the service name {name:?} is {} bytes long; the control protocol carries at most {NAME}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(ClientError::Invalid(format!(
            "the service name {name:?} contains a NUL byte"
        )));
    }
    Ok(ipc_schema::supervisor::name(name))
}

/// Refuses a swap the console could not take: empty, or larger than its
/// swap buffer ([`MAX_SWAP`]).
pub fn check_swap_size(name: &str, len: usize) -> Result<(), ClientError> {
    if len == 0 {
        return Err(ClientError::Invalid(format!(
            "the ELF to swap into {name} is empty"
        )));
    }
    if len > MAX_SWAP as usize {
        return Err(ClientError::Invalid(format!(
            "the ELF to swap into {name} is {len} bytes; a swap carries at most {MAX_SWAP} bytes (the console's swap buffer)"
        )));
    }
    Ok(())
}

/// A request in a few words: `Service 3`, `SwapChunk at 1024 (512 bytes)`.
pub fn describe_request(r: &ControlRequest) -> String {
    use ipc_schema::supervisor::name_str;
    match r {
        ControlRequest::Hello { .. } => "Hello".into(),
        ControlRequest::Service { index } => format!("Service {index}"),
        ControlRequest::Domain { index } => format!("Domain {index}"),
        ControlRequest::DomainControl { id, op } => format!("DomainControl {id} {op:?}"),
        ControlRequest::SwapBegin { name, len } => {
            format!("SwapBegin {} ({len} bytes)", name_str(name))
        }
        ControlRequest::SwapChunk { offset, bytes } => {
            format!("SwapChunk at {offset} ({} bytes)", bytes.0.len())
        }
        ControlRequest::SwapCommit => "SwapCommit".into(),
        ControlRequest::InjectFault { name } => format!("InjectFault {}", name_str(name)),
        ControlRequest::Altp2m(q) => format!("Altp2m {}", altp2m::describe_request(q)),
        ControlRequest::Logdirty(q) => format!("Logdirty {}", logdirty::describe_request(q)),
        ControlRequest::Introspect(q) => format!("Introspect {q:?}"),
        ControlRequest::Share(q) => format!("Share {q:?}"),
        ControlRequest::ShadowFrames { id, count } => format!("ShadowFrames {id} ({count})"),
        ControlRequest::Fork { parent, name } => format!("Fork {parent} ({})", name_str(name)),
        ControlRequest::ReadMemory { domain, at, len } => {
            format!("ReadMemory {domain} {at:?} ({len} bytes)")
        }
        ControlRequest::UseDebugPort => "UseDebugPort".into(),
        ControlRequest::ConsoleInput { domain, bytes } => {
            format!("ConsoleInput {domain} ({} bytes)", bytes.0.len())
        }
        ControlRequest::AtDetach { watch, set } => format!(
            "AtDetach: {}, {}",
            match watch.view {
                Some(view) => format!("the watch of domain {} through view {view}", watch.domain),
                None => format!("the listen to domain {}", watch.domain),
            },
            if *set {
                "left to the proxy"
            } else {
                "taken back"
            }
        ),
    }
}

/// A reply in a few words.
pub fn describe_reply(r: &ControlReply) -> String {
    match r {
        ControlReply::Welcome { version } => format!("Welcome (version {version})"),
        ControlReply::Service(Some(s)) => {
            format!("Service ({})", ipc_schema::supervisor::name_str(&s.name))
        }
        ControlReply::Service(None) => "Service (none)".into(),
        ControlReply::Domain(Some(d)) => format!("Domain ({})", d.id),
        ControlReply::Domain(None) => "Domain (none)".into(),
        ControlReply::Done => "Done".into(),
        ControlReply::Swapped { generation } => format!("Swapped (generation {generation})"),
        ControlReply::Refused(r) => format!("Refused ({})", describe_refusal(r)),
        ControlReply::Error(e) => format!("Error ({})", describe_error(e)),
        ControlReply::Altp2m(r) => format!("Altp2m ({})", altp2m::describe_reply(r)),
        ControlReply::Logdirty(r) => format!("Logdirty ({})", logdirty::describe_reply(r)),
        ControlReply::Introspect(r) => format!("Introspect ({})", introspect::describe_reply(r)),
        ControlReply::Share(r) => format!("Share ({r:?})"),
        ControlReply::Shadow { gfn } => format!("Shadow (gfn {gfn:#x})"),
        ControlReply::Forked { id } => format!("Forked (domain {id})"),
        ControlReply::Uart(r) => format!("Uart ({r:?})"),
    }
}

/// What a protocol error means.
pub fn describe_error(e: &ControlError) -> String {
    match e {
        ControlError::Malformed => "a frame did not decode".into(),
        ControlError::TooLong => "a frame was longer than the console accepts".into(),
        ControlError::NotHello => "the first request of a session must be Hello".into(),
        ControlError::WrongKey { console, host } => format!(
            "the console speaks another version of the control protocol (console key {}, this tool's key {})",
            key_hex(console),
            key_hex(host)
        ),
        ControlError::SwapOutOfOrder { expected } => {
            format!("swap bytes out of order (the console expected offset {expected})")
        }
        ControlError::SwapTooLarge { max } => {
            format!("the swap is larger than the console's swap buffer ({max} bytes)")
        }
        ControlError::SupervisorUnavailable => "the supervisor did not answer".into(),
        ControlError::Altp2mUnavailable => {
            "the altp2m service did not answer (or this image has none)".into()
        }
        ControlError::LogdirtyUnavailable => {
            "the logdirty service did not answer (it is down, this image has none, or the console holds no `logdirty` handle)".into()
        }
        ControlError::IntrospectUnavailable => {
            "the introspect service did not answer (it is down, this image has none, or the console holds no `introspect` handle)".into()
        }
        ControlError::SharingUnavailable => {
            "the sharing service did not answer (it is down, this image has none, or the console holds no `sharing` handle)".into()
        }
        ControlError::VmmUnavailable => {
            "the vmm did not take the input (it is down, or the console holds no `uart-input` handle)".into()
        }
        ControlError::SwapByAnotherClient => {
            "another client of this run is sending a swap; the console takes one at a time: try again when it is done".into()
        }
        ControlError::ProxyOnly => {
            "the console does not see connections end: only a control proxy (`cargo hv run`'s socket) can undo a client's watch for it".into()
        }
        ControlError::WatchedByAnotherClient { domain } => format!(
            "another client of this run watches domain {domain}; one watch of a domain at a time: try again when it ends"
        ),
        ControlError::TooManyWatches { max } => {
            format!("this client already has {max} watches, the most the proxy undoes for one client")
        }
    }
}

/// What a refusal means.
pub fn describe_refusal(r: &Refusal) -> String {
    match r {
        Refusal::NoSuchService => "no such service".into(),
        Refusal::NoSuchDomain => "no such domain".into(),
        Refusal::NotElf => "not an ELF file Parallax can load".into(),
        Refusal::MissingInterface { key } => format!(
            "the new ELF does not declare interface {} that the running service serves",
            key_hex(key)
        ),
        Refusal::SwapFailed => "the new instance did not start or refused the state".into(),
        Refusal::Kernel { error } => match ipc_schema::syscall::SysError::from_raw(*error) {
            Some(e @ ipc_schema::syscall::SysError::ForeignMapped) => format!(
                "the kernel refused: {e:?} (the domain is protected and services hold foreign mappings of its memory; `cargo hv ctl domains` counts them)"
            ),
            Some(e) => format!("the kernel refused: {e:?}"),
            None => format!("the kernel refused (error {error})"),
        },
        Refusal::IsCaller => "the service named is the one asking the supervisor (the console): it cannot answer its own lifecycle requests while it waits".into(),
        Refusal::NotAllowed => "the manifest's `introspection` does not give this client that right over the domain".into(),
        Refusal::ShadowQuota { limit } => {
            format!("a domain gets 1 to {limit} shadow pages in all")
        }
        Refusal::NameInUse { id } => format!(
            "domain {id} has that name already (a name names one domain: choose another, or destroy domain {id} first)"
        ),
    }
}

/// An event as a line of text.
pub fn describe_event(e: &ControlEvent) -> String {
    match e {
        ControlEvent::Garbage { bytes } => {
            format!(
                "{bytes} bytes that did not decode as frames were dropped (by the control proxy, or the console)"
            )
        }
        ControlEvent::Missed { count } => {
            format!("{count} event(s) were lost before the console could pass them on")
        }
        ControlEvent::Violation(v) => altp2m::describe_event(v),
        ControlEvent::Supervisor { seq, event } => {
            use ipc_schema::supervisor::{SupervisorEvent as E, name_str};
            let what = match event {
                E::ServiceFaulted { name, generation } => {
                    format!(
                        "service {} (generation {generation}) faulted",
                        name_str(name)
                    )
                }
                E::ServiceRestarted { name, generation } => {
                    format!(
                        "service {} restarted (generation {generation})",
                        name_str(name)
                    )
                }
                E::ServiceHeld { name } => format!("service {} is held", name_str(name)),
                E::ServiceSwapped { name, generation } => {
                    format!(
                        "service {} swapped (generation {generation})",
                        name_str(name)
                    )
                }
                E::TaskEnded { name, code } => {
                    format!("task {} ended with code {code}", name_str(name))
                }
                E::DomainEnded { id, state, status } => format!(
                    "domain {id} ended: {} (status {status})",
                    domain_state(*state)
                ),
                E::DmaFault {
                    segment,
                    source,
                    address,
                    reason,
                    write,
                } => format!(
                    "DMA fault: device {segment:04x}:{:02x}:{:02x}.{} {} at {address:#x} blocked (reason {reason})",
                    source >> 8,
                    (source >> 3) & 31,
                    source & 7,
                    if *write { "write" } else { "read" }
                ),
            };
            format!("#{seq} {what}")
        }
    }
}

/// A key as 16 hex digits.
pub fn key_hex(key: &[u8; 8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A service's state code (`ServiceInfo::state`, a `ProcessState` code).
pub fn service_state(code: u8) -> String {
    use ipc_schema::syscall::ProcessState as P;
    match u64::from(code) {
        c if c == P::Running as u64 => "running".into(),
        c if c == P::Faulted as u64 => "faulted".into(),
        c if c == P::Ended as u64 => "ended".into(),
        c => format!("state {c}"),
    }
}

/// A domain's state code (`DomainInfo::state`, a `DomainState` code).
pub fn domain_state(code: u8) -> String {
    use ipc_schema::syscall::DomainState as D;
    let names = [
        (D::Building, "building"),
        (D::Running, "running"),
        (D::Paused, "paused"),
        (D::Exited, "exited"),
        (D::Crashed, "crashed"),
        (D::Destroyed, "destroyed"),
    ];
    names
        .iter()
        .find(|(d, _)| *d as u64 == u64::from(code))
        .map_or_else(|| format!("state {code}"), |(_, n)| (*n).to_owned())
}

/// The services as a table: name, generation, restarts, state, key.
pub fn services_table(services: &[ServiceInfo]) -> String {
    let rows: Vec<[String; 5]> = services
        .iter()
        .map(|s| {
            [
                ipc_schema::supervisor::name_str(&s.name).to_owned(),
                s.generation.to_string(),
                s.restarts.to_string(),
                service_state(s.state),
                key_hex(&s.key),
            ]
        })
        .collect();
    table(
        ["NAME", "GENERATION", "RESTARTS", "STATE", "SCHEMA KEY"],
        &rows,
    )
}

/// The domains as a table: id, name, state, exit status, memory.
pub fn domains_table(domains: &[DomainInfo]) -> String {
    let rows: Vec<[String; 7]> = domains
        .iter()
        .map(|d| {
            [
                d.id.to_string(),
                ipc_schema::supervisor::name_str(&d.name).to_owned(),
                domain_state(d.state),
                format!("{:#x}", d.exit_status),
                format!("{} MiB", d.memory_mib),
                if d.protected { "yes" } else { "no" }.into(),
                d.foreign_pages.to_string(),
            ]
        })
        .collect();
    table(
        [
            "ID",
            "NAME",
            "STATE",
            "EXIT STATUS",
            "MEMORY",
            "PROTECTED",
            "FOREIGN PAGES",
        ],
        &rows,
    )
}

fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) -> String {
    let mut width = head.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells.zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut head.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// Every item `get(0)`, `get(1)`, ... gives, until the first `None`.
fn every<T>(
    what: &str,
    mut get: impl FnMut(u16) -> Result<Option<T>, ClientError>,
) -> Result<Vec<T>, ClientError> {
    let mut out = Vec::new();
    for index in 0..=u16::MAX {
        match get(index)? {
            Some(item) => out.push(item),
            None => return Ok(out),
        }
    }
    Err(ClientError::Invalid(format!(
        "the console listed 65536 {what} without an end"
    )))
}
