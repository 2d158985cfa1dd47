//! The control client against a mock console (`common/`): requests and
//! replies, events, timeouts, swaps, altp2m, errors. No emulator, no
//! hypervisor. (image-builder's tests run the same client through the proxy
//! `cargo hv run` serves, with this mock console behind it.)

mod common;

use common::{Console, domain, event, fake_elf, reply, scratch, serve};
use parallax_client::frames::FrameReader;
use parallax_client::{
    self as control, CONTROL, Client, ClientError, ControlError, ControlEvent, ControlReply,
    ControlRequest, DomainOp, FromHost, MAX_SWAP, Refusal, SWAP_CHUNK,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("a socket pair")
}

/// A client talking to the standard mock console.
fn standard() -> (
    Client<UnixStream>,
    std::thread::JoinHandle<common::Received>,
) {
    let (host, console) = pair();
    let mock = Console::default().serve(console);
    (Client::new(host), mock)
}

#[test]
fn hello_is_welcomed_with_the_version() {
    let (host, console) = pair();
    let mock = Console {
        version: 7,
        ..Console::default()
    }
    .serve(console);
    let mut c = Client::new(host).with_first_seq(100);
    assert_eq!(c.hello().unwrap(), 7);
    assert_eq!(c.version(), Some(7));
    drop(c);
    let got = mock.join().unwrap();
    assert_eq!(got.requests.len(), 1);
    assert_eq!(got.requests[0].seq, 100);
    assert_eq!(
        got.requests[0].request,
        ControlRequest::Hello {
            key: CONTROL.key.to_bytes()
        }
    );
}

#[test]
fn a_console_of_another_protocol_version_is_named_with_both_keys() {
    let (host, console) = pair();
    let _mock = Console {
        key: [0x5a; 8],
        ..Console::default()
    }
    .serve(console);
    let e = Client::new(host).hello().unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            e,
            ClientError::Console {
                error: ControlError::WrongKey { .. },
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("console key 5a5a5a5a5a5a5a5a"), "{text}");
    assert!(
        text.contains(&control::key_hex(&CONTROL.key.to_bytes())),
        "{text}"
    );
}

#[test]
fn the_first_request_says_hello_by_itself() {
    let (mut c, mock) = standard();
    assert_eq!(c.domains().unwrap().len(), 2);
    drop(c);
    let got = mock.join().unwrap();
    assert!(matches!(
        got.requests[0].request,
        ControlRequest::Hello { .. }
    ));
}

#[test]
fn services_are_paged_until_none() {
    let (mut c, mock) = standard();
    let services = c.services().unwrap();
    assert_eq!(services, Console::default().services);
    drop(c);
    let got = mock.join().unwrap();
    let asked = got.pick(|r| match *r {
        ControlRequest::Service { index } => Some(index),
        _ => None,
    });
    assert_eq!(asked, [0, 1, 2, 3], "asked until the console said None");
    // Sequence numbers increase by one.
    for w in got.requests.windows(2) {
        assert_eq!(w[1].seq, w[0].seq.wrapping_add(1));
    }
    let table = control::services_table(&services);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[3].contains("vmm")
            && lines[3].contains("faulted")
            && lines[3].contains("abababababababab"),
        "{table}"
    );
}

#[test]
fn a_paused_domain_is_forked_named_listed_and_reset() {
    let (mut c, _mock) = standard();
    // A running parent is refused, naming the kernel's reason.
    let e = c.fork(1, "").unwrap_err();
    assert!(e.to_string().contains("Fork 1"), "{e}");
    assert!(
        matches!(
            e,
            ClientError::Refused {
                refusal: Refusal::Kernel { .. },
                ..
            }
        ),
        "{e}"
    );
    c.domain_control(1, DomainOp::Pause).unwrap();
    let child = c.fork(1, "").unwrap();
    assert_eq!(child, 3);
    assert_eq!(c.domain_id("hello-fork").unwrap(), 3);
    assert_eq!(c.fork(1, "kid").unwrap(), 4);
    assert_eq!(c.domain_id("kid").unwrap(), 4);
    // A name names one domain: given again, refused naming its holder;
    // by default, the next free one.
    let e = c.fork(1, "kid").unwrap_err().to_string();
    assert!(e.contains("domain 4 has that name already"), "{e}");
    let e = c.fork(1, "cpuid").unwrap_err().to_string();
    assert!(e.contains("domain 2 has that name already"), "{e}");
    let again = c.fork(1, "").unwrap();
    assert_eq!(c.domain_id("hello-fork2").unwrap(), again);
    c.domain_control(again, DomainOp::Destroy).unwrap();
    c.domain_control(4, DomainOp::Unpause).unwrap();
    c.domain_control(4, DomainOp::Reset).unwrap();
    assert_eq!(c.domain(3).unwrap().unwrap().state, 2, "reset: paused");
    // A name the protocol cannot carry is refused before anything is sent.
    let e = c
        .fork(1, "a-name-far-far-too-long-for-any-domain-at-all")
        .unwrap_err();
    assert!(e.to_string().contains("not a domain name"), "{e}");
    assert!(c.fork(9, "").is_err());
}

