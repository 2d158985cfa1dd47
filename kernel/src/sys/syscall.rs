//! The system calls (ABI: `ipc_schema::syscall`).
//!
//! Every call checks its handles first ([`Kernel::cap`]); a refusal is
//! logged with the service's name, the call and the handle, and returned as
//! a `SysError`. Nothing a service passes (pointers, lengths, encoded
//! argument blocks) is trusted: user memory is reached only through the
//! service's own page tables.

use super::caps::{
    Cap, CapError, FramesKind, FramesObject, Handles, Object, Scope, free_slot, right_name,
};
use super::ipc::{Endpoint, Notification, Sender, bits, receivable};
use super::process::{Process, State, Wait};
use super::{Kernel, Runnable};
use crate::vm::domain::Domain;
use ipc_schema::ipc::BoundedVec;
use ipc_schema::syscall::layout::{MAP_BASE, MAP_END};
use ipc_schema::syscall::{
    DomainOp, DomainState, EptOp, EptOpError, EptResult, Grant, HandleName, MAX_EPT_OPS,
    MAX_HANDLES, MAX_MESSAGE, ObjectKind, SpawnSpec, SysError, VcpuOp, VcpuSpec, nr, regs, rights,
};
use ipc_schema::wire::{MAX_FRAME, Record};
use platform::PAGE_SIZE;
use platform::ept::PageSize;
use platform::span;

/// What happens to the caller after its call.
pub enum Outcome {
    /// It goes on with the results in its registers.
    Continue,
    /// It waits (or gave way): run someone else.
    Reschedule,
}

type Result<T> = core::result::Result<T, SysError>;

/// Results in RDI, RSI, RDX.
enum Done {
    Values([u64; 3]),
    /// Values with a fourth, in R10 (DOMAIN_INFO's birth).
    Values4([u64; 4]),
    Blocked,
    /// Returned, but let others run first (YIELD, EXIT, HALT).
    GiveWay,
}

use Done::Values;

/// Handles the system call in process `pid`'s saved registers.
pub fn dispatch(k: &mut Kernel, pid: u16) -> Outcome {
    let Some(p) = k.processes[usize::from(pid)].as_ref() else {
        return Outcome::Reschedule;
    };
    let f = &p.frame;
    let a = [f.rdi, f.rsi, f.rdx, f.r10, f.r8, f.r9];
    let number = f.rax;
    let result = call(k, pid, number, a);
    let Some(p) = k.processes[usize::from(pid)].as_mut() else {
        return Outcome::Reschedule;
    };
    match result {
        Ok(Values(v)) => {
            p.frame.rax = SysError::Ok as u64;
            (p.frame.rdi, p.frame.rsi, p.frame.rdx) = (v[0], v[1], v[2]);
            Outcome::Continue
        }
        Ok(Done::Values4(v)) => {
            p.frame.rax = SysError::Ok as u64;
            (p.frame.rdi, p.frame.rsi, p.frame.rdx, p.frame.r10) = (v[0], v[1], v[2], v[3]);
            Outcome::Continue
        }
        Ok(Done::Blocked) => Outcome::Reschedule,
        Ok(Done::GiveWay) => {
            p.frame.rax = SysError::Ok as u64;
            Outcome::Reschedule
        }
        Err(e) => {
            p.frame.rax = e as u64;
            Outcome::Continue
        }
    }
}

/// Logs a refused handle check and turns it into the error.
fn refuse(k: &Kernel, pid: u16, call: &'static str, e: CapError) -> SysError {
    if !k.loud(pid, call) {
        return e.error;
    }
    match e.error {
        SysError::MissingRight => defmt::warn!(
            "service {=str}: {=str} refused: handle {=u32} lacks the right `{=str}`",
            k.process_name(pid),
            call,
            e.handle,
            right_name(e.needed)
        ),
        SysError::OutOfScope => defmt::warn!(
            "service {=str}: {=str} refused: handle {=u32} is for another domain, view or vCPU",
            k.process_name(pid),
            call,
            e.handle
        ),
        SysError::WrongKind => defmt::warn!(
            "service {=str}: {=str} refused: handle {=u32} is another kind of object",
            k.process_name(pid),
            call,
            e.handle
        ),
        _ => defmt::warn!(
            "service {=str}: {=str} refused: no handle {=u32}",
            k.process_name(pid),
            call,
            e.handle
        ),
    }
    e.error
}

macro_rules! cap {
    ($k:expr, $pid:expr, $call:expr, $h:expr, $kind:expr, $right:expr) => {
        $k.cap($pid, $h, $kind, $right)
            .map_err(|e| refuse($k, $pid, $call, e))?
    };
}

/// `cap!` for the kinds whose object is one number (notifications, frames,
/// processes, IRQ lines, IoSpaces): that number.
macro_rules! id_cap {
    ($k:expr, $pid:expr, $call:expr, $h:expr, $kind:ident, $right:expr) => {
        match cap!($k, $pid, $call, $h, ObjectKind::$kind, $right).object {
            Object::$kind(id) => id,
            _ => return Err(SysError::WrongKind),
        }
    };
}

/// [`Kernel::domain_cap`], refusing (and logging) like `cap!`.
macro_rules! dcap {
    ($k:expr, $pid:expr, $call:expr, $h:expr, $domain:expr, $scope:expr, $right:expr) => {
        $k.domain_cap($pid, $h, $domain, $scope, $right)
            .map_err(|e| refuse($k, $pid, $call, e))?
    };
}

/// The PCI function (bus, device, function) of a Device handle with the
/// `device` right, refusing (and logging) like `cap!`; `Unsupported` for a
/// segment other than 0.
fn device_source(k: &mut Kernel, pid: u16, call: &'static str, h: u64) -> Result<u16> {
    let d = cap!(k, pid, call, h, ObjectKind::Device, rights::DEVICE);
    match d.object {
        Object::Device { segment: 0, source } => Ok(source),
        _ => Err(SysError::Unsupported),
    }
}

/// The IPC calls, the ones on every message's path; the rest are in
/// [`other`], kept apart so that its buffers do not make this path's stack
/// frame large (a frame over a page is probed page by page on entry).
fn call(k: &mut Kernel, pid: u16, number: u64, a: [u64; 6]) -> Result<Done> {
    match number {
        nr::CALL => ipc_call(k, pid, a),
        nr::RECV => recv(k, pid, a[0], a[1], a[2]),
        nr::REPLY => {
            reply(k, pid, a[0], a[1], a[2])?;
            Ok(Values([0; 3]))
        }
        // The high half of the length: a forward (docs/ipc.md).
        nr::REPLY_RECV if a[2] >> 32 != 0 => forward(k, pid, a),
        nr::REPLY_RECV => {
            if a[0] != 0 {
                // A reply that cannot be delivered (the caller died) must not
                // keep the server from receiving.
                let _ = reply(k, pid, a[0], a[1], a[2]);
            }
            recv(k, pid, a[3], a[4], a[5])
        }
        _ => other(k, pid, number, a),
    }
}

/// REPLY_RECV forwarding the exit of token `a[0]` (docs/ipc.md) on the
/// general path. A refusal changes nothing: the exit is still the
/// caller's and the receive half is not begun, so that the caller may
/// answer the exit itself (the runtime's `Service::forward_refused`). Each
/// refusal names what was wrong: `BadToken` (the caller holds no such
/// exit), `MessageTooLong`, `BadAddress` (the message is not readable in
/// one page), the handle's or the receive mask's own refusal, and `Busy`
/// (the receiver does not wait, or restarted since the handle last
/// called it).
fn forward(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    let h = (a[2] >> 32) - 1;
    let len = a[2] & 0xffff_ffff;
    let c = cap!(
        k,
        pid,
        "REPLY_RECV (forward)",
        h,
        ObjectKind::Endpoint,
        rights::CALL
    );
    let (Sender::Vcpu(slot), seq) = super::ipc::untoken(a[0]) else {
        return Err(SysError::BadToken);
    };
    let held = k.domains.get(usize::from(slot)).and_then(Option::as_ref);
    if !held.is_some_and(|d| d.held_by(pid, seq)) {
        return Err(SysError::BadToken);
    }
    if len > MAX_MESSAGE as u64 {
        return Err(SysError::MessageTooLong);
    }
    let p = k.processes[usize::from(pid)].as_ref();
    let space = p.and_then(|p| p.space.as_ref());
    space
        .and_then(|s| s.in_one_page(a[1], len as usize, false))
        .ok_or(SysError::BadAddress)?;
    receive_mask(p.ok_or(SysError::NoSuchHandle)?, a[3])?;
    // A receiver that restarted since: refused this once (as CALL says
    // `Dead` once).
    if let Object::Endpoint { id, generation } = c.object
        && let Some(now) = k.endpoints[usize::from(id)].as_ref().map(|e| e.generation)
        && restarted(k, pid, h, generation, now)
    {
        return Err(SysError::Busy);
    }
    super::fastpath::forward(k, pid, slot, seq, false).ok_or(SysError::Busy)?;
    recv(k, pid, a[3], a[4], a[5])
}

