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
//! It never exits: the copier destroys it. Status 1 if the set-up fails.
#![no_std]
#![no_main]

use guest_runtime::abi::Request;
use guest_runtime::hypercall::{self, call_done};
use guest_runtime::{MultibootInfo, Pages, println, vmfunc_switch};

guest_runtime::entry!(main);

const VIEWS: usize = 3;
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

fn main(_info: &MultibootInfo) -> u32 {
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
    loop {
        c = c.wrapping_add(1);
        let offset = ((c % 512) * 8) as usize;
        for p in 0..64 {
            BUF.write_u64(p, offset, c ^ p as u64);
        }
        for (i, &v) in views.iter().enumerate() {
            vmfunc_switch(u32::from(v));
            R.write_u64(i, offset, c.rotate_left(i as u32 + 1));
            vmfunc_switch(0);
        }
        if c % 16 == 0 {
            let _ = hypercall::call(&Request::GetMode);
        }
    }
}
