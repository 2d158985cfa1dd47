//! altp2m: owner of every domain's alternate views.
//!
//! Endpoints it serves:
//! - `violations`: the kernel sends each domain's EPT violations here
//!   (filled lazily, or reported as VM events, ALT-4, ALT-6);
//! - `altp2m-guest`: in-guest agents' requests, forwarded by the vmm
//!   (`AltRequest::Guest` only);
//! - `altp2m`: external agents (the console for the host, other
//!   services): view operations, modes, listeners and their answers;
//! - `altp2m-track`: the logdirty service's tracking constraint
//!   (`Track`, `DirtyTake`, `Rearm`; only there, so that no other client
//!   can disarm the tracking a log depends on).
//! - `altp2m-share`: the sharing service's constraint (`ShareNominate`,
//!   `ShareMap`, `Unshare`, `ShareBreaks`; only there: docs/sharing.md).
//!
//! It holds a `domains` handle with the views and vCPU-control rights, and
//! nothing that reads or writes guest memory. With an `altp2m-events`
//! notification it signals bit 0 there whenever a new event waits. With a
//! `domain-ends` notification it asks the kernel to signal it when a domain
//! ends, and forgets that domain's records.
//!
//! What it keeps per domain is bounded (`policy::QUOTAS`) and checked for
//! room in its heap before it grows. A restarted or swapped-in instance
//! starts without its predecessor's records, so before its first request
//! it resets every domain's views to what its empty model describes
//! (`Altp2m::reset`).

#![no_std]
#![no_main]

extern crate alloc;

use ipc_schema::altp2m::{
    ALTP2M, Action, AltError, AltReply, AltRequest, BREAKS_PER_REPLY, EVENTS_PER_REPLY,
    MAX_WAITING_LISTENERS, PING, PONG, short,
};
use ipc_schema::exitcodec;
use ipc_schema::ipc::{BoundedVec, InterfaceId, IpcError};
use ipc_schema::logdirty::{GfnRange, RANGES_PER_REPLY};
use ipc_schema::manifest::introspection;
use ipc_schema::syscall::{DomainState, EptOp, EptResult, Handle, MAX_EPT_OPS, SysError, VcpuOp};
use ipc_schema::vmexit::{ExitReply, Response, VMEXIT};
use service_altp2m::events::{Events, Outcome, Poll, Waiting};
use service_altp2m::fast;
use service_altp2m::policy::{Agent, Altp2m, HEAP_BYTES, Kernel, ROOM};
use service_runtime::ipc::{self, DEFER, Message, Service};
use service_runtime::rights::Rights;
use service_runtime::{handle, require, sys};

service_runtime::entry!(main);
service_runtime::interfaces!(ALTP2M, VMEXIT);
service_heap::heap!(HEAP_BYTES);

struct System {
    domains: Handle,
    features: u64,
    /// The encoded batch and its results for EPT_OPS, kept (not zeroed
    /// call after call) and together in one page, where the kernel reads
    /// and writes them in place.
    ept: alloc::boxed::Box<EptBuffers>,
}

#[repr(C, align(2048))]
struct EptBuffers {
    encoded: [u8; 1024],
    results: [u8; 1024],
}

impl Kernel for System {
    fn features(&self) -> u64 {
        self.features
    }

    fn view_create(&mut self, domain: u16) -> Result<u16, SysError> {
        sys::view_create(self.domains, domain)
    }

    fn view_destroy(&mut self, domain: u16, view: u16) -> Result<(), SysError> {
        sys::view_destroy(self.domains, domain, view)
    }

    fn view_set_visible(&mut self, domain: u16, view: u16, visible: bool) -> Result<(), SysError> {
        sys::view_set_visible(self.domains, domain, view, visible)
    }

    fn ept(&mut self, domain: u16, ops: &[EptOp], out: &mut [EptResult]) -> Result<(), SysError> {
        let mut list: BoundedVec<EptOp, MAX_EPT_OPS> = BoundedVec::new();
        list.0
            .extend_from_slice(ops)
            .map_err(|_| SysError::BadArgument)?;
        let EptBuffers { encoded, results } = &mut *self.ept;
        let bytes = postcard::to_slice(&list, encoded).map_err(|_| SysError::BadArgument)?;
        let n = sys::ept_ops(self.domains, domain, bytes, results)?;
        let got: BoundedVec<EptResult, MAX_EPT_OPS> =
            postcard::from_bytes(&results[..n]).map_err(|_| SysError::BadArgument)?;
        for (o, r) in out.iter_mut().zip(got.0.iter()) {
            *o = *r;
        }
        Ok(())
    }

