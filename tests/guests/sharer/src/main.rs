//! The guest of the page-sharing boot test (`tests/sharing.rs`, SH-1..SH-4).
//!
//! Command line: `tag=N`. It fills page 0 and 1 of its data buffer with
//! `0x5eed_0000 + N * 0x100 + page` (word 0), makes two views visible to
//! VMFUNC (view 1 remaps data page 3 to page 2's frame: a page a view
//! modifies, SH-3), prints
//! `sharer: ready data=0x... ctrl=0x... views=V tag=N`, and then obeys the
//! control word (word 0 of its control page, written by the host):
//!
//! - 1: reads word 0 of data page 0, writes word `v + 1` of it through
//!   every view v (view 0 and each alternate view, switched to by VMFUNC),
//!   reads them back in view 0 and prints
//!   `sharer: page 0 read 0x...; wrote through V views: 0x.. 0x..; first
//!   write N ticks` (the TSC ticks of the write through view 0: with the
//!   page shared, a copy-on-write break);
//! - 2: prints `sharer: done` and exits 0.
//!
//! The control word is cleared once a command is done. Word 1 of the
//! control page is `0xc70000 + N`, so that it is a page of its own. Between looks at it
//! the guest makes a null service call, so that it does not spin.
#![no_std]
#![no_main]

use guest_runtime::abi::Request;
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{MultibootInfo, Pages, println, rdtsc, service_null, vmfunc_switch};

guest_runtime::entry!(main);

static DATA: Pages<4> = Pages::new();
static CTRL: Pages<1> = Pages::new();
const VIEWS: usize = 2;

fn arg(cmdline: &str, key: &str) -> u64 {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

fn views() -> Option<heapless::Vec<u16, VIEWS>> {
    let mut out = heapless::Vec::new();
    for i in 0..VIEWS {
        let v = hypercall::view_create().ok()?;
        let mut requests: heapless::Vec<Request, 2> = heapless::Vec::new();
        if i == 0 {
            let _ = requests.push(Request::ChangeGfn {
                view: v,
                gfn: DATA.gfn(3),
                to: Some(DATA.gfn(2)),
            });
        }
        let _ = requests.push(Request::ViewSetVisible {
            view: v,
            visible: true,
        });
        for r in &requests {
            if let Err(e) = call_done(r) {
                println!("FAIL: {r:?}: {e}");
                return None;
            }
        }
        let _ = out.push(v);
    }
    Some(out)
}

fn main(info: &MultibootInfo) -> u32 {
    let tag = arg(info.cmdline().unwrap_or(""), "tag");
    for p in 0..2 {
        DATA.write_u64(p, 0, 0x5eed_0000 + tag * 0x100 + p as u64);
    }
    // The control page holds the tag too: no other page (of any domain
    // but one with the same tag) equals it, so a deduplication scan never
    // shares it, and the host's writes to it are never refused (SH-2).
    CTRL.write_u64(0, 8, 0xc7_0000 + tag);
    let views = match hypercall::capabilities() {
        Ok(c) if c.vmfunc => match views() {
            Some(v) => v,
            None => return 1,
        },
        Ok(_) => heapless::Vec::new(),
        Err(e) => {
            println!("FAIL: Capabilities: {e}");
            return 1;
        }
    };
    println!(
        "sharer: ready data={:#x} ctrl={:#x} views={} tag={}",
        DATA.gfn(0) << 12,
        CTRL.gfn(0) << 12,
        views.len() + 1,
        tag
    );
    loop {
        match CTRL.read_u64(0, 0) {
            1 => {
                let before = DATA.read_u64(0, 0);
                // The first write, timed: on a shared page, the break
                // (violation, copy, entries written, resume) and the write.
                let t0 = rdtsc();
                DATA.write_u64(0, 8, 0x5157_0000 + tag * 0x10);
                let ticks = rdtsc() - t0;
                for (i, v) in views.iter().enumerate() {
                    vmfunc_switch(u32::from(*v));
                    DATA.write_u64(0, 8 * (i + 2), 0x5157_0000 + tag * 0x10 + i as u64 + 1);
                    vmfunc_switch(0);
                }
                let mut line: heapless::String<256> = heapless::String::new();
                for i in 0..=views.len() {
                    let _ = core::fmt::write(
                        &mut line,
                        format_args!(" {:#x}", DATA.read_u64(0, 8 * (i + 1))),
                    );
                }
                println!(
                    "sharer: page 0 read {before:#x}; wrote through {} views:{}; first write {ticks} ticks",
                    views.len() + 1,
                    line
                );
                CTRL.write_u64(0, 0, 0);
            }
            2 => {
                println!("sharer: done");
                return 0;
            }
            // A service call between looks: the vCPU gives way to the
            // services (the console among them) instead of spinning.
            _ => {
                let _ = service_null();
            }
        }
    }
}
