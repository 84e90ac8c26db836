//! One bit per cluster of a device: which clusters have been seen. The
//! writer uses it to refuse a cluster twice and to name the missing ones,
//! the reader to check uniqueness (§10, check 9) and completeness at EOF
//! (§7), and the live assembler to know which clusters are archived and
//! which of those are zero.

/// Bits per storage word.
const WORD_BITS: u64 = u64::BITS as u64;

/// Clusters per chunk of storage. Chunks are allocated when their first
/// bit is set, so a set costs memory for the clusters actually seen, not
/// for the device size a header claims: an empty set for a 256 TiB device
/// (2^32 clusters) is 4096 chunk slots (32 KiB), not 512 MiB, and 254 of
/// them from one hostile header stay small too.
const CHUNK_BITS: u64 = 1 << 20;

/// A fixed-size set of cluster numbers `0..len`, with its population kept
/// so that [`count`](Self::count) is free. Searches go a 64-bit word at a
/// time (and skip chunks never written), so a device of 2^32 clusters is
/// never walked bit by bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterBitmap {
    /// Chunk `i` holds clusters `i * CHUNK_BITS ..`; `None`: none set.
    chunks: Vec<Option<Box<[u64]>>>,
    len: u64,
    count: u64,
}

impl ClusterBitmap {
    /// An empty set for clusters `0..clusters`.
    pub fn new(clusters: u64) -> Self {
        ClusterBitmap {
            chunks: vec![None; clusters.div_ceil(CHUNK_BITS) as usize],
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

    /// Chunk, word index in it and bit of `cluster`, which must be below
    /// [`len`](Self::len).
    fn at(&self, cluster: u64) -> (usize, usize, u64) {
        assert!(
            cluster < self.len,
            "cluster {cluster} outside a bitmap of {} clusters",
            self.len
        );
        let in_chunk = cluster % CHUNK_BITS;
        (
            (cluster / CHUNK_BITS) as usize,
            (in_chunk / WORD_BITS) as usize,
            1 << (in_chunk % WORD_BITS),
        )
    }

    /// True when `cluster` is in the set.
    pub fn get(&self, cluster: u64) -> bool {
        let (c, w, bit) = self.at(cluster);
        self.chunks[c]
            .as_ref()
            .is_some_and(|words| words[w] & bit != 0)
    }

    /// Adds `cluster`; returns whether it was in the set already.
    pub fn set(&mut self, cluster: u64) -> bool {
        let (c, w, bit) = self.at(cluster);
        let bits = (self.len - c as u64 * CHUNK_BITS).min(CHUNK_BITS);
        let words = self.chunks[c]
            .get_or_insert_with(|| vec![0; bits.div_ceil(WORD_BITS) as usize].into_boxed_slice());
        let was = words[w] & bit != 0;
        if !was {
            words[w] |= bit;
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
        // Bits past `len` are never set, so a clear bit is always found
        // below it when the set is not full.
        self.chunks.iter().enumerate().find_map(|(c, chunk)| {
            let base = c as u64 * CHUNK_BITS;
            let Some(words) = chunk else {
                return Some(base);
            };
            let (w, word) = words.iter().enumerate().find(|(_, w)| **w != u64::MAX)?;
            Some(base + w as u64 * WORD_BITS + u64::from(word.trailing_ones()))
        })
    }

    /// The clusters not in the set, ascending; a word at a time, so a
    /// nearly full set is walked quickly.
    pub fn clear(&self) -> impl Iterator<Item = u64> + '_ {
        let len = self.len;
        self.chunks.iter().enumerate().flat_map(
            move |(c, chunk)| -> Box<dyn Iterator<Item = u64> + '_> {
                let base = c as u64 * CHUNK_BITS;
                let Some(words) = chunk else {
                    return Box::new(base..len.min(base + CHUNK_BITS));
                };
                Box::new(words.iter().enumerate().flat_map(move |(w, &word)| {
                    let base = base + w as u64 * WORD_BITS;
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
                }))
            },
        )
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

    #[test]
    fn across_chunk_boundaries_and_unwritten_chunks() {
        let len = 3 * CHUNK_BITS + 5;
        let mut b = ClusterBitmap::new(len);
        assert_eq!(b.first_clear(), Some(0));
        for c in 0..CHUNK_BITS + 2 {
            b.set(c);
        }
        assert_eq!(b.first_clear(), Some(CHUNK_BITS + 2));
        assert!(!b.get(2 * CHUNK_BITS));
        assert!(!b.set(len - 1));
        assert!(b.get(len - 1));
        let clear: Vec<u64> = b.clear().take(3).collect();
        assert_eq!(clear, vec![CHUNK_BITS + 2, CHUNK_BITS + 3, CHUNK_BITS + 4]);
        let tail: Vec<u64> = b.clear().skip_while(|&c| c < 3 * CHUNK_BITS).collect();
        assert_eq!(tail, (3 * CHUNK_BITS..len - 1).collect::<Vec<_>>());
        assert_eq!(b.clear().count() as u64, len - b.count());
        // Chunks are allocated only where bits were set: 2^32 clusters
        // (256 TiB) cost nothing until used.
        let huge = ClusterBitmap::new(1 << 32);
        assert_eq!(huge.chunks.len(), 4096);
        assert!(huge.chunks.iter().all(Option::is_none));
        assert_eq!(huge.first_clear(), Some(0));
        assert_eq!(huge.clear().nth(5), Some(5));
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
