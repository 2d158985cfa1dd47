//! EPT tables in ordinary memory, for host-side benchmarks of the range
//! operations (`cargo hv bench` reports them).

use super::{ENTRIES, Ept, EptError, MemoryType, PageSize, Perms, TableMemory};
use std::cell::Cell;

/// Tables in boxed arrays at made-up, aligned addresses; counts entry
/// writes (every change to a table goes through `entries_mut`).
#[derive(Default)]
pub struct VecMemory {
    tables: Vec<Box<[u64; ENTRIES]>>,
    /// Tables written to, one count per entry changed through this memory.
    pub writes: Cell<u64>,
}

const BASE: u64 = 0x10_0000_0000;

impl TableMemory for VecMemory {
    fn alloc_table(&mut self) -> Option<u64> {
        self.tables.push(Box::new([0; ENTRIES]));
        Some(BASE + (self.tables.len() as u64 - 1) * 4096)
    }

    fn free_table(&mut self, _table: u64) {}

    fn entries(&self, table: u64) -> &[u64; ENTRIES] {
        &self.tables[((table - BASE) / 4096) as usize]
    }

    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
        self.writes.set(self.writes.get() + 1);
        &mut self.tables[((table - BASE) / 4096) as usize]
    }
}

/// A view of `bytes` of guest memory mapped with 2 MiB pages.
fn mapped_2m(bytes: u64) -> Result<(VecMemory, Ept), EptError> {
    let mut mem = VecMemory::default();
    let mut ept = Ept::new(&mut mem)?;
    let mut gpa = 0;
    while gpa < bytes {
        ept.map(
            &mut mem,
            gpa,
            0x4000_0000 + gpa,
            PageSize::Size2M,
            Perms::ALL,
            MemoryType::WRITE_BACK,
        )?;
        gpa += PageSize::Size2M.bytes();
    }
    Ok((mem, ept))
}

/// Entry writes to make `bytes` of 2 MiB-mapped memory read-only: with the
/// range operation, and page by page (each page split out and protected
/// on its own, as a per-gfn interface must).
pub fn range_writes(bytes: u64) -> Result<(u64, u64), EptError> {
    let (mut mem, mut ept) = mapped_2m(bytes)?;
    mem.writes.set(0);
    ept.protect_range(&mut mem, 0, bytes, Perms::READ)?;
    let range = mem.writes.get();
    let (mut mem, mut ept) = mapped_2m(bytes)?;
    mem.writes.set(0);
    let mut gpa = 0;
    while gpa < bytes {
        ept.split_to_4k(&mut mem, gpa, gpa + 4096)?;
        ept.protect(&mut mem, gpa, Perms::READ)?;
        gpa += 4096;
    }
    Ok((range, mem.writes.get()))
}
