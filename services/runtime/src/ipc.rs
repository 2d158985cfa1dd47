//! Typed IPC: calling other services and serving requests.
//!
//! Messages are postcard values of `ipc_schema` types, at most 256 bytes.
//! A [`Client`] binds before its first call (the server answers with its key
//! for the interface; a mismatch is an error naming both keys) and binds
//! again after the server restarts. [`serve`] runs a service's receive loop:
//! it answers binds, the supervisor's lifecycle requests (snapshot and
//! restore for swaps, fault injection), and hands everything else to the
//! service.

use crate::sys::{Ret, call};
use ipc_schema::ipc::{BindReply, BoundedVec, InterfaceId, IpcError, bind_key, bind_message};
use ipc_schema::lifecycle::{CHUNK, LIFECYCLE, LifecycleReply, LifecycleRequest};
use ipc_schema::syscall::{Handle, MAX_MESSAGE, SysError, nr};
use serde::{Deserialize, Serialize};

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum CallError {
    /// The kernel refused the call (no handle, missing right, dead peer...).
    Sys(SysError),
    /// The server answered with an IPC-level error.
    Ipc(IpcError),
    /// The server speaks another version of the interface.
    WrongKey { server: [u8; 8], client: [u8; 8] },
    /// The request did not encode (too large).
    Encode,
    /// The reply did not decode.
    BadReply,
}

/// A message received.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The handle slot it came through.
    pub slot: Handle,
    /// The badge of the caller's handle (0: the kernel).
    pub badge: u64,
    pub token: u64,
    pub bytes: &'a [u8],
}

/// What a receive returned.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    Message(Message<'a>),
    Notified { slot: Handle, bits: u64 },
}

#[inline(always)]
fn event(r: Ret, buf: &[u8]) -> Result<Event<'_>, SysError> {
    let r = r.ok()?;
    if r.rsi == 0 {
        return Ok(Event::Notified {
            slot: r.r10 as Handle,
            bits: r.r8,
        });
    }
    let len = (r.rdi as usize).min(buf.len());
    Ok(Event::Message(Message {
        slot: r.r10 as Handle,
        badge: r.rdx,
        token: r.rsi,
        bytes: &buf[..len],
    }))
}

/// Waits for a message or notification on the handles in `mask`.
pub fn recv(mask: u64, buf: &mut [u8]) -> Result<Event<'_>, SysError> {
    let r = call(nr::RECV, &[mask, buf.as_mut_ptr() as u64, buf.len() as u64]);
    event(r, buf)
}

/// Replies to `token` (0: nobody) and waits for the next message.
#[inline(always)]
pub fn reply_recv<'b>(
    token: u64,
    reply: &[u8],
    mask: u64,
    buf: &'b mut [u8],
) -> Result<Event<'b>, SysError> {
    let r = crate::sys::call6(
        nr::REPLY_RECV,
        [
            token,
            reply.as_ptr() as u64,
            reply.len() as u64,
            mask,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
        ],
    );
    event(r, buf)
}

/// [`reply_recv`], the reply forwarded to handle `forward - 1` where
/// `forward` is not 0 ([`forward_instead`]).
#[inline(always)]
fn reply_recv_to<'b>(
    token: u64,
    reply: &[u8],
    forward: u64,
    mask: u64,
    buf: &'b mut [u8],
) -> Result<Event<'b>, SysError> {
    let r = crate::sys::call6(
        nr::REPLY_RECV,
        [
            token,
            reply.as_ptr() as u64,
            reply.len() as u64 | forward << 32,
            mask,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
        ],
    );
    event(r, buf)
}

/// Replies to `token`.
pub fn reply(token: u64, bytes: &[u8]) -> Result<(), SysError> {
    call(
        nr::REPLY,
        &[token, bytes.as_ptr() as u64, bytes.len() as u64],
    )
    .ok()
    .map(|_| ())
}

/// Calls through `h` with raw bytes; the reply lands in `reply`.
#[inline]
pub fn call_raw(h: Handle, msg: &[u8], reply: &mut [u8]) -> Result<usize, SysError> {
    let r = call(
        nr::CALL,
        &[
            u64::from(h),
            msg.as_ptr() as u64,
            msg.len() as u64,
            reply.as_mut_ptr() as u64,
            reply.len() as u64,
        ],
    );
    r.ok().map(|r| r.rdi as usize)
}

