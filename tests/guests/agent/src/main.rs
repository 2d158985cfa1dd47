//! An altp2m agent (issue 5, ALT-2..ALT-10).
//!
//! Command line `checks` (the default): the in-guest agent.
//! 1. `Capabilities`; two views v and w.
//! 2. Seed 004: in w, `SetSuppressVe { suppress: true }` on a gfn w never
//!    touched succeeds, and the raw entry keeps the host's frame (a new
//!    view is a copy of the host p2m) while the effective one is the host's.
//! 3. Raw and effective queries (ALT-8); an access set in a new view shows
//!    in the effective entry and the raw one.
//! 4. `ChangeGfn` A -> B in v; A read through v (VMFUNC, or the hypercall
//!    without it) gives B's marker; reset gives A's again.
//! 5. Refusals (ALT issue point 9): a view that does not exist, a gfn
//!    outside the domain, a view index over 511, write-without-read, an
//!    empty range, destroying the view the vCPU runs on. Each is refused
//!    with its reason and the guest goes on.
//! 6. A range over all of RAM made read-execute in v, checked, then undone.
//! 7. A page-table walk through a read-execute page is a read (EPT A/D
//!    flags off while PML does not log: issue 13, point 8).
//! 8. rx2rw and n2rwx pages relax at their first write and access.
//!
//! Prints `agent: all checks passed` and exits 0, or `FAIL: ...` lines and 1.
//!
//! Command line `watch=N`: the page an external agent watches. Prints
//! `watch me: gfn 0x...` (which `cargo hv run` takes as a request to watch
//! it), waits until the host puts the vCPU in a view other than 0, and
//! writes the page N times (each write that the view forbids waits for the
//! host's answer). With `limited` too, it then waits until the host sets the
//! domain's mode to limited and checks that a change is refused while a
//! query is not. With `burst`, the writes follow each other with nothing
//! between (no line after each: the next write comes microseconds after
//! the host's answer), and one line says the last is done. With nobody to watch it (the image booted without `cargo
//! hv run`, e.g. on hardware), it gives up after `wait=S` seconds (default
//! 60; the TSC frequency from CPUID leaf 0x40000010), says so and exits 3.
//!
//! Command line `flood` (issue 9, point 1): a hostile agent. It makes
//! change_gfns (every gfn of RAM from 8 MiB up, in one view after another)
//! until the altp2m service refuses one, which must be `QuotaExceeded` at
//! exactly the quota it names; frees one and makes one more; then creates
//! views until refused, which must be `QuotaExceeded` for views. Prints
//! `agent: flood: refused at its quotas` and exits 0, or `FAIL: ...` and 1.
//!
//! Command line `unavailable`: asks the altp2m service for its mode over and
//! over (printing `agent: N answers` every 100) until a request fails, which
//! must be at once and with `ServiceUnavailable` (the service is held);
//! the view-switch hypercall must then be refused too. Exits 0.
//!
//! Command line `restart` (issue 9, point 7): remaps A to B's frame in a new
//! view and runs in it, makes its page W2 read-only in the host p2m, and
//! prints `restart: ready` with the view and the gfn of W. It waits until
//! the host has made W read-execute in that view (as an external agent, with
//! the `pause` policy), writes W (the vCPU waits, no listener being
//! attached), and when the write goes through (altp2m started again) checks
//! that the service's new, empty model is what the guest sees: in view 0,
//! W and W2 writable, A its own page, the old view gone, and new views work.
//!
//! Command line `viewpage` (issue 9, point 8): the hypervisor reaches the
//! hypercall's request page as the guest does, through its view. In a view
//! where the page is read-only, a request hypercall is refused with
//! `BadAddress` and the page is unchanged; in a view where change_gfn puts
//! another frame at the page's gfn, the request is read from and the reply
//! written to that frame. Prints `agent: viewpage: ok` and exits 0.
//!
//! Command line `introspect` (issue 13, points 1 and 6): the guest the
//! host reads, writes and translates through (`introspect.rs`).
//!
//! Command line `straddle`: one write that straddles two pages, for an
//! external agent that restricts both. Prints `straddle me: gfns 0x...
//! and 0x...`, waits (as `watch=N`) to be put in a view, writes 8 bytes
//! across the two pages in one instruction (`agent: straddling write
//! done`), then the first page alone (`agent: first page written
//! again`), and exits 0.
//!
//! Command line `propagate` (issue 13, point 8; ALT-9): host p2m changes
//! reach every view's real entries, a view's own settings kept
//! (`propagate.rs`). Prints `agent: propagate: all checks passed`.
#![no_std]
#![no_main]

