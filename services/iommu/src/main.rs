//! iommu: DMA mappings of client domains' memory for device backends
//! (IO-1..IO-6, docs/iommu.md).
//!
//! Endpoints it serves:
//! - `iommu`: backends' requests (`ipc_schema::iommu::IommuRequest`), each
//!   backend known by its badge; what it drives and which domains are its
//!   clients come from the supervisor (`SupervisorRequest::DmaBackend`,
//!   from its manifest table) the first time it calls;
//! - `iommu-admin` (optional): client lists changed at run time (IO-5),
//!   every device's faults.
//!
//! Handles: `pci` (the Iommu root: IoSpaces, device handles, fault
//! records), `domains` (read and write: the frames it maps), `supervisor`
//! (call), `supervisor-events` (wait: a backend that faulted, restarted or
//! ended loses its mappings, IO-4) and `domain-ends` (wait, signal: a
//! notification DOMAIN_WATCH sets, bit 0: an ended domain's mappings go; the
//! units' fault interrupt is bound to its bit 1, IO-6: the fault records are
//! read when it fires, and polled at every request and event only where
//! it cannot be bound).

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use ipc_schema::iommu::{
    DmaFault, FAULTS_PER_REPLY, IOMMU, IOMMU_ADMIN, IommuAdminRequest, IommuError, IommuReply,
    IommuRequest,
};
use ipc_schema::ipc::{BoundedVec, InterfaceId};
use ipc_schema::supervisor::{
    Name, SUPERVISOR, SupervisorEvent, SupervisorReply, SupervisorRequest,
};
use ipc_schema::syscall::{Handle, IoFault, SysError};
use service_iommu::{Device, Iommu, Kernel, UnmapError};
use service_runtime::ipc::{self, Client, Message, Service};
use service_runtime::{handle, require, sys};

service_runtime::entry!(main);
service_runtime::interfaces!(IOMMU, IOMMU_ADMIN);
service_heap::heap!(512 * 1024);

/// The bits of the `domain-ends` notification: DOMAIN_WATCH's, and the
/// units' fault interrupt's (IO-6).
const DOMAIN_BIT: u64 = 1;
const FAULT_BIT: u64 = 2;

struct System {
    root: Handle,
    domains: Handle,
    /// IoSpace handles, by the number [`Kernel::space_for`] gave.
    spaces: Vec<Handle>,
    released: u64,
}

impl Kernel for System {
    fn space_for(&mut self, devices: &[Device]) -> Option<u32> {
        let space = sys::iospace_create(self.root)
            .inspect_err(|e| defmt::error!("iommu: no IoSpace: {}", e))
            .ok()?;
        for &(segment, source) in devices {
            let attached = sys::derive(self.root, u64::from(segment), u64::from(source))
                .and_then(|d| sys::iospace_attach(space, d, true));
            if let Err(e) = attached {
                defmt::error!(
                    "iommu: device {=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8} cannot be attached: {}",
                    segment,
                    (source >> 8) as u8,
                    ((source >> 3) & 31) as u8,
                    (source & 7) as u8,
                    e
                );
                return None;
            }
        }
        self.spaces.push(space);
        Some(self.spaces.len() as u32 - 1)
    }

    fn map(
        &mut self,
        space: u32,
        domain: u16,
        pairs: &[(u64, u64)],
        writable: bool,
    ) -> Result<(), Option<usize>> {
        let raw: Vec<[u64; 2]> = pairs.iter().map(|&(g, b)| [g, b]).collect();
        let h = *self.spaces.get(space as usize).ok_or(None)?;
        match sys::iospace_map_raw(h, self.domains, domain, &raw, writable) {
            Ok(()) => Ok(()),
            Err(SysError::BadAddress) => {
                // Which gfn: the first past the domain's RAM, or in the
                // legacy hole (the kernel's log names it too).
                let ram = sys::domain_info(self.domains, domain).map_or(0, |(_, _, r)| r / 4096);
                Err(Some(
                    pairs
                        .iter()
                        .position(|&(g, _)| g >= ram || (0xa0..0x100).contains(&g))
                        .unwrap_or(0),
                ))
            }
            Err(_) => Err(None),
        }
    }

