//! probe: a task that feeds the kernel and the other services bad input and
//! checks that each piece is refused cleanly, with the refusal it should
//! get, and that the services it hit still answer afterwards.
//!
//! Handles (see `tests/services.rs` for the manifest): `altp2m` and `exits`
//! (call), `domains-ro` (domains, read only). Slot 60 is empty on purpose.
//! Where the manifest gives them: `domain-a` (domain 1, read and views: the
//! scope of domain and view handles) and `view-limit` (domain 1, read and
//! views: the kernel's limit of 512 views, ALT-1).
//! Each check logs `probe: <check>: ok (...)` or `probe: FAIL <check>: ...`;
//! the task exits with the number of failed checks.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest};
use ipc_schema::ipc::{InterfaceId, IpcError};
use ipc_schema::syscall::{Handle, MAX_MESSAGE, SysError};
use ipc_schema::vmexit::ExitReply;
use service_runtime::ipc::{CallError, Client, call_raw, recv};
use service_runtime::{require, sys};

service_runtime::entry!(main);

/// Random messages sent to each fuzzed endpoint.
const FUZZ: u32 = 2000;

struct Probe {
    failed: u64,
}

impl Probe {
    fn check(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            defmt::info!("probe: {=str}: ok ({=str})", name, detail);
        } else {
            defmt::error!("probe: FAIL {=str}: {=str}", name, detail);
            self.failed += 1;
        }
    }

    fn expect_sys(&mut self, name: &str, got: Result<usize, SysError>, want: SysError) {
        match got {
            Err(e) if e == want => defmt::info!("probe: {=str}: ok (refused with {})", name, e),
            other => {
                defmt::error!("probe: FAIL {=str}: expected {}, got {}", name, want, other);
                self.failed += 1;
            }
        }
    }
}

/// xorshift64: reproducible random bytes without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Sends `FUZZ` random messages to `h`; `valid(reply)` says whether a reply
/// is an acceptable answer. Returns (answered, refused as malformed, bad).
fn fuzz(h: Handle, seed: u64, valid: impl Fn(&[u8]) -> Option<bool>) -> (u32, u32, u32) {
    let mut rng = Rng(seed);
    let (mut answered, mut malformed, mut bad) = (0, 0, 0);
    let mut msg = [0u8; MAX_MESSAGE];
    let mut reply = [0u8; MAX_MESSAGE];
    for i in 0..FUZZ {
        // Mostly short messages (where valid encodings live), some long.
        let len = if i % 8 == 0 {
            (rng.next() % MAX_MESSAGE as u64) as usize
        } else {
            (rng.next() % 24) as usize
        };
        for b in &mut msg[..len] {
            *b = rng.next() as u8;
        }
        match call_raw(h, &msg[..len], &mut reply) {
            Ok(n) => match valid(&reply[..n]) {
                Some(true) => answered += 1,
                Some(false) => malformed += 1,
                None => bad += 1,
            },
            Err(_) => bad += 1,
        }
    }
    (answered, malformed, bad)
}

/// Whether `reply` is `Result<T, IpcError>`: Some(true) an answer,
/// Some(false) a refusal as malformed, None anything else.
fn answer_or_malformed<T: for<'de> serde::Deserialize<'de>>(reply: &[u8]) -> Option<bool> {
    match postcard::from_bytes::<Result<T, IpcError>>(reply) {
        Ok(Ok(_)) => Some(true),
        Ok(Err(IpcError::Malformed)) => Some(false),
        _ => None,
    }
}