mod introspect;
mod propagate;

use guest_runtime::abi::{Access, HcError, Mode, Quota, Relaxing, Reply, Request, Status};
use guest_runtime::hypercall::{self, HelperError, call, call_done, get_entry};
use guest_runtime::{MultibootInfo, Pages, println, view_switch, vmfunc_switch};

guest_runtime::entry!(main);

static A: Pages<1> = Pages::new();
static B: Pages<1> = Pages::new();
static W: Pages<1> = Pages::new();
static W2: Pages<1> = Pages::new();
static NEVER: Pages<1> = Pages::new();
static RX2RW: Pages<1> = Pages::new();
static N2RWX: Pages<1> = Pages::new();
static STRADDLED: Pages<2> = Pages::new();
const MARK_A: u64 = 0xaaaa_0000_0000_000a;
const MARK_B: u64 = 0xbbbb_0000_0000_000b;

/// The value of `key=` on the command line.
fn arg(cmdline: &str, key: &str) -> Option<u64> {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

struct Checks(u32);

impl Checks {
    fn check(&mut self, ok: bool, what: core::fmt::Arguments<'_>) {
        if ok {
            println!("ok: {what}");
        } else {
            println!("FAIL: {what}");
            self.0 += 1;
        }
    }

    /// `request` is refused with `want`.
    fn refused(&mut self, request: &Request, want: HcError) {
        let got = call(request);
        let ok = matches!(&got, Err(hypercall::CallError::Refused(Some(e))) if *e == want);
        self.check(
            ok,
            format_args!("{request:?} refused with {want:?} (got {got:?})"),
        );
    }
}

fn fatal(what: &str, e: impl core::fmt::Display) -> u32 {
    println!("FAIL: {what}: {e}");
    1
}

/// Switches to `view` with VMFUNC where the CPU has it, else by hypercall.
fn switch(vmfunc: bool, view: u16) -> bool {
    if vmfunc {
        vmfunc_switch(u32::from(view));
        true
    } else {
        view_switch(view) == Status::Ok
    }
}

fn main(info: &MultibootInfo) -> u32 {
    let cmdline = info.cmdline().unwrap_or("");
    if let Some(n) = arg(cmdline, "watch") {
        let word = |w: &str| cmdline.split(' ').any(|x| x == w);
        let wait = arg(cmdline, "wait").unwrap_or(60);
        return watch(n, word("limited"), word("burst"), wait);
    }
    let has = |word: &str| cmdline.split(' ').any(|w| w == word);
    if has("flood") {
        return flood(info);
    }
    if has("unavailable") {
        return unavailable();
    }
    if has("restart") {
        return restart();
    }
    if has("viewpage") {
        return viewpage();
    }
    if has("straddle") {
        return straddle(arg(cmdline, "wait").unwrap_or(60));
    }
    if has("propagate") {
        return propagate::propagate();
    }
    if has("introspect") {
        return introspect::introspect(has("vmi"));
    }
    checks(info)
}

/// The first gfn the flood remaps (RAM the guest does not use otherwise).
const FLOOD_BASE: u64 = 0x800;

/// The gfn past the end of the guest's RAM.
fn ram_end(info: &MultibootInfo) -> u64 {
    info.memory_map()
        .iter()
        .filter(|r| r.is_available())
        .map(|r| r.end())
        .max()
        .unwrap_or(0)
        / 4096
}

fn flood(info: &MultibootInfo) -> u32 {
    let end = ram_end(info);
    let mut views = 0u32;
    let mut v = 0;
    let mut gfn = end;
    let mut n = 0u64;
    let refused = loop {
        if gfn == end {
            // Every gfn remapped in this view: on in a new one.
            match hypercall::view_create() {
                Ok(next) => (v, gfn, views) = (next, FLOOD_BASE, views + 1),
                Err(e) => break e,
            }
        }
        match call_done(&Request::ChangeGfn {
            view: v,
            gfn,
            to: Some(FLOOD_BASE),
        }) {
            Ok(()) if n < 1_000_000 => (n, gfn) = (n + 1, gfn + 1),
            Ok(()) => return fatal("flood", "a million change_gfns and never refused"),
            Err(e) => break e,
        }
    };
    println!("agent: flood: {n} change_gfns accepted in {views} view(s), then {refused}");
    match refused.hc_error() {
        Some(HcError::QuotaExceeded {
            what: Quota::Settings,
            limit,
        }) if u64::from(limit) == n => {}
        _ => return fatal("the refusal", "not QuotaExceeded at the quota it names"),
    }
    // The quota counts what the domain keeps: freeing one makes room for one.
    let freed = call_done(&Request::ChangeGfn {
        view: v,
        gfn: FLOOD_BASE,
        to: None,
    });
    let again = call_done(&Request::ChangeGfn {
        view: v,
        gfn,
        to: Some(FLOOD_BASE),
    });
    if freed.is_err() || again.is_err() {
        return fatal(
            "free one, make one",
            format_args!("{freed:?}, then {again:?}"),
        );
    }
    println!("agent: flood: one freed, one more accepted");
    let refused = loop {
        match hypercall::view_create() {
            Ok(_) if views < 1000 => views += 1,
            Ok(_) => return fatal("flood", "1000 views and never refused"),
            Err(e) => break e,
        }
    };
    println!("agent: flood: {views} views, then {refused}");
    match refused.hc_error() {
        Some(HcError::QuotaExceeded {
            what: Quota::Views,
            limit,
        }) if limit == views => {}
        _ => return fatal("the refusal", "not QuotaExceeded at the quota it names"),
    }
    println!("agent: flood: refused at its quotas");
    0
}

fn unavailable() -> u32 {
    println!("agent: asking altp2m until it is unavailable");
    let mut answers = 0u64;
    let refused = loop {
        match call(&Request::GetMode) {
            Ok(Reply::Mode(_)) => {
                answers += 1;
                if answers.is_multiple_of(100) {
                    println!("agent: {answers} answers");
                }
                if answers > 100_000_000 {
                    return fatal("unavailable", "altp2m never became unavailable");
                }
                pause();
            }
            Ok(other) => return fatal("GetMode", format_args!("{other:?}")),
            Err(e) => break e,
        }
    };
    println!("agent: altp2m unavailable after {answers} answers: {refused}");
    if refused != hypercall::CallError::Refused(Some(HcError::ServiceUnavailable)) {
        return fatal("the refusal", "not ServiceUnavailable");
    }
    let switched = view_switch(1);
    if switched != Status::Refused {
        return fatal("view_switch", format_args!("{switched:?}, not Refused"));
    }
    println!("agent: the view-switch hypercall is refused too; done");
    0
}

fn restart() -> u32 {
    let mut c = Checks(0);
    A.write_u64(0, 0, MARK_A);
    B.write_u64(0, 0, MARK_B);
    W2.write_u64(0, 0, 1);
    let (a, b, w, w2) = (A.gfn(0), B.gfn(0), W.gfn(0), W2.gfn(0));
    let v = match hypercall::view_create() {
        Ok(v) => v,
        Err(e) => return fatal("ViewCreate", e),
    };
    let setup = [
        Request::ChangeGfn {
            view: v,
            gfn: a,
            to: Some(b),
        },
        Request::SetAccess {
            view: 0,
            gfn: w2,
            access: Access::R,
        },
    ];
    for r in &setup {
        if let Err(e) = call_done(r) {
            return fatal("setup", format_args!("{r:?}: {e}"));
        }
    }
    if view_switch(v) != Status::Ok {
        return fatal("view_switch", v);
    }
    c.check(
        A.read_u64(0, 0) == MARK_B,
        format_args!("A reads B's marker in view {v}"),
    );
    println!("agent: restart: ready (view {v}, gfn {w:#x} to watch)");
    // The host makes W read-execute in the view, as an external agent.
    let mut polls = 0u64;
    loop {
        match call(&Request::GetAccess { view: v, gfn: w }) {
            Ok(Reply::Access(Access::RX)) => break,
            Ok(_) if polls < 10_000_000 => {
                polls += 1;
                pause();
            }
            other => return fatal("GetAccess", format_args!("{other:?}")),
        }
    }
    println!("agent: writing gfn {w:#x}, which the host made r-x in view {v}");
    W.write_u64(0, 0, 0x5eed);
    // The vCPU waited (no listener) until altp2m started again, which
    // forgot the restriction along with the view: the write went through.
    let now = hypercall::view_current();
    println!("agent: the write to gfn {w:#x} went through; now in view {now:?}");
    c.check(now == Ok(0), format_args!("back in view 0: {now:?}"));
    c.check(
        W.read_u64(0, 0) == 0x5eed,
        format_args!("W holds what was written"),
    );
    // W2 was read-only in the host p2m before the restart; the new model
    // knows nothing of it, and neither do the tables any more.
    W2.write_u64(0, 0, 2);
    c.check(true, format_args!("gfn {w2:#x} written after the restart"));
    for (g, raw) in [(w2, false), (w2, true)] {
        let e = get_entry(0, g, raw);
        c.check(
            matches!(e, Ok(e) if e.access == Access::RWX),
            format_args!(
                "the {} entry of gfn {g:#x} in view 0 is rwx: {e:?}",
                if raw { "raw" } else { "effective" }
            ),
        );
    }
    c.check(
        A.read_u64(0, 0) == MARK_A,
        format_args!("A reads its own marker in view 0"),
    );
    c.refused(
        &Request::SetAccess {
            view: v,
            gfn: w,
            access: Access::R,
        },
        HcError::NoSuchView { view: v },
    );
    // And views work again.
    let x = match hypercall::view_create() {
        Ok(x) => x,
        Err(e) => return fatal("ViewCreate after the restart", e),
    };
    let r = call_done(&Request::ChangeGfn {
        view: x,
        gfn: a,
        to: Some(b),
    });
    c.check(r.is_ok(), format_args!("ChangeGfn in new view {x}: {r:?}"));
    let through = if view_switch(x) == Status::Ok {
        let m = A.read_u64(0, 0);
        view_switch(0);
        m
    } else {
        0
    };
    c.check(
        through == MARK_B,
        format_args!("A reads B's marker through new view {x}: {through:#x}"),
    );
    if c.0 == 0 {
        println!("agent: restart checks passed");
        0
    } else {
        println!("agent: {} restart checks failed", c.0);
        1
    }
}

fn checks(info: &MultibootInfo) -> u32 {
    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => return fatal("Capabilities", e),
    };
    println!(
        "agent: vmfunc {}, ve {}, max views {}",
        caps.vmfunc, caps.ve, caps.max_views
    );
    let mut c = Checks(0);
    let (Ok(v), Ok(w)) = (hypercall::view_create(), hypercall::view_create()) else {
        return fatal("ViewCreate", "refused");
    };
    println!("agent: views {v} and {w}");

    // Seed 004: SVE on a gfn of a new view.
    let never = NEVER.gfn(0);
    let r = call_done(&Request::SetSuppressVe {
        view: w,
        gfn: never,
        suppress: true,
    });
    c.check(
        r.is_ok(),
        format_args!("seed 004: SetSuppressVe on gfn {never:#x} never touched in view {w}: {r:?}"),
    );
    // A new view is a copy of the host p2m: the entry is the host's own
    // (the same frame: setting suppress-#VE changed nothing else).
    let raw = get_entry(w, never, true);
    c.check(
        matches!(raw, Ok(e) if e.frame_gfn == Some(never) && e.suppress_ve),
        format_args!("seed 004: the raw entry keeps the host's frame, suppress-#VE set: {raw:?}"),
    );
    let eff = get_entry(w, never, false);
    c.check(
        matches!(eff, Ok(e) if e.frame_gfn == Some(never) && e.access == Access::RWX),
        format_args!("the effective entry is the host's: {eff:?}"),
    );

    // ALT-7, ALT-8: access set in a new view.
    let wg = W.gfn(0);
    let r = call_done(&Request::SetAccess {
        view: v,
        gfn: wg,
        access: Access::RX,
    });
    c.check(
        r.is_ok(),
        format_args!("SetAccess r-x on gfn {wg:#x} in view {v}: {r:?}"),
    );
    let eff = get_entry(v, wg, false);
    c.check(
        matches!(eff, Ok(e) if e.access == Access::RX),
        format_args!("effective access of gfn {wg:#x} in view {v} is r-x: {eff:?}"),
    );
    let raw = get_entry(v, wg, true);
    c.check(
        matches!(raw, Ok(e) if e.frame_gfn == Some(wg) && e.access == Access::RX),
        format_args!("its raw entry (the view is a copy of the host p2m) is r-x: {raw:?}"),
    );

    // change_gfn: A shows B's frame in v.
    A.write_u64(0, 0, MARK_A);
    B.write_u64(0, 0, MARK_B);
    let (a, b) = (A.gfn(0), B.gfn(0));
    let r = call_done(&Request::ChangeGfn {
        view: v,
        gfn: a,
        to: Some(b),
    });
    c.check(
        r.is_ok(),
        format_args!("ChangeGfn {a:#x} -> {b:#x} in view {v}: {r:?}"),
    );
    if caps.vmfunc {
        let r = call_done(&Request::ViewSetVisible {
            view: v,
            visible: true,
        });
        c.check(r.is_ok(), format_args!("ViewSetVisible {v}: {r:?}"));
    }
    let through_v = if switch(caps.vmfunc, v) {
        let x = A.read_u64(0, 0);
        // Reading W in v populates it with r-x.
        let _ = W.read_u64(0, 0);
        switch(caps.vmfunc, 0);
        x
    } else {
        0
    };
    c.check(
        through_v == MARK_B,
        format_args!(
            "A read through view {v} ({}) gives B's marker: {through_v:#x}",
            if caps.vmfunc { "VMFUNC" } else { "hypercall" }
        ),
    );
    let raw = get_entry(v, wg, true);
    c.check(
        matches!(raw, Ok(e) if e.frame_gfn == Some(wg) && e.access == Access::RX),
        format_args!("W's raw entry in view {v} once read: {raw:?}"),
    );
    let r = call_done(&Request::ChangeGfn {
        view: v,
        gfn: a,
        to: None,
    });
    c.check(r.is_ok(), format_args!("ChangeGfn reset: {r:?}"));
    let again = if switch(caps.vmfunc, v) {
        let x = A.read_u64(0, 0);
        switch(caps.vmfunc, 0);
        x
    } else {
        0
    };
    c.check(
        again == MARK_A,
        format_args!("after the reset A reads {again:#x} through view {v}"),
    );

    // Bad input: each refused with its reason.
    let ram_pages = ram_end(info);
    c.refused(
        &Request::SetAccess {
            view: 77,
            gfn: a,
            access: Access::R,
        },
        HcError::NoSuchView { view: 77 },
    );
    c.refused(
        &Request::ViewSwitch { view: 600 },
        HcError::NoSuchView { view: 600 },
    );
    c.refused(
        &Request::SetAccess {
            view: v,
            gfn: ram_pages + 0x10_0000,
            access: Access::R,
        },
        HcError::BadGfn {
            gfn: ram_pages + 0x10_0000,
        },
    );
    c.refused(
        &Request::SetAccess {
            view: v,
            gfn: a,
            access: Access {
                read: false,
                write: true,
                execute: false,
            },
        },
        HcError::BadAccess,
    );
    c.refused(
        &Request::SetAccessRange {
            view: v,
            gfn: a,
            count: 0,
            access: Access::R,
        },
        HcError::BadRange,
    );
    c.refused(&Request::ViewDestroy { view: 0 }, HcError::HostView);
    let on_w = view_switch(w);
    c.check(
        on_w == Status::Ok,
        format_args!("view_switch({w}): {on_w:?}"),
    );
    c.refused(
        &Request::ViewDestroy { view: w },
        HcError::ViewInUse { view: w },
    );
    let cur = hypercall::view_current();
    c.check(cur == Ok(w), format_args!("ViewCurrent is {w}: {cur:?}"));
    view_switch(0);

    // A range over the whole of RAM, then undone.
    let r = call_done(&Request::SetAccessRange {
        view: v,
        gfn: 0x100,
        count: ram_pages - 0x100,
        access: Access::RX,
    });
    c.check(
        r.is_ok(),
        format_args!("SetAccessRange r-x over {} pages: {r:?}", ram_pages - 0x100),
    );
    let eff = get_entry(v, ram_pages - 1, false);
    c.check(
        matches!(eff, Ok(e) if e.access == Access::RX),
        format_args!("the last page of RAM is r-x in view {v}: {eff:?}"),
    );
    let r = call_done(&Request::SetAccessRange {
        view: v,
        gfn: 0x100,
        count: ram_pages - 0x100,
        access: Access::RWX,
    });
    c.check(r.is_ok(), format_args!("the range back to rwx: {r:?}"));

    page_walk_is_a_read(&mut c, w);
    relaxing(&mut c, w);

    for view in [v, w] {
        let r = call_done(&Request::ViewDestroy { view });
        c.check(r.is_ok(), format_args!("ViewDestroy {view}: {r:?}"));
    }
    if c.0 == 0 {
        println!("agent: all checks passed");
        0
    } else {
        println!("agent: {} checks failed", c.0);
        1
    }
}