    fn unmap(&mut self, space: u32, bfns: &[u64]) -> Result<u32, UnmapError> {
        let h = *self
            .spaces
            .get(space as usize)
            .ok_or(UnmapError::NotMapped)?;
        match sys::iospace_unmap(h, bfns) {
            Ok((_, invalidations)) => Ok(invalidations as u32),
            Err(SysError::BadArgument) => Err(UnmapError::NotMapped),
            Err(e) => {
                defmt::error!("iommu: an unmap failed ({}): its frames stay referenced", e);
                Err(UnmapError::Failed)
            }
        }
    }

    fn released(&mut self, _domain: u16, _gfn: u64) {
        self.released += 1;
    }

    fn domain(&mut self, domain: u16) -> Option<(bool, u64)> {
        let (state, birth) = sys::domain_state_birth(self.domains, domain).ok()?;
        Some((state <= 2, birth))
    }
}

struct Server {
    requests: Handle,
    admin: Option<Handle>,
    events: Option<Handle>,
    domain_ends: Option<Handle>,
    /// The fault interrupt is bound (to `domain_ends`, [`FAULT_BIT`]):
    /// the records are read only when it fires.
    fault_interrupt: bool,
    supervisor: Client,
    system: System,
    book: Iommu,
    faults: heapless::Deque<DmaFault, 32>,
    lost: u64,
}

/// A fault reason's meaning (VT-d spec, "Fault reasons").
fn reason(code: u8) -> &'static str {
    match code {
        1 => "root entry not present",
        2 => "no context entry: the device is attached to nothing",
        4 => "address beyond the tables' width",
        5 => "write to a page not mapped, or read-only",
        6 => "read from a page not mapped",
        7..=9 => "table access error",
        0xa..=0xc => "reserved bits set in an entry",
        _ => "other",
    }
}

impl Server {
    /// Takes the units' fault records: logged and kept for the backends;
    /// how many.
    fn take_records(&mut self) -> usize {
        let mut taken = 0;
        let mut out = [IoFault {
            address: 0,
            source: 0,
            segment: 0,
            reason: 0,
            write: false,
            unit: 0,
        }; 16];
        loop {
            let Ok((n, _, lost)) = sys::iommu_faults(self.system.root, &mut out) else {
                return taken;
            };
            taken += n;
            self.lost = lost;
            for f in &out[..n] {
                defmt::warn!(
                    "iommu: DMA fault (IO-6): device {=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8} {=str} at {=u64:#x} blocked: reason {=u8} ({=str})",
                    f.segment,
                    (f.source >> 8) as u8,
                    ((f.source >> 3) & 31) as u8,
                    (f.source & 7) as u8,
                    if f.write { "write" } else { "read" },
                    f.address,
                    f.reason,
                    reason(f.reason)
                );
                // IO-6: an event for the host (`cargo hv ctl events`).
                let event = SupervisorEvent::DmaFault {
                    segment: f.segment,
                    source: f.source,
                    address: f.address,
                    reason: f.reason,
                    write: f.write,
                };
                if !matches!(
                    self.supervisor
                        .call::<_, SupervisorReply>(&SupervisorRequest::DmaFault { event }),
                    Ok(SupervisorReply::Done)
                ) {
                    defmt::warn!("iommu: the supervisor did not record the fault as an event");
                }
                if self.faults.is_full() {
                    self.faults.pop_front();
                }
                let _ = self.faults.push_back(DmaFault {
                    segment: f.segment,
                    source: f.source,
                    address: f.address,
                    reason: f.reason,
                    write: f.write,
                });
            }
            if n < out.len() {
                return taken;
            }
        }
    }

    /// The fallback without a fault interrupt: the records read at every
    /// request and event.
    fn poll_faults(&mut self) {
        if !self.fault_interrupt {
            self.take_records();
        }
    }