    fn vcpu_set_view(&mut self, domain: u16, vcpu: u16, view: u16) -> Result<(), SysError> {
        sys::vcpu_set_view(self.domains, domain, vcpu, view)
    }

    fn vcpu_view(&mut self, domain: u16, vcpu: u16) -> Result<u16, SysError> {
        sys::vcpu_info(self.domains, domain, vcpu).map(|(view, _)| view)
    }

    fn vcpu_control(
        &mut self,
        domain: u16,
        vcpu: u16,
        op: VcpuOp,
        arg: u64,
    ) -> Result<(), SysError> {
        sys::vcpu_control(self.domains, domain, vcpu, op, arg)
    }

    fn lifted_take(&mut self, domain: u16, out: &mut [u64]) -> Result<(usize, bool), SysError> {
        sys::lifted_take(self.domains, domain, out)
    }

    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)> {
        sys::domain_info(self.domains, domain)
            .ok()
            .map(|(state, _, ram)| (state, ram / 4096))
    }

    fn domain_birth(&mut self, domain: u16) -> Option<u64> {
        sys::domain_birth(self.domains, domain).ok()
    }

    fn room(&self) -> bool {
        heap_room(ROOM)
    }
}

struct Server {
    violations: Handle,
    external: Handle,
    guest: Option<Handle>,
    track: Option<Handle>,
    share: Option<Handle>,
    events_note: Option<Handle>,
    /// `listener-events`: the endpoint of the listener that takes
    /// forwarded events (`AltRequest::Forwarded`).
    forward_to: Option<Handle>,
    /// Signalled by the kernel when a domain ends.
    domain_ends: Option<Handle>,
    /// The birth of each domain with records (`forget_ended`).
    births: service_runtime::births::Births,
    /// Started without its predecessor's records: reset the views before
    /// the first request.
    reset_pending: bool,
    system: System,
    /// What the manifest lets each caller do to each domain.
    rights: Rights,
    alt: Altp2m,
    events: Events,
}

impl Server {
    /// Before the first request of an instance that is not the first:
    /// every domain back to what the (empty) model describes.
    /// (One test on every request; the reset itself out of line.)
    #[inline(always)]
    fn start(&mut self) {
        if self.reset_pending {
            self.reset();
        }
    }

    #[cold]
    #[inline(never)]
    fn reset(&mut self) {
        self.reset_pending = false;
        let done = self.alt.reset(&mut self.system);
        for r in &done {
            defmt::warn!(
                "altp2m: domain {=u16}: started without the records of its views, so they are reset: {=u16} alternate view(s) destroyed, vCPU 0 back in view 0 (was in view {=u16}), the host p2m rwx again",
                r.domain,
                r.views,
                r.was_in
            );
        }
        defmt::info!(
            "altp2m: views reset in {=usize} domain(s); mode, listeners and policies are the defaults again",
            done.len()
        );
    }

    /// Why a request naming `domain` is refused before anything is done:
    /// no domain has the id, or it has ended. (An ended domain's views went
    /// with it and its records are forgotten: a request must not make new
    /// ones, and whoever asks is told the truth, not "no such view".)
    fn gone(&self, domain: u16) -> Option<AltError> {
        match sys::domain_info(self.system.domains, domain) {
            Err(_) => Some(AltError::NoSuchDomain),
            Ok((state, _, _)) if !DomainState::live(state) => Some(AltError::DomainEnded),
            Ok(_) => None,
        }
    }

    fn signal_event(&self) {
        if let Some(n) = self.events_note {
            let _ = sys::notify(n, 1);
        }
    }

