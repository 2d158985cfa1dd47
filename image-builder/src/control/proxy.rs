//! The control proxy: while a machine runs, the runner holds the host side of
//! its COM2 and offers it on a unix socket, so that other processes
//! (`cargo hv ctl`, `cargo hv swap`, a test, any [`Client`](super::Client))
//! can talk to the console.
//!
//! - **Several clients at once** where the machine's COM2 is Parallax's
//!   console ([`ProxySocket::check_frames`], the default), up to
//!   [`MAX_CLIENTS`]: each request goes to the console under a sequence
//!   number of the proxy's, each answer back to its client only under the
//!   client's own, and every event to every client; `Hello`, swaps and a
//!   quota of requests waiting are kept per client ([`super::router`]).
//!   A client's frames go to the console whole and intact only
//!   ([`ClientFrames`]: valid COBS, the checksum right, not too long):
//!   garbage is dropped here, at the host's speed, rather than sent down
//!   the serial line to be dropped there, and the client is told as the
//!   console would tell it. A client that leaves in the middle of a frame
//!   has sent the console nothing of it. The console's frames are read
//!   whole whether or not a client is attached (the router waits for
//!   answers to requests of its own), and a client receives each that ends
//!   after it attached.
//! - **One client at a time** where COM2 is something else (a test
//!   guest's own protocol): its bytes are forwarded as they come, not
//!   decoded, so there is nothing to tell two clients' answers apart by.
//!   While that client stays, further connections are told so in one line
//!   of text and closed.
//! - **Two sources.** Where the emulator's debug port (I/O port 0xE9) is
//!   read too ([`ProxySocket::serve_with_debug`]), the console is asked to
//!   send its frames there (no baud rate: Bochs sends COM2 at 115200 baud
//!   in its own time) once its frames show it is there, and whole frames
//!   from either source reach the client, never one inside another.
//! - **COM2 is always drained.** Console output that arrives while no client
//!   is attached is discarded (counted in [`ProxyStats`]): the emulator must
//!   never block on a full socket (Bochs writes COM2 with blocking `send`).
//!   Each client's frames are written by a thread of its own from a queue
//!   of at most 4 MiB, so that a client that does not read holds up nobody
//!   else; it is detached when its queue is full or it has not read for
//!   [`CLIENT_WRITE_TIMEOUT`].

use super::router::{Dest, FromClient, MAX_IN_FLIGHT, Router};
use ipc_schema::control::{ControlError, ControlReply, FromHost, MAX_WIRE_FRAME, ToHost};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the proxy waits on a client that does not read before it
/// detaches it.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times (10 ms apart) a new connection waits for the attached
/// client to leave before it is turned away (one client at a time: COM2
/// not Parallax's console).
const BUSY_GRACE_POLLS: u32 = 20;

/// The most clients attached at once to Parallax's console.
pub const MAX_CLIENTS: usize = 16;

/// The longest path a unix socket can have on Linux (`sun_path`, NUL
/// included).
pub const SUN_PATH: usize = 108;

/// The console side of the proxy: the host end of COM2.
pub trait ConsoleStream: Read + Write + Send + Sized + 'static {
    /// A second handle on the same stream.
    fn try_clone(&self) -> io::Result<Self>;
    /// Ends both directions, waking any thread blocked on it.
    fn shutdown(&self);
}

