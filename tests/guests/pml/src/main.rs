//! Dirty-page logging: every page the guest writes after `DirtyLogStart`
//! must be reported by `DirtyLogRead`.
//!
//! 1. `Capabilities`; without PML: `PML absent on this CPU`, status 0.
//! 2. `DirtyLogStart`.
//! 3. Writes one byte to each of 600 distinct pages of a page-aligned
//!    static (more than the 512 entries of one PML buffer, so the
//!    hypervisor sees at least one buffer-full exit), and one byte to each
//!    of 8 pages spread over a 2 MiB-aligned 2 MiB static (a region the
//!    hypervisor may map with one large page: each write must still be
//!    logged as its own 4 KiB gfn).
//! 4. `DirtyLogRead` until `more` is false, collecting the gfns (duplicates
//!    and extra gfns, such as the stack and the request page, are fine).
//! 5. Checks that every written page's gfn was reported, then
//!    `DirtyLogStop`.
//!
//! Prints `pml: wrote N pages, hypervisor reported M gfns, all written
//! pages present` and exits 0, or lists the first missing gfns and exits 1.
//! On plain QEMU the first hypercall raises #UD (status 0xEE).
#![no_std]
#![no_main]

use guest_runtime::abi::Request;
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{LargePage, MultibootInfo, Pages, println};

guest_runtime::entry!(main);

const PAGES: usize = 600;
static BUF: Pages<PAGES> = Pages::new();
static LARGE: LargePage = LargePage::new();
/// Pages written in the large area: 0, 64, 128, ... 448 of 512.
const LARGE_TOUCHES: usize = 8;
const LARGE_STRIDE: usize = LargePage::PAGES / LARGE_TOUCHES;
/// gfns tracked in the bitmap: the first 256 MiB (the guest's image, where
/// every written page lies, is far below).
const TRACKED_GFNS: usize = 1 << 16;
/// Reads after which the log is taken to never drain.
const MAX_READS: u32 = 1000;

fn main(_info: &MultibootInfo) -> u32 {
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
    if !caps.pml {
        println!("PML absent on this CPU");
        return 0;
    }

    // The pages to write, as gfns.
    let mut written = [0u64; PAGES + LARGE_TOUCHES];
    for (i, w) in written.iter_mut().take(PAGES).enumerate() {
        *w = BUF.gfn(i);
    }
    for k in 0..LARGE_TOUCHES {
        written[PAGES + k] = LARGE.gfn(k * LARGE_STRIDE);
    }
    if let Some(g) = written.iter().find(|&&g| g >= TRACKED_GFNS as u64) {
        println!("FAIL: written gfn {g:#x} is beyond the tracked range");
        return 1;
    }
    println!(
        "buffer: gfns {:#x}..={:#x}; 2 MiB area: gfns {:#x}..={:#x}",
        BUF.gfn(0),
        BUF.gfn(PAGES - 1),
        LARGE.gfn(0),
        LARGE.gfn(LargePage::PAGES - 1)
    );

    if let Err(e) = call_done(&Request::DirtyLogStart) {
        println!("FAIL: DirtyLogStart: {e}");
        return 1;
    }
    for i in 0..PAGES {
        BUF.write_u8(i, (i * 64) % guest_runtime::PAGE_SIZE, 0x5a);
    }
    for k in 0..LARGE_TOUCHES {
        LARGE.write_u8(k * LARGE_STRIDE, k * 8, 0xa5);
    }

    let mut seen = [0u64; TRACKED_GFNS / 64];
    let mut reported = 0usize;
    let mut distinct = 0usize;
    let mut reads = 0u32;
    loop {
        let (gfns, more) = match hypercall::dirty_log_read() {
            Ok(r) => r,
            Err(e) => {
                println!("FAIL: DirtyLogRead: {e}");
                return 1;
            }
        };
        reads += 1;
        for &g in &gfns {
            reported += 1;
            if let Ok(g) = usize::try_from(g)
                && g < TRACKED_GFNS
            {
                let (word, bit) = (g / 64, 1u64 << (g % 64));
                if seen[word] & bit == 0 {
                    distinct += 1;
                }
                seen[word] |= bit;
            }
        }
        if !more {
            break;
        }
        if reads >= MAX_READS {
            println!("FAIL: the dirty log still has more after {reads} reads ({reported} gfns)");
            return 1;
        }
    }
    if let Err(e) = call_done(&Request::DirtyLogStop) {
        println!("FAIL: DirtyLogStop: {e}");
        return 1;
    }
    println!("pml: {reads} DirtyLogRead calls, {distinct} distinct gfns below {TRACKED_GFNS:#x}");

    let is_seen = |g: u64| seen[(g / 64) as usize] & (1 << (g % 64)) != 0;
    let missing = written.iter().filter(|&&g| !is_seen(g)).count();
    if missing == 0 {
        println!(
            "pml: wrote {} pages, hypervisor reported {reported} gfns, all written pages present",
            written.len()
        );
        0
    } else {
        println!(
            "FAIL: pml: wrote {} pages, hypervisor reported {reported} gfns, {missing} written pages missing",
            written.len()
        );
        for g in written.iter().filter(|&&g| !is_seen(g)).take(16) {
            println!("  missing gfn {g:#x}");
        }
        1
    }
}
