//! VT-d (Intel Virtualization Technology for Directed I/O, spec rev. 3+):
//! the formats the kernel writes for a DMA-remapping unit, as pure
//! functions the host tests check. The kernel does the register accesses.
//!
//! - **Registers** ([`reg`]): capability and extended capability words
//!   ([`Cap`], [`Ecap`]), the global command and status, the root table
//!   address, the register-based invalidation commands, the invalidation
//!   queue, and the fault recording registers.
//! - **Root and context tables** ([`root_entry`], [`context_entry`]):
//!   legacy mode, one root entry per bus pointing at a context table of 256
//!   entries (device:function), each 128 bits. A context entry that is not
//!   present blocks the function's DMA once translation is on.
//! - **Second-level page tables** ([`IoTable`]): 3 or 4 levels (39 or 48
//!   bits of bus address, the unit's SAGAW), 4 KiB leaves only. An entry is
//!   present when it allows read or write; bits 63 and 61:52 are ignored by
//!   the unit.
//! - **Invalidation descriptors** ([`desc`]) for queued invalidation, and
//!   register commands ([`ccmd_global`], [`iotlb_domain`]) where the unit has
//!   no queue.
//! - **Fault records** ([`FaultRecord`]).

use crate::ept::{ENTRIES, TableMemory};

pub mod driver;
#[cfg(test)]
mod tests;

/// Register offsets in a unit's register block.
pub mod reg {
    pub const VER: usize = 0x00;
    pub const CAP: usize = 0x08;
    pub const ECAP: usize = 0x10;
    pub const GCMD: usize = 0x18;
    pub const GSTS: usize = 0x1c;
    pub const RTADDR: usize = 0x20;
    pub const CCMD: usize = 0x28;
    pub const FSTS: usize = 0x34;
    /// Fault event control (bit 31: interrupt masked), data, address and
    /// upper address: the MSI a primary fault raises.
    pub const FECTL: usize = 0x38;
    pub const FEDATA: usize = 0x3c;
    pub const FEADDR: usize = 0x40;
    pub const FEUADDR: usize = 0x44;
    pub const IQH: usize = 0x80;
    pub const IQT: usize = 0x88;
    pub const IQA: usize = 0x90;
    pub const ICS: usize = 0x9c;
}

/// Bits of the global command register (the status register has the same
/// bit for the state the command asks for).
pub mod gcmd {
    pub const TE: u32 = 1 << 31;
    pub const SRTP: u32 = 1 << 30;
    pub const QIE: u32 = 1 << 26;
    /// The one-shot commands: written back as 0 when the status is copied
    /// into a new command (SRTP), so they are never repeated.
    pub const ONE_SHOT: u32 = SRTP | (1 << 29) | (1 << 27) | (1 << 24);
}

/// Bits of the fault status register.
pub mod fsts {
    /// Primary fault overflow.
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault: a fault record is set.
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error.
    pub const IQE: u32 = 1 << 4;
}

/// The capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cap(pub u64);

impl Cap {
    /// Domain ids the unit supports (2^(4 + 2·ND)).
    pub fn domains(self) -> u32 {
        let nd = (self.0 & 7).min(6) as u32;
        1 << (4 + 2 * nd)
    }
    /// Caching mode: not-present entries may be cached, so making an entry
    /// present needs an invalidation too.
    pub fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// Supported adjusted guest address widths (bit 1: 39-bit, 3 levels;
    /// bit 2: 48-bit, 4 levels).
    pub fn sagaw(self) -> u8 {
        ((self.0 >> 8) & 0x1f) as u8
    }
    /// Maximum guest address width in bits.
    pub fn mgaw(self) -> u8 {
        ((self.0 >> 16) & 0x3f) as u8 + 1
    }
    /// Offset of the first fault recording register.
    pub fn fault_offset(self) -> usize {
        (((self.0 >> 24) & 0x3ff) * 16) as usize
    }
    /// Number of fault recording registers.
    pub fn fault_records(self) -> usize {
        ((self.0 >> 40) & 0xff) as usize + 1
    }
    /// Write draining and read draining are supported.
    pub fn drain(self) -> (bool, bool) {
        (self.0 & (1 << 54) != 0, self.0 & (1 << 55) != 0)
    }
    /// The page-table depth to use: 4 where the unit walks 48 bits, else 3
    /// where it walks 39; `None` where it supports neither.
    pub fn levels(self) -> Option<u8> {
        if self.sagaw() & 4 != 0 {
            Some(4)
        } else if self.sagaw() & 2 != 0 {
            Some(3)
        } else {
            None
        }
    }
}

/// The extended capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ecap(pub u64);

