//! logdirty: keeper of every domain's dirty-page logs (LD-1..LD-5).
//!
//! Endpoints it serves:
//! - `logdirty`: its clients' requests (`ipc_schema::logdirty`), each log
//!   named by the caller's badge, the domain and the caller's number;
//! - `pml-exits`: the kernel's `ExitKind::PmlFull` (a full PML buffer),
//!   drained into the logs before the vCPU goes on.
//!
//! It holds the `domains` handle (PML and the kernel's write record of a
//! domain, domain states), the `pml` frames (two PML buffers per domain,
//! mapped read-only), a call handle to the altp2m service, which owns the
//! EPT entries and arms, disarms and re-arms ranges on request
//! (docs/p2m.md, rule 3), and the supervisor's `supervisor` endpoint and
//! `supervisor-events` notification, to stop the logs of a client that
//! faulted, restarted, was held, swapped or ended, and forget the domains
//! that ended.
//!
//! A restarted or swapped-in instance starts without its predecessor's
//! logs: before its first request it disarms every live domain's RAM and
//! turns PML and the write record off (its clients get `NotLogging` and
//! start again).

#![no_std]
#![no_main]

extern crate alloc;

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest};
use ipc_schema::ipc::{InterfaceId, IpcError};
use ipc_schema::logdirty::{GfnRange, LOGDIRTY, LdRequest, Mechanism};
use ipc_schema::supervisor::{
    Name, SUPERVISOR, SupervisorEvent, SupervisorReply, SupervisorRequest, name_str,
};
use ipc_schema::syscall::{Handle, SysError, VcpuOp, layout::MAP_BASE, vm_features};
use ipc_schema::vmexit::{ExitKind, ExitReply, Response, VMEXIT};
use service_logdirty::logs::{
    AltFail, Backend, HEAP_BYTES, LogDirty, MAX_DOMAIN_ID, PML_ENTRIES, Ranges,
};
use service_runtime::ipc::{self, CallError, Client, Message, Service};
use service_runtime::{handle, require, sys};

service_runtime::entry!(main);
service_runtime::interfaces!(LOGDIRTY, VMEXIT);
service_heap::heap!(HEAP_BYTES);

/// Where the `pml` frames are mapped.
const PML_VA: u64 = MAP_BASE;
/// Pages of the `pml` frames: two PML buffers for each domain id.
const PML_PAGES: u64 = 2 * MAX_DOMAIN_ID as u64;

struct System {
    domains: Handle,
    /// `vm_features` bits, less PML where the buffers cannot be had.
    features: u64,
    /// The `pml` frames and the `pml-exits` endpoint, when both are there.
    pml: Option<(Handle, Handle)>,
    /// Pages of the `pml` frames mapped at [`PML_VA`].
    pml_mapped: u64,
    altp2m: Client,
    /// A call found the altp2m service restarted (`Dead`).
    altp2m_restarted: bool,
}

impl System {
    /// Asks the altp2m service; a `Dead` (it restarted or was swapped) is
    /// noted and the request sent again to the new instance.
    fn alt(&mut self, r: &AltRequest) -> Result<AltReply, AltFail> {
        for _ in 0..2 {
            match self.altp2m.call_once::<_, AltReply>(r) {
                Ok(AltReply::Refused(e)) => return Err(AltFail::Refused(e)),
                Ok(a) => return Ok(a),
                Err(CallError::Sys(SysError::Dead)) => self.altp2m_restarted = true,
                Err(e) => {
                    defmt::warn!("logdirty: the altp2m service did not answer: {}", e);
                    return Err(AltFail::Unreachable);
                }
            }
        }
        Err(AltFail::Unreachable)
    }

    /// Asks the altp2m service for something answered by `Done`.
    fn alt_done(&mut self, r: &AltRequest) -> Result<(), AltFail> {
        match self.alt(r)? {
            AltReply::Done => Ok(()),
            _ => Err(AltFail::Unreachable),
        }
    }
}

