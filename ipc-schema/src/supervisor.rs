//! The supervisor interface: what the console service (on behalf of the
//! host) asks init.

use crate::ipc::{BoundedVec, InterfaceId};
use crate::syscall::DomainOp;
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// Longest service or domain name in these messages.
pub const NAME: usize = 32;

/// A name, NUL-padded.
pub type Name = [u8; NAME];

/// Turns a `&str` into a [`Name`] (cut at 32 bytes).
pub fn name(s: &str) -> Name {
    let mut n = [0u8; NAME];
    let b = s.as_bytes();
    let len = b.len().min(NAME);
    n[..len].copy_from_slice(&b[..len]);
    n
}

/// The text of a [`Name`].
pub fn name_str(n: &Name) -> &str {
    let end = n.iter().position(|&c| c == 0).unwrap_or(NAME);
    core::str::from_utf8(&n[..end]).unwrap_or("?")
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub enum SupervisorRequest {
    /// The `index`-th service (0-based); `None` past the last.
    Service {
        index: u16,
    },
    /// The `index`-th domain.
    Domain {
        index: u16,
    },
    DomainControl {
        id: u16,
        op: DomainOp,
    },
    /// Whether service `name` could be swapped (it exists and is not the
    /// caller): asked before any byte of the new ELF is sent.
    SwapCheck {
        name: Name,
    },
    /// Replace the running service `name` by the ELF (of `len` bytes) in the
    /// swap buffer shared with the caller.
    Swap {
        name: Name,
        len: u32,
    },
    /// The events recorded after sequence number `after` (the oldest
    /// first, at most [`EVENTS_PER_REPLY`]).
    Events {
        after: u32,
    },
    /// Make service `name` fault (tests).
    InjectFault {
        name: Name,
    },
    /// What the service whose handles carry badge `client` may do with each
    /// domain (the manifest's `introspection`): [`SupervisorReply::Rights`].
    /// Asked by the services that act on domains for their callers
    /// (altp2m, introspect).
    IntrospectionRights {
        client: u64,
    },
    /// `count` (1 to [`MAX_SHADOW_PAGES`]) new zeroed frames for domain
    /// `id`, mapped in its host p2m right past its RAM, outside the memory
    /// map its guest was given: targets for change_gfn (hidden shadow
    /// pages, e.g. for breakpoints). Needs the `views` introspection right:
    /// [`SupervisorReply::Shadow`].
    ShadowFrames {
        id: u16,
        count: u16,
    },
    /// VM fork (docs/sharing.md): a child of paused domain `parent`,
    /// named `name` (empty: `<parent>-fork`), sharing all of its memory
    /// copy-on-write and starting, paused, from its vCPU state:
    /// [`SupervisorReply::Forked`]. `DomainControl` with
    /// `DomainOp::Reset` takes it back to the parent's state.
    Fork {
        parent: u16,
        name: Name,
    },
    /// What the service whose handles carry badge `client` is as a DMA
    /// backend (asked by the `iommu` service): [`SupervisorReply::DmaBackend`].
    DmaBackend {
        client: u64,
    },
    /// Record a DMA fault as an event (IO-6): from the service the
    /// manifest grants the IOMMU (`Refused(NotAllowed)` from any other).
    DmaFault {
        event: SupervisorEvent,
    },
}

/// The most devices one backend drives.
pub const MAX_BACKEND_DEVICES: usize = 4;

/// The most shadow pages one domain gets in all.
pub const MAX_SHADOW_PAGES: u16 = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum SupervisorReply {
    Service(Option<ServiceInfo>),
    Domain(Option<DomainInfo>),
    Done,
    /// The swapped-in service's new generation.
    Swapped {
        generation: u32,
    },
    /// Events with their sequence numbers; `next` is the number the next
    /// event will get (events older than the supervisor keeps are gone:
    /// the gap in the numbers says how many).
    Events {
        events: BoundedVec<(u32, SupervisorEvent), EVENTS_PER_REPLY>,
        next: u32,
    },
    Refused(Refusal),
    /// `manifest::introspection` bits by domain id (index `id - 1`).
    Rights([u8; crate::manifest::MAX_DOMAINS]),
    /// The first gfn of the shadow pages given.
    Shadow {
        gfn: u64,
    },
    /// The fork's domain id.
    Forked {
        id: u16,
    },
    /// A backend's devices (its manifest `device` handles, as (segment,
    /// source id)), the ids of its `dma_clients` domains, and its generation
    /// (a restarted backend starts with no mappings; IO-4).
    DmaBackend {
        devices: BoundedVec<(u16, u16), MAX_BACKEND_DEVICES>,
        clients: BoundedVec<u16, { crate::manifest::MAX_DOMAINS }>,
        generation: u32,
        running: bool,
    },
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct ServiceInfo {
    pub name: Name,
    pub generation: u32,
    pub restarts: u32,
    /// Running, faulted (held), ended.
    pub state: u8,
    /// The key of the first interface it serves (0 if none).
    pub key: [u8; 8],
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct DomainInfo {
    pub id: u16,
    pub name: Name,
    /// A `syscall::DomainState` code.
    pub state: u8,
    pub exit_status: u32,
    pub memory_mib: u32,
    /// Not started or unpaused while services hold foreign mappings of it
    /// (the manifest's `protected`; FM-2).
    pub protected: bool,
    /// Pages of its RAM services hold foreign-mapped (FM-1).
    pub foreign_pages: u32,
}

/// Events per [`SupervisorReply::Events`].
pub const EVENTS_PER_REPLY: usize = 4;

/// Something that happened to a service or a domain.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub enum SupervisorEvent {
    ServiceFaulted {
        name: Name,
        generation: u32,
    },
    ServiceRestarted {
        name: Name,
        generation: u32,
    },
    /// Faulted and held (its disposition, or too many restarts).
    ServiceHeld {
        name: Name,
    },
    ServiceSwapped {
        name: Name,
        generation: u32,
    },
    TaskEnded {
        name: Name,
        code: u32,
    },
    /// A domain ended: its `syscall::DomainState` code and exit status.
    DomainEnded {
        id: u16,
        state: u8,
        status: u32,
    },
    /// A DMA the IOMMU blocked (IO-6), as the `iommu` service read it from
    /// the unit: the device (segment, bus << 8 | device << 3 | function),
    /// the page address it named, the VT-d fault reason, the direction.
    DmaFault {
        segment: u16,
        source: u16,
        address: u64,
        reason: u8,
        write: bool,
    },
}

/// Why the supervisor refused.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Refusal {
    NoSuchService,
    NoSuchDomain,
    /// The swap file is not an ELF Parallax can load.
    NotElf,
    /// The new ELF does not declare an interface the service serves (its key
    /// as the running service declares it).
    MissingInterface {
        key: [u8; 8],
    },
    /// The new instance did not start or refused the state.
    SwapFailed,
    /// The kernel refused the operation.
    Kernel {
        error: u64,
    },
    /// The service named is the one asking: it cannot answer its own
    /// lifecycle requests while it waits for this answer.
    IsCaller,
    /// The manifest's `introspection` does not give the caller the right.
    NotAllowed,
    /// More shadow pages than a domain may have ([`MAX_SHADOW_PAGES`]), or
    /// none.
    ShadowQuota {
        limit: u16,
    },
    /// A domain there (not destroyed) has that name already: domain names
    /// name one domain each (a fork's given name).
    NameInUse {
        id: u16,
    },
}

pub const SUPERVISOR: InterfaceId =
    InterfaceId::new::<(SupervisorRequest, SupervisorReply)>("parallax/supervisor");

crate::assert_fits!(SupervisorRequest, SupervisorReply);