/// Decodes a request: all of `bytes`, or `Malformed`. (Inlined, with the
/// deserializer used directly, so that a large request is decoded where
/// the service uses it rather than moved from frame to frame.)
#[inline(always)]
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, IpcError> {
    let mut de = postcard::Deserializer::from_bytes(bytes);
    match T::deserialize(&mut de) {
        Ok(v) if de.finalize().is_ok_and(|rest| rest.is_empty()) => Ok(v),
        _ => Err(IpcError::Malformed),
    }
}

/// Encodes `Result<T, IpcError>` (a reply) into `out`, returning its length.
pub fn encode_reply<T: Serialize>(reply: &Result<T, IpcError>, out: &mut [u8]) -> usize {
    match postcard::to_slice(reply, out) {
        Ok(b) => b.len(),
        // A reply too long for a message is the service's bug: say so.
        Err(_) => postcard::to_slice(&Result::<(), IpcError>::Err(IpcError::BadReply), out)
            .map_or(0, |b| b.len()),
    }
}

/// A client of one interface through one handle.
pub struct Client {
    handle: Handle,
    id: InterfaceId,
    bound: bool,
    /// The request and its reply, kept (not zeroed call after call) and in
    /// one page.
    io: Buffers,
}

impl Client {
    pub fn new(handle: Handle, id: InterfaceId) -> Self {
        Self {
            handle,
            id,
            bound: false,
            io: Buffers {
                msg: [0; MAX_MESSAGE],
                out: [0; MAX_MESSAGE],
            },
        }
    }

    /// The handle it calls through.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// Checks that the server speaks this interface's version.
    pub fn bind(&mut self) -> Result<(), CallError> {
        let mut buf = [0u8; 32];
        let n =
            call_raw(self.handle, &bind_message(&self.id.key), &mut buf).map_err(CallError::Sys)?;
        match postcard::from_bytes::<BindReply>(&buf[..n]) {
            Ok(BindReply::Bound) => {
                self.bound = true;
                Ok(())
            }
            Ok(BindReply::WrongKey { server, client }) => {
                defmt::error!(
                    "{=str}: server of {=str} speaks schema {=[u8; 8]:02x}, this client {=[u8; 8]:02x}",
                    crate::name(),
                    self.id.name,
                    server,
                    client
                );
                Err(CallError::WrongKey { server, client })
            }
            Err(_) => Err(CallError::BadReply),
        }
    }

    /// Calls with `request`; binds first if needed, and again (once) after
    /// the server restarted.
    #[inline(always)]
    pub fn call<Q: Serialize, R: for<'de> Deserialize<'de>>(
        &mut self,
        request: &Q,
    ) -> Result<R, CallError> {
        let n = self.exchange(request, 2)?;
        self.reply(n)
    }

    /// [`Client::call`] without the second attempt: a server that died
    /// (or restarted) is `Sys(Dead)` at once. For a supervisor calling a
    /// service it supervises: a second attempt would wait for a restart
    /// that only the caller can make.
    pub fn call_once<Q: Serialize, R: for<'de> Deserialize<'de>>(
        &mut self,
        request: &Q,
    ) -> Result<R, CallError> {
        let n = self.exchange(request, 1)?;
        self.reply(n)
    }

