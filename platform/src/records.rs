//! A domain's records of key and value pairs (both `u64`), kept in 4 KiB
//! frames that the domain's own table memory gives ([`TableMemory`]), so
//! that what one domain records is counted against its own quota and can
//! never use up another's room (page sharing's and VM fork's records of
//! the gfns that map a frame other than their own RAM frame:
//! docs/sharing.md).
//!
//! Records are kept in order of their keys: a look-up by key is a binary
//! search; an insertion or a removal moves the records after it, frame by
//! frame. A look-up by value ([`Records::position`]) is a scan of this
//! domain's records alone.

use crate::ept::{ENTRIES, TableMemory};

/// Records per frame: a key and a value each.
pub const PER_FRAME: usize = ENTRIES / 2;
/// Frames one domain's records may take: 32,768 records.
pub const MAX_FRAMES: usize = 128;
/// Records one domain may hold.
pub const MAX: usize = PER_FRAME * MAX_FRAMES;

/// No room for another record: the domain's quota of frames is used up or
/// it holds [`MAX`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Default)]
pub struct Records {
    frames: heapless::Vec<u64, MAX_FRAMES>,
    len: usize,
}

impl Records {
    pub const fn new() -> Self {
        Self {
            frames: heapless::Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(i: usize) -> (usize, usize) {
        (i / PER_FRAME, i % PER_FRAME * 2)
    }

    /// Record `i` (below [`Records::len`]): its key and value.
    pub fn get<M: TableMemory + ?Sized>(&self, mem: &M, i: usize) -> (u64, u64) {
        let (frame, slot) = Self::at(i);
        let e = mem.entries(self.frames[frame]);
        (e[slot], e[slot + 1])
    }

    /// Sets the value of record `i` (below [`Records::len`]).
    pub fn set<M: TableMemory + ?Sized>(&mut self, mem: &mut M, i: usize, value: u64) {
        let (frame, slot) = Self::at(i);
        mem.entries_mut(self.frames[frame])[slot + 1] = value;
    }

    /// The index and value of the record with `key`.
    pub fn find<M: TableMemory + ?Sized>(&self, mem: &M, key: u64) -> Option<(usize, u64)> {
        let i = self.lower_bound(mem, key);
        let (k, v) = (i < self.len).then(|| self.get(mem, i))?;
        (k == key).then_some((i, v))
    }

    /// The index of the first record whose key is not below `key`.
    fn lower_bound<M: TableMemory + ?Sized>(&self, mem: &M, key: u64) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.get(mem, mid).0 < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The index of the first record for which `f(key, value)` holds.
    pub fn position<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        mut f: impl FnMut(u64, u64) -> bool,
    ) -> Option<usize> {
        let mut i = 0;
        for &frame in &self.frames {
            let e = mem.entries(frame);
            for pair in e.chunks_exact(2).take(self.len - i) {
                if f(pair[0], pair[1]) {
                    return Some(i);
                }
                i += 1;
            }
        }
        None
    }

    /// Makes sure one more record fits, taking a frame if it must.
    pub fn reserve<M: TableMemory + ?Sized>(&mut self, mem: &mut M) -> Result<(), Full> {
        if self.len < self.frames.len() * PER_FRAME {
            return Ok(());
        }
        if self.frames.is_full() {
            return Err(Full);
        }
        let frame = mem.alloc_table().ok_or(Full)?;
        // (Cannot fail: checked above.)
        let _ = self.frames.push(frame);
        Ok(())
    }

    /// Adds a record in its place (no check that `key` is new: see
    /// [`Records::find`]).
    pub fn insert<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        key: u64,
        value: u64,
    ) -> Result<(), Full> {
        self.reserve(mem)?;
        let i = self.lower_bound(mem, key);
        // Records i.. move up by one, the last frame first: each frame's
        // records within it, then its first slot takes the last record of
        // the frame before.
        let (first, from) = Self::at(i);
        let (last, end) = Self::at(self.len);
        for f in (first..=last).rev() {
            let start = if f == first { from } else { 0 };
            let stop = if f == last { end } else { ENTRIES - 2 };
            mem.entries_mut(self.frames[f])
                .copy_within(start..stop, start + 2);
            if f > first {
                let before = mem.entries(self.frames[f - 1]);
                let carried = (before[ENTRIES - 2], before[ENTRIES - 1]);
                let e = mem.entries_mut(self.frames[f]);
                (e[0], e[1]) = carried;
            }
        }
        let e = mem.entries_mut(self.frames[first]);
        (e[from], e[from + 1]) = (key, value);
        self.len += 1;
        Ok(())
    }

