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
    /// Attaches the caller as one of the domain's listeners for the
    /// violations `filter` takes (or changes its filter): a domain has at
    /// most [`MAX_LISTENERS`], and each event goes to the first attached
    /// whose filter takes it; one nobody's filter takes goes by the
    /// domain's no-listener policy. `Listen { on: true }` is this with
    /// [`Filter::ALL`], refused while another client has that one.
    /// Detach with `Listen { on: false }`.
    ListenFor { domain: u16, filter: Filter },
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
    /// Page sharing (docs/sharing.md; only on the `altp2m-share` endpoint,
    /// which only the sharing service may call). SH-1: the frame of `gfn`
    /// becomes a shared frame, read-only in every view from now on (a
    /// constraint of the model, as tracking is). Refused while a view
    /// modifies the gfn (SH-3: `ModifiedInView`). [`AltReply::Shared`].
    ShareNominate { domain: u16, gfn: u64 },
    /// SH-1: `gfn` comes to map shared frame `frame` (an id a
    /// `ShareNominate` answered), read-only; its own frame is freed.
    ShareMap { domain: u16, gfn: u64, frame: u32 },
    /// SH-1: `gfn` gets a frame of its own again (a copy, or the shared
    /// frame itself when it was the last reference), writable as the model
    /// says.
    Unshare { domain: u16, gfn: u64 },
    /// SH-2: the copy-on-write breaks made since the last take (a guest's
    /// write to a shared page: the writer got a private copy and went on),
    /// oldest first: [`AltReply::Breaks`].
    ShareBreaks,
    /// The caller, a listener, serves the endpoint the altp2m service
    /// holds as `listener-events` (the manifest pairs them) and answers
    /// only plainly (`Retry`, `SwitchView`): an event of its for which the
    /// vCPU waits is *forwarded* there (the exit itself, the event's bytes
    /// as `NextEvent`'s reply carries them its message; the kernel applies
    /// only a plain answer to it: docs/altp2m.md). One the kernel cannot
    /// forward (the listener busy) is held as before, `altp2m-events`
    /// signalled, for `NextEvent`, which then never waits: with no event,
    /// `Refused(NoSuchEvent)` at once. `on: false` ends it.
    Forwarded { on: bool },
}

/// Copy-on-write breaks one [`AltReply::Breaks`] carries at most.
pub const BREAKS_PER_REPLY: usize = 8;

/// A copy-on-write break: `gfn` of `domain` left shared frame `frame`,
/// which has `refs` references left.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CowBreak {
    pub domain: u16,
    pub gfn: u64,
    pub frame: u32,
    pub refs: u32,
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
///
/// On the wire an event is a fixed-width layout of [`VmEvent::BYTES`]
/// little-endian bytes (one postcard byte string), like an exit: no
/// varints to encode on the violation path or to decode in the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The vCPU waits for the listener's answer. `false` for the first
    /// access to an `n2rwx` page ([`crate::hypercall::Relaxing::N2Rwx`]),
    /// which went through: an answer is taken (its `SetAccess` applied)
    /// but resumes nothing.
    pub paused: bool,
    /// The exit qualification of the EPT violation as the CPU gave it
    /// (SDM Table 28-7): bits 0-2 the access (read, write, fetch), 3-5 what
    /// the entry allowed, bit 7 whether the linear address (`gla`) is
    /// valid, bit 8 (with bit 7) whether the access was to the translated
    /// address (1) or to a paging-structure entry during the page walk
    /// (0): [`VmEvent::page_walk`].
    pub qualification: u64,
}

impl VmEvent {
    /// The length of the fixed-width layout.
    pub const BYTES: usize = 46;

    /// The access was to a guest paging-structure entry during a page walk
    /// (qualification bit 7 set, bit 8 clear), not to the address itself.
    pub fn page_walk(&self) -> bool {
        self.qualification & 0x180 == 0x080
    }