impl ConsoleStream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl ConsoleStream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// Whether something answers on the control socket at `path` (a live run).
pub fn socket_in_use(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// The proxy's socket, bound but not yet serving (bind it before starting
/// the emulator, so that a bad path fails the run before it boots).
#[derive(Debug)]
pub struct ProxySocket {
    /// `None` once serving (the [`Proxy`] owns it then).
    listener: Option<UnixListener>,
    path: PathBuf,
    /// A client's frames are checked ([`ClientFrames`]): the machine's
    /// COM2 speaks Parallax's control protocol.
    check: bool,
}

impl Drop for ProxySocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ProxySocket {
    /// Binds `path`: replaces a stale socket left by an ended run, refuses one
    /// a live run still serves.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let len = path.as_os_str().len();
        anyhow::ensure!(
            len < SUN_PATH,
            "the control socket path {} is {len} bytes long; unix sockets take at most {} (choose a shorter path)",
            path.display(),
            SUN_PATH - 1
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        if path.exists() {
            anyhow::ensure!(
                !socket_in_use(path),
                "{} is the control socket of another run that is still going; stop it or choose another socket",
                path.display()
            );
            std::fs::remove_file(path).map_err(|e| {
                anyhow::anyhow!("removing the stale control socket {}: {e}", path.display())
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            anyhow::anyhow!("cannot create the control socket {}: {e}", path.display())
        })?;
        // Only this user may drive the machine.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        Ok(Self {
            listener: Some(listener),
            path: path.to_owned(),
            check: true,
        })
    }

    /// Whether a client's frames are checked before the console gets them
    /// ([`ClientFrames`]; the default): off for a machine whose COM2 is
    /// not Parallax's console (a test guest's own protocol), whose bytes
    /// then go on as they come.
    pub fn check_frames(mut self, on: bool) -> Self {
        self.check = on;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts serving: forwards between `console` and its clients.
    /// With no console (the emulator never connected its COM2), clients are
    /// told so and closed.
    pub fn serve<C: ConsoleStream>(self, console: Option<C>) -> io::Result<Proxy> {
        self.serve_with_debug(console, None)
    }

    /// [`serve`](Self::serve), and the console's frames that come on the
    /// emulator's debug port (`debug`: Bochs's standard output with
    /// `port_e9_hack`) go to the client as well, whole frames from either
    /// source in the order they end. Once a COM2 frame decodes as the
    /// console's, the console is asked to answer there
    /// (`ControlRequest::UseDebugPort`), and again when a client attaches.
    pub fn serve_with_debug<C: ConsoleStream>(
        mut self,
        console: Option<C>,
        debug: Option<Box<dyn Read + Send>>,
    ) -> io::Result<Proxy> {
        let Some(listener) = self.listener.take() else {
            return Err(io::Error::other("the control socket is already served"));
        };
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            check: self.check,
            ..Shared::default()
        });
        let mut threads = Vec::new();
        let mut closer: Option<C> = None;
        let console_writer: ConsoleWriter = Arc::new(Mutex::new(None));
        if let Some(c) = console {
            *console_writer.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Box::new(c.try_clone()?) as Box<dyn Write + Send>);
            closer = Some(c.try_clone()?);
            {
                let mut st = shared.lock();
                st.console = ConsoleLink::Connected;
                st.debug_port = debug.is_some();
                let (out, frames) = std::sync::mpsc::channel();
                st.own = Some(out);
                let w = console_writer.clone();
                // Not joined: it ends with the proxy's state (its sender).
                std::thread::Builder::new()
                    .name("ctl-own".into())
                    .spawn(move || own_writer(frames, &w))?;
            }
            let s = shared.clone();
            let w = console_writer.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("ctl-console".into())
                    .spawn(move || source_to_client(c, &s, Some(&w)))?,
            );
        }
        if let Some(d) = debug {
            // Drained even with no console (an emulator must never block
            // on its output). Not joined: it ends when the emulator closes
            // its output.
            let s = shared.clone();
            std::thread::Builder::new()
                .name("ctl-debug-port".into())
                .spawn(move || source_to_client(d, &s, None))?;
        }
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("ctl-accept".into())
                .spawn(move || accept_clients(&listener, &s, &console_writer))?,
        );
        Ok(Proxy {
            path: std::mem::take(&mut self.path),
            shared,
            threads,
            closer: closer.map(|c| Box::new(move || c.shutdown()) as Box<dyn Fn() + Send>),
        })
    }
}

/// What the proxy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes from clients to the console.
    pub to_console: u64,
    /// Bytes from the console to clients.
    pub to_clients: u64,
    /// Console bytes that arrived with no client attached (or, where frames
    /// are not checked, before the next frame boundary after one attached),
    /// discarded.
    pub discarded: u64,
    /// Clients attached.
    pub clients: u64,
    /// Connections turned away (a client was attached where only one may
    /// be, or [`MAX_CLIENTS`] were).
    pub turned_away: u64,
    /// Client bytes dropped before the console: frames that were not
    /// intact or were too long ([`ClientFrames`]).
    pub garbage: u64,
    /// Answers of the console's for clients that had left.
    pub stray: u64,
    /// Watches undone for clients that left without undoing them
    /// (`ControlRequest::AtDetach`).
    pub undone: u64,
    /// Requests sent again behind a `Hello` of the proxy's: the console
    /// had forgotten the host's (it restarted).
    pub resent: u64,
}

