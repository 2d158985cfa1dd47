//! EPT violations: filled lazily, or reported (ALT-4, ALT-6).
//!
//! A violation reaches this service when the CPU did not deliver it to the
//! guest as a #VE (#VE off, the entry's suppress-#VE bit set, the
//! information area busy). An entry the view has not filled yet is filled
//! from the host p2m and the access retried, invisibly to the guest. Any
//! other violation is a restriction doing its job: it becomes a [`VmEvent`]
//! for the domain's listener, the vCPU waiting until the listener answers;
//! with no listener the domain is stopped or kept waiting, per its policy,
//! and the reason is logged.

use crate::policy::{Altp2m, Kernel, fill, fill_ops, host_and_view};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use ipc_schema::altp2m::{Action, AltError, Filter, MAX_LISTENERS, NoListener, VmEvent};
use ipc_schema::hypercall::{Access, HC_VIEW_SWITCH, HcError, Relaxing, Status};
use ipc_schema::syscall::{EptOp, EptOpError, EptResult, Perms};
use ipc_schema::vmexit::{AccessBits, ExitKind, ExitMessage, ExitReply, Response, Then};

/// Answered events kept for late readers.
const KEPT: usize = 32;

/// What to do with the exit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answer the kernel at once.
    Reply(ExitReply),
    /// Keep the vCPU waiting (its exit is answered later); `new_event`: a
    /// listener should be told.
    Defer { new_event: bool },
    /// Answer the kernel at once, and tell the listener of an event whose
    /// vCPU does not wait (`VmEvent::paused` false).
    Tell(ExitReply),
}

/// An exit waiting for the listener's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub event: VmEvent,
    /// The kernel's reply token for the exit.
    pub token: u64,
    /// Given to a listener's `NextEvent` already.
    pub given: bool,
    /// The badge of the listener it goes to (0: none yet; it waits for
    /// one, the domain's policy being `pause`).
    pub owner: u64,
}

/// One of a domain's listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub badge: u64,
    pub filter: Filter,
}

/// A listener's `NextEvent` call, held until an event comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Poll {
    pub badge: u64,
    /// The kernel's reply token for the call.
    pub token: u64,
}

/// An EPT violation's exit: what the violation path reads of it (from a
/// decoded [`ExitMessage`], or straight from its bytes:
/// [`crate::fast::read_violation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    pub domain: u16,
    pub vcpu: u16,
    /// The view the vCPU faulted in.
    pub view: u16,
    pub rip: u64,
    pub gpa: u64,
    pub gla: Option<u64>,
    pub access: AccessBits,
    pub allowed: AccessBits,
    pub qualification: u64,
}

