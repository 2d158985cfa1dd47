//! ACPI: from the RSDP to the tables, bounds-checked over any physical memory.
//!
//! The firmware's tables are input the kernel does not control, so every read
//! goes through [`PhysMemory::read`], which yields a slice or nothing, and
//! every length field is checked against what was read. The same code runs on
//! the host over fake memory in the unit tests.
//!
//! The `acpi` crate does the MADT in the kernel; this module adds what it does
//! not do: listing every table of a signature (QEMU's `-acpitable` adds a
//! second DMAR beside its own, and firmware may split DMARs) and the DMAR
//! itself ([`dmar`]).

pub mod dmar;

/// Read access to physical memory.
pub trait PhysMemory {
    /// The `len` bytes at physical address `addr`, or `None` where any of them
    /// cannot be read.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// Length of the header every system description table starts with.
pub const SDT_HEADER_LEN: usize = 36;

/// What was wrong with the firmware's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AcpiError {
    /// The RSDP is shorter than its revision requires.
    RsdpTooShort { len: usize },
    /// The RSDP does not start with "RSD PTR ".
    RsdpSignature,
    /// The RSDP's checksum (or extended checksum) is not zero.
    RsdpChecksum,
    /// A table's header or body lies outside readable memory.
    Unreadable { address: u64 },
    /// The table at `address` does not carry the signature it should.
    WrongSignature {
        address: u64,
        expected: [u8; 4],
        found: [u8; 4],
    },
    /// A table's length field is shorter than its header.
    BadLength {
        address: u64,
        signature: [u8; 4],
        length: u32,
    },
    /// A table's bytes do not sum to zero.
    BadChecksum { address: u64, signature: [u8; 4] },
}

/// The root pointer, as copied by the boot loader (multiboot2 tags 14 and 15)
/// or found in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rsdp {
    pub revision: u8,
    pub oem_id: [u8; 6],
    pub rsdt: u32,
    /// The XSDT address, present from revision 2 on.
    pub xsdt: Option<u64>,
}

impl Rsdp {
    /// Parses and validates an RSDP (checksums included).
    pub fn parse(bytes: &[u8]) -> Result<Self, AcpiError> {
        if bytes.len() < 20 {
            return Err(AcpiError::RsdpTooShort { len: bytes.len() });
        }
        if &bytes[0..8] != b"RSD PTR " {
            return Err(AcpiError::RsdpSignature);
        }
        if checksum(&bytes[..20]) != 0 {
            return Err(AcpiError::RsdpChecksum);
        }
        let revision = bytes[15];
        let mut oem_id = [0; 6];
        oem_id.copy_from_slice(&bytes[9..15]);
        let rsdt = le_u32(bytes, 16);
        let xsdt = if revision >= 2 {
            if bytes.len() < 36 {
                return Err(AcpiError::RsdpTooShort { len: bytes.len() });
            }
            let length = le_u32(bytes, 20) as usize;
            if length < 36 || length > bytes.len() {
                return Err(AcpiError::RsdpTooShort { len: bytes.len() });
            }
            if checksum(&bytes[..length]) != 0 {
                return Err(AcpiError::RsdpChecksum);
            }
            Some(le_u64(bytes, 24)).filter(|&a| a != 0)
        } else {
            None
        };
        Ok(Self {
            revision,
            oem_id,
            rsdt,
            xsdt,
        })
    }
}

/// One validated table: its address and all of its bytes, header included.
#[derive(Clone, Copy, Debug)]
pub struct Table<'m> {
    pub address: u64,
    pub bytes: &'m [u8],
}

impl<'m> Table<'m> {
    pub fn signature(&self) -> [u8; 4] {
        signature_of(self.bytes)
    }

    pub fn revision(&self) -> u8 {
        self.bytes[8]
    }

    /// Everything after the 36-byte header.
    pub fn body(&self) -> &'m [u8] {
        &self.bytes[SDT_HEADER_LEN..]
    }
}

