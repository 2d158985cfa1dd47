//! PCI configuration mechanism #1 (ports 0xcf8 and 0xcfc-0xcff), answering
//! for one device: a host bridge at 00:00.0 with the identity QEMU's q35
//! machine gives its (Intel 82G33/Q35 MCH, 8086:29c0, class 06 00 00).
//! Every other bus, device and function is absent (reads all ones); the
//! bridge's registers are read-only (writes ignored).

use serde::{Deserialize, Serialize};

/// The host bridge's vendor and device IDs (dword 0).
pub const HOST_BRIDGE_ID: u32 = 0x29c0_8086;
/// Its class code and revision (dword 2): host bridge, revision 0.
pub const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pci {
    /// The address register (0xcf8).
    address: u32,
}

impl Pci {
    /// Whether `port` is one of its.
    pub fn owns(port: u16) -> bool {
        matches!(port, 0xcf8..=0xcff)
    }

    /// The configuration dword the address register selects (all ones
    /// for nothing there).
    fn dword(&self) -> u32 {
        if self.address & (1 << 31) == 0 {
            return u32::MAX;
        }
        let bdf = (self.address >> 8) & 0xffff;
        if bdf != 0 {
            return u32::MAX;
        }
        match (self.address >> 2) & 0x3f {
            0 => HOST_BRIDGE_ID,
            2 => HOST_BRIDGE_CLASS,
            _ => 0,
        }
    }

    /// A read of `size` bytes at `port`.
    pub fn read(&self, port: u16, size: u8) -> u32 {
        match port {
            0xcf8 if size == 4 => self.address,
            0xcfc..=0xcff => {
                let shift = 8 * u32::from(port - 0xcfc);
                let v = self.dword() >> shift;
                match size {
                    1 => v & 0xff,
                    2 => v & 0xffff,
                    _ => v,
                }
            }
            _ => u32::MAX,
        }
    }

    /// A write of `size` bytes at `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        if port == 0xcf8 && size == 4 {
            // Bits 1:0 read as 0; reserved bits 30:24 kept as written.
            self.address = value & !3;
        }
    }
}