    /// The fixed-width layout: id, domain, vCPU, view, GPA, GLA present
    /// and GLA, access and allowed (bits 0-2: read, write, execute), RIP,
    /// flags (bit 0: internal, bit 1: paused), qualification.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        self.write_to(&mut b);
        b
    }

    /// [`VmEvent::to_bytes`] written straight into `b` (a reply buffer:
    /// no copy of a layout made on the side).
    #[inline(always)]
    pub fn write_to(&self, b: &mut [u8; Self::BYTES]) {
        let bits =
            |a: AccessBits| u8::from(a.read) | u8::from(a.write) << 1 | u8::from(a.execute) << 2;
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.domain.to_le_bytes());
        b[6..8].copy_from_slice(&self.vcpu.to_le_bytes());
        b[8..10].copy_from_slice(&self.view.to_le_bytes());
        b[10..18].copy_from_slice(&self.gpa.to_le_bytes());
        b[18] = u8::from(self.gla.is_some());
        b[19..27].copy_from_slice(&self.gla.unwrap_or(0).to_le_bytes());
        b[27] = bits(self.access);
        b[28] = bits(self.allowed);
        b[29..37].copy_from_slice(&self.rip.to_le_bytes());
        b[37] = u8::from(self.internal) | u8::from(self.paused) << 1;
        b[38..46].copy_from_slice(&self.qualification.to_le_bytes());
    }

    /// Whether `b` is a layout [`VmEvent::from_bytes`] reads (the same
    /// checks, without building the event).
    #[inline(always)]
    pub fn valid_layout(b: &[u8; Self::BYTES]) -> bool {
        let gla_ok = match b[18] {
            1 => true,
            0 => b[19..27] == [0; 8],
            _ => false,
        };
        gla_ok && b[27] < 8 && b[28] < 8 && b[37] < 4
    }

    /// The layout read back; `None` for any other length, a GLA flag byte
    /// other than 0 or 1, flags above bit 1, or access bits above bit 2.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; Self::BYTES] = b.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at =
            |i: usize| u64::from_le_bytes(*b[i..].first_chunk::<8>().expect("in the layout"));
        let flag = |x: u8| match x {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        let bits = |x: u8| {
            (x < 8).then_some(AccessBits {
                read: x & 1 != 0,
                write: x & 2 != 0,
                execute: x & 4 != 0,
            })
        };
        Some(Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            domain: u16_at(4),
            vcpu: u16_at(6),
            view: u16_at(8),
            gpa: u64_at(10),
            gla: match flag(b[18])? {
                true => Some(u64_at(19)),
                false if u64_at(19) == 0 => None,
                false => return None,
            },
            access: bits(b[27])?,
            allowed: bits(b[28])?,
            rip: u64_at(29),
            internal: (b[37] < 4).then_some(b[37] & 1 != 0)?,
            paused: b[37] & 2 != 0,
            qualification: u64_at(38),
        })
    }
}

impl Serialize for VmEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for VmEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Layout;
        impl serde::de::Visitor<'_> for Layout {
            type Value = VmEvent;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{} bytes of a VmEvent", VmEvent::BYTES)
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<VmEvent, E> {
                VmEvent::from_bytes(b).ok_or_else(|| E::custom("not a VmEvent layout"))
            }
        }
        d.deserialize_bytes(Layout)
    }
}

impl MaxSize for VmEvent {
    // The length (one byte) and the bytes.
    const POSTCARD_MAX_SIZE: usize = 1 + Self::BYTES;
}

impl postcard_schema::Schema for VmEvent {
    const SCHEMA: &'static postcard_schema::schema::NamedType =
        &postcard_schema::schema::NamedType {
            name: "VmEvent",
            ty: &postcard_schema::schema::DataModelType::ByteArray,
        };
}

/// The short ways of the violation path's two messages, byte for byte
/// postcard's (property-tested against it): a listener's
/// `AltRequest::NextEvent` and its answer `Ok(AltReply::Event(e))` (as a
/// server encodes a reply: `Result<AltReply, IpcError>`). The event is
/// its fixed-width layout behind three bytes (`Ok`, `Event`, the length
/// 46); the request is the tag, the option, the event number (a varint)
/// and the action. Neither takes serde's generic visitors; the decoders
/// say `None` for anything else, which postcard then reads.
pub mod short {
    use super::{Action, VmEvent};
    use crate::hypercall::Access;

