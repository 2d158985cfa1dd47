//! The fast paths: the two transitions of every exit a service handles,
//! taken in one straight run when the usual conditions hold (as seL4 does
//! for call and reply-receive).
//!
//! - [`exit`]: a vCPU's exit goes to its handler, which waits in RECV with
//!   nothing queued before it. The exit is encoded straight into the
//!   handler's receive buffer and the handler runs at once.
//! - [`reply_recv`]: the handler answers the exit with a plain answer
//!   (resume, perhaps with new registers: `exitcodec::plain_reply`) and
//!   waits again, with nothing there yet. The answer is applied and the
//!   vCPU entered at once.
//!
//! Each checks every condition first and changes nothing unless all hold;
//! otherwise it returns and the caller takes the general path
//! (`exits::to_handler`, `syscall::dispatch`), which has the same effect in
//! more steps and handles every other case (a queue, an error, a view
//! switch, a single step, the end of a domain...). The scheduling is the
//! general path's too: what runs is what `Kernel::make_ready_next` would
//! hand off to, and the hand-off streak is counted the same way.
//!
//! The kernel option `fastpath=off` turns both off, so that the boot tests
//! can show that the general path gives the same results.

use super::Kernel;
use super::caps::{Cap, Object};
use super::ipc::{Sender, bits, token, untoken};
use super::process::{State, Wait};
use crate::vm::vcpu::VcpuState;
use core::sync::atomic::{AtomicBool, Ordering};
use ipc_schema::exitcodec::{EXIT_MESSAGE_MAX, encode_exit, plain_regs, plain_shape};
use ipc_schema::syscall::{DomainState, MAX_MESSAGE, SysError, nr, rights};
use ipc_schema::vmexit::{ExitRegs, Response, Then};
use platform::vmx::fields::reason;

/// Whether the fast paths are taken (kernel option `fastpath`).
static ON: AtomicBool = AtomicBool::new(true);

