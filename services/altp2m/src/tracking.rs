//! Dirty tracking as a constraint on the entries (docs/p2m.md, rule 3;
//! docs/logdirty.md; LD-2..LD-4).
//!
//! The logdirty service keeps the logs; this service owns the entries, so
//! it keeps what tracking does to them, as part of the model every entry
//! is derived from ([`super::policy::Domain::effective`]):
//!
//! - A frame of a range tracked by **write-protection** loses write in every
//!   entry that maps it (view 0 and every view, remapped or not) until it is
//!   written: the write faults, the frame is marked *dirtied* here, its
//!   entries get write back, and the vCPU retries. The logdirty service
//!   takes the dirtied frames ([`Tracking::take`]), which protects them
//!   again.
//! - A range tracked by **PML** keeps its access; the host p2m's entries
//!   there are 4 KiB (PML logs a page per dirty bit it sets) and every
//!   view's dirty bits are cleared when tracking starts and when the
//!   logdirty service re-arms what it read. PML logs the guest-physical
//!   address a write used, which in a view where a change_gfn points gfn A
//!   at the frame of gfn B is A, not B, whose contents changed: so such
//!   entries are write-protected as above (the fault names the view, so the
//!   frame is known), and when a write lifts the protection their dirty bit
//!   is set at once, so that PML does not log A as well (LD-4).

use alloc::vec::Vec;
use ipc_schema::logdirty::Mechanism;

use crate::intervals::Intervals;

/// What tracking keeps for one domain.
#[derive(Clone, Debug, Default)]
pub struct Tracking {
    /// The tracked ranges of frames and their mechanism.
    pub ranges: Intervals<Mechanism>,
    /// One bit per frame: written since its protection was (re)armed.
    dirtied: Vec<u64>,
}

impl Tracking {
    /// Tracking for a domain of `pages` frames (nothing tracked); `None`
    /// when the heap has no room for its bitmap.
    pub fn new(pages: u64) -> Option<Self> {
        let words = usize::try_from(pages.div_ceil(64)).ok()?;
        let mut dirtied = Vec::new();
        dirtied.try_reserve_exact(words).ok()?;
        dirtied.resize(words, 0);
        Some(Self {
            ranges: Intervals::new(),
            dirtied,
        })
    }

    pub fn is_dirtied(&self, frame: u64) -> bool {
        let Ok(i) = usize::try_from(frame / 64) else {
            return false;
        };
        self.dirtied
            .get(i)
            .is_some_and(|w| w & (1 << (frame % 64)) != 0)
    }

    pub fn set_dirtied(&mut self, frame: u64) {
        if let Some(w) = usize::try_from(frame / 64)
            .ok()
            .and_then(|i| self.dirtied.get_mut(i))
        {
            *w |= 1 << (frame % 64);
        }
    }

    /// Forgets the dirtied marks of `[start, end)`.
    pub fn clear(&mut self, start: u64, end: u64) {
        for f in start..end.min(self.dirtied.len() as u64 * 64) {
            if f % 64 == 0 && f + 64 <= end {
                self.dirtied[(f / 64) as usize] = 0;
            } else {
                self.dirtied[(f / 64) as usize] &= !(1 << (f % 64));
            }
        }
    }

    /// Whether tracking takes write away from an entry of `view` that
    /// maps `frame` at `gfn`, as things stand.
    pub fn blocks_write(&self, view: u16, gfn: u64, frame: u64) -> bool {
        match self.ranges.get(frame) {
            Some(Mechanism::WriteProtect) => !self.is_dirtied(frame),
            Some(Mechanism::Pml) => view != 0 && gfn != frame && !self.is_dirtied(frame),
            None => false,
        }
    }

    /// Whether a lifted entry of `view` mapping `frame` at `gfn` must have
    /// its dirty bit set (a remapped entry under PML: its writes are
    /// credited to the frame here, not logged as `gfn` by PML).
    pub fn premark(&self, view: u16, gfn: u64, frame: u64) -> bool {
        view != 0
            && gfn != frame
            && self.ranges.get(frame) == Some(Mechanism::Pml)
            && self.is_dirtied(frame)
    }

    /// Takes up to `max` runs of dirtied frames at or after `from`, lowest
    /// first, clearing them: (runs as (first, count), where to go on from
    /// if more remain).
    pub fn take(&mut self, from: u64, max: usize) -> (Vec<(u64, u64)>, Option<u64>) {
        let limit = self.dirtied.len() as u64 * 64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut f = from;
        while f < limit {
            let w = self.dirtied[(f / 64) as usize] >> (f % 64);
            if w == 0 {
                f = (f / 64 + 1) * 64;
                continue;
            }
            let start = f + u64::from(w.trailing_zeros());
            if runs.len() == max {
                return (runs, Some(start));
            }
            let mut end = start;
            while end < limit && self.is_dirtied(end) {
                end += 1;
            }
            self.clear(start, end);
            runs.push((start, end - start));
            f = end;
        }
        (runs, None)
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}