    /// The reply of `n` bytes, decoded. (Inlined, as `call` is, so that a
    /// large reply type is decoded where the caller uses it rather than
    /// moved from frame to frame.)
    #[inline(always)]
    fn reply<R: for<'de> Deserialize<'de>>(&self, n: usize) -> Result<R, CallError> {
        let mut de = postcard::Deserializer::from_bytes(&self.io.out[..n]);
        match Result::<R, IpcError>::deserialize(&mut de) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CallError::Ipc(e)),
            Err(_) => Err(CallError::BadReply),
        }
    }

    /// Encodes `request`, binds when needed, calls (`attempts` times at
    /// most while the server restarts): the length of the reply in
    /// `self.io.out`.
    fn exchange<Q: Serialize>(&mut self, request: &Q, attempts: u32) -> Result<usize, CallError> {
        let len = postcard::to_slice(request, &mut self.io.msg)
            .map_err(|_| CallError::Encode)?
            .len();
        self.send(len, attempts)
    }

    /// Calls with a request that `encode` writes into the client's buffer
    /// (returning its length, or `None` where it does not fit), binding
    /// as [`Client::call`] does, and returns the reply's bytes as the
    /// server encoded them (a `Result<_, IpcError>`): for a caller with
    /// its own codec on a hot path (fixed bytes such as
    /// `ipc_schema::altp2m::PING`, the listener's `NextEvent`). The common
    /// case (bound, the server there) is in line.
    #[inline(always)]
    pub fn call_encoded(
        &mut self,
        encode: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Result<&[u8], CallError> {
        let len = encode(&mut self.io.msg)
            .filter(|&n| n <= MAX_MESSAGE)
            .ok_or(CallError::Encode)?;
        let n = if self.bound {
            let Buffers { msg, out } = &mut self.io;
            match call_raw(self.handle, &msg[..len], out) {
                Ok(n) => n.min(out.len()),
                Err(e) => self.failed(e, len)?,
            }
        } else {
            self.send(len, 2)?
        };
        Ok(&self.io.out[..n])
    }

    /// What [`Client::send`] does after its first attempt failed with `e`
    /// (a bound client): once more after binding again if the server
    /// restarted, else the error.
    #[inline(never)]
    fn failed(&mut self, e: SysError, len: usize) -> Result<usize, CallError> {
        if e == SysError::Dead {
            defmt::info!(
                "{=str}: the server of {=str} restarted; binding again",
                crate::name(),
                self.id.name
            );
            self.bound = false;
            return self.send(len, 1);
        }
        Err(CallError::Sys(e))
    }

    /// Sends the `len` bytes in `self.io.msg`, binding when needed
    /// (`attempts` times at most while the server restarts): the length of
    /// the reply in `self.io.out`.
    fn send(&mut self, len: usize, attempts: u32) -> Result<usize, CallError> {
        for attempt in 0..attempts {
            if !self.bound {
                self.bind()?;
            }
            let Buffers { msg, out: reply } = &mut self.io;
            match call_raw(self.handle, &msg[..len], reply) {
                Ok(n) => return Ok(n.min(reply.len())),
                Err(SysError::Dead) if attempt + 1 < attempts => {
                    defmt::info!(
                        "{=str}: the server of {=str} restarted; binding again",
                        crate::name(),
                        self.id.name
                    );
                    self.bound = false;
                }
                Err(e) => {
                    if e == SysError::Dead {
                        self.bound = false;
                    }
                    return Err(CallError::Sys(e));
                }
            }
        }
        Err(CallError::Sys(SysError::Dead))
    }
}

/// A service's side of IPC.
pub trait Service {
    /// What a successor gets on a swap (postcard-encoded, at most `ipc_schema::lifecycle::SNAPSHOT_MAX` bytes).
    type State: Serialize + for<'de> Deserialize<'de>;

    /// The interface served through handle `slot` (checked on bind).
    fn interface(&self, slot: Handle) -> Option<InterfaceId>;

    /// Answers a request (not a bind, not lifecycle): writes the reply into
    /// `reply` and returns its length, or [`DEFER`] to answer later with
    /// [`reply`] and the message's token (the caller waits meanwhile).
    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize;

    /// Bits arrived on a notification in the mask.
    fn notified(&mut self, _slot: Handle, _bits: u64) {}

    /// The kernel refused the forward [`forward_instead`] asked for
    /// (`Busy`: the endpoint's receiver did not wait): the exit `token`
    /// is still the service's, `out[..len]` what was to be forwarded.
    /// Returns as [`Service::handle`] does (by default: held, [`DEFER`]).
    fn forward_refused(&mut self, _token: u64, _out: &mut [u8], _len: usize) -> usize {
        DEFER
    }

    fn snapshot(&self) -> Self::State;
    fn restore(&mut self, state: Self::State);

    /// Encodes the snapshot into `out`: its length, or `None` when it does
    /// not fit. By default [`Service::snapshot`] encoded; a service whose
    /// state is too large to build on its stack encodes it from its own
    /// (the same bytes).
    fn snapshot_into(&self, out: &mut [u8]) -> Option<usize> {
        postcard::to_slice(&self.snapshot(), out)
            .ok()
            .map(|b| b.len())
    }

