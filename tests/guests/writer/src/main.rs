//! The source of the live-copy test (`tests/logdirty.rs`, LD-5): writes a
//! known pattern for ever, in view 0 and through views where a page maps
//! another's frame, and makes a hypercall now and then (whose reply the
//! hypervisor writes into its memory).
//!
//! 1. With VMFUNC: views 1..=3, view i remapping page R[i] to the frame of
//!    page S[i], visible to VMFUNC. Prints `writer: writing through N
//!    views`.
//! 2. For ever, with a counter c: c into 64 pages of a buffer (at an offset
//!    that moves with c), then, in each view i (switched to by VMFUNC), c
//!    into R[i] (S[i]'s frame); back to view 0; every 16 rounds a
//!    `GetMode` hypercall.
//!
//! It stops when the last page of its RAM holds [`STOP`] at byte
//! [`STOP_AT`] (written by the copier with DOMAIN_WRITE): it goes on for
//! another 2000 rounds (time for the services to see the copier end) and
//! exits 0. Status 1 if the set-up fails.
#![no_std]
#![no_main]

use guest_runtime::abi::Request;
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{MultibootInfo, Pages, println, vmfunc_switch};

guest_runtime::entry!(main);

const VIEWS: usize = 3;
/// The stop word, and where in the last page of RAM it is written.
pub const STOP: u64 = u64::from_le_bytes(*b"STOPCOPY");
pub const STOP_AT: u64 = 2048;
static BUF: Pages<64> = Pages::new();
static R: Pages<VIEWS> = Pages::new();
static S: Pages<VIEWS> = Pages::new();

fn views() -> Option<heapless::Vec<u16, VIEWS>> {
    let mut out = heapless::Vec::new();
    for i in 0..VIEWS {
        let v = hypercall::view_create().ok()?;
        for r in [
            Request::ChangeGfn {
                view: v,
                gfn: R.gfn(i),
                to: Some(S.gfn(i)),
            },
            Request::ViewSetVisible {
                view: v,
                visible: true,
            },
        ] {
            if let Err(e) = call_done(&r) {
                println!("FAIL: {r:?}: {e}");
                return None;
            }
        }
        let _ = out.push(v);
    }
    Some(out)
}

fn main(info: &MultibootInfo) -> u32 {
    let end = info.ram_end();
    if end < 2 << 20 {
        println!("FAIL: no RAM map from the loader");
        return 1;
    }
    let stop = (end - 4096 + STOP_AT) as *const u64;
    let caps = match hypercall::capabilities() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL: Capabilities: {e}");
            return 1;
        }
    };
    let views = if caps.vmfunc {
        match views() {
            Some(v) => v,
            None => return 1,
        }
    } else {
        heapless::Vec::new()
    };
    println!("writer: writing through {} views", views.len());
    let mut c: u64 = 0;
    let mut last: Option<u64> = None;
    loop {
        c = c.wrapping_add(1);
        if last.is_none() && c.is_multiple_of(64) {
            // Safety: the last page of RAM is identity-mapped (the runtime
            // maps 0..4 GiB) and nothing else of this guest uses it.
            if unsafe { stop.read_volatile() } == STOP {
                println!("writer: told to stop after {c} rounds");
                last = Some(c + 2000);
            }
        }
        if last == Some(c) {
            println!("writer: done");
            return 0;
        }
        let offset = ((c % 512) * 8) as usize;
        for p in 0..64 {
            BUF.write_u64(p, offset, c ^ p as u64);
        }
        for (i, &v) in views.iter().enumerate() {
            vmfunc_switch(u32::from(v));
            R.write_u64(i, offset, c.rotate_left(i as u32 + 1));
            vmfunc_switch(0);
        }
        if c.is_multiple_of(16) {
            let _ = hypercall::call(&Request::GetMode);
        }
    }
}