impl Backend for System {
    fn features(&self) -> u64 {
        self.features
    }

    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)> {
        sys::domain_info(self.domains, domain)
            .ok()
            .map(|(state, _, ram)| (state, ram / 4096))
    }

    fn domain_birth(&mut self, domain: u16) -> Option<u64> {
        sys::domain_birth(self.domains, domain).ok()
    }

    fn room(&self, bytes: usize) -> bool {
        heap_room(bytes)
    }

    fn track(
        &mut self,
        domain: u16,
        range: GfnRange,
        how: Option<Mechanism>,
    ) -> Result<(), AltFail> {
        self.alt_done(&AltRequest::Track { domain, range, how })
    }

    fn dirty_take(&mut self, domain: u16, from: u64) -> Result<(Ranges, Option<u64>), AltFail> {
        match self.alt(&AltRequest::DirtyTake { domain, from })? {
            AltReply::Dirtied { ranges, next } => Ok((ranges, next)),
            _ => Err(AltFail::Unreachable),
        }
    }

    fn rearm(&mut self, domain: u16, ranges: &Ranges) -> Result<(), AltFail> {
        self.alt_done(&AltRequest::Rearm {
            domain,
            ranges: ranges.clone(),
        })
    }

    fn altp2m_restarted(&mut self) -> bool {
        core::mem::take(&mut self.altp2m_restarted)
    }

    fn writes_log(&mut self, domain: u16, on: bool) -> Result<(), SysError> {
        sys::vcpu_control(self.domains, domain, 0, VcpuOp::WritesLog, u64::from(on))
    }

    fn pml_start(&mut self, domain: u16) -> Result<(), SysError> {
        let (frames, exits) = self.pml.ok_or(SysError::Unsupported)?;
        if domain == 0 || domain > MAX_DOMAIN_ID {
            return Err(SysError::BadArgument);
        }
        let first = 2 * u32::from(domain - 1);
        sys::pml_start(self.domains, domain, 0, frames, first, exits)
    }

    fn pml_stop(&mut self, domain: u16) -> Result<(), SysError> {
        sys::vcpu_control(self.domains, domain, 0, VcpuOp::PmlStop, 0)
    }

    fn pml_take(&mut self, domain: u16) -> Result<(u16, u8), SysError> {
        sys::pml_take(self.domains, domain, 0)
    }

    fn pml_read(&self, domain: u16, buffer: u8, out: &mut [u64; PML_ENTRIES]) -> bool {
        if domain == 0 || domain > MAX_DOMAIN_ID || buffer > 1 {
            return false;
        }
        let page = 2 * u64::from(domain - 1) + u64::from(buffer);
        if page >= self.pml_mapped {
            return false;
        }
        let base = (PML_VA + page * 4096) as *const u64;
        for (i, slot) in out.iter_mut().enumerate() {
            // Safety: `page` is below the pages mapped (read-only, for the
            // service's life) at PML_VA, and `i` below the 512 u64 of a
            // page; the CPU writes only the buffer it is on, not one taken
            // or full, so the reads race with nothing.
            *slot = unsafe { core::ptr::read_volatile(base.add(i)) };
        }
        true
    }

    fn domain_writes(
        &mut self,
        domain: u16,
        out: &mut [[u64; 2]],
    ) -> Result<(usize, bool), SysError> {
        sys::domain_writes(self.domains, domain, out)
    }
}

struct Server {
    requests: Handle,
    pml_exits: Option<Handle>,
    supervisor: Option<Client>,
    /// Signalled by the supervisor when it records an event.
    events: Option<Handle>,
    /// The number of the last supervisor event seen.
    last_event: u32,
    /// Started without its predecessor's logs: clean every domain before
    /// the first request.
    clean_pending: bool,
    system: System,
    logs: LogDirty,
}