/// Checks of a handle to domain 1 (`domain-a`, with read and views).
fn domain_scope(p: &mut Probe, dom: Handle) {
    use ipc_schema::syscall::{EptOp, EptResult, MAX_EPT_OPS, ObjectKind, rights};
    p.check(
        "domain handle on its domain",
        sys::domain_info(dom, 1).is_ok(),
        "DOMAIN_INFO of domain 1 answered",
    );
    p.expect_sys(
        "domain handle on another domain",
        sys::domain_info(dom, 2).map(|_| 0),
        SysError::OutOfScope,
    );
    p.expect_sys(
        "a domain handle cannot make domain handles",
        sys::derive(dom, ObjectKind::Domain as u64, 2).map(|h| h as usize),
        SysError::BadArgument,
    );
    let view = match sys::view_create(dom, 1) {
        Ok(v) => v,
        Err(e) => {
            defmt::error!("probe: FAIL a view in domain 1: {}", e);
            p.failed += 1;
            return;
        }
    };
    let Ok(vh) = sys::derive(dom, ObjectKind::View as u64, u64::from(view)) else {
        defmt::error!("probe: FAIL deriving a view handle");
        p.failed += 1;
        return;
    };
    let ept = |h: Handle, view: u16| -> Result<usize, SysError> {
        let mut ops: ipc_schema::ipc::BoundedVec<EptOp, MAX_EPT_OPS> =
            ipc_schema::ipc::BoundedVec::new();
        let _ = ops.0.push(EptOp::Query { view, gfn: 1 });
        let mut bytes = [0u8; 32];
        let n = postcard::to_slice(&ops, &mut bytes).map_or(0, |b| b.len());
        let mut out = [0u8; 64];
        let r = sys::ept_ops(h, 1, &bytes[..n], &mut out)?;
        match postcard::from_bytes::<ipc_schema::ipc::BoundedVec<EptResult, MAX_EPT_OPS>>(&out[..r])
        {
            Ok(v) if v.0.len() == 1 => Ok(r),
            _ => Err(SysError::BadArgument),
        }
    };
    p.check(
        "view handle on its view",
        ept(vh, view).is_ok(),
        "an EPT query of its view answered",
    );
    p.expect_sys(
        "view handle on the host p2m",
        ept(vh, 0),
        SysError::OutOfScope,
    );
    p.expect_sys(
        "view handle creating a view",
        sys::view_create(vh, 1).map(usize::from),
        SysError::OutOfScope,
    );
    let read_only = sys::derive_with(dom, ObjectKind::View as u64, u64::from(view), rights::READ);
    match read_only {
        Ok(h) => p.expect_sys(
            "a view handle without the views right",
            ept(h, view),
            SysError::MissingRight,
        ),
        Err(e) => {
            defmt::error!("probe: FAIL deriving a read-only view handle: {}", e);
            p.failed += 1;
        }
    }
    let _ = sys::view_destroy(dom, 1, view);
}

