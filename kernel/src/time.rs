//! Time since boot, from the TSC, calibrated against the PIT.
//!
//! The PIT's channel 2 counts a known 10 ms (its input clock is 1.193182 MHz
//! on every PC and emulator) while the TSC runs; the ratio gives the TSC
//! frequency. On Bochs both are instruction-driven, so timestamps there are
//! in emulated time and identical from run to run.

use core::sync::atomic::{AtomicU64, Ordering};
use platform::cpu::rdtsc;
use platform::port::{inb, outb};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_TICKS: u64 = PIT_HZ / 100; // 10 ms

/// Marks the boot instant; timestamps count from here.
pub fn start() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// Measures the TSC frequency. Returns it, or `None` where the PIT did not
/// answer (then timestamps stay at zero, which is visible but harmless).
pub fn calibrate() -> Option<u64> {
    // Safety: the PIT (ports 0x42, 0x43) and port 0x61's gate bit belong to
    // the kernel; the speaker output is left off.
    let elapsed = unsafe {
        let ctrl = inb(0x61);
        outb(0x61, (ctrl & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0
        outb(0x42, CALIBRATION_TICKS as u8);
        outb(0x42, (CALIBRATION_TICKS >> 8) as u8);
        let start = rdtsc();
        let mut spins = 0u64;
        // OUT2 (bit 5) goes high when the count reaches zero.
        while inb(0x61) & 0x20 == 0 {
            spins += 1;
            if spins > 100_000_000 {
                outb(0x61, ctrl);
                return None;
            }
        }
        let end = rdtsc();
        outb(0x61, ctrl);
        end - start
    };
    let hz = elapsed * PIT_HZ / CALIBRATION_TICKS;
    TSC_HZ.store(hz, Ordering::Relaxed);
    Some(hz)
}

/// Microseconds since [`start`].
pub fn micros() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000 / u128::from(hz)) as u64
}

/// The TSC frequency, once calibrated.
pub fn tsc_hz() -> Option<u64> {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => None,
        hz => Some(hz),
    }
}

/// The TSC at boot (services compute their timestamps from it).
pub fn tsc_at_boot() -> u64 {
    TSC_AT_BOOT.load(Ordering::Relaxed)
}

/// TSC ticks in one time slice (10 ms; 1,000,000 where the TSC frequency
/// is unknown): how long a vCPU runs before others get a turn, and how long
/// a streak of IPC hand-offs may keep the queue waiting.
pub fn slice() -> u64 {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => 1_000_000,
        hz => hz / 100,
    }
}
