//! A guest that keeps the vmm service busy while a test restarts or swaps
//! it.
//!
//! Command line: `ticks=N` (default 100; 0: forever) and `calls=M` (default
//! 200). Each tick makes M `HC_SERVICE_NULL` calls, then one
//! `HC_SERVICE_INFO`, and prints `tick K: vmm version V, C service calls`.
//! Every call must succeed: a failure prints `FAIL` and exits 1. After the
//! last tick it prints `ticker: done` and exits 0.
//!
//! `grant=GFN` (hex with `0x`): first checks that granting pages outside its
//! RAM, granting none and taking back pages it does not grant are refused,
//! then grants the page at GFN with the services that may map its memory
//! (`Request::GrantPages`, FM-2's exception) and writes the tick count
//! into its first 8 bytes at each tick.
#![no_std]
#![no_main]

use guest_runtime::abi::{HcError, Reply, Request};
use guest_runtime::hypercall::{CallError, call};
use guest_runtime::{MultibootInfo, println, service_info, service_null};

guest_runtime::entry!(main);

/// The value of `key=` on the command line.
fn arg(cmdline: &str, key: &str, default: u64) -> u64 {
    cmdline
        .split(' ')
        .find_map(|w| {
            let v = w.strip_prefix(key)?.strip_prefix('=')?;
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            }
        })
        .unwrap_or(default)
}

/// The vmm's answer to `GrantPages`: `Ok` or the refusal.
fn grant(gfn: u64, count: u64, grant: bool) -> Result<(), Option<HcError>> {
    match call(&Request::GrantPages { gfn, count, grant }) {
        Ok(Reply::Done) => Ok(()),
        Ok(Reply::Error(e)) | Err(CallError::Refused(Some(e))) => Err(Some(e)),
        _ => Err(None),
    }
}

/// Bad requests refused, then `gfn` granted; false on a surprise.
fn grant_page(gfn: u64) -> bool {
    let checks = [
        (
            "granting pages outside RAM",
            grant(1 << 40, 1, true),
            HcError::BadGfn { gfn: 1 << 40 },
        ),
        ("granting no page", grant(gfn, 0, true), HcError::BadRange),
        (
            "taking back pages not granted",
            grant(gfn, 1, false),
            HcError::NotGranted,
        ),
    ];
    for (what, got, want) in checks {
        if got != Err(Some(want)) {
            println!("FAIL: {what}: {got:?}, not {want:?}");
            return false;
        }
        println!("ticker: {what} refused: {want:?}");
    }
    if let Err(e) = grant(gfn, 1, true) {
        println!("FAIL: granting gfn {gfn:#x}: {e:?}");
        return false;
    }
    println!("ticker: grants gfn {gfn:#x}");
    true
}

fn main(info: &MultibootInfo) -> u32 {
    let cmdline = info.cmdline().unwrap_or("");
    let ticks = arg(cmdline, "ticks", 100);
    let calls = arg(cmdline, "calls", 200);
    println!("ticker: {ticks} ticks of {calls} service calls");
    let granted = arg(cmdline, "grant", 0);
    if granted != 0 && !grant_page(granted) {
        return 1;
    }
    let mut tick = 0u64;
    while ticks == 0 || tick < ticks {
        tick += 1;
        if granted != 0 {
            // Safety: the guest's RAM is identity-mapped, and the granted
            // page is one nothing else of this guest uses.
            unsafe { core::ptr::write_volatile((granted * 4096) as *mut u64, tick) };
        }
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
