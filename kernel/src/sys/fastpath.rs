//! The fast paths: the common IPC transitions, taken in one straight run
//! when the usual conditions hold (as seL4 does for call and
//! reply-receive): the two of every exit a service handles, and the two of
//! a call between services.
//!
//! - [`exit`]: a vCPU's exit goes to its handler, which waits in RECV with
//!   nothing queued before it. The exit is encoded straight into the
//!   handler's receive buffer and the handler runs at once.
//! - REPLY_RECV ([`answer_vcpu`], [`answer_caller`]): the handler answers
//!   the exit with a plain answer (resume, perhaps with new registers:
//!   `exitcodec::plain_shape`) and waits again, with nothing there yet.
//!   The answer is applied and the vCPU entered at once. The same for a
//!   server answering a process's call: the answer is copied into the
//!   caller's buffer and the caller runs at once.
//! - [`call`]: a process calls an endpoint whose receiver waits, with
//!   nobody queued before it. The message is copied straight from the
//!   caller's buffer into the receiver's and the receiver runs at once.
//!
//! Each checks every condition first and changes nothing unless all hold;
//! otherwise it returns and the caller takes the general path
//! (`exits::to_handler`, `syscall::dispatch`), which has the same effect in
//! more steps and handles every other case (a queue, an error, a view
//! switch, a single step, the end of a domain...). The scheduling is the
//! general path's too: what runs is what `Kernel::make_ready_next` would
//! hand off to, and the hand-off streak is counted the same way.
//!
//! The kernel option `fastpath=off` turns them all off, so that the boot
//! tests can show that the general path gives the same results.

use super::Kernel;
use super::caps::{Cap, Object};
use super::ipc::{Sender, note_waiting, token, untoken};
use super::process::{Process, State, Wait};
use crate::arch::idt::TrapFrame;
use crate::vm::vcpu::VcpuState;
use core::sync::atomic::{AtomicBool, Ordering};
use ipc_schema::exitcodec::{
    EXIT_MESSAGE_MAX, encode_exit, plain_regs, plain_shape, plain_view_shape,
};
use ipc_schema::syscall::{DomainState, MAX_MESSAGE, SysError, rights};
use ipc_schema::vmexit::ExitRegs;
use platform::vmx::fields::reason;

/// Whether the fast paths are taken (kernel option `fastpath`).
static ON: AtomicBool = AtomicBool::new(true);

/// Reads the kernel option `fastpath` (`on`, the default, or `off`).
pub fn configure(option: Option<&str>) {
    match option {
        None | Some("on") => {}
        Some("off") => {
            ON.store(false, Ordering::Relaxed);
            defmt::info!(
                "IPC: fast paths off (fastpath=off): every exit and call takes the general path"
            );
        }
        Some(other) => defmt::warn!(
            "kernel option fastpath={=str} not understood (on or off); fast paths stay on",
            other
        ),
    }
}