/// Reads and validates the table at `address`: header readable, length
/// sensible, whole table readable, checksum zero, and the signature
/// `expected` where one is given.
pub fn read_table<M: PhysMemory>(
    mem: &M,
    address: u64,
    expected: Option<[u8; 4]>,
) -> Result<Table<'_>, AcpiError> {
    let header = mem
        .read(address, SDT_HEADER_LEN)
        .ok_or(AcpiError::Unreadable { address })?;
    let signature = signature_of(header);
    if let Some(expected) = expected
        && signature != expected
    {
        return Err(AcpiError::WrongSignature {
            address,
            expected,
            found: signature,
        });
    }
    let length = le_u32(header, 4);
    if (length as usize) < SDT_HEADER_LEN {
        return Err(AcpiError::BadLength {
            address,
            signature,
            length,
        });
    }
    let bytes = mem
        .read(address, length as usize)
        .ok_or(AcpiError::Unreadable { address })?;
    if checksum(bytes) != 0 {
        return Err(AcpiError::BadChecksum { address, signature });
    }
    Ok(Table { address, bytes })
}

/// The root table (XSDT where the RSDP names one, else RSDT) and the width of
/// its entries.
#[derive(Clone, Copy, Debug)]
pub struct RootTable<'m> {
    pub table: Table<'m>,
    entry_width: usize,
}

impl<'m> RootTable<'m> {
    pub fn read<M: PhysMemory>(mem: &'m M, rsdp: &Rsdp) -> Result<Self, AcpiError> {
        match rsdp.xsdt {
            Some(xsdt) => Ok(Self {
                table: read_table(mem, xsdt, Some(*b"XSDT"))?,
                entry_width: 8,
            }),
            None => Ok(Self {
                table: read_table(mem, u64::from(rsdp.rsdt), Some(*b"RSDT"))?,
                entry_width: 4,
            }),
        }
    }

    /// The physical addresses of the tables the root table lists.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + 'm {
        let width = self.entry_width;
        self.table.body().chunks_exact(width).map(move |e| {
            if width == 8 {
                le_u64(e, 0)
            } else {
                u64::from(le_u32(e, 0))
            }
        })
    }

    /// Every listed table, validated; a table that fails validation yields its
    /// error and the walk goes on.
    pub fn tables<M: PhysMemory>(
        &self,
        mem: &'m M,
    ) -> impl Iterator<Item = Result<Table<'m>, AcpiError>> + 'm {
        self.addresses().map(move |a| read_table(mem, a, None))
    }
}

/// Sum of all bytes, modulo 256; zero for a valid table.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

fn signature_of(bytes: &[u8]) -> [u8; 4] {
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

/// Builds table bytes: for tests, and for the ACPI tables the image builder
/// injects into QEMU (`-acpitable`).
#[cfg(any(test, feature = "std"))]
pub mod build {
    extern crate std;
    use std::vec::Vec;

    /// A complete table: header with `signature`, then `body`, checksum set.
    pub fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(super::SDT_HEADER_LEN + body.len());
        t.extend_from_slice(signature);
        t.extend_from_slice(&((super::SDT_HEADER_LEN + body.len()) as u32).to_le_bytes());
        t.push(revision);
        t.push(0); // checksum, set below
        t.extend_from_slice(b"PLXHV ");
        t.extend_from_slice(b"PARALLAX");
        t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        t.extend_from_slice(b"PLX ");
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        t.extend_from_slice(body);
        t[9] = 0u8.wrapping_sub(super::checksum(&t));
        t
    }

    /// An RSDP of revision 2 pointing at `xsdt`, or revision 0 pointing at
    /// `rsdt` when `xsdt` is `None`.
    pub fn rsdp(rsdt: u32, xsdt: Option<u64>) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(b"RSD PTR ");
        r.push(0);
        r.extend_from_slice(b"PLXHV ");
        r.push(if xsdt.is_some() { 2 } else { 0 });
        r.extend_from_slice(&rsdt.to_le_bytes());
        r[8] = 0u8.wrapping_sub(super::checksum(&r));
        if let Some(x) = xsdt {
            r.extend_from_slice(&36u32.to_le_bytes());
            r.extend_from_slice(&x.to_le_bytes());
            r.extend_from_slice(&[0, 0, 0, 0]);
            r[32] = 0u8.wrapping_sub(super::checksum(&r));
        }
        r
    }
}

#[cfg(test)]
mod tests;
