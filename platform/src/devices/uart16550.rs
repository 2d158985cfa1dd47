//! A 16550 UART as a guest sees it: enough for a guest to detect the port,
//! program it and transmit, polling or driven by the transmitter-empty
//! interrupt. The transmitter is always ready, so a polling guest never
//! waits; received data never arrives (the console is output only).

use crate::serial::{
    DATA, FIFO_CTRL as IIR_FCR, INT_ENABLE as IER, LINE_CTRL as LCR, LINE_STATUS as LSR,
    MODEM_CTRL as MCR, MODEM_STATUS as MSR, SCRATCH as SCR,
};

/// LSR: transmitter holding register and shift register empty.
const LSR_IDLE: u8 = 0x60;
/// MSR: carrier detect, data set ready, clear to send.
const MSR_READY: u8 = 0xb0;

/// One 16550's guest-visible state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: u16,
    /// The transmitter-empty interrupt is pending (set when it is enabled
    /// and after each byte sent; cleared by reading it in IIR).
    thre: bool,
}

impl Uart16550 {
    /// The registers, for saving the device (a service swap).
    pub fn save(&self) -> [u8; 6] {
        let d = self.divisor.to_le_bytes();
        [self.ier, self.lcr, self.mcr, self.scr, d[0], d[1]]
    }

    /// A device with the registers [`Self::save`] returned.
    pub fn restore(r: [u8; 6]) -> Self {
        Self {
            ier: r[0],
            lcr: r[1],
            mcr: r[2],
            scr: r[3],
            divisor: u16::from_le_bytes([r[4], r[5]]),
            thre: r[0] & 2 != 0,
        }
    }

    /// The guest wrote `value` at `offset` (0-7); returns the transmitted
    /// byte, if it was one.
    pub fn write(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & 0x80 != 0;
        match offset {
            DATA if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            DATA => {
                // Sent at once: the holding register is empty again.
                self.thre = true;
                return Some(value);
            }
            IER if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            IER => {
                if value & 2 != 0 && self.ier & 2 == 0 {
                    self.thre = true;
                }
                self.ier = value & 0x0f;
            }
            LCR => self.lcr = value,
            MCR => self.mcr = value & 0x1f,
            SCR => self.scr = value,
            _ => {} // FCR, and the read-only LSR and MSR
        }
        None
    }

    /// Whether its interrupt line is up: the transmitter-empty interrupt
    /// enabled (IER bit 1) and pending, and OUT2 (MCR bit 3), which gates
    /// the line to the interrupt controller on a PC.
    pub fn irq(&self) -> bool {
        self.ier & 2 != 0 && self.thre && self.mcr & 0x08 != 0
    }

    /// The guest read `offset` (0-7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & 0x80 != 0;
        match offset {
            DATA if dlab => self.divisor as u8,
            DATA => 0,
            IER if dlab => (self.divisor >> 8) as u8,
            IER => self.ier,
            // FIFOs enabled; the transmitter-empty interrupt, which this
            // read clears, or none.
            IIR_FCR if self.ier & 2 != 0 && self.thre => {
                self.thre = false;
                0xc2
            }
            IIR_FCR => 0xc1,
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => LSR_IDLE,
            MSR => MSR_READY,
            SCR => self.scr,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transmitter_empty_interrupt_drives_output() {
        let mut u = Uart16550::default();
        u.write(MCR, 0x0b); // DTR, RTS, OUT2
        assert!(!u.irq(), "not enabled");
        u.write(IER, 0x02);
        assert!(u.irq(), "enabling it with the holding register empty");
        assert_eq!(u.read(IIR_FCR), 0xc2);
        assert!(!u.irq(), "reading IIR cleared it");
        assert_eq!(u.read(IIR_FCR), 0xc1);
        assert_eq!(u.write(DATA, b'x'), Some(b'x'));
        assert!(u.irq(), "empty again after the byte");
        // Without OUT2 the line stays down on a PC.
        u.write(MCR, 0x03);
        assert!(!u.irq());
        u.write(MCR, 0x0b);
        u.write(IER, 0);
        assert!(!u.irq());
        assert_eq!(u.read(IIR_FCR), 0xc1);
    }

    #[test]
    fn a_polling_driver_initialises_and_transmits() {
        let mut u = Uart16550::default();
        // The sequence platform::serial and most kernels use.
        assert_eq!(u.write(IER, 0), None);
        assert_eq!(u.write(LCR, 0x80), None);
        assert_eq!(u.write(DATA, 0x01), None, "divisor low, not data");
        assert_eq!(u.write(IER, 0x00), None, "divisor high");
        assert_eq!((u.read(DATA), u.read(IER)), (1, 0));
        assert_eq!(u.write(LCR, 0x03), None);
        assert_eq!(u.write(IIR_FCR, 0xc7), None);
        assert_eq!(u.write(MCR, 0x0b), None);
        assert_eq!(u.read(LSR) & 0x20, 0x20, "ready to transmit");
        assert_eq!(u.write(DATA, b'h'), Some(b'h'));
        assert_eq!(u.read(MCR), 0x0b);
    }

    #[test]
    fn saved_registers_restore_the_same_device() {
        let mut u = Uart16550::default();
        u.write(LCR, 0x80);
        u.write(DATA, 0x0c);
        u.write(IER, 0x01);
        u.write(LCR, 0x1b);
        u.write(MCR, 0x0b);
        u.write(SCR, 0x77);
        assert_eq!(Uart16550::restore(u.save()), u);
    }

    #[test]
    fn scratch_register_detection_works() {
        let mut u = Uart16550::default();
        u.write(SCR, 0x5a);
        assert_eq!(u.read(SCR), 0x5a);
        assert_eq!(u.read(IIR_FCR) & 1, 1, "no interrupt pending");
    }
}
