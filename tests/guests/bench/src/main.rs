//! Micro-benchmarks, printed as `BENCH <key>=<value>` lines.
//!
//! Each operation is timed as `rdtsc; op; rdtsc` and the raw difference
//! kept (no overhead subtracted: `rdtsc_frame_ticks` is that overhead, and
//! the reference measurements this project compares against are taken the
//! same way). Unless said otherwise: 10 warm-up runs, then 1000 samples,
//! and the value printed is the median.
//!
//! | key | operation |
//! |---|---|
//! | `rdtsc_frame_ticks` | nothing (two back-to-back RDTSC) |
//! | `vmcall_kernel_ticks` | the `HC_NULL` hypercall |
//! | `vmfunc_switch_ticks` | one VMFUNC view switch, alternately 0 -> v and v -> 0 |
//! | `vmfunc_switch_exits` | VM exits over 1000 VMFUNC switches (`exit_count` difference minus the `exit_count` call's own exit) |
//! | `lazy_fill_ticks` | in a fresh view, a read of a page never touched in that view; 10 warm-up pages, then 200. A new view is a copy of the host p2m (`EptOp::CopyHost`), so there is nothing to fill: no exit, the read alone |
//! | `first_touch_exits` | VM exits over those 200 first touches (`exit_count` difference minus its own exit) |
//! | `view_create_ticks` | one `ViewCreate` (the altp2m service has the kernel copy the host p2m into the new view); each view destroyed outside the timed window; 10 warm-up, 100 samples |
//! | `view_switch_hypercall_ticks` | one `HC_VIEW_SWITCH`, alternately to v and back to 0 |
//! | `vmcall_service_ticks` | the `HC_SERVICE_NULL` hypercall: exit, IPC to the vmm service in ring 3, its reply, entry |
//! | `ve_delivery_ticks` | a write to a page that is read-only in a view, with its suppress-#VE bit clear, until the guest's #VE handler runs (no VM exit; 10 warm-up, 100 samples) |
//! | `violation_event_ticks` | with command line `listener` (a listener service inside the hypervisor): a write to a read-only page of a view, the event to the listener, its answer (back to view 0) and the write done on resume (10 warm-up, 100 samples) |
//! | `ipc_roundtrip_ticks` | one call and reply between two services (vmm to altp2m), timed by the vmm with RDTSC; `HC_IPC_PING` returns it (median of 1000, no warm-up) |
//! | `dirty_wp_fault_ticks` | with the agent's dirty log on write-protection (the logdirty service), the first write to a page: the fault on the entry the altp2m service armed, made writable and recorded by the kernel, the write done on resume (10 warm-up pages, 100 samples) |
//! | `dirty_pml_exits_per_1000_pages` | with the agent's dirty log on PML, VM exits while 1000 distinct pages are written once each (PML-full exits to the logdirty service) |
//!
//! With `profile=KEY` on the command line, the operation of benchmark KEY
//! also runs once, after its warm-up, between two Bochs magic breakpoints
//! (`xchg bx, bx`, which does nothing anywhere else): `cargo hv profile KEY`
//! traces the instructions between them.
//!
//! A key whose feature the CPU lacks (no VMFUNC, no #VE) is printed as
//! `BENCH <key>=null`; a key that could not be measured because something
//! that should work failed, as `BENCH <key>=failed` (`cargo hv bench` then
//! fails). Exit status 0; 1 when a hypercall that should work fails. On plain QEMU the guest prints `rdtsc_frame_ticks`
//! and then the first hypercall raises #UD (status 0xEE).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_runtime::abi::{Access, Request, Status};
use guest_runtime::abi::{DirtyMode, GfnRange};
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{
    MultibootInfo, Pages, exit_count, ipc_ping, null, println, rdtsc, service_null, view_switch,
    vmfunc_switch,
};

guest_runtime::entry!(main);