/// Issue 13, point 8: with EPT accessed/dirty flags on, the CPU takes a
/// guest's page-table walk for an EPT write. They are on only while PML
/// logs, so here a walk through a read-execute page of tables is a read:
/// the guest makes its own top-level table (CR3's page) read-execute in
/// `view`, runs there with its TLB flushed (every fetch and read walks the
/// tables again), and comes back. With the flags on, the first walk would
/// be a write violation, which nobody answers: the domain would stop.
fn page_walk_is_a_read(c: &mut Checks, view: u16) {
    let cr3: u64;
    // Safety: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let top = cr3 >> 12 & 0xf_ffff_ffff;
    let r = call_done(&Request::SetAccess {
        view,
        gfn: top,
        access: Access::RX,
    });
    c.check(
        r.is_ok(),
        format_args!("SetAccess r-x on the page tables' gfn {top:#x}: {r:?}"),
    );
    let on = view_switch(view);
    // Safety: writing CR3 back flushes the TLB; the tables are the same.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack)) };
    let x = A.read_u64(0, 0);
    view_switch(0);
    c.check(
        on == Status::Ok && x == MARK_A,
        format_args!(
            "a page-table walk through read-execute gfn {top:#x} in view {view} is a read: {on:?}, {x:#x}"
        ),
    );
    let r = call_done(&Request::SetAccess {
        view,
        gfn: top,
        access: Access::RWX,
    });
    c.check(
        r.is_ok(),
        format_args!("the page tables' gfn back to rwx: {r:?}"),
    );
}

