//! The control client through the proxy `cargo hv run` serves, with the
//! mock console of parallax-client's tests behind it. No emulator, no
//! hypervisor. (The client's own tests are in client/tests/.)

#[path = "../../client/tests/common/mod.rs"]
mod common;

use common::{Console, Received, event, fake_elf, scratch};
use image_builder::control::proxy::{Proxy, ProxySocket};
use image_builder::control::{
    CONTROL, Client, ClientError, ControlError, ControlEvent, ControlReply, ControlRequest,
};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("a socket pair")
}

// The proxy: the same client through the socket `cargo hv run` offers.

/// A proxy serving a socket in scratch folder `name`, with the mock
/// console behind it: the socket's path, the proxy, the console's thread.
fn proxy_with_mock(name: &str) -> (PathBuf, Proxy, JoinHandle<Received>) {
    let path = scratch(name).join("ctl.sock");
    let (proxy_end, console) = pair();
    let mock = Console::default().serve(console);
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    (path, proxy, mock)
}

/// A proxy with a mock console that sends `before` (whole frames) ahead of
/// its answer to `Domain { index: 0 }`.
fn proxy_with_events(name: &str, before: Vec<u8>) -> (PathBuf, Proxy, JoinHandle<Received>) {
    let path = scratch(name).join("ctl.sock");
    let (proxy_end, console) = pair();
    let mut con = Console::default();
    let mock = common::serve(console, move |req| {
        let mut frames = con.respond(req);
        if matches!(req.request, ControlRequest::Domain { index: 0 }) {
            frames.insert(0, before.clone());
        }
        frames
    });
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    (path, proxy, mock)
}

/// A `Hello` with sequence number `seq`, on the wire.
fn hello_frame(seq: u32) -> Vec<u8> {
    image_builder::control::frames::encode(&image_builder::control::FromHost {
        seq,
        request: ControlRequest::Hello {
            key: CONTROL.key.to_bytes(),
        },
    })
    .unwrap()
}

/// A client of the proxy at `path`, once the proxy takes it (a client that
/// just left may not be detached yet).
fn attach(path: &Path) -> Client<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(path).unwrap();
        match c.hello() {
            Ok(_) => return c,
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, ClientError::Closed { .. }), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_client_talks_to_the_console_through_the_proxy() {
    let (path, proxy, _mock) = proxy_with_mock("proxy");
    let mut c = Client::connect(&path).unwrap();
    assert_eq!(c.services().unwrap().len(), 3);
    let elf = fake_elf(2000);
    assert_eq!(c.swap("vmm", &elf).unwrap(), 4);
    drop(c);
    // The next client is served too.
    let mut c = attach(&path);
    assert_eq!(c.domains().unwrap().len(), 2);
    drop(c);
    let stats = proxy.stop();
    assert!(stats.to_console > 2000, "{stats:?}");
    assert!(stats.to_clients > 0, "{stats:?}");
    assert!(!path.exists(), "the socket is removed when the proxy stops");
}

/// Two clients at once whose sequence numbers collide: each gets its own
/// answers under its own numbers, and both get every event.
#[test]
fn clients_at_once_each_get_their_own_answers_and_every_event() {
    let (path, proxy, mock) = proxy_with_events("several", event(99));
    let connect = || Client::connect(&path).unwrap().with_first_seq(40);
    let (mut a, mut b) = (connect(), connect());
    a.hello().unwrap();
    b.hello().unwrap();
    for _ in 0..3 {
        assert_eq!(a.services().unwrap().len(), 3);
        assert_eq!(b.domains().unwrap().len(), 2);
    }
    // One event for each of b's listings, to each client.
    for c in [&mut a, &mut b] {
        for _ in 0..3 {
            assert_eq!(
                c.next_event(Duration::from_secs(5)).unwrap(),
                Some(ControlEvent::Garbage { bytes: 99 }),
            );
        }
        assert_eq!(c.stats().stray_replies, 0, "nobody got another's answer");
    }
    // A client's request before its own Hello is refused as the console
    // would refuse it, though another client has said Hello.
    let mut late = connect();
    assert_eq!(
        late.call(ControlRequest::Service { index: 9 }).unwrap(),
        ControlReply::Error(ControlError::NotHello)
    );
    drop((a, b, late));
    let stats = proxy.stop();
    assert_eq!(stats.clients, 3);
    assert_eq!(stats.turned_away, 0);
    let got = mock.join().unwrap();
    let seqs: Vec<u32> = got.requests.iter().map(|r| r.seq).collect();
    let mut unique = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seqs.len(),
        "the console saw no number twice: {seqs:?}"
    );
    assert!(
        !got.requests
            .iter()
            .any(|r| r.request == ControlRequest::Service { index: 9 }),
        "the refused request never reached it"
    );
}

