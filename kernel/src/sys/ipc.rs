//! IPC: endpoints and notifications.
//!
//! A call copies the caller's message (at most 256 bytes) into the kernel
//! and blocks the caller; when a receiver waits on the endpoint (or as soon
//! as one does) the message is copied into the receiver's buffer together
//! with a reply token and the badge of the caller's handle. The receiver
//! answers with REPLY and the token; the reply goes straight into the
//! caller's reply buffer. Callers are processes, or vCPUs whose exits the
//! kernel sends as calls on their behalf.
//!
//! A receiver that dies leaves its callers with `Dead` and the endpoint at a
//! new generation; vCPUs are not told: their exit goes back in the queue for
//! whoever serves the endpoint next. Handles remember the generation they
//! last saw, so the first call through an old handle after a restart also
//! fails with `Dead`, once, and the client knows to bind again.
//!
//! A receiver that *ends* (it exited, or its supervisor ended it to hold
//! it) with nobody else waiting on the endpoint closes it: queued callers
//! get `NoServer`, queued vCPUs' domains stop (their exit has no handler),
//! and every later call fails at once with `NoServer`, until a process
//! waits on the endpoint again. Nothing waits forever on a service that
//! is gone.
//!
//! An endpoint's `waiting` and a notification's `waiter` name the process
//! that last began to wait on it, and are hints: a process that receives on
//! several handles is not taken off the others when one of them delivers.
//! Whoever uses a hint checks that the process still waits, on a mask that
//! holds the object ([`Process::receiving_on`](super::process::Process::receiving_on),
//! [`Kernel::wake_for_bits`]), and drops it otherwise.

use super::caps::{Cap, Object};
use super::process::{Process, State, Wait};
use super::space::AddressSpace;
use super::{Kernel, Runnable};
use ipc_schema::exitcodec::{EXIT_MESSAGE_MAX, encode_exit};
use ipc_schema::syscall::{MAX_MESSAGE, SysError, rights};
use ipc_schema::vmexit::{Exit, ExitRegs};

/// Who waits in an endpoint's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Sender {
    Process(u16),
    /// The vCPU of domain slot `n` (an exit).
    Vcpu(u16),
}

/// An endpoint.
#[derive(Debug, Default)]
pub struct Endpoint {
    /// Bumped whenever the service that received on it stops.
    pub generation: u32,
    /// The process that received on it last.
    pub server: Option<u16>,
    /// A process waiting in RECV on it (a hint: see the module
    /// documentation)...
    pub waiting: Option<u16>,
    /// ...through its handle in this slot.
    pub waiting_slot: u32,
    /// Callers whose messages wait for a receiver.
    pub queue: heapless::Deque<Sender, 16>,
    /// Its server ended and nobody has waited on it since: calls fail at
    /// once (`NoServer`). See the module documentation.
    pub closed: bool,
}

/// A notification: bits set by NOTIFY (or an interrupt), taken by WAIT.
#[derive(Debug, Default)]
pub struct Notification {
    pub bits: u64,
    pub waiter: Option<u16>,
}

/// The set bits of `mask`, lowest first (handle slots of a receive mask).
pub fn bits(mut mask: u64) -> impl Iterator<Item = u32> {
    core::iter::from_fn(move || {
        (mask != 0).then(|| {
            let b = mask.trailing_zeros();
            mask &= mask - 1;
            b
        })
    })
}

/// Whether a handle (`c`) is one to receive on: an endpoint with
/// `receive`, or a notification with `wait`.
pub fn receivable(c: Option<Cap>) -> bool {
    let right = |c: Cap| match c.object {
        Object::Endpoint { .. } => c.rights & rights::RECEIVE,
        Object::Notification(_) => c.rights & rights::WAIT,
        _ => 0,
    };
    c.map_or(0, right) != 0
}