    /// `AltRequest::NextEvent`'s variant index.
    const NEXT_EVENT: u8 = 8;
    /// `AltReply::Event`'s variant index.
    const EVENT: u8 = 5;
    /// The length of `Ok(AltReply::Event(e))`.
    pub const EVENT_REPLY: usize = 3 + VmEvent::BYTES;

    /// Writes `v` as a varint at `b[n..]`: the length after it.
    #[inline(always)]
    fn varint(b: &mut [u8; NEXT_EVENT_MAX], mut n: usize, mut v: u32) -> usize {
        while v >= 0x80 {
            b[n] = v as u8 | 0x80;
            v >>= 7;
            n += 1;
        }
        b[n] = v as u8;
        n + 1
    }

    /// The longest `AltRequest::NextEvent` (an id of 5 bytes and an
    /// action of 4).
    const NEXT_EVENT_MAX: usize = 16;

    /// Encodes `AltRequest::NextEvent { answer }` into `out`: its length,
    /// or `None` if it does not fit. (Written in place where `out` has
    /// room for the longest, as a client's call buffer has.)
    #[inline]
    pub fn encode_next_event(answer: Option<(u32, Action)>, out: &mut [u8]) -> Option<usize> {
        if let Some(b) = out.first_chunk_mut::<NEXT_EVENT_MAX>() {
            return Some(next_event_into(answer, b));
        }
        let mut b = [0u8; NEXT_EVENT_MAX];
        let n = next_event_into(answer, &mut b);
        out.get_mut(..n)?.copy_from_slice(&b[..n]);
        Some(n)
    }

    #[inline(always)]
    fn next_event_into(answer: Option<(u32, Action)>, b: &mut [u8; NEXT_EVENT_MAX]) -> usize {
        b[0] = NEXT_EVENT;
        b[1] = 0;
        let mut n = 2;
        if let Some((id, action)) = answer {
            b[1] = 1;
            n = varint(b, n, id);
            let bit = u8::from;
            n = match action {
                Action::Retry => varint(b, n, 0),
                Action::AllowOnce => varint(b, n, 1),
                Action::SetAccess(a) => {
                    b[n..n + 4].copy_from_slice(&[2, bit(a.read), bit(a.write), bit(a.execute)]);
                    n + 4
                }
                Action::SwitchView(v) => {
                    b[n] = 3;
                    varint(b, n + 1, v.into())
                }
                Action::Skip { length } => {
                    b[n..n + 2].copy_from_slice(&[4, length]);
                    n + 2
                }
                Action::Crash => varint(b, n, 5),
            };
        }
        n
    }

    /// A varint of a `bits`-bit integer at the start of `b`, as postcard
    /// reads one (at most ceil(bits / 7) bytes, the last holding no more
    /// than the bits left), and what follows.
    #[inline(always)]
    fn take_varint(mut b: &[u8], bits: u32) -> Option<(u32, &[u8])> {
        match *b {
            [x @ 0..0x80, ref rest @ ..] => return Some((u32::from(x), rest)),
            // Two bytes (14 bits: within any `bits` asked for here).
            [x @ 0x80..=0xff, y @ 0..0x80, ref rest @ ..] if bits >= 14 => {
                return Some((u32::from(x & 0x7f) | u32::from(y) << 7, rest));
            }
            _ => {}
        }
        let max = bits.div_ceil(7);
        let mut v = 0u32;
        for i in 0..max {
            let (&x, rest) = b.split_first()?;
            b = rest;
            v |= u32::from(x & 0x7f) << (7 * i);
            if x & 0x80 == 0 {
                if i == max - 1 && u32::from(x) >> (bits % 7) != 0 {
                    return None;
                }
                return Some((v, b));
            }
        }
        None
    }

