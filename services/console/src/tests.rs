//! Host tests of a control session, byte by byte.

extern crate std;

use crate::session::{Action, RX, Session, Supervisor, VERSION};
use ipc_schema::altp2m::{AltReply, AltRequest, EVENTS_PER_REPLY, VmEvent};
use ipc_schema::control::{
    CONTROL, ControlError, ControlEvent, ControlReply, ControlRequest, FromHost, MAX_READ,
    SWAP_CHUNK, ToHost,
};
use ipc_schema::hypercall::{Reply, Request};
use ipc_schema::introspect::{Address, CHUNK, IntroError, IntroReply, IntroRequest};
use ipc_schema::ipc::BoundedVec;
use ipc_schema::logdirty::{DirtyMode, GfnRange, LdError, LdReply, LdRequest, Mechanism};
use ipc_schema::supervisor::{
    Refusal, SupervisorEvent, SupervisorReply, SupervisorRequest, name, name_str,
};
use ipc_schema::uart::{UartInput, UartReply};
use ipc_schema::vmexit::AccessBits;
use std::vec::Vec;

service_runtime::host_logger!();

#[derive(Default)]
struct Fake {
    asked: Vec<SupervisorRequest>,
    down: bool,
    /// What the altp2m service was asked; `None`: the image has none.
    altp2m: Option<Vec<AltRequest>>,
    /// Violation events the altp2m service holds.
    violations: Vec<VmEvent>,
    /// What the logdirty service was asked; `None`: unreachable.
    logdirty: Option<Vec<LdRequest>>,
    /// What the introspect service was asked; `None`: unreachable. Domain
    /// 1 has 64 KiB of RAM whose byte at `gpa` is `gpa as u8 ^ 0x5a`.
    introspect: Option<Vec<IntroRequest>>,
    /// Input passed to the vmm (`None`: no `uart-input` handle).
    uart: Option<Vec<UartInput>>,
}

const FAKE_RAM: u64 = 0x10000;

fn fake_byte(gpa: u64) -> u8 {
    gpa as u8 ^ 0x5a
}

impl Supervisor for Fake {
    fn ask(&mut self, r: &SupervisorRequest) -> Option<SupervisorReply> {
        self.asked.push(*r);
        if self.down {
            return None;
        }
        Some(match r {
            SupervisorRequest::SwapCheck { name } if name_str(name) == "nobody" => {
                SupervisorReply::Refused(Refusal::NoSuchService)
            }
            SupervisorRequest::Swap { .. } => SupervisorReply::Swapped { generation: 2 },
            SupervisorRequest::InjectFault { .. } => {
                SupervisorReply::Refused(Refusal::NoSuchService)
            }
            _ => SupervisorReply::Done,
        })
    }

    fn altp2m(&mut self, r: &AltRequest) -> Option<AltReply> {
        self.altp2m.as_mut()?.push(r.clone());
        Some(match *r {
            AltRequest::Events { after } => {
                let mut events = BoundedVec::new();
                for e in self
                    .violations
                    .iter()
                    .filter(|e| after == u32::MAX || e.id > after)
                    .take(EVENTS_PER_REPLY)
                {
                    events.0.push(*e).unwrap();
                }
                AltReply::Events { events, next: 0 }
            }
            AltRequest::External { .. } => AltReply::Reply(Reply::View(1)),
            _ => AltReply::Done,
        })
    }

    fn uart_input(&mut self, r: &UartInput) -> Option<UartReply> {
        self.uart.as_mut()?.push(r.clone());
        Some(match r.domain {
            1 => UartReply::Taken {
                count: r.bytes.0.len().min(2) as u16,
                waiting: 2,
            },
            _ => UartReply::NoSuchDomain,
        })
    }

    fn logdirty(&mut self, r: &LdRequest) -> Option<LdReply> {
        self.logdirty.as_mut()?.push(r.clone());
        Some(match *r {
            LdRequest::Start { domain: 1, .. } => LdReply::Started {
                mechanism: Mechanism::WriteProtect,
                range: GfnRange {
                    gfn: 0,
                    count: 4096,
                },
            },
            LdRequest::Read { domain: 1, .. } => {
                let mut ranges = BoundedVec::new();
                ranges
                    .0
                    .push(GfnRange {
                        gfn: 0x10,
                        count: 3,
                    })
                    .unwrap();
                LdReply::Dirty { ranges, next: None }
            }
            LdRequest::Stop { domain: 1, log: 7 } => LdReply::Error(LdError::NotLogging),
            _ => LdReply::Error(LdError::NoSuchDomain),
        })
    }

