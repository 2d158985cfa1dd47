//! waiter: a test task that waits on its `done` notification and exits 0
//! (1 where the notifier set bit 1: its checks failed). A system whose
//! domains cannot run (no VMX) halts when its tasks end; this one ends when
//! the service under test says it is done. It serves its lifecycle
//! endpoint meanwhile, so the host can also end it (`cargo hv ctl fault`).

#![no_std]
#![no_main]

use ipc_schema::ipc::InterfaceId;
use ipc_schema::syscall::Handle;
use service_runtime::ipc::{self, Message, Service};
use service_runtime::{require, sys};

service_runtime::entry!(main);

struct Waiter;

impl Service for Waiter {
    type State = ();

    fn interface(&self, _slot: Handle) -> Option<InterfaceId> {
        None
    }

    fn handle(&mut self, _msg: Message<'_>, _reply: &mut [u8]) -> usize {
        0
    }

    fn notified(&mut self, _slot: Handle, bits: u64) {
        defmt::info!("waiter: done (bits {=u64:#x})", bits);
        // Bit 1: the service under test failed.
        sys::exit(u64::from(bits & 2 != 0))
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let done = require("done");
    ipc::serve(&mut Waiter, 1 << done)
}
