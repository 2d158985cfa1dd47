//! One bit per guest frame of a range (1 GiB of RAM is 32 KiB), and the
//! runs of set bits: a dirty log of the logdirty service, the frames the
//! altp2m service marked dirtied.

#![no_std]

extern crate alloc;

use alloc::collections::TryReserveError;
use alloc::vec::Vec;
use ipc_schema::logdirty::GfnRange;

/// One bit per gfn of `[base, base + count)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    base: u64,
    count: u64,
    words: Vec<u64>,
}

/// Bytes a bitmap of `count` pages takes.
pub fn bytes_for(count: u64) -> usize {
    usize::try_from(count.div_ceil(64)).map_or(usize::MAX, |w| w.saturating_mul(8))
}

impl Bitmap {
    /// All clear, over `range` (a range that does not wrap). Fails when the
    /// heap has no room for it (nothing is allocated then).
    pub fn new(range: GfnRange) -> Result<Self, TryReserveError> {
        let n = usize::try_from(range.count.div_ceil(64)).unwrap_or(usize::MAX);
        let mut words = Vec::new();
        words.try_reserve_exact(n)?;
        words.resize(n, 0);
        Ok(Self {
            base: range.gfn,
            count: range.count,
            words,
        })
    }

    /// The range it covers.
    pub fn range(&self) -> GfnRange {
        GfnRange {
            gfn: self.base,
            count: self.count,
        }
    }

    /// `[start, end)` of bit indexes for the gfns `[gfn, end)` within the
    /// range (empty when they do not meet).
    fn clip(&self, gfn: u64, end: u64) -> (u64, u64) {
        let lo = gfn.max(self.base) - self.base;
        let hi = end.min(self.base + self.count).saturating_sub(self.base);
        (lo, hi.max(lo))
    }

    /// Sets (`on`) or clears the bits of the gfns `[gfn, end)` that are in
    /// the range.
    fn put(&mut self, gfn: u64, end: u64, on: bool) {
        let (mut i, hi) = self.clip(gfn, end);
        while i < hi {
            let w = (i / 64) as usize;
            let bit = i % 64;
            let n = (64 - bit).min(hi - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(word) = self.words.get_mut(w) {
                if on {
                    *word |= mask;
                } else {
                    *word &= !mask;
                }
            }
            i += n;
        }
    }

    /// Sets the bits of `[gfn, gfn + count)` within the range.
    pub fn set(&mut self, gfn: u64, count: u64) {
        self.put(gfn, gfn.saturating_add(count), true);
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.put(self.base, self.base + self.count, true);
    }

    /// Clears the bits of `[gfn, gfn + count)` within the range.
    pub fn clear(&mut self, gfn: u64, count: u64) {
        self.put(gfn, gfn.saturating_add(count), false);
    }

    /// Whether the bit of `gfn` is set.
    pub fn get(&self, gfn: u64) -> bool {
        let (i, hi) = self.clip(gfn, gfn.saturating_add(1));
        i < hi
            && self
                .words
                .get((i / 64) as usize)
                .is_some_and(|w| w >> (i % 64) & 1 != 0)
    }

    /// Bits set.
    pub fn ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first index at or after `i` whose bit is `on`, or the end.
    fn find(&self, i: u64, on: bool) -> u64 {
        let mut i = i;
        while i < self.count {
            let w = (i / 64) as usize;
            let Some(&word) = self.words.get(w) else {
                break;
            };
            let word = if on { word } else { !word } >> (i % 64);
            if word != 0 {
                return (i + u64::from(word.trailing_zeros())).min(self.count);
            }
            i = (w as u64 + 1) * 64;
        }
        self.count
    }

    /// The first run of set bits at or after gfn `from` (lowest first), as
    /// a range of gfns.
    pub fn next_run(&self, from: u64) -> Option<GfnRange> {
        let (i, hi) = self.clip(from, u64::MAX);
        if i >= hi {
            return None;
        }
        let start = self.find(i, true);
        if start >= self.count {
            return None;
        }
        let end = self.find(start, false);
        Some(GfnRange {
            gfn: self.base + start,
            count: end - start,
        })
    }
}