    /// Removes record `i` (below [`Records::len`]), moving the records
    /// after it down by one, and returns it. A frame left empty is given
    /// back, except the first (kept until [`Records::clear`]).
    pub fn remove<M: TableMemory + ?Sized>(&mut self, mem: &mut M, i: usize) -> (u64, u64) {
        let removed = self.get(mem, i);
        let (first, from) = Self::at(i);
        let (last, end) = Self::at(self.len - 1);
        for f in first..=last {
            let start = if f == first { from } else { 0 };
            let stop = if f == last { end + 2 } else { ENTRIES };
            mem.entries_mut(self.frames[f])
                .copy_within(start + 2..stop, start);
            if f < last {
                let after = mem.entries(self.frames[f + 1]);
                let carried = (after[0], after[1]);
                let e = mem.entries_mut(self.frames[f]);
                (e[ENTRIES - 2], e[ENTRIES - 1]) = carried;
            }
        }
        self.len -= 1;
        if self.frames.len() > 1
            && self.len <= (self.frames.len() - 1) * PER_FRAME
            && let Some(frame) = self.frames.pop()
        {
            mem.free_table(frame);
        }
        removed
    }

    /// Removes the last record.
    pub fn pop<M: TableMemory + ?Sized>(&mut self, mem: &mut M) -> Option<(u64, u64)> {
        (self.len > 0).then(|| self.remove(mem, self.len - 1))
    }

    /// Removes every record and gives every frame back.
    pub fn clear<M: TableMemory + ?Sized>(&mut self, mem: &mut M) {
        for frame in self.frames.drain(..) {
            mem.free_table(frame);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// Frames from a pool with a quota; counts what is live.
    #[derive(Default)]
    struct Frames {
        frames: Vec<Option<Box<[u64; ENTRIES]>>>,
        live: usize,
        quota: usize,
    }

    impl TableMemory for Frames {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.live >= self.quota {
                return None;
            }
            self.live += 1;
            self.frames.push(Some(Box::new([0xdead; ENTRIES])));
            Some(self.frames.len() as u64 * 4096)
        }
        fn free_table(&mut self, table: u64) {
            let f = &mut self.frames[table as usize / 4096 - 1];
            assert!(f.take().is_some(), "freed twice");
            self.live -= 1;
        }
        fn entries(&self, table: u64) -> &[u64; ENTRIES] {
            self.frames[table as usize / 4096 - 1]
                .as_ref()
                .expect("a live frame")
        }
        fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
            self.frames[table as usize / 4096 - 1]
                .as_mut()
                .expect("a live frame")
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u64, u64),
        Remove(u64),
        Pop,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so that puts hit existing records and removals hit.
        let key = 0u64..600;
        prop_oneof![
            6 => (key.clone(), any::<u64>()).prop_map(|(k, v)| Op::Put(k, v)),
            3 => key.prop_map(Op::Remove),
            1 => Just(Op::Pop),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Against a map: the same records, frames in proportion to them
        /// (the first kept, none other left over, none freed twice), and
        /// the quota respected.
        #[test]
        fn records_are_a_map_in_as_few_frames_as_they_need(
            ops in proptest::collection::vec(op(), 1..1500),
            quota in 1usize..4,
        ) {
            let mut mem = Frames { quota, ..Frames::default() };
            let mut r = Records::new();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            // Whether a frame was taken since the last clear.
            let mut first = false;
            for op in ops {
                match op {
                    Op::Put(k, v) => match r.find(&mem, k) {
                        Some((i, _)) => {
                            r.set(&mut mem, i, v);
                            model.insert(k, v);
                        }
                        None => match r.insert(&mut mem, k, v) {
                            Ok(()) => {
                                model.insert(k, v);
                                first = true;
                            }
                            Err(Full) => prop_assert_eq!(model.len(), quota * PER_FRAME),
                        },
                    },
                    Op::Remove(k) => {
                        if let Some((i, v)) = r.find(&mem, k) {
                            prop_assert_eq!(r.remove(&mut mem, i), (k, v));
                        }
                        prop_assert_eq!(r.find(&mem, k).is_some(), false);
                        model.remove(&k);
                    }
                    Op::Pop => {
                        if let Some((k, v)) = r.pop(&mut mem) {
                            prop_assert_eq!(model.remove(&k), Some(v));
                        }
                    }
                    Op::Clear => {
                        r.clear(&mut mem);
                        model.clear();
                        first = false;
                    }
                }
                prop_assert_eq!(r.len(), model.len());
                prop_assert_eq!(mem.live, model.len().div_ceil(PER_FRAME).max(usize::from(first)));
                for (i, (&k, &v)) in model.iter().enumerate() {
                    prop_assert_eq!(r.get(&mem, i), (k, v), "in order");
                    prop_assert_eq!(r.find(&mem, k), Some((i, v)));
                }
            }
            r.clear(&mut mem);
            prop_assert_eq!(mem.live, 0);
        }
    }
}
