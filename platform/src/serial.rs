//! A polled 16550 UART, as on every PC's COM1 (0x3f8) and COM2 (0x2f8), and as
//! emulated by QEMU and Bochs.
//!
//! Transmission only waits for room in the transmit holding register, so a
//! log line costs the time to push its bytes; [`Uart16550::flush`] waits until
//! the shift register is empty, which matters before the machine powers off.

use crate::port::{inb, outb};

/// I/O base of the first serial port.
pub const COM1: u16 = 0x3f8;
/// I/O base of the second serial port.
pub const COM2: u16 = 0x2f8;

/// Register offsets from a 16550's I/O base (shared with the guest-facing
/// model in `devices::uart16550`).
pub(crate) const DATA: u16 = 0;
pub(crate) const INT_ENABLE: u16 = 1;
pub(crate) const FIFO_CTRL: u16 = 2;
pub(crate) const LINE_CTRL: u16 = 3;
pub(crate) const MODEM_CTRL: u16 = 4;
pub(crate) const LINE_STATUS: u16 = 5;
pub(crate) const MODEM_STATUS: u16 = 6;
pub(crate) const SCRATCH: u16 = 7;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TX_IDLE: u8 = 1 << 6;

/// A 16550-compatible UART at an I/O base.
#[derive(Debug)]
pub struct Uart16550 {
    base: u16,
}

impl Uart16550 {
    /// # Safety
    /// The caller must own the eight I/O ports at `base`, and there must be
    /// only one `Uart16550` per port at a time.
    pub const unsafe fn new(base: u16) -> Self {
        Self { base }
    }

    /// Programs 115200 baud, 8 data bits, no parity, one stop bit, FIFOs on,
    /// interrupts off.
    pub fn init(&mut self) {
        // Safety: `new`'s contract gives us the ports; this is the standard
        // 16550 programming sequence.
        unsafe {
            outb(self.base + INT_ENABLE, 0x00);
            outb(self.base + LINE_CTRL, 0x80); // DLAB on: divisor follows
            outb(self.base + DATA, 0x01); // divisor 1 = 115200 baud
            outb(self.base + INT_ENABLE, 0x00);
            outb(self.base + LINE_CTRL, 0x03); // 8N1, DLAB off
            outb(self.base + FIFO_CTRL, 0xc7); // enable and clear FIFOs
            outb(self.base + MODEM_CTRL, 0x03); // DTR, RTS
        }
    }

    /// Sends one byte, waiting for room in the transmitter.
    pub fn write_byte(&mut self, byte: u8) {
        // Safety: the ports are ours (see `new`).
        unsafe {
            while inb(self.base + LINE_STATUS) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            outb(self.base + DATA, byte);
        }
    }

    /// Sends every byte of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Returns a received byte, if one is waiting.
    pub fn try_read_byte(&mut self) -> Option<u8> {
        // Safety: the ports are ours (see `new`).
        unsafe {
            if inb(self.base + LINE_STATUS) & LSR_DATA_READY != 0 {
                Some(inb(self.base + DATA))
            } else {
                None
            }
        }
    }

    /// Waits until every byte written so far has left the shift register.
    pub fn flush(&mut self) {
        // Safety: the ports are ours (see `new`).
        unsafe {
            while inb(self.base + LINE_STATUS) & LSR_TX_IDLE == 0 {
                core::hint::spin_loop();
            }
        }
    }
}
