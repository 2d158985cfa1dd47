//! Alternate views: a remapped gfn seen through a view switched by VMFUNC
//! (or, without VMFUNC, by the view-switch hypercall), VMFUNC switches that
//! cost no VM exit, and a VMFUNC to an invisible view refused with #UD.
//!
//! 1. `Capabilities`; two page-aligned pages A and B filled with distinct
//!    markers.
//! 2. `ViewCreate` -> v; `ChangeGfn { view: v, gfn: gfn(A), to: Some(gfn(B)) }`;
//!    `ViewSetVisible { view: v, visible: true }` (a refusal for lack of
//!    VMFUNC is accepted when `Capabilities` says there is none).
//! 3. A read in view 0 sees A's marker, in view v B's, in view 0 again A's.
//! 4. With VMFUNC: 100 round trips 0 -> v -> 0 after a warm-up round (which
//!    fills view v's entries for the loop's code and stack); `exit_count()`
//!    before and after must differ by exactly 1 (the second `exit_count`
//!    hypercall): `vmfunc switches: 200, exits: 0`. Without it: `no
//!    VMFUNC: switched by hypercall`.
//! 5. VMFUNC with index 400 (never made visible) must raise #UD at the
//!    instruction; the handler skips it: `invalid view index refused with
//!    #UD`. (Without VMFUNC enabled the CPU raises #UD itself.)
//! 6. `ViewDestroy { view: v }`.
//!
//! Exit status 0 when every check passed, 1 otherwise (each failure is
//! printed as `FAIL: ...`). On plain QEMU the first hypercall raises #UD
//! (status 0xEE).
//!
//! Command line `selftest=ud` runs step 5 alone, without hypercalls: on a
//! CPU without VMFUNC (plain QEMU) it checks the runtime's #UD path.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use guest_runtime::abi::{Feature, HcError, Request, Status};
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::vmx::{VMFUNC_BYTES, VMFUNC_LEN};
use guest_runtime::{
    MultibootInfo, Pages, TrapFrame, exit_count, idt, println, view_switch, vmfunc_switch,
};

use guest_runtime::Checks;

guest_runtime::entry!(main);

static A: Pages<1> = Pages::new();
static B: Pages<1> = Pages::new();
const MARK_A: u64 = 0xaaaa_aaaa_0000_000a;
const MARK_B: u64 = 0xbbbb_bbbb_0000_000b;
/// A view slot never made visible.
const INVISIBLE_VIEW: u32 = 400;
const ROUNDS: u32 = 100;

/// #UD deliveries seen by the handler, and the RIP of the last one.
static UD_COUNT: AtomicU32 = AtomicU32::new(0);
static UD_RIP: AtomicU64 = AtomicU64::new(0);

/// Skips a VMFUNC that raised #UD; any other #UD ends the guest.
fn on_ud(frame: &mut TrapFrame) {
    let at = frame.rip as *const [u8; 3];
    // Safety: RIP points at the faulting instruction in this image, which
    // is identity-mapped and readable; every instruction is followed by
    // more code, so three bytes are readable.
    let bytes = unsafe { at.read_unaligned() };
    if bytes != VMFUNC_BYTES {
        println!(
            "FAIL: #UD at rip {:#x} ({:02x?}), not at a VMFUNC",
            frame.rip, bytes
        );
        guest_runtime::exit(1);
    }
    UD_COUNT.fetch_add(1, Ordering::SeqCst);
    UD_RIP.store(frame.rip, Ordering::SeqCst);
    frame.rip += VMFUNC_LEN;
}

/// Step 5: VMFUNC to an invisible view must raise #UD.
fn invisible_view_check(checks: &mut Checks) {
    idt::set_ud_handler(Some(on_ud));
    let before = UD_COUNT.load(Ordering::SeqCst);
    vmfunc_switch(INVISIBLE_VIEW);
    let seen = UD_COUNT.load(Ordering::SeqCst) - before;
    idt::set_ud_handler(None);
    checks.check(
        seen == 1,
        format_args!("VMFUNC to view {INVISIBLE_VIEW}: {seen} #UD (expected 1)"),
    );
    if seen == 1 {
        println!(
            "invalid view index refused with #UD (at rip {:#x})",
            UD_RIP.load(Ordering::SeqCst)
        );
    }
}

/// Switches to `view` by VMFUNC or by hypercall.
fn switch(view: u16, by_vmfunc: bool) -> Result<(), Status> {
    if by_vmfunc {
        vmfunc_switch(u32::from(view));
        Ok(())
    } else {
        match view_switch(view) {
            Status::Ok => Ok(()),
            other => Err(other),
        }
    }
}