impl Ecap {
    /// Page walks snoop the CPU caches (else table writes must be flushed).
    pub fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// Queued invalidation.
    pub fn queued_invalidation(self) -> bool {
        self.0 & 2 != 0
    }
    /// Offset of the IOTLB registers (IVA at +0, IOTLB at +8).
    pub fn iotlb_offset(self) -> usize {
        (((self.0 >> 8) & 0x3ff) * 16) as usize
    }
}

/// A root entry (low 64 bits; the high half is 0): present, pointing at a
/// context table.
pub const fn root_entry(context_table: u64) -> u64 {
    (context_table & !0xfff) | 1
}

/// A context entry, (low, high): present, second-level translation of
/// untranslated requests (TT = 0) through the tables at `root`, `levels`
/// deep, tagged with domain id `did`.
pub const fn context_entry(root: u64, levels: u8, did: u16) -> (u64, u64) {
    let aw = (levels - 2) as u64; // 1: 39-bit (3 levels), 2: 48-bit (4 levels)
    ((root & !0xfff) | 1, aw | (did as u64) << 8)
}

/// Register-based invalidation: the context-cache command for a global
/// invalidation (the ICC bit clears when done).
pub const fn ccmd_global() -> u64 {
    1 << 63 | 1 << 61
}

/// Register-based invalidation: the IOTLB command for every entry of one
/// domain id, draining reads and writes where the unit can (the IVT bit
/// clears when done).
pub const fn iotlb_domain(did: u16, drain_write: bool, drain_read: bool) -> u64 {
    1 << 63 | 2 << 60 | (drain_read as u64) << 49 | (drain_write as u64) << 48 | (did as u64) << 32
}

/// Register-based invalidation: the IOTLB command for everything.
pub const fn iotlb_global() -> u64 {
    1 << 63 | 1 << 60
}

/// Queued-invalidation descriptors (128 bits: low, high).
pub mod desc {
    /// Context-cache invalidation of everything.
    pub const fn context_global() -> (u64, u64) {
        (0x1 | 1 << 4, 0)
    }
    /// IOTLB invalidation of everything.
    pub const fn iotlb_global(drain_write: bool, drain_read: bool) -> (u64, u64) {
        (
            0x2 | 1 << 4 | (drain_write as u64) << 6 | (drain_read as u64) << 7,
            0,
        )
    }
    /// IOTLB invalidation of every entry of domain id `did`.
    pub const fn iotlb_domain(did: u16, drain_write: bool, drain_read: bool) -> (u64, u64) {
        (
            0x2 | 2 << 4
                | (drain_write as u64) << 6
                | (drain_read as u64) << 7
                | (did as u64) << 16,
            0,
        )
    }
    /// Invalidation wait: when every descriptor before it has completed,
    /// the unit writes `data` to the 4-byte-aligned `status` address.
    pub const fn wait(status: u64, data: u32) -> (u64, u64) {
        (0x5 | 1 << 5 | (data as u64) << 32, status & !3)
    }
}

/// One decoded fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultRecord {
    /// The requester: bus << 8 | device << 3 | function.
    pub source: u16,
    /// The page address the request named.
    pub address: u64,
    /// The fault reason code (VT-d spec, "Fault reasons").
    pub reason: u8,
    /// The request was a write (else a read).
    pub write: bool,
}

impl FaultRecord {
    /// Decodes a fault recording register (low, high); `None` where its F
    /// bit is clear (no fault recorded there).
    pub const fn decode(low: u64, high: u64) -> Option<Self> {
        if high & (1 << 63) == 0 {
            return None;
        }
        Some(Self {
            source: high as u16,
            address: low & !0xfff,
            reason: (high >> 32) as u8,
            // T: 0 for a write request, 1 for a read.
            write: high & (1 << 62) == 0,
        })
    }
}

/// Why a change to an [`IoTable`] was refused; a refusal changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IoError {
    /// The bus frame number is beyond what the tables translate.
    OutOfRange { bfn: u64 },
    /// The bus frame is mapped already.
    AlreadyMapped { bfn: u64 },
    /// No table memory.
    OutOfMemory,
}

/// Read and write bits of a second-level entry.
const READ: u64 = 1;
const WRITE: u64 = 2;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// One set of second-level page tables (one IoSpace), 4 KiB leaves only.
/// Tables emptied by unmaps stay until [`IoTable::destroy`]: their number is
/// bounded by the pages ever mapped, and no table the unit may still walk
/// is freed before the IOTLB is invalidated.
#[derive(Debug, PartialEq, Eq)]
pub struct IoTable {
    root: u64,
    levels: u8,
}

