//! Touches memory the guest does not have: Parallax must stop it there.
//!
//! Prints `touching 0x40000000` and reads a u64 at guest-physical 1 GiB
//! (identity-mapped in the guest's own page tables, beyond its RAM). Under
//! Parallax the EPT has nothing there and the hypervisor must end the
//! domain at that read, so the next line never appears. On plain QEMU (or
//! a hypervisor that lets the read through) the guest prints `still running
//! after touching unmapped memory` and exits with status 3.
#![no_std]
#![no_main]

use guest_runtime::{MultibootInfo, println};

guest_runtime::entry!(main);

const UNMAPPED: u64 = 0x4000_0000;

fn main(_info: &MultibootInfo) -> u32 {
    println!("touching {UNMAPPED:#x}");
    let p = UNMAPPED as *const u64;
    // Safety: the runtime identity-maps the first 4 GiB, so the read is a
    // valid guest access; touching memory the guest lacks is the test.
    let value = unsafe { p.read_volatile() };
    println!("still running after touching unmapped memory (read {value:#x})");
    3
}