impl Violation {
    /// The violation of an exit message; `None` for another kind of exit.
    pub fn of(m: &ExitMessage) -> Option<Self> {
        match m.exit.kind {
            ExitKind::EptViolation {
                gpa,
                gla,
                access,
                allowed,
                qualification,
            } => Some(Violation {
                domain: m.exit.domain,
                vcpu: m.exit.vcpu,
                view: m.exit.view,
                rip: m.exit.rip,
                gpa,
                gla,
                access,
                allowed,
                qualification,
            }),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Each domain's listeners, in the order they attached.
    pub listeners: BTreeMap<u16, Vec<Listener>>,
    pub policy: BTreeMap<u16, NoListener>,
    pub waiting: Vec<Waiting>,
    /// Recent events, answered or not, for `Events { after }`.
    pub log: VecDeque<VmEvent>,
    pub next: u32,
    /// vCPUs running one instruction with pages opened by `AllowOnce`:
    /// (domain, vCPU) -> its step.
    pub stepping: BTreeMap<(u16, u16), Step>,
    /// `NextEvent` calls waiting for an event, oldest first.
    pub polls: Vec<Poll>,
    /// The badge of the listener events are forwarded to (`Forwarded`; 0:
    /// none).
    pub forwarding: u64,
    /// The event just recorded for the forwarding listener, its vCPU
    /// waiting: not in `waiting` (the kernel holds the exit for the
    /// listener once it is forwarded), to be taken at once
    /// ([`Events::take_forwardable`]) and forwarded, or put back
    /// ([`Events::unforward`]).
    pub forward: Option<Waiting>,
}

fn reply(response: Response) -> Outcome {
    Outcome::Reply(ExitReply::resume(response, None))
}

fn what(access: AccessBits) -> &'static str {
    if access.write {
        "write"
    } else if access.execute {
        "instruction fetch"
    } else {
        "read"
    }
}

/// The view-switch hypercall (`HC_VIEW_SWITCH`, the view in RBX), which
/// the kernel sends here: checked against the model and answered with the
/// switch itself (a plain answer with a view, that the kernel's fast path
/// applies), or refused (`Status::Refused` in RAX, the vCPU where it was).
fn view_switch(alt: &Altp2m, m: &ExitMessage) -> Outcome {
    let (id, vcpu) = (m.exit.domain, m.exit.vcpu);
    let checked = u16::try_from(m.regs.rbx)
        .map_err(|_| HcError::NoSuchView { view: u16::MAX })
        .and_then(|view| alt.guest_switch(id, view).map(|()| view));
    let mut regs = m.regs;
    let view = match checked {
        Ok(view) => {
            regs.rax = Status::Ok as u64;
            Some(view)
        }
        Err(e) => {
            defmt::debug!(
                "domain {=u16}: vCPU {=u16}: view switch refused: {}",
                id,
                vcpu,
                e
            );
            regs.rax = Status::Refused as u64;
            None
        }
    };
    Outcome::Reply(ExitReply {
        response: Response {
            advance: true,
            inject: None,
            then: Then::Resume,
        },
        regs: Some(regs),
        view,
        step: false,
        rip: None,
    })
}

fn allows(a: Access, access: AccessBits) -> bool {
    (!access.read || a.read) && (!access.write || a.write) && (!access.execute || a.execute)
}

impl Events {
    /// Answers an exit sent to the violation endpoint.
    pub fn exit(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        m: &ExitMessage,
        token: u64,
    ) -> Outcome {
        let id = m.exit.domain;
        match m.exit.kind {
            ExitKind::MonitorTrap => {
                let key = (id, m.exit.vcpu);
                // Still at the instruction: it has not run (a trap-flag
                // step's #DB that the fault interrupting it left pending,
                // delivered before it runs again: Bochs). Step again, its
                // pages open, once an answer (an instruction that jumps to
                // itself keeps them no longer than that).
                if let Some(s) = self.stepping.get_mut(&key)
                    && s.rip == m.exit.rip
                    && core::mem::take(&mut s.again)
                {
                    let mut again = ExitReply::resume(Response::RETRY, None);
                    again.step = true;
                    return Outcome::Reply(again);
                }
                // The step of an `AllowOnce` is done: close its pages again.
                if let Some(step) = self.stepping.remove(&key) {
                    close(alt, k, id, &step.open);
                }
                reply(Response::RETRY)
            }
            ExitKind::EptViolation { .. } => match Violation::of(m) {
                Some(x) => self.violation_exit(alt, k, &x, token),
                None => reply(Response::CRASH),
            },
            ExitKind::Hypercall if m.regs.rax == HC_VIEW_SWITCH => view_switch(alt, m),
            other => {
                defmt::error!(
                    "altp2m: domain {=u16}: an exit that is not an EPT violation came to the violation handler: {}",
                    id,
                    other
                );
                reply(Response::CRASH)
            }
        }
    }

    /// Answers an EPT violation: the common restriction by the fewest
    /// look-ups ([`Events::quiet_restriction`]), anything else the general
    /// way; the answers and the state the same either way (a property test
    /// holds the two to it).
    #[inline]
    pub fn violation_exit(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        x: &Violation,
        token: u64,
    ) -> Outcome {
        if let Some(o) = self.quiet_restriction(alt, x, token) {
            return o;
        }
        self.violation(alt, k, x, token)
    }

    /// [`Events::exit`] without the fast route: every violation the
    /// general way (for the tests that hold the two to the same answers).
    #[cfg(test)]
    pub(crate) fn exit_general(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        m: &ExitMessage,
        token: u64,
    ) -> Outcome {
        match Violation::of(m) {
            Some(x) => self.violation(alt, k, &x, token),
            None => self.exit(alt, k, m, token),
        }
    }

    /// The common violation decided in the fewest look-ups: an entry that
    /// is there (the exit's allowed bits say so) in a view of a domain
    /// with a record, where nothing can relax, copy or lift (no
    /// self-relaxing setting ever placed, no shared page, no dirty
    /// tracking), whose settings refuse the access: a restriction, for the
    /// listener or the policy, exactly as the general way reports it (the
    /// domain and the view looked up once, the view's settings once).
    /// `None`, with nothing done, for anything else.
    #[inline]
    pub(crate) fn quiet_restriction(
        &mut self,
        alt: &Altp2m,
        x: &Violation,
        token: u64,
    ) -> Option<Outcome> {
        let (a, access) = (x.allowed, x.access);
        if !(a.read || a.write || a.execute) {
            return None;
        }
        let d = alt.domains.get(&x.domain)?;
        if d.relaxing || d.tracking.is_some() || !d.shared.is_empty() {
            return None;
        }
        // (The newest view, the last, is the usual one: no search.)
        let v = match d.views.last_key_value() {
            Some((&last, v)) if last == x.view => v,
            _ => d.views.get(&x.view)?,
        };
        let gfn = x.gpa / 4096;
        // (With no tracking and no shared page, `tracked` takes nothing.)
        let (e, external) = d.settled_in(v, x.view, gfn);
        if allows(e.access, access) {
            return None;
        }
        let event = self.event_of(x, e.access, external);
        Some(self.restriction(event, gfn, token))
    }