/// One pass over process `pid`'s (`p`'s) handles in `mask`: each endpoint
/// and notification learns that `pid` waits on it (a hint, harmless if it
/// does not wait after all: see `Process::quiet`; `epoch` moves when a hint
/// changes), and what is there already is noted: whether a call or exit is
/// queued, a notification signalled, an endpoint closed or gone (a receiver
/// opens it again). `Err(slot)` at the first handle that is not one to
/// receive (RECEIVE) or wait (WAIT) on.
pub fn note_waiting(
    p: &Process,
    pid: u16,
    mask: u64,
    endpoints: &mut [Option<Endpoint>],
    notifications: &mut [Option<Notification>],
    epoch: &mut u64,
) -> Result<(bool, bool, bool), u32> {
    let (mut queued, mut signalled, mut closed) = (false, false, false);
    for slot in bits(mask) {
        let c = p.handles.get(slot as usize).copied().flatten();
        match c.map(|c| c.object) {
            _ if !receivable(c) => return Err(slot),
            Some(Object::Endpoint { id, .. }) => match endpoints[usize::from(id)].as_mut() {
                Some(e) => {
                    *epoch += u64::from(e.waiting != Some(pid) || e.waiting_slot != slot);
                    e.waiting = Some(pid);
                    e.waiting_slot = slot;
                    queued |= !e.queue.is_empty();
                    closed |= e.closed;
                }
                None => closed = true,
            },
            Some(Object::Notification(n)) => {
                if let Some(n) = notifications[usize::from(n)].as_mut() {
                    *epoch += u64::from(n.waiter != Some(pid));
                    n.waiter = Some(pid);
                    signalled |= n.bits != 0;
                }
            }
            _ => {}
        }
    }
    Ok((queued, signalled, closed))
}

/// A token names a caller and its call: kind (bit 63), id, sequence.
pub fn token(sender: Sender, seq: u32) -> u64 {
    match sender {
        Sender::Process(p) => (u64::from(p) << 32) | u64::from(seq),
        Sender::Vcpu(d) => (1 << 63) | (u64::from(d) << 32) | u64::from(seq),
    }
}

pub fn untoken(t: u64) -> (Sender, u32) {
    let id = ((t >> 32) & 0xffff) as u16;
    let sender = if t >> 63 != 0 {
        Sender::Vcpu(id)
    } else {
        Sender::Process(id)
    };
    (sender, t as u32)
}

impl Kernel {
    /// Sends `sender`'s message on endpoint `ep`: straight to its receiver
    /// when one waits and nobody is queued before it, else into the queue.
    pub fn send(&mut self, ep: u16, sender: Sender) -> Result<(), SysError> {
        let e = self.endpoints[usize::from(ep)]
            .as_mut()
            .ok_or(SysError::NoSuchHandle)?;
        if e.closed {
            return Err(SysError::NoServer);
        }
        if e.queue.is_empty()
            && let Some(receiver) = e.waiting
            && self.transfer(ep, receiver, sender)
        {
            return Ok(());
        }
        let e = self.endpoints[usize::from(ep)]
            .as_mut()
            .ok_or(SysError::NoSuchHandle)?;
        self.epoch += 1;
        e.queue
            .push_back(sender)
            .map_err(|_| SysError::NoResources)?;
        Ok(())
    }

    /// Delivers the first queued message of `ep` to its waiting receiver, if
    /// both exist. Returns whether it did.
    pub fn deliver(&mut self, ep: u16) -> bool {
        let Some(e) = self.endpoints[usize::from(ep)].as_ref() else {
            return false;
        };
        let (Some(receiver), Some(&sender)) = (e.waiting, e.queue.front()) else {
            return false;
        };
        if !self.transfer(ep, receiver, sender) {
            return false;
        }
        if let Some(e) = self.endpoints[usize::from(ep)].as_mut() {
            e.queue.pop_front();
        }
        true
    }