    /// What the supervisor says backend `badge` is now (registered, or a
    /// restart's mappings torn down); `false` where it is not running.
    fn refresh(&mut self, badge: u64) -> bool {
        let Ok(SupervisorReply::DmaBackend {
            devices,
            clients,
            generation,
            running,
        }) = self
            .supervisor
            .call::<_, SupervisorReply>(&SupervisorRequest::DmaBackend { client: badge })
        else {
            return false;
        };
        if !running {
            let n = self.book.teardown_backend(&mut self.system, badge);
            if n > 0 {
                defmt::info!(
                    "iommu: backend {=u64} is gone: its {=u64} mapped page(s) torn down (IO-4)",
                    badge,
                    n
                );
            }
            return false;
        }
        let known = self.book.backends.get(&badge).map(|b| b.generation);
        self.book
            .register(&mut self.system, badge, &devices.0, &clients.0, generation);
        if known.is_some_and(|g| g != generation) {
            defmt::info!(
                "iommu: backend {=u64} restarted (generation {=u32}): its old mappings torn down (IO-4)",
                badge,
                generation
            );
        }
        true
    }

    /// IO-4: the mappings of the domains that ended, or whose id a new
    /// domain was given, go (`Iommu::forget_ended`).
    fn forget_ended(&mut self) {
        for (d, n) in self.book.forget_ended(&mut self.system) {
            defmt::info!(
                "iommu: domain {=u16} ended: {=u64} mapped page(s) of it torn down (IO-4)",
                d,
                n
            );
        }
    }

    fn request(&mut self, badge: u64, r: IommuRequest) -> IommuReply {
        // (Before the end is heard, a domain's id may go to a new one.)
        self.forget_ended();
        if !self.book.backends.contains_key(&badge) {
            self.refresh(badge);
        }
        let result = match r {
            IommuRequest::Map {
                domain,
                gfn,
                count,
                writable,
            } => self
                .book
                .map(&mut self.system, badge, domain, gfn, count, writable)
                .map(|bfn| IommuReply::Mapped { bfn }),
            IommuRequest::Unmap { bfn, count } => self
                .book
                .unmap(&mut self.system, badge, bfn, count)
                .map(|(pages, invalidations)| IommuReply::Unmapped {
                    pages,
                    invalidations,
                }),
            IommuRequest::Status => {
                let b = self.book.backends.get(&badge);
                let mut clients = BoundedVec::new();
                for &c in b.map_or(&[][..], |b| &b.clients[..]) {
                    let _ = clients.0.push(c);
                }
                let invalidations =
                    sys::iommu_faults(self.system.root, &mut []).map_or(0, |(_, i, _)| i);
                Ok(IommuReply::Status {
                    mapped: b.map_or(0, |b| b.maps.len() as u64),
                    clients,
                    invalidations,
                })
            }
            IommuRequest::Faults => Ok(self.take_faults(Some(badge))),
        };
        self.book.note_births(&mut self.system);
        result.unwrap_or_else(|e| {
            defmt::warn!("iommu: backend {=u64}: refused: {}", badge, e);
            IommuReply::Error(e)
        })
    }

    /// Faults of the backend's devices (every device's for `None`).
    fn take_faults(&mut self, badge: Option<u64>) -> IommuReply {
        let mut faults = BoundedVec::new();
        let mut keep = heapless::Deque::<DmaFault, 32>::new();
        while let Some(f) = self.faults.pop_front() {
            let mine = badge.is_none_or(|b| self.book.owner((f.segment, f.source)) == Some(b));
            if mine && faults.0.len() < FAULTS_PER_REPLY {
                let _ = faults.0.push(f);
            } else {
                let _ = keep.push_back(f);
            }
        }
        self.faults = keep;
        IommuReply::Faults {
            faults,
            lost: self.lost,
        }
    }

    /// The badge of the service named `name` (its index + 1).
    fn badge_of(&mut self, name: &Name) -> Option<u64> {
        for index in 0..64u16 {
            match self
                .supervisor
                .call::<_, SupervisorReply>(&SupervisorRequest::Service { index })
            {
                Ok(SupervisorReply::Service(Some(info))) if info.name == *name => {
                    return Some(u64::from(index) + 1);
                }
                Ok(SupervisorReply::Service(Some(_))) => {}
                _ => return None,
            }
        }
        None
    }

