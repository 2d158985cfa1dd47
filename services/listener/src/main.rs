//! listener: an altp2m violation listener inside the hypervisor (ALT-4).
//!
//! At start it attaches itself as the listener of every domain that exists
//! (ids 1 to 16), and answers every event with `SwitchView(0)`, so that
//! the vCPU retries the access in the host view. With a `listener-events`
//! endpoint to serve (`events`) and the `altp2m-events` notification, it
//! takes its events *forwarded* (`AltRequest::Forwarded`, docs/altp2m.md):
//! each event comes as the vCPU's exit itself, and its answer, plain, goes
//! straight into the vCPU with REPLY_RECV; the events altp2m had to hold
//! (the listener was busy) it fetches with `NextEvent` when signalled.
//! Without them, it waits in `NextEvent` calls to the altp2m service, each
//! carrying its answer to the event before. `cargo hv bench` uses it to
//! time a violation's whole path (fault, event, answer, resume) without
//! the serial line of an external agent.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, Action, AltReply, AltRequest, short};
use ipc_schema::ipc::IpcError;
use ipc_schema::syscall::MAX_MESSAGE;
use ipc_schema::vmexit::{ExitReply, Response};
use service_runtime::ipc::{self, Client, Event};
use service_runtime::{handle, require};

service_runtime::entry!(main);

fn main() -> ! {
    let mut altp2m = Client::new(require("altp2m"), ALTP2M);
    let mut domains = 0u32;
    for domain in 1..=16 {
        if let Ok(AltReply::Done) =
            altp2m.call::<_, AltReply>(&AltRequest::Listen { domain, on: true })
        {
            domains += 1;
        }
    }
    let forwarded = match (handle("events"), handle("altp2m-events")) {
        (Some(events), Some(note)) => {
            match altp2m.call::<_, AltReply>(&AltRequest::Forwarded { on: true }) {
                Ok(AltReply::Done) => Some((events, note)),
                _ => None,
            }
        }
        _ => None,
    };
    defmt::info!(
        "listener: answering the violations of {=u32} domain(s) with a switch to view 0 (forwarded: {=bool})",
        domains,
        forwarded.is_some()
    );
    match forwarded {
        Some((events, note)) => serve_forwarded(&mut altp2m, (1 << events) | (1 << note)),
        None => loop {
            next_events(&mut altp2m, true);
            service_runtime::sys::yield_now();
        },
    }
}

/// A forwarded event and its answer, in one page (the kernel translates it
/// once for both).
#[repr(C, align(512))]
struct Buffers {
    msg: [u8; MAX_MESSAGE],
    out: [u8; MAX_MESSAGE],
}

/// Answers each forwarded event (an exit, restricted by the kernel to a
/// plain answer) with a switch to view 0 and waits for the next in one
/// REPLY_RECV; fetches the events altp2m held when `altp2m-events` says so.
fn serve_forwarded(altp2m: &mut Client, mask: u64) -> ! {
    let mut io = Buffers {
        msg: [0; MAX_MESSAGE],
        out: [0; MAX_MESSAGE],
    };
    let back = ExitReply::resume(Response::RETRY, Some(0));
    let n = ipc_schema::exitcodec::encode_reply(&back, &mut io.out).unwrap_or(0);
    let fault_once = handle("fault-once").is_some() && service_runtime::generation() == 0;
    // The first three forwarded exits with the checks (the steady loop
    // below without them: the benchmark's path).
    let (mut token, mut seen) = (0, 0u32);
    while seen < 3 {
        token = next(altp2m, token, &mut io, n, mask);
        if token != 0 {
            seen += 1;
            if seen == 1 {
                check_forwards(token, altp2m.handle(), &mut io.msg);
                check_restricted(token);
            }
            if fault_once && seen == 3 {
                // (The boot tests' `fault-once`: the kernel must send the
                // exit back to altp2m, which handles it afresh.)
                panic!("faulting on purpose while holding a forwarded exit (fault-once)");
            }
        }
    }
    loop {
        token = next(altp2m, token, &mut io, n, mask);
    }
}

/// Answers `token` (0: nobody) with `io.out[..n]` and waits: the token of
/// the next forwarded exit, or 0 (held events fetched, or an error).
#[inline(always)]
fn next(altp2m: &mut Client, token: u64, io: &mut Buffers, n: usize, mask: u64) -> u64 {
    let Buffers { msg, out } = io;
    match ipc::reply_recv(token, &out[..n], mask, msg) {
        // Only forwarded events come on `events` (altp2m alone may call
        // it): the answer is the same for each.
        Ok(Event::Message(m)) => m.token,
        Ok(Event::Notified { .. }) => {
            next_events(altp2m, false);
            0
        }
        Err(e) => {
            defmt::warn!("listener: receive failed: {}", e);
            service_runtime::sys::yield_now();
            0
        }
    }
}

