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
    let r = crate::sys::call5(
        nr::CALL,
        [
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

/// Set by [`forward_instead`]: the handle the answer is forwarded to, plus
/// one.
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
///
/// Each turn is one REPLY_RECV: the answer to the last message (if any)
/// and the wait for the next. The common message (on a served handle, not
/// a bind) costs the loop a few comparisons ([`Receiver::take`]); binds,
/// lifecycle requests, notifications, errors and answers sent elsewhere
/// ([`answer_instead`]) are out of line.
pub fn serve<S: Service>(svc: &mut S, mask: u64) -> ! {
    let lifecycle = crate::handle("lifecycle");
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
    let mut rx = Receiver::new(lifecycle, mask, swap.quiet);
    let mut io = Buffers {
        msg: [0; MAX_MESSAGE],
        out: [0; MAX_MESSAGE],
    };
    let Buffers { msg: buf, out } = &mut io;
    // The answer: its token and its length in `out` (with, in the high
    // half, the handle a forward goes to plus one: [`forward_instead`]).
    let mut answer = (0u64, 0usize);
    loop {
        let r = crate::sys::call6(
            nr::REPLY_RECV,
            [
                answer.0,
                out.as_ptr() as u64,
                answer.1 as u64,
                rx.listen,
                buf.as_mut_ptr() as u64,
                MAX_MESSAGE as u64,
            ],
        );
        answer = match r.status {
            0 => rx.take(svc, &mut swap, r, buf, out),
            status => receive_failed(svc, status, answer, out),
        };
    }
}

/// What the receive loop keeps between messages: which slot is the
/// lifecycle handle and which handles it receives on (all of the mask
/// while serving, the lifecycle handle alone while quiet for a swap).
struct Receiver {
    /// The lifecycle handle's slot ([`NO_SLOT`] without one).
    life: Handle,
    life_bit: u64,
    mask: u64,
    /// The mask of the next receive.
    listen: u64,
}

/// A slot no handle has (slots are below 64).
const NO_SLOT: Handle = Handle::MAX;

impl Receiver {
    fn new(lifecycle: Option<Handle>, mask: u64, quiet: bool) -> Self {
        let life_bit = lifecycle.map_or(0, |h| 1u64 << h);
        let mut rx = Receiver {
            life: lifecycle.unwrap_or(NO_SLOT),
            life_bit,
            mask,
            listen: 0,
        };
        rx.quiet(quiet);
        rx
    }

    /// Receives on the lifecycle handle alone (`quiet`) or on all.
    fn quiet(&mut self, quiet: bool) {
        self.listen = if quiet {
            self.life_bit
        } else {
            self.mask | self.life_bit
        };
    }

    /// What a receive returned (`r`, its status 0, the message in `buf`)
    /// handled: the answer to send with the next receive, as (token,
    /// length in `out`, a forward's handle plus one in the high half);
    /// (0, 0) for none.
    #[inline(always)]
    fn take<S: Service>(
        &mut self,
        svc: &mut S,
        swap: &mut Swap,
        r: Ret,
        buf: &[u8; MAX_MESSAGE],
        out: &mut [u8; MAX_MESSAGE],
    ) -> (u64, usize) {
        let m = match event(r, buf) {
            Ok(Event::Message(m)) => m,
            Ok(Event::Notified { slot, bits }) => {
                svc.notified(slot, bits);
                return (0, 0);
            }
            // (Not reached: the loop took the failures.)
            Err(_) => return (0, 0),
        };
        let n = if m.slot == self.life {
            self.lifecycle(svc, swap, m.bytes, out)
        } else if m.bytes.len() == BIND_LEN
            && let Some(key) = bind_key_cold(m.bytes)
        {
            bind_reply(svc.interface(m.slot), key, out)
        } else {
            svc.handle(m, out)
        };
        // (A load first: the common case takes no atomic swap.)
        if ANSWER_TO.load(core::sync::atomic::Ordering::Relaxed) != 0 {
            return answer_elsewhere(n);
        }
        match n {
            DEFER => (0, 0),
            _ => (m.token, n),
        }
    }

    /// A lifecycle request answered (the receive mask follows a swap's
    /// quiet state). (Given the message's bytes, not the [`Message`]: a
    /// `Message` passed out of line is one the common case would store.)
    #[inline(never)]
    fn lifecycle<S: Service>(
        &mut self,
        svc: &mut S,
        swap: &mut Swap,
        bytes: &[u8],
        out: &mut [u8],
    ) -> usize {
        let n = lifecycle_request(svc, swap, bytes, out);
        self.quiet(swap.quiet);
        n
    }
}

/// The length of a bind message ([`bind_key`]).
const BIND_LEN: usize = 12;

/// [`bind_key`] of a message of [`BIND_LEN`] bytes: out of line, so that
/// the receive loop's common case is one comparison of the length.
#[cold]
#[inline(never)]
fn bind_key_cold(message: &[u8]) -> Option<[u8; 8]> {
    bind_key(message)
}

/// A REPLY_RECV that sent `sent` (token, length) failed: a forward the
/// kernel refused goes back to the service ([`Service::forward_refused`],
/// the exit still its own); anything else is logged, and the processor
/// given up once.
#[cold]
#[inline(never)]
fn receive_failed<S: Service>(
    svc: &mut S,
    status: u64,
    (token, len): (u64, usize),
    out: &mut [u8],
) -> (u64, usize) {
    if len >> 32 != 0 {
        let n = svc.forward_refused(token, out, len & 0xffff_ffff);
        return answer_elsewhere(n);
    }
    let e = SysError::from_raw(status).unwrap_or(SysError::UnknownCall);
    defmt::error!("{=str}: receive failed: {}", crate::name(), e);
    crate::sys::yield_now();
    (0, 0)
}

/// The answer of length `n` ([`DEFER`]: none) goes to the token
/// [`answer_instead`] set, which is cleared, or is forwarded with it
/// ([`forward_instead`]).
#[cold]
#[inline(never)]
fn answer_elsewhere(n: usize) -> (u64, usize) {
    let to = ANSWER_TO.swap(0, core::sync::atomic::Ordering::Relaxed);
    let forward = FORWARD_TO.swap(0, core::sync::atomic::Ordering::Relaxed);
    match n {
        DEFER => (0, 0),
        _ => (to, n | (forward as usize) << 32),
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
    bytes: &[u8],
    out: &mut [u8],
) -> usize {
    if let Some(key) = bind_key(bytes) {
        return bind_reply(Some(LIFECYCLE), key, out);
    }
    let reply = match decode::<LifecycleRequest>(bytes) {
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

#[cfg(test)]
mod tests {
    //! The receive loop's handling of each message ([`Receiver::take`]),
    //! without the system call: what it answers, to whom, and what it hands
    //! the service.
    use super::*;
    use ipc_schema::uart::UART_INPUT;
    use std::sync::Mutex;
    use std::vec;
    use std::vec::Vec;

    extern crate std;

    crate::host_logger!();

    /// `v` encoded.
    fn bytes<T: Serialize>(v: &T) -> Vec<u8> {
        let mut b = [0u8; MAX_MESSAGE];
        postcard::to_slice(v, &mut b).unwrap().to_vec()
    }

    /// [`ANSWER_TO`] is one for the process: the tests that take messages
    /// take turns.
    static TURN: Mutex<()> = Mutex::new(());

    const SERVED: Handle = 3;
    const LIFE: Handle = 5;

    #[derive(Default)]
    struct Echo {
        /// (slot, badge, token, bytes) of each message handed over.
        seen: Vec<(Handle, u64, u64, Vec<u8>)>,
        notes: Vec<(Handle, u64)>,
        /// The next answer is deferred, or sent to this token instead.
        defer: bool,
        instead: u64,
        /// The next answer is forwarded to this handle.
        forward: Option<Handle>,
        /// (token, bytes) of each forward refused.
        refused: Vec<(u64, Vec<u8>)>,
    }

    impl Service for Echo {
        type State = u32;

        fn interface(&self, slot: Handle) -> Option<InterfaceId> {
            (slot == SERVED).then_some(UART_INPUT)
        }

        fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
            self.seen
                .push((msg.slot, msg.badge, msg.token, msg.bytes.to_vec()));
            if self.instead != 0 {
                answer_instead(core::mem::take(&mut self.instead));
            }
            if let Some(h) = self.forward.take() {
                forward_instead(msg.token, h);
            }
            if core::mem::take(&mut self.defer) {
                return DEFER;
            }
            // The bytes back, reversed.
            for (o, b) in reply.iter_mut().zip(msg.bytes.iter().rev()) {
                *o = *b;
            }
            msg.bytes.len()
        }

        fn notified(&mut self, slot: Handle, bits: u64) {
            self.notes.push((slot, bits));
        }

        /// Answers the exit itself instead: one byte, 0xee.
        fn forward_refused(&mut self, token: u64, out: &mut [u8], len: usize) -> usize {
            self.refused.push((token, out[..len].to_vec()));
            answer_instead(token);
            out[0] = 0xee;
            1
        }

        fn snapshot(&self) -> u32 {
            7
        }

        fn restore(&mut self, _: u32) {}

        fn version(&self) -> u32 {
            42
        }
    }

    struct Loop {
        rx: Receiver,
        swap: Swap,
        buf: [u8; MAX_MESSAGE],
        out: [u8; MAX_MESSAGE],
    }

    impl Loop {
        fn new(quiet: bool) -> Self {
            Loop {
                rx: Receiver::new(Some(LIFE), 1 << SERVED, quiet),
                swap: Swap {
                    buf: [0; SNAPSHOT],
                    len: 0,
                    quiet,
                },
                buf: [0; MAX_MESSAGE],
                out: [0; MAX_MESSAGE],
            }
        }

        /// A message of `bytes` on `slot` with `token` received and
        /// handled: the answer's token and bytes.
        fn message(
            &mut self,
            svc: &mut Echo,
            slot: Handle,
            token: u64,
            bytes: &[u8],
        ) -> (u64, Vec<u8>) {
            self.buf[..bytes.len()].copy_from_slice(bytes);
            let r = Ret {
                status: 0,
                rdi: bytes.len() as u64,
                rsi: token,
                rdx: 0x77,
                r10: u64::from(slot),
                r8: 0,
            };
            let (to, n) = self
                .rx
                .take(svc, &mut self.swap, r, &self.buf, &mut self.out);
            (to, self.out[..n].to_vec())
        }
    }

    #[test]
    fn a_message_goes_to_the_service_and_its_answer_to_the_caller() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let (mut l, mut svc) = (Loop::new(false), Echo::default());
        assert_eq!(l.rx.listen, (1 << SERVED) | (1 << LIFE));
        assert_eq!(
            l.message(&mut svc, SERVED, 9, &[1, 2, 3]),
            (9, vec![3, 2, 1])
        );
        assert_eq!(svc.seen, [(SERVED, 0x77, 9, vec![1, 2, 3])]);
        // A deferred answer: nothing is sent now.
        svc.defer = true;
        assert_eq!(l.message(&mut svc, SERVED, 10, &[4]), (0, vec![]));
        // Twelve bytes that are not a bind are a request like any other.
        let twelve = *b"BINX01234567";
        let (to, answer) = l.message(&mut svc, SERVED, 11, &twelve);
        assert_eq!((to, answer.len()), (11, 12));
        assert_eq!(svc.seen.len(), 3);
        // A message longer than a message is cut where the buffer ends.
        let r = Ret {
            status: 0,
            rdi: 4096,
            rsi: 12,
            rdx: 0,
            r10: u64::from(SERVED),
            r8: 0,
        };
        let (to, n) = l.rx.take(&mut svc, &mut l.swap, r, &l.buf, &mut l.out);
        assert_eq!((to, n), (12, MAX_MESSAGE));
    }

    #[test]
    fn binds_are_answered_by_the_loop() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let (mut l, mut svc) = (Loop::new(false), Echo::default());
        let bound = bytes(&BindReply::Bound);
        let ok = bind_message(&UART_INPUT.key);
        assert_eq!(l.message(&mut svc, SERVED, 4, &ok), (4, bound.clone()));
        let wrong = bind_message(&LIFECYCLE.key);
        let (to, answer) = l.message(&mut svc, SERVED, 5, &wrong);
        assert_eq!(to, 5);
        assert_eq!(
            postcard::from_bytes::<BindReply>(&answer).unwrap(),
            BindReply::WrongKey {
                server: UART_INPUT.key.to_bytes(),
                client: LIFECYCLE.key.to_bytes(),
            }
        );
        // The lifecycle handle speaks the lifecycle interface.
        assert_eq!(l.message(&mut svc, LIFE, 6, &wrong), (6, bound));
        assert!(svc.seen.is_empty());
    }

    #[test]
    fn lifecycle_requests_and_the_quiet_mask() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        // A successor receives on the lifecycle handle alone until resumed.
        let (mut l, mut svc) = (Loop::new(true), Echo::default());
        assert_eq!(l.rx.listen, 1 << LIFE);
        let identify = bytes(&LifecycleRequest::Identify);
        let (to, answer) = l.message(&mut svc, LIFE, 8, &identify);
        assert_eq!(to, 8);
        assert_eq!(
            postcard::from_bytes::<Result<LifecycleReply, IpcError>>(&answer).unwrap(),
            Ok(LifecycleReply::Identity { version: 42 })
        );
        assert_eq!(l.rx.listen, 1 << LIFE);
        let resume = bytes(&LifecycleRequest::Resume);
        let (to, answer) = l.message(&mut svc, LIFE, 9, &resume);
        assert_eq!(to, 9);
        assert_eq!(
            postcard::from_bytes::<Result<LifecycleReply, IpcError>>(&answer).unwrap(),
            Ok(LifecycleReply::Done)
        );
        assert_eq!(l.rx.listen, (1 << SERVED) | (1 << LIFE));
        assert!(svc.seen.is_empty());
        // Without a lifecycle handle: the mask alone, and no slot is it.
        let rx = Receiver::new(None, 1 << SERVED, false);
        assert_eq!((rx.listen, rx.life), (1 << SERVED, NO_SLOT));
    }

    #[test]
    fn notifications_and_answers_sent_elsewhere() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let (mut l, mut svc) = (Loop::new(false), Echo::default());
        let r = Ret {
            status: 0,
            rdi: 0,
            rsi: 0,
            rdx: 0,
            r10: 2,
            r8: 0b101,
        };
        assert_eq!(
            l.rx.take(&mut svc, &mut l.swap, r, &l.buf, &mut l.out),
            (0, 0)
        );
        assert_eq!(svc.notes, [(2, 0b101)]);
        assert!(svc.seen.is_empty());
        // The answer goes to the token named, and only this once.
        svc.instead = 99;
        assert_eq!(l.message(&mut svc, SERVED, 20, &[1, 2]), (99, vec![2, 1]));
        assert_eq!(l.message(&mut svc, SERVED, 21, &[3]), (21, vec![3]));
        // Named and deferred: nothing sent, and the name forgotten.
        (svc.instead, svc.defer) = (98, true);
        assert_eq!(l.message(&mut svc, SERVED, 22, &[4]), (0, vec![]));
        assert_eq!(l.message(&mut svc, SERVED, 23, &[5]), (23, vec![5]));
    }

    /// A forward ([`forward_instead`]) rides in the high half of the
    /// answer's length (the handle plus one), once; refused by the kernel,
    /// the exit goes back to the service with the bytes, whose answer goes
    /// out with the next receive.
    #[test]
    fn a_forward_and_a_refused_one() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let (mut l, mut svc) = (Loop::new(false), Echo::default());
        svc.forward = Some(7);
        l.buf[..2].copy_from_slice(&[1, 2]);
        let r = Ret {
            status: 0,
            rdi: 2,
            rsi: 30,
            rdx: 0,
            r10: u64::from(SERVED),
            r8: 0,
        };
        let sent = l.rx.take(&mut svc, &mut l.swap, r, &l.buf, &mut l.out);
        assert_eq!(sent, (30, 2 | 8 << 32));
        // Refused (Busy): back to the service, its answer to the exit.
        let busy = SysError::Busy as u64;
        assert_eq!(receive_failed(&mut svc, busy, sent, &mut l.out), (30, 1));
        assert_eq!(svc.refused, [(30, vec![2, 1])]);
        assert_eq!(l.out[0], 0xee);
        // The next answer is an answer again.
        assert_eq!(l.message(&mut svc, SERVED, 31, &[3]), (31, vec![3]));
    }
}