/// Clients that stop reading hold up nobody else: each is detached on its
/// own (its queue full, or its socket not read for the write timeout), and
/// the others' answers and events go on meanwhile. (Written in turn under
/// one lock, as they were, five such clients held every other for the
/// write timeout each: 10 s here.)
#[test]
fn clients_that_do_not_read_hold_up_nobody() {
    use image_builder::control::proxy::CLIENT_WRITE_TIMEOUT;
    const EVENTS: u32 = 60_000;
    let flood: Vec<u8> = (0..EVENTS).flat_map(event).collect();
    let (path, proxy, mock) = proxy_with_events("stuck", flood);
    let stuck: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(&hello_frame(1)).unwrap();
            s
        })
        .collect();
    let mut c = attach(&path);
    let start = Instant::now();
    assert_eq!(c.domain(0).unwrap().map(|d| d.id), Some(1));
    let took = start.elapsed();
    assert!(
        took < 2 * CLIENT_WRITE_TIMEOUT,
        "held up {took:?} by clients that do not read"
    );
    assert_eq!(
        c.stats().events,
        u64::from(EVENTS),
        "every event reached it"
    );
    drop((c, stuck));
    drop(proxy);
    drop(mock);
}

/// One client's swap at a time: another client's swap is refused while it
/// goes on (and says why), and is taken once it is done.
#[test]
fn a_swap_under_way_refuses_another_clients_until_it_is_done() {
    let (path, _proxy, _mock) = proxy_with_mock("swaps");
    let mut a = Client::connect(&path).unwrap();
    let mut b = Client::connect(&path).unwrap();
    a.hello().unwrap();
    b.hello().unwrap();
    let elf = fake_elf(600);
    let begin = ControlRequest::SwapBegin {
        name: image_builder::control::ipc_schema::supervisor::name("vmm"),
        len: elf.len() as u32,
    };
    assert_eq!(a.call(begin).unwrap(), ControlReply::Done);
    let e = b.swap("vmm", &elf).unwrap_err();
    assert!(
        e.to_string()
            .contains("another client of this run is sending a swap"),
        "{e}"
    );
    // a's swap, ended by a whole upload of its own, then b's.
    assert_eq!(a.swap("vmm", &elf).unwrap(), 4);
    assert_eq!(b.swap("vmm", &elf).unwrap(), 5);
}