    /// A postcard bool.
    #[inline(always)]
    fn flag(x: u8) -> Option<bool> {
        match x {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// `AltRequest::NextEvent { answer }` read from all of `bytes`: the
    /// answer; `None` for any other request (or bytes postcard refuses).
    #[inline]
    pub fn decode_next_event(bytes: &[u8]) -> Option<Option<(u32, Action)>> {
        match *bytes {
            [NEXT_EVENT, 0] => return Some(None),
            [NEXT_EVENT, 1, ..] => {}
            _ => return None,
        }
        let (id, rest) = take_varint(&bytes[2..], 32)?;
        let (tag, rest) = take_varint(rest, 32)?;
        let action = match (tag, rest) {
            (0, []) => Action::Retry,
            (1, []) => Action::AllowOnce,
            (2, &[r, w, x]) => Action::SetAccess(Access {
                read: flag(r)?,
                write: flag(w)?,
                execute: flag(x)?,
            }),
            (3, rest) => match take_varint(rest, 16)? {
                (v, []) => Action::SwitchView(v as u16),
                _ => return None,
            },
            (4, &[length]) => Action::Skip { length },
            (5, []) => Action::Crash,
            _ => return None,
        };
        Some(Some((id, action)))
    }

    /// Encodes the reply `Ok(AltReply::Event(e))` into `out`: its length
    /// ([`EVENT_REPLY`]), or `None` if it does not fit.
    #[inline]
    pub fn encode_event_reply(e: &VmEvent, out: &mut [u8]) -> Option<usize> {
        let (head, layout) = out
            .first_chunk_mut::<EVENT_REPLY>()?
            .split_first_chunk_mut::<3>()?;
        *head = [0, EVENT, VmEvent::BYTES as u8];
        e.write_to(layout.first_chunk_mut::<{ VmEvent::BYTES }>()?);
        Some(EVENT_REPLY)
    }

    /// The event of a reply `Ok(AltReply::Event(e))` (all of `bytes`);
    /// `None` for any other reply.
    #[inline]
    pub fn decode_event_reply(bytes: &[u8]) -> Option<VmEvent> {
        match bytes {
            [0, EVENT, len, rest @ ..] if usize::from(*len) == VmEvent::BYTES => {
                VmEvent::from_bytes(rest)
            }
            _ => None,
        }
    }

    /// The id of the event in a reply `Ok(AltReply::Event(e))`: what
    /// [`decode_event_reply`] reads, `e.id`, without building the event
    /// (for a listener that answers every event alike).
    #[inline]
    pub fn event_reply_id(bytes: &[u8]) -> Option<u32> {
        match bytes {
            [0, EVENT, len, rest @ ..] if usize::from(*len) == VmEvent::BYTES => {
                let b: &[u8; VmEvent::BYTES] = rest.try_into().ok()?;
                VmEvent::valid_layout(b).then(|| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => None,
        }
    }
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
    /// A sharing operation done: the shared frame (an opaque id), its
    /// references now, and the frames free in the kernel's pool.
    Shared {
        frame: u32,
        refs: u32,
        free: u64,
    },
    /// [`AltRequest::ShareBreaks`]: breaks, and whether more remain.
    Breaks {
        breaks: BoundedVec<CowBreak, BREAKS_PER_REPLY>,
        more: bool,
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
    /// `NextEvent` from a client that listens to no domain (or stopped
    /// listening while its call waited).
    NotListening,
    /// [`MAX_LISTENERS`] listeners are attached to the domain already.
    TooManyListeners,
    /// The manifest does not let the caller do this to that domain (its
    /// `introspection`: `views` for view requests and modes, `events` for
    /// listening, policies and answers).
    NotAllowed,
    /// SH-3: the gfn is modified in `view` (an access setting, or a
    /// change_gfn from or to it), so it cannot be shared.
    ModifiedInView { view: u16 },
    /// The kernel refused the sharing operation (why: a stale or forged
    /// frame id, the gfn maps that frame already, not RAM, ...).
    Kernel(crate::syscall::EptOpError),
    /// The domain has ended (exited, crashed or destroyed): its alternate
    /// views were freed with it and its listeners and records forgotten,
    /// so there is nothing left to change or ask.
    DomainEnded,
}

/// The most listeners one domain has.
pub const MAX_LISTENERS: usize = 4;

/// Which violations a listener takes: of gfns `first..end`, of the kinds
/// whose bits are in `kinds` (bit 0 read, 1 write, 2 instruction fetch: an
/// event is taken if its access has one of them).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Filter {
    pub first: u64,
    pub end: u64,
    pub kinds: u8,
}

impl Filter {
    /// Every violation.
    pub const ALL: Filter = Filter {
        first: 0,
        end: u64::MAX,
        kinds: 0b111,
    };

    /// Whether it takes a violation of `gfn` with `access`.
    pub fn takes(&self, gfn: u64, access: crate::vmexit::AccessBits) -> bool {
        let kinds =
            u8::from(access.read) | u8::from(access.write) << 1 | u8::from(access.execute) << 2;
        (self.first..self.end).contains(&gfn) && kinds & self.kinds != 0
    }
}

/// The most `NextEvent` calls the altp2m service holds at once.
pub const MAX_WAITING_LISTENERS: usize = 16;

pub const ALTP2M: InterfaceId = InterfaceId::new::<(AltRequest, AltReply)>("parallax/altp2m");

crate::assert_fits!(AltRequest, AltReply);

/// `AltRequest::Ping` as it travels (postcard: its variant's index) and
/// its answer `Ok(AltReply::Pong)`, in fixed bytes: the ping's round trip
/// (`HC_IPC_PING`) is told apart and answered by the altp2m service before
/// any decoding, and checked by its caller without decoding (the tests
/// below check both against postcard).
pub const PING: [u8; 1] = [9];
pub const PONG: [u8; 2] = [0, 4];

#[cfg(test)]
mod layout_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ping_and_pong_are_postcards_bytes() {
        let mut b = [0u8; 8];
        assert_eq!(
            postcard::to_slice(&AltRequest::Ping, &mut b).unwrap(),
            &PING
        );
        assert_eq!(
            postcard::from_bytes::<AltRequest>(&PING),
            Ok(AltRequest::Ping)
        );
        let pong: Result<AltReply, crate::ipc::IpcError> = Ok(AltReply::Pong);
        assert_eq!(postcard::to_slice(&pong, &mut b).unwrap(), &PONG);
        assert_eq!(
            postcard::from_bytes::<Result<AltReply, crate::ipc::IpcError>>(&PONG),
            Ok(Ok(AltReply::Pong))
        );
        // Nothing else answers in these bytes: every other reply differs.
        let other: Result<AltReply, crate::ipc::IpcError> = Ok(AltReply::Done);
        assert_ne!(postcard::to_slice(&other, &mut b).unwrap(), &PONG);
    }

    fn bits() -> impl Strategy<Value = AccessBits> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read, write, execute)| {
            AccessBits {
                read,
                write,
                execute,
            }
        })
    }