    /// Answers a request on the `altp2m-share` endpoint (SH-1..SH-4).
    fn sharing(&mut self, request: AltRequest) -> AltReply {
        let k = &mut self.system;
        let result = match request {
            AltRequest::Ping => Ok(AltReply::Pong),
            AltRequest::ShareNominate { domain, gfn } => self.alt.share_nominate(k, domain, gfn),
            AltRequest::ShareMap { domain, gfn, frame } => {
                self.alt.share_map(k, domain, gfn, frame)
            }
            AltRequest::Unshare { domain, gfn } => self.alt.unshare(k, domain, gfn),
            AltRequest::ShareBreaks => {
                let (taken, more) = self.alt.take_breaks(BREAKS_PER_REPLY);
                let mut breaks = BoundedVec::new();
                for b in taken {
                    let _ = breaks.0.push(b);
                }
                Ok(AltReply::Breaks { breaks, more })
            }
            _ => Err(AltError::WrongEndpoint),
        };
        result.unwrap_or_else(AltReply::Refused)
    }

    /// Answers a request on the `altp2m-track` endpoint.
    fn tracking(&mut self, request: AltRequest) -> AltReply {
        match request {
            AltRequest::Ping => AltReply::Pong,
            AltRequest::Track { domain, range, how } => {
                match self.alt.track(&mut self.system, domain, range, how) {
                    Ok(()) => AltReply::Done,
                    Err(e) => AltReply::Refused(e),
                }
            }
            AltRequest::DirtyTake { domain, from } => {
                match self
                    .alt
                    .dirty_take(&mut self.system, domain, from, RANGES_PER_REPLY)
                {
                    Ok((taken, next)) => {
                        let mut ranges = BoundedVec::new();
                        for (gfn, count) in taken {
                            let _ = ranges.0.push(GfnRange { gfn, count });
                        }
                        AltReply::Dirtied { ranges, next }
                    }
                    Err(e) => AltReply::Refused(e),
                }
            }
            AltRequest::Rearm { domain, ranges } => {
                match self.alt.rearm(&mut self.system, domain, &ranges.0) {
                    Ok(()) => AltReply::Done,
                    Err(e) => AltReply::Refused(e),
                }
            }
            _ => AltReply::Refused(AltError::WrongEndpoint),
        }
    }

    /// Whether the manifest lets the caller with `badge` do `right` (a
    /// `manifest::introspection` bit) to `domain`; a refusal is logged.
    fn may(&mut self, badge: u64, domain: u16, right: u8) -> bool {
        let birth = self.system.domain_birth(domain);
        let ok = self.rights.allows(badge, domain, right, birth);
        if !ok {
            defmt::warn!(
                "altp2m: caller {=u64:#x} may not use `{=str}` on domain {=u16} (the manifest's introspection); refused",
                badge,
                service_runtime::rights::name(right),
                domain
            );
        }
        ok
    }

    /// `Ok` if the caller may answer `event` (`events` on its domain):
    /// `Ok(true)` where the caller is the attached listener it goes to.
    fn may_answer(&mut self, badge: u64, event: u32) -> Result<bool, AltError> {
        self.may_answer_at(badge, self.events.find(event))
    }

    /// [`Server::may_answer`] of the waiting event at `i` (`Events::find`).
    fn may_answer_at(&mut self, badge: u64, i: Option<usize>) -> Result<bool, AltError> {
        match i.and_then(|i| self.events.owner_at(i)) {
            // Its attached listener had `events` when it attached.
            Some((_, Some(owner))) if owner == badge => Ok(true),
            Some((d, _)) if !self.may(badge, d, introspection::EVENTS) => Err(AltError::NotAllowed),
            _ => Ok(false),
        }
    }

    /// A listener's answer to `event`: applied, and the vCPU resumed.
    fn answer(&mut self, badge: u64, event: u32, action: Action) -> Result<(), AltError> {
        self.may_answer(badge, event)?;
        if let Some((token, exit_reply)) =
            self.events
                .answer(&mut self.alt, &mut self.system, badge, event, action)?
        {
            resume(token, &exit_reply);
        }
        Ok(())
    }

