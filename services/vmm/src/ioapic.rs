//! The I/O APIC (82093AA, as QEMU's `ioapic` models it): its registers at
//! [`BASE`] (IOREGSEL at +0, IOWIN at +0x10), reached through the vmm's
//! MMIO emulation (docs/guests.md, MMIO): the ID (0), the version (0x11
//! with 24 redirection entries), the arbitration ID and the redirection
//! table, every entry masked at reset. The ISA interrupts come in on their
//! pins as the MADT's overrides say (IRQ 0 on pin 2, the others on their
//! own number) and an unmasked entry sends its vector to the local APIC:
//! fixed or lowest-priority delivery (there is one CPU: every destination
//! is it), edge or level; a level entry's remote IRR is set when it
//! delivers and cleared by the local APIC's EOI of its vector, and while it
//! is set the pin delivers nothing more. An unmasked entry the guest
//! writes with a vector below 16 or another delivery mode (SMI, NMI, INIT,
//! ExtINT) is refused (kept masked) and the reason is given to the caller
//! to log; a register index that is not there reads as 0 and ignores
//! writes, given back the same way.

/// Where the registers are (guest-physical), as the MADT gives it.
pub const BASE: u64 = platform::multiboot::acpi::IOAPIC_BASE as u64;
/// Redirection entries (pins).
pub const PINS: usize = 24;
/// The version register: version 0x11, the highest entry 23.
pub const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

const MASKED: u64 = 1 << 16;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
/// The bits of an entry the guest writes (the delivery status, bit 12,
/// and the remote IRR are the I/O APIC's).
const WRITABLE_LOW: u64 = 0x0001_afff;

/// Why a guest's access was refused or ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Refusal {
    /// IOREGSEL named a register that is not there.
    Register(u8),
    /// An unmasked entry for an exception's vector (below 16).
    Vector { pin: u8, vector: u8 },
    /// An unmasked entry with a delivery mode other than fixed or lowest
    /// priority (2 SMI, 4 NMI, 5 INIT, 7 ExtINT; 3 and 6 are reserved).
    DeliveryMode { pin: u8, mode: u8 },
    /// An access of another size than 4 bytes, or at an offset that is not
    /// IOREGSEL's or IOWIN's.
    Access { offset: u16, size: u8 },
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApic {
    select: u8,
    id: u8,
    redirection: [u64; PINS],
}

impl Default for IoApic {
    fn default() -> Self {
        IoApic {
            select: 0,
            id: 0,
            redirection: [MASKED; PINS],
        }
    }
}

impl IoApic {
    /// Whether `gpa` is in its page.
    pub fn owns(gpa: u64) -> bool {
        gpa & !0xfff == BASE
    }

    /// A read of `size` bytes at `gpa` (in its page).
    pub fn read(&self, gpa: u64, size: u8) -> Result<u32, Refusal> {
        let offset = (gpa & 0xfff) as u16;
        match offset {
            0x00 => Ok(u32::from(self.select)),
            0x10 if size == 4 => self.window(),
            _ => Err(Refusal::Access { offset, size }),
        }
    }

    /// A write of `size` bytes at `gpa` (in its page).
    pub fn write(&mut self, gpa: u64, size: u8, value: u32) -> Result<(), Refusal> {
        let offset = (gpa & 0xfff) as u16;
        match offset {
            0x00 => {
                self.select = value as u8;
                Ok(())
            }
            0x10 if size == 4 => self.set_window(value),
            _ => Err(Refusal::Access { offset, size }),
        }
    }

    fn window(&self) -> Result<u32, Refusal> {
        match self.select {
            0x00 | 0x02 => Ok(u32::from(self.id) << 24),
            0x01 => Ok(VERSION),
            r @ 0x10..=0x3f => {
                let e = self.redirection[usize::from((r - 0x10) / 2)];
                Ok(if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                })
            }
            r => Err(Refusal::Register(r)),
        }
    }

    fn set_window(&mut self, v: u32) -> Result<(), Refusal> {
        match self.select {
            0x00 => {
                self.id = ((v >> 24) & 0xf) as u8;
                Ok(())
            }
            r @ 0x10..=0x3f => {
                let pin = (r - 0x10) / 2;
                let e = &mut self.redirection[usize::from(pin)];
                if r & 1 == 1 {
                    *e = (*e & 0xffff_ffff) | (u64::from(v & 0xff00_0000) << 32);
                    return Ok(());
                }
                let low = u64::from(v) & WRITABLE_LOW;
                let mut new = (*e & !WRITABLE_LOW) | low;
                // An edge entry has no remote IRR.
                if new & LEVEL == 0 {
                    new &= !REMOTE_IRR;
                }
                let (vector, mode) = (v as u8, ((v >> 8) & 7) as u8);
                let refused = if new & MASKED != 0 {
                    None
                } else if mode > 1 {
                    Some(Refusal::DeliveryMode { pin, mode })
                } else if vector < 16 {
                    Some(Refusal::Vector { pin, vector })
                } else {
                    None
                };
                if refused.is_some() {
                    new |= MASKED;
                }
                *e = new;
                refused.map_or(Ok(()), Err)
            }
            // The version and arbitration registers are read-only.
            0x01 | 0x02 => Ok(()),
            r => Err(Refusal::Register(r)),
        }
    }

    /// An edge on `pin`: the vector for the local APIC, where the entry is
    /// unmasked and (level) its remote IRR is clear.
    pub fn pulse(&mut self, pin: u8) -> Option<u8> {
        let e = self.redirection.get_mut(usize::from(pin))?;
        if *e & MASKED != 0 || *e & REMOTE_IRR != 0 {
            return None;
        }
        if *e & LEVEL != 0 {
            *e |= REMOTE_IRR;
        }
        Some(*e as u8)
    }

    /// The local APIC's EOI of `vector`: the remote IRR of each level
    /// entry with that vector is cleared.
    pub fn eoi(&mut self, vector: u8) {
        for e in &mut self.redirection {
            if *e & LEVEL != 0 && *e as u8 == vector {
                *e &= !REMOTE_IRR;
            }
        }
    }

    /// The vector of `pin`'s entry where it is unmasked.
    pub fn vector(&self, pin: u8) -> Option<u8> {
        let e = *self.redirection.get(usize::from(pin))?;
        (e & MASKED == 0).then_some(e as u8)
    }

    /// The pin an ISA IRQ comes in on (the MADT's override: IRQ 0 on 2).
    pub fn pin_of_isa(irq: u8) -> u8 {
        if irq == 0 { 2 } else { irq }
    }
}