/// Domain slot `slot`'s vCPU has just exited (`Domain::pending_raw`) for
/// its handler: if the handler waits, hands the exit over and runs the
/// handler (no return). Returns, having changed nothing, otherwise.
#[inline(always)]
pub fn exit(k: &mut Kernel, slot: u16) -> Option<()> {
    // (The hand-off is counted first, so that nothing is looked up twice:
    // if the path is not taken, the general one counts it again, which
    // changes nothing a first count did not.)
    if !ON.load(Ordering::Relaxed) || !k.count_hand_off() {
        return None;
    }
    let (domains, endpoints, processes) = (&mut k.domains, &mut k.endpoints, &mut k.processes);
    let d = domains[usize::from(slot)].as_mut()?;
    let raw = d.pending_raw?;
    let v = d.vcpu.as_ref()?;
    // (A VMCALL first, in one comparison: the path benchmarks measure.)
    let ep = if raw.is(reason::VMCALL) {
        if crate::vm::p2m_hypercall(d) {
            d.violation_endpoint
        } else {
            d.exit_endpoint
        }
    } else {
        if raw.vmx_failed() || raw.entry_failure() {
            return None;
        }
        // Single steps come back to whoever asked, and a full PML buffer
        // goes to whoever started PML with the buffers switched (the
        // general path knows both).
        match raw.reason() {
            // One no entry allowed may be MMIO, for the exit handler.
            reason::EPT_VIOLATION if v.qualification() & 0x38 == 0 => {
                d.no_access_endpoint(v.read(platform::vmx::fields::GUEST_PHYSICAL_ADDRESS))
            }
            reason::EPT_VIOLATION => d.violation_endpoint,
            reason::MONITOR_TRAP_FLAG | reason::EXCEPTION_OR_NMI | reason::PML_FULL => {
                return None;
            }
            _ => d.exit_endpoint,
        }
    };
    let e = endpoints[usize::from(ep)].as_mut()?;
    let (pid, handle) = (e.waiting?, e.waiting_slot);
    let p = processes[usize::from(pid)].as_mut()?;
    // The hint holds: the handler waits in RECV, through the handle the
    // hint names, on this endpoint.
    let (Some((_, at)), true) = (receives(p, handle, ep, 0), e.queue.is_empty()) else {
        return None;
    };
    if at.is_null() {
        return None;
    }
    // Everything holds: from here on, the exit is delivered.
    d.pending_raw = None;
    let exit = match &mut d.pending {
        Some(e) => {
            v.decode_into(d.id, &raw, e);
            e
        }
        none => none.insert(v.decode(d.id, &raw)),
    };
    // Safety: `at` is the direct-map address of EXIT_MESSAGE_MAX bytes of
    // the handler's own writable memory, which nothing else in the kernel
    // refers to while this runs.
    let dst = unsafe { core::slice::from_raw_parts_mut(at, EXIT_MESSAGE_MAX) };
    let len = encode_exit(exit, &ExitRegs::of(&v.regs), dst).unwrap_or(0);
    d.awaiting_reply = true;
    d.exit_seq = d.exit_seq.wrapping_add(1);
    d.last_endpoint = ep;
    d.exit_server = Some(pid);
    e.served_by(pid);
    p.take_message(len as u64, token(Sender::Vcpu(slot), d.exit_seq), 0, handle);
    k.current = Some(pid);
    super::sched::enter(p)
}

/// Whether `p` waits in RECV through its handle `slot` on endpoint `ep`,
/// with room for `len` bytes: then its buffer, and where it lies when it
/// takes any exit (`Wait::Recv::exit_buf`; null if not).
#[inline(always)]
fn receives(p: &Process, slot: u32, ep: u16, len: u64) -> Option<(u64, *mut u8)> {
    let (mask, buf, cap, exit_buf) = p.receive_wait()?;
    (mask & 1u64.checked_shl(slot)? != 0 && len <= cap && p.endpoint_at(slot, ep))
        .then_some((buf, exit_buf as *mut u8))
}

/// Hands a message (length, token, badge, slot) to `pid`, which waits on
/// `ep` (`Kernel::give`), and runs it.
#[inline(always)]
fn deliver(k: &mut Kernel, ep: u16, pid: u16, message: (u64, u64, u64, u32)) -> ! {
    k.current = Some(pid);
    match k.give(ep, pid, message) {
        Some(p) => super::sched::enter(p),
        None => super::sched::run(),
    }
}

/// The running process made a CALL (the system-call entry saw its
/// number): the fast path [`call`]; back to the entry, nothing changed, for
/// the general path.
pub extern "C" fn call_trap() {
    let k = super::kernel();
    if let (Some(pid), true) = (k.current, ON.load(Ordering::Relaxed)) {
        call(k, pid);
    }
}

/// The running process made a REPLY_RECV with `token`, not a vCPU's (the
/// system-call entry saw bit 63 clear): the fast path [`answer_caller`] for
/// a process's token (0 answers nobody: a receive loop's first wait); back
/// to the entry, nothing changed, for the general path.
pub extern "C" fn answer_trap(token: u64) {
    let k = super::kernel();
    if let (Some(pid), true, (Sender::Process(caller), seq)) =
        (k.current, ON.load(Ordering::Relaxed), untoken(token))
        && token != 0
    {
        answer_caller(k, pid, caller, seq);
    }
}

