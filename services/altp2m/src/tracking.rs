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
use ipc_schema::logdirty::{GfnRange, Mechanism};
use service_bitmap::Bitmap;

use crate::intervals::Intervals;

/// What tracking keeps for one domain.
#[derive(Clone, Debug)]
pub struct Tracking {
    /// The tracked ranges of frames and their mechanism.
    pub ranges: Intervals<Mechanism>,
    /// One bit per frame: written since its protection was (re)armed.
    dirtied: Bitmap,
}

impl Tracking {
    /// Tracking for a domain of `pages` frames (nothing tracked); `None`
    /// when the heap has no room for its bitmap.
    pub fn new(pages: u64) -> Option<Self> {
        Some(Self {
            ranges: Intervals::new(),
            dirtied: Bitmap::new(GfnRange {
                gfn: 0,
                count: pages,
            })
            .ok()?,
        })
    }

    pub fn is_dirtied(&self, frame: u64) -> bool {
        self.dirtied.get(frame)
    }

    pub fn set_dirtied(&mut self, frame: u64) {
        self.dirtied.set(frame, 1);
    }

    /// The runs of dirtied frames that meet `[start, end)`, in order, as
    /// (first, one past the last), clipped to it.
    pub fn dirtied_runs(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut at = start;
        core::iter::from_fn(move || {
            let r = self.dirtied.next_run(at).filter(|r| r.gfn < end)?;
            at = r.gfn + r.count;
            Some((r.gfn, at.min(end)))
        })
    }

    /// Forgets the dirtied marks of `[start, end)`.
    pub fn clear(&mut self, start: u64, end: u64) {
        self.dirtied.clear(start, end.saturating_sub(start));
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
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = from;
        while let Some(r) = self.dirtied.next_run(at) {
            if runs.len() == max {
                return (runs, Some(r.gfn));
            }
            self.dirtied.clear(r.gfn, r.count);
            runs.push((r.gfn, r.count));
            at = r.gfn + r.count;
        }
        (runs, None)
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}
