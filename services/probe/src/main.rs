//! probe: a task that feeds the kernel and the other services bad input and
//! checks that each piece is refused cleanly, with the refusal it should
//! get, and that the services it hit still answer afterwards.
//!
//! Handles (see `tests/services.rs` for the manifest): `altp2m` and `exits`
//! (call), `domains-ro` (domains, read only). Slot 60 is empty on purpose.
//! Where the manifest gives them: `domain-a` (domain 1, read and views: the
//! scope of domain and view handles) and `view-limit` (domain 1, read and
//! views: the kernel's limit of 512 views, ALT-1), `open` (domain 2,
//! read: foreign mappings and their bad input, FM-1) and `vault` (domain
//! 1, protected, read: mapped only while paused, FM-2). Started with a
//! `hold-open` handle (domain 2, read) instead, it is the `mapper`: it
//! holds foreign mappings of domain 2 once the host pauses it, and faults
//! when the host writes a marker into one (FM-3: torn down when it dies).
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
/// The introspect service from a service: domain 1's memory read (equal
/// to what DOMAIN_READ gives) and its registers, which its manifest entry
/// lets the probe `read`; a write, which it does not, refused.
fn introspect(p: &mut Probe, intro: Handle, domains_ro: Handle) {
    use ipc_schema::introspect::{Address, INTROSPECT, IntroError, IntroReply, IntroRequest};
    use ipc_schema::ipc::BoundedVec;
    use ipc_schema::syscall::regs;
    let mut c = Client::new(intro, INTROSPECT);
    let read = IntroRequest::Read {
        domain: 1,
        at: Address::Physical(0x10_0000),
        len: 64,
    };
    let mut direct = [0u8; 64];
    let copied = sys::domain_read(domains_ro, 1, 0x10_0000, &mut direct);
    match c.call::<_, IntroReply>(&read) {
        Ok(IntroReply::Bytes(b)) => p.check(
            "a service reads guest memory through introspect",
            copied.is_ok() && b.0[..] == direct[..],
            "64 bytes at 1 MiB, equal to DOMAIN_READ's",
        ),
        other => p.check(
            "a service reads guest memory through introspect",
            false,
            if other.is_err() {
                "no answer"
            } else {
                "another answer"
            },
        ),
    }
    let ok = match c.call::<_, IntroReply>(&IntroRequest::Regs {
        domain: 1,
        vcpu: 0,
        half: 1,
    }) {
        Ok(IntroReply::Regs { first, values }) => {
            first == 16 && values[regs::CR0 - 16] & 1 == 1 && values[regs::RIP - 16] != 0
        }
        _ => false,
    };
    p.check(
        "a service reads registers through introspect",
        ok,
        "RIP set, CR0.PE set",
    );
    let write = IntroRequest::Write {
        domain: 1,
        at: Address::Physical(0x10_0000),
        bytes: BoundedVec(heapless::Vec::from_slice(&[0x90]).unwrap_or_default()),
    };
    let refused = matches!(
        c.call::<_, IntroReply>(&write),
        Ok(IntroReply::Refused(IntroError::NotAllowed))
    );
    p.check(
        "a write the manifest does not allow is refused",
        refused,
        "NotAllowed",
    );
}

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

/// Where the probe maps guest pages.
const FOREIGN_VA: u64 = ipc_schema::syscall::layout::MAP_BASE + (1 << 28);
const PAGE: u64 = 4096;
/// What the host writes (through the introspect service) into a page the
/// probe or the mapper holds mapped, at offset 0x10, to move it on.
const MARKER: &[u8; 16] = b"unmap-me-please!";

/// Whether the marker is at offset 0x10 of the page mapped at `va`.
fn marked(va: u64) -> bool {
    let mut now = [0u8; 16];
    for (i, b) in now.iter_mut().enumerate() {
        // Safety: `va` is a page this process holds foreign-mapped (read);
        // the guest's or the host's writes to it are plain memory.
        *b = unsafe { core::ptr::read_volatile((va + 0x10 + i as u64) as *const u8) };
    }
    &now == MARKER
}

