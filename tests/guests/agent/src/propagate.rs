//! Command line `propagate` (issue 13, point 8; ALT-9): changes to the host
//! p2m reach every view, and a view's own settings are kept and applied
//! again over them.
//!
//! Four pages g0..g3 (one buffer, so that a range covers them). Two views:
//! w, with nothing of its own, and v, with its own settings: g0 `rw-`
//! (access), g1 suppress-#VE cleared, g2 remapped to g3's frame
//! (change_gfn). Then the guest, an in-guest agent in mixed mode, changes
//! view 0 (the host p2m) and after each change asks for the raw entries
//! (`GetEntry { raw: true }`: what the kernel's table holds) of every page
//! in views 0, w and v, and the effective ones (the service's model), which
//! must agree:
//!
//! 1. the host p2m `r-x` over g0..g3 (`SetAccessRange`): every view's
//!    copies lose write; in v, g0 is `r--` (its own `rw-` met with the
//!    host's `r-x`), g1 keeps its cleared suppress-#VE bit, g2 still maps
//!    g3's frame, now `r-x`. Through v (VMFUNC, or the hypercall), g2
//!    reads g3's marker; with #VE, a write to g1 through v raises a #VE (the
//!    real entry is read-only and its suppress-#VE bit clear), whose handler
//!    gives g1 write again in the host p2m (`SetAccess`, one gfn) and
//!    returns, and the write, retried in v, goes through (without #VE, the
//!    same `SetAccess` is made directly);
//! 2. the host p2m `rwx` again over the range: every entry is back, v's
//!    own `rw-` on g0 included; a write to g2 through v lands in g3's frame;
//! 3. the host p2m `r--` on g3 alone (`SetAccess`): v's g2, which maps g3's
//!    frame, is `r--` too; then back;
//! 4. the host p2m `r--` on g2 alone: v's g2 maps another frame and is not
//!    touched (a write to it through v goes through), w's g2 is `r--`;
//!    then back.
//!
//! Prints `agent: propagate: all checks passed` and exits 0, or `FAIL:
//! ...` lines and 1.

use super::{Checks, fatal, switch};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use guest_runtime::abi::{Access, Request};
use guest_runtime::hypercall::{self, call_done, get_entry};
use guest_runtime::{Pages, TrapFrame, idt, println, vmx};

/// g0..g3.
static P: Pages<4> = Pages::new();
/// What page `i` of `P` holds to begin with.
const MARK: u64 = 0x9999_0000_0000_0000;
/// What the write through v to g1 writes.
const WRITTEN_G1: u64 = 0x9999_0000_0000_00f1;
/// What the writes through v to g2 (g3's frame there) write.
const WRITTEN_G2: [u64; 2] = [0x9999_0000_0000_00f2, 0x9999_0000_0000_00f3];

const RW: Access = Access {
    read: true,
    write: true,
    execute: false,
};

static VE_COUNT: AtomicU32 = AtomicU32::new(0);
static VE_GPA: AtomicU64 = AtomicU64::new(0);
static VE_QUAL: AtomicU64 = AtomicU64::new(0);
/// The gfn the #VE handler gives write again in the host p2m.
static VE_GIVE: AtomicU64 = AtomicU64::new(0);
/// 1: the handler's `SetAccess` succeeded; 2: it failed.
static VE_GAVE: AtomicU32 = AtomicU32::new(0);

