//! Physical memory: the direct map and the frame allocator.
//!
//! The kernel reads physical memory through the direct map, physical address
//! plus [`PHYS_OFFSET`]; the boot page tables map the first 4 GiB there.
//! Usable RAM is what the firmware calls available minus what is still in use
//! at boot (`platform::memory::usable_regions` decides); RAM above the direct
//! map is not used yet and is reported as such.

use crate::bootinfo::BootInfo;
use core::cell::UnsafeCell;
use platform::PAGE_SIZE;
use platform::acpi::PhysMemory;
use platform::memory::{FrameBitmap, Region, usable_regions};
use spin::Mutex;

/// Where the kernel image is mapped: virtual = physical + KERNEL_BASE. The
/// linker script's KERNEL_BASE must equal it.
#[allow(dead_code)]
pub const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;
/// Base of the direct map of physical memory.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;
/// End of the physical range the direct map covers.
pub const DIRECT_MAP_END: u64 = 4 << 30;

/// The most disjoint usable ranges the kernel keeps.
const MAX_REGIONS: usize = 64;

/// A pointer to physical address `pa` through the direct map.
pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (pa + PHYS_OFFSET) as *mut u8
}

/// The physical range the kernel image occupies (linker symbols).
pub fn kernel_image() -> Region {
    unsafe extern "C" {
        static __kernel_phys_start: u8;
        static __kernel_phys_end: u8;
    }
    // Only the addresses of the linker symbols are taken.
    let (start, end) = (
        &raw const __kernel_phys_start as u64,
        &raw const __kernel_phys_end as u64,
    );
    Region { start, end }
}

/// Reads physical memory through the direct map, refusing what it does not
/// cover. The ACPI parsers read firmware tables through this.
#[derive(Clone, Copy, Debug)]
pub struct DirectMap;

impl PhysMemory for DirectMap {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        if end > DIRECT_MAP_END {
            return None;
        }
        // Safety: [addr, end) lies in the direct map, which maps all of it
        // for the kernel's lifetime; firmware tables and boot data are never
        // written while the kernel reads them.
        Some(unsafe { core::slice::from_raw_parts(phys_to_virt(addr), len) })
    }
}

/// Storage that the frame allocator's bitmap and region list live in.
struct Statics {
    usable: UnsafeCell<heapless::Vec<Region, MAX_REGIONS>>,
}

// Safety: written once in `init`, before `FRAMES` is set, on one CPU.
unsafe impl Sync for Statics {}

static STATICS: Statics = Statics {
    usable: UnsafeCell::new(heapless::Vec::new()),
};

/// The frame allocator, once memory is set up.
pub static FRAMES: Mutex<Option<FrameBitmap<'static>>> = Mutex::new(None);

/// What `init` found.
#[derive(Debug, defmt::Format)]
pub struct MemorySummary {
    pub usable_bytes: u64,
    pub regions: usize,
    pub above_direct_map: u64,
    pub bitmap: Region,
}

/// Why memory could not be set up.
#[derive(Debug, defmt::Format)]
pub enum MemoryError {
    NoMemoryMap,
    TooManyRegions,
    NoRoomForBitmap { bytes: u64 },
}

/// Builds the frame allocator from the boot memory map, keeping out the first
/// megabyte, the kernel image, the boot information and every module.
pub fn init(boot: &BootInfo) -> Result<MemorySummary, MemoryError> {
    if boot.available.is_empty() {
        return Err(MemoryError::NoMemoryMap);
    }
    let mut reserved: heapless::Vec<Region, 48> = heapless::Vec::new();
    let mut keep = |r: Region| reserved.push(r).map_err(|_| MemoryError::TooManyRegions);
    keep(Region::new(0, 1 << 20))?;
    keep(kernel_image())?;
    keep(boot.info_region)?;
    for m in &boot.modules {
        keep(m.region)?;
    }
    // Only RAM inside the direct map is used for now.
    keep(Region {
        start: DIRECT_MAP_END,
        end: u64::MAX,
    })?;
    let above_direct_map: u64 = boot
        .available
        .iter()
        .map(|a| a.end.saturating_sub(a.start.max(DIRECT_MAP_END)))
        .sum();

    let first: heapless::Vec<Region, MAX_REGIONS> =
        usable_regions(&boot.available, &reserved).map_err(|_| MemoryError::TooManyRegions)?;
    let top = first.last().map_or(0, |r| r.end);
    let words = FrameBitmap::words_for(top);
    let bytes = (words as u64 * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let bitmap = first
        .iter()
        .find(|r| r.len() >= bytes)
        .map(|r| Region::new(r.start, bytes))
        .ok_or(MemoryError::NoRoomForBitmap { bytes })?;
    reserved
        .push(bitmap)
        .map_err(|_| MemoryError::TooManyRegions)?;
    let usable: heapless::Vec<Region, MAX_REGIONS> =
        usable_regions(&boot.available, &reserved).map_err(|_| MemoryError::TooManyRegions)?;

    // Safety: runs once at boot on the bootstrap processor, before anything
    // reads `STATICS` (see `impl Sync for Statics`).
    let usable: &'static heapless::Vec<Region, MAX_REGIONS> = unsafe {
        *STATICS.usable.get() = usable;
        &*STATICS.usable.get()
    };
    // Safety: `bitmap` is RAM that no usable region includes any more, inside
    // the direct map, so this is the only reference to it.
    let storage =
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(bitmap.start).cast::<u64>(), words) };
    let allocator = FrameBitmap::new(storage, usable.as_slice());
    let summary = MemorySummary {
        usable_bytes: allocator.free_frames() * PAGE_SIZE,
        regions: usable.len(),
        above_direct_map,
        bitmap,
    };
    *FRAMES.lock() = Some(allocator);
    Ok(summary)
}

/// Whether any byte of `start .. end` is RAM the frame allocator hands out.
pub fn allocatable(start: u64, end: u64) -> bool {
    // Safety: `STATICS.usable` is written once in `init`, before any system
    // call can ask, and only read afterwards.
    let usable = unsafe { &*STATICS.usable.get() };
    usable.iter().any(|r| r.start < end && start < r.end)
}
