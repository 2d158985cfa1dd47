//! A write to a page that is read-only in an alternate view, delivered to
//! the guest as a virtualization exception (#VE) instead of a VM exit.
//!
//! 1. `Capabilities`; without #VE: `no #VE on this CPU`, status 0.
//! 2. `VeEnable { info_gfn }` (the runtime's information page);
//!    `ViewCreate` -> v; a page-aligned page P;
//!    `SetAccess { view: v, gfn: gfn(P), access: R }`;
//!    `SetSuppressVe { view: v, gfn: gfn(P), suppress: false }`;
//!    with VMFUNC, `ViewSetVisible { view: v, visible: true }`.
//! 3. Registers a #VE handler, switches to v (VMFUNC, else the hypercall),
//!    reads the #VE information page once (so that view v maps it before
//!    the CPU has to write it while delivering the #VE), and writes P.
//! 4. The handler records the information (exit reason 48, GPA = P,
//!    qualification bit 1 = write, busy = 0xFFFFFFFF, EPTP index), switches
//!    the vCPU back to view 0 (VMFUNC or `view_switch(0)`), clears the busy
//!    word and returns; the write is retried in view 0, where P is writable.
//! 5. Prints `#VE delivered: gpa 0x..., qualification 0x..., eptp index N`,
//!    checks that exactly one #VE came and that the write landed, then
//!    `VeDisable` and `ViewDestroy`.
//!
//! With `suppressed` on the command line, step 2 leaves P's suppress-#VE bit
//! set: the write must then exit to the hypervisor instead of raising #VE
//! (no listener in the test, so the hypervisor stops the domain; the guest
//! prints `FAIL` and exits 1 if a #VE arrives or the write goes through).
//!
//! An EPTP index other than v is reported as a warning, not a failure.
//! Exit status 0 when every check passed, 1 otherwise (`FAIL: ...` lines).
//! On plain QEMU the first hypercall raises #UD (status 0xEE).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use guest_runtime::abi::{Access, Request, Status};
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::vmx::{self, EXIT_REASON_EPT_VIOLATION, QUAL_WRITE};
use guest_runtime::{MultibootInfo, Pages, TrapFrame, idt, println, view_switch, vmfunc_switch};

use guest_runtime::Checks;

guest_runtime::entry!(main);

static P: Pages<1> = Pages::new();
const BEFORE: u64 = 0x1111_1111_1111_1111;
const WRITTEN: u64 = 0x2222_2222_2222_2222;
/// Deliveries after which the handler gives up (the write keeps faulting).
const MAX_DELIVERIES: u32 = 3;

static USE_VMFUNC: AtomicBool = AtomicBool::new(false);
static VE_COUNT: AtomicU32 = AtomicU32::new(0);
static VE_REASON: AtomicU32 = AtomicU32::new(0);
static VE_BUSY: AtomicU32 = AtomicU32::new(0);
static VE_QUAL: AtomicU64 = AtomicU64::new(0);
static VE_GLA: AtomicU64 = AtomicU64::new(0);
static VE_GPA: AtomicU64 = AtomicU64::new(0);
static VE_INDEX: AtomicU32 = AtomicU32::new(0);
static VE_RIP: AtomicU64 = AtomicU64::new(0);
/// The status of the handler's `view_switch(0)`, as a raw value + 1 (0:
/// not called).
static VE_SWITCH_STATUS: AtomicU64 = AtomicU64::new(0);

fn on_ve(frame: &mut TrapFrame) {
    let n = VE_COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    let info = vmx::ve_info();
    if n == 1 {
        VE_REASON.store(info.exit_reason, Ordering::SeqCst);
        VE_BUSY.store(info.busy, Ordering::SeqCst);
        VE_QUAL.store(info.qualification, Ordering::SeqCst);
        VE_GLA.store(info.guest_linear, Ordering::SeqCst);
        VE_GPA.store(info.guest_physical, Ordering::SeqCst);
        VE_INDEX.store(u32::from(info.eptp_index), Ordering::SeqCst);
        VE_RIP.store(frame.rip, Ordering::SeqCst);
    }
    if n > MAX_DELIVERIES {
        println!(
            "FAIL: #VE delivered {n} times (last: reason {}, gpa {:#x}, qualification {:#x}, eptp index {}, rip {:#x}); stopping",
            info.exit_reason, info.guest_physical, info.qualification, info.eptp_index, frame.rip
        );
        guest_runtime::exit(1);
    }
    if USE_VMFUNC.load(Ordering::SeqCst) {
        vmfunc_switch(0);
    } else {
        let status = view_switch(0);
        VE_SWITCH_STATUS.store(status as u64 + 1, Ordering::SeqCst);
    }
    vmx::ve_clear_busy();
}

fn fatal(what: &str, e: impl core::fmt::Display) -> u32 {
    println!("FAIL: {what}: {e}");
    1
}