/// Once, on the first forwarded exit (`token`), before anything else: the
/// kernel must refuse each forward that is wrong in one way, with the
/// error that names it and nothing done: the exit still held (the
/// restricted answers then tried are refused as not plain, not as a bad
/// token) and the receive half not begun (the boot tests read the line
/// this logs).
fn check_forwards(token: u64, altp2m: u32, msg: &mut [u8; MAX_MESSAGE]) {
    use ipc_schema::syscall::{SysError, nr};
    let note = handle("altp2m-events").unwrap_or(u32::MAX);
    let other_exit = (token & !0xffff_ffff) | u64::from((token as u32).wrapping_add(1));
    let answer = [0u8; 8];
    let ok = answer.as_ptr() as u64;
    let mask = 1u64 << handle("events").unwrap_or(0);
    // (token, message, its length, handle, receive mask) and the refusal.
    let cases = [
        ((other_exit, ok, 8, altp2m, mask), SysError::BadToken),
        (
            (token & !(1 << 63), ok, 8, altp2m, mask),
            SysError::BadToken,
        ),
        ((token, ok, 8, note, mask), SysError::WrongKind),
        ((token, ok, 8, 250, mask), SysError::NoSuchHandle),
        (
            (token, ok, MAX_MESSAGE as u64 + 1, altp2m, mask),
            SysError::MessageTooLong,
        ),
        ((token, 0x10, 8, altp2m, mask), SysError::BadAddress),
        ((token, ok, 8, altp2m, 0), SysError::BadArgument),
        (
            (token, ok, 8, altp2m, mask | 1 << 63),
            SysError::MissingRight,
        ),
    ];
    let mut refused = 0u32;
    for ((t, at, len, h, m), want) in cases {
        let r = service_runtime::sys::call6(
            nr::REPLY_RECV,
            [
                t,
                at,
                len | (u64::from(h) + 1) << 32,
                m,
                msg.as_mut_ptr() as u64,
                MAX_MESSAGE as u64,
            ],
        );
        match r.ok() {
            Err(e) if e == want => refused += 1,
            Err(e) => defmt::error!("listener: a wrong forward refused with {}, not {}", e, want),
            Ok(_) => defmt::error!("listener: a wrong forward was taken ({})", want),
        }
    }
    defmt::info!(
        "listener: {=u32} of {=u32} wrong forwards refused, each with its own error",
        refused,
        cases.len() as u32
    );
}

/// Once, on the first forwarded exit (`token`), before its answer: the
/// kernel must refuse every answer that is not plain (an advance,
/// registers, an injection, a new RIP), the vCPU still waiting for the
/// plain one (the boot tests read the line this logs).
fn check_restricted(token: u64) {
    let plain = ExitReply::resume(Response::RETRY, None);
    let hostile = [
        ExitReply {
            response: Response::DONE,
            ..plain
        },
        ExitReply {
            regs: Some(ipc_schema::vmexit::ExitRegs::default()),
            ..plain
        },
        ExitReply {
            response: Response {
                inject: Some(ipc_schema::vmexit::Inject::Exception {
                    vector: 6,
                    error_code: None,
                }),
                ..Response::RETRY
            },
            ..plain
        },
        ExitReply {
            rip: Some(0),
            ..plain
        },
    ];
    let mut refused = 0u32;
    for h in &hostile {
        let mut out = [0u8; 64];
        let n = ipc_schema::exitcodec::encode_reply(h, &mut out).unwrap_or(0);
        match ipc::reply(token, &out[..n]) {
            Err(ipc_schema::syscall::SysError::BadArgument) => refused += 1,
            Err(e) => defmt::error!("listener: an answer that is not plain: {}", e),
            Ok(()) => defmt::error!("listener: a forwarded exit took an answer that is not plain"),
        }
    }
    defmt::info!(
        "listener: {=u32} of {=u32} answers that are not plain refused on a forwarded exit",
        refused,
        hostile.len() as u32
    );
}

/// `NextEvent` calls, each with the answer to the event before, while
/// they bring events (one round trip per event); `wait`: the call waits
/// for an event when there is none (a listener not forwarded to).
fn next_events(altp2m: &mut Client, wait: bool) {
    let mut answer = None;
    loop {
        // The call and its event by the short ways (fixed-width, no serde
        // on the path; of the event only its id, the answer being the
        // same for every event); any other reply through postcard.
        match altp2m.call_encoded(|out| short::encode_next_event(answer, out)) {
            Ok(bytes) => {
                if let Some(id) = short::event_reply_id(bytes) {
                    answer = Some((id, Action::SwitchView(0)));
                    continue;
                }
                match ipc::decode::<Result<AltReply, IpcError>>(bytes) {
                    // A forwarded listener's call with nothing held.
                    Ok(Ok(AltReply::Refused(ipc_schema::altp2m::AltError::NoSuchEvent)))
                        if !wait => {}
                    Ok(Err(e)) => defmt::warn!("listener: NextEvent: {}", e),
                    other => defmt::warn!(
                        "listener: NextEvent answered otherwise (refused: {=bool})",
                        matches!(other, Ok(Ok(AltReply::Refused(_))))
                    ),
                }
            }
            Err(e) => defmt::warn!("listener: NextEvent: {}", e),
        }
        return;
    }
}