#[inline(never)]
fn other(k: &mut Kernel, pid: u16, number: u64, a: [u64; 6]) -> Result<Done> {
    match number {
        nr::LOG => log(k, pid, a[0], a[1]),
        nr::NOTIFY => {
            let c = cap!(
                k,
                pid,
                "NOTIFY",
                a[0],
                ObjectKind::Notification,
                rights::SIGNAL
            );
            let Object::Notification(n) = c.object else {
                return Err(SysError::WrongKind);
            };
            k.notify(n, a[1]);
            Ok(Values([0; 3]))
        }
        nr::WAIT => wait(k, pid, a[0]),
        nr::YIELD => {
            k.make_ready(Runnable::Process(pid));
            Ok(Done::GiveWay)
        }
        nr::EXIT => {
            defmt::info!(
                "service {=str} exited with code {=u64}",
                k.process_name(pid),
                a[0]
            );
            let watcher = k.processes[usize::from(pid)].as_mut().and_then(|p| {
                p.exit_code = a[0];
                p.watcher
            });
            k.end(pid);
            if let Some((n, bit)) = watcher {
                k.notify(n, bit);
            }
            Ok(Done::Blocked)
        }
        nr::HANDLE_INFO => {
            let c = k.handle(pid, a[0]).ok_or(SysError::NoSuchHandle)?;
            Ok(Values([
                c.object.kind() as u64,
                u64::from(c.rights),
                c.badge,
            ]))
        }
        nr::HANDLE_CLOSE => {
            let p = k.processes[usize::from(pid)]
                .as_mut()
                .ok_or(SysError::NoSuchHandle)?;
            let slot = usize::try_from(a[0])
                .ok()
                .filter(|&i| i < p.handles.len() && p.handles[i].is_some())
                .ok_or(SysError::NoSuchHandle)?;
            p.handles[slot] = None;
            k.epoch += 1;
            Ok(Values([0; 3]))
        }
        nr::TIME => Ok(Values([
            crate::time::micros(),
            crate::time::tsc_hz().unwrap_or(0),
            0,
        ])),
        nr::FRAMES_MAP => frames_map(k, pid, a),
        nr::FRAMES_UNMAP => frames_unmap(k, pid, a[0], a[1]),
        nr::FRAMES_ALLOC => frames_alloc(k, pid, a[0], a[1], a[2]),
        nr::FRAMES_INFO => {
            let (_, f) = frames_of(k, pid, "FRAMES_INFO", a[0], 0)?;
            Ok(Values([f.count, f.len, 0]))
        }
        nr::ENDPOINT_CREATE | nr::NOTIFICATION_CREATE => {
            cap!(
                k,
                pid,
                "object creation",
                a[0],
                ObjectKind::System,
                rights::CREATE
            );
            let object = if number == nr::ENDPOINT_CREATE {
                let slot = free_slot(&k.endpoints)?;
                k.endpoints[slot] = Some(Endpoint::default());
                Object::Endpoint {
                    id: slot as u16,
                    generation: 0,
                }
            } else {
                let slot = free_slot(&k.notifications)?;
                k.notifications[slot] = Some(Notification::default());
                Object::Notification(slot as u16)
            };
            let h = k.install(
                pid,
                Cap {
                    object,
                    rights: rights::ALL,
                    badge: 0,
                },
            )?;
            Ok(Values([u64::from(h), 0, 0]))
        }
        nr::PROCESS_SPAWN => spawn(k, pid, a[0], a[1], a[2]),
        nr::PROCESS_RESTART => {
            let target = id_cap!(k, pid, "PROCESS_RESTART", a[0], Process, rights::SIGNAL);
            let elf = if a[1] == u64::from(u32::MAX) {
                None
            } else {
                let id = id_cap!(k, pid, "PROCESS_RESTART", a[1], Frames, rights::READ);
                Some(id)
            };
            match k.restart(target, elf) {
                Ok(generation) => Ok(Values([u64::from(generation), 0, 0])),
                Err(e) => {
                    defmt::warn!(
                        "service {=str}: PROCESS_RESTART failed: {}",
                        k.process_name(pid),
                        e
                    );
                    Err(SysError::BadArgument)
                }
            }
        }
        nr::PROCESS_KILL => {
            let target = id_cap!(k, pid, "PROCESS_KILL", a[0], Process, rights::SIGNAL);
            k.end(target);
            Ok(Values([0; 3]))
        }
        nr::PROCESS_STATUS => {
            let target = id_cap!(k, pid, "PROCESS_STATUS", a[0], Process, 0);
            let p = k.processes[usize::from(target)]
                .as_ref()
                .ok_or(SysError::NoSuchHandle)?;
            let state = match p.state {
                State::Faulted => 1,
                State::Ended => 2,
                _ => 0,
            };
            // Once it ended by itself: its exit code instead of the faults.
            let third = if state == 2 {
                p.exit_code
            } else {
                u64::from(p.faults)
            };
            Ok(Values([state, u64::from(p.generation), third]))
        }
        nr::FAULT_WATCH => {
            let target = id_cap!(k, pid, "FAULT_WATCH", a[0], Process, rights::SIGNAL);
            let note = id_cap!(k, pid, "FAULT_WATCH", a[1], Notification, rights::SIGNAL);
            let p = k.processes[usize::from(target)]
                .as_mut()
                .ok_or(SysError::NoSuchHandle)?;
            p.watcher = Some((note, a[2]));
            Ok(Values([0; 3]))
        }
        nr::HALT => {
            cap!(k, pid, "HALT", a[0], ObjectKind::System, rights::CREATE);
            k.halt = Some(a[1] as u8);
            Ok(Done::GiveWay)
        }
        nr::DOMAIN_CREATE => domain_create(k, pid, a),
        nr::DOMAIN_FORK => domain_fork(k, pid, a),
        nr::DOMAIN_MAP_RAM => domain_map_ram(k, pid, a),
        nr::DOMAIN_WRITE | nr::DOMAIN_READ => domain_memory(k, pid, number == nr::DOMAIN_WRITE, a),
        nr::FOREIGN_MAP => {
            let writable = a[5] != 0;
            let right = rights::READ | if writable { rights::WRITE } else { 0 };
            dcap!(k, pid, "FOREIGN_MAP", a[0], a[1], Scope::Domain, right);
            domain(k, a[1])?;
            let slot = a[1].wrapping_sub(1) as u16;
            k.foreign_map(pid, slot, (a[2], a[3], a[4], writable))?;
            Ok(Values([0; 3]))
        }
        nr::FOREIGN_UNMAP => {
            k.foreign_unmap(pid, a[0], a[1])?;
            Ok(Values([0; 3]))
        }
        nr::DOMAIN_GRANT => {
            dcap!(
                k,
                pid,
                "DOMAIN_GRANT",
                a[0],
                a[1],
                Scope::Domain,
                rights::VCPUS
            );
            domain(k, a[1])?;
            let slot = a[1].wrapping_sub(1) as u16;
            k.guest_grant(slot, a[2], a[3], a[4] != 0)?;
            Ok(Values([0; 3]))
        }
        nr::VCPU_CREATE => vcpu_create(k, pid, a),
        nr::DOMAIN_CONTROL => domain_control(k, pid, a),
        nr::DOMAIN_INFO => {
            dcap!(
                k,
                pid,
                "DOMAIN_INFO",
                a[0],
                a[1],
                Scope::Domain,
                rights::READ
            );
            let d = domain(k, a[1])?;
            let protected = if d.protected {
                ipc_schema::syscall::DOMAIN_INFO_PROTECTED
            } else {
                0
            };
            Ok(Done::Values4([
                d.state as u64,
                u64::from(d.exit_status) | u64::from(d.foreign_pages) << 32 | protected,
                d.ram_bytes,
                d.birth,
            ]))
        }
        nr::DOMAIN_WATCH => {
            cap!(
                k,
                pid,
                "DOMAIN_WATCH",
                a[0],
                ObjectKind::Domains,
                rights::READ
            );
            let note = id_cap!(k, pid, "DOMAIN_WATCH", a[1], Notification, rights::SIGNAL);
            // The same notification again changes its bit; else a free place.
            let at = k
                .domain_watch
                .iter()
                .position(|w| w.is_some_and(|(n, _)| n == note))
                .or_else(|| k.domain_watch.iter().position(Option::is_none))
                .ok_or(SysError::NoResources)?;
            k.domain_watch[at] = Some((note, a[2]));
            Ok(Values([0; 3]))
        }
        nr::CONSOLE => console(k, pid, a),
        nr::VIEW_CREATE => {
            dcap!(
                k,
                pid,
                "VIEW_CREATE",
                a[0],
                a[1],
                Scope::Domain,
                rights::VIEWS
            );
            let view = domain_mut(k, a[1])?
                .views
                .create()
                .map_err(|_| SysError::NoResources)?;
            Ok(Values([u64::from(view), 0, 0]))
        }
        nr::VIEW_DESTROY => {
            dcap!(
                k,
                pid,
                "VIEW_DESTROY",
                a[0],
                a[1],
                Scope::View(view_arg(a[2])?),
                rights::VIEWS
            );
            let view = view_arg(a[2])?;
            let d = domain_mut(k, a[1])?;
            // The view a vCPU runs on is in its VMCS (VMFUNC changes it
            // without an exit). When that cannot be read, the view may be
            // the one in use: refused, never destroyed on a guess.
            if let Some(v) = d.vcpu.as_ref() {
                let id = d.id;
                let active = v.load().map(|()| v.active_view());
                match active {
                    Ok(a) if a != view => {}
                    Ok(_) => {
                        defmt::warn!(
                            "service {=str}: VIEW_DESTROY refused: domain {=u16}'s vCPU runs on view {=u16}",
                            k.process_name(pid),
                            id,
                            view
                        );
                        return Err(SysError::Busy);
                    }
                    Err(e) => {
                        defmt::error!(
                            "service {=str}: VIEW_DESTROY refused: domain {=u16}'s vCPU state cannot be loaded ({}), so the view it runs on is unknown",
                            k.process_name(pid),
                            id,
                            e
                        );
                        return Err(SysError::Busy);
                    }
                }
            }
            domain_mut(k, a[1])?
                .views
                .destroy(view)
                .map_err(|_| SysError::BadArgument)?;
            Ok(Values([0; 3]))
        }
        nr::VIEW_SET_VISIBLE => {
            dcap!(
                k,
                pid,
                "VIEW_SET_VISIBLE",
                a[0],
                a[1],
                Scope::View(view_arg(a[2])?),
                rights::VIEWS
            );
            domain_mut(k, a[1])?
                .views
                .set_visible(view_arg(a[2])?, a[3] != 0)
                .map_err(|_| SysError::BadArgument)?;
            Ok(Values([0; 3]))
        }
        nr::EPT_OPS => ept_ops(k, pid, a),
        nr::VCPU_SET_VIEW => {
            dcap!(
                k,
                pid,
                "VCPU_SET_VIEW",
                a[0],
                a[1],
                Scope::Vcpu(view_arg(a[2])?),
                rights::VIEWS
            );
            let d = domain_mut(k, a[1])?;
            let view = view_arg(a[3])?;
            let eptp = d.views.eptp(view).map_err(|_| SysError::BadArgument)?;
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            v.set_view(view, eptp);
            Ok(Values([0; 3]))
        }
        nr::VCPU_CONTROL => vcpu_control(k, pid, a),
        nr::VCPU_INFO => {
            dcap!(
                k,
                pid,
                "VCPU_INFO",
                a[0],
                a[1],
                Scope::Vcpu(view_arg(a[2])?),
                rights::READ
            );
            let d = domain_mut(k, a[1])?;
            let v = d
                .vcpu
                .as_mut()
                .filter(|_| a[2] == 0)
                .ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            Ok(Values([u64::from(v.active_view()), v.exits, 0]))
        }
        nr::DOMAIN_WRITES => domain_writes(k, pid, a),
        nr::LIFTED_TAKE => lifted_take(k, pid, a),
        nr::VCPU_REGS => vcpu_regs(k, pid, a),
        nr::IO_IN | nr::IO_OUT => io(k, pid, number == nr::IO_OUT, a),
        nr::IO_OUT_BYTES => io_out_bytes(k, pid, a),
        nr::IRQ_BIND => {
            let note = id_cap!(k, pid, "IRQ_BIND", a[1], Notification, rights::SIGNAL);
            // The Iommu handle: the units' fault interrupt (IO-6).
            if k.cap(pid, a[0], ObjectKind::Iommu, rights::DEVICE).is_ok() {
                crate::iommu::IOMMU
                    .lock()
                    .as_ref()
                    .ok_or(SysError::Unsupported)?;
                super::irq::bind_faults(note, a[2]);
                defmt::info!(
                    "service {=str}: the IOMMU's fault interrupt notifies it (IO-6)",
                    k.process_name(pid)
                );
                return Ok(Values([0; 3]));
            }
            let irq = id_cap!(k, pid, "IRQ_BIND", a[0], Irq, rights::DEVICE);
            super::irq::bind(irq, note, a[2]).map_err(|_| SysError::Unsupported)?;
            Ok(Values([0; 3]))
        }
        nr::VM_FEATURES => {
            use ipc_schema::syscall::vm_features as vf;
            let bits = if crate::vm::available() {
                let (c, f) = crate::vm::caps();
                vf::VMX
                    | if f.vmfunc { vf::VMFUNC } else { 0 }
                    | if f.ve { vf::VE } else { 0 }
                    | if f.pml { vf::PML } else { 0 }
                    | if c.features.ept_execute_only {
                        vf::EXECUTE_ONLY
                    } else {
                        0
                    }
            } else {
                0
            };
            Ok(Values([bits, 0, 0]))
        }
        nr::DEVICE_RESET => {
            let source = device_source(k, pid, "DEVICE_RESET", a[0])?;
            let (how, wait) = crate::iommu::reset(source)?;
            if wait == 0 {
                defmt::info!(
                    "service {=str}: device 0000:{=u8:02x}:{=u8:02x}.{=u8} reset: {}",
                    k.process_name(pid),
                    (source >> 8) as u8,
                    ((source >> 3) & 31) as u8,
                    (source & 7) as u8,
                    how
                );
            }
            Ok(Values([how.code(), wait, 0]))
        }
        nr::DEVICE_CONFIG => {
            let source = device_source(k, pid, "DEVICE_CONFIG", a[0])?;
            match crate::iommu::config(source, a[1], a[2], a[3], a[4]) {
                Ok(v) => Ok(Values([u64::from(v), 0, 0])),
                Err(why) => {
                    defmt::warn!(
                        "service {=str}: DEVICE_CONFIG of device 0000:{=u8:02x}:{=u8:02x}.{=u8} (op {=u64}, offset {=u64:#x}, {=u64} bytes) refused: {}",
                        k.process_name(pid),
                        (source >> 8) as u8,
                        ((source >> 3) & 31) as u8,
                        (source & 7) as u8,
                        a[3],
                        a[1],
                        a[2],
                        why
                    );
                    Err(SysError::BadArgument)
                }
            }
        }
        nr::IOSPACE_CREATE
        | nr::IOSPACE_ATTACH
        | nr::IOSPACE_MAP
        | nr::IOSPACE_UNMAP
        | nr::IOMMU_FAULTS
        | nr::IOMMU_RMRR => iommu_call(k, pid, number, a),
        nr::HANDLE_DERIVE => {
            let c = k.handle(pid, a[0]).ok_or(SysError::NoSuchHandle)?;
            let object = match c.object {
                Object::IoPorts { base, count } => {
                    let limit = u64::from(base) + u64::from(count);
                    if a[2] == 0 || !span::within(a[1], a[2], u64::from(base), limit) {
                        return Err(SysError::BadArgument);
                    }
                    Object::IoPorts {
                        base: u16::try_from(a[1]).map_err(|_| SysError::BadArgument)?,
                        count: u16::try_from(a[2]).map_err(|_| SysError::BadArgument)?,
                    }
                }
                Object::Irq(super::caps::ALL_LINES) if a[1] < 16 => Object::Irq(a[1] as u8),
                Object::Domains if a[1] == ObjectKind::Domain as u64 => {
                    // The domain must exist: a handle names something real.
                    Object::Domain(domain(k, a[2])?.id)
                }
                Object::Domain(d) if a[1] == ObjectKind::View as u64 => Object::View {
                    domain: d,
                    view: view_arg(a[2])
                        .ok()
                        .filter(|v| *v < 512)
                        .ok_or(SysError::BadArgument)?,
                },
                Object::Domain(d) if a[1] == ObjectKind::Vcpu as u64 => Object::Vcpu {
                    domain: d,
                    vcpu: view_arg(a[2])
                        .ok()
                        .filter(|v| *v < 8)
                        .ok_or(SysError::BadArgument)?,
                },
                Object::Iommu => derive_device(k, pid, a[1], a[2])?,
                Object::Device { segment: 0, source }
                    if a[1] == ObjectKind::Frames as u64 && c.rights & rights::DEVICE != 0 =>
                {
                    derive_bar(k, pid, source, a[2])?
                }
                _ => return Err(SysError::BadArgument),
            };
            // A derived handle never has more rights than its parent (a
            // device's BAR: mapping it is what `device` allows).
            let parent = match (c.object, object) {
                (Object::Device { .. }, Object::Frames(_)) => rights::READ | rights::WRITE,
                _ => c.rights,
            };
            let rights = if a[3] == 0 {
                parent
            } else {
                parent & a[3] as u32
            };
            let h = k.install(
                pid,
                Cap {
                    object,
                    rights,
                    badge: c.badge,
                },
            )?;
            Ok(Values([u64::from(h), 0, 0]))
        }
        _ => {
            if k.loud(pid, "unknown system call") {
                defmt::warn!(
                    "service {=str}: unknown system call {=u64}",
                    k.process_name(pid),
                    number
                );
            }
            Err(SysError::UnknownCall)
        }
    }
}

