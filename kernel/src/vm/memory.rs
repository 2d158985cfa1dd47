//! Memory for guests: frames for EPT tables (the kernel's `TableMemory`),
//! guest RAM, and copying to and from guest-physical addresses.

use crate::mem::{FRAMES, phys_to_virt};
use platform::PAGE_SIZE;
use platform::ept::{TableMemory, bits::EMPTY};

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

/// The kernel's memory for EPT tables: frames from the frame allocator,
/// reached through the direct map.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelTables;

impl TableMemory for KernelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let pa = FRAMES.lock().as_mut()?.alloc()?;
        self.entries_mut(pa).fill(EMPTY);
        Some(pa)
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