#[inline(never)]
fn vmfunc_round_trips(view: u32, rounds: u32) {
    for _ in 0..rounds {
        vmfunc_switch(view);
        vmfunc_switch(0);
    }
}

fn fatal(what: &str, e: impl core::fmt::Display) -> u32 {
    println!("FAIL: {what}: {e}");
    1
}

fn main(info: &MultibootInfo) -> u32 {
    let mut checks = Checks(0);
    if info
        .cmdline()
        .is_some_and(|c| c.split(' ').any(|w| w == "selftest=ud"))
    {
        println!("selftest: VMFUNC to view {INVISIBLE_VIEW} without hypercalls");
        invisible_view_check(&mut checks);
        return u32::from(checks.0 != 0);
    }

    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => return fatal("Capabilities", e),
    };
    println!(
        "capabilities: vmfunc {}, ve {}, pml {}, max views {}",
        caps.vmfunc, caps.ve, caps.pml, caps.max_views
    );
    A.fill_u64(0, MARK_A);
    B.fill_u64(0, MARK_B);

    let v = match hypercall::view_create() {
        Ok(v) => v,
        Err(e) => return fatal("ViewCreate", e),
    };
    println!(
        "created view {v}; A is gfn {:#x}, B is gfn {:#x}",
        A.gfn(0),
        B.gfn(0)
    );
    let remap = Request::ChangeGfn {
        view: v,
        gfn: A.gfn(0),
        to: Some(B.gfn(0)),
    };
    if let Err(e) = call_done(&remap) {
        return fatal("ChangeGfn", e);
    }
    match call_done(&Request::ViewSetVisible {
        view: v,
        visible: true,
    }) {
        Ok(()) => {}
        Err(e)
            if !caps.vmfunc
                && e.hc_error()
                    == Some(HcError::Unsupported {
                        feature: Feature::Vmfunc,
                    }) =>
        {
            println!("ViewSetVisible refused: no VMFUNC (accepted)");
        }
        Err(e) => return fatal("ViewSetVisible", e),
    }

    // Step 3: what A reads as in each view.
    let a0 = A.read_u64(0, 0);
    checks.check(
        a0 == MARK_A,
        format_args!("view 0 before: A reads {a0:#x}, expected {MARK_A:#x}"),
    );
    if let Err(s) = switch(v, caps.vmfunc) {
        return fatal("switch to the view", format_args!("{s:?}"));
    }
    let av = A.read_u64(0, 0);
    let av_end = A.read_u64(0, 4088);
    if let Err(s) = switch(0, caps.vmfunc) {
        return fatal("switch back to view 0", format_args!("{s:?}"));
    }
    let a1 = A.read_u64(0, 0);
    checks.check(
        av == MARK_B && av_end == MARK_B,
        format_args!("view {v}: A reads {av:#x}/{av_end:#x}, expected B's {MARK_B:#x}"),
    );
    checks.check(
        a1 == MARK_A,
        format_args!("view 0 after: A reads {a1:#x}, expected {MARK_A:#x}"),
    );
    println!("A reads {a0:#x} in view 0, {av:#x} in view {v}, {a1:#x} in view 0 again");

    // Step 4.
    if caps.vmfunc {
        let _ = exit_count();
        vmfunc_round_trips(u32::from(v), 1);
        let before = exit_count();
        vmfunc_round_trips(u32::from(v), ROUNDS);
        let after = exit_count();
        let exits = after.wrapping_sub(before).wrapping_sub(1);
        println!("vmfunc switches: {}, exits: {}", 2 * ROUNDS, exits as i64);
        checks.check(
            after.wrapping_sub(before) == 1,
            format_args!("exit_count went from {before} to {after} (expected exactly +1)"),
        );
        let a2 = A.read_u64(0, 0);
        checks.check(
            a2 == MARK_A,
            format_args!("after the round trips: A reads {a2:#x}, expected {MARK_A:#x}"),
        );
    } else {
        println!("no VMFUNC: switched by hypercall");
    }

    // Step 5.
    invisible_view_check(&mut checks);

    // Step 6.
    if let Err(e) = call_done(&Request::ViewDestroy { view: v }) {
        checks.check(false, format_args!("ViewDestroy {v}: {e}"));
    }

    if checks.0 == 0 {
        println!("vmfunc: all checks passed");
        0
    } else {
        println!("vmfunc: {} checks failed", checks.0);
        1
    }
}
