//! x86 port I/O: the one primitive the serial port, the PIT, the PIC and the
//! emulators' exit ports are driven through.

use x86_64::instructions::port::Port;

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port writes reach devices directly; the caller must own the device behind
/// `port` and know that the write is meaningful to it.
pub unsafe fn outb(port: u16, value: u8) {
    // Safety: forwarded to the caller.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Port reads can have side effects (clearing status, popping FIFOs); the
/// caller must own the device behind `port`.
pub unsafe fn inb(port: u16) -> u8 {
    // Safety: forwarded to the caller.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // Safety: forwarded to the caller.
    unsafe { Port::<u32>::new(port).write(value) }
}

/// Reads a 32-bit value from an I/O port.
///
/// # Safety
/// As [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    // Safety: forwarded to the caller.
    unsafe { Port::<u32>::new(port).read() }
}

/// Writes a 16-bit value to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // Safety: forwarded to the caller.
    unsafe { Port::<u16>::new(port).write(value) }
}
