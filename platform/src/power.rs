//! Ending a run: the exit ports of the emulators Parallax runs on.
//!
//! The kernel cannot know which emulator (if any) it runs on, so it tries
//! them all. Each write is harmless where the device is absent.

use crate::port::{outb, outl};

/// QEMU's `isa-debug-exit` device (`iobase=0xf4,iosize=4`): writing V makes
/// QEMU exit with status `(V << 1) | 1`. Guests use the same port number.
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;
/// Bochs's shutdown port: the bytes of "Shutdown" end the simulation
/// (Bochs then exits with status 1 whatever the run's outcome).
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Asks the emulator to end the run with `status`.
///
/// Returns only where no emulator listened (real hardware); the caller then
/// halts.
///
/// # Safety
/// Only the kernel may call this: it writes to ports that other devices could
/// own on real hardware.
pub unsafe fn emulator_exit(status: u8) {
    // Safety: forwarded to the caller; see the module documentation.
    unsafe {
        outl(QEMU_DEBUG_EXIT_PORT, u32::from(status));
        for &b in b"Shutdown" {
            outb(BOCHS_SHUTDOWN_PORT, b);
        }
    }
}