    /// `NextEvent`: the answer applied, then the caller's next event now,
    /// or the call held until one comes. Where the call is held, the
    /// answered vCPU is resumed by this answer itself
    /// ([`ipc::answer_instead`]: one REPLY_RECV); `DEFER` where there is
    /// nothing to answer now.
    fn next_event(
        &mut self,
        badge: u64,
        token: u64,
        answer: Option<(u32, Action)>,
        out: &mut [u8],
    ) -> usize {
        let reply = |a: AltReply, out: &mut [u8]| ipc::encode_reply::<AltReply>(&Ok(a), out);
        let mut resumed = None;
        // The caller answered as an attached listener: it listens.
        let mut listens = false;
        if let Some((event, action)) = answer {
            // The event looked for once, for both the check and the answer.
            let i = self.events.find(event);
            match self.may_answer_at(badge, i) {
                Ok(own) => listens = own,
                Err(e) => return reply(AltReply::Refused(e), out),
            }
            match self
                .events
                .answer_at(&mut self.alt, &mut self.system, badge, i, action)
            {
                Ok(r) => resumed = r,
                Err(e) => return reply(AltReply::Refused(e), out),
            }
        }
        // (The event encoded from where it waits: no copy of it.)
        if let Some(i) = self.events.next_at(badge) {
            if let Some((vcpu, exit_reply)) = resumed {
                resume(vcpu, &exit_reply);
            }
            return short::encode_event_reply(&self.events.waiting[i].event, out).unwrap_or(0);
        }
        let now = if !listens && !self.events.listens(badge) {
            Some(AltReply::Refused(AltError::NotListening))
        } else if badge == self.events.forwarding {
            // Its events come forwarded: this call only takes held ones.
            Some(AltReply::Refused(AltError::NoSuchEvent))
        } else if self.events.polls.len() >= MAX_WAITING_LISTENERS {
            Some(AltReply::Refused(AltError::TooManyWaiting))
        } else {
            None
        };
        match (now, resumed) {
            (Some(a), Some((vcpu, exit_reply))) => {
                resume(vcpu, &exit_reply);
                reply(a, out)
            }
            (Some(a), None) => reply(a, out),
            (None, resumed) => {
                self.events.polls.push(Poll { badge, token });
                match resumed {
                    Some((vcpu, exit_reply)) => {
                        ipc::answer_instead(vcpu);
                        exitcodec::encode_reply(&exit_reply, out).unwrap_or(0)
                    }
                    None => DEFER,
                }
            }
        }
    }

    /// The event just recorded forwarded to its listener where it takes
    /// forwards ([`ipc::forward_instead`], the event's bytes the message),
    /// else [`Server::deliver`]ed.
    #[inline(always)]
    fn forward_or_deliver(&mut self, out: &mut [u8]) -> usize {
        if let Some(w) = self.events.take_forwardable() {
            let Some(h) = self.forward_to else {
                self.events.unforward(w);
                return self.deliver(Some(out));
            };
            // (If the kernel refuses, the message brings the event back:
            // `forward_refused`.)
            ipc::forward_instead(w.token, h);
            return short::encode_event_reply(&w.event, out).unwrap_or(0);
        }
        self.deliver(Some(out))
    }

    /// Hands new events to the `NextEvent` calls held for them, the first
    /// by the answer being made (`out`, where given: [`ipc::answer_instead`];
    /// its length, or `DEFER`); tells the other listeners (`altp2m-events`)
    /// of the rest.
    fn deliver(&mut self, mut out: Option<&mut [u8]>) -> usize {
        let mut n = DEFER;
        // (Each event encoded from where it waits: no copy of it.)
        while let Some((token, i)) = self.events.poll_answer_at() {
            let e = &self.events.waiting[i].event;
            if let Some(out) = out.take() {
                ipc::answer_instead(token);
                n = short::encode_event_reply(e, out).unwrap_or(0);
                continue;
            }
            let mut bytes = [0u8; short::EVENT_REPLY];
            let m = short::encode_event_reply(e, &mut bytes).unwrap_or(0);
            let id = e.id;
            if ipc::reply(token, &bytes[..m]).is_err() {
                // The caller is gone: the event goes to the next one.
                self.events.ungive(id);
            }
        }
        if self.events_note.is_some() && self.events.waiting.iter().any(|w| !w.given) {
            self.signal_event();
        }
        n
    }