    /// The event of violation `x`, where the entry's settings give
    /// `effective` (`external`: placed by an external agent).
    #[inline(always)]
    fn event_of(&self, x: &Violation, effective: Access, external: bool) -> VmEvent {
        VmEvent {
            id: self.next,
            domain: x.domain,
            vcpu: x.vcpu,
            view: x.view,
            gpa: x.gpa,
            gla: x.gla,
            access: x.access,
            allowed: AccessBits {
                read: effective.read,
                write: effective.write,
                execute: effective.execute,
            },
            rip: x.rip,
            internal: !external,
            paused: true,
            qualification: x.qualification,
        }
    }

    /// A restriction: the listener hears of `event` (its vCPU waiting),
    /// or the domain's no-listener policy decides.
    fn restriction(&mut self, event: VmEvent, gfn: u64, token: u64) -> Outcome {
        let (id, access) = (event.domain, event.access);
        if let Some(owner) = self.route(id, gfn, access) {
            return self.record(event, token, owner);
        }
        let (gpa, view, allowed) = (event.gpa, event.view, event.allowed);
        match self.policy.get(&id).copied().unwrap_or(NoListener::Crash) {
            NoListener::Crash => {
                defmt::error!(
                    "domain {=u16}: {=str} of {=u64:#x} (linear {=u64:#x}) in view {=u16} not allowed (page allows {=bool}/{=bool}/{=bool} read/write/execute; qualification {=u64:#x}); no listener, so the domain is stopped",
                    id,
                    what(access),
                    gpa,
                    event.gla.unwrap_or(gpa),
                    view,
                    allowed.read,
                    allowed.write,
                    allowed.execute,
                    event.qualification
                );
                reply(Response::CRASH)
            }
            NoListener::Pause => {
                defmt::warn!(
                    "domain {=u16}: {=str} of {=u64:#x} in view {=u16} not allowed; no listener, so vCPU {=u16} waits for one (event {=u32})",
                    id,
                    what(access),
                    gpa,
                    view,
                    event.vcpu,
                    event.id
                );
                self.record(event, token, 0)
            }
        }
    }

