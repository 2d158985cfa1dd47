//! Logging: defmt frames, collected whole and handed to the kernel (the LOG
//! call), which puts them on the log wire tagged with this service's source
//! number. Timestamps are microseconds since boot, from the TSC and the
//! calibration the kernel passed in the startup information.

use core::sync::atomic::{AtomicU64, Ordering};

pub(crate) static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
pub(crate) static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Microseconds since boot.
pub fn micros() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    // Safety: RDTSC is allowed in ring 3 (CR4.TSD is clear).
    let now = unsafe { core::arch::x86_64::_rdtsc() };
    let ticks = now.wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000 / u128::from(hz)) as u64
}

/// The defmt logger (bare metal only: host tests bring their own).
#[cfg(target_os = "none")]
mod logger {
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicBool, Ordering};
    use ipc_schema::wire::MAX_FRAME;

    struct Frame {
        bytes: [u8; MAX_FRAME],
        len: usize,
    }

    struct FrameCell(UnsafeCell<Frame>);

    // Safety: a service is single-threaded; `TAKEN` guards re-entry (a panic
    // while logging drops the nested frame).
    unsafe impl Sync for FrameCell {}

    static FRAME: FrameCell = FrameCell(UnsafeCell::new(Frame {
        bytes: [0; MAX_FRAME],
        len: 0,
    }));
    static TAKEN: AtomicBool = AtomicBool::new(false);

    #[defmt::global_logger]
    struct Logger;

    // Safety: acquire/release bracket every frame; the buffer is only touched in
    // between, by this single thread.
    unsafe impl defmt::Logger for Logger {
        fn acquire() {
            if TAKEN.swap(true, Ordering::Acquire) {
                return;
            }
            // Safety: we hold TAKEN.
            unsafe { (*FRAME.0.get()).len = 0 };
        }

        unsafe fn flush() {}

        unsafe fn release() {
            // Safety: we hold TAKEN (set in acquire).
            let f = unsafe { &*FRAME.0.get() };
            crate::sys::log(&f.bytes[..f.len]);
            TAKEN.store(false, Ordering::Release);
        }

        unsafe fn write(bytes: &[u8]) {
            // Safety: between acquire and release.
            let f = unsafe { &mut *FRAME.0.get() };
            let n = bytes.len().min(MAX_FRAME - f.len);
            f.bytes[f.len..f.len + n].copy_from_slice(&bytes[..n]);
            f.len += n;
        }
    }

    defmt::timestamp!("{=u64:us}", super::micros());
}
