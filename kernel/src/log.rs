//! The kernel's log: defmt frames and other records, tagged with their
//! source, on COM1 (the wire format is `ipc_schema::wire`).
//!
//! defmt calls `acquire`, then `write` any number of times, then `release`
//! for each message; the frame is collected here and sent whole as one
//! [`Record::Defmt`] on release, so that records from different sources never
//! interleave mid-frame. One lock serialises everything written to the port;
//! it is taken with interrupts off. If the kernel faults while holding it,
//! the fault path takes it over ([`force_unlock`]) rather than deadlocking.

use crate::arch::{interrupts_disable, interrupts_restore};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};
use ipc_schema::wire::{self, KERNEL_SOURCE, MAX_ENCODED, MAX_FRAME, Record, WIRE_KEY};
use platform::serial::{COM1, Uart16550};

struct Wire {
    uart: Uart16550,
    frame: [u8; MAX_FRAME],
    len: usize,
    truncated: bool,
    encoded: [u8; MAX_ENCODED],
}

struct WireCell(UnsafeCell<Wire>);

// Safety: every access goes through `LOCKED` (see `with_wire`).
unsafe impl Sync for WireCell {}

static WIRE: WireCell = WireCell(UnsafeCell::new(Wire {
    // Safety: COM1 belongs to the kernel's log; this is its only handle.
    uart: unsafe { Uart16550::new(COM1) },
    frame: [0; MAX_FRAME],
    len: 0,
    truncated: false,
    encoded: [0; MAX_ENCODED],
}));

static LOCKED: AtomicBool = AtomicBool::new(false);
static SAVED_INTERRUPTS: AtomicBool = AtomicBool::new(false);

fn lock() {
    let was = interrupts_disable();
    while LOCKED
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    SAVED_INTERRUPTS.store(was, Ordering::Relaxed);
}

fn unlock() {
    let was = SAVED_INTERRUPTS.load(Ordering::Relaxed);
    LOCKED.store(false, Ordering::Release);
    interrupts_restore(was);
}

/// Runs `f` on the wire state.
///
/// # Safety
/// The caller holds the lock (between `lock` and `unlock`, or inside the
/// defmt acquire/release pair).
unsafe fn with_wire<R>(f: impl FnOnce(&mut Wire) -> R) -> R {
    // Safety: the lock gives exclusive access (caller's contract).
    f(unsafe { &mut *WIRE.0.get() })
}

impl Wire {
    fn send(&mut self, record: &Record<'_>) {
        match wire::encode(record, &mut self.encoded) {
            Ok(bytes) => {
                let bytes: *const [u8] = bytes;
                // Safety: `bytes` points into `self.encoded`, which nothing
                // changes while the UART sends it.
                self.uart.write_all(unsafe { &*bytes });
            }
            Err(_) => self.uart.write_all(b"\0[log record too long]\r\n\0"),
        }
    }
}

/// Sets up COM1, ends whatever text the boot loader left on the line, and
/// announces the kernel as source 0.
pub fn init() {
    lock();
    // Safety: we hold the lock.
    unsafe {
        with_wire(|w| {
            w.uart.init();
            w.uart.write_byte(0);
            w.send(&Record::Announce {
                source: KERNEL_SOURCE,
                name: "kernel",
                build_id: crate::build_id(),
                wire_key: WIRE_KEY.to_bytes(),
            });
        })
    };
    unlock();
}

/// Sends one record (not a kernel defmt frame: those go through defmt).
pub fn emit(record: &Record<'_>) {
    lock();
    // Safety: we hold the lock.
    unsafe { with_wire(|w| w.send(record)) };
    unlock();
}

/// Waits until everything sent has left the UART.
pub fn flush() {
    lock();
    // Safety: we hold the lock.
    unsafe { with_wire(|w| w.uart.flush()) };
    unlock();
}

/// Releases the log lock whoever holds it. Only for the paths that end the
/// run (exceptions, panics): whatever frame was in progress is lost, which is
/// better than a silent deadlock.
pub fn force_unlock() {
    if LOCKED.load(Ordering::Relaxed) {
        // Safety: the holder will never run again (the run is ending); a
        // partial frame is discarded.
        unsafe { with_wire(|w| w.len = 0) };
        LOCKED.store(false, Ordering::Release);
    }
}

#[defmt::global_logger]
struct Logger;

// Safety: `acquire` takes the lock with interrupts off and `release` gives it
// back; `write` and `flush` run only between the two, as defmt guarantees.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        lock();
        // Safety: we hold the lock.
        unsafe {
            with_wire(|w| {
                w.len = 0;
                w.truncated = false;
            })
        }
    }

    unsafe fn flush() {
        // Safety: called between acquire and release (defmt's contract).
        unsafe { with_wire(|w| w.uart.flush()) }
    }

    unsafe fn release() {
        // Safety: called after acquire (defmt's contract).
        unsafe {
            with_wire(|w| {
                let frame = w.frame;
                let record = Record::Defmt {
                    source: KERNEL_SOURCE,
                    frame: &frame[..w.len],
                    truncated: w.truncated,
                };
                w.send(&record);
            })
        }
        unlock();
    }

    unsafe fn write(bytes: &[u8]) {
        // Safety: called between acquire and release (defmt's contract).
        unsafe {
            with_wire(|w| {
                let room = MAX_FRAME - w.len;
                let n = bytes.len().min(room);
                w.frame[w.len..w.len + n].copy_from_slice(&bytes[..n]);
                w.len += n;
                w.truncated |= n < bytes.len();
            })
        }
    }
}

defmt::timestamp!("{=u64:us}", crate::time::micros());