    /// After a listener attached or left (`result`): waiting events handed
    /// to the listeners they go to now, and the held `NextEvent` calls of
    /// clients that listen to nothing any more answered `NotListening`.
    fn listened(
        &mut self,
        domain: u16,
        badge: u64,
        on: bool,
        result: Result<(), AltError>,
    ) -> AltReply {
        if let Err(e) = result {
            return AltReply::Refused(e);
        }
        defmt::info!(
            "altp2m: domain {=u16}: listener {=str} (badge {=u64:#x})",
            domain,
            if on { "attached" } else { "detached" },
            badge
        );
        if self.events.waiting.iter().any(|w| w.event.domain == domain) {
            self.deliver(None);
        }
        let mut out = [0u8; 16];
        let n =
            ipc::encode_reply::<AltReply>(&Ok(AltReply::Refused(AltError::NotListening)), &mut out);
        for token in self.events.stale_polls() {
            let _ = ipc::reply(token, &out[..n]);
        }
        AltReply::Done
    }

    /// Answers a request on the `altp2m` or `altp2m-guest` endpoint.
    fn request(&mut self, request: AltRequest, badge: u64, guest_endpoint: bool) -> AltReply {
        let named = match request {
            AltRequest::External { domain, .. }
            | AltRequest::SetMode { domain, .. }
            | AltRequest::SetNoListener { domain, .. }
            | AltRequest::Listen { domain, .. }
            | AltRequest::ListenFor { domain, .. }
                if !guest_endpoint =>
            {
                Some(domain)
            }
            _ => None,
        };
        if let Some(why) = named.and_then(|domain| self.gone(domain)) {
            return AltReply::Refused(why);
        }
        match request {
            AltRequest::Ping => AltReply::Pong,
            AltRequest::Track { .. }
            | AltRequest::DirtyTake { .. }
            | AltRequest::Rearm { .. }
            | AltRequest::ShareNominate { .. }
            | AltRequest::ShareMap { .. }
            | AltRequest::Unshare { .. }
            | AltRequest::ShareBreaks => AltReply::Refused(AltError::WrongEndpoint),
            AltRequest::Guest { .. } | AltRequest::GuestPage { .. } if !guest_endpoint => {
                AltReply::Refused(AltError::WrongEndpoint)
            }
            _ if guest_endpoint
                && !matches!(
                    request,
                    AltRequest::Guest { .. } | AltRequest::GuestPage { .. }
                ) =>
            {
                AltReply::Refused(AltError::WrongEndpoint)
            }
            AltRequest::GuestPage { domain, view, gfn } => {
                match self.alt.guest_page(&mut self.system, domain, view, gfn) {
                    Ok(e) => AltReply::Page {
                        frame_gfn: e.frame_gfn,
                        access: e.access,
                    },
                    Err(e) => AltReply::Reply(ipc_schema::hypercall::Reply::Error(e)),
                }
            }
            AltRequest::Guest {
                domain,
                vcpu,
                request,
            } => AltReply::Reply(self.alt.request(
                &mut self.system,
                domain,
                Agent::Guest { vcpu },
                &request,
            )),
            AltRequest::External { domain, .. } | AltRequest::SetMode { domain, .. }
                if !self.may(badge, domain, introspection::VIEWS) =>
            {
                AltReply::Refused(AltError::NotAllowed)
            }
            AltRequest::SetNoListener { domain, .. }
            | AltRequest::Listen { domain, .. }
            | AltRequest::ListenFor { domain, .. }
                if !self.may(badge, domain, introspection::EVENTS) =>
            {
                AltReply::Refused(AltError::NotAllowed)
            }
            AltRequest::External { domain, request } => AltReply::Reply(self.alt.request(
                &mut self.system,
                domain,
                Agent::External,
                &request,
            )),
            AltRequest::SetMode { domain, mode } => {
                match self.alt.set_mode(&mut self.system, domain, mode) {
                    Ok(()) => {
                        defmt::info!("altp2m: domain {=u16} is now in mode {}", domain, mode);
                        AltReply::Done
                    }
                    Err(e) => AltReply::Reply(ipc_schema::hypercall::Reply::Error(e)),
                }
            }
            AltRequest::SetNoListener { domain, policy } => {
                self.events.policy.insert(domain, policy);
                AltReply::Done
            }
            AltRequest::Listen { domain, on: true } => {
                let r = self.events.listen(domain, badge, true);
                self.listened(domain, badge, true, r)
            }
            AltRequest::Listen { domain, on: false } => {
                // What it held and nobody else takes is retried.
                let r = self
                    .events
                    .detach(&mut self.alt, &mut self.system, domain, badge)
                    .map(|released| {
                        for (token, reply) in released {
                            resume(token, &reply);
                        }
                    });
                self.listened(domain, badge, false, r)
            }
            AltRequest::ListenFor { domain, filter } => {
                let r = self.events.listen_for(domain, badge, filter);
                self.listened(domain, badge, true, r)
            }
            AltRequest::Events { after } => {
                let mut events = BoundedVec::new();
                let mut next = after;
                // Only the events of domains the caller may see.
                for e in self.events.after(after, EVENTS_PER_REPLY) {
                    next = e.id;
                    let birth = self.system.domain_birth(e.domain);
                    if self
                        .rights
                        .allows(badge, e.domain, introspection::EVENTS, birth)
                    {
                        let _ = events.0.push(e);
                    }
                }
                AltReply::Events { events, next }
            }
            AltRequest::Answer { event, action } => match self.answer(badge, event, action) {
                Ok(()) => AltReply::Done,
                Err(e) => AltReply::Refused(e),
            },
            // Taken in `handle`, which has the call's token.
            AltRequest::NextEvent { .. } => AltReply::Refused(AltError::WrongEndpoint),
            AltRequest::Forwarded { on } => {
                if self.forward_to.is_none() {
                    AltReply::Refused(AltError::WrongEndpoint)
                } else if on && !self.events.listens(badge) {
                    AltReply::Refused(AltError::NotListening)
                } else {
                    self.events.forwarding = if on { badge } else { 0 };
                    AltReply::Done
                }
            }
        }
    }
}