    /// Takes an encoded snapshot: false when it does not decode. By
    /// default decoded whole and given to [`Service::restore`].
    fn restore_from(&mut self, bytes: &[u8]) -> bool {
        match postcard::from_bytes::<Self::State>(bytes) {
            Ok(state) => {
                self.restore(state);
                true
            }
            Err(_) => false,
        }
    }

    /// The service's version (reported to the supervisor).
    fn version(&self) -> u32 {
        1
    }
}

const SNAPSHOT: usize = ipc_schema::lifecycle::SNAPSHOT_MAX;

/// What [`Service::handle`] returns to answer later.
pub const DEFER: usize = usize::MAX;

/// Set by [`answer_instead`]: the token the answer goes to.
static ANSWER_TO: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Within [`Service::handle`]: the answer it returns goes to the message
/// (or exit) of `token`, one the service deferred before, and the message
/// being handled is deferred. The receive loop then answers and waits in
/// one REPLY_RECV (an exit answered plainly this way is entered at once
/// by the kernel's fast path) where a REPLY then a receive would take two
/// system calls.
pub fn answer_instead(token: u64) {
    ANSWER_TO.store(token, core::sync::atomic::Ordering::Relaxed);
}

/// Set by [`forward_instead`]: the handle the answer is forwarded to.
static FORWARD_TO: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Within [`Service::handle`] of an exit (`token`): its answer bytes are
/// not an answer but a message the exit is forwarded with to the endpoint
/// of `handle` (REPLY_RECV's forward, docs/ipc.md), whose receiver then
/// holds the exit, restricted to a plain answer. If the kernel refuses,
/// [`Service::forward_refused`] is called.
pub fn forward_instead(token: u64, handle: Handle) {
    answer_instead(token);
    FORWARD_TO.store(u64::from(handle) + 1, core::sync::atomic::Ordering::Relaxed);
}

struct Swap {
    buf: [u8; SNAPSHOT],
    len: usize,
    /// Stopped serving for a snapshot (the old side of a swap), or not yet
    /// resumed (the new side).
    quiet: bool,
}

/// A message and its answer, together within one page (512 bytes,
/// 512-aligned): the receive loop's (the kernel translates the page once for
/// both, and reads answers and writes messages there in place) and each
/// client's.
#[repr(C, align(512))]
struct Buffers {
    msg: [u8; MAX_MESSAGE],
    out: [u8; MAX_MESSAGE],
}

const _: () = assert!(core::mem::size_of::<Buffers>() <= 512);

/// Serves the handles in `mask` (and the lifecycle handle) forever.
pub fn serve<S: Service>(svc: &mut S, mask: u64) -> ! {
    let lifecycle = crate::handle("lifecycle");
    let life_bit = lifecycle.map_or(0, |h| 1u64 << h);
    let mut swap = Swap {
        buf: [0; SNAPSHOT],
        len: 0,
        quiet: crate::successor(),
    };
    if swap.quiet {
        defmt::info!(
            "{=str}: successor instance; waiting for the state of its predecessor",
            crate::name()
        );
    }
    let mut io = Buffers {
        msg: [0; MAX_MESSAGE],
        out: [0; MAX_MESSAGE],
    };
    let Buffers { msg: buf, out } = &mut io;
    let mut pending: (u64, usize) = (0, 0);
    loop {
        let current_mask = if swap.quiet {
            life_bit
        } else {
            mask | life_bit
        };
        let (token, len) = pending;
        let forward = match FORWARD_TO.load(core::sync::atomic::Ordering::Relaxed) {
            0 => 0,
            _ => FORWARD_TO.swap(0, core::sync::atomic::Ordering::Relaxed),
        };
        let ev = match reply_recv_to(token, &out[..len], forward, current_mask, buf) {
            Ok(ev) => ev,
            Err(SysError::Busy) if forward != 0 => {
                let n = svc.forward_refused(token, out, len);
                let to = ANSWER_TO.swap(0, core::sync::atomic::Ordering::Relaxed);
                pending = match (n, to) {
                    (DEFER, _) => (0, 0),
                    _ => (to, n),
                };
                continue;
            }
            Err(e) => {
                defmt::error!("{=str}: receive failed: {}", crate::name(), e);
                pending = (0, 0);
                crate::sys::yield_now();
                continue;
            }
        };
        pending = (0, 0);
        match ev {
            Event::Notified { slot, bits } => svc.notified(slot, bits),
            Event::Message(m) => {
                let n = if Some(m.slot) == lifecycle {
                    lifecycle_request(svc, &mut swap, m, out)
                } else if let Some(key) = bind_key(m.bytes) {
                    bind_reply(svc.interface(m.slot), key, out)
                } else {
                    svc.handle(m, out)
                };
                // (A load first: the common case takes no atomic swap.)
                let to = match ANSWER_TO.load(core::sync::atomic::Ordering::Relaxed) {
                    0 => 0,
                    _ => ANSWER_TO.swap(0, core::sync::atomic::Ordering::Relaxed),
                };
                pending = match (n, to) {
                    (DEFER, _) => (0, 0),
                    (_, 0) => (m.token, n),
                    _ => (to, n),
                };
            }
        }
    }
}

