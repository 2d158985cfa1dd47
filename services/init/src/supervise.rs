//! Starting services with their handles, watching them, and answering the
//! supervisor interface.

use crate::build;
use ipc_schema::halt::HaltStatus;
use ipc_schema::ipc::{BoundedVec, InterfaceDecl, InterfaceId, IpcError};
use ipc_schema::lifecycle::{LIFECYCLE, LifecycleReply, LifecycleRequest};
use ipc_schema::manifest::{Disposition, Manifest, Object, Service as ServiceSpec};
use ipc_schema::supervisor::{
    DomainInfo, NAME, Name, Refusal, SUPERVISOR, ServiceInfo, SupervisorEvent, SupervisorReply,
    SupervisorRequest, name as fixed_name, name_str,
};
use ipc_schema::syscall::{
    DomainOp, Grant, Handle, MAX_HANDLES, ObjectKind, SpawnSpec, SysError, handle_name, rights,
};
use service_runtime::ipc::{self, Client, Message, Service};
use service_runtime::{require, sys};

/// The handles a service starts with: the manifest's and its lifecycle endpoint.
pub type Grants =
    heapless::Vec<Grant, { ipc_schema::manifest::MAX_SERVICE_HANDLES + 1 + EXIT_HANDLER_DEVICES }>;

/// The most domains' devices the exit handler is given handles for.
pub const EXIT_HANDLER_DEVICES: usize = 16;

/// The name under which the exit handler finds assigned function `index`
/// (manifest order) of domain `id`: `device ID.INDEX`.
pub fn device_handle_name(id: u16, index: u8) -> heapless::String<16> {
    let mut name = heapless::String::new();
    let _ = core::fmt::write(&mut name, format_args!("device {id}.{index}"));
    name
}

/// A service init started.
pub struct Running {
    pub spec: usize,
    pub process: Handle,
    /// Init's CALL handle on the service's lifecycle endpoint.
    pub lifecycle: Client,
    /// The frames holding its current ELF.
    pub elf: Handle,
    /// Whether `elf` holds frames init allocated for a swap (closed when
    /// the next swap replaces them), not a boot module's handle.
    pub elf_swapped: bool,
    /// Starts, restarts and swaps so far.
    pub generation: u32,
    pub restarts: u32,
    /// When its recent restarts happened (microseconds), for the rate limit.
    pub recent: heapless::Deque<u64, 16>,
    /// Not restarted any more: it ended by itself, or it faulted and was
    /// ended ([`hold`]).
    pub held: bool,
    /// Held after a fault (what `ServiceInfo::state` reports as faulted).
    pub held_faulted: bool,
    /// A task that ended: its exit code (`u32::MAX`: it faulted).
    pub done: Option<u32>,
    /// The first interface it declares (for reports).
    pub key: [u8; 8],
}

/// A domain init built.
pub struct DomainEntry {
    pub id: u16,
    pub spec: usize,
    /// Its end was recorded as an event.
    pub ended: bool,
    /// Shadow pages given to it (`SupervisorRequest::ShadowFrames`).
    pub shadow_pages: u16,
    /// A fork's own name (`SupervisorRequest::Fork`); `spec` is its
    /// parent's.
    pub fork_name: Option<ipc_schema::supervisor::Name>,
    /// Its vCPU runs (false without VMX: built for services only, and it
    /// does not keep the system from halting).
    pub runs: bool,
}