/// The kernel's limit of views per domain (issue 13, point 8; ALT-1:
/// view 0 and 511 alternate views, the EPTP list's 512 slots), reached
/// through `view-limit`, a handle on domain 1 with the `views` right: the
/// altp2m service's own quota (64 views a domain) keeps an agent below it,
/// so only a service that holds the right itself can get there. Views are
/// created until the kernel refuses one (`NoResources`), which must be at
/// exactly 511; the altp2m service, which knows none of them, then answers
/// a request for a view with `TooManyViews`; a view destroyed makes room for
/// exactly one more (the kernel reuses its slot), and for altp2m's; every
/// view is destroyed again and the domain runs on. (Each empty view takes
/// one table of the domain's quota: the test checks that the quota never
/// refused one first.)
fn view_limit(p: &mut Probe, dom: Handle, altp2m: Handle) {
    use ipc_schema::hypercall::{HcError, MAX_VIEWS, Reply, Request};
    use ipc_schema::syscall::DomainState;
    const DOMAIN: u16 = 1;
    let mut alt = Client::new(altp2m, ALTP2M);
    let alt_create = |alt: &mut Client| {
        alt.call::<_, AltReply>(&AltRequest::External {
            domain: DOMAIN,
            request: Request::ViewCreate {
                default_access: None,
            },
        })
    };
    // Every view the probe holds, by index.
    let mut held = [false; MAX_VIEWS as usize];
    let mut n = 0u32;
    let refused = loop {
        match sys::view_create(dom, DOMAIN) {
            Ok(v) if usize::from(v) < held.len() && !held[usize::from(v)] && v != 0 => {
                held[usize::from(v)] = true;
                n += 1;
            }
            Ok(v) => {
                defmt::error!(
                    "probe: FAIL view limit: VIEW_CREATE gave view {=u16} again",
                    v
                );
                p.failed += 1;
                break None;
            }
            Err(e) => break Some(e),
        }
    };
    defmt::info!(
        "probe: view limit: {=u32} views created in domain 1, then {}",
        n,
        refused
    );
    p.check(
        "the kernel refuses a view past its limit",
        refused == Some(SysError::NoResources) && n == u32::from(MAX_VIEWS) - 1,
        "NoResources at exactly 511 alternate views",
    );
    let full = alt_create(&mut alt);
    p.check(
        "altp2m asked for a view with the kernel's slots full",
        full == Ok(AltReply::Reply(Reply::Error(HcError::TooManyViews))),
        "answered TooManyViews",
    );
    // One destroyed: its slot, and only it, is free again.
    let middle: u16 = 256;
    let freed = sys::view_destroy(dom, DOMAIN, middle);
    let again = sys::view_create(dom, DOMAIN);
    let past = sys::view_create(dom, DOMAIN);
    p.check(
        "a view destroyed makes room for one more",
        freed.is_ok() && again == Ok(middle) && past == Err(SysError::NoResources),
        "its slot given again, the next refused",
    );
    // And altp2m's request goes through where a slot is free.
    let freed = sys::view_destroy(dom, DOMAIN, middle);
    let made = alt_create(&mut alt);
    let through_altp2m = match made {
        Ok(AltReply::Reply(Reply::View(v))) => Some(v),
        _ => None,
    };
    let undone = through_altp2m.map(|view| {
        alt.call::<_, AltReply>(&AltRequest::External {
            domain: DOMAIN,
            request: Request::ViewDestroy { view },
        })
    });
    p.check(
        "altp2m makes a view in a freed slot",
        freed.is_ok()
            && through_altp2m == Some(middle)
            && undone == Some(Ok(AltReply::Reply(Reply::Done))),
        "ViewCreate answered with the freed slot, ViewDestroy done",
    );
    held[usize::from(middle)] = false;
    let mut destroyed = 0u32;
    for (v, h) in held.iter().enumerate() {
        if *h && sys::view_destroy(dom, DOMAIN, v as u16).is_ok() {
            destroyed += 1;
        }
    }
    let state = sys::domain_info(dom, DOMAIN).map(|(s, _, _)| s);
    p.check(
        "every view destroyed, the domain running on",
        destroyed == n - 1 && state == Ok(DomainState::Running as u64),
        "510 destroyed, DOMAIN_INFO says running",
    );
    let one = sys::view_create(dom, DOMAIN);
    let gone = one.map(|v| sys::view_destroy(dom, DOMAIN, v));
    p.check(
        "views can be made again",
        one == Ok(1) && gone == Ok(Ok(())),
        "view 1 created and destroyed",
    );
}