impl IoTable {
    /// An empty table set `levels` (3 or 4) deep.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M, levels: u8) -> Result<Self, IoError> {
        debug_assert!(levels == 3 || levels == 4);
        Ok(Self {
            root: new_table(mem)?,
            levels,
        })
    }

    /// Physical address of the top table (the context entry's pointer).
    pub const fn root(&self) -> u64 {
        self.root
    }

    pub const fn levels(&self) -> u8 {
        self.levels
    }

    /// Bus frame numbers below this are translatable.
    pub const fn limit(&self) -> u64 {
        1 << (9 * self.levels as u32)
    }

    /// Maps bus frame `bfn` to the frame at `hpa`, readable and (with
    /// `write`) writable by devices. Never overwrites.
    pub fn map<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        bfn: u64,
        hpa: u64,
        write: bool,
    ) -> Result<(), IoError> {
        if bfn >= self.limit() {
            return Err(IoError::OutOfRange { bfn });
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let slot = index(bfn, level);
            let entry = mem.entries(table)[slot];
            table = if entry & (READ | WRITE) != 0 {
                entry & ADDRESS
            } else {
                let next = new_table(mem)?;
                mem.entries_mut(table)[slot] = next | READ | WRITE;
                next
            };
        }
        let slot = index(bfn, 1);
        if mem.entries(table)[slot] & (READ | WRITE) != 0 {
            return Err(IoError::AlreadyMapped { bfn });
        }
        mem.entries_mut(table)[slot] = (hpa & ADDRESS) | READ | if write { WRITE } else { 0 };
        Ok(())
    }

    /// The frame bus frame `bfn` maps, and whether it is writable.
    pub fn translate<M: TableMemory + ?Sized>(&self, mem: &M, bfn: u64) -> Option<(u64, bool)> {
        let (table, slot) = self.leaf(mem, bfn)?;
        let entry = mem.entries(table)[slot];
        (entry & (READ | WRITE) != 0).then_some((entry & ADDRESS, entry & WRITE != 0))
    }

    /// Removes the mapping of `bfn`; returns the frame it mapped. The unit
    /// may use the old entry until the IOTLB is invalidated.
    pub fn unmap<M: TableMemory + ?Sized>(&mut self, mem: &mut M, bfn: u64) -> Option<u64> {
        let (table, slot) = self.leaf(mem, bfn)?;
        let entry = mem.entries(table)[slot];
        if entry & (READ | WRITE) == 0 {
            return None;
        }
        mem.entries_mut(table)[slot] = 0;
        Some(entry & ADDRESS)
    }

    /// Every mapping, as (bfn, frame), in order of bfn.
    pub fn for_each<M: TableMemory + ?Sized, F: FnMut(u64, u64)>(&self, mem: &M, mut f: F) {
        walk(mem, self.root, self.levels, 0, &mut f);
    }

    /// Frees every table.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) {
        free_tree(mem, self.root, self.levels);
    }

    /// The last-level table and slot of `bfn`, where the tables reach it.
    fn leaf<M: TableMemory + ?Sized>(&self, mem: &M, bfn: u64) -> Option<(u64, usize)> {
        if bfn >= self.limit() {
            return None;
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let entry = mem.entries(table)[index(bfn, level)];
            if entry & (READ | WRITE) == 0 {
                return None;
            }
            table = entry & ADDRESS;
        }
        Some((table, index(bfn, 1)))
    }
}

fn index(bfn: u64, level: u8) -> usize {
    ((bfn >> (9 * (u32::from(level) - 1))) & 511) as usize
}

fn new_table<M: TableMemory + ?Sized>(mem: &mut M) -> Result<u64, IoError> {
    let table = mem.alloc_table().ok_or(IoError::OutOfMemory)?;
    *mem.entries_mut(table) = [0; ENTRIES];
    Ok(table)
}

fn walk<M: TableMemory + ?Sized, F: FnMut(u64, u64)>(
    mem: &M,
    table: u64,
    level: u8,
    base: u64,
    f: &mut F,
) {
    for (slot, &entry) in mem.entries(table).iter().enumerate() {
        if entry & (READ | WRITE) == 0 {
            continue;
        }
        let bfn = base | (slot as u64) << (9 * (u32::from(level) - 1));
        if level == 1 {
            f(bfn, entry & ADDRESS);
        } else {
            walk(mem, entry & ADDRESS, level - 1, bfn, f);
        }
    }
}

fn free_tree<M: TableMemory + ?Sized>(mem: &mut M, table: u64, level: u8) {
    if level > 1 {
        for slot in 0..ENTRIES {
            let entry = mem.entries(table)[slot];
            if entry & (READ | WRITE) != 0 {
                free_tree(mem, entry & ADDRESS, level - 1);
            }
        }
    }
    mem.free_table(table);
}
