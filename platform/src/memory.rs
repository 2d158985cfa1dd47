//! Physical memory regions: from the firmware's memory map to the frames the
//! kernel may hand out.
//!
//! The firmware lists RAM that is available; parts of it are still in use when
//! the kernel starts (the kernel image, the boot modules, the boot information,
//! the first megabyte with its BIOS data). [`usable_regions`] subtracts those,
//! rounding available RAM inwards and reserved ranges outwards to whole
//! frames, and returns sorted, disjoint, frame-aligned ranges. It is the only
//! place that decides which frames are free at boot.

use crate::PAGE_SIZE;

/// A half-open range of physical addresses `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    /// The range `[start, start + len)`, clamped at the top of the address space.
    pub const fn new(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(len),
        }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn overlaps(&self, other: &Region) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The largest frame-aligned range inside this one.
    pub const fn shrink_to_frames(&self) -> Region {
        let start = self.start.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        let end = self.end / PAGE_SIZE * PAGE_SIZE;
        Region { start, end }
    }

    /// The smallest frame-aligned range containing this one.
    pub const fn grow_to_frames(&self) -> Region {
        let start = self.start / PAGE_SIZE * PAGE_SIZE;
        let end = self.end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        Region { start, end }
    }
}

/// More disjoint usable ranges than the output can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TooManyRegions {
    pub capacity: usize,
}

/// Computes the frame-aligned ranges of available RAM that no reserved range
/// touches. The result is sorted by address, disjoint and merged (adjacent
/// ranges are joined). Overlapping or unsorted inputs are fine.
pub fn usable_regions<const N: usize>(
    available: &[Region],
    reserved: &[Region],
) -> Result<heapless::Vec<Region, N>, TooManyRegions> {
    let mut out: heapless::Vec<Region, N> = heapless::Vec::new();
    let full = TooManyRegions { capacity: N };
    for a in available {
        let a = a.shrink_to_frames();
        if a.is_empty() {
            continue;
        }
        // Cut every reserved range out of `a`, piece by piece, lowest first.
        let mut cursor = a.start;
        while cursor < a.end {
            let next_hole = reserved
                .iter()
                .map(Region::grow_to_frames)
                .filter(|r| !r.is_empty() && r.end > cursor && r.start < a.end)
                .min_by_key(|r| r.start);
            let piece_end = match next_hole {
                Some(h) if h.start <= cursor => {
                    cursor = h.end;
                    continue;
                }
                Some(h) => h.start,
                None => a.end,
            };
            insert_merged(
                &mut out,
                Region {
                    start: cursor,
                    end: piece_end,
                },
            )
            .map_err(|_| full)?;
            cursor = piece_end;
        }
    }
    Ok(out)
}

/// Inserts `r` into the sorted, disjoint list, merging with neighbours it
/// overlaps or touches.
fn insert_merged<const N: usize>(list: &mut heapless::Vec<Region, N>, r: Region) -> Result<(), ()> {
    let mut merged = r;
    // Remove every range that overlaps or touches `merged`, widening it.
    let mut i = 0;
    while i < list.len() {
        let x = list[i];
        if x.start <= merged.end && merged.start <= x.end {
            merged.start = merged.start.min(x.start);
            merged.end = merged.end.max(x.end);
            list.remove(i);
        } else {
            i += 1;
        }
    }
    let at = list
        .iter()
        .position(|x| x.start > merged.start)
        .unwrap_or(list.len());
    list.insert(at, merged).map_err(|_| ())
}

/// Why a frame could not be given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FreeError {
    /// The address is not the start of a frame.
    Unaligned { addr: u64 },
    /// The frame was never allocatable RAM (outside every usable region).
    NotRam { addr: u64 },
    /// The frame is already free: a double free.
    AlreadyFree { addr: u64 },
}

/// A frame allocator: one bit per 4 KiB frame, set when the frame is free.
///
/// Only frames inside the usable regions given at creation are ever handed
/// out or taken back, and a frame is handed out at most once until it is
/// freed: the bit is the single source of truth.
#[derive(Debug)]
pub struct FrameBitmap<'a> {
    words: &'a mut [u64],
    usable: &'a [Region],
    free: u64,
    /// Index of the lowest word that may hold a free bit.
    hint: usize,
}

impl<'a> FrameBitmap<'a> {
    /// Words of storage needed to cover every frame below `end`.
    pub const fn words_for(end: u64) -> usize {
        (end / PAGE_SIZE).div_ceil(64) as usize
    }