/// Issue 13, point 8: Xen's relaxing access types, on the real tables. In
/// `view` an rx2rw page is written and an n2rwx page read: both go
/// through (nobody listens, so a refused access would stop the domain),
/// and the entries are then read-write and read-write-execute.
fn relaxing(c: &mut Checks, view: u16) {
    for (page, relaxing) in [(&RX2RW, Relaxing::Rx2Rw), (&N2RWX, Relaxing::N2Rwx)] {
        let r = call_done(&Request::SetAccessRelaxing {
            view,
            gfn: page.gfn(0),
            relaxing,
        });
        c.check(
            r.is_ok(),
            format_args!("SetAccessRelaxing {relaxing:?}: {r:?}"),
        );
    }
    let on = view_switch(view);
    RX2RW.write_u64(0, 0, 0x2277);
    let x = N2RWX.read_u64(0, 0);
    view_switch(0);
    c.check(
        on == Status::Ok && x == 0 && RX2RW.read_u64(0, 0) == 0x2277,
        format_args!("the rx2rw write and the n2rwx read went through in view {view}"),
    );
    for (page, want) in [(&RX2RW, Access::RW), (&N2RWX, Access::RWX)] {
        let raw = get_entry(view, page.gfn(0), true);
        c.check(
            matches!(raw, Ok(e) if e.access == want),
            format_args!("relaxed entry of gfn {:#x}: {raw:?}", page.gfn(0)),
        );
    }
}