#[test]
fn console_input_is_sent_again_until_a_full_fifo_takes_it_all() {
    let (host, console) = pair();
    let mock = Console::default().serve(console);
    let mut c = Client::new(host).with_timeout(Duration::from_secs(2));
    let typed: Vec<u8> = (b'a'..=b'z').collect();
    // 26 bytes through an 8-byte FIFO that the guest reads 3 at a time.
    c.console_input(1, &typed).unwrap();
    let (taken, waiting) = c.console_input_once(1, b"").unwrap();
    assert_eq!(taken, 0);
    assert!(waiting <= common::MOCK_FIFO);
    let e = c.console_input(7, b"x").unwrap_err();
    assert!(
        e.to_string().contains("domain 7 has no COM1 to type into"),
        "{e}"
    );
    drop(c);
    let sent = mock.join().unwrap().pick(|r| match r {
        ControlRequest::ConsoleInput { domain: 1, bytes } if !bytes.0.is_empty() => {
            Some(bytes.0.to_vec())
        }
        _ => None,
    });
    assert!(
        sent.len() > 3,
        "what the FIFO did not take was sent again: {sent:?}"
    );
    assert_eq!(sent[0], typed, "the first request carries everything");
    for s in &sent {
        assert!(
            typed.ends_with(s),
            "each retry is the rest, in order: {s:?}"
        );
    }
}

#[test]
fn domains_are_listed_and_controlled() {
    let (mut c, _mock) = standard();
    let d = c.domains().unwrap();
    assert_eq!(d.len(), 2);
    c.domain_control(1, DomainOp::Pause).unwrap();
    assert_eq!(c.domain(0).unwrap().unwrap().state, 2, "paused");
    assert!(control::domains_table(&c.domains().unwrap()).contains("paused"));
    let e = c.domain_control(9, DomainOp::Destroy).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                refusal: Refusal::NoSuchDomain,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("(DomainControl 9 Destroy): no such domain"),
        "{e}"
    );
}

#[test]
fn a_fault_is_injected_by_name_and_unknown_names_are_refused() {
    let (mut c, _mock) = standard();
    c.inject_fault("console").unwrap();
    let e = c.inject_fault("nobody").unwrap_err();
    assert!(
        e.to_string().contains("the supervisor refused request #")
            && e.to_string()
                .contains("(InjectFault nobody): no such service"),
        "{e}"
    );
    let e = c.inject_fault(&"x".repeat(33)).unwrap_err();
    assert!(e.to_string().contains("at most 32"), "{e}");
}

#[test]
fn replies_are_matched_by_seq_and_events_in_between_are_queued() {
    let (host, console) = pair();
    let mut con = Console::default();
    let mut n = 0;
    let _mock = serve(console, move |req| {
        n += 1;
        vec![
            event(n),
            // A reply to somebody else's request, and a console error.
            reply(req.seq.wrapping_add(1000), ControlReply::Done),
            reply(0, ControlReply::Error(ControlError::Malformed)),
            event(100 + n),
            reply(req.seq, con.answer(req)),
        ]
    });
    let mut c = Client::new(host);
    assert_eq!(c.services().unwrap().len(), 3);
    // Hello and four Service requests: five of each.
    let s = c.stats();
    assert_eq!(s.stray_replies, 5);
    assert_eq!(s.console_errors, 5);
    assert_eq!(s.events, 10);
    assert_eq!(s.dropped.frames(), 0);
    let mut seen = Vec::new();
    while let Some(ControlEvent::Garbage { bytes }) = c.next_event(Duration::ZERO).unwrap() {
        seen.push(bytes);
    }
    assert_eq!(seen, [1, 101, 2, 102, 3, 103, 4, 104, 5, 105]);
    let t = Instant::now();
    assert_eq!(c.next_event(Duration::from_millis(50)).unwrap(), None);
    assert!(t.elapsed() >= Duration::from_millis(50));
}

#[test]
fn an_event_handler_sees_events_as_they_come() {
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| {
        vec![event(req.seq % 1000), reply(req.seq, con.answer(req))]
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut c = Client::new(host).with_first_seq(1);
    let s = seen.clone();
    c.on_event(move |e| s.lock().unwrap().push(*e));
    c.hello().unwrap();
    c.domain(0).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ControlEvent::Garbage { bytes: 1 },
            ControlEvent::Garbage { bytes: 2 }
        ]
    );
    assert_eq!(c.next_event(Duration::from_millis(10)).unwrap(), None);
}

#[test]
fn a_silent_console_times_out_naming_the_request() {
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| match req.request {
        ControlRequest::Service { .. } => vec![],
        _ => vec![reply(req.seq, con.answer(req))],
    });
    let mut c = Client::new(host).with_first_seq(41);
    c.hello().unwrap();
    c.set_timeout(Duration::from_millis(200));
    let t = Instant::now();
    let e = c.services().unwrap_err();
    let waited = t.elapsed();
    assert_eq!(
        e.to_string(),
        "the console did not answer request #42 (Service 0) within 0.20 s"
    );
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn a_timeout_message_uses_whole_seconds_and_says_what_came_meanwhile() {
    let (host, console) = pair();
    let _mock = serve(console, move |_| {
        vec![
            b"\x01\x02garbage\x00".to_vec(),
            reply(0, ControlReply::Error(ControlError::Malformed)),
        ]
    });
    let mut c = Client::new(host)
        .with_first_seq(5)
        .with_timeout(Duration::from_secs(1));
    let e = c.hello().unwrap_err().to_string();
    assert!(
        e.starts_with("the console did not answer request #5 (Hello) within 1 s ("),
        "{e}"
    );
    assert!(
        e.contains("1 frame(s) that did not decode arrived meanwhile"),
        "{e}"
    );
    assert!(
        e.contains("the console reported: a frame did not decode"),
        "{e}"
    );
}