impl Server {
    /// Before the first request of an instance that is not the first
    /// (not earlier: a successor's predecessor serves until the swap).
    fn start(&mut self) {
        if !core::mem::take(&mut self.clean_pending) {
            return;
        }
        let n = self.logs.clean_slate(&mut self.system);
        defmt::warn!(
            "logdirty: started without the logs of its predecessor (generation {=u32}): {=u32} live domain(s) disarmed, PML and write records off; clients get NotLogging and start again",
            service_runtime::generation(),
            n
        );
    }

    fn ask(&mut self, r: &SupervisorRequest) -> Option<SupervisorReply> {
        let sup = self.supervisor.as_mut()?;
        match sup.call::<_, SupervisorReply>(r) {
            Ok(a) => Some(a),
            Err(e) => {
                defmt::warn!("logdirty: the supervisor did not answer: {}", e);
                None
            }
        }
    }

    /// The badge of service `name` (its index in the supervisor's list
    /// plus one, as init gives it).
    fn badge_of(&mut self, name: &Name) -> Option<u64> {
        for index in 0..=u16::from(u8::MAX) {
            match self.ask(&SupervisorRequest::Service { index })? {
                SupervisorReply::Service(Some(info)) if info.name == *name => {
                    return Some(u64::from(index) + 1);
                }
                SupervisorReply::Service(Some(_)) => {}
                _ => return None,
            }
        }
        None
    }

    /// The supervisor's new events: a client gone loses its logs, a domain
    /// ended is forgotten.
    fn supervisor_events(&mut self) {
        loop {
            let Some(SupervisorReply::Events { events, next }) =
                self.ask(&SupervisorRequest::Events {
                    after: self.last_event,
                })
            else {
                return;
            };
            for &(seq, event) in events.0.iter() {
                self.last_event = seq;
                self.event(event);
            }
            if events.0.is_empty() || self.last_event.wrapping_add(1) == next {
                return;
            }
        }
    }

