//! Dirty-page logs, as an in-guest agent gets them from the logdirty
//! service (LD-1..LD-4; docs/logdirty.md): the same write pattern logged by
//! PML and by write-protection, exactly, with views active.
//!
//! For each mechanism of the command line's `mode=` (`both`, the default:
//! PML then write-protection; `pml`, `wp`, `auto`):
//!
//! 1. With VMFUNC: view v where gfn A (page 0 of the buffer) maps the frame
//!    of gfn B (the buffer's last page), visible to VMFUNC.
//! 2. `DirtyLogStart` over a range holding the buffer and a 2 MiB-aligned
//!    area (one the hypervisor may map with a large page).
//! 3. Round 1: one byte into each of the buffer's pages 1..599 (more than
//!    one 512-entry PML buffer), into 8 pages spread over the 2 MiB area,
//!    and, switched to view v by VMFUNC, into A (B's contents change);
//!    back to view 0.
//! 4. A peek, then a read-and-clear: both must be exactly the pages
//!    written (B, not A) within the buffer and the area; a read after that
//!    finds none of them (cleared).
//! 5. Round 2: every third page written again (the log re-armed): the read
//!    must be exactly those.
//! 6. `DirtyLogStop`; a read after it is refused (`NotLogging`).
//!
//! With `both`, the two mechanisms' logs must be equal. On a CPU without
//! PML, `mode=pml` must be refused (`PmlUnsupported`) and `both` runs
//! write-protection alone, saying so.
//!
//! Prints `dirty: <mechanism>: round 1: N pages, exact` etc., and
//! `dirty: all checks passed` with status 0; each failure as `FAIL: ...`
//! with status 1.
#![no_std]
#![no_main]

use guest_runtime::abi::{HcError, Request};
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{LargePage, MultibootInfo, Pages, println, vmfunc_switch};
use ipc_schema::logdirty::{DirtyMode, GfnRange, LdError, Mechanism};

use guest_runtime::Checks;

guest_runtime::entry!(main);

const PAGES: usize = 600;
static BUF: Pages<PAGES> = Pages::new();
static LARGE: LargePage = LargePage::new();
/// Pages written in the large area: 0, 64, 128, ... 448 of 512.
const LARGE_TOUCHES: usize = 8;
const LARGE_STRIDE: usize = LargePage::PAGES / LARGE_TOUCHES;
/// The page remapped in view v, and the one whose frame it maps there.
const A: usize = 0;
const B: usize = PAGES - 1;
/// A set of gfns of the checked areas (the buffer and the 2 MiB area), a
/// bit each.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Set {
    buf: [u64; PAGES.div_ceil(64)],
    large: [u64; LargePage::PAGES / 64],
}

impl Set {
    fn bit(&mut self, g: u64) -> Option<(&mut u64, u64)> {
        let (words, first): (&mut [u64], u64) = if (BUF.gfn(0)..=BUF.gfn(PAGES - 1)).contains(&g) {
            (&mut self.buf, BUF.gfn(0))
        } else if (LARGE.gfn(0)..=LARGE.gfn(LargePage::PAGES - 1)).contains(&g) {
            (&mut self.large, LARGE.gfn(0))
        } else {
            return None;
        };
        let i = (g - first) as usize;
        Some((&mut words[i / 64], 1 << (i % 64)))
    }

    fn insert(&mut self, g: u64) {
        if let Some((w, b)) = self.bit(g) {
            *w |= b;
        }
    }

    fn contains(&self, g: u64) -> bool {
        let mut copy = *self;
        copy.bit(g).is_some_and(|(w, b)| *w & b != 0)
    }