/// The running process made a REPLY_RECV answering a vCPU (the
/// system-call entry saw its number and the token's bit 63 in `frame`, the
/// process's own): the fast paths [`answer_vcpu`] and [`forward`], else
/// `sched::user_trap`.
pub extern "C" fn vcpu_trap(frame: *mut TrapFrame) -> ! {
    let k = super::kernel();
    if let (Some(pid), true) = (k.current, ON.load(Ordering::Relaxed))
        && let Some(p) = k.processes[usize::from(pid)].as_ref()
    {
        let (rdi, rdx) = (p.frame.rdi, p.frame.rdx);
        if let (Sender::Vcpu(slot), seq) = untoken(rdi) {
            match rdx >> 32 {
                0 => answer_vcpu(k, pid, slot, seq),
                _ => forward(k, pid, slot, seq, true),
            };
        }
    }
    super::sched::user_trap(frame)
}

/// The receive half of a REPLY_RECV on `mask`: true if every handle is one
/// to receive on and nothing is there yet. At once when `mask` was found so
/// and nothing has stirred since (`Process::quiet`); else in one pass, in
/// which each object learns that `pid` waits on it: a hint, harmless if the
/// shortcut is not taken (see `ipc`).
#[inline(always)]
fn nothing_to_receive(k: &mut Kernel, pid: u16, mask: u64) -> bool {
    let Kernel {
        processes,
        endpoints,
        notifications,
        epoch,
        ..
    } = &mut *k;
    let Some(p) = processes[usize::from(pid)].as_mut() else {
        return false;
    };
    if mask == 0 || p.quiet == (mask, *epoch) {
        return mask != 0;
    }
    // (A closed endpoint is opened again by the general path.)
    let none =
        note_waiting(p, pid, mask, endpoints, notifications, epoch) == Ok((false, false, false));
    if none {
        p.quiet = (mask, *epoch);
    }
    none
}

/// The answer of a REPLY_RECV by `p` where it lies, and where the next
/// message goes when it is an exit (`Wait::Recv::exit_buf`), if the answer
/// lies in one page: its buffer is translated with it (usually the same
/// page). The wait itself is [`next_wait`], made where it is stored (its
/// words are not kept across the checks between).
#[inline(always)]
fn answer_and_wait(p: &Process, len: u64) -> Option<(&'static [u8], u64)> {
    let f = &p.frame;
    if len > MAX_MESSAGE as u64 {
        return None;
    }
    let (at, next) =
        p.space
            .as_ref()?
            .answer_and_buffer(f.rsi, len as usize, f.r8, EXIT_MESSAGE_MAX, 0)?;
    let exit_buf = if f.r9 >= EXIT_MESSAGE_MAX as u64 {
        next
    } else {
        0
    };
    // Safety: `at` is the direct-map address of `len` bytes the service
    // may read; they are only read (an answer to a process is copied with
    // `copy`, which allows the two to overlap in a shared frame), and only
    // before the service runs again.
    let bytes = unsafe { core::slice::from_raw_parts(at, len as usize) };
    Some((bytes, exit_buf))
}

/// The receive half of a REPLY_RECV by `p` (its mask, buffer and capacity
/// in R10, R8, R9), with `exit_buf` from [`answer_and_wait`].
#[inline(always)]
fn next_wait(p: &Process, exit_buf: u64) -> Wait {
    let f = &p.frame;
    Wait::Recv {
        mask: f.r10,
        buf: f.r8,
        cap: f.r9,
        exit_buf,
    }
}

/// REPLY_RECV answering the exit of domain slot `slot`'s vCPU.
#[inline(always)]
fn answer_vcpu(k: &mut Kernel, pid: u16, slot: u16, seq: u32) -> Option<()> {
    let p = k.processes[usize::from(pid)].as_ref()?;
    let d = k.domains.get(usize::from(slot))?.as_ref()?;
    if !d.held_by(pid, seq) || d.state != DomainState::Running {
        return None;
    }
    let (bytes, exit_buf) = answer_and_wait(p, p.frame.rdx)?;
    // A plain answer, or one that also moves the vCPU to a view that
    // exists (the altp2m service's answer to a view switch).
    let (advance, with_regs, eptp) = plain_shape(bytes)
        .map(|(advance, with_regs)| (advance, with_regs, None))
        .or_else(|| {
            let (advance, with_regs, view) = plain_view_shape(bytes)?;
            Some((advance, with_regs, Some((view, d.views.eptp(view).ok()?))))
        })?;
    // A forwarded exit's holder answers plainly or not here (the general
    // path refuses it).
    if d.exit_restricted && (advance || with_regs) {
        return None;
    }
    match d.vcpu.as_ref() {
        Some(v) if v.state == VcpuState::Runnable && v.load().is_ok() => {}
        _ => return None,
    }
    let mask = p.frame.r10;
    if !nothing_to_receive(k, pid, mask) || !k.count_hand_off() {
        return None;
    }
    // Everything holds: the service waits (first: then its wait need not
    // be kept across the answer's application), the answer is applied.
    let p = k.processes[usize::from(pid)].as_mut()?;
    p.state = State::Blocked(next_wait(p, exit_buf));
    let d = k.domains[usize::from(slot)].as_mut()?;
    (d.awaiting_reply, d.exit_restricted, d.exit_server) = (false, false, None);
    let v = d.vcpu.as_mut()?;
    if with_regs && let Some(r) = plain_regs(bytes) {
        r.apply(&mut v.regs);
    }
    v.resume_plain(advance);
    if let Some((view, eptp)) = eptp {
        v.set_view(view, eptp);
    }
    k.current = None;
    let others_waiting = !k.ready.is_empty();
    if crate::vm::run_loaded(k, slot, others_waiting) {
        crate::vm::run_vcpu(k, slot);
    }
    super::sched::run()
}