/// A device handle from the Iommu handle: `segment`, `source` (bus << 8 |
/// device << 3 | function), refused where no unit covers it or nothing
/// answers there.
fn derive_device(k: &Kernel, pid: u16, segment: u64, source: u64) -> Result<Object> {
    let (Ok(segment), Ok(source)) = (u16::try_from(segment), u16::try_from(source)) else {
        return Err(SysError::BadArgument);
    };
    let guard = crate::iommu::IOMMU.lock();
    let iommu = guard.as_ref().ok_or(SysError::Unsupported)?;
    if let Err(e) = crate::iommu::check_device(iommu, segment, source) {
        defmt::warn!(
            "service {=str}: HANDLE_DERIVE refused: device {=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8}: {=str}",
            k.process_name(pid),
            segment,
            (source >> 8) as u8,
            ((source >> 3) & 31) as u8,
            (source & 7) as u8,
            if e == crate::iommu::IommuError::NoDevice {
                "no device answers there"
            } else {
                "no DMAR unit covers it"
            }
        );
        return Err(SysError::BadArgument);
    }
    Ok(Object::Device { segment, source })
}

/// Frames of a device's memory BAR `index`, for FRAMES_MAP (uncached).
fn derive_bar(k: &mut Kernel, pid: u16, source: u16, index: u64) -> Result<Object> {
    let Some((base, size)) = u8::try_from(index)
        .ok()
        .and_then(|i| crate::iommu::bar(source, i))
    else {
        defmt::warn!(
            "service {=str}: HANDLE_DERIVE refused: BAR {=u64} of device {=u8:02x}:{=u8:02x}.{=u8} is not an assigned memory BAR",
            k.process_name(pid),
            index,
            (source >> 8) as u8,
            ((source >> 3) & 31) as u8,
            (source & 7) as u8
        );
        return Err(SysError::BadArgument);
    };
    new_frames(k, base & !(PAGE_SIZE - 1), size, FramesKind::Mmio).map(Object::Frames)
}

/// A new frames object of `len` bytes from `base`.
fn new_frames(k: &mut Kernel, base: u64, len: u64, kind: FramesKind) -> Result<u16> {
    let slot = free_slot(&k.frames)?;
    k.frames[slot] = Some(FramesObject {
        base,
        count: len.div_ceil(PAGE_SIZE),
        len,
        kind,
        given_to_domain: false,
        ever_mapped: false,
    });
    Ok(slot as u16)
}

