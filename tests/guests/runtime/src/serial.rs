//! COM1 (I/O port 0x3f8), polled: the guests' only output.
//!
//! Writes need no lock: the guest has one vCPU, interrupts stay off, and an
//! exception handler that prints while the main code is printing only
//! interleaves characters.

use core::fmt;

const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (DLAB = 0)
const IER: u16 = COM1 + 1; // interrupt enable (DLAB = 0); divisor high (DLAB = 1)
const DLL: u16 = COM1; // divisor low (DLAB = 1)
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
/// LSR: the transmit holding register is empty.
const LSR_THRE: u8 = 1 << 5;
/// LSR: the transmitter is idle (holding and shift registers empty).
const LSR_TEMT: u8 = 1 << 6;
/// Polls before giving up on a UART that never reports ready (none
/// present): output is lost, the guest goes on.
const POLL_LIMIT: u32 = 1_000_000;

pub(crate) fn outb(port: u16, value: u8) {
    // Safety: the guest owns the whole (virtual) machine; writing the UART's
    // and the exit device's ports has no effect on memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // Safety: reading a UART register has no effect on memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Programs COM1 like a PC's BIOS: 115200 baud, 8 data bits, no parity,
/// one stop bit, FIFOs on, no interrupts.
pub fn init() {
    outb(IER, 0x00); // no interrupts
    outb(LCR, 0x80); // DLAB on: the divisor follows
    outb(DLL, 0x01); // 115200 / 1
    outb(IER, 0x00); // divisor high byte
    outb(LCR, 0x03); // 8N1, DLAB off
    outb(FCR, 0xc7); // FIFOs on and cleared, 14-byte threshold
    outb(MCR, 0x0b); // DTR, RTS, OUT2
}

fn wait_for(bit: u8) {
    for _ in 0..POLL_LIMIT {
        if inb(LSR) & bit != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Sends one byte.
pub fn write_byte(byte: u8) {
    wait_for(LSR_THRE);
    outb(THR, byte);
}

/// Sends bytes, turning `\n` into `\r\n`.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            write_byte(b'\r');
        }
        write_byte(b);
    }
}

/// Waits until the UART has sent every byte (before the guest exits).
pub fn flush() {
    wait_for(LSR_TEMT);
}

/// A [`fmt::Write`] onto COM1; what `print!` uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Writing to the serial port cannot fail.
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints to COM1, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints a line to COM1, like `std::println!`.
#[macro_export]
macro_rules! println {
    () => { $crate::serial::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