    fn event() -> impl Strategy<Value = VmEvent> {
        (
            (any::<u32>(), any::<u16>(), any::<u16>(), any::<u16>()),
            (
                any::<u64>(),
                any::<Option<u64>>(),
                any::<u64>(),
                any::<bool>(),
            ),
            (bits(), bits(), any::<bool>(), any::<u64>()),
        )
            .prop_map(
                |(
                    (id, domain, vcpu, view),
                    (gpa, gla, rip, internal),
                    (access, allowed, paused, qualification),
                )| {
                    VmEvent {
                        id,
                        domain,
                        vcpu,
                        view,
                        gpa,
                        gla,
                        access,
                        allowed,
                        rip,
                        internal,
                        paused,
                        qualification,
                    }
                },
            )
    }

    #[test]
    fn a_page_walk_is_bit_7_without_bit_8() {
        let mut e = VmEvent {
            id: 1,
            domain: 1,
            vcpu: 0,
            view: 0,
            gpa: 0x1000,
            gla: None,
            access: AccessBits::default(),
            allowed: AccessBits::default(),
            rip: 0,
            internal: false,
            paused: true,
            qualification: 0x082,
        };
        assert!(e.page_walk());
        e.qualification = 0x182;
        assert!(!e.page_walk());
        e.qualification = 0x002;
        assert!(!e.page_walk(), "no linear address: not known to be a walk");
    }