/// The IOMMU calls (issue 12): IoSpaces, attaching devices, mapping a
/// domain's frames at bus frame numbers, unmapping with the IOTLB
/// invalidated before the call returns, fault records.
#[inline(never)]
fn iommu_call(k: &mut Kernel, pid: u16, number: u64, a: [u64; 6]) -> Result<Done> {
    use crate::iommu::{IOMMU, IommuError};
    let name = match number {
        nr::IOSPACE_CREATE => "IOSPACE_CREATE",
        nr::IOSPACE_ATTACH => "IOSPACE_ATTACH",
        nr::IOSPACE_MAP => "IOSPACE_MAP",
        nr::IOSPACE_UNMAP => "IOSPACE_UNMAP",
        nr::IOMMU_RMRR => "IOMMU_RMRR",
        _ => "IOMMU_FAULTS",
    };
    let space_of =
        |k: &Kernel| -> Result<u16> { Ok(id_cap!(k, pid, name, a[0], IoSpace, rights::DEVICE)) };
    let refuse_io = |k: &Kernel, e: IommuError| {
        defmt::warn!(
            "service {=str}: {=str} refused: {}",
            k.process_name(pid),
            name,
            e
        );
        match e {
            IommuError::Busy | IommuError::Timeout => SysError::Busy,
            IommuError::NoResources | IommuError::Io(platform::vtd::IoError::OutOfMemory) => {
                SysError::NoResources
            }
            _ => SysError::BadArgument,
        }
    };
    match number {
        nr::IOSPACE_CREATE => {
            cap!(k, pid, name, a[0], ObjectKind::Iommu, rights::CREATE);
            let mut guard = IOMMU.lock();
            let iommu = guard.as_mut().ok_or(SysError::Unsupported)?;
            let s = iommu.create_space().map_err(|e| refuse_io(k, e))?;
            drop(guard);
            let h = k.install(
                pid,
                Cap {
                    object: Object::IoSpace(s),
                    rights: rights::DEVICE,
                    badge: 0,
                },
            )?;
            Ok(Values([u64::from(h), 0, 0]))
        }
        nr::IOSPACE_ATTACH => {
            let space = space_of(k)?;
            let d = cap!(k, pid, name, a[1], ObjectKind::Device, rights::DEVICE);
            let Object::Device { segment, source } = d.object else {
                return Err(SysError::WrongKind);
            };
            let mut guard = IOMMU.lock();
            let iommu = guard.as_mut().ok_or(SysError::Unsupported)?;
            iommu
                .attach(space, segment, source, a[2] != 0)
                .map_err(|e| refuse_io(k, e))?;
            Ok(Values([0; 3]))
        }
        nr::IOSPACE_MAP => {
            let space = space_of(k)?;
            let write = a[5] != 0;
            let right = rights::READ | if write { rights::WRITE } else { 0 };
            dcap!(k, pid, name, a[1], a[2], Scope::Domain, right);
            let count = a[4];
            if count == 0 || count > ipc_schema::syscall::IO_BATCH {
                return Err(SysError::BadArgument);
            }
            // A parent's memory does not change while forks map it.
            if write && domain(k, a[2])?.forks != 0 {
                defmt::warn!(
                    "service {=str}: IOSPACE_MAP refused: domain {=u64} has forks: its memory is not given writable to a device",
                    k.process_name(pid),
                    a[2]
                );
                return Err(SysError::Busy);
            }
            let mut pairs: heapless::Vec<(u64, u64), 512> = heapless::Vec::new();
            let mut raw = [0u8; 16];
            for i in 0..count {
                read_user(k, pid, a[3].wrapping_add(16 * i), &mut raw)?;
                let gfn = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
                let bfn = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
                let d = domain(k, a[2])?;
                let Some(hpa) = d.frame_of_gfn(gfn).filter(|_| d.is_ram(gfn)) else {
                    defmt::warn!(
                        "service {=str}: IOSPACE_MAP refused: pair {=u64}: gfn {=u64:#x} is not RAM of domain {=u16}",
                        k.process_name(pid),
                        i,
                        gfn,
                        d.id
                    );
                    return Err(SysError::BadAddress);
                };
                let _ = pairs.push((bfn, hpa));
            }
            let mut guard = IOMMU.lock();
            let iommu = guard.as_mut().ok_or(SysError::Unsupported)?;
            iommu.map(space, &pairs, write).map_err(|(i, e)| {
                defmt::warn!(
                    "service {=str}: IOSPACE_MAP: pair {=usize}:",
                    k.process_name(pid),
                    i
                );
                refuse_io(k, e)
            })?;
            Ok(Values([0; 3]))
        }
        nr::IOSPACE_UNMAP => {
            let space = space_of(k)?;
            let count = a[2];
            if count == 0 || count > ipc_schema::syscall::IO_BATCH {
                return Err(SysError::BadArgument);
            }
            let mut bfns: heapless::Vec<u64, 512> = heapless::Vec::new();
            let mut raw = [0u8; 8];
            for i in 0..count {
                read_user(k, pid, a[1].wrapping_add(8 * i), &mut raw)?;
                let _ = bfns.push(u64::from_le_bytes(raw));
            }
            let mut guard = IOMMU.lock();
            let iommu = guard.as_mut().ok_or(SysError::Unsupported)?;
            let before = iommu.invalidations;
            iommu.unmap(space, &bfns).map_err(|(i, e)| {
                defmt::warn!(
                    "service {=str}: IOSPACE_UNMAP: bus frame {=usize} of the batch:",
                    k.process_name(pid),
                    i
                );
                refuse_io(k, e)
            })?;
            Ok(Values([count, iommu.invalidations - before, 0]))
        }
        nr::IOMMU_RMRR => {
            cap!(k, pid, name, a[0], ObjectKind::Iommu, rights::CREATE);
            let mut scopes: heapless::Vec<u32, 64> = heapless::Vec::new();
            let (base, limit) = {
                let guard = IOMMU.lock();
                let iommu = guard.as_ref().ok_or(SysError::Unsupported)?;
                iommu.rmrr(a[1], &mut scopes).ok_or(SysError::BadArgument)?
            };
            if a[4] == 0 {
                let n = scopes.len().min(a[3] as usize / 4);
                for (i, s) in scopes[..n].iter().enumerate() {
                    write_user(k, pid, a[2] + 4 * i as u64, &s.to_le_bytes())?;
                }
                return Ok(Values([base, limit, n as u64]));
            }
            let end = limit.saturating_add(1);
            if base % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || crate::mem::allocatable(base, end) {
                defmt::warn!(
                    "service {=str}: IOMMU_RMRR refused: region {=u64:#x}..={=u64:#x} is not page-aligned reserved memory (part of it is RAM the kernel allocates)",
                    k.process_name(pid),
                    base,
                    limit
                );
                return Err(SysError::BadArgument);
            }
            let slot = new_frames(k, base, end - base, FramesKind::Reserved)?;
            let h = k.install(
                pid,
                Cap {
                    object: Object::Frames(slot),
                    rights: rights::READ | rights::WRITE,
                    badge: 0,
                },
            )?;
            Ok(Values([u64::from(h), 0, 0]))
        }
        _ => {
            cap!(k, pid, name, a[0], ObjectKind::Iommu, rights::DEVICE);
            let cap_records = (a[2] as usize / ipc_schema::syscall::IoFault::SIZE).min(64);
            let mut out: heapless::Vec<ipc_schema::syscall::IoFault, 64> = heapless::Vec::new();
            let mut guard = IOMMU.lock();
            let iommu = guard.as_mut().ok_or(SysError::Unsupported)?;
            iommu.faults(|unit, segment, f| {
                out.len() < cap_records
                    && out
                        .push(ipc_schema::syscall::IoFault {
                            address: f.address,
                            source: f.source,
                            segment,
                            reason: f.reason,
                            write: f.write,
                            unit: unit as u8,
                        })
                        .is_ok()
            });
            let (invalidations, lost) = (iommu.invalidations, iommu.lost_faults);
            drop(guard);
            for (i, f) in out.iter().enumerate() {
                write_user(k, pid, a[1] + 16 * i as u64, &f.to_bytes())?;
            }
            Ok(Values([out.len() as u64, invalidations, lost]))
        }
    }
}

/// A guest console line, into the log.
#[inline(never)]
fn console(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(k, pid, "CONSOLE", a[0], a[1], Scope::Domain, rights::VCPUS);
    let id = domain(k, a[1])?.id;
    let len = (a[3] as usize).min(MAX_FRAME);
    let mut buf = [0u8; MAX_FRAME];
    read_user(k, pid, a[2], &mut buf[..len])?;
    crate::log::emit(&Record::Console {
        domain: id,
        bytes: &buf[..len],
    });
    Ok(Values([0; 3]))
}

/// The direct-map address of `len` bytes at `pid`'s `va`, if they lie in one
/// page it may read (and write, with `write`).
fn user_bytes_in_place(k: &Kernel, pid: u16, va: u64, len: usize, write: bool) -> Option<*mut u8> {
    k.processes[usize::from(pid)]
        .as_ref()?
        .space
        .as_ref()?
        .in_one_page(va, len, write)
}

fn read_user(k: &Kernel, pid: u16, va: u64, out: &mut [u8]) -> Result<()> {
    let p = k.processes[usize::from(pid)]
        .as_ref()
        .ok_or(SysError::BadAddress)?;
    p.space
        .as_ref()
        .ok_or(SysError::BadAddress)?
        .read(va, out)
        .map_err(|_| SysError::BadAddress)
}

fn write_user(k: &Kernel, pid: u16, va: u64, bytes: &[u8]) -> Result<()> {
    let p = k.processes[usize::from(pid)]
        .as_ref()
        .ok_or(SysError::BadAddress)?;
    p.space
        .as_ref()
        .ok_or(SysError::BadAddress)?
        .write(va, bytes)
        .map_err(|_| SysError::BadAddress)
}

#[inline(never)]
fn log(k: &mut Kernel, pid: u16, va: u64, len: u64) -> Result<Done> {
    let truncated = len as usize > MAX_FRAME;
    let len = (len as usize).min(MAX_FRAME);
    let mut frame = [0u8; MAX_FRAME];
    read_user(k, pid, va, &mut frame[..len])?;
    let source = k.processes[usize::from(pid)]
        .as_ref()
        .map_or(0, |p| p.source);
    crate::log::emit(&Record::Defmt {
        source,
        frame: &frame[..len],
        truncated,
    });
    Ok(Values([0; 3]))
}

/// Whether the server behind endpoint handle `h` of `pid` restarted since
/// the handle last called it (the handle saw generation `seen`, the
/// endpoint is at `now`): if so, the handle is brought up to date, so that
/// this is said once.
fn restarted(k: &mut Kernel, pid: u16, h: u64, seen: u32, now: u32) -> bool {
    if seen == now {
        return false;
    }
    if let Some(Cap {
        object: Object::Endpoint { generation: g, .. },
        ..
    }) = k.cap_mut(pid, h)
    {
        *g = now;
    }
    true
}