/// Spins a little (between polls of the host's doing).
fn pause() {
    for _ in 0..20_000 {
        core::hint::spin_loop();
    }
}

/// The exit status of an agent nobody watched.
const STATUS_UNWATCHED: u32 = 3;

/// The TSC tick at which `secs` seconds from now have passed (the TSC
/// frequency from Parallax's CPUID leaf; 100 MHz where it is not given).
fn deadline(secs: u64) -> u64 {
    let max = guest_runtime::cpuid(0x4000_0000, 0).eax;
    let khz = match guest_runtime::cpuid(0x4000_0010, 0).eax {
        khz if max >= 0x4000_0010 && khz != 0 => u64::from(khz),
        _ => 100_000,
    };
    guest_runtime::rdtsc().saturating_add(secs.saturating_mul(khz * 1000))
}

/// Waits (at most `wait` seconds) until the host puts the vCPU in a view
/// other than 0: that view, or the status to exit with.
fn put_in_a_view(wait: u64) -> Result<u16, u32> {
    let give_up = deadline(wait);
    loop {
        match hypercall::view_current() {
            Ok(0) if guest_runtime::rdtsc() > give_up => {
                println!(
                    "agent: nobody put me in a view within {wait} s (no host agent: the image was booted without `cargo hv run`?); giving up"
                );
                return Err(STATUS_UNWATCHED);
            }
            Ok(0) => pause(),
            Ok(v) => return Ok(v),
            Err(e) => return Err(fatal("ViewCurrent", e)),
        }
    }
}

