//! Touches memory the guest does not have: as on a PC, the read gives all
//! ones and the guest goes on (issue 14, point 2).
//!
//! Prints `touching 0x40000000` and reads a u64 at guest-physical 1 GiB
//! (identity-mapped in the guest's own page tables, beyond its RAM), then
//! `still running after touching unmapped memory (read VALUE)`, and exits
//! with status 0 where the value is all ones, 3 otherwise. Under Parallax
//! the EPT has nothing there: the read is an EPT violation the vmm
//! emulates (a 64-bit MOV, fetched through the guest's page tables), with
//! nothing there to answer. Plain QEMU reads 0 there (status 3).
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
    if value == u64::MAX { 0 } else { 3 }
}