/// Waits until domain `id` is paused.
fn until_paused(dom: Handle, id: u16) {
    while !matches!(sys::domain_info(dom, id), Ok((2, _, _))) {
        sys::yield_now();
    }
}

/// FOREIGN_MAP and FOREIGN_UNMAP on the running, unprotected domain 2 (the
/// handle `open`, read only): a mapping shows the guest's memory and is
/// counted; every kind of bad input is refused cleanly, nothing counted.
fn foreign_maps(p: &mut Probe, open: Handle, domains_ro: Handle) {
    const OPEN: u16 = 2;
    const VA: u64 = FOREIGN_VA;
    let pages = || sys::domain_foreign(domains_ro, OPEN).map_or(u32::MAX, |f| f.pages);
    let before = pages();
    let map = sys::foreign_map(open, OPEN, 0x100, 3, VA, false);
    let mut copy = [0u8; 64];
    let read = sys::domain_read(open, OPEN, 0x10_0000, &mut copy);
    let mut seen = [0u8; 64];
    if map.is_ok() {
        for (i, b) in seen.iter_mut().enumerate() {
            // Safety: mapped just above, readable.
            *b = unsafe { core::ptr::read_volatile((VA + i as u64) as *const u8) };
        }
    }
    p.check(
        "a foreign mapping shows the guest's memory",
        map.is_ok() && read.is_ok() && seen == copy && copy != [0; 64],
        "3 pages at gfn 0x100, the same bytes as DOMAIN_READ",
    );
    let counted = pages();
    p.check(
        "a foreign mapping is counted in its domain",
        counted == before + 3,
        "DOMAIN_INFO's count up by 3",
    );
    p.expect_sys(
        "a foreign mapping over a mapped va",
        sys::foreign_map(open, OPEN, 0x200, 1, VA + PAGE, false).map(|()| 0),
        SysError::BadArgument,
    );
    p.expect_sys(
        "FRAMES_UNMAP over a foreign mapping",
        sys::frames_unmap(VA, 1).map(|()| 0),
        SysError::BadArgument,
    );
    p.expect_sys(
        "FOREIGN_UNMAP of part of a mapping",
        sys::foreign_unmap(VA, 1).map(|()| 0),
        SysError::BadArgument,
    );
    p.expect_sys(
        "FOREIGN_UNMAP where nothing is mapped",
        sys::foreign_unmap(VA + 64 * PAGE, 1).map(|()| 0),
        SysError::BadArgument,
    );
    let gone = sys::foreign_unmap(VA, 3);
    p.check(
        "unmapped, the count is back",
        gone.is_ok() && pages() == before,
        "FOREIGN_UNMAP of the 3 pages",
    );
    // Bad input: none of it maps or counts anything.
    /// (check, handle, domain, gfn, count, va, writable, refusal).
    type Refusal = (&'static str, Handle, u16, u64, u64, u64, bool, SysError);
    let refusals: [Refusal; 14] = [
        (
            "foreign map of 0 pages",
            open,
            OPEN,
            0x100,
            0,
            VA,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map of 513 pages",
            open,
            OPEN,
            0x100,
            513,
            VA,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map of u64::MAX pages",
            open,
            OPEN,
            0x100,
            u64::MAX,
            VA,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map past RAM",
            open,
            OPEN,
            0x1000,
            1,
            VA,
            false,
            SysError::BadAddress,
        ),
        (
            "foreign map running past RAM",
            open,
            OPEN,
            0xfff,
            2,
            VA,
            false,
            SysError::BadAddress,
        ),
        (
            "foreign map at gfn u64::MAX",
            open,
            OPEN,
            u64::MAX,
            1,
            VA,
            false,
            SysError::BadAddress,
        ),
        (
            "foreign map below the window",
            open,
            OPEN,
            0x100,
            1,
            0x1000,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map across the window's end",
            open,
            OPEN,
            0x100,
            2,
            ipc_schema::syscall::layout::MAP_END - PAGE,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map at an unaligned va",
            open,
            OPEN,
            0x100,
            1,
            VA + 8,
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map wrapping the address space",
            open,
            OPEN,
            0x100,
            2,
            !(PAGE - 1),
            false,
            SysError::BadArgument,
        ),
        (
            "foreign map writable without write",
            open,
            OPEN,
            0x100,
            1,
            VA,
            true,
            SysError::MissingRight,
        ),
        (
            "foreign map writable through domains-ro",
            domains_ro,
            OPEN,
            0x100,
            1,
            VA,
            true,
            SysError::MissingRight,
        ),
        (
            "foreign map of another domain",
            open,
            1,
            0x100,
            1,
            VA,
            false,
            SysError::OutOfScope,
        ),
        (
            "foreign map of no domain",
            domains_ro,
            9,
            0x100,
            1,
            VA,
            false,
            SysError::BadArgument,
        ),
    ];
    for (name, h, id, gfn, count, va, writable, want) in refusals {
        p.expect_sys(
            name,
            sys::foreign_map(h, id, gfn, count, va, writable).map(|()| 0),
            want,
        );
    }
    // The table's limit: 16 mappings a process.
    let mut made = 0;
    while made < 16
        && sys::foreign_map(open, OPEN, 0x100 + made, 1, VA + made * 2 * PAGE, false).is_ok()
    {
        made += 1;
    }
    p.expect_sys(
        "a 17th foreign mapping",
        sys::foreign_map(open, OPEN, 0x200, 1, VA + 64 * PAGE, false).map(|()| 0),
        SysError::NoResources,
    );
    let full = pages();
    for i in 0..made {
        let _ = sys::foreign_unmap(VA + i * 2 * PAGE, 1);
    }
    p.check(
        "16 foreign mappings a process, then refused",
        made == 16 && full == before + 16 && pages() == before,
        "16 made and counted, the 17th NoResources, all undone",
    );
}

/// The guest's tick count in the first 8 bytes of the page at `va` (the
/// `ticker` guest's `grant=`).
fn ticks_at(va: u64) -> u64 {
    // Safety: `va` is a page of this process, mapped (read only) by a
    // FOREIGN_MAP this function's callers hold.
    unsafe { core::ptr::read_volatile(va as *const u64) }
}

/// Yields until the tick count at `va` moves past `from` (at most about
/// `tries` yields): whether it did.
fn ticks_move(va: u64, from: u64, tries: u32) -> bool {
    (0..tries).any(|_| {
        sys::yield_now();
        ticks_at(va) > from
    })
}

/// The protected domain 1 (`vault`, read): FM-2's exception first, the page
/// the guest grants (gfn 0xe00, the `ticker`'s `grant=`), mapped while it
/// runs and held throughout; any other page not mapped while it runs; once
/// the host pauses it, 2 pages mapped and held until the host writes the
/// marker into them (through the introspect service: the host's unpause is
/// refused meanwhile), then unmapped; the host's unpause then succeeds with
/// the granted page still mapped, whose tick count moves on.
fn protected(p: &mut Probe, vault: Handle) {
    const VAULT: u16 = 1;
    const GRANTED: u64 = 0xe00;
    let granted_va = FOREIGN_VA + 16 * PAGE;
    // The guest grants its page as it starts: wait for it.
    let mut granted = sys::foreign_map(vault, VAULT, GRANTED, 1, granted_va, false);
    for _ in 0..100_000 {
        if granted.is_ok() {
            break;
        }
        sys::yield_now();
        granted = sys::foreign_map(vault, VAULT, GRANTED, 1, granted_va, false);
    }
    p.check(
        "the page a running protected domain grants is mapped",
        granted.is_ok(),
        "gfn 0xe00, FM-2's exception",
    );
    // The guest's tick count in its granted page moves on (checked as `what`).
    let ticking = |p: &mut Probe, what: &str, tries: u32| {
        let t = ticks_at(granted_va);
        p.check(
            what,
            ticks_move(granted_va, t, tries),
            "its tick count moves",
        );
    };
    if granted.is_ok() {
        ticking(
            p,
            "the guest's writes to its granted page are seen while it runs",
            1_000_000,
        );
    }
    p.expect_sys(
        "a running protected domain's ungranted page is not mapped",
        sys::foreign_map(vault, VAULT, 0xf00, 1, FOREIGN_VA, false).map(|()| 0),
        SysError::Busy,
    );
    p.expect_sys(
        "a range reaching past the granted page is not mapped",
        sys::foreign_map(vault, VAULT, GRANTED, 2, FOREIGN_VA, false).map(|()| 0),
        SysError::Busy,
    );
    defmt::info!("probe: waiting for the vault to be paused");
    until_paused(vault, VAULT);
    let map = sys::foreign_map(vault, VAULT, 0xf00, 2, FOREIGN_VA, false);
    p.check(
        "a paused protected domain is mapped",
        map.is_ok(),
        "2 pages at gfn 0xf00",
    );
    if map.is_err() {
        return;
    }
    defmt::info!("probe: holding 2 pages of the vault at gfn 0xf00");
    while !marked(FOREIGN_VA) {
        sys::yield_now();
    }
    p.check(
        "the host's write is seen through the mapping",
        true,
        "the marker at gfn 0xf00 + 0x10",
    );
    let gone = sys::foreign_unmap(FOREIGN_VA, 2);
    p.check("the vault's pages unmapped", gone.is_ok(), "FOREIGN_UNMAP");
    defmt::info!("probe: the vault's mapping is gone");
    if granted.is_ok() {
        // The host unpauses it with the granted page still mapped.
        ticking(
            p,
            "unpaused with its granted page mapped, the guest ticks on",
            10_000_000,
        );
        let gone = sys::foreign_unmap(granted_va, 1);
        p.check("the granted page unmapped", gone.is_ok(), "FOREIGN_UNMAP");
    }
}

/// The `mapper`: holds 6 pages of domain 2 once the host pauses it, then,
/// when the host writes the marker into the last, writes to its read-only
/// mapping and faults.
fn mapper(open: Handle) -> ! {
    const OPEN: u16 = 2;
    defmt::info!("probe: mapper waiting for domain 2 to be paused");
    until_paused(open, OPEN);
    let mut held = 0;
    for (i, (gfn, count)) in [(0x100, 3), (0xe00, 2), (0xf00, 1)].into_iter().enumerate() {
        let va = FOREIGN_VA + i as u64 * 16 * PAGE;
        if sys::foreign_map(open, OPEN, gfn, count, va, false).is_ok() {
            held += count;
        }
    }
    defmt::info!("probe: mapper holds {=u64} pages of domain 2", held);
    let last = FOREIGN_VA + 2 * 16 * PAGE;
    while !marked(last) {
        sys::yield_now();
    }
    defmt::info!("probe: mapper writes to its read-only mapping");
    // Safety: `last` is a page of this process, mapped read-only: the
    // write faults (the point: the kernel stops the mapper and tears its
    // mappings down) and changes no memory.
    unsafe { core::ptr::write_volatile(last as *mut u8, 1) };
    defmt::error!("probe: FAIL the mapper wrote to a read-only foreign mapping");
    sys::exit(1)
}

fn main() -> ! {
    if let Some(open) = service_runtime::handle("hold-open") {
        mapper(open);
    }
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
    // Introspection from a service (issue 13, points 1, 3 and 6).
    if let Some(intro) = service_runtime::handle("introspect") {
        introspect(&mut p, intro, domains_ro);
    }
    // Foreign mappings (FM-1..FM-3); the protected domain first, whose
    // refusal is then the first FOREIGN_MAP refusal logged.
    if let Some(vault) = service_runtime::handle("vault") {
        protected(&mut p, vault);
    }
    if let Some(open) = service_runtime::handle("open") {
        foreign_maps(&mut p, open, domains_ro);
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
