//! The smallest test guest: proves that a multiboot guest boots, prints and
//! exits.
//!
//! Prints `Hello from a Parallax test guest`, the command line
//! (`cmdline: "..."`; QEMU's `-kernel` puts the kernel's file name first)
//! and the usable RAM in the multiboot memory map (`memory: N KiB in M
//! ranges`), then exits with status 0.
#![no_std]
#![no_main]

use guest_runtime::{MultibootInfo, println};

guest_runtime::entry!(main);

fn main(info: &MultibootInfo) -> u32 {
    println!("Hello from a Parallax test guest");
    match info.cmdline() {
        Some(cmdline) => println!("cmdline: {cmdline:?}"),
        None => println!("cmdline: none"),
    }
    if info.has_memory_map() {
        let (bytes, ranges) = info.available_memory();
        println!("memory: {} KiB in {} ranges", bytes / 1024, ranges);
    } else {
        println!("memory: no memory map");
    }
    0
}