/// `straddle`: see the module documentation.
fn straddle(wait: u64) -> u32 {
    println!(
        "agent: straddle me: gfns {:#x} and {:#x}; waiting to be put in a view",
        STRADDLED.gfn(0),
        STRADDLED.gfn(1)
    );
    let view = match put_in_a_view(wait) {
        Ok(v) => v,
        Err(status) => return status,
    };
    println!("agent: now in view {view}; one write across both pages");
    STRADDLED.write_straddling_u64(0, 0x5354_5241_4444_4c45);
    println!("agent: straddling write done");
    STRADDLED.write_u64(0, 0, 1);
    println!("agent: first page written again");
    0
}

fn watch(n: u64, limited: bool, burst: bool, wait: u64) -> u32 {
    println!(
        "agent: watch me: gfn {:#x} (gpa {:#x}); waiting to be put in a view",
        W.gfn(0),
        W.addr()
    );
    let view = match put_in_a_view(wait) {
        Ok(v) => v,
        Err(status) => return status,
    };
    println!("agent: now in view {view}; writing the page {n} times");
    for i in 1..=n {
        W.write_u64(0, 8 * (i as usize % 16), i);
        if !burst || i == n {
            println!("agent: write {i} done");
        }
    }
    if !limited {
        println!("agent: done");
        return 0;
    }
    println!("agent: waiting for limited mode");
    let mut polls = 0u64;
    loop {
        match call(&Request::GetMode) {
            Ok(Reply::Mode(Mode::Limited)) => break,
            Ok(_) if polls < 10_000_000 => {
                polls += 1;
                pause();
            }
            other => return fatal("GetMode", format_args!("{other:?}")),
        }
    }
    let change = call_done(&Request::SetAccess {
        view: 0,
        gfn: W.gfn(0),
        access: Access::R,
    });
    match change {
        Err(HelperError::Call(hypercall::CallError::Refused(Some(HcError::ModeForbids {
            mode: Mode::Limited,
        })))) => println!("agent: limited mode: SetAccess refused (ModeForbids), as it must be"),
        other => return fatal("SetAccess in limited mode", format_args!("{other:?}")),
    }
    match hypercall::view_current() {
        Ok(v) => println!("agent: limited mode: ViewCurrent still answers ({v})"),
        Err(e) => return fatal("ViewCurrent in limited mode", e),
    }
    println!("agent: done");
    0
}