    fn admin(&mut self, r: IommuAdminRequest) -> IommuReply {
        let (IommuAdminRequest::AddClient { backend: name, .. }
        | IommuAdminRequest::RemoveClient { backend: name, .. }) = r
        else {
            return self.take_faults(None);
        };
        let Some(backend) = self.badge_of(&name) else {
            return IommuReply::Error(IommuError::NoSuchBackend);
        };
        if !self.book.backends.contains_key(&backend) {
            self.refresh(backend);
        }
        let result = match r {
            IommuAdminRequest::AddClient { domain, .. } => {
                self.book.add_client(backend, domain).map(|()| {
                    defmt::info!("iommu: backend {=u64} may map domain {=u16} (IO-5)", backend, domain);
                    IommuReply::Done
                })
            }
            IommuAdminRequest::RemoveClient { domain, .. } => self
                .book
                .remove_client(&mut self.system, backend, domain)
                .map(|n| {
                    defmt::info!(
                        "iommu: backend {=u64} may no longer map domain {=u16}: {=u64} page(s) unmapped (IO-5)",
                        backend,
                        domain,
                        n
                    );
                    IommuReply::Done
                }),
            IommuAdminRequest::Faults => Ok(self.take_faults(None)),
        };
        result.unwrap_or_else(IommuReply::Error)
    }
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        if slot == self.requests {
            Some(IOMMU)
        } else if Some(slot) == self.admin {
            Some(IOMMU_ADMIN)
        } else {
            None
        }
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        self.poll_faults();
        if Some(msg.slot) == self.admin {
            let answer = ipc::decode::<IommuAdminRequest>(msg.bytes).map(|r| self.admin(r));
            return ipc::encode_reply(&answer, reply);
        }
        let answer = ipc::decode::<IommuRequest>(msg.bytes).map(|r| self.request(msg.badge, r));
        ipc::encode_reply(&answer, reply)
    }

    fn notified(&mut self, slot: Handle, bits: u64) {
        if Some(slot) == self.domain_ends && self.fault_interrupt && bits & FAULT_BIT != 0 {
            let n = self.take_records();
            defmt::info!(
                "iommu: fault interrupt: {=usize} fault record(s) taken (IO-6)",
                n
            );
            if bits & DOMAIN_BIT == 0 {
                return;
            }
        }
        self.poll_faults();
        if Some(slot) == self.events {
            let badges: Vec<u64> = self.book.backends.keys().copied().collect();
            for b in badges {
                self.refresh(b);
            }
        }
        if Some(slot) == self.domain_ends {
            self.forget_ended();
        }
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let requests = require("iommu");
    let root = require("pci");
    let domains = require("domains");
    let admin = handle("iommu-admin");
    let events = handle("supervisor-events");
    let domain_ends = handle("domain-ends");
    let fault_interrupt = match domain_ends.map(|n| sys::irq_bind(root, n, FAULT_BIT)) {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            defmt::warn!(
                "iommu: the fault interrupt cannot be bound ({}): fault records polled at each request and event",
                e
            );
            false
        }
        None => {
            defmt::info!(
                "iommu: no domain-ends notification for the fault interrupt: fault records polled at each request and event"
            );
            false
        }
    };
    if let Some(n) = domain_ends
        && let Err(e) = sys::domain_watch(domains, n, DOMAIN_BIT)
    {
        defmt::warn!(
            "iommu: cannot watch domains ({}): an ended domain's mappings stay until its backend goes",
            e
        );
    }
    defmt::info!(
        "iommu: serving (generation {=u32}){=str}",
        service_runtime::generation(),
        if service_runtime::generation() > 0 {
            ": a restarted instance does not know its predecessor's IoSpaces; backends map again"
        } else {
            ""
        }
    );
    let mut mask = 1u64 << requests;
    for h in [admin, events, domain_ends].into_iter().flatten() {
        mask |= 1 << h;
    }
    let mut server = Server {
        requests,
        admin,
        events,
        domain_ends,
        fault_interrupt,
        supervisor: Client::new(require("supervisor"), SUPERVISOR),
        system: System {
            root,
            domains,
            spaces: Vec::new(),
            released: 0,
        },
        book: Iommu::default(),
        faults: heapless::Deque::new(),
        lost: 0,
    };
    // Records made before the interrupt was bound raise no new one.
    server.take_records();
    ipc::serve(&mut server, mask)
}