#[test]
fn a_late_reply_is_not_taken_for_the_next_request() {
    let (host, console) = pair();
    let mut con = Console::default();
    let mut late: Option<u32> = None;
    let _mock = serve(console, move |req| match req.request {
        // Keep the first Domain request's answer back...
        ControlRequest::Domain { index: 0 } if late.is_none() => {
            late = Some(req.seq);
            vec![]
        }
        // ...and send it just before the next answer, wrong on purpose.
        _ => {
            let mut out = Vec::new();
            if let Some(s) = late.take() {
                out.push(reply(s, ControlReply::Domain(None)));
            }
            out.push(reply(req.seq, con.answer(req)));
            out
        }
    });
    let mut c = Client::new(host);
    c.hello().unwrap();
    c.set_timeout(Duration::from_millis(150));
    assert!(matches!(
        c.domain(0).unwrap_err(),
        ClientError::Timeout { .. }
    ));
    c.set_timeout(Duration::from_secs(5));
    let d = c.domain(1).unwrap().expect("domain 1 is there");
    assert_eq!(d.id, 2);
    assert_eq!(c.stats().stray_replies, 1);
}

#[test]
fn a_garbled_frame_is_counted_not_fatal() {
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| {
        let mut bad = reply(req.seq, ControlReply::Done);
        // Change one byte (never to zero): the checksum fails.
        let i = bad.len() - 2;
        bad[i] = if bad[i] == 0x55 { 0x56 } else { 0x55 };
        vec![
            bad,
            vec![0xff, 0x13, 0x37, 0x00], // not COBS/CRC
            vec![0x00, 0x00],             // empty frames: resynchronisation
            reply(req.seq, con.answer(req)),
        ]
    });
    let mut c = Client::new(host).with_first_seq(1);
    assert_eq!(c.domains().unwrap().len(), 2);
    let dropped = c.stats().dropped;
    // Hello and three Domain requests, two bad frames each.
    assert_eq!(dropped.frames(), 8, "{dropped}");
}

#[test]
fn swap_sends_every_byte_in_order_in_chunks_of_at_most_swap_chunk() {
    let (host, console) = pair();
    let con = Arc::new(Mutex::new(Console::default()));
    let c2 = con.clone();
    let mock = serve(console, move |req| {
        vec![reply(req.seq, c2.lock().unwrap().answer(req))]
    });
    let elf = fake_elf(3 * SWAP_CHUNK + 100);
    let mut progress = Vec::new();
    let mut c = Client::new(host);
    let generation = c
        .swap_with_progress("vmm", &elf, |sent, total| progress.push((sent, total)))
        .unwrap();
    assert_eq!(generation, 4);
    drop(c);
    let got = mock.join().unwrap();
    let mut requests = got.requests.iter().map(|r| &r.request);
    assert!(matches!(
        requests.next(),
        Some(ControlRequest::Hello { .. })
    ));
    match requests.next() {
        Some(ControlRequest::SwapBegin { name, len }) => {
            assert_eq!(ipc_schema::supervisor::name_str(name), "vmm");
            assert_eq!(*len as usize, elf.len());
        }
        other => panic!("expected SwapBegin, got {other:?}"),
    }
    let mut rebuilt = Vec::new();
    let mut chunks = 0;
    for r in requests.by_ref() {
        match r {
            ControlRequest::SwapChunk { offset, bytes } => {
                assert_eq!(*offset as usize, rebuilt.len(), "chunks in order");
                assert!(!bytes.0.is_empty() && bytes.0.len() <= SWAP_CHUNK);
                rebuilt.extend_from_slice(&bytes.0);
                chunks += 1;
            }
            ControlRequest::SwapCommit => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(requests.next().is_none(), "nothing after the commit");
    assert_eq!(chunks, 4);
    assert_eq!(rebuilt, elf, "every byte, in order");
    assert_eq!(
        con.lock().unwrap().swapped,
        [("vmm".to_owned(), elf.clone())]
    );
    assert_eq!(progress.last(), Some(&(elf.len(), elf.len())));
    assert_eq!(progress.len(), 4);
}

#[test]
fn an_oversize_swap_is_refused_before_anything_is_sent() {
    let (mut c, mock) = standard();
    let elf = fake_elf(MAX_SWAP as usize + 1);
    let e = c.swap("vmm", &elf).unwrap_err();
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "the ELF to swap into vmm is {} bytes; a swap carries at most {MAX_SWAP} bytes (the console's swap buffer)",
            MAX_SWAP + 1
        )
    );
    let e = c.swap("vmm", &[]).unwrap_err();
    assert!(e.to_string().contains("is empty"), "{e}");
    drop(c);
    assert!(mock.join().unwrap().requests.is_empty(), "nothing was sent");
}