fn bind_reply(id: Option<InterfaceId>, client: [u8; 8], out: &mut [u8]) -> usize {
    let server = id.map_or([0; 8], |i| i.key.to_bytes());
    let reply = if server == client {
        BindReply::Bound
    } else {
        BindReply::WrongKey { server, client }
    };
    postcard::to_slice(&reply, out).map_or(0, |b| b.len())
}

fn lifecycle_request<S: Service>(
    svc: &mut S,
    swap: &mut Swap,
    m: Message<'_>,
    out: &mut [u8],
) -> usize {
    if let Some(key) = bind_key(m.bytes) {
        return bind_reply(Some(LIFECYCLE), key, out);
    }
    let reply = match decode::<LifecycleRequest>(m.bytes) {
        Err(e) => Err(e),
        Ok(LifecycleRequest::Identify) => Ok(LifecycleReply::Identity {
            version: svc.version(),
        }),
        Ok(LifecycleRequest::Snapshot { offset }) => {
            if offset == 0 {
                let Some(len) = svc.snapshot_into(&mut swap.buf) else {
                    defmt::error!(
                        "{=str}: its state does not fit a snapshot ({=usize} bytes): no swap; serving on",
                        crate::name(),
                        SNAPSHOT
                    );
                    return encode_reply(&Ok::<_, IpcError>(LifecycleReply::TooLarge), out);
                };
                swap.len = len;
                swap.quiet = true;
                defmt::info!(
                    "{=str}: snapshot of {=usize} bytes for a successor",
                    crate::name(),
                    swap.len
                );
            }
            let start = (offset as usize).min(swap.len);
            let end = (start + CHUNK).min(swap.len);
            let mut bytes = BoundedVec::new();
            let _ = bytes.0.extend_from_slice(&swap.buf[start..end]);
            Ok(LifecycleReply::Chunk {
                total: swap.len as u32,
                bytes,
                more: end < swap.len,
            })
        }
        Ok(LifecycleRequest::Restore {
            offset,
            total,
            bytes,
        }) => {
            let (o, t) = (offset as usize, total as usize);
            if t > SNAPSHOT || o + bytes.0.len() > t {
                Ok(LifecycleReply::RestoreFailed)
            } else {
                swap.buf[o..o + bytes.0.len()].copy_from_slice(&bytes.0);
                swap.len = t;
                Ok(LifecycleReply::Done)
            }
        }
        Ok(LifecycleRequest::Resume) => {
            if swap.quiet && swap.len > 0 {
                if !svc.restore_from(&swap.buf[..swap.len]) {
                    defmt::error!(
                        "{=str}: the predecessor's state does not decode",
                        crate::name()
                    );
                    return encode_reply(&Ok::<_, IpcError>(LifecycleReply::RestoreFailed), out);
                }
                defmt::info!(
                    "{=str}: state restored ({=usize} bytes); serving",
                    crate::name(),
                    swap.len
                );
            }
            swap.quiet = false;
            Ok(LifecycleReply::Done)
        }
        Ok(LifecycleRequest::Fault) => {
            defmt::warn!(
                "{=str}: fault injected on request: touching an unmapped address",
                crate::name()
            );
            // Safety: not safe at all, on purpose: the read faults and the
            // kernel stops this service (fault-injection tests).
            let v = unsafe { core::ptr::read_volatile(0x0000_0000_dead_0000 as *const u64) };
            Ok(LifecycleReply::Identity { version: v as u32 })
        }
    };
    encode_reply(&reply, out)
}