const WARMUP: usize = 10;
const SAMPLES: usize = 1000;
const EPT_SAMPLES: usize = 200;
/// Pages first touched in the fresh view: warm-up ones, then measured ones,
/// then one for a profile.
static EPT_PAGES: Pages<{ WARMUP + EPT_SAMPLES + 1 }> = Pages::new();
/// The page written for `ve_delivery_ticks` and `violation_event_ticks`.
static RESTRICTED: Pages<1> = Pages::new();
const FAULT_SAMPLES: usize = 100;
/// Pages first written under write-protection (warm-up, samples, profile).
static DIRTY_PAGES: Pages<{ WARMUP + FAULT_SAMPLES + 1 }> = Pages::new();
/// Pages written once each under PML.
const PML_WRITES: usize = 1000;
static PML_PAGES: Pages<PML_WRITES> = Pages::new();
/// When the #VE handler ran.
static VE_AT: AtomicU64 = AtomicU64::new(0);
static VE_BY_VMFUNC: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

fn on_ve(_frame: &mut guest_runtime::TrapFrame) {
    VE_AT.store(rdtsc(), Ordering::SeqCst);
    if VE_BY_VMFUNC.load(Ordering::SeqCst) {
        vmfunc_switch(0);
    } else {
        view_switch(0);
    }
    guest_runtime::ve_clear_busy();
}

/// A view where RESTRICTED is read-only (its #VE unsuppressed when `ve`),
/// visible to VMFUNC when `vmfunc`.
fn restricted_view(ve: bool, vmfunc: bool) -> Option<u16> {
    let v = hypercall::view_create().ok()?;
    let gfn = RESTRICTED.gfn(0);
    let mut setup = heapless::Vec::<Request, 3>::new();
    let _ = setup.push(Request::SetAccess {
        view: v,
        gfn,
        access: Access::RX,
    });
    if ve {
        let _ = setup.push(Request::SetSuppressVe {
            view: v,
            gfn,
            suppress: false,
        });
    }
    if vmfunc {
        let _ = setup.push(Request::ViewSetVisible {
            view: v,
            visible: true,
        });
    }
    for r in &setup {
        if let Err(e) = call_done(r) {
            println!("FAIL: {r:?}: {e}");
            return None;
        }
    }
    Some(v)
}

/// Median ticks of `FAULT_SAMPLES` writes to RESTRICTED from view `v`, each
/// ending in view 0; `end` reads the tick the fault's handling reached.
/// Benchmark `key`.
fn restricted_writes(
    b: &Bench<'_>,
    key: &str,
    v: u16,
    vmfunc: bool,
    end: impl Fn(u64) -> u64,
) -> Option<u64> {
    let mut samples = [0u64; FAULT_SAMPLES];
    for i in 0..WARMUP + FAULT_SAMPLES {
        if !switch(v, vmfunc) {
            println!("FAIL: switching to view {v}");
            return None;
        }
        if i == WARMUP {
            b.point(key, || RESTRICTED.write_u64(0, 0, i as u64));
            if !switch(v, vmfunc) {
                println!("FAIL: switching to view {v}");
                return None;
            }
        }
        let t0 = rdtsc();
        RESTRICTED.write_u64(0, 0, i as u64);
        let t1 = rdtsc();
        if i >= WARMUP {
            samples[i - WARMUP] = end(t1).wrapping_sub(t0);
        }
    }
    Some(median(&mut samples))
}

fn median(samples: &mut [u64]) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// The run's profile request (`profile=KEY`).
struct Bench<'a> {
    profile: Option<&'a str>,
}

impl Bench<'_> {
    /// Runs `op` once between two magic breakpoints if `key` is the one to
    /// profile.
    fn point(&self, key: &str, op: impl FnOnce()) {
        if self.profile == Some(key) {
            println!("profile: {key}");
            // Safety: `xchg bx, bx` swaps a register with itself: nothing
            // changes (Bochs stops its debugger there when asked to).
            unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack)) };
            op();
            // Safety: as above.
            unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack)) };
        }
    }

    /// Times `op(i)` for i in 0..WARMUP (discarded), then
    /// WARMUP..WARMUP+SAMPLES; returns the median. Benchmark `key`.
    #[inline(always)]
    fn measure(&self, key: &str, op: impl FnMut(usize)) -> u64 {
        measure(op, |op| self.point(key, || op(WARMUP)))
    }
}