    fn introspect(&mut self, r: &IntroRequest) -> Option<IntroReply> {
        self.introspect.as_mut()?.push(r.clone());
        Some(Fake::introspect_answer(r))
    }
}

impl Fake {
    fn introspect_answer(r: &IntroRequest) -> IntroReply {
        match *r {
            IntroRequest::Read {
                domain: 1,
                at: Address::Physical(gpa),
                len,
            } => match gpa.checked_add(u64::from(len)) {
                Some(end) if end <= FAKE_RAM => {
                    let mut bytes = BoundedVec::new();
                    for a in gpa..end {
                        bytes.0.push(fake_byte(a)).unwrap();
                    }
                    IntroReply::Bytes(bytes)
                }
                _ => IntroReply::Refused(IntroError::OutsideRam { gpa: FAKE_RAM }),
            },
            _ => IntroReply::Refused(IntroError::NoSuchDomain),
        }
    }
}

struct Rig {
    s: Session,
    sup: Fake,
    buf: Vec<u8>,
    out: Vec<ToHost>,
}

impl Rig {
    fn new() -> Self {
        Self {
            s: Session::new(),
            sup: Fake::default(),
            buf: std::vec![0; 8192],
            out: Vec::new(),
        }
    }

    /// Feeds `bytes`; what the console itself was asked to do.
    fn bytes(&mut self, bytes: &[u8]) -> Vec<Action> {
        let out = &mut self.out;
        let mut actions = Vec::new();
        for &b in bytes {
            let a = self
                .s
                .byte(b, &mut self.sup, &mut self.buf, &mut |m: &ToHost| {
                    out.push(m.clone())
                });
            if a != Action::None {
                actions.push(a);
            }
        }
        actions
    }

    fn frame(seq: u32, request: ControlRequest) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        ipc_schema::frame::encode(&FromHost { seq, request }, &mut buf)
            .unwrap()
            .to_vec()
    }

    fn send(&mut self, seq: u32, request: ControlRequest) -> ControlReply {
        let f = Self::frame(seq, request);
        assert_eq!(self.bytes(&f), []);
        match self.out.pop() {
            Some(ToHost::Reply { seq: s, reply }) if s == seq => reply,
            other => panic!("no reply to #{seq}: {other:?}"),
        }
    }

    fn hello(&mut self) {
        assert_eq!(
            self.send(
                1,
                ControlRequest::Hello {
                    key: CONTROL.key.to_bytes()
                }
            ),
            ControlReply::Welcome { version: VERSION }
        );
    }
}

#[test]
fn requests_before_hello_are_refused_and_a_wrong_key_is_named() {
    let mut r = Rig::new();
    assert_eq!(
        r.send(5, ControlRequest::Service { index: 0 }),
        ControlReply::Error(ControlError::NotHello)
    );
    let host = [9; 8];
    assert_eq!(
        r.send(6, ControlRequest::Hello { key: host }),
        ControlReply::Error(ControlError::WrongKey {
            console: CONTROL.key.to_bytes(),
            host
        })
    );
    r.hello();
    assert_eq!(
        r.send(7, ControlRequest::Service { index: 0 }),
        ControlReply::Done
    );
    assert!(
        r.sup.asked.len() == 1,
        "only the request after hello reached the supervisor"
    );
}

/// `AtDetach` is the control proxy's: the console sees no connection end
/// and refuses it, asking nobody.
#[test]
fn a_watch_left_to_the_console_is_refused_as_the_proxys() {
    let mut r = Rig::new();
    r.hello();
    let watch = ipc_schema::control::Watch {
        domain: 1,
        view: Some(2),
    };
    for set in [true, false] {
        assert_eq!(
            r.send(8, ControlRequest::AtDetach { watch, set }),
            ControlReply::Error(ControlError::ProxyOnly)
        );
    }
    assert!(r.sup.asked.is_empty());
}