fn main() -> ! {
    let mut p = Probe { failed: 0 };
    let altp2m = require("altp2m");
    let exits = require("exits");
    let domains_ro = require("domains-ro");
    let mut reply = [0u8; MAX_MESSAGE];

    // The kernel's checks.
    p.expect_sys(
        "call through an empty handle slot",
        call_raw(60, b"hello", &mut reply),
        SysError::NoSuchHandle,
    );
    p.expect_sys(
        "call through a domains handle",
        call_raw(domains_ro, b"hello", &mut reply),
        SysError::WrongKind,
    );
    p.expect_sys(
        "view create without the views right",
        sys::view_create(domains_ro, 1).map(usize::from),
        SysError::MissingRight,
    );
    let big = [0u8; MAX_MESSAGE + 44];
    p.expect_sys(
        "a message over the 256-byte limit",
        call_raw(altp2m, &big, &mut reply),
        SysError::MessageTooLong,
    );
    let mut ping = [0u8; 8];
    let n = postcard::to_slice(&AltRequest::Ping, &mut ping).map_or(0, |b| b.len());
    let mut tiny = [0u8; 1];
    p.expect_sys(
        "a reply longer than the caller's buffer",
        call_raw(altp2m, &ping[..n], &mut tiny),
        SysError::ReplyTooLong,
    );
    let bad_msg = sys::call(
        ipc_schema::syscall::nr::CALL,
        &[u64::from(altp2m), 0x1000, 8, reply.as_mut_ptr() as u64, 64],
    );
    p.expect_sys(
        "a message at an unmapped address",
        bad_msg.ok().map(|r| r.rdi as usize),
        SysError::BadAddress,
    );
    let mut buf = [0u8; 64];
    p.expect_sys(
        "receive on a handle without the receive right",
        recv(1 << altp2m, &mut buf).map(|_| 0),
        SysError::MissingRight,
    );

    // The services' checks: binding with another version of an interface.
    let other = InterfaceId::new::<(u32, u64)>("parallax/altp2m");
    match Client::new(altp2m, other).call::<_, AltReply>(&AltRequest::Ping) {
        Err(CallError::WrongKey { server, client }) => p.check(
            "bind with another schema key",
            server == ALTP2M.key.to_bytes() && client == other.key.to_bytes(),
            "refused, naming both keys",
        ),
        other => {
            defmt::error!("probe: FAIL bind with another schema key: {}", other.err());
            p.failed += 1;
        }
    }
    match call_raw(altp2m, &[0xff, 0xff, 0xff, 0xff, 0x0f], &mut reply) {
        Ok(n) => p.check(
            "a request that does not decode",
            matches!(
                postcard::from_bytes::<Result<AltReply, IpcError>>(&reply[..n]),
                Ok(Err(IpcError::Malformed))
            ),
            "answered Malformed",
        ),
        Err(e) => {
            defmt::error!(
                "probe: FAIL a request that does not decode: the call failed: {}",
                e
            );
            p.failed += 1;
        }
    }

    // A handle to one domain reaches that domain only; one to a view, that
    // view only; and a derived handle has no more rights than asked for.
    if let Some(dom) = service_runtime::handle("domain-a") {
        domain_scope(&mut p, dom);
    }
    if let Some(dom) = service_runtime::handle("view-limit") {
        view_limit(&mut p, dom, altp2m);
    }

    // Random messages: every one answered, none crashes a service.
    let (ok, malformed, bad) = fuzz(altp2m, 0x5eed_0001, answer_or_malformed::<AltReply>);
    defmt::info!(
        "probe: {=u32} random messages to altp2m: {=u32} answered, {=u32} refused as malformed, {=u32} otherwise",
        FUZZ,
        ok,
        malformed,
        bad
    );
    p.check(
        "fuzzing altp2m",
        bad == 0,
        "every random message got an answer",
    );
    let (ok, malformed, bad) = fuzz(exits, 0x5eed_0002, |r| {
        if ipc_schema::exitcodec::decode_reply(r).is_some() {
            Some(true)
        } else {
            answer_or_malformed::<ExitReply>(r).filter(|a| !a)
        }
    });
    defmt::info!(
        "probe: {=u32} random messages to the vmm's exit endpoint: {=u32} answered, {=u32} refused as malformed, {=u32} otherwise",
        FUZZ,
        ok,
        malformed,
        bad
    );
    p.check(
        "fuzzing the vmm",
        bad == 0,
        "every random message got an answer",
    );
    let alive = Client::new(altp2m, ALTP2M).call::<_, AltReply>(&AltRequest::Ping);
    p.check(
        "altp2m still answers",
        alive == Ok(AltReply::Pong),
        "Ping answered Pong",
    );

    if p.failed == 0 {
        defmt::info!("probe: all checks passed");
    } else {
        defmt::error!("probe: {=u64} check(s) failed", p.failed);
    }
    sys::exit(p.failed)
}