    fn len(&self) -> u32 {
        self.buf
            .iter()
            .chain(self.large.iter())
            .map(|w| w.count_ones())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every gfn of the checked areas.
    fn all() -> impl Iterator<Item = u64> {
        (0..PAGES as u64)
            .map(|i| BUF.gfn(0) + i)
            .chain((0..LargePage::PAGES as u64).map(|i| LARGE.gfn(0) + i))
    }
}

/// The log's gfns within the checked areas.
fn read(clear: bool) -> Result<Set, hypercall::HelperError> {
    let mut set = Set::default();
    hypercall::dirty_log_collect(clear, |g| set.insert(g))?;
    Ok(set)
}

/// Writes round `round`'s pattern; the gfns it changes.
fn pattern(round: u8, view: Option<u16>) -> Set {
    let mut set = Set::default();
    let every = if round == 1 { 1 } else { 3 };
    for i in (1..B).filter(|i| i % every == 0) {
        BUF.write_u8(i, (i * 64) % guest_runtime::PAGE_SIZE, round);
        set.insert(BUF.gfn(i));
    }
    for k in (0..LARGE_TOUCHES).filter(|k| k % every == 0) {
        LARGE.write_u8(k * LARGE_STRIDE, k * 8, round);
        set.insert(LARGE.gfn(k * LARGE_STRIDE));
    }
    if let Some(v) = view {
        // In view v, A's address reaches B's frame.
        vmfunc_switch(u32::from(v));
        BUF.write_u8(A, 16, round);
        vmfunc_switch(0);
        set.insert(BUF.gfn(B));
    }
    set
}

fn describe(set: &Set, want: &Set) {
    let missing = Set::all()
        .filter(|&g| want.contains(g) && !set.contains(g))
        .count();
    let extra: heapless::Vec<u64, 4> = Set::all()
        .filter(|&g| set.contains(g) && !want.contains(g))
        .take(4)
        .collect();
    println!(
        "   {} logged, {} expected: {missing} missing, extra (first 4) {extra:#x?}",
        set.len(),
        want.len()
    );
}

/// One mechanism's run: the logs of rounds 1 and 2.
fn run(mode: DirtyMode, view: Option<u16>, checks: &mut Checks) -> Option<(Set, Set)> {
    let lo = BUF.gfn(0).min(LARGE.gfn(0));
    let hi = BUF.gfn(PAGES - 1).max(LARGE.gfn(LargePage::PAGES - 1));
    let range = GfnRange {
        gfn: lo,
        count: hi - lo + 1,
    };
    let mechanism = match hypercall::dirty_log_start(Some(range), mode) {
        Ok(m) => m,
        Err(e) => {
            checks.check(false, format_args!("DirtyLogStart {mode:?}: {e}"));
            return None;
        }
    };
    let name = match mechanism {
        Mechanism::Pml => "pml",
        Mechanism::WriteProtect => "write-protection",
    };
    println!(
        "dirty: {mode:?} runs on {name}, range {lo:#x}+{:#x}",
        range.count
    );
    let mut logs = [Set::default(), Set::default()];
    for round in 1..=2u8 {
        let want = pattern(round, view);
        let peeked = read(false);
        let got = read(true);
        let again = read(true);
        match (peeked, got, again) {
            (Ok(p), Ok(g), Ok(a)) => {
                checks.check(
                    p == g,
                    format_args!("{name}: round {round}: a peek and the read after it differ"),
                );
                let exact = g == want;
                if !exact {
                    describe(&g, &want);
                }
                checks.check(
                    exact,
                    format_args!("{name}: round {round}: the log is not exactly the pages written"),
                );
                checks.check(
                    a.is_empty(),
                    format_args!(
                        "{name}: round {round}: {} pages still logged after a read-and-clear",
                        a.len()
                    ),
                );
                if exact {
                    println!("dirty: {name}: round {round}: {} pages, exact", g.len());
                }
                logs[usize::from(round - 1)] = g;
            }
            (p, g, a) => {
                for r in [p, g, a] {
                    if let Err(e) = r {
                        checks.check(false, format_args!("{name}: DirtyLogRead: {e}"));
                    }
                }
                return None;
            }
        }
    }
    if let Err(e) = call_done(&Request::DirtyLogStop) {
        checks.check(false, format_args!("{name}: DirtyLogStop: {e}"));
    }
    // Reading a log that was stopped.
    let after = read(true).err().and_then(|e| e.hc_error());
    checks.check(
        after == Some(HcError::DirtyLog(LdError::NotLogging)),
        format_args!("{name}: a read after DirtyLogStop answered {after:?}"),
    );
    let [one, two] = logs;
    Some((one, two))
}

/// View v, with A mapping B's frame, visible to VMFUNC.
fn make_view(checks: &mut Checks) -> Option<u16> {
    let v = match hypercall::view_create() {
        Ok(v) => v,
        Err(e) => {
            checks.check(false, format_args!("ViewCreate: {e}"));
            return None;
        }
    };
    let steps = [
        Request::ChangeGfn {
            view: v,
            gfn: BUF.gfn(A),
            to: Some(BUF.gfn(B)),
        },
        Request::ViewSetVisible {
            view: v,
            visible: true,
        },
    ];
    for s in &steps {
        if let Err(e) = call_done(s) {
            checks.check(false, format_args!("{s:?}: {e}"));
            return None;
        }
    }
    Some(v)
}

fn main(info: &MultibootInfo) -> u32 {
    let cmdline = info.cmdline().unwrap_or("");
    let mode = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mode="))
        .unwrap_or("both");
    let mut checks = Checks(0);
    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL: Capabilities: {e}");
            return 1;
        }
    };
    println!(
        "capabilities: vmfunc {}, ve {}, pml {}, max views {}",
        caps.vmfunc, caps.ve, caps.pml, caps.max_views
    );
    let view = if caps.vmfunc {
        make_view(&mut checks)
    } else {
        println!("dirty: no VMFUNC: the pattern is written in view 0 alone");
        None
    };
    let modes: &[DirtyMode] = match mode {
        "pml" => &[DirtyMode::Pml],
        "wp" => &[DirtyMode::WriteProtect],
        "auto" => &[DirtyMode::Auto],
        _ => &[DirtyMode::Pml, DirtyMode::WriteProtect],
    };
    let mut results: heapless::Vec<(Set, Set), 2> = heapless::Vec::new();
    for &m in modes {
        if m == DirtyMode::Pml && !caps.pml {
            let r = hypercall::dirty_log_start(None, m);
            let e = r.as_ref().err().and_then(|e| e.hc_error());
            checks.check(
                e == Some(HcError::DirtyLog(LdError::PmlUnsupported)),
                format_args!("PML asked for without PML: {r:?}"),
            );
            println!("dirty: PML absent on this CPU: refused as PmlUnsupported");
            continue;
        }
        if let Some(r) = run(m, view, &mut checks) {
            let _ = results.push(r);
        }
    }
    if let [a, b] = results.as_slice() {
        checks.check(
            a == b,
            format_args!("the PML and write-protection logs differ"),
        );
        if a == b {
            println!("dirty: pml and write-protection logs are equal");
        }
    }
    if checks.0 == 0 {
        println!("dirty: all checks passed");
        0
    } else {
        println!("dirty: {} checks failed", checks.0);
        1
    }
}