/// Answers the exit of `token` (a vCPU waiting on an event) with `r`.
fn resume(token: u64, r: &ipc_schema::vmexit::ExitReply) {
    let mut out = [0u8; 64];
    let n = exitcodec::encode_reply(r, &mut out).unwrap_or(0);
    if let Err(e) = ipc::reply(token, &out[..n]) {
        defmt::warn!("altp2m: a vCPU could not be resumed: {}", e);
    }
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        if slot == self.violations {
            Some(VMEXIT)
        } else if slot == self.external
            || Some(slot) == self.guest
            || Some(slot) == self.track
            || Some(slot) == self.share
        {
            Some(ALTP2M)
        } else {
            None
        }
    }

    #[inline(always)]
    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        self.start();
        // The ping (`HC_IPC_PING`'s round trip), on any endpoint but the
        // violations', in its fixed bytes both ways: nothing decoded or
        // encoded (as `request`, `tracking` and `sharing` answer it), and
        // nothing else of `answer`'s done.
        if msg.bytes == PING && msg.slot != self.violations {
            reply[..PONG.len()].copy_from_slice(&PONG);
            return PONG.len();
        }
        self.message(msg, reply)
    }

    fn notified(&mut self, slot: Handle, _bits: u64) {
        self.start();
        if Some(slot) == self.domain_ends {
            let gone = service_altp2m::forget_ended(
                &mut self.alt,
                &mut self.events,
                &mut self.births,
                &mut self.system,
            );
            for id in gone {
                defmt::info!("altp2m: domain {=u16} ended; its records are freed", id);
            }
        }
    }

    /// The forward of `forward_or_deliver` refused: its message, the event,
    /// waits for `NextEvent` as any held event (its vCPU still waits).
    fn forward_refused(&mut self, token: u64, out: &mut [u8], len: usize) -> usize {
        match out.get(..len).and_then(short::decode_event_reply) {
            Some(event) => {
                self.events.unforward(Waiting {
                    event,
                    token,
                    given: false,
                    owner: self.events.forwarding,
                });
                self.deliver(Some(out))
            }
            // (Not what `forward_or_deliver` sends: the access is retried,
            // and faults again as a new event.)
            None => {
                defmt::error!("altp2m: a refused forward that was no event; its access retried");
                let retry = ExitReply::resume(Response::RETRY, None);
                exitcodec::encode_reply(&retry, out).unwrap_or(0)
            }
        }
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

impl Server {
    /// [`Service::handle`] but for the ping: an exit (a violation or a
    /// view switch), or a request on one of the altp2m endpoints.
    #[inline(never)]
    fn message(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        if msg.slot == self.violations {
            // An EPT violation read straight from its bytes (only what the
            // violation path needs); any other exit decoded in place (no
            // copy of the message out of a decoder).
            let outcome = if let Some(x) = fast::read_violation(msg.bytes) {
                self.events
                    .violation_exit(&mut self.alt, &mut self.system, &x, msg.token)
            } else {
                let mut m = ipc_schema::vmexit::ExitMessage::default();
                let Some(()) = ipc_schema::exitcodec::decode_message_into(msg.bytes, &mut m) else {
                    defmt::warn!(
                        "altp2m: a message on the violation endpoint that is not an exit (badge {=u64})",
                        msg.badge
                    );
                    return ipc::encode_reply::<()>(&Err(IpcError::Malformed), reply);
                };
                self.events
                    .exit(&mut self.alt, &mut self.system, &m, msg.token)
            };
            return match outcome {
                Outcome::Reply(answer) => exitcodec::encode_reply(&answer, reply).unwrap_or(0),
                Outcome::Defer { new_event: true } => self.forward_or_deliver(reply),
                Outcome::Defer { new_event: false } => DEFER,
                Outcome::Tell(answer) => {
                    self.deliver(None);
                    exitcodec::encode_reply(&answer, reply).unwrap_or(0)
                }
            };
        }
        // A listener's `NextEvent` by its short way first (the violation
        // path: no serde), then any request through postcard.
        if msg.slot == self.external
            && let Some(answer) = short::decode_next_event(msg.bytes)
        {
            return self.next_event(msg.badge, msg.token, answer, reply);
        }
        // Each answer is encoded where it was made, by reference (not
        // moved by value into a `Result` first: a reply is up to 108
        // bytes, and each move of it a `memcpy`).
        let request = match ipc::decode::<AltRequest>(msg.bytes) {
            Ok(r) => r,
            Err(e) => return ipc::encode_reply::<AltReply>(&Err(e), reply),
        };
        let answer = if Some(msg.slot) == self.track {
            self.tracking(request)
        } else if Some(msg.slot) == self.share {
            self.sharing(request)
        } else if let AltRequest::NextEvent { answer } = request
            && msg.slot == self.external
        {
            return self.next_event(msg.badge, msg.token, answer, reply);
        } else {
            let guest_endpoint = Some(msg.slot) == self.guest;
            self.request(request, msg.badge, guest_endpoint)
        };
        service_altp2m::note_births(&mut self.births, &self.alt, &self.events, &mut self.system);
        ipc::encode_reply(&Ok::<&AltReply, IpcError>(&answer), reply)
    }
}

fn main() -> ! {
    let violations = require("violations");
    let external = require("altp2m");
    let guest = handle("altp2m-guest");
    let track = handle("altp2m-track");
    let share = handle("altp2m-share");
    let system = System {
        domains: require("domains"),
        features: sys::vm_features(),
        ept: alloc::boxed::Box::new(EptBuffers {
            encoded: [0; 1024],
            results: [0; 1024],
        }),
    };
    defmt::info!(
        "altp2m: serving views (generation {=u32})",
        service_runtime::generation()
    );
    let domain_ends = handle("domain-ends");
    if let Some(n) = domain_ends
        && let Err(e) = sys::domain_watch(system.domains, n, 1)
    {
        defmt::error!(
            "altp2m: cannot watch domains ({}); records of ended domains stay",
            e
        );
    }
    let mut server = Server {
        violations,
        external,
        guest,
        track,
        share,
        events_note: handle("altp2m-events"),
        forward_to: handle("listener-events"),
        rights: Rights::new(handle("supervisor")),
        domain_ends,
        births: Default::default(),
        reset_pending: service_runtime::generation() > 0 || service_runtime::successor(),
        system,
        alt: Altp2m::default(),
        events: Events::default(),
    };
    let mask = (1 << violations)
        | (1 << external)
        | guest.map_or(0, |g| 1 << g)
        | track.map_or(0, |t| 1 << t)
        | share.map_or(0, |t| 1 << t)
        | domain_ends.map_or(0, |n| 1 << n);
    ipc::serve(&mut server, mask)
}