    /// Moves `sender`'s message on `ep` to `receiver`, the endpoint's
    /// waiting receiver. False if it did not (the receiver does not wait
    /// any more, or got an error instead: the sender stays where it is).
    fn transfer(&mut self, ep: u16, receiver: u16, sender: Sender) -> bool {
        // `waiting` is only a hint (see the module documentation): the
        // receiver must still wait in RECV on a mask that holds this endpoint.
        let Some((buf, cap, slot, exit_buf)) = self.processes[usize::from(receiver)]
            .as_ref()
            .and_then(|p| p.receiving_on(ep))
        else {
            if let Some(e) = self.endpoints[usize::from(ep)].as_mut() {
                e.waiting = None;
            }
            self.epoch += 1;
            return false;
        };
        let r = self.processes[usize::from(receiver)]
            .as_ref()
            .expect("checked above");
        let Some(space) = r.space.as_ref() else {
            return false;
        };
        // The message: a caller's straight from its outbox into the
        // receiver's buffer; an exit encoded there from the vCPU's state.
        let (status, len, badge, seq) = match sender {
            Sender::Process(pid) => {
                let Some(p) = self.processes[usize::from(pid)].as_ref() else {
                    return false;
                };
                let State::Blocked(Wait::Call {
                    ep: call_ep,
                    handle,
                    ..
                }) = p.state
                else {
                    return false;
                };
                let badge = match p.handles.get(handle as usize).copied().flatten() {
                    Some(c) if call_ep == ep => c.badge,
                    _ => 0,
                };
                let msg = &p.outbox[..p.outbox_len.min(MAX_MESSAGE)];
                (copy_out(space, buf, cap, msg), msg.len(), badge, p.seq)
            }
            Sender::Vcpu(slot) => {
                let Some(d) = self.domains[usize::from(slot)].as_ref() else {
                    return false;
                };
                let (Some(exit), Some(v)) = (d.pending.as_ref(), d.vcpu.as_ref()) else {
                    return false;
                };
                let (status, len) =
                    write_exit(space, (buf, cap, exit_buf), exit, &ExitRegs::of(&v.regs));
                (status, len, 0, d.exit_seq)
            }
        };
        let len = len as u64;
        let r = self.processes[usize::from(receiver)]
            .as_mut()
            .expect("checked above");
        if status != SysError::Ok {
            r.state = State::Ready;
            r.frame.rax = status as u64;
            r.frame.rdi = len;
            self.make_ready(Runnable::Process(receiver));
            return false;
        }
        self.give(ep, receiver, (len, token(sender, seq), badge, slot));
        match sender {
            Sender::Process(pid) => {
                if let Some(State::Blocked(Wait::Call { server, .. })) = self.processes
                    [usize::from(pid)]
                .as_mut()
                .map(|p| &mut p.state)
                {
                    *server = Some(receiver);
                }
            }
            Sender::Vcpu(slot) => {
                if let Some(d) = self.domains[usize::from(slot)].as_mut() {
                    d.exit_server = Some(receiver);
                }
            }
        }
        // Run the receiver next: the caller waits for it.
        self.make_ready_next(Runnable::Process(receiver));
        true
    }

    /// Hands a message (length, token, badge, slot) to `receiver`, which
    /// waits on `ep` and got its bytes: its registers say so, and `ep`
    /// learns who serves it. The receiver, to be run.
    #[inline(always)]
    pub fn give(
        &mut self,
        ep: u16,
        receiver: u16,
        (len, token, badge, slot): (u64, u64, u64, u32),
    ) -> Option<&mut Process> {
        if let Some(e) = self.endpoints[usize::from(ep)].as_mut() {
            e.served_by(receiver);
        }
        let r = self.processes[usize::from(receiver)].as_mut()?;
        r.take_message(len, token, badge, slot);
        Some(r)
    }

    /// Answers the call named by `token` with `reply`, from server `pid`.
    pub fn reply(&mut self, pid: u16, token: u64, reply: &[u8]) -> Result<(), SysError> {
        let (sender, seq) = untoken(token);
        match sender {
            Sender::Process(caller) => {
                let c = self
                    .processes
                    .get_mut(usize::from(caller))
                    .and_then(Option::as_mut)
                    .ok_or(SysError::BadToken)?;
                let (reply_buf, reply_cap, _) =
                    c.awaiting_answer(seq, pid).ok_or(SysError::BadToken)?;
                if reply.len() as u64 > reply_cap {
                    c.frame.rax = SysError::ReplyTooLong as u64;
                    c.frame.rdi = reply.len() as u64;
                } else {
                    let ok = c
                        .space
                        .as_ref()
                        .is_some_and(|s| s.write(reply_buf, reply).is_ok());
                    c.frame.rax = if ok {
                        SysError::Ok
                    } else {
                        SysError::BadAddress
                    } as u64;
                    c.frame.rdi = reply.len() as u64;
                }
                c.state = State::Ready;
                self.make_ready_next(Runnable::Process(caller));
                Ok(())
            }
            Sender::Vcpu(slot) => {
                let d = self
                    .domains
                    .get_mut(usize::from(slot))
                    .and_then(Option::as_mut)
                    .ok_or(SysError::BadToken)?;
                if !d.held_by(pid, seq) {
                    return Err(SysError::BadToken);
                }
                if d.exit_restricted && !ipc_schema::exitcodec::restricted_ok(reply) {
                    return Err(SysError::BadArgument);
                }
                crate::vm::exits::apply_reply(self, slot, reply);
                Ok(())
            }
        }
    }

