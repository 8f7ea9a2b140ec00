//! A set of sector numbers kept as disjoint half-open ranges `start..end`:
//! the sector store's gaps (sectors below the extent not sealed yet) and its
//! sectors written since the last sync.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RangeSet {
    /// start -> end, disjoint and not touching (adjacent ranges are merged).
    ranges: BTreeMap<u64, u64>,
}

impl FromIterator<(u64, u64)> for RangeSet {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(ranges: I) -> Self {
        let mut set = RangeSet::default();
        for (lo, hi) in ranges {
            set.insert(lo, hi);
        }
        set
    }
}

impl RangeSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The ranges in order.
    pub fn to_vec(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// How many disjoint ranges the set holds.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The shortest range (the lowest of equals), if any.
    pub fn shortest(&self) -> Option<(u64, u64)> {
        self.ranges
            .iter()
            .min_by_key(|&(&s, &e)| e - s)
            .map(|(&s, &e)| (s, e))
    }

    /// The parts of the set inside `lo..hi`, in order.
    pub fn pieces(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let first = self.ranges.range(..=lo).next_back().map_or(lo, |(&s, _)| s);
        self.ranges
            .range(first..hi)
            .map(|(&s, &e)| (s.max(lo), e.min(hi)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    /// The lowest range, if any.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.ranges.iter().next().map(|(&s, &e)| (s, e))
    }

    pub fn contains(&self, n: u64) -> bool {
        self.covers(n, n + 1)
    }

    /// Whether every number of `lo..hi` is in the set (true if it is empty).
    pub fn covers(&self, lo: u64, hi: u64) -> bool {
        lo >= hi
            || self
                .ranges
                .range(..=lo)
                .next_back()
                .is_some_and(|(_, &end)| hi <= end)
    }

    /// Add `lo..hi`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        let (mut start, mut end) = (lo, hi);
        let merged: Vec<(u64, u64)> = self
            .ranges
            .range(..=hi)
            .rev()
            .take_while(|&(_, &e)| e >= lo)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in merged {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Take `lo..hi` out of the set.
    pub fn remove(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        let touched: Vec<(u64, u64)> = self
            .ranges
            .range(..hi)
            .rev()
            .take_while(|&(_, &e)| e > lo)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touched {
            self.ranges.remove(&s);
            if s < lo {
                self.ranges.insert(s, lo);
            }
            if e > hi {
                self.ranges.insert(hi, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    fn members(set: &RangeSet, upto: u64) -> Vec<u64> {
        (0..upto).filter(|&n| set.contains(n)).collect()
    }

    #[test]
    fn inserts_merge_and_removals_split() {
        let mut set = RangeSet::default();
        set.insert(10, 20);
        set.insert(30, 40);
        set.insert(20, 25); // touches the first: merged
        assert_eq!(set.ranges.len(), 2);
        assert!(set.covers(10, 25) && !set.covers(10, 26) && !set.covers(24, 31));
        set.insert(5, 35); // swallows both ends
        assert_eq!(set.first(), Some((5, 40)));
        set.remove(12, 14);
        set.remove(38, 100);
        assert_eq!(members(&set, 50), (5..12).chain(14..38).collect::<Vec<_>>());
        assert_eq!(set.to_vec(), vec![(5, 12), (14, 38)]);
        assert_eq!(set.pieces(8, 20), vec![(8, 12), (14, 20)]);
        assert_eq!(set.pieces(12, 14), vec![]);
        assert_eq!(set.pieces(0, 100), set.to_vec());
        assert_eq!((set.range_count(), set.shortest()), (2, Some((5, 12))));
        set.remove(0, 100);
        assert!(set.is_empty());
        assert!(set.covers(3, 3), "an empty range is covered");
    }

    #[test]
    fn matches_a_plain_set_under_random_changes() {
        let mut set = RangeSet::default();
        let mut plain = [false; 200];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lo = x % 200;
            let hi = (lo + (x >> 32) % 20).min(200);
            let add = (x >> 8).is_multiple_of(2);
            if add {
                set.insert(lo, hi);
            } else {
                set.remove(lo, hi);
            }
            for flag in &mut plain[lo as usize..hi as usize] {
                *flag = add;
            }
        }
        let expected: Vec<u64> = (0..200).filter(|&n| plain[n as usize]).collect();
        assert_eq!(members(&set, 200), expected);
    }
}
