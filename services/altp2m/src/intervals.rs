//! A map from ranges of gfns to values: how a view's access settings are
//! kept, so that setting the access of a gigabyte is one entry, not a
//! quarter of a million.

use alloc::collections::BTreeMap;

/// Disjoint half-open ranges `[start, end)`, each with a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intervals<V> {
    /// start -> (end, value)
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for Intervals<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Copy + PartialEq> Intervals<V> {
    pub fn new() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }

    /// The value at `at`. The last range and the first are looked at
    /// before any search (a map of one or two ranges, as a view that
    /// restricts one region has, is never searched).
    #[inline]
    pub fn get(&self, at: u64) -> Option<V> {
        let (&start, &(end, v)) = self.map.last_key_value()?;
        if at >= start {
            return (at < end).then_some(v);
        }
        let (&start, &(end, v)) = self.map.first_key_value()?;
        if at < end {
            return (at >= start).then_some(v);
        }
        if self.map.len() <= 2 {
            return None;
        }
        let (_, &(end, v)) = self.map.range(..=at).next_back()?;
        (at < end).then_some(v)
    }

    /// Sets `[start, end)` to `value` (`None`: removes it), splitting the
    /// ranges it cuts and merging equal neighbours.
    pub fn set(&mut self, start: u64, end: u64, value: Option<V>) {
        if start >= end {
            return;
        }
        // Cut the range that straddles `start`, and the one that straddles `end`.
        if let Some((&s, &(e, v))) = self.map.range(..start).next_back()
            && e > start
        {
            self.map.insert(s, (start, v));
            self.map.insert(start, (e, v));
        }
        if let Some((&s, &(e, v))) = self.map.range(..end).next_back()
            && e > end
        {
            self.map.insert(s, (end, v));
            self.map.insert(end, (e, v));
        }
        // (No list of them: setting never allocates more than the ranges
        // it keeps.)
        while let Some((&s, _)) = self.map.range(start..end).next() {
            self.map.remove(&s);
        }
        if let Some(v) = value {
            self.map.insert(start, (end, v));
            self.merge_at(start);
            self.merge_at(end);
        }
    }

    /// Joins the range that ends at `at` with the one that starts there, if
    /// their values are equal.
    fn merge_at(&mut self, at: u64) {
        let Some(&(next_end, next_v)) = self.map.get(&at) else {
            return;
        };
        if let Some((&s, &(e, v))) = self.map.range(..at).next_back()
            && e == at
            && v == next_v
        {
            self.map.remove(&at);
            self.map.insert(s, (next_end, v));
        }
    }

    /// How many ranges [`Intervals::set`] with these arguments would leave
    /// (without changing anything): what a quota is checked against.
    pub fn len_after_set(&self, start: u64, end: u64, value: Option<V>) -> usize {
        if start >= end {
            return self.len();
        }
        // The ranges that overlap [start, end) go; what they reach outside
        // it stays, as up to two cut pieces.
        let before = self.map.range(..start).next_back().map(|(&s, &r)| (s, r));
        let straddles_start = before.filter(|&(_, (e, _))| e > start);
        let inside = self.map.range(start..end).count() + usize::from(straddles_start.is_some());
        // The piece left of `start` (cut, or a range ending there) and the
        // piece right of `end` (cut, or a range starting there), with values.
        let left = match straddles_start {
            Some((_, (_, v))) => Some((true, v)),
            None => before
                .filter(|&(_, (e, _))| e == start)
                .map(|(_, (_, v))| (false, v)),
        };
        let last = self
            .map
            .range(..end)
            .next_back()
            .map(|(&s, &(e, v))| (s, e, v))
            .filter(|&(_, e, _)| e > end);
        let right = match last {
            Some((_, _, v)) => Some((true, v)),
            None => self.map.get(&end).map(|&(_, v)| (false, v)),
        };
        let cut = |p: Option<(bool, V)>| usize::from(p.is_some_and(|(cut, _)| cut));
        let mut n = self.len() - inside + cut(left) + cut(right);
        if let Some(v) = value {
            n += 1;
            // Equal neighbours merge with it.
            n -= usize::from(left.is_some_and(|(_, l)| l == v));
            n -= usize::from(right.is_some_and(|(_, r)| r == v));
        }
        n
    }

    /// The ranges (clipped to `[start, end)`) that overlap it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        let first = self
            .map
            .range(..start)
            .next_back()
            .filter(|&(_, &(e, _))| e > start)
            .map(|(_, &(e, v))| (start, e.min(end), v));
        first.into_iter().chain(
            self.map
                .range(start..end.max(start))
                .map(move |(&s, &(e, v))| (s, e.min(end), v)),
        )
    }

    /// How many ranges are kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a plain array: any sequence of sets reads back the same.
        #[test]
        fn intervals_match_an_array(ops in proptest::collection::vec((0u64..64, 0u64..64, proptest::option::of(0u8..3)), 0..40)) {
            let mut iv = Intervals::new();
            let mut model = [None; 64];
            for (a, b, v) in ops {
                let (s, e) = (a.min(b), a.max(b));
                iv.set(s, e, v);
                for slot in &mut model[s as usize..e as usize] {
                    *slot = v;
                }
            }
            for (i, m) in model.iter().enumerate() {
                prop_assert_eq!(iv.get(i as u64), *m, "at {}", i);
            }
            // Ranges are disjoint, ordered, and no two equal neighbours touch.
            let all: alloc::vec::Vec<_> = iv.overlapping(0, 64).collect();
            for w in all.windows(2) {
                prop_assert!(w[0].1 <= w[1].0);
                prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "unmerged {:?}", w);
            }
            let covered: u64 = all.iter().map(|(s, e, _)| e - s).sum();
            prop_assert_eq!(covered, model.iter().filter(|m| m.is_some()).count() as u64);
        }
    }

    proptest! {
        /// What a quota is checked against: the count a set would leave
        /// is the count it leaves.
        #[test]
        fn len_after_set_is_the_len_after_the_set(
            ops in proptest::collection::vec((0u64..40, 0u64..40, proptest::option::of(0u8..3)), 0..30),
            last in (0u64..40, 0u64..40, proptest::option::of(0u8..3)),
        ) {
            let mut iv = Intervals::new();
            for (a, b, v) in ops {
                iv.set(a.min(b), a.max(b), v);
            }
            let (s, e, v) = (last.0.min(last.1), last.0.max(last.1), last.2);
            let predicted = iv.len_after_set(s, e, v);
            iv.set(s, e, v);
            prop_assert_eq!(predicted, iv.len());
        }
    }

    #[test]
    fn a_gigabyte_is_one_range() {
        let mut iv = Intervals::new();
        iv.set(0, 1 << 18, Some(1u8));
        iv.set(100, 101, Some(2));
        assert_eq!(iv.len(), 3);
        iv.set(100, 101, Some(1));
        assert_eq!(iv.len(), 1, "merged back");
    }
}