/// Times `op(i)` for i in 0..WARMUP (discarded), then WARMUP..WARMUP+SAMPLES;
/// returns the median. `between` runs after the warm-up.
#[inline(always)]
fn measure<F: FnMut(usize)>(mut op: F, between: impl FnOnce(&mut F)) -> u64 {
    let mut samples = [0u64; SAMPLES];
    for i in 0..WARMUP {
        let t0 = rdtsc();
        op(i);
        let t1 = rdtsc();
        core::hint::black_box(t1.wrapping_sub(t0));
    }
    between(&mut op);
    for (i, s) in samples.iter_mut().enumerate() {
        let t0 = rdtsc();
        op(WARMUP + i);
        let t1 = rdtsc();
        *s = t1.wrapping_sub(t0);
    }
    median(&mut samples)
}

fn bench(key: &str, value: Option<u64>) {
    match value {
        Some(v) => println!("BENCH {key}={v}"),
        None => println!("BENCH {key}=null"),
    }
}

/// A figure that could not be measured because something failed.
fn bench_failed(key: &str) {
    println!("BENCH {key}=failed");
}

/// The view to alternate with view 0 in sample `i`.
fn target(i: usize, view: u16) -> u16 {
    if i.is_multiple_of(2) { view } else { 0 }
}

/// Switches to `view` by VMFUNC or by hypercall; false if the hypercall
/// refused.
fn switch(view: u16, by_vmfunc: bool) -> bool {
    if by_vmfunc {
        vmfunc_switch(u32::from(view));
        true
    } else {
        view_switch(view) == Status::Ok
    }
}

/// `count` VMFUNC switches, alternately to `view` and back to 0.
#[inline(never)]
fn vmfunc_switches(view: u16, count: usize) {
    for i in 0..count {
        vmfunc_switch(u32::from(target(i, view)));
    }
}

/// `ViewCreate` (each view destroyed again outside the timed window): the
/// median of 100 after 10 warm-up runs; `None` if one is refused.
fn view_creations(b: &Bench<'_>) -> Option<u64> {
    let mut samples = [0u64; 100];
    let mut refused = false;
    let mut create = || {
        let t0 = rdtsc();
        let made = hypercall::view_create();
        let t1 = rdtsc();
        match made.map(|v| call_done(&Request::ViewDestroy { view: v })) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                println!("FAIL: ViewCreate and ViewDestroy: {e}");
                refused = true;
            }
        }
        t1.wrapping_sub(t0)
    };
    for _ in 0..WARMUP {
        create();
    }
    b.point("view_create_ticks", || {
        create();
    });
    for s in samples.iter_mut() {
        *s = create();
    }
    (!refused).then(|| median(&mut samples))
}

/// The first touches of fresh pages in a fresh view: (median ticks, VM exits
/// counted over the measured touches).
fn ept_violations(b: &Bench<'_>, view: u16, by_vmfunc: bool) -> Option<(u64, u64)> {
    let mut samples = [0u64; EPT_SAMPLES];
    if !switch(view, by_vmfunc) {
        println!("FAIL: switching to view {view}");
        return None;
    }
    // Warm-up: fills the view's entries for this code, the stack and
    // `samples` (each first touch outside the timed window).
    for page in 0..WARMUP {
        let t0 = rdtsc();
        core::hint::black_box(EPT_PAGES.read_u64(page, 0));
        let t1 = rdtsc();
        core::hint::black_box(t1.wrapping_sub(t0));
    }
    b.point("lazy_fill_ticks", || {
        core::hint::black_box(EPT_PAGES.read_u64(WARMUP + EPT_SAMPLES, 0));
    });
    let _ = exit_count();
    let before = exit_count();
    for (i, s) in samples.iter_mut().enumerate() {
        let t0 = rdtsc();
        core::hint::black_box(EPT_PAGES.read_u64(WARMUP + i, 0));
        let t1 = rdtsc();
        *s = t1.wrapping_sub(t0);
    }
    let after = exit_count();
    if !switch(0, by_vmfunc) {
        println!("FAIL: switching back to view 0");
        return None;
    }
    Some((
        median(&mut samples),
        after.wrapping_sub(before).wrapping_sub(1),
    ))
}