fn ipc_call(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    let c = cap!(k, pid, "CALL", a[0], ObjectKind::Endpoint, rights::CALL);
    let Object::Endpoint { id, generation } = c.object else {
        return Err(SysError::WrongKind);
    };
    let len = a[2] as usize;
    if len > MAX_MESSAGE {
        if k.loud(pid, "CALL length") {
            defmt::warn!(
                "service {=str}: CALL refused: a {=usize}-byte message (the most is {=usize})",
                k.process_name(pid),
                len,
                MAX_MESSAGE
            );
        }
        return Err(SysError::MessageTooLong);
    }
    let e = k.endpoints[usize::from(id)]
        .as_ref()
        .ok_or(SysError::NoSuchHandle)?;
    if e.closed {
        return Err(SysError::NoServer);
    }
    let current = e.generation;
    if restarted(k, pid, a[0], generation, current) {
        if let Some(p) = k.processes[usize::from(pid)].as_mut() {
            p.frame.rdi = u64::from(current);
        }
        return Err(SysError::Dead);
    }
    let p = k.processes[usize::from(pid)]
        .as_mut()
        .ok_or(SysError::NoSuchHandle)?;
    // Straight from the caller's memory into its outbox.
    let super::process::Process { space, outbox, .. } = p;
    space
        .as_ref()
        .ok_or(SysError::BadAddress)?
        .read(a[1], &mut outbox[..len])
        .map_err(|_| SysError::BadAddress)?;
    p.outbox_len = len;
    p.seq = p.seq.wrapping_add(1);
    p.state = State::Blocked(Wait::Call {
        ep: id,
        handle: a[0] as u32,
        reply_buf: a[3],
        reply_cap: a[4],
        reply_at: 0,
        seq: p.seq,
        server: None,
    });
    if let Err(e) = k.send(id, Sender::Process(pid)) {
        if let Some(p) = k.processes[usize::from(pid)].as_mut() {
            p.state = State::Ready;
        }
        return Err(e);
    }
    Ok(Done::Blocked)
}

fn reply(k: &mut Kernel, pid: u16, token: u64, va: u64, len: u64) -> Result<()> {
    let len = len as usize;
    if len > MAX_MESSAGE {
        return Err(SysError::MessageTooLong);
    }
    // The answer to an exit (every exit a service handles ends here) is read
    // where it lies, when it lies in one page.
    if let Sender::Vcpu(_) = super::ipc::untoken(token).0
        && let Some(at) = user_bytes_in_place(k, pid, va, len, false)
    {
        // Safety: `at` is the direct-map address of `len` bytes the
        // service may read; answering a vCPU writes only kernel state and
        // the VMCS, never a service's memory, and unmaps nothing, so the
        // bytes stay put while they are read.
        let msg = unsafe { core::slice::from_raw_parts(at, len) };
        return k.reply(pid, token, msg);
    }
    let mut msg = core::mem::MaybeUninit::<[u8; MAX_MESSAGE]>::uninit();
    // Safety: a byte buffer needs no initialisation to be written, and only
    // the `len` bytes `read_user` filled are read back.
    let msg = unsafe { core::slice::from_raw_parts_mut(msg.as_mut_ptr().cast::<u8>(), len) };
    read_user(k, pid, va, msg)?;
    k.reply(pid, token, msg)
}

/// Whether RECV may wait on `mask` (`p`'s handles): not empty, and each
/// handle in it one to receive on ([`receivable`]).
fn receive_mask(p: &Process, mask: u64) -> Result<()> {
    if mask == 0 {
        return Err(SysError::BadArgument);
    }
    match bits(mask).find(|&slot| !receivable(p.handles.get(slot as usize).copied().flatten())) {
        Some(slot) => Err(not_receivable(p, slot)),
        None => Ok(()),
    }
}

/// RECV's refusal of `p`'s handle `slot`, not one to receive on (logged).
fn not_receivable(p: &Process, slot: u32) -> SysError {
    if p.loud("RECV handle") {
        defmt::warn!(
            "service {=str}: RECV refused: handle {=u32} is not one to receive on",
            p.name(),
            slot
        );
    }
    SysError::MissingRight
}

fn recv(k: &mut Kernel, pid: u16, mask: u64, buf: u64, cap: u64) -> Result<Done> {
    if mask == 0 {
        return Err(SysError::BadArgument);
    }
    let Kernel {
        processes,
        endpoints,
        notifications,
        epoch,
        ..
    } = &mut *k;
    let p = processes[usize::from(pid)]
        .as_mut()
        .ok_or(SysError::NoSuchHandle)?;
    // One pass: every handle in the mask must be one to receive or wait on;
    // each object learns that `pid` waits, and whether something is there
    // already is noted.
    let (queued, signalled, closed) =
        super::ipc::note_waiting(p, pid, mask, endpoints, notifications, epoch)
            .map_err(|slot| not_receivable(p, slot))?;
    let exit_buf = p.exit_buffer(buf, cap);
    p.state = State::Blocked(Wait::Recv {
        mask,
        buf,
        cap,
        exit_buf,
    });
    if closed {
        // A closed endpoint has a server again: this process.
        for slot in bits(mask) {
            if let Some(Object::Endpoint { id, .. }) = k.processes[usize::from(pid)]
                .as_ref()
                .and_then(|p| p.handles[slot as usize])
                .map(|c| c.object)
                && let Some(e) = k.endpoints[usize::from(id)].as_mut()
            {
                e.closed = false;
            }
        }
    }
    // Something already there: take it now (notifications first).
    if signalled {
        k.wake_for_bits(pid);
    }
    if queued {
        for slot in bits(mask) {
            if !matches!(
                k.processes[usize::from(pid)].as_ref().map(|p| p.state),
                Some(State::Blocked(_))
            ) {
                break;
            }
            if let Some(Object::Endpoint { id, .. }) = k.processes[usize::from(pid)]
                .as_ref()
                .and_then(|p| p.handles[slot as usize])
                .map(|c| c.object)
            {
                k.deliver(id);
            }
        }
    }
    Ok(Done::Blocked)
}

fn wait(k: &mut Kernel, pid: u16, h: u64) -> Result<Done> {
    let n = id_cap!(k, pid, "WAIT", h, Notification, rights::WAIT);
    let note = k.notifications[usize::from(n)]
        .as_mut()
        .ok_or(SysError::NoSuchHandle)?;
    if note.bits != 0 {
        let bits = core::mem::take(&mut note.bits);
        return Ok(Values([bits, 0, 0]));
    }
    k.epoch += u64::from(note.waiter != Some(pid));
    note.waiter = Some(pid);
    if let Some(p) = k.processes[usize::from(pid)].as_mut() {
        p.state = State::Blocked(Wait::Notification(n));
    }
    Ok(Done::Blocked)
}

fn frames_of(
    k: &Kernel,
    pid: u16,
    call: &'static str,
    h: u64,
    needed: u32,
) -> Result<(u16, FramesObject)> {
    let id = id_cap!(k, pid, call, h, Frames, needed);
    Ok((
        id,
        *k.frames[usize::from(id)]
            .as_ref()
            .ok_or(SysError::NoSuchHandle)?,
    ))
}

#[inline(never)]
fn frames_map(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    let writable = a[4] != 0;
    let needed = rights::READ | if writable { rights::WRITE } else { 0 };
    let (fid, f) = frames_of(k, pid, "FRAMES_MAP", a[0], needed)?;
    let (first, count, va) = (a[1], a[2], a[3]);
    let end = va
        .checked_add(count.checked_mul(PAGE_SIZE).ok_or(SysError::BadArgument)?)
        .ok_or(SysError::BadArgument)?;
    if f.given_to_domain
        || f.kind == FramesKind::Reserved
        || (writable && f.kind == FramesKind::Module)
        || first.checked_add(count).is_none_or(|e| e > f.count)
        || va % PAGE_SIZE != 0
        || va < MAP_BASE
        || end > MAP_END
    {
        return Err(SysError::BadArgument);
    }
    let p = k.processes[usize::from(pid)]
        .as_mut()
        .ok_or(SysError::NoSuchHandle)?;
    let space = p.space.as_mut().ok_or(SysError::BadAddress)?;
    for i in 0..count {
        let flags = super::space::PageFlags {
            writable,
            executable: false,
            owned: false,
            uncached: f.kind == FramesKind::Mmio,
        };
        if space
            .map(va + i * PAGE_SIZE, f.base + (first + i) * PAGE_SIZE, flags)
            .is_err()
        {
            for j in 0..i {
                let _ = space.unmap(va + j * PAGE_SIZE);
            }
            return Err(SysError::BadArgument);
        }
    }
    if let Some(f) = k.frames[usize::from(fid)].as_mut() {
        f.ever_mapped = true;
    }
    Ok(Values([0; 3]))
}

fn frames_unmap(k: &mut Kernel, pid: u16, va: u64, count: u64) -> Result<Done> {
    let end = va
        .checked_add(count.saturating_mul(PAGE_SIZE))
        .ok_or(SysError::BadArgument)?;
    // Foreign mappings are undone by FOREIGN_UNMAP only (they are counted).
    if va < MAP_BASE
        || end > MAP_END
        || !va.is_multiple_of(PAGE_SIZE)
        || k.foreign_overlaps(pid, va, end)
    {
        return Err(SysError::BadArgument);
    }
    let p = k.processes[usize::from(pid)]
        .as_mut()
        .ok_or(SysError::NoSuchHandle)?;
    let space = p.space.as_mut().ok_or(SysError::BadAddress)?;
    // Only what is mapped costs time: a count that spans the whole window
    // skips its empty tables.
    space.unmap_range(va, end);
    Ok(Values([0; 3]))
}