#[test]
fn a_swap_of_exactly_max_swap_bytes_goes_through() {
    let (mut c, mock) = standard();
    let elf = fake_elf(MAX_SWAP as usize);
    assert_eq!(c.swap("init", &elf).unwrap(), 2);
    drop(c);
    let chunks = mock
        .join()
        .unwrap()
        .requests
        .iter()
        .filter(|r| matches!(r.request, ControlRequest::SwapChunk { .. }))
        .count();
    assert_eq!(chunks, MAX_SWAP as usize / SWAP_CHUNK);
}

#[test]
fn a_refused_swap_names_the_reason() {
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| match req.request {
        ControlRequest::SwapCommit => vec![reply(
            req.seq,
            ControlReply::Refused(Refusal::MissingInterface { key: [0xcd; 8] }),
        )],
        _ => vec![reply(req.seq, con.answer(req))],
    });
    let e = Client::new(host)
        .swap("vmm", &fake_elf(100))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("(SwapCommit): the new ELF does not declare interface cdcdcdcdcdcdcdcd"),
        "{e}"
    );
}

#[test]
fn a_closed_connection_is_reported() {
    let (host, mut console) = pair();
    let mut con = Console::default();
    // Answer Hello, say something that is not a frame, hang up.
    let _mock = std::thread::spawn(move || {
        let mut reader = FrameReader::<FromHost>::new();
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        while got.is_empty() {
            let n = console.read(&mut buf).unwrap();
            reader.push(&buf[..n], &mut got);
        }
        console
            .write_all(&reply(got[0].seq, con.answer(&got[0])))
            .unwrap();
        console.write_all(b"bye now\n").unwrap();
    });
    let mut c = Client::new(host);
    c.hello().unwrap();
    let e = c.domain(0).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("the control connection closed while waiting for the answer to request #"),
        "{text}"
    );
    assert!(text.contains("(Domain 0)"), "{text}");
    assert!(text.ends_with("the other end said: bye now"), "{text}");
}

#[test]
fn frames_that_come_one_byte_at_a_time_decode() {
    // Events between replies, every byte written on its own.
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| {
        let mut wire = event(9);
        wire.extend(reply(req.seq, con.answer(req)));
        wire.into_iter().map(|b| vec![b]).collect()
    });
    let mut c = Client::new(host);
    assert_eq!(c.services().unwrap().len(), 3);
    assert_eq!(c.stats().events, 5);
}

