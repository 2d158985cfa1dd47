//! A 16550 UART as a guest sees it: enough for a guest to detect the port,
//! program it, transmit (polling or driven by the transmitter-empty
//! interrupt) and receive (polling the line status's data-ready bit or
//! driven by the received-data interrupt). The transmitter is always ready,
//! so a polling guest never waits. Received bytes come from the host
//! ([`Uart16550::receive`]) into a receive FIFO of [`RX_FIFO`] bytes; what
//! does not fit is not taken (the caller keeps it and tries again: nothing
//! is dropped, and no overrun happens).

use crate::serial::{
    DATA, FIFO_CTRL as IIR_FCR, INT_ENABLE as IER, LINE_CTRL as LCR, LINE_STATUS as LSR,
    MODEM_CTRL as MCR, MODEM_STATUS as MSR, SCRATCH as SCR,
};

/// LSR: transmitter holding register and shift register empty.
const LSR_IDLE: u8 = 0x60;
/// LSR: data ready.
const LSR_DR: u8 = 0x01;
/// IER: received data available, transmitter holding register empty.
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
/// IIR with the FIFOs on: no interrupt, transmitter empty, received data.
const IIR_NONE: u8 = 0xc1;
const IIR_THRE: u8 = 0xc2;
const IIR_RDA: u8 = 0xc4;
/// FCR: clear the receive FIFO.
const FCR_CLEAR_RX: u8 = 0x02;
/// Bytes the receive FIFO holds (a domain's whole input buffer: a host
/// that types faster than the guest reads is held back, not dropped).
pub const RX_FIFO: usize = 64;
/// MSR: carrier detect, data set ready, clear to send.
const MSR_READY: u8 = 0xb0;

/// One 16550's guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: u16,
    /// The transmitter-empty interrupt is pending (set when it is enabled
    /// and after each byte sent; cleared by reading it in IIR).
    thre: bool,
    /// Received bytes the guest has not read, oldest first.
    rx: heapless::Deque<u8, RX_FIFO>,
}

impl Uart16550 {
    /// The registers and the received bytes the guest has not read, for
    /// saving the device (a service swap).
    pub fn save(&self) -> ([u8; 6], heapless::Vec<u8, RX_FIFO>) {
        let d = self.divisor.to_le_bytes();
        (
            [self.ier, self.lcr, self.mcr, self.scr, d[0], d[1]],
            self.rx.iter().copied().collect(),
        )
    }

    /// A device with the registers and received bytes [`Self::save`]
    /// returned.
    pub fn restore(r: [u8; 6], received: &[u8]) -> Self {
        let mut u = Self {
            ier: r[0],
            lcr: r[1],
            mcr: r[2],
            scr: r[3],
            divisor: u16::from_le_bytes([r[4], r[5]]),
            thre: r[0] & IER_THRE != 0,
            rx: heapless::Deque::new(),
        };
        u.receive(received);
        u
    }