    /// Callers waiting on `pid` get `Dead` (`NoServer` where it closed the
    /// endpoint); vCPUs waiting on it are queued again for the endpoint's
    /// next receiver (or stop, when there will be none).
    pub fn fail_calls_to(&mut self, pid: u16) {
        for i in 0..self.processes.len() {
            let Some(c) = self.processes[i].as_mut() else {
                continue;
            };
            if let State::Blocked(Wait::Call {
                ep,
                handle,
                server: Some(s),
                ..
            }) = c.state
                && s == pid
            {
                let (generation, closed) = self.endpoints[usize::from(ep)]
                    .as_ref()
                    .map_or((0, false), |e| (e.generation, e.closed));
                let c = self.processes[i].as_mut().expect("checked above");
                // It is told now: its handle has seen the new generation,
                // so that the call it makes again (binding first) goes
                // through instead of failing with `Dead` a second time.
                if let Some(Some(Cap {
                    object: Object::Endpoint { id, generation: g },
                    ..
                })) = c.handles.get_mut(handle as usize)
                    && *id == ep
                {
                    *g = generation;
                }
                c.frame.rax = if closed {
                    SysError::NoServer
                } else {
                    SysError::Dead
                } as u64;
                c.frame.rdi = u64::from(generation);
                c.state = State::Ready;
                self.make_ready(Runnable::Process(i as u16));
            }
        }
        for slot in 0..self.domains.len() {
            let requeue = match self.domains[slot].as_mut() {
                Some(d) if d.awaiting_reply && d.exit_server == Some(pid) => {
                    // A forwarded one too: `last_endpoint` is still where
                    // it was forwarded from, and it goes there unrestricted.
                    (d.exit_server, d.exit_restricted) = (None, false);
                    // Sent again where it went (a single step's exit goes
                    // to whoever asked for the step).
                    Some(d.last_endpoint)
                }
                _ => None,
            };
            if let Some(ep) = requeue
                && let Err(e) = self.send(ep, Sender::Vcpu(slot as u16))
            {
                crate::vm::exits::unreachable_handler(self, slot as u16, e);
            }
        }
    }

    /// Closes `ep`: nothing will serve it (see the module documentation).
    /// Callers queued on it get `NoServer`; queued vCPUs' domains stop.
    pub fn close(&mut self, ep: u16) {
        let Some(e) = self.endpoints[usize::from(ep)].as_mut() else {
            return;
        };
        e.closed = true;
        e.waiting = None;
        self.epoch += 1;
        while let Some(sender) = self.endpoints[usize::from(ep)]
            .as_mut()
            .and_then(|e| e.queue.pop_front())
        {
            match sender {
                Sender::Process(pid) => {
                    if let Some(p) = self.processes[usize::from(pid)].as_mut()
                        && let State::Blocked(Wait::Call { ep: on, .. }) = p.state
                        && on == ep
                    {
                        p.frame.rax = SysError::NoServer as u64;
                        p.frame.rdi = 0;
                        p.state = State::Ready;
                        self.make_ready(Runnable::Process(pid));
                    }
                }
                Sender::Vcpu(slot) => {
                    crate::vm::exits::unreachable_handler(self, slot, SysError::NoServer)
                }
            }
        }
    }

    /// Sets bits on a notification, waking its waiter.
    pub fn notify(&mut self, n: u16, bits: u64) {
        let Some(note) = self
            .notifications
            .get_mut(usize::from(n))
            .and_then(Option::as_mut)
        else {
            return;
        };
        note.bits |= bits;
        self.epoch += 1;
        if let Some(waiter) = note.waiter {
            self.wake_for_bits(waiter);
        }
    }

    /// A process waiting (WAIT or RECV) on a notification with bits gets them.
    pub fn wake_for_bits(&mut self, pid: u16) {
        let Some(p) = self.processes[usize::from(pid)].as_ref() else {
            return;
        };
        let (note, slot) = match p.state {
            State::Blocked(Wait::Notification(n)) => (n, u32::MAX),
            State::Blocked(Wait::Recv { mask, .. }) => {
                let found = bits(mask).find_map(|slot| match p.handles[slot as usize] {
                    Some(Cap {
                        object: Object::Notification(n),
                        ..
                    }) if self.notifications[usize::from(n)]
                        .as_ref()
                        .is_some_and(|x| x.bits != 0) =>
                    {
                        Some((n, slot))
                    }
                    _ => None,
                });
                match found {
                    Some(found) => found,
                    None => return,
                }
            }
            _ => return,
        };
        let Some(nt) = self.notifications[usize::from(note)].as_mut() else {
            return;
        };
        let bits = core::mem::take(&mut nt.bits);
        if bits == 0 {
            return;
        }
        let p = self.processes[usize::from(pid)]
            .as_mut()
            .expect("checked above");
        p.frame.rax = SysError::Ok as u64;
        p.frame.rdi = 0;
        p.frame.rsi = 0;
        p.frame.r10 = u64::from(slot);
        p.frame.r8 = bits;
        if slot == u32::MAX {
            p.frame.rdi = bits;
        }
        p.state = State::Ready;
        self.make_ready(Runnable::Process(pid));
    }
}