#[test]
fn garbage_malformed_and_oversized_frames_are_reported_and_the_session_goes_on() {
    let mut r = Rig::new();
    r.hello();
    r.bytes(b"line noise\x00");
    assert_eq!(
        r.out.pop(),
        Some(ToHost::Event(ControlEvent::Garbage { bytes: 10 }))
    );
    // A well-formed frame of the wrong type.
    let mut buf = [0u8; 64];
    let f = ipc_schema::frame::encode(&(1u8, 2u8, 3u8, 4u8, 5u8, 6u8, 7u8, 200u8), &mut buf)
        .unwrap()
        .to_vec();
    r.bytes(&f);
    assert_eq!(
        r.out.pop(),
        Some(ToHost::Reply {
            seq: 0,
            reply: ControlReply::Error(ControlError::Malformed)
        })
    );
    r.bytes(&std::vec![0x55; RX + 100]);
    r.bytes(&[0]);
    assert_eq!(
        r.out.pop(),
        Some(ToHost::Reply {
            seq: 0,
            reply: ControlReply::Error(ControlError::TooLong)
        })
    );
    assert_eq!(
        r.send(9, ControlRequest::Domain { index: 1 }),
        ControlReply::Done
    );
    assert_eq!(r.s.garbage, (1, 10));
}

fn chunk(offset: u32, bytes: &[u8]) -> ControlRequest {
    ControlRequest::SwapChunk {
        offset,
        bytes: BoundedVec(heapless::Vec::from_slice(bytes).unwrap()),
    }
}

#[test]
fn a_swap_arrives_in_order_into_the_buffer_and_is_committed_once() {
    let mut r = Rig::new();
    r.hello();
    let elf: Vec<u8> = (0..1300u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        r.send(
            2,
            ControlRequest::SwapBegin {
                name: name("vmm"),
                len: elf.len() as u32
            }
        ),
        ControlReply::Done
    );
    for (i, c) in elf.chunks(SWAP_CHUNK).enumerate() {
        assert_eq!(
            r.send(3 + i as u32, chunk((i * SWAP_CHUNK) as u32, c)),
            ControlReply::Done
        );
    }
    assert_eq!(
        r.send(10, ControlRequest::SwapCommit),
        ControlReply::Swapped { generation: 2 }
    );
    assert_eq!(&r.buf[..elf.len()], &elf[..]);
    assert_eq!(
        r.sup.asked,
        [
            SupervisorRequest::SwapCheck { name: name("vmm") },
            SupervisorRequest::Swap {
                name: name("vmm"),
                len: 1300
            }
        ]
    );
    assert_eq!(
        r.send(11, ControlRequest::SwapCommit),
        ControlReply::Error(ControlError::SwapOutOfOrder { expected: 0 })
    );
}

#[test]
fn swaps_out_of_order_too_large_or_incomplete_are_refused() {
    let mut r = Rig::new();
    r.hello();
    assert_eq!(
        r.send(
            2,
            ControlRequest::SwapBegin {
                name: name("vmm"),
                len: 9000
            }
        ),
        ControlReply::Error(ControlError::SwapTooLarge { max: 8192 })
    );
    assert_eq!(
        r.send(3, chunk(0, b"x")),
        ControlReply::Error(ControlError::SwapOutOfOrder { expected: 0 })
    );
    assert_eq!(
        r.send(
            4,
            ControlRequest::SwapBegin {
                name: name("vmm"),
                len: 10
            }
        ),
        ControlReply::Done
    );
    assert_eq!(
        r.send(5, chunk(4, b"abcd")),
        ControlReply::Error(ControlError::SwapOutOfOrder { expected: 0 })
    );
    assert_eq!(r.send(6, chunk(0, b"abcdefgh")), ControlReply::Done);
    assert_eq!(
        r.send(7, chunk(8, b"abcd")),
        ControlReply::Error(ControlError::SwapTooLarge { max: 10 })
    );
    assert_eq!(
        r.send(8, ControlRequest::SwapCommit),
        ControlReply::Error(ControlError::SwapOutOfOrder { expected: 8 })
    );
    assert!(
        r.sup
            .asked
            .iter()
            .all(|q| matches!(q, SupervisorRequest::SwapCheck { .. })),
        "no swap was asked for"
    );
    // A service that does not exist is refused before any byte is sent.
    assert_eq!(
        r.send(
            9,
            ControlRequest::SwapBegin {
                name: name("nobody"),
                len: 10
            }
        ),
        ControlReply::Refused(Refusal::NoSuchService)
    );
    assert_eq!(
        r.send(10, chunk(0, b"x")),
        ControlReply::Error(ControlError::SwapOutOfOrder { expected: 0 })
    );
}