#[inline(never)]
fn frames_alloc(k: &mut Kernel, pid: u16, pool: u64, count: u64, align: u64) -> Result<Done> {
    cap!(
        k,
        pid,
        "FRAMES_ALLOC",
        pool,
        ObjectKind::MemoryPool,
        rights::CREATE
    );
    if count == 0 || count > 1 << 20 || !align.is_power_of_two() {
        return Err(SysError::BadArgument);
    }
    let Some(slot) = k.frames.iter().position(Option::is_none) else {
        defmt::warn!(
            "{=str}: FRAMES_ALLOC refused: all {=usize} frames objects in use",
            k.process_name(pid),
            k.frames.len()
        );
        return Err(SysError::NoResources);
    };
    let Some(base) = crate::vm::memory::alloc_zeroed_contiguous(count, align) else {
        defmt::warn!(
            "{=str}: FRAMES_ALLOC of {=u64} frames (aligned to {=u64}) refused: {=u64} frames free",
            k.process_name(pid),
            count,
            align,
            crate::mem::FRAMES
                .lock()
                .as_ref()
                .map_or(0, |f| f.free_frames())
        );
        return Err(SysError::NoResources);
    };
    k.frames[slot] = Some(FramesObject {
        base,
        count,
        len: count * PAGE_SIZE,
        kind: FramesKind::Ram,
        given_to_domain: false,
        ever_mapped: false,
    });
    let h = k.install(
        pid,
        Cap {
            object: Object::Frames(slot as u16),
            rights: rights::READ | rights::WRITE,
            badge: 0,
        },
    )?;
    Ok(Values([u64::from(h), 0, 0]))
}

#[inline(never)]
fn spawn(k: &mut Kernel, pid: u16, elf_h: u64, va: u64, len: u64) -> Result<Done> {
    let elf_id = id_cap!(k, pid, "PROCESS_SPAWN", elf_h, Frames, rights::READ);
    let mut buf = [0u8; 4096];
    let len = (len as usize).min(buf.len());
    read_user(k, pid, va, &mut buf[..len])?;
    let spec: SpawnSpec = postcard::from_bytes(&buf[..len]).map_err(|_| SysError::BadArgument)?;
    // Each grant copies one of the spawner's handles, with at most its rights.
    let mut handles: Handles = [None; MAX_HANDLES];
    let mut names: heapless::Vec<(u32, HandleName), MAX_HANDLES> = heapless::Vec::new();
    let spawner = k.processes[usize::from(pid)]
        .as_ref()
        .ok_or(SysError::NoSuchHandle)?;
    for g in spec.grants.0.iter() {
        let Grant {
            slot,
            from,
            rights: r,
            badge,
            name,
        } = *g;
        let from_cap = spawner
            .handles
            .get(from as usize)
            .copied()
            .flatten()
            .ok_or(SysError::NoSuchHandle)?;
        let target = handles
            .get_mut(slot as usize)
            .ok_or(SysError::BadArgument)?;
        *target = Some(Cap {
            object: from_cap.object,
            rights: from_cap.rights & r,
            badge,
        });
        let _ = names.push((slot, name));
    }
    let child = k
        .spawn(spec.name, elf_id, handles, &names, spec.successor)
        .map_err(|e| {
            defmt::error!(
                "service {=str}: PROCESS_SPAWN failed: {}",
                k.process_name(pid),
                e
            );
            SysError::BadArgument
        })?;
    let h = k.install(pid, super::process::process_cap(child, rights::SIGNAL))?;
    Ok(Values([u64::from(h), 0, 0]))
}

fn domain(k: &Kernel, id: u64) -> Result<&Domain> {
    let slot = usize::try_from(id.wrapping_sub(1)).map_err(|_| SysError::BadArgument)?;
    k.domains
        .get(slot)
        .and_then(Option::as_ref)
        .ok_or(SysError::BadArgument)
}

fn domain_mut(k: &mut Kernel, id: u64) -> Result<&mut Domain> {
    let slot = usize::try_from(id.wrapping_sub(1)).map_err(|_| SysError::BadArgument)?;
    k.domains
        .get_mut(slot)
        .and_then(Option::as_mut)
        .ok_or(SysError::BadArgument)
}

fn view_arg(v: u64) -> Result<u16> {
    u16::try_from(v).map_err(|_| SysError::BadArgument)
}

#[inline(never)]
fn domain_create(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    cap!(
        k,
        pid,
        "DOMAIN_CREATE",
        a[0],
        ObjectKind::Domains,
        rights::BUILD
    );
    let mut name = [0u8; ipc_schema::syscall::HANDLE_NAME];
    let len = (a[2] as usize).min(name.len());
    read_user(k, pid, a[1], &mut name[..len])?;
    let slot = free_slot(&k.domains)?;
    if a[3] & !ipc_schema::syscall::DOMAIN_PROTECTED != 0 {
        return Err(SysError::BadArgument);
    }
    let protected = a[3] & ipc_schema::syscall::DOMAIN_PROTECTED != 0;
    let d = Domain::create(slot as u16 + 1, name, protected).map_err(|_| SysError::NoResources)?;
    defmt::info!(
        "domain {=u16} ({=str}) created by {=str}{=str}",
        slot as u16 + 1,
        ipc_schema::syscall::handle_name_str(&d.name),
        k.process_name(pid),
        if protected { ", protected" } else { "" }
    );
    k.domains[slot] = Some(d);
    Ok(Values([slot as u64 + 1, 0, 0]))
}

#[inline(never)]
fn domain_map_ram(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "DOMAIN_MAP_RAM",
        a[0],
        a[1],
        Scope::Domain,
        rights::BUILD
    );
    let (fid, f) = frames_of(k, pid, "DOMAIN_MAP_RAM", a[3], rights::WRITE)?;
    let (gfn, count) = (a[2], a[4]);
    if f.ever_mapped {
        defmt::warn!(
            "{=str}: DOMAIN_MAP_RAM refused: the frames were mapped into a service, which would keep a way into the guest's memory",
            k.process_name(pid)
        );
        return Err(SysError::BadArgument);
    }
    // Reserved memory (an RMRR) goes only where it is: gfn = frame, whole.
    let identity = f.kind == FramesKind::Reserved
        && gfn.checked_mul(PAGE_SIZE) == Some(f.base)
        && count == f.count;
    if !(f.kind == FramesKind::Ram || identity)
        || f.given_to_domain
        || count == 0
        || count > f.count
    {
        return Err(SysError::BadArgument);
    }
    let result = domain_mut(k, a[1])?.map_ram(gfn, f.base, count);
    // Frames a failed mapping may have entered into the domain's tables are
    // the domain's all the same: never given to anyone else.
    if !matches!(result, Err(crate::vm::domain::DomainError::WrongState))
        && let Some(f) = k.frames[usize::from(fid)].as_mut()
    {
        f.given_to_domain = true;
    }
    result.map_err(|e| {
        defmt::warn!("DOMAIN_MAP_RAM: {}", e);
        match e {
            crate::vm::domain::DomainError::OutOfMemory => SysError::NoResources,
            _ => SysError::BadArgument,
        }
    })?;
    Ok(Values([0; 3]))
}

#[inline(never)]
fn domain_memory(k: &mut Kernel, pid: u16, write: bool, a: [u64; 6]) -> Result<Done> {
    let right = if write { rights::WRITE } else { rights::READ };
    dcap!(
        k,
        pid,
        if write { "DOMAIN_WRITE" } else { "DOMAIN_READ" },
        a[0],
        a[1],
        Scope::Domain,
        right
    );
    let (gpa, va, len) = (a[2], a[3], a[4]);
    // Both spans must end inside the address space (and the guest's inside
    // its RAM) before anything is copied: `gpa + done` and `va + done` below
    // then cannot wrap.
    let ram = domain(k, a[1])?.ram_bytes;
    if !span::within(gpa, len, 0, ram) || span::end(va, len).is_none() {
        return Err(SysError::BadAddress);
    }
    let mut buf = [0u8; 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if write {
            read_user(k, pid, va + done, &mut buf[..n])?;
            let d = domain_mut(k, a[1])?;
            d.write_guest(gpa + done, &buf[..n])
                .ok_or(SysError::BadAddress)?;
            if let Some(log) = d.writes.as_mut() {
                log.record(gpa + done, n as u64);
            }
        } else {
            domain(k, a[1])?
                .read_guest(gpa + done, &mut buf[..n])
                .ok_or(SysError::BadAddress)?;
            write_user(k, pid, va + done, &buf[..n])?;
        }
        done += n as u64;
    }
    Ok(Values([0; 3]))
}

/// The endpoint of handle `h`, which must have `right`.
fn endpoint_of(k: &Kernel, pid: u16, call: &'static str, h: u64, right: u32) -> Result<u16> {
    match cap!(k, pid, call, h, ObjectKind::Endpoint, right).object {
        Object::Endpoint { id, .. } => Ok(id),
        _ => Err(SysError::WrongKind),
    }
}

#[inline(never)]
fn vcpu_create(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "VCPU_CREATE",
        a[0],
        a[1],
        Scope::Domain,
        rights::BUILD
    );
    if !crate::vm::available() {
        defmt::warn!(
            "service {=str}: VCPU_CREATE refused: this CPU has no usable VMX, so a domain's vCPUs cannot run (its memory and devices work without)",
            k.process_name(pid)
        );
        return Err(SysError::Unsupported);
    }
    let mut buf = [0u8; 128];
    let len = (a[3] as usize).min(buf.len());
    read_user(k, pid, a[2], &mut buf[..len])?;
    let spec: VcpuSpec = postcard::from_bytes(&buf[..len]).map_err(|_| SysError::BadArgument)?;
    let endpoint = |h: u32| endpoint_of(k, pid, "VCPU_CREATE", h.into(), rights::CALL);
    let exit_ep = endpoint(spec.exit_endpoint)?;
    let violation_ep = endpoint(spec.violation_endpoint)?;
    domain_mut(k, a[1])?
        .create_vcpu(spec.entry, spec.rax, spec.rbx, exit_ep, violation_ep)
        .map_err(|_| SysError::BadArgument)?;
    Ok(Values([0; 3]))
}