pub struct Supervisor {
    pub system: Handle,
    pub memory: Handle,
    pub domains: Handle,
    pub manifest: Manifest<'static>,
    /// Objects created for the manifest, by kind and name.
    pub objects: heapless::Vec<(u8, &'static str, Handle), 48>,
    pub services: heapless::Vec<Running, 16>,
    pub built: heapless::Vec<DomainEntry, 16>,
    /// Domains created: (manifest index, id).
    pub created: heapless::Vec<(usize, u16), 16>,
    pub failed_builds: u32,
    pub faults: Handle,
    pub domain_events: Handle,
    pub supervisor_ep: Option<Handle>,
    /// Recent events, numbered (the console passes them to the host).
    pub events: heapless::Deque<(u32, SupervisorEvent), 32>,
    pub next_event: u32,
}

const KIND_ENDPOINT: u8 = 0;
const KIND_NOTIFICATION: u8 = 1;
const KIND_SHARED: u8 = 2;

/// The interfaces an ELF declares (section `.parallax.interfaces`).
pub fn declarations(elf: &[u8]) -> heapless::Vec<InterfaceDecl, 8> {
    let mut out = heapless::Vec::new();
    if let Ok(e) = platform::elf::Elf::parse(elf)
        && let Ok(Some(section)) = e.section(".parallax.interfaces")
    {
        for chunk in section.chunks_exact(ipc_schema::ipc::INTERFACE_DECL_LEN) {
            if let Some(d) = InterfaceDecl::parse(chunk) {
                let _ = out.push(d);
            }
        }
    }
    out
}

/// Init's handle on every DMA-remapping unit, or an error naming the
/// service that asked for what this machine lacks.
fn iommu_root(service: &str) -> Result<Handle, SysError> {
    service_runtime::handle("iommu").ok_or_else(|| {
        defmt::error!(
            "init: service {=str} is granted the IOMMU or a device, but this machine has no usable IOMMU (no DMAR, or its units did not answer)",
            service
        );
        SysError::Unsupported
    })
}

/// Configuration space through init's ports (segment 0).
struct Ports(Handle);

impl platform::pci::Config for Ports {
    fn read(&mut self, source: u16, offset: u8) -> u32 {
        let address = platform::pci::address(source, offset);
        if sys::io_out(self.0, 0xcf8, 4, address).is_err() {
            return u32::MAX;
        }
        sys::io_in(self.0, 0xcfc, 4).unwrap_or(u32::MAX)
    }
    fn write(&mut self, source: u16, offset: u8, value: u32) {
        let address = platform::pci::address(source, offset);
        if sys::io_out(self.0, 0xcf8, 4, address).is_ok() {
            let _ = sys::io_out(self.0, 0xcfc, 4, value);
        }
    }
    fn sleep_ms(&mut self, ms: u32) {
        let start = sys::time().0;
        while sys::time().0 - start < 1000 * u64::from(ms) {
            sys::yield_now();
        }
    }
}

/// Turns on memory decoding and bus mastering of function `source`.
fn enable(c: &mut Ports, source: u16) {
    let command = platform::pci::Config::read(c, source, 4) & 0xffff;
    platform::pci::Config::write(c, source, 4, command | 0b110);
}

/// A device handle (the kernel checks that a unit covers the function and
/// that it answers), with memory decoding and bus mastering turned on, and
/// on the bridges above it (their windows and upstream DMA): its DMA goes
/// nowhere until it is attached to an IoSpace (docs/iommu.md).
pub fn device(root: Handle, d: ipc_schema::manifest::PciDevice) -> Result<Handle, SysError> {
    let h = sys::derive(root, u64::from(d.segment), u64::from(d.source))?;
    if d.segment == 0 {
        let mut ports = Ports(require("ioports"));
        for bridge in platform::pci::bridges_above(&mut ports, d.bus()) {
            enable(&mut ports, bridge);
            defmt::info!(
                "init: bridge {=u8:02x}:{=u8:02x}.{=u8} above device {=u8:02x}:{=u8:02x}.{=u8}: memory decoding and bus mastering on",
                (bridge >> 8) as u8,
                ((bridge >> 3) & 31) as u8,
                (bridge & 7) as u8,
                d.bus(),
                d.device(),
                d.function()
            );
        }
        enable(&mut ports, d.source);
    }
    Ok(h)
}

/// The bytes of a frames object, mapped read-only at `va` (left mapped).
pub fn map_frames(h: Handle, va: u64) -> Result<&'static [u8], SysError> {
    let (count, len) = sys::frames_info(h)?;
    let _ = sys::frames_unmap(va, count);
    sys::frames_map(h, 0, count, va, false)?;
    // Safety: the kernel just mapped `len` bytes at `va` read-only.
    Ok(unsafe { core::slice::from_raw_parts(va as *const u8, len as usize) })
}

impl Supervisor {
    pub fn new(system: Handle, manifest: Manifest<'static>) -> Self {
        Self {
            system,
            memory: require("memory"),
            domains: require("domains"),
            manifest,
            objects: heapless::Vec::new(),
            services: heapless::Vec::new(),
            built: heapless::Vec::new(),
            created: heapless::Vec::new(),
            failed_builds: 0,
            faults: 0,
            domain_events: 0,
            supervisor_ep: None,
            events: heapless::Deque::new(),
            next_event: 0,
        }
    }

    /// The object of `kind` named `name`, created on first use.
    fn object(&mut self, kind: u8, name: &'static str) -> Result<Handle, SysError> {
        if let Some(&(_, _, h)) = self
            .objects
            .iter()
            .find(|(k, n, _)| *k == kind && *n == name)
        {
            return Ok(h);
        }
        let h = match kind {
            KIND_ENDPOINT => sys::endpoint_create(self.system)?,
            KIND_NOTIFICATION => sys::notification_create(self.system)?,
            _ => {
                let pages = self
                    .manifest
                    .shared
                    .iter()
                    .find(|s| s.name == name)
                    .map_or(1, |s| s.pages);
                sys::frames_alloc(self.memory, u64::from(pages), 1)?
            }
        };
        self.objects
            .push((kind, name, h))
            .map_err(|_| SysError::NoResources)?;
        Ok(h)
    }

    /// Records an event and tells whoever waits on a notification named
    /// `supervisor-events` or `supervisor-events-<anything>` (a
    /// notification has one waiter: the console waits on the first in the
    /// standard manifest, the logdirty service on its own).
    pub fn record(&mut self, event: SupervisorEvent) {
        if self.events.is_full() {
            self.events.pop_front();
        }
        let _ = self.events.push_back((self.next_event, event));
        self.next_event = self.next_event.wrapping_add(1);
        for &(_, _, h) in self.objects.iter().filter(|(k, n, _)| {
            *k == KIND_NOTIFICATION
                && (*n == "supervisor-events" || n.starts_with("supervisor-events-"))
        }) {
            let _ = sys::notify(h, 1);
        }
    }

    /// Records a swap (for `swap`).
    pub fn record_swap(&mut self, name: &str, generation: u32) {
        self.record(SupervisorEvent::ServiceSwapped {
            name: fixed_name(name),
            generation,
        });
    }

    /// The handle of endpoint `name`, if the manifest created one.
    pub fn endpoint(&self, name: &str) -> Option<Handle> {
        self.objects
            .iter()
            .find(|(k, n, _)| *k == KIND_ENDPOINT && *n == name)
            .map(|&(_, _, h)| h)
    }

    /// The shared frames named `name`.
    pub fn shared(&self, name: &str) -> Option<Handle> {
        self.objects
            .iter()
            .find(|(k, n, _)| *k == KIND_SHARED && *n == name)
            .map(|&(_, _, h)| h)
    }