#[test]
fn connecting_where_no_run_serves_says_so() {
    let dir = scratch("nosock");
    let e = Client::connect(&dir.join("ctl.sock"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no control socket at"), "{e}");
    assert!(e.contains("is `cargo hv run` running?"), "{e}");
    drop(std::os::unix::net::UnixListener::bind(dir.join("old.sock")).unwrap());
    let e = Client::connect(&dir.join("old.sock"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nobody serves any more"), "{e}");
    // A file or directory given by mistake is named for what it is.
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    for (path, what) in [
        (dir.join("notes.txt"), "a file"),
        (dir.clone(), "a directory"),
    ] {
        let e = Client::connect(&path).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{} is {what}, not a control socket",
                path.display()
            )),
            "{e}"
        );
    }
}

#[test]
fn altp2m_requests_go_through_and_violations_arrive_as_events() {
    use ipc_schema::vmexit::AccessBits;
    use parallax_client::altp2m::{self, AltRequest, Reply, Request, VmEvent};
    let (host, console) = pair();
    let violation = VmEvent {
        id: 4,
        domain: 1,
        vcpu: 0,
        view: 1,
        gpa: 0x12_3018,
        gla: Some(0x8012_3018),
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
        rip: 0x10_0040,
        internal: false,
        paused: true,
        qualification: 0x181,
    };
    let mut con = Console::default();
    // The console sends the violation right after answering Listen.
    let _mock = serve(console, move |req| {
        let mut out = vec![reply(req.seq, con.answer(req))];
        if matches!(
            req.request,
            ControlRequest::Altp2m(AltRequest::Listen { on: true, .. })
        ) {
            out.push(common::frame(&parallax_client::ToHost::Event(
                ControlEvent::Violation(violation),
            )));
        }
        out
    });
    let mut c = Client::new(host);
    assert_eq!(
        c.view_request(
            1,
            Request::ViewCreate {
                default_access: None
            }
        )
        .unwrap(),
        Reply::View(1)
    );
    let e = c
        .view_request(1, Request::GetAccess { view: 9, gfn: 3 })
        .unwrap_err()
        .to_string();
    assert!(e.contains("view 9 does not exist"), "{e}");
    c.altp2m_done(AltRequest::Listen {
        domain: 1,
        on: true,
    })
    .unwrap();
    let got = c.next_violation(Duration::from_secs(5)).unwrap();
    assert_eq!(got, Some(violation));
    let line = altp2m::describe_event(&violation);
    assert!(
        line.contains("write at gpa 0x123018")
            && line.contains("gla 0x80123018")
            && line.contains("allows r-x"),
        "{line}"
    );
    let e = c
        .altp2m_done(AltRequest::Listen {
            domain: 7,
            on: true,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("there is no domain 7"), "{e}");
}

#[test]
fn events_iterate_until_none_comes_in_time() {
    let (host, console) = pair();
    let mut con = Console::default();
    // Three events come before the answer to the first request.
    let _mock = serve(console, move |req| {
        let mut out = vec![event(1), event(2), event(3)];
        out.push(reply(req.seq, con.answer(req)));
        out
    });
    let mut c = Client::new(host);
    c.hello().unwrap();
    let got: Vec<ControlEvent> = c
        .events(Duration::from_millis(200))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        got,
        [1, 2, 3].map(|bytes| ControlEvent::Garbage { bytes }),
        "queued events first, then the end when none comes"
    );
    // A silent console: the iteration ends at once.
    let (host, _console) = pair();
    let mut c = Client::new(host);
    assert!(c.events(Duration::from_millis(50)).next().is_none());
}

#[test]
fn events_yield_a_closed_stream_once_then_end() {
    let (host, console) = pair();
    drop(console);
    let mut c = Client::new(host);
    let mut it = c.events(Duration::from_secs(5));
    assert!(matches!(it.next(), Some(Err(ClientError::Closed { .. }))));
    assert!(it.next().is_none());
}

/// What [`watch_page_run`] saw.
struct WatchRun {
    /// The count `watch_page` returned.
    n: u32,
    /// The events seen, and their views.
    seen: Vec<(u32, u16)>,
    /// The altp2m requests made.
    asked: Vec<ipc_schema::altp2m::AltRequest>,
    /// The `AtDetach` requests made.
    held: Vec<ControlRequest>,
}

/// `watch_page` against a console where view 3 is created and two writes
/// come once the domain is in it; with `stop`, the flag is raised as the
/// first is seen.
fn watch_page_run(stop: Option<&'static std::sync::atomic::AtomicBool>) -> WatchRun {
    use ipc_schema::vmexit::AccessBits;
    use parallax_client::altp2m::{
        Access, Action, AltReply, AltRequest, PageWatch, Reply, Request, VmEvent,
    };
    use parallax_client::{ControlReply as R, ToHost};
    let write = |id| VmEvent {
        id,
        domain: 2,
        vcpu: 0,
        view: 3,
        gpa: 0x10_f008,
        gla: None,
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
        rip: 0x10_0040,
        internal: false,
        paused: true,
        qualification: 0x181,
    };
    let (host, console) = pair();
    let mut con = Console::default();
    // View 3 is created; two writes come once the domain is in it (one of
    // another domain and one in another view in between, which are not this
    // watch's).
    let mock = serve(console, move |req| {
        let (answer, then) = match &req.request {
            ControlRequest::Altp2m(AltRequest::External { request, .. }) => (
                R::Altp2m(AltReply::Reply(match request {
                    Request::ViewCreate { .. } => Reply::View(3),
                    _ => Reply::Done,
                })),
                if matches!(request, Request::ViewSwitchAll { view: 3 }) {
                    let mut other = write(8);
                    other.domain = 5;
                    // Another client's watch of the domain, in its view.
                    let mut elsewhere = write(9);
                    elsewhere.view = 4;
                    vec![write(5), write(6), other, elsewhere, write(7)]
                } else {
                    vec![]
                },
            ),
            // Event 5 was answered by another client first.
            ControlRequest::Altp2m(AltRequest::Answer { event: 5, .. }) => (
                R::Altp2m(AltReply::Refused(ipc_schema::altp2m::AltError::NoSuchEvent)),
                vec![],
            ),
            ControlRequest::Altp2m(_) => (R::Altp2m(AltReply::Done), vec![]),
            _ => (con.answer(req), vec![]),
        };
        let mut out = vec![reply(req.seq, answer)];
        out.extend(
            then.into_iter()
                .map(|e| common::frame(&ToHost::Event(ControlEvent::Violation(e)))),
        );
        out
    });
    let mut c = Client::new(host);
    let mut seen = Vec::new();
    let w = PageWatch {
        domain: 2,
        gfn: 0x10f,
        access: Access::RX,
        answer: Action::AllowOnce,
        count: Some(2),
        patience: Duration::from_secs(5),
        stop,
    };
    let n = c
        .watch_page(&w, |e, view| {
            seen.push((e.id, view));
            if let Some(s) = stop {
                s.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .unwrap();
    drop(c);
    let got = mock.join().unwrap();
    let held = got.pick(|r| matches!(r, ControlRequest::AtDetach { .. }).then(|| r.clone()));
    let asked = got.altp2m();
    WatchRun {
        n,
        seen,
        asked,
        held,
    }
}

#[test]
fn watch_page_sets_up_answers_each_violation_and_undoes_it_all() {
    use parallax_client::altp2m::{Access, Action, AltRequest, Request};
    let ext = |request| AltRequest::External { domain: 2, request };
    let listen = |on| AltRequest::Listen { domain: 2, on };
    let answer = |event| AltRequest::Answer {
        event,
        action: Action::AllowOnce,
    };
    let set_up = [
        ext(Request::ViewCreate {
            default_access: None,
        }),
        ext(Request::SetAccess {
            view: 3,
            gfn: 0x10f,
            access: Access::RX,
        }),
        listen(true),
        ext(Request::ViewSwitchAll { view: 3 }),
    ];
    let undone = [
        ext(Request::ViewSwitchAll { view: 0 }),
        listen(false),
        ext(Request::ViewDestroy { view: 3 }),
    ];
    // The watch is left to a proxy to undo should the client die, and
    // taken back at its end (this console, no proxy, refuses both:
    // `ProxyOnly`, and the watch goes on).
    let watch = parallax_client::Watch {
        domain: 2,
        view: Some(3),
    };
    let held = [true, false].map(|set| ControlRequest::AtDetach { watch, set });
    // Event 5, answered by another client first, is seen and not counted;
    // the watch goes on to its two.
    let run = watch_page_run(None);
    assert_eq!((run.n, run.seen), (2, vec![(5, 3), (6, 3), (7, 3)]));
    let mut want = set_up.to_vec();
    want.extend([answer(5), answer(6), answer(7)]);
    want.extend(undone.clone());
    assert_eq!(run.asked, want);
    assert_eq!(run.held, held);
    // Stopped (a Ctrl-C) after the first event: it is answered, nothing
    // more is waited for, and everything is undone as at any other end.
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let run = watch_page_run(Some(&STOP));
    assert_eq!((run.n, run.seen), (0, vec![(5, 3)]));
    let mut want = set_up.to_vec();
    want.push(answer(5));
    want.extend(undone);
    assert_eq!(run.asked, want);
    assert_eq!(run.held, held);
}

/// A watch whose undoing goes unanswered (here: the listen's end, never
/// answered) does not take the watch back from the proxy: it stays the
/// proxy's to undo when the connection ends. Its other steps are still
/// made.
#[test]
fn a_watch_whose_undoing_goes_unanswered_is_left_to_the_proxy() {
    use parallax_client::altp2m::{
        Access, Action, AltReply, AltRequest, PageWatch, Reply, Request,
    };
    let (host, console) = pair();
    let mut con = Console::default();
    let mock = serve(console, move |req| {
        let answer = match &req.request {
            ControlRequest::Altp2m(AltRequest::Listen { on: false, .. }) => return vec![],
            ControlRequest::Altp2m(AltRequest::External { request, .. }) => {
                ControlReply::Altp2m(AltReply::Reply(match request {
                    Request::ViewCreate { .. } => Reply::View(3),
                    _ => Reply::Done,
                }))
            }
            ControlRequest::Altp2m(_) => ControlReply::Altp2m(AltReply::Done),
            _ => con.answer(req),
        };
        vec![reply(req.seq, answer)]
    });
    let mut c = Client::new(host).with_timeout(Duration::from_millis(300));
    let w = PageWatch {
        domain: 2,
        gfn: 0x10f,
        access: Access::RX,
        answer: Action::Retry,
        count: None,
        patience: Duration::from_millis(100),
        stop: None,
    };
    assert_eq!(c.watch_page(&w, |_, _| {}).unwrap(), 0);
    drop(c);
    let got = mock.join().unwrap();
    let held = got.pick(|r| match *r {
        ControlRequest::AtDetach { set, .. } => Some(set),
        _ => None,
    });
    assert_eq!(held, [true], "left to the proxy, never taken back");
    let asked = got.altp2m();
    assert_eq!(
        asked.last(),
        Some(&AltRequest::External {
            domain: 2,
            request: Request::ViewDestroy { view: 3 }
        })
    );
}

#[test]
fn logdirty_start_peek_read_status_and_stop_against_the_fake_log() {
    use parallax_client::logdirty::{
        self, DirtyMode, GfnRange, LdError, LdRequest, LogStarted, LogStatus, Mechanism,
    };
    let (mut c, mock) = standard();
    let all = GfnRange {
        gfn: 0,
        count: 4096,
    };
    assert_eq!(
        c.logdirty_start(1, 3, None, DirtyMode::Auto).unwrap(),
        LogStarted {
            mechanism: Mechanism::Pml,
            range: all
        }
    );
    assert_eq!(
        c.logdirty_status(1, 3).unwrap(),
        LogStatus {
            mechanism: Mechanism::Pml,
            range: all,
            dirty: 27
        }
    );
    // Twelve ranges come in two answers, collected into one list.
    let want = common::fake_writes();
    let peeked = c.logdirty_peek(1, 3).unwrap();
    assert_eq!(peeked, want);
    assert_eq!(logdirty::pages(&peeked), 27);
    assert_eq!(
        c.logdirty_peek(1, 3).unwrap(),
        want,
        "a peek clears nothing"
    );
    assert_eq!(c.logdirty_read(1, 3).unwrap(), want);
    assert_eq!(c.logdirty_peek(1, 3).unwrap(), [], "the read cleared them");
    assert_eq!(c.logdirty_status(1, 3).unwrap().dirty, 0);
    c.logdirty_stop(1, 3).unwrap();
    let e = c.logdirty_status(1, 3).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Logdirty {
                error: LdError::NotLogging,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "logdirty: log 3 of domain 1 is not running (never started, or stopped)"
    );
    drop(c);
    let asked = mock.join().unwrap().pick(|r| match r {
        ControlRequest::Logdirty(q) => Some(q.clone()),
        _ => None,
    });
    // Every request names log 3; each read goes on from the answer's `next`.
    let reads: Vec<(u64, bool)> = asked
        .iter()
        .filter_map(|q| match *q {
            LdRequest::Read {
                domain: 1,
                log: 3,
                from,
                clear,
            } => Some((from, clear)),
            LdRequest::Read { .. } => panic!("{q:?}"),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads,
        [
            (0, false),
            (0x20c, false),
            (0, false),
            (0x20c, false),
            (0, true),
            (0x20c, true),
            (0, false)
        ]
    );
    assert!(asked.iter().all(|q| match *q {
        LdRequest::Start { log, .. }
        | LdRequest::Read { log, .. }
        | LdRequest::Stop { log, .. }
        | LdRequest::Status { log, .. } => log == 3,
    }));
}

#[test]
fn logdirty_refusals_are_typed_and_name_what_was_wrong() {
    use parallax_client::logdirty::{DirtyMode, GfnRange, LdError, Mechanism};
    let (mut c, mock) = standard();
    let range = |gfn, count| Some(GfnRange { gfn, count });
    let e = c.logdirty_start(7, 0, None, DirtyMode::Auto).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Logdirty {
                error: LdError::NoSuchDomain,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "logdirty: domain 7: no such domain (or it has ended)"
    );
    let e = c
        .logdirty_start(1, 0, range(0, 0x10_0000), DirtyMode::Auto)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "logdirty: range 0x0:0x100000 reaches past the domain's RAM (4096 pages)"
    );
    assert_eq!(
        c.logdirty_peek(1, 0).unwrap_err().to_string(),
        "logdirty: log 0 of domain 1 is not running (never started, or stopped)"
    );
    // Refused here, before anything is sent.
    let e = c
        .logdirty_start(1, 0, range(0x10, 0), DirtyMode::Auto)
        .unwrap_err();
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    assert_eq!(e.to_string(), "range 0x10:0x0: COUNT is 0, an empty range");
    let e = c
        .logdirty_start(1, 0, range(u64::MAX, 2), DirtyMode::Auto)
        .unwrap_err();
    assert!(e.to_string().contains("wraps past the last gfn"), "{e}");
    // Write-protection over 0-0xff; then PML over part of it.
    c.logdirty_start(1, 0, range(0, 0x100), DirtyMode::WriteProtect)
        .unwrap();
    let e = c
        .logdirty_start(1, 0, range(0, 0x100), DirtyMode::WriteProtect)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("log 0 of domain 1 is already running"),
        "{e}"
    );
    let e = c
        .logdirty_start(1, 1, range(0x80, 0x100), DirtyMode::Pml)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Logdirty {
                error: LdError::ModeConflict {
                    held: Mechanism::WriteProtect
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("logdirty: another log holds part of that range with write-protection"),
        "{e}"
    );
    drop(c);
    let sent = mock
        .join()
        .unwrap()
        .requests
        .iter()
        .filter(|r| matches!(r.request, ControlRequest::Logdirty(_)))
        .count();
    assert_eq!(sent, 6, "the empty and the wrapping range were not sent");
}

#[test]
fn pml_on_a_cpu_without_it_is_refused_by_name() {
    use parallax_client::logdirty::{DirtyMode, Mechanism};
    let (host, console) = pair();
    let mut con = Console::default();
    con.logdirty.as_mut().unwrap().pml = false;
    let _mock = con.serve(console);
    let mut c = Client::new(host);
    let e = c.logdirty_start(2, 0, None, DirtyMode::Pml).unwrap_err();
    assert!(e.to_string().contains("the CPU lacks PML"), "{e}");
    // Auto falls back to write-protection.
    let s = c.logdirty_start(2, 0, None, DirtyMode::Auto).unwrap();
    assert_eq!(s.mechanism, Mechanism::WriteProtect);
}

#[test]
fn a_console_without_the_logdirty_service_says_so() {
    use parallax_client::logdirty::DirtyMode;
    let (host, console) = pair();
    let _mock = Console {
        logdirty: None,
        ..Console::default()
    }
    .serve(console);
    let mut c = Client::new(host);
    let e = c.logdirty_start(1, 0, None, DirtyMode::Auto).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Console {
                error: ControlError::LogdirtyUnavailable,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("(Logdirty Start domain 1 log 0 over all RAM (Auto))")
            && text.contains("the logdirty service did not answer"),
        "{text}"
    );
}

#[test]
fn a_read_joins_ranges_split_across_answers_and_stops_a_service_that_does_not_move_on() {
    use parallax_client::ipc_schema::ipc::BoundedVec;
    use parallax_client::logdirty::{GfnRange, LdReply, LdRequest};
    let r = |gfn, count| GfnRange { gfn, count };
    let dirty = |ranges: &[GfnRange], next| {
        ControlReply::Logdirty(LdReply::Dirty {
            ranges: BoundedVec(heapless::Vec::from_slice(ranges).unwrap()),
            next,
        })
    };
    let (host, console) = pair();
    let mut con = Console::default();
    let _mock = serve(console, move |req| {
        let answer = match req.request {
            ControlRequest::Logdirty(LdRequest::Read { log: 0, from, .. }) => match from {
                0 => dirty(&[r(0x10, 4)], Some(0x14)),
                0x14 => dirty(&[r(0x14, 4), r(0x30, 1)], Some(0x31)),
                _ => dirty(&[], None),
            },
            // Log 1: a service stuck at one place.
            ControlRequest::Logdirty(LdRequest::Read { log: 1, .. }) => {
                dirty(&[r(0x10, 1)], Some(0))
            }
            _ => con.answer(req),
        };
        vec![reply(req.seq, answer)]
    });
    let mut c = Client::new(host);
    assert_eq!(c.logdirty_peek(1, 0).unwrap(), [r(0x10, 8), r(0x30, 1)]);
    let e = c.logdirty_read(1, 1).unwrap_err().to_string();
    assert!(e.contains("which is not past 0x0; stopped reading"), "{e}");
}

/// A name is a domain there, one only: the list keeps destroyed domains
/// (whose ids may be another's now), and two domains there with one name
/// (which init does not make, but another supervisor could) are not
/// guessed between.
#[test]
fn a_name_two_domains_have_or_only_a_destroyed_one_has_is_refused() {
    let (host, console) = pair();
    let con = Console {
        domains: vec![
            domain(1, "twin", 1),
            domain(2, "twin", 2),
            domain(3, "gone", 5),
            domain(4, "back", 5),
            domain(5, "back", 1),
        ],
        ..Console::default()
    };
    let _mock = con.serve(console);
    let mut c = Client::new(host);
    let e = c.domain_id("twin").unwrap_err().to_string();
    assert_eq!(
        e,
        "domains 1, 2 are all named \"twin\": say which by its id"
    );
    let e = c.domain_id("gone").unwrap_err().to_string();
    assert_eq!(e, "the domain named \"gone\" (id 3) was destroyed");
    assert_eq!(
        c.domain_id("back").unwrap(),
        5,
        "the one there, not the one destroyed"
    );
}

#[test]
fn domains_are_named_by_id_or_name() {
    let (mut c, _mock) = standard();
    assert_eq!(c.domain_id("2").unwrap(), 2);
    assert_eq!(c.domain_id("0x2").unwrap(), 2);
    assert_eq!(c.domain_id("9").unwrap(), 9, "an id is taken as it is");
    assert_eq!(c.domain_id("hello").unwrap(), 1);
    assert_eq!(c.domain_id("cpuid").unwrap(), 2);
    let e = c.domain_id("nobody").unwrap_err().to_string();
    assert_eq!(
        e,
        "no domain is named \"nobody\" (the domains: 1 hello, 2 cpuid)"
    );
    let e = c.domain_id("70000").unwrap_err().to_string();
    assert!(e.contains("neither an id (0 to 65535) nor a name"), "{e}");
}

#[test]
fn guest_memory_is_read_and_written_in_chunks_and_refusals_say_why() {
    use parallax_client::introspect::{Address, CHUNK, IntroError};
    let (mut c, mock) = standard();
    // 1000 bytes from 0x10: one streamed request, six data frames joined.
    let want: Vec<u8> = (0x10..0x10 + 1000u32).map(|i| (i % 251) as u8).collect();
    const { assert!(1000 > 5 * CHUNK) };
    assert_eq!(c.mem_read(1, Address::Physical(0x10), 1000).unwrap(), want);
    // A read that stops part way: `mem_read_prefix` gives the bytes before
    // the refusal, `mem_read` drops them; the refusal says where.
    let (before, end) = c.mem_read_prefix(1, Address::Physical(0xff00), 0x200);
    let want_before: Vec<u8> = (0xff00..0xffc0u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(before, want_before);
    assert!(
        matches!(
            end,
            Err(ClientError::Introspect {
                error: IntroError::OutsideRam { gpa: 0xffc0 },
                ..
            })
        ),
        "{end:?}"
    );
    let e = c.mem_read(1, Address::Physical(0xff00), 0x200).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Introspect {
                error: IntroError::OutsideRam { gpa: 0xffc0 },
                ..
            }
        ),
        "{e:?}"
    );
    let bytes: Vec<u8> = (0..300u32).map(|i| i as u8 ^ 0x5a).collect();
    c.mem_write(1, Address::Physical(0x8000), &bytes).unwrap();
    assert_eq!(
        c.mem_read(1, Address::Physical(0x8000), 300).unwrap(),
        bytes
    );
    let e = c.mem_read(1, Address::Physical(0xfff0), 0x20).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Introspect {
                error: IntroError::OutsideRam { gpa: 0xfff0 },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("is not guest RAM"), "{e}");
    let e = c
        .mem_read(1, Address::Physical(u64::MAX - 4), 300)
        .unwrap_err();
    assert!(
        e.to_string().contains("wraps") || e.to_string().contains("not guest RAM"),
        "{e}"
    );
    assert_eq!(c.stats().stray_replies, 0);
    drop(c);
    let got = mock.join().unwrap();
    let reads = got.pick(|r| match *r {
        ControlRequest::ReadMemory { len, .. } => Some(len),
        _ => None,
    });
    assert_eq!(reads, [1000, 0x200, 0x200, 300, 300]);
}

#[test]
fn a_console_without_a_sharing_service_says_so_by_name() {
    let (mut c, mock) = standard();
    let e = c.share_status().unwrap_err();
    assert!(
        e.to_string().contains("the sharing service did not answer"),
        "{e}"
    );
    drop(c);
    let got = mock.join().unwrap();
    assert!(
        got.requests.iter().any(
            |r| r.request == ControlRequest::Share(parallax_client::sharing::ShRequest::Status)
        )
    );
}