    /// Any EPT violation, the general way.
    fn violation(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        x: &Violation,
        token: u64,
    ) -> Outcome {
        let (id, view) = (x.domain, x.view);
        let (gpa, gla, access, allowed, qualification) =
            (x.gpa, x.gla, x.access, x.allowed, x.qualification);
        let gfn = gpa / 4096;
        // An entry that allows something is there, and maps a frame of the
        // host p2m's RAM (the kernel maps nothing else into a view): the
        // exit says so, and the kernel need not be asked. Otherwise, what
        // the host p2m and the faulting view hold, in one call.
        let (ram, populated) = if allowed.read || allowed.write || allowed.execute {
            (true, true)
        } else {
            let (host, here) = host_and_view(k, id, view, gfn);
            (host.is_some(), here.is_some())
        };
        if !ram {
            defmt::error!(
                "domain {=u16}: {=str} of guest-physical {=u64:#x} (linear {=u64:#x}), which is not RAM (qualification {=u64:#x})",
                id,
                what(access),
                gpa,
                gla.unwrap_or(gpa),
                qualification
            );
            return reply(Response::CRASH);
        }
        let d = match alt.domains.get(&id) {
            Some(d) => d,
            None if !k.room() => {
                defmt::error!(
                    "altp2m: domain {=u16}: no room left in the service's heap for its records; domain stopped",
                    id
                );
                return reply(Response::CRASH);
            }
            None => alt.domain(id),
        };
        if !d.views.contains_key(&view) {
            // A view this service does not know: one its predecessor made
            // and `Altp2m::reset` destroyed while this exit waited. The
            // vCPU goes on in view 0 (where reset put it).
            defmt::warn!(
                "altp2m: domain {=u16}: an exit from view {=u16}, which this service does not know (destroyed when it started); resumed in view 0",
                id,
                view
            );
            return Outcome::Reply(ExitReply::resume(Response::RETRY, Some(0)));
        }
        // What of the domain's constraints can apply (each asked of the
        // model below only then: the same answers, fewer look-ups).
        let (relaxing, shared, tracking) = (
            d.relaxing,
            access.write && !d.shared.is_empty(),
            access.write && d.tracking.is_some(),
        );
        // Xen's relaxing access types: the page's own setting relaxes
        // itself (rx2rw silently; of n2rwx the listener hears afterwards),
        // before dirty tracking has its say on the write.
        let relaxed = if !relaxing {
            None
        } else {
            alt.relax(k, id, view, gfn, access).unwrap_or_else(|e| {
            defmt::warn!(
                "altp2m: domain {=u16}: gfn {=u64:#x} in view {=u16} could not relax its access ({}); handled as a restriction",
                id,
                gfn,
                view,
                e
            );
            None
        })
        };
        // SH-2: a write to a shared page (its settings allow the write) is
        // a copy-on-write break: the writer gets its private copy and
        // retries. Without a frame for the copy the write is a restriction
        // like any other: the domain's listener hears of it, or its
        // no-listener policy stops it or keeps the vCPU waiting; never
        // another domain.
        let mut no_copy = false;
        match if shared {
            alt.cow(k, id, view, gfn, access)
        } else {
            Ok(false)
        } {
            Ok(false) => {}
            Ok(true) => return reply(Response::RETRY),
            Err(e) => {
                defmt::warn!(
                    "altp2m: domain {=u16}: a write to the shared page {=u64:#x} (view {=u16}) could not get its private copy ({}); the domain's listener or policy decides",
                    id,
                    gpa,
                    view,
                    e
                );
                no_copy = true;
            }
        }
        // LD-2: a write that only dirty tracking refused is logged (the
        // frame marked dirtied, its entries writable again) and retried.
        let lifted = if no_copy || !tracking {
            Ok(false)
        } else {
            alt.lift(k, id, view, gfn, access)
        };
        match lifted {
            Ok(false) => {}
            // An n2rwx page lifted too: on, for its notice.
            Ok(true) if relaxed.is_some() => {}
            Ok(true) => {
                if !populated && fill(k, id, &alt.domains[&id], view, gfn).is_err() {
                    defmt::error!(
                        "altp2m: domain {=u16}: filling {=u64:#x} in view {=u16} after a tracked write failed",
                        id,
                        gpa,
                        view
                    );
                    return reply(Response::CRASH);
                }
                return reply(Response::RETRY);
            }
            Err(e) => {
                defmt::error!(
                    "altp2m: domain {=u16}: a tracked write to {=u64:#x} in view {=u16} could not be let through ({}); domain stopped",
                    id,
                    gpa,
                    view,
                    e
                );
                return reply(Response::CRASH);
            }
        }
        let d = &alt.domains[&id];
        let (plain, external) = d.settled(view, gfn);
        let effective = d.tracked(plain, view, gfn);
        // ALT-6: fill from the host p2m (with the view's settings). An entry
        // that is there and faulted an access the model allows is written
        // again too: the table, not the model, is wrong (a restriction
        // nobody here made), and retrying alone would fault for ever. (A
        // setting that relaxed just now has had its entry written.)
        if !populated || allows(effective.access, access) && relaxed.is_none() {
            let ops = fill_ops(d, view, gfn);
            let mut out = [EptResult::Done; 4];
            let out = &mut out[..ops.len()];
            let failed = k.ept(id, &ops, out).is_err();
            // A shared page this instance's model does not hold (shared
            // before it started): the kernel refuses it write (SH-2). It
            // is learnt, and the write is a copy-on-write break.
            if !failed
                && access.write
                && out
                    .iter()
                    .any(|r| matches!(r, EptResult::Error(EptOpError::Shared)))
            {
                let frame = plain.frame_gfn.unwrap_or(gfn);
                alt.domain(id).shared.insert(frame, 0);
                return match alt.cow(k, id, view, gfn, access) {
                    Ok(true) => reply(Response::RETRY),
                    _ => {
                        defmt::error!(
                            "altp2m: domain {=u16}: a write to the shared page {=u64:#x} (view {=u16}) could not get its private copy; domain stopped",
                            id,
                            gpa,
                            view
                        );
                        reply(Response::CRASH)
                    }
                };
            }
            if failed || out.iter().any(|r| matches!(r, EptResult::Error(_))) {
                defmt::error!(
                    "altp2m: domain {=u16}: lazy fill of {=u64:#x} in view {=u16} failed",
                    id,
                    gpa,
                    view
                );
                return reply(Response::CRASH);
            }
        }
        let mut event = self.event_of(x, effective.access, external);
        if allows(effective.access, access) {
            // Filled just now, or a fault the entry no longer deserves, or
            // an n2rwx page's first access, which the listener hears of.
            let owner = self.route(id, gfn, access);
            if relaxed == Some(Relaxing::N2Rwx)
                && let Some(owner) = owner
            {
                event.paused = false;
                if self.record(event, 0, owner) == (Outcome::Defer { new_event: true }) {
                    return Outcome::Tell(ExitReply::resume(Response::RETRY, None));
                }
            }
            return reply(Response::RETRY);
        }
        // A restriction: the listener hears of it, or the policy decides.
        self.restriction(event, gfn, token)
    }