    /// The grants the manifest gives service `spec`, plus a fresh lifecycle
    /// endpoint (returned with its slot). Handles derived for the service
    /// alone (its ports, its IRQ line, one domain) are made afresh here,
    /// for a start and for each swap's successor, and init closes its own
    /// copy once the service holds them ([`Self::release`]): init keeps
    /// only what outlives one instance (named objects, the roots it
    /// derives from), so its 64 slots hold a system of many services.
    pub fn grants(&mut self, index: usize) -> Result<(Grants, Handle, u32), SysError> {
        let count = self.manifest.services[index].handles.len();
        let badge = index as u64 + 1;
        let mut grants = Grants::new();
        for slot in 0..count {
            let h = self.manifest.services[index].handles[slot].clone();
            let from = match h.object {
                Object::Endpoint(n) => self.object(KIND_ENDPOINT, n)?,
                Object::Notification(n) => self.object(KIND_NOTIFICATION, n)?,
                Object::Shared(n) => self.object(KIND_SHARED, n)?,
                Object::Domains => self.domains,
                Object::IoPorts { base, count } => {
                    sys::derive(require("ioports"), u64::from(base), u64::from(count))?
                }
                Object::Irq(line) => sys::derive(require("irqs"), u64::from(line), 0)?,
                Object::Domain(name) => {
                    let id = self.domain_id(name).ok_or(SysError::BadArgument)?;
                    sys::derive(self.domains, ObjectKind::Domain as u64, u64::from(id))?
                }
                Object::Iommu => iommu_root(self.manifest.services[index].name)?,
                Object::Device(d) => {
                    let root = iommu_root(self.manifest.services[index].name)?;
                    device(root, d).inspect_err(|_| {
                        defmt::error!(
                            "init: service {=str}: device {=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8} cannot be granted (the kernel's log says why)",
                            self.manifest.services[index].name,
                            d.segment,
                            d.bus(),
                            d.device(),
                            d.function()
                        )
                    })?
                }
            };
            let _ = grants.push(Grant::named(slot as u32, from, h.rights, badge, h.name));
        }
        let lifecycle = sys::endpoint_create(self.system)?;
        let slot = count as u32;
        let _ = grants.push(Grant::named(
            slot,
            lifecycle,
            rights::RECEIVE,
            0,
            "lifecycle",
        ));
        // The exit handler (the service receiving on `exits`) gets the
        // domains' assigned functions, its virtual PCI bus reading and
        // writing their configuration space through them (issue 14); the
        // kernel checks the `device` right at each DEVICE_CONFIG.
        let spec = &self.manifest.services[index];
        if spec.handles.iter().any(|h| h.name == "exits") {
            let mut next = slot + 1;
            for &(d, id) in self.created.iter() {
                for (i, dev) in self.manifest.domains[d].devices.iter().enumerate() {
                    let d = dev.device;
                    // (No IOMMU: the domain's build refuses its devices.)
                    let derived = service_runtime::handle("iommu")
                        .ok_or(SysError::Unsupported)
                        .and_then(|root| device(root, d));
                    let pushed = derived.map(|h| {
                        let name = device_handle_name(id, i as u8);
                        grants
                            .push(Grant::named(next, h, rights::DEVICE, badge, &name))
                            .map_err(|_| {
                                let _ = sys::handle_close(h);
                            })
                    });
                    if let Ok(Ok(())) = pushed {
                        next += 1;
                    } else {
                        defmt::warn!(
                            "init: device {=u8:02x}:{=u8:02x}.{=u8} of domain {=u16} not given to {=str} (its guest's PCI bus will not show it)",
                            d.bus(),
                            d.device(),
                            d.function(),
                            id,
                            spec.name
                        );
                    }
                }
            }
        }
        Ok((grants, lifecycle, slot))
    }

    /// Closes init's copies of the handles [`Self::grants`] derived for
    /// service `index` alone (the service holds its own once spawned).
    pub fn release(&self, index: usize, grants: &Grants) {
        let handles = &self.manifest.services[index].handles;
        for (h, g) in handles.iter().zip(grants.iter()) {
            if matches!(
                h.object,
                Object::IoPorts { .. } | Object::Irq(_) | Object::Domain(_)
            ) {
                let _ = sys::handle_close(g.from);
            }
        }
        // The exit handler's device handles (after the lifecycle grant).
        for g in grants.iter().skip(handles.len() + 1) {
            let _ = sys::handle_close(g.from);
        }
    }

    /// Starts every service of the manifest.
    pub fn start_services(&mut self) -> Result<(), HaltStatus> {
        let fail = |what: &str, e: SysError| {
            defmt::error!("init: {=str}: {}", what, e);
            HaltStatus::BadBootInput
        };
        for index in 0..self.manifest.services.len() {
            let spec: &ServiceSpec<'static> = &self.manifest.services[index];
            let (name, module) = (spec.name, spec.module);
            let (grants, lifecycle, _) = self.grants(index).map_err(|e| fail(name, e))?;
            let elf = crate::module_handle(module).ok_or(HaltStatus::BadBootInput)?;
            let process = spawn(name, elf, &grants, false).map_err(|e| fail(name, e))?;
            self.release(index, &grants);
            sys::fault_watch(process, self.faults, 1 << index).map_err(|e| fail(name, e))?;
            let key = map_frames(elf, SCRATCH_VA)
                .ok()
                .and_then(|b| declarations(b).first().map(|d| d.key))
                .unwrap_or([0; 8]);
            defmt::info!(
                "init: started service {=str} ({=usize} handles)",
                name,
                grants.len()
            );
            let _ = self.services.push(Running {
                spec: index,
                process,
                lifecycle: Client::new(lifecycle, LIFECYCLE),
                elf,
                elf_swapped: false,
                generation: 0,
                restarts: 0,
                recent: heapless::Deque::new(),
                held: false,
                held_faulted: false,
                done: None,
                key,
            });
        }
        self.supervisor_ep = self.endpoint("supervisor");
        Ok(())
    }

