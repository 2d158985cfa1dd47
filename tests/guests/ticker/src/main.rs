//! A guest that keeps the vmm service busy while a test restarts or swaps
//! it.
//!
//! Command line: `ticks=N` (default 100; 0: forever) and `calls=M` (default
//! 200). Each tick makes M `HC_SERVICE_NULL` calls, then one
//! `HC_SERVICE_INFO`, and prints `tick K: vmm version V, C service calls`.
//! Every call must succeed: a failure prints `FAIL` and exits 1. After the
//! last tick it prints `ticker: done` and exits 0.
#![no_std]
#![no_main]

use guest_runtime::{MultibootInfo, println, service_info, service_null};

guest_runtime::entry!(main);

/// The value of `key=` on the command line.
fn arg(cmdline: &str, key: &str, default: u64) -> u64 {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(default)
}

fn main(info: &MultibootInfo) -> u32 {
    let cmdline = info.cmdline().unwrap_or("");
    let ticks = arg(cmdline, "ticks", 100);
    let calls = arg(cmdline, "calls", 200);
    println!("ticker: {ticks} ticks of {calls} service calls");
    let mut tick = 0u64;
    while ticks == 0 || tick < ticks {
        tick += 1;
        for _ in 0..calls {
            if service_null() != 0 {
                println!("FAIL: a service call was refused at tick {tick}");
                return 1;
            }
        }
        let (version, count) = service_info();
        println!("tick {tick}: vmm version {version}, {count} service calls");
    }
    println!("ticker: done");
    0
}