    /// The listener a violation of `domain` at `gfn` goes to: the first
    /// attached whose filter takes it.
    pub fn route(&self, domain: u16, gfn: u64, access: AccessBits) -> Option<u64> {
        self.listeners
            .get(&domain)?
            .iter()
            .find(|l| l.filter.takes(gfn, access))
            .map(|l| l.badge)
    }

    /// Whether `badge` is attached to `domain`.
    fn attached(&self, domain: u16, badge: u64) -> bool {
        self.listeners
            .get(&domain)
            .is_some_and(|l| l.iter().any(|l| l.badge == badge))
    }

    /// The listener waiting event `event` goes to, if one is attached.
    pub fn owner_of(&self, event: u32) -> Option<(u16, Option<u64>)> {
        self.owner_at(self.find(event)?)
    }

    /// Where waiting event `event` is in `waiting`.
    #[inline]
    pub fn find(&self, event: u32) -> Option<usize> {
        self.waiting.iter().position(|w| w.event.id == event)
    }

    /// [`Events::owner_of`] of the waiting event at `i` (of [`Events::find`]).
    #[inline]
    pub fn owner_at(&self, i: usize) -> Option<(u16, Option<u64>)> {
        let w = self.waiting.get(i)?;
        let d = w.event.domain;
        Some((d, Some(w.owner).filter(|&o| self.attached(d, o))))
    }

    /// Keeps `event` waiting for an answer from listener `owner` (0: none
    /// yet), its vCPU waiting, or, with no room for it in the heap, stops
    /// the domain.
    fn record(&mut self, event: VmEvent, token: u64, owner: u64) -> Outcome {
        if self.waiting.try_reserve(1).is_err() || self.log.try_reserve(1).is_err() {
            defmt::error!(
                "altp2m: domain {=u16}: no room left in the service's heap for event {=u32}; domain stopped",
                event.domain,
                event.id
            );
            return reply(Response::CRASH);
        }
        self.next = self.next.wrapping_add(1);
        let w = Waiting {
            event,
            token,
            given: false,
            owner,
        };
        // (Room in `waiting` stays reserved for a forward put back.)
        if owner != 0 && owner == self.forwarding && event.paused && self.forward.is_none() {
            self.forward = Some(w);
        } else {
            self.waiting.push(w);
        }
        self.log.push_back(event);
        // Forget old answered events; waiting ones stay readable. (With
        // none waiting, the usual case when events are forwarded, the
        // oldest goes.)
        if self.waiting.is_empty() && self.log.len() > KEPT {
            self.log.pop_front();
        }
        while self.log.len() > KEPT + self.waiting.len() {
            let Some(pos) = self
                .log
                .iter()
                .position(|e| !self.waiting.iter().any(|w| w.event.id == e.id))
            else {
                break;
            };
            self.log.remove(pos);
        }
        Outcome::Defer { new_event: true }
    }

    /// The event just recorded (`Outcome::Defer { new_event: true }`) to
    /// be forwarded, if its listener is the forwarding one and its vCPU
    /// waits (never put in `waiting`: the kernel keeps the vCPU waiting
    /// then, and the log keeps the event).
    pub fn take_forwardable(&mut self) -> Option<Waiting> {
        self.forward.take()
    }

    /// A forward the kernel refused (the listener did not wait): the event
    /// waits for its listener as any other.
    pub fn unforward(&mut self, w: Waiting) {
        self.waiting.push(w);
    }

    /// Forgets a domain that ended: its listener, policy, waiting events
    /// (their vCPU will not run again) and single step.
    pub fn forget(&mut self, domain: u16) {
        self.listeners.remove(&domain);
        self.policy.remove(&domain);
        self.waiting.retain(|w| w.event.domain != domain);
        self.stepping.retain(|&(d, _), _| d != domain);
    }