    /// Builds and starts every domain of the manifest.
    /// Creates every domain of the manifest (empty: built after the
    /// services start, which may hold handles to them).
    pub fn create_domains(&mut self) -> Result<(), HaltStatus> {
        let fail = |what: &str, e: SysError| {
            defmt::error!("init: {=str}: {}", what, e);
            HaltStatus::BadBootInput
        };
        self.faults =
            sys::notification_create(self.system).map_err(|e| fail("fault notification", e))?;
        self.domain_events =
            sys::notification_create(self.system).map_err(|e| fail("domain notification", e))?;
        if self.manifest.domains.is_empty() {
            return Ok(());
        }
        if sys::vm_features() & ipc_schema::syscall::vm_features::VMX == 0 {
            // Domains are still built (memory, devices) for the services to
            // reach; only their vCPUs need VMX. A system with no task to run
            // to an end would then wait for ever: that stays refused.
            if !self.manifest.services.iter().any(|s| s.task) {
                defmt::error!(
                    "the manifest asks for {=usize} domain(s) but this CPU cannot run guests (no usable VMX)",
                    self.manifest.domains.len()
                );
                return Err(HaltStatus::Unsupported);
            }
            defmt::warn!(
                "init: this CPU cannot run guests (no usable VMX): the {=usize} domain(s) are built (memory, devices) for services, and their vCPUs never run",
                self.manifest.domains.len()
            );
        }
        if let Err(e) = sys::domain_watch(self.domains, self.domain_events, 1) {
            defmt::error!("init: cannot watch domains: {}", e);
            return Err(HaltStatus::BadBootInput);
        }
        for index in 0..self.manifest.domains.len() {
            let name = self.manifest.domains[index].name;
            let flags = if self.manifest.domains[index].protected {
                ipc_schema::syscall::DOMAIN_PROTECTED
            } else {
                0
            };
            match sys::domain_create_with(self.domains, name, flags) {
                Ok(id) => {
                    let _ = self.created.push((index, id));
                }
                Err(e) => {
                    defmt::error!("domain `{=str}` could not be created: {}", name, e);
                    self.failed_builds += 1;
                }
            }
        }
        Ok(())
    }

    /// The id of the domain named `name`, once created.
    fn domain_id(&self, name: &str) -> Option<u16> {
        self.created
            .iter()
            .find(|(i, _)| self.manifest.domains[*i].name == name)
            .map(|&(_, id)| id)
    }

    /// Builds and starts every domain created.
    pub fn build_domains(&mut self) -> Result<(), HaltStatus> {
        for c in 0..self.created.len() {
            let (index, id) = self.created[c];
            let spec = self.manifest.domains[index].clone();
            let (Some(exits), Some(violations)) =
                (self.endpoint(spec.exits), self.endpoint(spec.violations))
            else {
                defmt::error!(
                    "domain {=str}: no service receives on its exit endpoint `{=str}` or violation endpoint `{=str}`",
                    spec.name,
                    spec.exits,
                    spec.violations
                );
                let _ = sys::domain_control(self.domains, id, DomainOp::Destroy);
                self.failed_builds += 1;
                continue;
            };
            let runs = sys::vm_features() & ipc_schema::syscall::vm_features::VMX != 0;
            // Every other owner of a device (RMRR-6).
            let mut others: heapless::Vec<(ipc_schema::manifest::PciDevice, &str), 64> =
                heapless::Vec::new();
            for (i, d) in self.manifest.domains.iter().enumerate() {
                if i != index {
                    for dev in d.devices.iter() {
                        let _ = others.push((dev.device, d.name));
                    }
                }
            }
            for s in self.manifest.services.iter() {
                for h in s.handles.iter() {
                    if let Object::Device(dev) = h.object {
                        let _ = others.push((dev, s.name));
                    }
                }
            }
            match build::domain(
                self.domains,
                self.memory,
                &spec,
                id,
                exits,
                violations,
                runs,
                &others,
            ) {
                Ok(b) => {
                    defmt::info!(
                        "domain {=u16} ({=str}): guest {=str}, {=u32} MiB in {=u32} 2 MiB + {=u32} 4 KiB pages, entry {=u32:#x} ({})",
                        b.id,
                        spec.name,
                        spec.guest,
                        spec.memory_mib,
                        b.large_pages,
                        b.small_pages,
                        b.entry,
                        b.format
                    );
                    let _ = self.built.push(DomainEntry {
                        id: b.id,
                        spec: index,
                        ended: false,
                        shadow_pages: 0,
                        fork_name: None,
                        runs,
                    });
                }
                Err(e) => {
                    defmt::error!("domain `{=str}` could not be built: {}", spec.name, e);
                    let _ = sys::domain_control(self.domains, id, DomainOp::Destroy);
                    self.failed_builds += 1;
                }
            }
        }
        Ok(())
    }

    pub fn run(&mut self) -> ! {
        let mut mask = (1u64 << self.faults) | (1u64 << self.domain_events);
        if let Some(ep) = self.supervisor_ep {
            mask |= 1 << ep;
        }
        // A system without domains (or whose domains all failed) has nothing to run.
        self.check_domains();
        ipc::serve(self, mask)
    }