/// REPLY_RECV forwarding the exit of domain slot `slot`'s vCPU, which
/// `pid` holds, to the endpoint of its handle `(rdx >> 32) - 1`, its
/// answer bytes the message, as if the vCPU had called it: the receiver
/// holds the exit then, restricted to a plain answer (docs/ipc.md). Only to
/// a receiver that waits now with nothing queued (no forwarded message is
/// ever stored), else `None`, nothing changed. Both paths' (`fastpath=off`
/// too): with `run` (the fast path), only if `pid` then has nothing to
/// receive, and the receiver runs at once (no return); without, the
/// receiver is made ready and the general path's receive follows.
#[inline(never)]
pub fn forward(k: &mut Kernel, pid: u16, slot: u16, seq: u32, run: bool) -> Option<()> {
    let p = k.processes[usize::from(pid)].as_ref()?;
    let d = k.domains.get(usize::from(slot))?.as_ref()?;
    if !d.held_by(pid, seq) {
        return None;
    }
    let len = p.frame.rdx & 0xffff_ffff;
    let (ep, badge, receiver, at, to) = receiver_of(k, pid, (p.frame.rdx >> 32) - 1, len)?;
    let p = k.processes[usize::from(pid)].as_ref()?;
    let (bytes, exit_buf) = answer_and_wait(p, len)?;
    let mask = p.frame.r10;
    if run && (!nothing_to_receive(k, pid, mask) || !k.count_hand_off()) {
        return None;
    }
    // Everything holds: the message goes to the receiver, the exit is its.
    // Safety: as in `call`: `to` takes `len` bytes the receiver may write.
    unsafe { platform::copy::copy_message(bytes.as_ptr(), to, bytes.len()) };
    let d = k.domains[usize::from(slot)].as_mut()?;
    (d.exit_server, d.exit_restricted) = (Some(receiver), true);
    let message = (len, token(Sender::Vcpu(slot), seq), badge, at);
    if run {
        let p = k.processes[usize::from(pid)].as_mut()?;
        p.state = State::Blocked(next_wait(p, exit_buf));
        deliver(k, ep, receiver, message)
    }
    k.give(ep, receiver, message)?;
    k.make_ready_next(super::Runnable::Process(receiver));
    Some(())
}

/// The receiver of a message of `len` bytes from `pid` through its handle
/// `handle` (CALL right): the endpoint, the handle's badge, the receiver
/// (waiting, nobody queued before), the handle it waits through and where
/// the message goes; `None` for the general path.
#[inline(always)]
fn receiver_of(
    k: &Kernel,
    pid: u16,
    handle: u64,
    len: u64,
) -> Option<(u16, u64, u16, u32, *mut u8)> {
    let p = k.processes[usize::from(pid)].as_ref()?;
    // (Its fields read where they lie: a copy of the whole `Cap` is put
    // together byte by byte.)
    let Some(Cap {
        object: Object::Endpoint { id, generation },
        rights: r,
        badge,
    }) = p.handles.get(usize::try_from(handle).ok()?)?
    else {
        return None;
    };
    let (ep, generation, badge) = (*id, *generation, *badge);
    if r & rights::CALL == 0 || len > MAX_MESSAGE as u64 {
        return None;
    }
    let e = k.endpoints[usize::from(ep)].as_ref()?;
    let (receiver, slot) = (e.waiting?, e.waiting_slot);
    if e.generation != generation || !e.queue.is_empty() || receiver == pid {
        return None;
    }
    // The hint holds: the receiver waits in RECV, through the handle the
    // hint names, on this endpoint, with room for the message; where an
    // exit would go, a short message goes too.
    let q = k.processes[usize::from(receiver)].as_ref()?;
    let to = match receives(q, slot, ep, len)? {
        (_, at) if !at.is_null() && len <= EXIT_MESSAGE_MAX as u64 => at,
        (buf, _) => q.space.as_ref()?.in_one_page(buf, len as usize, true)?,
    };
    Some((ep, badge, receiver, slot, to))
}