#[inline(never)]
fn domain_control(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "DOMAIN_CONTROL",
        a[0],
        a[1],
        Scope::Domain,
        rights::BUILD
    );
    let slot = (a[1].wrapping_sub(1)) as u16;
    let op = match a[2] {
        0 => DomainOp::Start,
        1 => DomainOp::Pause,
        2 => DomainOp::Unpause,
        3 => DomainOp::Destroy,
        4 => DomainOp::Reset,
        _ => return Err(SysError::BadArgument),
    };
    let d = domain_mut(k, a[1])?;
    if matches!(op, DomainOp::Unpause | DomainOp::Destroy) && d.forks != 0 {
        defmt::warn!(
            "domain {=u16} ({=str}) has {=u16} fork(s) mapping its memory: not {=str}",
            d.id,
            ipc_schema::syscall::handle_name_str(&d.name),
            d.forks,
            if op == DomainOp::Destroy {
                "destroyed"
            } else {
                "unpaused"
            }
        );
        return Err(SysError::Busy);
    }
    if op == DomainOp::Reset {
        return fork_reset(k, slot);
    }
    let d = domain_mut(k, a[1])?;
    if matches!(op, DomainOp::Start | DomainOp::Unpause) && d.protected && d.foreign_ungranted > 0 {
        defmt::warn!(
            "domain {=u16} ({=str}) is protected and services hold {=u32} pages of it foreign-mapped: not {=str}",
            d.id,
            ipc_schema::syscall::handle_name_str(&d.name),
            d.foreign_ungranted,
            if op == DomainOp::Start {
                "started"
            } else {
                "unpaused"
            }
        );
        return Err(SysError::ForeignMapped);
    }
    match (op, d.state) {
        (DomainOp::Start, DomainState::Building) if d.vcpu.is_some() => {
            d.state = DomainState::Running;
            k.make_ready(Runnable::Vcpu(slot));
        }
        (DomainOp::Pause, DomainState::Running) => {
            d.state = DomainState::Paused;
            k.unready(Runnable::Vcpu(slot));
        }
        (DomainOp::Unpause, DomainState::Paused) => {
            d.state = DomainState::Running;
            if !d.awaiting_reply {
                k.make_ready(Runnable::Vcpu(slot));
            }
        }
        (DomainOp::Destroy, _) => {
            let running = matches!(d.state, DomainState::Running | DomainState::Paused);
            if running {
                crate::vm::exits::end(k, slot, DomainState::Destroyed, 0);
            }
            k.unready(Runnable::Vcpu(slot));
            for e in k.endpoints.iter_mut().flatten() {
                e.queue.retain(|s| *s != Sender::Vcpu(slot));
            }
            k.foreign_drop_domain(slot);
            crate::iommu::drop_domain(&k.domains[usize::from(slot)]);
            if let Some(d) = k.domains[usize::from(slot)].take() {
                if let Some(p) = d.parent.and_then(|p| domain_mut(k, p.into()).ok()) {
                    p.forks -= 1;
                }
                d.destroy();
            }
        }
        _ => return Err(SysError::Busy),
    }
    Ok(Values([0; 3]))
}

/// DOMAIN_FORK (docs/sharing.md).
#[inline(never)]
fn domain_fork(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    cap!(
        k,
        pid,
        "DOMAIN_FORK",
        a[0],
        ObjectKind::Domains,
        rights::BUILD
    );
    let p = domain(k, a[1])?;
    let why = if p.state != DomainState::Paused || p.awaiting_reply {
        Some((SysError::Busy, "is not paused with its vCPU at rest"))
    } else if p.protected {
        Some((SysError::BadArgument, "is protected"))
    } else if p.vcpu.is_none() {
        Some((SysError::BadArgument, "has no vCPU"))
    } else if crate::iommu::maps_any(|hpa| p.gfn_of_frame(hpa).is_some()) {
        Some((
            SysError::Busy,
            "has pages a device may write (IoSpace mappings)",
        ))
    } else {
        None
    };
    if let Some((e, why)) = why {
        defmt::warn!("DOMAIN_FORK: domain {=u64} {=str}", a[1], why);
        return Err(e);
    }
    let mut name = [0u8; ipc_schema::syscall::HANDLE_NAME];
    let len = (a[3] as usize).min(name.len());
    read_user(k, pid, a[2], &mut name[..len])?;
    let slot = free_slot(&k.domains)?;
    let id = slot as u16 + 1;
    let t0 = platform::cpu::rdtsc();
    let mut child = Domain::create(id, name, false).map_err(|_| SysError::NoResources)?;
    let parent = domain(k, a[1])?;
    let made = crate::vm::shared::fork(parent, &mut child)
        .map_err(|_| SysError::NoResources)
        .and_then(|()| {
            let (exits, violations) = (parent.exit_endpoint, parent.violation_endpoint);
            // A vCPU set up as for a fresh guest (entry 0), whose guest
            // state the parent's then replaces whole.
            child
                .create_vcpu(0, 0, 0, exits, violations)
                .map_err(|_| SysError::NoResources)?;
            let (Some(v), Some(from)) = (child.vcpu.as_mut(), parent.vcpu.as_ref()) else {
                return Err(SysError::NoResources);
            };
            v.copy_from(from).map_err(|_| SysError::NoResources)
        });
    if let Err(e) = made {
        child.destroy();
        return Err(e);
    }
    child.state = DomainState::Paused;
    defmt::info!(
        "domain {=u16} ({=str}) forked from domain {=u64} by {=str} in {=u64} ticks",
        id,
        ipc_schema::syscall::handle_name_str(&child.name),
        a[1],
        k.process_name(pid),
        platform::cpu::rdtsc().wrapping_sub(t0)
    );
    k.domains[slot] = Some(child);
    domain_mut(k, a[1])?.forks += 1;
    Ok(Values([u64::from(id), 0, 0]))
}

/// `DomainOp::Reset` of domain slot `slot`.
fn fork_reset(k: &mut Kernel, slot: u16) -> Result<Done> {
    let mut child = k.domains[usize::from(slot)]
        .take()
        .ok_or(SysError::BadArgument)?;
    let t0 = platform::cpu::rdtsc();
    let result = (|| {
        let at_rest = matches!(
            child.state,
            DomainState::Paused | DomainState::Exited | DomainState::Crashed
        ) && !child.awaiting_reply;
        let parent = child
            .parent
            .and_then(|p| k.domains.get(usize::from(p) - 1)?.as_ref())
            .ok_or(SysError::BadArgument)?;
        if !at_rest {
            return Err(SysError::Busy);
        }
        let pages = crate::vm::shared::reset(&mut child, parent);
        let (Some(v), Some(from)) = (child.vcpu.as_mut(), parent.vcpu.as_ref()) else {
            return Err(SysError::BadArgument);
        };
        v.copy_from(from).map_err(|_| SysError::Busy)?;
        if let Ok(eptp) = child.views.eptp(0) {
            v.set_view(0, eptp);
        }
        child.views.flush_all();
        child.state = DomainState::Paused;
        child.exit_status = 0;
        child.pending = None;
        child.pending_raw = None;
        child.started = false;
        Ok(pages)
    })();
    let id = child.id;
    k.domains[usize::from(slot)] = Some(child);
    let pages = result?;
    for e in k.endpoints.iter_mut().flatten() {
        e.queue.retain(|s| *s != Sender::Vcpu(slot));
    }
    defmt::info!(
        "domain {=u16}: reset to its parent ({=usize} page(s)) in {=u64} ticks",
        id,
        pages,
        platform::cpu::rdtsc().wrapping_sub(t0)
    );
    Ok(Values([pages as u64, 0, 0]))
}

#[inline(never)]
fn ept_ops(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    const BATCH: usize = 1024;
    let len = (a[3] as usize).min(BATCH);
    // The batch is decoded where it lies when it lies in one page (nearly
    // always), else from a copy.
    let copy: [u8; BATCH];
    let bytes: &[u8] = match user_bytes_in_place(k, pid, a[2], len, false) {
        // Safety: `at` is the direct-map address of `len` bytes the service
        // may read; they are only read, and only while the batch decodes.
        Some(at) => unsafe { core::slice::from_raw_parts(at, len) },
        None => {
            let mut c = [0u8; BATCH];
            read_user(k, pid, a[2], &mut c[..len])?;
            copy = c;
            &copy[..len]
        }
    };
    let ops: BoundedVec<EptOp, MAX_EPT_OPS> =
        postcard::from_bytes(bytes).map_err(|_| SysError::BadArgument)?;
    // Every view the batch touches must be one the handle reaches.
    if ops.0.is_empty() {
        dcap!(k, pid, "EPT_OPS", a[0], a[1], Scope::Domain, rights::VIEWS);
    }
    for op in ops.0.iter() {
        dcap!(
            k,
            pid,
            "EPT_OPS",
            a[0],
            a[1],
            Scope::View(op.view()),
            rights::VIEWS
        );
    }
    let d = domain_mut(k, a[1])?;
    let mut results: BoundedVec<EptResult, MAX_EPT_OPS> = BoundedVec::new();
    // Views changed (a bit each): flushed once, after the batch.
    let mut touched = [0u64; 8];
    for op in ops.0.iter() {
        let r = crate::vm::ept_op(d, op);
        let view = usize::from(op.view());
        if !matches!(op, EptOp::Query { .. }) && view < 512 {
            touched[view / 64] |= 1 << (view % 64);
        }
        let _ = results.0.push(r);
    }
    for (word, &bits) in touched.iter().enumerate() {
        for b in super::ipc::bits(bits) {
            d.views.flush((word * 64) as u16 + b as u16);
        }
    }
    // The results go straight into the caller's buffer when it lies in one
    // page, else through a copy.
    let cap = (a[5] as usize).min(BATCH);
    if let Some(at) = user_bytes_in_place(k, pid, a[4], cap, true) {
        // Safety: `at` is the direct-map address of `cap` bytes the service
        // may write, which nothing else in the kernel refers to now.
        let out = unsafe { core::slice::from_raw_parts_mut(at, cap) };
        let n = postcard::to_slice(&results, out)
            .map_err(|_| SysError::ReplyTooLong)?
            .len();
        return Ok(Values([n as u64, 0, 0]));
    }
    let mut out = [0u8; BATCH];
    let n = postcard::to_slice(&results, &mut out)
        .map_err(|_| SysError::NoResources)?
        .len();
    if n as u64 > a[5] {
        return Err(SysError::ReplyTooLong);
    }
    write_user(k, pid, a[4], &out[..n])?;
    Ok(Values([n as u64, 0, 0]))
}