    /// Restarts or holds services that faulted.
    fn check_faults(&mut self) {
        let now = sys::time().0;
        let mut happened: heapless::Vec<SupervisorEvent, 16> = heapless::Vec::new();
        for s in self.services.iter_mut() {
            let Ok((state, _, faults)) = sys::process_status(s.process) else {
                continue;
            };
            let spec = &self.manifest.services[s.spec];
            if s.held || s.done.is_some() || state == 0 {
                continue;
            }
            let name = fixed_name(spec.name);
            if state == 2 {
                // Ended by itself (EXIT); `faults` is its exit code.
                if spec.task {
                    if faults == 0 {
                        defmt::info!("init: task {=str} ended (code 0)", spec.name);
                    } else {
                        defmt::error!(
                            "init: task {=str} ended with code {=u32}",
                            spec.name,
                            faults
                        );
                    }
                    s.done = Some(faults);
                    let _ = happened.push(SupervisorEvent::TaskEnded { name, code: faults });
                } else {
                    defmt::warn!(
                        "init: service {=str} ended by itself (code {=u32}); it serves nobody now",
                        spec.name,
                        faults
                    );
                    s.held = true;
                    let _ = happened.push(SupervisorEvent::ServiceHeld { name });
                }
                continue;
            }
            let _ = happened.push(SupervisorEvent::ServiceFaulted {
                name,
                generation: s.generation,
            });
            if spec.task {
                defmt::error!("init: task {=str} faulted; it is not restarted", spec.name);
                s.done = Some(u32::MAX);
                let _ = happened.push(SupervisorEvent::TaskEnded {
                    name,
                    code: u32::MAX,
                });
                continue;
            }
            let window = u64::from(spec.restart_window_ms) * 1000;
            while s
                .recent
                .front()
                .is_some_and(|&t| now.saturating_sub(t) > window)
            {
                s.recent.pop_front();
            }
            if spec.disposition == Disposition::Hold {
                defmt::warn!(
                    "init: service {=str} faulted; holding it (disposition hold)",
                    spec.name
                );
                hold(s, spec.name);
                let _ = happened.push(SupervisorEvent::ServiceHeld { name });
            } else if s.recent.len() as u32 >= spec.max_restarts {
                defmt::error!(
                    "init: service {=str} faulted {=u32} times within {=u32} ms; holding it",
                    spec.name,
                    s.recent.len() as u32 + 1,
                    spec.restart_window_ms
                );
                hold(s, spec.name);
                let _ = happened.push(SupervisorEvent::ServiceHeld { name });
            } else {
                match sys::restart(s.process, None) {
                    Ok(_) => {
                        s.generation += 1;
                        s.restarts += 1;
                        if s.recent.is_full() {
                            s.recent.pop_front();
                        }
                        let _ = s.recent.push_back(now);
                        defmt::warn!(
                            "init: restarted service {=str} after fault {=u32} (generation {=u32})",
                            spec.name,
                            faults,
                            s.generation
                        );
                        let _ = happened.push(SupervisorEvent::ServiceRestarted {
                            name,
                            generation: s.generation,
                        });
                    }
                    Err(e) => {
                        defmt::error!("init: cannot restart service {=str}: {}", spec.name, e);
                        hold(s, spec.name);
                        let _ = happened.push(SupervisorEvent::ServiceHeld { name });
                    }
                }
            }
        }
        for e in happened {
            self.record(e);
        }
    }

    /// Halts the system once every domain has ended.
    fn check_domains(&mut self) {
        let mut all_ok = self.failed_builds == 0;
        let tasks_ok = self.services.iter().all(|s| s.done.is_none_or(|c| c == 0));
        for i in 0..self.built.len() {
            let id = self.built[i].id;
            let info = sys::domain_info(self.domains, id);
            if !matches!(info, Ok((0..=2, _, _))) && !self.built[i].ended {
                self.built[i].ended = true;
                let (state, status) = match info {
                    Ok((state, status, _)) => (state as u8, status),
                    Err(_) => (5, 0),
                };
                self.record(SupervisorEvent::DomainEnded { id, state, status });
            }
        }
        for s in &self.services {
            match s.done {
                None if self.manifest.services[s.spec].task => return,
                _ => {}
            }
        }
        for d in self.built.iter().filter(|d| d.runs) {
            match sys::domain_info(self.domains, d.id) {
                // Building, running, paused: not over yet.
                Ok((0..=2, _, _)) => return,
                // Exited with status 0, or destroyed on request (the
                // kernel forgets a destroyed domain).
                Ok((3, 0, _)) | Ok((5, _, _)) | Err(SysError::BadArgument) => {}
                _ => all_ok = false,
            }
        }
        let status = if !all_ok {
            HaltStatus::GuestFailed
        } else if !tasks_ok {
            HaltStatus::TaskFailed
        } else {
            HaltStatus::Success
        };
        // The services told of the same ends (`DOMAIN_WATCH`) are ready
        // now: they run before the halt (a yield puts init behind every
        // one of them), so that what they do for an ended domain is done
        // and logged, not cut off by whichever of them init ran before.
        sys::yield_now();
        defmt::info!("init: every domain and task has ended; halting");
        sys::halt(self.system, status.code())
    }

