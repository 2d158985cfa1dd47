//! The altp2m interface: how the vmm (for the in-guest agent), other
//! services and the console (for the external agent on the host) ask the
//! altp2m service, which owns every domain's views.
//!
//! Authority is by endpoint: in-guest requests come only through the
//! `altp2m-guest` endpoint (which only the vmm may call), everything else
//! through `altp2m`; each is checked against the domain's [`Mode`].

use crate::hypercall::{Access, Mode, Reply, Request};
use crate::ipc::{BoundedVec, InterfaceId};
use crate::logdirty::{GfnRange, Mechanism, RANGES_PER_REPLY};
use crate::vmexit::AccessBits;
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// What the altp2m service does with a violation nobody listens to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NoListener {
    /// Stop the domain, saying why.
    Crash,
    /// Keep the vCPU waiting, saying why, until a listener answers.
    Pause,
}

/// A request about a domain's views.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum AltRequest {
    /// An in-guest agent's request, on behalf of `domain`'s vCPU `vcpu`
    /// (only on the `altp2m-guest` endpoint).
    Guest {
        domain: u16,
        vcpu: u16,
        request: Request,
    },
    /// What the page `gfn` of `domain` is to a guest running in `view`:
    /// the frame it reaches there (a change_gfn remaps it) and the access
    /// the view gives it. The vmm asks before it reads a hypercall's
    /// request page and writes its reply: memory the hypervisor touches on
    /// the guest's behalf is touched as the guest would, through its view
    /// (only on the `altp2m-guest` endpoint). Answered with
    /// [`AltReply::Page`], or `Reply(Reply::Error(..))`.
    GuestPage { domain: u16, view: u16, gfn: u64 },
    /// An external agent's request (the host, another service).
    External { domain: u16, request: Request },
    /// Sets the domain's mode (external agents and the supervisor).
    SetMode { domain: u16, mode: Mode },
    /// Sets what happens to a violation when no listener is attached.
    SetNoListener { domain: u16, policy: NoListener },
    /// Attaches (or detaches) the caller as the domain's violation listener:
    /// violations become [`VmEvent`]s to fetch with `Events` and answer with
    /// `Answer`, the vCPU waiting meanwhile.
    Listen { domain: u16, on: bool },
    /// The events after number `after` (the oldest first).
    Events { after: u32 },
    /// The listener's answer to event `event`.
    Answer { event: u32, action: Action },
    /// A listener's wait for its next event, with its answer to the last
    /// one if any: the answer is applied (as `Answer`), then the reply is
    /// the oldest event of a domain the caller listens to that no
    /// `NextEvent` was given yet ([`AltReply::Event`]), at once or when
    /// one happens (the call waits meanwhile). One round trip per event,
    /// no notification, no polling (docs/altp2m.md). At most
    /// [`MAX_WAITING_LISTENERS`] calls wait at once; more are refused with
    /// `TooManyWaiting`.
    NextEvent { answer: Option<(u32, Action)> },
    /// Does nothing: for measuring an IPC round trip.
    Ping,
    /// The logdirty service's constraint on the entries of `range` of
    /// `domain` (docs/p2m.md, rule 3; docs/logdirty.md): `Some` arms
    /// tracking with that mechanism (write-protection: every entry that
    /// maps a frame of the range loses write until the frame is written;
    /// PML: the host p2m's entries of the range become 4 KiB ones, the
    /// views' dirty bits are cleared, and entries a change_gfn points at a
    /// frame of the range are write-protected, so that such a write is
    /// credited to the frame), `None` disarms it. Nothing is dirtied by
    /// arming.
    Track {
        domain: u16,
        range: GfnRange,
        how: Option<Mechanism>,
    },
    /// The frames whose write-protection a write lifted since the last
    /// take, at or after `from` (lowest first), protected again as they are
    /// taken: [`AltReply::Dirtied`].
    DirtyTake { domain: u16, from: u64 },
    /// PML: clears the dirty bits of the entries that map `ranges` in every
    /// view, so that the next write to each is logged again.
    Rearm {
        domain: u16,
        ranges: BoundedVec<GfnRange, RANGES_PER_REPLY>,
    },
}

/// What the vCPU of a violation does once the listener answered.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Action {
    /// Retry the access (after the listener changed something).
    Retry,
    /// Let this one access through, then restrict the page again (the vCPU
    /// runs one instruction with the page open).
    AllowOnce,
    /// Give the page this access in the view, then retry.
    SetAccess(Access),
    /// Retry in another view.
    SwitchView(u16),
    /// Skip the instruction that made the access, `length` bytes long (the
    /// listener decodes it: an EPT violation does not report a length).
    Skip { length: u8 },
    /// Stop the domain.
    Crash,
}

/// A violation reported to the listener (ALT-4).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VmEvent {
    pub id: u32,
    pub domain: u16,
    pub vcpu: u16,
    pub view: u16,
    pub gpa: u64,
    /// The guest-linear address, where the CPU reported one.
    pub gla: Option<u64>,
    /// The access that was refused.
    pub access: AccessBits,
    /// What the entry allowed.
    pub allowed: AccessBits,
    pub rip: u64,
    /// The restriction was placed by the in-guest agent (not an external one).
    pub internal: bool,
}

/// Events per [`AltReply::Events`].
pub const EVENTS_PER_REPLY: usize = 3;

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum AltReply {
    /// The answer to a `Guest` or `External` request.
    Reply(Reply),
    Done,
    Events {
        events: BoundedVec<VmEvent, EVENTS_PER_REPLY>,
        next: u32,
    },
    /// The request was refused: why (an altp2m error, or the mode).
    Refused(AltError),
    Pong,
    /// `NextEvent`: the event.
    Event(VmEvent),
    /// A page as a guest in a view sees it ([`AltRequest::GuestPage`]):
    /// the frame (as the gfn that owns it in the host p2m; `None`: not
    /// mapped in the view) and the view's access.
    Page {
        frame_gfn: Option<u64>,
        access: Access,
    },
    /// Frames written since the last [`AltRequest::DirtyTake`]; `next`:
    /// where to take from for more.
    Dirtied {
        ranges: BoundedVec<GfnRange, RANGES_PER_REPLY>,
        next: Option<u64>,
    },
}

/// Why a request other than a view operation was refused.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AltError {
    /// No domain has that id.
    NoSuchDomain,
    /// No event waits for an answer under that number.
    NoSuchEvent,
    /// Another listener is attached to the domain.
    ListenerBusy,
    /// An in-guest request on the external endpoint, or the reverse.
    WrongEndpoint,
    /// The answer names a view that does not exist.
    NoSuchView,
    /// A tracking range that is empty or past the domain's RAM.
    BadRange,
    /// The kernel refused the entries' change (out of table memory).
    OutOfMemory,
    /// [`MAX_WAITING_LISTENERS`] `NextEvent` calls wait already.
    TooManyWaiting,
}

/// The most `NextEvent` calls the altp2m service holds at once.
pub const MAX_WAITING_LISTENERS: usize = 16;

pub const ALTP2M: InterfaceId = InterfaceId::new::<(AltRequest, AltReply)>("parallax/altp2m");

crate::assert_fits!(AltRequest, AltReply);