#[inline(never)]
fn vcpu_control(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "VCPU_CONTROL",
        a[0],
        a[1],
        Scope::Vcpu(view_arg(a[2])?),
        rights::VCPUS
    );
    let op = match a[3] {
        0 => VcpuOp::VeEnable,
        1 => VcpuOp::VeDisable,
        2 => VcpuOp::PmlStart,
        3 => VcpuOp::PmlStop,
        4 => VcpuOp::PmlTake,
        5 => VcpuOp::WritesLog,
        6 => VcpuOp::ApicSet,
        _ => return Err(SysError::BadArgument),
    };
    let pml = if op == VcpuOp::PmlStart {
        Some(pml_buffers(k, pid, a[4], a[5])?)
    } else {
        None
    };
    let [rdi, rsi] = crate::vm::vcpu_control(domain_mut(k, a[1])?, op, a[4], pml)?;
    Ok(Values([rdi, rsi, 0]))
}

/// PML_START's buffers: two frames of a frames object the caller holds
/// with read and write (`arg`: the handle, and the first frame in the high
/// 32 bits) that are not guest RAM and never will be (the CPU writes them),
/// and an endpoint the caller receives on.
fn pml_buffers(k: &mut Kernel, pid: u16, arg: u64, endpoint: u64) -> Result<([u64; 2], u16)> {
    let (fid, f) = frames_of(
        k,
        pid,
        "VCPU_CONTROL",
        arg & 0xffff_ffff,
        rights::READ | rights::WRITE,
    )?;
    let first = arg >> 32;
    if f.given_to_domain
        || f.kind != FramesKind::Ram
        || first.checked_add(2).is_none_or(|e| e > f.count)
    {
        return Err(SysError::BadArgument);
    }
    let id = endpoint_of(k, pid, "VCPU_CONTROL", endpoint, rights::RECEIVE)?;
    // Never guest RAM from now on (DOMAIN_MAP_RAM refuses such frames).
    if let Some(f) = k.frames[usize::from(fid)].as_mut() {
        f.ever_mapped = true;
    }
    let base = f.base + first * PAGE_SIZE;
    Ok(([base, base + PAGE_SIZE], id))
}

#[inline(never)]
fn lifted_take(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "LIFTED_TAKE",
        a[0],
        a[1],
        Scope::Domain,
        rights::VIEWS
    );
    let max = (a[3] as usize).min(64);
    let mut frames = [0u64; 64];
    let (n, more) = crate::vm::peek_lifted(domain(k, a[1])?, &mut frames[..max]);
    // Taken only once the caller has them: a bad buffer loses nothing.
    write_words(k, pid, a[2], &frames[..n])?;
    crate::vm::drop_lifted(domain_mut(k, a[1])?, n);
    Ok(Values([n as u64, u64::from(more), 0]))
}

/// VCPU_REGS: a vCPU's registers read, or some of them set (the domain
/// paused, so that no exit handler's answer races the change).
#[inline(never)]
fn vcpu_regs(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    let (set, mask) = (a[4] != 0, a[4]);
    let right = if set { rights::WRITE } else { rights::READ };
    dcap!(
        k,
        pid,
        "VCPU_REGS",
        a[0],
        a[1],
        Scope::Vcpu(view_arg(a[2])?),
        right
    );
    let mut values = [0u64; regs::COUNT];
    if set {
        let mut bytes = [0u8; regs::COUNT * 8];
        read_user(k, pid, a[3], &mut bytes)?;
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
    let d = domain_mut(k, a[1])?;
    // (Or its vCPU waits for the caller's answer to its exit: the exit
    // handler emulating an instruction sets what it wrote.)
    let answering = d.awaiting_reply && d.exit_server == Some(pid);
    if set && d.state != DomainState::Paused && !answering {
        let id = d.id;
        defmt::warn!(
            "{=str}: VCPU_REGS refused: domain {=u16} is not paused",
            k.process_name(pid),
            id
        );
        return Err(SysError::Busy);
    }
    let v = d
        .vcpu
        .as_mut()
        .filter(|_| a[2] == 0)
        .ok_or(SysError::BadArgument)?;
    v.load().map_err(|_| SysError::Busy)?;
    if !set {
        let values = v.registers();
        write_words(k, pid, a[3], &values)?;
        return Ok(Values([0; 3]));
    }
    let Err((i, why)) = v.set_registers(&values, mask) else {
        return Ok(Values([0; 3]));
    };
    defmt::warn!(
        "{=str}: VCPU_REGS refused: {=str} {=u64:#x}: {=str} (VM entry would fail); nothing set",
        k.process_name(pid),
        regs::NAMES[i],
        values[i],
        why
    );
    if let Some(p) = k.processes[usize::from(pid)].as_mut() {
        p.frame.rdi = 1 << 63 | i as u64;
    }
    Err(SysError::BadArgument)
}

/// Writes `words` (little-endian u64s) to the caller's memory at `va`.
fn write_words(k: &mut Kernel, pid: u16, va: u64, words: &[u64]) -> Result<()> {
    let mut bytes = [0u8; 64 * 8];
    let n = words.len().min(64);
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(&words[..n]) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    write_user(k, pid, va, &bytes[..n * 8])
}

#[inline(never)]
fn domain_writes(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    dcap!(
        k,
        pid,
        "DOMAIN_WRITES",
        a[0],
        a[1],
        Scope::Domain,
        rights::VCPUS
    );
    let max = (a[3] as usize).min(32);
    let mut pairs = [[0u64; 2]; 32];
    let (n, runs, overflow) = crate::vm::peek_writes(domain_mut(k, a[1])?, &mut pairs[..max])?;
    // Taken only once the caller has them: a bad buffer loses nothing.
    write_words(k, pid, a[2], pairs[..n].as_flattened())?;
    crate::vm::drop_writes(domain_mut(k, a[1])?, runs);
    Ok(Values([n as u64, u64::from(overflow), 0]))
}

/// The port `port` (`size` bytes) of the caller's I/O-ports handle `h`,
/// if it may use it.
fn io_port(
    k: &mut Kernel,
    pid: u16,
    what: &'static str,
    h: u64,
    port: u64,
    size: u64,
) -> Result<u16> {
    let c = cap!(k, pid, what, h, ObjectKind::IoPorts, rights::DEVICE);
    let Object::IoPorts { base, count } = c.object else {
        return Err(SysError::WrongKind);
    };
    // Compared without adding to `port` (which the service chose: a port
    // near u64::MAX would wrap `port + size` past the check).
    if !matches!(size, 1 | 2 | 4)
        || !span::within(
            port,
            size,
            u64::from(base),
            u64::from(base) + u64::from(count),
        )
    {
        return Err(SysError::BadArgument);
    }
    let port = u16::try_from(port).map_err(|_| SysError::BadArgument)?;
    if kernel_port(port, size as u16) {
        defmt::warn!(
            "service {=str}: I/O port {=u16:#x} belongs to the kernel",
            k.process_name(pid),
            port
        );
        return Err(SysError::MissingRight);
    }
    Ok(port)
}

#[inline(never)]
fn io(k: &mut Kernel, pid: u16, out: bool, a: [u64; 6]) -> Result<Done> {
    let what = if out { "IO_OUT" } else { "IO_IN" };
    let (size, port) = (a[2], io_port(k, pid, what, a[0], a[1], a[2])?);
    // Safety: the caller holds a handle with the device right on these
    // ports, and none of them is one the kernel drives.
    unsafe {
        if out {
            match size {
                1 => platform::port::outb(port, a[3] as u8),
                2 => x86_64::instructions::port::Port::<u16>::new(port).write(a[3] as u16),
                _ => platform::port::outl(port, a[3] as u32),
            }
            Ok(Values([0; 3]))
        } else {
            let v = match size {
                1 => u64::from(platform::port::inb(port)),
                2 => u64::from(x86_64::instructions::port::Port::<u16>::new(port).read()),
                _ => u64::from(x86_64::instructions::port::Port::<u32>::new(port).read()),
            };
            Ok(Values([v, 0, 0]))
        }
    }
}

#[inline(never)]
fn io_out_bytes(k: &mut Kernel, pid: u16, a: [u64; 6]) -> Result<Done> {
    let port = io_port(k, pid, "IO_OUT_BYTES", a[0], a[1], 1)?;
    let (mut va, mut left) = (a[2], a[3]);
    if left > ipc_schema::syscall::IO_OUT_MAX {
        return Err(SysError::BadArgument);
    }
    let mut buf = [0u8; 256];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        // A bad buffer is refused before its first byte goes out only
        // within the first 256; bytes already written stay written.
        read_user(k, pid, va, &mut buf[..n])?;
        for &b in &buf[..n] {
            // Safety: as in `io`: the caller holds the device right on
            // this port, which the kernel does not drive.
            unsafe { platform::port::outb(port, b) };
        }
        va = va.wrapping_add(n as u64);
        left -= n as u64;
    }
    Ok(Values([0; 3]))
}

/// Ports the kernel drives itself (its log line, the PIT and PICs, the
/// emulators' exit ports): no handle reaches them.
fn kernel_port(port: u16, size: u16) -> bool {
    const KERNEL: [(u16, u16); 7] = [
        (0x20, 2),
        (0xa0, 2),
        (0x40, 4),
        (0x61, 1),
        (0xf4, 4),
        (0x3f8, 8),
        (0x8900, 1),
    ];
    let end = port.saturating_add(size);
    KERNEL.iter().any(|&(b, n)| port < b + n && b < end)
}

/// The error for an EPT operation that failed.
pub fn ept_error(e: platform::ept::EptError) -> EptOpError {
    use platform::ept::EptError as E;
    match e {
        E::OutOfMemory => EptOpError::OutOfMemory,
        E::AlreadyMapped { .. } => EptOpError::AlreadyMapped,
        E::NotMapped { .. } | E::NotLarge { .. } => EptOpError::NotMapped,
        E::WriteWithoutRead { .. } => EptOpError::WriteWithoutRead,
        _ => EptOpError::NotRam,
    }
}

/// The page size code of `EptEntry::size`.
pub fn size_code(s: PageSize) -> u8 {
    match s {
        PageSize::Size4K => 0,
        PageSize::Size2M => 1,
        PageSize::Size1G => 2,
    }
}