    /// Builds the allocator over `words` with the frames of `usable` free.
    /// Usable frames beyond the storage are left out; the caller sizes the
    /// storage with [`Self::words_for`].
    pub fn new(words: &'a mut [u64], usable: &'a [Region]) -> Self {
        words.fill(0);
        let covered = words.len() as u64 * 64;
        let mut free = 0;
        for r in usable {
            let r = r.shrink_to_frames();
            for frame in r.start / PAGE_SIZE..(r.end / PAGE_SIZE).min(covered) {
                let (w, b) = ((frame / 64) as usize, frame % 64);
                if words[w] & (1 << b) == 0 {
                    words[w] |= 1 << b;
                    free += 1;
                }
            }
        }
        Self {
            words,
            usable,
            free,
            hint: 0,
        }
    }

    /// Takes the lowest free frame and returns its physical address.
    pub fn alloc(&mut self) -> Option<u64> {
        for i in self.hint..self.words.len() {
            let w = self.words[i];
            if w != 0 {
                let bit = w.trailing_zeros() as u64;
                self.words[i] &= !(1 << bit);
                self.free -= 1;
                self.hint = i;
                return Some((i as u64 * 64 + bit) * PAGE_SIZE);
            }
        }
        self.hint = self.words.len();
        None
    }

    /// Takes `count` contiguous free frames starting at a multiple of
    /// `align` frames (a power of two), lowest first, and returns the physical
    /// address of the first. Scans the bitmap: meant for setup, not hot paths.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() {
            return None;
        }
        let frames = self.words.len() as u64 * 64;
        let is_free = |words: &[u64], f: u64| words[(f / 64) as usize] & (1 << (f % 64)) != 0;
        let mut start = 0;
        while start + count <= frames {
            match (start..start + count).find(|&f| !is_free(self.words, f)) {
                None => {
                    for f in start..start + count {
                        self.words[(f / 64) as usize] &= !(1 << (f % 64));
                    }
                    self.free -= count;
                    return Some(start * PAGE_SIZE);
                }
                // Restart after the used frame, at the next aligned start.
                Some(used) => start = (used + 1).div_ceil(align) * align,
            }
        }
        None
    }

    /// Gives a frame back.
    pub fn free(&mut self, addr: u64) -> Result<(), FreeError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(FreeError::Unaligned { addr });
        }
        let frame = addr / PAGE_SIZE;
        let (w, b) = ((frame / 64) as usize, frame % 64);
        let in_ram = w < self.words.len()
            && self.usable.iter().any(|r| {
                let r = r.shrink_to_frames();
                r.start <= addr && addr < r.end
            });
        if !in_ram {
            return Err(FreeError::NotRam { addr });
        }
        if self.words[w] & (1 << b) != 0 {
            return Err(FreeError::AlreadyFree { addr });
        }
        self.words[w] |= 1 << b;
        self.free += 1;
        self.hint = self.hint.min(w);
        Ok(())
    }

    /// Frames free now.
    pub fn free_frames(&self) -> u64 {
        self.free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn carves_kernel_modules_and_low_memory() {
        // The shape of QEMU's map with SeaBIOS: low RAM, then RAM from 1 MiB.
        let available = [Region::new(0, 0x9fc00), Region::new(MIB, 127 * MIB)];
        let reserved = [
            Region::new(0, MIB),            // BIOS data, real-mode IVT, EBDA
            Region::new(2 * MIB, 0x3_1234), // the kernel image
            Region::new(0x101000, 0x800),   // a module, not frame aligned
            Region::new(0x100030, 0x400),   // the boot information
        ];
        let usable: heapless::Vec<Region, 8> = usable_regions(&available, &reserved).unwrap();
        assert_eq!(
            usable.as_slice(),
            &[
                Region {
                    start: 0x102000,
                    end: 2 * MIB
                },
                Region {
                    start: 2 * MIB + 0x32000,
                    end: 128 * MIB
                },
            ]
        );
    }

    #[test]
    fn unaligned_available_ram_is_rounded_inwards() {
        let usable: heapless::Vec<Region, 4> = usable_regions(
            &[Region {
                start: 0x1001,
                end: 0x4fff,
            }],
            &[],
        )
        .unwrap();
        assert_eq!(
            usable.as_slice(),
            &[Region {
                start: 0x2000,
                end: 0x4000
            }]
        );
    }

    #[test]
    fn overlapping_available_ranges_merge() {
        let available = [Region::new(0x10000, 0x10000), Region::new(0x18000, 0x10000)];
        let usable: heapless::Vec<Region, 4> = usable_regions(&available, &[]).unwrap();
        assert_eq!(
            usable.as_slice(),
            &[Region {
                start: 0x10000,
                end: 0x28000
            }]
        );
    }

    #[test]
    fn reports_when_the_output_is_too_small() {
        let available = [Region::new(0, 0x10000)];
        let reserved = [Region::new(0x1000, 0x1000), Region::new(0x3000, 0x1000)];
        assert_eq!(
            usable_regions::<2>(&available, &reserved),
            Err(TooManyRegions { capacity: 2 })
        );
    }

    fn region() -> impl Strategy<Value = Region> {
        (0u64..0x40_0000, 0u64..0x10_0000).prop_map(|(s, l)| Region::new(s, l))
    }

    #[test]
    fn frames_are_handed_out_once_and_taken_back_once() {
        let usable = [Region::new(0x3000, 0x2000), Region::new(0x10000, 0x1000)];
        let mut words = [0u64; 1];
        let mut fa = FrameBitmap::new(&mut words, &usable);
        assert_eq!(fa.free_frames(), 3);
        assert_eq!(fa.alloc(), Some(0x3000));
        assert_eq!(fa.alloc(), Some(0x4000));
        assert_eq!(fa.alloc(), Some(0x10000));
        assert_eq!(fa.alloc(), None);
        assert_eq!(fa.free(0x4000), Ok(()));
        assert_eq!(
            fa.free(0x4000),
            Err(FreeError::AlreadyFree { addr: 0x4000 })
        );
        assert_eq!(fa.free(0x5000), Err(FreeError::NotRam { addr: 0x5000 }));
        assert_eq!(fa.free(0x4001), Err(FreeError::Unaligned { addr: 0x4001 }));
        assert_eq!(fa.alloc(), Some(0x4000));
    }

    #[test]
    fn contiguous_runs_are_aligned_and_skip_used_frames() {
        let usable = [Region::new(0x1000, 0x40_0000)];
        let mut words = [0u64; 32];
        let mut fa = FrameBitmap::new(&mut words, &usable);
        // 2 MiB aligned, 2 MiB long: the first aligned start with 512 free frames.
        assert_eq!(fa.alloc_contiguous(512, 512), Some(0x20_0000));
        assert_eq!(
            fa.alloc_contiguous(512, 512),
            None,
            "0x0 is not usable and 0x400000 is past the end"
        );
        assert_eq!(fa.alloc_contiguous(4, 1), Some(0x1000));
        assert_eq!(fa.alloc(), Some(0x5000));
        assert_eq!(fa.free_frames(), 0x400 - 512 - 4 - 1);
        assert_eq!(fa.alloc_contiguous(0, 1), None);
        assert_eq!(
            fa.alloc_contiguous(1, 3),
            None,
            "alignment must be a power of two"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc,
        Free(u64),
    }

    proptest! {
        /// Against a set of allocated frames: every allocation is a usable
        /// frame not already out; every free succeeds exactly for frames out.
        #[test]
        fn allocator_matches_a_set_model(
            usable in proptest::collection::vec(region(), 0..4),
            ops in proptest::collection::vec(
                prop_oneof![Just(Op::Alloc), (0u64..0x50_0000).prop_map(Op::Free)], 0..200),
        ) {
            let mut words = vec![0u64; FrameBitmap::words_for(0x50_0000)];
            let mut fa = FrameBitmap::new(&mut words, &usable);
            let is_usable = |a: u64| usable.iter().any(|r| {
                let r = r.shrink_to_frames();
                r.start <= a && a < r.end
            });
            let total = (0..0x50_0000 / PAGE_SIZE).filter(|f| is_usable(f * PAGE_SIZE)).count() as u64;
            prop_assert_eq!(fa.free_frames(), total);
            let mut out = std::collections::BTreeSet::new();
            for op in ops {
                match op {
                    Op::Alloc => match fa.alloc() {
                        Some(a) => {
                            prop_assert!(is_usable(a), "{:#x} is not usable", a);
                            prop_assert!(out.insert(a), "{:#x} handed out twice", a);
                        }
                        None => prop_assert_eq!(out.len() as u64, total),
                    },
                    Op::Free(a) => {
                        let r = fa.free(a);
                        if out.remove(&a) {
                            prop_assert_eq!(r, Ok(()));
                        } else {
                            prop_assert!(r.is_err());
                        }
                    }
                }
                prop_assert_eq!(fa.free_frames(), total - out.len() as u64);
            }
        }

        /// Against a reference model over individual frames: a frame is usable
        /// exactly when it lies wholly inside some available range and touches
        /// no reserved range.
        #[test]
        fn matches_the_frame_by_frame_model(
            available in proptest::collection::vec(region(), 0..6),
            reserved in proptest::collection::vec(region(), 0..6),
        ) {
            let usable: heapless::Vec<Region, 64> = usable_regions(&available, &reserved).unwrap();
            for w in usable.windows(2) {
                prop_assert!(w[0].end < w[1].start, "sorted, disjoint, merged: {:?}", usable);
            }
            for frame in 0..(0x50_0000 / PAGE_SIZE) {
                let f = Region::new(frame * PAGE_SIZE, PAGE_SIZE);
                let expected = available.iter().any(|a| a.start <= f.start && f.end <= a.end)
                    && !reserved.iter().any(|r| r.overlaps(&f));
                let got = usable.iter().any(|u| u.start <= f.start && f.end <= u.end);
                prop_assert_eq!(got, expected, "frame {:#x}", f.start);
            }
        }
    }
}
