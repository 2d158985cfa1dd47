//! Exits as IPC: a vCPU's exit becomes a call on its exit (or violation)
//! endpoint, made by the kernel on the vCPU's behalf; the reply says how to
//! resume. The kernel only carries messages and applies answers here: what
//! an exit means is the handler's business.

use super::vcpu::VcpuState;
use crate::sys::ipc::Sender;
use crate::sys::{Kernel, Runnable};
use ipc_schema::syscall::{DomainState, handle_name_str};
use ipc_schema::vmexit::{Exit, ExitKind, Inject, Then};
use platform::vmx::fields::{self, reason};

/// Sends domain slot `slot`'s pending exit to its handler; the vCPU waits.
pub fn to_handler(k: &mut Kernel, slot: u16) {
    let Some(d) = k.domains[usize::from(slot)].as_mut() else {
        return;
    };
    let (Some(raw), Some(v)) = (d.pending_raw.take(), d.vcpu.as_ref()) else {
        return;
    };
    if raw.vmx_failed() || raw.entry_failure() {
        return entry_failed(k, slot, raw);
    }
    // The message is encoded from this (and the vCPU's registers) when it
    // is delivered.
    let exit = match &mut d.pending {
        Some(e) => {
            v.decode_into(d.id, &raw, e);
            e
        }
        none => none.insert(v.decode(d.id, &raw)),
    };
    if raw.reason() == reason::PML_FULL
        && let Some(v) = d.vcpu.as_mut()
    {
        // The CPU moves on to the other buffer; this one is the handler's
        // until it answers. An event the exit interrupted is delivered again.
        v.reinject_interrupted_event();
        if let Some((buffer, entries)) = v.pml_swap() {
            exit.kind = ExitKind::PmlFull { buffer, entries };
        }
    }
    let kind = exit.kind;
    d.awaiting_reply = true;
    d.exit_seq = d.exit_seq.wrapping_add(1);
    let ep = match kind {
        ExitKind::EptViolation { gpa, allowed, .. }
            if !(allowed.read || allowed.write || allowed.execute) =>
        {
            d.no_access_endpoint(gpa)
        }
        ExitKind::EptViolation { .. } => d.violation_endpoint,
        ExitKind::PmlFull { .. } => d.pml_endpoint.unwrap_or(d.exit_endpoint),
        // (A p2m owner that cannot take it, held or gone, leaves the
        // hypercall to the exit handler to refuse.)
        ExitKind::Hypercall
            if super::p2m_hypercall(d)
                && k.endpoints[usize::from(d.violation_endpoint)]
                    .as_ref()
                    .is_some_and(|e| !e.closed) =>
        {
            d.violation_endpoint
        }
        ExitKind::MonitorTrap => {
            // The step is done: the flag goes, and the exit goes to whoever
            // asked for the step.
            if let Some(v) = d.vcpu.as_mut() {
                v.set_monitor_trap(&super::caps().0, false);
            }
            d.step_endpoint.take().unwrap_or(d.exit_endpoint)
        }
        _ => d.exit_endpoint,
    };
    d.last_endpoint = ep;
    if let Err(e) = k.send(ep, Sender::Vcpu(slot)) {
        unreachable_handler(k, slot, e);
    }
}

/// Domain slot `slot`'s exit cannot go to its handler (`why`: `NoServer`
/// when the service that handled it has ended): the domain stops, saying so.
#[cold]
pub fn unreachable_handler(k: &mut Kernel, slot: u16, why: ipc_schema::syscall::SysError) {
    let Some(d) = k.domains[usize::from(slot)].as_ref() else {
        return;
    };
    let exit = d.pending;
    defmt::error!(
        "domain {=u16}: its exit handler cannot be reached ({}); domain stopped",
        d.id,
        why
    );
    crash(k, slot, exit.as_ref());
}