/// A client that sends requests without waiting for their answers has at
/// most `MAX_IN_FLIGHT` of them waiting for the console: a console that
/// answers it slowly (here: never) serves the next client at once.
#[test]
fn a_flooding_client_waits_its_turn_and_others_are_served() {
    use image_builder::control::proxy::MAX_CLIENTS;
    use image_builder::control::router::MAX_IN_FLIGHT;
    let path = scratch("quota").join("ctl.sock");
    let (proxy_end, console) = pair();
    let mut con = Console::default();
    // Never answers a `Service` request.
    let mock = common::serve(console, move |req| match req.request {
        ControlRequest::Service { .. } => Vec::new(),
        _ => con.respond(req),
    });
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    let mut flood = UnixStream::connect(&path).unwrap();
    let mut flooder = hello_frame(1);
    for seq in 2..1000 {
        flooder.extend(
            image_builder::control::frames::encode(&image_builder::control::FromHost {
                seq,
                request: ControlRequest::Service { index: 0 },
            })
            .unwrap(),
        );
    }
    flood.write_all(&flooder).unwrap();
    let mut c = Client::connect(&path).unwrap();
    assert_eq!(c.domains().unwrap().len(), 2, "served behind the flood");
    // Clients beyond the most the proxy serves are told so.
    let others: Vec<_> = (2..MAX_CLIENTS)
        .map(|_| {
            let mut o = Client::connect(&path).unwrap();
            o.hello().unwrap();
            o
        })
        .collect();
    let e = Client::connect(&path).unwrap().hello().unwrap_err();
    assert!(
        e.to_string()
            .contains("clients are attached, the most it serves"),
        "{e}"
    );
    drop((c, others, flood));
    let stats = proxy.stop();
    assert_eq!(stats.turned_away, 1);
    let got = mock.join().unwrap();
    let waiting = got
        .requests
        .iter()
        .filter(|r| matches!(r.request, ControlRequest::Service { .. }))
        .count();
    assert_eq!(
        waiting, MAX_IN_FLIGHT,
        "the flood's quota reached the console, no more"
    );
}

#[test]
fn a_client_that_leaves_mid_frame_costs_only_that_frame() {
    let (path, proxy, mock) = proxy_with_mock("midframe");
    let whole = hello_frame(1);
    {
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(&whole[..whole.len() / 2]).unwrap();
    }
    let mut c = attach(&path);
    assert_eq!(c.domains().unwrap().len(), 2);
    drop(c);
    drop(proxy);
    let got = mock.join().unwrap();
    assert_eq!(got.dropped, 0, "the half frame never reached the console");
    assert!(
        got.requests
            .iter()
            .any(|r| matches!(r.request, ControlRequest::Domain { .. }))
    );
}

/// A flood of garbage and frames too long for the console is dropped by
/// the proxy, not sent down the (slow) serial line: the console sees only
/// the intact frames, the client is told as the console would tell it (a
/// `Garbage` event for each bad frame, a `TooLong` refusal for each long
/// one), and the next request is answered at once.
#[test]
fn garbage_from_a_client_is_dropped_before_the_console_and_reported() {
    let (path, proxy, mock) = proxy_with_mock("garbage");
    let mut c = attach(&path);
    c.get_ref().write_all(b"line noise\x00").unwrap();
    let garbage = std::iter::from_fn(|| c.next_event(Duration::from_secs(5)).unwrap())
        .find(|e| matches!(e, ControlEvent::Garbage { .. }));
    assert_eq!(garbage, Some(ControlEvent::Garbage { bytes: 10 }));
    {
        let mut raw = c.get_ref();
        let mut big = vec![0x41u8; 3000];
        big.push(0);
        raw.write_all(&big).unwrap();
        // A megabyte of noise: at 115200 baud, 90 s of a serial line.
        let noise: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
            .map(|b| if b == 0x81 { 0 } else { b })
            .collect();
        raw.write_all(&noise).unwrap();
        raw.write_all(&[0]).unwrap();
    }
    let started = Instant::now();
    assert_eq!(c.domains().unwrap().len(), 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.stats().console_errors >= 1, "the long frame was refused");
    drop(c);
    let stats = proxy.stop();
    assert!(stats.garbage > 1_000_000, "{stats:?}");
    let got = mock.join().unwrap();
    assert_eq!(got.dropped, 0, "no garbage reached the console");
}