fn main(info: &MultibootInfo) -> u32 {
    let mut failed = false;
    let listener = info
        .cmdline()
        .unwrap_or("")
        .split_whitespace()
        .any(|w| w == "listener");
    let b = Bench {
        profile: info
            .cmdline()
            .unwrap_or("")
            .split_whitespace()
            .find_map(|w| w.strip_prefix("profile=")),
    };
    bench(
        "rdtsc_frame_ticks",
        Some(b.measure("rdtsc_frame_ticks", |_| {})),
    );
    bench(
        "vmcall_kernel_ticks",
        Some(b.measure("vmcall_kernel_ticks", |_| {
            null();
        })),
    );

    bench(
        "vmcall_service_ticks",
        Some(b.measure("vmcall_service_ticks", |_| {
            service_null();
        })),
    );
    // A first ping binds the vmm's client to the altp2m service.
    let _ = ipc_ping();
    b.point("ipc_roundtrip_ticks", || {
        let _ = ipc_ping();
    });
    let mut pings = [0u64; SAMPLES];
    let mut pinged = true;
    for (i, p) in pings.iter_mut().enumerate() {
        match ipc_ping() {
            Some(t) => *p = t,
            None => {
                println!("FAIL: the IPC ping hypercall was refused (sample {i})");
                failed = true;
                pinged = false;
                break;
            }
        }
    }
    if pinged {
        bench("ipc_roundtrip_ticks", Some(median(&mut pings)));
    } else {
        bench_failed("ipc_roundtrip_ticks");
    }

    let caps = match hypercall::capabilities() {
        Ok(c) => Some(c),
        Err(e) => {
            println!("FAIL: Capabilities: {e}");
            failed = true;
            None
        }
    };
    let vmfunc = caps.is_some_and(|c| c.vmfunc);
    if let Some(c) = caps {
        println!(
            "capabilities: vmfunc {}, ve {}, pml {}, max views {}",
            c.vmfunc, c.ve, c.pml, c.max_views
        );
    }

    // The view switched to and from.
    let view = match caps.map(|_| hypercall::view_create()) {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            println!("FAIL: no alternate view: ViewCreate: {e}");
            failed = true;
            None
        }
        None => None,
    };
    // Views exist on every CPU Parallax runs guests on: a figure that needs
    // one and has none failed.
    let no_view = |key: &str| bench_failed(key);

    // VMFUNC.
    let mut vmfunc_view = None;
    if let (true, Some(v)) = (vmfunc, view) {
        match call_done(&Request::ViewSetVisible {
            view: v,
            visible: true,
        }) {
            Ok(()) => vmfunc_view = Some(v),
            Err(e) => {
                println!("FAIL: ViewSetVisible {v}: {e}");
                failed = true;
            }
        }
    }
    match vmfunc_view {
        Some(v) => {
            bench(
                "vmfunc_switch_ticks",
                Some(b.measure("vmfunc_switch_ticks", |i| {
                    vmfunc_switch(u32::from(target(i, v)))
                })),
            );
            // A first run fills view v's entries for this loop's code.
            vmfunc_switches(v, 2);
            let _ = exit_count();
            let before = exit_count();
            vmfunc_switches(v, SAMPLES);
            let after = exit_count();
            bench(
                "vmfunc_switch_exits",
                Some(after.wrapping_sub(before).wrapping_sub(1)),
            );
        }
        None if vmfunc => {
            bench_failed("vmfunc_switch_ticks");
            bench_failed("vmfunc_switch_exits");
        }
        None => {
            bench("vmfunc_switch_ticks", None);
            bench("vmfunc_switch_exits", None);
        }
    }

    // EPT violations in a fresh view.
    let fresh = match view.map(|_| hypercall::view_create()) {
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => {
            println!("FAIL: a second ViewCreate: {e}");
            failed = true;
            None
        }
        None => None,
    };
    let mut fresh_by_vmfunc = false;
    if let (true, Some(w)) = (vmfunc, fresh) {
        match call_done(&Request::ViewSetVisible {
            view: w,
            visible: true,
        }) {
            Ok(()) => fresh_by_vmfunc = true,
            Err(e) => println!("ViewSetVisible {w}: {e}; switching by hypercall"),
        }
    }
    match fresh.map(|w| ept_violations(&b, w, fresh_by_vmfunc)) {
        Some(Some((ticks, exits))) => {
            bench("lazy_fill_ticks", Some(ticks));
            bench("first_touch_exits", Some(exits));
            println!("first touches in a fresh view: {EPT_SAMPLES} pages, {exits} VM exits");
        }
        Some(None) => {
            failed = true;
            bench_failed("lazy_fill_ticks");
            bench_failed("first_touch_exits");
        }
        None => {
            no_view("lazy_fill_ticks");
            no_view("first_touch_exits");
        }
    }

    // What a view costs instead: its creation (the copy of the host p2m).
    match view.map(|_| view_creations(&b)) {
        Some(Some(ticks)) => bench("view_create_ticks", Some(ticks)),
        Some(None) => {
            failed = true;
            bench_failed("view_create_ticks");
        }
        None => no_view("view_create_ticks"),
    }

    // The view-switch hypercall.
    match view {
        Some(v) if view_switch(v) == Status::Ok && view_switch(0) == Status::Ok => {
            let mut refused = 0u32;
            let ticks = b.measure("view_switch_hypercall_ticks", |i| {
                if view_switch(target(i, v)) != Status::Ok {
                    refused += 1;
                }
            });
            if refused == 0 {
                bench("view_switch_hypercall_ticks", Some(ticks));
            } else {
                println!("FAIL: view_switch refused {refused} times");
                failed = true;
                bench_failed("view_switch_hypercall_ticks");
            }
        }
        Some(v) => {
            println!("FAIL: view_switch to {v} and back refused");
            failed = true;
            bench_failed("view_switch_hypercall_ticks");
        }
        None => no_view("view_switch_hypercall_ticks"),
    }

    // #VE delivery: fault to the guest's handler, without a VM exit.
    let ve_cpu = caps.is_some_and(|c| c.ve);
    let ve = ve_cpu
        && match call_done(&Request::VeEnable {
            info_gfn: guest_runtime::ve_info_gfn(),
        }) {
            Ok(()) => true,
            Err(e) => {
                println!("FAIL: VeEnable: {e}");
                failed = true;
                false
            }
        };
    let mut ve_ticks = None;
    if ve && let Some(v) = restricted_view(true, vmfunc) {
        VE_BY_VMFUNC.store(vmfunc, Ordering::SeqCst);
        guest_runtime::idt::set_ve_handler(Some(on_ve));
        ve_ticks = restricted_writes(&b, "ve_delivery_ticks", v, vmfunc, |_| {
            VE_AT.load(Ordering::SeqCst)
        });
        guest_runtime::idt::set_ve_handler(None);
        let _ = call_done(&Request::VeDisable);
        let _ = call_done(&Request::ViewDestroy { view: v });
        failed |= ve_ticks.is_none();
    }
    match ve_ticks {
        None if ve_cpu => bench_failed("ve_delivery_ticks"),
        t => bench("ve_delivery_ticks", t),
    }

    // A violation event answered by the listener inside the hypervisor.
    let mut event_ticks = None;
    if listener && caps.is_some() {
        match restricted_view(false, vmfunc) {
            Some(v) => {
                event_ticks = restricted_writes(&b, "violation_event_ticks", v, vmfunc, |t1| t1);
                let _ = call_done(&Request::ViewDestroy { view: v });
                failed |= event_ticks.is_none();
            }
            None => failed = true,
        }
    }
    match event_ticks {
        None if listener => bench_failed("violation_event_ticks"),
        t => bench("violation_event_ticks", t),
    }

    // Dirty logging (issue 10): a write-protection fault, PML's exits.
    match caps.map(|_| dirty_wp_fault(&b)) {
        Some(Some(t)) => bench("dirty_wp_fault_ticks", Some(t)),
        Some(None) => {
            failed = true;
            bench_failed("dirty_wp_fault_ticks");
        }
        None => bench_failed("dirty_wp_fault_ticks"),
    }
    match caps.map(|c| c.pml) {
        Some(true) => match dirty_pml_exits() {
            Some(n) => bench("dirty_pml_exits_per_1000_pages", Some(n)),
            None => {
                failed = true;
                bench_failed("dirty_pml_exits_per_1000_pages");
            }
        },
        Some(false) => bench("dirty_pml_exits_per_1000_pages", None),
        None => bench_failed("dirty_pml_exits_per_1000_pages"),
    }

    for w in [fresh, view].into_iter().flatten() {
        if let Err(e) = call_done(&Request::ViewDestroy { view: w }) {
            println!("FAIL: ViewDestroy {w}: {e}");
            failed = true;
        }
    }
    u32::from(failed)
}