#[test]
fn refusals_and_an_unreachable_supervisor_reach_the_host() {
    let mut r = Rig::new();
    r.hello();
    assert_eq!(
        r.send(
            2,
            ControlRequest::InjectFault {
                name: name("nobody")
            }
        ),
        ControlReply::Refused(Refusal::NoSuchService)
    );
    r.sup.down = true;
    assert_eq!(
        r.send(3, ControlRequest::Service { index: 0 }),
        ControlReply::Error(ControlError::SupervisorUnavailable)
    );
}

/// A supervisor holding events 5, 6 and 9 (7 and 8 were dropped).
struct WithEvents;

impl Supervisor for WithEvents {
    fn ask(&mut self, r: &SupervisorRequest) -> Option<SupervisorReply> {
        let SupervisorRequest::Events { after } = *r else {
            return None;
        };
        let all = [5u32, 6, 9];
        let mut events = BoundedVec::new();
        for seq in all
            .iter()
            .filter(|&&s| after == u32::MAX || s > after)
            .take(2)
        {
            let _ = events.0.push((
                *seq,
                SupervisorEvent::TaskEnded {
                    name: name("t"),
                    code: *seq,
                },
            ));
        }
        Some(SupervisorReply::Events { events, next: 10 })
    }
}

#[test]
fn supervisor_events_reach_the_host_in_order_and_gaps_are_reported() {
    let mut s = Session::new();
    let mut out = Vec::new();
    s.events(&mut WithEvents, &mut |m: &ToHost| out.push(m.clone()));
    let seqs: Vec<std::string::String> = out
        .iter()
        .map(|m| match m {
            ToHost::Event(ControlEvent::Supervisor { seq, .. }) => std::format!("{seq}"),
            ToHost::Event(ControlEvent::Missed { count }) => std::format!("missed {count}"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, ["5", "6", "missed 2", "9"]);
    out.clear();
    s.events(&mut WithEvents, &mut |m: &ToHost| out.push(m.clone()));
    assert!(out.is_empty(), "nothing new: {out:?}");
}

#[test]
fn altp2m_requests_are_forwarded_and_violations_reach_the_host() {
    let mut r = Rig::new();
    r.hello();
    // No altp2m service in the image: said so.
    let q = AltRequest::External {
        domain: 1,
        request: Request::ViewCreate {
            default_access: None,
        },
    };
    assert_eq!(
        r.send(2, ControlRequest::Altp2m(q.clone())),
        ControlReply::Error(ControlError::Altp2mUnavailable)
    );
    r.sup.altp2m = Some(Vec::new());
    assert_eq!(
        r.send(3, ControlRequest::Altp2m(q.clone())),
        ControlReply::Altp2m(AltReply::Reply(Reply::View(1)))
    );
    assert_eq!(r.sup.altp2m.as_deref(), Some(&[q][..]));
    // Five waiting events come out in order, in pages of EVENTS_PER_REPLY.
    let event = |id: u32| VmEvent {
        id,
        domain: 1,
        vcpu: 0,
        view: 1,
        gpa: 0x5000 + u64::from(id),
        gla: Some(0x5000),
        access: AccessBits {
            read: false,
            write: true,
            execute: false,
        },
        allowed: AccessBits {
            read: true,
            write: false,
            execute: true,
        },
        rip: 0x1000,
        internal: false,
        paused: true,
        qualification: 0x181,
    };
    r.sup.violations = (0..5).map(event).collect();
    let out = &mut r.out;
    r.s.violations(&mut r.sup, &mut |m: &ToHost| out.push(m.clone()));
    let ids: Vec<u32> = r
        .out
        .iter()
        .filter_map(|m| match m {
            ToHost::Event(ControlEvent::Violation(e)) => Some(e.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    // Told again: nothing new is sent twice.
    r.out.clear();
    r.sup.violations.push(event(5));
    let out = &mut r.out;
    r.s.violations(&mut r.sup, &mut |m: &ToHost| out.push(m.clone()));
    assert_eq!(r.out, [ToHost::Event(ControlEvent::Violation(event(5)))]);
}

#[test]
fn logdirty_requests_are_passed_on_unchanged_and_an_unreachable_service_is_named() {
    let mut r = Rig::new();
    r.hello();
    let start = LdRequest::Start {
        domain: 1,
        log: 0xdead_beef,
        range: None,
        mode: DirtyMode::Auto,
    };
    // No logdirty handle (or the service is down): said so, by name.
    assert_eq!(
        r.send(2, ControlRequest::Logdirty(start.clone())),
        ControlReply::Error(ControlError::LogdirtyUnavailable)
    );
    r.sup.logdirty = Some(Vec::new());
    assert_eq!(
        r.send(3, ControlRequest::Logdirty(start.clone())),
        ControlReply::Logdirty(LdReply::Started {
            mechanism: Mechanism::WriteProtect,
            range: GfnRange {
                gfn: 0,
                count: 4096
            }
        })
    );
    let read = LdRequest::Read {
        domain: 1,
        log: 0xdead_beef,
        from: 0x10,
        clear: true,
    };
    let ControlReply::Logdirty(LdReply::Dirty { ranges, next: None }) =
        r.send(4, ControlRequest::Logdirty(read.clone()))
    else {
        panic!("a read is answered with the dirty ranges");
    };
    assert_eq!(ranges.0.len(), 1);
    // The service's refusals reach the host as they are.
    let stop = LdRequest::Stop { domain: 1, log: 7 };
    assert_eq!(
        r.send(5, ControlRequest::Logdirty(stop.clone())),
        ControlReply::Logdirty(LdReply::Error(LdError::NotLogging))
    );
    // The host's log numbers went through unchanged, and nothing went to
    // the supervisor.
    assert_eq!(r.sup.logdirty.as_deref(), Some(&[start, read, stop][..]));
    assert!(r.sup.asked.is_empty(), "{:?}", r.sup.asked);
}

#[test]
fn console_input_goes_to_the_vmm_and_its_answer_back() {
    let mut r = Rig::new();
    r.hello();
    let mut bytes = BoundedVec::new();
    bytes.0.extend_from_slice(b"abc").unwrap();
    let input = |domain| ControlRequest::ConsoleInput {
        domain,
        bytes: bytes.clone(),
    };
    // No `uart-input` handle (or the vmm is down): said so.
    assert_eq!(
        r.send(2, input(1)),
        ControlReply::Error(ControlError::VmmUnavailable)
    );
    r.sup.uart = Some(Vec::new());
    assert_eq!(
        r.send(3, input(1)),
        ControlReply::Uart(UartReply::Taken {
            count: 2,
            waiting: 2
        }),
        "the vmm's answer as it is: fewer taken than sent"
    );
    assert_eq!(
        r.send(4, input(5)),
        ControlReply::Uart(UartReply::NoSuchDomain)
    );
    let passed = r.sup.uart.as_deref().unwrap();
    assert_eq!(passed.len(), 2);
    assert_eq!((passed[1].domain, &passed[1].bytes.0[..]), (5, &b"abc"[..]));
    assert!(r.sup.asked.is_empty(), "nothing went to the supervisor");
}

#[test]
fn logdirty_requests_before_hello_are_refused() {
    let mut r = Rig::new();
    r.sup.logdirty = Some(Vec::new());
    assert_eq!(
        r.send(
            1,
            ControlRequest::Logdirty(LdRequest::Status { domain: 1, log: 0 })
        ),
        ControlReply::Error(ControlError::NotHello)
    );
    assert_eq!(r.sup.logdirty.as_deref(), Some(&[][..]));
}

/// The data frames of request `seq` in `out`, checked to come in order and
/// back to back, joined.
fn streamed(out: &[ToHost], seq: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    for m in out {
        if let ToHost::Data {
            seq: s,
            offset,
            bytes: b,
        } = m
        {
            assert_eq!(*s, seq);
            assert_eq!(*offset as usize, bytes.len(), "in order, no gaps");
            assert!(b.0.len() <= CHUNK);
            bytes.extend_from_slice(&b.0);
        }
    }
    bytes
}

#[test]
fn a_memory_read_is_streamed_in_chunks_then_answered() {
    let mut r = Rig::new();
    r.sup.introspect = Some(Vec::new());
    r.hello();
    let request = ControlRequest::ReadMemory {
        domain: 1,
        at: Address::Physical(0x100),
        len: 1000,
    };
    assert_eq!(
        r.send(9, request),
        ControlReply::Introspect(IntroReply::Done)
    );
    let got = streamed(&r.out, 9);
    let want: Vec<u8> = (0x100..0x100 + 1000).map(fake_byte).collect();
    assert_eq!(got, want);
    // Six requests of at most CHUNK bytes, one after the other.
    let asked = r.sup.introspect.as_deref().unwrap();
    assert_eq!(asked.len(), 1000usize.div_ceil(CHUNK));
    assert!(matches!(
        asked[5],
        IntroRequest::Read {
            at: Address::Physical(0x4c0),
            len: 40,
            ..
        }
    ));
}

#[test]
fn a_memory_read_stops_at_the_first_refusal_after_the_bytes_before_it() {
    let mut r = Rig::new();
    r.sup.introspect = Some(Vec::new());
    r.hello();
    let start = FAKE_RAM - 500;
    let reply = r.send(
        3,
        ControlRequest::ReadMemory {
            domain: 1,
            at: Address::Physical(start),
            len: 4096,
        },
    );
    assert_eq!(
        reply,
        ControlReply::Introspect(IntroReply::Refused(IntroError::OutsideRam {
            gpa: FAKE_RAM
        }))
    );
    // Two whole chunks made it; the third ran past the end and stopped
    // it, after the bytes of it before the end (read again, on their own):
    // every byte up to the end of RAM.
    let got = streamed(&r.out, 3);
    let want: Vec<u8> = (start..FAKE_RAM).map(fake_byte).collect();
    assert_eq!(got, want);
    assert_eq!(r.sup.introspect.as_deref().unwrap().len(), 4);
}

#[test]
fn bad_memory_reads_are_refused_before_any_byte() {
    let mut r = Rig::new();
    r.sup.introspect = Some(Vec::new());
    // Before hello, like every other request.
    let read = |len| ControlRequest::ReadMemory {
        domain: 1,
        at: Address::Physical(0),
        len,
    };
    assert_eq!(
        r.send(1, read(16)),
        ControlReply::Error(ControlError::NotHello)
    );
    r.hello();
    assert_eq!(
        r.send(2, read(MAX_READ + 1)),
        ControlReply::Introspect(IntroReply::Refused(IntroError::BadLength))
    );
    // A span that wraps the address space stops where it would wrap.
    let wraps = ControlRequest::ReadMemory {
        domain: 1,
        at: Address::Physical(u64::MAX - 100),
        len: 400,
    };
    assert!(matches!(
        r.send(3, wraps),
        ControlReply::Introspect(IntroReply::Refused(_))
    ));
    assert_eq!(streamed(&r.out, 0), []);
    // A zero-length read is simply done.
    assert_eq!(
        r.send(4, read(0)),
        ControlReply::Introspect(IntroReply::Done)
    );
    // No introspect service: said so.
    r.sup.introspect = None;
    assert_eq!(
        r.send(5, read(8)),
        ControlReply::Error(ControlError::IntrospectUnavailable)
    );
}

#[test]
fn the_runners_debug_port_request_is_acted_on_and_never_answered() {
    let mut r = Rig::new();
    // Before hello too: the runner sends it as a client attaches.
    let f = Rig::frame(0, ControlRequest::UseDebugPort);
    assert_eq!(r.bytes(&f), [Action::UseDebugPort]);
    assert!(r.out.is_empty(), "{:?}", r.out);
    assert!(!r.s.said_hello());
    r.hello();
    assert_eq!(r.bytes(&f), [Action::UseDebugPort]);
    assert!(r.out.is_empty(), "{:?}", r.out);
}