/// The #VE handler of step 1: the write to g1 through v faulted because
/// the host p2m made g1 read-only, and v's copy says so. The handler
/// undoes the host's change (which must reach v's entry) and returns: the
/// write is retried in v.
fn on_ve(_frame: &mut TrapFrame) {
    let n = VE_COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    let info = vmx::ve_info();
    if n > 1 {
        // The write faulted again: the host's rwx did not reach v.
        println!(
            "FAIL: #VE {n} (gpa {:#x}, qualification {:#x}): the write to g1 still faults in the view after the host p2m gave write back",
            info.guest_physical, info.qualification
        );
        guest_runtime::exit(1);
    }
    VE_GPA.store(info.guest_physical, Ordering::SeqCst);
    VE_QUAL.store(info.qualification, Ordering::SeqCst);
    let r = call_done(&Request::SetAccess {
        view: 0,
        gfn: VE_GIVE.load(Ordering::SeqCst),
        access: Access::RWX,
    });
    VE_GAVE.store(if r.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
    vmx::ve_clear_busy();
}

fn meet(a: Access, b: Access) -> Access {
    Access {
        read: a.read && b.read,
        write: a.write && b.write,
        execute: a.execute && b.execute,
    }
}

fn show(a: Access) -> [u8; 3] {
    [
        if a.read { b'r' } else { b'-' },
        if a.write { b'w' } else { b'-' },
        if a.execute { b'x' } else { b'-' },
    ]
}

/// The four pages, the two views.
struct Rig {
    g: [u64; 4],
    v: u16,
    w: u16,
}

impl Rig {
    /// Every entry of g0..g3 in views 0, w and v is what the host p2m's
    /// access `host` and v's own settings make it: the raw entry (the
    /// kernel's table) and the effective one (the model) both. One `ok`
    /// line, or a `FAIL` line per entry that differs.
    fn expect(&self, c: &mut Checks, when: &str, host: [Access; 4]) {
        let g = self.g;
        let mut want: [(u16, u64, u64, Access, Option<bool>); 12] =
            [(0, 0, 0, Access::NONE, None); 12];
        for i in 0..4 {
            want[i] = (0, g[i], g[i], host[i], None);
            want[4 + i] = (self.w, g[i], g[i], host[i], None);
        }
        want[8] = (self.v, g[0], g[0], meet(RW, host[0]), None);
        want[9] = (self.v, g[1], g[1], host[1], Some(false));
        want[10] = (self.v, g[2], g[3], host[3], None);
        want[11] = (self.v, g[3], g[3], host[3], None);
        let before = c.0;
        for (view, gfn, frame, access, sve) in want {
            let raw = get_entry(view, gfn, true);
            let eff = get_entry(view, gfn, false);
            let ok = match (&raw, &eff) {
                (Ok(r), Ok(e)) => {
                    *r == *e
                        && r.frame_gfn == Some(frame)
                        && r.access == access
                        && sve.is_none_or(|s| r.suppress_ve == s)
                }
                _ => false,
            };
            if !ok {
                let a = show(access);
                println!(
                    "FAIL: {when}: view {view}, gfn {gfn:#x}: want frame {frame:#x}, {}{}, raw {raw:?}, effective {eff:?}",
                    core::str::from_utf8(&a).unwrap_or("?"),
                    match sve {
                        Some(true) => ", suppress-#VE set",
                        Some(false) => ", suppress-#VE clear",
                        None => "",
                    },
                );
                c.0 += 1;
            }
        }
        if c.0 == before {
            let h: [[u8; 3]; 4] = host.map(show);
            let s = |i: usize| core::str::from_utf8(&h[i]).unwrap_or("?");
            println!(
                "ok: {when}: host p2m {} {} {} {}; the raw entries of views 0, {} and {} are as propagated, v's own settings applied",
                s(0),
                s(1),
                s(2),
                s(3),
                self.w,
                self.v
            );
        }
    }
}

/// Sets the host p2m's access of `count` gfns from `gfn`.
fn host(gfn: u64, count: u64, access: Access) -> Result<(), hypercall::HelperError> {
    if count == 1 {
        call_done(&Request::SetAccess {
            view: 0,
            gfn,
            access,
        })
    } else {
        call_done(&Request::SetAccessRange {
            view: 0,
            gfn,
            count,
            access,
        })
    }
}

pub fn propagate() -> u32 {
    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => return fatal("Capabilities", e),
    };
    let g = [P.gfn(0), P.gfn(1), P.gfn(2), P.gfn(3)];
    for (i, _) in g.iter().enumerate() {
        P.write_u64(i, 0, MARK + i as u64);
    }
    let (Ok(v), Ok(w)) = (hypercall::view_create(), hypercall::view_create()) else {
        return fatal("ViewCreate", "refused");
    };
    let rig = Rig { g, v, w };
    let own = [
        Request::SetAccess {
            view: v,
            gfn: g[0],
            access: RW,
        },
        Request::SetSuppressVe {
            view: v,
            gfn: g[1],
            suppress: false,
        },
        Request::ChangeGfn {
            view: v,
            gfn: g[2],
            to: Some(g[3]),
        },
    ];
    for r in &own {
        if let Err(e) = call_done(r) {
            return fatal("v's own settings", format_args!("{r:?}: {e}"));
        }
    }
    if caps.vmfunc
        && let Err(e) = call_done(&Request::ViewSetVisible {
            view: v,
            visible: true,
        })
    {
        return fatal("ViewSetVisible", e);
    }
    if caps.ve
        && let Err(e) = call_done(&Request::VeEnable {
            info_gfn: vmx::ve_info_gfn(),
        })
    {
        return fatal("VeEnable", e);
    }
    println!(
        "agent: propagate: views {v} and {w}, gfns {:#x}..{:#x}; in view {v} gfn {:#x} is rw-, gfn {:#x} has suppress-#VE clear, gfn {:#x} maps gfn {:#x}'s frame",
        g[0], g[3], g[0], g[1], g[2], g[3]
    );
    let mut c = Checks(0);
    let rwx = [Access::RWX; 4];
    rig.expect(&mut c, "before", rwx);

    // 1. The host p2m r-x over the four pages (one range).
    let r = host(g[0], 4, Access::RX);
    c.check(r.is_ok(), format_args!("host p2m r-x over g0..g3: {r:?}"));
    rig.expect(&mut c, "host r-x over the range", [Access::RX; 4]);
    let through = if switch(caps.vmfunc, v) {
        let x = P.read_u64(2, 0);
        switch(caps.vmfunc, 0);
        Some(x)
    } else {
        None
    };
    c.check(
        through == Some(MARK + 3),
        format_args!("g2 read through view {v} gives g3's marker: {through:x?}"),
    );
    if caps.ve {
        // The real entry of g1 in v is read-only (the host's change) with
        // suppress-#VE clear (v's own): a write there is a #VE.
        VE_GIVE.store(g[1], Ordering::SeqCst);
        idt::set_ve_handler(Some(on_ve));
        let switched = switch(caps.vmfunc, v);
        if switched {
            P.write_u64(1, 0, WRITTEN_G1);
            switch(caps.vmfunc, 0);
        }
        idt::set_ve_handler(None);
        let (n, gpa, qual) = (
            VE_COUNT.load(Ordering::SeqCst),
            VE_GPA.load(Ordering::SeqCst),
            VE_QUAL.load(Ordering::SeqCst),
        );
        c.check(
            switched && n == 1 && gpa == P.page_addr(1) && qual & vmx::QUAL_WRITE != 0,
            format_args!(
                "a write to g1 through view {v} raised one #VE (the host's r-x in v's entry, v's suppress-#VE clear): {n} #VE, gpa {gpa:#x}, qualification {qual:#x}"
            ),
        );
        c.check(
            VE_GAVE.load(Ordering::SeqCst) == 1,
            format_args!("the #VE handler gave g1 write again in the host p2m"),
        );
        let now = P.read_u64(1, 0);
        c.check(
            now == WRITTEN_G1,
            format_args!(
                "the write, retried in view {v} after the host p2m's change, went through: g1 holds {now:#x}"
            ),
        );
    } else {
        println!("agent: propagate: no #VE on this CPU; g1 given write again directly");
        let r = host(g[1], 1, Access::RWX);
        c.check(r.is_ok(), format_args!("host p2m rwx on g1: {r:?}"));
    }
    rig.expect(
        &mut c,
        "host rwx on g1 alone",
        [Access::RX, Access::RWX, Access::RX, Access::RX],
    );

    // 2. The host p2m rwx again over the range: every view's copies back,
    // v's own settings applied again.
    let r = host(g[0], 4, Access::RWX);
    c.check(r.is_ok(), format_args!("host p2m rwx over g0..g3: {r:?}"));
    rig.expect(&mut c, "host rwx over the range", rwx);
    let wrote = switch(caps.vmfunc, v) && {
        P.write_u64(2, 0, WRITTEN_G2[0]);
        switch(caps.vmfunc, 0)
    };
    let (g2, g3) = (P.read_u64(2, 0), P.read_u64(3, 0));
    c.check(
        wrote && g3 == WRITTEN_G2[0] && g2 == MARK + 2,
        format_args!("a write to g2 through view {v} lands in g3's frame: g2 {g2:#x}, g3 {g3:#x}"),
    );

    // 3. The host p2m r-- on g3 alone: it reaches v's g2 too (a copy of
    // g3's entry), then back.
    let r = host(g[3], 1, Access::R);
    c.check(r.is_ok(), format_args!("host p2m r-- on g3: {r:?}"));
    rig.expect(
        &mut c,
        "host r-- on the remap target g3",
        [Access::RWX, Access::RWX, Access::RWX, Access::R],
    );
    let r = host(g[3], 1, Access::RWX);
    c.check(r.is_ok(), format_args!("host p2m rwx on g3: {r:?}"));
    rig.expect(&mut c, "host rwx on g3 again", rwx);

    // 4. The host p2m r-- on g2 alone: v maps g3's frame at g2, which the
    // change does not touch.
    let r = host(g[2], 1, Access::R);
    c.check(r.is_ok(), format_args!("host p2m r-- on g2: {r:?}"));
    rig.expect(
        &mut c,
        "host r-- on g2, which v remaps",
        [Access::RWX, Access::RWX, Access::R, Access::RWX],
    );
    let wrote = switch(caps.vmfunc, v) && {
        P.write_u64(2, 0, WRITTEN_G2[1]);
        switch(caps.vmfunc, 0)
    };
    let g3 = P.read_u64(3, 0);
    c.check(
        wrote && g3 == WRITTEN_G2[1],
        format_args!(
            "g2 stays writable through view {v} while the host p2m's g2 is r--: g3 holds {g3:#x}"
        ),
    );
    let r = host(g[2], 1, Access::RWX);
    c.check(r.is_ok(), format_args!("host p2m rwx on g2: {r:?}"));
    rig.expect(&mut c, "host rwx on g2 again", rwx);

    if caps.ve
        && let Err(e) = call_done(&Request::VeDisable)
    {
        c.check(false, format_args!("VeDisable: {e}"));
    }
    for view in [v, w] {
        let r = call_done(&Request::ViewDestroy { view });
        c.check(r.is_ok(), format_args!("ViewDestroy {view}: {r:?}"));
    }
    if c.0 == 0 {
        println!("agent: propagate: all checks passed");
        0
    } else {
        println!("agent: propagate: {} checks failed", c.0);
        1
    }
}