#[test]
fn a_new_client_gets_whole_console_frames_from_the_one_that_ends_next() {
    let dir = scratch("align");
    let path = dir.join("ctl.sock");
    let (proxy_end, mut console) = pair();
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    let ev = event(77);
    // A whole frame while nobody listens (read, and discarded)...
    console.write_all(&event(76)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().discarded < event(76).len() as u64 {
        assert!(Instant::now() < deadline, "the proxy did not drain COM2");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...and half a frame...
    console.write_all(&ev[..ev.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut c = Client::connect(&path).unwrap();
    while proxy.stats().clients < 1 {
        assert!(Instant::now() < deadline, "the client was not attached");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...then its tail and a whole frame once a client is attached: the
    // frame that ends after it attached reaches it whole (frames are read
    // whole whoever is attached: the proxy routes the answers to its own
    // requests), the one before it not at all.
    console.write_all(&ev[ev.len() / 2..]).unwrap();
    console.write_all(&event(78)).unwrap();
    for bytes in [77, 78] {
        assert_eq!(
            c.next_event(Duration::from_secs(5)).unwrap(),
            Some(ControlEvent::Garbage { bytes })
        );
    }
    assert_eq!(c.stats().dropped.frames(), 0, "no torn frame reached it");
}

#[test]
fn without_a_console_clients_are_told_so() {
    let dir = scratch("noconsole");
    let path = dir.join("ctl.sock");
    let _proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(None::<UnixStream>)
        .unwrap();
    let e = Client::connect(&path).unwrap().hello().unwrap_err();
    assert!(
        e.to_string()
            .contains("the emulator did not connect its second serial port (COM2)"),
        "{e}"
    );
}

#[test]
fn when_the_machine_stops_the_client_is_told() {
    let dir = scratch("stops");
    let path = dir.join("ctl.sock");
    let (proxy_end, console) = pair();
    let _proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    let mut c = Client::connect(&path)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    drop(console); // the emulator exits
    let e = c.hello().unwrap_err();
    assert!(matches!(e, ClientError::Closed { .. }), "{e}");
    let e = Client::connect(&path).unwrap().hello().unwrap_err();
    assert!(e.to_string().contains("the machine has stopped"), "{e}");
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = scratch("sockets");
    let path = dir.join("ctl.sock");
    let first = ProxySocket::bind(&path).unwrap();
    let e = ProxySocket::bind(&path).unwrap_err().to_string();
    assert!(e.contains("is the control socket of another run"), "{e}");
    drop(first);
    assert!(!path.exists(), "an unserved socket is removed when dropped");
    // A socket file nobody serves (a run that was killed).
    drop(std::os::unix::net::UnixListener::bind(dir.join("stale.sock")).unwrap());
    assert!(dir.join("stale.sock").exists());
    ProxySocket::bind(&dir.join("stale.sock")).unwrap();
    let long = dir.join("x".repeat(120));
    let e = ProxySocket::bind(&long).unwrap_err().to_string();
    assert!(e.contains("unix sockets take at most 107"), "{e}");
}

/// A console behind the proxy that, like the real one, sends its frames on
/// the debug port once asked (`UseDebugPort`); `com2` is a second handle on
/// its COM2 end for the test's own bytes.
fn debug_port_console() -> (
    UnixStream,
    UnixStream,
    UnixStream,
    std::thread::JoinHandle<common::Received>,
) {
    let (proxy_end, console) = pair();
    let (debug_proxy_end, mut debug) = pair();
    let com2 = console.try_clone().unwrap();
    let mut con = Console::default();
    let mut on_debug = false;
    let mock = common::serve(console, move |req| {
        if req.request == ControlRequest::UseDebugPort {
            on_debug = true;
            return Vec::new();
        }
        let frames = con.respond(req);
        if !on_debug {
            return frames;
        }
        for f in frames {
            debug.write_all(&f).unwrap();
        }
        Vec::new()
    });
    (proxy_end, debug_proxy_end, com2, mock)
}

#[test]
fn with_a_debug_port_the_console_is_asked_to_answer_there_and_frames_never_tear() {
    use image_builder::control::introspect::Address;
    let dir = scratch("debugport");
    let path = dir.join("ctl.sock");
    let (proxy_end, debug_end, mut com2, mock) = debug_port_console();
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve_with_debug(Some(proxy_end), Some(Box::new(debug_end)))
        .unwrap();
    let mut c = Client::connect(&path).unwrap();
    assert_eq!(c.services().unwrap().len(), 3);
    // Half an event on COM2, a streamed read answered on the debug port,
    // then the event's other half: both arrive whole.
    let ev = event(55);
    com2.write_all(&ev[..ev.len() / 2]).unwrap();
    let want: Vec<u8> = (0x100..0x100 + 5000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.mem_read(1, Address::Physical(0x100), 5000).unwrap(), want);
    com2.write_all(&ev[ev.len() / 2..]).unwrap();
    assert_eq!(
        c.next_event(Duration::from_secs(5)).unwrap(),
        Some(ControlEvent::Garbage { bytes: 55 })
    );
    assert_eq!(c.stats().dropped.frames(), 0, "no torn frame");
    assert_eq!(c.stats().stray_replies, 0);
    drop(c);
    // The next client is served too (the console is asked again).
    let mut c = attach(&path);
    assert_eq!(c.domains().unwrap().len(), 2);
    drop(c);
    drop(com2);
    drop(proxy);
    let got = mock.join().unwrap();
    let asked: Vec<usize> = got
        .requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.request == ControlRequest::UseDebugPort)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(asked.len(), 2, "once per client");
    // The first client: once the console's first answer (to Hello) showed
    // it is there; the second: before its first request.
    assert!(matches!(
        got.requests[0].request,
        ControlRequest::Hello { .. }
    ));
    assert_eq!(asked[0], 1);
    assert!(matches!(
        got.requests[asked[1] + 1].request,
        ControlRequest::Hello { .. }
    ));
    assert_eq!(got.dropped, 0);
}

#[test]
fn a_debug_port_with_no_console_is_still_drained() {
    let dir = scratch("debugdrain");
    let path = dir.join("ctl.sock");
    let (debug_end, mut emulator) = pair();
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve_with_debug(None::<UnixStream>, Some(Box::new(debug_end)))
        .unwrap();
    // Far more than a socket buffer holds: the writer never blocks.
    let junk = vec![7u8; 1 << 20];
    emulator.write_all(&junk).unwrap();
    emulator.write_all(&[0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().discarded < junk.len() as u64 {
        assert!(Instant::now() < deadline, "{:?}", proxy.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_machine_that_is_not_parallax_is_never_asked_for_the_debug_port() {
    use std::io::Read;
    let dir = scratch("notparallax");
    let path = dir.join("ctl.sock");
    let (proxy_end, mut machine) = pair();
    let (debug_end, _debug) = pair();
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve_with_debug(Some(proxy_end), Some(Box::new(debug_end)))
        .unwrap();
    let mut raw = UnixStream::connect(&path).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    machine
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Output reaches a client only once it is attached.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().clients < 1 {
        assert!(Instant::now() < deadline, "the client was not attached");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Frames that are not the console's (an echo guest's), then bytes from
    // the client: the machine gets the client's bytes and nothing else.
    machine.write_all(b"R\0R\0").unwrap();
    let mut seen = [0u8; 4];
    raw.read_exact(&mut seen).unwrap();
    assert_eq!(&seen, b"R\0R\0");
    // (A request, under the proxy's first number; an intact frame that is
    // not one is answered by the proxy, as the console would answer it.)
    let mut buf = [0u8; 32];
    let ping = ipc_schema::frame::encode(b"ping", &mut buf).unwrap();
    raw.write_all(ping).unwrap();
    let mut told = [0u8; 64];
    let n = raw.read(&mut told).unwrap();
    let mut frame = told[..n - 1].to_vec();
    assert_eq!(
        ipc_schema::frame::decode::<ipc_schema::control::ToHost>(&mut frame).unwrap(),
        ipc_schema::control::ToHost::Reply {
            seq: 0,
            reply: ipc_schema::control::ControlReply::Error(
                ipc_schema::control::ControlError::Malformed
            )
        }
    );
    raw.write_all(&hello_frame(77)).unwrap();
    let want = hello_frame(1);
    let mut got = vec![0u8; want.len()];
    machine.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    machine
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut more = [0u8; 16];
    assert!(
        machine.read(&mut more).is_err(),
        "nothing else reached the machine"
    );
}

/// A console whose altp2m makes view 2 of domain 1 and, once the domain
/// is in it, reports violation 7 there; as the domain is put back in view
/// 0, violation 8 comes, before that answer (an access made meanwhile).
fn watched_console(name: &str) -> (PathBuf, Proxy, JoinHandle<Received>) {
    use image_builder::control::ToHost;
    use image_builder::control::altp2m::{AltReply, AltRequest, Reply, Request, VmEvent};
    let violation = |id| {
        let bits = |write| ipc_schema::vmexit::AccessBits {
            read: true,
            write,
            execute: false,
        };
        common::frame(&ToHost::Event(ControlEvent::Violation(VmEvent {
            id,
            domain: 1,
            vcpu: 0,
            view: 2,
            gpa: 0x10_000,
            gla: None,
            access: bits(true),
            allowed: bits(false),
            rip: 0x1000,
            internal: false,
            paused: true,
            qualification: 0x182,
        })))
    };
    let path = scratch(name).join("ctl.sock");
    let (proxy_end, console) = pair();
    let mut con = Console::default();
    let mock = common::serve(console, move |req| {
        let ControlRequest::Altp2m(q) = &req.request else {
            return con.respond(req);
        };
        let reply = |r| common::reply(req.seq, ControlReply::Altp2m(r));
        match q {
            AltRequest::External { request, .. } => match request {
                Request::ViewCreate { .. } => vec![reply(AltReply::Reply(Reply::View(2)))],
                Request::ViewSwitchAll { view: 2 } => {
                    vec![reply(AltReply::Reply(Reply::Done)), violation(7)]
                }
                Request::ViewSwitchAll { view: 0 } => {
                    vec![violation(8), reply(AltReply::Reply(Reply::Done))]
                }
                _ => vec![reply(AltReply::Reply(Reply::Done))],
            },
            _ => vec![reply(AltReply::Done)],
        }
    });
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    (path, proxy, mock)
}

/// A page watch whose client dies holding an event (killed: its
/// connection ends, nothing of its own undoing is sent) is undone by the
/// proxy: the domain back in view 0, the event it held and the one that
/// came meanwhile answered in view 0, the listen off, the view destroyed,
/// nothing of it reaching another client. While it lived, a second
/// client's watch of the domain was refused before it set anything up;
/// once undone, the domain is free to watch.
#[test]
fn a_killed_watchs_domain_is_put_back_and_its_events_answered() {
    use image_builder::control::Watch;
    use image_builder::control::altp2m::{Access, Action, AltRequest, PageWatch, Request};
    let (path, proxy, mock) = watched_console("undo");
    let stream = UnixStream::connect(&path).unwrap();
    let killer = stream.try_clone().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let (_hold, held) = std::sync::mpsc::channel::<()>();
    let w = PageWatch {
        domain: 1,
        gfn: 0x10,
        access: Access::RX,
        answer: Action::AllowOnce,
        count: None,
        patience: Duration::from_secs(30),
        stop: None,
    };
    let watcher = std::thread::spawn(move || {
        let mut a = Client::new(stream).with_timeout(Duration::from_secs(5));
        // It sees event 7 and dies before it answers.
        a.watch_page(&w, |e, _| {
            seen_tx.send(e.id).unwrap();
            let _ = held.recv();
        })
    });
    assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(7));
    let mut b = attach(&path);
    match b.watch_page(&w, |_, _| panic!("no event")) {
        Err(e @ ClientError::Console { error, .. }) => {
            assert_eq!(error, ControlError::WatchedByAnotherClient { domain: 1 });
            let said = e.to_string();
            assert!(
                said.ends_with("(AtDetach: the watch of domain 1 through view 2, left to the proxy): another client of this run watches domain 1; one watch of a domain at a time: try again when it ends"),
                "{said}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Nobody else is attached while the proxy undoes the watch: the
    // console's answers reach the proxy all the same.
    drop(b);
    let _ = killer.shutdown(std::net::Shutdown::Both);
    drop(_hold);
    assert!(watcher.join().unwrap().is_err(), "its connection ended");
    std::thread::sleep(Duration::from_millis(200));
    // Free once the proxy's undoing is answered (not after `UNDO_IDLE`).
    let mut b = attach(&path);
    let mine = ControlRequest::AtDetach {
        watch: Watch {
            domain: 1,
            view: Some(5),
        },
        set: true,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.call(mine.clone()).unwrap() != ControlReply::Done {
        assert!(Instant::now() < deadline, "the domain was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Taken back, it leaves nothing for the proxy to undo.
    let taken_back = ControlRequest::AtDetach {
        watch: Watch {
            domain: 1,
            view: Some(5),
        },
        set: false,
    };
    assert_eq!(b.call(taken_back).unwrap(), ControlReply::Done);
    assert_eq!(b.stats().stray_replies, 0);
    drop(b);
    let stats = proxy.stop();
    assert_eq!((stats.undone, stats.stray), (1, 0));
    let asked = mock.join().unwrap().altp2m();
    let ext = |request| AltRequest::External { domain: 1, request };
    let switched = |event| AltRequest::Answer {
        event,
        action: Action::SwitchView(0),
    };
    let set_up = [
        ext(Request::ViewCreate {
            default_access: None,
        }),
        ext(Request::SetAccess {
            view: 2,
            gfn: 0x10,
            access: Access::RX,
        }),
        AltRequest::Listen {
            domain: 1,
            on: true,
        },
        ext(Request::ViewSwitchAll { view: 2 }),
    ];
    // B's watch: its view made, refused, its view destroyed.
    let refused = [
        ext(Request::ViewCreate {
            default_access: None,
        }),
        ext(Request::ViewDestroy { view: 2 }),
    ];
    let undone = [
        ext(Request::ViewSwitchAll { view: 0 }),
        switched(7),
        AltRequest::Listen {
            domain: 1,
            on: false,
        },
        ext(Request::ViewDestroy { view: 2 }),
        switched(8),
    ];
    let want: Vec<AltRequest> = [&set_up[..], &refused, &undone].concat();
    assert_eq!(asked, want);
}

/// A console that restarts (here: forgets the host's `Hello` after its
/// fourth request) under clients that stay attached: their next requests
/// are refused `NotHello` by it, and the proxy says `Hello` again and
/// sends each again, so the clients see their answers only, as if nothing
/// happened. (Before, every attached client got "the first request of a
/// session must be Hello" until it reconnected: a watch or `ctl events`
/// across a console restart failed.)
#[test]
fn clients_outlive_a_console_restart() {
    let path = scratch("restart").join("ctl.sock");
    let (proxy_end, console) = pair();
    let mut con = Console::default();
    let mut n = 0;
    let mock = common::serve(console, move |req| {
        n += 1;
        if n == 5 {
            con.said_hello = false;
        }
        con.respond(req)
    });
    let proxy = ProxySocket::bind(&path)
        .unwrap()
        .serve(Some(proxy_end))
        .unwrap();
    let (mut a, mut b) = (attach(&path), attach(&path));
    for _ in 0..3 {
        assert_eq!(a.services().unwrap().len(), 3);
        assert_eq!(b.domain(0).unwrap().map(|d| d.id), Some(1));
    }
    drop((a, b));
    let stats = proxy.stop();
    assert_eq!((stats.resent, stats.stray), (1, 0));
    let hellos = mock
        .join()
        .unwrap()
        .pick(|r| matches!(r, ControlRequest::Hello { .. }).then_some(()))
        .len();
    assert_eq!(hellos, 3, "each client's, and the proxy's once");
}