    /// Every domain it keeps something for.
    pub fn domains(&self) -> impl Iterator<Item = u16> + '_ {
        self.listeners
            .keys()
            .chain(self.policy.keys())
            .copied()
            .chain(self.waiting.iter().map(|w| w.event.domain))
            .chain(self.stepping.keys().map(|&(d, _)| d))
    }

    /// The oldest waiting event of a domain `badge` listens to that no
    /// `NextEvent` was given yet, marked given.
    pub fn next_for(&mut self, badge: u64) -> Option<VmEvent> {
        self.next_at(badge).map(|i| self.waiting[i].event)
    }

    /// [`Events::next_for`], the event's place in `waiting` (no copy of it).
    #[inline]
    pub fn next_at(&mut self, badge: u64) -> Option<usize> {
        let i = self
            .waiting
            .iter()
            .position(|w| !w.given && w.owner == badge)?;
        self.waiting[i].given = true;
        Some(i)
    }

    /// Whether `badge` is the listener of some domain.
    pub fn listens(&self, badge: u64) -> bool {
        self.listeners
            .values()
            .any(|l| l.iter().any(|l| l.badge == badge))
    }

    /// The held `NextEvent` calls of clients that listen to no domain any
    /// more: their tokens, the calls no longer held.
    pub fn stale_polls(&mut self) -> Vec<u64> {
        let listeners = &self.listeners;
        let mut stale = Vec::new();
        self.polls.retain(|p| {
            let keep = listeners
                .values()
                .any(|l| l.iter().any(|l| l.badge == p.badge));
            if !keep {
                stale.push(p.token);
            }
            keep
        });
        stale
    }

    /// A held `NextEvent` call of a listener with an event to give: the
    /// call's token and the event (marked given), the call no longer held.
    pub fn poll_answer(&mut self) -> Option<(u64, VmEvent)> {
        self.poll_answer_at()
            .map(|(token, i)| (token, self.waiting[i].event))
    }

    /// [`Events::poll_answer`], the event's place in `waiting` (no copy of
    /// it: the caller encodes it from there).
    #[inline]
    pub fn poll_answer_at(&mut self) -> Option<(u64, usize)> {
        for p in 0..self.polls.len() {
            if let Some(i) = self.next_at(self.polls[p].badge) {
                return Some((take(&mut self.polls, p).token, i));
            }
        }
        None
    }

    /// An event given to a call that could not be answered (its caller
    /// gone): to be given again.
    pub fn ungive(&mut self, event: u32) {
        if let Some(w) = self.waiting.iter_mut().find(|w| w.event.id == event) {
            w.given = false;
        }
    }

    /// The events after number `after`, oldest first, at most `max`.
    pub fn after(&self, after: u32, max: usize) -> Vec<VmEvent> {
        self.log
            .iter()
            .filter(|e| {
                after == u32::MAX || e.id.wrapping_sub(after).wrapping_sub(1) < u32::MAX / 2
            })
            .take(max)
            .copied()
            .collect()
    }

    /// Attaches or detaches `badge` as a listener of the domain for every
    /// violation (`Listen`).
    pub fn listen(&mut self, domain: u16, badge: u64, on: bool) -> Result<(), AltError> {
        if on {
            self.listen_for(domain, badge, Filter::ALL)
        } else {
            if let Some(l) = self.listeners.get_mut(&domain) {
                l.retain(|l| l.badge != badge);
                if l.is_empty() {
                    self.listeners.remove(&domain);
                }
            }
            self.reroute(domain);
            Ok(())
        }
    }

    /// Detaches `badge` as a listener of the domain (`Listen { on: false
    /// }`): the events waiting for its answer go to another listener that
    /// takes them, and the rest are released ([`Events::release`]); the
    /// answers to send are returned.
    pub fn detach(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        domain: u16,
        badge: u64,
    ) -> Result<Vec<(u64, ExitReply)>, AltError> {
        let held = self.held_by(domain, badge);
        self.listen(domain, badge, false)?;
        Ok(self.release(alt, k, &held))
    }

    /// The numbers of the events of `domain` waiting for `badge`'s answer
    /// (to [`Events::release`] once it has detached).
    pub fn held_by(&self, domain: u16, badge: u64) -> Vec<u32> {
        self.waiting
            .iter()
            .filter(|w| w.event.domain == domain && w.owner == badge)
            .map(|w| w.event.id)
            .collect()
    }

