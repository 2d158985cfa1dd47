//! A guest that keeps the vmm service busy while a test restarts or swaps
//! it.
//!
//! Command line: `ticks=N` (default 100; 0: forever) and `calls=M` (default
//! 200). Each tick makes M `HC_SERVICE_NULL` calls, then one
//! `HC_SERVICE_INFO`, and prints `tick K: vmm version V, C service calls`.
//! Every call must succeed: a failure prints `FAIL` and exits 1. After the
//! last tick it prints `ticker: done` and exits 0.
//!
//! `pic=1`: first masks the PICs' lines in a pattern (master 0xa5, slave
//! 0x3c), then after each tick line reads the masks back and prints
//! `tick K: pic masks MM SS` (a vmm swap carries the guest's platform:
//! they never change).
//!
//! `ping=1`: after each tick line, one `HC_IPC_PING` (the vmm calls the
//! altp2m service through its bound client) and `tick K: ping ok` or
//! `tick K: ping refused` (refused while a test restarts altp2m: the line
//! says so instead of failing).
//!
//! `grant=GFN` (hex with `0x`): first checks that granting pages outside its
//! RAM, granting none, taking back pages it does not grant and a ninth
//! range (the pages after GFN) are refused,
//! then grants the page at GFN with the services that may map its memory
//! (`Request::GrantPages`, FM-2's exception) and writes the tick count
//! into its first 8 bytes at each tick.
#![no_std]
#![no_main]

use guest_runtime::abi::{HcError, Reply, Request};
use guest_runtime::hypercall::{CallError, call};
use guest_runtime::{MultibootInfo, ipc_ping, println, service_info, service_null};

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
    // Eight ranges are the most a domain grants: a ninth is refused, and
    // the eight (mapped by nobody) are taken back.
    let others = |i: u64| gfn + 1 + i;
    for i in 0..8 {
        if let Err(e) = grant(others(i), 1, true) {
            println!("FAIL: granting range {i}: {e:?}");
            return false;
        }
    }
    let ninth = grant(others(8), 1, true);
    let back = (0..8).all(|i| grant(others(i), 1, false).is_ok());
    if ninth != Err(Some(HcError::TooManyGrants)) || !back {
        println!("FAIL: a ninth range: {ninth:?}; the eight taken back: {back}");
        return false;
    }
    println!("ticker: a ninth granted range refused: TooManyGrants; the eight taken back");
    if let Err(e) = grant(gfn, 1, true) {
        println!("FAIL: granting gfn {gfn:#x}: {e:?}");
        return false;
    }
    println!("ticker: grants gfn {gfn:#x}");
    true
}

fn outb(port: u16, value: u8) {
    // Safety: port I/O to the emulated PICs touches no memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // Safety: as in `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
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
    let pic = arg(cmdline, "pic", 0) != 0;
    if pic {
        outb(0x21, 0xa5);
        outb(0xa1, 0x3c);
    }
    let ping = arg(cmdline, "ping", 0) != 0;
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
        if pic {
            println!("tick {tick}: pic masks {:02x} {:02x}", inb(0x21), inb(0xa1));
        }
        if ping {
            let ok = if ipc_ping().is_some() {
                "ok"
            } else {
                "refused"
            };
            println!("tick {tick}: ping {ok}");
        }
    }
    println!("ticker: done");
    0
}