    fn action() -> impl Strategy<Value = Action> {
        let access =
            (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read, write, execute)| {
                crate::hypercall::Access {
                    read,
                    write,
                    execute,
                }
            });
        prop_oneof![
            Just(Action::Retry),
            Just(Action::AllowOnce),
            access.prop_map(Action::SetAccess),
            any::<u16>().prop_map(Action::SwitchView),
            any::<u8>().prop_map(|length| Action::Skip { length }),
            Just(Action::Crash),
        ]
    }

    /// Postcard's decoding of a whole message.
    fn whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((v, [])) => Some(v),
            _ => None,
        }
    }

    type Answer = Result<AltReply, crate::ipc::IpcError>;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The short ways write what postcard writes and read it back.
        #[test]
        fn the_short_ways_are_postcard(
            answer in proptest::option::of((any::<u32>(), action())),
            e in event(),
        ) {
            let mut a = [0u8; 64];
            let mut b = [0u8; 64];
            let n = short::encode_next_event(answer, &mut a).unwrap();
            let request = AltRequest::NextEvent { answer };
            prop_assert_eq!(&a[..n], postcard::to_slice(&request, &mut b).unwrap());
            prop_assert_eq!(short::decode_next_event(&a[..n]), Some(answer));
            // Into a buffer with room for this one alone (not the longest).
            let mut c = [0u8; 64];
            prop_assert_eq!(short::encode_next_event(answer, &mut c[..n]), Some(n));
            prop_assert_eq!(&c[..n], &a[..n]);
            prop_assert!(short::encode_next_event(answer, &mut c[..n - 1]).is_none());
            let n = short::encode_event_reply(&e, &mut a).unwrap();
            let reply: Answer = Ok(AltReply::Event(e));
            prop_assert_eq!(&a[..n], postcard::to_slice(&reply, &mut b).unwrap());
            prop_assert_eq!(short::decode_event_reply(&a[..n]), Some(e));
            prop_assert_eq!(short::event_reply_id(&a[..n]), Some(e.id));
            prop_assert!(short::encode_next_event(answer, &mut a[..1]).is_none());
            prop_assert!(short::encode_event_reply(&e, &mut a[..n - 1]).is_none());
        }

        /// Whatever the short ways read from any bytes (valid encodings
        /// damaged or cut, and others), postcard reads the same.
        #[test]
        fn the_short_ways_read_only_what_postcard_reads_alike(
            answer in proptest::option::of((any::<u32>(), action())),
            e in event(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
            junk in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut a = [0u8; 64];
            let n = short::encode_next_event(answer, &mut a).unwrap();
            let mut bytes = a[..n].to_vec();
            let i = at.index(n);
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            for b in [&bytes[..], &junk[..]] {
                if let Some(answer) = short::decode_next_event(b) {
                    prop_assert_eq!(whole::<AltRequest>(b), Some(AltRequest::NextEvent { answer }));
                }
            }
            let n = short::encode_event_reply(&e, &mut a).unwrap();
            let mut bytes = a[..n].to_vec();
            let i = at.index(n);
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            if let Some(e) = short::decode_event_reply(&bytes) {
                prop_assert_eq!(whole::<Answer>(&bytes), Some(Ok(AltReply::Event(e))));
            }
            prop_assert_eq!(
                short::event_reply_id(&bytes),
                short::decode_event_reply(&bytes).map(|e| e.id)
            );
        }
    }

    proptest! {
        /// Every event survives its layout and postcard; bytes that read
        /// as an event are exactly that event's layout.
        #[test]
        fn an_event_is_its_fixed_layout(e in event(), bytes in proptest::collection::vec(any::<u8>(), 44..48)) {
            prop_assert_eq!(VmEvent::from_bytes(&e.to_bytes()), Some(e));
            let mut buf = [0u8; 64];
            let reply = AltReply::Event(e);
            let n = postcard::to_slice(&reply, &mut buf).unwrap().len();
            prop_assert!(n <= <AltReply as MaxSize>::POSTCARD_MAX_SIZE);
            prop_assert_eq!(postcard::from_bytes::<AltReply>(&buf[..n]).unwrap(), reply);
            if let Some(back) = VmEvent::from_bytes(&bytes) {
                prop_assert_eq!(&back.to_bytes()[..], &bytes[..]);
            }
            if let Ok(b) = <&[u8; VmEvent::BYTES]>::try_from(&bytes[..]) {
                prop_assert_eq!(VmEvent::valid_layout(b), VmEvent::from_bytes(b).is_some());
            }
        }
    }
}