    /// Events `held` (of [`Events::held_by`]), their listener detached:
    /// each that no other listener took is answered `Retry`, the answers to
    /// send returned. The vCPU tries the access again: it goes through if
    /// the listener undid its restriction first (a watch puts the domain
    /// back in view 0 before it stops listening), or meets the domain's
    /// no-listener policy as a new violation (`Pause` keeps it waiting for
    /// the next listener, `Crash` stops the domain, saying why). A vCPU is
    /// never left waiting for an answer nobody is there to give (as Xen
    /// resumes the vCPUs paused on a monitor ring it tears down).
    pub fn release(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        held: &[u32],
    ) -> Vec<(u64, ExitReply)> {
        let mut out = Vec::new();
        for &id in held {
            let i = self.find(id).filter(|&i| self.waiting[i].owner == 0);
            if let Ok(Some(answer)) = self.answer_at(alt, k, 0, i, Action::Retry) {
                out.push(answer);
            }
        }
        out
    }

    /// Attaches `badge` as a listener of the domain for the violations
    /// `filter` takes, or changes its filter (`ListenFor`). Events waiting
    /// for a listener, or for one that left, go to the first that takes
    /// them.
    pub fn listen_for(&mut self, domain: u16, badge: u64, filter: Filter) -> Result<(), AltError> {
        let list = self.listeners.entry(domain).or_default();
        if let Some(l) = list.iter_mut().find(|l| l.badge == badge) {
            l.filter = filter;
        } else if filter == Filter::ALL && list.iter().any(|l| l.filter == Filter::ALL) {
            return Err(AltError::ListenerBusy);
        } else if list.len() >= MAX_LISTENERS {
            return Err(AltError::TooManyListeners);
        } else {
            if list.try_reserve(1).is_err() {
                return Err(AltError::OutOfMemory);
            }
            list.push(Listener { badge, filter });
        }
        self.reroute(domain);
        Ok(())
    }

    /// Waiting events of `domain` whose listener is gone (or that had
    /// none) go to the first listener that takes them, told anew under new
    /// numbers so that one that attaches late hears of them.
    fn reroute(&mut self, domain: u16) {
        for i in 0..self.waiting.len() {
            let w = self.waiting[i];
            if w.event.domain != domain || self.attached(domain, w.owner) {
                continue;
            }
            let gfn = w.event.gpa / 4096;
            let Some(owner) = self.route(domain, gfn, w.event.access) else {
                self.waiting[i].owner = 0;
                continue;
            };
            let mut e = w.event;
            self.log.retain(|l| l.id != e.id);
            e.id = self.next;
            self.next = self.next.wrapping_add(1);
            self.waiting[i] = Waiting {
                event: e,
                given: false,
                owner,
                ..w
            };
            self.log.push_back(e);
        }
    }

    /// The listener's answer: the exit to answer (its token and reply);
    /// `None` for an event whose vCPU did not wait (its `SetAccess` is
    /// applied, nothing is resumed).
    pub fn answer(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        badge: u64,
        event: u32,
        action: Action,
    ) -> Result<Option<(u64, ExitReply)>, AltError> {
        let i = self.find(event);
        self.answer_at(alt, k, badge, i, action)
    }

