//! One bit per cluster of a device: which clusters have been seen. The
//! writer uses it to refuse a cluster twice and to name the missing ones,
//! the reader to check uniqueness (§10, check 9) and completeness at EOF
//! (§7), and the live assembler to know which clusters are archived and
//! which of those are zero.

/// Bits per storage word.
const WORD_BITS: u64 = u64::BITS as u64;

/// A fixed-size set of cluster numbers `0..len`, with its population kept
/// so that [`count`](Self::count) is free. Searches go a 64-bit word at a
/// time, so a device of 2^32 clusters is never walked bit by bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterBitmap {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl ClusterBitmap {
    /// An empty set for clusters `0..clusters`.
    pub fn new(clusters: u64) -> Self {
        ClusterBitmap {
            words: vec![0; clusters.div_ceil(WORD_BITS) as usize],
            len: clusters,
            count: 0,
        }
    }

    /// Number of clusters the set covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set covers no clusters at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Word index and bit of `cluster`, which must be below [`len`](Self::len).
    fn at(&self, cluster: u64) -> (usize, u64) {
        assert!(
            cluster < self.len,
            "cluster {cluster} outside a bitmap of {} clusters",
            self.len
        );
        ((cluster / WORD_BITS) as usize, 1 << (cluster % WORD_BITS))
    }

    /// True when `cluster` is in the set.
    pub fn get(&self, cluster: u64) -> bool {
        let (w, bit) = self.at(cluster);
        self.words[w] & bit != 0
    }

    /// Adds `cluster`; returns whether it was in the set already.
    pub fn set(&mut self, cluster: u64) -> bool {
        let (w, bit) = self.at(cluster);
        let was = self.words[w] & bit != 0;
        if !was {
            self.words[w] |= bit;
            self.count += 1;
        }
        was
    }

    /// Number of clusters in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// True when every cluster `0..len` is in the set.
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// The lowest cluster not in the set, or `None` when it is full.
    pub fn first_clear(&self) -> Option<u64> {
        if self.is_full() {
            return None;
        }
        let (w, word) = self
            .words
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)?;
        // Bits past `len` are never set, so a clear bit is always found
        // below it when the set is not full.
        Some(w as u64 * WORD_BITS + u64::from(word.trailing_ones()))
    }

    /// The clusters not in the set, ascending; a word at a time, so a
    /// nearly full set is walked quickly.
    pub fn clear(&self) -> impl Iterator<Item = u64> + '_ {
        let len = self.len;
        self.words.iter().enumerate().flat_map(move |(w, &word)| {
            let base = w as u64 * WORD_BITS;
            let mut free = !word;
            std::iter::from_fn(move || {
                if free == 0 {
                    return None;
                }
                let bit = u64::from(free.trailing_zeros());
                free &= free - 1;
                Some(base + bit)
            })
            .take_while(move |&c| c < len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn across_word_boundaries() {
        let mut b = ClusterBitmap::new(130);
        assert_eq!((b.len(), b.count(), b.first_clear()), (130, 0, Some(0)));
        for c in [0, 63, 64, 127, 128, 129] {
            assert!(!b.get(c));
            assert!(!b.set(c));
            assert!(b.get(c));
            assert!(b.set(c), "a second set reports the cluster as set");
        }
        assert_eq!(b.count(), 6);
        assert_eq!(b.first_clear(), Some(1));
        for c in 0..64 {
            b.set(c);
        }
        assert_eq!(b.first_clear(), Some(65));
        for c in (65..127).filter(|&c| c != 100) {
            b.set(c);
        }
        assert!(!b.is_full());
        assert_eq!((b.count(), b.first_clear()), (129, Some(100)));
        b.set(100);
        assert_eq!(b.count(), 130);
        assert!(b.is_full());
        assert_eq!(b.first_clear(), None);
    }

    #[test]
    fn last_word_partly_used() {
        let mut b = ClusterBitmap::new(65);
        for c in 0..64 {
            b.set(c);
        }
        assert_eq!(b.first_clear(), Some(64));
        b.set(64);
        assert_eq!(b.first_clear(), None);
        let empty = ClusterBitmap::new(0);
        assert!(empty.is_empty() && empty.is_full());
        assert_eq!(empty.first_clear(), None);
    }

    #[test]
    #[should_panic(expected = "outside a bitmap")]
    fn refuses_a_cluster_past_the_end() {
        ClusterBitmap::new(64).get(64);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_vec_of_bools(len in 0u64..300, sets in proptest::collection::vec(0u64..300, 0..200)) {
            let mut b = ClusterBitmap::new(len);
            let mut model = vec![false; len as usize];
            for c in sets.into_iter().filter(|&c| c < len) {
                proptest::prop_assert_eq!(b.set(c), model[c as usize]);
                model[c as usize] = true;
            }
            for (c, &m) in model.iter().enumerate() {
                proptest::prop_assert_eq!(b.get(c as u64), m);
            }
            proptest::prop_assert_eq!(b.count(), model.iter().filter(|&&m| m).count() as u64);
            proptest::prop_assert_eq!(b.first_clear(), model.iter().position(|&m| !m).map(|c| c as u64));
            let clear: Vec<u64> = b.clear().collect();
            let want: Vec<u64> = (0..len).filter(|&c| !model[c as usize]).collect();
            proptest::prop_assert_eq!(clear, want);
        }
    }
}