/// A running proxy; stops (and removes its socket) when stopped or dropped.
pub struct Proxy {
    path: PathBuf,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    closer: Option<Box<dyn Fn() + Send>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The socket clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it did so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats()
    }

    /// Stops serving: closes the console stream and the clients, removes the
    /// socket. Call it after the emulator has exited: Bochs dies of SIGPIPE
    /// if it writes COM2 after its peer closed.
    pub fn stop(mut self) -> ProxyStats {
        self.halt();
        self.shared.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(close) = self.closer.take() {
            close();
        }
        detach_all(&mut self.shared.lock());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.halt();
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
    to_console: AtomicU64,
    to_clients: AtomicU64,
    discarded: AtomicU64,
    clients: AtomicU64,
    turned_away: AtomicU64,
    garbage: AtomicU64,
    /// [`ProxySocket::check_frames`].
    check: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked holding the lock left consistent data (every
        // update is a plain store): carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> ProxyStats {
        let (stray, undone, resent) = {
            let st = self.lock();
            (st.router.stray, st.router.undone, st.router.resent)
        };
        ProxyStats {
            stray,
            undone,
            resent,
            to_console: self.to_console.load(Ordering::Relaxed),
            to_clients: self.to_clients.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            clients: self.clients.load(Ordering::Relaxed),
            turned_away: self.turned_away.load(Ordering::Relaxed),
            garbage: self.garbage.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum ConsoleLink {
    /// The emulator never connected.
    #[default]
    Absent,
    Connected,
    /// The emulator closed it (the machine stopped).
    Closed,
}

#[derive(Default)]
struct State {
    /// One at most where frames are not checked.
    clients: Vec<Attached>,
    router: Router,
    next_id: u64,
    console: ConsoleLink,
    /// The emulator's debug port is read too: ask the console for it.
    debug_port: bool,
    /// A frame that decodes as the console's came on COM2: a Parallax
    /// console is there (only it is asked to use the debug port, never
    /// whatever else the machine runs).
    console_speaks: bool,
    /// The router's own requests ([`Router::outbox`]) for the console,
    /// written by a thread of their own ([`own_writer`]): never by the
    /// thread that drains COM2, which must not wait on the console's input.
    own: Option<Sender<Vec<u8>>>,
}

struct Attached {
    id: u64,
    /// For ending the connection.
    stream: UnixStream,
    /// Frames for the client, written by its own thread ([`client_writer`]),
    /// so that a client that does not read holds up no other.
    out: Sender<Vec<u8>>,
    /// The bytes queued in `out` and not yet written.
    queued: Arc<AtomicUsize>,
    /// The console was asked to answer on the debug port since this client
    /// attached.
    asked: bool,
}

/// Ends client `id`'s attachment (it left, or it does not read).
fn detach(st: &mut State, id: u64) {
    if let Some(i) = st.clients.iter().position(|c| c.id == id) {
        let c = st.clients.remove(i);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    st.router.leave(id, Instant::now());
    send_own(st);
}

/// Queues the router's own requests (a watch undone for a client that
/// left, a request sent again) for the console ([`own_writer`]).
fn send_own(st: &mut State) {
    let own = st.router.outbox();
    let Some(out) = st.own.as_ref() else {
        return;
    };
    for m in own {
        if let Ok(bytes) = parallax_client::frames::encode(&m) {
            let _ = out.send(bytes);
        }
    }
}

/// Writes the router's own requests to the console, whole frames under the
/// writer's lock, until the proxy ends or the console is gone.
fn own_writer(frames: Receiver<Vec<u8>>, writer: &ConsoleWriter) {
    for f in frames {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(console) = w.as_mut() else {
            return;
        };
        if console
            .write_all(&f)
            .and_then(|()| console.flush())
            .is_err()
        {
            return;
        }
    }
}

fn detach_all(st: &mut State) {
    for id in st.clients.iter().map(|c| c.id).collect::<Vec<_>>() {
        detach(st, id);
    }
}

/// The most bytes queued for one client (a client that lets more pile up
/// does not read, and is detached): far more than a burst of events.
const CLIENT_QUEUE: usize = 4 << 20;

/// Queues `bytes` (whole frames) for client `id`, detaching it if it is
/// gone or does not read. Whether it took them.
fn send_to(st: &mut State, id: u64, bytes: &[u8]) -> bool {
    let Some(c) = st.clients.iter_mut().find(|c| c.id == id) else {
        return false;
    };
    if c.queued.load(Ordering::Relaxed) + bytes.len() <= CLIENT_QUEUE
        && c.out.send(bytes.to_vec()).is_ok()
    {
        c.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        return true;
    }
    detach(st, id);
    false
}

/// Writes a client's frames as they are queued, until it is detached (its
/// queue's sender dropped) or does not read for [`CLIENT_WRITE_TIMEOUT`]
/// (then its connection is shut down, and its reader detaches it).
fn client_writer(mut stream: UnixStream, frames: Receiver<Vec<u8>>, queued: &AtomicUsize) {
    for f in frames {
        if stream.write_all(&f).is_err() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        queued.fetch_sub(f.len(), Ordering::Relaxed);
    }
}

/// A whole frame from the console (terminator included), decoded as the
/// console's (`m`, where it is) to whom it goes: the client its answer is
/// for under its own number, or every client. Where frames are not
/// checked, the one client gets it as it came. The bytes delivered and
/// discarded.
fn deliver(st: &mut State, check: bool, frame: &[u8], m: Option<ToHost>) -> (u64, u64) {
    let len = frame.len() as u64;
    let (to, bytes) = match m {
        Some(m) if check => {
            let routed = st.router.from_console(m);
            // (What the router answers itself: a watch being undone.)
            send_own(st);
            match routed {
                None => return (0, len),
                Some((Dest::All, _)) => (None, frame.to_vec()),
                Some((Dest::Client(id), m)) => match parallax_client::frames::encode(&m) {
                    Ok(bytes) => (Some(id), bytes),
                    Err(_) => return (0, len),
                },
            }
        }
        // Not a frame of the console's: everyone sees it (and reports it).
        _ => (None, frame.to_vec()),
    };
    let ids: Vec<u64> = match to {
        Some(id) => vec![id],
        None => st.clients.iter().map(|c| c.id).collect(),
    };
    let took = ids.iter().filter(|&&id| send_to(st, id, &bytes)).count() as u64;
    if took == 0 {
        (0, len)
    } else {
        (took * bytes.len() as u64, 0)
    }
}

/// The longest frame a source may build up before it is dropped (the
/// console's are far shorter; anything longer is not a frame).
const MAX_PENDING: usize = 64 * 1024;

/// One source of console frames (COM2, or the debug port) to the clients:
/// whole frames only, so that two sources never interleave inside a frame;
/// a frame goes on if a client was attached when its first byte came (the
/// same client, where frames are not checked; a client attached in the
/// middle of one gets the next), and [`deliver`] says to whom; discards
/// when nobody is attached; never blocks long on a client. COM2 comes with
/// the console's writer (`com2`): when its frames show a Parallax console
/// and the debug port is read, the console is asked to use it (again for
/// each client that attaches); when COM2 closes, the machine has stopped:
/// the clients are told by being closed.
fn source_to_client(mut source: impl Read, shared: &Shared, com2: Option<&ConsoleWriter>) {
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    // Whose the frame being read is (`None`: dropped), once its first byte
    // came: the client attached then, or 0 for any (frames checked).
    let mut owner: Option<Option<u64>> = None;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let (mut forwarded, mut discarded) = (0u64, 0u64);
        let mut st = shared.lock();
        // Checked frames are read whole whoever is attached: the router
        // waits for answers of its own too (a watch undone for a client
        // that left, perhaps the last).
        let current = if shared.check {
            Some(0)
        } else {
            st.clients.first().map(|c| c.id)
        };
        for part in buf[..n].split_inclusive(|&b| b == 0) {
            let whose = *owner.get_or_insert(current);
            let ends = part.last() == Some(&0);
            if whose.is_some() && whose == current && pending.len() + part.len() <= MAX_PENDING {
                pending.extend_from_slice(part);
            } else {
                discarded += (pending.len() + part.len()) as u64;
                pending.clear();
                owner = Some(None);
            }
            if !ends {
                continue;
            }
            owner = None;
            if pending.is_empty() {
                continue;
            }
            // Decoded where it is routed, or where it may show a console to
            // ask for the debug port; otherwise it goes on as it came.
            let ask = com2.is_some() && st.debug_port && st.clients.iter().any(|c| !c.asked);
            let m = (shared.check || ask)
                .then(|| console_message(&pending))
                .flatten();
            if ask && m.is_some() {
                st.console_speaks = true;
                // Asked before a client has this frame (the answer it
                // waits for), so that its next request cannot come first.
                if let Some(w) = com2 {
                    st.clients.iter_mut().for_each(|c| c.asked = true);
                    ask_for_the_debug_port(w);
                }
            }
            let (f, d) = deliver(&mut st, shared.check, &pending, m);
            forwarded += f;
            discarded += d;
            pending.clear();
        }
        drop(st);
        shared.to_clients.fetch_add(forwarded, Ordering::Relaxed);
        shared.discarded.fetch_add(discarded, Ordering::Relaxed);
    }
    if com2.is_none() {
        return;
    }
    let mut st = shared.lock();
    st.console = ConsoleLink::Closed;
    detach_all(&mut st);
}

type ConsoleWriter = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

fn accept_clients(listener: &UnixListener, shared: &Arc<Shared>, writer: &ConsoleWriter) {
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                readers.retain(|t| !t.is_finished());
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if let Some(t) = attach(stream, shared, writer) {
            readers.push(t);
        }
    }
    // A client attached while the proxy was stopping: end it too, so that
    // its reader returns.
    detach_all(&mut shared.lock());
    for t in readers {
        let _ = t.join();
    }
}

/// Attaches a new connection, or tells it why not and closes it.
fn attach(
    stream: UnixStream,
    shared: &Arc<Shared>,
    writer: &ConsoleWriter,
) -> Option<JoinHandle<()>> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    // One client at a time: one that has just closed may not be detached
    // yet: give it a moment, so that commands run one after the other are
    // all served.
    for _ in 0..BUSY_GRACE_POLLS {
        if shared.check || shared.lock().clients.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut st = shared.lock();
    let busy = if shared.check {
        st.clients.len() >= MAX_CLIENTS
    } else {
        !st.clients.is_empty()
    };
    let full = format!(
        "parallax control proxy: {MAX_CLIENTS} clients are attached, the most it serves at once; try again when one leaves\n"
    );
    let refusal = match st.console {
        ConsoleLink::Absent => Some(
            "parallax control proxy: the emulator did not connect its second serial port (COM2); no console to talk to\n",
        ),
        ConsoleLink::Closed => {
            Some("parallax control proxy: the machine has stopped (its COM2 is closed)\n")
        }
        ConsoleLink::Connected if busy && shared.check => Some(full.as_str()),
        ConsoleLink::Connected if busy => Some(
            "parallax control proxy: another client is attached; one client at a time (this machine's COM2 is not Parallax's console), try again when it leaves\n",
        ),
        ConsoleLink::Connected => None,
    };
    if let Some(why) = refusal {
        drop(st);
        shared.turned_away.fetch_add(1, Ordering::Relaxed);
        let mut s = stream;
        let _ = s.write_all(why.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Both);
        return None;
    }
    let (Ok(write_half), Ok(read_half)) = (stream.try_clone(), stream.try_clone()) else {
        return None;
    };
    let (out, frames) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let written = queued.clone();
    if std::thread::Builder::new()
        .name("ctl-client-out".into())
        .spawn(move || client_writer(write_half, frames, &written))
        .is_err()
    {
        return None;
    }
    st.next_id += 1;
    let id = st.next_id;
    // Asked before the client's first byte where a console is known to be
    // there; otherwise once its first frame shows one.
    let ask = st.debug_port && st.console_speaks;
    st.clients.push(Attached {
        id,
        stream,
        out,
        queued,
        asked: ask,
    });
    st.router.attach(id);
    drop(st);
    if ask {
        ask_for_the_debug_port(writer);
    }
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let w = writer.clone();
    std::thread::Builder::new()
        .name("ctl-client".into())
        .spawn(move || client_to_console(read_half, id, &s, &w))
        .ok()
}

/// `frame` (terminator included) decoded as a message of the console's.
fn console_message(frame: &[u8]) -> Option<ToHost> {
    let mut bytes = frame[..frame.len() - 1].to_vec();
    if bytes.is_empty() {
        return None;
    }
    ipc_schema::frame::decode::<ToHost>(&mut bytes).ok()
}

/// Asks the console to answer on the debug port: a zero first ends
/// whatever a client that left may have left unfinished. Never answered; a
/// console restarted since (on COM2 again) is asked when the next client
/// attaches.
fn ask_for_the_debug_port(writer: &ConsoleWriter) {
    let request = ipc_schema::control::FromHost {
        seq: 0,
        request: ipc_schema::control::ControlRequest::UseDebugPort,
    };
    let mut buf = [0u8; 64];
    let Ok(frame) = ipc_schema::frame::encode(&request, &mut buf) else {
        return;
    };
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(console) = w.as_mut() {
        let _ = console
            .write_all(&[0])
            .and_then(|()| console.write_all(frame))
            .and_then(|()| console.flush());
    }
}

/// A client's bytes sorted as they come: whole frames that are intact
/// (valid COBS, their checksum right: [`ipc_schema::frame::intact`]) and no
/// longer than the console takes ([`MAX_WIRE_FRAME`]) go on, and so do
/// zero bytes alone (a client ending whatever came before); anything else
/// is garbage, dropped here at the host's speed instead of being sent down
/// the serial line, where a flood of it (115200 baud) would hold the
/// console, and every client after the one that sent it, for as long as it
/// takes to arrive. The client is told as the console would tell it: a
/// `Garbage` event with the bytes of each frame that is not intact, a
/// `TooLong` refusal for each frame longer than the console takes. An
/// unfinished frame never goes on: a client that leaves in the middle of
/// one costs nothing.
#[derive(Debug, Default)]
pub struct ClientFrames {
    pending: Vec<u8>,
    /// The frame being read is already too long: its bytes are dropped to
    /// its end.
    too_long: bool,
}

/// What [`ClientFrames::take`] dropped: the byte counts of the frames that
/// were not intact, and how many frames were too long.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub garbage: Vec<u32>,
    pub too_long: u32,
    /// Every byte dropped (terminators excluded).
    pub bytes: u64,
}

impl Dropped {
    fn any(&self) -> bool {
        self.bytes > 0 || self.too_long > 0
    }
}

impl ClientFrames {
    /// Sorts `bytes`, appending what goes to the console to `out`.
    pub fn take(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Dropped {
        let mut dropped = Dropped::default();
        for part in bytes.split_inclusive(|&b| b == 0) {
            let ends = part.last() == Some(&0);
            let body = &part[..part.len() - usize::from(ends)];
            if !self.too_long && self.pending.len() + body.len() > MAX_WIRE_FRAME {
                self.too_long = true;
                dropped.bytes += self.pending.len() as u64;
                self.pending.clear();
            }
            if self.too_long {
                dropped.bytes += body.len() as u64;
            } else {
                self.pending.extend_from_slice(body);
            }
            if !ends {
                continue;
            }
            if std::mem::take(&mut self.too_long) {
                dropped.too_long += 1;
                continue;
            }
            let frame = std::mem::take(&mut self.pending);
            let mut copy = frame.clone();
            if frame.is_empty() || ipc_schema::frame::intact(&mut copy).is_ok() {
                out.extend_from_slice(&frame);
                out.push(0);
            } else {
                dropped.bytes += frame.len() as u64;
                dropped
                    .garbage
                    .push(u32::try_from(frame.len()).unwrap_or(u32::MAX));
            }
        }
        dropped
    }
}

/// The console's words for what [`ClientFrames`] dropped from one read, as
/// frames for the client: one `TooLong` refusal if a frame was too long,
/// one `Garbage` event with the bytes of the frames that were not intact.
/// (One of each at most: a client flooding the socket must not be answered
/// with a flood it does not read, and be detached for it.)
fn dropped_frames(d: &Dropped) -> Vec<u8> {
    use ipc_schema::control::{ControlError, ControlEvent, ControlReply, ToHost};
    let refusal = (d.too_long > 0).then_some(ToHost::Reply {
        seq: 0,
        reply: ControlReply::Error(ControlError::TooLong),
    });
    let bytes = d.garbage.iter().map(|&b| u64::from(b)).sum::<u64>();
    let event = (!d.garbage.is_empty()).then_some(ToHost::Event(ControlEvent::Garbage {
        bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
    }));
    let mut out = Vec::new();
    for m in refusal.into_iter().chain(event) {
        let mut buf = [0u8; 64];
        if let Ok(f) = ipc_schema::frame::encode(&m, &mut buf) {
            out.extend_from_slice(f);
        }
    }
    out
}

/// Client to console, until the client leaves (its unfinished frame, if
/// any, never sent); then detaches it.
fn client_to_console(mut client: UnixStream, id: u64, shared: &Shared, writer: &ConsoleWriter) {
    let mut buf = [0u8; 4096];
    let mut frames = ClientFrames::default();
    let mut out = Vec::new();
    let _ = client.set_read_timeout(None);
    'reading: loop {
        let n = match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        out.clear();
        if !shared.check {
            // As they come; an unfinished frame is ended when the client
            // leaves (below).
            out.extend_from_slice(&buf[..n]);
            if !to_console(shared, writer, &out) {
                break;
            }
            continue;
        }
        let dropped = frames.take(&buf[..n], &mut out);
        // (Lone zeros end nothing here: the console gets whole frames only.)
        for frame in out.split(|&b| b == 0).filter(|f| !f.is_empty()) {
            if !room_for(shared, id) {
                break 'reading;
            }
            let mut bytes = frame.to_vec();
            let request = ipc_schema::frame::decode::<FromHost>(&mut bytes);
            let routed = match request {
                Ok(m) => shared.lock().router.from_client(id, m, Instant::now()),
                // Intact but not a request: what the console would say.
                Err(_) => FromClient::Answer(ToHost::Reply {
                    seq: 0,
                    reply: ControlReply::Error(ControlError::Malformed),
                }),
            };
            match routed {
                FromClient::Console(m) => {
                    let Ok(bytes) = parallax_client::frames::encode(&m) else {
                        continue;
                    };
                    if !to_console(shared, writer, &bytes) {
                        break 'reading;
                    }
                }
                FromClient::Answer(m) => {
                    if let Ok(bytes) = parallax_client::frames::encode(&m)
                        && !send_to(&mut shared.lock(), id, &bytes)
                    {
                        break 'reading;
                    }
                }
                FromClient::Dropped => {}
            }
        }
        if dropped.any() {
            let told = dropped_frames(&dropped);
            shared.garbage.fetch_add(dropped.bytes, Ordering::Relaxed);
            // (Whole frames, under the lock the console's frames are
            // written under: never inside one of them.)
            if !send_to(&mut shared.lock(), id, &told) {
                break;
            }
        }
    }
    if !shared.check && out.last().is_some_and(|&b| b != 0) {
        // End the frame it left unfinished: the machine drops it. (The
        // proxy's byte, not the client's: not counted.)
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(console) = w.as_mut() {
            let _ = console.write_all(&[0]).and_then(|()| console.flush());
        }
    }
    detach(&mut shared.lock(), id);
}

/// Writes `bytes` to the console; false if it is gone.
fn to_console(shared: &Shared, writer: &ConsoleWriter, bytes: &[u8]) -> bool {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let Some(console) = w.as_mut() else {
        return false;
    };
    if console
        .write_all(bytes)
        .and_then(|()| console.flush())
        .is_err()
    {
        return false;
    }
    shared
        .to_console
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    true
}

/// Waits until client `id` has fewer than [`MAX_IN_FLIGHT`] requests
/// waiting for the console (its quota: no more of it is read meanwhile);
/// false if it was detached, or the proxy or the machine stopped.
fn room_for(shared: &Shared, id: u64) -> bool {
    loop {
        {
            let st = shared.lock();
            if shared.stop.load(Ordering::SeqCst)
                || st.console != ConsoleLink::Connected
                || !st.clients.iter().any(|c| c.id == id)
            {
                return false;
            }
            if st.router.in_flight(id) < MAX_IN_FLIGHT {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::control::{ControlRequest, FromHost};
    use proptest::prelude::*;

    fn frame(seq: u32) -> Vec<u8> {
        parallax_client::frames::encode(&FromHost {
            seq,
            request: ControlRequest::Service { index: 1 },
        })
        .unwrap()
    }

    /// Feeds `bytes` in pieces cut at `cuts`: what goes on, and what was
    /// dropped.
    fn feed(bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Dropped) {
        let mut f = ClientFrames::default();
        let (mut out, mut all) = (Vec::new(), Dropped::default());
        let mut at = 0;
        for &c in cuts.iter().chain([&bytes.len()]) {
            let c = c.clamp(at, bytes.len());
            let d = f.take(&bytes[at..c], &mut out);
            all.garbage.extend(d.garbage);
            all.too_long += d.too_long;
            all.bytes += d.bytes;
            at = c;
        }
        (out, all)
    }

    #[test]
    fn garbage_and_oversize_frames_are_dropped_and_counted_and_the_rest_goes_on() {
        let mut input = vec![0];
        input.extend(frame(1));
        input.extend(b"line noise\0");
        input.extend(vec![0x41; MAX_WIRE_FRAME + 1]);
        input.push(0);
        input.extend(frame(2));
        // A frame that is valid COBS but garbled (its checksum wrong).
        let mut garbled = frame(3);
        garbled[2] ^= 0x10;
        input.extend(&garbled);
        input.extend(&frame(4)[..5]);
        let (out, d) = feed(&input, &[3, 17, 500, 501]);
        let mut want = vec![0];
        want.extend(frame(1));
        want.extend(frame(2));
        assert_eq!(out, want, "intact frames and a lone zero, nothing else");
        assert_eq!(d.garbage, vec![10, garbled.len() as u32 - 1]);
        assert_eq!(d.too_long, 1);
        assert_eq!(
            d.bytes,
            10 + MAX_WIRE_FRAME as u64 + 1 + garbled.len() as u64 - 1,
            "the unfinished frame is held, not counted"
        );
        // What the client is told: one refusal and one event.
        let told = dropped_frames(&d);
        let mut frames = told.split(|&b| b == 0).filter(|f| !f.is_empty());
        let mut next = || {
            let mut f = frames.next().unwrap().to_vec();
            ipc_schema::frame::decode::<ipc_schema::control::ToHost>(&mut f).unwrap()
        };
        assert!(matches!(
            next(),
            ipc_schema::control::ToHost::Reply {
                seq: 0,
                reply: ipc_schema::control::ControlReply::Error(
                    ipc_schema::control::ControlError::TooLong
                )
            }
        ));
        assert_eq!(
            next(),
            ipc_schema::control::ToHost::Event(ipc_schema::control::ControlEvent::Garbage {
                bytes: 10 + garbled.len() as u32 - 1
            })
        );
    }

    proptest! {
        /// Intact frames go on exactly as they came, however the stream is
        /// cut, and garbage between them costs only itself.
        #[test]
        fn intact_frames_survive_any_split_and_garbage(
            seqs in proptest::collection::vec(any::<u32>(), 1..12),
            garbage in proptest::collection::vec(proptest::collection::vec(1u8.., 0..40), 12),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let (mut input, mut want) = (Vec::new(), Vec::new());
            for (s, g) in seqs.iter().zip(&garbage) {
                if !g.is_empty() {
                    input.extend(g);
                    input.push(0);
                }
                input.extend(frame(*s));
                want.extend(frame(*s));
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (out, d) = feed(&input, &cuts);
            // (Random bytes pass as a frame only with a right checksum.)
            if d.garbage.len() == garbage.iter().take(seqs.len()).filter(|g| !g.is_empty()).count() {
                prop_assert_eq!(out, want);
            }
            prop_assert_eq!(d.too_long, 0);
        }
    }
}
