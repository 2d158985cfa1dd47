//! One control session: bytes from the host in, frames to the host out,
//! requests answered through the supervisor (protocol:
//! `ipc_schema::control`). Apart from the UART and the IPC, so that host
//! tests can drive it byte by byte.

use ipc_schema::altp2m::{AltReply, AltRequest};
use ipc_schema::control::{
    CONTROL, ControlError, ControlEvent, ControlReply, ControlRequest, FromHost, MAX_READ,
    MAX_SWAP, ToHost,
};
use ipc_schema::frame::{self, FrameError};
use ipc_schema::introspect::{Address, CHUNK, IntroError, IntroReply, IntroRequest};
use ipc_schema::logdirty::{LdReply, LdRequest};
use ipc_schema::sharing::{ShReply, ShRequest};
use ipc_schema::supervisor::{Name, SupervisorReply, SupervisorRequest};
use ipc_schema::uart::{UartInput, UartReply};

/// The protocol version the console answers `Hello` with.
pub const VERSION: u32 = 1;
/// The longest frame the console takes (its COBS form, without the zero).
pub const RX: usize = ipc_schema::control::MAX_WIRE_FRAME;

/// The services the console asks on the host's behalf: the supervisor,
/// the altp2m service for the external agent, and the logdirty service.
pub trait Supervisor {
    /// `None` when it cannot be reached.
    fn ask(&mut self, request: &SupervisorRequest) -> Option<SupervisorReply>;
    /// `None` when it cannot be reached (or the image has none).
    fn altp2m(&mut self, _request: &AltRequest) -> Option<AltReply> {
        None
    }
    /// `None` when it cannot be reached (or the console holds no
    /// `logdirty` handle).
    fn logdirty(&mut self, _request: &LdRequest) -> Option<LdReply> {
        None
    }
    /// `None` when it cannot be reached (or the console holds no
    /// `introspect` handle).
    fn introspect(&mut self, _request: &IntroRequest) -> Option<IntroReply> {
        None
    }
    /// `None` when it cannot be reached (or the console holds no
    /// `sharing` handle).
    fn sharing(&mut self, _request: &ShRequest) -> Option<ShReply> {
        None
    }
    /// Input for a domain's COM1, to the vmm: `None` when it cannot be
    /// reached (or the console holds no `uart-input` handle).
    fn uart_input(&mut self, _request: &UartInput) -> Option<UartReply> {
        None
    }
}

/// What the console itself should do after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The runner reads the debug port: send frames there
    /// ([`ControlRequest::UseDebugPort`]).
    UseDebugPort,
}

/// A swap being received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Incoming {
    name: Name,
    len: u32,
    received: u32,
}

pub struct Session {
    rx: heapless::Vec<u8, RX>,
    /// The frame being received outgrew `rx`: skip to the next zero.
    overflow: bool,
    hello: bool,
    swap: Option<Incoming>,
    /// Frames that failed their checksum or COBS, and their bytes.
    pub garbage: (u32, u32),
    /// The supervisor's number of the last event passed on.
    last_event: u32,
    /// The altp2m service's number of the last violation passed on.
    last_violation: u32,
}