/// Copies a message into a receiver's buffer (`buf`, `cap` bytes): the
/// status the receiver gets.
fn copy_out(space: &AddressSpace, buf: u64, cap: u64, msg: &[u8]) -> SysError {
    if msg.len() as u64 > cap {
        // The receiver's buffer is too small: it gets the error, the
        // caller stays queued.
        SysError::MessageTooLong
    } else if space.write(buf, msg).is_err() {
        SysError::BadAddress
    } else {
        SysError::Ok
    }
}

/// Encodes an exit message into a receiver's buffer: in place when the
/// buffer takes any exit (its direct-map address `exit_buf`, nonzero: a
/// handler's receive buffer, always), else through a copy. The status and
/// the length.
fn write_exit(
    space: &AddressSpace,
    (buf, cap, exit_buf): (u64, u64, u64),
    exit: &Exit,
    regs: &ExitRegs,
) -> (SysError, usize) {
    if exit_buf != 0 {
        // Safety: `exit_buf` is the direct-map address of EXIT_MESSAGE_MAX
        // bytes of the receiver's own writable memory (`Wait::Recv`), which
        // nothing else in the kernel refers to while this runs.
        let dst = unsafe { core::slice::from_raw_parts_mut(exit_buf as *mut u8, EXIT_MESSAGE_MAX) };
        if let Some(n) = encode_exit(exit, regs, dst) {
            return (SysError::Ok, n);
        }
    }
    let mut msg = [0u8; EXIT_MESSAGE_MAX];
    match encode_exit(exit, regs, &mut msg) {
        Some(n) => (copy_out(space, buf, cap, &msg[..n]), n),
        None => (SysError::BadArgument, 0),
    }
}

impl Endpoint {
    /// `receiver` took a message from it: it serves it now. (It stays the
    /// waiting hint: see `Process::quiet`.)
    #[inline(always)]
    pub fn served_by(&mut self, receiver: u16) {
        self.server = Some(receiver);
    }
}

impl super::process::Process {
    /// A waiting receiver gets a message: `len` bytes in its buffer, from
    /// the caller `token` names, through a handle with `badge`, on its
    /// handle in `slot`; it is ready to run.
    #[inline(always)]
    pub fn take_message(&mut self, len: u64, token: u64, badge: u64, slot: u32) {
        self.frame.rax = SysError::Ok as u64;
        self.frame.rdi = len;
        self.frame.rsi = token;
        self.frame.rdx = badge;
        self.frame.r10 = u64::from(slot);
        self.frame.r8 = 0;
        self.state = State::Ready;
    }

    /// Where the answer to call `seq` goes, if this process waits for it
    /// from `server`: (reply buffer, its capacity, its direct-map address
    /// or 0: see `Wait::Call`).
    #[inline(always)]
    pub fn awaiting_answer(&self, seq: u32, server: u16) -> Option<(u64, u64, u64)> {
        match self.state {
            State::Blocked(Wait::Call {
                reply_buf,
                reply_cap,
                reply_at,
                seq: s,
                server: Some(from),
                ..
            }) if s == seq && from == server => Some((reply_buf, reply_cap, reply_at)),
            _ => None,
        }
    }

    /// Where a message on endpoint `ep` goes, if this process waits in RECV
    /// with a handle to `ep` in its mask: (buffer, capacity, handle slot,
    /// direct address for exits: see `Wait::Recv`).
    #[inline]
    pub fn receiving_on(&self, ep: u16) -> Option<(u64, u64, u32, u64)> {
        let (mask, buf, cap, exit_buf) = self.receive_wait()?;
        bits(mask)
            .find(|&slot| self.endpoint_at(slot, ep))
            .map(|slot| (buf, cap, slot, exit_buf))
    }

    /// The RECV this process waits in: (mask, buffer, capacity, direct
    /// address for exits).
    #[inline(always)]
    pub fn receive_wait(&self) -> Option<(u64, u64, u64, u64)> {
        match self.state {
            State::Blocked(Wait::Recv {
                mask,
                buf,
                cap,
                exit_buf,
            }) => Some((mask, buf, cap, exit_buf)),
            _ => None,
        }
    }

    /// Whether handle `slot` of this process is one to endpoint `ep`.
    #[inline(always)]
    pub fn endpoint_at(&self, slot: u32, ep: u16) -> bool {
        matches!(
            self.handles.get(slot as usize),
            Some(Some(Cap {
                object: Object::Endpoint { id, .. },
                ..
            })) if *id == ep
        )
    }
}