    /// A service as a DMA backend (`SupervisorRequest::DmaBackend`): its
    /// devices and client domains from the manifest, and its state now.
    fn dma_backend(&self, client: u64) -> SupervisorReply {
        let mut devices = BoundedVec::new();
        let mut clients = BoundedVec::new();
        let Some(spec) = (client as usize)
            .checked_sub(1)
            .and_then(|i| self.manifest.services.get(i))
        else {
            return SupervisorReply::Refused(Refusal::NoSuchService);
        };
        for h in spec.handles.iter() {
            if let Object::Device(d) = h.object {
                let _ = devices.0.push((d.segment, d.source));
            }
        }
        for (i, d) in self.manifest.domains.iter().enumerate() {
            if spec.dma_clients & (1 << i) != 0
                && let Some(id) = self.domain_id(d.name)
            {
                let _ = clients.0.push(id);
            }
        }
        let running = self.services.iter().find(|s| s.spec as u64 + 1 == client);
        SupervisorReply::DmaBackend {
            devices,
            clients,
            generation: running.map_or(0, |s| s.generation),
            running: running.is_some_and(|s| {
                !s.held
                    && s.done.is_none()
                    && matches!(sys::process_status(s.process), Ok((0, _, _)))
            }),
        }
    }

    fn service_info(&self, index: u16) -> Option<ServiceInfo> {
        let s = self.services.get(usize::from(index))?;
        let state = match sys::process_status(s.process) {
            Ok((0, _, _)) => 0,
            Ok((1, _, _)) => 1,
            _ if s.held_faulted => 1,
            _ => 2,
        };
        Some(ServiceInfo {
            name: fixed_name(self.manifest.services[s.spec].name),
            generation: s.generation,
            restarts: s.restarts,
            state,
            key: s.key,
        })
    }

    fn domain_info(&self, index: u16) -> Option<DomainInfo> {
        let d = self.built.get(usize::from(index))?;
        let spec = &self.manifest.domains[d.spec];
        // An entry whose id a newer domain has is of a domain destroyed.
        let present = self.built.iter().rposition(|e| e.id == d.id) == Some(usize::from(index));
        let (state, status, _) = sys::domain_info(self.domains, d.id)
            .ok()
            .filter(|_| present)
            .unwrap_or((5, 0, 0));
        let foreign = sys::domain_foreign(self.domains, d.id)
            .ok()
            .filter(|_| present);
        Some(DomainInfo {
            id: d.id,
            name: d.fork_name.unwrap_or_else(|| fixed_name(spec.name)),
            state: state as u8,
            exit_status: status,
            memory_mib: spec.memory_mib,
            protected: spec.protected,
            foreign_pages: foreign.map_or(0, |f| f.pages),
        })
    }

    /// The names of the domains there (not destroyed), with their ids:
    /// looked up once for a fork (each entry's state is a system call).
    fn names_in_use(&self) -> heapless::Vec<(u16, Name), { ipc_schema::manifest::MAX_DOMAINS }> {
        let destroyed = ipc_schema::syscall::DomainState::Destroyed as u8;
        (0..self.built.len())
            .filter_map(|i| self.domain_info(i as u16))
            .filter(|d| d.state != destroyed)
            .map(|d| (d.id, d.name))
            .collect()
    }

    /// The name of a fork of a domain of `parent`'s manifest entry, unless
    /// given: `<parent>-fork`, else `<parent>-fork2`, `-fork3`... the first
    /// no domain there has (`taken`: a name names one domain), the
    /// parent's part shortened to fit a domain name.
    fn fork_name(parent: &str, taken: &[(u16, Name)]) -> Option<heapless::String<NAME>> {
        use core::fmt::Write;
        (1..=taken.len() + 1).find_map(|n| {
            let mut suffix: heapless::String<16> = heapless::String::new();
            let _ = match n {
                1 => write!(suffix, "-fork"),
                n => write!(suffix, "-fork{n}"),
            };
            let mut keep = parent.len().min(NAME - suffix.len());
            while !parent.is_char_boundary(keep) {
                keep -= 1;
            }
            let mut own: heapless::String<NAME> = heapless::String::new();
            own.push_str(&parent[..keep]).ok()?;
            own.push_str(&suffix).ok()?;
            holder_of(taken, &own).is_none().then_some(own)
        })
    }

    fn service_index(&self, name: &str) -> Option<usize> {
        self.services
            .iter()
            .position(|s| self.manifest.services[s.spec].name == name)
    }

    /// What the service with badge `client` (its index + 1) may do with
    /// each domain created, by id: the manifest's `introspection`.
    fn introspection_rights(&self, client: u64) -> [u8; ipc_schema::manifest::MAX_DOMAINS] {
        let mut rights = [0u8; ipc_schema::manifest::MAX_DOMAINS];
        let Some(service) = client
            .checked_sub(1)
            .and_then(|i| self.manifest.services.get(usize::try_from(i).ok()?))
        else {
            return rights;
        };
        // A fork has its parent's manifest entry, so its rights too.
        let forks = self.built.iter().filter(|d| d.fork_name.is_some());
        for (i, id) in self
            .created
            .iter()
            .copied()
            .chain(forks.map(|d| (d.spec, d.id)))
        {
            let granted = self.manifest.domains[i]
                .introspection
                .iter()
                .find(|x| x.service == service.name);
            // Each id's rights are its present domain's: a fork given a
            // destroyed domain's id gets none of that domain's grant.
            if let Some(slot) = usize::from(id)
                .checked_sub(1)
                .and_then(|s| rights.get_mut(s))
            {
                *slot = granted.map_or(0, |g| g.rights);
            }
        }
        rights
    }