/// `dirty_wp_fault_ticks`: the median first write to a page under a
/// write-protection dirty log.
fn dirty_wp_fault(b: &Bench<'_>) -> Option<u64> {
    const N: usize = WARMUP + FAULT_SAMPLES + 1;
    let range = GfnRange {
        gfn: DIRTY_PAGES.gfn(0),
        count: N as u64,
    };
    if let Err(e) = hypercall::dirty_log_start(Some(range), DirtyMode::WriteProtect) {
        println!("FAIL: DirtyLogStart on write-protection: {e}");
        return None;
    }
    let mut samples = [0u64; FAULT_SAMPLES];
    for page in 0..WARMUP + FAULT_SAMPLES {
        let t0 = rdtsc();
        DIRTY_PAGES.write_u64(page, 0, page as u64);
        let t1 = rdtsc();
        if page >= WARMUP {
            samples[page - WARMUP] = t1.wrapping_sub(t0);
        }
    }
    b.point("dirty_wp_fault_ticks", || {
        DIRTY_PAGES.write_u64(N - 1, 0, 1)
    });
    // Every page written is in the log.
    let mut logged = 0u64;
    let read = hypercall::dirty_log_collect(true, |g| {
        if (range.gfn..range.gfn + range.count).contains(&g) {
            logged += 1;
        }
    });
    let _ = call_done(&Request::DirtyLogStop);
    match read {
        Ok(_) if logged >= (WARMUP + FAULT_SAMPLES) as u64 => Some(median(&mut samples)),
        Ok(_) => {
            println!("FAIL: {logged} of the pages written were logged");
            None
        }
        Err(e) => {
            println!("FAIL: DirtyLogRead: {e}");
            None
        }
    }
}

/// `dirty_pml_exits_per_1000_pages`: VM exits while 1000 pages are dirtied
/// under a PML log.
fn dirty_pml_exits() -> Option<u64> {
    let range = GfnRange {
        gfn: PML_PAGES.gfn(0),
        count: PML_WRITES as u64,
    };
    if let Err(e) = hypercall::dirty_log_start(Some(range), DirtyMode::Pml) {
        println!("FAIL: DirtyLogStart on PML: {e}");
        return None;
    }
    let _ = exit_count();
    let before = exit_count();
    for page in 0..PML_WRITES {
        PML_PAGES.write_u8(page, 0, 1);
    }
    let after = exit_count();
    let mut logged = 0u64;
    let read = hypercall::dirty_log_collect(true, |_| logged += 1);
    let _ = call_done(&Request::DirtyLogStop);
    match read {
        Ok(_) if logged == PML_WRITES as u64 => Some(after.wrapping_sub(before).wrapping_sub(1)),
        Ok(_) => {
            println!("FAIL: {logged} pages logged by PML, {PML_WRITES} written");
            None
        }
        Err(e) => {
            println!("FAIL: DirtyLogRead: {e}");
            None
        }
    }
}
