//! The control channel: the host (`cargo hv ctl`, or any program linking the
//! client library) talking to a running Parallax through the console
//! service, on the second serial port.
//!
//! Frames use the log wire's encoding (COBS of postcard plus CRC-16, ended by
//! a zero byte; see `wire`), so garbage or a cut-off frame costs only itself.
//! The host sends [`FromHost`] frames, each with a sequence number; the
//! console answers each with a [`ToHost::Reply`] carrying the same number,
//! and may send [`ToHost::Event`]s at any time. The first request must be
//! `Hello` with the host's key of this protocol.

use crate::altp2m::{AltReply, AltRequest, VmEvent};
use crate::introspect::{Address, CHUNK, IntroReply, IntroRequest};
use crate::ipc::{BoundedVec, InterfaceId};
use crate::logdirty::{LdReply, LdRequest};
use crate::sharing::{ShReply, ShRequest};
use crate::supervisor::{DomainInfo, Name, Refusal, ServiceInfo, SupervisorEvent};
use crate::syscall::DomainOp;
use crate::uart::{INPUT_CHUNK, UartReply};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// Bytes of ELF per swap chunk.
pub const SWAP_CHUNK: usize = 512;
/// The largest ELF a swap may carry (the swap buffer's size).
pub const MAX_SWAP: u32 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub struct FromHost {
    pub seq: u32,
    pub request: ControlRequest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum ControlRequest {
    /// The first request: the host's key of this protocol.
    Hello {
        key: [u8; 8],
    },
    Service {
        index: u16,
    },
    Domain {
        index: u16,
    },
    DomainControl {
        id: u16,
        op: DomainOp,
    },
    /// Start sending a new ELF for service `name`.
    SwapBegin {
        name: Name,
        len: u32,
    },
    SwapChunk {
        offset: u32,
        bytes: BoundedVec<u8, SWAP_CHUNK>,
    },
    /// All bytes sent: carry out the swap.
    SwapCommit,
    InjectFault {
        name: Name,
    },
    /// A request to the altp2m service, as an external agent (views,
    /// access, modes, listening to violations and answering them).
    Altp2m(AltRequest),
    /// A request to the logdirty service (docs/logdirty.md), passed on as
    /// it is: the log is the console's (the caller the service sees) under
    /// the host's `log` number, so host tools share the numbers among
    /// themselves.
    Logdirty(LdRequest),
    /// A request to the introspect service (guest memory and registers,
    /// docs/introspection.md), passed on as it is.
    Introspect(IntroRequest),
    /// A request to the sharing service (page sharing, docs/sharing.md),
    /// passed on as it is.
    Share(ShRequest),
    /// Shadow pages for domain `id` (the supervisor's
    /// `SupervisorRequest::ShadowFrames`): [`ControlReply::Shadow`].
    ShadowFrames {
        id: u16,
        count: u16,
    },
    /// VM fork of paused domain `parent` (`SupervisorRequest::Fork`):
    /// [`ControlReply::Forked`].
    Fork {
        parent: u16,
        name: crate::supervisor::Name,
    },
    /// `len` bytes (at most [`MAX_READ`]) of domain `domain`'s memory from
    /// `at`, read by the console through the introspect service in
    /// [`CHUNK`]-byte requests and streamed: [`ToHost::Data`] frames in
    /// order, then the reply, [`ControlReply::Introspect`] with
    /// `IntroReply::Done`, or the refusal that stopped the read (after the
    /// bytes before it).
    ReadMemory {
        domain: u16,
        at: Address,
        len: u32,
    },
    /// Sent by the runner, not by clients: the runner reads this machine's
    /// debug port (I/O port 0xE9: Bochs's `port_e9_hack`, QEMU's
    /// `isa-debugcon`), so the console sends its frames there from now on
    /// instead of on COM2 (115200 baud), if the port reads back 0xE9.
    /// Never answered.
    UseDebugPort,
    /// Bytes for domain `domain`'s COM1 receiver (`cargo hv ctl console`):
    /// passed to the vmm, answered `Uart(..)` with how many it took (a full
    /// receive FIFO takes fewer: send the rest again), or
    /// `Error(VmmUnavailable)`.
    ConsoleInput {
        domain: u16,
        bytes: BoundedVec<u8, INPUT_CHUNK>,
    },
    /// For the control proxy (`cargo hv run`'s socket), not the console,
    /// which answers `Error(ProxyOnly)`: `watch` is what this client set up
    /// on a domain (a listen, perhaps through a view of its own), which the
    /// proxy undoes for it if its connection ends before it says the same
    /// with `set: false` (docs/control.md, Attaching: what a client leaves
    /// behind). With a view: the domain put back in view 0, the view's
    /// events still waiting answered `SwitchView(0)`, the listen ended, the
    /// view destroyed. Without: the listen ended (the events waiting for it
    /// retried: the domain's no-listener policy applies, as when the client
    /// ends the listen itself). One client's watch of a domain at a time:
    /// another client's is refused `WatchedByAnotherClient`.
    AtDetach {
        watch: Watch,
        set: bool,
    },
}

/// What a client watches (`ControlRequest::AtDetach`): the domain it
/// listens to and, for a page watch, the view of its own it put the domain
/// in (`None` for a listener alone: a VMI agent's, whose views are meant
/// to outlast it).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct Watch {
    pub domain: u16,
    pub view: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum ToHost {
    Reply {
        seq: u32,
        reply: ControlReply,
    },
    Event(ControlEvent),
    /// Bytes `offset..` of the answer to request `seq` (a
    /// [`ControlRequest::ReadMemory`]), before its reply.
    Data {
        seq: u32,
        offset: u32,
        bytes: BoundedVec<u8, CHUNK>,
    },
}

/// The most bytes one [`ControlRequest::ReadMemory`] reads. The console
/// serves nothing else meanwhile, and goes on with a read whose client has
/// gone (it cannot tell): so a request is kept to about 0.35 s of an idle
/// Bochs, a second or so with guests busy beside it (the client asks again
/// for the next part, a round trip of a few milliseconds), and a client
/// killed in the middle of a long read holds the next one no longer (16
/// MiB, as it was, held it for minutes with two guests busy, far past its
/// timeout).
pub const MAX_READ: u32 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum ControlReply {
    Welcome {
        version: u32,
    },
    Service(Option<ServiceInfo>),
    Domain(Option<DomainInfo>),
    Done,
    Swapped {
        generation: u32,
    },
    Refused(Refusal),
    Error(ControlError),
    /// The altp2m service's answer to [`ControlRequest::Altp2m`].
    Altp2m(AltReply),
    /// The logdirty service's answer to [`ControlRequest::Logdirty`].
    Logdirty(LdReply),
    /// The introspect service's answer to [`ControlRequest::Introspect`].
    Introspect(IntroReply),
    /// The sharing service's answer to [`ControlRequest::Share`].
    Share(ShReply),
    /// The first gfn of the shadow pages given.
    Shadow {
        gfn: u64,
    },
    /// The fork's domain id.
    Forked {
        id: u16,
    },
    /// The vmm's answer to `ConsoleInput`.
    Uart(UartReply),
}

/// What was wrong with a request, at the protocol level.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ControlError {
    /// The frame did not decode (its sequence number is unknown: 0).
    Malformed,
    /// A frame longer than the console accepts.
    TooLong,
    /// The first request was not `Hello`.
    NotHello,
    /// `Hello` with another key of this protocol (both named).
    WrongKey { console: [u8; 8], host: [u8; 8] },
    /// A swap chunk out of order, or a commit before every byte came.
    SwapOutOfOrder { expected: u32 },
    /// A swap larger than the swap buffer.
    SwapTooLarge { max: u32 },
    /// The supervisor did not answer.
    SupervisorUnavailable,
    /// The altp2m service did not answer (or this image has none).
    Altp2mUnavailable,
    /// The logdirty service did not answer (or this image has none, or
    /// the console holds no `logdirty` handle).
    LogdirtyUnavailable,
    /// The introspect service did not answer (or the console holds no
    /// `introspect` handle).
    IntrospectUnavailable,
    /// The sharing service did not answer (or the console holds no
    /// `sharing` handle).
    SharingUnavailable,
    /// `ConsoleInput`, but the console holds no `uart-input` handle or the
    /// vmm did not answer.
    VmmUnavailable,
    /// A swap request while another client of the same control proxy is
    /// sending its swap (said by the proxy, not the console: the console
    /// receives one swap at a time).
    SwapByAnotherClient,
    /// `AtDetach` sent to the console itself, not through a control proxy
    /// (nobody would see the client's connection end).
    ProxyOnly,
    /// `AtDetach` for a domain another client of the same control proxy
    /// watches (said by the proxy).
    WatchedByAnotherClient { domain: u16 },
    /// `AtDetach` beyond the most watches one client may leave to the
    /// proxy (said by the proxy).
    TooManyWatches { max: u16 },
}