    /// `count` shadow pages for domain `id`, for the service with badge
    /// `caller`, which needs `views` over it: mapped right past the
    /// domain's RAM (the kernel allows a running domain nothing else).
    /// VM fork (docs/sharing.md): the kernel makes the child; init lists
    /// it with its parent's manifest entry and its own name.
    fn fork(&mut self, parent: u16, name: ipc_schema::supervisor::Name) -> SupervisorReply {
        // (The newest entry of an id is its present domain's: a destroyed
        // domain's id goes to the next domain made.)
        let Some(spec) = self
            .built
            .iter()
            .rev()
            .find(|d| d.id == parent)
            .map(|d| d.spec)
        else {
            return SupervisorReply::Refused(Refusal::NoSuchDomain);
        };
        if self.built.is_full() {
            return SupervisorReply::Refused(Refusal::Kernel {
                error: SysError::NoResources as u64,
            });
        }
        let given = name_str(&name);
        let taken = self.names_in_use();
        let own = if given.is_empty() {
            let Some(own) = Self::fork_name(self.manifest.domains[spec].name, &taken) else {
                return SupervisorReply::Refused(Refusal::Kernel {
                    error: SysError::NoResources as u64,
                });
            };
            own
        } else if let Some(id) = holder_of(&taken, given) {
            return SupervisorReply::Refused(Refusal::NameInUse { id });
        } else {
            let mut own: heapless::String<NAME> = heapless::String::new();
            let _ = own.push_str(given);
            own
        };
        match sys::domain_fork(self.domains, parent, &own) {
            Ok(id) => {
                defmt::info!(
                    "init: domain {=u16} ({=str}) forked from domain {=u16}",
                    id,
                    own.as_str(),
                    parent
                );
                let _ = self.built.push(DomainEntry {
                    id,
                    spec,
                    ended: false,
                    shadow_pages: 0,
                    fork_name: Some(fixed_name(&own)),
                    runs: true,
                });
                SupervisorReply::Forked { id }
            }
            Err(e) => {
                defmt::warn!("init: domain {=u16} not forked: {}", parent, e);
                SupervisorReply::Refused(Refusal::Kernel { error: e as u64 })
            }
        }
    }

    fn shadow_frames(&mut self, caller: u64, id: u16, count: u16) -> SupervisorReply {
        use ipc_schema::manifest::introspection::VIEWS;
        use ipc_schema::supervisor::MAX_SHADOW_PAGES;
        let Some(entry) = self.built.iter().rposition(|d| d.id == id) else {
            return SupervisorReply::Refused(Refusal::NoSuchDomain);
        };
        let allowed = usize::from(id)
            .checked_sub(1)
            .and_then(|i| self.introspection_rights(caller).get(i).copied())
            .is_some_and(|r| r & VIEWS != 0);
        if !allowed {
            defmt::warn!(
                "init: shadow pages for domain {=u16} refused: the manifest does not give caller {=u64} `views` over it",
                id,
                caller
            );
            return SupervisorReply::Refused(Refusal::NotAllowed);
        }
        let given = self.built[entry].shadow_pages;
        if count == 0 || given.saturating_add(count) > MAX_SHADOW_PAGES {
            return SupervisorReply::Refused(Refusal::ShadowQuota {
                limit: MAX_SHADOW_PAGES,
            });
        }
        let kernel = |e: SysError| SupervisorReply::Refused(Refusal::Kernel { error: e as u64 });
        let ram = match sys::domain_info(self.domains, id) {
            Ok((_, _, ram)) => ram,
            Err(e) => return kernel(e),
        };
        let gfn = ram.div_ceil(4096);
        let frames = match sys::frames_alloc(self.memory, u64::from(count), 1) {
            Ok(f) => f,
            Err(e) => return kernel(e),
        };
        let mapped = sys::domain_map_ram(self.domains, id, gfn, frames, u64::from(count));
        let _ = sys::handle_close(frames);
        if let Err(e) = mapped {
            return kernel(e);
        }
        self.built[entry].shadow_pages = given + count;
        defmt::info!(
            "init: domain {=u16}: {=u16} shadow page(s) at gfn {=u64:#x}, outside its memory map",
            id,
            count,
            gfn
        );
        SupervisorReply::Shadow { gfn }
    }

