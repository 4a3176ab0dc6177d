//! The set of blob bytes that are local: disjoint ranges with their total, behind the
//! state file's `fetchedSize` and the `layer_fetched_size` gauge.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint byte ranges with their total length.
#[derive(Default)]
pub(super) struct RangeSet {
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    pub(super) fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.map.remove(&s);
            self.total -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        self.total += end - start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.total, 20);
        s.insert(15..35);
        assert_eq!(s.total, 30);
        s.insert(0..5);
        s.insert(5..10);
        assert_eq!(s.total, 40);
        assert_eq!(s.map.len(), 1);
    }
}