    /// [`Events::answer`] of the waiting event at `i` (of [`Events::find`]:
    /// `None`, no such event).
    pub fn answer_at(
        &mut self,
        alt: &mut Altp2m,
        k: &mut impl Kernel,
        badge: u64,
        i: Option<usize>,
        action: Action,
    ) -> Result<Option<(u64, ExitReply)>, AltError> {
        let i = i
            .filter(|&i| i < self.waiting.len())
            .ok_or(AltError::NoSuchEvent)?;
        // What the answer needs of the event (no copy of all of it).
        let w = &self.waiting[i];
        let (token, owner) = (w.token, w.owner);
        let e = Answered {
            id: w.event.id,
            domain: w.event.domain,
            vcpu: w.event.vcpu,
            view: w.event.view,
            gpa: w.event.gpa,
            rip: w.event.rip,
            paused: w.event.paused,
        };
        let event = e.id;
        if owner != badge && self.attached(e.domain, owner) {
            return Err(AltError::ListenerBusy);
        }
        let gfn = e.gpa / 4096;
        let mut out = ExitReply {
            response: Response::RETRY,
            regs: None,
            view: None,
            step: false,
            rip: None,
        };
        // The vCPU of an n2rwx notice went on long ago: only an access
        // change applies to it.
        let action = match action {
            Action::SetAccess(_) => action,
            _ if !e.paused => Action::Retry,
            _ => action,
        };
        match action {
            Action::Retry => {}
            Action::Crash => out.response = Response::CRASH,
            Action::Skip { length } => {
                // The length comes from the listener: EPT violations do not
                // report one.
                out.rip = Some(e.rip.wrapping_add(u64::from(length)));
            }
            Action::SwitchView(v) => {
                // (A domain with no record yet has view 0 alone, and one
                // with a record always view 0: `Domain::default`, and
                // `ViewDestroy` refuses view 0.)
                let exists = v == 0
                    || alt
                        .domains
                        .get(&e.domain)
                        .is_some_and(|d| d.views.contains_key(&v));
                if !exists {
                    return Err(AltError::NoSuchView);
                }
                out.view = Some(v);
            }
            Action::SetAccess(a) => {
                let r = alt.request(
                    k,
                    e.domain,
                    crate::policy::Agent::External,
                    &ipc_schema::hypercall::Request::SetAccess {
                        view: e.view,
                        gfn,
                        access: a,
                    },
                );
                if let ipc_schema::hypercall::Reply::Error(err) = r {
                    defmt::warn!(
                        "altp2m: answer to event {=u32}: the access change was refused: {}",
                        event,
                        err
                    );
                }
            }
            Action::AllowOnce => {
                // Never more than the host p2m gives the frame (issue 13).
                let open = alt
                    .open_once(k, e.domain, e.view, gfn)
                    .map_err(|e| match e {
                        HcError::NoSuchView { .. } => AltError::NoSuchView,
                        _ => AltError::OutOfMemory,
                    })?;
                let ops = [EptOp::Protect {
                    view: e.view,
                    gfn,
                    perms: perms(open),
                }];
                let mut r = [EptResult::Done];
                let _ = k.ept(e.domain, &ops, &mut r);
                // With the pages opened before in the same step (the
                // instruction faulted again before it completed).
                let step = self.stepping.entry((e.domain, e.vcpu)).or_default();
                if step.rip != e.rip {
                    close(alt, k, e.domain, &step.open);
                    *step = Step {
                        rip: e.rip,
                        ..Step::default()
                    };
                }
                step.again = true;
                if !step.open.contains(&(e.view, gfn)) {
                    if step.open.len() == STEP_PAGES {
                        close(alt, k, e.domain, &[step.open.remove(0)]);
                    }
                    step.open.push((e.view, gfn));
                }
                out.step = true;
            }
        }
        take(&mut self.waiting, i);
        Ok(e.paused.then_some((token, out)))
    }
}

/// What [`Events::answer_at`] needs of the event answered.
struct Answered {
    id: u32,
    domain: u16,
    vcpu: u16,
    view: u16,
    gpa: u64,
    rip: u64,
    paused: bool,
}

/// `v.remove(i)`, the last element (the usual one) without a call to
/// move the rest.
#[inline(always)]
fn take<T>(v: &mut Vec<T>, i: usize) -> T {
    if i + 1 == v.len()
        && let Some(x) = v.pop()
    {
        return x;
    }
    v.remove(i)
}

/// A vCPU's step through one instruction with pages `AllowOnce` opened:
/// the instruction's address, and the (view, gfn) of each page, oldest
/// first. An instruction may fault on several pages before it completes
/// (a write that straddles two, a copy from one to another): each answer
/// opens one more, all stay open until the step ends (the vCPU past the
/// instruction), and all are closed then; at most [`STEP_PAGES`].
/// `again`: whether a step's end with the vCPU still at the instruction is
/// taken as "not run yet" (once an answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub rip: u64,
    pub open: Vec<(u16, u64)>,
    pub again: bool,
}

/// The most pages one vCPU's step keeps open at once (`AllowOnce` answers
/// before its instruction completes): more than one x86 instruction
/// touches (its code, a source and a destination, each of which may
/// straddle two pages); past it the oldest is closed again.
pub const STEP_PAGES: usize = 8;

/// Closes pages `open` of `domain` that a step opened: each back to what
/// the view's settings give it.
/// (One kernel call for them all.)
fn close(alt: &mut Altp2m, k: &mut impl Kernel, domain: u16, open: &[(u16, u64)]) {
    let d = alt.domain(domain);
    let ops: heapless::Vec<EptOp, STEP_PAGES> = open
        .iter()
        .take(STEP_PAGES)
        .map(|&(view, gfn)| EptOp::Protect {
            view,
            gfn,
            perms: perms(d.effective(view, gfn).access),
        })
        .collect();
    let mut out = [EptResult::Done; STEP_PAGES];
    let _ = k.ept(domain, &ops, &mut out[..ops.len()]);
}

fn perms(a: Access) -> Perms {
    Perms {
        read: a.read,
        write: a.write,
        execute: a.execute,
    }
}