fn main(info: &MultibootInfo) -> u32 {
    let suppressed = info
        .cmdline()
        .unwrap_or("")
        .split_whitespace()
        .any(|w| w == "suppressed");
    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => return fatal("Capabilities", e),
    };
    println!(
        "capabilities: vmfunc {}, ve {}, pml {}, max views {}",
        caps.vmfunc, caps.ve, caps.pml, caps.max_views
    );
    if !caps.ve {
        println!("no #VE on this CPU");
        return 0;
    }
    USE_VMFUNC.store(caps.vmfunc, Ordering::SeqCst);
    let mut checks = Checks(0);

    if let Err(e) = call_done(&Request::VeEnable {
        info_gfn: vmx::ve_info_gfn(),
    }) {
        return fatal("VeEnable", e);
    }
    let v = match hypercall::view_create() {
        Ok(v) => v,
        Err(e) => return fatal("ViewCreate", e),
    };
    P.write_u64(0, 0, BEFORE);
    let p_gfn = P.gfn(0);
    println!(
        "view {v}; P is gfn {p_gfn:#x}, #VE information at gfn {:#x}",
        vmx::ve_info_gfn()
    );
    let setup = [
        Request::SetAccess {
            view: v,
            gfn: p_gfn,
            access: Access::R,
        },
        Request::SetSuppressVe {
            view: v,
            gfn: p_gfn,
            suppress: false,
        },
    ];
    let setup = if suppressed { &setup[..1] } else { &setup[..] };
    for request in setup {
        if let Err(e) = call_done(request) {
            return fatal("setting up P in the view", format_args!("{request:?}: {e}"));
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

    idt::set_ve_handler(Some(on_ve));
    if caps.vmfunc {
        vmfunc_switch(u32::from(v));
    } else {
        match view_switch(v) {
            Status::Ok => {}
            other => return fatal("view_switch to the view", format_args!("{other:?}")),
        }
    }
    let busy_before = vmx::ve_busy();
    if suppressed {
        println!("writing P in view {v} with suppress-#VE set: the hypervisor must see it");
    }
    // The write: a #VE in view v; retried in view 0 after the handler.
    P.write_u64(0, 0, WRITTEN);
    idt::set_ve_handler(None);
    if suppressed {
        println!(
            "FAIL: the write went on in the guest ({} #VE deliveries) although suppress-#VE was set",
            VE_COUNT.load(Ordering::SeqCst)
        );
        return 1;
    }

    let count = VE_COUNT.load(Ordering::SeqCst);
    if count == 0 {
        // No #VE: whatever happened, leave view v.
        let _ = if caps.vmfunc {
            vmfunc_switch(0);
            Status::Ok
        } else {
            view_switch(0)
        };
    }
    let reason = VE_REASON.load(Ordering::SeqCst);
    let busy = VE_BUSY.load(Ordering::SeqCst);
    let qual = VE_QUAL.load(Ordering::SeqCst);
    let gla = VE_GLA.load(Ordering::SeqCst);
    let gpa = VE_GPA.load(Ordering::SeqCst);
    let index = VE_INDEX.load(Ordering::SeqCst);
    let p_addr = P.addr();
    checks.check(
        busy_before == 0,
        format_args!("the busy word was {busy_before:#x} before the write, expected 0"),
    );
    checks.check(
        count == 1,
        format_args!("{count} #VE deliveries, expected 1"),
    );
    if count >= 1 {
        println!("#VE delivered: gpa {gpa:#x}, qualification {qual:#x}, eptp index {index}");
        println!(
            "#VE details: exit reason {reason}, guest-linear {gla:#x}, busy {busy:#x}, rip {:#x}",
            VE_RIP.load(Ordering::SeqCst)
        );
        checks.check(
            reason == EXIT_REASON_EPT_VIOLATION,
            format_args!("#VE exit reason {reason}, expected {EXIT_REASON_EPT_VIOLATION}"),
        );
        checks.check(
            gpa == p_addr,
            format_args!("#VE gpa {gpa:#x}, expected P at {p_addr:#x}"),
        );
        checks.check(
            qual & QUAL_WRITE != 0,
            format_args!("#VE qualification {qual:#x} has no write bit"),
        );
        checks.check(
            busy == 0xffff_ffff,
            format_args!("#VE busy word {busy:#x}, expected 0xffffffff"),
        );
        if index != u32::from(v) {
            println!("warning: #VE eptp index {index}, expected view {v}");
        }
        match VE_SWITCH_STATUS.load(Ordering::SeqCst) {
            0 => {}
            1 => {}
            raw => checks.check(
                false,
                format_args!("view_switch(0) in the #VE handler: status {}", raw - 1),
            ),
        }
    }
    let now = P.read_u64(0, 0);
    checks.check(
        now == WRITTEN,
        format_args!("P holds {now:#x} after the write, expected {WRITTEN:#x}"),
    );
    checks.check(
        vmx::ve_busy() == 0,
        format_args!("the busy word was not cleared"),
    );

    if let Err(e) = call_done(&Request::VeDisable) {
        checks.check(false, format_args!("VeDisable: {e}"));
    }
    if let Err(e) = call_done(&Request::ViewDestroy { view: v }) {
        checks.check(false, format_args!("ViewDestroy {v}: {e}"));
    }
    if checks.0 == 0 {
        println!("ve: all checks passed");
        0
    } else {
        println!("ve: {} checks failed", checks.0);
        1
    }
}
