//! Which bytes of a partial cluster have been written: a small sorted set of
//! disjoint half-open ranges, merged on insert.

/// Covered byte ranges within one cluster.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Coverage {
    ranges: Vec<(u32, u32)>,
}

impl Coverage {
    /// Marks `[start, end)` as written.
    pub fn insert(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Keep ranges that neither overlap nor touch [s, e); absorb the rest.
        self.ranges.retain(|&(a, b)| {
            if b < s || a > e {
                true
            } else {
                s = s.min(a);
                e = e.max(b);
                false
            }
        });
        let at = self.ranges.partition_point(|&(a, _)| a < s);
        self.ranges.insert(at, (s, e));
    }

    /// True when `[0, len)` is entirely covered.
    pub fn is_full(&self, len: u32) -> bool {
        matches!(self.ranges.as_slice(), [(0, e)] if *e >= len)
    }

    /// Covered bytes.
    #[cfg(test)]
    pub fn covered(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| u64::from(b - a)).sum()
    }

    /// The covered ranges, ascending.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges() {
        let mut c = Coverage::default();
        c.insert(10, 20);
        c.insert(30, 40);
        assert_eq!(c.ranges(), &[(10, 20), (30, 40)]);
        c.insert(20, 30);
        assert_eq!(c.ranges(), &[(10, 40)]);
        c.insert(0, 5);
        c.insert(3, 12);
        assert_eq!(c.ranges(), &[(0, 40)]);
        assert!(c.is_full(40) && !c.is_full(41));
        c.insert(50, 50);
        assert_eq!(c.covered(), 40);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u32..200, 0u32..60), 0..20)) {
            let mut c = Coverage::default();
            let mut bits = [false; 260];
            for (s, l) in ops {
                c.insert(s, s + l);
                for b in &mut bits[s as usize..(s + l) as usize] { *b = true; }
            }
            let covered = bits.iter().filter(|b| **b).count() as u64;
            proptest::prop_assert_eq!(c.covered(), covered);
            for w in c.ranges().windows(2) {
                proptest::prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}
