//! waiter: a test task that waits on its `done` notification and exits 0
//! (1 where the notifier set bit 1: its checks failed).
//! A system whose domains cannot run (no VMX) halts when its tasks end;
//! this one ends when the service under test says it is done.

#![no_std]
#![no_main]

use service_runtime::{require, sys};

service_runtime::entry!(main);

fn main() -> ! {
    let done = require("done");
    let bits = sys::wait(done).unwrap_or(0);
    defmt::info!("waiter: done (bits {=u64:#x})", bits);
    // Bit 1: the service under test failed.
    sys::exit(u64::from(bits & 2 != 0))
}