    /// Answers `r` from the service with badge `caller` (its index + 1).
    fn request(&mut self, caller: u64, r: SupervisorRequest) -> SupervisorReply {
        match r {
            SupervisorRequest::Service { index } => {
                SupervisorReply::Service(self.service_info(index))
            }
            SupervisorRequest::Domain { index } => SupervisorReply::Domain(self.domain_info(index)),
            SupervisorRequest::DomainControl { id, op } => {
                if !self.built.iter().any(|d| d.id == id) {
                    return SupervisorReply::Refused(Refusal::NoSuchDomain);
                }
                match sys::domain_control(self.domains, id, op) {
                    Ok(()) => {
                        defmt::info!("init: domain {=u16}: {} on request", id, op);
                        // Its end is told at once (a destroyed fork is
                        // forgotten, its id going to the next domain made,
                        // so `check_domains` would never see it end).
                        if op == DomainOp::Destroy {
                            if let Some(d) = self.built.iter_mut().find(|d| d.id == id && !d.ended)
                            {
                                d.ended = true;
                                let state = ipc_schema::syscall::DomainState::Destroyed as u8;
                                self.record(SupervisorEvent::DomainEnded {
                                    id,
                                    state,
                                    status: 0,
                                });
                            }
                            self.built.retain(|d| d.id != id || d.fork_name.is_none());
                        }
                        SupervisorReply::Done
                    }
                    Err(e) => SupervisorReply::Refused(Refusal::Kernel { error: e as u64 }),
                }
            }
            SupervisorRequest::SwapCheck { name } => match self.service_index(name_str(&name)) {
                None => SupervisorReply::Refused(Refusal::NoSuchService),
                Some(i) if self.services[i].spec as u64 + 1 == caller => {
                    SupervisorReply::Refused(Refusal::IsCaller)
                }
                Some(_) => SupervisorReply::Done,
            },
            SupervisorRequest::Swap { name, len } => {
                let Some(i) = self.service_index(name_str(&name)) else {
                    return SupervisorReply::Refused(Refusal::NoSuchService);
                };
                if self.services[i].spec as u64 + 1 == caller {
                    return SupervisorReply::Refused(Refusal::IsCaller);
                }
                match crate::swap::swap(self, i, len) {
                    Ok(generation) => SupervisorReply::Swapped { generation },
                    Err(r) => SupervisorReply::Refused(r),
                }
            }
            SupervisorRequest::Events { after } => {
                let mut events = BoundedVec::new();
                for &(seq, e) in self.events.iter() {
                    // Numbers wrap: "after" means within half the range ahead.
                    if seq.wrapping_sub(after).wrapping_sub(1) < u32::MAX / 2
                        && events.0.push((seq, e)).is_err()
                    {
                        break;
                    }
                }
                SupervisorReply::Events {
                    events,
                    next: self.next_event,
                }
            }
            SupervisorRequest::IntrospectionRights { client } => {
                SupervisorReply::Rights(self.introspection_rights(client))
            }
            SupervisorRequest::ShadowFrames { id, count } => self.shadow_frames(caller, id, count),
            SupervisorRequest::Fork { parent, name } => self.fork(parent, name),
            SupervisorRequest::DmaBackend { client } => self.dma_backend(client),
            SupervisorRequest::DmaFault { event } => {
                let iommu = (caller as usize)
                    .checked_sub(1)
                    .and_then(|i| self.manifest.services.get(i))
                    .is_some_and(|s| s.handles.iter().any(|h| h.object == Object::Iommu));
                if !iommu || !matches!(event, SupervisorEvent::DmaFault { .. }) {
                    return SupervisorReply::Refused(Refusal::NotAllowed);
                }
                self.record(event);
                SupervisorReply::Done
            }
            SupervisorRequest::InjectFault { name } => {
                let Some(i) = self.service_index(name_str(&name)) else {
                    return SupervisorReply::Refused(Refusal::NoSuchService);
                };
                if self.services[i].spec as u64 + 1 == caller {
                    return SupervisorReply::Refused(Refusal::IsCaller);
                }
                defmt::warn!(
                    "init: injecting a fault into service {=str}",
                    name_str(&name)
                );
                // The service faults while answering: the call fails (Dead).
                let _ = self.services[i]
                    .lifecycle
                    .call_once::<_, LifecycleReply>(&LifecycleRequest::Fault);
                SupervisorReply::Done
            }
        }
    }
}

/// Asks a service through its lifecycle endpoint. A first `Dead` (the
/// service restarted since init last called it) is followed by one more
/// attempt only if the service runs: init must never wait for a restart
/// that only init can make.
pub fn lifecycle(
    process: Handle,
    client: &mut Client,
    request: &LifecycleRequest,
) -> Result<LifecycleReply, service_runtime::ipc::CallError> {
    match client.call_once::<_, LifecycleReply>(request) {
        Err(service_runtime::ipc::CallError::Sys(SysError::Dead))
            if matches!(sys::process_status(process), Ok((0, _, _))) =>
        {
            client.call_once(request)
        }
        other => other,
    }
}

/// Holds a service that faulted: it is not restarted, and it is ended, so
/// that the kernel closes the endpoints it served and their callers fail at
/// once (`NoServer`) instead of waiting for it.
fn hold(s: &mut Running, name: &str) {
    s.held = true;
    s.held_faulted = true;
    if let Err(e) = sys::kill(s.process) {
        defmt::error!("init: cannot end held service {=str}: {}", name, e);
    }
}

/// Scratch mapping for ELF inspection.
pub const SCRATCH_VA: u64 = ipc_schema::syscall::layout::MAP_BASE + (2 << 30);

/// Spawns `name` from `elf` with `grants`.
pub fn spawn(
    name: &str,
    elf: Handle,
    grants: &Grants,
    successor: bool,
) -> Result<Handle, SysError> {
    let mut all = BoundedVec::<Grant, MAX_HANDLES>::new();
    let _ = all.0.extend_from_slice(grants);
    let spec = SpawnSpec {
        name: handle_name(name),
        grants: all,
        successor,
    };
    let mut buf = [0u8; 4096];
    let bytes = postcard::to_slice(&spec, &mut buf).map_err(|_| SysError::BadArgument)?;
    sys::spawn(elf, bytes)
}

impl Service for Supervisor {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        (Some(slot) == self.supervisor_ep).then_some(SUPERVISOR)
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        let result =
            ipc::decode::<SupervisorRequest>(msg.bytes).map(|r| self.request(msg.badge, r));
        ipc::encode_reply::<SupervisorReply>(&result.map_err(|e: IpcError| e), reply)
    }

    fn notified(&mut self, slot: Handle, _bits: u64) {
        if slot == self.faults {
            self.check_faults();
            // A task that ended may have been the last thing running.
            self.check_domains();
        } else if slot == self.domain_events {
            self.check_domains();
        }
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

/// The id of the domain in `taken` (the names in use) named `name`.
fn holder_of(taken: &[(u16, Name)], name: &str) -> Option<u16> {
    taken
        .iter()
        .find(|(_, n)| name_str(n) == name)
        .map(|&(id, _)| id)
}