fn viewpage() -> u32 {
    let vmfunc = match hypercall::capabilities() {
        Ok(c) => c.vmfunc,
        Err(e) => return fatal("Capabilities", e),
    };
    let page = hypercall::request_page_gfn();
    let (Ok(ro), Ok(remap)) = (hypercall::view_create(), hypercall::view_create()) else {
        return fatal("ViewCreate", "refused");
    };
    for v in [ro, remap] {
        if vmfunc
            && let Err(e) = call_done(&Request::ViewSetVisible {
                view: v,
                visible: true,
            })
        {
            return fatal("ViewSetVisible", e);
        }
    }
    if let Err(e) = call_done(&Request::SetAccess {
        view: ro,
        gfn: page,
        access: Access::R,
    }) {
        return fatal("SetAccess", e);
    }
    if let Err(e) = call_done(&Request::ChangeGfn {
        view: remap,
        gfn: page,
        to: Some(B.gfn(0)),
    }) {
        return fatal("ChangeGfn", e);
    }
    // Read-only in `ro`: the request is put in the page from view 0 (the
    // guest could not write it in `ro`), then made from `ro`: refused,
    // nothing written.
    let gpa = page << 12;
    let mut bytes = [0u8; 16];
    let Ok(req) = postcard::to_slice(&Request::GetMode, &mut bytes) else {
        return fatal("encoding", "GetMode");
    };
    let len = req.len();
    // Safety: the request page is this guest's, identity-mapped, and no
    // `call` runs meanwhile.
    unsafe { core::ptr::copy_nonoverlapping(req.as_ptr(), gpa as *mut u8, len) };
    // Safety: as above.
    let before = unsafe { core::ptr::read_volatile(gpa as *const [u8; 16]) };
    if !switch(vmfunc, ro) {
        return fatal("switch", "refused");
    }
    let (status, _) = hypercall::vmcall(guest_runtime::abi::HC_CALL, gpa, len as u64);
    let _ = switch(vmfunc, 0);
    // Safety: as above.
    let after = unsafe { core::ptr::read_volatile(gpa as *const [u8; 16]) };
    if status != Status::BadAddress as u64 || after != before {
        return fatal(
            "a request in a read-only page",
            format_args!("status {status}, page changed: {}", after != before),
        );
    }
    println!(
        "agent: viewpage: a request page read-only in the view is refused (BadAddress), the page unchanged"
    );
    // Remapped in `remap`: the guest writes its request there into B's
    // frame; the hypervisor must read it there and answer there (the
    // page's own frame holds nothing it could decode).
    // Safety: as above.
    unsafe { core::ptr::write_bytes(gpa as *mut u8, 0, 64) };
    if !switch(vmfunc, remap) {
        return fatal("switch", "refused");
    }
    let got = call(&Request::GetMode);
    let _ = switch(vmfunc, 0);
    match got {
        Ok(Reply::Mode(_)) => {}
        other => return fatal("a request in a remapped page", format_args!("{other:?}")),
    }
    println!(
        "agent: viewpage: a remapped request page is read and answered in the frame the view maps there"
    );
    println!("agent: viewpage: ok");
    0
}