/// VMLAUNCH/VMRESUME failed, or the entry failed its checks: the domain
/// stops, saying why.
#[cold]
fn entry_failed(k: &mut Kernel, slot: u16, raw: super::vcpu::RawExit) {
    let Some(d) = k.domains[usize::from(slot)].as_mut() else {
        return;
    };
    let Some(v) = d.vcpu.as_ref() else { return };
    if raw.vmx_failed() {
        defmt::error!("domain {=u16}: VM entry failed: {}", d.id, v.vmx_error);
        crash(k, slot, None);
        return;
    }
    let exit = v.decode(d.id, &raw);
    defmt::error!(
        "domain {=u16}: VM entry failed: {=str} (exit reason {=u16}, qualification {=u64:#x})",
        d.id,
        reason::name(raw.reason()),
        raw.reason(),
        v.qualification()
    );
    crash(k, slot, Some(&exit));
}

/// Applies the handler's reply to domain slot `slot`'s vCPU.
pub fn apply_reply(k: &mut Kernel, slot: u16, bytes: &[u8]) {
    let Some(d) = k.domains[usize::from(slot)].as_mut() else {
        return;
    };
    (d.awaiting_reply, d.exit_restricted, d.exit_server) = (false, false, None);
    let Some(reply) = ipc_schema::exitcodec::decode_reply(bytes) else {
        defmt::error!(
            "domain {=u16}: its exit handler's reply does not decode ({=usize} bytes); domain stopped",
            d.id,
            bytes.len()
        );
        crash_pending(k, slot);
        return;
    };
    let eptp = match reply.view.map(|view| (view, d.views.eptp(view))) {
        None => None,
        Some((view, Ok(eptp))) => Some((view, eptp)),
        Some((view, Err(_))) => {
            defmt::error!(
                "domain {=u16}: its exit handler asked to resume in view {=u16}, which does not exist; domain stopped",
                d.id,
                view
            );
            crash_pending(k, slot);
            return;
        }
    };
    let Some(v) = d.vcpu.as_mut() else { return };
    if v.load().is_err() {
        crash_pending(k, slot);
        return;
    }
    if let Some(Inject::Exception { vector, error_code }) = reply.response.inject {
        let protected = v.read(fields::GUEST_CR0) & 1 != 0;
        if let Err(why) = fields::inject::check(vector, error_code.is_some(), protected) {
            defmt::error!(
                "domain {=u16}: its exit handler asked to inject vector {=u8} ({}), which VM entry cannot deliver; domain stopped",
                d.id,
                vector,
                why
            );
            crash_pending(k, slot);
            return;
        }
    }
    if let Some(Inject::Interrupt { vector }) = reply.response.inject
        && (vector < 32 || !v.can_take_interrupt())
    {
        defmt::error!(
            "domain {=u16}: its exit handler asked to inject interrupt vector {=u8}, which the guest cannot take now (an exception vector, interrupts off or blocked, or an event of its own under way); domain stopped",
            d.id,
            vector
        );
        crash_pending(k, slot);
        return;
    }
    if let Some(regs) = reply.regs {
        regs.apply(&mut v.regs);
    }
    if let Some((view, eptp)) = eptp {
        v.set_view(view, eptp);
    }
    if reply.step {
        if !v.set_monitor_trap(&super::caps().0, true) {
            defmt::error!(
                "domain {=u16}: its handler asked for a single step, which this CPU cannot do; domain stopped",
                d.id
            );
            crash_pending(k, slot);
            return;
        }
        d.step_endpoint = Some(d.last_endpoint);
    }
    v.apply(&reply.response);
    if let Some(rip) = reply.rip {
        // Safety: the VMCS is current; any RIP is the guest's own business.
        unsafe { v.write(fields::GUEST_RIP, rip) };
    }
    match reply.response.then {
        Then::Resume => k.make_ready_next(Runnable::Vcpu(slot)),
        Then::ResumeUntil { window, deadline } => {
            v.deadline = deadline;
            super::clamp_to_deadline(v);
            if !v.set_window(&super::caps().0, window) {
                defmt::error!(
                    "domain {=u16}: its handler asked for an interrupt window, which this CPU cannot give; domain stopped",
                    d.id
                );
                crash_pending(k, slot);
                return;
            }
            k.make_ready_next(Runnable::Vcpu(slot));
        }
        Then::BlockUntil { deadline } => {
            // It waits without running; `super::wake_due` sends it a
            // `Deadline` exit once the TSC is there.
            v.deadline = deadline;
            v.state = VcpuState::Blocked;
            super::wake_at(deadline);
        }
        Then::Block => {
            // A wait with no deadline: nothing could ever wake the vCPU
            // (its handler answers `BlockUntil` where something can).
            v.state = VcpuState::Blocked;
            let id = d.id;
            defmt::error!(
                "domain {=u16} halted with nothing to wake it (HLT at {=u64:#x}); stopped",
                id,
                d.pending.map_or(0, |e| e.rip)
            );
            end(k, slot, DomainState::Crashed, 0);
        }
        Then::Exit { status } => {
            let name = handle_name_str(&d.name);
            if status == 0 {
                defmt::info!("domain {=u16} ({=str}) exited with status 0", d.id, name);
            } else {
                defmt::warn!(
                    "domain {=u16} ({=str}) exited with status {=u32}",
                    d.id,
                    name,
                    status
                );
            }
            end(k, slot, DomainState::Exited, status);
        }
        Then::Crash => crash_pending(k, slot),
    }
}

