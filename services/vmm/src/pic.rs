//! The two 8259A programmable interrupt controllers of a PC: the master at
//! ports 0x20/0x21 (IRQs 0-7), the slave at 0xa0/0xa1 (IRQs 8-15) on the
//! master's IRQ 2. Edge-triggered, fully nested (fixed priority: the lower
//! line first), initialisation words ICW1-ICW4 (auto-EOI taken), OCW1 (the
//! mask), OCW2 (non-specific and specific EOI; rotation is taken as the
//! plain EOI), OCW3 (reading IRR or ISR). Poll mode and special mask mode
//! are not modelled (their bits are ignored). At power-on both are
//! uninitialised with every line masked: no BIOS has programmed them.

use serde::{Deserialize, Serialize};

/// One 8259A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chip {
    /// Requests not yet acknowledged.
    pub irr: u8,
    /// In service: acknowledged, not yet ended (EOI).
    pub isr: u8,
    /// Masked lines.
    pub imr: u8,
    /// The vector of line 0 (ICW2, a multiple of 8).
    pub base: u8,
    /// The initialisation word expected next on the data port (2, 3, 4),
    /// or 0 when initialised.
    expect: u8,
    /// ICW1 said an ICW4 follows.
    icw4: bool,
    /// ICW1 said single (no ICW3).
    single: bool,
    auto_eoi: bool,
    /// OCW3: the command port reads the ISR (else the IRR).
    read_isr: bool,
}

impl Default for Chip {
    fn default() -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xff,
            base: 0,
            expect: 0,
            icw4: false,
            single: false,
            auto_eoi: false,
            read_isr: false,
        }
    }
}

/// The line of the highest priority in `bits` (the lowest set bit).
fn first(bits: u8) -> Option<u8> {
    (bits != 0).then(|| bits.trailing_zeros() as u8)
}

impl Chip {
    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: start initialising; the mask and requests are cleared.
            *self = Chip {
                imr: 0,
                expect: 2,
                icw4: v & 1 != 0,
                single: v & 2 != 0,
                ..Chip::default()
            };
        } else if v & 0x08 != 0 {
            // OCW3: bits 1:0 = 10 read IRR, 11 read ISR.
            if v & 2 != 0 {
                self.read_isr = v & 1 != 0;
            }
        } else {
            // OCW2: bits 7:5 the command.
            match v >> 5 {
                // Non-specific EOI (and its rotating form).
                1 | 5 => {
                    if let Some(l) = first(self.isr) {
                        self.isr &= !(1 << l);
                    }
                }
                // Specific EOI (and its rotating form).
                3 | 7 => self.isr &= !(1 << (v & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.expect {
            2 => {
                self.base = v & 0xf8;
                self.expect = match (self.single, self.icw4) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => self.expect = if self.icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.expect = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr { self.isr } else { self.irr }
    }

    /// The line this chip would interrupt with now: requested, not masked,
    /// of a higher priority than any in service.
    fn pending(&self, cascade: u8) -> Option<u8> {
        let line = first((self.irr | cascade) & !self.imr)?;
        match first(self.isr) {
            Some(busy) if busy <= line => None,
            _ => Some(line),
        }
    }

    /// The CPU acknowledges `line`.
    fn ack(&mut self, line: u8) {
        self.irr &= !(1 << line);
        if !self.auto_eoi {
            self.isr |= 1 << line;
        }
    }
}

/// The master and the slave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    pub master: Chip,
    pub slave: Chip,
}

impl Pic {
    /// Whether `port` is one of theirs.
    pub fn owns(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1)
    }

    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.master.write_command(v),
            0x21 => self.master.write_data(v),
            0xa0 => self.slave.write_command(v),
            _ => self.slave.write_data(v),
        }
    }

    pub fn read(&self, port: u16) -> u8 {
        match port {
            0x20 => self.master.read_command(),
            0x21 => self.master.imr,
            0xa0 => self.slave.read_command(),
            _ => self.slave.imr,
        }
    }

    /// An edge on line `irq` (0-15).
    pub fn raise(&mut self, irq: u8) {
        match irq {
            0..=7 => self.master.irr |= 1 << irq,
            8..=15 => self.slave.irr |= 1 << (irq - 8),
            _ => {}
        }
    }

    /// The slave's request as the master sees it on line 2.
    fn cascade(&self) -> u8 {
        if self.slave.pending(0).is_some() {
            1 << 2
        } else {
            0
        }
    }

    /// Whether an interrupt waits for the CPU.
    pub fn pending(&self) -> bool {
        self.master.pending(self.cascade()).is_some()
    }

    /// The CPU takes the interrupt that waits: its vector, the line put in
    /// service (the acknowledge cycle).
    pub fn ack(&mut self) -> Option<u8> {
        let line = self.master.pending(self.cascade())?;
        self.master.ack(line);
        if line == 2
            && let Some(s) = self.slave.pending(0)
        {
            self.slave.ack(s);
            return Some(self.slave.base | s);
        }
        Some(self.master.base | line)
    }
}