/// [`ControlRequest::ReadMemory`]: the bytes as [`ToHost::Data`] frames,
/// in order; the reply for the end (`Done`, or what stopped the read).
fn read_memory(
    seq: u32,
    domain: u16,
    at: Address,
    len: u32,
    sup: &mut impl Supervisor,
    send: &mut impl FnMut(&ToHost),
) -> ControlReply {
    let refused = |e| ControlReply::Introspect(IntroReply::Refused(e));
    if len > MAX_READ {
        return refused(IntroError::BadLength);
    }
    let mut offset = 0u32;
    while offset < len {
        let n = (len - offset).min(CHUNK as u32) as u16;
        let Some(at) = at.offset(u64::from(offset)) else {
            return refused(IntroError::BadLength);
        };
        match sup.introspect(&IntroRequest::Read { domain, at, len: n }) {
            Some(IntroReply::Bytes(bytes)) if bytes.0.len() == usize::from(n) => {
                send(&ToHost::Data { seq, offset, bytes })
            }
            Some(IntroReply::Refused(e)) => {
                // A piece that runs past the end of RAM (or into a hole):
                // the bytes before where RAM stops go too, then the refusal.
                if let (Address::Physical(from), IntroError::OutsideRam { gpa }) = (at, e)
                    && gpa > from
                    && gpa - from < u64::from(n)
                    && let Some(IntroReply::Bytes(bytes)) = sup.introspect(&IntroRequest::Read {
                        domain,
                        at,
                        len: (gpa - from) as u16,
                    })
                    && bytes.0.len() as u64 == gpa - from
                {
                    send(&ToHost::Data { seq, offset, bytes });
                }
                return refused(e);
            }
            // Not an answer to a read: say what came, as a plain request would.
            Some(other) => return ControlReply::Introspect(other),
            None => return ControlReply::Error(ControlError::IntrospectUnavailable),
        }
        offset += u32::from(n);
    }
    ControlReply::Introspect(IntroReply::Done)
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub const fn new() -> Self {
        Self {
            rx: heapless::Vec::new(),
            overflow: false,
            hello: false,
            swap: None,
            garbage: (0, 0),
            last_event: u32::MAX,
            last_violation: u32::MAX,
        }
    }

    /// Whether the host has said hello (kept across a console swap).
    pub fn said_hello(&self) -> bool {
        self.hello
    }

    pub fn set_hello(&mut self, hello: bool) {
        self.hello = hello;
    }

    /// Passes the supervisor's new events on to the host (called when the
    /// supervisor signals that something happened).
    pub fn events(&mut self, sup: &mut impl Supervisor, send: &mut impl FnMut(&ToHost)) {
        loop {
            let Some(SupervisorReply::Events { events, next }) =
                sup.ask(&SupervisorRequest::Events {
                    after: self.last_event,
                })
            else {
                return;
            };
            for (seq, event) in events.0.iter().copied() {
                let missed = seq.wrapping_sub(self.last_event.wrapping_add(1));
                if missed != 0 && self.last_event != u32::MAX {
                    send(&ToHost::Event(ControlEvent::Missed { count: missed }));
                }
                send(&ToHost::Event(ControlEvent::Supervisor { seq, event }));
                self.last_event = seq;
            }
            if events.0.is_empty() || self.last_event.wrapping_add(1) == next {
                return;
            }
        }
    }

    /// Passes new violation events on to the host (called when the altp2m
    /// service signals one).
    pub fn violations(&mut self, sup: &mut impl Supervisor, send: &mut impl FnMut(&ToHost)) {
        loop {
            let Some(AltReply::Events { events, .. }) = sup.altp2m(&AltRequest::Events {
                after: self.last_violation,
            }) else {
                return;
            };
            if events.0.is_empty() {
                return;
            }
            for e in events.0.iter().copied() {
                send(&ToHost::Event(ControlEvent::Violation(e)));
                self.last_violation = e.id;
            }
        }
    }

    /// One byte from the host. `swap_buffer` is the memory shared with the
    /// supervisor for new ELFs; `send` gets each message for the host.
    pub fn byte(
        &mut self,
        b: u8,
        sup: &mut impl Supervisor,
        swap_buffer: &mut [u8],
        send: &mut impl FnMut(&ToHost),
    ) -> Action {
        if b != 0 {
            if self.rx.push(b).is_err() {
                self.overflow = true;
            }
            return Action::None;
        }
        if core::mem::take(&mut self.overflow) {
            self.rx.clear();
            defmt::warn!(
                "console: a frame longer than {=usize} bytes was dropped",
                RX
            );
            send(&ToHost::Reply {
                seq: 0,
                reply: ControlReply::Error(ControlError::TooLong),
            });
            return Action::None;
        }
        if self.rx.is_empty() {
            return Action::None;
        }
        let len = self.rx.len() as u32;
        let mut chunk = core::mem::take(&mut self.rx);
        match frame::decode::<FromHost>(&mut chunk[..]) {
            // The runner's, not a client's: never answered.
            Ok(FromHost {
                request: ControlRequest::UseDebugPort,
                ..
            }) => return Action::UseDebugPort,
            Ok(FromHost {
                seq,
                request: ControlRequest::ReadMemory { domain, at, len },
            }) if self.hello => {
                let reply = read_memory(seq, domain, at, len, sup, send);
                send(&ToHost::Reply { seq, reply });
            }
            Ok(m) => {
                let reply = self.answer(&m.request, sup, swap_buffer);
                send(&ToHost::Reply { seq: m.seq, reply });
            }
            Err(FrameError::Postcard) => {
                defmt::warn!(
                    "console: a frame of {=u32} bytes is not a control request",
                    len
                );
                send(&ToHost::Reply {
                    seq: 0,
                    reply: ControlReply::Error(ControlError::Malformed),
                });
            }
            Err(_) => {
                self.garbage.0 += 1;
                self.garbage.1 += len;
                send(&ToHost::Event(ControlEvent::Garbage { bytes: len }));
            }
        }
        Action::None
    }

    fn answer(
        &mut self,
        r: &ControlRequest,
        sup: &mut impl Supervisor,
        swap_buffer: &mut [u8],
    ) -> ControlReply {
        use ControlReply as R;
        if !self.hello && !matches!(r, ControlRequest::Hello { .. }) {
            return R::Error(ControlError::NotHello);
        }
        if let ControlRequest::Altp2m(q) = r {
            return match sup.altp2m(q) {
                Some(reply) => R::Altp2m(reply),
                None => R::Error(ControlError::Altp2mUnavailable),
            };
        }
        // Passed on as it is: the log is the console's under the host's
        // number (`log`), which the console does not change.
        if let ControlRequest::Logdirty(q) = r {
            return match sup.logdirty(q) {
                Some(reply) => R::Logdirty(reply),
                None => R::Error(ControlError::LogdirtyUnavailable),
            };
        }
        if let ControlRequest::Introspect(q) = r {
            return match sup.introspect(q) {
                Some(reply) => R::Introspect(reply),
                None => R::Error(ControlError::IntrospectUnavailable),
            };
        }
        if let ControlRequest::Share(q) = r {
            return match sup.sharing(q) {
                Some(reply) => R::Share(reply),
                None => R::Error(ControlError::SharingUnavailable),
            };
        }
        // The proxy's to take (it sees a client's connection end); the
        // console never does.
        if let ControlRequest::AtDetach { .. } = r {
            return R::Error(ControlError::ProxyOnly);
        }
        if let ControlRequest::ConsoleInput { domain, bytes } = r {
            let q = UartInput {
                domain: *domain,
                bytes: bytes.clone(),
            };
            return match sup.uart_input(&q) {
                Some(reply) => R::Uart(reply),
                None => R::Error(ControlError::VmmUnavailable),
            };
        }
        let mut ask = |q: SupervisorRequest| match sup.ask(&q) {
            Some(SupervisorReply::Service(s)) => R::Service(s),
            Some(SupervisorReply::Domain(d)) => R::Domain(d),
            Some(SupervisorReply::Done) => R::Done,
            Some(SupervisorReply::Swapped { generation }) => R::Swapped { generation },
            Some(SupervisorReply::Refused(why)) => R::Refused(why),
            // Not an answer to any of the requests below.
            Some(SupervisorReply::Shadow { gfn }) => R::Shadow { gfn },
            Some(SupervisorReply::Forked { id }) => R::Forked { id },
            Some(
                SupervisorReply::Events { .. }
                | SupervisorReply::Rights(_)
                | SupervisorReply::DmaBackend { .. },
            ) => R::Error(ControlError::SupervisorUnavailable),
            None => R::Error(ControlError::SupervisorUnavailable),
        };
        match *r {
            ControlRequest::Hello { key } => {
                let console = CONTROL.key.to_bytes();
                if key != console {
                    return R::Error(ControlError::WrongKey { console, host: key });
                }
                self.hello = true;
                R::Welcome { version: VERSION }
            }
            ControlRequest::Service { index } => ask(SupervisorRequest::Service { index }),
            ControlRequest::Domain { index } => ask(SupervisorRequest::Domain { index }),
            ControlRequest::DomainControl { id, op } => {
                ask(SupervisorRequest::DomainControl { id, op })
            }
            ControlRequest::InjectFault { name } => ask(SupervisorRequest::InjectFault { name }),
            ControlRequest::ShadowFrames { id, count } => {
                ask(SupervisorRequest::ShadowFrames { id, count })
            }
            ControlRequest::Fork { parent, name } => ask(SupervisorRequest::Fork { parent, name }),
            ControlRequest::Altp2m(_)
            | ControlRequest::Logdirty(_)
            | ControlRequest::Introspect(_)
            | ControlRequest::Share(_)
            | ControlRequest::ConsoleInput { .. }
            | ControlRequest::AtDetach { .. }
            | ControlRequest::ReadMemory { .. }
            | ControlRequest::UseDebugPort => {
                unreachable!("answered above")
            }
            ControlRequest::SwapBegin { name, len } => {
                let max = MAX_SWAP.min(swap_buffer.len() as u32);
                if len > max {
                    self.swap = None;
                    return R::Error(ControlError::SwapTooLarge { max });
                }
                self.swap = None;
                // Refused before any byte is sent: no such service, or this one.
                match ask(SupervisorRequest::SwapCheck { name }) {
                    R::Done => {
                        self.swap = Some(Incoming {
                            name,
                            len,
                            received: 0,
                        });
                        R::Done
                    }
                    other => other,
                }
            }
            ControlRequest::SwapChunk { offset, ref bytes } => {
                let Some(s) = self.swap.as_mut() else {
                    return R::Error(ControlError::SwapOutOfOrder { expected: 0 });
                };
                if offset != s.received {
                    return R::Error(ControlError::SwapOutOfOrder {
                        expected: s.received,
                    });
                }
                let end = offset as usize + bytes.0.len();
                if end > s.len as usize {
                    return R::Error(ControlError::SwapTooLarge { max: s.len });
                }
                swap_buffer[offset as usize..end].copy_from_slice(&bytes.0);
                s.received = end as u32;
                R::Done
            }
            ControlRequest::SwapCommit => match self.swap {
                Some(s) if s.received == s.len => {
                    self.swap = None;
                    ask(SupervisorRequest::Swap {
                        name: s.name,
                        len: s.len,
                    })
                }
                Some(s) => R::Error(ControlError::SwapOutOfOrder {
                    expected: s.received,
                }),
                None => R::Error(ControlError::SwapOutOfOrder { expected: 0 }),
            },
        }
    }
}