/// Reads the kernel option `fastpath` (`on`, the default, or `off`).
pub fn configure(option: Option<&str>) {
    match option {
        None | Some("on") => {}
        Some("off") => {
            ON.store(false, Ordering::Relaxed);
            defmt::info!("IPC: fast paths off (fastpath=off): every exit takes the general path");
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
pub fn exit(k: &mut Kernel, slot: u16) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let Some(d) = k.domains[usize::from(slot)].as_ref() else {
        return;
    };
    let Some(raw) = d.pending_raw else { return };
    if raw.vmx_failed() || raw.entry_failure() || d.vcpu.is_none() {
        return;
    }
    // Single steps come back to whoever asked (the general path knows).
    let ep = match raw.reason() {
        reason::EPT_VIOLATION => d.violation_endpoint,
        reason::MONITOR_TRAP_FLAG | reason::EXCEPTION_OR_NMI => return,
        _ => d.exit_endpoint,
    };
    let Some(e) = k.endpoints[usize::from(ep)].as_ref() else {
        return;
    };
    let (Some(pid), handle) = (e.waiting, e.waiting_slot) else {
        return;
    };
    if !e.queue.is_empty() {
        return;
    }
    let Some(p) = k.processes[usize::from(pid)].as_ref() else {
        return;
    };
    // The hint holds: the handler waits in RECV, through the handle the
    // hint names, on this endpoint.
    let State::Blocked(Wait::Recv { mask, exit_buf, .. }) = p.state else {
        return;
    };
    match p.handles.get(handle as usize).copied().flatten() {
        Some(Cap {
            object: Object::Endpoint { id, .. },
            ..
        }) if id == ep && handle < 64 && mask & (1 << handle) != 0 && exit_buf != 0 => {}
        _ => return,
    }
    let at = exit_buf as *mut u8;
    if !k.count_hand_off() {
        return;
    }
    // Everything holds: from here on, the exit is delivered.
    let d = k.domains[usize::from(slot)]
        .as_mut()
        .expect("checked above");
    d.pending_raw = None;
    let v = d.vcpu.as_ref().expect("checked above");
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
    let seq = d.exit_seq;
    let p = k.processes[usize::from(pid)]
        .as_mut()
        .expect("checked above");
    p.frame.rax = SysError::Ok as u64;
    p.frame.rdi = len as u64;
    p.frame.rsi = token(Sender::Vcpu(slot), seq);
    p.frame.rdx = 0;
    p.frame.r10 = u64::from(handle);
    p.frame.r8 = 0;
    p.state = State::Ready;
    if let Some(e) = k.endpoints[usize::from(ep)].as_mut() {
        e.server = Some(pid);
        e.waiting = None;
    }
    super::sched::resume(k, pid)
}

/// Process `pid` made a REPLY_RECV system call (its registers in its
/// frame): if it answers a vCPU's exit plainly and nothing waits for it,
/// applies the answer, makes it wait, and runs the vCPU (no return).
/// Returns, having changed nothing, otherwise.
#[inline(always)]
pub fn reply_recv(k: &mut Kernel, pid: u16) {
    let Some(p) = k.processes[usize::from(pid)].as_ref() else {
        return;
    };
    let f = &p.frame;
    if f.rax != nr::REPLY_RECV || !ON.load(Ordering::Relaxed) {
        return;
    }
    let (token, va, len, mask, buf, cap) = (f.rdi, f.rsi, f.rdx, f.r10, f.r8, f.r9);
    let (Sender::Vcpu(slot), seq) = untoken(token) else {
        return;
    };
    let Some(d) = k.domains.get(usize::from(slot)).and_then(Option::as_ref) else {
        return;
    };
    if !d.awaiting_reply
        || d.exit_seq != seq
        || d.exit_server != Some(pid)
        || d.state != DomainState::Running
        || len > MAX_MESSAGE as u64
    {
        return;
    }
    let Some(space) = p.space.as_ref() else {
        return;
    };
    // The answer, and the buffer the next exit will go to (see
    // `Wait::Recv::exit_buf`): usually in one page, translated once.
    let Some((at, next)) = space.answer_and_buffer(va, len as usize, buf, EXIT_MESSAGE_MAX) else {
        return;
    };
    let exit_buf = if cap >= EXIT_MESSAGE_MAX as u64 {
        next
    } else {
        0
    };
    // Safety: `at` is the direct-map address of `len` bytes the service
    // may read, and nothing here writes to them.
    let bytes = unsafe { core::slice::from_raw_parts(at, len as usize) };
    let Some((advance, with_regs)) = plain_shape(bytes) else {
        return;
    };
    match d.vcpu.as_ref() {
        Some(v) if v.state == VcpuState::Runnable && v.load().is_ok() => {}
        _ => return,
    }
    // The receive half, in one pass: every handle one to receive on,
    // nothing there yet. Each object learns that `pid` waits on it: a hint,
    // harmless if the shortcut is not taken (see `ipc`).
    if mask == 0 {
        return;
    }
    let Kernel {
        processes,
        endpoints,
        notifications,
        ..
    } = &mut *k;
    let p = processes[usize::from(pid)].as_ref().expect("checked above");
    for h in bits(mask) {
        match p.handles.get(h as usize).copied().flatten() {
            Some(Cap {
                object: Object::Endpoint { id, .. },
                rights: r,
                ..
            }) if r & rights::RECEIVE != 0 => match endpoints[usize::from(id)].as_mut() {
                Some(e) if e.queue.is_empty() => {
                    e.waiting = Some(pid);
                    e.waiting_slot = h;
                }
                _ => return,
            },
            Some(Cap {
                object: Object::Notification(n),
                rights: r,
                ..
            }) if r & rights::WAIT != 0 => match notifications[usize::from(n)].as_mut() {
                Some(n) if n.bits == 0 => n.waiter = Some(pid),
                _ => return,
            },
            _ => return,
        }
    }
    if !k.count_hand_off() {
        return;
    }
    // Everything holds: the answer is applied, the service waits.
    let d = k.domains[usize::from(slot)]
        .as_mut()
        .expect("checked above");
    d.awaiting_reply = false;
    d.exit_server = None;
    let v = d.vcpu.as_mut().expect("checked above");
    if with_regs && let Some(r) = plain_regs(bytes) {
        r.apply(&mut v.regs);
    }
    v.apply(&Response {
        advance,
        inject: None,
        then: Then::Resume,
    });
    if let Some(p) = k.processes[usize::from(pid)].as_mut() {
        p.state = State::Blocked(Wait::Recv {
            mask,
            buf,
            cap,
            exit_buf,
        });
    }
    k.current = None;
    let others_waiting = !k.ready.is_empty();
    if crate::vm::run_loaded(k, slot, others_waiting) {
        crate::vm::run_vcpu(k, slot);
    }
    super::sched::run()
}
