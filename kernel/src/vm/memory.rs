//! Memory for guests: frames for EPT tables (the kernel's `TableMemory`),
//! guest RAM, and copying to and from guest-physical addresses.

use crate::mem::{FRAMES, phys_to_virt};
use platform::PAGE_SIZE;
use platform::ept::TableMemory;

/// A zeroed 4 KiB frame, or `None` when memory is exhausted.
pub fn alloc_zeroed_frame() -> Option<u64> {
    let pa = FRAMES.lock().as_mut()?.alloc()?;
    zero(pa, PAGE_SIZE);
    Some(pa)
}

/// `count` contiguous zeroed frames aligned to `align` frames.
pub fn alloc_zeroed_contiguous(count: u64, align: u64) -> Option<u64> {
    let pa = FRAMES.lock().as_mut()?.alloc_contiguous(count, align)?;
    zero(pa, count * PAGE_SIZE);
    Some(pa)
}

/// Gives a frame back; a refusal is a kernel bug and is logged.
pub fn free_frame(pa: u64) {
    if let Some(fa) = FRAMES.lock().as_mut()
        && let Err(e) = fa.free(pa)
    {
        defmt::error!("frame {=u64:#x} freed wrongly: {}", pa, e);
    }
}

/// Fills `len` bytes of physical memory at `pa` with zeros.
pub fn zero(pa: u64, len: u64) {
    // Safety: callers pass frames they own, inside the direct map.
    unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, len as usize) };
}

/// Reading a domain's EPT tables (walks, queries): frames reached through
/// the direct map. It allocates nothing; table writes that may allocate go
/// through the domain's [`DomainTables`].
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelTables;

/// The EPT table frames of one domain, counted against its quota, so that
/// one domain's views (a service filling and splitting them) cannot use up
/// the memory of the others.
#[derive(Clone, Copy, Debug)]
pub struct DomainTables {
    pub used: u32,
    pub limit: u32,
    /// The quota was hit (logged once).
    pub hit: bool,
}

impl DomainTables {
    /// Tables any domain may have before RAM is counted: the host p2m's
    /// upper levels and a few views.
    pub const BASE: u32 = 1024;
    /// More tables per 2 MiB of RAM: 16 views split to 4 KiB pages all over.
    pub const PER_2M: u32 = 16;

    pub const fn new() -> Self {
        Self {
            used: 0,
            limit: Self::BASE,
            hit: false,
        }
    }
}

impl TableMemory for KernelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        None
    }

    fn free_table(&mut self, table: u64) {
        free_frame(table);
    }

    fn entries(&self, table: u64) -> &[u64; 512] {
        // Safety: `table` is a frame this type allocated (the EPT code only
        // follows addresses it stored), 4 KiB aligned, in the direct map, and
        // only EPT code running under the domain's lock touches it.
        unsafe { &*phys_to_virt(table).cast::<[u64; 512]>() }
    }

    fn entries_mut(&mut self, table: u64) -> &mut [u64; 512] {
        // Safety: as in `entries`; `&mut self` serialises writers.
        unsafe { &mut *phys_to_virt(table).cast::<[u64; 512]>() }
    }
}

impl TableMemory for DomainTables {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.used >= self.limit {
            if !self.hit {
                self.hit = true;
                defmt::warn!(
                    "EPT tables: a domain reached its quota of {=u32} tables ({=u32} KiB)",
                    self.limit,
                    self.limit * 4
                );
            }
            return None;
        }
        // Not cleared here: the EPT code writes every entry of a table it
        // is given (`TableMemory::alloc_table`).
        let pa = FRAMES.lock().as_mut()?.alloc()?;
        self.used += 1;
        Some(pa)
    }

    fn free_table(&mut self, table: u64) {
        self.used = self.used.saturating_sub(1);
        free_frame(table);
    }

    fn entries(&self, table: u64) -> &[u64; 512] {
        KernelTables.entries(table)
    }

    fn entries_mut(&mut self, table: u64) -> &mut [u64; 512] {
        // Safety: as for `KernelTables::entries_mut`: the frame is one of
        // this domain's tables, reached through the direct map.
        unsafe { &mut *phys_to_virt(table).cast::<[u64; 512]>() }
    }
}