/// REPLY_RECV answering the call of process `caller`.
#[inline(never)]
fn answer_caller(k: &mut Kernel, pid: u16, caller: u16, seq: u32) -> Option<()> {
    let p = k.processes[usize::from(pid)].as_ref()?;
    let (bytes, exit_buf) = answer_and_wait(p, p.frame.rdx)?;
    let mask = p.frame.r10;
    let c = k.processes.get(usize::from(caller))?.as_ref()?;
    let (reply_buf, reply_cap, reply_at) = c.awaiting_answer(seq, pid)?;
    if bytes.len() as u64 > reply_cap {
        return None;
    }
    let to = match reply_at {
        0 => c
            .space
            .as_ref()?
            .in_one_page(reply_buf, bytes.len(), true)?,
        at => at as *mut u8,
    };
    if !nothing_to_receive(k, pid, mask) || !k.count_hand_off() {
        return None;
    }
    // Everything holds: the answer goes to the caller, the server waits.
    // Safety: `to` is the direct-map address of `bytes.len()` bytes the
    // caller may write; `copy` allows them to overlap the answer (a frame
    // both map).
    unsafe { platform::copy::copy_message(bytes.as_ptr(), to, bytes.len()) };
    let p = k.processes[usize::from(pid)].as_mut()?;
    p.state = State::Blocked(next_wait(p, exit_buf));
    let c = k.processes[usize::from(caller)].as_mut()?;
    c.frame.rax = SysError::Ok as u64;
    c.frame.rdi = bytes.len() as u64;
    c.state = State::Ready;
    k.current = Some(caller);
    super::sched::enter(c)
}

/// CALL: if the endpoint's receiver waits with nothing queued before this
/// call, copies the message into its buffer, makes the caller wait for the
/// answer, and runs the receiver (no return). Returns, having changed
/// nothing, otherwise (a refusal, a dead server, a queue, an error for the
/// receiver: the general path).
#[inline(never)]
fn call(k: &mut Kernel, pid: u16) -> Option<()> {
    let f = &k.processes[usize::from(pid)].as_ref()?.frame;
    let (handle, len) = (f.rdi, f.rdx);
    let (ep, badge, receiver, slot, to) = receiver_of(k, pid, handle, len)?;
    // The message and the reply buffer: one translation when they share a
    // page (a client's buffers do). (Their registers read here, not kept
    // across the receiver's checks.)
    let p = k.processes[usize::from(pid)].as_ref()?;
    let (va, reply_buf, reply_cap) = (p.frame.rsi, p.frame.r10, p.frame.r8);
    let (from, reply_at) =
        p.space
            .as_ref()?
            .answer_and_buffer(va, len as usize, reply_buf, reply_cap as usize, 1)?;
    if !k.count_hand_off() {
        return None;
    }
    // Everything holds: the message goes to the receiver, the caller waits.
    // Safety: `from` and `to` are the direct-map addresses of `len` bytes
    // the caller may read and the receiver may write; `copy` allows them to
    // overlap (a frame both map).
    unsafe { platform::copy::copy_message(from, to, len as usize) };
    let p = k.processes[usize::from(pid)].as_mut()?;
    p.seq = p.seq.wrapping_add(1);
    p.state = State::Blocked(Wait::Call {
        ep,
        handle: handle as u32,
        reply_buf,
        reply_cap,
        reply_at,
        seq: p.seq,
        server: Some(receiver),
    });
    let token = token(Sender::Process(pid), p.seq);
    deliver(k, ep, receiver, (len, token, badge, slot))
}