/// Stops a domain, reporting the exit its handler was answering.
#[cold]
fn crash_pending(k: &mut Kernel, slot: u16) {
    let exit = k.domains[usize::from(slot)]
        .as_ref()
        .and_then(|d| d.pending);
    crash(k, slot, exit.as_ref());
}

/// Ends a domain's run and tells whoever watches domains.
pub fn end(k: &mut Kernel, slot: u16, state: DomainState, status: u32) {
    if let Some(d) = k.domains[usize::from(slot)].as_mut() {
        d.state = state;
        d.exit_status = status;
        if let Some(v) = d.vcpu.as_mut() {
            v.state = VcpuState::Stopped;
            // It never runs again: on the host p2m, whose tables stay.
            if v.load().is_ok()
                && let Ok(eptp) = d.views.eptp(0)
            {
                v.set_view(0, eptp);
            }
        }
        // The alternate views' tables go back at once (the host p2m and
        // the RAM stay for a look at the memory until it is destroyed).
        let freed = d.views.destroy_alternates();
        if freed > 0 {
            defmt::info!(
                "domain {=u16}: its {=usize} alternate view(s) freed ({=u32} EPT tables still in use)",
                d.id,
                freed,
                d.views.tables.used
            );
        }
    }
    k.unready(Runnable::Vcpu(slot));
    for (n, bit) in k.domain_watch.into_iter().flatten() {
        k.notify(n, bit);
    }
}

/// Stops a domain and reports its vCPU's state.
pub fn crash(k: &mut Kernel, slot: u16, exit: Option<&Exit>) {
    if let Some(d) = k.domains[usize::from(slot)].as_mut()
        && let Some(v) = d.vcpu.as_mut()
        && v.load().is_ok()
    {
        let r = &v.regs;
        defmt::error!(
            "domain {=u16} ({=str}) crashed at rip {=u64:#x} in view {=u16}: rsp {=u64:#x} rflags {=u64:#x} cr0 {=u64:#x} cr3 {=u64:#x} cr4 {=u64:#x} efer {=u64:#x}",
            d.id,
            handle_name_str(&d.name),
            v.read(fields::GUEST_RIP),
            exit.map_or(0, |e| e.view),
            v.read(fields::GUEST_RSP),
            v.read(fields::GUEST_RFLAGS),
            v.read(fields::GUEST_CR0),
            v.read(fields::GUEST_CR3),
            v.read(fields::GUEST_CR4),
            v.read(fields::GUEST_IA32_EFER)
        );
        defmt::error!(
            "domain {=u16} registers: rax {=u64:#x} rbx {=u64:#x} rcx {=u64:#x} rdx {=u64:#x} rsi {=u64:#x} rdi {=u64:#x} rbp {=u64:#x}",
            d.id,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp
        );
    }
    end(k, slot, DomainState::Crashed, 0);
}