    fn event(&mut self, event: SupervisorEvent) {
        match event {
            SupervisorEvent::ServiceFaulted { name, .. }
            | SupervisorEvent::ServiceRestarted { name, .. }
            | SupervisorEvent::ServiceHeld { name }
            | SupervisorEvent::ServiceSwapped { name, .. }
            | SupervisorEvent::TaskEnded { name, .. } => {
                let Some(badge) = self.badge_of(&name) else {
                    defmt::warn!(
                        "logdirty: service {=str} is gone but not found; its logs (if any) stay",
                        name_str(&name)
                    );
                    return;
                };
                let stopped = self.logs.client_gone(&mut self.system, badge);
                if !stopped.is_empty() {
                    defmt::info!(
                        "logdirty: service {=str} (badge {=u64}) is gone: {=usize} log(s) stopped",
                        name_str(&name),
                        badge,
                        stopped.len()
                    );
                }
            }
            SupervisorEvent::DomainEnded { id, .. } => {
                let n = self.logs.domain_ended(&mut self.system, id);
                if n > 0 {
                    defmt::info!(
                        "logdirty: domain {=u16} ended: its {=usize} log(s) are forgotten",
                        id,
                        n
                    );
                }
            }
            SupervisorEvent::DmaFault { .. } => {}
        }
    }
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        if slot == self.requests {
            Some(LOGDIRTY)
        } else if Some(slot) == self.pml_exits {
            Some(VMEXIT)
        } else {
            None
        }
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        self.start();
        if Some(msg.slot) == self.pml_exits {
            let Some(m) = ipc_schema::exitcodec::decode_message(msg.bytes) else {
                defmt::warn!(
                    "logdirty: a message on pml-exits that is not an exit (badge {=u64})",
                    msg.badge
                );
                return ipc::encode_reply::<()>(&Err(IpcError::Malformed), reply);
            };
            match m.exit.kind {
                ExitKind::PmlFull { buffer, entries } => {
                    self.logs
                        .pml_full(&self.system, m.exit.domain, buffer, entries);
                }
                _ => defmt::warn!(
                    "logdirty: domain {=u16}: an exit other than PmlFull on pml-exits; resumed",
                    m.exit.domain
                ),
            }
            let answer = ExitReply::resume(Response::RETRY, None);
            return ipc_schema::exitcodec::encode_reply(&answer, reply).unwrap_or(0);
        }
        let answer = ipc::decode::<LdRequest>(msg.bytes)
            .map(|r| self.logs.request(&mut self.system, msg.badge, &r));
        ipc::encode_reply(&answer, reply)
    }

    fn notified(&mut self, slot: Handle, _bits: u64) {
        self.start();
        if Some(slot) == self.events {
            self.supervisor_events();
        }
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

/// Maps the `pml` frames read-only at [`PML_VA`]: the pages mapped.
fn map_pml(frames: Handle) -> u64 {
    match sys::frames_info(frames) {
        Ok((count, _)) => {
            let pages = count.min(PML_PAGES);
            match sys::frames_map(frames, 0, pages, PML_VA, false) {
                Ok(()) => pages,
                Err(e) => {
                    defmt::error!("logdirty: the PML buffers cannot be mapped: {}", e);
                    0
                }
            }
        }
        Err(e) => {
            defmt::error!("logdirty: the PML frames cannot be read: {}", e);
            0
        }
    }
}

fn main() -> ! {
    let requests = require("logdirty");
    let domains = require("domains");
    let pml_exits = handle("pml-exits");
    let pml_frames = handle("pml");
    let pml_mapped = pml_frames.map_or(0, map_pml);
    let pml = match (pml_frames, pml_exits) {
        (Some(f), Some(e)) if pml_mapped == PML_PAGES => Some((f, e)),
        _ => None,
    };
    let mut features = sys::vm_features();
    if pml.is_none() && features & vm_features::PML != 0 {
        defmt::warn!(
            "logdirty: the CPU has PML but the service has no PML buffers or pml-exits endpoint; write-protection only"
        );
        features &= !vm_features::PML;
    }
    let events = handle("supervisor-events");
    let supervisor = handle("supervisor").map(|h| Client::new(h, SUPERVISOR));
    if events.is_none() || supervisor.is_none() {
        defmt::warn!(
            "logdirty: no supervisor or supervisor-events handle: the logs of a client that is gone stay until stopped"
        );
    }
    let mut server = Server {
        requests,
        pml_exits,
        supervisor,
        events,
        last_event: u32::MAX,
        clean_pending: service_runtime::generation() > 0 || service_runtime::successor(),
        system: System {
            domains,
            features,
            pml,
            pml_mapped,
            altp2m: Client::new(require("altp2m"), ALTP2M),
            altp2m_restarted: false,
        },
        logs: LogDirty::default(),
    };
    // Events from before this instance are not about its logs (a domain
    // id ended then may serve a live domain now).
    if let Some(SupervisorReply::Events { next, .. }) =
        server.ask(&SupervisorRequest::Events { after: u32::MAX })
    {
        server.last_event = next.wrapping_sub(1);
    }
    defmt::info!(
        "logdirty: serving dirty logs (generation {=u32}, {=str})",
        service_runtime::generation(),
        if features & vm_features::PML != 0 {
            "PML and write-protection"
        } else {
            "write-protection"
        }
    );
    if handle("bench").is_some() {
        // The benchmark image asks for `dirty_read_1g_ticks`.
        // Safety: RDTSC is allowed in ring 3 (CR4.TSD is clear).
        let clock = || unsafe { core::arch::x86_64::_rdtsc() };
        match service_logdirty::selfbench::read_1g(clock) {
            Some((ticks, pages)) => {
                defmt::info!(
                    "logdirty: a 1 GiB log, {=u64} pages dirty, read and cleared",
                    pages
                );
                defmt::info!("BENCH dirty_read_1g_ticks={=u64}", ticks);
            }
            None => defmt::error!("BENCH dirty_read_1g_ticks=failed"),
        }
    }
    let mask = (1 << requests) | pml_exits.map_or(0, |h| 1 << h) | events.map_or(0, |h| 1 << h);
    ipc::serve(&mut server, mask)
}
