//! The guest of the VM fork boot test (`tests/sharing.rs`, issue 11,
//! point 5).
//!
//! It writes [`PARENT`] into word 0 of its marker page, prints
//! `forker: ready data=0x... ctrl=0x...`, and then looks at word 0 of its
//! control page, making a null service call between looks (so that it
//! does not spin). The host pauses it there and forks it; each fork
//! starts from that loop. When the host writes `N` (not 0) into a
//! domain's control word, the domain reads its marker, writes
//! `0xc41d_0000 + N` over it (timing that first write: in a fork, its copy
//! on write), prints
//! `forker: N read 0x... wrote 0x... (T ticks)` and ends with status 0.
//! With `pages=P` (2 to 16) it writes P pages in all (the marker and
//! P - 1 more), and prints `BENCH cow_break_ticks=T` first (for
//! `cargo hv bench`).
#![no_std]
#![no_main]

use guest_runtime::{MultibootInfo, Pages, println, rdtsc, service_null};

guest_runtime::entry!(main);

/// Page 0: the marker; page 1: the control word (and a word of its own,
/// so that the two pages differ); pages 2 on: written too with
/// `pages=P` on the command line (P pages in all, at most 16).
static DATA: Pages<17> = Pages::new();

/// The marker the parent writes before it is forked.
const PARENT: u64 = 0x7a4e_4700_0000_0001;

fn main(info: &MultibootInfo) -> u32 {
    let pages: usize = info
        .cmdline()
        .unwrap_or("")
        .split(' ')
        .find_map(|w| w.strip_prefix("pages=")?.parse().ok())
        .unwrap_or(1usize)
        .clamp(1, 16);
    DATA.write_u64(0, 0, PARENT);
    DATA.write_u64(1, 8, 0xc7c7);
    println!(
        "forker: ready data={:#x} ctrl={:#x}",
        DATA.gfn(0) << 12,
        DATA.gfn(1) << 12
    );
    loop {
        let n = DATA.read_u64(1, 0);
        if n != 0 {
            let before = DATA.read_u64(0, 0);
            let t0 = rdtsc();
            DATA.write_u64(0, 0, 0xc41d_0000 + n);
            let ticks = rdtsc() - t0;
            for p in 2..pages + 1 {
                DATA.write_u64(p, 0, n);
            }
            if pages > 1 {
                println!("BENCH cow_break_ticks={ticks}");
            }
            println!(
                "forker: {n} read {before:#x} wrote {:#x} ({ticks} ticks)",
                DATA.read_u64(0, 0)
            );
            return 0;
        }
        service_null();
    }
}