    /// Bytes from the host for the guest to read: as many as the receive
    /// FIFO has room for, from the first; returns how many it took.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        bytes
            .iter()
            .take_while(|&&b| self.rx.push_back(b).is_ok())
            .count()
    }

    /// Received bytes the guest has not read yet.
    pub fn received(&self) -> usize {
        self.rx.len()
    }

    /// Whether the guest asked for the received-data interrupt (IER bit 0):
    /// it waits for input, not only polls for it.
    pub fn wants_input(&self) -> bool {
        self.ier & IER_RDA != 0 && self.mcr & 0x08 != 0
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
            IIR_FCR if value & FCR_CLEAR_RX != 0 => self.rx.clear(),
            LCR => self.lcr = value,
            MCR => self.mcr = value & 0x1f,
            SCR => self.scr = value,
            _ => {} // the rest of FCR, and the read-only LSR and MSR
        }
        None
    }

    /// The interrupt pending, by priority: received data (while the FIFO
    /// holds any and IER bit 0 is set), then the transmitter empty (IER
    /// bit 1); the receiver line status interrupt never happens (no
    /// errors, no overrun).
    fn pending(&self) -> u8 {
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    /// Whether its interrupt line is up: an interrupt pending, and OUT2
    /// (MCR bit 3), which gates the line to the interrupt controller on a
    /// PC.
    pub fn irq(&self) -> bool {
        self.pending() != IIR_NONE && self.mcr & 0x08 != 0
    }

    /// The guest read `offset` (0-7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & 0x80 != 0;
        match offset {
            DATA if dlab => self.divisor as u8,
            // The oldest received byte (0 with none).
            DATA => self.rx.pop_front().unwrap_or(0),
            IER if dlab => (self.divisor >> 8) as u8,
            IER => self.ier,
            // FIFOs enabled; the interrupt of the highest priority: reading
            // the transmitter-empty one clears it, received data stays until
            // the FIFO is read empty.
            IIR_FCR => {
                let iir = self.pending();
                if iir == IIR_THRE {
                    self.thre = false;
                }
                iir
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR if self.rx.is_empty() => LSR_IDLE,
            LSR => LSR_IDLE | LSR_DR,
            MSR => MSR_READY,
            SCR => self.scr,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec as StdVec;

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
        // Input the guest has not read yet goes along (a vmm swap).
        assert_eq!(u.receive(b"ab"), 2);
        let (regs, rx) = u.save();
        assert_eq!(Uart16550::restore(regs, &rx), u);
    }

    #[test]
    fn received_bytes_are_read_in_order_with_data_ready() {
        let mut u = Uart16550::default();
        assert_eq!(u.read(LSR) & 1, 0, "nothing received");
        assert_eq!(u.receive(b"ab"), 2);
        assert_eq!(u.read(LSR), 0x61, "data ready, transmitter empty");
        assert_eq!(u.read(DATA), b'a');
        assert_eq!(u.read(LSR) & 1, 1);
        assert_eq!(u.read(DATA), b'b');
        assert_eq!(u.read(LSR), 0x60);
        assert_eq!(u.read(DATA), 0, "an empty FIFO reads 0");
        // With DLAB set, offset 0 is the divisor, and the FIFO stays.
        u.receive(b"c");
        u.write(LCR, 0x80);
        assert_eq!(u.read(DATA), 0);
        u.write(LCR, 0x03);
        assert_eq!(u.read(DATA), b'c');
    }

    #[test]
    fn a_full_fifo_takes_no_more_and_loses_nothing() {
        let mut u = Uart16550::default();
        let input: StdVec<u8> = (0..100u8).collect();
        assert_eq!(u.receive(&input), RX_FIFO);
        assert_eq!(
            u.receive(&input[RX_FIFO..]),
            0,
            "full: the rest is held back"
        );
        assert_eq!(u.received(), RX_FIFO);
        assert_eq!(u.read(DATA), 0);
        assert_eq!(u.receive(&input[RX_FIFO..]), 1, "one byte of room");
        let mut out = StdVec::new();
        while u.read(LSR) & 1 != 0 {
            out.push(u.read(DATA));
        }
        assert_eq!(out, &input[1..=RX_FIFO], "in order, none lost");
        // FCR bit 1 empties the FIFO.
        u.receive(b"xyz");
        u.write(IIR_FCR, 0xc7);
        assert_eq!(u.received(), 0);
    }

    #[test]
    fn received_data_outranks_the_transmitter_in_iir() {
        let mut u = Uart16550::default();
        u.write(MCR, 0x0b);
        u.write(IER, 0x01);
        assert!(!u.irq(), "enabled, nothing received");
        assert_eq!(u.read(IIR_FCR), 0xc1);
        u.receive(b"hi");
        assert!(u.irq(), "received data raises the line");
        assert!(u.wants_input());
        u.write(IER, 0x03);
        // Both pending: received data first, and reading IIR does not
        // clear it; the transmitter's comes once the FIFO is empty.
        assert_eq!(u.read(IIR_FCR), 0xc4);
        assert_eq!(u.read(IIR_FCR), 0xc4, "still there until read");
        assert_eq!(u.read(DATA), b'h');
        assert_eq!(u.read(IIR_FCR), 0xc4);
        assert_eq!(u.read(DATA), b'i');
        assert_eq!(u.read(IIR_FCR), 0xc2, "then the transmitter empty");
        assert_eq!(u.read(IIR_FCR), 0xc1, "which that read cleared");
        assert!(!u.irq());
        // Receive interrupt off: data waits, the line stays down.
        u.write(IER, 0x00);
        u.receive(b"x");
        assert!(!u.irq());
        assert_eq!(u.read(IIR_FCR), 0xc1);
        assert_eq!(u.read(LSR) & 1, 1, "polling still sees it");
        // OUT2 gates the line.
        u.write(IER, 0x01);
        assert!(u.irq());
        u.write(MCR, 0x03);
        assert!(!u.irq());
        assert!(!u.wants_input());
    }

    #[test]
    fn scratch_register_detection_works() {
        let mut u = Uart16550::default();
        u.write(SCR, 0x5a);
        assert_eq!(u.read(SCR), 0x5a);
        assert_eq!(u.read(IIR_FCR) & 1, 1, "no interrupt pending");
    }
}