/// Something that happened, told to the host unasked.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub enum ControlEvent {
    /// Frames that did not decode were dropped.
    Garbage { bytes: u32 },
    /// Something happened to a service or a domain (the supervisor's
    /// sequence number, then the event).
    Supervisor { seq: u32, event: SupervisorEvent },
    /// Events were lost before the console could pass them on.
    Missed { count: u32 },
    /// An EPT violation waiting for this host's answer (it listens to the
    /// domain: `AltRequest::Listen`); answer with `AltRequest::Answer`.
    Violation(VmEvent),
}

/// The control protocol's key (checked by `Hello`).
pub const CONTROL: InterfaceId = InterfaceId::new::<(FromHost, ToHost)>("parallax/control");

/// The longest encoded frame on the control channel, terminator included.
pub const MAX_FRAME: usize = <FromHost as MaxSize>::POSTCARD_MAX_SIZE + 2 + 8;

/// The longest frame the console takes from the host (its COBS form,
/// without the zero); a longer one is refused (`ControlError::TooLong`).
pub const MAX_WIRE_FRAME: usize = MAX_FRAME + MAX_FRAME / 254 + 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use proptest::prelude::*;

    #[test]
    fn a_full_swap_chunk_fits_a_frame() {
        let chunk = FromHost {
            seq: u32::MAX,
            request: ControlRequest::SwapChunk {
                offset: u32::MAX,
                bytes: BoundedVec(heapless::Vec::from_slice(&[0xff; SWAP_CHUNK]).unwrap()),
            },
        };
        let mut buf = [0u8; MAX_FRAME * 2];
        let wire = frame::encode(&chunk, &mut buf).unwrap();
        assert!(
            wire.len() <= MAX_FRAME + MAX_FRAME / 254 + 1,
            "{} bytes",
            wire.len()
        );
        let mut chunk_bytes = wire[..wire.len() - 1].to_vec();
        assert_eq!(frame::decode::<FromHost>(&mut chunk_bytes).unwrap(), chunk);
    }

    #[test]
    fn a_full_logdirty_reply_fits_the_consoles_frame_buffer() {
        use crate::logdirty::{GfnRange, LdReply, RANGES_PER_REPLY};
        let range = GfnRange {
            gfn: u64::MAX,
            count: u64::MAX,
        };
        let m = ToHost::Reply {
            seq: u32::MAX,
            reply: ControlReply::Logdirty(LdReply::Dirty {
                ranges: BoundedVec(heapless::Vec::from_slice(&[range; RANGES_PER_REPLY]).unwrap()),
                next: Some(u64::MAX),
            }),
        };
        // The console encodes each message into 2 * MAX_FRAME bytes.
        let mut buf = [0u8; MAX_FRAME * 2];
        let wire = frame::encode(&m, &mut buf).unwrap();
        let mut bytes = wire[..wire.len() - 1].to_vec();
        assert_eq!(frame::decode::<ToHost>(&mut bytes).unwrap(), m);
    }

    proptest! {
        #[test]
        fn garbage_never_panics_the_decoders(mut bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let mut other = bytes.clone();
            let _ = frame::decode::<FromHost>(&mut bytes);
            let _ = frame::decode::<ToHost>(&mut other);
        }
    }
}
